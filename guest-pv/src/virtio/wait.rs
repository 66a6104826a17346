//! Waiting for completions: [`Waiter`] and its [`WaitPolicy`].

use core::sync::atomic::{Ordering, fence};

use hypercall_abi::idle::EVENT_VECTOR;
use virtio_drivers::Hal;
use virtio_drivers::device::blk::VirtIOBlk;
use virtio_drivers::transport::{InterruptStatus, Transport};

use super::VirtioError;
use crate::Pvkit;
use crate::cpu;
use crate::idle::{PollWindow, Wake};
use crate::tsc::{Tsc, rdtsc};

/// `idle_yield` returns [`Wake::Capped`] after a second; this many in a row without a completion
/// is a stalled device ([`VirtioError::Stalled`]).
pub const STALL_SECONDS: u64 = 10;

/// How a driver waits for the device (see [`Waiter`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitPolicy {
    /// Spin on the used ring.
    Poll,
    /// Park in [`Pvkit::idle_yield`] until the device's event.
    PvWait(Pvkit),
    /// Poll the used ring for an adaptive window, then park in [`Pvkit::idle_yield`] (see
    /// [`Adaptive`]).
    Adaptive(Adaptive),
    /// `sti; hlt` until [`EVENT_VECTOR`] is taken.
    Interrupt,
}

/// The adaptive PV wait: poll for up to a [`PollWindow`], then park in [`Pvkit::idle_yield`].
/// The window never exceeds `wake_cost_ns`, what a park costs the guest
/// ([`PvIdle::measure_wake_cost`](crate::idle::PvIdle::measure_wake_cost), measured where the
/// waits will run), and adapts per [`Waiter`] to how long its parks turn out to be: a device
/// that completes sooner than a park would return gets polled, one that takes longer gets
/// parked for at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Adaptive {
    /// The hypercalls.
    pub pv: Pvkit,
    /// The clock the window is timed on.
    pub tsc: Tsc,
    /// The most the window grows to.
    pub wake_cost_ns: u64,
}

impl WaitPolicy {
    /// The policy names, as the demo kernel's `wait` argument spells them.
    pub const NAMES: [&'static str; 4] = ["poll", "pv", "adaptive", "irq"];

    /// `poll`, `pv`, `adaptive` or `irq`.
    pub const fn name(&self) -> &'static str {
        match self {
            WaitPolicy::Poll => "poll",
            WaitPolicy::PvWait(_) => "pv",
            WaitPolicy::Adaptive(_) => "adaptive",
            WaitPolicy::Interrupt => "irq",
        }
    }
}

/// When the waiter acknowledges InterruptStatus (see
/// [`Waiter`](Waiter#acknowledging-interruptstatus)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    /// Only when [`Waiter::ack`] is called (and an event was consumed since the last one).
    Deferred,
    /// After every wait that consumed an event.
    EachWake,
}

impl Ack {
    /// `end` or `wake` (the demo kernel's `ack` argument).
    pub const fn name(self) -> &'static str {
        match self {
            Ack::Deferred => "end",
            Ack::EachWake => "wake",
        }
    }
}

/// What a waiter can ask of a device.
pub trait Completions {
    /// True if the device has put a buffer in the used ring that the driver has not taken yet
    /// (a memory read: no exit).
    fn has_used(&mut self) -> bool;

    /// Reads InterruptStatus and acknowledges the bits it had set (MMIO: two exits, one if
    /// nothing was set).
    fn ack_interrupt(&mut self) -> InterruptStatus;
}

impl<H: Hal, T: Transport> Completions for VirtIOBlk<H, T> {
    fn has_used(&mut self) -> bool {
        self.peek_used().is_some()
    }

    fn ack_interrupt(&mut self) -> InterruptStatus {
        VirtIOBlk::ack_interrupt(self)
    }
}

/// What a [`Waiter`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WaitStats {
    /// [`Waiter::wait`] calls.
    pub waits: u64,
    /// Waits whose first look found a completion (no park at all).
    pub ready: u64,
    /// `idle_yield` calls ([`WaitPolicy::PvWait`], [`WaitPolicy::Adaptive`]) or `hlt`s
    /// ([`WaitPolicy::Interrupt`]).
    pub parks: u64,
    /// Waits an [`WaitPolicy::Adaptive`] poll window ended (no park).
    pub polled: u64,
    /// Events consumed by `idle_yield`, or [`EVENT_VECTOR`] interrupts taken.
    pub events: u64,
    /// InterruptStatus acknowledgements (reads plus writes).
    pub acks: u64,
}

