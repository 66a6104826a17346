//! What every pvkit kernel needs around its `main`: the entry point, the ABI note, a console
//! for `println!`, panic and fault reporting, and the exit.
//!
//! ```ignore
//! #![no_std]
//! #![no_main]
//!
//! use guest_pv::kernel::Kernel;
//!
//! // `_start`, the ABI note (no required features) and the boot checks; then `main`.
//! guest_pv::entry!(main);
//!
//! fn main(kernel: Kernel) -> u32 {
//!     guest_pv::println!("hello, {:?} mode", kernel.platform.mode());
//!     0 // the VM's exit status
//! }
//!
//! #[panic_handler]
//! fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
//!     guest_pv::kernel::report_panic(info)
//! }
//! ```
//!
//! [`entry!`](crate::entry) defines `_start` (the symbol pvkit's boot protocol and the default
//! linker entry expect, so it cannot be misspelled) and runs [`start`]: it checks the boot-info
//! block ([`crate::boot::read`]), picks the [`Platform`] by detection with the kernel's
//! required features ([`Platform::init`]), records both for [`println!`](crate::println) and
//! [`report_panic`], calls `main` and exits with what it returns. Errors before `main` are
//! printed on COM1 and end the VM with [`exit_code::BAD_BOOT_INFO`] or
//! [`exit_code::MISSING_FEATURES`].

use core::fmt::{self, Write as _};
use core::panic::PanicInfo;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, Ordering};

use hypercall_abi::boot::{BootInfo, Mode};

use crate::console::LineWriter;
use crate::cpu::Fault;
use crate::{Console, Platform, Uart16550, boot, trapped};

/// Exit codes [`start`] and [`report_panic`] end the VM with.
pub mod exit_code {
    /// The boot-info block is missing or invalid.
    pub const BAD_BOOT_INFO: u32 = 3;
    /// The kernel's required features are not offered (or there is no pvkit host).
    pub const MISSING_FEATURES: u32 = 4;
    /// The kernel panicked or took a fatal CPU exception (`PVKIT-PANIC: …` was printed).
    pub const PANIC: u32 = 101;
}

/// What the first line of a panic report starts with.
pub const PANIC_PREFIX: &str = "PVKIT-PANIC: ";

/// A kernel entered through pvkit's boot protocol: the checked boot-info block and the platform
/// picked by detection. Holding one proves the machine is a pvkit VM (the block carried
/// pvkit's magic), so [`exit`](Self::exit) may fall back to pvkit's exit port.
#[derive(Debug, Clone, Copy)]
pub struct Kernel {
    /// The boot-info block (memory map, kernel image, workload name and arguments).
    pub boot_info: &'static BootInfo,
    /// PV or trapped, by detection.
    pub platform: Platform,
}

impl Kernel {
    /// A console of this kernel's platform (hypercall or COM1), already initialised.
    pub fn console(&self) -> Console {
        match self.platform.feature(hypercall_abi::features::CONSOLE) {
            Some(pv) => Console::Pv(pv.console()),
            // `set_current` initialised COM1 already; initialising it again would cost exits
            // and drop bytes still in the FIFO.
            None => Console::Uart(Uart16550::com1()),
        }
    }

    /// Writes pvkit's measurement marker port: [`MARKER_BEGIN`](hypercall_abi::ports::MARKER_BEGIN)
    /// and [`MARKER_END`](hypercall_abi::ports::MARKER_END) bracket the timed section
    /// `host-vmm run --stats` reports (wall time, vCPU CPU time, exits inside), in both modes.
    pub fn marker(&self, value: u32) {
        // SAFETY: a `Kernel` proves a pvkit VM (see `exit`); the marker port only records.
        unsafe { trapped::marker(value) }
    }

