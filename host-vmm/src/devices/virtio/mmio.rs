//! The virtio-mmio transport (virtio 1.x, register layout version 2): a pure state machine over
//! the device's register window, driving a [`VirtioDevice`].
//!
//! Registers `0x000..0x100` take aligned 32-bit accesses only, as the spec requires of drivers;
//! any other access reads as zero and writes are ignored. Device configuration at `0x100` takes
//! 1-, 2- and 4-byte accesses. Nothing a driver writes can panic the transport.
//!
//! The handshake is enforced: features are accepted only between DRIVER and FEATURES_OK,
//! FEATURES_OK only sticks if the driver's features are a subset of the device's and include
//! `VIRTIO_F_VERSION_1`, queue registers are writable only between FEATURES_OK and DRIVER_OK
//! (and not while the selected queue is ready), status bits can only be added, and writing 0
//! resets the device. DRIVER_OK validates every queue (size a power of two ≤ QueueNumMax,
//! aligned rings inside guest RAM, no two rings overlapping) before the device sees it; a
//! failure sets `DEVICE_NEEDS_RESET`. Restoring an active state validates its queues the same
//! way.
//!
//! # Ring layout
//!
//! Each queue has three rings: the descriptor table (16 bytes per entry), the available ring
//! (6 + 2 × size bytes, `used_event` included) and the used ring (6 + 8 × size bytes,
//! `avail_event` included). Activation refuses any two of them that share a byte — within one
//! queue **and across the queues of the device** — with [`DeviceError::RingOverlap`]. The
//! device writes the used rings (and `avail_event`); a used ring on top of an available ring
//! or descriptor table would let the device's own completions publish new buffers to itself
//! (a ring that never empties) or rewrite descriptors under it. No driver needs such a layout
//! (the spec lays the three parts out separately, and drivers allocate each queue's rings on
//! their own). Rings of *different* devices, and rings overlapping the data buffers, cannot be
//! checked here (one window does not know the others, buffers change per request); there, the
//! per-pass budget of every device loop ([`super::pass_budget`]) is what keeps a worker
//! stoppable.

use std::fmt;
use std::sync::Arc;

use crate::memory::GuestMem;
use kvm_ioctls::{IoEventAddress, VmFd};
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::{Activation, ActiveQueue, DeviceError, Interrupt, VirtioDevice};
use crate::bus::{BusAction, BusDevice};
use crate::error::Error;
use crate::state::{Persist, STATE_VERSION, StateError, check_version};

/// `MagicValue`: "virt" in little-endian.
pub const MAGIC: u32 = 0x7472_6976;
/// `Version` of the register layout (2: virtio 1.x, no legacy).
pub const VERSION: u32 = 2;
/// `VendorID`: "PVKT" in little-endian.
pub const VENDOR_ID: u32 = u32::from_le_bytes(*b"PVKT");
/// Size of one device's register window (registers, then config space at `0x100`).
pub const MMIO_REGION_SIZE: u64 = 0x1000;
/// Offset of the device-specific configuration space.
pub const CONFIG_OFFSET: u64 = VIRTIO_MMIO_CONFIG as u64;
/// Offset of QueueNotify, the register KVM's ioeventfds watch.
pub const QUEUE_NOTIFY_OFFSET: u64 = VIRTIO_MMIO_QUEUE_NOTIFY as u64;

/// Status bits a driver may set.
const DRIVER_STATUS_BITS: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE
    | VIRTIO_CONFIG_S_DRIVER
    | VIRTIO_CONFIG_S_FEATURES_OK
    | VIRTIO_CONFIG_S_DRIVER_OK
    | VIRTIO_CONFIG_S_FAILED;

/// What the driver wrote for one queue; turned into a [`Queue`] only at DRIVER_OK.
#[derive(Debug, Default, Clone, Copy)]
struct QueueConfig {
    num: u32,
    ready: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

/// A virtio-mmio device window.
#[derive(Debug)]
pub struct MmioTransport<D> {
    device: D,
    mem: GuestMem,
    interrupt: Arc<Interrupt>,
    notify: Vec<EventFd>,
    queues: Vec<QueueConfig>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    /// The driver wrote a feature bit above bit 63 (a window past 1).
    driver_features_unknown: bool,
    status: u32,
    config_generation: u32,
    active: bool,
    /// Queue processing stopped by [`MmioTransport::pause`].
    paused: bool,
    activation_error: Option<DeviceError>,
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// A transport for `device` over guest RAM `mem`, reporting through `interrupt`. Creates
    /// one notification eventfd per queue.
    pub fn new(
        device: D,
        mem: GuestMem,
        interrupt: Arc<Interrupt>,
    ) -> crate::Result<MmioTransport<D>> {
        let n = device.queue_max_sizes().len();
        let notify = (0..n)
            .map(|_| EventFd::new(libc::EFD_CLOEXEC))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|source| Error::Io {
                what: "cannot create a virtio queue eventfd".into(),
                source,
            })?;
        Ok(MmioTransport {
            device,
            mem,
            interrupt,
            notify,
            queues: vec![QueueConfig::default(); n],
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            driver_features_unknown: false,
            status: 0,
            config_generation: 0,
            active: false,
            paused: false,
            activation_error: None,
        })
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The notification eventfd of queue `index` (what KVM signals on QueueNotify).
    pub fn queue_notify_fd(&self, index: u16) -> Option<&EventFd> {
        self.notify.get(usize::from(index))
    }

    /// Whether the device is running (DRIVER_OK accepted, not reset since).
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// Stops the device's queue processing at a batch boundary (its worker is joined, its
    /// queues kept): from here until [`MmioTransport::resume`] the device touches no guest
    /// memory and its state ([`Persist::save`]) cannot change. The guest's notifications are
    /// kept in the queue eventfds meanwhile. Does nothing while inactive.
    ///
    /// This is the quiescent point for a snapshot: pause every device, save guest RAM and
    /// device state, then resume (or exit).
    pub fn pause(&mut self) {
        if self.active && !self.paused {
            self.device.pause();
            self.paused = true;
        }
    }

    /// Resumes queue processing after [`MmioTransport::pause`]; the device first looks at every
    /// ring once. A device that asked for a reset (`DEVICE_NEEDS_RESET`) stays stopped until
    /// the driver resets it.
    pub fn resume(&mut self) -> Result<(), DeviceError> {
        if !self.paused {
            return Ok(());
        }
        if self.interrupt.needs_reset() {
            return Ok(());
        }
        if let Err(e) = self.device.resume() {
            // The device cannot run again (e.g. no thread): the guest must reset it, as for a
            // ring the device cannot follow.
            self.interrupt.signal_needs_reset();
            return Err(e);
        }
        self.paused = false;
        Ok(())
    }

    /// Whether queue processing is stopped by [`MmioTransport::pause`] (or because the device
    /// was restored in a needs-reset state).
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Why the last DRIVER_OK did not start the device, if it did not.
    pub fn activation_error(&self) -> Option<&DeviceError> {
        self.activation_error.as_ref()
    }

    /// Offered features: the device's plus `VIRTIO_F_VERSION_1`.
    fn device_features(&self) -> u64 {
        self.device.features() | 1 << VIRTIO_F_VERSION_1
    }

    /// The Status register as the driver sees it.
    pub fn status(&self) -> u32 {
        if self.interrupt.needs_reset() {
            self.status | VIRTIO_CONFIG_S_NEEDS_RESET
        } else {
            self.status
        }
    }

    /// Registers the queues' eventfds with KVM for writes of the queue index to QueueNotify
    /// of the window at guest-physical `base`: the guest's notifications then wake the worker
    /// without an exit to the VMM. Without this, [`MmioTransport::write`] signals the same
    /// eventfds on the exit path.
    pub fn register_ioeventfds(&self, vm: &VmFd, base: u64) -> crate::Result<()> {
        let addr = IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET);
        for (index, fd) in self.notify.iter().enumerate() {
            // Datamatch on the 32-bit queue index the driver writes.
            vm.register_ioevent(fd, &addr, index as u32)
                .map_err(Error::kvm("register virtio-mmio ioeventfd"))?;
        }
        Ok(())
    }

