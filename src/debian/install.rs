//! The install stage's body: the chroot's API filesystems, apt's sources, pins and build-only
//! settings, `apt-get update`, the packages (offered from the checked package pool), and what
//! apt downloaded returned to the pool.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};

use crate::cache::{Cache, TreeInfo};
use crate::debian::apt::{self, Apt};
use crate::debian::bootstrap::Bootstrapped;
use crate::debian::configure::BuildOnlyFiles;
use crate::debian::release::ReleaseMeta;
use crate::debian::trees::{self, Start};
use crate::plan::Plan;
use crate::root::Root;
use crate::sys::mount::MountStack;

/// The files whose content depends on the order in which a whole install ran maintainer
/// scripts (`adduser --system`, `add-shell`).
const ACCOUNT_FILES: [&str; 5] = [
    "etc/passwd",
    "etc/group",
    "etc/shadow",
    "etc/gshadow",
    "etc/shells",
];

/// A warm install that did not end where a cold one would have: the build starts again from the
/// base.
#[derive(Debug)]
struct TreeMismatch(String);

impl std::fmt::Display for TreeMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TreeMismatch {}

/// Installs the plan's packages into `root`, which holds what `start` says; returns every
/// repo's Release fields. The chroot's API filesystems stay mounted in `mounts` (for
/// configure); the archives' bind mount does not. From a cached tree of the build's own key
/// nothing is installed; from a subset, apt installs the difference and the result must be
/// what a cold install would give, else the tree is emptied and the build starts again from
/// the base (`empty_tree` empties it as the image kind left it after mounting: its own
/// filesystems stay). With an installed-tree context, the result is stored in the cache.
#[allow(clippy::too_many_arguments)]
pub fn run(
    plan: &Plan,
    root: &Root,
    work: &Path,
    cache: Option<&Cache>,
    boot: &mut Bootstrapped,
    build_only: &mut BuildOnlyFiles,
    mounts: &mut MountStack,
    empty_tree: &dyn Fn(&Root) -> Result<()>,
    show: bool,
) -> Result<Vec<ReleaseMeta>> {
    if let Start::Tree { exact: true, .. } = boot.start {
        root.mount_api_filesystems(mounts)?;
        build_only.install_resolv_conf(root)?;
        build_only.install_dpkg_unsafe_io(root)?;
        apt::write_build_conf(root, plan)?;
        // The Release fields from the lists the tree holds: the same files, as the key says.
        return Apt {
            root,
            show,
            defer_initramfs: false,
        }
        .pin(plan);
    }
    let depth = mounts.len();
    match install(plan, root, work, cache, boot, build_only, mounts, show) {
        Err(e) if e.downcast_ref::<TreeMismatch>().is_some() => {
            let Start::Tree { ctx, .. } = std::mem::take(&mut boot.start) else {
                return Err(e);
            };
            tracing::warn!("{e}: starting again from the base tree");
            while mounts.len() > depth {
                mounts.pop().context("a mount went missing")?.close()?;
            }
            empty_tree(root)?;
            // The build-only files went with the tree.
            *build_only = BuildOnlyFiles::new();
            let again =
                crate::debian::bootstrap::run(plan, root, work, cache, false, build_only, show)?;
            *boot = Bootstrapped {
                start: Start::Base { ctx },
                fresh_lists: again.fresh_lists,
            };
            install(plan, root, work, cache, boot, build_only, mounts, show)
        }
        r => r,
    }
}

