//! Release output (`--release ID`, `--pack tar.gz`): a directory per build with the outputs, the
//! spec as built, the build log and checksum files `sha256sum -c` and `md5sum -c` accept; and
//! all outputs packed into one archive.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::cmd::CommandRunExt;
use crate::pack::compress;
use crate::pack::digest::digest_file;
use crate::spec::Container;

/// The placeholder a spec may use for the release ID (`name: cloud-@BUILD_ID@`).
pub const BUILD_ID_PLACEHOLDER: &str = "@BUILD_ID@";

/// Checks a release ID: it names a directory and ends up in file names.
pub fn check_release_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && !id.starts_with(['.', '-'])
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-+".contains(c));
    if !ok {
        bail!(
            "release ID `{id}` must be 1-64 letters, digits, `.`, `_`, `-`, `+`, not starting with `.` or `-`"
        );
    }
    Ok(())
}

/// The spec text with every `@BUILD_ID@` replaced by the release ID.
pub fn substitute_build_id(text: &str, id: &str) -> String {
    text.replace(BUILD_ID_PLACEHOLDER, id)
}

/// Copies everything written to this process's stderr (its own log lines and the output of the
/// programs it runs, which inherit the descriptor) into a file as well, until
/// [`LogTee::finish`].
pub struct LogTee {
    saved: Option<OwnedFd>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl LogTee {
    /// Starts copying stderr into `path` (created, truncated).
    pub fn start(path: &Path) -> Result<LogTee> {
        let mut log = File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let (read, write) = nix::unistd::pipe().context("creating a pipe for the build log")?;
        let saved = nix::unistd::dup(std::io::stderr()).context("duplicating stderr")?;
        let mut terminal = File::from(saved.try_clone().context("duplicating stderr")?);
        redirect_stderr(&write).context("redirecting stderr")?;
        drop(write);
        let mut read = File::from(read);
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            loop {
                let n = match read.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                };
                // The terminal may be gone (a closed ssh session); the log still gets it all.
                let _ = terminal.write_all(&buf[..n]);
                log.write_all(&buf[..n])?;
            }
            log.sync_all()
        });
        Ok(LogTee {
            saved: Some(saved),
            thread: Some(thread),
        })
    }

    /// Puts stderr back and waits until the log has everything written so far.
    pub fn finish(mut self) -> Result<()> {
        self.stop()
    }

    fn stop(&mut self) -> Result<()> {
        if let Some(saved) = self.saved.take() {
            redirect_stderr(&saved).context("restoring stderr")?;
        }
        if let Some(t) = self.thread.take() {
            match t.join() {
                Ok(res) => res.context("writing the build log")?,
                Err(_) => bail!("the build log writer panicked"),
            }
        }
        Ok(())
    }
}

/// Makes descriptor 2 a copy of `fd`.
fn redirect_stderr(fd: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: dup2 on two valid descriptors; descriptor 2 is replaced atomically.
    if unsafe { libc::dup2(fd.as_raw_fd(), 2) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl Drop for LogTee {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Writes `SHA256SUMS` and `MD5SUMS` for every regular file of `dir` (hidden files and the sum
/// files themselves excepted), sorted by name, in the format `sha256sum -c` reads.
pub fn write_sums(dir: &Path) -> Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.') && n != "SHA256SUMS" && n != "MD5SUMS")
        .collect();
    names.sort();
    let mut sha = String::new();
    let mut md5s = String::new();
    for name in &names {
        let path = dir.join(name);
        let d = digest_file(&path)?;
        sha.push_str(&format!("{}  {name}\n", d.sha256));
        md5s.push_str(&format!("{}  {name}\n", d.md5));
    }
    for (file, text) in [("SHA256SUMS", sha), ("MD5SUMS", md5s)] {
        let p = dir.join(file);
        std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(names)
}

/// Packs `files` (names in `dir`) into `dir/<archive>` (a gzipped tar), then removes them.
/// The archive appears under its name only when complete.
pub fn pack_outputs(dir: &Path, files: &[String], archive: &str) -> Result<PathBuf> {
    let token = crate::sys::unique_token();
    let tar = dir.join(format!(".{archive}.tar-{token}"));
    let tmp = dir.join(format!(".{archive}.tmp-{token}"));
    let res = (|| -> Result<PathBuf> {
        std::process::Command::new("tar")
            .arg("--create")
            .arg("--file")
            .arg(&tar)
            .arg("--directory")
            .arg(dir)
            .args(["--sparse", "--"])
            .args(files)
            .run()
            .with_context(|| format!("archiving the outputs in {}", dir.display()))?;
        compress::pack(&tar, Container::Gzip, &tmp)?;
        let dest = dir.join(archive);
        std::fs::rename(&tmp, &dest)
            .with_context(|| format!("moving {} into place", dest.display()))?;
        Ok(dest)
    })();
    let _ = std::fs::remove_file(&tar);
    let _ = std::fs::remove_file(&tmp);
    let dest = res?;
    for f in files {
        let p = dir.join(f);
        std::fs::remove_file(&p).with_context(|| format!("removing packed {}", p.display()))?;
    }
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_ids() {
        for ok in ["42", "2026.11.23-1", "rc1+build.7"] {
            check_release_id(ok).unwrap();
        }
        for bad in ["", "../x", "a/b", ".hidden", "-x", "a b"] {
            assert!(check_release_id(bad).is_err(), "{bad}");
        }
        assert_eq!(
            substitute_build_id("name: img-@BUILD_ID@\n# @BUILD_ID@\n", "7"),
            "name: img-7\n# 7\n"
        );
    }

    #[test]
    fn sums_are_accepted_by_the_coreutils_tools() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.img"), b"abc").unwrap();
        std::fs::write(dir.path().join("b.yaml"), b"name: b\n").unwrap();
        std::fs::write(dir.path().join(".debimg.lock"), b"").unwrap();
        let names = write_sums(dir.path()).unwrap();
        assert_eq!(names, ["a.img", "b.yaml"]);
        let sha = std::fs::read_to_string(dir.path().join("SHA256SUMS")).unwrap();
        assert!(sha.starts_with(
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad  a.img\n"
        ));
        for (tool, file) in [("sha256sum", "SHA256SUMS"), ("md5sum", "MD5SUMS")] {
            let st = std::process::Command::new(tool)
                .args(["--check", "--strict", file])
                .current_dir(dir.path())
                .output()
                .unwrap();
            assert!(st.status.success(), "{tool}: {st:?}");
        }
    }

    #[test]
    fn outputs_packed_into_one_archive() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x.img.gz"), b"img").unwrap();
        std::fs::write(dir.path().join("x.yaml"), b"meta").unwrap();
        let a = pack_outputs(
            dir.path(),
            &["x.img.gz".into(), "x.yaml".into()],
            "x.bundle.tar.gz",
        )
        .unwrap();
        assert!(!dir.path().join("x.yaml").exists());
        let out = std::process::Command::new("tar")
            .arg("-tzf")
            .arg(&a)
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "x.img.gz\nx.yaml\n");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
        assert_eq!(left.len(), 1, "only the archive is left");
    }
}
