//! Unit tests on the host: the frames are host memory, the pvkit host is [`MockHost`].

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::boxed::Box;
use std::vec::Vec;

use super::mock::MockHost;
use super::*;

/// Page-aligned, zeroed host memory standing in for free RAM.
struct Region {
    ptr: *mut u8,
    layout: Layout,
}

impl Region {
    fn for_frames(frames: u64) -> Region {
        let len = Frames::region_bytes(frames) as usize;
        let layout = Layout::from_size_align(len, PAGE_SIZE as usize).unwrap();
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        ptr.expose_provenance();
        Region { ptr, layout }
    }

    fn start(&self) -> u64 {
        self.ptr.addr() as u64
    }

    fn len(&self) -> u64 {
        self.layout.size() as u64
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: allocated in `for_frames` with this layout.
        unsafe { dealloc(self.ptr, self.layout) };
    }
}

fn frames<'a>(region: &Region, hints: Hints, buffers: &'a mut HintBuffers) -> Frames<'a> {
    // SAFETY: the region is host memory owned by the test, which touches it only through
    // frames it allocated; the buffers are the test's own.
    unsafe { Frames::new(region.start(), region.len(), hints, buffers) }.unwrap()
}

fn write(addr: u64, v: u64) {
    let p = core::ptr::with_exposed_provenance_mut::<u64>(addr as usize);
    // SAFETY: `addr` is in a frame the test allocated.
    unsafe { p.write(v) };
}

fn read(addr: u64) -> u64 {
    let p = core::ptr::with_exposed_provenance::<u64>(addr as usize);
    // SAFETY: `addr` is in a frame the test allocated.
    unsafe { p.read() }
}

fn is_zero(addr: u64) -> bool {
    // SAFETY: a frame the test allocated.
    unsafe { page::first_nonzero(addr) }.is_none()
}

fn free(f: &mut Frames<'_>, addr: u64) {
    // SAFETY: the test no longer uses the frame.
    unsafe { f.free(addr) }.unwrap();
}

#[test]
fn region_bytes_and_capacity_agree() {
    for n in [
        1, 2, 63, 64, 65, 1000, 1022, 1023, 1024, 1025, 4096, 65536, 100_003,
    ] {
        let len = Frames::region_bytes(n);
        assert_eq!(len % PAGE_SIZE, 0);
        assert_eq!(capacity_of(len), n, "{n}");
        assert!(capacity_of(len - PAGE_SIZE) < n, "{n}");
        assert!(n * PAGE_SIZE + meta_bytes(n) <= len);
    }
    // 256 MiB of frames costs 64 + 2 frames of metadata.
    assert_eq!(Frames::region_bytes(65536), (65536 + 66) * PAGE_SIZE);
    assert_eq!(capacity_of(0), 0);
    assert_eq!(capacity_of(PAGE_SIZE), 0);
    assert_eq!(capacity_of(2 * PAGE_SIZE), 1);
}

#[test]
fn bad_regions_are_refused() {
    let mut b = Box::new(HintBuffers::new());
    for (start, len) in [
        (0x1000, 0),
        (0x1000, 0x1000),
        (0x1800, 0x10_0000),
        (0x1000, 0x10_0800),
        (u64::MAX - 0xfff, 0x2000),
    ] {
        // SAFETY: refused before any memory is touched.
        let r = unsafe { Frames::new(start, len, Hints::None, &mut b) };
        assert_eq!(r.unwrap_err(), FramesError::BadRegion { start, len });
    }
    for len in [16 << 40, u64::MAX - 0xfff] {
        // SAFETY: refused before any memory is touched.
        let r = unsafe { Frames::new(0, len, Hints::None, &mut b) };
        assert_eq!(
            r.unwrap_err(),
            FramesError::TooManyFrames {
                frames: len / PAGE_SIZE
            }
        );
    }
    assert_eq!(capacity_of(Frames::region_bytes(MAX_FRAMES)), MAX_FRAMES);
    assert_eq!(
        Frames::region_bytes(MAX_FRAMES + 1),
        Frames::region_bytes(MAX_FRAMES)
    );
}

