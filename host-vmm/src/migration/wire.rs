//! The migration wire format: framed, checksummed messages.
//!
//! Every message is one frame:
//!
//! ```text
//! [tag: u8][len: u32 LE][payload: len bytes][crc32: u32 LE]
//! ```
//!
//! where the CRC-32 (IEEE, as `crc32fast` computes it) covers the tag, the four length bytes
//! and the payload. A reader checks the tag and refuses a length above that tag's maximum
//! ([`Message`] lists them) **before** allocating anything, then reads the payload and the CRC,
//! and decodes the payload only when the CRC matches. Integers are little-endian.
//!
//! Nothing read is trusted: a stream that ends, stalls, has a bad CRC, an unknown tag, an
//! oversized or malformed payload, or (through [`Receiver`]) pages outside the guest's RAM
//! gives a [`MigrationError`], never a panic. After any error the stream is out of step and
//! the connection must be dropped.

use std::io::{self, IoSlice, Read, Write};
use std::time::Duration;

/// The first eight bytes of a [`Message::Hello`] payload.
pub const MAGIC: [u8; 8] = *b"PVKITMIG";
/// The wire format version this host-vmm speaks.
pub const WIRE_VERSION: u32 = 1;
/// The page size of [`Message::Pages`] and [`Message::Zeros`].
pub const PAGE_SIZE: usize = 4096;
/// The most pages one [`Message::Pages`] carries.
pub const PAGES_MAX_PER_MESSAGE: usize = 512;

/// Largest [`Message::Config`] payload.
pub const CONFIG_MAX: u32 = 1 << 20;
/// Largest [`Message::Kernel`] payload.
pub const KERNEL_MAX: u32 = 64 << 20;
/// Largest [`Message::State`] payload.
pub const STATE_MAX: u32 = 16 << 20;
/// Largest [`Message::Error`] payload (UTF-8 bytes).
pub const ERROR_MAX: u32 = 4096;
/// Largest [`Message::Pages`] payload: the first page number and the pages.
pub const PAGES_PAYLOAD_MAX: u32 = 8 + (PAGES_MAX_PER_MESSAGE * PAGE_SIZE) as u32;

/// Bytes of framing around a payload: tag, length and CRC.
pub const FRAME_OVERHEAD: u64 = 1 + 4 + 4;

const HELLO_LEN: u32 = 8 + 4 + 8;

/// Frame tags. Tag 0 is never valid.
mod tag {
    pub const HELLO: u8 = 1;
    pub const CONFIG: u8 = 2;
    pub const KERNEL: u8 = 3;
    pub const PAGES: u8 = 4;
    pub const ZEROS: u8 = 5;
    pub const ROUND_END: u8 = 6;
    pub const STATE: u8 = 7;
    pub const DONE: u8 = 8;
    pub const ACK: u8 = 9;
    pub const RESUMED: u8 = 10;
    pub const ERROR: u8 = 11;
}

