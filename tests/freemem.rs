//! Free frames reported without an exit (ABI v1.8, `zero_hints(FREE_LIST)`) under real KVM:
//! the `freemem` workload gives the same checksum in PV and trapped mode, PV registers its
//! free list (and releases the rest of what it frees) while trapped reports nothing.

use host_vmm::compare::Measured;
use tests::{Mode, boot, text};

fn freemem(mode: Mode) -> Measured {
    let r = boot(mode, "freemem", &["rounds=20"]);
    assert_eq!(r.exit_code, 0, "{}", text(&r));
    assert!(text(&r).contains("freemem: allocated "), "{}", text(&r));
    r
}

fn field(r: &Measured, key: &str) -> u64 {
    let res = r.result.as_ref().expect("a PVKIT-RESULT line");
    res.get(key)
        .unwrap_or_else(|| panic!("no {key} in {}", text(r)))
        .parse()
        .unwrap_or_else(|_| panic!("{key} is not a number in {}", text(r)))
}

#[test]
fn pv_and_trapped_agree_and_only_pv_reports_free_frames() {
    let pv = freemem(Mode::Pv);
    let trapped = freemem(Mode::Trapped);
    let sum = |r: &Measured| r.result.as_ref().unwrap().checksum();
    assert_eq!(sum(&pv), sum(&trapped), "same data, same checksum");
    for r in [&pv, &trapped] {
        assert_eq!(r.result.as_ref().unwrap().ops(), Some(20));
        let (n, freed, kept) = (field(r, "allocated"), field(r, "freed"), field(r, "kept"));
        assert!(n >= 1000, "most of free RAM: {n} frames");
        assert_eq!(freed + kept, n);
        assert_eq!(kept, n / 4);
    }
    assert_eq!(field(&pv, "allocated"), field(&trapped, "allocated"));

    // PV: the free list is registered once, and what was freed is released or still pending
    // in it (none of it is lost).
    assert_eq!(field(&pv, "free_list"), 1, "{}", text(&pv));
    assert_eq!(pv.stats.event("free_list_registered"), 1);
    let (released, pending) = (field(&pv, "released_bytes"), field(&pv, "pending_bytes"));
    assert_eq!(released + pending, field(&pv, "freed") * 4096);
    assert!(released > 0 || pending > 0);
    assert_eq!(pv.stats.event("released_bytes"), released);

    // Trapped: an unmodified guest never reports.
    assert_eq!(field(&trapped, "free_list"), 0);
    assert_eq!(field(&trapped, "released_bytes"), 0);
    assert_eq!(trapped.stats.event("free_list_registered"), 0);
    assert_eq!(
        trapped
            .stats
            .reason(host_vmm::metrics::ExitReason::Hypercall),
        0
    );
}

#[test]
fn bad_arguments_are_usage_errors() {
    for args in [&["rounds=0"][..], &["mib=100000"][..]] {
        let r = boot(Mode::Pv, "freemem", args);
        assert_eq!(r.exit_code, 2, "{args:?}: {}", text(&r));
        assert!(
            text(&r).contains("error: workload 'freemem'"),
            "{}",
            text(&r)
        );
    }
}
