//! Exit statistics: counts by exit reason, by hypercall and by trapped device. They are the
//! raw material of every PV-versus-trapped comparison.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::Serialize;

/// Why the vCPU left the guest (the keys of the `exits` object in reports).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ExitReason {
    /// A PIO write to the hypercall port.
    Hypercall,
    /// A PIO access to an emulated (trapped) device port.
    Pio,
    /// A measurement marker (harness, not workload).
    Marker,
    /// An MMIO access.
    Mmio,
    /// `hlt`.
    Hlt,
    /// Interrupted by a signal (KVM_EXIT_INTR / EINTR).
    Intr,
    /// Anything else.
    Other,
}

impl ExitReason {
    /// Stable key.
    pub fn name(self) -> &'static str {
        match self {
            ExitReason::Hypercall => "hypercall",
            ExitReason::Pio => "pio",
            ExitReason::Marker => "marker",
            ExitReason::Mmio => "mmio",
            ExitReason::Hlt => "hlt",
            ExitReason::Intr => "intr",
            ExitReason::Other => "other",
        }
    }
}

/// Counters; cheap to copy at a marker and subtract.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ExitStats {
    /// All exits.
    pub total: u64,
    /// By reason name.
    pub by_reason: BTreeMap<&'static str, u64>,
    /// Hypercalls by call name (unknown numbers count as "invalid").
    pub by_hypercall: BTreeMap<&'static str, u64>,
    /// Trapped PIO accesses by device name.
    pub by_device: BTreeMap<&'static str, u64>,
    /// Work done on the guest's behalf (e.g. `pte_pv`, `pte_trapped`, `pte_rejected`).
    pub events: BTreeMap<&'static str, u64>,
}

impl ExitStats {
    /// Counts one exit.
    pub fn record(&mut self, reason: ExitReason) {
        self.total += 1;
        *self.by_reason.entry(reason.name()).or_default() += 1;
    }

    /// Counts one hypercall by name.
    pub fn record_hypercall(&mut self, name: &'static str) {
        *self.by_hypercall.entry(name).or_default() += 1;
    }

    /// Counts one trapped-device access.
    pub fn record_device(&mut self, name: &'static str) {
        *self.by_device.entry(name).or_default() += 1;
    }

    /// Counts one event.
    pub fn record_event(&mut self, name: &'static str) {
        self.add_event(name, 1);
    }

    /// Counts `n` events.
    pub fn add_event(&mut self, name: &'static str, n: u64) {
        if n > 0 {
            *self.events.entry(name).or_default() += n;
        }
    }

    /// Events of a kind.
    pub fn event(&self, name: &str) -> u64 {
        self.events.get(name).copied().unwrap_or(0)
    }

    /// Exits of a given reason.
    pub fn reason(&self, reason: ExitReason) -> u64 {
        self.by_reason.get(reason.name()).copied().unwrap_or(0)
    }

    /// `self - earlier`, dropping zero entries.
    pub fn since(&self, earlier: &ExitStats) -> ExitStats {
        fn diff(
            a: &BTreeMap<&'static str, u64>,
            b: &BTreeMap<&'static str, u64>,
        ) -> BTreeMap<&'static str, u64> {
            a.iter()
                .map(|(k, v)| (*k, v - b.get(k).copied().unwrap_or(0)))
                .filter(|(_, v)| *v > 0)
                .collect()
        }
        ExitStats {
            total: self.total - earlier.total,
            by_reason: diff(&self.by_reason, &earlier.by_reason),
            by_hypercall: diff(&self.by_hypercall, &earlier.by_hypercall),
            by_device: diff(&self.by_device, &earlier.by_device),
            events: diff(&self.events, &earlier.events),
        }
    }

    /// The same counts without the measurement-marker exits.
    pub fn without_markers(mut self) -> ExitStats {
        if let Some(n) = self.by_reason.remove(ExitReason::Marker.name()) {
            self.total -= n;
        }
        self.by_device.remove("marker");
        self
    }

    /// Human-readable multi-line summary (for `--stats`).
    pub fn summary(&self) -> String {
        let join = |m: &BTreeMap<&'static str, u64>| {
            if m.is_empty() {
                "-".to_string()
            } else {
                m.iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            }
        };
        format!(
            "exits: total={} {}\nhypercalls: {}\ntrapped devices: {}\nevents: {}",
            self.total,
            join(&self.by_reason),
            join(&self.by_hypercall),
            join(&self.by_device),
            join(&self.events)
        )
    }
}

