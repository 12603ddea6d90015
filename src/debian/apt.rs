//! apt inside the image: sources, per-repo pins, build-only settings, and the runs of apt-get.
//!
//! The rendering is pure and unit-tested; [`Apt`] carries it out in a chroot.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::{Context, Result, bail};

use crate::cache::Cache;
use crate::cmd::CommandRunExt;
use crate::plan::{Plan, PlannedRepo};
use crate::root::{Owner, Root};
use crate::spec::Proxies;

use crate::debian::release::{ReleaseMeta, parse_release};

/// The build-only apt configuration file, removed before the image is finished.
pub const BUILD_CONF: &str = "etc/apt/apt.conf.d/00debimg-build";

/// Build-only preferences that keep the spec's `exclude` patterns from being installed.
pub const EXCLUDE_PREFS: &str = "etc/apt/preferences.d/00debimg-exclude.pref";

/// Where local `.deb` files wait for apt inside the chroot (build-only).
pub const LOCAL_DEBS_DIR: &str = "var/cache/debimg-local-debs";

/// Where apt keeps its index files in the image.
pub const LISTS_DIR: &str = "var/lib/apt/lists";

/// Pins above this make apt prefer a version even when it is a downgrade (apt_preferences(5)).
pub const DOWNGRADE_PRIORITY: i32 = 1000;

/// A preferences file that gives every package matching an `exclude` pattern priority -1:
/// apt never installs it, and a package that needs it fails with apt's own explanation.
pub fn render_exclude_preferences(patterns: &[String]) -> String {
    let mut s = String::new();
    for p in patterns {
        let _ = write!(
            s,
            "Explanation: debimg (build-only): the spec excludes {p}\nPackage: {p}\nPin: version *\nPin-Priority: -1\n\n"
        );
    }
    s
}

/// Names apt-get reports it cannot find ("Unable to locate package X", "Package 'X' has no
/// installation candidate").
pub fn parse_missing_packages(lines: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for l in lines {
        let name = if let Some(rest) = l.split("Unable to locate package ").nth(1) {
            rest.split_whitespace().next()
        } else if let Some(rest) = l.strip_prefix("E: Package '") {
            rest.split('\'')
                .next()
                .filter(|_| l.contains("has no installation candidate"))
        } else {
            None
        };
        if let Some(n) = name
            && !out.iter().any(|x| x == n)
        {
            out.push(n.to_string());
        }
    }
    out
}

/// `/etc/apt/sources.list` for the repos.
pub fn render_sources(repos: &[PlannedRepo]) -> String {
    let mut s = String::from("# Written by debimg from the image spec.\n");
    for r in repos {
        let options = match (r.trusted, r.keyring_path()) {
            (true, _) => "[trusted=yes] ".to_string(),
            (false, Some(k)) => format!("[signed-by=/{k}] "),
            (false, None) => String::new(),
        };
        let line = format!("deb {options}{} {} {}", r.uri, r.suite, r.section);
        let _ = writeln!(s, "{}", line.trim_end());
    }
    s
}

/// A URI as apt's messages show it: no credentials, `file:///x` as `file:/x`, no trailing `/`.
fn apt_shown_uri(uri: &str) -> String {
    let uri = uri.trim_end_matches('/');
    if let Some(path) = uri.strip_prefix("file:///") {
        return format!("file:/{path}");
    }
    match uri.split_once("://") {
        Some((scheme, _)) => format!("{scheme}://{}", host_and_path(uri)),
        None => uri.to_string(),
    }
}

/// A URI without its scheme and credentials, as apt names it: `host:port/path`
/// (`file:///srv/r` gives `/srv/r`).
fn host_and_path(uri: &str) -> String {
    let rest = uri.split_once("://").map_or(uri, |(_, r)| r);
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let host = authority.rsplit('@').next().unwrap_or(authority);
    format!("{host}{path}")
}

/// What apt's lists call a repo's Release file, without the `InRelease`/`Release` ending:
/// its URI with `dists/<suite>/`, or for a flat repo its directory as written (`./` and all),
/// named as [`list_file_prefix`] names a URI (apt 2.6: `host_debian_dists_bookworm_`,
/// `_srv_repo_._`, `_srv_repo_._stable_`).
pub fn release_list_prefix(repo: &PlannedRepo) -> String {
    let base = repo.uri.trim_end_matches('/');
    if repo.is_flat() {
        apt_file_name(&format!("{base}/{}", repo.suite))
    } else {
        apt_file_name(&format!("{base}/dists/{}/", repo.suite))
    }
}

