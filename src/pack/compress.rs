//! Packing a finished image into its container in one read pass, with digests of both sides.
//!
//! The image is read once, in [`CHUNK_SIZE`] chunks; each chunk feeds the raw digests and then
//! the container writer, whose output is hashed on its way to the destination file. Memory stays
//! flat whatever the image size.
//!
//! Gzip output is a single standard gzip member made of independent pieces: the input is cut
//! into 1 MiB blocks, each deflated whole by libdeflate (level 4: the size zlib-rs gave at
//! level 6, at 1.9 times its speed; `bench/deflate` compares them), every piece but the last
//! turned into a non-final, byte-aligned part of one deflate stream ([`super::deflate`]); the
//! CRC-32s of the blocks are combined for the trailer. Blocks are deflated on all CPUs. Block
//! boundaries, level and header never depend on the thread count or the clock, so the same
//! image gives the same `.gz` bytes on every run and every machine.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Mutex;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread;

use anyhow::{Context, Result, anyhow};
use flate2::Crc;

use super::digest::{CHUNK_SIZE, Digests, Hasher, HashingWriter, read_full};

/// libdeflate's level: 4 gives what zlib's level 6 (gzip's default) gave on the reference image
/// (a little smaller) at 1.9 times zlib-rs's speed per core, and within 1% of `gzip -6`'s size
/// (`bench/deflate`, docs/benchmarks.md).
const GZIP_LEVEL: i32 = 3;
/// Input bytes deflated per block. Fixed: it shapes the output bytes.
const GZIP_BLOCK: usize = 1 << 20;
/// Gzip header: deflate, no flags, mtime 0 (reproducible), no extra flags, OS "Unix" as gzip.
const GZIP_HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3];
/// Blocks handed to the pool per thread before the oldest result is waited for.
const IN_FLIGHT_PER_THREAD: usize = 2;

/// How an image is stored in the output directory: the spec's own type.
pub use crate::spec::Container;

/// Digests of the image as read and of the container file as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packed {
    /// The uncompressed image.
    pub raw: Digests,
    /// The bytes of the destination file (equal to `raw` for [`Container::Raw`]).
    pub container: Digests,
}

/// Threads [`pack`] deflates on: one per available CPU.
pub fn default_threads() -> usize {
    thread::available_parallelism().map_or(1, |n| n.get())
}

/// Packs `image` into a new file `dest` (which must not exist), using every CPU for gzip.
///
/// `dest` is fsynced before this returns; on error a partial `dest` is removed.
pub fn pack(image: &Path, container: Container, dest: &Path) -> Result<Packed> {
    pack_with_threads(image, container, dest, default_threads())
}

/// [`pack`] with an explicit number of deflate threads (`1` deflates on the calling thread).
///
/// The output bytes do not depend on `threads`.
pub fn pack_with_threads(
    image: &Path,
    container: Container,
    dest: &Path,
    threads: usize,
) -> Result<Packed> {
    let context = || format!("packing {} into {}", image.display(), dest.display());
    let src = File::open(image)
        .with_context(|| format!("opening {}", image.display()))
        .with_context(context)?;
    // create_new (O_EXCL): never clobber an existing file nor write through a link planted at
    // `dest`, and only ever remove a file we created.
    let out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dest)
        .with_context(|| format!("creating {}", dest.display()))
        .with_context(context)?;
    let result = match container {
        Container::Gzip => pack_gzip(src, image, out, dest, threads.max(1)),
        Container::Raw => pack_raw(src, image, out, dest),
    };
    result.with_context(context).inspect_err(|_| {
        if let Err(e) = fs::remove_file(dest) {
            tracing::warn!("removing partial {}: {e}", dest.display());
        }
    })
}

/// [`pack`] into `out`, a new empty file the caller created (with `O_EXCL`, as
/// [`crate::output::OutputDir::create_temp`] does) and calls `dest` in messages: for an output
/// directory others may write to, where a path could be swapped for a link before it is opened.
/// `out` is fsynced before this returns; on error the caller removes it.
pub fn pack_into(image: &Path, container: Container, out: File, dest: &Path) -> Result<Packed> {
    let context = || format!("packing {} into {}", image.display(), dest.display());
    let src = File::open(image)
        .with_context(|| format!("opening {}", image.display()))
        .with_context(context)?;
    match container {
        Container::Gzip => pack_gzip(src, image, out, dest, default_threads()),
        Container::Raw => pack_raw(src, image, out, dest),
    }
    .with_context(context)
}

