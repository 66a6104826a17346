//! virtio-console: one port, output only, into the VM's [`ConsoleSink`].
//!
//! Two queues, as the spec's single-port console has: receiveq (0) and transmitq (1). Offered
//! features: `VIRTIO_F_VERSION_1` and `VIRTIO_RING_F_EVENT_IDX`; no `SIZE`, `MULTIPORT` or
//! `EMERG_WRITE`, so the configuration space (`cols`, `rows`, `max_nr_ports`, `emerg_wr`)
//! reads as zero and ignores writes.
//!
//! * **transmitq**: every buffer the driver makes available goes to the [`ConsoleSink`] — the
//!   same sink as the UART and the `console_write` hypercall, so the bytes are echoed (stdout
//!   for `host-vmm run`) and captured (tests, `RunReport::window_console`). Buffers are used
//!   with length 0 (the device writes nothing into them), before the driver is told, so a
//!   driver that waits for its buffer back knows the bytes are in the sink.
//! * **receiveq**: the host has no input for the guest. The driver's receive buffers stay
//!   available and are never used; notifications on queue 0 are ignored (no worker waits on
//!   them).
//!
//! # Limits and failures
//!
//! A chain carries at most [`MAX_CHAIN_BYTES`] (64 KiB) in at most [`MAX_DESCRIPTORS`]
//! descriptors. A chain that is longer, that has a device-writable descriptor, a buffer not
//! entirely inside guest RAM, a descriptor loop or a `next` index outside the ring is
//! **dropped**: none of its bytes reach the sink, it is used with length 0 and counted in
//! [`ConsoleStats::dropped_chains`]. A ring the device cannot follow any more (an available
//! index more than a ring ahead, a head index outside the ring) sets `DEVICE_NEEDS_RESET`
//! (via the worker), as for the block device. Guest memory is read only through vm-memory's
//! bounds-checked accessors on the RAM mapping.
//!
//! One call of [`Transmitter::process_queue`] sends at most one pass budget of chains (the
//! queue size, see [`super::pass_budget`]), so a transmit ring the guest keeps full cannot
//! keep the worker from a stop (see [`super`]'s "Bounds"). Each chain's bytes are copied into
//! one buffer of at most [`MAX_CHAIN_BYTES`], handed to the sink and freed; how much the sink
//! keeps is the sink's bound, not this device's.

use crate::memory::GuestMem;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueState};
use vm_memory::Bytes;

use super::thread::{QueueHandler, Worker};
use super::{Activation, Counters, DeviceError, Pass, VirtioDevice, read_config_bytes};
use crate::console::ConsoleSink;
use crate::state::{Persist, StateError};

/// Maximum size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Index of the receive queue (port 0).
pub const RECEIVEQ: u16 = 0;
/// Index of the transmit queue (port 0).
pub const TRANSMITQ: u16 = 1;
/// Most bytes one transmit chain may carry; a longer chain is dropped.
pub const MAX_CHAIN_BYTES: u32 = 64 << 10;
/// Most descriptors one transmit chain may have; a longer chain is dropped.
pub const MAX_DESCRIPTORS: usize = QUEUE_SIZE as usize;

/// `struct virtio_console_config`: cols, rows (u16), max_nr_ports, emerg_wr (u32).
const CONFIG_LEN: usize = 12;

/// Transmit counters, for metrics and tests (and part of [`ConsoleState`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConsoleStats {
    /// Chains whose bytes reached the sink.
    pub chains: u64,
    /// Bytes that reached the sink.
    pub bytes: u64,
    /// Chains dropped as malformed or over the limits.
    pub dropped_chains: u64,
}

/// The transmit engine: a sink and counters. [`Transmitter::process_queue`] takes a queue and
/// guest memory and nothing else, so unit tests drive it without threads or KVM.
#[derive(Debug, Clone)]
pub struct Transmitter {
    sink: ConsoleSink,
    stats: Counters<ConsoleStats>,
}

