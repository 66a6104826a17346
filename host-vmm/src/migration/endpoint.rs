//! Where a migration stream goes: a Unix socket or a **loopback-only** TCP socket.
//!
//! Endpoint strings ([`Endpoint::parse`]):
//!
//! | string | endpoint |
//! |---|---|
//! | `unix:PATH` | the Unix socket `PATH` |
//! | `tcp:HOST:PORT` | TCP to `HOST:PORT` |
//! | a path containing `/` (`./mig.sock`, `/run/x`) | the Unix socket at that path |
//! | `HOST:PORT` | TCP to `HOST:PORT` |
//!
//! `HOST` is an IPv4 address in 127.0.0.0/8, `::1` (written `[::1]`), or `localhost` (taken
//! as 127.0.0.1, never resolved). **Any other TCP host is refused**: the migration stream is
//! neither authenticated nor encrypted, and whoever can connect to the destination can hand it
//! a VM to run (and whoever can listen can receive the guest's memory). To migrate between
//! machines, carry a Unix or loopback socket over an authenticated tunnel such as `ssh -L`.
//! A Unix socket's access is governed by the permissions of its directory.
//!
//! Connections ([`Conn`]) have read and write timeouts from the start
//! ([`DEFAULT_IO_TIMEOUT`], changed with [`Conn::set_io_timeout`]): a peer that stops
//! reading or writing turns into [`MigrationError::Stalled`], never a hang.

use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use super::wire::{IoTimeout, MigrationError, Result};

/// The read and write timeout of a new [`Conn`].
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(30);

/// How often a [`Listener::accept`] with a timeout checks for a connection.
const ACCEPT_POLL: Duration = Duration::from_millis(10);

/// A place to listen on or connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A Unix socket path.
    Unix(PathBuf),
    /// A loopback TCP address (the only kind [`Endpoint::parse`] accepts).
    Tcp(SocketAddr),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

impl FromStr for Endpoint {
    type Err = MigrationError;

    fn from_str(s: &str) -> Result<Endpoint> {
        Endpoint::parse(s)
    }
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        // `::ffff:127.x.y.z` is loopback too.
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

impl Endpoint {
    /// Parses an endpoint string (see the module documentation). Non-loopback TCP is refused
    /// with [`MigrationError::NotLoopback`].
    pub fn parse(s: &str) -> Result<Endpoint> {
        let bad = |why: &str| MigrationError::BadEndpoint {
            endpoint: s.into(),
            why: why.into(),
        };
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad("empty socket path"));
            }
            return Ok(Endpoint::Unix(path.into()));
        }
        if let Some(hp) = s.strip_prefix("tcp:") {
            return Endpoint::parse_tcp(s, hp);
        }
        if s.contains('/') {
            return Ok(Endpoint::Unix(s.into()));
        }
        if s.contains(':') {
            return Endpoint::parse_tcp(s, s);
        }
        Err(bad("neither a socket path nor HOST:PORT"))
    }

    fn parse_tcp(whole: &str, hp: &str) -> Result<Endpoint> {
        let bad = |why: String| MigrationError::BadEndpoint {
            endpoint: whole.into(),
            why,
        };
        let addr = if let Ok(a) = SocketAddr::from_str(hp) {
            a
        } else {
            let Some((host, port)) = hp.rsplit_once(':') else {
                return Err(bad("TCP needs HOST:PORT".into()));
            };
            let port: u16 = port
                .parse()
                .map_err(|_| bad(format!("bad port {port:?}")))?;
            if host.eq_ignore_ascii_case("localhost") {
                SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
            } else if host.contains(':') {
                return Err(bad("write an IPv6 address in brackets: [::1]:PORT".into()));
            } else if host.is_empty() {
                return Err(bad("empty host".into()));
            } else if host.parse::<IpAddr>().is_err() {
                // A host name other than localhost: refused without resolving it.
                return Err(MigrationError::NotLoopback {
                    endpoint: whole.into(),
                });
            } else {
                return Err(bad(format!("bad address {host:?}")));
            }
        };
        if !is_loopback(addr.ip()) {
            return Err(MigrationError::NotLoopback {
                endpoint: whole.into(),
            });
        }
        Ok(Endpoint::Tcp(addr))
    }

    /// Listens here. A Unix path that exists is refused unless it is a socket nobody listens
    /// on (a stale socket, which is removed); the socket file is removed when the
    /// [`Listener`] drops. TCP port 0 picks a free port ([`Listener::endpoint`] tells which).
    pub fn listen(&self) -> Result<Listener> {
        let io = |what: &str| {
            let what = format!("{what} {self}");
            move |source| MigrationError::Io { what, source }
        };
        match self {
            Endpoint::Unix(path) => {
                if let Ok(meta) = std::fs::symlink_metadata(path) {
                    if !meta.file_type().is_socket() {
                        return Err(MigrationError::Io {
                            what: format!("cannot listen on {self}"),
                            source: io::Error::new(
                                io::ErrorKind::AlreadyExists,
                                "the path exists and is not a socket; refusing to replace it",
                            ),
                        });
                    }
                    match UnixStream::connect(path) {
                        Ok(_) => {
                            return Err(MigrationError::Io {
                                what: format!("cannot listen on {self}"),
                                source: io::Error::new(
                                    io::ErrorKind::AddrInUse,
                                    "another process is listening on this socket",
                                ),
                            });
                        }
                        Err(_) => std::fs::remove_file(path)
                            .map_err(io("cannot remove the stale socket"))?,
                    }
                }
                let listener = UnixListener::bind(path).map_err(io("cannot listen on"))?;
                let meta = std::fs::symlink_metadata(path).map_err(io("cannot stat"))?;
                Ok(Listener {
                    inner: ListenerInner::Unix(listener),
                    endpoint: self.clone(),
                    owned: Some((path.clone(), meta.dev(), meta.ino())),
                })
            }
            Endpoint::Tcp(addr) => {
                let listener = TcpListener::bind(addr).map_err(io("cannot listen on"))?;
                let local = listener.local_addr().map_err(io("cannot use"))?;
                Ok(Listener {
                    inner: ListenerInner::Tcp(listener),
                    endpoint: Endpoint::Tcp(local),
                    owned: None,
                })
            }
        }
    }

    /// Connects here, waiting at most `timeout` for TCP to connect (a Unix connect does not
    /// wait). The connection's I/O timeout is [`DEFAULT_IO_TIMEOUT`].
    pub fn connect(&self, timeout: Duration) -> Result<Conn> {
        let fail = |source: io::Error| {
            if matches!(
                source.kind(),
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
            ) {
                MigrationError::Stalled {
                    during: format!("connecting to {self}"),
                    waited: Some(timeout),
                }
            } else {
                MigrationError::Io {
                    what: format!(
                        "cannot connect to {self} (is `host-vmm receive --listen` running there?)"
                    ),
                    source,
                }
            }
        };
        match self {
            Endpoint::Unix(path) => Conn::from_unix(UnixStream::connect(path).map_err(fail)?),
            Endpoint::Tcp(addr) => {
                Conn::from_tcp(TcpStream::connect_timeout(addr, timeout).map_err(fail)?)
            }
        }
    }
}

