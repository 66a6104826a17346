//! Trapped means unmodified, the ABI note decides what a kernel is shown, and `--disable`d
//! features fall back to their trapped twins: purpose-built guests read CPUID and poke the
//! hypercall port; the demo kernel runs every workload with each feature turned off.

use host_vmm::Error;
use host_vmm::compare::Measured;
use host_vmm::config::{KernelImage, VmConfig};
use host_vmm::kernel_abi::AbiRefusal;
use host_vmm::loader::{minimal_elf, minimal_elf_with_note};
use hypercall_abi::features::{self, Names};
use hypercall_abi::note::AbiNote;
use hypercall_abi::{Call, Error as AbiError};
use tests::asm::{exit_with_eax, hypercall, mov_imm};
use tests::{Mode, boot_image, run_cfg};
use zerocopy::IntoBytes;

/// `mov eax, leaf; cpuid; mov eax, <reg>; exit` — the guest exits with one CPUID register.
fn cpuid_guest(leaf: u32, reg: &str) -> Vec<u8> {
    let mut c = mov_imm(0, u64::from(leaf));
    c.extend_from_slice(&[0x31, 0xc9]); // xor ecx, ecx
    c.extend_from_slice(&[0x0f, 0xa2]); // cpuid
    match reg {
        "eax" => {}
        "ebx" => c.extend_from_slice(&[0x89, 0xd8]), // mov eax, ebx
        "ecx" => c.extend_from_slice(&[0x89, 0xc8]), // mov eax, ecx
        _ => unreachable!(),
    }
    c.extend(exit_with_eax());
    c
}

fn le(s: &[u8; 4]) -> u32 {
    u32::from_le_bytes(*s)
}

#[test]
fn pv_mode_shows_pvkit_and_trapped_mode_hides_it() {
    let sig = |mode, img| boot_image(mode, img).expect("boots").exit_code;
    let img = || minimal_elf(0x20_0000, &cpuid_guest(0x4000_0000, "ebx"), 0x1000);
    assert_eq!(sig(Mode::Pv, img()), le(b"PVKI"));
    // Hidden: a plain KVM signature, as a stock KVM VMM shows an unmodified guest.
    assert_eq!(sig(Mode::Trapped, img()), le(b"KVMK"));
    // ... with no KVM paravirt feature, and the TSC rate in the standard timing leaf.
    let feats = minimal_elf(0x20_0000, &cpuid_guest(0x4000_0001, "eax"), 0x1000);
    assert_eq!(sig(Mode::Trapped, feats), 0);
    let timing = minimal_elf(0x20_0000, &cpuid_guest(0x4000_0010, "eax"), 0x1000);
    assert_ne!(
        sig(Mode::Trapped, timing),
        0,
        "KVM reports the TSC rate here"
    );
}

#[test]
fn a_hypercall_while_hidden_is_a_counted_guest_error() {
    let mut code = hypercall(u64::from(Call::Null.raw()), 7, 0);
    code.extend(exit_with_eax());
    // PV: served.
    let r = boot_image(Mode::Pv, minimal_elf(0x20_0000, &code, 0x1000)).unwrap();
    assert_eq!(r.exit_code, 0);
    assert_eq!(r.stats.by_hypercall.get("null"), Some(&1));
    // Trapped: a kernel that skipped detection is caught.
    let e = boot_image(Mode::Trapped, minimal_elf(0x20_0000, &code, 0x1000)).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::GuestFault { .. }), "{msg}");
    assert!(
        msg.contains("hypercall port 0x510") && msg.contains("--mode trapped"),
        "{msg}"
    );
    // A kernel without the pvkit note is an unmodified guest even in PV mode.
    let bare = minimal_elf_with_note(0x20_0000, &code, 0x1000, None);
    let e = boot_image(Mode::Pv, bare).unwrap_err().to_string();
    assert!(e.contains("no pvkit ABI note"), "{e}");
    let bare_sig = minimal_elf_with_note(0x20_0000, &cpuid_guest(0x4000_0000, "ebx"), 0x1000, None);
    assert_eq!(
        boot_image(Mode::Pv, bare_sig).unwrap().exit_code,
        le(b"KVMK")
    );
}

