//! Idling until a deadline: the three strategies of [`hypercall_abi::idle`], measured on the
//! exit-free [`Tsc`] clock.
//!
//! Every strategy idles until a deadline in [`Tsc::now_ns`] time and returns once the TSC says
//! it has passed:
//!
//! | strategy | what the host learns | needs |
//! |---|---|---|
//! | [`spin`] | nothing: the vCPU thread burns a host CPU | the TSC clock |
//! | [`hlt`] | "idle", on every tick of the trapped timer | CPL 0, [`crate::cpu::init`], the timer running ([`crate::trapped::timer_start`]) |
//! | [`PvIdle`] | "idle until exactly then": one [`Pvkit::idle_yield`] parks the vCPU thread | a pvkit host with [`features::IDLE_YIELD`](hypercall_abi::features::IDLE_YIELD) and [`features::CLOCK`](hypercall_abi::features::CLOCK) |
//!
//! # Mapping TSC time to host time
//! `idle_yield` takes its deadline in the host's `clock_ns` time. [`PvIdle::new`] maps the two
//! clocks once: it reads the TSC (`t0`), then `clock_ns` (`c0`), and maps a TSC deadline `d` to
//! `c0 + (d - t0)`. The host read its clock somewhere inside that one exit, after `t0`, so the
//! mapped deadline is late by the time from `t0` to the host's clock read (about half an exit,
//! a few µs on pvkit's KVM): the host never wakes the guest before the TSC deadline because of
//! the mapping, at the price of that small, constant overshoot. Should the clocks drift apart
//! and the host return [`Wake::Deadline`] while the TSC says "not yet", [`PvIdle::idle_until`]
//! maps the clocks again (one more `clock_ns`) and parks again.

use hypercall_abi::idle::{EVENT_VECTOR, WAKE_CAPPED, WAKE_DEADLINE, WAKE_EVENT, decode_wake};
use hypercall_abi::request::Request;

use crate::tsc::Tsc;
use crate::{HypercallError, Pvkit, cpu};

/// Why an [`Pvkit::idle_yield`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// The deadline passed (or was already past).
    Deadline,
    /// Events for this guest were pending; the call consumed this many.
    Event(u64),
    /// Parked for [`hypercall_abi::idle::IDLE_MAX_NS`] without reaching the deadline: call
    /// again.
    Capped,
    /// A reason this ABI version does not define (a newer host): the raw `idle_yield` value.
    /// Treat it as an early return.
    Unknown(u64),
}

impl Wake {
    /// Decodes an `idle_yield` result value ([`decode_wake`]).
    pub const fn from_value(value: u64) -> Wake {
        match decode_wake(value) {
            (WAKE_DEADLINE, _) => Wake::Deadline,
            (WAKE_EVENT, events) => Wake::Event(events),
            (WAKE_CAPPED, _) => Wake::Capped,
            _ => Wake::Unknown(value),
        }
    }
}

impl Pvkit {
    /// Parks the vCPU until `deadline_ns` (absolute, in [`Pvkit::clock_ns`] time) or until an
    /// event for this guest is pending, whichever is first; at most
    /// [`hypercall_abi::idle::IDLE_MAX_NS`] per call ([`Wake::Capped`]). A deadline already
    /// past, or an event already pending, returns at once — an event that fires between the
    /// guest's last look at its work and this call is never lost.
    ///
    /// Fails with `not_implemented` on a host without [`features::IDLE_YIELD`](hypercall_abi::features::IDLE_YIELD).
    pub fn idle_yield(&self, deadline_ns: u64) -> Result<Wake, HypercallError> {
        self.request(Request::IdleYield { deadline_ns })
            .map(Wake::from_value)
    }
}

/// How a kernel idles; the names are those of the `idle` workload's `strategy` argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// [`spin`].
    Spin,
    /// [`hlt`].
    Hlt,
    /// [`PvIdle`].
    Pv,
}

impl Strategy {
    /// Every strategy, from least to most informative.
    pub const ALL: [Strategy; 3] = [Strategy::Spin, Strategy::Hlt, Strategy::Pv];

