//! Outputs written under temporary names and published whole, the metadata last; and the reuse
//! check, which reads what an earlier build published.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::metadata::Metadata;
use crate::output::{EntryKind, OutputDir, temp_name};
use crate::pack::digest::{Digests, HashingWriter, digest_reader};
use crate::plan::Plan;

/// Returns the existing metadata when every output matches the plan. Only regular files count:
/// a link in the output directory is not followed.
pub fn reusable(plan: &Plan, output_dir: &Path) -> Option<Metadata> {
    let dir = OutputDir::open(output_dir).ok()?;
    let size = |name: &str| match dir.stat(name) {
        Ok(Some(st)) if EntryKind::of(&st) == EntryKind::File => Some(st.st_size as u64),
        _ => None,
    };
    let mut text = String::new();
    std::io::Read::read_to_string(&mut dir.open_regular(plan.metadata_name()).ok()?, &mut text)
        .ok()?;
    let meta: Metadata = serde_saphyr::from_str(&text).ok()?;
    let names = plan.container_names();
    if meta.spec_digest != plan.digest || meta.images.len() != names.len() {
        return None;
    }
    for (name, m) in names.iter().zip(&meta.images) {
        if *name != m.container_name || size(&m.container_name)? != m.container_size {
            return None;
        }
    }
    let extra = plan.extra_output_names();
    if extra.len() != meta.files.len() {
        return None;
    }
    for (name, f) in extra.iter().zip(&meta.files) {
        if *name != f.name || size(name)? != f.size {
            return None;
        }
    }
    // Attachments are few and small next to the images: each is read again, so that a changed
    // one is found even when its size is the same. Each name must be the one this plan gives
    // its path: the metadata is data, and the names it lists are reported as outputs.
    for a in &meta.attachments {
        if !is_attachment_name(plan, &a.path, &a.file) {
            return None;
        }
        let (file, st) = dir.open_regular_at(&a.file).ok()??;
        if st.st_size as u64 != a.size || digest_reader(file).ok()?.sha256 != a.sha256 {
            return None;
        }
    }
    Some(meta)
}

