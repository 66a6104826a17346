use hypercall_abi::mmu::{PTE_USER, table_index};
use proptest::prelude::*;

use super::*;

const RAM: u64 = 64 << 20;
const P: u64 = PTE_PRESENT;
const W: u64 = PTE_WRITABLE;
const U: u64 = PTE_USER;

fn f(i: u64) -> u64 {
    PT_POOL_GPA + i * PAGE_SIZE
}

/// A pool with a pinned root at frame 10.
fn rooted() -> PageTablePool {
    let mut p = PageTablePool::new(RAM).unwrap();
    p.pin(f(10)).unwrap();
    p
}

/// Maps `va` -> `pa` under the root at frame 10 using tables at frames 11, 12, 13.
fn map_chain(
    p: &mut PageTablePool,
    va: u64,
    pa: u64,
    flags: u64,
) -> std::result::Result<(), AbiError> {
    p.apply(f(10) + table_index(va, 4) as u64 * 8, f(11) | P | W | U)?;
    p.apply(f(11) + table_index(va, 3) as u64 * 8, f(12) | P | W | U)?;
    p.apply(f(12) + table_index(va, 2) as u64 * 8, f(13) | P | W | U)?;
    p.apply(f(13) + table_index(va, 1) as u64 * 8, pa | flags)
}

#[test]
fn builds_a_four_level_mapping_top_down() {
    let mut p = rooted();
    map_chain(&mut p, 0x80_0000_0000, 0x30_0000, P | W | U).unwrap();
    assert_eq!(p.frame(f(11)), Some(FrameInfo { level: 3, refs: 1 }));
    assert_eq!(p.frame(f(13)), Some(FrameInfo { level: 1, refs: 1 }));
    let leaf = p.read_entry(f(13)).unwrap();
    assert_eq!(
        leaf,
        0x30_0000 | P | W | U | PTE_ACCESSED | PTE_DIRTY,
        "host presets A/D"
    );
    assert_eq!(
        p.read_entry(f(10) + 8).unwrap() & PTE_DIRTY,
        0,
        "no D on table entries"
    );
}

#[test]
fn writes_into_untyped_frames_are_refused() {
    let mut p = rooted();
    assert_eq!(p.apply(f(20), 0x30_0000 | P), Err(AbiError::TypeConflict));
    assert_eq!(p.read_entry(f(20)), Some(0));
}

#[test]
fn a_leaf_may_not_map_a_pool_frame_writable() {
    let mut p = rooted();
    assert_eq!(map_chain(&mut p, 0, f(10), P | W), Err(AbiError::Denied));
    // Read-only is fine (the guest may read its own tables).
    p.apply(f(13), f(10) | P).unwrap();
}

#[test]
fn a_leaf_must_map_guest_ram() {
    let mut p = rooted();
    assert_eq!(map_chain(&mut p, 0, RAM, P), Err(AbiError::BadAddress));
    assert_eq!(p.apply(f(13), 0xC000_0000 | P), Err(AbiError::BadAddress));
    p.apply(f(13), (RAM - PAGE_SIZE) | P).unwrap();
}

#[test]
fn a_table_entry_must_point_into_the_pool() {
    let mut p = rooted();
    assert_eq!(p.apply(f(10), 0x30_0000 | P | W), Err(AbiError::BadAddress));
    assert_eq!(p.read_entry(f(10)), Some(0));
}

#[test]
fn reserved_bits_misalignment_and_big_pages_are_refused() {
    let mut p = rooted();
    map_chain(&mut p, 0, 0x30_0000, P).unwrap();
    assert_eq!(
        p.apply(f(13) + 8, 0x30_1000 | P | (1 << 63)),
        Err(AbiError::InvalidArgument)
    );
    assert_eq!(
        p.apply(f(13) + 8, 0x30_1000 | P | (1 << 52)),
        Err(AbiError::InvalidArgument)
    );
    assert_eq!(
        p.apply(f(13) + 4, 0x30_1000 | P),
        Err(AbiError::InvalidArgument)
    );
    // 1 GiB page in an L3 table.
    assert_eq!(
        p.apply(f(11) + 8, P | PTE_HUGE),
        Err(AbiError::InvalidArgument)
    );
    // 2 MiB page: aligned is fine, bits 13..20 set is not.
    p.apply(f(12) + 8, 0x20_0000 | P | W | PTE_HUGE).unwrap();
    assert_eq!(
        p.apply(f(12) + 16, 0x20_2000 | P | PTE_HUGE),
        Err(AbiError::InvalidArgument)
    );
    // Not-present entries are the guest's business.
    p.apply(f(13) + 16, 0xdead_beef_0000_0000).unwrap();
    assert_eq!(p.apply(u64::MAX - 7, 0), Err(AbiError::BadAddress));
    assert_eq!(p.apply(0x1000, 0), Err(AbiError::BadAddress));
}

