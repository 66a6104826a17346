//! Pre-zeroed page hints under real KVM: the host's view of guest memory (what is resident)
//! and the `zero` workload's accounting, PV against trapped.

use host_vmm::loader::minimal_elf;
use hypercall_abi::zero::{PREPARE, QUERY, RELEASE, ZeroRange};
use hypercall_abi::{Call, Error};
use tests::asm::{PACK_STATUS_AND_VALUE, exit_with_eax, mov_imm};
use tests::{Mode, boot, boot_image, text};

const KERNEL: u64 = 0x20_0000;
const MEM: u64 = 128 << 20;

/// A guest that issues one `zero_hints(op, a1, a2, a3)` and exits with its status.
fn zero_call(op: u64, a1: u64, a2: u64, a3: u64, data: &[ZeroRange]) -> u64 {
    // rax = call, rdi = op, rsi = a1, rcx = a2, r8 = a3
    let mut code = mov_imm(0, u64::from(Call::ZeroHints.raw()));
    code.extend(mov_imm(7, op));
    code.extend(mov_imm(6, a1));
    code.extend(mov_imm(1, a2));
    code.extend([0x49, 0xb8]); // mov r8, imm64
    code.extend(a3.to_le_bytes());
    code.extend([0x66, 0xba]);
    code.extend(hypercall_abi::HYPERCALL_PORT.to_le_bytes());
    code.push(0xef);
    code.extend(PACK_STATUS_AND_VALUE);
    code.extend(exit_with_eax());
    code.resize(0x800, 0xf4);
    for r in data {
        code.extend(r.start.to_le_bytes());
        code.extend(r.len.to_le_bytes());
    }
    let r = boot_image(Mode::Pv, minimal_elf(KERNEL, &code, 0x1000)).expect("host keeps running");
    u64::from(r.exit_code & 0xff)
}

const LIST: u64 = KERNEL + 0x800;

#[test]
fn release_refuses_ranges_outside_ram_or_over_the_kernel() {
    for (range, err) in [
        (
            ZeroRange {
                start: MEM - 4096,
                len: 8192,
            },
            Error::BadAddress,
        ),
        (
            ZeroRange {
                start: 0xC000_0000,
                len: 4096,
            },
            Error::BadAddress,
        ),
        (
            ZeroRange {
                start: KERNEL,
                len: 4096,
            },
            Error::Denied,
        ),
        (
            ZeroRange {
                start: 0x1000,
                len: 4096,
            },
            Error::Denied,
        ),
        (
            ZeroRange {
                start: 0x80_0100,
                len: 4096,
            },
            Error::InvalidArgument,
        ),
    ] {
        assert_eq!(
            zero_call(RELEASE, LIST, 1, 0, &[range]),
            err.code(),
            "{range:?}"
        );
    }
    let ok = ZeroRange {
        start: 0x80_0000,
        len: 0x10_0000,
    };
    assert_eq!(zero_call(RELEASE, LIST, 1, 0, &[ok]), 0);
}

#[test]
fn query_refuses_bitmaps_and_frames_outside_ram() {
    assert_eq!(zero_call(QUERY, MEM, 0, 8, &[]), Error::BadAddress.code());
    assert_eq!(
        zero_call(QUERY, 0x80_0000, MEM / 4096, 8, &[]),
        Error::BadAddress.code()
    );
    assert_eq!(zero_call(QUERY, 0x80_0000, 0x900, 64, &[]), 0);
}

#[test]
fn prepare_refuses_ranges_outside_ram_or_over_the_kernel() {
    for (gpa, len, err) in [
        (MEM - 4096, 8192, Error::BadAddress),
        (0xC000_0000, 4096, Error::BadAddress),
        (u64::MAX - 4095, 4096, Error::BadAddress),
        (KERNEL, 4096, Error::Denied),
        (0x80_0100, 4096, Error::InvalidArgument),
        (0x80_0000, 100, Error::InvalidArgument),
    ] {
        assert_eq!(
            zero_call(PREPARE, gpa, len, 0, &[]),
            err.code(),
            "{gpa:#x}+{len:#x}"
        );
    }
    assert_eq!(zero_call(PREPARE, 0x80_0000, 0x40_0000, 0, &[]), 0);
}

const MIB: u64 = 32;

fn zero_run(mode: Mode, check: bool) -> host_vmm::compare::Measured {
    zero_run_with(mode, check, &[])
}

