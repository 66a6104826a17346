//! Live migration transport: how `host-vmm migrate` (the source) and
//! `host-vmm receive --listen ADDR` (the destination) talk to each other.
//!
//! Three layers:
//!
//! - [`engine`]: the rounds — what the source sends when ([`engine::send`]) and how the
//!   destination builds the VM from it ([`engine::receive`]).
//! - [`endpoint`]: where the stream goes. An [`endpoint::Endpoint`] is parsed from
//!   `unix:PATH`, `tcp:HOST:PORT`, a bare path containing `/`, or `HOST:PORT`; TCP is
//!   **refused unless it is loopback** (127.0.0.0/8, `::1`, `localhost`) because the stream is
//!   neither authenticated nor encrypted. [`endpoint::Endpoint::listen`] and
//!   [`endpoint::Endpoint::connect`] give a [`endpoint::Conn`] whose reads and writes time out
//!   (a stalled peer becomes an error, never a hang).
//! - [`wire`]: what goes over it. Framed, CRC-32-checked [`wire::Message`]s written with
//!   [`wire::write_message`] / [`wire::write_pages`] and read with [`wire::read_message`] or,
//!   on the destination, a [`wire::Receiver`] that checks the handshake and refuses pages
//!   beyond the guest's RAM. Every failure is a [`wire::MigrationError`].
//!
//! The wire format and its guarantees are described in `docs/MIGRATION.md`.

pub mod endpoint;
pub mod engine;
pub mod wire;
