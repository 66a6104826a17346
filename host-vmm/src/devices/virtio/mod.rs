//! virtio I/O, host side: a virtio-mmio transport (virtio 1.x "modern", register layout
//! version 2) and a virtio-blk device over a file, built on rust-vmm's `virtio-queue` and
//! `virtio-bindings`.
//!
//! # Design
//!
//! ```text
//!  vCPU thread                               device worker thread (one per device)
//!  ───────────                               ─────────────────────────────────────
//!  MMIO exit ─► MmioTransport::read/write    Worker: blocks on the queue's EventFd
//!               (registers, feature and      ─► QueueHandler::process
//!                status handshake, queue        (block: Disk::process_queue over
//!                setup, config space)            virtio-queue descriptor chains)
//!               DRIVER_OK ─► VirtioDevice::activate ─► spawns the worker
//!  guest writes QueueNotify ─► KVM ioeventfd ─► EventFd ─┘
//!  (no exit once registered; without registration the transport signals the same EventFd)
//!                                            completion ─► Interrupt: INT_VRING bit
//!                                            + the VM's callback (e.g. `Waker::wake`)
//! ```
//!
//! * [`mmio::MmioTransport`] is a pure state machine over `read(offset, data)` and
//!   `write(offset, data)`: it never blocks, never panics on a bad access, and validates what
//!   the driver set up (feature subset, queue sizes, ring addresses inside guest RAM via
//!   `virtio_queue::Queue::is_valid`) before it hands queues to the device. A setup the device
//!   cannot use sets `DEVICE_NEEDS_RESET` instead of failing the VMM.
//! * [`VirtioDevice`] is what a device implements: type, features, config space,
//!   [`VirtioDevice::activate`] and [`VirtioDevice::reset`].
//! * [`block::Block`] is virtio-blk over a [`std::fs::File`]; its request engine
//!   [`block::Disk::process_queue`] takes a queue and guest memory and nothing else, so unit
//!   tests drive it without threads or KVM.
//! * [`console::Console`] is virtio-console (one port, output only): its transmit queue's
//!   buffers go to the VM's [`crate::console::ConsoleSink`], like UART and `console_write`
//!   bytes; its engine [`console::Transmitter::process_queue`] is tested like the block one.
//! * Each [`mmio::MmioTransport`] is a [`crate::bus::BusDevice`] (one MMIO bus range per
//!   device window) and a [`mmio::VirtioWindow`] (what the VM asks of any window: `is_active`,
//!   ioeventfds, `pause`/`resume`); [`StatefulWindow`] adds its state as a
//!   [`MmioDeviceState`], so the VM keeps every window as one `Arc<Mutex<dyn StatefulWindow>>`.
//! * [`thread::Worker`] runs a device's queue on its own thread: it waits on the queue's
//!   [`EventFd`] (the ioeventfd KVM signals on QueueNotify), takes `Stop` from a crossbeam
//!   control channel, and reports completions through [`Interrupt`]. It can be paused at a
//!   batch boundary and resumed on the same queue (for saving state). Each batch is one
//!   bounded pass ([`drain_queue`], at most [`pass_budget`] chains); between passes the
//!   worker looks at its control channel (see "Bounds" below).
//!
//! # Trust
//!
//! The guest controls every byte of the rings and of each request. The host reads and writes
//! guest memory only through vm-memory's bounds-checked, volatile accessors on the
//! [`GuestMem`] it was given, so no guest value can make it touch host memory outside
//! guest RAM. Give devices the RAM view ([`crate::memory::GuestRam::mem`]) only: the
//! page-table pool is a separate mapping, so device DMA can never write page tables behind the
//! PTE validator. Malformed requests complete with an error status (or, when the request has
//! no usable status byte, with a zero-length used entry); a ring the device cannot follow any
//! more sets `DEVICE_NEEDS_RESET`. Nothing a guest does panics or stops the VMM.
//!
//! # Bounds
//!
//! Nothing a guest puts in its rings can hold a device thread or grow host memory without
//! bound; every limit is per device:
//!
//! * **Work per notification.** One pass ([`drain_queue`]) serves at most [`pass_budget`]
//!   chains — the queue size, at most 256 — then returns to the worker, which looks at its
//!   control channel and, if work may be left ([`Pass::more`]), signals its own eventfd to run
//!   another pass. A `Stop` (device reset, pause, VM shutdown) is therefore seen within one
//!   pass whatever the rings hold, even a ring whose own used-ring writes keep publishing
//!   buffers (issue 13, finding 1), and joining a worker always returns. Within a chain:
//!   virtio-queue follows at most one ring's (or one indirect table's) worth of descriptors,
//!   and the engines stop earlier — block at `SEG_MAX` + 2 descriptors and 1 MiB of data
//!   ([`block::MAX_DATA_LEN`]), console at [`console::MAX_DESCRIPTORS`] descriptors and
//!   64 KiB ([`console::MAX_CHAIN_BYTES`]).
//! * **Ring layout.** Rings that overlap — within a queue or across the queues of a device —
//!   are refused at activation (`DEVICE_NEEDS_RESET`; see [`mmio`]'s "Ring layout").
//! * **Ring consistency.** Every chain taken from the available ring is put in the used ring
//!   before the next is taken. A head index outside the ring cannot be given back, so it
//!   breaks the ring ([`DeviceError::HeadOutOfRange`], `DEVICE_NEEDS_RESET`) instead of being
//!   consumed silently; an available index more than a ring ahead does the same. The device's
//!   next available and next used positions therefore never drift apart.
//! * **Pending requests: none.** A worker serves its chains one at a time, synchronously, and
//!   completes each before taking the next; nothing is queued on the host side. The memory a
//!   chain needs is allocated for that chain and freed after it: block, a list of at most
//!   `SEG_MAX` + 2 descriptors (file I/O goes straight between the file and guest memory);
//!   console, at most 64 KiB of bytes.
//! * **Notifications.** A queue's eventfd is a kernel counter: any number of QueueNotify
//!   writes costs at most one more pass. The control channel only carries the host's own
//!   messages (one `Stop` per thread).
//! * **Threads.** One worker per active device; a second activation without a reset is
//!   refused ([`DeviceError::AlreadyActive`]); reset and pause join the worker.
//! * **Not bounded here:** the console's output goes to the VM's
//!   [`crate::console::ConsoleSink`], whose capture is bounded (or not) by the sink itself.
//!
//! # Wiring
//!
//! The VM builder creates the devices from the VM configuration — block with `--disk` (a
//! [`block::Disk`] opened before the VM is created, so a bad path is a clean error), then
//! console with `--virtio-console` — and numbers their windows in that attach order: window
//! *n* is at [`hypercall_abi::virtio::window`]`(n)`, [`mmio::MMIO_REGION_SIZE`] bytes long, and
//! the boot memory map publishes each window's base and device ID to the guest. For each device
//! it:
//!
//! 1. builds a [`mmio::MmioTransport`] over the RAM view ([`crate::memory::GuestRam::mem`]) with
//!    an [`Interrupt`] whose callback queues a guest event (the VM event queue's `Waker`), so
//!    a completion wakes a guest parked in `idle_yield` or has the event vector injected into
//!    a halted one;
//! 2. registers the transport, shared as an `Arc<Mutex<_>>`, on the VM's MMIO
//!    [`crate::bus::Bus`] for the window's range: it is a [`crate::bus::BusDevice`] named
//!    after its device ("virtio-blk", "virtio-console"), so MMIO exits in the window reach
//!    [`mmio::MmioTransport::read`]/[`write`](mmio::MmioTransport::write) with the offset
//!    into the window and are counted under that name;
//! 3. registers the queues' ioeventfds for the window's QueueNotify register
//!    ([`mmio::MmioTransport::register_ioeventfds`]), so notifications reach the worker
//!    without an exit;
//! 4. keeps a second handle to the same transport as a [`StatefulWindow`]: `is_active` for the
//!    `hlt` path, `pause`/`resume`, and its state as a [`MmioDeviceState`].
//!
//! The guest reads InterruptStatus and writes InterruptACK after a completion. Dropping a
//! transport drops its device, and dropping a device stops and joins its worker. Workers hold
//! clones of the RAM mapping (vm-memory regions are reference-counted), so the mapping outlives
//! any thread still using it.
//!
//! # State
//!
//! A window's state is an [`mmio::MmioTransportState`]: the transport's registers, each
//! queue's layout and ring positions, the interrupt, and the device's own state
//! ([`block::BlockState`], [`console::ConsoleState`]). Queue positions are read at a batch
//! boundary of the worker; [`mmio::MmioTransport::pause`] stops the worker there so nothing
//! touches guest memory while a snapshot is taken. Restoring an active window re-activates its
//! device on the restored queues.

