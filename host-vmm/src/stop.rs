//! Stopping a running VM from another thread: a timeout, a signal, a library caller.
//!
//! A [`Stopper`] is a cloneable handle taken from a [`Vm`](crate::vm::Vm) before it runs. A
//! stop request records its reason (the first request wins) and raises a flag that the vCPU
//! loop checks before every entry into the guest. The vCPU thread may be elsewhere, though:
//!
//! - inside `KVM_RUN`, possibly for ever (a guest spinning without exits): the requester kicks
//!   it with [`kick_signal`], whose no-op handler is installed without `SA_RESTART`, so
//!   `KVM_RUN` returns `EINTR` and the loop comes round to its check. A signal that lands
//!   between the loop's check and the ioctl is consumed before the guest runs and kicks
//!   nothing, so the requester re-sends it every [`KICK_INTERVAL`] until the loop has ended;
//! - parked in `idle_yield` or in `hlt` emulation on the VM's event queue: a signal does not
//!   end that wait (the channel retries on `EINTR`), so the request also ends the wait
//!   through the queue's [`Interrupter`] (the guest sees no event).
//!
//! The same kick brings the vCPU to an exit boundary for a pause
//! ([`crate::vcpu::VcpuHandle::pause`]).
//!
//! The vCPU thread's pthread id is recorded only while the loop runs (under the same lock
//! the requester holds while kicking), so a kick never reaches a thread that has left the
//! loop, or one that has exited.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use crate::devices::event::Interrupter;
use crate::error::{Error, Result};

/// How often a stop request re-sends the kick signal until the vCPU loop has ended.
pub const KICK_INTERVAL: Duration = Duration::from_millis(5);

/// Exit status of a run stopped by its timeout (as coreutils' `timeout`).
pub const TIMEOUT_EXIT_STATUS: u8 = 124;

/// Why a run was stopped before the guest exited by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The run's timeout (counted from the start of the run) passed.
    Timeout(Duration),
    /// The process received this signal (e.g. `SIGINT`, `SIGTERM`).
    Signal(i32),
    /// The VM was migrated: it runs on at the destination.
    Migrated,
}

impl StopReason {
    /// The conventional exit status: 124 for a timeout, 128 + the number for a signal.
    pub fn exit_status(self) -> u8 {
        match self {
            StopReason::Timeout(_) => TIMEOUT_EXIT_STATUS,
            StopReason::Signal(n) => (128 + n.clamp(0, 127)) as u8,
            StopReason::Migrated => 0,
        }
    }
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            StopReason::Timeout(d) => write!(f, "timeout after {}", format_duration(d)),
            StopReason::Signal(libc::SIGINT) => f.write_str("SIGINT"),
            StopReason::Signal(libc::SIGTERM) => f.write_str("SIGTERM"),
            StopReason::Signal(libc::SIGHUP) => f.write_str("SIGHUP"),
            StopReason::Signal(libc::SIGQUIT) => f.write_str("SIGQUIT"),
            StopReason::Signal(n) => write!(f, "signal {n}"),
            StopReason::Migrated => f.write_str("migrated"),
        }
    }
}

/// Parses a duration such as `500ms`, `5s`, `2m`, `1h` or plain seconds (`10`): a whole
/// number greater than 0 with an optional unit.
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let expected = "expected a whole number with an optional unit ms, s, m or h (e.g. 500ms, 5s, \
                    2m; a plain number is seconds)";
    let ms_per_unit: u64 = match unit {
        "ms" => 1,
        "" | "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(expected.into()),
    };
    let n: u64 = num.parse().map_err(|_| expected.to_string())?;
    if n == 0 {
        return Err("must be greater than 0".into());
    }
    let ms = n.checked_mul(ms_per_unit).ok_or("too large")?;
    Ok(Duration::from_millis(ms))
}

