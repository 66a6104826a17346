//! Exception entry and exit, the kernel-service call, and the switches between CPL 0 and CPL 3.
//!
//! Every piece of assembly of the CPL 3 runtime is here, but for the external-interrupt entry
//! (`interrupt.rs`):
//! - one entry stub per exception vector (`trap0` … `trap31`), which pushes a zero error code
//!   where the CPU pushes none and the vector, then jumps to [`trap_entry`];
//! - [`trap_entry`], which saves the caller-saved registers into a [`TrapFrame`], calls
//!   [`trap_dispatch`] on a 16-byte aligned stack, restores them and `iretq`s;
//! - [`service_stub`], the single `ud2` through which CPL 3 code asks for a kernel service;
//! - [`enter_user`] / [`user_entry`] / [`resume_kernel`]: [`super::run_user`]'s way into CPL 3
//!   and back.
//!
//! Only callee-saved registers survive a Rust call, so the entry saves just the nine
//! caller-saved ones: every instruction at CPL 0 is emulated on pvkit's KVM (~250 ns each), so
//! the handler path is kept short.

use core::arch::naked_asm;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use hypercall_abi::mmu::PTE_ADDR_MASK;

use super::tables::{KERNEL_DS, USER_CS, USER_DS};
use super::{Fault, FaultKind, service};

