//! The vertical slice: the demo kernel boots in 64-bit mode in both modes, greets, reports,
//! exits; trapped mode uses no hypercall; guest failures surface cleanly.

use host_vmm::metrics::ExitReason;
use tests::{Mode, boot, boot_image, fnv1a, text};

const GREETING: &str = "pvkit demo kernel: hello from 64-bit long mode";

#[test]
fn hello_boots_in_both_modes_with_the_same_checksum() {
    let pv = boot(Mode::Pv, "hello", &[]);
    let tr = boot(Mode::Trapped, "hello", &[]);
    for (r, mode) in [(&pv, "pv"), (&tr, "trapped")] {
        assert_eq!(r.exit_code, 0, "{}", text(r));
        assert!(text(r).starts_with(GREETING), "{}", text(r));
        let res = r.result.as_ref().expect("result line");
        assert_eq!(res.get("workload"), Some("hello"));
        assert_eq!(res.get("mode"), Some(mode));
    }
    assert_eq!(
        pv.result.as_ref().unwrap().checksum(),
        tr.result.as_ref().unwrap().checksum()
    );
}

#[test]
fn hello_checksum_is_the_greeting_line() {
    let r = boot(Mode::Trapped, "hello", &[]);
    let line = text(&r).lines().next().unwrap().to_string() + "\n";
    let sum = r.result.as_ref().unwrap().checksum().unwrap();
    assert!(
        sum == fnv1a(line.bytes()) || sum == fnv1a(line.trim_end().bytes()),
        "checksum of {line:?}"
    );
}

#[test]
fn trapped_mode_issues_no_hypercall_and_pv_mode_does() {
    let tr = boot(Mode::Trapped, "hello", &[]);
    assert_eq!(
        tr.stats.reason(ExitReason::Hypercall),
        0,
        "{}",
        tr.stats.summary()
    );
    assert!(tr.stats.by_hypercall.is_empty());
    assert!(tr.stats.by_device["uart"] > 0);
    assert_eq!(tr.stats.by_device["exit"], 1);

    let pv = boot(Mode::Pv, "hello", &[]);
    assert!(
        pv.stats.by_hypercall["console_write"] >= 1,
        "{}",
        pv.stats.summary()
    );
    assert_eq!(pv.stats.by_hypercall["exit"], 1);
    assert!(
        !pv.stats.by_device.contains_key("uart"),
        "{}",
        pv.stats.summary()
    );
}

#[test]
fn guest_panic_prints_the_message_and_exits_non_zero() {
    for mode in [Mode::Pv, Mode::Trapped] {
        let r = boot(mode, "panic", &[]);
        assert_eq!(r.exit_code, 101, "{}", text(&r));
        assert!(text(&r).contains("PVKIT-PANIC"), "{}", text(&r));
        assert!(r.result.is_none());
    }
}

#[test]
fn unknown_workload_and_bad_args_exit_2_with_a_message() {
    let r = boot(Mode::Pv, "no-such-workload", &[]);
    assert_eq!(r.exit_code, 2);
    assert!(
        text(&r).contains("unknown workload 'no-such-workload'"),
        "{}",
        text(&r)
    );
    let r = boot(Mode::Trapped, "null", &["ops=lots"]);
    assert_eq!(r.exit_code, 2);
    assert!(text(&r).contains("error:"), "{}", text(&r));
    let r = boot(Mode::Trapped, "null", &["colour=blue"]);
    assert_eq!(r.exit_code, 2);
}

#[test]
fn triple_fault_is_an_error_naming_the_exit_and_rip() {
    // ud2 with no IDT: #UD -> #DF -> triple fault.
    let img = host_vmm::loader::minimal_elf(0x20_0000, &[0x0f, 0x0b], 0x1000);
    let e = boot_image(Mode::Trapped, img).unwrap_err().to_string();
    assert!(
        e.contains("triple fault") && e.contains("KVM_EXIT_SHUTDOWN"),
        "{e}"
    );
    assert!(e.contains("RIP 0x"), "{e}");
}

#[test]
fn halting_forever_is_an_error_not_a_hang() {
    let img = host_vmm::loader::minimal_elf(0x20_0000, &[0xf4], 0x1000);
    let e = boot_image(Mode::Trapped, img).unwrap_err().to_string();
    assert!(
        e.contains("KVM_EXIT_HLT") && e.contains("RIP 0x200001"),
        "{e}"
    );
}

#[test]
fn a_minimal_guest_can_exit_through_the_exit_port() {
    // mov eax, 7; mov dx, EXIT_PORT; out dx, eax
    let port = hypercall_abi::ports::EXIT_PORT.to_le_bytes();
    let code = [0xb8, 7, 0, 0, 0, 0x66, 0xba, port[0], port[1], 0xef];
    let r = boot_image(
        Mode::Trapped,
        host_vmm::loader::minimal_elf(0x20_0000, &code, 0x1000),
    )
    .unwrap();
    assert_eq!(r.exit_code, 7);
    assert_eq!(r.stats.total, 1);
}
