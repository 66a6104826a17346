//! Console output: the `console_write` hypercall, [`PvConsole`] over it, and [`Console`], which
//! picks the hypercall or the trapped UART by mode.

use core::fmt;

use hypercall_abi::boot::Mode;
use hypercall_abi::{CONSOLE_WRITE_MAX, Call};

use crate::{HypercallError, Pvkit, Uart16550};

impl Pvkit {
    /// Writes `bytes` to the host console; returns the number of bytes the host accepted (all of
    /// them unless the host stops short, see [`console_write_phys`](Self::console_write_phys)).
    ///
    /// Passes the slice's *virtual* address as the guest-physical address, so it is correct
    /// only where virtual == physical for the slice, as under pvkit's boot identity map of
    /// `0..4 GiB`. A kernel with other mappings must translate and call
    /// [`console_write_phys`](Self::console_write_phys) instead.
    pub fn console_write(&self, bytes: &[u8]) -> Result<usize, HypercallError> {
        let gpa = bytes.as_ptr().expose_provenance() as u64;
        let written = self.console_write_phys(gpa, bytes.len() as u64)?;
        // `written <= bytes.len()`, so the conversion is lossless.
        Ok(written as usize)
    }

    /// Writes `len` bytes at guest-physical address `gpa` to the host console, in calls of at
    /// most [`CONSOLE_WRITE_MAX`] bytes. Returns the number of bytes the host accepted: `len`,
    /// or less if the host accepted 0 bytes of a call (then it stops).
    ///
    /// Safe for any arguments: the host only *reads* guest memory, and answers `bad_address`
    /// for a range outside guest RAM. The bytes must have been written before the call (they
    /// are, for any memory the compiler knows about: the hypercall is a full compiler barrier).
    pub fn console_write_phys(&self, gpa: u64, len: u64) -> Result<u64, HypercallError> {
        write_chunked(gpa, len, CONSOLE_WRITE_MAX, |chunk_gpa, chunk_len| {
            self.call(Call::ConsoleWrite, [chunk_gpa, chunk_len, 0, 0])
        })
    }

    /// A [`PvConsole`] over this host.
    pub const fn console(&self) -> PvConsole {
        PvConsole { pv: *self }
    }
}

/// Splits `gpa..gpa + len` into pieces of at most `max` bytes and hands each to `write`, which
/// returns how many bytes it took. Continues after a short write; stops when `write` takes 0
/// bytes (and returns the total so far) or fails.
fn write_chunked<E>(
    gpa: u64,
    len: u64,
    max: u64,
    mut write: impl FnMut(u64, u64) -> Result<u64, E>,
) -> Result<u64, E> {
    let mut done = 0;
    while done < len {
        let n = (len - done).min(max);
        // A range that wraps the address space is the host's to reject (`bad_address`).
        let took = write(gpa.wrapping_add(done), n)?;
        if took == 0 {
            break;
        }
        // A host claiming more than it was given is not trusted beyond the chunk.
        done += took.min(n);
    }
    Ok(done)
}

/// The hypercall console: a [`fmt::Write`] over [`Pvkit::console_write`].
///
/// Each `write_str` is one or more hypercalls; format a line into a buffer first to send it in
/// one call.
#[derive(Debug, Clone, Copy)]
pub struct PvConsole {
    pv: Pvkit,
}

impl PvConsole {
    /// A console over the host `pv`.
    pub const fn new(pv: Pvkit) -> PvConsole {
        PvConsole { pv }
    }

    /// The host token.
    pub const fn pvkit(&self) -> Pvkit {
        self.pv
    }

    /// Writes all of `bytes`; an error if the host refused or took only part of them.
    pub fn write_bytes(&mut self, bytes: &[u8]) -> fmt::Result {
        match self.pv.console_write(bytes) {
            Ok(n) if n == bytes.len() => Ok(()),
            _ => Err(fmt::Error),
        }
    }
}

impl fmt::Write for PvConsole {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.write_bytes(s.as_bytes())
    }
}

