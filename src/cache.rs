//! Caches shared by builds under `--cache-dir`: downloaded packages and bootstrapped base trees.
//!
//! Every write is a complete file renamed (or hard-linked) into place, so concurrent builds never
//! see a partial entry and need no lock. Packages are verified by apt and debootstrap against the
//! repository's hashes as usual; a base tree is keyed on everything that decides the bootstrap,
//! including the digest of the mirror's Release file, so a mirror update invalidates it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use crate::cmd::CommandRunExt;
use crate::plan::{Plan, hex};

/// The cache directory and its parts.
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
}

/// Entries of one cache part, for `debimg cache list`.
#[derive(Debug, Clone)]
pub struct Entry {
    pub path: PathBuf,
    pub size: u64,
    pub age_secs: u64,
}

impl Cache {
    /// Opens (creating) the cache at `dir`.
    pub fn open(dir: &Path) -> Result<Cache> {
        for sub in ["packages", "bases", "lists"] {
            let d = dir.join(sub);
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        }
        Ok(Cache {
            dir: dir.to_path_buf(),
        })
    }

    /// Where downloaded .deb files are pooled.
    pub fn packages_dir(&self) -> PathBuf {
        self.dir.join("packages")
    }

    /// Where bootstrapped base trees are kept as tar files.
    pub fn bases_dir(&self) -> PathBuf {
        self.dir.join("bases")
    }

    /// Where apt's index files are kept, one version directory per set of sources.
    pub fn lists_dir(&self) -> PathBuf {
        self.dir.join("lists")
    }

