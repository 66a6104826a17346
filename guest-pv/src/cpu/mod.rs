//! A CPL 3 runtime: run compute-heavy kernel code in user mode, where pvkit's KVM executes it
//! natively, and come back.
//!
//! On pvkit's (nested, PVM-based) KVM every guest instruction at CPL 0 is emulated (~250 ns
//! each) while CPL 3 code runs natively (~0.3 ns per instruction). A kernel that wants to run
//! work at speed enters CPL 3 with [`run_user`] and asks CPL 0 for the few privileged operations
//! it needs through *kernel services* ([`flush_tlb`], [`invlpg`], [`load_cr3`],
//! [`wait_for_interrupt`]).
//!
//! # What [`init`] installs (all statics, no allocator)
//! - A GDT: null, kernel code `0x08`, kernel data `0x10`, user data `0x18` (selector
//!   [`USER_DS`] = `0x1b`), user code `0x20` ([`USER_CS`] = `0x23`), and a 64-bit TSS at `0x28`
//!   (16-byte descriptor). CS and the data segments are reloaded, then `ltr`.
//! - A TSS whose `rsp0` is the top of a 16 KiB trap stack and whose I/O permission bitmap
//!   allows every port, so port I/O (hypercalls, the UART, the exit and marker ports) works at
//!   CPL 3. (pvkit's KVM forces `RFLAGS.IOPL` to 0, so the bitmap is the only way.) A double
//!   fault runs on its own 4 KiB stack (IST 1).
//! - An IDT with an interrupt gate for each of the 32 exception vectors and for each of the 224
//!   external-interrupt vectors `32..=255` (see [Interrupts](#interrupts)).
//!
//! # Kernel services
//! `int n` raises #UD at CPL 3 on pvkit's KVM and `syscall` does not work, but an exception from
//! CPL 3 to a CPL 0 handler and back with `iretq` does (~40 µs round trip). So a service call is
//! a `ud2` in one stub function, with the service number in `rax` and its argument in `rdi`. The
//! #UD handler performs the service only if the faulting RIP is that stub's address *and* the
//! bytes there are `0f 0b`; it puts the result in `rax` and resumes after the `ud2`. The numbers
//! are in [`service`]; they are private to this crate's runtime, not part of the pvkit ABI.
//!
//! Any other exception — including a #UD anywhere else, a service call with an unknown number
//! or a bad argument — is fatal: the handler hands a [`Fault`] to the hook the kernel passed to
//! [`init`] (which typically prints it and ends the VM; guest-pv imposes no panic handler). Its
//! [`Display`](core::fmt::Display) is one line, e.g.
//! `CPU exception 14 (#PF page fault): error code 0x4, rip 0x201a3c, cs 0x23, rflags 0x2, rsp
//! 0x2ffe8, cr2 0x8000000000`.
//!
//! # Interrupts
//! pvkit's VMM injects external interrupts with `KVM_INTERRUPT` (no APIC, so no EOI): the
//! trapped timer raises [`hypercall_abi::idle::TIMER_VECTOR`] and the event device
//! [`hypercall_abi::idle::EVENT_VECTOR`] when the guest halts with interrupts enabled. Every
//! vector `32..=255` has a gate whose handler counts it ([`interrupt_count`]), calls the
//! kernel's optional [`InterruptHook`] ([`set_interrupt_hook`]) and `iretq`s, preserving every
//! register. Without a hook a handler is 7 instructions.
//!
//! The boot state has IF = 0 and this runtime keeps it so: interrupts are taken only where the
//! kernel asks for them. The pattern for waiting is: check the condition with IF = 0, then
//! [`wait_for_interrupt`] (`sti; hlt; cli` as one block — `sti` delays interrupts by one
//! instruction, so none is taken between the check and the `hlt`, and a wake-up that is already
//! pending ends the `hlt` at once):
//!
//! ```no_run
//! # use guest_pv::cpu;
//! # fn deadline_passed() -> bool { true }
//! // IF = 0 here (pvkit's boot state; `wait_for_interrupt` leaves it so).
//! while !deadline_passed() {
//!     cpu::wait_for_interrupt(); // sti; hlt; cli — returns after a handler ran
//! }
//! ```
//!
//! [`enable_interrupts`] / [`disable_interrupts`] are plain `sti` / `cli` for kernels that want
//! interrupts on for a while. These two are CPL 0 only (`sti` and `cli` raise #GP at CPL 3);
//! [`wait_for_interrupt`] also works at CPL 3, as the kernel service
//! [`service::WAIT_FOR_INTERRUPT`] (the `sti; hlt; cli` runs in the #UD handler). The
//! kernel must be built without a red zone (`x86_64-unknown-none` is), because an interrupt at
//! CPL 0 pushes its frame right below `rsp`.
//!
//! # Entering CPL 3
//! [`run_user`]`(f, arg, user_stack_top)` saves the kernel's callee-saved registers and stack
//! pointer, `iretq`s to CPL 3 (interrupts disabled) into a trampoline that calls `f(arg)` on the
//! given stack, then issues [`service::RETURN_TO_KERNEL`] with the result; the handler restores
//! the saved kernel context and `run_user` returns the result. [`run_user_with`] does the same
//! for a closure.
//!
//! At CPL 3 the code can use everything of `guest-pv` that only needs port I/O or memory:
//! hypercalls, the consoles, the markers and the exit port, and a panic handler that prints and
//! exits. It needs the page tables to allow user access (pvkit's boot tables set the U bit at
//! every level). It cannot use privileged instructions (`hlt`, CR or MSR access, `lgdt`, …):
//! those raise #GP, which is fatal.
//!
//! # Example
//! ```no_run
//! use guest_pv::cpu;
//!
//! fn on_fault(fault: &cpu::Fault) -> ! {
//!     // A real kernel prints `fault` and ends the VM here.
//!     guest_pv::halt_forever()
//! }
//!
//! extern "C" fn work(n: u64) -> u64 {
//!     // Runs at CPL 3, natively.
//!     let sum = (0..n).fold(0u64, |s, i| s.wrapping_add(i * i));
//!     cpu::flush_tlb(); // a kernel service (an exception round trip)
//!     sum
//! }
//!
//! #[repr(C, align(16))]
//! struct Stack([u8; 64 * 1024]);
//! static mut USER_STACK: Stack = Stack([0; 64 * 1024]);
//!
//! # fn kernel() {
//! // SAFETY: CPL 0 at boot, interrupts disabled, nothing relies on the boot GDT/IDT.
//! unsafe { cpu::init(on_fault) };
//! let top = (&raw mut USER_STACK).addr() as u64 + 64 * 1024;
//! // SAFETY: after `init`, at CPL 0; the stack is ours alone, mapped user-accessible.
//! let sum = unsafe { cpu::run_user(work, 1000, top) };
//! # let _ = sum;
//! # }
//! # fn main() {}
//! ```

