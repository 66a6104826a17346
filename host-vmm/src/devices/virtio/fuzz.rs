//! Property-based fuzzing (proptest, stable Rust) of what a guest controls in virtio: the split
//! rings and requests the block and console engines follow, and the virtio-mmio register
//! machine.
//!
//! Every property uses proptest's default configuration, so the number of cases is 256 unless
//! the `PROPTEST_CASES` environment variable says otherwise. CI runs the default; the long run
//! (≥ 10⁶ cases per property) is
//!
//! ```text
//! PROPTEST_CASES=1000000 cargo test --release -p host-vmm --lib virtio::fuzz
//! ```
//!
//! * [`ring_scenario`] builds a queue over real guest memory (two RAM regions with a hole
//!   between them) from random parts: queue size, ring addresses that may overlap each other
//!   (the engine must cope even where the transport would have refused the layout), wrapped
//!   ring positions, an available index anywhere, descriptor tables with loops, bad `next`
//!   indices, indirect tables, huge lengths and addresses outside RAM, request headers of
//!   every type and sector, and random bytes poked over the rings.
//! * The block engine ([`super::block::Disk::process_queue`]) runs several passes of such a
//!   queue against a temporary image: every pass returns, takes at most the budget
//!   ([`super::pass_budget`]) of chains and puts each one it takes in the used ring (or the
//!   ring is declared broken), each chain is counted once, and the image keeps its length, its
//!   bytes past the last whole sector (never exposed to the guest) and, when read-only, all
//!   its bytes.
//! * The console engine ([`super::console::Transmitter::process_queue`]) runs the same
//!   scenarios: the same budget and accounting, at most 64 KiB reach the sink per chain, and
//!   the sink never holds more than was sent.
//! * The register machine ([`super::mmio::MmioTransport`]) takes random accesses biased towards
//!   real registers and handshake values: it never panics, the identity registers never change,
//!   `DRIVER_OK` only sticks after `FEATURES_OK`, an active device only ever got in-RAM,
//!   non-overlapping rings, and whatever state it reaches saves and restores into a fresh
//!   window unchanged.
//!
//! Each case runs on its own thread with a 10 s limit ([`within`]), so a hang fails the run
//! instead of stalling it.

use crate::memory::GuestMem;
use proptest::prelude::*;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::block::tests::{TempImage, pattern, within};
use super::block::{BlockStats, Disk, SECTOR_SIZE};
use super::console::{ConsoleStats, MAX_CHAIN_BYTES, Transmitter};
use super::mmio::tests::{MEM_SIZE as FAKE_MEM, r32, transport};
use super::mmio::{MAGIC, MmioTransport, VERSION};
use super::pass_budget;
use crate::console::ConsoleSink;
use crate::state::Persist;

/// First RAM region: `[0, LOW_END)`.
const LOW_END: u64 = 0x4_0000;
/// Second RAM region: `[HIGH, HIGH_END)`; the hole between them is not RAM.
const HIGH: u64 = 0x5_0000;
const HIGH_END: u64 = 0x5_4000;
/// Where rings are placed (they may spill out of it for large queues).
const RING_AREA: u64 = 0x1000;
const RING_AREA_LEN: u64 = 0x8000;
/// Indirect descriptor tables.
const INDIRECT: u64 = 0x9000;
/// Request headers: eight 16-byte slots, 0x100 apart.
const HEADERS: u64 = 0xa000;
/// Status bytes.
const STATUS: u64 = 0xb000;
/// Data buffers.
const DATA: u64 = 0x1_0000;

/// Image size: whole sectors plus a tail that is never exposed.
const SECTORS: u64 = 8;
const TAIL: u64 = 100;

fn guest_memory() -> GuestMem {
    GuestMem::from_ranges(&[
        (GuestAddress(0), LOW_END as usize),
        (GuestAddress(HIGH), (HIGH_END - HIGH) as usize),
    ])
    .unwrap()
}

