//! `zero_hints`: QUERY reports which guest frames are known zero (not backed by host memory);
//! RELEASE discards frames the guest freed, returning the memory to the host; PREPARE (v1.6)
//! backs known-zero frames the guest is about to use on the preparing thread
//! ([`crate::prepare`]); FREE_LIST (v1.8) registers the guest's list of free frames
//! ([`crate::free_report`]). All guest addresses are bounds-checked; RELEASE checks every range
//! before releasing any.

use hypercall_abi::layout::PAGE_SIZE;
use hypercall_abi::request::ZeroOp;
use hypercall_abi::zero::{QUERY_MAX_FRAMES, RELEASE_MAX_RANGES, ZeroRange};
use hypercall_abi::{Error as AbiError, Return, features};
use vm_memory::Bytes;

use crate::free_report::FreeReport;
use crate::hypercall::Context;
use crate::memory::GuestRam;
use crate::metrics::ExitStats;

/// Runs the decoded operation (`Request::ZeroHints`).
pub fn zero_hints(ctx: &mut Context<'_>, op: ZeroOp, stats: &mut ExitStats) -> Return {
    let (ram, protected_end) = (ctx.ram, ctx.protected_end);
    match op {
        ZeroOp::Query {
            bitmap_gpa,
            first_frame,
            count,
        } => query(ram, bitmap_gpa, first_frame, count, stats),
        ZeroOp::Release { ranges_gpa, count } => {
            release(ram, protected_end, ranges_gpa, count, stats)
        }
        ZeroOp::Prepare { gpa, len } => prepare(ram, protected_end, gpa, len, stats),
        ZeroOp::FreeList {
            list_gpa,
            max_ranges,
        } => free_list(
            ram,
            ctx.free_report,
            ctx.features,
            list_gpa,
            max_ranges,
            stats,
        ),
        _ => Return::err(AbiError::InvalidArgument),
    }
}

/// Registers (or, with `max_ranges` 0, unregisters) the guest's free list: `NOT_IMPLEMENTED`
/// without [`features::FREE_REPORT`], then [`FreeReport::register`]'s checks. Returns 0.
pub fn free_list(
    ram: &GuestRam,
    report: &mut FreeReport,
    vm_features: u64,
    list_gpa: u64,
    max_ranges: u64,
    stats: &mut ExitStats,
) -> Return {
    if vm_features & features::FREE_REPORT == 0 {
        return Return::err(AbiError::NotImplemented);
    }
    match report.register(ram, list_gpa, max_ranges) {
        Ok(()) => {
            stats.record_event(if max_ranges == 0 {
                "free_list_unregistered"
            } else {
                "free_list_registered"
            });
            Return::ok(0)
        }
        Err(e) => Return::err(e),
    }
}

/// Writes the known-zero bitmap of `count` frames from frame `first` to `bitmap_gpa`.
pub fn query(
    ram: &GuestRam,
    bitmap_gpa: u64,
    first: u64,
    count: u64,
    stats: &mut ExitStats,
) -> Return {
    if count > QUERY_MAX_FRAMES {
        return Return::err(AbiError::TooLarge);
    }
    let frames_ok = first
        .checked_mul(PAGE_SIZE)
        .and_then(|gpa| ram.checked_range(gpa, count * PAGE_SIZE))
        .is_some();
    let Some(dst) = ram.checked_range(bitmap_gpa, count.div_ceil(8)) else {
        return Return::err(AbiError::BadAddress);
    };
    if !frames_ok {
        return Return::err(AbiError::BadAddress);
    }
    let Ok(zero) = ram.known_zero(first, count) else {
        return Return::err(AbiError::BadAddress);
    };
    let mut bitmap = vec![0u8; count.div_ceil(8) as usize];
    for (i, _) in zero.iter().enumerate().filter(|(_, z)| **z) {
        bitmap[i / 8] |= 1 << (i % 8);
    }
    if ram.mem().write_slice(&bitmap, dst).is_err() {
        return Return::err(AbiError::BadAddress);
    }
    let known = zero.iter().filter(|&&z| z).count() as u64;
    stats.add_event("zero_known_frames", known);
    Return::ok(known)
}

/// The checks RELEASE and PREPARE make of a guest range: page-aligned (`INVALID_ARGUMENT`),
/// inside RAM (`BAD_ADDRESS`), not below `protected_end` (`DENIED`).
fn check_range(ram: &GuestRam, protected_end: u64, start: u64, len: u64) -> Result<(), AbiError> {
    if !start.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
        return Err(AbiError::InvalidArgument);
    }
    if ram.checked_range(start, len).is_none() {
        return Err(AbiError::BadAddress);
    }
    if start < protected_end {
        return Err(AbiError::Denied);
    }
    Ok(())
}