/// Formats a duration the way [`parse_duration`] reads it where it can (`300ms`, `5s`, `2m`,
/// `1h`); other durations as Rust prints them (`1.5ms`).
pub fn format_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 && d.as_secs() > 0 {
        let s = d.as_secs();
        if s.is_multiple_of(3600) {
            format!("{}h", s / 3600)
        } else if s.is_multiple_of(60) {
            format!("{}m", s / 60)
        } else {
            format!("{s}s")
        }
    } else if d.subsec_nanos().is_multiple_of(1_000_000) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{d:?}")
    }
}

/// Where a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunPhase {
    /// The vCPU loop has not started.
    NotStarted,
    /// The vCPU loop runs.
    Running,
    /// The vCPU loop has ended.
    Done,
}

fn phase(v: Vcpu) -> RunPhase {
    match v {
        Vcpu::NotStarted => RunPhase::NotStarted,
        Vcpu::Running(_) => RunPhase::Running,
        Vcpu::Done => RunPhase::Done,
    }
}

/// Where the vCPU thread is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Vcpu {
    NotStarted,
    /// In the run loop, on this thread.
    Running(libc::pthread_t),
    Done,
}

#[derive(Debug)]
struct State {
    reason: Option<StopReason>,
    vcpu: Vcpu,
}

#[derive(Debug)]
struct Inner {
    /// Set once a stop is requested; the loop's cheap check.
    requested: AtomicBool,
    state: Mutex<State>,
    /// Signalled when `state.vcpu` changes.
    changed: Condvar,
    interrupter: Interrupter,
}

/// Stops a VM's run from any thread. Clone it freely; all clones stop the same VM.
#[derive(Debug, Clone)]
pub struct Stopper(Arc<Inner>);

impl Stopper {
    /// A stopper that ends the vCPU's waits on the VM's event queue through `interrupter`.
    /// Installs the kick signal's handler (once per process).
    pub(crate) fn new(interrupter: Interrupter) -> Result<Stopper> {
        install_kick_handler()?;
        Ok(Stopper(Arc::new(Inner {
            requested: AtomicBool::new(false),
            state: Mutex::new(State {
                reason: None,
                vcpu: Vcpu::NotStarted,
            }),
            changed: Condvar::new(),
            interrupter,
        })))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        crate::sync::lock(&self.0.state)
    }

    /// Asks the run to stop for `reason`; the first request's reason is the one reported.
    ///
    /// If the guest is running, this returns once the vCPU loop has ended (it stops at the
    /// next exit, or at once if it is parked waiting for an event or a timer). Before the run
    /// starts it returns at once and the run then stops before entering the guest; after the
    /// run it does nothing. Called on the vCPU thread itself (e.g. from a console writer) it
    /// only records the request, which the loop sees when it next checks.
    pub fn stop(&self, reason: StopReason) {
        let state = self.lock();
        self.request(state, reason);
    }

    /// The reason of the first stop request, if any.
    pub fn requested(&self) -> Option<StopReason> {
        if !self.0.requested.load(Ordering::Acquire) {
            return None;
        }
        self.lock().reason
    }

    fn request(&self, mut state: MutexGuard<'_, State>, reason: StopReason) {
        state.reason.get_or_insert(reason);
        self.0.requested.store(true, Ordering::Release);
        self.0.interrupter.interrupt();
        let me = current_thread();
        while let Vcpu::Running(thread) = state.vcpu {
            if thread == me {
                break;
            }
            kick(thread);
            state = crate::sync::wait_timeout(&self.0.changed, state, KICK_INTERVAL);
        }
    }

    /// Waits until `deadline` (`None`: never) or the end of the run, whichever is first; at
    /// the deadline, stops the run for `reason`.
    pub(crate) fn stop_at(&self, deadline: Option<Instant>, reason: StopReason) {
        let mut state = self.lock();
        loop {
            if state.vcpu == Vcpu::Done {
                return;
            }
            let now = Instant::now();
            state = match deadline {
                Some(d) if d <= now => break,
                Some(d) => crate::sync::wait_timeout(&self.0.changed, state, d - now),
                None => crate::sync::wait(&self.0.changed, state),
            };
        }
        self.request(state, reason);
    }

