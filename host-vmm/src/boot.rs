//! The long-mode boot state the VMM builds: GDT and identity-mapped page tables in guest
//! memory, the boot-info block, and the initial registers.

use hypercall_abi::boot::{BootInfo, MemRegion, Mode, region_kind};
use hypercall_abi::layout::*;
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};
use zerocopy::IntoBytes;

use crate::error::{Error, Result};
use crate::loader::ElfInfo;
use crate::memory::GuestRam;
use crate::mmu::PageTablePool;

use hypercall_abi::mmu::{PTE_ACCESSED, PTE_DIRTY, PTE_HUGE, PTE_PRESENT, PTE_USER, PTE_WRITABLE};

const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// GDT: null, 64-bit code (L=1, D=0), data. Same encodings as Linux's boot GDT.
const GDT: [u64; 3] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];

/// What the guest is asked to do.
#[derive(Debug, Clone)]
pub struct BootRequest<'a> {
    /// Requested mode.
    pub mode: Mode,
    /// Workload name.
    pub workload: &'a str,
    /// Workload arguments, joined with single spaces.
    pub args: &'a str,
    /// virtio-mmio devices: (window base, virtio device ID), listed in the memory map.
    pub devices: &'a [(u64, u32)],
}

/// Writes GDT, page tables and boot info into `ram`.
pub fn write_boot_structures(
    ram: &GuestRam,
    pool: &mut PageTablePool,
    kernel: &ElfInfo,
    req: &BootRequest<'_>,
) -> Result<()> {
    let mem = ram.mem();
    let w = |bytes: &[u8], gpa: u64| {
        mem.write_slice(bytes, GuestAddress(gpa))
            .map_err(|e| Error::GuestMemory(format!("writing boot structures at {gpa:#x}: {e}")))
    };
    w(GDT.as_bytes(), GDT_GPA)?;

    install_identity_map(pool);

    let info = boot_info(ram.size(), kernel, req)?;
    w(info.as_bytes(), BOOT_INFO_GPA)
}

/// Identity-maps 0..4 GiB with 2 MiB pages in the page-table pool: PML4, PDPT and 4 PDs,
/// typed and pinned (the root carries the VMM's pin). User-accessible, so code the kernel runs
/// at CPL3 can use it; writable, so stores to the pool through it are the trapped page-table
/// path. Accessed/Dirty are preset: the pool is read-only to the guest, so the page walker
/// under us could not set them.
pub fn install_identity_map(pool: &mut PageTablePool) {
    let flags = PTE_PRESENT | PTE_WRITABLE | PTE_USER | PTE_ACCESSED;
    pool.install_vmm_table(PML4_GPA, 4, 1, &[PDPT_GPA | flags]);
    let pdpt: Vec<u64> = (0..IDENTITY_MAP_PDS)
        .map(|i| (PD_GPA + i * PAGE_SIZE) | flags)
        .collect();
    pool.install_vmm_table(PDPT_GPA, 3, 1, &pdpt);
    for pd in 0..IDENTITY_MAP_PDS {
        let entries: Vec<u64> = (0..512)
            .map(|i| ((pd * 512 + i) << 21) | flags | PTE_DIRTY | PTE_HUGE)
            .collect();
        pool.install_vmm_table(PD_GPA + pd * PAGE_SIZE, 2, 1, &entries);
    }
}

/// Builds the boot-info block (memory map, mode, workload).
pub fn boot_info(mem_size: u64, kernel: &ElfInfo, req: &BootRequest<'_>) -> Result<BootInfo> {
    let mut info = BootInfo::new(req.mode, mem_size);
    info.kernel_start = kernel.start;
    info.kernel_end = kernel.end;
    info.set_workload(req.workload).map_err(Error::BootInfo)?;
    info.set_args(req.args).map_err(Error::BootInfo)?;
    let free = kernel.end.next_multiple_of(PAGE_SIZE);
    let regions = [
        (0, STACK_TOP, region_kind::RESERVED),
        (STACK_TOP, kernel.start - STACK_TOP, region_kind::USABLE),
        (kernel.start, free - kernel.start, region_kind::KERNEL),
        (free, mem_size - free, region_kind::USABLE),
        (
            PT_POOL_GPA,
            PT_POOL_BOOT_FRAMES * PAGE_SIZE,
            region_kind::PT_POOL_BOOT,
        ),
        (
            PT_POOL_GPA + PT_POOL_BOOT_FRAMES * PAGE_SIZE,
            PT_POOL_SIZE - PT_POOL_BOOT_FRAMES * PAGE_SIZE,
            region_kind::PT_POOL,
        ),
    ];
    for (start, len, kind) in regions.into_iter().filter(|r| r.1 > 0) {
        info.push_region(MemRegion {
            start,
            len,
            kind,
            info: 0,
        })
        .map_err(Error::BootInfo)?;
    }
    for &(start, device_id) in req.devices {
        info.push_region(MemRegion {
            start,
            len: hypercall_abi::virtio::VIRTIO_MMIO_SLOT,
            kind: region_kind::VIRTIO_MMIO,
            info: device_id,
        })
        .map_err(Error::BootInfo)?;
    }
    Ok(info)
}

