//! Fuzzing of hypercall dispatch over real guest memory: random calls (biased toward valid call
//! numbers, operations, and addresses in and near RAM and the page-table pool), real batches of
//! page-table updates written into guest RAM, and trapped pool stores, through
//! [`dispatch`](super::dispatch) with a real [`Context`].
//!
//! After every call: no panic. After every case: the pool invariants hold
//! ([`PageTablePool::check_invariants`]) and RAM below `protected_end` is unchanged.
//!
//! Cases: `PROPTEST_CASES` (proptest's default without it); the long run is
//! `PROPTEST_CASES=1000000 cargo test --release -p host-vmm --lib fuzz`.

use std::cell::{Cell, RefCell};

use hypercall_abi::layout::{PAGE_SIZE, PT_POOL_GPA, PT_POOL_SIZE};
use hypercall_abi::mmu::{
    MMU_UPDATE_MAX, MmuUpdate, PIN_L4, PTE_HUGE, PTE_PRESENT, PTE_USER, PTE_WRITABLE, UNPIN,
};
use hypercall_abi::{Call, Regs};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use vm_memory::{Bytes, GuestAddress};
use zerocopy::IntoBytes;

use super::{Context, Outcome, clock, dispatch, host_features};
use crate::console::ConsoleSink;
use crate::devices::event::EventQueue;
use crate::free_report::FreeReport;
use crate::memory::GuestRam;
use crate::metrics::ExitStats;
use crate::mmu::PageTablePool;
use crate::state::Persist;

const RAM: u64 = 16 << 20;
/// RAM below this is the "kernel": no call may change it.
const PROTECTED_END: u64 = 0x10_0000;
/// Where the harness (the guest) writes its batches: above `PROTECTED_END`.
const SCRATCH: u64 = 0x80_0000;

/// Pool frame `i`.
fn f(i: u64) -> u64 {
    PT_POOL_GPA + i * PAGE_SIZE
}

/// Addresses near every edge a handler checks.
fn address() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => prop::sample::select(vec![
            0,
            8,
            0x1000,
            PROTECTED_END - 16,
            PROTECTED_END - 8,
            PROTECTED_END,
            SCRATCH,
            RAM - 16,
            RAM - 8,
            RAM - 1,
            RAM,
            RAM + 8,
            PT_POOL_GPA - 8,
            PT_POOL_GPA,
            PT_POOL_GPA + PT_POOL_SIZE - 8,
            PT_POOL_GPA + PT_POOL_SIZE,
            u64::MAX - 7,
            u64::MAX,
        ]),
        3 => (0..RAM / 8).prop_map(|q| q * 8),
        2 => (0u64..32, 0u64..512).prop_map(|(fr, n)| f(fr) + n * 8),
        1 => any::<u64>(),
    ]
}

/// Sizes and counts near every limit.
fn count() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => 0u64..64,
        2 => prop::sample::select(vec![
            255, 256, 257, 1023, 1024, 1025, 4096, 32768, 32769, 65536, 65537,
            u64::MAX, u64::MAX / 16 + 1, 1 << 32,
        ]),
        1 => any::<u64>(),
    ]
}

/// A page-table entry value: a pool frame, a RAM page or anything, with likely flags.
fn pte_value() -> impl Strategy<Value = u64> {
    let frame = (0u64..32).prop_map(f);
    let ram = (0..RAM / PAGE_SIZE + 4).prop_map(|n| n * PAGE_SIZE);
    let huge = (0u64..16).prop_map(|n| n << 21);
    let addr = prop_oneof![4 => frame, 3 => ram, 1 => huge, 1 => any::<u64>()];
    let flags = prop_oneof![
        2 => Just(0u64),
        4 => Just(PTE_PRESENT | PTE_WRITABLE | PTE_USER),
        2 => Just(PTE_PRESENT),
        2 => Just(PTE_PRESENT | PTE_HUGE),
        1 => Just(PTE_PRESENT | PTE_WRITABLE | PTE_HUGE),
        1 => Just(PTE_PRESENT | (1 << 63)),
        2 => any::<u64>().prop_map(|v| v & 0xfff),
    ];
    (addr, flags).prop_map(|(a, fl)| a | fl)
}

