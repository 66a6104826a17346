//! The panic handler: `PVKIT-PANIC: <message> at <file>:<line>:<column>` on the current mode's
//! console, then exit code [`exit_code::PANIC`] through the mode's exit path. A fatal CPU
//! exception ([`cpu_fault`], the hook of `guest_pv::cpu`) ends the same way, with
//! `PVKIT-PANIC: <fault>` (see `guest_pv::cpu::Fault`'s `Display`).
//!
//! Both work at CPL 0 and CPL 3 (console and exit are port I/O, allowed at CPL 3 by the TSS I/O
//! bitmap).

use core::fmt::{self, Write};
use core::panic::PanicInfo;
use core::sync::atomic::{AtomicBool, Ordering};

use guest_pv::cpu::Fault;
use guest_pv::{Console, Uart16550};

use crate::exit_code;
use crate::out::LineBuf;
use crate::platform::{self, Platform};

/// Set by the first panic; a panic while reporting it exits without printing again.
static PANICKING: AtomicBool = AtomicBool::new(false);

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    match info.location() {
        Some(loc) => die(format_args!(
            "{} at {}:{}:{}",
            info.message(),
            loc.file(),
            loc.line(),
            loc.column()
        )),
        None => die(format_args!("{}", info.message())),
    }
}

/// The fatal-exception hook registered with `guest_pv::cpu::init`: reports the fault like a
/// panic (`PVKIT-PANIC: CPU exception 14 (#PF page fault): error code 0x4, rip …`).
pub fn cpu_fault(fault: &Fault) -> ! {
    die(format_args!("{fault}"))
}

/// Prints `PVKIT-PANIC: <msg>` (once: a panic while reporting only exits) and exits with
/// [`exit_code::PANIC`].
fn die(msg: fmt::Arguments<'_>) -> ! {
    let current = platform::current();
    if !PANICKING.swap(true, Ordering::Relaxed) {
        report(current, msg);
    }
    match current {
        Some(p) => p.exit(exit_code::PANIC),
        None => platform::exit_port(exit_code::PANIC),
    }
}

/// Prints the panic line on the mode's console, or on COM1 if that fails.
fn report(current: Option<Platform>, msg: fmt::Arguments<'_>) {
    let mut line = LineBuf::new();
    let _ = write!(line, "PVKIT-PANIC: {msg}");
    let line = line.finish();
    let mut console = match current {
        Some(Platform::Pv(pv)) => Console::Pv(pv.console()),
        // Initialised at boot; initialising again would drop bytes still in the FIFO.
        Some(Platform::Trapped) => Console::Uart(Uart16550::com1()),
        None => uart_console(),
    };
    if console.write_bytes(line).is_err() {
        let _ = uart_console().write_bytes(line);
    }
}

fn uart_console() -> Console {
    let mut uart = Uart16550::com1();
    uart.init();
    Console::Uart(uart)
}
