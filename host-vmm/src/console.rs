//! Where guest console bytes go, whichever path they took (PV `console_write` or UART).
//!
//! Bytes are echoed live (to stdout for `run`) and captured (bounded) so that results can be
//! parsed and tests can check exactly what the guest printed.

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
        let mut i = self.lock();
        i.total += bytes.len() as u64;
        let room = CAPTURE_LIMIT.saturating_sub(i.captured.len());
        let keep = bytes.len().min(room);
        i.captured.extend_from_slice(&bytes[..keep]);
        if let Some(echo) = i.echo.as_mut() {
            // A closed stdout (e.g. `| head`) must not kill the VM: stop echoing instead.
            let ok = echo.write_all(bytes).and_then(|()| {
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

    /// Flushes the echo target.
    pub fn flush(&self) {
        if let Some(echo) = self.lock().echo.as_mut() {
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
}