/// A descriptor as the driver writes it.
#[derive(Debug, Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// Everything a driver controls about one queue and its requests.
#[derive(Debug, Clone)]
struct Scenario {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    event_idx: bool,
    next_avail: u16,
    next_used: u16,
    /// Added to `next_avail` to give the available index.
    avail_ahead: u16,
    heads: Vec<u16>,
    table: Vec<Desc>,
    indirect: Vec<Desc>,
    headers: Vec<(u32, u64)>,
    /// Random bytes written over the ring area last.
    pokes: Vec<(u16, u8)>,
    readonly: bool,
    write_through: bool,
}

fn addr() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => (0u64..8).prop_map(|i| HEADERS + 0x100 * i),
        3 => (0u64..8).prop_map(|i| STATUS + i),
        4 => (0u64..0x60).prop_map(|i| DATA + 512 * i),
        1 => (0u64..0x100).prop_map(|i| INDIRECT + 16 * i),
        1 => (0u64..RING_AREA_LEN).prop_map(|o| RING_AREA + o),
        1 => (0u64..0x2000).prop_map(|o| LOW_END - o),
        1 => (0u64..0x2000).prop_map(|o| LOW_END + o),
        1 => (0u64..0x2000).prop_map(|o| HIGH_END - o),
        1 => (0u64..0x100).prop_map(|o| u64::MAX - o),
        1 => any::<u64>(),
    ]
}

fn len() -> impl Strategy<Value = u32> {
    prop_oneof![
        2 => Just(0u32),
        2 => Just(1u32),
        3 => Just(16u32),
        4 => Just(512u32),
        2 => Just(4096u32),
        1 => (1u32..64).prop_map(|n| 16 * n),
        1 => 0u32..0x2_0000,
        1 => Just(1u32 << 20),
        1 => any::<u32>(),
    ]
}

fn desc() -> impl Strategy<Value = Desc> {
    // NEXT = 1, WRITE = 2, INDIRECT = 4.
    let flags = prop_oneof![8 => 0u16..8, 1 => any::<u16>()];
    let next = prop_oneof![8 => 0u16..16, 1 => any::<u16>()];
    (addr(), len(), flags, next).prop_map(|(addr, len, flags, next)| Desc {
        addr,
        len,
        flags,
        next,
    })
}

/// A ring address: apart from the others, at a random aligned place in the ring area, or
/// (for avail and used) on top of another ring.
fn ring_addr(apart: u64) -> impl Strategy<Value = u64> {
    prop_oneof![
        12 => Just(apart),
        2 => (0u64..RING_AREA_LEN / 16).prop_map(|k| RING_AREA + 16 * k),
        1 => (0u64..0x1000).prop_map(|k| LOW_END - 16 * k),
        1 => (0u64..0x400).prop_map(|k| HIGH + 16 * k),
    ]
}

/// One request as a well-behaved driver lays it out: a device-readable header, data buffers
/// in one direction, a device-writable status byte. `next` fields are filled in when the
/// requests are laid out in the table.
fn request() -> impl Strategy<Value = Vec<Desc>> {
    let data = proptest::collection::vec(
        (
            0u64..0x60,
            prop_oneof![6 => Just(512u32), 2 => Just(1024u32), 1 => Just(20u32), 1 => len()],
        ),
        0..4,
    );
    (0u64..8, data, any::<bool>(), 0u64..8).prop_map(|(header, data, writable, status)| {
        let mut descs = vec![Desc {
            addr: HEADERS + 0x100 * header,
            len: 16,
            flags: 0,
            next: 0,
        }];
        for (slot, len) in data {
            descs.push(Desc {
                addr: DATA + 512 * slot,
                len,
                flags: if writable { 2 } else { 0 },
                next: 0,
            });
        }
        descs.push(Desc {
            addr: STATUS + status,
            len: 1,
            flags: 2,
            next: 0,
        });
        descs
    })
}

/// Which head an available slot names: the start of a laid-out request (mostly), any index
/// below 16, or anything.
#[derive(Debug, Clone, Copy)]
enum Head {
    Request(usize),
    Index(u16),
}

fn head() -> impl Strategy<Value = Head> {
    prop_oneof![
        12 => (0usize..8).prop_map(Head::Request),
        2 => (0u16..16).prop_map(Head::Index),
        1 => any::<u16>().prop_map(Head::Index),
    ]
}

