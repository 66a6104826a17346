//! Running the comparison: the floors, then each workload's runs, one VM each, in one process.

use std::collections::BTreeMap;

use super::blk;
use super::error::CompareError;
use super::floor::{FLOOR_WORKLOAD, Floor, run_floor};
use super::record::{Record, RunView, median_run, record, set_throughput};
use super::window::measure;
use super::workloads::{CompareOptions, Variant, mem_for, variants};
use crate::config::{DiskConfig, VmConfig};
use crate::console::ConsoleSink;

/// How a variant is named in progress and error messages: its label, else its mode, plus its
/// `blk` pattern or `pagetable` batch.
fn label(v: &Variant) -> String {
    let mut s = v.label.unwrap_or(v.mode.name()).to_string();
    if let Some(p) = v.pattern {
        s += &format!(" {p}");
    }
    if let Some(b) = v.batch {
        s += &format!(" b={b}");
    }
    s
}

/// Runs every requested workload in PV and trapped mode. `progress` is told each run.
pub fn run(
    opts: &CompareOptions,
    mut progress: impl FnMut(&str, &str),
) -> Result<Vec<Record>, CompareError> {
    let mut records = Vec::new();
    let image = match opts.workloads.iter().any(|w| w == "blk") {
        true => Some(blk::ScratchImage::create(opts.blk_mib * 2)?),
        false => None,
    };
    for w in &opts.workloads {
        match w.as_str() {
            "snapshot" => {
                records.extend(super::lifecycle::snapshot_rows(opts, &mut progress)?);
                continue;
            }
            "migrate" => {
                records.extend(super::lifecycle::migrate_rows(opts, &mut progress)?);
                continue;
            }
            "density" => {
                records.extend(super::density::density_rows(opts, &mut progress)?);
                continue;
            }
            _ => {}
        }
        if w == "zero" {
            warm_host_memory(mem_for(w, opts));
        }
        // `zero` and `null` run their variants in interleaved rounds and keep each one's
        // median: for `zero`, host memory effects (compaction, the order of runs) are larger
        // than the differences; for `null` (and its floors, which run in the same rounds), the
        // load of a shared host moves a whole run by more than the few percent compared.
        let rounds = match w.as_str() {
            "zero" => opts.zero_rounds.max(1),
            "null" => opts.null_rounds.max(1),
            _ => 1,
        };
        let floors: &[Floor] = match w.as_str() {
            "null" => &[Floor::Pio, Floor::Hypercall],
            _ => &[],
        };
        let mut floor_runs: Vec<Vec<Record>> = floors.iter().map(|_| Vec::new()).collect();
        let vs = variants(w, opts);
        let mut runs: Vec<Vec<Record>> = vs.iter().map(|_| Vec::new()).collect();
        for _ in 0..rounds {
            for (&floor, out) in floors.iter().zip(&mut floor_runs) {
                progress(FLOOR_WORKLOAD, floor.name());
                out.push(run_floor(opts, floor, opts.null_ops.max(1))?);
            }
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
                    seccomp: true,
                };
                let report =
                    measure(&cfg, ConsoleSink::new(None)).map_err(|source| CompareError::Vmm {
                        run: format!("{w}/{}", label(v)),
                        source,
                    })?;
                let mut rec = record(w, v.mode, RunView::of(&report))?;
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
        records.extend(floor_runs.into_iter().filter_map(median_run));
        records.extend(runs.into_iter().filter_map(median_run));

        if opts.peer_qemu {
            records.extend(super::peer::qemu_rows(w, opts, &mut progress)?);
        }
        if let (true, Some(image)) = (w == "blk", &image) {
            progress(w, "host read");
            records.push(host_ceiling(opts, image.path())?);
        }
    }
    Ok(records)
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

/// The host reading the same image through the page cache: the ceiling for `seq-read`.
fn host_ceiling(opts: &CompareOptions, path: &std::path::Path) -> crate::Result<Record> {
    let request = (opts.blk_size_kib << 10) as usize;
    let (wall_ns, bytes) = blk::host_read(path, opts.blk_mib << 20, request)?;
    let requests = bytes.div_ceil(request as u64);
    let extra = BTreeMap::from([
        ("bytes".to_string(), bytes),
        ("requests".to_string(), requests),
        ("request_bytes".to_string(), request as u64),
        ("queue_depth".to_string(), 1u64),
    ]);
    let mut rec = Record::unwindowed("blk", "host", requests, wall_ns, None, extra);
    set_throughput(&mut rec, "seq-read");
    Ok(rec)
}
