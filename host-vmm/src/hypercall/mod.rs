//! Hypercall dispatch: decode the call number, run its handler, produce the return registers.
//!
//! Handlers take guest memory and arguments, never a vCPU, so they are unit-tested without KVM.
//! A malformed call gets an error code; nothing a guest passes can make the host panic or
//! touch memory outside guest RAM.

pub mod clock;
pub mod console;
pub mod idle;
pub mod mmu;
pub mod zero;

use hypercall_abi::{Call, Error as AbiError, Regs, Return, features};

use crate::console::ConsoleSink;
use crate::devices::event::EventQueue;
use crate::memory::GuestRam;
use crate::metrics::ExitStats;
use crate::mmu::PtPool;

/// Everything this VMM implements. What a VM advertises ([`host_features`]) can be less.
pub const HOST_FEATURES: u64 = features::V1_7;

/// What a VM advertises in CPUID and by `features`: [`HOST_FEATURES`] without `TSC_KHZ` when
/// the TSC rate is unknown (`tsc_khz` = 0) and without `ZERO_PREPARE` when the host kernel
/// cannot populate memory without touching it.
pub fn host_features(tsc_khz: u32) -> u64 {
    let mut bits = HOST_FEATURES;
    if tsc_khz == 0 {
        bits &= !features::TSC_KHZ;
    }
    if !crate::prepare::supported() {
        bits &= !features::ZERO_PREPARE;
    }
    bits
}

/// What the guest can reach from a hypercall.
#[derive(Debug)]
pub struct Context<'a> {
    /// Guest RAM (bounds-checked accessors only).
    pub ram: &'a GuestRam,
    /// The console sink.
    pub console: &'a ConsoleSink,
    /// The guest clock.
    pub clock: &'a clock::Clock,
    /// The page-table pool.
    pub pool: &'a mut PtPool,
    /// The VM's pending events.
    pub events: &'a mut EventQueue,
    /// RAM below this (boot structures, stack, kernel image) cannot be released.
    pub protected_end: u64,
    /// The feature bits this VM advertises ([`host_features`]).
    pub features: u64,
}

/// The result of a hypercall.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Resume the guest with these return registers.
    Return(Return),
    /// The guest exits with this code.
    Exit(u32),
}

/// Runs one hypercall and counts it.
pub fn dispatch(ctx: &mut Context<'_>, regs: &Regs, stats: &mut ExitStats) -> Outcome {
    let Some(call) = Call::from_raw(regs.nr) else {
        stats.record_hypercall("invalid");
        return Outcome::Return(Return::err(AbiError::UnknownCall));
    };
    stats.record_hypercall(call.name());
    // A call whose feature bit this VM clears (`--disable`, or a host that cannot service it)
    // is not serviced: the guest must have checked the bit (ABI §3).
    if let Some(bit) = hypercall_abi::call_feature(call)
        && ctx.features & bit == 0
    {
        return Outcome::Return(Return::err(AbiError::NotImplemented));
    }
    let [a0, a1, ..] = regs.args;
    let ret = match call {
        Call::Null => Return::ok(a0),
        Call::Features => Return::ok(ctx.features),
        Call::ConsoleWrite => console::write(ctx.ram, ctx.console, a0, a1),
        Call::Exit => return exit(a0),
        Call::ClockNs => Return::ok(ctx.clock.now_ns()),
        Call::IdleYield => idle::idle_yield(ctx.clock, ctx.events, a0),
        Call::ZeroHints => zero::zero_hints(ctx.ram, ctx.protected_end, regs.args, stats),
        Call::MmuUpdate => mmu::update(ctx.ram, ctx.pool, regs.args, stats),
        Call::MmuPin => mmu::pin(ctx.pool, a0, a1),
        _ => Return::err(AbiError::NotImplemented),
    };
    Outcome::Return(ret)
}

/// `exit(code)`: the code is a `u32`; higher bits set is a malformed call.
fn exit(a0: u64) -> Outcome {
    match u32::try_from(a0) {
        Ok(code) => Outcome::Exit(code),
        Err(_) => Outcome::Return(Return::err(AbiError::InvalidArgument)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_ctx<R>(f: impl FnOnce(&mut Context<'_>) -> R) -> R {
        let ram = GuestRam::new(16 << 20).unwrap();
        let console = ConsoleSink::new(None);
        let clock = clock::Clock::new();
        let mut pool = PtPool::new(16 << 20).unwrap();
        let mut events = EventQueue::default();
        let mut ctx = Context {
            ram: &ram,
            console: &console,
            clock: &clock,
            pool: &mut pool,
            events: &mut events,
            protected_end: 0x40_0000,
            features: host_features(1),
        };
        f(&mut ctx)
    }

    fn call(ctx: &mut Context<'_>, nr: u64, args: [u64; 4]) -> Outcome {
        dispatch(ctx, &Regs { nr, args }, &mut ExitStats::default())
    }

    #[test]
    fn null_echoes_and_features_report_v1() {
        with_ctx(|ctx| {
            assert_eq!(call(ctx, 0, [42, 0, 0, 0]), Outcome::Return(Return::ok(42)));
            assert_eq!(
                call(ctx, 1, [0; 4]),
                Outcome::Return(Return::ok(host_features(1)))
            );
            assert_eq!(host_features(1) & features::V1_3, features::V1_3);
            assert_eq!(host_features(0) & features::TSC_KHZ, 0);
        });
    }

    #[test]
    fn unknown_and_reserved_calls_return_errors() {
        with_ctx(|ctx| {
            for nr in [5, 15, 1000, u64::MAX] {
                assert_eq!(
                    call(ctx, nr, [0; 4]),
                    Outcome::Return(Return::err(AbiError::UnknownCall))
                );
            }
            // zero_hints with an unknown operation.
            assert_eq!(
                call(ctx, 17, [0; 4]),
                Outcome::Return(Return::err(AbiError::InvalidArgument))
            );
        });
    }

    #[test]
    fn exit_takes_a_u32() {
        with_ctx(|ctx| {
            assert_eq!(call(ctx, 3, [7, 0, 0, 0]), Outcome::Exit(7));
            assert_eq!(
                call(ctx, 3, [1 << 32, 0, 0, 0]),
                Outcome::Return(Return::err(AbiError::InvalidArgument))
            );
        });
    }

    #[test]
    fn dispatch_counts_by_name() {
        with_ctx(|ctx| {
            let mut s = ExitStats::default();
            dispatch(
                ctx,
                &Regs {
                    nr: 0,
                    args: [0; 4],
                },
                &mut s,
            );
            dispatch(
                ctx,
                &Regs {
                    nr: 99,
                    args: [0; 4],
                },
                &mut s,
            );
            assert_eq!(s.by_hypercall["null"], 1);
            assert_eq!(s.by_hypercall["invalid"], 1);
        });
    }
}
