//! Pausing a running guest at an exit boundary from another thread, reading and writing its
//! registers, and resuming it: the run ends as if it had never been paused.

use std::time::Duration;

use host_vmm::builder::build;
use host_vmm::compare::GuestResult;
use host_vmm::compare::WindowRecorder;
use host_vmm::config::VmConfig;
use host_vmm::console::ConsoleSink;
use host_vmm::vcpu::ControlError;
use tests::{Mode, require_kvm};

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