pub mod block;
pub mod console;
#[cfg(test)]
mod fuzz;
pub mod mmio;
pub mod thread;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use crate::memory::GuestMem;
use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueState, QueueT};
use vmm_sys_util::eventfd::EventFd;

use crate::state::{Persist, StateError};

/// Why a device could not start or had to stop: something the guest set up that the device
/// cannot use, or (rarely) a host resource. Reported to the guest as `DEVICE_NEEDS_RESET`.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The driver did not set QueueReady for a queue the device needs.
    #[error("queue {index} is not ready")]
    QueueNotReady {
        /// Queue index.
        index: u16,
    },
    /// The driver chose a queue size that is zero, not a power of two, or above the maximum.
    #[error("queue {index}: size {size} is not a power of two in 1..={max}")]
    QueueSize {
        /// Queue index.
        index: u16,
        /// What the driver wrote to QueueNum.
        size: u32,
        /// QueueNumMax.
        max: u16,
    },
    /// A ring address is misaligned, or virtio-queue rejected the queue.
    #[error("queue {index}: {source}")]
    Queue {
        /// Queue index.
        index: u16,
        /// What virtio-queue said.
        source: virtio_queue::Error,
    },
    /// A ring does not lie inside guest RAM.
    #[error("queue {index}: descriptor table or rings outside guest RAM")]
    QueueMemory {
        /// Queue index.
        index: u16,
    },
    /// Two rings overlap: of one queue, or of two queues of the same device (see
    /// [`mmio`]'s "Ring layout").
    #[error("queue {index}: its {ring} overlaps the {other_ring} of queue {other}")]
    RingOverlap {
        /// Queue index.
        index: u16,
        /// Which of its rings.
        ring: &'static str,
        /// The queue whose ring it overlaps (may be `index` itself).
        other: u16,
        /// Which of that queue's rings.
        other_ring: &'static str,
    },
    /// The device saw a ring it cannot follow any more (e.g. the available index ran more than
    /// a whole ring ahead, or the used ring became unwritable).
    #[error("broken virtqueue: {0}")]
    Ring(virtio_queue::Error),
    /// The available ring named a head descriptor outside the descriptor table: a chain that
    /// cannot be put in the used ring, so the ring cannot be followed any more.
    #[error("broken virtqueue: head index {head} outside a ring of {size}")]
    HeadOutOfRange {
        /// The head index the driver published.
        head: u16,
        /// The queue size.
        size: u16,
    },
    /// The device was activated twice without a reset.
    #[error("device is already active")]
    AlreadyActive,
    /// The device lost its backend (its worker thread died) and cannot start again.
    #[error("device backend is gone (its worker thread stopped unexpectedly)")]
    BackendLost,
    /// A host resource failed (thread, eventfd).
    #[error(transparent)]
    Host(#[from] crate::Error),
    /// Activation had failed before the device state was saved (the original error, as text);
    /// restored so the device keeps asking for a reset.
    #[error("activation failed before the state was saved: {0}")]
    Restored(String),
}

