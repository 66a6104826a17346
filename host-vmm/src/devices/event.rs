//! Guest events: the per-VM queue that wakes a parked `idle_yield` (or raises `EVENT_VECTOR`
//! for a halted guest), and the event device, a stand-in for a device completion that fires
//! on a host thread after a guest-chosen delay.
//!
//! Any host thread (a device's queue thread, a test) can wake the guest through a [`Waker`].
//! Events stay queued until the vCPU consumes them, so a wake-up that races with the guest's
//! decision to idle is never lost.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, unbounded};

/// The VM's pending-event queue (consumed by the vCPU thread).
#[derive(Debug)]
pub struct EventQueue {
    tx: Sender<()>,
    rx: Receiver<()>,
    delivered: u64,
}

/// Wakes the VM from any thread.
#[derive(Debug, Clone)]
pub struct Waker(Sender<()>);

impl Waker {
    /// Queues one event for the guest.
    pub fn wake(&self) {
        // The queue lives as long as the VM; after that there is nobody to wake.
        let _ = self.0.send(());
    }
}

impl Default for EventQueue {
    fn default() -> Self {
        let (tx, rx) = unbounded();
        EventQueue {
            tx,
            rx,
            delivered: 0,
        }
    }
}

impl EventQueue {
    /// A handle other threads use to wake the guest.
    pub fn waker(&self) -> Waker {
        Waker(self.tx.clone())
    }

    /// Consumes every pending event; returns how many.
    pub fn drain(&mut self) -> u64 {
        let n = self.rx.try_iter().count() as u64;
        self.delivered += n;
        n
    }

    /// Blocks until at least one event is pending or `timeout` passes (`None`: no timeout);
    /// consumes the pending events and returns how many (0 on timeout).
    pub fn wait(&mut self, timeout: Option<Duration>) -> u64 {
        let first = match timeout {
            Some(t) => self
                .rx
                .recv_timeout(t)
                .map_err(|e| e == RecvTimeoutError::Disconnected),
            None => self.rx.recv().map_err(|_| true),
        };
        match first {
            Ok(()) => {
                self.delivered += 1;
                1 + self.drain()
            }
            // We hold a sender ourselves, so the channel never disconnects.
            Err(_) => 0,
        }
    }

    /// Events consumed so far.
    pub fn delivered(&self) -> u64 {
        self.delivered
    }
}

/// The event device: schedules wake-ups on a host thread.
#[derive(Debug)]
pub struct EventDevice {
    waker: Waker,
    requests: Option<Sender<Duration>>,
    thread: Option<JoinHandle<()>>,
    scheduled: u64,
    fired: Arc<AtomicU64>,
}

impl EventDevice {
    /// A device that wakes through `waker`. Its thread starts on first use.
    pub fn new(waker: Waker) -> EventDevice {
        EventDevice {
            waker,
            requests: None,
            thread: None,
            scheduled: 0,
            fired: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Schedules one event `delay` from now.
    pub fn schedule(&mut self, delay: Duration) {
        if self.requests.is_none() {
            let (tx, rx) = unbounded();
            let waker = self.waker.clone();
            let fired = self.fired.clone();
            let spawned = std::thread::Builder::new()
                .name("pvkit-event-dev".into())
                .spawn(move || scheduler(rx, waker, fired));
            // Without a thread the device cannot fire; the guest then sees no completion,
            // which it must handle anyway (a device may be slow). Nothing to do here.
            if let Ok(handle) = spawned {
                self.thread = Some(handle);
                self.requests = Some(tx);
            }
        }
        if let Some(tx) = &self.requests
            && tx.send(delay).is_ok()
        {
            self.scheduled += 1;
        }
    }

    /// Events scheduled but not yet fired.
    pub fn outstanding(&self) -> u64 {
        self.scheduled
            .saturating_sub(self.fired.load(Ordering::Acquire))
    }
}

impl Drop for EventDevice {
    fn drop(&mut self) {
        self.requests = None; // disconnects the thread's channel: it exits
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn scheduler(requests: Receiver<Duration>, waker: Waker, fired: Arc<AtomicU64>) {
    let mut due: BinaryHeap<Reverse<Instant>> = BinaryHeap::new();
    loop {
        let next = due
            .peek()
            .map(|Reverse(t)| t.saturating_duration_since(Instant::now()));
        let request = match next {
            None => requests.recv().map_err(|_| ()),
            Some(t) => match requests.recv_timeout(t) {
                Ok(d) => Ok(d),
                Err(RecvTimeoutError::Timeout) => Ok(Duration::MAX),
                Err(RecvTimeoutError::Disconnected) => Err(()),
            },
        };
        match request {
            Err(()) => return,
            Ok(Duration::MAX) => {}
            Ok(d) => due.push(Reverse(Instant::now() + d)),
        }
        let now = Instant::now();
        while due.peek().is_some_and(|Reverse(t)| *t <= now) {
            due.pop();
            fired.fetch_add(1, Ordering::AcqRel);
            waker.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queued_events_are_never_lost() {
        let mut q = EventQueue::default();
        let w = q.waker();
        w.wake();
        w.wake();
        // The events arrived before anyone waited: the wait returns at once.
        assert_eq!(q.wait(Some(Duration::from_secs(5))), 2);
        assert_eq!(q.wait(Some(Duration::from_millis(1))), 0);
        assert_eq!(q.delivered(), 2);
    }

    #[test]
    fn the_device_fires_after_its_delay() {
        let mut q = EventQueue::default();
        let mut dev = EventDevice::new(q.waker());
        let t0 = Instant::now();
        dev.schedule(Duration::from_millis(20));
        dev.schedule(Duration::from_millis(5));
        assert_eq!(dev.outstanding(), 2);
        let mut got = q.wait(Some(Duration::from_secs(5)));
        got += q.wait(Some(Duration::from_secs(5)));
        assert_eq!(got, 2);
        assert!(t0.elapsed() >= Duration::from_millis(20));
        assert_eq!(dev.outstanding(), 0);
        drop(dev); // joins the thread
    }
}
