//! `host-vmm compare`: run each workload in each mode in one process, side by side.
//!
//! Numbers come only from what ran: the guest brackets the timed part with marker writes, the
//! host timestamps them, counts exits between them and reads its vCPU thread's CPU time.

pub mod blk;
pub mod window;

use std::collections::BTreeMap;
use std::path::PathBuf;

use hypercall_abi::boot::Mode;
use serde::Serialize;

use crate::config::{self, DiskConfig, KernelImage, VmConfig};
use crate::console::ConsoleSink;
use crate::error::{Error, Result};
use crate::metrics::Window;

use hypercall_abi::HYPERCALL_PORT;
use hypercall_abi::layout::{KERNEL_MIN_GPA, MAX_MEM_SIZE};
use hypercall_abi::ports::{EXIT_PORT, MARKER_BEGIN, MARKER_END, MARKER_PORT, NULL_PORT};
pub use window::{Measured, WindowRecorder, measure};

/// Workloads `compare` knows, in the order it runs them.
pub const WORKLOADS: &[&str] = &["null", "console", "pagetable", "idle", "zero", "blk"];
/// Default number of null calls.
pub const DEFAULT_NULL_OPS: u64 = 100_000;
/// Default console bytes.
pub const DEFAULT_CONSOLE_BYTES: u64 = 16_384;
/// Default page-table updates.
pub const DEFAULT_PT_UPDATES: u64 = 65_536;
/// Default MiB the `zero` workload allocates.
pub const DEFAULT_ZERO_MIB: u64 = 256;
/// Default rounds of the `zero` variants (the median is reported).
pub const DEFAULT_ZERO_ROUNDS: u64 = 3;
/// Default MiB the `blk` workload transfers per run (the scratch image is twice that).
pub const DEFAULT_BLK_MIB: u64 = 32;
/// Default `blk` request size (KiB) for the sequential patterns.
pub const DEFAULT_BLK_SIZE_KIB: u64 = 128;
/// Default `blk` queue depth.
pub const DEFAULT_BLK_DEPTH: u64 = 4;
/// Default idle intervals.
pub const DEFAULT_IDLE_INTERVALS: u64 = 50;
/// Default idle interval length (µs).
pub const DEFAULT_IDLE_INTERVAL_US: u64 = 10_000;
/// PV batch sizes of the page-table sweep.
pub const DEFAULT_PT_BATCHES: &[u64] = &[1, 8, 64, 256, 512];

/// What to compare.
#[derive(Debug, Clone)]
pub struct CompareOptions {
    /// Workloads to run (names from [`WORKLOADS`]).
    pub workloads: Vec<String>,
    /// `null`: number of calls.
    pub null_ops: u64,
    /// `console`: number of bytes.
    pub console_bytes: u64,
    /// `pagetable`: number of PTE updates.
    pub pt_updates: u64,
    /// `pagetable`: PV batch sizes to sweep.
    pub pt_batches: Vec<u64>,
    /// `idle`: number of intervals.
    pub idle_intervals: u64,
    /// `idle`: interval length in µs.
    pub idle_interval_us: u64,
    /// `zero`: MiB to allocate.
    pub zero_mib: u64,
    /// `zero`: rounds over all variants, interleaved; each variant reports its median run.
    pub zero_rounds: u64,
    /// `blk`: MiB per run.
    pub blk_mib: u64,
    /// `blk`: sequential request size in KiB.
    pub blk_size_kib: u64,
    /// `blk`: requests in flight (1..=5 with the demo kernel's driver).
    pub blk_depth: u64,
    /// Guest RAM.
    pub mem_size: u64,
    /// KVM device.
    pub kvm_device: PathBuf,
    /// Kernel to run.
    pub kernel: KernelImage,
}

