//! gdbstub's x86-64 architecture with FS and GS bases: `gdbstub_arch`'s [`X86_64_SSE`]
//! registers (general, RFLAGS, RIP, selectors, x87, SSE) followed by what gdb's own amd64
//! description puts after them in a `g` packet: `orig_rax` (not a register here: sent as
//! unavailable), `fs_base` and `gs_base`. The target description is `X86_64_SSE`'s (it names no
//! registers, so gdb uses its built-in amd64 layout, which has these three).

use gdbstub::arch::{Arch, Registers};
use gdbstub_arch::x86::X86_64_SSE;
use gdbstub_arch::x86::reg::X86_64CoreRegs;
use gdbstub_arch::x86::reg::id::X86_64CoreRegId;

/// Bytes of [`X86_64CoreRegs`] in a `g` packet.
const CORE_LEN: usize = 0x218;

/// [`X86_64_SSE`] plus `fs_base` and `gs_base`.
#[derive(Debug)]
pub enum X86_64Pvkit {}

impl Arch for X86_64Pvkit {
    type Usize = u64;
    type Registers = Regs;
    type RegId = X86_64CoreRegId;
    type BreakpointKind = usize;

    fn target_description_xml() -> Option<&'static str> {
        X86_64_SSE::target_description_xml()
    }
}

/// The registers gdb reads and writes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Regs {
    pub core: X86_64CoreRegs,
    pub fs_base: u64,
    pub gs_base: u64,
}

impl Registers for Regs {
    type ProgramCounter = u64;

    fn pc(&self) -> u64 {
        self.core.rip
    }

    fn gdb_serialize(&self, mut write_byte: impl FnMut(Option<u8>)) {
        self.core.gdb_serialize(&mut write_byte);
        // orig_rax: unavailable.
        (0..8).for_each(|_| write_byte(None));
        for b in self
            .fs_base
            .to_le_bytes()
            .into_iter()
            .chain(self.gs_base.to_le_bytes())
        {
            write_byte(Some(b));
        }
    }

    fn gdb_deserialize(&mut self, bytes: &[u8]) -> Result<(), ()> {
        self.core.gdb_deserialize(bytes)?;
        let word = |at: usize| {
            bytes
                .get(at..at + 8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_le_bytes)
        };
        // A `G` without them (a gdb with another layout) leaves them as they are.
        if let (Some(fs), Some(gs)) = (word(CORE_LEN + 8), word(CORE_LEN + 16)) {
            self.fs_base = fs;
            self.gs_base = gs;
        }
        Ok(())
    }
}

/// The x87 and SSE registers from the legacy (FXSAVE) region of an XSAVE area: FCW, FSW, the
/// abridged tag byte (as gdb's full tag word: valid or empty), FOP, FIP, FDP, MXCSR, ST0-7,
/// XMM0-15.
pub fn fill_fpu(core: &mut X86_64CoreRegs, fx: &[u8; 512]) {
    let u16_at = |at: usize| u16::from_le_bytes([fx[at], fx[at + 1]]);
    let u64_at = |at: usize| u64::from_le_bytes(fx[at..at + 8].try_into().unwrap_or([0; 8]));
    core.fpu.fctrl = u32::from(u16_at(0));
    core.fpu.fstat = u32::from(u16_at(2));
    let abridged = fx[4];
    core.fpu.ftag = (0..8)
        .map(|i| {
            if abridged & (1 << i) != 0 {
                0
            } else {
                3u32 << (2 * i)
            }
        })
        .sum();
    core.fpu.fop = u32::from(u16_at(6) & 0x7ff);
    let (fip, fdp) = (u64_at(8), u64_at(16));
    core.fpu.fioff = fip as u32;
    core.fpu.fiseg = (fip >> 32) as u32;
    core.fpu.fooff = fdp as u32;
    core.fpu.foseg = (fdp >> 32) as u32;
    core.mxcsr = u32::from_le_bytes(fx[24..28].try_into().unwrap_or([0; 4]));
    for (i, st) in core.st.iter_mut().enumerate() {
        st.copy_from_slice(&fx[32 + 16 * i..42 + 16 * i]);
    }
    for (i, xmm) in core.xmm.iter_mut().enumerate() {
        *xmm = u128::from_le_bytes(fx[160 + 16 * i..176 + 16 * i].try_into().unwrap_or([0; 16]));
    }
}

