//! Devices: what the guest reaches through port I/O and MMIO. Every access here is a full exit
//! to the VMM, routed by address on one of the VM's two [`Bus`](crate::bus::Bus)es.
//!
//! The PIO devices are the trapped twins an unmodified guest uses: COM1 ([`serial::Uart`]),
//! the exit and marker ports and the null device ([`debug`]), the periodic timer
//! ([`timer::PeriodicTimer`]) and the event device ([`event::EventDevice`]). The MMIO devices
//! are the virtio transports ([`virtio`]) and the page-table pool's trapped window
//! ([`crate::trap::pool_window::PoolWindow`]). Each implements [`BusDevice`](crate::bus::BusDevice)
//! and, where it has state, [`Persist`](crate::state::Persist).

pub mod debug;
pub mod event;
pub mod serial;
pub mod timer;
pub mod virtio;
