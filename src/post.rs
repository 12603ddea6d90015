//! Post scripts: run after the system is configured, inside the chroot or on the build host,
//! with an environment that says what they work on. Scripts never stay in the image.
//!
//! The environment (names of mic's `%post` where it had them):
//! - `INSTALL_ROOT`: the image's root: `/` inside the chroot, the host path outside;
//! - `IMG_NAME`: the spec's `name`;
//! - `DEBIMG_IN_CHROOT`: `1` or `0`;
//! - `DEBIMG_IMAGE_COUNT`: how many filesystem images (0 for a tarball);
//! - `DEBIMG_IMAGE_<i>_MOUNT`, `_FS`, `_LABEL`, `_SIZE` (bytes), `_UUID`, `_DEVICE` for each,
//!   in spec order from 0.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::cmd::CommandRunExt;
use crate::debian::CHROOT_ENV;
use crate::kind::FsInfo;
use crate::root::{Owner, Root};
use crate::spec::PostScript;

/// The variables a script sees besides the clean base environment.
pub fn environment(
    install_root: &str,
    image_name: &str,
    in_chroot: bool,
    filesystems: &[FsInfo],
) -> Vec<(String, String)> {
    let mut env = vec![
        ("INSTALL_ROOT".to_string(), install_root.to_string()),
        ("IMG_NAME".to_string(), image_name.to_string()),
        (
            "DEBIMG_IN_CHROOT".to_string(),
            if in_chroot { "1" } else { "0" }.to_string(),
        ),
        (
            "DEBIMG_IMAGE_COUNT".to_string(),
            filesystems.len().to_string(),
        ),
    ];
    for (i, f) in filesystems.iter().enumerate() {
        let p = format!("DEBIMG_IMAGE_{i}_");
        env.push((format!("{p}MOUNT"), f.mount.clone()));
        env.push((format!("{p}FS"), f.fs.clone()));
        env.push((format!("{p}LABEL"), f.label.clone().unwrap_or_default()));
        env.push((format!("{p}SIZE"), f.size.to_string()));
        env.push((format!("{p}UUID"), f.uuid.clone()));
        env.push((format!("{p}DEVICE"), f.device.clone()));
    }
    env
}

/// The name a script goes by in logs and errors.
pub fn display_name(index: usize, script: &PostScript) -> String {
    script
        .name
        .clone()
        .unwrap_or_else(|| format!("post[{index}]"))
}

/// Runs every script in order. `root` is the image tree, `scratch` a private directory for
/// host scripts. After each script, whatever it left running in the chroot is ended.
pub fn run_all(
    scripts: &[PostScript],
    root: &Root,
    scratch: &Path,
    image_name: &str,
    filesystems: &[FsInfo],
    show: bool,
) -> Result<()> {
    for (i, script) in scripts.iter().enumerate() {
        crate::signals::check()?;
        let name = display_name(i, script);
        tracing::info!(
            "post script {name} ({} {})",
            if script.chroot {
                "in the chroot with"
            } else {
                "on the host with"
            },
            script.interpreter
        );
        let res = run_one(script, root, scratch, image_name, filesystems, show);
        root.end_processes(&format!("post script {name}"))?;
        match res {
            Ok(()) => {}
            Err(e) if script.may_fail => {
                tracing::warn!("post script {name} failed (may_fail: true, going on): {e:#}")
            }
            Err(e) => return Err(e).with_context(|| format!("post script {name}")),
        }
    }
    Ok(())
}