/// Everything that can go wrong on a migration connection.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The peer closed the connection (EOF, broken pipe, reset).
    #[error("migration peer closed the connection during {during}")]
    Closed {
        /// What we were doing.
        during: String,
    },
    /// The peer sent (or accepted) nothing within the connection's I/O timeout.
    #[error("migration peer stalled: nothing for {} during {during}", wait_text(.waited))]
    Stalled {
        /// What we were doing.
        during: String,
        /// The timeout that expired, when known.
        waited: Option<Duration>,
    },
    /// The stream is not a valid migration stream.
    #[error("migration stream corrupt: {0}")]
    Corrupt(String),
    /// A frame's CRC-32 does not match its contents.
    #[error(
        "migration stream corrupt: CRC-32 mismatch in a {message} message (computed \
         {computed:#010x}, sent {sent:#010x})"
    )]
    Checksum {
        /// The message the frame's tag names.
        message: &'static str,
        /// The CRC of what arrived.
        computed: u32,
        /// The CRC the frame carries.
        sent: u32,
    },
    /// The peer speaks another wire version.
    #[error("migration stream version {peer}, this host-vmm speaks {ours}")]
    Version {
        /// The peer's version.
        peer: u32,
        /// [`WIRE_VERSION`].
        ours: u32,
    },
    /// Pages or zeros outside the guest's RAM.
    #[error(
        "migration stream corrupt: {message} for pages {first_page}+{count} lie outside the \
         guest's {ram_size} bytes of RAM"
    )]
    BeyondRam {
        /// `Pages` or `Zeros`.
        message: &'static str,
        /// First page number.
        first_page: u64,
        /// Number of pages.
        count: u64,
        /// The RAM size from the handshake.
        ram_size: u64,
    },
    /// The peer sent a valid message that is wrong at this point of the protocol.
    #[error("migration protocol error: expected {expected}, got {got}")]
    Unexpected {
        /// What the protocol allows here.
        expected: String,
        /// The message's name.
        got: &'static str,
    },
    /// The peer reported an error ([`Message::Error`]).
    #[error("migration peer reported an error: {0}")]
    Peer(String),
    /// We were asked to send something the format cannot carry (a bug in the caller).
    #[error("refusing to send an invalid migration message: {0}")]
    Unsendable(String),
    /// An endpoint string that cannot be parsed.
    #[error(
        "invalid migration endpoint {endpoint:?}: {why} (expected unix:PATH, tcp:HOST:PORT, a \
         path containing '/', or HOST:PORT)"
    )]
    BadEndpoint {
        /// What was given.
        endpoint: String,
        /// What is wrong with it.
        why: String,
    },
    /// A TCP endpoint that is not loopback.
    #[error(
        "refusing migration endpoint {endpoint:?}: the migration stream is unauthenticated and \
         unencrypted, so TCP is only allowed on loopback (127.0.0.0/8, ::1, localhost); use a \
         unix: socket, or carry it between hosts over an authenticated tunnel (e.g. ssh -L)"
    )]
    NotLoopback {
        /// What was given.
        endpoint: String,
    },
    /// Nobody connected to a listener in time.
    #[error("no migration peer connected to {endpoint} within {}", wait_text(&Some(*.waited)))]
    NoPeer {
        /// The listening endpoint.
        endpoint: String,
        /// The accept timeout.
        waited: Duration,
    },
    /// Any other I/O error.
    #[error("{what}: {source}")]
    Io {
        /// What we were doing.
        what: String,
        /// Why it failed.
        source: io::Error,
    },
}

/// Result alias of the migration layer.
pub type Result<T> = std::result::Result<T, MigrationError>;

fn wait_text(waited: &Option<Duration>) -> String {
    match waited {
        Some(d) => format!("{} s", d.as_secs_f64()),
        None => "the I/O timeout".into(),
    }
}

impl From<MigrationError> for crate::error::Error {
    fn from(e: MigrationError) -> Self {
        match e {
            MigrationError::Io { what, source } => crate::error::Error::Io { what, source },
            other => crate::error::Error::Io {
                what: "migration failed".into(),
                source: io::Error::other(other),
            },
        }
    }
}

/// Carried inside the [`io::Error`] of a timed-out read or write of an
/// [`crate::migration::endpoint::Conn`], so that [`MigrationError::Stalled`] can say how long
/// it waited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoTimeout(pub Duration);

impl std::fmt::Display for IoTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "no progress for {} s", self.0.as_secs_f64())
    }
}

impl std::error::Error for IoTimeout {}

impl MigrationError {
    /// Classifies an I/O error that happened `during` something: timeouts become
    /// [`MigrationError::Stalled`], EOF, broken pipes and resets [`MigrationError::Closed`],
    /// everything else [`MigrationError::Io`].
    pub fn from_io(e: io::Error, during: impl Into<String>) -> MigrationError {
        let during = during.into();
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                let waited = e
                    .get_ref()
                    .and_then(|inner| inner.downcast_ref::<IoTimeout>())
                    .map(|t| t.0);
                MigrationError::Stalled { during, waited }
            }
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted => MigrationError::Closed { during },
            _ => MigrationError::Io {
                what: format!("migration I/O error during {during}"),
                source: e,
            },
        }
    }
}

