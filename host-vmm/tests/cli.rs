//! The `host-vmm` command line as a user meets it: the two main commands work, and every bad
//! input gives one readable error line and a non-zero status — never a panic or backtrace.

mod common;

use common::{BIN, host_vmm, require_kvm};

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use host_vmm::loader::minimal_elf;

/// Starts `host-vmm args` with its output piped.
fn spawn(args: &[&str]) -> Child {
    Command::new(BIN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn host-vmm")
}

/// Far more than any stop takes; only catches a VMM that never exits.
const HANG: Duration = Duration::from_secs(60);

/// Waits for `child` to exit; kills it and fails if it hangs.
fn finish(mut child: Child) -> Output {
    let t0 = Instant::now();
    while child.try_wait().expect("wait for host-vmm").is_none() {
        if t0.elapsed() > HANG {
            let _ = child.kill();
            let _ = child.wait();
            panic!("host-vmm did not exit within {HANG:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().expect("collect host-vmm output")
}

/// A stopped run: the given status, `--stats` printed as for a normal end, and exactly one
/// `host-vmm: guest stopped: ...` line, the last one, with no error and no panic.
fn assert_stopped(o: &Output, status: i32, reason: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(status), "stderr: {err}");
    assert!(err.starts_with("exits: total="), "stats expected: {err}");
    assert!(err.contains("\nhypercalls: "), "{err}");
    let stops: Vec<_> = err.lines().filter(|l| l.contains("stopped")).collect();
    assert_eq!(
        stops,
        [format!("host-vmm: guest stopped: {reason}")],
        "{err}"
    );
    assert_eq!(err.lines().last(), Some(stops[0]), "{err}");
    assert!(!err.contains("error") && !err.contains("panicked"), "{err}");
}

/// A guest that loops for ever without a single exit (`jmp $`).
fn spin_guest() -> PathBuf {
    temp_file("spin", &minimal_elf(0x20_0000, &[0xeb, 0xfe], 0x1000))
}

#[test]
fn timeout_stops_a_guest_spinning_without_exits() {
    require_kvm();
    let spin = spin_guest();
    let o = finish(spawn(&[
        "run",
        spin.to_str().unwrap(),
        "--timeout",
        "300ms",
        "--stats",
    ]));
    assert_stopped(&o, 124, "timeout after 300ms");
    assert_eq!(stdout(&o), "");
}

#[test]
fn timeout_stops_a_guest_parked_in_idle_yield_or_hlt() {
    require_kvm();
    // One 60 s interval: the guest parks in idle_yield (PV, 1 s per call) or in hlt with a
    // 1 Hz tick (trapped).
    let idle = ["--workload", "idle", "--timeout", "300ms", "--stats", "--"];
    for (mode, strategy) in [("pv", "strategy=pv"), ("trapped", "strategy=hlt")] {
        let mut args = vec!["run", "--mode", mode];
        args.extend(idle);
        args.extend([strategy, "intervals=1", "interval_us=60000000", "tick_hz=1"]);
        let o = finish(spawn(&args));
        assert_stopped(&o, 124, "timeout after 300ms");
        assert!(
            stdout(&o).starts_with("pvkit demo kernel: hello"),
            "{}",
            stdout(&o)
        );
        assert!(!stdout(&o).contains("PVKIT-RESULT"), "{}", stdout(&o));
    }
}

#[test]
fn sigint_and_sigterm_stop_a_running_guest_and_print_stats() {
    require_kvm();
    // Prints "R\n" on the UART, then spins: once the line is out, the guest is running (and
    // the signal handlers are installed).
    let code = [
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb0, b'R', 0xee, // mov al, 'R'; out dx, al
        0xb0, b'\n', 0xee, // mov al, '\n'; out dx, al
        0xeb, 0xfe, // jmp $
    ];
    let guest = temp_file("print-spin", &minimal_elf(0x20_0000, &code, 0x1000));
    for (signal, status, name) in [
        (libc::SIGTERM, 143, "SIGTERM"),
        (libc::SIGINT, 130, "SIGINT"),
    ] {
        let mut child = spawn(&["run", guest.to_str().unwrap(), "--stats"]);
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            out.read_line(&mut text).unwrap();
            let _ = tx.send(());
            out.read_to_string(&mut text).unwrap();
            text
        });
        if rx.recv_timeout(HANG).is_err() {
            let _ = child.kill();
            panic!("the guest printed nothing within {HANG:?}");
        }
        let pid = i32::try_from(child.id()).unwrap();
        // SAFETY: sends a signal to our own child process, which has not been waited for yet
        // (so the pid cannot have been reused).
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
        let o = finish(child);
        assert_stopped(&o, status, name);
        assert!(stderr(&o).contains("uart=2"), "{}", stderr(&o));
        assert_eq!(reader.join().unwrap(), "R\n");
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// One `host-vmm: error: ...` line, status 125, no panic.
fn assert_vmm_error(o: &Output, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(125), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "one line expected: {err}");
    assert!(err.starts_with("host-vmm: error: "), "{err}");
    assert!(err.contains(needle), "expected {needle:?} in {err}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
}

fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pvkit-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn run_boots_the_embedded_kernel_in_both_modes() {
    require_kvm();
    for mode in ["pv", "trapped"] {
        let o = host_vmm(&["run", "--mode", mode]);
        assert_eq!(o.status.code(), Some(0), "{mode}: {}", stderr(&o));
        assert!(
            stdout(&o).starts_with("pvkit demo kernel: hello from 64-bit long mode"),
            "{}",
            stdout(&o)
        );
        assert!(
            stdout(&o).contains(&format!("mode={mode}")),
            "{}",
            stdout(&o)
        );
    }
}

#[test]
fn run_passes_the_guest_exit_code_through() {
    require_kvm();
    let o = host_vmm(&["run", "--workload", "panic"]);
    assert_eq!(o.status.code(), Some(101));
    assert!(stdout(&o).contains("PVKIT-PANIC"));
}

#[test]
fn run_stats_and_workload_args() {
    require_kvm();
    let o = host_vmm(&[
        "run",
        "--mode",
        "trapped",
        "--workload",
        "null",
        "--stats",
        "--",
        "ops=100",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("ops=100"), "{}", stdout(&o));
    let err = stderr(&o);
    assert!(
        err.contains("exits: total=") && err.contains("null=1"),
        "{err}"
    );
    assert!(err.contains("window exits: total=100 "), "{err}");
}

#[test]
fn compare_prints_a_table_and_writes_json() {
    require_kvm();
    let json = std::env::temp_dir().join(format!("pvkit-compare-{}.json", std::process::id()));
    let o = host_vmm(&[
        "compare",
        "--null-ops",
        "2000",
        "--console-bytes",
        "3000",
        "--pt-updates",
        "1024",
        "--pt-batches",
        "1,64",
        "--idle-intervals",
        "5",
        "--idle-interval-us",
        "2000",
        "--zero-mib",
        "16",
        "--blk-mib",
        "2",
        "--density-sizes",
        "1,2",
        "--density-period-ms",
        "10",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let table = stdout(&o);
    assert!(table.contains("null: trapped/pv time per op"), "{table}");
    assert!(table.contains("vs raw hypercall loop"), "{table}");
    assert!(table.contains("console: trapped/pv time per op"), "{table}");
    assert!(!table.contains("MISMATCH"), "{table}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let recs = v.as_array().unwrap();
    // Two floor references (raw exit loops), two modes of null and console, and the
    // pagetable sweep (two PV batch sizes) plus its trapped and native runs, the three idle
    // strategies, and zero: PV, PV without read-ahead, PV without releasing, trapped; then blk:
    // four patterns (seq-read, rand-read, seq-write, seq-read-1m) × (pv, pv-park, pv-poll,
    // trapped) and the host's own read; snapshot (PV, trapped) and two restore
    // sizes; migrate (PV, trapped) and an idle PV migration; density: fleets of 1 and 2 VMs
    // idling with pv, hlt and spin.
    assert_eq!(recs.len(), 47);
    let modes: Vec<_> = recs
        .iter()
        .map(|r| {
            format!(
                "{}/{}",
                r["workload"].as_str().unwrap(),
                r["mode"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        modes,
        [
            "floor/raw-pio",
            "floor/raw-hypercall",
            "null/pv",
            "null/trapped",
            "console/pv",
            "console/trapped",
            "pagetable/pv",
            "pagetable/pv",
            "pagetable/trapped",
            "pagetable/native",
            "idle/spin",
            "idle/hlt",
            "idle/pv",
            "zero/pv",
            "zero/pv-no-prepare",
            "zero/pv-keep",
            "zero/trapped",
            "blk/pv",
            "blk/pv-park",
            "blk/pv-poll",
            "blk/trapped",
            "blk/pv",
            "blk/pv-park",
            "blk/pv-poll",
            "blk/trapped",
            "blk/pv",
            "blk/pv-park",
            "blk/pv-poll",
            "blk/trapped",
            "blk/pv",
            "blk/pv-park",
            "blk/pv-poll",
            "blk/trapped",
            "blk/host",
            "snapshot/pv",
            "snapshot/trapped",
            "restore/pv 128M",
            "restore/pv 1024M",
            "migrate/pv",
            "migrate/trapped",
            "migrate-idle/pv",
            "density/pv n=1",
            "density/hlt n=1",
            "density/spin n=1",
            "density/pv n=2",
            "density/hlt n=2",
            "density/spin n=2",
        ]
    );
    for r in &recs[41..47] {
        assert!(r["window_millicores"].as_u64().unwrap() > 0, "{r}");
        assert_eq!(r["checksum"], recs[41]["checksum"], "{r}");
    }
    // Saved or migrated mid-workload, the guest finishes as it does uninterrupted, in both
    // modes; the PV guest's freed memory is neither written nor sent.
    let n = |r: &serde_json::Value, k: &str| r[k].as_u64().unwrap_or_else(|| panic!("{k}: {r}"));
    assert_eq!(recs[34]["checksum"], recs[35]["checksum"]);
    assert_eq!(recs[38]["checksum"], recs[39]["checksum"]);
    assert_eq!(recs[34]["checksum"], recs[38]["checksum"]);
    assert!(n(&recs[34], "bytes_written") * 10 <= n(&recs[35], "bytes_written") * 3);
    assert!(n(&recs[38], "bytes_sent") * 10 <= n(&recs[39], "bytes_sent") * 3);
    assert!(n(&recs[34], "pages_elided_free") > 0);
    assert_eq!(n(&recs[35], "pages_elided_free"), 0);
    for r in &recs[34..38] {
        assert!(n(r, "restore_ns") > 0 && n(r, "cold_boot_ns") > 0, "{r}");
    }
    for r in &recs[38..41] {
        assert!(n(r, "rounds") >= 2 && n(r, "downtime_ns") > 0, "{r}");
    }
    for r in &recs[17..33] {
        assert!(r["mib_s"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["iops"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["pattern"].is_string(), "{r}");
    }
    // The same pattern gives the same data whichever way completions arrive.
    for g in recs[17..33].chunks(4) {
        assert_eq!(g[0]["checksum"], g[1]["checksum"]);
        assert_eq!(g[0]["checksum"], g[2]["checksum"]);
        assert_eq!(g[0]["checksum"], g[3]["checksum"]);
    }
    assert!(recs[0]["checksum"].is_null());
    assert_eq!(recs[2]["checksum"], recs[3]["checksum"]);
    assert_eq!(recs[2]["exits"]["total"], 2000);
    assert_eq!(
        (recs[6]["batch"].as_u64(), recs[7]["batch"].as_u64()),
        (Some(1), Some(64))
    );
    assert!(recs[8].get("batch").is_none());
    assert_eq!(recs[6]["checksum"], recs[8]["checksum"]);
    assert!(recs[8]["events"]["pte_trapped"].as_u64().unwrap() >= 1024);
    // Native tables: the same checksum, and the VMM never sees a page-table write.
    assert_eq!(recs[6]["checksum"], recs[9]["checksum"]);
    assert!(
        recs[9]["events"].get("pte_trapped").is_none(),
        "{}",
        recs[9]
    );
    for r in &recs[10..13] {
        assert_eq!(r["ops"], 5);
        assert!(r["wake_overshoot_ns_p99"].as_u64().is_some(), "{r}");
        assert_eq!(r["checksum"], recs[10]["checksum"]);
    }
    for r in &recs[13..16] {
        assert_eq!(r["checksum"], recs[16]["checksum"]);
    }
    assert_eq!(recs[15]["released_bytes"], 0);
    assert_eq!(recs[14]["prepare_calls"], 0);
    assert!(
        recs[13]["prepare_calls"].as_u64().unwrap() > 0,
        "{}",
        recs[13]
    );
    for key in [
        "rss_drop_bytes",
        "phase_touch_ns",
        "phase_free_ns",
        "phase_reuse_ns",
    ] {
        assert!(recs[13][key].as_u64().is_some(), "{key}: {}", recs[13]);
    }
    assert!(table.contains("zero pv           : median of 3"), "{table}");
    assert_eq!(recs[13]["rounds"], 3);
    for r in recs {
        for key in [
            "workload",
            "mode",
            "ops",
            "exits",
            "wall_ns",
            "ns_per_op",
            "host_cpu_ns",
            "checksum",
        ] {
            assert!(r.get(key).is_some(), "missing {key} in {r}");
        }
        // Spinning, trapped zeroing and native page tables run without a single exit, by
        // design.
        let exitless = matches!(
            (r["workload"].as_str(), r["mode"].as_str()),
            (Some("idle"), Some("spin"))
                | (Some("pagetable"), Some("native"))
                | (Some("zero"), Some("trapped"))
                | (Some("blk"), Some("pv-poll") | Some("host"))
                // Saving, restoring and migrating are counted in bytes and time, not exits.
                | (
                    Some("snapshot" | "restore" | "migrate" | "migrate-idle" | "density"),
                    Some(_)
                )
        );
        let exits = r["exits"]["total"].as_u64().unwrap();
        if exitless {
            assert_eq!(exits, 0, "{r}");
        } else if r["workload"] != "blk" {
            // (blk at depth > 1 may find every completion already there: zero exits is fine.)
            assert!(exits > 0, "{r}");
        }
        assert!(r["wall_ns"].as_u64().unwrap() > 0);
    }
    let _ = std::fs::remove_file(json);
}

#[test]
fn missing_kernel_file() {
    assert_vmm_error(
        &host_vmm(&["run", "/nonexistent/kernel.elf"]),
        "cannot read kernel /nonexistent/kernel.elf",
    );
}

#[test]
fn unreadable_kernel_path_is_a_directory() {
    assert_vmm_error(&host_vmm(&["run", "/"]), "cannot read kernel /");
}

#[test]
fn kernel_that_is_not_an_elf() {
    let p = temp_file(
        "not-elf",
        b"this is a text file, not a kernel, but it is long enough to have a header........",
    );
    assert_vmm_error(&host_vmm(&["run", p.to_str().unwrap()]), "not an ELF file");
}

#[test]
fn kernel_of_the_wrong_class_machine_or_type() {
    let mut elf32 = minimal_elf(0x20_0000, &[0xf4], 0x1000);
    elf32[4] = 1;
    let mut arm = minimal_elf(0x20_0000, &[0xf4], 0x1000);
    arm[18] = 183;
    let mut dyn_ = minimal_elf(0x20_0000, &[0xf4], 0x1000);
    dyn_[16] = 3;
    for (name, img, needle) in [
        ("elf32", elf32, "not a 64-bit ELF"),
        ("arm", arm, "wrong machine type 183"),
        ("pie", dyn_, "not an executable"),
    ] {
        let p = temp_file(name, &img);
        assert_vmm_error(&host_vmm(&["run", p.to_str().unwrap()]), needle);
    }
}

#[test]
fn segment_that_does_not_fit_in_mem() {
    let img = minimal_elf(0x20_0000, &[0xf4], 64 << 20);
    let p = temp_file("big", &img);
    assert_vmm_error(
        &host_vmm(&["run", "--mem", "32M", p.to_str().unwrap()]),
        "increase --mem",
    );
}

#[test]
fn kernels_linked_at_the_wrong_address_say_how_to_link() {
    // Higher-half link: loaded at 2 MiB, virtual -2 GiB.
    let mut hh = minimal_elf(0x20_0000, &[0xf4], 0x1000);
    hh[64 + 16..64 + 24].copy_from_slice(&0xffff_ffff_8020_0000u64.to_le_bytes());
    let mut moved = minimal_elf(0x20_0000, &[0xf4], 0x1000);
    moved[64 + 16..64 + 24].copy_from_slice(&0x40_0000u64.to_le_bytes());
    let high = minimal_elf(0xC000_0000, &[0xf4], 0x1000);
    for (name, img, needle) in [
        ("higher-half", hh, "higher half"),
        ("vaddr", moved, "virtual must equal physical"),
        ("high", high, "link it lower"),
    ] {
        let p = temp_file(name, &img);
        let o = host_vmm(&["run", "--mem", "3068M", p.to_str().unwrap()]);
        assert_vmm_error(&o, needle);
        assert!(!stderr(&o).contains("increase --mem"), "{}", stderr(&o));
    }
}

#[test]
fn bad_mem_and_mode_are_usage_errors() {
    for args in [
        &["run", "--mem", "lots"][..],
        &["run", "--mem", "1M"],
        &["run", "--mem", "64G"],
        &["run", "--mode", "turbo"],
        &["run", "--timeout", "soon"],
        &["run", "--timeout", "0"],
        &["run", "--timeout", "1.5s"],
        &["compare", "--workload", "nope"],
        &["frobnicate"],
    ] {
        let o = host_vmm(args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.starts_with("error: "), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let err = stderr(&host_vmm(&["run", "--mem", "1M"]));
    assert!(err.contains("at least 16 MiB"), "{err}");
}

#[test]
fn missing_kvm_device_says_how_to_fix_it() {
    let o = host_vmm(&["run", "--kvm-device", "/nonexistent/kvm"]);
    assert_vmm_error(&o, "cannot open /nonexistent/kvm");
    assert!(stderr(&o).contains("kvm_intel"), "{}", stderr(&o));
}

#[test]
fn bad_disk_images_are_one_clean_error() {
    assert_vmm_error(
        &host_vmm(&["run", "--disk", "/nonexistent/disk.img"]),
        "cannot open disk image /nonexistent/disk.img",
    );
    assert_vmm_error(&host_vmm(&["run", "--disk", "/"]), "disk image /");
    assert_vmm_error(
        &host_vmm(&["run", "--disk", "/", "--readonly"]),
        "not a regular file or block device",
    );
    let o = host_vmm(&["run", "--readonly"]);
    assert_eq!(o.status.code(), Some(2), "--readonly needs --disk");
}

/// Issue 13, finding 3, through the binary: a kernel whose PT_NOTE header is turned into a
/// PT_LOAD with one file byte and `p_memsz = 0` (below the 2 MiB floor) gets one clear error
/// and a failure status, no panic.
#[test]
fn a_segment_with_memsz_zero_is_refused_with_a_failure_status() {
    let mut img = minimal_elf(0x20_0000, &[0xf4], 0x1000);
    let ph = &mut img[64 + 56..64 + 112];
    ph[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    ph[8..16].copy_from_slice(&0x1000u64.to_le_bytes());
    ph[16..24].copy_from_slice(&0x1000u64.to_le_bytes());
    ph[24..32].copy_from_slice(&0x1000u64.to_le_bytes());
    ph[32..40].copy_from_slice(&1u64.to_le_bytes());
    ph[40..48].copy_from_slice(&0u64.to_le_bytes());
    let path = std::env::temp_dir().join(format!("pvkit-memsz0-{}.elf", std::process::id()));
    std::fs::write(&path, img).unwrap();
    let out = host_vmm(&["run", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(out.status.code().is_some(), "killed by a signal: {stderr}");
    assert!(stderr.contains("file size exceeds memory size"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
