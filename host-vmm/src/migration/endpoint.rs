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
            } else {
                // A host name other than localhost (or a malformed address): refused without
                // resolving it, as it is not a loopback address.
                return Err(MigrationError::NotLoopback {
                    endpoint: whole.into(),
                });
            }
        };
        if !is_loopback(addr.ip()) {
            return Err(MigrationError::NotLoopback {
                endpoint: whole.into(),
            });
        }
        Ok(Endpoint::Tcp(addr))
    }

    /// Refuses a non-loopback TCP endpoint built directly rather than by [`Endpoint::parse`].
    fn check_loopback(&self) -> Result<()> {
        match self {
            Endpoint::Tcp(a) if !is_loopback(a.ip()) => Err(MigrationError::NotLoopback {
                endpoint: self.to_string(),
            }),
            _ => Ok(()),
        }
    }

    /// Listens here. A Unix path that exists is refused unless it is a socket nobody listens
    /// on (a stale socket, which is removed); the socket file is removed when the
    /// [`Listener`] drops. Whether an existing socket is live is found out by connecting to
    /// it, so a live listener there sees one connection that closes without a byte. TCP port
    /// 0 picks a free port ([`Listener::endpoint`] tells which).
    pub fn listen(&self) -> Result<Listener> {
        self.check_loopback()?;
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
                        // Nobody listens: a stale socket.
                        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                            std::fs::remove_file(path)
                                .map_err(io("cannot remove the stale socket"))?
                        }
                        Err(e) => return Err(io("cannot check the existing socket")(e)),
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
        self.check_loopback()?;
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

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use super::*;

    /// A fresh directory for this test's sockets, removed by the guard.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let p = std::env::temp_dir().join(format!("pvkit-mig-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn tcp(ip: impl Into<IpAddr>, port: u16) -> Endpoint {
        Endpoint::Tcp(SocketAddr::new(ip.into(), port))
    }

    #[test]
    fn parses_good_endpoints() {
        let v4 = Ipv4Addr::LOCALHOST;
        for (s, want) in [
            ("unix:/run/mig.sock", Endpoint::Unix("/run/mig.sock".into())),
            ("unix:mig.sock", Endpoint::Unix("mig.sock".into())),
            ("/tmp/x", Endpoint::Unix("/tmp/x".into())),
            ("./x.sock", Endpoint::Unix("./x.sock".into())),
            ("tcp:127.0.0.1:4000", tcp(v4, 4000)),
            ("127.0.0.1:4000", tcp(v4, 4000)),
            ("127.1.2.3:1", tcp(Ipv4Addr::new(127, 1, 2, 3), 1)),
            ("localhost:4000", tcp(v4, 4000)),
            ("tcp:LOCALHOST:0", tcp(v4, 0)),
            ("tcp:[::1]:5", tcp(Ipv6Addr::LOCALHOST, 5)),
            ("[::1]:5", tcp(Ipv6Addr::LOCALHOST, 5)),
        ] {
            let got = Endpoint::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(got, want, "{s}");
            // Display gives a string that parses back to the same endpoint.
            assert_eq!(got.to_string().parse::<Endpoint>().unwrap(), want);
        }
    }

    #[test]
    fn refuses_bad_endpoints() {
        for s in [
            "",
            "unix:",
            "mig.sock",
            "tcp:127.0.0.1",
            "127.0.0.1:99999",
            "127.0.0.1:",
            "tcp::4000",
            "::1:4000",
            "localhost:port",
        ] {
            match Endpoint::parse(s) {
                Err(e @ MigrationError::BadEndpoint { .. }) => {
                    assert!(e.to_string().contains("expected unix:PATH"), "{e}")
                }
                other => panic!("{s:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn refuses_non_loopback_tcp() {
        for s in [
            "tcp:10.0.0.1:4000",
            "0.0.0.0:4000",
            "192.168.1.2:22",
            "example.com:4000",
            "tcp:host:1",
            "[::]:4000",
            "tcp:[2001:db8::1]:4000",
            "[::ffff:10.0.0.1]:4000",
            "tcp:999.0.0.1:1",
        ] {
            match Endpoint::parse(s) {
                Err(e @ MigrationError::NotLoopback { .. }) => {
                    assert!(e.to_string().contains("unauthenticated"), "{e}")
                }
                other => panic!("{s:?}: {other:?}"),
            }
        }
        assert!(Endpoint::parse("[::ffff:127.0.0.1]:4000").is_ok());
        // Built directly, a non-loopback endpoint is refused all the same.
        let outside = tcp(Ipv4Addr::UNSPECIFIED, 0);
        assert!(matches!(
            outside.listen(),
            Err(MigrationError::NotLoopback { .. })
        ));
        assert!(matches!(
            tcp(Ipv4Addr::new(10, 0, 0, 1), 1).connect(Duration::from_millis(100)),
            Err(MigrationError::NotLoopback { .. })
        ));
    }

    #[test]
    fn unix_listener_removes_its_socket_and_refuses_other_files() {
        let dir = TempDir::new("unix");
        let path = dir.0.join("mig.sock");
        let ep = Endpoint::Unix(path.clone());
        {
            let l = ep.listen().unwrap();
            assert!(
                std::fs::symlink_metadata(&path)
                    .unwrap()
                    .file_type()
                    .is_socket()
            );
            let mut c = ep.connect(Duration::from_secs(1)).unwrap();
            let mut s = l.accept(Some(Duration::from_secs(5))).unwrap();
            c.write_all(b"hi").unwrap();
            let mut buf = [0; 2];
            s.read_exact(&mut buf).unwrap();
            assert_eq!(&buf, b"hi");
            // A second listener on a live socket is refused.
            let e = ep.listen().unwrap_err();
            assert!(
                e.to_string().contains("another process is listening"),
                "{e}"
            );
        }
        assert!(!path.exists(), "the socket file outlived its listener");

        // A stale socket (its listener gone without removing it) is replaced.
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        drop(ep.listen().unwrap());
        assert!(!path.exists());

        // A regular file is refused and left alone.
        std::fs::write(&path, b"precious").unwrap();
        let e = ep.listen().unwrap_err();
        assert!(e.to_string().contains("not a socket"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    }

    #[test]
    fn accept_times_out_without_a_peer() {
        let dir = TempDir::new("accept");
        let l = Endpoint::Unix(dir.0.join("s")).listen().unwrap();
        let t0 = Instant::now();
        let e = l.accept(Some(Duration::from_millis(150))).unwrap_err();
        assert!(t0.elapsed() >= Duration::from_millis(150));
        assert!(t0.elapsed() < Duration::from_secs(2));
        assert!(matches!(e, MigrationError::NoPeer { .. }), "{e}");
        assert!(e.to_string().contains("within 0.15 s"), "{e}");
    }

    #[test]
    fn tcp_listen_connect_and_clone() {
        let l = tcp(Ipv4Addr::LOCALHOST, 0).listen().unwrap();
        let Endpoint::Tcp(addr) = l.endpoint() else {
            panic!()
        };
        assert_ne!(addr.port(), 0);
        let mut c = l.endpoint().connect(Duration::from_secs(5)).unwrap();
        let s = l.accept(None).unwrap();
        let mut s2 = s.try_clone().unwrap();
        c.write_all(b"ping").unwrap();
        let mut buf = [0; 4];
        s2.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        // The timeout set on one handle applies to its clone; a silent peer is an error.
        s.set_io_timeout(Duration::from_millis(100)).unwrap();
        let e = s2.read(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(e.get_ref().unwrap().downcast_ref::<IoTimeout>().is_some());
        c.shutdown_write().unwrap();
        s.set_io_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(s2.read(&mut buf).unwrap(), 0);
    }

    #[test]
    fn connect_failures_say_what_to_check() {
        let dir = TempDir::new("connect");
        let e = Endpoint::Unix(dir.0.join("nobody"))
            .connect(Duration::from_millis(200))
            .unwrap_err();
        assert!(matches!(e, MigrationError::Io { .. }), "{e}");
        assert!(e.to_string().contains("host-vmm receive --listen"), "{e}");
        // A port nobody listens on (bound then released).
        let port = {
            let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
            l.local_addr().unwrap().port()
        };
        let e = tcp(Ipv4Addr::LOCALHOST, port)
            .connect(Duration::from_millis(500))
            .unwrap_err();
        assert!(matches!(e, MigrationError::Io { .. }), "{e}");
    }

    #[test]
    fn new_connections_have_a_timeout() {
        let (a, _b) = UnixStream::pair().unwrap();
        let c = Conn::from_unix(a).unwrap();
        assert_eq!(c.timeout(false), Some(DEFAULT_IO_TIMEOUT));
        assert_eq!(c.timeout(true), Some(DEFAULT_IO_TIMEOUT));
        assert!(c.set_io_timeout(Duration::ZERO).is_err());
    }
}
