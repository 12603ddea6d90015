//! Files in directories whose entries other users may control: the output directory, a release
//! directory, the build directory's workspaces.
//!
//! Everything goes through one descriptor of the directory, opened once. A name is only ever
//! looked up in that directory and never followed when it is a symbolic link; a file that must
//! exist is opened only when it is a regular file (a FIFO would hang the open, a device could act
//! on it). A file appears under its name only complete: written under a temporary name created
//! with `O_EXCL`, fsynced, renamed into place (a rename replaces a link there, it never writes
//! through it), then the directory fsynced. The directory the user named may itself be reached
//! through links: that is their choice; what others put inside it is not followed.

pub mod lock;
pub mod publish;
pub mod release;

pub use lock::{OUTPUT_LOCK, OutputLock};

use std::ffi::{OsStr, OsString};
use std::fs::{File, Permissions};
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};
use nix::unistd::UnlinkatFlags;

/// What a directory entry is, as `lstat` sees it (a link is never followed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    /// A FIFO, socket or device node.
    Special,
}

impl EntryKind {
    /// The kind of a `stat` result.
    pub fn of(st: &FileStat) -> EntryKind {
        match SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) {
            SFlag::S_IFREG => EntryKind::File,
            SFlag::S_IFDIR => EntryKind::Dir,
            SFlag::S_IFLNK => EntryKind::Symlink,
            _ => EntryKind::Special,
        }
    }
}

/// An open directory: every file operation in it is relative to this descriptor and never
/// follows a link.
#[derive(Debug)]
pub struct OutputDir {
    fd: OwnedFd,
    path: PathBuf,
}

