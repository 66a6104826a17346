//! The demo kernel's workload-argument parser, tested on the host: `guest-demo-kernel` is a
//! freestanding binary without a test harness, and its `args` module is plain `core` code, so
//! its unit tests are compiled here.

#[path = "../guest-demo-kernel/src/args.rs"]
mod args;
