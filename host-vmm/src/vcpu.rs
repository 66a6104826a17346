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

use kvm_bindings::{
    Msrs, kvm_debugregs, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{SyncReg, VcpuExit, VcpuFd};

use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iow_nr;

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
    /// The host's XSAVE state fits `kvm_xsave` ([`Vcpu::set_xsave_fits`]).
    xsave_fits: bool,
    /// Parked inside the handling of this exit ([`Vcpu::set_mid_exit`]).
    mid_exit: Option<MidExit>,
    control: Arc<Control>,
}

/// The exit a vCPU parked inside of ([`Vcpu::set_mid_exit`]): what a copy restored from its
/// state must finish before it runs the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum MidExit {
    /// A hypercall with these registers (`rax`, then `rdi`, `rsi`, `rcx`, `r8`) whose wait was
    /// cut short: the copy services it and writes its return registers.
    Hypercall {
        /// The call number.
        nr: u64,
        /// The argument registers.
        args: [u64; 4],
    },
    /// `hlt`: the copy waits for the next timer tick or event, as the original does.
    Halt,
}

/// The MSRs a vCPU state holds: the TSC, the SYSENTER and SYSCALL targets, the kernel GS base,
/// TSC_AUX and PAT (EFER is in the special registers). pvkit VMs have no local APIC or
/// kvmclock, so nothing else carries guest state.
pub const SAVED_MSRS: [u32; 11] = [
    0x10,        // IA32_TSC
    0x174,       // IA32_SYSENTER_CS
    0x175,       // IA32_SYSENTER_ESP
    0x176,       // IA32_SYSENTER_EIP
    0x277,       // IA32_PAT
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
];

ioctl_iow_nr!(
    KVM_HAS_DEVICE_ATTR,
    0xAE,
    0xe3,
    kvm_bindings::kvm_device_attr
);
ioctl_iow_nr!(
    KVM_SET_DEVICE_ATTR,
    0xAE,
    0xe1,
    kvm_bindings::kvm_device_attr
);

/// A vCPU's architectural state as data ([`Vcpu::save_state`]).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct VcpuState {
    /// [`crate::state::STATE_VERSION`] of the writer.
    pub version: u32,
    /// General registers.
    pub regs: kvm_regs,
    /// Special registers (segments, control registers, EFER, descriptor tables).
    pub sregs: kvm_sregs,
    /// FPU, SSE and AVX state.
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// Pending exceptions, interrupts, NMIs and the interrupt shadow.
    pub events: kvm_vcpu_events,
    /// The MSRs of [`SAVED_MSRS`] that KVM reported.
    pub msrs: Vec<kvm_msr_entry>,
    /// An exit the vCPU was parked inside of, which the copy must finish before it runs.
    pub pending: Option<MidExit>,
}