    /// Copies the cached apt lists for `key` into the image's lists directory (keeping their
    /// times, which apt sends as If-Modified-Since, so an unchanged mirror answers "Hit" and
    /// nothing is downloaded). Returns how many files; a missing or vanishing entry is a miss.
    pub fn restore_lists(&self, key: &str, root: &crate::root::Root) -> Result<usize> {
        let Ok(version) = std::fs::read_link(self.lists_dir().join(key)) else {
            return Ok(0);
        };
        if version.components().count() != 1 {
            return Ok(0);
        }
        let dir = self.lists_dir().join(version);
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return Ok(0);
        };
        let mut n = 0;
        for e in rd.flatten() {
            let name = e.file_name();
            if name == "lock" || !e.file_type().is_ok_and(|t| t.is_file()) {
                continue;
            }
            // A store replacing this version may remove it under us: a miss, not an error.
            let Ok(mut from) = crate::root::open_host_regular(&e.path()) else {
                continue;
            };
            let Ok(mtime) = from.metadata().and_then(|m| m.modified()) else {
                continue;
            };
            let dest = format!(
                "{}/{}",
                crate::debian::apt::LISTS_DIR,
                name.to_string_lossy()
            );
            root.write_with(&dest, 0o644, crate::root::Owner::ROOT, |f| {
                std::io::copy(&mut from, f)?;
                f.set_modified(mtime)?;
                Ok(())
            })?;
            n += 1;
        }
        Ok(n)
    }

    /// Stores the image's apt lists as the new version for `key`: a fresh directory, then the
    /// `key` symlink renamed over the old one, so readers see one version or the other. Only
    /// regular files are read out of the image.
    pub fn store_lists(&self, key: &str, root: &crate::root::Root) -> Result<()> {
        let token = crate::sys::unique_token();
        let version = format!("{key}.{token}");
        let dir = self.lists_dir().join(&version);
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let lists = crate::debian::apt::LISTS_DIR;
        for e in root.read_dir(lists)? {
            let name = e.name.to_string_lossy().into_owned();
            if name == "lock" || !e.file_type.is_file() {
                continue;
            }
            let src = format!("{lists}/{name}");
            let mtime = root.symlink_metadata(&src)?.and_then(|m| m.modified().ok());
            let dest = dir.join(&name);
            root.copy_out(&src, &dest)?;
            if let Some(t) = mtime {
                std::fs::File::options()
                    .write(true)
                    .open(&dest)
                    .and_then(|f| f.set_modified(t))
                    .with_context(|| format!("setting the time of {}", dest.display()))?;
            }
        }
        let link = self.lists_dir().join(key);
        let old = std::fs::read_link(&link).ok();
        let tmp_link = self.lists_dir().join(format!(".{key}.link-{token}"));
        std::os::unix::fs::symlink(&version, &tmp_link)
            .with_context(|| format!("linking {}", tmp_link.display()))?;
        std::fs::rename(&tmp_link, &link)
            .with_context(|| format!("moving {} into place", link.display()))?;
        if let Some(old) =
            old.filter(|o| o.as_os_str() != version.as_str() && o.components().count() == 1)
        {
            // A build copying from it right now just misses the cache.
            let _ = crate::sys::mount::remove_dir_all_safe(&self.lists_dir().join(old));
        }
        Ok(())
    }

    /// Fills `dest` with every pooled .deb (hard links, or copies across filesystems).
    pub fn link_packages_into(&self, dest: &Path) -> Result<usize> {
        std::fs::create_dir_all(dest).with_context(|| format!("creating {}", dest.display()))?;
        share_debs(&self.packages_dir(), dest)
    }

    /// Adds every .deb in `src` that the pool lacks.
    pub fn store_packages_from(&self, src: &Path) -> Result<usize> {
        share_debs(src, &self.packages_dir())
    }

    /// The base tree cached under `key`, if any.
    pub fn base(&self, key: &str) -> Option<PathBuf> {
        let p = self.bases_dir().join(format!("{key}.tar"));
        p.is_file().then_some(p)
    }

    /// Stores the tree at `root` (spanning its mounts) as the base for `key`.
    pub fn store_base(&self, key: &str, root: &Path) -> Result<PathBuf> {
        let dest = self.bases_dir().join(format!("{key}.tar"));
        let tmp = self
            .bases_dir()
            .join(format!(".{key}.tar.tmp-{}", crate::sys::unique_token()));
        let res = Command::new("tar")
            .args(TAR_COMMON)
            .args([
                "--create",
                "--exclude=./proc/*",
                "--exclude=./sys/*",
                "--exclude=./dev/pts/*",
                "--exclude=lost+found",
                "--exclude=./var/cache/apt/archives/*.deb",
                "--file",
            ])
            .arg(&tmp)
            .arg("-C")
            .arg(root)
            .arg(".")
            .run()
            .with_context(|| format!("archiving the base tree {}", root.display()))
            .and_then(|()| {
                std::fs::rename(&tmp, &dest)
                    .with_context(|| format!("moving {} into place", dest.display()))
            });
        if res.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        res.map(|()| dest)
    }

    /// Unpacks the base tree `tar` into `root`.
    pub fn restore_base(tar: &Path, root: &Path) -> Result<()> {
        Command::new("tar")
            .args(TAR_COMMON)
            .args(["--extract", "--file"])
            .arg(tar)
            .arg("-C")
            .arg(root)
            .run()
            .with_context(|| format!("unpacking base {} into {}", tar.display(), root.display()))
    }

    /// Removes entries unused for at least `older_than_secs` (0: all); returns how many and
    /// their bytes. A build holding an entry open keeps reading it: unlinking does not disturb
    /// it, and a hard link in its workspace keeps the data.
    pub fn prune(&self, older_than_secs: u64) -> Result<(usize, u64)> {
        let mut n = 0;
        let mut bytes = 0;
        for e in self.entries()? {
            if e.age_secs < older_than_secs {
                continue;
            }
            if let Ok(target) = std::fs::read_link(&e.path) {
                // A lists entry: the link, then the version directory it named.
                std::fs::remove_file(&e.path)
                    .with_context(|| format!("removing {}", e.path.display()))?;
                let dir = self.lists_dir().join(target);
                std::fs::remove_dir_all(&dir)
                    .with_context(|| format!("removing {}", dir.display()))?;
            } else if e.path.is_dir() {
                std::fs::remove_dir_all(&e.path)
                    .with_context(|| format!("removing {}", e.path.display()))?;
            } else {
                std::fs::remove_file(&e.path)
                    .with_context(|| format!("removing {}", e.path.display()))?;
            }
            n += 1;
            bytes += e.size;
        }
        Ok((n, bytes))
    }

    /// Every cached entry: pooled packages, base trees, and apt lists (one entry per set of
    /// sources, plus any version directory no link names, left by an interrupted store).
    pub fn entries(&self) -> Result<Vec<Entry>> {
        let mut out = Vec::new();
        let now = std::time::SystemTime::now();
        let age = |md: &std::fs::Metadata| {
            // Last use: a hit touches nothing, so age runs from the later of write and read.
            md.accessed()
                .ok()
                .max(md.modified().ok())
                .and_then(|t| now.duration_since(t).ok())
                .map(|d| d.as_secs())
                .unwrap_or(0)
        };
        for d in [self.packages_dir(), self.bases_dir()] {
            let Ok(rd) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with('.') {
                    continue;
                }
                let Ok(md) = e.metadata() else { continue };
                out.push(Entry {
                    path: e.path(),
                    size: md.len(),
                    age_secs: age(&md),
                });
            }
        }
        let lists = self.lists_dir();
        let mut linked = std::collections::BTreeSet::new();
        let mut dirs = Vec::new();
        for e in std::fs::read_dir(&lists).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            match std::fs::read_link(e.path()) {
                Ok(target) => {
                    let dir = lists.join(&target);
                    let Ok(md) = std::fs::metadata(&dir) else {
                        continue;
                    };
                    out.push(Entry {
                        path: e.path(),
                        size: dir_size(&dir),
                        age_secs: age(&md),
                    });
                    linked.insert(target.into_os_string());
                }
                Err(_) => dirs.push(e),
            }
        }
        for e in dirs {
            // Orphans only after an hour: a store in progress has not linked its directory yet.
            let Ok(md) = e.metadata() else { continue };
            if !linked.contains(&e.file_name()) && age(&md) >= 3600 {
                out.push(Entry {
                    path: e.path(),
                    size: dir_size(&e.path()),
                    age_secs: age(&md),
                });
            }
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }
}

