//! Free-frame reporting (ABI v1.8, `zero_hints(FREE_LIST)`, feature `FREE_REPORT`): the guest
//! registers an array of [`ZeroRange`]s in its own memory; every entry with `len != 0` names
//! frames whose contents the guest does not care about. A snapshot or a migration round may
//! treat them as zero instead of saving them.
//!
//! [`FreeReport`] owns the registration (one per VM, in the [`crate::machine::Machine`]); the
//! `zero_hints` handler ([`crate::hypercall::zero`]) changes it through
//! [`FreeReport::register`]. The list itself stays in guest memory and is read only when the
//! host asks, [`FreeReport::ranges`] — with the vCPU stopped at an exit boundary, or between
//! migration rounds: the guest takes a frame out of the list before it hands it out again, so
//! a list read while the vCPU is stopped names only frames that are free at that moment.
//!
//! Nothing in the list is trusted: entries that are not page-aligned, lie (partly) outside
//! RAM, start below the end of the kernel image (`protected_end`, the bound `RELEASE` uses), or
//! overlap the list itself are skipped and counted ([`FreeRanges::invalid_entries`]); all
//! arithmetic is checked and the list is at most
//! [`RELEASE_MAX_RANGES`] entries.

use hypercall_abi::Error as AbiError;
use hypercall_abi::layout::PAGE_SIZE;
use hypercall_abi::zero::{FREE_LIST_ALIGN, RELEASE_MAX_RANGES, ZeroRange};

use crate::memory::GuestRam;
use crate::state::{Persist, StateError};

/// The guest's free-list registration (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FreeReport {
    /// Guest-physical address of the array (16-byte aligned); 0 when unregistered.
    list_gpa: u64,
    /// Entries in the array; 0 = unregistered.
    max_ranges: u64,
    /// RAM below this (boot structures, stack, kernel image) is never reported free.
    protected_end: u64,
}

/// The validated free ranges of the guest's list at one moment ([`FreeReport::ranges`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FreeRanges {
    /// `(gpa, len)` pairs, page-aligned, inside RAM, above the kernel image; sorted by address,
    /// overlapping and adjacent ranges merged.
    pub ranges: Vec<(u64, u64)>,
    /// Total bytes of `ranges`.
    pub bytes: u64,
    /// Entries with `len != 0` that were skipped as invalid (or, if the list itself cannot be
    /// read, all `max_ranges` entries).
    pub invalid_entries: u32,
}

impl FreeRanges {
    /// True if no frame is reported free.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// True if the page-aligned frame at `gpa` lies in one of the ranges.
    pub fn contains(&self, gpa: u64) -> bool {
        let i = self.ranges.partition_point(|&(start, _)| start <= gpa);
        i > 0 && {
            let (start, len) = self.ranges[i - 1];
            gpa - start < len
        }
    }
}

/// [`FreeReport`]'s state: the registration. The default (all zero) is "unregistered", which is
/// what a state saved before v1.8 loads as.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FreeReportState {
    /// Guest-physical address of the array.
    pub list_gpa: u64,
    /// Entries in the array; 0 = unregistered.
    pub max_ranges: u64,
}

impl FreeReport {
    /// No list registered; entries below `protected_end` will never be reported free.
    pub fn new(protected_end: u64) -> FreeReport {
        FreeReport {
            list_gpa: 0,
            max_ranges: 0,
            protected_end,
        }
    }

    /// The registration as `(list_gpa, max_ranges)`, if any.
    pub fn registration(&self) -> Option<(u64, u64)> {
        (self.max_ranges != 0).then_some((self.list_gpa, self.max_ranges))
    }

    /// `zero_hints(FREE_LIST, list_gpa, max_ranges)`: registers the list (replacing any
    /// registration), or unregisters when `max_ranges` is 0 (`list_gpa` is then ignored).
    /// Errors, in this order: `TOO_LARGE` (more than `RELEASE_MAX_RANGES` entries),
    /// `INVALID_ARGUMENT` (not 16-byte aligned), `BAD_ADDRESS` (not inside RAM). On error the
    /// registration is unchanged.
    pub fn register(
        &mut self,
        ram: &GuestRam,
        list_gpa: u64,
        max_ranges: u64,
    ) -> Result<(), AbiError> {
        check_registration(list_gpa, max_ranges)?;
        if max_ranges == 0 {
            *self = FreeReport::new(self.protected_end);
            return Ok(());
        }
        // `max_ranges` ≤ 256, so the length cannot overflow.
        let len = max_ranges * size_of::<ZeroRange>() as u64;
        if ram.checked_range(list_gpa, len).is_none() {
            return Err(AbiError::BadAddress);
        }
        self.list_gpa = list_gpa;
        self.max_ranges = max_ranges;
        Ok(())
    }

