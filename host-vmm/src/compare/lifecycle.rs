//! `compare --workload snapshot` and `--workload migrate`: the same guest workload saved and
//! restored, or live-migrated, as a PV guest and as an unmodified (trapped) one.
//!
//! Both run the demo kernel's `freemem` (it frees 75 % of what it allocated, then works on the
//! rest): the VM is saved or migrated at its checkpoint marker, right after the frees, and the
//! restored or migrated VM must finish with the checksum of the uninterrupted run.
//!
//! - `snapshot` (one row per mode): bytes written (memory file data plus `state.json`), pages
//!   written and elided by reason, the time to save (pause to written), the time to restore
//!   (`host-vmm restore`, whole process, spawn to the guest's next instruction) and a cold boot
//!   of the same kernel (`host-vmm run --workload hello`, whole process, spawn to exit). Plus
//!   `restore` rows: an idle PV guest saved and restored at [`RESTORE_SIZES`], to show that
//!   restore time does not grow with RAM size.
//! - `migrate` (one row per mode): bytes sent, pages sent and elided, rounds, downtime (pause
//!   to the destination's "resumed") and total time, over a Unix socket to a destination in
//!   this process. Plus a `migrate-idle` row: an idle 128 MiB PV guest (the downtime target).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hypercall_abi::boot::Mode;
use hypercall_abi::layout::PAGE_SIZE;
use hypercall_abi::ports::MARKER_CHECKPOINT;

use super::error::CompareError;
use super::record::Record;
use super::result::GuestResult;
use super::workloads::CompareOptions;
use crate::config::VmConfig;
use crate::console::ConsoleSink;
use crate::machine::Machine;
use crate::migration::endpoint::Endpoint;
use crate::migration::engine::{self, MigrateOptions, MigrationReport, Source};
use crate::snapshot::MemoryFile;
use crate::vm::{RunObserver, RunReport};

/// RAM sizes of the `restore` rows.
pub const RESTORE_SIZES: &[u64] = &[128 << 20, 1 << 30];
/// Rounds of `freemem`'s work phase (about 1 ms each) in these runs.
const FREEMEM_ROUNDS: u64 = 100;

/// Sends once when the guest writes its first checkpoint marker.
struct AtCheckpoint(Option<mpsc::Sender<()>>);

impl RunObserver for AtCheckpoint {
    fn marker(&mut self, value: u32, _machine: &Machine) {
        if value == MARKER_CHECKPOINT
            && let Some(tx) = self.0.take()
        {
            let _ = tx.send(());
        }
    }
}

fn vmm_error(run: &str) -> impl FnOnce(crate::Error) -> CompareError + '_ {
    move |source| CompareError::Vmm {
        run: run.into(),
        source,
    }
}

fn failed(run: &str, why: impl Into<String>) -> CompareError {
    CompareError::Lifecycle {
        run: run.into(),
        why: why.into(),
    }
}

fn config(
    opts: &CompareOptions,
    mode: Mode,
    workload: &str,
    args: Vec<String>,
    mem: u64,
) -> VmConfig {
    let mut cfg = VmConfig::new(mode, workload);
    cfg.kernel = opts.kernel.clone();
    cfg.kvm_device = opts.kvm_device.clone();
    cfg.mem_size = mem;
    cfg.args = args;
    cfg
}

fn freemem(opts: &CompareOptions, mode: Mode) -> VmConfig {
    config(
        opts,
        mode,
        "freemem",
        vec![format!("rounds={FREEMEM_ROUNDS}")],
        opts.mem_size,
    )
}

/// An idle PV guest: parked in `idle_yield` for `seconds`.
fn idle(opts: &CompareOptions, mem: u64, seconds: u64) -> VmConfig {
    config(
        opts,
        Mode::Pv,
        "idle",
        vec![
            "strategy=pv".into(),
            format!("intervals={}", seconds * 100),
            "interval_us=10000".into(),
        ],
        mem,
    )
}

/// The checksum of a finished run, which must have exited 0.
fn checksum_of(run: &str, report: &RunReport) -> Result<u64, CompareError> {
    if let Some(reason) = report.stopped {
        return Err(CompareError::Stopped {
            run: run.into(),
            reason,
        });
    }
    if report.exit_code != 0 {
        return Err(CompareError::GuestExit {
            run: run.into(),
            code: report.exit_code,
            detail: String::new(),
        });
    }
    GuestResult::parse(&report.console)
        .and_then(|r| r.checksum())
        .ok_or_else(|| failed(run, "no result line"))
}

