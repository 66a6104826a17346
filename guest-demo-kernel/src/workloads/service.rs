//! `service` (arguments `strategy` = `spin` | `hlt` | `pv`, default `pv` in PV mode and `hlt`
//! in trapped mode; `requests`, default 100, 1..=1000; `period_us`, default 10000, 1..=60000000;
//! `work_kib`, default 64, 4..=65536, a multiple of 4; `tick_hz`, default 1000, 1..=10000, for
//! `hlt` only; `warm_mib`, default 0, at most 2048): a lightly loaded service. It wakes every
//! `period_us`, serves one request — allocates `work_kib` of memory through
//! `guest_pv::frames::Frames`, writes every word (at CPL 3), frees it — and idles again, with
//! the strategies of `guest_pv::idle`, as `idle` does.
//!
//! Memory: what a request frees goes back on the allocator's free stack and, for a PV guest
//! (with `zero_hints`), into its release batch, which goes to the host once 32 MiB are pending
//! (`hypercall_abi::zero::RELEASE_THRESHOLD_BYTES`). The next request reuses those frames first
//! (LIFO), taking them back out of the batch and zeroing them like any dirty frame — so a
//! steady service pays no release exit and no host fault per request in either mode, and what
//! a guest used once and stopped using is what a PV guest gives back. Releasing after every
//! request instead (a `Frames::flush` per request) cost 2–3× the idle wake-up per request on
//! our KVM: the release exit, then a host fault per page on the next write. `warm_mib` > 0
//! first uses and frees that much once, before the begin marker, exactly like `idle`'s
//! warm-up, from the same allocator, and flushes: a PV guest releases it, an unmodified guest
//! keeps it backed (the requests then reuse its most recently freed frames). The allocator's
//! read-ahead (`zero_hints(PREPARE)`) is on for the warm-up and off for the requests: it would
//! have the host back again up to 16 MiB of the released warm-up memory that a request never
//! touches.
//!
//! Runs at CPL 0 (`hlt` is privileged); the memory work runs at CPL 3 (`at_cpl3`), where guest
//! instructions are not emulated. Timed section: `start` = TSC now; for `k` in `1..=requests`,
//! deadline = `start + phase + k * period_us µs` (`phase` = `start` mod the period: VMs started at
//! once serve at different instants, as independent services do); idle until it, read the TSC
//! (woke), serve the request, read the TSC (done). Raw TSC readings are converted after the end
//! marker: wake overshoot = woke − deadline, response latency = done − deadline (0 if negative). A
//! request that ends after the next deadline delays that one's wake-up (no request is skipped).
//!
//! `ops` = `requests`. Checksum: FNV-1a over the number of requests served and the wrapping sum of
//! every word written (warm-up included), the same for every strategy and mode. Extra result
//! fields: `strategy=<s> period_us=<n> work_kib=<n> response_ns_p50=<n> response_ns_p99=<n>
//! response_ns_max=<n> wake_overshoot_ns_p50=<n> wake_overshoot_ns_p99=<n> ticks=<n>
//! guest_zeroed_bytes=<n> released_bytes=<n>` (nearest-rank percentiles; `ticks`: timer interrupts
//! in the timed section, 0 unless `hlt`; the byte counts are the allocator's over the timed
//! section).
//!
//! Errors: as `idle` (code 2 for bad arguments or `strategy=pv` in trapped mode, 4 for a host
//! without the TSC frequency).

use core::fmt::{self, Write};

use crate::args::Args;
use guest_pv::frames::{Frames, Hints};
use guest_pv::idle::{Strategy, percentile};
use guest_pv::tsc::rdtsc;
use guest_pv::{Fnv1a, cpu};
use hypercall_abi::features;
use hypercall_abi::idle::TIMER_VECTOR;
use hypercall_abi::layout::PAGE_SIZE;

use super::idling::{self, DEFAULT_TICK_HZ, Idler, MAX_TICK_HZ};
use super::{Env, Outcome, Workload};
use crate::platform::{Platform, at_cpl3, marker_begin, marker_end, timer_start, timer_stop};

pub const WORKLOAD: Workload = Workload {
    name: "service",
    keys: &["requests", "period_us", "work_kib", "tick_hz", "warm_mib"],
    text_keys: &["strategy"],
    run,
};

const DEFAULT_REQUESTS: u64 = 100;
/// The most requests (their TSC readings are kept in fixed arrays on the stack).
const MAX_REQUESTS: usize = 1000;
const DEFAULT_PERIOD_US: u64 = 10_000;
/// The longest period: one minute.
const MAX_PERIOD_US: u64 = 60_000_000;
const DEFAULT_WORK_KIB: u64 = 64;
/// The most memory one request touches.
const MAX_WORK_KIB: u64 = 64 * 1024;
/// The most `warm_mib`.
const MAX_WARM_MIB: u64 = 2048;

