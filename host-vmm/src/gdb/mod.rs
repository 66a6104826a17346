//! A gdb stub: `host-vmm run KERNEL --gdb ADDR` lets gdb debug the guest kernel over the
//! Remote Serial Protocol (the `gdbstub` crate, with `gdbstub_arch`'s x86-64 target).
//!
//! # Threads
//!
//! [`GdbServer::start`] listens on ADDR (a loopback `HOST:PORT`, `tcp:HOST:PORT`, `unix:PATH`
//! or a path, as for migration: [`crate::migration::endpoint::Endpoint::parse`]), asks the vCPU
//! to park before its first entry, and starts a `pvkit-gdb` thread that waits for gdb and then
//! runs gdbstub's blocking event loop. That thread, like `host-vmm run`'s API thread, runs
//! **without a seccomp filter**: it accepts and serves a socket and spawns nothing. It touches
//! the guest only through the [`VcpuHandle`]: registers, and jobs run on the parked vCPU
//! thread for memory (so guest memory and the page-table pool are read and written by the vCPU
//! thread, under its filter, while the guest is stopped).
//!
//! The vCPU thread keeps a [`VcpuLink`] ([`crate::vm::Vm`]'s run loop): before each entry it
//! applies the debug settings gdb asked for (`KVM_SET_GUEST_DEBUG`, on the vCPU thread, which
//! its seccomp allowlist permits); a `KVM_EXIT_DEBUG` (breakpoint, watchpoint, single-step) or
//! a guest fault (triple fault, `hlt` with interrupts off, a hypercall in trapped mode) makes
//! it ask for a pause, tell the gdb thread, and park at its next pause point until gdb
//! continues or steps. The guest's exit is reported to gdb (`W`); a run that ends otherwise is
//! reported as terminated (`X`). A fault stops in the debugger; continuing from it ends the
//! run with that fault, as without a debugger.
//!
//! # Memory
//!
//! gdb's addresses are guest-virtual: the stub walks the guest's 4-level page tables from CR3
//! (tables in RAM or in the page-table pool, which is host memory of its own). `monitor phys
//! on` switches to guest-physical addresses. Pool frames can be read, not written (they change
//! only through the validator).
//!
//! # Registers
//!
//! `arch.rs`: gdbstub_arch's x86-64 registers plus `fs_base`/`gs_base`; x87/SSE come from the
//! vCPU's XSAVE area and go back to it (`KVM_GET_XSAVE` / `KVM_SET_XSAVE`).
//!
//! # CPL 3
//!
//! KVM's debug intercepts do not reach CPL 3 on pvkit's hosts; `user.rs` describes how the stub
//! catches the guest's own `#BP`/`#DB` delivery instead.
//!
//! A client that disconnects (or sends what gdbstub cannot parse) ends the session: the
//! breakpoints are removed, guest debugging is switched off and the guest runs on. `kill`
//! stops the VM (exit status 137).

mod arch;
mod target;
mod user;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use kvm_bindings::kvm_guest_debug;

use crate::error::{Error, Result};
use crate::machine::DebugExit;
use crate::migration::endpoint::Endpoint;
use crate::stop::Stopper;
use crate::sync::lock;
use crate::vcpu::{Vcpu, VcpuHandle};
use crate::vm::Vm;

pub use target::{GdbTarget, translate};

/// Why the vCPU stopped for the debugger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopEvent {
    /// `KVM_EXIT_DEBUG`.
    Debug(DebugExit),
    /// The guest cannot go on (the message says why); continuing ends the run.
    Fault(String),
}

/// What the vCPU thread tells the gdb thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestEvent {
    /// Parked (or about to park) for the debugger.
    Stopped(StopEvent),
    /// The guest exited with this code.
    Exited(u32),
    /// The run ended with a fault.
    Faulted(String),
}

/// The guest-debug settings gdb asked for, applied by the vCPU thread before its next entry.
#[derive(Debug, Clone, Copy, Default)]
pub struct DebugConfig {
    /// Bumped on every change.
    pub generation: u64,
    /// `KVM_GUESTDBG_*` flags.
    pub control: u32,
    /// DR0..DR3, unused, unused, DR6, DR7.
    pub debugreg: [u64; 8],
}

impl DebugConfig {
    fn to_kvm(self) -> kvm_guest_debug {
        let mut d = kvm_guest_debug {
            control: self.control,
            ..Default::default()
        };
        d.arch.debugreg = self.debugreg;
        d
    }
}

