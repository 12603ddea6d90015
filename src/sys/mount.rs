//! Mounts and the mount table: the `Mount` guard, unmounting everything under a directory deepest
//! first, and deleting a tree only when no mount can be reached through it.
//!
//! Unmounting is never lazy (`MNT_DETACH`): a lazy unmount hides a busy mount instead of fixing it
//! and leaves the host dirty. Busy mounts get a bounded retry, then an error naming them.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::mount::MntFlags;
/// Re-exported so that callers of [`mount`] need no nix import of their own.
pub use nix::mount::MsFlags;
use nix::sys::stat::{Mode, SFlag};
use nix::unistd::UnlinkatFlags;

const MOUNTINFO: &str = "/proc/self/mountinfo";
const UNMOUNT_ATTEMPTS: u32 = 10;
const UNMOUNT_RETRY_PAUSE: Duration = Duration::from_millis(200);

/// A filesystem mounted by us, unmounted by [`Mount::close`] (or best-effort on drop).
#[must_use = "dropping a Mount unmounts it"]
#[derive(Debug)]
pub struct Mount {
    target: PathBuf,
    mounted: bool,
}

/// Mounts `source` on `target` and returns the guard that unmounts it.
///
/// The target is canonicalized first, so the guard unmounts exactly the directory the kernel
/// mounted on. Flags that change an existing mount instead of creating one (`MS_REMOUNT`,
/// `MS_MOVE`, propagation flags) are refused: a guard for them would unmount something it never
/// mounted. Use [`Mount::remount`] for a read-only bind mount.
pub fn mount(
    source: &str,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<Mount> {
    check_creating(source, target, flags)?;
    let resolved = target
        .canonicalize()
        .with_context(|| format!("resolving mount target {}", target.display()))?;
    mount_at(source, &resolved, resolved.clone(), fstype, flags, data)
}

/// Mounts `source` on the directory `target` holds open (an `O_PATH` or directory descriptor)
/// and returns the guard that unmounts it. The mount goes exactly where the descriptor points,
/// through its `/proc/self/fd` link, whatever a path to it would resolve to by now.
pub fn mount_on_fd(
    source: &str,
    target: BorrowedFd<'_>,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<Mount> {
    let link = PathBuf::from(format!("/proc/self/fd/{}", target.as_raw_fd()));
    let shown = fs::read_link(&link).with_context(|| format!("reading {}", link.display()))?;
    check_creating(source, &shown, flags)?;
    mount_at(source, &link, shown, fstype, flags, data)
}

/// Refuses flags that change an existing mount instead of creating one: a guard for them would
/// unmount something it never mounted.
fn check_creating(source: &str, target: &Path, flags: MsFlags) -> Result<()> {
    let not_creating = MsFlags::MS_REMOUNT
        | MsFlags::MS_MOVE
        | MsFlags::MS_SHARED
        | MsFlags::MS_PRIVATE
        | MsFlags::MS_SLAVE
        | MsFlags::MS_UNBINDABLE;
    if flags.intersects(not_creating) {
        bail!(
            "mounting {source} on {}: flags {:?} change an existing mount rather than create one",
            target.display(),
            flags & not_creating
        );
    }
    Ok(())
}

/// The mount itself on `path` (what the kernel resolves), held as a guard for `target` (where
/// it lands, for unmounting and messages).
fn mount_at(
    source: &str,
    path: &Path,
    target: PathBuf,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<Mount> {
    nix::mount::mount(Some(source), path, fstype, flags, data).with_context(|| {
        format!(
            "mounting {source} on {} (type {})",
            target.display(),
            fstype.unwrap_or("none")
        )
    })?;
    tracing::debug!("mounted {source} on {}", target.display());
    Ok(Mount {
        target,
        mounted: true,
    })
}

impl Mount {
    /// Where the filesystem is mounted (canonicalized).
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Changes the flags of this mount; `MS_REMOUNT` is added. A bind mount becomes read-only
    /// with `MS_BIND | MS_RDONLY`.
    pub fn remount(&self, flags: MsFlags, data: Option<&str>) -> Result<()> {
        nix::mount::mount(
            None::<&str>,
            &self.target,
            None::<&str>,
            flags | MsFlags::MS_REMOUNT,
            data,
        )
        .with_context(|| format!("remounting {} with {flags:?}", self.target.display()))
    }

    /// Unmounts, retrying a bounded number of times while the mount is busy.
    ///
    /// A target that is no longer a mount point (unmounted by someone else, e.g.
    /// [`unmount_all_under`]) counts as done.
    pub fn close(mut self) -> Result<()> {
        self.unmount()
    }

    fn unmount(&mut self) -> Result<()> {
        if !self.mounted {
            return Ok(());
        }
        self.mounted = false;
        match unmount_with_retry(&self.target) {
            Ok(()) => Ok(()),
            Err(Errno::EINVAL | Errno::ENOENT) if !is_mount_point(&self.target)? => {
                tracing::debug!("{} was already unmounted", self.target.display());
                Ok(())
            }
            Err(e) => Err(unmount_error(&self.target, e)),
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if !self.mounted {
            return;
        }
        tracing::warn!(
            "mount on {} dropped without close; unmounting",
            self.target.display()
        );
        if let Err(e) = self.unmount() {
            tracing::warn!("{e:#}");
        }
    }
}

/// `umount2` without following a symlink at the target, retried while `EBUSY`.
fn unmount_with_retry(target: &Path) -> nix::Result<()> {
    let mut attempt = 1;
    loop {
        match nix::mount::umount2(target, MntFlags::UMOUNT_NOFOLLOW) {
            Ok(()) => {
                tracing::debug!("unmounted {}", target.display());
                return Ok(());
            }
            Err(Errno::EBUSY) if attempt < UNMOUNT_ATTEMPTS => {
                tracing::debug!("{} is busy (attempt {attempt}), retrying", target.display());
                attempt += 1;
                thread::sleep(UNMOUNT_RETRY_PAUSE);
            }
            Err(e) => return Err(e),
        }
    }
}

fn unmount_error(target: &Path, e: Errno) -> anyhow::Error {
    let why = if e == Errno::EBUSY {
        format!(
            "still busy after {UNMOUNT_ATTEMPTS} tries over {} s (a process still uses it?)",
            (UNMOUNT_ATTEMPTS * UNMOUNT_RETRY_PAUSE).as_secs()
        )
    } else {
        e.to_string()
    };
    anyhow::anyhow!("unmounting {}: {why}", target.display())
}

/// One line of `/proc/self/mountinfo` (see proc(5)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    /// The mount's unique id in this namespace.
    pub id: u32,
    /// The id of the mount this one sits on.
    pub parent_id: u32,
    /// `major:minor` of the filesystem's device (`0:N` for virtual ones).
    pub major: u32,
    /// See `major`.
    pub minor: u32,
    /// The directory of the filesystem that is mounted here (not `/` for bind mounts of a subtree).
    pub root: PathBuf,
    /// Where it is mounted, as seen from this process's root.
    pub mount_point: PathBuf,
    /// Per-mount options (`rw,nosuid,relatime`).
    pub options: String,
    /// Filesystem type (`ext4`, `tmpfs`).
    pub fstype: String,
    /// What was mounted (`/dev/loop3`, `proc`).
    pub source: String,
    /// Per-filesystem options.
    pub super_options: String,
}

/// Parses the text of `/proc/PID/mountinfo`, decoding the kernel's octal escapes (`\040`).
pub fn parse_mountinfo(text: &[u8]) -> Result<Vec<MountInfo>> {
    text.split(|&b| b == b'\n')
        .filter(|line| !line.is_empty())
        .map(|line| {
            parse_mountinfo_line(line).with_context(|| {
                format!("parsing mountinfo line {:?}", String::from_utf8_lossy(line))
            })
        })
        .collect()
}

fn parse_mountinfo_line(line: &[u8]) -> Result<MountInfo> {
    let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
    // Optional fields (shared:N, master:N, ...) run until a lone "-".
    let sep = fields
        .iter()
        .skip(6)
        .position(|f| *f == b"-")
        .map(|p| p + 6)
        .context("no \"-\" separator")?;
    if fields.len() < sep + 4 {
        bail!("too few fields");
    }
    let text = |f: &[u8]| String::from_utf8_lossy(&unescape(f)).into_owned();
    let number = |f: &[u8], what: &str| -> Result<u32> {
        std::str::from_utf8(f)
            .ok()
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad {what} {:?}", String::from_utf8_lossy(f)))
    };
    let (major, minor) = fields[2]
        .iter()
        .position(|&b| b == b':')
        .map(|p| fields[2].split_at(p))
        .context("bad major:minor")?;
    Ok(MountInfo {
        id: number(fields[0], "mount id")?,
        parent_id: number(fields[1], "parent id")?,
        major: number(major, "major")?,
        minor: number(&minor[1..], "minor")?,
        root: PathBuf::from(OsString::from_vec(unescape(fields[3]))),
        mount_point: PathBuf::from(OsString::from_vec(unescape(fields[4]))),
        options: text(fields[5]),
        fstype: text(fields[sep + 1]),
        source: text(fields[sep + 2]),
        super_options: text(fields[sep + 3]),
    })
}

/// Decodes the `\ooo` escapes the kernel writes for space, tab, newline and backslash.
fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let octal = field.get(i + 1..i + 4).filter(|d| {
            field[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)) && d[0] <= b'3'
        });
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(field[i]);
                i += 1;
            }
        }
    }
    out
}

