//! The seccomp sandbox ([`host_vmm::sandbox`]): a refused call ends the process with the
//! documented status and one clear line on stderr; allowed work goes on; and real runs (every
//! thread kind) pass with the filters on.

use std::process::{Command, Output};

use host_vmm::sandbox::VIOLATION_STATUS;

const BIN: &str = env!("CARGO_BIN_EXE_host-vmm");

fn host_vmm(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("spawn host-vmm")
}

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

fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("these tests boot real guests and need read-write /dev/kvm ({e})");
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
