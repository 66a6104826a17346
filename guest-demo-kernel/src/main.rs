//! pvkit's demo guest kernel.
//!
//! Entered by pvkit's VMM at `_start` (defined by [`guest_pv::entry!`]: 64-bit long mode, CPL 0,
//! interrupts off, identity map of `0..4 GiB`, `rdi` = [`BootInfo`]). It greets, runs the
//! workload named in the boot info — with hypercalls where the host offers the feature
//! (detected by CPUID), with the trapped twin otherwise — prints one `PVKIT-RESULT` line and
//! exits. See `README.md` for the workloads, their arguments and the output format.
#![no_std]
#![no_main]

#[cfg(not(target_os = "none"))]
compile_error!(
    "guest-demo-kernel is freestanding: build it with \
     `cargo build -p guest-demo-kernel --target x86_64-unknown-none`"
);

mod args;
mod exit_code;
mod out;
mod panic;
mod platform;
mod workloads;

use core::fmt::Write;

use crate::args::Args;
use guest_pv::kernel::Kernel;
use hypercall_abi::boot::BootInfo;

use crate::out::{Line, kprintln};
use crate::workloads::Env;

/// The fixed start of the first line the kernel prints.
pub const GREETING: &str = "pvkit demo kernel: hello from 64-bit long mode";

/// The workload run when the boot info names none.
const DEFAULT_WORKLOAD: &str = "hello";

// `_start`: boot-info checks, PV or trapped by detection alone (no required feature: every
// workload has a trapped twin, chosen per feature), then `kmain`. The ABI note tells the host
// which ABI this kernel speaks.
guest_pv::entry!(kmain);
// `pvkit_pvh_start` and the PVH note: the same binary boots under QEMU (`-M microvm -kernel`)
// and other PVH loaders, as an unmodified guest (trapped paths by detection).
guest_pv::pvh_entry!();

/// The kernel's main, called by guest-pv's entry once the boot info is checked and the platform
/// detected. Installs the CPL 3 runtime and runs the workload.
fn kmain(kernel: Kernel) -> u32 {
    platform::init_cpu();
    run(Env {
        platform: kernel.platform,
        console: kernel.console(),
        boot_info: kernel.boot_info,
    })
}

/// The greeting line, e.g. `pvkit demo kernel: hello from 64-bit long mode (abi 1.0, mem 128
/// MiB)` plus `\n`. It names no mode, so the `hello` checksum (which covers it) is the same in
/// both modes.
pub fn greeting(info: &BootInfo) -> Line {
    let (major, minor) = hypercall_abi::unpack_version(info.abi_version);
    let mut line = Line::new();
    let _ = writeln!(
        line,
        "{GREETING} (abi {major}.{minor}, mem {} MiB)",
        info.mem_size >> 20
    );
    line
}

/// Greets, runs the requested workload, reports and returns the exit code.
fn run(mut env: Env) -> u32 {
    let info = env.boot_info;
    let _ = env.console.write_bytes(greeting(info).as_bytes());

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
        return exit_code::USAGE;
    };
    let args = match Args::parse(info.args(), workload.keys, workload.text_keys) {
        Ok(args) => args,
        Err(e) => {
            kprintln!(env.console, "error: workload '{}': {e}", workload.name);
            return exit_code::USAGE;
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
    outcome.exit_code
}