impl Transmitter {
    /// A transmitter writing into `sink`.
    pub fn new(sink: ConsoleSink) -> Transmitter {
        Transmitter {
            sink,
            stats: Counters::default(),
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> ConsoleStats {
        self.stats.get()
    }

    fn count(&self, f: impl FnOnce(&mut ConsoleStats)) {
        self.stats.update(f);
    }

    /// Sends the chains the driver made available on the transmit `queue` to the sink, at most
    /// one pass budget of them ([`super::drain_queue`]), then re-enables notifications.
    /// Returns whether the driver wants an interrupt for what was used (always, without
    /// EVENT_IDX; per `used_event` with it) and whether chains may be left. An error means the
    /// ring itself is broken.
    pub fn process_queue(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMem,
    ) -> Result<Pass, DeviceError> {
        super::drain_queue(queue, mem, |chain| {
            self.transmit(chain, mem);
            0
        })
    }

    /// Copies one chain's bytes to the sink, or drops the chain if it is malformed.
    fn transmit(&mut self, chain: DescriptorChain<&GuestMem>, mem: &GuestMem) {
        match read_chain(chain, mem) {
            Some(bytes) => {
                self.sink.push(&bytes);
                self.count(|s| {
                    s.chains = s.chains.wrapping_add(1);
                    s.bytes = s.bytes.wrapping_add(bytes.len() as u64);
                });
            }
            None => self.count(|s| s.dropped_chains += 1),
        }
    }
}

#[cfg(test)]
impl Transmitter {
    /// The counters, shared (for tests that read them while the engine runs).
    pub(crate) fn stats_handle(&self) -> Counters<ConsoleStats> {
        self.stats.clone()
    }
}

/// The bytes of a transmit chain, or `None` if it is malformed (see the module docs). Nothing
/// is read from guest memory before the whole chain has been checked.
fn read_chain(chain: DescriptorChain<&GuestMem>, mem: &GuestMem) -> Option<Vec<u8>> {
    let mut descs: Vec<Descriptor> = Vec::new();
    let mut total = 0u32;
    for d in chain {
        if descs.len() == MAX_DESCRIPTORS || d.is_write_only() {
            return None;
        }
        total = total
            .checked_add(d.len())
            .filter(|t| *t <= MAX_CHAIN_BYTES)?;
        if !vm_memory::GuestMemoryBackend::check_range(mem, d.addr(), d.len() as usize) {
            return None;
        }
        descs.push(d);
    }
    // The iterator stopped early: a loop cut off at the ring size, a bad `next`, ...
    // (No descriptor at all: a head index outside the ring.)
    if descs.last().is_none_or(Descriptor::has_next) {
        return None;
    }
    let mut bytes = vec![0u8; total as usize];
    let mut at = 0usize;
    for d in &descs {
        let n = d.len() as usize;
        mem.read_slice(&mut bytes[at..at + n], d.addr()).ok()?;
        at += n;
    }
    Some(bytes)
}

/// The queue work a [`Worker`] runs for the console: the transmit queue only.
#[derive(Debug)]
struct TransmitQueue {
    tx: Transmitter,
    queue: Queue,
    mem: GuestMem,
}

impl QueueHandler for TransmitQueue {
    fn process(&mut self) -> Result<Pass, DeviceError> {
        self.tx.process_queue(&mut self.queue, &self.mem)
    }
}

/// The virtio-console device: output on a worker thread while the driver has it running.
#[derive(Debug)]
pub struct Console {
    tx: Transmitter,
    /// Running or paused while the driver has the device active.
    worker: Option<Worker<TransmitQueue>>,
    /// The receive queue while active: kept (never used) so the device owns both rings.
    receiveq: Option<Queue>,
    config: [u8; CONFIG_LEN],
}

impl Console {
    /// A console whose output goes to `sink`.
    pub fn new(sink: ConsoleSink) -> Console {
        Console {
            tx: Transmitter::new(sink),
            worker: None,
            receiveq: None,
            config: [0; CONFIG_LEN],
        }
    }

    /// Transmit counters so far (readable while the device runs).
    pub fn stats(&self) -> ConsoleStats {
        self.tx.stats()
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_CONSOLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Nothing writable: EMERG_WRITE is not offered.
    }

    fn activate(&mut self, activation: Activation) -> Result<(), DeviceError> {
        if self.worker.is_some() {
            return Err(DeviceError::AlreadyActive);
        }
        let mut queues = activation.queues.into_iter();
        let rx = queues
            .next()
            .ok_or(DeviceError::QueueNotReady { index: RECEIVEQ })?;
        let tx = queues
            .next()
            .ok_or(DeviceError::QueueNotReady { index: TRANSMITQ })?;
        let handler = TransmitQueue {
            tx: self.tx.clone(),
            queue: tx.queue,
            mem: activation.mem,
        };
        let worker = Worker::spawn(
            "pvkit-virtio-console",
            handler,
            tx.notify,
            activation.interrupt,
        )?;
        self.worker = Some(worker);
        self.receiveq = Some(rx.queue);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(worker) = self.worker.take() {
            // The transmitter is shared (a clone): nothing to take back.
            let _ = worker.stop();
        }
        self.receiveq = None;
    }

    fn name(&self) -> &'static str {
        "virtio-console"
    }

    fn queue_states(&self) -> Vec<QueueState> {
        match (&self.receiveq, &self.worker) {
            (Some(rx), Some(w)) => vec![rx.state(), w.with_handler(|h| h.queue.state())],
            _ => Vec::new(),
        }
    }

    fn pause(&mut self) {
        if let Some(w) = &mut self.worker {
            w.pause();
        }
    }

    fn resume(&mut self) -> Result<(), DeviceError> {
        self.worker.as_mut().map_or(Ok(()), Worker::resume)
    }
}

/// [`Console`] state: the device's side of a virtio-console window (its transport and queues
/// are in [`super::mmio::MmioTransportState`]). Output already sent is the sink's, not state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConsoleState {
    /// Offered features.
    pub features: u64,
    /// The configuration space (`struct virtio_console_config`: all zero, nothing offered).
    pub config: Vec<u8>,
    /// Transmit counters.
    pub stats: ConsoleStats,
}

