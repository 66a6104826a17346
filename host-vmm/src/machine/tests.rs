//! Exit routing without KVM: a machine over real guest memory and the real devices, fed
//! `VcpuExit` values as KVM would hand them over.

use hypercall_abi::idle::{EVENT_PORT, EVENT_VECTOR, TIMER_PORT, TIMER_VECTOR};
use hypercall_abi::layout::PT_POOL_GPA;
use hypercall_abi::ports::{EXIT_PORT, MARKER_PORT, NULL_PORT, UART_COM1};
use hypercall_abi::{HYPERCALL_PORT, Regs, Return, features, virtio};
use kvm_ioctls::VcpuExit;

use super::*;
use crate::builder::attach_pio_devices;
use crate::kernel_abi::HiddenBecause;

const MEM: u64 = 16 << 20;

fn machine(offer: Offer) -> Machine {
    let console = ConsoleSink::new(None);
    let events = EventQueue::default();
    let devices = attach_pio_devices(&console, &events).unwrap();
    Machine::new(MachineParts {
        ram: GuestRam::new(MEM).unwrap(),
        pool: PageTablePool::new(MEM).unwrap(),
        devices,
        events,
        console,
        offer,
        protected_end: 0x40_0000,
    })
    .unwrap()
}

fn pv() -> Machine {
    machine(Offer::Pv(hypercall::host_features(1)))
}

#[test]
fn port_writes_reach_their_device_by_range() {
    let mut m = pv();
    assert_eq!(
        m.handle_exit(VcpuExit::IoOut(NULL_PORT, &[1, 0, 0, 0])),
        Step::Continue
    );
    assert_eq!(lock(&m.devices.null).writes(), 1);
    let mut data = [0u8; 4];
    m.handle_exit(VcpuExit::IoIn(NULL_PORT, &mut data));
    assert_eq!(u32::from_le_bytes(data), 1);
    for b in b"ok\n" {
        m.handle_exit(VcpuExit::IoOut(UART_COM1, &[*b]));
    }
    assert_eq!(m.console.captured(), b"ok\n");
    assert_eq!(
        m.handle_exit(VcpuExit::IoOut(EXIT_PORT, &7u32.to_le_bytes())),
        Step::Exit(7)
    );
    assert_eq!(
        m.handle_exit(VcpuExit::IoOut(MARKER_PORT, &2u32.to_le_bytes())),
        Step::Marker(2)
    );
    let s = m.stats();
    assert_eq!(s.by_device["null"], 2);
    assert_eq!(s.by_device["uart"], 3);
    assert_eq!(s.by_device["exit"], 1);
    assert_eq!(s.reason(ExitReason::Marker), 1);
    assert_eq!(s.reason(ExitReason::Pio), 6);
    assert_eq!(s.total, 7);
}

#[test]
fn unclaimed_ports_and_addresses_float_high_and_drop_writes() {
    let mut m = pv();
    let mut data = [0u8; 2];
    m.handle_exit(VcpuExit::IoIn(0x80, &mut data));
    assert_eq!(data, [0xff, 0xff]);
    assert_eq!(m.handle_exit(VcpuExit::IoOut(0x80, &[1])), Step::Continue);
    assert_eq!(m.stats().by_device["unclaimed"], 2);
    let mut data = [0u8; 4];
    m.handle_exit(VcpuExit::MmioRead(virtio::window(0), &mut data));
    assert_eq!(data, [0xff; 4], "no virtio device attached");
    assert_eq!(
        m.handle_exit(VcpuExit::MmioWrite(0xfee0_0000, &[1; 4])),
        Step::Continue
    );
    assert_eq!(m.stats().reason(ExitReason::Mmio), 2);
}