/// A queue handed to a device at activation: validated against guest memory, with the
/// notification [`EventFd`] the guest's QueueNotify writes signal.
#[derive(Debug)]
pub struct ActiveQueue {
    /// The queue, ready, with EVENT_IDX set as negotiated.
    pub queue: Queue,
    /// Signalled when the driver notifies this queue.
    pub notify: EventFd,
}

/// Everything a device gets when the driver sets DRIVER_OK.
#[derive(Debug)]
pub struct Activation {
    /// Guest RAM (only RAM: never the page-table pool).
    pub mem: GuestMem,
    /// One entry per queue, in queue-index order.
    pub queues: Vec<ActiveQueue>,
    /// The features the driver accepted (a subset of [`VirtioDevice::features`]).
    pub features: u64,
    /// Where completions are reported.
    pub interrupt: Arc<Interrupt>,
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// The virtio device id (`VIRTIO_ID_*`).
    fn device_type(&self) -> u32;
    /// The maximum size of each queue; the slice length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Offered feature bits. The transport adds `VIRTIO_F_VERSION_1`.
    fn features(&self) -> u64;
    /// Reads device-specific configuration at `offset`; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device-specific configuration; read-only or unknown fields ignore the write.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device. On error the transport sets `DEVICE_NEEDS_RESET`.
    fn activate(&mut self, activation: Activation) -> Result<(), DeviceError>;
    /// Stops the device (joining any worker) and returns it to its initial state, ready for a
    /// new [`VirtioDevice::activate`]. No guest memory is touched after this returns.
    fn reset(&mut self);
    /// The name its exits are counted under ("virtio-blk", ...): the bus name of its window.
    fn name(&self) -> &'static str;
    /// The live state of each queue while the device is active, in queue-index order; empty
    /// while it is not. With a worker running this waits for the batch in flight, so the
    /// positions are those of a batch boundary (see [`thread::Worker`]).
    fn queue_states(&self) -> Vec<QueueState>;
    /// Stops queue processing at a batch boundary, keeping the queues: no guest memory is
    /// touched until [`VirtioDevice::resume`] (or a reset). Does nothing while inactive.
    fn pause(&mut self);
    /// Restarts queue processing after [`VirtioDevice::pause`] and looks at every ring once
    /// for what the driver queued meanwhile. Does nothing while inactive or running.
    fn resume(&mut self) -> Result<(), DeviceError>;
}

/// A device window's state: its transport state, tagged with its kind of device.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum MmioDeviceState {
    /// virtio-blk.
    Block(mmio::MmioTransportState<block::BlockState>),
    /// virtio-console.
    Console(mmio::MmioTransportState<console::ConsoleState>),
}

