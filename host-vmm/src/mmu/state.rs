//! [`Persist`] for the [`PageTablePool`]: the frame types and reference counts, the pending
//! resync, and the pool's contents.
//!
//! The pool is its own mapping, separate from guest RAM, so a RAM snapshot does not contain it:
//! its contents are part of this state. Only typed frames are written out, and of those only
//! their non-zero entries — an untyped pool frame is always zero (the host scrubs every frame it
//! releases), so that is the whole pool, in a few KiB for a typical guest.
//!
//! A state may come from a file or the network. [`PageTablePool::restore`] accepts only a pool
//! the guest could have reached through the validator: every entry obeys the entry rules of
//! `hypercall_abi::mmu` (no writable mapping of a pool frame, leaves inside this VM's RAM),
//! every table entry points at a frame of the next lower level, and every reference count is
//! exactly the number of parent entries (plus at least one pin for an L4). The one exception
//! is the VMM's own boot tables (the first `PT_POOL_BOOT_FRAMES` frames), installed without
//! validation: an entry of a boot frame still at its boot level is also accepted if it is the
//! entry the VMM installed there. Anything else is a [`StateError`], and the pool is left as it
//! was.

use hypercall_abi::layout::{PAGE_SIZE, PT_POOL_BOOT_FRAMES};
use hypercall_abi::mmu::{
    ENTRIES_PER_TABLE, Level, PIN_MAX, POOL_FRAMES, PTE_ADDR_MASK, PTE_HUGE, PTE_PRESENT,
    pool_frame_gpa, pool_frame_index,
};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use super::{FrameInfo, PageTablePool, check_entry};
use crate::state::{Persist, STATE_VERSION, StateError, check_version};

const WHAT: &str = "page-table pool";

/// One typed pool frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrameState {
    /// Frame index in the pool (`0..POOL_FRAMES`).
    pub index: u32,
    /// Paging level of the table (1..=4).
    pub level: Level,
    /// Parent entries pointing at it, plus pins.
    pub refs: u32,
    /// The non-zero entries, as `(slot, value)` with `slot < 512`, in slot order.
    pub entries: Vec<(u16, u64)>,
}

/// [`PageTablePool`] state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageTablePoolState {
    /// [`STATE_VERSION`].
    pub version: u32,
    /// The guest RAM size the pool validated leaves against (must match the restoring VM).
    pub ram_size: u64,
    /// A present entry changed since the last resync of KVM's shadow.
    pub stale: bool,
    /// The guest postponed that resync (`UPDATE_DEFER_SYNC`).
    pub deferred: bool,
    /// The typed frames, in index order. Frames not listed are untyped and zero.
    pub frames: Vec<FrameState>,
}

impl Persist for PageTablePool {
    type State = PageTablePoolState;

    fn save(&self) -> PageTablePoolState {
        let frames = self
            .frames
            .iter()
            .enumerate()
            .filter(|(_, info)| info.level != 0)
            .map(|(i, info)| FrameState {
                index: i as u32,
                level: info.level,
                refs: info.refs,
                entries: (0..ENTRIES_PER_TABLE)
                    .filter_map(|n| {
                        let e = self.read_entry(pool_frame_gpa(i) + n as u64 * 8)?;
                        (e != 0).then_some((n as u16, e))
                    })
                    .collect(),
            })
            .collect();
        PageTablePoolState {
            version: STATE_VERSION,
            ram_size: self.ram_size,
            stale: self.stale,
            deferred: self.deferred,
            frames,
        }
    }

    fn restore(&mut self, state: &PageTablePoolState) -> Result<(), StateError> {
        check_version(state.version)?;
        if state.ram_size != self.ram_size {
            return Err(StateError::mismatch(
                WHAT,
                format!(
                    "saved for {} bytes of RAM, this VM has {}",
                    state.ram_size, self.ram_size
                ),
            ));
        }
        let frames = validate(state, self.ram_size, vmm_boot_tables())?;
        // Everything checked: now replace the pool. Untyped frames are zero (a frame is zeroed
        // when it stops being a table), so only the tables there now need clearing: a fresh
        // pool's untouched frames are never faulted in.
        let zero = vec![0u8; PAGE_SIZE as usize];
        for i in (0..POOL_FRAMES).filter(|&i| self.frames[i].level != 0) {
            let _ = self.mem.write_slice(&zero, GuestAddress(pool_frame_gpa(i)));
        }
        for f in &state.frames {
            let base = pool_frame_gpa(f.index as usize);
            for &(slot, value) in &f.entries {
                self.write_entry(base + u64::from(slot) * 8, value);
            }
        }
        self.frames = frames;
        self.stale = state.stale;
        self.deferred = state.deferred;
        Ok(())
    }
}

