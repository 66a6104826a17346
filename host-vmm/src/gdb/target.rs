//! gdbstub's `Target` for one pvkit vCPU: registers through the [`VcpuHandle`], memory through
//! jobs on the parked vCPU thread ([`Machine::debug_read`], [`Machine::debug_write`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError};
use gdbstub::common::Signal;
use gdbstub::conn::{Connection, ConnectionExt};
use gdbstub::outputln;
use gdbstub::stub::SingleThreadStopReason;
use gdbstub::stub::run_blocking::{BlockingEventLoop, Event, WaitForStopReasonError};
use gdbstub::target::ext::base::BaseOps;
use gdbstub::target::ext::base::singlethread::{
    SingleThreadBase, SingleThreadResume, SingleThreadResumeOps, SingleThreadSingleStep,
    SingleThreadSingleStepOps,
};
use gdbstub::target::ext::breakpoints::{
    Breakpoints, BreakpointsOps, HwBreakpoint, HwBreakpointOps, HwWatchpoint, HwWatchpointOps,
    SwBreakpoint, SwBreakpointOps, WatchKind,
};
use gdbstub::target::ext::monitor_cmd::{ConsoleOutput, MonitorCmd, MonitorCmdOps};
use gdbstub::target::{Target, TargetError, TargetResult};
use kvm_bindings::{
    KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_HW_BP, KVM_GUESTDBG_USE_SW_BP,
};

use super::arch::{self, Regs, X86_64Pvkit};
use super::user::{self, BP_VECTOR, DB_VECTOR, FRAME_LEN, IRETQ, TF, TrapFrame};
use super::{DR6_BS, DebugConfig, GuestEvent, StopEvent};
use crate::machine::Machine;
use crate::sync::lock;
use crate::vcpu::{ControlError, VcpuHandle};

const PAGE: u64 = 4096;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
const INT3: u8 = 0xcc;
const HLT: u8 = 0xf4;
/// How many instructions the stub steps, at most, waiting for the guest to load an IDT.
const IDT_STEPS: u32 = 200_000;
/// How long an interrupt (Ctrl-C) waits for the vCPU to stop.
const INTERRUPT_TIMEOUT: Duration = Duration::from_secs(5);

/// The guest's paging registers, for [`translate`].
#[derive(Debug, Clone, Copy)]
pub struct Paging {
    cr0: u64,
    cr3: u64,
}

/// Translates guest-virtual `va` to guest-physical with the guest's page tables (4-level, 4 KiB,
/// 2 MiB and 1 GiB pages; identity with paging off), reading 8-byte entries with `read`.
/// Returns the physical address and the entries walked (each with its address).
pub fn translate(
    cr0: u64,
    cr3: u64,
    va: u64,
    read: impl Fn(u64) -> Option<u64>,
) -> (Option<u64>, Vec<(u64, u64)>) {
    let mut walked = Vec::new();
    if cr0 & (1 << 31) == 0 {
        return (Some(va), walked);
    }
    let mut table = cr3 & ADDR_MASK;
    for (level, shift) in [(4u32, 39u32), (3, 30), (2, 21), (1, 12)] {
        let at = table + ((va >> shift) & 0x1ff) * 8;
        let Some(entry) = read(at) else {
            return (None, walked);
        };
        walked.push((at, entry));
        if entry & 1 == 0 {
            return (None, walked);
        }
        if (level == 3 || level == 2) && entry & (1 << 7) != 0 {
            let size = 1u64 << shift;
            return (
                Some((entry & ADDR_MASK & !(size - 1)) + (va & (size - 1))),
                walked,
            );
        }
        table = entry & ADDR_MASK;
    }
    (Some(table + (va & (PAGE - 1))), walked)
}

fn read_u64(m: &Machine, gpa: u64) -> Option<u64> {
    let mut b = [0u8; 8];
    m.debug_read(gpa, &mut b).then(|| u64::from_le_bytes(b))
}

fn to_phys(m: &Machine, paging: Option<Paging>, va: u64) -> Option<u64> {
    match paging {
        None => Some(va),
        Some(p) => translate(p.cr0, p.cr3, va, |a| read_u64(m, a)).0,
    }
}

/// Reads `buf` at `addr` page by page; returns how many bytes it read.
fn read_mem(m: &Machine, paging: Option<Paging>, addr: u64, buf: &mut [u8]) -> usize {
    let mut done = 0;
    while done < buf.len() {
        let va = addr.wrapping_add(done as u64);
        let chunk = ((PAGE - (va & (PAGE - 1))) as usize).min(buf.len() - done);
        let Some(pa) = to_phys(m, paging, va) else {
            break;
        };
        if !m.debug_read(pa, &mut buf[done..done + chunk]) {
            break;
        }
        done += chunk;
    }
    done
}

/// Writes `data` at `addr` page by page; false if any page is unmapped or outside RAM.
fn write_mem(m: &mut Machine, paging: Option<Paging>, addr: u64, data: &[u8]) -> bool {
    let mut done = 0;
    while done < data.len() {
        let va = addr.wrapping_add(done as u64);
        let chunk = ((PAGE - (va & (PAGE - 1))) as usize).min(data.len() - done);
        let Some(pa) = to_phys(m, paging, va) else {
            return false;
        };
        if !m.debug_write(pa, &data[done..done + chunk]) {
            return false;
        }
        done += chunk;
    }
    true
}

/// One of the four debug-register slots.
#[derive(Debug, Clone, Copy)]
struct HwSlot {
    addr: u64,
    /// `None`: an instruction breakpoint.
    watch: Option<WatchKind>,
    len: u64,
    /// A software breakpoint (`break`) served by a debug register.
    soft: bool,
}

