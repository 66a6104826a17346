//! Marker windows: what a workload measures between its begin and end markers, recorded by a
//! [`RunObserver`] on the vCPU thread. The VM core only passes markers on; what they mean is
//! the harness's business.

use std::ops::Deref;
use std::time::Instant;

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
    let mut recorder = WindowRecorder::default();
    let report = crate::builder::build(cfg, console)?.run_observed(&mut recorder)?;
    let result = GuestResult::parse(&report.console);
    Ok(Measured {
        report,
        window: recorder.window(),
        result,
    })
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
