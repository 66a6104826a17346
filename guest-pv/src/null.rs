//! The `null` hypercall: a bare round trip to the host, for measuring transport cost.

use hypercall_abi::request::Request;

use crate::{HypercallError, Pvkit};

impl Pvkit {
    /// Issues the `null` hypercall. The host does nothing and echoes `a0`.
    ///
    /// Its trapped twin is [`crate::trapped::null_port_write`].
    #[inline]
    pub fn null(&self, a0: u64) -> Result<u64, HypercallError> {
        self.request(Request::Null { echo: a0 })
    }
}
