//! The package stage: turning a finished, unmounted filesystem image into what lands in the
//! output directory.
//!
//! [`shrink`] cuts an ext2/3/4 image down to its content, [`rewrite`] writes a reproducible
//! build's filesystems afresh from their trees, [`compress`] writes the container in
//! one read pass, and [`digest`] supplies the size, MD5 and SHA-256 of both sides.

pub mod compress;
pub mod deflate;
pub mod digest;
pub mod package;
pub mod qcow2;
pub mod rewrite;
pub mod shrink;

pub use compress::{Container, Packed, pack};
pub use digest::{Digests, digest_file};
pub use shrink::{Ext2Info, ext_info, set_ext_journal, shrink_ext};

/// Deterministic noise for tests: `n` bytes of a xorshift32 stream from `seed` (kept in it).
#[cfg(test)]
pub(crate) fn test_noise(seed: &mut u32, n: usize) -> Vec<u8> {
    (0..n)
        .map(|_| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 17;
            *seed ^= *seed << 5;
            *seed as u8
        })
        .collect()
}
