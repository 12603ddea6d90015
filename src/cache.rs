//! Caches shared by builds under `--cache-dir`: downloaded packages (`packages/`), bootstrapped
//! base trees (`bases/`), installed trees (`trees/`: a tree after the install stage, with what
//! decided it, see [`crate::debian::trees`]) and apt's lists (`lists/`).
//!
//! What is trusted, and why:
//! - The cache directory, because only the user running debimg (root) can change it:
//!   [`Cache::open`] refuses one that someone else owns or that group or others can write, or
//!   that lies below a directory others could change. Whoever can write the cache could feed
//!   packages and base trees into every build that uses it.
//! - Nothing a build's chroot wrote. Packages move between the pool and a build as copies, never
//!   as hard links: through a link a process in one build's chroot could change a pooled file
//!   in place, and linking changes the inode's ctime, which made mmdebstrap's tar in another
//!   build fail with "file changed as we read it".
//! - Every pooled package is checked against the repository index apt verified against the
//!   signed Release file ([`PackageIndex`]): when it is stored, and again when it is offered to
//!   a build, by size and SHA-256 computed while copying. This matters because apt takes a file
//!   already in its archives directory when only its size matches.
//! - A base tree only with the SHA-256 recorded when it was stored (`<key>.tar.sha256` beside
//!   `<key>.tar`); a tar that does not match, or has no record, is removed and counts as a miss.
//!   The key covers everything that decides the bootstrap, including the digest of the mirror's
//!   Release file, so a mirror update invalidates it.
//!
//! Builds side by side share one cache without a lock: every write is a complete file renamed
//! into place (a package never replacing an entry another build stored first), and nothing is
//! changed in place, so no reader sees a partial entry or a file change under it. Nothing is
//! fsynced: a file torn by a crash fails its check and goes. `prune` and `entries` never follow
//! a link.

use std::fs::{File, Metadata};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use nix::sys::stat::FileStat;
use sha2::{Digest, Sha256};

use crate::cmd::CommandRunExt;
use crate::debian::index::PackageIndex;
use crate::output::OutputDir;
use crate::pack::digest::{CHUNK_SIZE, hex, read_full};
use crate::plan::Plan;

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

/// What [`Cache::offer_packages`] put in a build's archives directory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[must_use]
pub struct Offered {
    /// Pooled packages copied, each matching the build's index.
    pub files: usize,
    pub bytes: u64,
    /// Pooled packages of the right size whose digest did not match: removed from the pool.
    pub rejected: usize,
}

/// What [`Cache::store_packages`] added to the pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[must_use]
pub struct Stored {
    /// Packages new to the pool, each matching the build's index.
    pub files: usize,
    pub bytes: u64,
    /// `.deb` files the pool lacked but that are not what the index lists (unknown or ambiguous
    /// name, not a regular file, other size or digest): not stored.
    pub rejected: usize,
}

/// A base tree found in the cache whose tar matched its recorded digest, held open: what
/// [`BaseTar::restore`] unpacks is the file that was checked, whatever happens to the name.
#[derive(Debug)]
#[must_use]
pub struct BaseTar {
    path: PathBuf,
    file: File,
}

/// What decided an installed tree, stored beside it (`<key>.tar.info`): the context every tree
/// built the same way shares (base tree, repositories and their Release files, pins, excludes,
/// local packages), the packages the spec asked for, what dpkg then had installed, and the
/// dpkg status of the base the install started from (a later build simulates a cold install
/// from it), and whether a dist-upgrade of that base changed nothing (the same for every tree
/// of the context: the same base and Release files).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TreeInfo {
    pub context: String,
    pub requested: Vec<String>,
    pub installed: std::collections::BTreeMap<String, String>,
    pub base_status: String,
    /// Unknown (false) in a record written before it existed: then simulated again.
    #[serde(default)]
    pub base_current: bool,
}

/// The parts of the cache directory.
const PARTS: [&str; 4] = ["packages", "bases", "trees", "lists"];

/// The record of what decided an installed tree: `<key>.tar` + this (JSON).
const INFO_SUFFIX: &str = ".info";

/// How many installed trees the cache keeps: storing one more removes the least recently used.
/// Each is a whole installed system (hundreds of MiB).
pub const MAX_TREES: usize = 6;

/// The record of a base tar's digest: `<key>.tar` + this.
const DIGEST_SUFFIX: &str = ".sha256";

/// How long a leftover of an interrupted store (a temporary file, a version directory no link
/// names, a digest record without its tar) must be untouched before `prune` takes it: a store
/// in progress has not renamed it into place yet.
const LEFTOVER_SECS: u64 = 3600;

