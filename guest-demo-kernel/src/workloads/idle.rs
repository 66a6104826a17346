//! `idle` (arguments `strategy` = `spin` | `hlt` | `pv`, default `pv` in PV mode and `hlt` in
//! trapped mode; `intervals`, default 50, 1..=1000; `interval_us`, default 10000, at most
//! 60000000; `tick_hz`, default 1000, 1..=10000, for `hlt` only; `warm_mib`, default 0, at most
//! 2048): how precisely, and at what cost to the host, the guest sleeps until a series of
//! deadlines with each of the strategies of `guest_pv::idle`.
//!
//! `warm_mib` > 0 makes it a lightly loaded service that once used memory: before the begin
//! marker the guest allocates that much through `guest_pv::frames::Frames`, writes every word
//! (at CPL 3), and frees it all — a PV guest (with `zero_hints`) releases it to the host, an
//! unmodified guest keeps it backed — so a host running many of them sees the difference in
//! its resident memory (`compare --workload density`). The words written are folded into the
//! checksum, which stays the same in every mode.
//!
//! Runs at CPL 0 (`hlt` is privileged; the timed section is mostly parked anyway). Before the
//! begin marker: the TSC clock from CPUID (`guest_pv::tsc::Tsc`), and for `hlt` the trapped
//! timer started at `1_000_000 / tick_hz` µs, for `pv` the TSC-to-host clock mapping (one
//! `clock_ns`) and the wake-up cost (`guest_pv::idle::PvIdle::measure_wake_cost`, 9 parks of
//! 50 µs): `pv` spins to a deadline closer than that instead of parking. Timed section:
//! `start` = TSC now; for `k` in `1..=intervals`, deadline = `start + k * interval_us µs`; idle
//! until it, then read the TSC at once: overshoot `k` = now − deadline (0 if negative). After the end marker the timer is stopped.
//!
//! `ops` = `intervals`. Checksum: FNV-1a over the number of intervals completed (8 little-endian
//! bytes), the same for every strategy and mode. Extra result fields: `strategy=<s>
//! wake_overshoot_ns_p50=<n> wake_overshoot_ns_p99=<n> ticks=<n> wake_cost_ns=<n>`:
//! nearest-rank percentiles of the overshoots, the timer interrupts taken in the timed section
//! (0 unless `hlt`), and the measured wake-up cost (0 unless `pv`).
//!
//! Interrupts are enabled only inside `hlt`'s `sti; hlt` (IF = 0 everywhere else, as for every
//! other workload). Errors: an unknown strategy, `strategy=pv` in trapped mode or an argument out
//! of range exit with code 2; a host without the TSC frequency (or, for `pv`, without
//! `idle_yield`/`clock_ns`) with code 4.

use core::fmt::{self, Write};

use crate::args::Args;
use guest_pv::frames::{Frames, Hints};
use guest_pv::idle::{Strategy, percentile};
use guest_pv::{Fnv1a, cpu};
use hypercall_abi::features;
use hypercall_abi::idle::TIMER_VECTOR;
use hypercall_abi::layout::PAGE_SIZE;

use super::idling::{self, DEFAULT_TICK_HZ, Idler, MAX_TICK_HZ};
use super::{Env, Outcome, Workload};
use crate::platform::{Platform, at_cpl3, marker_begin, marker_end, timer_start, timer_stop};

pub const WORKLOAD: Workload = Workload {
    name: "idle",
    keys: &["intervals", "interval_us", "tick_hz", "warm_mib"],
    text_keys: &["strategy"],
    run,
};

const DEFAULT_INTERVALS: u64 = 50;
/// The most intervals (the overshoots are kept in a fixed array on the stack).
const MAX_INTERVALS: usize = 1000;
const DEFAULT_INTERVAL_US: u64 = 10_000;
/// The longest interval: one minute.
const MAX_INTERVAL_US: u64 = 60_000_000;

