//! Snapshots on disk: a directory holding a paused VM, so that `host-vmm restore DIR` continues
//! it in a new process.
//!
//! # Format (version [`FORMAT_VERSION`])
//!
//! - `state.json`: [`SnapshotFile`] — the format name and version, how the VM was configured
//!   (mode, memory size, workload and arguments, disabled features, disk, virtio-console), the
//!   vCPU's and the machine's state, and the memory file's description ([`MemoryFile`]: size,
//!   checksum, pages written, and pages elided by reason); the CRC-32 of everything else in the
//!   file is in `state_crc32`.
//! - `memory.bin`: guest RAM, a sparse file of exactly the RAM size. Only pages with data are
//!   written; every other page is a hole and reads back as zero: pages the host does not back
//!   (never written, or released by the guest), pages the PV guest reported free, and
//!   all-zero pages. `memory.crc32` is the CRC-32 of each written page's number (u64,
//!   little-endian) followed by its 4096 bytes, in ascending order.
//! - `kernel.elf`: the kernel image, so a restore needs nothing outside the directory (its
//!   CRC-32 is `kernel_crc32` in `state.json`).
//!
//! Restoring maps `memory.bin` privately as guest RAM: nothing of RAM is copied, a page is
//! read when first touched. Checking the file reads only its data (`SEEK_DATA`/`SEEK_HOLE`),
//! so restore time grows with the data saved, not with RAM size.
//!
//! Everything read back is checked before any guest code runs: the format name and version,
//! both checksums, the memory file's size and page count, and then every state structure by
//! its own `restore`. A snapshot that fails any check gives one error naming what is wrong.

use std::fs::File;
use std::path::{Path, PathBuf};

use hypercall_abi::boot::Mode;
use hypercall_abi::layout::PAGE_SIZE;
use serde::{Deserialize, Serialize};

use crate::config::{DiskConfig, KernelImage, VmConfig};
use crate::error::{Error, Result};
use crate::machine::MachineState;
use crate::memory::{PageBits, PageClass, RamView};
use crate::vcpu::{ControlError, VcpuState};
use crate::vm::{Vm, VmHandle};

/// The format name in `state.json`.
pub const FORMAT: &str = "pvkit-snapshot";
/// The format version this host-vmm writes and reads.
pub const FORMAT_VERSION: u32 = 2;

/// How the saved VM was configured: what `restore` builds before loading the state.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SavedConfig {
    /// `pv` or `trapped`.
    pub mode: String,
    /// Feature bits cleared with `--disable`.
    pub disable: u64,
    /// Guest RAM in bytes.
    pub mem_size: u64,
    /// Workload name.
    pub workload: String,
    /// Workload arguments.
    pub args: Vec<String>,
    /// The disk image, if one was attached (it must be there, unchanged, at restore).
    pub disk: Option<(PathBuf, bool)>,
    /// Whether a virtio-console was attached.
    pub virtio_console: bool,
}

/// What the memory file holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MemoryFile {
    /// Its size: the guest's RAM size.
    pub size: u64,
    /// CRC-32 of the written pages, each as its page number (u64 LE) and its bytes.
    pub crc32: u32,
    /// Pages written (data).
    pub pages_written: u64,
    /// Pages not written, by reason.
    pub elided: Elided,
}

/// Pages a snapshot or a migration did not copy, by reason ([`PageClass`]).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Elided {
    /// Not backed by host memory: never written, or released by the guest (`zero_hints`
    /// RELEASE). Known zero.
    pub unbacked: u64,
    /// Reported free by the PV guest (`zero_hints` FREE_LIST): contents do not matter.
    pub free: u64,
    /// Backed but all zero (found by reading them).
    pub zero: u64,
}

impl Elided {
    /// Counts one page of class `class` (data pages are not elided).
    pub fn count(&mut self, class: PageClass) {
        match class {
            PageClass::Data => {}
            PageClass::Unbacked => self.unbacked += 1,
            PageClass::Free => self.free += 1,
            PageClass::Zero => self.zero += 1,
        }
    }

    /// All elided pages.
    pub fn pages(&self) -> u64 {
        self.unbacked + self.free + self.zero
    }

    /// Pages elided thanks to what the PV guest told the host: released or free.
    pub fn pages_by_hints(&self) -> u64 {
        self.free
    }
}

