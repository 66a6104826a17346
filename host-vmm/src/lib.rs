//! host-vmm: the pvkit KVM VMM.
//!
//! Boots an ELF64 kernel in long mode under `/dev/kvm`, services the hypercalls of
//! [`hypercall_abi`], and emulates the *trapped twins* (UART, exit port, null device) that an
//! unmodified guest uses instead. [`compare`] runs workloads both ways and reports the cost.
//!
//! A VM is described by a [`config::VmConfig`], built in named steps by [`builder::build`]
//! into a [`vm::Vm`] (KVM handles, one [`vcpu::Vcpu`], one [`machine::Machine`] holding every
//! piece of host-side state and the two [`bus::Bus`]es), and run with [`vm::Vm::run`].
//!
//! ```no_run
//! use host_vmm::{config::VmConfig, console::ConsoleSink};
//! use hypercall_abi::boot::Mode;
//!
//! let report = host_vmm::run(&VmConfig::new(Mode::Pv, "hello"), ConsoleSink::new(None))?;
//! assert_eq!(report.exit_code, 0);
//! # Ok::<(), host_vmm::error::Error>(())
//! ```

pub mod api;
pub mod boot;
pub mod builder;
pub mod bus;
pub mod compare;
pub mod config;
pub mod console;
pub mod cpuid;
pub mod devices;
pub mod dirty;
pub mod error;
pub mod fleet;
pub mod free_report;
pub mod gdb;
pub mod hypercall;
pub mod kernel;
pub mod kernel_abi;
pub mod loader;
pub mod machine;
pub mod memory;
pub mod metrics;
pub mod migration;
pub mod mmu;
pub mod prepare;
pub mod pvh;
pub mod qemu;
pub mod rusage;
pub mod sandbox;
pub mod snapshot;
pub mod state;
pub mod stop;
pub mod sync;
#[cfg(test)]
mod test_util;
pub mod trap;
pub mod vcpu;
pub mod vm;

pub use error::{Error, Result};

/// Builds a VM from `cfg` and runs it to the end in one call; guest console output goes to
/// `console`.
pub fn run(cfg: &config::VmConfig, console: console::ConsoleSink) -> Result<vm::RunReport> {
    builder::build(cfg, console)?.run()
}
