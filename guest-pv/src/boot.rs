//! The boot-info block pvkit hands a kernel in `rdi`: a checked reader for the entry point.
//!
//! [`read`] turns the raw entry argument into a `&'static BootInfo` only if it is non-null,
//! aligned, and carries pvkit's magic, a compatible ABI major version and a known size; a kernel
//! uses it before trusting anything else the block says. The block describes the machine
//! (memory map, kernel image, workload name and arguments); its `mode` field only says how the
//! host was asked to run the VM — kernels decide PV or trapped by
//! [`Platform::detect`](crate::Platform::detect), never by `mode`.

use core::fmt;

pub use hypercall_abi::boot::{BOOT_INFO_MAGIC, BootInfo, MemRegion, Mode, region_kind};

/// Why the boot info was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootError {
    /// The pointer was null or not aligned for a `BootInfo`.
    BadPointer(usize),
    /// Wrong magic, ABI major version or size.
    Invalid {
        /// `BootInfo::magic`.
        magic: u64,
        /// `BootInfo::abi_version` (packed).
        abi_version: u32,
        /// `BootInfo::size`.
        size: u32,
    },
}

impl fmt::Display for BootError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BootError::BadPointer(p) => write!(f, "bad boot-info pointer {p:#x}"),
            BootError::Invalid {
                magic,
                abi_version,
                size,
            } => write!(
                f,
                "magic {magic:#x} (want {BOOT_INFO_MAGIC:#x}), abi version {abi_version:#x} \
                 (want major {}), size {size} (want >= {})",
                hypercall_abi::ABI_VERSION_MAJOR,
                core::mem::size_of::<BootInfo>()
            ),
        }
    }
}

/// Checks and borrows the boot-info block at `ptr` (the entry point's `rdi`).
///
/// # Safety
/// A non-null, aligned `ptr` must point to `size_of::<BootInfo>()` readable bytes that nothing
/// writes for the rest of the kernel's life (pvkit's boot page, identity-mapped, qualifies).
pub unsafe fn read(ptr: *const BootInfo) -> Result<&'static BootInfo, BootError> {
    if ptr.is_null() || !ptr.is_aligned() {
        return Err(BootError::BadPointer(ptr.addr()));
    }
    // SAFETY: non-null and aligned (checked above); readable and immutable for `'static` by the
    // caller's contract. Every bit pattern is a valid `BootInfo` (it is `FromBytes`).
    let info = unsafe { &*ptr };
    check(info)
}

/// The checks of [`read`] on a block already borrowed.
pub fn check(info: &BootInfo) -> Result<&BootInfo, BootError> {
    if info.is_valid() {
        Ok(info)
    } else {
        Err(BootError::Invalid {
            magic: info.magic,
            abi_version: info.abi_version,
            size: info.size,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_a_host_block_and_rejects_bad_ones() {
        let good = BootInfo::new(Mode::Pv, 128 << 20);
        assert!(check(&good).is_ok());
        let leaked: &'static BootInfo = std::boxed::Box::leak(std::boxed::Box::new(good.clone()));
        // SAFETY: a live, aligned value never written again (leaked for 'static).
        let read_back = unsafe { read(leaked) };
        assert!(read_back.is_ok());
        // SAFETY: null is rejected before any read.
        let null = unsafe { read(core::ptr::null()) };
        assert_eq!(null.err(), Some(BootError::BadPointer(0)));
        let mut bad = good.clone();
        bad.magic ^= 1;
        assert!(matches!(check(&bad), Err(BootError::Invalid { .. })));
        let mut other_major = good.clone();
        other_major.abi_version = 2 << 16;
        assert!(matches!(
            check(&other_major),
            Err(BootError::Invalid { .. })
        ));
    }
}
