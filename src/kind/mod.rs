//! Image kinds: what a build turns its install root into.
//!
//! The hooks are the ones livecd-tools' `ImageCreator` named: prepare and mount the install root
//! (`_mount_instroot`), undo that (`_unmount_instroot`), make it bootable
//! (`configure_bootloader`, may do nothing) and stage the final image (`_stage_final_image`).
//! The [`crate::creator::Creator`] calls them in order and owns everything else (bootstrap, apt,
//! settings, scripts, packaging, metadata).

pub mod disk;
pub mod fs_images;
pub mod tarball;

use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::plan::Plan;
use crate::spec::{Container, Kind};
use crate::sys::mount::Mount;

/// One filesystem of the install root, as post scripts and fstab see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsInfo {
    /// Mount point inside the image (`/`, `/boot`).
    pub mount: String,
    /// Filesystem type (`ext4`).
    pub fs: String,
    pub label: Option<String>,
    /// Size of the filesystem's image file in bytes.
    pub size: u64,
    pub uuid: String,
    /// The block device it is on during the build (`/dev/loop3`).
    pub device: String,
}

/// How a staged file is shipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ship {
    /// gzip or a sparse raw copy, by the packer.
    Packed(Container),
    /// qcow2 by qemu-img, with compressed clusters or not.
    Qcow2 { compressed: bool },
}

impl Ship {
    /// The name in metadata (`container`).
    pub fn name(self) -> &'static str {
        match self {
            Ship::Packed(c) => c.name(),
            Ship::Qcow2 { .. } => "qcow2",
        }
    }
}

/// A file staged for packaging: a raw image (or archive) in the workspace and how it ships.
#[derive(Debug, Clone)]
pub struct Staged {
    /// The raw file in the workspace.
    pub raw: PathBuf,
    /// File name of the raw file (`<base>.img`, `<name>.tar`), as the metadata names it.
    pub raw_name: String,
    pub ship: Ship,
    /// File name shipped in the output directory.
    pub container_name: String,
    /// Filesystem (`ext4`) or `tar`.
    pub format: String,
    pub mount: String,
    pub label: Option<String>,
    pub uuid: String,
}

/// What a kind of image does at the points of a build that differ between kinds.
///
/// Implementations hold the kernel resources they create (loop devices, mounts) as guards and
/// must release them in [`ImageKind::cleanup`], which is called on every path, also after a
/// failure in any hook.
pub trait ImageKind {
    /// Short name for logs and metadata (`fs-images`, `tarball`).
    fn name(&self) -> &'static str;

    /// Prepares the storage and mounts it at `root` (an empty directory is created by the
    /// caller's workspace; `root` does not exist yet). `workspace` is private to this build.
    fn mount_root(&mut self, plan: &Plan, workspace: &Path, root: &Path) -> Result<()>;

    /// The filesystems mounted now (empty for a plain directory).
    fn filesystems(&self) -> Vec<FsInfo>;

    /// Mount points this kind owns under `root`, outermost first.
    fn mount_points(&self) -> Vec<PathBuf>;

    /// Makes the tree bootable (bootloader, kernel command line); the chroot's API filesystems
    /// are still mounted. The default does nothing.
    fn make_bootable(&mut self, _plan: &Plan, _root: &Path) -> Result<()> {
        Ok(())
    }

    /// Flushes and unmounts what [`ImageKind::mount_root`] mounted, and detaches its devices.
    /// Every other mount under `root` is gone by then.
    fn unmount_root(&mut self) -> Result<()>;

    /// Turns the unmounted result into the raw files to package (checks, shrinks, archives).
    fn stage_final(&mut self, plan: &Plan, workspace: &Path, root: &Path) -> Result<Vec<Staged>>;

    /// Releases whatever is still held, best effort; safe to call at any point and repeatedly.
    fn cleanup(&mut self);
}

/// The filesystems a kind mounted into the install root, parents first; always unmounted in
/// reverse, also when dropped.
#[derive(Default)]
pub struct MountStack(Vec<Mount>);

impl MountStack {
    /// Holds a mount made after every one already held.
    pub fn push(&mut self, m: Mount) {
        self.0.push(m);
    }

    /// The mount points, outermost first.
    pub fn points(&self) -> Vec<PathBuf> {
        self.0.iter().map(|m| m.target().to_path_buf()).collect()
    }

    /// Flushes every filesystem, then unmounts them deepest first. One sync for the whole build
    /// (dpkg skipped its own); syncfs also reports writes the kernel failed to store, which
    /// unmount would swallow.
    pub fn sync_and_unmount(&mut self) -> Result<()> {
        for m in self.0.iter().rev() {
            fs_images::syncfs(m.target())?;
        }
        while let Some(m) = self.0.pop() {
            m.close()?;
        }
        Ok(())
    }

    /// Unmounts what is left, deepest first, logging failures.
    pub fn unmount_logging(&mut self) {
        while let Some(m) = self.0.pop() {
            if let Err(e) = m.close() {
                tracing::warn!("{e:#}");
            }
        }
    }
}

impl Drop for MountStack {
    fn drop(&mut self) {
        self.unmount_logging();
    }
}

/// The kind a spec asks for.
pub fn for_plan(plan: &Plan) -> Box<dyn ImageKind> {
    match plan.kind {
        Kind::FsImages => Box::new(fs_images::FsImages::default()),
        Kind::Tarball => Box::new(tarball::Tarball),
        Kind::Disk => Box::new(disk::DiskImage::default()),
    }
}
