//! Shared helpers for pvkit's integration tests: every test boots a real guest under the real
//! `/dev/kvm`. Without KVM they fail loudly; they never pass silently.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use host_vmm::compare::{Measured, measure};
use host_vmm::config::{KernelImage, VmConfig};
use host_vmm::console::ConsoleSink;
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
pub fn run_cfg(cfg: VmConfig) -> host_vmm::Result<Measured> {
    require_kvm();
    let (tx, rx) = mpsc::channel();
    let name = format!("{}/{}", cfg.workload, cfg.mode.name());
    std::thread::spawn(move || {
        let _ = tx.send(measure(&cfg, ConsoleSink::new(None)));
    });
    rx.recv_timeout(GUEST_TIMEOUT)
        .unwrap_or_else(|_| panic!("guest {name} did not exit within {GUEST_TIMEOUT:?}"))
}

/// Boots the embedded demo kernel with `workload` and `args` in `mode`; the run must succeed
/// at the VMM level (the guest may still exit non-zero).
pub fn boot(mode: Mode, workload: &str, args: &[&str]) -> Measured {
    let mut cfg = VmConfig::new(mode, workload);
    cfg.args = args.iter().map(|s| s.to_string()).collect();
    run_cfg(cfg).unwrap_or_else(|e| panic!("VMM failed running {workload} ({}): {e}", mode.name()))
}

/// Boots the demo kernel with a virtio-blk disk attached.
pub fn boot_with_disk(
    mode: Mode,
    workload: &str,
    args: &[&str],
    disk: &std::path::Path,
    readonly: bool,
) -> Measured {
    let mut cfg = VmConfig::new(mode, workload);
    cfg.args = args.iter().map(|s| s.to_string()).collect();
    cfg.disk = Some(host_vmm::config::DiskConfig {
        path: disk.into(),
        readonly,
    });
    run_cfg(cfg).unwrap_or_else(|e| panic!("VMM failed running {workload} ({}): {e}", mode.name()))
}

/// Boots an arbitrary kernel image in `mode`.
pub fn boot_image(mode: Mode, bytes: Vec<u8>) -> host_vmm::Result<Measured> {
    let mut cfg = VmConfig::new(mode, "hello");
    cfg.kernel = KernelImage {
        name: "test kernel".into(),
        bytes: bytes.into(),
    };
    run_cfg(cfg)
}

/// The console output as text.
pub fn text(r: &Measured) -> String {
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

/// Tiny x86-64 machine-code builders for purpose-built test guests.
pub mod asm {
    use hypercall_abi::HYPERCALL_PORT;
    use hypercall_abi::ports::EXIT_PORT;

    /// `mov r64, imm64` for rax (0), rcx (1), rdx (2), rbx (3), rsi (6), rdi (7).
    pub fn mov_imm(reg: u8, imm: u64) -> Vec<u8> {
        let mut c = vec![0x48, 0xb8 + reg];
        c.extend_from_slice(&imm.to_le_bytes());
        c
    }

    /// `mov rax, nr; mov rdi, a0; mov rsi, a1; mov dx, HYPERCALL_PORT; out dx, eax`.
    pub fn hypercall(nr: u64, a0: u64, a1: u64) -> Vec<u8> {
        let mut c = mov_imm(0, nr);
        c.extend(mov_imm(7, a0));
        c.extend(mov_imm(6, a1));
        c.extend_from_slice(&[0x66, 0xba]);
        c.extend_from_slice(&HYPERCALL_PORT.to_le_bytes());
        c.push(0xef);
        c
    }

    /// Exit through the trapped exit port with `eax` as the code.
    pub fn exit_with_eax() -> Vec<u8> {
        let mut c = vec![0x66, 0xba];
        c.extend_from_slice(&EXIT_PORT.to_le_bytes());
        c.push(0xef);
        c
    }

    /// `mov [rbx], rax` (an 8-byte store).
    pub const STORE_RAX_AT_RBX: [u8; 3] = [0x48, 0x89, 0x03];
    /// `mov [rbx], eax` (a 4-byte store).
    pub const STORE_EAX_AT_RBX: [u8; 2] = [0x89, 0x03];
    /// `mov rax, [rbx]`.
    pub const LOAD_RAX_FROM_RBX: [u8; 3] = [0x48, 0x8b, 0x03];
    /// `shl rdx, 8; or rax, rdx`: pack a hypercall's value above its status.
    pub const PACK_STATUS_AND_VALUE: [u8; 7] = [0x48, 0xc1, 0xe2, 0x08, 0x48, 0x09, 0xd0];
}

/// `len` pseudo-random bytes (xorshift64 from `seed`): deterministic disk-image contents.
pub fn pseudo_random_bytes(len: u64, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the repository root")
        .to_path_buf()
}

/// Copies a directory tree (without `target/`).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if name == "target" {
            continue;
        }
        let (src, dst) = (entry.path(), to.join(&name));
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&src, &dst);
        } else {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
}

/// Copies the template to a fresh directory outside the repository, points its guest-pv
/// dependency at this checkout (the guide's one edit) and builds it; returns the kernel.
pub fn build_template_copy() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pvkit-template-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    copy_dir(&repo().join("templates/minimal-kernel"), &dir);
    let manifest = dir.join("Cargo.toml");
    let toml = std::fs::read_to_string(&manifest).unwrap();
    let guest_pv = repo().join("guest-pv");
    let edited = toml.replace(
        "path = \"../../guest-pv\"",
        &format!("path = {:?}", guest_pv.display().to_string()),
    );
    assert_ne!(
        toml, edited,
        "the template's guest-pv path line moved; update this test"
    );
    std::fs::write(&manifest, edited).unwrap();
    // Built as a user would, in the copy: only the target directory is shared between runs
    // (inside this repository's `target/`) so repeated test runs do not rebuild everything.
    let target_dir = repo().join("target/template-kernel");
    let out = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .current_dir(&dir)
        .args(["build", "--release", "--target-dir"])
        .arg(&target_dir)
        // Outer `cargo test` settings are meant for the host, not for this kernel.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .output()
        .expect("run cargo");
    assert!(
        out.status.success(),
        "building the template copy in {} failed:\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
    target_dir.join("x86_64-unknown-none/release/minimal-kernel")
}
