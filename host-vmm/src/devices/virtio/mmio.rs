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
//! aligned rings inside guest RAM) before the device sees it; a failure sets
//! `DEVICE_NEEDS_RESET`.

use std::sync::Arc;

use kvm_ioctls::{IoEventAddress, VmFd};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{Activation, ActiveQueue, DeviceError, Interrupt, VirtioDevice};
use crate::error::Error;

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
    mem: GuestMemoryMmap,
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
    activation_error: Option<DeviceError>,
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// A transport for `device` over guest RAM `mem`, reporting through `interrupt`. Creates
    /// one notification eventfd per queue.
    pub fn new(
        device: D,
        mem: GuestMemoryMmap,
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
        let event_idx = self.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let max_sizes = self.device.queue_max_sizes();
        let mut queues = Vec::with_capacity(max_sizes.len());
        for (i, (cfg, &max)) in self.queues.iter().zip(max_sizes).enumerate() {
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
            let notify = self.notify[i].try_clone().map_err(|source| Error::Io {
                what: "cannot duplicate a virtio queue eventfd".into(),
                source,
            })?;
            queues.push(ActiveQueue { queue, notify });
        }
        self.device.activate(Activation {
            mem: self.mem.clone(),
            queues,
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
        self.activation_error = None;
        self.interrupt.clear();
    }
}

fn set_low(reg: &mut u64, value: u32) {
    *reg = (*reg & !0xffff_ffff) | u64::from(value);
}

fn set_high(reg: &mut u64, value: u32) {
    *reg = (*reg & 0xffff_ffff) | u64::from(value) << 32;
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use proptest::prelude::*;

    use super::*;

    const MEM_SIZE: usize = 1 << 20;
    const DESC: u64 = 0x1_0000;
    const AVAIL: u64 = 0x2_0000;
    const USED: u64 = 0x3_0000;

    /// Size, descriptor table, avail ring, used ring, EVENT_IDX of an activated queue.
    type QueueSeen = (u16, u64, u64, u64, bool);
    type ErrorCheck = fn(&DeviceError) -> bool;

    /// What the fake device saw.
    #[derive(Debug, Default)]
    struct Log {
        activations: Vec<(u64, Vec<QueueSeen>)>,
        resets: u32,
        config_writes: Vec<(u64, Vec<u8>)>,
    }

    #[derive(Debug)]
    struct Fake {
        log: Arc<Mutex<Log>>,
        config: [u8; 8],
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
            Ok(())
        }
        fn reset(&mut self) {
            self.log.lock().unwrap().resets += 1;
        }
    }

    fn transport() -> (MmioTransport<Fake>, Arc<Mutex<Log>>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let log = Arc::new(Mutex::new(Log::default()));
        let dev = Fake {
            log: log.clone(),
            config: [1, 2, 3, 4, 5, 6, 7, 8],
        };
        (
            MmioTransport::new(dev, mem, Interrupt::new(|| {})).unwrap(),
            log,
        )
    }

    fn r32(t: &MmioTransport<Fake>, offset: u32) -> u32 {
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

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Any sequence of accesses, of any width at any offset, never panics, and the
        /// registers that identify the device never change.
        #[test]
        fn random_accesses_never_panic(
            ops in proptest::collection::vec(
                (any::<bool>(), any::<bool>(), 0u64..0x140, 0usize..9, any::<u32>()),
                0..200,
            )
        ) {
            let (mut t, _) = transport();
            for (is_write, aligned, offset, len, value) in ops {
                let offset = if aligned { offset & !3 } else { offset };
                let bytes = value.to_le_bytes().repeat(2);
                if is_write {
                    t.write(offset, &bytes[..len]);
                } else {
                    let mut buf = vec![0u8; len];
                    t.read(offset, &mut buf);
                }
            }
            prop_assert_eq!(r32(&t, VIRTIO_MMIO_MAGIC_VALUE), MAGIC);
            prop_assert_eq!(r32(&t, VIRTIO_MMIO_VERSION), VERSION);
            prop_assert_eq!(r32(&t, VIRTIO_MMIO_DEVICE_ID), 42);
            let s = t.status();
            // DRIVER_OK only ever sticks after FEATURES_OK.
            prop_assert!(s & VIRTIO_CONFIG_S_DRIVER_OK == 0 || s & VIRTIO_CONFIG_S_FEATURES_OK != 0);
        }
    }
}