/// Waits for a virtio device to complete requests with one of three policies
/// ([`WaitPolicy`]) — the completion paths of [`hypercall_abi::virtio`]:
///
/// | policy | how the guest waits | exits per wait (depth 1) | needs |
/// |---|---|---|---|
/// | [`Poll`](WaitPolicy::Poll) | reads the used ring until the device has put a buffer there | 0: the vCPU spins in the guest | nothing |
/// | [`PvWait`](WaitPolicy::PvWait) | [`Pvkit::idle_yield`] with no deadline until the device's event wakes it | 1 (the hypercall) | a pvkit host with [`features::IDLE_YIELD`](hypercall_abi::features::IDLE_YIELD) |
/// | [`Adaptive`](WaitPolicy::Adaptive) | polls for an adaptive window ([`PollWindow`]), then as `PvWait` | 0 if the poll sees it, else 1 | as `PvWait`, and the TSC clock |
/// | [`Interrupt`](WaitPolicy::Interrupt) | `sti; hlt` ([`cpu::wait_for_interrupt`]) until [`EVENT_VECTOR`] is taken | 1 (the `hlt`) | [`cpu::init`]; at CPL 3 each wait is also a kernel-service round trip |
///
/// Every policy looks at the used ring first (no exit) and parks only if nothing is there, so a
/// completion that is already in costs nothing. Before that look a full fence orders the
/// driver's last `used_event` store before the used-ring load, so a completion can never slip
/// between the look and the park unannounced: either the look sees it, or the device sees the
/// new `used_event` and raises an event, which is queued until consumed (`idle_yield` returns
/// at once; a pending interrupt ends the `hlt` at once).
///
/// # Acknowledging InterruptStatus
/// The device also sets the transport's InterruptStatus bit on each notification. Reading and
/// acknowledging it costs two MMIO exits (~124 µs at CPL 3 on pvkit's KVM), more than the wait
/// itself, and pvkit queues the event whatever the bit says (it is no level-triggered line that
/// would fire again). So by default ([`Ack::Deferred`]) the waiter only remembers that an event
/// was consumed and acknowledges once, when the caller calls [`Waiter::ack`] (e.g. after a
/// batch of requests); [`Ack::EachWake`] acknowledges after every wake-up, as an interrupt
/// handler does. [`Poll`](WaitPolicy::Poll) consumes no event and never acknowledges.
///
/// It keeps count of what it did ([`Waiter::stats`]).
#[derive(Debug, Clone, Copy)]
pub struct Waiter {
    policy: WaitPolicy,
    ack: Ack,
    /// An event was consumed since the last acknowledgement.
    unacked: bool,
    /// [`WaitPolicy::Adaptive`]'s window (closed for the other policies).
    window: PollWindow,
    stats: WaitStats,
}

impl Waiter {
    /// A waiter with `policy`, acknowledging [`Ack::Deferred`].
    pub const fn new(policy: WaitPolicy) -> Waiter {
        Waiter {
            policy,
            ack: Ack::Deferred,
            unacked: false,
            window: PollWindow::new(match policy {
                WaitPolicy::Adaptive(a) => a.wake_cost_ns,
                _ => 0,
            }),
            stats: WaitStats {
                waits: 0,
                ready: 0,
                parks: 0,
                polled: 0,
                events: 0,
                acks: 0,
            },
        }
    }

    /// The same waiter acknowledging per `ack`.
    pub const fn with_ack(mut self, ack: Ack) -> Waiter {
        self.ack = ack;
        self
    }

    /// Its policy.
    pub const fn policy(&self) -> WaitPolicy {
        self.policy
    }

    /// When it acknowledges.
    pub const fn ack_mode(&self) -> Ack {
        self.ack
    }

    /// What it did so far.
    pub const fn stats(&self) -> WaitStats {
        self.stats
    }

    /// The adaptive poll window as it stands ([`WaitPolicy::Adaptive`]; closed otherwise).
    pub const fn poll_window(&self) -> PollWindow {
        self.window
    }

    /// Returns once `dev` has a completion in its used ring ([`Completions::has_used`]).
    ///
    /// [`WaitPolicy::Interrupt`] needs [`cpu::init`] (it panics before) and a host that
    /// delivers the device's events as [`EVENT_VECTOR`].
    ///
    /// Fails if `idle_yield` fails ([`VirtioError::Hypercall`]) or parks [`STALL_SECONDS`]
    /// seconds in a row without a completion ([`VirtioError::Stalled`]).
    pub fn wait(&mut self, dev: &mut impl Completions) -> Result<(), VirtioError> {
        self.stats.waits += 1;
        // The first look: enough for polling, and for the others a completion already in.
        fence(Ordering::SeqCst);
        if dev.has_used() {
            self.stats.ready += 1;
            return Ok(());
        }
        let woke = match self.policy {
            WaitPolicy::Poll => {
                // No `pause`: under KVM a pause loop can exit to the host (pause-loop exiting).
                while !dev.has_used() {}
                false
            }
            WaitPolicy::PvWait(pv) => self.park_pv(pv, dev)?,
            WaitPolicy::Adaptive(a) => {
                // Raw TSC ticks in the loop: no conversion per look.
                let polled_until = rdtsc().saturating_add(a.tsc.ns_to_ticks(self.window.ns()));
                loop {
                    if dev.has_used() {
                        self.stats.polled += 1;
                        self.window.polled();
                        return Ok(());
                    }
                    if rdtsc() >= polled_until {
                        break;
                    }
                }
                let woke = self.park_pv(a.pv, dev)?;
                let blocked = a.tsc.ticks_to_ns(rdtsc().saturating_sub(polled_until));
                self.window.parked(blocked);
                woke
            }
            WaitPolicy::Interrupt => self.park_hlt(dev),
        };
        if woke {
            self.unacked = true;
            if self.ack == Ack::EachWake {
                self.ack(dev);
            }
        }
        Ok(())
    }

