//! `cpl3` (arguments `ops`, default 1000, and `fault`, default 0): the CPL 3 runtime of
//! `guest_pv::cpu`. Enters CPL 3 once and, between the markers (written from CPL 3), makes
//! `ops` `flush_tlb` kernel-service calls, each a #UD round trip to CPL 0. The same in both
//! modes (no hypercall is involved).
//!
//! Checksum, computed at CPL 3 and returned through `run_user`: FNV-1a over the privilege level
//! seen there (3), then `i` after the `i`-th flush for `i` = `0..ops`, each as 8 little-endian
//! bytes. `ops` = `ops`.
//!
//! `fault` = 1, 2 or 3 makes the CPL 3 code fault on purpose after the end marker — 1: `ud2`
//! outside the service stub (#UD, vector 6); 2: a read of the unmapped address
//! `0x80_0000_0000` (#PF, vector 14); 3: `hlt` (#GP, vector 13) — so tests can check that it
//! is reported as `PVKIT-PANIC: CPU exception …` with exit code 101.

use core::arch::asm;

use crate::args::Args;
use guest_pv::{Fnv1a, cpu};

use super::{Env, Outcome, Workload};
use crate::exit_code;
use crate::out::kprintln;
use crate::platform::{at_cpl3, marker_begin, marker_end};

pub const WORKLOAD: Workload = Workload {
    name: "cpl3",
    keys: &["ops", "fault"],
    text_keys: &[],
    run,
};

const DEFAULT_OPS: u64 = 1000;

/// An address no page table maps (L4 slot 1, left empty by pvkit's boot tables).
const UNMAPPED: u64 = 0x80_0000_0000;

fn run(env: &mut Env, args: &Args<'_>) -> Outcome {
    let ops = args.get_or("ops", DEFAULT_OPS);
    let fault = args.get_or("fault", 0);
    if fault > 3 {
        kprintln!(
            env.console,
            "error: workload '{}': fault={fault} (want 0 = none, 1 = #UD, 2 = #PF, 3 = #GP)",
            WORKLOAD.name
        );
        env.exit(exit_code::USAGE);
    }
    let checksum = at_cpl3(|| {
        let mut h = Fnv1a::new();
        h.write_u64(u64::from(cpu::cpl()));
        marker_begin();
        for i in 0..ops {
            cpu::flush_tlb();
            h.write_u64(i);
        }
        marker_end();
        fault_on_purpose(fault);
        h.finish()
    });
    assert_eq!(cpu::cpl(), 0, "run_user returned to CPL {}", cpu::cpl());
    Outcome::new(ops, checksum)
}

/// Raises the exception `fault` selects (nothing for 0).
fn fault_on_purpose(fault: u64) {
    match fault {
        // SAFETY: `ud2` raises #UD; the fatal-exception hook ends the VM, so nothing resumes
        // after it.
        1 => unsafe { asm!("ud2", options(nomem, nostack)) },
        // SAFETY: the read of an unmapped address raises #PF, fatal as above; no memory is
        // read.
        2 => unsafe {
            asm!("mov {tmp}, qword ptr [{addr}]", addr = in(reg) UNMAPPED, tmp = out(reg) _,
                 options(readonly, nostack))
        },
        // SAFETY: `hlt` at CPL 3 raises #GP, fatal as above.
        3 => unsafe { asm!("hlt", options(nomem, nostack)) },
        _ => {}
    }
}
