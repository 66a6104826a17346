//! The boot-info block the VMM writes at [`crate::layout::BOOT_INFO_GPA`] and passes to the
//! kernel entry point in `rdi`.
//!
//! The kernel is entered in 64-bit long mode, CPL 0, interrupts disabled, paging on with the
//! identity map of [`crate::layout`], `rsp = STACK_TOP - 8`, `rdi` = address of [`BootInfo`].

use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout};

/// `BootInfo::magic`: `b"PVKITBI1"` read as a little-endian `u64`.
pub const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"PVKITBI1");
/// Capacity of [`BootInfo::regions`].
pub const MAX_REGIONS: usize = 16;
/// Capacity of [`BootInfo::workload`].
pub const WORKLOAD_NAME_MAX: usize = 32;
/// Capacity of [`BootInfo::args`].
pub const ARGS_MAX: usize = 512;

/// How the guest is asked to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Mode {
    /// Use hypercalls wherever the ABI offers them.
    Pv = 1,
    /// Use no hypercall at all: behave as an unmodified guest (trapped devices only).
    Trapped = 2,
}

impl Mode {
    /// Decodes [`BootInfo::mode`].
    pub const fn from_raw(raw: u32) -> Option<Mode> {
        match raw {
            1 => Some(Mode::Pv),
            2 => Some(Mode::Trapped),
            _ => None,
        }
    }

    /// Stable lowercase name (`"pv"`, `"trapped"`).
    pub const fn name(self) -> &'static str {
        match self {
            Mode::Pv => "pv",
            Mode::Trapped => "trapped",
        }
    }
}

/// What a [`MemRegion`] holds.
pub mod region_kind {
    /// Free RAM the kernel may use.
    pub const USABLE: u32 = 1;
    /// VMM structures (GDT, boot info, initial page tables) and the boot stack.
    pub const RESERVED: u32 = 2;
    /// The loaded kernel image (including its zero-filled BSS).
    pub const KERNEL: u32 = 3;
    /// Free page-table pool frames (read-only to the guest; see `crate::mmu`).
    pub const PT_POOL: u32 = 4;
    /// Pool frames holding the VMM's boot page tables (typed and pinned).
    pub const PT_POOL_BOOT: u32 = 5;
    /// A virtio-mmio device window (not RAM): `info` is the virtio device ID (see
    /// `crate::virtio`).
    pub const VIRTIO_MMIO: u32 = 6;
}

/// One range of guest-physical memory.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct MemRegion {
    /// First byte.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// One of [`region_kind`].
    pub kind: u32,
    /// Kind-specific: the virtio device ID for [`region_kind::VIRTIO_MMIO`]; zero otherwise.
    pub info: u32,
}

/// The boot-info block. All fields little-endian; unused array tails are zero.
#[derive(Debug, Clone, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct BootInfo {
    /// [`BOOT_INFO_MAGIC`].
    pub magic: u64,
    /// Packed ABI version of the host ([`crate::abi_version_packed`]).
    pub abi_version: u32,
    /// `size_of::<BootInfo>()` as written by the host.
    pub size: u32,
    /// Requested [`Mode`] as `u32`.
    pub mode: u32,
    /// Number of valid entries in `regions`.
    pub region_count: u32,
    /// Guest RAM size in bytes (RAM is `0..mem_size`).
    pub mem_size: u64,
    /// Lowest loaded kernel address.
    pub kernel_start: u64,
    /// One past the highest loaded kernel address (end of BSS).
    pub kernel_end: u64,
    /// Memory map, sorted by `start`, non-overlapping.
    pub regions: [MemRegion; MAX_REGIONS],
    /// Valid bytes in `workload`.
    pub workload_len: u32,
    /// Valid bytes in `args`.
    pub args_len: u32,
    /// Requested workload name (ASCII).
    pub workload: [u8; WORKLOAD_NAME_MAX],
    /// Workload arguments: ASCII `key=value` words separated by single spaces.
    pub args: [u8; ARGS_MAX],
}

/// Why a [`BootInfo`] could not be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootInfoError {
    /// Workload name longer than [`WORKLOAD_NAME_MAX`] bytes.
    WorkloadTooLong,
    /// Arguments longer than [`ARGS_MAX`] bytes.
    ArgsTooLong,
    /// More than [`MAX_REGIONS`] regions.
    TooManyRegions,
}

impl core::fmt::Display for BootInfoError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            BootInfoError::WorkloadTooLong => {
                write!(f, "workload name longer than {WORKLOAD_NAME_MAX} bytes")
            }
            BootInfoError::ArgsTooLong => {
                write!(f, "workload arguments longer than {ARGS_MAX} bytes")
            }
            BootInfoError::TooManyRegions => write!(f, "more than {MAX_REGIONS} memory regions"),
        }
    }
}

