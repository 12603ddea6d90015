//! `debimg verify SPEC --against DIR`: builds the spec again from the lock in `DIR` (with the
//! epoch its metadata records) and compares every output with `DIR`'s. An image that differs
//! is looked into: both are unpacked, mounted read-only (or, for a tarball, extracted) in this
//! process's private mount namespace, and their trees compared, so the report names the files
//! that differ, not just the hashes.
//!
//! [`verify`] is the command; the rest, the comparison it makes.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::cmd::CommandRunExt;
use crate::creator::{BuildOptions, Creator, DEFAULT_BUILD_DIR, DEFAULT_CACHE_DIR};
use crate::error::Error;
use crate::input::Input;
use crate::metadata::{ImageMeta, Metadata};
use crate::sys::loopdev::{self, LoopDevice};
use crate::sys::mount::{self, Mount, MsFlags};
use crate::sys::namespace::in_namespaces;

/// How many differences are named per image.
pub const SHOWN: usize = 20;

/// `debimg verify`: the spec built again from the lock in `--against` into a scratch
/// directory, every output compared with `--against`'s; "identical" on stdout, or each output
/// that differs and an error. `show_progress`: the output of the bootstrap and apt.
pub fn verify(args: &VerifyArgs, show_progress: bool) -> Result<(), Error> {
    let build_dir = &args.build_dir;
    let mut input = Input::read(Some(&args.spec), None, None)?;
    let against = args
        .against
        .canonicalize()
        .with_context(|| format!("--against: resolving {}", args.against.display()))?;
    let meta_path = against.join(format!("{}.yaml", input.spec.name));
    let theirs = Metadata::read(&meta_path).with_context(|| {
        format!(
            "reading the metadata of the build to check, {}",
            meta_path.display()
        )
    })?;
    let lock = lock_of(&against, &theirs)?;
    input.spec.lock = Some(lock.to_string_lossy().into_owned());
    if input.spec.source_date_epoch.is_none() {
        input.spec.source_date_epoch = theirs.source_date_epoch;
    }
    if input.spec.source_date_epoch.is_none() {
        return Err(anyhow::anyhow!(
            "{} was not built reproducibly (its metadata has no source_date_epoch, nor has the \
             spec): a rebuild cannot equal it; build with source_date_epoch",
            against.display()
        )
        .into());
    }
    let plan = input.plan(None)?;
    if !nix::unistd::geteuid().is_root() {
        return Err(anyhow::anyhow!(
            "debimg verify needs root (it builds the spec again); run it with sudo"
        )
        .into());
    }
    let scratch = scratch_dir(build_dir)?;
    let out = scratch.path().join("out");
    let work = scratch.path().join("compare");
    let opts = BuildOptions {
        build_dir: build_dir.clone(),
        force: true,
        show_progress,
        cache_dir: (!args.no_cache).then(|| args.cache_dir.clone()),
        ..BuildOptions::new(&out)
    };
    in_namespaces(|| {
        let outcome = Creator::new(plan, opts)?.create()?;
        std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
        let diffs = compare(&against, &theirs, &out, &outcome.metadata, &work)?;
        let mut stdout = std::io::stdout().lock();
        if diffs.is_empty() {
            let _ = writeln!(
                stdout,
                "identical: {} rebuilt from {} gives the same {} images and {} files, byte for byte",
                theirs.name,
                lock.display(),
                theirs.images.len(),
                theirs.files.len()
            );
            return Ok(());
        }
        for d in &diffs {
            let _ = writeln!(stdout, "differs: {}", d.output);
            for f in &d.files {
                let _ = writeln!(stdout, "  {f}");
            }
        }
        Err(anyhow::anyhow!(
            "the rebuild differs from {} in {} output(s)",
            against.display(),
            diffs.len()
        )
        .into())
    })
}

/// What differs between an output and its rebuild.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// The output file (`NAME-root.img.gz`).
    pub output: String,
    /// The first files that differ inside it (`/etc/motd: content`), at most [`SHOWN`], or,
    /// when its trees are the same, one line that says so ([`same_files`]); empty for an
    /// output that is no image.
    pub files: Vec<String>,
}