impl Default for CompareOptions {
    fn default() -> Self {
        CompareOptions {
            workloads: WORKLOADS.iter().map(|s| s.to_string()).collect(),
            null_ops: DEFAULT_NULL_OPS,
            console_bytes: DEFAULT_CONSOLE_BYTES,
            pt_updates: DEFAULT_PT_UPDATES,
            pt_batches: DEFAULT_PT_BATCHES.to_vec(),
            idle_intervals: DEFAULT_IDLE_INTERVALS,
            idle_interval_us: DEFAULT_IDLE_INTERVAL_US,
            zero_mib: DEFAULT_ZERO_MIB,
            zero_rounds: DEFAULT_ZERO_ROUNDS,
            blk_mib: DEFAULT_BLK_MIB,
            blk_size_kib: DEFAULT_BLK_SIZE_KIB,
            blk_depth: DEFAULT_BLK_DEPTH,
            mem_size: 128 << 20,
            kvm_device: config::DEFAULT_KVM_DEVICE.into(),
            kernel: KernelImage::embedded(),
        }
    }
}

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

/// One run of a workload: mode, guest arguments, and the PV batch size of a sweep point.
struct Variant {
    mode: Mode,
    args: Vec<String>,
    batch: Option<u64>,
    /// Record `mode` when it is not the boot mode's name (idle strategies).
    label: Option<&'static str>,
    /// `blk` pattern.
    pattern: Option<&'static str>,
}

fn variants(name: &str, opts: &CompareOptions) -> Vec<Variant> {
    let variant = |mode, args: Vec<String>| Variant {
        mode,
        args,
        batch: None,
        label: None,
        pattern: None,
    };
    let both = |args: Vec<String>| {
        vec![
            variant(Mode::Pv, args.clone()),
            variant(Mode::Trapped, args),
        ]
    };
    match name {
        "null" => both(vec![format!("ops={}", opts.null_ops)]),
        "console" => both(vec![format!("bytes={}", opts.console_bytes)]),
        "pagetable" => {
            let updates = format!("updates={}", opts.pt_updates);
            let mut v: Vec<Variant> = opts
                .pt_batches
                .iter()
                .map(|&b| Variant {
                    batch: Some(b),
                    ..variant(Mode::Pv, vec![updates.clone(), format!("batch={b}")])
                })
                .collect();
            v.push(variant(Mode::Trapped, vec![updates]));
            v
        }
        "idle" => [
            (Mode::Trapped, "spin"),
            (Mode::Trapped, "hlt"),
            (Mode::Pv, "pv"),
        ]
        .into_iter()
        .map(|(mode, strategy)| {
            let args = vec![
                format!("strategy={strategy}"),
                format!("intervals={}", opts.idle_intervals),
                format!("interval_us={}", opts.idle_interval_us),
            ];
            Variant {
                label: Some(strategy),
                ..variant(mode, args)
            }
        })
        .collect(),
        "zero" => {
            let mib = format!("mib={}", opts.zero_mib);
            let mut v = both(vec![mib.clone()]);
            // Release without read-ahead: the vCPU takes the host faults of reuse itself.
            // Hints only: skip zeroing what the host knows is zero, but keep freed frames.
            for (at, label, arg) in [
                (1, "pv-no-prepare", "prepare=0"),
                (2, "pv-keep", "release=0"),
            ] {
                v.insert(
                    at,
                    Variant {
                        label: Some(label),
                        ..variant(Mode::Pv, vec![mib.clone(), arg.into()])
                    },
                );
            }
            v
        }
        "blk" => [
            ("seq-read", opts.blk_size_kib),
            ("rand-read", 4),
            ("seq-write", opts.blk_size_kib),
        ]
        .into_iter()
        .flat_map(|(pattern, kib)| {
            // PV completes by waking a parked idle_yield (or, pv-poll, by polling the used
            // ring); trapped by halting until the completion interrupt.
            [
                (Mode::Pv, "pv", None),
                (Mode::Pv, "poll", Some("pv-poll")),
                (Mode::Trapped, "irq", None),
            ]
            .map(|(mode, wait, label)| {
                let args = vec![
                    format!("pattern={pattern}"),
                    format!("size_kib={kib}"),
                    format!("mib={}", opts.blk_mib),
                    format!("depth={}", opts.blk_depth),
                    format!("wait={wait}"),
                ];
                Variant {
                    pattern: Some(pattern),
                    label,
                    ..variant(mode, args)
                }
            })
        })
        .collect(),
        _ => both(Vec::new()),
    }
}

/// Guest RAM for a run: `zero` needs room for its allocation besides the kernel.
fn mem_for(workload: &str, opts: &CompareOptions) -> u64 {
    match workload {
        "zero" => opts
            .mem_size
            .max(((opts.zero_mib + 64) << 20).min(MAX_MEM_SIZE)),
        _ => opts.mem_size,
    }
}

