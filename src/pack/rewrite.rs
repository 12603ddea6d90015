//! Images rewritten for a reproducible build once their tree is finished, in the finish stage:
//! an ext2/3/4 filesystem written afresh from its own tree by `mke2fs -d` ([`rewrite_ext`],
//! [`write_ext_from`]), since a filesystem the kernel wrote has its block placement, inode order
//! and change times from the build's own run; a FAT32 volume serial written into its boot
//! sector ([`set_fat_serial`]); a rewritten filesystem put back into its disk ([`splice`]).
//!
//! Beside [`super::shrink`], which works on the same images with the same e2fsprogs and their
//! clock ([`e2fs_env`]). The identifiers it writes are decided in [`crate::reproducible`]
//! (pure); this module attaches loop devices, mounts and runs programs.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::shrink::{e2fs_env, parse_dumpe2fs};
use crate::cmd::CommandRunExt;
use crate::root::Root;
use crate::spec::Fs;
use crate::sys::loopdev;
use crate::sys::mount::{self, MsFlags};

/// What [`rewrite_ext`] makes again.
pub struct ExtImage<'a> {
    pub fs: Fs,
    pub uuid: &'a str,
    pub label: Option<&'a str>,
    /// The spec's `mkfs_options`.
    pub options: &'a [String],
}

/// The `mke2fs` line that writes `image` (a file of its final size) from the directory
/// `source` (pure, so it can be tested).
pub fn mke2fs_command(img: &ExtImage, source: &Path, image: &Path, epoch: u64) -> Command {
    // mke2fs keeps only the last `-E`: the spec's extended options join the build's in one
    // (after them, so that the spec's win where both set one).
    let mut extended = format!("nodiscard,lazy_itable_init=0,hash_seed={}", img.uuid);
    let mut rest: Vec<&str> = Vec::new();
    let mut opts = img.options.iter().map(String::as_str);
    while let Some(o) = opts.next() {
        let value = match o.strip_prefix("-E") {
            Some("") => opts.next(),
            Some(v) => Some(v),
            None => {
                rest.push(o);
                continue;
            }
        };
        if let Some(v) = value.filter(|v| !v.is_empty()) {
            extended.push(',');
            extended.push_str(v);
        }
    }
    let mut cmd = Command::new("mke2fs");
    cmd.envs(e2fs_env(Some(epoch))).args([
        "-F",
        "-q",
        "-t",
        img.fs.name(),
        "-U",
        img.uuid,
        "-E",
        &extended,
    ]);
    if img.fs != Fs::Ext2 {
        // The journal is added once the image is checked, as for every build.
        cmd.args(["-O", "^has_journal"]);
    }
    if let Some(label) = img.label {
        cmd.args(["-L", label]);
    }
    cmd.args(rest).arg("-d").arg(source).arg(image);
    cmd
}

/// Writes the ext2/3/4 filesystem in `image` afresh from its own tree ([`write_ext_from`]);
/// the new file takes the old one's place.
pub fn rewrite_ext(img: &ExtImage, image: &Path, work: &Path, epoch: u64) -> Result<()> {
    let size = std::fs::metadata(image)
        .with_context(|| format!("reading the size of {}", image.display()))?
        .len();
    let fresh = image.with_extension("reproducible");
    let made = (|| -> Result<()> {
        // Writable: see write_ext_from. The old image is thrown away after.
        let dev = loopdev::attach(image, false)?;
        let res = write_ext_from(img, dev.path(), &fresh, size, work, epoch);
        dev.close()?;
        res
    })();
    if let Err(e) = made {
        let _ = std::fs::remove_file(&fresh);
        return Err(e);
    }
    std::fs::rename(&fresh, image)
        .with_context(|| format!("renaming {} to {}", fresh.display(), image.display()))
}

/// Writes the ext2/3/4 filesystem on the block device `dev` afresh into the new file `fresh`
/// of `size` bytes: `dev` is mounted (without access times) in `work` and its times clamped
/// again (the directories other filesystems were mounted on showed their own times until now,
/// so `dev` is changed), `mke2fs -d` copies the tree (entries in name order, inodes and blocks
/// in that order, superblock and creation times from `epoch`), and every inode's change time
/// is set to `epoch` with debugfs.
pub fn write_ext_from(
    img: &ExtImage,
    dev: &Path,
    fresh: &Path,
    size: u64,
    work: &Path,
    epoch: u64,
) -> Result<()> {
    let f = std::fs::File::create_new(fresh)
        .with_context(|| format!("creating {}", fresh.display()))?;
    f.set_len(size)
        .with_context(|| format!("sizing {}", fresh.display()))?;
    drop(f);
    with_mounted(dev, img.fs.name(), work, |source| {
        clamp_source(source, epoch)?;
        mke2fs_command(img, source, fresh, epoch)
            .run()
            .with_context(|| format!("writing {} afresh from its tree", dev.display()))
    })?;
    set_change_times(fresh, epoch)
}

