//! COM1: a 16550A UART (vm-superio), the trapped twin of `console_write`. Each byte the guest
//! transmits is one exit.

use hypercall_abi::ports::UART_COM1;
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};

use crate::bus::{BusAction, BusDevice};
use crate::console::{ConsoleSink, SinkWriter};
use crate::state::{Persist, StateError};

/// The UART's registers: eight ports from [`UART_COM1`].
pub const UART_PORTS: u64 = 8;

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
    console: ConsoleSink,
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
            serial: Serial::new(NoInterrupt, SinkWriter(console.clone())),
            console,
        }
    }
}

impl BusDevice for Uart {
    fn name(&self) -> &'static str {
        "uart"
    }

    /// Register read at `offset` (the low byte; wider accesses read zeros above it).
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = self.serial.read(offset as u8);
        }
    }

    /// Register write at `offset` (only the low byte of wider accesses is used).
    fn write(&mut self, offset: u64, data: &[u8]) -> BusAction {
        if let Some(&b) = data.first() {
            // The error type is Infallible for our trigger, and a failing echo is handled by
            // the sink itself, so the result carries nothing to act on.
            let _ = self.serial.write(offset as u8, b);
        }
        BusAction::Continue
    }
}

/// [`Uart`] state: the 16550A registers and the receive FIFO (vm-superio's `SerialState`,
/// as data).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UartState {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Bytes received and not read yet.
    pub in_buffer: Vec<u8>,
}

impl Persist for Uart {
    type State = UartState;

    fn save(&self) -> UartState {
        let s = self.serial.state();
        UartState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    fn restore(&mut self, s: &UartState) -> Result<(), StateError> {
        let state = SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        };
        let serial = Serial::from_state(
            &state,
            NoInterrupt,
            NoEvents,
            SinkWriter(self.console.clone()),
        )
        .map_err(|e| StateError::invalid("uart", format!("{e:?}")))?;
        self.serial = serial;
        Ok(())
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
        u.write(7, &[0x5a]); // scratch
        let mut fresh = Uart::new(ConsoleSink::new(None));
        crate::state::assert_round_trip(&u, &mut fresh);
        let mut scratch = [0u8];
        fresh.read(7, &mut scratch);
        assert_eq!(scratch, [0x5a]);
        let mut bad = u.save();
        bad.in_buffer = vec![0; 1000];
        assert!(fresh.restore(&bad).is_err(), "an overlong FIFO is refused");
        let mut lsr = [0u8];
        u.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "THRE set");
        assert_eq!(sink.captured(), b"hi\n");
    }
}
