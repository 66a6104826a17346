//! The guest half of pvkit: everything a `no_std` x86-64 kernel needs to talk to a pvkit host.
//!
//! - A kernel's frame: [`entry!`] (the `_start` entry point and the pvkit ABI note),
//!   [`kernel`] (boot checks, [`kernel::Kernel`], [`println!`], [`kernel::report_panic`]),
//!   [`boot`] (the checked boot-info reader) and [`Platform`] (PV or trapped by detection, one
//!   feature bit at a time). [`pvh_entry!`] adds the PVH entry ([`pvh`]), so the same binary
//!   also boots under QEMU and other PVH loaders. The guide for kernel authors:
//!   <https://github.com/pvkit/pvkit/blob/main/docs/GUIDE.md>.
//! - [`detect()`] finds a pvkit host through CPUID (no hypercall) and yields a [`Pvkit`] token;
//!   the hypercall wrappers are methods on it, so they cannot be reached elsewhere.
//! - Hypercalls: [`Pvkit::null`], [`Pvkit::features`], [`Pvkit::console_write`] (and
//!   [`Pvkit::console_write_phys`]), [`Pvkit::exit`], [`Pvkit::clock_ns`],
//!   [`Pvkit::idle_yield`], [`Pvkit::zero_query`], [`Pvkit::zero_release`]. The one
//!   instruction sequence behind them is [`hypercall::raw_hypercall`].
//! - The trapped twins, for code that must behave like an unmodified guest: the COM1
//!   [`Uart16550`] and the exit/marker/null ports of [`trapped`].
//! - [`Console`] and [`exit()`] choose between the two by [`Mode`].
//! - [`tsc`]: [`tsc::Tsc`], a nanosecond clock from `rdtsc` and the TSC frequency the host
//!   reports in CPUID (no exit per reading).
//! - [`idle`]: idling until a deadline — [`idle::spin`], [`idle::hlt`] (trapped timer ticks,
//!   [`trapped::timer_start`]) or [`idle::PvIdle`] ([`Pvkit::idle_yield`]) — and
//!   [`idle::percentile`] for summarising wake-up overshoots.
//! - [`Fnv1a`], a 64-bit FNV-1a hash (e.g. for checksums a host can compare across runs).
//! - [`cpu`]: a CPL 3 runtime (GDT, TSS with a full I/O bitmap, IDT, kernel services through
//!   `ud2`, [`cpu::run_user`]), because pvkit's KVM runs CPL 3 code natively and emulates CPL 0;
//!   and interrupts: counted per vector ([`cpu::interrupt_count`]), an optional hook, and
//!   [`cpu::wait_for_interrupt`] (`sti; hlt; cli`).
//! - [`frames`]: a 4 KiB frame allocator whose frames always read as zero; with
//!   [`frames::Hints::Pv`] it skips zeroing frames the host knows are zero and releases freed
//!   frames to the host in batches ([`Pvkit::zero_query`], [`Pvkit::zero_release`]), with
//!   [`frames::Hints::None`] (the trapped twin) it zeroes every frame.
//! - [`mmu`]: a page-table manager over pvkit's page-table pool, PV ([`mmu::Batch`] of
//!   `mmu_update` hypercalls, [`Pvkit::mmu_pin`]) or trapped (plain stores), with one code path.
// The `virtio` item links only where the module exists (rustdoc denies broken links).
#![cfg_attr(
    feature = "virtio",
    doc = "- [`virtio`] (cargo feature `virtio`): glue for the `virtio-drivers` crate \
           (re-exported): device windows from the boot memory map ([`virtio::devices`]), a \
           [`Hal`](virtio::PvkitHal) over identity-mapped RAM, the virtio-mmio transport \
           ([`virtio::Mmio`], [`virtio::open_blk`]) and completion waits ([`virtio::Waiter`]: \
           poll the used ring, `idle_yield` until the device's event, or `sti; hlt` until the \
           event vector)."
)]
#![cfg_attr(
    not(feature = "virtio"),
    doc = "- `virtio` (cargo feature `virtio`, off in this build): glue for the `virtio-drivers` \
           crate: device windows from the boot memory map, a DMA `Hal` over identity-mapped \
           RAM, the virtio-mmio transport and completion waits."
)]
//!
//! The crate imposes no global allocator, panic handler or entry point, and builds for
//! `x86_64-unknown-none` as well as for the host (where only its pure parts can run). Port I/O
//! and hypercalls need I/O privilege: CPL 0 (pvkit enters kernels at CPL 0), or CPL 3 after
//! [`cpu::init`], whose TSS allows every port.
//!
//! # Example: linking guest-pv into your own kernel
//!
//! ```no_run
//! # // A real kernel is `#![no_std] #![no_main]`, has a `#[panic_handler]` and is built for
//! # // `x86_64-unknown-none`; this compiles on the host but must not run there.
//! use core::fmt::Write;
//!
//! use guest_pv::Console;
//! use hypercall_abi::boot::{BootInfo, Mode};
//!
//! /// Called by your `_start` with the `BootInfo` pvkit passed in `rdi`.
//! fn kernel_main(boot_info: &BootInfo) -> ! {
//!     let mode = boot_info.mode().unwrap_or(Mode::Trapped);
//!     // CPUID only: fine in both modes. `None` on bare metal or another hypervisor.
//!     let pv = match mode {
//!         Mode::Pv => guest_pv::detect(),
//!         Mode::Trapped => None,
//!     };
//!     // The hypercall console under pvkit in PV mode, else COM1 (port I/O only).
//!     let mut console = Console::new(mode, pv);
//!     let _ = writeln!(console, "hello from my kernel");
//!     if let Some(pv) = pv {
//!         if let Ok(t) = pv.clock_ns() {
//!             let _ = writeln!(console, "{t} ns since the VM started");
//!         }
//!     }
//!     // SAFETY: this kernel is booted by pvkit only (it was handed a pvkit `BootInfo`), so
//!     // the exit port used in trapped mode exists.
//!     unsafe { guest_pv::exit(mode, pv, 0) }
//! }
//! # fn main() {}
//! ```
//!
//! Under pvkit's identity map (virtual == physical), [`Pvkit::console_write`] can pass slice
//! addresses straight to the host; a kernel with other mappings translates and uses
//! [`Pvkit::console_write_phys`].
#![no_std]
// docs.rs builds with `--cfg docsrs` on nightly: mark feature-gated items.
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(not(target_arch = "x86_64"))]
compile_error!("guest-pv supports x86-64 only (pvkit's hypercall is an x86 `out`)");

#[cfg(test)]
extern crate std;

pub mod boot;
pub mod checksum;
mod clock;
pub mod console;
pub mod cpu;
pub mod detect;
mod exit;
pub mod frames;
pub mod hypercall;
pub mod idle;
pub mod kernel;
pub mod mmu;
mod null;
pub mod platform;
pub mod pvh;
pub mod trapped;
pub mod tsc;
pub mod uart;
#[cfg(feature = "virtio")]
#[cfg_attr(docsrs, doc(cfg(feature = "virtio")))]
pub mod virtio;
mod zero;

pub use checksum::Fnv1a;
pub use console::{Console, PvConsole};
pub use detect::{Pvkit, detect};
pub use exit::{exit, halt_forever};
pub use hypercall::HypercallError;
/// The ABI crate this library speaks (so a kernel needs no direct dependency on it).
pub use hypercall_abi as abi;
pub use hypercall_abi::boot::Mode;
pub use platform::Platform;
pub use uart::Uart16550;
