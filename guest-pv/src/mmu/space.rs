//! [`AddressSpace`]: the manager proper.

use hypercall_abi::layout::{PAGE_SIZE, PML4_GPA};
use hypercall_abi::mmu::{
    ENTRIES_PER_TABLE, Level, MmuUpdate, POOL_FRAMES, PTE_ADDR_MASK, PTE_HUGE, PTE_PRESENT,
};

use super::{
    Batch, MmuError, PtFrameAllocator, Updater, check_va, entry_gpa, leaf_entry, linked_table,
    table_entry,
};
use crate::cpu;
use hypercall_abi::request::PinOp;

/// A page-table root and the means to change the tables under it.
///
/// Either pvkit's boot root ([`AddressSpace::boot`], PV or trapped) or a new root
/// ([`AddressSpace::new_pinned`], PV only), whose L4 slot 0 shares the boot identity map.
/// Only L4 slots 1..=511 are managed: slot 0 belongs to the VMM.
///
/// # Why new roots are PV only
/// A new root must be typed L4 by the host before entries can be written into it, and only
/// `mmu_pin` types a root: on pvkit's KVM the host cannot see the guest's CR3 loads (they do not
/// exit), so there is no trapped event that could type it. A trapped guest works in the boot
/// root.
#[derive(Debug)]
pub struct AddressSpace<'a> {
    root: u64,
    /// True if this address space pinned `root` and must unpin it.
    pinned: bool,
    pool: &'a PtFrameAllocator,
    updater: Updater<'a>,
}

