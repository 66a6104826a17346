//! `host-vmm fleet`: N VMs at once, each reported, with the fleet's host cost.

mod common;

use common::{host_vmm, require_kvm};

#[test]
fn a_fleet_runs_every_vm_and_reports_each() {
    require_kvm();
    for mode in ["pv", "trapped"] {
        let o = host_vmm(&[
            "fleet",
            "--vms",
            "4",
            "--mode",
            mode,
            "--mem",
            "32M",
            "--workload",
            "null",
            "--",
            "ops=5000",
        ]);
        let out = String::from_utf8_lossy(&o.stdout);
        assert_eq!(
            o.status.code(),
            Some(0),
            "{out}{}",
            String::from_utf8_lossy(&o.stderr)
        );
        let lines: Vec<&str> = out.lines().filter(|l| l.starts_with("vm ")).collect();
        assert_eq!(lines.len(), 4, "{out}");
        let sums: Vec<&str> = lines
            .iter()
            .map(|l| {
                l.split_whitespace()
                    .find(|w| w.starts_with("checksum="))
                    .unwrap()
            })
            .collect();
        assert!(sums.iter().all(|s| *s == sums[0]), "{out}");
        assert!(out.contains("fleet: 4 of 4 VMs ok"), "{out}");
        // The VMs' windows were lined up by the start gate, so there is a steady span.
        assert!(
            out.contains("fleet: steady state (every VM inside its measured window)"),
            "{out}"
        );
    }
}

#[test]
fn a_failing_vm_is_reported_and_the_fleet_says_so() {
    require_kvm();
    // Every VM is stopped by its timeout: each is reported as stopped, the fleet exits 1.
    let o = host_vmm(&[
        "fleet",
        "--vms",
        "3",
        "--mem",
        "32M",
        "--workload",
        "idle",
        "--timeout",
        "50ms",
        "--",
        "intervals=100",
        "interval_us=10000",
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert_eq!(out.matches("FAILED: stopped").count(), 3, "{out}");
    assert!(out.contains("fleet: 0 of 3 VMs ok"), "{out}");
    // Bad sizes are usage errors.
    let o = host_vmm(&["fleet", "--vms", "0"]);
    assert_ne!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stderr).contains("1 to 256"));
}

/// Guests that used memory once and freed it: PV gave it back, an unmodified guest holds it.
#[test]
fn freed_memory_costs_the_host_only_without_pv() {
    require_kvm();
    let rss = |mode: &str| -> u64 {
        let o = host_vmm(&[
            "fleet",
            "--vms",
            "4",
            "--mode",
            mode,
            "--mem",
            "64M",
            "--workload",
            "idle",
            "--",
            "intervals=30",
            "warm_mib=32",
        ]);
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        assert_eq!(o.status.code(), Some(0), "{out}");
        let sums: std::collections::BTreeSet<&str> = out
            .lines()
            .filter(|l| l.starts_with("vm "))
            .map(|l| {
                l.split_whitespace()
                    .find(|w| w.starts_with("checksum="))
                    .unwrap()
            })
            .collect();
        assert_eq!(sums.len(), 1, "{out}");
        let line = out.lines().find(|l| l.starts_with("fleet:")).unwrap();
        line.split("RSS median ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{line}"))
    };
    let (pv, trapped) = (rss("pv"), rss("trapped"));
    // 4 × 32 MiB stays backed in trapped mode; PV released it.
    assert!(trapped >= 4 * 32, "trapped fleet RSS {trapped} MiB");
    assert!(
        pv * 2 <= trapped,
        "PV fleet RSS {pv} MiB, trapped {trapped} MiB"
    );
}
