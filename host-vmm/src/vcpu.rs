//! A vCPU: its KVM fd, its run area and sync registers, and a handle that pauses it from
//! another thread.
//!
//! [`Vcpu`] knows nothing about devices or hypercalls: it enters the guest, hands back the
//! exit, reads and writes registers and queues interrupts. The VM's run loop
//! ([`crate::vm::Vm::run`]) owns it and decides what each exit means.
//!
//! # Pausing
//!
//! A [`VcpuHandle`] (cloneable, any thread) asks the vCPU to stop at its next exit boundary:
//! [`VcpuHandle::pause`] raises a flag and kicks the thread out of `KVM_RUN` (and out of any
//! idle wait) the way a stop request does ([`crate::stop`]); the run loop sees the flag between
//! two exits, parks, and serves register reads and writes for the handle until
//! [`VcpuHandle::resume`]. While parked the guest is exactly at an instruction boundary with
//! every exit fully handled, which is where a debugger, a snapshot or a migration needs it.

use std::any::Any;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_regs, kvm_sregs};
use kvm_ioctls::{SyncReg, VcpuExit, VcpuFd};

use crate::error::{Error, Result};
use crate::stop::{KICK_INTERVAL, RunPhase, Stopper};
use crate::sync::{lock, wait_timeout};

/// One vCPU.
#[derive(Debug)]
pub struct Vcpu {
    fd: VcpuFd,
    /// KVM copies the general registers into the run area on every exit (KVM_CAP_SYNC_REGS),
    /// so a hypercall costs no `KVM_GET_REGS`/`KVM_SET_REGS`.
    sync_regs: bool,
    /// KVM has entered at least once, so the run area holds the registers (with sync
    /// registers on). Before that, registers go through the ioctls.
    entered: bool,
    control: Arc<Control>,
}

impl Vcpu {
    /// Wraps a created vCPU fd; enables sync registers if KVM has them.
    pub fn new(fd: VcpuFd, sync_regs: bool) -> Vcpu {
        let mut vcpu = Vcpu {
            fd,
            sync_regs,
            entered: false,
            control: Arc::default(),
        };
        if sync_regs {
            vcpu.fd.set_sync_valid_reg(SyncReg::Register);
        }
        vcpu
    }