/// Assembly shared by the exception and interrupt entries: save the caller-saved registers
/// (`rdi` pushed first, `r11` last — the order [`trap::TrapFrame`] describes), call
/// `{dispatch}` on a 16-byte aligned stack with `rdi` as set by the caller, and restore them.
macro_rules! call_with_scratch_saved {
    ($($before_call:literal),*) => {
        concat!(
            "push rdi\n", "push rsi\n", "push rdx\n", "push rcx\n", "push rax\n",
            "push r8\n", "push r9\n", "push r10\n", "push r11\n", "cld\n",
            $($before_call, "\n",)*
            // Align the stack for the call whatever the CPU did, keeping the old pointer.
            "mov rax, rsp\n", "and rsp, -16\n", "push rax\n", "sub rsp, 8\n",
            "call {dispatch}\n",
            "add rsp, 8\n", "pop rsp\n",
            "pop r11\n", "pop r10\n", "pop r9\n", "pop r8\n", "pop rax\n",
            "pop rcx\n", "pop rdx\n", "pop rsi\n", "pop rdi\n",
        )
    };
}

mod interrupt;
mod tables;
mod trap;

use core::cell::UnsafeCell;
use core::fmt;
use core::sync::atomic::Ordering;

use hypercall_abi::mmu::PTE_ADDR_MASK;
pub use interrupt::{FIRST_VECTOR, InterruptHook};
pub use tables::{KERNEL_CS, KERNEL_DS, TRAP_STACK_SIZE, TSS_SELECTOR, USER_CS, USER_DS};

