//! Page-table updates (ABI v1.1): `mmu_update` and `mmu_pin`, and the rules the host enforces
//! on every page-table entry — whether it arrives in a PV batch or as a trapped store.
//!
//! # The page-table pool
//! Every page-table frame of the guest lives in the pool
//! ([`crate::layout::PT_POOL_GPA`], [`crate::layout::PT_POOL_SIZE`]), which the host maps into
//! the guest **read-only** (a `KVM_MEM_READONLY` slot) in both modes. The guest reads its tables
//! freely but can change them only through the host:
//! - **PV:** queue [`MmuUpdate`] entries and apply them with one `mmu_update` hypercall.
//! - **trapped:** store the 8-byte entry with a plain aligned `mov` through a writable mapping of
//!   the pool (the VMM's boot identity map has one); the store exits to the host
//!   (`KVM_EXIT_MMIO`), which validates and applies it. A rejected store is dropped and counted.
//!
//! # Frame types
//! The host tracks a level per pool frame: untyped (free), L4 (root), L3, L2 or L1, plus a
//! reference count (parent entries pointing at it, plus pins).
//! - A frame becomes L4 when pinned ([`PIN_L4`]), and L*n*−1 when an L*n* entry first points at it.
//!   Only an all-zero untyped frame can acquire a type; a typed frame can be referenced again
//!   only at its own level.
//! - When its reference count drops to zero (last parent entry overwritten, or unpinned), the
//!   frame is released: its own table references are dropped (recursively), the host zeroes it,
//!   and it is untyped again, ready for reuse.
//! - Entries can be written only into typed frames. Build tables top-down: link a zero frame into
//!   its parent first, then fill it (in a PV batch, both can be in the same batch: entries apply
//!   in order).
//! - The VMM's boot tables (the first [`crate::layout::PT_POOL_BOOT_FRAMES`] pool frames) are
//!   typed and pinned at boot.
//!
//! # Entry rules (both paths, same code on the host)
//! 1. The entry address is 8-byte aligned, inside the pool, in a typed frame.
//!    (trapped: a store that is not exactly 8 bytes and aligned is rejected.)
//! 2. A not-present entry (bit 0 clear) is always accepted (its other bits are the guest's).
//! 3. Present entries: bits 52..=63 are reserved and must be clear (NX is reserved: pvkit
//!    guests run with `EFER.NXE` = 0); the host sets Accessed, and Dirty on leaves, itself
//!    (the CPU cannot set them in a read-only pool).
//! 4. A table entry (L4, L3, or L2 without PS) points at a pool frame that is untyped and zero
//!    or already of the next lower level.
//! 5. A leaf (L1, or L2 with PS = a 2 MiB page) maps memory entirely inside guest RAM, or pool
//!    frames **read-only**: a writable mapping of a pool frame is refused. PS on L4 and L3
//!    (1 GiB pages) is refused. A 2 MiB leaf's address is 2 MiB aligned. Bit 7 is PS only in
//!    L2..L4 entries: in an L1 entry it is [`PTE_PAT`], accepted like any memory-type bit.
//!
//! A root holds at most [`PIN_MAX`] pins; every reference count is bounded and never wraps.
//!
//! A refused entry is not applied; PV gets its error code, trapped drops it. The host never
//! panics on guest input.
//!
//! # TLB rules
//! The host never invalidates the guest's TLB. After an `mmu_update` returns (or a trapped
//! store retires), the guest must invalidate (`invlpg` or a CR3 reload) before it relies on a
//! changed or removed mapping. Changing a not-present entry to present needs no invalidation.
//! `guest_pv::mmu::Batch` flushes itself when full and must be flushed before such an
//! invalidation.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::layout::{PAGE_SIZE, PT_POOL_GPA, PT_POOL_SIZE};

/// Present.
pub const PTE_PRESENT: u64 = 1 << 0;
/// Writable.
pub const PTE_WRITABLE: u64 = 1 << 1;
/// User-accessible.
pub const PTE_USER: u64 = 1 << 2;
/// Write-through.
pub const PTE_PWT: u64 = 1 << 3;
/// Cache-disable.
pub const PTE_PCD: u64 = 1 << 4;
/// Accessed.
pub const PTE_ACCESSED: u64 = 1 << 5;
/// Dirty (leaves).
pub const PTE_DIRTY: u64 = 1 << 6;
/// Page size (PS) in an L2 entry: a 2 MiB leaf. Bit 7 means PS only in L2..L4 entries (and PS
/// is refused in L3 and L4); in an L1 entry the same bit is [`PTE_PAT`].
pub const PTE_HUGE: u64 = 1 << 7;
/// PAT (page attribute table index bit) of a 4 KiB leaf (an L1 entry): the same bit as
/// [`PTE_HUGE`], which it is not in L1. Allowed in leaves; it selects a memory type with PWT
/// and PCD.
pub const PTE_PAT: u64 = 1 << 7;
/// PAT bit of a 2 MiB leaf (an L2 entry with PS); bits 13..=20 of such an entry are reserved.
pub const PTE_PAT_HUGE: u64 = 1 << 12;
/// Global.
pub const PTE_GLOBAL: u64 = 1 << 8;
/// Physical-address bits of an entry.
pub const PTE_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// Bits that must be clear in a present entry (52..=63; NX is reserved with `EFER.NXE` = 0).
pub const PTE_RESERVED_MASK: u64 = 0xfff0_0000_0000_0000;
/// Entries per table.
pub const ENTRIES_PER_TABLE: usize = 512;
/// Size of a 2 MiB leaf.
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;

