//! Outputs written under temporary names and published whole, the metadata last; and the reuse
//! check, which reads what an earlier build published.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::metadata::Metadata;
use crate::output::{EntryKind, OutputDir};
use crate::pack::digest::{Digests, HashingWriter, digest_reader};
use crate::plan::Plan;

/// Returns the existing metadata when every output matches the plan. Only regular files count:
/// a link in the output directory is not followed.
pub fn reusable(plan: &Plan, output_dir: &Path) -> Option<Metadata> {
    let dir = OutputDir::open(output_dir).ok()?;
    // A publish in progress, or one a crash interrupted after its commit: the directory holds
    // the new result once the next holder of the lock has completed it.
    if dir
        .kind(journal_name(&plan.metadata_name()))
        .ok()?
        .is_some()
    {
        return None;
    }
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
        let temp = publish_temp(final_name);
        let file = open_dir(&mut self.dir, &self.path)?.create_new(&temp, 0o644)?;
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
                let temp = publish_temp(dir_name);
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

    /// Publishes this build: the images and files `images` (each packaged under a temporary
    /// name), the attachments directory `attachments` (an earlier build's goes even when this
    /// one has none: the metadata describes what is there; a directory no build of this name
    /// made stays unless this build has attachments, and one holding a release is never
    /// removed) and the metadata `yaml` as `metadata_name`.
    ///
    /// Crash-safe: everything new is written and fsynced under temporary names first, then a
    /// journal naming each rename is put in place: that is the commit. Before it, the directory
    /// holds the previous result untouched; from it on, the new one, which the journal's steps
    /// (here, or [`recover`] under the next holder of the output lock after a crash) put in
    /// place: the old metadata first goes, then the images and attachments, then the new
    /// metadata. A reader that follows the metadata file sees the previous result whole, no
    /// metadata, or the new result whole.
    pub fn publish(
        &mut self,
        images: &[&str],
        attachments: &str,
        metadata_name: &str,
        yaml: &str,
    ) -> Result<()> {
        self.publish_with(images, attachments, metadata_name, yaml, &mut env_fault)
    }

    /// [`PendingOutputs::publish`], calling `fault` with each step's number before it (the
    /// fault tests end the process, or return an error, there).
    fn publish_with(
        &mut self,
        images: &[&str],
        attachments: &str,
        metadata_name: &str,
        yaml: &str,
        fault: &mut dyn FnMut(usize) -> Result<()>,
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
        let mut files = Vec::new();
        for name in images {
            let (temp, _) = self
                .temps
                .iter()
                .find(|(_, n)| n == name)
                .with_context(|| format!("{name} was not packaged"))?;
            files.push((temp.clone(), name.to_string()));
        }
        fault(0)?;
        let meta_temp = publish_temp(metadata_name);
        let mut file = dir.create_new(&meta_temp, 0o644)?;
        self.temps
            .push((meta_temp.clone(), metadata_name.to_string()));
        let meta_path = dir.join(&meta_temp);
        std::io::Write::write_all(&mut file, yaml.as_bytes())
            .and_then(|()| file.sync_all())
            .with_context(|| format!("writing {}", meta_path.display()))?;
        drop(file);
        fault(1)?;
        if let Some((temp, _)) = &self.attachments {
            dir.open_subdir(temp)?.sync_filesystem()?;
        }
        let journal = Journal {
            files,
            metadata: (meta_temp, metadata_name.to_string()),
            attachments: replace_attachments.then(|| AttachmentsStep {
                name: attachments.to_string(),
                new: self.attachments.as_ref().map(|(t, _)| t.clone()),
                old: format!(".{attachments}.old-{}", crate::sys::unique_token()),
            }),
        };
        let text = serde_json::to_string(&journal)?;
        fault(2)?;
        // The commit: from here the new result is the directory's, whatever happens.
        dir.write_file(journal_name(metadata_name), text.as_bytes(), 0o600)?;
        // What the journal names is no longer this build's to remove; the rest goes on drop.
        self.temps.retain(|(t, _)| {
            t != &journal.metadata.0 && !journal.files.iter().any(|(jt, _)| jt == t)
        });
        if journal
            .attachments
            .as_ref()
            .is_some_and(|a| a.new.is_some())
        {
            self.attachments = None;
        }
        roll_forward(dir, &journal, &mut |i| fault(3 + i))
    }
}

