//! Per-device worker threads: a device's queue runs on its own host thread, so the vCPU thread
//! never waits for disk I/O.
//!
//! The worker blocks on the queue's notification [`EventFd`] — the ioeventfd KVM signals when
//! the guest writes QueueNotify — and takes control messages from a crossbeam channel. A
//! message is delivered by sending it and then signalling the same `EventFd`, so one blocking
//! `read` waits for both; the worker always drains the channel before touching the queue, so a
//! `Stop` is never delayed behind queue work it was meant to prevent. A spurious wake-up only
//! costs one look at an empty ring.
//!
//! # Bounded passes
//!
//! A handler serves at most one budget of chains per [`QueueHandler::process`] call (the queue
//! size, see [`super::pass_budget`]) and says whether work may be left ([`Pass::more`]). The
//! worker then signals its own eventfd and goes round its loop again, so it looks at its
//! control channel between every two passes: a `Stop` (reset, pause, VM shutdown) is seen
//! within one pass however the guest keeps the ring full — even a ring whose own used-ring
//! writes make more buffers available. The control channel only ever carries messages from
//! the host (one `Stop` per thread), so it does not grow with anything the guest does.

use std::io;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, TryRecvError, unbounded};
use vmm_sys_util::eventfd::EventFd;

use super::{DeviceError, Interrupt, Pass};
use crate::error::Error;
use crate::sync::lock;

/// The queue work of one device, run by a [`Worker`].
pub trait QueueHandler: Send + 'static {
    /// Processes what the driver made available, at most one budget of chains (see the module
    /// docs). Returns whether the driver wants an interrupt for the buffers just used
    /// (EVENT_IDX) and whether work may be left. An error means the ring is beyond repair: the
    /// worker sets `DEVICE_NEEDS_RESET` and stops processing until reset.
    fn process(&mut self) -> Result<Pass, DeviceError>;
}

/// Control messages for a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Stop the thread: used on device reset (the handler's backend is reused by the next
    /// activation), to pause the device, and on VM shutdown.
    Stop,
}

/// The handler and what the worker learned about its ring, shared by the thread and the
/// [`Worker`]. The thread holds the lock for the whole of each batch, so whoever takes it sees
/// the handler (and its queue positions) at a batch boundary.
#[derive(Debug)]
struct Slot<H> {
    handler: H,
    /// The ring broke: nothing is processed until the device is reset.
    broken: bool,
}

/// The thread while it runs.
#[derive(Debug)]
struct Running {
    control: Sender<Control>,
    thread: JoinHandle<()>,
}

/// A device's worker: its queue handler and, unless paused, the thread running it. Dropping it
/// stops and joins the thread.
///
/// # Quiescing
///
/// [`Worker::with_handler`] waits for the batch in flight and then looks at the handler, so
/// queue positions read through it are those of a batch boundary (every chain taken from the
/// available ring has been put in the used ring). [`Worker::pause`] goes further: it stops the
/// thread at a batch boundary and keeps the handler, so no guest memory is touched until
/// [`Worker::resume`] starts a new thread on the same handler. Notifications that arrive while
/// paused are not lost: `resume` always looks at the ring once.
#[derive(Debug)]
pub struct Worker<H> {
    name: String,
    slot: Arc<Mutex<Slot<H>>>,
    /// The queue's notification eventfd (also how a `Stop` is delivered).
    notify: EventFd,
    interrupt: Arc<Interrupt>,
    /// `None` while paused (or after the thread panicked).
    running: Option<Running>,
    /// The thread panicked: the handler's state is not to be trusted.
    lost: bool,
}

impl<H: QueueHandler> Worker<H> {
    /// Starts a thread named `name` that runs `handler` whenever `notify` is signalled and
    /// raises `interrupt` when the handler says the driver wants one.
    pub fn spawn(
        name: &str,
        handler: H,
        notify: EventFd,
        interrupt: Arc<Interrupt>,
    ) -> crate::Result<Worker<H>> {
        let mut worker = Worker {
            name: name.into(),
            slot: Arc::new(Mutex::new(Slot {
                handler,
                broken: false,
            })),
            notify,
            interrupt,
            running: None,
            lost: false,
        };
        worker.start()?;
        Ok(worker)
    }

