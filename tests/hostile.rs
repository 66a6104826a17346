//! Hostile guests: purpose-built machine code that makes malformed hypercalls and touches
//! memory outside RAM. The host must answer with error codes, keep running, and never touch
//! memory outside guest RAM.

use host_vmm::loader::minimal_elf;
use host_vmm::metrics::ExitReason;
use hypercall_abi::{CONSOLE_WRITE_MAX, Call, Error};
use tests::asm::{exit_with_eax, hypercall};
use tests::{Mode, boot_image};

const MEM: u64 = 128 << 20;

/// Runs one hypercall and exits with its status; returns (exit code, report).
fn status_of(nr: u64, a0: u64, a1: u64) -> (u32, host_vmm::compare::Measured) {
    let mut code = hypercall(nr, a0, a1);
    code.extend(exit_with_eax());
    let r = boot_image(Mode::Pv, minimal_elf(0x20_0000, &code, 0x1000)).expect("VMM keeps running");
    (r.exit_code, r)
}

#[test]
fn console_write_outside_ram_is_bad_address() {
    let console = u64::from(Call::ConsoleWrite.raw());
    for (gpa, len) in [(MEM, 1), (MEM - 8, 16), (u64::MAX - 1, 4), (0xC000_0000, 8)] {
        let (code, r) = status_of(console, gpa, len);
        assert_eq!(
            u64::from(code),
            Error::BadAddress.code(),
            "gpa {gpa:#x} len {len}"
        );
        assert!(r.console.is_empty(), "nothing may be printed");
    }
}

#[test]
fn oversize_console_write_is_too_large() {
    let console = u64::from(Call::ConsoleWrite.raw());
    for len in [CONSOLE_WRITE_MAX + 1, u64::MAX] {
        assert_eq!(
            u64::from(status_of(console, 0x20_0000, len).0),
            Error::TooLarge.code()
        );
    }
}

#[test]
fn unknown_reserved_and_malformed_calls_return_errors() {
    assert_eq!(u64::from(status_of(999, 0, 0).0), Error::UnknownCall.code());
    assert_eq!(
        u64::from(status_of(u64::MAX, 0, 0).0),
        Error::UnknownCall.code()
    );
    // A call with an unknown operation is malformed, not unknown.
    let (code, r) = status_of(u64::from(Call::ZeroHints.raw()), 99, 0);
    assert_eq!(u64::from(code), Error::InvalidArgument.code());
    assert_eq!(r.stats.by_hypercall["zero_hints"], 1);
    let (code, _) = status_of(u64::from(Call::Exit.raw()), 1 << 32, 0);
    assert_eq!(u64::from(code), Error::InvalidArgument.code());
}

#[test]
fn a_valid_call_after_bad_ones_still_works() {
    let console = u64::from(Call::ConsoleWrite.raw());
    // The message lives right after the code, inside the loaded segment.
    let msg = b"still alive\n";
    let mut code = hypercall(console, MEM, 1);
    code.extend(hypercall(999, 0, 0));
    let len_before_msg_call = code.len() + hypercall(0, 0, 0).len() + exit_with_eax().len();
    let msg_gpa = 0x20_0000 + len_before_msg_call as u64;
    code.extend(hypercall(console, msg_gpa, msg.len() as u64));
    code.extend(exit_with_eax());
    code.extend_from_slice(msg);
    let r = boot_image(Mode::Pv, minimal_elf(0x20_0000, &code, 0x1000)).unwrap();
    assert_eq!(r.exit_code, 0, "status of the valid call");
    assert_eq!(r.console, msg);
    assert_eq!(r.stats.reason(ExitReason::Hypercall), 3);
}

#[test]
fn memory_beyond_ram_reads_all_ones_and_ignores_writes() {
    // mov rbx, 0xD000_0000; mov [rbx], eax; mov eax, [rbx]; exit(eax)
    let mut code = vec![0x48, 0xbb];
    code.extend_from_slice(&0xD000_0000u64.to_le_bytes());
    code.extend_from_slice(&[0x89, 0x03, 0x8b, 0x03]);
    code.extend(exit_with_eax());
    let r = boot_image(Mode::Trapped, minimal_elf(0x20_0000, &code, 0x1000)).unwrap();
    assert_eq!(r.exit_code, u32::MAX);
    assert_eq!(r.stats.reason(ExitReason::Mmio), 2);
}