fn run_one(
    script: &PostScript,
    root: &Root,
    scratch: &Path,
    image_name: &str,
    filesystems: &[FsInfo],
    show: bool,
) -> Result<()> {
    let token = crate::sys::unique_token();
    if script.chroot {
        if !root.is_file(&script.interpreter) {
            bail!(
                "its interpreter {} is not in the image (install the package that has it)",
                script.interpreter
            );
        }
        // Written through the in-root API: a `/tmp` the image links elsewhere is followed
        // inside the image, never onto the host.
        let rel = format!("/tmp/debimg-post-{token}");
        root.write(&rel, script.script.as_bytes(), 0o700, Owner::ROOT)?;
        let mut cmd = root.command(&script.interpreter);
        cmd.arg(&rel);
        cmd.envs(environment("/", image_name, true, filesystems));
        let res = cmd.run_streaming(show);
        if let Err(e) = root.remove_file(&rel) {
            tracing::warn!("removing {rel} from the image: {e:#}");
        }
        res
    } else {
        let path = scratch.join(format!("post-{token}"));
        let mut cmd = Command::new(&script.interpreter);
        cmd.arg(&path)
            .current_dir(root.path())
            .env_clear()
            .envs(CHROOT_ENV.iter().copied())
            .envs(
                root.source_date_epoch()
                    .map(|e| (crate::reproducible::ENV, e.to_string())),
            )
            .envs(environment(
                &root.path().display().to_string(),
                image_name,
                false,
                filesystems,
            ));
        let _remove = RemoveOnDrop(&path);
        let mut f = std::fs::File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        std::io::Write::write_all(&mut f, script.script.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
        f.set_permissions(std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("making {} executable", path.display()))?;
        drop(f);
        cmd.run_streaming(show)
    }
}

/// Removes a script file whatever happens to the run.
struct RemoveOnDrop<'a>(&'a Path);

impl Drop for RemoveOnDrop<'_> {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(self.0)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!("removing {}: {e}", self.0.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_names_every_image() {
        let fs = vec![
            FsInfo {
                mount: "/".into(),
                fs: "ext4".into(),
                label: Some("root".into()),
                size: 1 << 30,
                uuid: "u-1".into(),
                device: "/dev/loop7".into(),
            },
            FsInfo {
                mount: "/boot".into(),
                fs: "ext2".into(),
                label: None,
                size: 1 << 28,
                uuid: "u-2".into(),
                device: "/dev/loop8".into(),
            },
        ];
        let env: std::collections::BTreeMap<_, _> =
            environment("/", "img", true, &fs).into_iter().collect();
        assert_eq!(env["INSTALL_ROOT"], "/");
        assert_eq!(env["IMG_NAME"], "img");
        assert_eq!(env["DEBIMG_IN_CHROOT"], "1");
        assert_eq!(env["DEBIMG_IMAGE_COUNT"], "2");
        assert_eq!(env["DEBIMG_IMAGE_0_MOUNT"], "/");
        assert_eq!(env["DEBIMG_IMAGE_0_SIZE"], "1073741824");
        assert_eq!(env["DEBIMG_IMAGE_1_FS"], "ext2");
        assert_eq!(env["DEBIMG_IMAGE_1_LABEL"], "");
        assert_eq!(env["DEBIMG_IMAGE_1_UUID"], "u-2");
        assert_eq!(env["DEBIMG_IMAGE_1_DEVICE"], "/dev/loop8");
    }

    #[test]
    fn host_script_runs_with_its_environment_and_is_removed() {
        let root = tempfile::tempdir().unwrap();
        let scratch = tempfile::tempdir().unwrap();
        let script = PostScript {
            name: Some("probe".into()),
            script: "echo \"$IMG_NAME $DEBIMG_IMAGE_COUNT $DEBIMG_IN_CHROOT\" > \"$INSTALL_ROOT/probe\"\n"
                .into(),
            interpreter: "/bin/sh".into(),
            chroot: false,
            may_fail: false,
        };
        let r = Root::open(root.path()).unwrap();
        run_all(
            std::slice::from_ref(&script),
            &r,
            scratch.path(),
            "x",
            &[],
            false,
        )
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(root.path().join("probe")).unwrap(),
            "x 0 0\n"
        );
        assert_eq!(std::fs::read_dir(scratch.path()).unwrap().count(), 0);

        let failing = PostScript {
            script: "exit 3\n".into(),
            ..script.clone()
        };
        let err = run_all(
            std::slice::from_ref(&failing),
            &r,
            scratch.path(),
            "x",
            &[],
            false,
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("post script probe"), "{err:#}");
        let tolerated = PostScript {
            may_fail: true,
            ..failing
        };
        run_all(&[tolerated], &r, scratch.path(), "x", &[], false).unwrap();
        assert_eq!(std::fs::read_dir(scratch.path()).unwrap().count(), 0);
    }
}