impl Cache {
    /// Opens the cache at `dir`, creating what is missing (mode 0755). Refuses a cache
    /// directory or part that is a symbolic link or not a directory, that is not owned by the
    /// effective user, or that group or others can write, and one below a directory that anyone
    /// but root or the effective user could change: the error says why and what to do.
    pub fn open(dir: &Path) -> Result<Cache> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .with_context(|| format!("creating cache directory {}", dir.display()))?;
        let dir = resolve_parents(dir)?;
        check_private(&dir)?;
        for part in PARTS {
            let d = dir.join(part);
            match std::fs::DirBuilder::new().mode(0o755).create(&d) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("creating {}", d.display()));
                }
            }
            check_private(&d)?;
        }
        Ok(Cache { dir })
    }

    /// The cache directory (its path as resolved when it was opened).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where downloaded .deb files are pooled.
    pub fn packages_dir(&self) -> PathBuf {
        self.dir.join("packages")
    }

    /// Where bootstrapped base trees are kept as tar files.
    pub fn bases_dir(&self) -> PathBuf {
        self.dir.join("bases")
    }

    /// Where installed trees are kept as tar files, each with its digest record and its
    /// [`TreeInfo`].
    pub fn trees_dir(&self) -> PathBuf {
        self.dir.join("trees")
    }

    /// Where apt's index files are kept, one version directory per set of sources.
    pub fn lists_dir(&self) -> PathBuf {
        self.dir.join("lists")
    }

    /// Copies the cached apt lists for `key` into the image's lists directory `lists` (keeping their
    /// times, which apt sends as If-Modified-Since, so an unchanged mirror answers "Hit" and
    /// nothing is downloaded). Returns how many files; a missing or vanishing entry is a miss.
    pub fn restore_lists(&self, key: &str, root: &crate::root::Root, lists: &str) -> Result<usize> {
        let link = self.lists_dir().join(key);
        let Some(dir) = std::fs::read_link(&link)
            .ok()
            .and_then(|t| self.lists_version(&link, &t))
        else {
            return Ok(0);
        };
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
            let dest = format!("{lists}/{}", name.to_string_lossy());
            root.write_with(&dest, 0o644, crate::root::Owner::ROOT, |f| {
                std::io::copy(&mut from, f)?;
                f.set_modified(mtime)?;
                Ok(())
            })?;
            n += 1;
        }
        Ok(n)
    }

    /// Stores the image's apt lists (in `lists`) as the new version for `key`: a fresh directory, then the
    /// `key` symlink renamed over the old one, so readers see one version or the other. Only
    /// regular files are read out of the image.
    pub fn store_lists(&self, key: &str, root: &crate::root::Root, lists: &str) -> Result<()> {
        let token = crate::sys::unique_token();
        let version = format!("{key}.{token}");
        let dir = self.lists_dir().join(&version);
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
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
        if let Some(old) = old
            .filter(|o| o.as_os_str() != version.as_str())
            .and_then(|o| self.lists_version(&link, &o))
        {
            // A build copying from it right now just misses the cache.
            let _ = crate::sys::mount::remove_dir_all_safe(&old);
        }
        Ok(())
    }

    /// Copies into `dest` (a build's private archives directory, created if missing) every
    /// pooled package that `index` lists under its name with the same size and whose SHA-256,
    /// computed while copying, matches too. A copy appears under its final name only complete
    /// and checked; a name `dest` already has is left alone. A pooled file of the listed size
    /// but another digest is removed from the pool with a warning. Links and anything but
    /// regular files in the pool are never followed or opened.
    pub fn offer_packages(&self, dest: &Path, index: &PackageIndex) -> Result<Offered> {
        self.offer_packages_of(dest, index, None)
    }

    /// [`Cache::offer_packages`], only of the packages whose name `wanted` takes (when given).
    pub fn offer_packages_of(
        &self,
        dest: &Path,
        index: &PackageIndex,
        wanted: Option<&dyn Fn(&str) -> bool>,
    ) -> Result<Offered> {
        std::fs::create_dir_all(dest).with_context(|| format!("creating {}", dest.display()))?;
        let pool = OutputDir::open_nofollow(&self.packages_dir())?;
        let dest = OutputDir::open_nofollow(dest)?;
        let mut out = Offered::default();
        for name in pool.entries()? {
            let Some(expected) = name.to_str().and_then(|n| index.expected(n)) else {
                continue;
            };
            // `NAME_VERSION_ARCH.deb`: the package's name is everything before the first `_`.
            if let Some(wanted) = wanted {
                let package = name.to_str().and_then(|n| n.split('_').next());
                if !package.is_some_and(wanted) {
                    continue;
                }
            }
            if name.as_bytes().starts_with(b".") || dest.stat(&name)?.is_some() {
                continue;
            }
            let Some((mut file, st)) = pool.open_if_regular(&name)? else {
                continue;
            };
            if st.st_size as u64 != expected.size {
                // Another repository's file of that name, perhaps: not this build's.
                continue;
            }
            let mut tmp = dest.temp_file(&name)?;
            let digest =
                copy_hashed(&mut file, &mut tmp.file, expected.size).with_context(|| {
                    format!(
                        "copying {} to {}",
                        pool.join(&name).display(),
                        dest.join(&name).display()
                    )
                })?;
            if digest.as_deref() == Some(expected.sha256.as_str()) {
                if tmp.place_new()? {
                    out.files += 1;
                    out.bytes += expected.size;
                }
            } else {
                drop(tmp);
                pool.remove_if_same(&name, &st);
                tracing::warn!(
                    "pooled {} does not match its repository's index: removed",
                    pool.join(&name).display()
                );
                out.rejected += 1;
            }
        }
        Ok(out)
    }

    /// Adds to the pool every `*.deb` of `src` (a directory a chroot could write) that the pool
    /// lacks and whose size and SHA-256 match what `index` lists under its name. Entries are
    /// opened without following links; hidden names and anything but regular files are
    /// skipped. Each file is copied, hashed in the same pass, under a temporary name, and put in
    /// place without replacing an entry another build stored first.
    pub fn store_packages(&self, src: &Path, index: &PackageIndex) -> Result<Stored> {
        let src = OutputDir::open_nofollow(src)?;
        let pool = OutputDir::open_nofollow(&self.packages_dir())?;
        let mut out = Stored::default();
        for name in src.entries()? {
            let bytes = name.as_bytes();
            if bytes.starts_with(b".") || !bytes.ends_with(b".deb") || pool.stat(&name)?.is_some() {
                continue;
            }
            let mut reject = |why: &str| {
                tracing::debug!("not pooling {}: {why}", src.join(&name).display());
                out.rejected += 1;
            };
            let Some(expected) = name.to_str().and_then(|n| index.expected(n)) else {
                reject("no repository index lists it, or two list it differently");
                continue;
            };
            let Some((mut file, st)) = src.open_if_regular(&name)? else {
                reject("not a regular file");
                continue;
            };
            if st.st_size as u64 != expected.size {
                reject("its size is not the index's");
                continue;
            }
            let mut tmp = pool.temp_file(&name)?;
            let digest =
                copy_hashed(&mut file, &mut tmp.file, expected.size).with_context(|| {
                    format!(
                        "copying {} to {}",
                        src.join(&name).display(),
                        pool.join(&name).display()
                    )
                })?;
            if digest.as_deref() != Some(expected.sha256.as_str()) {
                reject("its SHA-256 is not the index's");
                continue;
            }
            if tmp.place_new()? {
                out.files += 1;
                out.bytes += expected.size;
            }
        }
        Ok(out)
    }

    /// The base tree cached under `key`, checked against the SHA-256 recorded when it was
    /// stored and held open. A tar that does not match, or has no record, is removed with a
    /// warning: a miss, as is an invalid key.
    pub fn verified_base(&self, key: &str) -> Option<BaseTar> {
        verified_tar(&self.bases_dir(), key)
    }

    /// The installed tree cached under `key`, checked as [`Cache::verified_base`] checks a base
    /// tree, with the record of what decided it; its use is recorded (the least recently used
    /// tree goes first when the cache is full).
    pub fn verified_tree(&self, key: &str) -> Option<(BaseTar, TreeInfo)> {
        let tar = verified_tar(&self.trees_dir(), key)?;
        let info = read_info(&self.trees_dir().join(format!("{key}.tar{INFO_SUFFIX}")))?;
        // Touched through the descriptor that was checked.
        let now = nix::sys::time::TimeSpec::UTIME_NOW;
        nix::sys::stat::futimens(&tar.file, &now, &now).ok();
        Some((tar, info))
    }

    /// Every installed tree's key and record, for finding the closest subset; entries without a
    /// readable record are skipped.
    pub fn tree_infos(&self) -> Vec<(String, TreeInfo)> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(self.trees_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = e.file_name();
            let Some(key) = name
                .to_str()
                .and_then(|n| n.strip_suffix(&format!(".tar{INFO_SUFFIX}")))
            else {
                continue;
            };
            if !valid_key(key) {
                continue;
            }
            if let Some(info) = read_info(&e.path()) {
                out.push((key.to_string(), info));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Stores the tree at `root` (spanning its mounts) as the installed tree `key` with its
    /// record `info` (renamed into place before the tar, after the digest record), then removes
    /// the least recently used trees beyond [`MAX_TREES`].
    pub fn store_tree(&self, key: &str, root: &Path, info: &TreeInfo) -> Result<PathBuf> {
        let trees = self.trees_dir();
        let dir = OutputDir::open_nofollow(&trees)?;
        let text = serde_json::to_vec(info)?;
        dir.write_file(format!("{key}.tar{INFO_SUFFIX}"), &text, 0o644)?;
        // apt's cache of the lists stays: a build from this tree runs apt without an update,
        // which would otherwise make it again for every command. The cache with the dpkg status
        // merged in goes: apt makes it from that one quickly, and the simulation needs its own
        // (`apt-get clean` removes both from the image).
        let dest = store_tar_excluding(&trees, key, root, &["./var/cache/apt/pkgcache.bin"])?;
        let mut tars: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&trees)?
            .flatten()
            .filter(|e| {
                e.file_name().as_bytes().ends_with(b".tar")
                    && !e.file_name().as_bytes().starts_with(b".")
            })
            .filter_map(|e| {
                let md = e.metadata().ok()?;
                let used = md.accessed().ok().max(md.modified().ok())?;
                md.is_file().then(|| (used, e.path()))
            })
            .collect();
        tars.sort();
        let excess = tars.len().saturating_sub(MAX_TREES);
        for (_, old) in tars.into_iter().take(excess) {
            if old == dest {
                continue;
            }
            tracing::info!("installed-tree cache full: removing {}", old.display());
            remove_tree_entry(&old)?;
        }
        Ok(dest)
    }
}

/// `debimg cache list` (every entry with its size and the hours since it was used, then the
/// total) and `debimg cache prune` (what it removed), on stdout.
pub fn manage(cache_dir: &Path, action: &CacheAction) -> Result<(), crate::error::Error> {
    let cache = Cache::open(cache_dir)?;
    match action {
        CacheAction::List => {
            let entries = cache.entries()?;
            let total: u64 = entries.iter().map(|e| e.size).sum();
            println!("{:>10}  {:>7}  ENTRY", "SIZE", "UNUSED");
            for e in &entries {
                println!(
                    "{:>6} MiB  {:>6}h  {}",
                    e.size >> 20,
                    e.age_secs / 3600,
                    e.path.display()
                );
            }
            println!("{} entries, {} MiB", entries.len(), total >> 20);
        }
        CacheAction::Prune { older_than } => {
            let (n, bytes) = cache.prune(older_than.unwrap_or(0))?;
            println!("removed {n} entries, {} MiB", bytes >> 20);
        }
    }
    Ok(())
}

