//! The descriptor tables [`super::init`] installs: GDT, TSS (with a full I/O permission bitmap)
//! and IDT, as statics, plus their encodings (pure, unit-tested on the host).

use core::arch::asm;
use core::mem::{offset_of, size_of};

use super::Global;

/// Kernel code selector (64-bit, DPL 0).
pub const KERNEL_CS: u16 = 0x08;
/// Kernel data/stack selector (DPL 0).
pub const KERNEL_DS: u16 = 0x10;
/// User data/stack selector (GDT entry 0x18, DPL 3), with RPL 3.
pub const USER_DS: u16 = 0x18 | 3;
/// User code selector (GDT entry 0x20, 64-bit, DPL 3), with RPL 3.
pub const USER_CS: u16 = 0x20 | 3;
/// The TSS selector (a 16-byte descriptor at GDT offsets 0x28..0x38).
pub const TSS_SELECTOR: u16 = 0x28;

/// 64-bit code, DPL 0, present (type 0xb: execute/read, accessed).
const KERNEL_CODE: u64 = 0x00af_9b00_0000_ffff;
/// Data, DPL 0, present (type 0x3: read/write, accessed).
const KERNEL_DATA: u64 = 0x00cf_9300_0000_ffff;
/// Data, DPL 3, present.
const USER_DATA: u64 = 0x00cf_f300_0000_ffff;
/// 64-bit code, DPL 3, present.
const USER_CODE: u64 = 0x00af_fb00_0000_ffff;

/// GDT entries: null, kernel code, kernel data, user data, user code, TSS (two entries).
const GDT_ENTRIES: usize = 7;

/// Bytes of the I/O permission bitmap: one bit per port, 65536 ports.
pub const IOMAP_BYTES: usize = 65536 / 8;

/// The 104-byte 64-bit task-state segment.
#[repr(C, packed(4))]
struct Tss {
    reserved0: u32,
    /// `rsp0..rsp2`: the stacks loaded on a switch to CPL 0..2.
    rsp: [u64; 3],
    reserved1: u64,
    /// `ist1..ist7`: interrupt stack table.
    ist: [u64; 7],
    reserved2: u64,
    reserved3: u16,
    /// Offset of the I/O permission bitmap from the TSS base.
    iomap_base: u16,
}

/// The TSS followed by its I/O permission bitmap: all zero (every port allowed at CPL 3), then
/// the `0xff` byte the CPU requires after the bitmap. The TSS limit covers that byte.
#[repr(C, align(4096))]
struct TssPage {
    tss: Tss,
    iomap: [u8; IOMAP_BYTES],
    iomap_end: u8,
}

const _: () = {
    assert!(size_of::<Tss>() == 104);
    assert!(offset_of!(Tss, rsp) == 4);
    assert!(offset_of!(Tss, ist) == 36);
    assert!(offset_of!(Tss, iomap_base) == 102);
    assert!(offset_of!(TssPage, iomap) == 104);
    assert!(offset_of!(TssPage, iomap_end) == 104 + IOMAP_BYTES);
};

/// The TSS limit: the offset of its last byte (the `0xff` after the bitmap).
pub const TSS_LIMIT: u32 = (104 + IOMAP_BYTES) as u32;

/// The IDT: 256 gates. [`super::init`] fills all of them: the 32 exception vectors and the 224
/// external-interrupt vectors.
#[repr(C, align(4096))]
struct Idt([[u64; 2]; 256]);

/// A stack for the CPU to switch to, 16-byte aligned.
#[repr(C, align(16))]
struct Stack<const N: usize>([u8; N]);

/// The address just past `stack` (where `rsp` starts).
fn stack_top<const N: usize>(stack: &Global<Stack<N>>) -> u64 {
    stack.get().addr() as u64 + N as u64
}

/// Bytes of the trap stack (`TSS.rsp0`: every exception from CPL 3 runs on it).
pub const TRAP_STACK_SIZE: usize = 16 * 1024;
/// Bytes of the double-fault stack (`TSS.ist1`).
const DOUBLE_FAULT_STACK_SIZE: usize = 4096;
/// The IST slot (1-based) of the double-fault stack.
pub const DOUBLE_FAULT_IST: u8 = 1;

