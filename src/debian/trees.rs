//! The installed-tree cache's decisions: what an installed tree is keyed by, which cached tree a
//! build starts from, and how a warm install is checked against the cold one.
//!
//! A tree is stored after the install stage under a key covering everything that decides it:
//! the base tree's key (which covers the mirror's Release file), every repository with its pin,
//! key and current Release file, the excludes, the local packages' digests, and the packages
//! asked for. A build with the same key starts from that tree and runs no apt at all. A build
//! asking for more packages than a cached tree of the same context (and no excludes, local
//! packages or `skip_missing`, whose effects a simulation does not show) starts from the tree
//! whose request is the largest subset of its own, and apt installs only the difference; what
//! it then has installed must equal what apt, simulating from the base's dpkg status, says a
//! cold build would install, package by package and version by version, or the build starts
//! again from the base.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use crate::cache::TreeInfo;
use crate::pack::digest::hex;
use crate::plan::Plan;

/// Where a build's tree came from, as the bootstrap stage decided.
#[derive(Debug, Clone, Default)]
pub enum Start {
    /// No installed-tree cache (none, disabled, or the Release files could not be read).
    #[default]
    Uncached,
    /// The base tree: the install stage installs everything and stores the result.
    Base { ctx: TreeContext },
    /// A cached installed tree: `exact` when it is this build's own key (no apt at all), else
    /// the closest subset, whose difference apt installs.
    Tree {
        ctx: TreeContext,
        key: String,
        info: Box<TreeInfo>,
        exact: bool,
    },
}

/// What every installed tree of one build configuration shares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeContext {
    /// The base tree's key (a fallback restores it).
    pub base_key: String,
    /// [`context`] of the plan and the repositories' Release files.
    pub context: String,
    /// The packages the spec asks for, sorted, without duplicates.
    pub requested: Vec<String>,
}

impl TreeContext {
    /// The key of this build's own installed tree.
    pub fn key(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"debimg installed tree 1\n");
        h.update(self.context.as_bytes());
        for p in &self.requested {
            h.update(b"\n");
            h.update(p.as_bytes());
        }
        format!("tree-{}", hex(&h.finalize()))
    }
}

/// The context digest: the base key, every repository (its name, where, which suite and
/// components, its pin, its key, whether it is trusted) with the SHA-256 of its current Release
/// file, the
/// excludes, the local packages' digests and `skip_missing`. A mirror update changes a Release
/// file and so every key.
pub fn context(plan: &Plan, base_key: &str, release_digests: &[String]) -> String {
    let mut h = Sha256::new();
    let mut line = |s: &str| {
        h.update(s.as_bytes());
        h.update(b"\n");
    };
    // How debimg installs (its build-only apt settings, say) may change between versions.
    line(concat!("debimg ", env!("CARGO_PKG_VERSION")));
    // A tree holds no initramfs made by the install: it is made at the configure stage, with
    // the image's files (`initramfs`). Trees made the other ways are not this way's.
    line("initramfs at configure, with the files");
    line(base_key);
    line(&plan.arch);
    for (r, d) in plan.repos.iter().zip(release_digests) {
        // The name too: it names the repo's keyring and pin files in the tree.
        line(&format!(
            "repo {} {} {} {} {:?} {:?} {} release {d}",
            r.name, r.uri, r.suite, r.section, r.priority, r.key_sha256, r.trusted
        ));
    }
    for e in &plan.exclude {
        line(&format!("exclude {e}"));
    }
    for d in &plan.local_debs {
        line(&format!("local {} {}", d.file_name, d.sha256));
    }
    line(&format!("skip_missing {}", plan.skip_missing));
    hex(&h.finalize())
}

/// Whether a build of `plan` may start from a tree built for fewer packages: not with excludes
/// (purged after the install), local packages or `skip_missing`, whose effects the simulation
/// that checks the result does not show.
pub fn subsets_allowed(plan: &Plan) -> bool {
    plan.exclude.is_empty() && plan.local_debs.is_empty() && !plan.skip_missing
}

