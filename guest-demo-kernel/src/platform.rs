//! How the kernel talks to the host, fixed at boot: [`Platform::Pv`] (hypercalls) or
//! [`Platform::Trapped`] (port I/O only), plus safe wrappers of the trapped-device ports, and the
//! kernel's use of the CPL 3 runtime ([`init_cpu`], [`at_cpl3`]).
//!
//! # Why the trapped ports are safe to use here
//! `guest_pv::trapped` is `unsafe` because its ports are pvkit's, not a PC convention. This
//! kernel is built for pvkit only: `_start` follows pvkit's boot protocol (a pvkit `BootInfo` in
//! `rdi`), and no other loader enters it. So the exit, marker and null ports are pvkit's
//! emulated devices (as are the timer and event ports), which touch no guest memory.

use core::sync::atomic::{AtomicU32, Ordering};

use guest_pv::{Console, Pvkit, cpu, trapped};
use hypercall_abi::boot::Mode;
use hypercall_abi::ports::{MARKER_BEGIN, MARKER_CHECKPOINT, MARKER_END};

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

/// Marks a checkpoint inside the timed section (both modes): the host records how much guest
/// RAM is resident.
pub fn marker_checkpoint() {
    // SAFETY: a pvkit VM (module docs); the marker port only records the value.
    unsafe { trapped::marker(MARKER_CHECKPOINT) }
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

/// Starts the trapped periodic timer with a period of `period_us` µs (any mode).
pub fn timer_start(period_us: u32) {
    // SAFETY: a pvkit VM (module docs); the timer port only programs the host's timer.
    unsafe { trapped::timer_start(period_us) }
}

/// Stops the trapped periodic timer (any mode).
pub fn timer_stop() {
    // SAFETY: a pvkit VM (module docs); the timer port only stops the host's timer.
    unsafe { trapped::timer_stop() }
}

/// Ends the VM through the exit port (any mode).
pub fn exit_port(code: u32) -> ! {
    // SAFETY: a pvkit VM (module docs); the exit port ends the VM.
    unsafe { trapped::exit_port(code) }
}

/// Bytes of the stack [`at_cpl3`] runs code on.
const USER_STACK_SIZE: usize = 64 * 1024;

/// The stack of CPL 3 code.
#[repr(C, align(16))]
struct UserStack([u8; USER_STACK_SIZE]);

/// Used only by [`at_cpl3`], through a raw pointer.
static mut USER_STACK: UserStack = UserStack([0; USER_STACK_SIZE]);

/// Installs the CPL 3 runtime (`guest_pv::cpu`): its GDT, TSS and IDT, with fatal exceptions
/// reported like panics. Called once at boot.
pub fn init_cpu() {
    // SAFETY: called once, from `_start` at CPL 0 with interrupts disabled (pvkit's entry state)
    // on pvkit's single vCPU. The kernel is flat (base 0) in pvkit's boot selectors 0x08/0x10,
    // which the new GDT keeps, and has no GDT, TSS or IDT of its own.
    unsafe { cpu::init(crate::panic::cpu_fault) }
}

/// Runs `f` at CPL 3 (natively on pvkit's KVM, where CPL 0 code is emulated) on this kernel's
/// user stack and returns its result. In `f`, privileged operations go through
/// `guest_pv::cpu`'s services (`flush_tlb`, `load_cr3`); console, hypercalls, markers, exit
/// and panics work as at CPL 0.
pub fn at_cpl3<F: FnOnce() -> u64>(f: F) -> u64 {
    let top = (&raw mut USER_STACK).addr() as u64 + USER_STACK_SIZE as u64;
    // SAFETY: `init_cpu` ran at boot (in `_start`, before any workload). `run_user` itself
    // refuses a call at CPL 3 or from inside another `run_user` (fatally, before touching the
    // stack), so the user stack, used by nothing else, is never shared. Everything is mapped
    // user-accessible by pvkit's boot identity map (U set at every level), and the workloads'
    // CPL 3 code uses no privileged instruction.
    unsafe { cpu::run_user_with(top, f) }
}
