//! `blk` (arguments `pattern`, `size_kib`, `depth`, `mib`, `wait`, `ack`): virtio-blk
//! throughput through `guest_pv::virtio` and the `virtio-drivers` block driver, on the disk the
//! host attaches with `host-vmm run --disk PATH` (the first virtio-mmio window of device ID 2
//! in the boot memory map).
//!
//! - `pattern` (text, default `seq-read`):
//!   - `seq-read`: read `mib` MiB from sector 0 in requests of `size_kib` KiB;
//!   - `seq-write`: write `mib` MiB from sector 0, byte `k` of the transfer =
//!     `(k * 131 + 7) mod 251`; after the end marker one FLUSH;
//!   - `rand-read`: `mib · 256` reads of 4 KiB at 4 KiB-aligned offsets within the first `mib`
//!     MiB: request `i` reads page `x_i mod (mib · 256)`, where `x_0` =
//!     `0x9E3779B97F4A7C15` and `x_{i+1}` = xorshift64(`x_i`) (`x ^= x << 13; x ^= x >> 7;
//!     x ^= x << 17`), the step taken before each request (so request 0 uses `x_1`);
//!   - `write-ro-probe`: one write of `size_kib` KiB at sector 0 (the `seq-write` bytes), for
//!     a read-only disk: prints `status=ioerr` and exits 0 if the device refused it with an I/O
//!     error, else the status it got (`ok`, `unsupp`, …) and exit code 1.
//! - `size_kib` (default 128, 4..=1024): bytes per request (the last one of a transfer may be
//!   shorter). `rand-read` always uses 4 KiB (another explicit value is an argument error).
//! - `depth` (default 1, 1..=5): requests in flight (`read_blocks_nb` / `write_blocks_nb` with
//!   tokens; `virtio-drivers`' block queue has 16 descriptors and a request takes 3).
//! - `mib` (default 16): MiB per pass; must fit the disk and, as the transfer buffer, free RAM.
//! - `wait` (text: `poll`, `pv`, `adaptive` or `irq`; default `adaptive` in PV mode, `irq` in
//!   trapped mode; `pv` or `adaptive` in trapped mode is an argument error): how completions
//!   are waited for (`guest_pv::virtio::WaitPolicy`): spin on the used ring, `idle_yield`
//!   until the device's event, poll for an adaptive window then `idle_yield` (the window's
//!   maximum is the wake-up cost measured at CPL 3 before the begin marker: the median of 9
//!   parks, `guest_pv::idle::PvIdle::measure_wake_cost`), or `sti; hlt` until the event vector
//!   (at CPL 3 a kernel-service round trip).
//! - `ack` (text: `end` or `wake`, default `end`): acknowledge InterruptStatus once after the
//!   transfer (if an event was consumed), or after every wake-up, as an interrupt handler does
//!   (two MMIO exits each).
//!
//! Every request has its own part of one buffer in free RAM (request `i` at offset
//! `i · size`; for `rand-read` `i · 4096`), touched (or, for writes, filled) before the begin
//! marker, so the timed section is the I/O loop alone: submit until `depth` requests are in
//! flight, wait for a completion, take every completed one (checking its status: any error
//! panics), until all are done, then the deferred acknowledgement. The device is set up
//! before the begin marker, the checksum computed after the end marker. Everything from the
//! device setup on runs at CPL 3 (`at_cpl3`): the driver and the checksum run natively there,
//! and the device window is mapped user-accessible, so register accesses work the same (each
//! one an exit, as at CPL 0).
//!
//! Checksum: FNV-1a over the bytes read, in request order (`seq-read`: the first `mib` MiB of
//! the disk; `rand-read`: the pages in request order), or over the bytes written (`seq-write`,
//! `write-ro-probe`). `ops` = requests. Extra result fields: `request_bytes`, `queue_depth`,
//! `pattern` (text), `bytes`, `requests`, `wait` (text), `ack` (text), `parks` (`idle_yield`
//! calls or `hlt`s), `events` (events consumed or event interrupts taken), `acks`
//! (InterruptStatus acknowledgements), `polled` (waits an adaptive poll ended), `wake_cost_ns`
//! and `poll_window_ns` (the measured wake-up cost and the window at the end; 0 unless
//! `wait=adaptive`); `write-ro-probe` adds `readonly` (1 if the device offers
//! `VIRTIO_BLK_F_RO`) and `status`.
//!
//! Errors: no block device (exit 2: `error: workload 'blk': no virtio block device (run with
//! --disk PATH)`), bad or inconsistent arguments, `mib` larger than the disk or than free RAM
//! (exit 2); `wait=pv` or `wait=adaptive` on a host without what they need (exit 2); a device
//! that cannot be set up, a failed request or a stalled wait (panic, exit 101).