    /// Reads the guest's list now and returns its valid ranges, sorted and merged (see the
    /// module docs for what is skipped). Unregistered: empty. Call it only while the vCPU is
    /// stopped (a snapshot at an exit boundary, or between migration rounds).
    pub fn ranges(&self, ram: &GuestRam) -> FreeRanges {
        let mut out = FreeRanges::default();
        let Some((list_gpa, max_ranges)) = self.registration() else {
            return out;
        };
        let count = max_ranges.min(RELEASE_MAX_RANGES);
        let Some(entries) = ram.read_array::<ZeroRange>(list_gpa, count) else {
            // The registration was checked, but a restored state may name anything.
            out.invalid_entries = count as u32;
            return out;
        };
        let list_len = count * size_of::<ZeroRange>() as u64;
        let mut ranges: Vec<(u64, u64)> = Vec::with_capacity(entries.len());
        for e in entries.iter().filter(|e| e.len != 0) {
            if self.valid(ram, e, list_gpa, list_len) {
                ranges.push((e.start, e.len));
            } else {
                out.invalid_entries += 1;
            }
        }
        ranges.sort_unstable();
        for (start, len) in ranges {
            // Valid entries end inside RAM, so `start + len` does not overflow.
            match out.ranges.last_mut() {
                Some((s, l)) if start <= *s + *l => {
                    let end = (start + len).max(*s + *l);
                    *l = end - *s;
                }
                _ => out.ranges.push((start, len)),
            }
        }
        out.bytes = out.ranges.iter().map(|&(_, len)| len).sum();
        out
    }

    /// An entry may be reported free: page-aligned, inside RAM, not below `protected_end`, not
    /// overlapping the list.
    fn valid(&self, ram: &GuestRam, e: &ZeroRange, list_gpa: u64, list_len: u64) -> bool {
        if !e.start.is_multiple_of(PAGE_SIZE) || !e.len.is_multiple_of(PAGE_SIZE) {
            return false;
        }
        let Some(end) = e.start.checked_add(e.len) else {
            return false;
        };
        if ram.checked_range(e.start, e.len).is_none() || e.start < self.protected_end {
            return false;
        }
        // Inside RAM, so neither end overflows.
        let overlaps_list = e.start < list_gpa + list_len && list_gpa < end;
        !overlaps_list
    }
}

/// The checks of a registration that need no RAM: count, then alignment.
fn check_registration(list_gpa: u64, max_ranges: u64) -> Result<(), AbiError> {
    if max_ranges > RELEASE_MAX_RANGES {
        return Err(AbiError::TooLarge);
    }
    if max_ranges != 0 && !list_gpa.is_multiple_of(FREE_LIST_ALIGN) {
        return Err(AbiError::InvalidArgument);
    }
    Ok(())
}

impl Persist for FreeReport {
    type State = FreeReportState;

    fn save(&self) -> FreeReportState {
        FreeReportState {
            list_gpa: self.list_gpa,
            max_ranges: self.max_ranges,
        }
    }