/// The most entries one `mmu_update` call accepts.
pub const MMU_UPDATE_MAX: u64 = 1024;

/// `mmu_update` `a2` flag (since v1.4): postpone the host's refresh of its own view of the
/// tables. Changing or removing a present entry requires the hypervisor to refresh what it
/// derived from the tables (on our KVM: a resync of its shadow page tables, ~0.2 ms); by
/// default every call that changed a present entry does it. With this flag the host postpones
/// it to the next accepted `mmu_update` without the flag (an empty one will do), accepted
/// `mmu_pin`, or trapped store; a call refused as a whole neither starts nor ends a deferral. Until then the guest must not rely on the changed mappings, not even after its own
/// `invlpg`. `guest_pv::mmu::Batch` sets it when it flushes because it is full, and clears it
/// on explicit flushes (which precede TLB invalidations). Other `a2` bits must be zero.
pub const UPDATE_DEFER_SYNC: u64 = 1 << 0;

/// `mmu_pin` `a0`: pin the frame at `a1` as an L4 root (validating it if it is not one yet).
pub const PIN_L4: u64 = 1;
/// `mmu_pin` `a0`: drop a pin taken with [`PIN_L4`].
pub const UNPIN: u64 = 2;

/// The most pins one root holds (its first [`PIN_L4`] included). A [`PIN_L4`] of a root that
/// already has this many is refused with [`crate::Error::TooLarge`] and changes nothing: the
/// host's count is bounded and never wraps.
pub const PIN_MAX: u32 = 1 << 16;

/// Frames in the page-table pool ([`PT_POOL_SIZE`] / [`PAGE_SIZE`] = 1024). Pool frame *i*
/// is the page at [`pool_frame_gpa`]`(i)`.
pub const POOL_FRAMES: usize = (PT_POOL_SIZE / PAGE_SIZE) as usize;

/// True if `gpa` lies inside the page-table pool.
#[inline]
pub const fn in_pool(gpa: u64) -> bool {
    gpa >= PT_POOL_GPA && gpa - PT_POOL_GPA < PT_POOL_SIZE
}

/// Index (`0..POOL_FRAMES`) of the pool frame holding `gpa`; `None` if `gpa` is outside the
/// pool.
#[inline]
pub const fn pool_frame_index(gpa: u64) -> Option<usize> {
    if in_pool(gpa) {
        Some(((gpa - PT_POOL_GPA) / PAGE_SIZE) as usize)
    } else {
        None
    }
}

/// Guest-physical address of pool frame `index` (meaningful for `index < POOL_FRAMES`).
#[inline]
pub const fn pool_frame_gpa(index: usize) -> u64 {
    PT_POOL_GPA + index as u64 * PAGE_SIZE
}

/// One queued update: write `value` to the page-table entry at guest-physical `pte_gpa`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct MmuUpdate {
    /// Guest-physical address of the entry (8-byte aligned, inside the pool).
    pub pte_gpa: u64,
    /// The new entry.
    pub value: u64,
}

/// Paging level of a table: 4 = PML4 (root), 3 = PDPT, 2 = PD, 1 = PT.
pub type Level = u8;

/// Index of `va` in a table of `level`.
pub const fn table_index(va: u64, level: Level) -> usize {
    ((va >> (12 + 9 * (level as u32 - 1))) & 0x1ff) as usize
}

/// Bytes mapped by one entry of a table of `level` (4 KiB at level 1).
pub const fn entry_span(level: Level) -> u64 {
    1 << (12 + 9 * (level as u32 - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_and_indexing() {
        assert_eq!(core::mem::size_of::<MmuUpdate>(), 16);
        let va = 0x0000_0080_4020_3000u64;
        assert_eq!(table_index(va, 4), 1);
        assert_eq!(table_index(va, 3), 1);
        assert_eq!(table_index(va, 2), 1);
        assert_eq!(table_index(va, 1), 3);
        assert_eq!(entry_span(1), 4096);
        assert_eq!(entry_span(2), HUGE_PAGE_SIZE);
        assert_eq!(PTE_ADDR_MASK & PTE_RESERVED_MASK, 0);
        assert_eq!(MMU_UPDATE_MAX * 16, 16 * 1024);
    }

    #[test]
    fn pool_frames_and_indices() {
        assert_eq!(POOL_FRAMES, 1024);
        assert_eq!(pool_frame_index(PT_POOL_GPA), Some(0));
        assert_eq!(pool_frame_index(PT_POOL_GPA + 0x1fff), Some(1));
        assert_eq!(
            pool_frame_index(PT_POOL_GPA + PT_POOL_SIZE - 1),
            Some(POOL_FRAMES - 1)
        );
        assert_eq!(pool_frame_index(PT_POOL_GPA + PT_POOL_SIZE), None);
        assert_eq!(pool_frame_index(PT_POOL_GPA - 1), None);
        assert_eq!(pool_frame_index(0), None);
        assert_eq!(pool_frame_index(u64::MAX), None);
        for i in [0, 1, 517, POOL_FRAMES - 1] {
            assert_eq!(pool_frame_index(pool_frame_gpa(i)), Some(i));
            assert!(in_pool(pool_frame_gpa(i)));
        }
    }
}
