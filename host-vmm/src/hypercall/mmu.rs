//! `mmu_update(batch_gpa, count)` and `mmu_pin(op, frame)`: the PV page-table path. The batch
//! is read from guest RAM (bounds-checked) and each entry goes through the same validator as a
//! trapped store, in order, stopping at the first refusal.

use hypercall_abi::Error as AbiError;
use hypercall_abi::Return;
use hypercall_abi::mmu::{MMU_UPDATE_MAX, MmuUpdate, PIN_L4, UNPIN, UPDATE_DEFER_SYNC};

use crate::memory::GuestRam;
use crate::metrics::ExitStats;
use crate::mmu::PtPool;

/// Applies `count` entries at `batch_gpa`. Returns the number applied; on a refusal, the status
/// is that entry's error and the value the number applied before it.
pub fn update(
    ram: &GuestRam,
    pool: &mut PtPool,
    [batch_gpa, count, flags, _]: [u64; 4],
    stats: &mut ExitStats,
) -> Return {
    if flags & !UPDATE_DEFER_SYNC != 0 {
        return Return::err(AbiError::InvalidArgument);
    }
    pool.defer_resync(flags & UPDATE_DEFER_SYNC != 0);
    if count > MMU_UPDATE_MAX {
        return Return::err(AbiError::TooLarge);
    }
    let Some(entries) = ram.read_array::<MmuUpdate>(batch_gpa, count) else {
        return Return::err(AbiError::BadAddress);
    };
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

/// Pins or unpins a root.
pub fn pin(pool: &mut PtPool, op: u64, frame: u64) -> Return {
    let r = match op {
        PIN_L4 => pool.pin(frame),
        UNPIN => pool.unpin(frame),
        _ => Err(AbiError::InvalidArgument),
    };
    match r {
        Ok(()) => Return::ok(0),
        Err(e) => Return::err(e),
    }
}

#[cfg(test)]
mod tests {
    use hypercall_abi::layout::PT_POOL_GPA;
    use hypercall_abi::mmu::{PTE_PRESENT, PTE_WRITABLE};
    use vm_memory::{Bytes, GuestAddress};
    use zerocopy::IntoBytes;

    use super::*;

    fn setup() -> (GuestRam, PtPool, ExitStats) {
        let ram = GuestRam::new(16 << 20).unwrap();
        let mut pool = PtPool::new(16 << 20).unwrap();
        assert_eq!(pin(&mut pool, PIN_L4, PT_POOL_GPA), Return::ok(0));
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
        let r = update(&ram, &mut pool, [0x10_0000, 3, 0, 0], &mut stats);
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
            update(&ram, &mut pool, [end - 16, 2, 0, 0], &mut stats),
            Return::err(AbiError::BadAddress)
        );
        assert_eq!(
            update(&ram, &mut pool, [u64::MAX - 8, 1, 0, 0], &mut stats),
            Return::err(AbiError::BadAddress)
        );
        assert_eq!(
            update(&ram, &mut pool, [0, MMU_UPDATE_MAX + 1, 0, 0], &mut stats),
            Return::err(AbiError::TooLarge)
        );
        assert_eq!(
            update(&ram, &mut pool, [0, 0, 0, 0], &mut stats),
            Return::ok(0)
        );
        assert_eq!(
            pin(&mut pool, 9, PT_POOL_GPA),
            Return::err(AbiError::InvalidArgument)
        );
        assert_eq!(
            pin(&mut pool, PIN_L4, 0x1000),
            Return::err(AbiError::BadAddress)
        );
    }
}
