//! `freemem` (arguments `mib`, default 0 = 7/8 of what an allocator over the largest free
//! region holds; `rounds`, default 100, 1..=100000): free frames reported without an exit (ABI
//! v1.8, `zero_hints(FREE_LIST)`), for snapshots and live migration that skip them.
//!
//! An allocator (`guest_pv::frames::Frames`) over the largest usable region above the kernel:
//! PV (`Hints::Pv`, on a host with `zero_hints`) registers its release list as the guest's free
//! list where the host offers `FREE_REPORT`; trapped (`Hints::None`) reports nothing. Between
//! the markers:
//!
//! 1. allocate `N` frames (frame `i` is the allocator's `i`-th, at `start + i * 4096`) and
//!    write `pattern(i, j)` into every `u64` `j` of frame `i`;
//! 2. free 3 of every 4 frames (`i % 4 != 3`), in ascending order: runs of 3 frames, so each
//!    is a range of its own; PV releases the list whenever its 256 ranges are in use, and the
//!    rest stays in the registered free list. Prints `freemem: allocated N frames, freed M,
//!    kept K` (and, PV, the bytes released and still pending), then writes a checkpoint
//!    marker (`compare --workload snapshot|migrate` saves or migrates the VM there);
//! 3. `rounds` times: fold every word of the kept frames into the checksum, then wait about
//!    1 ms (PV with `idle_yield`: parked in the host; otherwise `hlt` with the trapped timer
//!    at 1 kHz; without a TSC rate the wait is skipped).
//!
//! Checksum: FNV-1a over, per round, the round number and the fold (`acc = acc.rotl(5) ^ w`
//! over the kept frames' words in order), 8 little-endian bytes each: it depends only on the
//! data, so it is the same in both modes and whether or not the VM was saved and restored or
//! migrated in the middle (the kept frames are never in the free list). `ops` = `rounds`.
//! Extra result fields: `allocated`, `freed`, `kept` (frames), `released_bytes`,
//! `pending_bytes`, `free_list` (1 if registered). The allocator is never dropped: the free
//! list stays registered until the VM exits, so a host may save the VM at any point.
//!
//! The memory work runs at CPL 3 (`at_cpl3`, native on pvkit's KVM), the waits at CPL 0.

use core::fmt::Write;

use crate::args::Args;
use guest_pv::frames::{Frames, Hints, MAX_FRAMES};
use guest_pv::idle::{self, PvIdle};
use guest_pv::tsc::Tsc;
use guest_pv::{Fnv1a, Platform};
use hypercall_abi::features;
use hypercall_abi::layout::PAGE_SIZE;

use super::{Env, Outcome, Workload, free_ram_start};
use crate::out::kprintln;
use crate::platform::{
    at_cpl3, marker_begin, marker_checkpoint, marker_end, timer_start, timer_stop,
};

pub const WORKLOAD: Workload = Workload {
    name: "freemem",
    keys: &["mib", "rounds"],
    text_keys: &[],
    run,
};

const DEFAULT_ROUNDS: u64 = 100;
const MAX_ROUNDS: u64 = 100_000;
/// The wait between rounds.
const WAIT_NS: u64 = 1_000_000;
/// The trapped timer's period while waiting with `hlt`.
const TICK_US: u32 = 1000;
const FRAMES_PER_MIB: u64 = (1 << 20) / PAGE_SIZE;
/// `u64`s in a frame.
const WORDS: u64 = PAGE_SIZE / 8;

/// Word `j` of frame `i`.
const fn pattern(i: u64, j: u64) -> u64 {
    (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xf4ee_f4ee_f4ee_f4ee).wrapping_add(j)
}

/// Frame `i` is kept (the others are freed).
const fn kept(i: u64) -> bool {
    i % 4 == 3
}

/// How the rounds wait.
enum Waiter {
    Pv(PvIdle, Tsc),
    Hlt(Tsc),
    None,
}

impl Waiter {
    fn new(platform: Platform) -> Waiter {
        let tsc = Tsc::from_cpuid().or_else(|| {
            let pv = platform.feature(features::CLOCK)?;
            Tsc::calibrate(|| pv.clock_ns(), 10_000_000)
        });
        let Some(tsc) = tsc else {
            return Waiter::None;
        };
        match platform.feature(features::IDLE_YIELD | features::CLOCK) {
            Some(pv) => match PvIdle::new(pv, tsc) {
                Ok(p) => Waiter::Pv(p, tsc),
                Err(e) => panic!("freemem: clock_ns: {e}"),
            },
            None => {
                timer_start(TICK_US);
                Waiter::Hlt(tsc)
            }
        }
    }

    /// Waits about [`WAIT_NS`] (at CPL 0).
    fn wait(&mut self) {
        match self {
            Waiter::Pv(pv, tsc) => {
                let deadline = tsc.now_ns().saturating_add(WAIT_NS);
                if let Err(e) = pv.idle_until(deadline) {
                    panic!("freemem: idle_yield: {e}");
                }
            }
            Waiter::Hlt(tsc) => {
                idle::hlt(tsc, tsc.now_ns().saturating_add(WAIT_NS));
            }
            Waiter::None => {}
        }
    }

    fn finish(self) {
        if let Waiter::Hlt(_) = self {
            timer_stop();
        }
    }
}