/// The mount points at or below `dir`, deepest first; a path mounted on twice appears twice.
///
/// Pure: `dir` must already be canonical, as mountinfo paths are.
pub fn select_mount_points_under(entries: &[MountInfo], dir: &Path) -> Vec<PathBuf> {
    // Later entries were mounted later, so they go first among equals.
    let mut points: Vec<PathBuf> = entries
        .iter()
        .rev()
        .filter(|e| e.mount_point.starts_with(dir))
        .map(|e| e.mount_point.clone())
        .collect();
    // Stable: keeps the newest-first order within a depth.
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points
}

fn read_mountinfo() -> Result<Vec<MountInfo>> {
    let text = fs::read(MOUNTINFO).with_context(|| format!("reading {MOUNTINFO}"))?;
    parse_mountinfo(&text).with_context(|| format!("parsing {MOUNTINFO}"))
}

fn is_mount_point(path: &Path) -> Result<bool> {
    Ok(read_mountinfo()?.iter().any(|e| e.mount_point == path))
}

/// Every mount point at or below `dir` (canonicalized), deepest first, from the mount table of
/// this process's mount namespace.
pub fn mount_points_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let dir = dir
        .canonicalize()
        .with_context(|| format!("resolving {}", dir.display()))?;
    Ok(select_mount_points_under(&read_mountinfo()?, &dir))
}

