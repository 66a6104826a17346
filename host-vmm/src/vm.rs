//! A built VM and its run: the KVM handles, the [`Vcpu`], the [`Machine`], and the loop that
//! joins them.
//!
//! Build one with [`crate::builder::build`]. [`Vm::run`] enters the guest until it exits or
//! is stopped; each exit goes to [`Machine::handle_exit`], and what that asks for (a
//! hypercall, a `hlt`, a marker, the end) is done here.

use std::time::{Duration, Instant};

use hypercall_abi::Regs;
use kvm_ioctls::{Kvm, VmFd};

use crate::dirty::DirtyLog;
use crate::error::{Error, Result};
use crate::hypercall::Outcome;
use crate::kernel_abi::Offer;
use crate::loader::ElfInfo;
use crate::machine::{Halt, Machine, MachineState, Step};
use crate::memory::{PageBits, RamView};
use crate::metrics::ExitStats;
use crate::state::StateError;
use crate::stop::{StopReason, Stopper};
use crate::sync::lock;
use crate::vcpu::{ControlError, MidExit, Vcpu, VcpuHandle};

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
    /// Captured console output.
    pub console: Vec<u8>,
    /// Wall time from first entry to exit.
    pub wall_ns: u64,
    /// Writes the trapped null device saw.
    pub null_writes: u64,
    /// `CLOCK_MONOTONIC` ([`crate::rusage::monotonic_ns`]) when the guest was first entered
    /// (0 if it never was): for a restored VM, when its next instruction ran.
    pub first_entry_mono_ns: u64,
}

/// Watches a run from the vCPU thread. [`Vm::run_observed`] calls it for every marker the
/// guest writes (the marker port, `MARKER_PORT`), between two exits; a benchmark harness uses
/// it to measure what happened between two markers (see `crate::compare`).
pub trait RunObserver: Send {
    /// The guest wrote `value` to the marker port; `machine` is the VM's state now.
    fn marker(&mut self, value: u32, machine: &Machine);
}

/// An observer that ignores markers.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoObserver;

impl RunObserver for NoObserver {
    fn marker(&mut self, _value: u32, _machine: &Machine) {}
}

/// A built VM, ready to run. Field order matters: the vCPU and VM fds are dropped before
/// the guest memory they reference (owned by the machine).
#[derive(Debug)]
pub struct Vm {
    vcpu: Vcpu,
    vm_fd: VmFd,
    _kvm: Kvm,
    machine: Machine,
    stop: Stopper,
    timeout: Option<Duration>,
    kernel: ElfInfo,
    seccomp: bool,
    /// An exit to finish before the first entry ([`Vm::restore`] of a state saved inside one).
    pending: Option<MidExit>,
    /// `CLOCK_MONOTONIC` at the first `KVM_RUN` (0 before it).
    first_entry_mono_ns: u64,
    /// The gdb stub's end of the run loop, when one is attached ([`Vm::attach_debugger`]).
    debugger: Option<crate::gdb::VcpuLink>,
}

/// Controls a running [`Vm`] from another thread: pause it at an exit boundary, inspect it,
/// save its state, resume it.
#[derive(Debug, Clone)]
pub struct VmHandle {
    vcpu: VcpuHandle,
    ram: RamView,
}

impl VmHandle {
    /// The vCPU's handle (registers, pause, resume).
    pub fn vcpu(&self) -> &VcpuHandle {
        &self.vcpu
    }

    /// Guest RAM, for reading it from this thread.
    pub fn ram(&self) -> &RamView {
        &self.ram
    }

