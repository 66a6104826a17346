//! Page-table updates under real KVM: purpose-built guests poke the validator through both paths
//! (PV `mmu_update` batches and trapped stores into the read-only pool). Every refusal leaves
//! the guest running and visible to it; the demo kernel's `pagetable` workload gives the same
//! checksum both ways with the expected exit counts, and the same again on native tables
//! (`tables=native`, ordinary RAM the VMM never sees).

use host_vmm::loader::minimal_elf;
use host_vmm::metrics::ExitReason;
use hypercall_abi::layout::{PML4_GPA, PT_POOL_BOOT_FRAMES, PT_POOL_GPA};
use hypercall_abi::mmu::{MmuUpdate, PIN_L4, PTE_PRESENT, PTE_USER, PTE_WRITABLE};
use hypercall_abi::{Call, Error};
use tests::asm::{
    LOAD_RAX_FROM_RBX, PACK_STATUS_AND_VALUE, STORE_EAX_AT_RBX, STORE_RAX_AT_RBX, exit_with_eax,
    hypercall, mov_imm,
};
use tests::{Mode, boot, boot_image, text};

const MEM: u64 = 128 << 20;
const KERNEL: u64 = 0x20_0000;
/// The first free pool frame (after the VMM's boot tables).
const FREE: u64 = PT_POOL_GPA + PT_POOL_BOOT_FRAMES * 4096;
const P: u64 = PTE_PRESENT;
const W: u64 = PTE_WRITABLE;
const U: u64 = PTE_USER;

/// A guest that pins `FREE` as a new root and then applies `batch` with one `mmu_update`;
/// it exits with `status | applied << 8`.
fn run_batch(batch: &[MmuUpdate]) -> (u64, u64) {
    let data_gpa = KERNEL + 0x800;
    let mut code = hypercall(u64::from(Call::MmuPin.raw()), PIN_L4, FREE);
    code.extend(hypercall(
        u64::from(Call::MmuUpdate.raw()),
        data_gpa,
        batch.len() as u64,
    ));
    code.extend(PACK_STATUS_AND_VALUE);
    code.extend(exit_with_eax());
    assert!(code.len() <= 0x800);
    code.resize(0x800, 0xf4);
    for e in batch {
        code.extend(e.pte_gpa.to_le_bytes());
        code.extend(e.value.to_le_bytes());
    }
    let r = boot_image(Mode::Pv, minimal_elf(KERNEL, &code, 0x1000)).expect("host keeps running");
    assert_eq!(r.stats.by_hypercall["mmu_update"], 1);
    (u64::from(r.exit_code & 0xff), u64::from(r.exit_code >> 8))
}

fn entry(table: u64, index: u64, value: u64) -> MmuUpdate {
    MmuUpdate {
        pte_gpa: table + index * 8,
        value,
    }
}

/// A batch building VA 512 GiB -> `leaf` under the root at FREE: L4[1] -> L3 -> L2 -> L1.
fn chain(leaf: u64) -> Vec<MmuUpdate> {
    let (l3, l2, l1) = (FREE + 0x1000, FREE + 0x2000, FREE + 0x3000);
    vec![
        entry(FREE, 1, l3 | P | W | U),
        entry(l3, 0, l2 | P | W | U),
        entry(l2, 0, l1 | P | W | U),
        entry(l1, 0, leaf),
    ]
}

#[test]
fn a_valid_batch_applies_every_entry() {
    assert_eq!(run_batch(&chain(0x30_0000 | P | W | U)), (0, 4));
}

#[test]
fn mapping_a_pool_frame_writable_is_denied() {
    assert_eq!(
        run_batch(&chain(PML4_GPA | P | W)),
        (Error::Denied.code(), 3)
    );
    // Read-only is allowed.
    assert_eq!(run_batch(&chain(PML4_GPA | P)), (0, 4));
}

#[test]
fn mapping_outside_ram_is_a_bad_address() {
    assert_eq!(
        run_batch(&chain(MEM | P | W)),
        (Error::BadAddress.code(), 3)
    );
    assert_eq!(
        run_batch(&chain(0xC000_0000 | P)),
        (Error::BadAddress.code(), 3)
    );
}

#[test]
fn a_table_entry_pointing_outside_the_pool_is_refused() {
    let batch = [entry(FREE, 1, 0x30_0000 | P | W)];
    assert_eq!(run_batch(&batch), (Error::BadAddress.code(), 0));
    // ...and so is one pointing at a frame already used at another level.
    let mut b = chain(0x30_0000 | P);
    b.push(entry(FREE, 2, (FREE + 0x2000) | P | W));
    assert_eq!(run_batch(&b), (Error::TypeConflict.code(), 4));
}

#[test]
fn reserved_bits_are_refused() {
    assert_eq!(
        run_batch(&chain(0x30_0000 | P | (1 << 63))),
        (Error::InvalidArgument.code(), 3)
    );
}

/// A trapped guest: store `value` at `pte_gpa` with an 8-byte (or 4-byte) `mov`, read the entry
/// back and exit with its low 32 bits.
fn trapped_store(pte_gpa: u64, value: u64, wide: bool) -> host_vmm::compare::Measured {
    let mut code = mov_imm(3, pte_gpa);
    code.extend(mov_imm(0, value));
    if wide {
        code.extend(STORE_RAX_AT_RBX);
    } else {
        code.extend(STORE_EAX_AT_RBX);
    }
    code.extend(LOAD_RAX_FROM_RBX);
    code.extend(exit_with_eax());
    boot_image(Mode::Trapped, minimal_elf(KERNEL, &code, 0x1000)).expect("host keeps running")
}

