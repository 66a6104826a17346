//! virtio-blk under real KVM: the guest's reads return the host file's bytes, its writes land
//! in the file byte for byte, a read-only disk refuses writes, and requests cost well under one
//! exit each (ioeventfd for notifications, EVENT_IDX, polling or PV waits for completions).

use std::path::{Path, PathBuf};

use tests::{Mode, boot_with_disk, fnv1a, pseudo_random_bytes, text};

const MIB: u64 = 4;

/// A scratch image with deterministic contents, removed on drop.
struct Image(PathBuf);

impl Image {
    fn new(tag: &str) -> Image {
        let p = std::env::temp_dir().join(format!("pvkit-test-{tag}-{}.img", std::process::id()));
        std::fs::write(
            &p,
            pseudo_random_bytes((2 * MIB) << 20, 0x1234_5678_9abc_def1),
        )
        .unwrap();
        Image(p)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn bytes(&self) -> Vec<u8> {
        std::fs::read(&self.0).unwrap()
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn blk(mode: Mode, img: &Image, readonly: bool, args: &[&str]) -> host_vmm::compare::Measured {
    let mib = format!("mib={MIB}");
    let mut all = vec![mib.as_str()];
    all.extend_from_slice(args);
    let r = boot_with_disk(mode, "blk", &all, img.path(), readonly);
    assert_eq!(r.exit_code, 0, "{}", text(&r));
    r
}

#[test]
fn reads_return_the_host_files_bytes_in_both_modes() {
    let img = Image::new("read");
    let want = fnv1a(img.bytes()[..(MIB << 20) as usize].iter().copied());
    for (mode, wait) in [
        (Mode::Pv, "wait=pv"),
        (Mode::Trapped, "wait=irq"),
        (Mode::Pv, "wait=poll"),
        (Mode::Pv, "wait=adaptive"),
    ] {
        let r = blk(
            mode,
            &img,
            false,
            &["pattern=seq-read", "size_kib=128", wait],
        );
        assert_eq!(
            r.result.as_ref().unwrap().checksum(),
            Some(want),
            "{wait}: {}",
            text(&r)
        );
    }
}

#[test]
fn writes_land_in_the_host_file_byte_for_byte() {
    let img = Image::new("write");
    let before = img.bytes();
    blk(Mode::Pv, &img, false, &["pattern=seq-write", "size_kib=64"]);
    let after = img.bytes();
    let n = (MIB << 20) as usize;
    for (k, b) in after[..n].iter().enumerate() {
        assert_eq!(*b, ((k as u64 * 131 + 7) % 251) as u8, "byte {k}");
    }
    assert_eq!(
        after[n..],
        before[n..],
        "nothing beyond the transfer changed"
    );
}

#[test]
fn a_read_only_disk_refuses_writes_with_an_io_error() {
    let img = Image::new("ro");
    let before = img.bytes();
    let r = blk(Mode::Pv, &img, true, &["pattern=write-ro-probe"]);
    assert!(text(&r).contains("status=ioerr"), "{}", text(&r));
    assert_eq!(img.bytes(), before);
}

#[test]
fn requests_cost_less_than_one_exit_each() {
    let img = Image::new("exits");
    for (mode, wait) in [
        (Mode::Pv, "wait=poll"),
        (Mode::Pv, "wait=pv"),
        (Mode::Pv, "wait=adaptive"),
    ] {
        let r = blk(
            mode,
            &img,
            false,
            &["pattern=seq-read", "size_kib=128", wait],
        );
        let w = r.window.as_ref().unwrap();
        let requests: u64 = r
            .result
            .as_ref()
            .unwrap()
            .get("requests")
            .unwrap()
            .parse()
            .unwrap();
        assert!(requests >= (MIB << 20) / (128 << 10));
        assert!(
            w.exits.total < requests * 2,
            "{wait}: {} exits for {requests} requests: {}",
            w.exits.total,
            w.exits.summary()
        );
        if wait == "wait=poll" {
            assert!(w.exits.total < requests, "{}", w.exits.summary());
        }
    }
}

#[test]
fn the_default_pv_wait_is_adaptive_with_a_measured_window() {
    let img = Image::new("adaptive");
    let want = fnv1a(img.bytes()[..(MIB << 20) as usize].iter().copied());
    let r = blk(Mode::Pv, &img, false, &["pattern=seq-read", "depth=4"]);
    let result = r.result.as_ref().unwrap();
    assert_eq!(result.checksum(), Some(want), "{}", text(&r));
    assert_eq!(result.get("wait"), Some("adaptive"), "{}", text(&r));
    let field = |k: &str| -> u64 { result.get(k).unwrap().parse().unwrap() };
    let cost = field("wake_cost_ns");
    assert!(cost > 0, "a park costs something: {}", text(&r));
    assert!(
        field("poll_window_ns") <= cost,
        "the window never exceeds the wake-up cost: {}",
        text(&r)
    );
    assert!(field("requests") >= (MIB << 20) / (128 << 10));
}
