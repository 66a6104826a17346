//! What `compare` runs: the workloads, their default sizes, and for each workload the runs
//! (mode and guest arguments) it is measured with.

use std::path::PathBuf;

use hypercall_abi::boot::Mode;
use hypercall_abi::layout::MAX_MEM_SIZE;

use crate::config::{self, KernelImage};

/// Workloads `compare` knows, in the order it runs them.
pub const WORKLOADS: &[&str] = &[
    "null",
    "console",
    "pagetable",
    "idle",
    "zero",
    "blk",
    "snapshot",
    "migrate",
    "density",
];
/// Default number of null calls.
pub const DEFAULT_NULL_OPS: u64 = 100_000;
/// Default rounds of the `null` runs and their floors (the median is reported).
pub const DEFAULT_NULL_ROUNDS: u64 = 7;
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
/// Request size (KiB) of the extra large-request sequential read ([`LARGE_SEQ_READ`]), run
/// when the sequential size is smaller.
pub const LARGE_BLK_SIZE_KIB: u64 = 1024;
/// The pattern label of the large-request sequential read.
pub const LARGE_SEQ_READ: &str = "seq-read-1m";
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
    /// `null`: rounds over its runs and the floors, interleaved; each reports its median run.
    pub null_rounds: u64,
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
    /// `density`: fleet sizes.
    pub density_sizes: Vec<usize>,
    /// `density`: the service's period, in µs.
    pub density_period_us: u64,
    /// The `host-vmm` binary, for what is timed as a whole process (`snapshot`: restores and
    /// cold boots); `None` outside the binary, where those workloads fail and say why.
    pub binary: Option<PathBuf>,
    /// Also run the device-free trapped variants under QEMU (`--peer qemu`, [`super::peer`]).
    pub peer_qemu: bool,
}

impl Default for CompareOptions {
    fn default() -> Self {
        CompareOptions {
            workloads: WORKLOADS.iter().map(|s| s.to_string()).collect(),
            null_ops: DEFAULT_NULL_OPS,
            null_rounds: DEFAULT_NULL_ROUNDS,
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
            binary: None,
            density_sizes: super::density::DENSITY_SIZES.to_vec(),
            density_period_us: super::density::DEFAULT_PERIOD_US,
            peer_qemu: false,
        }
    }
}

/// One run of a workload: mode, guest arguments, and the PV batch size of a sweep point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Variant {
    /// The boot mode.
    pub mode: Mode,
    /// The guest's workload arguments.
    pub args: Vec<String>,
    /// PV batch size of a `pagetable` sweep point.
    pub batch: Option<u64>,
    /// Record `mode` when it is not the boot mode's name (idle strategies).
    pub label: Option<&'static str>,
    /// `blk` pattern.
    pub pattern: Option<&'static str>,
}

/// The runs of workload `name`, in the order they run.
pub fn variants(name: &str, opts: &CompareOptions) -> Vec<Variant> {
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
            v.push(variant(Mode::Trapped, vec![updates.clone()]));
            // The baseline without pvkit: tables in ordinary RAM, which the VMM never sees.
            v.push(Variant {
                label: Some("native"),
                ..variant(Mode::Trapped, vec![updates, "tables=native".into()])
            });
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
        "blk" => {
            let mut patterns = vec![
                ("seq-read", "seq-read", opts.blk_size_kib),
                ("rand-read", "rand-read", 4),
                ("seq-write", "seq-write", opts.blk_size_kib),
            ];
            // Large requests, as a guest's read-ahead or a streaming reader issues them:
            // where the device's time per request outgrows a park's wake-up cost, and the
            // default wait can park instead of poll.
            if opts.blk_size_kib < LARGE_BLK_SIZE_KIB {
                patterns.push((LARGE_SEQ_READ, "seq-read", LARGE_BLK_SIZE_KIB));
            }
            blk_variants(&patterns, opts)
        }
        _ => both(Vec::new()),
    }
}

/// The `blk` runs of each (label, guest pattern, request KiB): the four waits.
fn blk_variants(patterns: &[(&'static str, &str, u64)], opts: &CompareOptions) -> Vec<Variant> {
    patterns
        .iter()
        .flat_map(|&(label_pattern, pattern, kib)| {
            // PV's default wait polls for an adaptive window, then parks in idle_yield;
            // pv-park always parks, pv-poll always polls the used ring; trapped halts until
            // the completion interrupt.
            [
                (Mode::Pv, "adaptive", None),
                (Mode::Pv, "pv", Some("pv-park")),
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
                    mode,
                    args,
                    batch: None,
                    label,
                    pattern: Some(label_pattern),
                }
            })
        })
        .collect()
}

