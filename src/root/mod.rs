//! The install root as a capability: every host-side touch of the image tree goes through
//! [`Root`].
//!
//! The tree debimg builds is data it does not trust: a package (from any repository) can ship
//! `/etc/hostname -> /etc/shadow`, `/tmp -> /root` or `/boot/vmlinuz-9 -> /etc/shadow`. A
//! process chrooted into the tree follows those links inside it; debimg works on the tree from
//! the host, where joining the root with a path lets the kernel follow them out onto the host.
//! So nothing here joins paths: every path is resolved inside the root through file descriptors
//! (openat2 with `RESOLVE_IN_ROOT` where the kernel has it, a checked `O_PATH` walk where it does
//! not; both by libpathrs), as the chroot would resolve it, and every operation then works on
//! the descriptor it resolved, never on the name again. What leaves the tree
//! ([`Root::copy_out`], [`Root::read`]) must be a regular file inside it; what is written
//! ([`Root::write`]) is created under a temporary name in its directory and renamed over the
//! destination, so a link there is replaced, never written through.
//!
//! Paths are given as the image names them (`/etc/hostname` or `etc/hostname`).

use std::ffi::OsString;
use std::fs::{File, Metadata, Permissions};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use nix::sys::time::TimeSpec;
use pathrs::flags::OpenFlags;

use crate::sys::mount::{self, Mount, MountStack, MsFlags};

/// The environment every program run inside the chroot gets: nothing from the caller's
/// environment leaks in (no locale, proxy or terminal settings debconf could trip on).
pub const CHROOT_ENV: &[(&str, &str)] = &[
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("DEBIAN_FRONTEND", "noninteractive"),
    ("DEBCONF_NONINTERACTIVE_SEEN", "true"),
    ("LC_ALL", "C"),
    ("LANG", "C"),
    ("HOME", "/root"),
];

/// reproducible-builds.org's variable: the time a reproducible build is as of
/// ([`Root::set_source_date_epoch`], [`crate::reproducible`]).
pub use crate::reproducible::ENV as SOURCE_DATE_EPOCH;

/// How long processes left in the chroot get between SIGTERM and SIGKILL.
pub const LEFTOVER_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Owner of a file written into the image, as the image numbers its users.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

impl Owner {
    /// The image's root.
    pub const ROOT: Owner = Owner { uid: 0, gid: 0 };
}

/// One entry of a directory in the image.
#[derive(Debug, Clone)]
pub struct Entry {
    pub name: OsString,
    /// The entry itself (a symlink is a symlink, not what it points at).
    pub file_type: std::fs::FileType,
}

/// The image tree, held by a directory descriptor. Open it once the tree's filesystems are
/// mounted: a descriptor taken before holds the directory underneath the mount.
pub struct Root {
    path: PathBuf,
    inner: pathrs::Root,
    /// `SOURCE_DATE_EPOCH` for the programs run in the tree (a reproducible build's).
    source_date_epoch: Option<u64>,
}

impl std::fmt::Debug for Root {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Root").field("path", &self.path).finish()
    }
}

/// `path` as a path relative to the root (`.` for the root itself), or an error for a path
/// that is not one a chroot could name (empty, NUL).
fn relative(path: &Path) -> Result<PathBuf> {
    let s = path.as_os_str();
    if s.is_empty() {
        bail!("an empty path does not name anything in the image");
    }
    if std::os::unix::ffi::OsStrExt::as_bytes(s).contains(&0) {
        bail!("{} holds a NUL byte", path.display());
    }
    let mut rel = PathBuf::new();
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => rel.push(".."),
            Component::Normal(n) => rel.push(n),
        }
    }
    if rel.as_os_str().is_empty() {
        rel.push(".");
    }
    Ok(rel)
}

/// The last component of `path` and its parent (`/` for a top-level name).
fn split(path: &Path) -> Result<(PathBuf, OsString)> {
    let rel = relative(path)?;
    match rel.components().next_back() {
        Some(Component::Normal(name)) => {
            let parent = rel.parent().map(Path::to_path_buf).unwrap_or_default();
            let parent = if parent.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                parent
            };
            Ok((parent, name.to_os_string()))
        }
        _ => bail!(
            "{} does not name a file in the image (it ends in `..` or is the root)",
            path.display()
        ),
    }
}

