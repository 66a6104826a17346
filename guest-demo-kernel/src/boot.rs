//! Reading and validating the boot-info block handed over at entry.

use core::fmt;

use hypercall_abi::boot::{BOOT_INFO_MAGIC, BootInfo, Mode};

/// Why the boot info was rejected.
#[derive(Debug, Clone, Copy)]
pub enum BootInfoError {
    /// `rdi` was null or not aligned for a `BootInfo`.
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
    /// `BootInfo::mode` is neither pv nor trapped.
    UnknownMode(u32),
}

impl fmt::Display for BootInfoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BootInfoError::BadPointer(p) => write!(f, "bad pointer {p:#x}"),
            BootInfoError::Invalid {
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
            BootInfoError::UnknownMode(m) => write!(f, "unknown mode {m}"),
        }
    }
}

/// Turns the entry argument into a reference, if it is non-null and aligned.
///
/// # Safety
/// A non-null, aligned `ptr` must point to `size_of::<BootInfo>()` readable bytes that nothing
/// writes for the rest of the kernel's life.
pub unsafe fn read(ptr: *const BootInfo) -> Result<&'static BootInfo, BootInfoError> {
    if ptr.is_null() || !ptr.is_aligned() {
        return Err(BootInfoError::BadPointer(ptr.addr()));
    }
    // SAFETY: non-null and aligned (checked above); readable and immutable for `'static` by
    // the caller's contract. Every bit pattern is a valid `BootInfo` (it is `FromBytes`).
    Ok(unsafe { &*ptr })
}

/// Checks magic, major version and size, and decodes the mode.
pub fn validate(
    info: Result<&'static BootInfo, BootInfoError>,
) -> Result<(&'static BootInfo, Mode), BootInfoError> {
    let info = info?;
    if !info.is_valid() {
        return Err(BootInfoError::Invalid {
            magic: info.magic,
            abi_version: info.abi_version,
            size: info.size,
        });
    }
    let mode = info.mode().ok_or(BootInfoError::UnknownMode(info.mode))?;
    Ok((info, mode))
}
