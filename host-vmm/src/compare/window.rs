//! Marker windows: what a workload measures between its begin and end markers, recorded by a
//! [`RunObserver`] on the vCPU thread. The VM core only passes markers on; what they mean is
//! the harness's business.

use std::ops::Deref;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hypercall_abi::ports::{MARKER_BEGIN, MARKER_CHECKPOINT, MARKER_END};

use super::result::GuestResult;
use crate::config::VmConfig;
use crate::console::ConsoleSink;
use crate::error::Result;
use crate::machine::Machine;
use crate::metrics::{Snapshot, Window};
use crate::rusage::{thread_cpu_ns, thread_faults};
use crate::vm::{RunObserver, RunReport};

/// The most checkpoint markers a window records. Each one reads the page map over all of guest
/// RAM (resident bytes), so a guest flooding them must not cost the host memory or a scan per
/// exit: later checkpoints, and checkpoints outside a begin/end window, are ignored.
pub const CHECKPOINTS_MAX: usize = 64;

/// Records the window between the begin and end markers, with the checkpoints in between.
#[derive(Debug, Default)]
pub struct WindowRecorder {
    begin: Option<Snapshot>,
    /// Resident guest RAM and time at the begin marker and at each checkpoint.
    checkpoints: Vec<(u64, Instant)>,
    window: Option<Window>,
}

impl WindowRecorder {
    /// The last complete window, if the guest wrote both markers.
    pub fn window(self) -> Option<Window> {
        self.window
    }
}

fn snapshot(machine: &Machine) -> Snapshot {
    Snapshot {
        at: Instant::now(),
        cpu_ns: thread_cpu_ns(),
        faults: thread_faults(),
        prepare: machine.ram().prepare_stats(),
        stats: machine.stats().clone(),
        console_bytes: machine.console().total(),
    }
}

impl RunObserver for WindowRecorder {
    fn marker(&mut self, value: u32, machine: &Machine) {
        match value {
            MARKER_BEGIN => {
                self.checkpoints.clear();
                let resident = machine.ram().resident_bytes();
                let b = snapshot(machine);
                self.checkpoints.push((resident, b.at));
                self.begin = Some(b);
            }
            MARKER_END => {
                if let Some(b) = self.begin.take() {
                    let end = snapshot(machine);
                    let mut w = Window::between(&b, &end);
                    w.resident_bytes = self.checkpoints.iter().map(|c| c.0).collect();
                    w.resident_bytes.push(machine.ram().resident_bytes());
                    // Checkpoint times, skipping the begin marker's own entry.
                    w.checkpoint_ns = self.checkpoints[1.min(self.checkpoints.len())..]
                        .iter()
                        .map(|c| c.1.duration_since(b.at).as_nanos() as u64)
                        .collect();
                    self.checkpoints.clear();
                    self.window = Some(w);
                }
            }
            // The begin marker's own entry is `checkpoints[0]`.
            MARKER_CHECKPOINT
                if self.begin.is_some() && self.checkpoints.len() <= CHECKPOINTS_MAX =>
            {
                let at = Instant::now();
                self.checkpoints.push((machine.ram().resident_bytes(), at));
            }
            _ => {}
        }
    }
}

/// A run of a workload, measured: the VM's report, the marker window and the result line.
#[derive(Debug, Clone)]
pub struct Measured {
    /// The VM's report.
    pub report: RunReport,
    /// The window between the markers, if the guest wrote both.
    pub window: Option<Window>,
    /// The guest's `PVKIT-RESULT` line, if it printed one.
    pub result: Option<GuestResult>,
}

impl Deref for Measured {
    type Target = RunReport;

    fn deref(&self) -> &RunReport {
        &self.report
    }
}

impl Measured {
    /// The console bytes written inside the measured window.
    pub fn window_console(&self) -> &[u8] {
        let Some(w) = &self.window else { return &[] };
        let c = &self.report.console;
        let len = c.len() as u64;
        &c[w.console_start.min(len) as usize..w.console_end.min(len) as usize]
    }
}

/// Builds and runs `cfg`, recording its marker window and result line.
pub fn measure(cfg: &VmConfig, console: ConsoleSink) -> Result<Measured> {
    measure_gated(cfg, console, None)
}

