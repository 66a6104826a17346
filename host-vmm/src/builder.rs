//! Building a VM, in named steps: check the configuration, create the KVM VM and its memory,
//! load the kernel, create the vCPU, attach the devices, configure boot. [`build`] runs them
//! in order and returns a [`Vm`] ready to run.
//!
//! Everything that comes from the user (memory size, kernel, disk image) is checked in the
//! first step, before KVM is touched, so bad input gets its own message even on a machine
//! without KVM.

use std::ffi::CString;
use std::path::Path;
use std::sync::{Arc, Mutex};

use hypercall_abi::idle::{EVENT_PORT, TIMER_PORT};
use hypercall_abi::layout::PAGE_SIZE;
use hypercall_abi::ports::{EXIT_PORT, MARKER_PORT, NULL_PORT, UART_COM1};
use hypercall_abi::virtio;
use kvm_ioctls::{Cap, Kvm, VmFd};

use crate::boot::{self, BootRequest};
use crate::bus::{Bus, SharedDevice};
use crate::config::VmConfig;
use crate::console::ConsoleSink;
use crate::devices::debug::{ExitPort, MarkerPort, NullDevice};
use crate::devices::event::{EventDevice, EventQueue};
use crate::devices::serial::{UART_PORTS, Uart};
use crate::devices::timer::PeriodicTimer;
use crate::devices::virtio::block::{Block, Disk};
use crate::devices::virtio::console::Console;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::{Interrupt, StatefulWindow};
use crate::error::{Error, Result};
use crate::hypercall;
use crate::kernel_abi::{KernelAbi, Offer};
use crate::loader::{self, ElfInfo};
use crate::machine::{DeviceSet, Devices, Machine, MachineParts, POOL_SLOT};
use crate::memory::GuestRam;
use crate::mmu::PageTablePool;
use crate::stop::Stopper;
use crate::sync::lock;
use crate::vcpu::Vcpu;
use crate::vm::Vm;
use crate::{cpuid, memory};

/// Builds a VM from `cfg`; guest console output goes to `console`.
pub fn build(cfg: &VmConfig, console: ConsoleSink) -> Result<Vm> {
    build_for(cfg, console, Start::Boot)
}

/// Builds a VM from `cfg` to load a saved state into (a snapshot's, a migration's): as
/// [`build`], but guest RAM and the page-table pool are left empty — the kernel is checked,
/// not copied, and no boot structures are written — since the saved state replaces them.
pub fn build_to_restore(cfg: &VmConfig, console: ConsoleSink) -> Result<Vm> {
    build_for(cfg, console, Start::Restore)
}

/// How a built VM will start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// At the kernel's entry point.
    Boot,
    /// From a saved state.
    Restore,
}

fn build_for(cfg: &VmConfig, console: ConsoleSink, start: Start) -> Result<Vm> {
    let checked = check_config(cfg)?;
    let kvm = open_kvm(&cfg.kvm_device)?;
    let (vm_fd, ram, mut pool) = create_vm(&kvm, cfg.mem_size)?;
    let kernel = match start {
        Start::Boot => load_kernel(&ram, cfg)?,
        Start::Restore => checked.kernel,
    };
    let (vcpu, offer, tsc_khz) = create_vcpu(&kvm, &vm_fd, &checked)?;
    let events = EventQueue::default();
    let mut devices = attach_pio_devices(&console, &events)?;
    attach_virtio_devices(
        &mut devices,
        &vm_fd,
        &ram,
        &console,
        &events,
        checked.disk,
        cfg.virtio_console,
    )?;
    let setup = BootSetup {
        kvm: &kvm,
        vcpu: &vcpu,
        ram: &ram,
        pool: &mut pool,
        kernel: &kernel,
        offer,
        tsc_khz,
    };
    match start {
        Start::Boot => configure_boot(setup, cfg, &devices.windows)?,
        Start::Restore => configure_cpuid(&setup)?,
    }
    let stopper = Stopper::new(events.interrupter())?;
    let machine = assemble_machine(MachineParts {
        ram,
        pool,
        devices,
        events,
        console,
        offer,
        protected_end: kernel.end.next_multiple_of(PAGE_SIZE),
    })?;
    let vm = Vm::from_parts(kvm, vm_fd, vcpu, machine, stopper, cfg.timeout, kernel);
    Ok(vm.with_seccomp(cfg.seccomp))
}

/// What [`check_config`] established without KVM.
#[derive(Debug)]
pub struct Checked {
    /// The kernel's ABI note, as read.
    pub abi: KernelAbi,
    /// The kernel's name for messages.
    pub name: String,
    /// The opened disk image, if any.
    pub disk: Option<Disk>,
    /// Where the kernel would load (checked, not loaded).
    pub kernel: ElfInfo,
    /// The run's mode and `--disable` bits.
    pub mode: hypercall_abi::boot::Mode,
    /// Feature bits to clear.
    pub disable: u64,
}

