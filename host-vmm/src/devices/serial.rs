//! COM1: a 16550A UART (vm-superio), the trapped twin of `console_write`. Each byte the guest
//! transmits is one exit.

use hypercall_abi::ports::UART_COM1;
use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};

use crate::console::{ConsoleSink, SinkWriter};

/// The UART raises no interrupt yet (the guest polls LSR); the trigger is a no-op.
#[derive(Debug, Default)]
pub struct NoInterrupt;

impl Trigger for NoInterrupt {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        Ok(())
    }
}

/// COM1 on the PIO bus.
pub struct Uart {
    serial: Serial<NoInterrupt, NoEvents, SinkWriter>,
}

impl std::fmt::Debug for Uart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uart").field("base", &UART_COM1).finish()
    }
}

impl Uart {
    /// A UART transmitting into `console`.
    pub fn new(console: ConsoleSink) -> Uart {
        Uart {
            serial: Serial::new(NoInterrupt, SinkWriter(console)),
        }
    }

    /// True if `port` is one of the UART's eight registers.
    pub fn decodes(port: u16) -> bool {
        (UART_COM1..UART_COM1 + 8).contains(&port)
    }

    /// Register write at `offset` (only the low byte of wider accesses is used).
    pub fn write(&mut self, offset: u16, data: &[u8]) {
        if let Some(&b) = data.first() {
            // The error type is Infallible for our trigger, and a failing echo is handled by
            // the sink itself, so the result carries nothing to act on.
            let _ = self.serial.write(offset as u8, b);
        }
    }

    /// Register read at `offset`.
    pub fn read(&mut self, offset: u16, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = self.serial.read(offset as u8);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transmits_bytes_and_reports_thr_empty() {
        let sink = ConsoleSink::new(None);
        let mut u = Uart::new(sink.clone());
        for b in b"hi\n" {
            u.write(0, &[*b]);
        }
        let mut lsr = [0u8];
        u.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "THRE set");
        assert_eq!(sink.captured(), b"hi\n");
    }
}
