//! `pagetable` (arguments `updates`, default 65536, a positive multiple of 4; `batch`, default
//! 512, 1..=1024; `root` = `boot` (default) or `new`; `tables` = `pool` (default) or `native`):
//! page-table update throughput through `guest_pv::mmu`, PV (batched `mmu_update` hypercalls of
//! up to `batch` entries) or trapped (one trapped store per entry; `batch` is ignored).
//!
//! `tables=native` is the baseline without pvkit, in either mode (`batch` is ignored): the
//! tables live in ordinary RAM (`guest_pv::mmu::NativeSpace`: a root and its tables in the
//! `tables_needed + 1` frames after the `P` data frames), written with plain stores that the
//! VMM never sees (KVM's shadow paging or EPT handles them), TLB flushed as in the other modes.
//! Its root links the identity map in L4 slot 0 like a pinned one. With `root=boot` it stands
//! in for the boot root, which is already loaded in the other runs: it is built and loaded
//! before the timed section and the boot root loaded again after it; with `root=new` that is
//! phases 0 and 6.
//!
//! Runs at CPL 3 (`guest_pv::cpu::run_user`): the manager's own work runs natively, so the
//! timing is the host's. `P` = `updates / 4` pages at `0x80_0000_0000` (L4 slot 1) are backed
//! by `P` frames of free RAM (frame `i` = `base + i * 4096`, the first usable region above the
//! kernel that holds them). Timed section, between the markers:
//!
//! 0. `root=new` only: a new root (`AddressSpace::new_pinned`: `mmu_pin` plus the link of
//!    L4 slot 0 to the identity map), loaded into CR3;
//! 1. map page `i` → frame `i`, writable (`P` updates, plus the tables on the way); flush TLB;
//! 2. write `tag(i)` at offset 0 of page `i`, read it back;
//! 3. remap page `i` → frame `(i + 1) % P`, writable (`P` updates); flush TLB; read page `i`
//!    (must be `tag((i + 1) % P)`);
//! 4. make every page read-only (`P` updates); flush TLB; read every page;
//! 5. unmap every page (`P` updates); flush TLB;
//! 6. `root=new` only: the boot root loaded again, and the new root released (`mmu_pin`
//!    unpin: the host frees its tables).
//!
//! `tag(i)` = `i * 0x9E3779B97F4A7C15 ^ 0x5a5a5a5a5a5a5a5a` (wrapping). `ops` = `updates`.
//!
//! Checksum: FNV-1a over these `u64`s (8 little-endian bytes each), in order —
//! - after phase 1, for page `i` in `[0, P - 1]`: `(e & PTE_ADDR_MASK) - base` and
//!   `e & (PTE_WRITABLE | PTE_PRESENT)`, where `e` is the page's L1 entry read back from the
//!   tables (Accessed/Dirty are left out: the host sets them);
//! - phase 2: the value read back from each page `i` (`tag(i)`), `i` = `0..P`;
//! - after phase 3: the entries of pages `0` and `P - 1` as after phase 1, then the value read
//!   from each page `i` (`tag((i + 1) % P)`);
//! - phase 4: the value read from each page `i` again.
//!
//! Entries enter as offsets from `base`, so the checksum depends only on `updates`: it is the
//! same in both modes, for both roots, for both kinds of tables, and whatever the kernel's size. The workload panics if
//! a value or entry is not what it must be (exit code 101), or on any `MmuError`.

use core::fmt;

use crate::args::Args;
use guest_pv::mmu::{AddressSpace, Batch, MmuError, NativeSpace, PtFrameAllocator, Updater};
use guest_pv::{Fnv1a, Pvkit, cpu};
use hypercall_abi::features;
use hypercall_abi::layout::{PAGE_SIZE, PML4_GPA};
use hypercall_abi::mmu::{
    ENTRIES_PER_TABLE, MMU_UPDATE_MAX, MmuUpdate, PTE_ADDR_MASK, PTE_PRESENT, PTE_WRITABLE,
};

use super::{Env, Outcome, Workload, free_ram_start};
use crate::platform::{at_cpl3, marker_begin, marker_end};

pub const WORKLOAD: Workload = Workload {
    name: "pagetable",
    keys: &["updates", "batch"],
    text_keys: &["root", "tables"],
    run,
};

