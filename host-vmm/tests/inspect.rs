//! `host-vmm inspect` and `run --disable` as a user meets them: what a kernel is, whether it
//! will boot, and one readable line when it will not.

mod common;

use common::host_vmm;

use std::process::Output;

use host_vmm::loader::{minimal_elf, minimal_elf_with_note};
use hypercall_abi::features;
use hypercall_abi::note::AbiNote;
use zerocopy::IntoBytes;

fn temp_kernel(name: &str, bytes: &[u8]) -> String {
    let dir = std::env::temp_dir().join(format!("pvkit-inspect-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p.display().to_string()
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn inspect_describes_the_demo_kernel() {
    let o = host_vmm(&["inspect"]);
    let text = out(&o);
    assert_eq!(o.status.code(), Some(0), "{text}");
    assert!(text.contains("entry: 0x200000"), "{text}");
    assert!(text.contains("LOAD") && text.contains("NOTE"), "{text}");
    assert!(
        text.contains("pvkit note: built against ABI 1.8, requires none"),
        "{text}"
    );
    assert!(text.contains("will boot: yes (--mode pv"), "{text}");
    let o = host_vmm(&["inspect", "--mode", "trapped"]);
    assert!(out(&o).contains("as an unmodified guest, pvkit hidden (--mode trapped)"));
}

#[test]
fn inspect_says_why_a_kernel_will_not_boot() {
    let mut other = AbiNote::new(0);
    other.desc.abi_version = 2 << 16;
    let k = temp_kernel(
        "v2",
        &minimal_elf_with_note(0x20_0000, &[0xf4], 0x1000, Some(other.as_bytes())),
    );
    let o = host_vmm(&["inspect", &k]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        out(&o).contains("will boot: no: it was built against pvkit ABI 2.0"),
        "{}",
        out(&o)
    );
    // `run` refuses it before boot with one line.
    let o = host_vmm(&["run", &k]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(125), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("cannot boot here: it was built against pvkit ABI 2.0"),
        "{err}"
    );

    let needs = AbiNote::new(features::ZERO_HINTS);
    let k = temp_kernel(
        "needs",
        &minimal_elf_with_note(0x20_0000, &[0xf4], 0x1000, Some(needs.as_bytes())),
    );
    let o = host_vmm(&["inspect", &k, "--disable", "zero-hints"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(out(&o).contains("requires pvkit features zero_hints, which --disable"));
    let o = host_vmm(&["inspect", &k]);
    assert!(out(&o).contains("pvkit note: built against ABI 1.8, requires zero_hints"));

    let bare = temp_kernel(
        "bare",
        &minimal_elf_with_note(0x20_0000, &[0xf4], 0x1000, None),
    );
    let o = host_vmm(&["inspect", &bare]);
    assert_eq!(o.status.code(), Some(0));
    assert!(out(&o).contains("pvkit note: none"));
    assert!(out(&o).contains("no pvkit ABI note"));

    let junk = temp_kernel("junk", &[b'x'; 200]);
    let o = host_vmm(&["inspect", &junk]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        out(&o).contains("will boot: no: not an ELF file"),
        "{}",
        out(&o)
    );
    let o = host_vmm(&["inspect", "/nonexistent/kernel"]);
    assert_eq!(o.status.code(), Some(125));
}

#[test]
fn run_without_a_note_says_it_boots_an_unmodified_guest() {
    // `out dx, eax` to the exit port with eax = 0 after `xor eax, eax`.
    let code = [0x31, 0xc0, 0x66, 0xba, 0x01, 0x05, 0xef];
    let bare = temp_kernel(
        "bare-exit",
        &minimal_elf_with_note(0x20_0000, &code, 0x1000, None),
    );
    let o = host_vmm(&["run", &bare]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(
        err.contains("has no pvkit ABI note; booting it as an unmodified guest"),
        "{err}"
    );
    let marked = temp_kernel("marked-exit", &minimal_elf(0x20_0000, &code, 0x1000));
    let o = host_vmm(&["run", &marked]);
    assert_eq!(o.status.code(), Some(0));
    assert!(
        o.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn disable_takes_feature_names_only() {
    let o = host_vmm(&["run", "--disable", "console,warp-drive"]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("unknown feature (known: console, exit"),
        "{err}"
    );
    let o = host_vmm(&["run", "--disable", "console,exit", "--stats"]);
    assert_eq!(o.status.code(), Some(0));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("hypercalls: -"), "{err}");
    assert!(out(&o).contains("mode=pv"));
}
