//! What a VM is built from: the kernel image, the mode, memory, devices and limits.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hypercall_abi::boot::Mode;

use crate::error::{Error, Result};

/// The default KVM device.
pub const DEFAULT_KVM_DEVICE: &str = "/dev/kvm";

/// A kernel image and a name for messages.
#[derive(Debug, Clone)]
pub struct KernelImage {
    /// Path, or "embedded demo kernel".
    pub name: String,
    /// The ELF bytes.
    pub bytes: Cow<'static, [u8]>,
}

impl KernelImage {
    /// The demo kernel built into this binary.
    pub fn embedded() -> KernelImage {
        KernelImage {
            name: "embedded demo kernel".into(),
            bytes: Cow::Borrowed(crate::kernel::DEMO_KERNEL),
        }
    }

    /// Reads a kernel file.
    pub fn from_file(path: &Path) -> Result<KernelImage> {
        let bytes = std::fs::read(path).map_err(|source| Error::KernelRead {
            path: path.into(),
            source,
        })?;
        Ok(KernelImage {
            name: path.display().to_string(),
            bytes: Cow::Owned(bytes),
        })
    }
}

/// Everything needed to boot a VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// The kernel.
    pub kernel: KernelImage,
    /// PV or trapped (pvkit hidden: an unmodified guest's view).
    pub mode: Mode,
    /// Feature bits to clear in PV mode (`--disable`): the guest sees them unset and the host
    /// answers their calls with `NOT_IMPLEMENTED`.
    pub disable: u64,
    /// Guest RAM in bytes.
    pub mem_size: u64,
    /// Workload name passed to the guest.
    pub workload: String,
    /// Workload arguments passed to the guest (joined with spaces).
    pub args: Vec<String>,
    /// The KVM device node.
    pub kvm_device: PathBuf,
    /// A disk image to attach as a virtio-blk device.
    pub disk: Option<DiskConfig>,
    /// Attach a virtio-console device (output only: its bytes go to the console sink).
    pub virtio_console: bool,
    /// Stop the run this long after it starts (the guest's first entry), if the guest has
    /// not exited by then; the report then says [`crate::stop::StopReason::Timeout`].
    pub timeout: Option<Duration>,
    /// Run the VM's host threads under seccomp filters ([`crate::sandbox`]); off only for
    /// debugging (`--no-seccomp`).
    pub seccomp: bool,
}

/// A disk image for the virtio-blk device.
#[derive(Debug, Clone)]
pub struct DiskConfig {
    /// The image file (or block device).
    pub path: PathBuf,
    /// Attach read-only: the guest's writes fail with an I/O error.
    pub readonly: bool,
}

impl VmConfig {
    /// Defaults: embedded kernel, PV, 128 MiB, workload `hello`.
    pub fn new(mode: Mode, workload: &str) -> VmConfig {
        VmConfig {
            kernel: KernelImage::embedded(),
            mode,
            disable: 0,
            mem_size: 128 << 20,
            workload: workload.into(),
            args: Vec::new(),
            kvm_device: DEFAULT_KVM_DEVICE.into(),
            disk: None,
            virtio_console: false,
            timeout: None,
            seccomp: true,
        }
    }
}
