//! The guest-side hypercall fuzzer: the demo kernel's `fuzz` workload issues random hypercalls
//! (random call numbers and sub-operations, lengths, counts and addresses) under real KVM,
//! checks every answer against the ABI (it panics, exit 101, on an undocumented status or
//! value) and survives its own fuzzing. Here with a short budget; the long run (≥ 10⁵ calls):
//!
//! ```text
//! cargo run --release -p host-vmm -- run --stats --workload fuzz -- calls=200000 seed=7
//! ```
//!
//! (≈ 5 s; `calls=1000000` ≈ 30 s.) It must exit 0 with a `PVKIT-RESULT … checksum=…` line
//! that lists the status totals, preceded by one `fuzz: <call> …` line per call.

use host_vmm::compare::Measured;
use host_vmm::config::VmConfig;
use hypercall_abi::{Error, features};
use tests::{Mode, boot, run_cfg, text};

const CALLS: u64 = 20_000;

/// The status fields of the result line: `ok`, then the ABI name of every error.
fn statuses() -> Vec<&'static str> {
    (0..=Error::TypeConflict.code())
        .map(|status| match Error::from_status(status) {
            Ok(()) => "ok",
            Err(e) => e
                .expect("every code up to TYPE_CONFLICT is documented")
                .name(),
        })
        .collect()
}

fn fuzz(seed: u64) -> Measured {
    boot(
        Mode::Pv,
        "fuzz",
        &[&format!("calls={CALLS}"), &format!("seed={seed}")],
    )
}

/// The checksum and status totals of a finished run; panics unless it exited 0 with a result
/// line accounting for every call.
fn outcome(r: &Measured) -> (u64, Vec<u64>) {
    assert_eq!(r.exit_code, 0, "{}", text(r));
    let res = r.result.as_ref().expect("a PVKIT-RESULT line");
    assert_eq!(res.get("workload"), Some("fuzz"));
    assert_eq!(res.get("mode"), Some("pv"));
    assert_eq!(res.ops(), Some(CALLS));
    let totals: Vec<u64> = statuses()
        .iter()
        .map(|s| res.get(s).and_then(|v| v.parse().ok()).expect(s))
        .collect();
    assert_eq!(totals.iter().sum::<u64>(), CALLS, "every call counted once");
    let out = text(r);
    assert_eq!(out.matches("\nfuzz: ").count(), 10, "{out}");
    (res.checksum().expect("checksum"), totals)
}

#[test]
fn fuzz_survives_and_is_deterministic() {
    let a = fuzz(7);
    let b = fuzz(7);
    let (sum_a, totals_a) = outcome(&a);
    let (sum_b, totals_b) = outcome(&b);
    assert_eq!(sum_a, sum_b, "same seed, same status counts");
    assert_eq!(totals_a, totals_b);
    // Every call made it to the host: one hypercall exit per call (plus the kernel's own
    // console and exit calls outside the timed window).
    let w = a.window.as_ref().expect("measured window");
    assert_eq!(w.exits.total, CALLS, "{}", w.exits.summary());
    // The mix reaches success and every error class but NOT_IMPLEMENTED (all features on).
    for (name, n) in statuses().iter().zip(&totals_a) {
        if *name == "not_implemented" {
            assert_eq!(*n, 0);
        } else {
            assert!(*n > 0, "no {name} in {totals_a:?}");
        }
    }

    let c = fuzz(8);
    let (sum_c, _) = outcome(&c);
    assert_ne!(sum_a, sum_c, "another seed, another call sequence");
}

#[test]
fn fuzz_with_features_disabled_gets_not_implemented() {
    let mut cfg = VmConfig::new(Mode::Pv, "fuzz");
    cfg.args = vec!["calls=5000".into()];
    cfg.disable = features::MMU_UPDATE | features::ZERO_PREPARE;
    let r = run_cfg(cfg).expect("VMM runs");
    assert_eq!(r.exit_code, 0, "{}", text(&r));
    let out = text(&r);
    let line = out
        .lines()
        .find(|l| l.starts_with("fuzz: mmu_update"))
        .expect("mmu_update counts");
    assert!(
        line.starts_with("fuzz: mmu_update not_implemented=") && !line.contains(" ok="),
        "{line}"
    );
}

#[test]
fn fuzz_needs_pv_mode() {
    let r = boot(Mode::Trapped, "fuzz", &[]);
    assert_eq!(r.exit_code, 4, "{}", text(&r));
    assert!(text(&r).contains("needs mode pv"), "{}", text(&r));
    assert!(
        r.stats.by_hypercall.is_empty(),
        "{:?}",
        r.stats.by_hypercall
    );
}
