//! A page-table manager for pvkit's page-table pool, in PV mode (batched `mmu_update`
//! hypercalls) or trapped mode (plain stores the host traps), following
//! [`hypercall_abi::mmu`] exactly.
//!
//! - [`PtFrameAllocator`]: the free frames of the pool, from the boot memory map.
//! - [`Updater`]: how an entry is written — [`Updater::Pv`] queues it in a [`Batch`] (flushed
//!   with one `mmu_update` per batch), [`Updater::Trapped`] stores it (one exit per entry). It is
//!   the only step that differs between the modes.
//! - [`AddressSpace`]: a page-table root — pvkit's boot root, or a new root pinned with
//!   `mmu_pin` (PV only) — with [`map_4k`](AddressSpace::map_4k),
//!   [`unmap_4k`](AddressSpace::unmap_4k), [`protect_4k`](AddressSpace::protect_4k),
//!   [`entry_4k`](AddressSpace::entry_4k) and the TLB operations.
//! - [`NativeSpace`]: for comparison, tables in ordinary RAM written with plain stores, which
//!   the host never sees (what a kernel does without pvkit).
//! - The hypercalls [`Pvkit::mmu_update`](crate::Pvkit::mmu_update) and
//!   [`Pvkit::mmu_pin`](crate::Pvkit::mmu_pin).
//!
//! # How the manager works
//! Tables are read through the boot identity map (pool GPA = VA) with volatile reads; an entry
//! with an update still queued in the batch reads as that update's value, so the manager always
//! sees its own writes. Missing intermediate tables are taken from the [`PtFrameAllocator`] (zero, as the
//! host guarantees) and linked top-down — link first, then fill, as the host's typing rules
//! require — with Present | Writable | User | Accessed. Leaves get Present | User | Accessed |
//! Dirty plus the requested [`LEAF_FLAGS_ALLOWED`] bits; bits 52..=63 are never set. The
//! manager never touches L4 slot 0 (the VMM's identity map of `0..4 GiB`, shared by every root)
//! and never splits a huge page. It never panics: every failure is an [`MmuError`].
//!
//! # TLB
//! The host never invalidates the TLB. After changing or removing a present mapping, call
//! [`AddressSpace::flush_tlb`] (or [`AddressSpace::flush_page`]): it flushes the batch first,
//! then the TLB (through a kernel service at CPL 3, see [`crate::cpu`]). Mapping a previously
//! non-present page needs only the batch flush ([`AddressSpace::flush`]) before the access.
//!
//! # Example
//! ```no_run
//! use guest_pv::mmu::{AddressSpace, Batch, PtFrameAllocator, Updater};
//! use hypercall_abi::boot::BootInfo;
//! use hypercall_abi::mmu::{MMU_UPDATE_MAX, MmuUpdate, PTE_WRITABLE};
//!
//! # fn demo(info: &BootInfo, pv: guest_pv::Pvkit, buf: &'static mut [MmuUpdate]) {
//! let pool = PtFrameAllocator::from_boot_info(info);
//! // SAFETY: `buf` is a kernel static, identity-mapped by pvkit's boot tables.
//! let batch = unsafe { Batch::new(pv, buf, 512) }.unwrap();
//! let mut space = AddressSpace::boot(&pool, Updater::Pv(batch));
//! let va = 0x80_0000_0000; // L4 slot 1: used by nothing else in this kernel
//! // SAFETY: nothing relies on `va`; the frame at 16 MiB is free RAM owned by this code.
//! unsafe { space.map_4k(va, 16 << 20, PTE_WRITABLE) }.unwrap();
//! space.flush().unwrap(); // a new mapping: no TLB flush needed
//! # }
//! # fn main() {}
//! ```

mod batch;
mod native;
mod pool;
mod space;

use core::fmt;

pub use batch::{Batch, Updater};
use hypercall_abi::layout::PAGE_SIZE;
pub use hypercall_abi::mmu::POOL_FRAMES;
use hypercall_abi::mmu::{
    Level, PTE_ACCESSED, PTE_ADDR_MASK, PTE_DIRTY, PTE_GLOBAL, PTE_HUGE, PTE_PAT, PTE_PCD,
    PTE_PRESENT, PTE_PWT, PTE_USER, PTE_WRITABLE, table_index,
};
pub use native::NativeSpace;
pub use pool::PtFrameAllocator;
pub use space::AddressSpace;

use crate::HypercallError;

/// Flags of an entry that links a table.
pub const TABLE_FLAGS: u64 = PTE_PRESENT | PTE_WRITABLE | PTE_USER | PTE_ACCESSED;
/// Flags every leaf gets.
pub const LEAF_FLAGS: u64 = PTE_PRESENT | PTE_USER | PTE_ACCESSED | PTE_DIRTY;
/// The flags a caller may request for a leaf, on top of [`LEAF_FLAGS`]. Leaves are 4 KiB (L1)
/// entries, where bit 7 is [`PTE_PAT`] (not PS): a memory-type bit like PWT and PCD.
pub const LEAF_FLAGS_ALLOWED: u64 = PTE_WRITABLE | PTE_PWT | PTE_PCD | PTE_PAT | PTE_GLOBAL;