#[test]
fn bump_then_lifo_and_always_zero() {
    let region = Region::for_frames(16);
    let mut b = Box::new(HintBuffers::new());
    let mut f = frames(&region, Hints::None, &mut b);
    assert_eq!(
        (f.start(), f.capacity(), f.in_use()),
        (region.start(), 16, 0)
    );
    let a: Vec<u64> = (0..8).map(|_| f.alloc().unwrap()).collect();
    for (i, &addr) in a.iter().enumerate() {
        assert_eq!(addr, region.start() + i as u64 * PAGE_SIZE);
        write(addr + 8, 0xdead);
    }
    free(&mut f, a[5]);
    free(&mut f, a[2]);
    // LIFO, and dirty frames come back zero.
    assert_eq!(f.alloc(), Ok(a[2]));
    assert!(is_zero(a[2]));
    assert_eq!(f.alloc(), Ok(a[5]));
    assert!(is_zero(a[5]));
    assert_eq!(f.alloc(), Ok(region.start() + 8 * PAGE_SIZE));
    assert_eq!(f.in_use(), 9);
    let s = f.stats();
    assert_eq!((s.allocs, s.frees), (11, 2));
    assert_eq!(s.zeroed_bytes, 11 * PAGE_SIZE);
    assert_eq!(s.skipped_bytes, 0);
    assert_eq!(
        (s.query_calls, s.release_calls, s.released_bytes),
        (0, 0, 0)
    );
    assert_eq!(s.zero_ns, 0, "no clock");
    f.flush();
    assert_eq!(f.stats().release_calls, 0);
}

#[test]
fn misuse_is_reported() {
    let region = Region::for_frames(2);
    let mut b = Box::new(HintBuffers::new());
    let mut f = frames(&region, Hints::None, &mut b);
    let x = f.alloc().unwrap();
    let y = f.alloc().unwrap();
    assert_eq!(f.alloc(), Err(FramesError::Exhausted { frames: 2 }));
    for addr in [x + 8, x - PAGE_SIZE, y + PAGE_SIZE, 0] {
        // SAFETY: refused: not a frame.
        let r = unsafe { f.free(addr) };
        assert_eq!(r, Err(FramesError::NotAFrame { addr }));
    }
    free(&mut f, y);
    // SAFETY: refused: already free.
    let r = unsafe { f.free(y) };
    assert_eq!(r, Err(FramesError::NotAllocated { addr: y }));
    assert_eq!(f.alloc(), Ok(y));
    assert_eq!(f.in_use(), 2);
}

/// Runs the same alloc/free script and returns the frames (as offsets) it got.
fn script(hints: Hints) -> Vec<u64> {
    let region = Region::for_frames(64);
    let mut b = Box::new(HintBuffers::new());
    let mut f = frames(&region, hints, &mut b);
    f.set_release_threshold(4 * PAGE_SIZE);
    let mut got = Vec::new();
    let mut live = Vec::new();
    for round in 0..6u64 {
        for _ in 0..(5 + round) {
            let a = f.alloc().unwrap();
            write(a, round + 1);
            got.push(a - region.start());
            live.push(a);
        }
        for k in 0..(3 + round % 3) {
            let a = live.remove(((round + k) as usize * 7) % live.len());
            free(&mut f, a);
        }
    }
    got
}

#[test]
fn the_order_does_not_depend_on_the_hints() {
    let none = script(Hints::None);
    let pv = script(Hints::Mock(MockHost::leak()));
    assert_eq!(none, pv);
}

#[test]
fn fresh_frames_known_zero_are_not_zeroed() {
    let region = Region::for_frames(100);
    let mut b = Box::new(HintBuffers::new());
    let host = MockHost::leak();
    // Frame 3 is dirty before the allocator starts: the host must not call it zero.
    write(region.start() + 3 * PAGE_SIZE + 16, 7);
    let mut f = frames(&region, Hints::Mock(host), &mut b);
    f.set_check(true);
    f.set_clock(Tsc::from_khz(1_000_000).unwrap());
    for i in 0..10 {
        let a = f.alloc().unwrap();
        assert!(is_zero(a), "frame {i}");
    }
    let s = f.stats();
    assert_eq!(s.query_calls, 1);
    assert_eq!(*host.queries.borrow(), [(region.start() / PAGE_SIZE, 100)]);
    assert_eq!(s.zeroed_bytes, PAGE_SIZE, "only frame 3");
    assert_eq!(s.skipped_bytes, 9 * PAGE_SIZE);
    assert_eq!(f.hint_error(), None);
}

