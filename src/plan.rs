//! Spec to Plan: the pure decisions of a build.
//!
//! Takes a `host` mirror's URI from what was resolved before the plan ([`HostMirrors`], made by
//! [`crate::debian::mirror`]), orders the mounts by depth, names the outputs and computes the
//! spec digest that decides whether an existing image can be reused. Nothing here changes the
//! system, asks the network or runs a program; it reads the files the spec names (repo keys,
//! files and local packages to hash, the lock), bounded. [`crate::host::plan`] gathers the
//! build host's part first.

use std::collections::BTreeMap;
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

/// What `mirror: host` and `uri: host` stand for, suite by suite: the build host's URI for each
/// suite the spec asks it for, resolved before the plan ([`crate::debian::mirror::resolve`],
/// the step that reads the host's apt sources and asks its mirrors) or given by a caller.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostMirrors {
    by_suite: BTreeMap<String, String>,
}

impl HostMirrors {
    /// None resolved: a plan from it refuses every `host`.
    pub fn new() -> HostMirrors {
        HostMirrors::default()
    }

    /// `suite` is served from `uri` (its trailing slashes dropped).
    pub fn insert(&mut self, suite: &str, uri: &str) {
        self.by_suite
            .insert(suite.to_string(), uri.trim_end_matches('/').to_string());
    }

    /// The URI resolved for `suite`.
    pub fn get(&self, suite: &str) -> Option<&str> {
        self.by_suite.get(suite).map(String::as_str)
    }

    /// The URI resolved for `suite`, or an error saying it was not.
    fn uri(&self, suite: &str) -> Result<String> {
        match self.get(suite) {
            Some(uri) => Ok(uri.to_string()),
            None => bail!(
                "`host` mirror: no URI was resolved for suite `{suite}` before planning (debian::mirror::resolve)"
            ),
        }
    }
}

/// A suite a spec asks the build host for (`mirror: host`, `uri: host`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSuite {
    /// The spec's field that says `host` (`mirror`, `repos[1].uri`), for messages.
    pub field: String,
    pub suite: String,
}

/// The suites `spec` asks the build host for, in the order of its repos: what has to be
/// resolved into [`HostMirrors`] before it is planned.
pub fn host_suites(spec: &Spec) -> Vec<HostSuite> {
    repo_uris(spec)
        .into_iter()
        .filter(|(_, uri, _)| *uri == HOST)
        .map(|(field, _, suite)| HostSuite {
            field,
            suite: suite.to_string(),
        })
        .collect()
}

/// What a spec's `mirror` or a repo's `uri` says for the build host's own apt sources.
const HOST: &str = "host";

/// Each repo's URI as the spec gives it, with its suite and the field it is in (for messages):
/// the spec's mirror and suite when it lists no repos, a repo's `uri` else its mirror.
fn repo_uris(spec: &Spec) -> Vec<(String, &str, &str)> {
    if spec.repos.is_empty() {
        return vec![("mirror".to_string(), &spec.mirror, &spec.suite)];
    }
    spec.repos
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let uri = r.uri.as_deref().unwrap_or(&spec.mirror);
            (format!("repos[{i}].uri"), uri, r.suite.as_str())
        })
        .collect()
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
    /// `source_date_epoch`, else `SOURCE_DATE_EPOCH` from the environment of
    /// [`crate::host::plan`].
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