/// The saved state of the interrupted code, as [`trap_entry`] lays it out on the stack (lowest
/// address first).
#[repr(C)]
#[derive(Debug)]
pub(super) struct TrapFrame {
    r11: u64,
    r10: u64,
    r9: u64,
    r8: u64,
    /// The service number on a service call; its result on return.
    rax: u64,
    rcx: u64,
    rdx: u64,
    rsi: u64,
    /// The service argument on a service call.
    rdi: u64,
    /// Pushed by the stub.
    vector: u64,
    /// Pushed by the CPU, or 0 by the stub.
    error_code: u64,
    /// From here on, the CPU's interrupt frame.
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

/// The vector of #UD (invalid opcode), raised by `ud2`.
const VECTOR_UD: u64 = 6;
/// The vector of #PF (page fault).
const VECTOR_PF: u64 = 14;

/// The kernel `rsp` saved by [`enter_user`] (after pushing the callee-saved registers); 0 when
/// no [`super::run_user`] is active.
pub(super) static KERNEL_RSP: AtomicU64 = AtomicU64::new(0);
/// The root last loaded into CR3 by this module or [`super::init`].
pub(super) static LOADED_ROOT: AtomicU64 = AtomicU64::new(0);
/// Set while the fatal hook runs, so a fault inside it does not recurse.
static IN_FATAL: AtomicBool = AtomicBool::new(false);

/// Declares the entry stub of one vector: with `error_code`, the CPU has pushed one; otherwise
/// the stub pushes a 0 in its place, so every [`TrapFrame`] has the same layout.
macro_rules! trap_stub {
    ($name:ident, $vector:literal, error_code) => {
        /// Exception entry stub (the CPU pushes an error code for this vector).
        #[unsafe(naked)]
        unsafe extern "C" fn $name() {
            naked_asm!(
                "push {vector}",
                "jmp {entry}",
                vector = const $vector,
                entry = sym trap_entry,
            )
        }
    };
    ($name:ident, $vector:literal) => {
        /// Exception entry stub (no error code from the CPU for this vector).
        #[unsafe(naked)]
        unsafe extern "C" fn $name() {
            naked_asm!(
                "push 0",
                "push {vector}",
                "jmp {entry}",
                vector = const $vector,
                entry = sym trap_entry,
            )
        }
    };
}

trap_stub!(trap0, 0);
trap_stub!(trap1, 1);
trap_stub!(trap2, 2);
trap_stub!(trap3, 3);
trap_stub!(trap4, 4);
trap_stub!(trap5, 5);
/// #UD entry stub, with fast paths for the frequent services [`service::FLUSH_TLB`] and
/// [`service::WAIT_FOR_INTERRUPT`]: if `rax` asks for one of them and the faulting RIP is
/// [`service_stub`] holding `ud2`, it reloads CR3 (or runs `sti; hlt; cli`: the interrupt that
/// ends the `hlt` is taken right here, on this stack), sets `rax` = 0 and resumes after the
/// `ud2` — 11 (15) instructions at CPL 0 instead of the ~60 of the general path, each emulated
/// on pvkit's KVM. Everything else goes to [`trap_entry`] like any other vector.
#[unsafe(naked)]
unsafe extern "C" fn trap6() {
    naked_asm!(
        "cmp rax, {flush}",
        "jne 4f",
        "lea rax, [rip + {stub}]",
        // The interrupted RIP is at [rsp] (no error code for #UD).
        "cmp qword ptr [rsp], rax",
        "jne 2f",
        "cmp word ptr [rax], 0x0b0f",
        "jne 2f",
        "mov rax, cr3",
        "mov cr3, rax",
        "xor eax, eax",
        "add qword ptr [rsp], 2",
        "iretq",
        "4:",
        "cmp rax, {wait}",
        "jne 3f",
        "lea rax, [rip + {stub}]",
        "cmp qword ptr [rsp], rax",
        "jne 5f",
        "cmp word ptr [rax], 0x0b0f",
        "jne 5f",
        // `sti` holds interrupts off for one more instruction: none is taken before the `hlt`.
        "sti",
        "hlt",
        "cli",
        "xor eax, eax",
        "add qword ptr [rsp], 2",
        "iretq",
        "5:",
        "mov eax, {wait}",
        "jmp 3f",
        "2:",
        "mov eax, {flush}",
        "3:",
        "push 0",
        "push 6",
        "jmp {entry}",
        flush = const service::FLUSH_TLB,
        wait = const service::WAIT_FOR_INTERRUPT,
        stub = sym service_stub,
        entry = sym trap_entry,
    )
}
trap_stub!(trap7, 7);
trap_stub!(trap8, 8, error_code);
trap_stub!(trap9, 9);
trap_stub!(trap10, 10, error_code);
trap_stub!(trap11, 11, error_code);
trap_stub!(trap12, 12, error_code);
trap_stub!(trap13, 13, error_code);
trap_stub!(trap14, 14, error_code);
trap_stub!(trap15, 15);
trap_stub!(trap16, 16);
trap_stub!(trap17, 17, error_code);
trap_stub!(trap18, 18);
trap_stub!(trap19, 19);
trap_stub!(trap20, 20);
trap_stub!(trap21, 21, error_code);
trap_stub!(trap22, 22);
trap_stub!(trap23, 23);
trap_stub!(trap24, 24);
trap_stub!(trap25, 25);
trap_stub!(trap26, 26);
trap_stub!(trap27, 27);
trap_stub!(trap28, 28);
trap_stub!(trap29, 29, error_code);
trap_stub!(trap30, 30, error_code);
trap_stub!(trap31, 31);

/// The entry stubs, by vector.
const STUBS: [unsafe extern "C" fn(); 32] = [
    trap0, trap1, trap2, trap3, trap4, trap5, trap6, trap7, trap8, trap9, trap10, trap11, trap12,
    trap13, trap14, trap15, trap16, trap17, trap18, trap19, trap20, trap21, trap22, trap23, trap24,
    trap25, trap26, trap27, trap28, trap29, trap30, trap31,
];

/// The addresses of the entry stubs, by vector (for the IDT).
pub(super) fn stub_addresses() -> [u64; 32] {
    STUBS.map(|stub| stub as usize as u64)
}

/// Common exception entry: completes the [`TrapFrame`] (the stub pushed error code and vector),
/// calls [`trap_dispatch`] with it on a 16-byte aligned stack, then resumes the interrupted code
/// with `iretq` (with the registers and RIP the dispatcher may have changed).
#[unsafe(naked)]
unsafe extern "C" fn trap_entry() {
    naked_asm!(
        // The frame pointer: the saved registers start the `TrapFrame`.
        call_with_scratch_saved!("mov rdi, rsp"),
        // Drop vector and error code.
        "add rsp, 16",
        "iretq",
        dispatch = sym trap_dispatch,
    )
}

/// The kernel-service call: `ud2` with the service number in `rax` and the argument in `rdi`;
/// the #UD handler recognises this exact instruction (by address and bytes), performs the
/// service, puts its result in `rax` and resumes after the `ud2`, at the `ret`.
#[unsafe(naked)]
pub(super) unsafe extern "C" fn service_stub() {
    naked_asm!("ud2", "ret")
}

/// The address of [`service_stub`]'s `ud2`.
fn service_stub_address() -> u64 {
    (service_stub as *const ()).addr() as u64
}

/// Calls kernel service `number` with `arg` through [`service_stub`]; returns the service's
/// `rax`.
///
/// # Safety
/// [`super::init`] must have installed the IDT. The service's own contract (see
/// [`super::service`]) must hold.
#[inline]
pub(super) unsafe fn service_call(number: u64, arg: u64) -> u64 {
    let result: u64;
    // SAFETY: `service_stub` raises #UD, which the installed handler turns into the service and
    // a return to the `ret` after the `ud2`, with every register but `rax` preserved (the frame
    // restores them) and the flags restored by `iretq`. The `call` needs the stack (no
    // `nostack`); memory is not declared untouched, so accesses are not moved across a TLB
    // flush or CR3 load. The service's contract is the caller's.
    unsafe {
        core::arch::asm!(
            "call {stub}",
            stub = sym service_stub,
            inout("rax") number => result,
            in("rdi") arg,
        );
    }
    result
}

/// The Rust half of every exception: performs kernel services raised by [`service_stub`] and
/// hands everything else to the fatal hook.
extern "C" fn trap_dispatch(frame: &mut TrapFrame) {
    if frame.vector == VECTOR_UD && frame.rip == service_stub_address() && is_ud2(frame.rip) {
        match perform_service(frame) {
            Ok(result) => {
                frame.rax = result;
                // Resume at the `ret` after the `ud2`.
                frame.rip += 2;
                return;
            }
            Err(kind) => fatal(frame, kind),
        }
    }
    fatal(frame, FaultKind::Exception)
}

/// True if the two bytes at `rip` (the service stub) are `ud2` (`0f 0b`).
fn is_ud2(rip: u64) -> bool {
    let bytes = core::ptr::with_exposed_provenance::<[u8; 2]>(rip as usize);
    // SAFETY: the caller checked that `rip` is the address of `service_stub`, code of this
    // kernel that is mapped and readable (code pages are readable on x86) and at least 2 bytes
    // long. `[u8; 2]` needs no alignment.
    unsafe { bytes.read_volatile() == [0x0f, 0x0b] }
}

/// Performs the service the frame asks for; its result, or why the call is refused.
fn perform_service(frame: &TrapFrame) -> Result<u64, FaultKind> {
    let (number, arg) = (frame.rax, frame.rdi);
    match number {
        service::FLUSH_TLB => {
            // SAFETY: reloading CR3 with its own value only flushes the TLB.
            unsafe { reload_cr3() };
            Ok(0)
        }
        service::INVLPG => {
            if !super::is_canonical(arg) {
                return Err(FaultKind::BadServiceArgument { number, arg });
            }
            // SAFETY: invalidating the TLB entry of a canonical address never faults and never
            // changes what memory means.
            unsafe { invlpg(arg) };
            Ok(0)
        }
        service::LOAD_CR3 => {
            if arg & !PTE_ADDR_MASK != 0 {
                return Err(FaultKind::BadServiceArgument { number, arg });
            }
            // SAFETY: `super::load_cr3`'s contract, which its CPL 3 caller upheld: `arg` is a
            // root that maps everything in use the same way. The address has no reserved bits
            // (checked above), so the load cannot fault.
            unsafe { write_cr3(arg) };
            Ok(0)
        }
        service::WAIT_FOR_INTERRUPT => {
            // SAFETY: this handler runs at CPL 0 with `init`'s IDT loaded (it is one of its
            // gates), so `sti` does not fault and the interrupt that ends the `hlt` runs one of
            // this runtime's handlers, on this (trap) stack. (The #UD stub's fast path normally
            // serves this service; this is the same for a frame that reaches the general path.)
            unsafe { super::interrupt::sti_hlt_cli() };
            Ok(0)
        }
        service::RETURN_TO_KERNEL => {
            if frame.cs & 3 != 3 || KERNEL_RSP.load(Ordering::Relaxed) == 0 {
                return Err(FaultKind::ReturnOutsideRunUser);
            }
            // SAFETY: a `run_user` is active (`KERNEL_RSP` != 0) and this call comes from CPL 3,
            // i.e. from the code it entered; `KERNEL_RSP` is the kernel stack pointer it saved,
            // below its pushed callee-saved registers and return address, which are still
            // intact (nothing at CPL 0 ran on that stack since, and CPL 3 code runs on its own
            // stack).
            unsafe { resume_kernel(arg) }
        }
        _ => Err(FaultKind::BadService { number, arg }),
    }
}

/// Reports a fault through the hook registered by [`super::init`]; never returns.
fn fatal(frame: &TrapFrame, kind: FaultKind) -> ! {
    let cr2 = (frame.vector == VECTOR_PF).then(|| {
        let cr2: u64;
        // SAFETY: reading CR2 has no side effect; this handler runs at CPL 0.
        unsafe {
            core::arch::asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack, preserves_flags));
        }
        cr2
    });
    let fault = Fault {
        kind,
        vector: frame.vector as u8,
        error_code: frame.error_code,
        rip: frame.rip,
        cs: frame.cs,
        rflags: frame.rflags,
        rsp: frame.rsp,
        cr2,
    };
    report(&fault)
}

