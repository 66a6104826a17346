//! The guest-physical memory map the VMM builds before entering the kernel.
//!
//! ```text
//! 0x0000_0000 .. 0x0000_1000   unused (left zero)
//! 0x0000_1000                  GDT (null, code64, data)
//! 0x0000_2000                  BootInfo (one page)
//! 0x0000_3000                  PML4
//! 0x0000_4000                  PDPT
//! 0x0000_5000 .. 0x0000_9000   4 page directories: identity map of 0..4 GiB, 2 MiB pages
//! 0x0010_0000 .. 0x0020_0000   boot stack (grows down from STACK_TOP)
//! 0x0020_0000 .. kernel_end    kernel image (ELF PT_LOAD segments, at their p_paddr)
//! kernel_end  .. mem_size      free RAM (see BootInfo memory map)
//! 0xC000_0000 .. 0x1_0000_0000 reserved for device MMIO (virtio-mmio), never RAM
//! ```
//! Virtual addresses equal physical addresses under the VMM's initial page tables.

/// Size of a small page.
pub const PAGE_SIZE: u64 = 0x1000;
/// Guest-physical address of the GDT.
pub const GDT_GPA: u64 = 0x1000;
/// Guest-physical address of the [`crate::boot::BootInfo`] block (passed in `rdi` at entry).
pub const BOOT_INFO_GPA: u64 = 0x2000;
/// Guest-physical address of the initial PML4 (loaded into CR3).
pub const PML4_GPA: u64 = 0x3000;
/// Guest-physical address of the initial PDPT.
pub const PDPT_GPA: u64 = 0x4000;
/// Guest-physical address of the first of [`IDENTITY_MAP_PDS`] page directories.
pub const PD_GPA: u64 = 0x5000;
/// Number of page directories of the initial identity map (each maps 1 GiB).
pub const IDENTITY_MAP_PDS: u64 = 4;
/// Bytes identity-mapped at entry.
pub const IDENTITY_MAP_SIZE: u64 = IDENTITY_MAP_PDS << 30;
/// Lowest address of the boot stack.
pub const STACK_BOTTOM: u64 = 0x10_0000;
/// Initial stack pointer region top; at entry `rsp = STACK_TOP - 8` (as after a `call`).
pub const STACK_TOP: u64 = 0x20_0000;
/// Lowest guest-physical address a kernel segment may be loaded at.
pub const KERNEL_MIN_GPA: u64 = 0x20_0000;
/// Start of the device MMIO window; RAM never reaches it.
pub const MMIO_START: u64 = 0xC000_0000;
/// Smallest guest RAM the VMM accepts.
pub const MIN_MEM_SIZE: u64 = 16 << 20;
/// Largest guest RAM the VMM accepts (RAM must end below [`MMIO_START`]).
pub const MAX_MEM_SIZE: u64 = MMIO_START;

/// GDT selector of the 64-bit code segment.
pub const GDT_CODE64_SELECTOR: u16 = 0x08;
/// GDT selector of the data segment.
pub const GDT_DATA_SELECTOR: u16 = 0x10;