/// gdbstub's view of the vCPU (see the module docs).
#[derive(Debug)]
pub struct GdbTarget {
    vcpu: VcpuHandle,
    events: Receiver<GuestEvent>,
    config: Arc<Mutex<DebugConfig>>,
    /// Software breakpoints patched with `int3` (once the four debug registers are taken):
    /// virtual address -> (physical address, the byte under the `int3`).
    sw: BTreeMap<u64, (u64, u8)>,
    hw: [Option<HwSlot>; 4],
    /// Memory addresses are guest-physical (`monitor phys on`).
    phys: bool,
    stepping: bool,
    /// The run's end, seen while looking for stale stops.
    ended: Option<GuestEvent>,
    /// The fault the vCPU stopped at ([`super::VcpuLink::fault`]).
    fault: Arc<Mutex<Option<String>>>,
    /// Hidden `int3`s on the guest's `#BP`/`#DB` handler entries, for CPL 3 (see
    /// [`super::user`]); set only while the guest runs: handler address -> (vector, physical
    /// address, the byte under the `int3`).
    catches: BTreeMap<u64, (u8, u64, u8)>,
    /// A single-step at CPL 3 in progress (by RFLAGS.TF): whether the stub set TF for it.
    user_step: Option<bool>,
    /// A TF the stub set is still somewhere in the guest (in the user RFLAGS, or in a frame the
    /// kernel will `iretq` to, when the step trapped into the kernel and stopped there): its
    /// `#DB` stays caught, and is dropped unless a step waits for it.
    tf_planted: bool,
    /// A single-step the stub makes for itself before going on as gdb asked.
    internal: Option<Internal>,
    /// A stop reached without running the guest (a step over an `iretq` into CPL 3).
    pending: Option<SingleThreadStopReason<u64>>,
}

/// A single-step of the stub's own, then the guest goes on (`step`: as gdb's single-step).
#[derive(Debug, Clone, Copy)]
enum Internal {
    /// Over the first instruction of a handler whose `#BP`/`#DB` was the guest's own (its
    /// hidden `int3` lifted).
    StepOver { step: bool },
    /// Until the guest loads an IDT: breakpoints in CPL 3 code need its `#BP` handler. Given
    /// up at a `hlt` (a step would not halt) and after [`IDT_STEPS`] steps.
    UntilIdt { step: bool, steps: u32 },
}

/// What the stub made of a stop.
enum Seen {
    /// Report this to gdb.
    Report(SingleThreadStopReason<u64>),
    /// The stub resumed the guest itself (nothing to report).
    Resumed,
    /// An ordinary stop: [`GdbTarget::stop_reason`].
    Ordinary,
}

/// Whether the guest has an IDT with a gate for `vector`.
fn idt_covers(s: &kvm_bindings::kvm_sregs, vector: u8) -> bool {
    s.idt.base != 0 && u64::from(s.idt.limit) >= u64::from(vector) * 16 + 15
}

/// A [`TargetError`] as text (it implements neither `Debug` nor `Display`).
fn describe(e: &TargetError<String>) -> String {
    match e {
        TargetError::Fatal(what) => what.clone(),
        TargetError::Errno(n) => format!("errno {n}"),
        _ => "error".into(),
    }
}

fn control_error(e: ControlError) -> TargetError<String> {
    match e {
        ControlError::Ended => TargetError::Fatal("the VM has ended".into()),
        other => TargetError::Fatal(other.to_string()),
    }
}

impl GdbTarget {
    pub(super) fn new(
        vcpu: VcpuHandle,
        events: Receiver<GuestEvent>,
        config: Arc<Mutex<DebugConfig>>,
        fault: Arc<Mutex<Option<String>>>,
    ) -> GdbTarget {
        GdbTarget {
            vcpu,
            events,
            config,
            fault,
            sw: BTreeMap::new(),
            hw: [None; 4],
            phys: false,
            stepping: false,
            ended: None,
            catches: BTreeMap::new(),
            user_step: None,
            tf_planted: false,
            internal: None,
            pending: None,
        }
    }

    fn paging(&self) -> Result<Option<Paging>, TargetError<String>> {
        if self.phys {
            return Ok(None);
        }
        let s = self.vcpu.sregs().map_err(control_error)?;
        Ok(Some(Paging {
            cr0: s.cr0,
            cr3: s.cr3,
        }))
    }

    /// Sets what the vCPU applies before its next entry.
    fn apply(&self, step: bool) {
        let mut dr7 = 0u64;
        let mut regs = [0u64; 8];
        for (i, slot) in self.hw.iter().enumerate() {
            let Some(slot) = slot else { continue };
            regs[i] = slot.addr;
            let rw = match slot.watch {
                None => 0b00,
                Some(WatchKind::Write) => 0b01,
                Some(_) => 0b11,
            };
            let len = match (slot.watch, slot.len) {
                (None, _) | (_, 1) => 0b00,
                (_, 2) => 0b01,
                (_, 8) => 0b10,
                _ => 0b11,
            };
            dr7 |= (1 << (2 * i)) | (rw << (16 + 4 * i)) | (len << (18 + 4 * i));
        }
        regs[7] = dr7;
        let mut control = KVM_GUESTDBG_ENABLE;
        if !self.sw.is_empty() {
            control |= KVM_GUESTDBG_USE_SW_BP;
        }
        if dr7 != 0 {
            control |= KVM_GUESTDBG_USE_HW_BP;
        }
        if step {
            control |= KVM_GUESTDBG_SINGLESTEP;
        }
        let mut c = lock(&self.config);
        // Unchanged settings are not set again (each KVM_SET_GUEST_DEBUG costs an ioctl).
        if c.control != control || c.debugreg != regs {
            c.generation += 1;
            c.control = control;
            c.debugreg = regs;
        }
    }