    /// Takes the vCPU's and the machine's state of the paused VM (pause first) and keeps its
    /// devices paused, so that nothing but this thread touches guest RAM until the returned
    /// [`Frozen`] is dropped (which restarts them). Read RAM through [`VmHandle::ram`] then.
    pub fn freeze(&self) -> std::result::Result<Frozen<'_>, ControlError> {
        let vcpu = self.vcpu.save_state()?;
        let (machine, free) = self.vcpu.with_parked(|machine: &mut Machine| {
            machine.pause_devices();
            (machine.save(), machine.free_pages())
        })?;
        Ok(Frozen {
            handle: self,
            state: Some((vcpu, machine)),
            free,
            resume_devices: true,
        })
    }

    /// The whole VM now, with a copy of guest RAM (pause first). A freshly built VM of the
    /// same configuration continues from it ([`Vm::restore`]).
    pub fn save(&self) -> std::result::Result<VmSnapshot, ControlError> {
        let frozen = self.freeze()?;
        let mut ram = vec![0u8; self.ram.size() as usize];
        self.ram.read(0, &mut ram)?;
        let (vcpu, machine) = frozen.into_state();
        Ok(VmSnapshot { vcpu, machine, ram })
    }

    /// The machine's state now ([`Machine::save`]), taken on the vCPU thread while it is
    /// parked: pause first ([`VcpuHandle::pause`]). The virtio windows are paused around the
    /// save, so every queue position is at a batch boundary and no device writes guest memory
    /// while it is read.
    pub fn save_machine(&self) -> std::result::Result<MachineState, ControlError> {
        self.vcpu.with_parked(|machine: &mut Machine| {
            machine.pause_devices();
            let state = machine.save();
            machine.resume_devices();
            state
        })
    }
}

/// A paused VM's state with its devices held still ([`VmHandle::freeze`]); dropping it
/// restarts the devices (the vCPU stays paused).
#[derive(Debug)]
pub struct Frozen<'a> {
    handle: &'a VmHandle,
    /// The vCPU and the machine (`None` only inside `into_state`).
    state: Option<(crate::vcpu::VcpuState, MachineState)>,
    /// The pages the guest reported free (their contents do not matter).
    pub free: PageBits,
    resume_devices: bool,
}

impl Frozen<'_> {
    /// Drops the state and leaves the devices still: for a VM that must not go on (it was
    /// migrated); stop it next.
    pub fn keep_devices_paused(mut self) {
        self.resume_devices = false;
    }

    /// The vCPU's state.
    pub fn vcpu(&self) -> &crate::vcpu::VcpuState {
        &self
            .state
            .as_ref()
            .expect("state taken only on the way out")
            .0
    }

    /// The machine's state.
    pub fn machine(&self) -> &MachineState {
        &self
            .state
            .as_ref()
            .expect("state taken only on the way out")
            .1
    }

    /// The vCPU's and the machine's state; the devices restart.
    pub fn into_state(mut self) -> (crate::vcpu::VcpuState, MachineState) {
        self.state.take().expect("state taken only once")
    }
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        if !self.resume_devices {
            return;
        }
        // The vCPU is still parked (only a stop ends the park, and then nothing runs again).
        let _ = self
            .handle
            .vcpu
            .with_parked(|machine: &mut Machine| machine.resume_devices());
    }
}

/// A whole VM at one exit boundary ([`VmHandle::save`]): what [`Vm::restore`] needs to continue
/// it in another VM of the same configuration.
#[derive(Debug)]
pub struct VmSnapshot {
    /// The vCPU.
    pub vcpu: crate::vcpu::VcpuState,
    /// Devices and host-side state.
    pub machine: MachineState,
    /// Guest RAM, byte for byte.
    pub ram: Vec<u8>,
}

fn restore_error(e: StateError) -> Error {
    Error::Io {
        what: "cannot restore the VM".into(),
        source: std::io::Error::other(e),
    }
}

/// How a run ended without a VMM error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The guest exited with this code.
    Exit(u32),
    /// A stop was requested (timeout, signal) and the loop stopped at an exit boundary.
    Stopped(StopReason),
}