    /// A guest read of `data.len()` bytes at `offset` into the window.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= CONFIG_OFFSET {
            if matches!(data.len(), 1 | 2 | 4) {
                self.device.read_config(offset - CONFIG_OFFSET, data);
            }
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            return;
        }
        let value = self.read_register(offset as u32);
        data.copy_from_slice(&value.to_le_bytes());
    }

    /// A guest write of `data` at `offset` into the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            // The driver may write configuration once it knows the features.
            if matches!(data.len(), 1 | 2 | 4) && self.status & VIRTIO_CONFIG_S_DRIVER != 0 {
                self.device.write_config(offset - CONFIG_OFFSET, data);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if offset.is_multiple_of(4) {
            self.write_register(offset as u32, u32::from_le_bytes(bytes));
        }
    }

    fn selected_queue(&self) -> Option<(usize, u16)> {
        let i = usize::try_from(self.queue_select).ok()?;
        let max = *self.device.queue_max_sizes().get(i)?;
        Some((i, max))
    }

    fn read_register(&self, offset: u32) -> u32 {
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            VIRTIO_MMIO_VERSION => VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_select {
                0 => self.device_features() as u32,
                1 => (self.device_features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |(_, max)| max.into()),
            VIRTIO_MMIO_QUEUE_READY => self
                .selected_queue()
                .map_or(0, |(i, _)| self.queues[i].ready.into()),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            VIRTIO_MMIO_STATUS => self.status(),
            // No shared-memory regions: the spec's "does not exist" answer is all ones.
            VIRTIO_MMIO_SHM_LEN_LOW
            | VIRTIO_MMIO_SHM_LEN_HIGH
            | VIRTIO_MMIO_SHM_BASE_LOW
            | VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            // Write-only and reserved registers read as zero.
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u32, value: u32) {
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_select = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_select = value,
            VIRTIO_MMIO_DRIVER_FEATURES => self.write_driver_features(value),
            VIRTIO_MMIO_QUEUE_SEL => self.queue_select = value,
            VIRTIO_MMIO_QUEUE_NUM => self.write_queue(|q| q.num = value),
            VIRTIO_MMIO_QUEUE_READY => self.write_queue(|q| q.ready = value == 1),
            VIRTIO_MMIO_QUEUE_DESC_LOW => self.write_queue(|q| set_low(&mut q.desc, value)),
            VIRTIO_MMIO_QUEUE_DESC_HIGH => self.write_queue(|q| set_high(&mut q.desc, value)),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => self.write_queue(|q| set_low(&mut q.driver, value)),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => self.write_queue(|q| set_high(&mut q.driver, value)),
            VIRTIO_MMIO_QUEUE_USED_LOW => self.write_queue(|q| set_low(&mut q.device, value)),
            VIRTIO_MMIO_QUEUE_USED_HIGH => self.write_queue(|q| set_high(&mut q.device, value)),
            VIRTIO_MMIO_QUEUE_NOTIFY => self.notify_queue(value),
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(value),
            VIRTIO_MMIO_STATUS => self.write_status(value),
            // Read-only, legacy-only and reserved registers ignore writes.
            _ => {}
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        let s = self.status;
        if s & VIRTIO_CONFIG_S_DRIVER == 0 || s & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            return;
        }
        match self.driver_features_select {
            0 => set_low(&mut self.driver_features, value),
            1 => set_high(&mut self.driver_features, value),
            _ => self.driver_features_unknown |= value != 0,
        }
    }

    /// Applies `f` to the selected queue's registers if the driver may change them now.
    fn write_queue(&mut self, f: impl FnOnce(&mut QueueConfig)) {
        let s = self.status;
        if s & VIRTIO_CONFIG_S_FEATURES_OK == 0 || s & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            return;
        }
        let Some((i, _)) = self.selected_queue() else {
            return;
        };
        let q = &mut self.queues[i];
        if q.ready {
            // Only QueueReady itself may change while a queue is ready.
            let mut copy = *q;
            f(&mut copy);
            q.ready = copy.ready;
        } else {
            f(q);
        }
    }

    fn notify_queue(&mut self, value: u32) {
        if !self.active || self.interrupt.needs_reset() {
            return;
        }
        if let Some(fd) = usize::try_from(value).ok().and_then(|i| self.notify.get(i)) {
            // Only fails if the counter would overflow: the worker is already due to run.
            let _ = fd.write(1);
        }
    }

    fn features_acceptable(&self) -> bool {
        !self.driver_features_unknown
            && self.driver_features & !self.device_features() == 0
            && self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        let mut new = value & DRIVER_STATUS_BITS;
        // Bits only go away through a reset.
        if new & old != old {
            return;
        }
        let added = new & !old;
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && (new & VIRTIO_CONFIG_S_DRIVER == 0 || !self.features_acceptable())
        {
            new &= !VIRTIO_CONFIG_S_FEATURES_OK;
        }
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0
            && (new & VIRTIO_CONFIG_S_FEATURES_OK == 0 || new & VIRTIO_CONFIG_S_FAILED != 0)
        {
            new &= !VIRTIO_CONFIG_S_DRIVER_OK;
        }
        self.status = new;
        if new & VIRTIO_CONFIG_S_DRIVER_OK != 0 && !self.active && self.activation_error.is_none() {
            match self.activate() {
                Ok(()) => self.active = true,
                Err(e) => {
                    self.activation_error = Some(e);
                    self.config_generation = self.config_generation.wrapping_add(1);
                    self.interrupt.signal_needs_reset();
                }
            }
        }
    }

    /// Builds and validates the queues, then starts the device.
    fn activate(&mut self) -> Result<(), DeviceError> {
        let queues = self.build_queues(&self.queues, self.driver_features, &[])?;
        self.start_device(queues)
    }

    /// The queues set up as `configs` with `driver_features`, validated as activation
    /// requires (ready, size a power of two ≤ QueueNumMax, aligned rings inside guest RAM), at
    /// the positions `(next_avail, next_used)` in `positions` (0 for a queue past its end).
    fn build_queues(
        &self,
        configs: &[QueueConfig],
        driver_features: u64,
        positions: &[(u16, u16)],
    ) -> Result<Vec<Queue>, DeviceError> {
        let event_idx = driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let max_sizes = self.device.queue_max_sizes();
        let mut queues = Vec::with_capacity(max_sizes.len());
        for (i, (cfg, &max)) in configs.iter().zip(max_sizes).enumerate() {
            let index = i as u16;
            if !cfg.ready {
                return Err(DeviceError::QueueNotReady { index });
            }
            let size = u16::try_from(cfg.num)
                .ok()
                .filter(|s| s.is_power_of_two() && *s <= max)
                .ok_or(DeviceError::QueueSize {
                    index,
                    size: cfg.num,
                    max,
                })?;
            let queue_err = |source| DeviceError::Queue { index, source };
            let mut queue = Queue::new(max).map_err(queue_err)?;
            queue.try_set_size(size).map_err(queue_err)?;
            queue
                .try_set_desc_table_address(GuestAddress(cfg.desc))
                .map_err(queue_err)?;
            queue
                .try_set_avail_ring_address(GuestAddress(cfg.driver))
                .map_err(queue_err)?;
            queue
                .try_set_used_ring_address(GuestAddress(cfg.device))
                .map_err(queue_err)?;
            queue.set_event_idx(event_idx);
            queue.set_ready(true);
            if !queue.is_valid(&self.mem) {
                return Err(DeviceError::QueueMemory { index });
            }
            let (next_avail, next_used) = positions.get(i).copied().unwrap_or_default();
            queue.set_next_avail(next_avail);
            queue.set_next_used(next_used);
            queues.push(queue);
        }
        check_overlaps(&queues)?;
        Ok(queues)
    }

    /// Hands `queues` (from [`Self::build_queues`]) to the device with their notification
    /// eventfds.
    fn start_device(&mut self, queues: Vec<Queue>) -> Result<(), DeviceError> {
        let mut active = Vec::with_capacity(queues.len());
        for (queue, fd) in queues.into_iter().zip(&self.notify) {
            let notify = fd.try_clone().map_err(|source| Error::Io {
                what: "cannot duplicate a virtio queue eventfd".into(),
                source,
            })?;
            active.push(ActiveQueue { queue, notify });
        }
        self.device.activate(Activation {
            mem: self.mem.clone(),
            queues: active,
            features: self.driver_features,
            interrupt: self.interrupt.clone(),
        })
    }

    /// Device reset: the device stops (its worker is joined), every register returns to its
    /// initial value, pending interrupts are dropped.
    fn reset(&mut self) {
        self.device.reset();
        self.queues.fill(QueueConfig::default());
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
        self.driver_features_unknown = false;
        self.status = 0;
        self.active = false;
        self.paused = false;
        self.activation_error = None;
        self.interrupt.clear();
    }
}