use core::fmt::{self, Write};

use crate::args::Args;
use guest_pv::Fnv1a;
use guest_pv::idle::PvIdle;
use guest_pv::tsc::Tsc;
use guest_pv::virtio::virtio_drivers::device::blk::{BlkReq, BlkResp, RespStatus, SECTOR_SIZE};
use guest_pv::virtio::{
    self, Ack, Adaptive, BLK_MAX_IN_FLIGHT, Blk, DeviceInfo, WaitPolicy, WaitStats, Waiter,
};
use hypercall_abi::features;
use hypercall_abi::layout::PAGE_SIZE;
use hypercall_abi::virtio::DEVICE_ID_BLOCK;

use super::{Env, Outcome, Workload, free_ram_start};
use crate::exit_code;
use crate::platform::{Platform, at_cpl3, marker_begin, marker_end};

pub const WORKLOAD: Workload = Workload {
    name: "blk",
    keys: &["size_kib", "depth", "mib"],
    text_keys: &["pattern", "wait", "ack"],
    run,
};

const DEFAULT_SIZE_KIB: u64 = 128;
/// What `wait=adaptive` needs of the host.
const ADAPTIVE: u64 = features::IDLE_YIELD | features::CLOCK;
/// Parks `wait=adaptive` times to measure the wake-up cost (the median is taken).
const WAKE_PROBES: usize = 9;
const MIN_SIZE_KIB: u64 = 4;
const MAX_SIZE_KIB: u64 = 1024;
const DEFAULT_MIB: u64 = 16;
/// The largest `mib` considered (far beyond any guest RAM; keeps the arithmetic in range).
const MAX_MIB: u64 = 1 << 20;
/// `rand-read`'s request size.
const RAND_REQUEST: u64 = 4096;
/// The first state of `rand-read`'s xorshift64.
const RAND_SEED: u64 = 0x9E37_79B9_7F4A_7C15;
/// Pages of DMA memory for the driver (its queue takes two).
const DMA_PAGES: u64 = 16;
const SECTOR: u64 = SECTOR_SIZE as u64;

/// What is transferred.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pattern {
    SeqRead,
    SeqWrite,
    RandRead,
    WriteRoProbe,
}

impl Pattern {
    const ALL: [Pattern; 4] = [
        Pattern::SeqRead,
        Pattern::SeqWrite,
        Pattern::RandRead,
        Pattern::WriteRoProbe,
    ];

    const fn name(self) -> &'static str {
        match self {
            Pattern::SeqRead => "seq-read",
            Pattern::SeqWrite => "seq-write",
            Pattern::RandRead => "rand-read",
            Pattern::WriteRoProbe => "write-ro-probe",
        }
    }

    fn from_name(name: &str) -> Option<Pattern> {
        Pattern::ALL.into_iter().find(|p| p.name() == name)
    }

    const fn writes(self) -> bool {
        matches!(self, Pattern::SeqWrite | Pattern::WriteRoProbe)
    }
}

/// How completions are waited for, before the host token is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WaitKind {
    Poll,
    Pv,
    Adaptive,
    Irq,
}

