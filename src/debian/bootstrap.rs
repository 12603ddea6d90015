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
    let Some(cache) = cache else {
        return backend(plan, root, None, show);
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
    backend(plan, root, Some(&debs), show)?;
    if let Some(k) = key {
        let tar = cache.store_base(&k, root.path())?;
        tracing::info!("base tree cached as {}", tar.display());
    }
    Ok(())
}

fn backend(plan: &Plan, root: &Root, debs: Option<&Path>, show: bool) -> Result<()> {
    match plan.backend {
        Backend::Debootstrap => debootstrap::run(plan, root, debs, show),
        Backend::Mmdebstrap => mmdebstrap::run(plan, root, debs, show),
    }
}