/// One migration message. Maximum payload sizes are checked on both sides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Source → destination, first: `MAGIC`, version (u32) and guest RAM size (u64).
    Hello {
        /// The sender's [`WIRE_VERSION`].
        version: u32,
        /// Guest RAM in bytes.
        ram_size: u64,
    },
    /// The VM configuration as opaque JSON (≤ [`CONFIG_MAX`] bytes).
    Config(Vec<u8>),
    /// The kernel image (≤ [`KERNEL_MAX`] bytes).
    Kernel(Vec<u8>),
    /// Page contents: payload is `first_page` (u64) then `data`, n × [`PAGE_SIZE`] bytes with
    /// 1 ≤ n ≤ [`PAGES_MAX_PER_MESSAGE`].
    Pages {
        /// Page number of the first page.
        first_page: u64,
        /// The pages.
        data: Vec<u8>,
    },
    /// Pages the destination must make zero: `first_page` and `count` ≥ 1 (u64 each).
    Zeros {
        /// Page number of the first page.
        first_page: u64,
        /// How many.
        count: u64,
    },
    /// The end of a round of pages (u32).
    RoundEnd {
        /// The round number.
        round: u32,
    },
    /// The VM state as opaque JSON (≤ [`STATE_MAX`] bytes).
    State(Vec<u8>),
    /// Source: everything is sent, the destination may resume.
    Done,
    /// Destination: the last message was accepted.
    Ack,
    /// Destination: the VM runs here now.
    Resumed,
    /// Either side: what went wrong, UTF-8 (≤ [`ERROR_MAX`] bytes).
    Error(String),
}

impl Message {
    /// The [`Message::Hello`] this host-vmm sends for a guest of `ram_size` bytes.
    pub fn hello(ram_size: u64) -> Message {
        Message::Hello {
            version: WIRE_VERSION,
            ram_size,
        }
    }

    /// The message's name, for errors and logs.
    pub fn name(&self) -> &'static str {
        tag_name(self.tag())
    }

    fn tag(&self) -> u8 {
        match self {
            Message::Hello { .. } => tag::HELLO,
            Message::Config(_) => tag::CONFIG,
            Message::Kernel(_) => tag::KERNEL,
            Message::Pages { .. } => tag::PAGES,
            Message::Zeros { .. } => tag::ZEROS,
            Message::RoundEnd { .. } => tag::ROUND_END,
            Message::State(_) => tag::STATE,
            Message::Done => tag::DONE,
            Message::Ack => tag::ACK,
            Message::Resumed => tag::RESUMED,
            Message::Error(_) => tag::ERROR,
        }
    }

    /// Refuses [`Message::Pages`] and [`Message::Zeros`] that reach beyond `ram_size` bytes
    /// of RAM (checked arithmetic: no overflow can wrap them back in range). Other messages
    /// pass.
    pub fn check_bounds(&self, ram_size: u64) -> Result<()> {
        let (message, first_page, count) = match self {
            Message::Pages { first_page, data } => {
                ("Pages", *first_page, (data.len() / PAGE_SIZE) as u64)
            }
            Message::Zeros { first_page, count } => ("Zeros", *first_page, *count),
            _ => return Ok(()),
        };
        let ram_pages = ram_size / PAGE_SIZE as u64;
        match first_page.checked_add(count) {
            Some(end) if end <= ram_pages => Ok(()),
            _ => Err(MigrationError::BeyondRam {
                message,
                first_page,
                count,
                ram_size,
            }),
        }
    }
}

fn tag_name(t: u8) -> &'static str {
    match t {
        tag::HELLO => "Hello",
        tag::CONFIG => "Config",
        tag::KERNEL => "Kernel",
        tag::PAGES => "Pages",
        tag::ZEROS => "Zeros",
        tag::ROUND_END => "RoundEnd",
        tag::STATE => "State",
        tag::DONE => "Done",
        tag::ACK => "Ack",
        tag::RESUMED => "Resumed",
        tag::ERROR => "Error",
        _ => "unknown",
    }
}

