//! `compare --peer qemu`: the trapped runs that need no pvkit device, repeated under QEMU
//! (`-M microvm -kernel`, the kernel's PVH entry, no pvkit: trapped paths), so PV, pvkit
//! trapped and QEMU trapped sit side by side.
//!
//! QEMU has no marker window and reports no exit counts, so a peer row's `wall ms` is the
//! whole QEMU process, spawn to exit (boot included), `ns/op` divides it by the guest's ops, and
//! exits are left empty (shown as `-`). The checksum joins the fidelity check like any run.

use std::collections::BTreeMap;
use std::time::Duration;

use hypercall_abi::boot::Mode;

use super::error::CompareError;
use super::record::Record;
use super::result::GuestResult;
use super::workloads::{CompareOptions, Variant, mem_for, variants};
use crate::qemu;

/// The record `mode` of a QEMU row (`qemu`, or `qemu-<label>` for a labelled variant).
pub const PEER_MODE: &str = "qemu";
/// How long a QEMU run may take.
const TIMEOUT: Duration = Duration::from_secs(300);

/// The trapped variants of workload `w` that run under QEMU: those using only COM1, the exit
/// port, the markers (ignored there) and the TSC — not the null port, the trapped timer, the
/// page-table pool or virtio.
pub fn peer_variants(w: &str, opts: &CompareOptions) -> Vec<Variant> {
    variants(w, opts)
        .into_iter()
        .filter(|v| v.mode == Mode::Trapped)
        .filter(|v| match w {
            "console" | "zero" => true,
            "idle" => v.label == Some("spin"),
            _ => false,
        })
        .collect()
}

/// Runs [`peer_variants`] of `w` under QEMU; one record each.
pub fn qemu_rows(
    w: &str,
    opts: &CompareOptions,
    progress: &mut impl FnMut(&str, &str),
) -> Result<Vec<Record>, CompareError> {
    let vs = peer_variants(w, opts);
    if vs.is_empty() {
        return Ok(Vec::new());
    }
    let err = |why: String| CompareError::Lifecycle {
        run: format!("{w}/{PEER_MODE}"),
        why,
    };
    if !qemu::available() {
        return Err(err(format!(
            "{} does not run (install qemu-system-x86, or set PVKIT_QEMU)",
            qemu::binary().display()
        )));
    }
    let file = tempfile_with(&opts.kernel.bytes).map_err(|e| err(e.to_string()))?;
    let mut out = Vec::new();
    for v in vs {
        let mode = match v.label {
            Some(l) => format!("{PEER_MODE}-{l}"),
            None => PEER_MODE.to_string(),
        };
        progress(w, &format!("{mode} {}", v.args.join(" ")));
        let mem_mib = mem_for(w, opts).div_ceil(1 << 20);
        let run = qemu::run(file.path(), &qemu::cmdline(w, &v.args), mem_mib, TIMEOUT)
            .map_err(|e| err(format!("cannot run QEMU: {e}")))?;
        let console = String::from_utf8_lossy(&run.console);
        if run.exit_code != Some(0) {
            return Err(err(format!(
                "QEMU exited with status {:?} (guest code {:?}); console: {}; stderr: {}",
                run.status,
                run.exit_code,
                console.trim_end(),
                run.stderr.trim_end()
            )));
        }
        let result = GuestResult::parse(&run.console)
            .ok_or_else(|| err(format!("no PVKIT-RESULT line in: {console}")))?;
        let ops = result.ops().unwrap_or(0);
        let wall_ns = run.wall.as_nanos() as u64;
        let mut extra: BTreeMap<String, u64> = result
            .extra_numbers()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        extra.insert("boot_to_exit_ns".into(), wall_ns);
        // The same kernel file, workload and RAM under host-vmm, whole process, trapped: the
        // boot-to-exit figure to hold QEMU's against.
        if let Some(binary) = &opts.binary {
            let mode = if v.mode == hypercall_abi::boot::Mode::Pv {
                "pv"
            } else {
                "trapped"
            };
            let started = std::time::Instant::now();
            let own = std::process::Command::new(binary)
                .arg("run")
                .arg(file.path())
                .args(["--mode", mode, "--workload", w])
                .args(["--mem", &format!("{mem_mib}M")])
                .arg("--")
                .args(&v.args)
                .output()
                .map_err(|e| err(format!("cannot run {}: {e}", binary.display())))?;
            let own_ns = started.elapsed().as_nanos() as u64;
            if !own.status.success() {
                return Err(err(format!(
                    "host-vmm exited with {}: {}",
                    own.status,
                    String::from_utf8_lossy(&own.stderr).trim_end()
                )));
            }
            extra.insert("host_vmm_boot_to_exit_ns".into(), own_ns);
        }
        let mut rec = Record::unwindowed(w, &mode, ops, wall_ns, result.checksum(), extra);
        // QEMU does not report exits: none are shown (not zero).
        rec.exits.clear();
        out.push(rec);
    }
    Ok(out)
}

/// A kernel file QEMU can open, removed on drop.
#[derive(Debug)]
struct TempKernel(std::path::PathBuf);

impl TempKernel {
    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempKernel {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn tempfile_with(bytes: &[u8]) -> std::io::Result<TempKernel> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        "pvkit-peer-{}-{}.elf",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&path, bytes)?;
    Ok(TempKernel(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_device_free_trapped_variants_go_to_qemu() {
        let opts = CompareOptions::default();
        assert_eq!(peer_variants("console", &opts).len(), 1);
        assert_eq!(peer_variants("zero", &opts).len(), 1);
        let idle = peer_variants("idle", &opts);
        assert_eq!(idle.len(), 1);
        assert_eq!(idle[0].label, Some("spin"));
        for w in ["null", "pagetable", "blk", "snapshot"] {
            assert!(peer_variants(w, &opts).is_empty(), "{w}");
        }
    }
}
