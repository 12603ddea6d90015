//! Making filesystems on block devices (or image files), with the label and UUID debimg chose,
//! and checking them read-only once they are built.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

use crate::cmd::CommandRunExt;
use crate::spec::Fs;

/// What to make.
#[derive(Debug, Clone)]
pub struct MkfsRequest<'a> {
    pub fs: Fs,
    pub label: Option<&'a str>,
    pub uuid: &'a str,
    /// Build with the ext3/ext4 journal off (turned back on after the build: 2-3x faster).
    pub no_journal: bool,
    /// Extra arguments from the spec.
    pub options: &'a [String],
}

/// The mkfs command line (pure, so it can be tested).
pub fn command(req: &MkfsRequest, device: &Path) -> Command {
    let mut cmd = Command::new(format!("mkfs.{}", req.fs.name()));
    match req.fs {
        Fs::Ext2 | Fs::Ext3 | Fs::Ext4 => {
            cmd.args(["-F", "-q", "-E", "nodiscard", "-U", req.uuid]);
            if req.no_journal && req.fs != Fs::Ext2 {
                cmd.args(["-O", "^has_journal"]);
            }
        }
        Fs::Xfs => {
            cmd.args(["-f", "-q", "-K", "-m"])
                .arg(format!("uuid={}", req.uuid));
        }
        Fs::Btrfs => {
            cmd.args(["-f", "-q", "-K", "-U", req.uuid]);
        }
    }
    if let Some(label) = req.label {
        cmd.args(["-L", label]);
    }
    cmd.args(req.options);
    cmd.arg(device);
    cmd
}

/// Makes the filesystem.
pub fn make(req: &MkfsRequest, device: &Path) -> Result<()> {
    command(req, device)
        .run()
        .with_context(|| format!("making {} on {}", req.fs, device.display()))
}

/// Checks an unmounted filesystem image without changing it; any finding fails. A freshly
/// built, cleanly unmounted filesystem has none, so a finding means lost writes (a full build
/// disk under the loop device shows up this way) and the image must not ship.
pub fn check(fs: Fs, image: &Path) -> Result<()> {
    let mut cmd = match fs {
        Fs::Ext2 | Fs::Ext3 | Fs::Ext4 => {
            let mut c = Command::new("e2fsck");
            c.arg("-fn");
            c
        }
        Fs::Xfs => {
            let mut c = Command::new("xfs_repair");
            c.args(["-n", "-f"]);
            c
        }
        Fs::Btrfs => {
            let mut c = Command::new("btrfs");
            c.args(["check", "--readonly"]);
            c
        }
    };
    cmd.arg(image)
        .run()
        .with_context(|| format!("checking the {fs} filesystem in {}", image.display()))
}

/// A fresh random UUID from the kernel.
pub fn new_uuid() -> Result<String> {
    let s = std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .context("reading /proc/sys/kernel/random/uuid")?;
    Ok(s.trim().to_string())
}

/// The host tool that makes `fs`, for the preflight.
pub fn tool(fs: Fs) -> (&'static str, &'static str) {
    match fs {
        Fs::Ext2 | Fs::Ext3 | Fs::Ext4 => ("mkfs.ext4", "e2fsprogs"),
        Fs::Xfs => ("mkfs.xfs", "xfsprogs"),
        Fs::Btrfs => ("mkfs.btrfs", "btrfs-progs"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmd::command_line;

    #[test]
    fn ext4_without_journal() {
        let opts = vec!["-m".to_string(), "1".to_string()];
        let req = MkfsRequest {
            fs: Fs::Ext4,
            label: Some("root"),
            uuid: "u-1",
            no_journal: true,
            options: &opts,
        };
        assert_eq!(
            command_line(&command(&req, Path::new("/dev/loop7"))),
            "mkfs.ext4 -F -q -E nodiscard -U u-1 -O ^has_journal -L root -m 1 /dev/loop7"
        );
    }

    #[test]
    fn xfs_uuid() {
        let req = MkfsRequest {
            fs: Fs::Xfs,
            label: None,
            uuid: "u-2",
            no_journal: true,
            options: &[],
        };
        assert_eq!(
            command_line(&command(&req, Path::new("/dev/loop7"))),
            "mkfs.xfs -f -q -K -m uuid=u-2 /dev/loop7"
        );
    }
}