/// The GDT. The CPU writes it too (`ltr` sets the TSS descriptor's busy bit).
static GDT: Global<[u64; GDT_ENTRIES]> = Global::new([0; GDT_ENTRIES]);
/// The TSS and its I/O bitmap (in BSS: [`install`] writes the non-zero fields).
static TSS: Global<TssPage> = Global::new(TssPage {
    tss: Tss {
        reserved0: 0,
        rsp: [0; 3],
        reserved1: 0,
        ist: [0; 7],
        reserved2: 0,
        reserved3: 0,
        iomap_base: 0,
    },
    iomap: [0; IOMAP_BYTES],
    iomap_end: 0,
});
/// The IDT.
static IDT: Global<Idt> = Global::new(Idt([[0; 2]; 256]));
/// The stack exceptions from CPL 3 run on.
static TRAP_STACK: Global<Stack<TRAP_STACK_SIZE>> = Global::new(Stack([0; TRAP_STACK_SIZE]));
/// The stack a double fault runs on, whatever the state of the others.
static DOUBLE_FAULT_STACK: Global<Stack<DOUBLE_FAULT_STACK_SIZE>> =
    Global::new(Stack([0; DOUBLE_FAULT_STACK_SIZE]));

/// The two 8-byte halves of a 64-bit available-TSS descriptor (type 0x9, present, DPL 0).
pub const fn tss_descriptor(base: u64, limit: u32) -> [u64; 2] {
    let limit = limit as u64;
    let low = (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x89 << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56);
    [low, base >> 32]
}

/// The two 8-byte halves of a 64-bit interrupt gate (type 0xe, present, DPL 0: interrupts stay
/// disabled in the handler) to `handler` in code segment `selector`, on IST slot `ist` (0 =
/// none).
pub const fn interrupt_gate(handler: u64, selector: u16, ist: u8) -> [u64; 2] {
    let low = (handler & 0xffff)
        | ((selector as u64) << 16)
        | (((ist & 7) as u64) << 32)
        | (0x8e << 40)
        | (((handler >> 16) & 0xffff) << 48);
    [low, handler >> 32]
}

/// The GDT contents for a TSS at `tss_base`.
pub const fn gdt_entries(tss_base: u64) -> [u64; GDT_ENTRIES] {
    let [tss_low, tss_high] = tss_descriptor(tss_base, TSS_LIMIT);
    [
        0,
        KERNEL_CODE,
        KERNEL_DATA,
        USER_DATA,
        USER_CODE,
        tss_low,
        tss_high,
    ]
}

/// The operand of `lgdt`/`lidt`.
#[repr(C, packed(2))]
struct TablePointer {
    limit: u16,
    base: u64,
}

