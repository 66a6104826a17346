//! `fuzz` (arguments `calls`, default 20000; `seed`, default `0x5eed`): the guest side of the
//! hypercall fuzzer. Issues `calls` random hypercalls through `guest_pv::hypercall::raw_hypercall`
//! (PV mode only; trapped mode has no hypercall port: exit code 4) and checks every answer
//! against docs/ABI.md §5–§11. Runs at CPL 3 (natively on pvkit's KVM), between the markers.
//!
//! # The generator
//! A deterministic splitmix64 stream seeded by `seed` picks, per call:
//! - **the call number**: every call of ABI v1.7 (weighted towards `zero_hints`, `mmu_update`
//!   and `mmu_pin`, with random sub-operations including invalid ones), numbers no version
//!   defines (`5..=15`, `20..=63`, random `u64`s) and valid numbers with random high bits (e.g.
//!   `1 << 40 | 17`), which must be `UNKNOWN_CALL` (the full `rax` is the number);
//! - **lengths and counts**: 0, 1, small, page multiples, each call's maximum and maximum + 1,
//!   `u64::MAX`, single high bits and random `u64`s;
//! - **addresses**, from these classes: the workload's scratch region in free RAM, the
//!   page-table pool (its frames, the workload's own pool frames, misaligned), the zero page and
//!   boot structures, the kernel image, the end of RAM (straddling it, or just inside),
//!   beyond RAM (pool, MMIO window, above 4 GiB), random `u64`s, and any of these with random
//!   high bits set.
//!
//! # Staying alive
//! The kernel must survive its own fuzzing, so a call the host must *accept* never harms it:
//! - `exit` only with codes above `u32::MAX` (`INVALID_ARGUMENT`);
//! - `idle_yield` only with deadlines in the past or at most 1 ms ahead of the last `clock_ns`;
//! - `zero_hints` QUERY writes its bitmap only into the scratch region's bitmap page, unless the
//!   host must refuse the call (count above 32768, bitmap not inside RAM);
//! - `zero_hints` RELEASE: each range is inside the free-RAM region holding the scratch region,
//!   or one the host must refuse (misaligned, outside RAM, below the kernel end); a list the host
//!   would read from RAM lies in that region (where nothing but the fuzzer's own lists and
//!   batches is non-zero) outside the bitmap page;
//! - `mmu_update`: likewise for batches; entries never target the VMM's boot tables (the
//!   kernel's live page tables) with an aligned address: they go into the 16 pool frames the
//!   workload took from the pool's free frames, other non-boot pool frames, or addresses the host
//!   must refuse (misaligned, outside the pool, with high bits);
//! - `mmu_pin` on any frame: a pin adds a reference, an unpin the host accepts drops one the
//!   fuzzer added (the boot root's own pin cannot be dropped: `DENIED`);
//! - `console_write` that the host would accept prints at most 16 bytes of `.` from the scratch
//!   region's text page (rewritten before each such call); a newline ends them before the
//!   result.
//!
//! # Checks and result
//! Every answer must have a status documented for its call (a clear feature bit: exactly
//! `NOT_IMPLEMENTED`; an undefined number: exactly `UNKNOWN_CALL`), `rdx` = 0 on error (except
//! `mmu_update`: at most `count`), and on success the documented value (`null` echoes,
//! `features` equals CPUID, `console_write` returns the length, `mmu_update` the count,
//! `mmu_pin` 0, `idle_yield` a reason 1–3, `clock_ns` never goes back). Anything else panics
//! (exit 101) naming the call, its registers and the answer.
//!
//! `ops` = `calls`. Checksum: FNV-1a over the status counts, 10 classes (the 9 calls in number
//! order, then undefined numbers) × 8 statuses (0–7), each count as 8 little-endian bytes: the
//! same for a given seed, run after run. Before the result line, one `fuzz: <call> …` line per
//! class lists its non-zero counts; the result line carries `seed=` and the total per status
//! (`ok=`, `unknown_call=`, …).

use core::fmt::{self, Write};

