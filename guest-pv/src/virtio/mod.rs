//! virtio devices (ABI v1.5, [`hypercall_abi::virtio`]) with the `virtio-drivers` crate: the
//! glue a pvkit guest needs, and nothing of a driver itself.
//!
//! - [`devices`] lists the device windows of the boot memory map (regions of kind
//!   [`region_kind::VIRTIO_MMIO`], `info` = virtio device ID); [`find`] picks one by ID.
//! - [`PvkitHal`], `virtio-drivers`' [`Hal`](virtio_drivers::Hal): DMA pages (virtqueue rings)
//!   from one region of RAM the kernel hands over ([`set_dma_region`]); buffers and MMIO
//!   windows at their own addresses (pvkit's identity map: virtual = guest-physical), so
//!   requests use the caller's buffers in place.
//! - [`Mmio`], the virtio-mmio transport (`virtio-drivers`' own, with a teardown that works on
//!   pvkit's device: dropping a driver resets the device); [`DeviceInfo::transport`] builds it,
//!   [`open_blk`] builds a block driver ([`Blk`]) on it, [`open_console`] an output-only
//!   console driver ([`VConsole`]; `virtio-drivers`' own console driver needs `alloc`).
//! - [`Waiter`]: waiting for completions with a [`WaitPolicy`] — [`Poll`](WaitPolicy::Poll)
//!   the used ring, [`PvWait`](WaitPolicy::PvWait) in `idle_yield` until the device's event,
//!   [`Adaptive`](WaitPolicy::Adaptive): poll for a window tuned from the measured cost of a
//!   park, then park, or [`Interrupt`](WaitPolicy::Interrupt): `sti; hlt` until the event
//!   vector.
//!
//! `virtio-drivers` is re-exported ([`virtio_drivers`]) so kernels use the same version. It is
//! built without its `alloc` feature (guest-pv imposes no global allocator): no indirect
//! descriptors, so a block request (header, data, status) takes 3 of the block driver's 16
//! descriptors and at most [`BLK_MAX_IN_FLIGHT`] requests are in flight at once
//! (`read_blocks_nb` / `write_blocks_nb` with tokens; the blocking `read_blocks` /
//! `write_blocks` / `flush` spin on the used ring).
//!
//! Device registers are MMIO: every access but QueueNotify (an ioeventfd on pvkit) exits to the
//! VMM, from CPL 0 or CPL 3 alike (pvkit's boot tables map the window user-accessible). Drivers
//! touch them at setup, on notifications that EVENT_IDX does not suppress, and to acknowledge
//! InterruptStatus; the rings and buffers are plain memory.
//!
//! # Example
//!
//! ```no_run
//! use guest_pv::virtio::{self, Waiter, WaitPolicy};
//! use guest_pv::virtio::virtio_drivers::device::blk::{BlkReq, BlkResp, RespStatus};
//! use hypercall_abi::boot::BootInfo;
//! use hypercall_abi::virtio::DEVICE_ID_BLOCK;
//!
//! # fn demo(info: &BootInfo, free_ram: u64) -> Result<(), virtio::VirtioError> {
//! // SAFETY: 64 KiB of identity-mapped free RAM that nothing else uses.
//! unsafe { virtio::set_dma_region(free_ram, 64 << 10) }?;
//! let dev = virtio::find(info, DEVICE_ID_BLOCK).expect("no block device");
//! // SAFETY: the window comes from the boot memory map and this is its only driver.
//! let mut blk = unsafe { virtio::open_blk(&dev) }?;
//!
//! let mut waiter = Waiter::new(WaitPolicy::Poll);
//! let (mut req, mut resp) = (BlkReq::default(), BlkResp::default());
//! let mut buf = [0u8; 4096];
//! // SAFETY: `req`, `buf` and `resp` are not touched until the request completes.
//! let token = unsafe { blk.read_blocks_nb(0, &mut req, &mut buf, &mut resp) }?;
//! waiter.wait(&mut blk)?;
//! // SAFETY: the buffers of the request `token`.
//! unsafe { blk.complete_read_blocks(token, &req, &mut buf, &mut resp) }?;
//! assert_eq!(resp.status(), RespStatus::OK);
//! waiter.ack(&mut blk);
//! # Ok(())
//! # }
//! # fn main() {}
//! ```

mod console;
mod hal;
mod transport;
mod wait;

use core::fmt;
use core::ptr::NonNull;

pub use console::{CONSOLE_MAX_CHAIN, CONSOLE_QUEUE_SIZE, VConsole};
pub use hal::{DmaError, DmaPool, DmaStats, PvkitHal, dma_stats, set_dma_region};
use hypercall_abi::boot::{BootInfo, region_kind};
use hypercall_abi::layout::{IDENTITY_MAP_SIZE, MMIO_START, PAGE_SIZE};
pub use transport::Mmio;
pub use virtio_drivers;
use virtio_drivers::device::blk::VirtIOBlk;
use virtio_drivers::transport::mmio::{MmioError, MmioTransport, VirtIOHeader};
pub use wait::{Ack, Adaptive, Completions, STALL_SECONDS, WaitPolicy, WaitStats, Waiter};