#[test]
fn the_hypercall_port_is_served_only_when_pvkit_is_shown() {
    let mut m = pv();
    assert_eq!(
        m.handle_exit(VcpuExit::IoOut(HYPERCALL_PORT, &[0; 4])),
        Step::Hypercall
    );
    assert_eq!(
        m.hypercall(&Regs {
            nr: 0,
            args: [42, 0, 0, 0]
        }),
        Outcome::Return(Return::ok(42))
    );
    assert_eq!(m.stats().by_hypercall["null"], 1);

    for why in [HiddenBecause::TrappedMode, HiddenBecause::NoNote] {
        let mut m = machine(Offer::Hidden(why));
        let step = m.handle_exit(VcpuExit::IoOut(HYPERCALL_PORT, &[0; 4]));
        assert!(
            matches!(step, Step::Fault(ref w) if w.contains("hidden")),
            "{step:?}"
        );
        assert_eq!(m.stats().event("hypercall_while_hidden"), 1);
        assert!(m.stats().by_hypercall.is_empty());
    }
    // Feature bits bind: a cleared bit is not serviced.
    let mut m = machine(Offer::Pv(hypercall::host_features(1) & !features::NULL));
    assert_eq!(
        m.hypercall(&Regs {
            nr: 0,
            args: [1, 0, 0, 0]
        }),
        Outcome::Return(Return::err(hypercall_abi::Error::NotImplemented))
    );
}

#[test]
fn trapped_page_table_stores_go_to_the_pool_window() {
    let mut m = pv();
    // An unaligned partial store is refused and counted, never applied.
    assert_eq!(
        m.handle_exit(VcpuExit::MmioWrite(PT_POOL_GPA + 8, &[1, 0, 0, 0])),
        Step::Continue
    );
    assert_eq!(m.stats().event("pte_rejected"), 1);
    assert_eq!(lock(&m.pool).read_entry(PT_POOL_GPA + 8), Some(0));
    assert_eq!(m.stats().by_device["pt-pool"], 1);
}

#[test]
fn hlt_waits_for_what_can_wake_the_guest() {
    let mut m = pv();
    assert_eq!(m.handle_exit(VcpuExit::Hlt), Step::Halt);
    assert!(matches!(m.halt(false), Halt::Fault(_)));
    assert!(
        matches!(m.halt(true), Halt::Fault(ref w) if w.contains("no timer")),
        "nothing can wake it"
    );
    m.events.waker().wake();
    assert_eq!(m.halt(true), Halt::Inject(EVENT_VECTOR));
    // Program a 1 ms timer through its port, then halt: the tick comes.
    m.handle_exit(VcpuExit::IoOut(TIMER_PORT, &1000u32.to_le_bytes()));
    assert_eq!(m.halt(true), Halt::Inject(TIMER_VECTOR));
    assert_eq!(lock(&m.devices.timer).ticks(), 1);
    // An event scheduled through the event device's port wakes the halted guest.
    m.handle_exit(VcpuExit::IoOut(TIMER_PORT, &0u32.to_le_bytes()));
    m.handle_exit(VcpuExit::IoOut(EVENT_PORT, &100u32.to_le_bytes()));
    assert_eq!(m.halt(true), Halt::Inject(EVENT_VECTOR));
    // A stop or pause ends the wait without an interrupt.
    m.handle_exit(VcpuExit::IoOut(TIMER_PORT, &1_000_000u32.to_le_bytes()));
    m.events.interrupter().interrupt();
    assert_eq!(m.halt(true), Halt::Interrupted);
}

#[test]
fn guest_faults_are_reported_not_panicked() {
    let mut m = pv();
    for exit in [
        VcpuExit::Shutdown,
        VcpuExit::InternalError,
        VcpuExit::FailEntry(0x80000021, 0),
    ] {
        assert!(matches!(m.handle_exit(exit), Step::Fault(_)));
    }
    assert_eq!(m.handle_exit(VcpuExit::Intr), Step::Continue);
}