/// The checked arguments.
#[derive(Debug, Clone, Copy)]
struct Config {
    strategy: Strategy,
    intervals: usize,
    interval_ns: u64,
    /// The timer period (`hlt` only).
    tick_us: u32,
    /// MiB to use and free before the timed section.
    warm_mib: u64,
}

/// The most `warm_mib`.
const MAX_WARM_MIB: u64 = 2048;

fn run(env: &mut Env, args: &Args<'_>) -> Outcome {
    let cfg = match config(env.platform, args) {
        Ok(cfg) => cfg,
        Err(why) => WORKLOAD.usage(env, format_args!("{why}")),
    };
    let tsc = idling::clock_or_exit(env, &WORKLOAD);
    let mut idler = Idler::new(cfg.strategy, env.platform, tsc);

    let warm = match cfg.warm_mib {
        0 => None,
        mib => Some(warm_up(env, mib)),
    };
    // Wake-up times are kept as raw TSC ticks and converted after the timed section: every
    // instruction on the wake-up path costs ~250 ns of host CPU at CPL0 on our KVM.
    let mut overshoots = [0u64; MAX_INTERVALS];
    let overshoots = &mut overshoots[..cfg.intervals];
    if cfg.strategy == Strategy::Hlt {
        timer_start(cfg.tick_us);
    }
    let ticks_before = cpu::interrupt_count(TIMER_VECTOR);

    marker_begin();
    let start = tsc.now_ns();
    let mut deadline = start;
    for woke in overshoots.iter_mut() {
        deadline = deadline.saturating_add(cfg.interval_ns);
        idler.idle_until(&tsc, deadline);
        *woke = guest_pv::tsc::rdtsc();
    }
    marker_end();
    let mut deadline = start;
    for o in overshoots.iter_mut() {
        deadline = deadline.saturating_add(cfg.interval_ns);
        *o = tsc.ticks_to_ns(*o).saturating_sub(deadline);
    }

    if cfg.strategy == Strategy::Hlt {
        timer_stop();
    }
    let ticks = cpu::interrupt_count(TIMER_VECTOR) - ticks_before;
    overshoots.sort_unstable();
    let p50 = percentile(overshoots, 50).unwrap_or(0);
    let p99 = percentile(overshoots, 99).unwrap_or(0);

    let completed = overshoots.len() as u64;
    let mut h = Fnv1a::new();
    h.write_u64(completed);
    if let Some(sum) = warm {
        h.write_u64(sum);
    }
    let mut outcome = Outcome::new(completed, h.finish());
    let wake_cost = idler.wake_cost_ns();
    let _ = write!(
        outcome.fields,
        " strategy={} wake_overshoot_ns_p50={p50} wake_overshoot_ns_p99={p99} ticks={ticks} \
         wake_cost_ns={wake_cost}",
        cfg.strategy.name()
    );
    outcome
}

/// Checks the arguments against each other and the host's features.
fn config<'a>(platform: Platform, args: &Args<'a>) -> Result<Config, ArgError<'a>> {
    let name = args.get_str("strategy");
    let strategy = idling::strategy(platform, name).map_err(|e| match (e, name) {
        (None, Some(name)) => ArgError::Strategy(name),
        _ => ArgError::PvInTrapped,
    })?;
    let intervals = args.get_or("intervals", DEFAULT_INTERVALS);
    if intervals == 0 || intervals > MAX_INTERVALS as u64 {
        return Err(ArgError::Intervals(intervals));
    }
    let interval_us = args.get_or("interval_us", DEFAULT_INTERVAL_US);
    if interval_us > MAX_INTERVAL_US {
        return Err(ArgError::IntervalUs(interval_us));
    }
    let tick_hz = args.get_or("tick_hz", DEFAULT_TICK_HZ);
    if tick_hz == 0 || tick_hz > MAX_TICK_HZ {
        return Err(ArgError::TickHz(tick_hz));
    }
    let warm_mib = args.get_or("warm_mib", 0);
    if warm_mib > MAX_WARM_MIB {
        return Err(ArgError::WarmMib(warm_mib));
    }
    Ok(Config {
        strategy,
        intervals: intervals as usize,
        // At most 6e10 µs · 1000: no overflow, nor in `intervals` times it.
        interval_ns: interval_us * 1000,
        // 100..=1_000_000.
        tick_us: (1_000_000 / tick_hz) as u32,
        warm_mib,
    })
}

