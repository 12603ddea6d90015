//! Running debootstrap into the mounted image tree.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

use crate::cmd::CommandRunExt;
use crate::plan::Plan;
use crate::root::Root;

/// The debootstrap command line for a plan (pure, so it can be tested).
pub fn command(
    plan: &Plan,
    root: &Path,
    cache_dir: Option<&Path>,
    keyring: Option<&Path>,
) -> Command {
    let mut cmd = Command::new("debootstrap");
    if let Some(v) = plan.variant.debootstrap_arg() {
        cmd.arg(format!("--variant={v}"));
    }
    cmd.arg(format!("--arch={}", plan.arch));
    let components: Vec<&str> = plan.repos[0].section.split_whitespace().collect();
    cmd.arg(format!("--components={}", components.join(",")));
    if !plan.bootstrap_include.is_empty() {
        cmd.arg(format!("--include={}", plan.bootstrap_include.join(",")));
    }
    if let Some(dir) = cache_dir {
        cmd.arg(format!("--cache-dir={}", dir.display()));
    }
    if let Some(k) = keyring {
        cmd.arg(format!("--keyring={}", k.display()));
    }
    if plan.repos[0].trusted {
        // As the spec asks explicitly: the bootstrap repository without a signature check.
        cmd.arg("--no-check-gpg");
    }
    cmd.arg(&plan.suite).arg(root).arg(&plan.bootstrap_mirror);
    clean_env(&mut cmd, plan);
    cmd
}

/// The environment of a bootstrap program: a fixed PATH and locale, and the plan's proxies.
pub fn clean_env(cmd: &mut Command, plan: &Plan) {
    cmd.env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("LC_ALL", "C");
    if let Some(e) = plan.source_date_epoch {
        cmd.env(crate::reproducible::ENV, e.to_string());
    }
    if let Some(p) = &plan.proxies.http {
        cmd.env("http_proxy", p);
    }
    if let Some(p) = &plan.proxies.https {
        cmd.env("https_proxy", p);
    }
    if !plan.proxies.direct.is_empty() {
        cmd.env("no_proxy", plan.proxies.direct.join(","));
    }
}

/// Bootstraps `root` (which already holds the mounted image tree); with `cache_dir`, the
/// packages it downloads stay there (for the package cache, which checks them first).
pub fn run(
    plan: &Plan,
    root: &Root,
    cache_dir: Option<&Path>,
    keyring: Option<&Path>,
    show: bool,
) -> Result<()> {
    command(plan, root.path(), cache_dir, keyring)
        .run_streaming(show)
        .with_context(|| {
            format!(
                "bootstrapping {} into {}",
                plan.suite,
                root.path().display()
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmd::command_line;

    #[test]
    fn the_first_repos_key_or_trust_reaches_debootstrap() {
        let mut plan = Plan::for_test("version: 1\nname: t\nsuite: bookworm\nkind: tarball\n");
        let plain = command_line(&command(&plan, Path::new("/r"), None, None));
        assert!(
            !plain.contains("--keyring") && !plain.contains("--no-check-gpg"),
            "{plain}"
        );
        let keyed = command_line(&command(
            &plan,
            Path::new("/r"),
            None,
            Some(Path::new("/w/k.gpg")),
        ));
        assert!(keyed.contains(" --keyring=/w/k.gpg "), "{keyed}");
        plan.repos[0].trusted = true;
        let trusted = command_line(&command(&plan, Path::new("/r"), None, None));
        assert!(trusted.contains(" --no-check-gpg "), "{trusted}");
    }
}