    fn go(&mut self, step: bool) {
        self.stepping = step;
        self.user_step = None;
        self.internal = None;
        // Stops reported before an interrupt took over are stale now; an end never is.
        while let Ok(ev) = self.events.try_recv() {
            if !matches!(ev, GuestEvent::Stopped(_)) {
                self.ended = Some(ev);
            }
        }
        match self.prepare(step) {
            Ok(Some(stop)) => self.pending = Some(stop),
            Ok(None) => self.vcpu.resume(),
            Err(e) => {
                eprintln!("host-vmm: gdb: {}", describe(&e));
                self.apply(step);
                self.vcpu.resume();
            }
        }
    }

    /// Sets up a continue or step (see [`super::user`] for CPL 3): a step at CPL 3 by
    /// RFLAGS.TF, a step over an `iretq` into CPL 3 done here (the stop it returns), the hidden
    /// `#BP`/`#DB` catches armed, and KVM's settings.
    fn prepare(
        &mut self,
        step: bool,
    ) -> Result<Option<SingleThreadStopReason<u64>>, TargetError<String>> {
        let mut kvm_step = step;
        if step {
            let s = self.vcpu.sregs().map_err(control_error)?;
            let mut r = self.vcpu.regs().map_err(control_error)?;
            if s.cs.selector & 3 == 3 {
                // KVM's single-step does not reach CPL 3 here: the guest's own TF does.
                let added = r.rflags & TF == 0;
                r.rflags |= TF;
                self.vcpu.set_regs(&r).map_err(control_error)?;
                self.user_step = Some(added);
                self.tf_planted |= added;
                kvm_step = false;
            } else if self.read_virt(r.rip, 2)? == Some(IRETQ.to_vec())
                && let Some(frame) = self.frame(r.rsp)?
                && frame.is_user()
                && self.return_to(&frame, frame.rip, false)?
            {
                return Ok(Some(SingleThreadStopReason::DoneStep));
            }
        }
        let s = self.vcpu.sregs().map_err(control_error)?;
        if !self.sw.is_empty() && !idt_covers(&s, BP_VECTOR) && !step {
            // No IDT yet: step (at CPL 0, where KVM's single-step works) until there is one.
            self.internal = Some(Internal::UntilIdt { step, steps: 0 });
            kvm_step = true;
        } else {
            self.arm(&s)?;
        }
        self.apply(kvm_step);
        Ok(None)
    }

    /// Reads `len` bytes at guest-virtual `addr` (all of them or none).
    fn read_virt(&self, addr: u64, len: usize) -> Result<Option<Vec<u8>>, TargetError<String>> {
        let paging = self.paging()?;
        self.vcpu
            .with_parked(move |m: &mut Machine| {
                let mut buf = vec![0u8; len];
                (read_mem(m, paging, addr, &mut buf) == len).then_some(buf)
            })
            .map_err(control_error)
    }

    /// The interrupt frame at `rsp`.
    fn frame(&self, rsp: u64) -> Result<Option<TrapFrame>, TargetError<String>> {
        Ok(self
            .read_virt(rsp, FRAME_LEN)?
            .and_then(|b| TrapFrame::parse(&b)))
    }

