//! The two things the allocator does to a frame's contents: zero it, and (check mode) verify
//! that it reads as zero.

use core::arch::asm;

use hypercall_abi::layout::PAGE_SIZE;

/// `u64` words in a frame.
const WORDS: usize = (PAGE_SIZE / 8) as usize;

/// Zeroes the 4 KiB frame at `addr` with one `rep stosq`.
///
/// An asm block rather than `write_bytes`: the compiler cannot drop it as a dead store when the
/// caller overwrites the frame right after (which is exactly what a benchmark of zeroing does),
/// and it is the CPU's fast string store whatever the target's `memset` is.
///
/// # Safety
/// `addr` must be the page-aligned address of a frame the caller owns exclusively (no
/// reference into it), mapped writable at that virtual address.
#[inline]
pub(super) unsafe fn zero_frame(addr: u64) {
    // SAFETY: the caller guarantees the 4096 bytes at `addr` are mapped, writable and used by
    // nothing else. `rep stosq` stores `rcx` = 512 zero qwords from `rdi` upwards (DF is clear,
    // as the ABI guarantees at every asm block), and changes no flags.
    unsafe {
        asm!(
            "rep stosq",
            inout("rdi") addr => _,
            inout("rcx") WORDS as u64 => _,
            in("rax") 0u64,
            options(nostack, preserves_flags),
        );
    }
}

/// The first non-zero `u64` of the frame at `addr`: `(byte offset, value)`, or `None` if the
/// whole frame reads as zero.
///
/// # Safety
/// `addr` must be the page-aligned address of a frame mapped readable at that virtual address
/// that nothing writes concurrently (the allocator owns it).
pub(super) unsafe fn first_nonzero(addr: u64) -> Option<(u64, u64)> {
    let frame = core::ptr::with_exposed_provenance::<[u64; WORDS]>(addr as usize);
    // SAFETY: the caller guarantees a mapped, page-aligned (so `u64`-aligned) frame that
    // nothing writes; every bit pattern is a valid `u64`.
    let words = unsafe { &*frame };
    if words.iter().fold(0, |acc, &w| acc | w) == 0 {
        return None;
    }
    words
        .iter()
        .position(|&w| w != 0)
        .map(|i| (i as u64 * 8, words[i]))
}