/// Fills and loads GDT, TSS and IDT; `handlers[v]` is the entry stub of exception vector `v`,
/// `interrupts[i]` the entry stub of external-interrupt vector `32 + i`.
///
/// # Safety
/// CPL 0 with interrupts disabled; nothing else uses these statics concurrently (one CPU). Code
/// that relies on the previous GDT, TSS or IDT must not run afterwards. The kernel's code and
/// data must be reachable through the kernel code and data selectors (flat, base 0).
pub unsafe fn install(handlers: &[u64; 32], interrupts: &[u64; 224]) {
    let tss = TSS.get();
    // SAFETY: `tss` points to the TSS static; single CPU with interrupts disabled (the caller's
    // contract), and the CPU only reads the TSS on a privilege change or IST switch, which
    // cannot happen while this function runs at CPL 0 without faulting. Raw-pointer writes to
    // fields of a packed struct need no alignment.
    unsafe {
        (&raw mut (*tss).tss.rsp[0]).write_unaligned(stack_top(&TRAP_STACK));
        (&raw mut (*tss).tss.ist[usize::from(DOUBLE_FAULT_IST - 1)])
            .write_unaligned(stack_top(&DOUBLE_FAULT_STACK));
        (&raw mut (*tss).tss.iomap_base).write_unaligned(offset_of!(TssPage, iomap) as u16);
        (&raw mut (*tss).iomap_end).write(0xff);
    }

    let gdt = GDT.get();
    // SAFETY: `gdt` points to the GDT static, which nothing else writes (single CPU, interrupts
    // off). Rewriting the TSS descriptor also clears a busy bit left by an earlier `install`, so
    // the `ltr` below succeeds again.
    unsafe { gdt.write(gdt_entries(tss.addr() as u64)) };
    let gdt_pointer = TablePointer {
        limit: (size_of::<[u64; GDT_ENTRIES]>() - 1) as u16,
        base: gdt.addr() as u64,
    };
    // SAFETY: the GDT holds flat kernel code/data descriptors at the selectors the kernel
    // already uses (0x08, 0x10; pvkit's boot GDT has the same ones), so reloading CS and the
    // data segments keeps every address meaning the same. `retfq` pops the `push`ed RIP and CS,
    // continuing at label 2 in the new code segment. `ltr` marks the TSS descriptor busy (a
    // write to the GDT static, which is why it is a `Global`). CPL 0 by the caller's contract.
    unsafe {
        asm!(
            "lgdt [{gdtp}]",
            "push {cs}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov {tmp:e}, {ds}",
            "mov ds, {tmp:x}",
            "mov es, {tmp:x}",
            "mov ss, {tmp:x}",
            "mov fs, {tmp:x}",
            "mov gs, {tmp:x}",
            "mov {tmp:e}, {tss}",
            "ltr {tmp:x}",
            gdtp = in(reg) &raw const gdt_pointer,
            cs = const KERNEL_CS,
            ds = const KERNEL_DS,
            tss = const TSS_SELECTOR,
            tmp = out(reg) _,
        );
    }

    let idt = IDT.get();
    for (vector, &handler) in handlers.iter().enumerate() {
        let ist = if vector == 8 { DOUBLE_FAULT_IST } else { 0 };
        // SAFETY: `vector` < 32 < 256 indexes the IDT static, which nothing else writes; the
        // CPU reads it only on an exception, and none can be handled before `lidt` below.
        unsafe { (&raw mut (*idt).0[vector]).write(interrupt_gate(handler, KERNEL_CS, ist)) };
    }
    for (i, &handler) in interrupts.iter().enumerate() {
        // SAFETY: `32 + i` < 256 indexes the IDT static, as above. Interrupts are disabled (the
        // caller's contract), so none is delivered through a gate while it is written.
        unsafe { (&raw mut (*idt).0[32 + i]).write(interrupt_gate(handler, KERNEL_CS, 0)) };
    }
    let idt_pointer = TablePointer {
        limit: (size_of::<Idt>() - 1) as u16,
        base: idt.addr() as u64,
    };
    // SAFETY: the IDT now has a present gate for every vector, each to a handler stub in the
    // kernel code segment. CPL 0 by the caller's contract.
    unsafe {
        asm!(
            "lidt [{}]",
            in(reg) &raw const idt_pointer,
            options(readonly, nostack, preserves_flags)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_descriptors_match_the_verified_encodings() {
        let gdt = gdt_entries(0);
        assert_eq!(gdt[usize::from(KERNEL_CS >> 3)], 0x00af_9b00_0000_ffff);
        assert_eq!(gdt[usize::from(KERNEL_DS >> 3)], 0x00cf_9300_0000_ffff);
        assert_eq!(gdt[usize::from(USER_DS >> 3)], 0x00cf_f300_0000_ffff);
        assert_eq!(gdt[usize::from(USER_CS >> 3)], 0x00af_fb00_0000_ffff);
        assert_eq!(USER_DS & 3, 3);
        assert_eq!(USER_CS & 3, 3);
        assert_eq!(usize::from(TSS_SELECTOR >> 3) + 2, GDT_ENTRIES);
    }

    #[test]
    fn tss_descriptor_splits_base_and_limit() {
        let [low, high] = tss_descriptor(0xffff_8000_1234_5678, 0x2068);
        assert_eq!(low & 0xffff, 0x2068);
        assert_eq!((low >> 16) & 0xff_ffff, 0x34_5678);
        assert_eq!((low >> 40) & 0xff, 0x89);
        assert_eq!((low >> 48) & 0xf, 0);
        assert_eq!(low >> 56, 0x12);
        assert_eq!(high, 0xffff_8000);
        assert_eq!(TSS_LIMIT, 0x2068);
    }

    #[test]
    fn interrupt_gate_splits_the_handler() {
        let [low, high] = interrupt_gate(0x0000_7fff_dead_beef, KERNEL_CS, 1);
        assert_eq!(low & 0xffff, 0xbeef);
        assert_eq!((low >> 16) & 0xffff, 0x08);
        assert_eq!((low >> 32) & 0x7, 1);
        assert_eq!((low >> 40) & 0xff, 0x8e);
        assert_eq!(low >> 48, 0xdead);
        assert_eq!(high, 0x7fff);
    }
}
