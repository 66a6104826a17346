//! Which pvkit ABI a kernel speaks (its ELF note, [`hypercall_abi::note`]) and what a VM offers
//! it: read from the image before boot, so a kernel that cannot run is refused with one clear
//! line instead of failing inside the guest.
//!
//! The decision ([`KernelAbi::offer`]):
//! - `--mode trapped`: pvkit is hidden ([`Offer::Hidden`]); a kernel that *requires* features is
//!   refused.
//! - `--mode pv` and a note of this ABI major: pvkit is shown with the host's features minus
//!   `--disable`d ones ([`Offer::Pv`]); a required feature not in that set is refused.
//! - a note of another major: refused.
//! - no note: the kernel does not say which ABI it speaks, so it boots as an unmodified guest
//!   ([`Offer::Hidden`]).

use hypercall_abi::features::Names;
use hypercall_abi::note::{AbiNoteDesc, find_abi_note};
use hypercall_abi::{ABI_VERSION_MAJOR, ABI_VERSION_MINOR, boot::Mode};

/// `PT_NOTE`.
const PT_NOTE: u32 = 4;
/// `SHT_NOTE`.
const SHT_NOTE: u32 = 7;
/// Section headers looked at, at most (bounds the work on hostile input).
const MAX_SECTIONS: usize = 512;

/// What the image says about its ABI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelAbi {
    /// No pvkit note.
    Unmarked,
    /// A pvkit ABI note.
    Note(AbiNoteDesc),
    /// A pvkit note whose descriptor is too short to read.
    Malformed,
}

/// What the VM shows the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// pvkit's CPUID leaves with these feature bits; the hypercall port is served.
    Pv(u64),
    /// No pvkit at all (an unmodified guest's view); a hypercall port write is a guest error.
    Hidden(HiddenBecause),
}

/// Why pvkit is hidden.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HiddenBecause {
    /// `--mode trapped` asked for it.
    TrappedMode,
    /// The kernel carries no pvkit note.
    NoNote,
}

impl Offer {
    /// The feature bits advertised (0 when hidden).
    pub fn features(&self) -> u64 {
        match *self {
            Offer::Pv(f) => f,
            Offer::Hidden(_) => 0,
        }
    }

    /// The mode the VM actually runs in.
    pub fn mode(&self) -> Mode {
        match self {
            Offer::Pv(_) => Mode::Pv,
            Offer::Hidden(_) => Mode::Trapped,
        }
    }
}

/// Why a kernel is refused before boot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AbiRefusal {
    /// Built against another ABI major version.
    #[error(
        "it was built against pvkit ABI {major}.{minor}, this host speaks {}.{} (a different \
         major version is incompatible); rebuild it against this pvkit's guest-pv",
        ABI_VERSION_MAJOR,
        ABI_VERSION_MINOR
    )]
    OtherMajor {
        /// The kernel's major version.
        major: u16,
        /// The kernel's minor version.
        minor: u16,
    },
    /// The note cannot be read.
    #[error("its pvkit ABI note (section .note.pvkit) is malformed")]
    MalformedNote,
    /// A required feature is not offered.
    #[error("it requires pvkit features {missing}, which {why}")]
    Missing {
        /// The missing features, by name.
        missing: String,
        /// Why they are not offered.
        why: String,
    },
}

impl KernelAbi {
    /// Reads the note of an ELF64 image from its `PT_NOTE` segments, or else its `SHT_NOTE`
    /// sections. Anything malformed in the headers reads as "no note" (the loader reports bad
    /// headers itself).
    pub fn read(image: &[u8]) -> KernelAbi {
        let mut found = KernelAbi::Unmarked;
        for bytes in note_ranges(image) {
            match find_abi_note(bytes) {
                Ok(Some(desc)) => return KernelAbi::Note(desc),
                Ok(None) => {}
                Err(()) => found = KernelAbi::Malformed,
            }
        }
        found
    }

    /// The feature bits the kernel requires (0 without a note).
    pub fn required(&self) -> u64 {
        match self {
            KernelAbi::Note(d) => d.required(),
            _ => 0,
        }
    }

    /// What a VM in `mode` on a host offering `host_features`, minus `disabled`, shows this
    /// kernel, or why it refuses to boot it.
    pub fn offer(
        &self,
        mode: Mode,
        host_features: u64,
        disabled: u64,
    ) -> Result<Offer, AbiRefusal> {
        let desc = match *self {
            KernelAbi::Malformed => return Err(AbiRefusal::MalformedNote),
            KernelAbi::Unmarked => {
                return Ok(Offer::Hidden(match mode {
                    Mode::Trapped => HiddenBecause::TrappedMode,
                    Mode::Pv => HiddenBecause::NoNote,
                }));
            }
            KernelAbi::Note(d) => d,
        };
        let (major, minor) = desc.version();
        if major != ABI_VERSION_MAJOR {
            return Err(AbiRefusal::OtherMajor { major, minor });
        }
        let required = desc.required();
        let missing = |bits: u64, why: String| AbiRefusal::Missing {
            missing: Names(bits).to_string(),
            why,
        };
        if mode == Mode::Trapped {
            return if required == 0 {
                Ok(Offer::Hidden(HiddenBecause::TrappedMode))
            } else {
                Err(missing(
                    required,
                    "--mode trapped hides (it runs the kernel as an unmodified guest)".into(),
                ))
            };
        }
        let offered = host_features & !disabled;
        let lacking = required & !host_features;
        if lacking != 0 {
            return Err(missing(lacking, "this host does not offer".into()));
        }
        let off = required & disabled;
        if off != 0 {
            return Err(missing(off, "--disable turns off".into()));
        }
        Ok(Offer::Pv(offered))
    }
}

