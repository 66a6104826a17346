//! The control socket of a running VM (`host-vmm run --api-sock PATH`): one JSON request per
//! connection, one JSON line back.
//!
//! Requests (`{"op": ...}`):
//!
//! | request | what it does | answer beyond `"ok": true` |
//! |---|---|---|
//! | `{"op":"pause"}` | parks the vCPU at its next exit boundary | — |
//! | `{"op":"resume"}` | lets it run again | — |
//! | `{"op":"stats"}` | exit counts and console bytes so far (pauses for the read if running) | `"paused"`, `"exits"`, `"console_bytes"` |
//! | `{"op":"snapshot","dir":"PATH"}` | saves the VM to `PATH` ([`crate::snapshot`]); pauses for it if running | `"pages_written"`, `"pages_elided"` (`unbacked`, `free`, `zero`) |
//! | `{"op":"migrate","to":"ADDR"}` (optional `"max_rounds"`, `"downtime_ms"`, `"io_timeout_ms"`, `"on_failure"`: `"resume"` or `"pause"`) | live-migrates the VM to a `host-vmm receive` at `ADDR` ([`crate::migration::engine`]); on success this VM's run ends | `"report"`: rounds, bytes, downtime |
//!
//! A malformed, oversized (more than [`REQUEST_MAX`] bytes) or unknown request, or one that
//! fails, gets `{"ok": false, "error": "..."}`; the server carries on. A client that sends
//! nothing for [`CLIENT_TIMEOUT`] is dropped. Requests are served one at a time on the
//! `pvkit-api` thread, which ends with the run (it is not seccomp-filtered: it writes snapshot
//! files wherever asked, as the operator who owns the socket can).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::machine::Machine;
use crate::migration::endpoint::Endpoint;
use crate::migration::engine::{MigrateOptions, OnFailure, Source};
use crate::vm::VmHandle;

/// The longest request line accepted.
pub const REQUEST_MAX: u64 = 4096;
/// How long a client may take to send its request.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a request waits for the vCPU to reach an exit boundary.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

/// A running control socket; [`ApiServer::shutdown`] (or drop) ends it and removes the socket.
#[derive(Debug)]
pub struct ApiServer {
    path: PathBuf,
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Listens on `path` (refused if something exists there) and serves requests for the VM
    /// behind `source`.
    pub fn start(path: &Path, source: Arc<Source>) -> Result<ApiServer> {
        let listener = UnixListener::bind(path).map_err(|source| Error::Io {
            what: format!("cannot listen on the API socket {}", path.display()),
            source,
        })?;
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        let thread = std::thread::Builder::new()
            .name("pvkit-api".into())
            .spawn(move || serve(listener, &source, &flag))
            .map_err(|source| Error::Io {
                what: "cannot start the API thread".into(),
                source,
            })?;
        Ok(ApiServer {
            path: path.into(),
            done,
            thread: Some(thread),
        })
    }

    /// Stops serving, joins the thread and removes the socket file.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.done.store(true, Ordering::Release);
        // Wakes the blocking accept.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop();
        }
    }
}

fn serve(listener: UnixListener, source: &Source, done: &AtomicBool) {
    for conn in listener.incoming() {
        if done.load(Ordering::Acquire) {
            return;
        }
        let Ok(mut conn) = conn else { continue };
        let _ = conn.set_read_timeout(Some(CLIENT_TIMEOUT));
        let _ = conn.set_write_timeout(Some(CLIENT_TIMEOUT));
        let answer = match read_request(&conn) {
            Ok(req) => answer(&req, source),
            Err(why) => json!({"ok": false, "error": why}),
        };
        let _ = writeln!(conn, "{answer}");
    }
}

fn read_request(conn: &UnixStream) -> std::result::Result<Value, String> {
    let mut line = String::new();
    let mut reader = BufReader::new(conn.take(REQUEST_MAX + 1));
    reader
        .read_line(&mut line)
        .map_err(|e| format!("cannot read the request: {e}"))?;
    if line.len() as u64 > REQUEST_MAX {
        return Err(format!("request longer than {REQUEST_MAX} bytes"));
    }
    serde_json::from_str(line.trim()).map_err(|e| format!("malformed request: {e}"))
}

