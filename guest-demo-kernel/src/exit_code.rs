//! The kernel's exit codes (what the host sees as the VM's exit status).

/// The workload ran and its `PVKIT-RESULT` line was printed.
pub const OK: u32 = 0;
/// The workload ran and printed its `PVKIT-RESULT` line, but what it checks did not hold
/// (`blk`'s `write-ro-probe`: the write was not refused with an I/O error).
pub const CHECK_FAILED: u32 = 1;
/// Unknown workload, or bad workload arguments.
pub const USAGE: u32 = 2;
/// The boot-info block is missing, invalid, or asks for an unknown mode.
pub const BAD_BOOT_INFO: u32 = 3;
/// Mode `pv` was requested but no (suitable) pvkit host was detected.
pub const NO_PVKIT: u32 = 4;
/// The kernel panicked (`PVKIT-PANIC: …` was printed).
pub const PANIC: u32 = 101;
