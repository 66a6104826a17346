//! Where guest console bytes go, whichever path they took (PV `console_write` or UART).
//!
//! Bytes are echoed live (to stdout for `run`) and captured (bounded) so that results can be
//! parsed and tests can check exactly what the guest printed.
//!
//! The guest is untrusted and the echo goes to the operator's terminal, so the echo is
//! sanitized ([`EchoFilter`]): text passes as UTF-8, control characters other than newline,
//! carriage return and tab (terminal escape sequences start with ESC or a C1 control) are
//! shown as `\x1b`-style escapes, and bytes that are not UTF-8 as `\xNN`. The capture keeps
//! the raw bytes.

use std::io::Write;
use std::sync::{Arc, Mutex};

/// Captured output is bounded so a guest printing forever cannot exhaust host memory.
pub const CAPTURE_LIMIT: usize = 16 << 20;

/// The console sink shared by the UART and the `console_write` hypercall.
#[derive(Clone)]
pub struct ConsoleSink {
    inner: Arc<Mutex<Inner>>,
}

struct Inner {
    echo: Option<Box<dyn Write + Send>>,
    filter: EchoFilter,
    captured: Vec<u8>,
    total: u64,
    echo_failed: bool,
}

impl std::fmt::Debug for ConsoleSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let i = self.lock();
        f.debug_struct("ConsoleSink")
            .field("echo", &i.echo.is_some())
            .field("total", &i.total)
            .finish()
    }
}

impl ConsoleSink {
    /// A sink that echoes to `echo` (if any) and captures.
    pub fn new(echo: Option<Box<dyn Write + Send>>) -> ConsoleSink {
        ConsoleSink {
            inner: Arc::new(Mutex::new(Inner {
                echo,
                filter: EchoFilter::default(),
                captured: Vec::new(),
                total: 0,
                echo_failed: false,
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        crate::sync::lock(&self.inner)
    }

    /// Appends guest bytes.
    pub fn push(&self, bytes: &[u8]) {
        let mut guard = self.lock();
        let i = &mut *guard;
        i.total += bytes.len() as u64;
        let room = CAPTURE_LIMIT.saturating_sub(i.captured.len());
        let keep = bytes.len().min(room);
        i.captured.extend_from_slice(&bytes[..keep]);
        if let Some(echo) = i.echo.as_mut() {
            let mut safe = Vec::with_capacity(bytes.len());
            i.filter.push(bytes, &mut safe);
            // A closed stdout (e.g. `| head`) must not kill the VM: stop echoing instead.
            let ok = echo.write_all(&safe).and_then(|()| {
                if bytes.contains(&b'\n') {
                    echo.flush()
                } else {
                    Ok(())
                }
            });
            if ok.is_err() {
                i.echo = None;
                i.echo_failed = true;
            }
        }
    }

    /// Flushes the echo target (and any incomplete UTF-8 sequence held back, as `\xNN`).
    pub fn flush(&self) {
        let mut guard = self.lock();
        let i = &mut *guard;
        if let Some(echo) = i.echo.as_mut() {
            let mut rest = Vec::new();
            i.filter.finish(&mut rest);
            let _ = echo.write_all(&rest);
            let _ = echo.flush();
        }
    }

    /// Total bytes the guest wrote (including any beyond the capture limit).
    pub fn total(&self) -> u64 {
        self.lock().total
    }

    /// A copy of the captured bytes.
    pub fn captured(&self) -> Vec<u8> {
        self.lock().captured.clone()
    }
}

/// Makes untrusted bytes safe to show on a terminal, across calls (a UART delivers one byte at
/// a time, so a UTF-8 sequence may be split).
#[derive(Debug, Default)]
pub struct EchoFilter {
    /// The start of a UTF-8 sequence whose remaining bytes have not come yet (at most 3).
    pending: Vec<u8>,
}

impl EchoFilter {
    /// Appends the safe form of `bytes` to `out`.
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        let mut input = std::mem::take(&mut self.pending);
        input.extend_from_slice(bytes);
        let mut rest = &input[..];
        loop {
            match std::str::from_utf8(rest) {
                Ok(text) => {
                    escape_text(text, out);
                    return;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    // The first `valid_up_to` bytes are valid UTF-8 by definition.
                    escape_text(std::str::from_utf8(valid).unwrap_or_default(), out);
                    match e.error_len() {
                        Some(n) => {
                            for b in &after[..n] {
                                out.extend_from_slice(format!("\\x{b:02x}").as_bytes());
                            }
                            rest = &after[n..];
                        }
                        // An incomplete sequence at the end: wait for the rest.
                        None => {
                            self.pending = after.to_vec();
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Appends what is held back (an incomplete sequence, as `\xNN`) to `out`.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        for b in std::mem::take(&mut self.pending) {
            out.extend_from_slice(format!("\\x{b:02x}").as_bytes());
        }
    }
}

fn escape_text(text: &str, out: &mut Vec<u8>) {
    for c in text.chars() {
        match c {
            '\n' | '\r' | '\t' => out.push(c as u8),
            c if c.is_control() => {
                out.extend_from_slice(format!("\\x{:02x}", u32::from(c)).as_bytes())
            }
            c => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
}

/// `io::Write` adapter so vm-superio's UART can write into the sink.
#[derive(Debug, Clone)]
pub struct SinkWriter(pub ConsoleSink);

impl Write for SinkWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_and_counts() {
        let s = ConsoleSink::new(None);
        s.push(b"hello ");
        SinkWriter(s.clone()).write_all(b"world").unwrap();
        assert_eq!(s.captured(), b"hello world");
        assert_eq!(s.total(), 11);
    }

    fn filtered(chunks: &[&[u8]]) -> String {
        let mut f = EchoFilter::default();
        let mut out = Vec::new();
        for c in chunks {
            f.push(c, &mut out);
        }
        f.finish(&mut out);
        String::from_utf8(out).expect("the echo is always UTF-8")
    }

    #[test]
    fn the_echo_shows_escape_sequences_instead_of_running_them() {
        assert_eq!(filtered(&[b"ok\r\n\ttab"]), "ok\r\n\ttab");
        // ESC [ 2 J (clear screen), BEL, DEL, C1 CSI (U+009B) and an OSC title sequence.
        assert_eq!(
            filtered(&[b"\x1b[2J\x07\x7f", "\u{9b}1m".as_bytes(), b"\x1b]0;t\x07"]),
            "\\x1b[2J\\x07\\x7f\\x9b1m\\x1b]0;t\\x07"
        );
        // UTF-8 split across single-byte writes (as a UART delivers it) passes intact.
        let e = "é≈".as_bytes();
        let bytes: Vec<&[u8]> = e.chunks(1).collect();
        assert_eq!(filtered(&bytes), "é≈");
        // Invalid bytes and a truncated sequence at the end are shown, not passed.
        assert_eq!(filtered(&[b"a\xff\xc3"]), "a\\xff\\xc3");
        // Raw bytes are captured unchanged.
        let s = ConsoleSink::new(Some(Box::new(std::io::sink())));
        s.push(b"\x1b[2J");
        assert_eq!(s.captured(), b"\x1b[2J");
    }
}