    /// Returns the vCPU to `frame` at `rip` ([`user::returned`]); false if the frame's
    /// selectors are not in the GDT.
    fn return_to(
        &self,
        frame: &TrapFrame,
        rip: u64,
        clear_tf: bool,
    ) -> Result<bool, TargetError<String>> {
        let s = self.vcpu.sregs().map_err(control_error)?;
        let r = self.vcpu.regs().map_err(control_error)?;
        let desc = |sel: u64| -> Result<Option<u64>, TargetError<String>> {
            let at = sel & !7;
            if sel & 4 != 0 || at == 0 || at + 7 > u64::from(s.gdt.limit) {
                return Ok(None);
            }
            Ok(self
                .read_virt(s.gdt.base + at, 8)?
                .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8]))))
        };
        let (Some(cs), Some(ss)) = (desc(frame.cs)?, desc(frame.ss)?) else {
            return Ok(false);
        };
        let (r, s) = user::returned(&r, &s, frame, rip, (cs, ss), clear_tf);
        self.vcpu.set_sregs(&s).map_err(control_error)?;
        self.vcpu.set_regs(&r).map_err(control_error)?;
        Ok(true)
    }

    /// Puts the hidden `int3`s on the guest's `#BP` handler (while gdb has breakpoints) and
    /// `#DB` handler (during a CPL 3 step), if the guest has an IDT.
    fn arm(&mut self, s: &kvm_bindings::kvm_sregs) -> Result<(), TargetError<String>> {
        let mut vectors = Vec::new();
        if !self.sw.is_empty() {
            vectors.push(BP_VECTOR);
        }
        if self.user_step.is_some() || self.tf_planted {
            vectors.push(DB_VECTOR);
        }
        vectors.retain(|&v| idt_covers(s, v));
        if vectors.is_empty() {
            return Ok(());
        }
        let paging = self.paging()?;
        let idt = s.idt.base;
        let taken: Vec<u64> = self.sw.keys().chain(self.catches.keys()).copied().collect();
        let armed = self
            .vcpu
            .with_parked(move |m: &mut Machine| {
                let mut armed = Vec::new();
                for v in vectors {
                    let mut gate = [0u8; 16];
                    if read_mem(m, paging, idt + u64::from(v) * 16, &mut gate) != 16 {
                        continue;
                    }
                    let Some(handler) = user::gate_handler(&gate) else {
                        continue;
                    };
                    // A gdb breakpoint there already stops it.
                    if taken.contains(&handler) {
                        continue;
                    }
                    let Some(pa) = to_phys(m, paging, handler) else {
                        continue;
                    };
                    let mut orig = [0u8];
                    if m.debug_read(pa, &mut orig) && m.debug_write(pa, &[INT3]) {
                        armed.push((handler, (v, pa, orig[0])));
                    }
                }
                armed
            })
            .map_err(control_error)?;
        self.catches.extend(armed);
        Ok(())
    }

    /// Lifts the hidden `int3`s (at every stop: gdb sees the guest's own bytes).
    pub(super) fn disarm(&mut self) {
        if self.catches.is_empty() {
            return;
        }
        let patches: Vec<(u64, u8)> = self.catches.values().map(|&(_, pa, b)| (pa, b)).collect();
        self.catches.clear();
        let _ = self.vcpu.with_parked(move |m: &mut Machine| {
            for (pa, orig) in patches {
                m.debug_write(pa, &[orig]);
            }
        });
    }

    /// After a Ctrl-C: the stub's own business is dropped (the hidden `int3`s lifted, the TF
    /// of a CPL 3 step cleared if the vCPU is still where the step began).
    fn interrupted(&mut self) {
        self.disarm();
        self.internal = None;
        if self.user_step.take() == Some(true)
            && let Ok(mut r) = self.vcpu.regs()
            && self.vcpu.sregs().is_ok_and(|s| s.cs.selector & 3 == 3)
        {
            r.rflags &= !TF;
            let _ = self.vcpu.set_regs(&r);
        }
    }

    /// Looks at a stop for the stub's own business: the hidden `#BP`/`#DB` catches and its
    /// internal steps (see [`super::user`]).
    fn see(&mut self, ev: &StopEvent) -> Result<Seen, TargetError<String>> {
        let r = self.vcpu.regs().map_err(control_error)?;
        let stepped = matches!(ev, StopEvent::Debug(d) if d.dr6 & DR6_BS != 0 && d.dr6 & 0xf == 0);
        if let Some(internal) = self.internal.take()
            && stepped
        {
            match internal {
                Internal::StepOver { step } => {
                    self.internal = None;
                    self.stepping = step;
                    let s = self.vcpu.sregs().map_err(control_error)?;
                    self.arm(&s)?;
                    self.apply(step);
                }
                Internal::UntilIdt { step, steps } => {
                    let s = self.vcpu.sregs().map_err(control_error)?;
                    let halts = self.read_virt(r.rip, 1)? == Some(vec![HLT]);
                    if idt_covers(&s, BP_VECTOR) {
                        self.arm(&s)?;
                        self.apply(step);
                    } else if halts || steps >= IDT_STEPS {
                        eprintln!(
                            "host-vmm: gdb: the guest has loaded no IDT after {steps} \
                             instructions; a breakpoint in CPL 3 code now reaches it as #BP"
                        );
                        self.apply(step);
                    } else {
                        self.internal = Some(Internal::UntilIdt {
                            step,
                            steps: steps + 1,
                        });
                    }
                }
            }
            self.vcpu.resume();
            return Ok(Seen::Resumed);
        }
        let at_int3 = match ev {
            StopEvent::Debug(d) => d.exception == 3,
            StopEvent::Fault(what) => what.contains("KVM_EXIT_INTERNAL_ERROR"),
        };
        let Some(&(vector, _, _)) = self.catches.get(&r.rip).filter(|_| at_int3) else {
            return Ok(Seen::Ordinary);
        };
        self.disarm();
        // The hidden `int3` is no fault of the guest's.
        lock(&self.fault).take();
        let frame = self.frame(r.rsp)?.filter(TrapFrame::is_user);
        if let Some(frame) = frame {
            let bp = frame.rip.wrapping_sub(1);
            if vector == BP_VECTOR
                && self.sw.contains_key(&bp)
                && self.return_to(&frame, bp, false)?
            {
                self.user_step = None;
                return Ok(Seen::Report(SingleThreadStopReason::SwBreak(())));
            }
            if vector == DB_VECTOR
                && let Some(added) = self.user_step
                && self.return_to(&frame, frame.rip, added)?
            {
                self.user_step = None;
                self.tf_planted = false;
                return Ok(Seen::Report(SingleThreadStopReason::DoneStep));
            }
            if vector == DB_VECTOR
                && self.tf_planted
                && frame.rflags & TF != 0
                && self.return_to(&frame, frame.rip, true)?
            {
                // The stub's TF from an earlier step, back in CPL 3: dropped, the guest goes on.
                self.tf_planted = false;
                let s = self.vcpu.sregs().map_err(control_error)?;
                self.arm(&s)?;
                self.vcpu.resume();
                return Ok(Seen::Resumed);
            }
        }
        // The guest's own #BP or #DB: its handler runs.
        self.internal = Some(Internal::StepOver {
            step: self.stepping,
        });
        self.apply(true);
        self.vcpu.resume();
        Ok(Seen::Resumed)
    }

    /// Ends the session: removes the breakpoints, switches guest debugging off and lets the
    /// guest run on.
    pub(super) fn detach(&mut self) {
        // A running guest is stopped first, so no `int3` (gdb's or the hidden ones on its
        // handlers) stays behind in its memory.
        if !self.sw.is_empty() || !self.catches.is_empty() {
            let _ = self.vcpu.pause(INTERRUPT_TIMEOUT);
        }
        if self.vcpu.is_paused() {
            self.disarm();
            let patches: Vec<(u64, u8)> = self.sw.values().copied().collect();
            let _ = self.vcpu.with_parked(move |m: &mut Machine| {
                for (pa, orig) in patches {
                    m.debug_write(pa, &[orig]);
                }
            });
        }
        self.sw.clear();
        self.hw = [None; 4];
        {
            let mut c = lock(&self.config);
            c.generation += 1;
            c.control = 0;
            c.debugreg = [0; 8];
        }
        self.vcpu.resume();
    }

    fn stop_reason(&self, ev: GuestEvent) -> SingleThreadStopReason<u64> {
        match ev {
            GuestEvent::Exited(code) => SingleThreadStopReason::Exited(code as u8),
            GuestEvent::Faulted(_) => SingleThreadStopReason::Terminated(Signal::SIGSEGV),
            GuestEvent::Stopped(StopEvent::Fault(what))
                if what.contains("KVM_EXIT_INTERNAL_ERROR")
                    && self.vcpu.regs().is_ok_and(|r| self.sw.contains_key(&r.rip)) =>
            {
                // Some KVM hosts (nested ones) fail to emulate an intercepted `int3` instead of
                // reporting it: at one of ours, it is that breakpoint, and the guest can go on.
                lock(&self.fault).take();
                SingleThreadStopReason::SwBreak(())
            }
            GuestEvent::Stopped(StopEvent::Fault(what)) => {
                eprintln!("host-vmm: gdb: guest fault: {what} (continuing ends the run)");
                SingleThreadStopReason::Signal(Signal::SIGSEGV)
            }
            GuestEvent::Stopped(StopEvent::Debug(d)) => {
                if d.exception == 3 {
                    return SingleThreadStopReason::SwBreak(());
                }
                if let Some(i) = (0..4).find(|i| d.dr6 & (1 << i) != 0)
                    && let Some(slot) = self.hw[i]
                {
                    return match slot.watch {
                        None if slot.soft => SingleThreadStopReason::SwBreak(()),
                        None => SingleThreadStopReason::HwBreak(()),
                        Some(kind) => SingleThreadStopReason::Watch {
                            tid: (),
                            kind,
                            addr: slot.addr,
                        },
                    };
                }
                if self.stepping {
                    SingleThreadStopReason::DoneStep
                } else {
                    SingleThreadStopReason::Signal(Signal::SIGTRAP)
                }
            }
        }
    }

    /// The stop the run loop reported, once the vCPU is parked (or the run's end).
    fn poll_stop(&mut self, wait: Duration) -> Option<SingleThreadStopReason<u64>> {
        if let Some(stop) = self.pending.take() {
            return Some(stop);
        }
        if let Some(ev) = self.ended.take() {
            return Some(self.stop_reason(ev));
        }
        match self.events.recv_timeout(wait) {
            Ok(GuestEvent::Stopped(stop)) => {
                let _ = self.vcpu.wait_paused(INTERRUPT_TIMEOUT);
                match self.see(&stop) {
                    Ok(Seen::Resumed) => return None,
                    Ok(Seen::Report(reason)) => return Some(reason),
                    Ok(Seen::Ordinary) => {}
                    Err(e) => eprintln!("host-vmm: gdb: {}", describe(&e)),
                }
                self.internal = None;
                self.user_step = None;
                self.disarm();
                Some(self.stop_reason(GuestEvent::Stopped(stop)))
            }
            Ok(ev) => Some(self.stop_reason(ev)),
            Err(RecvTimeoutError::Timeout) if self.vcpu.is_ended() => {
                // Ended without an exit or fault of the guest (a KVM error, a stop).
                match self.events.try_recv() {
                    Ok(ev) => Some(self.stop_reason(ev)),
                    Err(_) => Some(SingleThreadStopReason::Terminated(Signal::SIGKILL)),
                }
            }
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => {
                Some(SingleThreadStopReason::Terminated(Signal::SIGKILL))
            }
        }
    }

    fn hw_add(&mut self, slot: HwSlot) -> bool {
        match self.hw.iter_mut().find(|s| s.is_none()) {
            Some(free) => {
                *free = Some(slot);
                true
            }
            None => false,
        }
    }

    /// Adds a `hbreak` or watchpoint: these need a debug register, so a software breakpoint
    /// holding one moves to an `int3` patch if none is free.
    fn hw_add_explicit(&mut self, slot: HwSlot) -> TargetResult<bool, Self> {
        if self.hw.iter().all(|s| s.is_some())
            && let Some(i) = self.hw.iter().position(|s| s.is_some_and(|s| s.soft))
            && let Some(soft) = self.hw[i]
        {
            self.hw[i] = None;
            if !self.sw.contains_key(&soft.addr) && !self.patch_int3(soft.addr)? {
                self.hw[i] = Some(soft);
                return Ok(false);
            }
        }
        Ok(self.hw_add(slot))
    }

    /// Whether CPL 3 can run code at `addr` (user-accessible at every level of the walk).
    fn user_code(&self, addr: u64) -> TargetResult<bool, Self> {
        let Some(p) = self.paging()? else {
            return Ok(false);
        };
        self.vcpu
            .with_parked(move |m: &mut Machine| {
                let (pa, walked) = translate(p.cr0, p.cr3, addr, |a| read_u64(m, a));
                pa.is_some() && !walked.is_empty() && walked.iter().all(|&(_, e)| e & 4 != 0)
            })
            .map_err(control_error)
    }

    /// Patches an `int3` at `addr`; false if it is not mapped to RAM.
    fn patch_int3(&mut self, addr: u64) -> TargetResult<bool, Self> {
        let paging = self.paging()?;
        let patched = self
            .vcpu
            .with_parked(move |m: &mut Machine| {
                let pa = to_phys(m, paging, addr)?;
                let mut orig = [0u8];
                (m.debug_read(pa, &mut orig) && m.debug_write(pa, &[INT3])).then_some((pa, orig[0]))
            })
            .map_err(control_error)?;
        match patched {
            Some(p) => {
                self.sw.insert(addr, p);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn hw_remove(&mut self, addr: u64, watch: Option<WatchKind>, soft: bool) -> bool {
        for s in &mut self.hw {
            if s.is_some_and(|s| s.addr == addr && s.watch == watch && s.soft == soft) {
                *s = None;
                return true;
            }
        }
        false
    }
}

/// XSTATE_BV bits of the x87 and SSE components.
const XSTATE_X87: u32 = 1 << 0;
const XSTATE_SSE: u32 = 1 << 1;

impl Target for GdbTarget {
    type Arch = X86_64Pvkit;
    type Error = String;

    fn base_ops(&mut self) -> BaseOps<'_, Self::Arch, Self::Error> {
        BaseOps::SingleThread(self)
    }

    fn support_breakpoints(&mut self) -> Option<BreakpointsOps<'_, Self>> {
        Some(self)
    }

    fn support_monitor_cmd(&mut self) -> Option<MonitorCmdOps<'_, Self>> {
        Some(self)
    }

    // int3 patches are written by the stub itself.
    fn guard_rail_implicit_sw_breakpoints(&self) -> bool {
        true
    }
}