    /// The KVM fd, for configuration before the first run.
    pub(crate) fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Enters the guest until the next exit. `EINTR`/`EAGAIN` (a kick) come back as
    /// `VcpuExit::Intr`.
    pub fn run(&mut self) -> Result<VcpuExit<'_>> {
        // KVM stores the sync registers on every return from KVM_RUN, interrupted or not.
        self.entered = true;
        match self.fd.run() {
            Ok(exit) => Ok(exit),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(VcpuExit::Intr),
            Err(source) => Err(Error::Kvm {
                op: "run vCPU",
                source,
            }),
        }
    }

    /// The general registers: from the run area after an exit when sync registers are on,
    /// else with `KVM_GET_REGS`.
    pub fn regs(&mut self) -> Result<kvm_regs> {
        if self.sync_regs && self.entered {
            Ok(self.fd.sync_regs().regs)
        } else {
            self.fd.get_regs().map_err(Error::kvm("get regs"))
        }
    }

    /// Sets the general registers (loaded on the next entry).
    pub fn set_regs(&mut self, regs: &kvm_regs) -> Result<()> {
        if self.sync_regs && self.entered {
            self.fd.sync_regs_mut().regs = *regs;
            self.fd.set_sync_dirty_reg(SyncReg::Register);
            Ok(())
        } else {
            self.fd.set_regs(regs).map_err(Error::kvm("set regs"))
        }
    }

    /// Sets only `rax` and `rdx` (a hypercall's return registers).
    pub fn set_return(&mut self, rax: u64, rdx: u64) -> Result<()> {
        if self.sync_regs && self.entered {
            let regs = &mut self.fd.sync_regs_mut().regs;
            regs.rax = rax;
            regs.rdx = rdx;
            self.fd.set_sync_dirty_reg(SyncReg::Register);
            Ok(())
        } else {
            let mut regs = self.fd.get_regs().map_err(Error::kvm("get regs"))?;
            regs.rax = rax;
            regs.rdx = rdx;
            self.fd.set_regs(&regs).map_err(Error::kvm("set regs"))
        }
    }

    /// The special registers.
    pub fn sregs(&self) -> Result<kvm_sregs> {
        self.fd.get_sregs().map_err(Error::kvm("get sregs"))
    }

    /// Sets the special registers.
    pub fn set_sregs(&mut self, sregs: &kvm_sregs) -> Result<()> {
        self.fd.set_sregs(sregs).map_err(Error::kvm("set sregs"))
    }

    /// The guest instruction pointer now (0 if KVM cannot say).
    pub fn rip(&mut self) -> u64 {
        self.regs().map(|r| r.rip).unwrap_or(0)
    }

    /// Whether the guest had interrupts enabled at the last exit (`RFLAGS.IF`).
    pub fn interrupts_enabled(&mut self) -> bool {
        self.fd.get_kvm_run().if_flag != 0
    }

    /// Queues external interrupt `vector` for the next entry.
    pub fn inject_interrupt(&self, vector: u8) -> Result<()> {
        inject_interrupt(&self.fd, vector)
    }

    /// A handle that pauses this vCPU from another thread. `stopper` is the VM's: it knows
    /// the vCPU thread and kicks it.
    pub fn handle(&self, stopper: Stopper) -> VcpuHandle {
        VcpuHandle {
            control: self.control.clone(),
            stopper,
        }
    }

    /// The run loop's check between two exits: if a pause is requested, park here (serving
    /// register requests, and jobs on `context`, the run loop's state) until it is resumed or
    /// `stopping` returns true. Returns whether it parked.
    pub fn pause_point(&mut self, context: &mut dyn Any, stopping: impl Fn() -> bool) -> bool {
        if !self.control.pause.load(Ordering::Acquire) {
            return false;
        }
        let control = self.control.clone();
        let mut st = lock(&control.state);
        st.parked = true;
        control.changed.notify_all();
        while control.pause.load(Ordering::Acquire) && !stopping() {
            if let Some(req) = st.request.take() {
                // Served without the lock: a job may take its time, or use a handle itself.
                drop(st);
                let reply = self.serve(req, context);
                st = lock(&control.state);
                st.reply = Some(reply);
                control.changed.notify_all();
                continue;
            }
            st = wait_timeout(&control.changed, st, KICK_INTERVAL);
        }
        st.parked = false;
        control.changed.notify_all();
        true
    }

    fn serve(&mut self, req: Request, context: &mut dyn Any) -> Reply {
        match req {
            Request::Regs => Reply::Regs(self.regs()),
            Request::SetRegs(r) => Reply::Done(self.set_regs(&r)),
            Request::Sregs => Reply::Sregs(self.sregs()),
            Request::SetSregs(s) => Reply::Done(self.set_sregs(&s)),
            Request::Job(job) => Reply::Job(job(context)),
        }
    }
}

/// Why a [`VcpuHandle`] request failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The run has ended (or ends while waiting).
    #[error("the vCPU is not running any more")]
    Ended,
    /// The vCPU did not reach an exit boundary in time.
    #[error("the vCPU did not pause within {0:?}")]
    Timeout(Duration),
    /// Registers can only be read or written while paused.
    #[error("the vCPU is not paused")]
    NotPaused,
    /// KVM refused the register access.
    #[error(transparent)]
    Vmm(#[from] Error),
    /// A job asked for another kind of run-loop state than the loop has.
    #[error("the vCPU's run loop does not hold the state this request needs")]
    WrongContext,
}