#[test]
fn queries_follow_the_bump_pointer_window_by_window() {
    let n = QUERY_MAX_FRAMES + 100;
    let region = Region::for_frames(n);
    let mut b = Box::new(HintBuffers::new());
    let host = MockHost::leak();
    let mut f = frames(&region, Hints::Mock(host), &mut b);
    for _ in 0..n {
        f.alloc().unwrap();
    }
    let first = region.start() / PAGE_SIZE;
    assert_eq!(
        *host.queries.borrow(),
        [(first, QUERY_MAX_FRAMES), (first + QUERY_MAX_FRAMES, 100)]
    );
    let s = f.stats();
    assert_eq!((s.query_calls, s.zeroed_bytes), (2, 0));
    assert_eq!(s.skipped_bytes, n * PAGE_SIZE);
}

#[test]
fn frees_are_released_in_coalesced_batches_and_come_back_known_zero() {
    let frames_n = 1200;
    let region = Region::for_frames(frames_n);
    let mut b = Box::new(HintBuffers::new());
    let host = MockHost::leak();
    let mut f = frames(&region, Hints::Mock(host), &mut b);
    f.set_check(true);
    f.set_release_threshold(2 << 20);
    let a: Vec<u64> = (0..frames_n).map(|_| f.alloc().unwrap()).collect();
    for (i, &x) in a.iter().enumerate() {
        write(x, i as u64 + 1);
    }
    for &x in a.iter().rev() {
        free(&mut f, x);
    }
    // 2 MiB = 512 frames per release, one range each (descending frees coalesce).
    let per = 512;
    assert_eq!(f.stats().release_calls, frames_n / per);
    assert_eq!(f.pending_bytes(), (frames_n % per) * PAGE_SIZE);
    f.flush();
    f.flush();
    {
        let releases = host.releases.borrow();
        assert_eq!(releases.len() as u64, frames_n / per + 1);
        assert!(releases.iter().all(|r| r.len() == 1));
        let last = &releases[0][0];
        assert_eq!(last.start, region.start() + (frames_n - per) * PAGE_SIZE);
        assert_eq!(last.len, per * PAGE_SIZE);
        let total: u64 = releases.iter().map(|r| r[0].len).sum();
        assert_eq!(total, frames_n * PAGE_SIZE);
    }
    assert_eq!(f.pending_bytes(), 0);
    let before = f.stats();
    assert_eq!(before.released_bytes, frames_n * PAGE_SIZE);
    // Same frames, same order, none zeroed (check mode verifies them), no new query.
    for &x in &a {
        assert_eq!(f.alloc(), Ok(x));
    }
    let s = f.stats();
    assert_eq!(s.zeroed_bytes, before.zeroed_bytes);
    assert_eq!(s.skipped_bytes - before.skipped_bytes, frames_n * PAGE_SIZE);
    assert_eq!(s.query_calls, 1);
}

#[test]
fn a_pending_frame_allocated_again_leaves_the_queue_and_is_zeroed() {
    let region = Region::for_frames(8);
    let mut b = Box::new(HintBuffers::new());
    let host = MockHost::leak();
    let mut f = frames(&region, Hints::Mock(host), &mut b);
    let a: Vec<u64> = (0..4).map(|_| f.alloc().unwrap()).collect();
    for &x in &a {
        write(x, 0x55);
    }
    free(&mut f, a[1]);
    free(&mut f, a[2]);
    assert_eq!(f.pending_bytes(), 2 * PAGE_SIZE);
    assert_eq!(f.alloc(), Ok(a[2]));
    assert!(is_zero(a[2]));
    assert_eq!(f.pending_bytes(), PAGE_SIZE);
    write(a[2], 0x66);
    f.flush();
    assert_eq!(
        *host.releases.borrow(),
        [[ZeroRange {
            start: a[1],
            len: PAGE_SIZE
        }]]
    );
    // The frame in use was not released.
    assert_eq!(read(a[2]), 0x66);
    // The released one comes back known zero.
    let zeroed = f.stats().zeroed_bytes;
    assert_eq!(f.alloc(), Ok(a[1]));
    assert_eq!(f.stats().zeroed_bytes, zeroed);
    // Then fresh frames.
    assert_eq!(f.alloc(), Ok(region.start() + 4 * PAGE_SIZE));
}

