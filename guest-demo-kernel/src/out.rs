//! Line-buffered output: each line is formatted into a stack buffer and sent in one piece (one
//! `console_write` hypercall in PV mode).

use core::fmt;

use guest_pv::Console;

/// The longest line sent in one piece; longer lines are cut (the newline is kept).
pub const LINE_MAX: usize = 512;

/// A fixed-capacity line being formatted.
#[derive(Debug)]
pub struct LineBuf {
    buf: [u8; LINE_MAX],
    len: usize,
}

impl LineBuf {
    /// An empty line.
    pub const fn new() -> LineBuf {
        LineBuf {
            buf: [0; LINE_MAX],
            len: 0,
        }
    }

    /// Ends the line with `\n` (overwriting the last byte if the buffer is full) and returns it.
    pub fn finish(&mut self) -> &[u8] {
        if self.len == LINE_MAX {
            self.len -= 1;
        }
        self.buf[self.len] = b'\n';
        self.len += 1;
        &self.buf[..self.len]
    }
}

impl fmt::Write for LineBuf {
    /// Appends what fits and silently drops the rest, so a long message is cut, not lost.
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let n = s.len().min(LINE_MAX - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// The most bytes of workload-specific fields a result line carries.
pub const FIELDS_MAX: usize = 256;

/// Workload-specific ` key=value` fields appended to the `PVKIT-RESULT` line (each written with
/// its leading space, e.g. `write!(fields, " strategy={}", name)`). Text beyond
/// [`FIELDS_MAX`] bytes is dropped.
#[derive(Debug, Clone, Copy)]
pub struct Fields {
    buf: [u8; FIELDS_MAX],
    len: usize,
}

impl Fields {
    /// No fields.
    pub const fn new() -> Fields {
        Fields {
            buf: [0; FIELDS_MAX],
            len: 0,
        }
    }

    /// The fields written so far.
    pub fn as_str(&self) -> &str {
        // Only whole `&str`s are appended, cut at a character boundary, so this is UTF-8.
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

impl fmt::Write for Fields {
    /// Appends what fits (cut at a character boundary) and silently drops the rest.
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut n = s.len().min(FIELDS_MAX - self.len);
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

impl fmt::Display for Fields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Formats `args` plus `\n` and writes the line to `console` in one piece. Output errors are
/// ignored: there is nowhere else to report them.
pub fn print_line(console: &mut Console, args: fmt::Arguments<'_>) {
    let mut line = LineBuf::new();
    let _ = fmt::Write::write_fmt(&mut line, args);
    let _ = console.write_bytes(line.finish());
}

/// `kprintln!(console, "fmt", args…)`: one line on a [`Console`], sent in one piece.
macro_rules! kprintln {
    ($console:expr, $($arg:tt)*) => {
        $crate::out::print_line(&mut $console, format_args!($($arg)*))
    };
}
pub(crate) use kprintln;
