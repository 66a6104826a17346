//! The page-table pool and its validator, shared by the PV path (`hypercall::mmu`) and the
//! trapped path (`trap::mmu_emul`). The rules are those of `hypercall_abi::mmu`; this module is
//! their single implementation, and it runs without KVM so it can be tested directly.
//!
//! The pool is its own guest-memory region at `PT_POOL_GPA`, registered with KVM read-only: the
//! guest reads its tables (and the CPU walks them) but every change comes through here and is
//! applied through the host's writable mapping.

use hypercall_abi::Error as AbiError;
use hypercall_abi::layout::{PAGE_SIZE, PML4_GPA, PT_POOL_GPA, PT_POOL_SIZE};
use hypercall_abi::mmu::{
    ENTRIES_PER_TABLE, HUGE_PAGE_SIZE, Level, PIN_MAX, PTE_ACCESSED, PTE_ADDR_MASK, PTE_DIRTY,
    PTE_HUGE, PTE_PRESENT, PTE_RESERVED_MASK, PTE_WRITABLE, pool_frame_gpa as frame_gpa,
};
pub use hypercall_abi::mmu::{POOL_FRAMES, pool_frame_index as frame_index};
use kvm_bindings::{KVM_MEM_READONLY, kvm_userspace_memory_region};
use kvm_ioctls::VmFd;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};

use crate::error::{Error, Result};

pub mod state;

pub use state::{FrameState, PageTablePoolState};

/// Bits 13..=20 of a 2 MiB leaf are reserved (bit 12 is its PAT bit).
const HUGE_RESERVED: u64 = 0x001f_e000;

/// What the host knows about one pool frame.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FrameInfo {
    /// 0 = untyped (free), else the paging level of the table it holds.
    pub level: Level,
    /// Parent entries pointing at it, plus pins. Bounded: a frame has at most
    /// `ENTRIES_PER_TABLE * POOL_FRAMES` parent entries, a root at most [`PIN_MAX`] pins; every
    /// change is checked arithmetic, never a wrap.
    pub refs: u32,
}

/// The page-table pool: the guest-visible, read-only page-table frames (the host's writable
/// mapping of them), the type and reference count of each frame, and the validator every
/// change goes through. Not to be confused with the guest's `guest_pv::mmu::PtFrameAllocator`,
/// which only tracks which pool frames the guest has not used yet.
#[derive(Debug)]
pub struct PageTablePool {
    mem: GuestMemoryMmap,
    frames: Vec<FrameInfo>,
    ram_size: u64,
    /// A present entry changed or a table was released since the last
    /// [`PageTablePool::resync`]: KVM's shadow of the tables may be stale.
    stale: bool,
    /// The guest asked to postpone the resync (`UPDATE_DEFER_SYNC`).
    deferred: bool,
}

/// True if `[start, start + len)` lies entirely inside the pool.
fn pool_covers(start: u64, len: u64) -> bool {
    start >= PT_POOL_GPA
        && start
            .checked_add(len)
            .is_some_and(|end| end <= PT_POOL_GPA + PT_POOL_SIZE)
}

