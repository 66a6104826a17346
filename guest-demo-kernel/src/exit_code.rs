//! The kernel's exit codes (what the host sees as the VM's exit status).

/// The workload ran and its `PVKIT-RESULT` line was printed.
pub const OK: u32 = 0;
/// The workload ran and printed its `PVKIT-RESULT` line, but what it checks did not hold
/// (`blk`'s `write-ro-probe`: the write was not refused with an I/O error).
pub const CHECK_FAILED: u32 = 1;
/// Unknown workload, or bad workload arguments.
pub const USAGE: u32 = 2;
/// The host lacks something the workload cannot do without (e.g. any way to read the TSC rate).
pub const UNSUPPORTED: u32 = 4;
// Before `kmain`, guest-pv's entry ends the VM with 3 (bad boot info) or 4 (a required feature
// is missing); a panic or fatal CPU exception ends it with 101 (`PVKIT-PANIC: …` was printed).
// See `guest_pv::kernel::exit_code`.
