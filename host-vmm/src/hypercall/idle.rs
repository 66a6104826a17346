//! `idle_yield(deadline_ns)`: park the vCPU thread on the VM's event queue until the deadline
//! or an event, whichever is first. A real blocking wait (crossbeam `recv_timeout`), not a
//! sleep loop; events queued before the call make it return at once (no lost wake-up).
//!
//! A stop or pause request ends the wait early without an event; the call is then not
//! complete ([`None`]): the run loop parks the vCPU and runs the call again once it resumes,
//! so the guest never sees a wake-up that did not happen.

use std::time::Duration;

use hypercall_abi::Return;
use hypercall_abi::idle::{IDLE_MAX_NS, WAKE_CAPPED, WAKE_DEADLINE, WAKE_EVENT, encode_wake};

use super::clock::Clock;
use crate::devices::event::{EventQueue, Woken};

/// Runs `idle_yield`. `deadline_ns` is absolute in `clock_ns` time. `None`: a stop or pause
/// request interrupted the wait; run the call again after the pause.
pub fn idle_yield(clock: &Clock, events: &mut EventQueue, deadline_ns: u64) -> Option<Return> {
    let pending = events.drain();
    if pending > 0 {
        return Some(Return::ok(encode_wake(WAKE_EVENT, pending)));
    }
    let now = clock.now_ns();
    if deadline_ns <= now {
        return Some(Return::ok(encode_wake(WAKE_DEADLINE, 0)));
    }
    let wanted = deadline_ns - now;
    let capped = wanted > IDLE_MAX_NS;
    let wake = match events.wait(Some(Duration::from_nanos(wanted.min(IDLE_MAX_NS)))) {
        Woken::Events(n) => encode_wake(WAKE_EVENT, n),
        Woken::Timeout if capped => encode_wake(WAKE_CAPPED, 0),
        Woken::Timeout => encode_wake(WAKE_DEADLINE, 0),
        Woken::Interrupted => return None,
    };
    Some(Return::ok(wake))
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use hypercall_abi::idle::decode_wake;

    use super::*;

    fn reason(r: Option<Return>) -> (u64, u64) {
        let r = r.expect("not interrupted");
        assert_eq!(r.status, 0);
        decode_wake(r.value)
    }

    #[test]
    fn past_deadline_returns_at_once() {
        let c = Clock::new();
        let mut q = EventQueue::default();
        let t0 = Instant::now();
        assert_eq!(reason(idle_yield(&c, &mut q, 0)), (WAKE_DEADLINE, 0));
        assert!(t0.elapsed() < Duration::from_millis(100));
    }

    #[test]
    fn sleeps_until_the_deadline() {
        let c = Clock::new();
        let mut q = EventQueue::default();
        let deadline = c.now_ns() + 20_000_000;
        assert_eq!(reason(idle_yield(&c, &mut q, deadline)), (WAKE_DEADLINE, 0));
        assert!(c.now_ns() >= deadline);
    }

    #[test]
    fn a_pending_event_wins_and_is_consumed() {
        let c = Clock::new();
        let mut q = EventQueue::default();
        q.waker().wake();
        assert_eq!(reason(idle_yield(&c, &mut q, u64::MAX)), (WAKE_EVENT, 1));
        // A wake from another thread ends the wait early.
        let w = q.waker();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(10));
            w.wake();
        });
        let t0 = Instant::now();
        assert_eq!(
            reason(idle_yield(&c, &mut q, c.now_ns() + 5_000_000_000)),
            (WAKE_EVENT, 1)
        );
        assert!(t0.elapsed() < Duration::from_secs(1));
        t.join().unwrap();
    }

    #[test]
    fn an_interrupted_wait_is_not_a_wake_up() {
        let c = Clock::new();
        let mut q = EventQueue::default();
        q.interrupter().interrupt();
        assert_eq!(idle_yield(&c, &mut q, u64::MAX), None);
        // Events still win over an interrupt.
        q.interrupter().interrupt();
        q.waker().wake();
        assert_eq!(reason(idle_yield(&c, &mut q, u64::MAX)), (WAKE_EVENT, 1));
    }
}