impl<'a> AddressSpace<'a> {
    /// pvkit's boot root ([`PML4_GPA`]), changed through `updater`. Its boot tables are the
    /// VMM's; tables this address space adds under L4 slots 1..=511 come from `pool` and stay
    /// linked.
    pub fn boot(pool: &'a PtFrameAllocator, updater: Updater<'a>) -> AddressSpace<'a> {
        AddressSpace {
            root: PML4_GPA,
            pinned: false,
            pool,
            updater,
        }
    }

    /// A new root: a zero frame from `pool`, pinned as an L4 with `mmu_pin`, whose L4 slot 0 is
    /// the boot root's (the identity map, pointing at the boot PDPT, shared). The link is
    /// queued in `batch`, which then carries all of this address space's updates.
    ///
    /// It is not loaded: see [`activate`](Self::activate). Give it back with
    /// [`release`](Self::release).
    pub fn new_pinned(
        pool: &'a PtFrameAllocator,
        mut batch: Batch<'a>,
    ) -> Result<AddressSpace<'a>, MmuError> {
        batch.flush()?;
        let root = pool.alloc().ok_or(MmuError::PoolExhausted)?;
        // SAFETY: pinning a zero frame that nothing uses releases nothing.
        if let Err(e) = unsafe { batch.pvkit().mmu_pin(PinOp::PinL4, root) } {
            // The host did not type it, so it is still a zero, untyped frame.
            let _ = pool.free(root);
            return Err(MmuError::Pin(e));
        }
        let identity = read_entry(PML4_GPA);
        // SAFETY: the entry is slot 0 of the new root, which is loaded nowhere yet; it maps the
        // same identity map as the boot root.
        let linked = unsafe {
            batch.push(MmuUpdate {
                pte_gpa: root,
                value: identity,
            })
        };
        let space = AddressSpace {
            root,
            pinned: true,
            pool,
            updater: Updater::Pv(batch),
        };
        // The batch was empty, so the push cannot have failed; release the root if it did.
        match linked {
            Ok(()) => Ok(space),
            Err(e) => {
                let _ = space.release();
                Err(e)
            }
        }
    }

    /// The root's guest-physical address (the value to load into CR3).
    pub const fn root(&self) -> u64 {
        self.root
    }

    /// True if this address space pinned its root (one from [`new_pinned`](Self::new_pinned)).
    pub const fn is_pinned(&self) -> bool {
        self.pinned
    }

    /// How entries are written.
    pub const fn updater(&self) -> &Updater<'a> {
        &self.updater
    }

    /// Maps the 4 KiB page at `va` to the frame at `pa`, with [`super::LEAF_FLAGS`] plus
    /// `flags` (a subset of [`super::LEAF_FLAGS_ALLOWED`], e.g. `PTE_WRITABLE`), replacing any
    /// mapping there. Missing tables on the way are allocated from the pool and linked.
    ///
    /// Replacing a present mapping needs [`flush_tlb`](Self::flush_tlb) before the new one is
    /// relied on; a new mapping needs [`flush`](Self::flush) (PV).
    ///
    /// # Safety
    /// Nothing may rely on the current mapping of `va` (no reference into it, no code or stack
    /// there). Accesses through the new mapping alias the memory at `pa`: the caller must own it
    /// or treat it as shared.
    pub unsafe fn map_4k(&mut self, va: u64, pa: u64, flags: u64) -> Result<(), MmuError> {
        check_va(va)?;
        let leaf = leaf_entry(pa, flags)?;
        let pte = self.leaf_gpa_or_create(va)?;
        // SAFETY: `pte` is the L1 entry of `va` in a pool table under this root; nothing relies
        // on `va`'s mapping (this function's contract).
        unsafe { self.updater.write(pte, leaf) }
    }

    /// Removes the mapping of the 4 KiB page at `va` (writes a zero entry); the tables stay.
    /// [`MmuError::NotMapped`] if it is not mapped.
    ///
    /// # Safety
    /// Nothing may rely on the mapping of `va`.
    pub unsafe fn unmap_4k(&mut self, va: u64) -> Result<(), MmuError> {
        check_va(va)?;
        let pte = self.leaf_gpa(va)?;
        if self.read(pte) & PTE_PRESENT == 0 {
            return Err(MmuError::NotMapped { va });
        }
        // SAFETY: as in `map_4k`: an L1 entry of this root that nothing relies on.
        unsafe { self.updater.write(pte, 0) }
    }

    /// Changes the flags of the mapped 4 KiB page at `va` to [`super::LEAF_FLAGS`] plus `flags`,
    /// keeping its frame. [`MmuError::NotMapped`] if it is not mapped.
    ///
    /// # Safety
    /// Nothing may rely on the rights being removed (e.g. a live `&mut` into a page made
    /// read-only).
    pub unsafe fn protect_4k(&mut self, va: u64, flags: u64) -> Result<(), MmuError> {
        check_va(va)?;
        let pte = self.leaf_gpa(va)?;
        let old = self.read(pte);
        if old & PTE_PRESENT == 0 {
            return Err(MmuError::NotMapped { va });
        }
        let leaf = leaf_entry(old & PTE_ADDR_MASK, flags)?;
        // SAFETY: as in `map_4k`; the caller vouches for the change of rights.
        unsafe { self.updater.write(pte, leaf) }
    }

    /// The L1 entry of `va` as the manager sees it (including a queued update), present or
    /// not; [`MmuError::NotMapped`] if a table on the way is missing. The host sets Accessed,
    /// and Dirty on leaves, itself.
    pub fn entry_4k(&self, va: u64) -> Result<u64, MmuError> {
        check_va(va)?;
        let pte = self.leaf_gpa(va)?;
        Ok(self.read(pte))
    }

    /// Applies queued updates (PV); nothing to do when trapped.
    pub fn flush(&mut self) -> Result<(), MmuError> {
        self.updater.flush()
    }

    /// Applies queued updates, then flushes the TLB ([`cpu::flush_tlb`], a kernel service at
    /// CPL 3).
    pub fn flush_tlb(&mut self) -> Result<(), MmuError> {
        self.flush()?;
        cpu::flush_tlb();
        Ok(())
    }

    /// Applies queued updates, then invalidates the TLB entry of `va` ([`cpu::invlpg`]).
    pub fn flush_page(&mut self, va: u64) -> Result<(), MmuError> {
        self.flush()?;
        cpu::invlpg(va);
        Ok(())
    }

    /// Applies queued updates and loads this root into CR3 ([`cpu::load_cr3`], a kernel service
    /// at CPL 3).
    ///
    /// # Safety
    /// Everything in use must be mapped the same way under this root. Every root shares L4 slot
    /// 0 (the VMM's identity map, where a pvkit kernel's code, data and stacks are), so this
    /// holds unless something in use is mapped elsewhere in the current root.
    pub unsafe fn activate(&mut self) -> Result<(), MmuError> {
        self.flush()?;
        // SAFETY: the root is a pinned L4 (`new_pinned`) or the boot root, with the identity
        // map in slot 0; the rest is the caller's contract.
        unsafe { cpu::load_cr3(self.root) };
        Ok(())
    }

    /// Unpins a root from [`new_pinned`](Self::new_pinned): the host releases and zeroes it and
    /// every table under it (not the shared boot tables, which the boot root still
    /// references), and their frames go back to the pool. Queued updates are applied first.
    ///
    /// Fails with [`MmuError::RootActive`] if the root is [`cpu::current_root`] (load another
    /// one first), [`MmuError::NotOwned`] for the boot root. On failure the root stays pinned
    /// and its frames stay allocated.
    pub fn release(mut self) -> Result<(), MmuError> {
        if !self.pinned {
            return Err(MmuError::NotOwned { root: self.root });
        }
        self.flush()?;
        if cpu::current_root() == self.root {
            return Err(MmuError::RootActive { root: self.root });
        }
        let owned = self.owned_tables()?;
        let pv = match &self.updater {
            Updater::Pv(batch) => batch.pvkit(),
            // `pinned` is only set with a `Batch` (`new_pinned`).
            Updater::Trapped => return Err(MmuError::NotOwned { root: self.root }),
        };
        // SAFETY: the root is not loaded (checked above), and CR3 is only ever loaded with it
        // through this address space, which is consumed.
        unsafe { pv.mmu_pin(PinOp::Unpin, self.root) }.map_err(MmuError::Pin)?;
        for frame in owned.frames() {
            self.pool.free(frame)?;
        }
        self.pool.free(self.root)
    }

    /// The pool frames of the tables under L4 slots 1..=511 (allocated by this address space).
    fn owned_tables(&self) -> Result<FrameSet, MmuError> {
        let mut owned = FrameSet::new();
        for l4 in 1..ENTRIES_PER_TABLE {
            let Some(l3) = self.next_table(self.root + 8 * l4 as u64)? else {
                continue;
            };
            owned.insert(l3);
            for l3i in 0..ENTRIES_PER_TABLE {
                let Some(l2) = self.next_table(l3 + 8 * l3i as u64)? else {
                    continue;
                };
                owned.insert(l2);
                for l2i in 0..ENTRIES_PER_TABLE {
                    if let Some(l1) = self.next_table(l2 + 8 * l2i as u64)? {
                        owned.insert(l1);
                    }
                }
            }
        }
        Ok(owned)
    }

    /// The table the entry at `pte` links, `None` if it is not present or a huge page.
    fn next_table(&self, pte: u64) -> Result<Option<u64>, MmuError> {
        let e = self.read(pte);
        if e & PTE_PRESENT == 0 || e & PTE_HUGE != 0 {
            return Ok(None);
        }
        let table = e & PTE_ADDR_MASK;
        if !PtFrameAllocator::contains(table) {
            return Err(MmuError::NotInPool { gpa: table });
        }
        Ok(Some(table))
    }

    /// The address of `va`'s L1 entry; [`MmuError::NotMapped`] if a table on the way is missing.
    fn leaf_gpa(&self, va: u64) -> Result<u64, MmuError> {
        let mut table = self.root;
        for level in [4, 3, 2] {
            table = self
                .descend(table, va, level)?
                .ok_or(MmuError::NotMapped { va })?;
        }
        Ok(entry_gpa(table, va, 1))
    }

    /// The address of `va`'s L1 entry, allocating and linking missing tables on the way.
    fn leaf_gpa_or_create(&mut self, va: u64) -> Result<u64, MmuError> {
        let mut table = self.root;
        for level in [4, 3, 2] {
            table = match self.descend(table, va, level)? {
                Some(next) => next,
                None => self.link_new_table(entry_gpa(table, va, level))?,
            };
        }
        Ok(entry_gpa(table, va, 1))
    }

    /// The table `va`'s entry in the table of `level` at `table` links: `None` if not present,
    /// [`MmuError::HugePage`] for a huge page.
    fn descend(&self, table: u64, va: u64, level: Level) -> Result<Option<u64>, MmuError> {
        let e = self.read(entry_gpa(table, va, level));
        linked_table(e, va, level, PtFrameAllocator::contains)
    }

    /// Takes a (zero) frame from the pool and links it at the entry `pte`; returns the frame.
    fn link_new_table(&mut self, pte: u64) -> Result<u64, MmuError> {
        let frame = self.pool.alloc().ok_or(MmuError::PoolExhausted)?;
        // SAFETY: `pte` is a non-present entry of a table under this root, outside L4 slot 0
        // (`check_va`), so nothing relies on it; the new table is an all-zero pool frame.
        if let Err(e) = unsafe { self.updater.write(pte, table_entry(frame)) } {
            // Not linked (a failed push queues nothing; a refused store is dropped).
            let _ = self.pool.free(frame);
            return Err(e);
        }
        Ok(frame)
    }

    /// The entry at `pte` (a pool address): a queued update's value, or the table's.
    fn read(&self, pte: u64) -> u64 {
        self.updater.pending(pte).unwrap_or_else(|| read_entry(pte))
    }
}