/// Reads apt-get update's output for the repos whose signature check failed and says, for
/// each, which repo it is and which key signed it (apt's `NO_PUBKEY <id>`), or that it is not
/// signed at all. Empty when the failure is something else.
pub fn explain_signature_failures(repos: &[PlannedRepo], lines: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for r in repos {
        // apt names the repo by its URI (without credentials; `file:///srv/r` as
        // `file:/srv/r`) and suite in its error lines.
        let uri = apt_shown_uri(&r.uri);
        let release_of = |l: &str| {
            l.contains(&format!("{uri} {} ", r.suite))
                || l.contains(&format!("{uri}/ {} ", r.suite))
                || l.ends_with(&format!("{uri} {}", r.suite))
                || l.contains(&format!("{uri}/dists/{}/", r.suite))
        };
        let mine: Vec<&String> = lines.iter().filter(|l| release_of(l)).collect();
        let mut ids: Vec<String> = Vec::new();
        for l in &mine {
            for part in l.split("NO_PUBKEY ").skip(1) {
                if let Some(id) = part.split_whitespace().next() {
                    let id = id.trim_end_matches(|c: char| !c.is_ascii_hexdigit());
                    if !ids.iter().any(|x| x == id) {
                        ids.push(id.to_string());
                    }
                }
            }
        }
        let unsigned = mine.iter().any(|l| l.contains("is not signed"));
        let keys = r
            .key_fingerprints
            .iter()
            .map(|f| crate::openpgp::key_id(f))
            .collect::<Vec<_>>()
            .join(", ");
        let given = if keys.is_empty() {
            "the keys in the image (Debian's archive keyring): give the repo its `key`".to_string()
        } else {
            format!("its `key` ({keys})")
        };
        let why = if !ids.is_empty() {
            format!(
                "its Release file is signed by key {}, which is not among {given}",
                ids.join(", ")
            )
        } else if unsigned && keys.is_empty() {
            "its Release file is not signed: for a repository without a signature, say so with \
             `trusted: true`"
                .to_string()
        } else if unsigned {
            format!("its Release file is not signed, although the repo has a `key` ({keys})")
        } else if mine.iter().any(|l| {
            l.contains("signatures couldn't be verified")
                || l.contains("signatures were invalid")
                || l.contains("GPG error")
        }) {
            format!("its Release file's signature could not be checked against {given}")
        } else {
            continue;
        };
        out.push(format!(
            "repo `{}` ({} {}): {why}",
            r.name,
            crate::redact::text(&r.uri),
            r.suite
        ));
    }
    out
}

/// An apt preferences file pinning every package of `repo` to its priority, matched on the
/// repo's Release fields and each of its components.
pub fn render_preferences(repo: &PlannedRepo, meta: &ReleaseMeta, priority: i32) -> Result<String> {
    let mut fields = Vec::new();
    let quote = |v: &str| v.replace(',', "\\,");
    // The codename, not the suite (`a=`): the suite moves (stable, oldstable, oldoldstable)
    // while the codename stays, and a pin on it would silently stop matching in the image later.
    // A repo without a codename is pinned on its suite.
    match (&meta.codename, &meta.suite) {
        (Some(_), _) => {}
        (None, Some(v)) => fields.push(format!("a={}", quote(v))),
        (None, None) => {}
    }
    if let Some(v) = &meta.codename {
        fields.push(format!("n={}", quote(v)));
    }
    if let Some(v) = &meta.origin {
        fields.push(format!("o={}", quote(v)));
    }
    if let Some(v) = &meta.label {
        fields.push(format!("l={}", quote(v)));
    }
    if fields.is_empty() && repo.is_flat() {
        bail!(
            "repo `{}` has a `priority`, but its Release file has no Origin, Label, Suite or \
             Codename, and a flat repository has no components: apt would have nothing to pin \
             it on. Give its Release an Origin (`apt-ftparchive \
             -o APT::FTPArchive::Release::Origin=NAME release .`)",
            repo.name
        );
    }
    let mut s = format!("# Pin for repo `{}` written by debimg.\n", repo.name);
    // A flat repository has no components: its pin is on its Release fields alone.
    let comps: Vec<Option<&str>> = if repo.is_flat() {
        vec![None]
    } else {
        repo.section.split_whitespace().map(Some).collect()
    };
    for comp in comps {
        let mut f = fields.clone();
        if let Some(c) = comp {
            f.push(format!("c={c}"));
        }
        let _ = write!(
            s,
            "\nPackage: *\nPin: release {}\nPin-Priority: {priority}\n",
            f.join(",")
        );
    }
    Ok(s)
}

/// Writes the build-only apt settings ([`render_build_conf`]) for `plan` into the tree.
pub fn write_build_conf(root: &Root, plan: &Plan) -> Result<()> {
    root.write(
        BUILD_CONF,
        render_build_conf(&plan.proxies).as_bytes(),
        0o644,
        Owner::ROOT,
    )
}