    /// Checks what can be checked without RAM (count, alignment, no overflow); a list outside
    /// this VM's RAM is caught by [`FreeReport::ranges`], which then reports nothing.
    fn restore(&mut self, state: &FreeReportState) -> Result<(), StateError> {
        let what = "free report";
        check_registration(state.list_gpa, state.max_ranges).map_err(|e| {
            StateError::invalid(
                what,
                format!(
                    "list {:#x} with {} entries: {}",
                    state.list_gpa,
                    state.max_ranges,
                    e.name()
                ),
            )
        })?;
        if state.max_ranges != 0
            && state
                .list_gpa
                .checked_add(state.max_ranges * size_of::<ZeroRange>() as u64)
                .is_none()
        {
            return Err(StateError::invalid(what, "the list overflows"));
        }
        if state.max_ranges == 0 {
            *self = FreeReport::new(self.protected_end);
        } else {
            self.list_gpa = state.list_gpa;
            self.max_ranges = state.max_ranges;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};
    use zerocopy::IntoBytes;

    use super::*;
    use crate::state::assert_round_trip;

    const MEM: u64 = 32 << 20;
    const PROTECTED: u64 = 0x40_0000;
    const LIST: u64 = 0x50_0000;
    const F: u64 = PAGE_SIZE;

    fn r(start: u64, len: u64) -> ZeroRange {
        ZeroRange { start, len }
    }

    fn put(ram: &GuestRam, gpa: u64, ranges: &[ZeroRange]) {
        ram.mem()
            .write_slice(ranges.as_bytes(), GuestAddress(gpa))
            .unwrap();
    }

    fn registered(ram: &GuestRam, max: u64) -> FreeReport {
        let mut f = FreeReport::new(PROTECTED);
        f.register(ram, LIST, max).unwrap();
        f
    }

    #[test]
    fn unregistered_reports_nothing() {
        let ram = GuestRam::new(MEM).unwrap();
        put(&ram, LIST, &[r(0x80_0000, F)]);
        let f = FreeReport::new(PROTECTED);
        assert_eq!(f.registration(), None);
        assert_eq!(f.ranges(&ram), FreeRanges::default());
        // Registering then unregistering (max 0, any address) forgets the list.
        let mut f = registered(&ram, 4);
        assert_eq!(f.ranges(&ram).bytes, F);
        f.register(&ram, u64::MAX, 0).unwrap();
        assert_eq!(f.registration(), None);
        assert!(f.ranges(&ram).is_empty());
    }

    #[test]
    fn registration_is_checked_and_errors_change_nothing() {
        let ram = GuestRam::new(MEM).unwrap();
        let mut f = registered(&ram, 2);
        for (gpa, max, err) in [
            (LIST, RELEASE_MAX_RANGES + 1, AbiError::TooLarge),
            (LIST, u64::MAX, AbiError::TooLarge),
            (LIST + 8, 1, AbiError::InvalidArgument),
            (LIST + 1, 1, AbiError::InvalidArgument),
            (MEM - 16, 2, AbiError::BadAddress),
            (MEM, 1, AbiError::BadAddress),
            (u64::MAX - 15, 1, AbiError::BadAddress),
        ] {
            assert_eq!(f.register(&ram, gpa, max), Err(err), "{gpa:#x} {max}");
            assert_eq!(f.registration(), Some((LIST, 2)));
        }
        // The list may be anywhere in RAM, the kernel image included (a static).
        f.register(&ram, 0x20_0010, RELEASE_MAX_RANGES).unwrap();
        assert_eq!(f.registration(), Some((0x20_0010, RELEASE_MAX_RANGES)));
        f.register(&ram, MEM - 16, 1).unwrap();
    }

    #[test]
    fn len_zero_entries_are_unused_and_ranges_are_sorted_and_merged() {
        let ram = GuestRam::new(MEM).unwrap();
        put(
            &ram,
            LIST,
            &[
                r(0x90_0000, 2 * F),
                r(0, 0),
                r(0x80_0000, F),
                r(0x12_3456, 0),     // unused: not checked
                r(0x80_1000, F),     // adjacent: merged
                r(0x90_1000, 4 * F), // overlapping: merged
                r(0xa0_0000, F),
            ],
        );
        let f = registered(&ram, 8);
        let got = f.ranges(&ram);
        assert_eq!(
            got.ranges,
            [(0x80_0000, 2 * F), (0x90_0000, 5 * F), (0xa0_0000, F)]
        );
        assert_eq!(got.bytes, 8 * F);
        assert_eq!(got.invalid_entries, 0);
        assert!(got.contains(0x90_4000) && !got.contains(0x90_5000) && !got.contains(0x7f_f000));
    }

    #[test]
    fn invalid_entries_are_skipped_and_counted() {
        let ram = GuestRam::new(MEM).unwrap();
        let good = r(0x80_0000, F);
        let bad = [
            r(0x80_0100, F),          // misaligned start
            r(0x80_0000, 100),        // misaligned length
            r(MEM - F, 2 * F),        // past the end of RAM
            r(MEM, F),                // outside RAM
            r(u64::MAX - (F - 1), F), // overflows
            r(F, u64::MAX - (F - 1)), // overflows
            r(0x20_0000, F),          // kernel image
            r(0, F),                  // boot structures
            r(LIST, F),               // the list itself
            r(LIST - F, 2 * F),       // overlaps the list
        ];
        let mut entries = vec![good];
        entries.extend(bad);
        put(&ram, LIST, &entries);
        let f = registered(&ram, entries.len() as u64);
        let got = f.ranges(&ram);
        assert_eq!(got.ranges, [(0x80_0000, F)]);
        assert_eq!(got.bytes, F);
        assert_eq!(got.invalid_entries, bad.len() as u32);
    }

    #[test]
    fn only_max_ranges_entries_are_read() {
        let ram = GuestRam::new(MEM).unwrap();
        put(&ram, LIST, &[r(0x80_0000, F), r(0x90_0000, F)]);
        assert_eq!(registered(&ram, 1).ranges(&ram).ranges, [(0x80_0000, F)]);
    }

    #[test]
    fn state_round_trips_and_hostile_states_are_refused() {
        let ram = GuestRam::new(MEM).unwrap();
        let f = registered(&ram, 3);
        let mut fresh = FreeReport::new(PROTECTED);
        assert_round_trip(&f, &mut fresh);
        assert_eq!(fresh.registration(), Some((LIST, 3)));
        for bad in [
            FreeReportState {
                list_gpa: LIST,
                max_ranges: RELEASE_MAX_RANGES + 1,
            },
            FreeReportState {
                list_gpa: LIST + 4,
                max_ranges: 1,
            },
            FreeReportState {
                list_gpa: u64::MAX - 15,
                max_ranges: 2,
            },
        ] {
            assert!(fresh.restore(&bad).is_err(), "{bad:?}");
            assert_eq!(fresh.registration(), Some((LIST, 3)), "unchanged");
        }
        // A list outside this VM's RAM loads, but reports nothing.
        fresh
            .restore(&FreeReportState {
                list_gpa: 1 << 40,
                max_ranges: 2,
            })
            .unwrap();
        let got = fresh.ranges(&ram);
        assert!(got.is_empty());
        assert_eq!(got.invalid_entries, 2);
        fresh.restore(&FreeReportState::default()).unwrap();
        assert_eq!(fresh.registration(), None);
    }
}
