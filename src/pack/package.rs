//! The package stage's body: every staged file packed into its container under a temporary
//! name in the output directory, in one read pass each; the files besides the images copied
//! beside them, the attachments into their directory.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::attachments::Attached;
use crate::kind::{Ship, Staged};
use crate::metadata::{AttachmentMeta, FileMeta};
use crate::output::publish::PendingOutputs;
use crate::pack::compress::{self, Packed};
use crate::pack::digest::{self, Digests};
use crate::signals;

/// What the package stage wrote besides the images.
#[derive(Debug, Default)]
pub(crate) struct Written {
    /// The files beside the images: records, then the kernel and initrd.
    pub files: Vec<FileMeta>,
    /// Every file copied out of the image, the kernel and initrd too.
    pub attachments: Vec<AttachmentMeta>,
}

/// Packs every staged file into `pending` (one [`Packed`] each, in order), copies the records
/// (`extra`) beside them, and the files copied out of the image (`attached`): the kernel and
/// initrd beside them too, the attachments below `attachments_dir`.
pub(crate) fn run(
    staged: &[Staged],
    extra: &[(String, PathBuf)],
    attached: &[Attached],
    attachments_dir: &str,
    pending: &mut PendingOutputs,
) -> Result<(Vec<Packed>, Written)> {
    let mut out: Vec<Packed> = Vec::new();
    for s in staged {
        signals::check()?;
        let (out_file, tmp) = pending.create_temp(&s.container_name)?;
        let t = std::time::Instant::now();
        // A disk shipped in several formats is read for its digests once.
        let known = staged
            .iter()
            .zip(&out)
            .find(|(o, _)| o.raw == s.raw)
            .map(|(_, p)| p.raw.clone());
        let p = match s.ship {
            Ship::Packed(container) => compress::pack_into(&s.raw, container, out_file, &tmp),
            Ship::Qcow2 { compressed } => {
                crate::pack::qcow2::convert(&s.raw, compressed, &out_file, &tmp, known)
            }
        }
        .with_context(|| format!("packaging {}", s.container_name))?;
        tracing::info!(
            "{}: {:.1} MiB raw -> {:.1} MiB {} in {:.1}s",
            s.container_name,
            p.raw.size as f64 / 1048576.0,
            p.container.size as f64 / 1048576.0,
            s.ship.name(),
            t.elapsed().as_secs_f64()
        );
        out.push(p);
    }
    let mut written = Written::default();
    for (name, path) in extra {
        let d = beside(pending, name, path)?;
        written.files.push(FileMeta {
            name: name.clone(),
            size: d.size,
            sha256: d.sha256,
        });
    }
    for a in attached {
        signals::check()?;
        let d = match a.in_dir(attachments_dir) {
            Some(rel) => {
                let mut from = std::fs::File::open(&a.copy)
                    .with_context(|| format!("opening {}", a.copy.display()))?;
                pending
                    .attach(attachments_dir, rel, &mut from)
                    .with_context(|| format!("copying {} to the output directory", a.file))?
            }
            None => {
                let d = beside(pending, &a.file, &a.copy)?;
                written.files.push(FileMeta {
                    name: a.file.clone(),
                    size: d.size,
                    sha256: d.sha256.clone(),
                });
                d
            }
        };
        written.attachments.push(AttachmentMeta {
            path: a.path.clone(),
            file: a.file.clone(),
            size: d.size,
            sha256: d.sha256,
        });
    }
    Ok((out, written))
}

/// Writes `bytes` into `pending` as `name`, beside the images.
pub(crate) fn write_beside(
    pending: &mut PendingOutputs,
    name: &str,
    bytes: &[u8],
) -> Result<FileMeta> {
    use std::io::Write as _;
    let (mut f, tmp) = pending.create_temp(name)?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    let d = digest::digest_file(&crate::output::fd_path(&f))
        .with_context(|| format!("digesting {}", tmp.display()))?;
    Ok(FileMeta {
        name: name.to_string(),
        size: d.size,
        sha256: d.sha256,
    })
}

/// Copies the workspace file `path` into `pending` as `name`, beside the images.
fn beside(pending: &mut PendingOutputs, name: &str, path: &Path) -> Result<Digests> {
    let (mut f, tmp) = pending.create_temp(name)?;
    std::fs::File::open(path)
        .and_then(|mut from| std::io::copy(&mut from, &mut f))
        .and_then(|_| f.sync_all())
        .with_context(|| format!("copying {name} to {}", tmp.display()))?;
    digest::digest_file(&crate::output::fd_path(&f))
        .with_context(|| format!("digesting {}", tmp.display()))
}
