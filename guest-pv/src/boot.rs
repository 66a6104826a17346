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

/// The largest usable RAM region above the kernel image (page-aligned start, length), from the
/// boot memory map: where a kernel without an allocator of its own can put its data.
pub fn free_ram(info: &BootInfo) -> Option<(u64, u64)> {
    const PAGE: u64 = hypercall_abi::layout::PAGE_SIZE;
    info.regions()
        .iter()
        .filter(|r| r.kind == region_kind::USABLE)
        .filter_map(|r| {
            let end = r.start.checked_add(r.len)?;
            let start = r
                .start
                .max(info.kernel_end)
                .checked_next_multiple_of(PAGE)?;
            (start < end).then(|| (start, end - start))
        })
        .max_by_key(|&(_, len)| len)
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
        assert_eq!(free_ram(&good), None, "no memory map, no free RAM");
        let mut mapped = good.clone();
        mapped.kernel_end = 0x30_1234;
        for (start, len, kind) in [
            (0, 0x10_0000, region_kind::RESERVED),
            (0x20_0000, 0x20_0000, region_kind::USABLE),
            (0x40_0000, 0x400_0000, region_kind::USABLE),
        ] {
            mapped
                .push_region(MemRegion {
                    start,
                    len,
                    kind,
                    info: 0,
                })
                .unwrap();
        }
        assert_eq!(free_ram(&mapped), Some((0x40_0000, 0x400_0000)));
        let mut other_major = good.clone();
        other_major.abi_version = 2 << 16;
        assert!(matches!(
            check(&other_major),
            Err(BootError::Invalid { .. })
        ));
    }
}
