//! The reader of a build machine's output disk: a strict, streaming subset of GNU tar.
//!
//! The disk is written by a guest that runs the spec's code, so its bytes are data from an
//! adversary. This reader knows three member types, the ones `guest.sh`'s `tar --format=gnu
//! --sparse` writes: regular files, directories and GNU sparse files. Every other type is
//! refused by name, long names and PAX headers included (a general tar reader reads those
//! whole into memory before the member they describe: a guest could make this host allocate
//! the size of its disk). A member's data is never held in memory: it is copied into a file
//! as it is read, holes kept, or read up to a small bound. A sparse map is held, bounded by
//! [`MAX_CHUNKS`].

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};

use anyhow::{Context, Result, bail, ensure};

const BLOCK: usize = 512;

/// The most data regions one sparse member may have (16 bytes each in memory).
pub const MAX_CHUNKS: usize = 1 << 20;

/// One member's header.
#[derive(Debug)]
pub struct Member {
    /// The name as stored, `./` and a trailing `/` removed.
    pub name: String,
    pub kind: Kind,
    /// The file's length (a sparse file's with its holes).
    pub size: u64,
    /// Where the stored data goes: (offset, length), in order, not overlapping.
    map: Vec<(u64, u64)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Directory,
    File,
}

/// Reads members one after the other; data a caller does not read is skipped.
pub struct Untar<R> {
    src: R,
    /// Bytes of the current member's data (and padding) not read yet.
    pending: u64,
}

impl<R: Read> Untar<R> {
    pub fn new(src: R) -> Untar<R> {
        Untar { src, pending: 0 }
    }

    /// The next member, or `None` at the archive's end (a block of zeros).
    pub fn next_member(&mut self) -> Result<Option<Member>> {
        self.skip_pending()?;
        let mut h = [0u8; BLOCK];
        self.src
            .read_exact(&mut h)
            .context("the archive ends inside a header")?;
        if h.iter().all(|&b| b == 0) {
            return Ok(None);
        }
        check_sum(&h)?;
        ensure!(&h[257..263] == b"ustar ", "not a GNU tar header");
        let raw_name = field_str(&h[0..100])?;
        let name = raw_name
            .trim_start_matches("./")
            .trim_end_matches('/')
            .to_string();
        let stored = number(&h[124..136]).context("the size field")?;
        // Padded to whole blocks below without overflow.
        ensure!(stored < 1 << 62, "a member of {stored} bytes");
        let (kind, size, map) = match h[156] {
            b'0' | 0 => (Kind::File, stored, vec![(0, stored)]),
            b'5' => {
                ensure!(stored == 0, "directory {name:?} has data");
                (Kind::Directory, 0, Vec::new())
            }
            b'S' => {
                let size = number(&h[483..495]).context("the sparse size field")?;
                let mut map = Vec::new();
                push_chunks(&mut map, &h[386..482])?;
                let mut extended = h[482] != 0;
                while extended {
                    let mut x = [0u8; BLOCK];
                    self.src
                        .read_exact(&mut x)
                        .context("the archive ends inside a sparse map")?;
                    // GNU tar writes an extension block only for entries left over: one
                    // without any is forged (and a chain of them would be read to the disk's
                    // end).
                    ensure!(x[0] != 0, "an empty sparse map extension of {name:?}");
                    push_chunks(&mut map, &x[..504])?;
                    extended = x[504] != 0;
                }
                check_map(&map, size, stored)
                    .with_context(|| format!("the sparse map of {name:?}"))?;
                (Kind::File, size, map)
            }
            t => bail!(
                "{name:?} is a tar member of type {:?}, not a file or directory",
                t as char
            ),
        };
        self.pending = padded(stored);
        Ok(Some(Member {
            name,
            kind,
            size,
            map,
        }))
    }

    /// Copies `m`'s data into `dest` from its start, leaving holes where the member has them
    /// and where it stores 64 KiB of zeros; `dest` gets `m.size`. `each` runs between
    /// buffers (a signal check).
    pub fn copy_to(
        &mut self,
        m: &Member,
        dest: &mut File,
        mut each: impl FnMut() -> Result<()>,
    ) -> Result<()> {
        let mut buf = vec![0u8; 64 << 10];
        for &(offset, len) in &m.map {
            dest.seek(SeekFrom::Start(offset))?;
            let mut left = len;
            while left > 0 {
                each()?;
                let n = left.min(buf.len() as u64) as usize;
                self.read_data(&mut buf[..n])?;
                if buf[..n].iter().all(|&b| b == 0) {
                    dest.seek(SeekFrom::Current(n as i64))?;
                } else {
                    dest.write_all(&buf[..n])?;
                }
                left -= n as u64;
            }
        }
        dest.set_len(m.size)?;
        Ok(())
    }

