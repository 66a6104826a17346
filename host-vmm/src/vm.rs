//! A pvkit VM: KVM handles, guest RAM, boot state, devices, and one vCPU.

use std::borrow::Cow;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hypercall_abi::boot::Mode;
use hypercall_abi::virtio;
use kvm_ioctls::{Cap, Kvm, SyncReg, VcpuFd, VmFd};

use crate::boot::{self, BootRequest};
use crate::console::ConsoleSink;
use crate::devices::PioBus;
use crate::devices::virtio::block::{Block, Disk};
use crate::devices::virtio::console::Console;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::{Interrupt, MmioDevice};
use crate::error::{Error, Result};
use crate::hypercall::clock::Clock;
use crate::kernel_abi::{KernelAbi, Offer};
use crate::loader::{self, ElfInfo};
use crate::memory::GuestRam;
use crate::metrics::{ExitStats, Window};
use crate::mmu::PtPool;
use crate::stop::{StopReason, Stopper};
use crate::{cpuid, hypercall, vcpu};

/// KVM memory slot of the page-table pool (RAM is slot 0).
pub(crate) const POOL_SLOT: u32 = 1;

/// The default KVM device.
pub const DEFAULT_KVM_DEVICE: &str = "/dev/kvm";

/// A kernel image and a name for messages.
#[derive(Debug, Clone)]
pub struct KernelImage {
    /// Path, or "embedded demo kernel".
    pub name: String,
    /// The ELF bytes.
    pub bytes: Cow<'static, [u8]>,
}

impl KernelImage {
    /// The demo kernel built into this binary.
    pub fn embedded() -> KernelImage {
        KernelImage {
            name: "embedded demo kernel".into(),
            bytes: Cow::Borrowed(crate::kernel::DEMO_KERNEL),
        }
    }

    /// Reads a kernel file.
    pub fn from_file(path: &Path) -> Result<KernelImage> {
        let bytes = std::fs::read(path).map_err(|source| Error::KernelRead {
            path: path.into(),
            source,
        })?;
        Ok(KernelImage {
            name: path.display().to_string(),
            bytes: Cow::Owned(bytes),
        })
    }
}

/// Everything needed to boot a VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// The kernel.
    pub kernel: KernelImage,
    /// PV or trapped (pvkit hidden: an unmodified guest's view).
    pub mode: Mode,
    /// Feature bits to clear in PV mode (`--disable`): the guest sees them unset and the host
    /// answers their calls with `NOT_IMPLEMENTED`.
    pub disable: u64,
    /// Guest RAM in bytes.
    pub mem_size: u64,
    /// Workload name passed to the guest.
    pub workload: String,
    /// Workload arguments passed to the guest (joined with spaces).
    pub args: Vec<String>,
    /// The KVM device node.
    pub kvm_device: PathBuf,
    /// A disk image to attach as a virtio-blk device.
    pub disk: Option<DiskConfig>,
    /// Attach a virtio-console device (output only: its bytes go to the console sink).
    pub virtio_console: bool,
    /// Stop the run this long after it starts (the guest's first entry), if the guest has
    /// not exited by then; the report then says [`StopReason::Timeout`].
    pub timeout: Option<Duration>,
}

/// A disk image for the virtio-blk device.
#[derive(Debug, Clone)]
pub struct DiskConfig {
    /// The image file (or block device).
    pub path: PathBuf,
    /// Attach read-only: the guest's writes fail with an I/O error.
    pub readonly: bool,
}

impl VmConfig {
    /// Defaults: embedded kernel, PV, 128 MiB, workload `hello`.
    pub fn new(mode: Mode, workload: &str) -> VmConfig {
        VmConfig {
            kernel: KernelImage::embedded(),
            mode,
            disable: 0,
            mem_size: 128 << 20,
            workload: workload.into(),
            args: Vec::new(),
            kvm_device: DEFAULT_KVM_DEVICE.into(),
            disk: None,
            virtio_console: false,
            timeout: None,
        }
    }
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// The guest's exit code; for a stopped run, the reason's conventional status
    /// ([`StopReason::exit_status`]: 124 for a timeout, 128 + n for signal n).
    pub exit_code: u32,
    /// Why the run was stopped, or `None` if the guest exited by itself.
    pub stopped: Option<StopReason>,
    /// All exits of the run.
    pub stats: ExitStats,
    /// The measured window between markers, if the guest set both.
    pub window: Option<Window>,
    /// Captured console output.
    pub console: Vec<u8>,
    /// Wall time from first entry to exit.
    pub wall_ns: u64,
    /// Writes the trapped null device saw.
    pub null_writes: u64,
}