impl PageTablePool {
    /// A zeroed, untyped pool for a guest with `ram_size` bytes of RAM.
    pub fn new(ram_size: u64) -> Result<PageTablePool> {
        let mem =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(PT_POOL_GPA), PT_POOL_SIZE as usize)])
                .map_err(|e| Error::GuestMemory(format!("page-table pool: {e}")))?;
        Ok(PageTablePool {
            mem,
            frames: vec![FrameInfo::default(); POOL_FRAMES],
            ram_size,
            stale: false,
            deferred: false,
        })
    }

    /// Registers the pool with KVM as a read-only slot.
    pub fn register(&self, vm: &VmFd, slot: u32) -> Result<()> {
        let region = self.mem.iter().next().expect("one region");
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| Error::GuestMemory(e.to_string()))?;
        let desc = kvm_userspace_memory_region {
            slot,
            flags: KVM_MEM_READONLY,
            guest_phys_addr: PT_POOL_GPA,
            memory_size: PT_POOL_SIZE,
            userspace_addr: host as u64,
        };
        // SAFETY: `desc` describes a live mapping owned by `self.mem`, which outlives the VM (the
        // `Vm` drops its fds before its pool), and the pool's GPA range overlaps no other slot.
        unsafe { vm.set_user_memory_region(desc) }.map_err(Error::kvm("set pool memory region"))
    }

    /// Makes KVM drop its shadow of the guest's page tables if an update could have left it
    /// stale. Returns whether it did.
    ///
    /// Our KVM shadows guest page tables in software and trusts that it sees every write to
    /// them; writes the VMM makes through its own mapping bypass it, so a changed or removed
    /// mapping would survive even the guest's `invlpg`. Deleting and re-adding the pool's slot
    /// is the only userspace lever: KVM then zaps its shadow pages and rebuilds them from the
    /// tables on the next accesses. New mappings (not-present to present) need none of this:
    /// KVM walks the guest tables on the fault.
    ///
    /// # Rate (issue 13)
    /// The guest decides how often this runs: every exit that changed a present entry (one
    /// trapped store, or one `mmu_update` of up to 1024 entries) ends in one resync, so at most
    /// one per exit, never more. It is deliberately not rate-limited or coalesced across
    /// exits: the VMM cannot see the guest's `invlpg` or CR3 loads on this KVM, so a postponed
    /// resync would let a changed or removed mapping outlive the invalidation the ABI promises
    /// makes it take effect (the guest itself can postpone it with `UPDATE_DEFER_SYNC`). The
    /// cost falls on this VM only: the slot update and the shadow zap are per-VM, run on the
    /// exiting vCPU's thread, and bound what can be mapped no more than before (the slot
    /// always covers the same pool, read-only). Measured on the nested test host: ≈ 0.6 ms
    /// per resync against ≈ 50 µs for a trapped store without one, i.e. a guest forcing it on
    /// every exit only slows itself, like a guest that spins. Each one is counted
    /// (`shadow_resync` in the exit statistics).
    pub fn resync(&mut self, vm: &VmFd, slot: u32) -> Result<bool> {
        if self.deferred || !std::mem::take(&mut self.stale) {
            return Ok(false);
        }
        let delete = kvm_userspace_memory_region {
            slot,
            flags: KVM_MEM_READONLY,
            guest_phys_addr: PT_POOL_GPA,
            memory_size: 0,
            userspace_addr: 0,
        };
        // SAFETY: a zero-sized region deletes slot `slot`, which we registered; the mapping it
        // referenced stays alive (owned by `self.mem`) and is registered again right after.
        unsafe { vm.set_user_memory_region(delete) }
            .map_err(Error::kvm("delete pool memory region"))?;
        self.register(vm, slot)?;
        Ok(true)
    }

    /// Postpones (`true`) or allows (`false`) the next [`PageTablePool::resync`]. Every guest
    /// operation on the pool that gets past its argument checks sets this (only a PV
    /// `mmu_update` with `UPDATE_DEFER_SYNC` defers); a refused call leaves it alone.
    pub fn defer_resync(&mut self, defer: bool) {
        self.deferred = defer;
    }

    /// What the host knows about the frame holding `gpa`.
    pub fn frame(&self, gpa: u64) -> Option<FrameInfo> {
        frame_index(gpa).map(|i| self.frames[i])
    }

    /// Reads the 8-byte entry at `gpa` (which must be an aligned pool address).
    pub fn read_entry(&self, gpa: u64) -> Option<u64> {
        if !gpa.is_multiple_of(8) || frame_index(gpa).is_none() {
            return None;
        }
        self.mem.read_obj(GuestAddress(gpa)).ok()
    }

    /// Reads `buf.len()` bytes of the pool at `gpa` (a debugger's view of the tables); false if
    /// the range leaves the pool.
    pub fn read_bytes(&self, gpa: u64, buf: &mut [u8]) -> bool {
        pool_covers(gpa, buf.len() as u64) && self.mem.read_slice(buf, GuestAddress(gpa)).is_ok()
    }

    fn write_entry(&self, gpa: u64, value: u64) {
        // Only called with addresses validated by `frame_index` and 8-byte alignment, so the
        // write is in bounds; vm-memory checks again.
        let _ = self.mem.write_obj(value, GuestAddress(gpa));
    }

    fn frame_is_zero(&self, index: usize) -> bool {
        const ZERO: [u8; PAGE_SIZE as usize] = [0; PAGE_SIZE as usize];
        let mut buf = [0u8; PAGE_SIZE as usize];
        // Slice equality of bytes is a `memcmp`.
        self.mem
            .read_slice(&mut buf, GuestAddress(frame_gpa(index)))
            .is_ok()
            && buf == ZERO
    }

    /// Writes a table the VMM builds itself (boot tables), bypassing validation. The frame is
    /// typed `level`; `refs` is its reference count (parents + VMM pin).
    pub fn install_vmm_table(&mut self, gpa: u64, level: Level, refs: u32, entries: &[u64]) {
        let i = frame_index(gpa).expect("VMM tables live in the pool");
        for (n, e) in entries.iter().enumerate().take(ENTRIES_PER_TABLE) {
            self.write_entry(gpa + n as u64 * 8, *e);
        }
        self.frames[i] = FrameInfo { level, refs };
    }

    /// Validates `value` for the entry at `pte_gpa` and applies it, or refuses it untouched.
    pub fn apply(&mut self, pte_gpa: u64, value: u64) -> std::result::Result<(), AbiError> {
        if !pte_gpa.is_multiple_of(8) {
            return Err(AbiError::InvalidArgument);
        }
        let fi = frame_index(pte_gpa).ok_or(AbiError::BadAddress)?;
        let level = self.frames[fi].level;
        if level == 0 {
            return Err(AbiError::TypeConflict);
        }
        let new_child = self.check_entry(level, value)?;
        let old = self.read_entry(pte_gpa).unwrap_or(0);
        let old_child = self.table_target(level, old);

        let applied = if value & PTE_PRESENT == 0 {
            value
        } else if new_child.is_some() {
            value | PTE_ACCESSED
        } else {
            value | PTE_ACCESSED | PTE_DIRTY
        };
        if let Some(c) = new_child {
            let f = &mut self.frames[c];
            // Cannot overflow (see `FrameInfo::refs`), but is checked before anything changes.
            let refs = f.refs.checked_add(1).ok_or(AbiError::TooLarge)?;
            if f.level == 0 {
                f.level = level - 1;
            }
            f.refs = refs;
        }
        self.write_entry(pte_gpa, applied);
        self.stale |= old & PTE_PRESENT != 0 && old != applied;
        if let Some(c) = old_child {
            self.drop_ref(c);
        }
        Ok(())
    }

    /// The pool frame a *table* entry of a `level` table points at (None for leaves and
    /// not-present entries).
    fn table_target(&self, level: Level, entry: u64) -> Option<usize> {
        if level < 2 || entry & PTE_PRESENT == 0 || entry & PTE_HUGE != 0 {
            return None;
        }
        frame_index(entry & PTE_ADDR_MASK)
    }

    /// The entry rules of `hypercall_abi::mmu`. Returns the child frame for a table entry.
    fn check_entry(
        &self,
        level: Level,
        value: u64,
    ) -> std::result::Result<Option<usize>, AbiError> {
        check_entry(&self.frames, self.ram_size, level, value, |i| {
            self.frame_is_zero(i)
        })
    }

    fn drop_ref(&mut self, frame: usize) {
        let mut stack = vec![frame];
        while let Some(f) = stack.pop() {
            let info = &mut self.frames[f];
            // Never wraps: a frame reached here has a reference (the one being dropped).
            info.refs = info.refs.saturating_sub(1);
            if info.refs > 0 {
                continue;
            }
            let level = info.level;
            for n in 0..ENTRIES_PER_TABLE as u64 {
                let e = self.read_entry(frame_gpa(f) + n * 8).unwrap_or(0);
                if let Some(c) = self.table_target(level, e) {
                    stack.push(c);
                }
            }
            let _ = self
                .mem
                .write_slice(&[0u8; PAGE_SIZE as usize], GuestAddress(frame_gpa(f)));
            self.frames[f] = FrameInfo::default();
        }
    }

    /// `mmu_pin(PIN_L4, gpa)`: types a zero frame as a root, or adds a pin to a root. A root
    /// holds at most [`PIN_MAX`] pins: one more is `TOO_LARGE`. Like every accepted `mmu_pin`,
    /// ends a postponed resync; a refused one changes nothing.
    pub fn pin(&mut self, gpa: u64) -> std::result::Result<(), AbiError> {
        if !gpa.is_multiple_of(PAGE_SIZE) {
            return Err(AbiError::InvalidArgument);
        }
        let i = frame_index(gpa).ok_or(AbiError::BadAddress)?;
        match self.frames[i].level {
            0 if self.frame_is_zero(i) => self.frames[i] = FrameInfo { level: 4, refs: 1 },
            4 => {
                // A root has no parent entries: its count is its pins.
                let refs = self.frames[i].refs;
                if refs >= PIN_MAX {
                    return Err(AbiError::TooLarge);
                }
                self.frames[i].refs = refs + 1;
            }
            _ => return Err(AbiError::TypeConflict),
        }
        self.deferred = false;
        Ok(())
    }

    /// `mmu_pin(UNPIN, gpa)`: drops a pin; the last one releases the whole tree. The VMM's pin
    /// of the boot root cannot be dropped. Ends a postponed resync unless refused.
    pub fn unpin(&mut self, gpa: u64) -> std::result::Result<(), AbiError> {
        if !gpa.is_multiple_of(PAGE_SIZE) {
            return Err(AbiError::InvalidArgument);
        }
        let i = frame_index(gpa).ok_or(AbiError::BadAddress)?;
        let f = self.frames[i];
        if f.level != 4 || f.refs == 0 {
            return Err(AbiError::TypeConflict);
        }
        if gpa == PML4_GPA && f.refs == 1 {
            return Err(AbiError::Denied);
        }
        self.deferred = false;
        self.drop_ref(i);
        Ok(())
    }

    /// Checks every pool invariant: each frame's entries obey the entry rules, table entries
    /// point at frames of the next lower level, every count is exactly its parent entries
    /// (roots: 1..=[`PIN_MAX`] pins, no parents), untyped frames are zero, and no count or
    /// flag is out of range. For tests and fuzzing.
    #[cfg(test)]
    pub(crate) fn check_invariants(&self) -> std::result::Result<(), String> {
        use crate::state::Persist;
        let frames = state::validate(&self.save(), self.ram_size, state::vmm_boot_tables())
            .map_err(|e| e.to_string())?;
        if frames != self.frames {
            return Err("frame table differs from what the entries imply".into());
        }
        for (i, f) in self.frames.iter().enumerate() {
            if f.level == 0 && !self.frame_is_zero(i) {
                return Err(format!("untyped frame {i} is not zero"));
            }
        }
        Ok(())
    }

    /// Typed frames (for tests and statistics).
    pub fn typed_frames(&self) -> usize {
        self.frames.iter().filter(|f| f.level != 0).count()
    }
}

