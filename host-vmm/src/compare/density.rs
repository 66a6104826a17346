//! `compare --workload density`: many lightly loaded services on one host, where the
//! information gap costs the most. For each fleet size (default [`DENSITY_SIZES`]) and each way
//! of idling — PV (`idle_yield`: parked in the host until the deadline; `zero_hints` release of
//! what each request freed), trapped (`hlt` with a 1 kHz tick; the guest zeroes what it reuses),
//! spinning (a reference, small fleets only) — `N` VMs run the `service` workload at once
//! ([`crate::fleet`]): every `period` (`--density-period-ms`, default
//! [`DEFAULT_PERIOD_US`]) each serves one request that touches and frees [`WORK_KIB`] KiB,
//! [`requests`] times, after using half its RAM once and freeing it (`warm_mib`): a PV guest
//! gave that back to the host, an unmodified guest still holds it. Spinning runs up to
//! [`SPIN_MAX_VMS`] VMs; beyond 64 VMs a mode runs only while its fleets have not yet taken the
//! host's two cores (a larger fleet would only measure the host's scheduler).
//!
//! The period: 100 ms (10 requests a second per VM) is a lightly loaded, idle-heavy service —
//! a request's work is well under 1 % of the period. What a wake-up costs decides the CPU
//! figures, and on our host (nested KVM) it depends on how long the vCPU thread slept: ~250 µs
//! of vCPU CPU after 10 ms, ~100–150 µs after 1 ms (measured with `idle` in both modes: a `hlt`
//! tick every 10 ms costs as much as a PV wake-up every 10 ms). The trapped guest takes its
//! 1 kHz tick whatever the load (~100 µs × 1000 a second); PV pays per request (the wake-up and
//! the switch to CPL 3 and back for the work, ~400 µs). So PV's share of trapped's CPU is
//! about `rate × 400 µs / 100 ms`; measured at 16 VMs: 0.07 at 10 requests a second, 0.12 at
//! 20 (`--density-period-ms 50`), 0.48 at 100 (`--density-period-ms 10`). The records say
//! what was measured, with the period.
//!
//! Reported per fleet: the host CPU the vCPUs used in their measured windows, in cores (the sum
//! of every VM's vCPU-thread CPU time over the mean window), the whole process's CPU in cores
//! in the steady state (`steady_millicores`: every thread, while every VM is inside its window
//! — the fleet's start gate lines the windows up) and from boot to exit (`process_millicores`),
//! the process's resident set (median sample), the wake-up
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
pub const DENSITY_SIZES: &[usize] = &[1, 4, 16, 64, 128];
/// A mode whose fleet's vCPUs took this many millicores (the host's two cores) runs no larger
/// fleet beyond [`SATURATED_FROM_VMS`] VMs.
const SATURATED_MILLICORES: u64 = 2000;
/// Fleets up to this size always run (the comparison at 16 and the one after it).
const SATURATED_FROM_VMS: usize = 64;
/// The largest fleet that also runs the spinning reference (spinning vCPUs beyond the host's
/// cores only measure the host's scheduler).
pub const SPIN_MAX_VMS: usize = 4;
/// The service's default period: one request every 100 ms (see the module docs).
pub const DEFAULT_PERIOD_US: u64 = 100_000;
/// How long each fleet serves requests, about: [`requests`] is this over the period.
const SERVE_US: u64 = 2_000_000;

/// Requests per VM at `period_us`: about 2 s of serving, 20..=100 requests (the p99 of fewer
/// than 100 is their maximum).
pub fn requests(period_us: u64) -> u64 {
    (SERVE_US / period_us.max(1)).clamp(20, 100)
}
/// Memory one request allocates, writes and frees.
pub const WORK_KIB: u64 = 64;