#[test]
fn machine_state_round_trips_and_refuses_other_machines() {
    let mut m = pv();
    m.handle_exit(VcpuExit::IoOut(NULL_PORT, &[5]));
    m.handle_exit(VcpuExit::IoOut(UART_COM1 + 7, &[0x42])); // scratch register
    m.handle_exit(VcpuExit::IoOut(TIMER_PORT, &500u32.to_le_bytes()));
    m.handle_exit(VcpuExit::IoOut(EVENT_PORT, &5_000_000u32.to_le_bytes()));
    m.events.waker().wake();
    let saved = m.save();
    let json = serde_json::to_string(&saved).unwrap();
    let back: MachineState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, saved);

    let mut fresh = pv();
    fresh.restore(&back).unwrap();
    let again = fresh.save();
    assert_eq!(again.null, saved.null);
    assert_eq!(again.pool, saved.pool);
    assert_eq!(again.uart, saved.uart);
    assert_eq!(again.events, saved.events);
    assert_eq!(again.timer.period_us, 500);
    assert_eq!(again.event_device.due_in_ns.len(), 1);
    assert!(again.clock.now_ns >= saved.clock.now_ns, "time goes on");
    let mut scratch = [0u8];
    fresh.handle_exit(VcpuExit::IoIn(UART_COM1 + 7, &mut scratch));
    assert_eq!(scratch, [0x42]);

    // A state with a virtio window this machine does not have.
    let window = crate::devices::virtio::mmio::MmioTransport::new(
        crate::devices::virtio::console::Console::new(ConsoleSink::new(None)),
        fresh.ram.mem().clone(),
        crate::devices::virtio::Interrupt::new(|| {}),
    )
    .unwrap();
    let mut bad = saved.clone();
    bad.virtio.push(StatefulWindow::save_state(&window));
    assert!(matches!(
        fresh.restore(&bad),
        Err(StateError::Mismatch { .. })
    ));
    let mut bad = saved.clone();
    bad.version += 1;
    assert!(matches!(
        fresh.restore(&bad),
        Err(StateError::Version { .. })
    ));
    let mut bad = saved.clone();
    bad.ram.size *= 2;
    assert!(matches!(
        fresh.restore(&bad),
        Err(StateError::Mismatch { .. })
    ));
}

/// Saved machine states are untrusted input (a snapshot file, a migration stream): random
/// mutations of a real state either fail to parse, are refused with a `StateError`, or restore
/// into a machine that still runs. Never a panic. Cases: `PROPTEST_CASES` (the long run:
/// `PROPTEST_CASES=1000000 cargo test --release -p host-vmm --lib machine::tests::fuzz`).
mod fuzz {
    use proptest::prelude::*;
    use serde_json::Value;

    use super::*;

    fn saved() -> Value {
        let mut m = pv();
        m.handle_exit(VcpuExit::IoOut(NULL_PORT, &[5]));
        m.handle_exit(VcpuExit::IoOut(UART_COM1 + 7, &[0x42]));
        m.handle_exit(VcpuExit::IoOut(TIMER_PORT, &500u32.to_le_bytes()));
        m.handle_exit(VcpuExit::IoOut(EVENT_PORT, &5_000u32.to_le_bytes()));
        m.events.waker().wake();
        serde_json::to_value(m.save()).unwrap()
    }

    /// Every leaf of `v`, by path.
    fn leaves(v: &Value, path: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
        match v {
            Value::Object(o) => {
                for (k, x) in o {
                    path.push(k.clone());
                    leaves(x, path, out);
                    path.pop();
                }
            }
            Value::Array(a) => {
                for (i, x) in a.iter().enumerate() {
                    path.push(i.to_string());
                    leaves(x, path, out);
                    path.pop();
                }
            }
            _ => out.push(path.clone()),
        }
    }

