//! [`PtFrameAllocator`]: which page-table pool frames are free for new tables. (The host's
//! counterpart, which holds the pool and validates every entry, is a different thing: this is
//! only the guest's record of the frames it has not used.)

use core::cell::Cell;

use hypercall_abi::boot::{BootInfo, MemRegion, region_kind};
use hypercall_abi::layout::{PAGE_SIZE, PT_POOL_GPA, PT_POOL_SIZE};
use hypercall_abi::mmu::{POOL_FRAMES, in_pool, pool_frame_gpa, pool_frame_index};

use super::MmuError;

/// Words of the free bitmap.
const WORDS: usize = POOL_FRAMES.div_ceil(64);

/// A bitmap of the free frames of the page-table pool ([`PT_POOL_GPA`], [`PT_POOL_SIZE`]).
///
/// Built from the boot memory map ([`PtFrameAllocator::from_boot_info`]): frames of kind
/// [`region_kind::PT_POOL`] are free, everything else (the VMM's boot tables,
/// [`region_kind::PT_POOL_BOOT`]) is not. The host guarantees that a free frame is zero (it
/// scrubs every frame it releases), which is what lets a new table be linked without writing it
/// first — the guest could not anyway: the pool is read-only to it.
///
/// Allocation takes the lowest free frame, so the same sequence of operations yields the same
/// frames in every run. The bitmap is 128 bytes of [`Cell`]s, so several
/// [`super::AddressSpace`]s can share one `&PtFrameAllocator`; it is not `Sync` (pvkit guests run on one
/// CPU: keep it on the kernel's stack, or wrap it).
#[derive(Debug)]
pub struct PtFrameAllocator {
    /// Bit `i` set: frame `PT_POOL_GPA + i * PAGE_SIZE` is free.
    free: [Cell<u64>; WORDS],
}

impl PtFrameAllocator {
    /// A pool with no free frame (every allocation fails with [`MmuError::PoolExhausted`]).
    pub const fn empty() -> PtFrameAllocator {
        PtFrameAllocator {
            free: [const { Cell::new(0) }; WORDS],
        }
    }

    /// The free frames the boot memory map lists (kind [`region_kind::PT_POOL`]).
    pub fn from_boot_info(info: &BootInfo) -> PtFrameAllocator {
        PtFrameAllocator::from_regions(info.regions())
    }

    /// The free frames of the [`region_kind::PT_POOL`] regions in `regions` (only their whole
    /// frames inside the pool range count).
    pub fn from_regions(regions: &[MemRegion]) -> PtFrameAllocator {
        let pool = PtFrameAllocator::empty();
        for r in regions.iter().filter(|r| r.kind == region_kind::PT_POOL) {
            let start = r.start.max(PT_POOL_GPA).next_multiple_of(PAGE_SIZE);
            let end = r
                .start
                .saturating_add(r.len)
                .min(PT_POOL_GPA + PT_POOL_SIZE);
            let mut frame = start;
            while frame.saturating_add(PAGE_SIZE) <= end {
                pool.set(frame_index(frame), true);
                frame += PAGE_SIZE;
            }
        }
        pool
    }

    /// True if `gpa` lies in the page-table pool (free or not).
    pub const fn contains(gpa: u64) -> bool {
        in_pool(gpa)
    }

    /// Takes the lowest free frame; its guest-physical address, or `None` if none is left.
    pub fn alloc(&self) -> Option<u64> {
        let (word, bits) = self
            .free
            .iter()
            .enumerate()
            .map(|(w, c)| (w, c.get()))
            .find(|&(_, bits)| bits != 0)?;
        let index = word * 64 + bits.trailing_zeros() as usize;
        self.set(index, false);
        Some(pool_frame_gpa(index))
    }

    /// Returns `frame` to the pool. The caller must know the host has released it (it is zero
    /// and untyped again), or never linked it.
    pub fn free(&self, frame: u64) -> Result<(), MmuError> {
        if !PtFrameAllocator::contains(frame) || !frame.is_multiple_of(PAGE_SIZE) {
            return Err(MmuError::NotInPool { gpa: frame });
        }
        let index = frame_index(frame);
        if self.get(index) {
            return Err(MmuError::DoubleFree { gpa: frame });
        }
        self.set(index, true);
        Ok(())
    }

    /// True if `frame` is a free pool frame.
    pub fn is_free(&self, frame: u64) -> bool {
        PtFrameAllocator::contains(frame)
            && frame.is_multiple_of(PAGE_SIZE)
            && self.get(frame_index(frame))
    }

    /// The number of free frames.
    pub fn free_frames(&self) -> usize {
        self.free
            .iter()
            .map(|c| c.get().count_ones() as usize)
            .sum()
    }

