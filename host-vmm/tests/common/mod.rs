//! What host-vmm's integration tests share: the binary under test and the KVM check. Each
//! test file uses a part of it.
#![allow(dead_code)]

use std::process::{Command, Output};

/// The `host-vmm` binary of this build.
pub const BIN: &str = env!("CARGO_BIN_EXE_host-vmm");

/// Panics with a clear message unless `/dev/kvm` can be opened read-write: these tests boot
/// real guests and never pass silently without KVM.
pub fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("these tests boot real guests and need read-write /dev/kvm ({e})");
    }
}

/// Runs `host-vmm args` to the end.
pub fn host_vmm(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("spawn host-vmm")
}