use crate::args::Args;
use guest_pv::Fnv1a;
use guest_pv::hypercall::raw_hypercall;
use guest_pv::mmu::PtFrameAllocator;
use hypercall_abi::boot::{BootInfo, region_kind};
use hypercall_abi::layout::{PAGE_SIZE, PT_POOL_BOOT_FRAMES, PT_POOL_GPA, PT_POOL_SIZE};
use hypercall_abi::mmu::{
    MMU_UPDATE_MAX, PIN_L4, POOL_FRAMES, PTE_HUGE, PTE_PRESENT, PTE_USER, PTE_WRITABLE, UNPIN,
    UPDATE_DEFER_SYNC, in_pool, pool_frame_gpa,
};
use hypercall_abi::request::ALL_CALLS;
use hypercall_abi::zero::{
    FREE_LIST, PREPARE, QUERY, QUERY_MAX_FRAMES, RELEASE, RELEASE_MAX_RANGES,
};
use hypercall_abi::{CONSOLE_WRITE_MAX, Call, Error, Return, call_feature, features};

use super::{Env, Outcome, Workload, free_ram_start};
use crate::exit_code;
use crate::out::kprintln;
use crate::platform::{at_cpl3, marker_begin, marker_end};

pub const WORKLOAD: Workload = Workload {
    name: "fuzz",
    keys: &["calls", "seed"],
    text_keys: &[],
    run,
};

const DEFAULT_CALLS: u64 = 20_000;
const DEFAULT_SEED: u64 = 0x5eed;

/// The scratch region: free RAM the workload owns, 2 MiB aligned.
const SCRATCH_LEN: u64 = 8 << 20;
const HUGE_PAGE: u64 = 2 << 20;
/// Scratch layout: `.` bytes for `console_write`.
const TEXT_OFF: u64 = 0;
/// The one page `zero_hints` QUERY may write.
const BITMAP_OFF: u64 = PAGE_SIZE;
/// Range lists and `mmu_update` batches, written by the fuzzer before each call (16 KiB).
const LIST_OFF: u64 = 4 * PAGE_SIZE;
/// The rest: never written by the guest (reads zero), the target of releases and prepares.
const DATA_OFF: u64 = 16 * PAGE_SIZE;
/// Longest `console_write` the fuzzer lets the host accept.
const TEXT_MAX: u64 = 16;

/// Pool frames the workload takes for itself.
const ARENA_FRAMES: usize = 16;

/// Status classes: the 9 calls in number order, then undefined numbers.
const CLASSES: usize = ALL_CALLS.len() + 1;
const UNDEFINED: usize = ALL_CALLS.len();
/// Statuses 0 (success) to 7 (`TYPE_CONFLICT`).
const STATUSES: usize = Error::TypeConflict.code() as usize + 1;

/// The name of a documented status: `ok`, or the error's ABI name.
fn status_name(status: usize) -> &'static str {
    match Error::from_status(status as u64) {
        Ok(()) => "ok",
        Err(Some(e)) => e.name(),
        Err(None) => "undocumented",
    }
}

fn run(env: &mut Env, args: &Args<'_>) -> Outcome {
    let calls = args.get_or("calls", DEFAULT_CALLS);
    let seed = args.get_or("seed", DEFAULT_SEED);
    if env.platform.pvkit().is_none() {
        WORKLOAD.unsupported(
            env,
            format_args!(
                "needs mode pv (it fuzzes the hypercall interface, which trapped mode does not \
                 have)"
            ),
        );
    }
    let info = env.boot_info;
    let Ok(start) = free_ram_start(info, SCRATCH_LEN + HUGE_PAGE) else {
        kprintln!(
            env.console,
            "error: workload 'fuzz': needs {} bytes of free RAM above the kernel",
            SCRATCH_LEN + HUGE_PAGE
        );
        env.exit(exit_code::USAGE);
    };
    let scratch = start.next_multiple_of(HUGE_PAGE);
    let pool = PtFrameAllocator::from_boot_info(info);
    let mut arena = [0u64; ARENA_FRAMES];
    for slot in &mut arena {
        match pool.alloc() {
            Some(frame) => *slot = frame,
            None => panic!("fuzz: the page-table pool has fewer than {ARENA_FRAMES} free frames"),
        }
    }
    let mut fuzz = Fuzz {
        rng: Rng::new(seed),
        features: env.platform.feature_bits(),
        mem_size: info.mem_size,
        kernel_start: info.kernel_start,
        kernel_end: info.kernel_end,
        scratch,
        owned_start: start,
        owned_end: region_end(info, start),
        boot_frames: boot_frames(info),
        arena,
        clock: 0,
        counts: [[0; STATUSES]; CLASSES],
    };
    at_cpl3(|| {
        fuzz.prepare_scratch();
        marker_begin();
        for i in 0..calls {
            fuzz.one(i);
        }
        marker_end();
        0
    });

    // The fuzzer's console writes end without a newline.
    kprintln!(env.console, "");
    let mut h = Fnv1a::new();
    let mut totals = [0u64; STATUSES];
    for (class, counts) in fuzz.counts.iter().enumerate() {
        let name = ALL_CALLS.get(class).map_or("undefined", |c| c.name());
        let mut line = crate::out::Line::new();
        let _ = write!(line, "fuzz: {name}");
        for (status, &n) in counts.iter().enumerate() {
            h.write_u64(n);
            totals[status] += n;
            if n != 0 {
                let _ = write!(line, " {}={n}", status_name(status));
            }
        }
        kprintln!(
            env.console,
            "{}",
            core::str::from_utf8(line.as_bytes()).unwrap_or("")
        );
    }
    let mut outcome = Outcome::new(calls, h.finish());
    let _ = write!(outcome.fields, " seed={seed}");
    for (status, n) in totals.iter().enumerate() {
        let _ = write!(outcome.fields, " {}={n}", status_name(status));
    }
    outcome
}

