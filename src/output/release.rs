//! Release output (`--release ID`, `--pack tar.gz`): a directory per build with the outputs, the
//! spec as built, the build log and checksum files `sha256sum -c` and `md5sum -c` accept; and
//! all outputs packed into one archive.
//!
//! The output directory may be shared with other users: every file here is reached through the
//! directory's descriptor ([`OutputDir`]), and no link in it is followed.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::cmd::CommandRunExt;
use crate::output::{EntryKind, OutputDir, fd_path, inherit_fds};
use crate::output::{OUTPUT_LOCK, OutputLock};
use crate::pack::compress;
use crate::pack::digest::digest_file;
use crate::spec::Container;

/// Marks a directory debimg made for a release: only such a directory is ever emptied for a
/// new try. Hidden, so the release's sums leave it out.
pub const RELEASE_MARKER: &str = ".debimg-release";

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
    // Beside the outputs, `<name>.attachments` is a build's own directory.
    if id.ends_with(".attachments") {
        bail!(
            "release ID `{id}` ends in `.attachments`, which names a build's attachments directory"
        );
    }
    Ok(())
}

/// Checks a release ID for clap (a bad one is a usage error, exit 2).
pub fn parse_release_id(text: &str) -> Result<String, String> {
    check_release_id(text)
        .map(|()| text.to_string())
        .map_err(|e| e.to_string())
}

/// The spec text with every `@BUILD_ID@` replaced by the release ID.
pub fn substitute_build_id(text: &str, id: &str) -> String {
    text.replace(BUILD_ID_PLACEHOLDER, id)
}

/// The release directory `base/id`, open: created with its marker, or, when a failed run left it
/// (the marker and no `SHA256SUMS`), emptied for this one.
///
/// Refused, deleting nothing: a link at `base/id` (never followed), anything there but a
/// directory, a directory debimg did not make (no marker: someone's files), a complete release
/// (`SHA256SUMS`), a directory holding a sub-directory, and one another build is writing to.
pub fn prepare_dir(base: &Path, id: &str) -> Result<OutputDir> {
    check_release_id(id)?;
    std::fs::create_dir_all(base).with_context(|| format!("creating {}", base.display()))?;
    let parent = OutputDir::open(base)?;
    let path = parent.join(id);
    match parent.kind(id)? {
        None => {
            parent.create_subdir(id, 0o755)?;
            let dir = parent.open_subdir(id)?;
            dir.write_file(
                RELEASE_MARKER,
                b"made by debimg build --release: emptied when a build of this release fails\n",
                0o644,
            )?;
            return Ok(dir);
        }
        Some(EntryKind::Dir) => {}
        Some(EntryKind::Symlink) => {
            return Err(crate::error::Error::tagged(
                crate::error::ErrorKind::Refused,
                format!(
                    "release directory {} is a symbolic link: refusing to follow it",
                    path.display()
                ),
            ));
        }
        Some(_) => bail!("{} exists and is not a directory", path.display()),
    }
    let dir = parent.open_subdir(id)?;
    if dir.kind("SHA256SUMS")?.is_some() {
        bail!(
            "release {} exists already; choose another ID or remove it",
            path.display()
        );
    }
    if dir.kind(RELEASE_MARKER)? != Some(EntryKind::File) {
        return Err(crate::error::Error::tagged(
            crate::error::ErrorKind::Refused,
            format!(
                "{} exists and was not made by debimg (no {RELEASE_MARKER}): refusing to empty it; choose another ID or remove it",
                path.display()
            ),
        ));
    }
    // Held while emptying, so that a build still writing this release is not pulled from under.
    let lock = OutputLock::acquire_in(&dir, false)?;
    empty_incomplete(&dir)?;
    drop(lock);
    tracing::info!(
        "release {}: emptied what a failed build left",
        path.display()
    );
    Ok(dir)
}

/// True for a directory name that is debimg's attachments directory (`NAME.attachments`), or
/// one being written or moved aside by a publish (`.NAME.attachments.pub-TOKEN`,
/// `.NAME.attachments.old-TOKEN`; `.tmp-` as earlier versions named it).
fn is_attachments_dir(name: &str) -> bool {
    name.ends_with(".attachments")
        || (name.starts_with('.')
            && [".pub-", ".old-", ".tmp-"].iter().any(|k| {
                name.rsplit_once(k)
                    .is_some_and(|(base, _)| base.ends_with(".attachments"))
            }))
}