const DEFAULT_UPDATES: u64 = 65536;
const DEFAULT_BATCH: u64 = 512;
/// The first page: L4 slot 1, empty in pvkit's boot tables.
const BASE_VA: u64 = 0x80_0000_0000;

/// The value written to page `i`.
const fn tag(i: u64) -> u64 {
    i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5a5a_5a5a_5a5a_5a5a
}

/// Which root the pages are mapped in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Root {
    /// pvkit's boot root.
    Boot,
    /// A new root, pinned for the run (PV only).
    New,
}

/// Everything the timed section needs, prepared at CPL 0.
struct Job<'a> {
    pool: &'a PtFrameAllocator,
    updater: Updater<'a>,
    root: Root,
    pages: Pages,
}

/// The pages and their frames.
#[derive(Debug, Clone, Copy)]
struct Pages {
    /// Guest-physical address of frame 0; frames are contiguous.
    base: u64,
    /// `P`.
    count: u64,
}

fn run(env: &mut Env, args: &Args<'_>) -> Outcome {
    let updates = args.get_or("updates", DEFAULT_UPDATES);
    let batch = args.get_or("batch", DEFAULT_BATCH);
    if updates == 0 || !updates.is_multiple_of(4) {
        WORKLOAD.usage(
            env,
            format_args!("updates={updates} (want a positive multiple of 4)"),
        );
    }
    if !(1..=MMU_UPDATE_MAX).contains(&batch) {
        WORKLOAD.usage(
            env,
            format_args!("batch={batch} (want 1..={MMU_UPDATE_MAX})"),
        );
    }
    let root = match args.get_str("root").unwrap_or("boot") {
        "boot" => Root::Boot,
        "new" => Root::New,
        other => WORKLOAD.usage(env, format_args!("root={other} (want boot or new)")),
    };
    let native = match args.get_str("tables").unwrap_or("pool") {
        "pool" => false,
        "native" => true,
        other => WORKLOAD.usage(env, format_args!("tables={other} (want pool or native)")),
    };
    if !native && root == Root::New && env.platform.feature(features::MMU_UPDATE).is_none() {
        WORKLOAD.usage(
            env,
            format_args!(
                "root=new needs a pvkit host offering mmu_update (a new root must be pinned with \
                 mmu_pin; the host cannot see a trapped guest's CR3 loads)"
            ),
        );
    }
    let pages = updates / 4;
    // Native tables (a root and the tables under it) follow the data frames.
    let native_tables = if native { tables_needed(pages) + 1 } else { 0 };
    let Some(bytes) = (pages + native_tables).checked_mul(PAGE_SIZE) else {
        WORKLOAD.usage(env, format_args!("updates={updates} is too large"));
    };
    let base = match free_ram_start(env.boot_info, bytes) {
        Ok(base) => base,
        Err(max) => WORKLOAD.usage(
            env,
            format_args!(
                "updates={updates} needs {bytes} bytes of free RAM for {pages} pages and \
                 {native_tables} native tables (max {max})"
            ),
        ),
    };
    if native {
        let pages = Pages { base, count: pages };
        let tables = (base + pages.count * PAGE_SIZE, base + bytes);
        let checksum = at_cpl3(|| run_native(tables, root, pages));
        return Outcome::new(updates, checksum);
    }
    let pool = PtFrameAllocator::from_boot_info(env.boot_info);
    let tables = tables_needed(pages) + u64::from(root == Root::New);
    if tables > pool.free_frames() as u64 {
        WORKLOAD.usage(
            env,
            format_args!(
                "updates={updates} needs {tables} page-table frames, the pool has {} free",
                pool.free_frames()
            ),
        );
    }
    let updater = match env.platform.feature(features::MMU_UPDATE) {
        Some(pv) => Updater::Pv(pv_batch(pv, batch as usize)),
        None => Updater::Trapped,
    };
    let job = Job {
        pool: &pool,
        updater,
        root,
        pages: Pages { base, count: pages },
    };
    let checksum = at_cpl3(|| job.run());
    Outcome::new(updates, checksum)
}

/// Tables to map `pages` pages from [`BASE_VA`]: L1 tables, L2 tables and one L3 table.
const fn tables_needed(pages: u64) -> u64 {
    let per_l1 = ENTRIES_PER_TABLE as u64;
    let l1 = pages.div_ceil(per_l1);
    l1 + l1.div_ceil(per_l1) + 1
}

