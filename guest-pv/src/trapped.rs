//! The trapped twins: port I/O to pvkit's emulated devices, no hypercall involved.
//!
//! This is what an unmodified guest has: every access is a full exit to the VMM, which emulates
//! the device. They work in both of pvkit's modes; in `trapped` mode a kernel uses nothing else
//! (plus the UART, [`crate::uart`]).
//!
//! # Why these functions are `unsafe`
//! The ports ([`EXIT_PORT`], [`MARKER_PORT`], [`NULL_PORT`], [`TIMER_PORT`], [`EVENT_PORT`])
//! are pvkit's choice, not a PC
//! convention: on real hardware or under another VMM the same port numbers can belong to a
//! chipset device (the `0x500` range often holds GPIO or ACPI registers), and writing there could
//! do anything. The caller must know the machine is a pvkit VM: it was entered through pvkit's
//! boot protocol (a valid [`hypercall_abi::boot::BootInfo`]), or [`crate::detect()`] succeeded.
//! All of them also need I/O privilege (CPL 0 under pvkit's boot state, or CPL 3 with the I/O
//! permission bitmap of [`crate::cpu::init`]).

use core::sync::atomic::{Ordering, compiler_fence};

pub use hypercall_abi::idle::{EVENT_PORT, TIMER_PORT};
pub use hypercall_abi::ports::{
    EXIT_PORT, MARKER_BEGIN, MARKER_CHECKPOINT, MARKER_END, MARKER_PORT, NULL_PORT,
};
use x86_64::instructions::port::Port;

use crate::halt_forever;

/// Ends the VM with exit `code` (a 32-bit `out` to [`EXIT_PORT`]); halts forever should the VMM
/// not stop it. The trapped twin of [`crate::Pvkit::exit`].
///
/// # Safety
/// The machine must be a pvkit VM (see the [module docs](self)).
pub unsafe fn exit_port(code: u32) -> ! {
    // SAFETY: the caller guarantees a pvkit VM, whose exit port ends the VM and touches no guest
    // memory.
    unsafe { out32(EXIT_PORT, code) };
    halt_forever()
}

/// Writes a measurement marker ([`MARKER_BEGIN`], [`MARKER_END`] or [`MARKER_CHECKPOINT`]) to
/// [`MARKER_PORT`]; the host timestamps begin and end and counts exits between the two, and
/// records how much guest RAM is resident at begin, at each checkpoint and at end.
///
/// Compiler fences on both sides keep the compiler from moving the workload's memory accesses
/// across the marker (the `out` itself is declared as touching no memory).
///
/// # Safety
/// The machine must be a pvkit VM (see the [module docs](self)).
#[inline]
pub unsafe fn marker(v: u32) {
    compiler_fence(Ordering::SeqCst);
    // SAFETY: the caller guarantees a pvkit VM, whose marker port only records the value.
    unsafe { out32(MARKER_PORT, v) };
    compiler_fence(Ordering::SeqCst);
}

/// A 32-bit `out` of `v` to [`NULL_PORT`]: the host latches and counts it. The trapped twin of
/// [`crate::Pvkit::null`].
///
/// # Safety
/// The machine must be a pvkit VM (see the [module docs](self)).
#[inline]
pub unsafe fn null_port_write(v: u32) {
    // SAFETY: the caller guarantees a pvkit VM, whose null port only counts the write.
    unsafe { out32(NULL_PORT, v) };
}

/// A 32-bit `in` from [`NULL_PORT`]: the number of [`null_port_write`]s the host has seen so far
/// (low 32 bits).
///
/// # Safety
/// The machine must be a pvkit VM (see the [module docs](self)).
#[inline]
pub unsafe fn null_port_read() -> u32 {
    let mut port = Port::<u32>::new(NULL_PORT);
    // SAFETY: the caller guarantees a pvkit VM, whose null port returns its counter and has no
    // side effect on a read.
    unsafe { port.read() }
}

/// Starts the trapped periodic timer with a period of `period_us` microseconds (a 32-bit `out`
/// to [`TIMER_PORT`]; the host raises periods below
/// [`hypercall_abi::idle::TIMER_MIN_PERIOD_US`] to it), or restarts it with the new period.
/// Each tick raises [`hypercall_abi::idle::TIMER_VECTOR`] when the guest can take it — the host
/// delivers it when the guest halts with interrupts enabled ([`crate::cpu::wait_for_interrupt`]),
/// coalescing the ticks that fell due while it ran. `period_us` = 0 stops it, like
/// [`timer_stop`].
///
/// # Safety
/// The machine must be a pvkit VM (see the [module docs](self)).
#[inline]
pub unsafe fn timer_start(period_us: u32) {
    // SAFETY: the caller guarantees a pvkit VM, whose timer port only (re)programs the timer.
    unsafe { out32(TIMER_PORT, period_us) };
}

/// Stops the trapped periodic timer (a 32-bit `out` of 0 to [`TIMER_PORT`]).
///
/// # Safety
/// The machine must be a pvkit VM (see the [module docs](self)).
#[inline]
pub unsafe fn timer_stop() {
    // SAFETY: the caller guarantees a pvkit VM, whose timer port only stops the timer.
    unsafe { out32(TIMER_PORT, 0) };
}

/// Schedules one event `delay_us` microseconds from now on the event device (a 32-bit `out` to
/// [`EVENT_PORT`]; delays above [`hypercall_abi::idle::EVENT_MAX_DELAY_US`] are clamped). The
/// event wakes a parked [`crate::Pvkit::idle_yield`] or, for a guest halted with interrupts
/// enabled, raises [`hypercall_abi::idle::EVENT_VECTOR`].
///
/// # Safety
/// The machine must be a pvkit VM (see the [module docs](self)).
#[inline]
pub unsafe fn event_schedule(delay_us: u32) {
    // SAFETY: the caller guarantees a pvkit VM, whose event port only schedules a host-side
    // event; it touches no guest memory.
    unsafe { out32(EVENT_PORT, delay_us) };
}

/// The number of events the guest has consumed so far (a 32-bit `in` from [`EVENT_PORT`]; low
/// 32 bits): through `idle_yield` wake-ups or [`hypercall_abi::idle::EVENT_VECTOR`] interrupts.
///
/// # Safety
/// The machine must be a pvkit VM (see the [module docs](self)).
#[inline]
pub unsafe fn events_delivered() -> u32 {
    let mut port = Port::<u32>::new(EVENT_PORT);
    // SAFETY: the caller guarantees a pvkit VM, whose event port returns its counter and has no
    // side effect on a read.
    unsafe { port.read() }
}

/// A 32-bit `out` of `v` to `port`.
///
/// # Safety
/// `port` must be one of pvkit's trapped-device ports and the machine a pvkit VM.
#[inline]
unsafe fn out32(port: u16, v: u32) {
    let mut port = Port::<u32>::new(port);
    // SAFETY: forwarded from this function's contract: the port is a pvkit device port whose
    // write has no effect on guest memory.
    unsafe { port.write(v) };
}