/// The line for an image whose bytes differ though its files do not: expected of xfs and
/// btrfs, whose tools in Debian 12 cannot write the same bytes twice (docs/spec.md says
/// what differs).
pub fn same_files(format: &str) -> String {
    match format {
        "xfs" => "no file differs: only xfs's own metadata (inode numbers, block placement, \
                  change and creation times, generation numbers, the log), which no xfs \
                  build repeats"
            .into(),
        "btrfs" => "no file differs: only btrfs's own metadata (device, chunk tree and \
                    subvolume UUIDs, the times of its own trees), which no btrfs build repeats"
            .into(),
        "tar" => "no file differs: only the archive's own bytes (member order or headers)".into(),
        "gpt" | "mbr" => "no file differs in the partitions compared: only the disk's own bytes \
                          (partition table, boot code, filesystem metadata or layout)"
            .into(),
        _ => "no file differs: only the image's own bytes (filesystem metadata or layout)".into(),
    }
}

/// Compares the outputs of `theirs` (a build's output directory and metadata) with `ours` (the
/// rebuild's). Call it in a private mount namespace: images are mounted under `work`.
pub fn compare(
    theirs_dir: &Path,
    theirs: &Metadata,
    ours_dir: &Path,
    ours: &Metadata,
    work: &Path,
) -> Result<Vec<Difference>> {
    let mut out = Vec::new();
    for img in &theirs.images {
        let Some(mine) = ours
            .images
            .iter()
            .find(|i| i.container_name == img.container_name)
        else {
            out.push(Difference {
                output: img.container_name.clone(),
                files: vec!["the rebuild has no such image".into()],
            });
            continue;
        };
        if mine.container_sha256 == img.container_sha256 {
            continue;
        }
        let files = image_differences(
            &theirs_dir.join(&img.container_name),
            &ours_dir.join(&mine.container_name),
            img,
            work,
        )
        .with_context(|| format!("looking into {}", img.container_name))?;
        let files = if files.is_empty() {
            vec![same_files(&img.format)]
        } else {
            files
        };
        out.push(Difference {
            output: img.container_name.clone(),
            files,
        });
    }
    let images_differ = !out.is_empty();
    for f in &theirs.files {
        let same = ours
            .files
            .iter()
            .any(|m| m.name == f.name && m.sha256 == f.sha256);
        if !same {
            let sbom = [".spdx.json", ".cdx.json"]
                .iter()
                .any(|s| f.name == format!("{}{s}", theirs.name));
            out.push(Difference {
                output: f.name.clone(),
                files: if sbom && images_differ {
                    vec!["it records the images' checksums, which differ".into()]
                } else {
                    Vec::new()
                },
            });
        }
    }
    Ok(out)
}

/// The files that differ between two shipped images of one kind. What it unpacks into `work`
/// goes again whatever happens.
fn image_differences(a: &Path, b: &Path, img: &ImageMeta, work: &Path) -> Result<Vec<String>> {
    let (ra, rb) = (work.join("theirs.raw"), work.join("ours.raw"));
    let (ta, tb) = (work.join("theirs"), work.join("ours"));
    let res = unpacked_differences(a, b, img, [&ra, &rb], [&ta, &tb]);
    for raw in [&ra, &rb] {
        let _ = std::fs::remove_file(raw);
    }
    let mut cleaned = Ok(());
    for dir in [&ta, &tb] {
        if dir.exists() {
            cleaned = cleaned.and(mount::remove_dir_all_safe(dir));
        }
    }
    let out = res?;
    cleaned?;
    Ok(out)
}

