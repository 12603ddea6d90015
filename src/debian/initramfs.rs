//! One initramfs per kernel, made once after the install instead of once per trigger.
//!
//! A kernel's postinst makes its initramfs (`/etc/kernel/postinst.d/initramfs-tools`, dracut's
//! hook likewise), and then every package that ships an initramfs hook (udev, kmod, busybox,
//! cryptsetup, ...) activates initramfs-tools' trigger, which makes it again at the end of the
//! same dpkg run: two or more builds of the same file, each seconds on a host and minutes under
//! emulation (`--vm` on a host without KVM, a foreign architecture). apt runs with `INITRD=No`
//! (the kernel hooks' own switch; with no initramfs yet, the trigger's update finds nothing to
//! update), and [`complete`] then runs each generator's kernel hook once per kernel that has no
//! initramfs, with the hooks and modules of the whole install in place. The image is what the
//! per-trigger way ends with: the last build of that way had the same inputs.

use std::path::Path;

use anyhow::{Context, Result};

use crate::cmd::CommandRunExt;
use crate::root::Root;

/// The variable the kernel hooks of initramfs-tools and dracut read: `No` skips the build.
pub const SKIP_ENV: (&str, &str) = ("INITRD", "No");

/// The kernel hooks that make an initramfs, by the package that ships them.
const HOOKS: [&str; 2] = [
    "etc/kernel/postinst.d/initramfs-tools",
    "etc/kernel/postinst.d/dracut",
];

/// The versions of the kernels in `/boot` (`vmlinuz-VERSION` with `lib/modules/VERSION`) that
/// have no `initrd.img-VERSION`.
pub fn kernels_without_initramfs(root: &Root) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for e in root.read_dir("boot")? {
        let name = e.name.to_string_lossy();
        let Some(version) = name.strip_prefix("vmlinuz-") else {
            continue;
        };
        if version.is_empty() || version.contains('/') || !e.file_type.is_file() {
            continue;
        }
        if root.exists(format!("boot/initrd.img-{version}"))
            || !root.is_dir(Path::new("lib/modules").join(version))
        {
            continue;
        }
        out.push(version.to_string());
    }
    Ok(out)
}

/// Makes the initramfs of every kernel the install left without one, by the generator's own
/// kernel hook (as the kernel's postinst would have run it); returns the versions made.
pub fn complete(root: &Root) -> Result<Vec<String>> {
    let versions = kernels_without_initramfs(root)?;
    let hooks: Vec<&str> = HOOKS.iter().copied().filter(|h| root.is_file(h)).collect();
    if hooks.is_empty() {
        return Ok(Vec::new());
    }
    for v in &versions {
        let t = std::time::Instant::now();
        for hook in &hooks {
            root.command(&format!("/{hook}"))
                .arg(v)
                .arg(format!("/boot/vmlinuz-{v}"))
                .run()
                .with_context(|| format!("making the initramfs of kernel {v} (/{hook})"))?;
        }
        tracing::info!(
            "initramfs of kernel {v} made once, after the install, in {:.1}s",
            t.elapsed().as_secs_f64()
        );
    }
    Ok(versions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::root::Owner;

    #[test]
    fn only_kernels_with_modules_and_no_initramfs_are_listed() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::open(dir.path()).unwrap();
        for (path, body) in [
            ("boot/vmlinuz-6.1.0-1-amd64", "k"),
            ("boot/vmlinuz-6.1.0-2-amd64", "k"),
            ("boot/initrd.img-6.1.0-2-amd64", "i"),
            ("boot/vmlinuz-6.1.0-3-amd64", "k"),
            ("boot/config-6.1.0-1-amd64", "c"),
        ] {
            root.write(path, body.as_bytes(), 0o644, Owner::ROOT)
                .unwrap();
        }
        // -3 has no modules: not an installed kernel's image.
        for v in ["6.1.0-1-amd64", "6.1.0-2-amd64"] {
            root.create_dir_all(format!("lib/modules/{v}")).unwrap();
        }
        root.symlink("boot/vmlinuz-6.1.0-1-amd64", "vmlinuz")
            .unwrap();
        assert_eq!(kernels_without_initramfs(&root).unwrap(), ["6.1.0-1-amd64"]);
        // No generator installed: nothing to run, nothing made.
        assert_eq!(complete(&root).unwrap(), Vec::<String>::new());
    }
}