/// The address of a pool entry: mostly in the first frames (the boot tables and what the
/// guest builds next), any slot.
fn pte_gpa() -> impl Strategy<Value = u64> {
    prop_oneof![
        6 => (0u64..32, 0u64..4).prop_map(|(fr, n)| f(fr) + n * 8),
        3 => (0u64..32, 0u64..512).prop_map(|(fr, n)| f(fr) + n * 8),
        1 => address(),
    ]
}

#[derive(Debug, Clone)]
enum Op {
    /// Any registers.
    Raw { nr: u64, args: [u64; 4] },
    /// `mmu_update` of `entries` written at `SCRATCH + offset`, with `count` = entries +
    /// `extra` (wrapping), `flags` in `a2`.
    Update {
        entries: Vec<(u64, u64)>,
        offset: u64,
        extra: u64,
        flags: u64,
    },
    /// `mmu_pin(op, frame)`.
    Pin { op: u64, frame: u64 },
    /// `mmu_pin(PIN_L4, root)`, then `mmu_update` of `entries` (a chain under `root`).
    Chain {
        root: u64,
        entries: Vec<(u64, u64)>,
        flags: u64,
    },
    /// A trapped store of `data` at `gpa` in the pool.
    Store { gpa: u64, data: Vec<u8> },
}

fn op() -> impl Strategy<Value = Op> {
    let nr = prop_oneof![
        6 => prop::sample::select(
            hypercall_abi::request::ALL_CALLS.map(|c| u64::from(c.raw()))
            .to_vec()
        ),
        1 => 0u64..32,
        1 => any::<u64>(),
    ];
    let sub_op = prop_oneof![3 => 0u64..5, 1 => any::<u64>()];
    let arg = prop_oneof![2 => address(), 2 => count(), 1 => sub_op.clone()];
    let raw = (nr, sub_op, arg.clone(), arg.clone(), arg).prop_map(|(nr, a0, a1, a2, a3)| {
        // `idle_yield` waits until its deadline: keep deadlines in the past.
        let a0 = if nr == u64::from(Call::IdleYield.raw()) {
            a0 % 2
        } else {
            a0
        };
        Op::Raw {
            nr,
            args: [a0, a1, a2, a3],
        }
    });
    let update = (
        prop::collection::vec((pte_gpa(), pte_value()), 0..24),
        prop_oneof![4 => Just(0u64), 1 => 0u64..0x10_0000],
        prop_oneof![6 => Just(0u64), 1 => Just(1u64), 1 => Just(u64::MAX), 1 => count()],
        prop_oneof![4 => Just(0u64), 2 => Just(1u64), 1 => any::<u64>()],
    )
        .prop_map(|(entries, offset, extra, flags)| Op::Update {
            entries,
            offset: offset & !7,
            extra,
            flags,
        });
    let pin = (
        prop_oneof![4 => Just(PIN_L4), 3 => Just(UNPIN), 1 => any::<u64>()],
        prop_oneof![6 => (0u64..32).prop_map(f), 1 => address()],
    )
        .prop_map(|(op, frame)| Op::Pin { op, frame });
    let store = (
        pte_gpa(),
        prop_oneof![
            6 => pte_value().prop_map(|v| v.to_le_bytes().to_vec()),
            1 => prop::collection::vec(any::<u8>(), 0..12),
        ],
    )
        .prop_map(|(gpa, data)| Op::Store { gpa, data });
    // A table chain root -> L3 -> L2 -> L1 -> leaf in one batch (after pinning the root):
    // random frames and slots, so chains share, conflict, and replace each other.
    let chain = (
        prop_oneof![1 => Just(0u64), 3 => 6u64..32],
        prop::collection::vec((6u64..32, 0u64..4), 3),
        0u64..4,
        pte_value(),
        prop_oneof![3 => Just(0u64), 1 => Just(1u64)],
    )
        .prop_map(|(root, links, slot, leaf, flags)| {
            let table = PTE_PRESENT | PTE_WRITABLE | PTE_USER;
            let mut entries = Vec::new();
            let mut at = f(root);
            for (frame, s) in links {
                entries.push((at + s * 8, f(frame) | table));
                at = f(frame);
            }
            entries.push((at + slot * 8, leaf));
            Op::Chain {
                root: f(root),
                entries,
                flags,
            }
        });
    prop_oneof![3 => raw, 3 => update, 3 => chain, 2 => pin, 2 => store]
}

