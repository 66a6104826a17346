//! Backing guest RAM ahead of use, off the vCPU thread (`zero_hints(PREPARE)`, ABI v1.6).
//!
//! The first guest write to a frame the host has not backed stops the vCPU in a host page fault,
//! and the fault's cost is the host zeroing the page (a 2 MiB transparent huge page here). A
//! guest that is about to hand out known-zero frames says so with `PREPARE`; a [`Preparer`]
//! thread then faults them in with `MADV_POPULATE_WRITE` — which allocates zeroed pages where
//! none are and never touches a page that is already there, so whatever the guest writes
//! meanwhile is safe — while the vCPU keeps running on another core.
//!
//! Ordering with releases: [`Preparer::cancel`] (called by [`crate::memory::GuestRam::discard`]
//! before it discards) drops what is still queued of the discarded range and waits for the step
//! in flight, so memory the guest released is never backed again behind its back.
//!
//! The queue holds at most [`QUEUE_MAX`] ranges; a hint that does not fit is dropped (hints are
//! advisory: a frame reads the same prepared or not). Each range is populated from its top down,
//! in 2 MiB steps: a guest allocating upward from the bottom meets the thread in the middle
//! instead of racing it for the same pages.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use hypercall_abi::layout::PAGE_SIZE;

use crate::rusage::thread_cpu_ns;
use crate::state::StateError;
use crate::sync::{lock, wait};

/// The most ranges waiting at once.
pub const QUEUE_MAX: usize = 64;
/// Bytes populated per step (a transparent huge page).
const STEP: u64 = 2 << 20;

/// What the thread did so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrepareStats {
    /// Bytes of guest RAM the thread populated (including pages that were already backed).
    pub populated_bytes: u64,
    /// CPU time of the thread.
    pub cpu_ns: u64,
    /// Steps that failed (the kernel refused to populate; the guest faults them in itself).
    pub failed_steps: u64,
}

/// The prepare queue as data: the ranges still waiting, oldest first, as guest-physical
/// `[start, end)`. The step the thread is populating when the state is read is not in it (hints
/// are advisory: a frame reads the same prepared or not); neither are the thread's counters,
/// which measure this host's thread.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PrepareQueueState {
    /// `(start, end)` of each queued range.
    pub ranges: Vec<(u64, u64)>,
}