impl OutputDir {
    /// Opens the directory `path` (links on the way followed: the caller named it).
    pub fn open(path: &Path) -> Result<OutputDir> {
        let fd = nix::fcntl::open(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .with_context(|| format!("opening directory {}", path.display()))?;
        Ok(OutputDir {
            fd,
            path: path.to_path_buf(),
        })
    }

    /// Opens the directory `path` itself refusing a link (for directories of debimg's own, such
    /// as the cache's parts).
    pub fn open_nofollow(path: &Path) -> Result<OutputDir> {
        let fd = nix::fcntl::open(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| refusal(e, path))
        .with_context(|| format!("opening directory {}", path.display()))?;
        Ok(OutputDir {
            fd,
            path: path.to_path_buf(),
        })
    }

    /// Opens the sub-directory `name`, refusing a link.
    pub fn open_subdir(&self, name: impl AsRef<OsStr>) -> Result<OutputDir> {
        let name = self.checked(name.as_ref())?;
        let path = self.path.join(name);
        match self.kind(name)? {
            Some(EntryKind::Symlink) => {
                return Err(crate::error::Error::tagged(
                    crate::error::ErrorKind::Refused,
                    format!(
                        "{} is a symbolic link: refusing to follow it",
                        path.display()
                    ),
                ));
            }
            Some(EntryKind::Dir) | None => {}
            Some(_) => bail!("{} is not a directory", path.display()),
        }
        // O_NOFOLLOW again: the entry may have changed since it was looked at.
        let fd = nix::fcntl::openat(
            &self.fd,
            name,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| refusal(e, &path))
        .with_context(|| format!("opening directory {}", path.display()))?;
        Ok(OutputDir { fd, path })
    }

    /// Creates the sub-directory `name` with `mode` (less the umask); fails when anything is
    /// there already.
    pub fn create_subdir(&self, name: impl AsRef<OsStr>, mode: u32) -> Result<()> {
        let name = self.checked(name.as_ref())?;
        nix::sys::stat::mkdirat(&self.fd, name, Mode::from_bits_truncate(mode))
            .with_context(|| format!("creating directory {}", self.join(name).display()))
    }

    /// A second handle on the same directory.
    pub fn try_clone(&self) -> Result<OutputDir> {
        Ok(OutputDir {
            fd: self.fd.try_clone().with_context(|| {
                format!("duplicating the descriptor of {}", self.path.display())
            })?,
            path: self.path.clone(),
        })
    }

    /// The path the directory was opened by (for messages, and for code that still takes paths).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `name` under the directory's path, for messages.
    pub fn join(&self, name: impl AsRef<OsStr>) -> PathBuf {
        self.path.join(name.as_ref())
    }

    /// A path that reaches exactly this directory, whatever happens to its name: for programs
    /// this process runs and for readers that take a path. Valid in this process, and in a
    /// child that inherits the descriptor (see [`fd_path`]).
    pub fn proc_path(&self) -> PathBuf {
        fd_path(&self.fd)
    }

    /// The directory's own `stat`.
    pub fn stat_self(&self) -> Result<FileStat> {
        nix::sys::stat::fstat(&self.fd)
            .with_context(|| format!("inspecting {}", self.path.display()))
    }

    /// `lstat` of `name`; `None` when there is nothing of that name.
    pub fn stat(&self, name: impl AsRef<OsStr>) -> Result<Option<FileStat>> {
        let name = self.checked(name.as_ref())?;
        match nix::sys::stat::fstatat(&self.fd, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(st)),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("inspecting {}", self.join(name).display())),
        }
    }

    /// What `name` is, without following it; `None` when there is nothing of that name.
    pub fn kind(&self, name: impl AsRef<OsStr>) -> Result<Option<EntryKind>> {
        Ok(self.stat(name)?.as_ref().map(EntryKind::of))
    }

    /// The names in the directory (`.` and `..` excepted), unsorted.
    pub fn entries(&self) -> Result<Vec<OsString>> {
        // Listed through the descriptor: exactly the directory opened, whatever its path now
        // leads to.
        std::fs::read_dir(self.proc_path())
            .and_then(|rd| rd.map(|e| e.map(|e| e.file_name())).collect())
            .with_context(|| format!("listing {}", self.path.display()))
    }

    /// Creates the new file `name` (`O_EXCL`: nothing may be there, not even a link) with
    /// exactly `mode`, open for writing.
    pub fn create_new(&self, name: impl AsRef<OsStr>, mode: u32) -> Result<File> {
        let name = self.checked(name.as_ref())?;
        let path = self.join(name);
        let fd = nix::fcntl::openat(
            &self.fd,
            name,
            OFlag::O_CREAT
                | OFlag::O_EXCL
                | OFlag::O_NOFOLLOW
                | OFlag::O_WRONLY
                | OFlag::O_CLOEXEC
                | OFlag::O_NOCTTY,
            Mode::from_bits_truncate(mode),
        )
        .with_context(|| format!("creating {}", path.display()))?;
        let file = File::from(fd);
        let res = file
            .set_permissions(Permissions::from_mode(mode))
            .with_context(|| format!("setting the mode of {}", path.display()));
        if let Err(e) = res {
            let _ = self.remove(name);
            return Err(e);
        }
        Ok(file)
    }

    /// Creates a new file under a temporary name for `name` (`.NAME.tmp-TOKEN`) with exactly
    /// `mode`; returns it open for writing, and its name. Put it into place with
    /// [`OutputDir::commit`]; on failure remove it with [`OutputDir::remove`].
    pub fn create_temp(&self, name: impl AsRef<OsStr>, mode: u32) -> Result<(File, String)> {
        let name = self.checked(name.as_ref())?;
        let temp = temp_name(&name.to_string_lossy());
        let file = self.create_new(&temp, mode)?;
        Ok((file, temp))
    }

    /// Renames `temp` to `name` (replacing whatever entry is there, a link included, and never
    /// writing through it), then fsyncs the directory. `temp` is expected to be fsynced.
    pub fn commit(&self, temp: impl AsRef<OsStr>, name: impl AsRef<OsStr>) -> Result<()> {
        let temp = self.checked(temp.as_ref())?;
        let name = self.checked(name.as_ref())?;
        nix::fcntl::renameat(&self.fd, temp, &self.fd, name).with_context(|| {
            format!(
                "moving {} into place as {}",
                self.join(temp).display(),
                self.join(name).display()
            )
        })?;
        self.sync()
    }

    /// Writes `name` whole with exactly `mode`: `write` fills a new temporary file, which is
    /// fsynced and renamed into place; the directory is fsynced. On any error the temporary file
    /// is removed and `name` is left as it was.
    pub fn write_with(
        &self,
        name: impl AsRef<OsStr>,
        mode: u32,
        write: impl FnOnce(&mut File) -> Result<()>,
    ) -> Result<()> {
        let name = name.as_ref();
        let (mut file, temp) = self.create_temp(name, mode)?;
        let res = (|| {
            write(&mut file).with_context(|| format!("writing {}", self.join(&temp).display()))?;
            file.sync_all()
                .with_context(|| format!("syncing {}", self.join(&temp).display()))?;
            drop(file);
            self.commit(&temp, name)
        })();
        if res.is_err()
            && let Err(e) = self.remove(&temp)
        {
            tracing::warn!("{e:#}");
        }
        res
    }

    /// [`OutputDir::write_with`] of `bytes`.
    pub fn write_file(&self, name: impl AsRef<OsStr>, bytes: &[u8], mode: u32) -> Result<()> {
        self.write_with(name, mode, |f| f.write_all(bytes).map_err(Into::into))
    }

    /// Opens `name` for reading when it is a regular file; `None` for a link (not followed),
    /// for anything else (a FIFO or device is never opened) and for a name that is gone. An
    /// `O_PATH` descriptor is looked at first, and the same inode then reopened for reading.
    pub fn open_if_regular(&self, name: impl AsRef<OsStr>) -> Result<Option<(File, FileStat)>> {
        let name = self.checked(name.as_ref())?;
        let handle = match nix::fcntl::openat(
            &self.fd,
            name,
            OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Ok(None),
            Err(e) => {
                return Err(e).with_context(|| format!("opening {}", self.join(name).display()));
            }
        };
        let st = nix::sys::stat::fstat(&handle)
            .with_context(|| format!("inspecting {}", self.join(name).display()))?;
        if EntryKind::of(&st) != EntryKind::File {
            return Ok(None);
        }
        let fd = nix::fcntl::open(
            &fd_path(&handle),
            OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .with_context(|| format!("opening {}", self.join(name).display()))?;
        Ok(Some((File::from(fd), st)))
    }

    /// Removes `name` if it is still the file `st` describes (someone may have replaced it
    /// meanwhile). Best effort.
    pub fn remove_if_same(&self, name: impl AsRef<OsStr>, st: &FileStat) {
        let name = name.as_ref();
        if self
            .stat(name)
            .ok()
            .flatten()
            .is_some_and(|now| now.st_dev == st.st_dev && now.st_ino == st.st_ino)
        {
            let _ = nix::unistd::unlinkat(&self.fd, name, UnlinkatFlags::NoRemoveDir);
        }
    }

    /// A new file for `final_name` under a temporary name, 0644, removed on drop unless put in
    /// place ([`TempFile::place_new`], [`TempFile::commit`]).
    pub fn temp_file(&self, final_name: impl AsRef<OsStr>) -> Result<TempFile<'_>> {
        let final_name = self.checked(final_name.as_ref())?.to_os_string();
        let (file, name) = self.create_temp(&final_name, 0o644)?;
        Ok(TempFile {
            dir: self,
            name: OsString::from(name),
            final_name,
            file,
            placed: false,
        })
    }

    /// Opens the existing regular file `name` for reading; refuses a link or anything else.
    pub fn open_regular(&self, name: impl AsRef<OsStr>) -> Result<File> {
        self.open_checked(name.as_ref(), OFlag::O_RDONLY, 0)
    }

    /// Opens the regular file `name` for reading and writing, creating it (with `mode`, less
    /// the umask) when absent; refuses a link or anything but a regular file. For files that
    /// persist, such as a lock.
    pub fn open_or_create(&self, name: impl AsRef<OsStr>, mode: u32) -> Result<File> {
        self.open_checked(name.as_ref(), OFlag::O_RDWR | OFlag::O_CREAT, mode)
    }

    fn open_checked(&self, name: &OsStr, flags: OFlag, mode: u32) -> Result<File> {
        let name = self.checked(name)?;
        let path = self.join(name);
        // Looked at before it is opened: opening a FIFO or a device can hang or act on it.
        if let Some(kind) = self.kind(name)? {
            refuse_unless_file(kind, &path)?;
        }
        // O_NONBLOCK: should a FIFO be swapped in after the look, the open does not hang on it
        // (on a regular file the flag does nothing).
        let fd = nix::fcntl::openat(
            &self.fd,
            name,
            flags | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC | OFlag::O_NOCTTY,
            Mode::from_bits_truncate(mode),
        )
        .map_err(|e| refusal(e, &path))
        .with_context(|| format!("opening {}", path.display()))?;
        let st =
            nix::sys::stat::fstat(&fd).with_context(|| format!("inspecting {}", path.display()))?;
        refuse_unless_file(EntryKind::of(&st), &path)?;
        Ok(File::from(fd))
    }

    /// Removes the entry `name` unless it is a directory (a link is removed, not followed);
    /// true when something was removed, false when nothing was there.
    pub fn remove(&self, name: impl AsRef<OsStr>) -> Result<bool> {
        let name = self.checked(name.as_ref())?;
        match nix::unistd::unlinkat(&self.fd, name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) => Ok(true),
            Err(Errno::ENOENT) => Ok(false),
            Err(e) => Err(e).with_context(|| format!("removing {}", self.join(name).display())),
        }
    }

    /// Removes whatever is at `name`: a file or a link (never followed) is unlinked, a directory
    /// deleted with everything in it through descriptors, following no link and reaching into
    /// no other filesystem ([`crate::sys::mount::remove_dir_all_at`]); then fsyncs this
    /// directory. True when something was there.
    pub fn remove_all(&self, name: impl AsRef<OsStr>) -> Result<bool> {
        let name = self.checked(name.as_ref())?;
        match self.kind(name)? {
            None => Ok(false),
            Some(EntryKind::Dir) => {
                crate::sys::mount::remove_dir_all_at(self.fd.as_fd(), name, &self.join(name))?;
                self.sync()?;
                Ok(true)
            }
            Some(_) => {
                let removed = self.remove(name)?;
                self.sync()?;
                Ok(removed)
            }
        }
    }

    /// The sub-directory at `rel` (names separated by `/`), each missing directory on the way
    /// made with mode 0755; every step refuses a link.
    pub fn create_dirs(&self, rel: &str) -> Result<OutputDir> {
        let mut dir = self.try_clone()?;
        for name in rel.split('/').filter(|c| !c.is_empty()) {
            let made = match nix::sys::stat::mkdirat(&dir.fd, name, Mode::from_bits_truncate(0o700))
            {
                Ok(()) => true,
                Err(Errno::EEXIST) => false,
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("creating directory {}", dir.join(name).display())
                    });
                }
            };
            dir = dir.open_subdir(name)?;
            if made {
                // Exactly 0755, whatever the umask: the outputs are for others to read.
                dir.set_mode(0o755)?;
            }
        }
        Ok(dir)
    }

    /// Sets the directory's own mode, exactly.
    pub fn set_mode(&self, mode: u32) -> Result<()> {
        nix::sys::stat::fchmod(&self.fd, Mode::from_bits_truncate(mode))
            .with_context(|| format!("setting the mode of {}", self.path.display()))
    }

    /// Opens the regular file at `rel` (names separated by `/`) for reading; `None` when
    /// anything on the way is missing, a link (never followed) or not what it should be.
    /// A path that is absolute or holds an empty, `.` or `..` name is refused (`None`): the
    /// name must say exactly the file it is.
    pub fn open_regular_at(&self, rel: &str) -> Result<Option<(File, FileStat)>> {
        let names: Vec<&str> = rel.split('/').collect();
        if names
            .iter()
            .any(|c| c.is_empty() || *c == "." || *c == "..")
        {
            return Ok(None);
        }
        let Some((last, dirs)) = names.split_last() else {
            return Ok(None);
        };
        let mut dir = self.try_clone()?;
        for name in dirs {
            if dir.kind(name)? != Some(EntryKind::Dir) {
                return Ok(None);
            }
            dir = dir.open_subdir(name)?;
        }
        dir.open_if_regular(last)
    }

    /// The regular files below the sub-directory `name`, as paths from this directory
    /// (`name/etc/hostname`), sorted; links (never followed) and special files are left out.
    pub fn files_under(&self, name: &str) -> Result<Vec<String>> {
        let mut out = Vec::new();
        self.open_subdir(name)?.collect_files(name, &mut out)?;
        out.sort();
        Ok(out)
    }

    fn collect_files(&self, prefix: &str, out: &mut Vec<String>) -> Result<()> {
        for name in self.entries()? {
            let Some(text) = name.to_str() else {
                bail!(
                    "{}: a file name that is not UTF-8",
                    self.join(&name).display()
                );
            };
            let rel = format!("{prefix}/{text}");
            match self.kind(&name)? {
                Some(EntryKind::File) => out.push(rel),
                Some(EntryKind::Dir) => self.open_subdir(&name)?.collect_files(&rel, out)?,
                _ => {}
            }
        }
        Ok(())
    }

    /// Flushes every file of this directory's filesystem (`syncfs`): one call instead of an
    /// fsync per file, for a tree of many files written at once.
    pub fn sync_filesystem(&self) -> Result<()> {
        nix::unistd::syncfs(&self.fd)
            .with_context(|| format!("syncing the filesystem of {}", self.path.display()))
    }

    /// Fsyncs the directory: renames and removals in it are then durable.
    pub fn sync(&self) -> Result<()> {
        nix::unistd::fsync(&self.fd).with_context(|| format!("syncing {}", self.path.display()))
    }

    /// `name` when it is one file name in this directory; an error for anything that would
    /// reach elsewhere (`a/b`, `..`).
    fn checked<'a>(&self, name: &'a OsStr) -> Result<&'a OsStr> {
        let b = name.as_bytes();
        if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') || b.contains(&0) {
            bail!(
                "`{}` is not a file name in {}",
                name.to_string_lossy(),
                self.path.display()
            );
        }
        Ok(name)
    }
}