impl Vm {
    /// Assembles a VM from the parts [`crate::builder`] made.
    pub(crate) fn from_parts(
        kvm: Kvm,
        vm_fd: VmFd,
        vcpu: Vcpu,
        machine: Machine,
        stop: Stopper,
        timeout: Option<Duration>,
        kernel: ElfInfo,
    ) -> Vm {
        Vm {
            vcpu,
            vm_fd,
            _kvm: kvm,
            machine,
            stop,
            timeout,
            kernel,
            seccomp: true,
            pending: None,
            first_entry_mono_ns: 0,
            debugger: None,
        }
    }

    /// Lets a gdb stub control the run ([`crate::gdb::GdbServer::start`] calls it): debug exits
    /// and faults then stop in the debugger, and the guest's end is reported to it.
    pub(crate) fn attach_debugger(&mut self, link: crate::gdb::VcpuLink) {
        self.debugger = Some(link);
    }

    /// Whether [`Vm::run`] sandboxes its threads ([`crate::config::VmConfig::seccomp`]).
    pub(crate) fn with_seccomp(mut self, on: bool) -> Vm {
        self.seccomp = on;
        self
    }

    /// A handle that stops this VM's run from another thread (see [`Stopper::stop`]). Take it
    /// before calling [`Vm::run`], which consumes the VM.
    pub fn stopper(&self) -> Stopper {
        self.stop.clone()
    }

    /// A handle that pauses the vCPU, reads and writes its registers and resumes it, from
    /// another thread (see [`VcpuHandle`]). Take it before calling [`Vm::run`].
    pub fn vcpu_handle(&self) -> VcpuHandle {
        self.vcpu.handle(self.stop.clone())
    }

    /// A handle that pauses the running VM and saves its machine state from another thread
    /// (see [`VmHandle`]). Take it before calling [`Vm::run`].
    pub fn handle(&self) -> VmHandle {
        VmHandle {
            vcpu: self.vcpu_handle(),
            ram: self.machine.ram().view(),
        }
    }

    /// KVM's dirty log of guest RAM ([`DirtyLog`]), off until started. Take it before
    /// calling [`Vm::run`].
    pub fn dirty_log(&self) -> Result<DirtyLog> {
        DirtyLog::new(&self.vm_fd, self.machine.ram().slot())
    }

    /// Where the kernel was loaded.
    pub fn kernel(&self) -> &ElfInfo {
        &self.kernel
    }

    /// What the guest is shown: pvkit with its feature bits, or nothing (and why).
    pub fn offer(&self) -> Offer {
        self.machine.offer()
    }

    /// The host-side state (devices, clock, events): see [`Machine::save`].
    pub fn machine(&self) -> &Machine {
        &self.machine
    }

    /// Loads a saved machine state into this freshly built VM.
    pub fn restore_machine(&mut self, state: &MachineState) -> std::result::Result<(), StateError> {
        self.machine.restore(state)
    }

    /// Makes this freshly built VM (same configuration) continue where `saved` was taken: guest
    /// RAM first (restored virtio devices read their rings at once), then the machine, then
    /// the vCPU. Checks what it can before changing anything: the RAM size and the versions.
    pub fn restore(&mut self, saved: &VmSnapshot) -> Result<()> {
        let size = self.machine.ram().size();
        if saved.ram.len() as u64 != size {
            return Err(Error::Unsupported(
                "restoring a VM: the snapshot's RAM size differs from this VM's",
            ));
        }
        self.check_restorable(&saved.machine)?;
        vm_memory::Bytes::write_slice(
            self.machine.ram().mem(),
            &saved.ram,
            vm_memory::GuestAddress(0),
        )
        .map_err(|e| Error::GuestMemory(e.to_string()))?;
        self.restore_state(&saved.vcpu, &saved.machine)
    }

    /// As [`Vm::restore`], with guest RAM mapped from a memory file instead of copied
    /// ([`GuestRam::map_memory_file`](crate::memory::GuestRam::map_memory_file)): `file` is
    /// RAM-sized and holds data for the pages set in `data`.
    pub fn restore_mapped(
        &mut self,
        file: &std::fs::File,
        data: PageBits,
        vcpu: &crate::vcpu::VcpuState,
        machine: &MachineState,
    ) -> Result<()> {
        self.check_restorable(machine)?;
        self.machine.ram().map_memory_file(file, data)?;
        self.restore_state(vcpu, machine)
    }

