//! qcow2 containers, made by qemu-img.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::Path;

use anyhow::{Context, Result};

use crate::cmd::CommandRunExt;
use crate::pack::compress::Packed;
use crate::pack::digest::{self, Digests};

/// Converts a raw disk to qcow2 with qemu-img into `out` (the temporary output, created by
/// debimg; qemu-img reaches it through its descriptor, never by a name a link could replace;
/// `dest` names it in messages), checks it, then digests both files (the raw one only when
/// `raw_digests` does not already hold them).
pub fn convert(
    raw: &Path,
    compressed: bool,
    out: &File,
    dest: &Path,
    raw_digests: Option<Digests>,
) -> Result<Packed> {
    let target = crate::output::fd_path(out);
    let mut cmd = std::process::Command::new("qemu-img");
    cmd.args(["convert", "-q", "-f", "raw", "-O", "qcow2"]);
    if compressed {
        cmd.arg("-c");
    }
    crate::output::inherit_fds(&mut cmd, &[out.as_fd()]);
    cmd.arg(raw)
        .arg(&target)
        .run()
        .with_context(|| format!("converting {} to {}", raw.display(), dest.display()))?;
    let mut check = std::process::Command::new("qemu-img");
    check.args(["check", "-q", "-f", "qcow2"]);
    crate::output::inherit_fds(&mut check, &[out.as_fd()]);
    check
        .arg(&target)
        .run()
        .with_context(|| format!("checking {}", dest.display()))?;
    out.sync_all()
        .with_context(|| format!("syncing {}", dest.display()))?;
    Ok(Packed {
        raw: match raw_digests {
            Some(d) => d,
            None => digest::digest_file(raw)?,
        },
        container: digest::digest_file(&target)?,
    })
}