/// The checked arguments.
#[derive(Debug, Clone, Copy)]
struct Config {
    strategy: Strategy,
    requests: usize,
    period_ns: u64,
    period_us: u64,
    /// Frames one request uses.
    work_frames: u64,
    /// The timer period (`hlt` only).
    tick_us: u32,
    /// Frames to use and free before the timed section.
    warm_frames: u64,
}

fn run(env: &mut Env, args: &Args<'_>) -> Outcome {
    let cfg = match config(env.platform, args) {
        Ok(cfg) => cfg,
        Err(why) => WORKLOAD.usage(env, format_args!("{why}")),
    };
    let tsc = idling::clock_or_exit(env, &WORKLOAD);
    let mut idler = Idler::new(cfg.strategy, env.platform, tsc);

    let mut frames = allocator(env, cfg.warm_frames.max(cfg.work_frames));
    let mut sum = 0u64;
    if cfg.warm_frames > 0 {
        // At CPL 3: at CPL 0 every guest instruction is emulated (~270 ns each).
        let f = &mut frames;
        sum = at_cpl3(|| use_and_free(f, cfg.warm_frames, u64::MAX));
        // A PV guest gives back what is still queued; an unmodified one has nothing to give.
        frames.flush();
    }
    frames.set_prepare(false);
    let before = frames.stats();

    // Raw TSC ticks, converted after the timed section: every instruction on the wake-up path
    // costs ~270 ns of host CPU at CPL 0 on our KVM.
    let mut woke = [0u64; MAX_REQUESTS];
    let mut done = [0u64; MAX_REQUESTS];
    let (woke, done) = (&mut woke[..cfg.requests], &mut done[..cfg.requests]);
    if cfg.strategy == Strategy::Hlt {
        timer_start(cfg.tick_us);
    }
    let ticks_before = cpu::interrupt_count(TIMER_VECTOR);

    marker_begin();
    let start = tsc.now_ns();
    // The service's phase: where in its period this VM's requests fall. Taken from the TSC
    // (which counts from the VM's creation), so VMs started together — a fleet's start gate —
    // do not all wake at the same instant, as independent services would not.
    let first = start.saturating_add(start % cfg.period_ns);
    let mut deadline = first;
    for (k, (w, d)) in woke.iter_mut().zip(done.iter_mut()).enumerate() {
        deadline = deadline.saturating_add(cfg.period_ns);
        idler.idle_until(&tsc, deadline);
        *w = rdtsc();
        let f = &mut frames;
        sum = sum.wrapping_add(at_cpl3(|| use_and_free(f, cfg.work_frames, k as u64)));
        *d = rdtsc();
    }
    marker_end();

    if cfg.strategy == Strategy::Hlt {
        timer_stop();
    }
    let ticks = cpu::interrupt_count(TIMER_VECTOR) - ticks_before;
    let after = frames.stats();
    let mut deadline = first;
    for (w, d) in woke.iter_mut().zip(done.iter_mut()) {
        deadline = deadline.saturating_add(cfg.period_ns);
        *w = tsc.ticks_to_ns(*w).saturating_sub(deadline);
        *d = tsc.ticks_to_ns(*d).saturating_sub(deadline);
    }
    woke.sort_unstable();
    done.sort_unstable();
    let pct = |v: &[u64], p| percentile(v, p).unwrap_or(0);

    let served = cfg.requests as u64;
    let mut h = Fnv1a::new();
    h.write_u64(served);
    h.write_u64(sum);
    let mut outcome = Outcome::new(served, h.finish());
    let _ = write!(
        outcome.fields,
        " strategy={} period_us={} work_kib={} response_ns_p50={} response_ns_p99={} \
         response_ns_max={} wake_overshoot_ns_p50={} wake_overshoot_ns_p99={} ticks={ticks} \
         guest_zeroed_bytes={} released_bytes={}",
        cfg.strategy.name(),
        cfg.period_us,
        cfg.work_frames * PAGE_SIZE / 1024,
        pct(done, 50),
        pct(done, 99),
        done.last().copied().unwrap_or(0),
        pct(woke, 50),
        pct(woke, 99),
        after.zeroed_bytes - before.zeroed_bytes,
        after.released_bytes - before.released_bytes,
    );
    outcome
}

