//! Many VMs on one host (`host-vmm fleet`, `compare --workload density`): N independent VMs of
//! the same configuration, each built and run on its own thread (and its own vCPU thread), and
//! what they cost the host together.
//!
//! Each VM is measured as `compare` measures one ([`crate::compare::measure_gated`]), and the
//! VMs start and end their measured windows together: each waits at its begin marker until
//! every other has reached its own or ended, and at its end marker until every other has left
//! its window or ended ([`StartGate`]), so no window overlaps another VM's boot, warm-up or
//! teardown. A VM that fails is reported as failed and the others go on. The whole fleet's
//! host cost is the process's:
//! CPU time (user + system, every thread) over the fleet's wall time, and the resident set
//! sampled every [`RSS_SAMPLE_INTERVAL`] while the VMs run.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::compare::{GuestResult, Measured, StartGate, measure_gated};
use crate::config::VmConfig;
use crate::console::ConsoleSink;
use crate::rusage::process_cpu_ns;

/// The most VMs one fleet runs.
pub const FLEET_MAX: usize = 256;
/// How often the fleet's resident set is sampled.
pub const RSS_SAMPLE_INTERVAL: Duration = Duration::from_millis(20);

/// One VM of a fleet.
#[derive(Debug)]
pub struct Member {
    /// Its index, 0-based.
    pub index: usize,
    /// What its run gave, or why it failed.
    pub run: Result<Measured, String>,
}

impl Member {
    /// Its result line, if it ran and printed one.
    pub fn result(&self) -> Option<&GuestResult> {
        self.run.as_ref().ok().and_then(|m| m.result.as_ref())
    }

    /// Whether it ran and the guest exited with 0 by itself.
    pub fn ok(&self) -> bool {
        self.run
            .as_ref()
            .is_ok_and(|m| m.report.stopped.is_none() && m.report.exit_code == 0)
    }

    /// What went wrong, in a few words, or `None`.
    pub fn failure(&self) -> Option<String> {
        match &self.run {
            Err(e) => Some(e.clone()),
            Ok(m) if m.report.stopped.is_some() => {
                Some(format!("stopped: {}", m.report.stopped.expect("checked")))
            }
            Ok(m) if m.report.exit_code != 0 => {
                Some(format!("the guest exited with {}", m.report.exit_code))
            }
            Ok(_) => None,
        }
    }
}

/// What a fleet did and cost.
#[derive(Debug)]
pub struct FleetReport {
    /// The VMs, in index order.
    pub members: Vec<Member>,
    /// From the first VM's start to the last one's end.
    pub wall_ns: u64,
    /// The process's CPU time (user + system, all threads) over the same span.
    pub cpu_ns: u64,
    /// The process's resident set, sampled while the VMs ran: the median sample.
    pub rss_median_bytes: u64,
    /// The largest sample.
    pub rss_max_bytes: u64,
    /// The steady span, from the moment every VM was in its measured window to the first end
    /// of one ([`StartGate::steady`]): its wall time and the process's CPU time in it (every
    /// thread); `None` if no VM reached both markers.
    pub steady: Option<(u64, u64)>,
}

impl FleetReport {
    /// Host CPU over wall time: 1.0 is one core busy all the time.
    pub fn cores(&self) -> f64 {
        self.cpu_ns as f64 / self.wall_ns.max(1) as f64
    }

    /// Host CPU in the steady span over its wall time (see [`FleetReport::steady`]).
    pub fn steady_cores(&self) -> Option<f64> {
        self.steady
            .map(|(wall, cpu)| cpu as f64 / wall.max(1) as f64)
    }

    /// VMs that ran to a clean exit.
    pub fn ok_count(&self) -> usize {
        self.members.iter().filter(|m| m.ok()).count()
    }
}

/// The process's resident set now (`VmRSS`), 0 if unknown.
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib << 10)
}

/// Runs `vms` VMs of `cfg` at once, each on its own thread, until all have ended.
pub fn run(cfg: &VmConfig, vms: usize) -> Result<FleetReport, String> {
    if vms == 0 || vms > FLEET_MAX {
        return Err(format!("a fleet has 1 to {FLEET_MAX} VMs, not {vms}"));
    }
    let done = AtomicBool::new(false);
    let gate = StartGate::new(vms);
    let cpu0 = process_cpu_ns();
    let start = Instant::now();
    let (members, samples) = std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut samples = Vec::new();
            while !done.load(Ordering::Acquire) {
                samples.push(rss_bytes());
                std::thread::sleep(RSS_SAMPLE_INTERVAL);
            }
            samples
        });
        let threads: Vec<_> = (0..vms)
            .map(|index| {
                std::thread::Builder::new()
                    .name(format!("pvkit-fleet-{index}"))
                    .spawn_scoped(s, || {
                        measure_gated(cfg, ConsoleSink::new(None), Some(&gate))
                            .map_err(|e| e.to_string())
                    })
            })
            .collect();
        let members: Vec<Member> = threads
            .into_iter()
            .enumerate()
            .map(|(index, t)| Member {
                index,
                run: match t {
                    Ok(handle) => handle
                        .join()
                        .unwrap_or_else(|_| Err("its thread panicked".into())),
                    Err(e) => Err(format!("cannot start its thread: {e}")),
                },
            })
            .collect();
        done.store(true, Ordering::Release);
        let samples = sampler.join().unwrap_or_default();
        (members, samples)
    });
    let wall_ns = start.elapsed().as_nanos() as u64;
    let cpu_ns = process_cpu_ns().saturating_sub(cpu0);
    let mut sorted = samples;
    sorted.sort_unstable();
    Ok(FleetReport {
        members,
        wall_ns,
        cpu_ns,
        rss_median_bytes: sorted.get(sorted.len() / 2).copied().unwrap_or(0),
        rss_max_bytes: sorted.last().copied().unwrap_or(0),
        steady: gate
            .steady()
            .map(|(wall, cpu)| (wall.as_nanos() as u64, cpu)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fleet_sizes_are_bounded() {
        let cfg = VmConfig::new(hypercall_abi::boot::Mode::Pv, "hello");
        assert!(run(&cfg, 0).is_err());
        assert!(run(&cfg, FLEET_MAX + 1).is_err());
    }

    #[test]
    fn the_process_is_measured() {
        assert!(rss_bytes() > 0);
        let a = process_cpu_ns();
        let mut x = 0u64;
        // `black_box` in the loop: a release build would otherwise fold the sum into a formula
        // and use no measurable CPU.
        for i in 0..20_000_000u64 {
            x = std::hint::black_box(x.wrapping_add(i * i));
        }
        assert!(process_cpu_ns() > a);
    }
}
