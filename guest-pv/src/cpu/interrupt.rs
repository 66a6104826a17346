//! External interrupts (vectors [`FIRST_VECTOR`]`..=255`): entry stubs that count per vector,
//! the optional kernel hook, and `sti`/`cli`/`sti; hlt`.
//!
//! pvkit has no APIC: the VMM injects with `KVM_INTERRUPT`, so a handler needs no EOI. The path
//! of an interrupt is kept short because every instruction at CPL 0 is emulated on pvkit's KVM
//! (~250 ns each): with no hook registered it is 7 instructions — the stub's `lock inc` of the
//! vector's counter, `push` of the vector and `jmp`, then [`interrupt_entry`]'s `cmp`, `jne`,
//! `add` and `iretq`. Only with a hook does the entry save the nine caller-saved registers and
//! call [`interrupt_dispatch`] (like [`super::trap`]'s exception entry). Flags need no saving:
//! `iretq` restores RFLAGS from the frame.

use core::arch::naked_asm;
use core::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

/// The first external-interrupt vector (the 32 below are CPU exceptions).
pub const FIRST_VECTOR: u8 = 32;
/// Number of external-interrupt vectors (`32..=255`).
pub(super) const VECTORS: usize = 256 - FIRST_VECTOR as usize;
/// Bytes from one entry stub to the next (a stub is at most 18 bytes: `lock inc` with a
/// RIP-relative operand 8, `push imm32` 5, `jmp rel32` 5).
const STUB_STRIDE: u64 = 32;

/// Interrupts taken, by vector (entries below [`FIRST_VECTOR`] stay 0). The entry stubs
/// increment them with `lock inc`.
static COUNTS: [AtomicU64; 256] = [const { AtomicU64::new(0) }; 256];

/// The registered [`InterruptHook`] as a pointer, null for none. [`interrupt_entry`] tests it
/// for zero; only [`set_hook`] writes it.
static HOOK: AtomicPtr<()> = AtomicPtr::new(core::ptr::null_mut());

/// A kernel's interrupt callback: called with the vector after the count is incremented, at
/// CPL 0 with interrupts disabled, on the interrupted code's stack (no stack switch: interrupts
/// are only enabled at CPL 0). It must be short and must not enable interrupts.
pub type InterruptHook = fn(vector: u8);

/// Interrupts of `vector` taken since boot (0 for an exception vector).
pub(super) fn count(vector: u8) -> u64 {
    COUNTS[usize::from(vector)].load(Ordering::Relaxed)
}

/// Registers (or, with `None`, removes) the hook.
pub(super) fn set_hook(hook: Option<InterruptHook>) {
    let raw = hook.map_or(core::ptr::null_mut(), |h| h as *mut ());
    HOOK.store(raw, Ordering::Release);
}

/// The entry stubs of vectors `32..=255`, one every [`STUB_STRIDE`] bytes from the first
/// `STUB_STRIDE`-aligned address at or after this symbol (the padding before each stub is
/// `int3`; nothing ever calls this function itself). Stub `v`: `lock inc COUNTS[v]`, `push v`,
/// `jmp interrupt_entry`. The assembler symbol `pvkit_irq_vector` counts the vectors through
/// the `.rept`.
#[unsafe(naked)]
unsafe extern "C" fn interrupt_stubs() {
    naked_asm!(
        ".set pvkit_irq_vector, {first}",
        ".rept {vectors}",
        ".balign {stride}, 0xcc",
        "lock incq {counts}+8*pvkit_irq_vector(%rip)",
        "pushq $pvkit_irq_vector",
        "jmp {entry}",
        ".set pvkit_irq_vector, pvkit_irq_vector+1",
        ".endr",
        first = const FIRST_VECTOR,
        vectors = const VECTORS,
        stride = const STUB_STRIDE,
        counts = sym COUNTS,
        entry = sym interrupt_entry,
        options(att_syntax),
    )
}

/// The address of the symbol [`interrupt_stubs`] (the first stub is at or after it).
fn stubs_symbol() -> u64 {
    (interrupt_stubs as *const ()).addr() as u64
}

/// The address of the entry stub of each vector `32..=255`, in order (for the IDT).
pub(super) fn stub_addresses() -> [u64; VECTORS] {
    let base = stubs_symbol().next_multiple_of(STUB_STRIDE);
    core::array::from_fn(|i| base + i as u64 * STUB_STRIDE)
}