#[derive(Debug)]
enum ListenerInner {
    Unix(UnixListener),
    Tcp(TcpListener),
}

/// A listening socket; a Unix one removes its socket file when dropped.
#[derive(Debug)]
pub struct Listener {
    inner: ListenerInner,
    endpoint: Endpoint,
    /// The socket file we created, with its device and inode: removed on drop only if it is
    /// still the same file.
    owned: Option<(PathBuf, u64, u64)>,
}

impl Listener {
    /// Where it listens (for TCP, with the actual port).
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Waits for one connection: forever with `None`, else at most `timeout`
    /// ([`MigrationError::NoPeer`] after it). The connection's I/O timeout is
    /// [`DEFAULT_IO_TIMEOUT`].
    pub fn accept(&self, timeout: Option<Duration>) -> Result<Conn> {
        let io = |what: &str| {
            let what = format!("{what} {}", self.endpoint);
            move |source| MigrationError::Io { what, source }
        };
        let accept_once = || -> io::Result<Conn> {
            match &self.inner {
                ListenerInner::Unix(l) => {
                    let (s, _) = l.accept()?;
                    s.set_nonblocking(false)?;
                    Conn::from_unix(s).map_err(io::Error::other)
                }
                ListenerInner::Tcp(l) => {
                    let (s, _) = l.accept()?;
                    s.set_nonblocking(false)?;
                    Conn::from_tcp(s).map_err(io::Error::other)
                }
            }
        };
        let set_nonblocking = |on: bool| match &self.inner {
            ListenerInner::Unix(l) => l.set_nonblocking(on),
            ListenerInner::Tcp(l) => l.set_nonblocking(on),
        };
        let Some(timeout) = timeout else {
            set_nonblocking(false).map_err(io("cannot use"))?;
            return accept_once().map_err(io("cannot accept on"));
        };
        set_nonblocking(true).map_err(io("cannot use"))?;
        let deadline = Instant::now() + timeout;
        loop {
            match accept_once() {
                Ok(c) => return Ok(c),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(MigrationError::NoPeer {
                            endpoint: self.endpoint.to_string(),
                            waited: timeout,
                        });
                    }
                    std::thread::sleep(ACCEPT_POLL.min(deadline - now));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io("cannot accept on")(e)),
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some((path, dev, ino)) = &self.owned {
            // Only our own socket: not one another listener put there after us.
            if std::fs::symlink_metadata(path).is_ok_and(|m| m.dev() == *dev && m.ino() == *ino) {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

#[derive(Debug)]
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

/// One migration connection: a Unix or TCP stream (TCP with `TCP_NODELAY`) with read and
/// write timeouts. Timed-out reads and writes fail with an [`io::Error`] of kind
/// [`io::ErrorKind::TimedOut`] carrying an [`IoTimeout`], which
/// [`MigrationError::from_io`] turns into [`MigrationError::Stalled`] saying how long it waited.
#[derive(Debug)]
pub struct Conn {
    stream: Stream,
}

impl Conn {
    /// Wraps a connected Unix stream and gives it [`DEFAULT_IO_TIMEOUT`].
    pub fn from_unix(s: UnixStream) -> Result<Conn> {
        let c = Conn {
            stream: Stream::Unix(s),
        };
        c.set_io_timeout(DEFAULT_IO_TIMEOUT)?;
        Ok(c)
    }

    /// Wraps a connected TCP stream, sets `TCP_NODELAY` and gives it [`DEFAULT_IO_TIMEOUT`].
    pub fn from_tcp(s: TcpStream) -> Result<Conn> {
        s.set_nodelay(true).map_err(|source| MigrationError::Io {
            what: "cannot set TCP_NODELAY on the migration connection".into(),
            source,
        })?;
        let c = Conn {
            stream: Stream::Tcp(s),
        };
        c.set_io_timeout(DEFAULT_IO_TIMEOUT)?;
        Ok(c)
    }

    /// Sets both the read and the write timeout (they apply to clones too: they share the
    /// socket). A zero timeout is refused. The timeout bounds each wait for progress, not a
    /// whole message.
    pub fn set_io_timeout(&self, timeout: Duration) -> Result<()> {
        let r = match &self.stream {
            Stream::Unix(s) => s
                .set_read_timeout(Some(timeout))
                .and_then(|()| s.set_write_timeout(Some(timeout))),
            Stream::Tcp(s) => s
                .set_read_timeout(Some(timeout))
                .and_then(|()| s.set_write_timeout(Some(timeout))),
        };
        r.map_err(|source| MigrationError::Io {
            what: format!("cannot set the migration connection's timeout to {timeout:?}"),
            source,
        })
    }

    /// A second handle on the same connection (e.g. one thread reads replies while another
    /// sends).
    pub fn try_clone(&self) -> Result<Conn> {
        let stream = match &self.stream {
            Stream::Unix(s) => s.try_clone().map(Stream::Unix),
            Stream::Tcp(s) => s.try_clone().map(Stream::Tcp),
        }
        .map_err(|source| MigrationError::Io {
            what: "cannot clone the migration connection".into(),
            source,
        })?;
        Ok(Conn { stream })
    }

    /// Shuts down the writing half: the peer reads EOF after what was sent.
    pub fn shutdown_write(&self) -> Result<()> {
        match &self.stream {
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Write),
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Write),
        }
        .map_err(|source| MigrationError::Io {
            what: "cannot shut down the migration connection".into(),
            source,
        })
    }

    /// The current timeout, for [`IoTimeout`].
    fn timeout(&self, write: bool) -> Option<Duration> {
        match (&self.stream, write) {
            (Stream::Unix(s), false) => s.read_timeout().ok().flatten(),
            (Stream::Unix(s), true) => s.write_timeout().ok().flatten(),
            (Stream::Tcp(s), false) => s.read_timeout().ok().flatten(),
            (Stream::Tcp(s), true) => s.write_timeout().ok().flatten(),
        }
    }

    fn stalled(&self, e: io::Error, write: bool) -> io::Error {
        match (e.kind(), self.timeout(write)) {
            (io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut, Some(t)) => {
                io::Error::new(io::ErrorKind::TimedOut, IoTimeout(t))
            }
            _ => e,
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.stream {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
        .map_err(|e| self.stalled(e, false))
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.stream {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
        .map_err(|e| self.stalled(e, true))
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match &mut self.stream {
            Stream::Unix(s) => s.write_vectored(bufs),
            Stream::Tcp(s) => s.write_vectored(bufs),
        }
        .map_err(|e| self.stalled(e, true))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Endpoint {
    /// The socket path of a Unix endpoint.
    pub fn unix_path(&self) -> Option<&Path> {
        match self {
            Endpoint::Unix(p) => Some(p),
            Endpoint::Tcp(_) => None,
        }
    }
}