    /// Ends the VM with `code`: the `exit` hypercall if offered, else pvkit's exit port.
    pub fn exit(&self, code: u32) -> ! {
        // SAFETY: a `Kernel` exists only for a machine that booted us with a pvkit boot-info
        // block (see `start`), so it is a pvkit VM and the exit port is pvkit's.
        unsafe { self.platform.exit(code) }
    }
}

/// The boot-info block recorded by [`start`] (null before).
static BOOT_INFO: AtomicPtr<BootInfo> = AtomicPtr::new(core::ptr::null_mut());
/// `Mode as u32` of the recorded platform; 0 before [`start`] recorded one.
static MODE: AtomicU32 = AtomicU32::new(0);
/// Set by the first panic report; a panic while reporting only exits.
static PANICKING: AtomicBool = AtomicBool::new(false);

/// The kernel recorded by [`start`] (or [`set_current`]), if any. In PV mode the host token is
/// re-derived by CPUID (no hypercall), which succeeded at boot and so succeeds again.
pub fn current() -> Option<Kernel> {
    let info = BOOT_INFO.load(Ordering::Acquire);
    let platform = match Mode::from_raw(MODE.load(Ordering::Acquire))? {
        Mode::Trapped => Platform::Trapped,
        Mode::Pv => Platform::detect(),
    };
    // SAFETY: only `set_current` stores a non-null pointer, taken from a `&'static BootInfo`.
    let boot_info = unsafe { info.as_ref() }?;
    Some(Kernel {
        boot_info,
        platform,
    })
}

/// Records `kernel` for [`println!`](crate::println), [`report_panic`] and [`current`], and
/// initialises COM1 if its console is the UART. [`start`] does this; a kernel with its own
/// entry point calls it once it has a [`Kernel`].
pub fn set_current(kernel: Kernel) {
    // `Platform::console` initialises COM1 when the kernel's console is the UART.
    let _ = kernel.platform.console();
    BOOT_INFO.store(
        core::ptr::from_ref(kernel.boot_info).cast_mut(),
        Ordering::Release,
    );
    MODE.store(kernel.platform.mode() as u32, Ordering::Release);
}

/// The body of the `_start` that [`entry!`](crate::entry) defines: checks the boot info,
/// picks the platform (failing if a feature in `required` is missing), records them, runs
/// `main` and exits with its result.
///
/// # Safety
/// Called once, as the kernel's entry point, in pvkit's entry state: `boot_info` is the entry
/// argument (`rdi`), and what it points to is never written while the kernel runs.
pub unsafe fn start(boot_info: *const BootInfo, required: u64, main: fn(Kernel) -> u32) -> ! {
    // SAFETY: the caller's contract is `read`'s.
    let info = match unsafe { boot::read(boot_info) } {
        Ok(info) => info,
        Err(e) => fail(
            format_args!("invalid boot info: {e}"),
            exit_code::BAD_BOOT_INFO,
        ),
    };
    let platform = match Platform::init(required) {
        Ok(p) => p,
        Err(e) => fail(format_args!("{e}"), exit_code::MISSING_FEATURES),
    };
    let kernel = Kernel {
        boot_info: info,
        platform,
    };
    set_current(kernel);
    let code = main(kernel);
    kernel.exit(code)
}

/// Reports a fatal boot error on COM1 and ends the VM through pvkit's exit port (used before
/// the kernel's console and exit path are known to work).
fn fail(msg: fmt::Arguments<'_>, code: u32) -> ! {
    let mut console = Console::uart();
    crate::console::print_line(&mut console, format_args!("error: {msg}"));
    // SAFETY: `start` runs only as a pvkit kernel's entry point (its contract): the machine is
    // a pvkit VM, whose exit port ends it.
    unsafe { trapped::exit_port(code) }
}

/// Writes one line on the recorded kernel's console (COM1 before [`start`] recorded one). What
/// [`println!`](crate::println) expands to.
pub fn print_line(args: fmt::Arguments<'_>) {
    let mut console = match current() {
        Some(k) => k.console(),
        None => Console::Uart(Uart16550::com1()),
    };
    crate::console::print_line(&mut console, args);
}

