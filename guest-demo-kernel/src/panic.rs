//! The panic handler: guest-pv's reporter prints `PVKIT-PANIC: <message> at
//! <file>:<line>:<column>` on the kernel's console and exits with code 101
//! (`guest_pv::kernel::exit_code::PANIC`). A fatal CPU exception ends the same way with
//! `PVKIT-PANIC: <fault>` (`guest_pv::kernel::report_fault`, registered in
//! [`crate::platform::init_cpu`]). Both work at CPL 0 and CPL 3 (console and exit are port I/O,
//! allowed at CPL 3 by the TSS I/O bitmap).

use core::panic::PanicInfo;

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    guest_pv::kernel::report_panic(info)
}
