//! The pvkit ELF note (v1.7): which ABI a kernel was built against and which features it cannot
//! run without, readable by the host before boot (as Solo5's manifest note and uhyve's
//! `.note.hermit` do).
//!
//! A kernel carries one note of type [`NOTE_TYPE_ABI`] and name [`NOTE_NAME`] in a section
//! called [`NOTE_SECTION`], which the linker puts in a `PT_NOTE` segment (lld does so by default;
//! a linker script with `PHDRS` must list one). `guest_pv::entry!` and `guest_pv::abi_note!`
//! emit it. The whole note is an [`AbiNote`]: the standard ELF note header, the name padded to 4
//! bytes, and the descriptor [`AbiNoteDesc`], all little-endian `u32`s.
//!
//! What `host-vmm` does with it before boot:
//! - a different ABI major version: refused;
//! - a required feature the VM does not offer (the host lacks it, `--disable` cleared it, or
//!   `--mode trapped` hides pvkit): refused, naming the features;
//! - no note at all: the kernel is booted as an unmodified guest (pvkit hidden, as in trapped
//!   mode), because the host cannot know which ABI it speaks.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// The section the note lives in.
pub const NOTE_SECTION: &str = ".note.pvkit";
/// The note's name (`n_namesz` = 6 counts the terminating NUL; padded to 8 bytes).
pub const NOTE_NAME: [u8; 8] = *b"pvkit\0\0\0";
/// `n_namesz`: `"pvkit"` plus its NUL.
pub const NOTE_NAME_SIZE: u32 = 6;
/// `n_type` of the ABI note.
pub const NOTE_TYPE_ABI: u32 = 1;
/// `n_descsz` of the ABI note.
pub const NOTE_DESC_SIZE: u32 = core::mem::size_of::<AbiNoteDesc>() as u32;

/// The descriptor of the ABI note.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct AbiNoteDesc {
    /// The packed ABI version the kernel was built against (`major << 16 | minor`).
    pub abi_version: u32,
    /// Reserved, 0.
    pub flags: u32,
    /// Feature bits 0–31 the kernel cannot run without.
    pub required_lo: u32,
    /// Feature bits 32–63 the kernel cannot run without.
    pub required_hi: u32,
}

impl AbiNoteDesc {
    /// The required feature bits as one `u64`.
    pub const fn required(&self) -> u64 {
        self.required_lo as u64 | ((self.required_hi as u64) << 32)
    }

    /// `(major, minor)` of [`abi_version`](Self::abi_version).
    pub const fn version(&self) -> (u16, u16) {
        crate::unpack_version(self.abi_version)
    }
}

/// A complete ABI note as it sits in the kernel image (4-byte aligned, 36 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C, align(4))]
pub struct AbiNote {
    /// `n_namesz` = [`NOTE_NAME_SIZE`].
    pub namesz: u32,
    /// `n_descsz` = [`NOTE_DESC_SIZE`].
    pub descsz: u32,
    /// `n_type` = [`NOTE_TYPE_ABI`].
    pub n_type: u32,
    /// [`NOTE_NAME`].
    pub name: [u8; 8],
    /// The descriptor.
    pub desc: AbiNoteDesc,
}

impl AbiNote {
    /// The note of a kernel built against this crate's ABI version that cannot run without
    /// the features in `required` (0: it runs anywhere, falling back to trapped devices).
    pub const fn new(required: u64) -> AbiNote {
        AbiNote {
            namesz: NOTE_NAME_SIZE,
            descsz: NOTE_DESC_SIZE,
            n_type: NOTE_TYPE_ABI,
            name: NOTE_NAME,
            desc: AbiNoteDesc {
                abi_version: crate::abi_version_packed(),
                flags: 0,
                required_lo: required as u32,
                required_hi: (required >> 32) as u32,
            },
        }
    }
}

/// Walks the notes in `bytes` (the contents of a `PT_NOTE` segment or `SHT_NOTE` section) and
/// returns the descriptor of the first pvkit ABI note. Malformed or truncated notes end the walk;
/// nothing here can read outside `bytes`. A pvkit note whose descriptor is shorter than
/// [`AbiNoteDesc`] is `Err(())`; longer descriptors are accepted (later minors may append).
#[allow(clippy::result_unit_err)]
pub fn find_abi_note(bytes: &[u8]) -> Result<Option<AbiNoteDesc>, ()> {
    let word = |at: usize| -> Option<u32> {
        let b = bytes.get(at..at.checked_add(4)?)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let mut at = 0usize;
    while let (Some(namesz), Some(descsz), Some(n_type)) = (word(at), word(at + 4), word(at + 8)) {
        let name_at = at + 12;
        let name_len = (namesz as usize).next_multiple_of(4);
        let Some(desc_at) = name_at.checked_add(name_len) else {
            return Ok(None);
        };
        let desc_len = (descsz as usize).next_multiple_of(4);
        let Some(next) = desc_at.checked_add(desc_len) else {
            return Ok(None);
        };
        let (Some(name), Some(desc)) = (
            bytes.get(name_at..name_at + namesz as usize),
            bytes.get(desc_at..desc_at + descsz as usize),
        ) else {
            return Ok(None);
        };
        if n_type == NOTE_TYPE_ABI && name == &NOTE_NAME[..NOTE_NAME_SIZE as usize] {
            return match AbiNoteDesc::read_from_prefix(desc) {
                Ok((d, _)) => Ok(Some(d)),
                Err(_) => Err(()),
            };
        }
        at = next;
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;
    use crate::features;

    #[test]
    fn a_note_is_found_among_others() {
        let ours = AbiNote::new(features::MMU_UPDATE | (1 << 40));
        assert_eq!(core::mem::size_of::<AbiNote>(), 36);
        // A GNU build-id note first (name "GNU\0", 20-byte descriptor).
        let mut bytes = Vec::new();
        for w in [4u32, 20, 3] {
            bytes.extend_from_slice(&w.to_le_bytes());
        }
        bytes.extend_from_slice(b"GNU\0");
        bytes.extend_from_slice(&[0xab; 20]);
        bytes.extend_from_slice(ours.as_bytes());
        let d = find_abi_note(&bytes).unwrap().unwrap();
        assert_eq!(d, ours.desc);
        assert_eq!(d.required(), features::MMU_UPDATE | (1 << 40));
        assert_eq!(
            d.version(),
            (crate::ABI_VERSION_MAJOR, crate::ABI_VERSION_MINOR)
        );
    }

    #[test]
    fn malformed_notes_are_not_found_and_never_panic() {
        let ours = AbiNote::new(0);
        let full = ours.as_bytes();
        for cut in 0..full.len() {
            let r = find_abi_note(&full[..cut]);
            assert!(matches!(r, Ok(None) | Err(())), "cut {cut}: {r:?}");
        }
        // Huge sizes must not overflow.
        let mut bad = full.to_vec();
        bad[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(find_abi_note(&bad), Ok(None));
        let mut bad = full.to_vec();
        bad[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(find_abi_note(&bad), Ok(None));
        // A pvkit note with a short descriptor is an error, not "no note".
        let mut short = full.to_vec();
        short[4..8].copy_from_slice(&8u32.to_le_bytes());
        assert_eq!(find_abi_note(&short), Err(()));
        // Another type with our name is skipped.
        let mut other = full.to_vec();
        other[8..12].copy_from_slice(&2u32.to_le_bytes());
        assert_eq!(find_abi_note(&other), Ok(None));
    }
}
