//! One initramfs per kernel, made once when the image's files are in place instead of once per
//! trigger.
//!
//! A kernel's postinst makes its initramfs (`/etc/kernel/postinst.d/initramfs-tools`, dracut's
//! hook likewise), and then every package that ships an initramfs hook (udev, kmod, busybox,
//! cryptsetup, ...) activates initramfs-tools' trigger, which makes it again at the end of the
//! same dpkg run: two or more builds of the same file, each seconds on a host and minutes under
//! emulation (`--vm` on a host without KVM, a foreign architecture).
//!
//! When the tree holds no initramfs yet (a cold install: the common case), apt runs with
//! `INITRD=No`, the kernel hooks' own switch (with no initramfs at all, the trigger's update
//! finds nothing to update). At the configure stage, once the spec's `files` are written and
//! before its `post` scripts run, [`complete`] runs each generator's kernel hook once per
//! kernel, with the hooks and modules of the whole install in place, and puts back the
//! `/initrd.img` links that `linux-update-symlinks` (which reads the same switch) left out. The
//! image is what the per-trigger way ends with, and the generator reads the configuration the
//! spec gives it (`/etc/initramfs-tools/modules`, `conf.d`, `/etc/crypttab`, dracut's
//! `conf.d`) as `files`. The scripts find the initramfs made, as they would after a plain
//! install. An installed tree is cached without it (the files are each build's own). A tree
//! that holds an initramfs already (a kernel in `bootstrap_include`) installs the usual way: a
//! kernel upgraded in place or a removed one keeps its hooks' behaviour.

use anyhow::{Context, Result, bail};

use crate::cmd::CommandRunExt;
use crate::root::Root;

/// The variable the kernel hooks of initramfs-tools and dracut read: `No` skips the build.
pub const SKIP_ENV: (&str, &str) = ("INITRD", "No");

/// The kernel hooks that make an initramfs, by the package that ships them.
const HOOKS: [&str; 2] = [
    "etc/kernel/postinst.d/initramfs-tools",
    "etc/kernel/postinst.d/dracut",
];

/// What linux-base runs from a kernel's postinst to point `/vmlinuz` and `/initrd.img` (or
/// their `/boot` twins) at the newest kernel.
const UPDATE_SYMLINKS: &str = "usr/bin/linux-update-symlinks";

/// Whether this install may defer the initramfs to [`complete`]: the tree holds none yet.
pub fn may_defer(root: &Root) -> Result<bool> {
    Ok(!root
        .read_dir("boot")?
        .iter()
        .any(|e| e.name.to_string_lossy().starts_with("initrd.img-")))
}

/// The kernel images in `/boot` (`vmlinuz-VERSION`, or `vmlinux-VERSION` where the
/// architecture boots one, as linux-base looks for them) with no `initrd.img-VERSION`:
/// `(version, image name)`, by name.
pub fn kernels_without_initramfs(root: &Root) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for e in root.read_dir("boot")? {
        let name = e.name.to_string_lossy().into_owned();
        let Some(version) = name
            .strip_prefix("vmlinuz-")
            .or_else(|| name.strip_prefix("vmlinux-"))
        else {
            continue;
        };
        if version.is_empty() || version.ends_with(".sig") || !root.is_file(format!("boot/{name}"))
        {
            continue;
        }
        if root.exists(format!("boot/initrd.img-{version}")) {
            continue;
        }
        out.push((version.to_string(), name.clone()));
    }
    Ok(out)
}

/// Makes the initramfs of every kernel the tree holds without one, by the generator's own
/// kernel hook (as the kernel's postinst would have run it), then lets linux-base point the
/// links at them; returns the versions made. Nothing when no generator is installed.
pub fn complete(root: &Root) -> Result<Vec<String>> {
    let hooks: Vec<&str> = HOOKS.iter().copied().filter(|h| root.is_file(h)).collect();
    if hooks.is_empty() {
        return Ok(Vec::new());
    }
    let kernels = kernels_without_initramfs(root)?;
    for (v, image) in &kernels {
        let t = std::time::Instant::now();
        for hook in &hooks {
            root.command(&format!("/{hook}"))
                .arg(v)
                .arg(format!("/boot/{image}"))
                .run()
                .with_context(|| format!("making the initramfs of kernel {v} (/{hook})"))?;
        }
        if !root.is_file(format!("boot/initrd.img-{v}")) {
            bail!(
                "making the initramfs of kernel {v}: {} ran and made no /boot/initrd.img-{v}",
                hooks.join(", ")
            );
        }
        tracing::info!(
            "initramfs of kernel {v} made once, with the image's files, in {:.1}s",
            t.elapsed().as_secs_f64()
        );
    }
    // The links as the kernel's postinst would have left them with an initramfs
    // (linux-update-symlinks points them at the newest kernel, whichever it is told of).
    if !kernels.is_empty() && root.is_file(UPDATE_SYMLINKS) {
        for (v, image) in &kernels {
            root.command(&format!("/{UPDATE_SYMLINKS}"))
                .args(["install", v])
                .arg(format!("/boot/{image}"))
                .run()
                .with_context(|| format!("linking the initramfs of kernel {v}"))?;
        }
    }
    Ok(kernels.into_iter().map(|(v, _)| v).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::root::Owner;

    #[test]
    fn kernels_without_an_initramfs_are_listed_and_an_initramfs_stops_deferring() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::open(dir.path()).unwrap();
        assert!(may_defer(&root).unwrap(), "no /boot at all");
        for (path, body) in [
            ("boot/vmlinuz-6.1.0-1-amd64", "k"),
            ("boot/vmlinuz-6.1.0-2-amd64", "k"),
            ("boot/vmlinuz-6.1.0-2-amd64.sig", "s"),
            ("boot/vmlinux-6.1.0-3-powerpc64le", "k"),
            ("boot/config-6.1.0-1-amd64", "c"),
            ("real/vmlinuz", "k"),
        ] {
            root.write(path, body.as_bytes(), 0o644, Owner::ROOT)
                .unwrap();
        }
        // A link to an image counts (followed inside the tree); `vmlinuz` itself is no kernel.
        root.symlink("/real/vmlinuz", "boot/vmlinuz-6.1.0-4-amd64")
            .unwrap();
        root.symlink("vmlinuz-6.1.0-1-amd64", "boot/vmlinuz")
            .unwrap();
        assert!(may_defer(&root).unwrap());
        assert_eq!(
            kernels_without_initramfs(&root).unwrap(),
            [
                (
                    "6.1.0-3-powerpc64le".to_string(),
                    "vmlinux-6.1.0-3-powerpc64le".to_string()
                ),
                ("6.1.0-1-amd64".into(), "vmlinuz-6.1.0-1-amd64".into()),
                ("6.1.0-2-amd64".into(), "vmlinuz-6.1.0-2-amd64".into()),
                ("6.1.0-4-amd64".into(), "vmlinuz-6.1.0-4-amd64".into()),
            ]
        );
        root.write("boot/initrd.img-6.1.0-2-amd64", b"i", 0o644, Owner::ROOT)
            .unwrap();
        assert!(!may_defer(&root).unwrap(), "an initramfs is there");
        assert_eq!(kernels_without_initramfs(&root).unwrap().len(), 3);
        // No generator installed: nothing to run, nothing made.
        assert_eq!(complete(&root).unwrap(), Vec::<String>::new());
    }
}
