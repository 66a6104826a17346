//! Output helpers: [`Line`] (a line kept for hashing as well as printing), workload result
//! [`Fields`], and `kprintln!`, which sends each line in one piece through
//! `guest_pv::console::print_line` (one `console_write` hypercall when the host offers it).

use core::fmt;

/// The longest [`Line`]; longer text is cut.
pub const LINE_MAX: usize = 512;

/// A fixed-capacity line, kept so it can be both printed and hashed (the greeting).
#[derive(Debug)]
pub struct Line {
    buf: [u8; LINE_MAX],
    len: usize,
}

impl Line {
    /// An empty line.
    pub const fn new() -> Line {
        Line {
            buf: [0; LINE_MAX],
            len: 0,
        }
    }

    /// The bytes written so far.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl fmt::Write for Line {
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

/// `kprintln!(console, "fmt", args…)`: one line on a [`guest_pv::Console`], sent in one piece.
macro_rules! kprintln {
    ($console:expr, $($arg:tt)*) => {
        guest_pv::console::print_line(&mut $console, format_args!($($arg)*))
    };
}
pub(crate) use kprintln;