impl Vcpu {
    /// Wraps a created vCPU fd; enables sync registers if KVM has them.
    pub fn new(fd: VcpuFd, sync_regs: bool) -> Vcpu {
        let mut vcpu = Vcpu {
            fd,
            sync_regs,
            entered: false,
            xsave_fits: true,
            mid_exit: None,
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

    /// The XSAVE area (`KVM_GET_XSAVE`; its first 4 KiB), for the gdb stub's x87/SSE registers.
    pub fn xsave(&self) -> Result<Box<kvm_xsave>> {
        Ok(Box::new(
            self.fd.get_xsave().map_err(Error::kvm("get XSAVE"))?,
        ))
    }

    /// Sets the XSAVE area (`KVM_SET_XSAVE`), for the gdb stub's x87/SSE register writes.
    pub fn set_xsave(&mut self, xsave: &kvm_xsave) -> Result<()> {
        // SAFETY: `xsave` is a whole `kvm_xsave` read from this vCPU by `KVM_GET_XSAVE` (the
        // gdb stub changes only the legacy x87/SSE bytes of it), so its size is what the
        // kernel expects for this vCPU: the 4 KiB of `kvm_xsave` (`set_xsave_fits`).
        unsafe { self.fd.set_xsave(xsave) }.map_err(Error::kvm("set XSAVE"))
    }

    /// Sets KVM's guest debugging (`KVM_SET_GUEST_DEBUG`): breakpoints, debug registers and
    /// single-step, for the gdb stub ([`crate::gdb`]). Call it between two exits.
    pub fn set_guest_debug(&self, debug: &kvm_bindings::kvm_guest_debug) -> Result<()> {
        self.fd
            .set_guest_debug(debug)
            .map_err(Error::kvm("set guest debug"))
    }

    /// Tells the vCPU it parks inside the handling of an exit (a hypercall or `hlt` whose wait a
    /// pause cut short), or no longer. A state saved there records it ([`VcpuState::pending`]),
    /// so the copy finishes the call or the halt the original goes on with.
    pub fn set_mid_exit(&mut self, exit: Option<MidExit>) {
        self.mid_exit = exit;
    }

    /// Says whether the host's XSAVE area fits `kvm_xsave` (4 KiB; no AMX-sized state), which
    /// [`Vcpu::save_state`] and [`Vcpu::restore_state`] need.
    pub fn set_xsave_fits(&mut self, fits: bool) {
        self.xsave_fits = fits;
    }

    /// Lets KVM finish an exit's pending I/O (the data of a port or MMIO read goes into the
    /// guest's registers on the next `KVM_RUN`) without running the guest: `KVM_RUN` with
    /// `immediate_exit` set. Needed before the registers are read for a snapshot.
    pub(crate) fn complete_pending_io(&mut self) -> Result<()> {
        if !self.entered {
            return Ok(());
        }
        self.fd.set_kvm_immediate_exit(1);
        let r = self.fd.run().map(|_| ());
        self.fd.set_kvm_immediate_exit(0);
        match r {
            Ok(()) => Ok(()),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(()),
            Err(source) => Err(Error::Kvm {
                op: "complete pending I/O",
                source,
            }),
        }
    }

    /// The vCPU's whole architectural state, at an exit boundary (the vCPU parked): general and
    /// special registers, FPU/SSE/AVX state (XSAVE) and XCRs, debug registers, pending events
    /// and the MSRs of [`SAVED_MSRS`] (the TSC among them).
    pub fn save_state(&mut self) -> Result<VcpuState> {
        if !self.xsave_fits {
            return Err(Error::Unsupported(
                "saving the vCPU: this host's XSAVE state is larger than KVM_GET_XSAVE's 4 KiB",
            ));
        }
        // Let KVM finish the exit (port and MMIO reads, a hypercall's return registers, the
        // skip past the exiting instruction), so the registers are those after it. Inside an
        // exit (a hypercall or halt whose wait was cut short), what remains of it is recorded
        // as `pending` for the copy to finish.
        self.complete_pending_io()?;
        let regs = self.fd.get_regs().map_err(Error::kvm("get regs"))?;
        let mut msrs = Msrs::from_entries(
            &SAVED_MSRS
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect::<Vec<_>>(),
        )
        .map_err(|_| Error::Unsupported("saving the vCPU: too many MSRs"))?;
        let read = self
            .fd
            .get_msrs(&mut msrs)
            .map_err(Error::kvm("get MSRs"))?;
        Ok(VcpuState {
            version: crate::state::STATE_VERSION,
            regs,
            sregs: self.sregs()?,
            xsave: self.fd.get_xsave().map_err(Error::kvm("get XSAVE"))?,
            xcrs: self.fd.get_xcrs().map_err(Error::kvm("get XCRs"))?,
            debug_regs: self
                .fd
                .get_debug_regs()
                .map_err(Error::kvm("get debug registers"))?,
            events: self
                .fd
                .get_vcpu_events()
                .map_err(Error::kvm("get vCPU events"))?,
            msrs: msrs.as_slice()[..read].to_vec(),
            pending: self.mid_exit,
        })
    }

    /// Loads `state` into this vCPU (built, not yet run): the inverse of [`Vcpu::save_state`].
    /// The guest then resumes at the saved instruction with the saved registers.
    ///
    /// Returns how many ns the guest's TSC reads ahead of the saved value (0 where KVM sets
    /// it exactly): the caller moves the guest's other clocks by as much, so that they keep
    /// their relation to the TSC.
    pub fn restore_state(&mut self, state: &VcpuState) -> Result<u64> {
        if state.version != crate::state::STATE_VERSION {
            return Err(Error::Unsupported(
                "restoring the vCPU: the state was written by another format version",
            ));
        }
        if !self.xsave_fits {
            return Err(Error::Unsupported(
                "restoring the vCPU: this host's XSAVE state is larger than 4 KiB",
            ));
        }
        if state.msrs.len() > SAVED_MSRS.len()
            || state.msrs.iter().any(|m| !SAVED_MSRS.contains(&m.index))
        {
            return Err(Error::Unsupported(
                "restoring the vCPU: the state holds MSRs this host-vmm does not restore",
            ));
        }
        self.fd
            .set_sregs(&state.sregs)
            .map_err(Error::kvm("set sregs"))?;
        self.fd
            .set_regs(&state.regs)
            .map_err(Error::kvm("set regs"))?;
        // SAFETY: `xsave_fits` says this host's XSAVE area is no larger than `kvm_xsave` (the
        // builder asked KVM_CAP_XSAVE2), so KVM reads only inside the struct we pass.
        unsafe { self.fd.set_xsave(&state.xsave) }.map_err(Error::kvm("set XSAVE"))?;
        self.fd
            .set_xcrs(&state.xcrs)
            .map_err(Error::kvm("set XCRs"))?;
        self.fd
            .set_debug_regs(&state.debug_regs)
            .map_err(Error::kvm("set debug registers"))?;
        self.fd
            .set_vcpu_events(&state.events)
            .map_err(Error::kvm("set vCPU events"))?;
        let msrs = Msrs::from_entries(&state.msrs)
            .map_err(|_| Error::Unsupported("restoring the vCPU: too many MSRs"))?;
        let written = self.fd.set_msrs(&msrs).map_err(Error::kvm("set MSRs"))?;
        if written != state.msrs.len() {
            return Err(Error::Unsupported(
                "restoring the vCPU: KVM refused one of the saved MSRs",
            ));
        }
        match state.msrs.iter().find(|m| m.index == SAVED_MSRS[0]) {
            Some(tsc) => {
                self.set_guest_tsc(tsc.data)?;
                Ok(self.guest_tsc_ns_ahead(tsc.data))
            }
            None => Ok(0),
        }
    }

    /// How far, in ns, the guest's TSC now reads ahead of `value` (0 if it cannot say). Some
    /// KVM hosts ignore TSC writes and offsets (the guest's TSC is the host's): there a
    /// restored guest's TSC includes the time the VM spent saved.
    fn guest_tsc_ns_ahead(&self, value: u64) -> u64 {
        let mut msrs = match Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
            index: SAVED_MSRS[0],
            ..Default::default()
        }]) {
            Ok(m) => m,
            Err(_) => return 0,
        };
        let khz = self.fd.get_tsc_khz().unwrap_or(0);
        match self.fd.get_msrs(&mut msrs) {
            Ok(1) if khz > 0 => {
                let ahead = msrs.as_slice()[0].data.saturating_sub(value);
                u64::try_from(u128::from(ahead) * 1_000_000 / u128::from(khz)).unwrap_or(u64::MAX)
            }
            _ => 0,
        }
    }

    /// Makes the guest's TSC read `value` now, so that it goes on from where it was saved:
    /// the time the VM spent saved (or migrating) is invisible to it, as it is to the host's
    /// guest clock. A host-side write of IA32_TSC is not enough: KVM takes a value near what
    /// it expects for a new vCPU as an attempt to synchronise vCPUs and keeps its own offset.
    /// Where KVM offers `KVM_VCPU_TSC_OFFSET` (Linux 5.16) the offset is set directly;
    /// elsewhere the MSR write stands.
    fn set_guest_tsc(&self, value: u64) -> Result<()> {
        let mut offset: u64 = 0;
        let mut attr = kvm_bindings::kvm_device_attr {
            flags: 0,
            group: kvm_bindings::KVM_VCPU_TSC_CTRL,
            attr: u64::from(kvm_bindings::KVM_VCPU_TSC_OFFSET),
            addr: &mut offset as *mut u64 as u64,
        };
        // SAFETY: KVM_HAS_DEVICE_ATTR on our vCPU fd reads `attr` only (not `addr`).
        if unsafe { ioctl_with_ref(&self.fd, KVM_HAS_DEVICE_ATTR(), &attr) } != 0 {
            return Ok(());
        }
        // SAFETY: RDTSC only reads the time-stamp counter, which every x86-64 CPU has.
        let host_tsc = unsafe { core::arch::x86_64::_rdtsc() };
        // Guest TSC = host TSC + offset (the VM runs at the host's TSC rate: no scaling is set).
        offset = value.wrapping_sub(host_tsc);
        attr.addr = &offset as *const u64 as u64;
        // SAFETY: KVM_SET_DEVICE_ATTR on our vCPU fd reads `attr` and the u64 at `attr.addr`,
        // which is `offset`, alive for the call.
        if unsafe { ioctl_with_ref(&self.fd, KVM_SET_DEVICE_ATTR(), &attr) } != 0 {
            return Err(Error::Io {
                what: "cannot set the guest's TSC offset".into(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// The guest instruction pointer now (0 if KVM cannot say).
    pub fn rip(&mut self) -> u64 {
        self.regs().map(|r| r.rip).unwrap_or(0)
    }

    /// Whether the guest had interrupts enabled at the last exit (`RFLAGS.IF`; before the first
    /// entry, from the registers).
    pub fn interrupts_enabled(&mut self) -> bool {
        if self.entered {
            self.fd.get_kvm_run().if_flag != 0
        } else {
            self.fd.get_regs().is_ok_and(|r| r.rflags & (1 << 9) != 0)
        }
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
            Request::SaveState => Reply::State(Box::new(self.save_state())),
            Request::Xsave => Reply::Xsave(self.xsave()),
            Request::SetXsave(x) => Reply::Done(self.set_xsave(&x)),
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
    SaveState,
    Xsave,
    SetXsave(Box<kvm_xsave>),
    Job(Job),
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Request::Regs => "Regs",
            Request::SetRegs(_) => "SetRegs",
            Request::Sregs => "Sregs",
            Request::SetSregs(_) => "SetSregs",
            Request::SaveState => "SaveState",
            Request::Xsave => "Xsave",
            Request::SetXsave(_) => "SetXsave",
            Request::Job(_) => "Job",
        })
    }
}

#[derive(Debug)]
enum Reply {
    Regs(Result<kvm_regs>),
    Sregs(Result<kvm_sregs>),
    Done(Result<()>),
    State(Box<Result<VcpuState>>),
    Xsave(Result<Box<kvm_xsave>>),
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

    /// Whether the run has ended.
    pub fn is_ended(&self) -> bool {
        self.stopper.phase() == RunPhase::Done
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

    /// The XSAVE area of the paused vCPU ([`Vcpu::xsave`]).
    pub fn xsave(&self) -> std::result::Result<Box<kvm_xsave>, ControlError> {
        match self.call(Request::Xsave)? {
            Reply::Xsave(r) => Ok(r?),
            _ => unreachable!("an Xsave request gets an Xsave reply"),
        }
    }

    /// Sets the XSAVE area of the paused vCPU ([`Vcpu::set_xsave`]).
    pub fn set_xsave(&self, xsave: Box<kvm_xsave>) -> std::result::Result<(), ControlError> {
        match self.call(Request::SetXsave(xsave))? {
            Reply::Done(r) => Ok(r?),
            _ => unreachable!("a SetXsave request gets a Done reply"),
        }
    }

    /// The paused vCPU's whole state ([`Vcpu::save_state`]).
    pub fn save_state(&self) -> std::result::Result<VcpuState, ControlError> {
        match self.call(Request::SaveState)? {
            Reply::State(r) => Ok((*r)?),
            _ => unreachable!("a SaveState request gets a State reply"),
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