impl AsFd for OutputDir {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// A file being written under a temporary name in an [`OutputDir`]; removed on drop unless put
/// in place.
pub struct TempFile<'a> {
    dir: &'a OutputDir,
    name: OsString,
    final_name: OsString,
    /// The file, open for writing.
    pub file: File,
    placed: bool,
}

impl TempFile<'_> {
    /// The temporary file as a path that reaches it through its descriptor (for programs that
    /// write it themselves: pass the descriptor on with [`inherit_fds`]).
    pub fn fd_path(&self) -> PathBuf {
        fd_path(&self.file)
    }

    /// Puts the complete file in place under its final name unless that name exists (someone
    /// put it there first: fine, this one goes); returns whether it did. No fsync: for caches,
    /// whose entries are checked when read.
    pub fn place_new(mut self) -> Result<bool> {
        let fd = &self.dir.fd;
        let shown = self.dir.join(&self.final_name);
        match nix::fcntl::renameat2(
            fd,
            self.name.as_os_str(),
            fd,
            self.final_name.as_os_str(),
            nix::fcntl::RenameFlags::RENAME_NOREPLACE,
        ) {
            Ok(()) => {
                self.placed = true;
                Ok(true)
            }
            Err(Errno::EEXIST) => Ok(false),
            // A filesystem without RENAME_NOREPLACE: a link fails the same way on an existing
            // name; the temporary name goes on drop.
            Err(Errno::EINVAL | Errno::ENOSYS) => match nix::unistd::linkat(
                fd,
                self.name.as_os_str(),
                fd,
                self.final_name.as_os_str(),
                AtFlags::empty(),
            ) {
                Ok(()) => Ok(true),
                Err(Errno::EEXIST) => Ok(false),
                Err(e) => Err(e).with_context(|| format!("moving {} into place", shown.display())),
            },
            Err(e) => Err(e).with_context(|| format!("moving {} into place", shown.display())),
        }
    }

    /// fsyncs the file, renames it over its final name and fsyncs the directory.
    pub fn commit(mut self) -> Result<()> {
        self.file
            .sync_all()
            .with_context(|| format!("syncing {}", self.dir.join(&self.name).display()))?;
        self.dir.commit(&self.name, &self.final_name)?;
        self.placed = true;
        Ok(())
    }

    /// [`TempFile::commit`] without waiting for the file's data to reach the disk: only for a
    /// file whose every reader checks it against a digest recorded durably beside it (the
    /// cache's tars), where a crash leaves a file that fails the check, never one taken for
    /// good.
    pub fn commit_unsynced(mut self) -> Result<()> {
        self.dir.commit(&self.name, &self.final_name)?;
        self.placed = true;
        Ok(())
    }
}

