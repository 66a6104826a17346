//! Builds `guest-demo-kernel` for `x86_64-unknown-none` and hands its path to `kernel.rs`,
//! so `host-vmm` always embeds a demo kernel built from the same sources.
//!
//! The kernel is built by a nested cargo with its own target directory (the outer build holds
//! the lock on the normal one) and with the outer build's compiler flags and wrappers removed
//! (they are meant for the host, e.g. clippy-driver or `-C target-cpu=native`). It uses the
//! outer build's toolchain: the same `cargo` and `rustc`, and under rustup the same toolchain
//! name (`RUSTUP_TOOLCHAIN`) for anything it runs through a rustup proxy.
//!
//! The toolchain must have the standard library for `x86_64-unknown-none`. rustup installs
//! the `targets` of `rust-toolchain.toml` only when it installs the toolchain itself, not for a
//! toolchain that is already there, so this script checks the toolchain's sysroot and, if the
//! target is missing from a rustup toolchain, runs `rustup target add` for that toolchain
//! (a `cargo:warning` says so). If that is impossible (no rustup, offline, a toolchain rustup
//! does not manage), the build fails with one line saying what to do. The script runs again
//! whenever the target's library directory changes or disappears.

use std::env;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The demo kernel's target.
const GUEST_TARGET: &str = "x86_64-unknown-none";

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest
        .parent()
        .expect("host-vmm lives in the workspace root")
        .to_path_buf();
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    let target_dir = env::var_os("PVKIT_GUEST_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target").join("guest"));
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());

    for dir in [
        "guest-demo-kernel",
        "guest-pv",
        "hypercall-abi",
        ".cargo",
        "Cargo.lock",
        "Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    println!("cargo:rerun-if-env-changed=PVKIT_GUEST_TARGET_DIR");

    let toolchain = match ensure_guest_target(&rustc) {
        Ok(toolchain) => toolchain,
        Err(message) => {
            // One line, shown by cargo as `error: host-vmm@…: <message>`; the build fails.
            println!("cargo::error={message}");
            return;
        }
    };

    let mut nested = Command::new(&cargo);
    nested
        .current_dir(&root)
        .args(["build", "--release", "--locked", "-p", "guest-demo-kernel"])
        .args(["--target", GUEST_TARGET, "--target-dir"])
        .arg(&target_dir)
        .env("RUSTC", &rustc)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET");
    if let Some(toolchain) = &toolchain {
        nested.env("RUSTUP_TOOLCHAIN", &toolchain.name);
    }
    let status = nested
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cargo:?} to build the demo kernel: {e}"));
    assert!(
        status.success(),
        "building guest-demo-kernel for {GUEST_TARGET} failed ({status}); see its errors above"
    );
    let built = target_dir
        .join(GUEST_TARGET)
        .join("release/guest-demo-kernel");
    let dest = out.join("guest-demo-kernel.elf");
    std::fs::copy(&built, &dest)
        .unwrap_or_else(|e| panic!("cannot copy {} to {}: {e}", built.display(), dest.display()));
    println!("cargo:rustc-env=PVKIT_DEMO_KERNEL={}", dest.display());
}

/// A rustup toolchain: its name (for `--toolchain` and `RUSTUP_TOOLCHAIN`) and, when known from
/// its location, the rustup home it lives in.
struct Toolchain {
    name: OsString,
    rustup_home: Option<PathBuf>,
}