impl RunReport {
    /// The console bytes written inside the measured window.
    pub fn window_console(&self) -> &[u8] {
        let Some(w) = &self.window else { return &[] };
        let len = self.console.len() as u64;
        &self.console[w.console_start.min(len) as usize..w.console_end.min(len) as usize]
    }
}

/// A booted-but-not-yet-run VM. Field order matters: the vCPU and VM fds are dropped before
/// the guest memory they reference.
#[derive(Debug)]
pub struct Vm {
    pub(crate) vcpu: VcpuFd,
    pub(crate) vm: VmFd,
    _kvm: Kvm,
    pub(crate) ram: GuestRam,
    pub(crate) pool: PtPool,
    /// The virtio devices, device window `n` at index `n`: virtio-blk first (with `--disk`),
    /// then virtio-console (with `--virtio-console`).
    pub(crate) virtio: Vec<MmioDevice>,
    pub(crate) bus: PioBus,
    pub(crate) console: ConsoleSink,
    pub(crate) clock: Clock,
    pub(crate) stats: ExitStats,
    pub(crate) sync_regs: bool,
    /// What the guest is shown: pvkit with feature bits, or nothing.
    pub(crate) offer: Offer,
    pub(crate) stop: Stopper,
    timeout: Option<Duration>,
    kernel: ElfInfo,
}

fn open_kvm(path: &Path) -> Result<Kvm> {
    let unavailable = |source| Error::KvmUnavailable {
        path: path.into(),
        source,
    };
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| unavailable(std::io::Error::from(std::io::ErrorKind::InvalidInput)))?;
    Kvm::new_with_path(c).map_err(|e| unavailable(std::io::Error::from_raw_os_error(e.errno())))
}

impl Vm {
    /// Creates the VM: validates and loads the kernel, builds the boot state. Guest console
    /// output goes to `console`.
    pub fn new(cfg: &VmConfig, console: ConsoleSink) -> Result<Vm> {
        // Validate everything that comes from the user before touching KVM, so bad input gets
        // its own message even on a machine without KVM.
        crate::memory::check_mem_size(cfg.mem_size)?;
        loader::validate(&cfg.kernel.bytes, cfg.mem_size).map_err(|source| Error::Elf {
            name: cfg.kernel.name.clone(),
            source,
        })?;
        let abi = KernelAbi::read(&cfg.kernel.bytes);
        let refused = |source| Error::KernelRefused {
            name: cfg.kernel.name.clone(),
            source,
        };
        // Everything but the TSC rate is known without KVM: refuse early what cannot boot.
        let offer = abi
            .offer(cfg.mode, hypercall::host_features(1), cfg.disable)
            .map_err(refused)?;
        let disk = match &cfg.disk {
            Some(d) => Some(Disk::open(&d.path, d.readonly)?),
            None => None,
        };
        let args = cfg.args.join(" ");
        // Device windows in order: the disk, then the console.
        let ids = disk
            .iter()
            .map(|_| virtio::DEVICE_ID_BLOCK)
            .chain(cfg.virtio_console.then_some(virtio::DEVICE_ID_CONSOLE));
        let devices: Vec<(u64, u32)> = (0..)
            .zip(ids)
            .map(|(n, id)| (virtio::window(n), id))
            .collect();
        let req = BootRequest {
            mode: offer.mode(),
            workload: &cfg.workload,
            args: &args,
            devices: &devices,
        };

        let kvm = open_kvm(&cfg.kvm_device)?;
        let vm = kvm.create_vm().map_err(Error::kvm("create VM"))?;
        let ram = GuestRam::new(cfg.mem_size)?;
        ram.register(&vm)?;
        if !kvm.check_extension(Cap::ReadonlyMem) {
            return Err(Error::MissingCapability(
                "read-only memory slots (KVM_CAP_READONLY_MEM)",
            ));
        }
        let mut pool = PtPool::new(cfg.mem_size)?;
        pool.register(&vm, POOL_SLOT)?;
        let kernel = loader::load(ram.mem(), &cfg.kernel.bytes).map_err(|source| Error::Elf {
            name: cfg.kernel.name.clone(),
            source,
        })?;
        boot::write_boot_structures(&ram, &mut pool, &kernel, &req)?;

        let mut vcpu = vm.create_vcpu(0).map_err(Error::kvm("create vCPU"))?;
        // The timing leaf tells the guest its TSC rate; without it the guest has no clock that
        // costs no exit, so report 0 rather than fail where KVM cannot say.
        let tsc_khz = vcpu.get_tsc_khz().unwrap_or(0);
        let offer = abi
            .offer(cfg.mode, hypercall::host_features(tsc_khz), cfg.disable)
            .map_err(refused)?;
        vcpu.set_cpuid2(&cpuid::guest_cpuid(&kvm, offer, tsc_khz)?)
            .map_err(Error::kvm("set CPUID"))?;
        let mut sregs = vcpu.get_sregs().map_err(Error::kvm("get sregs"))?;
        boot::long_mode_sregs(&mut sregs);
        vcpu.set_sregs(&sregs).map_err(Error::kvm("set sregs"))?;
        vcpu.set_regs(&boot::initial_regs(kernel.entry))
            .map_err(Error::kvm("set regs"))?;
        let sync_regs = kvm.check_extension(Cap::SyncRegs);
        if sync_regs {
            vcpu.set_sync_valid_reg(SyncReg::Register);
        }
        let bus = PioBus::new(console.clone());
        let stop = Stopper::new(bus.events.waker())?;
        // Completions queue a guest event: they wake a parked idle_yield, or raise
        // EVENT_VECTOR for a halted guest. Devices see RAM only, never the pool.
        let interrupt = || {
            let waker = bus.events.waker();
            Interrupt::new(move || waker.wake())
        };
        let mut virtio_devices = Vec::new();
        if let Some(disk) = disk {
            let t = MmioTransport::new(Block::new(disk), ram.mem().clone(), interrupt())?;
            virtio_devices.push(MmioDevice::Block(t));
        }
        if cfg.virtio_console {
            let t = MmioTransport::new(
                Console::new(console.clone()),
                ram.mem().clone(),
                interrupt(),
            )?;
            virtio_devices.push(MmioDevice::Console(t));
        }
        for (dev, &(base, id)) in virtio_devices.iter().zip(&devices) {
            debug_assert_eq!(dev.device_id(), id);
            dev.register_ioeventfds(&vm, base)?;
        }
        Ok(Vm {
            vcpu,
            vm,
            _kvm: kvm,
            ram,
            pool,
            virtio: virtio_devices,
            bus,
            console,
            clock: Clock::new(),
            stats: ExitStats::default(),
            sync_regs,
            offer,
            stop,
            timeout: cfg.timeout,
            kernel,
        })
    }