    /// As [`Vm::restore`], with guest RAM already filled in ([`Vm::write_ram`]).
    pub fn restore_received(
        &mut self,
        vcpu: &crate::vcpu::VcpuState,
        machine: &MachineState,
    ) -> Result<()> {
        self.check_restorable(machine)?;
        self.restore_state(vcpu, machine)
    }

    /// Makes `[gpa, gpa + len)` of guest RAM zero (page-aligned, inside RAM).
    pub fn zero_ram(&mut self, gpa: u64, len: u64) -> Result<()> {
        self.machine
            .ram()
            .discard(gpa, len)
            .map_err(|e| Error::GuestMemory(format!("cannot zero {len:#x} bytes at {gpa:#x}: {e}")))
    }

    /// Writes `data` into guest RAM at `gpa` (inside RAM).
    pub fn write_ram(&mut self, gpa: u64, data: &[u8]) -> Result<()> {
        self.machine
            .ram()
            .checked_range(gpa, data.len() as u64)
            .ok_or_else(|| {
                Error::GuestMemory(format!("{:#x} bytes at {gpa:#x} leave RAM", data.len()))
            })?;
        vm_memory::Bytes::write_slice(self.machine.ram().mem(), data, vm_memory::GuestAddress(gpa))
            .map_err(|e| Error::GuestMemory(e.to_string()))
    }

    fn check_restorable(&self, machine: &MachineState) -> Result<()> {
        if machine.ram.size != self.machine.ram().size() {
            return Err(Error::Unsupported(
                "restoring a VM: the snapshot's RAM size differs from this VM's",
            ));
        }
        crate::state::check_version(machine.version).map_err(restore_error)
    }

    /// The machine, then the vCPU (RAM is in place).
    fn restore_state(
        &mut self,
        vcpu: &crate::vcpu::VcpuState,
        machine: &MachineState,
    ) -> Result<()> {
        self.machine.restore(machine).map_err(restore_error)?;
        let tsc_ahead_ns = self.vcpu.restore_state(vcpu)?;
        // Where KVM could not put the TSC back, the guest's clock moves on with it.
        self.machine.advance_clock(tsc_ahead_ns);
        self.pending = vcpu.pending;
        Ok(())
    }

    /// Runs the guest until it exits (or faults), or until it is stopped: by the configured
    /// timeout or through a [`Stopper`]. A stopped run is not an error; its report says why.
    pub fn run(self) -> Result<RunReport> {
        self.run_observed(&mut NoObserver)
    }

