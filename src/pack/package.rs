//! The package stage's body: every staged file packed into its container under a temporary
//! name in the output directory, in one read pass each; the files besides the images copied
//! beside them.

use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::kind::{Ship, Staged};
use crate::metadata::FileMeta;
use crate::output::publish::PendingOutputs;
use crate::pack::compress::{self, Packed};
use crate::pack::digest;
use crate::signals;

/// Packs every staged file into `pending` (one [`Packed`] each, in order) and copies the extra
/// outputs (records, kernel) beside them.
pub(crate) fn run(
    staged: &[Staged],
    extra: &[(String, PathBuf)],
    pending: &mut PendingOutputs,
) -> Result<(Vec<Packed>, Vec<FileMeta>)> {
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
    let mut files = Vec::new();
    for (name, path) in extra {
        let (mut f, tmp) = pending.create_temp(name)?;
        std::fs::File::open(path)
            .and_then(|mut from| std::io::copy(&mut from, &mut f))
            .and_then(|_| f.sync_all())
            .with_context(|| format!("copying {name} to {}", tmp.display()))?;
        let d = digest::digest_file(&crate::output::fd_path(&f))
            .with_context(|| format!("digesting {}", tmp.display()))?;
        files.push(FileMeta {
            name: name.clone(),
            size: d.size,
            sha256: d.sha256,
        });
    }
    Ok((out, files))
}
