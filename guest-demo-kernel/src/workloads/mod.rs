//! The workloads: each runs the same observable work in both modes, brackets its timed part
//! with the markers, and returns an [`Outcome`] whose checksum must be equal in PV and trapped
//! mode.

mod console;
mod hello;
mod null;
mod panic;

use core::fmt;

use guest_pv::Console;
use guest_pv::args::Args;
use hypercall_abi::boot::BootInfo;

use crate::platform::Platform;

/// What a workload works with.
#[derive(Debug)]
pub struct Env {
    /// The boot mode.
    pub platform: Platform,
    /// The mode's console (hypercall console in PV mode, COM1 in trapped mode).
    pub console: Console,
    /// The validated boot info.
    pub boot_info: &'static BootInfo,
}

/// A workload's result, reported in the `PVKIT-RESULT` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Operations performed in the timed section (workload-specific unit).
    pub ops: u64,
    /// FNV-1a 64 of the workload's observable result.
    pub checksum: u64,
}

/// A runnable workload.
#[derive(Debug)]
pub struct Workload {
    /// The name in the boot info and the `PVKIT-RESULT` line.
    pub name: &'static str,
    /// The argument keys it accepts.
    pub keys: &'static [&'static str],
    /// Runs it; arguments are already checked against `keys`.
    pub run: fn(&mut Env, &Args<'_>) -> Outcome,
}

/// Every workload, in the order `known:` lists them.
const WORKLOADS: &[Workload] = &[
    hello::WORKLOAD,
    null::WORKLOAD,
    console::WORKLOAD,
    panic::WORKLOAD,
];

/// The workload called `name`.
pub fn find(name: &[u8]) -> Option<&'static Workload> {
    WORKLOADS.iter().find(|w| w.name.as_bytes() == name)
}

/// Displays the known workload names, comma-separated.
#[derive(Debug, Clone, Copy)]
pub struct KnownNames;

impl fmt::Display for KnownNames {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, w) in WORKLOADS.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            f.write_str(w.name)?;
        }
        Ok(())
    }
}
