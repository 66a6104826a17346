//! Pausing a running guest at an exit boundary from another thread, reading and writing its
//! registers, and resuming it: the run ends as if it had never been paused.

use std::time::Duration;

use host_vmm::builder::build;
use host_vmm::compare::GuestResult;
use host_vmm::compare::WindowRecorder;
use host_vmm::config::VmConfig;
use host_vmm::console::ConsoleSink;
use host_vmm::devices::virtio::MmioDeviceState;
use host_vmm::machine::MachineState;
use host_vmm::vcpu::ControlError;
use tests::{Mode, pseudo_random_bytes, require_kvm};

const WAIT: Duration = Duration::from_secs(10);

fn null_config(mode: Mode, ops: u64) -> VmConfig {
    let mut cfg = VmConfig::new(mode, "null");
    cfg.args = vec![format!("ops={ops}")];
    cfg
}

fn checksum(console: &[u8]) -> Option<u64> {
    GuestResult::parse(console)?.checksum()
}

#[test]
fn a_paused_guest_resumes_where_it_stopped() {
    require_kvm();
    for mode in [Mode::Pv, Mode::Trapped] {
        let ops = 40_000;
        let reference = host_vmm::run(&null_config(mode, ops), ConsoleSink::new(None)).unwrap();

        let vm = build(&null_config(mode, ops), ConsoleSink::new(None)).unwrap();
        let entry = vm.kernel().entry;
        let (start, end) = (vm.kernel().start, vm.kernel().end);
        let handle = vm.vcpu_handle();
        assert!(matches!(handle.regs(), Err(ControlError::NotPaused)));

        // Paused before the run starts: it parks before its first entry, at the entry point.
        handle.request_pause();
        let run = std::thread::spawn(move || {
            let mut rec = WindowRecorder::default();
            vm.run_observed(&mut rec)
        });
        handle.wait_paused(WAIT).unwrap_or_else(|e| panic!("{e}"));
        let regs = handle.regs().unwrap();
        assert_eq!(regs.rip, entry);
        handle.resume();

        // Paused mid-run, several times: registers are readable and writable.
        let mut paused = 0;
        for _ in 0..5 {
            std::thread::sleep(Duration::from_millis(5));
            match handle.pause(WAIT) {
                Ok(()) => {}
                Err(ControlError::Ended) => break,
                Err(e) => panic!("{e}"),
            }
            assert!(handle.is_paused());
            let regs = handle.regs().unwrap();
            assert!(
                (start..end).contains(&regs.rip),
                "rip {:#x} outside the kernel",
                regs.rip
            );
            handle.set_regs(&regs).unwrap();
            let sregs = handle.sregs().unwrap();
            assert_ne!(sregs.cr3, 0, "long mode with paging");
            handle.resume();
            paused += 1;
        }
        let report = run.join().unwrap().unwrap();
        assert_eq!(
            report.exit_code,
            0,
            "{}",
            String::from_utf8_lossy(&report.console)
        );
        assert!(paused > 0, "the guest ended before the first pause");
        assert_eq!(checksum(&report.console), checksum(&reference.console));
        assert!(checksum(&report.console).is_some());
        assert!(matches!(handle.pause(WAIT), Err(ControlError::Ended)));
        assert!(matches!(handle.regs(), Err(ControlError::NotPaused)));
    }
}

#[test]
fn a_stop_ends_a_paused_run() {
    require_kvm();
    let vm = build(&null_config(Mode::Pv, 10_000_000), ConsoleSink::new(None)).unwrap();
    let handle = vm.vcpu_handle();
    let stopper = vm.stopper();
    let run = std::thread::spawn(move || vm.run());
    std::thread::sleep(Duration::from_millis(20));
    handle.pause(WAIT).unwrap();
    stopper.stop(host_vmm::stop::StopReason::Signal(15));
    let report = run.join().unwrap().unwrap();
    assert_eq!(report.exit_code, 143);
    assert!(!handle.is_paused());
}