/// `state.json`.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotFile {
    /// [`FORMAT`].
    pub format: String,
    /// [`FORMAT_VERSION`].
    pub version: u32,
    /// CRC-32 of this file's JSON with this field set to 0.
    pub state_crc32: u32,
    /// The configuration.
    pub config: SavedConfig,
    /// The vCPU.
    pub vcpu: VcpuState,
    /// Devices and host-side state.
    pub machine: MachineState,
    /// The memory file.
    pub memory: MemoryFile,
    /// CRC-32 of `kernel.elf`.
    pub kernel_crc32: u32,
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { what, source }
}

fn bad(dir: &Path, why: impl Into<String>) -> Error {
    Error::Io {
        what: format!("invalid snapshot {}", dir.display()),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, why.into()),
    }
}

/// Saves the paused VM behind `handle` (configured as `cfg`) to `dir` (created; a snapshot
/// already there is replaced). The vCPU must be paused; its devices are held still while RAM
/// is written. `state.json` is written last, so an interrupted save leaves no snapshot that
/// looks whole.
pub fn write(dir: &Path, cfg: &VmConfig, handle: &VmHandle) -> Result<MemoryFile> {
    std::fs::create_dir_all(dir).map_err(io(format!("cannot create {}", dir.display())))?;
    let path = |name: &str| dir.join(name);
    match std::fs::remove_file(path("state.json")) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(io(format!(
                "cannot replace {}",
                path("state.json").display()
            ))(e));
        }
        _ => {}
    }
    std::fs::write(path("kernel.elf"), &cfg.kernel.bytes)
        .map_err(io(format!("cannot write {}", path("kernel.elf").display())))?;

    let frozen = handle.freeze().map_err(|e| match e {
        ControlError::Vmm(e) => e,
        other => Error::Io {
            what: "cannot save the VM".into(),
            source: std::io::Error::other(other),
        },
    })?;
    let mem_path = path("memory.bin");
    let memory = write_memory(&mem_path, handle.ram(), &frozen.free)?;
    let (vcpu, machine) = frozen.into_state();

    let mut file = SnapshotFile {
        format: FORMAT.into(),
        version: FORMAT_VERSION,
        state_crc32: 0,
        config: SavedConfig::of(cfg),
        vcpu,
        machine,
        memory: memory.clone(),
        kernel_crc32: crc32fast::hash(&cfg.kernel.bytes),
    };
    let encode = |file: &SnapshotFile| {
        serde_json::to_vec(file).map_err(|e| Error::Io {
            what: "cannot encode the snapshot state".into(),
            source: std::io::Error::other(e),
        })
    };
    file.state_crc32 = crc32fast::hash(&encode(&file)?);
    let tmp = path("state.json.tmp");
    std::fs::write(&tmp, encode(&file)?)
        .and_then(|()| File::open(&tmp)?.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path("state.json")))
        .map_err(io(format!("cannot write {}", path("state.json").display())))?;
    Ok(memory)
}

/// Writes RAM's data pages to a new sparse file at `path`, skipping pages that are unbacked,
/// in `free` or all zero.
fn write_memory(path: &Path, ram: &RamView, free: &PageBits) -> Result<MemoryFile> {
    use std::os::unix::fs::FileExt;
    let mem = File::create(path).map_err(io(format!("cannot create {}", path.display())))?;
    mem.set_len(ram.size())
        .map_err(io(format!("cannot size {}", path.display())))?;
    let failed = io(format!("cannot write {}", path.display()));
    let mut crc = crc32fast::Hasher::new();
    let mut memory = MemoryFile {
        size: ram.size(),
        ..MemoryFile::default()
    };
    // Consecutive data pages go out in one write.
    let mut run: Vec<u8> = Vec::with_capacity(RUN_BYTES);
    let mut run_start = 0u64;
    let flush = |run: &mut Vec<u8>, start: u64| -> std::io::Result<()> {
        if !run.is_empty() {
            mem.write_all_at(run, start * PAGE_SIZE)?;
            run.clear();
        }
        Ok(())
    };
    let mut io_error = None;
    ram.scan::<Error>(None, free, |page, class, data| {
        if class != PageClass::Data {
            memory.elided.count(class);
            return Ok(());
        }
        memory.pages_written += 1;
        crc.update(&page.to_le_bytes());
        crc.update(data);
        let contiguous = run_start + (run.len() as u64 / PAGE_SIZE) == page;
        if !contiguous || run.len() >= RUN_BYTES {
            if let Err(e) = flush(&mut run, run_start) {
                io_error = Some(e);
                return Err(Error::Unsupported("write failed"));
            }
            run_start = page;
        }
        run.extend_from_slice(data);
        Ok(())
    })
    .map_err(|e| match io_error.take() {
        Some(io) => Error::Io {
            what: format!("cannot write {}", path.display()),
            source: io,
        },
        None => e,
    })?;
    flush(&mut run, run_start).map_err(io(format!("cannot write {}", path.display())))?;
    mem.sync_all().map_err(failed)?;
    memory.crc32 = crc.finalize();
    Ok(memory)
}

