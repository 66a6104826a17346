//! The `zero_hints` hypercall ([`hypercall_abi::zero`]): which frames the host knows are zero
//! ([`Pvkit::zero_query`]), frames the guest gives back ([`Pvkit::zero_release`]), and the list
//! of free frames the host may skip when it saves the VM ([`Pvkit::zero_free_list`], v1.8).
//!
//! [`crate::frames`] builds a frame allocator on top of both.

use hypercall_abi::request::{Request, ZeroOp};
use hypercall_abi::zero::{QUERY_MAX_FRAMES, RELEASE_MAX_RANGES, ZeroRange};
use hypercall_abi::{Call, Error, Return};

use crate::hypercall::raw_request;
use crate::{HypercallError, Pvkit};

impl Pvkit {
    /// Asks which of the `count` frames from frame number `first_frame` (frame = GPA / 4096)
    /// are known zero; the host writes one bit per frame into `bitmap` (bit *i* of byte *i*/8,
    /// LSB first: 1 = known zero, 0 = unknown) and returns the number of known-zero frames. A
    /// frame reported zero stays zero until the guest writes it.
    ///
    /// Fails with `too_large`, without a hypercall, if `count` exceeds
    /// [`QUERY_MAX_FRAMES`] or `bitmap` holds fewer than `count` bits; with `not_implemented` on
    /// a host without [`features::ZERO_HINTS`](hypercall_abi::features::ZERO_HINTS).
    ///
    /// # Safety
    /// `bitmap`'s virtual address must be its guest-physical address (true for the kernel's
    /// memory under pvkit's boot identity map): the host writes the bits there.
    pub unsafe fn zero_query(
        &self,
        bitmap: &mut [u8],
        first_frame: u64,
        count: u64,
    ) -> Result<u64, HypercallError> {
        if count > QUERY_MAX_FRAMES || count.div_ceil(8) > bitmap.len() as u64 {
            return Err(local_error(Error::TooLarge));
        }
        let gpa = bitmap.as_mut_ptr().expose_provenance() as u64;
        // SAFETY: `self` proves a pvkit host. The host writes `count.div_ceil(8)` bytes at
        // `gpa`, which is the caller's exclusively borrowed `bitmap` (long enough, checked
        // above; identity-mapped by the caller's contract), and reads no other guest memory.
        // Not `nomem`, so the compiler reloads the bitmap after the call.
        let ret = unsafe {
            raw_request(Request::ZeroHints(ZeroOp::Query {
                bitmap_gpa: gpa,
                first_frame,
                count,
            }))
        };
        HypercallError::check(Call::ZeroHints, ret)
    }

    /// Gives the frames of `ranges` back to the host with one `zero_hints(RELEASE)`: the host
    /// discards their backing and they read as zero afterwards. Returns the bytes released.
    /// The host checks every range first (page-aligned, inside RAM, above the kernel image, not
    /// overlapping `ranges` itself) and releases nothing if one is bad. An empty slice issues no
    /// hypercall.
    ///
    /// Fails with `too_large`, without a hypercall, for more than [`RELEASE_MAX_RANGES`]
    /// ranges; with `not_implemented` on a host without
    /// [`features::ZERO_HINTS`](hypercall_abi::features::ZERO_HINTS).
    ///
    /// # Safety
    /// - `ranges`' virtual address must be its guest-physical address (pvkit's boot identity
    ///   map): the host reads the list there.
    /// - The memory the ranges describe must be owned by the caller, and nothing may rely on
    ///   its contents: no reference into it, no code, stack or data in use there. Its contents
    ///   become zero.
    pub unsafe fn zero_release(&self, ranges: &[ZeroRange]) -> Result<u64, HypercallError> {
        if ranges.is_empty() {
            return Ok(0);
        }
        if ranges.len() as u64 > RELEASE_MAX_RANGES {
            return Err(local_error(Error::TooLarge));
        }
        let gpa = ranges.as_ptr().expose_provenance() as u64;
        let count = ranges.len() as u64;
        // SAFETY: `self` proves a pvkit host. The host reads `count` ranges at `gpa`, the live,
        // initialised slice (identity-mapped by the caller's contract), and zeroes the memory
        // they describe, which the caller owns and nothing relies on (the caller's contract).
        // Not `nomem`: the list is stored before the call, and the compiler does not cache the
        // released memory across it.
        let ret = unsafe {
            raw_request(Request::ZeroHints(ZeroOp::Release {
                ranges_gpa: gpa,
                count,
            }))
        };
        HypercallError::check(Call::ZeroHints, ret)
    }