/// Whether `file` is the output name a build of `plan` gives the attachment at `path`: the
/// kernel's or initrd's own name, or `<name>.attachments/<path>` of plain names.
pub(crate) fn is_attachment_name(plan: &Plan, path: &str, file: &str) -> bool {
    let (kernel, initrd) = plan.kernel_names();
    if file == kernel || file == initrd {
        return true;
    }
    let Some(rel) = file.strip_prefix(&format!("{}/", plan.attachments_dir_name())) else {
        return false;
    };
    path.strip_prefix('/') == Some(rel)
        && rel
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

/// Files being written into the output directory under temporary names; removed unless
/// published. Every name is looked up in the directory opened once, never followed.
pub(crate) struct PendingOutputs {
    path: PathBuf,
    /// Opened at first use (`new` cannot fail).
    dir: Option<OutputDir>,
    /// (temporary name, final name)
    temps: Vec<(String, String)>,
    /// The attachments directory being filled under a temporary name: (temporary name, final
    /// name).
    attachments: Option<(String, String)>,
}

impl PendingOutputs {
    /// Pending outputs in a directory already open (the one [`OutputLock::dir`] holds), so
    /// that no later swap of its path redirects them.
    pub fn in_dir(dir: OutputDir) -> PendingOutputs {
        PendingOutputs {
            path: dir.path().to_path_buf(),
            dir: Some(dir),
            temps: Vec::new(),
            attachments: None,
        }
    }

    /// Creates the temporary file for `final_name` (0644, as the output will be; `O_EXCL`, no
    /// link followed) and returns it open for writing, with its path.
    pub fn create_temp(&mut self, final_name: &str) -> Result<(File, PathBuf)> {
        let (file, temp) = open_dir(&mut self.dir, &self.path)?.create_temp(final_name, 0o644)?;
        let p = self.path.join(&temp);
        self.temps.push((temp, final_name.to_string()));
        Ok((file, p))
    }

    /// Writes the attachment `rel` (a path below the attachments directory `dir_name`, names
    /// separated by `/`) from `src` with mode 0644, into that directory made under a temporary
    /// name at the first call (0755, as are the directories below it); returns the digests of
    /// what was written. [`PendingOutputs::publish`] puts the directory in place whole.
    pub fn attach(&mut self, dir_name: &str, rel: &str, src: &mut impl Read) -> Result<Digests> {
        open_dir(&mut self.dir, &self.path)?;
        let dir = self
            .dir
            .as_ref()
            .context("the output directory is not open")?;
        let temp = match &self.attachments {
            Some((temp, _)) => temp.clone(),
            None => {
                let temp = temp_name(dir_name);
                dir.create_subdir(&temp, 0o700)?;
                self.attachments = Some((temp.clone(), dir_name.to_string()));
                dir.open_subdir(&temp)?.set_mode(0o755)?;
                temp
            }
        };
        let (parent, name) = rel.rsplit_once('/').unwrap_or(("", rel));
        let sub = dir.open_subdir(&temp)?.create_dirs(parent)?;
        let mut out = HashingWriter::new(sub.create_new(name, 0o644)?);
        std::io::copy(src, &mut out)
            .with_context(|| format!("writing {}", sub.join(name).display()))?;
        Ok(out.finish().1)
    }

    /// Renames the images into place, replaces the attachments directory `attachments` (an
    /// earlier build's goes even when this one has none: the metadata describes what is
    /// there; a directory no build of this name made stays unless this build has
    /// attachments, and one holding a release is never removed), then writes the metadata
    /// last. The old metadata goes first, so that no moment
    /// shows new images described by old metadata.
    pub fn publish(
        &mut self,
        images: &[&str],
        attachments: &str,
        metadata_name: &str,
        yaml: &str,
    ) -> Result<()> {
        let dir = open_dir(&mut self.dir, &self.path)?;
        // The old attachments directory goes when this build has its own, or when the old
        // metadata says an earlier build made it; never one that holds a release.
        #[derive(serde::Deserialize)]
        struct Listed {
            #[serde(default)]
            attachments: Vec<crate::metadata::AttachmentMeta>,
        }
        let old_had_attachments = dir
            .open_regular(metadata_name)
            .ok()
            .and_then(|mut f| {
                let mut text = String::new();
                f.read_to_string(&mut text).ok()?;
                serde_saphyr::from_str::<Listed>(&text).ok()
            })
            .is_some_and(|m| {
                m.attachments
                    .iter()
                    .any(|a| a.file.starts_with(&format!("{attachments}/")))
            });
        let replace_attachments = self.attachments.is_some() || old_had_attachments;
        if replace_attachments
            && dir.kind(attachments)? == Some(EntryKind::Dir)
            && dir
                .open_subdir(attachments)?
                .kind(crate::output::release::RELEASE_MARKER)?
                .is_some()
        {
            anyhow::bail!(
                "{} holds a release (it has {}): refusing to replace it with this build's \
                 attachments; choose another output directory",
                dir.join(attachments).display(),
                crate::output::release::RELEASE_MARKER
            );
        }
        dir.remove(metadata_name)?;
        dir.sync()?;
        for name in images {
            let (temp, _) = self
                .temps
                .iter()
                .find(|(_, n)| n == name)
                .with_context(|| format!("{name} was not packaged"))?;
            dir.commit(temp, name)?;
        }
        // Whatever was not published goes on drop.
        self.temps.retain(|(_, n)| !images.contains(&n.as_str()));
        // Links in the old directory are removed, never followed.
        if replace_attachments {
            dir.remove_all(attachments)?;
        }
        if let Some((temp, name)) = &self.attachments {
            dir.open_subdir(temp)?.sync_filesystem()?;
            dir.commit(temp, name)?;
            self.attachments = None;
        }
        dir.write_file(metadata_name, yaml.as_bytes(), 0o644)
    }
}

/// The directory `slot` holds, opened from `path` at first use.
fn open_dir<'a>(slot: &'a mut Option<OutputDir>, path: &Path) -> Result<&'a OutputDir> {
    match slot {
        Some(dir) => Ok(dir),
        None => Ok(slot.insert(OutputDir::open(path)?)),
    }
}