impl Drop for TempFile<'_> {
    fn drop(&mut self) {
        if !self.placed {
            let _ = nix::unistd::unlinkat(
                &self.dir.fd,
                self.name.as_os_str(),
                UnlinkatFlags::NoRemoveDir,
            );
        }
    }
}

/// A fresh temporary name for `name`: `.NAME.tmp-TOKEN`, hidden (release sums skip it) and
/// unguessable.
pub fn temp_name(name: &str) -> String {
    format!(".{name}.tmp-{}", crate::sys::unique_token())
}

/// Writes `dir/name` whole with exactly `mode`, atomically and durably, never following a link
/// at `name` ([`OutputDir::write_file`]).
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> Result<()> {
    OutputDir::open(dir)?.write_file(name, bytes, mode)
}

/// `/proc/self/fd/N`: reopens exactly the file or directory open as `fd`, whatever its name
/// leads to now. In a program this process starts, it means that program's descriptor `N`,
/// which must then be inherited (see [`inherit_fds`]).
pub fn fd_path(fd: impl AsFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd()))
}

/// Lets the program `cmd` starts inherit `fds` under the same numbers (debimg opens every
/// descriptor close-on-exec), so that it can reach them as [`fd_path`]s. They must stay open
/// until the program has started.
pub fn inherit_fds(cmd: &mut std::process::Command, fds: &[BorrowedFd<'_>]) {
    use std::os::unix::process::CommandExt;
    let fds: Vec<i32> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    // SAFETY: fcntl is async-signal-safe, and only the child's copies of the descriptors change.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &fds {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

fn refuse_unless_file(kind: EntryKind, path: &Path) -> Result<()> {
    let why = match kind {
        EntryKind::File => return Ok(()),
        EntryKind::Symlink => "is a symbolic link: refusing to follow it",
        EntryKind::Dir => "is a directory, not a file",
        EntryKind::Special => {
            "is not a regular file (a FIFO, socket or device): refusing to open it"
        }
    };
    Err(crate::error::Error::tagged(
        crate::error::ErrorKind::Refused,
        format!("{} {why}", path.display()),
    ))
}

/// The error of an `O_NOFOLLOW` open, saying so when a link was refused.
fn refusal(e: Errno, path: &Path) -> anyhow::Error {
    if e == Errno::ELOOP {
        crate::error::Error::tagged(
            crate::error::ErrorKind::Refused,
            format!(
                "{} is a symbolic link: refusing to follow it",
                path.display()
            ),
        )
    } else {
        anyhow::Error::new(e)
    }
}

/// A host file for a test to prove untouched (with [`fingerprint`]).
#[cfg(test)]
pub(crate) fn victim(dir: &Path) -> PathBuf {
    let v = dir.join("victim");
    std::fs::write(&v, b"a host file\n").unwrap();
    v
}

/// The names in a directory, sorted, for tests.
#[cfg(test)]
pub(crate) fn names(dir: &Path) -> Vec<String> {
    let mut n: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    n.sort();
    n
}

/// A file's permission bits, for tests.
#[cfg(test)]
pub(crate) fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

/// The modification time and content of a file, to prove in tests that it was not touched.
#[cfg(test)]
pub(crate) fn fingerprint(path: &Path) -> (Vec<u8>, i64, i64, u64) {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(path).unwrap();
    (
        std::fs::read(path).unwrap(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ino(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, symlink};

    fn victim(dir: &Path) -> PathBuf {
        let v = dir.join("victim");
        std::fs::write(&v, b"host file\n").unwrap();
        v
    }

    #[test]
    fn write_file_replaces_a_link_at_the_destination_without_touching_its_target() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let v = victim(outside.path());
        let before = fingerprint(&v);
        symlink(&v, dir.path().join("SUMS")).unwrap();
        let out = OutputDir::open(dir.path()).unwrap();
        out.write_file("SUMS", b"new\n", 0o640).unwrap();
        let meta = std::fs::symlink_metadata(dir.path().join("SUMS")).unwrap();
        assert!(meta.file_type().is_file(), "the link was replaced");
        assert_eq!(meta.mode() & 0o7777, 0o640, "exactly the mode asked");
        assert_eq!(std::fs::read(dir.path().join("SUMS")).unwrap(), b"new\n");
        assert_eq!(fingerprint(&v), before, "the link's target is untouched");
        let left: Vec<_> = out.entries().unwrap();
        assert_eq!(left, [OsString::from("SUMS")], "no temporary file left");
    }

    #[test]
    fn a_failed_write_leaves_no_temporary_and_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("m.yaml"), b"old").unwrap();
        let out = OutputDir::open(dir.path()).unwrap();
        let err = out
            .write_with("m.yaml", 0o644, |f| {
                f.write_all(b"half")?;
                bail!("disk on fire")
            })
            .unwrap_err();
        assert!(format!("{err:#}").contains("disk on fire"));
        assert_eq!(std::fs::read(dir.path().join("m.yaml")).unwrap(), b"old");
        assert_eq!(out.entries().unwrap().len(), 1);
    }

    #[test]
    fn names_that_leave_the_directory_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let out = OutputDir::open(dir.path()).unwrap();
        for bad in ["", ".", "..", "../x", "a/b", "/etc/passwd"] {
            assert!(out.write_file(bad, b"x", 0o644).is_err(), "{bad:?}");
            assert!(out.remove(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn open_regular_refuses_links_fifos_and_directories() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let v = victim(outside.path());
        symlink(&v, dir.path().join("link")).unwrap();
        nix::unistd::mkfifo(&dir.path().join("fifo"), Mode::from_bits_truncate(0o600)).unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("file"), b"ok").unwrap();
        let out = OutputDir::open(dir.path()).unwrap();
        let err = format!("{:#}", out.open_regular("link").unwrap_err());
        assert!(
            err.contains("symbolic link: refusing to follow it"),
            "{err}"
        );
        let err = format!("{:#}", out.open_regular("fifo").unwrap_err());
        assert!(err.contains("not a regular file"), "{err}");
        assert!(out.open_regular("sub").is_err());
        assert!(out.open_or_create("link", 0o600).is_err());
        assert!(out.open_or_create("fifo", 0o600).is_err());
        let mut text = String::new();
        std::io::Read::read_to_string(&mut out.open_regular("file").unwrap(), &mut text).unwrap();
        assert_eq!(text, "ok");
        assert_eq!(std::fs::read(&v).unwrap(), b"host file\n");
    }

    #[test]
    fn create_new_never_opens_what_is_there() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let v = victim(outside.path());
        let before = fingerprint(&v);
        symlink(&v, dir.path().join("build.log")).unwrap();
        let out = OutputDir::open(dir.path()).unwrap();
        assert!(out.create_new("build.log", 0o644).is_err());
        assert_eq!(fingerprint(&v), before);
        assert!(out.remove("build.log").unwrap(), "the link is removed");
        assert!(!out.remove("build.log").unwrap(), "nothing left to remove");
        assert_eq!(fingerprint(&v), before, "removing the link left its target");
        out.create_new("build.log", 0o644).unwrap();
        assert!(dir.path().join("build.log").is_file());
    }

    #[test]
    fn open_subdir_refuses_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        symlink(outside.path(), dir.path().join("7")).unwrap();
        let out = OutputDir::open(dir.path()).unwrap();
        let err = format!("{:#}", out.open_subdir("7").unwrap_err());
        assert!(
            err.contains("symbolic link: refusing to follow it"),
            "{err}"
        );
        assert_eq!(out.kind("7").unwrap(), Some(EntryKind::Symlink));
        assert_eq!(out.kind("8").unwrap(), None);
    }
}