/// Discards `count` ranges listed at `ranges_gpa`. RAM below `protected_end` (boot structures,
/// stack, kernel image) and the list itself may not be released.
pub fn release(
    ram: &GuestRam,
    protected_end: u64,
    ranges_gpa: u64,
    count: u64,
    stats: &mut ExitStats,
) -> Return {
    if count > RELEASE_MAX_RANGES {
        return Return::err(AbiError::TooLarge);
    }
    let list_len = count * size_of::<ZeroRange>() as u64;
    let Some(ranges) = ram.read_array::<ZeroRange>(ranges_gpa, count) else {
        return Return::err(AbiError::BadAddress);
    };
    let overlaps = |a: u64, alen: u64, b: u64, blen: u64| a < b + blen && b < a + alen;
    for r in &ranges {
        if let Err(e) = check_range(ram, protected_end, r.start, r.len) {
            return Return::err(e);
        }
        if overlaps(r.start, r.len, ranges_gpa, list_len) {
            return Return::err(AbiError::Denied);
        }
    }
    let mut released = 0;
    for r in &ranges {
        if ram.discard(r.start, r.len).is_err() {
            return Return::err(AbiError::BadAddress);
        }
        released += r.len;
    }
    stats.add_event("released_bytes", released);
    Return::ok(released)
}

