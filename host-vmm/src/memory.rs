//! Guest RAM: one private mapping from guest-physical 0, registered with KVM as slot 0.
//!
//! Every access the VMM makes on behalf of the guest goes through [`GuestRam::checked_range`]
//! or vm-memory's bounds-checked accessors: a guest-supplied address and length can never make
//! the VMM touch memory outside guest RAM.
//!
//! A fresh VM's RAM is anonymous memory. A restored VM's RAM maps the snapshot's memory file
//! privately ([`GuestRam::map_memory_file`]): pages are read from the file when first touched
//! and copied when first written, so restoring does not read RAM it does not need. The pages
//! the file holds data for are remembered ([`PageBits`]): such a page is not zero even when
//! the host kernel has not brought it in yet.
//!
//! Writes the VMM itself makes (virtio devices, hypercall results) are tracked in
//! vm-memory's dirty bitmap ([`RamView::take_host_dirty`]); the guest's own writes are KVM's
//! dirty log ([`crate::dirty`]). Live migration needs both.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use hypercall_abi::layout::{MAX_MEM_SIZE, MIN_MEM_SIZE, PAGE_SIZE};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::error::{Error, Result};
use crate::prepare::{PrepareQueueState, PrepareStats, Preparer};
use crate::state::{Persist, STATE_VERSION, StateError, check_version};

/// Guest memory as the VMM accesses it: vm-memory's mmap backend with a dirty bitmap that
/// records the VMM's own writes.
pub type GuestMem = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// One bit per 4 KiB page of guest RAM, shared between threads.
#[derive(Debug, Default)]
pub struct PageBits {
    words: Vec<AtomicU64>,
    pages: u64,
}

impl PageBits {
    /// All clear, for `pages` pages.
    pub fn new(pages: u64) -> PageBits {
        PageBits {
            words: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            pages,
        }
    }

    /// From raw words (bit `i % 64` of word `i / 64` is page `i`); bits past `pages` are
    /// ignored.
    pub fn from_words(words: &[u64], pages: u64) -> PageBits {
        let bits = PageBits::new(pages);
        for (w, &v) in bits.words.iter().zip(words) {
            w.store(v, Ordering::Relaxed);
        }
        if !pages.is_multiple_of(64)
            && let Some(last) = bits.words.last()
        {
            last.fetch_and((1u64 << (pages % 64)) - 1, Ordering::Relaxed);
        }
        bits
    }

    /// Makes these bits those of `other` (which must cover as many pages).
    pub fn copy_from(&self, other: &PageBits) {
        debug_assert_eq!(self.pages, other.pages);
        for (w, o) in self.words.iter().zip(&other.words) {
            w.store(o.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }

    /// Number of pages covered.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Whether page `i` is set (false past the end).
    pub fn get(&self, i: u64) -> bool {
        self.words
            .get((i / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (i % 64)) != 0)
    }

    /// Sets page `i` (ignored past the end).
    pub fn set(&self, i: u64) {
        if i < self.pages {
            self.words[(i / 64) as usize].fetch_or(1 << (i % 64), Ordering::Relaxed);
        }
    }

    /// Clears pages `[first, first + count)` (clamped to the end).
    pub fn clear_range(&self, first: u64, count: u64) {
        let end = first.saturating_add(count).min(self.pages);
        for i in first..end {
            self.words[(i / 64) as usize].fetch_and(!(1 << (i % 64)), Ordering::Relaxed);
        }
    }

    /// Whether any page of `[first, first + count)` is set.
    pub fn any_in(&self, first: u64, count: u64) -> bool {
        let end = first.saturating_add(count).min(self.pages);
        (first..end).any(|i| self.get(i))
    }

    /// Number of pages set.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }
}

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
            "must be at most {} MiB (RAM ends below the page-table pool at {MAX_MEM_SIZE:#x})",
            MAX_MEM_SIZE >> 20
        )));
    }
    if !bytes.is_multiple_of(PAGE_SIZE) {
        return Err(Error::MemSize("must be a multiple of 4 KiB".into()));
    }
    Ok(())
}

