//! Console output: the `console_write` hypercall, [`PvConsole`] over it, [`Console`], which
//! picks the hypercall or the trapped UART, and [`LineWriter`], which sends whole lines (one
//! exit per line with the hypercall, instead of one per formatting fragment).

use core::fmt;

use hypercall_abi::boot::Mode;
use hypercall_abi::request::Request;
use hypercall_abi::{CONSOLE_WRITE_MAX, features};

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
            self.request(Request::ConsoleWrite {
                gpa: chunk_gpa,
                len: chunk_len,
            })
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
    /// [`Console::Pv`] if `mode` is [`Mode::Pv`] and `pv` is `Some` with
    /// [`features::CONSOLE`], otherwise an initialised COM1 [`Console::Uart`] (so in
    /// [`Mode::Trapped`] no hypercall is ever issued, even if the host is pvkit).
    /// [`Platform::console`](crate::Platform::console) is the same without the mode.
    pub fn new(mode: Mode, pv: Option<Pvkit>) -> Console {
        match (mode, pv) {
            (Mode::Pv, Some(pv)) if pv.has(features::CONSOLE) => Console::Pv(pv.console()),
            _ => Console::uart(),
        }
    }

    /// An initialised COM1 [`Console::Uart`].
    pub fn uart() -> Console {
        let mut uart = Uart16550::com1();
        uart.init();
        Console::Uart(uart)
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

/// Bytes a [`LineWriter`] holds before it sends them even without a newline.
pub const LINE_MAX: usize = 512;

/// A line-buffered writer: collects what is formatted into it and sends it to `W` at each
/// newline, when [`LINE_MAX`] bytes are pending, and on [`flush`](Self::flush) or drop. Over
/// the hypercall console that is one exit per line, however many fragments `write!` makes.
/// Nothing is cut: a longer line goes out in several pieces.
#[derive(Debug)]
pub struct LineWriter<W: fmt::Write> {
    out: W,
    buf: [u8; LINE_MAX],
    len: usize,
}

impl<W: fmt::Write> LineWriter<W> {
    /// An empty line over `out`.
    pub const fn new(out: W) -> LineWriter<W> {
        LineWriter {
            out,
            buf: [0; LINE_MAX],
            len: 0,
        }
    }

    /// Sends what is pending.
    pub fn flush(&mut self) -> fmt::Result {
        if self.len == 0 {
            return Ok(());
        }
        // Only whole `&str`s are appended, cut at character boundaries, so this is UTF-8.
        let text = core::str::from_utf8(&self.buf[..self.len]).map_err(|_| fmt::Error);
        self.len = 0;
        self.out.write_str(text?)
    }

    /// The writer underneath (pending bytes stay pending).
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.out
    }
}

impl<W: fmt::Write> fmt::Write for LineWriter<W> {
    fn write_str(&mut self, mut s: &str) -> fmt::Result {
        while !s.is_empty() {
            // Up to and including the next newline, or what fits.
            let line_end = s.find('\n').map_or(s.len(), |i| i + 1);
            let mut n = line_end.min(LINE_MAX - self.len);
            while !s.is_char_boundary(n) {
                n -= 1;
            }
            if n == 0 {
                // A character that does not fit: send what is pending first.
                self.flush()?;
                continue;
            }
            self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
            self.len += n;
            if self.buf[self.len - 1] == b'\n' || self.len == LINE_MAX {
                self.flush()?;
            }
            s = &s[n..];
        }
        Ok(())
    }
}

impl<W: fmt::Write> Drop for LineWriter<W> {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

/// Formats `args` plus `\n` and sends it to `console` as one line (one `console_write` exit for
/// lines up to [`LINE_MAX`] bytes). Output errors are ignored: there is nowhere to report them.
pub fn print_line(console: &mut Console, args: fmt::Arguments<'_>) {
    let mut line = LineWriter::new(console);
    let _ = fmt::Write::write_fmt(&mut line, args);
    let _ = fmt::Write::write_str(&mut line, "\n");
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

    /// Records each piece a [`LineWriter`] sends.
    #[derive(Default)]
    struct Pieces(Vec<std::string::String>);

    impl fmt::Write for Pieces {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            self.0.push(s.into());
            Ok(())
        }
    }

    #[test]
    fn line_writer_sends_whole_lines() {
        use core::fmt::Write as _;
        let mut out = Pieces::default();
        {
            let mut w = LineWriter::new(&mut out);
            write!(w, "a={} b={}", 1, 2 + 2).unwrap();
            writeln!(w, " c={:#x}", 255).unwrap();
            write!(w, "x\ny\nrest").unwrap();
        }
        assert_eq!(out.0, ["a=1 b=4 c=0xff\n", "x\n", "y\n", "rest"]);
    }

    #[test]
    fn line_writer_splits_long_lines_without_losing_bytes() {
        use core::fmt::Write as _;
        let mut out = Pieces::default();
        let long = "é".repeat(LINE_MAX); // 2 bytes each
        {
            let mut w = LineWriter::new(&mut out);
            w.write_str(&long).unwrap();
            w.write_str("\n").unwrap();
        }
        assert!(out.0.iter().all(|p| p.len() <= LINE_MAX));
        assert_eq!(out.0.concat(), long + "\n");
        assert_eq!(out.0.len(), 3);
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