/// The batch of a PV run (the host offers `mmu_update`), in this module's static buffer.
fn pv_batch(pv: Pvkit, capacity: usize) -> Batch<'static> {
    // SAFETY: `batch_buffer` is a kernel static, identity-mapped (VA == GPA) by pvkit's boot
    // tables.
    match unsafe { Batch::new(pv, batch_buffer(), capacity) } {
        Ok(batch) => batch,
        Err(e) => panic!("pagetable: batch of {capacity}: {e}"),
    }
}

/// The page-aligned buffer of the PV batch.
#[repr(C, align(4096))]
struct BatchBuffer([MmuUpdate; MMU_UPDATE_MAX as usize]);

static mut BATCH_BUFFER: BatchBuffer = BatchBuffer(
    [MmuUpdate {
        pte_gpa: 0,
        value: 0,
    }; MMU_UPDATE_MAX as usize],
);

/// The batch buffer, handed out once per boot (one workload runs per boot).
fn batch_buffer() -> &'static mut [MmuUpdate] {
    use core::sync::atomic::{AtomicBool, Ordering};
    static TAKEN: AtomicBool = AtomicBool::new(false);
    assert!(
        !TAKEN.swap(true, Ordering::Relaxed),
        "batch buffer handed out twice"
    );
    let buffer = &raw mut BATCH_BUFFER;
    // SAFETY: `TAKEN` makes this the only reference to the static for the rest of the
    // kernel's life; it is initialised (all zero entries).
    unsafe { &mut (*buffer).0 }
}

/// Unwraps a manager result; panics with what failed.
fn check<T>(r: Result<T, MmuError>, what: fmt::Arguments<'_>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("pagetable: {what}: {e}"),
    }
}

impl Pages {
    /// The virtual address of page `i`.
    fn va(&self, i: u64) -> u64 {
        BASE_VA + i * PAGE_SIZE
    }

    /// The guest-physical address of frame `i`.
    fn frame(&self, i: u64) -> u64 {
        self.base + i * PAGE_SIZE
    }

    /// Page `i`'s L1 entry, without Accessed and Dirty (which the host or the CPU sets).
    fn entry(&self, space: &impl Tables, i: u64) -> u64 {
        let e = check(space.entry(self.va(i)), format_args!("entry of page {i}"));
        e & (PTE_ADDR_MASK | PTE_WRITABLE | PTE_PRESENT)
    }

    /// Prepares the timed section (not timed): touches every data frame once through the
    /// identity map, so first touches of guest memory are not part of the measurement.
    fn prepare(&self) {
        for i in 0..self.count {
            let f = core::ptr::with_exposed_provenance_mut::<u64>(self.frame(i) as usize);
            // SAFETY: frame `i` is free RAM this workload owns (`free_ram_start`), identity-
            // mapped and user-accessible; writing the zero it holds changes nothing.
            unsafe { f.write_volatile(0) };
        }
    }

    /// Reads offset 0 of page `i`.
    fn read(&self, i: u64) -> u64 {
        let page = core::ptr::with_exposed_provenance::<u64>(self.va(i) as usize);
        // SAFETY: page `i` is mapped (phases 3 and 4, TLB flushed) to a frame this workload
        // owns.
        unsafe { page.read_volatile() }
    }
}

impl Job<'_> {
    /// The timed section, at CPL 3; returns the checksum.
    fn run(self) -> u64 {
        let Job {
            pool,
            updater,
            root,
            pages,
        } = self;
        pages.prepare();
        marker_begin();
        let mut space = match (root, updater) {
            (Root::New, Updater::Pv(batch)) => {
                let mut space = check(
                    AddressSpace::new_pinned(pool, batch),
                    format_args!("new root"),
                );
                // SAFETY: a new root shares L4 slot 0, the identity map where this kernel's
                // code, data and stacks are; nothing in use is mapped elsewhere.
                check(unsafe { space.activate() }, format_args!("load new root"));
                space
            }
            (_, updater) => AddressSpace::boot(pool, updater),
        };
        let h = phases(&mut space, pages);
        // 6. Back to the boot root, and the new one released.
        if space.is_pinned() {
            // SAFETY: the boot root maps the identity map in slot 0 like the new one, and
            // nothing in use is mapped elsewhere.
            unsafe { cpu::load_cr3(PML4_GPA) };
            check(space.release(), format_args!("release new root"));
        }
        marker_end();
        h
    }
}

