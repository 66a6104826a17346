//! The same kernel binary under QEMU (`-M microvm -kernel`, PVH entry, no pvkit: trapped
//! paths) and under host-vmm gives the same results. Needs `qemu-system-x86_64` (Debian:
//! `apt-get install qemu-system-x86`; `.ci/run` installs it) and fails loudly without it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use host_vmm::compare::GuestResult;
use host_vmm::config::{KernelImage, VmConfig};
use host_vmm::qemu;
use tests::{Mode, build_template_copy, run_cfg, text};

/// The workloads of the demo kernel that need no pvkit device (every other one uses pvkit's
/// null port, timer, page-table pool, virtio windows or hypercalls), with their arguments.
const SHARED: &[(&str, &[&str])] = &[
    ("hello", &[]),
    ("console", &["bytes=4096"]),
    ("cpl3", &[]),
    ("zero", &["mib=16"]),
    ("idle", &["strategy=spin", "intervals=5"]),
];

fn require_qemu() {
    assert!(
        qemu::available(),
        "{} does not run: these tests compare host-vmm with QEMU. Install it \
         (`apt-get install -y qemu-system-x86`) or point PVKIT_QEMU at the binary.",
        qemu::binary().display()
    );
}

fn qemu_run(kernel: &Path, workload: &str, args: &[String]) -> qemu::QemuRun {
    let r = qemu::run(
        kernel,
        &qemu::cmdline(workload, args),
        128,
        Duration::from_secs(60),
    )
    .expect("spawn QEMU");
    assert_eq!(
        r.exit_code,
        Some(0),
        "QEMU {workload}: status {:?}\nconsole:\n{}\nstderr:\n{}",
        r.status,
        String::from_utf8_lossy(&r.console),
        r.stderr
    );
    r
}

fn demo_kernel_file() -> PathBuf {
    let path = std::env::temp_dir().join(format!("pvkit-demo-{}.elf", std::process::id()));
    std::fs::write(&path, host_vmm::kernel::DEMO_KERNEL).unwrap();
    path
}

#[test]
fn the_demo_kernel_gives_host_vmm_trapped_checksums_under_qemu() {
    require_qemu();
    tests::require_kvm();
    let kernel = demo_kernel_file();
    for &(workload, args) in SHARED {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let q = qemu_run(&kernel, workload, &args);
        let q_result = GuestResult::parse(&q.console).unwrap_or_else(|| {
            panic!(
                "QEMU {workload}: no result\n{}",
                String::from_utf8_lossy(&q.console)
            )
        });
        assert_eq!(q_result.get("mode"), Some("trapped"), "{workload}");
        let mut cfg = VmConfig::new(Mode::Trapped, workload);
        cfg.args = args.clone();
        let h = run_cfg(cfg).unwrap();
        assert_eq!(h.exit_code, 0, "{}", text(&h));
        let h_result = h.result.as_ref().expect("host-vmm result");
        assert_eq!(
            q_result.checksum(),
            h_result.checksum(),
            "{workload}: QEMU\n{}\nhost-vmm\n{}",
            String::from_utf8_lossy(&q.console),
            text(&h)
        );
    }
    let _ = std::fs::remove_file(kernel);
}

#[test]
fn the_template_built_once_detects_where_it_runs() {
    require_qemu();
    tests::require_kvm();
    let kernel = build_template_copy();
    let q = qemu_run(&kernel, "", &[]);
    let q_text = String::from_utf8_lossy(&q.console).into_owned();
    assert!(
        q_text.contains("trapped mode, pvkit features: none"),
        "{q_text}"
    );
    let result = |t: &str| {
        t.lines()
            .find(|l| l.starts_with("RESULT "))
            .unwrap_or_else(|| panic!("no RESULT line in {t}"))
            .to_string()
    };
    for mode in [Mode::Pv, Mode::Trapped] {
        let mut cfg = VmConfig::new(mode, "");
        cfg.kernel = KernelImage::from_file(&kernel).unwrap();
        let h = run_cfg(cfg).unwrap();
        assert_eq!(h.exit_code, 0, "{}", text(&h));
        assert_eq!(result(&text(&h)), result(&q_text), "{}", mode.name());
    }
}

#[test]
fn compare_with_the_qemu_peer_adds_rows_with_the_same_checksums() {
    require_qemu();
    tests::require_kvm();
    let opts = host_vmm::compare::CompareOptions {
        workloads: vec!["console".into(), "idle".into()],
        console_bytes: 1024,
        idle_intervals: 3,
        peer_qemu: true,
        ..Default::default()
    };
    let records = host_vmm::compare::run(&opts, |_, _| {}).expect("compare runs");
    for (w, twin, peer) in [
        ("console", "trapped", "qemu"),
        ("idle", "spin", "qemu-spin"),
    ] {
        let find = |m: &str| {
            records
                .iter()
                .find(|r| r.workload == w && r.mode == m)
                .unwrap_or_else(|| panic!("no {w}/{m} row"))
        };
        let (t, q) = (find(twin), find(peer));
        assert_eq!(t.checksum, q.checksum, "{w}");
        assert!(q.exits.is_empty() && q.extra.contains_key("boot_to_exit_ns"));
    }
    assert!(host_vmm::compare::fidelity_failures(&records).is_empty());
    let table = host_vmm::compare::render_table(&records);
    assert!(table.contains("console: qemu boot-to-exit"), "{table}");
}
