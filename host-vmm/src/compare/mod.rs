//! `host-vmm compare`: run each workload in each mode in one process, side by side.
//!
//! Numbers come only from what ran: the guest brackets the timed part with marker writes, the
//! host timestamps them, counts exits between them and reads its vCPU thread's CPU time.
//!
//! - [`workloads`]: the workloads, their default sizes and the runs of each ([`variants`]).
//! - [`run()`](run()): runs them, one VM per run, each [`measure`]d ([`window`]: the marker
//!   window; [`floor`]: the raw exit loops `null` is compared with; [`blk`]: the scratch disk
//!   and the host's own read).
//! - [`result`]: the guest's `PVKIT-RESULT` line; [`record`]: one [`Record`] per run, checked
//!   ([`CompareError`] says what failed) and the fidelity check across modes.
//! - [`lifecycle`]: `snapshot` and `migrate`: the same workload saved and restored, or
//!   live-migrated, PV against trapped.
//! - [`density`]: many idle VMs at once ([`crate::fleet`]), PV against trapped.
//! - [`peer`]: `--peer qemu`: the device-free trapped runs again under QEMU microvm.
//! - [`report`]: the table, its ratios and JSON; [`site`]: the report directory (JSON,
//!   Markdown, SVG charts, `index.html`).

pub mod blk;
pub mod density;
pub mod error;
pub mod floor;
pub mod lifecycle;
pub mod peer;
pub mod record;
pub mod report;
pub mod result;
mod run;
pub mod site;
pub mod window;
pub mod workloads;

pub use error::CompareError;
pub use floor::{FLOOR_WORKLOAD, Floor};
pub use record::{Record, fidelity_failures};
pub use report::{render_json, render_table};
pub use result::{GuestResult, RESULT_PREFIX};
pub use run::run;
pub use window::{Measured, START_GATE_TIMEOUT, StartGate, WindowRecorder, measure, measure_gated};
pub use workloads::*;