/// Bytes of consecutive data pages written at once.
const RUN_BYTES: usize = 2 << 20;

impl SavedConfig {
    /// What `cfg` says about the VM.
    pub fn of(cfg: &VmConfig) -> SavedConfig {
        SavedConfig {
            mode: cfg.mode.name().into(),
            disable: cfg.disable,
            mem_size: cfg.mem_size,
            workload: cfg.workload.clone(),
            args: cfg.args.clone(),
            disk: cfg.disk.as_ref().map(|d| (d.path.clone(), d.readonly)),
            virtio_console: cfg.virtio_console,
        }
    }

    /// The VM to build for it, with `kernel`.
    pub fn to_config(&self, kernel: KernelImage) -> std::result::Result<VmConfig, String> {
        let mode = match self.mode.as_str() {
            "pv" => Mode::Pv,
            "trapped" => Mode::Trapped,
            other => return Err(format!("unknown mode {other:?}")),
        };
        crate::memory::check_mem_size(self.mem_size).map_err(|e| e.to_string())?;
        let mut config = VmConfig::new(mode, &self.workload);
        config.kernel = kernel;
        config.disable = self.disable;
        config.mem_size = self.mem_size;
        config.args = self.args.clone();
        config.disk = self.disk.as_ref().map(|(path, readonly)| DiskConfig {
            path: path.clone(),
            readonly: *readonly,
        });
        config.virtio_console = self.virtio_console;
        Ok(config)
    }
}

/// A snapshot read back and checked: the configuration to build and what to restore into it.
#[derive(Debug)]
pub struct Loaded {
    /// The VM to build (kernel from the snapshot directory).
    pub config: VmConfig,
    /// The vCPU.
    pub vcpu: VcpuState,
    /// Devices and host-side state.
    pub machine: MachineState,
    /// The memory file, open for reading; map it with [`Vm::restore_mapped`].
    pub memory: File,
    /// The pages `memory` holds data for.
    pub data: PageBits,
    /// The memory file's description.
    pub described: MemoryFile,
}

impl Loaded {
    /// Loads everything into `vm`, freshly built from [`Loaded::config`].
    pub fn restore_into(self, vm: &mut Vm) -> Result<()> {
        vm.restore_mapped(&self.memory, self.data, &self.vcpu, &self.machine)
    }
}

/// Refuses anything but a regular file (a FIFO or a device would block or never end).
fn regular_file(dir: &Path, name: &str) -> Result<std::path::PathBuf> {
    let path = dir.join(name);
    let meta = std::fs::metadata(&path).map_err(io(format!("cannot read {}", path.display())))?;
    if !meta.is_file() {
        return Err(bad(dir, format!("{name} is not a regular file")));
    }
    Ok(path)
}

