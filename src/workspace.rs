//! The build's private working directory under `--build-dir`: made 0700 and locked while the
//! build lives, optionally on a tmpfs, kept for inspection after a failure on request, and
//! removed as stale by a later build when its builder died.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use nix::mount::MsFlags;

use crate::output::{EntryKind, OutputDir};
use crate::sys::mount::{self, Mount};

/// Name of the lock file a live build holds in its workspace.
const WORKSPACE_LOCK: &str = ".debimg-workspace.lock";

/// Marks a workspace kept for inspection (`--keep-on-failure`): never removed as stale.
pub const KEPT_MARKER: &str = ".debimg-kept";

/// Removes workspaces of builds that died without cleaning up (SIGKILL, power loss): their lock
/// is free. Their mounts and loop devices went with their namespaces; only files remain.
/// Workspaces kept on purpose stay.
///
/// The build directory may be world-writable (/var/tmp): an entry named like a workspace may be
/// anyone's and anything. Only a real directory owned by this user is considered, nothing in it
/// is followed, and its lock is opened only when it is a regular file (a FIFO would hang the
/// open).
pub(crate) fn clean_stale_workspaces(build_dir: &Path) {
    let Ok(dir) = OutputDir::open(build_dir) else {
        return;
    };
    let Ok(names) = dir.entries() else {
        return;
    };
    for name in names {
        if !name.to_string_lossy().starts_with("debimg-") {
            continue;
        }
        let Some(ws) = stale_workspace(&dir, &name) else {
            continue;
        };
        use nix::fcntl::{Flock, FlockArg};
        let Ok(lock) = ws
            .open_regular(WORKSPACE_LOCK)
            .map_err(|e| tracing::debug!("{e:#}"))
            .and_then(|f| Flock::lock(f, FlockArg::LockExclusiveNonblock).map_err(|_| ()))
        else {
            continue;
        };
        let path = ws.path().to_path_buf();
        drop(ws);
        tracing::warn!(
            "removing stale workspace {} of a build that died",
            path.display()
        );
        // By path, which another user could only have swapped for a link (removed, not
        // followed) if the build directory lets them rename entries; the deletion follows no
        // link and crosses no mount.
        let res = mount::unmount_all_under(&path).and_then(|()| mount::remove_dir_all_safe(&path));
        if let Err(e) = res {
            tracing::warn!("could not remove stale workspace {}: {e:#}", path.display());
        }
        drop(lock);
    }
}

/// The entry `name` of the build directory, open, when it may be a workspace a build of this
/// user left: a directory (not a link to one) owned by this user and not kept.
fn stale_workspace(build_dir: &OutputDir, name: &std::ffi::OsStr) -> Option<OutputDir> {
    let me = nix::unistd::geteuid().as_raw();
    let st = build_dir.stat(name).ok()??;
    if EntryKind::of(&st) != EntryKind::Dir || st.st_uid != me {
        return None;
    }
    let ws = build_dir.open_subdir(name).ok()?;
    // The entry may have changed between the look and the open.
    let opened = ws.stat_self().ok()?;
    if (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino) {
        return None;
    }
    // Anything under the marker's name keeps the workspace; only a clear "nothing" does not.
    if !matches!(ws.stat(KEPT_MARKER), Ok(None)) {
        return None;
    }
    Some(ws)
}

/// The build's private working directory under `--build-dir`, locked while the build lives.
#[must_use]
pub(crate) struct Workspace {
    /// The directory under the build directory; holds the lock.
    pub dir: PathBuf,
    /// Where the build writes: `dir` itself, or a tmpfs mounted below it.
    pub work: PathBuf,
    tmpfs: Option<Mount>,
    closed: bool,
    _lock: nix::fcntl::Flock<File>,
}