/// Why the arguments were refused.
#[derive(Debug, Clone, Copy)]
enum ArgError<'a> {
    Strategy(&'a str),
    PvInTrapped,
    Intervals(u64),
    IntervalUs(u64),
    TickHz(u64),
    WarmMib(u64),
}

impl fmt::Display for ArgError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArgError::Strategy(s) => write!(f, "unknown strategy '{s}' (known: spin, hlt, pv)"),
            ArgError::PvInTrapped => f.write_str(
                "strategy=pv needs a pvkit host offering idle_yield and clock (use spin or hlt)",
            ),
            ArgError::Intervals(n) => write!(f, "intervals={n} (want 1..={MAX_INTERVALS})"),
            ArgError::IntervalUs(n) => {
                write!(f, "interval_us={n} (want at most {MAX_INTERVAL_US})")
            }
            ArgError::TickHz(n) => write!(f, "tick_hz={n} (want 1..={MAX_TICK_HZ})"),
            ArgError::WarmMib(n) => write!(f, "warm_mib={n} (want at most {MAX_WARM_MIB})"),
        }
    }
}

/// Uses `mib` MiB of memory once and frees it (see the module docs); returns the wrapping sum
/// of every word written.
fn warm_up(env: &mut Env, mib: u64) -> u64 {
    let n = mib * (1 << 20) / PAGE_SIZE;
    let len = Frames::region_bytes(n);
    let base = match super::free_ram_start(env.boot_info, len) {
        Ok(base) => base,
        Err(largest) => WORKLOAD.usage(
            env,
            format_args!(
                "warm_mib={mib} does not fit in the largest free region ({largest} bytes)"
            ),
        ),
    };
    let hints = match env.platform.feature(features::ZERO_HINTS) {
        Some(pv) => Hints::Pv(pv),
        None => Hints::None,
    };
    // SAFETY: the range is free RAM above the kernel (`free_ram_start`), identity-mapped,
    // user-accessible and used by nothing else (one workload per boot); the hint buffers are a
    // kernel static handed out once.
    let mut frames = match unsafe { Frames::new(base, len, hints, super::hint_buffers()) } {
        Ok(f) => f,
        Err(e) => panic!("idle: warm-up allocator: {e}"),
    };
    let sum = at_cpl3(|| {
        let mut sum = 0u64;
        for i in 0..n {
            let addr = match frames.alloc() {
                Ok(a) => a,
                Err(e) => panic!("idle: warm-up allocation {i}: {e}"),
            };
            let p = core::ptr::with_exposed_provenance_mut::<u64>(addr as usize);
            for j in 0..PAGE_SIZE / 8 {
                let w = (i << 9 | j).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                // SAFETY: a frame the allocator just handed out: identity-mapped, writable,
                // user-accessible, used by nothing else.
                unsafe { p.add(j as usize).write(w) };
                sum = sum.wrapping_add(w);
            }
        }
        let start = frames.start();
        for i in 0..n {
            // SAFETY: frame `i` (bump order from `start`) was allocated above and nothing uses
            // it any more.
            if let Err(e) = unsafe { frames.free(start + i * PAGE_SIZE) } {
                panic!("idle: warm-up free {i}: {e}");
            }
        }
        sum
    });
    // A PV guest gives back what is still queued; an unmodified one has nothing to give.
    frames.flush();
    sum
}
