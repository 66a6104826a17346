//! `null` (argument `ops`, default 100000): bare host round trips, timed as one tight loop with
//! no guest work per call but the call itself. Both loops are 3 instructions per call (`out`,
//! one register update, `loop`), so the two modes differ only by the port (see [`pv_loop`] and
//! [`trapped_loop`]): on pvkit's KVM every CPL 0 instruction is emulated (~250 ns, some 4 % of
//! an exit), so any extra instruction would show in the ratio.
//!
//! PV (the host offers `null`): `ops` `null(HYPERCALL_PORT)` hypercalls, each echo added up;
//! trapped: `ops` 32-bit writes of `i as u32` to the null port, `i` = `0..ops`.
//!
//! `sum` = `ops(ops-1)/2` mod 2⁶⁴ in both modes, reported only once the mode's own check
//! passed: PV, every status was 0 and the echoes add up to what `null` must echo; trapped, the
//! null port's write counter, read back after the end marker, equals `ops` (low 32 bits).
//! Checksum: FNV-1a over `ops` then `sum`, each as 8 little-endian bytes.

use core::arch::asm;

use guest_pv::Fnv1a;
use hypercall_abi::ports::NULL_PORT;
use hypercall_abi::{Call, HYPERCALL_PORT, features};

use super::{Env, Outcome, Workload};
use crate::args::Args;
use crate::platform::{marker_begin, marker_end, null_port_read};

pub const WORKLOAD: Workload = Workload {
    name: "null",
    keys: &["ops"],
    text_keys: &[],
    run,
};

const DEFAULT_OPS: u64 = 100_000;

fn run(env: &mut Env, args: &Args<'_>) -> Outcome {
    let ops = args.get_or("ops", DEFAULT_OPS);
    let sum = match env.platform.feature(features::NULL) {
        Some(_pv) => {
            marker_begin();
            // SAFETY: `feature` returned the host token, so detection proved a pvkit host that
            // offers `null`; this kernel runs at I/O privilege (CPL 0, or CPL 3 under the full
            // I/O bitmap of `init_cpu`).
            let (status, echoes) = unsafe { pv_loop(ops) };
            marker_end();
            let expected = pv_echo_sum(ops);
            if status != 0 || echoes != expected {
                panic!(
                    "null hypercalls: last status {status}, echoes sum to {echoes:#x}, \
                     expected status 0 and {expected:#x}"
                );
            }
            null_sum(ops)
        }
        None => {
            marker_begin();
            // SAFETY: a pvkit VM (this kernel runs only under host-vmm), at I/O privilege; the
            // null port only counts the writes.
            unsafe { trapped_loop(ops) };
            let sum = null_sum(ops);
            marker_end();
            let seen = null_port_read();
            // The host counts every write since boot; this loop made all of them.
            if seen != ops as u32 {
                panic!("null port counted {seen} writes, expected {}", ops as u32);
            }
            sum
        }
    };
    let mut h = Fnv1a::new();
    h.write_u64(ops);
    h.write_u64(sum);
    Outcome::new(ops, h.finish())
}

/// What [`pv_loop`]'s echoes add up to from a conforming host: `n` echoes of
/// `HYPERCALL_PORT`, wrapping.
fn pv_echo_sum(n: u64) -> u64 {
    n.wrapping_mul(u64::from(HYPERCALL_PORT))
}

/// Issues `n` back-to-back `null` hypercalls in one asm loop of 3 instructions per call, the
/// same count as the trapped twin's (`out dx, eax; inc eax; loop`), and returns the last status
/// (`rax`) and the wrapping sum of the echoed values (`rdx`). `n` = 0 issues none.
///
/// ```text
/// 2: out dx, eax        ; null(rdi = HYPERCALL_PORT): rax = status, rdx = echo
///    add sum, rdx
///    loop 2b            ; rcx counts the calls (the host ignores it: not an argument of null)
/// ```
///
/// The argument is the hypercall port itself, so the echo leaves `dx` holding the port and
/// `rax` holding status 0, the number of `null`: the next call needs no reload. A failed call
/// leaves its status in `rax` and (with the value 0 of an error) `dx` = 0, so every later `out`
/// goes to unclaimed port 0, which the host drops: the failure is neither repeated nor turned
/// into another call, and shows in the returned status and sum.
///
/// # Safety
/// The machine must be a pvkit VM that offers `null` (a host token from detection proves it)
/// and the code must have I/O privilege.
unsafe fn pv_loop(n: u64) -> (u64, u64) {
    if n == 0 {
        return (0, 0);
    }
    let mut status = u64::from(Call::Null.raw());
    let mut sum = 0u64;
    // SAFETY: the caller guarantees a pvkit VM with `null` at I/O privilege. Each `out` reaches
    // the host's hypercall handler, which for `null` touches no guest memory, writes only rax
    // and rdx (declared) and preserves every other register, including rcx, rdi and `sum`;
    // after a failure the `out`s go to port 0, which the host drops. `n` >= 1 (checked above),
    // so `loop` runs the body exactly `n` times. No stack; flags clobbered.
    unsafe {
        asm!(
            "2:",
            "out dx, eax",
            "add {sum}, rdx",
            "loop 2b",
            sum = inout(reg) sum,
            inout("rax") status,
            inout("rdx") u64::from(HYPERCALL_PORT) => _,
            inout("rcx") n => _,
            in("rdi") u64::from(HYPERCALL_PORT),
            options(nomem, nostack),
        );
    }
    (status, sum)
}

/// Writes `i as u32` to the null port for `i` = `0..n` in one asm loop of 3 instructions per
/// write: `out dx, eax`, `inc eax`, `loop` (`i` counts in `eax`, `rcx` counts the writes, `dx`
/// is loaded once, before the loop). `n` = 0 writes nothing.
///
/// # Safety
/// The machine must be a pvkit VM (whose null port only counts and latches each write) and the
/// code must have I/O privilege.
unsafe fn trapped_loop(n: u64) {
    if n == 0 {
        return;
    }
    // SAFETY: the caller guarantees a pvkit VM at I/O privilege, whose null port only counts
    // (and latches) each write and touches no guest memory or register. `n` >= 1 (checked
    // above), so `loop` runs the body exactly `n` times. No stack; rax, rcx (the counters) and
    // the flags are clobbered.
    unsafe {
        asm!(
            "2:",
            "out dx, eax",
            "inc eax",
            "loop 2b",
            inout("rcx") n => _,
            inout("rax") 0u64 => _,
            in("dx") NULL_PORT,
            options(nomem, nostack),
        );
    }
}

/// `0 + 1 + … + (n - 1)`, wrapping (i.e. `n(n-1)/2` mod 2⁶⁴): the sum both loops stand for.
const fn null_sum(n: u64) -> u64 {
    // Halve the even factor first, so the product never needs more than 64 bits before
    // wrapping.
    if n.is_multiple_of(2) {
        (n / 2).wrapping_mul(n.wrapping_sub(1))
    } else {
        n.wrapping_mul((n - 1) / 2)
    }
}