/// The console of a pvkit guest: the hypercall console in PV mode, the trapped UART otherwise.
#[derive(Debug)]
pub enum Console {
    /// `console_write` hypercalls.
    Pv(PvConsole),
    /// COM1, port I/O only (no hypercall).
    Uart(Uart16550),
}

impl Console {
    /// [`Console::Pv`] if `mode` is [`Mode::Pv`] and `pv` is `Some`, otherwise an initialised
    /// COM1 [`Console::Uart`] (so in [`Mode::Trapped`] no hypercall is ever issued, even if the
    /// host is pvkit).
    pub fn new(mode: Mode, pv: Option<Pvkit>) -> Console {
        match (mode, pv) {
            (Mode::Pv, Some(pv)) => Console::Pv(pv.console()),
            _ => {
                let mut uart = Uart16550::com1();
                uart.init();
                Console::Uart(uart)
            }
        }
    }

    /// Writes all of `bytes` (the UART never fails; the hypercall console can).
    pub fn write_bytes(&mut self, bytes: &[u8]) -> fmt::Result {
        match self {
            Console::Pv(c) => c.write_bytes(bytes),
            Console::Uart(u) => {
                u.write_bytes(bytes);
                Ok(())
            }
        }
    }
}

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.write_bytes(s.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use std::vec;
    use std::vec::Vec;

    use super::*;

    /// Runs `write_chunked` with a host that takes `take(len)` bytes per call; returns the calls
    /// and the result.
    fn run(
        gpa: u64,
        len: u64,
        max: u64,
        take: impl Fn(u64) -> u64,
    ) -> (Vec<(u64, u64)>, Result<u64, ()>) {
        let mut calls = Vec::new();
        let r = write_chunked(gpa, len, max, |g, n| {
            calls.push((g, n));
            Ok(take(n))
        });
        (calls, r)
    }

    #[test]
    fn empty_write_issues_no_call() {
        let (calls, r) = run(0x1000, 0, 16, |n| n);
        assert!(calls.is_empty());
        assert_eq!(r, Ok(0));
    }

    #[test]
    fn splits_at_the_maximum() {
        let (calls, r) = run(0x1000, 40, 16, |n| n);
        assert_eq!(calls, vec![(0x1000, 16), (0x1010, 16), (0x1020, 8)]);
        assert_eq!(r, Ok(40));
        let (calls, _) = run(0, 32, 16, |n| n);
        assert_eq!(calls, vec![(0, 16), (16, 16)]);
    }

    #[test]
    fn uses_the_abi_maximum() {
        let max = CONSOLE_WRITE_MAX;
        let (calls, r) = run(0x20_0000, 2 * max + 1, max, |n| n);
        assert_eq!(
            calls,
            vec![
                (0x20_0000, max),
                (0x20_0000 + max, max),
                (0x20_0000 + 2 * max, 1)
            ]
        );
        assert_eq!(r, Ok(2 * max + 1));
    }

    #[test]
    fn continues_after_a_short_write() {
        let (calls, r) = run(100, 10, 16, |n| n.min(4));
        assert_eq!(calls, vec![(100, 10), (104, 6), (108, 2)]);
        assert_eq!(r, Ok(10));
    }

    #[test]
    fn stops_when_the_host_takes_nothing() {
        let (calls, r) = run(0, 40, 16, |n| if n == 16 { 16 } else { 0 });
        assert_eq!(calls, vec![(0, 16), (16, 16), (32, 8)]);
        assert_eq!(r, Ok(32));
    }

    #[test]
    fn does_not_trust_an_overlong_answer() {
        let (calls, r) = run(0, 20, 16, |_| 1000);
        assert_eq!(calls, vec![(0, 16), (16, 4)]);
        assert_eq!(r, Ok(20));
    }

    #[test]
    fn propagates_the_first_error() {
        let mut calls = 0;
        let r: Result<u64, &str> = write_chunked(0, 100, 16, |_, n| {
            calls += 1;
            if calls == 2 { Err("refused") } else { Ok(n) }
        });
        assert_eq!(r, Err("refused"));
        assert_eq!(calls, 2);
    }
}