/// Hands `fault` to the fatal hook once; a fault while the hook runs stops the CPU.
pub(super) fn report(fault: &Fault) -> ! {
    if !IN_FATAL.swap(true, Ordering::Relaxed)
        && let Some(hook) = super::fatal_hook()
    {
        hook(fault);
    }
    crate::halt_forever()
}

/// Saves the kernel's callee-saved registers and stack pointer in [`KERNEL_RSP`], then enters
/// CPL 3 with `iretq` at [`user_entry`] with `rdi` = `f`, `rsi` = `arg` and `rsp` =
/// `user_stack_top` rounded down to 16 bytes, interrupts disabled. "Returns" through
/// [`resume_kernel`], with the value `f` returned.
///
/// # Safety
/// See [`super::run_user`].
#[unsafe(naked)]
pub(super) unsafe extern "C" fn enter_user(f: u64, arg: u64, user_stack_top: u64) -> u64 {
    naked_asm!(
        "push rbx",
        "push rbp",
        "push r12",
        "push r13",
        "push r14",
        "push r15",
        "mov qword ptr [rip + {kernel_rsp}], rsp",
        "and rdx, -16",
        "push {user_ds}",
        "push rdx",
        "push 2",
        "push {user_cs}",
        "lea rax, [rip + {entry}]",
        "push rax",
        "iretq",
        kernel_rsp = sym KERNEL_RSP,
        user_ds = const USER_DS,
        user_cs = const USER_CS,
        entry = sym user_entry,
    )
}

