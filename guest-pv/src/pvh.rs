//! PVH entry: the same kernel binary boots under any VMM that speaks the PVH protocol (QEMU
//! `-M microvm -kernel`, Firecracker, cloud-hypervisor, Xen) as well as under pvkit.
//!
//! [`pvh_entry!`](crate::pvh_entry) (next to [`entry!`](crate::entry)) adds to a kernel:
//! - the `XEN_ELFNOTE_PHYS32_ENTRY` note ([`hypercall_abi::pvh::PvhNote`], section
//!   `.note.Xen`) naming `pvkit_pvh_start`;
//! - `pvkit_pvh_start`, 32-bit code entered with paging off and `ebx` = an
//!   [`HvmStartInfo`]: it loads its own GDT, builds an identity map of `0..4 GiB` (2 MiB pages,
//!   user-accessible like pvkit's boot map) in the kernel's BSS, enables PAE and long mode,
//!   switches to a 256 KiB BSS stack and calls [`enter`];
//! - [`enter`] translates the start info into pvkit's [`BootInfo`] (memory map from the PVH
//!   memmap, workload and arguments from the command line, see [`boot_info_from_pvh`]) and the
//!   kernel's `_start` runs as if pvkit had entered it directly.
//!
//! The command line is `workload=NAME key=value …`: the `workload=` word names the workload,
//! every other word is passed on as an argument. Kernels without `pvh_entry!` are unchanged
//! (no note, no code). `host-vmm` still enters a kernel that carries pvkit's ABI note directly
//! in long mode (faster); it uses the PVH entry only for kernels without it.

use hypercall_abi::boot::{BootInfo, MemRegion, Mode, region_kind};
use hypercall_abi::layout::{KERNEL_MIN_GPA, PAGE_SIZE};
pub use hypercall_abi::pvh::{HVM_START_MAGIC, HvmMemmapEntry, HvmStartInfo, PvhNote};
use hypercall_abi::pvh::{MEMMAP_TYPE_RAM, XEN_ELFNOTE_PHYS32_ENTRY};

/// Memory-map entries read at most.
pub const MAX_MEMMAP_ENTRIES: usize = 64;
/// Command-line bytes read at most.
pub const MAX_CMDLINE: usize = 2048;
/// Highest address the boot identity map covers (RAM above it is left out of the map).
const MAPPED_END: u64 = hypercall_abi::layout::IDENTITY_MAP_SIZE;

const _: () = assert!(XEN_ELFNOTE_PHYS32_ENTRY == 18);

/// Why a PVH start info could not be translated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PvhError {
    /// Wrong magic.
    BadMagic(u32),
    /// Version 0 or no memory map: pvkit kernels need one.
    NoMemoryMap,
    /// The command line's workload name or arguments are too long, or too many regions.
    TooLong,
}

impl core::fmt::Display for PvhError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            PvhError::BadMagic(m) => {
                write!(f, "hvm_start_info magic {m:#x} (want {HVM_START_MAGIC:#x})")
            }
            PvhError::NoMemoryMap => write!(f, "hvm_start_info has no memory map (version < 1)"),
            PvhError::TooLong => {
                write!(f, "command line or memory map too long for the boot info")
            }
        }
    }
}