fn cfg(opts: &CompareOptions, mode: Mode, strategy: &str) -> VmConfig {
    let mut cfg = VmConfig::new(mode, "service");
    cfg.kernel = opts.kernel.clone();
    cfg.kvm_device = opts.kvm_device.clone();
    cfg.mem_size = opts.mem_size;
    cfg.args = vec![
        format!("strategy={strategy}"),
        format!("requests={}", requests(opts.density_period_us)),
        format!("period_us={}", opts.density_period_us),
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
    let mut records: Vec<Record> = Vec::new();
    let mut sizes = opts.density_sizes.clone();
    sizes.sort_unstable();
    for &n in &sizes {
        for (mode, strategy) in [
            (Mode::Pv, "pv"),
            (Mode::Trapped, "hlt"),
            (Mode::Trapped, "spin"),
        ] {
            if strategy == "spin" && n > SPIN_MAX_VMS {
                continue;
            }
            // Past the size where this mode's vCPUs took two cores, the host is saturated:
            // a larger fleet only measures its scheduler.
            if n > SATURATED_FROM_VMS
                && records.iter().any(|r| {
                    r.mode.starts_with(&format!("{strategy} "))
                        && r.extra.get("window_millicores").copied().unwrap_or(0)
                            >= SATURATED_MILLICORES
                })
            {
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
            records.push(record(&label, &fleet, opts.density_period_us)?);
        }
    }
    Ok(records)
}

fn record(
    label: &str,
    fleet: &crate::fleet::FleetReport,
    period_us: u64,
) -> Result<Record, CompareError> {
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
        (
            "steady_millicores".into(),
            fleet.steady_cores().map_or(0, milli),
        ),
        ("rss_median_bytes".into(), fleet.rss_median_bytes),
        ("rss_max_bytes".into(), fleet.rss_max_bytes),
        ("latency_ns_p50".into(), p50s[p50s.len() / 2]),
        ("latency_ns_p99".into(), p99),
        (
            "response_ns_p50".into(),
            response_p50s[response_p50s.len() / 2],
        ),
        ("response_ns_p99".into(), response_p99),
        ("period_us".into(), period_us),
        ("work_kib".into(), WORK_KIB),
    ]);
    // `ops` per VM, as the guest counts them (every VM of every fleet does the same work).
    let ops = requests(period_us);
    let mut rec = Record::unwindowed("density", label, ops, fleet.wall_ns, checksum, extra);
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

/// The record of `strategy`'s fleet of `n` VMs, if it ran.
fn fleet_record<'a>(records: &'a [Record], strategy: &str, n: u64) -> Option<&'a Record> {
    records.iter().find(|r| {
        r.workload == "density"
            && r.mode.starts_with(&format!("{strategy} "))
            && r.extra.get("vms") == Some(&n)
    })
}

/// The fleet size PV and trapped are compared at: 16 VMs if both ran it, else the largest
/// both ran.
pub fn compared_size(records: &[Record]) -> Option<u64> {
    let both = sizes_both_ran(records);
    both.contains(&16)
        .then_some(16)
        .or_else(|| both.into_iter().max())
}

/// The fleet sizes both PV and trapped (`hlt`) ran.
fn sizes_both_ran(records: &[Record]) -> Vec<u64> {
    records
        .iter()
        .filter(|r| r.workload == "density" && r.mode.starts_with("pv "))
        .filter_map(|r| r.extra.get("vms").copied())
        .filter(|&n| fleet_record(records, "hlt", n).is_some())
        .collect()
}

