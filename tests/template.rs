//! The kernel template works as the guide says: copied outside the repository, pointed at this
//! checkout's guest-pv, built with plain `cargo build --release`, it boots under host-vmm in
//! both modes — hypercalls in PV mode, none in trapped mode, the same result line.

use std::path::{Path, PathBuf};
use std::process::Command;

use host_vmm::compare::Measured;
use host_vmm::config::{KernelImage, VmConfig};
use tests::{Mode, run_cfg, text};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the repository root")
        .to_path_buf()
}

fn copy_dir(from: &Path, to: &Path) {
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
fn build_template_copy() -> PathBuf {
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

fn boot(kernel: &Path, mode: Mode) -> Measured {
    let mut cfg = VmConfig::new(mode, "");
    cfg.kernel = KernelImage::from_file(kernel).unwrap();
    let r = run_cfg(cfg).unwrap_or_else(|e| panic!("template kernel ({}): {e}", mode.name()));
    assert_eq!(r.exit_code, 0, "{}", text(&r));
    r
}

fn result_line(r: &Measured) -> String {
    text(r)
        .lines()
        .find(|l| l.starts_with("RESULT "))
        .unwrap_or_else(|| panic!("no RESULT line in {}", text(r)))
        .to_string()
}

#[test]
fn the_template_builds_outside_the_repo_and_boots_in_both_modes() {
    tests::require_kvm();
    let kernel = build_template_copy();
    let pv = boot(&kernel, Mode::Pv);
    let trapped = boot(&kernel, Mode::Trapped);
    assert!(text(&pv).contains("pv mode"), "{}", text(&pv));
    assert!(text(&trapped).contains("trapped mode, pvkit features: none"));
    assert_eq!(result_line(&pv), result_line(&trapped));
    // PV: every mechanism of the template went through a hypercall.
    for call in [
        "console_write",
        "clock_ns",
        "idle_yield",
        "zero_hints",
        "mmu_update",
        "exit",
    ] {
        assert!(
            pv.stats.by_hypercall.contains_key(call),
            "{call}: {:?}",
            pv.stats.by_hypercall
        );
    }
    assert!(text(&pv).contains("guest zeroed 0 bytes"), "{}", text(&pv));
    // Trapped: none at all, and the page-table stores were trapped.
    assert!(trapped.stats.by_hypercall.is_empty());
    assert!(trapped.stats.event("pte_trapped") >= 8);
    // Both bracketed their work with the markers.
    assert!(pv.window.is_some() && trapped.window.is_some());
}
