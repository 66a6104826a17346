//! The panic handler: `PVKIT-PANIC: <message> at <file>:<line>:<column>` on the current mode's
//! console, then exit code [`exit_code::PANIC`] through the mode's exit path.

use core::fmt::Write;
use core::panic::PanicInfo;
use core::sync::atomic::{AtomicBool, Ordering};

use guest_pv::{Console, Uart16550};

use crate::exit_code;
use crate::out::LineBuf;
use crate::platform::{self, Platform};

/// Set by the first panic; a panic while reporting it exits without printing again.
static PANICKING: AtomicBool = AtomicBool::new(false);

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    let current = platform::current();
    if !PANICKING.swap(true, Ordering::Relaxed) {
        report(current, info);
    }
    match current {
        Some(p) => p.exit(exit_code::PANIC),
        None => platform::exit_port(exit_code::PANIC),
    }
}

/// Prints the panic line on the mode's console, or on COM1 if that fails.
fn report(current: Option<Platform>, info: &PanicInfo<'_>) {
    let mut line = LineBuf::new();
    let _ = write!(line, "PVKIT-PANIC: {}", info.message());
    if let Some(loc) = info.location() {
        let _ = write!(line, " at {}:{}:{}", loc.file(), loc.line(), loc.column());
    }
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
