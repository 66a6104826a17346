//! Two VMs side by side, as threads of one process and as two processes: neither sees the
//! other's memory, and one that spins, floods or faults neither stops the other nor changes its
//! result.

mod common;

use common::{BIN, require_kvm};

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use host_vmm::builder::build;
use host_vmm::compare::{GuestResult, measure};
use host_vmm::config::{KernelImage, VmConfig};
use host_vmm::console::ConsoleSink;
use host_vmm::loader::minimal_elf;
use host_vmm::stop::StopReason;
use hypercall_abi::boot::Mode;

const CODE_GPA: u64 = 0x20_0000;

/// Writes 0x5a5a5a5a at guest-physical 0x300000, then spins without exits.
const WRITER: &[u8] = &[
    0xc7, 0x04, 0x25, 0x00, 0x00, 0x30, 0x00, 0x5a, 0x5a, 0x5a,
    0x5a, // mov dword [0x300000], ..
    0xeb, 0xfe, // jmp $
];

/// Reads the dword at guest-physical 0x300000 and exits with it as the exit code.
const READER: &[u8] = &[
    0x8b, 0x04, 0x25, 0x00, 0x00, 0x30, 0x00, // mov eax, [0x300000]
    0x66, 0xba, 0x01, 0x05, // mov dx, EXIT_PORT
    0xef, // out dx, eax
    0xeb, 0xfe, // jmp $
];

/// Schedules an event 10 s away on every exit (the event device drops what it cannot hold).
const FLOODER: &[u8] = &[
    0x66, 0xba, 0x05, 0x05, // mov dx, EVENT_PORT
    0xb8, 0x80, 0x96, 0x98, 0x00, // mov eax, 10_000_000
    0xef, // l: out dx, eax
    0xeb, 0xfd, // jmp l
];

/// `ud2` with no IDT: a triple fault.
const FAULTER: &[u8] = &[0x0f, 0x0b];

fn guest(code: &[u8]) -> VmConfig {
    let mut cfg = VmConfig::new(Mode::Pv, "isolation");
    cfg.kernel = KernelImage {
        name: "isolation guest".into(),
        bytes: minimal_elf(CODE_GPA, code, 0x1000).into(),
    };
    cfg
}

fn null_config() -> VmConfig {
    let mut cfg = VmConfig::new(Mode::Pv, "null");
    cfg.args = vec!["ops=20000".into()];
    cfg
}

fn checksum(console: &[u8]) -> Option<u64> {
    GuestResult::parse(console)?.checksum()
}

#[test]
fn vms_in_one_process_do_not_see_or_stop_each_other() {
    require_kvm();
    let reference = measure(&null_config(), ConsoleSink::new(None)).unwrap();
    let want = checksum(&reference.report.console).expect("null prints a checksum");

    // Neighbours: one writes its RAM and spins, one floods the event device.
    let writer = build(&guest(WRITER), ConsoleSink::new(None)).unwrap();
    let flooder = build(&guest(FLOODER), ConsoleSink::new(None)).unwrap();
    let stops = [writer.stopper(), flooder.stopper()];
    let neighbours = [
        std::thread::spawn(move || writer.run()),
        std::thread::spawn(move || flooder.run()),
    ];
    // Let the writer write before the reader reads.
    std::thread::sleep(Duration::from_millis(100));

    // A third faults at once; its error is its own.
    let fault = host_vmm::run(&guest(FAULTER), ConsoleSink::new(None));
    assert!(
        matches!(fault, Err(host_vmm::Error::GuestFault { .. })),
        "{fault:?}"
    );
    // The reader sees its own zeroed RAM, not the writer's.
    let read = host_vmm::run(&guest(READER), ConsoleSink::new(None)).unwrap();
    assert_eq!(read.exit_code, 0, "a VM read another VM's memory");
    // A workload next to them gives its usual result.
    let null = measure(&null_config(), ConsoleSink::new(None)).unwrap();
    assert_eq!(null.exit_code, 0);
    assert_eq!(checksum(&null.report.console), Some(want));

    // The neighbours were running all along and stop when asked.
    for s in &stops {
        s.stop(StopReason::Signal(15));
    }
    for n in neighbours {
        let r = n.join().unwrap().unwrap();
        assert_eq!(r.stopped, Some(StopReason::Signal(15)));
    }
}

fn elf_file(name: &str, code: &[u8]) -> PathBuf {
    let p = std::env::temp_dir().join(format!("pvkit-isolation-{}-{name}.elf", std::process::id()));
    std::fs::write(&p, minimal_elf(CODE_GPA, code, 0x1000)).unwrap();
    p
}

#[test]
fn vms_in_two_processes_do_not_see_or_stop_each_other() {
    require_kvm();
    let writer = elf_file("writer", WRITER);
    let reader = elf_file("reader", READER);
    let flooder = elf_file("flooder", FLOODER);
    let spawn = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn host-vmm")
    };
    let w = spawn(&["run", writer.to_str().unwrap(), "--timeout", "3s"]);
    let f = spawn(&["run", flooder.to_str().unwrap(), "--timeout", "3s"]);
    std::thread::sleep(Duration::from_millis(200));
    let r = Command::new(BIN)
        .args(["run", reader.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(
        r.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    let null = Command::new(BIN)
        .args(["run", "--workload", "null", "--", "ops=20000"])
        .output()
        .unwrap();
    assert_eq!(null.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&null.stdout).contains("PVKIT-RESULT workload=null"));
    // The spinning and flooding neighbours end at their own timeouts (status 124).
    for (name, child) in [("writer", w), ("flooder", f)] {
        let out = child.wait_with_output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(124),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for p in [writer, reader, flooder] {
        let _ = std::fs::remove_file(p);
    }
}