/// The end of the usable region that holds `start`.
fn region_end(info: &BootInfo, start: u64) -> u64 {
    info.regions()
        .iter()
        .filter(|r| r.kind == region_kind::USABLE && r.start <= start)
        .map(|r| r.start.saturating_add(r.len).min(info.mem_size))
        .find(|&end| end > start)
        .unwrap_or(start + SCRATCH_LEN)
}

/// The pool frames holding the VMM's boot tables, as a bitmap over pool frame indices (the
/// memory map's kind-5 regions, and at least the first `PT_POOL_BOOT_FRAMES`).
fn boot_frames(info: &BootInfo) -> [u64; POOL_FRAMES / 64] {
    let mut bits = [0u64; POOL_FRAMES / 64];
    let mut mark = |i: u64| {
        if i < POOL_FRAMES as u64 {
            bits[i as usize / 64] |= 1 << (i % 64);
        }
    };
    for i in 0..PT_POOL_BOOT_FRAMES {
        mark(i);
    }
    for r in info
        .regions()
        .iter()
        .filter(|r| r.kind == region_kind::PT_POOL_BOOT)
    {
        let mut a = r.start & !(PAGE_SIZE - 1);
        while a < r.start.saturating_add(r.len) {
            if in_pool(a) {
                mark((a - PT_POOL_GPA) / PAGE_SIZE);
            }
            a += PAGE_SIZE;
        }
    }
    bits
}

/// splitmix64: a deterministic stream from the seed.
struct Rng(u64);

impl Rng {
    const fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0; the bias is irrelevant here).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// True with probability `1/n`.
    fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }

    /// A random bit among 32..=63.
    fn high_bit(&mut self) -> u64 {
        1 << (32 + self.below(32))
    }

    /// A length or count around `max` (the call's documented maximum).
    fn count(&mut self, max: u64) -> u64 {
        match self.below(16) {
            0 => 0,
            1 => 1,
            2 => max,
            3 => max + 1,
            4 => u64::MAX,
            5 => self.high_bit(),
            6 => 1 << self.below(64),
            7 => self.next(),
            8 => max - 1,
            _ => self.below(max.min(16) + 1),
        }
    }
}

/// What the fuzzer knows and counts.
struct Fuzz {
    rng: Rng,
    features: u64,
    mem_size: u64,
    kernel_start: u64,
    kernel_end: u64,
    /// The scratch region (`SCRATCH_LEN` bytes).
    scratch: u64,
    /// The free-RAM region that holds the scratch region: the workload's, never written by the
    /// guest outside the scratch region's text and list pages.
    owned_start: u64,
    owned_end: u64,
    /// Bitmap over pool frame indices: the VMM's boot tables (the kernel's live page tables).
    boot_frames: [u64; POOL_FRAMES / 64],
    /// Pool frames the workload took from the free pool frames.
    arena: [u64; ARENA_FRAMES],
    /// The last `clock_ns`.
    clock: u64,
    counts: [[u64; STATUSES]; CLASSES],
}

/// One generated call.
#[derive(Debug, Clone, Copy)]
struct Planned {
    nr: u64,
    args: [u64; 4],
}