/// Unmounts every mount point at or below `dir`, deepest first, each with a bounded retry while
/// busy and never lazily. The error lists what stayed mounted.
pub fn unmount_all_under(dir: &Path) -> Result<()> {
    let points = mount_points_under(dir)?;
    let mut failures = Vec::new();
    for point in &points {
        match unmount_with_retry(point) {
            // Already gone, e.g. through mount propagation from an earlier unmount.
            Ok(()) | Err(Errno::EINVAL | Errno::ENOENT) => {}
            Err(e) => failures.push(format!("{:#}", unmount_error(point, e))),
        }
    }
    let left = mount_points_under(dir)?;
    if !left.is_empty() {
        let left: Vec<_> = left.iter().map(|p| p.display().to_string()).collect();
        let mut msg = format!(
            "unmounting everything under {}: still mounted: {}",
            dir.display(),
            left.join(", ")
        );
        if !failures.is_empty() {
            msg.push_str(&format!(" ({})", failures.join("; ")));
        }
        bail!(msg);
    }
    Ok(())
}

/// Deletes `dir` recursively, refusing to reach any other filesystem.
///
/// Refuses outright (and deletes nothing) if a mount point is at or below `dir`. Symlinks are
/// removed, never followed: each directory is opened relative to its parent's descriptor with
/// `O_NOFOLLOW`, so a directory swapped for a symlink mid-walk is not entered either. An entry on
/// another device than `dir` (a mount in another namespace, a btrfs subvolume) stops the deletion
/// with an error instead of being descended into; what was deleted before that stays deleted.
/// If `dir` itself is a symlink, only the link is removed.
pub fn remove_dir_all_safe(dir: &Path) -> Result<()> {
    let meta =
        fs::symlink_metadata(dir).with_context(|| format!("inspecting {}", dir.display()))?;
    if meta.file_type().is_symlink() {
        return fs::remove_file(dir).with_context(|| format!("removing symlink {}", dir.display()));
    }
    let mounts = mount_points_under(dir)?;
    if !mounts.is_empty() {
        let mounts: Vec<_> = mounts.iter().map(|p| p.display().to_string()).collect();
        bail!(
            "refusing to delete {}: mount points below it: {}",
            dir.display(),
            mounts.join(", ")
        );
    }
    remove_tree_same_device(dir)
}

