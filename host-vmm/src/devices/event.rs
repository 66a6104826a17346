//! Guest events: the per-VM queue that wakes a parked `idle_yield` (or raises `EVENT_VECTOR`
//! for a halted guest), and the event device, a stand-in for a device completion that fires
//! on a host thread after a guest-chosen delay.
//!
//! Any host thread (a device's queue thread, a test) can wake the guest through a [`Waker`].
//! Events stay queued until the vCPU consumes them, so a wake-up that races with the guest's
//! decision to idle is never lost. A control thread that needs the vCPU back (stop, pause)
//! ends a wait without an event through an [`Interrupter`] ([`Woken::Interrupted`]); the wait
//! goes on after the pause, so the guest sees neither an early return nor an event that did
//! not happen.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, select, unbounded};
use hypercall_abi::idle::EVENT_MAX_DELAY_US;

use crate::bus::{BusAction, BusDevice};
use crate::devices::debug::{le_u32, put_le_u32};
use crate::state::{Persist, StateError};
use crate::sync::lock;

/// The most events a saved state may hold pending (far more than any guest can have queued
/// and not consumed).
pub const STATE_EVENTS_MAX: u64 = 1 << 20;

/// The most events the event device holds scheduled and not yet fired. A write beyond it is
/// dropped (counted as the event `event_dropped`): a flood of writes costs the host at most
/// this many deadlines (16 bytes each), never growth.
pub const EVENT_OUTSTANDING_MAX: usize = 1024;

/// How a wait on the [`EventQueue`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Woken {
    /// This many events were pending (all consumed).
    Events(u64),
    /// The timeout passed with no event.
    Timeout,
    /// An [`Interrupter`] ended the wait (a stop or pause request): nothing happened for the
    /// guest, and what waited is not done.
    Interrupted,
}

impl Woken {
    /// The events consumed (0 for a timeout or an interrupt).
    pub fn events(self) -> u64 {
        match self {
            Woken::Events(n) => n,
            Woken::Timeout | Woken::Interrupted => 0,
        }
    }
}

/// The VM's pending-event queue (consumed by the vCPU thread).
#[derive(Debug)]
pub struct EventQueue {
    tx: Sender<()>,
    rx: Receiver<()>,
    interrupt_tx: Sender<()>,
    interrupt_rx: Receiver<()>,
    delivered: Arc<AtomicU64>,
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

/// Ends the vCPU's current (or next) wait on the queue without an event.
#[derive(Debug, Clone)]
pub struct Interrupter(Sender<()>);

impl Interrupter {
    /// Ends the wait.
    pub fn interrupt(&self) {
        let _ = self.0.send(());
    }
}

impl Default for EventQueue {
    fn default() -> Self {
        let (tx, rx) = unbounded();
        let (interrupt_tx, interrupt_rx) = unbounded();
        EventQueue {
            tx,
            rx,
            interrupt_tx,
            interrupt_rx,
            delivered: Arc::default(),
        }
    }
}

impl EventQueue {
    /// A handle other threads use to wake the guest.
    pub fn waker(&self) -> Waker {
        Waker(self.tx.clone())
    }

    /// A handle control threads use to end a wait without an event.
    pub fn interrupter(&self) -> Interrupter {
        Interrupter(self.interrupt_tx.clone())
    }

    /// Forgets interrupts that arrived while nobody waited (called when the vCPU has come
    /// back for the reason they were sent).
    pub fn clear_interrupts(&self) {
        while self.interrupt_rx.try_recv().is_ok() {}
    }

    /// Consumes every pending event; returns how many.
    pub fn drain(&mut self) -> u64 {
        let n = self.rx.try_iter().count() as u64;
        self.delivered.fetch_add(n, Ordering::Relaxed);
        n
    }

    /// Blocks until at least one event is pending, `timeout` passes (`None`: no timeout) or
    /// an [`Interrupter`] ends the wait; consumes the pending events and says which.
    pub fn wait(&mut self, timeout: Option<Duration>) -> Woken {
        let pending = self.drain();
        if pending > 0 {
            return Woken::Events(pending);
        }
        // A never-firing timer when there is no timeout.
        let deadline = match timeout {
            Some(t) => crossbeam_channel::after(t),
            None => crossbeam_channel::never(),
        };
        select! {
            recv(self.rx) -> got => match got {
                Ok(()) => {
                    self.delivered.fetch_add(1, Ordering::Relaxed);
                    Woken::Events(1 + self.drain())
                }
                // We hold a sender ourselves, so the channel never disconnects.
                Err(_) => Woken::Timeout,
            },
            recv(self.interrupt_rx) -> _ => Woken::Interrupted,
            recv(deadline) -> _ => Woken::Timeout,
        }
    }

    /// Events consumed so far.
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }

    /// Events queued and not consumed yet.
    pub fn pending(&self) -> u64 {
        self.rx.len() as u64
    }
}

