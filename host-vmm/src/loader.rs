//! Kernel loading: validate the ELF header and program headers ourselves (class, data, machine,
//! type, segment placement), then copy exactly the validated segments into guest memory.
//!
//! Validation runs on the raw bytes, before anything touches guest memory, so a bad file gives
//! a precise message instead of a half-loaded guest. [`load`] copies the segments [`validate`]
//! accepted and nothing else, so every byte it writes lies inside the validated extent
//! ([`ElfInfo::start`]..[`ElfInfo::end`], at or above `KERNEL_MIN_GPA`). Every `PT_LOAD` header
//! is checked, whatever its sizes: one with `p_filesz > p_memsz` (including `p_memsz = 0` with
//! file bytes) is malformed and refused; an empty one (both sizes 0) loads nothing and is
//! ignored.

use hypercall_abi::layout::{KERNEL_MIN_GPA, MAX_MEM_SIZE, MIN_MEM_SIZE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const EM_X86_64: u16 = 62;
const ET_EXEC: u16 = 2;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
/// More program headers than any sane kernel has; bounds the work on hostile input.
const MAX_PHDRS: u16 = 64;
/// Start of the canonical higher half, where higher-half kernels link themselves.
pub const HIGHER_HALF: u64 = 0xffff_8000_0000_0000;

/// Why an image cannot be booted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ElfError {
    /// Shorter than an ELF header.
    #[error("file is too short to be an ELF ({0} bytes)")]
    TooShort(usize),
    /// Wrong magic.
    #[error("not an ELF file (bad magic number)")]
    NotElf,
    /// ELFCLASS32 or garbage.
    #[error("not a 64-bit ELF (class {0}); pvkit boots ELF64 x86-64 kernels")]
    WrongClass(u8),
    /// Big-endian.
    #[error("not a little-endian ELF (data encoding {0})")]
    WrongEndian(u8),
    /// Not x86-64.
    #[error("wrong machine type {0} (expected 62, x86-64)")]
    WrongMachine(u16),
    /// Not ET_EXEC.
    #[error(
        "ELF type {0} is not an executable (expected ET_EXEC = 2); link the kernel as a static, \
         non-PIE executable"
    )]
    WrongType(u16),
    /// Program header table malformed.
    #[error("malformed program header table: {0}")]
    BadProgramHeaders(&'static str),
    /// Nothing to load.
    #[error("no loadable (PT_LOAD) segment")]
    NoLoadableSegments,
    /// A segment's file bytes lie outside the file.
    #[error(
        "segment {index}: file range {offset:#x}+{filesz:#x} lies outside the {file_len}-byte file"
    )]
    SegmentBeyondFile {
        /// Program header index.
        index: usize,
        /// p_offset.
        offset: u64,
        /// p_filesz.
        filesz: u64,
        /// File size.
        file_len: usize,
    },
    /// p_filesz > p_memsz.
    #[error("segment {0}: file size exceeds memory size")]
    FileSizeExceedsMemSize(usize),
    /// A segment below the kernel area (where the VMM's boot structures live).
    #[error(
        "segment {index} at {start:#x} is below {min:#x}, where the VMM keeps its boot structures"
    )]
    SegmentTooLow {
        /// Program header index.
        index: usize,
        /// p_paddr.
        start: u64,
        /// KERNEL_MIN_GPA.
        min: u64,
    },
    /// A segment whose virtual address differs from its physical one.
    #[error(
        "segment {index}: virtual address {vaddr:#x} differs from physical address {paddr:#x}; \
         pvkit loads segments at their physical address (p_paddr) and enters through an \
         identity map, so virtual must equal physical: link with p_vaddr == p_paddr (e.g. no \
         higher-half)"
    )]
    VirtualNotPhysical {
        /// Program header index.
        index: usize,
        /// p_vaddr.
        vaddr: u64,
        /// p_paddr.
        paddr: u64,
    },
    /// A segment or the entry point linked in the higher half.
    #[error(
        "{what} at {addr:#x} is in the higher half (>= 0xffff800000000000): pvkit enters \
         through an identity map of guest RAM and cannot boot higher-half kernels; link the \
         kernel at a physical address >= 2 MiB ({KERNEL_MIN_GPA:#x}) with virtual == physical"
    )]
    HigherHalf {
        /// "segment N" or "entry point".
        what: String,
        /// The higher-half address.
        addr: u64,
    },
    /// A segment that ends beyond the largest guest RAM pvkit can give.
    #[error(
        "segment {index} ({start:#x}..{end:#x}) is linked beyond the RAM pvkit can give a guest \
         (at most {max_mib} MiB, ending at {MAX_MEM_SIZE:#x} below the page-table pool), so no \
         --mem makes it fit; link it lower, inside {KERNEL_MIN_GPA:#x}..{MAX_MEM_SIZE:#x}"
    )]
    BeyondMaxRam {
        /// Program header index.
        index: usize,
        /// First byte.
        start: u64,
        /// One past the last byte (saturated).
        end: u64,
        /// The largest guest RAM in MiB.
        max_mib: u64,
    },
    /// A segment that does not fit in this guest's RAM, but would with a larger `--mem`.
    #[error(
        "segment {index} ({start:#x}..{end:#x}) does not fit in {mem_mib} MiB of guest memory; \
         increase --mem to at least {need_mib} MiB"
    )]
    SegmentDoesNotFit {
        /// Program header index.
        index: usize,
        /// First byte.
        start: u64,
        /// One past the last byte.
        end: u64,
        /// Guest RAM in MiB.
        mem_mib: u64,
        /// The smallest `--mem` (MiB) that holds the segment.
        need_mib: u64,
    },
    /// Entry point not inside any loaded segment.
    #[error("entry point {0:#x} is not inside any loadable segment")]
    BadEntry(u64),
    /// Copying a validated segment into guest memory failed.
    #[error("loading failed: {0}")]
    Load(String),
}