    /// `spin`, `hlt` or `pv`.
    pub const fn name(self) -> &'static str {
        match self {
            Strategy::Spin => "spin",
            Strategy::Hlt => "hlt",
            Strategy::Pv => "pv",
        }
    }

    /// The strategy called `name`.
    pub fn from_name(name: &str) -> Option<Strategy> {
        Strategy::ALL.into_iter().find(|s| s.name() == name)
    }
}

/// What happened while idling.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IdleStats {
    /// Times the guest got control back before the deadline had passed or right at it:
    /// interrupts that ended a `hlt` ([`hlt`]) or `idle_yield` returns ([`PvIdle`]); 0 for
    /// [`spin`].
    pub wakeups: u64,
    /// Events seen: consumed by `idle_yield` ([`PvIdle`]) or [`EVENT_VECTOR`] interrupts taken
    /// ([`hlt`]); 0 for [`spin`], which leaves them pending.
    pub events: u64,
}

/// Polls the TSC until `deadline_ns` ([`Tsc::now_ns`] time). Nothing reaches the host; the
/// vCPU stays busy. The loop has no `pause`: under KVM a pause loop can exit to the host
/// (pause-loop exiting), and this strategy is the one that tells it nothing.
pub fn spin(tsc: &Tsc, deadline_ns: u64) -> IdleStats {
    while tsc.now_ns() < deadline_ns {}
    IdleStats::default()
}

/// Halts with interrupts enabled until `deadline_ns` ([`Tsc::now_ns`] time): checks the TSC
/// with IF = 0, then [`cpu::wait_for_interrupt`] (`sti; hlt; cli`), until the deadline has
/// passed. Returns with IF = 0.
///
/// Needs CPL 0, [`cpu::init`], IF = 0 on entry, and a wake source for every `hlt` — the trapped
/// timer running ([`crate::trapped::timer_start`]); its period bounds the overshoot. Without
/// one pvkit's VMM ends the VM (a `hlt` nothing can end).
///
/// # Panics
/// Before [`cpu::init`].
pub fn hlt(tsc: &Tsc, deadline_ns: u64) -> IdleStats {
    let events_before = cpu::interrupt_count(EVENT_VECTOR);
    let mut wakeups = 0;
    while tsc.now_ns() < deadline_ns {
        cpu::wait_for_interrupt();
        wakeups += 1;
    }
    IdleStats {
        wakeups,
        events: cpu::interrupt_count(EVENT_VECTOR) - events_before,
    }
}

/// The mapping from [`Tsc`] time to the host's `clock_ns` time (see the
/// [module docs](self#mapping-tsc-time-to-host-time)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockMap {
    /// TSC time read just before the `clock_ns` call.
    pub tsc_ns: u64,
    /// The host time it returned.
    pub host_ns: u64,
}

impl ClockMap {
    /// Reads the TSC, then `clock_ns` (one exit).
    pub fn new(pv: &Pvkit, tsc: &Tsc) -> Result<ClockMap, HypercallError> {
        let tsc_ns = tsc.now_ns();
        let host_ns = pv.clock_ns()?;
        Ok(ClockMap { tsc_ns, host_ns })
    }

    /// The host time of TSC time `tsc_ns`: `host_ns + (tsc_ns - self.tsc_ns)`, saturating (a
    /// TSC time before the mapping maps to `host_ns`, which is already past for the host).
    pub const fn host_time(&self, tsc_ns: u64) -> u64 {
        self.host_ns
            .saturating_add(tsc_ns.saturating_sub(self.tsc_ns))
    }
}

/// The PV strategy: [`Pvkit::idle_yield`] with deadlines mapped from TSC time.
///
/// Parking is not free: the exit, the host's wake-up and the way back cost the vCPU thread
/// CPU and the guest latency ([`PvIdle::measure_wake_cost`] measures it). A deadline closer
/// than [`PvIdle::spin_below`] is spun to on the TSC instead (0 by default: always park), the
/// rule of Linux's haltpoll: never park for less time than a wake-up costs.
#[derive(Debug, Clone, Copy)]
pub struct PvIdle {
    pv: Pvkit,
    tsc: Tsc,
    map: ClockMap,
    remaps: u64,
    spin_below_ns: u64,
}

