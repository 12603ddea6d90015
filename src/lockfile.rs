//! The lock file format: a build's package set, each package with its version, architecture,
//! the repository it came from and the sha256 that repository's index gives its file. What a
//! build does with one is [`crate::debian::lock`]'s.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// The lock file's format version.
pub const VERSION: u32 = 1;

/// A build's package set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lock {
    /// The lock format's version: 1.
    pub version: u32,
    /// The image's architecture.
    pub arch: String,
    /// Every installed package, sorted by name and architecture.
    pub packages: Vec<Locked>,
}

/// One installed package.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Locked {
    pub name: String,
    pub version: String,
    /// The package's architecture (`amd64`, `all`).
    pub arch: String,
    /// The spec's name of the repository it came from; none for a package of `local_debs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
    /// sha256 of the package file as the repository's index gives it (none without a repo).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

impl Lock {
    /// Reads and checks a lock file's text; `source` names it in errors.
    pub fn parse(text: &str, source: &str) -> Result<Lock> {
        let lock: Lock =
            serde_saphyr::from_str(text).with_context(|| format!("reading the lock {source}"))?;
        if lock.version != VERSION {
            bail!(
                "the lock {source} has version {}; this debimg reads version {VERSION}",
                lock.version
            );
        }
        let mut seen = std::collections::HashSet::new();
        for p in &lock.packages {
            if !seen.insert((&p.name, &p.arch)) {
                bail!("the lock {source} names {} ({}) twice", p.name, p.arch);
            }
            if p.repo.is_some() && p.sha256.is_none() {
                bail!("the lock {source} gives {} {} no sha256", p.name, p.version);
            }
        }
        Ok(lock)
    }

    /// The lock as its file holds it.
    pub fn render(&self, image: &str) -> Result<String> {
        let body = serde_saphyr::to_string(self).context("rendering the lock")?;
        Ok(format!(
            "# The packages of {image} as built: `debimg build --lock FILE` (or `lock:` in the \
             spec) installs exactly these.\n{body}"
        ))
    }

    /// Locked versions by package name.
    pub fn versions(&self) -> BTreeMap<String, String> {
        self.packages
            .iter()
            .map(|p| (p.name.clone(), p.version.clone()))
            .collect()
    }
}