fn scenario() -> impl Strategy<Value = Scenario> {
    let size = prop_oneof![
        1 => Just(1u16),
        1 => Just(2u16),
        2 => Just(4u16),
        3 => Just(8u16),
        6 => Just(16u16),
        3 => Just(64u16),
        1 => Just(256u16),
    ];
    let positions = (
        any::<u16>(),
        prop_oneof![6 => Just(None), 1 => any::<u16>().prop_map(Some)],
        prop_oneof![12 => 0u16..10, 1 => 250u16..260, 1 => any::<u16>()],
    );
    let layout = (
        ring_addr(RING_AREA),
        ring_addr(RING_AREA + 0x1000),
        ring_addr(RING_AREA + 0x2000),
        prop_oneof![12 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8)],
    );
    let table = (
        proptest::collection::vec(request(), 0..8),
        proptest::collection::vec(desc(), 0..8),
        // Descriptors overwritten after layout: (index, descriptor).
        proptest::collection::vec((0u16..48, desc()), 0..3),
    );
    let contents = (
        proptest::collection::vec(head(), 0..16),
        table,
        proptest::collection::vec(desc(), 0..8),
        proptest::collection::vec(
            (
                prop_oneof![
                    3 => Just(VIRTIO_BLK_T_IN),
                    3 => Just(VIRTIO_BLK_T_OUT),
                    1 => Just(VIRTIO_BLK_T_FLUSH),
                    1 => Just(VIRTIO_BLK_T_GET_ID),
                    1 => any::<u32>(),
                ],
                prop_oneof![
                    8 => 0u64..SECTORS + 2,
                    1 => Just(u64::MAX),
                    1 => any::<u64>(),
                ],
            ),
            8,
        ),
        prop_oneof![
            6 => Just(vec![]),
            1 => proptest::collection::vec((any::<u16>(), any::<u8>()), 0..16),
        ],
    );
    (
        size,
        positions,
        layout,
        contents,
        any::<(bool, bool, bool)>(),
    )
        .prop_map(
            |(
                size,
                (next_avail, next_used, avail_ahead),
                (desc, avail, used, shared),
                (heads, (requests, extra, mutations), indirect, headers, pokes),
                (event_idx, readonly, write_through),
            )| {
                // Sometimes lay the used ring straight on the available ring or the table.
                let used = match shared {
                    1 => avail & !3,
                    2 => desc,
                    _ => used,
                };
                let mut table = Vec::new();
                let mut starts = Vec::new();
                for mut r in requests {
                    let start = table.len() as u16;
                    starts.push(start);
                    let last = r.len() - 1;
                    for (i, d) in r.iter_mut().enumerate() {
                        if i < last {
                            d.flags |= 1;
                            d.next = start + i as u16 + 1;
                        }
                    }
                    table.extend(r);
                }
                table.extend(extra);
                for (index, d) in mutations {
                    if let Some(slot) = table.get_mut(usize::from(index)) {
                        *slot = d;
                    }
                }
                let heads = heads
                    .into_iter()
                    .map(|h| match h {
                        Head::Request(i) if !starts.is_empty() => starts[i % starts.len()],
                        Head::Request(i) => i as u16,
                        Head::Index(i) => i,
                    })
                    .collect();
                Scenario {
                    size,
                    desc,
                    avail,
                    used,
                    event_idx,
                    next_avail,
                    next_used: next_used.unwrap_or(next_avail),
                    avail_ahead,
                    heads,
                    table,
                    indirect,
                    headers,
                    pokes,
                    readonly,
                    write_through,
                }
            },
        )
}

fn write_desc(mem: &GuestMem, at: u64, d: &Desc) {
    let raw = RawDescriptor::from(Descriptor::new(d.addr, d.len, d.flags, d.next));
    // Tables may reach past RAM: those descriptors are simply not there.
    let _ = mem.write_obj(raw, GuestAddress(at));
}

