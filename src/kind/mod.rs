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

use anyhow::{Context, Result, bail};

use crate::plan::Plan;
use crate::root::Root;
use crate::spec::{Container, DiskFormat, Kind, PartitionTable};
pub use crate::sys::mount::MountStack;
use crate::sys::mount::{self, Mount, MsFlags};

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
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
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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

/// What a build of `plan` stages, but for what only the build knows (each `raw` file and
/// `uuid`, left empty): names, how each file ships, its format, mount point and label. Each
/// kind's `finish` fills it in; a build machine's handoff must match it.
pub fn planned_staged(plan: &Plan) -> Vec<Staged> {
    let staged = |container_name: String, raw_name: String, ship, format: &str| Staged {
        raw: PathBuf::new(),
        raw_name,
        ship,
        container_name,
        format: format.to_string(),
        mount: "/".into(),
        label: None,
        uuid: String::new(),
    };
    match plan.kind {
        Kind::FsImages => plan
            .images
            .iter()
            .map(|img| Staged {
                mount: img.mount.clone(),
                label: img.label.clone(),
                ..staged(
                    img.container_name.clone(),
                    img.raw_name.clone(),
                    Ship::Packed(img.container),
                    img.fs.name(),
                )
            })
            .collect(),
        Kind::Tarball => plan
            .container_names()
            .into_iter()
            .map(|name| staged(name, plan.raw_name(), Ship::Packed(Container::Gzip), "tar"))
            .collect(),
        Kind::Disk => {
            let Some(disk) = &plan.disk else {
                return Vec::new();
            };
            let table = match disk.table {
                PartitionTable::Gpt => "gpt",
                PartitionTable::Mbr => "mbr",
            };
            disk.formats
                .iter()
                .zip(plan.container_names())
                .map(|(f, name)| {
                    let ship = match f {
                        DiskFormat::Raw => Ship::Packed(Container::Raw),
                        DiskFormat::Gzip => Ship::Packed(Container::Gzip),
                        DiskFormat::Qcow2 => Ship::Qcow2 { compressed: false },
                        DiskFormat::Qcow2Compressed => Ship::Qcow2 { compressed: true },
                    };
                    staged(name, plan.raw_name(), ship, table)
                })
                .collect()
        }
    }
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

    /// Empties the mounted tree for a fresh start (an install from a cached tree that goes
    /// back to the base): this kind's filesystems stay mounted, emptied, and the tree is as
    /// [`ImageKind::mount_root`] left it.
    fn empty_tree(&self, tree: &Root) -> Result<()> {
        tree.empty(&self.mount_points())
    }

    /// Makes the tree bootable (bootloader, kernel command line); the chroot's API filesystems
    /// are still mounted. `workspace` is private to this build. The default does nothing.
    fn make_bootable(&mut self, _plan: &Plan, _root: &Root, _workspace: &Path) -> Result<()> {
        Ok(())
    }

    /// Flushes and unmounts what [`ImageKind::mount_root`] mounted, and detaches its devices.
    /// Every other mount under `root` is gone by then.
    fn unmount_root(&mut self) -> Result<()>;

    /// Turns the unmounted result into the raw files to package (checks, shrinks, archives).
    fn finish(&mut self, plan: &Plan, workspace: &Path, root: &Path) -> Result<Vec<Staged>>;

    /// Releases whatever is still held, best effort; safe to call at any point and repeatedly.
    fn cleanup(&mut self);
}

/// Mounts the filesystem on `dev` at `mount` of the tree at `root`: `/` on the tree's
/// directory itself (made here: it is the workspace's), anything deeper on a directory
/// resolved inside the tree as mounted so far, through the in-root API.
pub fn mount_in_tree(root: &Path, mount: &str, dev: &str, fstype: &str) -> Result<Mount> {
    if mount == "/" {
        std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
        return mount::mount(dev, root, Some(fstype), MsFlags::empty(), None);
    }
    Root::open(root)?.mount(dev, mount, Some(fstype), MsFlags::empty(), None)
}

