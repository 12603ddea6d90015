//! A root filesystem tarball: the install root is a plain directory in the workspace (no loop
//! device, no filesystem image), archived with tar and gzipped by the packer.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::{FsInfo, ImageKind, Staged};
use crate::cmd::CommandRunExt;
use crate::plan::Plan;

/// The root filesystem as `<name>.tar.gz`.
pub struct Tarball;

impl ImageKind for Tarball {
    fn name(&self) -> &'static str {
        "tarball"
    }

    fn mount_root(&mut self, _plan: &Plan, _workspace: &Path, root: &Path) -> Result<()> {
        std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))
    }

    fn filesystems(&self) -> Vec<FsInfo> {
        Vec::new()
    }

    fn mount_points(&self) -> Vec<PathBuf> {
        Vec::new()
    }

    fn unmount_root(&mut self) -> Result<()> {
        Ok(())
    }

    fn finish(&mut self, plan: &Plan, workspace: &Path, root: &Path) -> Result<Vec<Staged>> {
        let raw_name = plan.raw_name();
        let tar = workspace.join(&raw_name);
        // Numeric owners: the image's users, not the host's names for those ids. Sorted names
        // and a fixed format make the archive depend on the tree only.
        std::process::Command::new("tar")
            .arg("--create")
            .arg("--file")
            .arg(&tar)
            .arg("--directory")
            .arg(root)
            .args([
                "--numeric-owner",
                "--sort=name",
                "--format=posix",
                "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
                "--xattrs",
                "--xattrs-include=*",
                "--acls",
                "--one-file-system",
                ".",
            ])
            .run()
            .with_context(|| format!("archiving {}", root.display()))?;
        Ok(super::planned_staged(plan)
            .into_iter()
            .map(|s| Staged {
                raw: tar.clone(),
                ..s
            })
            .collect())
    }

    fn cleanup(&mut self) {}
}
