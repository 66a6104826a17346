//! Rendering the records: the side-by-side table with its summary lines, and JSON.

use super::floor::{FLOOR_WORKLOAD, Floor};
use super::record::{Record, checksum_text};

/// A trapped run and a PV run of the same workload (and `blk` pattern).
#[derive(Debug, Clone, Copy)]
pub struct Ratio<'a> {
    /// The trapped run.
    pub trapped: &'a Record,
    /// The PV run (`pv`, a `pagetable` batch, a labelled PV variant).
    pub pv: &'a Record,
    /// Trapped ÷ PV time per op (above 1: PV is faster); 0 when PV took no time.
    pub ratio: f64,
    /// Whether the two checksums agree.
    pub same_checksum: bool,
}

/// Every trapped run paired with each PV run (mode `pv…`) of its workload and pattern, in
/// record order.
pub fn ratios(records: &[Record]) -> Vec<Ratio<'_>> {
    let mut out = Vec::new();
    for tr in records.iter().filter(|r| r.mode == "trapped") {
        for pv in records.iter().filter(|r| {
            r.workload == tr.workload && r.mode.starts_with("pv") && r.pattern == tr.pattern
        }) {
            out.push(Ratio {
                trapped: tr,
                pv,
                ratio: if pv.ns_per_op > 0.0 {
                    tr.ns_per_op / pv.ns_per_op
                } else {
                    0.0
                },
                same_checksum: pv.checksum == tr.checksum,
            });
        }
    }
    out
}

/// The `null` PV run against the raw hypercall loop of the same `compare` run.
#[derive(Debug, Clone, Copy)]
pub struct NullOverhead<'a> {
    /// `null` in PV mode.
    pub pv: &'a Record,
    /// The `raw-hypercall` floor.
    pub floor: &'a Record,
    /// How much slower per call PV is than the floor, in percent (negative: faster).
    pub percent: f64,
}

/// `null` PV against the hypercall floor, if both ran.
pub fn null_overhead(records: &[Record]) -> Option<NullOverhead<'_>> {
    let find = |w: &str, m: &str| records.iter().find(|x| x.workload == w && x.mode == m);
    let pv = find("null", "pv")?;
    let floor = find(FLOOR_WORKLOAD, Floor::Hypercall.name())?;
    Some(NullOverhead {
        pv,
        floor,
        percent: 100.0 * (pv.ns_per_op / floor.ns_per_op - 1.0),
    })
}

/// The records as a pretty-printed JSON array, with a final newline.
pub fn render_json(records: &[Record]) -> serde_json::Result<String> {
    Ok(serde_json::to_string_pretty(records)? + "\n")
}

/// The mode column: the mode, plus the batch size or the `blk` pattern.
fn mode_label(r: &Record) -> String {
    match (r.batch, &r.pattern) {
        (Some(b), _) => format!("{} b={b}", r.mode),
        (None, Some(p)) => format!("{} {p}", r.mode),
        (None, None) => r.mode.clone(),
    }
}

/// CPU time of the vCPU thread as a percentage of the window's wall time.
fn cpu_pct(r: &Record) -> f64 {
    100.0 * r.host_cpu_ns as f64 / r.wall_ns.max(1) as f64
}