/// Guest RAM for a run: `zero` needs room for its allocation besides the kernel.
pub fn mem_for(workload: &str, opts: &CompareOptions) -> u64 {
    match workload {
        "zero" => opts
            .mem_size
            .max(((opts.zero_mib + 64) << 20).min(MAX_MEM_SIZE)),
        _ => opts.mem_size,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> CompareOptions {
        CompareOptions::default()
    }

    fn summary(name: &str, opts: &CompareOptions) -> Vec<(Mode, String, Option<&'static str>)> {
        variants(name, opts)
            .into_iter()
            .map(|v| (v.mode, v.args.join(" "), v.label.or(v.pattern)))
            .collect()
    }

    #[test]
    fn defaults_cover_every_workload() {
        let o = opts();
        assert_eq!(o.workloads, WORKLOADS);
        for w in WORKLOADS {
            assert!(!variants(w, &o).is_empty(), "{w}");
        }
    }

    #[test]
    fn null_and_console_run_once_per_mode() {
        let mut o = opts();
        o.null_ops = 7;
        o.console_bytes = 9;
        assert_eq!(
            summary("null", &o),
            [
                (Mode::Pv, "ops=7".to_string(), None),
                (Mode::Trapped, "ops=7".to_string(), None)
            ]
        );
        assert_eq!(summary("console", &o)[1].1, "bytes=9");
    }

    #[test]
    fn pagetable_sweeps_the_pv_batches_then_runs_trapped_and_native() {
        let mut o = opts();
        o.pt_updates = 64;
        o.pt_batches = vec![1, 8];
        let v = variants("pagetable", &o);
        assert_eq!(v.len(), 4);
        assert_eq!(
            (v[0].mode, v[0].batch, v[0].args.join(" ")),
            (Mode::Pv, Some(1), "updates=64 batch=1".into())
        );
        assert_eq!(v[1].batch, Some(8));
        assert_eq!(
            (v[2].mode, v[2].batch, v[2].args.join(" ")),
            (Mode::Trapped, None, "updates=64".into())
        );
        assert_eq!(
            (v[3].mode, v[3].label, v[3].args.join(" ")),
            (
                Mode::Trapped,
                Some("native"),
                "updates=64 tables=native".into()
            )
        );
    }

    #[test]
    fn idle_runs_three_strategies_with_labels() {
        let v = summary("idle", &opts());
        let labels: Vec<_> = v.iter().map(|(m, _, l)| (*m, l.unwrap())).collect();
        assert_eq!(
            labels,
            [
                (Mode::Trapped, "spin"),
                (Mode::Trapped, "hlt"),
                (Mode::Pv, "pv")
            ]
        );
        assert_eq!(v[0].1, "strategy=spin intervals=50 interval_us=10000");
    }

    #[test]
    fn zero_adds_two_labelled_pv_variants() {
        let v = summary("zero", &opts());
        assert_eq!(
            v,
            [
                (Mode::Pv, "mib=256".to_string(), None),
                (
                    Mode::Pv,
                    "mib=256 prepare=0".to_string(),
                    Some("pv-no-prepare")
                ),
                (Mode::Pv, "mib=256 release=0".to_string(), Some("pv-keep")),
                (Mode::Trapped, "mib=256".to_string(), None),
            ]
        );
    }

    #[test]
    fn blk_runs_four_waits_per_pattern() {
        let v = variants("blk", &opts());
        assert_eq!(v.len(), 16);
        let first: Vec<_> = v[..4]
            .iter()
            .map(|v| (v.mode, v.label, v.pattern))
            .collect();
        assert_eq!(
            first,
            [
                (Mode::Pv, None, Some("seq-read")),
                (Mode::Pv, Some("pv-park"), Some("seq-read")),
                (Mode::Pv, Some("pv-poll"), Some("seq-read")),
                (Mode::Trapped, None, Some("seq-read")),
            ]
        );
        assert_eq!(
            v[4].args.join(" "),
            "pattern=rand-read size_kib=4 mib=32 depth=4 wait=adaptive"
        );
        assert_eq!(
            v[11].args.join(" "),
            "pattern=seq-write size_kib=128 mib=32 depth=4 wait=irq"
        );
        // The large-request read: the guest's seq-read at 1 MiB, labelled apart.
        assert_eq!(v[12].pattern, Some(LARGE_SEQ_READ));
        assert_eq!(
            v[12].args.join(" "),
            "pattern=seq-read size_kib=1024 mib=32 depth=4 wait=adaptive"
        );
        // Asked for 1 MiB already: no extra run.
        let big = CompareOptions {
            blk_size_kib: 1024,
            ..opts()
        };
        assert_eq!(variants("blk", &big).len(), 12);
    }

    #[test]
    fn unknown_workloads_run_both_modes_without_arguments() {
        let v = summary("hello", &opts());
        assert_eq!(
            v,
            [
                (Mode::Pv, String::new(), None),
                (Mode::Trapped, String::new(), None)
            ]
        );
    }

    #[test]
    fn zero_gets_room_for_its_allocation() {
        let mut o = opts();
        assert_eq!(mem_for("null", &o), 128 << 20);
        assert_eq!(mem_for("zero", &o), (256 + 64) << 20);
        o.zero_mib = 1;
        assert_eq!(mem_for("zero", &o), 128 << 20, "never less than --mem");
        o.zero_mib = MAX_MEM_SIZE >> 20;
        assert_eq!(mem_for("zero", &o), MAX_MEM_SIZE, "capped");
    }
}
