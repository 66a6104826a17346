//! The PVH boot protocol (Xen's `hvm_start_info`, also spoken by QEMU, Firecracker and
//! cloud-hypervisor): what a kernel that carries the [`XEN_ELFNOTE_PHYS32_ENTRY`] note is handed
//! when a VMM enters it in 32-bit protected mode.
//!
//! Entry state (Xen's `docs/misc/pvh.pandoc`): 32-bit protected mode, paging off, flat 4 GiB
//! `cs` (execute/read) and `ds`/`es`/`ss` (read/write), `cr0.PE` set, `cr4` and `efer` clear,
//! interrupts off, `ebx` = the guest-physical address of an [`HvmStartInfo`]. Everything else
//! (GDT, stack, page tables) is the kernel's own business.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// `n_type` of the PVH entry note (`XEN_ELFNOTE_PHYS32_ENTRY`); its descriptor is the
/// guest-physical address of the 32-bit entry point (a 4- or 8-byte little-endian value).
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// The note's name, with its NUL (`n_namesz` = 4).
pub const XEN_NOTE_NAME: &[u8; 4] = b"Xen\0";
/// The section the PVH note lives in (a `SHT_NOTE` section, kept in a `PT_NOTE` segment).
pub const XEN_NOTE_SECTION: &str = ".note.Xen";
/// [`HvmStartInfo::magic`].
pub const HVM_START_MAGIC: u32 = 0x336e_c578;
/// [`HvmMemmapEntry::kind`] of RAM.
pub const MEMMAP_TYPE_RAM: u32 = 1;
/// [`HvmMemmapEntry::kind`] of reserved memory.
pub const MEMMAP_TYPE_RESERVED: u32 = 2;

/// `struct hvm_start_info` (version 1), all little-endian.
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct HvmStartInfo {
    /// [`HVM_START_MAGIC`].
    pub magic: u32,
    /// 0, or 1 when `memmap_paddr`/`memmap_entries` are valid.
    pub version: u32,
    /// `SIF_*` flags (none used by pvkit).
    pub flags: u32,
    /// Number of modules (pvkit passes none).
    pub nr_modules: u32,
    /// Module list (unused).
    pub modlist_paddr: u64,
    /// Guest-physical address of the NUL-terminated command line, 0 for none.
    pub cmdline_paddr: u64,
    /// ACPI RSDP, 0 for none.
    pub rsdp_paddr: u64,
    /// Guest-physical address of the memory map (version >= 1).
    pub memmap_paddr: u64,
    /// Entries in the memory map (version >= 1).
    pub memmap_entries: u32,
    /// Zero.
    pub reserved: u32,
}

/// `struct hvm_memmap_table_entry` (an E820 entry).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct HvmMemmapEntry {
    /// First byte.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// [`MEMMAP_TYPE_RAM`], [`MEMMAP_TYPE_RESERVED`], … (E820 types).
    pub kind: u32,
    /// Zero.
    pub reserved: u32,
}

/// A complete PVH entry note as a kernel carries it: header, `"Xen\0"`, an 8-byte descriptor
/// (QEMU reads a 64-bit value; the high half is 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C, align(4))]
pub struct PvhNote {
    /// 4.
    pub namesz: u32,
    /// 8.
    pub descsz: u32,
    /// [`XEN_ELFNOTE_PHYS32_ENTRY`].
    pub n_type: u32,
    /// [`XEN_NOTE_NAME`].
    pub name: [u8; 4],
    /// Entry address, low half.
    pub entry_lo: u32,
    /// Entry address, high half (0).
    pub entry_hi: u32,
}

impl PvhNote {
    /// The note for a 32-bit entry at `entry`.
    pub const fn new(entry: u32) -> PvhNote {
        PvhNote {
            namesz: 4,
            descsz: 8,
            n_type: XEN_ELFNOTE_PHYS32_ENTRY,
            name: *XEN_NOTE_NAME,
            entry_lo: entry,
            entry_hi: 0,
        }
    }
}

/// Walks the notes in `bytes` (a `PT_NOTE` segment) and returns the PVH entry address of the
/// first `Xen` note of type [`XEN_ELFNOTE_PHYS32_ENTRY`] with a 4- or 8-byte descriptor (an
/// 8-byte one must fit in 32 bits). Never reads outside `bytes`.
pub fn find_pvh_entry(bytes: &[u8]) -> Option<u32> {
    let word = |at: usize| -> Option<u32> {
        let b = bytes.get(at..at.checked_add(4)?)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let mut at = 0usize;
    while let (Some(namesz), Some(descsz), Some(n_type)) = (word(at), word(at + 4), word(at + 8)) {
        let name_at = at.checked_add(12)?;
        let desc_at = name_at.checked_add((namesz as usize).checked_next_multiple_of(4)?)?;
        let next = desc_at.checked_add((descsz as usize).checked_next_multiple_of(4)?)?;
        let name = bytes.get(name_at..name_at.checked_add(namesz as usize)?)?;
        if n_type == XEN_ELFNOTE_PHYS32_ENTRY && name == XEN_NOTE_NAME {
            return match descsz {
                4 => word(desc_at),
                8 => match (word(desc_at)?, word(desc_at + 4)?) {
                    (lo, 0) => Some(lo),
                    _ => None,
                },
                _ => None,
            };
        }
        at = next;
    }
    None
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;

    #[test]
    fn layouts_match_xen() {
        assert_eq!(core::mem::size_of::<HvmStartInfo>(), 56);
        assert_eq!(core::mem::size_of::<HvmMemmapEntry>(), 24);
        assert_eq!(core::mem::size_of::<PvhNote>(), 24);
    }

    #[test]
    fn finds_the_entry_after_other_notes_and_never_panics() {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(crate::note::AbiNote::new(0).as_bytes());
        bytes.extend_from_slice(PvhNote::new(0x20_1234).as_bytes());
        assert_eq!(find_pvh_entry(&bytes), Some(0x20_1234));
        assert_eq!(
            find_pvh_entry(crate::note::AbiNote::new(0).as_bytes()),
            None
        );
        for cut in 0..bytes.len() {
            let _ = find_pvh_entry(&bytes[..cut]);
        }
        let mut four = PvhNote::new(0).as_bytes()[..20].to_vec();
        four[4..8].copy_from_slice(&4u32.to_le_bytes());
        four[16..20].copy_from_slice(&0x10_0000u32.to_le_bytes());
        assert_eq!(find_pvh_entry(&four), Some(0x10_0000));
        let mut high = PvhNote::new(1);
        high.entry_hi = 1;
        assert_eq!(find_pvh_entry(high.as_bytes()), None);
    }
}
