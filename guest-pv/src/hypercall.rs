//! The hypercall instruction sequence and its result decoding.
//!
//! This file holds every piece of inline assembly that talks to the pvkit host:
//! - [`raw_hypercall`]: one 32-bit `out dx, eax` to [`HYPERCALL_PORT`] with the register
//!   convention of `hypercall_abi`; [`raw_request`] issues a typed
//!   [`Request`], whose `encode` is the one definition of each
//!   call's registers. Every wrapper in this crate builds a `Request` and goes through
//!   [`raw_request`] or the crate-private `Pvkit::request`, reachable only with a [`Pvkit`]
//!   token, i.e. after [`crate::detect()`] has proven that the host is pvkit.

use core::arch::asm;
use core::fmt;

use hypercall_abi::request::Request;
use hypercall_abi::{Call, Error, HYPERCALL_PORT, Regs, Return};

use crate::Pvkit;

/// Issues one hypercall: `rax` = `nr`, `rdi`, `rsi`, `rcx`, `r8` = `args`, then
/// `out dx, eax` with `dx` = [`HYPERCALL_PORT`]. Returns `rax` (status) and `rdx` (value).
///
/// The asm block is *not* marked `nomem`/`readonly`: the host may read guest memory the
/// arguments point at (`console_write`), so the compiler must have completed every store to such
/// a buffer before the `out`, and must not cache memory across it.
///
/// # Safety
/// - The machine must be a pvkit VM (the host services [`HYPERCALL_PORT`]); on other hardware
///   the port may belong to an arbitrary device. Holding a [`Pvkit`] from [`crate::detect()`]
///   proves this.
/// - The code must have I/O privilege for the port — CPL 0 under pvkit's boot state, or CPL 3
///   with the I/O permission bitmap [`crate::cpu::init`] installs — or the `out` faults (#GP).
/// - If the call makes the host *write* guest memory (no v1.0 call does), the caller must own
///   that memory exclusively for the duration of the call. Memory the host only reads must be
///   initialised.
#[inline]
pub unsafe fn raw_hypercall(nr: u64, args: [u64; 4]) -> Return {
    let status: u64;
    let value: u64;
    // SAFETY: the caller guarantees this is a pvkit VM at I/O privilege, so the `out` reaches the
    // host's hypercall handler, which (per the ABI) writes only rax and rdx and preserves every
    // other register; memory the host may touch is covered by the caller's contract. The block
    // uses no stack.
    unsafe {
        asm!(
            "out dx, eax",
            inout("rax") nr => status,
            inout("rdx") u64::from(HYPERCALL_PORT) => value,
            in("rdi") args[0],
            in("rsi") args[1],
            in("rcx") args[2],
            in("r8") args[3],
            options(nostack),
        );
    }
    Return { status, value }
}

/// Issues the hypercall `request`: [`raw_hypercall`] with the registers of
/// [`Request::encode`]. With the request's variant known at the call site (every wrapper in this
/// crate), encoding folds into the same register moves as writing them by hand.
///
/// # Safety
/// As for [`raw_hypercall`].
#[inline(always)]
pub unsafe fn raw_request(request: Request) -> Return {
    let Regs { nr, args } = request.encode();
    // SAFETY: the caller's contract is `raw_hypercall`'s.
    unsafe { raw_hypercall(nr, args) }
}

/// A hypercall the host answered with a non-zero status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HypercallError {
    call: Call,
    error: Option<Error>,
    status: u64,
}

impl HypercallError {
    /// Decodes the host's answer to `call`: `Ok(value)` for status 0, otherwise the error.
    pub const fn check(call: Call, ret: Return) -> Result<u64, HypercallError> {
        match ret.into_result() {
            Ok(value) => Ok(value),
            Err(error) => Err(HypercallError {
                call,
                error,
                status: ret.status,
            }),
        }
    }

    /// The call that failed.
    pub const fn call(&self) -> Call {
        self.call
    }

    /// The decoded error; `None` if the status is a code this ABI version does not define (a
    /// newer host).
    pub const fn error(&self) -> Option<Error> {
        self.error
    }

    /// The raw status register (`rax`) the host returned.
    pub const fn status(&self) -> u64 {
        self.status
    }
}

impl fmt::Display for HypercallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.error {
            Some(e) => write!(
                f,
                "hypercall {} failed: {e} (status {})",
                self.call.name(),
                self.status
            ),
            None => write!(
                f,
                "hypercall {} failed: unknown status {}",
                self.call.name(),
                self.status
            ),
        }
    }
}

impl core::error::Error for HypercallError {}

impl Pvkit {
    /// Issues `request` and decodes the answer.
    ///
    /// Crate-private on purpose: it is safe only for calls that make the host *read* guest memory
    /// at most (every v1.0 call). A wrapper for a call that makes the host write guest memory
    /// must use [`raw_hypercall`] with its own safety argument.
    ///
    /// Always inlined, so that each wrapper's [`Request`] variant is known where it is encoded
    /// and the encoding folds to register moves (a shared out-of-line copy would `match` on the
    /// variant at run time, on every call).
    #[inline(always)]
    pub(crate) fn request(&self, request: Request) -> Result<u64, HypercallError> {
        // SAFETY: `self` exists only if `detect` found the pvkit signature, so the host services
        // the hypercall port. Callers in this crate pass only calls after which the host reads
        // (never writes) guest memory, and the buffers they pass are live, initialised slices.
        let ret = unsafe { raw_request(request) };
        HypercallError::check(request.call(), ret)
    }
}

#[cfg(test)]
mod tests {
    use std::string::ToString;

    use super::*;

    #[test]
    fn success_decodes_to_value() {
        assert_eq!(HypercallError::check(Call::Null, Return::ok(42)), Ok(42));
    }

    #[test]
    fn known_error_decodes() {
        let e =
            HypercallError::check(Call::ConsoleWrite, Return::err(Error::BadAddress)).unwrap_err();
        assert_eq!(e.call(), Call::ConsoleWrite);
        assert_eq!(e.error(), Some(Error::BadAddress));
        assert_eq!(e.status(), 4);
        assert_eq!(
            e.to_string(),
            "hypercall console_write failed: bad_address (status 4)"
        );
    }

    #[test]
    fn unknown_status_keeps_raw_code() {
        let e = HypercallError::check(
            Call::ClockNs,
            Return {
                status: 99,
                value: 7,
            },
        )
        .unwrap_err();
        assert_eq!(e.error(), None);
        assert_eq!(e.status(), 99);
        assert_eq!(
            e.to_string(),
            "hypercall clock_ns failed: unknown status 99"
        );
    }
}