fn unpacked_differences(
    a: &Path,
    b: &Path,
    img: &ImageMeta,
    [ra, rb]: [&Path; 2],
    [ta, tb]: [&Path; 2],
) -> Result<Vec<String>> {
    unpack(a, &img.container, ra)?;
    unpack(b, &img.container, rb)?;
    std::fs::create_dir_all(ta)?;
    std::fs::create_dir_all(tb)?;
    match img.format.as_str() {
        "tar" => {
            for (raw, dir) in [(ra, ta), (rb, tb)] {
                Command::new("tar")
                    .args([
                        "--extract",
                        "--numeric-owner",
                        "--same-permissions",
                        "--xattrs",
                    ])
                    .args(["--xattrs-include=*", "--file"])
                    .arg(raw)
                    .arg("--directory")
                    .arg(dir)
                    .run()
                    .context("unpacking a tarball to compare")?;
            }
            Ok(tree_differences(ta, tb))
        }
        "gpt" | "mbr" => disk_differences(ra, rb, ta, tb),
        fs => {
            if fs == "btrfs" {
                distinct_btrfs_id(rb);
            }
            let (la, ma) = mount_ro(ra, fs, ta)?;
            let (lb, mb) = match mount_ro(rb, fs, tb) {
                Ok(m) => m,
                Err(e) => {
                    ma.close().and(la.close())?;
                    return Ok(vec![format!("/: not compared ({e:#})")]);
                }
            };
            let d = tree_differences(ta, tb);
            mb.close().and(ma.close()).and(lb.close()).and(la.close())?;
            Ok(d)
        }
    }
}

/// The raw bytes of a shipped file, into `raw`.
fn unpack(shipped: &Path, container: &str, raw: &Path) -> Result<()> {
    match container {
        "gzip" => {
            let out = File::create(raw).with_context(|| format!("creating {}", raw.display()))?;
            let st = Command::new("gzip")
                .arg("-dc")
                .arg(shipped)
                .stdout(out)
                .status()
                .context("running gzip")?;
            if !st.success() {
                bail!("gzip -dc {} failed: {st}", shipped.display());
            }
            Ok(())
        }
        "qcow2" => Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(shipped)
            .arg(raw)
            .run()
            .context("unpacking a qcow2 disk"),
        _ => std::fs::copy(shipped, raw)
            .map(drop)
            .with_context(|| format!("copying {}", shipped.display())),
    }
}

fn mount_ro(raw: &Path, fs: &str, at: &Path) -> Result<(LoopDevice, Mount)> {
    let dev = loopdev::attach(raw, true)?;
    match mount_dev(dev.path(), fs, at) {
        Ok(m) => Ok((dev, m)),
        Err(e) => {
            dev.close()?;
            Err(e)
        }
    }
}

/// Gives the rebuild's own copy of a btrfs filesystem (a file or a partition of one) another
/// fsid: both have the one the spec derives, and a kernel without temp-fsid (before 6.7)
/// refuses to mount the second. `btrfstune -m` keeps the metadata UUID, so nothing else
/// changes. Where it fails, the mount may still succeed (or says why not).
fn distinct_btrfs_id(copy: &Path) {
    if let Err(e) = Command::new("btrfstune").arg("-m").arg(copy).run() {
        tracing::debug!("btrfstune -m {}: {e:#}", copy.display());
    }
}

/// Mounts `dev` read-only at `at`. Both images of a reproducible build have the same UUID,
/// which xfs refuses twice unless told (`nouuid`).
fn mount_dev(dev: &Path, fs: &str, at: &Path) -> Result<Mount> {
    let flags = MsFlags::MS_RDONLY | MsFlags::MS_NODEV | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
    let data = (fs == "xfs").then_some("nouuid");
    mount::mount(&dev.to_string_lossy(), at, Some(fs), flags, data)
}

/// Each partition with a filesystem this host mounts, compared in turn (`partition N: ...`).
fn disk_differences(ra: &Path, rb: &Path, ta: &Path, tb: &Path) -> Result<Vec<String>> {
    let da = loopdev::attach_partitioned(ra)?;
    let db = match loopdev::attach_partitioned(rb) {
        Ok(d) => d,
        Err(e) => {
            da.close()?;
            return Err(e);
        }
    };
    let res = partition_differences(&da, &db, ta, tb);
    let closed = da.close().and(db.close());
    let mut out = res?;
    closed?;
    out.truncate(SHOWN);
    Ok(out)
}