/// The timed section (at CPL 3) on tables in ordinary RAM `[start, end)`, owned by this
/// workload; returns the checksum.
fn run_native((start, end): (u64, u64), root: Root, pages: Pages) -> u64 {
    pages.prepare();
    // Prepare (not timed): the table frames must be zero, as the pool's free frames are.
    for gpa in (start..end).step_by(8) {
        let f = core::ptr::with_exposed_provenance_mut::<u64>(gpa as usize);
        // SAFETY: `[start, end)` is free RAM this workload owns (`free_ram_start`, after the
        // data frames), identity-mapped writable and user-accessible, used by nothing yet.
        unsafe { f.write_volatile(0) };
    }
    let new_root = || {
        // SAFETY: `[start, end)` is owned, zero (above), identity-mapped writable and
        // user-accessible, and used by nothing else; the root is loaded only until the boot
        // root is loaded again below, while the range is still owned.
        let mut space = check(
            unsafe { NativeSpace::new(start, end) },
            format_args!("native root"),
        );
        // SAFETY: the native root shares L4 slot 0, the identity map where this kernel's
        // code, data and stacks are; nothing in use is mapped elsewhere.
        unsafe { space.activate() };
        space
    };
    if root == Root::New {
        marker_begin();
        // 0. A new root.
        let mut space = new_root();
        let h = phases(&mut space, pages);
        // 6. Back to the boot root; the native tables are simply not used again.
        boot_root_again();
        marker_end();
        h
    } else {
        // Not timed: in the other runs the boot root is already loaded.
        let mut space = new_root();
        marker_begin();
        let h = phases(&mut space, pages);
        marker_end();
        boot_root_again();
        h
    }
}

/// Loads the boot root again after a native root.
fn boot_root_again() {
    // SAFETY: the boot root maps the identity map in L4 slot 0 like the native root, and nothing
    // in use is mapped elsewhere.
    unsafe { cpu::load_cr3(PML4_GPA) };
}

/// Page-table operations the phases use, on pool or native tables.
trait Tables {
    /// Maps page `va` to frame `pa`, writable if `flags` has `PTE_WRITABLE`.
    ///
    /// # Safety
    /// As for `AddressSpace::map_4k`.
    unsafe fn map(&mut self, va: u64, pa: u64, flags: u64) -> Result<(), MmuError>;
    /// Changes the flags of the mapped page `va`.
    ///
    /// # Safety
    /// As for `AddressSpace::protect_4k`.
    unsafe fn protect(&mut self, va: u64, flags: u64) -> Result<(), MmuError>;
    /// Unmaps page `va`.
    ///
    /// # Safety
    /// As for `AddressSpace::unmap_4k`.
    unsafe fn unmap(&mut self, va: u64) -> Result<(), MmuError>;
    /// The L1 entry of `va`.
    fn entry(&self, va: u64) -> Result<u64, MmuError>;
    /// Applies queued updates and flushes the TLB.
    fn flush_tlb(&mut self) -> Result<(), MmuError>;
}

impl Tables for AddressSpace<'_> {
    unsafe fn map(&mut self, va: u64, pa: u64, flags: u64) -> Result<(), MmuError> {
        // SAFETY: the caller's contract is `map_4k`'s.
        unsafe { self.map_4k(va, pa, flags) }
    }
    unsafe fn protect(&mut self, va: u64, flags: u64) -> Result<(), MmuError> {
        // SAFETY: the caller's contract is `protect_4k`'s.
        unsafe { self.protect_4k(va, flags) }
    }
    unsafe fn unmap(&mut self, va: u64) -> Result<(), MmuError> {
        // SAFETY: the caller's contract is `unmap_4k`'s.
        unsafe { self.unmap_4k(va) }
    }
    fn entry(&self, va: u64) -> Result<u64, MmuError> {
        self.entry_4k(va)
    }
    fn flush_tlb(&mut self) -> Result<(), MmuError> {
        AddressSpace::flush_tlb(self)
    }
}

impl Tables for NativeSpace {
    unsafe fn map(&mut self, va: u64, pa: u64, flags: u64) -> Result<(), MmuError> {
        // SAFETY: the caller's contract is `map_4k`'s.
        unsafe { self.map_4k(va, pa, flags) }
    }
    unsafe fn protect(&mut self, va: u64, flags: u64) -> Result<(), MmuError> {
        // SAFETY: the caller's contract is `protect_4k`'s.
        unsafe { self.protect_4k(va, flags) }
    }
    unsafe fn unmap(&mut self, va: u64) -> Result<(), MmuError> {
        // SAFETY: the caller's contract is `unmap_4k`'s.
        unsafe { self.unmap_4k(va) }
    }
    fn entry(&self, va: u64) -> Result<u64, MmuError> {
        self.entry_4k(va)
    }
    fn flush_tlb(&mut self) -> Result<(), MmuError> {
        NativeSpace::flush_tlb(self);
        Ok(())
    }
}