/// Writes `s` into `mem` and returns the queue as the device would hold it, or `None` if
/// virtio-queue itself refuses the layout (outside RAM, misaligned).
fn ring_scenario(mem: &GuestMem, s: &Scenario) -> Option<Queue> {
    let mut q = Queue::new(256).ok()?;
    q.try_set_size(s.size).ok()?;
    q.try_set_desc_table_address(GuestAddress(s.desc)).ok()?;
    q.try_set_avail_ring_address(GuestAddress(s.avail)).ok()?;
    q.try_set_used_ring_address(GuestAddress(s.used)).ok()?;
    q.set_event_idx(s.event_idx);
    q.set_ready(true);
    if !q.is_valid(mem) {
        return None;
    }
    q.set_next_avail(s.next_avail);
    q.set_next_used(s.next_used);
    for (i, (kind, sector)) in (0u64..).zip(&s.headers) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(HEADERS + 0x100 * i))
            .unwrap();
    }
    for (i, d) in (0u64..).zip(&s.indirect) {
        write_desc(mem, INDIRECT + 16 * i, d);
    }
    for (i, d) in (0u64..).zip(&s.table) {
        write_desc(mem, s.desc + 16 * i, d);
    }
    for (i, head) in (0u64..).zip(&s.heads) {
        let slot = s.avail + 4 + 2 * ((u64::from(s.next_avail) + i) % u64::from(s.size));
        let _ = mem.write_obj(*head, GuestAddress(slot));
    }
    let idx = s.next_avail.wrapping_add(s.avail_ahead);
    mem.write_obj(idx, GuestAddress(s.avail + 2)).unwrap();
    for &(offset, byte) in &s.pokes {
        let at = RING_AREA + u64::from(offset) % RING_AREA_LEN;
        mem.write_obj(byte, GuestAddress(at)).unwrap();
    }
    Some(q)
}

/// How many passes each case runs.
const PASSES: usize = 4;

/// Runs up to [`PASSES`] passes of `process` over `queue`, checking after each successful pass
/// that it took at most the budget, used every chain it took, and counted each once (by
/// `counted`, the engine's total of chains seen). Stops at the first error (a broken ring).
fn run_passes(
    queue: &mut Queue,
    mut process: impl FnMut(&mut Queue) -> Result<super::Pass, super::DeviceError>,
    counted: impl Fn() -> u64,
) -> Result<(), TestCaseError> {
    let budget = pass_budget(queue);
    for _ in 0..PASSES {
        let (avail0, used0, count0) = (queue.next_avail(), queue.next_used(), counted());
        if process(queue).is_err() {
            break;
        }
        let took = queue.next_avail().wrapping_sub(avail0);
        let used = queue.next_used().wrapping_sub(used0);
        prop_assert!(took <= budget, "took {took} chains, budget {budget}");
        prop_assert_eq!(used, took, "every chain taken is used");
        prop_assert_eq!(
            counted() - count0,
            u64::from(took),
            "each chain counted once"
        );
    }
    Ok(())
}

fn block_total(s: &BlockStats) -> u64 {
    s.reads + s.writes + s.flushes + s.get_ids + s.io_errors + s.unsupported + s.unanswerable
}

fn console_total(s: &ConsoleStats) -> u64 {
    s.chains + s.dropped_chains
}

fn block_case(s: Scenario) -> Result<(), TestCaseError> {
    let mem = guest_memory();
    let Some(mut queue) = ring_scenario(&mem, &s) else {
        return Ok(());
    };
    let image = TempImage::new(SECTORS, TAIL);
    let before = image.bytes();
    let mut disk = Disk::open(&image.0, s.readonly).unwrap();
    disk.set_write_through(s.write_through);
    let stats = disk.stats_handle();
    run_passes(
        &mut queue,
        |q| disk.process_queue(q, &mem),
        || block_total(&stats.get()),
    )?;
    drop(disk);
    let after = image.bytes();
    prop_assert_eq!(after.len(), before.len(), "the image keeps its length");
    let whole = (SECTORS * SECTOR_SIZE) as usize;
    prop_assert!(
        after[whole..]
            .iter()
            .zip(whole as u64..)
            .all(|(b, i)| *b == pattern(i)),
        "the tail past the last sector is never written"
    );
    if s.readonly {
        prop_assert!(after == before, "a read-only image is never written");
    }
    Ok(())
}

