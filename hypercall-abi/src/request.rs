//! Typed hypercall requests: the one definition of every call's registers.
//!
//! A [`Request`] is a hypercall with its arguments named and typed, sub-operations as enums.
//! The guest builds one and [`encode`](Request::encode)s it into the registers of the `out`
//! ([`Regs`]); the host [`decode`](Request::decode)s the registers it finds at the exit back
//! into the same value. The register layout of each call therefore exists exactly once, here.
//!
//! | call | `a0` (`rdi`) | `a1` (`rsi`) | `a2` (`rcx`) | `a3` (`r8`) |
//! |---|---|---|---|---|
//! | [`Request::Null`] | `echo` | | | |
//! | [`Request::Features`] | | | | |
//! | [`Request::ConsoleWrite`] | `gpa` | `len` | | |
//! | [`Request::Exit`] | `code` (`u32`) | | | |
//! | [`Request::ClockNs`] | | | | |
//! | [`Request::IdleYield`] | `deadline_ns` | | | |
//! | [`Request::ZeroHints`] ([`ZeroOp::Query`]) | [`zero::QUERY`] | `bitmap_gpa` | `first_frame` | `count` |
//! | [`Request::ZeroHints`] ([`ZeroOp::Release`]) | [`zero::RELEASE`] | `ranges_gpa` | `count` | |
//! | [`Request::ZeroHints`] ([`ZeroOp::Prepare`]) | [`zero::PREPARE`] | `gpa` | `len` | |
//! | [`Request::ZeroHints`] ([`ZeroOp::FreeList`]) | [`zero::FREE_LIST`] | `list_gpa` | `max_ranges` | |
//! | [`Request::MmuUpdate`] | `batch_gpa` | `count` | flags ([`mmu::UPDATE_DEFER_SYNC`] = `defer_sync`) | |
//! | [`Request::MmuPin`] | [`PinOp`] | `frame` | | |
//!
//! Empty cells are ignored by the host and encoded as 0.
//!
//! [`decode`](Request::decode) checks only what the registers alone determine: the call number
//! ([`Error::UnknownCall`]), the sub-operation, an exit code above `u32::MAX` and unknown
//! `mmu_update` flags ([`Error::InvalidArgument`]). Sizes, addresses and the state of the VM are
//! the handler's to check, after decoding, exactly as the host did before this module existed:
//! the error a malformed call gets is part of the ABI (docs/ABI.md §5, §6).
//!
//! For every request whose fields satisfy these checks, `decode(&r.encode()) == Ok(r)`.

use crate::{Call, Error, Regs, mmu, zero};

/// One hypercall with its arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Request {
    /// `null(echo)`: returns `echo` unchanged.
    Null {
        /// `a0`: the value echoed in `rdx`.
        echo: u64,
    },
    /// `features()`: the host's feature bits.
    Features,
    /// `console_write(gpa, len)`: write `len` bytes at guest-physical `gpa` to the console.
    ConsoleWrite {
        /// `a0`: guest-physical address of the bytes.
        gpa: u64,
        /// `a1`: byte count (≤ [`crate::CONSOLE_WRITE_MAX`]).
        len: u64,
    },
    /// `exit(code)`: end the VM.
    Exit {
        /// `a0`: the exit code (higher bits of `a0` set is [`Error::InvalidArgument`]).
        code: u32,
    },
    /// `clock_ns()`: host monotonic nanoseconds since VM creation.
    ClockNs,
    /// `idle_yield(deadline_ns)`: park until the deadline or an event (see [`crate::idle`]).
    IdleYield {
        /// `a0`: absolute deadline in `clock_ns` time.
        deadline_ns: u64,
    },
    /// `zero_hints(op, …)` (see [`crate::zero`]).
    ZeroHints(ZeroOp),
    /// `mmu_update(batch_gpa, count, flags)` (see [`crate::mmu`]).
    MmuUpdate {
        /// `a0`: guest-physical address of an array of [`mmu::MmuUpdate`].
        batch_gpa: u64,
        /// `a1`: number of entries (≤ [`mmu::MMU_UPDATE_MAX`]).
        count: u64,
        /// `a2` bit 0, [`mmu::UPDATE_DEFER_SYNC`]: postpone the host's resync. Other bits of
        /// `a2` are [`Error::InvalidArgument`].
        defer_sync: bool,
    },
    /// `mmu_pin(op, frame)` (see [`crate::mmu`]).
    MmuPin {
        /// `a0`: pin or unpin.
        op: PinOp,
        /// `a1`: guest-physical address of the root frame.
        frame: u64,
    },
}