/// [`remove_dir_all_safe`] of the directory `name` in the open directory `parent`, reached only
/// through descriptors (`path` names it in messages). Refused, deleting nothing, when `name` is
/// not a directory (a link is not followed), is a mount point or has one below it.
pub fn remove_dir_all_at(parent: BorrowedFd<'_>, name: &OsStr, path: &Path) -> Result<()> {
    let parent_fd = parent
        .try_clone_to_owned()
        .with_context(|| format!("opening the directory of {}", path.display()))?;
    let fd = open_dir_nofollow(Some(&parent_fd), name)
        .with_context(|| format!("opening {} (a link is not followed)", path.display()))?;
    let dev = nix::sys::stat::fstat(&fd)
        .with_context(|| format!("inspecting {}", path.display()))?
        .st_dev;
    let parent_dev = nix::sys::stat::fstat(&parent_fd)
        .with_context(|| format!("inspecting the directory of {}", path.display()))?
        .st_dev;
    // Where the descriptor really is: the mount table speaks of canonical paths.
    let real = fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .with_context(|| format!("resolving {}", path.display()))?;
    let mounts = mount_points_under(&real)?;
    if dev != parent_dev || !mounts.is_empty() {
        let mut shown: Vec<_> = mounts.iter().map(|p| p.display().to_string()).collect();
        if shown.is_empty() {
            shown.push(path.display().to_string());
        }
        bail!(
            "refusing to delete {}: mount points at or below it: {}",
            path.display(),
            shown.join(", ")
        );
    }
    empty_dir(&fd, path, dev)?;
    drop(fd);
    nix::unistd::unlinkat(&parent_fd, name, UnlinkatFlags::RemoveDir)
        .with_context(|| format!("removing {}", path.display()))
}

/// The deletion itself, without the mount table check (tested on its own).
fn remove_tree_same_device(dir: &Path) -> Result<()> {
    let fd = open_dir_nofollow(None, dir.as_os_str())
        .with_context(|| format!("opening {}", dir.display()))?;
    let dev = nix::sys::stat::fstat(&fd)
        .with_context(|| format!("inspecting {}", dir.display()))?
        .st_dev;
    empty_dir(&fd, dir, dev)?;
    drop(fd);
    fs::remove_dir(dir).with_context(|| format!("removing {}", dir.display()))
}

fn open_dir_nofollow(parent: Option<&OwnedFd>, name: &OsStr) -> nix::Result<OwnedFd> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    match parent {
        Some(p) => nix::fcntl::openat(p, name, flags, Mode::empty()),
        None => nix::fcntl::open(name, flags, Mode::empty()),
    }
}

/// Empties the tree at `dir` spanning the filesystems mounted in it, which must all be in
/// `allowed` (anything else mounted there, a bind of a host directory say, refuses the whole
/// operation before anything is removed): every entry goes, but the directories those
/// filesystems are mounted on stay, emptied, as does the `lost+found` of each filesystem's
/// root. Nothing is followed.
pub fn empty_spanning_mounts(dir: &Path, allowed: &[PathBuf]) -> Result<()> {
    let real = dir
        .canonicalize()
        .with_context(|| format!("resolving {}", dir.display()))?;
    let allowed: Vec<PathBuf> = allowed
        .iter()
        .filter_map(|p| p.canonicalize().ok())
        .collect();
    let points = mount_points_under(&real)?;
    if let Some(p) = points.iter().find(|p| !allowed.contains(p)) {
        bail!(
            "refusing to empty {}: {} is mounted in it and is not one of its own filesystems",
            real.display(),
            p.display()
        );
    }
    let fd = open_dir_nofollow(None, real.as_os_str())
        .with_context(|| format!("opening {}", real.display()))?;
    empty_keeping(&fd, &real, &points)
}

fn empty_keeping(fd: &OwnedFd, path: &Path, points: &[PathBuf]) -> Result<()> {
    let listing = format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd());
    let names: Vec<OsString> = fs::read_dir(&listing)
        .with_context(|| format!("listing {}", path.display()))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("listing {}", path.display()))?;
    let fs_root = points.iter().any(|p| p == path);
    for name in names {
        let child = path.join(&name);
        if fs_root && name == "lost+found" {
            continue;
        }
        if points.iter().any(|p| p.starts_with(&child)) {
            let sub = open_dir_nofollow(Some(fd), &name)
                .with_context(|| format!("opening {}", child.display()))?;
            empty_keeping(&sub, &child, points)?;
            continue;
        }
        match nix::unistd::unlinkat(fd, name.as_os_str(), UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => {}
            Err(Errno::EISDIR) => remove_dir_all_at(fd.as_fd(), &name, &child)?,
            Err(e) => return Err(e).with_context(|| format!("removing {}", child.display())),
        }
    }
    Ok(())
}