    fn start(&mut self) -> crate::Result<()> {
        let name = &self.name;
        let io_err = |what: &str| {
            let what = format!("{what} for virtio device thread {name}");
            move |source| Error::Io { what, source }
        };
        let notify = self
            .notify
            .try_clone()
            .map_err(io_err("cannot duplicate the queue eventfd"))?;
        let (control, rx) = unbounded();
        let slot = self.slot.clone();
        let interrupt = self.interrupt.clone();
        let seccomp = crate::sandbox::inherit();
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                crate::sandbox::enter(crate::sandbox::ThreadKind::VirtioWorker, seccomp);
                run(&slot, notify, rx, interrupt)
            })
            .map_err(io_err("cannot start a thread"))?;
        self.running = Some(Running { control, thread });
        Ok(())
    }

    /// Starts the thread again after [`Worker::pause`], on the same handler, and has it look
    /// at the ring once (for what the driver queued while it was paused). Does nothing if it
    /// is running.
    pub fn resume(&mut self) -> Result<(), DeviceError> {
        if self.lost {
            return Err(DeviceError::BackendLost);
        }
        if self.running.is_none() {
            self.start()?;
            // Only fails if the counter would overflow: the thread is due to run anyway.
            let _ = self.notify.write(1);
        }
        Ok(())
    }
}

impl<H> Worker<H> {
    /// Runs `f` on the handler between two batches (waits for the batch in flight).
    pub fn with_handler<R>(&self, f: impl FnOnce(&H) -> R) -> R {
        f(&lock(&self.slot).handler)
    }

    /// Whether the thread is stopped ([`Worker::pause`]).
    pub fn is_paused(&self) -> bool {
        self.running.is_none()
    }

    /// Stops the thread at a batch boundary, keeping the handler; [`Worker::resume`] starts
    /// it again. Does nothing if it is already paused.
    pub fn pause(&mut self) {
        let Some(Running { control, thread }) = self.running.take() else {
            return;
        };
        // If the thread is gone the send fails and the join below returns at once.
        let _ = control.send(Control::Stop);
        let _ = self.notify.write(1);
        if thread.join().is_err() {
            self.lost = true;
        }
    }

    /// Stops the thread and returns its handler, or `None` if the thread panicked (a bug: the
    /// handlers never panic on guest input).
    pub fn stop(mut self) -> Option<H> {
        self.pause();
        if self.lost {
            return None;
        }
        let slot = self.slot.clone();
        // The thread is joined (its handle to the slot gone); dropping `self` drops the other.
        drop(self);
        let slot = Arc::try_unwrap(slot).ok()?;
        Some(
            slot.into_inner()
                .unwrap_or_else(PoisonError::into_inner)
                .handler,
        )
    }
}
impl<H> Drop for Worker<H> {
    fn drop(&mut self) {
        self.pause();
    }
}