    /// `m`'s whole content, holes as zeros, if it is at most `max` bytes long.
    pub fn read_small(&mut self, m: &Member, max: u64) -> Result<Vec<u8>> {
        ensure!(
            m.size <= max,
            "{:?} is {} bytes, more than {max}",
            m.name,
            m.size
        );
        let mut out = vec![0u8; m.size as usize];
        for &(offset, len) in &m.map {
            let at = offset as usize;
            self.read_data(&mut out[at..at + len as usize])?;
        }
        Ok(out)
    }

    fn read_data(&mut self, buf: &mut [u8]) -> Result<()> {
        ensure!(
            buf.len() as u64 <= self.pending,
            "read past a member's data"
        );
        self.src
            .read_exact(buf)
            .context("the archive ends inside a member's data")?;
        self.pending -= buf.len() as u64;
        Ok(())
    }

    fn skip_pending(&mut self) -> Result<()> {
        let n = std::io::copy(
            &mut (&mut self.src).take(self.pending),
            &mut std::io::sink(),
        )?;
        ensure!(n == self.pending, "the archive ends inside a member's data");
        self.pending = 0;
        Ok(())
    }
}

/// `n` rounded up to whole blocks.
fn padded(n: u64) -> u64 {
    n.div_ceil(BLOCK as u64) * BLOCK as u64
}

fn check_sum(h: &[u8; BLOCK]) -> Result<()> {
    let want = number(&h[148..156]).context("the checksum field")?;
    let sum: u64 = h
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                b as u64
            }
        })
        .sum();
    ensure!(sum == want, "a tar header's checksum does not match");
    Ok(())
}

/// A NUL-terminated UTF-8 field.
fn field_str(f: &[u8]) -> Result<&str> {
    let end = f.iter().position(|&b| b == 0).unwrap_or(f.len());
    std::str::from_utf8(&f[..end]).context("a name that is not UTF-8")
}

/// A numeric field: octal digits (spaces and NULs around them), or GNU's base-256 (the high
/// bit of the first byte set; positive only).
fn number(f: &[u8]) -> Result<u64> {
    if f[0] & 0x80 != 0 {
        ensure!(f[0] == 0x80, "a negative or oversized base-256 number");
        let mut n: u64 = 0;
        for &b in &f[1..] {
            n = n
                .checked_mul(256)
                .and_then(|n| n.checked_add(b as u64))
                .context("a number too large")?;
        }
        return Ok(n);
    }
    let digits = f
        .iter()
        .copied()
        .skip_while(|&b| b == b' ')
        .take_while(|&b| b != 0 && b != b' ');
    let mut n: u64 = 0;
    let mut any = false;
    for b in digits {
        ensure!(
            (b'0'..=b'7').contains(&b),
            "a number field that is not octal"
        );
        n = n
            .checked_mul(8)
            .and_then(|n| n.checked_add((b - b'0') as u64))
            .context("a number too large")?;
        any = true;
    }
    ensure!(any || f.iter().all(|&b| b == 0), "an empty number field");
    Ok(n)
}

/// The (offset, length) pairs of a sparse map area; an entry of zeros ends it.
fn push_chunks(map: &mut Vec<(u64, u64)>, area: &[u8]) -> Result<()> {
    for e in area.chunks_exact(24) {
        if e[0] == 0 {
            break;
        }
        ensure!(
            map.len() < MAX_CHUNKS,
            "more than {MAX_CHUNKS} data regions"
        );
        map.push((number(&e[..12])?, number(&e[12..])?));
    }
    Ok(())
}