/// Step 1: checks the memory size, the kernel image and its ABI note, and opens the disk.
pub fn check_config(cfg: &VmConfig) -> Result<Checked> {
    memory::check_mem_size(cfg.mem_size)?;
    let kernel =
        loader::validate(&cfg.kernel.bytes, cfg.mem_size).map_err(|source| Error::Elf {
            name: cfg.kernel.name.clone(),
            source,
        })?;
    let abi = KernelAbi::read(&cfg.kernel.bytes);
    // Everything but the TSC rate is known without KVM: refuse early what cannot boot.
    abi.offer(cfg.mode, hypercall::host_features(1), cfg.disable)
        .map_err(|source| Error::KernelRefused {
            name: cfg.kernel.name.clone(),
            source,
        })?;
    let disk = match &cfg.disk {
        Some(d) => Some(Disk::open(&d.path, d.readonly)?),
        None => None,
    };
    Ok(Checked {
        kernel,
        abi,
        name: cfg.kernel.name.clone(),
        disk,
        mode: cfg.mode,
        disable: cfg.disable,
    })
}

/// Opens the KVM device.
pub fn open_kvm(path: &Path) -> Result<Kvm> {
    let unavailable = |source| Error::KvmUnavailable {
        path: path.into(),
        source,
    };
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| unavailable(std::io::Error::from(std::io::ErrorKind::InvalidInput)))?;
    Kvm::new_with_path(c).map_err(|e| unavailable(std::io::Error::from_raw_os_error(e.errno())))
}

/// Step 2: the KVM VM, its RAM (slot 0) and the page-table pool (a read-only slot).
pub fn create_vm(kvm: &Kvm, mem_size: u64) -> Result<(VmFd, GuestRam, PageTablePool)> {
    let vm = kvm.create_vm().map_err(Error::kvm("create VM"))?;
    let ram = GuestRam::new(mem_size)?;
    ram.register(&vm)?;
    if !kvm.check_extension(Cap::ReadonlyMem) {
        return Err(Error::MissingCapability(
            "read-only memory slots (KVM_CAP_READONLY_MEM)",
        ));
    }
    let pool = PageTablePool::new(mem_size)?;
    pool.register(&vm, POOL_SLOT)?;
    Ok((vm, ram, pool))
}

/// Step 3: loads the kernel's segments into RAM.
pub fn load_kernel(ram: &GuestRam, cfg: &VmConfig) -> Result<ElfInfo> {
    loader::load(ram.mem(), &cfg.kernel.bytes).map_err(|source| Error::Elf {
        name: cfg.kernel.name.clone(),
        source,
    })
}

/// Step 4: the vCPU, and what the VM offers now that the TSC rate is known. Returns the
/// vCPU, the offer and the TSC rate in kHz (0 if KVM cannot say).
pub fn create_vcpu(kvm: &Kvm, vm: &VmFd, checked: &Checked) -> Result<(Vcpu, Offer, u32)> {
    let fd = vm.create_vcpu(0).map_err(Error::kvm("create vCPU"))?;
    // The timing leaf tells the guest its TSC rate; without it the guest has no clock that
    // costs no exit, so report 0 rather than fail where KVM cannot say.
    let tsc_khz = fd.get_tsc_khz().unwrap_or(0);
    let offer = checked
        .abi
        .offer(
            checked.mode,
            hypercall::host_features(tsc_khz),
            checked.disable,
        )
        .map_err(|source| Error::KernelRefused {
            name: checked.name.clone(),
            source,
        })?;
    let mut vcpu = Vcpu::new(fd, kvm.check_extension(Cap::SyncRegs));
    // Without KVM_CAP_XSAVE2 (0) the XSAVE area is the legacy 4 KiB.
    let xsave_size = vm.check_extension_int(Cap::Xsave2);
    vcpu.set_xsave_fits(xsave_size <= std::mem::size_of::<kvm_bindings::kvm_xsave>() as i32);
    Ok((vcpu, offer, tsc_khz))
}

/// Step 5a: the PIO devices (COM1, exit, marker, null, timer, event), each on its range of
/// the PIO bus. Needs no KVM.
pub fn attach_pio_devices(console: &ConsoleSink, events: &EventQueue) -> Result<DeviceSet> {
    let uart = Arc::new(Mutex::new(Uart::new(console.clone())));
    let null = Arc::new(Mutex::new(NullDevice::default()));
    let timer = Arc::new(Mutex::new(PeriodicTimer::default()));
    let event = Arc::new(Mutex::new(EventDevice::new(events)));
    let mut pio = Bus::new();
    let ports: [(u16, u64, SharedDevice); 6] = [
        (UART_COM1, UART_PORTS, uart.clone()),
        (EXIT_PORT, 1, Arc::new(Mutex::new(ExitPort))),
        (MARKER_PORT, 1, Arc::new(Mutex::new(MarkerPort))),
        (NULL_PORT, 1, null.clone()),
        (TIMER_PORT, 1, timer.clone()),
        (EVENT_PORT, 1, event.clone()),
    ];
    for (port, len, dev) in ports {
        pio.insert(u64::from(port), len, dev).map_err(bus_error)?;
    }
    Ok(DeviceSet {
        pio,
        mmio: Bus::new(),
        devices: Devices {
            uart,
            null,
            timer,
            event,
            virtio: Vec::new(),
        },
        windows: Vec::new(),
    })
}

