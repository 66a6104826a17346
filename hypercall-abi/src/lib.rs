//! The pvkit hypercall ABI, shared by guests (`guest-pv`) and the host (`host-vmm`).
//!
//! This crate is the single source of truth for every number and layout that crosses the
//! guest/host boundary: detection CPUID leaves, the register convention of a hypercall, call
//! numbers, error codes, feature bits, payload structs, the boot-info block and the
//! guest-physical memory map. It contains no logic beyond encoding and decoding. The pvkit
//! repository's [`docs/ABI.md`](https://github.com/pvkit/pvkit/blob/main/docs/ABI.md) is the
//! normative prose version of the same contract.
//!
//! # Transport in one paragraph
//! A hypercall is a 32-bit port write `out dx, eax` with `dx` = [`HYPERCALL_PORT`] and
//! `eax`/`rax` = the [`Call`] number. Up to four arguments travel in `rdi`, `rsi`, `rcx`, `r8`
//! (each call's layout: [`request::Request`]). When the instruction retires, `rax` holds the
//! status (`0` = success, otherwise an [`Error`] code) and `rdx` holds the result value (0 on
//! error, except `mmu_update`'s count of applied entries). All other registers are preserved.
//! Payloads larger than a register are passed as the guest-physical address (and length) of a
//! `#[repr(C)]` struct or buffer.
#![cfg_attr(not(feature = "std"), no_std)]

pub mod boot;
pub mod idle;
pub mod layout;
pub mod mmu;
pub mod note;
pub mod ports;
pub mod pvh;
pub mod request;
pub mod virtio;
pub mod zero;

/// ABI major version: bumped on incompatible changes. A guest must refuse a host whose major
/// version differs from the one it was built against.
pub const ABI_VERSION_MAJOR: u16 = 1;
/// ABI minor version: bumped when calls or features are added compatibly.
pub const ABI_VERSION_MINOR: u16 = 8;

/// The ABI version packed as `major << 16 | minor` (the format of CPUID leaf
/// [`CPUID_LEAF_VERSION`] `eax` and of [`Call::Features`]' result).
pub const fn abi_version_packed() -> u32 {
    ((ABI_VERSION_MAJOR as u32) << 16) | ABI_VERSION_MINOR as u32
}

/// Splits a packed version into `(major, minor)`.
pub const fn unpack_version(packed: u32) -> (u16, u16) {
    ((packed >> 16) as u16, packed as u16)
}

// ---------------------------------------------------------------------------------------------
// Detection
// ---------------------------------------------------------------------------------------------

/// CPUID leaf with the hypervisor signature: `eax` = highest pvkit leaf, `ebx:ecx:edx` =
/// [`CPUID_SIGNATURE`]. Only meaningful when CPUID leaf 1 `ecx` bit 31 (hypervisor present) is set.
pub const CPUID_LEAF_SIGNATURE: u32 = 0x4000_0000;
/// CPUID leaf with `eax` = packed ABI version, `ebx` = feature bits 0..31, `ecx` = feature bits
/// 32..63, `edx` = 0 (reserved).
pub const CPUID_LEAF_VERSION: u32 = 0x4000_0001;
/// CPUID leaf with timing information: `eax` = TSC frequency in kHz (0 if unknown), `ebx` =
/// 0 (reserved). The same leaf number and `eax` meaning as the VMware/KVM "timing" leaf.
pub const CPUID_LEAF_TIMING: u32 = 0x4000_0010;
/// The highest pvkit CPUID leaf (the value of `eax` at [`CPUID_LEAF_SIGNATURE`]).
pub const CPUID_MAX_LEAF: u32 = CPUID_LEAF_TIMING;
/// The 12-byte signature in `ebx`, `ecx`, `edx` (little-endian, in that order).
pub const CPUID_SIGNATURE: [u8; 12] = *b"PVKITPVKIT\0\0";