/// Build-only apt settings: no recommends, retries, proxies, keep the old config on conflicts.
pub fn render_build_conf(proxies: &Proxies) -> String {
    let mut s = String::from(
        "// debimg: build-only settings, removed before the image is finished.\n\
         APT::Install-Recommends \"false\";\n\
         APT::Install-Suggests \"false\";\n\
         APT::Get::Assume-Yes \"true\";\n\
         Acquire::Retries \"3\";\n\
         Acquire::Languages \"none\";\n\
         Dpkg::Options { \"--force-confdef\"; \"--force-confold\"; };\n\
         Dpkg::Use-Pty \"false\";\n",
    );
    if let Some(p) = &proxies.http {
        let _ = writeln!(s, "Acquire::http::Proxy \"{p}\";");
    }
    if let Some(p) = &proxies.https {
        let _ = writeln!(s, "Acquire::https::Proxy \"{p}\";");
    }
    for host in &proxies.direct {
        let _ = writeln!(s, "Acquire::http::Proxy::{host} \"DIRECT\";");
        let _ = writeln!(s, "Acquire::https::Proxy::{host} \"DIRECT\";");
    }
    s
}

/// The name apt gives a URI's file in its lists (`URItoFileName`): scheme and credentials
/// dropped, `\\|{}[]<>"^~_=!@#$%&*`, space, controls and non-ASCII as `%xx`, `/` as `_`.
/// A trailing `/` is dropped (the repos' URIs have none; apt adds its own).
pub fn list_file_prefix(uri: &str) -> String {
    apt_file_name(uri.trim_end_matches('/'))
}

fn apt_file_name(uri: &str) -> String {
    let mut out = String::new();
    for b in host_and_path(uri).bytes() {
        if b"\\|{}[]<>\"^~_=!@#$%&*".contains(&b) || b <= 0x20 || b >= 0x7f {
            let _ = write!(out, "%{b:02x}");
        } else if b == b'/' {
            out.push('_');
        } else {
            out.push(b as char);
        }
    }
    out
}

/// Parses `dpkg-query -W -f '${Package}\t${Version}\t${db:Status-Abbrev}\n'` output into the
/// installed packages.
pub fn parse_installed(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            let (name, version, status) = (f.next()?, f.next()?, f.next().unwrap_or("ii"));
            status
                .starts_with("ii")
                .then(|| (name.to_string(), version.to_string()))
        })
        .collect()
}

/// True when a repo is pinned above 1000: apt then installs its versions even where that
/// means a downgrade, and `apt-get` must be allowed to carry that out.
pub fn allows_downgrades(repos: &[PlannedRepo]) -> bool {
    repos
        .iter()
        .any(|r| r.priority.is_some_and(|p| p > DOWNGRADE_PRIORITY))
}

/// Carries out apt's part of the build in a chroot.
pub struct Apt<'a> {
    pub root: &'a Root,
    pub show: bool,
    /// apt-get runs with the kernel hooks' switch off: the initramfs is made once afterwards
    /// ([`crate::debian::initramfs`]).
    pub defer_initramfs: bool,
}

