//! The workloads: each runs the same observable work in both modes, brackets its timed part
//! with the markers, and returns an [`Outcome`] whose checksum must be equal in PV and trapped
//! mode.

mod blk;
mod console;
mod cpl3;
mod freemem;
mod fuzz;
mod hello;
mod idle;
mod idling;
mod null;
mod pagetable;
mod panic;
mod service;
mod vconsole;
mod zero;

use core::fmt;

use crate::args::Args;
use guest_pv::Console;
use hypercall_abi::boot::{BootInfo, region_kind};
use hypercall_abi::layout::{IDENTITY_MAP_SIZE, PAGE_SIZE};

use crate::exit_code;
use crate::out::Fields;
use crate::platform::Platform;

/// What a workload works with.
#[derive(Debug)]
pub struct Env {
    /// PV (with the host's feature bits) or trapped, by detection.
    pub platform: Platform,
    /// The console (hypercall console if the host offers it, else COM1).
    pub console: Console,
    /// The validated boot info.
    pub boot_info: &'static BootInfo,
}

impl Env {
    /// Ends the VM with `code` (the `exit` hypercall if offered, else the exit port).
    pub fn exit(&self, code: u32) -> ! {
        // SAFETY: this kernel runs only under pvkit (see `platform`'s module docs), so the exit
        // port of the trapped path is pvkit's.
        unsafe { self.platform.exit(code) }
    }
}

/// A workload's result, reported in the `PVKIT-RESULT` line.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    /// Operations performed in the timed section (workload-specific unit).
    pub ops: u64,
    /// FNV-1a 64 of the workload's observable result.
    pub checksum: u64,
    /// Workload-specific fields appended to the line after `checksum`.
    pub fields: Fields,
    /// The exit code after the result line: [`exit_code::OK`] unless the workload's own check
    /// failed ([`exit_code::CHECK_FAILED`]).
    pub exit_code: u32,
}

impl Outcome {
    /// An outcome with no extra fields, exiting with [`exit_code::OK`].
    pub const fn new(ops: u64, checksum: u64) -> Outcome {
        Outcome {
            ops,
            checksum,
            fields: Fields::new(),
            exit_code: exit_code::OK,
        }
    }
}

/// A runnable workload.
#[derive(Debug)]
pub struct Workload {
    /// The name in the boot info and the `PVKIT-RESULT` line.
    pub name: &'static str,
    /// The argument keys it accepts (decimal `u64` values).
    pub keys: &'static [&'static str],
    /// The text-valued argument keys it accepts (validated by the workload).
    pub text_keys: &'static [&'static str],
    /// Runs it; arguments are already checked against `keys` and `text_keys`.
    pub run: fn(&mut Env, &Args<'_>) -> Outcome,
}

/// Every workload, in the order `known:` lists them.
const WORKLOADS: &[Workload] = &[
    hello::WORKLOAD,
    null::WORKLOAD,
    console::WORKLOAD,
    pagetable::WORKLOAD,
    cpl3::WORKLOAD,
    idle::WORKLOAD,
    service::WORKLOAD,
    zero::WORKLOAD,
    freemem::WORKLOAD,
    blk::WORKLOAD,
    vconsole::WORKLOAD,
    fuzz::WORKLOAD,
    panic::WORKLOAD,
];

impl Workload {
    /// Reports an argument error of this workload and exits with [`exit_code::USAGE`] (at
    /// CPL 0 or CPL 3).
    pub fn usage(&self, env: &mut Env, msg: fmt::Arguments<'_>) -> ! {
        crate::out::kprintln!(env.console, "error: workload '{}': {msg}", self.name);
        env.exit(exit_code::USAGE)
    }

    /// Reports a host that lacks what this workload needs and exits with
    /// [`exit_code::UNSUPPORTED`].
    pub fn unsupported(&self, env: &mut Env, msg: fmt::Arguments<'_>) -> ! {
        crate::out::kprintln!(env.console, "error: workload '{}': {msg}", self.name);
        env.exit(exit_code::UNSUPPORTED)
    }
}

/// The allocator's query bitmap and release list (`guest_pv::frames`), handed out once per
/// boot: one workload runs per boot.
pub fn hint_buffers() -> &'static mut guest_pv::frames::HintBuffers {
    use core::sync::atomic::{AtomicBool, Ordering};
    static mut HINT_BUFFERS: guest_pv::frames::HintBuffers = guest_pv::frames::HintBuffers::new();
    static TAKEN: AtomicBool = AtomicBool::new(false);
    assert!(
        !TAKEN.swap(true, Ordering::Relaxed),
        "hint buffers handed out twice"
    );
    let buffers = &raw mut HINT_BUFFERS;
    // SAFETY: `TAKEN` makes this the only reference to the static for the rest of the
    // kernel's life; it is initialised.
    unsafe { &mut *buffers }
}

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

/// The start of the first usable region of the boot memory map that lies above the kernel
/// image and holds `len` bytes (page-aligned); `Err(max)` with the largest such region's length
/// if none does. Free RAM is identity-mapped and used by nothing else in this kernel (it has no
/// allocator); one workload runs per boot.
pub fn free_ram_start(info: &BootInfo, len: u64) -> Result<u64, u64> {
    // Usable RAM above the kernel, from a page boundary, cut to the boot identity map (which
    // covers all of RAM).
    let above_kernel = info.regions().iter().filter_map(|r| {
        let start = r.start.next_multiple_of(PAGE_SIZE);
        let end = r.start.saturating_add(r.len).min(IDENTITY_MAP_SIZE);
        (r.kind == region_kind::USABLE && start >= info.kernel_end && start < end)
            .then(|| (start, end - start))
    });
    let Some((start, _)) = above_kernel.clone().find(|&(_, size)| size >= len) else {
        return Err(above_kernel.map(|(_, size)| size).max().unwrap_or(0));
    };
    Ok(start)
}