impl Workspace {
    /// Creates a workspace in `build_dir`, private to this user (0700): the images in it hold
    /// password hashes and files of mode 0600, readable by anyone were the directory open. What
    /// debimg writes directly here is 0600; the image tree inside keeps the modes the image
    /// needs (a 0755 /usr, setuid binaries, device nodes), unreachable through this directory.
    pub fn create(build_dir: &Path, name: &str, tmpfs: Option<u64>) -> Result<Workspace> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("debimg-{name}-"))
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir_in(build_dir)
            .with_context(|| format!("creating a workspace in {}", build_dir.display()))?
            .keep();
        let lock_path = dir.join(WORKSPACE_LOCK);
        // Locked under another name, then renamed into place: another build's sweep of stale
        // workspaces (`clean_stale_workspaces`) takes a workspace whose lock it can get for a
        // dead build's; between creating the lock file and locking it, it could get this one's
        // and remove the workspace being made. A workspace with no lock file is not swept.
        let temp_path = dir.join(format!("{WORKSPACE_LOCK}.new"));
        let file = File::options()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp_path)
            .with_context(|| format!("creating {}", temp_path.display()))?;
        let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| e)
            .with_context(|| format!("locking {}", temp_path.display()))?;
        std::fs::rename(&temp_path, &lock_path)
            .with_context(|| format!("renaming {} into place", temp_path.display()))?;
        let mut ws = Workspace {
            work: dir.clone(),
            dir,
            tmpfs: None,
            closed: false,
            _lock: lock,
        };
        if let Some(size) = tmpfs {
            // Below the locked directory, so that a build killed with SIGKILL leaves a
            // directory the next run recognizes and removes (the tmpfs goes with the
            // namespace).
            let work = ws.dir.join("tmpfs");
            std::fs::create_dir(&work).with_context(|| format!("creating {}", work.display()))?;
            let (flags, options) = tmpfs_mount_options(size);
            let m = mount::mount("debimg-tmpfs", &work, Some("tmpfs"), flags, Some(&options))
                .with_context(|| format!("mounting a {} MiB tmpfs", size >> 20))?;
            tracing::info!(
                "workspace on a tmpfs of {} MiB at {}",
                size >> 20,
                work.display()
            );
            ws.tmpfs = Some(m);
            ws.work = work;
        }
        tracing::debug!("workspace {}", ws.dir.display());
        Ok(ws)
    }

    /// Unmounts everything in the workspace, the tmpfs last.
    fn unmount_all(&mut self) -> Result<()> {
        if let Some(m) = self.tmpfs.take() {
            mount::unmount_all_under(&self.work)
                .and_then(|()| m.close())
                .map_err(|e| {
                    e.context(format!("unmounting the tmpfs at {}", self.work.display()))
                })?;
        }
        mount::unmount_all_under(&self.dir)
    }

    /// True when the build writes into a tmpfs.
    pub fn on_tmpfs(&self) -> bool {
        self.tmpfs.is_some()
    }

    /// Unmounts anything left and deletes the workspace, never across a mount point.
    pub fn close(mut self) -> Result<()> {
        self.closed = true;
        self.unmount_all()?;
        mount::remove_dir_all_safe(&self.dir)
            .with_context(|| format!("removing workspace {}", self.dir.display()))
    }

    /// Keeps the workspace for inspection after a failure: unmounts everything in it, marks it
    /// so that no later build removes it, and says where it is.
    pub fn keep(mut self) -> Result<()> {
        self.closed = true;
        self.unmount_all()?;
        let marker = self.dir.join(KEPT_MARKER);
        File::options()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&marker)
            .and_then(|mut f| f.write_all(b"kept by --keep-on-failure\n"))
            .with_context(|| format!("writing {}", marker.display()))?;
        let mut files: Vec<String> = std::fs::read_dir(&self.dir)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| !n.starts_with('.'))
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        tracing::error!(
            "the failed build's workspace is kept at {} (holds: {}); image files can be examined with `mount -o loop,ro`; remove it with `rm -rf {}`",
            self.dir.display(),
            files.join(", "),
            self.dir.display()
        );
        Ok(())
    }
}

/// Mount flags and options of a `--tmpfs` workspace of `size` bytes.
///
/// Neither `nodev` nor `nosuid`: the image tree built on it holds device nodes (a tarball's
/// chroot keeps its /dev on it; with `nodev` dpkg fails on `/dev/null`) and setuid binaries,
/// exactly as a build on disk does. `mode=0700` keeps other users out of the tmpfs, as the
/// 0700 workspace does on disk: that, not `nodev`, is what keeps them away from those files.
fn tmpfs_mount_options(size: u64) -> (MsFlags, String) {
    (MsFlags::empty(), format!("size={size},mode=0700"))
}

