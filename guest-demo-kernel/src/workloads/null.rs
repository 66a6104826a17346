//! `null` (argument `ops`, default 100000): bare host round trips. PV: `ops` `null` hypercalls;
//! trapped: `ops` 32-bit writes to the null port. Checksum: FNV-1a over `0..ops` as
//! little-endian `u64`s.

use guest_pv::Fnv1a;
use guest_pv::args::Args;

use super::{Env, Outcome, Workload};
use crate::platform::{Platform, marker_begin, marker_end, null_port_read, null_port_write};

pub const WORKLOAD: Workload = Workload {
    name: "null",
    keys: &["ops"],
    run,
};

const DEFAULT_OPS: u64 = 100_000;

fn run(env: &mut Env, args: &Args<'_>) -> Outcome {
    let ops = args.get_or("ops", DEFAULT_OPS);
    let mut sum = Fnv1a::new();
    match env.platform {
        Platform::Pv(pv) => {
            marker_begin();
            for i in 0..ops {
                match pv.null(i) {
                    Ok(v) if v == i => {}
                    Ok(v) => panic!("null hypercall {i}: host echoed {v}"),
                    Err(e) => panic!("null hypercall {i}: {e}"),
                }
                sum.write_u64(i);
            }
            marker_end();
        }
        Platform::Trapped => {
            marker_begin();
            for i in 0..ops {
                null_port_write(i as u32);
                sum.write_u64(i);
            }
            marker_end();
            let seen = null_port_read();
            // The host counts every write since boot; this loop made all of them.
            if seen != ops as u32 {
                panic!("null port counted {seen} writes, expected {}", ops as u32);
            }
        }
    }
    Outcome {
        ops,
        checksum: sum.finish(),
    }
}
