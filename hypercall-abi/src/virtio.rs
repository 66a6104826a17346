//! virtio devices (ABI v1.5): where they are and how they signal completion.
//!
//! I/O uses standard virtio 1.x devices over the virtio-mmio transport (register layout
//! version 2), so any virtio driver works (pvkit's guest uses the `virtio-drivers` crate).
//! - Each device has a 4 KiB window at [`VIRTIO_MMIO_BASE`] + *n* × [`VIRTIO_MMIO_SLOT`], in the
//!   MMIO window (identity-mapped at boot, not RAM: accesses exit to the VMM, except the
//!   QueueNotify register, which the host serves in the kernel with an ioeventfd).
//! - The boot-info memory map lists each device as a region of kind
//!   [`crate::boot::region_kind::VIRTIO_MMIO`] whose `info` is the virtio device ID
//!   ([`DEVICE_ID_BLOCK`], [`DEVICE_ID_CONSOLE`]). Windows are numbered in the order the host
//!   attaches devices (block, then console), so find a device by ID, not by window number.
//! - Completion: when a device needs to notify the driver (a used buffer, subject to
//!   `VIRTIO_F_EVENT_IDX` suppression), the host sets the transport's InterruptStatus bit and
//!   queues a guest **event**, the same event the event device raises: a guest parked in
//!   `idle_yield` wakes with `WAKE_EVENT` (the PV completion path, no interrupt at all); a
//!   halted guest with interrupts enabled takes [`crate::idle::EVENT_VECTOR`]. A driver may also
//!   simply poll the used ring.

/// Guest-physical address of the first device window.
pub const VIRTIO_MMIO_BASE: u64 = crate::layout::MMIO_START;
/// Size of (and distance between) device windows.
pub const VIRTIO_MMIO_SLOT: u64 = 0x1000;
/// The most devices the window holds.
pub const VIRTIO_MMIO_MAX_DEVICES: u64 = 16;
/// virtio device ID of a block device.
pub const DEVICE_ID_BLOCK: u32 = 2;
/// virtio device ID of a console.
pub const DEVICE_ID_CONSOLE: u32 = 3;

/// Base address of device window `n`.
pub const fn window(n: u64) -> u64 {
    VIRTIO_MMIO_BASE + n * VIRTIO_MMIO_SLOT
}
