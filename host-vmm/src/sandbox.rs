//! Seccomp sandboxing of the host threads: after setup, every thread that serves a guest runs
//! under an allowlist filter of the system calls its kind needs (built with `seccompiler`,
//! installed with [`seccompiler::apply_filter`] on that thread only, never TSYNC), and without
//! capabilities: [`apply`] first empties the thread's capability sets (they are per thread, so
//! the thread that built the VM keeps its own; `host-vmm/tests/seccomp.rs` checks the vCPU
//! thread's `CapEff` and `CapPrm` are 0 even when host-vmm runs as root).
//!
//! # Which thread gets which filter
//!
//! | kind | where it is installed | allowed beyond the [common set](#common-set) |
//! |---|---|---|
//! | [`ThreadKind::Vcpu`] | the `pvkit-vcpu` thread [`crate::vm::Vm::run`] starts | `ioctl` with KVM_RUN, KVM_INTERRUPT, KVM_GET/SET_REGS, KVM_GET/SET_SREGS, KVM_SET_USER_MEMORY_REGION (pool resync), KVM_SET_GUEST_DEBUG and KVM_SET_XSAVE (`--gdb`) only; `openat` read-only (`/proc/self/pagemap`); `pread64` (pagemap), `getrusage`, `prctl` PR_GET/SET_TIMERSLACK, `madvise` (+ MADV_REMOVE, MADV_POPULATE_WRITE: zero hints), `clone` of threads only (`CLONE_THREAD`; `clone3` answers ENOSYS so the C library falls back to `clone`), `fcntl` F_DUPFD_CLOEXEC (eventfd copies), `eventfd2`; for the threads it starts (device workers, event device, prepare): their thread start before their own filter is in (`rseq`, `set_robust_list`, `prctl` PR_SET_NAME), installing that filter (`prctl` PR_SET_NO_NEW_PRIVS, `seccomp` SECCOMP_SET_MODE_FILTER, `capset` dropping their capabilities), and their calls (the virtio row) |
//! | [`ThreadKind::VirtioWorker`] | each virtio device thread, at its start | `read` (queue eventfd), `lseek`, `pread64`, `pwrite64`, `readv`, `writev`, `preadv`, `pwritev`, `fsync`, `fdatasync` (the disk image) |
//! | [`ThreadKind::EventDevice`] | the `pvkit-event-dev` scheduler, at its start | nothing more (futex waits, clock, eventfd `write`) |
//! | [`ThreadKind::Prepare`] | the `pvkit-prepare` thread, at its start | `madvise` MADV_POPULATE_WRITE |
//! | [`ThreadKind::Timeout`] | the `pvkit-timeout` thread, at its start | nothing more (futex wait with deadline, the kick `tgkill`) |
//! | [`ThreadKind::Signals`] | `host-vmm run`'s `pvkit-signals` thread | `recvfrom`, `read`, `poll` (signal-hook's self-pipe) |
//!
//! ## Common set
//!
//! Every filter allows what the Rust runtime and the C library do in any thread: `futex`,
//! `write` (console and eventfds, panic messages, the report below), `mmap`, `munmap`,
//! `mremap`, `mprotect`, `brk`, `madvise` MADV_DONTNEED/MADV_FREE (allocator and thread-stack
//! release), `rt_sigprocmask`, `rt_sigreturn`, `sigaltstack`, `sched_yield`,
//! `sched_getaffinity`, `gettid`, `getpid`, `getrandom`, `clock_gettime`, `clock_nanosleep`,
//! `nanosleep`, `restart_syscall`, `close`, `fcntl` F_GETFD (debug builds check an fd before
//! closing it), `exit`, `exit_group`, and `tgkill` aimed at this process only (the stop kick
//! and `abort`).
//!
//! Threads a sandboxed thread starts inherit its filter (the kernel copies it at `clone`) and
//! then add their own: what a thread may do is the intersection of the two. That is why the
//! vCPU filter also holds the disk calls of the device threads it starts when the guest
//! activates a device.
//!
//! # A disallowed call
//!
//! The filters answer any other call with `SIGSYS` (`SECCOMP_RET_TRAP`). A handler, installed
//! once with the first filter, writes one line to stderr with async-signal-safe calls only and
//! ends the process with status [`VIOLATION_STATUS`] (159 = 128 + SIGSYS, what a shell shows for
//! a process killed by SIGSYS):
//!
//! ```text
//! host-vmm: seccomp: the vcpu thread made a system call its filter does not allow: 41 (socket); exiting with status 159 (run with --no-seccomp to debug)
//! ```
//!
//! Nothing is refused silently. A guest's exit code can also be 159; the line tells them apart.
//!
//! # Turning it off
//!
//! [`crate::config::VmConfig::seccomp`] (default on) decides per VM; `host-vmm run --no-seccomp`
//! and `host-vmm compare --no-seccomp` turn it off ([`disable_process_wide`] for `compare`).
//!
//! # What is not filtered
//!
//! The thread that calls [`crate::vm::Vm::run`] (the main thread for `host-vmm`, a test's
//! thread for library users) is left as it is: it builds VMs (opens `/dev/kvm` and the disk,
//! creates memory) and may build more after this one; the run itself moves to a dedicated
//! `pvkit-vcpu` thread, which ends with the run. A filter is permanent for its thread, so this
//! keeps library users' threads usable. Threads started before the run (a device worker
//! started by a state restore on the building thread) are not filtered. Neither is the
//! `pvkit-gdb` thread of `host-vmm run --gdb` ([`crate::gdb`]), like the API thread: it serves
//! one socket; what it does to the guest (registers, memory, `KVM_SET_GUEST_DEBUG`) runs on the
//! filtered vCPU thread.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::Once;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::Scope;

