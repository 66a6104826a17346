//! Why a `compare` run failed. Each failure says which run (`workload/mode`) and what went
//! wrong, in its own words: a VMM or KVM error keeps its own message, and a guest that exited
//! badly or printed no usable result is reported as that, not as a guest fault.

use crate::stop::StopReason;

/// Errors of [`run`](super::run).
#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    /// The VMM failed to build or run the VM (KVM, memory, the kernel image, a guest fault
    /// the vCPU loop saw, ...).
    #[error("{run}: {source}")]
    Vmm {
        /// The run, e.g. `null/pv`.
        run: String,
        /// What the VMM reported.
        #[source]
        source: crate::Error,
    },
    /// Host-side work of the harness failed (the scratch disk image, the host's own read).
    #[error(transparent)]
    Host(#[from] crate::Error),
    /// The guest ended the VM with a non-zero exit code.
    #[error("{run}: the guest exited with code {code}{detail}")]
    GuestExit {
        /// The run.
        run: String,
        /// Its exit code.
        code: u32,
        /// `: ` and the guest's panic line, if it printed one; else empty.
        detail: String,
    },
    /// The run was stopped before the guest exited (timeout or signal).
    #[error("{run}: stopped before the guest exited ({reason})")]
    Stopped {
        /// The run.
        run: String,
        /// Why.
        reason: StopReason,
    },
    /// A snapshot, restore or migration run went wrong (beyond the VMM's own errors).
    #[error("{run}: {why}")]
    Lifecycle {
        /// The run, e.g. `migrate/pv`.
        run: String,
        /// What went wrong.
        why: String,
    },
    /// The guest did not write both markers, so nothing was measured.
    #[error("{run}: no measured window (the guest did not write the begin and end markers)")]
    NoWindow {
        /// The run.
        run: String,
    },
    /// The guest printed no `PVKIT-RESULT` line.
    #[error("{run}: the guest printed no PVKIT-RESULT line")]
    NoResult {
        /// The run.
        run: String,
    },
    /// The result line lacks a field or has a malformed one.
    #[error("{run}: the PVKIT-RESULT line has no valid '{field}' (got {got:?})")]
    BadResult {
        /// The run.
        run: String,
        /// The field (`ops`, `checksum`).
        field: &'static str,
        /// Its text, if present.
        got: Option<String>,
    },
    /// A floor run did not make exactly one exit of its kind per iteration.
    #[error(
        "{run}: expected {expected} exits, all of them {kind}, and exit code 0; saw exit code {code}, {saw}"
    )]
    FloorExits {
        /// The run.
        run: String,
        /// Iterations.
        expected: u64,
        /// `null hypercalls` or `null-port writes`.
        kind: &'static str,
        /// The exit code.
        code: u32,
        /// The window's exit summary.
        saw: String,
    },
}
