//! Debugging CPL 3 code where KVM's debug intercepts do not reach it.
//!
//! On pvkit's KVM hosts (nested, PVM-based) an `int3` at CPL 3 is delivered to the guest as
//! `#BP` even with `KVM_GUESTDBG_USE_SW_BP`, a debug-register breakpoint does not fire at CPL 3
//! and `KVM_GUESTDBG_SINGLESTEP` produces no debug exit once an `iretq` has entered CPL 3. At
//! CPL 0 all three work. So the stub catches the guest's own exception delivery instead:
//!
//! - While the guest runs with a breakpoint set (or a CPL 3 single-step pending) the stub puts
//!   hidden `int3`s on the entry points of the guest's `#BP` (vector 3) and `#DB` (vector 1)
//!   handlers, read from the guest's IDT. Those run at CPL 0, where the stub sees them.
//! - At a hidden `int3`, the interrupt frame the CPU pushed tells where the exception came
//!   from. A `#BP` whose saved CS has RPL 3 and whose saved RIP − 1 is one of gdb's breakpoints,
//!   or a `#DB` during the stub's own CPL 3 single-step, is the debugger's: the stub undoes the
//!   delivery ([`returned`]: RIP, CS, RFLAGS, RSP and SS from the frame, what the handler's
//!   `iretq` would do) so the vCPU stands at CPL 3 at the breakpoint, and the guest's handler
//!   never runs. Any other is the guest's own: the stub lifts its `int3`s, single-steps the
//!   handler's first instruction (at CPL 0) and goes on.
//! - A single-step at CPL 3 sets RFLAGS.TF (the guest's own single-step) and waits for the
//!   `#DB`; the TF the stub set is cleared again when the step is reported. A single-step at
//!   CPL 0 over an `iretq` whose frame returns to CPL 3 is done by the stub itself (the same
//!   [`returned`]), so it stops at the first CPL 3 instruction.

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};

/// The breakpoint exception.
pub const BP_VECTOR: u8 = 3;
/// The debug exception (single-step).
pub const DB_VECTOR: u8 = 1;
/// RFLAGS.TF.
pub const TF: u64 = 1 << 8;
/// `iretq`.
pub const IRETQ: [u8; 2] = [0x48, 0xcf];
/// Bytes of a 64-bit interrupt frame without error code (RIP, CS, RFLAGS, RSP, SS).
pub const FRAME_LEN: usize = 40;

/// The frame the CPU pushes for an exception without error code (`#BP`, `#DB`), or the one an
/// `iretq` pops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrapFrame {
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

impl TrapFrame {
    /// The frame at the top of the stack, from its bytes.
    pub fn parse(bytes: &[u8]) -> Option<TrapFrame> {
        let word = |i: usize| {
            bytes
                .get(i * 8..i * 8 + 8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_le_bytes)
        };
        Some(TrapFrame {
            rip: word(0)?,
            cs: word(1)?,
            rflags: word(2)?,
            rsp: word(3)?,
            ss: word(4)?,
        })
    }

    /// Whether it returns to (or came from) CPL 3.
    pub fn is_user(&self) -> bool {
        self.cs & 3 == 3
    }
}

/// The handler address of a 64-bit IDT gate, if the gate is present.
pub fn gate_handler(gate: &[u8; 16]) -> Option<u64> {
    let lo = u64::from_le_bytes(gate[..8].try_into().ok()?);
    let hi = u64::from_le_bytes(gate[8..].try_into().ok()?);
    if lo & (1 << 47) == 0 {
        return None;
    }
    Some((lo & 0xffff) | ((lo >> 48) << 16) | ((hi & 0xffff_ffff) << 32))
}

