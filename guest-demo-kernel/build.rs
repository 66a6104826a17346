//! Links the kernel with `link.ld`: a static, non-PIE ELF executable whose segments load at
//! their physical = virtual addresses from 0x200000 (`hypercall_abi::layout::KERNEL_MIN_GPA`).

use std::path::PathBuf;

fn main() {
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let script = dir.join("link.ld");
    println!("cargo::rerun-if-changed=link.ld");
    println!("cargo::rustc-link-arg-bins=-T{}", script.display());
    // `x86_64-unknown-none` links a static PIE by default. `.cargo/config.toml` sets
    // `relocation-model=static`, but RUSTFLAGS / CARGO_ENCODED_RUSTFLAGS (e.g. inherited by a
    // cargo run from another build script) replace config rustflags; `--no-pie` keeps the
    // output an ET_EXEC without a dynamic section either way (lld: the last of -pie/--no-pie
    // wins, and link args from here come after rustc's own).
    println!("cargo::rustc-link-arg-bins=--no-pie");
}
