//! [`Pending`]: freed frames waiting to be released, coalesced into [`ZeroRange`]s.

use core::sync::atomic::{Ordering, compiler_fence};

use hypercall_abi::layout::PAGE_SIZE;
use hypercall_abi::zero::ZeroRange;

/// Frames queued for release, as ranges in a caller-provided array (the list the host reads).
///
/// A frame extends the *last* range when it is adjacent to it, at either end (frames freed in
/// ascending or descending order become one range); otherwise it starts a new range. Only the
/// last range grows, so the most recently pushed frame is always at one end of the last range
/// and [`undo`](Pending::undo) can take it back out — which is what the allocator does when it
/// hands a still-pending frame out again (LIFO reuse).
///
/// The array doubles as the guest's registered free list (`zero_hints(FREE_LIST)`, ABI v1.8),
/// which the host may read whenever the vCPU stops, between any two instructions. So:
/// - every slot at index ≥ the count of ranges has `len == 0` (the host ignores it);
/// - every slot is written field by field with volatile stores, in an order that makes each
///   intermediate state name only frames that are free (a subset of the range before or after
///   the change): growing writes `start` before `len`, shrinking writes `len` before `start`.
#[derive(Debug)]
pub(super) struct Pending<'a> {
    ranges: &'a mut [ZeroRange],
    count: usize,
    bytes: u64,
}

