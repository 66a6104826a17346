//! `hello`: nothing to time; the checksum covers the greeting line.

use crate::args::Args;
use guest_pv::Fnv1a;

use super::{Env, Outcome, Workload};
use crate::platform::{marker_begin, marker_end};

pub const WORKLOAD: Workload = Workload {
    name: "hello",
    keys: &[],
    text_keys: &[],
    run,
};

/// Markers around an empty section (so every workload has them); `ops` 0; checksum = FNV-1a of
/// the greeting line as printed, `\n` included (it names no mode, so both modes agree).
fn run(env: &mut Env, _args: &Args<'_>) -> Outcome {
    marker_begin();
    marker_end();
    Outcome::new(0, Fnv1a::hash(crate::greeting(env.boot_info).as_bytes()))
}