impl BootInfo {
    /// An empty block with magic, version and size filled in.
    pub fn new(mode: Mode, mem_size: u64) -> BootInfo {
        let mut b = BootInfo::new_zeroed();
        b.magic = BOOT_INFO_MAGIC;
        b.abi_version = crate::abi_version_packed();
        b.size = core::mem::size_of::<BootInfo>() as u32;
        b.mode = mode as u32;
        b.mem_size = mem_size;
        b
    }

    /// Sets the workload name.
    pub fn set_workload(&mut self, name: &str) -> Result<(), BootInfoError> {
        let n = name.len();
        if n > WORKLOAD_NAME_MAX {
            return Err(BootInfoError::WorkloadTooLong);
        }
        self.workload = [0; WORKLOAD_NAME_MAX];
        self.workload[..n].copy_from_slice(name.as_bytes());
        self.workload_len = n as u32;
        Ok(())
    }

    /// Sets the workload arguments (already joined with single spaces).
    pub fn set_args(&mut self, args: &str) -> Result<(), BootInfoError> {
        let n = args.len();
        if n > ARGS_MAX {
            return Err(BootInfoError::ArgsTooLong);
        }
        self.args = [0; ARGS_MAX];
        self.args[..n].copy_from_slice(args.as_bytes());
        self.args_len = n as u32;
        Ok(())
    }

    /// Appends a memory region.
    pub fn push_region(&mut self, region: MemRegion) -> Result<(), BootInfoError> {
        let i = self.region_count as usize;
        if i >= MAX_REGIONS {
            return Err(BootInfoError::TooManyRegions);
        }
        self.regions[i] = region;
        self.region_count += 1;
        Ok(())
    }

    /// True if magic and major version match this crate.
    pub fn is_valid(&self) -> bool {
        self.magic == BOOT_INFO_MAGIC
            && crate::unpack_version(self.abi_version).0 == crate::ABI_VERSION_MAJOR
            && self.size as usize >= core::mem::size_of::<BootInfo>()
    }

    /// The requested mode, if valid.
    pub fn mode(&self) -> Option<Mode> {
        Mode::from_raw(self.mode)
    }

    /// The valid memory regions (clamped to capacity).
    pub fn regions(&self) -> &[MemRegion] {
        &self.regions[..(self.region_count as usize).min(MAX_REGIONS)]
    }

    /// The workload name bytes (clamped to capacity).
    pub fn workload(&self) -> &[u8] {
        &self.workload[..(self.workload_len as usize).min(WORKLOAD_NAME_MAX)]
    }

    /// The argument bytes (clamped to capacity).
    pub fn args(&self) -> &[u8] {
        &self.args[..(self.args_len as usize).min(ARGS_MAX)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_stable() {
        assert_eq!(core::mem::size_of::<MemRegion>(), 24);
        assert_eq!(core::mem::size_of::<BootInfo>(), 984);
        assert!(core::mem::size_of::<BootInfo>() as u64 <= crate::layout::PAGE_SIZE);
    }

    #[test]
    fn encode_decode_round_trip() {
        let mut b = BootInfo::new(Mode::Trapped, 64 << 20);
        b.set_workload("console").unwrap();
        b.set_args("bytes=100 x=1").unwrap();
        b.push_region(MemRegion {
            start: 0x30_0000,
            len: 0x100_0000,
            kind: region_kind::USABLE,
            info: 0,
        })
        .unwrap();
        let bytes = b.as_bytes().to_vec();
        let back = BootInfo::read_from_bytes(&bytes).unwrap();
        assert!(back.is_valid());
        assert_eq!(back.mode(), Some(Mode::Trapped));
        assert_eq!(back.workload(), b"console");
        assert_eq!(back.args(), b"bytes=100 x=1");
        assert_eq!(back.regions().len(), 1);
        assert_eq!(back.regions()[0].len, 0x100_0000);
    }

    #[test]
    fn limits_are_enforced() {
        let mut b = BootInfo::new(Mode::Pv, 1);
        assert_eq!(
            b.set_workload(&"w".repeat(33)),
            Err(BootInfoError::WorkloadTooLong)
        );
        assert_eq!(
            b.set_args(&"a".repeat(513)),
            Err(BootInfoError::ArgsTooLong)
        );
        for _ in 0..MAX_REGIONS {
            b.push_region(MemRegion::default()).unwrap();
        }
        assert_eq!(
            b.push_region(MemRegion::default()),
            Err(BootInfoError::TooManyRegions)
        );
        // A hostile count never indexes out of bounds.
        b.region_count = u32::MAX;
        b.workload_len = u32::MAX;
        assert_eq!(b.regions().len(), MAX_REGIONS);
        assert_eq!(b.workload().len(), WORKLOAD_NAME_MAX);
    }

    #[test]
    fn bad_magic_or_major_is_invalid() {
        let mut b = BootInfo::new(Mode::Pv, 1);
        assert!(b.is_valid());
        b.abi_version = 2 << 16;
        assert!(!b.is_valid());
        b.abi_version = crate::abi_version_packed();
        b.magic = 0;
        assert!(!b.is_valid());
        assert_eq!(Mode::from_raw(0), None);
    }
}