/// Runs `f` on `dev` mounted (without access times, devices, set-id bits or execution) on a
/// new directory in `work`, unmounted and removed after.
fn with_mounted<T>(
    dev: &Path,
    fstype: &str,
    work: &Path,
    f: impl FnOnce(&Path) -> Result<T>,
) -> Result<T> {
    let source = work.join("reproducible-source");
    std::fs::create_dir(&source).with_context(|| format!("creating {}", source.display()))?;
    let res = (|| {
        let flags =
            MsFlags::MS_NOATIME | MsFlags::MS_NODEV | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
        let m = mount::mount(&dev.to_string_lossy(), &source, Some(fstype), flags, None)?;
        let res = f(&source);
        m.close()?;
        res
    })();
    let removed =
        std::fs::remove_dir(&source).with_context(|| format!("removing {}", source.display()));
    let out = res?;
    removed?;
    Ok(out)
}

/// Writes the volume serial `serial` (eight hex digits) into the FAT32 boot sector of `image`
/// (a file or a device) and into its backup: `mkfs.fat --invariant`, which takes no clock and
/// draws no random number, also ignores `-i`.
pub fn set_fat_serial(image: &Path, serial: &str) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let id = u32::from_str_radix(serial, 16)
        .with_context(|| format!("the FAT serial {serial:?} is not eight hex digits"))?;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .with_context(|| format!("opening {}", image.display()))?;
    let mut bpb = [0u8; 512];
    f.read_exact_at(&mut bpb, 0)
        .with_context(|| format!("reading the boot sector of {}", image.display()))?;
    let sector = u64::from(u16::from_le_bytes([bpb[11], bpb[12]]));
    let backup = u64::from(u16::from_le_bytes([bpb[50], bpb[51]]));
    if bpb[510..512] != [0x55, 0xaa] || sector == 0 || bpb[66] != 0x29 {
        bail!("{} has no FAT32 boot sector", image.display());
    }
    // BS_VolID: offset 67 of a FAT32 boot sector.
    f.write_all_at(&id.to_le_bytes(), 67)
        .with_context(|| format!("writing the serial of {}", image.display()))?;
    if backup != 0 {
        f.write_all_at(&id.to_le_bytes(), backup * sector + 67)
            .with_context(|| format!("writing the serial of {}", image.display()))?;
    }
    Ok(())
}

