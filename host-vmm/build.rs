//! Builds `guest-demo-kernel` for `x86_64-unknown-none` and hands its path to `kernel.rs`,
//! so `host-vmm` always embeds a demo kernel built from the same sources.
//!
//! The kernel is built by a nested cargo with its own target directory (the outer build holds
//! the lock on the normal one) and with the outer build's compiler flags and wrappers removed
//! (they are meant for the host, e.g. clippy-driver or `-C target-cpu=native`).

use std::env;
use std::path::PathBuf;
use std::process::Command;

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

    let status = Command::new(&cargo)
        .current_dir(&root)
        .args(["build", "--release", "--locked", "-p", "guest-demo-kernel"])
        .args(["--target", "x86_64-unknown-none", "--target-dir"])
        .arg(&target_dir)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cargo:?} to build the demo kernel: {e}"));
    assert!(
        status.success(),
        "building guest-demo-kernel for x86_64-unknown-none failed ({status}); \
         is the target installed? (`rustup target add x86_64-unknown-none`, done automatically \
         by rust-toolchain.toml)"
    );
    let built = target_dir.join("x86_64-unknown-none/release/guest-demo-kernel");
    let dest = out.join("guest-demo-kernel.elf");
    std::fs::copy(&built, &dest)
        .unwrap_or_else(|e| panic!("cannot copy {} to {}: {e}", built.display(), dest.display()));
    println!("cargo:rustc-env=PVKIT_DEMO_KERNEL={}", dest.display());
}
