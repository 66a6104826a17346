//! `compare --workload density`: many lightly loaded services on one host, where the
//! information gap costs the most. For each fleet size (default [`DENSITY_SIZES`]) and each way
//! of idling — PV (`idle_yield`: parked in the host until the deadline; `zero_hints` release of
//! what each request freed), trapped (`hlt` with a 1 kHz tick; the guest zeroes what it reuses),
//! spinning (a reference, small fleets only) — `N` VMs run the `service` workload at once
//! ([`crate::fleet`]): every [`PERIOD_US`] µs each serves one request that touches and frees
//! [`WORK_KIB`] KiB, [`REQUESTS`] times, after using half its RAM once and freeing it
//! (`warm_mib`): a PV guest gave that back to the host, an unmodified guest still holds it.
//!
//! The period: 10 ms (100 requests a second per VM) is a lightly loaded service — a request's
//! work (tens of µs) is well under 1 % of the period — and it is the trapped guest's tick
//! period times ten, so PV wakes 100 times a second where the trapped guest takes 1000 ticks.
//! On our host a PV wake-up costs ~150–250 µs of vCPU CPU and a trapped tick ~90–120 µs, so PV's
//! vCPU CPU is roughly (100 × 200 µs) / (1000 × 100 µs) ≈ 0.2 of trapped's; at a period near
//! 1 ms it would be no better. The records say what was measured.
//!
//! Reported per fleet: the host CPU the vCPUs used in their measured windows, in cores (the sum
//! of every VM's vCPU-thread CPU time over the mean window), the whole process's CPU in cores
//! (boot and teardown included), the process's resident set (median sample), the wake-up
//! latency (`latency_ns_p50`/`_p99`: the median of the VMs' p50 overshoots and the largest of
//! their p99s) and the response latency (`response_ns_p50`/`_p99`, deadline to request done,
//! the same way), with the period and work per request (`period_us`, `work_kib`).

use std::collections::BTreeMap;

use hypercall_abi::boot::Mode;

use super::error::CompareError;
use super::record::Record;
use super::workloads::CompareOptions;
use crate::config::VmConfig;

/// Default fleet sizes.
pub const DENSITY_SIZES: &[usize] = &[1, 4, 16, 64];
/// The largest fleet that also runs the spinning reference (spinning vCPUs beyond the host's
/// cores only measure the host's scheduler).
pub const SPIN_MAX_VMS: usize = 4;
/// Requests per VM.
pub const REQUESTS: u64 = 100;
/// The service's period: one request every 10 ms (see the module docs).
pub const PERIOD_US: u64 = 10_000;
/// Memory one request allocates, writes and frees.
pub const WORK_KIB: u64 = 64;

fn cfg(opts: &CompareOptions, mode: Mode, strategy: &str) -> VmConfig {
    let mut cfg = VmConfig::new(mode, "service");
    cfg.kernel = opts.kernel.clone();
    cfg.kvm_device = opts.kvm_device.clone();
    cfg.mem_size = opts.mem_size;
    cfg.args = vec![
        format!("strategy={strategy}"),
        format!("requests={REQUESTS}"),
        format!("period_us={PERIOD_US}"),
        format!("work_kib={WORK_KIB}"),
        format!("warm_mib={}", (opts.mem_size / 2) >> 20),
    ];
    cfg
}

/// The `density` rows.
pub fn density_rows(
    opts: &CompareOptions,
    progress: &mut dyn FnMut(&str, &str),
) -> Result<Vec<Record>, CompareError> {
    let mut records = Vec::new();
    for &n in &opts.density_sizes {
        for (mode, strategy) in [
            (Mode::Pv, "pv"),
            (Mode::Trapped, "hlt"),
            (Mode::Trapped, "spin"),
        ] {
            if strategy == "spin" && n > SPIN_MAX_VMS {
                continue;
            }
            let label = format!("{strategy} n={n}");
            let run = format!("density/{label}");
            progress("density", &label);
            let fleet = crate::fleet::run(&cfg(opts, mode, strategy), n).map_err(|why| {
                CompareError::Lifecycle {
                    run: run.clone(),
                    why,
                }
            })?;
            if let Some(bad) = fleet.members.iter().find(|m| !m.ok()) {
                return Err(CompareError::Lifecycle {
                    run,
                    why: format!(
                        "VM {} of {n}: {}",
                        bad.index,
                        bad.failure().unwrap_or_default()
                    ),
                });
            }
            records.push(record(&label, &fleet)?);
        }
    }
    Ok(records)
}