impl SingleThreadBase for GdbTarget {
    fn read_registers(&mut self, regs: &mut Regs) -> TargetResult<(), Self> {
        let r = self.vcpu.regs().map_err(control_error)?;
        let s = self.vcpu.sregs().map_err(control_error)?;
        let core = &mut regs.core;
        core.regs = [
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15,
        ];
        core.eflags = r.rflags as u32;
        core.rip = r.rip;
        core.segments.cs = u32::from(s.cs.selector);
        core.segments.ss = u32::from(s.ss.selector);
        core.segments.ds = u32::from(s.ds.selector);
        core.segments.es = u32::from(s.es.selector);
        core.segments.fs = u32::from(s.fs.selector);
        core.segments.gs = u32::from(s.gs.selector);
        regs.fs_base = s.fs.base;
        regs.gs_base = s.gs.base;
        // x87 and SSE: the legacy region of the XSAVE area.
        let xsave = self.vcpu.xsave().map_err(control_error)?;
        let mut fx = [0u8; 512];
        for (bytes, word) in fx.chunks_exact_mut(4).zip(xsave.region.iter()) {
            bytes.copy_from_slice(&word.to_le_bytes());
        }
        arch::fill_fpu(core, &fx);
        Ok(())
    }

    fn write_registers(&mut self, regs: &Regs) -> TargetResult<(), Self> {
        // x87/SSE: written back into the XSAVE area's legacy region, only if gdb changed them.
        let mut current = Regs::default();
        self.read_registers(&mut current)?;
        if arch::fpu_differs(&current.core, &regs.core) {
            let mut xsave = self.vcpu.xsave().map_err(control_error)?;
            let mut fx = [0u8; 512];
            for (bytes, word) in fx.chunks_exact_mut(4).zip(xsave.region.iter()) {
                bytes.copy_from_slice(&word.to_le_bytes());
            }
            arch::store_fpu(&regs.core, &mut fx);
            for (word, bytes) in xsave.region.iter_mut().zip(fx.chunks_exact(4)) {
                *word = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
            }
            // XSTATE_BV (the header's first word, at byte 512): mark x87 and SSE as holding
            // state, or KVM loads their init values instead of the legacy region.
            xsave.region[512 / 4] |= XSTATE_X87 | XSTATE_SSE;
            self.vcpu.set_xsave(xsave).map_err(control_error)?;
        }
        let mut r = self.vcpu.regs().map_err(control_error)?;
        let g = regs.core.regs;
        (r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp) =
            (g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7]);
        (r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15) =
            (g[8], g[9], g[10], g[11], g[12], g[13], g[14], g[15]);
        r.rflags = (r.rflags & !0xffff_ffff) | u64::from(regs.core.eflags);
        r.rip = regs.core.rip;
        self.vcpu.set_regs(&r).map_err(control_error)?;
        // Segment selectors: only a changed one is written (its cached descriptor stays);
        // likewise the FS and GS bases.
        let mut s = self.vcpu.sregs().map_err(control_error)?;
        let seg = &regs.core.segments;
        let mut changed = false;
        for (sreg, want) in [
            (&mut s.cs, seg.cs),
            (&mut s.ss, seg.ss),
            (&mut s.ds, seg.ds),
            (&mut s.es, seg.es),
            (&mut s.fs, seg.fs),
            (&mut s.gs, seg.gs),
        ] {
            if u32::from(sreg.selector) != want {
                sreg.selector = want as u16;
                changed = true;
            }
        }
        for (sreg, want) in [(&mut s.fs, regs.fs_base), (&mut s.gs, regs.gs_base)] {
            if sreg.base != want {
                sreg.base = want;
                changed = true;
            }
        }
        if changed {
            self.vcpu.set_sregs(&s).map_err(control_error)?;
        }
        Ok(())
    }

    fn read_addrs(&mut self, start_addr: u64, data: &mut [u8]) -> TargetResult<usize, Self> {
        let paging = self.paging()?;
        let len = data.len();
        let out = self
            .vcpu
            .with_parked(move |m: &mut Machine| {
                let mut buf = vec![0u8; len];
                let n = read_mem(m, paging, start_addr, &mut buf);
                buf.truncate(n);
                buf
            })
            .map_err(control_error)?;
        if out.is_empty() && len > 0 {
            return Err(TargetError::Errno(14));
        }
        data[..out.len()].copy_from_slice(&out);
        Ok(out.len())
    }

    fn write_addrs(&mut self, start_addr: u64, data: &[u8]) -> TargetResult<(), Self> {
        let paging = self.paging()?;
        let data = data.to_vec();
        let ok = self
            .vcpu
            .with_parked(move |m: &mut Machine| write_mem(m, paging, start_addr, &data))
            .map_err(control_error)?;
        if ok {
            Ok(())
        } else {
            Err(TargetError::Errno(14))
        }
    }

    fn support_resume(&mut self) -> Option<SingleThreadResumeOps<'_, Self>> {
        Some(self)
    }
}