/// A device window as the VM holds it: what every window offers ([`mmio::VirtioWindow`]) and
/// its state as a [`MmioDeviceState`], whatever its kind of device.
pub trait StatefulWindow: mmio::VirtioWindow {
    /// The window's state (see [`Persist::save`]; pause the window first for a snapshot).
    fn save_state(&self) -> MmioDeviceState;
    /// Loads `state` into this freshly built window; a state of another kind of device is a
    /// [`StateError::Mismatch`].
    fn restore_state(&mut self, state: &MmioDeviceState) -> Result<(), StateError>;
}

fn wrong_kind(window: &str) -> StateError {
    StateError::mismatch(
        "virtio-mmio",
        format!("state of another kind of device for the {window} window"),
    )
}

impl StatefulWindow for mmio::MmioTransport<block::Block> {
    fn save_state(&self) -> MmioDeviceState {
        MmioDeviceState::Block(self.save())
    }

    fn restore_state(&mut self, state: &MmioDeviceState) -> Result<(), StateError> {
        match state {
            MmioDeviceState::Block(s) => self.restore(s),
            _ => Err(wrong_kind("virtio-blk")),
        }
    }
}

impl StatefulWindow for mmio::MmioTransport<console::Console> {
    fn save_state(&self) -> MmioDeviceState {
        MmioDeviceState::Console(self.save())
    }

    fn restore_state(&mut self, state: &MmioDeviceState) -> Result<(), StateError> {
        match state {
            MmioDeviceState::Console(s) => self.restore(s),
            _ => Err(wrong_kind("virtio-console")),
        }
    }
}

/// Serves a config-space read from `config` (the device's configuration structure as bytes):
/// the part of `[offset, offset + data.len())` inside `config` is copied, the rest reads as
/// zero. Any offset is accepted.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Some(tail) = usize::try_from(offset).ok().and_then(|o| config.get(o..)) else {
        return;
    };
    let n = tail.len().min(data.len());
    data[..n].copy_from_slice(&tail[..n]);
}

/// The device-to-driver signal shared by a transport and its device's worker: the
/// InterruptStatus bits, the needs-reset flag, and a callback that tells the VM a guest should
/// look (queue an event, inject an interrupt).
pub struct Interrupt {
    status: AtomicU32,
    needs_reset: AtomicBool,
    notify: Box<dyn Fn() + Send + Sync>,
}

impl fmt::Debug for Interrupt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Interrupt")
            .field("status", &self.status())
            .field("needs_reset", &self.needs_reset())
            .finish_non_exhaustive()
    }
}

impl Interrupt {
    /// An interrupt that calls `notify` whenever the device raises one, from whatever thread
    /// raises it (a worker, or the vCPU thread on a failed activation).
    pub fn new(notify: impl Fn() + Send + Sync + 'static) -> Arc<Interrupt> {
        Arc::new(Interrupt {
            status: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            notify: Box::new(notify),
        })
    }

    /// The device put buffers in a used ring: sets `VIRTIO_MMIO_INT_VRING` and notifies.
    pub fn signal_used_queue(&self) {
        self.status
            .fetch_or(VIRTIO_MMIO_INT_VRING, Ordering::AcqRel);
        (self.notify)();
    }

    /// The device cannot go on: sets `DEVICE_NEEDS_RESET` (seen in the Status register),
    /// raises a configuration-change interrupt and notifies.
    pub fn signal_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::Release);
        self.status
            .fetch_or(VIRTIO_MMIO_INT_CONFIG, Ordering::AcqRel);
        (self.notify)();
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// InterruptACK: clears the given bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    /// Whether the device asked for a reset.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::Acquire)
    }

    /// Loads saved InterruptStatus bits and needs-reset flag (without notifying: the VM's own
    /// pending events are restored with the VM).
    fn restore(&self, status: u32, needs_reset: bool) {
        self.status.store(status, Ordering::Release);
        self.needs_reset.store(needs_reset, Ordering::Release);
    }

    /// Device reset: no interrupt pending, no reset needed.
    fn clear(&self) {
        self.status.store(0, Ordering::Release);
        self.needs_reset.store(false, Ordering::Release);
    }
}

/// What one pass over a queue ([`drain_queue`]) did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pass {
    /// The driver wants an interrupt for the buffers this pass used (always, without
    /// EVENT_IDX, when something was used; per `used_event` with it).
    pub interrupt: bool,
    /// The pass stopped at its budget ([`pass_budget`]) and chains may be left: the caller
    /// must run another pass (after looking at its control messages), not wait for a
    /// notification.
    pub more: bool,
}

/// How many chains one pass over `queue` serves at most: the queue size. A well-behaved
/// driver never has more than that outstanding, so one pass still drains its ring; a ring the
/// driver (or another device's used ring) keeps refilling is served in passes of this many
/// chains, and the worker looks at its control messages between passes.
pub fn pass_budget(queue: &Queue) -> u16 {
    queue.size().max(1)
}