/// The worker loop. Returns when told to stop or when the eventfd fails.
fn run<H: QueueHandler>(
    slot: &Mutex<Slot<H>>,
    notify: EventFd,
    control: Receiver<Control>,
    interrupt: Arc<Interrupt>,
) {
    loop {
        match notify.read() {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // An eventfd read only fails on a bad descriptor: nothing left to wait on.
            Err(_) => return,
        }
        // Every sender is held by the `Worker`; a disconnected channel means it is gone.
        match control.try_recv() {
            Ok(Control::Stop) | Err(TryRecvError::Disconnected) => return,
            Err(TryRecvError::Empty) => {}
        }
        let result = {
            let mut slot = lock(slot);
            if slot.broken {
                continue;
            }
            let result = slot.handler.process();
            slot.broken = result.is_err();
            result
        };
        match result {
            Ok(pass) => {
                if pass.interrupt {
                    interrupt.signal_used_queue();
                }
                if pass.more {
                    // Come back for the rest after looking at the control channel. Only fails
                    // if the counter would overflow, and then the next read returns at once.
                    let _ = notify.write(1);
                }
            }
            Err(_) => interrupt.signal_needs_reset(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::devices::event::EventQueue;
    use crate::test_util::wait_until;

    /// Counts calls; returns the scripted results in order, then `Ok(true)`.
    struct Script {
        calls: Arc<AtomicU32>,
        results: Vec<Result<bool, DeviceError>>,
    }

    impl QueueHandler for Script {
        fn process(&mut self) -> Result<Pass, DeviceError> {
            self.calls.fetch_add(1, Ordering::AcqRel);
            let result = if self.results.is_empty() {
                Ok(true)
            } else {
                self.results.remove(0)
            };
            result.map(|interrupt| Pass {
                interrupt,
                more: false,
            })
        }
    }

    fn script(results: Vec<Result<bool, DeviceError>>) -> (Script, Arc<AtomicU32>) {
        let calls = Arc::new(AtomicU32::new(0));
        let s = Script {
            calls: calls.clone(),
            results,
        };
        (s, calls)
    }

    #[test]
    fn notifications_run_the_handler_and_wake_the_vm() {
        let mut events = EventQueue::default();
        let waker = events.waker();
        let irq = Interrupt::new(move || waker.wake());
        let notify = EventFd::new(0).unwrap();
        let kick = notify.try_clone().unwrap();
        let (handler, calls) = script(vec![Ok(false)]);
        let worker = Worker::spawn("test-worker", handler, notify, irq.clone()).unwrap();
        // First pass: the driver did not want an interrupt.
        kick.write(1).unwrap();
        wait_until("the first pass", || calls.load(Ordering::Acquire) == 1);
        assert_eq!(irq.status(), 0);
        assert_eq!(events.drain(), 0);
        // Second pass: it did.
        kick.write(1).unwrap();
        assert_eq!(events.wait(Some(Duration::from_secs(5))).events(), 1);
        assert_eq!(irq.status(), 1, "INT_VRING");
        let handler = worker.stop().expect("the handler comes back");
        assert_eq!(handler.calls.load(Ordering::Acquire), 2);
    }

    #[test]
    fn stop_is_not_a_queue_notification() {
        let irq = Interrupt::new(|| {});
        let (handler, calls) = script(vec![]);
        let worker = Worker::spawn(
            "test-worker",
            handler,
            EventFd::new(0).unwrap(),
            irq.clone(),
        )
        .unwrap();
        assert!(worker.stop().is_some());
        assert_eq!(calls.load(Ordering::Acquire), 0);
        assert_eq!(irq.status(), 0);
    }

    #[test]
    fn a_broken_ring_sets_needs_reset_and_stops_processing() {
        let irq = Interrupt::new(|| {});
        let notify = EventFd::new(0).unwrap();
        let kick = notify.try_clone().unwrap();
        let broken = Err(DeviceError::Ring(
            virtio_queue::Error::InvalidAvailRingIndex,
        ));
        let (handler, calls) = script(vec![broken]);
        let worker = Worker::spawn("test-worker", handler, notify, irq.clone()).unwrap();
        kick.write(1).unwrap();
        wait_until("needs-reset", || irq.needs_reset());
        kick.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            calls.load(Ordering::Acquire),
            1,
            "no processing after the ring broke"
        );
        assert!(worker.stop().is_some());
    }

    #[test]
    fn a_paused_worker_touches_nothing_until_resumed() {
        let irq = Interrupt::new(|| {});
        let notify = EventFd::new(0).unwrap();
        let kick = notify.try_clone().unwrap();
        let (handler, calls) = script(vec![Ok(false), Ok(false), Ok(false)]);
        let mut worker = Worker::spawn("test-worker", handler, notify, irq.clone()).unwrap();
        kick.write(1).unwrap();
        wait_until("the first pass", || calls.load(Ordering::Acquire) == 1);
        worker.pause();
        worker.pause();
        assert!(worker.is_paused());
        kick.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(worker.with_handler(|h| h.calls.load(Ordering::Acquire)), 1);
        // Resuming looks at the ring once, whether or not a notification came meanwhile.
        worker.resume().unwrap();
        wait_until("the pass after resume", || {
            calls.load(Ordering::Acquire) == 2
        });
        worker.resume().unwrap();
        assert!(!worker.is_paused());
        assert!(worker.stop().is_some());
    }

    /// A handler whose ring never empties (every pass says more is left).
    struct Endless(Arc<AtomicU32>);

    impl QueueHandler for Endless {
        fn process(&mut self) -> Result<Pass, DeviceError> {
            self.0.fetch_add(1, Ordering::AcqRel);
            Ok(Pass {
                interrupt: false,
                more: true,
            })
        }
    }

    /// One notification keeps an endless ring going pass after pass, and a stop is still
    /// seen between two passes: the thread is joined promptly.
    #[test]
    fn endless_work_runs_in_passes_and_still_stops() {
        let calls = Arc::new(AtomicU32::new(0));
        let notify = EventFd::new(0).unwrap();
        let kick = notify.try_clone().unwrap();
        let worker = Worker::spawn(
            "test-worker",
            Endless(calls.clone()),
            notify,
            Interrupt::new(|| {}),
        )
        .unwrap();
        kick.write(1).unwrap();
        wait_until("many passes from one notification", || {
            calls.load(Ordering::Acquire) > 100
        });
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let handler = worker.stop();
            let _ = done.send(handler.is_some());
        });
        let stopped = finished.recv_timeout(Duration::from_secs(10));
        assert_eq!(stopped, Ok(true), "the worker did not stop within 10 s");
    }

    #[test]
    fn dropping_the_worker_joins_the_thread() {
        let (handler, _) = script(vec![]);
        let worker = Worker::spawn(
            "test-worker",
            handler,
            EventFd::new(0).unwrap(),
            Interrupt::new(|| {}),
        )
        .unwrap();
        drop(worker); // must not hang
    }
}
