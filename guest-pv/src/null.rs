//! The `null` hypercall: a bare round trip to the host, for measuring transport cost.

use hypercall_abi::Call;

use crate::{HypercallError, Pvkit};

impl Pvkit {
    /// Issues the `null` hypercall. The host does nothing and echoes `a0`.
    ///
    /// Its trapped twin is [`crate::trapped::null_port_write`].
    #[inline]
    pub fn null(&self, a0: u64) -> Result<u64, HypercallError> {
        self.call(Call::Null, [a0, 0, 0, 0])
    }
}
