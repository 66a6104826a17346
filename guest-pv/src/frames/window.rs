//! [`Window`]: the frames the last `zero_hints(QUERY)` answered for.

use hypercall_abi::zero::{QUERY_MAX_FRAMES, bit};

/// Frames `first .. first + len` (allocator indices) whose known-zero bits are in the query
/// bitmap (bit `i - first` for frame `i`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct Window {
    pub(super) first: u64,
    pub(super) len: u64,
}

impl Window {
    /// No frame.
    pub(super) const EMPTY: Window = Window { first: 0, len: 0 };

    /// The window a query for frame `i` covers, in an allocator of `frames` frames: from `i` up
    /// to [`QUERY_MAX_FRAMES`] frames, cut at the end. Starting at `i` (the bump pointer) keeps
    /// frames already handed out out of it: a handed-out frame the caller has not written yet
    /// reads as zero to the host, but is no longer the allocator's to call zero.
    pub(super) fn at(i: u64, frames: u64) -> Window {
        Window {
            first: i,
            len: frames.saturating_sub(i).min(QUERY_MAX_FRAMES),
        }
    }

    /// True if frame `i` is in the window.
    pub(super) const fn contains(&self, i: u64) -> bool {
        i >= self.first && i - self.first < self.len
    }

    /// Bytes of bitmap the window needs.
    pub(super) const fn bitmap_bytes(&self) -> usize {
        self.len.div_ceil(8) as usize
    }

    /// True if `bitmap` (the answer for this window) marks frame `i` known zero; false outside
    /// the window.
    pub(super) fn is_zero(&self, bitmap: &[u8], i: u64) -> bool {
        self.contains(i) && bit(bitmap, (i - self.first) as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_start_at_the_frame_and_stop_at_the_end() {
        assert_eq!(
            Window::at(0, 100_000),
            Window {
                first: 0,
                len: 32768
            }
        );
        assert_eq!(
            Window::at(90_000, 100_000),
            Window {
                first: 90_000,
                len: 10_000
            }
        );
        assert_eq!(Window::at(5, 5).len, 0);
        assert_eq!(Window::at(7, 5).len, 0);
        let w = Window::at(10, 13);
        assert!(!w.contains(9) && w.contains(10) && w.contains(12) && !w.contains(13));
        assert_eq!(w.bitmap_bytes(), 1);
        assert_eq!(Window::at(0, 9).bitmap_bytes(), 2);
        assert!(!Window::EMPTY.contains(0));
    }

    #[test]
    fn bits_are_relative_to_the_window() {
        let w = Window::at(100, 200);
        // Frames 100 and 102 and 115 known zero.
        let bm = [0b0000_0101u8, 0b1000_0000];
        assert!(w.is_zero(&bm, 100));
        assert!(!w.is_zero(&bm, 101));
        assert!(w.is_zero(&bm, 102));
        assert!(w.is_zero(&bm, 115));
        assert!(!w.is_zero(&bm, 116));
        // Outside the window, even where the bitmap has a bit.
        assert!(!w.is_zero(&bm, 99));
        assert!(!Window::at(0, 1).is_zero(&[0xff], 1));
    }
}
