//! The `clock_ns` hypercall: host monotonic time.

use hypercall_abi::request::Request;

use crate::{HypercallError, Pvkit};

impl Pvkit {
    /// Host monotonic time in nanoseconds since the VM was created.
    ///
    /// Fails with `not_implemented` on a host without [`hypercall_abi::features::CLOCK`].
    pub fn clock_ns(&self) -> Result<u64, HypercallError> {
        self.request(Request::ClockNs)
    }
}