/// Guest RAM and its size.
#[derive(Debug)]
pub struct GuestRam {
    /// The thread that backs RAM ahead of use (`zero_hints(PREPARE)`), started on first use;
    /// `None` inside if it could not start. Declared before `mem`: fields drop in order, and
    /// the thread must be joined before the mapping goes away.
    preparer: OnceLock<Option<Preparer>>,
    mem: GuestMem,
    size: u64,
    /// Pages whose contents come from a memory file ([`GuestRam::map_memory_file`]) and may
    /// not be in memory yet: not zero, whatever `/proc/self/pagemap` says.
    file_backed: Arc<PageBits>,
}

/// What a page of guest RAM holds, as far as saving it is concerned ([`RamView::scan`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageClass {
    /// Data: must be saved.
    Data,
    /// Not backed by host memory: never written, or released by the guest (`zero_hints`
    /// RELEASE). Reads as zero.
    Unbacked,
    /// Reported free by the guest (`zero_hints` FREE_LIST): its contents do not matter.
    Free,
    /// Backed, but all zero.
    Zero,
}

/// A shareable view of guest RAM for threads other than the vCPU's (snapshots, migration):
/// reads, page classification and the VMM's dirty pages. It keeps the mapping alive.
#[derive(Debug, Clone)]
pub struct RamView {
    mem: GuestMem,
    size: u64,
    file_backed: Arc<PageBits>,
}