#[test]
fn a_full_range_list_is_released_at_once() {
    let n = 2 * RELEASE_MAX_RANGES + 2;
    let region = Region::for_frames(n);
    let mut b = Box::new(HintBuffers::new());
    let host = MockHost::leak();
    let mut f = frames(&region, Hints::Mock(host), &mut b);
    let a: Vec<u64> = (0..n).map(|_| f.alloc().unwrap()).collect();
    // Every other frame: nothing coalesces.
    for &x in a.iter().step_by(2) {
        free(&mut f, x);
    }
    let releases = host.releases.borrow();
    assert_eq!(releases.len(), 1);
    assert_eq!(releases[0].len() as u64, RELEASE_MAX_RANGES);
    assert_eq!(f.pending_bytes(), PAGE_SIZE);
}

#[test]
fn refused_hints_degrade_to_zeroing() {
    let region = Region::for_frames(600);
    let mut b = Box::new(HintBuffers::new());
    let host = MockHost::leak();
    host.fail.set(true);
    let mut f = frames(&region, Hints::Mock(host), &mut b);
    let a: Vec<u64> = (0..600).map(|_| f.alloc().unwrap()).collect();
    assert_eq!(f.stats().zeroed_bytes, 600 * PAGE_SIZE, "query refused");
    for &x in &a {
        write(x, 9);
    }
    for &x in a.iter().rev() {
        free(&mut f, x);
    }
    f.flush();
    let s = f.stats();
    // The free-list registration, one query and one release refused (600 frames stay under
    // the release threshold until the flush); a refused query leaves nothing known zero, so
    // nothing is prepared.
    assert_eq!(
        (s.release_calls, s.released_bytes, s.hint_errors),
        (1, 0, 3)
    );
    assert!(host.prepares.borrow().is_empty());
    assert_eq!(
        f.hint_error().map(|e| e.error()),
        Some(Some(hypercall_abi::Error::Denied))
    );
    // Nothing was released, so everything is zeroed again.
    for &x in &a {
        assert_eq!(f.alloc(), Ok(x));
        assert!(is_zero(x));
    }
    assert_eq!(f.stats().zeroed_bytes, 1200 * PAGE_SIZE);
}

#[test]
#[should_panic(expected = "was served without zeroing because the host reported it known zero")]
fn check_mode_catches_a_wrong_hint() {
    let region = Region::for_frames(8);
    let mut b = Box::new(HintBuffers::new());
    let host = MockHost::leak();
    host.lie.set(true);
    write(region.start() + 2 * PAGE_SIZE + 0x18, 1);
    let mut f = frames(&region, Hints::Mock(host), &mut b);
    f.set_check(true);
    for _ in 0..3 {
        f.alloc().unwrap();
    }
}

#[test]
fn without_check_mode_a_wrong_hint_goes_unnoticed() {
    let region = Region::for_frames(8);
    let mut b = Box::new(HintBuffers::new());
    let host = MockHost::leak();
    host.lie.set(true);
    write(region.start() + 0x18, 1);
    let mut f = frames(&region, Hints::Mock(host), &mut b);
    assert_eq!(f.alloc(), Ok(region.start()));
    assert_eq!(read(region.start() + 0x18), 1);
}

#[test]
fn zeroing_is_timed_on_the_clock() {
    let region = Region::for_frames(64);
    let mut b = Box::new(HintBuffers::new());
    let mut f = frames(&region, Hints::None, &mut b);
    // A 1 GHz clock: 64 zeroings take far more than one tick of the real TSC.
    f.set_clock(Tsc::from_khz(1_000_000).unwrap());
    for _ in 0..64 {
        f.alloc().unwrap();
    }
    let s = f.stats();
    assert_eq!(s.zeroed_bytes, 64 * PAGE_SIZE);
    assert!(s.zero_ns > 0, "{s:?}");
}

/// Allocates `n` frames, checking after each allocation that no prepared range holds a frame
/// already handed out. Returns the frames.
fn alloc_checking_prepares(f: &mut Frames<'_>, host: &MockHost, n: u64) -> Vec<u64> {
    let mut out: Vec<u64> = Vec::new();
    let mut seen = host.prepares.borrow().len();
    for _ in 0..n {
        let x = f.alloc().unwrap();
        out.push(x);
        let prepares = host.prepares.borrow();
        for &(gpa, len) in &prepares[seen..] {
            assert!(
                out.iter().all(|&a| a < gpa || a >= gpa + len),
                "prepared {gpa:#x}+{len:#x} holds a frame already handed out"
            );
            assert!(len <= PREPARE_CHUNK_FRAMES * PAGE_SIZE);
        }
        seen = prepares.len();
    }
    out
}