/// Prints `PVKIT-PANIC: <message> at <file>:<line>:<column>` on the kernel's console (COM1 if
/// that fails) and ends the VM with [`exit_code::PANIC`]. Call it from your `#[panic_handler]`.
pub fn report_panic(info: &PanicInfo<'_>) -> ! {
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

/// Reports a fatal CPU exception like a panic (`PVKIT-PANIC: CPU exception 14 (#PF page fault):
/// …`). Pass it to [`cpu::init`](crate::cpu::init) as the fatal hook.
pub fn report_fault(fault: &Fault) -> ! {
    die(format_args!("{fault}"))
}

/// Prints the panic line once (a panic while reporting only exits) and exits.
fn die(msg: fmt::Arguments<'_>) -> ! {
    let kernel = current();
    if !PANICKING.swap(true, Ordering::Relaxed) {
        let mut console = match kernel {
            Some(k) => k.console(),
            None => Console::uart(),
        };
        let mut line = LineWriter::new(&mut console);
        let ok = writeln!(line, "{PANIC_PREFIX}{msg}").is_ok() && line.flush().is_ok();
        drop(line);
        if !ok {
            let mut uart = Console::uart();
            crate::console::print_line(&mut uart, format_args!("{PANIC_PREFIX}{msg}"));
        }
    }
    match kernel {
        Some(k) => k.exit(exit_code::PANIC),
        // SAFETY: without a recorded kernel we can only assume pvkit (this crate's kernels are
        // entered by pvkit); the exit port write is harmless elsewhere, and we halt after it.
        None => unsafe { trapped::exit_port(exit_code::PANIC) },
    }
}

/// Emits the pvkit ABI note (see [`hypercall_abi::note`]): the ABI version this kernel was built
/// against and the feature bits it cannot run without (`0`: none, it falls back by itself).
/// [`entry!`](crate::entry) emits it; use this only with an entry point of your own, once per
/// kernel.
#[macro_export]
macro_rules! abi_note {
    ($required:expr) => {
        #[used]
        #[unsafe(link_section = ".note.pvkit")]
        static PVKIT_ABI_NOTE: $crate::abi::note::AbiNote =
            $crate::abi::note::AbiNote::new($required);
    };
}

/// Defines the kernel's entry point `_start` and its ABI note, and runs `main` (a
/// `fn(guest_pv::kernel::Kernel) -> u32` returning the exit code) after the boot checks of
/// [`kernel::start`](crate::kernel::start).
///
/// `entry!(main)` requires no feature: the kernel runs under any pvkit VM and falls back to
/// trapped devices. `entry!(main, requires = features::MMU_UPDATE | …)` makes `host-vmm` refuse
/// to boot it where a listed feature is not offered (and `start` stop with a clear error if it
/// is booted anyway).
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        $crate::entry!($main, requires = 0);
    };
    ($main:path, requires = $required:expr) => {
        $crate::abi_note!($required);

        /// The entry point pvkit's boot protocol jumps to, with `rdi` = the boot-info block.
        ///
        /// # Safety
        /// Only pvkit's VMM calls this, in its entry state.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn _start(boot_info: *const $crate::abi::boot::BootInfo) -> ! {
            let main: fn($crate::kernel::Kernel) -> u32 = $main;
            // SAFETY: this is the kernel's entry point, entered once by pvkit's VMM in its
            // entry state with `rdi` = the immutable boot-info page.
            unsafe { $crate::kernel::start(boot_info, $required, main) }
        }
    };
}

/// Prints one line on the kernel's console, like `std`'s `println!`: one `console_write` exit
/// per line under pvkit, COM1 otherwise (see [`kernel::print_line`](crate::kernel::print_line)).
#[macro_export]
macro_rules! println {
    () => {
        $crate::kernel::print_line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::kernel::print_line(format_args!($($arg)*))
    };
}