/// [`measure`], holding the guest at its first begin marker until every VM sharing `gate` has
/// reached its own (or ended without one), and at its first end marker until every VM that
/// started a window has ended it (or its run): many VMs then start their measured windows
/// together, none of them while others still boot, and none ends its window while others
/// are already being torn down (a fleet, [`crate::fleet`]). Without a gate, as [`measure`].
pub fn measure_gated(
    cfg: &VmConfig,
    console: ConsoleSink,
    gate: Option<&StartGate>,
) -> Result<Measured> {
    let mut observer = Gated {
        recorder: WindowRecorder::default(),
        gate,
        arrived: false,
        left: false,
    };
    let run = crate::builder::build(cfg, console).and_then(|vm| vm.run_observed(&mut observer));
    if let Some(g) = gate {
        if !observer.arrived {
            g.withdraw();
        } else if !observer.left {
            g.leave();
        }
    }
    let report = run?;
    let result = GuestResult::parse(&report.console);
    Ok(Measured {
        report,
        window: observer.recorder.window(),
        result,
    })
}

/// A [`WindowRecorder`] that waits at a [`StartGate`] on the first begin marker (before
/// recording it) and on the first end marker (after recording it, so the wait is outside the
/// window).
struct Gated<'g> {
    recorder: WindowRecorder,
    gate: Option<&'g StartGate>,
    arrived: bool,
    left: bool,
}

impl RunObserver for Gated<'_> {
    fn marker(&mut self, value: u32, machine: &Machine) {
        let Some(g) = self.gate else {
            self.recorder.marker(value, machine);
            return;
        };
        if value == MARKER_BEGIN && !self.arrived {
            self.arrived = true;
            g.arrive_and_wait();
        }
        self.recorder.marker(value, machine);
        if value == MARKER_END && self.arrived && !self.left {
            self.left = true;
            g.leave_and_wait();
        }
    }
}

/// A start and finish line for the measured windows of many VMs: it opens once each of
/// `expected` members has arrived ([`arrive_and_wait`](Self::arrive_and_wait)) or withdrawn
/// (ended without arriving: failed to build, or exited early), and a member that has left its
/// window ([`leave_and_wait`](Self::leave_and_wait)) waits until every member has left or
/// withdrawn, so no member's last requests share the host with another's teardown (which on
/// our hosts delays a parked vCPU's wake-up by milliseconds). A member waits at most
/// [`START_GATE_TIMEOUT`] at either line; then it goes on alone (a member that hangs never
/// holds the others for good).
///
/// It also measures the span in which every member that arrived is inside its window — from
/// the gate's opening to the first member's end marker (or end) — and what the whole process
/// spent in it ([`steady`](Self::steady)): the host cost of the VMs' steady state, every
/// thread included, without anyone's boot or teardown.
#[derive(Debug)]
pub struct StartGate {
    state: Mutex<GateState>,
    open: Condvar,
}

#[derive(Debug)]
struct GateState {
    /// Members that have neither arrived nor withdrawn.
    missing: usize,
    /// Members that have neither left nor withdrawn.
    unfinished: usize,
    /// When the gate opened, and the process's CPU time then.
    opened: Option<(Instant, u64)>,
    /// The steady span's wall and process CPU time, once the first member left it.
    steady: Option<(Duration, u64)>,
}

/// The longest a member waits at either line of a [`StartGate`].
pub const START_GATE_TIMEOUT: Duration = Duration::from_secs(60);

impl StartGate {
    /// A gate for `expected` members.
    pub fn new(expected: usize) -> StartGate {
        StartGate {
            state: Mutex::new(GateState {
                missing: expected,
                unfinished: expected,
                opened: None,
                steady: None,
            }),
            open: Condvar::new(),
        }
    }

    /// Counts the caller in and waits until the gate opens (or [`START_GATE_TIMEOUT`]).
    pub fn arrive_and_wait(&self) {
        let mut st = crate::sync::lock(&self.state);
        self.count_off(&mut st);
        self.wait_until(st, |st| st.missing == 0);
    }

    /// A member that will never arrive (nor leave).
    pub fn withdraw(&self) {
        let mut st = crate::sync::lock(&self.state);
        self.count_off(&mut st);
        self.count_finished(&mut st);
    }

    /// A member that arrived has left its window (its end marker): counts it out and waits
    /// until every member has (or [`START_GATE_TIMEOUT`]).
    pub fn leave_and_wait(&self) {
        let mut st = crate::sync::lock(&self.state);
        self.finish(&mut st);
        self.wait_until(st, |st| st.unfinished == 0);
    }

    /// A member that arrived has ended without leaving its window (its run ended inside it).
    pub fn leave(&self) {
        let mut st = crate::sync::lock(&self.state);
        self.finish(&mut st);
    }