/// Bytes of the regular files directly in `dir`.
fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

const TAR_COMMON: &[&str] = &[
    "--numeric-owner",
    "--xattrs",
    "--xattrs-include=*",
    "--acls",
    "--sparse",
];

/// The base-tree key: everything that decides what debootstrap produces, the mount layout the
/// tree was made in, and the digest of the mirror's Release file.
pub fn base_key(plan: &Plan, release_digest: &str) -> String {
    let mut h = Sha256::new();
    let mut mounts: Vec<&str> = plan.images.iter().map(|i| i.mount.as_str()).collect();
    mounts.sort();
    let fields = [
        plan.backend.name().to_string(),
        plan.suite.clone(),
        plan.arch.clone(),
        format!("{:?}", plan.variant),
        plan.bootstrap_include.join(","),
        plan.repos[0].section.clone(),
        plan.bootstrap_mirror.clone(),
        mounts.join(","),
        release_digest.to_string(),
    ];
    for f in fields {
        h.update(f.as_bytes());
        h.update(b"\n");
    }
    hex(&h.finalize())
}

/// sha256 of the mirror's InRelease (or Release) for the bootstrap suite, fetched with apt's own
/// downloader (proxies from the plan apply).
pub fn release_digest(plan: &Plan, scratch: &Path) -> Result<String> {
    let mut last = None;
    for name in ["InRelease", "Release"] {
        let url = format!("{}/dists/{}/{name}", plan.bootstrap_mirror, plan.suite);
        let dest = scratch.join(format!("mirror-{name}"));
        let mut cmd = Command::new("/usr/lib/apt/apt-helper");
        if let Some(p) = &plan.proxies.http {
            cmd.args(["-o", &format!("Acquire::http::Proxy={p}")]);
        }
        if let Some(p) = &plan.proxies.https {
            cmd.args(["-o", &format!("Acquire::https::Proxy={p}")]);
        }
        cmd.arg("download-file").arg(&url).arg(&dest);
        match cmd.run() {
            Ok(()) => {
                let bytes =
                    std::fs::read(&dest).with_context(|| format!("reading {}", dest.display()))?;
                let _ = std::fs::remove_file(&dest);
                return Ok(hex(&Sha256::digest(&bytes)));
            }
            Err(e) => last = Some(e.context(format!("fetching {url}"))),
        }
    }
    Err(last.expect("tried at least once"))
}

/// The lists key: what apt fetches depends only on the sources and the architecture.
pub fn lists_key(sources_list: &str, arch: &str) -> String {
    let mut h = Sha256::new();
    h.update(sources_list.as_bytes());
    h.update(b"\n");
    h.update(arch.as_bytes());
    format!("lists-{}", &hex(&h.finalize())[..32])
}