#[allow(clippy::too_many_arguments)]
fn install(
    plan: &Plan,
    root: &Root,
    work: &Path,
    cache: Option<&Cache>,
    boot: &Bootstrapped,
    build_only: &mut BuildOnlyFiles,
    mounts: &mut MountStack,
    show: bool,
) -> Result<Vec<ReleaseMeta>> {
    let start = &boot.start;
    // The dpkg status of the base the install starts from (or the cached tree started from):
    // a later build that starts from this one's tree simulates a cold install from it.
    let base_status = match start {
        Start::Uncached => String::new(),
        Start::Base { .. } => root.read_to_string("var/lib/dpkg/status")?,
        Start::Tree { info, .. } => info.base_status.clone(),
    };
    let depth = mounts.len();
    root.mount_api_filesystems(mounts)?;
    build_only.install_resolv_conf(root)?;
    build_only.install_dpkg_unsafe_io(root)?;
    // apt downloads into the workspace, seeded from and returned to the package cache: the
    // image's filesystem never holds the archives.
    let archives = work.join("archives");
    std::fs::create_dir_all(archives.join("partial"))
        .with_context(|| format!("creating {}/partial", archives.display()))?;
    mounts.push(root.bind(&archives, "/var/cache/apt/archives")?);
    // apt runs in the chroot: a `file://` repository's directory is there only while it runs.
    let repo_binds = FileRepoBinds::make(plan, root)?;
    let defer_initramfs = crate::debian::initramfs::may_defer(root)?;
    let apt = Apt {
        root,
        show,
        defer_initramfs,
    };
    // A cached tree of the same context holds the sources, keys and lists apt verified for the
    // very Release files the key names: no update (only the build settings, proxies among
    // them, are this build's).
    let from_tree = match start {
        Start::Tree { info, .. } => Some(info),
        _ => None,
    };
    let bootstrap_lists = if from_tree.is_some() {
        apt::write_build_conf(root, plan)?;
        tracing::info!("apt lists: the installed tree's (the same Release files)");
        false
    } else {
        apt.configure_and_update(plan, cache, boot.fresh_lists)?
    };
    // The repositories' indexes as apt verified them, before any code from the packages
    // runs: what the pool offers and takes is checked against them.
    let index = match cache {
        Some(_) => apt.package_index()?,
        None => Default::default(),
    };
    let metas = apt.pin(plan)?;
    if let Some(lock) = &plan.lock {
        crate::debian::lock::apply(lock, root, &plan.repos, &plan.lock_source)?;
    }
    apt.exclude(&plan.exclude)?;
    let packages = if plan.skip_missing {
        apt.drop_missing(&plan.packages)?
    } else {
        plan.packages.clone()
    };
    if let Some(c) = cache {
        // From a tree, only what it does not have: the rest is installed already.
        let missing = from_tree.map(|info| move |name: &str| !info.installed.contains_key(name));
        let wanted = missing.as_ref().map(|f| f as &dyn Fn(&str) -> bool);
        let o = c.offer_packages_of(&archives, &index, wanted)?;
        tracing::debug!(
            "{} cached packages ({} MiB) offered to apt, {} rejected",
            o.files,
            o.bytes >> 20,
            o.rejected
        );
    }
    // Users, groups and shells the added packages create get ids and places in the order of
    // the whole install, which a warm install cannot reproduce: such a difference goes back to
    // the base.
    let accounts = |root: &Root| -> Result<Vec<Option<Vec<u8>>>> {
        ACCOUNT_FILES
            .iter()
            .map(|f| root.exists(f).then(|| root.read(f)).transpose())
            .collect()
    };
    let accounts_before = from_tree.map(|_| accounts(root)).transpose()?;
    // A lock's pins may take a version below the candidate.
    let downgrades = apt::allows_downgrades(&plan.repos) || plan.lock.is_some();
    let (base_current, predicted) = match from_tree {
        // From a subset's tree: what a cold install would end with, by apt's simulation from
        // the base's status, run beside the install (it reads the lists and a status file of
        // its own). The dist-upgrade a cold install begins with changes nothing here: the
        // simulation says so (or the result goes back to the base).
        Some(info) => {
            let (installed, predicted) = std::thread::scope(|s| {
                let sim = s.spawn(|| apt.predict_from(&base_status, info.base_current, &packages));
                let installed = apt.install_leaving_processes(&packages, downgrades);
                let predicted = sim
                    .join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("the apt simulation panicked")));
                (installed, predicted)
            });
            root.end_processes("apt-get install")?;
            installed?;
            let p = predicted?.ok_or_else(|| {
                TreeMismatch(
                    "the base tree is not up to date with the repositories: a cold install \
                     would upgrade it, which no simulation of the install alone shows"
                        .into(),
                )
            })?;
            let outside: BTreeMap<String, String> = info
                .installed
                .iter()
                .filter(|(n, v)| p.get(*n) != Some(*v))
                .map(|(n, v)| (n.clone(), v.clone()))
                .collect();
            if !outside.is_empty() {
                return Err(TreeMismatch(format!(
                    "the cached tree has what a cold install would not: {}",
                    trees::differences(&outside, &BTreeMap::new())
                ))
                .into());
            }
            (true, Some(p))
        }
        // The bootstrap installed the base from the very lists apt has, for the only
        // repository: a dist-upgrade has nothing to do (the pins weigh that repository's
        // versions against themselves). A lock's pins may want other versions than the
        // bootstrap took: the dist-upgrade below brings them.
        None if bootstrap_lists && plan.lock.is_none() => {
            tracing::debug!("no dist-upgrade: the base was installed from these lists");
            apt.install(&packages, downgrades)?;
            (matches!(start, Start::Base { .. }), None)
        }
        // From the base, whether the dist-upgrade changed anything is recorded for the builds
        // that start from this one's tree.
        None => {
            apt.dist_upgrade(downgrades)?;
            let current = match start {
                Start::Base { .. } => {
                    trees::status_installed(&base_status)
                        == trees::status_installed(&root.read_to_string("var/lib/dpkg/status")?)
                }
                _ => false,
            };
            apt.install(&packages, downgrades)?;
            (current, None)
        }
    };
    apt.install_local(&plan.local_debs, downgrades)?;
    let purged = apt.purge_excluded(&plan.exclude)?;
    if !purged.is_empty() {
        tracing::info!("purged excluded packages: {}", purged.join(" "));
    }
    // apt ran with the kernel hooks' switch off: each new kernel's initramfs is made at the
    // configure stage, with the image's files (`initramfs::complete`).
    if let Some(c) = cache {
        let mut stored = c.store_packages(&archives, &index)?;
        let debs = work.join("debs");
        if debs.is_dir() {
            let b = c.store_packages(&debs, &index)?;
            stored.files += b.files;
            stored.rejected += b.rejected;
        }
        tracing::debug!(
            "{} new packages added to the cache ({} not matching an index)",
            stored.files,
            stored.rejected
        );
    }
    repo_binds.close(root)?;
    let m = mounts.pop().context("the archives bind mount is gone")?;
    m.close()?;
    // A package may have made /etc/resolv.conf its own link (systemd-resolved, resolvconf):
    // set aside now, as a link the base brought is, and put back when the image is finished.
    build_only.install_resolv_conf(root)?;
    if let Some(before) = accounts_before
        && before != accounts(root)?
    {
        return Err(TreeMismatch(
            "the packages added to the cached tree created users, groups or shells, whose ids \
             and order depend on the order of a whole install"
                .into(),
        )
        .into());
    }
    let ctx = match start {
        Start::Uncached => return Ok(metas),
        Start::Base { ctx } | Start::Tree { ctx, .. } => ctx,
    };
    let installed = apt.installed()?;
    // The fault tests take the way back to the base with `install:tree-mismatch`.
    let injected = std::env::var(crate::stage::FAULT_ENV).as_deref() == Ok("install:tree-mismatch");
    if let Some(want) = predicted
        && (installed != want || injected)
    {
        return Err(TreeMismatch(format!(
            "the install from the cached tree differs from a cold one: {}",
            if injected {
                format!(
                    "injected ({}=install:tree-mismatch)",
                    crate::stage::FAULT_ENV
                )
            } else {
                trees::differences(&installed, &want)
            }
        ))
        .into());
    }
    if let Some(c) = cache {
        let info = TreeInfo {
            context: ctx.context.clone(),
            requested: ctx.requested.clone(),
            installed,
            base_status,
            base_current,
        };
        // The cache is an optimization: a tree that could not be stored is a warning. The
        // chroot's API filesystems are unmounted meanwhile: tar would take the mode of a
        // mounted proc or sysfs for the image's own directory.
        while mounts.len() > depth {
            mounts.pop().context("a mount went missing")?.close()?;
        }
        let t = std::time::Instant::now();
        let stored = c.store_tree(&ctx.key(), root.path(), &info);
        root.mount_api_filesystems(mounts)?;
        match stored {
            Ok(tar) => tracing::info!(
                "installed tree cached as {} in {:.1}s",
                tar.display(),
                t.elapsed().as_secs_f64()
            ),
            Err(e) => tracing::warn!("not caching the installed tree: {e:#}"),
        }
    }
    Ok(metas)
}