#[test]
fn fresh_frames_are_prepared_ahead_inside_the_query_window() {
    let n = QUERY_MAX_FRAMES + 5000;
    let region = Region::for_frames(n);
    let mut b = Box::new(HintBuffers::new());
    let host = MockHost::leak();
    let mut f = frames(&region, Hints::Mock(host), &mut b);
    let a = alloc_checking_prepares(&mut f, host, n);
    let start = region.start();
    let prepares = host.prepares.borrow();
    // Contiguous chunks from frame 1 up, never across the window boundary; the first frame of
    // each window is the one being handed out when the window is queried.
    let mut next = start + PAGE_SIZE;
    for &(gpa, len) in prepares.iter() {
        if gpa != next {
            assert_eq!(
                next,
                start + QUERY_MAX_FRAMES * PAGE_SIZE,
                "only the window start"
            );
            assert_eq!(gpa, next + PAGE_SIZE);
        }
        let boundary = start + QUERY_MAX_FRAMES * PAGE_SIZE;
        assert!(
            gpa >= boundary || gpa + len <= boundary,
            "crosses the window"
        );
        next = gpa + len;
    }
    assert_eq!(next, start + n * PAGE_SIZE, "everything up to the end");
    let s = f.stats();
    assert_eq!(s.prepare_calls, prepares.len() as u64);
    assert_eq!(s.prepared_bytes, (n - 2) * PAGE_SIZE);
    assert_eq!(a.len() as u64, n);
}

#[test]
fn released_frames_are_prepared_ahead_of_reuse_and_kept_frames_are_not() {
    let n = 3 * PREPARE_CHUNK_FRAMES;
    let region = Region::for_frames(n);
    let mut b = Box::new(HintBuffers::new());
    let host = MockHost::leak();
    let mut f = frames(&region, Hints::Mock(host), &mut b);
    f.set_check(true);
    let a = alloc_checking_prepares(&mut f, host, n);
    for (i, &x) in a.iter().enumerate() {
        write(x, i as u64 + 1);
    }
    for &x in a.iter().rev() {
        free(&mut f, x);
    }
    f.flush();
    let fresh = host.prepares.borrow().len();
    let again = alloc_checking_prepares(&mut f, host, n);
    assert_eq!(again, a, "LIFO order");
    let prepares = host.prepares.borrow();
    // Every reused frame but the first (handed out as the read-ahead starts) was prepared, in
    // ascending runs of at most a chunk, before it was handed out (checked above).
    let mut next = a[1];
    for &(gpa, len) in &prepares[fresh..] {
        assert_eq!(gpa, next);
        next = gpa + len;
    }
    assert_eq!(next, a[0] + n * PAGE_SIZE);
    assert_eq!(f.stats().zeroed_bytes, 0, "everything came back known zero");
    drop(prepares);

    // Freed and kept (no release): dirty frames are not prepared.
    f.set_release_threshold(u64::MAX);
    for &x in again.iter().rev() {
        free(&mut f, x);
    }
    let before = host.prepares.borrow().len();
    for _ in 0..n {
        f.alloc().unwrap();
    }
    assert_eq!(host.prepares.borrow().len(), before);
}

#[test]
fn read_ahead_can_be_turned_off_and_a_refusal_turns_it_off() {
    let region = Region::for_frames(2000);
    let mut b = Box::new(HintBuffers::new());
    let host = MockHost::leak();
    let mut f = frames(&region, Hints::Mock(host), &mut b);
    f.set_prepare(false);
    for _ in 0..2000 {
        f.alloc().unwrap();
    }
    assert!(host.prepares.borrow().is_empty());
    assert_eq!(f.stats().zeroed_bytes, 0, "the hints still work");

    let region = Region::for_frames(2000);
    let mut b = Box::new(HintBuffers::new());
    let host = MockHost::leak();
    host.fail_prepare.set(true);
    let mut f = frames(&region, Hints::Mock(host), &mut b);
    for _ in 0..2000 {
        f.alloc().unwrap();
    }
    let s = f.stats();
    assert_eq!(
        host.prepares.borrow().len(),
        1,
        "no second try after a refusal"
    );
    assert_eq!(
        (s.prepare_calls, s.prepared_bytes, s.hint_errors),
        (1, 0, 1)
    );
    assert_eq!(s.zeroed_bytes, 0, "the other hints still work");
}