/// Reads `src` to the end in [`CHUNK_SIZE`] chunks, feeding each to the raw digests and then to
/// `sink`; returns the raw digests. Holes (SEEK_HOLE) are fed as zeros without reading them,
/// and a signal stops the loop between chunks.
fn read_chunks(
    mut src: File,
    image: &Path,
    mut sink: impl FnMut(&[u8]) -> Result<()>,
) -> Result<Digests> {
    use std::io::{Seek, SeekFrom};
    let len = src
        .metadata()
        .with_context(|| format!("reading the size of {}", image.display()))?
        .len();
    let mut raw = Hasher::new();
    let mut buf = vec![0u8; CHUNK_SIZE];
    let zeros = vec![0u8; CHUNK_SIZE];
    let mut pos = 0u64;
    while pos < len {
        crate::signals::check()?;
        let (data_start, data_end) = data_extent(&src, pos, len);
        if data_start > pos {
            let n = (data_start - pos).min(CHUNK_SIZE as u64) as usize;
            raw.update(&zeros[..n]);
            sink(&zeros[..n])?;
            pos += n as u64;
            continue;
        }
        let want = (data_end - pos).min(CHUNK_SIZE as u64) as usize;
        src.seek(SeekFrom::Start(pos))
            .with_context(|| format!("seeking in {}", image.display()))?;
        let n = read_full(&mut src, &mut buf[..want])
            .with_context(|| format!("reading {}", image.display()))?;
        if n == 0 {
            break;
        }
        raw.update(&buf[..n]);
        sink(&buf[..n])?;
        pos += n as u64;
    }
    Ok(raw.finish())
}

/// The data extent at or after `pos`: (start, end). Where the filesystem cannot tell holes
/// (no SEEK_DATA support), everything is data.
fn data_extent(file: &File, pos: u64, len: u64) -> (u64, u64) {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: lseek on a valid descriptor; it only moves the offset, which read_chunks resets.
    let start = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
    if start < 0 {
        return if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
            (len, len) // a hole up to the end
        } else {
            (pos, len)
        };
    }
    let start = start as u64;
    // SAFETY: as above.
    let end = unsafe { libc::lseek(fd, start as libc::off_t, libc::SEEK_HOLE) };
    let end = if end < 0 { len } else { (end as u64).min(len) };
    (start, end)
}

fn pack_raw(src: File, image: &Path, out: File, dest: &Path) -> Result<Packed> {
    let mut sparse = SparseWriter::new(out);
    let raw = read_chunks(src, image, |chunk| {
        sparse
            .write_chunk(chunk)
            .with_context(|| format!("writing {}", dest.display()))
    })?;
    sparse
        .finish()
        .with_context(|| format!("finishing {}", dest.display()))?;
    // The destination holds exactly the bytes read, holes included: hashing them again would
    // only repeat the raw digests at half the speed.
    Ok(Packed {
        container: raw.clone(),
        raw,
    })
}

/// Writes a file chunk by chunk, leaving holes where whole chunks are zero.
struct SparseWriter {
    file: File,
    /// Logical size written so far.
    len: u64,
    /// Where the file offset is; differs from `len` after a skipped zero chunk.
    offset: u64,
}

impl SparseWriter {
    fn new(file: File) -> Self {
        Self {
            file,
            len: 0,
            offset: 0,
        }
    }

    fn write_chunk(&mut self, chunk: &[u8]) -> Result<()> {
        if !is_zero(chunk) {
            if self.offset != self.len {
                self.file.seek(SeekFrom::Start(self.len))?;
            }
            self.file.write_all(chunk)?;
            self.offset = self.len + chunk.len() as u64;
        }
        self.len += chunk.len() as u64;
        Ok(())
    }

    fn finish(self) -> Result<()> {
        // Covers a trailing hole, which no write reached.
        self.file.set_len(self.len)?;
        self.file.sync_all()?;
        Ok(())
    }
}

fn is_zero(data: &[u8]) -> bool {
    // OR-folding fixed blocks vectorises; `iter().all()` stops early and does not.
    let mut blocks = data.chunks_exact(64);
    let blocks_zero = blocks
        .by_ref()
        .all(|b| b.iter().fold(0u8, |acc, &x| acc | x) == 0);
    blocks_zero && blocks.remainder().iter().all(|&x| x == 0)
}

