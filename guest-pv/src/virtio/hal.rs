//! DMA memory and address translation for `virtio-drivers`: [`PvkitHal`] over one region of
//! identity-mapped RAM the kernel hands over once ([`set_dma_region`]).
//!
//! `virtio-drivers`' [`Hal`] has no `self`: its allocator must be global. The region is a
//! bump allocator of whole pages ([`DmaPool`]): allocations come from the bottom up, a free of
//! the most recent allocation gives its pages back (last in, first out), any other free leaks
//! its pages until the region is set again. Drivers allocate their rings once when a device
//! is set up (a block device: two pages), so this is all they need.
//!
//! Under pvkit's boot identity map a guest-physical address is its virtual address, so
//! [`Hal::share`] hands the device the buffer's own address and [`Hal::unshare`] does nothing:
//! buffers are used in place, with no bounce copy. A buffer outside the identity map
//! ([`IDENTITY_MAP_SIZE`]) has no such address and panics.

use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, Ordering};

use hypercall_abi::layout::{IDENTITY_MAP_SIZE, PAGE_SIZE};
use virtio_drivers::{BufferDirection, Hal, PhysAddr};

/// Why [`set_dma_region`] refused a region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmaError {
    /// The region is empty, not page-aligned, starts at 0 or ends past the identity map.
    BadRegion {
        /// Start of the region.
        start: u64,
        /// Its length.
        len: u64,
    },
    /// A region is already set and has pages allocated.
    InUse {
        /// Pages allocated from the current region.
        used_pages: u64,
    },
}

impl core::fmt::Display for DmaError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            DmaError::BadRegion { start, len } => write!(
                f,
                "bad DMA region {start:#x}+{len:#x} (want non-empty, page-aligned, not at 0, \
                 inside the identity map)"
            ),
            DmaError::InUse { used_pages } => write!(
                f,
                "the DMA region is in use ({used_pages} pages allocated): free them first"
            ),
        }
    }
}

impl core::error::Error for DmaError {}

/// What a [`DmaPool`] holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DmaStats {
    /// Pages in the region.
    pub total_pages: u64,
    /// Pages allocated (leaked ones included).
    pub used_pages: u64,
    /// Pages freed out of order, lost until the region is set again.
    pub leaked_pages: u64,
}

/// A bump allocator of pages over `[start, end)`: pure address arithmetic, it never touches the
/// memory. Safe to share (atomics), though pvkit guests run on one CPU.
#[derive(Debug)]
pub struct DmaPool {
    start: AtomicU64,
    next: AtomicU64,
    end: AtomicU64,
    leaked: AtomicU64,
}

impl DmaPool {
    /// An empty pool (every allocation fails until [`set`](Self::set)).
    pub const fn new() -> DmaPool {
        DmaPool {
            start: AtomicU64::new(0),
            next: AtomicU64::new(0),
            end: AtomicU64::new(0),
            leaked: AtomicU64::new(0),
        }
    }

    /// Makes `[start, start + len)` the pool's region, if nothing is allocated from the current
    /// one (leaked pages do not count).
    pub fn set(&self, start: u64, len: u64) -> Result<(), DmaError> {
        let bad = DmaError::BadRegion { start, len };
        let end = start.checked_add(len).ok_or(bad)?;
        if start == 0
            || len == 0
            || !start.is_multiple_of(PAGE_SIZE)
            || !len.is_multiple_of(PAGE_SIZE)
        {
            return Err(bad);
        }
        if end > IDENTITY_MAP_SIZE {
            return Err(bad);
        }
        let stats = self.stats();
        let used = stats.used_pages.saturating_sub(stats.leaked_pages);
        if used != 0 {
            return Err(DmaError::InUse { used_pages: used });
        }
        // Empty first, so a concurrent allocation (there is none on one CPU) fails.
        self.end.store(0, Ordering::Release);
        self.start.store(start, Ordering::Relaxed);
        self.next.store(start, Ordering::Relaxed);
        self.leaked.store(0, Ordering::Relaxed);
        self.end.store(end, Ordering::Release);
        Ok(())
    }

    /// The address of `pages` fresh contiguous pages, or `None` if they do not fit.
    pub fn alloc(&self, pages: u64) -> Option<u64> {
        let bytes = pages.checked_mul(PAGE_SIZE).filter(|&b| b != 0)?;
        let end = self.end.load(Ordering::Acquire);
        let mut next = self.next.load(Ordering::Relaxed);
        loop {
            let new_next = next.checked_add(bytes).filter(|&n| n <= end)?;
            match self
                .next
                .compare_exchange(next, new_next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return Some(next),
                Err(seen) => next = seen,
            }
        }
    }