impl Apt<'_> {
    /// Writes the sources, the build-only settings, and runs `apt-get update`; with a cache,
    /// starts from the lists it holds for these sources and stores the result.
    /// With `fresh_lists` (mmdebstrap fetched and verified the lists in this build, seconds
    /// ago) and [`Apt::bootstrap_lists_cover`], apt's lists are those: the update would fetch
    /// the same Release file again and nothing else. Returns true then: the bootstrap installed
    /// the base from these very lists.
    pub fn configure_and_update(
        &self,
        plan: &Plan,
        cache: Option<&Cache>,
        fresh_lists: bool,
    ) -> Result<bool> {
        for r in plan.repos.iter().filter(|r| r.trusted) {
            tracing::warn!(
                "repo `{}` ({} {}) is used without a signature check (trusted: true): anyone \
                 who can change what it serves can change this image",
                r.name,
                crate::redact::text(&r.uri),
                r.suite
            );
        }
        for r in &plan.repos {
            if let (Some(path), Some(ring)) = (r.keyring_path(), &r.keyring) {
                self.root.write(&path, ring, 0o644, Owner::ROOT)?;
            }
        }
        let sources = render_sources(&plan.repos);
        self.root.write(
            "etc/apt/sources.list",
            sources.as_bytes(),
            0o644,
            Owner::ROOT,
        )?;
        write_build_conf(self.root, plan)?;
        self.root.create_dir_all(LISTS_DIR)?;
        // The keys are part of the key: lists verified against one key are not offered to a
        // build that gives the repo another.
        let keys: Vec<&str> = plan
            .repos
            .iter()
            .filter_map(|r| r.key_sha256.as_deref())
            .collect();
        let key = crate::cache::lists_key(&format!("{sources}{}", keys.join("\n")), &plan.arch);
        let bootstrap_lists = fresh_lists && self.bootstrap_lists_cover(plan)?;
        if bootstrap_lists {
            tracing::info!(
                "apt lists: the bootstrap's, fetched and verified in this build for the same \
                 repository"
            );
        } else {
            if let Some(c) = cache {
                let n = c.restore_lists(&key, self.root, LISTS_DIR)?;
                if n > 0 {
                    tracing::info!("apt lists: {n} files from the cache");
                }
            }
            if let Err(e) = self.apt_get(&["update"]) {
                let text = format!("{e:#}");
                let lines: Vec<String> = text.lines().map(str::to_string).collect();
                let why = explain_signature_failures(&plan.repos, &lines);
                if why.is_empty() {
                    return Err(e);
                }
                return Err(e.context(why.join("\n")));
            }
        }
        if let Some(c) = cache {
            c.store_lists(&key, self.root, LISTS_DIR)?;
        }
        Ok(bootstrap_lists)
    }

    /// Whether the lists in the tree are all an `apt-get update` of the plan's sources would
    /// fetch: the plan has one repository, the bootstrap's (same URI, suite, components and
    /// architecture), and its Release file and every component's package index are there.
    /// Only the bootstrap program's own lists can be there before the install stage's update
    /// (a cached base holds none). Extra index files (translations) come from the same apt
    /// run, with the same default targets.
    pub fn bootstrap_lists_cover(&self, plan: &Plan) -> Result<bool> {
        let [repo] = plan.repos.as_slice() else {
            return Ok(false);
        };
        if repo.uri != plan.bootstrap_mirror || repo.suite != plan.suite || repo.suite == "./" {
            return Ok(false);
        }
        if !self.root.exists(LISTS_DIR) {
            return Ok(false);
        }
        let names: Vec<String> = self
            .root
            .read_dir(LISTS_DIR)?
            .into_iter()
            .filter(|e| e.file_type.is_file())
            .map(|e| e.name.to_string_lossy().into_owned())
            .collect();
        let prefix = release_list_prefix(repo);
        if !names.contains(&format!("{prefix}InRelease")) {
            return Ok(false);
        }
        Ok(repo.section.split_whitespace().all(|component| {
            let packages = format!("{prefix}{component}_binary-{}_Packages", plan.arch);
            names.contains(&packages)
        }))
    }

    /// The packages apt's lists offer, with the size and sha256 each repository's (signed)
    /// index gives them: read after `update`, before anything from the packages runs.
    pub fn package_index(&self) -> Result<crate::debian::index::PackageIndex> {
        let mut index = crate::debian::index::PackageIndex::default();
        let mut compressed = 0;
        for e in self.root.read_dir(LISTS_DIR)? {
            let name = e.name.to_string_lossy();
            if !e.file_type.is_file() {
                continue;
            }
            if name.ends_with("_Packages") {
                index.add_packages(&self.root.read(format!("{LISTS_DIR}/{name}"))?);
            } else if name.contains("_Packages.") {
                compressed += 1;
            }
        }
        if compressed > 0 {
            tracing::warn!(
                "{compressed} compressed package index(es) in /{LISTS_DIR} not read: their \
                 packages are not taken from the cache"
            );
        }
        Ok(index)
    }

    /// Reads each repo's Release fields from apt's lists (after `update`).
    pub fn release_meta(&self, repo: &PlannedRepo) -> Result<ReleaseMeta> {
        let prefix = release_list_prefix(repo);
        for name in ["InRelease", "Release"] {
            let p = format!("{LISTS_DIR}/{prefix}{name}");
            if self.root.is_file(&p) {
                let text = self.root.read_to_string(&p)?;
                return Ok(parse_release(&text));
            }
        }
        bail!(
            "repo `{}`: apt fetched no Release file for {} {} (looked for {}*Release in /{LISTS_DIR})",
            repo.name,
            crate::redact::text(&repo.uri),
            repo.suite,
            crate::redact::text(&prefix),
        )
    }

    /// Writes a preferences file for every repo that has a priority; returns every repo's
    /// Release fields for the metadata.
    pub fn pin(&self, plan: &Plan) -> Result<Vec<ReleaseMeta>> {
        let mut metas = Vec::new();
        for repo in &plan.repos {
            let meta = match self.release_meta(repo) {
                Ok(m) => m,
                // A repository apt takes without a Release file (a `trusted` flat one made by
                // dpkg-scanpackages alone) has nothing to pin on, nor to say in the metadata.
                Err(e) if repo.priority.is_none() && repo.trusted => {
                    tracing::warn!("{e:#}");
                    ReleaseMeta::default()
                }
                Err(e) => return Err(e),
            };
            if let Some(prio) = repo.priority {
                self.root.write(
                    format!("etc/apt/preferences.d/debimg-{}.pref", repo.name),
                    render_preferences(repo, &meta, prio)?.as_bytes(),
                    0o644,
                    Owner::ROOT,
                )?;
                if prio > DOWNGRADE_PRIORITY {
                    tracing::info!(
                        "repo `{}` is pinned at {prio} (above {DOWNGRADE_PRIORITY}): its versions \
                         are installed even where that is a downgrade",
                        repo.name
                    );
                }
            }
            metas.push(meta);
        }
        Ok(metas)
    }

    /// Upgrades what debootstrap installed. With a pin above 1000 (`downgrades`), apt may have
    /// to downgrade what the bootstrap installed: allowed.
    pub fn dist_upgrade(&self, downgrades: bool) -> Result<()> {
        let mut args = vec!["dist-upgrade"];
        if downgrades {
            args.push("--allow-downgrades");
        }
        self.apt_get(&args)
    }

    /// Installs the spec's packages (after [`Apt::dist_upgrade`]).
    pub fn install(&self, packages: &[String], downgrades: bool) -> Result<()> {
        let res = self.install_leaving_processes(packages, downgrades);
        self.root.end_processes("apt-get install")?;
        res
    }

    /// [`Apt::install`] without ending what the maintainer scripts left running: the caller
    /// does, once whatever else it runs in the tree meanwhile (a simulation) is done.
    pub fn install_leaving_processes(&self, packages: &[String], downgrades: bool) -> Result<()> {
        if packages.is_empty() {
            return Ok(());
        }
        let mut args = vec!["install"];
        if downgrades {
            args.push("--allow-downgrades");
        }
        args.extend(packages.iter().map(String::as_str));
        self.apt_get_leaving_processes(&args)
    }

    /// Writes the build-only pins that keep excluded packages out.
    pub fn exclude(&self, patterns: &[String]) -> Result<()> {
        if patterns.is_empty() {
            return Ok(());
        }
        self.root.write(
            EXCLUDE_PREFS,
            render_exclude_preferences(patterns).as_bytes(),
            0o644,
            Owner::ROOT,
        )
    }

    /// The packages apt can install: asks apt (a simulated install) and drops every name it
    /// cannot find, with a warning each. Anything else apt objects to stays for the real run
    /// to report.
    pub fn drop_missing(&self, packages: &[String]) -> Result<Vec<String>> {
        let mut keep: Vec<String> = packages.to_vec();
        // Each round finds up to a screenful of missing names.
        for _ in 0..20 {
            if keep.is_empty() {
                break;
            }
            let mut cmd = self.root.command("apt-get");
            cmd.args(["--simulate", "-q", "install"]).args(&keep);
            let (code, _, tail) = cmd.run_accepting_output(&[0, 100])?;
            let missing = parse_missing_packages(&tail);
            if code == 0 || missing.is_empty() {
                break;
            }
            for m in &missing {
                tracing::warn!("package {m} is not in the repos: skipped (skip_missing: true)");
            }
            keep.retain(|p| !missing.contains(p));
        }
        Ok(keep)
    }

    /// Installs local `.deb` files, their dependencies resolved from the repos.
    pub fn install_local(&self, debs: &[crate::plan::LocalDeb], downgrades: bool) -> Result<()> {
        if debs.is_empty() {
            return Ok(());
        }
        let mut args = vec!["install".to_string()];
        if downgrades {
            args.push("--allow-downgrades".into());
        }
        for d in debs {
            let dest = format!("/{LOCAL_DEBS_DIR}/{}", d.file_name);
            self.root
                .copy_in(&d.path, &dest, 0o644, Owner::ROOT)
                .with_context(|| format!("copying {} into the image", d.path.display()))?;
            args.push(dest);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let res = self.apt_get(&args);
        self.root.remove_flat_dir(LOCAL_DEBS_DIR)?;
        res
    }

    /// Purges installed packages that match an `exclude` pattern (the bootstrap may have
    /// brought them); returns their names.
    pub fn purge_excluded(&self, patterns: &[String]) -> Result<Vec<String>> {
        if patterns.is_empty() {
            return Ok(Vec::new());
        }
        let installed = self.installed()?;
        let hits: Vec<String> = installed
            .keys()
            .filter(|p| {
                patterns
                    .iter()
                    .any(|pat| crate::spec::exclude_matches(pat, p))
            })
            .cloned()
            .collect();
        if !hits.is_empty() {
            let mut args = vec!["purge", "--auto-remove"];
            args.extend(hits.iter().map(String::as_str));
            self.apt_get(&args)
                .context("purging excluded packages the bootstrap installed")?;
        }
        Ok(hits)
    }

    /// What a cold install of `packages` ends with, by apt's simulation from the dpkg status
    /// `base_status` (written into the tree for the simulation, build-only): the base's
    /// packages with what the install adds or upgrades. None when a dist-upgrade of the base
    /// would change it: the install alone does not show that (simulated unless `base_current`
    /// says a build of the same context saw it change nothing).
    pub fn predict_from(
        &self,
        base_status: &str,
        base_current: bool,
        packages: &[String],
    ) -> Result<Option<BTreeMap<String, String>>> {
        const STATUS: &str = "var/lib/dpkg/status.debimg-base";
        // The simulation may run beside the real install: it writes neither apt's binary
        // cache nor its planner log (both the install's), only this build-only file.
        const PLANNER_LOG: &str = "var/lib/dpkg/status.debimg-base.eipp.xz";
        self.root
            .write(STATUS, base_status.as_bytes(), 0o644, Owner::ROOT)?;
        let simulate = |args: &[&str]| {
            let mut cmd = self.root.command("apt-get");
            cmd.args(["--simulate", "-q", "-o", "APT::Color=0"])
                .arg(format!("-o=Dir::State::status=/{STATUS}"))
                .arg("-o=Dir::Cache::pkgcache=")
                .arg(format!("-o=Dir::Log::Planner=/{PLANNER_LOG}"))
                .args(args);
            cmd.run_stdout()
                .with_context(|| format!("simulating apt-get {}", args.join(" ")))
        };
        let res = (|| {
            if !base_current {
                let up = crate::debian::trees::parse_simulation(&simulate(&["dist-upgrade"])?);
                if !up.installs.is_empty() || !up.removes.is_empty() {
                    return Ok(None);
                }
            }
            let mut args = vec!["install"];
            args.extend(packages.iter().map(String::as_str));
            let sim = crate::debian::trees::parse_simulation(&simulate(&args)?);
            let base = crate::debian::trees::status_installed(base_status);
            Ok(Some(crate::debian::trees::predicted(&base, &sim)))
        })();
        self.root.remove_file(STATUS)?;
        self.root.remove_file(PLANNER_LOG)?;
        res
    }

    /// Empties the package archive.
    pub fn clean(&self) -> Result<()> {
        self.apt_get(&["clean"])
    }

    /// Every installed package and its version.
    pub fn installed(&self) -> Result<BTreeMap<String, String>> {
        let out = self
            .root
            .command("dpkg-query")
            .args(["-W", "-f", "${Package}\t${Version}\t${db:Status-Abbrev}\n"])
            .run_stdout()
            .context("listing installed packages")?;
        Ok(parse_installed(&out))
    }

    /// Runs apt-get in the chroot, then ends whatever its maintainer scripts left running.
    fn apt_get(&self, args: &[&str]) -> Result<()> {
        let res = self.apt_get_leaving_processes(args);
        self.root.end_processes(&format!(
            "apt-get {}",
            args.first().copied().unwrap_or_default()
        ))?;
        res
    }

    fn apt_get_leaving_processes(&self, args: &[&str]) -> Result<()> {
        let mut cmd = self.root.command("apt-get");
        cmd.args(["-y", "-o", "APT::Color=0"]);
        if self.defer_initramfs {
            let (k, v) = crate::debian::initramfs::SKIP_ENV;
            cmd.env(k, v);
        }
        if !self.show {
            cmd.arg("-q");
        }
        cmd.args(args);
        cmd.run_streaming(self.show).with_context(|| {
            format!(
                "apt-get {} in {}",
                args.join(" "),
                self.root.path().display()
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INRELEASE: &str = "-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA512\n\nOrigin: Debian\nLabel: Debian-Security\nSuite: stable-security\nVersion: 12\nCodename: bookworm-security\nDate: Sat, 21 Nov 2026 10:00:00 UTC\nMD5Sum:\n 0123 12 main/Release\n-----BEGIN PGP SIGNATURE-----\n\nxyz\n-----END PGP SIGNATURE-----\n";

    fn repo(section: &str) -> PlannedRepo {
        PlannedRepo {
            name: "security".into(),
            uri: "http://m.example/debian-security".into(),
            suite: "bookworm-security".into(),
            section: section.into(),
            priority: Some(100),
            trusted: false,
            keyring: None,
            key_sha256: None,
            key_fingerprints: Vec::new(),
        }
    }

    #[test]
    fn only_the_bootstrap_repos_complete_lists_stand_for_an_update() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::open(dir.path()).unwrap();
        let apt = Apt {
            root: &root,
            show: false,
            defer_initramfs: false,
        };
        let spec = "version: 1\nname: t\nsuite: bookworm\nkind: tarball\n";
        let mut plan = Plan::for_test(spec);
        plan.repos[0].section = "main contrib".into();
        plan.bootstrap_mirror = plan.repos[0].uri.clone();
        // No lists at all (a base tree from the cache): update.
        assert!(!apt.bootstrap_lists_cover(&plan).unwrap());
        root.create_dir_all(LISTS_DIR).unwrap();
        let prefix = release_list_prefix(&plan.repos[0]);
        let put = |name: &str| {
            let path = format!("{LISTS_DIR}/{prefix}{name}");
            root.write(&path, b"x", 0o644, Owner::ROOT).unwrap();
        };
        put("InRelease");
        put("main_binary-amd64_Packages");
        // contrib's index is missing.
        assert!(!apt.bootstrap_lists_cover(&plan).unwrap());
        put("contrib_binary-amd64_Packages");
        assert!(apt.bootstrap_lists_cover(&plan).unwrap());
        // A second repository has no lists from the bootstrap.
        let mut two = plan.clone();
        two.repos.push(repo("main"));
        assert!(!apt.bootstrap_lists_cover(&two).unwrap());
        // Another architecture's index is not this one.
        let mut arm = plan.clone();
        arm.arch = "arm64".into();
        assert!(!apt.bootstrap_lists_cover(&arm).unwrap());
    }

    #[test]
    fn keyed_and_flat_repos_in_sources_pins_and_lists() {
        let mut keyed = repo("main");
        keyed.name = "vendor".into();
        keyed.keyring = Some(vec![0x99]);
        keyed.key_fingerprints = vec!["0123456789ABCDEF0123456789ABCDEF01234567".into()];
        let mut flat = repo("");
        flat.name = "team".into();
        flat.uri = "file:///srv/team-repo".into();
        flat.suite = "./".into();
        let mut sub = flat.clone();
        sub.suite = "./stable/".into();
        let s = render_sources(&[keyed.clone(), flat.clone()]);
        assert!(
            s.contains(
                "deb [signed-by=/etc/apt/keyrings/debimg-vendor.gpg] http://m.example/debian-security bookworm-security main\n"
            ),
            "{s}"
        );
        assert!(s.contains("deb file:///srv/team-repo ./\n"), "{s}");
        // apt's list file names (checked against apt 2.6's own).
        assert_eq!(release_list_prefix(&flat), "_srv_team-repo_._");
        assert_eq!(release_list_prefix(&sub), "_srv_team-repo_._stable_");
        sub.suite = "stable/".into();
        assert_eq!(release_list_prefix(&sub), "_srv_team-repo_stable_");
        // apt quotes `_`, `~` and the like (seen in apt 2.6's lists).
        sub.uri = "file:///tmp/re_po~x".into();
        sub.suite = "my_repo/".into();
        assert_eq!(release_list_prefix(&sub), "_tmp_re%5fpo%7ex_my%5frepo_");
        assert_eq!(
            release_list_prefix(&keyed),
            "m.example_debian-security_dists_bookworm-security_"
        );
        let meta = ReleaseMeta {
            origin: Some("Team".into()),
            ..Default::default()
        };
        let p = render_preferences(&flat, &meta, 990).unwrap();
        assert!(
            p.contains("Pin: release o=Team\nPin-Priority: 990\n"),
            "{p}"
        );
        assert!(!p.contains("c="), "{p}");
        // A flat Release with nothing to pin on is refused, not pinned on everything.
        let e = render_preferences(&flat, &ReleaseMeta::default(), 990)
            .unwrap_err()
            .to_string();
        assert!(e.contains("repo `team`") && e.contains("Origin"), "{e}");
    }

    #[test]
    fn signature_failures_name_the_repo_and_the_key() {
        let mut keyed = repo("main");
        keyed.name = "vendor".into();
        keyed.uri = "http://127.0.0.1:8000/repo".into();
        keyed.suite = "./".into();
        keyed.keyring = Some(vec![0x99]);
        keyed.key_fingerprints = vec!["0123456789ABCDEF0123456789ABCDEF01234567".into()];
        let mut plain = repo("main");
        plain.name = "team".into();
        let lines: Vec<String> = [
            "W: GPG error: http://127.0.0.1:8000/repo ./ InRelease: The following signatures couldn't be verified because the public key is not available: NO_PUBKEY 6C8E1F0B2A3D4E5F",
            "E: The repository 'http://127.0.0.1:8000/repo ./ InRelease' is not signed.",
            "E: The repository 'http://m.example/debian-security bookworm-security Release' is not signed.",
            "W: GPG error: file:/srv/team ./ InRelease: The following signatures couldn't be verified because the public key is not available: NO_PUBKEY C0924B144CA115A1",
        ]
        .map(str::to_string)
        .to_vec();
        let mut flat = plain.clone();
        flat.name = "flat".into();
        flat.uri = "file:///srv/team".into();
        flat.suite = "./".into();
        let why = explain_signature_failures(&[keyed.clone(), plain.clone(), flat], &lines);
        assert_eq!(why.len(), 3, "{why:?}");
        assert!(why[2].contains("repo `flat` (file:///srv/team ./): its Release file is signed by key C0924B144CA115A1"), "{}", why[2]);
        assert!(
            why[0].starts_with("repo `vendor` (http://127.0.0.1:8000/repo ./)"),
            "{}",
            why[0]
        );
        assert!(
            why[0].contains("signed by key 6C8E1F0B2A3D4E5F"),
            "{}",
            why[0]
        );
        assert!(
            why[0].contains("its `key` (89ABCDEF01234567)"),
            "{}",
            why[0]
        );
        assert!(why[1].contains("repo `team`"), "{}", why[1]);
        assert!(why[1].contains("is not signed"), "{}", why[1]);
        assert!(why[1].contains("`trusted: true`"), "{}", why[1]);
        // apt shows URIs without their credentials.
        let mut secret = keyed.clone();
        secret.uri = "http://u:pw@127.0.0.1:8000/repo".into();
        let why = explain_signature_failures(&[secret], &lines);
        assert!(
            why[0].contains("(http://u:***@127.0.0.1:8000/repo ./)"),
            "{why:?}"
        );
        assert!(why[0].contains("signed by key 6C8E1F0B2A3D4E5F"), "{why:?}");
        // Another failure (a 404) explains nothing.
        let other = vec!["E: Failed to fetch http://m.example/x  404  Not Found".to_string()];
        assert!(explain_signature_failures(&[plain], &other).is_empty());
    }

    #[test]
    fn release_fields() {
        let m = parse_release(INRELEASE);
        assert_eq!(m.origin.as_deref(), Some("Debian"));
        assert_eq!(m.label.as_deref(), Some("Debian-Security"));
        assert_eq!(m.suite.as_deref(), Some("stable-security"));
        assert_eq!(m.codename.as_deref(), Some("bookworm-security"));
        assert_eq!(m.version.as_deref(), Some("12"));
    }

    #[test]
    fn preferences_per_component() {
        let m = parse_release(INRELEASE);
        let p = render_preferences(&repo("main contrib"), &m, 100).unwrap();
        assert!(p.contains(
            "Pin: release n=bookworm-security,o=Debian,l=Debian-Security,c=main\nPin-Priority: 100\n"
        ), "{p}");
        assert!(p.contains("c=contrib\nPin-Priority: 100"), "{p}");
    }

    #[test]
    fn sources_and_conf() {
        let mut trusted = repo("main");
        trusted.trusted = true;
        let s = render_sources(&[repo("main"), trusted]);
        assert!(s.contains("deb http://m.example/debian-security bookworm-security main\n"));
        assert!(s.contains(
            "deb [trusted=yes] http://m.example/debian-security bookworm-security main\n"
        ));
        let c = render_build_conf(&Proxies {
            http: Some("http://proxy:3128".into()),
            https: None,
            direct: vec!["local.example".into()],
        });
        assert!(c.contains("Acquire::http::Proxy \"http://proxy:3128\";"));
        assert!(c.contains("Acquire::http::Proxy::local.example \"DIRECT\";"));
        assert!(c.contains("APT::Install-Recommends \"false\";"));
    }

    #[test]
    fn list_prefix_like_apt() {
        assert_eq!(
            list_file_prefix("http://m.example/debian-security"),
            "m.example_debian-security"
        );
        assert_eq!(
            list_file_prefix("https://u:p@m.example:8080/d/"),
            "m.example:8080_d"
        );
    }

    #[test]
    fn exclude_pins_and_missing_names() {
        let p = render_exclude_preferences(&["*-doc".into(), "man-db".into()]);
        assert!(
            p.contains("Package: *-doc\nPin: version *\nPin-Priority: -1\n"),
            "{p}"
        );
        assert!(!p.contains("//"), "apt preferences have no comments: {p}");
        assert!(p.contains("Package: man-db\n"), "{p}");
        let lines: Vec<String> = [
            "E: Unable to locate package no-such-pkg",
            "E: Package 'virt' has no installation candidate",
            "E: Unable to locate package no-such-pkg",
            "W: something else",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(parse_missing_packages(&lines), ["no-such-pkg", "virt"]);
    }

    #[test]
    fn pins_above_1000_allow_downgrades() {
        let mut r = repo("main");
        assert!(!allows_downgrades(std::slice::from_ref(&r)));
        r.priority = Some(1000);
        assert!(!allows_downgrades(std::slice::from_ref(&r)));
        r.priority = Some(1001);
        assert!(allows_downgrades(&[repo("main"), r]));
    }

    #[test]
    fn installed_skips_removed() {
        let m = parse_installed("apt\t2.6.1\tii \nfoo\t1.0\trc \n");
        assert_eq!(m.len(), 1);
        assert_eq!(m["apt"], "2.6.1");
    }
}