/// Fills `out` from a PVH start info: RAM entries become usable regions (the kernel image
/// `kernel_start..kernel_end` carved out as [`region_kind::KERNEL`]), other entries reserved;
/// `mem_size` is the end of the highest RAM below 4 GiB; the mode is `mode` (pvkit or not, by
/// detection: kernels decide per feature anyway). `cmdline` is the command line without its NUL.
pub fn boot_info_from_pvh(
    start: &HvmStartInfo,
    memmap: &[HvmMemmapEntry],
    cmdline: &[u8],
    kernel_start: u64,
    kernel_end: u64,
    mode: Mode,
    out: &mut BootInfo,
) -> Result<(), PvhError> {
    if start.magic != HVM_START_MAGIC {
        return Err(PvhError::BadMagic(start.magic));
    }
    if start.version < 1 || memmap.is_empty() {
        return Err(PvhError::NoMemoryMap);
    }
    let mut mem_size = 0;
    let kernel_end = kernel_end.next_multiple_of(PAGE_SIZE);
    let mut regions: [MemRegion; hypercall_abi::boot::MAX_REGIONS] = Default::default();
    let mut n = 0usize;
    let mut push = |start: u64, end: u64, kind: u32| -> Result<(), PvhError> {
        if start < end {
            *regions.get_mut(n).ok_or(PvhError::TooLong)? = MemRegion {
                start,
                len: end - start,
                kind,
                info: 0,
            };
            n += 1;
        }
        Ok(())
    };
    let mut sorted = [HvmMemmapEntry::default(); MAX_MEMMAP_ENTRIES];
    let count = memmap.len().min(MAX_MEMMAP_ENTRIES);
    sorted[..count].copy_from_slice(&memmap[..count]);
    let sorted = &mut sorted[..count];
    sorted.sort_unstable_by_key(|e| e.addr);
    for e in sorted.iter() {
        let start = e.addr.min(MAPPED_END);
        let end = e.addr.saturating_add(e.size).min(MAPPED_END);
        if e.kind != MEMMAP_TYPE_RAM {
            push(start, end, region_kind::RESERVED)?;
            continue;
        }
        mem_size = mem_size.max(end);
        // RAM: the part below the kernel, the kernel, the part above.
        push(start, end.min(kernel_start), region_kind::USABLE)?;
        push(
            start.max(kernel_start),
            end.min(kernel_end),
            region_kind::KERNEL,
        )?;
        push(start.max(kernel_end), end, region_kind::USABLE)?;
    }
    *out = BootInfo::new(mode, mem_size);
    out.kernel_start = kernel_start;
    out.kernel_end = kernel_end;
    for r in &regions[..n] {
        out.push_region(*r).map_err(|_| PvhError::TooLong)?;
    }
    // `workload=NAME` names the workload; every other word is an argument.
    let mut args = [0u8; hypercall_abi::boot::ARGS_MAX];
    let mut args_len = 0usize;
    for word in cmdline
        .split(|b| b.is_ascii_whitespace())
        .filter(|w| !w.is_empty())
    {
        if let Some(name) = word.strip_prefix(b"workload=") {
            let name = core::str::from_utf8(name).map_err(|_| PvhError::TooLong)?;
            out.set_workload(name).map_err(|_| PvhError::TooLong)?;
            continue;
        }
        let sep = usize::from(args_len > 0);
        let dst = args
            .get_mut(args_len..args_len + sep + word.len())
            .ok_or(PvhError::TooLong)?;
        if sep == 1 {
            dst[0] = b' ';
        }
        dst[sep..].copy_from_slice(word);
        args_len += sep + word.len();
    }
    out.args = args;
    out.args_len = args_len as u32;
    Ok(())
}

/// The boot-info block [`enter`] fills (identity-mapped kernel BSS, written once).
static mut PVH_BOOT_INFO: core::mem::MaybeUninit<BootInfo> = core::mem::MaybeUninit::zeroed();

/// Called by `pvkit_pvh_start` in long mode (identity map, BSS stack) with the physical
/// address of the [`HvmStartInfo`] and two candidates for the end of the kernel image (the
/// linker's `__kernel_end` of a pvkit linker script and lld's `_end`, each 0 where undefined;
/// the larger is used): builds the boot info and returns it for `_start`. On a bad start info
/// it prints one line on COM1 and halts.
///
/// # Safety
/// Only `pvkit_pvh_start` calls this, once, with the `ebx` a PVH loader passed (identity-mapped
/// and readable, like the memory map and command line it points to).
pub unsafe extern "C" fn enter(start_info: u64, end_a: u64, end_b: u64) -> *const BootInfo {
    // SAFETY: the PVH loader passes a readable start info; it is read once, by value.
    let start = unsafe { core::ptr::read_unaligned(start_info as *const HvmStartInfo) };
    let memmap: &[HvmMemmapEntry] =
        if start.magic == HVM_START_MAGIC && start.version >= 1 && start.memmap_paddr != 0 {
            let n = (start.memmap_entries as usize).min(MAX_MEMMAP_ENTRIES);
            // SAFETY: version >= 1: the loader's memory map of `memmap_entries` entries, readable
            // and 8-byte aligned (the protocol's table), not written while we read it.
            unsafe { core::slice::from_raw_parts(start.memmap_paddr as *const HvmMemmapEntry, n) }
        } else {
            &[]
        };
    let cmdline: &[u8] = if start.magic == HVM_START_MAGIC && start.cmdline_paddr != 0 {
        let p = start.cmdline_paddr as *const u8;
        let mut len = 0;
        // SAFETY: a NUL-terminated string the loader wrote; we stop at its NUL or the cap.
        while len < MAX_CMDLINE && unsafe { p.add(len).read() } != 0 {
            len += 1;
        }
        // SAFETY: the `len` bytes just read.
        unsafe { core::slice::from_raw_parts(p, len) }
    } else {
        &[]
    };
    let mode = if crate::detect().is_some() {
        Mode::Pv
    } else {
        Mode::Trapped
    };
    let kernel_end = end_a.max(end_b);
    let info = &raw mut PVH_BOOT_INFO;
    // SAFETY: `enter` runs once, before anything else reads the block; zeroed is a valid
    // `BootInfo` (every field is plain data).
    let info = unsafe { (*info).assume_init_mut() };
    if let Err(e) = boot_info_from_pvh(
        &start,
        memmap,
        cmdline,
        KERNEL_MIN_GPA,
        kernel_end,
        mode,
        info,
    ) {
        let mut console = crate::Console::uart();
        crate::console::print_line(&mut console, format_args!("error: PVH boot: {e}"));
        crate::halt_forever();
    }
    info
}