impl<'a> Pending<'a> {
    /// An empty queue over `ranges` (its capacity); every slot is cleared.
    pub(super) fn new(ranges: &'a mut [ZeroRange]) -> Pending<'a> {
        let mut p = Pending {
            ranges,
            count: 0,
            bytes: 0,
        };
        for i in 0..p.ranges.len() {
            p.set_len(i, 0);
            p.set_start(i, 0);
        }
        p
    }

    /// The queued ranges, in the order they were started.
    pub(super) fn ranges(&self) -> &[ZeroRange] {
        &self.ranges[..self.count]
    }

    /// Every slot, used or not (the registered free list): those past
    /// [`ranges`](Self::ranges) have `len == 0`.
    pub(super) fn slots(&self) -> &[ZeroRange] {
        self.ranges
    }

    /// Bytes queued.
    pub(super) const fn bytes(&self) -> u64 {
        self.bytes
    }

    /// True if nothing is queued.
    pub(super) const fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// True if every range slot is in use (the next non-adjacent frame would not fit).
    pub(super) fn is_full(&self) -> bool {
        self.count == self.ranges.len()
    }

    /// Queues the frame at `addr` (page-aligned). The caller must not push when
    /// [`is_full`](Self::is_full) (it releases first); a frame that fits nowhere is a bug.
    pub(super) fn push(&mut self, addr: u64) {
        if let Some(i) = self.count.checked_sub(1) {
            let last = self.ranges[i];
            if last.start + last.len == addr {
                self.set_len(i, last.len + PAGE_SIZE);
                self.bytes += PAGE_SIZE;
                return;
            }
            if addr + PAGE_SIZE == last.start {
                // `[addr, addr + len)` between the stores: a subset of the grown range.
                self.set_start(i, addr);
                self.set_len(i, last.len + PAGE_SIZE);
                self.bytes += PAGE_SIZE;
                return;
            }
        }
        assert!(!self.is_full(), "release list full: release before pushing");
        // The slot's `len` is 0 (unused), so `start` may be written first.
        self.set_start(self.count, addr);
        self.set_len(self.count, PAGE_SIZE);
        self.count += 1;
        self.bytes += PAGE_SIZE;
    }

    /// Takes back the frame at `addr`, which must be the most recently pushed one still queued.
    /// When this returns, the slot no longer names the frame (the caller may hand it out).
    pub(super) fn undo(&mut self, addr: u64) {
        let i = self
            .count
            .checked_sub(1)
            .expect("undo with no frame queued");
        let last = self.ranges[i];
        let len = last.len - PAGE_SIZE;
        if last.start == addr {
            // Shrink first: `[start, start + len)` between the stores names free frames only.
            self.set_len(i, len);
            if len != 0 {
                self.set_start(i, last.start + PAGE_SIZE);
            }
        } else {
            assert_eq!(
                last.start + last.len - PAGE_SIZE,
                addr,
                "undo of a frame that is not the last one queued"
            );
            self.set_len(i, len);
        }
        if len == 0 {
            self.count = i;
        }
        self.bytes -= PAGE_SIZE;
    }

    /// Forgets every queued range (their slots' `len` becomes 0).
    pub(super) fn clear(&mut self) {
        for i in 0..self.count {
            self.set_len(i, 0);
        }
        self.count = 0;
        self.bytes = 0;
    }

    /// One volatile store of slot `i`'s `len` (the host may read the slot at any exit), then a
    /// compiler fence, so that the caller's later accesses to frames are not moved before it.
    fn set_len(&mut self, i: usize, len: u64) {
        let slot = &mut self.ranges[i];
        // SAFETY: a valid, exclusively borrowed, aligned `u64`.
        unsafe { (&raw mut slot.len).write_volatile(len) };
        compiler_fence(Ordering::SeqCst);
    }

    /// One volatile store of slot `i`'s `start`, as [`set_len`](Self::set_len).
    fn set_start(&mut self, i: usize, start: u64) {
        let slot = &mut self.ranges[i];
        // SAFETY: a valid, exclusively borrowed, aligned `u64`.
        unsafe { (&raw mut slot.start).write_volatile(start) };
        compiler_fence(Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const F: u64 = PAGE_SIZE;

    fn r(start: u64, frames: u64) -> ZeroRange {
        ZeroRange {
            start: start * F,
            len: frames * F,
        }
    }

    #[test]
    fn ascending_and_descending_frees_coalesce() {
        let mut buf = [ZeroRange::default(); 4];
        let mut p = Pending::new(&mut buf);
        assert!(p.is_empty());
        for f in 10..14 {
            p.push(f * F);
        }
        for f in (3..7).rev() {
            p.push(f * F);
        }
        p.push(2 * F);
        assert_eq!(p.ranges(), [r(10, 4), r(2, 5)]);
        assert_eq!(p.bytes(), 9 * F);
        assert!(!p.is_full());
        p.clear();
        assert!(p.is_empty());
        assert_eq!(p.bytes(), 0);
        assert_eq!(p.ranges(), []);
    }

    #[test]
    fn only_the_last_range_grows() {
        let mut buf = [ZeroRange::default(); 3];
        let mut p = Pending::new(&mut buf);
        p.push(5 * F);
        p.push(9 * F);
        // Adjacent to the first range, but not the last: a new range.
        p.push(6 * F);
        assert_eq!(p.ranges(), [r(5, 1), r(9, 1), r(6, 1)]);
        assert!(p.is_full());
        // Still adjacent to the last range: fits although full.
        p.push(7 * F);
        assert_eq!(p.ranges(), [r(5, 1), r(9, 1), r(6, 2)]);
    }

    #[test]
    #[should_panic(expected = "release list full")]
    fn a_full_list_refuses_a_new_range() {
        let mut buf = [ZeroRange::default(); 1];
        let mut p = Pending::new(&mut buf);
        p.push(F);
        p.push(8 * F);
    }

    #[test]
    fn undo_takes_back_the_last_frame_at_either_end() {
        let mut buf = [ZeroRange::default(); 4];
        let mut p = Pending::new(&mut buf);
        p.push(20 * F);
        p.push(21 * F);
        p.push(22 * F);
        p.undo(22 * F);
        assert_eq!(p.ranges(), [r(20, 2)]);
        p.push(19 * F);
        p.undo(19 * F);
        assert_eq!(p.ranges(), [r(20, 2)]);
        p.push(40 * F);
        p.undo(40 * F);
        assert_eq!(p.ranges(), [r(20, 2)]);
        p.undo(21 * F);
        p.undo(20 * F);
        assert!(p.is_empty());
        assert_eq!(p.bytes(), 0);
    }

    /// Every slot past the queued ranges has `len == 0`; the queued ones are exactly
    /// [`Pending::ranges`].
    fn assert_unused_slots_are_empty(p: &Pending<'_>) {
        let n = p.ranges().len();
        assert_eq!(&p.slots()[..n], p.ranges());
        assert!(p.slots()[n..].iter().all(|r| r.len == 0), "{:?}", p.slots());
        assert!(p.ranges().iter().all(|r| r.len != 0));
    }

    #[test]
    fn slots_past_the_queue_are_unused_after_every_operation() {
        let mut buf = [ZeroRange {
            start: 0xdead_0000,
            len: 0x5000,
        }; 4];
        let mut p = Pending::new(&mut buf);
        assert_unused_slots_are_empty(&p);
        for f in [10, 11, 30, 29, 50] {
            p.push(f * F);
            assert_unused_slots_are_empty(&p);
        }
        for f in [50, 29, 30] {
            p.undo(f * F);
            assert_unused_slots_are_empty(&p);
        }
        assert_eq!(p.ranges(), [r(10, 2)]);
        p.push(70 * F);
        p.clear();
        assert_unused_slots_are_empty(&p);
        assert!(p.slots().iter().all(|r| r.len == 0));
    }

    #[test]
    #[should_panic(expected = "not the last one queued")]
    fn undo_of_a_middle_frame_is_a_bug() {
        let mut buf = [ZeroRange::default(); 4];
        let mut p = Pending::new(&mut buf);
        for f in 1..4 {
            p.push(f * F);
        }
        p.undo(2 * F);
    }
}
