//! `console` (argument `bytes`, default 16384): console throughput. Emits exactly `bytes`
//! bytes of a fixed pattern between the markers: byte `j` is `b'a' + j % 26`, except that every
//! 64th byte (`j % 64 == 63`) is `\n`.
//!
//! The whole pattern is generated before the begin marker, into free RAM (the first usable
//! region of the boot memory map above the kernel), so the timed section only transmits it. PV:
//! `console_write` of the buffer (one hypercall per `CONSOLE_WRITE_MAX` bytes); trapped: the
//! UART, one THR write per byte plus one LSR poll per 16 bytes (the FIFO is drained before the
//! begin marker). Checksum: FNV-1a over the emitted bytes; `ops` = `bytes`. A `bytes` larger
//! than that free region is an argument error (exit code 2).

use core::sync::atomic::{AtomicBool, Ordering};

use crate::args::Args;
use guest_pv::{Console, Fnv1a};
use hypercall_abi::boot::BootInfo;

use super::{Env, Outcome, Workload, free_ram_start};
use crate::exit_code;
use crate::out::kprintln;
use crate::platform::{marker_begin, marker_end};

pub const WORKLOAD: Workload = Workload {
    name: "console",
    keys: &["bytes"],
    text_keys: &[],
    run,
};

const DEFAULT_BYTES: u64 = 16 * 1024;

/// Byte `j` of the output.
const fn pattern(j: u64) -> u8 {
    if j % 64 == 63 {
        b'\n'
    } else {
        b'a' + (j % 26) as u8
    }
}

fn run(env: &mut Env, args: &Args<'_>) -> Outcome {
    let bytes = args.get_or("bytes", DEFAULT_BYTES);
    let buf = match free_ram(env.boot_info, bytes) {
        Ok(buf) => buf,
        Err(max) => {
            kprintln!(
                env.console,
                "error: workload '{}': bytes={bytes} does not fit in free RAM (max {max})",
                WORKLOAD.name
            );
            env.exit(exit_code::USAGE);
        }
    };
    for (j, b) in (0u64..).zip(buf.iter_mut()) {
        *b = pattern(j);
    }
    let buf: &[u8] = buf;
    let checksum = Fnv1a::hash(buf);

    match &mut env.console {
        Console::Pv(console) => {
            let pv = console.pvkit();
            marker_begin();
            let r = pv.console_write(buf);
            marker_end();
            match r {
                Ok(w) if w == buf.len() => {}
                Ok(w) => panic!("console_write: host took {w} of {} bytes", buf.len()),
                Err(e) => panic!("console_write: {e}"),
            }
        }
        Console::Uart(uart) => {
            // Start the timed section with an empty FIFO, so its LSR polls do not depend on
            // what was printed before.
            uart.flush();
            marker_begin();
            uart.write_bytes(buf);
            marker_end();
        }
    }
    // Keep the result line on a line of its own.
    if !bytes.is_multiple_of(64) {
        let _ = env.console.write_bytes(b"\n");
    }
    Outcome::new(bytes, checksum)
}

/// Set once free RAM has been handed out as a buffer.
static FREE_RAM_TAKEN: AtomicBool = AtomicBool::new(false);

/// A zeroed buffer of `len` bytes at [`free_ram_start`]; `Err(max)` if no free region holds
/// it.
///
/// Panics if called a second time: the buffer is exclusive for the rest of the kernel's life.
fn free_ram(info: &BootInfo, len: u64) -> Result<&'static mut [u8], u64> {
    let start = free_ram_start(info, len)?;
    assert!(
        !FREE_RAM_TAKEN.swap(true, Ordering::Relaxed),
        "free RAM handed out twice"
    );
    if len == 0 {
        return Ok(&mut []);
    }
    let ptr = core::ptr::with_exposed_provenance_mut::<u8>(start as usize);
    // SAFETY: `start..start + len` lies in a region the VMM's boot info marks usable RAM, above
    // the kernel image (so outside its code, data, BSS and the boot stack, page tables and boot
    // info, which are reserved regions), and inside the boot identity map, so the virtual
    // address `start` maps that RAM (`start` > 0: the kernel is loaded above 0). Nothing else in
    // this kernel uses free RAM (it has no allocator) and `FREE_RAM_TAKEN` makes this the only
    // reference to it, for `'static`. The bytes are zeroed before the slice is formed, so it
    // is initialised; `len` <= the region size fits the address space, and `u8` needs no
    // alignment.
    unsafe {
        ptr.write_bytes(0, len as usize);
        Ok(core::slice::from_raw_parts_mut(ptr, len as usize))
    }
}