/// Why a page-table operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MmuError {
    /// No free frame left in the page-table pool.
    PoolExhausted,
    /// An `mmu_update` hypercall failed: `error` is the host's answer for the first refused
    /// entry; the `applied` entries before it were applied, the rest were not.
    Update {
        /// The host's error.
        error: HypercallError,
        /// Entries applied before the refused one.
        applied: u64,
    },
    /// An `mmu_pin` hypercall failed.
    Pin(HypercallError),
    /// A trapped store did not take effect (the host drops a store it refuses).
    StoreRefused {
        /// The entry's address.
        pte_gpa: u64,
        /// The value stored.
        value: u64,
        /// The value read back.
        found: u64,
    },
    /// Nothing is mapped at `va` (a table on the way, or the leaf, is not present).
    NotMapped {
        /// The address.
        va: u64,
    },
    /// A huge page (an entry with PS set) is in the way at `level`.
    HugePage {
        /// The address.
        va: u64,
        /// The level of the huge entry.
        level: Level,
    },
    /// `va` is not page-aligned, not canonical, or in L4 slot 0 (the VMM's identity map,
    /// shared by every root and owned by none).
    BadVa {
        /// The address.
        va: u64,
    },
    /// `pa` is not page-aligned or does not fit in an entry (bits 52..=63).
    BadPa {
        /// The address.
        pa: u64,
    },
    /// Leaf flags outside [`LEAF_FLAGS_ALLOWED`].
    BadFlags {
        /// The flags asked for.
        flags: u64,
    },
    /// A batch capacity outside `1..=max`.
    BadCapacity {
        /// The capacity asked for.
        capacity: usize,
        /// The largest allowed (buffer length and `MMU_UPDATE_MAX`).
        max: usize,
    },
    /// An address that should be a page-table pool frame is not (a corrupt table entry, or a
    /// frame returned to the pool that is not one).
    NotInPool {
        /// The address.
        gpa: u64,
    },
    /// A frame returned to the pool that is already free.
    DoubleFree {
        /// The frame.
        gpa: u64,
    },
    /// The root to release is the one loaded in CR3.
    RootActive {
        /// The root.
        root: u64,
    },
    /// The root to release was not pinned by this address space (the boot root).
    NotOwned {
        /// The root.
        root: u64,
    },
}

impl fmt::Display for MmuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MmuError::PoolExhausted => f.write_str("no free frame left in the page-table pool"),
            MmuError::Update { error, applied } => {
                write!(f, "{error} after {applied} entries were applied")
            }
            MmuError::Pin(error) => write!(f, "{error}"),
            MmuError::StoreRefused {
                pte_gpa,
                value,
                found,
            } => write!(
                f,
                "the host refused the store of {value:#x} to the entry at {pte_gpa:#x} \
                 (it holds {found:#x})"
            ),
            MmuError::NotMapped { va } => write!(f, "nothing is mapped at {va:#x}"),
            MmuError::HugePage { va, level } => {
                write!(f, "a huge page at level {level} covers {va:#x}")
            }
            MmuError::BadVa { va } => write!(
                f,
                "bad virtual address {va:#x} (want page-aligned, canonical, outside L4 slot 0)"
            ),
            MmuError::BadPa { pa } => write!(
                f,
                "bad physical address {pa:#x} (want page-aligned, below 2^52)"
            ),
            MmuError::BadFlags { flags } => write!(
                f,
                "bad leaf flags {flags:#x} (allowed: {LEAF_FLAGS_ALLOWED:#x})"
            ),
            MmuError::BadCapacity { capacity, max } => {
                write!(f, "bad batch capacity {capacity} (want 1..={max})")
            }
            MmuError::NotInPool { gpa } => {
                write!(f, "{gpa:#x} is not a frame of the page-table pool")
            }
            MmuError::DoubleFree { gpa } => write!(f, "pool frame {gpa:#x} is already free"),
            MmuError::RootActive { root } => {
                write!(f, "root {root:#x} is loaded in CR3; load another one first")
            }
            MmuError::NotOwned { root } => {
                write!(f, "root {root:#x} was not pinned by this address space")
            }
        }
    }
}

impl core::error::Error for MmuError {}

/// The guest-physical address of the entry for `va` in the table of `level` at `table`.
pub const fn entry_gpa(table: u64, va: u64, level: Level) -> u64 {
    table + 8 * table_index(va, level) as u64
}

/// An entry linking the table at `frame`.
pub const fn table_entry(frame: u64) -> u64 {
    (frame & PTE_ADDR_MASK) | TABLE_FLAGS
}

