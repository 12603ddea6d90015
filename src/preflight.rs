//! Checks before anything is made: the host tools a plan needs and the room it needs in its
//! build directory; and, after a failure, whether a full disk was the cause.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::plan::Plan;
use crate::sys::mkfs;

/// Host tools a plan needs, with the Debian package that provides each.
pub fn required_tools(plan: &Plan) -> Vec<(&'static str, &'static str)> {
    let backend = plan.backend.name();
    let mut tools = vec![(backend, backend), ("chroot", "coreutils"), ("tar", "tar")];

    for img in &plan.images {
        tools.push(mkfs::tool(img.fs));
        if img.fs.is_ext() {
            tools.push(("resize2fs", "e2fsprogs"));
            tools.push(("e2fsck", "e2fsprogs"));
            tools.push(("tune2fs", "e2fsprogs"));
            tools.push(("dumpe2fs", "e2fsprogs"));
        }
    }
    if let Some(disk) = &plan.disk {
        tools.push(("sfdisk", "fdisk"));
        for p in &disk.partitions {
            if let Some(fs) = p.fs {
                tools.push(mkfs::tool(fs));
                if fs.is_ext() {
                    tools.push(("tune2fs", "e2fsprogs"));
                    tools.push(("e2fsck", "e2fsprogs"));
                }
            }
            if p.flags.contains(&crate::spec::PartitionFlag::Esp) {
                tools.extend([
                    ("mkfs.vfat", "dosfstools"),
                    ("fsck.vfat", "dosfstools"),
                    ("mmd", "mtools"),
                    ("mcopy", "mtools"),
                ]);
            }
        }
        if disk.formats.iter().any(|f| {
            matches!(
                f,
                crate::spec::DiskFormat::Qcow2 | crate::spec::DiskFormat::Qcow2Compressed
            )
        }) {
            tools.push(("qemu-img", "qemu-utils"));
        }
    }
    tools.sort();
    tools.dedup();
    tools
}

/// Names every missing host tool and how to install it, before anything is created.
pub fn preflight(plan: &Plan) -> Result<()> {
    check_tools(plan, &crate::host::program_dirs())
}

/// The preflight against an explicit list of directories.
pub fn check_tools(plan: &Plan, dirs: &[PathBuf]) -> Result<()> {
    let missing: Vec<_> = required_tools(plan)
        .into_iter()
        .filter(|(tool, _)| !dirs.iter().any(|d| d.join(tool).is_file()))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let mut pkgs: Vec<&str> = missing.iter().map(|(_, p)| *p).collect();
    pkgs.sort();
    pkgs.dedup();
    Err(crate::error::Error::tagged(
        crate::error::ErrorKind::MissingTools,
        format!(
            "missing host tools: {} (install them with `apt-get install {}`)",
            missing
                .iter()
                .map(|(t, p)| format!("{t} (package {p})"))
                .collect::<Vec<_>>()
                .join(", "),
            pkgs.join(" ")
        ),
    ))
}

/// Below this much free space in the build directory a failure is blamed on a full disk.
const LOW_SPACE: u64 = 32 << 20;

/// What to tell about a failure when the filesystem holding `dir` is (nearly) full: a full disk
/// under a loop device shows up as I/O errors that do not say so. `what` names `dir` for the
/// user. `None` when there is room.
pub(crate) fn no_space_note(dir: &Path, what: &str) -> Option<String> {
    let st = nix::sys::statvfs::statvfs(dir).ok()?;
    let free = st.blocks_available() * st.fragment_size();
    if free >= LOW_SPACE {
        return None;
    }
    let hint = if what.contains("tmpfs") {
        "give --tmpfs a larger size or build on disk"
    } else {
        "free some or choose another with --build-dir"
    };
    Some(format!(
        "no space left in {what} {} ({} KiB free): {hint}",
        dir.display(),
        free >> 10
    ))
}

