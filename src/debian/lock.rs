//! Lock files: every package a build installed, with its version, architecture, the repository
//! it came from and the sha256 that repository's index gives its file.
//!
//! Every build writes the lock of what it installed (`NAME.lock.yaml`) next to its metadata; a
//! build given a lock (`lock:` in the spec, `build --lock FILE`) installs exactly those
//! versions, the bootstrap's included: the install stage checks that every locked version is
//! still in its repository with the same file, pins each one (priority 1001: apt takes it,
//! downgrading if need be), and the finished tree must hold exactly the locked set.

use std::collections::{BTreeMap, HashMap};

use anyhow::{Context, Result, bail};

use crate::cmd::CommandRunExt;
use crate::debian::apt::{LISTS_DIR, release_list_prefix};
pub use crate::lockfile::{Lock, Locked, VERSION};
use crate::plan::PlannedRepo;
use crate::root::{Owner, Root};

/// Where the lock's pins are during the build (removed when the image is finished).
pub const PINS: &str = "etc/apt/preferences.d/debimg-lock.pref";

/// (name, version, architecture) to sha256, from one repository's `Packages` lists.
type RepoIndex = HashMap<(String, String, String), String>;

/// Each repository's index, from apt's lists in the tree (in the plan's order).
fn repo_indexes(root: &Root, repos: &[PlannedRepo]) -> Result<Vec<(String, RepoIndex)>> {
    let lists = root.read_dir(LISTS_DIR)?;
    let mut out = Vec::new();
    for repo in repos {
        let prefix = release_list_prefix(repo);
        let mut index = RepoIndex::new();
        for e in &lists {
            let name = e.name.to_string_lossy();
            if !e.file_type.is_file() || !name.starts_with(&prefix) || !name.ends_with("_Packages")
            {
                continue;
            }
            let data = root.read(format!("{LISTS_DIR}/{name}"))?;
            add_packages(&mut index, &data);
        }
        out.push((repo.name.clone(), index));
    }
    Ok(out)
}

/// Adds the stanzas of one `Packages` file to `index`.
fn add_packages(index: &mut RepoIndex, data: &[u8]) {
    for stanza in crate::debian::index::stanzas(data) {
        let get = |field: &str| {
            stanza
                .iter()
                .find(|(n, v)| n.eq_ignore_ascii_case(field.as_bytes()) && !v.is_empty())
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        };
        if let (Some(n), Some(v), Some(a), Some(s)) = (
            get("Package"),
            get("Version"),
            get("Architecture"),
            get("SHA256"),
        ) {
            index.insert((n, v, a), s.to_ascii_lowercase());
        }
    }
}

/// Parses `dpkg-query -W -f '${Package}\t${Version}\t${Architecture}\t${db:Status-Abbrev}\n'`:
/// (name, version, architecture) of each installed package.
pub fn parse_installed(text: &str) -> Vec<(String, String, String)> {
    let mut out: Vec<(String, String, String)> = text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (f.len() == 4 && f[3].trim_end() == "ii")
                .then(|| (f[0].into(), f[1].into(), f[2].into()))
        })
        .collect();
    out.sort();
    out
}

/// The lock of what the tree holds: each installed package from the first repository (in the
/// plan's order) whose index has its version, else none (a package of `local_debs`).
pub fn of_tree(root: &Root, arch: &str, repos: &[PlannedRepo]) -> Result<Lock> {
    let text = root
        .command("dpkg-query")
        .args([
            "-W",
            "-f",
            "${Package}\t${Version}\t${Architecture}\t${db:Status-Abbrev}\n",
        ])
        .run_stdout()
        .context("listing installed packages")?;
    let indexes = repo_indexes(root, repos)?;
    Ok(lock_of(&parse_installed(&text), &indexes, arch))
}

