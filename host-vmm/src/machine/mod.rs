//! The machine: every piece of host-side VM state except the KVM handles, and what each exit
//! means.
//!
//! [`Machine::handle_exit`] takes a decoded KVM exit and routes it: the hypercall port to the
//! hypercall dispatcher, other port I/O to the PIO [`Bus`], MMIO to the MMIO bus (the virtio
//! windows and the page-table pool's trapped window), `hlt` to the idle logic. It needs no KVM:
//! unit tests build a machine over real guest memory and feed it `VcpuExit` values.
//!
//! Ownership: the machine owns guest RAM, the page-table pool, the event queue, the clock, the
//! console sink, the exit statistics, and a typed handle to every device; the buses hold
//! shared handles to the same devices to route exits. Saving state goes through the typed
//! handles ([`Machine::save`]).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use hypercall_abi::idle::{EVENT_VECTOR, TIMER_VECTOR};
use hypercall_abi::layout::{PAGE_SIZE, PT_POOL_GPA, PT_POOL_SIZE};
use hypercall_abi::request::Request;
use hypercall_abi::{HYPERCALL_PORT, Regs};
use kvm_ioctls::{VcpuExit, VmFd};

use crate::bus::{Bus, BusAction, BusError};
use crate::console::ConsoleSink;
use crate::devices::debug::NullDevice;
use crate::devices::event::{EventDevice, EventDeviceState, EventQueue, EventQueueState, Woken};
use crate::devices::serial::{Uart, UartState};
use crate::devices::timer::{PeriodicTimer, TimerState};
use crate::devices::virtio::{MmioDeviceState, StatefulWindow};
use crate::error::Result;
use crate::free_report::{FreeRanges, FreeReport, FreeReportState};
use crate::hypercall::clock::{Clock, ClockState};
use crate::hypercall::{self, Context, Outcome};
use crate::kernel_abi::{HiddenBecause, Offer};
use crate::memory::{GuestRam, GuestRamState, PageBits};
use crate::metrics::{ExitReason, ExitStats};
use crate::mmu::PageTablePool;
use crate::state::{Persist, STATE_VERSION, StateError, check_version};
use crate::sync::lock;
use crate::trap::pool_window::PoolWindow;

/// KVM memory slot of the page-table pool (RAM is slot 0).
pub const POOL_SLOT: u32 = 1;

/// What one exit asks the run loop to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Resume the guest.
    Continue,
    /// A hypercall: read the registers, [`Machine::hypercall`], write the return registers.
    Hypercall,
    /// `hlt`: [`Machine::halt`].
    Halt,
    /// The guest exits with this code.
    Exit(u32),
    /// The guest wrote this value to the marker port.
    Marker(u32),
    /// The guest cannot go on (the message says why).
    Fault(String),
    /// `KVM_EXIT_DEBUG`: a breakpoint, watchpoint or single-step set by the gdb stub.
    Debug(DebugExit),
}

/// What a `KVM_EXIT_DEBUG` reports ([`Step::Debug`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DebugExit {
    /// The exception: 1 (#DB: single-step, hardware breakpoint or watchpoint) or 3 (#BP, `int3`).
    pub exception: u32,
    /// The guest's RIP.
    pub pc: u64,
    /// DR6 (which debug register fired; bit 14 = single-step).
    pub dr6: u64,
}

/// What `hlt` resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Halt {
    /// Raise this interrupt vector and resume.
    Inject(u8),
    /// A stop or pause request ended the wait: the guest is still halted (wait again after
    /// the pause).
    Interrupted,
    /// Nothing can ever wake the guest.
    Fault(String),
}

/// The devices a machine has, as typed handles (the buses hold the same devices).
#[derive(Debug)]
pub struct Devices {
    /// COM1.
    pub uart: Arc<Mutex<Uart>>,
    /// The null device (trapped twin of the `null` hypercall).
    pub null: Arc<Mutex<NullDevice>>,
    /// The periodic timer.
    pub timer: Arc<Mutex<PeriodicTimer>>,
    /// The event device.
    pub event: Arc<Mutex<EventDevice>>,
    /// The virtio devices, window `n` at index `n`.
    pub virtio: Vec<Arc<Mutex<dyn StatefulWindow>>>,
}