/// The side-by-side table, with the trapped ÷ PV ratio per workload and, for `null`, the
/// floor (raw exit loops) it should be compared with.
pub fn render_table(records: &[Record]) -> String {
    let mut s = format!(
        "{:<9} {:<13} {:>9} {:>9} {:>8} {:>10} {:>10} {:>9}  {:<18}\n",
        "workload", "mode", "ops", "exits", "exits/op", "wall ms", "ns/op", "host cpu%", "checksum"
    );
    for r in records {
        s += &format!(
            "{:<9} {:<13} {:>9} {:>9} {:>8.3} {:>10.2} {:>10.1} {:>9.1}  {:<18}\n",
            r.workload,
            mode_label(r),
            r.ops,
            r.exits
                .get("total")
                .map_or_else(|| "-".to_string(), u64::to_string),
            r.exits_per_op,
            r.wall_ns as f64 / 1e6,
            r.ns_per_op,
            cpu_pct(r),
            checksum_text(r)
        );
    }
    let find = |w: &str, m: &str| records.iter().find(|x| x.workload == w && x.mode == m);
    if let Some(n) = null_overhead(records) {
        // Both are one exit per call; what differs is the guest's own instructions per call
        // (the floor's loop is 4, the workload's 3; each is emulated at CPL 0 on pvkit's KVM).
        s += &format!(
            "null: pv {:.0} ns/call vs raw hypercall loop {:.0} ns/exit ({:+.1}%): the difference \
             is the guest instructions around each exit (floor loop 4, workload loop 3)\n",
            n.pv.ns_per_op, n.floor.ns_per_op, n.percent
        );
    }
    if let (Some(spin), Some(hlt), Some(pv)) = (
        find("idle", "spin"),
        find("idle", "hlt"),
        find("idle", "pv"),
    ) {
        let cpu = cpu_pct;
        let p99 = |r: &Record| r.extra.get("wake_overshoot_ns_p99").copied().unwrap_or(0);
        s += &format!(
            "idle: vCPU thread CPU spin {:.1}% / hlt {:.1}% / pv {:.2}%; exits per idle second \
             spin {:.0} / hlt {:.0} / pv {:.0}; wake overshoot p99 spin {} / hlt {} / pv {} ns\n",
            cpu(spin),
            cpu(hlt),
            cpu(pv),
            spin.exits_per_s,
            hlt.exits_per_s,
            pv.exits_per_s,
            p99(spin),
            p99(hlt),
            p99(pv)
        );
    }
    if let (Some(pv), Some(tr)) = (find("zero", "pv"), find("zero", "trapped")) {
        let g = |r: &Record, k: &str| r.extra.get(k).copied().unwrap_or(0);
        s += &format!(
            "zero: guest zeroed on the fresh allocation pv {} MiB vs trapped {} MiB ({:.3}); \
             released {} MiB, host RSS dropped {} MiB on release\n",
            g(pv, "zeroed_fresh_bytes") >> 20,
            g(tr, "zeroed_fresh_bytes") >> 20,
            g(pv, "zeroed_fresh_bytes") as f64 / g(tr, "zeroed_fresh_bytes").max(1) as f64,
            pv.events.get("released_bytes").copied().unwrap_or(0) >> 20,
            g(pv, "rss_drop_bytes") >> 20
        );
        let ms = |ns: u64| ns as f64 / 1e6;
        for r in records
            .iter()
            .filter(|r| r.workload == "zero" && !r.mode.starts_with(super::peer::PEER_MODE))
        {
            let rounds = match r.extra.get("rounds") {
                Some(n) => format!(
                    "median of {n}: {:.1}..{:.1} ms; ",
                    ms(g(r, "wall_ns_min")),
                    ms(g(r, "wall_ns_max"))
                ),
                None => String::new(),
            };
            let rss = r
                .resident_bytes
                .iter()
                .map(|b| (b >> 20).to_string())
                .collect::<Vec<_>>()
                .join("/");
            s += &format!(
                "zero {:<13}: {rounds}touch {:.1} + free {:.1} + reuse {:.1} ms; guest memset {} \
                 MiB in {:.1} ms; prepare thread {} MiB in {:.1} ms CPU; RSS MiB \
                 begin/touched/released/end {rss}\n",
                r.mode,
                ms(g(r, "phase_touch_ns")),
                ms(g(r, "phase_free_ns")),
                ms(g(r, "phase_reuse_ns")),
                g(r, "guest_zeroed_bytes") >> 20,
                ms(g(r, "zero_ns")),
                r.prepared_bytes >> 20,
                ms(r.prepare_cpu_ns)
            );
        }
    }
    for r in records.iter().filter(|r| r.mib_s.is_some()) {
        let host = records
            .iter()
            .find(|h| h.mode == "host" && h.pattern == r.pattern);
        let of_host = match (r.mib_s, host.and_then(|h| h.mib_s)) {
            (Some(m), Some(h)) if r.mode != "host" => {
                format!(" ({:.0}% of the host's own read)", 100.0 * m / h)
            }
            _ => String::new(),
        };
        s += &format!(
            "blk {} {}: {:.0} MiB/s, {:.0} IOPS, {:.2} exits/request{of_host}\n",
            r.pattern.as_deref().unwrap_or("-"),
            r.mode,
            r.mib_s.unwrap_or(0.0),
            r.iops.unwrap_or(0.0),
            r.exits_per_op
        );
    }
    s += &wait_lines(records);
    s += &lifecycle_lines(records);
    s += &super::density::summary_lines(records);
    s += &native_lines(records);
    for p in ratios(records) {
        let same = if p.same_checksum {
            "same checksum"
        } else {
            "CHECKSUM MISMATCH"
        };
        s += &format!(
            "{}: trapped/{} time per op = {:.2}x, exits {} vs {} ({same})\n",
            p.trapped.workload,
            mode_label(p.pv),
            p.ratio,
            p.trapped.exits.get("total").copied().unwrap_or(0),
            p.pv.exits.get("total").copied().unwrap_or(0)
        );
    }
    for q in records
        .iter()
        .filter(|r| r.mode.starts_with(super::peer::PEER_MODE))
    {
        let twin = q.mode.strip_prefix("qemu-").unwrap_or("trapped");
        let same = match find(&q.workload, twin) {
            Some(t) if t.checksum == q.checksum => "same checksum as pvkit",
            Some(_) => "CHECKSUM DIFFERS from pvkit",
            None => "no pvkit twin run",
        };
        let own = match q.extra.get("host_vmm_boot_to_exit_ns") {
            Some(&ns) => format!(
                "; host-vmm {:.1} ms ({:.2} of QEMU's)",
                ns as f64 / 1e6,
                ns as f64 / q.wall_ns.max(1) as f64
            ),
            None => String::new(),
        };
        s += &format!(
            "{}: {} boot-to-exit {:.1} ms (whole QEMU process; exits not reported){own}, {} {}\n",
            q.workload,
            q.mode,
            q.wall_ns as f64 / 1e6,
            same,
            twin
        );
    }
    s
}

