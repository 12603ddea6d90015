//! Spec to Plan: the pure decisions of a build.
//!
//! Resolves `host` mirrors against the build host's apt sources, orders the mounts by depth,
//! names the outputs and computes the spec digest that decides whether an existing image can be
//! reused. Nothing here changes the system; the host's apt sources are read by the caller.

use std::path::Path;

use anyhow::{Context, Result, bail};
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
}

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
    /// What is copied out of the image into `<name>.attachments/`, as the spec says it: part of
    /// the digest, so a changed list is a new build.
    pub attachments: Vec<Attachment>,
    /// The disk of `kind: disk`.
    pub disk: Option<crate::spec::Disk>,
    /// sha256 of everything above plus the debimg version: equal digests, equal images.
    #[serde(skip)]
    pub digest: String,
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
    /// Builds the plan from a validated spec, the host's apt sources and whether the host has
    /// mmdebstrap (for `bootstrap: auto`).
    pub fn new(
        spec: &Spec,
        host_sources: &[HostSource],
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
                resolve_host_uri(host_sources, suite)
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
            }]
        } else {
            spec.repos
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    let uri = r.uri.as_deref().unwrap_or(&spec.mirror);
                    Ok(PlannedRepo {
                        name: r.name.clone(),
                        uri: resolve(uri, &r.suite)
                            .with_context(|| format!("resolving repos[{i}].uri"))?,
                        suite: r.suite.clone(),
                        section: r.section.split_whitespace().collect::<Vec<_>>().join(" "),
                        priority: r.priority,
                        trusted: r.trusted,
                    })
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
            attachments: spec.attachments.clone(),
            disk: spec.disk.clone(),
            digest: String::new(),
        };
        plan.digest = plan.compute_digest();
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
    /// kernel and initrd, in the order the metadata lists them.
    pub fn extra_output_names(&self) -> Vec<String> {
        let mut out: Vec<String> = self.records.iter().map(|r| self.record_name(*r)).collect();
        if self.copy_kernel {
            let (k, i) = self.kernel_names();
            out.push(k);
            out.push(i);
        }
        out
    }

    /// File name of the metadata written next to the images.
    pub fn metadata_name(&self) -> String {
        format!("{}.yaml", self.name)
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

    /// The plan of `spec` on this host: `host` mirrors from its apt sources, mmdebstrap when it
    /// is installed.
    pub fn for_host(spec: &crate::spec::Spec) -> Result<Plan> {
        let sources =
            read_host_sources(Path::new("/")).context("reading the host's apt sources")?;
        Plan::new(spec, &sources, host_has("mmdebstrap"))
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
            section: "main".into(),
            priority: None,
            trusted: false,
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