/// Splits [`CPUID_SIGNATURE`] into the `(ebx, ecx, edx)` register values.
pub const fn signature_registers() -> (u32, u32, u32) {
    let s = CPUID_SIGNATURE;
    (
        u32::from_le_bytes([s[0], s[1], s[2], s[3]]),
        u32::from_le_bytes([s[4], s[5], s[6], s[7]]),
        u32::from_le_bytes([s[8], s[9], s[10], s[11]]),
    )
}

/// Feature bits, reported by CPUID leaf [`CPUID_LEAF_VERSION`] and by [`Call::Features`].
/// A bit set means the host services the call family.
pub mod features {
    /// `console_write`.
    pub const CONSOLE: u64 = 1 << 0;
    /// `exit`.
    pub const EXIT: u64 = 1 << 1;
    /// `clock_ns`.
    pub const CLOCK: u64 = 1 << 2;
    /// `null`.
    pub const NULL: u64 = 1 << 3;
    /// `idle_yield`, the timer and the event device (since v1.2).
    pub const IDLE_YIELD: u64 = 1 << 8;
    /// CPUID leaf [`crate::CPUID_LEAF_TIMING`] reports the TSC frequency (since v1.2).
    pub const TSC_KHZ: u64 = 1 << 4;
    /// `zero_hints` (since v1.3).
    pub const ZERO_HINTS: u64 = 1 << 9;
    /// `mmu_update` and `mmu_pin` (since v1.1).
    pub const MMU_UPDATE: u64 = 1 << 10;
    /// `zero_hints(PREPARE)`: the host backs known-zero frames ahead of use, off the vCPU
    /// (since v1.6; a host whose kernel cannot populate memory without touching it clears it).
    pub const ZERO_PREPARE: u64 = 1 << 11;
    /// `zero_hints(FREE_LIST)`: the guest registers a list of free frames the host may treat
    /// as zero when it saves or migrates the VM (since v1.8).
    pub const FREE_REPORT: u64 = 1 << 12;
    /// Everything a v1.0 host services.
    pub const V1_0: u64 = CONSOLE | EXIT | CLOCK | NULL;
    /// Everything a v1.1 host services.
    pub const V1_1: u64 = V1_0 | MMU_UPDATE;
    /// Everything a v1.2 host services.
    pub const V1_2: u64 = V1_1 | IDLE_YIELD | TSC_KHZ;
    /// Everything a v1.3 host services.
    pub const V1_3: u64 = V1_2 | ZERO_HINTS;
    /// Everything a v1.6 host services (v1.4 and v1.5 added no feature bits).
    pub const V1_6: u64 = V1_3 | ZERO_PREPARE;
    /// Everything a v1.7 host services (v1.7 added no feature bit: it added the ELF note of
    /// [`crate::note`] and made feature bits binding, see [`crate::call_feature`]).
    pub const V1_7: u64 = V1_6;
    /// Everything a v1.8 host services.
    pub const V1_8: u64 = V1_7 | FREE_REPORT;

    /// Every defined feature bit with its stable name (lowercase, as `host-vmm --disable` and
    /// `host-vmm inspect` spell them), in bit order.
    pub const NAMES: [(u64, &str); 10] = [
        (CONSOLE, "console"),
        (EXIT, "exit"),
        (CLOCK, "clock"),
        (NULL, "null"),
        (TSC_KHZ, "tsc_khz"),
        (IDLE_YIELD, "idle_yield"),
        (ZERO_HINTS, "zero_hints"),
        (MMU_UPDATE, "mmu_update"),
        (ZERO_PREPARE, "zero_prepare"),
        (FREE_REPORT, "free_report"),
    ];

