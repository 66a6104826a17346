//! The `host-vmm` command line. Errors end here as one readable line and a non-zero status.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use host_vmm::builder;
use host_vmm::compare::WindowRecorder;
use host_vmm::compare::{self, CompareOptions};
use host_vmm::config::{self, DiskConfig, KernelImage, VmConfig};
use host_vmm::console::ConsoleSink;
use host_vmm::kernel_abi::{HiddenBecause, KernelAbi, Offer};
use host_vmm::memory::parse_mem_size;
use host_vmm::metrics::Window;
use host_vmm::migration::engine::{MigrateOptions, OnFailure, Source};
use host_vmm::sandbox::{self, ThreadKind};
use host_vmm::stop::{self, StopReason, Stopper};
use host_vmm::vm::RunReport;
use hypercall_abi::boot::Mode;
use hypercall_abi::features::{self, Names};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::{Handle, Signals};

/// Exit status when the VMM itself fails (the guest's own codes pass through unchanged).
const VMM_FAILURE: u8 = 125;

#[derive(Parser, Debug)]
#[command(
    name = "host-vmm",
    version,
    about = "pvkit: a KVM VMM that compares paravirtual hypercalls with trapped emulation"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a kernel (default: the embedded demo kernel) and run one workload.
    ///
    /// Exit status: the guest's exit code (capped at 255); 124 if --timeout stopped it; 130 or
    /// 143 if SIGINT or SIGTERM stopped it; 125 if the VMM fails; 2 for usage errors. A
    /// stopped run prints `--stats` as usual and one `host-vmm: guest stopped: REASON` line.
    Run {
        /// ELF64 x86-64 kernel to boot (static executable linked at a physical address
        /// >= 2 MiB, virtual == physical).
        kernel: Option<PathBuf>,
        /// pv: show the guest pvkit (CPUID leaves, hypercalls); trapped: hide pvkit, so the
        /// guest runs as an unmodified guest and a hypercall is a guest error.
        #[arg(long, value_enum, default_value_t = ModeArg::Pv)]
        mode: ModeArg,
        /// Clear these pvkit feature bits in PV mode, comma-separated (console, exit, clock,
        /// null, tsc_khz, idle_yield, zero_hints, mmu_update, zero_prepare, free_report): the guest uses
        /// their trapped twins.
        #[arg(long, value_name = "FEATURE[,...]", value_delimiter = ',', value_parser = feature_bit)]
        disable: Vec<u64>,
        /// Guest RAM, e.g. 128M, 1G (16 MiB .. 3068 MiB, below the page-table pool).
        #[arg(long, default_value = "128M", value_parser = mem_size)]
        mem: u64,
        /// Workload for the demo kernel: hello, null, console, pagetable, idle, zero, freemem, blk, vconsole, cpl3, fuzz, panic.
        #[arg(long, default_value = "hello")]
        workload: String,
        /// Print exit statistics to stderr when the guest exits (or is stopped).
        #[arg(long)]
        stats: bool,
        /// Stop the guest if it is still running this long after it started, e.g. 500ms, 5s,
        /// 2m (a plain number is seconds); exit status 124.
        #[arg(long, value_name = "DURATION", value_parser = timeout_arg)]
        timeout: Option<Duration>,
        /// Attach this image file as a virtio-blk disk.
        #[arg(long, value_name = "PATH")]
        disk: Option<PathBuf>,
        /// Attach the disk read-only (guest writes fail with an I/O error).
        #[arg(long, requires = "disk")]
        readonly: bool,
        /// Attach a virtio-console device (output only; its bytes appear with the console's).
        #[arg(long)]
        virtio_console: bool,
        /// KVM device node.
        #[arg(long, default_value = config::DEFAULT_KVM_DEVICE)]
        kvm_device: PathBuf,
        /// Run the host threads without seccomp filters (for debugging; see the README).
        #[arg(long)]
        no_seccomp: bool,
        /// Pause the guest this long after it started, save a snapshot to --snapshot-dir, and
        /// let it run on (`host-vmm restore DIR` continues the saved VM).
        #[arg(long, value_name = "DURATION", value_parser = timeout_arg, requires = "snapshot_dir")]
        snapshot_after: Option<Duration>,
        /// Where --snapshot-after writes the snapshot (state.json, memory.bin, kernel.elf).
        #[arg(long, value_name = "DIR", requires = "snapshot_after")]
        snapshot_dir: Option<PathBuf>,
        /// Serve control requests (pause, resume, stats, snapshot, migrate) on a Unix socket
        /// at PATH while the guest runs; see `host-vmm ctl` and `host-vmm migrate`.
        #[arg(long, value_name = "PATH")]
        api_sock: Option<PathBuf>,
        /// Live-migrate the guest this long after it started to --migrate-to (a `host-vmm
        /// receive`); this run then ends with status 0 and the guest goes on there.
        #[arg(long, value_name = "DURATION", value_parser = timeout_arg, requires = "migrate_to")]
        migrate_after: Option<Duration>,
        /// Where --migrate-after sends the guest: unix:PATH, a path, or a loopback HOST:PORT.
        #[arg(long, value_name = "ADDR", requires = "migrate_after")]
        migrate_to: Option<String>,
        /// Wait for gdb on ADDR (a loopback HOST:PORT, tcp:HOST:PORT, unix:PATH or a path)
        /// before the first guest instruction: `target remote ADDR` (see docs/GUIDE.md).
        #[arg(long, value_name = "ADDR")]
        gdb: Option<String>,
        #[command(flatten)]
        migrate: MigrateArgs,
        /// Workload arguments passed to the guest, e.g. `-- ops=1000`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Boot N independent VMs of the same kernel at once, each on its own vCPU thread, and
    /// report each VM's result and what they cost the host together (CPU, resident memory).
    /// Exit status 0 if every VM's guest exited with 0, 1 if any failed (the others still run
    /// to their end).
    Fleet {
        /// ELF64 kernel (default: the embedded demo kernel).
        kernel: Option<PathBuf>,
        /// How many VMs (1..=256).
        #[arg(long, default_value_t = 4)]
        vms: usize,
        /// pv or trapped.
        #[arg(long, value_enum, default_value_t = ModeArg::Pv)]
        mode: ModeArg,
        /// Guest RAM of each VM.
        #[arg(long, default_value = "128M", value_parser = mem_size)]
        mem: u64,
        /// Workload for the demo kernel.
        #[arg(long, default_value = "idle")]
        workload: String,
        /// Stop every VM still running this long after it started.
        #[arg(long, value_name = "DURATION", value_parser = timeout_arg)]
        timeout: Option<Duration>,
        /// Workload arguments passed to every guest.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Ask a running VM (`run --api-sock PATH`) to live-migrate to a `host-vmm receive` at
    /// ADDR, and print the migration's figures as JSON. Exit status 0 if it migrated; 1 if
    /// it failed (the VM runs on, or stays paused with --on-failure pause).
    Migrate {
        /// The VM's API socket.
        #[arg(long, value_name = "PATH")]
        api_sock: PathBuf,
        /// The destination: unix:PATH, a path, or a loopback HOST:PORT.
        #[arg(long, value_name = "ADDR")]
        to: String,
        #[command(flatten)]
        migrate: MigrateArgs,
    },
    /// Wait for one live migration (`host-vmm migrate`, `run --migrate-after`) on ADDR, then
    /// run the received guest to its end. Exit status as for `run`; 125 if the migration
    /// fails (the guest never ran here).
    Receive {
        /// Where to listen: unix:PATH, a path, or a loopback HOST:PORT.
        #[arg(long, value_name = "ADDR")]
        listen: String,
        /// Give up if no source connects within this long (default: wait forever).
        #[arg(long, value_name = "DURATION", value_parser = timeout_arg)]
        accept_timeout: Option<Duration>,
        /// A source silent this long mid-stream fails the migration.
        #[arg(long, value_name = "DURATION", value_parser = timeout_arg, default_value = "10s")]
        io_timeout: Duration,
        /// Print exit statistics to stderr when the guest exits (or is stopped).
        #[arg(long)]
        stats: bool,
        /// Stop the guest if it is still running this long after it resumed; exit status 124.
        #[arg(long, value_name = "DURATION", value_parser = timeout_arg)]
        timeout: Option<Duration>,
        /// Run the host threads without seccomp filters.
        #[arg(long)]
        no_seccomp: bool,
        /// Serve control requests (pause, resume, stats, snapshot, migrate) on a Unix socket
        /// at PATH while the received guest runs (it can be migrated on from here).
        #[arg(long, value_name = "PATH")]
        api_sock: Option<PathBuf>,
        /// This host's copy of the migrated VM's disk image (required if the VM has one: the
        /// stream never names a file for the destination to open).
        #[arg(long, value_name = "PATH")]
        disk: Option<PathBuf>,
        /// Attach that disk read-only.
        #[arg(long, requires = "disk")]
        readonly: bool,
    },
    /// Continue a VM saved with `run --snapshot-after`: the guest resumes where it was saved.
    ///
    /// Exit status as for `run`. A corrupt, truncated or other-version snapshot is refused
    /// before any guest code runs (status 125).
    Restore {
        /// The snapshot directory.
        dir: PathBuf,
        /// Print exit statistics to stderr when the guest exits (or is stopped).
        #[arg(long)]
        stats: bool,
        /// Stop the guest if it is still running this long after the restore; exit status 124.
        #[arg(long, value_name = "DURATION", value_parser = timeout_arg)]
        timeout: Option<Duration>,
        /// Run the host threads without seccomp filters.
        #[arg(long)]
        no_seccomp: bool,
        /// Serve control requests (pause, resume, stats, snapshot, migrate) on a Unix socket
        /// at PATH while the restored guest runs.
        #[arg(long, value_name = "PATH")]
        api_sock: Option<PathBuf>,
    },
    /// Send one request to a running VM's API socket (`run --api-sock PATH`) and print the
    /// JSON answer. Exit status 0 if the VM did it, 1 if it refused.
    Ctl {
        /// The socket.
        sock: PathBuf,
        /// pause, resume, stats, or snapshot (with DIR).
        op: String,
        /// The snapshot directory (for `snapshot`).
        dir: Option<PathBuf>,
    },
    /// Run workloads in PV and trapped mode in one process and print them side by side.
    Compare(CompareArgs),
    /// Show a kernel's entry point, segments and pvkit ABI note, and whether it will boot —
    /// without running it. Exit status 0 if it will boot, 1 if not.
    Inspect {
        /// ELF64 kernel to inspect (default: the embedded demo kernel).
        kernel: Option<PathBuf>,
        /// The mode it would run in.
        #[arg(long, value_enum, default_value_t = ModeArg::Pv)]
        mode: ModeArg,
        /// Guest RAM it would get.
        #[arg(long, default_value = "128M", value_parser = mem_size)]
        mem: u64,
        /// Feature bits that would be cleared (as for `run`).
        #[arg(long, value_name = "FEATURE[,...]", value_delimiter = ',', value_parser = feature_bit)]
        disable: Vec<u64>,
    },
    /// Test aid: installs a thread kind's seccomp filter on a new thread, then makes one
    /// system call (`none`: an allowed `write`). A refused call ends the process with the
    /// seccomp report and status 159.
    #[command(hide = true)]
    SandboxSelftest {
        /// vcpu, virtio, event, prepare, timeout, signals.
        #[arg(long, default_value = "vcpu")]
        kind: String,
        /// none, socket, execve, openat-write, ioctl.
        #[arg(long, default_value = "none")]
        call: String,
    },
}

#[derive(clap::Args, Debug)]
struct CompareArgs {
    /// Workload to compare, or `all`.
    #[arg(long, default_value = "all", value_parser = workload_name)]
    workload: String,
    /// Also write the records as a JSON array to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Also write a report to DIR: the JSON, a Markdown summary, SVG charts and an
    /// index.html that shows them.
    #[arg(long, value_name = "DIR")]
    report: Option<PathBuf>,
    /// Number of calls of the `null` workload.
    #[arg(long, default_value_t = compare::DEFAULT_NULL_OPS)]
    null_ops: u64,
    /// Rounds of the `null` runs and the raw exit loops, interleaved; each reports its median
    /// run (a shared host's load otherwise moves one run by more than PV and trapped differ).
    #[arg(long, default_value_t = compare::DEFAULT_NULL_ROUNDS, value_parser = clap::value_parser!(u64).range(1..=100))]
    null_rounds: u64,
    /// Bytes written by the `console` workload.
    #[arg(long, default_value_t = compare::DEFAULT_CONSOLE_BYTES)]
    console_bytes: u64,
    /// Page-table updates of the `pagetable` workload (a multiple of 4).
    #[arg(long, default_value_t = compare::DEFAULT_PT_UPDATES)]
    pt_updates: u64,
    /// PV batch sizes of the `pagetable` sweep, comma-separated (each 1..=1024).
    #[arg(
        long,
        value_delimiter = ',',
        default_values_t = compare::DEFAULT_PT_BATCHES.to_vec(),
        value_parser = clap::value_parser!(u64).range(1..=1024)
    )]
    pt_batches: Vec<u64>,
    /// Intervals of the `idle` workload.
    #[arg(long, default_value_t = compare::DEFAULT_IDLE_INTERVALS)]
    idle_intervals: u64,
    /// Interval length of the `idle` workload, in microseconds.
    #[arg(long, default_value_t = compare::DEFAULT_IDLE_INTERVAL_US)]
    idle_interval_us: u64,
    /// MiB the `zero` workload allocates (guest RAM is raised to fit).
    #[arg(long, default_value_t = compare::DEFAULT_ZERO_MIB)]
    zero_mib: u64,
    /// Rounds of the `zero` variants, interleaved; each reports its median run (host memory
    /// effects such as huge-page compaction otherwise fall on whichever runs first).
    #[arg(long, default_value_t = compare::DEFAULT_ZERO_ROUNDS, value_parser = clap::value_parser!(u64).range(1..=100))]
    zero_rounds: u64,
    /// MiB each `blk` run transfers (on a scratch image twice that size).
    #[arg(long, default_value_t = compare::DEFAULT_BLK_MIB)]
    blk_mib: u64,
    /// Request size of the sequential `blk` runs, in KiB (4..=1024).
    #[arg(long, default_value_t = compare::DEFAULT_BLK_SIZE_KIB,
          value_parser = clap::value_parser!(u64).range(4..=1024))]
    blk_size_kib: u64,
    /// Requests in flight in the `blk` runs (1..=5).
    #[arg(long, default_value_t = compare::DEFAULT_BLK_DEPTH,
          value_parser = clap::value_parser!(u64).range(1..=5))]
    blk_depth: u64,
    /// Fleet sizes of the `density` workload, comma-separated (each 1..=256).
    #[arg(
        long,
        value_delimiter = ',',
        default_values_t = compare::density::DENSITY_SIZES.iter().map(|&n| n as u16),
        value_parser = clap::value_parser!(u16).range(1..=256)
    )]
    density_sizes: Vec<u16>,
    /// Period of the `density` fleets' service, in milliseconds (1..=1000): one request per VM
    /// every this long.
    #[arg(long, default_value_t = compare::density::DEFAULT_PERIOD_US / 1000,
          value_parser = clap::value_parser!(u64).range(1..=1000))]
    density_period_ms: u64,
    /// Guest RAM per VM.
    #[arg(long, default_value = "128M", value_parser = mem_size)]
    mem: u64,
    /// Kernel to run instead of the embedded demo kernel.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// KVM device node.
    #[arg(long, default_value = config::DEFAULT_KVM_DEVICE)]
    kvm_device: PathBuf,
    /// Run the host threads without seccomp filters (for debugging; see the README).
    #[arg(long)]
    no_seccomp: bool,
    /// Also run the trapped workloads that need no pvkit device under this peer VMM (`qemu`:
    /// qemu-system-x86_64 -M microvm, the kernel's PVH entry).
    #[arg(long, value_parser = ["qemu"])]
    peer: Option<String>,
}