/// Work done on the parked vCPU thread with the run loop's state.
type Job = Box<dyn FnOnce(&mut dyn Any) -> Box<dyn Any + Send> + Send>;

enum Request {
    Regs,
    SetRegs(kvm_regs),
    Sregs,
    SetSregs(kvm_sregs),
    Job(Job),
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Request::Regs => "Regs",
            Request::SetRegs(_) => "SetRegs",
            Request::Sregs => "Sregs",
            Request::SetSregs(_) => "SetSregs",
            Request::Job(_) => "Job",
        })
    }
}

#[derive(Debug)]
enum Reply {
    Regs(Result<kvm_regs>),
    Sregs(Result<kvm_sregs>),
    Done(Result<()>),
    Job(Box<dyn Any + Send>),
}

#[derive(Debug, Default)]
struct ControlState {
    /// The vCPU thread is parked at an exit boundary.
    parked: bool,
    request: Option<Request>,
    reply: Option<Reply>,
}

#[derive(Debug, Default)]
struct Control {
    /// A pause is requested; the loop's cheap check.
    pause: AtomicBool,
    state: Mutex<ControlState>,
    changed: Condvar,
    /// Held for the whole of one request, so handles on several threads take turns.
    calls: Mutex<()>,
}

/// Pauses, inspects and resumes a [`Vcpu`] from another thread.
#[derive(Debug, Clone)]
pub struct VcpuHandle {
    control: Arc<Control>,
    stopper: Stopper,
}

impl VcpuHandle {
    /// Stops the vCPU at its next exit boundary and returns once it is parked there
    /// ([`VcpuHandle::request_pause`] then [`VcpuHandle::wait_paused`]). A vCPU waiting in
    /// `idle_yield` or `hlt` is woken and parks inside that wait, which goes on after the
    /// resume: the guest never sees the pause.
    pub fn pause(&self, timeout: Duration) -> std::result::Result<(), ControlError> {
        self.request_pause();
        self.wait_paused(timeout)
    }

    /// Asks the vCPU to park at its next exit boundary and returns at once. Requested before
    /// the run starts, the vCPU parks before its first entry (at the kernel's entry point),
    /// which is where a debugger attaches.
    pub fn request_pause(&self) {
        self.control.pause.store(true, Ordering::Release);
    }

