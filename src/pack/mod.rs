//! The package stage: turning a finished, unmounted filesystem image into what lands in the
//! output directory.
//!
//! [`shrink`] cuts an ext2/3/4 image down to its content, [`rewrite`] writes a reproducible
//! build's filesystems afresh from their trees, [`compress`] writes the container in
//! one read pass, and [`digest`] supplies the size, MD5 and SHA-256 of both sides.
//! [`pack_image`] is `debimg pack`: one image file packaged as a build would.

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

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;

use crate::error::Error;

/// `debimg pack`: `--output` written from the image as the package stage writes a container,
/// the rate logged and the digests of both sides printed on stdout as YAML.
pub fn pack_image(args: &PackArgs) -> Result<(), Error> {
    let t = Instant::now();
    let p = pack(&args.image, args.container, &args.output)
        .with_context(|| format!("packaging {}", args.image.display()))?;
    tracing::info!(
        "{} MiB in {:.2}s ({:.0} MB/s)",
        p.raw.size >> 20,
        t.elapsed().as_secs_f64(),
        p.raw.size as f64 / 1e6 / t.elapsed().as_secs_f64().max(1e-9)
    );
    println!(
        "raw_size: {}\nraw_md5: {}\nraw_sha256: {}\ncontainer_size: {}\ncontainer_md5: {}\ncontainer_sha256: {}",
        p.raw.size, p.raw.md5, p.raw.sha256, p.container.size, p.container.md5, p.container.sha256
    );
    Ok(())
}

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

/// The arguments of `debimg pack`.
#[derive(clap::Args)]
pub struct PackArgs {
    /// The raw image file.
    pub image: PathBuf,
    /// Where the container goes (must not exist).
    #[arg(short, long)]
    pub output: PathBuf,
    /// gzip (default) or raw.
    #[arg(long, value_enum, default_value = "gzip")]
    pub container: Container,
}