/// A snapshot taken at a measurement marker.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// When.
    pub at: Instant,
    /// vCPU thread CPU time.
    pub cpu_ns: u64,
    /// vCPU thread page faults ([`crate::rusage::thread_faults`]).
    pub faults: u64,
    /// What the preparing thread did so far.
    pub prepare: crate::prepare::PrepareStats,
    /// Exit counts so far.
    pub stats: ExitStats,
    /// Console bytes so far.
    pub console_bytes: u64,
}

/// What happened between the begin and end markers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Window {
    /// Wall time between the markers.
    pub wall_ns: u64,
    /// CPU time of the vCPU thread between the markers.
    pub host_cpu_ns: u64,
    /// Page faults the vCPU thread took between the markers (host faults on first touch of
    /// guest RAM, among others).
    pub host_faults: u64,
    /// CPU time of the preparing thread (`zero_hints(PREPARE)`) between the markers.
    pub prepare_cpu_ns: u64,
    /// Bytes the preparing thread populated between the markers.
    pub prepared_bytes: u64,
    /// Exits between the markers (marker exits excluded).
    pub exits: ExitStats,
    /// Offset of the first console byte written inside the window (in the captured output).
    pub console_start: u64,
    /// Offset one past the last console byte written inside the window.
    pub console_end: u64,
    /// Guest RAM backed by host memory (bytes) at the begin marker, at each checkpoint marker,
    /// and at the end marker, in that order.
    pub resident_bytes: Vec<u64>,
    /// Wall time from the begin marker to each checkpoint marker, in order.
    pub checkpoint_ns: Vec<u64>,
}

impl Window {
    /// The window between two snapshots.
    pub fn between(begin: &Snapshot, end: &Snapshot) -> Window {
        Window {
            wall_ns: end.at.duration_since(begin.at).as_nanos() as u64,
            host_cpu_ns: end.cpu_ns.saturating_sub(begin.cpu_ns),
            host_faults: end.faults.saturating_sub(begin.faults),
            prepare_cpu_ns: end.prepare.cpu_ns.saturating_sub(begin.prepare.cpu_ns),
            prepared_bytes: end
                .prepare
                .populated_bytes
                .saturating_sub(begin.prepare.populated_bytes),
            exits: end.stats.since(&begin.stats).without_markers(),
            console_start: begin.console_bytes,
            console_end: end.console_bytes,
            resident_bytes: Vec::new(),
            checkpoint_ns: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_and_markers() {
        let mut a = ExitStats::default();
        a.record(ExitReason::Marker);
        a.record_device("marker");
        let begin = a.clone();
        for _ in 0..3 {
            a.record(ExitReason::Hypercall);
            a.record_hypercall("null");
        }
        a.record(ExitReason::Marker);
        a.record_device("marker");
        let w = a.since(&begin).without_markers();
        assert_eq!(w.total, 3);
        assert_eq!(w.reason(ExitReason::Hypercall), 3);
        assert_eq!(w.by_hypercall["null"], 3);
        assert!(w.by_device.is_empty());
        assert!(a.summary().contains("hypercall=3"));
    }

    #[test]
    fn thread_cpu_time_advances() {
        let t0 = crate::rusage::thread_cpu_ns();
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(crate::rusage::thread_cpu_ns() > t0);
    }
}