    /// Tells the host that the guest is about to hand out the known-zero frames of
    /// `[gpa, gpa + len)` (page-aligned, above the kernel image): the host backs them on
    /// another thread, ahead of use, so the first writes do not stop the vCPU in host page
    /// faults. Returns at once with the bytes the host queued (0 if its queue is full).
    /// Preparing never changes what memory reads, so it needs no `unsafe`: but the host no
    /// longer reports prepared frames in a later [`zero_query`](Self::zero_query) — prepare only
    /// frames already known to be zero.
    ///
    /// Fails with `invalid_argument` (unaligned), `bad_address` (outside RAM), `denied` (below
    /// the kernel's end), or `not_implemented` on a host without
    /// [`features::ZERO_PREPARE`](hypercall_abi::features::ZERO_PREPARE) (ABI v1.6).
    pub fn zero_prepare(&self, gpa: u64, len: u64) -> Result<u64, HypercallError> {
        // SAFETY: `self` proves a pvkit host. PREPARE reads and writes no guest memory the
        // guest can observe: it backs pages whose contents stay what they are.
        let ret = unsafe { raw_request(Request::ZeroHints(ZeroOp::Prepare { gpa, len })) };
        HypercallError::check(Call::ZeroHints, ret)
    }

    /// Registers `list` as the guest's free list with one `zero_hints(FREE_LIST)` (ABI v1.8):
    /// every entry with `len != 0` names frames whose contents the guest does not care about,
    /// which the host may treat as zero when it saves or migrates the VM. The host reads the
    /// array only while the vCPU is stopped, so the guest must take a frame out of it before
    /// it hands the frame out again. Registering again replaces the registration; an empty
    /// `list` unregisters (see [`zero_free_list_clear`](Self::zero_free_list_clear)).
    ///
    /// Fails with `too_large`, without a hypercall, for more than [`RELEASE_MAX_RANGES`]
    /// entries; with `not_implemented` on a host without
    /// [`features::FREE_REPORT`](hypercall_abi::features::FREE_REPORT).
    ///
    /// # Safety
    /// - `list`'s virtual address must be its guest-physical address (pvkit's boot identity
    ///   map): the host reads the array there, later, by address.
    /// - Until the list is unregistered or replaced, the array must stay there, and every
    ///   entry with `len != 0` at any instruction boundary must name only frames the caller
    ///   owns and whose contents nothing relies on: a saved and restored VM may find them zero.
    pub unsafe fn zero_free_list(&self, list: &[ZeroRange]) -> Result<u64, HypercallError> {
        if list.len() as u64 > RELEASE_MAX_RANGES {
            return Err(local_error(Error::TooLarge));
        }
        let (list_gpa, max_ranges) = if list.is_empty() {
            (0, 0)
        } else {
            (list.as_ptr().expose_provenance() as u64, list.len() as u64)
        };
        // SAFETY: `self` proves a pvkit host. The host only records the address now; what it
        // reads later is the caller's identity-mapped array, whose entries name only free
        // frames (the caller's contract). Not `nomem`: the entries are stored before the call.
        let ret = unsafe {
            raw_request(Request::ZeroHints(ZeroOp::FreeList {
                list_gpa,
                max_ranges,
            }))
        };
        HypercallError::check(Call::ZeroHints, ret)
    }

    /// Unregisters the free list (`zero_hints(FREE_LIST)` with `max_ranges = 0`): the host
    /// saves every frame again.
    pub fn zero_free_list_clear(&self) -> Result<u64, HypercallError> {
        // SAFETY: `self` proves a pvkit host; unregistering makes the host read nothing.
        unsafe { self.zero_free_list(&[]) }
    }
}

/// An error detected before a hypercall is issued, reported as the host would.
fn local_error(error: Error) -> HypercallError {
    match HypercallError::check(Call::ZeroHints, Return::err(error)) {
        Err(e) => e,
        Ok(_) => unreachable!("an error status decodes to an error"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_arguments_fail_before_the_hypercall() {
        // Both return before `raw_request`, so this runs on the test host.
        let pv = Pvkit::for_tests();
        let mut bitmap = [0u8; 8];
        // SAFETY: rejected before any hypercall.
        let e = unsafe { pv.zero_query(&mut bitmap, 0, 65) }.unwrap_err();
        assert_eq!(e.error(), Some(Error::TooLarge));
        assert_eq!(e.call(), Call::ZeroHints);
        let mut big = [0u8; 4097];
        // SAFETY: rejected before any hypercall.
        let e = unsafe { pv.zero_query(&mut big, 0, QUERY_MAX_FRAMES + 1) }.unwrap_err();
        assert_eq!(e.error(), Some(Error::TooLarge));
        let ranges = [ZeroRange::default(); RELEASE_MAX_RANGES as usize + 1];
        // SAFETY: rejected before any hypercall.
        let e = unsafe { pv.zero_release(&ranges) }.unwrap_err();
        assert_eq!(e.error(), Some(Error::TooLarge));
        // SAFETY: an empty list issues no hypercall.
        assert_eq!(unsafe { pv.zero_release(&[]) }, Ok(0));
        // SAFETY: rejected before any hypercall.
        let e = unsafe { pv.zero_free_list(&ranges) }.unwrap_err();
        assert_eq!(e.error(), Some(Error::TooLarge));
    }
}