    /// [`Vm::run`], calling `observer` at every marker.
    ///
    /// With [`crate::config::VmConfig::seccomp`] on (the default), the loop (and `observer`)
    /// runs on a `pvkit-vcpu` thread under the vCPU's seccomp filter, started and joined here;
    /// the calling thread itself is never filtered (see [`crate::sandbox`]).
    pub fn run_observed(mut self, observer: &mut dyn RunObserver) -> Result<RunReport> {
        let start = Instant::now();
        let stopper = self.stop.clone();
        let (timeout, seccomp) = (self.timeout, self.seccomp);
        let run = std::thread::scope(|s| {
            let timer = timeout.map(|t| {
                // Waits for the deadline or the end of the run, whichever is first; joined
                // below (by its handle: the thread itself has ended, not only its closure),
                // so it never outlives the run.
                std::thread::Builder::new()
                    .name("pvkit-timeout".into())
                    .spawn_scoped(s, move || {
                        crate::sandbox::enter(crate::sandbox::ThreadKind::Timeout, seccomp);
                        stopper.stop_at(start.checked_add(t), StopReason::Timeout(t))
                    })
                    .map_err(|source| Error::Io {
                        what: "cannot start the timeout thread".into(),
                        source,
                    })
            });
            let timer = timer.transpose()?;
            // On its own sandboxed thread unless seccomp is off (see `crate::sandbox`).
            let vm = &mut self;
            let run = crate::sandbox::run_vcpu(s, seccomp, move || {
                let _slack = TimerSlack::precise();
                // While this lives, a stop request kicks this thread out of KVM_RUN.
                let stop = vm.stop.clone();
                let _running = stop.running();
                vm.run_loop(observer)
            });
            if let Some(Err(panic)) = timer.map(|t| t.join()) {
                std::panic::resume_unwind(panic);
            }
            run
        });
        self.machine.console().flush();
        let end = run?;
        let (exit_code, stopped) = match end {
            End::Exit(code) => (code, None),
            End::Stopped(r) => (u32::from(r.exit_status()), Some(r)),
        };
        let null_writes = lock(&self.machine.devices().null).writes();
        Ok(RunReport {
            exit_code,
            stopped,
            stats: self.machine.stats().clone(),
            console: self.machine.console().captured(),
            wall_ns: start.elapsed().as_nanos() as u64,
            null_writes,
            first_entry_mono_ns: self.first_entry_mono_ns,
        })
    }

    /// Enters the guest, routes each exit, until the guest exits or a stop is requested.
    fn run_loop(&mut self, observer: &mut dyn RunObserver) -> Result<End> {
        // A restored VM first finishes the exit its original was parked inside of.
        let first = match self.pending.take() {
            Some(MidExit::Hypercall { nr, args }) => Some(self.hypercall_with(Regs { nr, args })?),
            Some(MidExit::Halt) => Some(self.halt()?),
            None => None,
        };
        match first {
            Some(Step::Exit(code)) => return Ok(End::Exit(code)),
            Some(Step::Fault(what)) => {
                return Err(Error::GuestFault {
                    what,
                    rip: self.vcpu.rip(),
                    exits: self.machine.stats().total,
                });
            }
            _ => {}
        }
        loop {
            // Before every entry: a stop requested while the guest ran kicked it out of
            // KVM_RUN (EINTR) or woke its idle wait, and ends the run here; a pause parks
            // here until resumed.
            self.pause_point();
            if let Some(reason) = self.stop.requested() {
                return Ok(End::Stopped(reason));
            }
            if let Some(debugger) = &mut self.debugger {
                // Resumed after a fault the debugger stopped at: the run ends with it.
                if let Some(what) = debugger.take_fault() {
                    return Err(Error::GuestFault {
                        what,
                        rip: self.vcpu.rip(),
                        exits: self.machine.stats().total,
                    });
                }
                debugger.before_entry(&self.vcpu)?;
            }
            if self.first_entry_mono_ns == 0 {
                self.first_entry_mono_ns = crate::rusage::monotonic_ns();
            }
            let exit = self.vcpu.run()?;
            // A kick ran no guest instruction (for a debugger's single-step).
            let kicked = matches!(exit, kvm_ioctls::VcpuExit::Intr);
            let step = self.machine.handle_exit(exit);
            let step = match step {
                Step::Hypercall => self.hypercall()?,
                Step::Halt => self.halt()?,
                other => other,
            };
            self.machine.resync_pool(&self.vm_fd)?;
            match step {
                Step::Continue | Step::Hypercall | Step::Halt => {
                    if let Some(debugger) = &mut self.debugger
                        && !kicked
                        && debugger.stepping()
                    {
                        debugger.stepped_over_exit(&mut self.vcpu)?;
                    }
                }
                Step::Exit(code) => {
                    if let Some(debugger) = &self.debugger {
                        debugger.exited(code);
                    }
                    return Ok(End::Exit(code));
                }
                Step::Marker(value) => observer.marker(value, &self.machine),
                // Stops in the debugger (parks at the next pause point); without one, a
                // debug exit (none is asked for) is ignored.
                Step::Debug(exit) => {
                    if let Some(debugger) = &mut self.debugger {
                        debugger.stopped(crate::gdb::StopEvent::Debug(exit));
                    }
                }
                Step::Fault(what) if self.debugger.is_some() => {
                    if let Some(debugger) = &mut self.debugger {
                        debugger.fault(what);
                    }
                }
                Step::Fault(what) => {
                    return Err(Error::GuestFault {
                        what,
                        rip: self.vcpu.rip(),
                        exits: self.machine.stats().total,
                    });
                }
            }
        }
    }

