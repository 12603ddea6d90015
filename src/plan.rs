//! Spec to Plan: the pure decisions of a build.
//!
//! Resolves `host` mirrors against the build host's apt sources, orders the mounts by depth,
//! names the outputs and computes the spec digest that decides whether an existing image can be
//! reused. Nothing here changes the system; the host's apt sources are read by the caller.

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::spec::{
    Attachment, Bootstrap, Container, Fs, Kind, PostScript, Proxies, Record, Services, Spec,
    SpecError, User, Variant, image_base_name, parse_mode,
};

/// The program that bootstraps the base system, once `auto` is decided.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Debootstrap,
    Mmdebstrap,
}

impl Backend {
    /// The program's name.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Debootstrap => "debootstrap",
            Backend::Mmdebstrap => "mmdebstrap",
        }
    }

    /// Decides `auto`: mmdebstrap when the host has it.
    pub fn resolve(choice: Bootstrap, host_has_mmdebstrap: bool) -> Backend {
        match choice {
            Bootstrap::Debootstrap => Backend::Debootstrap,
            Bootstrap::Mmdebstrap => Backend::Mmdebstrap,
            Bootstrap::Auto if host_has_mmdebstrap => Backend::Mmdebstrap,
            Bootstrap::Auto => Backend::Debootstrap,
        }
    }
}

/// Where host programs are looked for: PATH, then the system directories (a root shell's PATH
/// may lack the sbin ones).
pub fn program_dirs() -> Vec<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(std::path::PathBuf::from))
        .collect()
}

/// True when `program` is a file in one of [`program_dirs`].
pub fn host_has(program: &str) -> bool {
    program_dirs().iter().any(|d| d.join(program).is_file())
}

/// One apt source entry of the build host (`deb URI SUITE COMPONENTS...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSource {
    /// Base URI, without a trailing slash.
    pub uri: String,
    /// Suites served from this URI.
    pub suites: Vec<String>,
}

/// Parses one-line-style `sources.list` text (`deb [opts] URI SUITE COMP...`).
pub fn parse_sources_list(text: &str) -> Vec<HostSource> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let mut rest = match line.strip_prefix("deb ") {
            Some(r) => r.trim_start(),
            None => continue,
        };
        if rest.starts_with('[') {
            match rest.find(']') {
                Some(end) => rest = rest[end + 1..].trim_start(),
                None => continue,
            }
        }
        let mut words = rest.split_whitespace();
        if let (Some(uri), Some(suite)) = (words.next(), words.next()) {
            out.push(HostSource {
                uri: uri.trim_end_matches('/').to_string(),
                suites: vec![suite.to_string()],
            });
        }
    }
    out
}

/// Parses deb822 `.sources` text (stanzas with `Types:`, `URIs:`, `Suites:`).
pub fn parse_deb822_sources(text: &str) -> Vec<HostSource> {
    let mut out = Vec::new();
    for stanza in text.split("\n\n") {
        let mut types = Vec::new();
        let mut uris = Vec::new();
        let mut suites = Vec::new();
        let mut enabled = true;
        for line in stanza.lines() {
            if line.starts_with('#') {
                continue;
            }
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let words: Vec<String> = value.split_whitespace().map(String::from).collect();
            match key.trim().to_ascii_lowercase().as_str() {
                "types" => types = words,
                "uris" => uris = words,
                "suites" => suites = words,
                "enabled" => enabled = value.trim() != "no",
                _ => {}
            }
        }
        if !enabled || !types.iter().any(|t| t == "deb") || suites.is_empty() {
            continue;
        }
        for uri in uris {
            out.push(HostSource {
                uri: uri.trim_end_matches('/').to_string(),
                suites: suites.clone(),
            });
        }
    }
    out
}

/// Reads the apt sources of the host rooted at `root` (`/` for the build host).
pub fn read_host_sources(root: &Path) -> Result<Vec<HostSource>> {
    let mut out = Vec::new();
    let main = root.join("etc/apt/sources.list");
    if main.exists() {
        let text = std::fs::read_to_string(&main)
            .with_context(|| format!("reading {}", main.display()))?;
        out.extend(parse_sources_list(&text));
    }
    let dir = root.join("etc/apt/sources.list.d");
    if dir.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .with_context(|| format!("listing {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for path in entries {
            let ext = path.extension().and_then(|e| e.to_str());
            if !matches!(ext, Some("list" | "sources")) {
                continue;
            }
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            if ext == Some("list") {
                out.extend(parse_sources_list(&text));
            } else {
                out.extend(parse_deb822_sources(&text));
            }
        }
    }
    Ok(out.into_iter().filter(|s| is_usable_uri(&s.uri)).collect())
}

fn is_usable_uri(uri: &str) -> bool {
    uri.starts_with("http://") || uri.starts_with("https://") || uri.starts_with("file:/")
}

/// Finds the host URI that serves `suite`: an entry listing the suite itself, else one listing
/// its base codename (`bookworm` for `bookworm-backports`).
pub fn resolve_host_uri(sources: &[HostSource], suite: &str) -> Result<String> {
    if let Some(s) = sources.iter().find(|s| s.suites.iter().any(|x| x == suite)) {
        return Ok(s.uri.clone());
    }
    let base = suite.split('-').next().unwrap_or(suite);
    if let Some(s) = sources.iter().find(|s| s.suites.iter().any(|x| x == base)) {
        return Ok(s.uri.clone());
    }
    let known: Vec<String> = sources
        .iter()
        .map(|s| format!("{} ({})", s.uri, s.suites.join(" ")))
        .collect();
    if known.is_empty() {
        bail!(
            "`host` mirror: the build host has no apt sources in /etc/apt/sources.list or /etc/apt/sources.list.d; give `mirror:` a URL"
        )
    }
    bail!(
        "`host` mirror: no apt source of the build host serves suite `{suite}` (it has: {}); give a URL instead",
        known.join(", ")
    )
}