impl Cache {
    /// Stores the tree at `root` (spanning its mounts) as the base for `key`, with the SHA-256
    /// of the tar recorded beside it: the record is renamed into place first, the tar last.
    pub fn store_base(&self, key: &str, root: &Path) -> Result<PathBuf> {
        // apt's lists (mmdebstrap leaves them for the install stage): the lists cache holds
        // them, and they would double the tar.
        store_tar_excluding(&self.bases_dir(), key, root, &["./var/lib/apt/lists/*"])
    }

    /// Removes entries unused for at least `older_than_secs` (0: all); returns how many and
    /// their bytes. A build holding an entry open keeps reading it: unlinking does not disturb
    /// it. Nothing is followed: a link is removed as a link, a directory without crossing a
    /// mount, and a lists link's version directory only when the link names one plainly.
    pub fn prune(&self, older_than_secs: u64) -> Result<(usize, u64)> {
        let mut n = 0;
        let mut bytes = 0;
        for e in self.entries()? {
            if e.age_secs < older_than_secs {
                continue;
            }
            let version = std::fs::read_link(&e.path)
                .ok()
                .and_then(|t| self.lists_version(&e.path, &t));
            remove_entry(&e.path)?;
            if let Some(dir) = version {
                remove_entry(&dir)?;
            }
            let parent = e.path.parent();
            if (parent == Some(self.bases_dir().as_path())
                || parent == Some(self.trees_dir().as_path()))
                && e.path.as_os_str().as_bytes().ends_with(b".tar")
            {
                for c in companions(&e.path) {
                    remove_entry(&c)?;
                }
            }
            n += 1;
            bytes += e.size;
        }
        Ok((n, bytes))
    }

    /// Every cached entry: pooled packages, base trees (a tar and its digest record are one
    /// entry), and apt lists (one entry per set of sources); anything else found there (a link,
    /// a directory, a stray file) is an entry too, so that `prune` clears it; leftovers of an
    /// interrupted store once they are an hour old. Links are listed, never followed.
    pub fn entries(&self) -> Result<Vec<Entry>> {
        let mut out = Vec::new();
        let now = std::time::SystemTime::now();
        let age = |md: &Metadata| {
            // Last use: a hit touches nothing, so age runs from the later of write and read.
            md.accessed()
                .ok()
                .max(md.modified().ok())
                .and_then(|t| now.duration_since(t).ok())
                .map(|d| d.as_secs())
                .unwrap_or(0)
        };
        let (bases, trees) = (self.bases_dir(), self.trees_dir());
        for d in [self.packages_dir(), bases.clone(), trees.clone()] {
            let tars = d == bases || d == trees;
            let Ok(rd) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in rd.flatten() {
                let name = e.file_name();
                let name = name.as_bytes();
                // DirEntry::metadata does not follow a link.
                let Ok(md) = e.metadata() else { continue };
                let path = e.path();
                let mut size = entry_size(&path, &md);
                let companion = name.ends_with(DIGEST_SUFFIX.as_bytes())
                    || name.ends_with(INFO_SUFFIX.as_bytes());
                let leftover = name.starts_with(b".") || (tars && companion);
                if leftover {
                    let owner = path.with_extension("");
                    let owned = tars
                        && !name.starts_with(b".")
                        && std::fs::symlink_metadata(&owner).is_ok_and(|m| m.is_file());
                    if owned || age(&md) < LEFTOVER_SECS {
                        continue;
                    }
                } else if tars && name.ends_with(b".tar") && md.is_file() {
                    for c in companions(&path) {
                        size += std::fs::symlink_metadata(&c)
                            .map(|m| entry_size(&c, &m))
                            .unwrap_or(0);
                    }
                }
                out.push(Entry {
                    path,
                    size,
                    age_secs: age(&md),
                });
            }
        }
        let lists = self.lists_dir();
        let mut linked = std::collections::BTreeSet::new();
        let mut others = Vec::new();
        for e in std::fs::read_dir(&lists).into_iter().flatten().flatten() {
            let Ok(md) = e.metadata() else { continue };
            let path = e.path();
            if !md.file_type().is_symlink() {
                others.push((e, md));
                continue;
            }
            let version = std::fs::read_link(&path)
                .ok()
                .and_then(|t| self.lists_version(&path, &t));
            let hidden = e.file_name().as_bytes().starts_with(b".");
            match version {
                Some(dir) => {
                    if let Some(name) = dir.file_name() {
                        linked.insert(name.to_os_string());
                    }
                    if hidden {
                        // A link being put in place by a store.
                        continue;
                    }
                    let Ok(dmd) = std::fs::symlink_metadata(&dir) else {
                        continue;
                    };
                    out.push(Entry {
                        path,
                        size: dir_size(&dir),
                        age_secs: age(&dmd),
                    });
                }
                None if hidden && age(&md) < LEFTOVER_SECS => {}
                None => out.push(Entry {
                    path,
                    size: 0,
                    age_secs: age(&md),
                }),
            }
        }
        for (e, md) in others {
            // Orphans only after an hour: a store in progress has not linked its directory yet.
            if !linked.contains(&e.file_name()) && age(&md) >= LEFTOVER_SECS {
                let path = e.path();
                out.push(Entry {
                    size: entry_size(&path, &md),
                    path,
                    age_secs: age(&md),
                });
            }
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    /// The version directory the lists link `link` names with `target`, if that is a plain name
    /// (no `/`, not `.` or `..`, not hidden) of a real directory in `lists/`. Anything else is
    /// not followed.
    fn lists_version(&self, link: &Path, target: &Path) -> Option<PathBuf> {
        let lists = self.lists_dir();
        if link.parent() != Some(lists.as_path()) {
            return None;
        }
        let t = target.as_os_str().as_bytes();
        if t.is_empty() || t.contains(&b'/') || t.starts_with(b".") {
            return None;
        }
        let dir = lists.join(target);
        std::fs::symlink_metadata(&dir)
            .is_ok_and(|m| m.is_dir())
            .then_some(dir)
    }
}

impl BaseTar {
    /// Where the tar is in the cache (for messages).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Unpacks the checked tar into `root`.
    pub fn restore(&self, root: &Path) -> Result<()> {
        // tar opens our descriptor through /proc: the very inode that was hashed. /proc/self
        // names our PID as that /proc counts it, whatever PID namespace we are in.
        let pid = std::fs::read_link("/proc/self").context("reading /proc/self")?;
        let fd = Path::new("/proc")
            .join(pid)
            .join("fd")
            .join(self.file.as_raw_fd().to_string());
        unpack_base(&fd, &self.path, root)
    }
}

/// [`Cache::verified_base`] in the part `dir`.
fn verified_tar(dir: &Path, key: &str) -> Option<BaseTar> {
    if !valid_key(key) {
        return None;
    }
    let path = dir.join(format!("{key}.tar"));
    let record_path = digest_record(&path);
    // A second look when the tar or its record changed under us: a build storing the same
    // key renames its record, then its tar, into place, and a reader in between sees the
    // new record beside the old tar.
    for attempt in 0..2 {
        let Ok(Some((mut file, st))) = open_regular_path(&path) else {
            return None;
        };
        let recorded = read_record(&record_path);
        tracing::debug!("checking the base tree {}", path.display());
        let problem = match (&recorded, sha256_of(&mut file)) {
            (Some(r), Ok(a)) if *r == a => return Some(BaseTar { path, file }),
            (None, _) => "it has no recorded digest".to_string(),
            (Some(_), Ok(_)) => "it does not match its recorded digest".to_string(),
            (Some(_), Err(e)) => format!("reading it failed: {e}"),
        };
        let changed = !same_file(&path, &st) || read_record(&record_path) != recorded;
        if changed {
            if attempt == 0 {
                continue;
            }
            tracing::debug!("base tree {} keeps changing: a miss", path.display());
            return None;
        }
        std::fs::remove_file(&path).ok();
        if read_record(&record_path) == recorded {
            std::fs::remove_file(&record_path).ok();
        }
        tracing::warn!("cached base tree {}: {problem}: removed", path.display());
        return None;
    }
    None
}

/// Stores the tree at `root` (spanning its mounts) as `<key>.tar` in the part `dir`, with the
/// SHA-256 of the tar recorded beside it: the record is renamed into place first, the tar last.
/// Leaves out what matches `exclude` (tar patterns) as well as the API filesystems' contents,
/// `lost+found` and downloaded packages.
fn store_tar_excluding(dir: &Path, key: &str, root: &Path, exclude: &[&str]) -> Result<PathBuf> {
    if !valid_key(key) {
        bail!("invalid cache key {key:?}");
    }
    let bases = OutputDir::open_nofollow(dir)?;
    let name = format!("{key}.tar");
    let dest = bases.join(&name);
    let tar = bases.temp_file(&name)?;
    let mut cmd = Command::new("tar");
    cmd.args(TAR_COMMON)
        .args([
            "--create",
            "--exclude=./proc/*",
            "--exclude=./sys/*",
            "--exclude=./dev/pts/*",
            "--exclude=lost+found",
            "--exclude=./var/cache/apt/archives/*.deb",
        ])
        .args(exclude.iter().map(|e| format!("--exclude={e}")))
        .arg("--file")
        .arg(tar.fd_path())
        .arg("-C")
        .arg(root)
        .arg(".");
    crate::output::inherit_fds(&mut cmd, &[std::os::fd::AsFd::as_fd(&tar.file)]);
    cmd.run()
        .with_context(|| format!("archiving the base tree {}", root.display()))?;
    let digest = File::open(tar.fd_path())
        .and_then(|mut f| sha256_of(&mut f))
        .with_context(|| format!("reading the new {}", dest.display()))?;
    // The record first, the tar last: a tar is never in place without its record.
    let record = digest_record(&dest);
    let record_name = record
        .file_name()
        .context("a digest record has a file name")?;
    bases.write_file(record_name, format!("{digest}  {name}\n").as_bytes(), 0o644)?;
    // Every restore checks the tar against that record first: not waiting for its data to
    // reach the disk (a quarter of a second for an installed tree here) risks only a tar a
    // crash tore, which the check then refuses.
    tar.commit_unsynced()?;
    Ok(dest)
}

/// The record of an installed tree, if it is a regular file holding one.
fn read_info(path: &Path) -> Option<TreeInfo> {
    let (file, _) = open_regular_path(path).ok()??;
    let mut text = Vec::new();
    Read::take(file, 64 << 20).read_to_end(&mut text).ok()?;
    serde_json::from_slice(&text).ok()
}

/// The companions of a base or installed tree's tar: its digest record and (trees) its record.
fn companions(tar: &Path) -> [PathBuf; 2] {
    let mut info = tar.as_os_str().to_os_string();
    info.push(INFO_SUFFIX);
    [digest_record(tar), PathBuf::from(info)]
}

/// Removes an installed tree's tar first (a reader then misses it), then its companions.
fn remove_tree_entry(tar: &Path) -> Result<()> {
    remove_entry(tar)?;
    for c in companions(tar) {
        remove_entry(&c)?;
    }
    Ok(())
}

/// Runs tar to unpack `tar` (shown as `shown`) into `root`.
fn unpack_base(tar: &Path, shown: &Path, root: &Path) -> Result<()> {
    Command::new("tar")
        .args(TAR_COMMON)
        .args(["--extract", "--file"])
        .arg(tar)
        .arg("-C")
        .arg(root)
        .run()
        .with_context(|| format!("unpacking base {} into {}", shown.display(), root.display()))
}

/// A key names a file in `bases/`: nothing that could name another place.
fn valid_key(key: &str) -> bool {
    !key.is_empty() && !key.starts_with('.') && !key.contains(['/', '\0'])
}

/// The digest record of the base tar `tar`.
fn digest_record(tar: &Path) -> PathBuf {
    let mut s = tar.as_os_str().to_os_string();
    s.push(DIGEST_SUFFIX);
    PathBuf::from(s)
}

/// The SHA-256 a digest record holds (`<hex>  <name>`, as sha256sum writes), if it is one.
fn read_record(path: &Path) -> Option<String> {
    let (mut file, _) = open_regular_path(path).ok()??;
    let mut text = String::new();
    Read::take(&mut file, 4096).read_to_string(&mut text).ok()?;
    let digest = text.split_whitespace().next()?;
    (digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| digest.to_ascii_lowercase())
}

/// Whether `path` still names the file `st` describes.
fn same_file(path: &Path, st: &FileStat) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.dev() == st.st_dev && m.ino() == st.st_ino)
}

