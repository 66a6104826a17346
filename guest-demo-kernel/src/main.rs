//! pvkit's demo guest kernel.
//!
//! Entered by pvkit's VMM at [`_start`] (64-bit long mode, CPL 0, interrupts off, identity map
//! of `0..4 GiB`, `rdi` = [`BootInfo`]). It greets, runs the workload named in the boot info in
//! the requested mode (PV: hypercalls; trapped: port I/O only), prints one `PVKIT-RESULT` line
//! and exits. See `README.md` for the workloads, their arguments and the output format.
#![no_std]
#![no_main]

#[cfg(not(target_os = "none"))]
compile_error!(
    "guest-demo-kernel is freestanding: build it with \
     `cargo build -p guest-demo-kernel --target x86_64-unknown-none`"
);

mod boot;
mod exit_code;
mod out;
mod panic;
mod platform;
mod workloads;

use core::fmt::Write;

use guest_pv::args::Args;
use guest_pv::{Console, Uart16550};
use hypercall_abi::boot::{BootInfo, Mode};
use hypercall_abi::features;

use crate::out::{LineBuf, kprintln};
use crate::platform::Platform;
use crate::workloads::Env;

/// The fixed start of the first line the kernel prints.
pub const GREETING: &str = "pvkit demo kernel: hello from 64-bit long mode";

/// The workload run when the boot info names none.
const DEFAULT_WORKLOAD: &str = "hello";

/// The kernel entry point, called by pvkit's VMM with `rdi` = the boot-info block.
///
/// # Safety
/// pvkit's entry contract: 64-bit mode, CPL 0, interrupts off, the identity map of
/// `0..4 GiB`, a stack below `rsp`, and `boot_info` pointing to the boot-info page the VMM filled,
/// which nothing writes after entry. Only the VMM calls this.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn _start(boot_info: *const BootInfo) -> ! {
    // SAFETY: by this function's contract `boot_info` is the VMM-filled, identity-mapped,
    // never-written boot-info page; `boot::read` itself rejects a null or misaligned pointer.
    let info = unsafe { boot::read(boot_info) };
    let (info, mode) = match boot::validate(info) {
        Ok(v) => v,
        Err(why) => fail_on_uart(
            format_args!("invalid boot info: {why}"),
            exit_code::BAD_BOOT_INFO,
        ),
    };
    let platform = match mode {
        Mode::Trapped => Platform::Trapped,
        Mode::Pv => match guest_pv::detect() {
            Some(pv) if pv.has(features::CONSOLE | features::EXIT) => Platform::Pv(pv),
            Some(pv) => fail_on_uart(
                format_args!(
                    "mode=pv but the pvkit host lacks console/exit (features {:#x})",
                    pv.feature_bits()
                ),
                exit_code::NO_PVKIT,
            ),
            None => fail_on_uart(
                format_args!("mode=pv but no pvkit host found (CPUID leaf 0x40000000)"),
                exit_code::NO_PVKIT,
            ),
        },
    };
    let console = platform.console();
    platform::set_current(platform);
    platform::init_cpu();
    run(Env {
        platform,
        console,
        boot_info: info,
    })
}

/// The greeting line, e.g. `pvkit demo kernel: hello from 64-bit long mode (abi 1.0, mem 128
/// MiB)` plus `\n`. It names no mode, so the `hello` checksum (which covers it) is the same in
/// both modes.
pub fn greeting(info: &BootInfo) -> LineBuf {
    let (major, minor) = hypercall_abi::unpack_version(info.abi_version);
    let mut line = LineBuf::new();
    let _ = write!(
        line,
        "{GREETING} (abi {major}.{minor}, mem {} MiB)",
        info.mem_size >> 20
    );
    line
}

/// Greets, runs the requested workload, reports and exits.
fn run(mut env: Env) -> ! {
    let info = env.boot_info;
    let _ = env.console.write_bytes(greeting(info).finish());

    let name = match info.workload() {
        [] => DEFAULT_WORKLOAD.as_bytes(),
        name => name,
    };
    let Some(workload) = workloads::find(name) else {
        kprintln!(
            env.console,
            "error: unknown workload '{}' (known: {})",
            name.escape_ascii(),
            workloads::KnownNames
        );
        env.platform.exit(exit_code::USAGE);
    };
    let args = match Args::parse_with_text(info.args(), workload.keys, workload.text_keys) {
        Ok(args) => args,
        Err(e) => {
            kprintln!(env.console, "error: workload '{}': {e}", workload.name);
            env.platform.exit(exit_code::USAGE);
        }
    };

    let outcome = (workload.run)(&mut env, &args);
    kprintln!(
        env.console,
        "PVKIT-RESULT workload={} mode={} ops={} checksum={:#018x}{}",
        workload.name,
        env.platform.mode().name(),
        outcome.ops,
        outcome.checksum,
        outcome.fields
    );
    env.platform.exit(outcome.exit_code)
}

/// Reports a fatal boot error on COM1 and ends the VM through the exit port (used before the
/// mode's own console and exit path are known to work).
fn fail_on_uart(msg: core::fmt::Arguments<'_>, code: u32) -> ! {
    let mut uart = Uart16550::com1();
    uart.init();
    let mut console = Console::Uart(uart);
    kprintln!(console, "error: {msg}");
    platform::exit_port(code)
}
