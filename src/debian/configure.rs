//! System settings written into the image, and the build-only files put in and taken out.
//!
//! Build-only files (policy-rc.d, the apt build settings, the host's resolv.conf) are tracked by
//! [`BuildOnlyFiles`] so that the finished image holds none of them.

use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::cmd::CommandRunExt;
use crate::debian::apt::{self, write};
use crate::debian::chroot_command;

/// `policy-rc.d` that forbids every service start inside the chroot.
pub const POLICY_RC_D: &str = "usr/sbin/policy-rc.d";

/// dpkg setting that skips its fsyncs during the build (everything is synced once, when the
/// filesystems are unmounted).
pub const DPKG_UNSAFE_IO: &str = "etc/dpkg/dpkg.cfg.d/debimg-unsafe-io";

/// What fstab needs to know about one filesystem.
#[derive(Debug, Clone)]
pub struct FstabEntry {
    pub uuid: String,
    pub mount: String,
    /// The type as mount(8) names it (`ext4`, `xfs`, `vfat`).
    pub fs: String,
}

/// `/etc/fstab` naming every filesystem by UUID (never a loop device path), parents first.
pub fn render_fstab(entries: &[FstabEntry]) -> String {
    let mut s = String::from("# <file system> <mount point> <type> <options> <dump> <pass>\n");
    let mut sorted: Vec<&FstabEntry> = entries.iter().collect();
    sorted.sort_by(|a, b| {
        crate::plan::mount_depth(&a.mount)
            .cmp(&crate::plan::mount_depth(&b.mount))
            .then_with(|| a.mount.cmp(&b.mount))
    });
    for e in sorted {
        let ext = matches!(e.fs.as_str(), "ext2" | "ext3" | "ext4");
        let opts = match (e.mount.as_str(), ext, e.fs.as_str()) {
            ("/", true, _) => "errors=remount-ro",
            (_, _, "vfat") => "umask=0077",
            _ => "defaults",
        };
        let pass = match (e.mount.as_str(), e.fs.as_str()) {
            (_, "xfs" | "btrfs") => 0,
            ("/", _) => 1,
            _ => 2,
        };
        let _ = writeln!(s, "UUID={} {} {} {opts} 0 {pass}", e.uuid, e.mount, e.fs);
    }
    s
}

/// `/etc/hosts` for a hostname.
pub fn render_hosts(hostname: &str) -> String {
    format!(
        "127.0.0.1\tlocalhost\n127.0.1.1\t{hostname}\n\n::1\tlocalhost ip6-localhost ip6-loopback\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n"
    )
}

/// The build-only files placed into the image, removed again by [`BuildOnlyFiles::remove`].
pub struct BuildOnlyFiles {
    root: PathBuf,
    /// The image's own resolv.conf (file or link) moved aside while the host's is in place.
    saved_resolv: Option<PathBuf>,
}

impl BuildOnlyFiles {
    /// Tracks the build-only files of the image tree at `root` (none placed yet).
    pub fn new(root: &Path) -> BuildOnlyFiles {
        BuildOnlyFiles {
            root: root.to_path_buf(),
            saved_resolv: None,
        }
    }