/// Opens `path` for reading if it is a regular file, without following a link.
fn open_regular_path(path: &Path) -> Result<Option<(File, FileStat)>> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Ok(None);
    };
    OutputDir::open_nofollow(parent)?.open_if_regular(name)
}

/// The SHA-256 of the rest of `file`, read in [`CHUNK_SIZE`] chunks.
fn sha256_of(file: &mut File) -> std::io::Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK_SIZE];
    loop {
        let n = read_full(file, &mut buf)?;
        if n == 0 {
            return Ok(hex(&h.finalize()));
        }
        h.update(&buf[..n]);
    }
}

/// Copies `from` to `to` if it holds exactly `size` bytes, hashing what is written in the same
/// pass (a source changing meanwhile gives a digest of what was copied); returns the SHA-256,
/// or `None` when the source was shorter or longer. Reads at most `size + 1` bytes.
fn copy_hashed(from: &mut File, to: &mut File, size: u64) -> std::io::Result<Option<String>> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK_SIZE];
    let mut left = size;
    while left > 0 {
        let want = left.min(CHUNK_SIZE as u64) as usize;
        let n = read_full(from, &mut buf[..want])?;
        if n == 0 {
            return Ok(None);
        }
        h.update(&buf[..n]);
        to.write_all(&buf[..n])?;
        left -= n as u64;
    }
    if read_full(from, &mut buf[..1])? != 0 {
        return Ok(None);
    }
    Ok(Some(hex(&h.finalize())))
}

/// `dir` with its parent directories resolved, once none of them can be changed by anyone but
/// root or the effective user (a sticky directory such as /tmp counts as safe: others cannot
/// rename what they do not own in it). Whoever could change a parent could swap the cache.
fn resolve_parents(dir: &Path) -> Result<PathBuf> {
    let full = match dir.file_name() {
        Some(name) => {
            let parent = match dir.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            parent
                .canonicalize()
                .with_context(|| format!("resolving {}", parent.display()))?
                .join(name)
        }
        None => dir
            .canonicalize()
            .with_context(|| format!("resolving {}", dir.display()))?,
    };
    let euid = nix::unistd::geteuid().as_raw();
    for a in full.ancestors().skip(1) {
        let md =
            std::fs::symlink_metadata(a).with_context(|| format!("inspecting {}", a.display()))?;
        let mode = md.mode() & 0o7777;
        let why = if md.uid() != 0 && md.uid() != euid {
            format!("is owned by uid {}", md.uid())
        } else if mode & 0o022 != 0 && mode & 0o1000 == 0 {
            format!("is writable by group or others (mode {mode:04o})")
        } else {
            continue;
        };
        return Err(crate::error::Error::tagged(
            crate::error::ErrorKind::Refused,
            format!(
                "cache directory {} is inside {}, which {why}: whoever can change it could swap the \
             cache for one that feeds packages and base trees into builds; choose a --cache-dir \
             whose parent directories only root can change",
                full.display(),
                a.display()
            ),
        ));
    }
    Ok(full)
}