/// The largest payload a tag allows, or `None` for an unknown tag.
fn max_len(t: u8) -> Option<u32> {
    Some(match t {
        tag::HELLO => HELLO_LEN,
        tag::CONFIG => CONFIG_MAX,
        tag::KERNEL => KERNEL_MAX,
        tag::PAGES => PAGES_PAYLOAD_MAX,
        tag::ZEROS => 16,
        tag::ROUND_END => 4,
        tag::STATE => STATE_MAX,
        tag::DONE | tag::ACK | tag::RESUMED => 0,
        tag::ERROR => ERROR_MAX,
        _ => return None,
    })
}

fn check_pages(data_len: usize) -> std::result::Result<(), String> {
    if data_len == 0 || data_len % PAGE_SIZE != 0 || data_len / PAGE_SIZE > PAGES_MAX_PER_MESSAGE {
        return Err(format!(
            "Pages data of {data_len} bytes is not 1 to {PAGES_MAX_PER_MESSAGE} pages of \
             {PAGE_SIZE} bytes"
        ));
    }
    Ok(())
}

/// Writes all of `bufs` (vectored, so a frame goes out in as few system calls as possible).
fn write_all_vectored(w: &mut impl Write, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes one frame whose payload is `parts` concatenated. Returns the bytes written.
fn write_frame(w: &mut impl Write, t: u8, parts: &[&[u8]]) -> Result<u64> {
    let name = tag_name(t);
    let max = max_len(t).unwrap_or(0);
    let len: usize = parts.iter().map(|p| p.len()).sum();
    if len > max as usize {
        return Err(MigrationError::Unsendable(format!(
            "{name} payload of {len} bytes exceeds its maximum of {max}"
        )));
    }
    let mut header = [0u8; 5];
    header[0] = t;
    header[1..].copy_from_slice(&(len as u32).to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header);
    for p in parts {
        crc.update(p);
    }
    let crc = crc.finalize().to_le_bytes();
    let mut slices = Vec::with_capacity(parts.len() + 2);
    slices.push(IoSlice::new(&header));
    slices.extend(
        parts
            .iter()
            .filter(|p| !p.is_empty())
            .map(|p| IoSlice::new(p)),
    );
    slices.push(IoSlice::new(&crc));
    write_all_vectored(w, &mut slices)
        .map_err(|e| MigrationError::from_io(e, format!("sending a {name} message")))?;
    Ok(len as u64 + FRAME_OVERHEAD)
}

/// Writes `m` as one frame and returns the bytes it took on the wire. Refuses (with
/// [`MigrationError::Unsendable`], writing nothing) a message the format cannot carry:
/// an oversized payload, or `Pages` data that is not 1 to [`PAGES_MAX_PER_MESSAGE`] whole pages.
pub fn write_message(w: &mut impl Write, m: &Message) -> Result<u64> {
    let t = m.tag();
    match m {
        Message::Hello { version, ram_size } => write_frame(
            w,
            t,
            &[&MAGIC, &version.to_le_bytes(), &ram_size.to_le_bytes()],
        ),
        Message::Config(b) | Message::Kernel(b) | Message::State(b) => write_frame(w, t, &[b]),
        Message::Pages { first_page, data } => write_pages(w, *first_page, data),
        Message::Zeros { first_page, count } => {
            if *count == 0 {
                return Err(MigrationError::Unsendable("Zeros of 0 pages".into()));
            }
            write_frame(w, t, &[&first_page.to_le_bytes(), &count.to_le_bytes()])
        }
        Message::RoundEnd { round } => write_frame(w, t, &[&round.to_le_bytes()]),
        Message::Done | Message::Ack | Message::Resumed => write_frame(w, t, &[]),
        Message::Error(s) => write_frame(w, t, &[s.as_bytes()]),
    }
}

/// Writes a [`Message::Pages`] frame straight from `data` (for instance guest memory), without
/// copying it into a `Vec`. `data` must be 1 to [`PAGES_MAX_PER_MESSAGE`] whole pages.
/// Returns the bytes written.
pub fn write_pages(w: &mut impl Write, first_page: u64, data: &[u8]) -> Result<u64> {
    check_pages(data.len()).map_err(MigrationError::Unsendable)?;
    write_frame(w, tag::PAGES, &[&first_page.to_le_bytes(), data])
}

/// Reads exactly `buf.len()` bytes.
fn read_exact(r: &mut impl Read, buf: &mut [u8], during: impl FnOnce() -> String) -> Result<()> {
    r.read_exact(buf)
        .map_err(|e| MigrationError::from_io(e, during()))
}

/// Reads one frame and decodes it. Checks, in order: a known tag, a length within the tag's
/// maximum (before allocating), the CRC, then the payload's shape (the Hello magic, whole
/// pages, exact sizes, UTF-8). Does not check the Hello's version nor page bounds: that is
/// [`Receiver`]'s job.
pub fn read_message(r: &mut impl Read) -> Result<Message> {
    let mut header = [0u8; 5];
    read_exact(r, &mut header, || "reading a message header".into())?;
    let t = header[0];
    let len = u32::from_le_bytes([header[1], header[2], header[3], header[4]]);
    let name = tag_name(t);
    let Some(max) = max_len(t) else {
        return Err(MigrationError::Corrupt(format!(
            "unknown message tag {t} (this host-vmm speaks wire version {WIRE_VERSION})"
        )));
    };
    if len > max {
        return Err(MigrationError::Corrupt(format!(
            "{name} message of {len} bytes exceeds its maximum of {max}"
        )));
    }
    let len = len as usize;
    // `len` is bounded by the tag's maximum (64 MiB at most). Large payloads grow as bytes
    // arrive rather than being allocated up front on a peer's word.
    let mut payload = Vec::with_capacity(len.min(PAGES_PAYLOAD_MAX as usize));
    let got = r
        .by_ref()
        .take(len as u64)
        .read_to_end(&mut payload)
        .map_err(|e| MigrationError::from_io(e, format!("reading a {len}-byte {name} message")))?;
    if got < len {
        return Err(MigrationError::Closed {
            during: format!("reading a {len}-byte {name} message (got {got} bytes)"),
        });
    }
    let mut sent = [0u8; 4];
    read_exact(r, &mut sent, || {
        format!("reading the CRC of a {name} message")
    })?;
    let sent = u32::from_le_bytes(sent);
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header);
    crc.update(&payload);
    let computed = crc.finalize();
    if computed != sent {
        return Err(MigrationError::Checksum {
            message: name,
            computed,
            sent,
        });
    }
    decode(t, payload)
}