/// The journal of a publish in progress: the renames that put a new result in place, all of
/// whose files are complete and fsynced under their temporary names.
#[derive(serde::Serialize, serde::Deserialize, Debug)]
struct Journal {
    /// (temporary name, final name) of each image and file beside them.
    files: Vec<(String, String)>,
    /// (temporary name, final name) of the metadata.
    metadata: (String, String),
    /// The attachments directory, when an earlier one goes or a new one comes.
    attachments: Option<AttachmentsStep>,
}

#[derive(serde::Serialize, serde::Deserialize, Debug)]
struct AttachmentsStep {
    /// Its final name.
    name: String,
    /// The new directory's temporary name; none when the old one just goes.
    new: Option<String>,
    /// The name the old directory is moved to before it is removed.
    old: String,
}

/// The journal's name for the metadata file `metadata_name`: hidden, as temporary names are.
fn journal_name(metadata_name: &str) -> String {
    format!(".{metadata_name}.publish")
}

/// A fresh temporary name for an output `name` a publish puts in place: `.NAME.pub-TOKEN`,
/// hidden, unguessable, and a kind of name only a publish makes (what else writes into the
/// directory under `.NAME.tmp-TOKEN` is never taken for a publish's leftover).
fn publish_temp(name: &str) -> String {
    format!(".{name}.pub-{}", crate::sys::unique_token())
}

/// Whether `temp` is a name debimg gives a temporary entry for `name`: `.NAME.KIND-TOKEN`
/// (`pub` for what a publish puts in place, `old` for an attachments directory it moves
/// aside), TOKEN letters and digits.
fn is_temp_of(temp: &str, name: &str, kind: &str) -> bool {
    temp.strip_prefix('.')
        .and_then(|t| t.strip_prefix(name))
        .and_then(|t| t.strip_prefix('.'))
        .and_then(|t| t.strip_prefix(kind))
        .and_then(|t| t.strip_prefix('-'))
        .is_some_and(|tok| !tok.is_empty() && tok.bytes().all(|b| b.is_ascii_alphanumeric()))
}

impl Journal {
    /// The journal is data (the directory is shared with whoever may write it): every name must
    /// be a plain name and every temporary one a temporary name of its final name, so that no
    /// journal renames or removes anything but a publish's own entries.
    fn check(&self) -> Result<()> {
        let plain = |n: &str| {
            !n.is_empty() && n != "." && n != ".." && !n.contains('/') && !n.contains('\0')
        };
        let pairs = self.files.iter().chain(std::iter::once(&self.metadata));
        for (temp, name) in pairs {
            anyhow::ensure!(
                plain(name) && is_temp_of(temp, name, "pub"),
                "the publish journal names `{temp}` for `{name}`"
            );
        }
        if let Some(a) = &self.attachments {
            // Only the attachments directory of the build the metadata is of.
            let own = self
                .metadata
                .1
                .strip_suffix(".yaml")
                .map(|stem| format!("{stem}.attachments"));
            anyhow::ensure!(
                plain(&a.name)
                    && own.as_deref() == Some(a.name.as_str())
                    && a.new
                        .as_deref()
                        .is_none_or(|t| is_temp_of(t, &a.name, "pub"))
                    && is_temp_of(&a.old, &a.name, "old"),
                "the publish journal names an attachments directory it may not: {a:?}"
            );
        }
        Ok(())
    }
}