/// A VM's devices while it is being built: both buses and the typed handles.
#[derive(Debug)]
pub struct DeviceSet {
    /// The PIO bus.
    pub pio: Bus,
    /// The MMIO bus (the pool window joins in [`Machine::new`]).
    pub mmio: Bus,
    /// Typed handles to the same devices.
    pub devices: Devices,
    /// The virtio windows: (base, device ID), window `n` at index `n`.
    pub windows: Vec<(u64, u32)>,
}

/// What a [`Machine`] is made of ([`Machine::new`]; [`crate::builder`] makes the parts).
#[derive(Debug)]
pub struct MachineParts {
    /// Guest RAM.
    pub ram: GuestRam,
    /// The page-table pool (boot tables installed).
    pub pool: PageTablePool,
    /// The devices.
    pub devices: DeviceSet,
    /// The event queue the devices wake.
    pub events: EventQueue,
    /// The console sink.
    pub console: ConsoleSink,
    /// What the guest is shown.
    pub offer: Offer,
    /// RAM below this cannot be released by the guest.
    pub protected_end: u64,
}

/// Host-side VM state and exit handling (see the module docs).
#[derive(Debug)]
pub struct Machine {
    ram: GuestRam,
    pool: Arc<Mutex<PageTablePool>>,
    pio: Bus,
    mmio: Bus,
    devices: Devices,
    events: EventQueue,
    clock: Clock,
    console: ConsoleSink,
    stats: ExitStats,
    /// What the guest is shown: pvkit with feature bits, or nothing.
    offer: Offer,
    /// RAM below this (boot structures, stack, kernel image) cannot be released.
    protected_end: u64,
    /// The guest's free-list registration (`zero_hints(FREE_LIST)`, v1.8).
    free_report: FreeReport,
}

impl Machine {
    /// Puts the parts together: the pool's trapped window joins the MMIO bus; the clock starts
    /// now; no exit is counted yet.
    pub fn new(parts: MachineParts) -> std::result::Result<Machine, BusError> {
        let pool = Arc::new(Mutex::new(parts.pool));
        let mut mmio = parts.devices.mmio;
        mmio.insert(
            PT_POOL_GPA,
            PT_POOL_SIZE,
            Arc::new(Mutex::new(PoolWindow::new(pool.clone(), PT_POOL_GPA))),
        )?;
        Ok(Machine {
            ram: parts.ram,
            pool,
            pio: parts.devices.pio,
            mmio,
            devices: parts.devices.devices,
            events: parts.events,
            clock: Clock::new(),
            console: parts.console,
            stats: ExitStats::default(),
            offer: parts.offer,
            protected_end: parts.protected_end,
            free_report: FreeReport::new(parts.protected_end),
        })
    }

    /// Reads guest-physical memory for a debugger: RAM or the page-table pool. False if the
    /// range is in neither.
    pub fn debug_read(&self, gpa: u64, buf: &mut [u8]) -> bool {
        if let Some(at) = self.ram.checked_range(gpa, buf.len() as u64) {
            return vm_memory::Bytes::read_slice(self.ram.mem(), buf, at).is_ok();
        }
        lock(&self.pool).read_bytes(gpa, buf)
    }

    /// Writes guest RAM for a debugger (a breakpoint, `set var`). The page-table pool is not
    /// written: its tables change only through the validator. False outside RAM.
    pub fn debug_write(&mut self, gpa: u64, data: &[u8]) -> bool {
        let Some(at) = self.ram.checked_range(gpa, data.len() as u64) else {
            return false;
        };
        vm_memory::Bytes::write_slice(self.ram.mem(), data, at).is_ok()
    }

    /// The exit statistics so far.
    pub fn stats(&self) -> &ExitStats {
        &self.stats
    }

    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// The console sink.
    pub fn console(&self) -> &ConsoleSink {
        &self.console
    }

    /// What the guest is shown.
    pub fn offer(&self) -> Offer {
        self.offer
    }

    /// The devices.
    pub fn devices(&self) -> &Devices {
        &self.devices
    }

