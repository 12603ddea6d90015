//! Outputs written under temporary names and published whole, the metadata last; and the reuse
//! check, which reads what an earlier build published.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::metadata::Metadata;
use crate::output::{EntryKind, OutputDir};
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
    Some(meta)
}

/// Files being written into the output directory under temporary names; removed unless
/// published. Every name is looked up in the directory opened once, never followed.
pub(crate) struct PendingOutputs {
    path: PathBuf,
    /// Opened at first use (`new` cannot fail).
    dir: Option<OutputDir>,
    /// (temporary name, final name)
    temps: Vec<(String, String)>,
}

impl PendingOutputs {
    /// Pending outputs in a directory already open (the one [`OutputLock::dir`] holds), so
    /// that no later swap of its path redirects them.
    pub fn in_dir(dir: OutputDir) -> PendingOutputs {
        PendingOutputs {
            path: dir.path().to_path_buf(),
            dir: Some(dir),
            temps: Vec::new(),
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

    /// Renames the images into place, then writes the metadata last. The old metadata goes
    /// first, so that no moment shows new images described by old metadata.
    pub fn publish(&mut self, images: &[&str], metadata_name: &str, yaml: &str) -> Result<()> {
        let dir = open_dir(&mut self.dir, &self.path)?;
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
        if self.temps.is_empty() {
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
            .publish(&["x.img.gz"], "x.yaml", "name: x\n")
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
        let mut left: Vec<_> = std::fs::read_dir(out.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["x.img.gz", "x.yaml"]);
    }
}