/// The first code at CPL 3: calls `f(arg)` (`rdi`, `rsi`) with a 16-byte aligned stack, then
/// asks for [`service::RETURN_TO_KERNEL`] with the result.
#[unsafe(naked)]
unsafe extern "C" fn user_entry() {
    naked_asm!(
        "mov rax, rdi",
        "mov rdi, rsi",
        "call rax",
        "mov rdi, rax",
        "mov eax, {ret}",
        "call {stub}",
        // Not reached: the service does not return here.
        "ud2",
        ret = const service::RETURN_TO_KERNEL,
        stub = sym service_stub,
    )
}

/// Abandons the trap stack and returns from [`enter_user`] with `value`: switches to the saved
/// kernel stack, clears [`KERNEL_RSP`], reloads the kernel data segments (the CPU nulled them on
/// the way to CPL 3 and SS on the way back) and pops the callee-saved registers.
///
/// # Safety
/// [`KERNEL_RSP`] must hold the stack pointer of an active [`enter_user`], whose stack is
/// intact, and the CPU must be at CPL 0.
#[unsafe(naked)]
unsafe extern "C" fn resume_kernel(value: u64) -> ! {
    naked_asm!(
        "mov rsp, qword ptr [rip + {kernel_rsp}]",
        "mov qword ptr [rip + {kernel_rsp}], 0",
        "mov eax, {kernel_ds}",
        "mov ss, ax",
        "mov ds, ax",
        "mov es, ax",
        "mov rax, rdi",
        "pop r15",
        "pop r14",
        "pop r13",
        "pop r12",
        "pop rbp",
        "pop rbx",
        "ret",
        kernel_rsp = sym KERNEL_RSP,
        kernel_ds = const KERNEL_DS,
    )
}

/// Reloads CR3 with its current value: flushes every non-global TLB entry.
///
/// # Safety
/// CPL 0.
#[inline]
pub(super) unsafe fn reload_cr3() {
    // SAFETY: CPL 0 (caller's contract); writing CR3's own value back changes no mapping. Not
    // `nomem`: memory accesses must not move across the flush.
    unsafe {
        core::arch::asm!(
            "mov {tmp}, cr3",
            "mov cr3, {tmp}",
            tmp = out(reg) _,
            options(nostack, preserves_flags),
        );
    }
}

/// Loads CR3 with `root` (flushing the TLB) and records it in [`LOADED_ROOT`].
///
/// # Safety
/// CPL 0; `root` has no bits outside [`PTE_ADDR_MASK`] and is a page-table root that maps all
/// memory in use (code, stacks, data) the same way the current one does.
#[inline]
pub(super) unsafe fn write_cr3(root: u64) {
    // SAFETY: the caller's contract.
    unsafe {
        core::arch::asm!("mov cr3, {}", in(reg) root, options(nostack, preserves_flags));
    }
    LOADED_ROOT.store(root, Ordering::Relaxed);
}

/// Reads CR3.
///
/// # Safety
/// CPL 0.
#[inline]
pub(super) unsafe fn read_cr3() -> u64 {
    let cr3: u64;
    // SAFETY: CPL 0 (caller's contract); reading CR3 has no side effect.
    unsafe {
        core::arch::asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack, preserves_flags));
    }
    cr3
}

/// Invalidates the TLB entry of `va`.
///
/// # Safety
/// CPL 0; `va` is canonical.
#[inline]
pub(super) unsafe fn invlpg(va: u64) {
    // SAFETY: CPL 0 and a canonical address (caller's contract), so `invlpg` cannot fault; it
    // changes no mapping. Not `nomem`, like the flush.
    unsafe {
        core::arch::asm!("invlpg [{}]", in(reg) va, options(nostack, preserves_flags));
    }
}
