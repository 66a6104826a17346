//! Helpers for the unit tests.

use std::time::{Duration, Instant};

/// Polls `cond` every millisecond until it holds; panics naming `what` after 5 s (work on
/// another thread that never finishes).
pub fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}