/// Issue 13, finding 4: bit 7 of an L1 entry is PAT, not PS. A 4 KiB leaf with PAT set (alone
/// or with PWT/PCD, any 4 KiB-aligned address) is an ordinary leaf; bit 7 still means PS in
/// L2 (and is refused in L3), where the PAT bit is 12.
#[test]
fn a_4k_leaf_with_pat_set_is_accepted() {
    use hypercall_abi::mmu::{PTE_PAT, PTE_PAT_HUGE, PTE_PCD, PTE_PWT};
    let mut p = rooted();
    map_chain(&mut p, 0x80_0000_0000, 0x30_1000, P | W | PTE_PAT).unwrap();
    assert_eq!(
        p.read_entry(f(13)).unwrap(),
        0x30_1000 | P | W | PTE_PAT | PTE_ACCESSED | PTE_DIRTY
    );
    p.apply(f(13) + 8, 0x30_3000 | P | PTE_PAT | PTE_PWT | PTE_PCD)
        .unwrap();
    // Read-only view of a pool frame with PAT: still a 4 KiB leaf, so still a pool frame.
    p.apply(f(13) + 16, f(13) | P | PTE_PAT).unwrap();
    assert_eq!(
        p.apply(f(13) + 24, f(13) | P | W | PTE_PAT),
        Err(AbiError::Denied)
    );
    // The last RAM page, PAT set: inside RAM, not a 2 MiB page running past its end.
    p.apply(f(13) + 32, (RAM - PAGE_SIZE) | P | PTE_PAT)
        .unwrap();
    assert_eq!(p.frame(f(13)), Some(FrameInfo { level: 1, refs: 1 }));
    check_invariants(&p);
    p.check_invariants().unwrap();
    // L2: bit 7 is PS; a 2 MiB leaf's PAT is bit 12, its bits 13..=20 stay reserved.
    p.apply(f(12) + 8, 0x40_0000 | P | PTE_HUGE | PTE_PAT_HUGE)
        .unwrap();
    assert_eq!(
        p.apply(f(12) + 16, 0x40_2000 | P | PTE_HUGE),
        Err(AbiError::InvalidArgument)
    );
    assert_eq!(
        p.apply(f(11) + 8, P | PTE_HUGE),
        Err(AbiError::InvalidArgument)
    );
}

/// Issue 13, finding 5: pins are bounded by `PIN_MAX`; one more is `TOO_LARGE` and changes
/// nothing; unpinning works down again.
#[test]
fn pins_are_bounded_and_never_wrap() {
    use hypercall_abi::mmu::PIN_MAX;
    let mut p = rooted();
    for _ in 1..PIN_MAX {
        p.pin(f(10)).unwrap();
    }
    assert_eq!(
        p.frame(f(10)),
        Some(FrameInfo {
            level: 4,
            refs: PIN_MAX
        })
    );
    p.defer_resync(true);
    assert_eq!(p.pin(f(10)), Err(AbiError::TooLarge));
    assert!(p.deferred, "a refused pin does not end a deferral");
    assert_eq!(
        p.frame(f(10)),
        Some(FrameInfo {
            level: 4,
            refs: PIN_MAX
        })
    );
    p.check_invariants().unwrap();
    p.unpin(f(10)).unwrap();
    p.pin(f(10)).unwrap();
    for _ in 0..PIN_MAX {
        p.unpin(f(10)).unwrap();
    }
    assert_eq!(p.frame(f(10)), Some(FrameInfo::default()));
    assert_eq!(p.unpin(f(10)), Err(AbiError::TypeConflict));
}

/// A frame's reference count is checked before anything changes: at the (unreachable by
/// guests) maximum, one more parent entry is refused, not wrapped.
#[test]
fn a_full_reference_count_refuses_new_parents() {
    let mut p = rooted();
    map_chain(&mut p, 0, 0x30_0000, P).unwrap();
    p.frames[11].refs = u32::MAX;
    let before = p.read_entry(f(10) + 16);
    assert_eq!(p.apply(f(10) + 16, f(11) | P | W), Err(AbiError::TooLarge));
    assert_eq!(p.read_entry(f(10) + 16), before);
    assert_eq!(p.frames[11].refs, u32::MAX);
}

#[test]
fn a_frame_is_used_at_one_level_only() {
    let mut p = rooted();
    map_chain(&mut p, 0, 0x30_0000, P).unwrap();
    // Frame 12 is an L2; linking it from the L4 (as an L3) conflicts.
    assert_eq!(
        p.apply(f(10) + 16, f(12) | P | W),
        Err(AbiError::TypeConflict)
    );
    // Sharing at the right level is allowed and counted.
    p.apply(f(10) + 16, f(11) | P | W).unwrap();
    assert_eq!(p.frame(f(11)).unwrap().refs, 2);
}

#[test]
fn non_zero_untyped_frames_cannot_become_tables() {
    let mut p = rooted();
    p.mem.write_obj(7u64, GuestAddress(f(30))).unwrap();
    assert_eq!(p.apply(f(10), f(30) | P | W), Err(AbiError::TypeConflict));
    assert_eq!(p.pin(f(30)), Err(AbiError::TypeConflict));
}

