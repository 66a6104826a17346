//! The trapped twins whose guest side is a plain memory access: the host learns of it only
//! because the access exits (`KVM_EXIT_MMIO`).

pub mod mmu_emul;
pub mod pool_window;
