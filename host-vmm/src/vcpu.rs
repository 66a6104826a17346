//! The vCPU loop: run, decode the exit, dispatch to a device or hypercall handler, count it.
//! No device or hypercall logic lives here.

use std::time::Instant;

use hypercall_abi::idle::{EVENT_VECTOR, TIMER_VECTOR};
use hypercall_abi::ports::{MARKER_BEGIN, MARKER_CHECKPOINT, MARKER_END};
use hypercall_abi::{HYPERCALL_PORT, Regs, virtio};
use kvm_ioctls::{SyncReg, VcpuExit};

use crate::devices::PioAction;
use crate::devices::virtio::MmioDevice;
use crate::error::{Error, Result};
use crate::hypercall::{self, Context, Outcome};
use crate::kernel_abi::{HiddenBecause, Offer};
use crate::metrics::{ExitReason, Snapshot, Window};
use crate::rusage::{thread_cpu_ns, thread_faults};
use crate::stop::StopReason;
use crate::vm::{POOL_SLOT, Vm};
use crate::{mmu, trap};

/// What one exit asks the loop to do next.
enum Step {
    Continue,
    Hypercall,
    Halt,
    Exit(u32),
    Marker(u32),
    Fault(String),
}

/// How a run ended without a VMM error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// The guest exited with this code.
    Exit(u32),
    /// A stop was requested (timeout, signal) and the loop stopped at an exit boundary.
    Stopped(StopReason),
}