/// Reads and checks the snapshot in `dir`.
pub fn read(dir: &Path) -> Result<Loaded> {
    let state_path = regular_file(dir, "state.json")?;
    let text =
        std::fs::read(&state_path).map_err(io(format!("cannot read {}", state_path.display())))?;
    let mut file: SnapshotFile = match serde_json::from_slice(&text) {
        Ok(file) => file,
        Err(e) => {
            // An older or newer format may not parse: say which version it is if it says so.
            let version = serde_json::from_slice::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v.get("version").and_then(serde_json::Value::as_u64));
            return Err(match version {
                Some(v) if v != u64::from(FORMAT_VERSION) => bad(
                    dir,
                    format!("format version {v}, this host-vmm reads version {FORMAT_VERSION}"),
                ),
                _ => bad(dir, format!("state.json: {e}")),
            });
        }
    };
    if file.format != FORMAT {
        return Err(bad(dir, format!("state.json is not a {FORMAT} file")));
    }
    if file.version != FORMAT_VERSION {
        return Err(bad(
            dir,
            format!(
                "format version {}, this host-vmm reads version {FORMAT_VERSION}",
                file.version
            ),
        ));
    }
    let claimed = std::mem::take(&mut file.state_crc32);
    let unsigned = serde_json::to_vec(&file).map_err(|e| bad(dir, e.to_string()))?;
    if crc32fast::hash(&unsigned) != claimed {
        return Err(bad(dir, "state.json does not match its checksum"));
    }
    if file.memory.size != file.config.mem_size {
        return Err(bad(dir, "the memory file's size is not the VM's RAM size"));
    }
    let kernel = KernelImage::from_file(&regular_file(dir, "kernel.elf")?)?;
    if crc32fast::hash(&kernel.bytes) != file.kernel_crc32 {
        return Err(bad(dir, "kernel.elf does not match its checksum"));
    }
    let config = file.config.to_config(kernel).map_err(|e| bad(dir, e))?;

    let mem_path = dir.join("memory.bin");
    let memory = File::open(regular_file(dir, "memory.bin")?)
        .map_err(io(format!("cannot open {}", mem_path.display())))?;
    let data = check_memory(&memory, &file.memory)
        .map_err(|why| bad(dir, format!("memory.bin: {why}")))?;
    Ok(Loaded {
        config,
        vcpu: file.vcpu,
        machine: file.machine,
        memory,
        data,
        described: file.memory,
    })
}

/// Checks the memory file against its description, reading only its data extents, and
/// returns the pages it holds data for.
fn check_memory(mem: &File, described: &MemoryFile) -> std::result::Result<PageBits, String> {
    use std::os::unix::fs::FileExt;
    let len = mem
        .metadata()
        .map_err(|e| format!("cannot stat: {e}"))?
        .len();
    if len != described.size {
        return Err(format!(
            "holds {len} bytes, the snapshot says {}",
            described.size
        ));
    }
    let pages = len / PAGE_SIZE;
    let data = PageBits::new(pages);
    let mut crc = crc32fast::Hasher::new();
    let mut written = 0u64;
    let mut buf = vec![0u8; RUN_BYTES];
    for (start, end) in data_extents(mem, len).map_err(|e| format!("cannot map extents: {e}"))? {
        // Extents come in filesystem blocks: widen to whole pages.
        let mut at = start / PAGE_SIZE * PAGE_SIZE;
        let end = end.next_multiple_of(PAGE_SIZE).min(len);
        while at < end {
            let n = ((end - at) as usize).min(RUN_BYTES);
            mem.read_exact_at(&mut buf[..n], at)
                .map_err(|e| format!("cannot read: {e}"))?;
            for (k, page) in buf[..n].chunks(PAGE_SIZE as usize).enumerate() {
                if page.iter().all(|&b| b == 0) {
                    continue;
                }
                let index = at / PAGE_SIZE + k as u64;
                if data.get(index) {
                    continue; // extents never overlap; a buggy filesystem must not count twice
                }
                data.set(index);
                written += 1;
                crc.update(&index.to_le_bytes());
                crc.update(page);
            }
            at += n as u64;
        }
    }
    if written != described.pages_written {
        return Err(format!(
            "holds {written} pages of data, the snapshot says {}",
            described.pages_written
        ));
    }
    if crc.finalize() != described.crc32 {
        return Err("does not match its checksum".into());
    }
    Ok(data)
}

/// The `[start, end)` byte ranges of `file` that hold data (the rest are holes), in order.
fn data_extents(file: &File, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let seek = |offset: u64, whence: i32| -> std::io::Result<Option<u64>> {
        // SAFETY: lseek on our own open file; it only moves the file offset.
        let r = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None) // no data past `offset`
        } else {
            Err(e)
        }
    };
    let mut extents = Vec::new();
    let mut at = 0;
    while at < len {
        let Some(start) = seek(at, libc::SEEK_DATA)? else {
            break;
        };
        let end = seek(start, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        if end <= start {
            break;
        }
        extents.push((start, end));
        at = end;
    }
    Ok(extents)
}