impl Fuzz {
    fn text(&self) -> u64 {
        self.scratch + TEXT_OFF
    }

    fn bitmap(&self) -> u64 {
        self.scratch + BITMAP_OFF
    }

    fn list(&self) -> u64 {
        self.scratch + LIST_OFF
    }

    fn data(&self) -> u64 {
        self.scratch + DATA_OFF
    }

    fn scratch_ptr(&self, gpa: u64) -> *mut u64 {
        core::ptr::with_exposed_provenance_mut::<u64>(gpa as usize)
    }

    /// Fills the text page with `.` and clears the bitmap and list pages.
    fn prepare_scratch(&self) {
        for off in (0..DATA_OFF).step_by(8) {
            let v = if off < BITMAP_OFF {
                u64::from_le_bytes([b'.'; 8])
            } else {
                0
            };
            // SAFETY: inside the scratch region: free RAM this workload owns (`free_ram_start`,
            // one workload per boot), identity-mapped, writable and user-accessible.
            unsafe { self.scratch_ptr(self.scratch + off).write_volatile(v) };
        }
    }

    /// Writes `(a, b)` as entry `i` of the list page (a `ZeroRange` or an `MmuUpdate`).
    fn put(&self, i: u64, a: u64, b: u64) {
        debug_assert!(i < MMU_UPDATE_MAX);
        let p = self.scratch_ptr(self.list() + i * 16);
        // SAFETY: entry `i` < 1024 lies in the list pages of the scratch region (16 KiB), free
        // RAM this workload owns, identity-mapped and writable; the host reads it only during
        // the next call (volatile, so the stores are done before the `out`).
        unsafe {
            p.write_volatile(a);
            p.add(1).write_volatile(b);
        }
    }

    /// True if `[gpa, gpa + len)` is inside RAM (no overflow), as the host checks it.
    fn in_ram(&self, gpa: u64, len: u64) -> bool {
        gpa.checked_add(len).is_some_and(|end| end <= self.mem_size)
    }

    /// True if `[gpa, gpa + len)` lies in the free region the workload owns, outside the bitmap
    /// and list pages: memory that holds only `.` bytes (the text page) or zeros, so a list or
    /// batch the host reads there names nothing the kernel needs.
    fn readable_source(&self, gpa: u64, len: u64) -> bool {
        let Some(end) = gpa.checked_add(len) else {
            return false;
        };
        let (lists, lists_end) = (self.bitmap(), self.data());
        gpa >= self.owned_start && end <= self.owned_end && (end <= lists || gpa >= lists_end)
    }

    fn is_boot_frame(&self, gpa: u64) -> bool {
        in_pool(gpa) && {
            let i = (gpa - PT_POOL_GPA) / PAGE_SIZE;
            self.boot_frames[i as usize / 64] & (1 << (i % 64)) != 0
        }
    }

    /// An address from one of the classes of the module docs.
    fn addr(&mut self) -> u64 {
        let r = &mut self.rng;
        let a = match r.below(12) {
            0 | 1 => self.scratch + r.below(SCRATCH_LEN),
            2 => self.scratch + DATA_OFF + r.below(SCRATCH_LEN - DATA_OFF) / PAGE_SIZE * PAGE_SIZE,
            3 => PT_POOL_GPA + r.below(PT_POOL_SIZE),
            4 => self.arena[r.below(ARENA_FRAMES as u64) as usize] + r.below(512) * 8,
            5 => r.below(0x3000),
            6 => self.kernel_start + r.below((self.kernel_end - self.kernel_start).max(1)),
            7 => self.mem_size - r.below(4) * PAGE_SIZE - r.below(64),
            8 => match r.below(4) {
                0 => self.mem_size + r.below(1 << 20),
                1 => 0xC000_0000 + r.below(1 << 20),
                2 => (1 << 32) + r.below(1 << 32),
                _ => u64::MAX - r.below(PAGE_SIZE),
            },
            9 => r.next(),
            _ => (self.scratch + r.below(SCRATCH_LEN)) | r.high_bit(),
        };
        if self.rng.one_in(4) {
            a & !(PAGE_SIZE - 1)
        } else {
            a
        }
    }

