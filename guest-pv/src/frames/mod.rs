//! A 4 KiB frame allocator whose frames always read as zero, and which uses pvkit's
//! pre-zeroed page hints ([`hypercall_abi::zero`]) to avoid zeroing them itself.
//!
//! [`Frames`] hands out frames of a physical range the kernel gives it (e.g. free RAM from the
//! boot memory map). Every [`alloc`](Frames::alloc) returns a frame that reads as zero: either
//! the allocator *knows* it is zero and skips the `memset`, or it zeroes it. What it knows
//! depends on the [`Hints`]:
//!
//! - [`Hints::Pv`]: the host tells it. As the bump pointer reaches frames nobody has used yet,
//!   one `zero_hints(QUERY)` ([`Pvkit::zero_query`]) asks which of the next up to
//!   [`QUERY_MAX_FRAMES`] frames are known zero (never written, so not backed by host memory).
//!   [`free`](Frames::free) queues frames for release, coalesced into [`ZeroRange`]s; once
//!   [`RELEASE_THRESHOLD_BYTES`] are pending (or the range list is full) one
//!   `zero_hints(RELEASE)` ([`Pvkit::zero_release`]) gives them all back to the host, which
//!   discards their backing — so they are known zero again, without asking.
//!   [`flush`](Frames::flush) releases whatever is pending.
//!   On a host with [`features::ZERO_PREPARE`](hypercall_abi::features::ZERO_PREPARE) (ABI
//!   v1.6) the allocator also reads ahead: it tells the host, with `zero_hints(PREPARE)`
//!   ([`Pvkit::zero_prepare`]), which known-zero frames it will hand out next — up to
//!   [`PREPARE_AHEAD_FRAMES`] ahead, [`PREPARE_CHUNK_FRAMES`] per call — and the host backs them
//!   on another core, so writing them does not stop the vCPU in host page faults.
//!   On a host with [`features::FREE_REPORT`](hypercall_abi::features::FREE_REPORT) (ABI
//!   v1.8) the release list is also registered as the guest's free list
//!   (`zero_hints(FREE_LIST)`, [`Pvkit::zero_free_list`]) when the allocator is built: frames
//!   waiting for release are free, and a snapshot or migration may skip them. The list keeps
//!   the ABI's rules at every instruction: unused entries have `len` 0, and a pending frame
//!   leaves the list before [`alloc`](Frames::alloc) hands it out. Dropping the allocator
//!   unregisters the list.
//! - [`Hints::None`], the trapped twin (an unmodified guest): every frame is zeroed on
//!   allocation and frees are never reported.
//!
//! Once handed out, a frame is no longer known zero (the caller writes it).
//!
//! # Order
//! Allocation is deterministic and independent of the hints: the most recently freed frame
//! first (a LIFO free stack), then fresh frames from a bump pointer, lowest first. The same
//! sequence of `alloc`/`free` calls returns the same frames in both modes. Freeing in reverse
//! order of allocation and allocating again yields the frames in the original order.
//!
//! # Pending frees
//! A freed frame stays queued until the batch is released. If it is allocated again before
//! that (LIFO reuse makes this the common case for short-lived frames), it is taken out of the
//! queue — it is the most recently queued frame, at one end of the last range — and zeroed
//! like any dirty frame, so the host never discards a frame that is in use.
//!
//! # Memory
//! The allocator keeps its metadata at the end of the range: a free stack (4 bytes per frame)
//! and an "allocated" bitmap (1 bit per frame, for catching double frees), about 0.1 % of
//! the range; [`Frames::region_bytes`] says how big a range must be for a number of frames.
//! The query bitmap and the release list live in a [`HintBuffers`] the kernel provides
//! (typically a static), because the host reads and writes them by guest-physical address.
//!
//! # Statistics and check mode
//! [`Frames::stats`]: bytes zeroed by the guest and the time spent zeroing (on the [`Tsc`]
//! clock, [`Frames::set_clock`]), bytes served known-zero, bytes released, release and query
//! calls. In check mode ([`Frames::set_check`]) every frame served without zeroing is read
//! in full first, and a non-zero byte panics with a message naming the frame and who claimed it
//! was zero — how tests prove the hints right.
//!
//! Hypercall failures never fail an allocation: a failed query counts as "nothing known zero",
//! a failed release leaves its frames dirty, a failed prepare turns read-ahead off; all are
//! counted ([`FrameStats::hint_errors`]) and
//! the first is kept ([`Frames::hint_error`]).
//!
//! # Example
//! ```no_run
//! use guest_pv::frames::{Frames, HintBuffers, Hints};
//!
//! static mut BUFFERS: HintBuffers = HintBuffers::new();
//!
//! # fn demo(pv: guest_pv::Pvkit, free_ram: u64) {
//! let len = Frames::region_bytes(1024);
//! // SAFETY: `free_ram..free_ram + len` is identity-mapped RAM above the kernel that nothing
//! // else uses; `BUFFERS` is an identity-mapped kernel static used only here.
//! let mut frames = unsafe { Frames::new(free_ram, len, Hints::Pv(pv), &mut *(&raw mut BUFFERS)) }
//!     .expect("a valid region");
//! let f = frames.alloc().expect("a free frame"); // reads as zero; no memset if known zero
//! // ... use the frame at `f` ...
//! // SAFETY: nothing uses the frame any more.
//! unsafe { frames.free(f) }.expect("an allocated frame");
//! frames.flush(); // release what is pending
//! # }
//! # fn main() {}
//! ```