/// How far ahead [`PvIdle::measure_wake_cost`] sets each probe's deadline: long enough that
/// the host really parks the vCPU thread and has to wake it.
pub const WAKE_PROBE_NS: u64 = 50_000;
/// The most probes [`PvIdle::measure_wake_cost`] takes.
pub const WAKE_PROBES_MAX: usize = 31;

impl PvIdle {
    /// Maps the clocks ([`ClockMap::new`], one `clock_ns` exit). Do it before the timed part.
    ///
    /// Fails with `not_implemented` on a host without [`features::CLOCK`](hypercall_abi::features::CLOCK).
    pub fn new(pv: Pvkit, tsc: Tsc) -> Result<PvIdle, HypercallError> {
        Ok(PvIdle {
            pv,
            tsc,
            map: ClockMap::new(&pv, &tsc)?,
            remaps: 0,
            spin_below_ns: 0,
        })
    }

    /// The same, spinning on the TSC instead of parking for deadlines less than `ns` away
    /// (e.g. the result of [`measure_wake_cost`](Self::measure_wake_cost)).
    pub const fn with_spin_below(mut self, ns: u64) -> PvIdle {
        self.spin_below_ns = ns;
        self
    }

    /// Deadlines closer than this are spun to, not parked for (0: always park).
    pub const fn spin_below(&self) -> u64 {
        self.spin_below_ns
    }

    /// Measures what a park costs the guest: `probes` parks (clamped to
    /// `1..=`[`WAKE_PROBES_MAX`]) until [`WAKE_PROBE_NS`] ahead, each timed on the TSC; returns
    /// the median of how late each got control back. That is the latency a park adds over
    /// spinning (the exit, the host's timer or event wake-up of the vCPU thread, the way back
    /// into the guest), measured at the privilege level and on the host the guest runs on — at
    /// CPL 3 an exit costs several times what it costs at CPL 0 on pvkit's KVM. Use it as the
    /// poll window of an adaptive wait ([`PollWindow`]) or for
    /// [`with_spin_below`](Self::with_spin_below). Parks only (it ignores
    /// [`spin_below`](Self::spin_below)); events that arrive meanwhile are consumed and not
    /// counted.
    pub fn measure_wake_cost(&mut self, probes: usize) -> Result<u64, HypercallError> {
        let mut late = [0u64; WAKE_PROBES_MAX];
        let late = &mut late[..probes.clamp(1, WAKE_PROBES_MAX)];
        for l in late.iter_mut() {
            let deadline = self.tsc.now_ns().saturating_add(WAKE_PROBE_NS);
            self.park_until(deadline)?;
            *l = self.tsc.now_ns().saturating_sub(deadline);
        }
        late.sort_unstable();
        Ok(late[late.len() / 2])
    }

    /// The current clock mapping.
    pub const fn map(&self) -> ClockMap {
        self.map
    }

    /// Times [`idle_until`](Self::idle_until) had to map the clocks again (the host said
    /// "deadline" before the TSC did).
    pub const fn remaps(&self) -> u64 {
        self.remaps
    }

    /// Idles until `deadline_ns` ([`Tsc::now_ns`] time): `idle_yield` until the mapped
    /// deadline. [`Wake::Capped`], [`Wake::Event`] (its events are consumed and counted) and
    /// unknown reasons park again; a [`Wake::Deadline`] the TSC disagrees with (the host's
    /// clock ran ahead) maps the clocks again and parks again. The first hypercall is made
    /// without reading the clock: a deadline already past costs one exit, which the host answers
    /// at once. (On our KVM every guest instruction at CPL0 costs ~250 ns, so the path from
    /// wake-up to the next park is kept short.)
    ///
    /// Fails with the first hypercall error (`not_implemented` without
    /// [`features::IDLE_YIELD`](hypercall_abi::features::IDLE_YIELD)).
    ///
    /// With [`spin_below`](Self::spin_below) set, a deadline closer than that is spun to on the
    /// TSC (no exit, `wakeups` 0).
    pub fn idle_until(&mut self, deadline_ns: u64) -> Result<IdleStats, HypercallError> {
        if self.spin_below_ns > 0
            && deadline_ns.saturating_sub(self.tsc.now_ns()) < self.spin_below_ns
        {
            return Ok(spin(&self.tsc, deadline_ns));
        }
        self.park_until(deadline_ns)
    }