/// Common interrupt entry, with the vector on top of the CPU's interrupt frame. Without a hook
/// it drops the vector and `iretq`s at once; with one it saves the caller-saved registers, calls
/// [`interrupt_dispatch`]`(vector)` on a 16-byte aligned stack, restores them and `iretq`s.
#[unsafe(naked)]
unsafe extern "C" fn interrupt_entry() {
    naked_asm!(
        "cmp qword ptr [rip + {hook}], 0",
        "jne 2f",
        "add rsp, 8",
        "iretq",
        "2:",
        // The vector, above the nine saved registers.
        call_with_scratch_saved!("mov rdi, qword ptr [rsp + 72]"),
        "add rsp, 8",
        "iretq",
        hook = sym HOOK,
        dispatch = sym interrupt_dispatch,
    )
}

/// Calls the registered hook with `vector` (the entry only calls this when one is registered;
/// it may have been removed since).
extern "C" fn interrupt_dispatch(vector: u64) {
    let raw = HOOK.load(Ordering::Acquire);
    if raw.is_null() {
        return;
    }
    // SAFETY: a non-null `HOOK` was stored by `set_hook` from an `InterruptHook` (a `fn(u8)`
    // pointer, the same size as `*mut ()`), so turning it back yields that function pointer.
    let hook = unsafe { core::mem::transmute::<*mut (), InterruptHook>(raw) };
    hook(vector as u8);
}

/// `sti`.
///
/// # Safety
/// CPL 0, and the IDT loaded is [`super::init`]'s.
#[inline]
pub(super) unsafe fn sti() {
    // SAFETY: CPL 0 (caller's contract), so `sti` does not fault; every vector that can be
    // raised has a gate in the loaded IDT. Not `nomem`: handlers write memory (counters, the
    // hook's state), so accesses must not move across. Interrupts push below `rsp`, which is
    // harmless without a red zone (pvkit kernels are built without one, like every kernel
    // taking interrupts); not `nostack` anyway, to keep the compiler off that area.
    unsafe { core::arch::asm!("sti") };
}

/// `cli`.
#[inline]
pub(super) fn cli() {
    // SAFETY: `cli` at CPL 0 only clears IF; at CPL 3 (IOPL 0 under pvkit) it raises #GP, which
    // the runtime reports as fatal — no memory is touched either way. Not `nomem`, so memory
    // accesses stay on their side of it.
    unsafe { core::arch::asm!("cli", options(nostack)) };
}

/// `sti; hlt; cli` as one block: `sti` keeps interrupts inhibited for one more instruction, so
/// none is taken between it and `hlt` (a wake-up cannot slip in between a check made with
/// IF = 0 and the `hlt`).
///
/// # Safety
/// As for [`sti`].
#[inline]
pub(super) unsafe fn sti_hlt_cli() {
    // SAFETY: as for `sti`: CPL 0 and our IDT (caller's contract), so `sti`, `hlt` and `cli` do
    // not fault and the interrupt that ends `hlt` runs one of this module's handlers. Not
    // `nomem` (the handler writes the counters the caller reads next), not `nostack`.
    unsafe { core::arch::asm!("sti", "hlt", "cli") };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stubs_are_evenly_spaced_and_aligned() {
        let stubs = stub_addresses();
        assert_eq!(stubs.len(), 224);
        assert_eq!(stubs[0] % STUB_STRIDE, 0);
        assert!(stubs[0] >= stubs_symbol());
        assert!(stubs[0] < stubs_symbol() + STUB_STRIDE);
        assert_eq!(stubs[223] - stubs[0], 223 * STUB_STRIDE);
    }

    #[test]
    fn stub_code_pushes_its_vector() {
        // Decode the `push` of a few stubs: after the 9-byte `lock inc qword [rip+disp32]`
        // (F0 48 FF 05 disp32) comes `push imm8` (6A ib) or `push imm32` (68 id).
        for (i, &stub) in stub_addresses().iter().enumerate().step_by(37) {
            let code = core::ptr::with_exposed_provenance::<[u8; 14]>(stub as usize);
            // SAFETY: the stub is code of this test binary, mapped readable, and at least 14
            // bytes long before the next stub (`STUB_STRIDE` = 32).
            let code = unsafe { code.read() };
            assert_eq!(&code[..4], &[0xf0, 0x48, 0xff, 0x05], "stub {i}: lock inc");
            let vector = match code[8] {
                0x6a => u32::from(code[9]),
                0x68 => u32::from_le_bytes([code[9], code[10], code[11], code[12]]),
                other => panic!("stub {i}: unexpected opcode {other:#x}"),
            };
            assert_eq!(vector, u32::from(FIRST_VECTOR) + i as u32);
        }
    }

    #[test]
    fn hook_round_trips() {
        fn h(_: u8) {}
        set_hook(Some(h));
        assert!(!HOOK.load(Ordering::Relaxed).is_null());
        set_hook(None);
        assert!(HOOK.load(Ordering::Relaxed).is_null());
        assert_eq!(count(0x20), 0);
    }
}
