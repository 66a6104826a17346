//! A minimal pvkit kernel. Under `host-vmm run` it uses pvkit's hypercalls for everything the
//! host offers, and the trapped twin of each where it does not (`--mode trapped`, `--disable`,
//! or another hypervisor): the result line is the same both ways, only the cost differs.
//!
//! It exercises guest-pv's public API only: the console (`println!`, one exit per line), the
//! clock, an idle wait, the zero-hint frame allocator and a batched page-table update.
#![no_std]
#![no_main]

use guest_pv::abi::boot::region_kind;
use guest_pv::abi::features::{self, Names};
use guest_pv::abi::mmu::{MmuUpdate, PTE_WRITABLE};
use guest_pv::abi::ports::{MARKER_BEGIN, MARKER_END};
use guest_pv::frames::{Frames, HintBuffers, Hints};
use guest_pv::kernel::Kernel;
use guest_pv::mmu::{AddressSpace, Batch, PtFrameAllocator, Updater};
use guest_pv::tsc::Tsc;
use guest_pv::{Fnv1a, println};

// Defines `_start` and the pvkit ABI note; `main` runs after the boot checks. Nothing is
// required (`entry!(main, requires = …)` would make host-vmm refuse VMs without those features).
guest_pv::entry!(main);
// The PVH entry note and `pvkit_pvh_start`: the same binary also boots under QEMU
// (`-M microvm -kernel`) and other PVH loaders, where it runs its trapped twins.
guest_pv::pvh_entry!();

/// Pages the kernel maps and fills.
const PAGES: u64 = 8;
/// Frames the allocator manages: 4 MiB, so its metadata (at the end) does not share a 2 MiB
/// host page with the frames handed out first.
const FRAMES: u64 = 1024;
/// Where it maps them: L4 slot 1, which pvkit's boot tables leave empty.
const VA: u64 = 0x80_0000_0000;

/// The zero-hint buffers the host reads and writes (identity-mapped, like all kernel statics).
static mut HINT_BUFFERS: HintBuffers = HintBuffers::new();
/// The page-table batch the host reads.
static mut BATCH: [MmuUpdate; 64] = [MmuUpdate {
    pte_gpa: 0,
    value: 0,
}; 64];

fn main(kernel: Kernel) -> u32 {
    let platform = kernel.platform;
    println!(
        "minimal-kernel: {} mode, pvkit features: {}",
        platform.mode().name(),
        Names(platform.feature_bits())
    );
    kernel.marker(MARKER_BEGIN);

    // Frames: with zero hints the host says which are already zero (no memset); without, the
    // allocator zeroes each one.
    // Free RAM from the boot memory map, from a 2 MiB boundary: pvkit backs guest RAM with
    // 2 MiB host pages, and the one holding the kernel image is backed (not known zero).
    let (start, len) = guest_pv::boot::free_ram(kernel.boot_info).expect("free RAM");
    let ram = start.next_multiple_of(2 << 20);
    assert!(
        ram + Frames::region_bytes(FRAMES) <= start + len,
        "free RAM too small"
    );
    let hints = match platform.feature(features::ZERO_HINTS) {
        Some(pv) => Hints::Pv(pv),
        None => Hints::None,
    };
    let (buffers, batch) = (&raw mut HINT_BUFFERS, &raw mut BATCH);
    // SAFETY: `main` runs once, and these statics are used only here, so the two `&mut` are
    // the only references to them ever made. Like all kernel statics they are identity-mapped,
    // as the host (which reads and writes them by physical address) requires.
    let (buffers, batch) = unsafe { (&mut *buffers, &mut *batch) };
    // SAFETY: `ram` is free RAM above the kernel, identity-mapped, used by nothing else.
    let mut frames = unsafe { Frames::new(ram, Frames::region_bytes(FRAMES), hints, buffers) }
        .expect("a frame region");

    // Page tables: a batch of `mmu_update`s (one exit per flush) or plain stores into the
    // read-only pool (one trapped exit each). Without pvkit's page-table pool in the memory
    // map (booted by PVH elsewhere, e.g. QEMU) the frames are used through the identity map.
    let has_pool = kernel
        .boot_info
        .regions()
        .iter()
        .any(|r| r.kind == region_kind::PT_POOL);
    let mut pages = [0u64; PAGES as usize];
    let mut hash = Fnv1a::new();
    if has_pool {
        let updater = match platform.feature(features::MMU_UPDATE) {
            // SAFETY: `batch` is an identity-mapped static (see above).
            Some(pv) => Updater::Pv(unsafe { Batch::new(pv, batch, 64) }.expect("a batch")),
            None => Updater::Trapped,
        };
        let pool = PtFrameAllocator::from_boot_info(kernel.boot_info);
        let mut space = AddressSpace::boot(&pool, updater);
        for (i, page) in pages.iter_mut().enumerate() {
            let frame = frames.alloc().expect("a frame");
            *page = VA + i as u64 * 4096;
            // SAFETY: `*page` is in an L4 slot nothing else uses; `frame` is ours.
            unsafe { space.map_4k(*page, frame, PTE_WRITABLE) }.expect("map");
        }
        space.flush().expect("flush the batch"); // new mappings: no TLB flush needed
    } else {
        for page in &mut pages {
            *page = frames.alloc().expect("a frame"); // identity-mapped at boot
        }
    }
    for (i, &page) in pages.iter().enumerate() {
        let page = page as *mut u64;
        // SAFETY: mapped (by us, or the boot identity map), writable, 4 KiB, used by nothing
        // else.
        let first = unsafe { page.read_volatile() };
        assert_eq!(first, 0, "a fresh frame reads as zero");
        // SAFETY: as above.
        unsafe { page.write_volatile(i as u64 * 0x0101_0101) };
        // SAFETY: as above.
        hash.write_u64(unsafe { page.read_volatile() });
    }

    // Idle 2 ms: parked in the host with `idle_yield`, or spinning on the TSC.
    let waited = match platform.feature(features::IDLE_YIELD | features::CLOCK) {
        Some(pv) => {
            let deadline = pv.clock_ns().expect("clock_ns") + 2_000_000;
            while pv.clock_ns().expect("clock_ns") < deadline {
                pv.idle_yield(deadline).expect("idle_yield");
            }
            true
        }
        None => match Tsc::from_cpuid() {
            Some(tsc) => {
                let deadline = tsc.now_ns() + 2_000_000;
                guest_pv::idle::spin(&tsc, deadline);
                true
            }
            None => false,
        },
    };
    kernel.marker(MARKER_END);

    let stats = frames.stats();
    println!(
        "minimal-kernel: mapped {PAGES} pages, guest zeroed {} bytes, waited {}",
        stats.zeroed_bytes,
        if waited { "2 ms" } else { "not (no clock)" }
    );
    println!("RESULT pages={PAGES} checksum={:#018x}", hash.finish());
    0
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    guest_pv::kernel::report_panic(info)
}
