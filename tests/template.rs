//! The kernel template works as the guide says: copied outside the repository, pointed at this
//! checkout's guest-pv, built with plain `cargo build --release`, it boots under host-vmm in
//! both modes — hypercalls in PV mode, none in trapped mode, the same result line.

use std::path::Path;

use host_vmm::compare::Measured;
use host_vmm::config::{KernelImage, VmConfig};
use tests::{Mode, build_template_copy, run_cfg, text};

fn boot(kernel: &Path, mode: Mode) -> Measured {
    let mut cfg = VmConfig::new(mode, "");
    cfg.kernel = KernelImage::from_file(kernel).unwrap();
    let r = run_cfg(cfg).unwrap_or_else(|e| panic!("template kernel ({}): {e}", mode.name()));
    assert_eq!(r.exit_code, 0, "{}", text(&r));
    r
}

fn result_line(r: &Measured) -> String {
    text(r)
        .lines()
        .find(|l| l.starts_with("RESULT "))
        .unwrap_or_else(|| panic!("no RESULT line in {}", text(r)))
        .to_string()
}

#[test]
fn the_template_builds_outside_the_repo_and_boots_in_both_modes() {
    tests::require_kvm();
    let kernel = build_template_copy();
    let pv = boot(&kernel, Mode::Pv);
    let trapped = boot(&kernel, Mode::Trapped);
    assert!(text(&pv).contains("pv mode"), "{}", text(&pv));
    assert!(text(&trapped).contains("trapped mode, pvkit features: none"));
    assert_eq!(result_line(&pv), result_line(&trapped));
    // PV: every mechanism of the template went through a hypercall.
    for call in [
        "console_write",
        "clock_ns",
        "idle_yield",
        "zero_hints",
        "mmu_update",
        "exit",
    ] {
        assert!(
            pv.stats.by_hypercall.contains_key(call),
            "{call}: {:?}",
            pv.stats.by_hypercall
        );
    }
    assert!(text(&pv).contains("guest zeroed 0 bytes"), "{}", text(&pv));
    // Trapped: none at all, and the page-table stores were trapped.
    assert!(trapped.stats.by_hypercall.is_empty());
    assert!(trapped.stats.event("pte_trapped") >= 8);
    // Both bracketed their work with the markers.
    assert!(pv.window.is_some() && trapped.window.is_some());
}