/// A line per `native` run (the `pagetable` baseline without pvkit): the time per op of every
/// other pvkit run of its workload relative to it (above 1: slower than native).
fn native_lines(records: &[Record]) -> String {
    let mut s = String::new();
    for n in records.iter().filter(|r| r.mode == NATIVE_MODE) {
        let others: Vec<String> = records
            .iter()
            .filter(|r| {
                r.workload == n.workload
                    && r.pattern == n.pattern
                    && (r.mode.starts_with("pv") || r.mode == "trapped")
            })
            .map(|r| {
                let rel = if n.ns_per_op > 0.0 {
                    r.ns_per_op / n.ns_per_op
                } else {
                    0.0
                };
                let same = if r.checksum == n.checksum {
                    ""
                } else {
                    " CHECKSUM MISMATCH"
                };
                format!("{} {rel:.2}x{same}", mode_label(r))
            })
            .collect();
        s += &format!(
            "{}: time per op relative to native ({:.1} ns/op, {} exits): {}\n",
            n.workload,
            n.ns_per_op,
            n.exits.get("total").copied().unwrap_or(0),
            others.join(", ")
        );
    }
    s
}

/// The record `mode` of a run on tables in ordinary RAM (`pagetable tables=native`).
pub const NATIVE_MODE: &str = "native";