fn console_case(s: Scenario) -> Result<(), TestCaseError> {
    let mem = guest_memory();
    let Some(mut queue) = ring_scenario(&mem, &s) else {
        return Ok(());
    };
    let sink = ConsoleSink::new(None);
    let mut tx = Transmitter::new(sink.clone());
    let stats = tx.stats_handle();
    run_passes(
        &mut queue,
        |q| tx.process_queue(q, &mem),
        || console_total(&stats.get()),
    )?;
    let sent = tx.stats();
    // The sink may keep less than it was given (its capture is bounded), never more.
    prop_assert!(sink.captured().len() as u64 <= sent.bytes);
    prop_assert!(sent.bytes <= sent.chains * u64::from(MAX_CHAIN_BYTES));
    Ok(())
}

proptest! {
    /// The block request engine over random rings and requests.
    #[test]
    fn block_engine_over_random_rings(s in scenario()) {
        within("a block fuzz case", move || block_case(s))?;
    }

    /// The console transmit engine over the same random rings.
    #[test]
    fn console_engine_over_random_rings(s in scenario()) {
        within("a console fuzz case", move || console_case(s))?;
    }
}

/// Register offsets a driver uses, for biasing accesses towards them.
const REGISTERS: &[u32] = &[
    VIRTIO_MMIO_MAGIC_VALUE,
    VIRTIO_MMIO_DEVICE_FEATURES,
    VIRTIO_MMIO_DEVICE_FEATURES_SEL,
    VIRTIO_MMIO_DRIVER_FEATURES,
    VIRTIO_MMIO_DRIVER_FEATURES_SEL,
    VIRTIO_MMIO_QUEUE_SEL,
    VIRTIO_MMIO_QUEUE_NUM_MAX,
    VIRTIO_MMIO_QUEUE_NUM,
    VIRTIO_MMIO_QUEUE_READY,
    VIRTIO_MMIO_QUEUE_NOTIFY,
    VIRTIO_MMIO_INTERRUPT_STATUS,
    VIRTIO_MMIO_INTERRUPT_ACK,
    VIRTIO_MMIO_STATUS,
    VIRTIO_MMIO_QUEUE_DESC_LOW,
    VIRTIO_MMIO_QUEUE_DESC_HIGH,
    VIRTIO_MMIO_QUEUE_AVAIL_LOW,
    VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
    VIRTIO_MMIO_QUEUE_USED_LOW,
    VIRTIO_MMIO_QUEUE_USED_HIGH,
    VIRTIO_MMIO_CONFIG_GENERATION,
    VIRTIO_MMIO_CONFIG,
    VIRTIO_MMIO_CONFIG + 4,
];

/// One register access: write or read, offset, width, value.
type Access = (bool, u64, usize, u32);

fn access() -> impl Strategy<Value = Access> {
    let offset = prop_oneof![
        6 => proptest::sample::select(REGISTERS).prop_map(u64::from),
        1 => 0u64..0x140,
        1 => any::<u64>(),
    ];
    let width = prop_oneof![8 => Just(4usize), 1 => 0usize..9];
    let status = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
    let value = prop_oneof![
        3 => 0u32..4,
        2 => proptest::sample::select(vec![
            0,
            VIRTIO_CONFIG_S_ACKNOWLEDGE,
            status,
            status | VIRTIO_CONFIG_S_FEATURES_OK,
            status | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK,
            VIRTIO_CONFIG_S_FAILED,
            VIRTIO_CONFIG_S_NEEDS_RESET,
            1 << 0 | 1 << 3, // VERSION_1 in the high window, bit 3 in the low one
            1 << 28 | 1 << 29,
        ]),
        2 => (0u32..(FAKE_MEM as u32 / 0x100)).prop_map(|k| 0x100 * k),
        1 => (0u32..0x1000).prop_map(|k| 2 * k),
        1 => any::<u32>(),
    ];
    (prop::bool::weighted(0.8), offset, width, value)
}

/// A write of `value` to register `reg`.
fn write_op(reg: u32, value: u32) -> Access {
    (true, reg.into(), 4, value)
}

