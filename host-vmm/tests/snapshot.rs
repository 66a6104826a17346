//! Snapshots through the binary: `run --snapshot-after` saves a running guest, `restore`
//! continues it in a new process with the checksum of an uninterrupted run (twice from one
//! snapshot: two independent VMs), and damaged snapshots are refused before any guest code
//! runs.

mod common;

use common::{host_vmm, require_kvm};

use std::path::{Path, PathBuf};
use std::process::Output;

/// The workload, mode, ops and checksum of the run's result line (timings vary by run).
fn result_line(o: &Output) -> String {
    let line = String::from_utf8_lossy(&o.stdout)
        .lines()
        .rev()
        .find(|l| l.starts_with("PVKIT-RESULT "))
        .unwrap_or_else(|| panic!("no result line: {}", String::from_utf8_lossy(&o.stderr)))
        .to_string();
    line.split_whitespace()
        .filter(|f| {
            ["workload=", "mode=", "ops=", "checksum="]
                .iter()
                .any(|k| f.starts_with(k))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pvkit-snapshot-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn snapshot(dir: &Path, after: &str, run_args: &[&str]) -> Output {
    let mut args = vec![
        "run",
        "--snapshot-after",
        after,
        "--snapshot-dir",
        dir.to_str().unwrap(),
    ];
    args.extend_from_slice(run_args);
    let out = host_vmm(&args);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("snapshot written"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn a_restored_snapshot_finishes_like_an_uninterrupted_run() {
    require_kvm();
    let cases: [&[&str]; 3] = [
        &["--workload", "null", "--", "ops=150000"],
        &[
            "--mode",
            "trapped",
            "--workload",
            "null",
            "--",
            "ops=150000",
        ],
        &[
            "--workload",
            "idle",
            "--",
            "strategy=pv",
            "intervals=20",
            "interval_us=10000",
        ],
    ];
    for (i, run_args) in cases.iter().enumerate() {
        let dir = scratch(&format!("ok{i}"));
        let mut plain = vec!["run"];
        plain.extend_from_slice(run_args);
        let want = result_line(&host_vmm(&plain));
        let original = snapshot(&dir, "60ms", run_args);
        assert_eq!(result_line(&original), want, "{run_args:?}: the saved run");
        // Twice from the same snapshot: two independent VMs, the same result.
        for _ in 0..2 {
            let restored = host_vmm(&["restore", dir.to_str().unwrap()]);
            assert_eq!(
                restored.status.code(),
                Some(0),
                "{run_args:?}: {}",
                String::from_utf8_lossy(&restored.stderr)
            );
            assert_eq!(
                result_line(&restored),
                want,
                "{run_args:?}: the restored run"
            );
        }
        // Pages without data are holes: the memory file holds far less than the RAM size.
        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("state.json")).unwrap()).unwrap();
        let written = state["memory"]["pages_written"].as_u64().unwrap();
        let elided = &state["memory"]["elided"];
        let elided: u64 = ["unbacked", "free", "zero"]
            .iter()
            .map(|k| elided[k].as_u64().unwrap())
            .sum();
        assert_eq!(written + elided, (128 << 20) / 4096);
        assert!(elided > written, "{written} written, {elided} elided");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

fn refused(dir: &Path, what: &str) {
    let out = host_vmm(&["restore", dir.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{what}: {stderr}");
    assert!(stderr.starts_with("host-vmm: error:"), "{what}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{what}: one line: {stderr}");
    assert!(!stderr.contains("panicked"), "{what}: {stderr}");
    assert!(out.stdout.is_empty(), "{what}: the guest ran");
}

#[test]
fn damaged_snapshots_are_refused_before_the_guest_runs() {
    require_kvm();
    let dir = scratch("damaged");
    snapshot(&dir, "30ms", &["--workload", "null", "--", "ops=100000"]);
    let state = std::fs::read(dir.join("state.json")).unwrap();
    let memory = std::fs::read(dir.join("memory.bin")).unwrap();

    // A flipped byte in the state, a truncated state, another version.
    let mut flipped = state.clone();
    let at = flipped.len() / 2;
    flipped[at] = if flipped[at] == b'1' { b'2' } else { b'1' };
    std::fs::write(dir.join("state.json"), &flipped).unwrap();
    refused(&dir, "flipped state");
    std::fs::write(dir.join("state.json"), &state[..state.len() / 2]).unwrap();
    refused(&dir, "truncated state");
    let other =
        String::from_utf8(state.clone())
            .unwrap()
            .replacen("\"version\":2,", "\"version\":3,", 1);
    std::fs::write(dir.join("state.json"), other).unwrap();
    refused(&dir, "other version");
    std::fs::write(dir.join("state.json"), &state).unwrap();

    // A changed memory byte, a truncated memory file, no memory file.
    let mut changed = memory.clone();
    changed[0x20_0000] ^= 1;
    std::fs::write(dir.join("memory.bin"), &changed).unwrap();
    refused(&dir, "changed memory");
    // Data where the snapshot has a hole (the last page is never written by `null`).
    let mut filled = memory.clone();
    let last = filled.len() - 100;
    filled[last] = 0x5a;
    std::fs::write(dir.join("memory.bin"), &filled).unwrap();
    refused(&dir, "data in a hole");
    std::fs::write(dir.join("memory.bin"), &memory[..memory.len() / 2]).unwrap();
    refused(&dir, "truncated memory");
    std::fs::remove_file(dir.join("memory.bin")).unwrap();
    refused(&dir, "missing memory");

    // A changed kernel image.
    let kernel = std::fs::read(dir.join("kernel.elf")).unwrap();
    let mut changed = kernel.clone();
    let last = changed.len() - 1;
    changed[last] ^= 0x40;
    std::fs::write(dir.join("kernel.elf"), &changed).unwrap();
    refused(&dir, "changed kernel");
    std::fs::write(dir.join("kernel.elf"), &kernel).unwrap();

    // A FIFO where the memory file should be (it is missing now): refused at once, never a
    // hang on opening it.
    let fifo = std::ffi::CString::new(dir.join("memory.bin").to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path; mkfifo only creates a file.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    refused(&dir, "a FIFO as memory.bin");
    std::fs::remove_file(dir.join("memory.bin")).unwrap();

    // Put back, it restores.
    std::fs::write(dir.join("memory.bin"), &memory).unwrap();
    let ok = host_vmm(&["restore", dir.to_str().unwrap()]);
    assert_eq!(ok.status.code(), Some(0));
    refused(&dir.join("nonexistent"), "no snapshot");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `freemem` at 64 MiB: its rounds run well past the snapshot point.
const FREEMEM: [&str; 6] = ["--mem", "64M", "--workload", "freemem", "--", "rounds=400"];

/// Spawns `restore DIR` (output piped; give it a generous timeout so it never hangs).
fn spawn_restore(dir: &Path) -> std::process::Child {
    std::process::Command::new(common::BIN)
        .args(["restore", "--timeout", "60s", dir.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn host-vmm restore")
}

/// Snapshots `freemem` in `mode` and restores it three times: twice at once (two independent
/// VMs, each mapping memory.bin privately), then alone; each time with the uninterrupted
/// result.
fn freemem_snapshot_and_restores(mode: &str) {
    let mut run_args = vec!["--mode", mode];
    run_args.extend_from_slice(&FREEMEM);
    let mut plain = vec!["run"];
    plain.extend_from_slice(&run_args);
    let want = result_line(&host_vmm(&plain));
    let dir = scratch(&format!("freemem-{mode}"));
    let original = snapshot(&dir, "300ms", &run_args);
    assert_eq!(result_line(&original), want, "{mode}: the saved run");
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("state.json")).unwrap()).unwrap();
    let free = state["memory"]["elided"]["free"].as_u64().unwrap();
    if mode == "pv" {
        assert!(free > 0, "{mode}: {}", state["memory"]);
    } else {
        assert_eq!(free, 0, "{mode}: {}", state["memory"]);
    }
    let children = [spawn_restore(&dir), spawn_restore(&dir)];
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{mode}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(result_line(&out), want, "{mode}: a concurrent restore");
    }
    // The snapshot is unchanged by the runs restored from it: once more, alone.
    let again = host_vmm(&["restore", dir.to_str().unwrap()]);
    assert_eq!(
        again.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(
        result_line(&again),
        want,
        "{mode}: restored after the others"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn trapped_freemem_snapshots_restore_concurrently() {
    require_kvm();
    freemem_snapshot_and_restores("trapped");
}

/// Known bug (not in this test's files): after `restore` the guest's TSC is not the saved
/// one but runs ahead of it by the wall time since the save (measured: the IA32_TSC that
/// `Vcpu::restore_state` writes with KVM_SET_MSRS reads back as saved + ~55 s for a
/// snapshot saved 55 s earlier), while the host's `clock_ns` `Clock` resumes from its saved
/// ns. `PvIdle::idle_until` maps TSC deadlines to `clock_ns` once and does not remap on a
/// `Capped` wake, so every 1 ms wait of `freemem` parks for that whole gap (in 1 s caps): the
/// restored run does not finish. Live migration has the same skew (by the downtime): a
/// migrated PV `freemem` takes seconds instead of ~1 s on the destination.
#[test]
fn pv_freemem_snapshots_restore_concurrently() {
    require_kvm();
    freemem_snapshot_and_restores("pv");
}

// Not tested: a snapshot of a restored VM. `host-vmm restore` has neither `--api-sock` nor
// `--snapshot-after`, so a restored VM cannot be saved again through the binary.

#[test]
fn a_guest_saved_during_virtio_blk_io_finishes_its_io_after_restore() {
    require_kvm();
    let dir = scratch("blk");
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("disk.img");
    let data: Vec<u8> = (0..32u32 << 20)
        .map(|i| (i.wrapping_mul(13) ^ (i >> 10)) as u8)
        .collect();
    std::fs::write(&disk, data).unwrap();
    let disk = disk.to_str().unwrap().to_string();
    for mode in ["pv", "trapped"] {
        let snap = dir.join(format!("snap-{mode}"));
        let args = [
            "--mode",
            mode,
            "--disk",
            &disk,
            "--workload",
            "blk",
            "--",
            "pattern=rand-read",
            "mib=32",
        ];
        let mut plain = vec!["run"];
        plain.extend_from_slice(&args);
        let want = result_line(&host_vmm(&plain));
        // Saved while requests are in flight: the queues' positions and the guest's buffers
        // are part of the snapshot, and the restored device serves what is still pending.
        let original = snapshot(&snap, "100ms", &args);
        assert_eq!(result_line(&original), want, "{mode}: the saved run");
        let restored = host_vmm(&["restore", snap.to_str().unwrap()]);
        assert_eq!(
            restored.status.code(),
            Some(0),
            "{mode}: {}",
            String::from_utf8_lossy(&restored.stderr)
        );
        assert_eq!(result_line(&restored), want, "{mode}: the restored run");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
