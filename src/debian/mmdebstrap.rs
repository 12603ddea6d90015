//! Running mmdebstrap into the mounted image tree: apt resolves and downloads, dpkg installs in
//! one pass with its fsyncs off, about twice as fast as debootstrap.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

use crate::cmd::CommandRunExt;
use crate::debian::debootstrap::clean_env;
use crate::plan::Plan;
use crate::root::Root;

/// What mmdebstrap's `--dpkgopt` leaves in the tree; removed after the bootstrap (the build
/// puts its own build-only dpkg setting in place and removes that one at the end).
pub const DPKG_CFG: &str = "etc/dpkg/dpkg.cfg.d/99mmdebstrap";

/// The mmdebstrap command line for a plan (pure, so it can be tested). With `debs`, the
/// packages it downloaded are copied out to that directory (for the package cache, which
/// checks them first). None go in: a sync-in of pooled files could not be checked against the
/// repository's index before apt took them.
pub fn command(plan: &Plan, root: &Path, debs: Option<&Path>, keyring: Option<&Path>) -> Command {
    let mut cmd = Command::new("mmdebstrap");
    cmd.args(["--mode=root", "--format=directory", "--skip=check/empty"]);
    // The lists apt just fetched and verified stay for the install stage's `apt-get update`,
    // which then fetches again only what changed since (the stored base tree leaves them out).
    cmd.arg("--skip=cleanup/apt/lists");
    cmd.arg(format!(
        "--variant={}",
        plan.variant.debootstrap_arg().unwrap_or("standard")
    ));
    cmd.arg(format!("--architectures={}", plan.arch));
    let components: Vec<&str> = plan.repos[0].section.split_whitespace().collect();
    cmd.arg(format!("--components={}", components.join(",")));
    if !plan.bootstrap_include.is_empty() {
        cmd.arg(format!("--include={}", plan.bootstrap_include.join(",")));
    }
    cmd.arg("--dpkgopt=force-unsafe-io");
    if let Some(k) = keyring {
        cmd.arg(format!("--keyring={}", k.display()));
    }
    // The workspace is private (0700): apt's `_apt` user cannot reach the tree, so mmdebstrap
    // would download as root anyway, with a warning on every build. Say so instead.
    cmd.arg("--aptopt=APT::Sandbox::User \"root\"");
    if let Some(dir) = debs {
        let dir = dir.display();
        cmd.arg("--skip=essential/unlink");
        cmd.arg(format!(
            "--customize-hook=sync-out /var/cache/apt/archives {dir}"
        ));
    }
    cmd.arg(&plan.suite).arg(root);
    if plan.repos[0].trusted {
        // As the spec asks explicitly (or fuel-agent's input, which checked nothing): the
        // bootstrap repository without a signature check, in a sources line of its own.
        cmd.arg(format!(
            "deb [trusted=yes] {} {} {}",
            plan.bootstrap_mirror,
            plan.suite,
            components.join(" ")
        ));
    } else {
        cmd.arg(&plan.bootstrap_mirror);
    }
    clean_env(&mut cmd, plan);
    cmd
}

/// Bootstraps `root` (which already holds the mounted image tree).
pub fn run(
    plan: &Plan,
    root: &Root,
    debs: Option<&Path>,
    keyring: Option<&Path>,
    show: bool,
) -> Result<()> {
    let mut cmd = command(plan, root.path(), debs, keyring);
    // mmdebstrap keeps a gpg home under TMPDIR; in the workspace it goes with the workspace even
    // when mmdebstrap is killed before it can remove it (one was found left in /tmp).
    if let Some(ws) = root.path().parent() {
        let tmp = ws.join("tmp");
        std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        cmd.env("TMPDIR", &tmp);
    }
    cmd.run_streaming(show).with_context(|| {
        format!(
            "bootstrapping {} into {} with mmdebstrap",
            plan.suite,
            root.path().display()
        )
    })?;
    root.remove_file(DPKG_CFG).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmd::command_line;

    #[test]
    fn the_first_repos_key_or_trust_reaches_mmdebstrap() {
        let mut plan = Plan::for_test("version: 1\nname: t\nsuite: bookworm\nkind: tarball\n");
        let plain = command_line(&command(&plan, Path::new("/r"), None, None));
        assert!(
            plain.ends_with(" bookworm /r http://m.example/debian"),
            "{plain}"
        );
        assert!(!plain.contains("--keyring"), "{plain}");
        let keyed = command_line(&command(
            &plan,
            Path::new("/r"),
            None,
            Some(Path::new("/w/k.gpg")),
        ));
        assert!(keyed.contains(" --keyring=/w/k.gpg "), "{keyed}");
        plan.repos[0].trusted = true;
        let trusted = command_line(&command(&plan, Path::new("/r"), None, None));
        assert!(
            trusted.ends_with(" /r 'deb [trusted=yes] http://m.example/debian bookworm main'"),
            "{trusted}"
        );
    }
}
