//! `panic`: panics on purpose, so tests can check that a guest panic prints `PVKIT-PANIC: …`
//! and exits with code 101.

use crate::args::Args;

use super::{Env, Outcome, Workload};

pub const WORKLOAD: Workload = Workload {
    name: "panic",
    keys: &[],
    text_keys: &[],
    run,
};

fn run(_env: &mut Env, _args: &Args<'_>) -> Outcome {
    panic!("deliberate panic requested by the 'panic' workload")
}