/// Adds PVH entry to a kernel that uses [`entry!`](crate::entry): the
/// `XEN_ELFNOTE_PHYS32_ENTRY` note and `pvkit_pvh_start`, which enters long mode by itself and
/// calls `_start` with a boot info translated from the PVH start info (see [`crate::pvh`]).
/// Invoke it once, at the crate root, next to `entry!`.
///
/// A linker script with `PHDRS` must keep `.note.Xen` in a `PT_NOTE` segment (lld's default
/// layout does so by itself).
#[macro_export]
macro_rules! pvh_entry {
    () => {
        core::arch::global_asm!(
            // The note (hypercall_abi::pvh::PvhNote): its descriptor is the entry's address,
            // an absolute relocation only the assembler can emit.
            ".pushsection .note.Xen, \"a\", @note",
            ".balign 4",
            ".long 4, 8, 18",
            ".asciz \"Xen\"",
            ".long pvkit_pvh_start, 0",
            ".popsection",
            ".pushsection .text.pvkit_pvh_start, \"ax\", @progbits",
            ".code32",
            ".global pvkit_pvh_start",
            "pvkit_pvh_start:",
            "cli",
            "cld",
            "mov %ebx, %esi",
            "lgdt pvkit_pvh_gdt_ptr",
            "mov $0x10, %eax",
            "mov %eax, %ds",
            "mov %eax, %es",
            "mov %eax, %ss",
            // PML4[0] -> PDPT; PDPT[0..4] -> 4 PDs; PD entries: 2 MiB pages of 0..4 GiB.
            // Present, writable, user, accessed (dirty and huge for the 2 MiB pages).
            "mov $pvkit_pvh_tables, %edi",
            "lea 0x1000(%edi), %eax",
            "or $0x27, %eax",
            "mov %eax, (%edi)",
            "movl $0, 4(%edi)",
            "add $0x1000, %edi",
            "lea 0x1000(%edi), %eax",
            "or $0x27, %eax",
            "xor %ecx, %ecx",
            "2:",
            "mov %eax, (%edi,%ecx,8)",
            "movl $0, 4(%edi,%ecx,8)",
            "add $0x1000, %eax",
            "inc %ecx",
            "cmp $4, %ecx",
            "jb 2b",
            "add $0x1000, %edi",
            "mov $0xe7, %eax",
            "xor %ecx, %ecx",
            "3:",
            "mov %eax, (%edi,%ecx,8)",
            "mov %ecx, %edx",
            "shr $11, %edx",
            "mov %edx, 4(%edi,%ecx,8)",
            "add $0x200000, %eax",
            "inc %ecx",
            "cmp $2048, %ecx",
            "jb 3b",
            // CR4.PAE, CR3, EFER.LME, then CR0.PG (with PE, MP, ET, NE, WP as pvkit sets it).
            "mov $0x20, %eax",
            "mov %eax, %cr4",
            "mov $pvkit_pvh_tables, %eax",
            "mov %eax, %cr3",
            "mov $0xc0000080, %ecx",
            "xor %edx, %edx",
            "mov $0x100, %eax",
            "wrmsr",
            "mov $0x80010033, %eax",
            "mov %eax, %cr0",
            "ljmp $0x08, $4f",
            ".code64",
            "4:",
            "mov $0x10, %eax",
            "mov %eax, %ds",
            "mov %eax, %es",
            "mov %eax, %ss",
            "mov %eax, %fs",
            "mov %eax, %gs",
            "lea pvkit_pvh_stack_top(%rip), %rsp",
            "mov %esi, %edi",
            // The image's end: whichever of these the linker defines (weak: 0 otherwise).
            ".weak __kernel_end",
            ".weak _end",
            "movabs $__kernel_end, %rsi",
            "movabs $_end, %rdx",
            "call {enter}",
            "mov %rax, %rdi",
            "push $0",
            "jmp {start}",
            ".popsection",
            ".pushsection .rodata.pvkit_pvh_gdt, \"a\", @progbits",
            ".balign 16",
            // null, 64-bit code (0x08), data (0x10): accessed bits preset.
            "pvkit_pvh_gdt:",
            ".quad 0, 0x00af9b000000ffff, 0x00cf93000000ffff",
            "pvkit_pvh_gdt_ptr:",
            ".word 23",
            ".long pvkit_pvh_gdt",
            ".popsection",
            ".pushsection .bss.pvkit_pvh, \"aw\", @nobits",
            ".balign 4096",
            "pvkit_pvh_tables:",
            ".skip 6 * 4096",
            "pvkit_pvh_stack:",
            ".skip 256 * 1024",
            "pvkit_pvh_stack_top:",
            ".popsection",
            enter = sym $crate::pvh::enter,
            start = sym _start,
            options(att_syntax)
        );
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(version: u32) -> HvmStartInfo {
        HvmStartInfo {
            magic: HVM_START_MAGIC,
            version,
            ..Default::default()
        }
    }

    #[test]
    fn qemu_like_memmap_and_cmdline_translate() {
        let map = [
            HvmMemmapEntry {
                addr: 0x10_0000,
                size: 0x7f0_0000,
                kind: 1,
                reserved: 0,
            },
            HvmMemmapEntry {
                addr: 0,
                size: 0x9fc00,
                kind: 1,
                reserved: 0,
            },
            HvmMemmapEntry {
                addr: 0xfeff_c000,
                size: 0x4000,
                kind: 2,
                reserved: 0,
            },
        ];
        let mut info = BootInfo::new(Mode::Pv, 0);
        boot_info_from_pvh(
            &start(1),
            &map,
            b"workload=null  ops=1000 x=y",
            0x20_0000,
            0x23_4567,
            Mode::Trapped,
            &mut info,
        )
        .unwrap();
        assert!(info.is_valid());
        assert_eq!(info.mem_size, 128 << 20);
        assert_eq!(info.workload(), b"null");
        assert_eq!(info.args(), b"ops=1000 x=y");
        assert_eq!(info.mode(), Some(Mode::Trapped));
        let r: std::vec::Vec<_> = info
            .regions()
            .iter()
            .map(|r| (r.start, r.len, r.kind))
            .collect();
        assert_eq!(
            r,
            [
                (0, 0x9fc00, region_kind::USABLE),
                (0x10_0000, 0x10_0000, region_kind::USABLE),
                (0x20_0000, 0x3_5000, region_kind::KERNEL),
                (0x23_5000, (128 << 20) - 0x23_5000, region_kind::USABLE),
                (0xfeff_c000, 0x4000, region_kind::RESERVED),
            ]
        );
        assert_eq!(
            crate::boot::free_ram(&info),
            Some((0x23_5000, (128 << 20) - 0x23_5000))
        );
    }

    #[test]
    fn bad_start_infos_are_refused() {
        let map = [HvmMemmapEntry {
            addr: 0,
            size: 1 << 20,
            kind: 1,
            reserved: 0,
        }];
        let mut info = BootInfo::new(Mode::Pv, 0);
        let mut bad = start(1);
        bad.magic = 1;
        fn r(
            s: &HvmStartInfo,
            m: &[HvmMemmapEntry],
            c: &[u8],
            i: &mut BootInfo,
        ) -> Result<(), PvhError> {
            boot_info_from_pvh(s, m, c, 0x20_0000, 0x20_1000, Mode::Pv, i)
        }
        assert_eq!(r(&bad, &map, b"", &mut info), Err(PvhError::BadMagic(1)));
        assert_eq!(
            r(&start(0), &map, b"", &mut info),
            Err(PvhError::NoMemoryMap)
        );
        assert_eq!(
            r(&start(1), &[], b"", &mut info),
            Err(PvhError::NoMemoryMap)
        );
        let long = [b'a'; 600];
        assert_eq!(r(&start(1), &map, &long, &mut info), Err(PvhError::TooLong));
        assert_eq!(r(&start(1), &map, b"", &mut info), Ok(()));
        assert_eq!(info.workload(), b"");
    }
}