/// Queues `[gpa, gpa + len)` for the preparing thread; the checks of [`release`]. Returns the
/// bytes queued (0 if the queue is full).
pub fn prepare(
    ram: &GuestRam,
    protected_end: u64,
    gpa: u64,
    len: u64,
    stats: &mut ExitStats,
) -> Return {
    if let Err(e) = check_range(ram, protected_end, gpa, len) {
        return Return::err(e);
    }
    match ram.prepare(gpa, len) {
        Ok(queued) => {
            stats.add_event("prepare_queued_bytes", queued);
            if queued < len {
                stats.record_event("prepare_dropped");
            }
            Return::ok(queued)
        }
        Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => Return::err(AbiError::BadAddress),
        // No MADV_POPULATE_WRITE, or no thread: the host cannot do it.
        Err(_) => Return::err(AbiError::NotImplemented),
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestAddress;

    use super::*;
    use zerocopy::IntoBytes;

    const MEM: u64 = 32 << 20;
    const PROTECTED: u64 = 0x40_0000;

    fn put(ram: &GuestRam, gpa: u64, ranges: &[ZeroRange]) {
        ram.mem()
            .write_slice(ranges.as_bytes(), GuestAddress(gpa))
            .unwrap();
    }

    #[test]
    fn query_reports_untouched_frames_and_release_restores_them() {
        let ram = GuestRam::new(MEM).unwrap();
        let mut s = ExitStats::default();
        let frame = 0x800; // 8 MiB
        ram.mem()
            .write_obj(1u64, GuestAddress(frame * PAGE_SIZE))
            .unwrap();
        assert_eq!(
            query(&ram, 0x50_0000, frame + 512, 64, &mut s),
            Return::ok(64)
        );
        let r = query(&ram, 0x50_0000, frame, 8, &mut s);
        assert!(r.value < 8, "the written frame is not known zero");
        let bm: u8 = ram.mem().read_obj(GuestAddress(0x50_0000)).unwrap();
        assert_eq!(bm & 1, 0);
        put(
            &ram,
            0x50_1000,
            &[ZeroRange {
                start: frame * PAGE_SIZE,
                len: 2 << 20,
            }],
        );
        assert_eq!(
            release(&ram, PROTECTED, 0x50_1000, 1, &mut s),
            Return::ok(2 << 20)
        );
        assert_eq!(query(&ram, 0x50_0000, frame, 8, &mut s), Return::ok(8));
        assert_eq!(s.event("released_bytes"), 2 << 20);
    }

    #[test]
    fn bad_ranges_are_rejected_and_nothing_is_released() {
        let ram = GuestRam::new(MEM).unwrap();
        let mut s = ExitStats::default();
        ram.mem().write_obj(7u64, GuestAddress(0x80_0000)).unwrap();
        let good = ZeroRange {
            start: 0x80_0000,
            len: 4096,
        };
        for (bad, err) in [
            (
                ZeroRange {
                    start: MEM - 4096,
                    len: 8192,
                },
                AbiError::BadAddress,
            ),
            (
                ZeroRange {
                    start: u64::MAX - 4095,
                    len: 4096,
                },
                AbiError::BadAddress,
            ),
            (
                ZeroRange {
                    start: 0x80_0100,
                    len: 4096,
                },
                AbiError::InvalidArgument,
            ),
            (
                ZeroRange {
                    start: 0x20_0000,
                    len: 4096,
                },
                AbiError::Denied,
            ),
            (
                ZeroRange {
                    start: 0x50_1000,
                    len: 4096,
                },
                AbiError::Denied,
            ),
        ] {
            put(&ram, 0x50_1000, &[good, bad]);
            assert_eq!(
                release(&ram, PROTECTED, 0x50_1000, 2, &mut s),
                Return::err(err),
                "{bad:?}"
            );
            let v: u64 = ram.mem().read_obj(GuestAddress(0x80_0000)).unwrap();
            assert_eq!(v, 7, "the good range was not released either");
        }
        assert_eq!(
            release(&ram, PROTECTED, MEM, 1, &mut s),
            Return::err(AbiError::BadAddress)
        );
        assert_eq!(
            release(&ram, PROTECTED, 0, RELEASE_MAX_RANGES + 1, &mut s),
            Return::err(AbiError::TooLarge)
        );
        assert_eq!(
            query(&ram, MEM, 0, 8, &mut s),
            Return::err(AbiError::BadAddress)
        );
        assert_eq!(
            query(&ram, 0, MEM / PAGE_SIZE, 1, &mut s),
            Return::err(AbiError::BadAddress)
        );
        assert_eq!(
            query(&ram, 0, u64::MAX / 2, 1, &mut s),
            Return::err(AbiError::BadAddress)
        );
        assert_eq!(
            query(&ram, 0, 0, QUERY_MAX_FRAMES + 1, &mut s),
            Return::err(AbiError::TooLarge)
        );
    }

    #[test]
    fn prepare_backs_frames_without_changing_them() {
        let ram = GuestRam::new(MEM).unwrap();
        if !ram.can_prepare() {
            panic!("this kernel lacks MADV_POPULATE_WRITE (Linux 5.14+), which pvkit's hosts have");
        }
        let mut s = ExitStats::default();
        let gpa = 0x80_0000;
        ram.mem()
            .write_obj(7u64, GuestAddress(gpa + 0x1000))
            .unwrap();
        assert_eq!(
            prepare(&ram, PROTECTED, gpa, 4 << 20, &mut s),
            Return::ok(4 << 20)
        );
        crate::test_util::wait_until("the preparing thread", || {
            ram.prepare_stats().populated_bytes >= 4 << 20
        });
        assert!(
            ram.known_zero(gpa / PAGE_SIZE, 1024)
                .unwrap()
                .iter()
                .all(|&z| !z),
            "every prepared frame is backed"
        );
        let v: u64 = ram.mem().read_obj(GuestAddress(gpa + 0x1000)).unwrap();
        assert_eq!(v, 7, "a written frame keeps its data");
        let z: u64 = ram.mem().read_obj(GuestAddress(gpa + 0x3f_f000)).unwrap();
        assert_eq!(z, 0, "a prepared frame reads zero");
        assert_eq!(s.event("prepare_queued_bytes"), 4 << 20);
    }

    #[test]
    fn release_cancels_what_is_still_queued() {
        let ram = GuestRam::new(MEM).unwrap();
        let mut s = ExitStats::default();
        // Queue 16 MiB and release it at once: whatever the thread had not reached stays
        // unbacked, and nothing is backed again afterwards.
        let gpa = 0x100_0000;
        assert_eq!(
            prepare(&ram, PROTECTED, gpa, 16 << 20, &mut s),
            Return::ok(16 << 20)
        );
        ram.discard(gpa, 16 << 20).unwrap();
        assert_eq!(ram.prepare_queued_bytes(), 0);
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(
            ram.known_zero(gpa / PAGE_SIZE, 4096)
                .unwrap()
                .iter()
                .all(|&z| z),
            "released memory stays released"
        );
    }

    #[test]
    fn free_list_registers_only_with_the_feature() {
        let ram = GuestRam::new(MEM).unwrap();
        let mut s = ExitStats::default();
        let mut report = FreeReport::new(PROTECTED);
        let all = features::V1_8;
        assert_eq!(
            free_list(
                &ram,
                &mut report,
                all & !features::FREE_REPORT,
                0x50_0000,
                4,
                &mut s
            ),
            Return::err(AbiError::NotImplemented)
        );
        assert_eq!(report.registration(), None);
        assert_eq!(
            free_list(&ram, &mut report, all, 0x50_0008, 4, &mut s),
            Return::err(AbiError::InvalidArgument)
        );
        assert_eq!(
            free_list(&ram, &mut report, all, 0x50_0000, 4, &mut s),
            Return::ok(0)
        );
        assert_eq!(report.registration(), Some((0x50_0000, 4)));
        assert_eq!(s.event("free_list_registered"), 1);
        assert_eq!(
            free_list(&ram, &mut report, all, 0, 0, &mut s),
            Return::ok(0)
        );
        assert_eq!(report.registration(), None);
    }

    #[test]
    fn bad_prepare_ranges_are_rejected() {
        let ram = GuestRam::new(MEM).unwrap();
        let mut s = ExitStats::default();
        for (gpa, len, err) in [
            (0x80_0100, 4096, AbiError::InvalidArgument),
            (0x80_0000, 100, AbiError::InvalidArgument),
            (MEM - 4096, 8192, AbiError::BadAddress),
            (u64::MAX - 4095, 4096, AbiError::BadAddress),
            (0x20_0000, 4096, AbiError::Denied),
        ] {
            assert_eq!(
                prepare(&ram, PROTECTED, gpa, len, &mut s),
                Return::err(err),
                "{gpa:#x}+{len:#x}"
            );
        }
        assert_eq!(
            prepare(&ram, PROTECTED, 0x80_0000, 0, &mut s),
            Return::ok(0)
        );
        assert_eq!(ram.prepare_stats().populated_bytes, 0);
    }
}
