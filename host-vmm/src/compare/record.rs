//! One record per run: what the guest reported and what the host measured in its window, and
//! the fidelity check across modes.

use std::collections::BTreeMap;

use hypercall_abi::boot::Mode;
use serde::Serialize;

use super::error::CompareError;
use super::result::GuestResult;
use super::window::Measured;
use crate::metrics::Window;
use crate::stop::StopReason;

/// One JSON record: one (workload, mode) run.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    /// Workload name.
    pub workload: String,
    /// `pv` or `trapped` (or a floor variant).
    pub mode: String,
    /// PV batch size of a sweep record.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch: Option<u64>,
    /// I/O pattern of a `blk` record (`seq-read`, `seq-write`, `rand-read`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    /// `blk`: MiB per second over the window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mib_s: Option<f64>,
    /// `blk`: requests per second over the window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iops: Option<f64>,
    /// Operations the guest completed (calls, bytes).
    pub ops: u64,
    /// Exits in the measured window: `total` and one key per reason.
    pub exits: BTreeMap<String, u64>,
    /// Hypercalls in the window, by call.
    pub hypercalls: BTreeMap<String, u64>,
    /// Trapped-device accesses in the window, by device.
    pub devices: BTreeMap<String, u64>,
    /// Work the host did for the guest in the window (e.g. `pte_pv`, `pte_trapped`).
    pub events: BTreeMap<String, u64>,
    /// Exits per second of the window.
    pub exits_per_s: f64,
    /// Guest RAM backed by host memory at the begin marker, each checkpoint, and the end.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub resident_bytes: Vec<u64>,
    /// Exits per operation.
    pub exits_per_op: f64,
    /// Wall time of the window.
    pub wall_ns: u64,
    /// `wall_ns / ops`.
    pub ns_per_op: f64,
    /// CPU time of the vCPU thread in the window (from the OS).
    pub host_cpu_ns: u64,
    /// Page faults the vCPU thread took in the window (host faults on first touch of guest
    /// RAM; one per transparent huge page).
    pub host_faults: u64,
    /// CPU time of the preparing thread in the window (`zero_hints(PREPARE)`: host zeroing
    /// moved off the vCPU, onto another core).
    pub prepare_cpu_ns: u64,
    /// Bytes the preparing thread populated in the window.
    pub prepared_bytes: u64,
    /// The guest's checksum, `0x` + 16 hex digits (`None` for the floor reference, which
    /// computes nothing).
    pub checksum: Option<String>,
    /// The guest's exit code.
    pub exit_code: u32,
    /// Workload-specific numbers from the guest's result line (e.g. `wake_overshoot_ns_p99`).
    #[serde(flatten)]
    pub extra: BTreeMap<String, u64>,
}

/// What `compare` needs from a finished run, borrowed from the VMM's report.
#[derive(Debug, Clone, Copy)]
pub struct RunView<'a> {
    /// The guest's exit code.
    pub exit_code: u32,
    /// Why the run was stopped, if it was.
    pub stopped: Option<StopReason>,
    /// The measured window, if the guest wrote both markers.
    pub window: Option<&'a Window>,
    /// The captured console output.
    pub console: &'a [u8],
}

impl<'a> RunView<'a> {
    /// The parts of a measured run that `compare` reads.
    pub fn of(run: &'a Measured) -> RunView<'a> {
        RunView {
            exit_code: run.report.exit_code,
            stopped: run.report.stopped,
            window: run.window.as_ref(),
            console: &run.report.console,
        }
    }

    /// The run ended by the guest itself with exit code 0; else why not. `run` names it in
    /// the error (`workload/mode`).
    pub fn check_exit(&self, run: &str) -> Result<(), CompareError> {
        if let Some(reason) = self.stopped {
            return Err(CompareError::Stopped {
                run: run.into(),
                reason,
            });
        }
        if self.exit_code != 0 {
            let detail = panic_line(self.console)
                .map(|l| format!(": {l}"))
                .unwrap_or_default();
            return Err(CompareError::GuestExit {
                run: run.into(),
                code: self.exit_code,
                detail,
            });
        }
        Ok(())
    }

    /// The measured window, or the error saying it is missing.
    pub fn window(&self, run: &str) -> Result<&'a Window, CompareError> {
        self.window
            .ok_or_else(|| CompareError::NoWindow { run: run.into() })
    }
}