/// Removes every entry of a failed release but its marker and lock, without following any
/// link; refuses, before removing anything, if a directory other than an attachments
/// directory of debimg's is inside (those are removed whole, through descriptors, never
/// reaching into another filesystem).
fn empty_incomplete(dir: &OutputDir) -> Result<()> {
    let names = dir.entries()?;
    for name in &names {
        let ours = name.to_str().is_some_and(is_attachments_dir);
        if !ours && dir.kind(name)? == Some(EntryKind::Dir) {
            return Err(crate::error::Error::tagged(
                crate::error::ErrorKind::Refused,
                format!(
                    "{} holds a directory, {}, which debimg does not make: refusing to empty it",
                    dir.path().display(),
                    dir.join(name).display()
                ),
            ));
        }
    }
    for name in names {
        if name != RELEASE_MARKER && name != OUTPUT_LOCK {
            dir.remove_all(&name)?;
        }
    }
    dir.sync()
}

/// Copies everything written to this process's stderr (its own log lines and the output of the
/// programs it runs, which inherit the descriptor) into a file as well, until
/// [`LogTee::finish`].
pub struct LogTee {
    saved: Option<OwnedFd>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl LogTee {
    /// Starts copying stderr into the file `name` of `dir`, made anew.
    pub fn start(dir: &OutputDir, name: &str) -> Result<LogTee> {
        let mut log = open_log(dir, name)?;
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

/// A new, empty log file `name` in `dir`: whatever is there goes first (a link is removed, not
/// followed), then the file is created with `O_EXCL`.
fn open_log(dir: &OutputDir, name: &str) -> Result<File> {
    dir.remove(name)?;
    dir.create_new(name, 0o644)
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

/// Writes `SHA256SUMS` and `MD5SUMS` for every regular file of `dir` and of its attachments
/// directories (`NAME.attachments/etc/os-release`; hidden files at the top, the sum files
/// themselves and anything not a regular file, links included, excepted), sorted by name, in
/// the format `sha256sum -c` reads (a name with a backslash or a line break escaped as it
/// expects). Each file is read without following a link; each sum file is written whole and
/// renamed into place.
pub fn write_sums(dir: &OutputDir) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for name in dir.entries()? {
        let Some(name) = name.to_str() else {
            bail!(
                "{}: a file name that is not UTF-8 cannot go into SHA256SUMS",
                dir.join(&name).display()
            );
        };
        if name.starts_with('.') || name == "SHA256SUMS" || name == "MD5SUMS" {
            continue;
        }
        match dir.kind(name)? {
            Some(EntryKind::File) => names.push(name.to_string()),
            Some(EntryKind::Dir) if is_attachments_dir(name) => {
                names.extend(dir.files_under(name)?);
            }
            _ => {}
        }
    }
    names.sort();
    let mut sha = String::new();
    let mut md5s = String::new();
    for name in &names {
        let Some((file, _)) = dir.open_regular_at(name)? else {
            bail!("{} changed while it was summed", dir.join(name).display());
        };
        // Through the descriptor just opened: the file checked, whatever its name leads to now.
        let d = digest_file(&fd_path(&file))
            .with_context(|| format!("digesting {}", dir.join(name).display()))?;
        sha.push_str(&sum_line(&d.sha256, name));
        md5s.push_str(&sum_line(&d.md5, name));
    }
    dir.write_file("SHA256SUMS", sha.as_bytes(), 0o644)?;
    dir.write_file("MD5SUMS", md5s.as_bytes(), 0o644)?;
    Ok(names)
}

/// A line of a sum file as coreutils write it: `HASH  NAME`, or for a name holding a backslash
/// or a line break, `\HASH  NAME` with those escaped (`\\`, `\n`).
fn sum_line(hash: &str, name: &str) -> String {
    if name.contains(['\\', '\n']) {
        let escaped = name.replace('\\', "\\\\").replace('\n', "\\n");
        format!("\\{hash}  {escaped}\n")
    } else {
        format!("{hash}  {name}\n")
    }
}

/// Packs `files` (names in `dir`; an attachments directory with everything in it) into
/// `dir/<archive>` (a gzipped tar), then removes them.
/// The archive appears under its name only when complete.
pub fn pack_outputs(dir: &OutputDir, files: &[String], archive: &str) -> Result<PathBuf> {
    let (tar, tar_name) = dir.create_temp(format!("{archive}.tar"), 0o600)?;
    let res = (|| -> Result<()> {
        let (gz, gz_name) = dir.create_temp(archive, 0o644)?;
        let res = (|| {
            // tar writes into the file just created and reads the outputs from the directory
            // opened, both through descriptors it inherits: no name someone else may change in
            // the directory redirects it. It stores a link as a link, never what it points to.
            let mut cmd = std::process::Command::new("tar");
            cmd.arg("--create")
                .arg("--file")
                .arg(fd_path(&tar))
                .arg("--directory")
                .arg(dir.proc_path())
                .args(["--sparse", "--"])
                .args(files);
            inherit_fds(&mut cmd, &[tar.as_fd(), dir.as_fd()]);
            cmd.run()
                .with_context(|| format!("archiving the outputs in {}", dir.path().display()))?;
            compress::pack_into(&fd_path(&tar), Container::Gzip, gz, &dir.join(&gz_name))?;
            dir.commit(&gz_name, archive)
        })();
        if res.is_err() {
            let _ = dir.remove(&gz_name);
        }
        res
    })();
    drop(tar);
    let removed = dir.remove(&tar_name);
    res?;
    removed?;
    for f in files {
        dir.remove_all(f)
            .with_context(|| format!("removing packed {}", dir.join(f).display()))?;
    }
    Ok(dir.join(archive))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::victim;

    #[test]
    fn a_release_id_never_names_an_attachments_directory() {
        assert!(check_release_id("42").is_ok());
        assert!(check_release_id("foo.attachments").is_err());
    }

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
        std::fs::write(dir.path().join(RELEASE_MARKER), b"").unwrap();
        let names = write_sums(&OutputDir::open(dir.path()).unwrap()).unwrap();
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
            &OutputDir::open(dir.path()).unwrap(),
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

    use crate::output::{fingerprint, names};
    use std::os::unix::fs::symlink;

    #[test]
    fn sums_follow_no_link_and_replace_links_at_their_names() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let v = victim(outside.path());
        let before = fingerprint(&v);
        std::fs::write(dir.path().join("a.img"), b"abc").unwrap();
        symlink(&v, dir.path().join("secret.img")).unwrap();
        symlink(&v, dir.path().join("SHA256SUMS")).unwrap();
        symlink(&v, dir.path().join("MD5SUMS")).unwrap();
        let names = write_sums(&OutputDir::open(dir.path()).unwrap()).unwrap();
        assert_eq!(names, ["a.img"], "a link is no file of the release");
        for sums in ["SHA256SUMS", "MD5SUMS"] {
            let p = dir.path().join(sums);
            assert!(std::fs::symlink_metadata(&p).unwrap().is_file(), "{sums}");
            let text = std::fs::read_to_string(&p).unwrap();
            assert!(
                text.ends_with("  a.img\n") && text.lines().count() == 1,
                "{text}"
            );
        }
        assert_eq!(fingerprint(&v), before);
    }

    #[test]
    fn the_build_log_replaces_a_link_without_writing_through_it() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let v = victim(outside.path());
        let before = fingerprint(&v);
        symlink(&v, dir.path().join("build.log")).unwrap();
        let mut log = open_log(&OutputDir::open(dir.path()).unwrap(), "build.log").unwrap();
        log.write_all(b"stage mount: started\n").unwrap();
        let p = dir.path().join("build.log");
        assert!(std::fs::symlink_metadata(&p).unwrap().is_file());
        assert_eq!(std::fs::read(&p).unwrap(), b"stage mount: started\n");
        assert_eq!(fingerprint(&v), before);
    }

    #[test]
    fn a_new_release_directory_gets_the_marker() {
        let base = tempfile::tempdir().unwrap();
        let out = base.path().join("out");
        let dir = prepare_dir(&out, "1").unwrap();
        assert_eq!(dir.path(), out.join("1"));
        assert_eq!(names(&out.join("1")), [RELEASE_MARKER]);
    }

    #[test]
    fn a_link_at_the_release_directory_is_refused() {
        let base = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let v = victim(outside.path());
        let before = fingerprint(&v);
        // Even a directory that looks like an incomplete release of debimg's.
        std::fs::write(outside.path().join(RELEASE_MARKER), b"").unwrap();
        symlink(outside.path(), base.path().join("7")).unwrap();
        let err = format!("{:#}", prepare_dir(base.path(), "7").unwrap_err());
        assert!(
            err.contains("symbolic link: refusing to follow it"),
            "{err}"
        );
        assert_eq!(fingerprint(&v), before);
        assert_eq!(names(outside.path()), [RELEASE_MARKER, "victim"]);
    }

    #[test]
    fn a_directory_debimg_did_not_make_is_refused() {
        let base = tempfile::tempdir().unwrap();
        let mine = base.path().join("7");
        std::fs::create_dir(&mine).unwrap();
        let v = victim(&mine);
        let before = fingerprint(&v);
        let err = format!("{:#}", prepare_dir(base.path(), "7").unwrap_err());
        assert!(err.contains("not made by debimg"), "{err}");
        assert!(err.contains("refusing to empty it"), "{err}");
        assert_eq!(fingerprint(&v), before);
    }

    #[test]
    fn an_incomplete_release_is_emptied_without_following_links() {
        let base = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let v = victim(outside.path());
        let before = fingerprint(&v);
        let dir = base.path().join("7");
        prepare_dir(base.path(), "7").unwrap();
        for f in ["build.log", "x.img.gz", ".x.yaml.tmp-0123", OUTPUT_LOCK] {
            std::fs::write(dir.join(f), b"left by a failed run").unwrap();
        }
        symlink(&v, dir.join("x.yaml")).unwrap();
        symlink(outside.path(), dir.join("x.spec.yaml")).unwrap();
        let reopened = prepare_dir(base.path(), "7").unwrap();
        assert_eq!(reopened.path(), dir);
        assert_eq!(names(&dir), [RELEASE_MARKER, OUTPUT_LOCK]);
        assert_eq!(fingerprint(&v), before);
        assert_eq!(names(outside.path()), ["victim"]);
    }

    #[test]
    fn a_release_with_a_directory_inside_or_complete_or_busy_is_refused_whole() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("7");
        prepare_dir(base.path(), "7").unwrap();
        std::fs::write(dir.join("x.img.gz"), b"image").unwrap();
        std::fs::create_dir(dir.join("sub")).unwrap();
        let err = format!("{:#}", prepare_dir(base.path(), "7").unwrap_err());
        assert!(err.contains("holds a directory"), "{err}");
        assert!(
            dir.join("x.img.gz").exists(),
            "nothing removed before refusing"
        );

        std::fs::remove_dir(dir.join("sub")).unwrap();
        let busy = OutputLock::acquire(&dir, false).unwrap();
        let err = format!("{:#}", prepare_dir(base.path(), "7").unwrap_err());
        assert!(err.contains("another debimg build is writing"), "{err}");
        assert!(dir.join("x.img.gz").exists());
        drop(busy);

        std::fs::write(dir.join("SHA256SUMS"), b"").unwrap();
        let err = format!("{:#}", prepare_dir(base.path(), "7").unwrap_err());
        assert!(err.contains("exists already"), "{err}");
        assert!(dir.join("x.img.gz").exists());
    }