/// Deletes everything inside the open directory `fd` (shown as `path` in errors).
fn empty_dir(fd: &OwnedFd, path: &Path, dev: u64) -> Result<()> {
    // Listing through the descriptor's /proc link reads exactly the directory we opened, whatever
    // happened to its path since.
    let listing = format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd());
    let names: Vec<OsString> = fs::read_dir(&listing)
        .with_context(|| format!("listing {}", path.display()))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("listing {}", path.display()))?;
    for name in names {
        let child = path.join(&name);
        let st = nix::sys::stat::fstatat(fd, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
            .with_context(|| format!("inspecting {}", child.display()))?;
        if st.st_dev != dev {
            bail!(
                "refusing to delete {}: it is on another filesystem than {}",
                child.display(),
                path.display()
            );
        }
        let is_dir = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFDIR;
        if is_dir {
            let sub = open_dir_nofollow(Some(fd), &name)
                .with_context(|| format!("opening {}", child.display()))?;
            let sub_dev = nix::sys::stat::fstat(&sub)
                .with_context(|| format!("inspecting {}", child.display()))?
                .st_dev;
            // Checked again on the opened directory: the entry may have changed since fstatat.
            if sub_dev != dev {
                bail!(
                    "refusing to delete {}: it is on another filesystem than {}",
                    child.display(),
                    path.display()
                );
            }
            empty_dir(&sub, &child, dev)?;
            drop(sub);
            nix::unistd::unlinkat(fd, name.as_os_str(), UnlinkatFlags::RemoveDir)
                .with_context(|| format!("removing directory {}", child.display()))?;
        } else {
            nix::unistd::unlinkat(fd, name.as_os_str(), UnlinkatFlags::NoRemoveDir)
                .with_context(|| format!("removing {}", child.display()))?;
        }
    }
    Ok(())
}

/// Mounts held in the order they were made (parents first) and unmounted in reverse, also
/// when dropped: the image's filesystems, the chroot's API filesystems, bind mounts.
#[derive(Default)]
pub struct MountStack(Vec<Mount>);

impl MountStack {
    /// Holds a mount made after every one already held.
    pub fn push(&mut self, m: Mount) {
        self.0.push(m);
    }

    /// The mount points, outermost first.
    pub fn points(&self) -> Vec<PathBuf> {
        self.0.iter().map(|m| m.target().to_path_buf()).collect()
    }

    /// Flushes every filesystem, then unmounts them deepest first. One sync for the whole build
    /// (dpkg skipped its own); syncfs also reports writes the kernel failed to store, which
    /// unmount would swallow.
    pub fn sync_and_unmount(&mut self) -> Result<()> {
        for m in self.0.iter().rev() {
            syncfs(m.target())?;
        }
        while let Some(m) = self.0.pop() {
            m.close()?;
        }
        Ok(())
    }

    /// Takes the mount made last off the stack, for the caller to close.
    pub fn pop(&mut self) -> Option<Mount> {
        self.0.pop()
    }

    /// How many mounts it holds.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Unmounts every mount, deepest first; the first failure stops it.
    pub fn unmount(&mut self) -> Result<()> {
        while let Some(m) = self.0.pop() {
            m.close()?;
        }
        Ok(())
    }

    /// Unmounts what is left, deepest first, logging failures.
    pub fn unmount_logging(&mut self) {
        while let Some(m) = self.0.pop() {
            if let Err(e) = m.close() {
                tracing::warn!("{e:#}");
            }
        }
    }
}

impl Drop for MountStack {
    fn drop(&mut self) {
        self.unmount_logging();
    }
}

/// Flushes the filesystem holding `path` and reports any write it lost.
pub fn syncfs(path: &Path) -> Result<()> {
    let f = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    nix::unistd::syncfs(&f).with_context(|| {
        format!(
            "flushing the filesystem at {}: writes were lost",
            path.display()
        )
    })
}

