//! host-vmm: the pvkit KVM VMM.
//!
//! Boots an ELF64 kernel in long mode under `/dev/kvm`, services the hypercalls of
//! [`hypercall_abi`], and emulates the *trapped twins* (UART, exit port, null device) that an
//! unmodified guest uses instead. [`compare`] runs workloads both ways and reports the cost.
//!
//! ```no_run
//! use host_vmm::{console::ConsoleSink, vm::{self, VmConfig}};
//! use hypercall_abi::boot::Mode;
//!
//! let report = vm::run(&VmConfig::new(Mode::Pv, "hello"), ConsoleSink::new(None))?;
//! assert_eq!(report.exit_code, 0);
//! # Ok::<(), host_vmm::error::Error>(())
//! ```

pub mod boot;
pub mod bus;
pub mod compare;
pub mod console;
pub mod cpuid;
pub mod devices;
pub mod error;
pub mod hypercall;
pub mod kernel;
pub mod kernel_abi;
pub mod loader;
pub mod memory;
pub mod metrics;
pub mod mmu;
pub mod prepare;
pub mod rusage;
pub mod state;
pub mod stop;
pub mod sync;
#[cfg(test)]
mod test_util;
pub mod trap;
mod vcpu;
pub mod vm;

pub use error::{Error, Result};