    /// Frees `pages` pages at `addr` (an earlier [`alloc`](Self::alloc)): the most recent
    /// allocation goes back to the pool, any other is leaked. False if the range is not inside
    /// the allocated part of the region (a bug in the caller); nothing changes then.
    pub fn free(&self, addr: u64, pages: u64) -> bool {
        let Some(end) = pages
            .checked_mul(PAGE_SIZE)
            .and_then(|b| addr.checked_add(b))
        else {
            return false;
        };
        let start = self.start.load(Ordering::Relaxed);
        let next = self.next.load(Ordering::Acquire);
        if addr < start || end > next || pages == 0 {
            return false;
        }
        if end == next
            && self
                .next
                .compare_exchange(next, addr, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            return true;
        }
        self.leaked.fetch_add(pages, Ordering::Relaxed);
        true
    }

    /// Pages in the region, allocated, leaked.
    pub fn stats(&self) -> DmaStats {
        let start = self.start.load(Ordering::Relaxed);
        let end = self.end.load(Ordering::Acquire).max(start);
        let next = self.next.load(Ordering::Relaxed).max(start);
        DmaStats {
            total_pages: (end - start) / PAGE_SIZE,
            used_pages: (next - start) / PAGE_SIZE,
            leaked_pages: self.leaked.load(Ordering::Relaxed),
        }
    }
}

impl Default for DmaPool {
    fn default() -> DmaPool {
        DmaPool::new()
    }
}

/// The pool [`PvkitHal`] allocates from.
static DMA_POOL: DmaPool = DmaPool::new();

/// Hands `[start, start + len)` to [`PvkitHal`] as DMA memory (virtqueue rings). Refused while
/// pages of the previous region are allocated (drop the devices first).
///
/// # Safety
/// The region must be RAM, mapped writable at virtual address = guest-physical address (pvkit's
/// boot identity map; user-accessible too if drivers run at CPL 3, which pvkit's boot tables
/// are), and owned by the HAL exclusively from now on: nothing else may access it except
/// through the pages the HAL hands to drivers.
pub unsafe fn set_dma_region(start: u64, len: u64) -> Result<(), DmaError> {
    DMA_POOL.set(start, len)
}

/// Pages of the DMA region in use and leaked.
pub fn dma_stats() -> DmaStats {
    DMA_POOL.stats()
}

/// `virtio-drivers`' [`Hal`] for pvkit guests: DMA pages from the region of
/// [`set_dma_region`], identity translation for buffers and MMIO windows.
#[derive(Debug, Clone, Copy)]
pub struct PvkitHal;

/// The address of the bytes `buffer` points to.
fn buffer_address(buffer: NonNull<[u8]>) -> u64 {
    buffer.cast::<u8>().as_ptr().expose_provenance() as u64
}

// SAFETY: `dma_alloc` returns pages of the region handed over by `set_dma_region`, whose
// contract makes it exclusively the HAL's, identity-mapped RAM: the pointer is valid,
// page-aligned (the region is, and allocations are whole pages), zeroed below, and aliases
// nothing until `dma_dealloc` (the pool hands each page out once until it is freed).
// `mmio_phys_to_virt` returns the identity mapping of the caller's MMIO range, which pvkit's boot
// tables map. `share` returns the buffer's own address, which is its guest-physical address under
// the identity map (checked to lie inside it).
unsafe impl Hal for PvkitHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let Some(addr) = DMA_POOL.alloc(pages as u64) else {
            // `virtio_drivers::Dma::new` turns a zero address into `Error::DmaError`.
            return (0, NonNull::dangling());
        };
        let ptr = core::ptr::with_exposed_provenance_mut::<u8>(addr as usize);
        // SAFETY: `pages` pages at `addr` were just allocated from the region the HAL owns
        // (`set_dma_region`'s contract): mapped writable, used by nothing else.
        unsafe { ptr.write_bytes(0, pages * PAGE_SIZE as usize) };
        match NonNull::new(ptr) {
            Some(ptr) => (addr, ptr),
            // The region never starts at 0 (`DmaPool::set`).
            None => (0, NonNull::dangling()),
        }
    }

    unsafe fn dma_dealloc(paddr: PhysAddr, _vaddr: NonNull<u8>, pages: usize) -> i32 {
        if DMA_POOL.free(paddr, pages as u64) {
            0
        } else {
            -1
        }
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, size: usize) -> NonNull<u8> {
        assert!(
            paddr.saturating_add(size as u64) <= IDENTITY_MAP_SIZE,
            "MMIO range {paddr:#x}+{size:#x} is outside pvkit's identity map"
        );
        NonNull::new(core::ptr::with_exposed_provenance_mut::<u8>(paddr as usize))
            .expect("MMIO range at address 0")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        let addr = buffer_address(buffer);
        assert!(
            addr.saturating_add(buffer.len() as u64) <= IDENTITY_MAP_SIZE,
            "virtio buffer {addr:#x}+{:#x} is outside pvkit's identity map (no guest-physical \
             address)",
            buffer.len()
        );
        addr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {
        // Shared in place: nothing to copy back.
    }
}