/// The run loop's end of the stub (see the module docs).
#[derive(Debug)]
pub struct VcpuLink {
    events: Sender<GuestEvent>,
    config: Arc<Mutex<DebugConfig>>,
    applied: u64,
    vcpu: VcpuHandle,
    /// The fault the debugger stopped at (the gdb thread may take it back: see
    /// [`GdbTarget`]'s `int3` handling).
    fault: Arc<Mutex<Option<String>>>,
}

impl VcpuLink {
    /// Applies changed debug settings (`KVM_SET_GUEST_DEBUG`) before the next entry.
    pub(crate) fn before_entry(&mut self, vcpu: &Vcpu) -> Result<()> {
        let config = *lock(&self.config);
        if config.generation != self.applied {
            vcpu.set_guest_debug(&config.to_kvm())?;
            self.applied = config.generation;
        }
        Ok(())
    }

    /// Whether gdb asked for a single-step.
    pub(crate) fn stepping(&self) -> bool {
        lock(&self.config).control & kvm_bindings::KVM_GUESTDBG_SINGLESTEP != 0
    }

    /// A single-step over an instruction that exited to the host (`in`, `out`, MMIO, `hlt`):
    /// KVM reports no debug exit for it and would run the next instruction too, so the step
    /// ends here, once KVM has finished the exit without running the guest.
    pub(crate) fn stepped_over_exit(&mut self, vcpu: &mut Vcpu) -> Result<()> {
        vcpu.complete_pending_io()?;
        let pc = vcpu.rip();
        self.stopped(StopEvent::Debug(DebugExit {
            exception: 1,
            pc,
            dr6: DR6_BS,
        }));
        Ok(())
    }

    /// Parks at the next pause point and tells the debugger why.
    pub(crate) fn stopped(&mut self, event: StopEvent) {
        self.vcpu.request_pause();
        let _ = self.events.send(GuestEvent::Stopped(event));
    }

    /// A fault: stops in the debugger; the resume ends the run ([`VcpuLink::take_fault`]).
    pub(crate) fn fault(&mut self, what: String) {
        *lock(&self.fault) = Some(what.clone());
        self.stopped(StopEvent::Fault(what));
    }

    /// The fault the debugger stopped at, once it resumed the guest (the run ends with it).
    pub(crate) fn take_fault(&mut self) -> Option<String> {
        let what = lock(&self.fault).take()?;
        let _ = self.events.send(GuestEvent::Faulted(what.clone()));
        Some(what)
    }

    /// The guest exited.
    pub(crate) fn exited(&self, code: u32) {
        let _ = self.events.send(GuestEvent::Exited(code));
    }
}

/// A running gdb stub ([`GdbServer::start`]).
#[derive(Debug)]
pub struct GdbServer {
    endpoint: Endpoint,
    thread: Option<JoinHandle<()>>,
    shutdown: Arc<AtomicBool>,
    conn: Arc<Mutex<Option<Shutdown>>>,
}

