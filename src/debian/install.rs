//! The install stage's body: the chroot's API filesystems, apt's sources, pins and build-only
//! settings, `apt-get update`, the packages (offered from the checked package pool), and what
//! apt downloaded returned to the pool.

use std::path::Path;

use anyhow::{Context, Result};

use crate::cache::Cache;
use crate::debian::apt::{self, Apt, ReleaseMeta};
use crate::debian::configure::BuildOnlyFiles;
use crate::plan::Plan;
use crate::root::Root;
use crate::sys::mount::MountStack;

/// Installs the plan's packages into `root`; returns every repo's Release fields. The chroot's
/// API filesystems stay mounted in `mounts` (for configure); the archives' bind mount does not.
pub fn run(
    plan: &Plan,
    root: &Root,
    work: &Path,
    cache: Option<&Cache>,
    build_only: &mut BuildOnlyFiles,
    mounts: &mut MountStack,
    show: bool,
) -> Result<Vec<ReleaseMeta>> {
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
    let apt = Apt { root, show };
    apt.configure_and_update(plan, cache)?;
    // The repositories' indexes as apt just verified them, before any code from the packages
    // runs: what the pool offers and takes is checked against them.
    let index = match cache {
        Some(_) => apt.package_index()?,
        None => Default::default(),
    };
    if let Some(c) = cache {
        let o = c.offer_packages(&archives, &index)?;
        tracing::debug!(
            "{} cached packages ({} MiB) offered to apt, {} rejected",
            o.files,
            o.bytes >> 20,
            o.rejected
        );
    }
    let metas = apt.pin(plan)?;
    apt.exclude(&plan.exclude)?;
    let packages = if plan.skip_missing {
        apt.drop_missing(&plan.packages)?
    } else {
        plan.packages.clone()
    };
    let downgrades = apt::allows_downgrades(&plan.repos);
    apt.install(&packages, downgrades)?;
    apt.install_local(&plan.local_debs, downgrades)?;
    let purged = apt.purge_excluded(&plan.exclude)?;
    if !purged.is_empty() {
        tracing::info!("purged excluded packages: {}", purged.join(" "));
    }
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
