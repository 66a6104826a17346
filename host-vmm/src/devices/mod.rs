//! Trapped devices on the PIO bus: what an unmodified guest talks to. Every access here is a
//! full exit to the VMM.

pub mod debug;
pub mod event;
pub mod serial;
pub mod timer;
pub mod virtio;

use std::time::Duration;

use hypercall_abi::idle::{EVENT_MAX_DELAY_US, EVENT_PORT, TIMER_PORT};
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
    /// The periodic timer (trapped idle).
    pub timer: timer::PeriodicTimer,
    /// The VM's pending events.
    pub events: event::EventQueue,
    /// The event device.
    pub event_device: event::EventDevice,
}

/// Which device decodes `port`, by stable name.
fn device_name(port: u16) -> &'static str {
    match port {
        p if serial::Uart::decodes(p) => "uart",
        EXIT_PORT => "exit",
        MARKER_PORT => "marker",
        NULL_PORT => "null",
        TIMER_PORT => "timer",
        EVENT_PORT => "event",
        _ => "unclaimed",
    }
}

impl PioBus {
    /// The standard devices, with the UART writing into `console`.
    pub fn new(console: ConsoleSink) -> PioBus {
        let events = event::EventQueue::default();
        PioBus {
            serial: serial::Uart::new(console),
            null: debug::NullDevice::default(),
            timer: timer::PeriodicTimer::default(),
            event_device: event::EventDevice::new(events.waker()),
            events,
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
            "timer" => self.timer.program(debug::le_u32(data)),
            "event" => {
                let us = debug::le_u32(data).min(EVENT_MAX_DELAY_US);
                self.event_device
                    .schedule(Duration::from_micros(u64::from(us)));
            }
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
            "event" => debug::put_le_u32(data, self.events.delivered() as u32),
            // Unclaimed ports float high, as on a real ISA bus.
            _ => data.fill(0xff),
        }
    }

    /// Writes seen by the null device so far.
    pub fn null_writes(&self) -> u64 {
        self.null.writes()
    }
}
