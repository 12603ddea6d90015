//! Content digests of images and their containers: size, MD5 and SHA-256 in one pass.
//!
//! The metadata written next to each image carries these for both the raw filesystem and the
//! container (for instance the `.gz`), so a deploy agent can check either without unpacking.
//! Everything here streams: memory use does not depend on the size of what is hashed.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;

use anyhow::{Context, Result};
use md5::Md5;
use sha2::{Digest, Sha256};

/// Read size for streaming files: measured faster than 1 MiB reads for md-5 and sha2 here.
pub const CHUNK_SIZE: usize = 128 * 1024;

/// Size and lowercase-hex digests of a byte stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digests {
    /// Number of bytes hashed.
    pub size: u64,
    /// MD5, lowercase hex (32 characters).
    pub md5: String,
    /// SHA-256, lowercase hex (64 characters).
    pub sha256: String,
}

/// Incremental MD5 + SHA-256 + byte count.
#[derive(Clone, Default)]
pub struct Hasher {
    md5: Md5,
    sha256: Sha256,
    size: u64,
}

impl Hasher {
    /// A hasher that has seen no bytes.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds `data` to every digest.
    pub fn update(&mut self, data: &[u8]) {
        self.md5.update(data);
        self.sha256.update(data);
        self.size += data.len() as u64;
    }

    /// Bytes seen so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Consumes the hasher and returns the digests of everything fed to it.
    pub fn finish(self) -> Digests {
        Digests {
            size: self.size,
            md5: hex(&self.md5.finalize()),
            sha256: hex(&self.sha256.finalize()),
        }
    }
}

/// A writer that hashes and counts every byte the inner writer accepts.
///
/// Only bytes the inner writer reports as written are hashed, so short writes and errors leave
/// the digests consistent with what actually reached it.
pub struct HashingWriter<W: Write> {
    inner: W,
    hasher: Hasher,
}

impl<W: Write> HashingWriter<W> {
    /// Wraps `inner`; nothing has been hashed yet.
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Hasher::new(),
        }
    }

    /// The wrapped writer.
    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    /// Bytes written through so far.
    pub fn size(&self) -> u64 {
        self.hasher.size()
    }

    /// Returns the inner writer (not flushed) and the digests of everything written through.
    pub fn finish(self) -> (W, Digests) {
        (self.inner, self.hasher.finish())
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Digests of the file at `path`, read in [`CHUNK_SIZE`] chunks.
pub fn digest_file(path: &Path) -> Result<Digests> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    digest_reader(file).with_context(|| format!("reading {}", path.display()))
}

/// Digests of everything `reader` yields, read in [`CHUNK_SIZE`] chunks.
pub fn digest_reader(mut reader: impl std::io::Read) -> std::io::Result<Digests> {
    let mut hasher = Hasher::new();
    let mut buf = vec![0u8; CHUNK_SIZE];
    loop {
        let n = read_full(&mut reader, &mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finish())
}

/// Fills `buf` unless the end of the stream comes first; returns how many bytes were read.
///
/// Chunks then always start at multiples of the buffer size, which the sparse copy relies on to
/// recognise whole zero chunks.
pub(crate) fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Lowercase hex of a byte string.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        // Writing to a String cannot fail.
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    const EMPTY_MD5: &str = "d41d8cd98f00b204e9800998ecf8427e";
    const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    /// Bytes that are not all alike and span several chunks with a partial tail.
    fn sample(len: usize) -> Vec<u8> {
        let mut x: u32 = 0x1234_5678;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x >> 24) as u8
            })
            .collect()
    }

    /// The first word of a `md5sum`/`sha256sum` line for `path`.
    fn coreutils_sum(tool: &str, path: &Path) -> String {
        let out = Command::new(tool).arg(path).output().expect(tool);
        assert!(out.status.success(), "{tool} failed");
        String::from_utf8(out.stdout)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    }

    #[test]
    fn empty_input_has_the_well_known_digests() {
        let d = Hasher::new().finish();
        assert_eq!(d.size, 0);
        assert_eq!(d.md5, EMPTY_MD5);
        assert_eq!(d.sha256, EMPTY_SHA256);
    }

    #[test]
    fn known_vector() {
        let mut h = Hasher::new();
        h.update(b"abc");
        let d = h.finish();
        assert_eq!(d.md5, "900150983cd24fb0d6963f7d28e17f72");
        assert_eq!(
            d.sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn split_updates_equal_one_update() {
        let data = sample(300_001);
        let mut whole = Hasher::new();
        whole.update(&data);
        let mut parts = Hasher::new();
        for piece in data.chunks(7919) {
            parts.update(piece);
        }
        assert_eq!(whole.finish(), parts.finish());
    }

    #[test]
    fn hashing_writer_passes_bytes_through_and_hashes_them() {
        let data = sample(200_000);
        let mut w = HashingWriter::new(Vec::new());
        for piece in data.chunks(4096) {
            w.write_all(piece).unwrap();
        }
        let (inner, d) = w.finish();
        assert_eq!(inner, data);
        let mut h = Hasher::new();
        h.update(&data);
        assert_eq!(d, h.finish());
    }

    #[test]
    fn digest_file_matches_coreutils() {
        let dir = tempfile::tempdir().unwrap();
        // Three full chunks and a partial one.
        let path = dir.path().join("data");
        std::fs::write(&path, sample(3 * CHUNK_SIZE + 12_345)).unwrap();
        let d = digest_file(&path).unwrap();
        assert_eq!(d.size, (3 * CHUNK_SIZE + 12_345) as u64);
        assert_eq!(d.md5, coreutils_sum("md5sum", &path));
        assert_eq!(d.sha256, coreutils_sum("sha256sum", &path));

        let empty = dir.path().join("empty");
        std::fs::write(&empty, b"").unwrap();
        let d = digest_file(&empty).unwrap();
        assert_eq!((d.size, d.md5.as_str()), (0, EMPTY_MD5));
    }

    #[test]
    fn digest_file_names_the_missing_file() {
        let err = digest_file(Path::new("/nonexistent/debimg-image")).unwrap_err();
        assert!(format!("{err:#}").contains("/nonexistent/debimg-image"));
    }
}
