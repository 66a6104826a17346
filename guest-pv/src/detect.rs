//! Detection of a pvkit host through CPUID, and the [`Pvkit`] token it yields.
//!
//! Detection uses only `cpuid`, never a hypercall, so it is harmless on any x86-64 machine and
//! allowed in pvkit's `trapped` mode (the VMM does not count `cpuid` as a hypercall).

use core::arch::x86_64::{__cpuid, CpuidResult};

use hypercall_abi::{
    ABI_VERSION_MAJOR, CPUID_LEAF_SIGNATURE, CPUID_LEAF_VERSION, signature_registers,
    unpack_version,
};

use hypercall_abi::request::Request;

use crate::HypercallError;

/// CPUID leaf 1 `ecx` bit 31: "a hypervisor is present".
pub(crate) const HYPERVISOR_PRESENT: u32 = 1 << 31;

/// Proof that the code runs under a pvkit host with a compatible ABI major version.
///
/// The only way to get one is [`detect`], so holding a `Pvkit` is what makes the hypercall
/// wrappers (methods on this type) safe to call. It is a small `Copy` value: keep it wherever
/// convenient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pvkit {
    version: (u16, u16),
    features: u64,
}

/// Looks for a pvkit host: CPUID leaf 1 `ecx` bit 31 (hypervisor present), the pvkit signature
/// at leaf [`CPUID_LEAF_SIGNATURE`] with a highest leaf of at least [`CPUID_LEAF_VERSION`], and
/// at leaf [`CPUID_LEAF_VERSION`] an ABI major version equal to [`ABI_VERSION_MAJOR`].
///
/// Returns `None` on bare metal, under another hypervisor, or under a pvkit host of a different
/// major version, so a kernel can fall back to trapped devices or real hardware.
pub fn detect() -> Option<Pvkit> {
    let leaf1 = cpuid(1);
    if leaf1.ecx & HYPERVISOR_PRESENT == 0 {
        return None;
    }
    decode(cpuid(CPUID_LEAF_SIGNATURE), cpuid(CPUID_LEAF_VERSION))
}

/// Executes `cpuid` with `eax = leaf`, `ecx = 0`.
pub(crate) fn cpuid(leaf: u32) -> CpuidResult {
    // `__cpuid` is a safe function on current toolchains: `cpuid` exists on every x86-64 CPU,
    // reads no memory and only writes the four result registers.
    __cpuid(leaf)
}

/// Decodes the two pvkit CPUID leaves (pure, so it can be tested on the host).
pub(crate) fn decode(signature: CpuidResult, version: CpuidResult) -> Option<Pvkit> {
    let (ebx, ecx, edx) = signature_registers();
    if (signature.ebx, signature.ecx, signature.edx) != (ebx, ecx, edx)
        || signature.eax < CPUID_LEAF_VERSION
    {
        return None;
    }
    let (major, minor) = unpack_version(version.eax);
    if major != ABI_VERSION_MAJOR {
        return None;
    }
    Some(Pvkit {
        version: (major, minor),
        features: u64::from(version.ebx) | (u64::from(version.ecx) << 32),
    })
}

impl Pvkit {
    /// A token for unit tests of code that holds one but never issues a hypercall.
    #[cfg(test)]
    pub(crate) const fn for_tests() -> Pvkit {
        Pvkit {
            version: (ABI_VERSION_MAJOR, hypercall_abi::ABI_VERSION_MINOR),
            features: hypercall_abi::features::V1_1,
        }
    }

    /// The host's ABI version `(major, minor)`, as reported by CPUID.
    pub const fn version(&self) -> (u16, u16) {
        self.version
    }

    /// The host's feature bits ([`hypercall_abi::features`]), as reported by CPUID.
    pub const fn feature_bits(&self) -> u64 {
        self.features
    }

    /// True if the host reports *every* bit of `feature_bits` (an `|` of
    /// [`hypercall_abi::features`] constants).
    pub const fn has(&self, feature_bits: u64) -> bool {
        self.features & feature_bits == feature_bits
    }

    /// Asks the host for its feature bits with the `features` hypercall (the same bits as CPUID
    /// reports; this is mainly a cheap call to exercise the transport).
    pub fn features(&self) -> Result<u64, HypercallError> {
        self.request(Request::Features)
    }
}

#[cfg(test)]
mod tests {
    use hypercall_abi::{CPUID_MAX_LEAF, abi_version_packed, features};

    use super::*;

    fn sig_leaf() -> CpuidResult {
        let (ebx, ecx, edx) = signature_registers();
        CpuidResult {
            eax: CPUID_MAX_LEAF,
            ebx,
            ecx,
            edx,
        }
    }

    fn version_leaf(packed: u32, features: u64) -> CpuidResult {
        CpuidResult {
            eax: packed,
            ebx: features as u32,
            ecx: (features >> 32) as u32,
            edx: 0,
        }
    }

    #[test]
    fn decodes_a_pvkit_host() {
        let bits = features::V1_0 | (1 << 40);
        let pv = decode(sig_leaf(), version_leaf(abi_version_packed(), bits)).unwrap();
        assert_eq!(
            pv.version(),
            (ABI_VERSION_MAJOR, hypercall_abi::ABI_VERSION_MINOR)
        );
        assert_eq!(pv.feature_bits(), bits);
        assert!(pv.has(features::CONSOLE | features::EXIT));
        assert!(pv.has(1 << 40));
        assert!(!pv.has(features::IDLE_YIELD));
        assert!(pv.has(0));
    }

    #[test]
    fn accepts_a_newer_minor_version() {
        let packed = (u32::from(ABI_VERSION_MAJOR) << 16) | 7;
        let pv = decode(sig_leaf(), version_leaf(packed, 0)).unwrap();
        assert_eq!(pv.version(), (ABI_VERSION_MAJOR, 7));
    }

    #[test]
    fn rejects_other_major_versions() {
        let packed = u32::from(ABI_VERSION_MAJOR + 1) << 16;
        assert_eq!(decode(sig_leaf(), version_leaf(packed, 0)), None);
    }

    #[test]
    fn rejects_other_signatures() {
        // KVM's signature, as seen by a guest of a stock KVM VMM.
        let kvm = CpuidResult {
            eax: 0x4000_0001,
            ebx: u32::from_le_bytes(*b"KVMK"),
            ecx: u32::from_le_bytes(*b"VMKV"),
            edx: u32::from_le_bytes(*b"M\0\0\0"),
        };
        assert_eq!(decode(kvm, version_leaf(abi_version_packed(), 0)), None);
    }

    #[test]
    fn rejects_a_host_without_the_version_leaf() {
        let mut sig = sig_leaf();
        sig.eax = CPUID_LEAF_SIGNATURE;
        assert_eq!(decode(sig, version_leaf(abi_version_packed(), 0)), None);
    }

    #[test]
    fn the_test_host_is_not_pvkit() {
        // `cargo test` runs on Linux, bare metal or under some hypervisor, never under pvkit.
        assert_eq!(detect(), None);
    }
}