/// Builds the record of one run.
pub fn record(workload: &str, mode: Mode, report: &Measured) -> Result<Record> {
    let fail = |why: String| Error::GuestFault {
        what: format!("{workload}/{}: {why}", mode.name()),
        rip: 0,
        exits: report.stats.total,
    };
    if report.exit_code != 0 {
        return Err(fail(format!("exited with code {}", report.exit_code)));
    }
    let window = report
        .window
        .as_ref()
        .ok_or_else(|| fail("no measured window (markers missing)".into()))?;
    let result = report
        .result
        .as_ref()
        .ok_or_else(|| fail("no PVKIT-RESULT line".into()))?;
    let ops = result
        .ops()
        .ok_or_else(|| fail("result has no ops".into()))?;
    let checksum = result
        .checksum()
        .ok_or_else(|| fail("result has no checksum".into()))?;
    let mut rec = record_from_window(workload, mode.name(), ops, window, report.exit_code);
    rec.checksum = Some(format!("{checksum:#018x}"));
    const STANDARD: &[&str] = &["workload", "mode", "ops", "checksum"];
    rec.extra = result
        .fields
        .iter()
        .filter(|(k, _)| !STANDARD.contains(&k.as_str()))
        .filter_map(|(k, v)| Some((k.clone(), v.parse().ok()?)))
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

/// A record from a measured window (checksum left empty).
fn record_from_window(
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

/// Runs every requested workload in PV and trapped mode. `progress` is told each run.
pub fn run(opts: &CompareOptions, mut progress: impl FnMut(&str, &str)) -> Result<Vec<Record>> {
    let mut records = Vec::new();
    if opts.workloads.iter().any(|w| w == "null") {
        for floor in [Floor::Pio, Floor::Hypercall] {
            progress(FLOOR_WORKLOAD, floor.name());
            records.push(run_floor(opts, floor, opts.null_ops.max(1))?);
        }
    }
    let image = match opts.workloads.iter().any(|w| w == "blk") {
        true => Some(blk::ScratchImage::create(opts.blk_mib * 2)?),
        false => None,
    };
    for w in &opts.workloads {
        if w == "zero" {
            warm_host_memory(mem_for(w, opts));
        }
        // `zero` runs its variants in interleaved rounds and keeps each one's median: host
        // memory effects (compaction, the order of runs) are larger than the differences.
        let rounds = if w == "zero" {
            opts.zero_rounds.max(1)
        } else {
            1
        };
        let vs = variants(w, opts);
        let mut runs: Vec<Vec<Record>> = vs.iter().map(|_| Vec::new()).collect();
        for _ in 0..rounds {
            for (v, out) in vs.iter().zip(&mut runs) {
                progress(w, &v.args.join(" "));
                let cfg = VmConfig {
                    kernel: opts.kernel.clone(),
                    mode: v.mode,
                    disable: 0,
                    mem_size: mem_for(w, opts),
                    workload: w.clone(),
                    args: v.args.clone(),
                    kvm_device: opts.kvm_device.clone(),
                    disk: image.as_ref().filter(|_| w == "blk").map(|i| DiskConfig {
                        path: i.path().into(),
                        readonly: false,
                    }),
                    virtio_console: false,
                    timeout: None,
                };
                let report = measure(&cfg, ConsoleSink::new(None))?;
                let mut rec = record(w, v.mode, &report)?;
                rec.batch = v.batch;
                if let Some(label) = v.label {
                    rec.mode = label.into();
                }
                if let Some(pattern) = v.pattern {
                    set_throughput(&mut rec, pattern);
                }
                out.push(rec);
            }
        }
        records.extend(runs.into_iter().filter_map(median_run));

        if let (true, Some(image)) = (w == "blk", &image) {
            progress(w, "host read");
            records.push(host_ceiling(opts, image.path())?);
        }
    }
    Ok(records)
}

/// The run with the median wall time, annotated with the round count and the fastest and
/// slowest wall time when there was more than one.
fn median_run(mut runs: Vec<Record>) -> Option<Record> {
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

/// Backs and frees `bytes` of transparent huge pages once, before the `zero` runs: the first
/// process on a fresh host to ask for that much memory can wait hundreds of ms for the kernel
/// to compact free memory into huge pages, and that would fall on whichever variant ran first.
/// Best effort: failures only leave the bias in place.
fn warm_host_memory(bytes: u64) {
    let len = bytes as usize;
    // SAFETY: a new private anonymous mapping; nothing else refers to it.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return;
    }
    // SAFETY: `[p, p + len)` is the mapping just created, used by nothing else; the advice only
    // changes how it is backed, and it is unmapped right after.
    unsafe {
        libc::madvise(p, len, libc::MADV_HUGEPAGE);
        libc::madvise(p, len, libc::MADV_POPULATE_WRITE);
        libc::munmap(p, len);
    }
}

/// MiB/s and IOPS of a `blk` record from the guest's byte and request counts.
fn set_throughput(rec: &mut Record, pattern: &str) {
    let secs = rec.wall_ns.max(1) as f64 / 1e9;
    rec.pattern = Some(pattern.into());
    rec.mib_s = rec
        .extra
        .get("bytes")
        .map(|&b| b as f64 / (1 << 20) as f64 / secs);
    rec.iops = rec.extra.get("requests").map(|&r| r as f64 / secs);
}

/// The host reading the same image through the page cache: the ceiling for `seq-read`.
fn host_ceiling(opts: &CompareOptions, path: &std::path::Path) -> Result<Record> {
    let request = (opts.blk_size_kib << 10) as usize;
    let (wall_ns, bytes) = blk::host_read(path, opts.blk_mib << 20, request)?;
    let requests = bytes.div_ceil(request as u64);
    let mut rec = Record {
        workload: "blk".into(),
        mode: "host".into(),
        batch: None,
        pattern: None,
        mib_s: None,
        iops: None,
        ops: requests,
        exits: BTreeMap::from([("total".to_string(), 0)]),
        hypercalls: BTreeMap::new(),
        devices: BTreeMap::new(),
        events: BTreeMap::new(),
        exits_per_op: 0.0,
        exits_per_s: 0.0,
        resident_bytes: Vec::new(),
        wall_ns,
        ns_per_op: wall_ns as f64 / requests.max(1) as f64,
        host_cpu_ns: 0,
        host_faults: 0,
        prepare_cpu_ns: 0,
        prepared_bytes: 0,
        checksum: None,
        exit_code: 0,
        extra: BTreeMap::from([
            ("bytes".to_string(), bytes),
            ("requests".to_string(), requests),
            ("request_bytes".to_string(), request as u64),
            ("queue_depth".to_string(), 1u64),
        ]),
    };
    set_throughput(&mut rec, "seq-read");
    Ok(rec)
}

/// Workload name of the floor reference records.
pub const FLOOR_WORKLOAD: &str = "floor";

/// The floor: the cheapest possible exit loop, as hand-written machine code (the same loop a C
/// KVM probe would run), measured in the same process as the workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Floor {
    /// `out` to the trapped null device.
    Pio,
    /// `out` to the hypercall port with `rax` = `null`.
    Hypercall,
}

impl Floor {
    /// The record's `mode`.
    pub fn name(self) -> &'static str {
        match self {
            Floor::Pio => "raw-pio",
            Floor::Hypercall => "raw-hypercall",
        }
    }

    fn port(self) -> u16 {
        match self {
            Floor::Pio => NULL_PORT,
            Floor::Hypercall => HYPERCALL_PORT,
        }
    }
}