/// Hard-links (or copies) every `*.deb` of `from` missing in `to`; returns how many.
fn share_debs(from: &Path, to: &Path) -> Result<usize> {
    let mut n = 0;
    let rd = std::fs::read_dir(from).with_context(|| format!("listing {}", from.display()))?;
    for e in rd.flatten() {
        let name = e.file_name();
        let s = name.to_string_lossy();
        if !s.ends_with(".deb") || s.starts_with('.') || !e.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        let dest = to.join(&name);
        if dest.exists() {
            continue;
        }
        match std::fs::hard_link(e.path(), &dest) {
            Ok(()) => n += 1,
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(_) => {
                // Another filesystem: copy under a temporary name, then rename (atomic).
                let tmp = to.join(format!(".{s}.tmp-{}", crate::sys::unique_token()));
                std::fs::copy(e.path(), &tmp).with_context(|| {
                    format!("copying {} to {}", e.path().display(), tmp.display())
                })?;
                std::fs::rename(&tmp, &dest)
                    .with_context(|| format!("moving {} into place", dest.display()))?;
                n += 1;
            }
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packages_pool_both_ways() {
        let d = tempfile::tempdir().unwrap();
        let cache = Cache::open(&d.path().join("cache")).unwrap();
        let work = d.path().join("work");
        std::fs::create_dir_all(&work).unwrap();
        std::fs::write(work.join("a_1_amd64.deb"), "a").unwrap();
        std::fs::write(work.join("lock"), "").unwrap();
        assert_eq!(cache.store_packages_from(&work).unwrap(), 1);
        assert_eq!(cache.store_packages_from(&work).unwrap(), 0);
        let other = d.path().join("other");
        assert_eq!(cache.link_packages_into(&other).unwrap(), 1);
        assert_eq!(
            std::fs::read_to_string(other.join("a_1_amd64.deb")).unwrap(),
            "a"
        );
        assert!(!other.join("lock").exists());
        assert_eq!(cache.entries().unwrap().len(), 1);
        assert_eq!(cache.prune(3600).unwrap().0, 0, "a fresh entry survives");
        assert_eq!(cache.prune(0).unwrap(), (1, 1));
        assert!(cache.entries().unwrap().is_empty());
    }

    #[test]
    fn lists_versions_replace_each_other() {
        use crate::root::Root;
        let d = tempfile::tempdir().unwrap();
        let cache = Cache::open(&d.path().join("cache")).unwrap();
        let image = d.path().join("image");
        let lists = image.join(crate::debian::apt::LISTS_DIR);
        std::fs::create_dir_all(lists.join("partial")).unwrap();
        std::fs::write(lists.join("m_dists_bookworm_InRelease"), "v1").unwrap();
        std::fs::write(lists.join("lock"), "").unwrap();
        let old = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        let set_old = || {
            std::fs::File::options()
                .write(true)
                .open(lists.join("m_dists_bookworm_InRelease"))
                .unwrap()
                .set_modified(old)
                .unwrap()
        };
        set_old();
        let key = lists_key("deb http://m.example/debian bookworm main\n", "amd64");
        let other = d.path().join("other");
        let back_lists = other.join(crate::debian::apt::LISTS_DIR);
        std::fs::create_dir_all(&back_lists).unwrap();
        let back = Root::open(&other).unwrap();
        assert_eq!(cache.restore_lists(&key, &back).unwrap(), 0);
        let image_root = Root::open(&image).unwrap();
        cache.store_lists(&key, &image_root).unwrap();
        std::fs::write(lists.join("m_dists_bookworm_InRelease"), "v2").unwrap();
        set_old();
        cache.store_lists(&key, &image_root).unwrap();
        // A link the other image holds where a list goes is replaced, never written through.
        let victim = d.path().join("victim");
        std::fs::write(&victim, "host file").unwrap();
        std::os::unix::fs::symlink(&victim, back_lists.join("m_dists_bookworm_InRelease")).unwrap();
        assert_eq!(cache.restore_lists(&key, &back).unwrap(), 1);
        let restored = back_lists.join("m_dists_bookworm_InRelease");
        assert_eq!(std::fs::read_to_string(&restored).unwrap(), "v2");
        assert_eq!(
            std::fs::metadata(&restored).unwrap().modified().unwrap(),
            old
        );
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "host file");
        assert!(!back_lists.join("lock").exists());
        // One version directory plus the link: the old version is gone.
        assert_eq!(std::fs::read_dir(cache.lists_dir()).unwrap().count(), 2);
        let entries = cache.entries().unwrap();
        assert_eq!(entries.len(), 1, "{entries:?}");
        assert_eq!(entries[0].size, 2);
        assert_eq!(cache.prune(0).unwrap(), (1, 2));
        assert_eq!(std::fs::read_dir(cache.lists_dir()).unwrap().count(), 0);
    }

    #[test]
    fn base_tree_round_trip_keeps_owners_and_modes() {
        let d = tempfile::tempdir().unwrap();
        let cache = Cache::open(&d.path().join("cache")).unwrap();
        let root = d.path().join("root");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::create_dir_all(root.join("lost+found")).unwrap();
        std::fs::create_dir_all(root.join("var/cache/apt/archives")).unwrap();
        std::fs::write(root.join("var/cache/apt/archives/x_1_all.deb"), "x").unwrap();
        std::fs::write(root.join("etc/motd"), "hi").unwrap();
        std::os::unix::fs::chown(root.join("etc/motd"), Some(1234), Some(5678)).ok();
        let tar = cache.store_base("k", &root).unwrap();
        assert_eq!(cache.base("k"), Some(tar.clone()));
        let back = d.path().join("back");
        std::fs::create_dir_all(&back).unwrap();
        Cache::restore_base(&tar, &back).unwrap();
        assert_eq!(
            std::fs::read_to_string(back.join("etc/motd")).unwrap(),
            "hi"
        );
        assert!(!back.join("lost+found").exists());
        assert!(!back.join("var/cache/apt/archives/x_1_all.deb").exists());
        if nix::unistd::geteuid().is_root() {
            use std::os::unix::fs::MetadataExt;
            let md = std::fs::metadata(back.join("etc/motd")).unwrap();
            assert_eq!((md.uid(), md.gid()), (1234, 5678));
        }
    }
}