/// The kind of a suite: what follows its codename (`security` for `trixie-security`), none
/// for a plain codename or alias (`trixie`, `stable`).
fn suite_kind(suite: &str) -> Option<&str> {
    suite.split_once('-').map(|(_, kind)| kind)
}

/// The order in which the host's URIs are asked for a suite none of its sources lists: each
/// URI once; first those listing a suite of the same kind (a `-security` suite for
/// `trixie-security`, a plain codename for `trixie`), then those listing a plain codename (the
/// main archive), then the rest; within each group in the order of the host's sources.
pub fn probe_order(sources: &[HostSource], suite: &str) -> Vec<String> {
    let mut uris: Vec<(&str, Vec<&str>)> = Vec::new();
    for s in sources {
        let suites = s.suites.iter().map(String::as_str);
        match uris.iter_mut().find(|(u, _)| *u == s.uri) {
            Some((_, listed)) => listed.extend(suites),
            None => uris.push((&s.uri, suites.collect())),
        }
    }
    let wanted = suite_kind(suite);
    uris.sort_by_key(|(_, listed)| {
        if listed.iter().any(|s| suite_kind(s) == wanted) {
            0
        } else if listed.iter().any(|s| suite_kind(s).is_none()) {
            1
        } else {
            2
        }
    });
    uris.into_iter().map(|(u, _)| u.to_string()).collect()
}

/// Asks the host's URIs, in [`probe_order`], for `suite`'s Release file (`InRelease`, else
/// `Release`, by `fetch`: one URL to its bytes) and returns the first URI whose Release names
/// the suite as its `Suite` or `Codename`. Only the URI is chosen here: apt and the bootstrap
/// verify the signature when they use it. A download that failed (a
/// [`crate::debian::fetch::FetchError`]) is an answer and the next URI is asked; any other
/// error (an interrupt) ends the search. The error lists every URI asked and what it answered.
pub fn probe_host_uri(
    sources: &[HostSource],
    suite: &str,
    fetch: &dyn Fn(&str) -> Result<Vec<u8>>,
) -> Result<String> {
    let mut answers = Vec::new();
    for uri in probe_order(sources, suite) {
        let answer = match crate::debian::fetch::release(&uri, suite, fetch) {
            Ok(bytes) => {
                let meta = crate::debian::release::parse_release(&String::from_utf8_lossy(&bytes));
                if [&meta.suite, &meta.codename]
                    .iter()
                    .any(|v| v.as_deref() == Some(suite))
                {
                    tracing::info!(
                        "`host` mirror: {} serves suite `{suite}`",
                        crate::redact::text(&uri)
                    );
                    return Ok(uri);
                }
                format!(
                    "a Release of Suite `{}`, Codename `{}`",
                    meta.suite.as_deref().unwrap_or("-"),
                    meta.codename.as_deref().unwrap_or("-")
                )
            }
            Err(e) => match e.downcast_ref::<crate::debian::fetch::FetchError>() {
                Some(failed) => failed.answer.clone(),
                None => {
                    return Err(e.context(format!(
                        "asking {} for suite `{suite}`",
                        crate::redact::text(&uri)
                    )));
                }
            },
        };
        answers.push(format!("{}: {answer}", crate::redact::text(&uri)));
    }
    let known: Vec<String> = sources
        .iter()
        .map(|s| format!("{} ({})", crate::redact::text(&s.uri), s.suites.join(" ")))
        .collect();
    bail!(
        "`host` mirror: no apt source of the build host serves suite `{suite}` (it has: {}; asked for dists/{suite}/InRelease and Release, {}); give a URL instead",
        known.join(", "),
        answers.join("; ")
    )
}

/// The host URI for `suite`: [`resolve_host_uri`]'s, else the first URI of the host that serves
/// the suite although no source lists it ([`probe_host_uri`]).
pub fn find_host_uri(
    sources: &[HostSource],
    suite: &str,
    fetch: &dyn Fn(&str) -> Result<Vec<u8>>,
) -> Result<String> {
    match resolve_host_uri(sources, suite) {
        Ok(uri) => Ok(uri),
        Err(e) if sources.is_empty() => Err(e),
        Err(_) => probe_host_uri(sources, suite, fetch),
    }
}

/// A repo with its URI resolved.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PlannedRepo {
    pub name: String,
    pub uri: String,
    pub suite: String,
    pub section: String,
    pub priority: Option<i32>,
    /// Used without a signature (`[trusted=yes]`), as the spec asks explicitly; part of the
    /// digest, so the reuse key changes with it.
    pub trusted: bool,
    /// The repo's own keys (`key:`) as one binary keyring: apt checks the repo against it
    /// only (`signed-by=`). Its sha256 and fingerprints are in the digest.
    #[serde(skip)]
    pub keyring: Option<Vec<u8>>,
    /// sha256 of [`Self::keyring`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_sha256: Option<String>,
    /// The primary keys' fingerprints, as the metadata lists them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub key_fingerprints: Vec<String>,
}

impl PlannedRepo {
    /// A flat repository (`suite: ./`): no `dists/`, no components.
    pub fn is_flat(&self) -> bool {
        crate::spec::is_flat_suite(&self.suite)
    }

    /// Where its keyring is in the image, when it has one (without the leading `/`).
    pub fn keyring_path(&self) -> Option<String> {
        self.keyring
            .as_ref()
            .map(|_| format!("{KEYRINGS_DIR}/debimg-{}.gpg", self.name))
    }

    /// Sets the repo's keys from `key:` (inline armored text, or a file relative to `base`).
    fn load_key(&mut self, key: &str, base: &Path) -> Result<()> {
        let data = if crate::openpgp::is_armored(key) {
            key.as_bytes().to_vec()
        } else {
            let path = base.join(key);
            crate::spec::read_input_bytes(&path, "a key file")
                .map_err(|e| anyhow!("`{}`: {e}", path.display()))?
        };
        let ring = crate::openpgp::keyring(&data).map_err(|e| anyhow!("{e}"))?;
        self.key_sha256 = Some(crate::pack::digest::hex(&Sha256::digest(&ring.bytes)));
        self.key_fingerprints = ring.fingerprints;
        self.keyring = Some(ring.bytes);
        Ok(())
    }
}