/// A `zero` run of `MIB` MiB with more arguments; it must exit with 0.
fn zero_run_with(mode: Mode, check: bool, extra: &[&str]) -> host_vmm::compare::Measured {
    let mib = format!("mib={MIB}");
    let check = format!("check={}", u8::from(check));
    let mut args = vec![mib.as_str(), check.as_str()];
    args.extend_from_slice(extra);
    let r = boot(mode, "zero", &args);
    assert_eq!(r.exit_code, 0, "{}", text(&r));
    r
}

fn field(r: &host_vmm::compare::Measured, k: &str) -> u64 {
    r.result
        .as_ref()
        .unwrap()
        .get(k)
        .unwrap_or_else(|| panic!("no {k}"))
        .parse()
        .unwrap()
}

#[test]
fn zero_gives_the_same_checksum_and_pv_skips_the_zeroing() {
    // check=1: the guest verifies that every frame it did not zero reads as zero.
    let pv = zero_run(Mode::Pv, true);
    let tr = zero_run(Mode::Trapped, true);
    assert_eq!(
        pv.result.as_ref().unwrap().checksum(),
        tr.result.as_ref().unwrap().checksum()
    );
    let fresh_tr = field(&tr, "zeroed_fresh_bytes");
    assert!(
        fresh_tr >= MIB << 20,
        "trapped zeroes every fresh frame: {fresh_tr}"
    );
    assert!(
        field(&pv, "zeroed_fresh_bytes") * 20 <= fresh_tr,
        "PV <= 5% of trapped"
    );
    assert!(field(&pv, "guest_zeroed_bytes") * 20 <= field(&tr, "guest_zeroed_bytes"));
    // Only PV reports frees.
    assert_eq!(tr.stats.event("released_bytes"), 0);
    assert_eq!(tr.stats.by_hypercall.len(), 0);
}

#[test]
fn released_memory_goes_back_to_the_host() {
    let pv = zero_run(Mode::Pv, false);
    let w = pv.window.as_ref().unwrap();
    let released = w.exits.event("released_bytes");
    assert!(released >= MIB << 20, "{}", w.exits.summary());
    let [_, touched, after_release, _] = w.resident_bytes[..] else {
        panic!("expected begin, 2 checkpoints, end: {:?}", w.resident_bytes)
    };
    let drop = touched.saturating_sub(after_release);
    assert!(
        drop * 10 >= released * 9,
        "RSS dropped {drop} of {released} released bytes"
    );
    // Releases are batched and read-ahead goes by chunks: far fewer calls than pages.
    let calls = w.exits.by_hypercall.get("zero_hints").copied().unwrap_or(0);
    assert!(
        calls <= (MIB << 20) / (2 << 20) * 2 + 16,
        "{}",
        w.exits.summary()
    );
}

#[test]
fn read_ahead_backs_memory_off_the_vcpu_without_changing_results() {
    // Read-ahead is on by default where the host offers it (pvkit's hosts do); the RSS drop
    // above is measured with it on, so a prepare never re-backs released memory.
    let on = zero_run(Mode::Pv, true);
    let off = zero_run_with(Mode::Pv, true, &["prepare=0"]);
    assert_eq!(
        on.result.as_ref().unwrap().checksum(),
        off.result.as_ref().unwrap().checksum()
    );
    // Fresh frames and released frames are both read ahead: about 2 × MIB, in chunks.
    let prepared = field(&on, "prepared_bytes");
    assert!(prepared >= (2 * MIB - 1) << 20, "prepared {prepared}");
    assert!(field(&on, "prepare_calls") <= 2 * MIB / 16 + 4);
    let w = on.window.as_ref().unwrap();
    assert_eq!(w.exits.event("prepare_queued_bytes"), prepared);
    // How much the host's thread populated inside the window depends on scheduling (it runs
    // beside the vCPU), so it is not asserted here; host-vmm's unit tests wait for it and
    // check that prepared frames are backed and unchanged.
    assert_eq!(field(&off, "prepare_calls"), 0);
    assert_eq!(off.window.as_ref().unwrap().prepared_bytes, 0);
    // Guest zeroing is the same with or without read-ahead: none.
    assert_eq!(field(&on, "guest_zeroed_bytes"), 0);
    assert_eq!(field(&off, "guest_zeroed_bytes"), 0);
}