impl GuestRam {
    /// Allocates `size` bytes of zeroed guest RAM at guest-physical 0 (not yet visible to KVM).
    pub fn new(size: u64) -> Result<GuestRam> {
        check_mem_size(size)?;
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), size as usize)])
            .map_err(|e| Error::GuestMemory(e.to_string()))?;
        let ram = GuestRam {
            preparer: OnceLock::new(),
            mem,
            size,
            file_backed: Arc::new(PageBits::new(size / PAGE_SIZE)),
        };
        ram.advise_huge_pages();
        Ok(ram)
    }

    /// Asks for transparent huge pages: a 2 MiB fault instead of 512 4 KiB ones (on our nested
    /// KVM a host fault costs ~25 µs, so this dominates first-touch cost). Advisory: where THP
    /// is unavailable the call fails and nothing changes.
    fn advise_huge_pages(&self) {
        if let Some(host) = self.host_addr(0) {
            // SAFETY: `[host, host + size)` is exactly our own private anonymous mapping of guest
            // RAM (one region from guest-physical 0). MADV_HUGEPAGE only changes how the kernel
            // may back it, not its contents or validity, and Rust holds no references into it.
            unsafe { libc::madvise(host.cast(), self.size as usize, libc::MADV_HUGEPAGE) };
        }
    }

    /// The KVM memory slot of RAM (slot 0), as [`register`](Self::register) registers it.
    pub fn slot(&self) -> kvm_userspace_memory_region {
        kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: self.size,
            userspace_addr: self.host_addr(0).map_or(0, |h| h as u64),
        }
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
    pub fn mem(&self) -> &GuestMem {
        &self.mem
    }

    /// A view other threads can keep ([`RamView`]).
    pub fn view(&self) -> RamView {
        RamView {
            mem: self.mem.clone(),
            size: self.size,
            file_backed: self.file_backed.clone(),
        }
    }

    /// Replaces all of RAM by a private mapping of `file` (exactly RAM-sized), whose pages
    /// `data` holds data for (the others are holes and read as zero). Nothing is read now:
    /// a page comes from the file when the guest or the VMM first touches it, and is copied
    /// when first written; the file is never written. For a VM that has not run yet
    /// (restore): whatever RAM held before is gone.
    pub fn map_memory_file(&self, file: &std::fs::File, data: PageBits) -> Result<()> {
        if data.pages() != self.size / PAGE_SIZE {
            return Err(Error::GuestMemory(
                "the memory file's page map does not cover RAM".into(),
            ));
        }
        let host = self
            .host_addr(0)
            .ok_or_else(|| Error::GuestMemory("RAM is not mapped".into()))?;
        // SAFETY: `[host, host + size)` is exactly our own mapping of guest RAM (one region from
        // guest-physical 0); MAP_FIXED replaces it in place with a mapping of the same size,
        // protection and address, so every pointer vm-memory and KVM hold stays valid (KVM's
        // MMU notifier drops its old mappings). The file is open for reading and MAP_PRIVATE
        // never writes it. Rust holds no references into guest RAM, and no vCPU or device
        // runs yet.
        let p = unsafe {
            libc::mmap(
                host.cast(),
                self.size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED || p != host.cast() {
            return Err(Error::GuestMemory(format!(
                "cannot map the memory file: {}",
                std::io::Error::last_os_error()
            )));
        }
        // Exactly the file's data pages (a hole reads as zero, whatever was mapped before).
        self.file_backed.copy_from(&data);
        Ok(())
    }

    /// RAM size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn host_addr(&self, gpa: u64) -> Option<*mut u8> {
        self.mem.get_host_address(GuestAddress(gpa)).ok()
    }

    /// Which of `count` frames from frame number `first` are known zero
    /// ([`RamView::known_zero`]).
    pub fn known_zero(&self, first: u64, count: u64) -> std::io::Result<Vec<bool>> {
        self.view().known_zero(first, count)
    }

    /// Bytes of guest RAM currently backed by host memory.
    pub fn resident_bytes(&self) -> u64 {
        self.view().resident_bytes()
    }

    /// Discards the host backing of `[gpa, gpa + len)` (page-aligned, inside RAM): the memory
    /// goes back to the host and the range reads as zero afterwards.
    pub fn discard(&self, gpa: u64, len: u64) -> std::io::Result<()> {
        if !gpa.is_multiple_of(PAGE_SIZE)
            || !len.is_multiple_of(PAGE_SIZE)
            || self.checked_range(gpa, len).is_none()
        {
            return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
        }
        if len == 0 {
            return Ok(());
        }
        let host = self
            .host_addr(gpa)
            .ok_or_else(|| std::io::Error::other("unmapped"))?;
        if let Some(Some(p)) = self.preparer.get() {
            // Nothing of the range may be backed again after it is discarded.
            p.cancel(gpa, len);
        }
        let (first, pages) = (gpa / PAGE_SIZE, len / PAGE_SIZE);
        if self.file_backed.any_in(first, pages) {
            // MADV_DONTNEED on a private file mapping would bring the file's contents back:
            // map fresh anonymous memory over the range instead.
            // SAFETY: `[host, host + len)` lies inside our own mapping of guest RAM (checked
            // above); MAP_FIXED replaces exactly that range with zero-filled anonymous memory of
            // the same protection, so all pointers into RAM stay valid, and Rust holds no
            // references into guest RAM. KVM's MMU notifier drops its old mappings.
            let p = unsafe {
                libc::mmap(
                    host.cast(),
                    len as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error());
            }
            self.file_backed.clear_range(first, pages);
        } else {
            // SAFETY: `[host, host + len)` lies inside our own private anonymous mapping of guest
            // RAM (checked above; RAM is one contiguous region). MADV_DONTNEED only drops its
            // pages — the mapping stays valid and reads as zero — and Rust holds no references
            // into guest RAM (all access goes through vm-memory's volatile accessors). KVM's MMU
            // notifier drops its own mappings of those pages.
            let rc = unsafe { libc::madvise(host.cast(), len as usize, libc::MADV_DONTNEED) };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        // The contents changed behind KVM's dirty log: a migration must send them again.
        self.view().mark_host_dirty(gpa, len);
        Ok(())
    }

    /// True if this host can back RAM ahead of use ([`prepare`](Self::prepare)).
    pub fn can_prepare(&self) -> bool {
        crate::prepare::supported()
    }

    /// Queues `[gpa, gpa + len)` (page-aligned, inside RAM) to be backed by host memory on the
    /// preparing thread, off the vCPU; its contents do not change. Returns the bytes queued (0
    /// if the queue is full). A later [`discard`](Self::discard) of the range cancels what is
    /// still queued of it.
    pub fn prepare(&self, gpa: u64, len: u64) -> std::io::Result<u64> {
        if !gpa.is_multiple_of(PAGE_SIZE)
            || !len.is_multiple_of(PAGE_SIZE)
            || self.checked_range(gpa, len).is_none()
        {
            return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
        }
        if !self.can_prepare() {
            return Err(std::io::Error::from(std::io::ErrorKind::Unsupported));
        }
        let preparer = self.preparer.get_or_init(|| {
            let base = self.host_addr(0)? as usize;
            // SAFETY: `base` is our private anonymous mapping of `size` bytes of guest RAM; it
            // stays mapped until the preparer is dropped, because `preparer` is declared before
            // `mem` and so dropped (joining the thread) first.
            unsafe { Preparer::start(base, self.size) }.ok()
        });
        match preparer {
            Some(p) => Ok(p.queue(gpa, len)),
            None => Err(std::io::Error::other("cannot start the preparing thread")),
        }
    }

    /// What the preparing thread did so far (zero if it never ran).
    pub fn prepare_stats(&self) -> PrepareStats {
        match self.preparer.get() {
            Some(Some(p)) => p.stats(),
            _ => PrepareStats::default(),
        }
    }

    /// Bytes queued for preparing and not taken up yet.
    pub fn prepare_queued_bytes(&self) -> u64 {
        match self.preparer.get() {
            Some(Some(p)) => p.queued_bytes(),
            _ => 0,
        }
    }

    /// Reads `count` consecutive `T`s at `gpa` (a guest-supplied table), or `None` if any byte
    /// of it lies outside guest RAM (overflow-checked). Callers bound `count` first.
    pub fn read_array<T>(&self, gpa: u64, count: u64) -> Option<Vec<T>>
    where
        T: zerocopy::FromBytes + zerocopy::IntoBytes + Clone,
    {
        let len = count.checked_mul(size_of::<T>() as u64)?;
        let addr = self.checked_range(gpa, len)?;
        let mut items = vec![T::new_zeroed(); usize::try_from(count).ok()?];
        vm_memory::Bytes::read_slice(
            &self.mem,
            zerocopy::IntoBytes::as_mut_bytes(&mut items[..]),
            addr,
        )
        .ok()?;
        Some(items)
    }

    /// Checks that `[gpa, gpa + len)` lies entirely inside guest RAM (no overflow).
    pub fn checked_range(&self, gpa: u64, len: u64) -> Option<GuestAddress> {
        let end = gpa.checked_add(len)?;
        (end <= self.size).then_some(GuestAddress(gpa))
    }
}

impl RamView {
    /// RAM size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The vm-memory view.
    pub fn mem(&self) -> &GuestMem {
        &self.mem
    }

    /// Which of `count` frames from frame number `first` are known zero: not backed by host
    /// memory (neither present nor swapped, from `/proc/self/pagemap`) and not waiting in a
    /// memory file. Such a frame reads as zero. The range must be inside RAM.
    pub fn known_zero(&self, first: u64, count: u64) -> std::io::Result<Vec<bool>> {
        use std::os::unix::fs::FileExt;
        const PRESENT: u64 = 1 << 63;
        const SWAPPED: u64 = 1 << 62;
        let outside = || std::io::Error::other("range outside guest RAM");
        let gpa = first.checked_mul(PAGE_SIZE).ok_or_else(outside)?;
        let len = count.checked_mul(PAGE_SIZE).ok_or_else(outside)?;
        if gpa.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(outside());
        }
        let host = self
            .mem
            .get_host_address(GuestAddress(gpa))
            .map_err(|_| std::io::Error::other("unmapped"))? as u64;
        let mut raw = vec![0u8; count as usize * 8];
        let pagemap = std::fs::File::open("/proc/self/pagemap")?;
        pagemap.read_exact_at(&mut raw, host / PAGE_SIZE * 8)?;
        Ok(raw
            .chunks_exact(8)
            .enumerate()
            .map(|(i, e)| {
                u64::from_le_bytes(e.try_into().expect("8 bytes")) & (PRESENT | SWAPPED) == 0
                    && !self.file_backed.get(first + i as u64)
            })
            .collect())
    }

    /// Bytes of guest RAM currently backed by host memory.
    pub fn resident_bytes(&self) -> u64 {
        let frames = self.size / PAGE_SIZE;
        let mut resident = 0;
        let mut f = 0;
        while f < frames {
            let n = (frames - f).min(1 << 16);
            match self.known_zero(f, n) {
                Ok(z) => resident += z.iter().filter(|&&zero| !zero).count() as u64,
                Err(_) => return 0,
            }
            f += n;
        }
        resident * PAGE_SIZE
    }

    /// Records that the VMM changed `[gpa, gpa + len)` (clamped to RAM).
    pub fn mark_host_dirty(&self, gpa: u64, len: u64) {
        if let Some(bitmap) = self.dirty_bitmap() {
            let end = gpa.saturating_add(len).min(self.size);
            if gpa < end {
                bitmap.set_addr_range(gpa as usize, (end - gpa) as usize);
            }
        }
    }

    /// The pages the VMM wrote (through vm-memory, or by discarding them) since the last call,
    /// and forgets them.
    pub fn take_host_dirty(&self) -> PageBits {
        let pages = self.size / PAGE_SIZE;
        match self.dirty_bitmap() {
            Some(bitmap) => PageBits::from_words(&bitmap.get_and_reset(), pages),
            None => PageBits::new(pages),
        }
    }

    /// vm-memory's dirty bitmap of RAM's one region (offsets are guest-physical addresses).
    fn dirty_bitmap(&self) -> Option<&AtomicBitmap> {
        let region = self.mem.iter().next()?;
        Some(vm_memory::MmapRegion::bitmap(region))
    }

    /// Classifies the pages of RAM (only those set in `only`, if given), in ascending order,
    /// and hands each to `visit` with its class and, for [`PageClass::Data`], its contents.
    /// Pages set in `free` (the guest said it does not care about them) are
    /// [`PageClass::Free`] without being read; pages the host kernel does not back are
    /// [`PageClass::Unbacked`]; the rest are read, and all-zero ones are [`PageClass::Zero`].
    /// `visit` may stop the scan by returning an error.
    pub fn scan<E: From<Error>>(
        &self,
        only: Option<&PageBits>,
        free: &PageBits,
        mut visit: impl FnMut(u64, PageClass, &[u8]) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        const MAP_CHUNK: u64 = 1 << 15;
        const READ_CHUNK: u64 = 512;
        let pages = self.size / PAGE_SIZE;
        let mut buf = vec![0u8; (READ_CHUNK * PAGE_SIZE) as usize];
        let wanted = |i: u64| only.is_none_or(|o| o.get(i));
        let mut first = 0;
        while first < pages {
            let n = (pages - first).min(MAP_CHUNK);
            if !(first..first + n).any(wanted) {
                first += n;
                continue;
            }
            let zero = self.known_zero(first, n).map_err(|e| {
                Error::GuestMemory(format!("cannot read which pages are backed: {e}"))
            })?;
            let mut sub = 0;
            while sub < n {
                let m = (n - sub).min(READ_CHUNK);
                let page = |k: u64| first + sub + k;
                // Read only the pages that may hold data, in runs: touching an unbacked page
                // would fault the host's zero page in (slow on a nested host, and the page
                // would then look backed to `known_zero`).
                let needs_read =
                    |k: u64| wanted(page(k)) && !free.get(page(k)) && !zero[(sub + k) as usize];
                let mut k = 0;
                while k < m {
                    if !needs_read(k) {
                        k += 1;
                        continue;
                    }
                    let start = k;
                    while k < m && needs_read(k) {
                        k += 1;
                    }
                    let (from, to) = ((start * PAGE_SIZE) as usize, (k * PAGE_SIZE) as usize);
                    self.read(page(start) * PAGE_SIZE, &mut buf[from..to])?;
                }
                for k in 0..m {
                    let i = page(k);
                    if !wanted(i) {
                        continue;
                    }
                    let bytes = &buf[(k * PAGE_SIZE) as usize..((k + 1) * PAGE_SIZE) as usize];
                    let class = if free.get(i) {
                        PageClass::Free
                    } else if zero[(sub + k) as usize] {
                        PageClass::Unbacked
                    } else if bytes.iter().all(|&b| b == 0) {
                        PageClass::Zero
                    } else {
                        PageClass::Data
                    };
                    let data: &[u8] = if class == PageClass::Data { bytes } else { &[] };
                    visit(i, class, data)?;
                }
                sub += m;
            }
            first += n;
        }
        Ok(())
    }

    /// Copies `buf.len()` bytes of RAM from `gpa` into `buf`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        vm_memory::Bytes::read_slice(&self.mem, buf, GuestAddress(gpa))
            .map_err(|e| Error::GuestMemory(e.to_string()))
    }
}