/// What validation learned about an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ElfInfo {
    /// Entry point (guest-physical = virtual).
    pub entry: u64,
    /// Lowest loaded address.
    pub start: u64,
    /// One past the highest loaded address (including BSS).
    pub end: u64,
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// One accepted `PT_LOAD` segment: `filesz` bytes at file `offset` go to `paddr`.
#[derive(Debug, Clone, Copy)]
struct Segment {
    offset: usize,
    paddr: u64,
    filesz: usize,
}

/// Validates `image` as a bootable ELF64 x86-64 executable for `mem_size` bytes of RAM.
pub fn validate(image: &[u8], mem_size: u64) -> Result<ElfInfo, ElfError> {
    parse(image, mem_size).map(|(info, _)| info)
}

/// [`validate`], also returning the segments [`load`] copies.
fn parse(image: &[u8], mem_size: u64) -> Result<(ElfInfo, Vec<Segment>), ElfError> {
    if image.len() < EHDR_SIZE {
        return Err(ElfError::TooShort(image.len()));
    }
    if &image[..4] != b"\x7fELF" {
        return Err(ElfError::NotElf);
    }
    if image[4] != ELFCLASS64 {
        return Err(ElfError::WrongClass(image[4]));
    }
    if image[5] != ELFDATA2LSB {
        return Err(ElfError::WrongEndian(image[5]));
    }
    let e_type = u16_at(image, 16);
    let machine = u16_at(image, 18);
    if machine != EM_X86_64 {
        return Err(ElfError::WrongMachine(machine));
    }
    if e_type != ET_EXEC {
        return Err(ElfError::WrongType(e_type));
    }
    let entry = u64_at(image, 24);
    let phoff = u64_at(image, 32);
    let phentsize = u16_at(image, 54);
    let phnum = u16_at(image, 56);
    if usize::from(phentsize) != PHDR_SIZE {
        return Err(ElfError::BadProgramHeaders("entry size is not 56"));
    }
    if phnum == 0 || phnum > MAX_PHDRS {
        return Err(ElfError::BadProgramHeaders("bad number of entries"));
    }
    let table_end = phoff
        .checked_add(u64::from(phnum) * PHDR_SIZE as u64)
        .ok_or(ElfError::BadProgramHeaders("offset overflows"))?;
    if phoff < EHDR_SIZE as u64 || table_end > image.len() as u64 {
        return Err(ElfError::BadProgramHeaders("table lies outside the file"));
    }

    let mut start = u64::MAX;
    let mut end = 0u64;
    let mut entry_ok = false;
    let mut segments = Vec::new();
    for index in 0..usize::from(phnum) {
        let ph = &image[phoff as usize + index * PHDR_SIZE..][..PHDR_SIZE];
        if u32_at(ph, 0) != PT_LOAD {
            continue;
        }
        let offset = u64_at(ph, 8);
        let vaddr = u64_at(ph, 16);
        let paddr = u64_at(ph, 24);
        let filesz = u64_at(ph, 32);
        let memsz = u64_at(ph, 40);
        if memsz == 0 && filesz == 0 {
            // Occupies nothing and loads nothing.
            continue;
        }
        let file_end = offset.checked_add(filesz);
        if file_end.is_none_or(|e| e > image.len() as u64) {
            return Err(ElfError::SegmentBeyondFile {
                index,
                offset,
                filesz,
                file_len: image.len(),
            });
        }
        if filesz > memsz {
            return Err(ElfError::FileSizeExceedsMemSize(index));
        }
        // Higher-half first: such a kernel usually also has p_vaddr != p_paddr, and
        // "higher half" is the more useful message.
        if let Some(addr) = [vaddr, paddr].into_iter().find(|&a| a >= HIGHER_HALF) {
            return Err(ElfError::HigherHalf {
                what: format!("segment {index}"),
                addr,
            });
        }
        if vaddr != paddr {
            return Err(ElfError::VirtualNotPhysical {
                index,
                vaddr,
                paddr,
            });
        }
        if paddr < KERNEL_MIN_GPA {
            return Err(ElfError::SegmentTooLow {
                index,
                start: paddr,
                min: KERNEL_MIN_GPA,
            });
        }
        let seg_end = paddr.saturating_add(memsz);
        if seg_end > MAX_MEM_SIZE {
            return Err(ElfError::BeyondMaxRam {
                index,
                start: paddr,
                end: seg_end,
                max_mib: MAX_MEM_SIZE >> 20,
            });
        }
        if seg_end > mem_size {
            // A bigger --mem holds it. MAX_MEM_SIZE is a whole number of MiB, so rounding the
            // end up to a MiB stays within the limit.
            return Err(ElfError::SegmentDoesNotFit {
                index,
                start: paddr,
                end: seg_end,
                mem_mib: mem_size >> 20,
                need_mib: seg_end.div_ceil(1 << 20).max(MIN_MEM_SIZE >> 20),
            });
        }
        entry_ok |= (paddr..seg_end).contains(&entry);
        start = start.min(paddr);
        end = end.max(seg_end);
        // Both fit in usize: the file range lies inside `image`.
        segments.push(Segment {
            offset: offset as usize,
            paddr,
            filesz: filesz as usize,
        });
    }
    if end == 0 {
        return Err(ElfError::NoLoadableSegments);
    }
    if entry >= HIGHER_HALF {
        return Err(ElfError::HigherHalf {
            what: "entry point".into(),
            addr: entry,
        });
    }
    if !entry_ok {
        return Err(ElfError::BadEntry(entry));
    }
    Ok((ElfInfo { entry, start, end }, segments))
}