impl<D: VirtioDevice + fmt::Debug> BusDevice for MmioTransport<D> {
    fn name(&self) -> &'static str {
        self.device.name()
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        MmioTransport::read(self, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> BusAction {
        MmioTransport::write(self, offset, data);
        BusAction::Continue
    }
}

/// What the VM needs of a virtio window besides bus accesses and state, whatever the device:
/// lets it keep its windows as one list of `Arc<Mutex<dyn VirtioWindow>>` (the same
/// `Arc<Mutex<MmioTransport<_>>>` is also registered on the MMIO bus).
pub trait VirtioWindow: BusDevice {
    /// The virtio device ID (what the boot memory map publishes).
    fn device_id(&self) -> u32;
    /// [`MmioTransport::is_active`]: the device may complete a request at any time (a
    /// halted guest can be woken by it).
    fn is_active(&self) -> bool;
    /// [`MmioTransport::register_ioeventfds`].
    fn register_ioeventfds(&self, vm: &VmFd, base: u64) -> crate::Result<()>;
    /// [`MmioTransport::pause`].
    fn pause(&mut self);
    /// [`MmioTransport::resume`].
    fn resume(&mut self) -> Result<(), DeviceError>;
}

impl<D: VirtioDevice + fmt::Debug> VirtioWindow for MmioTransport<D> {
    fn device_id(&self) -> u32 {
        self.device.device_type()
    }

    fn is_active(&self) -> bool {
        MmioTransport::is_active(self)
    }

    fn register_ioeventfds(&self, vm: &VmFd, base: u64) -> crate::Result<()> {
        MmioTransport::register_ioeventfds(self, vm, base)
    }

    fn pause(&mut self) {
        MmioTransport::pause(self);
    }

    fn resume(&mut self) -> Result<(), DeviceError> {
        MmioTransport::resume(self)
    }
}

/// One queue of an [`MmioTransportState`]: what the driver wrote to its registers and, while
/// the device is active, where the device is in its rings.
///
/// The device's count of used entries not yet considered for an interrupt (virtio-queue's
/// `num_added`) is not recorded: state is read at a batch boundary, where it is always zero
/// (each batch ends by deciding whether to interrupt).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtqueueState {
    /// QueueNum as written (any value: it is checked at DRIVER_OK).
    pub size: u32,
    /// QueueReady.
    pub ready: bool,
    /// QueueDesc: the descriptor table.
    pub desc_table: u64,
    /// QueueDriver: the available ring.
    pub avail_ring: u64,
    /// QueueDevice: the used ring.
    pub used_ring: u64,
    /// The next available-ring entry the device takes (0 while inactive).
    pub next_avail: u16,
    /// The next used-ring entry the device fills (0 while inactive).
    pub next_used: u16,
}

/// [`MmioTransport`] state: the register file, the queues, the interrupt, and the device's
/// own state `S`. EVENT_IDX use follows from `driver_features`.
///
/// Saving reads the queue positions from the device at a batch boundary (see
/// [`VirtioDevice::queue_states`]); for a snapshot whose guest RAM matches, [`pause`] the
/// transport first so the device stops writing guest memory. Restoring an active device
/// re-activates it: its worker starts on the restored queues and looks at each ring once, so
/// requests the guest queued before the save are served. Restore guest RAM first.
///
/// [`pause`]: MmioTransport::pause
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState<S> {
    /// [`crate::state::STATE_VERSION`].
    pub version: u32,
    /// The virtio device ID: a state restores only into the same kind of device.
    pub device_type: u32,
    /// The Status register as the driver set it (without `DEVICE_NEEDS_RESET`).
    pub status: u32,
    /// DeviceFeaturesSel.
    pub device_features_select: u32,
    /// DriverFeaturesSel.
    pub driver_features_select: u32,
    /// DriverFeatures, both windows.
    pub driver_features: u64,
    /// The driver wrote a feature bit above bit 63.
    pub driver_features_unknown: bool,
    /// QueueSel.
    pub queue_select: u32,
    /// One per queue, in queue-index order.
    pub queues: Vec<VirtqueueState>,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// The device asked for a reset (`DEVICE_NEEDS_RESET`).
    pub needs_reset: bool,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// The device is running (DRIVER_OK accepted).
    pub active: bool,
    /// Why DRIVER_OK did not start the device, if it did not.
    pub activation_error: Option<String>,
    /// The device's own state.
    pub device: S,
}

/// Interrupt bits a device can raise.
const INTERRUPT_BITS: u32 = VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG;

impl<D: VirtioDevice + Persist> MmioTransport<D> {
    /// Checks `state` against this transport (device, RAM) and builds the queues an active
    /// state needs. Mutates nothing.
    fn check_state(
        &self,
        state: &MmioTransportState<D::State>,
    ) -> Result<Option<Vec<Queue>>, StateError> {
        const WHAT: &str = "virtio-mmio";
        let invalid = |why: String| Err(StateError::invalid(WHAT, why));
        check_version(state.version)?;
        if state.device_type != self.device.device_type() {
            return Err(StateError::mismatch(
                WHAT,
                format!(
                    "state of device type {}, this window has device type {}",
                    state.device_type,
                    self.device.device_type()
                ),
            ));
        }
        let max_sizes = self.device.queue_max_sizes();
        if state.queues.len() != max_sizes.len() {
            return Err(StateError::mismatch(
                WHAT,
                format!(
                    "{} queues saved, the device has {}",
                    state.queues.len(),
                    max_sizes.len()
                ),
            ));
        }
        let s = state.status;
        let has = |bit: u32| s & bit != 0;
        if s & !DRIVER_STATUS_BITS != 0 {
            return invalid(format!("status {s:#x} has bits a driver cannot set"));
        }
        if has(VIRTIO_CONFIG_S_FEATURES_OK) && !has(VIRTIO_CONFIG_S_DRIVER) {
            return invalid(format!("status {s:#x}: FEATURES_OK without DRIVER"));
        }
        if has(VIRTIO_CONFIG_S_DRIVER_OK) && !has(VIRTIO_CONFIG_S_FEATURES_OK) {
            return invalid(format!("status {s:#x}: DRIVER_OK without FEATURES_OK"));
        }
        let offered = self.device_features();
        let f = state.driver_features;
        if has(VIRTIO_CONFIG_S_FEATURES_OK)
            && (state.driver_features_unknown
                || f & !offered != 0
                || f & (1 << VIRTIO_F_VERSION_1) == 0)
        {
            return invalid(format!(
                "FEATURES_OK with driver features {f:#x}, not a subset of {offered:#x} with \
                 VERSION_1"
            ));
        }
        if state.interrupt_status & !INTERRUPT_BITS != 0 {
            return invalid(format!(
                "interrupt status {:#x} has unknown bits",
                state.interrupt_status
            ));
        }
        let driver_ok = has(VIRTIO_CONFIG_S_DRIVER_OK);
        // DRIVER_OK leads either to a running device or to a recorded activation error (which
        // asks for a reset); a device asks for a reset only once the driver is done.
        let consistent = match (driver_ok, state.active, &state.activation_error) {
            (false, false, None) => !state.needs_reset,
            (true, true, None) => true,
            (true, false, Some(_)) => state.needs_reset,
            _ => false,
        };
        if !consistent {
            return invalid(format!(
                "status {s:#x}, active {}, activation error {:?} and needs-reset {} do not fit \
                 together",
                state.active, state.activation_error, state.needs_reset
            ));
        }
        if !state.active {
            if state
                .queues
                .iter()
                .any(|q| q.next_avail != 0 || q.next_used != 0)
            {
                return invalid("ring positions for an inactive device".into());
            }
            return Ok(None);
        }
        // Build the queues exactly as activation does.
        let configs: Vec<QueueConfig> = state.queues.iter().map(QueueConfig::from).collect();
        let positions: Vec<(u16, u16)> = state
            .queues
            .iter()
            .map(|q| (q.next_avail, q.next_used))
            .collect();
        self.build_queues(&configs, f, &positions)
            .map(Some)
            .or_else(|e| invalid(format!("cannot re-activate: {e}")))
    }
}

