//! The per-filesystem images of fuel-agent: one sparse file, loop device and filesystem per
//! spec image, mounted depth-sorted into the install root; checked, shrunk and packaged one by
//! one.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::{FsInfo, ImageKind, MountStack, Staged};
use crate::pack::{rewrite, shrink};
use crate::plan::Plan;
use crate::reproducible;
use crate::spec::Fs;
use crate::sys::loopdev::{self, LoopDevice};
use crate::sys::mkfs::{self, MkfsRequest};

/// One image file per filesystem.
#[derive(Default)]
pub struct FsImages {
    /// Per spec image: its file, UUID and planned settings.
    images: Vec<ImageFile>,
    loops: Vec<LoopDevice>,
    /// In mount order; unmounted from the end.
    mounts: MountStack,
}

struct ImageFile {
    file: PathBuf,
    uuid: String,
    mount: String,
    fs: Fs,
    label: Option<String>,
    size: u64,
}

impl ImageKind for FsImages {
    fn name(&self) -> &'static str {
        "fs-images"
    }

    fn mount_root(&mut self, plan: &Plan, workspace: &Path, root: &Path) -> Result<()> {
        for img in &plan.images {
            let file = workspace.join(&img.raw_name);
            let f = File::create_new(&file)
                .with_context(|| format!("creating image file {}", file.display()))?;
            f.set_len(img.size)
                .with_context(|| format!("sizing {} to {} bytes", file.display(), img.size))?;
            drop(f);
            let dev = loopdev::attach(&file, false)?;
            let uuid = reproducible::fs_uuid(plan.source_date_epoch, &plan.seed, &img.mount)
                .map_or_else(mkfs::new_uuid, Ok)?;
            mkfs::make(
                &MkfsRequest {
                    fs: img.fs,
                    label: img.label.as_deref(),
                    uuid: &uuid,
                    no_journal: true,
                    options: &img.mkfs_options,
                },
                dev.path(),
            )?;
            self.images.push(ImageFile {
                file,
                uuid,
                mount: img.mount.clone(),
                fs: img.fs,
                label: img.label.clone(),
                size: img.size,
            });
            self.loops.push(dev);
        }
        for &i in &plan.mount_order {
            let img = &plan.images[i];
            let dev = self.loops[i].path().to_string_lossy().into_owned();
            let m = super::mount_in_tree(root, &img.mount, &dev, img.fs.name())?;
            self.mounts.push(m);
        }
        Ok(())
    }

    fn filesystems(&self) -> Vec<FsInfo> {
        self.images
            .iter()
            .enumerate()
            .map(|(i, img)| FsInfo {
                mount: img.mount.clone(),
                fs: img.fs.name().to_string(),
                label: img.label.clone(),
                size: img.size,
                uuid: img.uuid.clone(),
                device: self
                    .loops
                    .get(i)
                    .map(|l| l.path().display().to_string())
                    .unwrap_or_default(),
            })
            .collect()
    }

    fn mount_points(&self) -> Vec<PathBuf> {
        self.mounts.points()
    }

    fn unmount_root(&mut self) -> Result<()> {
        self.mounts.sync_and_unmount()?;
        while let Some(l) = self.loops.pop() {
            l.close()?;
        }
        Ok(())
    }

    fn finish(&mut self, plan: &Plan, workspace: &Path, _root: &Path) -> Result<Vec<Staged>> {
        let mut staged = Vec::new();
        let planned = super::planned_staged(plan);
        let clock = plan.source_date_epoch;
        for ((img, f), s) in plan.images.iter().zip(&self.images).zip(planned) {
            mkfs::check(img.fs, &f.file)?;
            if let (Some(epoch), true) = (clock, img.fs.is_ext()) {
                let ext = rewrite::ExtImage {
                    fs: img.fs,
                    uuid: &f.uuid,
                    label: img.label.as_deref(),
                    options: &img.mkfs_options,
                };
                rewrite::rewrite_ext(&ext, &f.file, workspace, epoch)?;
            }
            if matches!(img.fs, Fs::Ext3 | Fs::Ext4) {
                shrink::set_ext_journal(&f.file, true, clock)?;
            }
            if img.fs.is_ext() {
                shrink::shrink_ext(&f.file, clock)?;
            }
            staged.push(Staged {
                raw: f.file.clone(),
                uuid: f.uuid.clone(),
                ..s
            });
        }
        Ok(staged)
    }

    fn cleanup(&mut self) {
        self.mounts.unmount_logging();
        while let Some(l) = self.loops.pop() {
            if let Err(e) = l.close() {
                tracing::warn!("{e:#}");
            }
        }
    }
}

impl Drop for FsImages {
    fn drop(&mut self) {
        self.cleanup();
    }
}