    /// The name of one feature bit; `None` for a reserved bit or a value that is not exactly
    /// one bit.
    pub const fn name(bit: u64) -> Option<&'static str> {
        let mut i = 0;
        while i < NAMES.len() {
            if NAMES[i].0 == bit {
                return Some(NAMES[i].1);
            }
            i += 1;
        }
        None
    }

    /// The bit of a feature name ([`NAMES`]); `-` is accepted for `_` and case is ignored.
    pub fn from_name(name: &str) -> Option<u64> {
        NAMES.iter().find_map(|&(bit, n)| {
            let same = n.len() == name.len()
                && n.bytes().zip(name.bytes()).all(|(a, b)| {
                    let b = b.to_ascii_lowercase();
                    a == b || (a == b'_' && b == b'-')
                });
            same.then_some(bit)
        })
    }

    /// Displays a set of feature bits as names joined by `,` (reserved bits as `bitN`; the
    /// empty set as `none`), e.g. `console,exit,mmu_update`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Names(pub u64);

    impl core::fmt::Display for Names {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            if self.0 == 0 {
                return f.write_str("none");
            }
            let mut first = true;
            for i in 0..64 {
                let bit = 1u64 << i;
                if self.0 & bit == 0 {
                    continue;
                }
                if !first {
                    f.write_str(",")?;
                }
                first = false;
                match name(bit) {
                    Some(n) => f.write_str(n)?,
                    None => write!(f, "bit{i}")?,
                }
            }
            Ok(())
        }
    }
}

/// The feature bit that must be set for a host to service `call` (since v1.7 a host answers a
/// call whose bit it clears with [`Error::NotImplemented`]); `None` for `features`, which is
/// always serviced.
pub const fn call_feature(call: Call) -> Option<u64> {
    Some(match call {
        Call::Null => features::NULL,
        Call::Features => return None,
        Call::ConsoleWrite => features::CONSOLE,
        Call::Exit => features::EXIT,
        Call::ClockNs => features::CLOCK,
        Call::IdleYield => features::IDLE_YIELD,
        Call::ZeroHints => features::ZERO_HINTS,
        Call::MmuUpdate | Call::MmuPin => features::MMU_UPDATE,
    })
}

// ---------------------------------------------------------------------------------------------
// Transport
// ---------------------------------------------------------------------------------------------

/// The I/O port a hypercall writes to (`out dx, eax`).
pub const HYPERCALL_PORT: u16 = 0x0510;

/// Call numbers (the value of `rax`/`eax` at the hypercall `out`).
///
/// Numbers are stable forever; a retired call keeps its number. Numbers marked *coming* are
/// reserved: a v1.0 host answers them with [`Error::NotImplemented`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
#[repr(u32)]
pub enum Call {
    /// Does nothing; returns `a0` unchanged. For measuring the bare round-trip cost.
    Null = 0,
    /// Returns the host feature bits (`u64`) in `rdx`; same bits as the CPUID leaf.
    Features = 1,
    /// Writes `a1` bytes at guest-physical `a0` to the console. Returns bytes written.
    ConsoleWrite = 2,
    /// Ends the guest with exit code `a0` (`u32`). Does not return.
    Exit = 3,
    /// Returns host monotonic time in nanoseconds (`u64`) since the VM was created.
    ClockNs = 4,
    /// Parks the vCPU until `a0` (absolute, `clock_ns` time) or a pending event; returns the
    /// wake reason. See [`idle`].
    IdleYield = 16,
    /// Pre-zeroed frame hints (`a0` = [`zero::QUERY`]) and frame release
    /// (`a0` = [`zero::RELEASE`]). See [`zero`].
    ZeroHints = 17,
    /// Applies a batch of page-table updates: `a0` = GPA of an array of
    /// [`mmu::MmuUpdate`], `a1` = entry count (≤ [`mmu::MMU_UPDATE_MAX`]), `a2` = flags
    /// ([`mmu::UPDATE_DEFER_SYNC`], since v1.4). Returns the number applied. A call refused as a
    /// whole (flags, count, batch address) changes nothing; otherwise entries apply in order
    /// and the first refused one stops the batch: the status is its error, `rdx` the number
    /// applied before it (they stay applied), and it and later entries are not applied. See
    /// [`mmu`] and docs/ABI.md §9.
    MmuUpdate = 18,
    /// Pins (`a0` = [`mmu::PIN_L4`]) or unpins (`a0` = [`mmu::UNPIN`]) the page-table root at
    /// `a1`, so it is validated once rather than on every switch. See [`mmu`].
    MmuPin = 19,
}

