//! A simulated pvkit host for the unit tests: frames are host memory (virtual address =
//! "physical" address), QUERY reports the frames that read as zero (or, when told to lie, all
//! of them), RELEASE zeroes the ranges. Every call is recorded.

use std::boxed::Box;
use std::cell::{Cell, RefCell};
use std::vec::Vec;

use hypercall_abi::layout::PAGE_SIZE;
use hypercall_abi::zero::ZeroRange;
use hypercall_abi::{Call, Error, Return};

use super::page;
use crate::HypercallError;

#[derive(Debug, Default)]
pub struct MockHost {
    /// Report every frame known zero.
    pub(crate) lie: Cell<bool>,
    /// Refuse every call.
    pub(crate) fail: Cell<bool>,
    /// Refuse prepares.
    pub(crate) fail_prepare: Cell<bool>,
    /// `(first frame, count)` of each query.
    pub(crate) queries: RefCell<Vec<(u64, u64)>>,
    /// The list of each release.
    pub(crate) releases: RefCell<Vec<Vec<ZeroRange>>>,
    /// `(gpa, len)` of each prepare.
    pub(crate) prepares: RefCell<Vec<(u64, u64)>>,
    /// `(list address, entries)` of each free-list registration (`(0, 0)`: unregistered).
    pub(crate) free_lists: RefCell<Vec<(u64, u64)>>,
}

impl MockHost {
    pub(crate) fn leak() -> &'static MockHost {
        Box::leak(Box::default())
    }

    fn refused() -> HypercallError {
        HypercallError::check(Call::ZeroHints, Return::err(Error::Denied)).unwrap_err()
    }

    pub(crate) fn query(
        &self,
        bitmap: &mut [u8],
        first: u64,
        count: u64,
    ) -> Result<u64, HypercallError> {
        self.queries.borrow_mut().push((first, count));
        if self.fail.get() {
            return Err(MockHost::refused());
        }
        bitmap.fill(0);
        let mut known = 0;
        for i in 0..count {
            // SAFETY: the tests only query frames of their own allocated region, which nothing
            // writes during the call.
            let zero =
                self.lie.get() || unsafe { page::first_nonzero((first + i) * PAGE_SIZE) }.is_none();
            if zero {
                bitmap[(i / 8) as usize] |= 1 << (i % 8);
                known += 1;
            }
        }
        Ok(known)
    }

    pub(crate) fn release(&self, ranges: &[ZeroRange]) -> Result<u64, HypercallError> {
        self.releases.borrow_mut().push(ranges.to_vec());
        if self.fail.get() {
            return Err(MockHost::refused());
        }
        let mut bytes = 0;
        for r in ranges {
            assert!(
                r.start % PAGE_SIZE == 0 && r.len % PAGE_SIZE == 0 && r.len > 0,
                "{r:?}"
            );
            for f in (r.start..r.start + r.len).step_by(PAGE_SIZE as usize) {
                // SAFETY: the allocator releases only free frames of the test's region, which
                // nothing uses.
                unsafe { page::zero_frame(f) };
            }
            bytes += r.len;
        }
        Ok(bytes)
    }

    pub(crate) fn free_list(&self, list: &[ZeroRange]) -> Result<u64, HypercallError> {
        let reg = if list.is_empty() {
            (0, 0)
        } else {
            (list.as_ptr().addr() as u64, list.len() as u64)
        };
        self.free_lists.borrow_mut().push(reg);
        if self.fail.get() {
            return Err(MockHost::refused());
        }
        Ok(0)
    }

    pub(crate) fn prepare(&self, gpa: u64, len: u64) -> Result<u64, HypercallError> {
        self.prepares.borrow_mut().push((gpa, len));
        if self.fail.get() || self.fail_prepare.get() {
            return Err(MockHost::refused());
        }
        assert!(gpa.is_multiple_of(PAGE_SIZE) && len.is_multiple_of(PAGE_SIZE) && len > 0);
        Ok(len)
    }
}
