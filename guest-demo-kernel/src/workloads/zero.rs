//! `zero` (arguments `mib`, default 256; `check`, `release`, `prepare`, each 0 or 1, defaults
//! 0, 1, 1): frame allocation with pre-zeroed page hints (`guest_pv::frames`), PV (`Hints::Pv`:
//! `zero_hints` QUERY for fresh frames, batched RELEASE of freed ones, PREPARE read-ahead)
//! against trapped (`Hints::None`: zero every frame, never report frees).
//!
//! `N` = `mib * 256` frames come from an allocator over free RAM (the first usable region above
//! the kernel that holds the frames, the allocator's metadata and a list of `N` frame
//! addresses; a larger `mib` is an argument error, exit code 2). In PV mode a host without
//! `zero_hints` is refused with exit code 4. Everything from building the allocator on runs at
//! CPL 3 (`at_cpl3`), where pvkit's KVM runs code natively. Timed section, between the
//! markers:
//!
//! 1. allocate `N` frames; frame `i` gets `pattern(A, i, j)` in every `u64` `j` (`0..512`);
//!    then the first `u64` of every frame is read back;
//! 2. checkpoint marker (the host records resident guest RAM);
//! 3. free the frames in reverse order (PV: released in batches of
//!    `RELEASE_THRESHOLD_BYTES`), then `flush()` the rest;
//! 4. checkpoint marker;
//! 5. allocate `N` frames again — the allocator's LIFO order gives frame `i` back as the `i`-th
//!    (checked) — fill frame `i` with `pattern(B, i, j)` and read back its first and last
//!    `u64`.
//!
//! `check=1` makes the allocator read every frame it serves without zeroing and panic unless it
//! is all zero (in phase 5 that covers "a released frame reused by the guest reads as zero").
//!
//! `pattern(seed, i, j)` = `(i * 0x9E3779B97F4A7C15 ^ seed) + j` (wrapping), `A` =
//! `0x5a5a5a5a5a5a5a5a`, `B` = `0xa5a5a5a5a5a5a5a5`. Checksum: FNV-1a over the `u64`s read
//! back, 8 little-endian bytes each, in order (phase 1: `N`, phase 5: `2N`) — the same in both
//! modes. `ops` = `2N` (frames allocated). Extra result fields, all decimal:
//! `zeroed_fresh_bytes` (bytes the guest zeroed in phase 1), `zeroed_reuse_bytes` (phase 5),
//! `guest_zeroed_bytes` (total), `zero_ns` (time spent zeroing, TSC; 0 without the TSC
//! frequency), `skipped_bytes` (served known zero), `released_bytes` (the guest's count),
//! `release_calls`, `query_calls`, `prepare_calls`, `prepared_bytes` (read-ahead, `prepare=1`
//! on a host with `ZERO_PREPARE`). A `zero_hints` call the host refuses panics (exit 101).

use core::fmt::Write;

use crate::args::Args;
use guest_pv::Fnv1a;
use guest_pv::frames::{FrameStats, Frames, HintBuffers, Hints, MAX_FRAMES};
use guest_pv::tsc::Tsc;
use hypercall_abi::features;
use hypercall_abi::layout::PAGE_SIZE;

use super::{Env, Outcome, Workload, free_ram_start};
use crate::platform::{at_cpl3, marker_begin, marker_checkpoint, marker_end};

pub const WORKLOAD: Workload = Workload {
    name: "zero",
    keys: &["mib", "check", "release", "prepare"],
    text_keys: &[],
    run,
};

const DEFAULT_MIB: u64 = 256;
/// A transparent huge page of the host.
const HUGE_PAGE: u64 = 2 << 20;

const FRAMES_PER_MIB: u64 = (1 << 20) / PAGE_SIZE;
/// `u64`s in a frame.
const WORDS: usize = (PAGE_SIZE / 8) as usize;
/// Seed of the phase 1 pattern.
const SEED_A: u64 = 0x5a5a_5a5a_5a5a_5a5a;
/// Seed of the phase 5 pattern.
const SEED_B: u64 = 0xa5a5_a5a5_a5a5_a5a5;

/// Word `j` of frame `i` under `seed`.
const fn pattern(seed: u64, i: u64, j: u64) -> u64 {
    (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed).wrapping_add(j)
}

