//! `console`: K bytes through `console_write` (one exit per buffer) versus the UART (one exit
//! per byte). The host receives the same bytes both ways.

use tests::{Mode, boot, console_pattern, fnv1a};

const K: u64 = 10_000;

#[test]
fn console_bytes_arrive_intact_in_both_modes() {
    let arg = format!("bytes={K}");
    let want = console_pattern(K);
    for mode in [Mode::Pv, Mode::Trapped] {
        let r = boot(mode, "console", &[&arg]);
        assert_eq!(r.exit_code, 0);
        assert_eq!(r.window_console(), want.as_slice(), "{}", mode.name());
        let res = r.result.as_ref().unwrap();
        assert_eq!(res.ops(), Some(K));
        assert_eq!(res.checksum(), Some(fnv1a(want.iter().copied())));
    }
}

#[test]
fn pv_console_costs_far_fewer_exits_than_bytes() {
    let arg = format!("bytes={K}");
    let pv = boot(Mode::Pv, "console", &[&arg]);
    let w = pv.window.as_ref().unwrap();
    // One exit per 4 KiB buffer.
    assert!(
        w.exits.total <= K.div_ceil(4096) + 1,
        "{}",
        w.exits.summary()
    );
    assert_eq!(w.exits.by_hypercall["console_write"], w.exits.total);

    let tr = boot(Mode::Trapped, "console", &[&arg]);
    let w = tr.window.as_ref().unwrap();
    assert!(w.exits.total >= K, "{}", w.exits.summary());
    assert_eq!(w.exits.by_device["uart"], w.exits.total);
    // A 16550A driver writes 16 bytes per THRE poll: K data writes + K/16 status reads.
    assert!(
        w.exits.total <= K + K.div_ceil(16) + 1,
        "{}",
        w.exits.summary()
    );
}