impl CompareArgs {
    fn options(self) -> anyhow::Result<CompareOptions> {
        Ok(CompareOptions {
            workloads: if self.workload == "all" {
                compare::WORKLOADS.iter().map(|s| s.to_string()).collect()
            } else {
                vec![self.workload]
            },
            null_ops: self.null_ops,
            null_rounds: self.null_rounds,
            console_bytes: self.console_bytes,
            pt_updates: self.pt_updates,
            pt_batches: self.pt_batches,
            idle_intervals: self.idle_intervals,
            idle_interval_us: self.idle_interval_us,
            zero_mib: self.zero_mib,
            zero_rounds: self.zero_rounds,
            blk_mib: self.blk_mib,
            blk_size_kib: self.blk_size_kib,
            blk_depth: self.blk_depth,
            mem_size: self.mem,
            kvm_device: self.kvm_device,
            kernel: kernel_image(self.kernel)?,
            binary: std::env::current_exe().ok(),
            density_sizes: self.density_sizes.into_iter().map(usize::from).collect(),
            density_period_us: self.density_period_ms * 1000,
            peer_qemu: self.peer.as_deref() == Some("qemu"),
        })
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ModeArg {
    Pv,
    Trapped,
}

impl From<ModeArg> for Mode {
    fn from(m: ModeArg) -> Mode {
        match m {
            ModeArg::Pv => Mode::Pv,
            ModeArg::Trapped => Mode::Trapped,
        }
    }
}

fn mem_size(s: &str) -> Result<u64, String> {
    parse_mem_size(s).map_err(|e| e.to_string())
}

fn feature_bit(s: &str) -> Result<u64, String> {
    features::from_name(s).ok_or_else(|| {
        let known: Vec<&str> = features::NAMES.iter().map(|(_, n)| *n).collect();
        format!("unknown feature (known: {})", known.join(", "))
    })
}

/// Prints what `host-vmm inspect` shows; returns whether the kernel will boot.
fn inspect(image: &KernelImage, mode: Mode, mem: u64, disable: u64) -> bool {
    let bytes = &image.bytes;
    println!("kernel: {} ({} bytes)", image.name, bytes.len());
    let headers = host_vmm::loader::program_headers(bytes);
    if bytes.len() >= 32 && bytes.starts_with(b"\x7fELF") {
        let entry = u64::from_le_bytes(bytes[24..32].try_into().expect("8 bytes"));
        println!("entry: {entry:#x}");
    }
    println!("program headers:");
    for ph in &headers {
        println!(
            "  {:<12} {}  vaddr {:#012x}  paddr {:#012x}  filesz {:#9x}  memsz {:#9x}",
            ph.kind_name(),
            ph.flags_str(),
            ph.vaddr,
            ph.paddr,
            ph.filesz,
            ph.memsz
        );
    }
    if headers.is_empty() {
        println!("  (none readable)");
    }
    let abi = KernelAbi::read(bytes);
    match abi {
        KernelAbi::Note(d) => {
            let (major, minor) = d.version();
            println!(
                "pvkit note: built against ABI {major}.{minor}, requires {}",
                Names(d.required())
            );
        }
        KernelAbi::Unmarked => {
            println!("pvkit note: none (the kernel does not say which ABI it speaks)")
        }
        KernelAbi::Malformed => println!("pvkit note: malformed"),
    }
    let verdict = host_vmm::loader::validate(bytes, mem)
        .map_err(|e| e.to_string())
        .and_then(|_| {
            abi.offer(mode, host_vmm::hypercall::host_features(1), disable)
                .map_err(|e| e.to_string())
        });
    let (hypervisor_mib, mode_name) = (mem >> 20, mode.name());
    match verdict {
        Ok(Offer::Pv(bits)) => {
            println!(
                "will boot: yes (--mode {mode_name}, {hypervisor_mib} MiB): pvkit shown with \
                 features {} (tsc_khz if KVM reports the TSC rate)",
                Names(bits)
            );
            true
        }
        Ok(Offer::Hidden(why)) => {
            println!(
                "will boot: yes (--mode {mode_name}, {hypervisor_mib} MiB): as an unmodified \
                 guest, pvkit hidden ({})",
                hidden_why(why)
            );
            true
        }
        Err(e) => {
            println!("will boot: no: {e}");
            false
        }
    }
}

fn hidden_why(why: HiddenBecause) -> &'static str {
    match why {
        HiddenBecause::TrappedMode => "--mode trapped",
        HiddenBecause::NoNote => "the kernel has no pvkit ABI note",
    }
}

fn timeout_arg(s: &str) -> Result<Duration, String> {
    stop::parse_duration(s)
}

fn workload_name(s: &str) -> Result<String, String> {
    if s == "all" || compare::WORKLOADS.contains(&s) {
        Ok(s.to_string())
    } else {
        Err(format!(
            "unknown workload (known: all, {})",
            compare::WORKLOADS.join(", ")
        ))
    }
}

fn kernel_image(path: Option<PathBuf>) -> anyhow::Result<KernelImage> {
    Ok(match path {
        Some(p) => KernelImage::from_file(&p)?,
        None => KernelImage::embedded(),
    })
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run {
            kernel,
            mode,
            disable,
            mem,
            workload,
            stats,
            timeout,
            disk,
            readonly,
            virtio_console,
            kvm_device,
            no_seccomp,
            snapshot_after,
            snapshot_dir,
            api_sock,
            migrate_after,
            migrate_to,
            gdb,
            migrate,
            args,
        } => {
            let migrate_opts = migrate.options();
            let cfg = VmConfig {
                kernel: kernel_image(kernel)?,
                mode: mode.into(),
                disable: disable.iter().fold(0, |a, b| a | b),
                mem_size: mem,
                workload,
                args,
                kvm_device,
                disk: disk.map(|path| DiskConfig { path, readonly }),
                virtio_console,
                timeout,
                seccomp: !no_seccomp,
            };
            let mut vm = builder::build(&cfg, ConsoleSink::new(Some(Box::new(std::io::stdout()))))?;
            let gdb = gdb
                .map(|addr| host_vmm::gdb::GdbServer::start(&addr, &mut vm))
                .transpose()?;
            if let Some(server) = &gdb {
                eprintln!(
                    "host-vmm: waiting for gdb on {} (target remote {})",
                    server.endpoint(),
                    match server.endpoint() {
                        host_vmm::migration::endpoint::Endpoint::Tcp(a) => a.to_string(),
                        host_vmm::migration::endpoint::Endpoint::Unix(p) => p.display().to_string(),
                    }
                );
            }
            if vm.offer() == Offer::Hidden(HiddenBecause::NoNote) && cfg.mode == Mode::Pv {
                eprintln!(
                    "host-vmm: note: {} has no pvkit ABI note; booting it as an unmodified \
                     guest (pvkit hidden)",
                    cfg.kernel.name
                );
            }
            let source = if api_sock.is_some() || migrate_to.is_some() {
                Some(std::sync::Arc::new(Source::new(&vm, cfg.clone())?))
            } else {
                None
            };
            let api = api_sock
                .zip(source.clone())
                .map(|(path, source)| host_vmm::api::ApiServer::start(&path, source))
                .transpose()?;
            let migration = migrate_after
                .zip(migrate_to)
                .zip(source.clone())
                .map(|((after, to), source)| (after, to, source));
            let snapshot = snapshot_after
                .zip(snapshot_dir)
                .map(|(after, dir)| (after, dir, vm.handle(), cfg.clone()));
            // The marker window (`--stats`) is measured by the harness's observer.
            let mut recorder = WindowRecorder::default();
            let report = std::thread::scope(|s| {
                let saver = snapshot.map(|(after, dir, handle, cfg)| {
                    s.spawn(move || save_after(after, &dir, &handle, &cfg))
                });
                let migrator = migration.map(|(after, to, source)| {
                    let opts = migrate_opts.clone();
                    s.spawn(move || migrate_after_delay(after, &to, &source, &opts))
                });
                let report = {
                    let _signals = StopOnSignals::install(vm.stopper(), cfg.seccomp)?;
                    vm.run_observed(&mut recorder)?
                };
                if let Some(saver) = saver {
                    saver
                        .join()
                        .map_err(|_| anyhow::anyhow!("the snapshot thread panicked"))??;
                }
                if let Some(migrator) = migrator {
                    migrator
                        .join()
                        .map_err(|_| anyhow::anyhow!("the migration thread panicked"))??;
                }
                anyhow::Ok(report)
            });
            // gdb hears how the run ended (exit code or fault) before the session closes.
            if let Some(gdb) = gdb {
                gdb.finish(std::time::Duration::from_secs(2));
            }
            let report = report?;
            if let Some(api) = api {
                api.shutdown();
            }
            finish(&report, stats, recorder.window().as_ref())
        }
        Command::Fleet {
            kernel,
            vms,
            mode,
            mem,
            workload,
            timeout,
            args,
        } => {
            let mut cfg = VmConfig::new(mode.into(), &workload);
            cfg.kernel = kernel_image(kernel)?;
            cfg.mem_size = mem;
            cfg.args = args;
            cfg.timeout = timeout;
            let report = host_vmm::fleet::run(&cfg, vms).map_err(anyhow::Error::msg)?;
            for m in &report.members {
                match (m.failure(), m.result()) {
                    (None, Some(r)) => println!("vm {:>3}: {}", m.index, r.line()),
                    (None, None) => println!("vm {:>3}: exited 0, no result line", m.index),
                    (Some(why), _) => println!("vm {:>3}: FAILED: {why}", m.index),
                }
            }
            println!(
                "fleet: {} of {} VMs ok; {:.1} ms wall, host CPU {:.1} ms ({:.2} cores), host RSS \
                 median {} MiB, max {} MiB",
                report.ok_count(),
                report.members.len(),
                report.wall_ns as f64 / 1e6,
                report.cpu_ns as f64 / 1e6,
                report.cores(),
                report.rss_median_bytes >> 20,
                report.rss_max_bytes >> 20
            );
            if let (Some((wall, cpu)), Some(cores)) = (report.steady, report.steady_cores()) {
                println!(
                    "fleet: steady state (every VM inside its measured window): {:.1} ms wall, \
                     host CPU {:.1} ms ({cores:.3} cores)",
                    wall as f64 / 1e6,
                    cpu as f64 / 1e6,
                );
            }
            Ok(if report.ok_count() == report.members.len() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Migrate {
            api_sock,
            to,
            migrate,
        } => {
            host_vmm::migration::endpoint::Endpoint::parse(&to)?;
            let o = migrate.options();
            let req = serde_json::json!({
                "op": "migrate",
                "to": to,
                "max_rounds": o.max_rounds,
                "downtime_ms": o.downtime_target.as_millis() as u64,
                "io_timeout_ms": o.io_timeout.as_millis() as u64,
                "on_failure": o.on_failure,
            });
            let answer = host_vmm::api::request(&api_sock, &req)?;
            println!("{answer}");
            Ok(if answer["ok"] == serde_json::json!(true) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Receive {
            listen,
            accept_timeout,
            io_timeout,
            stats,
            timeout,
            no_seccomp,
            api_sock,
            disk,
            readonly,
        } => {
            let endpoint = host_vmm::migration::endpoint::Endpoint::parse(&listen)?;
            let listener = endpoint.listen()?;
            eprintln!(
                "host-vmm: waiting for a migration on {}",
                listener.endpoint()
            );
            let received = host_vmm::migration::engine::receive(
                &listener,
                accept_timeout,
                io_timeout,
                ConsoleSink::new(Some(Box::new(std::io::stdout()))),
                |cfg| {
                    cfg.timeout = timeout;
                    cfg.seccomp = !no_seccomp;
                    cfg.disk = match (cfg.disk.take(), disk) {
                        (None, None) => None,
                        (Some(theirs), Some(path)) => Some(DiskConfig {
                            path,
                            readonly: theirs.readonly || readonly,
                        }),
                        (Some(theirs), None) => {
                            return Err(format!(
                                "the VM has a disk ({} on the source): give this host's copy \
                                 with --disk PATH",
                                theirs.path.display()
                            ));
                        }
                        (None, Some(path)) => {
                            return Err(format!(
                                "the VM has no disk, yet --disk {} was given",
                                path.display()
                            ));
                        }
                    };
                    Ok(())
                },
            )?;
            drop(listener);
            eprintln!(
                "host-vmm: received the VM: {} bytes in {} rounds; resuming it",
                received.bytes, received.rounds
            );
            let seccomp = received.config.seccomp;
            let vm = received.vm;
            let api = serve_api(api_sock, &vm, &received.config)?;
            let mut recorder = WindowRecorder::default();
            let report = {
                let _signals = StopOnSignals::install(vm.stopper(), seccomp)?;
                vm.run_observed(&mut recorder)?
            };
            if let Some(api) = api {
                api.shutdown();
            }
            finish(&report, stats, recorder.window().as_ref())
        }
        Command::Ctl { sock, op, dir } => {
            let mut req = serde_json::json!({ "op": op });
            if let Some(dir) = dir {
                req["dir"] = serde_json::json!(dir);
            }
            let answer = host_vmm::api::request(&sock, &req)?;
            println!("{answer}");
            Ok(if answer["ok"] == serde_json::json!(true) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Restore {
            dir,
            stats,
            timeout,
            no_seccomp,
            api_sock,
        } => {
            let loaded = host_vmm::snapshot::read(&dir)?;
            let mut cfg = loaded.config.clone();
            cfg.timeout = timeout;
            cfg.seccomp = !no_seccomp;
            let mut vm = builder::build_to_restore(
                &cfg,
                ConsoleSink::new(Some(Box::new(std::io::stdout()))),
            )?;
            loaded.restore_into(&mut vm)?;
            let api = serve_api(api_sock, &vm, &cfg)?;
            let mut recorder = WindowRecorder::default();
            let report = {
                let _signals = StopOnSignals::install(vm.stopper(), cfg.seccomp)?;
                vm.run_observed(&mut recorder)?
            };
            if let Some(api) = api {
                api.shutdown();
            }
            finish(&report, stats, recorder.window().as_ref())
        }
        Command::Inspect {
            kernel,
            mode,
            mem,
            disable,
        } => {
            let image = kernel_image(kernel)?;
            let disable = disable.iter().fold(0, |a, b| a | b);
            Ok(if inspect(&image, mode.into(), mem, disable) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::SandboxSelftest { kind, call } => sandbox_selftest(&kind, &call),
        Command::Compare(args) => {
            if args.no_seccomp {
                sandbox::disable_process_wide();
            }
            let json = args.json.clone();
            let report_dir = args.report.clone();
            let opts = args.options()?;
            // A spinner on a terminal; plain progress lines otherwise (logs, pipes, tests).
            let spinner = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
                let bar = indicatif::ProgressBar::new_spinner();
                bar.enable_steady_tick(Duration::from_millis(120));
                bar
            });
            let mut done = 0u32;
            let records = compare::run(&opts, |w, m| {
                done += 1;
                match &spinner {
                    Some(bar) => bar.set_message(format!("run {done}: {w} ({m})")),
                    None => eprintln!("running {w} ({m})..."),
                }
            });
            if let Some(bar) = spinner {
                bar.finish_and_clear();
            }
            let records = records?;
            print!("{}", compare::render_table(&records));
            std::io::stdout().flush().ok();
            if let Some(path) = json {
                let text = compare::render_json(&records)?;
                std::fs::write(&path, text)
                    .with_context(|| format!("cannot write {}", path.display()))?;
                eprintln!("wrote {} records to {}", records.len(), path.display());
            }
            if let Some(dir) = report_dir {
                let files = compare::site::write_report(&dir, &records)?;
                eprintln!(
                    "wrote the report to {} ({})",
                    dir.join("index.html").display(),
                    files.join(", ")
                );
            }
            let failures = compare::fidelity_failures(&records);
            if failures.is_empty() {
                Ok(ExitCode::SUCCESS)
            } else {
                anyhow::bail!("fidelity check failed: {}", failures.join("; "))
            }
        }
    }
}

/// `host-vmm sandbox-selftest`: see [`Command::SandboxSelftest`].
fn sandbox_selftest(kind: &str, call: &str) -> anyhow::Result<ExitCode> {
    let kind = match kind {
        "vcpu" => ThreadKind::Vcpu,
        "virtio" => ThreadKind::VirtioWorker,
        "event" => ThreadKind::EventDevice,
        "prepare" => ThreadKind::Prepare,
        "timeout" => ThreadKind::Timeout,
        "signals" => ThreadKind::Signals,
        other => anyhow::bail!("unknown thread kind {other:?}"),
    };
    let call = call.to_string();
    let done = std::thread::spawn(move || -> anyhow::Result<i64> {
        sandbox::apply(kind, true)?;
        // Each arm makes one plain system call with valid arguments; nothing it could create
        // outlives the process, and a refused call ends the process in the SIGSYS handler.
        let ret = match call.as_str() {
            "none" => {
                // SAFETY: writes 3 bytes from a static buffer to stderr.
                unsafe { libc::write(2, b"ok\n".as_ptr().cast(), 3) as i64 }
            }
            "socket" => {
                // SAFETY: no pointer arguments; the socket (if created) is closed at exit.
                unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) as i64 }
            }
            "execve" => {
                let path = c"/bin/true";
                let argv = [path.as_ptr(), std::ptr::null()];
                // SAFETY: `path` and `argv` are NUL-terminated and live (on success the process is replaced).
                unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), std::ptr::null()) as i64 }
            }
            "openat-write" => {
                // SAFETY: a NUL-terminated path, opened (if allowed) write-only.
                unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY) as i64 }
            }
            "ioctl" => {
                let mut n: libc::c_int = 0;
                // SAFETY: FIONREAD on stdin writes one int into `n`.
                unsafe { libc::ioctl(0, libc::FIONREAD, &mut n) as i64 }
            }
            other => anyhow::bail!("unknown call {other:?}"),
        };
        Ok(ret)
    });
    let ret = done
        .join()
        .map_err(|_| anyhow::anyhow!("the sandboxed thread panicked"))??;
    println!("allowed: returned {ret}");
    Ok(ExitCode::SUCCESS)
}