impl SingleThreadResume for GdbTarget {
    fn resume(&mut self, _signal: Option<Signal>) -> Result<(), Self::Error> {
        self.go(false);
        Ok(())
    }

    fn support_single_step(&mut self) -> Option<SingleThreadSingleStepOps<'_, Self>> {
        Some(self)
    }
}

impl SingleThreadSingleStep for GdbTarget {
    fn step(&mut self, _signal: Option<Signal>) -> Result<(), Self::Error> {
        self.go(true);
        Ok(())
    }
}

impl Breakpoints for GdbTarget {
    fn support_sw_breakpoint(&mut self) -> Option<SwBreakpointOps<'_, Self>> {
        Some(self)
    }

    fn support_hw_breakpoint(&mut self) -> Option<HwBreakpointOps<'_, Self>> {
        Some(self)
    }

    fn support_hw_watchpoint(&mut self) -> Option<HwWatchpointOps<'_, Self>> {
        Some(self)
    }
}

impl SwBreakpoint for GdbTarget {
    fn add_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        if self.sw.contains_key(&addr)
            || self
                .hw
                .iter()
                .any(|s| s.is_some_and(|s| s.soft && s.addr == addr))
        {
            return Ok(true);
        }
        // A debug register first: it changes no guest memory, and some KVM hosts (nested ones)
        // fail to emulate an intercepted `int3` (KVM_EXIT_INTERNAL_ERROR).
        let in_dr = self.hw_add(HwSlot {
            addr,
            watch: None,
            len: 1,
            soft: true,
        });
        // Code CPL 3 may run is patched too: debug registers do not fire at CPL 3 on those
        // hosts, an `int3` is caught at the guest's #BP handler ([`super::user`]).
        if in_dr && !self.user_code(addr)? {
            return Ok(true);
        }
        let patched = self.patch_int3(addr)?;
        Ok(patched || in_dr)
    }

    fn remove_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        let in_dr = self.hw_remove(addr, None, true);
        let Some((pa, orig)) = self.sw.remove(&addr) else {
            return Ok(in_dr);
        };
        let ok = self
            .vcpu
            .with_parked(move |m: &mut Machine| m.debug_write(pa, &[orig]))
            .map_err(control_error)?;
        Ok(ok)
    }
}