/// The level and entries of each of the VMM's boot tables, as `crate::boot` installs them
/// (computed once: they never change).
pub(super) fn vmm_boot_tables() -> &'static [(Level, Vec<u64>)] {
    static TABLES: std::sync::LazyLock<Vec<(Level, Vec<u64>)>> = std::sync::LazyLock::new(|| {
        let Ok(mut scratch) = PageTablePool::new(0) else {
            // Without the scratch mapping no boot entry is whitelisted: a state with boot
            // tables is then refused, which is safe.
            return Vec::new();
        };
        crate::boot::install_identity_map(&mut scratch);
        (0..PT_POOL_BOOT_FRAMES as usize)
            .map(|i| {
                let entries = (0..ENTRIES_PER_TABLE)
                    .map(|n| {
                        scratch
                            .read_entry(pool_frame_gpa(i) + n as u64 * 8)
                            .unwrap_or(0)
                    })
                    .collect();
                (scratch.frames[i].level, entries)
            })
            .collect()
    });
    &TABLES
}

/// Checks `state` against the pool invariants (`boot`: [`vmm_boot_tables`]); returns the
/// frame table it describes.
pub(super) fn validate(
    state: &PageTablePoolState,
    ram_size: u64,
    boot: &[(Level, Vec<u64>)],
) -> Result<Vec<FrameInfo>, StateError> {
    let bad = |why: String| StateError::invalid(WHAT, why);
    let mut frames = vec![FrameInfo::default(); POOL_FRAMES];
    for f in &state.frames {
        let i = f.index as usize;
        if i >= POOL_FRAMES {
            return Err(bad(format!("frame index {i} outside the pool")));
        }
        if frames[i].level != 0 {
            return Err(bad(format!("frame {i} listed twice")));
        }
        if !(1..=4).contains(&f.level) {
            return Err(bad(format!("frame {i} has level {}", f.level)));
        }
        frames[i] = FrameInfo {
            level: f.level,
            refs: f.refs,
        };
    }
    // Every entry obeys the rules; count the parents of every frame.
    let mut parents = vec![0u32; POOL_FRAMES];
    for f in &state.frames {
        let i = f.index as usize;
        let mut last: Option<u16> = None;
        for &(slot, value) in &f.entries {
            if usize::from(slot) >= ENTRIES_PER_TABLE || last.is_some_and(|l| slot <= l) {
                return Err(bad(format!(
                    "frame {i}: entry slot {slot} out of range or out of order"
                )));
            }
            last = Some(slot);
            let vmm_entry = boot
                .get(i)
                .filter(|(level, _)| *level == f.level)
                .and_then(|(_, entries)| entries.get(usize::from(slot)));
            if vmm_entry == Some(&value) {
                let table = f.level >= 2 && value & PTE_PRESENT != 0 && value & PTE_HUGE == 0;
                if table {
                    match pool_frame_index(value & PTE_ADDR_MASK) {
                        Some(c) if frames[c].level == f.level - 1 => parents[c] += 1,
                        _ => {
                            return Err(bad(format!(
                                "frame {i} slot {slot}: boot entry's table is not typed"
                            )));
                        }
                    }
                }
                continue;
            }
            // A table entry must point at an already typed frame: an untyped one is zero and
            // would have been typed by the entry.
            match check_entry(&frames, ram_size, f.level, value, |_| false) {
                Ok(Some(child)) => parents[child] += 1,
                Ok(None) => {}
                Err(e) => {
                    return Err(bad(format!(
                        "frame {i} slot {slot}: entry {value:#x} refused ({e})"
                    )));
                }
            }
        }
    }
    for (i, info) in frames.iter().enumerate().filter(|(_, f)| f.level != 0) {
        let consistent = if info.level == 4 {
            // Roots have no parents; their count is their pins, 1..=PIN_MAX.
            parents[i] == 0 && (1..=PIN_MAX).contains(&info.refs)
        } else {
            info.refs == parents[i]
        };
        if !consistent {
            return Err(bad(format!(
                "frame {i} (level {}) has {} references, {} parent entries",
                info.level, info.refs, parents[i]
            )));
        }
    }
    Ok(frames)
}

#[cfg(test)]
mod tests {
    use hypercall_abi::layout::{PML4_GPA, PT_POOL_GPA};
    use hypercall_abi::mmu::{PTE_PRESENT, PTE_USER, PTE_WRITABLE, table_index};

    use super::*;
    use crate::state::assert_round_trip;

    const RAM: u64 = 64 << 20;

    fn f(i: u64) -> u64 {
        PT_POOL_GPA + i * PAGE_SIZE
    }

    /// The boot tables, a second root at frame 10 mapping one page, and a deferred resync.
    fn populated() -> PageTablePool {
        let mut p = PageTablePool::new(RAM).unwrap();
        crate::boot::install_identity_map(&mut p);
        p.pin(f(10)).unwrap();
        let va = 0x80_0000_0000u64;
        let flags = PTE_PRESENT | PTE_WRITABLE | PTE_USER;
        p.apply(f(10) + table_index(va, 4) as u64 * 8, f(11) | flags)
            .unwrap();
        p.apply(f(11) + table_index(va, 3) as u64 * 8, f(12) | flags)
            .unwrap();
        p.apply(f(12) + table_index(va, 2) as u64 * 8, f(13) | flags)
            .unwrap();
        p.apply(f(13) + table_index(va, 1) as u64 * 8, 0x30_0000 | flags)
            .unwrap();
        p.apply(f(13) + 8, f(13) | PTE_PRESENT).unwrap(); // read-only view of a table
        p.defer_resync(true);
        p
    }