/// A driver's queue setup: select, size, the three rings (from a few aligned slots, so they
/// are apart, overlapping or outside RAM in turn), ready.
fn queue_setup() -> impl Strategy<Value = Vec<Access>> {
    (0u32..3).prop_flat_map(queue_setup_of)
}

/// [`queue_setup`] of queue `index`.
fn queue_setup_of(index: u32) -> impl Strategy<Value = Vec<Access>> {
    let ring = prop_oneof![
        4 => (0u32..64).prop_map(|k| 0x4000 * k),
        2 => (0u32..0x100).prop_map(|k| 0x10 * k + 0x1_0000),
        1 => any::<u32>(),
    ];
    (
        Just(index),
        prop_oneof![8 => proptest::sample::select(vec![1u32, 2, 4, 8]), 1 => Just(16u32), 1 => any::<u32>()],
        [ring.clone(), ring.clone(), ring],
        prop_oneof![8 => Just(0u32), 1 => any::<u32>()],
    )
        .prop_map(|(index, num, [desc, avail, used], high)| {
            vec![
                write_op(VIRTIO_MMIO_QUEUE_SEL, index),
                write_op(VIRTIO_MMIO_QUEUE_NUM, num),
                write_op(VIRTIO_MMIO_QUEUE_DESC_LOW, desc),
                write_op(VIRTIO_MMIO_QUEUE_DESC_HIGH, high),
                write_op(VIRTIO_MMIO_QUEUE_AVAIL_LOW, avail),
                write_op(VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 0),
                write_op(VIRTIO_MMIO_QUEUE_USED_LOW, used),
                write_op(VIRTIO_MMIO_QUEUE_USED_HIGH, 0),
                write_op(VIRTIO_MMIO_QUEUE_READY, 1),
            ]
        })
}

/// Random accesses mixed with queue setups and DRIVER_OK, so runs reach an active device,
/// a refused activation, resets and re-activations.
fn accesses() -> impl Strategy<Value = Vec<Access>> {
    let driver_ok = VIRTIO_CONFIG_S_ACKNOWLEDGE
        | VIRTIO_CONFIG_S_DRIVER
        | VIRTIO_CONFIG_S_FEATURES_OK
        | VIRTIO_CONFIG_S_DRIVER_OK;
    let full_setup = (queue_setup_of(0), queue_setup_of(1))
        .prop_map(move |(a, b)| [a, b, vec![write_op(VIRTIO_MMIO_STATUS, driver_ok)]].concat());
    let chunk = prop_oneof![
        6 => access().prop_map(|a| vec![a]),
        2 => queue_setup(),
        1 => Just(vec![write_op(VIRTIO_MMIO_STATUS, driver_ok)]),
        1 => full_setup,
    ];
    proptest::collection::vec(chunk, 0..40).prop_map(|c| c.concat())
}

