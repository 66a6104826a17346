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