/// Kernel service numbers (`rax` of a service call). Private to this runtime: not pvkit ABI.
pub mod service {
    /// Reload CR3 (flush the non-global TLB entries). Argument ignored.
    pub const FLUSH_TLB: u64 = 1;
    /// `invlpg` the canonical virtual address in the argument.
    pub const INVLPG: u64 = 2;
    /// Load CR3 with the argument (a page-aligned root with no bits outside bits 12..=51).
    pub const LOAD_CR3: u64 = 3;
    /// End the current [`super::run_user`]: it returns the argument. Only from CPL 3.
    pub const RETURN_TO_KERNEL: u64 = 4;
    /// `sti; hlt; cli` at CPL 0, then resume: [`super::wait_for_interrupt`] from CPL 3.
    /// Argument ignored.
    pub const WAIT_FOR_INTERRUPT: u64 = 5;
}

/// What the fatal hook is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// Why it is fatal.
    pub kind: FaultKind,
    /// Exception vector (0..=31).
    pub vector: u8,
    /// The error code the CPU pushed, or 0 for vectors without one.
    pub error_code: u64,
    /// RIP of the faulting instruction (for a service call: of the `ud2`).
    pub rip: u64,
    /// CS of the interrupted code (`cs & 3` is its privilege level).
    pub cs: u64,
    /// RFLAGS of the interrupted code.
    pub rflags: u64,
    /// RSP of the interrupted code.
    pub rsp: u64,
    /// CR2 (the faulting address), for a page fault only.
    pub cr2: Option<u64>,
}

/// Why a [`Fault`] is fatal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// A CPU exception that is not a service call.
    Exception,
    /// A service call with an unknown number.
    BadService {
        /// `rax`.
        number: u64,
        /// `rdi`.
        arg: u64,
    },
    /// A service call whose argument the service refuses (a CR3 value with bits outside
    /// bits 12..=51, a non-canonical `invlpg` address).
    BadServiceArgument {
        /// `rax`.
        number: u64,
        /// `rdi`.
        arg: u64,
    },
    /// [`service::RETURN_TO_KERNEL`] from CPL 0, or with no [`run_user`] active.
    ReturnOutsideRunUser,
    /// [`run_user`] called at CPL 3, before [`init`], or while another one is active.
    RunUserMisuse,
}

/// The short name of exception `vector`, e.g. `#PF page fault`.
pub const fn exception_name(vector: u8) -> &'static str {
    match vector {
        0 => "#DE divide error",
        1 => "#DB debug",
        2 => "NMI",
        3 => "#BP breakpoint",
        4 => "#OF overflow",
        5 => "#BR bound range exceeded",
        6 => "#UD invalid opcode",
        7 => "#NM device not available",
        8 => "#DF double fault",
        9 => "coprocessor segment overrun",
        10 => "#TS invalid TSS",
        11 => "#NP segment not present",
        12 => "#SS stack-segment fault",
        13 => "#GP general protection",
        14 => "#PF page fault",
        16 => "#MF x87 floating-point error",
        17 => "#AC alignment check",
        18 => "#MC machine check",
        19 => "#XM SIMD floating-point",
        20 => "#VE virtualization exception",
        21 => "#CP control protection",
        28 => "#HV hypervisor injection",
        29 => "#VC VMM communication",
        30 => "#SX security exception",
        _ => "reserved",
    }
}

