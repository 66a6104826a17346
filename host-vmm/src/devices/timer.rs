//! The trapped periodic timer (`TIMER_PORT`): the classic tick an unmodified guest idles on.
//! Ticks are raised as `TIMER_VECTOR` when the guest halts with interrupts enabled; ticks that
//! fall due while it runs are coalesced into the next one.

use std::time::{Duration, Instant};

use hypercall_abi::idle::TIMER_MIN_PERIOD_US;

use crate::bus::{BusAction, BusDevice};
use crate::devices::debug::le_u32;
use crate::state::{Persist, StateError};

/// Period and next deadline of the timer.
#[derive(Debug, Default)]
pub struct PeriodicTimer {
    period: Option<Duration>,
    next_due: Option<Instant>,
    ticks: u64,
}

impl PeriodicTimer {
    /// A guest write: start with a period of `us` microseconds, or stop for 0.
    pub fn program(&mut self, us: u32) {
        if us == 0 {
            *self = PeriodicTimer {
                ticks: self.ticks,
                ..PeriodicTimer::default()
            };
            return;
        }
        let period = Duration::from_micros(u64::from(us.max(TIMER_MIN_PERIOD_US)));
        self.period = Some(period);
        self.next_due = Some(Instant::now() + period);
    }

    /// When the next tick is due, if the timer runs.
    pub fn next_due(&self) -> Option<Instant> {
        self.next_due
    }

    /// Consumes the due tick at `now` and schedules the next one on the timer's cadence,
    /// skipping periods that already passed.
    pub fn ack(&mut self, now: Instant) {
        let (Some(period), Some(mut due)) = (self.period, self.next_due) else {
            return;
        };
        while due <= now {
            due += period;
        }
        self.next_due = Some(due);
        self.ticks = self.ticks.wrapping_add(1);
    }

    /// Ticks delivered.
    pub fn ticks(&self) -> u64 {
        self.ticks
    }
}

impl BusDevice for PeriodicTimer {
    fn name(&self) -> &'static str {
        "timer"
    }

    /// The timer is write-only; reads float high like an unclaimed port.
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) -> BusAction {
        self.program(le_u32(data));
        BusAction::Continue
    }
}

/// [`PeriodicTimer`] state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TimerState {
    /// The period in microseconds, 0 when stopped.
    pub period_us: u64,
    /// Time left until the next tick in nanoseconds (0: due now).
    pub next_due_in_ns: u64,
    /// Ticks delivered.
    pub ticks: u64,
}

impl Persist for PeriodicTimer {
    type State = TimerState;

    fn save(&self) -> TimerState {
        let now = Instant::now();
        TimerState {
            period_us: self.period.map_or(0, |p| p.as_micros() as u64),
            next_due_in_ns: self
                .next_due
                .map_or(0, |t| t.saturating_duration_since(now).as_nanos() as u64),
            ticks: self.ticks,
        }
    }

    fn restore(&mut self, state: &TimerState) -> Result<(), StateError> {
        let (period, next_due) = match state.period_us {
            0 => (None, None),
            us if us < u64::from(TIMER_MIN_PERIOD_US) || us > u64::from(u32::MAX) => {
                return Err(StateError::invalid(
                    "timer",
                    format!("period {us} µs is outside what a guest can program"),
                ));
            }
            us => {
                let period = Duration::from_micros(us);
                if state.next_due_in_ns > period.as_nanos() as u64 {
                    return Err(StateError::invalid(
                        "timer",
                        "next tick is further away than one period",
                    ));
                }
                let due = Instant::now() + Duration::from_nanos(state.next_due_in_ns);
                (Some(period), Some(due))
            }
        };
        *self = PeriodicTimer {
            period,
            next_due,
            ticks: state.ticks,
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_bad_states_are_refused() {
        let mut t = PeriodicTimer::default();
        t.program(1000);
        t.ack(Instant::now());
        let mut fresh = PeriodicTimer::default();
        crate::state::assert_round_trip(&PeriodicTimer::default(), &mut fresh);
        let saved = t.save();
        fresh.restore(&saved).unwrap();
        assert_eq!(fresh.ticks(), 1);
        assert_eq!(fresh.save().period_us, 1000);
        assert!(fresh.next_due().is_some());
        for bad in [
            TimerState {
                period_us: 1,
                next_due_in_ns: 0,
                ticks: 0,
            },
            TimerState {
                period_us: 1000,
                next_due_in_ns: 2_000_000,
                ticks: 0,
            },
            TimerState {
                period_us: u64::MAX,
                next_due_in_ns: 0,
                ticks: 0,
            },
        ] {
            assert!(fresh.restore(&bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            fresh.save().period_us,
            1000,
            "a refused state changes nothing"
        );
    }

    #[test]
    fn keeps_cadence_and_skips_missed_periods() {
        let mut t = PeriodicTimer::default();
        assert_eq!(t.next_due(), None);
        t.program(1000);
        let first = t.next_due().unwrap();
        t.ack(first + Duration::from_micros(2500));
        assert_eq!(t.next_due().unwrap(), first + Duration::from_micros(3000));
        t.program(1); // raised to the minimum
        assert!(t.next_due().unwrap() >= Instant::now() + Duration::from_micros(50));
        t.program(0);
        assert_eq!(t.next_due(), None);
        assert_eq!(t.ticks(), 1);
    }
}