fn partition_differences(
    da: &LoopDevice,
    db: &LoopDevice,
    ta: &Path,
    tb: &Path,
) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for n in 1..=128 {
        let Ok(pa) = da.partition(n) else { break };
        let fs = Command::new("blkid")
            .args(["-o", "value", "-s", "TYPE"])
            .arg(&pa)
            .run_accepting_output(&[0, 2])
            .map(|(_, o, _)| o.trim().to_string())
            .unwrap_or_default();
        if fs.is_empty() {
            continue;
        }
        let pb = db.partition(n)?;
        let (sa, sb) = (ta.join(format!("p{n}")), tb.join(format!("p{n}")));
        std::fs::create_dir_all(&sa)?;
        std::fs::create_dir_all(&sb)?;
        if fs == "btrfs" {
            distinct_btrfs_id(&pb);
        }
        let ma = match mount_dev(&pa, &fs, &sa) {
            Ok(m) => m,
            Err(e) => {
                out.push(format!("partition {n} ({fs}): not compared ({e:#})"));
                continue;
            }
        };
        let mb = match mount_dev(&pb, &fs, &sb) {
            Ok(m) => m,
            Err(e) => {
                ma.close()?;
                out.push(format!("partition {n} ({fs}): not compared ({e:#})"));
                continue;
            }
        };
        out.extend(
            tree_differences(&sa, &sb)
                .into_iter()
                .map(|d| format!("partition {n}: {d}")),
        );
        mb.close().and(ma.close())?;
    }
    Ok(out)
}

/// The first [`SHOWN`] differences between the trees at `a` (the build checked) and `b` (the
/// rebuild), in path order: what is only in one, a different type, content, link target,
/// mode, owner or modification time. Nothing is followed.
pub fn tree_differences(a: &Path, b: &Path) -> Vec<String> {
    let mut out = Vec::new();
    walk(a, b, Path::new("/"), &mut out);
    out
}