/// Fills `[0, PROTECTED_END)` with a pattern and returns it.
fn protect(ram: &GuestRam) -> Vec<u8> {
    let pattern: Vec<u8> = (0..PROTECTED_END)
        .map(|i| (i.wrapping_mul(0x9e37_79b9) >> 13) as u8)
        .collect();
    ram.mem().write_slice(&pattern, GuestAddress(0)).unwrap();
    pattern
}

/// Checks RAM below `PROTECTED_END` still holds `pattern`, except inside `written`.
fn check_protected(
    ram: &GuestRam,
    pattern: &[u8],
    written: Option<std::ops::Range<u64>>,
) -> Result<(), TestCaseError> {
    let mut low = vec![0u8; PROTECTED_END as usize];
    ram.mem().read_slice(&mut low, GuestAddress(0)).unwrap();
    if low == pattern {
        return Ok(());
    }
    let changed = (0..PROTECTED_END)
        .zip(low.iter().zip(pattern))
        .find(|&(at, (a, b))| a != b && !written.as_ref().is_some_and(|w| w.contains(&at)));
    match changed {
        Some((at, _)) => Err(TestCaseError::fail(format!(
            "RAM below protected_end changed at {at:#x}"
        ))),
        None => Ok(()),
    }
}

#[test]
fn fuzz_hypercall_dispatch_over_real_memory() {
    let ram = GuestRam::new(RAM).unwrap();
    let pattern = protect(&ram);
    let clock = clock::Clock::new();
    let booted = {
        let mut pool = PageTablePool::new(RAM).unwrap();
        crate::boot::install_identity_map(&mut pool);
        pool.save()
    };
    let pool = RefCell::new(PageTablePool::new(RAM).unwrap());
    let calls = Cell::new(0u64);
    // How deep the cases get: calls that succeeded, entries applied, most typed frames.
    let succeeded = Cell::new(0u64);
    let applied = Cell::new(0u64);
    let typed = Cell::new(0usize);
    let mut runner = TestRunner::new(Config {
        failure_persistence: None,
        ..Config::default()
    });
    let cases = runner.config().cases;
    runner
        .run(&prop::collection::vec(op(), 1..24), |ops| {
            let console = ConsoleSink::new(None);
            let mut events = EventQueue::default();
            // Back to a freshly booted pool (one mapping reused: a new one per case costs a
            // page fault per frame the checks read).
            let mut pool = pool.borrow_mut();
            pool.restore(&booted).unwrap();
            let mut stats = ExitStats::default();
            let mut free_report = FreeReport::new(PROTECTED_END);
            let mut ctx = Context {
                ram: &ram,
                console: &console,
                clock: &clock,
                pool: &mut pool,
                events: &mut events,
                protected_end: PROTECTED_END,
                free_report: &mut free_report,
                features: host_features(1),
            };
            for op in &ops {
                calls.set(calls.get() + 1);
                let regs = match op {
                    Op::Raw { nr, args } => Regs {
                        nr: *nr,
                        args: *args,
                    },
                    Op::Update {
                        entries,
                        offset,
                        extra,
                        flags,
                    } => {
                        let batch: Vec<MmuUpdate> = entries
                            .iter()
                            .map(|&(pte_gpa, value)| MmuUpdate { pte_gpa, value })
                            .collect();
                        let gpa = SCRATCH + offset;
                        ram.mem()
                            .write_slice(batch.as_bytes(), GuestAddress(gpa))
                            .unwrap();
                        Regs {
                            nr: u64::from(Call::MmuUpdate.raw()),
                            args: [gpa, (batch.len() as u64).wrapping_add(*extra), *flags, 0],
                        }
                    }
                    Op::Chain {
                        root,
                        entries,
                        flags,
                    } => {
                        let pin = Regs {
                            nr: u64::from(Call::MmuPin.raw()),
                            args: [PIN_L4, *root, 0, 0],
                        };
                        dispatch(&mut ctx, &pin, &mut stats);
                        let batch: Vec<MmuUpdate> = entries
                            .iter()
                            .map(|&(pte_gpa, value)| MmuUpdate { pte_gpa, value })
                            .collect();
                        ram.mem()
                            .write_slice(batch.as_bytes(), GuestAddress(SCRATCH))
                            .unwrap();
                        Regs {
                            nr: u64::from(Call::MmuUpdate.raw()),
                            args: [SCRATCH, batch.len() as u64, *flags, 0],
                        }
                    }
                    Op::Pin { op, frame } => Regs {
                        nr: u64::from(Call::MmuPin.raw()),
                        args: [*op, *frame, 0, 0],
                    },
                    Op::Store { gpa, data } => {
                        crate::trap::mmu_emul::store(ctx.pool, *gpa, data);
                        continue;
                    }
                };
                // `zero_hints(QUERY)` writes its bitmap where the guest asks, which may be below
                // `protected_end` (the guest's own memory): check the rest around it.
                let query = regs.nr == u64::from(Call::ZeroHints.raw())
                    && regs.args[0] == hypercall_abi::zero::QUERY;
                if query {
                    check_protected(&ram, &pattern, None)?;
                }
                let outcome = dispatch(&mut ctx, &regs, &mut stats);
                if query {
                    let out = regs.args[1]..regs.args[1].saturating_add(regs.args[3].div_ceil(8));
                    check_protected(&ram, &pattern, Some(out.clone()))?;
                    // Put the pattern back where the bitmap went.
                    let back = out.start.min(PROTECTED_END)..out.end.min(PROTECTED_END);
                    ram.mem()
                        .write_slice(
                            &pattern[back.start as usize..back.end as usize],
                            GuestAddress(back.start),
                        )
                        .unwrap();
                }
                match outcome {
                    Outcome::Return(r) => {
                        succeeded.set(succeeded.get() + u64::from(r.status == 0));
                        if regs.nr == u64::from(Call::MmuUpdate.raw()) {
                            // Entries applied, on success or error, never more than asked.
                            prop_assert!(r.value <= regs.args[1].min(MMU_UPDATE_MAX));
                            applied.set(applied.get() + r.value);
                        }
                    }
                    Outcome::Exit(_) => {}
                    Outcome::Interrupted(r) => {
                        return Err(TestCaseError::fail(format!("interrupted: {r:?}")));
                    }
                }
            }
            typed.set(typed.get().max(pool.typed_frames()));
            if let Err(e) = pool.check_invariants() {
                return Err(TestCaseError::fail(format!("pool invariant: {e}")));
            }
            check_protected(&ram, &pattern, None)
        })
        .unwrap();
    eprintln!(
        "hypercall fuzz: {cases} cases, {} calls ({} succeeded), {} pool entries applied by \
         mmu_update, at most {} typed frames",
        calls.get(),
        succeeded.get(),
        applied.get(),
        typed.get()
    );
}