impl Persist for Console {
    type State = ConsoleState;

    fn save(&self) -> ConsoleState {
        ConsoleState {
            features: self.features(),
            config: self.config.to_vec(),
            stats: self.stats(),
        }
    }

    /// Checks that `state` describes this device and loads the counters. The device must be
    /// inactive (freshly built or reset): the transport restores the queues and re-activates.
    fn restore(&mut self, state: &ConsoleState) -> Result<(), StateError> {
        const WHAT: &str = "virtio-console";
        if state.features != self.features() || state.config != self.config {
            return Err(StateError::mismatch(
                WHAT,
                "offered features or configuration differ",
            ));
        }
        if self.worker.is_some() {
            return Err(StateError::invalid(WHAT, "restore into an active device"));
        }
        self.tx.stats.update(|s| *s = state.stats);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EventFd;

    use super::super::block::tests::{
        BUF, Driver, MEM_SIZE, R, RING, W, guest_memory, self_feeding_queue, within,
    };
    use super::super::{ActiveQueue, Interrupt};
    use super::*;
    use crate::devices::event::EventQueue;

    fn put(mem: &GuestMem, addr: u64, bytes: &[u8]) {
        mem.write_slice(bytes, GuestAddress(addr)).unwrap();
    }

    struct Bench<'m> {
        drv: Driver<'m>,
        queue: Queue,
        tx: Transmitter,
        sink: ConsoleSink,
        mem: &'m GuestMem,
    }

