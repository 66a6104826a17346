//! virtio-blk over a host file.
//!
//! One request queue ([`QUEUE_SIZE`] entries at most). Requests: IN (read), OUT (write), FLUSH
//! and GET_ID; anything else is answered `VIRTIO_BLK_S_UNSUPP`. Capacity is the file length in
//! 512-byte sectors (a trailing partial sector is not exposed). A read-only disk offers
//! `VIRTIO_BLK_F_RO` and answers writes with `VIRTIO_BLK_S_IOERR`.
//!
//! # Request layout
//!
//! A request is one descriptor chain: the 16-byte header (`type`, reserved, `sector`) in the
//! first descriptor, which must be device-readable; the data in the descriptors between; the
//! status byte in the last descriptor, which must be device-writable (its first byte is
//! written). This is the framing every driver uses (Linux, `virtio-drivers`); header, data or
//! status sharing a descriptor is not supported and fails as a malformed request.
//!
//! # Limits and failures
//!
//! * At most [`MAX_DATA_LEN`] (1 MiB) of data per request, in at most [`SEG_MAX`] data
//!   descriptors. The device advertises `seg_max` = [`SEG_MAX`] and `size_max` = [`SIZE_MAX`],
//!   so a driver honouring them never exceeds the limit (254 × 4 KiB < 1 MiB).
//! * IOERR: a sector range past the capacity (checked arithmetic, so no overflow), a data
//!   length that is not a multiple of 512, a request over the limit, a data descriptor in the
//!   wrong direction, a header or data buffer not entirely inside guest RAM, a write to a
//!   read-only disk, a host I/O error. A rejected request touches neither the file nor guest
//!   memory other than the status byte.
//! * A chain the device cannot answer at all — no device-writable status byte inside guest RAM,
//!   a descriptor loop, a `next` index outside the ring, more than [`SEG_MAX`] + 2 descriptors
//!   — completes with a used length of 0 and no status write. virtio-queue's chain iterator
//!   visits at most one ring's worth of descriptors, so a loop always ends.
//! * An available-ring entry naming a head outside the ring breaks the ring
//!   (`DEVICE_NEEDS_RESET`): such a chain cannot be put in the used ring.
//! * One call of [`Disk::process_queue`] serves at most one pass budget of chains (the queue
//!   size, see [`super::pass_budget`]) and says whether more may be left, so the worker sees
//!   a stop between passes (see [`super`]'s "Bounds"). Requests are served one at a time:
//!   nothing is queued on the host.
//!
//! Guest buffers are reached only through vm-memory's volatile slices of guest RAM, and file
//! I/O goes straight into and out of them ([`ReadVolatile`]/[`WriteVolatile`] on the file after
//! a seek; the file cursor belongs to the one thread that runs the queue). No `&[u8]` ever
//! aliases guest memory and there is no `unsafe` here.
//!
//! Without `VIRTIO_BLK_F_FLUSH` negotiated the device is write-through (`sync_data` after each
//! write); with it, data reaches stable storage on FLUSH.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::path::Path;

use crate::memory::GuestMem;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueState};
use vm_memory::{Bytes, GuestMemoryBackend, ReadVolatile, WriteVolatile};

use super::thread::{QueueHandler, Worker};
use super::{Activation, Counters, DeviceError, Pass, VirtioDevice, read_config_bytes};
use crate::error::Error;
use crate::state::{Persist, StateError};

/// Bytes per sector (the unit of `sector` and capacity).
pub const SECTOR_SIZE: u64 = 512;
/// Maximum size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most data bytes one request may carry.
pub const MAX_DATA_LEN: u32 = 1 << 20;
/// Advertised `seg_max`: data descriptors per request (the ring minus header and status).
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Advertised `size_max`: bytes per data descriptor.
pub const SIZE_MAX: u32 = 4096;
/// Length of a GET_ID answer.
pub const ID_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;

const _: () = assert!(SEG_MAX * SIZE_MAX <= MAX_DATA_LEN);

/// Descriptors per chain: header, [`SEG_MAX`] data, status.
const MAX_DESCRIPTORS: usize = SEG_MAX as usize + 2;
/// `struct virtio_blk_outhdr`.
const HEADER_LEN: u32 = 16;
/// Bytes of `struct virtio_blk_config` we fill: capacity, size_max, seg_max, geometry,
/// blk_size.
const CONFIG_LEN: usize = 24;

/// Request counters, for metrics and tests (and part of [`BlockState`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlockStats {
    /// Successful IN requests.
    pub reads: u64,
    /// Successful OUT requests.
    pub writes: u64,
    /// Successful FLUSH requests.
    pub flushes: u64,
    /// Successful GET_ID requests.
    pub get_ids: u64,
    /// Bytes read from the disk into the guest.
    pub bytes_read: u64,
    /// Bytes written from the guest to the disk.
    pub bytes_written: u64,
    /// Requests answered `VIRTIO_BLK_S_IOERR`.
    pub io_errors: u64,
    /// Requests answered `VIRTIO_BLK_S_UNSUPP`.
    pub unsupported: u64,
    /// Chains completed without a status byte (no usable status descriptor, loops).
    pub unanswerable: u64,
}

/// Why a request failed. Everything but `Unsupported` is `VIRTIO_BLK_S_IOERR` to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    Malformed,
    BadAddress,
    TooLarge,
    ShortBuffer,
    Unaligned,
    OutOfRange,
    ReadOnly,
    Io,
    Unsupported,
}

/// The backing file and the request engine.
#[derive(Debug)]
pub struct Disk {
    file: File,
    /// Length of the image in bytes.
    len: u64,
    capacity: u64,
    readonly: bool,
    id: [u8; ID_LEN],
    write_through: bool,
    stats: Counters<BlockStats>,
}

impl Disk {
    /// Opens `path` (read-write unless `readonly`). The GET_ID string is the file name,
    /// truncated to 20 bytes.
    pub fn open(path: &Path, readonly: bool) -> crate::Result<Disk> {
        let io_err = |what: &str| {
            let what = format!(
                "{what} disk image {}{}",
                path.display(),
                if readonly {
                    ""
                } else {
                    " (use --readonly for an image you cannot write)"
                }
            );
            move |source| Error::Io { what, source }
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(!readonly)
            .open(path)
            .map_err(io_err("cannot open"))?;
        let kind = file
            .metadata()
            .map_err(io_err("cannot inspect"))?
            .file_type();
        if !(kind.is_file() || std::os::unix::fs::FileTypeExt::is_block_device(&kind)) {
            let e = std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a regular file or block device",
            );
            return Err(io_err("cannot use")(e));
        }
        // Seeking to the end also sizes block devices, whose metadata length is 0.
        let len = file.seek(SeekFrom::End(0)).map_err(io_err("cannot size"))?;
        let mut id = [0u8; ID_LEN];
        let name = path
            .file_name()
            .map(|n| n.as_encoded_bytes())
            .unwrap_or(b"");
        let n = name.len().min(ID_LEN);
        id[..n].copy_from_slice(&name[..n]);
        Ok(Disk {
            file,
            len,
            capacity: len / SECTOR_SIZE,
            readonly,
            id,
            write_through: true,
            stats: Counters::default(),
        })
    }

    /// Replaces the GET_ID string (truncated to 20 bytes, zero-padded).
    pub fn with_id(mut self, id: &[u8]) -> Disk {
        self.id = [0; ID_LEN];
        let n = id.len().min(ID_LEN);
        self.id[..n].copy_from_slice(&id[..n]);
        self
    }