    /// The frames the guest reports free now (`zero_hints(FREE_LIST)`, validated; see
    /// [`FreeReport::ranges`]). Call it with the vCPU stopped at an exit boundary.
    pub fn free_ranges(&self) -> FreeRanges {
        self.free_report.ranges(&self.ram)
    }

    /// Routes one exit (see the module docs) and counts it.
    pub fn handle_exit(&mut self, exit: VcpuExit<'_>) -> Step {
        let stats = &mut self.stats;
        match exit {
            VcpuExit::IoOut(HYPERCALL_PORT, _) if matches!(self.offer, Offer::Pv(_)) => {
                stats.record(ExitReason::Hypercall);
                Step::Hypercall
            }
            // pvkit is hidden: an unmodified guest has no hypercall port, so a kernel that
            // writes it skipped detection. Counted, and reported as the guest's error.
            VcpuExit::IoOut(HYPERCALL_PORT, _) => {
                stats.record(ExitReason::Pio);
                stats.record_event("hypercall_while_hidden");
                Step::Fault(format!(
                    "wrote to the hypercall port {HYPERCALL_PORT:#x} while pvkit is hidden \
                     ({}): detect pvkit with CPUID before making hypercalls",
                    match self.offer {
                        Offer::Hidden(HiddenBecause::NoNote) => {
                            "the kernel has no pvkit ABI note, so it runs as an unmodified guest"
                        }
                        _ => "--mode trapped runs the kernel as an unmodified guest",
                    }
                ))
            }
            VcpuExit::IoOut(port, data) => {
                // Writes to unclaimed ports are dropped, as on a real ISA bus.
                let (name, action) = self
                    .pio
                    .write(u64::from(port), data)
                    .unwrap_or(("unclaimed", BusAction::Continue));
                stats.record_device(name);
                let reason = match action {
                    BusAction::Marker(_) => ExitReason::Marker,
                    _ => ExitReason::Pio,
                };
                stats.record(reason);
                Self::step_for(stats, action)
            }
            VcpuExit::IoIn(port, data) => {
                stats.record(ExitReason::Pio);
                // Unclaimed ports float high, as on a real ISA bus.
                let name = self.pio.read(u64::from(port), data).unwrap_or_else(|| {
                    data.fill(0xff);
                    "unclaimed"
                });
                stats.record_device(name);
                Step::Continue
            }
            // Outside RAM and the devices nothing is mapped: reads float high, writes are
            // dropped. Pool reads never exit (the slot is readable); pool writes are trapped
            // page-table updates.
            VcpuExit::MmioRead(gpa, data) => {
                stats.record(ExitReason::Mmio);
                match self.mmio.read(gpa, data) {
                    Some(name) => stats.record_device(name),
                    None => data.fill(0xff),
                }
                Step::Continue
            }
            VcpuExit::MmioWrite(gpa, data) => {
                stats.record(ExitReason::Mmio);
                match self.mmio.write(gpa, data) {
                    Some((name, action)) => {
                        stats.record_device(name);
                        Self::step_for(stats, action)
                    }
                    None => Step::Continue,
                }
            }
            VcpuExit::Intr => {
                stats.record(ExitReason::Intr);
                Step::Continue
            }
            VcpuExit::Hlt => {
                stats.record(ExitReason::Hlt);
                Step::Halt
            }
            VcpuExit::Debug(arch) => {
                stats.record(ExitReason::Other);
                Step::Debug(DebugExit {
                    exception: arch.exception,
                    pc: arch.pc,
                    dr6: arch.dr6,
                })
            }
            VcpuExit::Shutdown => {
                stats.record(ExitReason::Other);
                Step::Fault("triple fault (KVM_EXIT_SHUTDOWN)".into())
            }
            VcpuExit::FailEntry(reason, cpu) => {
                stats.record(ExitReason::Other);
                Step::Fault(format!(
                    "VM entry failed (KVM_EXIT_FAIL_ENTRY, reason {reason:#x}, cpu {cpu})"
                ))
            }
            VcpuExit::InternalError => {
                stats.record(ExitReason::Other);
                Step::Fault("KVM internal error (KVM_EXIT_INTERNAL_ERROR)".into())
            }
            other => {
                stats.record(ExitReason::Other);
                Step::Fault(format!("unhandled exit {other:?}"))
            }
        }
    }