/// Sleeps for `after`, or less if the guest ends first (then returns true): a short guest's
/// run must not linger until a long `--migrate-after` / `--snapshot-after`.
fn sleep_unless_ended(after: Duration, handle: &host_vmm::vm::VmHandle) -> bool {
    let until = std::time::Instant::now() + after;
    loop {
        if handle.vcpu().is_ended() {
            return true;
        }
        let left = until.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return false;
        }
        std::thread::sleep(left.min(Duration::from_millis(10)));
    }
}

/// The API socket at `path`, if asked for, serving `vm` (configured as `cfg`).
fn serve_api(
    path: Option<PathBuf>,
    vm: &host_vmm::vm::Vm,
    cfg: &VmConfig,
) -> anyhow::Result<Option<host_vmm::api::ApiServer>> {
    let Some(path) = path else { return Ok(None) };
    let source = std::sync::Arc::new(Source::new(vm, cfg.clone())?);
    Ok(Some(host_vmm::api::ApiServer::start(&path, source)?))
}

/// Waits until `after` into the run and migrates the VM to `to`. A run that ends first
/// migrates nothing (and says so); a failed migration leaves the VM running (or paused, by
/// option) and is reported on stderr, not an error: the run ends with the guest's status.
fn migrate_after_delay(
    after: Duration,
    to: &str,
    source: &Source,
    opts: &MigrateOptions,
) -> anyhow::Result<()> {
    let to = host_vmm::migration::endpoint::Endpoint::parse(to)?;
    if sleep_unless_ended(after, source.handle()) {
        eprintln!("host-vmm: the guest ended before --migrate-after; nothing migrated");
        return Ok(());
    }
    let report = match source.migrate(&to, opts) {
        Ok(report) => report,
        Err(e) => {
            // The guest runs on here (or stays paused, by option) and this run ends with its
            // exit status, as if no migration had been asked for; say why it failed.
            eprintln!("host-vmm: migration to {to} failed, the guest runs on here: {e}");
            return Ok(());
        }
    };
    eprintln!(
        "host-vmm: migrated to {to}: {} rounds, {} pages sent, {} bytes, downtime {:.3} ms, \
         total {:.3} ms",
        report.rounds.len() + 1,
        report.pages_sent(),
        report.bytes_sent,
        report.downtime_ns as f64 / 1e6,
        report.total_ns as f64 / 1e6,
    );
    Ok(())
}

