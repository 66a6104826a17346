//! [`VConsole`]: an output-only virtio-console driver that needs no allocator.
//!
//! `virtio-drivers`' own `VirtIOConsole` needs its `alloc` feature (a boxed receive buffer),
//! which guest-pv does without; this driver uses the same crate's [`VirtQueue`] and transport
//! instead. It negotiates `VIRTIO_F_VERSION_1` and `VIRTIO_RING_F_EVENT_IDX` (nothing
//! console-specific: no `SIZE`, `MULTIPORT` or `EMERG_WRITE`), sets up both queues of port 0
//! — receiveq (0) and transmitq (1) — and writes through transmitq. The receive queue is set
//! up (the device wants every queue ready) but given no buffers: there is no input.
//!
//! [`VConsole::write`] puts the caller's bytes in place (no copy) as one chain per
//! [`CONSOLE_MAX_CHAIN`] bytes, notifies (QueueNotify: an ioeventfd on pvkit, no exit) and
//! spins on the used ring until the device has taken the chain, so when it returns the bytes
//! are with the host.

use virtio_drivers::device::common::Feature;
use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::Transport;

use super::{DeviceInfo, Mmio, PvkitHal, VirtioError};

/// Descriptors per console queue (a transmit chain takes one).
pub const CONSOLE_QUEUE_SIZE: usize = 4;

/// Bytes per transmit chain: pvkit's device drops a chain over 64 KiB, so writes are split.
pub const CONSOLE_MAX_CHAIN: usize = 64 << 10;

const RECEIVEQ: u16 = 0;
const TRANSMITQ: u16 = 1;

/// An output-only virtio-console driver on a pvkit device window. Dropping it resets the
/// device ([`Mmio`]) and frees its rings.
#[derive(Debug)]
pub struct VConsole {
    transport: Mmio<'static>,
    // Kept so its ring stays set up (and is freed after the transmit queue: LIFO DMA pages).
    _receiveq: VirtQueue<PvkitHal, CONSOLE_QUEUE_SIZE>,
    transmitq: VirtQueue<PvkitHal, CONSOLE_QUEUE_SIZE>,
    chains: u64,
}

impl VConsole {
    /// Sets up the console at `dev`: transport, features, both queues (four DMA pages from
    /// [`super::set_dma_region`]'s region), DRIVER_OK.
    ///
    /// # Safety
    /// As for [`DeviceInfo::transport`].
    pub unsafe fn open(dev: &DeviceInfo) -> Result<VConsole, VirtioError> {
        let console = hypercall_abi::virtio::DEVICE_ID_CONSOLE;
        if dev.device_id != console {
            return Err(VirtioError::WrongDevice {
                want: console,
                found: dev.device_id,
            });
        }
        // SAFETY: the caller's contract.
        let mut transport = unsafe { dev.transport() }?;
        let features = transport.begin_init(Feature::VERSION_1 | Feature::RING_EVENT_IDX);
        let event_idx = features.contains(Feature::RING_EVENT_IDX);
        let receiveq = VirtQueue::new(&mut transport, RECEIVEQ, false, event_idx)?;
        let transmitq = VirtQueue::new(&mut transport, TRANSMITQ, false, event_idx)?;
        transport.finish_init();
        Ok(VConsole {
            transport,
            _receiveq: receiveq,
            transmitq,
            chains: 0,
        })
    }

    /// Writes `bytes`, one chain per [`CONSOLE_MAX_CHAIN`] bytes, each waited for by polling
    /// the used ring (no exit).
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), VirtioError> {
        for chunk in bytes.chunks(CONSOLE_MAX_CHAIN) {
            self.transmitq
                .add_notify_wait_pop(&[chunk], &mut [], &mut self.transport)?;
            self.chains += 1;
        }
        Ok(())
    }

    /// Transmit chains sent so far.
    pub fn chains(&self) -> u64 {
        self.chains
    }
}

impl Drop for VConsole {
    fn drop(&mut self) {
        // As `virtio-drivers`' drivers do: unset both queues before their rings are freed
        // (`Mmio` resets the device first).
        self.transport.queue_unset(RECEIVEQ);
        self.transport.queue_unset(TRANSMITQ);
    }
}
