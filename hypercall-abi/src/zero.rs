//! Pre-zeroed page hints (ABI v1.3; [`PREPARE`] v1.6): `zero_hints(op, ...)`.
//!
//! The host knows which guest frames are zero without looking at them: a frame of guest RAM the
//! guest never wrote (or that the host discarded since) is not backed by host memory at all,
//! and reads as zero. The guest knows which frames it no longer needs. Two operations close the
//! gap in both directions:
//!
//! - [`QUERY`] (host → guest, "known zero"): `a1` = GPA of a bitmap buffer in guest RAM,
//!   `a2` = first frame number (frame = GPA / 4096), `a3` = number of frames (≤
//!   [`QUERY_MAX_FRAMES`]). The host writes one bit per frame (bit *i* of byte *i*/8, LSB first):
//!   1 = known zero, 0 = unknown. Returns the number of known-zero frames. A frame reported zero
//!   stays zero until the guest writes it — the guest allocator skips `memset` for it and, once
//!   it hands the frame out, no longer treats it as zero.
//! - [`RELEASE`] (guest → host, "released"): `a1` = GPA of an array of [`ZeroRange`], `a2` =
//!   count (≤ [`RELEASE_MAX_RANGES`]). The host discards the backing of every range (returning
//!   the memory to the host) and the frames read as zero again. Ranges must be page-aligned,
//!   inside RAM, and must not overlap the kernel image, the boot structures below it, or the
//!   range table itself. Returns the bytes released. All ranges are checked before any is
//!   released: on error nothing is released.
//! - [`PREPARE`] (guest → host, "about to use", v1.6, feature
//!   [`ZERO_PREPARE`](crate::features::ZERO_PREPARE)): `a1` = GPA, `a2` = length in bytes, both
//!   page-aligned, the range inside RAM and above the kernel image (the checks of [`RELEASE`]).
//!   The guest is about to hand out these known-zero frames; the host backs them on another
//!   thread, ahead of use, so the vCPU does not stall on host page faults (whose cost is the host
//!   zeroing the page). Preparing never changes what a frame reads, and a frame stays known zero
//!   to the guest — but the host no longer reports it in a later [`QUERY`] (it is backed now), so
//!   guests prepare only frames they already know to be zero. Returns at once with the bytes
//!   queued (0 if the host's queue is full: the hint is dropped). A later [`RELEASE`] of a
//!   prepared range cancels what is still queued of it.
//!
//! - [`FREE_LIST`] (guest → host, "free, don't save", v1.8, feature
//!   [`FREE_REPORT`](crate::features::FREE_REPORT)): `a1` = GPA of an array of `a2` (≤
//!   [`RELEASE_MAX_RANGES`]) [`ZeroRange`] entries, 16-byte aligned and inside RAM. Registers
//!   the array; it is not read now. Every entry with `len != 0` names frames that are free: the
//!   guest does not care about their contents, and the host may treat them as zero when it
//!   saves or migrates the VM (a restored or migrated guest finds them zero). Entries with
//!   `len == 0` are unused. The host reads the list only while the vCPU is stopped at an exit
//!   boundary (snapshot) or between migration rounds, and skips invalid entries (not
//!   page-aligned, outside RAM, below the kernel image's end); so the guest must take a frame
//!   out of the list *before* it hands it out again, and every intermediate state of an entry
//!   it edits must name only free frames. Registering again replaces the registration;
//!   `a2 = 0` unregisters. Returns 0.
//!
//! The trapped twin is simply a guest that ignores this: it zeroes every frame it hands out
//! and never reports frees.
//!
//! Guests should release in batches (ranges, not one call per page) and only once at least
//! [`RELEASE_THRESHOLD_BYTES`] are pending, so tiny frees don't cost an exit each.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// `zero_hints` `a0`: report known-zero frames into a bitmap.
pub const QUERY: u64 = 1;
/// `zero_hints` `a0`: release ranges.
pub const RELEASE: u64 = 2;
/// `zero_hints` `a0`: back known-zero frames ahead of use (v1.6).
pub const PREPARE: u64 = 3;
/// `zero_hints` `a0`: register the guest's free list (v1.8).
pub const FREE_LIST: u64 = 4;
/// The alignment of a [`FREE_LIST`] array (that of [`ZeroRange`]'s 16 bytes).
pub const FREE_LIST_ALIGN: u64 = 16;
/// The most frames one [`QUERY`] covers (a 4 KiB bitmap).
pub const QUERY_MAX_FRAMES: u64 = 4096 * 8;
/// The most ranges one [`RELEASE`] takes.
pub const RELEASE_MAX_RANGES: u64 = 256;
/// Suggested minimum of pending bytes before a guest issues [`RELEASE`]. Each call costs the
/// host a fixed ≈ 70 µs on pvkit's KVM (discarding memory KVM maps invalidates its mappings),
/// so 256 MiB released in 2 MiB batches took 10 ms and in 32 MiB batches 2.4 ms (v1.6; 2 MiB
/// before).
pub const RELEASE_THRESHOLD_BYTES: u64 = 32 << 20;

/// A guest-physical range `[start, start + len)`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct ZeroRange {
    /// First byte (page-aligned).
    pub start: u64,
    /// Length in bytes (a multiple of the page size).
    pub len: u64,
}

/// Is frame `i` (relative to the query's first frame) marked known-zero in `bitmap`?
pub fn bit(bitmap: &[u8], i: usize) -> bool {
    bitmap.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_is_lsb_first() {
        let bm = [0b0000_0101u8, 0x80];
        assert!(bit(&bm, 0) && !bit(&bm, 1) && bit(&bm, 2) && bit(&bm, 15));
        assert!(!bit(&bm, 16));
        assert_eq!(core::mem::size_of::<ZeroRange>(), 16);
    }
}