/// The byte ranges of the image's note segments (or, without any, note sections).
pub(crate) fn note_ranges(image: &[u8]) -> Vec<&[u8]> {
    let u16_at = |at: usize| {
        image
            .get(at..at.checked_add(2)?)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |at: usize| {
        image
            .get(at..at.checked_add(4)?)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    };
    let u64_at = |at: usize| {
        image
            .get(at..at.checked_add(8)?)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    let range = |off: Option<u64>, len: Option<u64>| -> Option<&[u8]> {
        let off = usize::try_from(off?).ok()?;
        let len = usize::try_from(len?).ok()?;
        image.get(off..off.checked_add(len)?)
    };
    if image.get(..4) != Some(b"\x7fELF") || image.get(4) != Some(&2) {
        return Vec::new();
    }
    let mut out: Vec<&[u8]> = crate::loader::program_headers(image)
        .iter()
        .filter(|ph| ph.kind == PT_NOTE)
        .filter_map(|ph| range(Some(ph.offset), Some(ph.filesz)))
        .collect();
    if !out.is_empty() {
        return out;
    }
    // Section headers: e_shoff at 40, e_shentsize at 58, e_shnum at 60.
    if let (Some(shoff), Some(64), Some(shnum)) = (u64_at(40), u16_at(58), u16_at(60)) {
        for i in 0..usize::from(shnum).min(MAX_SECTIONS) {
            let Some(at) = usize::try_from(shoff)
                .ok()
                .and_then(|p| p.checked_add(i * 64))
            else {
                break;
            };
            // A hostile e_shoff may put `at` anywhere: every field offset is checked.
            let field = |d: usize| at.checked_add(d);
            if field(4).and_then(u32_at) == Some(SHT_NOTE)
                && let Some(r) = range(field(24).and_then(u64_at), field(32).and_then(u64_at))
            {
                out.push(r);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use hypercall_abi::features;
    use hypercall_abi::note::AbiNote;
    use zerocopy::IntoBytes;

    use super::*;
    use crate::loader::{minimal_elf, minimal_elf_with_note};

    fn note_with(version: u32, required: u64) -> AbiNote {
        let mut n = AbiNote::new(required);
        n.desc.abi_version = version;
        n
    }

    #[test]
    fn reads_the_note_of_a_minimal_image() {
        assert_eq!(
            KernelAbi::read(&minimal_elf(0x20_0000, &[0xf4], 0x1000)),
            KernelAbi::Note(AbiNote::new(0).desc)
        );
        let n = note_with(hypercall_abi::abi_version_packed(), features::MMU_UPDATE);
        let img = minimal_elf_with_note(0x20_0000, &[0xf4], 0x1000, Some(n.as_bytes()));
        assert_eq!(KernelAbi::read(&img).required(), features::MMU_UPDATE);
        let none = minimal_elf_with_note(0x20_0000, &[0xf4], 0x1000, None);
        assert_eq!(KernelAbi::read(&none), KernelAbi::Unmarked);
        assert_eq!(KernelAbi::read(b"\x7fELF"), KernelAbi::Unmarked);
        assert_eq!(KernelAbi::read(b""), KernelAbi::Unmarked);
    }

    #[test]
    fn mutated_headers_never_panic() {
        let img = minimal_elf(0x20_0000, &[0xf4], 0x1000);
        for i in 0..0x300 {
            for v in [0u8, 0xff, 0x7f, 4] {
                let mut m = img.clone();
                m[i] = v;
                let _ = KernelAbi::read(&m);
            }
        }
    }

    #[test]
    fn offers_follow_mode_note_and_disable() {
        let host = features::V1_7;
        let plain = KernelAbi::Note(AbiNote::new(0).desc);
        assert_eq!(plain.offer(Mode::Pv, host, 0), Ok(Offer::Pv(host)));
        assert_eq!(
            plain.offer(Mode::Pv, host, features::NULL),
            Ok(Offer::Pv(host & !features::NULL))
        );
        assert_eq!(
            plain.offer(Mode::Trapped, host, 0),
            Ok(Offer::Hidden(HiddenBecause::TrappedMode))
        );
        assert_eq!(
            KernelAbi::Unmarked.offer(Mode::Pv, host, 0),
            Ok(Offer::Hidden(HiddenBecause::NoNote))
        );
        let needs = KernelAbi::Note(AbiNote::new(features::MMU_UPDATE).desc);
        assert_eq!(
            needs.offer(Mode::Pv, host, 0).map(|o| o.features()),
            Ok(host)
        );
        let e = needs.offer(Mode::Trapped, host, 0).unwrap_err();
        assert!(e.to_string().contains("mmu_update") && e.to_string().contains("--mode trapped"));
        let e = needs
            .offer(Mode::Pv, host, features::MMU_UPDATE)
            .unwrap_err();
        assert!(e.to_string().contains("--disable"), "{e}");
        let e = needs
            .offer(Mode::Pv, host & !features::MMU_UPDATE, 0)
            .unwrap_err();
        assert!(e.to_string().contains("does not offer"), "{e}");
        let v2 = KernelAbi::Note(note_with(2 << 16, 0).desc);
        let e = v2.offer(Mode::Pv, host, 0).unwrap_err();
        assert_eq!(e, AbiRefusal::OtherMajor { major: 2, minor: 0 });
        assert!(e.to_string().contains("ABI 2.0"), "{e}");
        // A newer minor of the same major is fine.
        let newer = KernelAbi::Note(note_with((1 << 16) | 99, 0).desc);
        assert_eq!(newer.offer(Mode::Pv, host, 0), Ok(Offer::Pv(host)));
        assert_eq!(
            KernelAbi::Malformed.offer(Mode::Pv, host, 0),
            Err(AbiRefusal::MalformedNote)
        );
    }
}