impl WaitKind {
    fn from_name(name: &str) -> Option<WaitKind> {
        match name {
            "poll" => Some(WaitKind::Poll),
            "pv" => Some(WaitKind::Pv),
            "adaptive" => Some(WaitKind::Adaptive),
            "irq" => Some(WaitKind::Irq),
            _ => None,
        }
    }
}

/// The checked arguments.
#[derive(Debug, Clone, Copy)]
struct Config {
    pattern: Pattern,
    /// Bytes per request.
    request: u64,
    depth: usize,
    /// Bytes of the transfer (one request for the probe).
    bytes: u64,
    /// `mib` as given (for messages).
    mib: u64,
    wait: WaitKind,
    ack: Ack,
}

impl Config {
    /// Requests in the transfer.
    const fn requests(&self) -> u64 {
        self.bytes.div_ceil(self.request)
    }
}

/// Why the arguments were refused.
#[derive(Debug, Clone, Copy)]
enum ArgError<'a> {
    Pattern(&'a str),
    Wait(&'a str),
    PvInTrapped,
    Ack(&'a str),
    SizeKib(u64),
    RandSize(u64),
    Depth(u64),
    Mib(u64),
}

impl fmt::Display for ArgError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArgError::Pattern(p) => write!(
                f,
                "unknown pattern '{p}' (known: seq-read, seq-write, rand-read, write-ro-probe)"
            ),
            ArgError::Wait(w) => {
                write!(f, "unknown wait '{w}' (known: poll, pv, adaptive, irq)")
            }
            ArgError::PvInTrapped => f.write_str(
                "wait=pv and wait=adaptive need a pvkit host offering idle_yield, clock_ns and \
                 the TSC frequency (use poll or irq)",
            ),
            ArgError::Ack(a) => write!(f, "unknown ack '{a}' (known: end, wake)"),
            ArgError::SizeKib(n) => {
                write!(f, "size_kib={n} (want {MIN_SIZE_KIB}..={MAX_SIZE_KIB})")
            }
            ArgError::RandSize(n) => write!(
                f,
                "pattern=rand-read reads 4 KiB per request (size_kib={n} given; omit it or use 4)"
            ),
            ArgError::Depth(n) => write!(
                f,
                "depth={n} (want 1..={BLK_MAX_IN_FLIGHT}: the driver's queue has {} \
                 descriptors, 3 per request)",
                virtio::BLK_QUEUE_SIZE
            ),
            ArgError::Mib(n) => write!(f, "mib={n} (want 1..={MAX_MIB})"),
        }
    }
}

/// Checks the arguments against each other and the host's features.
fn config<'a>(platform: Platform, args: &Args<'a>) -> Result<Config, ArgError<'a>> {
    let pattern = match args.get_str("pattern") {
        None => Pattern::SeqRead,
        Some(name) => Pattern::from_name(name).ok_or(ArgError::Pattern(name))?,
    };
    let adaptive_ok = platform.feature(ADAPTIVE).is_some() && Tsc::from_cpuid().is_some();
    let wait = match args.get_str("wait") {
        None if adaptive_ok => WaitKind::Adaptive,
        None => WaitKind::Irq,
        Some(name) => WaitKind::from_name(name).ok_or(ArgError::Wait(name))?,
    };
    let refused = match wait {
        WaitKind::Pv => platform.feature(features::IDLE_YIELD).is_none(),
        WaitKind::Adaptive => !adaptive_ok,
        WaitKind::Poll | WaitKind::Irq => false,
    };
    if refused {
        return Err(ArgError::PvInTrapped);
    }
    let ack = match args.get_str("ack") {
        None | Some("end") => Ack::Deferred,
        Some("wake") => Ack::EachWake,
        Some(other) => return Err(ArgError::Ack(other)),
    };
    let size_kib = args.get_or("size_kib", DEFAULT_SIZE_KIB);
    if !(MIN_SIZE_KIB..=MAX_SIZE_KIB).contains(&size_kib) {
        return Err(ArgError::SizeKib(size_kib));
    }
    let request = match (pattern, args.get("size_kib")) {
        (Pattern::RandRead, Some(n)) if n * 1024 != RAND_REQUEST => {
            return Err(ArgError::RandSize(n));
        }
        (Pattern::RandRead, _) => RAND_REQUEST,
        _ => size_kib * 1024,
    };
    let depth = args.get_or("depth", 1);
    if depth == 0 || depth > BLK_MAX_IN_FLIGHT as u64 {
        return Err(ArgError::Depth(depth));
    }
    let mib = args.get_or("mib", DEFAULT_MIB);
    if mib == 0 || mib > MAX_MIB {
        return Err(ArgError::Mib(mib));
    }
    let bytes = match pattern {
        Pattern::WriteRoProbe => request,
        _ => mib << 20,
    };
    Ok(Config {
        pattern,
        request,
        depth: depth as usize,
        bytes,
        mib,
        wait,
        ack,
    })
}