/// Pauses `vm`'s run every few milliseconds until it ends, saving the machine state each
/// time; returns the report and the states saved.
fn run_saving(
    vm: host_vmm::vm::Vm,
    every: Duration,
) -> (host_vmm::vm::RunReport, Vec<MachineState>) {
    let handle = vm.handle();
    let run = std::thread::spawn(move || vm.run());
    let mut states = Vec::new();
    loop {
        std::thread::sleep(every);
        match handle.vcpu().pause(WAIT) {
            Ok(()) => {}
            Err(ControlError::Ended) => break,
            Err(e) => panic!("{e}"),
        }
        match handle.save_machine() {
            Ok(state) => states.push(state),
            // The run can end between the pause and the save only through a stop; not here.
            Err(e) => panic!("{e}"),
        }
        handle.vcpu().resume();
    }
    (run.join().unwrap().unwrap(), states)
}

#[test]
fn a_running_vm_saves_its_machine_state_and_runs_on() {
    require_kvm();
    let ops = 60_000;
    let cfg = null_config(Mode::Trapped, ops);
    let reference = host_vmm::run(&cfg, ConsoleSink::new(None)).unwrap();
    let vm = build(&cfg, ConsoleSink::new(None)).unwrap();
    let (report, states) = run_saving(vm, Duration::from_millis(10));
    assert_eq!(report.exit_code, 0);
    assert_eq!(checksum(&report.console), checksum(&reference.console));
    assert!(!states.is_empty(), "the guest ended before the first save");
    // The null device's write count only grows, and stays within the workload's writes.
    let writes: Vec<u64> = states.iter().map(|s| s.null.writes).collect();
    assert!(writes.windows(2).all(|w| w[0] <= w[1]), "{writes:?}");
    assert!(writes.iter().all(|&w| w <= ops), "{writes:?}");
    assert_eq!(report.null_writes, ops);
    // Each state is plain data: it survives a round trip through JSON.
    let json = serde_json::to_string(&states[0]).unwrap();
    let back: MachineState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, states[0]);
}

#[test]
fn virtio_devices_are_saved_between_batches_while_the_guest_does_io() {
    require_kvm();
    const MIB: u64 = 16;
    let path = std::env::temp_dir().join(format!("pvkit-pause-{}.img", std::process::id()));
    std::fs::write(&path, pseudo_random_bytes(MIB << 20, 0x9e37_79b9_7f4a_7c15)).unwrap();
    // The guest waits for completions parked in idle_yield (PV) or halted (trapped): both
    // waits are cut short by each pause and must go on as if nothing happened.
    for (mode, wait) in [(Mode::Pv, "wait=pv"), (Mode::Trapped, "wait=irq")] {
        let mut cfg = VmConfig::new(mode, "blk");
        cfg.args = ["pattern=seq-read", "size_kib=64", wait]
            .iter()
            .map(|s| s.to_string())
            .chain([format!("mib={MIB}")])
            .collect();
        cfg.disk = Some(host_vmm::config::DiskConfig {
            path: path.clone(),
            readonly: true,
        });
        let reference = host_vmm::run(&cfg, ConsoleSink::new(None)).unwrap();
        let vm = build(&cfg, ConsoleSink::new(None)).unwrap();
        let (report, states) = run_saving(vm, Duration::from_millis(2));
        assert_eq!(
            report.exit_code,
            0,
            "{wait}: {}",
            String::from_utf8_lossy(&report.console)
        );
        assert_eq!(checksum(&report.console), checksum(&reference.console));
        assert!(checksum(&report.console).is_some());
        let active = states
            .iter()
            .filter(|s| matches!(&s.virtio[0], MmioDeviceState::Block(b) if b.active))
            .count();
        assert!(
            active > 0,
            "{wait}: {} saves, none while the device was active",
            states.len()
        );
        for s in &states {
            assert_eq!(s.virtio.len(), 1);
            let MmioDeviceState::Block(b) = &s.virtio[0] else {
                panic!("a block window saved as {:?}", s.virtio[0]);
            };
            assert!(!b.needs_reset);
            if b.active {
                // Saved between batches: every request the device took is completed.
                for q in &b.queues {
                    assert_eq!(q.next_used, q.next_avail, "{q:?}");
                }
            }
        }
    }
    let _ = std::fs::remove_file(&path);
}