use kvm_bindings::{
    kvm_debugregs, kvm_interrupt, kvm_msrs, kvm_regs, kvm_sregs, kvm_userspace_memory_region,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};

use crate::error::{Error, Result};

/// The exit status of a process a filter stopped (128 + SIGSYS).
pub const VIOLATION_STATUS: i32 = 128 + libc::SIGSYS;

/// The kinds of host thread, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ThreadKind {
    /// Runs the guest: `KVM_RUN` and the exits it serves.
    Vcpu = 1,
    /// A virtio device's queue thread.
    VirtioWorker = 2,
    /// The event device's scheduler.
    EventDevice = 3,
    /// Populates guest RAM ahead of use (`MADV_POPULATE_WRITE`).
    Prepare = 4,
    /// Stops the run at its deadline.
    Timeout = 5,
    /// Turns SIGINT/SIGTERM into a stop.
    Signals = 6,
}

impl ThreadKind {
    /// The name used in the report of a disallowed call.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::VirtioWorker => "virtio device",
            ThreadKind::EventDevice => "event device",
            ThreadKind::Prepare => "prepare",
            ThreadKind::Timeout => "timeout",
            ThreadKind::Signals => "signals",
        }
    }

    fn from_u8(v: u8) -> Option<ThreadKind> {
        Some(match v {
            1 => ThreadKind::Vcpu,
            2 => ThreadKind::VirtioWorker,
            3 => ThreadKind::EventDevice,
            4 => ThreadKind::Prepare,
            5 => ThreadKind::Timeout,
            6 => ThreadKind::Signals,
            _ => return None,
        })
    }
}

thread_local! {
    /// The kind whose filter this thread runs under (0: none). Const-initialized and without
    /// a destructor, so the SIGSYS handler may read it.
    static KIND: Cell<u8> = const { Cell::new(0) };
}

static OFF: AtomicBool = AtomicBool::new(false);

/// Turns sandboxing off for every VM this process runs from now on (`compare --no-seccomp`).
pub fn disable_process_wide() {
    OFF.store(true, Ordering::Relaxed);
}

/// True if the calling thread runs under one of these filters. A spawn site captures it and
/// passes it to [`enter`] in the new thread.
pub fn inherit() -> bool {
    KIND.with(|k| k.get()) != 0
}

/// Installs `kind`'s filter on the calling thread if `enabled` (and not
/// [`disable_process_wide`]). Permanent for the thread.
pub fn apply(kind: ThreadKind, enabled: bool) -> Result<()> {
    if !enabled || OFF.load(Ordering::Relaxed) {
        return Ok(());
    }
    let err = |what: &str, e: seccompiler::Error| Error::Io {
        what: format!(
            "seccomp: cannot {what} the {} thread's filter (--no-seccomp runs without)",
            kind.name()
        ),
        source: std::io::Error::other(e),
    };
    let programs = programs(kind).map_err(|e| err("build", e))?;
    drop_capabilities().map_err(|source| Error::Io {
        what: format!("cannot drop the {} thread's capabilities", kind.name()),
        source,
    })?;
    install_handler();
    fix_malloc_arena_limit();
    // Set first: a trap in the filter's own install path would otherwise be unnamed.
    KIND.with(|k| k.set(kind as u8));
    for p in &programs {
        seccompiler::apply_filter(p).map_err(|e| err("install", e))?;
    }
    Ok(())
}