/// Runs `cfg` on a thread; when the trigger fires (`None`: after `delay`), calls `act` with
/// the running VM's migration side; returns what `act` returned and the run's report.
fn run_and_act<T: Send>(
    run: &str,
    cfg: &VmConfig,
    delay: Option<Duration>,
    act: impl FnOnce(&Source) -> Result<T, CompareError> + Send,
) -> Result<(T, RunReport), CompareError> {
    let vm = crate::builder::build(cfg, ConsoleSink::new(None)).map_err(vmm_error(run))?;
    let source = Source::new(&vm, cfg.clone()).map_err(vmm_error(run))?;
    let (tx, rx) = mpsc::channel();
    let mut observer = AtCheckpoint(delay.is_none().then_some(tx));
    std::thread::scope(|s| {
        let vcpu = s.spawn(move || vm.run_observed(&mut observer));
        let fired = match delay {
            Some(d) => {
                std::thread::sleep(d);
                true
            }
            None => rx.recv_timeout(Duration::from_secs(30)).is_ok(),
        };
        let acted = if fired {
            act(&source)
        } else {
            Err(failed(run, "the guest never reached its checkpoint"))
        };
        if acted.is_err() {
            source.handle().vcpu().resume();
        }
        let report = vcpu
            .join()
            .map_err(|_| failed(run, "the vCPU thread panicked"))?
            .map_err(vmm_error(run))?;
        Ok((acted?, report))
    })
}

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Result<Scratch, CompareError> {
        let dir = std::env::temp_dir().join(format!(
            "pvkit-compare-{}-{name}-{}",
            std::process::id(),
            crate::rusage::monotonic_ns()
        ));
        std::fs::create_dir_all(&dir).map_err(|e| failed(name, format!("scratch dir: {e}")))?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Saves the VM (paused for it) into `dir`; returns the memory file and the time paused.
fn save(run: &str, source: &Source, dir: &Path) -> Result<(MemoryFile, u64), CompareError> {
    let vcpu = source.handle().vcpu();
    let paused = Instant::now();
    vcpu.pause(Duration::from_secs(10))
        .map_err(|e| failed(run, format!("cannot pause: {e}")))?;
    let written = crate::snapshot::write(dir, source.config(), source.handle());
    let ns = paused.elapsed().as_nanos() as u64;
    vcpu.resume();
    Ok((written.map_err(vmm_error(run))?, ns))
}

/// `host-vmm restore DIR --stats` as a new process: its checksum and the time from spawn to
/// the guest's first instruction.
fn restore_process(run: &str, binary: &Path, dir: &Path) -> Result<(u64, u64), CompareError> {
    let spawned = crate::rusage::monotonic_ns();
    let out = Command::new(binary)
        .arg("restore")
        .arg(dir)
        .arg("--stats")
        .output()
        .map_err(|e| failed(run, format!("cannot run {}: {e}", binary.display())))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(failed(
            run,
            format!("restore exited with {}: {}", out.status, stderr.trim()),
        ));
    }
    let entry: u64 = stderr
        .lines()
        .find_map(|l| l.strip_prefix("first guest entry at CLOCK_MONOTONIC "))
        .and_then(|l| l.trim_end_matches(" ns").parse().ok())
        .ok_or_else(|| failed(run, "restore did not report its first guest entry"))?;
    let checksum = GuestResult::parse(&out.stdout)
        .and_then(|r| r.checksum())
        .ok_or_else(|| failed(run, "the restored run printed no result line"))?;
    Ok((checksum, entry.saturating_sub(spawned)))
}

