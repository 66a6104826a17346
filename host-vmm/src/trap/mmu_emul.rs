//! Write-protected page tables: a guest store to the read-only page-table pool exits as
//! `KVM_EXIT_MMIO`; we decode it, run the shared validator, and apply it through the host's
//! writable mapping — or drop it. The guest's `mov` then retires as if it had written.

use crate::mmu::PageTablePool;

/// Handles a guest store of `data` at `gpa` inside the pool. Returns the event to count:
/// `pte_trapped` (applied) or `pte_rejected` (refused, the entry is unchanged).
pub fn store(pool: &mut PageTablePool, gpa: u64, data: &[u8]) -> &'static str {
    // An unmodified guest cannot defer: its store takes effect for the hypervisor at once.
    pool.defer_resync(false);
    // Only a whole, aligned 8-byte entry can be validated; anything else is refused.
    let result = match <[u8; 8]>::try_from(data) {
        Ok(bytes) => pool
            .apply(gpa, u64::from_le_bytes(bytes))
            .map_err(|e| e.name()),
        Err(_) => Err("partial_write"),
    };
    match result {
        Ok(()) => "pte_trapped",
        Err(_) => "pte_rejected",
    }
}

#[cfg(test)]
mod tests {
    use hypercall_abi::layout::PT_POOL_GPA;
    use hypercall_abi::mmu::PTE_PRESENT;

    use super::*;

    #[test]
    fn decodes_validates_and_counts() {
        let mut pool = PageTablePool::new(64 << 20).unwrap();
        pool.pin(PT_POOL_GPA).unwrap();
        let l3 = PT_POOL_GPA + 0x1000;
        let events = [
            store(&mut pool, PT_POOL_GPA, &(l3 | PTE_PRESENT).to_le_bytes()),
            store(&mut pool, PT_POOL_GPA + 8, &[1, 0, 0, 0]),
            store(
                &mut pool,
                PT_POOL_GPA + 16,
                &(0x30_0000 | PTE_PRESENT).to_le_bytes(),
            ),
        ];
        assert_eq!(events, ["pte_trapped", "pte_rejected", "pte_rejected"]);
        assert_eq!(pool.frame(l3).unwrap().level, 3);
        assert_eq!(pool.read_entry(PT_POOL_GPA + 8), Some(0));
    }
}
