//! The TSC as a clock: nanoseconds from `rdtsc` and the frequency the pvkit host reports, with no
//! exit per reading.
//!
//! A pvkit v1.2 host reports the guest's TSC frequency in kHz in CPUID leaf
//! [`CPUID_LEAF_TIMING`] `eax` and sets [`features::TSC_KHZ`]. Other hypervisors use the same
//! leaf (the VMware/KVM "timing" leaf: QEMU with `invtsc`, and `host-vmm --mode trapped`, which
//! hides pvkit behind a plain KVM signature). [`Tsc::from_cpuid`] trusts the leaf under the pvkit
//! signature only with that bit set, and under any other hypervisor signature when the highest
//! hypervisor leaf reaches it. Reading CPUID is not a hypercall, so this works in every mode
//! (and at CPL 3: `rdtsc` is not privileged).
//!
//! # Arithmetic
//! No floating point (`x86_64-unknown-none` is soft-float) and no 128-bit division: `u128 / u64`
//! is a `__udivti3` library call of ~100 instructions, and every CPL 0 instruction costs ~250 ns
//! on pvkit's KVM. [`Tsc::ticks_to_ns`] instead splits `ticks` by the frequency: with
//! `ticks = q * khz + r`, `ticks * 10⁶ / khz = q * 10⁶ + r * 10⁶ / khz` — two `u64` divisions
//! (one `div` instruction each), exact (it equals the `u128` floor, which the unit tests check),
//! and no intermediate overflows (`r * 10⁶ < 2³² * 10⁶`). [`Tsc::ns_to_ticks`] does the same the
//! other way.
//!
//! ```no_run
//! use guest_pv::tsc::Tsc;
//!
//! if let Some(tsc) = Tsc::from_cpuid() {
//!     let t0 = tsc.now_ns();
//!     // ... work ...
//!     let elapsed_ns = tsc.now_ns() - t0;
//!     # let _ = elapsed_ns;
//! }
//! ```

use core::arch::x86_64::CpuidResult;

use hypercall_abi::{CPUID_LEAF_SIGNATURE, CPUID_LEAF_TIMING, CPUID_LEAF_VERSION, features};

use crate::detect::{HYPERVISOR_PRESENT, cpuid, decode};

/// Nanoseconds per millisecond: the TSC frequency is in kHz (ticks per millisecond).
const NS_PER_MS: u64 = 1_000_000;

/// A TSC of known frequency, read as a clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tsc {
    khz: u64,
}

impl Tsc {
    /// The TSC the hypervisor describes in CPUID leaf [`CPUID_LEAF_TIMING`]; `None` on bare
    /// metal, with a highest hypervisor leaf below the timing leaf, under pvkit without
    /// [`features::TSC_KHZ`], or with a frequency of 0.
    pub fn from_cpuid() -> Option<Tsc> {
        if cpuid(1).ecx & HYPERVISOR_PRESENT == 0 {
            return None;
        }
        decode_timing(
            cpuid(CPUID_LEAF_SIGNATURE),
            cpuid(CPUID_LEAF_VERSION),
            || cpuid(CPUID_LEAF_TIMING),
        )
    }

    /// The TSC measured against another clock: reads `reference_ns` (e.g.
    /// [`Pvkit::clock_ns`](crate::Pvkit::clock_ns)) and the TSC, waits until the reference has
    /// advanced by at least `window_ns`, and divides. For a host that does not report the TSC
    /// rate (no [`features::TSC_KHZ`]); `None` if the reference fails, stands still for
    /// `2^32` readings, or the result is 0 or above `u32::MAX` kHz.
    pub fn calibrate<E>(
        mut reference_ns: impl FnMut() -> Result<u64, E>,
        window_ns: u64,
    ) -> Option<Tsc> {
        let ref0 = reference_ns().ok()?;
        let tsc0 = rdtsc();
        let mut spins = 0u64;
        let (ref1, tsc1) = loop {
            let now = reference_ns().ok()?;
            let tsc = rdtsc();
            if now.saturating_sub(ref0) >= window_ns.max(1) {
                break (now, tsc);
            }
            spins += 1;
            if spins >= 1 << 32 {
                return None;
            }
        };
        let ticks = u128::from(tsc1.wrapping_sub(tsc0));
        let khz = ticks * 1_000_000 / u128::from(ref1 - ref0);
        Tsc::from_khz(u32::try_from(khz).ok()?)
    }