    /// Parks here if a pause is requested, until resumed or stopped; then forgets the
    /// interrupts sent to bring the vCPU here.
    fn pause_point(&mut self) {
        let stop = &self.stop;
        if self
            .vcpu
            .pause_point(&mut self.machine, || stop.requested().is_some())
        {
            self.machine.clear_wait_interrupts();
        }
    }

    /// Reads the argument registers, dispatches, and writes `rax`/`rdx` back. A call whose
    /// host-side wait a stop or pause cut short is run again after the pause: the guest never
    /// sees the pause.
    fn hypercall(&mut self) -> Result<Step> {
        let regs = self.vcpu.regs()?;
        let call = Regs {
            nr: regs.rax,
            args: [regs.rdi, regs.rsi, regs.rcx, regs.r8],
        };
        self.hypercall_with(call)
    }

    fn hypercall_with(&mut self, call: Regs) -> Result<Step> {
        let mut outcome = self.machine.hypercall(&call);
        loop {
            match outcome {
                Outcome::Exit(code) => return Ok(Step::Exit(code)),
                Outcome::Return(ret) => {
                    self.vcpu.set_return(ret.status, ret.value)?;
                    return Ok(Step::Continue);
                }
                // Stopping: the run ends before the guest runs again.
                Outcome::Interrupted(_) if self.stop.requested().is_some() => {
                    return Ok(Step::Continue);
                }
                Outcome::Interrupted(request) => {
                    self.vcpu.set_mid_exit(Some(MidExit::Hypercall {
                        nr: call.nr,
                        args: call.args,
                    }));
                    self.pause_point();
                    self.vcpu.set_mid_exit(None);
                    outcome = self.machine.resume_hypercall(request);
                }
            }
        }
    }

    /// `hlt`: wait for the next timer tick or event and raise its interrupt; a wait that a
    /// pause cut short goes on after it.
    fn halt(&mut self) -> Result<Step> {
        let enabled = self.vcpu.interrupts_enabled();
        loop {
            match self.machine.halt(enabled) {
                Halt::Inject(vector) => {
                    self.vcpu.inject_interrupt(vector)?;
                    return Ok(Step::Continue);
                }
                Halt::Fault(what) => return Ok(Step::Fault(what)),
                Halt::Interrupted if self.stop.requested().is_some() => {
                    return Ok(Step::Continue);
                }
                Halt::Interrupted => {
                    self.vcpu.set_mid_exit(Some(MidExit::Halt));
                    self.pause_point();
                    self.vcpu.set_mid_exit(None);
                }
            }
        }
    }
}

/// The vCPU thread parks in timed waits (`idle_yield`, `hlt`); Linux's default 50 µs timer
/// slack would add up to that much to every wake-up. Use 1 ns while the guest runs, and
/// restore the thread's setting afterwards.
struct TimerSlack(libc::c_ulong);

impl TimerSlack {
    fn precise() -> TimerSlack {
        // SAFETY: PR_GET/SET_TIMERSLACK only read or set a number of the calling thread.
        let old = unsafe { libc::prctl(libc::PR_GET_TIMERSLACK) };
        // SAFETY: as above.
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
        TimerSlack(old.max(1) as libc::c_ulong)
    }
}

impl Drop for TimerSlack {
    fn drop(&mut self) {
        // SAFETY: sets a number of the calling thread (the one that created this guard).
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, self.0) };
    }
}