/// The newest kernel in the image's `/boot` and its initrd, as paths in the image.
pub fn find_kernel(root: &Root) -> Result<(String, String)> {
    let mut kernels: Vec<String> = root
        .read_dir("/boot")?
        .into_iter()
        .filter_map(|e| {
            e.name
                .to_str()
                .and_then(|n| n.strip_prefix("vmlinuz-"))
                .map(String::from)
        })
        .collect();
    kernels.sort_by(|a, b| version_cmp(a, b));
    let Some(version) = kernels.pop() else {
        bail!(
            "copy_kernel: the image has no kernel in /boot (add a kernel such as linux-image-amd64 to packages)"
        );
    };
    let initrd = format!("/boot/initrd.img-{version}");
    if !root.exists(&initrd) {
        bail!(
            "copy_kernel: kernel {version} has no initrd in /boot (add initramfs-tools to packages)"
        );
    }
    Ok((format!("/boot/vmlinuz-{version}"), initrd))
}

/// Compares kernel versions by their numeric runs (`6.1.0-10` after `6.1.0-9`).
fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn parts(s: &str) -> Vec<Result<u64, String>> {
        let mut out = Vec::new();
        let mut cur = String::new();
        let mut digits = false;
        for c in s.chars() {
            if c.is_ascii_digit() != digits && !cur.is_empty() {
                out.push(if digits {
                    Ok(cur.parse().unwrap_or(u64::MAX))
                } else {
                    Err(std::mem::take(&mut cur))
                });
                cur.clear();
            }
            digits = c.is_ascii_digit();
            cur.push(c);
        }
        if !cur.is_empty() {
            out.push(if digits {
                Ok(cur.parse().unwrap_or(u64::MAX))
            } else {
                Err(cur)
            });
        }
        out
    }
    parts(a).cmp(&parts(b))
}

/// The kind a spec asks for.
pub fn for_plan(plan: &Plan) -> Box<dyn ImageKind> {
    match plan.kind {
        Kind::FsImages => Box::new(fs_images::FsImages::default()),
        Kind::Tarball => Box::new(tarball::Tarball),
        Kind::Disk => Box::new(disk::DiskImage::default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_sort_numerically() {
        let mut v = vec!["6.1.0-10-amd64", "6.1.0-9-amd64", "5.10.0-28-amd64"];
        v.sort_by(|a, b| version_cmp(a, b));
        assert_eq!(v, ["5.10.0-28-amd64", "6.1.0-9-amd64", "6.1.0-10-amd64"]);
    }

    #[test]
    fn newest_kernel_and_its_initrd() {
        let dir = tempfile::tempdir().unwrap();
        let boot = dir.path().join("boot");
        std::fs::create_dir_all(&boot).unwrap();
        for f in [
            "vmlinuz-6.1.0-9-amd64",
            "initrd.img-6.1.0-9-amd64",
            "vmlinuz-6.1.0-10-amd64",
            "initrd.img-6.1.0-10-amd64",
        ] {
            std::fs::write(boot.join(f), f).unwrap();
        }
        let root = Root::open(dir.path()).unwrap();
        let (k, i) = find_kernel(&root).unwrap();
        assert_eq!(k, "/boot/vmlinuz-6.1.0-10-amd64");
        assert_eq!(i, "/boot/initrd.img-6.1.0-10-amd64");
        std::fs::remove_file(boot.join("initrd.img-6.1.0-10-amd64")).unwrap();
        assert!(find_kernel(&root).is_err());
        // A /boot that links out of the image is looked up inside it.
        let host = tempfile::tempdir().unwrap();
        std::fs::write(host.path().join("vmlinuz-9"), "host").unwrap();
        std::fs::rename(&boot, dir.path().join("boot.old")).unwrap();
        std::os::unix::fs::symlink(host.path(), &boot).unwrap();
        assert!(find_kernel(&root).is_err());
    }
}