/// [`EventQueue`] state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EventQueueState {
    /// Events consumed so far (what the event port reads back).
    pub delivered: u64,
    /// Events queued and not consumed yet.
    pub pending: u64,
}

impl Persist for EventQueue {
    type State = EventQueueState;

    fn save(&self) -> EventQueueState {
        EventQueueState {
            delivered: self.delivered(),
            pending: self.pending(),
        }
    }

    fn restore(&mut self, state: &EventQueueState) -> Result<(), StateError> {
        if state.pending > STATE_EVENTS_MAX {
            return Err(StateError::invalid(
                "event queue",
                format!(
                    "{} pending events (at most {STATE_EVENTS_MAX})",
                    state.pending
                ),
            ));
        }
        while self.rx.try_recv().is_ok() {}
        for _ in 0..state.pending {
            let _ = self.tx.send(());
        }
        self.delivered.store(state.delivered, Ordering::Relaxed);
        Ok(())
    }
}

/// The event device (`EVENT_PORT`): a write schedules one event that many microseconds from
/// now (capped at [`EVENT_MAX_DELAY_US`]); a read returns the number of events delivered so
/// far (low 32 bits). The events fire on a host thread, started on first use.
#[derive(Debug)]
pub struct EventDevice {
    waker: Waker,
    delivered: Arc<AtomicU64>,
    /// Deadlines not fired yet, shared with the thread (which pops them as they fire).
    due: Arc<Mutex<BinaryHeap<Reverse<Instant>>>>,
    /// Wakes the thread when a deadline is added; dropping it ends the thread.
    requests: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl EventDevice {
    /// A device that wakes `queue`'s guest. Its thread starts on first use.
    pub fn new(queue: &EventQueue) -> EventDevice {
        EventDevice {
            waker: queue.waker(),
            delivered: queue.delivered.clone(),
            due: Arc::default(),
            requests: None,
            thread: None,
        }
    }

    /// Schedules one event `delay` from now. Returns false (and schedules nothing) if
    /// [`EVENT_OUTSTANDING_MAX`] events are already scheduled.
    pub fn schedule(&mut self, delay: Duration) -> bool {
        self.schedule_at(Instant::now() + delay)
    }

    fn schedule_at(&mut self, at: Instant) -> bool {
        if self.outstanding() >= EVENT_OUTSTANDING_MAX as u64 {
            return false;
        }
        if self.requests.is_none() {
            let (tx, rx) = unbounded();
            let waker = self.waker.clone();
            let due = self.due.clone();
            let seccomp = crate::sandbox::inherit();
            let spawned = std::thread::Builder::new()
                .name("pvkit-event-dev".into())
                .spawn(move || {
                    crate::sandbox::enter(crate::sandbox::ThreadKind::EventDevice, seccomp);
                    scheduler(rx, waker, due)
                });
            // Without a thread the device cannot fire; the guest then sees no completion,
            // which it must handle anyway (a device may be slow). Nothing to do here.
            match spawned {
                Ok(handle) => {
                    self.thread = Some(handle);
                    self.requests = Some(tx);
                }
                Err(_) => return false,
            }
        }
        lock(&self.due).push(Reverse(at));
        if let Some(tx) = &self.requests {
            let _ = tx.send(());
        }
        true
    }

    /// Events scheduled but not yet fired.
    pub fn outstanding(&self) -> u64 {
        lock(&self.due).len() as u64
    }
}

impl BusDevice for EventDevice {
    fn name(&self) -> &'static str {
        "event"
    }

    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        put_le_u32(data, self.delivered.load(Ordering::Relaxed) as u32);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) -> BusAction {
        let us = le_u32(data).min(EVENT_MAX_DELAY_US);
        if self.schedule(Duration::from_micros(u64::from(us))) {
            BusAction::Continue
        } else {
            BusAction::Counted("event_dropped")
        }
    }
}

/// [`EventDevice`] state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EventDeviceState {
    /// Time left until each scheduled event fires, in nanoseconds, soonest first.
    pub due_in_ns: Vec<u64>,
}

impl Persist for EventDevice {
    type State = EventDeviceState;

    fn save(&self) -> EventDeviceState {
        let now = Instant::now();
        let mut due_in_ns: Vec<u64> = lock(&self.due)
            .iter()
            .map(|Reverse(t)| t.saturating_duration_since(now).as_nanos() as u64)
            .collect();
        due_in_ns.sort_unstable();
        EventDeviceState { due_in_ns }
    }