fn pack_gzip(src: File, image: &Path, out: File, dest: &Path, threads: usize) -> Result<Packed> {
    let writing = || format!("writing {}", dest.display());
    let mut out = HashingWriter::new(BufWriter::with_capacity(CHUNK_SIZE, out));
    out.write_all(&GZIP_HEADER).with_context(writing)?;

    let (raw, crc) = if threads == 1 {
        let mut deflater = BlockDeflater::new(&mut out, Backend::Inline);
        let raw = read_chunks(src, image, |chunk| deflater.write(chunk))?;
        (raw, deflater.finish()?)
    } else {
        let (jobs, queue) = mpsc::sync_channel::<Job>(threads);
        let queue = Mutex::new(queue);
        thread::scope(|scope| -> Result<_> {
            for _ in 0..threads {
                scope.spawn(|| run_worker(&queue));
            }
            // Returning, with or without an error, drops `jobs`, which ends the workers.
            let pool = Backend::Pool {
                jobs,
                in_flight: VecDeque::new(),
                max_in_flight: threads * IN_FLIGHT_PER_THREAD,
            };
            let mut deflater = BlockDeflater::new(&mut out, pool);
            let raw = read_chunks(src, image, |chunk| deflater.write(chunk))?;
            Ok((raw, deflater.finish()?))
        })?
    };

    let mut trailer = [0u8; 8];
    trailer[..4].copy_from_slice(&crc.sum().to_le_bytes());
    // ISIZE is the input size modulo 2^32, as RFC 1952 says.
    trailer[4..].copy_from_slice(&(raw.size as u32).to_le_bytes());
    out.write_all(&trailer).with_context(writing)?;
    out.flush().with_context(writing)?;
    let (buffered, container) = out.finish();
    let file = buffered
        .into_inner()
        .map_err(|e| anyhow!(e.into_error()))
        .with_context(writing)?;
    file.sync_all()
        .with_context(|| format!("syncing {}", dest.display()))?;
    Ok(Packed { raw, container })
}

/// One block to deflate, and where to send the result.
struct Job {
    data: Vec<u8>,
    last: bool,
    reply: SyncSender<Result<Deflated>>,
}

/// A block's deflate output and the CRC-32 of its input.
struct Deflated {
    bytes: Vec<u8>,
    crc: Crc,
}

/// Where blocks get deflated.
enum Backend {
    /// On the calling thread (one CPU).
    Inline,
    /// On a pool of threads; results are written in submission order.
    Pool {
        jobs: SyncSender<Job>,
        in_flight: VecDeque<Receiver<Result<Deflated>>>,
        max_in_flight: usize,
    },
}

/// Cuts the input into [`GZIP_BLOCK`] blocks, has them deflated, and writes the results in
/// order to `out` while combining their CRC-32s.
struct BlockDeflater<'a, W: Write> {
    out: &'a mut W,
    backend: Backend,
    block: Vec<u8>,
    crc: Crc,
}

impl<'a, W: Write> BlockDeflater<'a, W> {
    fn new(out: &'a mut W, backend: Backend) -> Self {
        Self {
            out,
            backend,
            block: Vec::with_capacity(GZIP_BLOCK),
            crc: Crc::new(),
        }
    }

    fn write(&mut self, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            // A full block is only submitted once more input shows it is not the last one:
            // the last block ends the deflate stream, the others end with a sync flush.
            if self.block.len() == GZIP_BLOCK {
                self.submit(false)?;
            }
            let take = (GZIP_BLOCK - self.block.len()).min(data.len());
            self.block.extend_from_slice(&data[..take]);
            data = &data[take..];
        }
        Ok(())
    }

    /// Deflates the final block (possibly empty) and waits for every result; returns the CRC-32
    /// of the whole input.
    fn finish(mut self) -> Result<Crc> {
        self.submit(true)?;
        if let Backend::Pool { in_flight, .. } = &mut self.backend {
            while let Some(reply) = in_flight.pop_front() {
                let deflated = receive(&reply)?;
                emit(self.out, &mut self.crc, deflated)?;
            }
        }
        Ok(self.crc)
    }

    fn submit(&mut self, last: bool) -> Result<()> {
        let data = std::mem::replace(&mut self.block, Vec::with_capacity(GZIP_BLOCK));
        match &mut self.backend {
            Backend::Inline => {
                let deflated = deflate_block(&data, last)?;
                emit(self.out, &mut self.crc, deflated)?;
            }
            Backend::Pool {
                jobs,
                in_flight,
                max_in_flight,
            } => {
                if in_flight.len() >= *max_in_flight
                    && let Some(reply) = in_flight.pop_front()
                {
                    let deflated = receive(&reply)?;
                    emit(self.out, &mut self.crc, deflated)?;
                }
                let (reply, result) = mpsc::sync_channel(1);
                jobs.send(Job { data, last, reply })
                    .map_err(|_| anyhow!("the deflate threads stopped"))?;
                in_flight.push_back(result);
            }
        }
        Ok(())
    }
}