/// Carries out a committed journal's steps, each of which is done again harmlessly or skipped
/// when a crash interrupted the publish after it: the old metadata goes (while the new one is
/// still to come), each file is renamed into place, the old attachments directory is moved
/// aside and the new one into place, the new metadata is renamed into place, the old
/// attachments directory removed and the journal last. `fault` is called before each step.
fn roll_forward(
    dir: &OutputDir,
    j: &Journal,
    fault: &mut dyn FnMut(usize) -> Result<()>,
) -> Result<()> {
    let (meta_temp, meta_name) = &j.metadata;
    let mut step = 0;
    let mut next = |fault: &mut dyn FnMut(usize) -> Result<()>| {
        step += 1;
        fault(step - 1)
    };
    let exists = |name: &str| dir.kind(name).map(|k| k.is_some());
    next(fault)?;
    let pending = exists(meta_temp)?;
    if pending {
        dir.remove(meta_name)?;
        dir.sync()?;
    }
    for (temp, name) in &j.files {
        next(fault)?;
        if exists(temp)? {
            dir.commit(temp, name)?;
        }
    }
    if let Some(a) = &j.attachments {
        next(fault)?;
        // The directory there is the old one while the new one waits (or, with none new,
        // while the metadata is still to come).
        let new_waits = match &a.new {
            Some(t) => exists(t)?,
            None => pending,
        };
        if new_waits && exists(&a.name)? {
            // Never a release's directory, whatever the journal says.
            if dir.kind(&a.name)? == Some(EntryKind::Dir)
                && dir
                    .open_subdir(&a.name)?
                    .kind(crate::output::release::RELEASE_MARKER)?
                    .is_some()
            {
                anyhow::bail!(
                    "{} holds a release: the publish journal may not replace it",
                    dir.join(&a.name).display()
                );
            }
            dir.commit(&a.name, &a.old)?;
        }
        if let Some(t) = &a.new {
            next(fault)?;
            if exists(t)? {
                dir.commit(t, &a.name)?;
            }
        }
    }
    next(fault)?;
    if pending {
        dir.commit(meta_temp, meta_name)?;
    }
    if let Some(a) = &j.attachments {
        next(fault)?;
        dir.remove_all(&a.old)?;
    }
    next(fault)?;
    dir.remove(journal_name(meta_name))?;
    dir.sync()
}

/// Completes what a publish that crashed left: run by each new holder of the output lock
/// (nobody else writes the directory then). A committed journal is carried out (the directory
/// then holds that publish's result); every temporary entry a publish made that no journal
/// names is removed (a build that died before its commit: the previous result is untouched).
/// Only what this user owns, and no group or other can write, is a journal; only what this
/// user owns is removed: others who can write the directory cannot make debimg move or
/// remove anything with a planted journal or name.
pub fn recover(dir: &OutputDir) -> Result<()> {
    let names: Vec<String> = dir
        .entries()?
        .into_iter()
        .filter_map(|n| n.into_string().ok())
        .collect();
    let me = nix::unistd::geteuid().as_raw();
    for name in &names {
        let Some(meta) = name
            .strip_prefix('.')
            .and_then(|n| n.strip_suffix(".publish"))
        else {
            continue;
        };
        let shown = dir.join(name);
        let Some((file, st)) = dir.open_if_regular(name)? else {
            tracing::warn!("ignoring {}: not a file", shown.display());
            continue;
        };
        if st.st_uid != me || st.st_mode & 0o022 != 0 {
            tracing::warn!(
                "ignoring {}: not a publish journal of this user's (owner {}, mode {:o})",
                shown.display(),
                st.st_uid,
                st.st_mode & 0o7777
            );
            continue;
        }
        let mut text = String::new();
        Read::take(file, 1 << 20)
            .read_to_string(&mut text)
            .with_context(|| format!("reading {}", shown.display()))?;
        let journal: Journal = serde_json::from_str(&text)
            .map_err(anyhow::Error::from)
            .and_then(|j: Journal| {
                j.check()?;
                anyhow::ensure!(j.metadata.1 == meta, "it is not the journal of {meta}");
                Ok(j)
            })
            .with_context(|| {
                format!(
                    "reading the publish journal {} (remove it to go on without that publish)",
                    shown.display()
                )
            })?;
        tracing::info!(
            "completing the publish of {} that an earlier build left",
            dir.join(meta).display()
        );
        roll_forward(dir, &journal, &mut |_| Ok(()))?;
    }
    // What is left under a publish's temporary name was never committed, or is an old
    // attachments directory whose removal a crash interrupted, or a journal never put in place.
    for name in dir.entries()? {
        let Some(name) = name.to_str() else { continue };
        let stale = [".pub-", ".old-", ".publish.tmp-"].iter().any(|k| {
            name.rsplit_once(k).is_some_and(|(base, tok)| {
                base.len() > 1
                    && base.starts_with('.')
                    && !tok.is_empty()
                    && tok.bytes().all(|b| b.is_ascii_alphanumeric())
            })
        });
        if stale && dir.stat(name)?.is_some_and(|st| st.st_uid == me) {
            tracing::info!(
                "removing {}, which a build that died left",
                dir.join(name).display()
            );
            dir.remove_all(name)?;
        }
    }
    Ok(())
}

