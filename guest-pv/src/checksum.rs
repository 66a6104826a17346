//! FNV-1a (64-bit): the checksum every workload folds its observable result into, so that the PV
//! and trapped runs of a workload can be compared (and the host can recompute it).

/// FNV-1a 64-bit offset basis (the hash of no bytes).
pub const FNV1A_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
/// FNV-1a 64-bit prime.
pub const FNV1A_PRIME: u64 = 0x0000_0100_0000_01b3;

/// An incremental FNV-1a 64-bit hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fnv1a {
    state: u64,
}

impl Fnv1a {
    /// A hash of no bytes yet.
    pub const fn new() -> Fnv1a {
        Fnv1a {
            state: FNV1A_OFFSET,
        }
    }

    /// Folds in one byte.
    pub const fn write_u8(&mut self, byte: u8) {
        self.state = (self.state ^ byte as u64).wrapping_mul(FNV1A_PRIME);
    }

    /// Folds in `bytes`, in order.
    pub const fn write(&mut self, bytes: &[u8]) {
        let mut i = 0;
        while i < bytes.len() {
            self.write_u8(bytes[i]);
            i += 1;
        }
    }

    /// Folds in the 8 little-endian bytes of `v`.
    pub const fn write_u64(&mut self, v: u64) {
        self.write(&v.to_le_bytes());
    }

    /// The hash of everything written so far.
    pub const fn finish(&self) -> u64 {
        self.state
    }

    /// The hash of `bytes`.
    pub const fn hash(bytes: &[u8]) -> u64 {
        let mut h = Fnv1a::new();
        h.write(bytes);
        h.finish()
    }
}

impl Default for Fnv1a {
    fn default() -> Fnv1a {
        Fnv1a::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vectors() {
        assert_eq!(Fnv1a::hash(b""), 0xcbf29ce484222325);
        assert_eq!(Fnv1a::hash(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(Fnv1a::hash(b"foobar"), 0x85944171f73967e8);
    }

    #[test]
    fn incremental_equals_one_shot() {
        let mut h = Fnv1a::new();
        h.write(b"foo");
        h.write(b"");
        h.write_u8(b'b');
        h.write(b"ar");
        assert_eq!(h.finish(), Fnv1a::hash(b"foobar"));
        assert_eq!(Fnv1a::default().finish(), FNV1A_OFFSET);
    }

    #[test]
    fn write_u64_is_little_endian() {
        let mut a = Fnv1a::new();
        a.write_u64(0x0102_0304_0506_0708);
        assert_eq!(a.finish(), Fnv1a::hash(&[8, 7, 6, 5, 4, 3, 2, 1]));
    }
}
