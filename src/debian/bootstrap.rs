//! The bootstrap stage's body: the base system from the base-tree cache when it holds this
//! bootstrap, else from mmdebstrap or debootstrap, stored for the next build.

use std::path::Path;

use anyhow::{Context, Result};

use crate::cache::{self, Cache};
use crate::debian::configure::BuildOnlyFiles;
use crate::debian::{debootstrap, mmdebstrap};
use crate::plan::{Backend, Plan};
use crate::root::Root;

/// Fills `root` with the base system, policy-rc.d in place before and after. What the backend
/// downloads stays in the workspace's `debs/` for the package cache, which takes it only after
/// checking it against the repository's index (the bootstrap itself takes nothing from the
/// cache).
pub fn run(
    plan: &Plan,
    root: &Root,
    work: &Path,
    cache: Option<&Cache>,
    build_only: &BuildOnlyFiles,
    show: bool,
) -> Result<()> {
    build_only.install_policy(root)?;
    // dpkg reads dpkg.cfg.d as soon as the bootstrap installed it: no fsyncs from then on.
    build_only.install_dpkg_unsafe_io(root)?;
    base_tree(plan, root, work, cache, show)?;
    root.end_processes("the bootstrap")?;
    build_only.install_policy(root)
}

fn base_tree(
    plan: &Plan,
    root: &Root,
    work: &Path,
    cache: Option<&Cache>,
    show: bool,
) -> Result<()> {
    let keyring = bootstrap_keyring(plan, work)?;
    let keyring = keyring.as_deref();
    let Some(cache) = cache else {
        return backend(plan, root, None, keyring, show);
    };
    let key = match cache::release_digest(plan, work) {
        Ok(d) => Some(cache::base_key(plan, &d)),
        Err(e) => {
            tracing::warn!("not using the base-tree cache: {e:#}");
            None
        }
    };
    if let Some(base) = key.as_deref().and_then(|k| cache.verified_base(k)) {
        tracing::info!("base tree from the cache ({})", base.path().display());
        return base.restore(root.path());
    }
    let debs = work.join("debs");
    std::fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
    backend(plan, root, Some(&debs), keyring, show)?;
    if let Some(k) = key {
        let tar = cache.store_base(&k, root.path())?;
        tracing::info!("base tree cached as {}", tar.display());
    }
    Ok(())
}

fn backend(
    plan: &Plan,
    root: &Root,
    debs: Option<&Path>,
    keyring: Option<&Path>,
    show: bool,
) -> Result<()> {
    match plan.backend {
        Backend::Debootstrap => debootstrap::run(plan, root, debs, keyring, show),
        Backend::Mmdebstrap => mmdebstrap::run(plan, root, debs, keyring, show),
    }
}

/// The first repo's own keyring (`key:`), written into the build's private workspace for the
/// bootstrap program, which then checks the repository against it instead of the host's.
fn bootstrap_keyring(plan: &Plan, work: &Path) -> Result<Option<std::path::PathBuf>> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let Some(ring) = &plan.repos[0].keyring else {
        return Ok(None);
    };
    let path = work.join("bootstrap-keyring.gpg");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(ring)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(Some(path))
}