/// Empties the calling thread's effective, permitted and inheritable capability sets
/// (capabilities are per thread in Linux, so the thread that built the VM keeps its own). A
/// thread that serves the guest needs none: everything it opens was opened before, and
/// `/proc/self/pagemap` is open to any thread of the process. With an empty permitted set the
/// thread can never regain one, whatever uid it runs as.
fn drop_capabilities() -> std::io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capset(2) with a version-3 header (pid 0: the calling thread) reads the header
    // and two `Data` words from live, correctly laid out values; dropping capabilities is
    // always permitted. The result is checked.
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut Header, data.as_ptr()) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// [`apply`] on a thread with no error path: a failure is reported on stderr and the thread
/// goes on under the filter it inherited, if any.
pub fn enter(kind: ThreadKind, enabled: bool) {
    if let Err(e) = apply(kind, enabled) {
        eprintln!("host-vmm: warning: {e}");
    }
}

/// Runs `f` (the vCPU loop) on a new `pvkit-vcpu` thread of scope `s` under the vCPU filter,
/// and waits for it; without `enabled`, runs it on the calling thread. A panic in `f` goes on
/// in the caller.
pub fn run_vcpu<'scope, T: Send + 'scope>(
    s: &'scope Scope<'scope, '_>,
    enabled: bool,
    f: impl FnOnce() -> Result<T> + Send + 'scope,
) -> Result<T> {
    if !enabled || OFF.load(Ordering::Relaxed) {
        return f();
    }
    let thread = std::thread::Builder::new()
        .name("pvkit-vcpu".into())
        .spawn_scoped(s, move || {
            apply(ThreadKind::Vcpu, true)?;
            f()
        })
        .map_err(|source| Error::Io {
            what: "cannot start the vCPU thread".into(),
            source,
        })?;
    thread
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

type Rules = Vec<(i64, Vec<SeccompRule>)>;

fn cond(
    arg: u8,
    op: SeccompCmpOp,
    value: u64,
) -> std::result::Result<SeccompCondition, seccompiler::Error> {
    Ok(SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Dword,
        op,
        value,
    )?)
}

/// One rule per value: argument `arg` equals one of `values`.
fn one_of(arg: u8, values: &[u64]) -> std::result::Result<Vec<SeccompRule>, seccompiler::Error> {
    values
        .iter()
        .map(|&v| Ok(SeccompRule::new(vec![cond(arg, SeccompCmpOp::Eq, v)?])?))
        .collect()
}

/// An ioctl request number: `_IOC(dir, KVMIO, nr, size)`.
const fn kvm_ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (0xAE << 8) | nr
}
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

/// The vCPU thread's ioctls (the fds are not checked; the request numbers are).
pub const VCPU_IOCTLS: [(&str, u64); 14] = [
    ("KVM_RUN", kvm_ioc(0, 0x80, 0)),
    (
        "KVM_GET_REGS",
        kvm_ioc(IOC_READ, 0x81, size_of::<kvm_regs>()),
    ),
    (
        "KVM_SET_REGS",
        kvm_ioc(IOC_WRITE, 0x82, size_of::<kvm_regs>()),
    ),
    (
        "KVM_GET_SREGS",
        kvm_ioc(IOC_READ, 0x83, size_of::<kvm_sregs>()),
    ),
    (
        "KVM_SET_SREGS",
        kvm_ioc(IOC_WRITE, 0x84, size_of::<kvm_sregs>()),
    ),
    (
        "KVM_INTERRUPT",
        kvm_ioc(IOC_WRITE, 0x86, size_of::<kvm_interrupt>()),
    ),
    (
        "KVM_SET_USER_MEMORY_REGION",
        kvm_ioc(IOC_WRITE, 0x46, size_of::<kvm_userspace_memory_region>()),
    ),
    // Saving the vCPU's state while it is parked (`VcpuHandle::save_state`): reads only.
    (
        "KVM_GET_MSRS",
        kvm_ioc(IOC_READ | IOC_WRITE, 0x88, size_of::<kvm_msrs>()),
    ),
    (
        "KVM_GET_VCPU_EVENTS",
        kvm_ioc(IOC_READ, 0x9f, size_of::<kvm_vcpu_events>()),
    ),
    (
        "KVM_GET_DEBUGREGS",
        kvm_ioc(IOC_READ, 0xa1, size_of::<kvm_debugregs>()),
    ),
    (
        "KVM_GET_XSAVE",
        kvm_ioc(IOC_READ, 0xa4, size_of::<kvm_xsave>()),
    ),
    (
        "KVM_GET_XCRS",
        kvm_ioc(IOC_READ, 0xa6, size_of::<kvm_xcrs>()),
    ),
    // `host-vmm run --gdb`: x87/SSE register writes.
    (
        "KVM_SET_XSAVE",
        kvm_ioc(IOC_WRITE, 0xa5, size_of::<kvm_xsave>()),
    ),
    // `host-vmm run --gdb`: breakpoints and single-step, set between two exits
    // (`crate::gdb`).
    (
        "KVM_SET_GUEST_DEBUG",
        kvm_ioc(IOC_WRITE, 0x9b, size_of::<kvm_bindings::kvm_guest_debug>()),
    ),
];

