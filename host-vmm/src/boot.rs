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

const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_ACCESSED: u64 = 1 << 5;
const PTE_DIRTY: u64 = 1 << 6;
const PTE_HUGE: u64 = 1 << 7;

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
}

/// Writes GDT, page tables and boot info into `ram`.
pub fn write_boot_structures(
    ram: &GuestRam,
    kernel: &ElfInfo,
    req: &BootRequest<'_>,
) -> Result<()> {
    let mem = ram.mem();
    let w = |bytes: &[u8], gpa: u64| {
        mem.write_slice(bytes, GuestAddress(gpa))
            .map_err(|e| Error::GuestMemory(format!("writing boot structures at {gpa:#x}: {e}")))
    };
    w(GDT.as_bytes(), GDT_GPA)?;

    // Identity map 0..4 GiB with 2 MiB pages. Accessed/Dirty are preset so the (software)
    // page walker under us never needs to write them back.
    let flags = PTE_PRESENT | PTE_WRITABLE | PTE_ACCESSED;
    w((PDPT_GPA | flags).as_bytes(), PML4_GPA)?;
    let pdpt: Vec<u64> = (0..IDENTITY_MAP_PDS)
        .map(|i| (PD_GPA + i * PAGE_SIZE) | flags)
        .collect();
    w(pdpt.as_bytes(), PDPT_GPA)?;
    let pds: Vec<u64> = (0..IDENTITY_MAP_PDS * 512)
        .map(|i| (i << 21) | flags | PTE_DIRTY | PTE_HUGE)
        .collect();
    w(pds.as_bytes(), PD_GPA)?;

    let info = boot_info(ram.size(), kernel, req)?;
    w(info.as_bytes(), BOOT_INFO_GPA)
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
    ];
    for (start, len, kind) in regions.into_iter().filter(|r| r.1 > 0) {
        info.push_region(MemRegion {
            start,
            len,
            kind,
            reserved: 0,
        })
        .map_err(Error::BootInfo)?;
    }
    Ok(info)
}

fn segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl: 0,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Puts `sregs` into 64-bit long mode with our GDT and page tables.
pub fn long_mode_sregs(sregs: &mut kvm_sregs) {
    let code = segment(GDT_CODE64_SELECTOR, true);
    let data = segment(GDT_DATA_SELECTOR, false);
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
        };
        write_boot_structures(&ram, &k, &req).unwrap();
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
        assert_eq!(r.len(), 3, "{r:?}");
        assert_eq!((r[1].start, r[1].kind), (0x20_0000, region_kind::KERNEL));
        assert_eq!((r[2].start, r[2].len), (0x20_4000, (32 << 20) - 0x20_4000));
        // 2 MiB page #3 maps 6 MiB.
        let pde: u64 = ram.mem().read_obj(GuestAddress(PD_GPA + 3 * 8)).unwrap();
        assert_eq!(pde & !0xfff, 3 << 21);
        assert_ne!(pde & PTE_HUGE, 0);
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
        };
        assert!(
            boot_info(16 << 20, &k, &req)
                .unwrap_err()
                .to_string()
                .contains("arguments")
        );
    }
}