/// The last `PVKIT-PANIC: ...` line in console output.
fn panic_line(console: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(console);
    text.lines()
        .rev()
        .find(|l| l.starts_with(PANIC_PREFIX))
        .map(str::to_string)
}

/// What the demo kernel's panic lines start with (`guest_pv::kernel::PANIC_PREFIX`).
const PANIC_PREFIX: &str = "PVKIT-PANIC: ";

/// Builds the record of one run of the demo kernel (`workload` in `mode`): the guest exited
/// with 0, measured a window and printed a result line with `ops` and `checksum`.
pub fn record(workload: &str, mode: Mode, run: RunView<'_>) -> Result<Record, CompareError> {
    let name = format!("{workload}/{}", mode.name());
    run.check_exit(&name)?;
    let window = run.window(&name)?;
    let result = GuestResult::parse(run.console)
        .ok_or_else(|| CompareError::NoResult { run: name.clone() })?;
    let bad = |field: &'static str| CompareError::BadResult {
        run: name.clone(),
        field,
        got: result.get(field).map(str::to_string),
    };
    let ops = result.ops().ok_or_else(|| bad("ops"))?;
    let checksum = result.checksum().ok_or_else(|| bad("checksum"))?;
    let mut rec = record_from_window(workload, mode.name(), ops, window, run.exit_code);
    rec.checksum = Some(format!("{checksum:#018x}"));
    rec.extra = result
        .extra_numbers()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    // begin, touched, after release, end: the zero workload's checkpoints.
    if let [touched_ns, released_ns] = window.checkpoint_ns[..] {
        rec.extra.insert("phase_touch_ns".into(), touched_ns);
        rec.extra.insert(
            "phase_free_ns".into(),
            released_ns.saturating_sub(touched_ns),
        );
        rec.extra.insert(
            "phase_reuse_ns".into(),
            window.wall_ns.saturating_sub(released_ns),
        );
    }
    if let [before, touched, after_release, end] = rec.resident_bytes[..] {
        rec.extra.insert("rss_before_bytes".into(), before);
        rec.extra.insert("rss_touched_bytes".into(), touched);
        rec.extra
            .insert("rss_after_release_bytes".into(), after_release);
        rec.extra.insert("rss_end_bytes".into(), end);
        rec.extra.insert(
            "rss_drop_bytes".into(),
            touched.saturating_sub(after_release),
        );
    }
    Ok(rec)
}

impl Record {
    /// A record of something timed as a whole rather than in a marker window (the host's own
    /// read, a snapshot, a migration, a fleet, a QEMU run): `ops` operations in `wall_ns`, no
    /// exits counted (`total` 0), the other window figures zero.
    pub(crate) fn unwindowed(
        workload: &str,
        mode: &str,
        ops: u64,
        wall_ns: u64,
        checksum: Option<u64>,
        extra: BTreeMap<String, u64>,
    ) -> Record {
        Record {
            workload: workload.into(),
            mode: mode.into(),
            batch: None,
            pattern: None,
            mib_s: None,
            iops: None,
            ops,
            exits: BTreeMap::from([("total".to_string(), 0)]),
            hypercalls: BTreeMap::new(),
            devices: BTreeMap::new(),
            events: BTreeMap::new(),
            exits_per_op: 0.0,
            exits_per_s: 0.0,
            resident_bytes: Vec::new(),
            wall_ns,
            ns_per_op: wall_ns as f64 / ops.max(1) as f64,
            host_cpu_ns: 0,
            host_faults: 0,
            prepare_cpu_ns: 0,
            prepared_bytes: 0,
            checksum: checksum.map(|c| format!("{c:#018x}")),
            exit_code: 0,
            extra,
        }
    }
}

