//! The guest's CPUID: what KVM supports, with the hypervisor bit set and pvkit's detection
//! leaves (signature, ABI version, feature bits) replacing KVM's own paravirt leaves.

use hypercall_abi::{
    CPUID_LEAF_SIGNATURE, CPUID_LEAF_TIMING, CPUID_LEAF_VERSION, CPUID_MAX_LEAF,
    abi_version_packed, signature_registers,
};
use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES, kvm_cpuid_entry2};
use kvm_ioctls::Kvm;

use crate::error::{Error, Result};

/// CPUID leaf 1 ECX bit 31: "running under a hypervisor".
const HYPERVISOR_BIT: u32 = 1 << 31;

/// The CPUID table for a pvkit guest advertising `feature_bits`; `tsc_khz` is the guest's TSC
/// frequency (0 if unknown).
pub fn guest_cpuid(kvm: &Kvm, feature_bits: u64, tsc_khz: u32) -> Result<CpuId> {
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
    entries.extend(pvkit_leaves(feature_bits, tsc_khz));
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
