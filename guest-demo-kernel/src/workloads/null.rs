//! `null` (argument `ops`, default 100000): bare host round trips, timed as one tight loop with
//! no guest work per call but the call itself. PV (the host offers `null`): `ops` `null` hypercalls (`Pvkit::null_loop`,
//! `null(i)` for `i` = `0..ops`); trapped: `ops` 32-bit writes of `i as u32` to the null port
//! (`null_port_loop`).
//!
//! `sum` = the wrapping sum of the values the host echoed (PV, checked to equal the expected
//! value) or of the values written (trapped): `ops(ops-1)/2` mod 2⁶⁴ in both modes. Checksum:
//! FNV-1a over `ops` then `sum`, each as 8 little-endian bytes. In trapped mode the null port's
//! write counter is read back after the end marker and must equal `ops` (low 32 bits).

use guest_pv::args::Args;
use guest_pv::{Fnv1a, null_sum};
use hypercall_abi::features;

use super::{Env, Outcome, Workload};
use crate::platform::{marker_begin, marker_end, null_port_loop, null_port_read};

pub const WORKLOAD: Workload = Workload {
    name: "null",
    keys: &["ops"],
    text_keys: &[],
    run,
};

const DEFAULT_OPS: u64 = 100_000;

fn run(env: &mut Env, args: &Args<'_>) -> Outcome {
    let ops = args.get_or("ops", DEFAULT_OPS);
    let expected = null_sum(ops);
    let sum = match env.platform.feature(features::NULL) {
        Some(pv) => {
            marker_begin();
            let r = pv.null_loop(ops);
            marker_end();
            match r {
                Ok(sum) if sum == expected => sum,
                Ok(sum) => panic!("null hypercalls: the echoes sum to {sum}, expected {expected}"),
                Err(e) => panic!("null hypercalls: {e}"),
            }
        }
        None => {
            marker_begin();
            let sum = null_port_loop(ops);
            marker_end();
            let seen = null_port_read();
            // The host counts every write since boot; this loop made all of them.
            if seen != ops as u32 {
                panic!("null port counted {seen} writes, expected {}", ops as u32);
            }
            sum
        }
    };
    let mut h = Fnv1a::new();
    h.write_u64(ops);
    h.write_u64(sum);
    Outcome::new(ops, h.finish())
}
