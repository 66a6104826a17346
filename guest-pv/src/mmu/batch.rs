//! The two ways an entry reaches a page table — a PV [`Batch`] of `mmu_update` entries, or a
//! trapped store — behind one [`Updater`], and the `mmu_update` / `mmu_pin` hypercalls.

use core::fmt;

use hypercall_abi::mmu::{MMU_UPDATE_MAX, MmuUpdate, PTE_ACCESSED, PTE_DIRTY};
use hypercall_abi::request::{PinOp, Request};
use hypercall_abi::{Call, Return};

use super::MmuError;
use crate::hypercall::raw_request;
use crate::{HypercallError, Pvkit};

impl Pvkit {
    /// Applies `updates` in order with one `mmu_update` hypercall; returns the number applied
    /// (all of them). An empty slice issues no hypercall. On a refusal the host applies nothing
    /// from the refused entry on: [`MmuError::Update`] carries its error and the number applied
    /// before it.
    ///
    /// The host validates every entry against the rules of [`hypercall_abi::mmu`]; it never
    /// invalidates the TLB (see [`super::AddressSpace::flush_tlb`]).
    ///
    /// # Safety
    /// - `updates` must be at most [`MMU_UPDATE_MAX`] entries, and its virtual address must be
    ///   its guest-physical address (true for the kernel's memory under pvkit's boot identity
    ///   map): the host reads the entries there.
    /// - The updates must not change a mapping anything relies on (the kernel's code, data and
    ///   stacks, live references).
    pub unsafe fn mmu_update(&self, updates: &[MmuUpdate]) -> Result<u64, MmuError> {
        if updates.is_empty() {
            return Ok(0);
        }
        // SAFETY: the caller's contract is this function's.
        unsafe { self.mmu_update_with(updates, false) }
    }

    /// [`Pvkit::mmu_update`] with the flag [`hypercall_abi::mmu::UPDATE_DEFER_SYNC`] set if
    /// `defer_sync`. An empty slice still makes the call: without the flag it lets the host
    /// apply a postponed resync.
    ///
    /// # Safety
    /// As for [`Pvkit::mmu_update`].
    pub unsafe fn mmu_update_with(
        &self,
        updates: &[MmuUpdate],
        defer_sync: bool,
    ) -> Result<u64, MmuError> {
        let gpa = updates.as_ptr().expose_provenance() as u64;
        let count = updates.len() as u64;
        // SAFETY: `self` proves a pvkit host. The host reads `count` entries at `gpa`, which is
        // the live, initialised slice (identity-mapped by the caller's contract), and writes only
        // page-table pool frames, which this crate reads with volatile raw-pointer reads only
        // (no Rust reference to pool memory exists); that the new entries break nothing in use
        // is the caller's contract. Not `nomem`, so the entries are stored before the call.
        let ret = unsafe {
            raw_request(Request::MmuUpdate {
                batch_gpa: gpa,
                count,
                defer_sync,
            })
        };
        decode_update(ret, count)
    }

    /// Pins ([`PinOp::PinL4`]) the zero or L4 frame `frame` as a page-table root, or unpins it
    /// ([`PinOp::Unpin`]); the host releases
    /// (and zeroes) a root, and every table only it references, when its last pin goes.
    ///
    /// # Safety
    /// Unpinning must not release a root that is loaded in CR3 or will be without being pinned
    /// again.
    pub unsafe fn mmu_pin(&self, op: PinOp, frame: u64) -> Result<u64, HypercallError> {
        // SAFETY: `self` proves a pvkit host. `mmu_pin` reads no guest memory and writes only
        // pool frames (a release zeroes them), read here with volatile raw-pointer reads only;
        // that no loaded root is released is the caller's contract.
        let ret = unsafe { raw_request(Request::MmuPin { op, frame }) };
        HypercallError::check(Call::MmuPin, ret)
    }
}