    fn leaf_mut<'a>(v: &'a mut Value, path: &[String]) -> &'a mut Value {
        path.iter().fold(v, |v, k| match v {
            Value::Object(o) => o.get_mut(k).unwrap(),
            Value::Array(a) => &mut a[k.parse::<usize>().unwrap()],
            _ => unreachable!("a path leads through containers"),
        })
    }

    fn replacement() -> impl Strategy<Value = Value> {
        prop_oneof![
            any::<u64>().prop_map(Value::from),
            prop_oneof![
                Just(0u64),
                Just(1),
                Just(u64::from(u32::MAX)),
                Just(u64::MAX),
                Just(1 << 62),
                Just(1 << 63)
            ]
            .prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<bool>().prop_map(Value::from),
            Just(Value::Null),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(Value::from),
        ]
    }

    proptest! {
        #[test]
        fn mutated_states_never_panic(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), replacement()), 1..6)
        ) {
            let mut state = saved();
            let mut paths = Vec::new();
            leaves(&state, &mut Vec::new(), &mut paths);
            for (at, value) in edits {
                let path = &paths[at.index(paths.len())];
                *leaf_mut(&mut state, path) = value;
            }
            let mut fresh = pv();
            if let Ok(parsed) = serde_json::from_value::<MachineState>(state) {
                let _ = fresh.restore(&parsed);
            }
            // Restored or not, the machine still routes exits.
            prop_assert_eq!(
                fresh.handle_exit(VcpuExit::IoOut(NULL_PORT, &[1])),
                Step::Continue
            );
        }
    }
}

#[test]
fn the_free_list_is_registered_by_hypercall_read_on_demand_and_saved() {
    use hypercall_abi::zero::{FREE_LIST, ZeroRange};
    use vm_memory::{Bytes, GuestAddress};
    use zerocopy::IntoBytes;

    let list = 0x50_0000;
    let entries = [
        ZeroRange {
            start: 0x80_0000,
            len: 0x2000,
        },
        ZeroRange::default(),
        ZeroRange {
            start: 0x10_0000, // below protected_end: skipped
            len: 0x1000,
        },
    ];
    let mut m = pv();
    m.ram()
        .mem()
        .write_slice(entries.as_bytes(), GuestAddress(list))
        .unwrap();
    assert!(m.free_ranges().is_empty(), "nothing registered yet");
    let call = |m: &mut Machine, a1: u64, a2: u64| {
        m.hypercall(&Regs {
            nr: u64::from(hypercall_abi::Call::ZeroHints.raw()),
            args: [FREE_LIST, a1, a2, 0],
        })
    };
    assert_eq!(call(&mut m, list, 4), Outcome::Return(Return::ok(0)));
    let got = m.free_ranges();
    assert_eq!(got.ranges, [(0x80_0000, 0x2000)]);
    assert_eq!(got.invalid_entries, 1);
    // The guest edits its list without an exit: the next read sees it.
    m.ram()
        .mem()
        .write_obj(0x3000u64, GuestAddress(list + 8))
        .unwrap();
    assert_eq!(m.free_ranges().bytes, 0x3000);

    // Saved and restored with the machine; a state without it (older) loads unregistered.
    let saved = m.save();
    assert_eq!(saved.free_report.max_ranges, 4);
    let mut fresh = pv();
    fresh
        .ram()
        .mem()
        .write_slice(entries.as_bytes(), GuestAddress(list))
        .unwrap();
    fresh.restore(&saved).unwrap();
    assert_eq!(fresh.free_ranges().ranges, [(0x80_0000, 0x2000)]);
    let mut json = serde_json::to_value(&saved).unwrap();
    json.as_object_mut().unwrap().remove("free_report");
    let old: MachineState = serde_json::from_value(json).unwrap();
    fresh.restore(&old).unwrap();
    assert!(fresh.free_ranges().is_empty());

    // Without FREE_REPORT the call is not serviced.
    let mut off = machine(Offer::Pv(
        hypercall::host_features(1) & !features::FREE_REPORT,
    ));
    assert_eq!(
        call(&mut off, list, 4),
        Outcome::Return(Return::err(hypercall_abi::Error::NotImplemented))
    );
    // Unregistering.
    assert_eq!(call(&mut m, 0, 0), Outcome::Return(Return::ok(0)));
    assert!(m.free_ranges().is_empty());
}