use crate::HypercallError;

/// A block driver on a pvkit device window.
pub type Blk = VirtIOBlk<PvkitHal, Mmio<'static>>;

/// Descriptors of `virtio-drivers`' block queue.
pub const BLK_QUEUE_SIZE: u16 = 16;

/// The most block requests in flight at once: each takes three descriptors (header, data,
/// status) without indirect descriptors (which need `alloc`).
pub const BLK_MAX_IN_FLIGHT: usize = BLK_QUEUE_SIZE as usize / 3;

/// Everything that can go wrong here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VirtioError {
    /// A window that is not a whole number of pages in the MMIO part of the identity map (the
    /// boot memory map is not pvkit's).
    BadWindow {
        /// Its base.
        base: u64,
        /// Its size.
        size: u64,
    },
    /// The window is not the device kind asked for.
    WrongDevice {
        /// The virtio device ID wanted.
        want: u32,
        /// The one the boot memory map gives.
        found: u32,
    },
    /// The window does not hold a virtio-mmio device `virtio-drivers` supports.
    Transport(MmioError),
    /// The driver failed (setup, a request, DMA memory).
    Driver(virtio_drivers::Error),
    /// A DMA region was refused.
    Dma(DmaError),
    /// `idle_yield` failed while waiting.
    Hypercall(HypercallError),
    /// No completion after this long parked ([`STALL_SECONDS`]).
    Stalled {
        /// Seconds parked.
        seconds: u64,
    },
}

impl fmt::Display for VirtioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VirtioError::BadWindow { base, size } => write!(
                f,
                "virtio window {base:#x}+{size:#x} is not page-sized MMIO inside the identity map"
            ),
            VirtioError::WrongDevice { want, found } => {
                write!(f, "virtio device ID {found}, not the {want} asked for")
            }
            VirtioError::Transport(e) => write!(f, "virtio-mmio: {e}"),
            VirtioError::Driver(e) => write!(f, "virtio driver: {e}"),
            VirtioError::Dma(e) => write!(f, "{e}"),
            VirtioError::Hypercall(e) => write!(f, "idle_yield: {e}"),
            VirtioError::Stalled { seconds } => {
                write!(f, "no completion from the device in {seconds} s")
            }
        }
    }
}

impl core::error::Error for VirtioError {}

impl From<virtio_drivers::Error> for VirtioError {
    fn from(e: virtio_drivers::Error) -> VirtioError {
        VirtioError::Driver(e)
    }
}

impl From<MmioError> for VirtioError {
    fn from(e: MmioError) -> VirtioError {
        VirtioError::Transport(e)
    }
}

impl From<DmaError> for VirtioError {
    fn from(e: DmaError) -> VirtioError {
        VirtioError::Dma(e)
    }
}

/// One device window of the boot memory map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Guest-physical (= virtual) address of the register window.
    pub base: u64,
    /// Its size in bytes.
    pub size: u64,
    /// The virtio device ID ([`hypercall_abi::virtio::DEVICE_ID_BLOCK`], ...).
    pub device_id: u32,
}

impl DeviceInfo {
    /// `virtio-drivers`' transport over this window, wrapped in [`Mmio`]. Reads the magic,
    /// version and device ID registers (three exits).
    ///
    /// # Safety
    /// The window must be a virtio-mmio device window of the pvkit VM this kernel runs in (from
    /// its boot memory map), and the transport its only user while it lives (no other
    /// transport over the same window).
    pub unsafe fn transport(&self) -> Result<Mmio<'static>, VirtioError> {
        let (base, size) = (self.base, self.size);
        let bad = VirtioError::BadWindow { base, size };
        let end = base.checked_add(size).ok_or(bad.clone())?;
        if base < MMIO_START || end > IDENTITY_MAP_SIZE || base % PAGE_SIZE != 0 || size == 0 {
            return Err(bad);
        }
        let header = core::ptr::with_exposed_provenance_mut::<VirtIOHeader>(base as usize);
        let header = NonNull::new(header).ok_or(bad)?;
        // SAFETY: the caller guarantees a virtio-mmio window of this VM used by nothing else;
        // it lies in pvkit's identity map (checked), so `header` is its mapped, page-aligned
        // (checked) address, valid for `size` bytes for the VM's whole life (`'static`).
        let inner = unsafe { MmioTransport::new(header, size as usize) }?;
        Ok(Mmio::new(inner))
    }
}

/// The virtio device windows of the boot memory map, in address order.
pub fn devices(boot_info: &BootInfo) -> impl Iterator<Item = DeviceInfo> + '_ {
    boot_info
        .regions()
        .iter()
        .filter(|r| r.kind == region_kind::VIRTIO_MMIO)
        .map(|r| DeviceInfo {
            base: r.start,
            size: r.len,
            device_id: r.info,
        })
}