impl HwBreakpoint for GdbTarget {
    fn add_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        self.hw_add_explicit(HwSlot {
            addr,
            watch: None,
            len: 1,
            soft: false,
        })
    }

    fn remove_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        Ok(self.hw_remove(addr, None, false))
    }
}

impl HwWatchpoint for GdbTarget {
    fn add_hw_watchpoint(
        &mut self,
        addr: u64,
        len: u64,
        kind: WatchKind,
    ) -> TargetResult<bool, Self> {
        // x86 watches 1, 2, 4 or 8 aligned bytes.
        if !matches!(len, 1 | 2 | 4 | 8) || !addr.is_multiple_of(len) {
            return Ok(false);
        }
        self.hw_add_explicit(HwSlot {
            addr,
            watch: Some(kind),
            len,
            soft: false,
        })
    }

    fn remove_hw_watchpoint(
        &mut self,
        addr: u64,
        _len: u64,
        kind: WatchKind,
    ) -> TargetResult<bool, Self> {
        Ok(self.hw_remove(addr, Some(kind), false))
    }
}

const MONITOR_HELP: &str = "pvkit monitor commands:
  sregs                 control registers (CR0, CR2, CR3, CR4, EFER), segments, GDT, IDT
  set cr0|cr3|cr4|efer VALUE   write a control register
  pte VADDR             walk the guest's page tables for VADDR (tables in RAM or the pool)
  phys on|off           memory addresses are guest-physical (on) or guest-virtual (off)";