impl Call {
    /// Decodes a call number; `None` for a number no version of the ABI defines.
    pub const fn from_raw(raw: u64) -> Option<Call> {
        Some(match raw {
            0 => Call::Null,
            1 => Call::Features,
            2 => Call::ConsoleWrite,
            3 => Call::Exit,
            4 => Call::ClockNs,
            16 => Call::IdleYield,
            17 => Call::ZeroHints,
            18 => Call::MmuUpdate,
            19 => Call::MmuPin,
            _ => return None,
        })
    }

    /// The call number.
    pub const fn raw(self) -> u32 {
        self as u32
    }

    /// A short, stable, lowercase name (used in statistics and JSON).
    pub const fn name(self) -> &'static str {
        match self {
            Call::Null => "null",
            Call::Features => "features",
            Call::ConsoleWrite => "console_write",
            Call::Exit => "exit",
            Call::ClockNs => "clock_ns",
            Call::IdleYield => "idle_yield",
            Call::ZeroHints => "zero_hints",
            Call::MmuUpdate => "mmu_update",
            Call::MmuPin => "mmu_pin",
        }
    }
}

/// Error codes, returned in `rax` (0 means success and is not an `Error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
#[repr(u32)]
pub enum Error {
    /// The call number is not defined by any ABI version.
    UnknownCall = 1,
    /// The call number is reserved but this host does not service it.
    NotImplemented = 2,
    /// An argument is malformed (bad flag, bad size, reserved bits set).
    InvalidArgument = 3,
    /// A guest-physical range is not entirely inside guest RAM (or overflows).
    BadAddress = 4,
    /// A length exceeds the call's documented maximum.
    TooLarge = 5,
    /// The call is not allowed in the VM's current mode or state.
    Denied = 6,
    /// A page-table frame is in use at another level, is not a table, or is not zero where a
    /// fresh table is required (see [`mmu`]).
    TypeConflict = 7,
}

impl Error {
    /// Decodes a status register; `Ok(())` for 0, `Err(None)` for an unknown code.
    pub const fn from_status(status: u64) -> Result<(), Option<Error>> {
        match status {
            0 => Ok(()),
            1 => Err(Some(Error::UnknownCall)),
            2 => Err(Some(Error::NotImplemented)),
            3 => Err(Some(Error::InvalidArgument)),
            4 => Err(Some(Error::BadAddress)),
            5 => Err(Some(Error::TooLarge)),
            6 => Err(Some(Error::Denied)),
            7 => Err(Some(Error::TypeConflict)),
            _ => Err(None),
        }
    }

    /// The status register value.
    pub const fn code(self) -> u64 {
        self as u64
    }

    /// A short, stable, lowercase name.
    pub const fn name(self) -> &'static str {
        match self {
            Error::UnknownCall => "unknown_call",
            Error::NotImplemented => "not_implemented",
            Error::InvalidArgument => "invalid_argument",
            Error::BadAddress => "bad_address",
            Error::TooLarge => "too_large",
            Error::Denied => "denied",
            Error::TypeConflict => "type_conflict",
        }
    }
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// The largest buffer one `console_write` accepts (bytes). Longer writes must be split.
pub const CONSOLE_WRITE_MAX: u64 = 64 * 1024;

/// The register image of one hypercall, as the host decodes it and the guest encodes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Regs {
    /// `rax`: call number.
    pub nr: u64,
    /// `rdi`, `rsi`, `rcx`, `r8`.
    pub args: [u64; 4],
}

/// What the host writes back: `rax` = status, `rdx` = value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Return {
    /// `rax`: 0 or an [`Error`] code.
    pub status: u64,
    /// `rdx`: the call's result; 0 on error, except for [`Call::MmuUpdate`], where it is the
    /// number of entries applied before the refused one.
    pub value: u64,
}

impl Return {
    /// A successful return with `value`.
    pub const fn ok(value: u64) -> Return {
        Return { status: 0, value }
    }

    /// A failed return.
    pub const fn err(e: Error) -> Return {
        Return {
            status: e.code(),
            value: 0,
        }
    }

