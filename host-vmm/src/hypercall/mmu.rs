//! `mmu_update(batch_gpa, count, flags)` and `mmu_pin(op, frame)`: the PV page-table path. The
//! batch is read from guest RAM (bounds-checked) and each entry goes through the same validator
//! as a trapped store, in order, stopping at the first refusal.

use hypercall_abi::Error as AbiError;
use hypercall_abi::Return;
use hypercall_abi::mmu::{MMU_UPDATE_MAX, MmuUpdate};
use hypercall_abi::request::PinOp;

use crate::memory::GuestRam;
use crate::metrics::ExitStats;
use crate::mmu::PageTablePool;

/// Applies the `count` entries at `batch_gpa` (the decoded `Request::MmuUpdate`).
///
/// - A call refused as a whole (`TOO_LARGE` count, batch not inside RAM: `BAD_ADDRESS`) changes
///   nothing, not even the resync deferral.
/// - Otherwise the deferral is set from `defer_sync`, and the entries are applied in order.
///   The first refused entry stops the batch: the status is its error and the value the number
///   of entries applied before it (which stay applied); it and later entries are not applied.
/// - Success returns `count`.
pub fn update(
    ram: &GuestRam,
    pool: &mut PageTablePool,
    batch_gpa: u64,
    count: u64,
    defer_sync: bool,
    stats: &mut ExitStats,
) -> Return {
    if count > MMU_UPDATE_MAX {
        return Return::err(AbiError::TooLarge);
    }
    let Some(entries) = ram.read_array::<MmuUpdate>(batch_gpa, count) else {
        return Return::err(AbiError::BadAddress);
    };
    pool.defer_resync(defer_sync);
    for (done, e) in entries.iter().enumerate() {
        if let Err(err) = pool.apply(e.pte_gpa, e.value) {
            stats.add_event("pte_pv", done as u64);
            stats.record_event("pte_rejected");
            return Return {
                status: err.code(),
                value: done as u64,
            };
        }
    }
    stats.add_event("pte_pv", count);
    Return::ok(count)
}

/// Pins or unpins a root (the decoded `Request::MmuPin`).
pub fn pin(pool: &mut PageTablePool, op: PinOp, frame: u64) -> Return {
    let r = match op {
        PinOp::PinL4 => pool.pin(frame),
        PinOp::Unpin => pool.unpin(frame),
        _ => Err(AbiError::InvalidArgument),
    };
    match r {
        Ok(()) => Return::ok(0),
        Err(e) => Return::err(e),
    }
}

#[cfg(test)]
mod tests {
    use crate::state::Persist;
    use hypercall_abi::layout::PT_POOL_GPA;
    use hypercall_abi::mmu::{PTE_PRESENT, PTE_WRITABLE};
    use vm_memory::{Bytes, GuestAddress};
    use zerocopy::IntoBytes;

    use super::*;

    fn setup() -> (GuestRam, PageTablePool, ExitStats) {
        let ram = GuestRam::new(16 << 20).unwrap();
        let mut pool = PageTablePool::new(16 << 20).unwrap();
        assert_eq!(pin(&mut pool, PinOp::PinL4, PT_POOL_GPA), Return::ok(0));
        (ram, pool, ExitStats::default())
    }

    fn put(ram: &GuestRam, gpa: u64, entries: &[MmuUpdate]) {
        ram.mem()
            .write_slice(entries.as_bytes(), GuestAddress(gpa))
            .unwrap();
    }

    #[test]
    fn applies_in_order_and_stops_at_the_first_refusal() {
        let (ram, mut pool, mut stats) = setup();
        let l3 = PT_POOL_GPA + 0x1000;
        let batch = [
            MmuUpdate {
                pte_gpa: PT_POOL_GPA,
                value: l3 | PTE_PRESENT | PTE_WRITABLE,
            },
            MmuUpdate {
                pte_gpa: l3,
                value: 0x30_0000 | PTE_PRESENT,
            }, // table entry outside the pool
            MmuUpdate {
                pte_gpa: PT_POOL_GPA + 8,
                value: l3 | PTE_PRESENT,
            },
        ];
        put(&ram, 0x10_0000, &batch);
        let r = update(&ram, &mut pool, 0x10_0000, 3, false, &mut stats);
        assert_eq!(
            r,
            Return {
                status: AbiError::BadAddress.code(),
                value: 1
            }
        );
        assert_eq!(
            pool.read_entry(PT_POOL_GPA + 8),
            Some(0),
            "later entries not applied"
        );
        assert_eq!(stats.events["pte_pv"], 1);
    }

    #[test]
    fn rejects_bad_batches() {
        let (ram, mut pool, mut stats) = setup();
        let end = 16u64 << 20;
        assert_eq!(
            update(&ram, &mut pool, end - 16, 2, false, &mut stats),
            Return::err(AbiError::BadAddress)
        );
        assert_eq!(
            update(&ram, &mut pool, u64::MAX - 8, 1, false, &mut stats),
            Return::err(AbiError::BadAddress)
        );
        assert_eq!(
            update(&ram, &mut pool, 0, MMU_UPDATE_MAX + 1, false, &mut stats),
            Return::err(AbiError::TooLarge)
        );
        assert_eq!(
            update(&ram, &mut pool, 0, 0, false, &mut stats),
            Return::ok(0)
        );
        assert_eq!(
            pin(&mut pool, PinOp::PinL4, 0x1000),
            Return::err(AbiError::BadAddress)
        );
    }

    /// A call refused before any entry is looked at leaves the pool exactly as it was, the
    /// resync deferral included (it used to set the deferral first).
    #[test]
    fn refused_calls_leave_the_pool_unchanged() {
        let (ram, mut pool, mut stats) = setup();
        let end = 16u64 << 20;
        let before = pool.save();
        assert!(!before.deferred);
        for (gpa, count, err) in [
            (0, MMU_UPDATE_MAX + 1, AbiError::TooLarge),
            (end - 16, 2, AbiError::BadAddress),
            (u64::MAX - 8, 1, AbiError::BadAddress),
        ] {
            assert_eq!(
                update(&ram, &mut pool, gpa, count, true, &mut stats),
                Return::err(err)
            );
            assert_eq!(pool.save(), before, "refused {err:?} changed the pool");
        }
        // Refused pins do not end a deferral either; accepted calls set or end it.
        assert_eq!(
            update(&ram, &mut pool, 0, 0, true, &mut stats),
            Return::ok(0)
        );
        let deferred = pool.save();
        assert!(deferred.deferred);
        assert_eq!(
            pin(&mut pool, PinOp::PinL4, PT_POOL_GPA + 1),
            Return::err(AbiError::InvalidArgument)
        );
        assert_eq!(
            pin(&mut pool, PinOp::Unpin, PT_POOL_GPA + 0x5000),
            Return::err(AbiError::TypeConflict)
        );
        assert_eq!(pool.save(), deferred);
        assert_eq!(pin(&mut pool, PinOp::PinL4, PT_POOL_GPA), Return::ok(0));
        assert!(!pool.save().deferred);
    }
}