fn walk(a: &Path, b: &Path, rel: &Path, out: &mut Vec<String>) {
    let names = |d: &Path| -> BTreeSet<std::ffi::OsString> {
        std::fs::read_dir(d)
            .map(|it| it.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default()
    };
    let (na, nb) = (names(a), names(b));
    for name in na.union(&nb) {
        if out.len() >= SHOWN {
            return;
        }
        let shown = rel.join(name);
        let (pa, pb) = (a.join(name), b.join(name));
        let (ma, mb) = (
            std::fs::symlink_metadata(&pa),
            std::fs::symlink_metadata(&pb),
        );
        let (ma, mb) = match (ma, mb) {
            (Ok(x), Ok(y)) => (x, y),
            (Ok(_), Err(_)) => {
                out.push(format!("{}: only in the build checked", shown.display()));
                continue;
            }
            (Err(_), Ok(_)) => {
                out.push(format!("{}: only in the rebuild", shown.display()));
                continue;
            }
            (Err(_), Err(_)) => continue,
        };
        let (fa, fb) = (ma.file_type(), mb.file_type());
        let kind = |m: &std::fs::Metadata| crate::spec::file_kind(&m.file_type());
        if kind(&ma) != kind(&mb) {
            out.push(format!(
                "{}: {} in the build checked, {} in the rebuild",
                shown.display(),
                kind(&ma),
                kind(&mb)
            ));
            continue;
        }
        let mut what = Vec::new();
        if fa.is_file() && (ma.len() != mb.len() || !same_content(&pa, &pb)) {
            what.push("content");
        }
        if fa.is_symlink() && std::fs::read_link(&pa).ok() != std::fs::read_link(&pb).ok() {
            what.push("link target");
        }
        if ma.mode() != mb.mode() {
            what.push("mode");
        }
        if (ma.uid(), ma.gid()) != (mb.uid(), mb.gid()) {
            what.push("owner");
        }
        if (fa.is_file() || fa.is_symlink()) && ma.mtime() != mb.mtime() {
            what.push("modification time");
        }
        if (fa.is_char_device() || fa.is_block_device()) && ma.rdev() != mb.rdev() {
            what.push("device number");
        }
        if !what.is_empty() {
            out.push(format!("{}: {}", shown.display(), what.join(", ")));
        }
        if fa.is_dir() && fb.is_dir() {
            walk(&pa, &pb, &shown, out);
        }
    }
}

use std::os::unix::fs::FileTypeExt;

/// Whether two regular files hold the same bytes (opened without following links).
fn same_content(a: &Path, b: &Path) -> bool {
    let open = |p: &Path| {
        File::options()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(p)
    };
    let (Ok(mut x), Ok(mut y)) = (open(a), open(b)) else {
        return false;
    };
    let (mut bx, mut by) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    loop {
        let n = match read_full(&mut x, &mut bx) {
            Ok(n) => n,
            Err(_) => return false,
        };
        let m = match read_full(&mut y, &mut by) {
            Ok(m) => m,
            Err(_) => return false,
        };
        if n != m || bx[..n] != by[..m] {
            return false;
        }
        if n == 0 {
            return true;
        }
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Where `debimg verify` rebuilds: a directory of its own under the build directory.
pub fn scratch_dir(build_dir: &Path) -> Result<tempfile::TempDir> {
    std::fs::create_dir_all(build_dir)
        .with_context(|| format!("creating {}", build_dir.display()))?;
    tempfile::Builder::new()
        .prefix(".verify-")
        .tempdir_in(build_dir)
        .with_context(|| format!("creating a directory in {}", build_dir.display()))
}

/// The lock file of the build in `dir` whose metadata is `meta`.
pub fn lock_of(dir: &Path, meta: &Metadata) -> Result<PathBuf> {
    let lock = dir.join(format!("{}.lock.yaml", meta.name));
    if !lock.is_file() {
        bail!(
            "{} has no lock: an image built by a debimg that wrote none cannot be rebuilt \
             from its own package set",
            dir.display()
        );
    }
    Ok(lock)
}

/// The arguments of `debimg verify`.
#[derive(clap::Args)]
pub struct VerifyArgs {
    /// The YAML spec.
    pub spec: PathBuf,
    /// The output directory of the build to check (its NAME.yaml and NAME.lock.yaml).
    #[arg(long, value_name = "DIR")]
    pub against: PathBuf,
    /// Directory under which the rebuild's workspace and outputs are made.
    #[arg(long, default_value = DEFAULT_BUILD_DIR)]
    pub build_dir: PathBuf,
    /// Package and base-tree caches shared by builds.
    #[arg(long, default_value = DEFAULT_CACHE_DIR)]
    pub cache_dir: PathBuf,
    /// Rebuild without the caches.
    #[arg(long)]
    pub no_cache: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn trees_are_compared_by_content_type_link_and_times() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        for t in [&a, &b] {
            std::fs::create_dir_all(t.join("etc/sub")).unwrap();
            std::fs::write(t.join("etc/same"), "x").unwrap();
            std::fs::write(t.join("etc/sub/deep"), "y").unwrap();
        }
        assert!(tree_differences(&a, &b).is_empty());
        std::fs::write(a.join("etc/motd"), "one\n").unwrap();
        std::fs::write(a.join("etc/touched"), "t").unwrap();
        std::fs::write(b.join("etc/touched"), "t").unwrap();
        std::fs::write(b.join("etc/motd"), "two\n").unwrap();
        std::fs::write(a.join("etc/only-a"), "").unwrap();
        symlink("/x", a.join("etc/link")).unwrap();
        symlink("/y", b.join("etc/link")).unwrap();
        std::fs::write(b.join("etc/sub/deep"), "z").unwrap();
        std::fs::create_dir(b.join("etc/new")).unwrap();
        std::fs::write(a.join("etc/new"), "").unwrap();
        // The same times everywhere, but for one file.
        let st = Command::new("find")
            .arg(d.path())
            .args(["-exec", "touch", "-h", "-d", "@1700000000", "{}", "+"])
            .status()
            .unwrap();
        assert!(st.success());
        let st = Command::new("touch")
            .args(["-d", "@1700000001"])
            .arg(b.join("etc/touched"))
            .status()
            .unwrap();
        assert!(st.success());
        let d = tree_differences(&a, &b);
        assert_eq!(
            d,
            [
                "/etc/link: link target",
                "/etc/motd: content",
                "/etc/new: a regular file in the build checked, a directory in the rebuild",
                "/etc/only-a: only in the build checked",
                "/etc/sub/deep: content",
                "/etc/touched: modification time",
            ],
            "{d:#?}"
        );
    }
}
