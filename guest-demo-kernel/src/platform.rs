//! How the kernel talks to the host, fixed at boot: [`Platform::Pv`] (hypercalls) or
//! [`Platform::Trapped`] (port I/O only), plus safe wrappers of the trapped-device ports.
//!
//! # Why the trapped ports are safe to use here
//! `guest_pv::trapped` is `unsafe` because its ports are pvkit's, not a PC convention. This
//! kernel is built for pvkit only: `_start` follows pvkit's boot protocol (a pvkit `BootInfo` in
//! `rdi`), and no other loader enters it. So the exit, marker and null ports are pvkit's
//! emulated devices, which touch no guest memory.

use core::sync::atomic::{AtomicU32, Ordering};

use guest_pv::{Console, Pvkit, trapped};
use hypercall_abi::boot::Mode;
use hypercall_abi::ports::{MARKER_BEGIN, MARKER_END};

/// The mode chosen at boot, with the host token in PV mode.
#[derive(Debug, Clone, Copy)]
pub enum Platform {
    /// Hypercalls wherever the ABI offers them.
    Pv(Pvkit),
    /// No hypercall at all: UART and trapped ports only.
    Trapped,
}

impl Platform {
    /// The boot mode.
    pub const fn mode(&self) -> Mode {
        match self {
            Platform::Pv(_) => Mode::Pv,
            Platform::Trapped => Mode::Trapped,
        }
    }

    /// The host token, in PV mode only.
    pub const fn pvkit(&self) -> Option<Pvkit> {
        match self {
            Platform::Pv(pv) => Some(*pv),
            Platform::Trapped => None,
        }
    }

    /// A new console of this mode (initialises the UART in trapped mode).
    pub fn console(&self) -> Console {
        Console::new(self.mode(), self.pvkit())
    }

    /// Ends the VM: the `exit` hypercall in PV mode, the exit port in trapped mode.
    pub fn exit(&self, code: u32) -> ! {
        // SAFETY: this kernel only runs under pvkit (module docs), so the exit port the trapped
        // path uses is pvkit's.
        unsafe { guest_pv::exit(self.mode(), self.pvkit(), code) }
    }
}

/// `Mode as u32` once the boot mode and its console are set up; 0 before.
static CURRENT_MODE: AtomicU32 = AtomicU32::new(0);

/// Records the boot platform for the panic handler (call once its console is initialised).
pub fn set_current(platform: Platform) {
    CURRENT_MODE.store(platform.mode() as u32, Ordering::Relaxed);
}

/// The platform recorded by [`set_current`], if any. In PV mode the token is re-derived with
/// CPUID (no hypercall), which succeeded at boot and so succeeds again.
pub fn current() -> Option<Platform> {
    match Mode::from_raw(CURRENT_MODE.load(Ordering::Relaxed))? {
        Mode::Trapped => Some(Platform::Trapped),
        Mode::Pv => guest_pv::detect().map(Platform::Pv),
    }
}

/// Marks the start of a workload's timed section (both modes).
pub fn marker_begin() {
    // SAFETY: a pvkit VM (module docs); the marker port only records the value.
    unsafe { trapped::marker(MARKER_BEGIN) }
}

/// Marks the end of a workload's timed section (both modes).
pub fn marker_end() {
    // SAFETY: a pvkit VM (module docs); the marker port only records the value.
    unsafe { trapped::marker(MARKER_END) }
}

/// Writes `i as u32` to the null port for `i` = `0..n` in one tight loop; returns the wrapping
/// sum of the `i`s (the trapped twin of `Pvkit::null_loop`).
pub fn null_port_loop(n: u64) -> u64 {
    // SAFETY: a pvkit VM (module docs); the null port only counts the writes.
    unsafe { trapped::null_port_loop(n) }
}

/// The number of null-port writes the host has counted (low 32 bits).
pub fn null_port_read() -> u32 {
    // SAFETY: a pvkit VM (module docs); reading the null port has no side effect.
    unsafe { trapped::null_port_read() }
}

/// Ends the VM through the exit port (any mode).
pub fn exit_port(code: u32) -> ! {
    // SAFETY: a pvkit VM (module docs); the exit port ends the VM.
    unsafe { trapped::exit_port(code) }
}