/// Reads the entry at `pte`, an 8-byte aligned address in the page-table pool.
pub(super) fn read_entry(pte: u64) -> u64 {
    if !PtFrameAllocator::contains(pte) || !pte.is_multiple_of(8) {
        // Every caller passes a pool entry address; never read anything else.
        return 0;
    }
    let entry = core::ptr::with_exposed_provenance::<u64>(pte as usize);
    // SAFETY: `pte` is an aligned address in the page-table pool (checked), which pvkit's boot
    // identity map maps readable (and user-accessible) at the same virtual address in every
    // root (slot 0 is shared). The host changes pool memory behind Rust's back, hence the
    // volatile read and no reference.
    unsafe { entry.read_volatile() }
}

/// A set of pool frames (a bitmap over the pool).
struct FrameSet([u64; POOL_FRAMES / 64]);

impl FrameSet {
    fn new() -> FrameSet {
        FrameSet([0; POOL_FRAMES / 64])
    }

    fn insert(&mut self, frame: u64) {
        if !PtFrameAllocator::contains(frame) {
            return;
        }
        let i = ((frame - hypercall_abi::layout::PT_POOL_GPA) / PAGE_SIZE) as usize;
        if let Some(w) = self.0.get_mut(i / 64) {
            *w |= 1 << (i % 64);
        }
    }

    fn frames(&self) -> impl Iterator<Item = u64> + '_ {
        (0..POOL_FRAMES)
            .filter(|&i| self.0[i / 64] & (1 << (i % 64)) != 0)
            .map(|i| hypercall_abi::layout::PT_POOL_GPA + i as u64 * PAGE_SIZE)
    }
}