    fn step_for(stats: &mut ExitStats, action: BusAction) -> Step {
        match action {
            BusAction::Continue => Step::Continue,
            BusAction::Exit(code) => Step::Exit(code),
            BusAction::Marker(v) => Step::Marker(v),
            BusAction::Counted(event) => {
                stats.record_event(event);
                Step::Continue
            }
        }
    }

    /// Services one hypercall with argument registers `call`.
    pub fn hypercall(&mut self, call: &Regs) -> Outcome {
        self.with_context(|ctx, stats| hypercall::dispatch(ctx, call, stats))
    }

    /// Goes on with a hypercall that came back [`Outcome::Interrupted`] (not counted again).
    pub fn resume_hypercall(&mut self, request: Request) -> Outcome {
        self.with_context(|ctx, stats| hypercall::service(ctx, request, stats))
    }

    fn with_context(
        &mut self,
        f: impl FnOnce(&mut Context<'_>, &mut ExitStats) -> Outcome,
    ) -> Outcome {
        let mut pool = lock(&self.pool);
        let mut ctx = Context {
            ram: &self.ram,
            console: &self.console,
            clock: &self.clock,
            pool: &mut pool,
            events: &mut self.events,
            protected_end: self.protected_end,
            free_report: &mut self.free_report,
            features: self.offer.features(),
        };
        f(&mut ctx, &mut self.stats)
    }

    /// `hlt` with interrupts enabled (`interrupts_enabled`): waits for the next timer tick or
    /// event and says which interrupt to raise. A guest that halts with interrupts disabled,
    /// or with nothing that could ever wake it, is stuck for good. A stop or pause request
    /// ends the wait early ([`Halt::Interrupted`]): the guest is still halted.
    pub fn halt(&mut self, interrupts_enabled: bool) -> Halt {
        if !interrupts_enabled {
            return Halt::Fault(
                "halted (KVM_EXIT_HLT) with interrupts disabled: nothing can wake it".into(),
            );
        }
        let tick = lock(&self.devices.timer).next_due();
        let pending = self.events.drain();
        if pending > 0 {
            return Halt::Inject(EVENT_VECTOR);
        }
        // An active virtio device may complete a request at any time.
        let device_active = self.devices.virtio.iter().any(|d| lock(d).is_active());
        if tick.is_none() && lock(&self.devices.event).outstanding() == 0 && !device_active {
            return Halt::Fault(
                "halted (KVM_EXIT_HLT) with no timer running, no event outstanding and no \
                 active device"
                    .into(),
            );
        }
        let timeout = tick.map(|t| t.saturating_duration_since(Instant::now()));
        match self.events.wait(timeout) {
            Woken::Events(_) => Halt::Inject(EVENT_VECTOR),
            Woken::Interrupted => Halt::Interrupted,
            Woken::Timeout => {
                lock(&self.devices.timer).ack(Instant::now());
                Halt::Inject(TIMER_VECTOR)
            }
        }
    }

    /// Forgets interrupts of the event queue's waits that nobody consumed (sent while the vCPU
    /// was on its way to a pause).
    pub fn clear_wait_interrupts(&self) {
        self.events.clear_interrupts();
    }

    /// Makes KVM drop its shadow page tables if a pool update could have left them stale.
    pub fn resync_pool(&mut self, vm: &VmFd) -> Result<()> {
        if lock(&self.pool).resync(vm, POOL_SLOT)? {
            self.stats.record_event("shadow_resync");
        }
        Ok(())
    }

    /// Pauses every virtio window: its worker stops at a batch boundary and no device touches
    /// guest memory until [`Machine::resume_devices`].
    pub fn pause_devices(&mut self) {
        for w in &self.devices.virtio {
            lock(w).pause();
        }
    }

    /// Moves the guest's clock (`clock_ns`) `ns` forward: a restored vCPU whose TSC KVM could
    /// not put back reads that far ahead, and the two clocks must keep their relation.
    pub fn advance_clock(&mut self, ns: u64) {
        self.clock.advance(ns);
    }

    /// The pages the guest reports free now ([`Machine::free_ranges`]), one bit per page.
    pub fn free_pages(&self) -> PageBits {
        let bits = PageBits::new(self.ram.size() / PAGE_SIZE);
        for &(gpa, len) in &self.free_ranges().ranges {
            for page in gpa / PAGE_SIZE..(gpa + len) / PAGE_SIZE {
                bits.set(page);
            }
        }
        bits
    }

    /// Restarts the virtio windows paused by [`Machine::pause_devices`]. A window whose device
    /// cannot restart asks the guest for a reset (`DEVICE_NEEDS_RESET`), as a broken device
    /// does.
    pub fn resume_devices(&mut self) {
        for w in &self.devices.virtio {
            // The error is recorded in the window (needs-reset); the guest sees it there.
            let _ = lock(w).resume();
        }
    }

    /// The machine's state as data (RAM contents excluded: they are saved as memory).
    pub fn save(&self) -> MachineState {
        MachineState {
            version: STATE_VERSION,
            ram: self.ram.save(),
            clock: self.clock.save(),
            events: self.events.save(),
            pool: lock(&self.pool).save(),
            uart: lock(&self.devices.uart).save(),
            null: lock(&self.devices.null).save(),
            timer: lock(&self.devices.timer).save(),
            event_device: lock(&self.devices.event).save(),
            virtio: self
                .devices
                .virtio
                .iter()
                .map(|w| lock(w).save_state())
                .collect(),
            free_report: self.free_report.save(),
        }
    }

    /// Loads a saved state into this freshly built machine (same configuration). Restore guest
    /// RAM's bytes first: restored virtio devices that were running restart at once and read
    /// their rings. What can be compared up front (version, RAM size, device list) is checked
    /// before anything changes; a device that refuses its state leaves the machine to be
    /// discarded (it has not run).
    pub fn restore(&mut self, state: &MachineState) -> std::result::Result<(), StateError> {
        check_version(state.version)?;
        if state.ram.size != self.ram.size() {
            return Err(StateError::mismatch(
                "machine",
                format!(
                    "saved with {} bytes of RAM, this VM has {}",
                    state.ram.size,
                    self.ram.size()
                ),
            ));
        }
        if state.virtio.len() != self.devices.virtio.len() {
            return Err(StateError::mismatch(
                "machine",
                format!(
                    "saved with {} virtio devices, this VM has {}",
                    state.virtio.len(),
                    self.devices.virtio.len()
                ),
            ));
        }
        self.ram.restore(&state.ram)?;
        lock(&self.pool).restore(&state.pool)?;
        self.clock.restore(&state.clock)?;
        self.events.restore(&state.events)?;
        lock(&self.devices.uart).restore(&state.uart)?;
        lock(&self.devices.null).restore(&state.null)?;
        lock(&self.devices.timer).restore(&state.timer)?;
        lock(&self.devices.event).restore(&state.event_device)?;
        for (window, saved) in self.devices.virtio.iter().zip(&state.virtio) {
            lock(window).restore_state(saved)?;
        }
        self.free_report.restore(&state.free_report)?;
        Ok(())
    }
}

/// A [`Machine`]'s state: versioned, typed, serde-serializable.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MachineState {
    /// [`STATE_VERSION`] of the writer.
    pub version: u32,
    /// Guest RAM: its size (restore refuses another) and the ranges queued for preparing; the
    /// RAM's bytes are saved as memory, not here.
    pub ram: GuestRamState,
    /// The guest clock.
    pub clock: ClockState,
    /// The event queue.
    pub events: EventQueueState,
    /// The page-table pool: frame types, reference counts and the tables themselves.
    pub pool: crate::mmu::state::PageTablePoolState,
    /// COM1.
    pub uart: UartState,
    /// The null device.
    pub null: crate::devices::debug::NullState,
    /// The periodic timer.
    pub timer: TimerState,
    /// The event device.
    pub event_device: EventDeviceState,
    /// The virtio device windows, window `n` at index `n`.
    pub virtio: Vec<MmioDeviceState>,
    /// The guest's free-list registration (v1.8; absent in older states: unregistered).
    #[serde(default)]
    pub free_report: FreeReportState,
}

#[cfg(test)]
mod tests;
