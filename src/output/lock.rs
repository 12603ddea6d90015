//! The output directory's lock: one build writes a directory at a time.

use std::fs::File;
use std::path::Path;

use anyhow::{Context, Result};

use crate::output::OutputDir;

/// Name of the output directory's lock file. It persists between builds; a release removes it
/// when done.
pub const OUTPUT_LOCK: &str = ".debimg.lock";

/// An exclusive lock on the output directory, held for the whole build.
#[must_use]
pub struct OutputLock {
    dir: OutputDir,
    _lock: nix::fcntl::Flock<File>,
}

impl OutputLock {
    /// Takes the lock of the directory `dir`, waiting for it when `wait` is set.
    pub fn acquire(dir: &Path, wait: bool) -> Result<OutputLock> {
        OutputLock::acquire_in(&OutputDir::open(dir)?, wait)
    }

    /// Takes the lock of a directory already open.
    ///
    /// The lock file is opened without following a link and only when it is a regular file:
    /// others who may write to the directory could have planted a link to a host file, or a
    /// FIFO, under its name.
    pub fn acquire_in(dir: &OutputDir, wait: bool) -> Result<OutputLock> {
        use nix::fcntl::{Flock, FlockArg};
        let file = dir
            .open_or_create(OUTPUT_LOCK, 0o600)
            .with_context(|| format!("locking the output directory {}", dir.path().display()))?;
        let arg = if wait {
            FlockArg::LockExclusive
        } else {
            FlockArg::LockExclusiveNonblock
        };
        match Flock::lock(file, arg) {
            Ok(lock) => {
                // A publish that crashed is completed, or its leftovers removed, before this
                // holder reads or writes anything.
                crate::output::publish::recover(dir).with_context(|| {
                    format!(
                        "completing an interrupted publish in {}",
                        dir.path().display()
                    )
                })?;
                Ok(OutputLock {
                    dir: dir.try_clone()?,
                    _lock: lock,
                })
            }
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(crate::error::Error::tagged(
                crate::error::ErrorKind::OutputLocked,
                format!(
                    "another debimg build is writing to {}; wait for it (or pass --wait)",
                    dir.path().display()
                ),
            )),
            Err((_, e)) => {
                Err(e).with_context(|| format!("locking {}", dir.join(OUTPUT_LOCK).display()))
            }
        }
    }

    /// The locked directory, open: write into it through this, not through its path.
    pub fn dir(&self) -> &OutputDir {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::{mode, victim};
    use std::time::Duration;

    #[test]
    fn output_lock_refuses_a_link_and_leaves_its_target_alone() {
        let out = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let v = victim(outside.path());
        let before = crate::output::fingerprint(&v);
        std::os::unix::fs::symlink(&v, out.path().join(OUTPUT_LOCK)).unwrap();
        let err = format!(
            "{:#}",
            OutputLock::acquire(out.path(), false).err().unwrap()
        );
        assert!(
            err.contains(".debimg.lock is a symbolic link: refusing to follow it"),
            "{err}"
        );
        assert_eq!(crate::output::fingerprint(&v), before);
    }

    #[test]
    fn output_lock_refuses_a_fifo_without_hanging() {
        let out = tempfile::tempdir().unwrap();
        let lock = out.path().join(OUTPUT_LOCK);
        nix::unistd::mkfifo(&lock, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let path = out.path().to_path_buf();
        let (tx, rx) = std::sync::mpsc::channel();
        // A blocking open of the FIFO would never return: judge by a deadline.
        std::thread::spawn(move || {
            let _ = tx.send(
                OutputLock::acquire(&path, false)
                    .err()
                    .map(|e| format!("{e:#}")),
            );
        });
        let err = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("taking the lock hung on a FIFO")
            .expect("a FIFO was taken as the lock");
        assert!(err.contains("not a regular file"), "{err}");
    }

    #[test]
    fn output_lock_persists_and_excludes_a_second_build() {
        let out = tempfile::tempdir().unwrap();
        let first = OutputLock::acquire(out.path(), false).unwrap();
        let err = format!(
            "{:#}",
            OutputLock::acquire(out.path(), false).err().unwrap()
        );
        assert!(err.contains("another debimg build is writing"), "{err}");
        drop(first);
        let again = OutputLock::acquire(out.path(), false).unwrap();
        assert!(out.path().join(OUTPUT_LOCK).is_file());
        assert_eq!(mode(&out.path().join(OUTPUT_LOCK)), 0o600);
        assert_eq!(again.dir().path(), out.path());
    }
}