/// Refuses a cache directory (or part) that anyone but the effective user could change.
fn check_private(dir: &Path) -> Result<()> {
    let md = std::fs::symlink_metadata(dir)
        .with_context(|| format!("inspecting cache directory {}", dir.display()))?;
    let shown = dir.display();
    if md.file_type().is_symlink() {
        return Err(crate::error::Error::tagged(
            crate::error::ErrorKind::Refused,
            format!(
                "cache directory {shown} is a symbolic link: whoever can change the link or its \
             target decides what builds are fed; give the real directory as --cache-dir"
            ),
        ));
    }
    if !md.is_dir() {
        return Err(crate::error::Error::tagged(
            crate::error::ErrorKind::Refused,
            format!(
                "cache directory {shown} is not a directory: remove it or choose another --cache-dir"
            ),
        ));
    }
    let euid = nix::unistd::geteuid().as_raw();
    if md.uid() != euid {
        return Err(crate::error::Error::tagged(
            crate::error::ErrorKind::Refused,
            format!(
                "cache directory {shown} is owned by uid {}, not by uid {euid} that runs debimg: its \
             owner could feed packages and base trees into builds, so nothing in it can be \
             trusted; remove it (debimg creates it afresh) or choose another --cache-dir",
                md.uid()
            ),
        ));
    }
    let mode = md.mode() & 0o7777;
    if mode & 0o022 != 0 {
        let who = if mode & 0o002 != 0 {
            "others"
        } else {
            "its group"
        };
        return Err(crate::error::Error::tagged(
            crate::error::ErrorKind::Refused,
            format!(
                "cache directory {shown} is writable by {who} (mode {mode:04o}): a cache other users \
             can write could feed packages and base trees into builds; `chmod go-w {shown}` or \
             choose another --cache-dir"
            ),
        ));
    }
    Ok(())
}

/// Removes `path` whatever it is, without following a link or crossing a mount; a missing
/// path is fine (another prune got there first).
fn remove_entry(path: &Path) -> Result<()> {
    let md = match std::fs::symlink_metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("inspecting {}", path.display())),
    };
    let res = if md.is_dir() {
        crate::sys::mount::remove_dir_all_safe(path)
    } else {
        std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))
    };
    match res {
        Err(e) if std::fs::symlink_metadata(path).is_err() => {
            tracing::debug!("{} went meanwhile: {e:#}", path.display());
            Ok(())
        }
        r => r,
    }
}

/// The size an entry shows: a file's length, a directory's files, nothing for anything else.
fn entry_size(path: &Path, md: &Metadata) -> u64 {
    if md.is_file() {
        md.len()
    } else if md.is_dir() {
        dir_size(path)
    } else {
        0
    }
}

/// Bytes of the regular files directly in `dir` (a directory, not a link to one).
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
    // A disk's partitions are mounted (and its ESP's mount point made) before the bootstrap
    // too: a base made on a disk holds their mount points, which a tarball's must not.
    if let Some(d) = &plan.disk {
        mounts.push("disk");
        for p in &d.partitions {
            if let Some(m) = &p.mount {
                mounts.push(m);
            } else if p.flags.contains(&crate::spec::PartitionFlag::Esp) {
                mounts.push("/boot/efi");
            }
        }
    }
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
    // What the bootstrap checked the repository against: a tree made with one key (or none)
    // is not offered to a build that gives another.
    let first = &plan.repos[0];
    if let Some(k) = &first.key_sha256 {
        h.update(format!("key {k}\n").as_bytes());
    }
    if first.trusted {
        h.update(b"trusted\n");
    }
    // A reproducible build's bootstrap differs from another's: it ran with SOURCE_DATE_EPOCH
    // (shadow's dates, mmdebstrap's own clean-up).
    if let Some(e) = plan.source_date_epoch {
        h.update(format!("source_date_epoch {e}\n").as_bytes());
    }
    hex(&h.finalize())
}

/// sha256 of the mirror's InRelease (or Release) for the bootstrap suite, fetched with apt's own
/// downloader (proxies from the plan apply). The error shows URLs without their credentials.
pub fn release_digest(plan: &Plan, scratch: &Path) -> Result<String> {
    let fetch = |url: &str| crate::debian::fetch::download(url, &plan.proxies, scratch);
    let bytes = crate::debian::fetch::release(&plan.bootstrap_mirror, &plan.suite, &fetch)?;
    Ok(hex(&Sha256::digest(&bytes)))
}

/// The lists key: what apt fetches depends only on the sources and the architecture.
pub fn lists_key(sources_list: &str, arch: &str) -> String {
    let mut h = Sha256::new();
    h.update(sources_list.as_bytes());
    h.update(b"\n");
    h.update(arch.as_bytes());
    format!("lists-{}", &hex(&h.finalize())[..32])
}

#[derive(clap::Subcommand)]
pub enum CacheAction {
    /// List the cache's entries (pooled packages, base trees, apt lists) with their size and the
    /// hours since they were last used.
    List,
    /// Remove cache entries not used for longer than --older-than (default: remove all).
    Prune {
        /// Age such as 30d, 12h, 45m or 90s.
        #[arg(long, value_parser = parse_age)]
        older_than: Option<u64>,
    },
}