    /// A TSC ticking at `khz` kHz; `None` for 0.
    pub const fn from_khz(khz: u32) -> Option<Tsc> {
        if khz == 0 {
            None
        } else {
            Some(Tsc { khz: khz as u64 })
        }
    }

    /// The frequency in kHz.
    pub const fn khz(&self) -> u32 {
        self.khz as u32
    }

    /// `ticks` in nanoseconds, rounded down (exactly `⌊ticks · 10⁶ / khz⌋`, saturating at
    /// `u64::MAX`).
    #[inline]
    pub const fn ticks_to_ns(&self, ticks: u64) -> u64 {
        let (q, r) = (ticks / self.khz, ticks % self.khz);
        q.saturating_mul(NS_PER_MS)
            .saturating_add(r * NS_PER_MS / self.khz)
    }

    /// `ns` in ticks, rounded down (exactly `⌊ns · khz / 10⁶⌋`, saturating at `u64::MAX`).
    #[inline]
    pub const fn ns_to_ticks(&self, ns: u64) -> u64 {
        let (q, r) = (ns / NS_PER_MS, ns % NS_PER_MS);
        q.saturating_mul(self.khz)
            .saturating_add(r * self.khz / NS_PER_MS)
    }

    /// The TSC now, in nanoseconds (since the TSC's reset: under KVM, about when the VM was
    /// created). No exit.
    #[inline]
    pub fn now_ns(&self) -> u64 {
        self.ticks_to_ns(rdtsc())
    }
}

/// Decodes the hypervisor leaves: the timing leaf (read through `timing` only if the others
/// vouch for it) gives the frequency. Pure, so it can be tested on the host.
fn decode_timing(
    signature: CpuidResult,
    version: CpuidResult,
    timing: impl FnOnce() -> CpuidResult,
) -> Option<Tsc> {
    if signature.eax < CPUID_LEAF_TIMING || signature.eax >= CPUID_LEAF_SIGNATURE + 0x100 {
        return None;
    }
    if let Some(pv) = decode(signature, version)
        && !pv.has(features::TSC_KHZ)
    {
        return None;
    }
    Tsc::from_khz(timing().eax)
}