#[cfg(test)]
mod mock;
mod page;
mod pending;
#[cfg(test)]
mod tests;
mod window;

use core::fmt;

use hypercall_abi::layout::PAGE_SIZE;
pub use hypercall_abi::zero::{
    QUERY_MAX_FRAMES, RELEASE_MAX_RANGES, RELEASE_THRESHOLD_BYTES, ZeroRange,
};

use self::pending::Pending;
use self::window::Window;
use crate::tsc::{Tsc, rdtsc};
use crate::{HypercallError, Pvkit};

/// Bytes of the query bitmap: one bit for each of [`QUERY_MAX_FRAMES`] frames.
pub const QUERY_BITMAP_BYTES: usize = (QUERY_MAX_FRAMES / 8) as usize;

/// The most frames one allocator manages (frame indices are 31 bits on the free stack).
pub const MAX_FRAMES: u64 = 1 << 31;

/// A free-stack entry's flag: the frame is known zero (it was released since it was freed).
const KNOWN_ZERO: u32 = 1 << 31;

/// How far ahead of the next allocation the allocator asks the host to prepare known-zero
/// frames (32 MiB).
pub const PREPARE_AHEAD_FRAMES: u64 = 8192;
/// The most frames one `zero_hints(PREPARE)` covers (16 MiB).
pub const PREPARE_CHUNK_FRAMES: u64 = 4096;
/// Runs of known-zero frames on the free stack shorter than this (64 KiB) are not prepared:
/// not worth an exit.
pub const PREPARE_MIN_FRAMES: u64 = 16;

/// Where the allocator learns which frames are zero.
#[derive(Debug, Clone, Copy)]
pub enum Hints {
    /// From the pvkit host: `zero_hints` QUERY for fresh frames, RELEASE for freed ones (needs
    /// [`features::ZERO_HINTS`](hypercall_abi::features::ZERO_HINTS)).
    Pv(Pvkit),
    /// Nowhere (the trapped twin): zero every frame, never report frees.
    None,
    /// A simulated host, for the unit tests.
    #[cfg(test)]
    Mock(&'static mock::MockHost),
}

impl Hints {
    /// True if the allocator queries and releases.
    const fn has_host(&self) -> bool {
        !matches!(self, Hints::None)
    }
}

/// The memory the host reads and writes by guest-physical address: the query bitmap and the
/// release list, in one page-aligned 8 KiB block. Put it where its virtual address is its
/// guest-physical address (a kernel static, under pvkit's identity map).
#[repr(C, align(4096))]
pub struct HintBuffers {
    bitmap: [u8; QUERY_BITMAP_BYTES],
    ranges: [ZeroRange; RELEASE_MAX_RANGES as usize],
}

impl HintBuffers {
    /// Zeroed buffers (`const`, for statics).
    pub const fn new() -> HintBuffers {
        HintBuffers {
            bitmap: [0; QUERY_BITMAP_BYTES],
            ranges: [ZeroRange { start: 0, len: 0 }; RELEASE_MAX_RANGES as usize],
        }
    }
}

impl Default for HintBuffers {
    fn default() -> HintBuffers {
        HintBuffers::new()
    }
}

impl fmt::Debug for HintBuffers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HintBuffers").finish_non_exhaustive()
    }
}