/// Serves what the driver made available on `queue` with `serve` (which returns the used
/// length: bytes written into the chain's buffers), at most [`pass_budget`] chains, then
/// re-enables notifications and goes again (within the same budget) if more arrived
/// meanwhile. Every chain taken from the available ring is put in the used ring before the
/// next is taken.
///
/// An error means the ring itself is broken and the device must be reset: the available index
/// ran more than a ring ahead, the used ring cannot be written, or a head index names no
/// descriptor ([`DeviceError::HeadOutOfRange`]; such a chain cannot be given back, and
/// consuming it silently would let the available index run ahead of the used one for good).
pub fn drain_queue(
    queue: &mut Queue,
    mem: &GuestMem,
    mut serve: impl FnMut(DescriptorChain<&GuestMem>) -> u32,
) -> Result<Pass, DeviceError> {
    let budget = pass_budget(queue);
    let mut served = 0u16;
    let more = loop {
        let mut progressed = false;
        while served < budget {
            let Some(chain) = queue.iter(mem).map_err(DeviceError::Ring)?.next() else {
                break;
            };
            progressed = true;
            served += 1;
            let head = chain.head_index();
            if head >= queue.size() {
                return Err(DeviceError::HeadOutOfRange {
                    head,
                    size: queue.size(),
                });
            }
            let len = serve(chain);
            queue.add_used(mem, head, len).map_err(DeviceError::Ring)?;
        }
        if served == budget {
            // Notifications stay as they are: the caller runs another pass anyway.
            break true;
        }
        // More arrived while notifications were off: go again. Without progress, stop rather
        // than spin; anything the driver adds from here on comes with a notification.
        if !queue.enable_notification(mem).map_err(DeviceError::Ring)? || !progressed {
            break false;
        }
    };
    let interrupt = served > 0 && queue.needs_notification(mem).map_err(DeviceError::Ring)?;
    Ok(Pass { interrupt, more })
}

/// A device's counters, shared between its worker thread and whoever reports them.
#[derive(Debug, Default)]
pub struct Counters<T>(std::sync::Arc<std::sync::Mutex<T>>);

impl<T> Clone for Counters<T> {
    fn clone(&self) -> Self {
        Counters(self.0.clone())
    }
}