    /// Installs policy-rc.d so that no maintainer script starts a service. Called before
    /// debootstrap and again after it: debootstrap removes its own policy-rc.d when it ends.
    pub fn install_policy(&self) -> Result<()> {
        let path = self.root.join(POLICY_RC_D);
        write(
            &path,
            "#!/bin/sh\n# debimg: no service starts inside the build chroot.\nexit 101\n",
        )?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("making {} executable", path.display()))
    }

    /// Lets dpkg skip its fsyncs for the rest of the build.
    pub fn install_dpkg_unsafe_io(&self) -> Result<()> {
        write(
            &self.root.join(DPKG_UNSAFE_IO),
            "# debimg: build-only, removed before the image is finished.\nforce-unsafe-io\n",
        )
    }

    /// Puts the host's resolv.conf into the chroot so apt can resolve the mirror. A symlink
    /// the image brought (systemd-resolved, resolvconf) is kept aside and restored; a plain
    /// file is debootstrap's copy of the host's and does not belong in the image.
    pub fn install_resolv_conf(&mut self) -> Result<()> {
        let target = self.root.join("etc/resolv.conf");
        if target
            .symlink_metadata()
            .is_ok_and(|m| m.file_type().is_symlink())
        {
            let saved = self.root.join("etc/resolv.conf.debimg-saved");
            std::fs::rename(&target, &saved)
                .with_context(|| format!("moving {} aside", target.display()))?;
            self.saved_resolv = Some(saved);
        }
        let host = std::fs::read("/etc/resolv.conf").unwrap_or_default();
        std::fs::write(&target, host).with_context(|| format!("writing {}", target.display()))
    }

    /// Removes every build-only file and restores what they replaced.
    pub fn remove(&mut self) -> Result<()> {
        for rel in [
            POLICY_RC_D,
            apt::BUILD_CONF,
            apt::EXCLUDE_PREFS,
            DPKG_UNSAFE_IO,
        ] {
            remove_if_exists(&self.root.join(rel))?;
        }
        let target = self.root.join("etc/resolv.conf");
        remove_if_exists(&target)?;
        if let Some(saved) = self.saved_resolv.take() {
            std::fs::rename(&saved, &target)
                .with_context(|| format!("restoring {}", target.display()))?;
        }
        Ok(())
    }
}

fn remove_if_exists(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Writes hostname, hosts and fstab.
pub fn write_system_files(root: &Path, hostname: &str, fstab: &[FstabEntry]) -> Result<()> {
    write(&root.join("etc/hostname"), &format!("{hostname}\n"))?;
    write(&root.join("etc/hosts"), &render_hosts(hostname))?;
    write(&root.join("etc/fstab"), &render_fstab(fstab))
}

/// A unit that makes the SSH host keys on first boot (the build removed its own).
const SSH_KEYGEN_UNIT: &str = "[Unit]
Description=Generate SSH host keys (debimg: images ship without them)
ConditionPathExistsGlob=!/etc/ssh/ssh_host_*_key
Before=ssh.service

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
";

/// Removes what would make every machine made from the image the same machine: SSH host keys
/// generated by openssh-server's postinst (new ones are made on first boot) and the machine-id
/// (emptied: systemd makes one on first boot).
pub fn scrub_host_identity(root: &Path) -> Result<()> {
    let ssh = root.join("etc/ssh");
    let mut removed_keys = false;
    if let Ok(rd) = std::fs::read_dir(&ssh) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("ssh_host_")
                && (name.ends_with("_key") || name.ends_with("_key.pub"))
            {
                remove_if_exists(&e.path())?;
                removed_keys = true;
            }
        }
    }
    let has_systemd =
        root.join("usr/lib/systemd/systemd").exists() || root.join("lib/systemd/systemd").exists();
    if removed_keys && has_systemd {
        let unit = root.join("etc/systemd/system/debimg-ssh-keygen.service");
        write(&unit, SSH_KEYGEN_UNIT)?;
        let wants = root.join("etc/systemd/system/multi-user.target.wants");
        std::fs::create_dir_all(&wants).with_context(|| format!("creating {}", wants.display()))?;
        let link = wants.join("debimg-ssh-keygen.service");
        remove_if_exists(&link)?;
        std::os::unix::fs::symlink("../debimg-ssh-keygen.service", &link)
            .with_context(|| format!("enabling {}", link.display()))?;
    }
    let machine_id = root.join("etc/machine-id");
    if machine_id.is_file() {
        std::fs::write(&machine_id, "")
            .with_context(|| format!("emptying {}", machine_id.display()))?;
    }
    let dbus_id = root.join("var/lib/dbus/machine-id");
    if dbus_id.symlink_metadata().is_ok_and(|m| m.is_file()) {
        remove_if_exists(&dbus_id)?;
    }
    Ok(())
}