impl fmt::Display for Fault {
    /// One line: what happened, then the interrupted state, e.g. `CPU exception 13 (#GP general
    /// protection): error code 0x0, rip 0x2034f1, cs 0x23, rflags 0x2, rsp 0x31fd8`, with
    /// `, cr2 0x…` appended for a page fault.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            FaultKind::Exception => write!(
                f,
                "CPU exception {} ({})",
                self.vector,
                exception_name(self.vector)
            )?,
            FaultKind::BadService { number, arg } => {
                write!(f, "unknown kernel service {number} (argument {arg:#x})")?
            }
            FaultKind::BadServiceArgument { number, arg } => {
                write!(f, "kernel service {number} refused argument {arg:#x}")?
            }
            FaultKind::ReturnOutsideRunUser => {
                f.write_str("kernel service RETURN_TO_KERNEL outside run_user")?
            }
            FaultKind::RunUserMisuse => {
                return f.write_str("run_user called at CPL 3, before init, or nested");
            }
        }
        write!(
            f,
            ": error code {:#x}, rip {:#x}, cs {:#x}, rflags {:#x}, rsp {:#x}",
            self.error_code, self.rip, self.cs, self.rflags, self.rsp
        )?;
        if let Some(cr2) = self.cr2 {
            write!(f, ", cr2 {cr2:#x}")?;
        }
        Ok(())
    }
}

/// What the kernel does with a fatal [`Fault`]: typically print it and end the VM. It runs at
/// CPL 0 on the trap stack (16 KiB; the double-fault stack, 4 KiB, for vector 8), with
/// interrupts disabled. A fault inside the hook stops the CPU (`hlt` loop).
pub type FatalHook = fn(&Fault) -> !;

/// A static that this runtime mutates with raw pointers only.
///
/// `Sync` is sound because pvkit guests run on one CPU, the runtime keeps interrupts disabled
/// outside [`wait_for_interrupt`] (and its interrupt handlers touch only atomics, never a
/// `Global`), and every access documents why nothing else touches the value at the same time.
#[derive(Debug)]
#[repr(transparent)]
pub(crate) struct Global<T>(UnsafeCell<T>);

// SAFETY: see the type's docs: one CPU, no interrupt handler touches a `Global`, and every
// access is a raw-pointer access justified at its site.
unsafe impl<T> Sync for Global<T> {}

impl<T> Global<T> {
    pub(crate) const fn new(value: T) -> Global<T> {
        Global(UnsafeCell::new(value))
    }

    pub(crate) const fn get(&self) -> *mut T {
        self.0.get()
    }
}

/// The hook [`init`] registered; written only by `init`.
static FATAL_HOOK: Global<Option<FatalHook>> = Global::new(None);

/// The registered hook, if [`init`] ran.
fn fatal_hook() -> Option<FatalHook> {
    // SAFETY: written only by `init`, at CPL 0 with interrupts disabled and before any code
    // that could fault into a handler reading it; one CPU, so no write is concurrent with this
    // read.
    unsafe { *FATAL_HOOK.get() }
}

/// Installs this runtime's GDT, TSS and IDT (see the [module docs](self)) and registers
/// `on_fault`, called for every fatal exception. Records the current CR3 as [`current_root`].
/// Calling it again reinstalls the same tables (and replaces the hook).
///
/// # Safety
/// - CPL 0 with interrupts disabled, on one CPU.
/// - Code, data and stacks are in flat segments (base 0) and reachable through the selectors
///   `0x08` (code) and `0x10` (data), like under pvkit's boot GDT; nothing relies on a previous
///   GDT, TSS or IDT afterwards.
pub unsafe fn init(on_fault: FatalHook) {
    // SAFETY: CPL 0, interrupts disabled, one CPU (the caller's contract): nothing else runs,
    // and no handler reads the hook until the IDT is installed below.
    unsafe { FATAL_HOOK.get().write(Some(on_fault)) };
    // SAFETY: the caller's contract is `install`'s; the stubs are this module's entry points.
    unsafe { tables::install(&trap::stub_addresses(), &interrupt::stub_addresses()) };
    // SAFETY: CPL 0 (the caller's contract).
    let cr3 = unsafe { trap::read_cr3() };
    trap::LOADED_ROOT.store(cr3 & PTE_ADDR_MASK, Ordering::Relaxed);
}

