//! System settings written into the image, and the build-only files put in and taken out.
//!
//! Build-only files (policy-rc.d, the apt build settings, the host's resolv.conf) are tracked by
//! [`BuildOnlyFiles`] so that the finished image holds none of them.

use std::fmt::Write as _;

use anyhow::{Context, Result};

use std::collections::BTreeMap;

use crate::cmd::CommandRunExt;
use crate::debian::apt::{self, Apt};
use crate::debian::lock::Lock;
use crate::debian::settings;
use crate::kind::FsInfo;
use crate::plan::Plan;
use crate::root::{Owner, Root};

/// `policy-rc.d` that forbids every service start inside the chroot.
pub const POLICY_RC_D: &str = "usr/sbin/policy-rc.d";

/// dpkg setting that skips its fsyncs during the build (everything is synced once, when the
/// filesystems are unmounted).
pub const DPKG_UNSAFE_IO: &str = "etc/dpkg/dpkg.cfg.d/debimg-unsafe-io";

/// Where the image's own resolv.conf (a link) waits while the host's is in place.
const SAVED_RESOLV_CONF: &str = "etc/resolv.conf.debimg-saved";

/// The system the spec describes, written into the tree: root's password, fstab (by UUID),
/// hostname and hosts, time zone, locale, users, files and services, then each kernel's
/// initramfs the install left out; whatever the programs run for them left running in the
/// chroot is ended.
pub fn system(plan: &Plan, root: &Root, filesystems: &[FsInfo]) -> Result<()> {
    if let Some(hash) = &plan.root_password_hash {
        set_root_password(root, hash)?;
    }
    let fstab: Vec<FstabEntry> = filesystems
        .iter()
        .map(|f| FstabEntry {
            uuid: f.uuid.clone(),
            mount: f.mount.clone(),
            fs: f.fs.clone(),
        })
        .collect();
    write_system_files(root, &plan.hostname, &fstab)?;
    if let Some(tz) = &plan.timezone {
        settings::set_timezone(root, tz)?;
    }
    if let Some(locale) = &plan.locale {
        settings::set_locale(root, locale)?;
    }
    settings::create_users(root, &plan.users)?;
    settings::copy_files(root, &plan.files)?;
    settings::set_services(root, &plan.services)?;
    root.end_processes("the system settings")?;
    // The install left each new kernel without an initramfs (`initramfs`): made now, from the
    // configuration the files gave, and there for the post scripts.
    crate::debian::initramfs::complete(root)?;
    root.end_processes("the initramfs")
}

/// The last touches once the scripts and the bootloader are done: the host identity scrubbed,
/// apt's archive emptied, every build-only file removed and, unless the spec keeps them, the
/// build's apt sources. A build from a lock must hold exactly its packages. Returns every
/// installed package and its version, and the lock of what the tree holds.
pub fn finish(
    plan: &Plan,
    root: &Root,
    build_only: &mut BuildOnlyFiles,
    show: bool,
) -> Result<(BTreeMap<String, String>, Lock)> {
    scrub_host_identity(root)?;
    let apt = Apt {
        root,
        show,
        defer_initramfs: false,
    };
    apt.clean()?;
    let installed = apt.installed()?;
    if let Some(lock) = &plan.lock {
        crate::debian::lock::finish(lock, root, &installed)
            .with_context(|| format!("building from the lock {}", plan.lock_source))?;
    }
    let lock = crate::debian::lock::of_tree(root, &plan.arch, &plan.repos)?;
    // After the lock, which reads apt's lists.
    if plan.source_date_epoch.is_some() {
        let removed = scrub_residue(root)?;
        tracing::debug!("removed what records the build: {}", removed.join(" "));
    }
    build_only.remove(root)?;
    if !plan.keep_apt_sources {
        drop_apt_sources(root, &plan.repos)?;
    }
    Ok((installed, lock))
}

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
#[derive(Default)]
pub struct BuildOnlyFiles {
    /// The image's own resolv.conf (a link) was moved aside while the host's is in place.
    saved_resolv: bool,
}

impl BuildOnlyFiles {
    /// Tracks the build-only files of an image tree (none placed yet).
    pub fn new() -> BuildOnlyFiles {
        BuildOnlyFiles::default()
    }

    /// Installs policy-rc.d so that no maintainer script starts a service. Called before
    /// debootstrap and again after it: debootstrap removes its own policy-rc.d when it ends.
    pub fn install_policy(&self, root: &Root) -> Result<()> {
        root.write(
            POLICY_RC_D,
            b"#!/bin/sh\n# debimg: no service starts inside the build chroot.\nexit 101\n",
            0o755,
            Owner::ROOT,
        )
    }