/// Machine code of the floor guest: begin marker; `ops` times `mov edx, PORT; out dx, eax;
/// dec ecx; jnz` with `eax` = 0 (the `null` call, whose status 0 keeps `eax` at 0); end
/// marker; exit 0. `ops` must be at least 1.
pub fn floor_guest(floor: Floor, ops: u32) -> Vec<u8> {
    let mov_edx = |port: u16| {
        let p = u32::from(port).to_le_bytes();
        [0xba, p[0], p[1], p[2], p[3]]
    };
    let mut c = Vec::new();
    for (marker, body) in [(MARKER_BEGIN, true), (MARKER_END, false)] {
        c.extend(mov_edx(MARKER_PORT));
        c.push(0xb8); // mov eax, imm32
        c.extend(marker.to_le_bytes());
        c.push(0xef); // out dx, eax
        if body {
            c.push(0xb9); // mov ecx, imm32
            c.extend(ops.to_le_bytes());
            c.extend([0x31, 0xc0]); // xor eax, eax
            c.extend(mov_edx(floor.port()));
            c.extend([0xef, 0xff, 0xc9, 0x75, 0xf6]); // out dx, eax; dec ecx; jnz -10
        }
    }
    c.extend([0x31, 0xc0]); // xor eax, eax
    c.extend(mov_edx(EXIT_PORT));
    c.push(0xef);
    c
}