/// Phases 1 to 5 on `space`; returns the checksum so far.
fn phases(space: &mut impl Tables, pages: Pages) -> u64 {
    let (p, base) = (pages.count, pages.base);
    let mut h = Fnv1a::new();

    // 1. Map.
    for i in 0..p {
        // SAFETY: L4 slot 1 is used by nothing but this workload, whose accesses to it are
        // the raw-pointer ones below; frame `i` is free RAM it owns.
        let r = unsafe { space.map(pages.va(i), pages.frame(i), PTE_WRITABLE) };
        check(r, format_args!("map page {i}"));
    }
    check(space.flush_tlb(), format_args!("flush after map"));
    for i in [0, p - 1] {
        let e = pages.entry(space, i);
        assert_eq!(
            e,
            pages.frame(i) | PTE_WRITABLE | PTE_PRESENT,
            "page {i} after map"
        );
        fold_entry(&mut h, e, base);
    }

    // 2. Touch.
    for i in 0..p {
        let page = core::ptr::with_exposed_provenance_mut::<u64>(pages.va(i) as usize);
        // SAFETY: page `i` maps frame `i` writable (phase 1, TLB flushed); the frame is
        // owned by this workload and aliased by nothing else in use.
        let v = unsafe {
            page.write_volatile(tag(i));
            page.read_volatile()
        };
        assert_eq!(v, tag(i), "page {i} read back");
        h.write_u64(v);
    }

    // 3. Remap to the next frame.
    for i in 0..p {
        let next = (i + 1) % p;
        // SAFETY: as in phase 1; nothing holds a reference into the pages.
        let r = unsafe { space.map(pages.va(i), pages.frame(next), PTE_WRITABLE) };
        check(r, format_args!("remap page {i}"));
    }
    check(space.flush_tlb(), format_args!("flush after remap"));
    for i in [0, p - 1] {
        let e = pages.entry(space, i);
        let next = (i + 1) % p;
        assert_eq!(
            e,
            pages.frame(next) | PTE_WRITABLE | PTE_PRESENT,
            "page {i} after remap"
        );
        fold_entry(&mut h, e, base);
    }
    for i in 0..p {
        let v = pages.read(i);
        let want = tag((i + 1) % p);
        if v != want {
            let stale = if v == tag(i) {
                ": the old translation survived the TLB flush"
            } else {
                ""
            };
            panic!("page {i} after remap reads {v:#x}, want {want:#x}{stale}");
        }
        h.write_u64(v);
    }

    // 4. Read-only.
    for i in 0..p {
        // SAFETY: as in phase 1; no `&mut` into the pages exists.
        let r = unsafe { space.protect(pages.va(i), 0) };
        check(r, format_args!("protect page {i}"));
    }
    check(space.flush_tlb(), format_args!("flush after protect"));
    for i in 0..p {
        h.write_u64(pages.read(i));
    }
    for i in [0, p - 1] {
        let e = pages.entry(space, i);
        assert_eq!(
            e,
            pages.frame((i + 1) % p) | PTE_PRESENT,
            "page {i} after protect"
        );
    }

    // 5. Unmap.
    for i in 0..p {
        // SAFETY: as in phase 1; nothing will access the pages again.
        let r = unsafe { space.unmap(pages.va(i)) };
        check(r, format_args!("unmap page {i}"));
    }
    check(space.flush_tlb(), format_args!("flush after unmap"));
    for i in [0, p - 1] {
        assert_eq!(pages.entry(space, i), 0, "page {i} after unmap");
    }
    h.finish()
}

/// Folds entry `e` (already masked) into `h`: its frame as an offset from `base`, then its
/// Writable and Present bits.
fn fold_entry(h: &mut Fnv1a, e: u64, base: u64) {
    h.write_u64((e & PTE_ADDR_MASK).wrapping_sub(base));
    h.write_u64(e & (PTE_WRITABLE | PTE_PRESENT));
}