    /// Lets dpkg skip its fsyncs for the rest of the build.
    pub fn install_dpkg_unsafe_io(&self, root: &Root) -> Result<()> {
        root.write(
            DPKG_UNSAFE_IO,
            b"# debimg: build-only, removed before the image is finished.\nforce-unsafe-io\n",
            0o644,
            Owner::ROOT,
        )
    }

    /// Puts the host's resolv.conf into the chroot so apt can resolve the mirror. A symlink
    /// the image brought (systemd-resolved, resolvconf) is kept aside and restored; a plain
    /// file is debootstrap's copy of the host's and does not belong in the image.
    pub fn install_resolv_conf(&mut self, root: &Root) -> Result<()> {
        // A tree from the cache may hold the link already set aside.
        if root.symlink_metadata(SAVED_RESOLV_CONF)?.is_some() {
            self.saved_resolv = true;
        }
        if !self.saved_resolv
            && root
                .symlink_metadata("etc/resolv.conf")?
                .is_some_and(|m| m.file_type().is_symlink())
        {
            root.rename("etc/resolv.conf", SAVED_RESOLV_CONF)?;
            self.saved_resolv = true;
        }
        let host = std::fs::read("/etc/resolv.conf").unwrap_or_default();
        root.write("etc/resolv.conf", &host, 0o644, Owner::ROOT)
    }

    /// Removes every build-only file and restores what they replaced.
    pub fn remove(&mut self, root: &Root) -> Result<()> {
        for rel in [
            POLICY_RC_D,
            apt::BUILD_CONF,
            apt::EXCLUDE_PREFS,
            DPKG_UNSAFE_IO,
            "etc/resolv.conf",
        ] {
            root.remove_file(rel)?;
        }
        if self.saved_resolv {
            root.rename(SAVED_RESOLV_CONF, "etc/resolv.conf")
                .context("restoring the image's /etc/resolv.conf")?;
            self.saved_resolv = false;
        }
        Ok(())
    }
}