/// The fault hook of publish (`DEBIMG_TEST_FAULT=publish:kill-at-N`): the process kills itself
/// with SIGKILL before step N, as a crash would end it there.
fn env_fault(step: usize) -> Result<()> {
    if let Ok(spec) = std::env::var(crate::stage::FAULT_ENV)
        && spec.strip_prefix("publish:kill-at-") == Some(step.to_string().as_str())
    {
        eprintln!("debimg-test: killed before publish step {step}");
        // SAFETY: kill(2) with this process's own id.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
    Ok(())
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

    /// The lock and the SBOMs every build of `name` writes, in `out`, after the records
    /// (`records`) as the metadata lists them (a build without a kernel).
    fn with_always_written(
        out: &Path,
        name: &str,
        records: Vec<crate::metadata::FileMeta>,
    ) -> Vec<crate::metadata::FileMeta> {
        let mut files = records;
        for suffix in [".lock.yaml", ".spdx.json", ".cdx.json"] {
            let file = format!("{name}{suffix}");
            std::fs::write(out.join(&file), b"{}").unwrap();
            files.push(crate::metadata::FileMeta {
                name: file,
                size: 2,
                sha256: String::new(),
            });
        }
        files
    }

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
            source_date_epoch: None,
            bootstrap: String::new(),
            build_start: String::new(),
            build_end: String::new(),
            images: vec![image],
            repos: vec![],
            packages: vec![],
            installed: Default::default(),
            kind: "tarball".into(),
            files: with_always_written(
                out.path(),
                "tb",
                vec![crate::metadata::FileMeta {
                    name: "tb.packages".into(),
                    size: 4,
                    sha256: String::new(),
                }],
            ),
            attachments: vec![],
        };
        std::fs::write(out.path().join("tb.yaml"), meta.to_yaml().unwrap()).unwrap();
        assert!(reusable(&plan, out.path()).is_some());
        std::fs::write(out.path().join("tb.packages"), b"a 1\nb 2\n").unwrap();
        assert!(reusable(&plan, out.path()).is_none(), "a changed record");
        std::fs::write(out.path().join("tb.packages"), b"a 1\n").unwrap();
        std::fs::remove_file(out.path().join("tb.tar.gz")).unwrap();
        assert!(reusable(&plan, out.path()).is_none(), "a missing archive");
        std::fs::write(out.path().join("tb.tar.gz"), b"archive").unwrap();
        assert!(reusable(&plan, out.path()).is_some());
        std::fs::remove_file(out.path().join("tb.spdx.json")).unwrap();
        assert!(reusable(&plan, out.path()).is_none(), "a missing SBOM");
        std::fs::remove_file(out.path().join("tb.tar.gz")).unwrap();
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
            source_date_epoch: None,
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
            files: with_always_written(out, "at", vec![]),
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

    /// One result of build `x` in `dir`: its image, a record and (with `attached`) an
    /// attachment, each holding `tag`, and the metadata listing each with its digest.
    fn result_files(tag: &str, attached: bool) -> (Vec<(String, String)>, String) {
        let mut files = vec![
            ("x.img.gz".to_string(), format!("image {tag}")),
            ("x.packages".to_string(), format!("records {tag}")),
        ];
        let sha = |t: &str| digest_reader(t.as_bytes()).unwrap().sha256;
        let mut yaml = format!("name: x\ntag: {tag}\nfiles:\n");
        for (n, c) in &files {
            yaml += &format!("- {{name: {n}, size: {}, sha256: {}}}\n", c.len(), sha(c));
        }
        if attached {
            let c = format!("host-{tag}\n");
            yaml += &format!(
                "attachments:\n- {{path: /etc/hostname, file: x.attachments/etc/hostname, size: {}, sha256: {}}}\n",
                c.len(),
                sha(&c)
            );
            files.push(("x.attachments/etc/hostname".into(), c));
        }
        (files, yaml)
    }

    /// What a reader that follows the metadata finds: the tag of the result the metadata
    /// describes, after checking that every file it lists is exactly that result's; None when
    /// there is no metadata.
    fn follow_metadata(out: &Path) -> Option<String> {
        #[derive(serde::Deserialize)]
        struct Listed {
            tag: String,
            files: Vec<crate::metadata::FileMeta>,
            #[serde(default)]
            attachments: Vec<crate::metadata::AttachmentMeta>,
        }
        let text = std::fs::read_to_string(out.join("x.yaml")).ok()?;
        let m: Listed = serde_saphyr::from_str(&text).unwrap();
        let listed = m
            .files
            .iter()
            .map(|f| (&f.name, &f.sha256))
            .chain(m.attachments.iter().map(|a| (&a.file, &a.sha256)));
        for (name, sha) in listed {
            let got = std::fs::read(out.join(name))
                .map(|b| digest_reader(&b[..]).unwrap().sha256)
                .unwrap_or_default();
            assert_eq!(
                &got, sha,
                "{name} is not what the metadata of {} says",
                m.tag
            );
        }
        Some(m.tag)
    }

    /// Whether `out` holds exactly the complete result `tag` and nothing else of a publish.
    fn holds_only(out: &Path, tag: &str, attached: bool) {
        assert_eq!(follow_metadata(out).as_deref(), Some(tag));
        let (files, _) = result_files(tag, attached);
        for (n, c) in &files {
            assert_eq!(std::fs::read_to_string(out.join(n)).unwrap(), *c, "{n}");
        }
        let mut want = vec!["x.img.gz", "x.packages", "x.yaml"];
        if attached {
            want.insert(0, "x.attachments");
        }
        assert_eq!(crate::output::names(out), want);
    }

    /// Publishes result `tag` into `out` through `fault`; on an error, the process "crashes":
    /// nothing is cleaned up.
    fn publish_crashing(
        out: &Path,
        tag: &str,
        attached: bool,
        fault: &mut dyn FnMut(usize) -> Result<()>,
    ) -> Result<()> {
        let mut pending = PendingOutputs::in_dir(OutputDir::open(out).unwrap());
        let (files, yaml) = result_files(tag, attached);
        for (n, c) in &files {
            match n.strip_prefix("x.attachments/") {
                Some(rel) => {
                    pending
                        .attach("x.attachments", rel, &mut c.as_bytes())
                        .unwrap();
                }
                None => {
                    let (mut f, _) = pending.create_temp(n).unwrap();
                    f.write_all(c.as_bytes()).unwrap();
                    f.sync_all().unwrap();
                }
            }
        }
        let res = pending.publish_with(
            &["x.img.gz", "x.packages"],
            "x.attachments",
            "x.yaml",
            &yaml,
            fault,
        );
        if res.is_err() {
            std::mem::forget(pending);
        }
        res
    }

    #[test]
    fn a_crash_between_any_two_publish_steps_leaves_the_previous_or_the_new_result() {
        // The old result has attachments; the new one has them too, or not (the old directory
        // then just goes).
        for new_attached in [true, false] {
            let mut steps = 0;
            let out = tempfile::tempdir().unwrap();
            publish_crashing(out.path(), "old", true, &mut |_| Ok(())).unwrap();
            holds_only(out.path(), "old", true);
            publish_crashing(out.path(), "new", new_attached, &mut |i| {
                steps = steps.max(i + 1);
                Ok(())
            })
            .unwrap();
            holds_only(out.path(), "new", new_attached);
            assert!(steps >= 9, "{steps} steps");
            for crash_at in 0..steps {
                let ctx = format!("crash before step {crash_at}, new attachments {new_attached}");
                let out = tempfile::tempdir().unwrap();
                publish_crashing(out.path(), "old", true, &mut |_| Ok(())).unwrap();
                let e = publish_crashing(out.path(), "new", new_attached, &mut |i| {
                    if i == crash_at {
                        anyhow::bail!("crash")
                    }
                    Ok(())
                })
                .unwrap_err();
                assert_eq!(e.to_string(), "crash", "{ctx}");
                // A reader that follows the metadata sees one whole result or none, never a mix.
                let seen = follow_metadata(out.path());
                assert!(
                    crash_at > 3 || seen.as_deref() == Some("old"),
                    "{ctx}: {seen:?}"
                );
                // The next holder of the lock completes it: the previous result when the crash
                // came before the commit (the journal, step 2), else the new one.
                recover(&OutputDir::open(out.path()).unwrap()).unwrap();
                if crash_at <= 2 {
                    holds_only(out.path(), "old", true);
                } else {
                    holds_only(out.path(), "new", new_attached);
                }
            }
        }
    }

    #[test]
    fn recovery_refuses_a_journal_that_names_what_is_not_a_publishs_own() {
        let out = tempfile::tempdir().unwrap();
        std::fs::write(out.path().join("keep"), b"k").unwrap();
        std::fs::create_dir(out.path().join("keepdir")).unwrap();
        let dir = OutputDir::open(out.path()).unwrap();
        for journal in [
            r#"{"files":[["keep","x.img.gz"]],"metadata":[".x.yaml.pub-1","x.yaml"],"attachments":null}"#,
            r#"{"files":[],"metadata":[".x.yaml.pub-1","../x.yaml"],"attachments":null}"#,
            r#"{"files":[],"metadata":[".x.yaml.pub-1","x.yaml"],"attachments":{"name":"x.attachments","new":null,"old":"keepdir"}}"#,
            r#"{"files":[],"metadata":[".x.yaml.pub-1","x.yaml"],"attachments":{"name":"keepdir","new":null,"old":".keepdir.old-1"}}"#,
            r#"{"files":[],"metadata":[".x.yaml.tmp-1","x.yaml"],"attachments":null}"#,
            r#"{"files":[],"metadata":[".y.yaml.pub-1","y.yaml"],"attachments":null}"#,
        ] {
            std::fs::write(out.path().join(".x.yaml.publish"), journal).unwrap();
            let e = format!("{:#}", recover(&dir).unwrap_err());
            assert!(e.contains("publish journal"), "{e}");
            assert!(out.path().join("keep").exists() && out.path().join("keepdir").is_dir());
        }
        // A journal someone else could have written is no journal: ignored, nothing moved.
        let planted = r#"{"files":[],"metadata":[".x.yaml.pub-1","x.yaml"],"attachments":{"name":"x.attachments","new":null,"old":".x.attachments.old-1"}}"#;
        std::fs::write(out.path().join(".x.yaml.publish"), planted).unwrap();
        std::fs::create_dir(out.path().join("x.attachments")).unwrap();
        std::fs::write(out.path().join(".x.yaml.pub-1"), b"name: x\n").unwrap();
        let chmod = |name: &str, mode: u32| {
            std::fs::set_permissions(
                out.path().join(name),
                std::os::unix::fs::PermissionsExt::from_mode(mode),
            )
            .unwrap()
        };
        for mode in [0o666, 0o620] {
            chmod(".x.yaml.publish", mode);
            recover(&dir).unwrap();
            assert!(out.path().join("x.attachments").is_dir(), "mode {mode:o}");
            assert!(out.path().join(".x.yaml.publish").exists());
        }
        // Nor does a journal move a release's directory aside. (The sweep above took the
        // metadata temporary, which is this user's: it comes back.)
        chmod(".x.yaml.publish", 0o600);
        std::fs::write(out.path().join(".x.yaml.pub-1"), b"name: x\n").unwrap();
        let marker = crate::output::release::RELEASE_MARKER;
        std::fs::write(out.path().join("x.attachments").join(marker), b"").unwrap();
        let e = format!("{:#}", recover(&dir).unwrap_err());
        assert!(e.contains("holds a release"), "{e}");
        std::fs::remove_dir_all(out.path().join("x.attachments")).unwrap();
        std::fs::remove_file(out.path().join(".x.yaml.publish")).unwrap();
        std::fs::remove_file(out.path().join(".x.yaml.pub-1")).unwrap();
        // Leftovers of a build that died before its commit go; others' temporary names and
        // other hidden names stay.
        std::fs::write(out.path().join(".x.img.gz.pub-abc123"), b"partial").unwrap();
        std::fs::create_dir(out.path().join(".x.attachments.old-abc")).unwrap();
        std::fs::write(out.path().join(".x.yaml.publish.tmp-abc"), b"{").unwrap();
        std::fs::write(out.path().join(".fuel.yaml.tmp-abc"), b"being written").unwrap();
        std::fs::write(out.path().join(".hidden"), b"h").unwrap();
        recover(&dir).unwrap();
        assert_eq!(
            crate::output::names(out.path()),
            [".fuel.yaml.tmp-abc", ".hidden", "keep", "keepdir"]
        );
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