fn lock_of(
    installed: &[(String, String, String)],
    indexes: &[(String, RepoIndex)],
    arch: &str,
) -> Lock {
    let packages = installed
        .iter()
        .map(|(name, version, a)| {
            let key = (name.clone(), version.clone(), a.clone());
            let found = indexes
                .iter()
                .find_map(|(repo, index)| index.get(&key).map(|sha| (repo.clone(), sha.clone())));
            let (repo, sha256) = match found {
                Some((repo, sha)) => (Some(repo), Some(sha)),
                None => (None, None),
            };
            Locked {
                name: name.clone(),
                version: version.clone(),
                arch: a.clone(),
                repo,
                sha256,
            }
        })
        .collect();
    Lock {
        version: VERSION,
        arch: arch.to_string(),
        packages,
    }
}

/// Locked packages the repositories no longer have as locked (each as a line naming it), from
/// apt's lists in the tree.
pub fn unavailable(lock: &Lock, root: &Root, repos: &[PlannedRepo]) -> Result<Vec<String>> {
    let indexes = repo_indexes(root, repos)?;
    Ok(missing_from(lock, &indexes))
}

fn missing_from(lock: &Lock, indexes: &[(String, RepoIndex)]) -> Vec<String> {
    let mut out = Vec::new();
    for p in &lock.packages {
        let Some(repo) = &p.repo else { continue };
        let shown = format!("{} {} ({}) from `{repo}`", p.name, p.version, p.arch);
        let Some((_, index)) = indexes.iter().find(|(r, _)| r == repo) else {
            out.push(format!("{shown}: the spec has no repository `{repo}`"));
            continue;
        };
        match index.get(&(p.name.clone(), p.version.clone(), p.arch.clone())) {
            None => out.push(shown),
            Some(sha) if Some(sha) != p.sha256.as_ref() => out.push(format!(
                "{shown}: the repository's file is another one (sha256 {sha}, locked {})",
                p.sha256.as_deref().unwrap_or("-")
            )),
            Some(_) => {}
        }
    }
    out
}

/// apt preferences that make each locked version the one apt installs (1001: over any other,
/// downgrading if need be).
pub fn render_pins(lock: &Lock) -> String {
    let mut s = String::from("# debimg: the build's lock (removed when the image is finished).\n");
    let mut seen = std::collections::HashSet::new();
    for p in lock.packages.iter().filter(|p| p.repo.is_some()) {
        if seen.insert(&p.name) {
            s.push_str(&format!(
                "\nPackage: {}\nPin: version {}\nPin-Priority: 1001\n",
                p.name, p.version
            ));
        }
    }
    s
}

/// Before the install: fails naming every locked version its repository no longer has, else
/// writes the pins.
pub fn apply(lock: &Lock, root: &Root, repos: &[PlannedRepo], source: &str) -> Result<()> {
    let missing = unavailable(lock, root, repos)?;
    if !missing.is_empty() {
        bail!(
            "the lock {source} names {} package version(s) the repositories no longer have:\n  {}",
            missing.len(),
            missing.join("\n  ")
        );
    }
    root.write(PINS, render_pins(lock).as_bytes(), 0o644, Owner::ROOT)
}

