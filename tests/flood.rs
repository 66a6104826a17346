//! Guest floods cost the host a bounded amount of memory: purpose-built guests hammer each
//! guest-driven host structure for a while, and the structure stays at its documented bound
//! while the test process's resident memory stays flat. One test function on purpose: it reads
//! this process's RSS, which other tests running in parallel would disturb.

use std::time::Duration;

use host_vmm::builder::build;
use host_vmm::compare::measure;
use host_vmm::compare::window::CHECKPOINTS_MAX;
use host_vmm::config::{KernelImage, VmConfig};
use host_vmm::console::{CAPTURE_LIMIT, ConsoleSink};
use host_vmm::devices::event::EVENT_OUTSTANDING_MAX;
use host_vmm::loader::minimal_elf;
use tests::{Mode, require_kvm};

const CODE_GPA: u64 = 0x20_0000;

fn guest(code: &[u8], timeout: Duration) -> VmConfig {
    let mut cfg = VmConfig::new(Mode::Pv, "flood");
    cfg.kernel = KernelImage {
        name: "flood guest".into(),
        bytes: minimal_elf(CODE_GPA, code, 0x1000).into(),
    };
    cfg.timeout = Some(timeout);
    cfg
}

/// Resident memory of this process, in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// `mov dx, 0x505; mov eax, 10_000_000; l: out dx, eax; jmp l`: schedule an event 10 s away on
/// every exit.
const EVENT_FLOOD: &[u8] = &[
    0x66, 0xba, 0x05, 0x05, // mov dx, EVENT_PORT
    0xb8, 0x80, 0x96, 0x98, 0x00, // mov eax, 10_000_000 (µs)
    0xef, // l: out dx, eax
    0xeb, 0xfd, // jmp l
];

/// `mov dx, MARKER_PORT; l: begin; 1000 × checkpoint; end; jmp l`.
const CHECKPOINT_FLOOD: &[u8] = &[
    0x66, 0xba, 0x02, 0x05, // mov dx, MARKER_PORT
    0xb8, 0x01, 0x00, 0x00, 0x00, // l: mov eax, MARKER_BEGIN
    0xef, // out dx, eax
    0xb9, 0xe8, 0x03, 0x00, 0x00, // mov ecx, 1000
    0xb8, 0x03, 0x00, 0x00, 0x00, // c: mov eax, MARKER_CHECKPOINT
    0xef, // out dx, eax
    0xe2, 0xf8, // loop c
    0xb8, 0x02, 0x00, 0x00, 0x00, // mov eax, MARKER_END
    0xef, // out dx, eax
    0xeb, 0xe5, // jmp l
];

/// `console_write(0x200000, 64 KiB)` on every exit.
const CONSOLE_FLOOD: &[u8] = &[
    0xbf, 0x00, 0x00, 0x20, 0x00, // mov edi, 0x200000
    0xbe, 0x00, 0x00, 0x01, 0x00, // mov esi, 0x10000
    0x66, 0xba, 0x10, 0x05, // l: mov dx, HYPERCALL_PORT (rdx returns the bytes written)
    0xb8, 0x02, 0x00, 0x00, 0x00, // mov eax, console_write
    0xef, // out dx, eax
    0xeb, 0xf4, // jmp l
];

#[test]
fn floods_stay_at_their_bounds() {
    require_kvm();
    // Warm up: one VM of each kind built and dropped, so allocator caches are in place.
    host_vmm::run(
        &guest(EVENT_FLOOD, Duration::from_millis(50)),
        ConsoleSink::new(None),
    )
    .unwrap();
    let before = rss_kib();

    // Events: the device holds at most EVENT_OUTSTANDING_MAX, the rest are dropped.
    let vm = build(
        &guest(EVENT_FLOOD, Duration::from_secs(30)),
        ConsoleSink::new(None),
    )
    .unwrap();
    let handle = vm.handle();
    let stopper = vm.stopper();
    let run = std::thread::spawn(move || vm.run());
    // RSS while the flood runs: once the device is full, nothing more is held.
    std::thread::sleep(Duration::from_millis(300));
    let early = rss_kib();
    std::thread::sleep(Duration::from_millis(1500));
    let late = rss_kib();
    handle.vcpu().pause(Duration::from_secs(10)).unwrap();
    let state = handle.save_machine().unwrap();
    handle.vcpu().resume();
    stopper.stop(host_vmm::stop::StopReason::Signal(15));
    let report = run.join().unwrap().unwrap();
    assert_eq!(state.event_device.due_in_ns.len(), EVENT_OUTSTANDING_MAX);
    let dropped = report.stats.event("event_dropped");
    assert!(dropped > 10_000, "{}", report.stats.summary());
    eprintln!("RSS KiB during the event flood: {early} at 0.3 s, {late} at 1.8 s");
    // Unbounded, each dropped event would hold 16 bytes (more with the heap's doubling).
    assert!(
        late < early + 1024,
        "RSS grew from {early} KiB to {late} KiB during the event flood ({dropped} dropped)"
    );
    let after_events = rss_kib();

    // Checkpoints: at most CHECKPOINTS_MAX per window, none outside one.
    let r = measure(
        &guest(CHECKPOINT_FLOOD, Duration::from_millis(1500)),
        ConsoleSink::new(None),
    )
    .unwrap();
    let w = r.window.as_ref().expect("a complete window");
    assert_eq!(w.checkpoint_ns.len(), CHECKPOINTS_MAX);
    let markers = r.stats.reason(host_vmm::metrics::ExitReason::Marker);
    assert!(
        markers > 2 * CHECKPOINTS_MAX as u64,
        "{}",
        r.stats.summary()
    );
    let after_checkpoints = rss_kib();

    // Console: the capture stops at CAPTURE_LIMIT whatever the guest writes.
    let report = host_vmm::run(
        &guest(CONSOLE_FLOOD, Duration::from_millis(1500)),
        ConsoleSink::new(None),
    )
    .unwrap();
    assert_eq!(report.console.len(), CAPTURE_LIMIT);
    assert!(report.stats.by_hypercall["console_write"] > 1000);
    let written = report.stats.by_hypercall["console_write"] * 0x10000;
    assert!(
        written > 4 * CAPTURE_LIMIT as u64,
        "{written} bytes written"
    );
    drop(report);
    let after_console = rss_kib();

    eprintln!(
        "RSS KiB: before {before}, after event flood {after_events} ({dropped} events dropped), \
         after checkpoint flood {after_checkpoints}, after console flood ({written} bytes) \
         {after_console}"
    );
    // Nothing the floods made is still held: each VM (and its capture) is gone.
    for (what, kib) in [
        ("events", after_events),
        ("checkpoints", after_checkpoints),
        ("console", after_console),
    ] {
        assert!(
            kib < before + 16 * 1024,
            "RSS grew from {before} KiB to {kib} KiB after the {what} flood"
        );
    }
}
