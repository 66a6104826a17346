//! PVH boot under host-vmm: a kernel with only the PVH note (no pvkit ABI note) is entered in
//! 32-bit protected mode at its PVH entry with `rbx` = an `hvm_start_info`.

use host_vmm::config::{KernelImage, VmConfig};
use host_vmm::kernel::DEMO_KERNEL;
use host_vmm::loader::minimal_elf_with_note;
use hypercall_abi::note::AbiNote;
use hypercall_abi::pvh::PvhNote;
use tests::{Mode, boot, run_cfg, text};
use zerocopy::IntoBytes;

#[test]
fn a_pvh_only_kernel_gets_to_its_first_uart_output() {
    // 32-bit code: check the start info's magic at [ebx], print "P\n" on COM1, exit 0 (7 if
    // the magic is wrong).
    let code = [
        0x81, 0x3b, 0x78, 0xc5, 0x6e, 0x33, // cmpl $0x336ec578, (%ebx)
        0x75, 0x11, // jne fail
        0x66, 0xba, 0xf8, 0x03, // mov $0x3f8, %dx
        0xb0, b'P', 0xee, // mov $'P', %al; out %al, %dx
        0xb0, b'\n', 0xee, // mov $'\n', %al; out %al, %dx
        0x66, 0xba, 0x01, 0x05, // mov $0x501, %dx
        0x31, 0xc0, 0xef, // xor %eax, %eax; out %eax, %dx
        // fail:
        0x66, 0xba, 0x01, 0x05, // mov $0x501, %dx
        0xb8, 7, 0, 0, 0, 0xef, // mov $7, %eax; out %eax, %dx
    ];
    let note = PvhNote::new(0x20_0000);
    let img = minimal_elf_with_note(0x20_0000, &code, 0x1000, Some(note.as_bytes()));
    let r = tests::boot_image(Mode::Pv, img).expect("the PVH kernel boots");
    assert_eq!(r.exit_code, 0, "{}", text(&r));
    assert_eq!(text(&r), "P\n");
}

/// The demo kernel without its pvkit note: host-vmm enters it by PVH, its own 32-bit entry
/// builds page tables and enters long mode, and the boot info comes from the start info.
fn demo_kernel_pvh_only() -> Vec<u8> {
    let mut img = DEMO_KERNEL.to_vec();
    let note = AbiNote::new(0);
    let at = img
        .windows(note.as_bytes().len())
        .position(|w| w == note.as_bytes())
        .expect("the demo kernel carries pvkit's ABI note");
    // n_type 1 -> 0x7f: an unknown note, so the kernel is "unmarked".
    img[at + 8] = 0x7f;
    assert!(host_vmm::pvh::entry(&img).is_some());
    assert!(
        host_vmm::pvh::entry(DEMO_KERNEL).is_none(),
        "direct entry stays the default"
    );
    img
}

#[test]
fn the_demo_kernel_booted_by_pvh_gives_the_trapped_checksums() {
    let img = demo_kernel_pvh_only();
    for (workload, args) in [
        ("hello", vec![]),
        ("console", vec!["bytes=2000"]),
        ("null", vec!["ops=500"]),
        ("cpl3", vec![]),
    ] {
        let direct = boot(Mode::Trapped, workload, &args);
        let mut cfg = VmConfig::new(Mode::Pv, workload);
        cfg.args = args.iter().map(|s| s.to_string()).collect();
        cfg.kernel = KernelImage {
            name: "demo kernel without its pvkit note".into(),
            bytes: img.clone().into(),
        };
        let pvh = run_cfg(cfg).expect("boots by PVH");
        assert_eq!(pvh.exit_code, 0, "{workload}: {}", text(&pvh));
        let (a, b) = (direct.result.as_ref(), pvh.result.as_ref());
        let (a, b) = (a.expect("direct result"), b.expect("PVH result"));
        assert_eq!(b.get("mode"), Some("trapped"), "{workload}");
        assert_eq!(a.checksum(), b.checksum(), "{workload}: {}", text(&pvh));
    }
}