/// Runs the floor guest and checks that every iteration was exactly one exit of its kind.
pub fn run_floor(opts: &CompareOptions, floor: Floor, ops: u64) -> Result<Record> {
    let ops32 = u32::try_from(ops.max(1)).unwrap_or(u32::MAX);
    let image = crate::loader::minimal_elf(KERNEL_MIN_GPA, &floor_guest(floor, ops32), 0x1000);
    let cfg = VmConfig {
        kernel: KernelImage {
            name: "floor guest".into(),
            bytes: image.into(),
        },
        // The hypercall floor needs the port served; the PIO floor is an unmodified guest.
        mode: match floor {
            Floor::Pio => Mode::Trapped,
            Floor::Hypercall => Mode::Pv,
        },
        disable: 0,
        mem_size: opts.mem_size,
        workload: String::new(),
        args: Vec::new(),
        kvm_device: opts.kvm_device.clone(),
        disk: None,
        virtio_console: false,
        timeout: None,
    };
    let report = measure(&cfg, ConsoleSink::new(None))?;
    let ops = u64::from(ops32);
    let fail = |why: String| Error::GuestFault {
        what: format!("floor/{}: {why}", floor.name()),
        rip: 0,
        exits: report.stats.total,
    };
    let window = report
        .window
        .as_ref()
        .ok_or_else(|| fail("no measured window".into()))?;
    let counted = match floor {
        Floor::Pio => window.exits.by_device.get("null"),
        Floor::Hypercall => window.exits.by_hypercall.get("null"),
    };
    if report.exit_code != 0 || window.exits.total != ops || counted != Some(&ops) {
        return Err(fail(format!(
            "expected {ops} exits, saw {}",
            window.exits.summary()
        )));
    }
    Ok(record_from_window(
        FLOOR_WORKLOAD,
        floor.name(),
        ops,
        window,
        report.exit_code,
    ))
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

fn checksum_text(r: &Record) -> &str {
    r.checksum.as_deref().unwrap_or("-")
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
            r.exits.get("total").copied().unwrap_or(0),
            r.exits_per_op,
            r.wall_ns as f64 / 1e6,
            r.ns_per_op,
            cpu_pct(r),
            checksum_text(r)
        );
    }
    let find = |w: &str, m: &str| records.iter().find(|x| x.workload == w && x.mode == m);
    if let (Some(pv), Some(floor)) = (
        find("null", "pv"),
        find(FLOOR_WORKLOAD, Floor::Hypercall.name()),
    ) {
        s += &format!(
            "null: pv {:.0} ns/call vs raw hypercall loop {:.0} ns/exit ({:+.1}%): the difference is \
             the workload loop's extra guest instructions\n",
            pv.ns_per_op,
            floor.ns_per_op,
            100.0 * (pv.ns_per_op / floor.ns_per_op - 1.0)
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
        for r in records.iter().filter(|r| r.workload == "zero") {
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
    for tr in records.iter().filter(|r| r.mode == "trapped") {
        for pv in records.iter().filter(|r| {
            r.workload == tr.workload && r.mode.starts_with("pv") && r.pattern == tr.pattern
        }) {
            let same = if pv.checksum == tr.checksum {
                "same checksum"
            } else {
                "CHECKSUM MISMATCH"
            };
            let ratio = if pv.ns_per_op > 0.0 {
                tr.ns_per_op / pv.ns_per_op
            } else {
                0.0
            };
            s += &format!(
                "{}: trapped/{} time per op = {ratio:.2}x, exits {} vs {} ({same})\n",
                tr.workload,
                mode_label(pv),
                tr.exits.get("total").copied().unwrap_or(0),
                pv.exits.get("total").copied().unwrap_or(0)
            );
        }
    }
    s
}