/// The summary lines of `snapshot`, `restore`, `migrate` and `migrate-idle`.
fn lifecycle_lines(records: &[Record]) -> String {
    let find = |w: &str, m: &str| records.iter().find(|x| x.workload == w && x.mode == m);
    let g = |r: &Record, k: &str| r.extra.get(k).copied().unwrap_or(0);
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let ms = |ns: u64| ns as f64 / 1e6;
    let pct = |a: u64, b: u64| 100.0 * a as f64 / b.max(1) as f64;
    let elided = |r: &Record| {
        format!(
            "unbacked {} / free {} / zero {}",
            g(r, "pages_elided_unbacked"),
            g(r, "pages_elided_free"),
            g(r, "pages_elided_zero")
        )
    };
    let mut s = String::new();
    if let (Some(pv), Some(tr)) = (find("snapshot", "pv"), find("snapshot", "trapped")) {
        s += &format!(
            "snapshot: written pv {:.1} MiB vs trapped {:.1} MiB ({:.1}% of trapped); pages \
             elided pv {} , trapped {}; save {:.1} / {:.1} ms; restore to the next guest \
             instruction (whole process) {:.1} / {:.1} ms vs cold boot {:.1} / {:.1} ms\n",
            mib(g(pv, "bytes_written")),
            mib(g(tr, "bytes_written")),
            pct(g(pv, "bytes_written"), g(tr, "bytes_written")),
            elided(pv),
            elided(tr),
            ms(g(pv, "save_ns")),
            ms(g(tr, "save_ns")),
            ms(g(pv, "restore_ns")),
            ms(g(tr, "restore_ns")),
            ms(g(pv, "cold_boot_ns")),
            ms(g(tr, "cold_boot_ns")),
        );
    }
    let restores: Vec<&Record> = records.iter().filter(|r| r.workload == "restore").collect();
    if let Some(first) = restores.first() {
        let parts: Vec<String> = restores
            .iter()
            .map(|r| {
                format!(
                    "{} MiB {:.1} ms ({:.2}x the smallest, {:.2} of its cold boot {:.1} ms)",
                    g(r, "mem_bytes") >> 20,
                    ms(g(r, "restore_ns")),
                    g(r, "restore_ns") as f64 / g(first, "restore_ns").max(1) as f64,
                    g(r, "restore_ns") as f64 / g(r, "cold_boot_ns").max(1) as f64,
                    ms(g(r, "cold_boot_ns")),
                )
            })
            .collect();
        s += &format!("restore (idle PV guest): {}\n", parts.join("; "));
    }
    if let (Some(pv), Some(tr)) = (find("migrate", "pv"), find("migrate", "trapped")) {
        s += &format!(
            "migrate: sent pv {:.1} MiB vs trapped {:.1} MiB ({:.1}% of trapped); pages elided \
             pv {}, trapped {}; rounds {} / {}; downtime {:.1} / {:.1} ms; total {:.1} / {:.1} \
             ms\n",
            mib(g(pv, "bytes_sent")),
            mib(g(tr, "bytes_sent")),
            pct(g(pv, "bytes_sent"), g(tr, "bytes_sent")),
            elided(pv),
            elided(tr),
            g(pv, "rounds"),
            g(tr, "rounds"),
            ms(g(pv, "downtime_ns")),
            ms(g(tr, "downtime_ns")),
            ms(g(pv, "total_ns")),
            ms(g(tr, "total_ns")),
        );
    }
    if let Some(idle) = find("migrate-idle", "pv") {
        s += &format!(
            "migrate-idle: idle {} MiB PV guest: downtime {:.1} ms, {} rounds, {:.2} MiB sent\n",
            g(idle, "mem_bytes").max(128 << 20) >> 20,
            ms(g(idle, "downtime_ns")),
            g(idle, "rounds"),
            mib(g(idle, "bytes_sent")),
        );
    }
    s
}