fn with_note(note: AbiNote) -> Vec<u8> {
    // `hlt` with interrupts off would be a fault: these kernels must never start.
    minimal_elf_with_note(0x20_0000, &[0xf4], 0x1000, Some(note.as_bytes()))
}

#[test]
fn the_note_refuses_kernels_before_boot() {
    let mut other = AbiNote::new(0);
    other.desc.abi_version = 2 << 16 | 3;
    let e = boot_image(Mode::Pv, with_note(other)).unwrap_err();
    assert!(
        matches!(
            e,
            Error::KernelRefused {
                source: AbiRefusal::OtherMajor { major: 2, minor: 3 },
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("ABI 2.3"), "{e}");

    let needs_mmu = with_note(AbiNote::new(features::MMU_UPDATE));
    let e = boot_image(Mode::Trapped, needs_mmu.clone())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("requires pvkit features mmu_update") && e.contains("--mode trapped"),
        "{e}"
    );
    let mut cfg = VmConfig::new(Mode::Pv, "hello");
    cfg.kernel = KernelImage {
        name: "needs-mmu".into(),
        bytes: needs_mmu.into(),
    };
    cfg.disable = features::MMU_UPDATE;
    let e = run_cfg(cfg).unwrap_err().to_string();
    assert!(e.contains("--disable"), "{e}");
    let unknown = with_note(AbiNote::new(1 << 50));
    let e = boot_image(Mode::Pv, unknown).unwrap_err().to_string();
    assert!(e.contains("bit50") && e.contains("does not offer"), "{e}");
}

#[test]
fn a_disabled_call_is_not_serviced() {
    let mut code = hypercall(u64::from(Call::Null.raw()), 7, 0);
    code.extend(exit_with_eax());
    let mut cfg = VmConfig::new(Mode::Pv, "hello");
    cfg.kernel = KernelImage {
        name: "null caller".into(),
        bytes: minimal_elf(0x20_0000, &code, 0x1000).into(),
    };
    cfg.disable = features::NULL;
    let r = run_cfg(cfg).unwrap();
    assert_eq!(u64::from(r.exit_code), AbiError::NotImplemented.code());
    // The feature leaf no longer has the bit.
    let mut cfg = VmConfig::new(Mode::Pv, "hello");
    cfg.kernel = KernelImage {
        name: "cpuid".into(),
        bytes: minimal_elf(0x20_0000, &cpuid_guest(0x4000_0001, "ebx"), 0x1000).into(),
    };
    cfg.disable = features::NULL | features::CONSOLE;
    let bits = u64::from(run_cfg(cfg).unwrap().exit_code);
    assert_eq!(bits & (features::NULL | features::CONSOLE), 0);
    assert_ne!(bits & features::EXIT, 0);
}

/// Runs the demo kernel with `disable` cleared.
fn demo(mode: Mode, disable: u64, workload: &str, args: &[&str]) -> Measured {
    let mut cfg = VmConfig::new(mode, workload);
    cfg.args = args.iter().map(|s| s.to_string()).collect();
    cfg.disable = disable;
    cfg.mem_size = 256 << 20;
    let r = run_cfg(cfg).unwrap_or_else(|e| panic!("{workload} without {}: {e}", Names(disable)));
    assert_eq!(
        r.exit_code,
        0,
        "{workload}: {}",
        String::from_utf8_lossy(&r.console)
    );
    r
}

#[test]
fn the_demo_kernel_never_makes_a_hypercall_in_trapped_mode() {
    for (w, args) in [
        ("hello", &[][..]),
        ("null", &["ops=100"][..]),
        ("console", &["bytes=300"][..]),
        ("pagetable", &["updates=64"][..]),
        ("idle", &["intervals=3", "interval_us=2000"][..]),
        ("zero", &["mib=8"][..]),
    ] {
        let r = demo(Mode::Trapped, 0, w, args);
        assert!(
            r.stats.by_hypercall.is_empty(),
            "{w}: {:?}",
            r.stats.by_hypercall
        );
        assert_eq!(r.result.as_ref().unwrap().get("mode"), Some("trapped"));
    }
}

#[test]
fn each_disabled_feature_falls_back_to_its_trapped_twin() {
    // (feature, calls that must not happen, workload, args)
    let cases: &[(u64, &[&str], &str, &[&str])] = &[
        (
            features::CONSOLE,
            &["console_write"],
            "console",
            &["bytes=300"],
        ),
        (features::CONSOLE, &["console_write"], "hello", &[]),
        (features::EXIT, &["exit"], "hello", &[]),
        (features::NULL, &["null"], "null", &["ops=100"]),
        (
            features::MMU_UPDATE,
            &["mmu_update", "mmu_pin"],
            "pagetable",
            &["updates=64"],
        ),
        (features::ZERO_HINTS, &["zero_hints"], "zero", &["mib=8"]),
        (
            features::IDLE_YIELD,
            &["idle_yield"],
            "idle",
            &["intervals=3", "interval_us=2000"],
        ),
        (
            features::CLOCK,
            &["clock_ns", "idle_yield"],
            "idle",
            &["intervals=3", "interval_us=2000"],
        ),
        (
            features::TSC_KHZ,
            &[],
            "idle",
            &["intervals=3", "interval_us=2000"],
        ),
        (features::ZERO_PREPARE, &[], "zero", &["mib=8"]),
    ];
    for &(bit, calls, w, args) in cases {
        let trapped = demo(Mode::Trapped, 0, w, args);
        let pv = demo(Mode::Pv, 0, w, args);
        let off = demo(Mode::Pv, bit, w, args);
        let sum = |r: &Measured| r.result.as_ref().and_then(|x| x.checksum());
        let what = format!("{w} without {}", Names(bit));
        assert!(sum(&trapped).is_some(), "{what}");
        assert_eq!(sum(&off), sum(&trapped), "{what}: checksum");
        assert_eq!(sum(&pv), sum(&trapped), "{what}: checksum");
        assert_eq!(
            off.result.as_ref().unwrap().get("mode"),
            Some("pv"),
            "{what}"
        );
        for call in calls {
            assert!(
                pv.stats.by_hypercall.contains_key(call) || *call == "mmu_pin",
                "{what}: PV uses {call}"
            );
            assert!(
                !off.stats.by_hypercall.contains_key(call),
                "{what}: {call} was called"
            );
        }
        // Nothing the host refused: the guest checked the bit instead of trying.
        assert!(!off.stats.by_hypercall.contains_key("invalid"), "{what}");
    }
    // The trapped twins really ran: the UART for the console, the timer for idle.
    let r = demo(Mode::Pv, features::CONSOLE, "hello", &[]);
    assert!(r.stats.by_device.get("uart").copied().unwrap_or(0) > 10);
    let r = demo(
        Mode::Pv,
        features::IDLE_YIELD,
        "idle",
        &["intervals=3", "interval_us=2000"],
    );
    assert_eq!(r.result.unwrap().get("strategy"), Some("hlt"));
    let r = demo(
        Mode::Pv,
        features::TSC_KHZ,
        "idle",
        &["intervals=3", "interval_us=2000"],
    );
    assert_eq!(r.result.unwrap().get("strategy"), Some("pv"));
}

#[test]
fn disabled_features_are_invisible_to_the_demo_kernel_result() {
    // Every feature off at once: a PV-mode VM whose guest uses only trapped paths.
    let all = features::NAMES.iter().fold(0, |a, (b, _)| a | b);
    let r = demo(Mode::Pv, all, "hello", &[]);
    assert!(
        r.stats.by_hypercall.is_empty(),
        "{:?}",
        r.stats.by_hypercall
    );
    let t = demo(Mode::Trapped, 0, "hello", &[]);
    assert_eq!(r.result.unwrap().checksum(), t.result.unwrap().checksum());
}