/// Interrupts of `vector` taken since boot (counted by this runtime's handlers; always 0 for
/// the exception vectors `0..32`).
pub fn interrupt_count(vector: u8) -> u64 {
    interrupt::count(vector)
}

/// Registers `hook`, called by the handler of every external interrupt after counting it (see
/// [`InterruptHook`] for where it runs); `None` removes it. Works before and after [`init`].
pub fn set_interrupt_hook(hook: Option<InterruptHook>) {
    interrupt::set_hook(hook);
}

/// Panics unless [`init`] has run (its IDT is then loaded, with a gate for every vector).
/// Enabling interrupts before that would take them through whatever IDT the loader left.
fn assert_initialised(what: &str) {
    assert!(fatal_hook().is_some(), "cpu::{what} before cpu::init");
}

/// `sti`: enables interrupts (IF = 1) until [`disable_interrupts`]. CPL 0 only (#GP, fatal,
/// at CPL 3).
///
/// # Panics
/// Before [`init`].
#[inline]
pub fn enable_interrupts() {
    assert_initialised("enable_interrupts");
    // SAFETY: `init` ran (checked), so its IDT, with a gate for every vector, is loaded (a
    // kernel that loads another IDT takes that responsibility in its own unsafe code). At CPL 3
    // `sti` raises #GP, reported as fatal, which is safe.
    unsafe { interrupt::sti() };
}

/// `cli`: disables interrupts (IF = 0), pvkit's boot state. CPL 0 only (#GP, fatal, at CPL 3).
#[inline]
pub fn disable_interrupts() {
    interrupt::cli();
}

/// `sti; hlt; cli` in one asm block: sleeps until an interrupt has been taken, then returns
/// with IF = 0. Call it with IF = 0 after checking the condition being waited for (see
/// [Interrupts](self#interrupts)): `sti` delays interrupts by one instruction, so a wake-up
/// cannot be taken between the check and the `hlt` and then be missed by it.
///
/// At CPL 3 (inside [`run_user`], where IF is always 0) it is the kernel service
/// [`service::WAIT_FOR_INTERRUPT`]: the #UD handler runs the same `sti; hlt; cli` at CPL 0 and
/// resumes the caller (the interrupt is taken on the trap stack, inside the handler). The
/// check-then-wait pattern holds the same way, since IF stays 0 from the check to the `sti`.
/// The service adds an exception round trip (~40 µs on pvkit's KVM) to the wait.
///
/// Under pvkit something must be able to wake the vCPU — the trapped timer running
/// ([`crate::trapped::timer_start`]) or an event outstanding
/// ([`crate::trapped::event_schedule`]) — or the VMM stops the VM (a `hlt` that nothing can
/// end). With IF = 1 on entry (against the pattern), an interrupt may be taken before the
/// `hlt`, which then waits for the next one.
///
/// # Panics
/// Before [`init`].
#[inline]
pub fn wait_for_interrupt() {
    assert_initialised("wait_for_interrupt");
    if cpl() == 0 {
        // SAFETY: as in `enable_interrupts`: `init` ran (checked), so every vector has a gate
        // in the loaded IDT; CPL 0 (checked), so `sti` does not fault.
        unsafe { interrupt::sti_hlt_cli() };
    } else {
        // SAFETY: `init` ran (checked), so its #UD handler performs the service; the service
        // has no precondition beyond `init`'s IDT (the handler's `sti` runs at CPL 0).
        unsafe { trap::service_call(service::WAIT_FOR_INTERRUPT, 0) };
    }
}

/// The current privilege level (0 = kernel, 3 = user), from the low bits of CS.
#[inline]
pub fn cpl() -> u8 {
    let cs: u16;
    // SAFETY: reading CS is allowed at every privilege level and has no side effect.
    unsafe {
        core::arch::asm!("mov {:x}, cs", out(reg) cs, options(nomem, nostack, preserves_flags));
    }
    (cs & 3) as u8
}

