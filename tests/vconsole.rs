//! `vconsole`: K bytes through virtio-console. The host's console output is exactly the
//! pattern, and the transfer costs (almost) no exits: QueueNotify is an ioeventfd and the
//! guest polls the used ring.

use host_vmm::config::VmConfig;
use tests::{Mode, boot, console_pattern, fnv1a, run_cfg, text};

const K: u64 = 10_000;

fn boot_vconsole(
    mode: Mode,
    args: &[&str],
    disk: Option<&std::path::Path>,
) -> host_vmm::compare::Measured {
    let mut cfg = VmConfig::new(mode, "vconsole");
    cfg.args = args.iter().map(|s| s.to_string()).collect();
    cfg.virtio_console = true;
    cfg.disk = disk.map(|path| host_vmm::config::DiskConfig {
        path: path.into(),
        readonly: true,
    });
    run_cfg(cfg).unwrap_or_else(|e| panic!("VMM failed running vconsole ({}): {e}", mode.name()))
}

#[test]
fn vconsole_bytes_arrive_intact_with_few_exits() {
    let arg = format!("bytes={K}");
    let want = console_pattern(K);
    for mode in [Mode::Pv, Mode::Trapped] {
        let r = boot_vconsole(mode, &[&arg], None);
        assert_eq!(r.exit_code, 0, "{}", text(&r));
        assert_eq!(r.window_console(), want.as_slice(), "{}", mode.name());
        let res = r.result.as_ref().unwrap();
        assert_eq!(res.ops(), Some(K));
        assert_eq!(res.checksum(), Some(fnv1a(want.iter().copied())));
        assert_eq!(res.get("chains"), Some("1"));
        let w = r.window.as_ref().unwrap();
        assert!(
            w.exits.total < K / 100,
            "{}: {}",
            mode.name(),
            w.exits.summary()
        );
        // The device's register accesses (setup, reset) happen outside the window and are
        // counted under its name.
        assert!(
            r.stats.by_device["virtio-console"] > 0,
            "{}",
            r.stats.summary()
        );
    }
}

#[test]
fn vconsole_sits_after_the_disk_when_both_are_attached() {
    let image = std::env::temp_dir().join(format!("pvkit-vconsole-{}.img", std::process::id()));
    std::fs::write(&image, vec![0u8; 64 << 10]).unwrap();
    let r = boot_vconsole(Mode::Pv, &["bytes=1000"], Some(&image));
    let _ = std::fs::remove_file(&image);
    assert_eq!(r.exit_code, 0, "{}", text(&r));
    assert_eq!(r.window_console(), console_pattern(1000).as_slice());
    assert!(
        !r.stats.by_device.contains_key("virtio-blk"),
        "{}",
        r.stats.summary()
    );
}

#[test]
fn vconsole_without_the_device_is_a_usage_error() {
    let r = boot(Mode::Pv, "vconsole", &[]);
    assert_eq!(r.exit_code, 2);
    assert!(
        text(&r)
            .contains("error: workload 'vconsole': no virtio console (run with --virtio-console)"),
        "{}",
        text(&r)
    );
}