    fn get(&self, index: usize) -> bool {
        self.free
            .get(index / 64)
            .is_some_and(|c| c.get() & (1 << (index % 64)) != 0)
    }

    fn set(&self, index: usize, free: bool) {
        if let Some(c) = self.free.get(index / 64) {
            let bit = 1 << (index % 64);
            c.set(if free { c.get() | bit } else { c.get() & !bit });
        }
    }
}

impl Default for PtFrameAllocator {
    fn default() -> PtFrameAllocator {
        PtFrameAllocator::empty()
    }
}

/// The index of pool frame `gpa`; callers check that it is in the pool (an address outside
/// maps to an index past the bitmap, which `get` and `set` ignore).
fn frame_index(gpa: u64) -> usize {
    pool_frame_index(gpa).unwrap_or(POOL_FRAMES)
}

#[cfg(test)]
mod tests {
    use hypercall_abi::layout::PT_POOL_BOOT_FRAMES;

    use super::*;

    fn region(start: u64, len: u64, kind: u32) -> MemRegion {
        MemRegion {
            start,
            len,
            kind,
            info: 0,
        }
    }

    /// The pool part of the memory map pvkit's VMM writes.
    fn vmm_regions() -> [MemRegion; 3] {
        let boot = PT_POOL_BOOT_FRAMES * PAGE_SIZE;
        [
            region(0x20_0000, 0x100_0000, region_kind::USABLE),
            region(PT_POOL_GPA, boot, region_kind::PT_POOL_BOOT),
            region(
                PT_POOL_GPA + boot,
                PT_POOL_SIZE - boot,
                region_kind::PT_POOL,
            ),
        ]
    }

    #[test]
    fn boot_frames_are_not_free() {
        let pool = PtFrameAllocator::from_regions(&vmm_regions());
        assert_eq!(POOL_FRAMES, 1024);
        assert_eq!(pool.free_frames(), 1024 - PT_POOL_BOOT_FRAMES as usize);
        assert!(!pool.is_free(PT_POOL_GPA));
        assert!(pool.is_free(PT_POOL_GPA + PT_POOL_BOOT_FRAMES * PAGE_SIZE));
        assert_eq!(
            pool.alloc(),
            Some(PT_POOL_GPA + PT_POOL_BOOT_FRAMES * PAGE_SIZE)
        );
    }

    #[test]
    fn allocates_lowest_first_until_exhausted() {
        let pool = PtFrameAllocator::from_regions(&vmm_regions());
        let n = pool.free_frames();
        let mut last = 0;
        for _ in 0..n {
            let f = pool.alloc().unwrap();
            assert!(f > last && PtFrameAllocator::contains(f) && f.is_multiple_of(PAGE_SIZE));
            last = f;
        }
        assert_eq!(last, PT_POOL_GPA + PT_POOL_SIZE - PAGE_SIZE);
        assert_eq!(pool.alloc(), None);
        assert_eq!(pool.free_frames(), 0);
        pool.free(last).unwrap();
        assert_eq!(pool.alloc(), Some(last));
    }

    #[test]
    fn free_checks_its_argument() {
        let pool = PtFrameAllocator::from_regions(&vmm_regions());
        let f = pool.alloc().unwrap();
        assert_eq!(pool.free(f + 8), Err(MmuError::NotInPool { gpa: f + 8 }));
        assert_eq!(
            pool.free(PT_POOL_GPA - PAGE_SIZE),
            Err(MmuError::NotInPool {
                gpa: PT_POOL_GPA - PAGE_SIZE
            })
        );
        assert_eq!(
            pool.free(PT_POOL_GPA + PT_POOL_SIZE),
            Err(MmuError::NotInPool {
                gpa: PT_POOL_GPA + PT_POOL_SIZE
            })
        );
        pool.free(f).unwrap();
        assert_eq!(pool.free(f), Err(MmuError::DoubleFree { gpa: f }));
    }

    #[test]
    fn regions_are_clipped_to_the_pool() {
        // A (hostile) region reaching beyond the pool, and one with a partial frame.
        let pool = PtFrameAllocator::from_regions(&[
            region(
                PT_POOL_GPA + PT_POOL_SIZE - 2 * PAGE_SIZE,
                16 * PAGE_SIZE,
                region_kind::PT_POOL,
            ),
            region(
                PT_POOL_GPA - PAGE_SIZE,
                PAGE_SIZE + 100,
                region_kind::PT_POOL,
            ),
            region(0, u64::MAX, region_kind::USABLE),
        ]);
        assert_eq!(pool.free_frames(), 2);
        assert_eq!(PtFrameAllocator::empty().alloc(), None);
        assert_eq!(PtFrameAllocator::default().free_frames(), 0);
    }
}