    /// Waits until the vCPU is parked (after [`VcpuHandle::request_pause`]), kicking it out of
    /// the guest or out of an idle wait as often as needed. Waits for the run to start if it
    /// has not.
    pub fn wait_paused(&self, timeout: Duration) -> std::result::Result<(), ControlError> {
        let deadline = Instant::now() + timeout;
        loop {
            if lock(&self.control.state).parked {
                return Ok(());
            }
            if !self.control.pause.load(Ordering::Acquire) {
                // Resumed by another handle before it parked.
                return Err(ControlError::NotPaused);
            }
            let phase = self.stopper.kick();
            if phase == RunPhase::Done {
                return Err(ControlError::Ended);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ControlError::Timeout(timeout));
            }
            let wait = KICK_INTERVAL.min(deadline - now);
            if phase == RunPhase::NotStarted {
                // Nothing to kick yet: it parks at its first check.
                self.stopper.wait_phase_change(RunPhase::NotStarted, wait);
            }
            let st = lock(&self.control.state);
            if !st.parked {
                drop(wait_timeout(&self.control.changed, st, wait));
            }
        }
    }

    /// Lets a paused vCPU run again.
    pub fn resume(&self) {
        self.control.pause.store(false, Ordering::Release);
        let _st = lock(&self.control.state);
        self.control.changed.notify_all();
    }

    /// Whether the vCPU is parked at an exit boundary now.
    pub fn is_paused(&self) -> bool {
        lock(&self.control.state).parked
    }

    /// The general registers of the paused vCPU.
    pub fn regs(&self) -> std::result::Result<kvm_regs, ControlError> {
        match self.call(Request::Regs)? {
            Reply::Regs(r) => Ok(r?),
            _ => unreachable!("a Regs request gets a Regs reply"),
        }
    }

    /// Sets the general registers of the paused vCPU.
    pub fn set_regs(&self, regs: &kvm_regs) -> std::result::Result<(), ControlError> {
        match self.call(Request::SetRegs(*regs))? {
            Reply::Done(r) => Ok(r?),
            _ => unreachable!("a SetRegs request gets a Done reply"),
        }
    }

    /// The special registers of the paused vCPU.
    pub fn sregs(&self) -> std::result::Result<kvm_sregs, ControlError> {
        match self.call(Request::Sregs)? {
            Reply::Sregs(r) => Ok(r?),
            _ => unreachable!("a Sregs request gets a Sregs reply"),
        }
    }

    /// Sets the special registers of the paused vCPU.
    pub fn set_sregs(&self, sregs: &kvm_sregs) -> std::result::Result<(), ControlError> {
        match self.call(Request::SetSregs(*sregs))? {
            Reply::Done(r) => Ok(r?),
            _ => unreachable!("a SetSregs request gets a Done reply"),
        }
    }

    /// Runs `job` on the parked vCPU thread with the run loop's state, which must be a `C`
    /// (the [`crate::vm::Vm`] run loop passes its [`crate::machine::Machine`]), and returns
    /// what it returns. The guest stays parked throughout.
    pub fn with_parked<C: 'static, T: Send + 'static>(
        &self,
        job: impl FnOnce(&mut C) -> T + Send + 'static,
    ) -> std::result::Result<T, ControlError> {
        let job: Job = Box::new(move |context: &mut dyn Any| -> Box<dyn Any + Send> {
            match context.downcast_mut::<C>() {
                Some(c) => Box::new(Some(job(c))),
                None => Box::new(None::<T>),
            }
        });
        match self.call(Request::Job(job))? {
            Reply::Job(out) => match out.downcast::<Option<T>>() {
                Ok(out) => out.ok_or(ControlError::WrongContext),
                Err(_) => Err(ControlError::WrongContext),
            },
            _ => unreachable!("a Job request gets a Job reply"),
        }
    }

    fn call(&self, req: Request) -> std::result::Result<Reply, ControlError> {
        let _turn = lock(&self.control.calls);
        let mut st = lock(&self.control.state);
        if !st.parked {
            return Err(ControlError::NotPaused);
        }
        st.reply = None;
        st.request = Some(req);
        self.control.changed.notify_all();
        loop {
            if let Some(reply) = st.reply.take() {
                return Ok(reply);
            }
            if !st.parked || self.stopper.phase() == RunPhase::Done {
                // Stopped (or resumed by another handle) before serving it, or the run ended
                // while serving it.
                st.request = None;
                return Err(ControlError::Ended);
            }
            st = wait_timeout(&self.control.changed, st, KICK_INTERVAL);
        }
    }
}

vmm_sys_util::ioctl_iow_nr!(
    KVM_INTERRUPT,
    kvm_bindings::KVMIO,
    0x86,
    kvm_bindings::kvm_interrupt
);

/// Queues external interrupt `vector` (KVM_INTERRUPT; kvm-ioctls has no wrapper for it).
fn inject_interrupt(vcpu: &VcpuFd, vector: u8) -> Result<()> {
    let irq = kvm_bindings::kvm_interrupt {
        irq: u32::from(vector),
    };
    // SAFETY: KVM_INTERRUPT reads one `kvm_interrupt` from the pointer we pass, which points at
    // a live, correctly typed value; `vcpu` is an open vCPU fd. The return value is checked.
    let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(vcpu, KVM_INTERRUPT(), &irq) };
    if ret < 0 {
        return Err(Error::Kvm {
            op: "inject interrupt",
            source: vmm_sys_util::errno::Error::last(),
        });
    }
    Ok(())
}