/// The operations of `zero_hints` (its `a0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ZeroOp {
    /// [`zero::QUERY`]: write the known-zero bitmap of `count` frames from `first_frame`.
    Query {
        /// `a1`: guest-physical address of the bitmap (`count.div_ceil(8)` bytes).
        bitmap_gpa: u64,
        /// `a2`: first frame number (GPA / 4096).
        first_frame: u64,
        /// `a3`: number of frames (≤ [`zero::QUERY_MAX_FRAMES`]).
        count: u64,
    },
    /// [`zero::RELEASE`]: discard the ranges listed at `ranges_gpa`.
    Release {
        /// `a1`: guest-physical address of an array of [`zero::ZeroRange`].
        ranges_gpa: u64,
        /// `a2`: number of ranges (≤ [`zero::RELEASE_MAX_RANGES`]).
        count: u64,
    },
    /// [`zero::PREPARE`] (v1.6): back `[gpa, gpa + len)` ahead of use.
    Prepare {
        /// `a1`: first byte (page-aligned).
        gpa: u64,
        /// `a2`: length in bytes (page-aligned).
        len: u64,
    },
    /// [`zero::FREE_LIST`] (v1.8): register the guest's list of free frames (`max_ranges` = 0
    /// unregisters).
    FreeList {
        /// `a1`: guest-physical address of an array of [`zero::ZeroRange`] (16-byte aligned).
        list_gpa: u64,
        /// `a2`: number of entries (≤ [`zero::RELEASE_MAX_RANGES`]).
        max_ranges: u64,
    },
}

impl ZeroOp {
    /// The `a0` value of this operation.
    pub const fn raw(self) -> u64 {
        match self {
            ZeroOp::Query { .. } => zero::QUERY,
            ZeroOp::Release { .. } => zero::RELEASE,
            ZeroOp::Prepare { .. } => zero::PREPARE,
            ZeroOp::FreeList { .. } => zero::FREE_LIST,
        }
    }
}

/// The operations of `mmu_pin` (its `a0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
#[repr(u64)]
pub enum PinOp {
    /// [`mmu::PIN_L4`]: pin the frame as an L4 root (typing it if it is a zero frame).
    PinL4 = mmu::PIN_L4,
    /// [`mmu::UNPIN`]: drop a pin taken with [`PinOp::PinL4`].
    Unpin = mmu::UNPIN,
}

impl PinOp {
    /// The `a0` value.
    pub const fn raw(self) -> u64 {
        self as u64
    }

    /// Decodes `a0`; [`Error::InvalidArgument`] for an unknown operation.
    pub const fn from_raw(raw: u64) -> Result<PinOp, Error> {
        match raw {
            mmu::PIN_L4 => Ok(PinOp::PinL4),
            mmu::UNPIN => Ok(PinOp::Unpin),
            _ => Err(Error::InvalidArgument),
        }
    }
}

impl Request {
    /// The call this request makes.
    #[inline(always)]
    pub const fn call(&self) -> Call {
        match self {
            Request::Null { .. } => Call::Null,
            Request::Features => Call::Features,
            Request::ConsoleWrite { .. } => Call::ConsoleWrite,
            Request::Exit { .. } => Call::Exit,
            Request::ClockNs => Call::ClockNs,
            Request::IdleYield { .. } => Call::IdleYield,
            Request::ZeroHints(_) => Call::ZeroHints,
            Request::MmuUpdate { .. } => Call::MmuUpdate,
            Request::MmuPin { .. } => Call::MmuPin,
        }
    }

    /// The registers of this request: `rax` = call number, `rdi`, `rsi`, `rcx`, `r8` = `a0`–`a3`
    /// (unused ones 0).
    ///
    /// A plain `const fn` of the variant, always inlined: with the variant known at the call
    /// site (every wrapper in `guest-pv`), it compiles to the same register moves as writing
    /// them by hand, with no branch.
    #[inline(always)]
    pub const fn encode(&self) -> Regs {
        let (call, args) = match *self {
            Request::Null { echo } => (Call::Null, [echo, 0, 0, 0]),
            Request::Features => (Call::Features, [0; 4]),
            Request::ConsoleWrite { gpa, len } => (Call::ConsoleWrite, [gpa, len, 0, 0]),
            Request::Exit { code } => (Call::Exit, [code as u64, 0, 0, 0]),
            Request::ClockNs => (Call::ClockNs, [0; 4]),
            Request::IdleYield { deadline_ns } => (Call::IdleYield, [deadline_ns, 0, 0, 0]),
            Request::ZeroHints(op) => (
                Call::ZeroHints,
                match op {
                    ZeroOp::Query {
                        bitmap_gpa,
                        first_frame,
                        count,
                    } => [zero::QUERY, bitmap_gpa, first_frame, count],
                    ZeroOp::Release { ranges_gpa, count } => [zero::RELEASE, ranges_gpa, count, 0],
                    ZeroOp::Prepare { gpa, len } => [zero::PREPARE, gpa, len, 0],
                    ZeroOp::FreeList {
                        list_gpa,
                        max_ranges,
                    } => [zero::FREE_LIST, list_gpa, max_ranges, 0],
                },
            ),
            Request::MmuUpdate {
                batch_gpa,
                count,
                defer_sync,
            } => (
                Call::MmuUpdate,
                [
                    batch_gpa,
                    count,
                    if defer_sync {
                        mmu::UPDATE_DEFER_SYNC
                    } else {
                        0
                    },
                    0,
                ],
            ),
            Request::MmuPin { op, frame } => (Call::MmuPin, [op.raw(), frame, 0, 0]),
        };
        Regs {
            nr: call.raw() as u64,
            args,
        }
    }