    #[test]
    fn pool_state_round_trips() {
        let p = populated();
        let mut fresh = PageTablePool::new(RAM).unwrap();
        assert_round_trip(&p, &mut fresh);
        assert_eq!(fresh.typed_frames(), p.typed_frames());
        assert_eq!(fresh.frame(f(13)), Some(FrameInfo { level: 1, refs: 1 }));
        assert_eq!(fresh.read_entry(f(13) + 8), p.read_entry(f(13) + 8));
        assert!(fresh.deferred);
        // The restored pool behaves as the original: the VMM's pin of the boot root holds, and
        // unpinning the second root releases (and zeroes) its tree.
        assert_eq!(fresh.unpin(PML4_GPA), Err(hypercall_abi::Error::Denied));
        fresh.unpin(f(10)).unwrap();
        assert_eq!(fresh.frame(f(13)), Some(FrameInfo::default()));
        assert_eq!(fresh.read_entry(f(13) + 8), Some(0));
    }

    #[test]
    fn restore_replaces_what_was_there() {
        let p = PageTablePool::new(RAM).unwrap();
        let mut used = populated();
        assert_round_trip(&p, &mut used);
        assert_eq!(used.typed_frames(), 0);
        assert_eq!(used.read_entry(PML4_GPA), Some(0));
    }

    type Corruption = Box<dyn Fn(&mut PageTablePoolState)>;

    /// Every corruption is refused, and the pool it was restored into is unchanged.
    #[test]
    fn corrupted_states_are_refused() {
        let good = populated().save();
        let frame = |s: &mut PageTablePoolState, i: u32| -> usize {
            s.frames.iter().position(|f| f.index == i).unwrap()
        };
        let corruptions: Vec<(&str, Corruption)> = vec![
            ("version", Box::new(|s| s.version += 1)),
            ("ram size", Box::new(|s| s.ram_size *= 2)),
            (
                "index",
                Box::new(|s| s.frames[0].index = POOL_FRAMES as u32),
            ),
            ("index max", Box::new(|s| s.frames[0].index = u32::MAX)),
            (
                "duplicate",
                Box::new(|s| {
                    let d = s.frames[0].clone();
                    s.frames.push(d);
                }),
            ),
            ("level 0", Box::new(move |s| s.frames[0].level = 0)),
            ("level 5", Box::new(move |s| s.frames[0].level = 5)),
            (
                "slot",
                Box::new(move |s| {
                    let i = frame(s, 13);
                    s.frames[i].entries[0].0 = 512;
                }),
            ),
            (
                "slot order",
                Box::new(move |s| {
                    let i = frame(s, 13);
                    s.frames[i].entries.reverse();
                }),
            ),
            (
                "writable pool mapping",
                Box::new(move |s| {
                    let i = frame(s, 13);
                    s.frames[i].entries[0].1 = f(13) | PTE_PRESENT | PTE_WRITABLE;
                }),
            ),
            (
                "leaf outside RAM",
                Box::new(move |s| {
                    let i = frame(s, 13);
                    s.frames[i].entries[0].1 = RAM | PTE_PRESENT;
                }),
            ),
            (
                "reserved bits",
                Box::new(move |s| {
                    let i = frame(s, 13);
                    s.frames[i].entries[0].1 |= 1 << 63;
                }),
            ),
            (
                "table entry to an untyped frame",
                Box::new(move |s| {
                    let i = frame(s, 12);
                    s.frames[i].entries[0].1 = f(40) | PTE_PRESENT;
                }),
            ),
            (
                "table entry to the wrong level",
                Box::new(move |s| {
                    let i = frame(s, 12);
                    s.frames[i].entries[0].1 = f(11) | PTE_PRESENT;
                }),
            ),
            (
                "boot entry changed",
                Box::new(move |s| {
                    let i = frame(s, 2);
                    s.frames[i].entries[100].1 |= 1 << 12;
                }),
            ),
            (
                "boot table retyped",
                Box::new(move |s| {
                    let i = frame(s, 2);
                    s.frames[i].level = 1;
                }),
            ),
            (
                "refcount too high",
                Box::new(move |s| {
                    let i = frame(s, 13);
                    s.frames[i].refs = 2;
                }),
            ),
            (
                "refcount zero",
                Box::new(move |s| {
                    let i = frame(s, 11);
                    s.frames[i].refs = 0;
                }),
            ),
            (
                "too many pins",
                Box::new(move |s| {
                    let i = frame(s, 10);
                    s.frames[i].refs = PIN_MAX + 1;
                }),
            ),
            (
                "unpinned root",
                Box::new(move |s| {
                    let i = frame(s, 10);
                    s.frames[i].refs = 0;
                }),
            ),
        ];
        for (name, corrupt) in corruptions {
            let mut bad = good.clone();
            corrupt(&mut bad);
            let mut target = populated();
            let before = target.save();
            let err = target.restore(&bad);
            assert!(err.is_err(), "{name}: accepted");
            assert_eq!(
                target.save(),
                before,
                "{name}: refused restore changed the pool"
            );
        }
    }
}