    /// `idle_yield` until `dev` has a completion; true if an event was consumed.
    fn park_pv(&mut self, pv: Pvkit, dev: &mut impl Completions) -> Result<bool, VirtioError> {
        let mut woke = false;
        let mut capped = 0;
        loop {
            self.stats.parks += 1;
            // No deadline: the host parks at most a second per call (`Wake::Capped`).
            match pv.idle_yield(u64::MAX).map_err(VirtioError::Hypercall)? {
                Wake::Event(n) => {
                    self.stats.events += n;
                    woke = true;
                    capped = 0;
                }
                Wake::Capped => {
                    capped += 1;
                    if capped >= STALL_SECONDS {
                        return Err(VirtioError::Stalled {
                            seconds: STALL_SECONDS,
                        });
                    }
                }
                Wake::Deadline | Wake::Unknown(_) => {}
            }
            fence(Ordering::SeqCst);
            if dev.has_used() {
                return Ok(woke);
            }
        }
    }

    /// `sti; hlt` until `dev` has a completion; true if an [`EVENT_VECTOR`] interrupt was taken.
    fn park_hlt(&mut self, dev: &mut impl Completions) -> bool {
        let before = cpu::interrupt_count(EVENT_VECTOR);
        loop {
            self.stats.parks += 1;
            // IF = 0 since the look above (pvkit's boot state, and always at CPL 3): an event
            // that arrived after it is pending and ends this `hlt` at once.
            cpu::wait_for_interrupt();
            fence(Ordering::SeqCst);
            if dev.has_used() {
                break;
            }
        }
        let events = cpu::interrupt_count(EVENT_VECTOR) - before;
        self.stats.events += events;
        events > 0
    }

    /// Acknowledges InterruptStatus if an event was consumed since the last acknowledgement;
    /// returns what was set (`None`: nothing to acknowledge, no exit).
    pub fn ack(&mut self, dev: &mut impl Completions) -> Option<InterruptStatus> {
        if !self.unacked {
            return None;
        }
        self.unacked = false;
        self.stats.acks += 1;
        Some(dev.ack_interrupt())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device whose completions appear after a number of looks.
    struct Fake {
        looks_left: u32,
        acks: u32,
    }

    impl Completions for Fake {
        fn has_used(&mut self) -> bool {
            if self.looks_left == 0 {
                return true;
            }
            self.looks_left -= 1;
            false
        }

        fn ack_interrupt(&mut self) -> InterruptStatus {
            self.acks += 1;
            InterruptStatus::QUEUE_INTERRUPT
        }
    }

    #[test]
    fn polling_spins_until_used_and_never_acks() {
        let mut w = Waiter::new(WaitPolicy::Poll);
        let mut dev = Fake {
            looks_left: 0,
            acks: 0,
        };
        w.wait(&mut dev).unwrap();
        dev.looks_left = 1000;
        w.wait(&mut dev).unwrap();
        assert_eq!(dev.looks_left, 0);
        assert!(w.ack(&mut dev).is_none());
        assert_eq!(dev.acks, 0);
        assert_eq!(
            w.stats(),
            WaitStats {
                waits: 2,
                ready: 1,
                ..WaitStats::default()
            }
        );
    }

    #[test]
    fn names() {
        assert_eq!(WaitPolicy::Poll.name(), "poll");
        assert_eq!(WaitPolicy::Interrupt.name(), "irq");
        assert_eq!(WaitPolicy::NAMES, ["poll", "pv", "adaptive", "irq"]);
        assert_eq!(Ack::Deferred.name(), "end");
        assert_eq!(Ack::EachWake.name(), "wake");
        let w = Waiter::new(WaitPolicy::Poll).with_ack(Ack::EachWake);
        assert_eq!(w.ack_mode(), Ack::EachWake);
        assert_eq!(w.policy(), WaitPolicy::Poll);
    }
}