    /// Decodes the registers of a hypercall: [`Error::UnknownCall`] for a number no ABI version
    /// defines, otherwise [`Request::decode_args`].
    pub const fn decode(regs: &Regs) -> Result<Request, Error> {
        match Call::from_raw(regs.nr) {
            Some(call) => Request::decode_args(call, &regs.args),
            None => Err(Error::UnknownCall),
        }
    }

    /// Decodes the arguments of `call`: [`Error::InvalidArgument`] for an unknown
    /// sub-operation (`zero_hints`, `mmu_pin`), an exit code above `u32::MAX`, or an
    /// `mmu_update` flag other than [`mmu::UPDATE_DEFER_SYNC`]. Registers the call does not use
    /// are ignored.
    ///
    /// Separate from [`Request::decode`] so that a host can look at the call first (count it,
    /// check its feature bit) and only then at its arguments.
    pub const fn decode_args(call: Call, args: &[u64; 4]) -> Result<Request, Error> {
        let [a0, a1, a2, a3] = *args;
        Ok(match call {
            Call::Null => Request::Null { echo: a0 },
            Call::Features => Request::Features,
            Call::ConsoleWrite => Request::ConsoleWrite { gpa: a0, len: a1 },
            Call::Exit => {
                if a0 > u32::MAX as u64 {
                    return Err(Error::InvalidArgument);
                }
                Request::Exit { code: a0 as u32 }
            }
            Call::ClockNs => Request::ClockNs,
            Call::IdleYield => Request::IdleYield { deadline_ns: a0 },
            Call::ZeroHints => Request::ZeroHints(match a0 {
                zero::QUERY => ZeroOp::Query {
                    bitmap_gpa: a1,
                    first_frame: a2,
                    count: a3,
                },
                zero::RELEASE => ZeroOp::Release {
                    ranges_gpa: a1,
                    count: a2,
                },
                zero::PREPARE => ZeroOp::Prepare { gpa: a1, len: a2 },
                zero::FREE_LIST => ZeroOp::FreeList {
                    list_gpa: a1,
                    max_ranges: a2,
                },
                _ => return Err(Error::InvalidArgument),
            }),
            Call::MmuUpdate => {
                if a2 & !mmu::UPDATE_DEFER_SYNC != 0 {
                    return Err(Error::InvalidArgument);
                }
                Request::MmuUpdate {
                    batch_gpa: a0,
                    count: a1,
                    defer_sync: a2 & mmu::UPDATE_DEFER_SYNC != 0,
                }
            }
            Call::MmuPin => match PinOp::from_raw(a0) {
                Ok(op) => Request::MmuPin { op, frame: a1 },
                Err(e) => return Err(e),
            },
        })
    }

    /// The argument registers (`a0`–`a3`) each call reads, by register name, in order: the
    /// layout of the table above, for checking documentation against the crate.
    pub const fn arg_registers(call: Call) -> &'static [&'static str] {
        match call {
            Call::Features | Call::ClockNs => &[],
            Call::Null | Call::Exit | Call::IdleYield => &["rdi"],
            Call::ConsoleWrite | Call::MmuPin => &["rdi", "rsi"],
            Call::MmuUpdate => &["rdi", "rsi", "rcx"],
            Call::ZeroHints => &["rdi", "rsi", "rcx", "r8"],
        }
    }
}