/// What every thread needs (see the module docs), with the extra `madvise` advice `advice` and
/// `fcntl` commands `fcntl`.
fn common(advice: &[i32], fcntl: &[i32]) -> std::result::Result<Rules, seccompiler::Error> {
    let mut madvise = vec![libc::MADV_DONTNEED, libc::MADV_FREE];
    madvise.extend_from_slice(advice);
    let madvise: Vec<u64> = madvise.iter().map(|&a| a as u64).collect();
    let pid = std::process::id() as u64;
    let mut rules: Rules = [
        libc::SYS_futex,
        libc::SYS_write,
        libc::SYS_mmap,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_mprotect,
        libc::SYS_brk,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_sigaltstack,
        libc::SYS_sched_yield,
        libc::SYS_sched_getaffinity,
        libc::SYS_gettid,
        libc::SYS_getpid,
        libc::SYS_getrandom,
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        libc::SYS_restart_syscall,
        libc::SYS_close,
        libc::SYS_exit,
        libc::SYS_exit_group,
    ]
    .into_iter()
    .map(|nr| (nr, Vec::new()))
    .collect();
    rules.push((libc::SYS_madvise, one_of(2, &madvise)?));
    rules.push((libc::SYS_tgkill, one_of(0, &[pid])?));
    // F_GETFD: debug builds check that an fd is open before closing it.
    let mut fcntl: Vec<u64> = fcntl.iter().map(|&c| c as u64).collect();
    fcntl.push(libc::F_GETFD as u64);
    rules.push((libc::SYS_fcntl, one_of(1, &fcntl)?));
    Ok(rules)
}

/// The disk and eventfd calls of a virtio device thread.
const DEVICE_IO: [i64; 10] = [
    libc::SYS_read,
    libc::SYS_lseek,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
];

