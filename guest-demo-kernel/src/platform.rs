//! How the kernel talks to the host: [`Platform`] (guest-pv's, fixed at boot by detection;
//! each PV mechanism is used only if its feature bit is set, else its trapped twin), plus safe
//! wrappers of the trapped-device ports, and the kernel's use of the CPL 3 runtime
//! ([`init_cpu`], [`at_cpl3`]).
//!
//! # Why the trapped ports are safe to use here
//! `guest_pv::trapped` is `unsafe` because its ports are pvkit's, not a PC convention. This
//! kernel is built for pvkit only: it is entered through `guest_pv::entry!`, which checks for a
//! pvkit `BootInfo` in `rdi`, and no other loader enters it. So the exit, marker and null ports
//! are pvkit's emulated devices (as are the timer and event ports), which touch no guest memory.

use guest_pv::{cpu, trapped};
use hypercall_abi::ports::{MARKER_BEGIN, MARKER_CHECKPOINT, MARKER_END};

pub use guest_pv::Platform;

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

/// Bytes of the stack [`at_cpl3`] runs code on.
const USER_STACK_SIZE: usize = 64 * 1024;

/// The stack of CPL 3 code.
#[repr(C, align(16))]
struct UserStack([u8; USER_STACK_SIZE]);

/// Used only by [`at_cpl3`], through a raw pointer.
static mut USER_STACK: UserStack = UserStack([0; USER_STACK_SIZE]);

/// Installs the CPL 3 runtime (`guest_pv::cpu`): its GDT, TSS and IDT, with fatal exceptions
/// reported like panics (`guest_pv::kernel::report_fault`). Called once at boot.
pub fn init_cpu() {
    // SAFETY: called once, from `kmain` at CPL 0 with interrupts disabled (pvkit's entry state)
    // on pvkit's single vCPU. The kernel is flat (base 0) in pvkit's boot selectors 0x08/0x10,
    // which the new GDT keeps, and has no GDT, TSS or IDT of its own.
    unsafe { cpu::init(guest_pv::kernel::report_fault) }
}

/// Runs `f` at CPL 3 (natively on pvkit's KVM, where CPL 0 code is emulated) on this kernel's
/// user stack and returns its result. In `f`, privileged operations go through
/// `guest_pv::cpu`'s services (`flush_tlb`, `load_cr3`); console, hypercalls, markers, exit
/// and panics work as at CPL 0.
pub fn at_cpl3<F: FnOnce() -> u64>(f: F) -> u64 {
    let top = (&raw mut USER_STACK).addr() as u64 + USER_STACK_SIZE as u64;
    // SAFETY: `init_cpu` ran at boot (in `kmain`, before any workload). `run_user` itself
    // refuses a call at CPL 3 or from inside another `run_user` (fatally, before touching the
    // stack), so the user stack, used by nothing else, is never shared. Everything is mapped
    // user-accessible by pvkit's boot identity map (U set at every level), and the workloads'
    // CPL 3 code uses no privileged instruction.
    unsafe { cpu::run_user_with(top, f) }
}
