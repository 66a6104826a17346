//! The API socket of a running VM, driven with `host-vmm ctl` and by hand: pause, stats,
//! snapshot, resume; malformed requests get an error answer and the server goes on; the
//! snapshot taken through it restores to the same result.

mod common;

use common::{BIN, require_kvm};

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn ctl(args: &[&str]) -> (Output, serde_json::Value) {
    let out = Command::new(BIN).arg("ctl").args(args).output().unwrap();
    let answer = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    (out, answer)
}

fn raw(sock: &std::path::Path, bytes: &[u8]) -> serde_json::Value {
    let mut c = UnixStream::connect(sock).unwrap();
    c.write_all(bytes).unwrap();
    let _ = c.shutdown(std::net::Shutdown::Write);
    let mut line = String::new();
    BufReader::new(c).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap()
}

fn checksum(stdout: &[u8]) -> String {
    String::from_utf8_lossy(stdout)
        .split_whitespace()
        .find(|f| f.starts_with("checksum="))
        .unwrap_or("none")
        .to_string()
}

#[test]
fn a_running_vm_answers_on_its_api_socket() {
    require_kvm();
    let dir = std::env::temp_dir().join(format!("pvkit-api-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("api.sock");
    let snap = dir.join("snap");
    let want = Command::new(BIN)
        .args(["run", "--workload", "null", "--", "ops=400000"])
        .output()
        .unwrap();
    let vm = Command::new(BIN)
        .args(["run", "--api-sock", sock.to_str().unwrap()])
        .args(["--workload", "null", "--", "ops=400000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !sock.exists() {
        assert!(t0.elapsed() < Duration::from_secs(30), "no socket");
        std::thread::sleep(Duration::from_millis(5));
    }
    let s = sock.to_str().unwrap();

    let (out, a) = ctl(&[s, "pause"]);
    assert!(out.status.success(), "{a}");
    let (_, a) = ctl(&[s, "stats"]);
    assert_eq!(a["ok"], true, "{a}");
    assert_eq!(a["paused"], true);
    let exits = a["exits"]["total"].as_u64().unwrap();
    assert!(exits > 0, "{a}");
    // Paused: the count does not move.
    let (_, b) = ctl(&[s, "stats"]);
    assert_eq!(b["exits"]["total"].as_u64().unwrap(), exits);
    let (out, a) = ctl(&[s, "snapshot", snap.to_str().unwrap()]);
    assert!(out.status.success(), "{a}");
    assert!(a["pages_elided"]["unbacked"].as_u64().unwrap() > 0);

    // Bad requests: an error answer each, and the server goes on.
    for bad in [
        &b"not json\n"[..],
        b"{\"op\":\"reboot\"}\n",
        b"{\"no_op\":1}\n",
        b"{\"op\":\"snapshot\"}\n",
        &[b'x'; 10_000][..],
    ] {
        let a = raw(&sock, bad);
        assert_eq!(a["ok"], false, "{a}");
        assert!(a["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    let (out, a) = ctl(&[s, "frobnicate"]);
    assert_eq!(out.status.code(), Some(1), "{a}");

    let (out, a) = ctl(&[s, "resume"]);
    assert!(out.status.success(), "{a}");
    // Running: stats pause for the read and resume.
    let (_, a) = ctl(&[s, "stats"]);
    assert_eq!(a["paused"], false, "{a}");

    let done = vm.wait_with_output().unwrap();
    assert_eq!(done.status.code(), Some(0));
    assert_eq!(checksum(&done.stdout), checksum(&want.stdout));
    assert!(!sock.exists(), "the socket is removed with the run");
    // The snapshot taken through the socket finishes the same way.
    let restored = Command::new(BIN)
        .args(["restore", snap.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(restored.status.code(), Some(0));
    assert_eq!(checksum(&restored.stdout), checksum(&want.stdout));
    let _ = std::fs::remove_dir_all(&dir);
}