/// What the CPL 3 part reports back.
#[derive(Debug, Default)]
struct Report {
    checksum: u64,
    requests: u64,
    waits: WaitStats,
    readonly: bool,
    /// `write-ro-probe`: the status of the write.
    probe: Option<RespStatus>,
    /// `wait=adaptive`: the measured cost of a park (the poll window's maximum), and the
    /// window at the end.
    wake_cost_ns: u64,
    poll_window_ns: u64,
}

fn run(env: &mut Env, args: &Args<'_>) -> Outcome {
    let cfg = match config(env.platform, args) {
        Ok(cfg) => cfg,
        Err(why) => WORKLOAD.usage(env, format_args!("{why}")),
    };
    let Some(dev) = virtio::find(env.boot_info, DEVICE_ID_BLOCK) else {
        WORKLOAD.usage(
            env,
            format_args!("no virtio block device (run with --disk PATH)"),
        );
    };
    let policy = match (cfg.wait, env.platform.feature(features::IDLE_YIELD)) {
        (WaitKind::Poll, _) => WaitPolicy::Poll,
        (WaitKind::Irq, _) => WaitPolicy::Interrupt,
        (WaitKind::Pv, Some(pv)) => WaitPolicy::PvWait(pv),
        // The window's maximum is measured at CPL 3, where the waits run (`Job::run`).
        (WaitKind::Adaptive, Some(pv)) => WaitPolicy::Adaptive(Adaptive {
            pv,
            tsc: Tsc::from_cpuid().expect("checked by config"),
            wake_cost_ns: 0,
        }),
        // `config` refused it.
        (WaitKind::Pv | WaitKind::Adaptive, None) => unreachable!("wait=pv without idle_yield"),
    };

    // DMA pages for the rings, then the transfer buffer, in free RAM above the kernel.
    let dma_len = DMA_PAGES * PAGE_SIZE;
    let buf_len = match cfg.pattern {
        Pattern::RandRead => cfg.requests() * RAND_REQUEST,
        _ => cfg.bytes,
    }
    .next_multiple_of(PAGE_SIZE);
    let base = match free_ram_start(env.boot_info, dma_len + buf_len) {
        Ok(base) => base,
        Err(max) => WORKLOAD.usage(
            env,
            format_args!(
                "mib={} does not fit in free RAM: the buffer and DMA pages need {} bytes, the \
                 largest free region above the kernel has {max}",
                cfg.mib,
                dma_len + buf_len
            ),
        ),
    };
    // SAFETY: free RAM above the kernel (`free_ram_start`), identity-mapped and user-accessible
    // (pvkit's boot tables), used by nothing else: one workload runs per boot, and the buffer
    // after it is a separate range.
    if let Err(e) = unsafe { virtio::set_dma_region(base, dma_len) } {
        panic!("blk: {e}");
    }
    let job = Job {
        cfg,
        dev,
        policy,
        buf: Buffer {
            addr: base + dma_len,
            len: buf_len,
        },
    };
    let mut report = Report::default();
    at_cpl3(|| {
        job.run(env, &mut report);
        0
    });

    let mut outcome = Outcome::new(report.requests, report.checksum);
    let w = report.waits;
    let _ = write!(
        outcome.fields,
        " request_bytes={} queue_depth={} pattern={} bytes={} requests={} wait={} ack={} \
         parks={} events={} acks={} polled={} wake_cost_ns={} poll_window_ns={}",
        cfg.request,
        cfg.depth,
        cfg.pattern.name(),
        cfg.bytes,
        report.requests,
        policy.name(),
        cfg.ack.name(),
        w.parks,
        w.events,
        w.acks,
        w.polled,
        report.wake_cost_ns,
        report.poll_window_ns
    );
    if let Some(status) = report.probe {
        let _ = write!(
            outcome.fields,
            " readonly={} status={}",
            u8::from(report.readonly),
            status_name(status)
        );
        if status != RespStatus::IO_ERR {
            outcome.exit_code = exit_code::CHECK_FAILED;
        }
    }
    outcome
}