/// Decodes the answer to an `mmu_update` of `count` entries.
fn decode_update(ret: Return, count: u64) -> Result<u64, MmuError> {
    HypercallError::check(Call::MmuUpdate, ret).map_err(|error| MmuError::Update {
        error,
        applied: ret.value.min(count),
    })
}

/// Bits of the pending-entry filter: entry addresses hash to `(pte_gpa / 8) % FILTER_BITS`, so
/// up to 4096 consecutive entries (8 tables) never collide.
const FILTER_BITS: usize = 4096;

/// A PV batch of page-table updates in a caller-provided buffer, applied with one `mmu_update`
/// hypercall per [`flush`](Self::flush) (or when it is full).
///
/// The manager must see its own pending updates: [`pending`](Self::pending) returns the value
/// the last queued update for an entry will write. A 4096-bit filter of queued entry addresses
/// makes the common "not pending" answer O(1); a hit scans the batch backwards.
///
/// Dropping a batch flushes it (ignoring errors); flush explicitly to see them.
pub struct Batch<'b> {
    pv: Pvkit,
    /// Invariant: `capacity <= buf.len()`, `capacity <= MMU_UPDATE_MAX`, `len <= capacity`.
    buf: &'b mut [MmuUpdate],
    capacity: usize,
    len: usize,
    filter: [u64; FILTER_BITS / 64],
    /// The last call deferred the host's resync (`UPDATE_DEFER_SYNC`).
    deferred: bool,
}

impl fmt::Debug for Batch<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Batch")
            .field("capacity", &self.capacity)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl<'b> Batch<'b> {
    /// A batch of up to `capacity` (1..=[`MMU_UPDATE_MAX`], at most `buf.len()`) updates,
    /// queued in `buf`; [`MmuError::BadCapacity`] otherwise.
    ///
    /// # Safety
    /// `buf`'s virtual address must be its guest-physical address (true for the kernel's
    /// statics under pvkit's boot identity map): the host reads the queued entries there.
    pub unsafe fn new(
        pv: Pvkit,
        buf: &'b mut [MmuUpdate],
        capacity: usize,
    ) -> Result<Batch<'b>, MmuError> {
        let max = buf.len().min(MMU_UPDATE_MAX as usize);
        if capacity == 0 || capacity > max {
            return Err(MmuError::BadCapacity { capacity, max });
        }
        Ok(Batch {
            pv,
            buf,
            capacity,
            len: 0,
            filter: [0; FILTER_BITS / 64],
            deferred: false,
        })
    }

    /// The host token.
    pub const fn pvkit(&self) -> Pvkit {
        self.pv
    }

    /// The most updates queued before the batch flushes itself.
    pub const fn capacity(&self) -> usize {
        self.capacity
    }

    /// The number of queued updates.
    pub const fn len(&self) -> usize {
        self.len
    }

    /// True if nothing is queued.
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Queues `update`, first flushing the batch if it is full. If that flush fails, `update`
    /// is not queued and the flush's error is returned.
    ///
    /// # Safety
    /// As for [`Pvkit::mmu_update`]: applying `update` (at the next flush) must not change a
    /// mapping anything relies on.
    pub unsafe fn push(&mut self, update: MmuUpdate) -> Result<(), MmuError> {
        if self.len >= self.capacity {
            // Nothing relies on these entries yet (the caller flushes explicitly before it
            // invalidates): let the host postpone its resync to that flush.
            self.flush_with(true)?;
        }
        let Some(slot) = self.buf.get_mut(self.len) else {
            // Unreachable by the invariant (`len < capacity <= buf.len()` after the flush).
            return Err(MmuError::BadCapacity {
                capacity: self.capacity,
                max: self.buf.len(),
            });
        };
        *slot = update;
        self.len += 1;
        let bit = filter_bit(update.pte_gpa);
        self.filter[bit / 64] |= 1 << (bit % 64);
        Ok(())
    }

    /// The value the last queued update of the entry at `pte_gpa` writes, if one is queued.
    pub fn pending(&self, pte_gpa: u64) -> Option<u64> {
        let bit = filter_bit(pte_gpa);
        if self.filter[bit / 64] & (1 << (bit % 64)) == 0 {
            return None;
        }
        self.buf[..self.len]
            .iter()
            .rev()
            .find(|u| u.pte_gpa == pte_gpa)
            .map(|u| u.value)
    }

    /// Applies the queued updates with one `mmu_update` hypercall (none if the batch is empty)
    /// and empties the batch; returns the number applied. On a refusal, the updates before the
    /// refused one are applied and the rest are dropped ([`MmuError::Update`]).
    ///
    /// The call also lets the host apply the resync that flushes made when the batch was full
    /// postponed ([`hypercall_abi::mmu::UPDATE_DEFER_SYNC`]); after `flush` the changed
    /// mappings are in effect for the host, and a TLB invalidation makes them so for the CPU.
    pub fn flush(&mut self) -> Result<u64, MmuError> {
        self.flush_with(false)
    }

    fn flush_with(&mut self, defer: bool) -> Result<u64, MmuError> {
        let n = self.len;
        self.len = 0;
        self.filter = [0; FILTER_BITS / 64];
        if n == 0 && (defer || !self.deferred) {
            return Ok(0);
        }
        self.deferred = defer;
        // SAFETY: `buf` is identity-mapped (`new`'s contract) and `n <= capacity <=
        // MMU_UPDATE_MAX`; every queued update was vetted by `push`'s caller.
        unsafe { self.pv.mmu_update_with(&self.buf[..n], defer) }
    }
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

