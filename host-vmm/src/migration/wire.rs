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
        "migration stream corrupt: a {message} message for {count} pages from page {first_page} \
         reaches beyond the guest's {ram_size} bytes of RAM"
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
        // Hundredths at most: the kernel rounds socket timeouts to its clock tick.
        Some(d) => {
            let s = format!("{:.2}", d.as_secs_f64());
            format!("{} s", s.trim_end_matches('0').trim_end_matches('.'))
        }
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
        write!(f, "no progress for {}", wait_text(&Some(self.0)))
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
    if data_len == 0
        || !data_len.is_multiple_of(PAGE_SIZE)
        || data_len / PAGE_SIZE > PAGES_MAX_PER_MESSAGE
    {
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
    let during = || format!("reading a {len}-byte {name} message");
    // A Pages payload's page number is read apart, so that the pages land at the start of
    // their own Vec (no 2 MiB shift to drop the prefix).
    let mut prefix = [0u8; 8];
    let prefix_len = if t == tag::PAGES { len.min(8) } else { 0 };
    read_exact(r, &mut prefix[..prefix_len], during)?;
    let rest = len - prefix_len;
    // `rest` is bounded by the tag's maximum (64 MiB at most). Large payloads grow as bytes
    // arrive rather than being allocated up front on a peer's word.
    let mut payload = Vec::with_capacity(rest.min(PAGES_PAYLOAD_MAX as usize));
    let got = r
        .by_ref()
        .take(rest as u64)
        .read_to_end(&mut payload)
        .map_err(|e| MigrationError::from_io(e, during()))?;
    if got < rest {
        return Err(MigrationError::Closed {
            during: format!("{} (got {} bytes)", during(), prefix_len + got),
        });
    }
    let mut sent = [0u8; 4];
    read_exact(r, &mut sent, || {
        format!("reading the CRC of a {name} message")
    })?;
    let sent = u32::from_le_bytes(sent);
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header);
    crc.update(&prefix[..prefix_len]);
    crc.update(&payload);
    let computed = crc.finalize();
    if computed != sent {
        return Err(MigrationError::Checksum {
            message: name,
            computed,
            sent,
        });
    }
    if t == tag::PAGES {
        if prefix_len < 8 {
            return Err(MigrationError::Corrupt(format!(
                "Pages payload of {len} bytes has no page number"
            )));
        }
        check_pages(payload.len()).map_err(MigrationError::Corrupt)?;
        return Ok(Message::Pages {
            first_page: u64::from_le_bytes(prefix),
            data: payload,
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
        // Pages are decoded by `read_message` and unknown tags refused by `max_len`: this arm
        // is not reached, and is an error rather than a panic all the same.
        _ => return Err(MigrationError::Corrupt(format!("unknown message tag {t}"))),
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
                if *ram_size == 0 || !ram_size.is_multiple_of(PAGE_SIZE as u64) {
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
    pub fn byte_count(&self) -> u64 {
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

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr};
    use std::os::unix::net::UnixStream;
    use std::time::Instant;

    use super::*;
    use crate::migration::endpoint::{Conn, Endpoint};

    fn page(fill: u8, n: usize) -> Vec<u8> {
        (0..n * PAGE_SIZE)
            .map(|i| fill.wrapping_add((i / 7) as u8))
            .collect()
    }

    fn all_messages() -> Vec<Message> {
        vec![
            Message::hello(64 << 20),
            Message::Config(br#"{"mode":"pv","mem":67108864}"#.to_vec()),
            Message::Config(Vec::new()),
            Message::Kernel(vec![0x7f; 300_000]),
            Message::Pages {
                first_page: 0,
                data: page(1, 1),
            },
            Message::Pages {
                first_page: 1000,
                data: page(9, PAGES_MAX_PER_MESSAGE),
            },
            Message::Zeros {
                first_page: 3,
                count: 12345,
            },
            Message::RoundEnd { round: 7 },
            Message::State(br#"{"vcpu":{}}"#.to_vec()),
            Message::Done,
            Message::Ack,
            Message::Resumed,
            Message::Error("destination out of memory ✗".into()),
            Message::Error(String::new()),
        ]
    }

    fn encode(m: &Message) -> Vec<u8> {
        let mut v = Vec::new();
        let n = write_message(&mut v, m).unwrap();
        assert_eq!(n, v.len() as u64, "{}", m.name());
        v
    }

    /// A frame with a correct CRC around any payload.
    fn frame(t: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![t];
        v.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        v.extend_from_slice(payload);
        let crc = crc32fast::hash(&v);
        v.extend_from_slice(&crc.to_le_bytes());
        v
    }

    /// Sends every message from a thread through `tx` and checks they arrive unchanged
    /// through `rx`, with matching byte counts on both sides.
    fn round_trip(tx: Conn, rx: Conn) {
        let msgs = all_messages();
        let sent = msgs.clone();
        let writer = std::thread::spawn(move || {
            let mut w = Counted::new(tx);
            let mut total = 0;
            for m in &sent {
                total += write_message(&mut w, m).unwrap();
            }
            // The zero-copy path, from a borrowed slice.
            let data = page(42, 3);
            total += write_pages(&mut w, 77, &data).unwrap();
            assert_eq!(total, w.byte_count());
            total
        });
        let mut r = Counted::new(rx);
        for m in &msgs {
            assert_eq!(&read_message(&mut r).unwrap(), m);
        }
        assert_eq!(
            read_message(&mut r).unwrap(),
            Message::Pages {
                first_page: 77,
                data: page(42, 3)
            }
        );
        assert_eq!(writer.join().unwrap(), r.byte_count());
    }

    #[test]
    fn round_trip_unix_pair() {
        let (a, b) = UnixStream::pair().unwrap();
        round_trip(Conn::from_unix(a).unwrap(), Conn::from_unix(b).unwrap());
    }

    #[test]
    fn round_trip_loopback_tcp() {
        let ep = Endpoint::Tcp(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
        let listener = ep.listen().unwrap();
        let target = listener.endpoint().clone();
        let client = std::thread::spawn(move || target.connect(Duration::from_secs(5)).unwrap());
        let server = listener.accept(Some(Duration::from_secs(5))).unwrap();
        round_trip(client.join().unwrap(), server);
    }

    #[test]
    fn write_pages_is_write_message_pages() {
        let data = page(5, 2);
        let mut a = Vec::new();
        let mut b = Vec::new();
        write_pages(&mut a, 9, &data).unwrap();
        write_message(
            &mut b,
            &Message::Pages {
                first_page: 9,
                data,
            },
        )
        .unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 5 + 8 + 2 * PAGE_SIZE + 4);
    }

    #[test]
    fn layout_is_as_documented() {
        let v = encode(&Message::hello(0x1000));
        assert_eq!(v[0], 1);
        assert_eq!(&v[1..5], &20u32.to_le_bytes());
        assert_eq!(&v[5..13], b"PVKITMIG");
        assert_eq!(&v[13..17], &WIRE_VERSION.to_le_bytes());
        assert_eq!(&v[17..25], &0x1000u64.to_le_bytes());
        assert_eq!(&v[25..], &crc32fast::hash(&v[..25]).to_le_bytes());
        assert_eq!(encode(&Message::Done), frame(8, &[]));
    }

    #[test]
    fn truncated_stream_is_closed_at_every_offset() {
        for m in [
            Message::hello(1 << 20),
            Message::Config(b"{}".to_vec()),
            Message::Pages {
                first_page: 2,
                data: page(3, 1),
            },
            Message::Zeros {
                first_page: 1,
                count: 2,
            },
            Message::Ack,
            Message::Error("no".into()),
        ] {
            let v = encode(&m);
            for cut in 0..v.len() {
                match read_message(&mut &v[..cut]) {
                    Err(MigrationError::Closed { during }) => assert!(!during.is_empty()),
                    other => panic!("{} cut at {cut}: {other:?}", m.name()),
                }
            }
            assert_eq!(read_message(&mut &v[..]).unwrap(), m);
        }
    }

    #[test]
    fn flipped_bit_anywhere_is_refused() {
        for m in [
            Message::hello(1 << 20),
            Message::Pages {
                first_page: 2,
                data: page(3, 1),
            },
            Message::Zeros {
                first_page: 1,
                count: 2,
            },
            Message::RoundEnd { round: 1 },
            Message::State(b"{\"x\":1}".to_vec()),
            Message::Resumed,
        ] {
            let v = encode(&m);
            for bit in 0..v.len() * 8 {
                let mut bad = v.clone();
                bad[bit / 8] ^= 1 << (bit % 8);
                let e = read_message(&mut &bad[..]).expect_err("a flipped bit was accepted");
                if bit / 8 >= 5 {
                    // Payload or CRC: the length is intact, so the CRC catches it.
                    assert!(
                        matches!(e, MigrationError::Checksum { .. }),
                        "{} bit {bit}: {e}",
                        m.name()
                    );
                } else {
                    // Tag or length: another tag (CRC), an unknown tag or an oversized length
                    // (corrupt), or a longer length than the stream has (closed).
                    assert!(
                        matches!(
                            e,
                            MigrationError::Checksum { .. }
                                | MigrationError::Corrupt(_)
                                | MigrationError::Closed { .. }
                        ),
                        "{} bit {bit}: {e}",
                        m.name()
                    );
                }
            }
        }
    }

    #[test]
    fn wrong_magic_is_refused() {
        let mut payload = b"PVKITMIX".to_vec();
        payload.extend_from_slice(&WIRE_VERSION.to_le_bytes());
        payload.extend_from_slice(&4096u64.to_le_bytes());
        let e = read_message(&mut &frame(1, &payload)[..]).unwrap_err();
        assert!(matches!(e, MigrationError::Corrupt(_)), "{e}");
        assert!(e.to_string().contains("magic"), "{e}");
    }

    #[test]
    fn wrong_version_is_refused_by_the_receiver() {
        let v = encode(&Message::Hello {
            version: 2,
            ram_size: 1 << 20,
        });
        // The frame itself is fine (its layout is fixed for every version)...
        assert!(read_message(&mut &v[..]).is_ok());
        // ...but the destination refuses it.
        let e = Receiver::new().read(&mut &v[..]).unwrap_err();
        assert!(
            matches!(e, MigrationError::Version { peer: 2, ours: 1 }),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            "migration stream version 2, this host-vmm speaks 1"
        );
    }

    #[test]
    fn unknown_tags_are_refused() {
        for t in [0u8, 12, 200, 255] {
            let e = read_message(&mut &frame(t, b"abc")[..]).unwrap_err();
            assert!(matches!(e, MigrationError::Corrupt(_)), "tag {t}: {e}");
            assert!(e.to_string().contains("unknown message tag"), "{e}");
        }
    }

    /// Yields its bytes, then fails the test if read again.
    struct OnlyThis<'a>(&'a [u8]);

    impl Read for OnlyThis<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            assert!(
                !self.0.is_empty(),
                "read past the header of an oversized frame"
            );
            let n = buf.len().min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn oversized_lengths_are_refused_before_reading_the_payload() {
        for t in 1..=11u8 {
            for len in [max_len(t).unwrap() + 1, u32::MAX] {
                let mut header = vec![t];
                header.extend_from_slice(&len.to_le_bytes());
                let e = read_message(&mut OnlyThis(&header)).unwrap_err();
                assert!(
                    matches!(&e, MigrationError::Corrupt(why) if why.contains("exceeds")),
                    "tag {t} len {len}: {e}"
                );
            }
        }
    }

    #[test]
    fn malformed_payloads_are_refused() {
        let cases: Vec<Vec<u8>> = vec![
            frame(1, &[0; 19]),       // Hello too short
            frame(4, &[0; 7]),        // Pages without a page number
            frame(4, &[0; 8]),        // Pages with no page
            frame(4, &[0; 8 + 100]),  // Pages with a partial page
            frame(5, &[0; 15]),       // Zeros too short
            frame(5, &[0; 16]),       // Zeros of 0 pages
            frame(6, &[0; 3]),        // RoundEnd too short
            frame(8, b"x"),           // Done with a payload
            frame(11, &[0xff, 0xfe]), // Error not UTF-8
        ];
        for (i, v) in cases.iter().enumerate() {
            let e = read_message(&mut &v[..]).unwrap_err();
            assert!(matches!(e, MigrationError::Corrupt(_)), "case {i}: {e}");
        }
    }

    #[test]
    fn unsendable_messages_write_nothing() {
        let mut v = Vec::new();
        for data in [
            vec![],
            vec![0; 4095],
            vec![0; PAGE_SIZE * (PAGES_MAX_PER_MESSAGE + 1)],
        ] {
            let e = write_pages(&mut v, 0, &data).unwrap_err();
            assert!(matches!(e, MigrationError::Unsendable(_)), "{e}");
        }
        for m in [
            Message::Config(vec![0; CONFIG_MAX as usize + 1]),
            Message::Error("x".repeat(ERROR_MAX as usize + 1)),
            Message::Zeros {
                first_page: 0,
                count: 0,
            },
        ] {
            let e = write_message(&mut v, &m).unwrap_err();
            assert!(matches!(e, MigrationError::Unsendable(_)), "{e}");
        }
        assert!(v.is_empty());
        // The maxima themselves are fine.
        write_message(&mut v, &Message::Config(vec![b' '; CONFIG_MAX as usize])).unwrap();
        assert_eq!(read_message(&mut &v[..]).unwrap().name(), "Config");
    }

    #[test]
    fn receiver_checks_handshake_and_bounds() {
        let ram = 16 * PAGE_SIZE as u64;
        let mut stream = Vec::new();
        for m in [
            Message::hello(ram),
            Message::Pages {
                first_page: 14,
                data: page(0, 2),
            },
            Message::Zeros {
                first_page: 0,
                count: 16,
            },
            Message::Done,
        ] {
            write_message(&mut stream, &m).unwrap();
        }
        let mut rx = Receiver::new();
        let mut r = &stream[..];
        assert_eq!(rx.read(&mut r).unwrap(), Message::hello(ram));
        assert_eq!(rx.ram_size(), Some(ram));
        for _ in 0..3 {
            rx.read(&mut r).unwrap();
        }

        let beyond = [
            Message::Pages {
                first_page: 15,
                data: page(0, 2),
            },
            Message::Pages {
                first_page: u64::MAX,
                data: page(0, 1),
            },
            Message::Zeros {
                first_page: 16,
                count: 1,
            },
            Message::Zeros {
                first_page: 2,
                count: u64::MAX - 1,
            },
            Message::Zeros {
                first_page: u64::MAX,
                count: u64::MAX,
            },
        ];
        for m in beyond {
            let mut rx = Receiver::new();
            let mut v = encode(&Message::hello(ram));
            v.extend(encode(&m));
            let mut r = &v[..];
            rx.read(&mut r).unwrap();
            let e = rx.read(&mut r).unwrap_err();
            assert!(matches!(e, MigrationError::BeyondRam { .. }), "{m:?}: {e}");
            assert!(e.to_string().contains("beyond the guest's"), "{e}");
        }

        // Pages before the Hello, a second Hello, and a RAM size of partial pages.
        let e = Receiver::new()
            .read(
                &mut &encode(&Message::Zeros {
                    first_page: 0,
                    count: 1,
                })[..],
            )
            .unwrap_err();
        assert!(matches!(e, MigrationError::Unexpected { .. }), "{e}");
        let mut v = encode(&Message::hello(ram));
        v.extend(encode(&Message::hello(ram)));
        let (mut rx, mut r) = (Receiver::new(), &v[..]);
        rx.read(&mut r).unwrap();
        assert!(matches!(
            rx.read(&mut r),
            Err(MigrationError::Unexpected { .. })
        ));
        for bad_ram in [0, 4097] {
            let e = Receiver::new()
                .read(&mut &encode(&Message::hello(bad_ram))[..])
                .unwrap_err();
            assert!(matches!(e, MigrationError::Corrupt(_)), "{e}");
        }
    }

    fn timed_pair(timeout: Duration) -> (Conn, Conn) {
        let (a, b) = UnixStream::pair().unwrap();
        let (a, b) = (Conn::from_unix(a).unwrap(), Conn::from_unix(b).unwrap());
        a.set_io_timeout(timeout).unwrap();
        b.set_io_timeout(timeout).unwrap();
        (a, b)
    }

    #[test]
    fn silent_peer_is_a_stall_not_a_hang() {
        let timeout = Duration::from_millis(200);
        let (mut a, mut b) = timed_pair(timeout);
        // Nothing at all.
        let t0 = Instant::now();
        let e = read_message(&mut a).unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(2));
        assert!(
            matches!(&e, MigrationError::Stalled { waited: Some(w), .. }
                if w.abs_diff(timeout) < Duration::from_millis(20)),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "migration peer stalled: nothing for 0.2 s during reading a message header"
        );
        // Half a message.
        let v = encode(&Message::Config(b"{\"a\":1}".to_vec()));
        b.write_all(&v[..8]).unwrap();
        let e = read_message(&mut a).unwrap_err();
        assert!(matches!(e, MigrationError::Stalled { .. }), "{e}");
        assert!(e.to_string().contains("Config"), "{e}");
    }

    #[test]
    fn peer_that_stops_reading_is_a_stall() {
        let timeout = Duration::from_millis(150);
        let (mut a, _b) = timed_pair(timeout);
        let data = page(1, PAGES_MAX_PER_MESSAGE);
        let t0 = Instant::now();
        let e = loop {
            if let Err(e) = write_pages(&mut a, 0, &data) {
                break e;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "writes never blocked"
            );
        };
        assert!(t0.elapsed() < Duration::from_secs(5));
        // The kernel rounds socket timeouts to its clock tick.
        assert!(
            matches!(&e, MigrationError::Stalled { waited: Some(w), .. }
                if w.abs_diff(timeout) < Duration::from_millis(20)),
            "{e:?}"
        );
        assert!(e.to_string().contains("sending a Pages message"), "{e}");
    }

    #[test]
    fn peer_that_closes_is_closed() {
        let (mut a, b) = timed_pair(Duration::from_secs(5));
        drop(b);
        let e = read_message(&mut a).unwrap_err();
        assert!(matches!(e, MigrationError::Closed { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            "migration peer closed the connection during reading a message header"
        );
        let e = write_message(&mut a, &Message::Done).unwrap_err();
        assert!(matches!(e, MigrationError::Closed { .. }), "{e}");

        // Closed after half a message.
        let (mut a, mut b) = timed_pair(Duration::from_secs(5));
        let v = encode(&Message::State(vec![b'x'; 100]));
        b.write_all(&v[..50]).unwrap();
        drop(b);
        let e = read_message(&mut a).unwrap_err();
        assert!(matches!(e, MigrationError::Closed { .. }), "{e}");
    }

    #[test]
    fn io_errors_are_classified() {
        use io::ErrorKind as K;
        for k in [K::WouldBlock, K::TimedOut] {
            assert!(matches!(
                MigrationError::from_io(k.into(), "x"),
                MigrationError::Stalled { waited: None, .. }
            ));
        }
        for k in [K::UnexpectedEof, K::BrokenPipe, K::ConnectionReset] {
            assert!(matches!(
                MigrationError::from_io(k.into(), "x"),
                MigrationError::Closed { .. }
            ));
        }
        let e = MigrationError::from_io(K::PermissionDenied.into(), "sending a Done message");
        assert!(matches!(e, MigrationError::Io { .. }));
        assert!(
            e.to_string()
                .starts_with("migration I/O error during sending a Done message")
        );
        assert_eq!(
            MigrationError::from_io(K::TimedOut.into(), "x").to_string(),
            "migration peer stalled: nothing for the I/O timeout during x"
        );
        let vm_err: crate::error::Error = MigrationError::Corrupt("why".into()).into();
        assert!(vm_err.to_string().contains("migration stream corrupt: why"));
    }

    /// The shape of a migration on a real Unix listener: handshake, pages straight from a
    /// "guest memory" slice, zeros, a round end, state, done; replies from the destination.
    #[test]
    fn handshake_and_transfer_over_a_unix_listener() {
        let dir = std::env::temp_dir().join(format!("pvkit-mig-{}-e2e", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ep = Endpoint::parse(dir.join("mig.sock").to_str().unwrap()).unwrap();
        let listener = ep.listen().unwrap();
        let ram = page(7, 8);
        let guest = ram.clone();
        let source = std::thread::spawn(move || -> Result<u64> {
            let conn = ep.connect(Duration::from_secs(5))?;
            let mut replies = conn.try_clone()?;
            let mut w = Counted::new(conn);
            write_message(&mut w, &Message::hello(guest.len() as u64))?;
            assert_eq!(read_message(&mut replies)?, Message::Ack);
            write_message(&mut w, &Message::Config(b"{}".to_vec()))?;
            write_pages(&mut w, 0, &guest[..4 * PAGE_SIZE])?;
            write_pages(&mut w, 4, &guest[4 * PAGE_SIZE..])?;
            write_message(
                &mut w,
                &Message::Zeros {
                    first_page: 7,
                    count: 1,
                },
            )?;
            write_message(&mut w, &Message::RoundEnd { round: 0 })?;
            write_message(&mut w, &Message::State(b"{}".to_vec()))?;
            write_message(&mut w, &Message::Done)?;
            assert_eq!(read_message(&mut replies)?, Message::Resumed);
            Ok(w.byte_count())
        });
        let mut conn = listener.accept(Some(Duration::from_secs(5))).unwrap();
        let mut r = Counted::new(conn.try_clone().unwrap());
        let mut rx = Receiver::new();
        let mut mem = Vec::new();
        loop {
            match rx.read(&mut r).unwrap() {
                Message::Hello { ram_size, .. } => {
                    mem = vec![0xaa; ram_size as usize];
                    write_message(&mut conn, &Message::Ack).unwrap();
                }
                Message::Pages { first_page, data } => {
                    let at = first_page as usize * PAGE_SIZE;
                    mem[at..at + data.len()].copy_from_slice(&data);
                }
                Message::Zeros { first_page, count } => {
                    let at = first_page as usize * PAGE_SIZE;
                    mem[at..at + count as usize * PAGE_SIZE].fill(0);
                }
                Message::Done => break,
                _ => {}
            }
        }
        write_message(&mut conn, &Message::Resumed).unwrap();
        let sent = source.join().unwrap().unwrap();
        assert_eq!(sent, r.byte_count());
        let mut want = ram;
        want[7 * PAGE_SIZE..].fill(0);
        assert_eq!(mem, want);
        drop(listener);
        let _ = std::fs::remove_dir_all(&dir);
    }

    mod fuzz {
        //! Hostile streams: valid frames with random flips, overwrites and cuts, and raw
        //! garbage, fed to a [`Receiver`]. Cases: `PROPTEST_CASES` (proptest's default
        //! without it).

        use proptest::prelude::*;

        use super::*;

        fn message() -> impl Strategy<Value = Message> {
            prop_oneof![
                (any::<u32>(), any::<u64>())
                    .prop_map(|(version, ram_size)| Message::Hello { version, ram_size }),
                prop::collection::vec(any::<u8>(), 0..64).prop_map(Message::Config),
                prop::collection::vec(any::<u8>(), 0..64).prop_map(Message::Kernel),
                (0u64..40, 1usize..4, any::<u8>()).prop_map(|(first_page, n, fill)| {
                    Message::Pages {
                        first_page,
                        data: page(fill, n),
                    }
                }),
                (any::<u64>(), 1u64..u64::MAX)
                    .prop_map(|(first_page, count)| Message::Zeros { first_page, count }),
                any::<u32>().prop_map(|round| Message::RoundEnd { round }),
                prop::collection::vec(any::<u8>(), 0..64).prop_map(Message::State),
                Just(Message::Done),
                Just(Message::Ack),
                Just(Message::Resumed),
                ".{0,40}".prop_map(Message::Error),
            ]
        }

        proptest! {
            #[test]
            fn any_message_round_trips(m in message()) {
                let v = encode(&m);
                prop_assert_eq!(read_message(&mut &v[..]).unwrap(), m);
            }

            #[test]
            fn hostile_streams_give_errors_not_panics(
                msgs in prop::collection::vec(message(), 0..6),
                flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
                cut in any::<prop::sample::Index>(),
                garbage in prop::collection::vec(any::<u8>(), 0..64),
            ) {
                let ram = 32 * PAGE_SIZE as u64;
                let mut v = encode(&Message::hello(ram));
                for m in &msgs {
                    v.extend(encode(m));
                }
                v.extend(&garbage);
                for (at, xor) in flips {
                    let i = at.index(v.len());
                    v[i] ^= xor;
                }
                v.truncate(cut.index(v.len() + 1));
                let mut rx = Receiver::new();
                let mut r = &v[..];
                // Every message the receiver accepts is within RAM; the stream ends in an
                // error (at the latest when it runs out).
                while let Ok(m) = rx.read(&mut r) {
                    prop_assert!(m.check_bounds(ram).is_ok());
                }
            }
        }
    }
}