    /// The identity of the image as the guest sees it (what [`BlockState`] records).
    fn identity(&self) -> DiskIdentity {
        DiskIdentity {
            len: self.len,
            readonly: self.readonly,
            id: self.id,
        }
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether the disk rejects writes.
    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// Counters so far.
    pub fn stats(&self) -> BlockStats {
        self.stats.get()
    }

    fn count(&self, f: impl FnOnce(&mut BlockStats)) {
        self.stats.update(f);
    }

    /// Serves the requests the driver made available on `queue`, at most one pass budget of
    /// them ([`super::drain_queue`]), then re-enables notifications. Returns whether the
    /// driver wants an interrupt for what was used (always, without EVENT_IDX; per
    /// `used_event` with it) and whether requests may be left. An error means the ring itself
    /// is broken (the available index ran more than a ring ahead, a head index outside the
    /// ring, or the used ring cannot be written).
    pub fn process_queue(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMem,
    ) -> Result<Pass, DeviceError> {
        super::drain_queue(queue, mem, |chain| self.execute(chain, mem))
    }

    /// Runs one request; returns the used length (bytes written into guest buffers, status
    /// byte included).
    fn execute(&mut self, chain: DescriptorChain<&GuestMem>, mem: &GuestMem) -> u32 {
        let descs = collect_chain(chain);
        let Some((status, body)) = descs.as_deref().and_then(<[Descriptor]>::split_last) else {
            self.count(|s| s.unanswerable = s.unanswerable.wrapping_add(1));
            return 0;
        };
        if !status.is_write_only() || status.len() == 0 || !mem.check_range(status.addr(), 1) {
            self.count(|s| s.unanswerable = s.unanswerable.wrapping_add(1));
            return 0;
        }
        let (code, written) = match self.run(body, mem) {
            Ok(n) => (VIRTIO_BLK_S_OK, n),
            Err(Failure::Unsupported) => {
                self.count(|s| s.unsupported = s.unsupported.wrapping_add(1));
                (VIRTIO_BLK_S_UNSUPP, 0)
            }
            Err(_) => {
                self.count(|s| s.io_errors = s.io_errors.wrapping_add(1));
                (VIRTIO_BLK_S_IOERR, 0)
            }
        };
        match mem.write_obj(code as u8, status.addr()) {
            Ok(()) => written + 1,
            // Checked above; guest RAM does not shrink.
            Err(_) => 0,
        }
    }

    /// Runs a request given its header and data descriptors; returns the data bytes written
    /// into guest memory.
    fn run(&mut self, body: &[Descriptor], mem: &GuestMem) -> Result<u32, Failure> {
        let (header, data) = body.split_first().ok_or(Failure::Malformed)?;
        if header.is_write_only() || header.len() < HEADER_LEN {
            return Err(Failure::Malformed);
        }
        let mut hdr = [0u8; HEADER_LEN as usize];
        mem.read_slice(&mut hdr, header.addr())
            .map_err(|_| Failure::BadAddress)?;
        let kind = u32::from_le_bytes(hdr[0..4].try_into().expect("4 bytes"));
        let sector = u64::from_le_bytes(hdr[8..16].try_into().expect("8 bytes"));
        match kind {
            VIRTIO_BLK_T_IN => {
                let len = check_data(data, true, mem)?;
                let offset = self.byte_offset(sector, len)?;
                self.read_to_guest(data, offset, mem)
                    .map_err(|_| Failure::Io)?;
                self.count(|s| {
                    s.reads = s.reads.wrapping_add(1);
                    s.bytes_read = s.bytes_read.wrapping_add(u64::from(len));
                });
                Ok(len)
            }
            VIRTIO_BLK_T_OUT => {
                if self.readonly {
                    return Err(Failure::ReadOnly);
                }
                let len = check_data(data, false, mem)?;
                let offset = self.byte_offset(sector, len)?;
                self.write_from_guest(data, offset, mem)
                    .map_err(|_| Failure::Io)?;
                if self.write_through {
                    self.file.sync_data().map_err(|_| Failure::Io)?;
                }
                self.count(|s| {
                    s.writes = s.writes.wrapping_add(1);
                    s.bytes_written = s.bytes_written.wrapping_add(u64::from(len));
                });
                Ok(0)
            }
            VIRTIO_BLK_T_FLUSH => {
                if !self.readonly {
                    self.file.sync_data().map_err(|_| Failure::Io)?;
                }
                self.count(|s| s.flushes = s.flushes.wrapping_add(1));
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => {
                let len = check_data(data, true, mem)?;
                if (len as usize) < ID_LEN {
                    return Err(Failure::ShortBuffer);
                }
                write_to_segments(&self.id, data, mem).map_err(|_| Failure::BadAddress)?;
                self.count(|s| s.get_ids = s.get_ids.wrapping_add(1));
                Ok(ID_LEN as u32)
            }
            _ => Err(Failure::Unsupported),
        }
    }

    /// The byte offset of `len` bytes at `sector`, if the whole range is on the disk.
    fn byte_offset(&self, sector: u64, len: u32) -> Result<u64, Failure> {
        let len = u64::from(len);
        if len % SECTOR_SIZE != 0 {
            return Err(Failure::Unaligned);
        }
        match sector.checked_add(len / SECTOR_SIZE) {
            // `sector <= capacity <= u64::MAX / 512`: the product cannot overflow.
            Some(end) if end <= self.capacity => Ok(sector * SECTOR_SIZE),
            _ => Err(Failure::OutOfRange),
        }
    }

    /// Reads the disk at `offset` into the data buffers, in order.
    fn read_to_guest(&self, data: &[Descriptor], offset: u64, mem: &GuestMem) -> io::Result<()> {
        let mut file = &self.file;
        file.seek(SeekFrom::Start(offset))?;
        for d in data {
            for slice in GuestMemoryBackend::get_slices(mem, d.addr(), d.len() as usize) {
                let mut slice = slice.map_err(io::Error::other)?;
                file.read_exact_volatile(&mut slice)
                    .map_err(io::Error::other)?;
            }
        }
        Ok(())
    }

    /// Writes the data buffers, in order, to the disk at `offset`.
    fn write_from_guest(&self, data: &[Descriptor], offset: u64, mem: &GuestMem) -> io::Result<()> {
        let mut file = &self.file;
        file.seek(SeekFrom::Start(offset))?;
        for d in data {
            for slice in GuestMemoryBackend::get_slices(mem, d.addr(), d.len() as usize) {
                let slice = slice.map_err(io::Error::other)?;
                file.write_all_volatile(&slice).map_err(io::Error::other)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
impl Disk {
    /// The counters, shared (for tests that read them while the engine holds the disk).
    pub(crate) fn stats_handle(&self) -> Counters<BlockStats> {
        self.stats.clone()
    }

    /// Sets write-through (what activation derives from `VIRTIO_BLK_F_FLUSH`).
    pub(crate) fn set_write_through(&mut self, on: bool) {
        self.write_through = on;
    }
}

/// The descriptors of a chain, or `None` if the chain is longer than a request can be or
/// ends early (a descriptor that says "next" was the last one the iterator gave: a loop cut off
/// by the ring-size bound, a `next` index outside the ring, an unreadable descriptor).
fn collect_chain(chain: DescriptorChain<&GuestMem>) -> Option<Vec<Descriptor>> {
    let mut descs = Vec::new();
    for d in chain {
        if descs.len() == MAX_DESCRIPTORS {
            return None;
        }
        descs.push(d);
    }
    if descs.last().is_none_or(Descriptor::has_next) {
        return None;
    }
    Some(descs)
}

/// Checks data descriptors: all in direction `writable`, inside guest RAM, at most
/// [`MAX_DATA_LEN`] bytes together. Returns the total length.
fn check_data(data: &[Descriptor], writable: bool, mem: &GuestMem) -> Result<u32, Failure> {
    let mut total = 0u32;
    for d in data {
        if d.is_write_only() != writable {
            return Err(Failure::Malformed);
        }
        total = total
            .checked_add(d.len())
            .filter(|t| *t <= MAX_DATA_LEN)
            .ok_or(Failure::TooLarge)?;
        if !mem.check_range(d.addr(), d.len() as usize) {
            return Err(Failure::BadAddress);
        }
    }
    Ok(total)
}

/// Writes `bytes` across the buffers of `data`, in order (they hold at least that many).
fn write_to_segments(
    bytes: &[u8],
    data: &[Descriptor],
    mem: &GuestMem,
) -> vm_memory::GuestMemoryResult<()> {
    let mut rest = bytes;
    for d in data {
        if rest.is_empty() {
            break;
        }
        let n = rest.len().min(d.len() as usize);
        mem.write_slice(&rest[..n], d.addr())?;
        rest = &rest[n..];
    }
    Ok(())
}

/// The queue work a [`Worker`] runs for a block device.
#[derive(Debug)]
struct BlockQueue {
    disk: Disk,
    queue: Queue,
    mem: GuestMem,
}

impl QueueHandler for BlockQueue {
    fn process(&mut self) -> Result<Pass, DeviceError> {
        self.disk.process_queue(&mut self.queue, &self.mem)
    }
}

/// The virtio-blk device: configuration and features here, requests on a worker thread while
/// the driver has it running.
#[derive(Debug)]
pub struct Block {
    /// The disk while the device is idle; `None` while the worker owns it (or if it was lost).
    disk: Option<Disk>,
    /// Running or paused while the driver has the device active.
    worker: Option<Worker<BlockQueue>>,
    /// The disk's identity, kept here because the worker owns the disk while active.
    identity: DiskIdentity,
    features: u64,
    config: [u8; CONFIG_LEN],
    stats: Counters<BlockStats>,
}

/// What identifies a disk image to the guest: a restored guest must find the same one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskIdentity {
    /// Length of the image in bytes (the capacity is its whole sectors).
    pub len: u64,
    /// Opened read-only (`VIRTIO_BLK_F_RO` offered, writes refused).
    pub readonly: bool,
    /// The GET_ID string.
    pub id: [u8; ID_LEN],
}

/// [`Block`] state: the device's side of a virtio-blk window (its transport and queues are in
/// [`super::mmio::MmioTransportState`]). The image's contents are not state: the image is a
/// file named by the VM configuration; its identity is recorded so that restoring against a
/// different image is refused.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlockState {
    /// The image behind the device.
    pub disk: DiskIdentity,
    /// Offered features.
    pub features: u64,
    /// The configuration space (`struct virtio_blk_config`, the part filled in).
    pub config: Vec<u8>,
    /// Request counters.
    pub stats: BlockStats,
}

impl Block {
    /// A block device serving `disk`.
    pub fn new(disk: Disk) -> Block {
        let mut features = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_SIZE_MAX;
        if disk.readonly {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        let mut config = [0u8; CONFIG_LEN];
        config[0..8].copy_from_slice(&disk.capacity.to_le_bytes());
        config[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        // 16..20: geometry, not offered.
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        Block {
            stats: disk.stats.clone(),
            identity: disk.identity(),
            disk: Some(disk),
            worker: None,
            features,
            config,
        }
    }

    /// Request counters so far (readable while the device runs).
    pub fn stats(&self) -> BlockStats {
        self.stats.get()
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Nothing writable: the write-cache toggle (CONFIG_WCE) is not offered.
    }

    fn activate(&mut self, activation: Activation) -> Result<(), DeviceError> {
        if self.worker.is_some() {
            return Err(DeviceError::AlreadyActive);
        }
        let Some(active) = activation.queues.into_iter().next() else {
            return Err(DeviceError::QueueNotReady { index: 0 });
        };
        let mut disk = self.disk.take().ok_or(DeviceError::BackendLost)?;
        disk.write_through = activation.features & (1 << VIRTIO_BLK_F_FLUSH) == 0;
        let handler = BlockQueue {
            disk,
            queue: active.queue,
            mem: activation.mem,
        };
        let worker = Worker::spawn(
            "pvkit-virtio-blk",
            handler,
            active.notify,
            activation.interrupt,
        )?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(worker) = self.worker.take() {
            // `None` only if the worker panicked; the device then reports BackendLost.
            self.disk = worker.stop().map(|q| q.disk);
        }
    }

    fn name(&self) -> &'static str {
        "virtio-blk"
    }

    fn queue_states(&self) -> Vec<QueueState> {
        self.worker
            .as_ref()
            .map(|w| w.with_handler(|h| vec![h.queue.state()]))
            .unwrap_or_default()
    }

    fn pause(&mut self) {
        if let Some(w) = &mut self.worker {
            w.pause();
        }
    }

    fn resume(&mut self) -> Result<(), DeviceError> {
        self.worker.as_mut().map_or(Ok(()), Worker::resume)
    }
}

impl Persist for Block {
    type State = BlockState;

    fn save(&self) -> BlockState {
        BlockState {
            disk: self.identity,
            features: self.features,
            config: self.config.to_vec(),
            stats: self.stats(),
        }
    }

    /// Checks that `state` describes this device over the same image, then loads the counters.
    /// The device must be inactive (freshly built or reset): queues are the transport's to
    /// restore, and it re-activates the device.
    fn restore(&mut self, state: &BlockState) -> Result<(), StateError> {
        const WHAT: &str = "virtio-blk";
        let disk = state.disk;
        if disk != self.identity {
            return Err(StateError::mismatch(
                WHAT,
                format!(
                    "saved with a {} byte{} image {:?}, this VM has a {} byte{} image {:?}",
                    disk.len,
                    if disk.readonly { " read-only" } else { "" },
                    String::from_utf8_lossy(&disk.id).trim_end_matches('\0'),
                    self.identity.len,
                    if self.identity.readonly {
                        " read-only"
                    } else {
                        ""
                    },
                    String::from_utf8_lossy(&self.identity.id).trim_end_matches('\0'),
                ),
            ));
        }
        if state.features != self.features || state.config != self.config {
            return Err(StateError::mismatch(
                WHAT,
                "offered features or configuration differ",
            ));
        }
        if self.worker.is_some() {
            return Err(StateError::invalid(WHAT, "restore into an active device"));
        }
        self.stats.update(|s| *s = state.stats);
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use virtio_bindings::virtio_blk::VIRTIO_BLK_T_DISCARD;
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::RawDescriptor;
    use vm_memory::GuestAddress;

    use virtio_queue::QueueT;

    use super::*;

    /// A disk image in the temp directory, removed on drop.
    pub(crate) struct TempImage(pub PathBuf);

    impl TempImage {
        /// `sectors` sectors plus `extra` bytes; byte `i` is `pattern(i)`.
        pub(crate) fn new(sectors: u64, extra: u64) -> TempImage {
            static N: AtomicU64 = AtomicU64::new(0);
            let path = std::env::temp_dir().join(format!(
                "pvkit-blk-{}-{}.img",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let len = sectors * SECTOR_SIZE + extra;
            let bytes: Vec<u8> = (0..len).map(pattern).collect();
            std::fs::write(&path, bytes).unwrap();
            TempImage(path)
        }

        pub(crate) fn bytes(&self) -> Vec<u8> {
            std::fs::read(&self.0).unwrap()
        }
    }

    impl Drop for TempImage {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    pub(crate) fn pattern(i: u64) -> u8 {
        (i % 251) as u8
    }

    pub(crate) const MEM_SIZE: u64 = 4 << 20;
    pub(crate) const RING: u64 = 0x1_0000;
    pub(crate) const HDR: u64 = 0x8_0000;
    pub(crate) const STATUS: u64 = 0x9_0000;
    pub(crate) const BUF: u64 = 0x10_0000;

    pub(crate) fn guest_memory() -> GuestMem {
        GuestMem::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
    }

    /// A minimal split-ring driver over test guest memory.
    pub(crate) struct Driver<'m> {
        pub mem: &'m GuestMem,
        pub size: u16,
        pub desc: u64,
        pub avail: u64,
        pub used: u64,
        next_desc: u16,
        avail_idx: u16,
    }

    pub(crate) const R: bool = false;
    pub(crate) const W: bool = true;

    impl<'m> Driver<'m> {
        pub(crate) fn new(mem: &'m GuestMem, base: u64, size: u16) -> Driver<'m> {
            Driver {
                mem,
                size,
                desc: base,
                avail: base + 0x1000,
                used: base + 0x2000,
                next_desc: 0,
                avail_idx: 0,
            }
        }

        /// A ready queue over this driver's rings, as the transport would build it.
        pub(crate) fn queue(&self, event_idx: bool) -> Queue {
            let mut q = Queue::new(QUEUE_SIZE).unwrap();
            q.try_set_size(self.size).unwrap();
            q.try_set_desc_table_address(GuestAddress(self.desc))
                .unwrap();
            q.try_set_avail_ring_address(GuestAddress(self.avail))
                .unwrap();
            q.try_set_used_ring_address(GuestAddress(self.used))
                .unwrap();
            q.set_event_idx(event_idx);
            q.set_ready(true);
            assert!(q.is_valid(self.mem));
            q
        }

        pub(crate) fn put_desc(&self, index: u16, addr: u64, len: u32, flags: u32, next: u16) {
            let d = Descriptor::new(addr, len, flags as u16, next);
            self.mem
                .write_obj(
                    RawDescriptor::from(d),
                    GuestAddress(self.desc + 16 * u64::from(index)),
                )
                .unwrap();
        }

        /// Writes a chain of `(addr, len, device-writable)` buffers and makes it available.
        pub(crate) fn submit(&mut self, parts: &[(u64, u32, bool)]) -> u16 {
            if usize::from(self.next_desc) + parts.len() > usize::from(self.size) {
                self.next_desc = 0;
            }
            let head = self.next_desc;
            for (i, &(addr, len, writable)) in parts.iter().enumerate() {
                let index = head + i as u16;
                let mut flags = if writable { VRING_DESC_F_WRITE } else { 0 };
                if i + 1 < parts.len() {
                    flags |= VRING_DESC_F_NEXT;
                }
                self.put_desc(index, addr, len, flags, index + 1);
            }
            self.next_desc += parts.len() as u16;
            self.publish(head);
            head
        }

        /// Makes the chain at `head` available.
        pub(crate) fn publish(&mut self, head: u16) {
            let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
            self.mem.write_obj(head, GuestAddress(slot)).unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
            self.set_avail_idx(self.avail_idx);
        }

        pub(crate) fn set_avail_idx(&self, idx: u16) {
            self.mem
                .write_obj(idx, GuestAddress(self.avail + 2))
                .unwrap();
        }

        /// `(id, len)` of used element `i`.
        pub(crate) fn used_elem(&self, i: u16) -> (u32, u32) {
            let at = self.used + 4 + 8 * u64::from(i % self.size);
            let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
            (id, len)
        }

        pub(crate) fn used_idx(&self) -> u16 {
            self.mem.read_obj(GuestAddress(self.used + 2)).unwrap()
        }

        /// `used_event`: the driver wants an interrupt once the used index passes it.
        pub(crate) fn set_used_event(&self, v: u16) {
            let at = self.avail + 4 + 2 * u64::from(self.size);
            self.mem.write_obj(v, GuestAddress(at)).unwrap();
        }

        /// `avail_event`, written by the device.
        pub(crate) fn avail_event(&self) -> u16 {
            let at = self.used + 4 + 8 * u64::from(self.size);
            self.mem.read_obj(GuestAddress(at)).unwrap()
        }
    }

    /// Runs `f` on its own thread and returns its result, failing the test (instead of hanging
    /// it) if that takes more than 10 s. A hung `f` is left behind on its thread.
    pub(crate) fn within<T: Send + 'static>(
        what: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        let (done, result) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = done.send(f());
        });
        result
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{what} did not finish within 10 s ({e})"))
    }

    /// The ring of issue 13, finding 1, on `drv`'s rings: the used ring laid on the available
    /// ring, so that every used-index write is an available-index write. The device positions
    /// are where a guest left them after publishing 65536 − size chains with heads outside the
    /// ring, consumed but never used (what the device did before such a head broke the ring):
    /// `next_avail` = 65536 − size, `next_used` = 0, with one chain available. From there each
    /// completion publishes one more chain (the available index stays a whole ring ahead), and
    /// the used elements written over the available slots name heads 0, 1 (a used length of
    /// 0 or 1) and 0: with chains at heads 0 and 1 the ring never empties.
    pub(crate) fn self_feeding_queue(drv: &mut Driver<'_>) -> Queue {
        drv.used = drv.avail;
        let ring_len = 6 + 8 * usize::from(drv.size);
        drv.mem
            .write_slice(&vec![0; ring_len], GuestAddress(drv.avail))
            .unwrap();
        let mut q = Queue::new(QUEUE_SIZE).unwrap();
        q.try_set_size(drv.size).unwrap();
        q.try_set_desc_table_address(GuestAddress(drv.desc))
            .unwrap();
        q.try_set_avail_ring_address(GuestAddress(drv.avail))
            .unwrap();
        q.try_set_used_ring_address(GuestAddress(drv.used)).unwrap();
        q.set_ready(true);
        assert!(q.is_valid(drv.mem), "virtio-queue alone accepts the layout");
        let start = 0u16.wrapping_sub(drv.size);
        q.set_next_avail(start);
        q.set_next_used(0);
        drv.set_avail_idx(start.wrapping_add(1));
        q
    }

    /// [`self_feeding_queue`] with two block requests of an unknown type (answered UNSUPP,
    /// used length 1, no disk I/O) at heads 0 and 1.
    pub(crate) fn self_feeding_block_queue(drv: &mut Driver<'_>) -> Queue {
        header(drv.mem, HDR, 0xdead_beef, 0);
        let next = VRING_DESC_F_NEXT;
        drv.put_desc(0, HDR, 16, next, 2);
        drv.put_desc(1, HDR, 16, next, 3);
        drv.put_desc(2, STATUS, 1, VRING_DESC_F_WRITE, 0);
        drv.put_desc(3, STATUS, 1, VRING_DESC_F_WRITE, 0);
        self_feeding_queue(drv)
    }

    pub(crate) fn header(mem: &GuestMem, addr: u64, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(addr)).unwrap();
    }

    pub(crate) fn status(mem: &GuestMem) -> u8 {
        mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    fn fill(mem: &GuestMem, addr: u64, len: usize, byte: u8) {
        mem.write_slice(&vec![byte; len], GuestAddress(addr))
            .unwrap();
    }

    fn guest_bytes(mem: &GuestMem, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    /// A 16-entry queue, a disk of `sectors` sectors, everything ready to submit.
    struct Bench<'m> {
        mem: &'m GuestMem,
        drv: Driver<'m>,
        queue: Queue,
        disk: Disk,
        image: TempImage,
    }

    impl<'m> Bench<'m> {
        fn new(mem: &'m GuestMem, sectors: u64, readonly: bool) -> Bench<'m> {
            let image = TempImage::new(sectors, 0);
            let disk = Disk::open(&image.0, readonly).unwrap();
            let drv = Driver::new(mem, RING, 16);
            let queue = drv.queue(false);
            Bench {
                mem,
                drv,
                queue,
                disk,
                image,
            }
        }

        /// Submits one chain, processes the queue, returns (status byte, used len).
        fn request(&mut self, kind: u32, sector: u64, data: &[(u64, u32, bool)]) -> (u8, u32) {
            header(self.mem, HDR, kind, sector);
            let mut parts = vec![(HDR, 16, R)];
            parts.extend_from_slice(data);
            parts.push((STATUS, 1, W));
            self.chain(&parts)
        }

        /// Submits `parts` as one chain, processes the queue, returns (status, used len).
        fn chain(&mut self, parts: &[(u64, u32, bool)]) -> (u8, u32) {
            self.mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
            let head = self.drv.submit(parts);
            self.process_one(head)
        }

        fn process_one(&mut self, head: u16) -> (u8, u32) {
            let before = self.drv.used_idx();
            self.disk.process_queue(&mut self.queue, self.mem).unwrap();
            assert_eq!(
                self.drv.used_idx(),
                before.wrapping_add(1),
                "one completion"
            );
            let (id, len) = self.drv.used_elem(before);
            assert_eq!(id, u32::from(head));
            (status(self.mem), len)
        }
    }

    const OK: u8 = VIRTIO_BLK_S_OK as u8;
    const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
    const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
    const NO_STATUS: u8 = 0xee;

    #[test]
    fn block_state_round_trips_and_refuses_another_image() {
        let image = TempImage::new(8, 100);
        let b = Block::new(Disk::open(&image.0, false).unwrap());
        b.stats.update(|s| {
            s.reads = 3;
            s.bytes_read = 1536;
        });
        let mut fresh = Block::new(Disk::open(&image.0, false).unwrap());
        let json = crate::state::assert_round_trip(&b, &mut fresh);
        assert!(json.contains("\"len\":4196"), "{json}");
        assert_eq!(fresh.stats().reads, 3);

        let state = b.save();
        let refused = |mut other: Block, why: &str| {
            let before = other.save();
            let e = other.restore(&state).expect_err(why);
            assert!(matches!(e, StateError::Mismatch { .. }), "{why}: {e}");
            assert_eq!(other.save(), before, "{why}: unchanged");
        };
        // Same name and sectors, another length.
        let other = TempImage::new(8, 0);
        let disk = Disk::open(&other.0, false).unwrap().with_id(&state.disk.id);
        refused(Block::new(disk), "length");
        refused(Block::new(Disk::open(&image.0, true).unwrap()), "read-only");
        refused(
            Block::new(Disk::open(&image.0, false).unwrap().with_id(b"other")),
            "id",
        );
        let mut tampered = state.clone();
        tampered.features |= 1 << 40;
        let mut fresh = Block::new(Disk::open(&image.0, false).unwrap());
        assert!(matches!(
            fresh.restore(&tampered),
            Err(StateError::Mismatch { .. })
        ));
        tampered = state.clone();
        tampered.config.truncate(3);
        assert!(matches!(
            fresh.restore(&tampered),
            Err(StateError::Mismatch { .. })
        ));
    }

    #[test]
    fn capacity_features_and_config() {
        let image = TempImage::new(8, 100);
        let block = Block::new(Disk::open(&image.0, false).unwrap());
        assert_eq!(block.device_type(), VIRTIO_ID_BLOCK);
        assert_eq!(block.queue_max_sizes(), &[QUEUE_SIZE]);
        let f = block.features();
        for bit in [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_SIZE_MAX,
        ] {
            assert_ne!(f & 1 << bit, 0, "bit {bit}");
        }
        assert_eq!(f & 1 << VIRTIO_BLK_F_RO, 0);
        let mut b8 = [0u8; 4];
        block.read_config(0, &mut b8);
        assert_eq!(u32::from_le_bytes(b8), 8, "capacity in whole sectors");
        block.read_config(4, &mut b8);
        assert_eq!(b8, [0; 4]);
        block.read_config(8, &mut b8);
        assert_eq!(u32::from_le_bytes(b8), SIZE_MAX);
        block.read_config(12, &mut b8);
        assert_eq!(u32::from_le_bytes(b8), SEG_MAX);
        block.read_config(20, &mut b8);
        assert_eq!(u32::from_le_bytes(b8), 512);
        block.read_config(24, &mut b8);
        assert_eq!(b8, [0; 4]);

        let ro = Block::new(Disk::open(&image.0, true).unwrap());
        assert_ne!(ro.features() & 1 << VIRTIO_BLK_F_RO, 0);
    }

    #[test]
    fn opening_a_missing_image_says_what_to_do() {
        let e = Disk::open(Path::new("/nonexistent/pvkit.img"), false).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("cannot open disk image /nonexistent/pvkit.img"),
            "{msg}"
        );
        assert!(msg.contains("--readonly"), "{msg}");
    }

    #[test]
    fn write_then_read_round_trip_hits_the_file_byte_for_byte() {
        let mem = guest_memory();
        let mut b = Bench::new(&mem, 16, false);
        let original = b.image.bytes();
        // Two segments in different guest pages, out of address order.
        let (a, c) = (BUF + 0x3000, BUF);
        let payload: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 3) as u8).collect();
        mem.write_slice(&payload[..512], GuestAddress(a)).unwrap();
        mem.write_slice(&payload[512..], GuestAddress(c)).unwrap();
        let r = b.request(VIRTIO_BLK_T_OUT, 3, &[(a, 512, R), (c, 512, R)]);
        assert_eq!(r, (OK, 1));
        let mut expected = original.clone();
        expected[3 * 512..5 * 512].copy_from_slice(&payload);
        assert_eq!(b.image.bytes(), expected, "exactly sectors 3 and 4 changed");

        // Read sectors 2..6 back into three segments.
        fill(&mem, BUF + 0x10_000, 4 * 512, 0x55);
        let r = b.request(
            VIRTIO_BLK_T_IN,
            2,
            &[
                (BUF + 0x10_000, 1024, W),
                (BUF + 0x20_000, 512, W),
                (BUF + 0x30_000, 512, W),
            ],
        );
        assert_eq!(r, (OK, 2048 + 1), "used length counts data and status");
        let mut got = guest_bytes(&mem, BUF + 0x10_000, 1024);
        got.extend(guest_bytes(&mem, BUF + 0x20_000, 512));
        got.extend(guest_bytes(&mem, BUF + 0x30_000, 512));
        assert_eq!(got, expected[2 * 512..6 * 512]);
        let s = b.disk.stats();
        assert_eq!(
            (s.reads, s.writes, s.bytes_read, s.bytes_written),
            (1, 1, 2048, 1024)
        );
    }

    #[test]
    fn out_of_range_sectors_fail_and_touch_nothing() {
        let mem = guest_memory();
        let mut b = Bench::new(&mem, 8, false);
        let original = b.image.bytes();
        fill(&mem, BUF, 1024, 0xab);
        for sector in [7, 8, 9, u64::MAX, u64::MAX / 512, u64::MAX - 1] {
            let r = b.request(VIRTIO_BLK_T_OUT, sector, &[(BUF, 1024, R)]);
            assert_eq!(r, (IOERR, 1), "write at {sector}");
            let r = b.request(VIRTIO_BLK_T_IN, sector, &[(BUF, 1024, W)]);
            assert_eq!(r, (IOERR, 1), "read at {sector}");
        }
        assert_eq!(b.image.bytes(), original);
        assert_eq!(guest_bytes(&mem, BUF, 1024), vec![0xab; 1024]);
        // The last full range is fine.
        assert_eq!(b.request(VIRTIO_BLK_T_IN, 6, &[(BUF, 1024, W)]), (OK, 1025));
        assert_eq!(b.disk.stats().io_errors, 12);
    }

    #[test]
    fn read_only_disks_reject_writes() {
        let mem = guest_memory();
        let mut b = Bench::new(&mem, 8, true);
        let original = b.image.bytes();
        fill(&mem, BUF, 512, 0xcd);
        assert_eq!(b.request(VIRTIO_BLK_T_OUT, 0, &[(BUF, 512, R)]), (IOERR, 1));
        assert_eq!(b.image.bytes(), original);
        assert_eq!(b.request(VIRTIO_BLK_T_IN, 1, &[(BUF, 512, W)]), (OK, 513));
        assert_eq!(guest_bytes(&mem, BUF, 512), original[512..1024]);
        assert_eq!(b.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (OK, 1));
    }

    #[test]
    fn oversize_requests_fail() {
        let mem = guest_memory();
        let mut b = Bench::new(&mem, 4096, false);
        fill(&mem, BUF, (1 << 20) + 512, 0x11);
        // 1 MiB + 512 in two segments.
        let r = b.request(
            VIRTIO_BLK_T_IN,
            0,
            &[(BUF, 1 << 19, W), (BUF + (1 << 19), (1 << 19) + 512, W)],
        );
        assert_eq!(r, (IOERR, 1));
        assert!(
            guest_bytes(&mem, BUF, 4096).iter().all(|&x| x == 0x11),
            "nothing read"
        );
        // Lengths that overflow a u32 when summed: virtio-queue's iterator ends the chain
        // there, so it has no status byte and completes with used length 0.
        let r = b.request(VIRTIO_BLK_T_IN, 0, &[(BUF, u32::MAX, W), (BUF, 4096, W)]);
        assert_eq!(r, (NO_STATUS, 0));
        let r = b.request(VIRTIO_BLK_T_IN, 0, &[(BUF, u32::MAX - 512, W)]);
        assert_eq!(r, (IOERR, 1));
        let r = b.request(VIRTIO_BLK_T_OUT, 0, &[(BUF, u32::MAX - 511, R)]);
        assert_eq!(r, (IOERR, 1));
        // Exactly the limit is fine.
        let r = b.request(VIRTIO_BLK_T_IN, 0, &[(BUF, 1 << 20, W)]);
        assert_eq!(r, (OK, (1 << 20) + 1));
        assert_eq!(guest_bytes(&mem, BUF, 1 << 20), b.image.bytes()[..1 << 20]);
    }

    #[test]
    fn lengths_that_are_not_whole_sectors_fail() {
        let mem = guest_memory();
        let mut b = Bench::new(&mem, 8, false);
        let original = b.image.bytes();
        assert_eq!(b.request(VIRTIO_BLK_T_OUT, 0, &[(BUF, 100, R)]), (IOERR, 1));
        assert_eq!(
            b.request(VIRTIO_BLK_T_OUT, 0, &[(BUF, 512, R), (BUF, 1, R)]),
            (IOERR, 1)
        );
        assert_eq!(b.request(VIRTIO_BLK_T_IN, 0, &[(BUF, 511, W)]), (IOERR, 1));
        assert_eq!(b.image.bytes(), original);
    }

    #[test]
    fn descriptors_in_the_wrong_direction_fail() {
        let mem = guest_memory();
        let mut b = Bench::new(&mem, 8, false);
        let original = b.image.bytes();
        // Data the device would have to write, marked device-readable, and vice versa.
        assert_eq!(b.request(VIRTIO_BLK_T_IN, 0, &[(BUF, 512, R)]), (IOERR, 1));
        assert_eq!(b.request(VIRTIO_BLK_T_OUT, 0, &[(BUF, 512, W)]), (IOERR, 1));
        assert_eq!(
            b.request(VIRTIO_BLK_T_GET_ID, 0, &[(BUF, 20, R)]),
            (IOERR, 1)
        );
        // A device-writable header.
        header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            b.chain(&[(HDR, 16, W), (BUF, 512, W), (STATUS, 1, W)]),
            (IOERR, 1)
        );
        // A device-readable status byte: nothing is written, used length 0.
        assert_eq!(
            b.chain(&[(HDR, 16, R), (BUF, 512, W), (STATUS, 1, R)]),
            (NO_STATUS, 0)
        );
        assert_eq!(b.image.bytes(), original);
        assert_eq!(b.disk.stats().unanswerable, 1);
    }

    #[test]
    fn buffers_outside_guest_memory_fail_without_touching_anything() {
        let mem = guest_memory();
        let mut b = Bench::new(&mem, 8, false);
        let original = b.image.bytes();
        // Each address leaves a 16-byte header or a 512-byte buffer (partly) outside RAM.
        for addr in [
            MEM_SIZE - 8,
            MEM_SIZE,
            0xC000_0000,
            u64::MAX - 100,
            u64::MAX,
        ] {
            assert_eq!(b.request(VIRTIO_BLK_T_IN, 0, &[(addr, 512, W)]), (IOERR, 1));
            assert_eq!(
                b.request(VIRTIO_BLK_T_OUT, 0, &[(addr, 512, R)]),
                (IOERR, 1)
            );
            assert_eq!(
                b.request(VIRTIO_BLK_T_GET_ID, 0, &[(addr, 512, W)]),
                (IOERR, 1)
            );
            // The header outside RAM.
            assert_eq!(
                b.chain(&[(addr, 16, R), (BUF, 512, W), (STATUS, 1, W)]),
                (IOERR, 1)
            );
        }
        // The status byte outside RAM: no status, used length 0.
        for addr in [MEM_SIZE, 0xC000_0000, u64::MAX] {
            header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
            assert_eq!(
                b.chain(&[(HDR, 16, R), (BUF, 512, W), (addr, 1, W)]),
                (NO_STATUS, 0)
            );
        }
        // A good buffer before a bad one: the request fails before any I/O.
        fill(&mem, BUF, 512, 0x77);
        assert_eq!(
            b.request(
                VIRTIO_BLK_T_IN,
                0,
                &[(BUF, 512, W), (MEM_SIZE - 100, 512, W)]
            ),
            (IOERR, 1)
        );
        assert_eq!(guest_bytes(&mem, BUF, 512), vec![0x77; 512]);
        assert_eq!(b.image.bytes(), original);
    }

    #[test]
    fn chains_without_header_or_status() {
        let mem = guest_memory();
        let mut b = Bench::new(&mem, 8, false);
        // Only a status byte: nothing to run, IOERR.
        assert_eq!(b.chain(&[(STATUS, 1, W)]), (IOERR, 1));
        // Only a header: nowhere to answer.
        assert_eq!(b.chain(&[(HDR, 16, R)]), (NO_STATUS, 0));
        // A short header.
        header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(b.chain(&[(HDR, 8, R), (STATUS, 1, W)]), (IOERR, 1));
        // An empty status descriptor.
        assert_eq!(b.chain(&[(HDR, 16, R), (STATUS, 0, W)]), (NO_STATUS, 0));
        // Still working.
        assert_eq!(b.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (OK, 1));
    }

    #[test]
    fn descriptor_loops_and_bad_next_indices_end() {
        let mem = guest_memory();
        let mut b = Bench::new(&mem, 8, false);
        header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
        let next = VRING_DESC_F_NEXT;
        // 0 -> 1 -> 2 -> 1 -> ...
        b.drv.put_desc(0, HDR, 16, next, 1);
        b.drv.put_desc(1, BUF, 512, next | VRING_DESC_F_WRITE, 2);
        b.drv.put_desc(2, STATUS, 1, next | VRING_DESC_F_WRITE, 1);
        b.drv.publish(0);
        mem.write_obj(NO_STATUS, GuestAddress(STATUS)).unwrap();
        assert_eq!(b.process_one(0), (NO_STATUS, 0));
        // A self-loop on the head.
        b.drv.put_desc(3, HDR, 16, next, 3);
        b.drv.publish(3);
        assert_eq!(b.process_one(3), (NO_STATUS, 0));
        // `next` past the ring.
        b.drv.put_desc(4, HDR, 16, next, 999);
        b.drv.publish(4);
        assert_eq!(b.process_one(4), (NO_STATUS, 0));
        // The queue keeps working.
        b.drv.next_desc = 5;
        assert_eq!(b.request(VIRTIO_BLK_T_IN, 0, &[(BUF, 512, W)]), (OK, 513));
        assert_eq!(b.disk.stats().unanswerable, 3);
        // A head index past the ring names no descriptor and cannot be given back: the ring
        // is broken (the device needs a reset) rather than consumed silently, which would let
        // the available index run ahead of the used one.
        b.drv.publish(999);
        let before = b.drv.used_idx();
        let e = b.disk.process_queue(&mut b.queue, &mem).unwrap_err();
        assert!(
            matches!(
                e,
                DeviceError::HeadOutOfRange {
                    head: 999,
                    size: 16
                }
            ),
            "{e}"
        );
        assert_eq!(b.drv.used_idx(), before);
    }

    #[test]
    fn chains_longer_than_a_request_can_be_are_cut_off() {
        let mem = guest_memory();
        let mut b = Bench::new(&mem, 8, false);
        header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
        // An indirect table with 300 chained descriptors (virtio-queue follows indirect
        // tables even where the feature was not negotiated).
        let table = BUF + 0x10_0000;
        let n = 300u16;
        for i in 0..n {
            let (addr, len, mut flags) = match i {
                0 => (HDR, 16, 0),
                _ if i == n - 1 => (STATUS, 1, VRING_DESC_F_WRITE),
                _ => (BUF, 512, VRING_DESC_F_WRITE),
            };
            if i + 1 < n {
                flags |= VRING_DESC_F_NEXT;
            }
            let d = Descriptor::new(addr, len, flags as u16, i + 1);
            mem.write_obj(
                RawDescriptor::from(d),
                GuestAddress(table + 16 * u64::from(i)),
            )
            .unwrap();
        }
        b.drv
            .put_desc(0, table, 16 * u32::from(n), VRING_DESC_F_INDIRECT, 0);
        b.drv.publish(0);
        mem.write_obj(NO_STATUS, GuestAddress(STATUS)).unwrap();
        assert_eq!(b.process_one(0), (NO_STATUS, 0));
    }

    #[test]
    fn get_id_returns_twenty_bytes() {
        let mem = guest_memory();
        let mut b = Bench::new(&mem, 8, false);
        b.disk = Disk::open(&b.image.0, false)
            .unwrap()
            .with_id(b"pvkit-disk-0123456789-too-long");
        fill(&mem, BUF, 64, 0xff);
        assert_eq!(b.request(VIRTIO_BLK_T_GET_ID, 0, &[(BUF, 32, W)]), (OK, 21));
        assert_eq!(guest_bytes(&mem, BUF, 20), b"pvkit-disk-012345678");
        assert_eq!(
            guest_bytes(&mem, BUF + 20, 12),
            vec![0xff; 12],
            "only 20 bytes"
        );
        // Split over two buffers.
        assert_eq!(
            b.request(
                VIRTIO_BLK_T_GET_ID,
                0,
                &[(BUF + 0x100, 8, W), (BUF + 0x200, 12, W)]
            ),
            (OK, 21)
        );
        let mut id = guest_bytes(&mem, BUF + 0x100, 8);
        id.extend(guest_bytes(&mem, BUF + 0x200, 12));
        assert_eq!(id, b"pvkit-disk-012345678");
        // Too small a buffer.
        assert_eq!(
            b.request(VIRTIO_BLK_T_GET_ID, 0, &[(BUF, 19, W)]),
            (IOERR, 1)
        );
        // The default id is the file name.
        let file_name = b.image.0.file_name().unwrap().as_encoded_bytes().to_vec();
        b.disk = Disk::open(&b.image.0, false).unwrap();
        assert_eq!(b.request(VIRTIO_BLK_T_GET_ID, 0, &[(BUF, 20, W)]), (OK, 21));
        let n = file_name.len().min(20);
        assert_eq!(guest_bytes(&mem, BUF, n), file_name[..n]);
    }

    #[test]
    fn flush_succeeds_and_is_counted() {
        let mem = guest_memory();
        let mut b = Bench::new(&mem, 8, false);
        b.disk.write_through = false;
        fill(&mem, BUF, 512, 0x42);
        assert_eq!(b.request(VIRTIO_BLK_T_OUT, 5, &[(BUF, 512, R)]), (OK, 1));
        assert_eq!(b.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (OK, 1));
        assert_eq!(b.image.bytes()[5 * 512..6 * 512], vec![0x42; 512]);
        assert_eq!(b.disk.stats().flushes, 1);
    }

    #[test]
    fn unknown_request_types_are_unsupported() {
        let mem = guest_memory();
        let mut b = Bench::new(&mem, 8, false);
        let original = b.image.bytes();
        for kind in [VIRTIO_BLK_T_DISCARD, 2, 0xdead_beef] {
            assert_eq!(
                b.request(kind, 0, &[(BUF, 512, R)]),
                (UNSUPP, 1),
                "type {kind}"
            );
        }
        assert_eq!(b.image.bytes(), original);
        assert_eq!(b.disk.stats().unsupported, 3);
    }

    #[test]
    fn event_idx_asks_for_an_interrupt_only_when_used_event_is_passed() {
        let mem = guest_memory();
        let mut b = Bench::new(&mem, 8, false);
        b.queue = b.drv.queue(true);
        // The driver wants to hear once the 6th request (used index 5 -> 6) is done.
        b.drv.set_used_event(5);
        header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
        b.drv.submit(&[(HDR, 16, R), (STATUS, 1, W)]);
        assert!(
            !b.disk.process_queue(&mut b.queue, &mem).unwrap().interrupt,
            "1 used: no interrupt"
        );
        assert_eq!(
            b.drv.avail_event(),
            1,
            "the device asks to be notified of the next one"
        );
        for _ in 0..3 {
            b.drv.submit(&[(HDR, 16, R), (STATUS, 1, W)]);
        }
        assert!(
            !b.disk.process_queue(&mut b.queue, &mem).unwrap().interrupt,
            "4 used: no interrupt"
        );
        assert_eq!(b.drv.avail_event(), 4);
        for _ in 0..2 {
            b.drv.submit(&[(HDR, 16, R), (STATUS, 1, W)]);
        }
        assert!(
            b.disk.process_queue(&mut b.queue, &mem).unwrap().interrupt,
            "6 used: interrupt"
        );
        assert_eq!(b.drv.used_idx(), 6);
        // Nothing new: no interrupt.
        assert!(!b.disk.process_queue(&mut b.queue, &mem).unwrap().interrupt);

        // Without EVENT_IDX every batch that used something interrupts.
        let mut b = Bench::new(&mem, 8, false);
        b.drv.set_used_event(100);
        b.drv.submit(&[(HDR, 16, R), (STATUS, 1, W)]);
        assert!(b.disk.process_queue(&mut b.queue, &mem).unwrap().interrupt);
        assert!(
            !b.disk.process_queue(&mut b.queue, &mem).unwrap().interrupt,
            "nothing used"
        );
    }

    #[test]
    fn an_avail_index_running_ahead_is_an_error_not_a_hang() {
        let mem = guest_memory();
        let mut b = Bench::new(&mem, 8, false);
        b.drv.set_avail_idx(100);
        let e = b.disk.process_queue(&mut b.queue, &mem).unwrap_err();
        assert!(matches!(e, DeviceError::Ring(_)), "{e}");
    }

    /// Finding 1 at the engine: a ring that feeds itself is served one budget (the queue size)
    /// per call, and the call says more is left instead of looping for ever.
    #[test]
    fn a_ring_that_feeds_itself_is_served_in_bounded_passes() {
        let mem = guest_memory();
        let mut drv = Driver::new(&mem, RING, 16);
        let queue = self_feeding_block_queue(&mut drv);
        let image = TempImage::new(8, 0);
        let disk = Disk::open(&image.0, false).unwrap();
        let m = mem.clone();
        let (disk, queue) = within("three passes", move || {
            let (mut disk, mut queue) = (disk, queue);
            for pass in 1..=3u16 {
                let p = disk.process_queue(&mut queue, &m).unwrap();
                assert!(p.more, "pass {pass}: the ring is not empty");
                assert_eq!(queue.next_used(), 16 * pass);
            }
            (disk, queue)
        });
        assert_eq!(disk.stats().unsupported, 48);
        assert_eq!(drv.used_idx(), 48, "(also the available index)");
        assert_eq!(queue.next_avail(), 48u16.wrapping_sub(16));
        assert_eq!(image.bytes(), TempImage::new(8, 0).bytes(), "no disk I/O");
    }

    /// Finding 1 at the worker: with the ring above, one notification keeps the worker busy
    /// pass after pass, yet pause and reset still stop and join its thread promptly (they used
    /// to wait for it for ever), and nothing runs after them.
    #[test]
    fn pause_and_reset_stop_a_worker_whose_ring_never_empties() {
        use super::super::{ActiveQueue, Interrupt};
        use vmm_sys_util::eventfd::EventFd;

        let mem = guest_memory();
        let image = TempImage::new(8, 0);
        let mut block = Block::new(Disk::open(&image.0, false).unwrap());
        let mut drv = Driver::new(&mem, RING, 16);
        let queue = self_feeding_block_queue(&mut drv);
        let notify = EventFd::new(0).unwrap();
        let kick = notify.try_clone().unwrap();
        block
            .activate(Activation {
                mem: mem.clone(),
                queues: vec![ActiveQueue { queue, notify }],
                features: 1 << VIRTIO_F_VERSION_1,
                interrupt: Interrupt::new(|| {}),
            })
            .unwrap();
        kick.write(1).unwrap();
        let stats = block.stats.clone();
        let served = move || stats.get().unsupported;
        crate::test_util::wait_until("many passes", || served() > 1000);
        let mut block = within("the pause", move || {
            block.pause();
            block
        });
        let n = served();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(served(), n, "nothing runs while paused");
        block.resume().unwrap();
        crate::test_util::wait_until("more passes", || served() > n + 1000);
        let block = within("the reset", move || {
            block.reset();
            block
        });
        assert!(
            block.disk.is_some(),
            "the thread was joined, the disk is back"
        );
        let n = served();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(served(), n, "nothing runs after the reset");
    }

    #[test]
    fn reset_returns_the_disk_for_the_next_activation() {
        use super::super::{ActiveQueue, Interrupt};
        use vmm_sys_util::eventfd::EventFd;

        use crate::devices::event::EventQueue;

        let mem = guest_memory();
        let image = TempImage::new(8, 0);
        let mut block = Block::new(Disk::open(&image.0, false).unwrap());
        for round in 0..2u8 {
            let mut events = EventQueue::default();
            let waker = events.waker();
            let irq = Interrupt::new(move || waker.wake());
            let mut drv = Driver::new(&mem, RING, 16);
            mem.write_slice(&[0; 0x3000], GuestAddress(RING)).unwrap();
            let notify = EventFd::new(0).unwrap();
            let kick = notify.try_clone().unwrap();
            block
                .activate(Activation {
                    mem: mem.clone(),
                    queues: vec![ActiveQueue {
                        queue: drv.queue(true),
                        notify,
                    }],
                    features: 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX,
                    interrupt: irq.clone(),
                })
                .unwrap();
            assert!(matches!(
                block.activate(Activation {
                    mem: mem.clone(),
                    queues: vec![],
                    features: 0,
                    interrupt: irq.clone(),
                }),
                Err(DeviceError::AlreadyActive)
            ));
            fill(&mem, BUF, 512, round + 1);
            header(&mem, HDR, VIRTIO_BLK_T_OUT, u64::from(round));
            drv.submit(&[(HDR, 16, R), (BUF, 512, R), (STATUS, 1, W)]);
            kick.write(1).unwrap();
            assert_eq!(events.wait(Some(Duration::from_secs(5))).events(), 1);
            assert_eq!(drv.used_idx(), 1);
            assert_eq!(status(&mem), OK);
            block.reset();
            assert!(block.disk.is_some(), "the disk is back");
        }
        let bytes = image.bytes();
        assert_eq!(bytes[..512], vec![1; 512]);
        assert_eq!(bytes[512..1024], vec![2; 512]);
        assert_eq!(block.stats().writes, 2);
    }
}
