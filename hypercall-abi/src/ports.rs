//! I/O ports of the *trapped* devices: what an unmodified guest uses instead of hypercalls.
//!
//! Each access to one of these ports is a full exit to the VMM, which emulates the device.
//! They exist in both modes; in `trapped` mode the demo kernel uses nothing else.

/// COM1 base: a 16550A UART (the trapped twin of `console_write`).
pub const UART_COM1: u16 = 0x3f8;
/// The trapped twin of `exit`: a 32-bit `out` of the exit code ends the VM.
pub const EXIT_PORT: u16 = 0x0501;
/// Measurement marker: a 32-bit `out` of [`MARKER_BEGIN`] or [`MARKER_END`] brackets the timed
/// part of a workload. The host timestamps each marker and counts exits between them. It is
/// part of the benchmark harness, not of the workload, and is used identically in both modes.
pub const MARKER_PORT: u16 = 0x0502;
/// Value written to [`MARKER_PORT`] when the timed section begins.
pub const MARKER_BEGIN: u32 = 1;
/// Value written to [`MARKER_PORT`] when the timed section ends.
pub const MARKER_END: u32 = 2;
/// Value written to [`MARKER_PORT`] at a checkpoint inside the timed section: the host records
/// how much of guest RAM is backed by host memory (resident) at that point.
pub const MARKER_CHECKPOINT: u32 = 3;
/// The trapped twin of the `null` hypercall: a scratch device. A 32-bit `out` is latched and
/// counted; a 32-bit `in` returns the number of `out`s seen so far (low 32 bits).
pub const NULL_PORT: u16 = 0x0503;
