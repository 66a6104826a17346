//! The gdb stub (`host-vmm run --gdb ADDR`), driven by gdb in batch mode against the demo
//! kernel's ELF (its symbols) in both modes, over TCP and a Unix socket; and by a raw Remote
//! Serial Protocol client that sends malformed packets or disconnects mid-session: the VM then
//! runs on to its end, never hangs.
//!
//! gdb must be installed (`.ci/run` installs it): these tests fail, never skip, without it.

mod common;

use common::{BIN, require_kvm};

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long any one VM or gdb may take.
const LIMIT: Duration = Duration::from_secs(60);

fn require_gdb() {
    match Command::new("gdb").arg("--version").output() {
        Ok(o) if o.status.success() => {}
        other => panic!(
            "these tests drive the gdb stub with gdb, which is not installed ({other:?}); \
             install it (apt-get install -y gdb, as .ci/run does)"
        ),
    }
}

/// A scratch directory with the demo kernel's ELF (with its symbols) written out.
fn scratch(name: &str) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("pvkit-gdb-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let kernel = dir.join("kernel.elf");
    std::fs::write(&kernel, host_vmm::kernel::DEMO_KERNEL).unwrap();
    (dir, kernel)
}

/// A `host-vmm run --gdb` child, its address, and its stderr lines as they come.
struct Vm {
    child: Child,
    addr: String,
    stderr: mpsc::Receiver<String>,
}

fn start_vm(kernel: &Path, mode: &str, gdb_addr: &str, extra: &[&str]) -> Vm {
    let mut child = Command::new(BIN)
        .args([
            "run",
            kernel.to_str().unwrap(),
            "--mode",
            mode,
            "--gdb",
            gdb_addr,
            "--timeout",
            "60s",
        ])
        // Last: it may end with `--` and the workload's arguments.
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn host-vmm");
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + LIMIT;
    let addr = loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("host-vmm did not say where it waits for gdb");
        if let Some(rest) = line.split("(target remote ").nth(1) {
            break rest.trim_end_matches(')').to_string();
        }
    };
    Vm {
        child,
        addr,
        stderr: rx,
    }
}

/// Waits for the VM to end (killing it after [`LIMIT`]: the test then fails); returns its
/// status, stdout and stderr.
fn finish(mut vm: Vm) -> (ExitStatus, String, String) {
    let deadline = Instant::now() + LIMIT;
    let status = loop {
        if let Some(s) = vm.child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = vm.child.kill();
            panic!("host-vmm did not end within {LIMIT:?}: a hung host");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut out = String::new();
    vm.child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let mut err = String::new();
    while let Ok(line) = vm.stderr.recv_timeout(Duration::from_secs(2)) {
        err.push_str(&line);
        err.push('\n');
    }
    (status, out, err)
}

/// [`finish`], plus everything seen (gdb's output, the VMM's stdout and stderr) in one text
/// for assertion messages.
fn finish_session(vm: Vm, gdb_out: &str) -> Finished {
    let (status, stdout, stderr) = finish(vm);
    let all = format!("gdb:\n{gdb_out}\nhost-vmm stdout:\n{stdout}\nhost-vmm stderr:\n{stderr}");
    Finished {
        status,
        stdout,
        stderr,
        all,
    }
}

/// What [`finish_session`] returns.
struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    all: String,
}