/// What an allocator did so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FrameStats {
    /// Frames handed out.
    pub allocs: u64,
    /// Frames freed.
    pub frees: u64,
    /// Bytes the guest zeroed (4096 per frame it did not know to be zero).
    pub zeroed_bytes: u64,
    /// Time spent zeroing, in ns on the allocator's [`Tsc`] (0 without one).
    pub zero_ns: u64,
    /// Bytes served known zero, without zeroing (host hint or released since freed).
    pub skipped_bytes: u64,
    /// Bytes released to the host (the guest's count of successful releases).
    pub released_bytes: u64,
    /// `zero_hints(RELEASE)` calls.
    pub release_calls: u64,
    /// `zero_hints(QUERY)` calls.
    pub query_calls: u64,
    /// `zero_hints(PREPARE)` calls.
    pub prepare_calls: u64,
    /// Bytes the host queued for preparing.
    pub prepared_bytes: u64,
    /// Query, release or prepare calls the host refused.
    pub hint_errors: u64,
}

/// Why an allocator operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FramesError {
    /// The range is not page-aligned, overflows, or is too small for one frame and its
    /// metadata.
    BadRegion {
        /// Start of the range.
        start: u64,
        /// Its length.
        len: u64,
    },
    /// The range is larger than [`MAX_FRAMES`] frames need.
    TooManyFrames {
        /// The pages in the range.
        frames: u64,
    },
    /// Every frame is handed out.
    Exhausted {
        /// The allocator's capacity.
        frames: u64,
    },
    /// The address is not the start of one of the allocator's frames.
    NotAFrame {
        /// The address.
        addr: u64,
    },
    /// The frame is not handed out (a double free).
    NotAllocated {
        /// The frame.
        addr: u64,
    },
}

impl fmt::Display for FramesError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FramesError::BadRegion { start, len } => write!(
                f,
                "bad frame region {start:#x}+{len:#x} (want page-aligned, room for one frame \
                 and its metadata)"
            ),
            FramesError::TooManyFrames { frames } => {
                write!(f, "{frames} frames is more than {MAX_FRAMES} per allocator")
            }
            FramesError::Exhausted { frames } => {
                write!(f, "all {frames} frames are handed out")
            }
            FramesError::NotAFrame { addr } => {
                write!(f, "{addr:#x} is not a frame of this allocator")
            }
            FramesError::NotAllocated { addr } => {
                write!(f, "frame {addr:#x} is not allocated (double free?)")
            }
        }
    }
}

impl core::error::Error for FramesError {}

/// Why a frame is served without zeroing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known {
    /// A `zero_hints(QUERY)` said so.
    Host,
    /// It was released since it was last freed.
    Released,
}

impl Known {
    const fn why(self) -> &'static str {
        match self {
            Known::Host => "the host reported it known zero",
            Known::Released => "it was released to the host since it was freed",
        }
    }
}

/// The allocator. See the [module docs](self).
pub struct Frames<'a> {
    /// Address of frame 0.
    start: u64,
    /// Frames managed (frame `i` is at `start + i * PAGE_SIZE`).
    frames: u64,
    hints: Hints,
    /// The query answer for `window`.
    bitmap: &'a mut [u8; QUERY_BITMAP_BYTES],
    window: Window,
    pending: Pending<'a>,
    /// Free stack (in the metadata): frame index, plus [`KNOWN_ZERO`].
    stack: *mut u32,
    /// Entries on the free stack.
    depth: u64,
    /// Entries `pending_from..depth` are queued in `pending`, in push order; those below are
    /// not (released, or never reported).
    pending_from: u64,
    /// "Allocated" bitmap (in the metadata), one bit per frame.
    allocated: *mut u64,
    /// Frames `bump..frames` have never been handed out.
    bump: u64,
    /// Read ahead with `zero_hints(PREPARE)`.
    prepare: bool,
    /// The release list is registered as the guest's free list (`zero_hints(FREE_LIST)`).
    free_list: bool,
    /// Fresh frames `bump..bump_prepared` were prepared.
    bump_prepared: u64,
    /// Known-zero frames of the current query window.
    window_known: u64,
    /// Free-stack entries `0..stack_unprepared` may be known-zero frames not prepared yet;
    /// those above were prepared or are dirty.
    stack_unprepared: u64,
    threshold: u64,
    check: bool,
    tsc: Option<Tsc>,
    stats: FrameStats,
    zero_ticks: u64,
    hint_error: Option<HypercallError>,
}