/// Everything the CPL 3 part needs, prepared at CPL 0.
struct Job {
    hints: Hints,
    buffers: &'static mut HintBuffers,
    tsc: Option<Tsc>,
    check: bool,
    /// PV: report frees to the host (`release=1`, default) or keep them (`release=0`: hints
    /// only; freed frames stay backed and are zeroed again by the guest on reuse).
    release: bool,
    /// PV: read ahead with `zero_hints(PREPARE)` where the host offers it (`prepare=1`,
    /// default) or not (`prepare=0`: the vCPU takes the host page faults itself).
    prepare: bool,
    /// The allocator's range.
    region: u64,
    region_len: u64,
    /// The frame list, right after the range.
    list: List,
    frames: u64,
}

/// The addresses of the frames phase 1 allocated, in order (one `u64` each, in free RAM).
#[derive(Debug, Clone, Copy)]
struct List(u64);

impl List {
    fn slot(self, i: u64) -> *mut u64 {
        core::ptr::with_exposed_provenance_mut::<u64>((self.0 + i * 8) as usize)
    }

    /// Records the `i`-th frame.
    fn set(self, i: u64, addr: u64) {
        // SAFETY: entry `i` < `frames` of the list, free RAM this workload owns
        // (`free_ram_start`), identity-mapped and user-accessible.
        unsafe { self.slot(i).write(addr) };
    }

    /// The `i`-th frame (recorded in phase 1).
    fn get(self, i: u64) -> u64 {
        // SAFETY: as in `set`; entry `i` was written in phase 1.
        unsafe { self.slot(i).read() }
    }
}

/// Allocator statistics at the phase boundaries.
#[derive(Default)]
struct Phases {
    start: FrameStats,
    fresh: FrameStats,
    freed: FrameStats,
    end: FrameStats,
}

fn run(env: &mut Env, args: &Args<'_>) -> Outcome {
    let mib = args.get_or("mib", DEFAULT_MIB);
    let check = args.get_or("check", 0);
    let release = args.get_or("release", 1);
    if release > 1 {
        WORKLOAD.usage(env, format_args!("release={release} (want 0 or 1)"));
    }
    let prepare = args.get_or("prepare", 1);
    if prepare > 1 {
        WORKLOAD.usage(env, format_args!("prepare={prepare} (want 0 or 1)"));
    }
    if mib == 0 {
        WORKLOAD.usage(env, format_args!("mib=0 (want at least 1)"));
    }
    if check > 1 {
        WORKLOAD.usage(env, format_args!("check={check} (want 0 or 1)"));
    }
    let frames = match mib.checked_mul(FRAMES_PER_MIB) {
        Some(n) if n <= MAX_FRAMES => n,
        _ => WORKLOAD.usage(env, format_args!("mib={mib} is too large")),
    };
    let region_len = Frames::region_bytes(frames);
    let list_len = (frames * 8).next_multiple_of(PAGE_SIZE);
    // The frames start on a 2 MiB boundary (and `mib` MiB of them end on one when `mib` is
    // even), so they share no huge page with other data: the host backs guest RAM with
    // transparent huge pages, and a huge page is known zero only if nothing in it was touched;
    // releases then cover whole huge pages, which the host can really free.
    let base = match free_ram_start(env.boot_info, region_len + list_len + HUGE_PAGE) {
        Ok(base) => base.next_multiple_of(HUGE_PAGE),
        Err(max) => WORKLOAD.usage(
            env,
            format_args!(
                "mib={mib} does not fit in free RAM: it needs {} bytes (frames, allocator \
                 metadata, frame list and alignment), the largest free region above the kernel \
                 has {max}",
                region_len + list_len + HUGE_PAGE
            ),
        ),
    };
    let hints = match env.platform.feature(features::ZERO_HINTS) {
        Some(pv) => Hints::Pv(pv),
        None => Hints::None,
    };
    let job = Job {
        hints,
        buffers: super::hint_buffers(),
        tsc: Tsc::from_cpuid(),
        check: check == 1,
        release: release == 1,
        prepare: prepare == 1,
        region: base,
        region_len,
        list: List(base + region_len),
        frames,
    };
    let mut phases = Phases::default();
    let checksum = at_cpl3(|| job.run(&mut phases));

    let (fresh, reuse) = (
        phases.fresh.zeroed_bytes - phases.start.zeroed_bytes,
        phases.end.zeroed_bytes - phases.freed.zeroed_bytes,
    );
    let s = phases.end;
    let mut outcome = Outcome::new(2 * frames, checksum);
    let _ = write!(
        outcome.fields,
        " zeroed_fresh_bytes={fresh} zeroed_reuse_bytes={reuse} guest_zeroed_bytes={} \
         zero_ns={} skipped_bytes={} released_bytes={} release_calls={} query_calls={} \
         prepare_calls={} prepared_bytes={}",
        s.zeroed_bytes,
        s.zero_ns,
        s.skipped_bytes,
        s.released_bytes,
        s.release_calls,
        s.query_calls,
        s.prepare_calls,
        s.prepared_bytes
    );
    outcome
}