/// Step 5b: the virtio devices (virtio-blk with a disk, then virtio-console if asked), window
/// `n` at [`virtio::window`]`(n)` on the MMIO bus, queue-notify ioeventfds registered with
/// KVM. Device completions wake the guest through `events`; devices see RAM only, never the
/// page-table pool.
pub fn attach_virtio_devices(
    set: &mut DeviceSet,
    vm: &VmFd,
    ram: &GuestRam,
    console: &ConsoleSink,
    events: &EventQueue,
    disk: Option<Disk>,
    virtio_console: bool,
) -> Result<()> {
    // Completions queue a guest event: they wake a parked idle_yield, or raise EVENT_VECTOR
    // for a halted guest.
    let interrupt = || {
        let waker = events.waker();
        Interrupt::new(move || waker.wake())
    };
    let mut windows: Vec<(SharedDevice, Arc<Mutex<dyn StatefulWindow>>)> = Vec::new();
    if let Some(disk) = disk {
        let t = MmioTransport::new(Block::new(disk), ram.mem().clone(), interrupt())?;
        let t = Arc::new(Mutex::new(t));
        windows.push((t.clone(), t));
    }
    if virtio_console {
        let t = MmioTransport::new(
            Console::new(console.clone()),
            ram.mem().clone(),
            interrupt(),
        )?;
        let t = Arc::new(Mutex::new(t));
        windows.push((t.clone(), t));
    }
    for (on_bus, window) in windows {
        let base = virtio::window(set.windows.len() as u64);
        let id = {
            let w = lock(&window);
            w.register_ioeventfds(vm, base)?;
            w.device_id()
        };
        set.windows.push((base, id));
        set.mmio
            .insert(base, virtio::VIRTIO_MMIO_SLOT, on_bus)
            .map_err(bus_error)?;
        set.devices.virtio.push(window);
    }
    Ok(())
}

/// Step 7: the [`Machine`]: the parts, the pool's trapped window on the MMIO bus, a fresh
/// clock and statistics. Needs no KVM.
pub fn assemble_machine(parts: MachineParts) -> Result<Machine> {
    Machine::new(parts).map_err(bus_error)
}

/// What [`configure_boot`] needs.
#[derive(Debug)]
pub struct BootSetup<'a> {
    /// The KVM system fd (for the supported CPUID).
    pub kvm: &'a Kvm,
    /// The vCPU.
    pub vcpu: &'a Vcpu,
    /// Guest RAM.
    pub ram: &'a GuestRam,
    /// The page-table pool.
    pub pool: &'a mut PageTablePool,
    /// Where the kernel landed.
    pub kernel: &'a ElfInfo,
    /// What the guest is shown.
    pub offer: Offer,
    /// The TSC rate (0: unknown).
    pub tsc_khz: u32,
}

/// Step 6: boot structures (GDT, page tables, boot info with the device windows), CPUID, and
/// the vCPU's long-mode registers at the kernel's entry — or, for a kernel with only the PVH
/// note, the PVH start info and 32-bit registers at its PVH entry ([`crate::pvh`]).
pub fn configure_boot(s: BootSetup<'_>, cfg: &VmConfig, windows: &[(u64, u32)]) -> Result<()> {
    let args = cfg.args.join(" ");
    let req = BootRequest {
        mode: s.offer.mode(),
        workload: &cfg.workload,
        args: &args,
        devices: windows,
    };
    boot::write_boot_structures(s.ram, s.pool, s.kernel, &req)?;
    configure_cpuid(&s)?;
    let fd = s.vcpu.fd();
    let mut sregs = fd.get_sregs().map_err(Error::kvm("get sregs"))?;
    // A kernel with only the PVH note is entered by the PVH protocol (32-bit, paging off,
    // `rbx` = hvm_start_info); pvkit's direct long-mode entry otherwise.
    let regs = match crate::pvh::entry(&cfg.kernel.bytes) {
        Some(entry) => {
            crate::pvh::write_start_info(s.ram, &crate::pvh::cmdline(&cfg.workload, &args))?;
            crate::pvh::protected_mode_sregs(&mut sregs);
            crate::pvh::initial_regs(entry)
        }
        None => {
            boot::long_mode_sregs(&mut sregs);
            boot::initial_regs(s.kernel.entry)
        }
    };
    fd.set_sregs(&sregs).map_err(Error::kvm("set sregs"))?;
    fd.set_regs(&regs).map_err(Error::kvm("set regs"))?;
    Ok(())
}

/// The vCPU's CPUID (all a VM built to restore needs of step 6: the rest is saved state).
pub fn configure_cpuid(s: &BootSetup<'_>) -> Result<()> {
    s.vcpu
        .fd()
        .set_cpuid2(&cpuid::guest_cpuid(s.kvm, s.offer, s.tsc_khz)?)
        .map_err(Error::kvm("set CPUID"))
}

fn bus_error(e: crate::bus::BusError) -> Error {
    // Only a programming error here can overlap two fixed ranges.
    Error::Io {
        what: "cannot register a device".into(),
        source: std::io::Error::other(e),
    }
}