/// Where repos' keyrings go in the image (apt's place for `signed-by=` keys).
pub const KEYRINGS_DIR: &str = "etc/apt/keyrings";

/// An image with its output names decided.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PlannedImage {
    pub mount: String,
    pub fs: Fs,
    pub size: u64,
    pub label: Option<String>,
    pub mkfs_options: Vec<String>,
    pub container: Container,
    /// File name of the raw image (`<base>.img`).
    pub raw_name: String,
    /// File name shipped in the output directory (`<base>.img.gz` or `<base>.img`).
    pub container_name: String,
}

/// Everything a build needs, decided up front.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Plan {
    pub name: String,
    pub arch: String,
    pub suite: String,
    pub variant: Variant,
    /// The program that bootstraps the base system.
    pub backend: Backend,
    /// The URI the bootstrap downloads from (the first repo's).
    pub bootstrap_mirror: String,
    pub bootstrap_include: Vec<String>,
    pub repos: Vec<PlannedRepo>,
    pub packages: Vec<String>,
    /// Images in spec order.
    pub images: Vec<PlannedImage>,
    /// Indexes into `images`, parents before children.
    pub mount_order: Vec<usize>,
    pub proxies: Proxies,
    pub root_password_hash: Option<String>,
    pub hostname: String,
    pub keep_apt_sources: bool,
    /// What the build produces.
    pub kind: Kind,
    pub timezone: Option<String>,
    pub locale: Option<String>,
    pub users: Vec<User>,
    pub services: Services,
    /// Files for the image, their sources read and hashed.
    pub files: Vec<PlannedFile>,
    /// `exclude` patterns.
    pub exclude: Vec<String>,
    pub skip_missing: bool,
    /// Local packages, hashed.
    pub local_debs: Vec<LocalDeb>,
    pub post: Vec<PostScript>,
    pub records: Vec<Record>,
    pub copy_kernel: bool,
    /// Build reproducibly as of this time ([`crate::reproducible`]): the spec's
    /// `source_date_epoch`, else `SOURCE_DATE_EPOCH` from the environment of `for_host`.
    pub source_date_epoch: Option<u64>,
    /// The lock the build installs from (its whole content is part of the digest).
    pub lock: Option<crate::lockfile::Lock>,
    /// Where the lock was read from, for messages.
    #[serde(skip)]
    pub lock_source: String,
    /// What is copied out of the image into `<name>.attachments/`, as the spec says it: part of
    /// the digest, so a changed list is a new build.
    pub attachments: Vec<Attachment>,
    /// The disk of `kind: disk`.
    pub disk: Option<crate::spec::Disk>,
    /// sha256 of everything above plus the debimg version: equal digests, equal images.
    #[serde(skip)]
    pub digest: String,
    /// The digest without the lock: what a reproducible build derives its identifiers (UUIDs,
    /// GUIDs, the SBOMs' names) from, so that a build from a lock gives the images a build of
    /// the same packages without it gives.
    #[serde(skip)]
    pub seed: String,
}

/// A file the build copies into the image.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PlannedFile {
    /// The host file to copy (absolute), or none for inline content.
    #[serde(skip)]
    pub source: Option<std::path::PathBuf>,
    /// Inline content.
    #[serde(skip)]
    pub content: Option<String>,
    /// sha256 of what is copied: the digest follows the file's content, not its path.
    pub sha256: String,
    pub dest: String,
    pub mode: u32,
    pub owner: String,
}

/// A local `.deb` the build installs.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LocalDeb {
    #[serde(skip)]
    pub path: std::path::PathBuf,
    pub file_name: String,
    pub sha256: String,
}

/// sha256 of a host file, in hex, by the one file digester (`pack::digest`). Only a regular
/// file is read ([`crate::spec::open_regular`]: checked before and after it is opened, opened
/// with `O_NONBLOCK`), so a device or a FIFO in its place fails at once instead of hanging or
/// reading forever.
pub fn file_sha256(path: &Path) -> Result<String> {
    let (file, _) =
        crate::spec::open_regular(path).with_context(|| format!("reading {}", path.display()))?;
    let d = crate::pack::digest::digest_reader(file)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(d.sha256)
}

/// Depth of a mount point: `/` is 0, `/var` 1, `/var/lib/app` 3.
pub fn mount_depth(mount: &str) -> usize {
    mount.split('/').filter(|c| !c.is_empty()).count()
}

/// Orders mounts so that every parent comes before its children (by depth, then by path).
pub fn mount_order(mounts: &[&str]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..mounts.len()).collect();
    idx.sort_by(|&a, &b| {
        mount_depth(mounts[a])
            .cmp(&mount_depth(mounts[b]))
            .then_with(|| mounts[a].cmp(mounts[b]))
    });
    idx
}

impl Plan {
    /// Builds the plan from a validated spec, the host's apt sources (only the suites they list:
    /// [`resolve_host_uri`]) and whether the host has mmdebstrap (for `bootstrap: auto`).
    pub fn new(
        spec: &Spec,
        host_sources: &[HostSource],
        host_has_mmdebstrap: bool,
    ) -> Result<Plan> {
        let host_uri = |suite: &str| resolve_host_uri(host_sources, suite);
        Plan::with_host_uri(spec, &host_uri, host_has_mmdebstrap)
    }