/// For each `blk` pattern: PV's default wait (adaptive) against polling — throughput and
/// vCPU-thread CPU as shares of polling's, with the measured wake-up cost and the poll window
/// the run ended with.
fn wait_lines(records: &[Record]) -> String {
    let mut s = String::new();
    let blk = |mode: &str, pattern: &Option<String>| {
        records
            .iter()
            .find(|r| r.workload == "blk" && r.mode == mode && &r.pattern == pattern)
    };
    for r in records
        .iter()
        .filter(|r| r.workload == "blk" && r.mode == "pv")
    {
        let Some(poll) = blk("pv-poll", &r.pattern) else {
            continue;
        };
        let (Some(m), Some(pm)) = (r.mib_s, poll.mib_s) else {
            continue;
        };
        let cpu_share = |x: &Record| x.host_cpu_ns as f64 / x.wall_ns.max(1) as f64;
        let us = |k: &str| {
            r.extra
                .get(k)
                .map_or_else(|| "-".to_string(), |ns| format!("{:.0}", *ns as f64 / 1e3))
        };
        s += &format!(
            "blk {} default PV wait: {:.0}% of polling's throughput with {:.0}% of its vCPU CPU \
             (wake-up cost {} µs, poll window {} µs at the end)\n",
            r.pattern.as_deref().unwrap_or("-"),
            100.0 * m / pm,
            100.0 * cpu_share(r) / cpu_share(poll).max(f64::MIN_POSITIVE),
            us("wake_cost_ns"),
            us("poll_window_ns"),
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::record::tests::rec;

    fn null_records() -> Vec<Record> {
        let mut floor = rec(FLOOR_WORKLOAD, "raw-hypercall", 100, 500_000, 0);
        floor.checksum = None;
        vec![
            floor,
            rec("null", "pv", 100, 525_000, 7),
            rec("null", "trapped", 100, 630_000, 7),
        ]
    }

    #[test]
    fn ratios_pair_trapped_with_each_pv_run() {
        let mut recs = null_records();
        let mut b8 = rec("pagetable", "pv", 8, 100, 1);
        b8.batch = Some(8);
        recs.extend([
            b8,
            rec("pagetable", "pv", 8, 200, 1),
            rec("pagetable", "trapped", 8, 800, 2),
        ]);
        let r = ratios(&recs);
        assert_eq!(r.len(), 3);
        assert_eq!((r[0].trapped.workload.as_str(), r[0].ratio), ("null", 1.2));
        assert!(r[0].same_checksum);
        assert_eq!((r[1].ratio, r[1].pv.batch), (8.0, Some(8)));
        assert_eq!(r[2].ratio, 4.0);
        assert!(!r[2].same_checksum);
        // A PV run that took no time gives 0, not infinity.
        let zero = [rec("x", "pv", 0, 0, 0), rec("x", "trapped", 1, 1, 0)];
        assert_eq!(ratios(&zero)[0].ratio, 0.0);
    }

    #[test]
    fn null_is_compared_with_the_hypercall_floor() {
        let recs = null_records();
        let n = null_overhead(&recs).unwrap();
        assert!((n.percent - 5.0).abs() < 1e-9, "{}", n.percent);
        assert!(null_overhead(&recs[1..]).is_none(), "no floor");
    }

    #[test]
    fn the_table_has_a_row_per_record_and_the_summary_lines() {
        let t = render_table(&null_records());
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("workload  mode"), "{t}");
        assert!(lines[0].trim_end().ends_with("checksum"), "{t}");
        assert!(
            lines[1].starts_with("floor     raw-hypercall       100"),
            "{t}"
        );
        assert!(lines[1].trim_end().ends_with(" -"), "no checksum: {t}");
        assert!(lines[2].contains("0x0000000000000007"), "{t}");
        assert!(lines[2].contains("5250.0"), "ns/op: {t}");
        assert!(
            t.contains("null: pv 5250 ns/call vs raw hypercall loop 5000 ns/exit (+5.0%)"),
            "{t}"
        );
        assert!(
            t.contains("null: trapped/pv time per op = 1.20x, exits 100 vs 100 (same checksum)"),
            "{t}"
        );
    }

    #[test]
    fn pv_and_trapped_are_given_relative_to_native() {
        let mut b8 = rec("pagetable", "pv", 8, 300, 1);
        b8.batch = Some(8);
        let recs = [
            b8,
            rec("pagetable", "trapped", 8, 800, 1),
            rec("pagetable", NATIVE_MODE, 8, 200, 1),
        ];
        let t = render_table(&recs);
        assert!(
            t.contains(
                "pagetable: time per op relative to native (25.0 ns/op, 8 exits): pv b=8 1.50x, \
                 trapped 4.00x\n"
            ),
            "{t}"
        );
        assert!(
            !t.contains("trapped/native"),
            "native is no PV run to pair with trapped: {t}"
        );
        let mut bad = recs.clone();
        bad[1].checksum = Some("0x2".into());
        assert!(render_table(&bad).contains("trapped 4.00x CHECKSUM MISMATCH"));
    }

    #[test]
    fn a_checksum_mismatch_is_shown() {
        let recs = [
            rec("console", "pv", 1, 1, 1),
            rec("console", "trapped", 1, 1, 2),
        ];
        assert!(render_table(&recs).contains("(CHECKSUM MISMATCH)"));
    }

    #[test]
    fn blk_lines_compare_with_the_host_read() {
        let mut pv = rec("blk", "pv", 10, 1_000_000_000, 1);
        pv.pattern = Some("seq-read".into());
        pv.mib_s = Some(50.0);
        pv.iops = Some(10.0);
        let mut host = rec("blk", "host", 10, 1, 0);
        host.checksum = None;
        host.pattern = Some("seq-read".into());
        host.mib_s = Some(200.0);
        let t = render_table(&[pv, host]);
        assert!(
            t.contains("blk seq-read pv: 50 MiB/s, 10 IOPS, 1.00 exits/request (25% of the host's own read)"),
            "{t}"
        );
        assert!(t.contains("blk seq-read host: 200 MiB/s"), "{t}");
        assert!(t.contains("pv seq-read"), "mode label: {t}");
    }

    #[test]
    fn json_is_an_array_of_records() {
        let recs = null_records();
        let j = render_json(&recs).unwrap();
        assert!(j.ends_with("]\n"));
        let v: serde_json::Value = serde_json::from_str(&j).unwrap();
        let a = v.as_array().unwrap();
        assert_eq!(a.len(), 3);
        assert_eq!(a[1]["workload"], "null");
        assert_eq!(a[1]["checksum"], "0x0000000000000007");
        assert_eq!(a[0]["checksum"], serde_json::Value::Null);
        assert!(a[0].get("batch").is_none(), "skipped when None");
    }
}