/// The allocator over `frames` frames of free RAM: with the host's zero hints in PV mode,
/// without (the guest zeroes what it reuses) in trapped mode.
fn allocator(env: &mut Env, frames: u64) -> Frames<'static> {
    let len = Frames::region_bytes(frames);
    let base = match super::free_ram_start(env.boot_info, len) {
        Ok(base) => base,
        Err(largest) => WORKLOAD.usage(
            env,
            format_args!(
                "warm_mib and work_kib need {len} bytes; the largest free region has {largest}"
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
    match unsafe { Frames::new(base, len, hints, super::hint_buffers()) } {
        Ok(f) => f,
        Err(e) => panic!("service: allocator: {e}"),
    }
}

/// Allocates `n` frames, writes every word of each (a pattern of `tag`, the frame and the
/// word), frees them in reverse order; returns the wrapping sum of the words written. Runs at
/// CPL 3 for the requests.
///
/// Freeing in reverse order of allocation makes the next `n` allocations return the same
/// frames in the same order (`Frames`' LIFO stack), and the first ones come fresh from the
/// bump pointer, lowest first: every call uses frames `0..n` of the allocator, which is
/// checked.
fn use_and_free(frames: &mut Frames, n: u64, tag: u64) -> u64 {
    let start = frames.start();
    let mut sum = 0u64;
    for i in 0..n {
        let addr = match frames.alloc() {
            Ok(a) => a,
            Err(e) => panic!("service: allocation {i}: {e}"),
        };
        assert_eq!(
            addr,
            start + i * PAGE_SIZE,
            "service: allocation {i} out of order"
        );
        let p = core::ptr::with_exposed_provenance_mut::<u64>(addr as usize);
        for j in 0..PAGE_SIZE / 8 {
            let w = (tag << 40 | i << 9 | j).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            // SAFETY: a frame the allocator just handed out: identity-mapped, writable,
            // user-accessible, used by nothing else.
            unsafe { p.add(j as usize).write(w) };
            sum = sum.wrapping_add(w);
        }
    }
    for i in (0..n).rev() {
        // SAFETY: frame `i` was allocated above (checked) and nothing uses it any more.
        if let Err(e) = unsafe { frames.free(start + i * PAGE_SIZE) } {
            panic!("service: free {i}: {e}");
        }
    }
    sum
}

/// Checks the arguments against each other and the host's features.
fn config<'a>(platform: Platform, args: &Args<'a>) -> Result<Config, ArgError<'a>> {
    let name = args.get_str("strategy");
    let strategy = idling::strategy(platform, name).map_err(|e| match (e, name) {
        (None, Some(name)) => ArgError::Strategy(name),
        _ => ArgError::PvInTrapped,
    })?;
    let requests = args.get_or("requests", DEFAULT_REQUESTS);
    if requests == 0 || requests > MAX_REQUESTS as u64 {
        return Err(ArgError::Requests(requests));
    }
    let period_us = args.get_or("period_us", DEFAULT_PERIOD_US);
    if period_us == 0 || period_us > MAX_PERIOD_US {
        return Err(ArgError::PeriodUs(period_us));
    }
    let work_kib = args.get_or("work_kib", DEFAULT_WORK_KIB);
    if work_kib == 0 || work_kib > MAX_WORK_KIB || !work_kib.is_multiple_of(PAGE_SIZE / 1024) {
        return Err(ArgError::WorkKib(work_kib));
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
        requests: requests as usize,
        // At most 6e10 µs · 1000: no overflow, nor in `requests` times it.
        period_ns: period_us * 1000,
        period_us,
        work_frames: work_kib * 1024 / PAGE_SIZE,
        // 100..=1_000_000.
        tick_us: (1_000_000 / tick_hz) as u32,
        warm_frames: warm_mib * (1 << 20) / PAGE_SIZE,
    })
}

/// Why the arguments were refused.
#[derive(Debug, Clone, Copy)]
enum ArgError<'a> {
    Strategy(&'a str),
    PvInTrapped,
    Requests(u64),
    PeriodUs(u64),
    WorkKib(u64),
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
            ArgError::Requests(n) => write!(f, "requests={n} (want 1..={MAX_REQUESTS})"),
            ArgError::PeriodUs(n) => write!(f, "period_us={n} (want 1..={MAX_PERIOD_US})"),
            ArgError::WorkKib(n) => write!(
                f,
                "work_kib={n} (want a multiple of {} in 1..={MAX_WORK_KIB})",
                PAGE_SIZE / 1024
            ),
            ArgError::TickHz(n) => write!(f, "tick_hz={n} (want 1..={MAX_TICK_HZ})"),
            ArgError::WarmMib(n) => write!(f, "warm_mib={n} (want at most {MAX_WARM_MIB})"),
        }
    }
}