impl Drop for PendingOutputs {
    fn drop(&mut self) {
        if self.temps.is_empty() && self.attachments.is_none() {
            return;
        }
        let dir = match open_dir(&mut self.dir, &self.path) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!("removing temporary outputs: {e:#}");
                return;
            }
        };
        let temps = self.temps.drain(..);
        for (temp, _) in temps {
            if let Err(e) = dir.remove(&temp) {
                tracing::warn!("{e:#}");
            }
        }
        if let Some((temp, _)) = self.attachments.take()
            && let Err(e) = dir.remove_all(&temp)
        {
            tracing::warn!("{e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::victim;
    use std::io::Write;

    #[test]
    fn a_tarball_with_records_is_reused_only_while_complete() {
        let plan = Plan::for_test(
            "version: 1\nname: tb\nsuite: bookworm\nkind: tarball\nrecords: [packages]\n",
        );
        let out = tempfile::tempdir().unwrap();
        std::fs::write(out.path().join("tb.tar.gz"), b"archive").unwrap();
        std::fs::write(out.path().join("tb.packages"), b"a 1\n").unwrap();
        let image = crate::metadata::ImageMeta {
            container: "gzip".into(),
            container_name: "tb.tar.gz".into(),
            container_size: 7,
            container_md5: String::new(),
            container_sha256: String::new(),
            format: "tar".into(),
            raw_md5: String::new(),
            raw_name: "tb.tar".into(),
            raw_size: 0,
            raw_sha256: String::new(),
            mount: "/".into(),
            label: None,
            uuid: String::new(),
        };
        let meta = Metadata {
            name: "tb".into(),
            debimg_version: String::new(),
            spec_digest: plan.digest.clone(),
            bootstrap: String::new(),
            build_start: String::new(),
            build_end: String::new(),
            images: vec![image],
            repos: vec![],
            packages: vec![],
            installed: Default::default(),
            kind: "tarball".into(),
            files: vec![crate::metadata::FileMeta {
                name: "tb.packages".into(),
                size: 4,
                sha256: String::new(),
            }],
            attachments: vec![],
        };
        std::fs::write(out.path().join("tb.yaml"), meta.to_yaml().unwrap()).unwrap();
        assert!(reusable(&plan, out.path()).is_some());
        std::fs::write(out.path().join("tb.packages"), b"a 1\nb 2\n").unwrap();
        assert!(reusable(&plan, out.path()).is_none(), "a changed record");
        std::fs::write(out.path().join("tb.packages"), b"a 1\n").unwrap();
        std::fs::remove_file(out.path().join("tb.tar.gz")).unwrap();
        assert!(reusable(&plan, out.path()).is_none(), "a missing archive");
        std::fs::write(out.path().join("elsewhere"), b"archive").unwrap();
        std::os::unix::fs::symlink("elsewhere", out.path().join("tb.tar.gz")).unwrap();
        assert!(
            reusable(&plan, out.path()).is_none(),
            "a link is not an output"
        );
    }

    /// A plan with attachments and the metadata of its build, whose attachment is `content`.
    fn attached_build(out: &Path, content: &[u8]) -> Plan {
        let plan = Plan::for_test(
            "version: 1\nname: at\nsuite: bookworm\nkind: tarball\nattachments: [/etc/hostname]\n",
        );
        std::fs::write(out.join("at.tar.gz"), b"archive").unwrap();
        std::fs::create_dir_all(out.join("at.attachments/etc")).unwrap();
        std::fs::write(out.join("at.attachments/etc/hostname"), content).unwrap();
        let meta = Metadata {
            name: "at".into(),
            debimg_version: String::new(),
            spec_digest: plan.digest.clone(),
            bootstrap: String::new(),
            build_start: String::new(),
            build_end: String::new(),
            images: vec![crate::metadata::ImageMeta {
                container: "gzip".into(),
                container_name: "at.tar.gz".into(),
                container_size: 7,
                container_md5: String::new(),
                container_sha256: String::new(),
                format: "tar".into(),
                raw_md5: String::new(),
                raw_name: "at.tar".into(),
                raw_size: 0,
                raw_sha256: String::new(),
                mount: "/".into(),
                label: None,
                uuid: String::new(),
            }],
            repos: vec![],
            packages: vec![],
            installed: Default::default(),
            kind: "tarball".into(),
            files: vec![],
            attachments: vec![crate::metadata::AttachmentMeta {
                path: "/etc/hostname".into(),
                file: "at.attachments/etc/hostname".into(),
                size: content.len() as u64,
                sha256: crate::pack::digest::digest_reader(content).unwrap().sha256,
            }],
        };
        std::fs::write(out.join("at.yaml"), meta.to_yaml().unwrap()).unwrap();
        plan
    }

    #[test]
    fn attachments_are_reused_only_while_unchanged() {
        let out = tempfile::tempdir().unwrap();
        let plan = attached_build(out.path(), b"node1\n");
        assert!(reusable(&plan, out.path()).is_some());
        let file = out.path().join("at.attachments/etc/hostname");
        std::fs::write(&file, b"node2\n").unwrap();
        assert!(
            reusable(&plan, out.path()).is_none(),
            "a changed attachment of the same size"
        );
        std::fs::remove_file(&file).unwrap();
        assert!(
            reusable(&plan, out.path()).is_none(),
            "a missing attachment"
        );
        std::fs::write(out.path().join("elsewhere"), b"node1\n").unwrap();
        std::os::unix::fs::symlink(out.path().join("elsewhere"), &file).unwrap();
        assert!(
            reusable(&plan, out.path()).is_none(),
            "a link is not an attachment"
        );
        std::fs::remove_file(&file).unwrap();
        std::fs::write(&file, b"node1\n").unwrap();
        assert!(reusable(&plan, out.path()).is_some());
        // A directory on the way swapped for a link is not followed either.
        std::fs::rename(
            out.path().join("at.attachments/etc"),
            out.path().join("etc-real"),
        )
        .unwrap();
        std::os::unix::fs::symlink(
            out.path().join("etc-real"),
            out.path().join("at.attachments/etc"),
        )
        .unwrap();
        assert!(reusable(&plan, out.path()).is_none());
        // The spec's attachments are part of the digest.
        let other = Plan::for_test(
            "version: 1\nname: at\nsuite: bookworm\nkind: tarball\nattachments: [/etc/hosts]\n",
        );
        assert_ne!(other.digest, plan.digest);
    }

    #[test]
    fn attachments_replace_an_earlier_directory_without_following_its_links() {
        let out = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let v = victim(outside.path());
        let before = crate::output::fingerprint(&v);
        // An earlier build's directory, with a link to a host file and one to a host directory.
        let old = out.path().join("x.attachments");
        std::fs::create_dir_all(old.join("etc")).unwrap();
        std::fs::write(old.join("etc/stale"), b"old").unwrap();
        std::os::unix::fs::symlink(&v, old.join("etc/victim")).unwrap();
        std::os::unix::fs::symlink(outside.path(), old.join("outside")).unwrap();
        let mut pending = PendingOutputs::in_dir(OutputDir::open(out.path()).unwrap());
        let d = pending
            .attach("x.attachments", "etc/os-release", &mut &b"ID=debian\n"[..])
            .unwrap();
        assert_eq!(d.size, 10);
        pending
            .attach(
                "x.attachments",
                "usr/lib/os-release",
                &mut &b"ID=debian\n"[..],
            )
            .unwrap();
        let (mut f, _) = pending.create_temp("x.img.gz").unwrap();
        f.write_all(b"image").unwrap();
        let listed = "name: x\nattachments:\n- {path: /etc/os-release, file: x.attachments/etc/os-release, size: 10, sha256: aa}\n";
        pending
            .publish(&["x.img.gz"], "x.attachments", "x.yaml", listed)
            .unwrap();
        drop(pending);
        assert_eq!(
            std::fs::read_to_string(old.join("etc/os-release")).unwrap(),
            "ID=debian\n"
        );
        assert!(!old.join("etc/stale").exists() && !old.join("outside").exists());
        assert_eq!(crate::output::mode(&old.join("etc/os-release")), 0o644);
        assert_eq!(crate::output::mode(&old.join("usr/lib")), 0o755);
        assert_eq!(crate::output::mode(&old), 0o755);
        assert_eq!(crate::output::fingerprint(&v), before);
        assert!(v.exists());
        assert_eq!(
            crate::output::names(out.path()),
            ["x.attachments", "x.img.gz", "x.yaml"]
        );

        // A build without attachments removes an earlier one's: the metadata says what is
        // there. One that fails leaves no temporary directory.
        let mut pending = PendingOutputs::in_dir(OutputDir::open(out.path()).unwrap());
        pending
            .attach("x.attachments", "etc/hostname", &mut &b"n\n"[..])
            .unwrap();
        drop(pending);
        let mut pending = PendingOutputs::in_dir(OutputDir::open(out.path()).unwrap());
        pending
            .publish(&[], "x.attachments", "x.yaml", "name: x\n")
            .unwrap();
        assert_eq!(crate::output::names(out.path()), ["x.img.gz", "x.yaml"]);

        // A directory of that name no build listed stays when this build has no attachments;
        // one holding a release is never replaced.
        std::fs::create_dir_all(old.join("mine")).unwrap();
        let mut pending = PendingOutputs::in_dir(OutputDir::open(out.path()).unwrap());
        pending
            .publish(&[], "x.attachments", "x.yaml", "name: x\n")
            .unwrap();
        assert!(old.join("mine").is_dir());
        std::fs::write(old.join(crate::output::release::RELEASE_MARKER), b"").unwrap();
        let mut pending = PendingOutputs::in_dir(OutputDir::open(out.path()).unwrap());
        pending
            .attach("x.attachments", "etc/hostname", &mut &b"n\n"[..])
            .unwrap();
        let e = pending
            .publish(&[], "x.attachments", "x.yaml", "name: x\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("holds a release"), "{e}");
        assert!(old.join("mine").is_dir());
    }

    #[test]
    fn reuse_takes_no_attachment_name_but_the_plans() {
        let plan = Plan::for_test(
            "version: 1\nname: tb\nsuite: bookworm\nkind: tarball\nattachments: [/etc/os-release]\n",
        );
        for (path, file) in [
            ("/etc/os-release", "tb.attachments/etc/os-release"),
            ("/vmlinuz", "tb.vmlinuz"),
        ] {
            assert!(is_attachment_name(&plan, path, file), "{file}");
        }
        for (path, file) in [
            ("/etc/shadow", "/etc/shadow"),
            ("/etc/os-release", "tb.attachments//etc/os-release"),
            ("/etc/os-release", "tb.attachments/etc/../etc/os-release"),
            ("/etc/os-release", "tb.attachments/etc/hostname"),
            ("/etc/os-release", "other.attachments/etc/os-release"),
        ] {
            assert!(!is_attachment_name(&plan, path, file), "{file}");
        }
        // Nor does the output directory open a name that is not exactly one file's.
        let out = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(out.path().join("a")).unwrap();
        std::fs::write(out.path().join("a/f"), b"x").unwrap();
        let dir = OutputDir::open(out.path()).unwrap();
        assert!(dir.open_regular_at("a/f").unwrap().is_some());
        for bad in ["/a/f", "a//f", "a/./f", "a/../a/f"] {
            assert!(dir.open_regular_at(bad).unwrap().is_none(), "{bad}");
        }
    }

    #[test]
    fn publish_replaces_a_link_and_drop_removes_temporaries() {
        let out = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let v = victim(outside.path());
        let before = crate::output::fingerprint(&v);
        std::os::unix::fs::symlink(&v, out.path().join("x.yaml")).unwrap();
        std::os::unix::fs::symlink(&v, out.path().join("x.img.gz")).unwrap();
        let mut pending = PendingOutputs::in_dir(OutputDir::open(out.path()).unwrap());
        let (mut f, tmp) = pending.create_temp("x.img.gz").unwrap();
        f.write_all(b"image").unwrap();
        let (mut u, unused) = pending.create_temp("x.raw").unwrap();
        u.write_all(b"partial").unwrap();
        pending
            .publish(&["x.img.gz"], "x.attachments", "x.yaml", "name: x\n")
            .unwrap();
        drop(pending);
        assert!(!tmp.exists());
        assert!(!unused.exists(), "what was not published is removed");
        assert_eq!(
            std::fs::read(out.path().join("x.img.gz")).unwrap(),
            b"image"
        );
        assert_eq!(
            std::fs::read(out.path().join("x.yaml")).unwrap(),
            b"name: x\n"
        );
        assert_eq!(crate::output::fingerprint(&v), before);

        let mut pending = PendingOutputs::in_dir(OutputDir::open(out.path()).unwrap());
        let (_, tmp) = pending.create_temp("y.img.gz").unwrap();
        drop(pending);
        assert!(!tmp.exists(), "an unpublished temporary is removed");
        assert_eq!(crate::output::names(out.path()), ["x.img.gz", "x.yaml"]);
    }
}