    impl<'m> Bench<'m> {
        fn new(mem: &'m GuestMem, event_idx: bool) -> Bench<'m> {
            let drv = Driver::new(mem, RING, 16);
            let queue = drv.queue(event_idx);
            let sink = ConsoleSink::new(None);
            Bench {
                drv,
                queue,
                tx: Transmitter::new(sink.clone()),
                sink,
                mem,
            }
        }

        /// Submits one chain and processes the queue; returns the used length.
        fn send(&mut self, parts: &[(u64, u32, bool)]) -> u32 {
            let before = self.drv.used_idx();
            self.drv.submit(parts);
            self.tx.process_queue(&mut self.queue, self.mem).unwrap();
            assert_eq!(
                self.drv.used_idx(),
                before.wrapping_add(1),
                "one completion"
            );
            self.drv.used_elem(before).1
        }
    }

    #[test]
    fn console_state_round_trips_and_refuses_another_device() {
        let c = Console::new(ConsoleSink::new(None));
        c.tx.stats.update(|s| {
            s.chains = 2;
            s.bytes = 10;
            s.dropped_chains = 1;
        });
        let mut fresh = Console::new(ConsoleSink::new(None));
        crate::state::assert_round_trip(&c, &mut fresh);
        assert_eq!(fresh.stats().dropped_chains, 1);
        let mut bad = c.save();
        bad.features = 0;
        assert!(matches!(
            fresh.restore(&bad),
            Err(StateError::Mismatch { .. })
        ));
        bad = c.save();
        bad.config = vec![1; 12];
        assert!(matches!(
            fresh.restore(&bad),
            Err(StateError::Mismatch { .. })
        ));
    }

    #[test]
    fn transmitted_bytes_reach_the_sink_in_order() {
        let mem = guest_memory();
        let mut b = Bench::new(&mem, false);
        put(&mem, BUF, b"hello, ");
        put(&mem, BUF + 0x1000, b"virtio world\n");
        assert_eq!(b.send(&[(BUF, 7, R), (BUF + 0x1000, 13, R)]), 0);
        put(&mem, BUF, b"again\n");
        assert_eq!(b.send(&[(BUF, 6, R)]), 0);
        // An empty chain is fine and adds nothing.
        assert_eq!(b.send(&[(BUF, 0, R)]), 0);
        assert_eq!(b.sink.captured(), b"hello, virtio world\nagain\n");
        let s = b.tx.stats();
        assert_eq!((s.chains, s.bytes, s.dropped_chains), (3, 26, 0));
    }

    #[test]
    fn malformed_chains_are_dropped_and_the_queue_keeps_working() {
        let mem = guest_memory();
        let mut b = Bench::new(&mem, false);
        put(&mem, BUF, &[b'x'; 4096]);
        // A device-writable buffer.
        assert_eq!(b.send(&[(BUF, 4, W)]), 0);
        assert_eq!(b.send(&[(BUF, 4, R), (BUF, 4, W)]), 0);
        // Buffers (partly) outside guest RAM.
        for addr in [MEM_SIZE - 8, MEM_SIZE, 0xC000_0000, u64::MAX - 3, u64::MAX] {
            assert_eq!(b.send(&[(addr, 16, R)]), 0);
            assert_eq!(b.send(&[(BUF, 4, R), (addr, 16, R)]), 0, "{addr:#x}");
        }
        // Over the byte cap, in one descriptor and summed (and a u32 overflow).
        assert_eq!(b.send(&[(BUF, MAX_CHAIN_BYTES + 1, R)]), 0);
        assert_eq!(b.send(&[(BUF, MAX_CHAIN_BYTES, R), (BUF, 1, R)]), 0);
        assert_eq!(b.send(&[(BUF, u32::MAX, R), (BUF, 2, R)]), 0);
        assert!(b.sink.captured().is_empty(), "nothing from a bad chain");
        assert_eq!(b.tx.stats().dropped_chains, 15);
        // Exactly the cap is fine.
        put(&mem, BUF, &vec![b'y'; MAX_CHAIN_BYTES as usize]);
        assert_eq!(b.send(&[(BUF, MAX_CHAIN_BYTES, R)]), 0);
        assert_eq!(b.sink.captured().len(), MAX_CHAIN_BYTES as usize);
    }