/// The SHA-256 of each repository's current InRelease (or Release) file, fetched as the base
/// key's is, in the plan's order; the bootstrap mirror's suite is `mirror_digest`, which the
/// base key already fetched.
pub fn release_digests(plan: &Plan, scratch: &Path, mirror_digest: &str) -> Result<Vec<String>> {
    let fetch = |url: &str| crate::debian::fetch::download(url, &plan.proxies, scratch);
    plan.repos
        .iter()
        .map(|r| {
            if !r.is_flat() && r.uri == plan.bootstrap_mirror && r.suite == plan.suite {
                return Ok(mirror_digest.to_string());
            }
            let bytes = if r.is_flat() {
                let base = format!(
                    "{}/{}",
                    r.uri.trim_end_matches('/'),
                    r.suite.trim_end_matches('/')
                );
                fetch(&format!("{base}/InRelease")).or_else(|_| fetch(&format!("{base}/Release")))
            } else {
                crate::debian::fetch::release(&r.uri, &r.suite, &fetch)
            }
            .with_context(|| {
                format!(
                    "fetching the Release file of repo `{}` ({})",
                    r.name,
                    crate::redact::text(&r.uri)
                )
            })?;
            Ok(hex(&Sha256::digest(&bytes)))
        })
        .collect()
}

/// The packages the plan asks for, sorted and without duplicates.
pub fn requested(plan: &Plan) -> Vec<String> {
    let mut r = plan.packages.clone();
    r.sort();
    r.dedup();
    r
}

/// Among `infos`, the tree of the same context whose request is the largest strict subset of
/// `ctx.requested` (ties: the one with more installed); its key and record.
pub fn closest_subset(
    infos: Vec<(String, TreeInfo)>,
    ctx: &TreeContext,
) -> Option<(String, TreeInfo)> {
    infos
        .into_iter()
        .filter(|(_, i)| {
            i.context == ctx.context
                && i.requested.len() < ctx.requested.len()
                && i.requested
                    .iter()
                    .all(|p| ctx.requested.binary_search(p).is_ok())
        })
        .max_by_key(|(k, i)| (i.requested.len(), i.installed.len(), k.clone()))
}

/// What `apt-get --simulate` says it would do: the packages it installs or upgrades (name and
/// new version) and those it removes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Simulated {
    pub installs: BTreeMap<String, String>,
    pub removes: Vec<String>,
}

/// Parses `apt-get --simulate` output: `Inst NAME [OLD] (NEW SOURCE [ARCH])`, `Remv NAME [OLD]`;
/// a multi-arch `NAME:ARCH` loses its architecture, as dpkg-query's `${Package}` does.
pub fn parse_simulation(text: &str) -> Simulated {
    let mut out = Simulated::default();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let (Some(op), Some(name)) = (words.next(), words.next()) else {
            continue;
        };
        let name = name.split(':').next().unwrap_or(name).to_string();
        match op {
            "Inst" => {
                let Some(open) = line.find(" (") else {
                    continue;
                };
                let Some(version) = line[open + 2..].split_whitespace().next() else {
                    continue;
                };
                out.installs.insert(name, version.to_string());
            }
            "Remv" => out.removes.push(name),
            _ => {}
        }
    }
    out
}

/// The installed set a cold build would end with: the base's packages (from its dpkg status),
/// changed by what the simulation does.
pub fn predicted(base: &BTreeMap<String, String>, sim: &Simulated) -> BTreeMap<String, String> {
    let mut out = base.clone();
    for r in &sim.removes {
        out.remove(r);
    }
    for (n, v) in &sim.installs {
        out.insert(n.clone(), v.clone());
    }
    out
}

/// The installed packages and versions a dpkg status file lists (`Status: install ok
/// installed`).
pub fn status_installed(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for para in text.split("\n\n") {
        let (mut name, mut version, mut installed) = (None, None, false);
        for line in para.lines() {
            if let Some(v) = line.strip_prefix("Package: ") {
                name = Some(v.trim());
            } else if let Some(v) = line.strip_prefix("Version: ") {
                version = Some(v.trim());
            } else if let Some(v) = line.strip_prefix("Status: ") {
                installed = v.trim().ends_with(" installed");
            }
        }
        if let (Some(n), Some(v), true) = (name, version, installed) {
            out.insert(n.to_string(), v.to_string());
        }
    }
    out
}