/// The entry rules of `hypercall_abi::mmu` for `value` in a table of `level`, given the frame
/// types `frames` and the RAM size. `untyped_is_zero(i)` says whether untyped frame `i` may
/// become a table (it is all zero). Returns the child frame for a table entry.
fn check_entry(
    frames: &[FrameInfo],
    ram_size: u64,
    level: Level,
    value: u64,
    untyped_is_zero: impl Fn(usize) -> bool,
) -> std::result::Result<Option<usize>, AbiError> {
    if value & PTE_PRESENT == 0 {
        return Ok(None);
    }
    if value & PTE_RESERVED_MASK != 0 {
        return Err(AbiError::InvalidArgument);
    }
    // Bit 7 is PS (page size) only in L2..L4 entries; in an L1 entry it is PAT, an ordinary
    // memory-type bit of a 4 KiB leaf (Intel SDM vol. 3A, 4.5). A 2 MiB leaf's PAT is bit 12.
    let huge = level >= 2 && value & PTE_HUGE != 0;
    if level >= 3 && huge {
        // 1 GiB pages (L3) are not supported; PS is reserved in L4.
        return Err(AbiError::InvalidArgument);
    }
    if level >= 2 && !huge {
        let target = value & PTE_ADDR_MASK;
        let child = frame_index(target).ok_or(AbiError::BadAddress)?;
        let f = frames[child];
        let fits = if f.level == 0 {
            untyped_is_zero(child)
        } else {
            f.level == level - 1
        };
        return if fits {
            Ok(Some(child))
        } else {
            Err(AbiError::TypeConflict)
        };
    }
    let (addr, size) = if huge {
        if value & HUGE_RESERVED != 0 {
            return Err(AbiError::InvalidArgument);
        }
        (
            value & PTE_ADDR_MASK & !(HUGE_PAGE_SIZE - 1),
            HUGE_PAGE_SIZE,
        )
    } else {
        (value & PTE_ADDR_MASK, PAGE_SIZE)
    };
    let in_ram = addr.checked_add(size).is_some_and(|end| end <= ram_size);
    if in_ram {
        Ok(None)
    } else if pool_covers(addr, size) {
        if value & PTE_WRITABLE != 0 {
            Err(AbiError::Denied)
        } else {
            Ok(None)
        }
    } else {
        Err(AbiError::BadAddress)
    }
}

#[cfg(test)]
mod tests;
