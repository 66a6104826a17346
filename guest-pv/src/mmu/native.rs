//! [`NativeSpace`]: page tables in ordinary guest RAM, written with plain stores — what a
//! kernel does without pvkit. The host is not involved: the tables are RAM like any other, and
//! KVM (its shadow paging, or EPT) handles them.

use core::cell::Cell;

use hypercall_abi::layout::{PAGE_SIZE, PML4_GPA};
use hypercall_abi::mmu::{Level, PTE_ADDR_MASK, PTE_PRESENT};

use super::{MmuError, check_va, entry_gpa, leaf_entry, linked_table, space, table_entry};
use crate::cpu;

/// A page-table root in ordinary RAM, its tables taken from a range of RAM the caller owns.
///
/// The root's L4 slot 0 links the boot identity map (the boot root's slot 0, shared, never
/// written), so a kernel's code, data and stacks stay mapped once it is loaded. Slots
/// 1..=511 are managed like [`AddressSpace`](super::AddressSpace)'s: the same entries (the
/// same [`table_entry`] and [`leaf_entry`] flags), but written with plain stores into the
/// tables, and new tables are the next frames of the range (never reused). The tables are
/// reached through the boot identity map, which maps RAM writable and user-accessible, so this
/// works at CPL 3 too; only [`flush_tlb`](Self::flush_tlb), [`flush_page`](Self::flush_page)
/// and [`activate`](Self::activate) need CPL 0 (kernel services at CPL 3, see [`crate::cpu`]).
///
/// Errors reuse [`MmuError`]: [`MmuError::PoolExhausted`] when the range has no frame left,
/// [`MmuError::NotInPool`] for a table entry pointing outside the range.
#[derive(Debug)]
pub struct NativeSpace {
    root: u64,
    /// The range `[start, end)` the tables come from.
    start: u64,
    end: u64,
    /// The next free frame of the range.
    next: Cell<u64>,
}

impl NativeSpace {
    /// A new root in the first frame of `[start, end)`, with L4 slot 0 linking the boot
    /// identity map; later tables come from the following frames. Not loaded: see
    /// [`activate`](Self::activate). [`MmuError::BadPa`] if the range is not page-aligned,
    /// [`MmuError::PoolExhausted`] if it is empty.
    ///
    /// # Safety
    /// `[start, end)` is RAM that the caller owns for the life of this address space (and as
    /// long as its root may be loaded), all zero, identity-mapped writable (and, to be used at
    /// CPL 3, user-accessible) by pvkit's boot tables, and used by nothing else.
    pub unsafe fn new(start: u64, end: u64) -> Result<NativeSpace, MmuError> {
        for pa in [start, end] {
            if !pa.is_multiple_of(PAGE_SIZE) || pa & !PTE_ADDR_MASK != 0 {
                return Err(MmuError::BadPa { pa });
            }
        }
        let space = NativeSpace {
            root: start,
            start,
            end,
            next: Cell::new(start),
        };
        let root = space.alloc()?;
        // SAFETY: slot 0 of the root, a zero frame of the range (the caller's contract) loaded
        // nowhere yet.
        unsafe { space.write(root, space::read_entry(PML4_GPA)) };
        Ok(space)
    }

    /// The root's guest-physical address (the value to load into CR3).
    pub const fn root(&self) -> u64 {
        self.root
    }

    /// Frames of the range taken so far (the root and every table).
    pub fn frames_used(&self) -> u64 {
        (self.next.get() - self.start) / PAGE_SIZE
    }

    /// Maps the 4 KiB page at `va` to the frame at `pa`, like
    /// [`AddressSpace::map_4k`](super::AddressSpace::map_4k); missing tables on the way are
    /// taken from the range and linked. Replacing a present mapping needs
    /// [`flush_tlb`](Self::flush_tlb) before the new one is relied on.
    ///
    /// # Safety
    /// As for [`AddressSpace::map_4k`](super::AddressSpace::map_4k).
    pub unsafe fn map_4k(&mut self, va: u64, pa: u64, flags: u64) -> Result<(), MmuError> {
        check_va(va)?;
        let leaf = leaf_entry(pa, flags)?;
        let mut table = self.root;
        for level in [4, 3, 2] {
            table = match self.descend(table, va, level)? {
                Some(next) => next,
                None => {
                    let frame = self.alloc()?;
                    // SAFETY: a non-present entry of a table of this root, outside L4 slot 0
                    // (`check_va`), so nothing relies on it; the new table is a zero frame of
                    // the range.
                    unsafe { self.write(entry_gpa(table, va, level), table_entry(frame)) };
                    frame
                }
            };
        }
        // SAFETY: the L1 entry of `va` in a table of this root; nothing relies on `va`'s
        // mapping (this function's contract).
        unsafe { self.write(entry_gpa(table, va, 1), leaf) };
        Ok(())
    }