    /// Waits (the lock released) until `done` holds or [`START_GATE_TIMEOUT`] has passed.
    fn wait_until(&self, mut st: MutexGuard<'_, GateState>, done: impl Fn(&GateState) -> bool) {
        let deadline = Instant::now() + START_GATE_TIMEOUT;
        while !done(&st) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            st = match self.open.wait_timeout(st, left) {
                Ok((s, _)) => s,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }

    /// Counts a member out of the windows; the first one ends the steady span.
    fn finish(&self, st: &mut GateState) {
        self.count_finished(st);
        if st.steady.is_none()
            && let Some((at, cpu)) = st.opened
        {
            st.steady = Some((
                at.elapsed(),
                crate::rusage::process_cpu_ns().saturating_sub(cpu),
            ));
        }
    }

    /// The steady span: its wall time and the process's CPU time in it; `None` if the gate
    /// never opened or nobody left a window yet.
    pub fn steady(&self) -> Option<(Duration, u64)> {
        crate::sync::lock(&self.state).steady
    }

    fn count_finished(&self, st: &mut GateState) {
        st.unfinished = st.unfinished.saturating_sub(1);
        if st.unfinished == 0 {
            self.open.notify_all();
        }
    }

    fn count_off(&self, st: &mut GateState) {
        st.missing = st.missing.saturating_sub(1);
        if st.missing == 0 && st.opened.is_none() {
            st.opened = Some((Instant::now(), crate::rusage::process_cpu_ns()));
            self.open.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::attach_pio_devices;
    use crate::devices::event::EventQueue;
    use crate::kernel_abi::{HiddenBecause, Offer};
    use crate::machine::MachineParts;
    use crate::memory::GuestRam;
    use crate::mmu::PageTablePool;

    fn machine() -> Machine {
        let console = ConsoleSink::new(None);
        let events = EventQueue::default();
        let devices = attach_pio_devices(&console, &events).unwrap();
        Machine::new(MachineParts {
            ram: GuestRam::new(16 << 20).unwrap(),
            pool: PageTablePool::new(16 << 20).unwrap(),
            devices,
            events,
            console,
            offer: Offer::Hidden(HiddenBecause::TrappedMode),
            protected_end: 0x40_0000,
        })
        .unwrap()
    }

    #[test]
    fn a_start_gate_opens_when_everyone_arrived_or_withdrew() {
        let gate = StartGate::new(3);
        let passed = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    gate.arrive_and_wait();
                    passed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                });
            }
            std::thread::sleep(Duration::from_millis(50));
            assert_eq!(
                passed.load(std::sync::atomic::Ordering::SeqCst),
                0,
                "closed while one member is missing"
            );
            gate.withdraw();
        });
        assert_eq!(passed.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert!(gate.steady().is_none(), "nobody left a window yet");
        gate.leave();
        let (wall, _cpu) = gate.steady().expect("the first leave ends the steady span");
        assert!(wall < START_GATE_TIMEOUT);
        // Arriving last opens it at once.
        StartGate::new(1).arrive_and_wait();
        // A gate that never opened has no steady span.
        let never = StartGate::new(2);
        never.leave();
        assert!(never.steady().is_none());
    }

    #[test]
    fn a_member_that_left_its_window_waits_for_the_others_to_leave_or_end() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        // Three members: two leave their windows, one arrives and later ends inside its window
        // (its run ended without an end marker); a fourth never arrives (withdraws).
        let gate = StartGate::new(4);
        let released = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    gate.arrive_and_wait();
                    gate.leave_and_wait();
                    released.fetch_add(1, SeqCst);
                });
            }
            s.spawn(|| gate.arrive_and_wait());
            gate.withdraw();
            std::thread::sleep(Duration::from_millis(50));
            assert_eq!(
                released.load(SeqCst),
                0,
                "one member is still in its window"
            );
            gate.leave();
        });
        assert_eq!(released.load(SeqCst), 2);
        assert!(gate.steady().is_some());
        // Leaving last goes on at once.
        let alone = StartGate::new(1);
        alone.arrive_and_wait();
        alone.leave_and_wait();
    }

    #[test]
    fn checkpoints_count_only_inside_a_window_and_are_bounded() {
        let m = machine();
        let mut r = WindowRecorder::default();
        for _ in 0..1000 {
            r.marker(MARKER_CHECKPOINT, &m);
        }
        assert!(
            r.checkpoints.is_empty(),
            "no begin marker: nothing recorded"
        );
        r.marker(MARKER_BEGIN, &m);
        for _ in 0..10_000 {
            r.marker(MARKER_CHECKPOINT, &m);
        }
        r.marker(MARKER_END, &m);
        let w = r.window().unwrap();
        assert_eq!(w.checkpoint_ns.len(), CHECKPOINTS_MAX);
        assert_eq!(w.resident_bytes.len(), CHECKPOINTS_MAX + 2);
    }
}