/// The rules of `kind`'s filter (the allowlist), merged per syscall.
pub fn rules(
    kind: ThreadKind,
) -> std::result::Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::Error> {
    let plain = |list: &[i64]| -> Rules { list.iter().map(|&nr| (nr, Vec::new())).collect() };
    let rules: Rules = match kind {
        ThreadKind::Vcpu => {
            let mut r = common(
                &[libc::MADV_REMOVE, libc::MADV_POPULATE_WRITE],
                &[libc::F_DUPFD_CLOEXEC],
            )?;
            r.extend(plain(&DEVICE_IO));
            r.extend(plain(&[
                libc::SYS_getrusage,
                libc::SYS_eventfd2,
                libc::SYS_clone3,
            ]));
            // What a new thread does before its own filter is in (the C library's and Rust's
            // thread start, under this filter): the signal mask is all blocked there, so a
            // refusal would kill the process without the report.
            r.extend(plain(&[libc::SYS_rseq, libc::SYS_set_robust_list]));
            // ... and their capability drop (with nothing permitted left, `capset` can only
            // keep the sets empty).
            r.extend(plain(&[libc::SYS_capset]));
            let ioctls: Vec<u64> = VCPU_IOCTLS.iter().map(|&(_, n)| n).collect();
            r.push((libc::SYS_ioctl, one_of(1, &ioctls)?));
            r.push((
                libc::SYS_prctl,
                one_of(
                    0,
                    &[
                        libc::PR_GET_TIMERSLACK as u64,
                        libc::PR_SET_TIMERSLACK as u64,
                        libc::PR_SET_NAME as u64,
                        libc::PR_SET_NO_NEW_PRIVS as u64,
                    ],
                )?,
            ));
            // The threads it starts add their own filter (only ever narrowing).
            r.push((
                libc::SYS_seccomp,
                one_of(0, &[libc::SECCOMP_SET_MODE_FILTER as u64])?,
            ));
            r.push((
                libc::SYS_openat,
                vec![SeccompRule::new(vec![cond(
                    2,
                    SeccompCmpOp::MaskedEq(libc::O_ACCMODE as u64 | libc::O_CREAT as u64),
                    libc::O_RDONLY as u64,
                )?])?],
            ));
            let thread = libc::CLONE_THREAD as u64;
            r.push((
                libc::SYS_clone,
                vec![SeccompRule::new(vec![cond(
                    0,
                    SeccompCmpOp::MaskedEq(thread),
                    thread,
                )?])?],
            ));
            r
        }
        ThreadKind::VirtioWorker => {
            let mut r = common(&[], &[])?;
            r.extend(plain(&DEVICE_IO));
            r
        }
        ThreadKind::EventDevice | ThreadKind::Timeout => common(&[], &[])?,
        ThreadKind::Prepare => common(&[libc::MADV_POPULATE_WRITE], &[])?,
        ThreadKind::Signals => {
            let mut r = common(&[], &[])?;
            r.extend(plain(&[libc::SYS_recvfrom, libc::SYS_read, libc::SYS_poll]));
            r
        }
    };
    let mut map = BTreeMap::new();
    for (nr, rs) in rules {
        let dup = map.insert(nr, rs);
        debug_assert!(dup.is_none(), "syscall {nr} listed twice for {kind:?}");
    }
    Ok(map)
}

/// The BPF programs of `kind`, in install order.
fn programs(kind: ThreadKind) -> std::result::Result<Vec<BpfProgram>, seccompiler::Error> {
    let mut out = Vec::new();
    if kind == ThreadKind::Vcpu {
        // clone3's flags sit in memory a filter cannot read: answer ENOSYS, so the C library
        // falls back to clone, whose flags the main filter checks (threads only). Installed
        // first: once the main filter is in, installing another (prctl, seccomp) is refused.
        let no_clone3: BpfProgram = SeccompFilter::new(
            [(libc::SYS_clone3, Vec::new())].into_iter().collect(),
            SeccompAction::Allow,
            SeccompAction::Errno(libc::ENOSYS as u32),
            std::env::consts::ARCH.try_into()?,
        )?
        .try_into()?;
        out.push(no_clone3);
    }
    let main: BpfProgram = SeccompFilter::new(
        rules(kind)?,
        SeccompAction::Trap,
        SeccompAction::Allow,
        std::env::consts::ARCH.try_into()?,
    )?
    .try_into()?;
    out.push(main);
    Ok(out)
}

/// The SIGSYS part of `siginfo_t` on x86-64 (`_sigsys` in the kernel's union).
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    _pad: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

/// Fixes glibc's limit on malloc arenas before any thread is filtered. glibc computes the limit
/// the first time a thread needs a new arena beyond the first 8, by counting the CPUs from
/// `/sys/devices/system/cpu/online` (an `openat`): with many VMs in one process (`fleet`,
/// `compare --workload density`) that thread can be a sandboxed one, and its filter kills the
/// process. A limit set with `mallopt(M_ARENA_MAX)` is used instead; this sets glibc's own
/// default (8 per CPU), counted here, before any filter is in.
fn fix_malloc_arena_limit() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        #[cfg(target_env = "gnu")]
        {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            let arenas = libc::c_int::try_from(8 * cpus).unwrap_or(libc::c_int::MAX);
            // SAFETY: mallopt only sets a malloc parameter; any value is accepted (glibc
            // clamps nothing here, and a failure leaves the default, returning 0).
            unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) };
        }
    });
}

fn install_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is valid (empty mask, no flags); the handler has the
        // three-argument SA_SIGINFO signature and only calls async-signal-safe functions.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigsys as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut());
        }
    });
}