    #[test]
    fn descriptor_loops_and_bad_indices_end() {
        let mem = guest_memory();
        let mut b = Bench::new(&mem, false);
        put(&mem, BUF, b"loop");
        // 0 -> 1 -> 0 -> ...
        b.drv.put_desc(0, BUF, 4, VRING_DESC_F_NEXT, 1);
        b.drv.put_desc(1, BUF, 4, VRING_DESC_F_NEXT, 0);
        b.drv.publish(0);
        // `next` past the ring.
        b.drv.put_desc(2, BUF, 4, VRING_DESC_F_NEXT, 999);
        b.drv.publish(2);
        assert!(b.tx.process_queue(&mut b.queue, &mem).unwrap().interrupt);
        assert_eq!(b.drv.used_idx(), 2);
        assert!(b.sink.captured().is_empty());
        assert_eq!(b.tx.stats().dropped_chains, 2);
        // Still working.
        b.drv.submit(&[(BUF, 4, R)]);
        b.tx.process_queue(&mut b.queue, &mem).unwrap();
        assert_eq!(b.sink.captured(), b"loop");
        // A head past the ring cannot be given back: the ring is broken (needs a reset), so
        // the available index can never run ahead of the used one.
        b.drv.publish(999);
        let e = b.tx.process_queue(&mut b.queue, &mem).unwrap_err();
        assert!(
            matches!(
                e,
                DeviceError::HeadOutOfRange {
                    head: 999,
                    size: 16
                }
            ),
            "{e}"
        );
        assert_eq!(b.drv.used_idx(), 3);
    }

    #[test]
    fn event_idx_asks_for_an_interrupt_only_when_used_event_is_passed() {
        let mem = guest_memory();
        let mut b = Bench::new(&mem, true);
        put(&mem, BUF, b"z");
        b.drv.set_used_event(2);
        b.drv.submit(&[(BUF, 1, R)]);
        assert!(
            !b.tx.process_queue(&mut b.queue, &mem).unwrap().interrupt,
            "1 used"
        );
        assert_eq!(b.drv.avail_event(), 1);
        b.drv.submit(&[(BUF, 1, R)]);
        b.drv.submit(&[(BUF, 1, R)]);
        assert!(
            b.tx.process_queue(&mut b.queue, &mem).unwrap().interrupt,
            "3 used"
        );
        assert!(
            !b.tx.process_queue(&mut b.queue, &mem).unwrap().interrupt,
            "nothing new"
        );
        assert_eq!(b.sink.captured(), b"zzz");

        // Without EVENT_IDX every batch that used something interrupts.
        let mut b = Bench::new(&mem, false);
        b.drv.set_used_event(100);
        b.drv.submit(&[(BUF, 1, R)]);
        assert!(b.tx.process_queue(&mut b.queue, &mem).unwrap().interrupt);
    }

    #[test]
    fn an_avail_index_running_ahead_is_an_error_not_a_hang() {
        let mem = guest_memory();
        let mut b = Bench::new(&mem, false);
        b.drv.set_avail_idx(100);
        let e = b.tx.process_queue(&mut b.queue, &mem).unwrap_err();
        assert!(matches!(e, DeviceError::Ring(_)), "{e}");
    }