/// The lowercase name of a request status (`ok`, `ioerr`, `unsupp`, `notready`, `other`).
fn status_name(status: RespStatus) -> &'static str {
    match status {
        RespStatus::OK => "ok",
        RespStatus::IO_ERR => "ioerr",
        RespStatus::UNSUPPORTED => "unsupp",
        RespStatus::NOT_READY => "notready",
        _ => "other",
    }
}

/// The transfer buffer: free RAM the workload owns.
#[derive(Debug, Clone, Copy)]
struct Buffer {
    addr: u64,
    len: u64,
}

impl Buffer {
    fn ptr(&self, offset: u64) -> *mut u8 {
        core::ptr::with_exposed_provenance_mut::<u8>((self.addr + offset) as usize)
    }

    /// The whole buffer.
    fn bytes(&self) -> &[u8] {
        // SAFETY: free RAM this workload owns (see `run`), identity-mapped and user-accessible;
        // called only when no request is in flight, so nothing writes it meanwhile.
        unsafe { core::slice::from_raw_parts(self.ptr(0), self.len as usize) }
    }

    /// The whole buffer, writable.
    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`; `&mut self` keeps this the only slice made here.
        unsafe { core::slice::from_raw_parts_mut(self.ptr(0), self.len as usize) }
    }

    /// `len` bytes at `offset` (inside the buffer), for one request.
    ///
    /// # Safety
    /// No other slice of these bytes may be in use while this one is, and the device must not
    /// be using them outside the request they are handed to.
    unsafe fn part(self, offset: u64, len: u64) -> &'static mut [u8] {
        assert!(offset + len <= self.len, "request outside the buffer");
        // SAFETY: inside the buffer (checked), which this workload owns; exclusive use is the
        // caller's contract.
        unsafe { core::slice::from_raw_parts_mut(self.ptr(offset), len as usize) }
    }
}

/// One request of the transfer.
#[derive(Debug, Clone, Copy)]
struct Request {
    /// First sector on the disk.
    sector: u64,
    /// Offset of its data in the buffer.
    offset: u64,
    len: u64,
}

/// The requests of a transfer, in order.
struct Plan {
    cfg: Config,
    next: u64,
    /// `rand-read`'s xorshift64 state.
    x: u64,
}

impl Plan {
    const fn new(cfg: Config) -> Plan {
        Plan {
            cfg,
            next: 0,
            x: RAND_SEED,
        }
    }

    fn next(&mut self) -> Option<Request> {
        let i = self.next;
        if i >= self.cfg.requests() {
            return None;
        }
        self.next += 1;
        let req = match self.cfg.pattern {
            Pattern::RandRead => {
                self.x ^= self.x << 13;
                self.x ^= self.x >> 7;
                self.x ^= self.x << 17;
                let page = self.x % (self.cfg.bytes / RAND_REQUEST);
                Request {
                    sector: page * RAND_REQUEST / SECTOR,
                    offset: i * RAND_REQUEST,
                    len: RAND_REQUEST,
                }
            }
            _ => {
                let offset = i * self.cfg.request;
                Request {
                    sector: offset / SECTOR,
                    offset,
                    len: self.cfg.request.min(self.cfg.bytes - offset),
                }
            }
        };
        Some(req)
    }
}

/// A request slot: its header and status buffers, and the request in it.
struct Slot {
    req: BlkReq,
    resp: BlkResp,
    /// (driver token, request) while in flight.
    busy: Option<(u16, Request)>,
}

/// Everything the CPL 3 part needs, prepared at CPL 0.
struct Job {
    cfg: Config,
    dev: DeviceInfo,
    policy: WaitPolicy,
    buf: Buffer,
}

impl Job {
    /// Everything at CPL 3: device setup, the timed transfer, the checksum.
    fn run(self, env: &mut Env, report: &mut Report) {
        let Job {
            cfg,
            dev,
            policy,
            mut buf,
        } = self;
        // SAFETY: the window is the boot memory map's block device, and this is its only
        // driver (one workload per boot).
        let mut blk = match unsafe { virtio::open_blk(&dev) } {
            Ok(blk) => blk,
            Err(e) => panic!("blk: device at {:#x}: {e}", dev.base),
        };
        let capacity = blk.capacity().saturating_mul(SECTOR);
        if cfg.bytes > capacity {
            let what = match cfg.pattern {
                Pattern::WriteRoProbe => "size_kib",
                _ => "mib",
            };
            WORKLOAD.usage(
                env,
                format_args!(
                    "{what}={} does not fit the disk ({} bytes needed, the disk has {capacity})",
                    if what == "mib" {
                        cfg.mib
                    } else {
                        cfg.request / 1024
                    },
                    cfg.bytes
                ),
            );
        }
        report.readonly = blk.readonly();

        // Prepare (not timed): writes fill the buffer with the pattern; reads touch every
        // page, so no first touch of guest memory (a host page fault) lands in the timed part.
        if cfg.pattern.writes() {
            let mut v = 7u8;
            for b in buf.bytes_mut() {
                *b = v;
                // (k * 131 + 7) mod 251, one k at a time.
                v = ((u16::from(v) + 131) % 251) as u8;
            }
        } else {
            for page in buf.bytes_mut().chunks_mut(PAGE_SIZE as usize) {
                page[0] = 0;
            }
        }
        let policy = match policy {
            WaitPolicy::Adaptive(mut a) => {
                a.wake_cost_ns = match PvIdle::new(a.pv, a.tsc)
                    .and_then(|mut idle| idle.measure_wake_cost(WAKE_PROBES))
                {
                    Ok(ns) => ns,
                    Err(e) => panic!("blk: measuring the wake-up cost: {e}"),
                };
                report.wake_cost_ns = a.wake_cost_ns;
                WaitPolicy::Adaptive(a)
            }
            other => other,
        };
        let mut waiter = Waiter::new(policy).with_ack(cfg.ack);
        let mut slots: [Slot; BLK_MAX_IN_FLIGHT] = core::array::from_fn(|_| Slot {
            req: BlkReq::default(),
            resp: BlkResp::default(),
            busy: None,
        });
        let slots = &mut slots[..cfg.depth];

        marker_begin();
        let (requests, probe) = transfer(&mut blk, &mut waiter, buf, cfg, slots);
        waiter.ack(&mut blk);
        marker_end();

        if cfg.pattern == Pattern::SeqWrite
            && let Err(e) = blk.flush()
        {
            panic!("blk: flush: {e}");
        }
        report.checksum = Fnv1a::hash(&buf.bytes()[..cfg.bytes as usize]);
        report.requests = requests;
        report.waits = waiter.stats();
        report.poll_window_ns = waiter.poll_window().ns();
        report.probe = probe;
        // Dropping `blk` resets the device (`virtio::Mmio`) and frees its DMA pages.
    }
}

/// The I/O loop: keeps up to `slots.len()` requests in flight until the plan is done. Returns
/// the requests made and, for `write-ro-probe`, the status of its write (any failure of the
/// other patterns panics).
fn transfer(
    blk: &mut Blk,
    waiter: &mut Waiter,
    buf: Buffer,
    cfg: Config,
    slots: &mut [Slot],
) -> (u64, Option<RespStatus>) {
    let mut plan = Plan::new(cfg);
    let (mut done, total) = (0, cfg.requests());
    let mut probe = None;
    while done < total {
        for slot in slots.iter_mut().filter(|s| s.busy.is_none()) {
            let Some(r) = plan.next() else { break };
            let token = submit(blk, buf, cfg.pattern, slot, r);
            slot.busy = Some((token, r));
        }
        if let Err(e) = waiter.wait(blk) {
            panic!(
                "blk: waiting for request {done} ({}): {e}",
                waiter.policy().name()
            );
        }
        while let Some(token) = blk.peek_used() {
            let Some(slot) = slots
                .iter_mut()
                .find(|s| s.busy.is_some_and(|(t, _)| t == token))
            else {
                panic!("blk: the device completed unknown token {token}");
            };
            let (status, r) = complete(blk, buf, cfg.pattern, slot, token);
            if cfg.pattern == Pattern::WriteRoProbe {
                probe = Some(status);
            } else if status != RespStatus::OK {
                panic!(
                    "blk: request {done} (sector {}, {} bytes) failed with status {}",
                    r.sector,
                    r.len,
                    status_name(status)
                );
            }
            slot.busy = None;
            done += 1;
        }
    }
    (total, probe)
}

/// Hands request `r` to the device in `slot`; returns its token.
fn submit(blk: &mut Blk, buf: Buffer, pattern: Pattern, slot: &mut Slot, r: Request) -> u16 {
    // SAFETY: request parts are disjoint (each request has its own offset) and only this
    // request uses this one until `complete`.
    let data = unsafe { buf.part(r.offset, r.len) };
    let sector = r.sector as usize;
    // SAFETY: `slot.req`, `slot.resp` and `data` stay untouched until `complete` takes the
    // request back (the slot is busy until then, and the buffer part is this request's).
    let token = unsafe {
        if pattern.writes() {
            blk.write_blocks_nb(sector, &mut slot.req, data, &mut slot.resp)
        } else {
            blk.read_blocks_nb(sector, &mut slot.req, data, &mut slot.resp)
        }
    };
    match token {
        Ok(token) => token,
        Err(e) => panic!("blk: submitting sector {}: {e}", r.sector),
    }
}

/// Takes back the completed request `token` in `slot` (the next in the used ring); returns its
/// status and the request.
fn complete(
    blk: &mut Blk,
    buf: Buffer,
    pattern: Pattern,
    slot: &mut Slot,
    token: u16,
) -> (RespStatus, Request) {
    let Some((_, r)) = slot.busy else {
        panic!("blk: completing an idle slot");
    };
    // SAFETY: the same part `submit` handed over; the device is done with it (it is in the used
    // ring) and nothing else uses it.
    let data = unsafe { buf.part(r.offset, r.len) };
    // SAFETY: `token` came with exactly these `req`, `data` and `resp` from `submit`.
    let taken = unsafe {
        if pattern.writes() {
            blk.complete_write_blocks(token, &slot.req, data, &mut slot.resp)
        } else {
            blk.complete_read_blocks(token, &slot.req, data, &mut slot.resp)
        }
    };
    match taken {
        // The status is in `resp` either way; only a ring error is fatal here.
        Ok(())
        | Err(virtio::virtio_drivers::Error::IoError)
        | Err(virtio::virtio_drivers::Error::Unsupported)
        | Err(virtio::virtio_drivers::Error::NotReady) => (slot.resp.status(), r),
        Err(e) => panic!("blk: taking back sector {}: {e}", r.sector),
    }
}