    /// Kicks the vCPU thread out of `KVM_RUN` and out of any wait on the event queue, without
    /// asking it to stop; returns where the run is. The loop then comes round to its checks
    /// at the next exit boundary.
    pub(crate) fn kick(&self) -> RunPhase {
        let state = self.lock();
        self.0.interrupter.interrupt();
        match state.vcpu {
            Vcpu::NotStarted => RunPhase::NotStarted,
            Vcpu::Running(thread) => {
                if thread != current_thread() {
                    kick(thread);
                }
                RunPhase::Running
            }
            Vcpu::Done => RunPhase::Done,
        }
    }

    /// Where the run is now.
    pub(crate) fn phase(&self) -> RunPhase {
        phase(self.lock().vcpu)
    }

    /// Waits up to `timeout` for the run's phase to change from `from`.
    pub(crate) fn wait_phase_change(&self, from: RunPhase, timeout: Duration) {
        let state = self.lock();
        if phase(state.vcpu) == from {
            drop(crate::sync::wait_timeout(&self.0.changed, state, timeout));
        }
    }

    /// Records the calling thread as the vCPU thread until the guard drops (the end of the
    /// run, however it ends).
    pub(crate) fn running(&self) -> RunGuard<'_> {
        self.lock().vcpu = Vcpu::Running(current_thread());
        RunGuard(self)
    }
}

/// The vCPU loop is running on this thread; dropping it ends the run for the stopper.
#[derive(Debug)]
pub(crate) struct RunGuard<'a>(&'a Stopper);

impl Drop for RunGuard<'_> {
    fn drop(&mut self) {
        self.0.lock().vcpu = Vcpu::Done;
        self.0.0.changed.notify_all();
    }
}

fn current_thread() -> libc::pthread_t {
    // SAFETY: pthread_self has no preconditions and cannot fail.
    unsafe { libc::pthread_self() }
}

/// The signal that kicks the vCPU thread out of `KVM_RUN`: the first real-time signal. Its
/// process-wide handler is a no-op; a library user must not use it for anything else.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn install_kick_handler() -> Result<()> {
    static INSTALLED: OnceLock<std::result::Result<(), i32>> = OnceLock::new();
    // vmm-sys-util installs it with SA_SIGINFO only: no SA_RESTART, so KVM_RUN (and any other
    // interrupted call on the vCPU thread) returns EINTR.
    let installed = INSTALLED.get_or_init(|| {
        vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick).map_err(|e| e.errno())
    });
    installed.map_err(|errno| Error::Io {
        what: format!(
            "cannot install the vCPU kick signal handler (signal {})",
            kick_signal()
        ),
        source: std::io::Error::from_raw_os_error(errno),
    })
}