/// What loading `selector` with the 8-byte GDT descriptor `desc` puts in the segment register.
pub fn segment(selector: u16, desc: u64) -> kvm_segment {
    let g = (desc >> 55) & 1;
    let mut limit = ((desc & 0xffff) | (((desc >> 48) & 0xf) << 16)) as u32;
    if g == 1 {
        limit = (limit << 12) | 0xfff;
    }
    kvm_segment {
        base: ((desc >> 16) & 0xff_ffff) | (((desc >> 56) & 0xff) << 24),
        limit,
        selector,
        // Loading a segment sets its accessed bit.
        type_: (((desc >> 40) & 0xf) | 1) as u8,
        present: ((desc >> 47) & 1) as u8,
        dpl: ((desc >> 45) & 3) as u8,
        db: ((desc >> 54) & 1) as u8,
        s: ((desc >> 44) & 1) as u8,
        l: ((desc >> 53) & 1) as u8,
        g: g as u8,
        avl: ((desc >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// The registers after returning to `frame` (what `iretq` does): RIP `rip`, RSP, RFLAGS and
/// CS/SS from the frame (their descriptors `cs_desc`, `ss_desc` from the GDT), everything else
/// as in `regs`/`sregs`. `clear_tf` drops RFLAGS.TF (set by the stub for a step).
pub fn returned(
    regs: &kvm_regs,
    sregs: &kvm_sregs,
    frame: &TrapFrame,
    rip: u64,
    (cs_desc, ss_desc): (u64, u64),
    clear_tf: bool,
) -> (kvm_regs, kvm_sregs) {
    let mut r = *regs;
    let mut s = *sregs;
    r.rip = rip;
    r.rsp = frame.rsp;
    r.rflags = frame.rflags | 2;
    if clear_tf {
        r.rflags &= !TF;
    }
    s.cs = segment(frame.cs as u16, cs_desc);
    s.ss = segment(frame.ss as u16, ss_desc);
    (r, s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gates_decode_their_handler() {
        let handler: u64 = 0xffff_8000_0020_1a3c;
        let mut gate = [0u8; 16];
        let lo =
            (handler & 0xffff) | (0x08 << 16) | (0x8e << 40) | ((handler >> 16 & 0xffff) << 48);
        gate[..8].copy_from_slice(&lo.to_le_bytes());
        gate[8..].copy_from_slice(&(handler >> 32).to_le_bytes());
        assert_eq!(gate_handler(&gate), Some(handler));
        gate[5] = 0x0e; // not present
        assert_eq!(gate_handler(&gate), None);
    }

    #[test]
    fn user_segments_decode_as_loaded() {
        // guest-pv's user code (0x23: 64-bit, DPL 3) and user data (0x1b).
        let cs = segment(0x23, 0x00af_fb00_0000_ffff);
        assert_eq!((cs.dpl, cs.l, cs.db, cs.s, cs.present), (3, 1, 0, 1, 1));
        assert_eq!((cs.type_, cs.limit, cs.base), (0xb, 0xffff_ffff, 0));
        let ss = segment(0x1b, 0x00cf_f200_0000_ffff);
        assert_eq!((ss.dpl, ss.l, ss.db, ss.type_), (3, 0, 1, 0x3));
    }

    #[test]
    fn returning_to_a_frame_restores_the_user_context() {
        let frame = TrapFrame::parse(
            &[0x3009u64, 0x23, 0x302, 0x7ff0, 0x1b]
                .iter()
                .flat_map(|w| w.to_le_bytes())
                .collect::<Vec<u8>>(),
        )
        .unwrap();
        assert!(frame.is_user());
        let regs = kvm_regs {
            rax: 7,
            rip: 0x4030,
            rsp: 0x1_0000,
            ..Default::default()
        };
        let (r, s) = returned(
            &regs,
            &kvm_sregs::default(),
            &frame,
            frame.rip - 1,
            (0x00af_fb00_0000_ffff, 0x00cf_f200_0000_ffff),
            true,
        );
        assert_eq!((r.rip, r.rsp, r.rflags, r.rax), (0x3008, 0x7ff0, 0x202, 7));
        assert_eq!((s.cs.selector, s.cs.dpl, s.ss.selector), (0x23, 3, 0x1b));
    }
}