fn parse_u64(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

impl MonitorCmd for GdbTarget {
    fn handle_monitor_cmd(&mut self, cmd: &[u8], mut out: ConsoleOutput<'_>) -> Result<(), String> {
        let cmd = String::from_utf8_lossy(cmd);
        let words: Vec<&str> = cmd.split_whitespace().collect();
        match words.as_slice() {
            ["sregs"] => match self.vcpu.sregs() {
                Ok(s) => {
                    outputln!(
                        out,
                        "cr0 {:#x} cr2 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x}",
                        s.cr0,
                        s.cr2,
                        s.cr3,
                        s.cr4,
                        s.efer
                    );
                    for (name, seg) in [
                        ("cs", s.cs),
                        ("ss", s.ss),
                        ("ds", s.ds),
                        ("es", s.es),
                        ("fs", s.fs),
                        ("gs", s.gs),
                        ("tr", s.tr),
                    ] {
                        outputln!(
                            out,
                            "{name} selector {:#x} base {:#x} limit {:#x} dpl {} l {}",
                            seg.selector,
                            seg.base,
                            seg.limit,
                            seg.dpl,
                            seg.l
                        );
                    }
                    outputln!(
                        out,
                        "gdt {:#x}/{:#x} idt {:#x}/{:#x}",
                        s.gdt.base,
                        s.gdt.limit,
                        s.idt.base,
                        s.idt.limit
                    );
                }
                Err(e) => outputln!(out, "error: {e}"),
            },
            ["set", reg, value] => {
                let Some(value) = parse_u64(value) else {
                    outputln!(out, "error: bad value {value}");
                    return Ok(());
                };
                let r = self.vcpu.sregs().and_then(|mut s| {
                    match *reg {
                        "cr0" => s.cr0 = value,
                        "cr3" => s.cr3 = value,
                        "cr4" => s.cr4 = value,
                        "efer" => s.efer = value,
                        _ => return Ok(false),
                    }
                    self.vcpu.set_sregs(&s).map(|()| true)
                });
                match r {
                    Ok(true) => outputln!(out, "{reg} = {value:#x}"),
                    Ok(false) => outputln!(out, "error: unknown register {reg}"),
                    Err(e) => outputln!(out, "error: {e}"),
                }
            }
            ["pte", va] => {
                let Some(va) = parse_u64(va) else {
                    outputln!(out, "error: bad address {va}");
                    return Ok(());
                };
                let walk = self.vcpu.sregs().and_then(|s| {
                    self.vcpu.with_parked(move |m: &mut Machine| {
                        translate(s.cr0, s.cr3, va, |a| read_u64(m, a))
                    })
                });
                match walk {
                    Ok((pa, entries)) => {
                        for (level, (at, entry)) in (1..=4).rev().zip(entries) {
                            outputln!(out, "L{level} entry at {at:#x}: {entry:#018x}");
                        }
                        match pa {
                            Some(pa) => outputln!(out, "{va:#x} -> physical {pa:#x}"),
                            None => outputln!(out, "{va:#x} is not mapped"),
                        }
                    }
                    Err(e) => outputln!(out, "error: {e}"),
                }
            }
            ["phys", "on"] => {
                self.phys = true;
                outputln!(out, "memory addresses are guest-physical");
            }
            ["phys", "off"] => {
                self.phys = false;
                outputln!(out, "memory addresses are guest-virtual");
            }
            _ => outputln!(out, "{MONITOR_HELP}"),
        }
        Ok(())
    }
}

/// gdbstub's blocking event loop for [`GdbTarget`].
pub(super) enum EventLoop {}

impl BlockingEventLoop for EventLoop {
    type Target = GdbTarget;
    type Connection = Box<dyn ConnectionExt<Error = std::io::Error>>;
    type StopReason = SingleThreadStopReason<u64>;

    fn wait_for_stop_reason(
        target: &mut GdbTarget,
        conn: &mut Self::Connection,
    ) -> Result<
        Event<Self::StopReason>,
        WaitForStopReasonError<String, <Self::Connection as Connection>::Error>,
    > {
        loop {
            if let Some(reason) = target.poll_stop(Duration::from_millis(10)) {
                return Ok(Event::TargetStopped(reason));
            }
            if conn
                .peek()
                .map_err(WaitForStopReasonError::Connection)?
                .is_some()
            {
                let byte = conn.read().map_err(WaitForStopReasonError::Connection)?;
                return Ok(Event::IncomingData(byte));
            }
        }
    }

    fn on_interrupt(target: &mut GdbTarget) -> Result<Option<Self::StopReason>, String> {
        match target.vcpu.pause(INTERRUPT_TIMEOUT) {
            Ok(()) => {
                target.interrupted();
                Ok(Some(SingleThreadStopReason::Signal(Signal::SIGINT)))
            }
            // Ended: the end is (or will be) in the events.
            Err(ControlError::Ended) => Ok(target.poll_stop(Duration::from_millis(100))),
            Err(e) => Err(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::translate;

    const PG: u64 = 1 << 31;

    fn tables(entries: &[(u64, u64)]) -> impl Fn(u64) -> Option<u64> {
        let m: HashMap<u64, u64> = entries.iter().copied().collect();
        move |a| Some(m.get(&a).copied().unwrap_or(0))
    }

    #[test]
    fn paging_off_is_identity() {
        assert_eq!(translate(0, 0, 0x1234, |_| None).0, Some(0x1234));
    }

    #[test]
    fn walks_4k_2m_and_1g_pages_and_reports_holes() {
        // PML4 at 0x1000 -> PDPT 0x2000; PDPT[0] -> PD 0x3000; PDPT[1] 1 GiB page at 1 GiB;
        // PD[1] 2 MiB page at 0x40_0000; PD[2] -> PT 0x4000; PT[3] 4 KiB page at 0x9000.
        let read = tables(&[
            (0x1000, 0x2000 | 3),
            (0x2000, 0x3000 | 3),
            (0x2008, 0x4000_0000 | 0x83),
            (0x3008, 0x40_0000 | 0x83),
            (0x3010, 0x4000 | 3),
            (0x4018, 0x9000 | 3),
        ]);
        assert_eq!(translate(PG, 0x1000, 0x40_3003, &read).0, Some(0x9003));
        assert_eq!(translate(PG, 0x1000, 0x20_1234, &read).0, Some(0x40_1234));
        assert_eq!(
            translate(PG, 0x1000, 0x4012_3456, &read).0,
            Some(0x4012_3456)
        );
        let (pa, walked) = translate(PG, 0x1000, 0x40_4000, &read);
        assert_eq!(pa, None, "PT[4] is not present");
        assert_eq!(walked.len(), 4);
        assert_eq!(walked[0], (0x1000, 0x2003));
        // Unreadable table memory is a hole too.
        assert_eq!(translate(PG, 0x1000, 0, |_| None).0, None);
    }
}