    /// [`idle_until`](Self::idle_until) without the spin rule.
    fn park_until(&mut self, deadline_ns: u64) -> Result<IdleStats, HypercallError> {
        let mut stats = IdleStats::default();
        loop {
            let wake = self.pv.idle_yield(self.map.host_time(deadline_ns))?;
            stats.wakeups += 1;
            match wake {
                Wake::Deadline => {
                    if self.tsc.now_ns() >= deadline_ns {
                        return Ok(stats);
                    }
                    self.map = ClockMap::new(&self.pv, &self.tsc)?;
                    self.remaps += 1;
                }
                Wake::Event(n) => stats.events += n,
                Wake::Capped | Wake::Unknown(_) => {}
            }
        }
    }
}

/// An adaptive poll window, as Linux's haltpoll governs its guests' idle polling: a waiter
/// polls for up to [`ns`](Self::ns) before it parks, and tells the window how each wait went
/// ([`polled`](Self::polled), [`parked`](Self::parked)).
///
/// - A wait the poll ended leaves the window as it is.
/// - A park whose completion came at most [`max_ns`](Self::max_ns) after the poll ended (the
///   park's length less the wake-up cost, `max_ns`) means a longer poll would have caught it
///   for less than the park cost: the window grows (doubles, starting at [`POLL_START_NS`], up
///   to `max_ns`).
/// - A longer park means polling was wasted: the window halves (to 0 below
///   [`POLL_START_NS`]).
///
/// `max_ns` is what a park costs ([`PvIdle::measure_wake_cost`]), so the guest never polls for
/// longer than parking would have cost it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollWindow {
    ns: u64,
    max_ns: u64,
}

/// The first window a growing [`PollWindow`] opens (or its maximum, if smaller).
pub const POLL_START_NS: u64 = 10_000;
/// The widest a [`PollWindow`] may ever be, whatever the wake-up cost measured: a cost measured
/// on an overloaded host (milliseconds) must not turn every wait into a long spin.
pub const POLL_MAX_NS: u64 = 500_000;

impl PollWindow {
    /// A closed window that may grow up to `max_ns` (at most [`POLL_MAX_NS`]).
    pub const fn new(max_ns: u64) -> PollWindow {
        PollWindow {
            ns: 0,
            max_ns: if max_ns < POLL_MAX_NS {
                max_ns
            } else {
                POLL_MAX_NS
            },
        }
    }

    /// How long to poll before parking, in nanoseconds.
    pub const fn ns(&self) -> u64 {
        self.ns
    }

    /// The most it grows to.
    pub const fn max_ns(&self) -> u64 {
        self.max_ns
    }

    /// The poll saw the completion: no change.
    pub fn polled(&mut self) {}

    /// The waiter parked for `blocked_ns` after polling in vain. A park returns about a wake-up
    /// cost (`max_ns`) after what it waited for, so the completion came about
    /// `blocked_ns - max_ns` after the poll ended: a window that much longer would have caught
    /// it if that is at most `max_ns`.
    pub fn parked(&mut self, blocked_ns: u64) {
        if blocked_ns.saturating_sub(self.max_ns) <= self.max_ns {
            let start = POLL_START_NS.min(self.max_ns);
            self.ns = self.ns.saturating_mul(2).clamp(start, self.max_ns);
        } else {
            self.ns /= 2;
            if self.ns < POLL_START_NS {
                self.ns = 0;
            }
        }
    }
}

/// The `percent`-th percentile of `sorted` (ascending) by the nearest-rank method: the element
/// at index `⌈percent · n / 100⌉ - 1` (the smallest value with at least `percent`% of the values
/// at or below it). `percent` is clamped to `1..=100`; `None` for an empty slice.
///
/// With 50 values: p50 is the 25th smallest, p99 the largest.
pub fn percentile(sorted: &[u64], percent: u32) -> Option<u64> {
    let n = sorted.len() as u64;
    if n == 0 {
        return None;
    }
    let p = u64::from(percent.clamp(1, 100));
    let rank = (p * n).div_ceil(100);
    Some(sorted[(rank - 1) as usize])
}