impl PrepareQueueState {
    /// Checks the state against guest RAM of `ram_size` bytes: at most [`QUEUE_MAX`] ranges,
    /// each non-empty, page-aligned and inside RAM.
    pub fn check(&self, ram_size: u64) -> Result<(), StateError> {
        const WHAT: &str = "prepare queue";
        if self.ranges.len() > QUEUE_MAX {
            return Err(StateError::invalid(
                WHAT,
                format!("{} ranges, at most {QUEUE_MAX}", self.ranges.len()),
            ));
        }
        for &(start, end) in &self.ranges {
            if start >= end
                || end > ram_size
                || !start.is_multiple_of(PAGE_SIZE)
                || !end.is_multiple_of(PAGE_SIZE)
            {
                return Err(StateError::invalid(
                    WHAT,
                    format!(
                        "range {start:#x}..{end:#x} is empty, not page-aligned or outside \
                         {ram_size:#x} bytes of RAM"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// A range of guest-physical addresses `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    start: u64,
    end: u64,
}

#[derive(Debug, Default)]
struct Queue {
    spans: VecDeque<Span>,
    stop: bool,
}

#[derive(Debug)]
struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    /// Held while one step is populated: [`Preparer::cancel`] takes it to wait for that step.
    busy: Mutex<()>,
    populated_bytes: AtomicU64,
    cpu_ns: AtomicU64,
    failed_steps: AtomicU64,
}

/// The preparing thread of one guest RAM mapping. Dropping it stops and joins the thread.
#[derive(Debug)]
pub struct Preparer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// True if this kernel can populate memory without writing it (`MADV_POPULATE_WRITE`, Linux
/// 5.14).
pub fn supported() -> bool {
    static SUPPORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SUPPORTED.get_or_init(|| {
        // A zero-length range at any page-aligned address validates the advice, nothing else.
        let page = std::ptr::without_provenance_mut::<libc::c_void>(4096);
        // SAFETY: a zero-length madvise touches no memory; it only checks its arguments.
        unsafe { libc::madvise(page, 0, libc::MADV_POPULATE_WRITE) == 0 }
    })
}

impl Preparer {
    /// Starts the thread for the mapping of guest RAM at host address `host_base` (guest-physical
    /// 0), `size` bytes long.
    ///
    /// # Safety
    /// `[host_base, host_base + size)` must be a private anonymous mapping that stays mapped
    /// until this `Preparer` is dropped (its drop joins the thread).
    pub unsafe fn start(host_base: usize, size: u64) -> std::io::Result<Preparer> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            busy: Mutex::new(()),
            populated_bytes: AtomicU64::new(0),
            cpu_ns: AtomicU64::new(0),
            failed_steps: AtomicU64::new(0),
        });
        let s = Arc::clone(&shared);
        let seccomp = crate::sandbox::inherit();
        let thread = std::thread::Builder::new()
            .name("pvkit-prepare".into())
            .spawn(move || {
                crate::sandbox::enter(crate::sandbox::ThreadKind::Prepare, seccomp);
                worker(&s, host_base, size)
            })?;
        Ok(Preparer {
            shared,
            thread: Some(thread),
        })
    }

    /// Queues `[gpa, gpa + len)` (the caller checked it lies inside RAM). Returns the bytes
    /// queued: `len`, or 0 if the queue is full.
    pub fn queue(&self, gpa: u64, len: u64) -> u64 {
        if len == 0 {
            return 0;
        }
        let mut q = lock(&self.shared.queue);
        if q.spans.len() >= QUEUE_MAX {
            return 0;
        }
        q.spans.push_back(Span {
            start: gpa,
            end: gpa + len,
        });
        self.shared.wake.notify_one();
        len
    }

    /// Forgets what is queued of `[gpa, gpa + len)` and waits for the step in flight, so
    /// nothing in that range is populated after this returns. Call it before discarding the
    /// range.
    pub fn cancel(&self, gpa: u64, len: u64) {
        let mut q = lock(&self.shared.queue);
        remove(&mut q, gpa, gpa.saturating_add(len));
        // The worker takes `busy` before it lets go of the queue, so a step it took out of the
        // queue before we got the lock holds `busy` until it is populated: wait for it.
        drop(lock(&self.shared.busy));
        drop(q);
    }

    /// The ranges still queued, as data.
    pub fn queued(&self) -> PrepareQueueState {
        PrepareQueueState {
            ranges: lock(&self.shared.queue)
                .spans
                .iter()
                .map(|s| (s.start, s.end))
                .collect(),
        }
    }

    /// Bytes still queued.
    pub fn queued_bytes(&self) -> u64 {
        lock(&self.shared.queue)
            .spans
            .iter()
            .map(|s| s.end - s.start)
            .sum()
    }

    /// What the thread did so far.
    pub fn stats(&self) -> PrepareStats {
        PrepareStats {
            populated_bytes: self.shared.populated_bytes.load(Ordering::Relaxed),
            cpu_ns: self.shared.cpu_ns.load(Ordering::Relaxed),
            failed_steps: self.shared.failed_steps.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Preparer {
    fn drop(&mut self) {
        {
            let mut q = lock(&self.shared.queue);
            q.stop = true;
            q.spans.clear();
        }
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Cuts `[start, end)` out of every queued range, keeping order.
fn remove(q: &mut Queue, start: u64, end: u64) {
    let spans = std::mem::take(&mut q.spans);
    for s in spans {
        if s.start < start {
            q.spans.push_back(Span {
                start: s.start,
                end: s.end.min(start),
            });
        }
        if s.end > end {
            q.spans.push_back(Span {
                start: s.start.max(end),
                end: s.end,
            });
        }
    }
}

/// Takes the next step: the top 2 MiB-aligned piece of the oldest range.
fn next_step(q: &mut Queue) -> Option<Span> {
    let front = q.spans.front_mut()?;
    let start = ((front.end - 1) / STEP * STEP).max(front.start);
    let step = Span {
        start,
        end: front.end,
    };
    front.end = start;
    if front.end == front.start {
        q.spans.pop_front();
    }
    Some(step)
}

fn worker(shared: &Shared, host_base: usize, size: u64) {
    let cpu0 = thread_cpu_ns();
    loop {
        let (step, busy) = {
            let mut q = lock(&shared.queue);
            loop {
                if q.stop {
                    return;
                }
                if let Some(step) = next_step(&mut q) {
                    // Taken while the queue is locked: `cancel` cannot slip in between.
                    break (step, lock(&shared.busy));
                }
                q = wait(&shared.wake, q);
            }
        };
        let ok = step.end <= size && {
            let addr = host_base + step.start as usize;
            let len = (step.end - step.start) as usize;
            // SAFETY: `[addr, addr + len)` lies inside the guest RAM mapping (`step.end <= size`,
            // the caller of `start` keeps it mapped while this thread runs). MADV_POPULATE_WRITE
            // faults in zeroed pages where there are none and leaves present pages — and so
            // whatever the guest wrote — untouched; no Rust reference into guest RAM exists.
            unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_POPULATE_WRITE) == 0 }
        };
        drop(busy);
        if ok {
            shared
                .populated_bytes
                .fetch_add(step.end - step.start, Ordering::Relaxed);
        } else {
            shared.failed_steps.fetch_add(1, Ordering::Relaxed);
        }
        shared
            .cpu_ns
            .store(thread_cpu_ns().saturating_sub(cpu0), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spans(q: &Queue) -> Vec<(u64, u64)> {
        q.spans.iter().map(|s| (s.start, s.end)).collect()
    }

    #[test]
    fn steps_go_top_down_in_huge_pages() {
        let mut q = Queue::default();
        q.spans.push_back(Span {
            start: 0x1000,
            end: 0x50_0000,
        });
        q.spans.push_back(Span {
            start: 0x80_0000,
            end: 0x80_1000,
        });
        let mut got = Vec::new();
        while let Some(s) = next_step(&mut q) {
            got.push((s.start, s.end));
        }
        assert_eq!(
            got,
            [
                (0x40_0000, 0x50_0000),
                (0x20_0000, 0x40_0000),
                (0x1000, 0x20_0000),
                (0x80_0000, 0x80_1000)
            ]
        );
        assert!(spans(&q).is_empty());
    }

    #[test]
    fn removing_a_range_keeps_what_lies_outside_it() {
        let mut q = Queue::default();
        for (start, end) in [
            (0x10_0000, 0x50_0000),
            (0x60_0000, 0x70_0000),
            (0x80_0000, 0x90_0000),
        ] {
            q.spans.push_back(Span { start, end });
        }
        remove(&mut q, 0x20_0000, 0x30_0000);
        remove(&mut q, 0x5f_0000, 0x71_0000);
        remove(&mut q, 0x8f_f000, u64::MAX);
        assert_eq!(
            spans(&q),
            [
                (0x10_0000, 0x20_0000),
                (0x30_0000, 0x50_0000),
                (0x80_0000, 0x8f_f000)
            ]
        );
        remove(&mut q, 0, u64::MAX);
        assert!(spans(&q).is_empty());
    }

    #[test]
    fn queue_states_are_checked_against_ram() {
        let ok = PrepareQueueState {
            ranges: vec![(0, 0x1000), (0x20_0000, 0x100_0000)],
        };
        ok.check(16 << 20).unwrap();
        let json = serde_json::to_string(&ok).unwrap();
        assert_eq!(
            serde_json::from_str::<PrepareQueueState>(&json).unwrap(),
            ok
        );
        for bad in [
            vec![(0x1000, 0x1000)],
            vec![(0x2000, 0x1000)],
            vec![(0x800, 0x1000)],
            vec![(0, 0x1800)],
            vec![(0xff_f000, 0x100_1000)],
            vec![(u64::MAX - 0xfff, u64::MAX)],
            vec![(0, 0x1000); QUEUE_MAX + 1],
        ] {
            let state = PrepareQueueState { ranges: bad };
            assert!(
                matches!(state.check(16 << 20), Err(StateError::Invalid { .. })),
                "{state:?}"
            );
        }
    }
}
