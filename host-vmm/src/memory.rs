//! Guest RAM: one anonymous mapping from guest-physical 0, registered with KVM as slot 0.
//!
//! Every access the VMM makes on behalf of the guest goes through [`GuestRam::checked_range`]
//! or vm-memory's bounds-checked accessors: a guest-supplied address and length can never make
//! the VMM touch memory outside guest RAM.

use hypercall_abi::layout::{MAX_MEM_SIZE, MIN_MEM_SIZE, PAGE_SIZE};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::error::{Error, Result};

/// Parses a memory size such as `128M`, `1G`, `65536K` or a plain byte count, and checks it
/// against the VMM's limits.
pub fn parse_mem_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let bad = |why: &str| Error::MemSize(format!("'{s}': {why}"));
    if t.is_empty() {
        return Err(bad("empty"));
    }
    let (num, mult) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        None => (t, 1u64),
        Some((i, _)) => {
            let unit = t[i..].to_ascii_lowercase();
            let mult = match unit.as_str() {
                "k" | "kib" | "kb" => 1 << 10,
                "m" | "mib" | "mb" => 1 << 20,
                "g" | "gib" | "gb" => 1 << 30,
                _ => return Err(bad("expected a number with an optional K, M or G suffix")),
            };
            (&t[..i], mult)
        }
    };
    let n: u64 = num
        .parse()
        .map_err(|_| bad("expected a number with an optional K, M or G suffix"))?;
    let bytes = n.checked_mul(mult).ok_or_else(|| bad("too large"))?;
    check_mem_size(bytes).map_err(|e| match e {
        Error::MemSize(m) => Error::MemSize(format!("'{s}': {m}")),
        other => other,
    })?;
    Ok(bytes)
}

/// Checks a byte count against the VMM's limits.
pub fn check_mem_size(bytes: u64) -> Result<()> {
    if bytes < MIN_MEM_SIZE {
        return Err(Error::MemSize(format!(
            "must be at least {} MiB",
            MIN_MEM_SIZE >> 20
        )));
    }
    if bytes > MAX_MEM_SIZE {
        return Err(Error::MemSize(format!(
            "must be at most {} MiB (RAM ends below the MMIO window at {MAX_MEM_SIZE:#x})",
            MAX_MEM_SIZE >> 20
        )));
    }
    if bytes % PAGE_SIZE != 0 {
        return Err(Error::MemSize("must be a multiple of 4 KiB".into()));
    }
    Ok(())
}

/// Guest RAM and its size.
#[derive(Debug)]
pub struct GuestRam {
    mem: GuestMemoryMmap,
    size: u64,
}

impl GuestRam {
    /// Allocates `size` bytes of zeroed guest RAM at guest-physical 0 (not yet visible to KVM).
    pub fn new(size: u64) -> Result<GuestRam> {
        check_mem_size(size)?;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)])
            .map_err(|e| Error::GuestMemory(e.to_string()))?;
        Ok(GuestRam { mem, size })
    }

    /// Registers the RAM with KVM as memory slot 0.
    pub fn register(&self, vm: &VmFd) -> Result<()> {
        for (slot, region) in self.mem.iter().enumerate() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| Error::GuestMemory(e.to_string()))?;
            let desc = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: `desc` describes a live mapping owned by `self.mem`, which outlives the VM
            // (the `Vm` struct drops its `VmFd` before its `GuestRam`), and slots do not overlap.
            unsafe { vm.set_user_memory_region(desc) }.map_err(Error::kvm("set memory region"))?;
        }
        Ok(())
    }

    /// The vm-memory view, for bounds-checked reads and writes.
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// RAM size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Checks that `[gpa, gpa + len)` lies entirely inside guest RAM (no overflow).
    pub fn checked_range(&self, gpa: u64, len: u64) -> Option<GuestAddress> {
        let end = gpa.checked_add(len)?;
        (end <= self.size).then_some(GuestAddress(gpa))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_mem_size("128M").unwrap(), 128 << 20);
        assert_eq!(parse_mem_size("1g").unwrap(), 1 << 30);
        assert_eq!(parse_mem_size("65536K").unwrap(), 64 << 20);
        assert_eq!(parse_mem_size("16777216").unwrap(), 16 << 20);
        assert_eq!(parse_mem_size("32MiB").unwrap(), 32 << 20);
    }

    #[test]
    fn rejects_bad_sizes() {
        for s in [
            "",
            "abc",
            "12X",
            "-1M",
            "1M",
            "4G",
            "99999999999999999999G",
            "16777217",
        ] {
            let e = parse_mem_size(s).unwrap_err().to_string();
            assert!(e.starts_with("invalid memory size"), "{s}: {e}");
        }
    }

    #[test]
    fn checked_range_never_overflows() {
        let ram = GuestRam::new(16 << 20).unwrap();
        assert!(ram.checked_range(0, 16 << 20).is_some());
        assert!(ram.checked_range(1, 16 << 20).is_none());
        assert!(ram.checked_range(u64::MAX, 2).is_none());
        assert!(ram.checked_range((16 << 20) - 1, 1).is_some());
        assert!(ram.checked_range(16 << 20, 0).is_some());
        assert!(ram.checked_range(16 << 20, 1).is_none());
    }
}