/// A clone of the session's socket, to shut it down from [`GdbServer::finish`].
#[derive(Debug)]
enum Shutdown {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

impl Shutdown {
    fn shutdown(&self) {
        let _ = match self {
            Shutdown::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Shutdown::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

enum Listener {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener, std::path::PathBuf),
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn io_error(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { what, source }
}

impl GdbServer {
    /// Listens on `addr`, attaches to `vm` (which then parks before its first instruction)
    /// and starts the `pvkit-gdb` thread, which waits for gdb. Call before running `vm`.
    pub fn start(addr: &str, vm: &mut Vm) -> Result<GdbServer> {
        let endpoint = Endpoint::parse(addr).map_err(|e| Error::Io {
            what: format!("bad --gdb address {addr:?}"),
            source: std::io::Error::other(e),
        })?;
        let (listener, endpoint) = match &endpoint {
            Endpoint::Tcp(a) => {
                let l = std::net::TcpListener::bind(a)
                    .map_err(io_error(format!("cannot listen for gdb on {endpoint}")))?;
                let local = l
                    .local_addr()
                    .map_err(io_error("cannot read the gdb socket's address".into()))?;
                (Listener::Tcp(l), Endpoint::Tcp(local))
            }
            Endpoint::Unix(p) => {
                let l = std::os::unix::net::UnixListener::bind(p)
                    .map_err(io_error(format!("cannot listen for gdb on {endpoint}")))?;
                (Listener::Unix(l, p.clone()), endpoint.clone())
            }
        };
        match &listener {
            Listener::Tcp(l) => l.set_nonblocking(true),
            Listener::Unix(l, _) => l.set_nonblocking(true),
        }
        .map_err(io_error("cannot use the gdb socket".into()))?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let config = Arc::new(Mutex::new(DebugConfig::default()));
        let fault = Arc::new(Mutex::new(None));
        let vcpu = vm.vcpu_handle();
        vm.attach_debugger(VcpuLink {
            events: tx,
            config: config.clone(),
            applied: 0,
            vcpu: vcpu.clone(),
            fault: fault.clone(),
        });
        // Parks before the first instruction, until gdb continues or steps.
        vcpu.request_pause();
        let shutdown = Arc::new(AtomicBool::new(false));
        let conn = Arc::new(Mutex::new(None));
        let session = Session {
            vcpu,
            stopper: vm.stopper(),
            events: rx,
            config,
            fault,
            shutdown: shutdown.clone(),
            conn: conn.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("pvkit-gdb".into())
            .spawn(move || session.serve(listener))
            .map_err(io_error("cannot start the gdb thread".into()))?;
        Ok(GdbServer {
            endpoint,
            thread: Some(thread),
            shutdown,
            conn,
        })
    }

    /// Where it listens (for TCP, with the actual port).
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// After the run: lets the session report the guest's end to gdb (for up to `grace`),
    /// then closes it and joins the thread.
    pub fn finish(mut self, grace: Duration) {
        let deadline = Instant::now() + grace;
        while self.thread.as_ref().is_some_and(|t| !t.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.shutdown.store(true, Ordering::Release);
        if let Some(c) = lock(&self.conn).as_ref() {
            c.shutdown();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The `pvkit-gdb` thread's state.
struct Session {
    vcpu: VcpuHandle,
    stopper: Stopper,
    events: Receiver<GuestEvent>,
    config: Arc<Mutex<DebugConfig>>,
    fault: Arc<Mutex<Option<String>>>,
    shutdown: Arc<AtomicBool>,
    conn: Arc<Mutex<Option<Shutdown>>>,
}

impl Session {
    fn serve(self, listener: Listener) {
        // Waits for gdb (the guest is parked before its first instruction meanwhile), or for
        // the run to end (a signal or the timeout stops a VM nobody attached to).
        let conn: Box<dyn gdbstub::conn::ConnectionExt<Error = std::io::Error>> = loop {
            if self.shutdown.load(Ordering::Acquire) || self.vcpu.is_ended() {
                return;
            }
            let accepted = match &listener {
                Listener::Tcp(l) => l.accept().and_then(|(s, _)| {
                    s.set_nonblocking(false)?;
                    s.set_nodelay(true)?;
                    s.set_write_timeout(Some(WRITE_TIMEOUT))?;
                    *lock(&self.conn) = Some(Shutdown::Tcp(s.try_clone()?));
                    Ok(Box::new(s) as Box<dyn gdbstub::conn::ConnectionExt<Error = _>>)
                }),
                Listener::Unix(l, _) => l.accept().and_then(|(s, _)| {
                    s.set_nonblocking(false)?;
                    s.set_write_timeout(Some(WRITE_TIMEOUT))?;
                    *lock(&self.conn) = Some(Shutdown::Unix(s.try_clone()?));
                    Ok(Box::new(s) as Box<dyn gdbstub::conn::ConnectionExt<Error = _>>)
                }),
            };
            match accepted {
                Ok(c) => break c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    eprintln!("host-vmm: gdb: cannot accept a connection: {e}");
                    self.vcpu.resume();
                    return;
                }
            }
        };
        drop(listener);
        eprintln!("host-vmm: gdb attached");
        let mut target = GdbTarget::new(self.vcpu.clone(), self.events, self.config, self.fault);
        if let Err(e) = self.vcpu.wait_paused(ATTACH_TIMEOUT) {
            eprintln!("host-vmm: gdb: the vCPU did not stop for the debugger: {e}");
            target.detach();
            return;
        }
        let stub = gdbstub::stub::GdbStub::new(conn);
        match stub.run_blocking::<target::EventLoop>(&mut target) {
            Ok(gdbstub::stub::DisconnectReason::Kill) => {
                eprintln!("host-vmm: gdb: killed the VM");
                target.detach();
                self.stopper
                    .stop(crate::stop::StopReason::Signal(libc::SIGKILL));
            }
            Ok(gdbstub::stub::DisconnectReason::Disconnect) => {
                eprintln!("host-vmm: gdb detached; the guest runs on");
                target.detach();
            }
            Ok(reason) => {
                eprintln!("host-vmm: gdb session over: the run ended ({reason:?})");
                target.detach();
            }
            Err(e) => {
                eprintln!("host-vmm: gdb session ended: {e}; the guest runs on");
                target.detach();
            }
        }
        lock(&self.conn).take();
    }
}

/// DR6.BS: the debug exception was a single-step.
const DR6_BS: u64 = 1 << 14;

/// How long a write to gdb may block before the session is ended.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the vCPU may take to park for a new session.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(10);