#[test]
fn pauses_do_not_wake_an_idle_guest() {
    require_kvm();
    // 20 intervals of 20 ms parked in idle_yield; pausing every 3 ms interrupts most waits.
    let mut cfg = VmConfig::new(Mode::Pv, "idle");
    cfg.args = ["strategy=pv", "intervals=20", "interval_us=20000"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let reference = host_vmm::run(&cfg, ConsoleSink::new(None)).unwrap();
    let vm = build(&cfg, ConsoleSink::new(None)).unwrap();
    let (report, states) = run_saving(vm, Duration::from_millis(3));
    assert_eq!(
        report.exit_code,
        0,
        "{}",
        String::from_utf8_lossy(&report.console)
    );
    assert!(states.len() > 10, "{} pauses", states.len());
    assert_eq!(checksum(&report.console), checksum(&reference.console));
    // One idle_yield per interval, as without pauses: no early wake-up reached the guest.
    assert_eq!(
        report.stats.by_hypercall.get("idle_yield"),
        reference.stats.by_hypercall.get("idle_yield")
    );
}

/// Saves a running VM mid-workload, then continues it in a second, freshly built VM of the
/// same configuration (`Vm::restore`); both finish with the checksum of an uninterrupted run.
#[test]
fn a_saved_vm_continues_in_a_fresh_vm() {
    require_kvm();
    // Each runs for at least ~0.4 s in a debug build, so the save 40 ms in falls inside it
    // even when a loaded host (the tests run in parallel on two cores) runs this thread late.
    let cases: [(Mode, &str, &[&str]); 6] = [
        (Mode::Pv, "null", &["ops=60000"]),
        (Mode::Trapped, "null", &["ops=60000"]),
        (Mode::Pv, "pagetable", &["updates=65536", "batch=8"]),
        (Mode::Trapped, "pagetable", &["updates=8192"]),
        (
            Mode::Pv,
            "idle",
            &["strategy=pv", "intervals=40", "interval_us=10000"],
        ),
        (
            Mode::Trapped,
            "idle",
            &["strategy=hlt", "intervals=40", "interval_us=10000"],
        ),
    ];
    for (mode, workload, args) in cases {
        let mut cfg = VmConfig::new(mode, workload);
        cfg.args = args.iter().map(|s| s.to_string()).collect();
        let reference = host_vmm::run(&cfg, ConsoleSink::new(None)).unwrap();
        let want = checksum(&reference.console);
        assert!(want.is_some(), "{workload}: no checksum");

        let vm = build(&cfg, ConsoleSink::new(None)).unwrap();
        let handle = vm.handle();
        let run = std::thread::spawn(move || vm.run());
        std::thread::sleep(Duration::from_millis(40));
        handle.vcpu().pause(WAIT).unwrap();
        let saved = handle.save().unwrap();
        handle.vcpu().resume();
        let original = run.join().unwrap().unwrap();
        assert_eq!(
            checksum(&original.console),
            want,
            "{workload}: the saved VM"
        );

        let mut copy = build(&cfg, ConsoleSink::new(None)).unwrap();
        copy.restore(&saved).unwrap();
        let continued = copy.run().unwrap();
        assert_eq!(
            continued.exit_code,
            0,
            "{workload}/{}: {}",
            mode.name(),
            String::from_utf8_lossy(&continued.console)
        );
        assert_eq!(
            checksum(&continued.console),
            want,
            "{workload}/{}: the restored copy",
            mode.name()
        );
        // The copy printed only what came after the save.
        assert!(continued.console.len() < reference.console.len());
    }
}
