//! Booting kernels by the PVH protocol ([`hypercall_abi::pvh`]): a kernel that carries the
//! `XEN_ELFNOTE_PHYS32_ENTRY` note but not pvkit's ABI note (a third-party PVH kernel, or a
//! guest-pv kernel stripped of its pvkit note) is entered in 32-bit protected mode at its PVH
//! entry with `rbx` = an `hvm_start_info`, a memory map and a command line written into low
//! RAM. A kernel with pvkit's note is entered directly in long mode ([`crate::boot`]), which
//! stays the default and the fastest.
//!
//! ```text
//! 0x1000   GDT: null, flat 32-bit code (0x08), flat data (0x10)
//! 0x3000   hvm_start_info (version 1)
//! 0x3040   memory map: reserved 0..1 MiB, RAM 1 MiB..mem_size
//! 0x3400   command line: `workload=NAME ARGS…` (NUL-terminated)
//! ```

use hypercall_abi::layout::GDT_GPA;
use hypercall_abi::pvh::{
    HVM_START_MAGIC, HvmMemmapEntry, HvmStartInfo, MEMMAP_TYPE_RAM, MEMMAP_TYPE_RESERVED,
    find_pvh_entry,
};
use kvm_bindings::{kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};
use zerocopy::IntoBytes;

use crate::error::{Error, Result};
use crate::kernel_abi::KernelAbi;
use crate::memory::GuestRam;

/// Guest-physical address of the `hvm_start_info` (`rbx` at entry).
pub const START_INFO_GPA: u64 = 0x3000;
/// Guest-physical address of the memory map.
pub const MEMMAP_GPA: u64 = 0x3040;
/// Guest-physical address of the command line.
pub const CMDLINE_GPA: u64 = 0x3400;
/// Longest command line, NUL included (it must end below 0x4000).
pub const CMDLINE_MAX: usize = 0xc00;
/// Selector of the flat 32-bit code segment.
const CODE32_SELECTOR: u16 = 0x08;
/// Selector of the flat data segment.
const DATA_SELECTOR: u16 = 0x10;
/// The GDT the kernel is entered with: null, flat 32-bit code, flat data (accessed bits set).
const GDT: [u64; 3] = [0, 0x00cf_9b00_0000_ffff, 0x00cf_9300_0000_ffff];

/// The PVH entry `host-vmm` uses for `image`: its PVH note's entry when it has one and no
/// pvkit ABI note (a kernel with pvkit's note is entered directly); `None` otherwise.
pub fn entry(image: &[u8]) -> Option<u64> {
    if KernelAbi::read(image) != KernelAbi::Unmarked {
        return None;
    }
    pvh_note_entry(image)
}

/// The entry address in `image`'s PVH note, if it has one (whatever other notes it carries).
pub fn pvh_note_entry(image: &[u8]) -> Option<u64> {
    crate::kernel_abi::note_ranges(image)
        .into_iter()
        .find_map(find_pvh_entry)
        .map(u64::from)
}

/// The command line a PVH kernel gets: `workload=NAME` (if any) then the arguments.
pub fn cmdline(workload: &str, args: &str) -> String {
    let mut line = String::new();
    if !workload.is_empty() {
        line.push_str("workload=");
        line.push_str(workload);
    }
    if !args.is_empty() {
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(args);
    }
    line
}

/// Writes the PVH GDT, `hvm_start_info`, memory map and command line into `ram`.
pub fn write_start_info(ram: &GuestRam, cmdline: &str) -> Result<()> {
    if cmdline.len() >= CMDLINE_MAX || cmdline.contains('\0') {
        return Err(Error::GuestMemory(format!(
            "PVH command line of {} bytes does not fit in {CMDLINE_MAX} (or has a NUL)",
            cmdline.len()
        )));
    }
    let memmap = [
        HvmMemmapEntry {
            addr: 0,
            size: 0x10_0000,
            kind: MEMMAP_TYPE_RESERVED,
            reserved: 0,
        },
        HvmMemmapEntry {
            addr: 0x10_0000,
            size: ram.size() - 0x10_0000,
            kind: MEMMAP_TYPE_RAM,
            reserved: 0,
        },
    ];
    let info = HvmStartInfo {
        magic: HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_GPA,
        memmap_paddr: MEMMAP_GPA,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut line = cmdline.as_bytes().to_vec();
    line.push(0);
    let mem = ram.mem();
    for (bytes, gpa) in [
        (GDT.as_bytes(), GDT_GPA),
        (info.as_bytes(), START_INFO_GPA),
        (memmap.as_bytes(), MEMMAP_GPA),
        (&line[..], CMDLINE_GPA),
    ] {
        mem.write_slice(bytes, GuestAddress(gpa)).map_err(|e| {
            Error::GuestMemory(format!("writing PVH boot structures at {gpa:#x}: {e}"))
        })?;
    }
    Ok(())
}

/// Puts `sregs` into the PVH entry state: 32-bit protected mode, paging off, flat segments.
pub fn protected_mode_sregs(sregs: &mut kvm_sregs) {
    let data = crate::boot::flat_segment(DATA_SELECTOR, false, false);
    sregs.cs = crate::boot::flat_segment(CODE32_SELECTOR, true, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = GDT_GPA;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.cr0 = 0x11; // PE | ET
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
}

/// The PVH entry registers: `rip` = entry, `rbx` = the start info, interrupts off.
pub fn initial_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rbx: START_INFO_GPA,
        rflags: 0x2,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::minimal_elf_with_note;
    use hypercall_abi::pvh::PvhNote;
    use zerocopy::FromBytes;

    #[test]
    fn pvh_only_kernels_are_entered_by_pvh() {
        let pvh = PvhNote::new(0x20_0000);
        let only = minimal_elf_with_note(0x20_0000, &[0xf4], 0x1000, Some(pvh.as_bytes()));
        assert_eq!(entry(&only), Some(0x20_0000));
        let mut both = hypercall_abi::note::AbiNote::new(0).as_bytes().to_vec();
        both.extend_from_slice(pvh.as_bytes());
        let both = minimal_elf_with_note(0x20_0000, &[0xf4], 0x1000, Some(&both));
        assert_eq!(entry(&both), None, "pvkit's note: direct entry");
        assert_eq!(pvh_note_entry(&both), Some(0x20_0000));
        let none = minimal_elf_with_note(0x20_0000, &[0xf4], 0x1000, None);
        assert_eq!(entry(&none), None);
    }

    #[test]
    fn start_info_lands_where_rbx_points() {
        let ram = GuestRam::new(32 << 20).unwrap();
        write_start_info(&ram, &cmdline("null", "ops=5")).unwrap();
        let mut page = [0u8; 4096];
        ram.mem()
            .read_slice(&mut page, GuestAddress(START_INFO_GPA))
            .unwrap();
        let (info, _) = HvmStartInfo::read_from_prefix(&page).unwrap();
        assert_eq!((info.magic, info.version), (HVM_START_MAGIC, 1));
        let at = (MEMMAP_GPA - START_INFO_GPA) as usize;
        let (map, _) = <[HvmMemmapEntry; 2]>::read_from_prefix(&page[at..]).unwrap();
        assert_eq!(map[1].addr + map[1].size, 32 << 20);
        let at = (CMDLINE_GPA - START_INFO_GPA) as usize;
        assert_eq!(&page[at..at + 19], b"workload=null ops=5");
        assert_eq!(page[at + 19], 0);
        assert_eq!(cmdline("", "a=1"), "a=1");
        assert!(write_start_info(&ram, &"x".repeat(CMDLINE_MAX)).is_err());
    }
}
