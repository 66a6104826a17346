//! The guest's CPUID: what KVM supports, with the hypervisor bit set and, in place of KVM's own
//! paravirt leaves, either pvkit's detection leaves (signature, ABI version, feature bits) or —
//! when pvkit is hidden — what a stock KVM VMM shows an unmodified guest: the plain KVM
//! signature with no paravirt features, and the TSC rate in the standard timing leaf (as QEMU
//! does with `invtsc`).

use hypercall_abi::{
    CPUID_LEAF_SIGNATURE, CPUID_LEAF_TIMING, CPUID_LEAF_VERSION, CPUID_MAX_LEAF,
    abi_version_packed, signature_registers,
};
use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES, kvm_cpuid_entry2};
use kvm_ioctls::Kvm;

use crate::error::{Error, Result};
use crate::kernel_abi::Offer;

/// CPUID leaf 1 ECX bit 31: "running under a hypervisor".
const HYPERVISOR_BIT: u32 = 1 << 31;

/// The CPUID table for a guest shown `offer`; `tsc_khz` is the guest's TSC frequency (0 if
/// unknown).
pub fn guest_cpuid(kvm: &Kvm, offer: Offer, tsc_khz: u32) -> Result<CpuId> {
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(Error::kvm("get supported CPUID"))?;
    let mut entries: Vec<kvm_cpuid_entry2> = supported
        .as_slice()
        .iter()
        .copied()
        .filter(|e| !(0x4000_0000..0x5000_0000).contains(&e.function))
        .collect();
    for e in entries.iter_mut().filter(|e| e.function == 1) {
        e.ecx |= HYPERVISOR_BIT;
    }
    match offer {
        Offer::Pv(feature_bits) => entries.extend(pvkit_leaves(feature_bits, tsc_khz)),
        Offer::Hidden(_) => entries.extend(hidden_leaves(tsc_khz)),
    }
    CpuId::from_entries(&entries).map_err(|_| Error::MissingCapability("a CPUID table this large"))
}

/// pvkit's leaves: signature, version/features, timing.
pub fn pvkit_leaves(feature_bits: u64, tsc_khz: u32) -> [kvm_cpuid_entry2; 3] {
    let (ebx, ecx, edx) = signature_registers();
    [
        kvm_cpuid_entry2 {
            function: CPUID_LEAF_SIGNATURE,
            eax: CPUID_MAX_LEAF,
            ebx,
            ecx,
            edx,
            ..Default::default()
        },
        kvm_cpuid_entry2 {
            function: CPUID_LEAF_VERSION,
            eax: abi_version_packed(),
            ebx: feature_bits as u32,
            ecx: (feature_bits >> 32) as u32,
            edx: 0,
            ..Default::default()
        },
        kvm_cpuid_entry2 {
            function: CPUID_LEAF_TIMING,
            eax: tsc_khz,
            ..Default::default()
        },
    ]
}

/// KVM's signature, `"KVMKVMKVM\0\0\0"` as `ebx, ecx, edx`.
const KVM_SIGNATURE: [u8; 12] = *b"KVMKVMKVM\0\0\0";

/// The hypervisor leaves of a VM that hides pvkit: the KVM signature (it *is* KVM) with no KVM
/// paravirt feature, and the timing leaf with the TSC rate, all an unmodified guest of a stock
/// KVM VMM can see. No pvkit signature, so pvkit detection fails.
pub fn hidden_leaves(tsc_khz: u32) -> [kvm_cpuid_entry2; 3] {
    let reg = |i: usize| {
        u32::from_le_bytes([
            KVM_SIGNATURE[i],
            KVM_SIGNATURE[i + 1],
            KVM_SIGNATURE[i + 2],
            KVM_SIGNATURE[i + 3],
        ])
    };
    [
        kvm_cpuid_entry2 {
            function: CPUID_LEAF_SIGNATURE,
            eax: CPUID_LEAF_TIMING,
            ebx: reg(0),
            ecx: reg(4),
            edx: reg(8),
            ..Default::default()
        },
        // KVM's feature leaf: no kvmclock, no PV EOI, nothing.
        kvm_cpuid_entry2 {
            function: CPUID_LEAF_SIGNATURE + 1,
            ..Default::default()
        },
        kvm_cpuid_entry2 {
            function: CPUID_LEAF_TIMING,
            eax: tsc_khz,
            ..Default::default()
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hidden_leaves_carry_no_pvkit_signature() {
        let l = hidden_leaves(2_000_000);
        let (b, c, d) = signature_registers();
        assert_ne!((l[0].ebx, l[0].ecx, l[0].edx), (b, c, d));
        assert_eq!(&l[0].ebx.to_le_bytes(), b"KVMK");
        assert_eq!(l[1].eax | l[1].ebx | l[1].ecx | l[1].edx, 0);
        assert_eq!(l[2].eax, 2_000_000);
        let p = pvkit_leaves(7, 1);
        assert_eq!((p[0].ebx, p[0].ecx, p[0].edx), (b, c, d));
        assert_eq!(p[1].ebx, 7);
    }
}