    /// A page-aligned range for RELEASE / PREPARE, mostly in the data part of the scratch
    /// region.
    fn range(&mut self) -> (u64, u64) {
        let start = if self.rng.one_in(2) {
            self.data() + self.rng.below((SCRATCH_LEN - DATA_OFF) / PAGE_SIZE) * PAGE_SIZE
        } else {
            self.addr()
        };
        let len = match self.rng.below(6) {
            0 => 0,
            1..=3 => (1 + self.rng.below(64)) * PAGE_SIZE,
            4 => self.rng.count(SCRATCH_LEN),
            _ => self.rng.below(PAGE_SIZE),
        };
        (start, len)
    }

    /// True if the host must refuse a RELEASE range (or a PREPARE), by §11.
    fn release_refused(&self, start: u64, len: u64) -> bool {
        !start.is_multiple_of(PAGE_SIZE)
            || !len.is_multiple_of(PAGE_SIZE)
            || !self.in_ram(start, len)
            || start < self.kernel_end
    }

    /// A pool entry address for `mmu_update`: never an aligned one in a boot table.
    fn pte_gpa(&mut self) -> u64 {
        let r = &mut self.rng;
        let gpa = match r.below(11) {
            0..=5 => self.arena[r.below(ARENA_FRAMES as u64) as usize] + r.below(512) * 8,
            6 => self.arena[r.below(ARENA_FRAMES as u64) as usize] + r.below(PAGE_SIZE),
            7 => pool_frame_gpa(r.below(POOL_FRAMES as u64) as usize) + r.below(512) * 8,
            8 => {
                (pool_frame_gpa(r.below(POOL_FRAMES as u64) as usize) + r.below(PAGE_SIZE))
                    | r.high_bit()
            }
            9 => pool_frame_gpa(r.below(PT_POOL_BOOT_FRAMES) as usize) + 1 + r.below(7),
            _ => self.addr(),
        };
        if gpa.is_multiple_of(8) && self.is_boot_frame(gpa) {
            // An aligned entry of a boot table: make it misaligned (INVALID_ARGUMENT).
            gpa | 4
        } else {
            gpa
        }
    }

    /// A page-table entry value.
    fn pte_value(&mut self) -> u64 {
        let r = &mut self.rng;
        let flags = r.next() & 0x1ff;
        match r.below(10) {
            0 => r.next() & !PTE_PRESENT,
            1 | 2 => {
                self.arena[r.below(ARENA_FRAMES as u64) as usize]
                    | PTE_PRESENT
                    | PTE_WRITABLE
                    | PTE_USER
                    | (flags & !PTE_HUGE)
            }
            3 => pool_frame_gpa(r.below(POOL_FRAMES as u64) as usize) | PTE_PRESENT | flags,
            4 => (r.below(self.mem_size) & !(PAGE_SIZE - 1)) | PTE_PRESENT | (flags & !PTE_HUGE),
            5 => (r.below(self.mem_size) & !(HUGE_PAGE - 1)) | PTE_PRESENT | PTE_HUGE | flags,
            6 => (self.mem_size + r.below(1 << 30)) & !(PAGE_SIZE - 1) | PTE_PRESENT | flags,
            7 => r.next() | PTE_PRESENT,
            8 => 0,
            _ => (r.next() & 0x000f_ffff_ffff_f000) | flags | r.high_bit(),
        }
    }

    /// A random call number: defined ones (weighted), undefined ones, defined ones with high
    /// bits.
    fn call_number(&mut self) -> u64 {
        let r = &mut self.rng;
        let pick = r.below(100);
        let call = match pick {
            0..=3 => Call::Null,
            4..=5 => Call::Features,
            6..=13 => Call::ConsoleWrite,
            14..=16 => Call::Exit,
            17..=19 => Call::ClockNs,
            20..=24 => Call::IdleYield,
            25..=46 => Call::ZeroHints,
            47..=71 => Call::MmuUpdate,
            72..=84 => Call::MmuPin,
            85..=89 => {
                return ALL_CALLS[r.below(ALL_CALLS.len() as u64) as usize].raw() as u64
                    | r.high_bit()
                    | (r.next() & 0xffff_0000_0000_0000 & r.next());
            }
            90..=93 => return 5 + r.below(11),
            94..=96 => return 20 + r.below(44),
            _ => return r.next(),
        };
        u64::from(call.raw())
    }