/// "`pv 128 (0.498 cores), hlt 4 (0.240 cores), spin none`": [`largest_under_one_core`] as
/// text.
fn largest_text(records: &[Record]) -> String {
    largest_under_one_core(records)
        .into_iter()
        .map(|(mode, best)| match best {
            Some((n, mc)) => format!("{mode} {n} ({:.3} cores)", mc as f64 / 1000.0),
            None => format!("{mode} none"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The summary lines of `density` under the table: cost per fleet, the largest fleet of each
/// mode under one core, PV against trapped at [`compared_size`] VMs (and at the largest size
/// both ran, if larger), then [`response_lines`].
pub fn summary_lines(records: &[Record]) -> String {
    let rows: Vec<&Record> = records.iter().filter(|r| r.workload == "density").collect();
    if rows.is_empty() {
        return String::new();
    }
    let g = |r: &Record, k: &str| r.extra.get(k).copied().unwrap_or(0);
    let mut s = String::new();
    for r in &rows {
        s += &format!(
            "density {:<10}: vCPUs {:.3} cores (whole process {:.3} in the steady state, {:.3} \
             boot to exit), RSS {} MiB, wake latency p50 {} µs p99 {} µs\n",
            r.mode,
            g(r, "window_millicores") as f64 / 1000.0,
            g(r, "steady_millicores") as f64 / 1000.0,
            g(r, "process_millicores") as f64 / 1000.0,
            g(r, "rss_median_bytes") >> 20,
            g(r, "latency_ns_p50") / 1000,
            g(r, "latency_ns_p99") / 1000,
        );
    }
    s += &format!(
        "density: the largest measured fleet under one core of vCPU time: {}\n",
        largest_text(records)
    );
    let mut sizes: Vec<u64> = compared_size(records).into_iter().collect();
    if let Some(&max) = sizes_both_ran(records).iter().max()
        && !sizes.contains(&max)
    {
        sizes.push(max);
    }
    for n in sizes {
        let (Some(pv), Some(hlt)) = (
            fleet_record(records, "pv", n),
            fleet_record(records, "hlt", n),
        ) else {
            continue;
        };
        let share = |k: &str| g(pv, k) as f64 / g(hlt, k).max(1) as f64;
        s += &format!(
            "density at {n} VMs: PV vCPU CPU {:.2} of trapped's (whole process in the steady \
             state {:.2}), host RSS {:.2} of trapped's\n",
            share("window_millicores"),
            share("steady_millicores"),
            share("rss_median_bytes"),
        );
    }
    s + &response_lines(records)
}

/// One line per fleet with the service's period and response latency (deadline to request
/// done): `density <mode>: service every <P> µs, <W> KiB per request: response p50 <n> µs p99
/// <n> µs`. Meant for the summary under the table, next to the lines of `report`.
pub fn response_lines(records: &[Record]) -> String {
    let g = |r: &Record, k: &str| r.extra.get(k).copied().unwrap_or(0);
    let mut s = String::new();
    for r in records
        .iter()
        .filter(|r| r.workload == "density" && r.extra.contains_key("response_ns_p50"))
    {
        s += &format!(
            "density {:<10}: service every {} µs, {} KiB per request: response p50 {} µs p99 {} \
             µs\n",
            r.mode,
            g(r, "period_us"),
            g(r, "work_kib"),
            g(r, "response_ns_p50") / 1000,
            g(r, "response_ns_p99") / 1000,
        );
    }
    s
}

/// The consolidation story in one paragraph, from the `density` records' numbers (formatted
/// from the same fields the JSON holds): PV's vCPU CPU and RSS as shares of trapped's at
/// [`compared_size`] VMs, both sides' response latency there, and the largest fleet of each mode
/// under one core. `None` without a PV and a trapped fleet of the same size.
pub fn headline(records: &[Record]) -> Option<String> {
    let n = compared_size(records)?;
    let (pv, hlt) = (
        fleet_record(records, "pv", n)?,
        fleet_record(records, "hlt", n)?,
    );
    let g = |r: &Record, k: &str| r.extra.get(k).copied().unwrap_or(0);
    let cores = |r: &Record| g(r, "window_millicores") as f64 / 1000.0;
    let mib = |r: &Record| g(r, "rss_median_bytes") >> 20;
    let us = |r: &Record, k: &str| g(r, k) / 1000;
    let share = |a: u64, b: u64| a as f64 / b.max(1) as f64;
    let service = match pv.extra.get("period_us") {
        Some(p) => format!(
            "services woken every {p} µs doing {} KiB of memory work per request",
            g(pv, "work_kib")
        ),
        None => "idle VMs".to_string(),
    };
    Some(format!(
        "{n} {service}: PV's vCPUs used {:.3} cores, {:.2} of trapped's {:.3}; host RSS {} MiB, \
         {:.2} of trapped's {} MiB; response latency p50/p99 PV {}/{} µs, trapped {}/{} µs. \
         Largest measured fleet under one core of vCPU time: {}.",
        cores(pv),
        share(g(pv, "window_millicores"), g(hlt, "window_millicores")),
        cores(hlt),
        mib(pv),
        share(g(pv, "rss_median_bytes"), g(hlt, "rss_median_bytes")),
        mib(hlt),
        us(pv, "response_ns_p50"),
        us(pv, "response_ns_p99"),
        us(hlt, "response_ns_p50"),
        us(hlt, "response_ns_p99"),
        largest_text(records)
    ))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A `density` record as [`record`] makes them, with made-up numbers.
    pub(crate) fn fleet(strategy: &str, n: u64, millicores: u64, rss_mib: u64) -> Record {
        let extra = BTreeMap::from([
            ("vms".to_string(), n),
            ("window_millicores".into(), millicores),
            ("process_millicores".into(), millicores * 2),
            ("steady_millicores".into(), millicores),
            ("rss_median_bytes".into(), rss_mib << 20),
            ("rss_max_bytes".into(), rss_mib << 20),
            ("latency_ns_p50".into(), 100_000 * n),
            ("latency_ns_p99".into(), 300_000 * n),
            ("response_ns_p50".into(), 200_000 * n),
            ("response_ns_p99".into(), 900_000 * n),
            ("period_us".into(), DEFAULT_PERIOD_US),
            ("work_kib".into(), WORK_KIB),
        ]);
        let mut r = Record::unwindowed(
            "density",
            &format!("{strategy} n={n}"),
            requests(DEFAULT_PERIOD_US),
            1_000_000_000,
            Some(7),
            extra,
        );
        r.host_cpu_ns = millicores * 1_000_000;
        r
    }

    #[test]
    fn the_summary_compares_at_16_vms_and_at_the_largest_size_both_ran() {
        let records = vec![
            fleet("pv", 16, 250, 80),
            fleet("hlt", 16, 1250, 900),
            fleet("pv", 64, 600, 300),
            fleet("hlt", 64, 2000, 2700),
        ];
        let s = summary_lines(&records);
        assert!(
            s.contains("density at 16 VMs: PV vCPU CPU 0.20 of trapped's (whole process in the steady state 0.20), host RSS 0.09"),
            "{s}"
        );
        assert!(
            s.contains("density at 64 VMs: PV vCPU CPU 0.30 of trapped's (whole process in the steady state 0.30), host RSS 0.11"),
            "{s}"
        );
        assert!(
            s.contains("the largest measured fleet under one core of vCPU time: pv 64"),
            "{s}"
        );
        assert!(s.contains("service every 100000 µs"), "{s}");
        assert!(summary_lines(&[]).is_empty());
    }

    #[test]
    fn the_headline_compares_at_16_vms() {
        let records = vec![
            fleet("pv", 4, 60, 30),
            fleet("hlt", 4, 300, 280),
            fleet("pv", 16, 250, 80),
            fleet("hlt", 16, 1250, 900),
            fleet("pv", 64, 950, 480),
        ];
        assert_eq!(compared_size(&records), Some(16));
        let h = headline(&records).unwrap();
        assert!(h.starts_with("16 services woken every 100000 µs"), "{h}");
        assert!(h.contains("0.250 cores, 0.20 of trapped's 1.250"), "{h}");
        assert!(
            h.contains("host RSS 80 MiB, 0.09 of trapped's 900 MiB"),
            "{h}"
        );
        assert!(h.contains("PV 3200/14400 µs, trapped 3200/14400 µs"), "{h}");
        assert!(
            h.contains("pv 64 (0.950 cores), hlt 4 (0.300 cores)"),
            "{h}"
        );
        let lines = response_lines(&records);
        assert_eq!(lines.lines().count(), 5);
        assert!(lines.contains("pv n=16   : service every 100000 µs, 64 KiB per request"));
        // Without a common size there is no story to tell.
        assert_eq!(headline(&records[4..]), None);
    }
}
