//! `clock_ns()`: host monotonic time since the VM was created.

use std::time::{Duration, Instant};

use crate::state::{Persist, StateError};

/// The guest's monotonic clock.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    origin: Instant,
}

impl Clock {
    /// A clock starting now.
    pub fn new() -> Clock {
        Clock {
            origin: Instant::now(),
        }
    }

    /// Moves the clock `ns` forward (at most back to the host's own clock origin).
    pub fn advance(&mut self, ns: u64) {
        if let Some(origin) = self.origin.checked_sub(Duration::from_nanos(ns)) {
            self.origin = origin;
        }
    }

    /// Nanoseconds since creation (monotonic).
    pub fn now_ns(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// The largest `clock_ns()` a restored clock accepts (about 146 years).
pub const CLOCK_STATE_MAX_NS: u64 = 1 << 62;

/// [`Clock`] state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClockState {
    /// `clock_ns()` when saved; a restored clock continues from here.
    pub now_ns: u64,
}

impl Persist for Clock {
    type State = ClockState;

    fn save(&self) -> ClockState {
        ClockState {
            now_ns: self.now_ns(),
        }
    }

    fn restore(&mut self, state: &ClockState) -> Result<(), StateError> {
        let now = Instant::now();
        // A monotonic clock cannot go back further than the host's own origin allows, and a
        // guest clock over a century old is not one this VMM wrote.
        let origin = Some(state.now_ns)
            .filter(|&ns| ns <= CLOCK_STATE_MAX_NS)
            .and_then(|ns| now.checked_sub(Duration::from_nanos(ns)))
            .ok_or_else(|| {
                StateError::invalid(
                    "clock",
                    format!(
                        "{} ns is further back than this host's clock reaches",
                        state.now_ns
                    ),
                )
            })?;
        self.origin = origin;
        Ok(())
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_monotonic() {
        let c = Clock::new();
        let a = c.now_ns();
        let b = c.now_ns();
        assert!(b >= a);
    }

    #[test]
    fn a_restored_clock_continues_from_the_saved_time() {
        let mut c = Clock::new();
        c.restore(&ClockState { now_ns: 1_000_000 }).unwrap();
        let now = c.now_ns();
        assert!((1_000_000..1_000_000_000).contains(&now), "{now}");
        let json = serde_json::to_string(&c.save()).unwrap();
        let back: ClockState = serde_json::from_str(&json).unwrap();
        let mut fresh = Clock::new();
        fresh.restore(&back).unwrap();
        assert!(fresh.now_ns() >= back.now_ns);
        assert!(fresh.restore(&ClockState { now_ns: u64::MAX }).is_err());
    }
}