#[cfg(test)]
mod tests {
    use hypercall_abi::idle::encode_wake;

    use super::*;

    #[test]
    fn poll_window_grows_on_short_parks_and_shrinks_on_long_ones() {
        let mut w = PollWindow::new(100_000);
        assert_eq!(w.ns(), 0);
        w.parked(30_000);
        assert_eq!(w.ns(), POLL_START_NS);
        for _ in 0..10 {
            w.parked(50_000);
        }
        assert_eq!(
            w.ns(),
            100_000,
            "grows up to the measured wake cost, no further"
        );
        w.polled();
        assert_eq!(w.ns(), 100_000);
        w.parked(200_000);
        assert_eq!(
            w.ns(),
            100_000,
            "came 100 µs after the poll: a full window catches it"
        );
        w.parked(5_000_000);
        assert_eq!(w.ns(), 50_000);
        for _ in 0..4 {
            w.parked(5_000_000);
        }
        assert_eq!(w.ns(), 0, "closes after long parks");
        // A window smaller than the start size.
        let mut small = PollWindow::new(3_000);
        small.parked(1_000);
        assert_eq!(small.ns(), 3_000);
        assert_eq!(small.max_ns(), 3_000);
        assert_eq!(PollWindow::new(u64::MAX).max_ns(), POLL_MAX_NS);
    }

    #[test]
    fn wake_values_decode() {
        assert_eq!(
            Wake::from_value(encode_wake(WAKE_DEADLINE, 0)),
            Wake::Deadline
        );
        assert_eq!(Wake::from_value(encode_wake(WAKE_EVENT, 3)), Wake::Event(3));
        assert_eq!(Wake::from_value(encode_wake(WAKE_CAPPED, 0)), Wake::Capped);
        assert_eq!(Wake::from_value(0x1207), Wake::Unknown(0x1207));
        assert_eq!(Wake::from_value(0), Wake::Unknown(0));
    }

    #[test]
    fn strategy_names_round_trip() {
        for s in Strategy::ALL {
            assert_eq!(Strategy::from_name(s.name()), Some(s));
        }
        assert_eq!(Strategy::from_name("halt"), None);
        assert_eq!(Strategy::from_name(""), None);
    }

    #[test]
    fn clock_map_offsets_and_saturates() {
        let map = ClockMap {
            tsc_ns: 1_000_000,
            host_ns: 50_000,
        };
        assert_eq!(map.host_time(1_000_000), 50_000);
        assert_eq!(map.host_time(11_000_000), 10_050_000);
        assert_eq!(map.host_time(10), 50_000);
        assert_eq!(map.host_time(u64::MAX), u64::MAX - 950_000);
        let late = ClockMap {
            tsc_ns: 0,
            host_ns: 10,
        };
        assert_eq!(late.host_time(u64::MAX), u64::MAX);
    }

    #[test]
    fn nearest_rank_percentiles() {
        assert_eq!(percentile(&[], 50), None);
        assert_eq!(percentile(&[7], 1), Some(7));
        assert_eq!(percentile(&[7], 99), Some(7));
        let fifty: std::vec::Vec<u64> = (1..=50).collect();
        assert_eq!(percentile(&fifty, 50), Some(25));
        assert_eq!(percentile(&fifty, 99), Some(50));
        assert_eq!(percentile(&fifty, 100), Some(50));
        let hundred: std::vec::Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&hundred, 50), Some(50));
        assert_eq!(percentile(&hundred, 99), Some(99));
        let thousand: std::vec::Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&thousand, 99), Some(990));
        // Clamped.
        assert_eq!(percentile(&hundred, 0), Some(1));
        assert_eq!(percentile(&hundred, 250), Some(100));
        // Even count: the lower middle.
        assert_eq!(percentile(&[1, 2, 3, 4], 50), Some(2));
    }
}