    /// The arguments for `call`, safe to issue (module docs).
    fn plan(&mut self, call: Call) -> [u64; 4] {
        let r_junk = self.rng.next();
        match call {
            Call::Null => [self.rng.next(), r_junk, self.rng.next(), 0],
            Call::Features | Call::ClockNs => [r_junk, self.rng.next(), 0, self.rng.next()],
            Call::ConsoleWrite => {
                let mut gpa = self.addr();
                let mut len = self.rng.count(CONSOLE_WRITE_MAX);
                if self.rng.one_in(3) {
                    gpa = self.text() + self.rng.below(PAGE_SIZE - TEXT_MAX);
                    len = self.rng.below(TEXT_MAX + 1);
                }
                if len <= CONSOLE_WRITE_MAX && self.in_ram(gpa, len) {
                    // The host would print it: only `.`s from the text page.
                    gpa = self.text() + gpa % (PAGE_SIZE - TEXT_MAX);
                    len %= TEXT_MAX + 1;
                    self.refresh_text();
                }
                [gpa, len, r_junk, 0]
            }
            // Only codes the host must refuse.
            Call::Exit => [
                self.rng.next() | self.rng.high_bit(),
                r_junk,
                self.rng.next(),
                0,
            ],
            Call::IdleYield => {
                let deadline = match self.rng.below(5) {
                    0 => 0,
                    1 => 1,
                    2 => self
                        .clock
                        .saturating_sub(self.rng.next() >> self.rng.below(64)),
                    3 => self.clock,
                    _ => self.clock + self.rng.below(1_000_000),
                };
                [deadline, r_junk, 0, 0]
            }
            Call::ZeroHints => self.plan_zero(),
            Call::MmuUpdate => self.plan_mmu_update(),
            Call::MmuPin => {
                let op = match self.rng.below(10) {
                    0..=4 => PIN_L4,
                    5..=8 => UNPIN,
                    _ => self.rng.count(4),
                };
                let frame = match self.rng.below(8) {
                    0..=3 => self.arena[self.rng.below(ARENA_FRAMES as u64) as usize],
                    4 => pool_frame_gpa(self.rng.below(PT_POOL_BOOT_FRAMES) as usize),
                    5 => pool_frame_gpa(self.rng.below(POOL_FRAMES as u64) as usize),
                    _ => self.addr(),
                };
                [op, frame, r_junk, 0]
            }
            // A call of a later ABI version (`Call` is non-exhaustive): none exists in v1.7.
            _ => [0; 4],
        }
    }

    /// Rewrites the text page's first `PAGE_SIZE` bytes with `.` (a release may have zeroed it).
    fn refresh_text(&self) {
        for off in (0..PAGE_SIZE).step_by(8) {
            // SAFETY: the text page of the scratch region, free RAM this workload owns,
            // identity-mapped and writable.
            unsafe {
                self.scratch_ptr(self.text() + off)
                    .write_volatile(u64::from_le_bytes([b'.'; 8]))
            };
        }
    }

    fn plan_zero(&mut self) -> [u64; 4] {
        match self.rng.below(10) {
            0..=2 => {
                // QUERY: the host writes `count.div_ceil(8)` bytes at `bitmap`.
                let mut bitmap = if self.rng.one_in(2) {
                    self.bitmap() + self.rng.below(PAGE_SIZE)
                } else {
                    self.addr()
                };
                let first = match self.rng.below(4) {
                    0 => self.rng.next(),
                    1 => self.mem_size / PAGE_SIZE - self.rng.below(64),
                    _ => self.rng.below(self.mem_size / PAGE_SIZE),
                };
                let count = self.rng.count(QUERY_MAX_FRAMES);
                let bytes = count.div_ceil(8);
                let inside_bitmap_page = bitmap >= self.bitmap()
                    && bitmap
                        .checked_add(bytes)
                        .is_some_and(|end| end <= self.bitmap() + PAGE_SIZE);
                if count <= QUERY_MAX_FRAMES && self.in_ram(bitmap, bytes) && !inside_bitmap_page {
                    bitmap = self.bitmap() + self.rng.below(PAGE_SIZE - bytes + 1);
                }
                [QUERY, bitmap, first, count]
            }
            3..=5 => {
                // RELEASE.
                let count = self.rng.count(RELEASE_MAX_RANGES);
                let mut list = if self.rng.one_in(4) {
                    self.addr()
                } else {
                    self.list() + self.rng.below(64) * 16
                };
                let written = if list >= self.list() && list < self.list() + 64 * 16 {
                    let first = (list - self.list()) / 16;
                    let n = count.min(RELEASE_MAX_RANGES);
                    for i in 0..n {
                        let (mut start, mut len) = if self.rng.one_in(16) {
                            // Overlapping the list itself: DENIED.
                            (list & !(PAGE_SIZE - 1), PAGE_SIZE)
                        } else {
                            self.range()
                        };
                        let owned = start >= self.owned_start
                            && start
                                .checked_add(len)
                                .is_some_and(|end| end <= self.owned_end);
                        if !owned && !self.release_refused(start, len) {
                            (start, len) = (self.data(), PAGE_SIZE);
                        }
                        self.put(first + i, start, len);
                    }
                    true
                } else {
                    false
                };
                if !written
                    && count <= RELEASE_MAX_RANGES
                    && self.in_ram(list, count * 16)
                    && !self.readable_source(list, count * 16)
                {
                    list = self.data();
                }
                [RELEASE, list, count, r_or_zero(&mut self.rng)]
            }
            6..=8 => {
                let (gpa, len) = self.range();
                [PREPARE, gpa, len, r_or_zero(&mut self.rng)]
            }
            _ => [
                self.rng.count(4) + 3,
                self.addr(),
                self.rng.next(),
                self.rng.next(),
            ],
        }
    }