/// Validates and loads `image` into guest RAM `ram`. Returns where it landed.
///
/// Copies the file bytes of exactly the segments [`validate`] accepted, each to its `p_paddr`;
/// nothing is written outside [`ElfInfo::start`]..[`ElfInfo::end`]. The rest of each segment
/// (its BSS) is left as it is: guest RAM starts zeroed.
pub fn load<M: GuestMemoryBackend>(ram: &M, image: &[u8]) -> Result<ElfInfo, ElfError> {
    let (info, segments) = parse(image, ram.last_addr().0 + 1)?;
    for s in segments {
        ram.write_slice(&image[s.offset..s.offset + s.filesz], GuestAddress(s.paddr))
            .map_err(|e| ElfError::Load(e.to_string()))?;
    }
    Ok(info)
}

/// Builds a minimal valid ELF64 x86-64 executable: one PT_LOAD segment holding `code` at
/// `paddr` (file offset 0x1000), `memsz` bytes in memory, entry at `paddr`, and a PT_NOTE
/// segment with the pvkit ABI note of this ABI version requiring nothing (so `host-vmm` shows it
/// pvkit in PV mode). For tests and tools that need a purpose-built guest (or a deliberately
/// broken one, by patching bytes).
pub fn minimal_elf(paddr: u64, code: &[u8], memsz: u64) -> Vec<u8> {
    let note = hypercall_abi::note::AbiNote::new(0);
    minimal_elf_with_note(
        paddr,
        code,
        memsz,
        Some(zerocopy::IntoBytes::as_bytes(&note)),
    )
}