/// Puts the filesystem image `fresh` into `disk` at `offset`, over `len` bytes that held the old
/// one: the range is emptied first (a hole: no old block survives in the free space), then only
/// `fresh`'s data is written.
pub fn splice(fresh: &Path, disk: &Path, offset: u64, len: u64) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let src = std::fs::File::open(fresh).with_context(|| format!("opening {}", fresh.display()))?;
    let size = src.metadata()?.len();
    if size > len {
        bail!(
            "{} ({size} bytes) does not fit its partition ({len} bytes)",
            fresh.display()
        );
    }
    let dst = std::fs::OpenOptions::new()
        .write(true)
        .open(disk)
        .with_context(|| format!("opening {}", disk.display()))?;
    nix::fcntl::fallocate(
        &dst,
        nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
            | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
        offset as i64,
        len as i64,
    )
    .with_context(|| format!("emptying a partition of {}", disk.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < size {
        let data = match nix::unistd::lseek(&src, pos as i64, nix::unistd::Whence::SeekData) {
            Ok(d) => d as u64,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(e).context(format!("reading {}", fresh.display())),
        };
        let hole = nix::unistd::lseek(&src, data as i64, nix::unistd::Whence::SeekHole)
            .with_context(|| format!("reading {}", fresh.display()))? as u64;
        let mut at = data;
        while at < hole {
            let n = buf.len().min((hole - at) as usize);
            src.read_exact_at(&mut buf[..n], at)
                .with_context(|| format!("reading {}", fresh.display()))?;
            dst.write_all_at(&buf[..n], offset + at)
                .with_context(|| format!("writing into {}", disk.display()))?;
            at += n as u64;
        }
        pos = hole;
    }
    dst.sync_all()
        .with_context(|| format!("syncing {}", disk.display()))
}

fn clamp_source(source: &Path, epoch: u64) -> Result<()> {
    let epoch = i64::try_from(epoch).context("source_date_epoch is out of range")?;
    Root::open(source)?.clamp_times(epoch)?;
    Ok(())
}

/// Sets the change time of every inode in use in the ext image to `epoch` (mke2fs -d takes it
/// from the source, where only the kernel's clock can set it).
fn set_change_times(image: &Path, epoch: u64) -> Result<()> {
    let groups = Command::new("dumpe2fs")
        .envs(e2fs_env(Some(epoch)))
        .arg(image)
        .run_stdout()
        .with_context(|| format!("reading the inode bitmaps of {}", image.display()))?;
    let info = parse_dumpe2fs(&groups)?;
    let used = used_inodes(&groups, info.inode_count)?;
    let mut script = String::new();
    for ino in used {
        script.push_str(&format!("sif <{ino}> ctime @{epoch}\n"));
    }
    let file = image.with_extension("debugfs");
    std::fs::write(&file, script).with_context(|| format!("writing {}", file.display()))?;
    let res = Command::new("debugfs")
        .envs(e2fs_env(Some(epoch)))
        .arg("-w")
        .arg("-f")
        .arg(&file)
        .arg(image)
        .run_accepting_output(&[0])
        .with_context(|| format!("setting the change times in {}", image.display()));
    let _ = std::fs::remove_file(&file);
    // debugfs exits 0 whatever its commands met: anything on stderr but its banner fails.
    let (_, _, stderr) = res?;
    if let Some(line) = stderr.iter().find(|l| !l.starts_with("debugfs ")) {
        bail!("debugfs on {}: {line}", image.display());
    }
    Ok(())
}

/// Inodes in use, from `dumpe2fs`'s per-group `Free inodes:` ranges (pure, tested): every inode
/// from 1 to `count` that no range names.
pub fn used_inodes(dumpe2fs: &str, count: u64) -> Result<Vec<u64>> {
    let mut free = vec![false; count as usize + 1];
    for line in dumpe2fs.lines() {
        let Some(ranges) = line.trim().strip_prefix("Free inodes:") else {
            continue;
        };
        for r in ranges.split(',').map(str::trim).filter(|r| !r.is_empty()) {
            let (a, b) = r.split_once('-').unwrap_or((r, r));
            let (a, b): (u64, u64) = (
                a.parse()
                    .with_context(|| format!("dumpe2fs free inodes {r:?}"))?,
                b.parse()
                    .with_context(|| format!("dumpe2fs free inodes {r:?}"))?,
            );
            if a == 0 || b < a || b > count {
                bail!("dumpe2fs free inodes {r:?} outside 1-{count}");
            }
            for i in a..=b {
                free[i as usize] = true;
            }
        }
    }
    Ok((1..=count).filter(|&i| !free[i as usize]).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn used_inodes_are_those_no_free_range_names() {
        let text = "Group 0: (Blocks 1-8192)\n  Free inodes: 14-16, 18\nGroup 1:\n  Free inodes: 21-24\n  Free inodes: \n";
        assert_eq!(
            used_inodes(text, 24).unwrap(),
            vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 17, 19, 20]
        );
        assert!(used_inodes("  Free inodes: 5-30\n", 24).is_err());
        assert!(used_inodes("  Free inodes: x-3\n", 24).is_err());
    }

    #[test]
    fn mke2fs_writes_from_the_tree_with_the_spec_s_identity() {
        let opts = vec!["-m".to_string(), "0".to_string()];
        let img = ExtImage {
            fs: Fs::Ext4,
            uuid: "u-1",
            label: Some("root"),
            options: &opts,
        };
        let cmd = mke2fs_command(&img, Path::new("/w/src"), Path::new("/w/r.img"), 1700000000);
        let line = crate::cmd::command_line(&cmd);
        assert_eq!(
            line,
            "mke2fs -F -q -t ext4 -U u-1 -E nodiscard,lazy_itable_init=0,hash_seed=u-1 -O ^has_journal -L root -m 0 -d /w/src /w/r.img"
        );
        // The spec's own extended options join the build's: mke2fs keeps only the last -E.
        let opts: Vec<String> = ["-E", "stride=8", "-m", "1", "-Estripe_width=16"]
            .map(String::from)
            .to_vec();
        let line = crate::cmd::command_line(&mke2fs_command(
            &ExtImage {
                options: &opts,
                ..img
            },
            Path::new("/s"),
            Path::new("/i"),
            1,
        ));
        assert_eq!(
            line,
            "mke2fs -F -q -t ext4 -U u-1 -E nodiscard,lazy_itable_init=0,hash_seed=u-1,stride=8,stripe_width=16 -O ^has_journal -L root -m 1 -d /s /i"
        );
        let env: Vec<_> = cmd.get_envs().collect();
        let at = Some(std::ffi::OsStr::new("1700000000"));
        assert!(
            env.contains(&(std::ffi::OsStr::new("E2FSPROGS_FAKE_TIME"), at)),
            "{env:?}"
        );
        assert!(
            env.contains(&(std::ffi::OsStr::new("E2FSCK_TIME"), at)),
            "{env:?}"
        );
    }
}