#[test]
fn trapped_stores_are_validated_and_applied() {
    // Link a zero pool frame as L4[1] of the boot root: accepted, with Accessed preset.
    let r = trapped_store(PML4_GPA + 8, FREE | P | W | U, true);
    assert_eq!(u64::from(r.exit_code), FREE | P | W | U | (1 << 5));
    assert_eq!(r.stats.event("pte_trapped"), 1);
    assert_eq!(r.stats.reason(ExitReason::Mmio), 1);
    assert_eq!(r.stats.reason(ExitReason::Hypercall), 0);
}

#[test]
fn refused_trapped_stores_are_dropped_and_the_guest_sees_it() {
    for (gpa, value, wide) in [
        (PML4_GPA + 8, 0x30_0000 | P | W, true), // table entry outside the pool
        (PML4_GPA + 8, FREE | P | W, false),     // partial (4-byte) write
        (FREE, 0x30_0000 | P, true),             // write into an untyped frame
        (PML4_GPA + 8, FREE | P | (1 << 52), true), // reserved bit
    ] {
        let r = trapped_store(gpa, value, wide);
        assert_eq!(r.exit_code, 0, "entry at {gpa:#x} unchanged");
        assert_eq!(r.stats.event("pte_rejected"), 1);
        assert_eq!(r.stats.event("pte_trapped"), 0);
    }
}

const UPDATES: u64 = 4096;

fn pagetable(mode: Mode, batch: u64) -> host_vmm::compare::Measured {
    let updates = format!("updates={UPDATES}");
    let batch = format!("batch={batch}");
    let args: Vec<&str> = match mode {
        Mode::Pv => vec![&updates, &batch],
        Mode::Trapped => vec![&updates],
    };
    let r = boot(mode, "pagetable", &args);
    assert_eq!(r.exit_code, 0, "{}", text(&r));
    r
}

#[test]
fn pagetable_workload_gives_the_same_checksum_both_ways() {
    let pv = pagetable(Mode::Pv, 512);
    let tr = pagetable(Mode::Trapped, 0);
    let (a, b) = (pv.result.unwrap(), tr.result.unwrap());
    assert_eq!(a.ops(), Some(UPDATES));
    assert_eq!(a.checksum(), b.checksum());
}

#[test]
fn pagetable_exit_counts_follow_the_mechanism() {
    // Trapped: at least one exit per PTE update, and every update was a trapped store.
    let tr = pagetable(Mode::Trapped, 0);
    let w = tr.window.as_ref().unwrap();
    assert!(w.exits.total >= UPDATES, "{}", w.exits.summary());
    assert!(
        w.exits.events["pte_trapped"] >= UPDATES,
        "{}",
        w.exits.summary()
    );
    assert_eq!(w.exits.reason(ExitReason::Hypercall), 0);
    // PV: at most updates/batch + a small constant (new tables, TLB flushes), none trapped.
    for batch in [8, 64, 512] {
        let pv = pagetable(Mode::Pv, batch);
        let w = pv.window.as_ref().unwrap();
        assert!(
            w.exits.total <= UPDATES.div_ceil(batch) + 16,
            "batch {batch}: {}",
            w.exits.summary()
        );
        assert!(w.exits.events["pte_pv"] >= UPDATES, "{}", w.exits.summary());
        assert_eq!(w.exits.event("pte_trapped"), 0);
        assert_eq!(w.exits.event("pte_rejected"), 0);
        // Full batches defer the host's shadow resync to the explicit flush before each TLB
        // invalidation: one per phase that changes present entries (remap, protect, unmap).
        assert!(w.exits.event("shadow_resync") <= 4, "{}", w.exits.summary());
    }
}

#[test]
fn native_tables_give_the_same_checksum_without_the_vmm() {
    let pv = pagetable(Mode::Pv, 512).result.unwrap();
    let tr = pagetable(Mode::Trapped, 0).result.unwrap();
    let updates = format!("updates={UPDATES}");
    for mode in [Mode::Trapped, Mode::Pv] {
        for root in ["root=boot", "root=new"] {
            let r = boot(mode, "pagetable", &[&updates, "tables=native", root]);
            assert_eq!(r.exit_code, 0, "{mode:?} {root}: {}", text(&r));
            let w = r.window.as_ref().unwrap();
            // No entry reaches the VMM: no trapped store, no mmu_update, no resync.
            for event in ["pte_trapped", "pte_pv", "pte_rejected", "shadow_resync"] {
                assert_eq!(w.exits.event(event), 0, "{event}: {}", w.exits.summary());
            }
            assert_eq!(
                w.exits.reason(ExitReason::Hypercall),
                0,
                "{}",
                w.exits.summary()
            );
            assert!(w.exits.total <= 16, "{}", w.exits.summary());
            let n = r.result.unwrap();
            assert_eq!(n.ops(), Some(UPDATES));
            assert_eq!(n.checksum(), pv.checksum(), "{mode:?} {root} vs pv");
            assert_eq!(n.checksum(), tr.checksum(), "{mode:?} {root} vs trapped");
        }
    }
}