    /// Removes the mapping of the 4 KiB page at `va` (a zero entry); the tables stay.
    /// [`MmuError::NotMapped`] if it is not mapped.
    ///
    /// # Safety
    /// Nothing may rely on the mapping of `va`.
    pub unsafe fn unmap_4k(&mut self, va: u64) -> Result<(), MmuError> {
        let pte = self.leaf_gpa(va)?;
        if self.read(pte) & PTE_PRESENT == 0 {
            return Err(MmuError::NotMapped { va });
        }
        // SAFETY: as in `map_4k`: an L1 entry of this root that nothing relies on.
        unsafe { self.write(pte, 0) };
        Ok(())
    }

    /// Changes the flags of the mapped 4 KiB page at `va`, keeping its frame, like
    /// [`AddressSpace::protect_4k`](super::AddressSpace::protect_4k).
    ///
    /// # Safety
    /// Nothing may rely on the rights being removed.
    pub unsafe fn protect_4k(&mut self, va: u64, flags: u64) -> Result<(), MmuError> {
        let pte = self.leaf_gpa(va)?;
        let old = self.read(pte);
        if old & PTE_PRESENT == 0 {
            return Err(MmuError::NotMapped { va });
        }
        let leaf = leaf_entry(old & PTE_ADDR_MASK, flags)?;
        // SAFETY: as in `map_4k`; the caller vouches for the change of rights.
        unsafe { self.write(pte, leaf) };
        Ok(())
    }

    /// The L1 entry of `va`, present or not; [`MmuError::NotMapped`] if a table on the way is
    /// missing. The CPU may have set Accessed and Dirty.
    pub fn entry_4k(&self, va: u64) -> Result<u64, MmuError> {
        let pte = self.leaf_gpa(va)?;
        Ok(self.read(pte))
    }

    /// Flushes the TLB ([`cpu::flush_tlb`]). Entries are written directly: nothing is queued.
    pub fn flush_tlb(&mut self) {
        cpu::flush_tlb();
    }

    /// Invalidates the TLB entry of `va` ([`cpu::invlpg`]).
    pub fn flush_page(&mut self, va: u64) {
        cpu::invlpg(va);
    }

    /// Loads this root into CR3 ([`cpu::load_cr3`]).
    ///
    /// # Safety
    /// As for [`AddressSpace::activate`](super::AddressSpace::activate): everything in use must
    /// be mapped in L4 slot 0 (the identity map this root shares). The root must stay loaded
    /// only while its range is owned (see [`new`](Self::new)).
    pub unsafe fn activate(&mut self) {
        // SAFETY: the root is a page-aligned frame (checked in `new`) holding a valid L4 with
        // the identity map in slot 0; the rest is the caller's contract.
        unsafe { cpu::load_cr3(self.root) };
    }

    /// The next zero frame of the range.
    fn alloc(&self) -> Result<u64, MmuError> {
        let frame = self.next.get();
        if frame >= self.end {
            return Err(MmuError::PoolExhausted);
        }
        self.next.set(frame + PAGE_SIZE);
        Ok(frame)
    }

    /// True if `gpa` is in the range's frames taken so far.
    fn owns(&self, gpa: u64) -> bool {
        (self.start..self.next.get()).contains(&gpa)
    }

    /// The address of `va`'s L1 entry; [`MmuError::NotMapped`] if a table on the way is missing.
    fn leaf_gpa(&self, va: u64) -> Result<u64, MmuError> {
        check_va(va)?;
        let mut table = self.root;
        for level in [4, 3, 2] {
            table = self
                .descend(table, va, level)?
                .ok_or(MmuError::NotMapped { va })?;
        }
        Ok(entry_gpa(table, va, 1))
    }

    /// The table `va`'s entry in the table of `level` at `table` links: `None` if not present.
    fn descend(&self, table: u64, va: u64, level: Level) -> Result<Option<u64>, MmuError> {
        let e = self.read(entry_gpa(table, va, level));
        linked_table(e, va, level, |gpa| self.owns(gpa))
    }

    /// Reads the entry at `pte`, an entry of a table taken from the range (0 for anything else).
    fn read(&self, pte: u64) -> u64 {
        if !self.owns(pte) || !pte.is_multiple_of(8) {
            return 0;
        }
        let entry = core::ptr::with_exposed_provenance::<u64>(pte as usize);
        // SAFETY: an aligned address in a frame of the range (checked), owned RAM identity-
        // mapped readable (`new`'s contract). The CPU's page walker sets Accessed/Dirty behind
        // Rust's back, hence the volatile read and no reference.
        unsafe { entry.read_volatile() }
    }

    /// Stores `value` into the entry at `pte`.
    ///
    /// # Safety
    /// `pte` is an aligned entry of a table of this root (a frame of the range taken so far)
    /// whose change nothing relies on.
    unsafe fn write(&self, pte: u64, value: u64) {
        debug_assert!(self.owns(pte) && pte.is_multiple_of(8));
        let entry = core::ptr::with_exposed_provenance_mut::<u64>(pte as usize);
        // SAFETY: the caller's contract: an aligned entry in owned RAM, identity-mapped
        // writable (`new`'s contract), that nothing relies on.
        unsafe { entry.write_volatile(value) };
    }
}
