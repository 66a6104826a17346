//! QEMU as a peer: runs a PVH kernel (the demo kernel, the template) under
//! `qemu-system-x86_64 -M microvm -accel kvm -kernel`, as an unmodified guest — no pvkit CPUID,
//! so guest-pv kernels take their trapped paths — and returns its console and exit code.
//!
//! The guest's console is COM1 (`-serial stdio`); its exit is pvkit's trapped exit port
//! ([`EXIT_PORT`]), which is QEMU's `isa-debug-exit` device there (one byte wide, so the
//! marker and null ports next to it stay unassigned): QEMU exits with `(code << 1) | 1`.
//! `-cpu qemu64,+invtsc,vmware-cpuid-freq=on` reports the TSC rate in CPUID leaf 0x40000010,
//! where guest-pv's `tsc::Tsc` looks for it.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hypercall_abi::ports::EXIT_PORT;

/// The QEMU binary: `$PVKIT_QEMU`, else `qemu-system-x86_64` on `PATH`.
pub fn binary() -> PathBuf {
    std::env::var_os("PVKIT_QEMU")
        .map(PathBuf::from)
        .unwrap_or_else(|| "qemu-system-x86_64".into())
}

/// True if [`binary`] runs (`--version`).
pub fn available() -> bool {
    Command::new(binary())
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// One QEMU run.
#[derive(Debug, Clone)]
pub struct QemuRun {
    /// What the guest wrote on COM1.
    pub console: Vec<u8>,
    /// The guest's exit code (through `isa-debug-exit`), `None` if QEMU ended otherwise.
    pub exit_code: Option<u32>,
    /// QEMU's exit status, as it was.
    pub status: Option<i32>,
    /// Whole process, spawn to exit.
    pub wall: Duration,
    /// QEMU's stderr (warnings, errors).
    pub stderr: String,
}

/// The arguments [`run`] passes.
pub fn args(kernel: &Path, cmdline: &str, mem_mib: u64) -> Vec<String> {
    [
        "-M",
        "microvm",
        "-cpu",
        "qemu64,+invtsc,vmware-cpuid-freq=on",
        "-accel",
        "kvm",
        "-m",
        &format!("{mem_mib}M"),
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
        "stdio",
        "-device",
        &format!("isa-debug-exit,iobase={EXIT_PORT:#x},iosize=1"),
        "-kernel",
        &kernel.display().to_string(),
        "-append",
        cmdline,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Runs `kernel` under QEMU microvm with `cmdline` and `mem_mib` MiB of RAM; kills it after
/// `timeout`.
pub fn run(
    kernel: &Path,
    cmdline: &str,
    mem_mib: u64,
    timeout: Duration,
) -> std::io::Result<QemuRun> {
    let start = Instant::now();
    let mut child = Command::new(binary())
        .args(args(kernel, cmdline, mem_mib))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stdout.read_to_end(&mut v);
        v
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            break child.wait()?;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let wall = start.elapsed();
    let console = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    let code = status.code();
    Ok(QemuRun {
        console,
        exit_code: code.filter(|c| c & 1 == 1).map(|c| (c >> 1) as u32),
        status: code,
        wall,
        stderr,
    })
}

/// The `-append` command line for a guest-pv kernel's PVH entry: `workload=NAME ARGS…`.
pub fn cmdline(workload: &str, args: &[String]) -> String {
    crate::pvh::cmdline(workload, &args.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_name_the_kernel_and_the_exit_device() {
        let a = args(Path::new("/k.elf"), "workload=null", 64);
        let joined = a.join(" ");
        assert!(joined.contains("-M microvm"), "{joined}");
        assert!(
            joined.contains("isa-debug-exit,iobase=0x501,iosize=1"),
            "{joined}"
        );
        assert!(
            joined.ends_with("-kernel /k.elf -append workload=null"),
            "{joined}"
        );
        assert_eq!(cmdline("zero", &["mib=16".into()]), "workload=zero mib=16");
    }
}