/// Sets root's password hash (`!` locks the account).
pub fn set_root_password(root: &Path, hash: &str) -> Result<()> {
    chroot_command(root, "usermod")
        .args(["-p", hash, "root"])
        .run()
        .context("setting root's password")
}

/// Removes the spec's repos from the final image's apt sources when the spec says so.
pub fn drop_apt_sources(root: &Path) -> Result<()> {
    write(
        &root.join("etc/apt/sources.list"),
        "# debimg: the build's repos were removed (keep_apt_sources: false).\n",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fstab_by_uuid() {
        let f = render_fstab(&[
            FstabEntry {
                uuid: "cc-dd".into(),
                mount: "/boot/efi".into(),
                fs: "vfat".into(),
            },
            FstabEntry {
                uuid: "aaaa".into(),
                mount: "/".into(),
                fs: "ext4".into(),
            },
            FstabEntry {
                uuid: "bbbb".into(),
                mount: "/var".into(),
                fs: "xfs".into(),
            },
        ]);
        assert!(
            f.find("UUID=aaaa").unwrap() < f.find("UUID=cc-dd").unwrap(),
            "parents first: {f}"
        );
        assert!(
            f.contains("UUID=cc-dd /boot/efi vfat umask=0077 0 2\n"),
            "{f}"
        );
        assert!(
            f.contains("UUID=aaaa / ext4 errors=remount-ro 0 1\n"),
            "{f}"
        );
        assert!(f.contains("UUID=bbbb /var xfs defaults 0 0\n"), "{f}");
        assert!(!f.contains("/dev/loop"));
    }

    #[test]
    fn build_only_files_come_and_go() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::os::unix::fs::symlink("../run/resolv.conf", root.join("etc/resolv.conf")).unwrap();
        let mut b = BuildOnlyFiles::new(root);
        b.install_policy().unwrap();
        b.install_resolv_conf().unwrap();
        write(&root.join(apt::BUILD_CONF), "x").unwrap();
        assert!(root.join(POLICY_RC_D).exists());
        b.remove().unwrap();
        assert!(!root.join(POLICY_RC_D).exists());
        assert!(!root.join(apt::BUILD_CONF).exists());
        assert_eq!(
            std::fs::read_link(root.join("etc/resolv.conf")).unwrap(),
            Path::new("../run/resolv.conf")
        );
    }

    #[test]
    fn host_identity_is_scrubbed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("etc/ssh")).unwrap();
        std::fs::create_dir_all(root.join("usr/lib/systemd")).unwrap();
        std::fs::write(root.join("usr/lib/systemd/systemd"), "").unwrap();
        for f in [
            "ssh_host_ed25519_key",
            "ssh_host_ed25519_key.pub",
            "sshd_config",
        ] {
            std::fs::write(root.join("etc/ssh").join(f), "x").unwrap();
        }
        std::fs::write(root.join("etc/machine-id"), "0123456789abcdef\n").unwrap();
        scrub_host_identity(root).unwrap();
        assert!(!root.join("etc/ssh/ssh_host_ed25519_key").exists());
        assert!(!root.join("etc/ssh/ssh_host_ed25519_key.pub").exists());
        assert!(root.join("etc/ssh/sshd_config").exists());
        assert_eq!(
            std::fs::read_to_string(root.join("etc/machine-id")).unwrap(),
            ""
        );
        assert!(
            root.join("etc/systemd/system/multi-user.target.wants/debimg-ssh-keygen.service")
                .symlink_metadata()
                .is_ok()
        );
    }

    #[test]
    fn host_resolv_conf_copy_is_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/resolv.conf"), "nameserver 192.0.2.1\n").unwrap();
        let mut b = BuildOnlyFiles::new(root);
        b.install_policy().unwrap();
        b.install_resolv_conf().unwrap();
        b.remove().unwrap();
        assert!(root.join("etc/resolv.conf").symlink_metadata().is_err());
    }
}
