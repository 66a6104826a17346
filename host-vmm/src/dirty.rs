//! KVM's dirty log of guest RAM: which pages the guest wrote since the last look.
//!
//! Live migration copies RAM while the guest runs, then copies again what the guest wrote
//! meanwhile. [`DirtyLog::start`] turns on `KVM_MEM_LOG_DIRTY_PAGES` for RAM's slot, and each
//! [`DirtyLog::take`] returns (and clears) the pages written since the previous one
//! (`KVM_GET_DIRTY_LOG`). KVM sees only the guest's writes; the VMM's own are in
//! [`crate::memory::RamView::take_host_dirty`].
//!
//! The log works on its own duplicate of the VM's file descriptor, so any thread may use it
//! while the vCPU runs.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use hypercall_abi::layout::PAGE_SIZE;
use kvm_bindings::{
    KVM_MEM_LOG_DIRTY_PAGES, kvm_dirty_log, kvm_dirty_log__bindgen_ty_1,
    kvm_userspace_memory_region,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iow_nr;

use crate::error::{Error, Result};
use crate::memory::PageBits;

const KVMIO: u32 = 0xAE;
ioctl_iow_nr!(
    KVM_SET_USER_MEMORY_REGION,
    KVMIO,
    0x46,
    kvm_userspace_memory_region
);
ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);

/// The dirty log of one memory slot.
#[derive(Debug)]
pub struct DirtyLog {
    vm: OwnedFd,
    slot: kvm_userspace_memory_region,
    on: bool,
}

impl DirtyLog {
    /// A log of `slot` (as registered) of `vm`; off until [`start`](Self::start).
    pub fn new(vm: &VmFd, slot: kvm_userspace_memory_region) -> Result<DirtyLog> {
        // SAFETY: `vm` is a valid, open file descriptor for the lifetime of this call;
        // F_DUPFD_CLOEXEC makes a new descriptor we own, checked below.
        let fd = unsafe { libc::fcntl(vm.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if fd < 0 {
            return Err(Error::Io {
                what: "cannot duplicate the VM descriptor".into(),
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: `fd` was just returned by fcntl and nothing else owns it.
        let vm = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(DirtyLog {
            vm,
            slot,
            on: false,
        })
    }

    fn set_flags(&mut self, flags: u32) -> Result<()> {
        let desc = kvm_userspace_memory_region { flags, ..self.slot };
        // SAFETY: `desc` is the slot as registered (same mapping, which outlives the VM), with
        // only the dirty-logging flag changed; the ioctl reads `desc` and nothing else.
        let rc = unsafe { ioctl_with_ref(&self.vm, KVM_SET_USER_MEMORY_REGION(), &desc) };
        if rc < 0 {
            return Err(Error::Io {
                what: "cannot change dirty logging of guest RAM".into(),
                source: std::io::Error::last_os_error(),
            });
        }
        self.on = flags & KVM_MEM_LOG_DIRTY_PAGES != 0;
        Ok(())
    }

    /// Starts logging; the first [`take`](Self::take) returns the pages written since.
    pub fn start(&mut self) -> Result<()> {
        self.set_flags(KVM_MEM_LOG_DIRTY_PAGES)
    }

    /// Stops logging.
    pub fn stop(&mut self) -> Result<()> {
        self.set_flags(0)
    }

    /// The pages the guest wrote since logging started or the last `take`, and clears them.
    pub fn take(&self) -> Result<PageBits> {
        if !self.on {
            return Err(Error::Unsupported("the dirty log is not started"));
        }
        let pages = self.slot.memory_size / PAGE_SIZE;
        let mut words = vec![0u64; pages.div_ceil(64) as usize];
        let log = kvm_dirty_log {
            slot: self.slot.slot,
            padding1: 0,
            __bindgen_anon_1: kvm_dirty_log__bindgen_ty_1 {
                dirty_bitmap: words.as_mut_ptr().cast(),
            },
        };
        // SAFETY: `words` holds one bit per page of the slot and outlives the call; KVM writes
        // only that bitmap.
        let rc = unsafe { ioctl_with_ref(&self.vm, KVM_GET_DIRTY_LOG(), &log) };
        if rc < 0 {
            return Err(Error::Io {
                what: "cannot read the dirty log".into(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(PageBits::from_words(&words, pages))
    }
}

impl Drop for DirtyLog {
    fn drop(&mut self) {
        if self.on {
            let _ = self.stop();
        }
    }
}