/// The `file://` repositories' host directories, bind-mounted read-only at the same paths in
/// the tree (where the image's sources say they are), and the directories made for them.
struct FileRepoBinds {
    mounts: MountStack,
    /// Directories that were not in the tree, parents first: removed after the unmount.
    made: Vec<String>,
}

impl FileRepoBinds {
    fn make(plan: &Plan, root: &Root) -> Result<FileRepoBinds> {
        let mut binds = FileRepoBinds {
            mounts: MountStack::default(),
            made: Vec::new(),
        };
        // Parents first, so a nested repo is found inside its parent's bind.
        let mut repos: Vec<(&crate::plan::PlannedRepo, String)> = plan
            .repos
            .iter()
            .filter_map(|r| Some((r, file_repo_dir(&r.uri)?)))
            .collect();
        repos.sort_by_key(|(_, d)| d.len());
        let mut seen = Vec::new();
        for (r, dir) in repos {
            // Already visible through another repo's bind (`/srv/a` shows `/srv/a/b`).
            if seen
                .iter()
                .any(|s: &String| dir == *s || dir.starts_with(&format!("{s}/")))
            {
                continue;
            }
            seen.push(dir.clone());
            let host = Path::new(&dir);
            if !host.is_dir() {
                anyhow::bail!(
                    "repo `{}`: {} is not a directory on the build host",
                    r.name,
                    r.uri
                );
            }
            // Over a directory of the image, the bind would hide what the packages install.
            if dir == "/" || root.symlink_metadata(&dir)?.is_some() {
                anyhow::bail!(
                    "repo `{}`: {} is a path the image itself has: apt reads a `file://` repository at the same path in the image, so move it to a path the image does not use (e.g. under /srv)",
                    r.name,
                    r.uri
                );
            }
            let mut prefix = String::new();
            for comp in dir
                .trim_start_matches('/')
                .split('/')
                .filter(|c| !c.is_empty())
            {
                prefix.push('/');
                prefix.push_str(comp);
                if root.symlink_metadata(&prefix)?.is_none() {
                    binds.made.push(prefix.clone());
                }
            }
            let m = root
                .bind(host, &dir)
                .with_context(|| format!("repo `{}`: making {} visible to apt", r.name, r.uri))?;
            {
                use nix::mount::MsFlags as F;
                m.remount(
                    F::MS_BIND | F::MS_RDONLY | F::MS_NOSUID | F::MS_NODEV | F::MS_NOEXEC,
                    None,
                )?;
            }
            binds.mounts.push(m);
        }
        Ok(binds)
    }

