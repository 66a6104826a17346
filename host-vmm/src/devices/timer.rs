//! The trapped periodic timer (`TIMER_PORT`): the classic tick an unmodified guest idles on.
//! Ticks are raised as `TIMER_VECTOR` when the guest halts with interrupts enabled; ticks that
//! fall due while it runs are coalesced into the next one.

use std::time::{Duration, Instant};

use hypercall_abi::idle::TIMER_MIN_PERIOD_US;

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
        self.ticks += 1;
    }

    /// Ticks delivered.
    pub fn ticks(&self) -> u64 {
        self.ticks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