/// Waits until `after` into the run, pauses the guest, writes a snapshot to `dir` and resumes
/// it. A run that ends first leaves no snapshot (and says so).
fn save_after(
    after: Duration,
    dir: &std::path::Path,
    handle: &host_vmm::vm::VmHandle,
    cfg: &VmConfig,
) -> anyhow::Result<()> {
    if sleep_unless_ended(after, handle) {
        eprintln!("host-vmm: the guest ended before --snapshot-after; no snapshot written");
        return Ok(());
    }
    match handle.vcpu().pause(Duration::from_secs(10)) {
        Ok(()) => {}
        Err(host_vmm::vcpu::ControlError::Ended) => {
            eprintln!("host-vmm: the guest ended before --snapshot-after; no snapshot written");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    }
    let written = host_vmm::snapshot::write(dir, cfg, handle);
    handle.vcpu().resume();
    let mem = written?;
    eprintln!(
        "host-vmm: snapshot written to {}: {} pages of memory written; elided: {} unbacked \
         (never written or released), {} reported free, {} all-zero",
        dir.display(),
        mem.pages_written,
        mem.elided.unbacked,
        mem.elided.free,
        mem.elided.zero,
    );
    Ok(())
}

/// `--stats` and the exit status of a finished run.
fn finish(report: &RunReport, stats: bool, window: Option<&Window>) -> anyhow::Result<ExitCode> {
    if stats {
        print_stats(report, window);
    }
    Ok(match report.stopped {
        Some(reason) => {
            eprintln!("host-vmm: guest stopped: {reason}");
            ExitCode::from(reason.exit_status())
        }
        None => ExitCode::from(u8::try_from(report.exit_code).unwrap_or(255)),
    })
}

fn print_stats(report: &RunReport, window: Option<&Window>) {
    eprintln!("{}", report.stats.summary());
    eprintln!(
        "first guest entry at CLOCK_MONOTONIC {} ns",
        report.first_entry_mono_ns
    );
    if let Some(w) = window {
        eprintln!(
            "measured window: {:.3} ms wall, {:.3} ms vCPU thread CPU\n{}",
            w.wall_ns as f64 / 1e6,
            w.host_cpu_ns as f64 / 1e6,
            w.exits.summary().replace("exits:", "window exits:")
        );
        for (i, ns) in w.checkpoint_ns.iter().enumerate() {
            eprintln!(
                "checkpoint {}: {:.3} ms after begin, resident guest RAM {} MiB",
                i + 1,
                *ns as f64 / 1e6,
                w.resident_bytes.get(i + 1).copied().unwrap_or(0) >> 20
            );
        }
    }
}

/// Live-migration options shared by `run --migrate-after` and `migrate`.
#[derive(clap::Args, Debug, Clone)]
struct MigrateArgs {
    /// Pre-copy rounds after the first full copy, at most.
    #[arg(long, default_value_t = 8)]
    max_rounds: u32,
    /// Stop pre-copying once what is left would take at most this long to send, in ms.
    #[arg(long, value_name = "MS", default_value_t = 20)]
    downtime_ms: u64,
    /// A destination silent this long fails the migration.
    #[arg(long, value_name = "DURATION", value_parser = timeout_arg, default_value = "10s")]
    migrate_io_timeout: Duration,
    /// What the VM does if the migration fails: resume (run on) or pause.
    #[arg(long, value_enum, default_value_t = OnFailureArg::Resume)]
    on_failure: OnFailureArg,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy)]