/// Parses `30d`, `12h`, `45m`, `90s` into seconds. A bare number is refused: `--older-than 30`
/// meaning 30 seconds would empty the cache of someone who meant days.
fn parse_age(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let unitless = || format!("`{text}` needs a unit: 30d, 12h, 45m or 90s");
    let (num, mult) = match t.chars().last() {
        Some('d') => (&t[..t.len() - 1], 86_400),
        Some('h') => (&t[..t.len() - 1], 3_600),
        Some('m') => (&t[..t.len() - 1], 60),
        Some('s') => (&t[..t.len() - 1], 1),
        _ => return Err(unitless()),
    };
    num.parse::<u64>()
        .map(|n| n * mult)
        .map_err(|_| format!("`{text}` is not an age such as 30d, 12h, 45m or 90s"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reproducible_build_s_base_is_its_own() {
        let spec = |extra: &str| {
            Plan::for_test(&format!(
                "version: 1\nname: b\nsuite: bookworm\nkind: tarball\n{extra}"
            ))
        };
        let plain = spec("");
        let (a, b) = (
            spec("source_date_epoch: 1700000000\n"),
            spec("source_date_epoch: 1700000001\n"),
        );
        assert_ne!(base_key(&plain, "r"), base_key(&a, "r"));
        let disk = Plan::for_test(
            "version: 1\nname: b\nsuite: bookworm\nkind: disk\npackages: [linux-image-amd64]\n\
             disk:\n  size: 2GiB\n  boot: [uefi]\n  partitions:\n    - {size: 64MiB, flags: [esp]}\n    \
             - {mount: /, fs: ext4}\n",
        );
        assert_ne!(
            base_key(&plain, "r"),
            base_key(&disk, "r"),
            "a disk's base is not a tarball's"
        );
        assert_ne!(base_key(&a, "r"), base_key(&b, "r"));
        assert_eq!(base_key(&a, "r"), base_key(&a, "r"));
    }

    /// Where apt keeps its lists in an image (as `debian::apt` says).
    const LISTS: &str = "var/lib/apt/lists";

    #[test]
    fn lists_versions_replace_each_other() {
        use crate::root::Root;
        let d = tempfile::tempdir().unwrap();
        let cache = Cache::open(&d.path().join("cache")).unwrap();
        let image = d.path().join("image");
        let lists = image.join(LISTS);
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
        let back_lists = other.join(LISTS);
        std::fs::create_dir_all(&back_lists).unwrap();
        let back = Root::open(&other).unwrap();
        assert_eq!(cache.restore_lists(&key, &back, LISTS).unwrap(), 0);
        let image_root = Root::open(&image).unwrap();
        cache.store_lists(&key, &image_root, LISTS).unwrap();
        std::fs::write(lists.join("m_dists_bookworm_InRelease"), "v2").unwrap();
        set_old();
        cache.store_lists(&key, &image_root, LISTS).unwrap();
        // A link the other image holds where a list goes is replaced, never written through.
        let victim = d.path().join("victim");
        std::fs::write(&victim, "host file").unwrap();
        std::os::unix::fs::symlink(&victim, back_lists.join("m_dists_bookworm_InRelease")).unwrap();
        assert_eq!(cache.restore_lists(&key, &back, LISTS).unwrap(), 1);
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
        assert_eq!(
            cache.verified_base("k").map(|b| b.path().to_path_buf()),
            Some(tar.clone())
        );
        // The record is what sha256sum would write and check.
        let record = std::fs::read_to_string(cache.bases_dir().join("k.tar.sha256")).unwrap();
        assert_eq!(record, format!("{}  k.tar\n", sha256_file(&tar)));
        let base = cache.verified_base("k").unwrap();
        assert_eq!(base.path(), tar);
        let back = d.path().join("back");
        std::fs::create_dir_all(&back).unwrap();
        base.restore(&back).unwrap();
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

    use std::os::unix::fs::{PermissionsExt, symlink};
    use std::sync::atomic::{AtomicBool, Ordering};

    fn sha256_file(path: &Path) -> String {
        hex(&Sha256::digest(std::fs::read(path).unwrap()))
    }

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// Bytes that differ from one seed to the next.
    fn sample(len: usize, seed: u32) -> Vec<u8> {
        let mut x = 0x9e37_79b9 ^ seed.wrapping_mul(0x85eb_ca6b) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x >> 24) as u8
            })
            .collect()
    }

    /// Packages `name_1.0_all.deb` with these contents, and the index that lists them.
    fn packages(names_and_sizes: &[(&str, usize)]) -> (Vec<(String, Vec<u8>)>, PackageIndex) {
        let mut text = String::new();
        let mut files = Vec::new();
        for (i, (name, len)) in names_and_sizes.iter().enumerate() {
            let data = sample(*len, i as u32);
            text.push_str(&format!(
                "Package: {name}\nVersion: 1.0\nArchitecture: all\nDescription: test\n \
                 more lines\nFilename: pool/main/{name}_1.0_all.deb\nSize: {}\nSHA256: {}\n\n",
                data.len(),
                hex(&Sha256::digest(&data))
            ));
            files.push((format!("{name}_1.0_all.deb"), data));
        }
        let mut index = PackageIndex::default();
        assert_eq!(index.add_packages_text(&text), files.len());
        (files, index)
    }

    fn write_all(dir: &Path, files: &[(String, Vec<u8>)]) {
        std::fs::create_dir_all(dir).unwrap();
        for (name, data) in files {
            std::fs::write(dir.join(name), data).unwrap();
        }
    }

    /// Names in `dir` starting with a dot: temporaries left behind.
    fn hidden(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect()
    }

    fn make_old(path: &Path) {
        let t = std::time::SystemTime::now() - std::time::Duration::from_secs(2 * LEFTOVER_SECS);
        let times = std::fs::FileTimes::new().set_accessed(t).set_modified(t);
        File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_times(times)
            .unwrap();
    }

    #[test]
    fn open_creates_the_parts_private() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("new/cache");
        let cache = Cache::open(&dir).unwrap();
        for p in [
            dir.clone(),
            cache.packages_dir(),
            cache.bases_dir(),
            cache.lists_dir(),
        ] {
            let md = std::fs::symlink_metadata(&p).unwrap();
            assert!(md.is_dir(), "{}", p.display());
            assert_eq!(md.mode() & 0o022, 0, "{} {:o}", p.display(), md.mode());
        }
        Cache::open(&dir).expect("an existing private cache opens again");
    }

    #[test]
    fn open_refuses_a_cache_others_can_write() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("cache");
        let cache = Cache::open(&dir).unwrap();
        chmod(&dir, 0o777);
        let err = format!("{:#}", Cache::open(&dir).unwrap_err());
        assert!(
            err.contains(&format!(
                "cache directory {} is writable by others (mode 0777)",
                dir.display()
            )),
            "{err}"
        );
        assert!(
            err.contains(&format!("`chmod go-w {}`", dir.display())),
            "{err}"
        );
        chmod(&dir, 0o757);
        let err = format!("{:#}", Cache::open(&dir).unwrap_err());
        assert!(err.contains("writable by others (mode 0757)"), "{err}");
        // The sticky bit keeps others from renaming entries, not from adding them.
        chmod(&dir, 0o1777);
        assert!(Cache::open(&dir).is_err());
        chmod(&dir, 0o755);
        chmod(&cache.bases_dir(), 0o775);
        let err = format!("{:#}", Cache::open(&dir).unwrap_err());
        assert!(
            err.contains("bases is writable by its group (mode 0775)"),
            "{err}"
        );
        chmod(&cache.bases_dir(), 0o755);
        Cache::open(&dir).unwrap();
    }

    #[test]
    fn open_refuses_a_cache_someone_else_owns() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: chown needs root");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("cache");
        let cache = Cache::open(&dir).unwrap();
        std::os::unix::fs::chown(&dir, Some(65534), None).unwrap();
        let err = format!("{:#}", Cache::open(&dir).unwrap_err());
        assert!(
            err.contains(&format!(
                "cache directory {} is owned by uid 65534, not by uid 0",
                dir.display()
            )),
            "{err}"
        );
        assert!(err.contains("another --cache-dir"), "{err}");
        std::os::unix::fs::chown(&dir, Some(0), None).unwrap();
        std::os::unix::fs::chown(cache.packages_dir(), Some(65534), None).unwrap();
        let err = format!("{:#}", Cache::open(&dir).unwrap_err());
        assert!(err.contains("packages is owned by uid 65534"), "{err}");
        // A parent someone else owns could have the cache swapped under it.
        let theirs = d.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::os::unix::fs::chown(&theirs, Some(65534), None).unwrap();
        let err = format!("{:#}", Cache::open(&theirs.join("cache")).unwrap_err());
        assert!(err.contains("which is owned by uid 65534"), "{err}");
    }

    #[test]
    fn open_refuses_links_files_and_changeable_parents() {
        let d = tempfile::tempdir().unwrap();
        let real = d.path().join("real");
        Cache::open(&real).unwrap();
        let link = d.path().join("link");
        symlink(&real, &link).unwrap();
        let err = format!("{:#}", Cache::open(&link).unwrap_err());
        assert!(err.contains("is a symbolic link"), "{err}");
        // A part that is a link to a directory of the same owner is refused as well.
        let other = d.path().join("other");
        std::fs::create_dir(&other).unwrap();
        std::fs::remove_dir(real.join("lists")).unwrap();
        symlink(&other, real.join("lists")).unwrap();
        let err = format!("{:#}", Cache::open(&real).unwrap_err());
        assert!(err.contains("lists is a symbolic link"), "{err}");
        let file = d.path().join("file");
        std::fs::create_dir(&file).unwrap();
        std::fs::write(file.join("packages"), "").unwrap();
        let err = format!("{:#}", Cache::open(&file).unwrap_err());
        assert!(err.contains("packages is not a directory"), "{err}");
        // Anyone may rename the cache inside a parent anyone can write, unless it is sticky.
        let open = d.path().join("open");
        std::fs::create_dir(&open).unwrap();
        chmod(&open, 0o777);
        let err = format!("{:#}", Cache::open(&open.join("cache")).unwrap_err());
        assert!(
            err.contains(&format!(
                "is inside {}, which is writable by group or others (mode 0777)",
                open.display()
            )),
            "{err}"
        );
        chmod(&open, 0o1777);
        Cache::open(&open.join("cache")).unwrap();
    }

    #[test]
    fn the_pool_takes_and_gives_only_what_the_index_lists() {
        let d = tempfile::tempdir().unwrap();
        let cache = Cache::open(&d.path().join("cache")).unwrap();
        let (files, index) = packages(&[
            ("good", 300_000),
            ("tampered", 1000),
            ("short", 1000),
            ("linked", 1000),
            ("fifo", 10),
        ]);
        let src = d.path().join("src");
        write_all(&src, &files);
        // Same size as the index says, other bytes.
        std::fs::write(src.join("tampered_1.0_all.deb"), vec![0u8; 1000]).unwrap();
        std::fs::write(src.join("short_1.0_all.deb"), vec![0u8; 999]).unwrap();
        // A link to a good file, and a FIFO (opening it would block): neither is a package.
        let outside = d.path().join("outside");
        write_all(&outside, &files);
        std::fs::remove_file(src.join("linked_1.0_all.deb")).unwrap();
        symlink(
            outside.join("linked_1.0_all.deb"),
            src.join("linked_1.0_all.deb"),
        )
        .unwrap();
        std::fs::remove_file(src.join("fifo_1.0_all.deb")).unwrap();
        nix::unistd::mkfifo(&src.join("fifo_1.0_all.deb"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        std::fs::write(src.join("unknown_1_all.deb"), "x").unwrap();
        std::fs::write(src.join(".hidden_1.0_all.deb"), "x").unwrap();
        std::fs::write(src.join("lock"), "").unwrap();

        let stored = cache.store_packages(&src, &index).unwrap();
        assert_eq!(
            stored,
            Stored {
                files: 1,
                bytes: 300_000,
                rejected: 5
            }
        );
        let pool = cache.packages_dir();
        let pooled: Vec<_> = std::fs::read_dir(&pool)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(pooled, ["good_1.0_all.deb"]);
        let good = pool.join("good_1.0_all.deb");
        assert_eq!(std::fs::read(&good).unwrap(), files[0].1);
        // A copy, not a link: changing the chroot's file in place leaves the pool alone.
        assert_eq!(std::fs::metadata(&good).unwrap().nlink(), 1);
        std::fs::write(src.join("good_1.0_all.deb"), vec![1u8; 300_000]).unwrap();
        assert_eq!(std::fs::read(&good).unwrap(), files[0].1);
        assert_eq!(cache.store_packages(&src, &index).unwrap().files, 0);

        let dest = d.path().join("work/archives");
        let offered = cache.offer_packages(&dest, &index).unwrap();
        assert_eq!(
            offered,
            Offered {
                files: 1,
                bytes: 300_000,
                rejected: 0
            }
        );
        let copy = dest.join("good_1.0_all.deb");
        assert_eq!(std::fs::read(&copy).unwrap(), files[0].1);
        assert_eq!(std::fs::metadata(&good).unwrap().nlink(), 1);
        std::fs::write(&copy, vec![2u8; 300_000]).unwrap();
        assert_eq!(std::fs::read(&good).unwrap(), files[0].1);
        // A name the workspace already has is left as it is.
        assert_eq!(cache.offer_packages(&dest, &index).unwrap().files, 0);
        assert_eq!(std::fs::read(&copy).unwrap(), vec![2u8; 300_000]);

        // An index that does not know a pooled name is offered nothing of it.
        let other = d.path().join("other");
        let none = cache
            .offer_packages(&other, &PackageIndex::default())
            .unwrap();
        assert_eq!(none, Offered::default());
        assert_eq!(std::fs::read_dir(&other).unwrap().count(), 0);
        assert!(hidden(&pool).is_empty() && hidden(&dest).is_empty());
    }

    #[test]
    fn a_pooled_file_that_does_not_match_is_removed_and_a_link_is_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let cache = Cache::open(&d.path().join("cache")).unwrap();
        let (files, index) = packages(&[("a", 5000), ("b", 5000), ("c", 10)]);
        let pool = cache.packages_dir();
        write_all(&pool, &files[..1]);
        // Same size, other bytes: what a build's chroot could once leave behind by hard link.
        std::fs::write(pool.join(&files[1].0), vec![7u8; 5000]).unwrap();
        let outside = d.path().join("outside");
        write_all(&outside, &files);
        symlink(outside.join(&files[2].0), pool.join(&files[2].0)).unwrap();

        let dest = d.path().join("archives");
        let offered = cache.offer_packages(&dest, &index).unwrap();
        assert_eq!(
            offered,
            Offered {
                files: 1,
                bytes: 5000,
                rejected: 1
            }
        );
        assert!(dest.join(&files[0].0).exists());
        assert!(
            !dest.join(&files[1].0).exists(),
            "the bad file is not offered"
        );
        assert!(
            !pool.join(&files[1].0).exists(),
            "the bad file left the pool"
        );
        assert!(!dest.join(&files[2].0).exists(), "the link is not followed");
        assert_eq!(
            std::fs::read(outside.join(&files[2].0)).unwrap(),
            files[2].1
        );
        assert!(hidden(&dest).is_empty());
    }

    #[test]
    fn builds_side_by_side_share_the_pool() {
        let d = tempfile::tempdir().unwrap();
        let cache = Cache::open(&d.path().join("cache")).unwrap();
        let specs: Vec<(String, usize)> = (0..6)
            .map(|i| (format!("p{i}"), 150_000 + i * 77_777))
            .collect();
        let specs: Vec<(&str, usize)> = specs.iter().map(|(n, l)| (n.as_str(), *l)).collect();
        let (files, index) = packages(&specs);
        let expected: std::collections::HashMap<_, _> = files
            .iter()
            .map(|(n, data)| (n.clone(), hex(&Sha256::digest(data))))
            .collect();
        let pool = cache.packages_dir();
        let stop = AtomicBool::new(false);
        let start = std::sync::Barrier::new(4);
        let mut reads = 0;
        let stored: usize = std::thread::scope(|s| {
            // A reader that must only ever see complete, correct files under final names.
            let reader = s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    for e in std::fs::read_dir(&pool).unwrap() {
                        let name = e.unwrap().file_name().to_string_lossy().into_owned();
                        if name.starts_with('.') {
                            continue;
                        }
                        let Ok(data) = std::fs::read(pool.join(&name)) else {
                            continue;
                        };
                        assert_eq!(
                            hex(&Sha256::digest(&data)),
                            expected[&name],
                            "{name} seen partial or changed"
                        );
                        reads += 1;
                    }
                }
            });
            let workers: Vec<_> = (0..4)
                .map(|w| {
                    let (cache, index, files, d) = (&cache, &index, &files, d.path());
                    let start = &start;
                    s.spawn(move || {
                        let src = d.join(format!("src-{w}"));
                        write_all(&src, files);
                        start.wait();
                        let mut stored = 0;
                        for round in 0..4 {
                            stored += cache.store_packages(&src, index).unwrap().files;
                            let dest = d.join(format!("dest-{w}-{round}"));
                            let offered = cache.offer_packages(&dest, index).unwrap();
                            assert_eq!(offered.rejected, 0);
                            assert_eq!(offered.files, files.len());
                            for (name, data) in files {
                                assert_eq!(&std::fs::read(dest.join(name)).unwrap(), data);
                            }
                        }
                        stored
                    })
                })
                .collect();
            let stored = workers.into_iter().map(|w| w.join().unwrap()).sum();
            stop.store(true, Ordering::Relaxed);
            reader.join().unwrap();
            stored
        });
        assert_eq!(stored, files.len(), "each package is stored exactly once");
        assert!(reads > 0);
        assert!(hidden(&pool).is_empty(), "{:?}", hidden(&pool));
    }

    #[test]
    fn a_stored_entry_is_never_replaced() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("x.deb"), "first").unwrap();
        let dir = OutputDir::open_nofollow(d.path()).unwrap();
        let mut tmp = dir.temp_file("x.deb").unwrap();
        tmp.file.write_all(b"second").unwrap();
        assert!(!tmp.place_new().unwrap());
        assert_eq!(std::fs::read(d.path().join("x.deb")).unwrap(), b"first");
        let mut tmp = dir.temp_file("y.deb").unwrap();
        tmp.file.write_all(b"new").unwrap();
        assert!(tmp.place_new().unwrap());
        assert_eq!(std::fs::read(d.path().join("y.deb")).unwrap(), b"new");
        // A temporary dropped unplaced (an error on the way) is gone.
        drop(dir.temp_file("z.deb").unwrap());
        assert!(hidden(d.path()).is_empty());
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 2);
    }

    #[test]
    fn a_base_tree_that_does_not_match_its_record_is_a_miss() {
        let d = tempfile::tempdir().unwrap();
        let cache = Cache::open(&d.path().join("cache")).unwrap();
        let root = d.path().join("root");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/motd"), "hi").unwrap();
        let tar = cache.store_base("k", &root).unwrap();
        let record = digest_record(&tar);
        assert!(cache.verified_base("k").is_some());
        // One byte changed in place: same size, other digest.
        let mut bytes = std::fs::read(&tar).unwrap();
        bytes[600] ^= 0xff;
        std::fs::write(&tar, &bytes).unwrap();
        assert!(cache.verified_base("k").is_none());
        assert!(!tar.exists() && !record.exists(), "the entry is removed");

        cache.store_base("k", &root).unwrap();
        std::fs::remove_file(&record).unwrap();
        assert!(cache.verified_base("k").is_none(), "no record, no trust");
        assert!(!tar.exists());
        assert!(cache.verified_base("k").is_none(), "a plain miss");

        // A key is a file name in bases/, nothing else.
        for key in ["", "../k", ".k", "a/b"] {
            assert!(cache.verified_base(key).is_none(), "{key}");
            assert!(cache.store_base(key, &root).is_err(), "{key}");
        }
    }

    #[test]
    fn a_base_tar_and_its_record_are_one_entry() {
        let d = tempfile::tempdir().unwrap();
        let cache = Cache::open(&d.path().join("cache")).unwrap();
        let root = d.path().join("root");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("f"), "x").unwrap();
        let tar = cache.store_base("k", &root).unwrap();
        let record = digest_record(&tar);
        let entries = cache.entries().unwrap();
        assert_eq!(entries.len(), 1, "{entries:?}");
        assert_eq!(entries[0].path, tar);
        assert_eq!(
            entries[0].size,
            std::fs::metadata(&tar).unwrap().len() + std::fs::metadata(&record).unwrap().len()
        );
        // A record without its tar: a store in progress, then, after an hour, a leftover.
        std::fs::write(cache.bases_dir().join("lone.tar.sha256"), "x").unwrap();
        assert_eq!(cache.entries().unwrap().len(), 1);
        make_old(&cache.bases_dir().join("lone.tar.sha256"));
        assert_eq!(cache.entries().unwrap().len(), 2);
        assert_eq!(cache.prune(0).unwrap().0, 2);
        assert_eq!(std::fs::read_dir(cache.bases_dir()).unwrap().count(), 0);
    }

    #[test]
    fn installed_trees_are_listed_bounded_and_pruned_with_their_records() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(&dir.path().join("c")).unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/hostname"), b"t\n").unwrap();
        let info = |i: usize| TreeInfo {
            context: "ctx".into(),
            requested: vec![format!("p{i}")],
            installed: [(format!("p{i}"), "1".into())].into(),
            base_status: "Package: base\n".into(),
            base_current: i.is_multiple_of(2),
        };
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(86400);
        for i in 0..=MAX_TREES {
            let tar = cache
                .store_tree(&format!("tree-{i}"), &root, &info(i))
                .unwrap();
            // Each older than the next: tree-0 is the least recently used.
            let t = old + std::time::Duration::from_secs(i as u64 * 60);
            std::fs::File::options()
                .write(true)
                .open(&tar)
                .unwrap()
                .set_times(std::fs::FileTimes::new().set_accessed(t).set_modified(t))
                .unwrap();
        }
        // Using tree-1 makes it the most recent: the next store removes tree-0 and tree-2.
        let (tar, got) = cache.verified_tree("tree-1").unwrap();
        assert_eq!(got, info(1));
        let dest = dir.path().join("out");
        std::fs::create_dir_all(&dest).unwrap();
        tar.restore(&dest).unwrap();
        assert_eq!(std::fs::read(dest.join("etc/hostname")).unwrap(), b"t\n");
        cache.store_tree("tree-new", &root, &info(99)).unwrap();
        let keys: Vec<String> = cache.tree_infos().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys.len(), MAX_TREES);
        assert!(!keys.contains(&"tree-0".to_string()) && !keys.contains(&"tree-2".to_string()));
        assert!(keys.contains(&"tree-1".to_string()) && keys.contains(&"tree-new".to_string()));
        // The records read back whole; one written before `base_current` existed reads as
        // not known to be current.
        let infos: std::collections::BTreeMap<String, TreeInfo> =
            cache.tree_infos().into_iter().collect();
        assert_eq!(infos["tree-4"], info(4));
        assert!(infos["tree-4"].base_current && !infos["tree-3"].base_current);
        let old_record = r#"{"context":"c","requested":[],"installed":{},"base_status":""}"#;
        assert!(
            !serde_json::from_str::<TreeInfo>(old_record)
                .unwrap()
                .base_current
        );
        assert!(hidden(&cache.trees_dir()).is_empty());
        // `cache list` shows each tree once, its records counted in its size; prune takes all.
        let entries: Vec<_> = cache
            .entries()
            .unwrap()
            .into_iter()
            .filter(|e| e.path.starts_with(cache.trees_dir()))
            .collect();
        assert_eq!(entries.len(), MAX_TREES);
        let tar_len = std::fs::metadata(cache.trees_dir().join("tree-1.tar"))
            .unwrap()
            .len();
        let e1 = entries
            .iter()
            .find(|e| e.path.ends_with("tree-1.tar"))
            .unwrap();
        assert!(e1.size > tar_len);
        cache.prune(0).unwrap();
        assert_eq!(std::fs::read_dir(cache.trees_dir()).unwrap().count(), 0);
        // A tree whose record is gone is no tree.
        cache.store_tree("tree-x", &root, &info(1)).unwrap();
        std::fs::remove_file(cache.trees_dir().join("tree-x.tar.info")).unwrap();
        assert!(cache.verified_tree("tree-x").is_none());
        assert!(cache.tree_infos().is_empty());
    }

    #[test]
    fn temporaries_of_an_interrupted_store_go_after_an_hour() {
        let d = tempfile::tempdir().unwrap();
        let cache = Cache::open(&d.path().join("cache")).unwrap();
        let fresh = cache.packages_dir().join(".a_1_all.deb.tmp-1");
        let old = cache.packages_dir().join(".b_1_all.deb.tmp-2");
        std::fs::write(&fresh, "x").unwrap();
        std::fs::write(&old, "x").unwrap();
        make_old(&old);
        let entries = cache.entries().unwrap();
        assert_eq!(entries.len(), 1, "{entries:?}");
        assert_eq!(entries[0].path, old);
        assert_eq!(cache.prune(0).unwrap(), (1, 1));
        assert!(fresh.exists() && !old.exists());
    }

    #[test]
    fn prune_removes_links_never_their_targets() {
        let d = tempfile::tempdir().unwrap();
        let cache = Cache::open(&d.path().join("cache")).unwrap();
        let victim = d.path().join("victim");
        std::fs::create_dir_all(victim.join("sub")).unwrap();
        std::fs::write(victim.join("file"), "keep").unwrap();
        std::fs::write(victim.join("sub/file"), "keep").unwrap();
        symlink(&victim, cache.bases_dir().join("evil")).unwrap();
        symlink(&victim, cache.bases_dir().join("evil.tar")).unwrap();
        symlink(
            victim.join("file"),
            cache.packages_dir().join("evil_1_all.deb"),
        )
        .unwrap();
        symlink("../../victim", cache.lists_dir().join("lists-x")).unwrap();
        symlink(&victim, cache.lists_dir().join("lists-y")).unwrap();
        symlink(".", cache.lists_dir().join("lists-z")).unwrap();
        // A real lists entry beside them goes whole: link and version directory.
        let image = d.path().join("image");
        let lists = image.join(LISTS);
        std::fs::create_dir_all(&lists).unwrap();
        std::fs::write(lists.join("m_InRelease"), "v1").unwrap();
        cache
            .store_lists(
                "lists-good",
                &crate::root::Root::open(&image).unwrap(),
                LISTS,
            )
            .unwrap();

        let entries = cache.entries().unwrap();
        assert_eq!(entries.len(), 7, "{entries:?}");
        assert_eq!(cache.prune(0).unwrap().0, 7);
        for part in [cache.packages_dir(), cache.bases_dir(), cache.lists_dir()] {
            assert_eq!(std::fs::read_dir(&part).unwrap().count(), 0, "{part:?}");
        }
        assert_eq!(
            std::fs::read_to_string(victim.join("file")).unwrap(),
            "keep"
        );
        assert_eq!(
            std::fs::read_to_string(victim.join("sub/file")).unwrap(),
            "keep"
        );
    }

    #[test]
    fn prune_removes_directories_in_the_pool_without_following_links_inside() {
        let d = tempfile::tempdir().unwrap();
        let cache = Cache::open(&d.path().join("cache")).unwrap();
        let victim = d.path().join("victim");
        std::fs::create_dir_all(&victim).unwrap();
        std::fs::write(victim.join("file"), "keep").unwrap();
        let stray = cache.packages_dir().join("stray");
        std::fs::create_dir_all(&stray).unwrap();
        std::fs::write(stray.join("x"), "xx").unwrap();
        symlink(&victim, stray.join("link")).unwrap();
        assert_eq!(cache.prune(0).unwrap(), (1, 2));
        assert!(!stray.exists());
        assert_eq!(
            std::fs::read_to_string(victim.join("file")).unwrap(),
            "keep"
        );
    }
}