/// [`minimal_elf`] with the given note bytes in its PT_NOTE segment (at file offset 0x200, at
/// most 0xe00 bytes), or without a PT_NOTE segment for `None` (a kernel that does not say which
/// ABI it speaks: `host-vmm` boots it as an unmodified guest).
pub fn minimal_elf_with_note(paddr: u64, code: &[u8], memsz: u64, note: Option<&[u8]>) -> Vec<u8> {
    const NOTE_OFFSET: usize = 0x200;
    let mut f = vec![0u8; 0x1000];
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = ELFCLASS64;
    f[5] = ELFDATA2LSB;
    f[6] = 1;
    f[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
    f[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..32].copy_from_slice(&paddr.to_le_bytes());
    f[32..40].copy_from_slice(&64u64.to_le_bytes());
    f[52..54].copy_from_slice(&64u16.to_le_bytes());
    f[54..56].copy_from_slice(&56u16.to_le_bytes());
    let phnum: u16 = if note.is_some() { 2 } else { 1 };
    f[56..58].copy_from_slice(&phnum.to_le_bytes());
    let ph = &mut f[64..120];
    ph[0..4].copy_from_slice(&PT_LOAD.to_le_bytes());
    ph[4..8].copy_from_slice(&5u32.to_le_bytes());
    ph[8..16].copy_from_slice(&0x1000u64.to_le_bytes());
    ph[16..24].copy_from_slice(&paddr.to_le_bytes());
    ph[24..32].copy_from_slice(&paddr.to_le_bytes());
    ph[32..40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    ph[40..48].copy_from_slice(&memsz.to_le_bytes());
    if let Some(note) = note {
        let note = &note[..note.len().min(0x1000 - NOTE_OFFSET)];
        f[NOTE_OFFSET..NOTE_OFFSET + note.len()].copy_from_slice(note);
        let ph = &mut f[120..176];
        ph[0..4].copy_from_slice(&PT_NOTE.to_le_bytes());
        ph[4..8].copy_from_slice(&4u32.to_le_bytes());
        ph[8..16].copy_from_slice(&(NOTE_OFFSET as u64).to_le_bytes());
        ph[32..40].copy_from_slice(&(note.len() as u64).to_le_bytes());
        ph[40..48].copy_from_slice(&(note.len() as u64).to_le_bytes());
        ph[48..56].copy_from_slice(&4u64.to_le_bytes());
    }
    f.extend_from_slice(code);
    f
}

/// One program header, as `host-vmm inspect` lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgramHeader {
    /// `p_type`.
    pub kind: u32,
    /// `p_flags` (bit 0 X, 1 W, 2 R).
    pub flags: u32,
    /// `p_offset`.
    pub offset: u64,
    /// `p_vaddr`.
    pub vaddr: u64,
    /// `p_paddr`.
    pub paddr: u64,
    /// `p_filesz`.
    pub filesz: u64,
    /// `p_memsz`.
    pub memsz: u64,
}

impl ProgramHeader {
    /// `LOAD`, `NOTE`, … or the number.
    pub fn kind_name(&self) -> String {
        match self.kind {
            0 => "NULL".into(),
            PT_LOAD => "LOAD".into(),
            2 => "DYNAMIC".into(),
            3 => "INTERP".into(),
            PT_NOTE => "NOTE".into(),
            6 => "PHDR".into(),
            7 => "TLS".into(),
            0x6474_e550 => "GNU_EH_FRAME".into(),
            0x6474_e551 => "GNU_STACK".into(),
            0x6474_e552 => "GNU_RELRO".into(),
            k => format!("{k:#x}"),
        }
    }

    /// `RWX` flags, `-` for a clear bit.
    pub fn flags_str(&self) -> String {
        let f = |bit: u32, c: char| if self.flags & bit != 0 { c } else { '-' };
        [f(4, 'R'), f(2, 'W'), f(1, 'X')].iter().collect()
    }
}

/// The program headers of an ELF64 little-endian image (at most 64), or an empty list if the
/// header table cannot be read. For display; [`validate`] is what decides.
pub fn program_headers(image: &[u8]) -> Vec<ProgramHeader> {
    if image.len() < EHDR_SIZE || &image[..4] != b"\x7fELF" || image[4] != ELFCLASS64 {
        return Vec::new();
    }
    let phoff = u64_at(image, 32);
    let (entsize, phnum) = (u16_at(image, 54), u16_at(image, 56));
    if usize::from(entsize) != PHDR_SIZE {
        return Vec::new();
    }
    (0..usize::from(phnum.min(MAX_PHDRS)))
        .map_while(|i| {
            let at = usize::try_from(phoff).ok()?.checked_add(i * PHDR_SIZE)?;
            let ph = image.get(at..at.checked_add(PHDR_SIZE)?)?;
            Some(ProgramHeader {
                kind: u32_at(ph, 0),
                flags: u32_at(ph, 4),
                offset: u64_at(ph, 8),
                vaddr: u64_at(ph, 16),
                paddr: u64_at(ph, 24),
                filesz: u64_at(ph, 32),
                memsz: u64_at(ph, 40),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_elf(paddr: u64, code: &[u8], memsz: u64) -> Vec<u8> {
        minimal_elf(paddr, code, memsz)
    }

    const MEM: u64 = 16 << 20;

    #[test]
    fn accepts_a_minimal_executable_and_loads_it() {
        let img = tiny_elf(0x20_0000, &[0xf4, 0x90], 0x2000);
        let info = validate(&img, MEM).unwrap();
        assert_eq!(
            info,
            ElfInfo {
                entry: 0x20_0000,
                start: 0x20_0000,
                end: 0x20_2000
            }
        );
        let ram = crate::memory::GuestRam::new(MEM).unwrap();
        load(ram.mem(), &img).unwrap();
        let mut b = [0u8; 2];
        vm_memory::Bytes::read_slice(ram.mem(), &mut b, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(b, [0xf4, 0x90]);
    }

    fn patched(f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut img = tiny_elf(0x20_0000, &[0xf4], 0x1000);
        f(&mut img);
        img
    }

    #[test]
    fn rejects_each_bad_header_field() {
        let cases: Vec<(Vec<u8>, ElfError)> = vec![
            (b"\x7fELF".to_vec(), ElfError::TooShort(4)),
            (patched(|i| i[0] = b'M'), ElfError::NotElf),
            (patched(|i| i[4] = 1), ElfError::WrongClass(1)),
            (patched(|i| i[5] = 2), ElfError::WrongEndian(2)),
            (patched(|i| i[18] = 3), ElfError::WrongMachine(3)),
            (patched(|i| i[16] = 3), ElfError::WrongType(3)),
            (
                patched(|i| i[54] = 32),
                ElfError::BadProgramHeaders("entry size is not 56"),
            ),
            (
                patched(|i| i[56] = 0),
                ElfError::BadProgramHeaders("bad number of entries"),
            ),
            (
                patched(|i| {
                    i[32] = 0xff;
                    i[33] = 0xff;
                }),
                ElfError::BadProgramHeaders("table lies outside the file"),
            ),
            (patched(|i| i[64] = 2), ElfError::NoLoadableSegments),
            (patched(|i| i[26] = 0x30), ElfError::BadEntry(0x30_0000)),
        ];
        for (img, want) in cases {
            assert_eq!(validate(&img, MEM).unwrap_err(), want);
        }
    }

    #[test]
    fn rejects_bad_segments() {
        let low = tiny_elf(0x1000, &[0xf4], 0x1000);
        assert!(matches!(
            validate(&low, MEM),
            Err(ElfError::SegmentTooLow { .. })
        ));
        let big = tiny_elf(0x20_0000, &[0xf4], MEM);
        let e = validate(&big, MEM).unwrap_err();
        assert!(matches!(e, ElfError::SegmentDoesNotFit { .. }));
        assert!(e.to_string().contains("increase --mem"));
        let wrap = tiny_elf(0x20_0000, &[0xf4], u64::MAX);
        assert!(matches!(
            validate(&wrap, MEM),
            Err(ElfError::BeyondMaxRam { .. })
        ));
        let fat = patched(|i| i[64 + 32] = 0xff);
        assert!(matches!(
            validate(&fat, MEM),
            Err(ElfError::SegmentBeyondFile { .. })
        ));
        let mut over = tiny_elf(0x20_0000, &[0xf4; 16], 0x1000);
        over[64 + 40..64 + 48].copy_from_slice(&8u64.to_le_bytes());
        assert_eq!(
            validate(&over, MEM),
            Err(ElfError::FileSizeExceedsMemSize(0))
        );
    }

    /// Overwrites program header `index` (a PT_LOAD) of `img` with the given fields.
    fn set_load(img: &mut [u8], index: usize, offset: u64, paddr: u64, filesz: u64, memsz: u64) {
        let ph = &mut img[64 + index * PHDR_SIZE..][..PHDR_SIZE];
        ph[0..4].copy_from_slice(&PT_LOAD.to_le_bytes());
        ph[4..8].copy_from_slice(&6u32.to_le_bytes());
        ph[8..16].copy_from_slice(&offset.to_le_bytes());
        ph[16..24].copy_from_slice(&paddr.to_le_bytes());
        ph[24..32].copy_from_slice(&paddr.to_le_bytes());
        ph[32..40].copy_from_slice(&filesz.to_le_bytes());
        ph[40..48].copy_from_slice(&memsz.to_le_bytes());
    }

    /// Issue 13, finding 3: a PT_LOAD with `p_memsz = 0` but file bytes used to skip
    /// validation while linux-loader still copied its bytes — below the 2 MiB floor, or past
    /// the recorded kernel end (and a debug build failed an assertion).
    #[test]
    fn segments_with_memsz_zero_are_validated_too() {
        // The PT_NOTE header (index 1) turned into such a segment.
        for paddr in [0x1000, 0x40_0000, 0x20_0000] {
            let mut img = tiny_elf(0x20_0000, &[0xf4], 0x1000);
            set_load(&mut img, 1, 0x1000, paddr, 1, 0);
            assert_eq!(
                validate(&img, MEM),
                Err(ElfError::FileSizeExceedsMemSize(1)),
                "{paddr:#x}"
            );
            let ram = crate::memory::GuestRam::new(MEM).unwrap();
            assert_eq!(
                load(ram.mem(), &img),
                Err(ElfError::FileSizeExceedsMemSize(1))
            );
            let mut b = [0u8; 1];
            vm_memory::Bytes::read_slice(ram.mem(), &mut b, GuestAddress(paddr)).unwrap();
            assert_eq!(b, [0], "nothing loaded at {paddr:#x}");
        }
        // Segment 0 itself with memsz 0.
        let mut img = tiny_elf(0x20_0000, &[0xf4], 0x1000);
        img[64 + 40..64 + 48].copy_from_slice(&0u64.to_le_bytes());
        assert_eq!(
            validate(&img, MEM),
            Err(ElfError::FileSizeExceedsMemSize(0))
        );
    }

    /// An empty PT_LOAD (both sizes 0) occupies and loads nothing, wherever it claims to be.
    #[test]
    fn empty_segments_load_nothing() {
        let mut img = tiny_elf(0x20_0000, &[0xf4], 0x1000);
        set_load(&mut img, 1, 0, 0x1000, 0, 0);
        let info = validate(&img, MEM).unwrap();
        assert_eq!((info.start, info.end), (0x20_0000, 0x20_1000));
        let ram = crate::memory::GuestRam::new(MEM).unwrap();
        assert_eq!(load(ram.mem(), &img), Ok(info));
        let mut low = vec![0u8; 0x20_0000];
        vm_memory::Bytes::read_slice(ram.mem(), &mut low, GuestAddress(0)).unwrap();
        assert!(low.iter().all(|&b| b == 0));
    }

    /// What `load` writes is exactly the validated segments' file bytes.
    #[test]
    fn load_writes_only_the_validated_segments() {
        let mut img = tiny_elf(0x20_0000, &[0xf4, 0x90, 0x90], 0x1000);
        // A second segment: 2 file bytes (the code's last two) at 0x30_0000, 0x2000 in memory.
        set_load(&mut img, 1, 0x1001, 0x30_0000, 2, 0x2000);
        let info = validate(&img, MEM).unwrap();
        assert_eq!((info.start, info.end), (0x20_0000, 0x30_2000));
        let ram = crate::memory::GuestRam::new(MEM).unwrap();
        load(ram.mem(), &img).unwrap();
        let mut all = vec![0u8; MEM as usize];
        vm_memory::Bytes::read_slice(ram.mem(), &mut all, GuestAddress(0)).unwrap();
        let nonzero: Vec<usize> = (0..all.len()).filter(|&i| all[i] != 0).collect();
        assert_eq!(
            nonzero,
            [0x20_0000, 0x20_0001, 0x20_0002, 0x30_0000, 0x30_0001]
        );
    }

    /// Sets segment 0's p_vaddr.
    fn with_vaddr(mut img: Vec<u8>, vaddr: u64) -> Vec<u8> {
        img[64 + 16..64 + 24].copy_from_slice(&vaddr.to_le_bytes());
        img
    }

    #[test]
    fn virtual_must_equal_physical() {
        let img = with_vaddr(tiny_elf(0x20_0000, &[0xf4], 0x1000), 0x40_0000);
        let e = validate(&img, MEM).unwrap_err();
        assert_eq!(
            e,
            ElfError::VirtualNotPhysical {
                index: 0,
                vaddr: 0x40_0000,
                paddr: 0x20_0000
            }
        );
        let msg = e.to_string();
        assert!(msg.contains("virtual must equal physical"), "{msg}");
        assert!(msg.contains("p_vaddr == p_paddr"), "{msg}");
        assert!(!msg.contains("--mem"), "{msg}");
    }

    #[test]
    fn higher_half_kernels_are_named_as_such() {
        // The usual higher-half link: loaded low, running at -2 GiB.
        let img = with_vaddr(tiny_elf(0x20_0000, &[0xf4], 0x1000), 0xffff_ffff_8020_0000);
        let e = validate(&img, MEM).unwrap_err();
        assert_eq!(
            e,
            ElfError::HigherHalf {
                what: "segment 0".into(),
                addr: 0xffff_ffff_8020_0000
            }
        );
        let msg = e.to_string();
        assert!(msg.contains("higher half"), "{msg}");
        assert!(msg.contains(">= 2 MiB"), "{msg}");
        assert!(!msg.contains("--mem"), "{msg}");
        // Physical address in the higher half too (virtual == physical).
        let both = tiny_elf(0xffff_8000_0020_0000, &[0xf4], 0x1000);
        assert!(matches!(
            validate(&both, MEM),
            Err(ElfError::HigherHalf {
                addr: 0xffff_8000_0020_0000,
                ..
            })
        ));
        // Only the entry point up there.
        let mut entry = tiny_elf(0x20_0000, &[0xf4], 0x1000);
        entry[24..32].copy_from_slice(&0xffff_ffff_8020_0000u64.to_le_bytes());
        assert_eq!(
            validate(&entry, MEM).unwrap_err(),
            ElfError::HigherHalf {
                what: "entry point".into(),
                addr: 0xffff_ffff_8020_0000
            }
        );
    }

    #[test]
    fn mem_is_suggested_only_when_a_bigger_mem_would_fit() {
        // Ends at 34 MiB: --mem 34M would hold it.
        let big = tiny_elf(0x20_0000, &[0xf4], 32 << 20);
        let e = validate(&big, MEM).unwrap_err();
        assert_eq!(
            e,
            ElfError::SegmentDoesNotFit {
                index: 0,
                start: 0x20_0000,
                end: 0x220_0000,
                mem_mib: 16,
                need_mib: 34
            }
        );
        assert!(e.to_string().contains("increase --mem to at least 34 MiB"));
        assert!(validate(&big, 34 << 20).is_ok());
        // Linked at 3 GiB (in the page-table pool / MMIO window): no --mem can hold it.
        let high = tiny_elf(0xC000_0000, &[0xf4], 0x1000);
        let e = validate(&high, MAX_MEM_SIZE).unwrap_err();
        assert_eq!(
            e,
            ElfError::BeyondMaxRam {
                index: 0,
                start: 0xC000_0000,
                end: 0xC000_1000,
                max_mib: 3068
            }
        );
        let msg = e.to_string();
        assert!(msg.contains("beyond the RAM pvkit can give"), "{msg}");
        assert!(msg.contains("link it lower"), "{msg}");
        assert!(!msg.contains("increase --mem"), "{msg}");
        // Ending exactly at the largest RAM fits with the largest --mem.
        let edge = tiny_elf(MAX_MEM_SIZE - 0x1000, &[0xf4], 0x1000);
        assert!(validate(&edge, MAX_MEM_SIZE).is_ok());
        let e = validate(&edge, MEM).unwrap_err();
        assert!(matches!(
            e,
            ElfError::SegmentDoesNotFit { need_mib: 3068, .. }
        ));
        // One page further does not.
        let over = tiny_elf(MAX_MEM_SIZE, &[0xf4], 0x1000);
        assert!(matches!(
            validate(&over, MAX_MEM_SIZE),
            Err(ElfError::BeyondMaxRam { .. })
        ));
    }
}

/// Fuzzing of the loader on hostile images: valid ELFs ([`minimal_elf`] and the embedded demo
/// kernel) with random byte flips and field overwrites in the ELF header and program headers.
/// Cases: `PROPTEST_CASES` (proptest's default without it); the long run is
/// `PROPTEST_CASES=1000000 cargo test --release -p host-vmm --lib fuzz`.
#[cfg(test)]
mod fuzz {
    use std::cell::{Cell, RefCell};
    use std::collections::HashMap;

    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestCaseError, TestRunner};
    use vm_memory::GuestMemoryMmap;

    use super::*;

    #[derive(Debug, Clone)]
    enum Mutation {
        /// XOR a byte of the headers (ELF header and the first program headers), or anywhere.
        Flip { at: usize, xor: u8 },
        /// Overwrite 8-byte field `field` (0..7: type+flags, offset, vaddr, paddr, filesz,
        /// memsz, align) of program header `ph`.
        Field { ph: usize, field: usize, value: u64 },
        /// Set both vaddr and paddr of program header `ph` (keeps them equal).
        Addr { ph: usize, value: u64 },
        /// Make program header `ph` a PT_LOAD (or another type).
        Kind { ph: usize, kind: u32 },
        /// Overwrite an ELF header field: entry, phoff, phentsize, phnum, shoff, shentsize,
        /// shnum.
        Header { field: usize, value: u64 },
        /// XOR a byte of the first PT_NOTE segment's contents (the pvkit ABI note).
        NoteFlip { at: usize, xor: u8 },
        /// Cut the file.
        Truncate(usize),
    }

    fn interesting() -> impl Strategy<Value = u64> {
        prop_oneof![
            3 => prop::sample::select(vec![
                0,
                1,
                0xfff,
                0x1000,
                0x1001,
                KERNEL_MIN_GPA - 1,
                KERNEL_MIN_GPA,
                KERNEL_MIN_GPA + 0x1000,
                4 << 20,
                (4 << 20) - 1,
                (4 << 20) + 1,
                16 << 20,
                MAX_MEM_SIZE,
                HIGHER_HALF,
                u64::MAX,
                u64::MAX - 0xfff,
                i64::MAX as u64,
            ]),
            2 => 0u64..0x40_0000,
            1 => any::<u64>(),
        ]
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        prop_oneof![
            4 => (prop_oneof![4 => 0usize..(64 + 4 * 56), 1 => any::<usize>()], 1u8..=255)
                .prop_map(|(at, xor)| Mutation::Flip { at, xor }),
            4 => (0usize..4, 1usize..7, interesting())
                .prop_map(|(ph, field, value)| Mutation::Field { ph, field, value }),
            2 => (0usize..4, interesting()).prop_map(|(ph, value)| Mutation::Addr { ph, value }),
            1 => (0usize..4, prop::sample::select(vec![PT_LOAD, PT_NOTE, 0, 6, 7, u32::MAX]))
                .prop_map(|(ph, kind)| Mutation::Kind { ph, kind }),
            2 => (0usize..7, interesting()).prop_map(|(field, value)| Mutation::Header { field, value }),
            1 => (0usize..48, 1u8..=255).prop_map(|(at, xor)| Mutation::NoteFlip { at, xor }),
            1 => any::<usize>().prop_map(Mutation::Truncate),
        ]
    }

    fn put(img: &mut [u8], at: usize, bytes: &[u8]) {
        if let Some(dst) = at
            .checked_add(bytes.len())
            .and_then(|end| img.get_mut(at..end))
        {
            dst.copy_from_slice(bytes);
        }
    }

    fn apply(img: &mut Vec<u8>, m: &Mutation) {
        // The program header table as the image says (before this mutation).
        let phoff = if img.len() >= EHDR_SIZE {
            usize::try_from(u64_at(img, 32)).unwrap_or(usize::MAX)
        } else {
            EHDR_SIZE
        };
        let ph_at = |ph: usize| phoff.saturating_add(ph * PHDR_SIZE);
        match *m {
            Mutation::Flip { at, xor } => {
                if !img.is_empty() {
                    let at = at % img.len();
                    img[at] ^= xor;
                }
            }
            Mutation::Field { ph, field, value } => put(
                img,
                ph_at(ph).saturating_add(field * 8),
                &value.to_le_bytes(),
            ),
            Mutation::Addr { ph, value } => {
                put(img, ph_at(ph).saturating_add(16), &value.to_le_bytes());
                put(img, ph_at(ph).saturating_add(24), &value.to_le_bytes());
            }
            Mutation::Kind { ph, kind } => put(img, ph_at(ph), &kind.to_le_bytes()),
            Mutation::Header { field, value } => match field {
                0 => put(img, 24, &value.to_le_bytes()),
                1 => put(img, 32, &value.to_le_bytes()),
                2 => put(img, 54, &(value as u16).to_le_bytes()),
                3 => put(img, 56, &((value % 8) as u16).to_le_bytes()),
                4 => put(img, 40, &value.to_le_bytes()),
                5 => put(img, 58, &(value as u16).to_le_bytes()),
                _ => put(img, 60, &(value as u16).to_le_bytes()),
            },
            Mutation::NoteFlip { at, xor } => {
                let note = program_headers(img)
                    .into_iter()
                    .find(|ph| ph.kind == PT_NOTE);
                if let Some(at) =
                    note.and_then(|ph| usize::try_from(ph.offset).ok()?.checked_add(at))
                    && let Some(b) = img.get_mut(at)
                {
                    *b ^= xor;
                }
            }
            Mutation::Truncate(n) => {
                let n = n % (img.len() + 1);
                img.truncate(n);
            }
        }
    }

    /// The images mutations start from, each with a RAM size it fits in.
    fn bases() -> Vec<(Vec<u8>, u64)> {
        let code: Vec<u8> = (0..64u8).collect();
        let demo = crate::kernel::DEMO_KERNEL;
        let demo_end = validate(demo, MAX_MEM_SIZE).expect("demo kernel").end;
        vec![
            (minimal_elf(KERNEL_MIN_GPA, &code, 0x1000), 4 << 20),
            (minimal_elf(KERNEL_MIN_GPA + 0x3000, &code, 0x8000), 4 << 20),
            (
                minimal_elf_with_note(KERNEL_MIN_GPA, &code, 0x2000, None),
                4 << 20,
            ),
            (
                demo.to_vec(),
                demo_end.next_multiple_of(1 << 20) + (1 << 20),
            ),
        ]
    }

    /// The first non-zero byte of `ram` in `[from, to)`.
    fn first_nonzero(ram: &GuestMemoryMmap, from: u64, to: u64) -> Option<u64> {
        let mut buf = vec![0u8; 64 << 10];
        let zero = vec![0u8; 64 << 10];
        let mut at = from;
        while at < to {
            let n = (to - at).min(buf.len() as u64) as usize;
            ram.read_slice(&mut buf[..n], GuestAddress(at)).unwrap();
            // Fast path: slice equality of bytes is a `memcmp`.
            if buf[..n] == zero[..n] {
                at += n as u64;
                continue;
            }
            if let Some(i) = buf[..n].iter().position(|&b| b != 0) {
                return Some(at + i as u64);
            }
            at += n as u64;
        }
        None
    }

    #[test]
    fn fuzz_mutated_elfs_load_only_inside_the_validated_extent() {
        let bases = bases();
        // One RAM per size, reused: after each case the extent a load wrote is zeroed again.
        let rams: RefCell<HashMap<u64, GuestMemoryMmap>> = RefCell::default();
        let accepted = Cell::new(0u64);
        let mut runner = TestRunner::new(Config {
            failure_persistence: None,
            ..Config::default()
        });
        let cases = runner.config().cases;
        let strategy = (
            0..bases.len(),
            prop::collection::vec(mutation(), 1..8),
            prop::sample::select(vec![0u64, 1 << 20]),
        );
        runner
            .run(&strategy, |(base, mutations, extra_mem)| {
                let (ref image, mem) = bases[base];
                let mem = mem + extra_mem;
                let mut img = image.clone();
                for m in &mutations {
                    apply(&mut img, m);
                }
                // Parsers that see the same bytes must not panic either.
                let _ = crate::kernel_abi::KernelAbi::read(&img);
                let _ = program_headers(&img);
                let verdict = validate(&img, mem);
                let mut rams = rams.borrow_mut();
                let ram = rams.entry(mem).or_insert_with(|| {
                    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mem as usize)]).unwrap()
                });
                let loaded = load(ram, &img);
                prop_assert_eq!(&loaded, &verdict, "load and validate disagree");
                let (from, to) = match verdict {
                    Ok(info) => {
                        accepted.set(accepted.get() + 1);
                        prop_assert!(info.start >= KERNEL_MIN_GPA, "{info:?}");
                        prop_assert!(info.start < info.end && info.end <= mem, "{info:?}");
                        prop_assert!((info.start..info.end).contains(&info.entry), "{info:?}");
                        (info.start, info.end)
                    }
                    Err(_) => (0, 0),
                };
                let stray = first_nonzero(ram, 0, from).or_else(|| first_nonzero(ram, to, mem));
                if from < to {
                    let zero = vec![0u8; (to - from) as usize];
                    ram.write_slice(&zero, GuestAddress(from)).unwrap();
                }
                match stray {
                    Some(at) => Err(TestCaseError::fail(format!(
                        "byte written at {at:#x}, outside the validated extent {from:#x}..{to:#x}"
                    ))),
                    None => Ok(()),
                }
            })
            .unwrap();
        eprintln!(
            "loader fuzz: {cases} cases, {} accepted images",
            accepted.get()
        );
    }
}