/// A cold boot of `kernel` with `mem` bytes of RAM: `host-vmm run KERNEL --workload hello`,
/// spawn to exit.
fn cold_boot(run: &str, binary: &Path, kernel: &Path, mem: u64) -> Result<u64, CompareError> {
    let started = Instant::now();
    let out = Command::new(binary)
        .arg("run")
        .arg(kernel)
        .args(["--workload", "hello", "--mem", &format!("{}K", mem >> 10)])
        .output()
        .map_err(|e| failed(run, format!("cannot run {}: {e}", binary.display())))?;
    let ns = started.elapsed().as_nanos() as u64;
    if !out.status.success() {
        return Err(failed(
            run,
            format!(
                "cold boot exited with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(ns)
}

/// A record of one lifecycle run: `ns` is its wall time (one op).
fn lifecycle_record(
    workload: &str,
    mode: &str,
    ns: u64,
    checksum: Option<u64>,
    extra: BTreeMap<String, u64>,
) -> Record {
    Record::unwindowed(workload, mode, 1, ns, checksum, extra)
}

fn binary(opts: &CompareOptions, run: &str) -> Result<PathBuf, CompareError> {
    opts.binary.clone().ok_or_else(|| {
        failed(
            run,
            "restores are timed as a new host-vmm process: CompareOptions::binary is not set",
        )
    })
}

/// One snapshot taken and restored, checked against the run it was taken from.
struct SavedAndRestored {
    memory: MemoryFile,
    state_bytes: u64,
    save_ns: u64,
    checksum: u64,
    restore_ns: u64,
    cold_boot_ns: u64,
}

/// Runs `cfg`, saves it at its checkpoint (or after `delay`) and lets it finish; restores the
/// snapshot in a new process, which must finish with the same checksum; times a cold boot of
/// the same kernel with the same RAM.
fn save_and_restore(
    opts: &CompareOptions,
    run: &str,
    cfg: &VmConfig,
    delay: Option<Duration>,
) -> Result<SavedAndRestored, CompareError> {
    let binary = binary(opts, run)?;
    let scratch = Scratch::new("snapshot")?;
    let dir = scratch.0.join("snap");
    let ((memory, save_ns), report) =
        run_and_act(run, cfg, delay, |source| save(run, source, &dir))?;
    let original = checksum_of(run, &report)?;
    let (checksum, restore_ns) = restore_process(run, &binary, &dir)?;
    if checksum != original {
        return Err(failed(
            run,
            format!("restored checksum {checksum:#x}, uninterrupted {original:#x}"),
        ));
    }
    Ok(SavedAndRestored {
        memory,
        state_bytes: std::fs::metadata(dir.join("state.json")).map_or(0, |m| m.len()),
        save_ns,
        checksum,
        restore_ns,
        cold_boot_ns: cold_boot(run, &binary, &dir.join("kernel.elf"), cfg.mem_size)?,
    })
}

/// The `snapshot` rows (PV and trapped `freemem`) and the `restore` rows.
pub fn snapshot_rows(
    opts: &CompareOptions,
    progress: &mut dyn FnMut(&str, &str),
) -> Result<Vec<Record>, CompareError> {
    let mut records = Vec::new();
    for mode in [Mode::Pv, Mode::Trapped] {
        let run = format!("snapshot/{}", mode.name());
        progress("snapshot", mode.name());
        let cfg = freemem(opts, mode);
        let s = save_and_restore(opts, &run, &cfg, None)?;
        let extra = BTreeMap::from([
            (
                "bytes_written".to_string(),
                s.memory.pages_written * PAGE_SIZE + s.state_bytes,
            ),
            ("pages_written".into(), s.memory.pages_written),
            ("pages_elided_unbacked".into(), s.memory.elided.unbacked),
            ("pages_elided_free".into(), s.memory.elided.free),
            ("pages_elided_zero".into(), s.memory.elided.zero),
            ("state_bytes".into(), s.state_bytes),
            ("save_ns".into(), s.save_ns),
            ("restore_ns".into(), s.restore_ns),
            ("cold_boot_ns".into(), s.cold_boot_ns),
            ("mem_bytes".into(), cfg.mem_size),
        ]);
        records.push(lifecycle_record(
            "snapshot",
            mode.name(),
            s.save_ns,
            Some(s.checksum),
            extra,
        ));
    }
    for &mem in RESTORE_SIZES {
        let label = format!("pv {}M", mem >> 20);
        let run = format!("restore/{label}");
        progress("restore", &label);
        let cfg = idle(opts, mem, 1);
        let s = save_and_restore(opts, &run, &cfg, Some(Duration::from_millis(200)))?;
        let extra = BTreeMap::from([
            ("pages_written".to_string(), s.memory.pages_written),
            ("save_ns".into(), s.save_ns),
            ("restore_ns".into(), s.restore_ns),
            ("cold_boot_ns".into(), s.cold_boot_ns),
            ("mem_bytes".into(), mem),
        ]);
        records.push(lifecycle_record(
            "restore",
            &label,
            s.restore_ns,
            Some(s.checksum),
            extra,
        ));
    }
    Ok(records)
}

/// Migrates `cfg` (at its checkpoint, or after `delay`) to a destination in this process
/// and runs it there; returns the migration's figures and the destination's checksum.
fn migrate_once(
    run: &str,
    cfg: &VmConfig,
    delay: Option<Duration>,
) -> Result<(MigrationReport, u64), CompareError> {
    let scratch = Scratch::new("migrate")?;
    let endpoint = Endpoint::Unix(scratch.0.join("migrate.sock"));
    let listener = endpoint.listen().map_err(|e| vmm_error(run)(e.into()))?;
    std::thread::scope(|s| {
        let destination = s.spawn(|| -> Result<RunReport, CompareError> {
            let received = engine::receive(
                &listener,
                Some(Duration::from_secs(60)),
                Duration::from_secs(10),
                ConsoleSink::new(None),
                |_| Ok(()),
            )
            .map_err(vmm_error(run))?;
            received.vm.run().map_err(vmm_error(run))
        });
        let sent = run_and_act(run, cfg, delay, |source| {
            source
                .migrate(&endpoint, &MigrateOptions::default())
                .map_err(vmm_error(run))
        });
        if sent.is_err() {
            // Let a destination still waiting for a source give up.
            let _ = endpoint.connect(Duration::from_secs(1));
        }
        let destination = destination
            .join()
            .map_err(|_| failed(run, "the destination thread panicked"))?;
        let (report, source_run) = sent?;
        if source_run.stopped != Some(crate::stop::StopReason::Migrated) {
            return Err(failed(run, "the source VM did not stop as migrated"));
        }
        let checksum = checksum_of(run, &destination?)?;
        Ok((report, checksum))
    })
}

fn migration_extra(report: &MigrationReport, mem: u64) -> BTreeMap<String, u64> {
    let elided = report.elided();
    BTreeMap::from([
        ("bytes_sent".to_string(), report.bytes_sent),
        ("mem_bytes".into(), mem),
        ("pages_sent".into(), report.pages_sent()),
        ("pages_elided_unbacked".into(), elided.unbacked),
        ("pages_elided_free".into(), elided.free),
        ("pages_elided_zero".into(), elided.zero),
        ("rounds".into(), report.rounds.len() as u64 + 1),
        ("last_round_pages".into(), report.last.pages_sent),
        ("state_bytes".into(), report.state_bytes),
        ("downtime_ns".into(), report.downtime_ns),
        ("total_ns".into(), report.total_ns),
        ("pages_unchanged".into(), report.pages_unchanged()),
    ])
}

/// Runs `cfg` once uninterrupted, then again migrated (at its checkpoint, or after `delay`);
/// the migrated run must finish with the same checksum. The migration's record.
fn migrated_record(
    workload: &str,
    mode: &str,
    cfg: &VmConfig,
    delay: Option<Duration>,
) -> Result<Record, CompareError> {
    let run = format!("{workload}/{mode}");
    let plain = crate::builder::build(cfg, ConsoleSink::new(None))
        .and_then(|vm| vm.run())
        .map_err(vmm_error(&run))?;
    let original = checksum_of(&run, &plain)?;
    let (report, migrated) = migrate_once(&run, cfg, delay)?;
    if migrated != original {
        return Err(failed(
            &run,
            format!("migrated checksum {migrated:#x}, uninterrupted {original:#x}"),
        ));
    }
    Ok(lifecycle_record(
        workload,
        mode,
        report.total_ns,
        Some(migrated),
        migration_extra(&report, cfg.mem_size),
    ))
}

/// The `migrate` rows (PV and trapped `freemem`) and the `migrate-idle` row.
pub fn migrate_rows(
    opts: &CompareOptions,
    progress: &mut dyn FnMut(&str, &str),
) -> Result<Vec<Record>, CompareError> {
    let mut records = Vec::new();
    for mode in [Mode::Pv, Mode::Trapped] {
        progress("migrate", mode.name());
        records.push(migrated_record(
            "migrate",
            mode.name(),
            &freemem(opts, mode),
            None,
        )?);
    }
    progress("migrate-idle", "pv");
    let idle = idle(opts, 128 << 20, 1);
    records.push(migrated_record(
        "migrate-idle",
        "pv",
        &idle,
        Some(Duration::from_millis(200)),
    )?);
    Ok(records)
}
