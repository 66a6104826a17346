//! The seccomp sandbox ([`host_vmm::sandbox`]): a refused call ends the process with the
//! documented status and one clear line on stderr; allowed work goes on; and real runs (every
//! thread kind) pass with the filters on.

mod common;

use common::{host_vmm, require_kvm};

use std::process::Output;

use host_vmm::sandbox::VIOLATION_STATUS;

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_disallowed_call_ends_the_process_with_a_clear_report() {
    for (kind, name, call, nr) in [
        ("vcpu", "vcpu", "socket", libc::SYS_socket),
        ("vcpu", "vcpu", "execve", libc::SYS_execve),
        // Read-only opens only (`/proc/self/pagemap`).
        ("vcpu", "vcpu", "openat-write", libc::SYS_openat),
        // Only the KVM requests it needs.
        ("vcpu", "vcpu", "ioctl", libc::SYS_ioctl),
        ("virtio", "virtio device", "socket", libc::SYS_socket),
        ("event", "event device", "openat-write", libc::SYS_openat),
        ("prepare", "prepare", "execve", libc::SYS_execve),
        ("timeout", "timeout", "ioctl", libc::SYS_ioctl),
        ("signals", "signals", "socket", libc::SYS_socket),
    ] {
        let o = host_vmm(&["sandbox-selftest", "--kind", kind, "--call", call]);
        let err = stderr(&o);
        assert_eq!(
            o.status.code(),
            Some(VIOLATION_STATUS),
            "{kind}/{call}: {err}"
        );
        let want = format!(
            "host-vmm: seccomp: the {name} thread made a system call its filter does not \
             allow: {nr} ("
        );
        assert!(err.contains(&want), "{kind}/{call}: {err}");
        assert_eq!(
            err.lines().count(),
            1,
            "{kind}/{call}: one line only: {err}"
        );
        assert!(
            o.stdout.is_empty(),
            "{kind}/{call}: the call must not have returned"
        );
    }
}

#[test]
fn allowed_calls_go_on_under_every_filter() {
    for kind in ["vcpu", "virtio", "event", "prepare", "timeout", "signals"] {
        let o = host_vmm(&["sandbox-selftest", "--kind", kind, "--call", "none"]);
        assert!(o.status.success(), "{kind}: {}", stderr(&o));
        assert_eq!(String::from_utf8_lossy(&o.stdout), "allowed: returned 3\n");
    }
}

/// Runs that start every kind of thread pass with the filters on (the default) and off.
#[test]
fn runs_pass_with_the_sandbox_on_and_off() {
    require_kvm();
    let dir = std::env::temp_dir().join(format!("pvkit-seccomp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let disk = disk.to_str().unwrap();
    let runs: [&[&str]; 5] = [
        // vCPU, timeout (and signals, as every `run`).
        &["run", "--workload", "hello", "--timeout", "60s"],
        // Virtio-blk and virtio-console device threads.
        &[
            "run",
            "--workload",
            "blk",
            "--disk",
            disk,
            "--virtio-console",
            "--",
            "mib=2",
            "pattern=seq-write",
        ],
        &[
            "run",
            "--mode",
            "trapped",
            "--workload",
            "vconsole",
            "--virtio-console",
        ],
        // The prepare thread and the zero hints' madvise/pagemap.
        &[
            "run",
            "--workload",
            "zero",
            "--mem",
            "256M",
            "--stats",
            "--",
            "mib=64",
        ],
        &["run", "--mode", "trapped", "--workload", "idle"],
    ];
    for args in runs {
        for off in [false, true] {
            let mut args = args.to_vec();
            if off {
                args.insert(1, "--no-seccomp");
            }
            let o = host_vmm(&args);
            let err = stderr(&o);
            assert!(o.status.success(), "{args:?}: {:?} {err}", o.status);
            assert!(!err.contains("seccomp"), "{args:?}: {err}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `CapEff` and `CapPrm` of the thread named `name` in this process, if it exists.
fn caps_of_thread(name: &str) -> Option<(u64, u64)> {
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let status = std::fs::read_to_string(task.path().join("status")).ok()?;
        let cap = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        };
        return Some((cap("CapEff:")?, cap("CapPrm:")?));
    }
    None
}

#[test]
fn the_vcpu_thread_runs_without_capabilities() {
    require_kvm();
    // A guest that spins without exits until its timeout.
    let mut cfg = host_vmm::config::VmConfig::new(hypercall_abi::boot::Mode::Pv, "spin");
    cfg.kernel = host_vmm::config::KernelImage {
        name: "spin".into(),
        bytes: host_vmm::loader::minimal_elf(0x20_0000, &[0xeb, 0xfe], 0x1000).into(),
    };
    cfg.timeout = Some(std::time::Duration::from_secs(2));
    let vm = host_vmm::builder::build(&cfg, host_vmm::console::ConsoleSink::new(None)).unwrap();
    let run = std::thread::spawn(move || vm.run());
    let mut seen = None;
    for _ in 0..100 {
        std::thread::sleep(std::time::Duration::from_millis(10));
        seen = caps_of_thread("pvkit-vcpu");
        if seen.is_some() {
            break;
        }
    }
    let report = run.join().unwrap().unwrap();
    assert_eq!(report.exit_code, 124);
    assert_eq!(
        seen,
        Some((0, 0)),
        "the vCPU thread keeps capabilities (effective, permitted)"
    );
}