fn decode(t: u8, payload: Vec<u8>) -> Result<Message> {
    let name = tag_name(t);
    let exact = |want: usize| {
        if payload.len() == want {
            Ok(())
        } else {
            Err(MigrationError::Corrupt(format!(
                "{name} payload of {} bytes, expected {want}",
                payload.len()
            )))
        }
    };
    let u32_at = |o: usize| u32::from_le_bytes(payload[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(payload[o..o + 8].try_into().expect("8 bytes"));
    Ok(match t {
        tag::HELLO => {
            exact(HELLO_LEN as usize)?;
            if payload[..8] != MAGIC {
                return Err(MigrationError::Corrupt(format!(
                    "bad magic {:?} in Hello: not a pvkit migration stream",
                    String::from_utf8_lossy(&payload[..8])
                )));
            }
            Message::Hello {
                version: u32_at(8),
                ram_size: u64_at(12),
            }
        }
        tag::CONFIG => Message::Config(payload),
        tag::KERNEL => Message::Kernel(payload),
        tag::STATE => Message::State(payload),
        tag::PAGES => {
            if payload.len() < 8 {
                return Err(MigrationError::Corrupt(format!(
                    "Pages payload of {} bytes has no page number",
                    payload.len()
                )));
            }
            check_pages(payload.len() - 8).map_err(MigrationError::Corrupt)?;
            let first_page = u64_at(0);
            let mut data = payload;
            data.drain(..8);
            Message::Pages { first_page, data }
        }
        tag::ZEROS => {
            exact(16)?;
            let (first_page, count) = (u64_at(0), u64_at(8));
            if count == 0 {
                return Err(MigrationError::Corrupt("Zeros of 0 pages".into()));
            }
            Message::Zeros { first_page, count }
        }
        tag::ROUND_END => {
            exact(4)?;
            Message::RoundEnd { round: u32_at(0) }
        }
        tag::DONE => Message::Done,
        tag::ACK => Message::Ack,
        tag::RESUMED => Message::Resumed,
        tag::ERROR => Message::Error(
            String::from_utf8(payload)
                .map_err(|_| MigrationError::Corrupt("Error message that is not UTF-8".into()))?,
        ),
        _ => unreachable!("max_len refused tag {t}"),
    })
}

/// The destination's reader: the first message must be a [`Message::Hello`] with the right
/// magic and [`WIRE_VERSION`] and a RAM size of whole pages; every later [`Message::Pages`] and
/// [`Message::Zeros`] must lie within that RAM; a second Hello is refused.
#[derive(Debug, Default, Clone)]
pub struct Receiver {
    ram_size: Option<u64>,
}

impl Receiver {
    /// A receiver that has not seen the Hello yet.
    pub fn new() -> Receiver {
        Receiver::default()
    }

    /// The RAM size from the Hello, once it has been read.
    pub fn ram_size(&self) -> Option<u64> {
        self.ram_size
    }

    /// Reads and checks the next message. A Hello is returned as read (the caller answers it
    /// with [`Message::Ack`]); on a version mismatch the error is
    /// [`MigrationError::Version`] and the caller should send a [`Message::Error`] saying so.
    pub fn read(&mut self, r: &mut impl Read) -> Result<Message> {
        let m = read_message(r)?;
        match (&m, self.ram_size) {
            (Message::Hello { version, ram_size }, None) => {
                if *version != WIRE_VERSION {
                    return Err(MigrationError::Version {
                        peer: *version,
                        ours: WIRE_VERSION,
                    });
                }
                if *ram_size == 0 || *ram_size % PAGE_SIZE as u64 != 0 {
                    return Err(MigrationError::Corrupt(format!(
                        "Hello with a RAM size of {ram_size} bytes, not a positive number of \
                         {PAGE_SIZE}-byte pages"
                    )));
                }
                self.ram_size = Some(*ram_size);
            }
            (Message::Hello { .. }, Some(_)) => {
                return Err(MigrationError::Unexpected {
                    expected: "no second Hello".into(),
                    got: "Hello",
                });
            }
            (_, None) => {
                return Err(MigrationError::Unexpected {
                    expected: "Hello first".into(),
                    got: m.name(),
                });
            }
            (_, Some(ram)) => m.check_bounds(ram)?,
        }
        Ok(m)
    }
}

/// Counts the bytes read or written through it (successful ones only).
#[derive(Debug)]
pub struct Counted<T> {
    inner: T,
    bytes: u64,
}

impl<T> Counted<T> {
    /// Wraps `inner` with a count of 0.
    pub fn new(inner: T) -> Counted<T> {
        Counted { inner, bytes: 0 }
    }

    /// Bytes read or written so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The wrapped reader or writer.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// The wrapped reader or writer, mutably.
    pub fn get_mut(&mut self) -> &mut T {
        &mut self.inner
    }

    /// Unwraps it.
    pub fn into_inner(self) -> T {
        self.inner
    }
}

impl<T: Read> Read for Counted<T> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
}

impl<T: Write> Write for Counted<T> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let n = self.inner.write_vectored(bufs)?;
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
