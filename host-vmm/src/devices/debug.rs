//! The small trapped devices: the exit port, the marker port and the null device (the
//! trapped twin of the `null` hypercall).

use crate::bus::{BusAction, BusDevice};
use crate::state::{Persist, StateError};

/// Little-endian value of a 1-, 2- or 4-byte PIO access.
pub fn le_u32(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(b)
}

/// Fills a 1-, 2- or 4-byte PIO read with the low bytes of `v`.
pub fn put_le_u32(data: &mut [u8], v: u32) {
    let b = v.to_le_bytes();
    let n = data.len().min(4);
    data.fill(0);
    data[..n].copy_from_slice(&b[..n]);
}

/// A scratch register: writes are latched and counted; reads return the write count.
#[derive(Debug, Default)]
pub struct NullDevice {
    latch: u32,
    writes: u64,
}

impl NullDevice {
    /// A guest `out`.
    pub fn write(&mut self, data: &[u8]) {
        self.latch = le_u32(data);
        self.writes = self.writes.wrapping_add(1);
    }

    /// A guest `in`: the number of writes so far (low bytes, as wide as the access).
    pub fn read(&self, data: &mut [u8]) {
        put_le_u32(data, self.writes as u32);
    }

    /// Writes seen.
    pub fn writes(&self) -> u64 {
        self.writes
    }

    /// The last value written.
    pub fn latch(&self) -> u32 {
        self.latch
    }
}

impl BusDevice for NullDevice {
    fn name(&self) -> &'static str {
        "null"
    }

    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        NullDevice::read(self, data);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) -> BusAction {
        NullDevice::write(self, data);
        BusAction::Continue
    }
}

/// The exit port (`EXIT_PORT`): a write of a 32-bit code ends the run with it. Stateless.
#[derive(Debug, Default)]
pub struct ExitPort;

impl BusDevice for ExitPort {
    fn name(&self) -> &'static str {
        "exit"
    }

    /// Write-only; reads float high.
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) -> BusAction {
        BusAction::Exit(le_u32(data))
    }
}

/// The marker port (`MARKER_PORT`): a write passes its value to the run's observer (which
/// may, e.g., measure between two markers). Stateless; costs one exit.
#[derive(Debug, Default)]
pub struct MarkerPort;

impl BusDevice for MarkerPort {
    fn name(&self) -> &'static str {
        "marker"
    }

    /// Write-only; reads float high.
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) -> BusAction {
        BusAction::Marker(le_u32(data))
    }
}

/// [`NullDevice`] state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NullState {
    /// The last value written.
    pub latch: u32,
    /// Writes seen.
    pub writes: u64,
}

impl Persist for NullDevice {
    type State = NullState;

    fn save(&self) -> NullState {
        NullState {
            latch: self.latch,
            writes: self.writes,
        }
    }

    fn restore(&mut self, state: &NullState) -> Result<(), StateError> {
        self.latch = state.latch;
        self.writes = state.writes;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn null_state_round_trips() {
        let mut d = NullDevice::default();
        d.write(&5u32.to_le_bytes());
        let mut fresh = NullDevice::default();
        crate::state::assert_round_trip(&d, &mut fresh);
        assert_eq!((fresh.writes(), fresh.latch()), (1, 5));
    }

    #[test]
    fn null_device_counts_writes() {
        let mut d = NullDevice::default();
        d.write(&7u32.to_le_bytes());
        d.write(&[9]);
        let mut out = [0u8; 4];
        d.read(&mut out);
        assert_eq!(u32::from_le_bytes(out), 2);
        assert_eq!(d.latch(), 9);
        assert_eq!(le_u32(&[1, 2]), 0x0201);
    }
}
