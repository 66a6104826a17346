//! Trapped devices on the PIO bus: what an unmodified guest talks to. Every access here is a
//! full exit to the VMM.

pub mod debug;
pub mod serial;

use hypercall_abi::ports::{EXIT_PORT, MARKER_PORT, NULL_PORT, UART_COM1};

use crate::console::ConsoleSink;
use crate::metrics::ExitStats;

/// What the vCPU loop must do after a PIO access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PioAction {
    /// Nothing: resume the guest.
    Continue,
    /// The guest asked to exit with this code.
    Exit(u32),
    /// A measurement marker with this value.
    Marker(u32),
}

/// The devices behind I/O ports.
#[derive(Debug)]
pub struct PioBus {
    serial: serial::Uart,
    null: debug::NullDevice,
}

/// Which device decodes `port`, by stable name.
fn device_name(port: u16) -> &'static str {
    match port {
        p if serial::Uart::decodes(p) => "uart",
        EXIT_PORT => "exit",
        MARKER_PORT => "marker",
        NULL_PORT => "null",
        _ => "unclaimed",
    }
}

impl PioBus {
    /// The standard devices, with the UART writing into `console`.
    pub fn new(console: ConsoleSink) -> PioBus {
        PioBus {
            serial: serial::Uart::new(console),
            null: debug::NullDevice::default(),
        }
    }

    /// A guest `out`.
    pub fn write(&mut self, port: u16, data: &[u8], stats: &mut ExitStats) -> PioAction {
        let name = device_name(port);
        stats.record_device(name);
        match name {
            "uart" => self.serial.write(port - UART_COM1, data),
            "exit" => return PioAction::Exit(debug::le_u32(data)),
            "marker" => return PioAction::Marker(debug::le_u32(data)),
            "null" => self.null.write(data),
            // Writes to unclaimed ports are dropped, as on a real ISA bus.
            _ => {}
        }
        PioAction::Continue
    }

    /// A guest `in`; fills `data`.
    pub fn read(&mut self, port: u16, data: &mut [u8], stats: &mut ExitStats) {
        let name = device_name(port);
        stats.record_device(name);
        match name {
            "uart" => self.serial.read(port - UART_COM1, data),
            "null" => self.null.read(data),
            // Unclaimed ports float high, as on a real ISA bus.
            _ => data.fill(0xff),
        }
    }

    /// Writes seen by the null device so far.
    pub fn null_writes(&self) -> u64 {
        self.null.writes()
    }
}