impl Drop for Frames<'_> {
    /// Unregisters the free list: the buffers and the frames go back to the caller.
    fn drop(&mut self) {
        if !self.free_list {
            return;
        }
        self.free_list = false;
        // A refusal cannot be reported any more; the host then keeps reading a list whose
        // frames the caller owns again, so the caller's contract asks it not to happen (it
        // does not on pvkit: unregistering has no failure mode but a missing feature).
        let _ = match self.hints {
            Hints::Pv(pv) => pv.zero_free_list_clear(),
            Hints::None => Ok(0),
            #[cfg(test)]
            Hints::Mock(host) => host.free_list(&[]),
        };
    }
}

impl fmt::Debug for Frames<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Frames")
            .field("start", &self.start)
            .field("frames", &self.frames)
            .field("hints", &self.hints)
            .field("bump", &self.bump)
            .field("free_stack", &self.depth)
            .field("pending_bytes", &self.pending.bytes())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// Metadata bytes for `frames` frames: the free stack (`u32` each), then the allocated bitmap
/// (`u64` words, 8-aligned).
const fn meta_bytes(frames: u64) -> u64 {
    (frames * 4).next_multiple_of(8) + frames.div_ceil(64) * 8
}

/// The most frames a range of `len` bytes holds with their metadata.
const fn capacity_of(len: u64) -> u64 {
    // meta_bytes(n) <= 4.125 n + 12, so this first guess fits; then grow while the next fits.
    let mut n = len.saturating_sub(16) / 32_801 * 8;
    while (n + 1) * PAGE_SIZE + meta_bytes(n + 1) <= len {
        n += 1;
    }
    n
}

impl<'a> Frames<'a> {
    /// The bytes a range must have (a multiple of the page size) for `frames` frames plus the
    /// allocator's metadata; `frames` at most [`MAX_FRAMES`].
    pub const fn region_bytes(frames: u64) -> u64 {
        let frames = if frames > MAX_FRAMES {
            MAX_FRAMES
        } else {
            frames
        };
        (frames * PAGE_SIZE + meta_bytes(frames)).next_multiple_of(PAGE_SIZE)
    }