    /// Builds the plan as [`Plan::new`] does, a `host` mirror or repo URI resolved for its suite
    /// by `host_uri`.
    pub fn with_host_uri(
        spec: &Spec,
        host_uri: &dyn Fn(&str) -> Result<String>,
        host_has_mmdebstrap: bool,
    ) -> Result<Plan> {
        // A spec from Spec::from_yaml_at was checked already; one from elsewhere (the Creator
        // API, a service) is checked here, before any of its files is opened.
        let problems = spec.check_host_inputs();
        if !problems.is_empty() {
            return Err(SpecError {
                source_name: format!("spec `{}`", spec.name),
                problems,
            }
            .into());
        }
        let resolve = |uri: &str, suite: &str| -> Result<String> {
            if uri == "host" {
                host_uri(suite)
            } else {
                Ok(uri.trim_end_matches('/').to_string())
            }
        };
        let repos: Vec<PlannedRepo> = if spec.repos.is_empty() {
            vec![PlannedRepo {
                name: "debian".into(),
                uri: resolve(&spec.mirror, &spec.suite).context("resolving mirror")?,
                suite: spec.suite.clone(),
                section: "main".into(),
                priority: None,
                trusted: false,
                keyring: None,
                key_sha256: None,
                key_fingerprints: Vec::new(),
            }]
        } else {
            spec.repos
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    let uri = r.uri.as_deref().unwrap_or(&spec.mirror);
                    let mut planned = PlannedRepo {
                        name: r.name.clone(),
                        uri: resolve(uri, &r.suite)
                            .with_context(|| format!("resolving repos[{i}].uri"))?,
                        suite: r.suite.clone(),
                        section: r.components(),
                        priority: r.priority,
                        trusted: r.trusted,
                        keyring: None,
                        key_sha256: None,
                        key_fingerprints: Vec::new(),
                    };
                    if let Some(key) = &r.key {
                        planned
                            .load_key(key, &spec.base_dir)
                            .with_context(|| format!("repos[{i}].key"))?;
                    }
                    Ok(planned)
                })
                .collect::<Result<_>>()?
        };
        let images: Vec<PlannedImage> = spec
            .images
            .iter()
            .map(|img| {
                let base = image_base_name(&spec.name, img);
                let raw_name = format!("{base}.img");
                let container_name = match img.container {
                    Container::Gzip => format!("{raw_name}.gz"),
                    Container::Raw => raw_name.clone(),
                };
                PlannedImage {
                    mount: img.mount.clone(),
                    fs: img.fs,
                    size: img.size.0,
                    label: img.label.clone(),
                    mkfs_options: img.mkfs_options.clone(),
                    container: img.container,
                    raw_name,
                    container_name,
                }
            })
            .collect();
        let mounts: Vec<&str> = images.iter().map(|i| i.mount.as_str()).collect();
        let files = spec
            .files
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let (source, sha256) = match (&f.source, &f.content) {
                    (Some(src), _) => {
                        let path = spec.base_dir.join(src);
                        let sha =
                            file_sha256(&path).with_context(|| format!("files[{i}].source"))?;
                        let path = path.canonicalize().with_context(|| {
                            format!("files[{i}].source: resolving {}", path.display())
                        })?;
                        (Some(path), sha)
                    }
                    (None, Some(text)) => (
                        None,
                        crate::pack::digest::hex(&Sha256::digest(text.as_bytes())),
                    ),
                    (None, None) => bail!("files[{i}]: neither `source` nor `content`"),
                };
                Ok(PlannedFile {
                    source,
                    content: f.content.clone(),
                    sha256,
                    dest: f.dest.clone(),
                    mode: parse_mode(&f.mode)
                        .with_context(|| format!("files[{i}].mode `{}`", f.mode))?,
                    owner: f.owner.clone(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let local_debs = spec
            .local_debs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let path = spec.base_dir.join(d);
                let sha256 = file_sha256(&path).with_context(|| format!("local_debs[{i}]"))?;
                let path = path
                    .canonicalize()
                    .with_context(|| format!("local_debs[{i}]: resolving {}", path.display()))?;
                let file_name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                Ok(LocalDeb {
                    path,
                    file_name,
                    sha256,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let (lock, lock_source) = match &spec.lock {
            None => (None, String::new()),
            Some(file) => {
                let path = spec.base_dir.join(file);
                let shown = path.display().to_string();
                let (mut f, _) = crate::spec::open_regular(&path)
                    .with_context(|| format!("lock: reading {shown}"))?;
                let mut text = String::new();
                std::io::Read::read_to_string(&mut f, &mut text)
                    .with_context(|| format!("lock: reading {shown}"))?;
                let lock = crate::lockfile::Lock::parse(&text, &shown).context("lock")?;
                if lock.arch != spec.arch {
                    anyhow::bail!(
                        "lock: {shown} is for {}, the spec builds {}",
                        lock.arch,
                        spec.arch
                    );
                }
                (Some(lock), shown)
            }
        };
        let mut plan = Plan {
            name: spec.name.clone(),
            arch: spec.arch.clone(),
            suite: spec.suite.clone(),
            variant: spec.variant,
            backend: Backend::resolve(spec.bootstrap, host_has_mmdebstrap),
            bootstrap_mirror: repos[0].uri.clone(),
            bootstrap_include: spec.bootstrap_include.clone(),
            repos,
            packages: spec.all_packages(),
            mount_order: mount_order(&mounts),
            images,
            proxies: spec.proxies.clone().unwrap_or_default(),
            root_password_hash: spec.root_password_hash.clone(),
            hostname: spec.hostname.clone(),
            keep_apt_sources: spec.keep_apt_sources,
            kind: spec.kind,
            timezone: spec.timezone.clone(),
            locale: spec.locale.clone(),
            users: spec.users.clone(),
            services: spec.services.clone(),
            files,
            exclude: spec.exclude.clone(),
            skip_missing: spec.skip_missing,
            local_debs,
            post: spec.post.clone(),
            records: spec.records.clone(),
            copy_kernel: spec.copy_kernel,
            source_date_epoch: spec.source_date_epoch,
            lock,
            lock_source,
            attachments: spec.attachments.clone(),
            disk: spec.disk.clone(),
            digest: String::new(),
            seed: String::new(),
        };
        plan.digest = plan.compute_digest();
        // The same packages, whether from a lock or not, make the same image.
        let unlocked = Plan {
            lock: None,
            ..plan.clone()
        };
        plan.seed = unlocked.compute_digest();
        Ok(plan)
    }

    fn compute_digest(&self) -> String {
        let json = serde_json::to_vec(self).expect("a plan always serializes");
        let mut h = Sha256::new();
        h.update(b"debimg ");
        h.update(env!("CARGO_PKG_VERSION").as_bytes());
        h.update(b"\n");
        h.update(&json);
        crate::pack::digest::hex(&h.finalize())
    }

    /// The image mounted at `/`; `None` for a tarball.
    pub fn root_image(&self) -> Option<&PlannedImage> {
        self.mount_order.first().map(|&i| &self.images[i])
    }

    /// File names of the shipped images, in metadata order: one per filesystem image, or the
    /// root filesystem archive of a tarball.
    pub fn container_names(&self) -> Vec<String> {
        match self.kind {
            Kind::FsImages => self
                .images
                .iter()
                .map(|i| i.container_name.clone())
                .collect(),
            Kind::Tarball => vec![format!("{}.tar.gz", self.name)],
            Kind::Disk => self
                .disk
                .iter()
                .flat_map(|d| d.formats.iter().map(|f| f.file_name(&self.name)))
                .collect(),
        }
    }

    /// File name of the raw file a tarball or disk build packs (`<name>.tar`, `<name>.img`);
    /// per-filesystem images have theirs in [`PlannedImage::raw_name`].
    pub fn raw_name(&self) -> String {
        match self.kind {
            Kind::Tarball => format!("{}.tar", self.name),
            _ => format!("{}.img", self.name),
        }
    }

    /// File name of a record (`<name>.packages`, `.files`, `.licenses`).
    pub fn record_name(&self, record: crate::spec::Record) -> String {
        format!("{}.{}", self.name, record.extension())
    }

    /// File names of the kernel and initrd `copy_kernel` writes.
    pub fn kernel_names(&self) -> (String, String) {
        (
            format!("{}.vmlinuz", self.name),
            format!("{}.initrd", self.name),
        )
    }

    /// Name of the directory `attachments` are copied into (`<name>.attachments`): each file
    /// keeps its path in the image below it.
    pub fn attachments_dir_name(&self) -> String {
        format!("{}.attachments", self.name)
    }

    /// Names of the files a build writes next to the metadata besides the images: records,
    /// the lock, kernel and initrd, the SBOMs, in the order the metadata lists them.
    pub fn extra_output_names(&self) -> Vec<String> {
        let mut out: Vec<String> = self.records.iter().map(|r| self.record_name(*r)).collect();
        out.push(self.lock_name());
        if self.copy_kernel {
            let (k, i) = self.kernel_names();
            out.push(k);
            out.push(i);
        }
        let (spdx, cdx) = self.sbom_names();
        out.extend([spdx, cdx]);
        out
    }

    /// File name of the metadata written next to the images.
    pub fn metadata_name(&self) -> String {
        format!("{}.yaml", self.name)
    }

    /// File names of the SBOMs (`<name>.spdx.json`, `<name>.cdx.json`).
    pub fn sbom_names(&self) -> (String, String) {
        (
            format!("{}.spdx.json", self.name),
            format!("{}.cdx.json", self.name),
        )
    }

    /// File name of the lock of what the build installed (`<name>.lock.yaml`).
    pub fn lock_name(&self) -> String {
        format!("{}.lock.yaml", self.name)
    }

    /// File name of the archive `--bundle` packs every output into.
    pub fn bundle_name(&self) -> String {
        format!("{}.bundle.tar.gz", self.name)
    }

    /// File name of a release's copy of its input: the spec, or fuel-agent's JSON.
    pub fn input_copy_name(&self, fuel: bool) -> String {
        if fuel {
            format!("{}.fuel.json", self.name)
        } else {
            format!("{}.spec.yaml", self.name)
        }
    }
}

impl Plan {
    /// The plan of a spec in YAML against a made-up mirror, for tests.
    #[cfg(test)]
    pub(crate) fn for_test(yaml: &str) -> Plan {
        let spec = crate::spec::Spec::from_yaml(yaml, "t").unwrap();
        Plan::new(
            &spec,
            &parse_sources_list("deb http://m.example/debian bookworm main"),
            false,
        )
        .unwrap()
    }

    /// The plan of `spec` on this host: `host` mirrors from its apt sources, a suite none of
    /// them lists from the first of its URIs that serves it ([`find_host_uri`], asked with apt's
    /// downloader and the spec's proxies), mmdebstrap when it is installed.
    pub fn for_host(spec: &crate::spec::Spec) -> Result<Plan> {
        let sources =
            read_host_sources(Path::new("/")).context("reading the host's apt sources")?;
        let proxies = spec.proxies.clone().unwrap_or_default();
        let fetch = |url: &str| -> Result<Vec<u8>> {
            // apt downloads as root into a directory no one else can enter, removed after.
            let dir = tempfile::Builder::new()
                .prefix("debimg-probe-")
                .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
                .tempdir()
                .context("creating a private directory for apt's downloader")?;
            crate::debian::fetch::download(url, &proxies, dir.path())
        };
        let host_uri = |suite: &str| find_host_uri(&sources, suite, &fetch);
        let mut spec = std::borrow::Cow::Borrowed(spec);
        if spec.source_date_epoch.is_none()
            && let Some(epoch) = crate::reproducible::from_env()?
        {
            spec.to_mut().source_date_epoch = Some(epoch);
        }
        Plan::with_host_uri(&spec, &host_uri, host_has("mmdebstrap"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEB822: &str = "Types: deb\n# comment\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\nTypes: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\nComponents: main\n\nTypes: deb-src\nURIs: http://src.example/debian\nSuites: trixie\n\nEnabled: no\nTypes: deb\nURIs: http://off.example/debian\nSuites: sid\n";

    #[test]
    fn parses_deb822() {
        let s = parse_deb822_sources(DEB822);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].uri, "http://mirror.example/debian");
        assert_eq!(s[0].suites, vec!["bookworm", "bookworm-updates"]);
        assert_eq!(s[1].suites, vec!["bookworm-security"]);
    }

    #[test]
    fn parses_one_line_style() {
        let s = parse_sources_list(
            "# x\ndeb [arch=amd64 signed-by=/k.gpg] http://m.example/debian bookworm main contrib\ndeb-src http://m.example/debian bookworm main\ndeb http://m.example/debian-security/ bookworm-security main # tail\n",
        );
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].uri, "http://m.example/debian");
        assert_eq!(s[1].uri, "http://m.example/debian-security");
    }

    #[test]
    fn host_uri_per_suite() {
        let s = parse_deb822_sources(DEB822);
        assert_eq!(
            resolve_host_uri(&s, "bookworm-security").unwrap(),
            "http://mirror.example/debian-security"
        );
        assert_eq!(
            resolve_host_uri(&s, "bookworm-backports").unwrap(),
            "http://mirror.example/debian"
        );
        let err = resolve_host_uri(&s, "trixie").unwrap_err().to_string();
        assert!(err.contains("trixie"), "{err}");
        assert!(resolve_host_uri(&[], "bookworm").is_err());
    }

    /// A stand-in for apt's downloader: `(url prefix, Release text)` pairs answer, every other
    /// URL is a 404; the URLs asked are kept.
    struct Mirror {
        serves: Vec<(&'static str, &'static str)>,
        asked: std::cell::RefCell<Vec<String>>,
    }

    impl Mirror {
        fn new(serves: &[(&'static str, &'static str)]) -> Mirror {
            Mirror {
                serves: serves.to_vec(),
                asked: Default::default(),
            }
        }

        fn fetch(&self, url: &str) -> Result<Vec<u8>> {
            self.asked.borrow_mut().push(url.to_string());
            if url.contains("unreachable.example") {
                return Err(crate::debian::fetch::FetchError {
                    url: url.into(),
                    answer: "Could not connect to unreachable.example:80".into(),
                }
                .into());
            }
            match self
                .serves
                .iter()
                .find(|(prefix, _)| url.starts_with(prefix))
            {
                Some((_, text)) => Ok(text.as_bytes().to_vec()),
                None => Err(crate::debian::fetch::FetchError {
                    url: url.into(),
                    answer: "404 Not Found".into(),
                }
                .into()),
            }
        }

        fn find(&self, sources: &[HostSource], suite: &str) -> Result<String> {
            find_host_uri(sources, suite, &|url| self.fetch(url))
        }
    }

    const TRIXIE: &str = "Origin: Debian\nSuite: stable\nCodename: trixie\n";

    #[test]
    fn a_listed_suite_asks_no_mirror() {
        let m = Mirror::new(&[]);
        let s = parse_deb822_sources(DEB822);
        assert_eq!(
            m.find(&s, "bookworm-backports").unwrap(),
            "http://mirror.example/debian"
        );
        assert!(m.asked.borrow().is_empty());
        let e = m.find(&[], "trixie").unwrap_err().to_string();
        assert!(e.contains("has no apt sources"), "{e}");
        assert!(m.asked.borrow().is_empty());
    }

    #[test]
    fn an_unlisted_suite_is_found_on_the_second_uri() {
        let s = parse_sources_list(
            "deb http://a.example/debian bookworm main\ndeb http://b.example/debian bookworm main\n",
        );
        let m = Mirror::new(&[("http://b.example/debian/dists/trixie/", TRIXIE)]);
        assert_eq!(m.find(&s, "trixie").unwrap(), "http://b.example/debian");
        assert_eq!(
            *m.asked.borrow(),
            [
                "http://a.example/debian/dists/trixie/InRelease",
                "http://a.example/debian/dists/trixie/Release",
                "http://b.example/debian/dists/trixie/InRelease",
            ]
        );
    }

    #[test]
    fn uris_listing_the_same_kind_of_suite_are_asked_first() {
        let s = parse_deb822_sources(DEB822);
        let debian = "http://mirror.example/debian";
        let security = "http://mirror.example/debian-security";
        assert_eq!(probe_order(&s, "trixie-security"), [security, debian]);
        assert_eq!(probe_order(&s, "trixie"), [debian, security]);
        assert_eq!(probe_order(&s, "trixie-updates"), [debian, security]);
        // No host source lists a -backports suite: the main archive first.
        assert_eq!(probe_order(&s, "trixie-backports"), [debian, security]);
        // Each URI once, however many entries list it; a URI listing only other kinds last.
        let s = parse_sources_list(
            "deb http://x.example/other bookworm-updates main\ndeb http://m.example/debian bookworm main\ndeb http://m.example/debian bookworm-updates main\n",
        );
        assert_eq!(
            probe_order(&s, "sid"),
            ["http://m.example/debian", "http://x.example/other"]
        );
        // Both would answer: the security archive is asked first and chosen.
        let m = Mirror::new(&[
            (
                "http://mirror.example/debian-security/dists/trixie-security/",
                "Suite: stable-security\nCodename: trixie-security\n",
            ),
            (
                "http://mirror.example/debian/dists/trixie-security/",
                "Suite: stable-security\nCodename: trixie-security\n",
            ),
        ]);
        let s = parse_deb822_sources(DEB822);
        assert_eq!(m.find(&s, "trixie-security").unwrap(), security);
        assert_eq!(m.asked.borrow().len(), 1);
    }

    #[test]
    fn a_release_of_another_suite_is_rejected() {
        let s = parse_sources_list(
            "deb http://a.example/debian bookworm main\ndeb http://b.example/debian bookworm main\n",
        );
        // a.example answers dists/trixie with bookworm's Release (a stale link, a wrong alias).
        let m = Mirror::new(&[
            (
                "http://a.example/debian/dists/trixie/",
                "-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\nSuite: stable\nCodename: bookworm\n-----BEGIN PGP SIGNATURE-----\nCodename: trixie\n",
            ),
            ("http://b.example/debian/dists/trixie/", TRIXIE),
            (
                "http://a.example/debian/dists/testing/",
                "Suite: testing\nCodename: forky\n",
            ),
        ]);
        assert_eq!(m.find(&s, "trixie").unwrap(), "http://b.example/debian");
        // The Suite alone is enough.
        assert_eq!(m.find(&s, "testing").unwrap(), "http://a.example/debian");
        let m = Mirror::new(&[(
            "http://a.example/debian/dists/forky/",
            "Suite: testing\nCodename: trixie\n",
        )]);
        let e = m.find(&s, "forky").unwrap_err().to_string();
        assert!(
            e.contains("http://a.example/debian: a Release of Suite `testing`, Codename `trixie`"),
            "{e}"
        );
    }

    #[test]
    fn when_no_uri_serves_the_suite_every_answer_is_listed() {
        let s = parse_sources_list(
            "deb http://user:secret@a.example/debian bookworm main\ndeb http://unreachable.example/debian bookworm main\ndeb http://a.example/debian-security bookworm-security main\n",
        );
        let m = Mirror::new(&[]);
        let e = m.find(&s, "trixie").unwrap_err().to_string();
        for answer in [
            "http://user:***@a.example/debian: 404 Not Found",
            "http://unreachable.example/debian: Could not connect to unreachable.example:80",
            "http://a.example/debian-security: 404 Not Found",
            "suite `trixie`",
            "give a URL instead",
        ] {
            assert!(e.contains(answer), "`{answer}` not in: {e}");
        }
        assert!(!e.contains("secret"), "{e}");
        assert_eq!(m.asked.borrow().len(), 6, "InRelease and Release of each");
    }

    #[test]
    fn an_interrupt_ends_the_search() {
        let s = parse_sources_list(
            "deb http://a.example/debian bookworm main\ndeb http://b.example/debian bookworm main\n",
        );
        let asked = std::cell::Cell::new(0);
        let fetch = |_: &str| -> Result<Vec<u8>> {
            asked.set(asked.get() + 1);
            bail!("interrupted by SIGINT")
        };
        let e = find_host_uri(&s, "trixie", &fetch).unwrap_err();
        assert!(format!("{e:#}").contains("interrupted"), "{e:#}");
        assert_eq!(asked.get(), 2, "only a.example's two files");
    }

    #[test]
    fn host_repos_are_resolved_per_suite_by_the_given_resolver() {
        let spec = Spec::from_yaml(
            "version: 1\nname: t\nsuite: trixie\nmirror: host\nrepos:\n  - {name: debian, suite: trixie}\n  - {name: security, uri: host, suite: trixie-security}\n  - {name: extra, uri: http://x.example/debian, suite: trixie}\nimages:\n  - {mount: /, fs: ext4, size: 1GiB}\n",
            "t",
        )
        .unwrap();
        let s = parse_deb822_sources(DEB822);
        let m = Mirror::new(&[
            ("http://mirror.example/debian/dists/trixie/", TRIXIE),
            (
                "http://mirror.example/debian-security/dists/trixie-security/",
                "Suite: stable-security\nCodename: trixie-security\n",
            ),
        ]);
        let host_uri = |suite: &str| m.find(&s, suite);
        let plan = Plan::with_host_uri(&spec, &host_uri, false).unwrap();
        let uris: Vec<&str> = plan.repos.iter().map(|r| r.uri.as_str()).collect();
        assert_eq!(
            uris,
            [
                "http://mirror.example/debian",
                "http://mirror.example/debian-security",
                "http://x.example/debian"
            ]
        );
        assert_eq!(plan.bootstrap_mirror, "http://mirror.example/debian");
        // The pure plan knows only the listed suites.
        let e = Plan::new(&spec, &s, false).unwrap_err();
        assert!(format!("{e:#}").contains("repos[0].uri"), "{e:#}");
    }

    #[test]
    fn mounts_sorted_parents_first() {
        let m = ["/var/lib/app", "/boot", "/", "/var"];
        let order: Vec<&str> = mount_order(&m).into_iter().map(|i| m[i]).collect();
        assert_eq!(order, ["/", "/boot", "/var", "/var/lib/app"]);
    }

    fn spec(extra_pkg: &str) -> Spec {
        let yaml = format!(
            "version: 1\nname: t\nsuite: bookworm\npackages: [curl{extra_pkg}]\nimages:\n  - {{mount: /var, fs: xfs, size: 1GiB}}\n  - {{mount: /, fs: ext4, size: 1GiB}}\n"
        );
        Spec::from_yaml(&yaml, "t").unwrap()
    }

    #[test]
    fn digest_follows_the_spec() {
        let src = parse_deb822_sources(DEB822);
        let a = Plan::new(&spec(""), &src, true).unwrap();
        let b = Plan::new(&spec(""), &src, true).unwrap();
        let c = Plan::new(&spec(", less"), &src, true).unwrap();
        let d = Plan::new(&spec(""), &src, false).unwrap();
        assert_eq!(a.backend, Backend::Mmdebstrap);
        assert_eq!(d.backend, Backend::Debootstrap);
        assert_ne!(a.digest, d.digest, "the backend is part of the digest");
        assert_eq!(a.digest, b.digest);
        assert_ne!(a.digest, c.digest);
        assert_eq!(a.digest.len(), 64);
        assert_eq!(a.root_image().unwrap().mount, "/");
        assert_eq!(a.repos[0].uri, "http://mirror.example/debian");
        assert_eq!(a.images[0].container_name, "t-var.img.gz");
    }

    #[test]
    fn trusted_is_carried_and_changes_the_digest() {
        let src = parse_deb822_sources(DEB822);
        let mut s = spec("");
        s.repos = vec![crate::spec::Repo {
            name: "d".into(),
            uri: None,
            suite: "bookworm".into(),
            section: Some("main".into()),
            priority: None,
            trusted: false,
            key: None,
        }];
        let signed = Plan::new(&s, &src, true).unwrap();
        assert!(!signed.repos[0].trusted);
        assert!(!Plan::new(&spec(""), &src, true).unwrap().repos[0].trusted);
        s.repos[0].trusted = true;
        let trusted = Plan::new(&s, &src, true).unwrap();
        assert!(trusted.repos[0].trusted);
        assert_ne!(signed.digest, trusted.digest);
    }

    #[test]
    fn a_repo_key_is_loaded_named_and_digested() {
        let src = parse_deb822_sources(DEB822);
        let dir = tempfile::tempdir().unwrap();
        let key = crate::openpgp::tests::sample_binary();
        std::fs::write(dir.path().join("vendor.gpg"), &key).unwrap();
        let mut s = spec("");
        s.base_dir = dir.path().to_path_buf();
        let repo = |key: Option<&str>, suite: &str| crate::spec::Repo {
            name: "vendor".into(),
            uri: Some("http://vendor.example/repo".into()),
            suite: suite.into(),
            section: None,
            priority: Some(990),
            trusted: false,
            key: key.map(str::to_string),
        };
        s.repos.push(repo(None, "bookworm"));
        let plain = Plan::new(&s, &src, true).unwrap();
        let r = plain.repos.last().unwrap();
        assert_eq!(r.section, "main");
        assert_eq!(r.keyring_path(), None);
        s.repos.last_mut().unwrap().key = Some("vendor.gpg".into());
        let keyed = Plan::new(&s, &src, true).unwrap();
        let r = keyed.repos.last().unwrap();
        assert_eq!(r.keyring.as_deref(), Some(key.as_slice()));
        assert_eq!(r.key_fingerprints.len(), 1);
        assert_eq!(
            r.keyring_path().as_deref(),
            Some("etc/apt/keyrings/debimg-vendor.gpg")
        );
        assert_ne!(plain.digest, keyed.digest);
        // Another key file under the same name is another build.
        let mut other = key.clone();
        *other.last_mut().unwrap() ^= 1;
        std::fs::write(dir.path().join("vendor.gpg"), &other).unwrap();
        assert_ne!(Plan::new(&s, &src, true).unwrap().digest, keyed.digest);
        // What is not a key is refused, naming the field.
        std::fs::write(dir.path().join("vendor.gpg"), b"not a key").unwrap();
        let e = format!("{:#}", Plan::new(&s, &src, true).unwrap_err());
        assert!(e.contains("repos[0].key"), "{e}");
        // A flat repository has no components.
        *s.repos.last_mut().unwrap() = repo(None, "./");
        let flat = Plan::new(&s, &src, true).unwrap();
        assert!(flat.repos.last().unwrap().is_flat());
        assert_eq!(flat.repos.last().unwrap().section, "");
    }

    #[test]
    fn only_regular_files_are_hashed() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let file = dir.path().join("motd");
        std::fs::write(&file, "hello\n").unwrap();
        assert_eq!(
            file_sha256(&file).unwrap(),
            crate::pack::digest::hex(&Sha256::digest(b"hello\n"))
        );
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let t = std::time::Instant::now();
        for (path, kind) in [
            (fifo.as_path(), "a FIFO"),
            (Path::new("/dev/zero"), "a character device"),
            (dir.path(), "a directory"),
        ] {
            let e = format!("{:#}", file_sha256(path).unwrap_err());
            assert!(e.contains(&format!("is {kind}, not a regular file")), "{e}");
        }
        assert!(t.elapsed() < std::time::Duration::from_secs(2));
    }

    #[test]
    fn a_device_as_a_source_is_a_spec_error_before_anything_is_read() {
        let mut s = spec("");
        s.files.push(crate::spec::FileSpec {
            source: Some("/dev/zero".into()),
            content: None,
            dest: "/etc/zero".into(),
            mode: "0644".into(),
            owner: "root:root".into(),
        });
        s.local_debs.push("/dev/null".into());
        let t = std::time::Instant::now();
        let e = Plan::new(&s, &parse_deb822_sources(DEB822), true).unwrap_err();
        assert!(t.elapsed() < std::time::Duration::from_secs(2));
        let e = e.downcast_ref::<SpecError>().expect("a typed spec error");
        let fields: Vec<&str> = e.problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, ["files[0].source", "local_debs[0]"]);
        assert!(e.problems[0].message.contains("a character device"), "{e}");
    }

    #[test]
    fn output_names_stay_within_the_names_validation_counts() {
        use crate::spec::{IMAGE_SUFFIXES, NAME_SUFFIXES};
        let with_suffix = |name: &str, base: &str, suffixes: &[&str]| {
            suffixes.iter().any(|s| name.strip_suffix(s) == Some(base))
        };
        let src = parse_deb822_sources(DEB822);
        let mut s = spec("");
        s.records = vec![Record::Packages, Record::Files, Record::Licenses];
        s.copy_kernel = true;
        let plan = Plan::new(&s, &src, true).unwrap();
        let mut names = plan.extra_output_names();
        names.push(plan.metadata_name());
        names.push(plan.attachments_dir_name());
        for n in &names {
            assert!(
                with_suffix(n, "t", NAME_SUFFIXES),
                "{n} is not in NAME_SUFFIXES"
            );
        }
        for (img, spec_img) in plan.images.iter().zip(&s.images) {
            let base = image_base_name(&s.name, spec_img);
            for n in [&img.raw_name, &img.container_name] {
                assert!(
                    with_suffix(n, &base, IMAGE_SUFFIXES),
                    "{n} is not in IMAGE_SUFFIXES"
                );
            }
        }
        s.kind = Kind::Tarball;
        let tar = Plan::new(&s, &src, true).unwrap();
        assert!(with_suffix(&tar.container_names()[0], "t", NAME_SUFFIXES));
        for f in [
            crate::spec::DiskFormat::Raw,
            crate::spec::DiskFormat::Qcow2,
            crate::spec::DiskFormat::Qcow2Compressed,
            crate::spec::DiskFormat::Gzip,
        ] {
            assert!(with_suffix(&f.file_name("t"), "t", NAME_SUFFIXES), "{f:?}");
        }
    }
}