impl Drop for Workspace {
    fn drop(&mut self) {
        if self.closed {
            return;
        }
        let res = self
            .unmount_all()
            .and_then(|()| mount::remove_dir_all_safe(&self.dir));
        if let Err(e) = res {
            tracing::warn!("cleaning workspace {}: {e:#}", self.dir.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::{mode, victim};
    use std::time::Duration;

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    /// Every kind of entry stale-workspace cleanup must leave alone, next to one it must remove
    /// (without which the test could pass by removing nothing).
    #[test]
    fn stale_cleanup_follows_no_link_opens_no_fifo_and_spares_others() {
        let build_dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let b = build_dir.path();
        let v = victim(outside.path());
        let before = crate::output::fingerprint(&v);
        let make_ws = |name: &str| {
            let d = b.join(name);
            std::fs::create_dir(&d).unwrap();
            std::fs::write(d.join(WORKSPACE_LOCK), b"").unwrap();
            std::fs::write(d.join("root.img"), b"image").unwrap();
            d
        };
        // A link to a directory that looks like a free workspace.
        let target = outside.path().join("looks-stale");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join(WORKSPACE_LOCK), b"").unwrap();
        std::fs::write(target.join("keep.txt"), b"keep").unwrap();
        std::os::unix::fs::symlink(&target, b.join("debimg-link")).unwrap();
        // A workspace whose lock is a FIFO (a blocking open would hang), or a link to a host
        // file.
        let fifo_ws = b.join("debimg-fifo");
        std::fs::create_dir(&fifo_ws).unwrap();
        let fifo = fifo_ws.join(WORKSPACE_LOCK);
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let link_lock_ws = b.join("debimg-linklock");
        std::fs::create_dir(&link_lock_ws).unwrap();
        std::os::unix::fs::symlink(&v, link_lock_ws.join(WORKSPACE_LOCK)).unwrap();
        // Kept: even a dangling link under the marker's name keeps it.
        let kept = make_ws("debimg-kept");
        std::os::unix::fs::symlink("/nonexistent", kept.join(KEPT_MARKER)).unwrap();
        // Another user's.
        let others = make_ws("debimg-others");
        if is_root() {
            nix::unistd::chown(&others, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
        }
        let stale = make_ws("debimg-stale");

        let path = b.to_path_buf();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            clean_stale_workspaces(&path);
            let _ = tx.send(());
        });
        rx.recv_timeout(Duration::from_secs(20))
            .expect("stale-workspace cleanup hung");

        assert!(!stale.exists(), "a stale workspace of this user is removed");
        assert!(
            std::fs::symlink_metadata(b.join("debimg-link"))
                .unwrap()
                .is_symlink(),
            "the link is left"
        );
        assert_eq!(std::fs::read(target.join("keep.txt")).unwrap(), b"keep");
        assert!(target.join(WORKSPACE_LOCK).is_file());
        assert!(fifo.exists(), "the workspace with a FIFO lock is left");
        assert!(link_lock_ws.join(WORKSPACE_LOCK).is_symlink());
        assert_eq!(crate::output::fingerprint(&v), before);
        assert!(kept.join("root.img").exists(), "a kept workspace is left");
        if is_root() {
            assert!(others.join("root.img").exists(), "another user's is left");
        }
    }

    #[test]
    fn workspace_is_private() {
        let build_dir = tempfile::tempdir().unwrap();
        let ws = Workspace::create(build_dir.path(), "t", None).unwrap();
        assert_eq!(mode(&ws.dir), 0o700);
        assert_eq!(mode(&ws.dir.join(WORKSPACE_LOCK)), 0o600);
        let dir = ws.dir.clone();
        ws.keep().unwrap();
        assert_eq!(mode(&dir.join(KEPT_MARKER)), 0o600);
        mount::remove_dir_all_safe(&dir).unwrap();
    }

    #[test]
    fn tmpfs_workspace_allows_devices_and_setuid_and_is_private() {
        let (flags, options) = tmpfs_mount_options(64 << 20);
        assert!(!flags.contains(MsFlags::MS_NODEV), "{flags:?}");
        assert!(!flags.contains(MsFlags::MS_NOSUID), "{flags:?}");
        assert!(options.split(',').any(|o| o == "mode=0700"), "{options}");
    }

    /// The real thing: a `--tmpfs` workspace, in a forked child's private mount namespace, holds
    /// a usable device node (dpkg's /dev/null in a tarball's chroot) and is 0700.
    #[test]
    fn tmpfs_workspace_holds_a_working_dev_null() {
        use nix::sys::wait::{WaitStatus, waitpid};
        use nix::unistd::{ForkResult, fork};
        if !is_root() {
            eprintln!("skipping: needs root to unshare and mount");
            return;
        }
        let build_dir = tempfile::Builder::new()
            .prefix("debimg-tmpfs-test-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let bdir = build_dir.path().to_path_buf();
        // SAFETY: the child only runs the code below and leaves through _exit; glibc makes
        // malloc safe after fork, and no lock of ours is held.
        match unsafe { fork() }.unwrap() {
            ForkResult::Child => {
                let code = std::panic::catch_unwind(|| {
                    if crate::sys::namespace::enter_private_mount_namespace().is_err() {
                        return 2;
                    }
                    let Ok(ws) = Workspace::create(&bdir, "t", Some(16 << 20)) else {
                        return 3;
                    };
                    if mode(&ws.work) != 0o700 {
                        return 4;
                    }
                    let null = ws.work.join("null");
                    let made = nix::sys::stat::mknod(
                        &null,
                        nix::sys::stat::SFlag::S_IFCHR,
                        nix::sys::stat::Mode::from_bits_truncate(0o666),
                        nix::sys::stat::makedev(1, 3),
                    );
                    if made.is_err() {
                        return 5;
                    }
                    if std::fs::write(&null, b"discarded").is_err() {
                        return 6;
                    }
                    if ws.close().is_err() {
                        return 7;
                    }
                    0
                })
                .unwrap_or(8);
                // SAFETY: leaves the child without running the harness's code.
                unsafe { libc::_exit(code) }
            }
            ForkResult::Parent { child } => {
                let status = waitpid(child, None).unwrap();
                assert_eq!(
                    status,
                    WaitStatus::Exited(child, 0),
                    "2: unshare, 3: workspace, 4: tmpfs not 0700, 5: mknod, 6: opening the \
                     device (nodev?), 7: close"
                );
            }
        }
    }
}