enum OnFailureArg {
    Resume,
    Pause,
}

impl MigrateArgs {
    fn options(&self) -> MigrateOptions {
        MigrateOptions {
            max_rounds: self.max_rounds,
            downtime_target: Duration::from_millis(self.downtime_ms),
            io_timeout: self.migrate_io_timeout,
            on_failure: match self.on_failure {
                OnFailureArg::Resume => OnFailure::Resume,
                OnFailureArg::Pause => OnFailure::Pause,
            },
        }
    }
}

/// While it lives, SIGINT and SIGTERM stop the VM (instead of killing the process) so that
/// `run` can still report. A thread waits for them; dropping this ends and joins it.
struct StopOnSignals {
    handle: Handle,
    thread: Option<JoinHandle<()>>,
}

impl StopOnSignals {
    fn install(stopper: Stopper, seccomp: bool) -> anyhow::Result<StopOnSignals> {
        let mut signals =
            Signals::new([SIGINT, SIGTERM]).context("cannot install SIGINT/SIGTERM handlers")?;
        let handle = signals.handle();
        let thread = std::thread::Builder::new()
            .name("pvkit-signals".into())
            .spawn(move || {
                sandbox::enter(ThreadKind::Signals, seccomp);
                for signal in signals.forever() {
                    stopper.stop(StopReason::Signal(signal));
                }
            })
            .context("cannot start the signal thread")?;
        Ok(StopOnSignals {
            handle,
            thread: Some(thread),
        })
    }
}

impl Drop for StopOnSignals {
    fn drop(&mut self) {
        self.handle.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            // Our errors already say their cause; add only causes not yet in the message
            // (e.g. under an anyhow context).
            let mut msg = e.to_string();
            for cause in e.chain().skip(1).map(|c| c.to_string()) {
                if !msg.contains(&cause) {
                    msg = format!("{msg}: {cause}");
                }
            }
            eprintln!("host-vmm: error: {msg}");
            ExitCode::from(VMM_FAILURE)
        }
    }
}
