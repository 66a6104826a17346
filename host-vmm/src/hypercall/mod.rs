//! Hypercall dispatch: decode the registers into a typed [`Request`]
//! (`hypercall_abi::request`, the one definition of every call's registers), run its handler,
//! produce the return registers.
//!
//! Handlers take guest memory and arguments, never a vCPU, so they are unit-tested without KVM.
//! A malformed call gets an error code; nothing a guest passes can make the host panic or
//! touch memory outside guest RAM.

pub mod clock;
pub mod console;
pub mod idle;
pub mod mmu;
pub mod zero;

use hypercall_abi::request::Request;
use hypercall_abi::{Call, Error as AbiError, Regs, Return, features};

use crate::console::ConsoleSink;
use crate::devices::event::EventQueue;
use crate::free_report::FreeReport;
use crate::memory::GuestRam;
use crate::metrics::ExitStats;
use crate::mmu::PageTablePool;

/// Everything this VMM implements. What a VM advertises ([`host_features`]) can be less.
pub const HOST_FEATURES: u64 = features::V1_8;

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
    pub pool: &'a mut PageTablePool,
    /// The VM's pending events.
    pub events: &'a mut EventQueue,
    /// RAM below this (boot structures, stack, kernel image) cannot be released.
    pub protected_end: u64,
    /// The guest's free-list registration (`zero_hints(FREE_LIST)`).
    pub free_report: &'a mut FreeReport,
    /// The feature bits this VM advertises ([`host_features`]).
    pub features: u64,
}

/// The result of a hypercall.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Resume the guest with these return registers.
    Return(Return),
    /// A stop or pause request cut a host-side wait short (`idle_yield`): the call is not
    /// done and nothing is returned; [`service`] it again once the vCPU resumes.
    Interrupted(Request),
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
    // Only now the arguments: a malformed call whose feature is off is `NOT_IMPLEMENTED`.
    match Request::decode_args(call, &regs.args) {
        Ok(request) => service(ctx, request, stats),
        Err(e) => Outcome::Return(Return::err(e)),
    }
}

/// Services a decoded, counted, permitted request; also how a call that came back
/// [`Outcome::Interrupted`] goes on after the pause (it is counted once).
pub fn service(ctx: &mut Context<'_>, request: Request, stats: &mut ExitStats) -> Outcome {
    let ret = match request {
        Request::Null { echo } => Return::ok(echo),
        Request::Features => Return::ok(ctx.features),
        Request::ConsoleWrite { gpa, len } => console::write(ctx.ram, ctx.console, gpa, len),
        Request::Exit { code } => return Outcome::Exit(code),
        Request::ClockNs => Return::ok(ctx.clock.now_ns()),
        Request::IdleYield { deadline_ns } => {
            match idle::idle_yield(ctx.clock, ctx.events, deadline_ns) {
                Some(ret) => ret,
                None => return Outcome::Interrupted(request),
            }
        }
        Request::ZeroHints(op) => zero::zero_hints(ctx, op, stats),
        Request::MmuUpdate {
            batch_gpa,
            count,
            defer_sync,
        } => mmu::update(ctx.ram, ctx.pool, batch_gpa, count, defer_sync, stats),
        Request::MmuPin { op, frame } => mmu::pin(ctx.pool, op, frame),
        _ => Return::err(AbiError::NotImplemented),
    };
    Outcome::Return(ret)
}

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;

    fn with_ctx<R>(f: impl FnOnce(&mut Context<'_>) -> R) -> R {
        let ram = GuestRam::new(16 << 20).unwrap();
        let console = ConsoleSink::new(None);
        let clock = clock::Clock::new();
        let mut pool = PageTablePool::new(16 << 20).unwrap();
        let mut events = EventQueue::default();
        let mut free_report = FreeReport::new(0x40_0000);
        let mut ctx = Context {
            ram: &ram,
            console: &console,
            clock: &clock,
            pool: &mut pool,
            events: &mut events,
            protected_end: 0x40_0000,
            free_report: &mut free_report,
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
    fn malformed_arguments_are_invalid_unless_the_call_is_off() {
        let invalid = Outcome::Return(Return::err(AbiError::InvalidArgument));
        with_ctx(|ctx| {
            let mmu_update = u64::from(Call::MmuUpdate.raw());
            let mmu_pin = u64::from(Call::MmuPin.raw());
            // Unknown flags and operations, before any other check.
            assert_eq!(call(ctx, mmu_update, [0, 0, 2, 0]), invalid);
            assert_eq!(call(ctx, mmu_update, [u64::MAX, u64::MAX, 3, 0]), invalid);
            assert_eq!(call(ctx, mmu_pin, [9, 0, 0, 0]), invalid);
            assert_eq!(call(ctx, mmu_pin, [0, 0, 0, 0]), invalid);
            // A call whose feature bit is clear is not serviced, well-formed or not.
            ctx.features &= !features::MMU_UPDATE;
            let off = Outcome::Return(Return::err(AbiError::NotImplemented));
            assert_eq!(call(ctx, mmu_pin, [9, 0, 0, 0]), off);
            assert_eq!(call(ctx, mmu_update, [0, 0, 2, 0]), off);
            assert_eq!(call(ctx, mmu_update, [0, 0, 0, 0]), off);
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
