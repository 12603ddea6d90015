//! The bootstrap stage's body: the base system from the base-tree cache when it holds this
//! bootstrap, else from mmdebstrap or debootstrap, stored for the next build.

use std::path::Path;

use anyhow::{Context, Result};

use crate::cache::{self, Cache};
use crate::debian::configure::BuildOnlyFiles;
use crate::debian::trees::{self, Start, TreeContext};
use crate::debian::{debootstrap, mmdebstrap};
use crate::plan::{Backend, Plan};
use crate::root::Root;

/// Fills `root` with the base system, policy-rc.d in place before and after; or, with
/// `trees` and a cache holding one, with a cached installed tree (this build's own, or the
/// closest subset of it: [`trees`]). What the backend downloads stays in the workspace's
/// `debs/` for the package cache, which takes it only after checking it against the
/// repository's index (the bootstrap itself takes nothing from the cache). Returns where the
/// tree came from, for the install stage.
pub fn run(
    plan: &Plan,
    root: &Root,
    work: &Path,
    cache: Option<&Cache>,
    trees: bool,
    build_only: &BuildOnlyFiles,
    show: bool,
) -> Result<Bootstrapped> {
    build_only.install_policy(root)?;
    // dpkg reads dpkg.cfg.d as soon as the bootstrap installed it: no fsyncs from then on.
    build_only.install_dpkg_unsafe_io(root)?;
    let done = base_tree(plan, root, work, cache, trees, show)?;
    root.end_processes("the bootstrap")?;
    build_only.install_policy(root)?;
    Ok(done)
}

/// What the bootstrap stage leaves for the install stage.
#[derive(Debug, Default)]
pub struct Bootstrapped {
    /// Where the tree came from.
    pub start: Start,
    /// mmdebstrap ran in this build and left the lists it fetched and verified for the
    /// bootstrap repository, seconds ago (a base tree from the cache holds no lists).
    pub fresh_lists: bool,
}

fn base_tree(
    plan: &Plan,
    root: &Root,
    work: &Path,
    cache: Option<&Cache>,
    use_trees: bool,
    show: bool,
) -> Result<Bootstrapped> {
    let keyring = bootstrap_keyring(plan, work)?;
    let keyring = keyring.as_deref();
    let fresh_lists = plan.backend == Backend::Mmdebstrap;
    let Some(cache) = cache else {
        backend(plan, root, None, keyring, show)?;
        return Ok(Bootstrapped {
            start: Start::Uncached,
            fresh_lists,
        });
    };
    let digest = match cache::release_digest(plan, work) {
        Ok(d) => Some(d),
        Err(e) => {
            tracing::warn!("not using the base-tree cache: {e:#}");
            None
        }
    };
    let key = digest.as_deref().map(|d| cache::base_key(plan, d));
    let ctx = match (&key, &digest) {
        (Some(k), Some(d)) if use_trees => match trees::release_digests(plan, work, d) {
            Ok(d) => Some(TreeContext {
                base_key: k.clone(),
                context: trees::context(plan, k, &d),
                requested: trees::requested(plan),
            }),
            Err(e) => {
                tracing::warn!("not using the installed-tree cache: {e:#}");
                None
            }
        },
        _ => None,
    };
    if let Some(ctx) = &ctx
        && let Some(start) = cached_tree(plan, cache, ctx, root)?
    {
        return Ok(Bootstrapped {
            start,
            fresh_lists: false,
        });
    }
    let start = ctx.map_or(Start::Uncached, |ctx| Start::Base { ctx });
    if let Some(base) = key.as_deref().and_then(|k| cache.verified_base(k)) {
        tracing::info!("base tree from the cache ({})", base.path().display());
        base.restore(root.path())?;
        return Ok(Bootstrapped {
            start,
            fresh_lists: false,
        });
    }
    let debs = work.join("debs");
    std::fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
    backend(plan, root, Some(&debs), keyring, show)?;
    if let Some(k) = key {
        let tar = cache.store_base(&k, root.path())?;
        tracing::info!("base tree cached as {}", tar.display());
    }
    Ok(Bootstrapped { start, fresh_lists })
}

/// The cached installed tree this build starts from, restored into `root`: its own key's, else
/// (when [`trees::subsets_allowed`]) the closest subset's; None when the cache holds neither.
fn cached_tree(
    plan: &Plan,
    cache: &Cache,
    ctx: &TreeContext,
    root: &Root,
) -> Result<Option<Start>> {
    let key = ctx.key();
    if let Some((tar, info)) = cache.verified_tree(&key)
        && info.context == ctx.context
        && info.requested == ctx.requested
    {
        tracing::info!(
            "installed tree from the cache ({}): the same packages, apt has nothing to do",
            tar.path().display()
        );
        tar.restore(root.path())?;
        return Ok(Some(Start::Tree {
            ctx: ctx.clone(),
            key,
            info: Box::new(info),
            exact: true,
        }));
    }
    if !trees::subsets_allowed(plan) {
        return Ok(None);
    }
    let Some((key, _)) = trees::closest_subset(cache.tree_infos(), ctx) else {
        return Ok(None);
    };
    let Some((tar, info)) = cache.verified_tree(&key) else {
        return Ok(None);
    };
    tracing::info!(
        "installed tree from the cache ({}): {} of the {} packages asked for; apt installs the rest",
        tar.path().display(),
        info.requested.len(),
        ctx.requested.len()
    );
    tar.restore(root.path())?;
    Ok(Some(Start::Tree {
        ctx: ctx.clone(),
        key,
        info: Box::new(info),
        exact: false,
    }))
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