    /// A handle that stops this VM's run from another thread (see [`Stopper::stop`]). Take it
    /// before calling [`Vm::run`], which consumes the VM.
    pub fn stopper(&self) -> Stopper {
        self.stop.clone()
    }

    /// Where the kernel was loaded.
    pub fn kernel(&self) -> &ElfInfo {
        &self.kernel
    }

    /// What the guest is shown: pvkit with its feature bits, or nothing (and why).
    pub fn offer(&self) -> Offer {
        self.offer
    }

    /// Runs the guest until it exits (or faults), or until it is stopped: by the configured
    /// timeout or through a [`Stopper`]. A stopped run is not an error; its report says why.
    pub fn run(mut self) -> Result<RunReport> {
        let start = Instant::now();
        let stopper = self.stop.clone();
        let timeout = self.timeout;
        let run = std::thread::scope(|s| {
            if let Some(t) = timeout {
                // Waits for the deadline or the end of the run, whichever is first; joined
                // when the scope ends, so it never outlives the run.
                std::thread::Builder::new()
                    .name("pvkit-timeout".into())
                    .spawn_scoped(s, move || {
                        stopper.stop_at(start.checked_add(t), StopReason::Timeout(t))
                    })
                    .map_err(|source| Error::Io {
                        what: "cannot start the timeout thread".into(),
                        source,
                    })?;
            }
            vcpu::run_loop(&mut self)
        });
        self.console.flush();
        let (end, window) = run?;
        let (exit_code, stopped) = match end {
            vcpu::End::Exit(code) => (code, None),
            vcpu::End::Stopped(r) => (u32::from(r.exit_status()), Some(r)),
        };
        let console = self.console.captured();
        Ok(RunReport {
            exit_code,
            stopped,
            stats: self.stats,
            window,
            console,
            wall_ns: start.elapsed().as_nanos() as u64,
            null_writes: self.bus.null_writes(),
        })
    }
}

/// Creates and runs a VM in one call.
pub fn run(cfg: &VmConfig, console: ConsoleSink) -> Result<RunReport> {
    Vm::new(cfg, console)?.run()
}
