//! Shared helpers for pvkit's integration tests: every test boots a real guest under the real
//! `/dev/kvm`. Without KVM they fail loudly; they never pass silently.

use std::sync::mpsc;
use std::time::Duration;

use host_vmm::console::ConsoleSink;
use host_vmm::vm::{self, KernelImage, RunReport, VmConfig};
pub use hypercall_abi::boot::Mode;

/// A guest that runs longer than this is considered hung.
pub const GUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Panics with a clear message unless `/dev/kvm` can be opened read-write.
pub fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!(
            "pvkit's integration tests boot real guests and need read-write access to /dev/kvm \
             ({e}). Load kvm_intel/kvm_amd or enable nested virtualization, then rerun."
        );
    }
}

/// Runs `cfg` on a worker thread with a timeout; returns the VMM's result.
pub fn run_cfg(cfg: VmConfig) -> host_vmm::Result<RunReport> {
    require_kvm();
    let (tx, rx) = mpsc::channel();
    let name = format!("{}/{}", cfg.workload, cfg.mode.name());
    std::thread::spawn(move || {
        let _ = tx.send(vm::run(&cfg, ConsoleSink::new(None)));
    });
    rx.recv_timeout(GUEST_TIMEOUT)
        .unwrap_or_else(|_| panic!("guest {name} did not exit within {GUEST_TIMEOUT:?}"))
}

/// Boots the embedded demo kernel with `workload` and `args` in `mode`; the run must succeed
/// at the VMM level (the guest may still exit non-zero).
pub fn boot(mode: Mode, workload: &str, args: &[&str]) -> RunReport {
    let mut cfg = VmConfig::new(mode, workload);
    cfg.args = args.iter().map(|s| s.to_string()).collect();
    run_cfg(cfg).unwrap_or_else(|e| panic!("VMM failed running {workload} ({}): {e}", mode.name()))
}

/// Boots an arbitrary kernel image in `mode`.
pub fn boot_image(mode: Mode, bytes: Vec<u8>) -> host_vmm::Result<RunReport> {
    let mut cfg = VmConfig::new(mode, "hello");
    cfg.kernel = KernelImage {
        name: "test kernel".into(),
        bytes: bytes.into(),
    };
    run_cfg(cfg)
}

/// The console output as text.
pub fn text(r: &RunReport) -> String {
    String::from_utf8_lossy(&r.console).into_owned()
}

/// FNV-1a 64, computed independently of the guest's implementation.
pub fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// The console workload's byte pattern.
pub fn console_pattern(n: u64) -> Vec<u8> {
    (0..n)
        .map(|j| {
            if j % 64 == 63 {
                b'\n'
            } else {
                b'a' + (j % 26) as u8
            }
        })
        .collect()
}
