//! Idle (ABI v1.2): `idle_yield(deadline_ns)`, the trapped periodic timer and the event device.
//!
//! A guest with nothing to do can tell the host so in three ways, from least to most
//! informative:
//! - **spin**: poll its clock until the deadline. The host learns nothing; the vCPU thread burns
//!   a host CPU.
//! - **hlt + tick** (trapped): program the [`TIMER_PORT`] periodic timer (e.g. 1 kHz) and `sti;
//!   hlt` until a tick ([`TIMER_VECTOR`]) finds the deadline passed. The host learns "idle", not
//!   "until when": it wakes the guest on every tick.
//! - **PV** [`crate::Call::IdleYield`] `(deadline_ns)`: the host parks the vCPU thread until the
//!   deadline (in `clock_ns` time) or a pending event for this guest, whichever is first, and
//!   returns the reason in `rdx`.
//!
//! # No lost wake-ups
//! Events are queued per VM until the guest consumes them. `idle_yield` first checks the queue
//! and returns [`WAKE_EVENT`] at once if anything is pending — an event that fires between the
//! guest's last check of its work and its `idle_yield` is never lost (the atomic check of Xen's
//! `SCHEDOP_block`). Each `idle_yield` that returns [`WAKE_EVENT`] consumes the pending events;
//! the value's bits 8.. report how many.
//!
//! # Deadlines
//! A deadline at or before "now" returns [`WAKE_DEADLINE`] at once. One call parks at most
//! [`IDLE_MAX_NS`]; a later deadline returns [`WAKE_CAPPED`] after that long (call again).

/// `idle_yield` result (low 8 bits of `rdx`): the deadline passed.
pub const WAKE_DEADLINE: u64 = 1;
/// `idle_yield` result: an event for this guest is pending (bits 8.. = events consumed).
pub const WAKE_EVENT: u64 = 2;
/// `idle_yield` result: parked for [`IDLE_MAX_NS`] without reaching the deadline.
pub const WAKE_CAPPED: u64 = 3;
/// The longest one `idle_yield` parks the vCPU (1 s).
pub const IDLE_MAX_NS: u64 = 1_000_000_000;

/// Trapped periodic timer: a 32-bit `out` of a period in microseconds starts it (0 stops it).
/// Each period the host raises [`TIMER_VECTOR`] — delivered when the guest can take an
/// interrupt, in particular when it halts with interrupts enabled.
pub const TIMER_PORT: u16 = 0x0504;
/// Interrupt vector of the periodic timer.
pub const TIMER_VECTOR: u8 = 0x20;
/// Shortest timer period the host accepts (µs); shorter periods are raised to it.
pub const TIMER_MIN_PERIOD_US: u32 = 100;

/// Event device, a stand-in for a device completion: a 32-bit `out` of a delay in microseconds
/// schedules one event that long from now (on a host thread). A pending event wakes a parked
/// `idle_yield` ([`WAKE_EVENT`]) or, for a halted guest, raises [`EVENT_VECTOR`]. A 32-bit
/// `in` returns the number of events delivered so far (low 32 bits).
pub const EVENT_PORT: u16 = 0x0505;
/// Interrupt vector of the event device.
pub const EVENT_VECTOR: u8 = 0x21;
/// Longest delay the event device accepts (µs); longer delays are clamped.
pub const EVENT_MAX_DELAY_US: u32 = 10_000_000;

/// Splits an `idle_yield` value into (reason, events consumed).
pub const fn decode_wake(value: u64) -> (u64, u64) {
    (value & 0xff, value >> 8)
}

/// Packs an `idle_yield` value.
pub const fn encode_wake(reason: u64, events: u64) -> u64 {
    (events << 8) | (reason & 0xff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wake_values_round_trip() {
        assert_eq!(decode_wake(encode_wake(WAKE_EVENT, 3)), (WAKE_EVENT, 3));
        assert_eq!(
            decode_wake(encode_wake(WAKE_DEADLINE, 0)),
            (WAKE_DEADLINE, 0)
        );
        assert_ne!(TIMER_PORT, EVENT_PORT);
    }
}