/// True if `va` is canonical (bits 63..=47 all equal).
pub const fn is_canonical(va: u64) -> bool {
    (((va << 16) as i64) >> 16) as u64 == va
}

/// Flushes the TLB (every non-global entry) by reloading CR3: directly at CPL 0, through the
/// [`service::FLUSH_TLB`] service call at CPL 3. Works the same at both levels.
///
/// At CPL 3 it needs [`init`] (without its #UD handler the `ud2` is just an invalid opcode).
#[inline]
pub fn flush_tlb() {
    if cpl() == 0 {
        // SAFETY: CPL 0 (checked).
        unsafe { trap::reload_cr3() };
    } else {
        // SAFETY: at CPL 3 this code was entered through `run_user`, which requires `init`;
        // flushing the TLB has no precondition.
        unsafe { trap::service_call(service::FLUSH_TLB, 0) };
    }
}

/// Invalidates the TLB entry of `va` (`invlpg`): directly at CPL 0, through the
/// [`service::INVLPG`] service call at CPL 3. A non-canonical `va` maps nothing, so nothing is
/// done for it.
///
/// At CPL 3 it needs [`init`], like [`flush_tlb`].
#[inline]
pub fn invlpg(va: u64) {
    if !is_canonical(va) {
        return;
    }
    if cpl() == 0 {
        // SAFETY: CPL 0 (checked), canonical address (checked).
        unsafe { trap::invlpg(va) };
    } else {
        // SAFETY: as in `flush_tlb`; the address is canonical (checked), so the service does
        // not refuse it.
        unsafe { trap::service_call(service::INVLPG, va) };
    }
}

/// Loads CR3 with `root` (which also flushes the TLB): directly at CPL 0, through the
/// [`service::LOAD_CR3`] service call at CPL 3. Records `root` as [`current_root`].
///
/// At CPL 3 it needs [`init`], like [`flush_tlb`]. A `root` with bits outside bits 12..=51 is
/// fatal at CPL 3 (the service refuses it) and ignored at CPL 0.
///
/// # Safety
/// `root` must be a valid page-table root (under pvkit: a pinned L4 frame, see
/// [`crate::mmu::AddressSpace`]) that maps all memory in use — the kernel's code, data and
/// stacks, and at CPL 3 the user code and stack — to the same physical memory, with the same
/// or more permissive rights, as the current one.
#[inline]
pub unsafe fn load_cr3(root: u64) {
    if root & !PTE_ADDR_MASK != 0 && cpl() == 0 {
        return;
    }
    if cpl() == 0 {
        // SAFETY: CPL 0 (checked), no reserved bits (checked above); the root maps everything
        // in use the same way (the caller's contract).
        unsafe { trap::write_cr3(root) };
    } else {
        // SAFETY: as in `flush_tlb`; the caller's contract is the service's (which also records
        // the root as `current_root`).
        unsafe { trap::service_call(service::LOAD_CR3, root) };
    }
}

/// The page-table root last loaded by [`init`] (the CR3 it found) or [`load_cr3`]. CR3 cannot be
/// read at CPL 3, so this is what this runtime knows; it is wrong if other code writes CR3.
pub fn current_root() -> u64 {
    trap::LOADED_ROOT.load(Ordering::Relaxed)
}