/// A record from a measured window (checksum left empty).
pub(crate) fn record_from_window(
    workload: &str,
    mode: &str,
    ops: u64,
    window: &Window,
    exit_code: u32,
) -> Record {
    let own = |m: &BTreeMap<&'static str, u64>| {
        m.iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect::<BTreeMap<_, _>>()
    };
    let mut exits = own(&window.exits.by_reason);
    exits.insert("total".into(), window.exits.total);
    let per_op = |x: f64| if ops == 0 { 0.0 } else { x / ops as f64 };
    Record {
        workload: workload.into(),
        mode: mode.into(),
        batch: None,
        pattern: None,
        mib_s: None,
        iops: None,
        ops,
        exits,
        hypercalls: own(&window.exits.by_hypercall),
        devices: own(&window.exits.by_device),
        events: own(&window.exits.events),
        exits_per_op: per_op(window.exits.total as f64),
        exits_per_s: if window.wall_ns == 0 {
            0.0
        } else {
            window.exits.total as f64 * 1e9 / window.wall_ns as f64
        },
        wall_ns: window.wall_ns,
        ns_per_op: per_op(window.wall_ns as f64),
        host_cpu_ns: window.host_cpu_ns,
        host_faults: window.host_faults,
        prepare_cpu_ns: window.prepare_cpu_ns,
        prepared_bytes: window.prepared_bytes,
        checksum: None,
        exit_code,
        resident_bytes: window.resident_bytes.clone(),
        extra: BTreeMap::new(),
    }
}

/// The run with the median wall time, annotated with the round count and the fastest and
/// slowest wall time when there was more than one.
pub(crate) fn median_run(mut runs: Vec<Record>) -> Option<Record> {
    runs.sort_by_key(|r| r.wall_ns);
    let n = runs.len() as u64;
    let (min, max) = (runs.first()?.wall_ns, runs.last()?.wall_ns);
    let mut rec = runs.swap_remove(runs.len() / 2);
    if n > 1 {
        rec.extra.insert("rounds".into(), n);
        rec.extra.insert("wall_ns_min".into(), min);
        rec.extra.insert("wall_ns_max".into(), max);
    }
    Some(rec)
}

/// MiB/s and IOPS of a `blk` record from the guest's byte and request counts.
pub(crate) fn set_throughput(rec: &mut Record, pattern: &str) {
    let secs = rec.wall_ns.max(1) as f64 / 1e9;
    rec.pattern = Some(pattern.into());
    rec.mib_s = rec
        .extra
        .get("bytes")
        .map(|&b| b as f64 / (1 << 20) as f64 / secs);
    rec.iops = rec.extra.get("requests").map(|&r| r as f64 / secs);
}

/// Workloads whose modes disagree on the checksum or op count (fidelity failures).
pub fn fidelity_failures(records: &[Record]) -> Vec<String> {
    let mut by_workload: BTreeMap<String, Vec<&Record>> = BTreeMap::new();
    for r in records.iter().filter(|r| r.checksum.is_some()) {
        let key = match &r.pattern {
            Some(p) => format!("{} {p}", r.workload),
            None => r.workload.clone(),
        };
        by_workload.entry(key).or_default().push(r);
    }
    by_workload
        .into_iter()
        .filter(|(_, rs)| {
            rs.windows(2)
                .any(|p| p[0].checksum != p[1].checksum || p[0].ops != p[1].ops)
        })
        .map(|(w, rs)| {
            let detail: Vec<String> = rs
                .iter()
                .map(|r| format!("{}: ops={} checksum={}", r.mode, r.ops, checksum_text(r)))
                .collect();
            format!("{w}: modes disagree ({})", detail.join(", "))
        })
        .collect()
}