/// Writes hostname, hosts and fstab.
pub fn write_system_files(root: &Root, hostname: &str, fstab: &[FstabEntry]) -> Result<()> {
    root.write(
        "etc/hostname",
        format!("{hostname}\n").as_bytes(),
        0o644,
        Owner::ROOT,
    )?;
    root.write(
        "etc/hosts",
        render_hosts(hostname).as_bytes(),
        0o644,
        Owner::ROOT,
    )?;
    root.write(
        "etc/fstab",
        render_fstab(fstab).as_bytes(),
        0o644,
        Owner::ROOT,
    )
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

/// Removes what records the build, not the system, for a reproducible build:
/// [`crate::reproducible::RESIDUE`] and apt's lists (but its lock file) (files only; a link is
/// removed, never followed). Returns what was removed.
pub fn scrub_residue(root: &Root) -> Result<Vec<String>> {
    use crate::reproducible::{APT_LISTS, RESIDUE};
    let mut removed = Vec::new();
    for path in RESIDUE {
        if root.remove_file(path)? {
            removed.push(path.to_string());
        }
    }
    for e in root.read_dir(APT_LISTS)? {
        if e.file_type.is_dir() || e.name == "lock" {
            continue;
        }
        let path = format!("{APT_LISTS}/{}", e.name.to_string_lossy());
        if root.remove_file(&path)? {
            removed.push(path);
        }
    }
    Ok(removed)
}

/// Removes what would make every machine made from the image the same machine: SSH host keys
/// generated by openssh-server's postinst (new ones are made on first boot) and the machine-id
/// (emptied: systemd makes one on first boot). Links are removed or replaced, never followed.
pub fn scrub_host_identity(root: &Root) -> Result<()> {
    let mut removed_keys = false;
    for e in root.read_dir("etc/ssh")? {
        let name = e.name.to_string_lossy();
        if name.starts_with("ssh_host_") && (name.ends_with("_key") || name.ends_with("_key.pub")) {
            removed_keys |= root.remove_file(format!("etc/ssh/{name}"))?;
        }
    }
    let has_systemd =
        root.is_file("usr/lib/systemd/systemd") || root.is_file("lib/systemd/systemd");
    if removed_keys && has_systemd {
        root.write(
            "etc/systemd/system/debimg-ssh-keygen.service",
            SSH_KEYGEN_UNIT.as_bytes(),
            0o644,
            Owner::ROOT,
        )?;
        root.symlink(
            "../debimg-ssh-keygen.service",
            "etc/systemd/system/multi-user.target.wants/debimg-ssh-keygen.service",
        )
        .context("enabling debimg-ssh-keygen.service")?;
    }
    // An empty regular file whatever was there: a package's link (`-> /etc/shadow`) is
    // replaced, never written through.
    if let Some(md) = root.symlink_metadata("etc/machine-id")? {
        let mode = if md.is_file() {
            std::os::unix::fs::PermissionsExt::mode(&md.permissions()) & 0o7777
        } else {
            0o444
        };
        root.write("etc/machine-id", b"", mode, Owner::ROOT)?;
    }
    if root
        .symlink_metadata("var/lib/dbus/machine-id")?
        .is_some_and(|m| m.is_file())
    {
        root.remove_file("var/lib/dbus/machine-id")?;
    }
    Ok(())
}

/// Sets root's password hash (`!` locks the account).
pub fn set_root_password(root: &Root, hash: &str) -> Result<()> {
    root.command("usermod")
        .args(["-p", hash, "root"])
        .run()
        .context("setting root's password")
}

/// Removes the spec's repos from the final image's apt sources when the spec says so, and the
/// keyrings debimg wrote for them.
pub fn drop_apt_sources(root: &Root, repos: &[crate::plan::PlannedRepo]) -> Result<()> {
    root.write(
        "etc/apt/sources.list",
        b"# debimg: the build's repos were removed (keep_apt_sources: false).\n",
        0o644,
        Owner::ROOT,
    )?;
    for path in repos.iter().filter_map(|r| r.keyring_path()) {
        root.remove_file(&path)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

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
        let r = Root::open(root).unwrap();
        let mut b = BuildOnlyFiles::new();
        b.install_policy(&r).unwrap();
        b.install_resolv_conf(&r).unwrap();
        b.install_resolv_conf(&r).unwrap();
        r.write(apt::BUILD_CONF, b"x", 0o644, Owner::ROOT).unwrap();
        assert!(root.join(POLICY_RC_D).exists());
        b.remove(&r).unwrap();
        assert!(!root.join(POLICY_RC_D).exists());
        assert!(!root.join(apt::BUILD_CONF).exists());
        assert_eq!(
            std::fs::read_link(root.join("etc/resolv.conf")).unwrap(),
            Path::new("../run/resolv.conf")
        );
    }

    #[test]
    fn dropping_the_sources_takes_their_keyrings() {
        let d = tempfile::tempdir().unwrap();
        let root = Root::open(d.path()).unwrap();
        let mut plan = Plan::for_test("version: 1\nname: t\nsuite: bookworm\nkind: tarball\n");
        plan.repos[0].keyring = Some(vec![0x99]);
        let ring = plan.repos[0].keyring_path().unwrap();
        root.write(&ring, &[0x99], 0o644, Owner::ROOT).unwrap();
        root.write("etc/apt/keyrings/admin.gpg", b"x", 0o644, Owner::ROOT)
            .unwrap();
        drop_apt_sources(&root, &plan.repos).unwrap();
        assert!(!root.exists(&ring));
        assert!(root.exists("etc/apt/keyrings/admin.gpg"), "not debimg's");
        assert!(
            root.read_to_string("etc/apt/sources.list")
                .unwrap()
                .starts_with("# debimg")
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
        scrub_host_identity(&Root::open(root).unwrap()).unwrap();
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
    fn scrubbing_never_follows_links_out_of_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let host = dir.path().join("host");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::create_dir_all(root.join("var/lib/dbus")).unwrap();
        std::fs::create_dir_all(&host).unwrap();
        std::fs::write(host.join("shadow"), "root:hash:::\n").unwrap();
        std::fs::write(host.join("ssh_host_rsa_key"), "host key").unwrap();
        std::os::unix::fs::symlink(host.join("shadow"), root.join("etc/machine-id")).unwrap();
        std::os::unix::fs::symlink(&host, root.join("etc/ssh")).unwrap();
        std::os::unix::fs::symlink(host.join("shadow"), root.join("var/lib/dbus/machine-id"))
            .unwrap();
        scrub_host_identity(&Root::open(&root).unwrap()).unwrap();
        assert_eq!(
            std::fs::read_to_string(host.join("shadow")).unwrap(),
            "root:hash:::\n"
        );
        assert!(host.join("ssh_host_rsa_key").exists());
        let m = std::fs::symlink_metadata(root.join("etc/machine-id")).unwrap();
        assert!(
            m.is_file() && m.len() == 0,
            "the link is replaced by an empty file"
        );
    }

    #[test]
    fn host_resolv_conf_copy_is_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/resolv.conf"), "nameserver 192.0.2.1\n").unwrap();
        let r = Root::open(root).unwrap();
        let mut b = BuildOnlyFiles::new();
        b.install_policy(&r).unwrap();
        b.install_resolv_conf(&r).unwrap();
        b.remove(&r).unwrap();
        assert!(root.join("etc/resolv.conf").symlink_metadata().is_err());
    }
}