fn kick(thread: libc::pthread_t) {
    // SAFETY: `thread` is the vCPU thread recorded by `running`. The caller holds the state
    // lock and has just seen `Vcpu::Running(thread)`; the vCPU thread takes the same lock to
    // set `Done` before it leaves the loop, so it is alive and its id is valid. The kick
    // signal's handler is installed (by `Stopper::new`) and does nothing. A failure (ESRCH
    // cannot happen here) would only mean the kick is lost; the next one follows.
    unsafe { libc::pthread_kill(thread, kick_signal()) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::event::EventQueue;

    #[test]
    fn parses_and_formats_durations() {
        for (s, ms) in [
            ("500ms", 500),
            ("5s", 5_000),
            ("2m", 120_000),
            ("1h", 3_600_000),
            ("10", 10_000),
            (" 7s ", 7_000),
        ] {
            assert_eq!(parse_duration(s), Ok(Duration::from_millis(ms)), "{s}");
        }
        for bad in [
            "", "s", "0", "0ms", "-1s", "1.5s", "5 s", "5sec", "10x", "ms5",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        assert!(parse_duration("99999999999999999999h").is_err());
        assert_eq!(parse_duration("0").unwrap_err(), "must be greater than 0");
        for s in ["300ms", "5s", "90s", "2m", "1h", "1500ms"] {
            assert_eq!(format_duration(parse_duration(s).unwrap()), s);
        }
        assert_eq!(format_duration(Duration::from_micros(1500)), "1.5ms");
    }

    #[test]
    fn reasons_read_as_the_cli_prints_them() {
        let t = StopReason::Timeout(Duration::from_secs(5));
        assert_eq!(t.to_string(), "timeout after 5s");
        assert_eq!(t.exit_status(), 124);
        assert_eq!(StopReason::Signal(libc::SIGINT).to_string(), "SIGINT");
        assert_eq!(StopReason::Signal(libc::SIGINT).exit_status(), 130);
        assert_eq!(StopReason::Signal(libc::SIGTERM).to_string(), "SIGTERM");
        assert_eq!(StopReason::Signal(libc::SIGTERM).exit_status(), 143);
    }

    #[test]
    fn the_first_request_wins_and_a_stop_before_the_run_returns_at_once() {
        let q = EventQueue::default();
        let s = Stopper::new(q.interrupter()).unwrap();
        assert_eq!(s.requested(), None);
        s.clone().stop(StopReason::Signal(libc::SIGTERM));
        s.stop(StopReason::Timeout(Duration::from_secs(1)));
        assert_eq!(s.requested(), Some(StopReason::Signal(libc::SIGTERM)));
    }

    #[test]
    fn a_stop_wakes_a_thread_parked_on_the_event_queue() {
        let mut q = EventQueue::default();
        let s = Stopper::new(q.interrupter()).unwrap();
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let vcpu = {
            let s = s.clone();
            std::thread::spawn(move || {
                // Stand-in for the vCPU loop parked in idle_yield: wait on the queue until a
                // stop is requested.
                let _running = s.running();
                started_tx.send(()).unwrap();
                let mut timed_out = false;
                while s.requested().is_none() {
                    let t0 = Instant::now();
                    q.wait(Some(Duration::from_secs(30)));
                    timed_out |= t0.elapsed() >= Duration::from_secs(30);
                }
                (timed_out, q.delivered())
            })
        };
        started_rx.recv().unwrap();
        // Returns only once the "loop" has ended; no wait ran into its 30 s timeout (a kick
        // signal alone does not end a wait on the queue: the interrupt does), and the guest
        // was given no event.
        s.stop(StopReason::Timeout(Duration::from_millis(1)));
        assert_eq!(vcpu.join().unwrap(), (false, 0));
    }

    #[test]
    fn a_timeout_stops_a_thread_blocked_in_a_system_call() {
        // A thread blocked in a call that only a signal interrupts (as KVM_RUN is) ends when
        // the kick arrives: poll(2) with no fds, for a minute, returns EINTR.
        let q = EventQueue::default();
        let s = Stopper::new(q.interrupter()).unwrap();
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let vcpu = {
            let s = s.clone();
            std::thread::spawn(move || {
                let _running = s.running();
                started_tx.send(()).unwrap();
                let mut timed_out = false;
                while s.requested().is_none() {
                    // SAFETY: poll with no descriptors (a null pointer and a count of 0) only
                    // sleeps.
                    let r = unsafe { libc::poll(std::ptr::null_mut(), 0, 60_000) };
                    timed_out |= r == 0;
                }
                timed_out
            })
        };
        started_rx.recv().unwrap();
        let t0 = Instant::now();
        s.stop_at(
            Some(t0 + Duration::from_millis(20)),
            StopReason::Timeout(Duration::from_millis(20)),
        );
        // Every poll ended early (EINTR), none ran its minute.
        assert!(!vcpu.join().unwrap());
        assert_eq!(
            s.requested(),
            Some(StopReason::Timeout(Duration::from_millis(20)))
        );
        // The timer waits for the end of the run only: after it, it returns at once.
        s.stop_at(None, StopReason::Signal(libc::SIGINT));
    }
}
