//! `console` (argument `bytes`, default 16384): console throughput. Emits exactly `bytes`
//! bytes of a fixed pattern between the markers: byte `j` is `b'a' + j % 26`, except that every
//! 64th byte (`j % 64 == 63`) is `\n`. PV: `console_write` hypercalls of up to 4096 bytes;
//! trapped: one UART byte at a time. Checksum: FNV-1a over the emitted bytes; `ops` = `bytes`.

use guest_pv::args::Args;
use guest_pv::{Console, Fnv1a};

use super::{Env, Outcome, Workload};
use crate::platform::{marker_begin, marker_end};

pub const WORKLOAD: Workload = Workload {
    name: "console",
    keys: &["bytes"],
    run,
};

const DEFAULT_BYTES: u64 = 16 * 1024;

/// Bytes per `console_write` in PV mode.
const CHUNK: usize = 4096;

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
    let mut sum = Fnv1a::new();
    match &mut env.console {
        Console::Pv(console) => {
            let pv = console.pvkit();
            let mut buf = [0u8; CHUNK];
            marker_begin();
            let mut j = 0;
            while j < bytes {
                let n = (bytes - j).min(CHUNK as u64) as usize;
                let chunk = &mut buf[..n];
                for (k, b) in chunk.iter_mut().enumerate() {
                    *b = pattern(j + k as u64);
                }
                sum.write(chunk);
                match pv.console_write(chunk) {
                    Ok(w) if w == n => {}
                    Ok(w) => panic!("console_write at byte {j}: host took {w} of {n} bytes"),
                    Err(e) => panic!("console_write at byte {j}: {e}"),
                }
                j += n as u64;
            }
            marker_end();
        }
        Console::Uart(uart) => {
            // Start the timed section with an empty FIFO, so its LSR polls do not depend on
            // what was printed before.
            uart.flush();
            marker_begin();
            for j in 0..bytes {
                let b = pattern(j);
                uart.write_byte(b);
                sum.write_u8(b);
            }
            marker_end();
        }
    }
    // Keep the result line on a line of its own.
    if bytes % 64 != 0 {
        let _ = env.console.write_bytes(b"\n");
    }
    Outcome {
        ops: bytes,
        checksum: sum.finish(),
    }
}