/// A sparse map is in order, inside the file and accounts for exactly the stored data.
fn check_map(map: &[(u64, u64)], size: u64, stored: u64) -> Result<()> {
    let mut end = 0u64;
    let mut total = 0u64;
    for &(offset, len) in map {
        ensure!(offset >= end, "regions out of order or overlapping");
        end = offset.checked_add(len).context("a region past 2^64")?;
        ensure!(end <= size, "a region past the file's end");
        total += len;
    }
    ensure!(
        total == stored,
        "the regions do not add up to the stored data"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use std::process::Command;

    /// A header block: name, type, size field bytes; checksum set.
    fn header(name: &str, kind: u8, size: u64) -> [u8; BLOCK] {
        let mut h = [0u8; BLOCK];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..108].copy_from_slice(b"0000644\0");
        h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
        h[156] = kind;
        h[257..265].copy_from_slice(b"ustar  \0");
        seal(&mut h);
        h
    }

    fn seal(h: &mut [u8; BLOCK]) {
        h[148..156].copy_from_slice(b"        ");
        let sum: u64 = h.iter().map(|&b| b as u64).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    }

    fn archive(parts: &[&[u8]]) -> Vec<u8> {
        let mut v: Vec<u8> = parts.concat();
        v.resize(padded(v.len() as u64) as usize + 2 * BLOCK, 0);
        v
    }

    fn first_error(bytes: &[u8]) -> String {
        let mut u = Untar::new(bytes);
        loop {
            match u.next_member() {
                Ok(Some(m)) => {
                    if m.kind == Kind::File {
                        u.read_small(&m, 1 << 20).unwrap();
                    }
                }
                Ok(None) => panic!("read to the end without an error"),
                Err(e) => return format!("{e:#}"),
            }
        }
    }

    #[test]
    fn every_type_but_file_directory_and_sparse_is_refused() {
        // GNU long name and long link, PAX local and global, links, devices, fifos.
        for t in [b'L', b'K', b'x', b'g', b'1', b'2', b'3', b'4', b'6', b'7'] {
            let mut data = [0u8; BLOCK];
            data[..5].copy_from_slice(b"12345");
            let err = first_error(&archive(&[&header("out/a", t, 5), &data]));
            assert!(
                err.contains("not a file or directory"),
                "{}: {err}",
                t as char
            );
        }
    }

    #[test]
    fn a_long_name_header_is_not_read_into_memory() {
        // A GNU long-name member claiming 8 GiB: refused from its header, nothing allocated.
        let h = header("././@LongLink", b'L', (8 << 30) - 1);
        let err = first_error(&archive(&[&h]));
        assert!(err.contains("type 'L'"), "{err}");
    }

    #[test]
    fn forged_headers_and_truncations_are_refused() {
        let mut bad = header("status", b'0', 1);
        bad[0] = b'x';
        assert!(first_error(&archive(&[&bad])).contains("checksum"));
        let mut not_gnu = header("status", b'0', 1);
        not_gnu[257..265].copy_from_slice(b"ustar\x0000");
        seal(&mut not_gnu);
        assert!(first_error(&archive(&[&not_gnu])).contains("not a GNU"));
        let mut not_octal = header("status", b'0', 0);
        not_octal[124..136].copy_from_slice(b"0000000009\0\0");
        seal(&mut not_octal);
        assert!(first_error(&archive(&[&not_octal])).contains("octal"));
        // Data cut short, and a header cut short.
        let short = header("out/files/1", b'0', 4096);
        let mut u = Untar::new(&short[..]);
        let m = u.next_member().unwrap().unwrap();
        assert!(u.read_small(&m, 1 << 20).is_err());
        assert!(first_error(&short[..100]).contains("inside a header"));
    }

    #[test]
    fn a_forged_sparse_map_is_refused() {
        let sparse = |regions: &[(u64, u64)], size: u64, stored: u64| {
            let mut h = header("out/files/1", b'S', stored);
            for (i, (o, l)) in regions.iter().enumerate() {
                let at = 386 + 24 * i;
                h[at..at + 12].copy_from_slice(format!("{o:011o}\0").as_bytes());
                h[at + 12..at + 24].copy_from_slice(format!("{l:011o}\0").as_bytes());
            }
            h[483..495].copy_from_slice(format!("{size:011o}\0").as_bytes());
            seal(&mut h);
            first_error(&archive(&[&h, &vec![1u8; stored as usize]]))
        };
        assert!(sparse(&[(0, 10), (5, 10)], 100, 20).contains("overlapping"));
        assert!(sparse(&[(90, 20)], 100, 20).contains("past the file's end"));
        assert!(sparse(&[(0, 10)], 100, 20).contains("do not add up"));
        // An extension block promised and empty.
        let mut h = header("out/files/1", b'S', 0);
        h[482] = 1;
        seal(&mut h);
        let err = first_error(&archive(&[&h, &[0u8; BLOCK]]));
        assert!(err.contains("empty sparse map extension"), "{err}");
        // A size whose padding would overflow.
        let mut h = header("out/files/1", b'0', 0);
        h[124] = 0x80;
        h[125..128].copy_from_slice(&[0; 3]);
        h[128..136].copy_from_slice(&[0xff; 8]);
        seal(&mut h);
        assert!(first_error(&archive(&[&h])).contains("a member of"));
    }

    #[test]
    fn a_regular_member_is_copied_with_holes_where_it_stores_zeros() {
        let mut data = vec![0u8; 4 << 20];
        data[5] = 1;
        data[(3 << 20) + 7] = 2;
        let bytes = archive(&[&header("out/files/1", b'0', data.len() as u64), &data]);
        let mut u = Untar::new(&bytes[..]);
        let m = u.next_member().unwrap().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        u.copy_to(&m, &mut File::create(&p).unwrap(), || Ok(()))
            .unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), data);
        assert!(std::fs::metadata(&p).unwrap().blocks() * 512 < 1 << 20);
        assert!(u.next_member().unwrap().is_none());
        // A signal between buffers stops the copy.
        let mut u = Untar::new(&bytes[..]);
        let m = u.next_member().unwrap().unwrap();
        let stop = u.copy_to(&m, &mut File::create(&p).unwrap(), || {
            anyhow::bail!("interrupted")
        });
        assert!(stop.is_err());
    }

    #[test]
    fn base_256_numbers_are_read() {
        let mut f = [0u8; 12];
        f[0] = 0x80;
        f[7] = 0x02; // 2 << 32
        assert_eq!(number(&f).unwrap(), 2 << 32);
        f[0] = 0xff;
        assert!(number(&f).is_err());
        assert_eq!(number(b"   17 \0\0\0\0\0\0").unwrap(), 0o17);
    }

    /// What GNU tar itself writes: a sparse file past the octal limit (8 GiB, so base-256),
    /// with data at both ends, a small file and directories.
    #[test]
    fn gnu_tar_sparse_output_is_read_with_its_holes() {
        if Command::new("tar").arg("--version").output().is_err() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("out/files")).unwrap();
        std::fs::write(src.join("status"), "0\n").unwrap();
        let big = src.join("out/files/1");
        let size: u64 = (9 << 30) + 12345;
        {
            let mut f = File::create(&big).unwrap();
            f.write_all(b"head").unwrap();
            f.seek(SeekFrom::Start(5 << 30)).unwrap();
            f.write_all(&[7u8; 70_000]).unwrap();
            // Fifty more regions: the map goes on in two extension blocks.
            for i in 1..=50u64 {
                f.seek(SeekFrom::Start((6 << 30) + i * (1 << 20))).unwrap();
                f.write_all(&i.to_le_bytes()).unwrap();
            }
            f.seek(SeekFrom::Start(size - 4)).unwrap();
            f.write_all(b"tail").unwrap();
        }
        let tarball = dir.path().join("out.tar");
        let st = Command::new("tar")
            .args(["-cf"])
            .arg(&tarball)
            .args(["--format=gnu", "--sparse", "-C"])
            .arg(&src)
            .arg(".")
            .status()
            .unwrap();
        assert!(st.success());
        let mut u = Untar::new(std::io::BufReader::new(File::open(&tarball).unwrap()));
        let mut seen = Vec::new();
        while let Some(m) = u.next_member().unwrap() {
            seen.push((m.name.clone(), m.kind));
            if m.name == "status" {
                assert_eq!(u.read_small(&m, 16).unwrap(), b"0\n");
            } else if m.name == "out/files/1" {
                assert_eq!(m.size, size);
                assert!(u.read_small(&m, 1 << 20).is_err(), "9 GiB read whole");
                let dest_path = dir.path().join("copy");
                let mut dest = File::create_new(&dest_path).unwrap();
                u.copy_to(&m, &mut dest, || Ok(())).unwrap();
                drop(dest);
                let mut f = File::open(&dest_path).unwrap();
                assert_eq!(f.metadata().unwrap().len(), size);
                // Holes stayed holes.
                assert!(f.metadata().unwrap().blocks() * 512 < 1 << 20);
                let mut at = |o: u64, n: usize| {
                    let mut b = vec![0u8; n];
                    f.seek(SeekFrom::Start(o)).unwrap();
                    f.read_exact(&mut b).unwrap();
                    b
                };
                assert_eq!(at(0, 5), b"head\0");
                assert_eq!(at((5 << 30) - 1, 3), [0, 7, 7]);
                assert_eq!(at((5 << 30) + 69_999, 2), [7, 0]);
                assert_eq!(at(size - 4, 4), b"tail");
                for i in 1..=50u64 {
                    assert_eq!(at((6 << 30) + i * (1 << 20), 8), i.to_le_bytes());
                }
                assert!(
                    m.map.len() > 4 + 21,
                    "no extension block read: {}",
                    m.map.len()
                );
            }
        }
        seen.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            seen,
            vec![
                (String::new(), Kind::Directory),
                ("out".into(), Kind::Directory),
                ("out/files".into(), Kind::Directory),
                ("out/files/1".into(), Kind::File),
                ("status".into(), Kind::File),
            ]
        );
    }
}