    fn close(mut self, root: &Root) -> Result<()> {
        self.mounts.unmount()?;
        // Only what is still empty: a package may have put files in a directory made here.
        for dir in self.made.iter().rev() {
            if !root.remove_empty_dir(dir)? {
                tracing::debug!("{dir} is kept: something in the image uses it");
            }
        }
        Ok(())
    }
}

/// The host directory of a `file://` URI (`file:///srv/repo` → `/srv/repo`).
fn file_repo_dir(uri: &str) -> Option<String> {
    let path = uri.strip_prefix("file://")?;
    let path = path.trim_end_matches('/');
    Some(if path.is_empty() {
        "/".into()
    } else {
        path.into()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_repo_never_hides_a_path_of_the_image() {
        let d = tempfile::tempdir().unwrap();
        let host_repo = tempfile::tempdir().unwrap();
        let root = Root::open(d.path()).unwrap();
        let plan = |dir: &Path| {
            Plan::for_test(&format!(
                "version: 1\nname: t\nsuite: bookworm\nkind: tarball\nrepos:\n  - {{name: d, suite: bookworm}}\n  - {{name: local, uri: 'file://{}', suite: ./, trusted: true}}\n",
                dir.display()
            ))
        };
        let e = FileRepoBinds::make(&plan(Path::new("/nonexistent/repo")), &root)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("repo `local`") && e.contains("not a directory"),
            "{e}"
        );
        root.create_dir_all(host_repo.path()).unwrap();
        let e = FileRepoBinds::make(&plan(host_repo.path()), &root)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("repo `local`") && e.contains("the image itself has"),
            "{e}"
        );
        assert_eq!(file_repo_dir("file:///srv/r/"), Some("/srv/r".into()));
        assert_eq!(file_repo_dir("http://m.example/r"), None);
    }
}