impl<D: VirtioDevice + Persist> Persist for MmioTransport<D> {
    type State = MmioTransportState<D::State>;

    /// The transport's state, with queue positions read from the device at a batch boundary.
    fn save(&self) -> Self::State {
        let live = if self.active {
            self.device.queue_states()
        } else {
            Vec::new()
        };
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let (next_avail, next_used) =
                    live.get(i).map_or((0, 0), |l| (l.next_avail, l.next_used));
                VirtqueueState {
                    size: q.num,
                    ready: q.ready,
                    desc_table: q.desc,
                    avail_ring: q.driver,
                    used_ring: q.device,
                    next_avail,
                    next_used,
                }
            })
            .collect();
        MmioTransportState {
            version: STATE_VERSION,
            device_type: self.device.device_type(),
            status: self.status,
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            driver_features: self.driver_features,
            driver_features_unknown: self.driver_features_unknown,
            queue_select: self.queue_select,
            queues,
            interrupt_status: self.interrupt.status(),
            needs_reset: self.interrupt.needs_reset(),
            config_generation: self.config_generation,
            active: self.active,
            activation_error: self.activation_error.as_ref().map(|e| match e {
                DeviceError::Restored(why) => why.clone(),
                e => e.to_string(),
            }),
            device: self.device.save(),
        }
    }

    /// Validates `state` (versions, device, status consistency, and for an active device every
    /// queue as activation checks it), resets the window, loads the device's and the
    /// transport's state, and re-activates an active device: its worker starts on the restored
    /// queues and looks at each ring once. A device that had asked for a reset is restored
    /// stopped (paused) until the driver resets it. On error the window is left as it was
    /// (validation failed) or reset (the device refused its state, or could not start).
    fn restore(&mut self, state: &Self::State) -> Result<(), StateError> {
        let queues = self.check_state(state)?;
        self.reset();
        self.device.restore(&state.device)?;
        for (cfg, q) in self.queues.iter_mut().zip(&state.queues) {
            *cfg = QueueConfig::from(q);
        }
        self.queue_select = state.queue_select;
        self.device_features_select = state.device_features_select;
        self.driver_features_select = state.driver_features_select;
        self.driver_features = state.driver_features;
        self.driver_features_unknown = state.driver_features_unknown;
        self.status = state.status;
        self.config_generation = state.config_generation;
        self.activation_error = state.activation_error.clone().map(DeviceError::Restored);
        self.interrupt
            .restore(state.interrupt_status, state.needs_reset);
        if let Some(queues) = queues {
            if let Err(e) = self.start_device(queues) {
                self.reset();
                return Err(StateError::invalid(
                    "virtio-mmio",
                    format!("cannot re-activate the device: {e}"),
                ));
            }
            self.active = true;
            if state.needs_reset {
                // It had stopped processing: keep it so until the driver resets it.
                self.device.pause();
                self.paused = true;
            } else {
                for fd in &self.notify {
                    // Only fails if the counter would overflow: the worker is due anyway.
                    let _ = fd.write(1);
                }
            }
        }
        Ok(())
    }
}

impl From<&VirtqueueState> for QueueConfig {
    fn from(q: &VirtqueueState) -> QueueConfig {
        QueueConfig {
            num: q.size,
            ready: q.ready,
            desc: q.desc_table,
            driver: q.avail_ring,
            device: q.used_ring,
        }
    }
}

