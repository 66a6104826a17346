//! The guest-physical memory map the VMM builds before entering the kernel.
//!
//! ```text
//! 0x0000_0000 .. 0x0000_1000   unused (left zero)
//! 0x0000_1000                  GDT (null, code64, data)
//! 0x0000_2000                  BootInfo (one page)
//! 0x0010_0000 .. 0x0020_0000   boot stack (grows down from STACK_TOP)
//! 0x0020_0000 .. kernel_end    kernel image (ELF PT_LOAD segments, at their p_paddr)
//! kernel_end  .. mem_size      free RAM (see BootInfo memory map); mem_size <= PT_POOL_GPA
//! 0xBFC0_0000 .. 0xC000_0000   page-table pool (read-only to the guest), see crate::mmu:
//!   +0x0000                    boot PML4
//!   +0x1000                    boot PDPT
//!   +0x2000 .. +0x6000         4 page directories: identity map of 0..4 GiB, 2 MiB pages
//! 0xC000_0000 .. 0x1_0000_0000 reserved for device MMIO (virtio-mmio), never RAM
//! ```
//! Virtual addresses equal physical addresses under the VMM's initial page tables.

/// Size of a small page.
pub const PAGE_SIZE: u64 = 0x1000;
/// Guest-physical address of the GDT.
pub const GDT_GPA: u64 = 0x1000;
/// Guest-physical address of the [`crate::boot::BootInfo`] block (passed in `rdi` at entry).
pub const BOOT_INFO_GPA: u64 = 0x2000;
/// Guest-physical base of the page-table pool (see [`crate::mmu`]).
pub const PT_POOL_GPA: u64 = 0xBFC0_0000;
/// Size of the page-table pool (1024 frames, [`crate::mmu::POOL_FRAMES`]).
pub const PT_POOL_SIZE: u64 = 4 << 20;
/// Pool frames holding the VMM's boot tables (PML4, PDPT, 4 PDs), typed and pinned at boot.
pub const PT_POOL_BOOT_FRAMES: u64 = 2 + IDENTITY_MAP_PDS;
/// Guest-physical address of the initial PML4 (loaded into CR3): the first pool frame.
pub const PML4_GPA: u64 = PT_POOL_GPA;
/// Guest-physical address of the initial PDPT.
pub const PDPT_GPA: u64 = PT_POOL_GPA + 0x1000;
/// Guest-physical address of the first of [`IDENTITY_MAP_PDS`] page directories.
pub const PD_GPA: u64 = PT_POOL_GPA + 0x2000;
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
/// Largest guest RAM the VMM accepts (RAM must end below the page-table pool).
pub const MAX_MEM_SIZE: u64 = PT_POOL_GPA;

/// GDT selector of the 64-bit code segment.
pub const GDT_CODE64_SELECTOR: u16 = 0x08;
/// GDT selector of the data segment.
pub const GDT_DATA_SELECTOR: u16 = 0x10;