fn record(label: &str, fleet: &crate::fleet::FleetReport) -> Result<Record, CompareError> {
    let run = format!("density/{label}");
    let mut window_cpu = 0u64;
    let mut window_wall = 0u64;
    let mut p50s = Vec::new();
    let mut p99 = 0u64;
    let mut response_p50s = Vec::new();
    let mut response_p99 = 0u64;
    let mut checksum = None;
    for m in &fleet.members {
        let measured = m.run.as_ref().expect("checked ok");
        let w = measured
            .window
            .as_ref()
            .ok_or_else(|| CompareError::NoWindow { run: run.clone() })?;
        window_cpu += w.host_cpu_ns;
        window_wall += w.wall_ns;
        let r = m
            .result()
            .ok_or_else(|| CompareError::NoResult { run: run.clone() })?;
        let num = |k: &str| r.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        p50s.push(num("wake_overshoot_ns_p50"));
        p99 = p99.max(num("wake_overshoot_ns_p99"));
        response_p50s.push(num("response_ns_p50"));
        response_p99 = response_p99.max(num("response_ns_p99"));
        let c = r.checksum();
        if checksum.is_some() && checksum != c {
            return Err(CompareError::Lifecycle {
                run,
                why: "the VMs' checksums differ".into(),
            });
        }
        checksum = c;
    }
    p50s.sort_unstable();
    response_p50s.sort_unstable();
    let n = fleet.members.len() as u64;
    let mean_wall = window_wall / n.max(1);
    let milli = |x: f64| (x * 1000.0).round() as u64;
    let extra = BTreeMap::from([
        ("vms".to_string(), n),
        ("window_cpu_ns".into(), window_cpu),
        (
            "window_millicores".into(),
            milli(window_cpu as f64 / mean_wall.max(1) as f64),
        ),
        ("process_millicores".into(), milli(fleet.cores())),
        ("process_cpu_ns".into(), fleet.cpu_ns),
        ("rss_median_bytes".into(), fleet.rss_median_bytes),
        ("rss_max_bytes".into(), fleet.rss_max_bytes),
        ("latency_ns_p50".into(), p50s[p50s.len() / 2]),
        ("latency_ns_p99".into(), p99),
        (
            "response_ns_p50".into(),
            response_p50s[response_p50s.len() / 2],
        ),
        ("response_ns_p99".into(), response_p99),
        ("period_us".into(), PERIOD_US),
        ("work_kib".into(), WORK_KIB),
    ]);
    // `ops` per VM, as the guest counts them (every VM of every fleet does the same work).
    let mut rec = Record::unwindowed("density", label, REQUESTS, fleet.wall_ns, checksum, extra);
    rec.host_cpu_ns = window_cpu;
    Ok(rec)
}

/// The largest measured fleet of each idling mode whose vCPUs used less than one host core,
/// as `(mode, n, millicores)`; `None` for a mode none of whose fleets did.
pub fn largest_under_one_core(records: &[Record]) -> Vec<(String, Option<(u64, u64)>)> {
    let mut out = Vec::new();
    for strategy in ["pv", "hlt", "spin"] {
        let best = records
            .iter()
            .filter(|r| r.workload == "density" && r.mode.starts_with(&format!("{strategy} ")))
            .filter_map(|r| {
                let mc = *r.extra.get("window_millicores")?;
                (mc < 1000).then_some((*r.extra.get("vms")?, mc))
            })
            .max();
        if records
            .iter()
            .any(|r| r.workload == "density" && r.mode.starts_with(&format!("{strategy} ")))
        {
            out.push((strategy.to_string(), best));
        }
    }
    out
}
