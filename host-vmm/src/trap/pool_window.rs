//! The page-table pool's trapped window on the MMIO bus: guest stores to the read-only pool
//! slot exit as MMIO writes and land here ([`super::mmu_emul::store`]). Reads never exit (the
//! slot is readable), so a read here can only come from an instruction KVM had to emulate; it
//! is served from the pool like any other read of it.

use std::sync::{Arc, Mutex};

use crate::bus::{BusAction, BusDevice};
use crate::mmu::PageTablePool;
use crate::sync::lock;

/// The pool as an MMIO device, sharing the pool with the hypercall handlers.
#[derive(Debug)]
pub struct PoolWindow {
    pool: Arc<Mutex<PageTablePool>>,
    base: u64,
}

impl PoolWindow {
    /// The window of `pool`, whose first frame is at guest-physical `base`.
    pub fn new(pool: Arc<Mutex<PageTablePool>>, base: u64) -> PoolWindow {
        PoolWindow { pool, base }
    }
}

impl BusDevice for PoolWindow {
    fn name(&self) -> &'static str {
        "pt-pool"
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let entry = lock(&self.pool).read_entry((self.base + offset) & !7);
        let bytes = entry.unwrap_or(u64::MAX).to_le_bytes();
        let at = (offset & 7) as usize;
        for (i, d) in data.iter_mut().enumerate() {
            *d = bytes.get(at + i).copied().unwrap_or(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> BusAction {
        BusAction::Counted(super::mmu_emul::store(
            &mut lock(&self.pool),
            self.base + offset,
            data,
        ))
    }
}