    fn restore(&mut self, state: &EventDeviceState) -> Result<(), StateError> {
        let max_ns = u64::from(EVENT_MAX_DELAY_US) * 1000;
        if state.due_in_ns.len() > EVENT_OUTSTANDING_MAX {
            return Err(StateError::invalid(
                "event device",
                format!(
                    "{} scheduled events (at most {EVENT_OUTSTANDING_MAX})",
                    state.due_in_ns.len()
                ),
            ));
        }
        if let Some(bad) = state.due_in_ns.iter().find(|&&ns| ns > max_ns) {
            return Err(StateError::invalid(
                "event device",
                format!("an event due in {bad} ns (at most {max_ns})"),
            ));
        }
        lock(&self.due).clear();
        let now = Instant::now();
        for &ns in &state.due_in_ns {
            self.schedule_at(now + Duration::from_nanos(ns));
        }
        Ok(())
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

fn scheduler(requests: Receiver<()>, waker: Waker, due: Arc<Mutex<BinaryHeap<Reverse<Instant>>>>) {
    loop {
        let next = lock(&due).peek().map(|Reverse(t)| *t);
        let timer = match next {
            Some(t) => crossbeam_channel::at(t),
            None => crossbeam_channel::never(),
        };
        select! {
            recv(requests) -> r => if r.is_err() { return },
            recv(timer) -> _ => {},
        }
        let now = Instant::now();
        let mut due = lock(&due);
        while due.peek().is_some_and(|Reverse(t)| *t <= now) {
            due.pop();
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
        assert_eq!(q.wait(Some(Duration::from_secs(5))), Woken::Events(2));
        assert_eq!(q.wait(Some(Duration::from_millis(1))), Woken::Timeout);
        assert_eq!(q.delivered(), 2);
    }

    #[test]
    fn an_interrupt_ends_a_wait_without_an_event() {
        let mut q = EventQueue::default();
        let i = q.interrupter();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(10));
            i.interrupt();
        });
        assert_eq!(q.wait(None), Woken::Interrupted);
        t.join().unwrap();
        assert_eq!(q.delivered(), 0);
        q.interrupter().interrupt();
        q.clear_interrupts();
        assert_eq!(q.wait(Some(Duration::from_millis(5))), Woken::Timeout);
    }

    #[test]
    fn the_device_fires_after_its_delay() {
        let mut q = EventQueue::default();
        let mut dev = EventDevice::new(&q);
        let t0 = Instant::now();
        dev.schedule(Duration::from_millis(20));
        dev.schedule(Duration::from_millis(5));
        assert_eq!(dev.outstanding(), 2);
        let mut got = q.wait(Some(Duration::from_secs(5))).events();
        got += q.wait(Some(Duration::from_secs(5))).events();
        assert_eq!(got, 2);
        assert!(t0.elapsed() >= Duration::from_millis(20));
        assert_eq!(dev.outstanding(), 0);
        let mut d = [0u8; 4];
        dev.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 2, "the port reads events delivered");
        drop(dev); // joins the thread
    }

    #[test]
    fn a_flood_of_schedules_is_bounded() {
        let q = EventQueue::default();
        let mut dev = EventDevice::new(&q);
        let ten_s = (EVENT_MAX_DELAY_US).to_le_bytes();
        for _ in 0..EVENT_OUTSTANDING_MAX {
            assert_eq!(dev.write(0, &ten_s), BusAction::Continue);
        }
        for _ in 0..10_000 {
            assert_eq!(dev.write(0, &ten_s), BusAction::Counted("event_dropped"));
        }
        assert_eq!(dev.outstanding(), EVENT_OUTSTANDING_MAX as u64);
        let too_many = EventDeviceState {
            due_in_ns: vec![0; EVENT_OUTSTANDING_MAX + 1],
        };
        assert!(dev.restore(&too_many).is_err());
    }

    #[test]
    fn queue_and_device_state_round_trip() {
        let mut q = EventQueue::default();
        q.waker().wake();
        q.drain();
        q.waker().wake();
        q.waker().wake();
        let mut fresh = EventQueue::default();
        crate::state::assert_round_trip(&q, &mut fresh);
        assert_eq!((fresh.delivered(), fresh.pending()), (1, 2));
        assert!(
            fresh
                .restore(&EventQueueState {
                    delivered: 0,
                    pending: u64::MAX
                })
                .is_err()
        );

        let mut dev = EventDevice::new(&q);
        dev.schedule(Duration::from_secs(1));
        let saved = dev.save();
        assert_eq!(saved.due_in_ns.len(), 1);
        assert!(saved.due_in_ns[0] <= 1_000_000_000);
        let mut fresh_q = EventQueue::default();
        let mut fresh = EventDevice::new(&fresh_q);
        fresh.restore(&saved).unwrap();
        assert_eq!(fresh.outstanding(), 1);
        assert!(
            fresh
                .restore(&EventDeviceState {
                    due_in_ns: vec![u64::MAX]
                })
                .is_err()
        );
        assert_eq!(fresh.outstanding(), 1, "a refused state changes nothing");
        // Restored deadlines fire.
        fresh
            .restore(&EventDeviceState {
                due_in_ns: vec![1_000],
            })
            .unwrap();
        assert_eq!(fresh_q.wait(Some(Duration::from_secs(5))), Woken::Events(1));
    }
}