    fn plan_mmu_update(&mut self) -> [u64; 4] {
        let count = match self.rng.below(8) {
            0..=4 => self.rng.below(5),
            _ => self.rng.count(MMU_UPDATE_MAX),
        };
        let flags = match self.rng.below(8) {
            0..=3 => 0,
            4..=6 => UPDATE_DEFER_SYNC,
            _ => self.rng.next() | 2,
        };
        let mut batch = if self.rng.one_in(5) {
            self.addr()
        } else {
            self.list() + self.rng.below(4) * 16
        };
        let written = if batch >= self.list() && batch < self.list() + 4 * 16 {
            let first = (batch - self.list()) / 16;
            for i in 0..count.min(MMU_UPDATE_MAX - first) {
                let (pte, value) = (self.pte_gpa(), self.pte_value());
                self.put(first + i, pte, value);
            }
            count <= MMU_UPDATE_MAX - first
        } else {
            false
        };
        if !written
            && count <= MMU_UPDATE_MAX
            && self.in_ram(batch, count * 16)
            && !self.readable_source(batch, count * 16)
        {
            // Entries read from memory the fuzzer does not control could name a boot table:
            // read zeros from the data part instead (every entry: BAD_ADDRESS).
            batch = self.data();
        }
        [batch, count, flags, self.rng.next()]
    }

    /// Generates, issues and checks call `i`.
    fn one(&mut self, i: u64) {
        let nr = self.call_number();
        let class = Call::from_raw(nr);
        // An undefined number gets the safe arguments of the call its low bits name, so a host
        // that truncated the number would still make a harmless call (and fail the check).
        let alias = Call::from_raw(nr & 0xffff_ffff)
            .or(Call::from_raw(nr & 0xffff))
            .or(Call::from_raw(nr & 0xff));
        let args = match class.or(alias) {
            Some(call) => self.plan(call),
            None => [
                self.rng.next(),
                self.rng.next(),
                self.rng.next(),
                self.rng.next(),
            ],
        };
        let planned = Planned { nr, args };
        // SAFETY: `run` checked for a pvkit host (a `Pvkit` token exists), and this runs at
        // CPL 3 under the full I/O bitmap of `init_cpu` (or CPL 0), so the `out` reaches the
        // host's hypercall handler. The only call that makes the host write guest memory is
        // `zero_hints` QUERY; `plan_zero` passes it a bitmap inside the scratch region's bitmap
        // page (free RAM this workload owns exclusively, no Rust reference to it exists) or one
        // the host must refuse without writing (count too large, range not inside RAM). Pool
        // frames and RAM the host may zero (`mmu_update`/`mmu_pin` releases of the workload's
        // own tables, `zero_hints` RELEASE of its own free region) hold no Rust object; the
        // module docs explain why no accepted call touches the kernel's page tables or image.
        let ret = unsafe { raw_hypercall(nr, args) };
        self.check(i, class, planned, ret);
        if class == Some(Call::ClockNs) && ret.status == 0 {
            self.clock = ret.value;
        }
    }