/// The first device window with virtio device ID `device_id`.
pub fn find(boot_info: &BootInfo, device_id: u32) -> Option<DeviceInfo> {
    devices(boot_info).find(|d| d.device_id == device_id)
}

/// A block driver ([`Blk`]) on the block device at `dev`: the transport, feature negotiation
/// (`virtio-drivers` accepts VERSION_1, RO, FLUSH and EVENT_IDX), its 16-entry queue (two DMA
/// pages from [`set_dma_region`]'s region) and DRIVER_OK. Dropping the driver resets the
/// device ([`Mmio`]).
///
/// # Safety
/// As for [`DeviceInfo::transport`].
pub unsafe fn open_blk(dev: &DeviceInfo) -> Result<Blk, VirtioError> {
    let block = hypercall_abi::virtio::DEVICE_ID_BLOCK;
    if dev.device_id != block {
        return Err(VirtioError::WrongDevice {
            want: block,
            found: dev.device_id,
        });
    }
    // SAFETY: the caller's contract.
    let transport = unsafe { dev.transport() }?;
    Ok(VirtIOBlk::new(transport)?)
}

/// An output-only console driver ([`VConsole`]) on the console device at `dev`.
///
/// # Safety
/// As for [`DeviceInfo::transport`].
pub unsafe fn open_console(dev: &DeviceInfo) -> Result<VConsole, VirtioError> {
    // SAFETY: the caller's contract.
    unsafe { VConsole::open(dev) }
}

#[cfg(test)]
mod tests {
    use std::string::ToString;
    use std::vec::Vec;

    use hypercall_abi::boot::{MemRegion, Mode};
    use hypercall_abi::virtio::{DEVICE_ID_BLOCK, DEVICE_ID_CONSOLE, VIRTIO_MMIO_SLOT, window};

    use super::*;

    fn region(start: u64, len: u64, kind: u32, info: u32) -> MemRegion {
        MemRegion {
            start,
            len,
            kind,
            info,
        }
    }

    #[test]
    fn devices_come_from_virtio_regions_only() {
        let mut b = BootInfo::new(Mode::Pv, 128 << 20);
        b.push_region(region(0x30_0000, 0x100_0000, region_kind::USABLE, 0))
            .unwrap();
        b.push_region(region(
            window(0),
            VIRTIO_MMIO_SLOT,
            region_kind::VIRTIO_MMIO,
            3,
        ))
        .unwrap();
        b.push_region(region(
            window(1),
            VIRTIO_MMIO_SLOT,
            region_kind::VIRTIO_MMIO,
            2,
        ))
        .unwrap();
        let all: Vec<_> = devices(&b).collect();
        assert_eq!(
            all,
            [
                DeviceInfo {
                    base: 0xC000_0000,
                    size: 0x1000,
                    device_id: DEVICE_ID_CONSOLE
                },
                DeviceInfo {
                    base: 0xC000_1000,
                    size: 0x1000,
                    device_id: DEVICE_ID_BLOCK
                },
            ]
        );
        assert_eq!(find(&b, DEVICE_ID_BLOCK).unwrap().base, 0xC000_1000);
        assert_eq!(find(&b, 9), None);
        assert_eq!(devices(&BootInfo::new(Mode::Pv, 1)).count(), 0);
    }

    #[test]
    fn windows_outside_the_mmio_part_of_the_identity_map_are_refused() {
        for (base, size) in [
            (0x30_0000, 0x1000),
            (0xC000_0800, 0x1000),
            (0xC000_0000, 0),
            (IDENTITY_MAP_SIZE - 0x1000, 0x2000),
            (u64::MAX - 0xfff, 0x1000),
        ] {
            let d = DeviceInfo {
                base,
                size,
                device_id: DEVICE_ID_BLOCK,
            };
            // SAFETY: the window is refused before anything is read.
            let e = unsafe { d.transport() }.unwrap_err();
            assert_eq!(
                e,
                VirtioError::BadWindow { base, size },
                "{base:#x}+{size:#x}"
            );
        }
        let console = DeviceInfo {
            base: 0xC000_0000,
            size: 0x1000,
            device_id: DEVICE_ID_CONSOLE,
        };
        // SAFETY: the device ID is refused before anything is read.
        let Err(e) = (unsafe { open_blk(&console) }) else {
            panic!("a console opened as a block device");
        };
        assert_eq!(e.to_string(), "virtio device ID 3, not the 2 asked for");
        let blk = DeviceInfo {
            device_id: DEVICE_ID_BLOCK,
            ..console
        };
        // SAFETY: the device ID is refused before anything is read.
        let Err(e) = (unsafe { open_console(&blk) }) else {
            panic!("a block device opened as a console");
        };
        assert_eq!(e.to_string(), "virtio device ID 2, not the 3 asked for");
    }

    #[test]
    fn blk_depth_fits_the_queue() {
        assert_eq!(BLK_MAX_IN_FLIGHT, 5);
    }
}