/// The rings of `queue` as `(name, guest-physical start, length in bytes)`.
fn rings(queue: &Queue) -> [(&'static str, u64, u64); 3] {
    let size = u64::from(queue.size());
    [
        ("descriptor table", queue.desc_table(), 16 * size),
        ("available ring", queue.avail_ring(), 6 + 2 * size),
        ("used ring", queue.used_ring(), 6 + 8 * size),
    ]
}

/// Refuses any two rings of `queues` (one device's queues, in index order) that share a byte;
/// see the module docs' "Ring layout".
fn check_overlaps(queues: &[Queue]) -> Result<(), DeviceError> {
    let all: Vec<(u16, &'static str, u64, u64)> = (0u16..)
        .zip(queues)
        .flat_map(|(index, q)| rings(q).map(|(name, start, len)| (index, name, start, len)))
        .collect();
    for (i, &(index, ring, start, len)) in all.iter().enumerate() {
        for &(other, other_ring, other_start, other_len) in &all[..i] {
            // Both ranges lie in guest RAM (checked before), so the ends cannot overflow; the
            // saturation only keeps this function total.
            if start < other_start.saturating_add(other_len)
                && other_start < start.saturating_add(len)
            {
                return Err(DeviceError::RingOverlap {
                    index,
                    ring,
                    other,
                    other_ring,
                });
            }
        }
    }
    Ok(())
}

fn set_low(reg: &mut u64, value: u32) {
    *reg = (*reg & !0xffff_ffff) | u64::from(value);
}

fn set_high(reg: &mut u64, value: u32) {
    *reg = (*reg & 0xffff_ffff) | u64::from(value) << 32;
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Mutex;

    use super::*;

    pub(crate) const MEM_SIZE: usize = 1 << 20;
    const DESC: u64 = 0x1_0000;
    const AVAIL: u64 = 0x2_0000;
    const USED: u64 = 0x3_0000;

    /// Size, descriptor table, avail ring, used ring, EVENT_IDX of an activated queue.
    pub(crate) type QueueSeen = (u16, u64, u64, u64, bool);
    type ErrorCheck = fn(&DeviceError) -> bool;

    /// What the fake device saw.
    #[derive(Debug, Default)]
    pub(crate) struct Log {
        pub(crate) activations: Vec<(u64, Vec<QueueSeen>)>,
        resets: u32,
        pauses: u32,
        resumes: u32,
        config_writes: Vec<(u64, Vec<u8>)>,
    }

    #[derive(Debug)]
    pub(crate) struct Fake {
        log: Arc<Mutex<Log>>,
        config: [u8; 8],
        /// The queues of the current activation.
        queues: Vec<Queue>,
    }

    impl Persist for Fake {
        type State = Vec<u8>;
        fn save(&self) -> Vec<u8> {
            self.config.to_vec()
        }
        fn restore(&mut self, state: &Vec<u8>) -> Result<(), StateError> {
            self.config = state
                .as_slice()
                .try_into()
                .map_err(|_| StateError::mismatch("fake", "config length"))?;
            Ok(())
        }
    }

    impl VirtioDevice for Fake {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn features(&self) -> u64 {
            1 << VIRTIO_RING_F_EVENT_IDX | 1 << 3
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            super::super::read_config_bytes(&self.config, offset, data);
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            self.log
                .lock()
                .unwrap()
                .config_writes
                .push((offset, data.to_vec()));
        }
        fn activate(&mut self, a: Activation) -> Result<(), DeviceError> {
            let queues = a
                .queues
                .iter()
                .map(|q| {
                    let q = &q.queue;
                    (
                        q.size(),
                        q.desc_table(),
                        q.avail_ring(),
                        q.used_ring(),
                        q.event_idx_enabled(),
                    )
                })
                .collect();
            self.log
                .lock()
                .unwrap()
                .activations
                .push((a.features, queues));
            self.queues = a.queues.into_iter().map(|q| q.queue).collect();
            Ok(())
        }
        fn reset(&mut self) {
            self.log.lock().unwrap().resets += 1;
            self.queues.clear();
        }
        fn name(&self) -> &'static str {
            "fake"
        }
        fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
            self.queues.iter().map(Queue::state).collect()
        }
        fn pause(&mut self) {
            self.log.lock().unwrap().pauses += 1;
        }
        fn resume(&mut self) -> Result<(), DeviceError> {
            self.log.lock().unwrap().resumes += 1;
            Ok(())
        }
    }

    pub(crate) fn transport() -> (MmioTransport<Fake>, Arc<Mutex<Log>>) {
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let log = Arc::new(Mutex::new(Log::default()));
        let dev = Fake {
            log: log.clone(),
            config: [1, 2, 3, 4, 5, 6, 7, 8],
            queues: Vec::new(),
        };
        (
            MmioTransport::new(dev, mem, Interrupt::new(|| {})).unwrap(),
            log,
        )
    }

    pub(crate) fn r32(t: &MmioTransport<Fake>, offset: u32) -> u32 {
        let mut b = [0xaa; 4];
        t.read(offset.into(), &mut b);
        u32::from_le_bytes(b)
    }

    fn w32(t: &mut MmioTransport<Fake>, offset: u32, v: u32) {
        t.write(offset.into(), &v.to_le_bytes());
    }

    const ACK_DRIVER: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
    const FEATURES_OK: u32 = ACK_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
    const DRIVER_OK: u32 = FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK;

    fn negotiate(t: &mut MmioTransport<Fake>, features: u64) -> u32 {
        w32(t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        w32(t, VIRTIO_MMIO_STATUS, ACK_DRIVER);
        w32(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        w32(t, VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
        w32(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        w32(t, VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
        w32(t, VIRTIO_MMIO_STATUS, FEATURES_OK);
        r32(t, VIRTIO_MMIO_STATUS)
    }

    fn setup_queue(t: &mut MmioTransport<Fake>, index: u32, num: u32, base: u64) {
        w32(t, VIRTIO_MMIO_QUEUE_SEL, index);
        w32(t, VIRTIO_MMIO_QUEUE_NUM, num);
        w32(t, VIRTIO_MMIO_QUEUE_DESC_LOW, (base + DESC) as u32);
        w32(t, VIRTIO_MMIO_QUEUE_DESC_HIGH, ((base + DESC) >> 32) as u32);
        w32(t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, (base + AVAIL) as u32);
        w32(
            t,
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
            ((base + AVAIL) >> 32) as u32,
        );
        w32(t, VIRTIO_MMIO_QUEUE_USED_LOW, (base + USED) as u32);
        w32(t, VIRTIO_MMIO_QUEUE_USED_HIGH, ((base + USED) >> 32) as u32);
        w32(t, VIRTIO_MMIO_QUEUE_READY, 1);
    }

    const V1: u64 = 1 << VIRTIO_F_VERSION_1;
    const EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;

    #[test]
    fn identity_registers() {
        let (t, _) = transport();
        assert_eq!(r32(&t, VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(r32(&t, VIRTIO_MMIO_VERSION), 2);
        assert_eq!(r32(&t, VIRTIO_MMIO_DEVICE_ID), 42);
        assert_eq!(r32(&t, VIRTIO_MMIO_VENDOR_ID).to_le_bytes(), *b"PVKT");
        assert_eq!(r32(&t, VIRTIO_MMIO_STATUS), 0);
        assert_eq!(
            r32(&t, VIRTIO_MMIO_SHM_LEN_LOW),
            u32::MAX,
            "no shared memory"
        );
        assert_eq!(r32(&t, VIRTIO_MMIO_CONFIG_GENERATION), 0);
    }

    #[test]
    fn feature_windows_and_negotiation() {
        let (mut t, log) = transport();
        w32(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        assert_eq!(
            r32(&t, VIRTIO_MMIO_DEVICE_FEATURES),
            (EVENT_IDX | 1 << 3) as u32
        );
        w32(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        assert_eq!(
            r32(&t, VIRTIO_MMIO_DEVICE_FEATURES),
            1,
            "VERSION_1 is bit 32"
        );
        w32(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 2);
        assert_eq!(r32(&t, VIRTIO_MMIO_DEVICE_FEATURES), 0);

        // Features written before DRIVER are ignored.
        w32(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1 << 3);
        assert_eq!(negotiate(&mut t, V1 | EVENT_IDX), FEATURES_OK);
        // ... and after FEATURES_OK too.
        w32(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        w32(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1 << 3);
        setup_queue(&mut t, 0, 16, 0);
        setup_queue(&mut t, 1, 8, 0x4_0000);
        w32(&mut t, VIRTIO_MMIO_STATUS, DRIVER_OK);
        assert_eq!(r32(&t, VIRTIO_MMIO_STATUS), DRIVER_OK);
        assert!(t.is_active());
        let log = log.lock().unwrap();
        let (features, queues) = &log.activations[0];
        assert_eq!(*features, V1 | EVENT_IDX);
        assert_eq!(queues[0], (16, DESC, AVAIL, USED, true));
        assert_eq!(
            queues[1],
            (8, 0x4_0000 + DESC, 0x4_0000 + AVAIL, 0x4_0000 + USED, true)
        );
    }

    #[test]
    fn features_ok_requires_a_subset_with_version_1() {
        for bad in [
            0,                        // no VERSION_1
            EVENT_IDX,                // no VERSION_1
            V1 | 1 << 5,              // not offered
            V1 | 1 << 40,             // not offered, high window
            V1 | EVENT_IDX | 1 << 63, // not offered
        ] {
            let (mut t, _) = transport();
            assert_eq!(negotiate(&mut t, bad), ACK_DRIVER, "{bad:#x}");
            // Without FEATURES_OK, DRIVER_OK does not stick and nothing starts.
            setup_queue(&mut t, 0, 16, 0);
            w32(
                &mut t,
                VIRTIO_MMIO_STATUS,
                ACK_DRIVER | VIRTIO_CONFIG_S_DRIVER_OK,
            );
            assert_eq!(r32(&t, VIRTIO_MMIO_STATUS), ACK_DRIVER);
            assert!(!t.is_active());
        }
        // A bit in a window past 1 is never offered.
        let (mut t, _) = transport();
        w32(&mut t, VIRTIO_MMIO_STATUS, ACK_DRIVER);
        w32(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        w32(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
        w32(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 7);
        w32(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
        w32(&mut t, VIRTIO_MMIO_STATUS, FEATURES_OK);
        assert_eq!(r32(&t, VIRTIO_MMIO_STATUS), ACK_DRIVER);
    }

    #[test]
    fn status_bits_cannot_be_cleared_or_skipped() {
        let (mut t, _) = transport();
        // FEATURES_OK without DRIVER is refused.
        w32(
            &mut t,
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_FEATURES_OK,
        );
        assert_eq!(r32(&t, VIRTIO_MMIO_STATUS), VIRTIO_CONFIG_S_ACKNOWLEDGE);
        assert_eq!(negotiate(&mut t, V1), FEATURES_OK);
        // Clearing a bit is ignored; NEEDS_RESET cannot be set by the driver.
        w32(&mut t, VIRTIO_MMIO_STATUS, ACK_DRIVER);
        w32(
            &mut t,
            VIRTIO_MMIO_STATUS,
            FEATURES_OK | VIRTIO_CONFIG_S_NEEDS_RESET,
        );
        assert_eq!(r32(&t, VIRTIO_MMIO_STATUS), FEATURES_OK);
        // FAILED blocks DRIVER_OK.
        setup_queue(&mut t, 0, 16, 0);
        setup_queue(&mut t, 1, 8, 0x4_0000);
        w32(
            &mut t,
            VIRTIO_MMIO_STATUS,
            DRIVER_OK | VIRTIO_CONFIG_S_FAILED,
        );
        assert_eq!(
            r32(&t, VIRTIO_MMIO_STATUS),
            FEATURES_OK | VIRTIO_CONFIG_S_FAILED
        );
        assert!(!t.is_active());
    }

    #[test]
    fn queue_registers_follow_the_handshake() {
        let (mut t, log) = transport();
        // Before FEATURES_OK queue writes are ignored.
        setup_queue(&mut t, 0, 16, 0);
        assert_eq!(r32(&t, VIRTIO_MMIO_QUEUE_READY), 0);
        negotiate(&mut t, V1);
        w32(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
        assert_eq!(r32(&t, VIRTIO_MMIO_QUEUE_NUM_MAX), 16);
        w32(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
        assert_eq!(r32(&t, VIRTIO_MMIO_QUEUE_NUM_MAX), 8);
        w32(&mut t, VIRTIO_MMIO_QUEUE_SEL, 2);
        assert_eq!(r32(&t, VIRTIO_MMIO_QUEUE_NUM_MAX), 0, "no such queue");
        setup_queue(&mut t, 2, 8, 0); // ignored, no panic
        setup_queue(&mut t, 0, 16, 0);
        setup_queue(&mut t, 1, 8, 0x4_0000);
        w32(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
        assert_eq!(r32(&t, VIRTIO_MMIO_QUEUE_READY), 1);
        // A ready queue keeps its layout.
        w32(&mut t, VIRTIO_MMIO_QUEUE_NUM, 4);
        w32(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x8000);
        w32(&mut t, VIRTIO_MMIO_STATUS, DRIVER_OK);
        assert!(t.is_active());
        assert_eq!(log.lock().unwrap().activations[0].1[0].0, 16);
        assert_eq!(log.lock().unwrap().activations[0].1[0].1, DESC);
        // After DRIVER_OK nothing changes either.
        w32(&mut t, VIRTIO_MMIO_QUEUE_READY, 0);
        assert_eq!(r32(&t, VIRTIO_MMIO_QUEUE_READY), 1);
    }

    fn expect_needs_reset(t: &MmioTransport<Fake>, log: &Mutex<Log>) {
        assert!(!t.is_active());
        assert!(log.lock().unwrap().activations.is_empty());
        let status = r32(t, VIRTIO_MMIO_STATUS);
        assert_eq!(status, DRIVER_OK | VIRTIO_CONFIG_S_NEEDS_RESET);
        assert_eq!(r32(t, VIRTIO_MMIO_INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(r32(t, VIRTIO_MMIO_CONFIG_GENERATION), 1);
    }

    #[test]
    fn activation_rejects_bad_queue_sizes() {
        for (num, why) in [(0, "zero"), (12, "not a power of two"), (32, "above max")] {
            let (mut t, log) = transport();
            negotiate(&mut t, V1);
            setup_queue(&mut t, 0, num, 0);
            setup_queue(&mut t, 1, 8, 0x4_0000);
            w32(&mut t, VIRTIO_MMIO_STATUS, DRIVER_OK);
            expect_needs_reset(&t, &log);
            assert!(
                matches!(
                    t.activation_error(),
                    Some(DeviceError::QueueSize { index: 0, .. })
                ),
                "{why}: {:?}",
                t.activation_error()
            );
        }
    }

    #[test]
    fn activation_rejects_rings_outside_guest_memory_or_misaligned() {
        let cases: [(u64, ErrorCheck); 4] = [
            // The rings end past guest RAM.
            (MEM_SIZE as u64 - 0x2_0000, |e| {
                matches!(e, DeviceError::QueueMemory { index: 0 })
            }),
            // In the MMIO window, not RAM.
            (0xC000_0000, |e| {
                matches!(e, DeviceError::QueueMemory { .. })
            }),
            // Near the top of the address space: no overflow, no panic.
            (u64::MAX - 0x3_ffff, |e| {
                matches!(e, DeviceError::QueueMemory { .. })
            }),
            // Misaligned descriptor table.
            (8, |e| matches!(e, DeviceError::Queue { index: 0, .. })),
        ];
        for (base, ok) in cases {
            let (mut t, log) = transport();
            negotiate(&mut t, V1);
            setup_queue(&mut t, 0, 16, base);
            setup_queue(&mut t, 1, 8, 0x4_0000);
            w32(&mut t, VIRTIO_MMIO_STATUS, DRIVER_OK);
            expect_needs_reset(&t, &log);
            let e = t.activation_error().unwrap();
            assert!(ok(e), "base {base:#x}: {e}");
        }
    }

    /// Sets up queue `index` with explicit ring addresses.
    fn setup_rings(t: &mut MmioTransport<Fake>, index: u32, num: u32, rings: [u64; 3]) {
        w32(t, VIRTIO_MMIO_QUEUE_SEL, index);
        w32(t, VIRTIO_MMIO_QUEUE_NUM, num);
        let regs = [
            (VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH),
            (VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_AVAIL_HIGH),
            (VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_QUEUE_USED_HIGH),
        ];
        for ((low, high), addr) in regs.into_iter().zip(rings) {
            w32(t, low, addr as u32);
            w32(t, high, (addr >> 32) as u32);
        }
        w32(t, VIRTIO_MMIO_QUEUE_READY, 1);
    }

    /// Finding 1 at the transport: rings that overlap — within a queue or across the device's
    /// queues — are refused at DRIVER_OK like any unusable setup (`DEVICE_NEEDS_RESET`, the
    /// device never sees them); rings that only touch are fine.
    #[test]
    fn activation_rejects_overlapping_rings() {
        // Queue 0 has 16 entries: table 256 bytes, available ring 38, used ring 134.
        // Queue 1 has 8: 128, 22, 70.
        let q1 = [0x4_0000, 0x4_1000, 0x4_2000];
        let desc = 0x1_0000;
        let avail = 0x2_0000;
        let used = 0x3_0000;
        type Case = (
            &'static str,
            [u64; 3],
            [u64; 3],
            Option<(u16, &'static str, u16, &'static str)>,
        );
        let cases: &[Case] = &[
            (
                "used ring on the available ring",
                [desc, avail, avail],
                q1,
                Some((0, "used ring", 0, "available ring")),
            ),
            (
                "avail_event on the available ring's flags",
                [desc, avail, avail - 132],
                q1,
                Some((0, "used ring", 0, "available ring")),
            ),
            (
                "available ring inside the descriptor table",
                [desc, desc + 0xf0, used],
                q1,
                Some((0, "available ring", 0, "descriptor table")),
            ),
            (
                "used ring over the descriptor table",
                [desc, avail, desc + 0x80],
                q1,
                Some((0, "used ring", 0, "descriptor table")),
            ),
            (
                "queue 1's used ring on queue 0's available ring",
                [desc, avail, used],
                [0x4_0000, 0x4_1000, avail],
                Some((1, "used ring", 0, "available ring")),
            ),
            (
                "two queues sharing a descriptor table",
                [desc, avail, used],
                [desc, 0x4_1000, 0x4_2000],
                Some((1, "descriptor table", 0, "descriptor table")),
            ),
            (
                "touching rings",
                [desc, desc + 0x100, avail - 136],
                [0xf000, desc - 22, 0xf080],
                None,
            ),
        ];
        for (why, rings0, rings1, want) in cases {
            let (mut t, log) = transport();
            negotiate(&mut t, V1);
            setup_rings(&mut t, 0, 16, *rings0);
            setup_rings(&mut t, 1, 8, *rings1);
            w32(&mut t, VIRTIO_MMIO_STATUS, DRIVER_OK);
            let Some((index, ring, other, other_ring)) = *want else {
                assert!(t.is_active(), "{why}: {:?}", t.activation_error());
                continue;
            };
            expect_needs_reset(&t, &log);
            let e = t.activation_error().unwrap();
            assert!(
                matches!(
                    e,
                    DeviceError::RingOverlap { index: i, ring: r, other: o, other_ring: or }
                        if (*i, *r, *o, *or) == (index, ring, other, other_ring)
                ),
                "{why}: {e}"
            );
            // Notifications are ignored until the driver resets; then it can start over.
            w32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
            w32(&mut t, VIRTIO_MMIO_STATUS, 0);
            assert_eq!(r32(&t, VIRTIO_MMIO_STATUS), 0, "{why}");
            negotiate(&mut t, V1);
            setup_queue(&mut t, 0, 16, 0);
            setup_queue(&mut t, 1, 8, 0x4_0000);
            w32(&mut t, VIRTIO_MMIO_STATUS, DRIVER_OK);
            assert!(t.is_active(), "{why}");
        }
    }

    #[test]
    fn activation_needs_every_queue_ready() {
        let (mut t, log) = transport();
        negotiate(&mut t, V1);
        setup_queue(&mut t, 0, 16, 0);
        w32(&mut t, VIRTIO_MMIO_STATUS, DRIVER_OK);
        expect_needs_reset(&t, &log);
        assert!(matches!(
            t.activation_error(),
            Some(DeviceError::QueueNotReady { index: 1 })
        ));
        // Nothing is retried until the driver resets.
        w32(&mut t, VIRTIO_MMIO_STATUS, DRIVER_OK);
        assert!(!t.is_active());
    }

    #[test]
    fn writing_zero_resets_everything() {
        let (mut t, log) = transport();
        negotiate(&mut t, V1 | EVENT_IDX);
        setup_queue(&mut t, 0, 16, 0);
        setup_queue(&mut t, 1, 8, 0x4_0000);
        w32(&mut t, VIRTIO_MMIO_STATUS, DRIVER_OK);
        assert!(t.is_active());
        t.interrupt.signal_used_queue();
        w32(&mut t, VIRTIO_MMIO_STATUS, 0);
        assert!(!t.is_active());
        assert_eq!(log.lock().unwrap().resets, 1);
        assert_eq!(r32(&t, VIRTIO_MMIO_STATUS), 0);
        assert_eq!(r32(&t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        for q in 0..2 {
            w32(&mut t, VIRTIO_MMIO_QUEUE_SEL, q);
            assert_eq!(r32(&t, VIRTIO_MMIO_QUEUE_READY), 0);
        }
        assert_eq!(t.driver_features, 0);
        // A fresh handshake works, with the new features.
        negotiate(&mut t, V1);
        setup_queue(&mut t, 0, 4, 0);
        setup_queue(&mut t, 1, 2, 0x4_0000);
        w32(&mut t, VIRTIO_MMIO_STATUS, DRIVER_OK);
        assert!(t.is_active());
        let log = log.lock().unwrap();
        assert_eq!(log.activations.len(), 2);
        assert_eq!(log.activations[1].0, V1);
        assert_eq!(log.activations[1].1[0].0, 4);
        assert!(
            !log.activations[1].1[0].4,
            "EVENT_IDX not negotiated this time"
        );
    }

    #[test]
    fn reset_clears_needs_reset() {
        let (mut t, log) = transport();
        negotiate(&mut t, V1);
        w32(&mut t, VIRTIO_MMIO_STATUS, DRIVER_OK);
        expect_needs_reset(&t, &log);
        w32(&mut t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(r32(&t, VIRTIO_MMIO_STATUS), 0);
        assert!(t.activation_error().is_none());
    }

    #[test]
    fn interrupt_status_and_ack() {
        let (mut t, _) = transport();
        t.interrupt.signal_used_queue();
        assert_eq!(r32(&t, VIRTIO_MMIO_INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
        w32(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(r32(&t, VIRTIO_MMIO_INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
        w32(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
        assert_eq!(r32(&t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    }

    #[test]
    fn queue_notify_signals_the_queue_eventfd_once_active() {
        let (mut t, _) = transport();
        let fd = t.queue_notify_fd(1).unwrap().try_clone().unwrap();
        w32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 1); // not active: dropped
        negotiate(&mut t, V1);
        setup_queue(&mut t, 0, 16, 0);
        setup_queue(&mut t, 1, 8, 0x4_0000);
        w32(&mut t, VIRTIO_MMIO_STATUS, DRIVER_OK);
        w32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        w32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        w32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 9); // no such queue: dropped
        assert_eq!(
            fd.read().unwrap(),
            2,
            "two notifications, none before DRIVER_OK"
        );
        assert!(t.queue_notify_fd(2).is_none());
    }

    #[test]
    fn config_space_accesses() {
        let (mut t, log) = transport();
        let mut b4 = [0u8; 4];
        t.read(0x100, &mut b4);
        assert_eq!(b4, [1, 2, 3, 4]);
        let mut b2 = [0u8; 2];
        t.read(0x106, &mut b2);
        assert_eq!(b2, [7, 8]);
        let mut b1 = [0u8; 1];
        t.read(0x107, &mut b1);
        assert_eq!(b1, [8]);
        // Straddling the end, past the end, odd widths: zeros.
        t.read(0x106, &mut b4);
        assert_eq!(b4, [7, 8, 0, 0]);
        t.read(0x200, &mut b4);
        assert_eq!(b4, [0; 4]);
        let mut b8 = [0xffu8; 8];
        t.read(0x100, &mut b8);
        assert_eq!(b8, [0; 8]);
        let mut b3 = [0xffu8; 3];
        t.read(0x100, &mut b3);
        assert_eq!(b3, [0; 3]);
        t.read(u64::MAX - 1, &mut b2);
        assert_eq!(b2, [0; 2]);
        // Config writes reach the device once the driver is there, in allowed widths.
        t.write(0x104, &[9]);
        w32(&mut t, VIRTIO_MMIO_STATUS, ACK_DRIVER);
        t.write(0x104, &[9]);
        t.write(0x104, &[9, 9, 9]);
        assert_eq!(log.lock().unwrap().config_writes, vec![(4, vec![9])]);
    }

    #[test]
    fn odd_register_accesses_read_zero_and_write_nothing() {
        let (mut t, _) = transport();
        let mut b = [0xffu8; 2];
        t.read(0, &mut b);
        assert_eq!(b, [0, 0], "16-bit register read");
        let mut b = [0xffu8; 4];
        t.read(1, &mut b);
        assert_eq!(b, [0; 4], "misaligned");
        let mut b = [0xffu8; 8];
        t.read(0, &mut b);
        assert_eq!(b, [0; 8], "64-bit");
        t.read(0, &mut []);
        // A 1-byte or misaligned status write does not start a handshake.
        t.write(VIRTIO_MMIO_STATUS.into(), &[1]);
        t.write((VIRTIO_MMIO_STATUS + 1).into(), &[1, 0, 0, 0]);
        t.write(VIRTIO_MMIO_STATUS.into(), &[1, 0, 0, 0, 0, 0, 0, 0]);
        t.write(VIRTIO_MMIO_STATUS.into(), &[]);
        assert_eq!(r32(&t, VIRTIO_MMIO_STATUS), 0);
        // Read-only registers ignore writes.
        w32(&mut t, VIRTIO_MMIO_MAGIC_VALUE, 0);
        assert_eq!(r32(&t, VIRTIO_MMIO_MAGIC_VALUE), MAGIC);
        // Write-only registers read as zero.
        w32(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
        assert_eq!(r32(&t, VIRTIO_MMIO_QUEUE_SEL), 0);
    }

    /// A transport with both queues set up, activated with EVENT_IDX, and its device's queues
    /// moved along as if requests had been served.
    fn active_transport() -> (MmioTransport<Fake>, Arc<Mutex<Log>>) {
        let (mut t, log) = transport();
        negotiate(&mut t, V1 | EVENT_IDX);
        setup_queue(&mut t, 0, 16, 0);
        setup_queue(&mut t, 1, 8, 0x4_0000);
        w32(&mut t, VIRTIO_MMIO_STATUS, DRIVER_OK);
        assert!(t.is_active());
        t.device.queues[0].set_next_avail(5);
        t.device.queues[0].set_next_used(4);
        t.device.queues[1].set_next_avail(0xffff);
        t.device.queues[1].set_next_used(0xfffe);
        w32(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
        t.interrupt.signal_used_queue();
        (t, log)
    }

    #[test]
    fn idle_transport_state_round_trips() {
        let (mut t, _) = transport();
        let (mut fresh, flog) = transport();
        crate::state::assert_round_trip(&t, &mut fresh);
        assert_eq!(r32(&fresh, VIRTIO_MMIO_STATUS), 0);

        // Mid-handshake: features accepted, one queue set up, the other half-written.
        negotiate(&mut t, V1);
        setup_queue(&mut t, 0, 16, 0);
        w32(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
        w32(&mut t, VIRTIO_MMIO_QUEUE_NUM, 12); // not valid yet: only checked at DRIVER_OK
        w32(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        let (mut fresh, flog2) = transport();
        let json = crate::state::assert_round_trip(&t, &mut fresh);
        assert!(json.contains("\"size\":12"), "{json}");
        assert_eq!(r32(&fresh, VIRTIO_MMIO_STATUS), FEATURES_OK);
        assert_eq!(r32(&fresh, VIRTIO_MMIO_DEVICE_FEATURES), 1);
        assert!(!fresh.is_active());
        assert!(flog.lock().unwrap().activations.is_empty());
        // The driver carries on where it was.
        w32(&mut fresh, VIRTIO_MMIO_QUEUE_NUM, 8);
        setup_queue(&mut fresh, 1, 8, 0x4_0000);
        w32(&mut fresh, VIRTIO_MMIO_STATUS, DRIVER_OK);
        assert!(fresh.is_active());
        assert_eq!(flog2.lock().unwrap().activations[0].0, V1);
    }

    #[test]
    fn active_transport_state_round_trips_and_reactivates() {
        let (t, _) = active_transport();
        let (mut fresh, log) = transport();
        crate::state::assert_round_trip(&t, &mut fresh);
        assert!(fresh.is_active() && !fresh.is_paused());
        assert_eq!(r32(&fresh, VIRTIO_MMIO_STATUS), DRIVER_OK);
        assert_eq!(
            r32(&fresh, VIRTIO_MMIO_INTERRUPT_STATUS),
            VIRTIO_MMIO_INT_VRING
        );
        assert_eq!(
            r32(&fresh, VIRTIO_MMIO_QUEUE_NUM_MAX),
            8,
            "queue 1 selected"
        );
        // Re-activated once, with the same layout and the saved positions.
        let log = log.lock().unwrap();
        assert_eq!(log.activations.len(), 1);
        assert_eq!(log.activations[0].0, V1 | EVENT_IDX);
        assert_eq!(log.activations[0].1[0], (16, DESC, AVAIL, USED, true));
        let q = &fresh.device.queues;
        assert_eq!((q[0].next_avail(), q[0].next_used()), (5, 4));
        assert_eq!((q[1].next_avail(), q[1].next_used()), (0xffff, 0xfffe));
        // Each queue is looked at once, for requests queued before the save.
        for i in 0..2 {
            assert_eq!(fresh.queue_notify_fd(i).unwrap().read().unwrap(), 1);
        }
    }

    #[test]
    fn pause_and_resume_reach_the_device_only_while_active() {
        let (mut t, log) = transport();
        t.pause();
        assert!(!t.is_paused());
        t.resume().unwrap();
        let (mut t, log2) = active_transport();
        t.pause();
        t.pause();
        assert!(t.is_paused());
        t.resume().unwrap();
        t.resume().unwrap();
        assert!(!t.is_paused());
        let counts = |log: &Mutex<Log>| {
            let log = log.lock().unwrap();
            (log.pauses, log.resumes)
        };
        assert_eq!(counts(&log), (0, 0));
        assert_eq!(counts(&log2), (1, 1));
        // A device that asked for a reset stays stopped.
        t.pause();
        t.interrupt.signal_needs_reset();
        t.resume().unwrap();
        assert!(t.is_paused());
        w32(&mut t, VIRTIO_MMIO_STATUS, 0);
        assert!(!t.is_paused() && !t.is_active());
    }

    #[test]
    fn a_device_that_needs_reset_is_restored_stopped() {
        let (t, _) = active_transport();
        t.interrupt.signal_needs_reset();
        let (mut fresh, log) = transport();
        crate::state::assert_round_trip(&t, &mut fresh);
        assert!(fresh.is_active() && fresh.is_paused());
        assert_eq!(
            r32(&fresh, VIRTIO_MMIO_STATUS),
            DRIVER_OK | VIRTIO_CONFIG_S_NEEDS_RESET
        );
        assert_eq!(log.lock().unwrap().pauses, 1);
        fresh.resume().unwrap();
        assert!(fresh.is_paused());
        assert_eq!(log.lock().unwrap().resumes, 0, "not resumed");
    }

    #[test]
    fn a_failed_activation_is_restored_as_such() {
        let (mut t, log) = transport();
        negotiate(&mut t, V1);
        setup_queue(&mut t, 0, 12, 0);
        w32(&mut t, VIRTIO_MMIO_STATUS, DRIVER_OK);
        expect_needs_reset(&t, &log);
        let (mut fresh, flog) = transport();
        let json = crate::state::assert_round_trip(&t, &mut fresh);
        assert!(json.contains("not a power of two"), "{json}");
        expect_needs_reset(&fresh, &flog);
        assert!(matches!(
            fresh.activation_error(),
            Some(DeviceError::Restored(_))
        ));
        // Still nothing until the driver resets.
        w32(&mut fresh, VIRTIO_MMIO_STATUS, DRIVER_OK);
        assert!(!fresh.is_active());
        w32(&mut fresh, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(r32(&fresh, VIRTIO_MMIO_STATUS), 0);
    }

    #[test]
    fn corrupted_transport_states_are_refused() {
        type Corrupt = fn(&mut MmioTransportState<Vec<u8>>);
        let (t, _) = active_transport();
        let good = t.save();
        let cases: &[(&str, Corrupt, bool)] = &[
            ("version", |s| s.version = 99, false),
            ("device type", |s| s.device_type = 2, true),
            ("queue count", |s| s.queues.truncate(1), true),
            ("device state", |s| s.device.push(9), true),
            ("needs-reset bit in status", |s| s.status |= 0x40, false),
            (
                "DRIVER_OK without FEATURES_OK",
                |s| s.status = ACK_DRIVER | VIRTIO_CONFIG_S_DRIVER_OK,
                false,
            ),
            (
                "FEATURES_OK without DRIVER",
                |s| s.status = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_FEATURES_OK,
                false,
            ),
            (
                "features not offered",
                |s| s.driver_features |= 1 << 5,
                false,
            ),
            ("no VERSION_1", |s| s.driver_features &= !V1, false),
            (
                "unknown feature window",
                |s| s.driver_features_unknown = true,
                false,
            ),
            ("interrupt bits", |s| s.interrupt_status = 4, false),
            (
                "active without DRIVER_OK",
                |s| s.status = FEATURES_OK,
                false,
            ),
            ("inactive with DRIVER_OK", |s| s.active = false, false),
            (
                "active with an error",
                |s| s.activation_error = Some("x".into()),
                false,
            ),
            (
                "needs-reset before DRIVER_OK",
                |s| {
                    s.status = FEATURES_OK;
                    s.active = false;
                    s.needs_reset = true;
                    s.queues
                        .iter_mut()
                        .for_each(|q| (q.next_avail, q.next_used) = (0, 0));
                },
                false,
            ),
            (
                "positions while inactive",
                |s| {
                    s.status = FEATURES_OK;
                    s.active = false;
                },
                false,
            ),
            ("queue not ready", |s| s.queues[1].ready = false, false),
            ("size zero", |s| s.queues[0].size = 0, false),
            ("size not a power of two", |s| s.queues[0].size = 12, false),
            ("size above max", |s| s.queues[1].size = 16, false),
            ("size above u16", |s| s.queues[1].size = 1 << 16 | 8, false),
            (
                "ring outside RAM",
                |s| s.queues[0].used_ring = MEM_SIZE as u64 - 8,
                false,
            ),
            (
                "ring at the top of the address space",
                |s| s.queues[0].avail_ring = u64::MAX - 1,
                false,
            ),
            ("misaligned table", |s| s.queues[0].desc_table += 8, false),
            (
                "used ring on another queue's available ring",
                |s| s.queues[1].used_ring = s.queues[0].avail_ring,
                false,
            ),
        ];
        for (why, corrupt, mismatch) in cases {
            let mut bad = good.clone();
            corrupt(&mut bad);
            let (mut fresh, log) = transport();
            let e = fresh.restore(&bad).expect_err(why);
            match e {
                StateError::Mismatch { .. } => assert!(mismatch, "{why}: {e}"),
                StateError::Invalid { .. } => assert!(!mismatch, "{why}: {e}"),
                StateError::Version { .. } => assert_eq!(*why, "version"),
            }
            assert!(!fresh.is_active(), "{why}");
            assert!(log.lock().unwrap().activations.is_empty(), "{why}");
            assert_eq!(r32(&fresh, VIRTIO_MMIO_STATUS), 0, "{why}");
        }
        // The good state still restores.
        let (mut fresh, _) = transport();
        fresh.restore(&good).unwrap();
        assert!(fresh.is_active());
    }

    #[test]
    fn the_transport_is_a_bus_device() {
        let (t, _) = transport();
        let dev: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(t));
        let mut bus = crate::bus::Bus::new();
        bus.insert(0xd000_0000, MMIO_REGION_SIZE, dev).unwrap();
        let mut b = [0u8; 4];
        assert_eq!(bus.read(0xd000_0000, &mut b), Some("fake"));
        assert_eq!(u32::from_le_bytes(b), MAGIC);
        let ack = VIRTIO_CONFIG_S_ACKNOWLEDGE.to_le_bytes();
        assert_eq!(
            bus.write(0xd000_0000 + u64::from(VIRTIO_MMIO_STATUS), &ack),
            Some(("fake", BusAction::Continue))
        );
        bus.read(0xd000_0000 + u64::from(VIRTIO_MMIO_STATUS), &mut b);
        assert_eq!(u32::from_le_bytes(b), VIRTIO_CONFIG_S_ACKNOWLEDGE);
        let (t, _) = transport();
        let w: Box<dyn VirtioWindow> = Box::new(t);
        assert_eq!(
            (w.device_id(), w.is_active(), w.name()),
            (42, false, "fake")
        );
    }
}
