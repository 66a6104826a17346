//! The `null` hypercall: a bare round trip to the host, for measuring transport cost.

use hypercall_abi::request::Request;
use hypercall_abi::{Call, Return};

use crate::hypercall::raw_null_loop;
use crate::{HypercallError, Pvkit};

impl Pvkit {
    /// Issues the `null` hypercall. The host does nothing and echoes `a0`.
    ///
    /// Its trapped twin is [`crate::trapped::null_port_write`].
    #[inline]
    pub fn null(&self, a0: u64) -> Result<u64, HypercallError> {
        self.request(Request::Null { echo: a0 })
    }

    /// Issues `n` back-to-back `null(i)` hypercalls, `i` = `0..n`, and returns the wrapping sum
    /// of the values the host echoed: [`null_sum(n)`](null_sum) from a conforming host. `n` = 0
    /// issues no call and returns `Ok(0)`.
    ///
    /// This is the primitive for measuring the bare hypercall round trip: the whole loop is one
    /// asm block of 8 instructions per call (see `hypercall::raw_null_loop`), with no
    /// per-call error check or function call. Errors are checked once, after the loop: if any
    /// call failed, the error carries [`Call::Null`] and the OR of all statuses (the exact code
    /// when every failure had the same one).
    ///
    /// Its trapped twin is [`crate::trapped::null_port_loop`].
    #[inline]
    pub fn null_loop(&self, n: u64) -> Result<u64, HypercallError> {
        // SAFETY: `self` exists only if `detect` found the pvkit signature, so the host services
        // the hypercall port. Without I/O privilege the `out` faults (#GP) before reaching it,
        // which is not unsound. `null` touches no guest memory.
        let (status, value) = unsafe { raw_null_loop(n) };
        HypercallError::check(Call::Null, Return { status, value })
    }
}

/// `0 + 1 + … + (n - 1)`, wrapping (i.e. `n(n-1)/2` mod 2⁶⁴): what [`Pvkit::null_loop`] and
/// [`crate::trapped::null_port_loop`] return for `n`.
pub const fn null_sum(n: u64) -> u64 {
    // Halve the even factor first, so the product never needs more than 64 bits before wrapping.
    if n.is_multiple_of(2) {
        (n / 2).wrapping_mul(n.wrapping_sub(1))
    } else {
        n.wrapping_mul((n - 1) / 2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn null_sum_matches_the_loop() {
        let mut sum = 0u64;
        for n in 0..1000u64 {
            assert_eq!(null_sum(n), sum, "n = {n}");
            sum = sum.wrapping_add(n);
        }
    }

    #[test]
    fn null_sum_wraps() {
        for n in [
            1u64 << 32,
            (1 << 33) + 1,
            u64::MAX,
            u64::MAX - 1,
            0x1234_5678_9abc_def1,
        ] {
            let exact = u128::from(n) * (u128::from(n).saturating_sub(1)) / 2;
            assert_eq!(null_sum(n), exact as u64, "n = {n}");
        }
    }
}