#[test]
fn unlinking_releases_and_scrubs_the_subtree() {
    let mut p = rooted();
    map_chain(&mut p, 0x80_0000_0000, 0x30_0000, P | W).unwrap();
    assert_eq!(p.typed_frames(), 4);
    p.apply(f(10) + 8, 0).unwrap();
    assert_eq!(p.typed_frames(), 1);
    for i in 11..=13 {
        assert!(p.frame_is_zero(i as usize), "frame {i} scrubbed");
    }
    // Released frames can be reused at another level.
    p.apply(f(10) + 8, f(13) | P | W).unwrap();
    assert_eq!(p.frame(f(13)).unwrap().level, 3);
}

#[test]
fn unpin_releases_the_tree_but_never_the_boot_root() {
    let mut p = rooted();
    map_chain(&mut p, 0, 0x30_0000, P).unwrap();
    p.pin(f(10)).unwrap();
    p.unpin(f(10)).unwrap();
    assert_eq!(p.typed_frames(), 4, "still pinned once");
    p.unpin(f(10)).unwrap();
    assert_eq!(p.typed_frames(), 0);
    assert_eq!(p.unpin(f(10)), Err(AbiError::TypeConflict));
    p.install_vmm_table(PML4_GPA, 4, 1, &[]);
    assert_eq!(p.unpin(PML4_GPA), Err(AbiError::Denied));
}

/// Frames the random operations name (plus a margin); others stay untouched.
const TOUCHED: usize = 32;

/// Invariants that must hold after any sequence of guest operations.
fn check_invariants(p: &PageTablePool) {
    let mut refs = vec![0u32; POOL_FRAMES];
    for (i, info) in p.frames.iter().enumerate() {
        if info.level == 0 {
            if i < TOUCHED {
                assert!(p.frame_is_zero(i), "untyped frame {i} is zero");
            }
            continue;
        }
        for n in 0..ENTRIES_PER_TABLE as u64 {
            let e = p.read_entry(frame_gpa(i) + n * 8).unwrap();
            if e & PTE_PRESENT == 0 {
                continue;
            }
            assert_eq!(e & PTE_RESERVED_MASK, 0);
            match p.table_target(info.level, e) {
                Some(c) => {
                    assert_eq!(p.frames[c].level, info.level - 1, "child level");
                    refs[c] += 1;
                }
                None => {
                    let addr = e & PTE_ADDR_MASK;
                    if pool_covers(addr, PAGE_SIZE) {
                        assert_eq!(e & PTE_WRITABLE, 0, "writable mapping of a pool frame");
                    } else {
                        assert!(addr < RAM, "leaf inside RAM");
                    }
                }
            }
        }
    }
    for (i, info) in p.frames.iter().enumerate() {
        if info.level != 0 && info.level != 4 {
            assert_eq!(info.refs, refs[i], "refcount of frame {i}");
        }
    }
}

fn arb_value() -> impl Strategy<Value = u64> {
    let frame = (0u64..24).prop_map(f);
    let ram = (0u64..(RAM / PAGE_SIZE + 4)).prop_map(|n| n * PAGE_SIZE);
    let addr = prop_oneof![frame, ram, any::<u64>().prop_map(|v| v & PTE_ADDR_MASK)];
    let flags = prop_oneof![
        Just(0u64),
        Just(P),
        Just(P | W),
        Just(P | W | U),
        Just(P | PTE_HUGE),
        Just(P | (1 << 63)),
        any::<u64>().prop_map(|v| v & 0xfff),
    ];
    (addr, flags).prop_map(|(a, fl)| a | fl)
}

fn arb_pte_gpa() -> impl Strategy<Value = u64> {
    prop_oneof![
        8 => (0u64..24, 0u64..4).prop_map(|(fr, n)| f(fr) + n * 8),
        1 => any::<u64>(),
    ]
}

#[derive(Debug, Clone)]
enum Op {
    Apply(u64, u64),
    Pin(u64),
    Unpin(u64),
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        10 => (arb_pte_gpa(), arb_value()).prop_map(|(g, v)| Op::Apply(g, v)),
        1 => (0u64..24).prop_map(|i| Op::Pin(f(i))),
        1 => (0u64..24).prop_map(|i| Op::Unpin(f(i))),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_guest_operations_keep_the_pool_consistent(ops in proptest::collection::vec(arb_op(), 1..80)) {
        let mut p = rooted();
        for op in ops {
            let snapshot = |p: &PageTablePool| {
                let mut b = vec![0u8; TOUCHED * PAGE_SIZE as usize];
                p.mem.read_slice(&mut b, GuestAddress(PT_POOL_GPA)).unwrap();
                b
            };
            let before = snapshot(&p);
            let frames_before = p.frames.clone();
            let r = match op {
                Op::Apply(g, v) => p.apply(g, v),
                Op::Pin(g) => p.pin(g),
                Op::Unpin(g) => p.unpin(g),
            };
            if r.is_err() {
                prop_assert!(before == snapshot(&p), "a refused operation changed the pool");
                prop_assert_eq!(&frames_before, &p.frames);
            }
            check_invariants(&p);
        }
        // Whatever the guest reached, its state is accepted by `restore` and round-trips.
        let mut fresh = PageTablePool::new(RAM).unwrap();
        crate::state::assert_round_trip(&p, &mut fresh);
    }
}
