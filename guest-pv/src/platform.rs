//! How a kernel talks to its host, decided once by detection: [`Platform::Pv`] (a pvkit host
//! was found; each call is used if its feature bit is set) or [`Platform::Trapped`] (no pvkit:
//! the kernel behaves as an unmodified guest and uses only the trapped devices).
//!
//! The decision is CPUID only ([`detect`](crate::detect())), never the boot info: under
//! `host-vmm --mode trapped` pvkit is hidden and detection fails, so a kernel picks its trapped
//! path by itself, and under `--disable FEATURE` the bit is clear, so [`Platform::feature`]
//! gives `None` for that call family and the kernel uses its trapped twin.
//!
//! ```no_run
//! use guest_pv::Platform;
//! use guest_pv::abi::features;
//!
//! let platform = Platform::detect();
//! match platform.feature(features::NULL) {
//!     Some(pv) => { let _ = pv.null(7); }          // the hypercall
//!     None => { /* the trapped twin: a port write to an emulated device */ }
//! }
//! ```

use core::fmt;

use hypercall_abi::boot::Mode;
use hypercall_abi::features::{self, Names};

use crate::{Console, Pvkit};

/// The host interface chosen at boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Platform {
    /// A pvkit host: hypercalls wherever the host sets the feature bit.
    Pv(Pvkit),
    /// No pvkit host (bare metal, another hypervisor, or pvkit hiding itself): port I/O to
    /// emulated devices only, never a hypercall.
    Trapped,
}

/// Why [`Platform::init`] refused to start the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlatformError {
    /// The kernel requires pvkit features but runs without a pvkit host.
    NoPvkit {
        /// The required feature bits.
        required: u64,
    },
    /// The pvkit host does not offer every required feature.
    MissingFeatures {
        /// Required bits the host does not set.
        missing: u64,
        /// The host's feature bits.
        offered: u64,
    },
}

impl fmt::Display for PlatformError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            PlatformError::NoPvkit { required } => write!(
                f,
                "this kernel requires pvkit features {} but no pvkit host was found \
                 (CPUID leaf 0x40000000)",
                Names(required)
            ),
            PlatformError::MissingFeatures { missing, offered } => write!(
                f,
                "the pvkit host lacks features {} this kernel requires (it offers {})",
                Names(missing),
                Names(offered)
            ),
        }
    }
}

impl Platform {
    /// [`Platform::Pv`] if a pvkit host of this ABI major version is found, else
    /// [`Platform::Trapped`].
    pub fn detect() -> Platform {
        match crate::detect() {
            Some(pv) => Platform::Pv(pv),
            None => Platform::Trapped,
        }
    }

    /// [`detect`](Self::detect), and check that every feature bit in `required` is offered.
    /// `required` = 0 never fails: the kernel falls back to trapped devices by itself.
    pub fn init(required: u64) -> Result<Platform, PlatformError> {
        let platform = Platform::detect();
        match platform {
            Platform::Pv(pv) if !pv.has(required) => Err(PlatformError::MissingFeatures {
                missing: required & !pv.feature_bits(),
                offered: pv.feature_bits(),
            }),
            Platform::Trapped if required != 0 => Err(PlatformError::NoPvkit { required }),
            p => Ok(p),
        }
    }

    /// [`Mode::Pv`] under a pvkit host, else [`Mode::Trapped`].
    pub const fn mode(&self) -> Mode {
        match self {
            Platform::Pv(_) => Mode::Pv,
            Platform::Trapped => Mode::Trapped,
        }
    }

    /// The host token, under a pvkit host.
    pub const fn pvkit(&self) -> Option<Pvkit> {
        match self {
            Platform::Pv(pv) => Some(*pv),
            Platform::Trapped => None,
        }
    }

    /// The host token if the host offers *every* bit of `feature_bits`; `None` means "use the
    /// trapped twin". This is the one question a kernel asks before each PV mechanism.
    pub const fn feature(&self, feature_bits: u64) -> Option<Pvkit> {
        match self {
            Platform::Pv(pv) if pv.has(feature_bits) => Some(*pv),
            _ => None,
        }
    }

    /// The host's feature bits (0 without pvkit).
    pub const fn feature_bits(&self) -> u64 {
        match self {
            Platform::Pv(pv) => pv.feature_bits(),
            Platform::Trapped => 0,
        }
    }

    /// A console: `console_write` hypercalls if the host offers [`features::CONSOLE`], else an
    /// initialised COM1 UART (port I/O only). Wrap it in a
    /// [`LineWriter`](crate::console::LineWriter) (or use [`println!`](crate::println)) for one
    /// exit per line.
    pub fn console(&self) -> Console {
        match self.feature(features::CONSOLE) {
            Some(pv) => Console::Pv(pv.console()),
            None => Console::uart(),
        }
    }

    /// Ends the VM with `code`: the `exit` hypercall if the host offers [`features::EXIT`] (and
    /// it works), else pvkit's trapped exit port.
    ///
    /// # Safety
    /// On the trapped path the machine must be a pvkit VM (see
    /// [`trapped::exit_port`](crate::trapped::exit_port)). A kernel entered through pvkit's boot
    /// protocol knows that: use [`Kernel::exit`](crate::kernel::Kernel::exit), which is safe.
    pub unsafe fn exit(&self, code: u32) -> ! {
        if let Some(pv) = self.feature(features::EXIT) {
            let _ = pv.try_exit(code);
        }
        // SAFETY: a pvkit VM (this function's contract); pvkit emulates the exit port.
        unsafe { crate::trapped::exit_port(code) }
    }
}

#[cfg(test)]
mod tests {
    use std::string::ToString;

    use super::*;

    #[test]
    fn features_gate_each_mechanism() {
        let pv = Pvkit::for_tests(); // V1_1 bits
        let p = Platform::Pv(pv);
        assert_eq!(p.mode(), Mode::Pv);
        assert_eq!(p.feature(features::CONSOLE | features::EXIT), Some(pv));
        assert_eq!(p.feature(features::MMU_UPDATE), Some(pv));
        assert_eq!(p.feature(features::IDLE_YIELD), None);
        assert_eq!(Platform::Trapped.feature(0), None);
        assert_eq!(Platform::Trapped.feature_bits(), 0);
        assert_eq!(Platform::Trapped.mode(), Mode::Trapped);
    }

    #[test]
    fn the_test_host_is_trapped_and_requirements_are_reported() {
        // `cargo test` never runs under pvkit.
        assert_eq!(Platform::detect(), Platform::Trapped);
        assert_eq!(Platform::init(0), Ok(Platform::Trapped));
        let e = Platform::init(features::MMU_UPDATE).unwrap_err();
        assert_eq!(
            e,
            PlatformError::NoPvkit {
                required: features::MMU_UPDATE
            }
        );
        assert!(e.to_string().contains("mmu_update"), "{e}");
        let e = PlatformError::MissingFeatures {
            missing: features::ZERO_HINTS,
            offered: features::V1_0,
        };
        assert!(e.to_string().contains("lacks features zero_hints"), "{e}");
    }
}