/// Runs gdb in batch mode on `kernel` with `target remote addr` and then `commands`.
fn gdb(kernel: &Path, addr: &str, commands: &[&str]) -> String {
    let mut cmd = Command::new("gdb");
    cmd.args(["-batch", "-nx", kernel.to_str().unwrap()])
        .args(["-ex", &format!("target remote {addr}")]);
    for c in commands {
        cmd.args(["-ex", c]);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn gdb");
    let deadline = Instant::now() + LIMIT;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("gdb did not end within {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The address in `info registers rip` output (`rip  0x209c04  0x209c04 <kmain+20>`).
fn rip_values(out: &str) -> Vec<u64> {
    out.lines()
        .filter(|l| l.starts_with("rip "))
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter_map(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok())
        .collect()
}

/// Breaks at `kmain`, reads the stack and a page-table walk, single-steps, breaks where
/// `kmain` returns to, sets its return value (`rax`) to 42 and continues to the guest's exit,
/// which is 42.
fn debug_session(mode: &str, gdb_addr: &str) {
    require_kvm();
    require_gdb();
    let transport = if gdb_addr.starts_with("unix:") {
        "unix"
    } else {
        "tcp"
    };
    let (dir, kernel) = scratch(&format!("{mode}-{transport}-session"));
    let vm = start_vm(&kernel, mode, gdb_addr, &[]);
    let out = gdb(
        &kernel,
        &vm.addr,
        &[
            "info registers rip",
            "break kmain",
            "continue",
            "bt",
            "info registers rip",
            "x/2gx $rsp",
            "eval \"monitor pte %#lx\", $pc",
            "monitor sregs",
            "up",
            "break *$pc",
            "stepi",
            "info registers rip",
            "delete 1",
            "continue",
            "set $rax = 42",
            "info registers rax",
            "continue",
        ],
    );
    let Finished { status, all, .. } = finish_session(vm, &out);
    assert!(
        out.contains("_start"),
        "stops at the entry point first\n{all}"
    );
    assert!(out.contains("Breakpoint 1, kmain"), "{all}");
    assert!(
        out.contains("in start ()"),
        "bt shows kmain's caller\n{all}"
    );
    let rips = rip_values(&out);
    assert!(rips.len() >= 3, "{all}");
    assert_eq!(
        rips[0], 0x200000,
        "parked at _start before the first instruction\n{all}"
    );
    assert_ne!(
        rips[2], rips[1],
        "stepi moved the instruction pointer\n{all}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("0x") && l.contains(":\t0x")),
        "x/2gx read the stack\n{all}"
    );
    assert!(
        out.contains("L4 entry at"),
        "monitor pte walked the tables\n{all}"
    );
    assert!(out.contains("-> physical 0x"), "{all}");
    assert!(out.contains("cr3 0x"), "{all}");
    assert!(
        out.contains("Breakpoint 2, "),
        "stopped where kmain returns\n{all}"
    );
    assert!(out.contains("rax            0x2a"), "{all}");
    assert!(
        out.contains("exited with code 052"),
        "gdb saw the guest's exit code (42, printed in octal)\n{all}"
    );
    assert_eq!(status.code(), Some(42), "{all}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn gdb_session_pv_over_tcp() {
    debug_session("pv", "127.0.0.1:0");
}

#[test]
fn gdb_session_trapped_over_tcp() {
    debug_session("trapped", "127.0.0.1:0");
}

#[test]
fn gdb_session_trapped_over_unix_socket() {
    let path = std::env::temp_dir().join(format!("pvkit-gdb-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    debug_session("trapped", &format!("unix:{}", path.display()));
}

/// One RSP packet with its checksum.
fn packet(body: &str) -> Vec<u8> {
    let sum = body.bytes().fold(0u8, |a, b| a.wrapping_add(b));
    format!("${body}#{sum:02x}").into_bytes()
}

/// Talks raw RSP to a VM of `mode` running `workload` with `args`.
fn raw_client(mode: &str, workload: &str, args: &[&str], talk: impl FnOnce(&mut TcpStream)) {
    require_kvm();
    let (dir, kernel) = scratch(&format!("{mode}-raw-{workload}"));
    let mut run_args = vec!["--workload", workload, "--"];
    run_args.extend_from_slice(args);
    let vm = start_vm(&kernel, mode, "127.0.0.1:0", &run_args);
    let mut s = TcpStream::connect(&vm.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    talk(&mut s);
    drop(s);
    let (status, stdout, stderr) = finish(vm);
    assert_eq!(
        status.code(),
        Some(0),
        "the guest runs on to its own exit\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("PVKIT-RESULT"), "{stdout}\n{stderr}");
    let _ = std::fs::remove_dir_all(dir);
}

fn read_some(s: &mut TcpStream) -> String {
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn malformed_packets_leave_the_vm_running() {
    raw_client("pv", "hello", &[], |s| {
        // A bad checksum, an unknown packet, a packet with junk in it, raw junk.
        s.write_all(b"$g#00").unwrap();
        s.write_all(&packet("qNoSuchThing")).unwrap();
        s.write_all(&packet("m zz,\x7f")).unwrap();
        s.write_all(b"\x00\xff#$$$#").unwrap();
        let _ = read_some(s);
    });
}

#[test]
fn a_client_that_disconnects_mid_session_leaves_the_vm_running() {
    raw_client("trapped", "hello", &[], |s| {
        s.write_all(&packet("?")).unwrap();
        let reply = read_packet(s);
        assert!(reply.contains('$'), "a stop reply: {reply:?}");
        s.write_all(b"+").unwrap();
        s.write_all(&packet("g")).unwrap();
        let _ = read_packet(s);
        s.write_all(b"+").unwrap();
        // Asks to continue, then hangs up while the guest runs.
        s.write_all(&packet("vCont;c")).unwrap();
    });
}

/// Reads until a whole packet (`$…#xx`) has arrived; returns everything read.
fn read_packet(s: &mut TcpStream) -> String {
    let mut got = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        got.push_str(&read_some(s));
        if let Some(start) = got.find('$')
            && got[start..]
                .find('#')
                .is_some_and(|h| got.len() >= start + h + 3)
        {
            break;
        }
    }
    got
}

#[test]
fn ctrl_c_stops_a_running_guest_and_detach_lets_it_finish() {
    // 3 s of 10 ms sleeps: bound by wall time, so still running when the Ctrl-C comes
    // however late a loaded host runs this thread.
    raw_client("pv", "idle", &["intervals=300"], |s| {
        s.write_all(&packet("?")).unwrap();
        assert!(read_packet(s).contains('$'));
        s.write_all(b"+").unwrap();
        s.write_all(&packet("vCont;c")).unwrap();
        std::thread::sleep(Duration::from_millis(150));
        // Ctrl-C: the interrupt byte.
        s.write_all(&[0x03]).unwrap();
        let reply = read_packet(s);
        assert!(
            reply.contains("$T02") || reply.contains("$S02"),
            "stopped with SIGINT: {reply:?}"
        );
        s.write_all(b"+").unwrap();
        s.write_all(&packet("g")).unwrap();
        let regs = read_packet(s);
        assert!(regs.len() > 100, "registers of the stopped guest: {regs:?}");
        s.write_all(b"+").unwrap();
        s.write_all(&packet("D")).unwrap();
        let _ = read_packet(s);
    });
}

/// A fault (here `hlt` with interrupts off, reached by moving RIP into `halt_forever`) stops in
/// gdb with the faulting RIP and a backtrace instead of ending the VM; continuing ends the run
/// with the fault.
#[test]
fn a_guest_fault_stops_in_the_debugger() {
    require_kvm();
    require_gdb();
    let (dir, kernel) = scratch("fault");
    let vm = start_vm(&kernel, "trapped", "127.0.0.1:0", &[]);
    let out = gdb(
        &kernel,
        &vm.addr,
        &[
            "break kmain",
            "continue",
            "set $pc = halt_forever",
            "continue",
            "bt 2",
            "info registers rip",
            "continue",
        ],
    );
    let Finished {
        status,
        stderr,
        all,
        ..
    } = finish_session(vm, &out);
    assert!(out.contains("Program received signal SIGSEGV"), "{all}");
    assert!(out.contains("halt_forever"), "bt at the fault\n{all}");
    assert!(out.contains("terminated with signal SIGSEGV"), "{all}");
    assert!(stderr.contains("interrupts disabled"), "{all}");
    assert_ne!(status.code(), Some(0), "{all}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Breaks in a hypercall wrapper (`console_write`, PV mode), single-steps to its `out`, steps
/// over it: the step ends at the very next instruction with the hypercall's status in `rax`.
#[test]
fn stepping_over_a_hypercall_stops_at_the_next_instruction() {
    require_kvm();
    require_gdb();
    let (dir, kernel) = scratch("hypercall-step");
    let vm = start_vm(&kernel, "pv", "127.0.0.1:0", &["--workload", "console"]);
    let script = dir.join("step.gdb");
    std::fs::write(
        &script,
        "set language c
break console_write
continue
delete
set $n = 0
while (*(unsigned char *)$pc != 0xef && $n < 200)
  stepi
  set $n = $n + 1
end
printf \"OUT at %#lx\\n\", $pc
stepi
printf \"AFTER at %#lx rax=%#lx\\n\", $pc, $rax
continue
",
    )
    .unwrap();
    let out = gdb(
        &kernel,
        &vm.addr,
        &["source ".to_string() + script.to_str().unwrap()]
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let Finished { status, all, .. } = finish_session(vm, &out);
    let addr = |tag: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(tag))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok())
            .unwrap_or_else(|| panic!("no {tag:?} line\n{all}"))
    };
    // `out dx, eax` is one byte (0xef).
    assert_eq!(addr("AFTER at "), addr("OUT at ") + 1, "{all}");
    assert!(
        out.contains("rax=0\n"),
        "the hypercall returned 0 (ok)\n{all}"
    );
    assert!(out.contains("exited normally"), "{all}");
    assert_eq!(status.code(), Some(0), "{all}");
    let _ = std::fs::remove_dir_all(dir);
}

/// The `PVKIT-RESULT` line of a run's stdout.
fn result_line(stdout: &str) -> String {
    stdout
        .lines()
        .find(|l| l.starts_with("PVKIT-RESULT"))
        .unwrap_or_else(|| panic!("no PVKIT-RESULT line in {stdout:?}"))
        .to_string()
}

/// The same kernel, workload and arguments without a debugger: its result line.
fn undebugged_result(kernel: &Path, mode: &str, workload: &str, args: &[&str]) -> String {
    let out = common::host_vmm(
        &[
            &["run", kernel.to_str().unwrap(), "--mode", mode],
            &["--workload", workload, "--timeout", "60s", "--"][..],
            args,
        ]
        .concat(),
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    result_line(&String::from_utf8_lossy(&out.stdout))
}

/// CPL 3 code (`guest_pv::cpu::run_user`, the `cpl3` workload), where this host's KVM
/// intercepts neither `int3`, debug registers nor single-steps: a `stepi` over `enter_user`'s
/// `iretq` stops at the first CPL 3 instruction; a breakpoint in the workload's CPL 3 closure
/// and one in the `ud2` service stub stop there with CS RPL 3; `next` and `stepi` work there;
/// the guest then runs to its exit with the checksum of an undebugged run.
fn cpl3_session(mode: &str) {
    require_kvm();
    require_gdb();
    let (dir, kernel) = scratch(&format!("{mode}-cpl3"));
    let expected = undebugged_result(&kernel, mode, "cpl3", &[]);
    let vm = start_vm(&kernel, mode, "127.0.0.1:0", &["--workload", "cpl3"]);
    let script = dir.join("cpl3.gdb");
    std::fs::write(
        &script,
        "rbreak ^guest_pv::cpu::trap::enter_user
continue
delete
set language c
set $n = 0
while (*(unsigned short *)$pc != 0xcf48 && $n < 100)
  stepi
  set $n = $n + 1
end
printf \"IRETQ at %#lx\\n\", $pc
stepi
printf \"ENTERED at %#lx cs=%#lx\\n\", $pc, $cs
set language auto
break 'trampoline<guest_demo_kernel::workloads::cpl3::run::{closure_env#0}>'
continue
printf \"CLOSURE at %#lx cs=%#lx\\n\", $pc, $cs
info registers cs
next
printf \"NEXT at %#lx cs=%#lx\\n\", $pc, $cs
rbreak ^guest_pv::cpu::trap::service_stub
continue
continue
printf \"STUB at %#lx cs=%#lx\\n\", $pc, $cs
stepi
printf \"STEPPED at %#lx cs=%#lx\\n\", $pc, $cs
delete
continue
",
    )
    .unwrap();
    let source = format!("source {}", script.display());
    let out = gdb(&kernel, &vm.addr, &[&source]);
    let Finished {
        status,
        stdout,
        all,
        ..
    } = finish_session(vm, &out);
    // `TAG 0x… cs=0x…`: the address and CS.
    let line = |tag: &str| -> (u64, u64) {
        let rest = out
            .lines()
            .find_map(|l| l.strip_prefix(tag))
            .unwrap_or_else(|| panic!("no {tag:?} line\n{all}"));
        let hex = |v: &str| u64::from_str_radix(v.trim_start_matches("0x"), 16).unwrap();
        let mut words = rest.split_whitespace();
        let addr = hex(words.next().unwrap());
        let cs = words
            .next()
            .and_then(|w| w.strip_prefix("cs="))
            .map(hex)
            .unwrap_or(u64::MAX);
        (addr, cs)
    };
    let (iretq, _) = line("IRETQ at ");
    let (entered, cs) = line("ENTERED at ");
    assert_eq!(cs & 3, 3, "the step over iretq ended at CPL 3\n{all}");
    assert_ne!(entered, iretq + 2, "it went where the frame said\n{all}");
    let (closure, cs) = line("CLOSURE at ");
    assert_eq!(
        cs & 3,
        3,
        "the breakpoint in CPL 3 code stopped there\n{all}"
    );
    assert!(
        out.contains("Breakpoint 2, "),
        "gdb saw it as its breakpoint\n{all}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("cs ") && l.contains("0x23")),
        "info registers shows the user CS\n{all}"
    );
    let (next, cs) = line("NEXT at ");
    assert_eq!(cs & 3, 3, "{all}");
    assert_ne!(next, closure, "next moved on\n{all}");
    let (stub, cs) = line("STUB at ");
    assert_eq!(cs & 3, 3, "{all}");
    let (stepped, cs) = line("STEPPED at ");
    assert_eq!(cs & 3, 3, "{all}");
    assert_ne!(stepped, stub, "{all}");
    assert!(out.contains("exited normally"), "{all}");
    assert_eq!(status.code(), Some(0), "{all}");
    assert_eq!(
        result_line(&stdout),
        expected,
        "debugging did not change the guest's result\n{all}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn cpl3_code_can_be_debugged_pv() {
    cpl3_session("pv");
}

#[test]
fn cpl3_code_can_be_debugged_trapped() {
    cpl3_session("trapped");
}

/// The `pagetable` workload runs its manager at CPL 3 and calls kernel services (`ud2`):
/// breakpoints in the service stub stop there, and the guest's result is that of an undebugged
/// run.
#[test]
fn breakpoints_in_the_pagetable_workloads_cpl3_code() {
    require_kvm();
    require_gdb();
    let (dir, kernel) = scratch("pv-pagetable");
    let expected = undebugged_result(&kernel, "pv", "pagetable", &[]);
    let vm = start_vm(&kernel, "pv", "127.0.0.1:0", &["--workload", "pagetable"]);
    let out = gdb(
        &kernel,
        &vm.addr,
        &[
            "rbreak ^guest_pv::cpu::trap::service_stub",
            "continue",
            "continue",
            "continue",
            "info registers rip cs",
            "delete",
            "continue",
        ],
    );
    let Finished {
        status,
        stdout,
        all,
        ..
    } = finish_session(vm, &out);
    assert_eq!(out.matches("Breakpoint 1, ").count(), 3, "{all}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("cs ") && l.contains("0x23")),
        "{all}"
    );
    assert!(out.contains("exited normally"), "{all}");
    assert_eq!(status.code(), Some(0), "{all}");
    assert_eq!(result_line(&stdout), expected, "{all}");
    let _ = std::fs::remove_dir_all(dir);
}

/// x87/SSE registers come from the vCPU's XSAVE area (MXCSR and the x87 control word have
/// their reset values at `kmain`) and go back to it; `fs_base` and `gs_base` are read and
/// written.
#[test]
fn fpu_sse_and_segment_base_registers() {
    require_kvm();
    require_gdb();
    let (dir, kernel) = scratch("fpu");
    let vm = start_vm(&kernel, "trapped", "127.0.0.1:0", &[]);
    let out = gdb(
        &kernel,
        &vm.addr,
        &[
            "break kmain",
            "continue",
            "printf \"MXCSR %#x FCTRL %#x\\n\", $mxcsr, $fctrl",
            "info registers xmm0",
            "set $fs_base = 0x123000",
            "maint flush register-cache",
            "printf \"FS_BASE %#lx GS_BASE %#lx\\n\", $fs_base, $gs_base",
            "set $fs_base = 0",
            "set $xmm0.uint128 = 5",
            "set $mxcsr = 0x1fc0",
            "maint flush register-cache",
            "printf \"XMM0 %#lx\\n\", $xmm0.v2_int64[0]",
            "printf \"MXCSR %#x\\n\", $mxcsr",
            "set $xmm0.uint128 = 0",
            "set $mxcsr = 0x1f80",
            "delete",
            "continue",
        ],
    );
    let Finished { status, all, .. } = finish_session(vm, &out);
    assert!(
        out.contains("MXCSR 0x1f80 FCTRL 0x37f"),
        "MXCSR and FCW have their reset values\n{all}"
    );
    assert!(out.contains("xmm0 "), "{all}");
    assert!(
        out.contains("FS_BASE 0x123000 GS_BASE 0\n"),
        "fs_base written and read back\n{all}"
    );
    assert!(
        out.contains("XMM0 0x5\nMXCSR 0x1fc0\n"),
        "xmm0 and mxcsr written and read back\n{all}"
    );
    assert!(!out.contains("Could not write registers"), "{all}");
    assert!(out.contains("exited normally"), "{all}");
    assert_eq!(status.code(), Some(0), "{all}");
    let _ = std::fs::remove_dir_all(dir);
}