fn run(env: &mut Env, args: &Args<'_>) -> Outcome {
    let mib = args.get_or("mib", 0);
    let rounds = args.get_or("rounds", DEFAULT_ROUNDS);
    if rounds == 0 || rounds > MAX_ROUNDS {
        WORKLOAD.usage(env, format_args!("rounds={rounds} (want 1..={MAX_ROUNDS})"));
    }
    // The largest usable region above the kernel (`free_ram_start` reports its size when asked
    // for more than any region holds).
    let largest = match free_ram_start(env.boot_info, u64::MAX) {
        Ok(_) => unreachable!("no region holds u64::MAX bytes"),
        Err(max) => max / PAGE_SIZE * PAGE_SIZE,
    };
    let n = if mib == 0 {
        let len = largest.min(Frames::region_bytes(MAX_FRAMES));
        capacity(len) / 8 * 7
    } else {
        match mib.checked_mul(FRAMES_PER_MIB) {
            Some(n) if n <= MAX_FRAMES && Frames::region_bytes(n) <= largest => n,
            _ => WORKLOAD.usage(
                env,
                format_args!("mib={mib} does not fit in the largest free region ({largest} bytes)"),
            ),
        }
    };
    if n < 4 {
        WORKLOAD.usage(
            env,
            format_args!("{largest} bytes of free RAM hold no 4 frames"),
        );
    }
    let region_len = if mib == 0 {
        largest.min(Frames::region_bytes(MAX_FRAMES))
    } else {
        Frames::region_bytes(n)
    };
    let Ok(base) = free_ram_start(env.boot_info, region_len) else {
        unreachable!("the largest region holds {region_len} bytes");
    };
    let hints = match env.platform.feature(features::ZERO_HINTS) {
        Some(pv) => Hints::Pv(pv),
        None => Hints::None,
    };
    // SAFETY: the range is free RAM above the kernel (`free_ram_start`), identity-mapped,
    // user-accessible and used by nothing else (one workload per boot); the hint buffers are a
    // kernel static (identity-mapped) handed out once.
    let frames = unsafe { Frames::new(base, region_len, hints, super::hint_buffers()) };
    let mut frames = match frames {
        Ok(f) => f,
        Err(e) => panic!("freemem: allocator: {e}"),
    };
    let mut waiter = Waiter::new(env.platform);

    marker_begin();
    // 1. and 2., at CPL 3.
    let freed = at_cpl3(|| fill_and_free(&mut frames, n));
    let s = frames.stats();
    kprintln!(
        env.console,
        "freemem: allocated {n} frames, freed {freed}, kept {}; released {} bytes, pending {} \
         bytes, free list {}",
        n - freed,
        s.released_bytes,
        frames.pending_bytes(),
        if frames.free_list_registered() {
            "registered"
        } else {
            "not registered"
        }
    );
    // The frees are done: a host that saves or migrates the VM "after the frees" does it here.
    marker_checkpoint();
    // 3. The rounds: fold at CPL 3, wait at CPL 0.
    let start = frames.start();
    let mut h = Fnv1a::new();
    for round in 0..rounds {
        let acc = at_cpl3(|| fold(start, n));
        h.write_u64(round);
        h.write_u64(acc);
        waiter.wait();
    }
    marker_end();
    waiter.finish();

    if let Some(e) = frames.hint_error() {
        panic!("freemem: the host refused a zero_hints call: {e}");
    }
    let s = frames.stats();
    let mut outcome = Outcome::new(rounds, h.finish());
    let _ = write!(
        outcome.fields,
        " allocated={n} freed={freed} kept={} released_bytes={} pending_bytes={} free_list={}",
        n - freed,
        s.released_bytes,
        frames.pending_bytes(),
        u8::from(frames.free_list_registered())
    );
    // The free list stays registered until the VM exits (a host may save the VM until then);
    // the region and the buffers are never used for anything else in this boot.
    core::mem::forget(frames);
    outcome
}

/// The frames an allocator over `len` bytes holds.
fn capacity(len: u64) -> u64 {
    // `region_bytes` grows with the frame count: the largest count that fits.
    let (mut lo, mut hi) = (0, len / PAGE_SIZE);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if Frames::region_bytes(mid) <= len {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    lo
}

/// Allocates `n` frames, fills them, frees 3 of every 4; returns the number freed.
fn fill_and_free(frames: &mut Frames<'_>, n: u64) -> u64 {
    let start = frames.start();
    for i in 0..n {
        let addr = match frames.alloc() {
            Ok(a) => a,
            Err(e) => panic!("freemem: allocation {i}: {e}"),
        };
        assert_eq!(addr, start + i * PAGE_SIZE, "allocation {i} (bump order)");
        let p = core::ptr::with_exposed_provenance_mut::<u64>(addr as usize);
        for j in 0..WORDS {
            // SAFETY: a frame the allocator just handed out: identity-mapped, writable,
            // user-accessible, used by nothing else.
            unsafe { p.add(j as usize).write(pattern(i, j)) };
        }
    }
    let mut freed = 0;
    for i in (0..n).filter(|&i| !kept(i)) {
        // SAFETY: frame `i` was allocated above and nothing uses it any more.
        if let Err(e) = unsafe { frames.free(start + i * PAGE_SIZE) } {
            panic!("freemem: free of frame {i}: {e}");
        }
        freed += 1;
    }
    freed
}

/// Folds every word of the kept frames, in order; checks the first word of each.
fn fold(start: u64, n: u64) -> u64 {
    let mut acc = 0u64;
    for i in (0..n).filter(|&i| kept(i)) {
        let p = core::ptr::with_exposed_provenance::<u64>((start + i * PAGE_SIZE) as usize);
        for j in 0..WORDS {
            // SAFETY: frame `i` is kept: allocated in `fill_and_free` and never freed, so the
            // workload owns it.
            let w = unsafe { p.add(j as usize).read() };
            acc = acc.rotate_left(5) ^ w;
        }
        // SAFETY: as above.
        let first = unsafe { p.read() };
        assert_eq!(first, pattern(i, 0), "kept frame {i} changed");
    }
    acc
}