/// The host files `spec` names, checked before any is opened ([`Spec::check_host_inputs`]):
/// their problems as a [`SpecError`].
pub fn check_host_inputs(spec: &Spec) -> Result<()> {
    let problems = spec.check_host_inputs();
    if problems.is_empty() {
        return Ok(());
    }
    Err(SpecError {
        source_name: format!("spec `{}`", spec.name),
        problems,
    }
    .into())
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
    /// Builds the plan from a validated spec, what `host` stands for on the build host (each of
    /// its [`host_suites`] resolved) and whether the host has mmdebstrap (for `bootstrap: auto`).
    pub fn new(spec: &Spec, host: &HostMirrors, host_has_mmdebstrap: bool) -> Result<Plan> {
        // A spec from Spec::from_yaml_at was checked already; one from elsewhere (the Creator
        // API, a service) is checked here, before any of its files is opened.
        check_host_inputs(spec)?;
        // One for each repo, in order (the mirror's alone when the spec lists no repos).
        let uris = repo_uris(spec)
            .into_iter()
            .map(|(field, uri, suite)| {
                if uri == HOST {
                    host.uri(suite)
                        .with_context(|| format!("resolving {field}"))
                } else {
                    Ok(uri.trim_end_matches('/').to_string())
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let repos: Vec<PlannedRepo> = if spec.repos.is_empty() {
            vec![PlannedRepo {
                name: "debian".into(),
                uri: uris[0].clone(),
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
                    let mut planned = PlannedRepo {
                        name: r.name.clone(),
                        uri: uris[i].clone(),
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
    /// The plan of a spec in YAML, every suite it asks the host for served by a made-up
    /// mirror, for tests.
    #[cfg(test)]
    pub(crate) fn for_test(yaml: &str) -> Plan {
        let spec = crate::spec::Spec::from_yaml(yaml, "t").unwrap();
        let mut host = HostMirrors::new();
        for s in host_suites(&spec) {
            host.insert(&s.suite, "http://m.example/debian");
        }
        Plan::new(&spec, &host, false).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the resolution before the plan would give for the specs below: bookworm from the
    /// host's main archive.
    fn host() -> HostMirrors {
        let mut host = HostMirrors::new();
        host.insert("bookworm", "http://mirror.example/debian/");
        host
    }

    #[test]
    fn a_host_mirror_is_planned_from_the_resolved_uris_alone() {
        let spec = Spec::from_yaml(
            "version: 1\nname: t\nsuite: trixie\nmirror: host\nrepos:\n  - {name: debian, suite: trixie}\n  - {name: security, uri: host, suite: trixie-security}\n  - {name: extra, uri: http://x.example/debian/, suite: trixie}\nimages:\n  - {mount: /, fs: ext4, size: 1GiB}\n",
            "t",
        )
        .unwrap();
        let suites = host_suites(&spec);
        let asked: Vec<(&str, &str)> = suites
            .iter()
            .map(|s| (s.field.as_str(), s.suite.as_str()))
            .collect();
        assert_eq!(
            asked,
            [
                ("repos[0].uri", "trixie"),
                ("repos[1].uri", "trixie-security")
            ]
        );
        let mut host = HostMirrors::new();
        host.insert("trixie", "http://a.example/debian");
        host.insert("trixie-security", "http://b.example/debian-security/");
        let plan = Plan::new(&spec, &host, false).unwrap();
        let uris: Vec<&str> = plan.repos.iter().map(|r| r.uri.as_str()).collect();
        assert_eq!(
            uris,
            [
                "http://a.example/debian",
                "http://b.example/debian-security",
                "http://x.example/debian"
            ]
        );
        assert_eq!(plan.bootstrap_mirror, "http://a.example/debian");
        // Another resolution, another plan.
        host.insert("trixie", "http://c.example/debian");
        let other = Plan::new(&spec, &host, false).unwrap();
        assert_eq!(other.repos[0].uri, "http://c.example/debian");
        assert_ne!(other.digest, plan.digest);
        // A suite left unresolved is refused, naming the field that says `host`.
        let mut partial = HostMirrors::new();
        partial.insert("trixie", "http://a.example/debian");
        let e = format!("{:#}", Plan::new(&spec, &partial, false).unwrap_err());
        assert!(e.contains("resolving repos[1].uri"), "{e}");
        assert!(e.contains("`trixie-security`"), "{e}");
        let e = format!(
            "{:#}",
            Plan::new(&spec, &HostMirrors::new(), false).unwrap_err()
        );
        assert!(e.contains("resolving repos[0].uri"), "{e}");
        // A spec that names no `host` needs nothing resolved.
        let spec = Spec::from_yaml(
            "version: 1\nname: t\nsuite: trixie\nmirror: http://x.example/debian\nimages:\n  - {mount: /, fs: ext4, size: 1GiB}\n",
            "t",
        )
        .unwrap();
        assert!(host_suites(&spec).is_empty());
        let plan = Plan::new(&spec, &HostMirrors::new(), false).unwrap();
        assert_eq!(plan.repos[0].uri, "http://x.example/debian");
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
        let src = host();
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
        let src = host();
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
        let src = host();
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
        let e = Plan::new(&s, &host(), true).unwrap_err();
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
        let src = host();
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
