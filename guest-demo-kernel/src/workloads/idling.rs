//! How `idle` and `service` idle between deadlines: the strategies of `guest_pv::idle`, set up
//! before the begin marker, and the TSC clock they are timed on.

use guest_pv::idle::{self, PvIdle, Strategy};
use guest_pv::tsc::Tsc;
use hypercall_abi::features;
use hypercall_abi::idle::TIMER_MIN_PERIOD_US;

use super::{Env, Workload};
use crate::platform::Platform;

/// What `strategy=pv` needs from the host.
pub const PV_IDLE: u64 = features::IDLE_YIELD | features::CLOCK;
/// Parks `strategy=pv` takes to measure the wake-up cost (the median is taken).
pub const WAKE_PROBES: usize = 9;
/// The trapped timer's default rate (`hlt`).
pub const DEFAULT_TICK_HZ: u64 = 1000;
/// The fastest tick the host's timer gives (its minimum period).
pub const MAX_TICK_HZ: u64 = 1_000_000 / TIMER_MIN_PERIOD_US as u64;

/// The strategy a workload's `strategy` argument names, or by default `pv` where the host
/// offers [`PV_IDLE`] and `hlt` elsewhere. `Err(None)`: an unknown name; `Err(Some(()))`:
/// `pv` on a host without it.
pub fn strategy(platform: Platform, name: Option<&str>) -> Result<Strategy, Option<()>> {
    let pv = platform.feature(PV_IDLE).is_some();
    let s = match name {
        None if pv => Strategy::Pv,
        None => Strategy::Hlt,
        Some(name) => Strategy::from_name(name).ok_or(None)?,
    };
    if s == Strategy::Pv && !pv {
        return Err(Some(()));
    }
    Ok(s)
}

/// The TSC as a clock: its rate from CPUID (pvkit's `TSC_KHZ`, or the timing leaf of the plain
/// KVM signature pvkit shows when hidden), else measured against `clock_ns` over 10 ms.
pub fn clock(platform: Platform) -> Option<Tsc> {
    Tsc::from_cpuid().or_else(|| {
        let pv = platform.feature(features::CLOCK)?;
        Tsc::calibrate(|| pv.clock_ns(), 10_000_000)
    })
}

/// [`clock`], or `workload` exits as unsupported (code 4) saying why there is none.
pub fn clock_or_exit(env: &mut Env, workload: &Workload) -> Tsc {
    match clock(env.platform) {
        Some(tsc) => tsc,
        None => workload.unsupported(
            env,
            format_args!(
                "no TSC frequency: the host reports none (CPUID leaf 0x40000010) and offers no \
                 clock_ns to measure it against"
            ),
        ),
    }
}

/// How the timed loop idles.
pub enum Idler {
    Spin,
    Hlt,
    Pv(PvIdle),
}

impl Idler {
    /// The idler of `strategy` (checked by [`strategy`]). For `pv` it maps the clocks and
    /// measures what a park costs ([`WAKE_PROBES`] parks), and spins to deadlines closer than
    /// that instead of parking. Panics if a hypercall fails.
    pub fn new(strategy: Strategy, platform: Platform, tsc: Tsc) -> Idler {
        match (strategy, platform.feature(PV_IDLE)) {
            (Strategy::Spin, _) => Idler::Spin,
            (Strategy::Hlt, _) => Idler::Hlt,
            (Strategy::Pv, Some(pv)) => match PvIdle::new(pv, tsc).and_then(|mut idle| {
                let cost = idle.measure_wake_cost(WAKE_PROBES)?;
                Ok(idle.with_spin_below(cost))
            }) {
                Ok(pv_idle) => Idler::Pv(pv_idle),
                Err(e) => panic!("clock_ns or idle_yield: {e}"),
            },
            (Strategy::Pv, None) => unreachable!("strategy=pv without idle_yield and clock"),
        }
    }

    /// Idles until `deadline_ns` (TSC time).
    pub fn idle_until(&mut self, tsc: &Tsc, deadline_ns: u64) {
        match self {
            Idler::Spin => {
                idle::spin(tsc, deadline_ns);
            }
            Idler::Hlt => {
                idle::hlt(tsc, deadline_ns);
            }
            Idler::Pv(pv) => {
                if let Err(e) = pv.idle_until(deadline_ns) {
                    panic!("idle_yield: {e}");
                }
            }
        }
    }

    /// The wake-up cost `pv` measured (0 for the others).
    pub fn wake_cost_ns(&self) -> u64 {
        match self {
            Idler::Pv(pv) => pv.spin_below(),
            _ => 0,
        }
    }
}