/// Runs `f(arg)` at CPL 3 on the stack below `user_stack_top` (rounded down to 16 bytes) and
/// returns its result. Interrupts stay disabled. See the [module docs](self) for how.
///
/// Misuse that can be detected — a call at CPL 3, before [`init`], or from inside another
/// `run_user` — is reported as [`FaultKind::RunUserMisuse`] to the fatal hook (or stops the CPU
/// before `init`).
///
/// # Safety
/// - [`init`] has run, and this is called at CPL 0, not from inside another `run_user`.
/// - `user_stack_top` is the top of memory that nothing else uses while `f` runs, large enough
///   for `f`, and mapped writable and user-accessible; `f`'s code and everything it touches is
///   mapped user-accessible (pvkit's boot tables allow user access everywhere).
/// - `f` does not rely on privileged instructions (they fault, fatally) and leaves CPL 3 only
///   through kernel services or by ending the VM.
pub unsafe fn run_user(f: extern "C" fn(u64) -> u64, arg: u64, user_stack_top: u64) -> u64 {
    if cpl() != 0 || fatal_hook().is_none() || trap::KERNEL_RSP.load(Ordering::Relaxed) != 0 {
        trap::report(&Fault {
            kind: FaultKind::RunUserMisuse,
            vector: 0,
            error_code: 0,
            rip: 0,
            cs: 0,
            rflags: 0,
            rsp: 0,
            cr2: None,
        });
    }
    // SAFETY: `init` ran (the hook is set), CPL 0 and no `run_user` active (all checked above);
    // the stack and `f` satisfy the caller's contract. `enter_user` returns (through
    // `resume_kernel`) with the callee-saved registers and stack pointer it saved, like a
    // normal call.
    unsafe { trap::enter_user(f as usize as u64, arg, user_stack_top) }
}

/// Runs the closure `f` at CPL 3 through [`run_user`] and returns its result.
///
/// # Safety
/// As for [`run_user`]; everything `f` captures or touches must be user-accessible (under
/// pvkit's boot identity map it is).
pub unsafe fn run_user_with<F: FnOnce() -> u64>(user_stack_top: u64, f: F) -> u64 {
    extern "C" fn trampoline<F: FnOnce() -> u64>(slot: u64) -> u64 {
        let slot = core::ptr::with_exposed_provenance_mut::<Option<F>>(slot as usize);
        // SAFETY: `slot` is the address of the `Option<F>` below, alive and not otherwise
        // borrowed for the whole `run_user` call (single CPU; the caller waits in `run_user`).
        match unsafe { (*slot).take() } {
            Some(f) => f(),
            None => 0,
        }
    }
    let mut slot = Some(f);
    let arg = (&raw mut slot).expose_provenance() as u64;
    // SAFETY: the caller's contract is `run_user`'s; `trampoline::<F>` is an `extern "C" fn(u64)
    // -> u64` that only takes the closure out of `slot`.
    unsafe { run_user(trampoline::<F>, arg, user_stack_top) }
}

#[cfg(test)]
mod tests {
    use std::format;

    use super::*;

    #[test]
    fn canonical_addresses() {
        assert!(is_canonical(0));
        assert!(is_canonical(0x0000_7fff_ffff_f000));
        assert!(is_canonical(0xffff_8000_0000_0000));
        assert!(!is_canonical(0x0000_8000_0000_0000));
        assert!(!is_canonical(0xfff0_0000_0000_0000));
    }

    #[test]
    fn fault_lines() {
        let mut f = Fault {
            kind: FaultKind::Exception,
            vector: 14,
            error_code: 4,
            rip: 0x20_1a3c,
            cs: 0x23,
            rflags: 0x2,
            rsp: 0x2_ffe8,
            cr2: Some(0x80_0000_0000),
        };
        assert_eq!(
            format!("{f}"),
            "CPU exception 14 (#PF page fault): error code 0x4, rip 0x201a3c, cs 0x23, \
             rflags 0x2, rsp 0x2ffe8, cr2 0x8000000000"
        );
        f.kind = FaultKind::BadService { number: 9, arg: 1 };
        f.vector = 6;
        f.error_code = 0;
        f.cr2 = None;
        assert_eq!(
            format!("{f}"),
            "unknown kernel service 9 (argument 0x1): error code 0x0, rip 0x201a3c, cs 0x23, \
             rflags 0x2, rsp 0x2ffe8"
        );
        assert_eq!(exception_name(13), "#GP general protection");
        assert_eq!(exception_name(15), "reserved");
    }
}