/// Makes sure `rustc` has the standard library for [`GUEST_TARGET`], adding the target with
/// rustup if it is missing. Returns the rustup toolchain `rustc` belongs to, if any (`None`:
/// not a rustup toolchain, or not known to be one), or the one-line error to report.
fn ensure_guest_target(rustc: &OsStr) -> Result<Option<Toolchain>, String> {
    let (sysroot, libdir) = sysroot_and_libdir(rustc)?;
    // Run again if the target goes away (`rustup target remove`): a missing path counts as
    // changed, so the next build adds it back instead of failing in the nested cargo.
    println!("cargo:rerun-if-changed={}", libdir.display());
    let toolchain = rustup_toolchain(&sysroot);
    if has_core(&libdir) {
        return Ok(toolchain);
    }
    let Some(toolchain) = toolchain else {
        return Err(format!(
            "the Rust standard library for {GUEST_TARGET} is missing from {} (not a rustup \
             toolchain): install rust-std for {GUEST_TARGET} in that toolchain, or build with \
             rustup (`rustup target add {GUEST_TARGET}`)",
            sysroot.display()
        ));
    };
    let name = toolchain.name.to_string_lossy().into_owned();
    let retry =
        format!("run `rustup target add {GUEST_TARGET} --toolchain {name}` and build again");
    let mut rustup = Command::new("rustup");
    rustup
        .args(["target", "add", GUEST_TARGET, "--toolchain"])
        .arg(&toolchain.name);
    if let Some(home) = &toolchain.rustup_home {
        rustup.env("RUSTUP_HOME", home);
    }
    let output = rustup.output().map_err(|e| {
        format!(
            "the {GUEST_TARGET} target is not installed and `rustup` cannot be run ({e}): {retry}"
        )
    })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let reason = stderr
            .lines()
            .map(str::trim)
            .find(|line| line.starts_with("error:"))
            .or_else(|| stderr.lines().map(str::trim).rfind(|line| !line.is_empty()))
            .unwrap_or("no output");
        return Err(format!(
            "the {GUEST_TARGET} target is not installed and `rustup target add` failed \
             ({}; {reason}): {retry}",
            output.status
        ));
    }
    if !has_core(&libdir) {
        return Err(format!(
            "`rustup target add {GUEST_TARGET} --toolchain {name}` succeeded but {} still has no \
             `core`: is {rustc:?} that toolchain's rustc?",
            libdir.display()
        ));
    }
    println!(
        "cargo:warning=installed the {GUEST_TARGET} target for toolchain {name} \
         (`rustup target add`), which the embedded demo kernel needs"
    );
    Ok(Some(toolchain))
}

/// `rustc --print sysroot` and `rustc --print target-libdir --target GUEST_TARGET`.
fn sysroot_and_libdir(rustc: &OsStr) -> Result<(PathBuf, PathBuf), String> {
    let output = Command::new(rustc)
        .args([
            "--print",
            "sysroot",
            "--print",
            "target-libdir",
            "--target",
            GUEST_TARGET,
        ])
        .output()
        .map_err(|e| format!("cannot run {rustc:?} to find its sysroot: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let mut lines = stdout.lines();
    match (output.status.success(), lines.next(), lines.next()) {
        (true, Some(sysroot), Some(libdir)) => Ok((sysroot.into(), libdir.into())),
        _ => Err(format!(
            "`{rustc:?} --print sysroot --print target-libdir --target {GUEST_TARGET}` failed \
             ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )),
    }
}

/// Whether `libdir` has the target's `core` (what "can't find crate for `core`" misses).
fn has_core(libdir: &Path) -> bool {
    std::fs::read_dir(libdir).is_ok_and(|entries| {
        entries.filter_map(Result::ok).any(|entry| {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            name.starts_with("libcore-") && name.ends_with(".rlib")
        })
    })
}

/// The rustup toolchain whose sysroot is `sysroot`: `<RUSTUP_HOME>/toolchains/<name>` names
/// itself; otherwise the `RUSTUP_TOOLCHAIN` rustup's proxies set for the processes they run.
fn rustup_toolchain(sysroot: &Path) -> Option<Toolchain> {
    let toolchains = sysroot
        .parent()
        .filter(|p| p.file_name() == Some(OsStr::new("toolchains")));
    if let (Some(name), Some(toolchains)) = (sysroot.file_name(), toolchains) {
        return Some(Toolchain {
            name: name.to_owned(),
            rustup_home: toolchains.parent().map(Path::to_path_buf),
        });
    }
    env::var_os("RUSTUP_TOOLCHAIN")
        .filter(|name| !name.is_empty())
        .map(|name| Toolchain {
            name,
            rustup_home: None,
        })
}