#[test]
fn malformed_mmu_pin_calls_get_their_error_codes() {
    use hypercall_abi::layout::{PML4_GPA, PT_POOL_GPA};
    use hypercall_abi::mmu::{PIN_L4, UNPIN};
    let pin = u64::from(Call::MmuPin.raw());
    for (op, frame, err) in [
        (0, PT_POOL_GPA + 0x10_0000, Error::InvalidArgument),
        (3, PT_POOL_GPA + 0x10_0000, Error::InvalidArgument),
        (u64::MAX, PT_POOL_GPA + 0x10_0000, Error::InvalidArgument),
        (PIN_L4, PT_POOL_GPA + 8, Error::InvalidArgument),
        (PIN_L4, 0x30_0000, Error::BadAddress),
        (UNPIN, PT_POOL_GPA + 0x10_0000, Error::TypeConflict),
        (UNPIN, PML4_GPA, Error::Denied),
    ] {
        let (code, r) = status_of(pin, op, frame);
        assert_eq!(u64::from(code), err.code(), "op {op} frame {frame:#x}");
        assert_eq!(r.stats.by_hypercall["mmu_pin"], 1);
    }
}

/// A minimal kernel whose PT_NOTE header (index 1) is turned into a PT_LOAD with one file
/// byte and `p_memsz = 0`, at `paddr`.
fn memsz_zero_elf(paddr: u64) -> Vec<u8> {
    let mut img = minimal_elf(0x20_0000, &[0xf4], 0x1000);
    let ph = &mut img[64 + 56..64 + 112];
    ph[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    ph[8..16].copy_from_slice(&0x1000u64.to_le_bytes());
    ph[16..24].copy_from_slice(&paddr.to_le_bytes());
    ph[24..32].copy_from_slice(&paddr.to_le_bytes());
    ph[32..40].copy_from_slice(&1u64.to_le_bytes());
    ph[40..48].copy_from_slice(&0u64.to_le_bytes());
    img
}

/// Issue 13, finding 3: a segment with `p_memsz = 0` but file bytes (below the 2 MiB floor, or
/// past the kernel's end) used to skip validation and still be loaded; a debug build (which
/// this test is, by default) failed a `debug_assert!`. It is now refused before boot with a
/// clear error, in both modes.
#[test]
fn an_elf_segment_with_memsz_zero_is_refused_before_boot() {
    for paddr in [0x1000, 0x40_0000] {
        for mode in [Mode::Pv, Mode::Trapped] {
            let err = boot_image(mode, memsz_zero_elf(paddr))
                .map(|r| r.exit_code)
                .expect_err("must not boot");
            let msg = err.to_string();
            assert!(
                matches!(
                    err,
                    host_vmm::Error::Elf {
                        source: host_vmm::loader::ElfError::FileSizeExceedsMemSize(1),
                        ..
                    }
                ),
                "{msg}"
            );
            assert!(
                msg.contains("segment 1: file size exceeds memory size"),
                "{msg}"
            );
        }
    }
}

/// Issue 13, finding 4: a 4 KiB leaf with PAT (bit 7 of an L1 entry) set is a valid entry, not
/// a 2 MiB page: a PV guest's `mmu_update` applies it.
#[test]
fn a_4k_leaf_with_pat_set_is_accepted() {
    use hypercall_abi::layout::{PT_POOL_BOOT_FRAMES, PT_POOL_GPA};
    use hypercall_abi::mmu::{MmuUpdate, PIN_L4, PTE_PAT, PTE_PRESENT, PTE_USER, PTE_WRITABLE};
    use tests::asm::PACK_STATUS_AND_VALUE;
    let free = PT_POOL_GPA + PT_POOL_BOOT_FRAMES * 4096;
    let (l3, l2, l1) = (free + 0x1000, free + 0x2000, free + 0x3000);
    let t = PTE_PRESENT | PTE_WRITABLE | PTE_USER;
    let batch = [
        MmuUpdate {
            pte_gpa: free + 8,
            value: l3 | t,
        },
        MmuUpdate {
            pte_gpa: l3,
            value: l2 | t,
        },
        MmuUpdate {
            pte_gpa: l2,
            value: l1 | t,
        },
        MmuUpdate {
            pte_gpa: l1,
            value: 0x30_1000 | t | PTE_PAT,
        },
    ];
    let data_gpa = 0x20_0800;
    let mut code = hypercall(u64::from(Call::MmuPin.raw()), PIN_L4, free);
    code.extend(hypercall(
        u64::from(Call::MmuUpdate.raw()),
        data_gpa,
        batch.len() as u64,
    ));
    code.extend(PACK_STATUS_AND_VALUE);
    code.extend(exit_with_eax());
    code.resize(0x800, 0xf4);
    for e in batch {
        code.extend(e.pte_gpa.to_le_bytes());
        code.extend(e.value.to_le_bytes());
    }
    let r = boot_image(Mode::Pv, minimal_elf(0x20_0000, &code, 0x1000)).unwrap();
    assert_eq!(r.exit_code, 4 << 8, "status 0, all four entries applied");
    assert_eq!(r.stats.event("pte_rejected"), 0);
}

/// Issue 13, finding 5: a guest pinning one root in a loop gets `TOO_LARGE` after `PIN_MAX`
/// pins (the count never wraps) and keeps running.
#[test]
fn pinning_a_root_forever_stops_at_the_limit() {
    use hypercall_abi::layout::{PT_POOL_BOOT_FRAMES, PT_POOL_GPA};
    use hypercall_abi::mmu::{PIN_L4, PIN_MAX};
    let free = PT_POOL_GPA + PT_POOL_BOOT_FRAMES * 4096;
    // rbx = 0; loop: pin; if status != 0 goto done; rbx += 1; goto loop;
    // done: exit(status | rbx << 8)
    let mut code = tests::asm::mov_imm(3, 0);
    let call = hypercall(u64::from(Call::MmuPin.raw()), PIN_L4, free);
    let body = call.len() + 3 + 2 + 3 + 2;
    code.extend(&call);
    code.extend([0x48, 0x85, 0xc0]); // test rax, rax
    code.extend([0x75, 5]); // jnz done
    code.extend([0x48, 0xff, 0xc3]); // inc rbx
    code.extend([0xeb, (-(body as i8)) as u8]); // jmp loop
    code.extend([0x48, 0xc1, 0xe3, 0x08]); // done: shl rbx, 8
    code.extend([0x48, 0x09, 0xd8]); // or rax, rbx
    code.extend(exit_with_eax());
    let r = boot_image(Mode::Pv, minimal_elf(0x20_0000, &code, 0x1000)).unwrap();
    assert_eq!(r.exit_code & 0xff, Error::TooLarge.code() as u32);
    assert_eq!(
        r.exit_code >> 8,
        PIN_MAX,
        "pins accepted before the refusal"
    );
    assert_eq!(r.stats.by_hypercall["mmu_pin"], u64::from(PIN_MAX) + 1);
}

/// Issue 13, finding 5: every trapped store that changes a present entry makes the host resync
/// KVM's shadow of the tables (a pool memory-slot delete and re-add). That is at most one per
/// exit and costs only this VM's own vCPU time; this guest forces it on every exit and is
/// compared with one making the same number of stores that change nothing.
#[test]
fn resyncs_forced_by_a_guest_are_one_per_exit_at_most() {
    use hypercall_abi::layout::PD_GPA;
    use hypercall_abi::mmu::{PTE_HUGE, PTE_PRESENT, PTE_USER, PTE_WRITABLE};
    const N: u64 = 2000;
    // PD 0, entry 32: the boot identity map's 2 MiB page at 64 MiB (nothing uses it).
    let pte = PD_GPA + 32 * 8;
    let page = 0x400_0000 | PTE_PRESENT | PTE_USER | PTE_HUGE;
    let guest = |a: u64, b: u64| {
        let mut code = tests::asm::mov_imm(3, pte);
        code.extend(tests::asm::mov_imm(1, N));
        code.extend(tests::asm::mov_imm(6, a));
        code.extend(tests::asm::mov_imm(7, b));
        code.extend([0x48, 0x89, 0x33]); // loop: mov [rbx], rsi
        code.extend([0x48, 0x89, 0x3b]); // mov [rbx], rdi
        code.extend([0x48, 0xff, 0xc9]); // dec rcx
        code.extend([0x75, 0xf5]); // jnz loop
        code.extend([0x31, 0xc0]); // xor eax, eax
        code.extend(exit_with_eax());
        minimal_elf(0x20_0000, &code, 0x1000)
    };
    let run = |img: Vec<u8>| {
        let t = std::time::Instant::now();
        let r = boot_image(Mode::Trapped, img).unwrap();
        (r, t.elapsed())
    };
    // Same value twice (the boot entry's, so nothing changes): no resync.
    let (same, t_same) = run(guest(page | PTE_WRITABLE, page | PTE_WRITABLE));
    // Writable, read-only, writable, …: every store changes a present entry.
    let (toggle, t_toggle) = run(guest(page, page | PTE_WRITABLE));
    for r in [&same, &toggle] {
        assert_eq!(r.exit_code, 0);
        assert_eq!(r.stats.event("pte_trapped"), 2 * N);
    }
    assert_eq!(same.stats.event("shadow_resync"), 0);
    assert_eq!(toggle.stats.event("shadow_resync"), 2 * N, "one per exit");
    let per = t_toggle.saturating_sub(t_same) / (2 * N) as u32;
    eprintln!(
        "{} stores: {t_same:?} without resync, {t_toggle:?} with one resync per store \
         (≈ {per:?} per resync)",
        2 * N
    );
}
