//! The bus: devices behind address ranges, one trait for all of them.
//!
//! A VM has two buses, PIO (port numbers) and MMIO (guest-physical addresses). Each device is
//! registered for one range; an exit is routed by address to the device whose range holds it,
//! with the offset into that range. Nothing is dispatched by name: the name a device reports is
//! only for exit statistics.
//!
//! Devices are shared (`Arc<Mutex<_>>`): the bus holds one handle to route exits, and the VM
//! keeps a typed handle to the ones it also needs elsewhere (the timer for `hlt`, the
//! page-table pool for hypercalls, every device for saving its state). The vCPU thread is the
//! only one that locks them while the guest runs, so the locks are uncontended.

use std::fmt;
use std::sync::{Arc, Mutex};

use crate::sync::lock;

/// What the vCPU loop must do after a device access.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusAction {
    /// Nothing: resume the guest.
    Continue,
    /// The guest asked to exit with this code.
    Exit(u32),
    /// A measurement marker with this value (passed to the run's observer).
    Marker(u32),
    /// Resume the guest and count this event in the run's statistics (e.g. a trapped
    /// page-table store that was applied or refused).
    Counted(&'static str),
}

/// A device on a bus.
pub trait BusDevice: Send + fmt::Debug {
    /// A stable name for statistics ("uart", "virtio-blk", ...).
    fn name(&self) -> &'static str;

    /// A guest read of `data.len()` bytes at `offset` into the device's range. Must fill
    /// `data`.
    fn read(&mut self, offset: u64, data: &mut [u8]);

    /// A guest write of `data` at `offset` into the device's range.
    fn write(&mut self, offset: u64, data: &[u8]) -> BusAction;
}

/// A shared device handle, as held by a bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Why a range cannot be registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// Empty or wrapping range.
    #[error("invalid bus range {base:#x}+{len:#x}")]
    InvalidRange {
        /// First address.
        base: u64,
        /// Length.
        len: u64,
    },
    /// The range overlaps one already registered.
    #[error("bus range {base:#x}+{len:#x} for {name} overlaps {other}")]
    Overlap {
        /// First address.
        base: u64,
        /// Length.
        len: u64,
        /// The new device.
        name: &'static str,
        /// The device already there.
        other: &'static str,
    },
}

#[derive(Debug, Clone)]
struct Range {
    base: u64,
    len: u64,
    name: &'static str,
    device: SharedDevice,
}

impl Range {
    fn last(&self) -> u64 {
        self.base + (self.len - 1)
    }
}

/// Devices by address range.
#[derive(Debug, Clone, Default)]
pub struct Bus {
    /// Sorted by base, never overlapping.
    ranges: Vec<Range>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Bus {
        Bus::default()
    }

    /// Registers `device` for `[base, base + len)`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        if len == 0 || base.checked_add(len - 1).is_none() {
            return Err(BusError::InvalidRange { base, len });
        }
        let name = lock(&device).name();
        let last = base + (len - 1);
        let at = self.ranges.partition_point(|r| r.base < base);
        let clash = [at.checked_sub(1), Some(at)]
            .into_iter()
            .flatten()
            .filter_map(|i| self.ranges.get(i))
            .find(|r| r.base <= last && base <= r.last());
        if let Some(other) = clash {
            return Err(BusError::Overlap {
                base,
                len,
                name,
                other: other.name,
            });
        }
        self.ranges.insert(
            at,
            Range {
                base,
                len,
                name,
                device,
            },
        );
        Ok(())
    }

    /// The range holding `addr`: its device, name and the offset of `addr` in it.
    fn find(&self, addr: u64) -> Option<(&Range, u64)> {
        let i = self
            .ranges
            .partition_point(|r| r.base <= addr)
            .checked_sub(1)?;
        let r = &self.ranges[i];
        (addr <= r.last()).then_some((r, addr - r.base))
    }

    /// Routes a write. `None` if no device claims `addr` (the caller decides what an
    /// unclaimed access does); else the device's name and what the loop must do.
    pub fn write(&self, addr: u64, data: &[u8]) -> Option<(&'static str, BusAction)> {
        let (r, offset) = self.find(addr)?;
        Some((r.name, lock(&r.device).write(offset, data)))
    }

    /// Routes a read. `None` if no device claims `addr` (`data` is left untouched); else the
    /// device's name.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> Option<&'static str> {
        let (r, offset) = self.find(addr)?;
        lock(&r.device).read(offset, data);
        Some(r.name)
    }

    /// The registered ranges: `(base, len, name)`, by address.
    pub fn ranges(&self) -> impl Iterator<Item = (u64, u64, &'static str)> + '_ {
        self.ranges.iter().map(|r| (r.base, r.len, r.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default)]
    struct Reg {
        last: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Reg {
        fn name(&self) -> &'static str {
            "reg"
        }
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) -> BusAction {
            self.last = Some((offset, data.to_vec()));
            BusAction::Exit(offset as u32)
        }
    }

    #[test]
    fn routes_by_range_with_offsets() {
        let a = Arc::new(Mutex::new(Reg::default()));
        let mut bus = Bus::new();
        bus.insert(0x100, 8, a.clone()).unwrap();
        bus.insert(0x200, 0x10, Arc::new(Mutex::new(Reg::default())))
            .unwrap();
        assert_eq!(bus.write(0x103, &[1]), Some(("reg", BusAction::Exit(3))));
        assert_eq!(lock(&a).last, Some((3, vec![1])));
        let mut d = [0u8; 2];
        assert_eq!(bus.read(0x20f, &mut d), Some("reg"));
        assert_eq!(d, [0xf, 0xf]);
        assert_eq!(bus.write(0x108, &[1]), None);
        assert_eq!(bus.write(0xff, &[1]), None);
        assert_eq!(bus.read(0x210, &mut d), None);
        assert_eq!(bus.write(u64::MAX, &[1]), None);
    }

    #[test]
    fn refuses_overlaps_and_bad_ranges() {
        let dev = || Arc::new(Mutex::new(Reg::default())) as SharedDevice;
        let mut bus = Bus::new();
        bus.insert(0x100, 0x10, dev()).unwrap();
        for (base, len) in [(0xf8, 9), (0x10f, 1), (0x100, 1), (0x0, 0x1000)] {
            assert!(matches!(
                bus.insert(base, len, dev()),
                Err(BusError::Overlap { .. })
            ));
        }
        assert!(matches!(
            bus.insert(5, 0, dev()),
            Err(BusError::InvalidRange { .. })
        ));
        assert!(matches!(
            bus.insert(u64::MAX, 2, dev()),
            Err(BusError::InvalidRange { .. })
        ));
        bus.insert(u64::MAX, 1, dev()).unwrap();
        bus.insert(0xf0, 0x10, dev()).unwrap();
        bus.insert(0x110, 1, dev()).unwrap();
        assert_eq!(bus.ranges().count(), 4);
    }
}
