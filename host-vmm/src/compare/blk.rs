//! The `blk` comparison: a scratch disk image, the guest's runs over virtio-blk, and the host's
//! own read of the same (cached) file in the same process as the ceiling.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::error::{Error, Result};

/// A disk image in the temporary directory, filled with deterministic bytes, removed on drop.
#[derive(Debug)]
pub struct ScratchImage {
    path: PathBuf,
}

impl ScratchImage {
    /// Creates an image of `mib` MiB.
    pub fn create(mib: u64) -> Result<ScratchImage> {
        let path = std::env::temp_dir().join(format!("pvkit-blk-{}.img", std::process::id()));
        let io = |source| Error::Io {
            what: format!("cannot create scratch image {}", path.display()),
            source,
        };
        let mut f = std::fs::File::create(&path).map_err(io)?;
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut chunk = vec![0u8; 1 << 20];
        for _ in 0..mib {
            for b in chunk.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b.copy_from_slice(&x.to_le_bytes());
            }
            f.write_all(&chunk).map_err(io)?;
        }
        f.sync_all().map_err(io)?;
        Ok(ScratchImage { path })
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Reads the first `bytes` of `path` in `request` -sized reads, once to warm the page cache
/// and once timed. Returns (wall ns of the timed pass, bytes read).
pub fn host_read(path: &Path, bytes: u64, request: usize) -> Result<(u64, u64)> {
    let io = |source| Error::Io {
        what: format!("host read of {}", path.display()),
        source,
    };
    let mut buf = vec![0u8; request.max(1)];
    let mut pass = || -> Result<u64> {
        let mut f = std::fs::File::open(path).map_err(io)?.take(bytes);
        let mut total = 0u64;
        loop {
            let n = f.read(&mut buf).map_err(io)?;
            if n == 0 {
                return Ok(total);
            }
            total += n as u64;
        }
    };
    pass()?;
    let t0 = Instant::now();
    let total = pass()?;
    Ok((t0.elapsed().as_nanos() as u64, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_image_is_deterministic_and_readable() {
        let a = ScratchImage::create(1).unwrap();
        let first = std::fs::read(a.path()).unwrap();
        drop(a);
        let b = ScratchImage::create(1).unwrap();
        assert_eq!(std::fs::read(b.path()).unwrap(), first);
        let (ns, n) = host_read(b.path(), 1 << 20, 128 << 10).unwrap();
        assert_eq!(n, 1 << 20);
        assert!(ns > 0);
        let path = b.path().to_path_buf();
        drop(b);
        assert!(!path.exists());
    }
}