/// A few calls by name, for the report.
fn syscall_name(nr: i64) -> &'static str {
    match nr {
        libc::SYS_socket => "socket",
        libc::SYS_connect => "connect",
        libc::SYS_execve => "execve",
        libc::SYS_execveat => "execveat",
        libc::SYS_open => "open",
        libc::SYS_openat => "openat",
        libc::SYS_ioctl => "ioctl",
        libc::SYS_clone => "clone",
        libc::SYS_fork => "fork",
        libc::SYS_vfork => "vfork",
        libc::SYS_ptrace => "ptrace",
        libc::SYS_kill => "kill",
        libc::SYS_prctl => "prctl",
        libc::SYS_madvise => "madvise",
        libc::SYS_mount => "mount",
        libc::SYS_unlink => "unlink",
        libc::SYS_unlinkat => "unlinkat",
        libc::SYS_fcntl => "fcntl",
        libc::SYS_read => "read",
        libc::SYS_pread64 => "pread64",
        libc::SYS_pwrite64 => "pwrite64",
        libc::SYS_getrusage => "getrusage",
        libc::SYS_tgkill => "tgkill",
        libc::SYS_capset => "capset",
        libc::SYS_setuid => "setuid",
        libc::SYS_newfstatat => "newfstatat",
        _ => "see the syscall table",
    }
}

/// Appends `s` to `buf` at `*at`, as far as it fits.
fn put(buf: &mut [u8], at: &mut usize, s: &[u8]) {
    for &b in s {
        if *at < buf.len() {
            buf[*at] = b;
            *at += 1;
        }
    }
}

fn put_num(buf: &mut [u8], at: &mut usize, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    put(buf, at, &digits[i..]);
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for SIGSYS, whose `_sigsys` member has the
    // layout of `SigsysInfo` on x86-64.
    let nr = unsafe { (*(info as *const SigsysInfo)).syscall };
    let kind = ThreadKind::from_u8(KIND.with(|k| k.get()));
    let mut buf = [0u8; 256];
    let mut at = 0;
    put(&mut buf, &mut at, b"host-vmm: seccomp: the ");
    put(
        &mut buf,
        &mut at,
        kind.map_or("unknown", |k| k.name()).as_bytes(),
    );
    put(
        &mut buf,
        &mut at,
        b" thread made a system call its filter does not allow: ",
    );
    put_num(&mut buf, &mut at, nr as u64);
    put(&mut buf, &mut at, b" (");
    put(&mut buf, &mut at, syscall_name(i64::from(nr)).as_bytes());
    put(&mut buf, &mut at, b"); exiting with status ");
    put_num(&mut buf, &mut at, VIOLATION_STATUS as u64);
    put(&mut buf, &mut at, b" (run with --no-seccomp to debug)\n");
    // SAFETY: write(2) and _exit(2) are async-signal-safe and allowed by every filter; `buf`
    // holds `at` initialized bytes.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), at);
        libc::_exit(VIOLATION_STATUS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_compiles() {
        for kind in (1..=6).filter_map(ThreadKind::from_u8) {
            let p = programs(kind).unwrap();
            assert!(!p.is_empty(), "{kind:?}");
        }
    }

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        let n = |name: &str| VCPU_IOCTLS.iter().find(|(s, _)| *s == name).unwrap().1;
        assert_eq!(n("KVM_RUN"), 0xAE80);
        assert_eq!(n("KVM_GET_REGS"), 0x8090_AE81);
        assert_eq!(n("KVM_SET_REGS"), 0x4090_AE82);
        assert_eq!(n("KVM_GET_SREGS"), 0x8138_AE83);
        assert_eq!(n("KVM_SET_SREGS"), 0x4138_AE84);
        assert_eq!(n("KVM_INTERRUPT"), 0x4004_AE86);
        assert_eq!(n("KVM_SET_USER_MEMORY_REGION"), 0x4020_AE46);
        assert_eq!(n("KVM_GET_MSRS"), 0xC008_AE88);
        assert_eq!(n("KVM_SET_GUEST_DEBUG"), 0x4048_AE9B);
        assert_eq!(n("KVM_GET_VCPU_EVENTS"), 0x8040_AE9F);
        assert_eq!(n("KVM_GET_DEBUGREGS"), 0x8080_AEA1);
        assert_eq!(n("KVM_GET_XSAVE"), 0x9000_AEA4);
        assert_eq!(n("KVM_SET_XSAVE"), 0x5000_AEA5);
        assert_eq!(n("KVM_GET_XCRS"), 0x8188_AEA6);
    }
}