fn answer(req: &Value, source: &Source) -> Value {
    let (handle, cfg) = (source.handle(), source.config());
    let result = match req.get("op").and_then(Value::as_str) {
        Some("pause") => handle
            .vcpu()
            .pause(PAUSE_TIMEOUT)
            .map(|()| json!({}))
            .map_err(|e| e.to_string()),
        Some("resume") => {
            handle.vcpu().resume();
            Ok(json!({}))
        }
        Some("stats") => paused_for(handle, || {
            handle
                .vcpu()
                .with_parked(|m: &mut Machine| {
                    json!({
                        "exits": serde_json::to_value(m.stats()).unwrap_or(Value::Null),
                        "console_bytes": m.console().total(),
                    })
                })
                .map_err(|e| e.to_string())
        })
        .map(|(mut v, was_paused)| {
            v["paused"] = json!(was_paused);
            v
        }),
        Some("snapshot") => match req.get("dir").and_then(Value::as_str) {
            None => Err("snapshot needs \"dir\": a directory path".into()),
            Some(dir) => paused_for(handle, || {
                crate::snapshot::write(Path::new(dir), cfg, handle)
                    .map(|m| {
                        json!({
                            "pages_written": m.pages_written,
                            "pages_elided": m.elided,
                        })
                    })
                    .map_err(|e| e.to_string())
            })
            .map(|(v, _)| v),
        },
        Some("migrate") => migrate(req, source),
        Some(other) => Err(format!(
            "unknown op {other:?} (known: pause, resume, stats, snapshot, migrate)"
        )),
        None => Err("the request needs \"op\"".into()),
    };
    match result {
        Ok(mut v) => {
            v["ok"] = json!(true);
            v
        }
        Err(e) => json!({"ok": false, "error": e}),
    }
}

/// The `migrate` request: options from the request, the report as the answer.
fn migrate(req: &Value, source: &Source) -> std::result::Result<Value, String> {
    let to = req
        .get("to")
        .and_then(Value::as_str)
        .ok_or("migrate needs \"to\": the destination's address")?;
    let to = Endpoint::parse(to).map_err(|e| e.to_string())?;
    let mut opts = MigrateOptions::default();
    let number = |key: &str| -> std::result::Result<Option<u64>, String> {
        match req.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| format!("\"{key}\" must be a non-negative integer")),
        }
    };
    if let Some(n) = number("max_rounds")? {
        opts.max_rounds = u32::try_from(n).map_err(|_| "\"max_rounds\" is too large")?;
    }
    if let Some(ms) = number("downtime_ms")? {
        opts.downtime_target = Duration::from_millis(ms);
    }
    if let Some(ms) = number("io_timeout_ms")? {
        if ms == 0 {
            return Err("\"io_timeout_ms\" must be positive".into());
        }
        opts.io_timeout = Duration::from_millis(ms);
    }
    match req.get("on_failure").map(|v| v.as_str()) {
        None => {}
        Some(Some("resume")) => opts.on_failure = OnFailure::Resume,
        Some(Some("pause")) => opts.on_failure = OnFailure::Pause,
        Some(_) => return Err("\"on_failure\" must be \"resume\" or \"pause\"".into()),
    }
    let report = source.migrate(&to, &opts).map_err(|e| e.to_string())?;
    Ok(json!({ "report": serde_json::to_value(&report).unwrap_or(Value::Null) }))
}

/// Runs `f` with the vCPU paused; pauses it first (and resumes it after) if it was running.
/// Returns what `f` returns and whether the vCPU was paused before.
fn paused_for<T>(
    handle: &VmHandle,
    f: impl FnOnce() -> std::result::Result<T, String>,
) -> std::result::Result<(T, bool), String> {
    let was_paused = handle.vcpu().is_paused();
    if !was_paused {
        handle
            .vcpu()
            .pause(PAUSE_TIMEOUT)
            .map_err(|e| e.to_string())?;
    }
    let out = f();
    if !was_paused {
        handle.vcpu().resume();
    }
    out.map(|v| (v, was_paused))
}

/// The client side (`host-vmm ctl`): sends `request` to the socket at `path` and returns the
/// answer line.
pub fn request(path: &Path, request: &Value) -> Result<Value> {
    let io = |what: &str| {
        let what = format!("{what} {}", path.display());
        move |source| Error::Io { what, source }
    };
    let mut conn = UnixStream::connect(path).map_err(io("cannot connect to"))?;
    conn.set_read_timeout(Some(PAUSE_TIMEOUT + Duration::from_secs(60)))
        .map_err(io("cannot use"))?;
    writeln!(conn, "{request}").map_err(io("cannot write to"))?;
    let mut line = String::new();
    BufReader::new(conn.take(1 << 20))
        .read_line(&mut line)
        .map_err(io("cannot read from"))?;
    serde_json::from_str(line.trim()).map_err(|e| Error::Io {
        what: format!("bad answer from {}", path.display()),
        source: std::io::Error::other(e),
    })
}