/// The filter bit of entry address `pte_gpa`.
fn filter_bit(pte_gpa: u64) -> usize {
    ((pte_gpa / 8) % FILTER_BITS as u64) as usize
}

/// How page-table entries are written: the only step that differs between PV and trapped mode.
#[derive(Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "no allocator to box into, and there is one `Updater` per address space"
)]
pub enum Updater<'b> {
    /// Queued in a [`Batch`] and applied with `mmu_update` hypercalls.
    Pv(Batch<'b>),
    /// A plain aligned 8-byte store through the identity map into the read-only pool, which the
    /// host traps, validates and applies — what an unmodified guest does. Each store is read
    /// back: the host drops a refused store, which shows as [`MmuError::StoreRefused`].
    Trapped,
}

impl Updater<'_> {
    /// The value a queued (not yet applied) update will write to the entry at `pte_gpa`.
    pub fn pending(&self, pte_gpa: u64) -> Option<u64> {
        match self {
            Updater::Pv(batch) => batch.pending(pte_gpa),
            Updater::Trapped => None,
        }
    }

    /// Writes `value` to the entry at `pte_gpa`: queues it (PV) or stores it (trapped).
    ///
    /// # Safety
    /// `pte_gpa` is an 8-byte aligned address in the page-table pool (which the boot identity
    /// map maps at the same virtual address), and the new entry must not change a mapping
    /// anything relies on.
    pub(super) unsafe fn write(&mut self, pte_gpa: u64, value: u64) -> Result<(), MmuError> {
        match self {
            // SAFETY: forwarded from this function's contract.
            Updater::Pv(batch) => unsafe { batch.push(MmuUpdate { pte_gpa, value }) },
            Updater::Trapped => {
                let entry = core::ptr::with_exposed_provenance_mut::<u64>(pte_gpa as usize);
                // SAFETY: `entry` is an aligned pool address, mapped writable at its GPA by the
                // boot identity map but backed by a read-only slot: the 8-byte store exits to
                // the host, which validates and applies (or drops) it; no Rust reference to
                // pool memory exists. That the entry breaks nothing is the caller's contract.
                unsafe { entry.write_volatile(value) };
                // SAFETY: as above; a read of the pool is a plain read of guest memory.
                let found = unsafe { entry.read_volatile() };
                // The host may set Accessed and Dirty itself.
                if (found ^ value) & !(PTE_ACCESSED | PTE_DIRTY) != 0 {
                    return Err(MmuError::StoreRefused {
                        pte_gpa,
                        value,
                        found,
                    });
                }
                Ok(())
            }
        }
    }

    /// Applies queued updates (PV); nothing to do when trapped.
    pub fn flush(&mut self) -> Result<(), MmuError> {
        match self {
            Updater::Pv(batch) => batch.flush().map(|_| ()),
            Updater::Trapped => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use hypercall_abi::Error;
    use hypercall_abi::layout::PT_POOL_GPA;

    use super::*;

    /// A batch that never reaches a host: the tests only push below capacity and never flush
    /// a non-empty batch.
    fn batch(buf: &mut [MmuUpdate], capacity: usize) -> Result<Batch<'_>, MmuError> {
        let pv = Pvkit::for_tests();
        // SAFETY: no test flushes a non-empty batch, so the host never reads `buf`.
        unsafe { Batch::new(pv, buf, capacity) }
    }

    fn push(b: &mut Batch<'_>, pte_gpa: u64, value: u64) {
        // SAFETY: never flushed with entries (see `batch`).
        unsafe { b.push(MmuUpdate { pte_gpa, value }) }.unwrap();
    }

    #[test]
    fn capacity_is_checked() {
        let mut buf = [MmuUpdate::default(); 8];
        assert_eq!(
            batch(&mut buf, 0).unwrap_err(),
            MmuError::BadCapacity {
                capacity: 0,
                max: 8
            }
        );
        assert_eq!(
            batch(&mut buf, 9).unwrap_err(),
            MmuError::BadCapacity {
                capacity: 9,
                max: 8
            }
        );
        let mut big = [MmuUpdate::default(); 1100];
        assert_eq!(
            batch(&mut big, 1025).unwrap_err(),
            MmuError::BadCapacity {
                capacity: 1025,
                max: 1024
            }
        );
        let b = batch(&mut big, 1024).unwrap();
        assert_eq!((b.capacity(), b.len(), b.is_empty()), (1024, 0, true));
    }

    #[test]
    fn pending_sees_the_last_queued_value() {
        let mut buf = [MmuUpdate::default(); 16];
        let mut b = batch(&mut buf, 16);
        let b = b.as_mut().unwrap();
        let a = PT_POOL_GPA + 0x6000;
        assert_eq!(b.pending(a), None);
        push(b, a, 1);
        push(b, a + 8, 2);
        push(b, a, 3);
        assert_eq!(b.pending(a), Some(3));
        assert_eq!(b.pending(a + 8), Some(2));
        assert_eq!(b.pending(a + 16), None);
        // Same filter bit (4096 entries = 32 KiB apart), different entry.
        assert_eq!(b.pending(a + 8 * 4096), None);
        assert_eq!(b.len(), 3);
        // Leave it empty so that dropping it issues no hypercall.
        b.len = 0;
    }

    #[test]
    fn update_errors_keep_the_applied_count() {
        assert_eq!(decode_update(Return::ok(5), 5), Ok(5));
        let e = decode_update(
            Return {
                status: Error::TypeConflict.code(),
                value: 3,
            },
            5,
        )
        .unwrap_err();
        match e {
            MmuError::Update { error, applied } => {
                assert_eq!(error.error(), Some(Error::TypeConflict));
                assert_eq!(applied, 3);
            }
            other => panic!("{other:?}"),
        }
        // A host claiming more than it was given is not believed.
        let e = decode_update(
            Return {
                status: Error::InvalidArgument.code(),
                value: 99,
            },
            5,
        );
        assert!(matches!(e, Err(MmuError::Update { applied: 5, .. })));
    }

    #[test]
    fn trapped_updater_has_nothing_pending() {
        let mut u = Updater::Trapped;
        assert_eq!(u.pending(PT_POOL_GPA), None);
        assert_eq!(u.flush(), Ok(()));
    }
}
