//! Stopping a VM through the library: `VmConfig::timeout` and a `Stopper` used from another
//! thread. One test function on purpose: it counts this process's threads, which other tests
//! running in parallel would disturb.

use std::time::Duration;

use host_vmm::builder::build;
use host_vmm::config::{KernelImage, VmConfig};
use host_vmm::console::ConsoleSink;
use host_vmm::loader::minimal_elf;
use host_vmm::stop::StopReason;
use hypercall_abi::boot::Mode;

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

fn spin_config() -> VmConfig {
    let mut cfg = VmConfig::new(Mode::Trapped, "");
    cfg.kernel = KernelImage {
        name: "spin guest".into(),
        // jmp $: never exits by itself.
        bytes: minimal_elf(0x20_0000, &[0xeb, 0xfe], 0x1000).into(),
    };
    cfg
}

#[test]
fn a_run_stops_on_timeout_or_request_and_leaves_no_thread_behind() {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .expect("this test boots real guests and needs read-write /dev/kvm");
    let before = threads();

    // The configured timeout.
    let mut cfg = spin_config();
    cfg.timeout = Some(Duration::from_millis(200));
    let r = host_vmm::run(&cfg, ConsoleSink::new(None)).unwrap();
    assert_eq!(
        r.stopped,
        Some(StopReason::Timeout(Duration::from_millis(200)))
    );
    assert_eq!(r.exit_code, 124);
    assert!(r.console.is_empty());
    assert_eq!(threads(), before, "the timeout thread must be joined");

    // A stop from another thread; the first request's reason is reported.
    let vm = build(&spin_config(), ConsoleSink::new(None)).unwrap();
    let stopper = vm.stopper();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        stopper.stop(StopReason::Signal(libc::SIGTERM));
        // The run has ended by now: a later request changes nothing.
        stopper.stop(StopReason::Signal(libc::SIGINT));
        stopper.requested()
    });
    let r = vm.run().unwrap();
    assert_eq!(r.stopped, Some(StopReason::Signal(libc::SIGTERM)));
    assert_eq!(r.exit_code, 143);
    assert_eq!(t.join().unwrap(), Some(StopReason::Signal(libc::SIGTERM)));

    // A stop requested before the run: the guest never runs.
    let vm = build(&spin_config(), ConsoleSink::new(None)).unwrap();
    vm.stopper().stop(StopReason::Signal(libc::SIGINT));
    let r = vm.run().unwrap();
    assert_eq!(r.stopped, Some(StopReason::Signal(libc::SIGINT)));
    assert_eq!(r.stats.total, 0);

    // A guest that exits by itself before its timeout is not stopped, and the timeout thread
    // ends with the run.
    let mut cfg = VmConfig::new(Mode::Pv, "hello");
    cfg.timeout = Some(Duration::from_secs(3600));
    let r = host_vmm::run(&cfg, ConsoleSink::new(None)).unwrap();
    assert_eq!((r.exit_code, r.stopped), (0, None));
    assert_eq!(threads(), before);
}