/// The free-list rules of ABI v1.8 at this moment: slots past the pending ranges are unused
/// (`len` 0), and every frame a used slot names is free (not handed out).
fn assert_free_list_invariant(f: &Frames<'_>) {
    let list = f.free_list();
    let n = f.pending.ranges().len();
    assert_eq!(&list[..n], f.pending.ranges());
    assert!(
        list[n..].iter().all(|r| r.len == 0),
        "an unused slot has len != 0"
    );
    let mut listed = 0;
    for r in &list[..n] {
        assert!(r.len != 0 && r.len % PAGE_SIZE == 0 && r.start % PAGE_SIZE == 0);
        for addr in (r.start..r.start + r.len).step_by(PAGE_SIZE as usize) {
            let i = f.index_of(addr).expect("a frame of the allocator");
            assert!(
                !f.is_allocated(i),
                "frame {addr:#x} is in use but listed free"
            );
            listed += PAGE_SIZE;
        }
    }
    assert_eq!(listed, f.pending_bytes());
}

#[test]
fn the_release_list_is_registered_as_the_free_list_and_unregistered_on_drop() {
    let region = Region::for_frames(16);
    let mut b = Box::new(HintBuffers::new());
    // Garbage left in the buffers by an earlier user is cleared before registering.
    b.ranges.fill(ZeroRange {
        start: 0x1000,
        len: 0x1000,
    });
    let list_addr = b.ranges.as_ptr().addr() as u64;
    let host = MockHost::leak();
    {
        let f = frames(&region, Hints::Mock(host), &mut b);
        assert!(f.free_list_registered());
        assert_eq!(*host.free_lists.borrow(), [(list_addr, RELEASE_MAX_RANGES)]);
        assert_free_list_invariant(&f);
        assert!(f.free_list().iter().all(|r| r.len == 0));
    }
    assert_eq!(
        *host.free_lists.borrow(),
        [(list_addr, RELEASE_MAX_RANGES), (0, 0)],
        "dropping the allocator unregisters"
    );
    // The trapped twin registers nothing; a refusal is a hint error, nothing else.
    let f = frames(&region, Hints::None, &mut b);
    assert!(!f.free_list_registered());
    drop(f);
    let failing = MockHost::leak();
    failing.fail.set(true);
    let mut f = frames(&region, Hints::Mock(failing), &mut b);
    assert!(!f.free_list_registered());
    assert_eq!(f.stats().hint_errors, 1);
    assert!(f.alloc().is_ok());
}

#[test]
fn the_free_list_names_only_free_frames_after_every_operation() {
    let n = 3 * RELEASE_MAX_RANGES;
    let region = Region::for_frames(n);
    let mut b = Box::new(HintBuffers::new());
    let host = MockHost::leak();
    let mut f = frames(&region, Hints::Mock(host), &mut b);
    f.set_release_threshold(64 * PAGE_SIZE);
    let mut held: Vec<u64> = Vec::new();
    // A deterministic mix of allocations and frees (xorshift), with frees from the middle of
    // the held set (non-adjacent ranges) and LIFO reuse of pending frames.
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for step in 0..20_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let want_alloc = held.is_empty() || (x % 100 < 55 && (held.len() as u64) < n);
        if want_alloc {
            let a = f.alloc().unwrap();
            assert!(is_zero(a));
            write(a, step);
            held.push(a);
        } else {
            let k = (x >> 8) as usize % held.len();
            let a = if x & 1 == 0 {
                held.swap_remove(k)
            } else {
                held.pop().unwrap()
            };
            free(&mut f, a);
        }
        assert_free_list_invariant(&f);
        if step % 5000 == 4999 {
            f.flush();
            assert_free_list_invariant(&f);
            assert!(f.free_list().iter().all(|r| r.len == 0));
        }
    }
    assert!(host.releases.borrow().len() > 1, "the queue was released");
}
