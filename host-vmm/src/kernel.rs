//! The demo kernel, built by `build.rs` and embedded in the binary.

/// ELF bytes of `guest-demo-kernel` (x86_64-unknown-none, release).
pub static DEMO_KERNEL: &[u8] = include_bytes!(env!("PVKIT_DEMO_KERNEL"));