    /// Decodes into a `Result`. A status this ABI version does not define decodes as
    /// `Err(None)`, so a caller can tell a newer host's code apart from a known one.
    pub const fn into_result(self) -> Result<u64, Option<Error>> {
        match Error::from_status(self.status) {
            Ok(()) => Ok(self.value),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::string::ToString;

    use super::*;

    #[test]
    fn version_round_trips() {
        let p = abi_version_packed();
        assert_eq!(unpack_version(p), (ABI_VERSION_MAJOR, ABI_VERSION_MINOR));
        assert_eq!(p >> 16, 1);
    }

    #[test]
    fn call_numbers_round_trip_and_are_stable() {
        let all = [
            (Call::Null, 0),
            (Call::Features, 1),
            (Call::ConsoleWrite, 2),
            (Call::Exit, 3),
            (Call::ClockNs, 4),
            (Call::IdleYield, 16),
            (Call::ZeroHints, 17),
            (Call::MmuUpdate, 18),
            (Call::MmuPin, 19),
        ];
        for (call, raw) in all {
            assert_eq!(call.raw(), raw);
            assert_eq!(Call::from_raw(u64::from(raw)), Some(call));
        }
        assert_eq!(Call::from_raw(5), None);
        assert_eq!(Call::from_raw(u64::MAX), None);
        assert_eq!(Call::from_raw(1 << 32), None);
    }

    #[test]
    fn error_codes_round_trip() {
        for e in [
            Error::UnknownCall,
            Error::NotImplemented,
            Error::InvalidArgument,
            Error::BadAddress,
            Error::TooLarge,
            Error::Denied,
            Error::TypeConflict,
        ] {
            assert_eq!(Error::from_status(e.code()), Err(Some(e)));
            assert_eq!(Return::err(e).into_result(), Err(Some(e)));
        }
        assert_eq!(Error::from_status(0), Ok(()));
        assert_eq!(Error::from_status(999), Err(None));
        assert_eq!(Return::ok(7).into_result(), Ok(7));
    }

    #[test]
    fn signature_is_split_little_endian() {
        let (b, c, d) = signature_registers();
        let mut s = [0u8; 12];
        s[..4].copy_from_slice(&b.to_le_bytes());
        s[4..8].copy_from_slice(&c.to_le_bytes());
        s[8..].copy_from_slice(&d.to_le_bytes());
        assert_eq!(s, CPUID_SIGNATURE);
    }

    #[test]
    fn feature_names_round_trip() {
        for (bit, name) in features::NAMES {
            assert_eq!(bit.count_ones(), 1);
            assert_eq!(features::name(bit), Some(name));
            assert_eq!(features::from_name(name), Some(bit));
            assert_eq!(
                features::from_name(&name.to_uppercase().replace('_', "-")),
                Some(bit)
            );
        }
        assert_eq!(features::from_name("mmu"), None);
        assert_eq!(features::from_name(""), None);
        assert_eq!(features::name(1 << 40), None);
        assert_eq!(features::name(features::CONSOLE | features::EXIT), None);
        assert_eq!(
            features::Names(features::CONSOLE | features::MMU_UPDATE | (1 << 40)).to_string(),
            "console,mmu_update,bit40"
        );
        assert_eq!(features::Names(0).to_string(), "none");
        let all = features::NAMES.iter().fold(0, |a, (b, _)| a | b);
        assert_eq!(all, features::V1_8);
    }

    #[test]
    fn every_call_but_features_has_a_feature_bit() {
        assert_eq!(call_feature(Call::Features), None);
        assert_eq!(call_feature(Call::MmuPin), Some(features::MMU_UPDATE));
        assert_eq!(call_feature(Call::Null), Some(features::NULL));
    }

    #[test]
    fn reserved_features_are_not_in_v1_0() {
        assert_eq!(
            features::V1_0 & (features::IDLE_YIELD | features::ZERO_HINTS | features::MMU_UPDATE),
            0
        );
        assert_eq!(
            features::V1_1 & (features::IDLE_YIELD | features::ZERO_HINTS),
            0
        );
    }
}