/// The first differences between the installed set `got` and `want` (for the log).
pub fn differences(got: &BTreeMap<String, String>, want: &BTreeMap<String, String>) -> String {
    let mut d = Vec::new();
    for (n, v) in want {
        match got.get(n) {
            None => d.push(format!("{n} {v} missing")),
            Some(g) if g != v => d.push(format!("{n} {g} instead of {v}")),
            _ => {}
        }
    }
    for (n, v) in got {
        if !want.contains_key(n) {
            d.push(format!("{n} {v} extra"));
        }
    }
    let more = d.len().saturating_sub(5);
    d.truncate(5);
    if more > 0 {
        d.push(format!("and {more} more"));
    }
    d.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(ctx: &str, req: &[&str], installed: usize) -> TreeInfo {
        TreeInfo {
            context: ctx.into(),
            requested: req.iter().map(|s| s.to_string()).collect(),
            installed: (0..installed)
                .map(|i| (format!("p{i}"), "1".into()))
                .collect(),
            base_status: String::new(),
            base_current: true,
        }
    }

    #[test]
    fn the_closest_subset_of_the_same_context_is_chosen() {
        let ctx = TreeContext {
            base_key: "b".into(),
            context: "c".into(),
            requested: vec!["curl".into(), "less".into(), "nano".into()],
        };
        let infos = vec![
            ("k1".to_string(), info("c", &["less"], 10)),
            ("k2".to_string(), info("c", &["curl", "less"], 20)),
            ("k3".to_string(), info("other", &["curl", "less"], 30)),
            ("k4".to_string(), info("c", &["curl", "vim"], 40)),
            ("k5".to_string(), info("c", &["curl", "less", "nano"], 50)),
            ("k6".to_string(), info("c", &[], 5)),
        ];
        // k5 is the build's own key (exact hits are looked up by key), k3 another context, k4
        // not a subset.
        assert_eq!(closest_subset(infos.clone(), &ctx).unwrap().0, "k2");
        assert_eq!(closest_subset(infos[..1].to_vec(), &ctx).unwrap().0, "k1");
        assert!(closest_subset(infos[2..4].to_vec(), &ctx).is_none());
    }

    #[test]
    fn keys_change_with_the_request_and_the_context() {
        let plan = Plan::for_test(
            "version: 1\nname: t\nsuite: bookworm\nkind: tarball\npackages: [less]\n",
        );
        let c1 = context(&plan, "base", &["r1".into()]);
        let c2 = context(&plan, "base", &["r2".into()]);
        assert_ne!(
            c1, c2,
            "a mirror update (another Release file) changes the context"
        );
        assert_ne!(c1, context(&plan, "base2", &["r1".into()]));
        let k = |c: &str, r: &[&str]| {
            TreeContext {
                base_key: String::new(),
                context: c.into(),
                requested: r.iter().map(|s| s.to_string()).collect(),
            }
            .key()
        };
        assert_ne!(k(&c1, &["less"]), k(&c1, &["less", "nano"]));
        assert_ne!(k(&c1, &["less"]), k(&c2, &["less"]));
        assert_eq!(k(&c1, &["less"]), k(&c1, &["less"]));
        assert_eq!(requested(&plan), ["less"]);
    }

    #[test]
    fn simulation_and_status_are_read_as_apt_and_dpkg_write_them() {
        let sim = "NOTE: This is only a simulation!\n\
                   Inst libgpm2 (1.20.7-10+b1 Debian:12.8/stable [amd64])\n\
                   Inst nano (7.2-1+deb12u1 Debian:12.8/stable [amd64])\n\
                   Inst libc6:amd64 [2.36-9] (2.36-9+deb12u9 Debian-Security:12/stable-security [amd64])\n\
                   Remv tzdata [2024a-0+deb12u1]\n\
                   Conf nano (7.2-1+deb12u1 Debian:12.8/stable [amd64])\n";
        let s = parse_simulation(sim);
        assert_eq!(s.installs["nano"], "7.2-1+deb12u1");
        assert_eq!(s.installs["libc6"], "2.36-9+deb12u9");
        assert_eq!(s.installs.len(), 3);
        assert_eq!(s.removes, ["tzdata"]);
        let status = "Package: libc6\nStatus: install ok installed\nArchitecture: amd64\nVersion: 2.36-9\n\n\
                      Package: gone\nStatus: deinstall ok config-files\nVersion: 1\n\n\
                      Package: tzdata\nStatus: install ok installed\nVersion: 2024a-0+deb12u1\n";
        let base = status_installed(status);
        assert_eq!(base.len(), 2);
        let p = predicted(&base, &s);
        assert_eq!(p["libc6"], "2.36-9+deb12u9");
        assert!(!p.contains_key("tzdata") && !p.contains_key("gone"));
        assert_eq!(p.len(), 3);
        let mut got = p.clone();
        got.insert("nano".into(), "7.0".into());
        got.remove("libgpm2");
        got.insert("extra".into(), "1".into());
        assert_eq!(
            differences(&got, &p),
            "libgpm2 1.20.7-10+b1 missing, nano 7.0 instead of 7.2-1+deb12u1, extra 1 extra"
        );
    }
}