/// `rdtsc`: the time-stamp counter. Not serializing: an instruction before it may still be in
/// flight, which is well below the resolution this crate uses it for (microseconds).
#[inline]
pub fn rdtsc() -> u64 {
    // SAFETY: `rdtsc` exists on every x86-64 CPU, reads no memory and only writes edx:eax. It
    // is allowed at every privilege level unless CR4.TSD is set (pvkit leaves it clear); were
    // it set, it would raise #GP, not touch memory.
    unsafe { core::arch::x86_64::_rdtsc() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exact_ns(ticks: u64, khz: u64) -> u64 {
        u64::try_from(u128::from(ticks) * 1_000_000 / u128::from(khz)).unwrap_or(u64::MAX)
    }

    fn exact_ticks(ns: u64, khz: u64) -> u64 {
        u64::try_from(u128::from(ns) * u128::from(khz) / 1_000_000).unwrap_or(u64::MAX)
    }

    #[test]
    fn zero_khz_is_no_clock() {
        assert_eq!(Tsc::from_khz(0), None);
        assert_eq!(Tsc::from_khz(2_500_000).unwrap().khz(), 2_500_000);
    }

    #[test]
    fn scaling_matches_128_bit_arithmetic() {
        let ticks = [
            0,
            1,
            999,
            2_999_999,
            3_000_000_000,
            1 << 40,
            123_456_789_012_345,
            1 << 55,
            u64::MAX / 3,
            u64::MAX,
        ];
        for khz in [
            1u32,
            1000,
            1_000_000,
            2_100_003,
            2_995_200,
            3_000_000,
            u32::MAX,
        ] {
            let tsc = Tsc::from_khz(khz).unwrap();
            for &t in &ticks {
                assert_eq!(
                    tsc.ticks_to_ns(t),
                    exact_ns(t, u64::from(khz)),
                    "{t} @ {khz}"
                );
                assert_eq!(
                    tsc.ns_to_ticks(t),
                    exact_ticks(t, u64::from(khz)),
                    "{t} @ {khz}"
                );
            }
        }
    }

    #[test]
    fn a_3_ghz_tsc() {
        let tsc = Tsc::from_khz(3_000_000).unwrap();
        assert_eq!(tsc.ticks_to_ns(3_000_000_000), 1_000_000_000);
        assert_eq!(tsc.ticks_to_ns(2), 0);
        assert_eq!(tsc.ticks_to_ns(3), 1);
        assert_eq!(tsc.ns_to_ticks(1_000), 3_000);
        // Round trips lose at most one unit.
        let t = 987_654_321_987;
        assert!(t - tsc.ns_to_ticks(tsc.ticks_to_ns(t)) < 3);
    }

    #[test]
    fn calibration_divides_ticks_by_reference_time() {
        // The host's own TSC against a reference that advances 1 ms per reading: the result is
        // whatever the TSC did in that time, but it must be a plausible, non-zero rate.
        let mut t = 0u64;
        let tsc = Tsc::calibrate(
            || -> Result<u64, ()> {
                t += 1_000_000;
                Ok(t)
            },
            10_000_000,
        );
        assert!(tsc.is_some());
        // A failing reference gives no clock; so does one that never moves.
        assert_eq!(Tsc::calibrate(|| Err::<u64, ()>(()), 1), None);
        let mut n = 0u64;
        let stuck = Tsc::calibrate(
            || -> Result<u64, ()> {
                n += 1;
                if n > 1000 { Err(()) } else { Ok(5) }
            },
            1,
        );
        assert_eq!(stuck, None);
    }

    fn leaves(max_leaf: u32, feature_bits: u64) -> (CpuidResult, CpuidResult) {
        let (ebx, ecx, edx) = hypercall_abi::signature_registers();
        let signature = CpuidResult {
            eax: max_leaf,
            ebx,
            ecx,
            edx,
        };
        let version = CpuidResult {
            eax: hypercall_abi::abi_version_packed(),
            ebx: feature_bits as u32,
            ecx: (feature_bits >> 32) as u32,
            edx: 0,
        };
        (signature, version)
    }

    fn timing(khz: u32) -> impl FnOnce() -> CpuidResult {
        move || CpuidResult {
            eax: khz,
            ebx: 0,
            ecx: 0,
            edx: 0,
        }
    }

    #[test]
    fn the_timing_leaf_is_trusted_only_when_vouched_for() {
        let (sig, ver) = leaves(hypercall_abi::CPUID_MAX_LEAF, features::V1_2);
        assert_eq!(
            decode_timing(sig, ver, timing(2_995_200)),
            Tsc::from_khz(2_995_200)
        );
        // Frequency unknown.
        assert_eq!(decode_timing(sig, ver, timing(0)), None);
        // No TSC_KHZ bit: the leaf is not read.
        let (sig, ver) = leaves(hypercall_abi::CPUID_MAX_LEAF, features::V1_1);
        assert_eq!(decode_timing(sig, ver, || unreachable!()), None);
        // A host whose highest leaf is below the timing leaf.
        let (sig, ver) = leaves(CPUID_LEAF_VERSION, features::V1_2);
        assert_eq!(decode_timing(sig, ver, || unreachable!()), None);
        // Another hypervisor (KVM under QEMU with invtsc, pvkit in trapped mode) whose highest
        // leaf reaches the timing leaf: trusted, whatever the version leaf says.
        let (mut sig, ver) = leaves(hypercall_abi::CPUID_MAX_LEAF, 0);
        sig.ebx = u32::from_le_bytes(*b"KVMK");
        assert_eq!(
            decode_timing(sig, ver, timing(2_000_000)),
            Tsc::from_khz(2_000_000)
        );
        // ... but not when its highest leaf stops short, or is not a hypervisor leaf at all.
        sig.eax = CPUID_LEAF_VERSION;
        assert_eq!(decode_timing(sig, ver, || unreachable!()), None);
        sig.eax = 0x0000_000d;
        assert_eq!(decode_timing(sig, ver, || unreachable!()), None);
    }
}