fn is_not_found(e: &pathrs::error::Error) -> bool {
    matches!(
        e.kind(),
        pathrs::error::ErrorKind::OsError(Some(libc::ENOENT | libc::ENOTDIR))
    )
}

/// The times [`Root::clamp_times`] gives an entry: its modification time, at most `epoch`,
/// for both; or none when it has them already. (Access times are whenever a build happened to
/// read the file, or unpacked it from a cache: they follow the modification time.)
fn clamped(st: &nix::sys::stat::FileStat, epoch: i64) -> Option<TimeSpec> {
    let m = if st.st_mtime > epoch {
        TimeSpec::new(epoch, 0)
    } else {
        TimeSpec::new(st.st_mtime, st.st_mtime_nsec)
    };
    let same = |sec: i64, nsec: i64| sec == m.tv_sec() && nsec == m.tv_nsec();
    (!same(st.st_mtime, st.st_mtime_nsec) || !same(st.st_atime, st.st_atime_nsec)).then_some(m)
}

/// [`Root::clamp_times`] below the directory `dir` (shown as `shown` in errors).
fn clamp_dir(dir: &OwnedFd, epoch: i64, shown: &Path) -> Result<u64> {
    use nix::fcntl::AtFlags;
    use nix::sys::stat::{SFlag, UtimensatFlags};
    let mut changed = 0;
    let listing = fd_path(dir.as_fd());
    let mut names: Vec<OsString> = std::fs::read_dir(&listing)
        .and_then(|it| it.map(|e| e.map(|e| e.file_name())).collect())
        .with_context(|| format!("listing {} in the image", shown.display()))?;
    names.sort();
    for name in names {
        let path = shown.join(&name);
        let stat = || {
            nix::sys::stat::fstatat(dir, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
                .with_context(|| format!("inspecting {} in the image", path.display()))
        };
        let mut st = stat()?;
        // A directory's entries first, and its times read again after: listing it sets its
        // access time.
        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR {
            let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
            let sub = nix::fcntl::openat(dir, name.as_os_str(), flags, Mode::empty())
                .with_context(|| format!("opening {} in the image", path.display()))?;
            changed += clamp_dir(&sub, epoch, &path)?;
            drop(sub);
            st = stat()?;
        }
        if let Some(t) = clamped(&st, epoch) {
            nix::sys::stat::utimensat(
                dir,
                name.as_os_str(),
                &t,
                &t,
                UtimensatFlags::NoFollowSymlink,
            )
            .with_context(|| format!("setting the times of {} in the image", path.display()))?;
            changed += 1;
        }
    }
    Ok(changed)
}

/// The magic link of a descriptor: operations on it reach exactly the inode the descriptor
/// holds, whatever has happened to its name.
fn fd_path(fd: BorrowedFd<'_>) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

fn stat_fd(fd: &OwnedFd) -> std::io::Result<Metadata> {
    // fstat works on O_PATH descriptors; File only wraps it for the std Metadata type.
    let dup = fd.try_clone()?;
    File::from(dup).metadata()
}

fn kind_name(md: &Metadata) -> &'static str {
    crate::spec::file_kind(&md.file_type())
}

impl Root {
    /// Holds the tree at `path` (a directory on the host that debimg made).
    pub fn open(path: &Path) -> Result<Root> {
        let inner = pathrs::Root::open(path)
            .with_context(|| format!("opening the image tree {}", path.display()))?;
        Ok(Root {
            path: path.to_path_buf(),
            inner,
            source_date_epoch: None,
        })
    }

    /// Every program run in the tree from now on sees `SOURCE_DATE_EPOCH=epoch` (or none).
    pub fn set_source_date_epoch(&mut self, epoch: Option<u64>) {
        self.source_date_epoch = epoch;
    }

    /// What [`Root::set_source_date_epoch`] set.
    pub fn source_date_epoch(&self) -> Option<u64> {
        self.source_date_epoch
    }

    /// The tree's directory on the host: for programs that take a path and work inside the
    /// tree themselves (chroot, tar, the bootstrap). Never join it with a path of the image.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A command that runs `program` chrooted into the tree with the clean chroot environment.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("chroot");
        cmd.arg(&self.path)
            .arg(program)
            .env_clear()
            .envs(CHROOT_ENV.iter().copied());
        if let Some(e) = self.source_date_epoch {
            cmd.env(SOURCE_DATE_EPOCH, e.to_string());
        }
        cmd
    }

    /// Ends every process left running in the tree (TERM, then KILL after a grace period) by a
    /// step that ran code in it, `after` naming the step for the warning. Daemons a maintainer
    /// script or a post script started would otherwise run on through the rest of the build.
    pub fn end_processes(&self, after: &str) -> Result<()> {
        let ended = crate::sys::procs::kill_processes_in_root(&self.path, LEFTOVER_GRACE)
            .with_context(|| format!("ending processes left by {after}"))?;
        if !ended.is_empty() {
            tracing::warn!(
                "ended {} process(es) left running in the chroot by {after}: {ended:?}",
                ended.len()
            );
        }
        Ok(())
    }

    /// An `O_PATH` descriptor of `path`, its last component followed (inside the tree) when
    /// `follow`; `None` when it does not exist.
    fn resolve(&self, path: &Path, follow: bool) -> Result<Option<OwnedFd>> {
        let rel = relative(path)?;
        let res = if follow {
            self.inner.resolve(&rel)
        } else {
            self.inner.resolve_nofollow(&rel)
        };
        match res {
            Ok(h) => Ok(Some(OwnedFd::from(h))),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("resolving {} in the image", path.display())),
        }
    }

    /// What `path` is, following links inside the tree; `None` when it does not exist.
    pub fn metadata(&self, path: impl AsRef<Path>) -> Result<Option<Metadata>> {
        let path = path.as_ref();
        match self.resolve(path, true)? {
            Some(fd) => Ok(Some(stat_fd(&fd).with_context(|| {
                format!("inspecting {} in the image", path.display())
            })?)),
            None => Ok(None),
        }
    }

    /// What `path` itself is (a symlink is a symlink); `None` when it does not exist.
    pub fn symlink_metadata(&self, path: impl AsRef<Path>) -> Result<Option<Metadata>> {
        let path = path.as_ref();
        match self.resolve(path, false)? {
            Some(fd) => Ok(Some(stat_fd(&fd).with_context(|| {
                format!("inspecting {} in the image", path.display())
            })?)),
            None => Ok(None),
        }
    }

    /// True when `path` exists (a dangling symlink counts).
    pub fn exists(&self, path: impl AsRef<Path>) -> bool {
        matches!(self.symlink_metadata(path), Ok(Some(_)))
    }

    /// True when `path` is, or leads inside the tree to, a regular file.
    pub fn is_file(&self, path: impl AsRef<Path>) -> bool {
        matches!(self.metadata(path), Ok(Some(m)) if m.is_file())
    }

    /// True when `path` is, or leads inside the tree to, a directory.
    pub fn is_dir(&self, path: impl AsRef<Path>) -> bool {
        matches!(self.metadata(path), Ok(Some(m)) if m.is_dir())
    }

    /// Opens the regular file `path` (links followed inside the tree) for reading. Anything but
    /// a regular file (a device, a FIFO, a directory) is refused before it is opened.
    pub fn open_file(&self, path: impl AsRef<Path>) -> Result<File> {
        let path = path.as_ref();
        let fd = self
            .resolve(path, true)?
            .with_context(|| format!("{} is not in the image", path.display()))?;
        let md = stat_fd(&fd).with_context(|| format!("inspecting {}", path.display()))?;
        if !md.is_file() {
            bail!(
                "{} in the image is {}, not a regular file",
                path.display(),
                kind_name(&md)
            );
        }
        pathrs::Handle::from_fd(fd)
            .reopen(OpenFlags::O_RDONLY | OpenFlags::O_CLOEXEC)
            .with_context(|| format!("opening {} in the image", path.display()))
    }

    /// The bytes of the regular file `path`.
    pub fn read(&self, path: impl AsRef<Path>) -> Result<Vec<u8>> {
        let path = path.as_ref();
        let mut buf = Vec::new();
        self.open_file(path)?
            .read_to_end(&mut buf)
            .with_context(|| format!("reading {} in the image", path.display()))?;
        Ok(buf)
    }

    /// The text of the regular file `path` (invalid UTF-8 replaced).
    pub fn read_to_string(&self, path: impl AsRef<Path>) -> Result<String> {
        Ok(String::from_utf8_lossy(&self.read(path)?).into_owned())
    }

    /// The target of the symlink `path`, as written (never resolved).
    pub fn read_link(&self, path: impl AsRef<Path>) -> Result<PathBuf> {
        let path = path.as_ref();
        self.inner
            .readlink(relative(path)?)
            .with_context(|| format!("reading the symlink {} in the image", path.display()))
    }

    /// The directory `path` (links followed inside the tree), opened for listing and for
    /// operations relative to it.
    fn open_dir(&self, path: &Path) -> Result<Option<OwnedFd>> {
        let Some(fd) = self.resolve(path, true)? else {
            return Ok(None);
        };
        let md = stat_fd(&fd).with_context(|| format!("inspecting {}", path.display()))?;
        if !md.is_dir() {
            bail!(
                "{} in the image is {}, not a directory",
                path.display(),
                kind_name(&md)
            );
        }
        let dir = pathrs::Handle::from_fd(fd)
            .reopen(OpenFlags::O_RDONLY | OpenFlags::O_DIRECTORY | OpenFlags::O_CLOEXEC)
            .with_context(|| format!("opening the directory {} in the image", path.display()))?;
        Ok(Some(OwnedFd::from(dir)))
    }

    /// The entries of the directory `path` (`.` and `..` left out), sorted by name; empty when
    /// it does not exist.
    pub fn read_dir(&self, path: impl AsRef<Path>) -> Result<Vec<Entry>> {
        let path = path.as_ref();
        let Some(dir) = self.open_dir(path)? else {
            return Ok(Vec::new());
        };
        let listing = fd_path(dir.as_fd());
        let mut out = Vec::new();
        for e in std::fs::read_dir(&listing)
            .with_context(|| format!("listing {} in the image", path.display()))?
        {
            let e = e.with_context(|| format!("listing {} in the image", path.display()))?;
            // read_dir's file_type comes from the directory entry (or lstat): never followed.
            let file_type = e
                .file_type()
                .with_context(|| format!("listing {} in the image", path.display()))?;
            out.push(Entry {
                name: e.file_name(),
                file_type,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Makes the directory `path` and whatever is missing above it (new ones with `mode`, owned
    /// by the build's root); returns it opened. Existing components are used as the tree has
    /// them, links followed inside it.
    fn make_dir(&self, path: &Path, mode: u32) -> Result<OwnedFd> {
        let rel = relative(path)?;
        let handle = self
            .inner
            .mkdir_all(&rel, &Permissions::from_mode(mode & 0o7777))
            .with_context(|| format!("creating the directory {} in the image", path.display()))?;
        let dir = handle
            .reopen(OpenFlags::O_RDONLY | OpenFlags::O_DIRECTORY | OpenFlags::O_CLOEXEC)
            .with_context(|| format!("opening the directory {} in the image", path.display()))?;
        Ok(OwnedFd::from(dir))
    }

    /// Makes the directory `path` and its missing parents (0755, root).
    pub fn create_dir_all(&self, path: impl AsRef<Path>) -> Result<()> {
        self.make_dir(path.as_ref(), 0o755).map(drop)
    }

    /// Writes `path` whole or not at all: a new file under a temporary name in its directory
    /// (made when missing), owned by `owner` with `mode`, then renamed over whatever is there.
    pub fn write(
        &self,
        path: impl AsRef<Path>,
        contents: &[u8],
        mode: u32,
        owner: Owner,
    ) -> Result<()> {
        self.write_with(path, mode, owner, |f| {
            f.write_all(contents).map_err(anyhow::Error::from)
        })
    }

    /// [`Root::write`] with the contents written by `fill`.
    pub fn write_with(
        &self,
        path: impl AsRef<Path>,
        mode: u32,
        owner: Owner,
        fill: impl FnOnce(&mut File) -> Result<()>,
    ) -> Result<()> {
        let path = path.as_ref();
        let (parent, name) = split(path)?;
        let dir = self.make_dir(&parent, 0o755)?;
        let tmp = format!(".debimg-{}.new", crate::sys::unique_token());
        let fd = nix::fcntl::openat(
            &dir,
            tmp.as_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .with_context(|| {
            format!(
                "creating a temporary file for {} in the image",
                path.display()
            )
        })?;
        let mut file = File::from(fd);
        let res = (|| -> Result<()> {
            fill(&mut file)?;
            // chown before chmod: a chown clears the setuid and setgid bits.
            nix::unistd::fchown(&file, Some(owner.uid.into()), Some(owner.gid.into()))
                .context("setting its owner")?;
            file.set_permissions(Permissions::from_mode(mode & 0o7777))
                .context("setting its mode")?;
            nix::fcntl::renameat(&dir, tmp.as_str(), &dir, name.as_os_str())
                .context("moving it into place")?;
            Ok(())
        })();
        if res.is_err() {
            let _ =
                nix::unistd::unlinkat(&dir, tmp.as_str(), nix::unistd::UnlinkatFlags::NoRemoveDir);
        }
        res.with_context(|| format!("writing {} in the image", path.display()))
    }

    /// Copies the host file `src` (a regular file the spec names: the spec's author chose it)
    /// into the image as `path`, like [`Root::write`].
    pub fn copy_in(
        &self,
        src: &Path,
        path: impl AsRef<Path>,
        mode: u32,
        owner: Owner,
    ) -> Result<()> {
        self.write_with(path, mode, owner, |f| {
            let mut from = open_host_regular(src)?;
            std::io::copy(&mut from, f).with_context(|| format!("copying {}", src.display()))?;
            Ok(())
        })
    }

    /// Copies the regular file `path` (links followed inside the tree) out to the new host file
    /// `dest` (which must not exist); returns its size. Anything but a regular file inside the
    /// tree is refused: no host byte can come out this way.
    pub fn copy_out(&self, path: impl AsRef<Path>, dest: &Path) -> Result<u64> {
        let path = path.as_ref();
        let mut from = self.open_file(path)?;
        let mut to = File::options()
            .write(true)
            .create_new(true)
            .mode_private()
            .open(dest)
            .with_context(|| format!("creating {}", dest.display()))?;
        std::io::copy(&mut from, &mut to).with_context(|| {
            format!(
                "copying {} out of the image to {}",
                path.display(),
                dest.display()
            )
        })
    }

    /// Points the symlink `path` at `target` (written as given), replacing whatever is there
    /// (not a directory) in one rename.
    pub fn symlink(&self, target: impl AsRef<Path>, path: impl AsRef<Path>) -> Result<()> {
        let (target, path) = (target.as_ref(), path.as_ref());
        let (parent, name) = split(path)?;
        let dir = self.make_dir(&parent, 0o755)?;
        let tmp = format!(".debimg-{}.link", crate::sys::unique_token());
        nix::unistd::symlinkat(target, &dir, tmp.as_str())
            .with_context(|| format!("linking {} to {}", path.display(), target.display()))?;
        nix::fcntl::renameat(&dir, tmp.as_str(), &dir, name.as_os_str())
            .inspect_err(|_| {
                let _ = nix::unistd::unlinkat(
                    &dir,
                    tmp.as_str(),
                    nix::unistd::UnlinkatFlags::NoRemoveDir,
                );
            })
            .with_context(|| format!("moving the link {} into place", path.display()))
    }

    /// Removes the file or symlink `path` (a link itself, never what it points at); returns
    /// whether something was there. A directory is an error.
    pub fn remove_file(&self, path: impl AsRef<Path>) -> Result<bool> {
        self.unlink(path.as_ref(), nix::unistd::UnlinkatFlags::NoRemoveDir, &[])
    }

    /// Removes the directory `path` when it is empty; returns whether it was removed (a
    /// directory something was put in since, or none at all, stays as it is).
    pub fn remove_empty_dir(&self, path: impl AsRef<Path>) -> Result<bool> {
        self.unlink(
            path.as_ref(),
            nix::unistd::UnlinkatFlags::RemoveDir,
            &[Errno::ENOTEMPTY, Errno::EEXIST, Errno::ENOTDIR],
        )
    }

    /// `unlinkat` of the last component of `path` in its directory: whether it was removed;
    /// a missing one, or an error in `keep`, is `false`.
    fn unlink(
        &self,
        path: &Path,
        flags: nix::unistd::UnlinkatFlags,
        keep: &[Errno],
    ) -> Result<bool> {
        let (parent, name) = split(path)?;
        let Some(dir) = self.open_dir(&parent)? else {
            return Ok(false);
        };
        match nix::unistd::unlinkat(&dir, name.as_os_str(), flags) {
            Ok(()) => Ok(true),
            Err(Errno::ENOENT) => Ok(false),
            Err(e) if keep.contains(&e) => Ok(false),
            Err(e) => Err(e).with_context(|| format!("removing {} in the image", path.display())),
        }
    }

    /// Removes the directory `path` and the files in it (not below: a sub-directory is an
    /// error); returns whether it was there. Links in it are removed, never followed.
    pub fn remove_flat_dir(&self, path: impl AsRef<Path>) -> Result<bool> {
        let path = path.as_ref();
        let (parent, name) = split(path)?;
        let Some(pdir) = self.open_dir(&parent)? else {
            return Ok(false);
        };
        let dir = match nix::fcntl::openat(
            &pdir,
            name.as_os_str(),
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Ok(false),
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("opening the directory {} in the image", path.display())
                });
            }
        };
        let names: Vec<OsString> = std::fs::read_dir(fd_path(dir.as_fd()))
            .with_context(|| format!("listing {} in the image", path.display()))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<std::io::Result<_>>()
            .with_context(|| format!("listing {} in the image", path.display()))?;
        for n in names {
            nix::unistd::unlinkat(&dir, n.as_os_str(), nix::unistd::UnlinkatFlags::NoRemoveDir)
                .with_context(|| format!("removing {} in the image", path.join(&n).display()))?;
        }
        drop(dir);
        nix::unistd::unlinkat(
            &pdir,
            name.as_os_str(),
            nix::unistd::UnlinkatFlags::RemoveDir,
        )
        .with_context(|| format!("removing the directory {} in the image", path.display()))?;
        Ok(true)
    }

    /// Empties the whole tree for a fresh start, spanning the image's own filesystems mounted
    /// at `mounts` (their host mount points, as the image kind reports them; the tree's own
    /// directory when its root is one): their mount points stay (emptied), as does each
    /// filesystem's `lost+found`. Anything else mounted in the tree (the chroot's proc or a
    /// bind left mounted) refuses it before anything is removed.
    pub fn empty(&self, mounts: &[PathBuf]) -> Result<()> {
        crate::sys::mount::empty_spanning_mounts(&self.path, mounts)
            .with_context(|| format!("emptying the image tree {}", self.path.display()))
    }

    /// Sets every modification time in the tree later than `epoch` (seconds) to `epoch`, and
    /// every access time to the modification time, across the image's filesystems mounted in it: a link's own times, never its
    /// target's, and no link followed on the way. For reproducible builds, where the files the
    /// build made carry its clock. Returns how many entries changed.
    pub fn clamp_times(&self, epoch: i64) -> Result<u64> {
        let top = self
            .open_dir(Path::new("/"))?
            .context("the image tree has no root directory")?;
        let mut changed = clamp_dir(&top, epoch, Path::new("/"))?;
        let st = nix::sys::stat::fstat(&top).context("inspecting the image's /")?;
        if let Some(t) = clamped(&st, epoch) {
            nix::sys::stat::futimens(&top, &t, &t).context("setting the times of the image's /")?;
            changed += 1;
        }
        Ok(changed)
    }

    /// Renames `from` to `to` inside the tree (the last components themselves, never what a
    /// link there points at).
    pub fn rename(&self, from: impl AsRef<Path>, to: impl AsRef<Path>) -> Result<()> {
        let (from, to) = (from.as_ref(), to.as_ref());
        let (fparent, fname) = split(from)?;
        let (tparent, tname) = split(to)?;
        let fdir = self
            .open_dir(&fparent)?
            .with_context(|| format!("{} is not in the image", fparent.display()))?;
        let tdir = self.make_dir(&tparent, 0o755)?;
        nix::fcntl::renameat(&fdir, fname.as_os_str(), &tdir, tname.as_os_str())
            .with_context(|| format!("moving {} to {} in the image", from.display(), to.display()))
    }

    /// An `O_PATH` descriptor of `path` itself, refused when it is a symlink.
    fn no_link(&self, path: &Path) -> Result<OwnedFd> {
        let fd = self
            .resolve(path, false)?
            .with_context(|| format!("{} is not in the image", path.display()))?;
        let md = stat_fd(&fd).with_context(|| format!("inspecting {}", path.display()))?;
        if md.file_type().is_symlink() {
            bail!(
                "{} in the image is a symlink: refusing to change what it points at",
                path.display()
            );
        }
        Ok(fd)
    }

    /// Sets the mode of `path` itself (a symlink is refused).
    pub fn set_mode(&self, path: impl AsRef<Path>, mode: u32) -> Result<()> {
        let path = path.as_ref();
        let fd = self.no_link(path)?;
        // The descriptor's magic link reaches exactly the inode resolved above.
        std::fs::set_permissions(fd_path(fd.as_fd()), Permissions::from_mode(mode & 0o7777))
            .with_context(|| format!("setting mode {mode:04o} on {} in the image", path.display()))
    }

    /// Gives `path` itself (a symlink is refused) to `owner`.
    pub fn set_owner(&self, path: impl AsRef<Path>, owner: Owner) -> Result<()> {
        let path = path.as_ref();
        let fd = self.no_link(path)?;
        std::os::unix::fs::chown(fd_path(fd.as_fd()), Some(owner.uid), Some(owner.gid))
            .with_context(|| {
                format!(
                    "giving {} in the image to {}:{}",
                    path.display(),
                    owner.uid,
                    owner.gid
                )
            })
    }

    /// Makes the device node `path` (missing parents too); `block` chooses a block device over a
    /// character device.
    pub fn mknod(&self, path: impl AsRef<Path>, block: bool, mode: u32, dev: u64) -> Result<()> {
        let path = path.as_ref();
        let (parent, name) = split(path)?;
        let dir = self.make_dir(&parent, 0o755)?;
        let kind = if block {
            nix::sys::stat::SFlag::S_IFBLK
        } else {
            nix::sys::stat::SFlag::S_IFCHR
        };
        nix::sys::stat::mknodat(
            &dir,
            name.as_os_str(),
            kind,
            Mode::from_bits_truncate(mode),
            dev,
        )
        .with_context(|| format!("making the device node {} in the image", path.display()))
    }

    /// Mounts `source` on the directory `path` of the tree (made when missing), through the
    /// descriptor that resolved it: a link in the tree cannot move the mount out of it.
    pub fn mount(
        &self,
        source: &str,
        path: impl AsRef<Path>,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<Mount> {
        let path = path.as_ref();
        let dir = self.make_dir(path, 0o755)?;
        mount::mount_on_fd(source, dir.as_fd(), fstype, flags, data)
            .with_context(|| format!("mounting {source} on {} in the image", path.display()))
    }

    /// Fresh proc, sysfs and devpts for the chroot, never bind mounts of the host's, held by
    /// `mounts`.
    pub fn mount_api_filesystems(&self, mounts: &mut MountStack) -> Result<()> {
        let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
        let specs: [(&str, &str, MsFlags, Option<&str>); 3] = [
            ("/proc", "proc", nosuid, None),
            ("/sys", "sysfs", nosuid | MsFlags::MS_RDONLY, None),
            (
                "/dev/pts",
                "devpts",
                MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
                Some("newinstance,ptmxmode=0666,mode=620,gid=5"),
            ),
        ];
        for (path, fstype, flags, data) in specs {
            mounts.push(self.mount(fstype, path, Some(fstype), flags, data)?);
        }
        Ok(())
    }

    /// Bind-mounts the host directory `source` (one of the build's own, in its workspace) on
    /// `path` in the tree.
    pub fn bind(&self, source: &Path, path: impl AsRef<Path>) -> Result<Mount> {
        self.mount(
            &source.to_string_lossy(),
            path,
            None,
            MsFlags::MS_BIND,
            None,
        )
    }
}

/// Opens a host file the spec names for reading: it must be a regular file (a FIFO or a device
/// is refused before it can block or stream forever).
pub fn open_host_regular(path: &Path) -> Result<File> {
    let f = File::options()
        .read(true)
        .custom_flags_nonblock()
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let md = f
        .metadata()
        .with_context(|| format!("inspecting {}", path.display()))?;
    if !md.is_file() {
        bail!(
            "{} is {}, not a regular file",
            path.display(),
            kind_name(&md)
        );
    }
    Ok(f)
}

/// Small `OpenOptions` helpers.
trait OpenOptionsExt2 {
    /// New files are 0600: nothing debimg writes in its workspace is for other users.
    fn mode_private(&mut self) -> &mut Self;
    /// `O_NONBLOCK`, so that opening a FIFO does not wait for a writer.
    fn custom_flags_nonblock(&mut self) -> &mut Self;
}

impl OpenOptionsExt2 for std::fs::OpenOptions {
    fn mode_private(&mut self) -> &mut Self {
        std::os::unix::fs::OpenOptionsExt::mode(self, 0o600)
    }
    fn custom_flags_nonblock(&mut self) -> &mut Self {
        std::os::unix::fs::OpenOptionsExt::custom_flags(self, libc::O_NONBLOCK)
    }
}

#[cfg(test)]
mod tests;