#[cfg(test)]
mod tests {
    use std::string::ToString;

    use super::*;

    const BASE: u64 = 0x100_0000;

    #[test]
    fn bump_allocation_and_lifo_free() {
        let pool = DmaPool::new();
        assert_eq!(pool.alloc(1), None, "empty pool");
        pool.set(BASE, 4 * PAGE_SIZE).unwrap();
        assert_eq!(pool.alloc(0), None);
        let a = pool.alloc(1).unwrap();
        let b = pool.alloc(2).unwrap();
        assert_eq!((a, b), (BASE, BASE + PAGE_SIZE));
        assert_eq!(pool.alloc(2), None, "only one page left");
        assert_eq!(
            pool.stats(),
            DmaStats {
                total_pages: 4,
                used_pages: 3,
                leaked_pages: 0
            }
        );
        // Freeing the last allocation gives it back.
        assert!(pool.free(b, 2));
        assert_eq!(pool.alloc(3), Some(BASE + PAGE_SIZE));
        // An out-of-order free leaks.
        assert!(pool.free(a, 1));
        assert_eq!(pool.stats().leaked_pages, 1);
        assert_eq!(pool.alloc(1), None);
        // Frees outside the allocated part are refused.
        assert!(!pool.free(BASE + 4 * PAGE_SIZE, 1));
        assert!(!pool.free(BASE - PAGE_SIZE, 1));
        assert!(!pool.free(u64::MAX - 10, 1));
        assert!(!pool.free(BASE, 0));
    }

    #[test]
    fn set_checks_the_region_and_that_it_is_unused() {
        let pool = DmaPool::new();
        for (start, len) in [
            (0, PAGE_SIZE),
            (BASE, 0),
            (BASE + 1, PAGE_SIZE),
            (BASE, PAGE_SIZE + 1),
            (IDENTITY_MAP_SIZE - PAGE_SIZE, 2 * PAGE_SIZE),
            (u64::MAX - PAGE_SIZE + 1, PAGE_SIZE),
        ] {
            assert_eq!(
                pool.set(start, len),
                Err(DmaError::BadRegion { start, len }),
                "{start:#x}+{len:#x}"
            );
        }
        pool.set(BASE, 2 * PAGE_SIZE).unwrap();
        let a = pool.alloc(1).unwrap();
        assert_eq!(
            pool.set(BASE, 8 * PAGE_SIZE),
            Err(DmaError::InUse { used_pages: 1 })
        );
        assert!(pool.free(a, 1));
        pool.set(2 * BASE, 8 * PAGE_SIZE).unwrap();
        assert_eq!(pool.alloc(8), Some(2 * BASE));
        assert!(
            DmaError::InUse { used_pages: 1 }
                .to_string()
                .contains("1 pages allocated")
        );
    }

    #[test]
    fn share_is_identity_inside_the_identity_map() {
        let fake = |addr: u64, len: usize| {
            let p = core::ptr::with_exposed_provenance_mut::<u8>(addr as usize);
            NonNull::slice_from_raw_parts(NonNull::new(p).unwrap(), len)
        };
        let buf = fake(0x30_0000, 512);
        assert_eq!(buffer_address(buf), 0x30_0000);
        // SAFETY: `share` only computes the address; nothing is dereferenced.
        let paddr = unsafe { PvkitHal::share(buf, BufferDirection::DriverToDevice) };
        assert_eq!(paddr, 0x30_0000);
        // SAFETY: as above.
        let mmio = unsafe { PvkitHal::mmio_phys_to_virt(0xC000_0000, 0x1000) };
        assert_eq!(mmio.as_ptr().addr(), 0xC000_0000);
    }

    #[test]
    #[should_panic(expected = "outside pvkit's identity map")]
    fn share_refuses_buffers_outside_the_identity_map() {
        let p = core::ptr::with_exposed_provenance_mut::<u8>(IDENTITY_MAP_SIZE as usize - 8);
        let buf = NonNull::slice_from_raw_parts(NonNull::new(p).unwrap(), 16);
        // SAFETY: `share` only computes the address; nothing is dereferenced.
        unsafe { PvkitHal::share(buf, BufferDirection::DeviceToDriver) };
    }
}