/// After the image is finished: the pins removed, and the tree must hold exactly the locked
/// set (`installed`: every package and version).
pub fn finish(lock: &Lock, root: &Root, installed: &BTreeMap<String, String>) -> Result<()> {
    root.remove_file(PINS)?;
    let want = lock.versions();
    if *installed != want {
        bail!(
            "the image does not hold exactly the locked packages: {}",
            crate::debian::trees::differences(installed, &want)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(entries: &[(&str, &str, &str, &str)]) -> RepoIndex {
        entries
            .iter()
            .map(|(n, v, a, s)| ((n.to_string(), v.to_string(), a.to_string()), s.to_string()))
            .collect()
    }

    #[test]
    fn packages_index_entries_are_read_from_stanzas() {
        let mut i = RepoIndex::new();
        add_packages(
            &mut i,
            b"Package: less\nVersion: 590-2.1\nArchitecture: amd64\nSHA256: ABCD\nDescription: x\n continued\n\nPackage: nosum\nVersion: 1\nArchitecture: all\n",
        );
        assert_eq!(i, index(&[("less", "590-2.1", "amd64", "abcd")]));
    }

    #[test]
    fn the_lock_names_the_first_repo_with_the_version_else_local() {
        let installed = parse_installed(
            "less\t590-2.1\tamd64\tii \nmine\t1.0\tall\tii \ngone\t2\tall\trc \nbash\t5.2\tamd64\tii \n",
        );
        assert_eq!(installed.len(), 3, "{installed:?}");
        let idx = vec![
            (
                "debian".to_string(),
                index(&[("less", "590-2.1", "amd64", "s1")]),
            ),
            (
                "updates".to_string(),
                index(&[
                    ("less", "590-2.1", "amd64", "s2"),
                    ("bash", "5.2", "amd64", "s3"),
                ]),
            ),
        ];
        let lock = lock_of(&installed, &idx, "amd64");
        let shown: Vec<(&str, Option<&str>, Option<&str>)> = lock
            .packages
            .iter()
            .map(|p| (p.name.as_str(), p.repo.as_deref(), p.sha256.as_deref()))
            .collect();
        assert_eq!(
            shown,
            [
                ("bash", Some("updates"), Some("s3")),
                ("less", Some("debian"), Some("s1")),
                ("mine", None, None)
            ]
        );
        // Rendered and read back, it is the same lock.
        let text = lock.render("img").unwrap();
        assert!(text.starts_with("# The packages of img"), "{text}");
        assert_eq!(Lock::parse(&text, "t").unwrap(), lock);
        // Nothing is missing from the repositories it came from.
        assert!(missing_from(&lock, &idx).is_empty());
        let pins = render_pins(&lock);
        assert!(pins.contains("\nPackage: less\nPin: version 590-2.1\nPin-Priority: 1001\n"));
        assert!(!pins.contains("mine"), "{pins}");
    }

    #[test]
    fn versions_the_repos_lost_are_each_named() {
        let lock = Lock {
            version: VERSION,
            arch: "amd64".into(),
            packages: vec![
                Locked {
                    name: "less".into(),
                    version: "551-1".into(),
                    arch: "amd64".into(),
                    repo: Some("debian".into()),
                    sha256: Some("old".into()),
                },
                Locked {
                    name: "bash".into(),
                    version: "5.2".into(),
                    arch: "amd64".into(),
                    repo: Some("debian".into()),
                    sha256: Some("other".into()),
                },
                Locked {
                    name: "jq".into(),
                    version: "1".into(),
                    arch: "amd64".into(),
                    repo: Some("extra".into()),
                    sha256: Some("x".into()),
                },
            ],
        };
        let idx = vec![(
            "debian".to_string(),
            index(&[
                ("less", "590-2.1", "amd64", "s1"),
                ("bash", "5.2", "amd64", "s3"),
            ]),
        )];
        let m = missing_from(&lock, &idx);
        assert_eq!(m.len(), 3, "{m:?}");
        assert_eq!(m[0], "less 551-1 (amd64) from `debian`");
        assert!(
            m[1].starts_with(
                "bash 5.2 (amd64) from `debian`: the repository's file is another one"
            )
        );
        assert!(
            m[2].contains("the spec has no repository `extra`"),
            "{}",
            m[2]
        );
    }

    #[test]
    fn a_lock_of_another_version_or_with_doubles_is_refused() {
        let bad = "version: 2\narch: amd64\npackages: []\n";
        assert!(
            Lock::parse(bad, "t")
                .unwrap_err()
                .to_string()
                .contains("version 2")
        );
        let double = "version: 1\narch: amd64\npackages:\n- {name: a, version: '1', arch: all, repo: x, sha256: y}\n- {name: a, version: '2', arch: all, repo: x, sha256: y}\n";
        assert!(format!("{:#}", Lock::parse(double, "t").unwrap_err()).contains("twice"));
        let unknown = "version: 1\narch: amd64\npackages: []\nextra: 1\n";
        assert!(Lock::parse(unknown, "t").is_err());
    }
}
