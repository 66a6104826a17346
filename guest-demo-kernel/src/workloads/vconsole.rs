//! `vconsole` (argument `bytes`, default 16384): console throughput through virtio-console
//! (`guest_pv::virtio::VConsole`), on the device the host attaches with
//! `host-vmm run --virtio-console` (the first virtio-mmio window of device ID 3 in the boot
//! memory map). Same output as `console`: exactly `bytes` bytes between the markers, byte `j` =
//! `b'a' + j % 26` except every 64th (`j % 64 == 63`) = `\n`; checksum FNV-1a over them,
//! `ops` = `bytes`, extra result field `chains` (transmit chains).
//!
//! The DMA pages of the rings and then the pattern buffer lie in free RAM; the pattern is
//! generated and the device set up before the begin marker, so the timed section only
//! transmits: one chain per 64 KiB, each notified through QueueNotify (an ioeventfd, no exit)
//! and waited for by polling the used ring (no exit). Works in both modes.
//!
//! Errors: no virtio console (exit 2: `error: workload 'vconsole': no virtio console (run with
//! --virtio-console)`), `bytes` larger than free RAM (exit 2); a device that cannot be set up
//! or a failed write (panic, exit 101).

use core::fmt::Write;

use crate::args::Args;
use guest_pv::Fnv1a;
use guest_pv::virtio;
use hypercall_abi::layout::PAGE_SIZE;
use hypercall_abi::virtio::DEVICE_ID_CONSOLE;

use super::{Env, Outcome, Workload, free_ram_start};
use crate::platform::{marker_begin, marker_end};

pub const WORKLOAD: Workload = Workload {
    name: "vconsole",
    keys: &["bytes"],
    text_keys: &[],
    run,
};

const DEFAULT_BYTES: u64 = 16 * 1024;
/// Pages of DMA memory for the driver (its two queues take four).
const DMA_PAGES: u64 = 8;

/// Byte `j` of the output (as `console`'s).
const fn pattern(j: u64) -> u8 {
    if j % 64 == 63 {
        b'\n'
    } else {
        b'a' + (j % 26) as u8
    }
}

fn run(env: &mut Env, args: &Args<'_>) -> Outcome {
    let bytes = args.get_or("bytes", DEFAULT_BYTES);
    let Some(dev) = virtio::find(env.boot_info, DEVICE_ID_CONSOLE) else {
        WORKLOAD.usage(
            env,
            format_args!("no virtio console (run with --virtio-console)"),
        );
    };
    let dma_len = DMA_PAGES * PAGE_SIZE;
    let base = match bytes
        .checked_add(dma_len)
        .ok_or(0)
        .and_then(|total| free_ram_start(env.boot_info, total))
    {
        Ok(base) => base,
        Err(max) => WORKLOAD.usage(
            env,
            format_args!(
                "bytes={bytes} does not fit in free RAM (with {dma_len} bytes of DMA pages; the \
                 largest free region above the kernel has {max})"
            ),
        ),
    };
    // SAFETY: free RAM above the kernel (`free_ram_start`), identity-mapped, used by nothing
    // else: one workload runs per boot, and the buffer after it is a separate range.
    if let Err(e) = unsafe { virtio::set_dma_region(base, dma_len) } {
        panic!("vconsole: {e}");
    }
    let ptr = core::ptr::with_exposed_provenance_mut::<u8>((base + dma_len) as usize);
    // SAFETY: `base + dma_len .. + bytes` is the rest of the free region `free_ram_start`
    // found (it holds `dma_len + bytes`), identity-mapped RAM nothing else in this kernel uses
    // (no allocator; one workload per boot; the DMA pages lie before it). It is written before
    // the slice is formed, so it is initialised; `u8` needs no alignment.
    let buf: &[u8] = unsafe {
        for j in 0..bytes {
            ptr.add(j as usize).write(pattern(j));
        }
        core::slice::from_raw_parts(ptr, bytes as usize)
    };
    let checksum = Fnv1a::hash(buf);

    // SAFETY: the window comes from the boot memory map and this is its only driver.
    let mut console = match unsafe { virtio::open_console(&dev) } {
        Ok(c) => c,
        Err(e) => panic!("vconsole: cannot set up the device: {e}"),
    };
    marker_begin();
    let r = console.write(buf);
    marker_end();
    if let Err(e) = r {
        panic!("vconsole: write: {e}");
    }
    let chains = console.chains();
    drop(console);
    // Keep the result line on a line of its own.
    if !bytes.is_multiple_of(64) {
        let _ = env.console.write_bytes(b"\n");
    }
    let mut outcome = Outcome::new(bytes, checksum);
    let _ = write!(outcome.fields, " chains={chains}");
    outcome
}