impl<T: Copy> Counters<T> {
    fn lock(&self) -> std::sync::MutexGuard<'_, T> {
        crate::sync::lock(&self.0)
    }

    /// The counters now.
    pub fn get(&self) -> T {
        *self.lock()
    }

    /// Updates the counters.
    pub fn update(&self, f: impl FnOnce(&mut T)) {
        f(&mut self.lock());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;
    use std::time::Duration;

    use virtio_bindings::virtio_blk::{
        VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN,
        VIRTIO_BLK_T_OUT,
    };
    use virtio_bindings::virtio_config::{
        VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
        VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_F_VERSION_1,
    };
    use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
    use virtio_bindings::virtio_mmio::*;
    use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
    use vm_memory::{Bytes, GuestAddress};

    use super::block::tests::{
        BUF, Driver, HDR, R, RING, STATUS, TempImage, W, guest_memory, header, status,
    };
    use super::block::{Block, Disk};
    use super::console::Console;
    use super::mmio::MmioTransport;
    use super::*;
    use crate::console::ConsoleSink;
    use crate::devices::event::EventQueue;
    use crate::state::Persist;
    use crate::test_util::wait_until;

    #[test]
    fn interrupt_sets_acks_and_notifies() {
        let calls = Arc::new(AtomicU64::new(0));
        let c = calls.clone();
        let irq = Interrupt::new(move || {
            c.fetch_add(1, Ordering::Relaxed);
        });
        irq.signal_used_queue();
        assert_eq!(irq.status(), VIRTIO_MMIO_INT_VRING);
        irq.signal_needs_reset();
        assert_eq!(irq.status(), VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG);
        assert!(irq.needs_reset());
        irq.ack(VIRTIO_MMIO_INT_VRING);
        assert_eq!(irq.status(), VIRTIO_MMIO_INT_CONFIG);
        irq.clear();
        assert_eq!(irq.status(), 0);
        assert!(!irq.needs_reset());
        assert_eq!(calls.load(Ordering::Relaxed), 2);
        assert!(format!("{irq:?}").contains("Interrupt"));
    }

    #[test]
    fn config_bytes_past_the_end_read_as_zero() {
        let cfg = [1u8, 2, 3];
        let mut b = [0xff; 4];
        read_config_bytes(&cfg, 1, &mut b);
        assert_eq!(b, [2, 3, 0, 0]);
        read_config_bytes(&cfg, 3, &mut b);
        assert_eq!(b, [0; 4]);
        read_config_bytes(&cfg, u64::MAX, &mut b);
        assert_eq!(b, [0; 4]);
    }

    fn r32<D: VirtioDevice>(t: &MmioTransport<D>, offset: u32) -> u32 {
        let mut b = [0; 4];
        t.read(offset.into(), &mut b);
        u32::from_le_bytes(b)
    }

    fn w32<D: VirtioDevice>(t: &mut MmioTransport<D>, offset: u32, v: u32) {
        t.write(offset.into(), &v.to_le_bytes());
    }

    /// The driver's side of bringing a device up: features, then each queue at the rings of
    /// its `Driver`, then DRIVER_OK.
    fn bring_up<D: VirtioDevice>(t: &mut MmioTransport<D>, features: u64, queues: &[&Driver]) {
        let ok = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
        w32(t, VIRTIO_MMIO_STATUS, ok);
        w32(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        w32(t, VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
        w32(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        w32(t, VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
        let ok = ok | VIRTIO_CONFIG_S_FEATURES_OK;
        w32(t, VIRTIO_MMIO_STATUS, ok);
        for (i, drv) in (0..).zip(queues) {
            w32(t, VIRTIO_MMIO_QUEUE_SEL, i);
            w32(t, VIRTIO_MMIO_QUEUE_NUM, drv.size.into());
            w32(t, VIRTIO_MMIO_QUEUE_DESC_LOW, drv.desc as u32);
            w32(t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, drv.avail as u32);
            w32(t, VIRTIO_MMIO_QUEUE_USED_LOW, drv.used as u32);
            w32(t, VIRTIO_MMIO_QUEUE_READY, 1);
        }
        w32(t, VIRTIO_MMIO_STATUS, ok | VIRTIO_CONFIG_S_DRIVER_OK);
        assert!(t.is_active(), "{:?}", t.activation_error());
    }

    /// Save an active virtio-blk window mid-run (paused), restore it into a new VM's window
    /// over the same RAM and image: the new worker continues the same rings.
    #[test]
    fn block_window_state_round_trips_and_the_guest_continues() {
        let mem = guest_memory();
        let image = TempImage::new(64, 0);
        let mut events = EventQueue::default();
        let waker = events.waker();
        let irq = Interrupt::new(move || waker.wake());
        let block = Block::new(Disk::open(&image.0, false).unwrap());
        let mut t = MmioTransport::new(block, mem.clone(), irq).unwrap();
        let mut drv = Driver::new(&mem, RING, 16);
        let features = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX;
        bring_up(&mut t, features, &[&drv]);
        drv.set_used_event(0);
        let data: Vec<u8> = (0..512u32).map(|i| (i * 7) as u8).collect();
        mem.write_slice(&data, GuestAddress(BUF)).unwrap();
        header(&mem, HDR, VIRTIO_BLK_T_OUT, 3);
        drv.submit(&[(HDR, 16, R), (BUF, 512, R), (STATUS, 1, W)]);
        w32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(events.wait(Some(Duration::from_secs(5))).events(), 1);

        // Quiesce, save; a request queued while paused is not served.
        t.pause();
        header(&mem, HDR, VIRTIO_BLK_T_IN, 3);
        drv.set_used_event(1);
        drv.submit(&[(HDR, 16, R), (BUF + 0x1000, 512, W), (STATUS, 1, W)]);
        w32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(drv.used_idx(), 1);
        let state = t.save();
        assert_eq!(
            (state.queues[0].next_avail, state.queues[0].next_used),
            (1, 1)
        );
        assert_eq!(state.device.stats.writes, 1);
        assert_eq!(state.interrupt_status, VIRTIO_MMIO_INT_VRING);
        drop(t);

        // A new window over the same RAM and image: restoring restarts the worker, which finds
        // the request queued before the save.
        let mut events = EventQueue::default();
        let waker = events.waker();
        let irq = Interrupt::new(move || waker.wake());
        let block = Block::new(Disk::open(&image.0, false).unwrap());
        let mut fresh = MmioTransport::new(block, mem.clone(), irq).unwrap();
        let json = serde_json::to_string(&state).unwrap();
        fresh
            .restore(&serde_json::from_str(&json).unwrap())
            .unwrap();
        assert!(fresh.is_active());
        assert_eq!(events.wait(Some(Duration::from_secs(5))).events(), 1);
        assert_eq!(drv.used_idx(), 2);
        let mut back = vec![0; 512];
        mem.read_slice(&mut back, GuestAddress(BUF + 0x1000))
            .unwrap();
        assert_eq!(back, data);
        let stats = fresh.device().stats();
        assert_eq!((stats.reads, stats.writes), (1, 1));
        // And on through the register window.
        drv.set_used_event(2);
        drv.submit(&[(HDR, 16, R), (BUF + 0x2000, 512, W), (STATUS, 1, W)]);
        w32(&mut fresh, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(events.wait(Some(Duration::from_secs(5))).events(), 1);
        assert_eq!(drv.used_idx(), 3);
        fresh.pause();
        let again = fresh.save();
        assert_eq!(
            (again.queues[0].next_avail, again.queues[0].next_used),
            (3, 3)
        );

        // Another image is refused, and the window is left reset.
        let other = TempImage::new(65, 0);
        let block = Block::new(Disk::open(&other.0, false).unwrap());
        let mut wrong = MmioTransport::new(block, mem.clone(), Interrupt::new(|| {})).unwrap();
        assert!(matches!(
            wrong.restore(&state),
            Err(crate::state::StateError::Mismatch { .. })
        ));
        assert!(!wrong.is_active());
        let block = Block::new(Disk::open(&image.0, true).unwrap());
        let mut wrong = MmioTransport::new(block, mem.clone(), Interrupt::new(|| {})).unwrap();
        assert!(matches!(
            wrong.restore(&state),
            Err(crate::state::StateError::Mismatch { .. })
        ));
        assert_eq!(r32(&wrong, VIRTIO_MMIO_STATUS), 0);
    }

    #[test]
    fn mmio_device_states_restore_only_into_the_same_kind_of_window() {
        let mem = guest_memory();
        let image = TempImage::new(8, 0);
        let block = || -> Box<dyn StatefulWindow> {
            let b = Block::new(Disk::open(&image.0, false).unwrap());
            Box::new(MmioTransport::new(b, mem.clone(), Interrupt::new(|| {})).unwrap())
        };
        let console = || -> Box<dyn StatefulWindow> {
            let c = Console::new(ConsoleSink::new(None));
            Box::new(MmioTransport::new(c, mem.clone(), Interrupt::new(|| {})).unwrap())
        };
        for make in [&block as &dyn Fn() -> Box<dyn StatefulWindow>, &console] {
            let saved = make().save_state();
            let json = serde_json::to_string(&saved).unwrap();
            let back: MmioDeviceState = serde_json::from_str(&json).unwrap();
            let mut fresh = make();
            fresh.restore_state(&back).unwrap();
            assert_eq!(fresh.save_state(), saved);
        }
        assert!(matches!(
            block().restore_state(&console().save_state()),
            Err(crate::state::StateError::Mismatch { .. })
        ));
        assert!(matches!(
            console().restore_state(&block().save_state()),
            Err(crate::state::StateError::Mismatch { .. })
        ));
        let mut d = console();
        d.pause();
        d.resume().unwrap();
    }

    /// The same for virtio-console: the restored worker sends what was queued before the
    /// save.
    #[test]
    fn console_window_state_round_trips_and_the_guest_continues() {
        let mem = guest_memory();
        let sink = ConsoleSink::new(None);
        let mut events = EventQueue::default();
        let waker = events.waker();
        let irq = Interrupt::new(move || waker.wake());
        let mut t = MmioTransport::new(Console::new(sink.clone()), mem.clone(), irq).unwrap();
        let rx = Driver::new(&mem, RING, 16);
        let mut tx = Driver::new(&mem, RING + 0x3000, 16);
        bring_up(&mut t, 1 << VIRTIO_F_VERSION_1, &[&rx, &tx]);
        mem.write_slice(b"before ", GuestAddress(BUF)).unwrap();
        tx.submit(&[(BUF, 7, R)]);
        w32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        assert_eq!(events.wait(Some(Duration::from_secs(5))).events(), 1);
        t.pause();
        mem.write_slice(b"after\n", GuestAddress(BUF + 0x1000))
            .unwrap();
        tx.submit(&[(BUF + 0x1000, 6, R)]);
        let state = t.save();
        assert_eq!(state.queues[1].next_used, 1);
        assert_eq!(state.queues[0].next_used, 0);
        assert_eq!(state.device.stats.bytes, 7);
        drop(t);

        let sink2 = ConsoleSink::new(None);
        let mut events = EventQueue::default();
        let waker = events.waker();
        let irq = Interrupt::new(move || waker.wake());
        let mut fresh = MmioTransport::new(Console::new(sink2.clone()), mem.clone(), irq).unwrap();
        let json = serde_json::to_string(&state).unwrap();
        assert_eq!(
            serde_json::from_str::<mmio::MmioTransportState<_>>(&json).unwrap(),
            state
        );
        fresh.restore(&state).unwrap();
        assert_eq!(events.wait(Some(Duration::from_secs(5))).events(), 1);
        assert_eq!(sink.captured(), b"before ");
        assert_eq!(sink2.captured(), b"after\n");
        assert_eq!(fresh.device().stats().chains, 2);
        fresh.pause();
        let again = fresh.save();
        assert_eq!(again.queues[1].next_used, 2);
        assert_eq!(again.queues[0], state.queues[0]);
    }

    /// A driver's whole conversation with a block device over the register window, with the
    /// queue served by the worker thread and completions arriving as VM events.
    #[test]
    fn block_over_mmio_end_to_end() {
        let mem = guest_memory();
        let image = TempImage::new(64, 0);
        let mut events = EventQueue::default();
        let waker = events.waker();
        let irq = Interrupt::new(move || waker.wake());
        let block = Block::new(Disk::open(&image.0, false).unwrap());
        let mut t = MmioTransport::new(block, mem.clone(), irq).unwrap();

        assert_eq!(r32(&t, VIRTIO_MMIO_MAGIC_VALUE), mmio::MAGIC);
        assert_eq!(r32(&t, VIRTIO_MMIO_VERSION), 2);
        assert_eq!(r32(&t, VIRTIO_MMIO_DEVICE_ID), VIRTIO_ID_BLOCK);
        w32(&mut t, VIRTIO_MMIO_STATUS, 0);
        let mut s = VIRTIO_CONFIG_S_ACKNOWLEDGE;
        w32(&mut t, VIRTIO_MMIO_STATUS, s);
        s |= VIRTIO_CONFIG_S_DRIVER;
        w32(&mut t, VIRTIO_MMIO_STATUS, s);
        w32(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        let lo = r32(&t, VIRTIO_MMIO_DEVICE_FEATURES);
        w32(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        let hi = r32(&t, VIRTIO_MMIO_DEVICE_FEATURES);
        let offered = u64::from(hi) << 32 | u64::from(lo);
        let wanted = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_BLK_SIZE;
        assert_eq!(offered & wanted, wanted);
        w32(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        w32(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, wanted as u32);
        w32(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        w32(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, (wanted >> 32) as u32);
        s |= VIRTIO_CONFIG_S_FEATURES_OK;
        w32(&mut t, VIRTIO_MMIO_STATUS, s);
        assert_eq!(r32(&t, VIRTIO_MMIO_STATUS), s);
        // Capacity, a 64-bit config field read as two 32-bit halves.
        assert_eq!(r32(&t, VIRTIO_MMIO_CONFIG), 64);
        assert_eq!(r32(&t, VIRTIO_MMIO_CONFIG + 4), 0);

        let mut drv = Driver::new(&mem, RING, 16);
        w32(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
        assert_eq!(r32(&t, VIRTIO_MMIO_QUEUE_NUM_MAX), 256);
        w32(&mut t, VIRTIO_MMIO_QUEUE_NUM, 16);
        w32(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, drv.desc as u32);
        w32(&mut t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, drv.avail as u32);
        w32(&mut t, VIRTIO_MMIO_QUEUE_USED_LOW, drv.used as u32);
        w32(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
        s |= VIRTIO_CONFIG_S_DRIVER_OK;
        w32(&mut t, VIRTIO_MMIO_STATUS, s);
        assert!(t.is_active(), "{:?}", t.activation_error());

        // Write sector 10, notify through the register (the exit path), wait for the event.
        let data: Vec<u8> = (0..512u32).map(|i| (i * 13) as u8).collect();
        mem.write_slice(&data, GuestAddress(BUF)).unwrap();
        header(&mem, HDR, VIRTIO_BLK_T_OUT, 10);
        drv.submit(&[(HDR, 16, R), (BUF, 512, R), (STATUS, 1, W)]);
        w32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(events.wait(Some(Duration::from_secs(5))).events(), 1);
        assert_eq!(r32(&t, VIRTIO_MMIO_INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
        w32(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
        assert_eq!(r32(&t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        assert_eq!(drv.used_idx(), 1);
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK as u8);
        assert_eq!(image.bytes()[10 * 512..11 * 512], data[..]);

        // Read it back; the driver asks (used_event) for an interrupt after this one.
        drv.set_used_event(1);
        header(&mem, HDR, VIRTIO_BLK_T_IN, 10);
        drv.submit(&[(HDR, 16, R), (BUF + 0x1000, 512, W), (STATUS, 1, W)]);
        w32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(events.wait(Some(Duration::from_secs(5))).events(), 1);
        let mut back = vec![0; 512];
        mem.read_slice(&mut back, GuestAddress(BUF + 0x1000))
            .unwrap();
        assert_eq!(back, data);

        // A third request without moving used_event: served, but no interrupt (EVENT_IDX).
        drv.submit(&[(HDR, 16, R), (BUF + 0x2000, 512, W), (STATUS, 1, W)]);
        w32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        wait_until("the third completion", || drv.used_idx() == 3);
        assert_eq!(events.wait(Some(Duration::from_millis(50))).events(), 0);
        let stats = t.device().stats();
        assert_eq!((stats.reads, stats.writes), (2, 1));

        // Reset: the worker is joined, notifications are dropped until the next DRIVER_OK.
        w32(&mut t, VIRTIO_MMIO_STATUS, 0);
        assert!(!t.is_active());
        assert_eq!(r32(&t, VIRTIO_MMIO_STATUS), 0);
        drv.submit(&[(HDR, 16, R), (BUF, 512, W), (STATUS, 1, W)]);
        w32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(drv.used_idx(), 3);
    }
}