/// A 4 KiB leaf mapping `pa` with [`LEAF_FLAGS`] plus `flags`.
pub const fn leaf_entry(pa: u64, flags: u64) -> Result<u64, MmuError> {
    if !pa.is_multiple_of(PAGE_SIZE) || pa & !PTE_ADDR_MASK != 0 {
        return Err(MmuError::BadPa { pa });
    }
    if flags & !LEAF_FLAGS_ALLOWED != 0 {
        return Err(MmuError::BadFlags { flags });
    }
    Ok(pa | LEAF_FLAGS | flags)
}

/// One step of a walk to `va`: the table that `e`, the entry for `va` in a table of `level`,
/// links. `None` if `e` is not present; [`MmuError::HugePage`] for a huge page;
/// [`MmuError::NotInPool`] if the table it names is not one of the manager's (`owns`).
pub(crate) fn linked_table(
    e: u64,
    va: u64,
    level: Level,
    owns: impl FnOnce(u64) -> bool,
) -> Result<Option<u64>, MmuError> {
    if e & PTE_PRESENT == 0 {
        return Ok(None);
    }
    if e & PTE_HUGE != 0 {
        return Err(MmuError::HugePage { va, level });
    }
    let next = e & PTE_ADDR_MASK;
    if !owns(next) {
        return Err(MmuError::NotInPool { gpa: next });
    }
    Ok(Some(next))
}

/// Checks that the manager may map `va`: page-aligned, canonical, not in L4 slot 0.
pub const fn check_va(va: u64) -> Result<(), MmuError> {
    if !va.is_multiple_of(PAGE_SIZE) || !crate::cpu::is_canonical(va) || table_index(va, 4) == 0 {
        return Err(MmuError::BadVa { va });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use hypercall_abi::layout::PT_POOL_GPA;
    use hypercall_abi::mmu::{PTE_PAT_HUGE, PTE_RESERVED_MASK};

    use super::*;

    #[test]
    fn entry_addresses() {
        let va = 0x80_4020_3000;
        assert_eq!(entry_gpa(PT_POOL_GPA, va, 4), PT_POOL_GPA + 8);
        assert_eq!(entry_gpa(PT_POOL_GPA, va, 3), PT_POOL_GPA + 8);
        assert_eq!(entry_gpa(PT_POOL_GPA, va, 2), PT_POOL_GPA + 8);
        assert_eq!(entry_gpa(PT_POOL_GPA, va, 1), PT_POOL_GPA + 3 * 8);
        let top = 0x0000_7fff_ffff_f000;
        assert_eq!(entry_gpa(0, top, 4), 255 * 8);
        assert_eq!(entry_gpa(0, top, 1), 511 * 8);
    }

    #[test]
    fn entries_encode() {
        assert_eq!(
            table_entry(PT_POOL_GPA + 0x6000),
            (PT_POOL_GPA + 0x6000) | 0x27
        );
        assert_eq!(leaf_entry(0x30_0000, 0), Ok(0x30_0000 | 0x65));
        assert_eq!(leaf_entry(0x30_0000, PTE_WRITABLE), Ok(0x30_0000 | 0x67));
        for e in [
            table_entry(u64::MAX),
            leaf_entry(0x000f_ffff_ffff_f000, LEAF_FLAGS_ALLOWED).unwrap(),
        ] {
            assert_eq!(e & PTE_RESERVED_MASK, 0);
        }
        // A table entry never has bit 7 (PS there); a 4 KiB leaf may (PAT there).
        assert_eq!(table_entry(u64::MAX) & PTE_PAT, 0);
        assert_eq!(leaf_entry(0x30_0000, PTE_PAT), Ok(0x30_0000 | 0xe5));
        assert_eq!(
            leaf_entry(0x30_0800, 0),
            Err(MmuError::BadPa { pa: 0x30_0800 })
        );
        assert_eq!(leaf_entry(1 << 52, 0), Err(MmuError::BadPa { pa: 1 << 52 }));
        assert_eq!(
            leaf_entry(0, PTE_PAT_HUGE),
            Err(MmuError::BadFlags {
                flags: PTE_PAT_HUGE
            })
        );
        assert_eq!(
            leaf_entry(0, 1 << 63),
            Err(MmuError::BadFlags { flags: 1 << 63 })
        );
    }

    #[test]
    fn the_identity_slot_and_bad_addresses_are_refused() {
        assert_eq!(check_va(0x80_0000_0000), Ok(()));
        assert_eq!(check_va(0xffff_8000_0000_0000), Ok(()));
        for va in [
            0,
            0x20_0000,
            0x7f_ffff_f000,
            0x80_0000_0800,
            0x0000_8000_0000_0000,
        ] {
            assert_eq!(check_va(va), Err(MmuError::BadVa { va }), "{va:#x}");
        }
    }
}
