//! The one error type of host-vmm. Messages say what went wrong and what the user can do.

use std::path::PathBuf;

use crate::loader::ElfError;

/// Everything that can stop the VMM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `/dev/kvm` could not be opened.
    #[error(
        "cannot open {path}: {source}. pvkit needs KVM: load the kvm_intel or kvm_amd module (or \
         enable nested virtualization for this VM) and make sure your user can read and write \
         {path} (e.g. add it to the 'kvm' group)",
        path = .path.display()
    )]
    KvmUnavailable {
        /// The device path.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
    /// A KVM ioctl failed.
    #[error("KVM {op} failed: {source}")]
    Kvm {
        /// What we asked KVM to do.
        op: &'static str,
        /// The errno.
        source: kvm_ioctls::Error,
    },
    /// KVM lacks a capability pvkit needs.
    #[error("KVM does not support {0}; pvkit needs it")]
    MissingCapability(&'static str),
    /// The kernel file could not be read.
    #[error("cannot read kernel {path}: {source}", path = .path.display())]
    KernelRead {
        /// The kernel path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The kernel image is not an ELF pvkit can boot.
    #[error("kernel {name}: {source}")]
    Elf {
        /// Path or "embedded demo kernel".
        name: String,
        /// What is wrong with it.
        source: ElfError,
    },
    /// The kernel's ABI note rules out booting it here.
    #[error("kernel {name} cannot boot here: {source}")]
    KernelRefused {
        /// Path or "embedded demo kernel".
        name: String,
        /// Why.
        source: crate::kernel_abi::AbiRefusal,
    },
    /// Bad memory size.
    #[error("invalid memory size: {0}")]
    MemSize(String),
    /// Guest memory could not be allocated or registered.
    #[error("cannot set up guest memory: {0}")]
    GuestMemory(String),
    /// The boot-info block could not be built (e.g. arguments too long).
    #[error("cannot build boot info: {0}")]
    BootInfo(hypercall_abi::boot::BootInfoError),
    /// The guest stopped in a way that is not an orderly exit.
    #[error("guest {what} at RIP {rip:#x} after {exits} exits")]
    GuestFault {
        /// What happened (e.g. "triple fault (KVM_EXIT_SHUTDOWN)").
        what: String,
        /// Guest instruction pointer when it happened.
        rip: u64,
        /// Exits handled before it.
        exits: u64,
    },
    /// This host or build cannot do what was asked (the message says what).
    #[error("{0}")]
    Unsupported(&'static str),
    /// An I/O error on the host side (console output, JSON file).
    #[error("{what}: {source}")]
    Io {
        /// What we were doing.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
}

/// Result alias.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
        move |source| Error::Kvm { op, source }
    }
}
