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

    // Put back, it restores.
    std::fs::write(dir.join("memory.bin"), &memory).unwrap();
    let ok = host_vmm(&["restore", dir.to_str().unwrap()]);
    assert_eq!(ok.status.code(), Some(0));
    refused(&dir.join("nonexistent"), "no snapshot");
    let _ = std::fs::remove_dir_all(&dir);
}