fn receive(reply: &Receiver<Result<Deflated>>) -> Result<Deflated> {
    reply
        .recv()
        .map_err(|_| anyhow!("a deflate thread stopped without a result"))?
}

fn emit(out: &mut impl Write, crc: &mut Crc, deflated: Deflated) -> Result<()> {
    out.write_all(&deflated.bytes)
        .context("writing deflated data")?;
    crc.combine(&deflated.crc);
    Ok(())
}

fn run_worker(queue: &Mutex<Receiver<Job>>) {
    loop {
        // The lock is held only while waiting for the next job, not while deflating.
        let job = match queue.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else { return };
        let result = deflate_block(&job.data, job.last);
        // The receiver is gone only when packing already failed elsewhere.
        let _ = job.reply.send(result);
    }
}

/// Deflates one block as a piece of a larger raw deflate stream (the gzip framing is ours):
/// libdeflate deflates it whole; unless `last`, the piece is made non-final and byte-aligned.
/// libdeflate's output depends only on the input and the level, never on what a thread
/// deflated before.
fn deflate_block(data: &[u8], last: bool) -> Result<Deflated> {
    let level = libdeflater::CompressionLvl::new(GZIP_LEVEL)
        .map_err(|e| anyhow!("deflate level {GZIP_LEVEL}: {e:?}"))?;
    let mut c = libdeflater::Compressor::new(level);
    // Room for the piece and the empty stored block that ends it.
    let mut bytes = vec![0u8; c.deflate_compress_bound(data.len()) + 8];
    let n = c
        .deflate_compress(data, &mut bytes)
        .map_err(|e| anyhow!("deflating: {e:?}"))?;
    bytes.truncate(n);
    if !last {
        super::deflate::unfinalize(&mut bytes).context("ending a deflate piece")?;
    }
    let mut crc = Crc::new();
    crc.update(data);
    Ok(Deflated { bytes, crc })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use std::process::{Command, Stdio};

    /// A mostly-empty "image": scattered data, runs of zeros, repetitive text and noise, with
    /// a length that is not a multiple of any block size.
    fn make_image(path: &Path, len: u64) {
        let mut f = File::create(path).unwrap();
        f.set_len(len).unwrap();
        let mut x: u32 = 0x9e37_79b9;
        let mut noise = |n: usize| crate::pack::test_noise(&mut x, n);
        let text: Vec<u8> = b"root:x:0:0:root:/root:/bin/bash\n".repeat(40_000);
        // Few distinct bytes in long runs: the kind of input where a deflate state that is
        // reset rather than fresh picked other matches (zlib-rs), so any dependence of a block's
        // output on what was deflated before shows up here.
        let runs: Vec<u8> = noise(1_500_000)
            .into_iter()
            .map(|r| match r % 8 {
                0..=3 => 0x81,
                4 => 0,
                5 => 0xb0,
                _ => r & 3,
            })
            .collect();
        let places = [0u64, 3 << 20, (7 << 20) + 12_345, len / 2, len - 200_000];
        for (i, at) in places.into_iter().enumerate() {
            f.seek(SeekFrom::Start(at)).unwrap();
            match i % 3 {
                0 => f.write_all(&text[..(text.len() / (i + 1))]).unwrap(),
                1 => f.write_all(&runs).unwrap(),
                _ => f.write_all(&noise(300_000)).unwrap(),
            }
        }
        f.set_len(len).unwrap();
    }

    fn tool_output(tool: &str, args: &[&str], file: &Path) -> std::process::Output {
        Command::new(tool)
            .args(args)
            .arg(file)
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("{tool}: {e}"))
    }

    fn md5sum(path: &Path) -> String {
        let out = tool_output("md5sum", &[], path);
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()[..32].to_string()
    }

    #[test]
    fn gzip_round_trips_through_gunzip_with_matching_digests() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("root.img");
        make_image(&image, (12 << 20) + 777);
        for threads in [1, 2, 3] {
            let gz = dir.path().join(format!("root-{threads}.img.gz"));
            let packed = pack_with_threads(&image, Container::Gzip, &gz, threads).unwrap();

            assert!(tool_output("gzip", &["-t"], &gz).status.success());
            let restored = tool_output("gunzip", &["-c"], &gz);
            assert!(restored.status.success());
            assert!(
                restored.stdout == fs::read(&image).unwrap(),
                "gunzip gave other bytes"
            );

            assert_eq!(packed.raw.size, (12 << 20) + 777);
            assert_eq!(packed.raw.md5, md5sum(&image));
            assert_eq!(
                packed.raw,
                super::super::digest::digest_file(&image).unwrap()
            );
            assert_eq!(packed.container.md5, md5sum(&gz));
            assert_eq!(packed.container.size, fs::metadata(&gz).unwrap().len());
            assert!(packed.container.size < packed.raw.size / 10);
        }
    }

    #[test]
    fn one_gzip_member_that_python_and_a_single_inflate_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("root.img");
        make_image(&image, (5 << 20) + 3);
        let gz = dir.path().join("root.img.gz");
        pack_with_threads(&image, Container::Gzip, &gz, 2).unwrap();
        // Python's gzip module, and one zlib decompressor over the whole file that must reach
        // the end of its stream exactly at the end of the file: one member, nothing after it.
        let script = "import gzip, sys, zlib\n\
                      data = open(sys.argv[1], 'rb').read()\n\
                      raw = open(sys.argv[2], 'rb').read()\n\
                      assert gzip.decompress(data) == raw, 'gzip module'\n\
                      d = zlib.decompressobj(31)\n\
                      assert d.decompress(data) == raw, 'one inflate'\n\
                      assert d.eof and d.unused_data == b'', 'more than one member'\n";
        let out = Command::new("python3")
            .args(["-c", script])
            .arg(&gz)
            .arg(&image)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // flate2's single-member decoder reads it whole too.
        let mut restored = Vec::new();
        std::io::Read::read_to_end(
            &mut flate2::read::GzDecoder::new(File::open(&gz).unwrap()),
            &mut restored,
        )
        .unwrap();
        assert!(restored == fs::read(&image).unwrap());
    }

    #[test]
    fn gzip_output_is_the_same_on_every_run_and_thread_count() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("root.img");
        make_image(&image, 9 << 20);
        let mut outputs = Vec::new();
        for (run, threads) in [1, 1, 2, 4, 4].into_iter().enumerate() {
            let gz = dir.path().join(format!("run{run}.gz"));
            pack_with_threads(&image, Container::Gzip, &gz, threads).unwrap();
            outputs.push(fs::read(&gz).unwrap());
        }
        assert!(outputs.windows(2).all(|w| w[0] == w[1]));
        // No timestamp and no file name in the header.
        assert_eq!(&outputs[0][..10], &GZIP_HEADER);
    }

    #[test]
    fn gzip_handles_empty_and_tiny_and_block_sized_inputs() {
        let dir = tempfile::tempdir().unwrap();
        for (i, len) in [0, 1, GZIP_BLOCK, GZIP_BLOCK + 1, 2 * GZIP_BLOCK]
            .into_iter()
            .enumerate()
        {
            let image = dir.path().join(format!("in{i}"));
            let data: Vec<u8> = (0..len).map(|j| (j % 251) as u8).collect();
            fs::write(&image, &data).unwrap();
            for threads in [1, 2] {
                let gz = dir.path().join(format!("in{i}-{threads}.gz"));
                let packed = pack_with_threads(&image, Container::Gzip, &gz, threads).unwrap();
                let restored = tool_output("gunzip", &["-c"], &gz);
                assert!(restored.status.success(), "len {len}");
                assert!(restored.stdout == data, "len {len}");
                assert_eq!(packed.raw.size, len as u64);
            }
        }
    }

    #[test]
    fn gzip_ratio_is_close_to_gzip_6() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("root.img");
        make_image(&image, 8 << 20);
        let gz = dir.path().join("root.img.gz");
        let ours = pack(&image, Container::Gzip, &gz).unwrap().container.size;
        let theirs = tool_output("gzip", &["-6", "-n", "-c"], &image)
            .stdout
            .len() as u64;
        // At most 3% larger than gzip -6.
        assert!(ours * 100 <= theirs * 103, "ours {ours}, gzip -6 {theirs}");
    }

    #[test]
    fn raw_copy_is_sparse_and_identical() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("root.img");
        let len = (64 << 20) + 4321;
        make_image(&image, len);
        let dest = dir.path().join("copy.img");
        let packed = pack(&image, Container::Raw, &dest).unwrap();

        assert_eq!(packed.raw, packed.container);
        assert_eq!(packed.raw.md5, md5sum(&image));
        assert_eq!(packed.container.md5, md5sum(&dest));
        let meta = fs::metadata(&dest).unwrap();
        assert_eq!(meta.len(), len);
        let allocated = meta.blocks() * 512;
        assert!(allocated < len / 8, "{allocated} bytes allocated for {len}");
        assert!(
            tool_output("cmp", &[image.to_str().unwrap()], &dest)
                .status
                .success()
        );
    }

    #[test]
    fn raw_copy_of_a_file_ending_in_a_hole_keeps_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("holey.img");
        let f = File::create(&image).unwrap();
        f.set_len(10 << 20).unwrap();
        drop(f);
        let dest = dir.path().join("copy.img");
        let packed = pack(&image, Container::Raw, &dest).unwrap();
        assert_eq!(fs::metadata(&dest).unwrap().len(), 10 << 20);
        assert_eq!(fs::metadata(&dest).unwrap().blocks(), 0);
        assert_eq!(packed.raw.md5, md5sum(&image));
    }

    #[test]
    fn existing_destination_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("root.img");
        fs::write(&image, b"image").unwrap();
        let dest = dir.path().join("root.img.gz");
        fs::write(&dest, b"keep me").unwrap();
        let err = pack(&image, Container::Gzip, &dest).unwrap_err();
        assert!(format!("{err:#}").contains("creating"), "{err:#}");
        assert_eq!(fs::read(&dest).unwrap(), b"keep me");
    }

    #[test]
    fn a_link_at_the_destination_is_refused_and_its_target_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("root.img");
        fs::write(&image, b"image").unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"host file").unwrap();
        let before = crate::output::fingerprint(&victim);
        let dest = dir.path().join("root.img.gz");
        std::os::unix::fs::symlink(&victim, &dest).unwrap();
        assert!(pack(&image, Container::Gzip, &dest).is_err());
        assert_eq!(crate::output::fingerprint(&victim), before);
        assert!(fs::symlink_metadata(&dest).unwrap().is_symlink());
    }

    #[test]
    fn pack_into_a_file_the_caller_created_writes_what_pack_writes() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("root.img");
        make_image(&image, 3 << 20);
        for container in [Container::Gzip, Container::Raw] {
            let by_path = dir.path().join("by-path");
            let _ = fs::remove_file(&by_path);
            let a = pack(&image, container, &by_path).unwrap();
            let out = crate::output::OutputDir::open(dir.path()).unwrap();
            let (file, temp) = out.create_temp("into", 0o644).unwrap();
            let b = pack_into(&image, container, file, &out.join(&temp)).unwrap();
            assert_eq!(a, b);
            assert_eq!(
                fs::read(&by_path).unwrap(),
                fs::read(out.join(&temp)).unwrap()
            );
            out.remove(&temp).unwrap();
        }
    }

    #[test]
    fn failure_removes_the_partial_destination() {
        let dir = tempfile::tempdir().unwrap();
        // Reading a directory fails after the destination was created.
        let dest = dir.path().join("out.gz");
        let err = pack(dir.path(), Container::Gzip, &dest).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("packing") && msg.contains("reading"), "{msg}");
        assert!(!dest.exists());

        let dest = dir.path().join("out.raw");
        assert!(pack(dir.path(), Container::Raw, &dest).is_err());
        assert!(!dest.exists());

        let missing = dir.path().join("missing.img");
        let err = pack(&missing, Container::Raw, &dest).unwrap_err();
        assert!(format!("{err:#}").contains("missing.img"));
        assert!(!dest.exists());
    }

    #[test]
    fn holes_are_digested_as_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("holey.img");
        {
            let mut f = File::create(&image).unwrap();
            use std::io::{Seek, SeekFrom, Write};
            f.seek(SeekFrom::Start(3 << 20)).unwrap();
            f.write_all(&[7u8; 200_000]).unwrap();
            f.set_len(9 << 20).unwrap();
        }
        let gz = dir.path().join("holey.img.gz");
        let p = pack(&image, Container::Gzip, &gz).unwrap();
        assert_eq!(p.raw.size, 9 << 20);
        assert_eq!(p.raw.md5, md5sum(&image));
        let restored = tool_output("gzip", &["-dc"], &gz);
        assert!(restored.stdout == fs::read(&image).unwrap());
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 1000]));
        for at in [0, 63, 64, 999] {
            let mut v = vec![0u8; 1000];
            v[at] = 1;
            assert!(!is_zero(&v), "{at}");
        }
    }
}