/// `r.checksum`, or `-` for a record without one.
pub(crate) fn checksum_text(r: &Record) -> &str {
    r.checksum.as_deref().unwrap_or("-")
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use super::*;
    use crate::metrics::ExitStats;

    /// A window of `wall_ns` with `exits` exits, all hypercalls `null`.
    pub(crate) fn window(wall_ns: u64, exits: u64) -> Window {
        let mut stats = ExitStats::default();
        for _ in 0..exits {
            stats.record(crate::metrics::ExitReason::Hypercall);
            stats.record_hypercall("null");
        }
        Window {
            wall_ns,
            host_cpu_ns: wall_ns / 2,
            host_faults: 0,
            prepare_cpu_ns: 0,
            prepared_bytes: 0,
            exits: stats,
            console_start: 0,
            console_end: 0,
            resident_bytes: Vec::new(),
            checkpoint_ns: Vec::new(),
        }
    }

    const LINE: &[u8] =
        b"hello\nPVKIT-RESULT workload=null mode=pv ops=10 checksum=0x00000000000000ff x=3\n";

    fn view<'a>(window: Option<&'a Window>, console: &'a [u8]) -> RunView<'a> {
        RunView {
            exit_code: 0,
            stopped: None,
            window,
            console,
        }
    }

    /// A record as `record` builds it.
    pub(crate) fn rec(workload: &str, mode: &str, ops: u64, wall_ns: u64, sum: u64) -> Record {
        let mut r = record_from_window(workload, mode, ops, &window(wall_ns, ops), 0);
        r.checksum = Some(format!("{sum:#018x}"));
        r
    }

    #[test]
    fn records_a_good_run() {
        let w = window(2_000, 10);
        let r = record("null", Mode::Pv, view(Some(&w), LINE)).unwrap();
        assert_eq!((r.workload.as_str(), r.mode.as_str()), ("null", "pv"));
        assert_eq!(r.ops, 10);
        assert_eq!(r.checksum.as_deref(), Some("0x00000000000000ff"));
        assert_eq!(r.exits["total"], 10);
        assert_eq!(r.hypercalls["null"], 10);
        assert_eq!(r.exits_per_op, 1.0);
        assert_eq!(r.ns_per_op, 200.0);
        assert_eq!(r.exits_per_s, 10.0 * 1e9 / 2_000.0);
        assert_eq!(r.extra, BTreeMap::from([("x".to_string(), 3)]));
    }

    #[test]
    fn zero_ops_and_zero_wall_time_give_zero_rates() {
        let r = record_from_window("hello", "pv", 0, &window(0, 0), 0);
        assert_eq!(
            (r.exits_per_op, r.ns_per_op, r.exits_per_s),
            (0.0, 0.0, 0.0)
        );
    }

    #[test]
    fn checkpoints_become_phases() {
        let mut w = window(1_000, 1);
        w.checkpoint_ns = vec![100, 400];
        w.resident_bytes = vec![1, 9, 3, 4];
        let r = record("zero", Mode::Pv, view(Some(&w), LINE)).unwrap();
        assert_eq!(r.extra["phase_touch_ns"], 100);
        assert_eq!(r.extra["phase_free_ns"], 300);
        assert_eq!(r.extra["phase_reuse_ns"], 600);
        assert_eq!(r.extra["rss_drop_bytes"], 6);
        assert_eq!(r.extra["rss_end_bytes"], 4);
    }

    #[test]
    fn each_failure_has_its_own_message() {
        let w = window(1, 1);
        let msg = |v: RunView<'_>| record("null", Mode::Trapped, v).unwrap_err().to_string();

        let exited = RunView {
            exit_code: 101,
            ..view(
                Some(&w),
                b"PVKIT-PANIC: null port counted 3 writes at x.rs:1:2\n",
            )
        };
        assert_eq!(
            msg(exited),
            "null/trapped: the guest exited with code 101: PVKIT-PANIC: null port counted 3 \
             writes at x.rs:1:2"
        );
        let exited = RunView {
            exit_code: 2,
            ..view(None, b"")
        };
        assert_eq!(msg(exited), "null/trapped: the guest exited with code 2");
        let stopped = RunView {
            exit_code: 124,
            stopped: Some(StopReason::Timeout(Duration::from_secs(3))),
            ..view(None, b"")
        };
        assert!(
            msg(stopped).starts_with("null/trapped: stopped before the guest exited (timeout"),
            "{}",
            msg(stopped)
        );
        assert_eq!(
            msg(view(None, LINE)),
            "null/trapped: no measured window (the guest did not write the begin and end markers)"
        );
        assert_eq!(
            msg(view(Some(&w), b"hello\n")),
            "null/trapped: the guest printed no PVKIT-RESULT line"
        );
        assert_eq!(
            msg(view(Some(&w), b"PVKIT-RESULT ops=3\n")),
            "null/trapped: the PVKIT-RESULT line has no valid 'checksum' (got None)"
        );
        assert_eq!(
            msg(view(Some(&w), b"PVKIT-RESULT ops=x checksum=0x1\n")),
            "null/trapped: the PVKIT-RESULT line has no valid 'ops' (got Some(\"x\"))"
        );
        for m in [msg(view(None, LINE)), msg(view(Some(&w), b""))] {
            assert!(!m.contains("RIP"), "{m}");
        }
    }

    #[test]
    fn the_median_run_is_kept_with_its_spread() {
        let runs = vec![
            rec("zero", "pv", 1, 30, 0),
            rec("zero", "pv", 1, 10, 0),
            rec("zero", "pv", 1, 20, 0),
        ];
        let m = median_run(runs).unwrap();
        assert_eq!(m.wall_ns, 20);
        assert_eq!(m.extra["rounds"], 3);
        assert_eq!((m.extra["wall_ns_min"], m.extra["wall_ns_max"]), (10, 30));
        let one = median_run(vec![rec("null", "pv", 1, 5, 0)]).unwrap();
        assert!(one.extra.is_empty());
        assert!(median_run(Vec::new()).is_none());
    }

    #[test]
    fn throughput_from_bytes_and_requests() {
        let mut r = rec("blk", "pv", 4, 1_000_000_000, 0);
        r.extra.insert("bytes".into(), 8 << 20);
        r.extra.insert("requests".into(), 64);
        set_throughput(&mut r, "seq-read");
        assert_eq!(r.pattern.as_deref(), Some("seq-read"));
        assert_eq!(r.mib_s, Some(8.0));
        assert_eq!(r.iops, Some(64.0));
    }

    #[test]
    fn fidelity_compares_checksums_and_ops_per_workload_and_pattern() {
        let mut recs = vec![
            rec("null", "pv", 10, 1, 7),
            rec("null", "trapped", 10, 1, 7),
            rec("console", "pv", 5, 1, 1),
            rec("console", "trapped", 5, 1, 2),
        ];
        // Records without a checksum (floors, the host's read) are not compared.
        recs.push(record_from_window("floor", "raw-pio", 3, &window(1, 3), 0));
        assert_eq!(
            fidelity_failures(&recs),
            [
                "console: modes disagree (pv: ops=5 checksum=0x0000000000000001, trapped: ops=5 \
              checksum=0x0000000000000002)"
            ]
        );
        let mut a = rec("blk", "pv", 1, 1, 1);
        a.pattern = Some("seq-read".into());
        let mut b = rec("blk", "trapped", 1, 1, 2);
        b.pattern = Some("rand-read".into());
        assert!(
            fidelity_failures(&[a.clone(), b]).is_empty(),
            "different patterns"
        );
        let mut c = a.clone();
        c.ops = 2;
        assert_eq!(fidelity_failures(&[a, c]).len(), 1, "ops differ");
    }
}