    /// An allocator of the frames in `[start, start + len)` (page-aligned) with `hints`; the
    /// metadata goes at the end of the range (its first bitmap words are zeroed here), frames
    /// are handed out from `start` up.
    ///
    /// # Safety
    /// - The range must be RAM mapped writable at virtual address = guest-physical address
    ///   (pvkit's boot identity map), owned by the allocator exclusively from now on: nothing
    ///   else may access it except the frames [`alloc`](Self::alloc) hands out, between their
    ///   allocation and their [`free`](Self::free). With [`Hints::Pv`] it must lie above the
    ///   kernel image (the host refuses to release anything else).
    /// - With [`Hints::Pv`], `buffers` must be mapped at virtual = guest-physical address too:
    ///   the host reads and writes them there.
    pub unsafe fn new(
        start: u64,
        len: u64,
        hints: Hints,
        buffers: &'a mut HintBuffers,
    ) -> Result<Frames<'a>, FramesError> {
        let bad = FramesError::BadRegion { start, len };
        if !start.is_multiple_of(PAGE_SIZE)
            || !len.is_multiple_of(PAGE_SIZE)
            || start.checked_add(len).is_none()
        {
            return Err(bad);
        }
        if len > Frames::region_bytes(MAX_FRAMES) {
            return Err(FramesError::TooManyFrames {
                frames: len / PAGE_SIZE,
            });
        }
        let frames = capacity_of(len);
        if frames == 0 {
            return Err(bad);
        }
        let meta = start + frames * PAGE_SIZE;
        let stack = core::ptr::with_exposed_provenance_mut::<u32>(meta as usize);
        let bitmap_at = meta + (frames * 4).next_multiple_of(8);
        let allocated = core::ptr::with_exposed_provenance_mut::<u64>(bitmap_at as usize);
        // SAFETY: the bitmap words lie inside the range (`capacity_of` left room for
        // `meta_bytes(frames)` after the frames), which the caller hands over exclusively,
        // mapped writable; `bitmap_at` is 8-aligned (page-aligned `meta` plus a multiple of 8).
        unsafe { allocated.write_bytes(0, frames.div_ceil(64) as usize) };
        let HintBuffers { bitmap, ranges } = buffers;
        let mut f = Frames {
            start,
            frames,
            hints,
            bitmap,
            window: Window::EMPTY,
            pending: Pending::new(ranges),
            stack,
            depth: 0,
            pending_from: 0,
            allocated,
            bump: 0,
            prepare: match hints {
                Hints::Pv(pv) => pv.has(hypercall_abi::features::ZERO_PREPARE),
                Hints::None => false,
                #[cfg(test)]
                Hints::Mock(_) => true,
            },
            free_list: false,
            bump_prepared: 0,
            window_known: 0,
            stack_unprepared: 0,
            threshold: RELEASE_THRESHOLD_BYTES,
            check: false,
            tsc: None,
            stats: FrameStats::default(),
            zero_ticks: 0,
            hint_error: None,
        };
        f.register_free_list();
        Ok(f)
    }

    /// Registers the release list (all its slots, unused ones with `len` 0: `Pending::new`
    /// cleared them) as the guest's free list, where the host offers
    /// [`features::FREE_REPORT`](hypercall_abi::features::FREE_REPORT). A refusal is counted
    /// like any hint error; the allocator works the same without.
    fn register_free_list(&mut self) {
        let slots = self.pending.slots();
        let r = match self.hints {
            Hints::Pv(pv) if pv.has(hypercall_abi::features::FREE_REPORT) => {
                // SAFETY: the list is in the caller's identity-mapped `HintBuffers` (contract
                // of `new`), borrowed for the allocator's life; it is unregistered in `drop`.
                // Its used slots name only frames freed and not handed out again (`pop` takes
                // them out first), which the allocator owns and nothing uses (contract of
                // `free`), and `Pending` keeps every intermediate state to such frames.
                unsafe { pv.zero_free_list(slots) }
            }
            Hints::Pv(_) | Hints::None => return,
            #[cfg(test)]
            Hints::Mock(host) => host.free_list(slots),
        };
        match r {
            Ok(_) => self.free_list = true,
            Err(e) => self.hint_failed(e),
        }
    }

    /// True if the release list is registered as the guest's free list (a host with
    /// [`features::FREE_REPORT`](hypercall_abi::features::FREE_REPORT)).
    pub const fn free_list_registered(&self) -> bool {
        self.free_list
    }

    /// The registered free list as the host reads it: every slot of the release list, those
    /// past the pending ranges with `len` 0.
    pub fn free_list(&self) -> &[ZeroRange] {
        self.pending.slots()
    }

    /// Times zeroing on `tsc` ([`FrameStats::zero_ns`]).
    pub fn set_clock(&mut self, tsc: Tsc) {
        self.tsc = Some(tsc);
    }

    /// Check mode: verify that every frame served without zeroing reads as zero, and panic if
    /// not.
    pub fn set_check(&mut self, check: bool) {
        self.check = check;
    }

    /// Read ahead with `zero_hints(PREPARE)` (default: on when the host has
    /// [`features::ZERO_PREPARE`](hypercall_abi::features::ZERO_PREPARE); it cannot be turned
    /// on without).
    pub fn set_prepare(&mut self, on: bool) {
        self.prepare = on && self.prepare;
    }

    /// Release once at least `bytes` are pending (default [`RELEASE_THRESHOLD_BYTES`]; at least
    /// one page). The list is also released whenever its [`RELEASE_MAX_RANGES`] ranges are in
    /// use.
    pub fn set_release_threshold(&mut self, bytes: u64) {
        self.threshold = bytes.max(PAGE_SIZE);
    }

    /// The address of frame 0.
    pub const fn start(&self) -> u64 {
        self.start
    }

    /// The number of frames managed.
    pub const fn capacity(&self) -> u64 {
        self.frames
    }

    /// Frames handed out and not freed.
    pub const fn in_use(&self) -> u64 {
        self.bump - self.depth
    }

    /// Bytes freed but not released yet ([`Hints::Pv`]).
    pub const fn pending_bytes(&self) -> u64 {
        self.pending.bytes()
    }

    /// What the allocator did so far.
    pub fn stats(&self) -> FrameStats {
        FrameStats {
            zero_ns: self.tsc.map_or(0, |t| t.ticks_to_ns(self.zero_ticks)),
            ..self.stats
        }
    }

    /// The first query or release the host refused, if any.
    pub const fn hint_error(&self) -> Option<HypercallError> {
        self.hint_error
    }

    /// A frame that reads as zero: the most recently freed one, else the lowest never handed
    /// out. Zeroed unless known zero (check mode verifies those). With [`Hints::Pv`], the first
    /// fresh frame of each window of [`QUERY_MAX_FRAMES`] issues a query.
    pub fn alloc(&mut self) -> Result<u64, FramesError> {
        let (i, known) = if self.depth > 0 {
            let popped = self.pop();
            if self.prepare {
                self.prepare_stack();
            }
            popped
        } else if self.bump < self.frames {
            let i = self.bump;
            self.bump += 1;
            let known = self.fresh_known_zero(i).then_some(Known::Host);
            if self.prepare {
                self.prepare_fresh();
            }
            (i, known)
        } else {
            return Err(FramesError::Exhausted {
                frames: self.frames,
            });
        };
        self.set_allocated(i, true);
        let addr = self.addr(i);
        match known {
            Some(why) => {
                if self.check {
                    self.verify_zero(addr, why);
                }
                self.stats.skipped_bytes += PAGE_SIZE;
            }
            None => self.zero(addr),
        }
        self.stats.allocs += 1;
        Ok(addr)
    }

    /// Takes back the frame at `addr`. With [`Hints::Pv`] it is queued for release; once
    /// enough is pending, one `zero_hints(RELEASE)` releases the whole queue.
    ///
    /// # Safety
    /// Nothing may use the frame any more (no reference into it, no later access): the
    /// allocator zeroes it or the host discards it.
    pub unsafe fn free(&mut self, addr: u64) -> Result<(), FramesError> {
        let i = self.index_of(addr).ok_or(FramesError::NotAFrame { addr })?;
        if !self.is_allocated(i) {
            return Err(FramesError::NotAllocated { addr });
        }
        self.set_allocated(i, false);
        self.push(i as u32);
        self.stats.frees += 1;
        if self.hints.has_host() {
            self.pending.push(addr);
            if self.pending.bytes() >= self.threshold || self.pending.is_full() {
                self.release();
            }
        } else {
            self.pending_from = self.depth;
        }
        Ok(())
    }

    /// Releases whatever is pending (no hypercall if nothing is).
    pub fn flush(&mut self) {
        self.release();
    }

    /// The address of frame `i`.
    const fn addr(&self, i: u64) -> u64 {
        self.start + i * PAGE_SIZE
    }

    /// The index of the frame at `addr`, if it is one of ours.
    const fn index_of(&self, addr: u64) -> Option<u64> {
        if addr < self.start || !addr.is_multiple_of(PAGE_SIZE) {
            return None;
        }
        let i = (addr - self.start) / PAGE_SIZE;
        if i < self.frames { Some(i) } else { None }
    }

    /// Pops the free stack; a frame still queued for release leaves the queue.
    fn pop(&mut self) -> (u64, Option<Known>) {
        self.depth -= 1;
        // SAFETY: entry `depth` (< the old depth <= frames) was written by `push`; it lies in
        // the stack part of the metadata, owned by the allocator.
        let entry = unsafe { self.stack.add(self.depth as usize).read() };
        let i = u64::from(entry & !KNOWN_ZERO);
        if self.depth >= self.pending_from {
            // Entries `pending_from..` are queued in push order, so this one is the last.
            self.pending.undo(self.addr(i));
        } else {
            self.pending_from = self.depth;
        }
        let known = (entry & KNOWN_ZERO != 0).then_some(Known::Released);
        (i, known)
    }

    /// Pushes frame `i` (not known zero) on the free stack.
    fn push(&mut self, i: u32) {
        // SAFETY: `depth` < `frames` (every stacked frame is a distinct free frame, and `i` was
        // allocated until now), so the entry lies in the stack part of the metadata.
        unsafe { self.stack.add(self.depth as usize).write(i) };
        self.depth += 1;
    }

    /// True if the host says fresh frame `i` is known zero (querying when `i` leaves the
    /// current window).
    fn fresh_known_zero(&mut self, i: u64) -> bool {
        if !self.hints.has_host() {
            return false;
        }
        if !self.window.contains(i) {
            self.window = Window::at(i, self.frames);
            self.query();
        }
        self.window.is_zero(&self.bitmap[..], i)
    }

    /// Queries the current window into the bitmap; on failure the bitmap says "nothing known".
    fn query(&mut self) {
        let first = self.start / PAGE_SIZE + self.window.first;
        let count = self.window.len;
        let bitmap = &mut self.bitmap[..self.window.bitmap_bytes()];
        self.stats.query_calls += 1;
        let r = match self.hints {
            // SAFETY: `bitmap` is part of the caller's `HintBuffers`, identity-mapped by the
            // contract of `new`.
            Hints::Pv(pv) => unsafe { pv.zero_query(bitmap, first, count) },
            Hints::None => Ok(0),
            #[cfg(test)]
            Hints::Mock(host) => host.query(bitmap, first, count),
        };
        match r {
            Ok(known) => self.window_known = known,
            Err(e) => {
                self.bitmap.fill(0);
                self.window_known = 0;
                self.hint_failed(e);
            }
        }
    }

    /// Read-ahead over fresh frames: keeps [`PREPARE_AHEAD_FRAMES`] after the bump pointer
    /// prepared, inside the current query window only (a frame the host backed is no longer
    /// reported known zero, so preparing past the window would cost the next query its hints).
    fn prepare_fresh(&mut self) {
        let end = self.window.first + self.window.len;
        let from = self.bump_prepared.max(self.bump);
        if self.window_known == 0 || from >= end || from - self.bump >= PREPARE_AHEAD_FRAMES {
            return;
        }
        let to = (from + PREPARE_CHUNK_FRAMES).min(end);
        self.prepare_range(self.addr(from), (to - from) * PAGE_SIZE);
        self.bump_prepared = to;
    }

    /// Read-ahead over the free stack: keeps the [`PREPARE_AHEAD_FRAMES`] entries below the top
    /// prepared, one run of adjacent known-zero frames (up to [`PREPARE_CHUNK_FRAMES`]) per call.
    fn prepare_stack(&mut self) {
        self.stack_unprepared = self.stack_unprepared.min(self.depth);
        let top = self.stack_unprepared;
        if top == 0 || self.depth - top >= PREPARE_AHEAD_FRAMES {
            return;
        }
        // Frames `run.0..=run.1`, adjacent in either direction, like `Pending`.
        let mut run: Option<(u64, u64)> = None;
        let mut lo = top;
        while lo > 0 && top - lo < PREPARE_CHUNK_FRAMES {
            // SAFETY: entry `lo - 1` < `depth` was written by `push` and lies in the stack part
            // of the metadata.
            let entry = unsafe { self.stack.add(lo as usize - 1).read() };
            let f = u64::from(entry & !KNOWN_ZERO);
            let known = entry & KNOWN_ZERO != 0;
            run = match run {
                // Dirty frames before a run starts are skipped: they are backed already.
                None if !known => None,
                None => Some((f, f)),
                Some((a, b)) if known && f == b + 1 => Some((a, f)),
                Some((a, b)) if known && f + 1 == a => Some((f, b)),
                Some(_) => break,
            };
            lo -= 1;
        }
        self.stack_unprepared = lo;
        if let Some((a, b)) = run
            && b - a + 1 >= PREPARE_MIN_FRAMES
        {
            self.prepare_range(self.addr(a), (b - a + 1) * PAGE_SIZE);
        }
    }

    /// One `zero_hints(PREPARE)`; a refusal turns read-ahead off.
    fn prepare_range(&mut self, gpa: u64, len: u64) {
        self.stats.prepare_calls += 1;
        let r = match self.hints {
            Hints::Pv(pv) => pv.zero_prepare(gpa, len),
            Hints::None => Ok(0),
            #[cfg(test)]
            Hints::Mock(host) => host.prepare(gpa, len),
        };
        match r {
            Ok(queued) => self.stats.prepared_bytes += queued,
            Err(e) => {
                self.prepare = false;
                self.hint_failed(e);
            }
        }
    }

    /// Releases the pending queue with one call; its frames become known zero on success and
    /// stay dirty on failure.
    fn release(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        self.stats.release_calls += 1;
        let r = match self.hints {
            // SAFETY: the list is in the caller's identity-mapped `HintBuffers` (contract of
            // `new`); the ranges hold only frames freed since the last release and not
            // allocated again (`pop` takes those out), so the allocator owns them and nothing
            // uses them (contract of `free`).
            Hints::Pv(pv) => unsafe { pv.zero_release(self.pending.ranges()) },
            Hints::None => Ok(0),
            #[cfg(test)]
            Hints::Mock(host) => host.release(self.pending.ranges()),
        };
        match r {
            Ok(_) => {
                for d in self.pending_from..self.depth {
                    // SAFETY: entries below `depth` were written by `push` and lie in the stack
                    // part of the metadata.
                    unsafe {
                        let e = self.stack.add(d as usize);
                        e.write(e.read() | KNOWN_ZERO);
                    }
                }
                self.stats.released_bytes += self.pending.bytes();
                // The released frames are known zero and not backed: read ahead over them.
                self.stack_unprepared = self.depth;
            }
            Err(e) => self.hint_failed(e),
        }
        self.pending.clear();
        self.pending_from = self.depth;
    }

    fn hint_failed(&mut self, e: HypercallError) {
        self.stats.hint_errors += 1;
        self.hint_error.get_or_insert(e);
    }

    /// Zeroes the frame at `addr`, timed.
    fn zero(&mut self, addr: u64) {
        let t0 = self.tsc.map(|_| rdtsc());
        // SAFETY: `addr` is a frame of the range the allocator owns (contract of `new`), just
        // taken off the free stack or the bump pointer, so nothing else uses it.
        unsafe { page::zero_frame(addr) };
        if let Some(t0) = t0 {
            self.zero_ticks += rdtsc().wrapping_sub(t0);
        }
        self.stats.zeroed_bytes += PAGE_SIZE;
    }

    /// Check mode: panics unless the frame at `addr` reads as zero.
    fn verify_zero(&self, addr: u64, why: Known) {
        // SAFETY: as in `zero`: a frame of ours that nothing else uses.
        if let Some((offset, value)) = unsafe { page::first_nonzero(addr) } {
            panic!(
                "frames: frame {addr:#x} was served without zeroing because {}, but the u64 at \
                 offset {offset:#x} reads {value:#x}",
                why.why()
            );
        }
    }

    fn is_allocated(&self, i: u64) -> bool {
        // SAFETY: word `i / 64` < `frames.div_ceil(64)` is in the bitmap part of the metadata,
        // zeroed in `new`.
        let w = unsafe { self.allocated.add((i / 64) as usize).read() };
        w & (1 << (i % 64)) != 0
    }

    fn set_allocated(&mut self, i: u64, on: bool) {
        let bit = 1 << (i % 64);
        // SAFETY: as in `is_allocated`.
        unsafe {
            let w = self.allocated.add((i / 64) as usize);
            w.write(if on { w.read() | bit } else { w.read() & !bit });
        }
    }
}