impl Job {
    /// Everything at CPL 3; returns the checksum and fills `phases`.
    fn run(self, phases: &mut Phases) -> u64 {
        let Job {
            hints,
            buffers,
            tsc,
            check,
            release,
            prepare,
            region,
            region_len,
            list,
            frames: n,
        } = self;
        // SAFETY: the range and the list after it are free RAM above the kernel
        // (`free_ram_start`), identity-mapped, user-accessible and used by nothing else (one
        // workload per boot); the allocator gets the range, this function keeps the list. The
        // hint buffers are a kernel static (identity-mapped) handed out once.
        let frames = unsafe { Frames::new(region, region_len, hints, buffers) };
        let mut frames = match frames {
            Ok(f) => f,
            Err(e) => panic!("zero: allocator: {e}"),
        };
        assert_eq!(frames.capacity(), n, "allocator capacity");
        if let Some(tsc) = tsc {
            frames.set_clock(tsc);
        }
        frames.set_check(check);
        if !release {
            frames.set_release_threshold(u64::MAX);
        }
        frames.set_prepare(prepare);
        let mut h = Fnv1a::new();

        marker_begin();
        phases.start = frames.stats();
        // 1. Allocate and fill.
        for i in 0..n {
            let addr = alloc(&mut frames, i);
            list.set(i, addr);
            fill(addr, SEED_A, i);
        }
        for i in 0..n {
            let v = word(list.get(i), 0);
            assert_eq!(v, pattern(SEED_A, i, 0), "frame {i} after phase 1");
            h.write_u64(v);
        }
        phases.fresh = frames.stats();
        marker_checkpoint();

        // 3. Free (reverse order), release the rest.
        for i in (0..n).rev() {
            // SAFETY: the frame was allocated in phase 1 and nothing uses it any more.
            if let Err(e) = unsafe { frames.free(list.get(i)) } {
                panic!("zero: free of frame {i}: {e}");
            }
        }
        if release {
            frames.flush();
        }
        marker_checkpoint();
        phases.freed = frames.stats();

        // 5. Allocate again (same order), fill with the other pattern, read back.
        for i in 0..n {
            let addr = alloc(&mut frames, i);
            assert_eq!(addr, list.get(i), "phase 5 allocation {i} (LIFO order)");
            fill(addr, SEED_B, i);
        }
        for i in 0..n {
            let addr = list.get(i);
            for j in [0, WORDS as u64 - 1] {
                let v = word(addr, j);
                assert_eq!(v, pattern(SEED_B, i, j), "frame {i} word {j} after phase 5");
                h.write_u64(v);
            }
        }
        phases.end = frames.stats();
        marker_end();

        if let Some(e) = frames.hint_error() {
            panic!(
                "zero: the host refused {} zero_hints call(s), first: {e}",
                phases.end.hint_errors
            );
        }
        h.finish()
    }
}

/// Allocates a frame; panics on failure.
fn alloc(frames: &mut Frames<'_>, i: u64) -> u64 {
    match frames.alloc() {
        Ok(addr) => addr,
        Err(e) => panic!("zero: allocation {i}: {e}"),
    }
}

/// Writes `pattern(seed, i, j)` into every word `j` of the frame at `addr`.
fn fill(addr: u64, seed: u64, i: u64) {
    let frame = core::ptr::with_exposed_provenance_mut::<u64>(addr as usize);
    for j in 0..WORDS {
        // SAFETY: `addr` is a frame the allocator just handed out: identity-mapped, writable,
        // used by nothing else.
        unsafe { frame.add(j).write(pattern(seed, i, j as u64)) };
    }
}

/// Word `j` of the frame at `addr`.
fn word(addr: u64, j: u64) -> u64 {
    let p = core::ptr::with_exposed_provenance::<u64>((addr + j * 8) as usize);
    // SAFETY: `addr` is a frame this workload holds (allocated, not freed), `j` < 512.
    unsafe { p.read() }
}