    /// Checks the answer and counts it; panics on an undocumented one.
    fn check(&mut self, i: u64, class: Option<Call>, p: Planned, ret: Return) {
        let status = ret.status;
        let allowed: &[Error] = match class {
            None => &[Error::UnknownCall],
            Some(call) if call_feature(call).is_some_and(|bit| self.features & bit == 0) => {
                &[Error::NotImplemented]
            }
            Some(Call::Null | Call::Features | Call::ClockNs | Call::IdleYield) => &[],
            Some(Call::ConsoleWrite) => &[Error::TooLarge, Error::BadAddress],
            Some(Call::Exit) => &[Error::InvalidArgument],
            Some(Call::ZeroHints)
                if (p.args[0] == PREPARE && self.features & features::ZERO_PREPARE == 0)
                    || (p.args[0] == FREE_LIST && self.features & features::FREE_REPORT == 0) =>
            {
                &[
                    Error::InvalidArgument,
                    Error::BadAddress,
                    Error::TooLarge,
                    Error::Denied,
                    Error::NotImplemented,
                ]
            }
            Some(Call::ZeroHints) => &[
                Error::InvalidArgument,
                Error::BadAddress,
                Error::TooLarge,
                Error::Denied,
            ],
            Some(Call::MmuUpdate) => &[
                Error::InvalidArgument,
                Error::TooLarge,
                Error::BadAddress,
                Error::TypeConflict,
                Error::Denied,
            ],
            Some(Call::MmuPin) => &[
                Error::InvalidArgument,
                Error::BadAddress,
                Error::TypeConflict,
                Error::Denied,
                // More than PIN_MAX pins of one root (ABI §9).
                Error::TooLarge,
            ],
            // A call of a later ABI version: none exists in v1.7.
            Some(_) => &[],
        };
        let ok_allowed = match class {
            None | Some(Call::Exit) => false,
            Some(call) => call_feature(call).is_none_or(|bit| self.features & bit != 0),
        };
        let documented = match Error::from_status(status) {
            Ok(()) => ok_allowed,
            Err(Some(e)) => allowed.contains(&e),
            Err(None) => false,
        };
        if !documented {
            fail(i, p, ret, "a status this call does not document");
        }
        if status != 0 {
            let max_value = if class == Some(Call::MmuUpdate) {
                p.args[1]
            } else {
                0
            };
            if ret.value > max_value {
                fail(i, p, ret, "an error with a non-zero value");
            }
        } else if let Some(call) = class {
            let good = match call {
                Call::Null => ret.value == p.args[0],
                Call::Features => ret.value == self.features,
                Call::ConsoleWrite => ret.value == p.args[1],
                Call::ClockNs => ret.value >= self.clock,
                Call::IdleYield => (1..=3).contains(&(ret.value & 0xff)),
                Call::MmuUpdate => ret.value == p.args[1],
                Call::MmuPin => ret.value == 0,
                Call::ZeroHints => match p.args[0] {
                    QUERY => ret.value <= p.args[3],
                    PREPARE => ret.value == 0 || ret.value == p.args[2],
                    FREE_LIST => ret.value == 0,
                    _ => true,
                },
                _ => false,
            };
            if !good {
                fail(i, p, ret, "a success with a value this call cannot return");
            }
        }
        let class = class.map_or(UNDEFINED, |c| {
            ALL_CALLS.iter().position(|&x| x == c).unwrap_or(UNDEFINED)
        });
        self.counts[class][status as usize] += 1;
    }
}

/// 0 or a random value (for an argument register the call does not read).
fn r_or_zero(rng: &mut Rng) -> u64 {
    if rng.one_in(2) { 0 } else { rng.next() }
}

/// Panics with the call, its registers and the host's answer.
fn fail(i: u64, p: Planned, ret: Return, what: &str) -> ! {
    panic!(
        "fuzz: call {i}: nr={:#x} ({}) args=[{:#x}, {:#x}, {:#x}, {:#x}]: the host answered \
         status {} value {:#x}, {what}",
        p.nr,
        CallName(p.nr),
        p.args[0],
        p.args[1],
        p.args[2],
        p.args[3],
        ret.status,
        ret.value
    )
}

/// Displays a call number's name, or `undefined`.
struct CallName(u64);

impl fmt::Display for CallName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(Call::from_raw(self.0).map_or("undefined", |c| c.name()))
    }
}