/// The least a Debian tree takes (a minbase tree is about 180 MB with its package lists).
const MIN_TREE: u64 = 160 << 20;

/// What a build of `plan` needs in its workspace at the least: the tree (up to the images'
/// capacity, as they are sparse), and a second copy of it for a tarball's archive.
pub fn space_needed(plan: &Plan) -> u64 {
    match plan.kind {
        crate::spec::Kind::Tarball => 2 * MIN_TREE,
        crate::spec::Kind::Disk => plan
            .disk
            .as_ref()
            .map_or(MIN_TREE, |d| d.size.0.min(MIN_TREE)),
        crate::spec::Kind::FsImages => plan
            .images
            .iter()
            .map(|i| i.size)
            .sum::<u64>()
            .min(MIN_TREE),
    }
}

/// Fails, naming the shortfall, when the build directory (or the `--tmpfs` to be made) has
/// less room than the build needs at the least: before anything is created, rather than with
/// an I/O error half way through.
pub(crate) fn check_free_space(plan: &Plan, build_dir: &Path, tmpfs: Option<u64>) -> Result<()> {
    let need = space_needed(plan);
    let (free, what, hint) = match tmpfs {
        Some(size) => (
            size,
            "the --tmpfs workspace".to_string(),
            "give --tmpfs a larger size or build on disk",
        ),
        None => {
            let st = nix::sys::statvfs::statvfs(build_dir)
                .with_context(|| format!("inspecting {}", build_dir.display()))?;
            (
                st.blocks_available() * st.fragment_size(),
                format!("the build directory {}", build_dir.display()),
                "free some or choose another with --build-dir",
            )
        }
    };
    if free < need {
        return Err(crate::error::Error::tagged(
            crate::error::ErrorKind::NoSpace,
            format!(
                "no space left in {what}: {} MiB free, a build of {} needs at least {} MiB \
                 (short by {} MiB): {hint}",
                free >> 20,
                plan.name,
                need >> 20,
                (need - free).div_ceil(1 << 20)
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Plan {
        Plan::for_test(
            "version: 1\nname: t\nsuite: bookworm\nimages:\n  - {mount: /, fs: ext4, size: 1GiB}\n  - {mount: /var, fs: xfs, size: 1GiB}\n",
        )
    }

    #[test]
    fn preflight_names_every_missing_tool_and_its_package() {
        let empty = tempfile::tempdir().unwrap();
        let err = check_tools(&plan(), &[empty.path().to_path_buf()])
            .unwrap_err()
            .to_string();
        for needle in [
            "debootstrap (package debootstrap)",
            "mkfs.xfs (package xfsprogs)",
            "resize2fs (package e2fsprogs)",
            "apt-get install coreutils debootstrap e2fsprogs tar xfsprogs",
        ] {
            assert!(err.contains(needle), "`{needle}` missing in: {err}");
        }
    }

    #[test]
    fn preflight_passes_when_tools_exist() {
        let bin = tempfile::tempdir().unwrap();
        for (tool, _) in required_tools(&plan()) {
            std::fs::write(bin.path().join(tool), "").unwrap();
        }
        check_tools(&plan(), &[bin.path().to_path_buf()]).unwrap();
    }

    #[test]
    fn space_preflight_names_the_shortfall() {
        let plan = Plan::for_test(
            "version: 1\nname: t\nsuite: bookworm\nimages:\n  - {mount: /, fs: ext4, size: 1GiB}\n",
        );
        assert_eq!(space_needed(&plan), MIN_TREE);
        let dir = tempfile::tempdir().unwrap();
        let e = check_free_space(&plan, dir.path(), Some(64 << 20))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no space left in the --tmpfs workspace: 64 MiB free")
                && e.contains("needs at least 160 MiB (short by 96 MiB)"),
            "{e}"
        );
        check_free_space(&plan, dir.path(), Some(1 << 30)).unwrap();
    }
}
