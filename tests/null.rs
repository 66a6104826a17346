//! `null`: the bare cost of one transition, PV hypercall vs trapped PIO. Same result both ways;
//! exactly one exit per operation either way.

use host_vmm::metrics::ExitReason;
use tests::{Mode, boot, fnv1a};

const OPS: u64 = 5_000;

/// FNV-1a over `ops` and the wrapping sum of the echoed (PV) or written (trapped) values.
fn expected_checksum(ops: u64) -> u64 {
    let sum = (0..ops).fold(0u64, |s, i| s.wrapping_add(i));
    fnv1a(ops.to_le_bytes().into_iter().chain(sum.to_le_bytes()))
}

#[test]
fn null_gives_the_same_checksum_in_both_modes() {
    let ops = format!("ops={OPS}");
    let pv = boot(Mode::Pv, "null", &[&ops]);
    let tr = boot(Mode::Trapped, "null", &[&ops]);
    for r in [&pv, &tr] {
        assert_eq!(r.exit_code, 0);
        let res = r.result.as_ref().unwrap();
        assert_eq!(res.ops(), Some(OPS));
        assert_eq!(res.checksum(), Some(expected_checksum(OPS)));
    }
}

#[test]
fn null_costs_exactly_one_exit_per_op() {
    let ops = format!("ops={OPS}");
    let pv = boot(Mode::Pv, "null", &[&ops]);
    let w = pv.window.as_ref().expect("measured window");
    assert_eq!(w.exits.total, OPS, "{}", w.exits.summary());
    assert_eq!(w.exits.by_hypercall["null"], OPS);
    assert_eq!(pv.null_writes, 0);

    let tr = boot(Mode::Trapped, "null", &[&ops]);
    let w = tr.window.as_ref().expect("measured window");
    assert_eq!(w.exits.total, OPS, "{}", w.exits.summary());
    assert_eq!(w.exits.reason(ExitReason::Pio), OPS);
    assert_eq!(w.exits.by_device["null"], OPS);
    assert_eq!(tr.stats.reason(ExitReason::Hypercall), 0);
    // The guest read back the count after the window: the host saw every write.
    assert_eq!(tr.null_writes, OPS);
}