/// [`GuestRam`]'s host-side state: its size and the prepare queue (`zero_hints(PREPARE)`
/// ranges not backed yet). The RAM's contents are not part of it (a snapshot saves them
/// separately); which frames are backed is not state either (a frame reads the same either
/// way, and `QUERY` asks the host kernel).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GuestRamState {
    /// [`STATE_VERSION`].
    pub version: u32,
    /// RAM size in bytes: restoring into RAM of another size is refused.
    pub size: u64,
    /// Ranges queued for the preparing thread.
    pub prepare: PrepareQueueState,
}

impl Persist for GuestRam {
    type State = GuestRamState;

    fn save(&self) -> GuestRamState {
        let prepare = match self.preparer.get() {
            Some(Some(p)) => p.queued(),
            _ => PrepareQueueState::default(),
        };
        GuestRamState {
            version: STATE_VERSION,
            size: self.size,
            prepare,
        }
    }

    /// Checks the size and the queued ranges, then queues the ranges again (starting the
    /// preparing thread if need be). Preparing is advisory: on a host that cannot prepare
    /// (no `MADV_POPULATE_WRITE`) the ranges are checked and dropped.
    fn restore(&mut self, state: &GuestRamState) -> std::result::Result<(), StateError> {
        check_version(state.version)?;
        if state.size != self.size {
            return Err(StateError::mismatch(
                "guest RAM",
                format!(
                    "saved with {:#x} bytes of RAM, this VM has {:#x}",
                    state.size, self.size
                ),
            ));
        }
        state.prepare.check(self.size)?;
        for &(start, end) in &state.prepare.ranges {
            // Checked above; an unsupported host or a full queue only loses a hint.
            let _ = self.prepare(start, end - start);
        }
        Ok(())
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
    fn fresh_ram_is_known_zero_and_discard_makes_it_zero_again() {
        use vm_memory::Bytes;
        let ram = GuestRam::new(16 << 20).unwrap();
        assert!(ram.known_zero(0x300, 16).unwrap().iter().all(|&z| z));
        ram.mem()
            .write_obj(0xffu8, GuestAddress(0x301_000))
            .unwrap();
        let z = ram.known_zero(0x300, 16).unwrap();
        assert!(!z[1], "written frame is not known zero");
        assert!(ram.resident_bytes() >= 4096);
        ram.discard(0x300_000, 0x10_000).unwrap();
        assert!(ram.known_zero(0x300, 16).unwrap().iter().all(|&z| z));
        assert_eq!(
            ram.mem().read_obj::<u8>(GuestAddress(0x301_000)).unwrap(),
            0
        );
        assert!(ram.discard(0x300_001, 4096).is_err());
        assert!(ram.discard(16 << 20, 4096).is_err());
        assert!(ram.known_zero(4095, 2).is_err());
    }

    #[test]
    fn ram_state_round_trips_and_requeues_prepared_ranges() {
        let ram = GuestRam::new(16 << 20).unwrap();
        let mut fresh = GuestRam::new(16 << 20).unwrap();
        let json = crate::state::assert_round_trip(&ram, &mut fresh);
        assert!(json.contains("16777216"), "{json}");
        if !ram.can_prepare() {
            return;
        }
        // Queued ranges come back queued: the new thread backs them.
        let state = GuestRamState {
            version: STATE_VERSION,
            size: 16 << 20,
            prepare: PrepareQueueState {
                ranges: vec![(0x40_0000, 0x60_0000), (0x80_0000, 0x80_2000)],
            },
        };
        fresh.restore(&state).unwrap();
        crate::test_util::wait_until("the restored ranges to be prepared", || {
            fresh.prepare_stats().populated_bytes == 0x20_2000
        });
        assert_eq!(fresh.save().prepare, PrepareQueueState::default());
    }

    #[test]
    fn ram_states_of_another_size_or_with_bad_ranges_are_refused() {
        let mut ram = GuestRam::new(16 << 20).unwrap();
        let good = ram.save();
        let mut other = good.clone();
        other.size = 32 << 20;
        assert!(matches!(
            ram.restore(&other),
            Err(StateError::Mismatch { .. })
        ));
        let mut other = good.clone();
        other.version += 1;
        assert!(matches!(
            ram.restore(&other),
            Err(StateError::Version { .. })
        ));
        let mut other = good.clone();
        other.prepare.ranges = vec![(0x40_0000, 0x60_0000), (0xff_f000, 0x101_0000)];
        assert!(matches!(
            ram.restore(&other),
            Err(StateError::Invalid { .. })
        ));
        assert_eq!(
            ram.prepare_queued_bytes(),
            0,
            "nothing queued from a refused state"
        );
        assert_eq!(ram.prepare_stats().populated_bytes, 0);
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

    #[test]
    fn page_bits_set_clear_count_and_mask_their_tail() {
        let b = PageBits::from_words(&[u64::MAX, u64::MAX], 70);
        assert_eq!(b.count(), 70, "bits past the last page are dropped");
        assert!(b.get(69) && !b.get(70) && !b.get(1 << 40));
        b.clear_range(10, 5);
        assert_eq!(b.count(), 65);
        assert!(!b.any_in(10, 5) && b.any_in(9, 2));
        b.set(1 << 40); // past the end: ignored
        let c = PageBits::new(70);
        c.copy_from(&b);
        assert_eq!(c.count(), 65);
    }

    fn classes(view: &RamView, only: Option<&PageBits>, free: &PageBits) -> Vec<(u64, PageClass)> {
        let mut out = Vec::new();
        view.scan::<Error>(only, free, |i, class, data| {
            assert_eq!(data.len(), if class == PageClass::Data { 4096 } else { 0 });
            out.push((i, class));
            Ok(())
        })
        .unwrap();
        out
    }

    #[test]
    fn scan_tells_data_from_unbacked_free_and_zero_pages() {
        use vm_memory::Bytes;
        let ram = GuestRam::new(16 << 20).unwrap();
        let view = ram.view();
        let pages = (16 << 20) / PAGE_SIZE;
        let none = PageBits::new(pages);
        assert!(
            classes(&view, None, &none)
                .iter()
                .all(|&(_, c)| c == PageClass::Unbacked)
        );
        // Pages in different 2 MiB regions (a write may back a whole huge page).
        let (data, zero, freed, untouched) = (5, 600, 1200, 1800);
        ram.mem()
            .write_obj(0xabu8, GuestAddress(data * PAGE_SIZE))
            .unwrap();
        ram.mem()
            .write_obj(0u64, GuestAddress(zero * PAGE_SIZE))
            .unwrap();
        ram.mem()
            .write_obj(0xcdu8, GuestAddress(freed * PAGE_SIZE))
            .unwrap();
        let free = PageBits::new(pages);
        free.set(freed);
        let all = classes(&view, None, &free);
        assert_eq!(all.len() as u64, pages);
        let class = |i: u64| all[i as usize].1;
        assert_eq!(class(data), PageClass::Data);
        assert_eq!(class(zero), PageClass::Zero);
        assert_eq!(class(freed), PageClass::Free);
        assert_eq!(class(untouched), PageClass::Unbacked);
        // Scanning read no unbacked page: still unbacked.
        assert_eq!(
            classes(&view, None, &free)[untouched as usize].1,
            PageClass::Unbacked
        );
        // Only the pages asked for, in order.
        let only = PageBits::new(pages);
        only.set(zero);
        only.set(data);
        assert_eq!(
            classes(&view, Some(&only), &free),
            [(data, PageClass::Data), (zero, PageClass::Zero)]
        );
    }

    #[test]
    fn the_vmms_writes_and_discards_are_dirty() {
        use vm_memory::Bytes;
        let ram = GuestRam::new(16 << 20).unwrap();
        let view = ram.view();
        view.take_host_dirty();
        ram.mem()
            .write_obj(1u32, GuestAddress(3 * PAGE_SIZE + 8))
            .unwrap();
        ram.discard(8 * PAGE_SIZE, 2 * PAGE_SIZE).unwrap();
        let dirty = view.take_host_dirty();
        assert_eq!(dirty.count(), 3);
        assert!(dirty.get(3) && dirty.get(8) && dirty.get(9));
        assert_eq!(view.take_host_dirty().count(), 0, "taking clears");
    }

    #[test]
    fn a_mapped_memory_file_is_read_lazily_never_written_and_not_known_zero() {
        use std::io::Write;
        use vm_memory::Bytes;
        let size = 16u64 << 20;
        let path = std::env::temp_dir().join(format!("pvkit-memfile-{}", std::process::id()));
        let mut f = std::fs::File::create(&path).unwrap();
        f.set_len(size).unwrap();
        let page = vec![0x5au8; PAGE_SIZE as usize];
        use std::io::Seek;
        f.seek(std::io::SeekFrom::Start(4 * PAGE_SIZE)).unwrap();
        f.write_all(&page).unwrap();
        drop(f);
        let file = std::fs::File::open(&path).unwrap();
        let ram = GuestRam::new(size).unwrap();
        ram.mem()
            .write_obj(0x77u8, GuestAddress(6 * PAGE_SIZE))
            .unwrap();
        let data = PageBits::new(size / PAGE_SIZE);
        data.set(4);
        ram.map_memory_file(&file, data).unwrap();
        // Not touched yet, yet not known zero: it comes from the file.
        let z = ram.known_zero(0, 8).unwrap();
        assert_eq!(z, [true, true, true, true, false, true, true, true]);
        assert_eq!(
            ram.mem()
                .read_obj::<u8>(GuestAddress(4 * PAGE_SIZE))
                .unwrap(),
            0x5a
        );
        assert_eq!(
            ram.mem()
                .read_obj::<u8>(GuestAddress(6 * PAGE_SIZE))
                .unwrap(),
            0,
            "what RAM held before the mapping is gone"
        );
        // Written privately: the file keeps its contents.
        ram.mem()
            .write_obj(0x11u8, GuestAddress(4 * PAGE_SIZE))
            .unwrap();
        // Discarded: known zero again, and zero (not the file's contents).
        ram.discard(4 * PAGE_SIZE, PAGE_SIZE).unwrap();
        assert!(ram.known_zero(4, 1).unwrap()[0]);
        assert_eq!(
            ram.mem()
                .read_obj::<u8>(GuestAddress(4 * PAGE_SIZE))
                .unwrap(),
            0
        );
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(on_disk[(4 * PAGE_SIZE) as usize], 0x5a);
        let _ = std::fs::remove_file(&path);
    }
}