/// A flat (base 0, 4 GiB) ring-0 segment: code (execute/read) or data (read/write); a code
/// segment is 64-bit in long mode and 32-bit otherwise.
pub(crate) fn flat_segment(selector: u16, code: bool, long_mode: bool) -> kvm_segment {
    let long_code = code && long_mode;
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl: 0,
        db: u8::from(!long_code),
        s: 1,
        l: u8::from(long_code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Puts `sregs` into 64-bit long mode with our GDT and page tables.
pub fn long_mode_sregs(sregs: &mut kvm_sregs) {
    let code = flat_segment(GDT_CODE64_SELECTOR, true, true);
    let data = flat_segment(GDT_DATA_SELECTOR, false, true);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = GDT_GPA;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.cr3 = PML4_GPA;
    sregs.cr4 = CR4_PAE;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.efer = EFER_LME | EFER_LMA;
}

/// Initial general-purpose registers: entry, stack, boot info in `rdi`, interrupts off.
pub fn initial_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsp: STACK_TOP - 8,
        rdi: BOOT_INFO_GPA,
        rflags: 0x2,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerocopy::FromBytes;

    #[test]
    fn boot_structures_land_where_the_abi_says() {
        let ram = GuestRam::new(32 << 20).unwrap();
        let k = ElfInfo {
            entry: 0x20_0000,
            start: 0x20_0000,
            end: 0x20_3456,
        };
        let req = BootRequest {
            mode: Mode::Trapped,
            workload: "null",
            args: "ops=5",
            devices: &[],
        };
        let mut pool = PageTablePool::new(32 << 20).unwrap();
        write_boot_structures(&ram, &mut pool, &k, &req).unwrap();
        let mut page = [0u8; 4096];
        ram.mem()
            .read_slice(&mut page, GuestAddress(BOOT_INFO_GPA))
            .unwrap();
        let (info, _) = BootInfo::read_from_prefix(&page).unwrap();
        assert!(info.is_valid());
        assert_eq!(info.mode(), Some(Mode::Trapped));
        assert_eq!(info.workload(), b"null");
        assert_eq!(info.args(), b"ops=5");
        let r = info.regions();
        assert_eq!(r.len(), 5, "{r:?}");
        assert_eq!((r[1].start, r[1].kind), (0x20_0000, region_kind::KERNEL));
        assert_eq!((r[2].start, r[2].len), (0x20_4000, (32 << 20) - 0x20_4000));
        assert_eq!(
            (r[3].start, r[3].kind),
            (PT_POOL_GPA, region_kind::PT_POOL_BOOT)
        );
        assert_eq!(r[4].start + r[4].len, PT_POOL_GPA + PT_POOL_SIZE);
        // 2 MiB page #3 maps 6 MiB, user-accessible; the boot tables are typed and pinned.
        let pde = pool.read_entry(PD_GPA + 3 * 8).unwrap();
        assert_eq!(pde & hypercall_abi::mmu::PTE_ADDR_MASK, 3 << 21);
        assert_ne!(pde & PTE_HUGE, 0);
        assert_ne!(pde & PTE_USER, 0);
        assert_eq!(pool.typed_frames(), PT_POOL_BOOT_FRAMES as usize);
        assert_eq!(pool.unpin(PML4_GPA), Err(hypercall_abi::Error::Denied));
    }

    #[test]
    fn long_args_are_an_error_not_a_truncation() {
        let k = ElfInfo {
            entry: 0x20_0000,
            start: 0x20_0000,
            end: 0x20_1000,
        };
        let long = "x".repeat(600);
        let req = BootRequest {
            mode: Mode::Pv,
            workload: "null",
            args: &long,
            devices: &[],
        };
        assert!(
            boot_info(16 << 20, &k, &req)
                .unwrap_err()
                .to_string()
                .contains("arguments")
        );
    }
}