    #[test]
    fn packing_stores_a_link_as_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let v = victim(outside.path());
        std::fs::write(dir.path().join("x.yaml"), b"meta").unwrap();
        symlink(&v, dir.path().join("x.img.gz")).unwrap();
        let a = pack_outputs(
            &OutputDir::open(dir.path()).unwrap(),
            &["x.img.gz".into(), "x.yaml".into()],
            "x.bundle.tar.gz",
        )
        .unwrap();
        let out = std::process::Command::new("tar")
            .arg("-tvzf")
            .arg(&a)
            .output()
            .unwrap();
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(listing.contains("x.img.gz -> "), "{listing}");
        assert!(!listing.contains("a host file"), "{listing}");
        assert_eq!(names(dir.path()), ["x.bundle.tar.gz"]);
        assert!(v.exists());
    }

    #[test]
    fn sums_cover_the_attachments_and_escape_names_as_coreutils_do() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let v = victim(outside.path());
        std::fs::write(dir.path().join("x.tar.gz"), b"abc").unwrap();
        let att = dir.path().join("x.attachments");
        std::fs::create_dir_all(att.join("etc/systemd/system")).unwrap();
        std::fs::write(att.join("etc/hostname"), b"node1\n").unwrap();
        std::fs::write(att.join("etc/.hidden"), b"kept\n").unwrap();
        std::fs::write(
            att.join("etc/systemd/system/mnt-a\\x2db.mount"),
            b"[Mount]\n",
        )
        .unwrap();
        symlink(&v, att.join("etc/victim")).unwrap();
        // Another directory is no output of debimg's: left out.
        std::fs::create_dir_all(dir.path().join("other")).unwrap();
        std::fs::write(dir.path().join("other/file"), b"x").unwrap();
        let names = write_sums(&OutputDir::open(dir.path()).unwrap()).unwrap();
        assert_eq!(
            names,
            [
                "x.attachments/etc/.hidden",
                "x.attachments/etc/hostname",
                "x.attachments/etc/systemd/system/mnt-a\\x2db.mount",
                "x.tar.gz",
            ]
        );
        let sha = std::fs::read_to_string(dir.path().join("SHA256SUMS")).unwrap();
        assert!(
            sha.contains("  x.attachments/etc/systemd/system/mnt-a\\\\x2db.mount\n"),
            "{sha}"
        );
        for (tool, file) in [("sha256sum", "SHA256SUMS"), ("md5sum", "MD5SUMS")] {
            let st = std::process::Command::new(tool)
                .args(["--check", "--strict", file])
                .current_dir(dir.path())
                .output()
                .unwrap();
            assert!(st.status.success(), "{tool}: {st:?}");
            assert_eq!(
                String::from_utf8_lossy(&st.stdout).matches(": OK").count(),
                4
            );
        }
    }

    #[test]
    fn an_incomplete_release_loses_its_attachments_without_following_links() {
        let base = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let v = victim(outside.path());
        let before = fingerprint(&v);
        let dir = base.path().join("7");
        prepare_dir(base.path(), "7").unwrap();
        for d in ["x.attachments/etc", ".x.attachments.tmp-0123/usr/bin"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        std::fs::write(dir.join("x.attachments/etc/hostname"), b"n").unwrap();
        symlink(&v, dir.join("x.attachments/etc/victim")).unwrap();
        symlink(
            outside.path(),
            dir.join(".x.attachments.tmp-0123/usr/bin/out"),
        )
        .unwrap();
        prepare_dir(base.path(), "7").unwrap();
        assert_eq!(names(&dir), [RELEASE_MARKER, OUTPUT_LOCK]);
        assert_eq!(fingerprint(&v), before);
        assert_eq!(names(outside.path()), ["victim"]);
    }

    #[test]
    fn a_bundle_takes_the_attachments_directory_whole() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x.yaml"), b"meta").unwrap();
        std::fs::create_dir_all(dir.path().join("x.attachments/etc")).unwrap();
        std::fs::write(dir.path().join("x.attachments/etc/hostname"), b"n").unwrap();
        let a = pack_outputs(
            &OutputDir::open(dir.path()).unwrap(),
            &["x.attachments".into(), "x.yaml".into()],
            "x.bundle.tar.gz",
        )
        .unwrap();
        let out = std::process::Command::new("tar")
            .arg("-tzf")
            .arg(&a)
            .output()
            .unwrap();
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(
            listing.contains("x.attachments/etc/hostname\n"),
            "{listing}"
        );
        assert_eq!(names(dir.path()), ["x.bundle.tar.gz"]);
    }
}