/// Every call of this ABI version, in number order.
pub const ALL_CALLS: [Call; 9] = [
    Call::Null,
    Call::Features,
    Call::ConsoleWrite,
    Call::Exit,
    Call::ClockNs,
    Call::IdleYield,
    Call::ZeroHints,
    Call::MmuUpdate,
    Call::MmuPin,
];

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;

    /// A small deterministic generator (xorshift64*), so the property tests need no dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        /// Mostly random, sometimes an edge value.
        fn value(&mut self) -> u64 {
            match self.next() % 8 {
                0 => 0,
                1 => u64::MAX,
                2 => 1 << (self.next() % 64),
                _ => self.next(),
            }
        }
    }

    fn requests(rng: &mut Rng) -> Vec<Request> {
        let v = |rng: &mut Rng| rng.value();
        std::vec![
            Request::Null { echo: v(rng) },
            Request::Features,
            Request::ConsoleWrite {
                gpa: v(rng),
                len: v(rng),
            },
            Request::Exit {
                code: v(rng) as u32,
            },
            Request::ClockNs,
            Request::IdleYield {
                deadline_ns: v(rng),
            },
            Request::ZeroHints(ZeroOp::Query {
                bitmap_gpa: v(rng),
                first_frame: v(rng),
                count: v(rng),
            }),
            Request::ZeroHints(ZeroOp::Release {
                ranges_gpa: v(rng),
                count: v(rng),
            }),
            Request::ZeroHints(ZeroOp::Prepare {
                gpa: v(rng),
                len: v(rng),
            }),
            Request::ZeroHints(ZeroOp::FreeList {
                list_gpa: v(rng),
                max_ranges: v(rng),
            }),
            Request::MmuUpdate {
                batch_gpa: v(rng),
                count: v(rng),
                defer_sync: v(rng) & 1 != 0,
            },
            Request::MmuPin {
                op: if v(rng) & 1 != 0 {
                    PinOp::PinL4
                } else {
                    PinOp::Unpin
                },
                frame: v(rng),
            },
        ]
    }

    #[test]
    fn decode_inverts_encode_for_every_variant() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut seen = Vec::new();
        for _ in 0..2000 {
            for r in requests(&mut rng) {
                let regs = r.encode();
                assert_eq!(Request::decode(&regs), Ok(r), "{regs:?}");
                assert_eq!(u64::from(r.call().raw()), regs.nr);
                // Registers a call does not read are encoded as zero.
                let used = Request::arg_registers(r.call()).len();
                assert!(regs.args[used..].iter().all(|&a| a == 0), "{r:?}");
                if !seen.contains(&r.call()) {
                    seen.push(r.call());
                }
            }
        }
        assert_eq!(seen, ALL_CALLS, "the generator covers every call");
    }

    #[test]
    fn unused_registers_are_ignored() {
        let mut rng = Rng(7);
        for _ in 0..1000 {
            for r in requests(&mut rng) {
                let mut regs = r.encode();
                let used = Request::arg_registers(r.call()).len();
                for a in &mut regs.args[used..] {
                    *a = rng.next();
                }
                assert_eq!(Request::decode(&regs), Ok(r));
            }
        }
    }

    #[test]
    fn malformed_registers_get_the_host_s_error_codes() {
        let regs = |call: Call, args: [u64; 4]| Regs {
            nr: u64::from(call.raw()),
            args,
        };
        for nr in [5, 15, 20, 1000, 1 << 32, u64::MAX] {
            assert_eq!(
                Request::decode(&Regs { nr, args: [0; 4] }),
                Err(Error::UnknownCall)
            );
        }
        for (call, args) in [
            (Call::Exit, [1 << 32, 0, 0, 0]),
            (Call::Exit, [u64::MAX, 0, 0, 0]),
            (Call::ZeroHints, [0, 0, 0, 0]),
            (Call::ZeroHints, [5, 0, 0, 0]),
            (Call::ZeroHints, [99, 0, 0, 0]),
            (Call::MmuUpdate, [0, 0, 2, 0]),
            (Call::MmuUpdate, [0, 0, u64::MAX, 0]),
            (Call::MmuPin, [0, 0, 0, 0]),
            (Call::MmuPin, [3, 0, 0, 0]),
            (Call::MmuPin, [9, 0, 0, 0]),
        ] {
            assert_eq!(
                Request::decode(&regs(call, args)),
                Err(Error::InvalidArgument),
                "{call:?} {args:?}"
            );
        }
        assert_eq!(
            Request::decode(&regs(Call::Exit, [u64::from(u32::MAX), 0, 0, 0])),
            Ok(Request::Exit { code: u32::MAX })
        );
    }

    #[test]
    fn all_calls_is_complete_and_ordered() {
        for raw in 0..=64 {
            if let Some(call) = Call::from_raw(raw) {
                assert!(ALL_CALLS.contains(&call), "{call:?}");
            }
        }
        assert!(ALL_CALLS.windows(2).all(|w| w[0].raw() < w[1].raw()));
        assert_eq!(PinOp::PinL4.raw(), mmu::PIN_L4);
        assert_eq!(PinOp::Unpin.raw(), mmu::UNPIN);
    }
}