/// Runs until the guest exits or a stop is requested. Returns how it ended and the measured
/// window.
pub(crate) fn run_loop(vm: &mut Vm) -> Result<(End, Option<Window>)> {
    let _slack = TimerSlack::precise();
    // While this lives, a stop request kicks this thread out of KVM_RUN.
    let stop = vm.stop.clone();
    let _running = stop.running();
    run_guest(vm)
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

fn run_guest(vm: &mut Vm) -> Result<(End, Option<Window>)> {
    let mut begin: Option<Snapshot> = None;
    // Resident guest RAM and time at the begin marker and at each checkpoint.
    let mut checkpoints: Vec<(u64, std::time::Instant)> = Vec::new();
    let mut window = None;
    loop {
        // Before every entry: a stop requested while the guest ran kicked it out of KVM_RUN
        // (EINTR) or woke its idle wait, and ends the run here.
        if let Some(reason) = vm.stop.requested() {
            return Ok((End::Stopped(reason), window));
        }
        let step = match step(vm)? {
            Step::Hypercall => hypercall(vm)?,
            Step::Halt => halt(vm)?,
            other => other,
        };
        if vm.pool.resync(&vm.vm, POOL_SLOT)? {
            vm.stats.record_event("shadow_resync");
        }
        match step {
            Step::Continue | Step::Hypercall | Step::Halt => {}
            Step::Exit(code) => return Ok((End::Exit(code), window)),
            Step::Marker(MARKER_BEGIN) => {
                checkpoints.clear();
                let resident = vm.ram.resident_bytes();
                let b = snapshot(vm);
                checkpoints.push((resident, b.at));
                begin = Some(b);
            }
            Step::Marker(MARKER_END) => {
                if let Some(b) = begin.take() {
                    let end = snapshot(vm);
                    let mut w = Window::between(&b, &end);
                    w.resident_bytes = checkpoints.iter().map(|c| c.0).collect();
                    w.resident_bytes.push(vm.ram.resident_bytes());
                    // Checkpoint times, skipping the begin marker's own entry.
                    w.checkpoint_ns = checkpoints[1.min(checkpoints.len())..]
                        .iter()
                        .map(|c| c.1.duration_since(b.at).as_nanos() as u64)
                        .collect();
                    checkpoints.clear();
                    window = Some(w);
                }
            }
            Step::Marker(MARKER_CHECKPOINT) => {
                let at = std::time::Instant::now();
                checkpoints.push((vm.ram.resident_bytes(), at));
            }
            Step::Marker(_) => {}
            Step::Fault(what) => {
                let rip = vm.vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                return Err(Error::GuestFault {
                    what,
                    rip,
                    exits: vm.stats.total,
                });
            }
        }
    }
}

fn snapshot(vm: &Vm) -> Snapshot {
    Snapshot {
        at: std::time::Instant::now(),
        cpu_ns: thread_cpu_ns(),
        faults: thread_faults(),
        prepare: vm.ram.prepare_stats(),
        stats: vm.stats.clone(),
        console_bytes: vm.console.total(),
    }
}

/// Enters the guest once and decodes why it came back.
fn step(vm: &mut Vm) -> Result<Step> {
    let exit = match vm.vcpu.run() {
        Ok(exit) => exit,
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
            vm.stats.record(ExitReason::Intr);
            return Ok(Step::Continue);
        }
        Err(source) => {
            return Err(Error::Kvm {
                op: "run vCPU",
                source,
            });
        }
    };
    let stats = &mut vm.stats;
    Ok(match exit {
        VcpuExit::IoOut(HYPERCALL_PORT, _) if matches!(vm.offer, Offer::Pv(_)) => {
            stats.record(ExitReason::Hypercall);
            Step::Hypercall
        }
        // pvkit is hidden: an unmodified guest has no hypercall port, so a kernel that writes
        // it skipped detection. Counted, and reported as the guest's error.
        VcpuExit::IoOut(HYPERCALL_PORT, _) => {
            stats.record(ExitReason::Pio);
            stats.record_event("hypercall_while_hidden");
            Step::Fault(format!(
                "wrote to the hypercall port {HYPERCALL_PORT:#x} while pvkit is hidden ({}): \
                 detect pvkit with CPUID before making hypercalls",
                match vm.offer {
                    Offer::Hidden(HiddenBecause::NoNote) => {
                        "the kernel has no pvkit ABI note, so it runs as an unmodified guest"
                    }
                    _ => "--mode trapped runs the kernel as an unmodified guest",
                }
            ))
        }
        VcpuExit::IoOut(port, data) => {
            let action = vm.bus.write(port, data, stats);
            let reason = if matches!(action, PioAction::Marker(_)) {
                ExitReason::Marker
            } else {
                ExitReason::Pio
            };
            stats.record(reason);
            match action {
                PioAction::Continue => Step::Continue,
                PioAction::Exit(code) => Step::Exit(code),
                PioAction::Marker(v) => Step::Marker(v),
            }
        }
        VcpuExit::IoIn(port, data) => {
            stats.record(ExitReason::Pio);
            vm.bus.read(port, data, stats);
            Step::Continue
        }
        // Outside RAM and the pool nothing is mapped yet: reads float high, writes are dropped.
        // Pool reads never exit (the slot is readable); pool writes are trapped page-table
        // updates.
        VcpuExit::MmioRead(gpa, data) => {
            stats.record(ExitReason::Mmio);
            match virtio_device(&vm.virtio, gpa) {
                Some((dev, offset)) => {
                    stats.record_device(dev.name());
                    dev.read(offset, data);
                }
                None => data.fill(0xff),
            }
            Step::Continue
        }
        VcpuExit::MmioWrite(gpa, data) => {
            stats.record(ExitReason::Mmio);
            if mmu::frame_index(gpa).is_some() {
                trap::mmu_emul::store(&mut vm.pool, gpa, data, stats);
            } else if let Some((n, offset)) = virtio_slot(gpa)
                && let Some(dev) = vm.virtio.get_mut(n)
            {
                stats.record_device(dev.name());
                dev.write(offset, data);
            }
            Step::Continue
        }
        VcpuExit::Intr => {
            stats.record(ExitReason::Intr);
            Step::Continue
        }
        VcpuExit::Hlt => {
            stats.record(ExitReason::Hlt);
            Step::Halt
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
    })
}

/// Reads the argument registers, dispatches, and writes `rax`/`rdx` back.
fn hypercall(vm: &mut Vm) -> Result<Step> {
    let mut regs = if vm.sync_regs {
        vm.vcpu.sync_regs_mut().regs
    } else {
        vm.vcpu.get_regs().map_err(Error::kvm("get regs"))?
    };
    let call = Regs {
        nr: regs.rax,
        args: [regs.rdi, regs.rsi, regs.rcx, regs.r8],
    };
    let protected_end = vm
        .kernel()
        .end
        .next_multiple_of(hypercall_abi::layout::PAGE_SIZE);
    let mut ctx = Context {
        ram: &vm.ram,
        console: &vm.console,
        clock: &vm.clock,
        pool: &mut vm.pool,
        events: &mut vm.bus.events,
        protected_end,
        features: vm.offer.features(),
    };
    let ret = match hypercall::dispatch(&mut ctx, &call, &mut vm.stats) {
        Outcome::Exit(code) => return Ok(Step::Exit(code)),
        Outcome::Return(ret) => ret,
    };
    regs.rax = ret.status;
    regs.rdx = ret.value;
    if vm.sync_regs {
        let sync = &mut vm.vcpu.sync_regs_mut().regs;
        sync.rax = ret.status;
        sync.rdx = ret.value;
        vm.vcpu.set_sync_dirty_reg(SyncReg::Register);
    } else {
        vm.vcpu.set_regs(&regs).map_err(Error::kvm("set regs"))?;
    }
    Ok(Step::Continue)
}

/// `hlt`: wait for the next timer tick or event and raise its interrupt. A guest that halts
/// with interrupts disabled, or with nothing that could ever wake it, is stuck for good.
fn halt(vm: &mut Vm) -> Result<Step> {
    if vm.vcpu.get_kvm_run().if_flag == 0 {
        return Ok(Step::Fault(
            "halted (KVM_EXIT_HLT) with interrupts disabled: nothing can wake it".into(),
        ));
    }
    // An active virtio device may complete a request at any time.
    let device_active = vm.virtio.iter().any(|d| d.is_active());
    let bus = &mut vm.bus;
    let tick = bus.timer.next_due();
    let mut events = bus.events.drain();
    if events == 0 {
        if tick.is_none() && bus.event_device.outstanding() == 0 && !device_active {
            return Ok(Step::Fault(
                "halted (KVM_EXIT_HLT) with no timer running, no event outstanding and no \
                 active device"
                    .into(),
            ));
        }
        let timeout = tick.map(|t| t.saturating_duration_since(Instant::now()));
        events = bus.events.wait(timeout);
        if vm.stop.requested().is_some() {
            // Woken to stop: the loop ends before the next entry; inject nothing.
            return Ok(Step::Continue);
        }
    }
    let vector = if events > 0 {
        EVENT_VECTOR
    } else {
        bus.timer.ack(Instant::now());
        TIMER_VECTOR
    };
    inject_interrupt(&vm.vcpu, vector)?;
    Ok(Step::Continue)
}

vmm_sys_util::ioctl_iow_nr!(
    KVM_INTERRUPT,
    kvm_bindings::KVMIO,
    0x86,
    kvm_bindings::kvm_interrupt
);

/// Queues external interrupt `vector` (KVM_INTERRUPT; kvm-ioctls has no wrapper for it).
fn inject_interrupt(vcpu: &kvm_ioctls::VcpuFd, vector: u8) -> Result<()> {
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

/// The virtio device window `gpa` falls in, and its offset there, if it is inside the device
/// windows at all.
fn virtio_slot(gpa: u64) -> Option<(usize, u64)> {
    let rel = gpa.checked_sub(virtio::window(0))?;
    let n = rel / virtio::VIRTIO_MMIO_SLOT;
    (n < virtio::VIRTIO_MMIO_MAX_DEVICES).then_some((n as usize, rel % virtio::VIRTIO_MMIO_SLOT))
}

/// The device whose window holds `gpa`, and the offset in it.
fn virtio_device(devices: &[MmioDevice], gpa: u64) -> Option<(&MmioDevice, u64)> {
    let (n, offset) = virtio_slot(gpa)?;
    Some((devices.get(n)?, offset))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtio_slots_cover_the_device_windows_only() {
        assert_eq!(virtio_slot(virtio::window(0)), Some((0, 0)));
        assert_eq!(virtio_slot(virtio::window(0) + 0x70), Some((0, 0x70)));
        assert_eq!(virtio_slot(virtio::window(1) + 0xfff), Some((1, 0xfff)));
        assert_eq!(virtio_slot(virtio::window(15)), Some((15, 0)));
        assert_eq!(virtio_slot(virtio::window(16)), None);
        assert_eq!(virtio_slot(virtio::window(0) - 1), None);
        assert_eq!(virtio_slot(0), None);
        assert_eq!(virtio_slot(u64::MAX), None);
        assert!(virtio_device(&[], virtio::window(0)).is_none());
    }
}
