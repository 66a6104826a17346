//! Snapshots on disk: a directory holding what [`crate::vm::VmHandle::save`] took, so that
//! `host-vmm restore DIR` continues the VM in a new process.
//!
//! # Format (version [`FORMAT_VERSION`])
//!
//! - `state.json`: [`SnapshotFile`] — the format name and version, how the VM was configured
//!   (mode, memory size, workload and arguments, disabled features, disk, virtio-console), the
//!   vCPU's and the machine's state, and the memory file's size, CRC-32 and page counts; the
//!   CRC-32 of everything else in the file is in `state_crc32`.
//! - `memory.bin`: guest RAM, a sparse file of exactly the RAM size. Pages that are all zero
//!   (never touched, released by the guest, or zeroed) are not written: they stay holes and
//!   read back as zero. `state.json` says how many pages were written and elided.
//! - `kernel.elf`: the kernel image, so a restore needs nothing outside the directory (the
//!   restored VM is built like the original before its memory and state are replaced).
//!
//! Everything read back is checked before any guest code runs: the format name and version,
//! both CRCs, the memory file's size, and then every state structure by its own `restore`.
//! A snapshot that fails any check gives one error naming the file and what is wrong.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use hypercall_abi::boot::Mode;
use hypercall_abi::layout::PAGE_SIZE;
use serde::{Deserialize, Serialize};

use crate::config::{DiskConfig, KernelImage, VmConfig};
use crate::error::{Error, Result};
use crate::machine::MachineState;
use crate::vcpu::VcpuState;
use crate::vm::VmSnapshot;

/// The format name in `state.json`.
pub const FORMAT: &str = "pvkit-snapshot";
/// The format version this host-vmm writes and reads.
pub const FORMAT_VERSION: u32 = 1;

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
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MemoryFile {
    /// Its size: the guest's RAM size.
    pub size: u64,
    /// CRC-32 of its contents (holes read as zeros).
    pub crc32: u32,
    /// Pages written.
    pub pages_written: u64,
    /// All-zero pages left as holes.
    pub pages_elided_zero: u64,
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

/// Writes `saved` of a VM configured as `cfg` to `dir` (created; existing files replaced).
/// Returns the memory file's page counts.
pub fn write(dir: &Path, cfg: &VmConfig, saved: VmSnapshot) -> Result<MemoryFile> {
    std::fs::create_dir_all(dir).map_err(io(format!("cannot create {}", dir.display())))?;
    let path = |name: &str| dir.join(name);
    std::fs::write(path("kernel.elf"), &cfg.kernel.bytes)
        .map_err(io(format!("cannot write {}", path("kernel.elf").display())))?;

    let mem_path = path("memory.bin");
    let mut mem =
        File::create(&mem_path).map_err(io(format!("cannot create {}", mem_path.display())))?;
    mem.set_len(saved.ram.len() as u64)
        .map_err(io(format!("cannot size {}", mem_path.display())))?;
    let mut crc = crc32fast::Hasher::new();
    let (mut written, mut elided) = (0, 0);
    for (i, page) in saved.ram.chunks(PAGE_SIZE as usize).enumerate() {
        crc.update(page);
        if page.iter().all(|&b| b == 0) {
            elided += 1;
            continue;
        }
        mem.seek(SeekFrom::Start(i as u64 * PAGE_SIZE))
            .and_then(|_| mem.write_all(page))
            .map_err(io(format!("cannot write {}", mem_path.display())))?;
        written += 1;
    }
    mem.sync_all()
        .map_err(io(format!("cannot write {}", mem_path.display())))?;
    let memory = MemoryFile {
        size: saved.ram.len() as u64,
        crc32: crc.finalize(),
        pages_written: written,
        pages_elided_zero: elided,
    };
    let mut file = SnapshotFile {
        format: FORMAT.into(),
        version: FORMAT_VERSION,
        state_crc32: 0,
        config: SavedConfig {
            mode: cfg.mode.name().into(),
            disable: cfg.disable,
            mem_size: cfg.mem_size,
            workload: cfg.workload.clone(),
            args: cfg.args.clone(),
            disk: cfg.disk.as_ref().map(|d| (d.path.clone(), d.readonly)),
            virtio_console: cfg.virtio_console,
        },
        vcpu: saved.vcpu,
        machine: saved.machine,
        memory: memory.clone(),
    };
    let unsigned = serde_json::to_vec(&file).map_err(|e| Error::Io {
        what: "cannot encode the snapshot state".into(),
        source: std::io::Error::other(e),
    })?;
    file.state_crc32 = crc32fast::hash(&unsigned);
    let signed = serde_json::to_vec(&file).map_err(|e| Error::Io {
        what: "cannot encode the snapshot state".into(),
        source: std::io::Error::other(e),
    })?;
    std::fs::write(path("state.json"), signed)
        .map_err(io(format!("cannot write {}", path("state.json").display())))?;
    Ok(memory)
}

/// A snapshot read back and checked: the configuration to build and what to restore into it.
#[derive(Debug)]
pub struct Loaded {
    /// The VM to build (kernel from the snapshot directory).
    pub config: VmConfig,
    /// What to restore into it.
    pub saved: VmSnapshot,
    /// The memory file's description.
    pub memory: MemoryFile,
}

/// Reads and checks the snapshot in `dir`.
pub fn read(dir: &Path) -> Result<Loaded> {
    let state_path = dir.join("state.json");
    let text =
        std::fs::read(&state_path).map_err(io(format!("cannot read {}", state_path.display())))?;
    let mut file: SnapshotFile =
        serde_json::from_slice(&text).map_err(|e| bad(dir, format!("state.json: {e}")))?;
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
    let mode = match file.config.mode.as_str() {
        "pv" => Mode::Pv,
        "trapped" => Mode::Trapped,
        other => return Err(bad(dir, format!("unknown mode {other:?}"))),
    };
    if file.memory.size != file.config.mem_size {
        return Err(bad(dir, "the memory file's size is not the VM's RAM size"));
    }
    crate::memory::check_mem_size(file.memory.size)?;

    let mem_path = dir.join("memory.bin");
    let mut mem =
        File::open(&mem_path).map_err(io(format!("cannot open {}", mem_path.display())))?;
    let len = mem
        .metadata()
        .map_err(io(format!("cannot stat {}", mem_path.display())))?
        .len();
    if len != file.memory.size {
        return Err(bad(
            dir,
            format!(
                "memory.bin holds {len} bytes, the snapshot says {}",
                file.memory.size
            ),
        ));
    }
    let mut ram = vec![0u8; len as usize];
    mem.read_exact(&mut ram)
        .map_err(io(format!("cannot read {}", mem_path.display())))?;
    if crc32fast::hash(&ram) != file.memory.crc32 {
        return Err(bad(dir, "memory.bin does not match its checksum"));
    }
    let kernel_path = dir.join("kernel.elf");
    let kernel = KernelImage::from_file(&kernel_path)?;
    let mut config = VmConfig::new(mode, &file.config.workload);
    config.kernel = kernel;
    config.disable = file.config.disable;
    config.mem_size = file.config.mem_size;
    config.args = file.config.args.clone();
    config.disk = file
        .config
        .disk
        .as_ref()
        .map(|(path, readonly)| DiskConfig {
            path: path.clone(),
            readonly: *readonly,
        });
    config.virtio_console = file.config.virtio_console;
    Ok(Loaded {
        config,
        saved: VmSnapshot {
            vcpu: file.vcpu,
            machine: file.machine,
            ram,
        },
        memory: file.memory,
    })
}