/// Writes a valid handshake up to FEATURES_OK (so random queue setups often reach DRIVER_OK).
fn handshake(t: &mut MmioTransport<super::mmio::tests::Fake>) {
    let w = |t: &mut MmioTransport<_>, r: u32, v: u32| t.write(r.into(), &v.to_le_bytes());
    let s = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
    w(t, VIRTIO_MMIO_STATUS, 0);
    w(t, VIRTIO_MMIO_STATUS, s);
    w(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    w(t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
    w(t, VIRTIO_MMIO_STATUS, s | VIRTIO_CONFIG_S_FEATURES_OK);
}

fn rings_of(seen: &super::mmio::tests::QueueSeen) -> [(u64, u64); 3] {
    let &(size, desc, avail, used, _) = seen;
    let size = u64::from(size);
    [
        (desc, 16 * size),
        (avail, 6 + 2 * size),
        (used, 6 + 8 * size),
    ]
}

fn mmio_case(handshake_first: bool, ops: Vec<Access>) -> Result<(), TestCaseError> {
    let (mut t, log) = transport();
    if handshake_first {
        handshake(&mut t);
    }
    for (is_write, offset, width, value) in ops {
        let bytes = value.to_le_bytes().repeat(2);
        if is_write {
            t.write(offset, &bytes[..width]);
        } else {
            let mut buf = vec![0u8; width];
            t.read(offset, &mut buf);
        }
    }
    prop_assert_eq!(r32(&t, VIRTIO_MMIO_MAGIC_VALUE), MAGIC);
    prop_assert_eq!(r32(&t, VIRTIO_MMIO_VERSION), VERSION);
    prop_assert_eq!(r32(&t, VIRTIO_MMIO_DEVICE_ID), 42);
    let s = t.status();
    prop_assert!(s & VIRTIO_CONFIG_S_DRIVER_OK == 0 || s & VIRTIO_CONFIG_S_FEATURES_OK != 0);
    let known = VIRTIO_CONFIG_S_ACKNOWLEDGE
        | VIRTIO_CONFIG_S_DRIVER
        | VIRTIO_CONFIG_S_FEATURES_OK
        | VIRTIO_CONFIG_S_DRIVER_OK
        | VIRTIO_CONFIG_S_FAILED
        | VIRTIO_CONFIG_S_NEEDS_RESET;
    prop_assert_eq!(s & !known, 0);
    prop_assert!(!t.is_active() || s & VIRTIO_CONFIG_S_DRIVER_OK != 0);
    // Every activation the device saw had in-RAM rings, no two of them overlapping.
    for (_, queues) in &log.lock().unwrap().activations {
        let rings: Vec<(u64, u64)> = queues.iter().flat_map(rings_of).collect();
        for (i, &(a, a_len)) in rings.iter().enumerate() {
            prop_assert!(a + a_len <= FAKE_MEM as u64, "ring in RAM");
            for &(b, b_len) in &rings[..i] {
                prop_assert!(a + a_len <= b || b + b_len <= a, "rings overlap");
            }
        }
    }
    // Whatever state the driver reached saves and restores into a fresh window.
    let saved = t.save();
    let (mut fresh, _) = transport();
    let restored = fresh.restore(&saved);
    prop_assert!(restored.is_ok(), "{:?} for {:?}", restored, saved);
    prop_assert_eq!(fresh.save(), saved);
    Ok(())
}

proptest! {
    /// Any sequence of accesses, of any width at any offset, biased towards the registers a
    /// driver uses and values that move the handshake on.
    #[test]
    fn mmio_register_machine(
        handshake_first in prop::bool::weighted(0.8),
        ops in accesses(),
    ) {
        within("an mmio fuzz case", move || mmio_case(handshake_first, ops))?;
    }
}

/// The fuzz module's own helpers stay honest: a scenario with separate rings and one good
/// request is served, so the properties above do reach the request code.
#[test]
fn a_plain_scenario_reaches_the_request_code() {
    let s = Scenario {
        size: 4,
        desc: RING_AREA,
        avail: RING_AREA + 0x1000,
        used: RING_AREA + 0x2000,
        event_idx: false,
        next_avail: 65535,
        next_used: 65535,
        avail_ahead: 1,
        heads: vec![0; 4],
        table: vec![
            Desc {
                addr: HEADERS,
                len: 16,
                flags: 1,
                next: 1,
            },
            Desc {
                addr: DATA,
                len: 512,
                flags: 1 | 2,
                next: 2,
            },
            Desc {
                addr: STATUS,
                len: 1,
                flags: 2,
                next: 0,
            },
        ],
        indirect: vec![],
        headers: vec![(VIRTIO_BLK_T_IN, 1)],
        pokes: vec![],
        readonly: true,
        write_through: true,
    };
    let mem = guest_memory();
    let mut queue = ring_scenario(&mem, &s).unwrap();
    let image = TempImage::new(SECTORS, TAIL);
    let mut disk = Disk::open(&image.0, true).unwrap();
    let pass = disk.process_queue(&mut queue, &mem).unwrap();
    assert!(!pass.more);
    assert_eq!(disk.stats().reads, 1);
    let mut back = vec![0u8; 512];
    mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert!(back.iter().zip(512u64..).all(|(b, i)| *b == pattern(i)));
    block_case(s).unwrap();
}