/// Writes the x87 and SSE registers of `core` into `fx`, the legacy (FXSAVE-layout) region of
/// an XSAVE area: the inverse of [`fill_fpu`]. The tag word becomes the abridged form (a
/// register is valid unless gdb's tag says empty, 3), and `fx`'s reserved bytes are left as
/// they are.
pub fn store_fpu(core: &X86_64CoreRegs, fx: &mut [u8; 512]) {
    let mut put = |at: usize, bytes: &[u8]| fx[at..at + bytes.len()].copy_from_slice(bytes);
    put(0, &(core.fpu.fctrl as u16).to_le_bytes());
    put(2, &(core.fpu.fstat as u16).to_le_bytes());
    let abridged: u8 = (0..8)
        .filter(|i| (core.fpu.ftag >> (2 * i)) & 3 != 3)
        .map(|i| 1u8 << i)
        .sum();
    put(4, &[abridged]);
    put(6, &((core.fpu.fop & 0x7ff) as u16).to_le_bytes());
    let fip = u64::from(core.fpu.fioff) | u64::from(core.fpu.fiseg) << 32;
    let fdp = u64::from(core.fpu.fooff) | u64::from(core.fpu.foseg) << 32;
    put(8, &fip.to_le_bytes());
    put(16, &fdp.to_le_bytes());
    put(24, &core.mxcsr.to_le_bytes());
    for (i, st) in core.st.iter().enumerate() {
        put(32 + 16 * i, st);
    }
    for (i, xmm) in core.xmm.iter().enumerate() {
        put(160 + 16 * i, &xmm.to_le_bytes());
    }
}

/// Whether two register sets differ in their x87 or SSE part.
pub fn fpu_differs(a: &X86_64CoreRegs, b: &X86_64CoreRegs) -> bool {
    a.st != b.st || a.fpu != b.fpu || a.xmm != b.xmm || a.mxcsr != b.mxcsr
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn x87_and_sse_round_trip_through_the_fxsave_layout() {
        let mut fx = [0u8; 512];
        for (i, b) in fx.iter_mut().enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        fx[4] = 0b1010_0101;
        fx[5] = 0; // reserved: store_fpu leaves it alone
        fx[7] &= 0x07;
        fx[28..32].copy_from_slice(&0xffffu32.to_le_bytes()); // MXCSR_MASK: not a register
        let mut core = X86_64CoreRegs::default();
        fill_fpu(&mut core, &fx);
        let mut back = fx;
        back[..28].fill(0);
        back[32..].fill(0);
        store_fpu(&core, &mut back);
        assert_eq!(back[..28], fx[..28]);
        for i in 0..8 {
            assert_eq!(back[32 + 16 * i..42 + 16 * i], fx[32 + 16 * i..42 + 16 * i]);
        }
        assert_eq!(back[160..416], fx[160..416]);
    }

    #[test]
    fn bases_follow_the_core_registers_and_orig_rax() {
        let regs = Regs {
            fs_base: 0x1122_3344_5566_7788,
            gs_base: 0x99,
            ..Default::default()
        };
        let mut bytes = Vec::new();
        regs.gdb_serialize(|b| bytes.push(b));
        assert_eq!(bytes.len(), CORE_LEN + 24);
        assert!(bytes[CORE_LEN..CORE_LEN + 8].iter().all(Option::is_none));
        let raw: Vec<u8> = bytes.iter().map(|b| b.unwrap_or(0)).collect();
        let mut back = Regs::default();
        back.gdb_deserialize(&raw).unwrap();
        assert_eq!(back, regs);
    }

    #[test]
    fn the_fxsave_region_fills_the_x87_and_sse_registers() {
        let mut fx = [0u8; 512];
        fx[0..2].copy_from_slice(&0x037fu16.to_le_bytes());
        fx[4] = 0b0000_0001;
        fx[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
        fx[32] = 0xaa;
        fx[160 + 16..176 + 16].copy_from_slice(&7u128.to_le_bytes());
        let mut core = X86_64CoreRegs::default();
        fill_fpu(&mut core, &fx);
        assert_eq!(core.fpu.fctrl, 0x37f);
        assert_eq!(core.fpu.ftag, 0xfffc, "st0 valid, the others empty");
        assert_eq!(core.mxcsr, 0x1f80);
        assert_eq!(core.st[0][0], 0xaa);
        assert_eq!(core.xmm[1], 7);
    }
}
