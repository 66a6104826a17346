//! Ending the VM: the `exit` hypercall, and the mode-dependent [`exit`] helper.

use hypercall_abi::boot::Mode;
use hypercall_abi::request::Request;

use crate::{HypercallError, Pvkit, trapped};

impl Pvkit {
    /// Ends the VM with exit `code` through the `exit` hypercall.
    ///
    /// If the host answers instead of ending the VM (it lacks
    /// [`hypercall_abi::features::EXIT`], say), halts forever (see [`halt_forever`]).
    pub fn exit(&self, code: u32) -> ! {
        let _ = self.try_exit(code);
        halt_forever()
    }

    /// Issues the `exit` hypercall. It returns only if the host did not end the VM: normally with
    /// the host's refusal, `Ok` only from a host that breaks the ABI.
    pub fn try_exit(&self, code: u32) -> Result<u64, HypercallError> {
        self.request(Request::Exit { code })
    }
}

/// Ends the VM the way `mode` asks for: the `exit` hypercall in [`Mode::Pv`] (when `pv` is
/// `Some` and offers [`features::EXIT`](hypercall_abi::features::EXIT)), otherwise the trapped exit port ([`trapped::exit_port`]).
///
/// In `Pv` mode, if the host refuses the hypercall, falls back to the exit port (safe: `pv`
/// proves the machine is a pvkit VM).
///
/// # Safety
/// When it falls back to the exit port with `pv == None`, the caller must guarantee the machine
/// is a pvkit VM, as [`trapped::exit_port`] requires.
pub unsafe fn exit(mode: Mode, pv: Option<Pvkit>, code: u32) -> ! {
    if let (Mode::Pv, Some(pv)) = (mode, pv)
        && pv.has(hypercall_abi::features::EXIT)
    {
        let _ = pv.try_exit(code);
    }
    // SAFETY: either `pv` proves this is a pvkit VM, or the caller guarantees it (this
    // function's contract); pvkit emulates the exit port.
    unsafe { trapped::exit_port(code) }
}

/// Stops the CPU for good: `hlt` in a loop (with interrupts disabled, as at pvkit's entry, the
/// first `hlt` never returns; under a VMM it is a `hlt` exit). At CPL 3, where `hlt` faults, it
/// spins instead.
pub fn halt_forever() -> ! {
    if crate::cpu::cpl() != 0 {
        loop {
            core::hint::spin_loop();
        }
    }
    loop {
        x86_64::instructions::hlt();
    }
}