/// Unmounts, deepest first, every mount under `dir` that is not one of `keep` (mounts a tool
/// made on its own, such as debootstrap's proc).
pub fn unmount_all_under_except(dir: &Path, keep: &[PathBuf]) -> Result<()> {
    for point in mount_points_under(dir)? {
        if keep.iter().any(|k| k == &point) {
            continue;
        }
        unmount_all_under(&point)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// Lines captured from a Debian 12 host, plus a build root with escaped names and a stacked
    /// mount.
    const FIXTURE: &[u8] = b"\
22 27 0:21 / /proc rw,relatime - proc proc rw
23 27 0:22 / /sys rw,relatime - sysfs sysfs rw
24 27 0:6 / /dev rw,relatime - devtmpfs devtmpfs rw,size=12334492k,nr_inodes=3083623,mode=755
26 24 0:24 / /dev/pts rw,relatime - devpts devpts rw,mode=600,ptmxmode=000
27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
50 27 7:3 / /var/tmp/build\\040one/root rw,relatime shared:20 master:3 - ext4 /dev/loop3 rw
51 50 7:4 / /var/tmp/build\\040one/root/boot rw,relatime - ext2 /dev/loop4 rw
52 50 0:40 / /var/tmp/build\\040one/root/proc rw,nosuid - proc proc rw
53 50 254:0 /srv/cache /var/tmp/build\\040one/root/var/cache/apt rw - ext4 /dev/vda rw
54 52 0:41 / /var/tmp/build\\040one/root/proc rw - tmpfs tmp\\011fs rw
55 27 0:42 / /var/tmp/build\\040one/rootfs rw - tmpfs tmpfs rw
";

    #[test]
    fn parses_fields_and_escapes() {
        let entries = parse_mountinfo(FIXTURE).unwrap();
        assert_eq!(entries.len(), 12);
        let root = &entries[4];
        assert_eq!(root.mount_point, Path::new("/"));
        assert_eq!(root.fstype, "ext4");
        assert_eq!(root.source, "/dev/vda");
        assert_eq!((root.major, root.minor), (254, 0));
        assert_eq!(root.super_options, "rw,discard");
        let build = &entries[6];
        assert_eq!(build.id, 50);
        assert_eq!(build.parent_id, 27);
        assert_eq!(build.mount_point, Path::new("/var/tmp/build one/root"));
        assert_eq!(build.source, "/dev/loop3");
        let cache = &entries[9];
        assert_eq!(cache.root, Path::new("/srv/cache"));
        assert_eq!(entries[10].source, "tmp\tfs");
    }

    #[test]
    fn unescape_leaves_non_escapes_alone() {
        assert_eq!(unescape(b"a\\040b"), b"a b");
        assert_eq!(unescape(b"a\\134b"), b"a\\b");
        assert_eq!(unescape(b"a\\09b\\"), b"a\\09b\\");
    }

    #[test]
    fn rejects_malformed_lines() {
        assert!(parse_mountinfo(b"22 27 0:21 / /proc rw,relatime proc proc rw\n").is_err());
        assert!(parse_mountinfo(b"x 27 0:21 / /proc rw - proc proc rw\n").is_err());
    }

    #[test]
    fn selects_mounts_under_a_dir_deepest_first() {
        let entries = parse_mountinfo(FIXTURE).unwrap();
        let points = select_mount_points_under(&entries, Path::new("/var/tmp/build one/root"));
        let expected = [
            "/var/tmp/build one/root/var/cache/apt",
            "/var/tmp/build one/root/proc",
            "/var/tmp/build one/root/proc",
            "/var/tmp/build one/root/boot",
            "/var/tmp/build one/root",
        ];
        assert_eq!(points, expected.map(PathBuf::from));
        // A sibling sharing a name prefix ("rootfs") is not under "root".
        assert!(!points.contains(&PathBuf::from("/var/tmp/build one/rootfs")));
        assert!(select_mount_points_under(&entries, Path::new("/nonexistent")).is_empty());
    }

    #[test]
    fn reads_the_live_mount_table() {
        let points = mount_points_under(Path::new("/proc")).unwrap();
        assert_eq!(points.last().unwrap(), Path::new("/proc"));
    }

    fn is_root() -> bool {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipping: needs root to mount");
            return false;
        }
        true
    }

    fn tempdir() -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix("debimg-mount-test-")
            .tempdir_in("/var/tmp")
            .unwrap()
    }

    #[test]
    fn mount_guard_unmounts_on_close_and_on_drop() {
        if !is_root() {
            eprintln!("skipped: needs root (mounts)");
            return;
        }
        let dir = tempdir();
        let m = mount(
            "tmpfs",
            dir.path(),
            Some("tmpfs"),
            MsFlags::empty(),
            Some("size=1m"),
        )
        .unwrap();
        assert_eq!(mount_points_under(dir.path()).unwrap(), [m.target()]);
        m.remount(MsFlags::MS_RDONLY, None).unwrap();
        assert!(fs::write(dir.path().join("x"), b"x").is_err());
        m.close().unwrap();
        assert!(mount_points_under(dir.path()).unwrap().is_empty());

        let m = mount("tmpfs", dir.path(), Some("tmpfs"), MsFlags::empty(), None).unwrap();
        drop(m);
        assert!(mount_points_under(dir.path()).unwrap().is_empty());
    }

    #[test]
    fn mount_refuses_flags_that_create_nothing() {
        let err = mount(
            "none",
            Path::new("/"),
            None,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None,
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("existing mount"), "{err:#}");
    }

    #[test]
    fn busy_mount_is_reported_by_name_and_retried() {
        if !is_root() {
            eprintln!("skipped: needs root (mounts)");
            return;
        }
        let dir = tempdir();
        let m = mount("tmpfs", dir.path(), Some("tmpfs"), MsFlags::empty(), None).unwrap();
        let held = fs::File::create(dir.path().join("held")).unwrap();
        let target = m.target().to_path_buf();
        // Release the file while close() is still retrying.
        let releaser = thread::spawn(move || {
            thread::sleep(Duration::from_millis(500));
            drop(held);
        });
        m.close().unwrap();
        releaser.join().unwrap();
        assert!(!is_mount_point(&target).unwrap());

        let m = mount("tmpfs", dir.path(), Some("tmpfs"), MsFlags::empty(), None).unwrap();
        let held = fs::File::create(dir.path().join("held")).unwrap();
        let err = unmount_all_under(dir.path()).unwrap_err();
        assert!(
            format!("{err:#}").contains(&*target.to_string_lossy()),
            "{err:#}"
        );
        drop(held);
        m.close().unwrap();
    }

    #[test]
    fn unmount_all_under_unmounts_nested_mounts() {
        if !is_root() {
            eprintln!("skipped: needs root (mounts)");
            return;
        }
        let dir = tempdir();
        let outer = mount("tmpfs", dir.path(), Some("tmpfs"), MsFlags::empty(), None).unwrap();
        fs::create_dir_all(dir.path().join("a/b")).unwrap();
        let inner = mount(
            "tmpfs",
            &dir.path().join("a/b"),
            Some("tmpfs"),
            MsFlags::empty(),
            None,
        )
        .unwrap();
        let stacked = mount(
            "tmpfs",
            &dir.path().join("a/b"),
            Some("tmpfs"),
            MsFlags::empty(),
            None,
        )
        .unwrap();
        assert_eq!(mount_points_under(dir.path()).unwrap().len(), 3);
        unmount_all_under(dir.path()).unwrap();
        assert!(mount_points_under(dir.path()).unwrap().is_empty());
        // The guards see that their mounts are gone and succeed.
        stacked.close().unwrap();
        inner.close().unwrap();
        outer.close().unwrap();
    }

    #[test]
    fn remove_refuses_a_tree_with_a_mount_inside() {
        if !is_root() {
            eprintln!("skipped: needs root (mounts)");
            return;
        }
        let dir = tempdir();
        let tree = dir.path().join("tree");
        fs::create_dir_all(tree.join("proc")).unwrap();
        fs::write(tree.join("file"), b"keep").unwrap();
        let m = mount(
            "tmpfs",
            &tree.join("proc"),
            Some("tmpfs"),
            MsFlags::empty(),
            None,
        )
        .unwrap();
        fs::write(tree.join("proc/inside"), b"keep").unwrap();

        let err = remove_dir_all_safe(&tree).unwrap_err();
        assert!(format!("{err:#}").contains("proc"), "{err:#}");
        assert_eq!(fs::read(tree.join("file")).unwrap(), b"keep");
        assert_eq!(fs::read(tree.join("proc/inside")).unwrap(), b"keep");

        // Without the mount table check, the device check alone still refuses to descend.
        let err = remove_tree_same_device(&tree).unwrap_err();
        assert!(format!("{err:#}").contains("another filesystem"), "{err:#}");
        assert_eq!(fs::read(tree.join("proc/inside")).unwrap(), b"keep");

        m.close().unwrap();
        remove_dir_all_safe(&tree).unwrap();
        assert!(!tree.exists());
    }

    #[test]
    fn emptying_a_tree_keeps_its_filesystems_and_refuses_any_other_mount() {
        if !is_root() {
            eprintln!("skipped: needs root (mounts)");
            return;
        }
        let dir = tempdir();
        let tree = dir.path().join("tree");
        for d in ["boot/efi", "usr/bin", "lost+found", "srv/repo"] {
            fs::create_dir_all(tree.join(d)).unwrap();
        }
        let boot = mount(
            "tmpfs",
            &tree.join("boot"),
            Some("tmpfs"),
            MsFlags::empty(),
            None,
        )
        .unwrap();
        for d in ["efi", "lost+found", "grub"] {
            fs::create_dir_all(tree.join("boot").join(d)).unwrap();
        }
        let efi = mount(
            "tmpfs",
            &tree.join("boot/efi"),
            Some("tmpfs"),
            MsFlags::empty(),
            None,
        )
        .unwrap();
        fs::create_dir_all(tree.join("boot/efi/EFI/debian")).unwrap();
        fs::write(tree.join("boot/efi/EFI/debian/grubx64.efi"), b"x").unwrap();
        fs::write(tree.join("boot/grub/grub.cfg"), b"x").unwrap();
        fs::write(tree.join("usr/bin/ls"), b"x").unwrap();
        std::os::unix::fs::symlink("/etc", tree.join("etc-link")).unwrap();
        // A host directory bound into the tree (a file:// repository, say) is not the tree's.
        let host = dir.path().join("host-repo");
        fs::create_dir_all(&host).unwrap();
        fs::write(host.join("Packages"), b"keep").unwrap();
        let bind = mount(
            host.to_str().unwrap(),
            &tree.join("srv/repo"),
            None,
            MsFlags::MS_BIND,
            None,
        )
        .unwrap();
        let own = [tree.clone(), tree.join("boot"), tree.join("boot/efi")];
        let err = empty_spanning_mounts(&tree, &own).unwrap_err();
        assert!(format!("{err:#}").contains("srv/repo"), "{err:#}");
        assert!(tree.join("usr/bin/ls").exists(), "nothing is removed first");
        bind.close().unwrap();

        empty_spanning_mounts(&tree, &own).unwrap();
        assert!(fs::read(host.join("Packages")).is_ok());
        let mut left: Vec<String> = Vec::new();
        for p in ["", "boot", "boot/efi"] {
            for e in fs::read_dir(tree.join(p)).unwrap().flatten() {
                left.push(format!("{p}/{}", e.file_name().to_string_lossy()));
            }
        }
        left.sort();
        // Each filesystem root keeps its lost+found only when it is one (the tree's own root
        // here is not a mount point: its lost+found goes).
        assert_eq!(left, ["/boot", "boot/efi", "boot/lost+found"]);
        assert!(Path::new("/etc").is_dir());
        efi.close().unwrap();
        boot.close().unwrap();
    }

    #[test]
    fn remove_at_refuses_mounts_even_of_the_same_filesystem() {
        if !is_root() {
            eprintln!("skipped: needs root (mounts)");
            return;
        }
        let dir = tempdir();
        let host = dir.path().join("host");
        fs::create_dir_all(&host).unwrap();
        fs::write(host.join("precious"), b"keep").unwrap();
        let tree = dir.path().join("x.attachments");
        fs::create_dir_all(tree.join("etc")).unwrap();
        fs::write(tree.join("file"), b"x").unwrap();
        let parent = nix::fcntl::open(
            dir.path(),
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .unwrap();
        // A bind mount of a directory on the same filesystem: the device check cannot see it.
        let m = mount(
            host.to_str().unwrap(),
            &tree.join("etc"),
            None,
            MsFlags::MS_BIND,
            None,
        )
        .unwrap();
        let err =
            remove_dir_all_at(parent.as_fd(), OsStr::new("x.attachments"), &tree).unwrap_err();
        assert!(format!("{err:#}").contains("mount points"), "{err:#}");
        assert_eq!(fs::read(host.join("precious")).unwrap(), b"keep");
        assert_eq!(fs::read(tree.join("file")).unwrap(), b"x");
        m.close().unwrap();
        // Mounted on itself.
        let m = mount(host.to_str().unwrap(), &tree, None, MsFlags::MS_BIND, None).unwrap();
        assert!(remove_dir_all_at(parent.as_fd(), OsStr::new("x.attachments"), &tree).is_err());
        assert_eq!(fs::read(host.join("precious")).unwrap(), b"keep");
        m.close().unwrap();
        // A link in its place is refused, not followed.
        fs::rename(&tree, dir.path().join("moved")).unwrap();
        symlink(&host, &tree).unwrap();
        assert!(remove_dir_all_at(parent.as_fd(), OsStr::new("x.attachments"), &tree).is_err());
        assert_eq!(fs::read(host.join("precious")).unwrap(), b"keep");
        fs::remove_file(&tree).unwrap();
        fs::rename(dir.path().join("moved"), &tree).unwrap();
        remove_dir_all_at(parent.as_fd(), OsStr::new("x.attachments"), &tree).unwrap();
        assert!(!tree.exists());
    }

    #[test]
    fn remove_deletes_symlinks_not_their_targets() {
        let dir = tempdir();
        let outside = dir.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("precious"), b"keep").unwrap();
        let tree = dir.path().join("tree");
        fs::create_dir_all(tree.join("a/b")).unwrap();
        fs::write(tree.join("a/b/file"), b"x").unwrap();
        symlink(&outside, tree.join("a/link-to-dir")).unwrap();
        symlink(outside.join("precious"), tree.join("link-to-file")).unwrap();
        symlink("/nonexistent", tree.join("dangling")).unwrap();

        remove_dir_all_safe(&tree).unwrap();
        assert!(!tree.exists());
        assert_eq!(fs::read(outside.join("precious")).unwrap(), b"keep");

        // A symlink given as the tree itself: the link goes, the target stays.
        let link = dir.path().join("link");
        symlink(&outside, &link).unwrap();
        remove_dir_all_safe(&link).unwrap();
        assert!(fs::symlink_metadata(&link).is_err());
        assert_eq!(fs::read(outside.join("precious")).unwrap(), b"keep");
    }
}
