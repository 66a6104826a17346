//! [`Mmio`]: the virtio-mmio transport for pvkit.

use virtio_drivers::PhysAddr;
use virtio_drivers::transport::mmio::MmioTransport;
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// `virtio-drivers`' virtio-mmio transport over a pvkit device window, with a
/// queue teardown that works on pvkit's device.
///
/// Every [`Transport`] call is forwarded, except [`Transport::queue_unset`], which drivers call
/// when they are dropped (to stop the device using rings that are about to be freed).
/// `virtio-drivers` writes 0 to QueueReady and spins until it reads 0 back; pvkit's transport,
/// like the spec's handshake, lets queue registers change only between FEATURES_OK and
/// DRIVER_OK, so on a running device that read never returns 0 and the drop would hang. [`Mmio`]
/// resets the device first (Status = 0), which stops it and clears every queue register, then
/// runs the normal teardown.
#[derive(Debug)]
pub struct Mmio<'a> {
    inner: MmioTransport<'a>,
}

impl<'a> Mmio<'a> {
    /// Wraps `virtio-drivers`' transport.
    pub fn new(inner: MmioTransport<'a>) -> Mmio<'a> {
        Mmio { inner }
    }

    /// The transport it wraps.
    pub fn inner(&self) -> &MmioTransport<'a> {
        &self.inner
    }
}

impl Transport for Mmio<'_> {
    fn device_type(&self) -> DeviceType {
        self.inner.device_type()
    }

    fn read_device_features(&mut self) -> u64 {
        self.inner.read_device_features()
    }

    fn write_driver_features(&mut self, driver_features: u64) {
        self.inner.write_driver_features(driver_features)
    }

    fn max_queue_size(&mut self, queue: u16) -> u32 {
        self.inner.max_queue_size(queue)
    }

    fn notify(&mut self, queue: u16) {
        self.inner.notify(queue)
    }

    fn get_status(&self) -> DeviceStatus {
        self.inner.get_status()
    }

    fn set_status(&mut self, status: DeviceStatus) {
        self.inner.set_status(status)
    }

    fn set_guest_page_size(&mut self, guest_page_size: u32) {
        self.inner.set_guest_page_size(guest_page_size)
    }

    fn requires_legacy_layout(&self) -> bool {
        self.inner.requires_legacy_layout()
    }

    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: PhysAddr,
        driver_area: PhysAddr,
        device_area: PhysAddr,
    ) {
        self.inner
            .queue_set(queue, size, descriptors, driver_area, device_area)
    }

    fn queue_unset(&mut self, queue: u16) {
        // Reset first: the device stops using the rings and QueueReady reads 0, so the
        // teardown's read-back loop ends (see the module docs).
        self.inner.set_status(DeviceStatus::empty());
        self.inner.queue_unset(queue)
    }

    fn queue_used(&mut self, queue: u16) -> bool {
        self.inner.queue_used(queue)
    }

    fn ack_interrupt(&mut self) -> InterruptStatus {
        self.inner.ack_interrupt()
    }

    fn read_config_generation(&self) -> u32 {
        self.inner.read_config_generation()
    }

    fn read_config_space<T: FromBytes + IntoBytes>(
        &self,
        offset: usize,
    ) -> virtio_drivers::Result<T> {
        self.inner.read_config_space(offset)
    }

    fn write_config_space<T: IntoBytes + Immutable>(
        &mut self,
        offset: usize,
        value: T,
    ) -> virtio_drivers::Result<()> {
        self.inner.write_config_space(offset, value)
    }
}