    #[test]
    fn device_offers_two_queues_and_no_config() {
        let c = Console::new(ConsoleSink::new(None));
        assert_eq!(c.device_type(), 3);
        assert_eq!(c.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
        assert_eq!(
            c.features(),
            1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX
        );
        let mut cfg = [0xff; 4];
        c.read_config(0, &mut cfg);
        assert_eq!(cfg, [0; 4]);
    }

    /// Finding 1 on the console, which shares the loop: a transmit ring that feeds itself is
    /// served one budget per call, and reset still stops and joins the worker promptly.
    #[test]
    fn a_transmit_ring_that_feeds_itself_is_bounded_and_stoppable() {
        let mem = guest_memory();
        put(&mem, BUF, b"x");
        let mut tx = Driver::new(&mem, RING + 0x3000, 16);
        tx.put_desc(0, BUF, 1, 0, 0);
        tx.put_desc(1, BUF, 1, 0, 0);
        let mut queue = self_feeding_queue(&mut tx);
        let sink = ConsoleSink::new(None);
        let mut t = Transmitter::new(sink.clone());
        let m = mem.clone();
        let (t, queue) = within("two passes", move || {
            for _ in 0..2 {
                assert!(t.process_queue(&mut queue, &m).unwrap().more);
            }
            (t, queue)
        });
        assert_eq!(t.stats().chains, 32);
        assert_eq!(sink.captured(), [b'x'; 32]);

        let rx = Driver::new(&mem, RING, 16);
        let notify = EventFd::new(0).unwrap();
        let kick = notify.try_clone().unwrap();
        let mut console = Console::new(ConsoleSink::new(None));
        console
            .activate(Activation {
                mem: mem.clone(),
                queues: vec![
                    ActiveQueue {
                        queue: rx.queue(false),
                        notify: EventFd::new(0).unwrap(),
                    },
                    ActiveQueue { queue, notify },
                ],
                features: 1 << VIRTIO_F_VERSION_1,
                interrupt: Interrupt::new(|| {}),
            })
            .unwrap();
        kick.write(1).unwrap();
        let stats = console.tx.stats.clone();
        crate::test_util::wait_until("many passes", || stats.get().chains > 1000);
        let console = within("the reset", move || {
            let mut console = console;
            console.reset();
            console
        });
        let n = console.stats().chains;
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(console.stats().chains, n, "nothing runs after the reset");
    }

    /// Activation with both queues, output through the worker, reset, and activation again.
    #[test]
    fn worker_transmits_and_reset_reactivates() {
        let mem = guest_memory();
        let sink = ConsoleSink::new(None);
        let mut console = Console::new(sink.clone());
        for round in 0..2u8 {
            let mut events = EventQueue::default();
            let waker = events.waker();
            let irq = Interrupt::new(move || waker.wake());
            mem.write_slice(&[0; 0x6000], GuestAddress(RING)).unwrap();
            let rx = Driver::new(&mem, RING, 16);
            let mut tx = Driver::new(&mem, RING + 0x3000, 16);
            let notify = EventFd::new(0).unwrap();
            let kick = notify.try_clone().unwrap();
            let act = |q: Queue, notify: EventFd| ActiveQueue { queue: q, notify };
            // Only one queue: refused.
            assert!(matches!(
                console.activate(Activation {
                    mem: mem.clone(),
                    queues: vec![act(rx.queue(true), EventFd::new(0).unwrap())],
                    features: 1 << VIRTIO_F_VERSION_1,
                    interrupt: irq.clone(),
                }),
                Err(DeviceError::QueueNotReady { index: 1 })
            ));
            console
                .activate(Activation {
                    mem: mem.clone(),
                    queues: vec![
                        act(rx.queue(true), EventFd::new(0).unwrap()),
                        act(tx.queue(true), notify),
                    ],
                    features: 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX,
                    interrupt: irq.clone(),
                })
                .unwrap();
            put(&mem, BUF, &[b'0' + round]);
            tx.submit(&[(BUF, 1, R)]);
            kick.write(1).unwrap();
            assert_eq!(events.wait(Some(Duration::from_secs(5))).events(), 1);
            assert_eq!(tx.used_idx(), 1);
            console.reset();
        }
        assert_eq!(sink.captured(), b"01");
        assert_eq!(console.stats().chains, 2);
    }
}
