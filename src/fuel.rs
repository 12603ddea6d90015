//! fuel-agent compatibility: `debimg build --fuel INPUT.json` reads the JSON that fuel-agent's
//! `nailgun_build_image` data driver reads (what Nailgun/Astute pass to `fa_build_image
//! --data_driver nailgun_build_image --input_data ...`), turns it into a [`Spec`], and renders the
//! metadata file fuel-agent writes next to the images.
//!
//! # The input
//!
//! One JSON object. The keys debimg honours, as fuel-agent reads them:
//!
//! - `image_data` (required): mount point → `{"uri", "format", "container"}`, all three required.
//!   fuel-agent ignores the host of `uri`: the image is written to `<output>/<basename of uri's
//!   path>`. debimg names its files `<base>.img.gz` (`container: gzip`) or `<base>.img` (`raw`),
//!   so the basename must end that way; the base becomes the image's `output`. `format` is the
//!   filesystem (ext2, ext3, ext4, xfs, btrfs); `container` is `gzip` or `raw`.
//! - `output` (required): the directory the images and the metadata file go to.
//! - `repos` (required, at least one): `{"name", "uri", "suite", "section", "priority", "type"}`.
//!   `priority` may be `null` or absent (no pin). `type` is `deb` when given (fuel-agent always
//!   writes `deb`). The first repo is the one the base system is bootstrapped from, as in
//!   fuel-agent. fuel-agent checked no repository's signature, and its input carries no keys:
//!   each repo is built from unauthenticated (`trusted: true`, a warning on every build and a
//!   line in the metadata), unless the entry has a `key` (debimg's addition, as a spec's
//!   `repos[].key`: inline armored text or a file next to the input), which it is checked
//!   against.
//! - `codename`: the suite; when absent, the first repo's suite. fuel-agent bootstraps the first
//!   repo's suite whatever `codename` says, so the two must agree.
//! - `packages`: installed with apt after the bootstrap. Required here, although fuel-agent falls
//!   back to its built-in Ubuntu Trusty list when it is missing: that list names Fuel's own
//!   packages (nailgun-agent, mcollective, ...) and means nothing for a Debian image.
//! - `proxies`: `{"protocols": {"http": URL, "https": URL}, "direct_repo_addr_list": [host, ...]}`.
//!   Other protocols (fuel-agent knows `ftp`) are ignored with a warning: debimg's repos are
//!   http(s) or file URLs, so such a proxy would never be used.
//! - `hashed_root_password`: a crypt(3) hash for root. A plain `root_password` is refused (see
//!   [`root_password_hash`]); with neither, root stays locked where fuel-agent would have set its
//!   well-known default password.
//!
//! Every other key is ignored and logged (fuel passes more than an image build needs, e.g. the
//! bootstrap builder's `bootstrap`, `extra_dirs`, `root_ssh_authorized_file`). What fuel-agent
//! hard-codes, the spec states: `variant: standard` (fuel-agent runs debootstrap without
//! `--variant`), `arch: amd64`, `keep_apt_sources: false` (its post-install step empties the apt
//! sources and preferences). Image sizes: fuel-agent makes every image an 8192 MiB sparse file
//! (its `sparse_file_size`) and shrinks it after the build; the input carries no size. debimg
//! takes 8 GiB for `/` (the headroom fuel-agent's comment keeps so the filesystem can later grow to
//! a whole disk), 512 MiB for `/boot` and 4 GiB for any other mount. The files are sparse and ext
//! images are shrunk, so the size only bounds how much the build may write.
//!
//! # The metadata file
//!
//! fuel-agent writes `<output>/<stem>.yaml`, where `<stem>` is the `/` image's file name up to its
//! first `.` (`env_1_ubuntu_1404_amd64.img.gz` → `env_1_ubuntu_1404_amd64.yaml`); Nailgun's
//! provisioning driver fetches it from next to the `/` image by that rule. Its shape
//! ([`FuelMetadata`], from `Manager.do_build_image`):
//!
//! ```yaml
//! images:          # one per image
//! - {container: gzip, container_md5: ..., container_name: x.img.gz, container_size: N,
//!    format: ext4, raw_md5: ..., raw_name: null, raw_size: N}
//! os: {major: 14, minor: 4, name: Ubuntu}
//! packages: [...]  # as requested
//! repos:
//! - {meta: null, name: ..., priority: null, section: ..., suite: ..., type: deb, uri: ...}
//! ```
//!
//! debimg's own metadata (a different shape) still goes to `<spec name>.yaml`; the spec is named
//! `<stem>.debimg` so that file, which decides reuse, does not collide with fuel-agent's.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::debian::release::ReleaseMeta;
use crate::metadata::Metadata;
use crate::spec::{Container, Fs, Spec, SpecError};

/// Size of the sparse file for `/` (fuel-agent's `sparse_file_size`).
pub const ROOT_SIZE: &str = "8GiB";
/// Size of the sparse file for `/boot`.
pub const BOOT_SIZE: &str = "512MiB";
/// Size of the sparse file for any other mount point.
pub const OTHER_SIZE: &str = "4GiB";

/// Appended to the `/` image's stem to name the spec, so debimg's own metadata
/// (`<stem>.debimg.yaml`) sits beside fuel-agent's (`<stem>.yaml`).
pub const SPEC_NAME_SUFFIX: &str = ".debimg";

/// Top-level keys [`FuelInput::from_json`] reads; every other key is ignored.
const KNOWN_KEYS: &[&str] = &[
    "image_data",
    "output",
    "repos",
    "codename",
    "packages",
    "proxies",
    "hashed_root_password",
    "root_password",
];

/// fuel-agent's `nailgun_build_image` input, with the keys debimg reads.
#[derive(Debug, Clone, PartialEq)]
pub struct FuelInput {
    /// Mount point → image, sorted by mount point.
    pub image_data: BTreeMap<String, FuelImage>,
    /// Directory the images and metadata go to.
    pub output: String,
    pub repos: Vec<FuelRepo>,
    pub codename: Option<String>,
    pub packages: Option<Vec<String>>,
    pub proxies: Option<FuelProxies>,
    pub hashed_root_password: Option<String>,
    pub root_password: Option<String>,
    /// Top-level keys present in the input that debimg does not read.
    pub ignored: Vec<String>,
}

/// One entry of `image_data`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FuelImage {
    /// Where Nailgun will serve the image; only the file name counts for the build.
    pub uri: String,
    /// Filesystem (`ext4`, ...).
    pub format: String,
    /// `gzip` or `raw`.
    pub container: String,
    /// Keys debimg does not read.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// One entry of `repos`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FuelRepo {
    pub name: String,
    pub uri: String,
    pub suite: String,
    /// Components, space separated.
    pub section: String,
    /// apt pin priority; `null` means no pin.
    #[serde(default)]
    pub priority: Option<i32>,
    /// `deb` (fuel-agent reads nothing else).
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// debimg's addition: the repo's OpenPGP key, as a spec's `repos[].key` (inline armored
    /// text, or a file relative to the input). Without it the repo is used unauthenticated, as
    /// fuel-agent used every repo.
    #[serde(default)]
    pub key: Option<String>,
    /// Keys debimg does not read.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// The `proxies` object.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct FuelProxies {
    /// Protocol (`http`, `https`, `ftp`) → proxy URL.
    #[serde(default)]
    pub protocols: BTreeMap<String, String>,
    /// Hosts reached without the proxy.
    #[serde(default)]
    pub direct_repo_addr_list: Vec<String>,
    /// Keys debimg does not read.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl FuelInput {
    /// Parses the JSON text; every error names the key it is about.
    pub fn from_json(text: &str) -> Result<FuelInput> {
        let value: Value = serde_json::from_str(text).context("not valid JSON")?;
        let Value::Object(mut obj) = value else {
            bail!("must be a JSON object (fuel-agent's nailgun_build_image input)");
        };
        let mut required = |key: &str| {
            obj.remove(key).filter(|v| !v.is_null()).ok_or_else(|| {
                anyhow!(
                    "missing required key `{key}` (a nailgun_build_image input needs `image_data`, `output` and `repos`)"
                )
            })
        };
        let image_data: BTreeMap<String, Value> = typed(required("image_data")?, "image_data")?;
        let output: String = typed(required("output")?, "output")?;
        let repos: Vec<Value> = typed(required("repos")?, "repos")?;
        let image_data = image_data
            .into_iter()
            .map(|(mount, v)| {
                let img = typed(v, &format!("image_data[{mount:?}]"))?;
                Ok((mount, img))
            })
            .collect::<Result<BTreeMap<_, FuelImage>>>()?;
        let repos = repos
            .into_iter()
            .enumerate()
            .map(|(i, v)| typed(v, &format!("repos[{i}]")))
            .collect::<Result<Vec<FuelRepo>>>()?;
        let mut optional = |key: &str| obj.remove(key).filter(|v| !v.is_null());
        let codename = optional("codename")
            .map(|v| typed(v, "codename"))
            .transpose()?;
        let packages = optional("packages")
            .map(|v| typed(v, "packages"))
            .transpose()?;
        let proxies = optional("proxies")
            .map(|v| typed(v, "proxies"))
            .transpose()?;
        let hashed_root_password = optional("hashed_root_password")
            .map(|v| typed(v, "hashed_root_password"))
            .transpose()?;
        let root_password = optional("root_password")
            .map(|v| typed(v, "root_password"))
            .transpose()?;
        let ignored = obj
            .keys()
            .filter(|k| !KNOWN_KEYS.contains(&k.as_str()))
            .cloned()
            .collect();
        Ok(FuelInput {
            image_data,
            output,
            repos,
            codename,
            packages,
            proxies,
            hashed_root_password,
            root_password,
            ignored,
        })
    }
}

/// Deserializes one piece of the input, naming it in the error.
fn typed<T: serde::de::DeserializeOwned>(v: Value, path: &str) -> Result<T> {
    serde_json::from_value(v).map_err(|e| anyhow!("{path}: {e}"))
}

/// What `debimg build --fuel` builds and where.
#[derive(Debug, Clone, PartialEq)]
pub struct FuelBuild {
    /// The validated spec.
    pub spec: Spec,
    /// fuel-agent's `output`: where the images and both metadata files go.
    pub output_dir: PathBuf,
    /// The metadata file fuel-agent writes, relative to `output_dir` (`<stem>.yaml`).
    pub metadata_name: String,
}

impl FuelBuild {
    /// Writes fuel-agent's metadata file for a finished (or reused) build, atomically and
    /// world-readable (Nailgun serves it over HTTP). Returns its path.
    pub fn write_metadata(&self, meta: &Metadata) -> Result<PathBuf> {
        let path = self.output_dir.join(&self.metadata_name);
        let text = fuel_metadata_yaml(meta)?;
        crate::output::write_atomic(
            &self.output_dir,
            &self.metadata_name,
            text.as_bytes(),
            0o644,
        )?;
        Ok(path)
    }
}

/// Reads fuel-agent's `nailgun_build_image` JSON and makes the validated spec of the same build.
/// `source_name` names the input in errors.
pub fn spec_from_fuel(json_text: &str, source_name: &str) -> Result<FuelBuild> {
    let input = FuelInput::from_json(json_text)
        .with_context(|| format!("reading fuel-agent input {source_name}"))?;
    build_from_input(&input, source_name)
        .with_context(|| format!("converting fuel-agent input {source_name}"))
}

/// Turns parsed input into the validated spec, the output directory and the metadata name.
pub fn build_from_input(input: &FuelInput, source_name: &str) -> Result<FuelBuild> {
    if !input.ignored.is_empty() {
        tracing::info!(
            "fuel input: ignoring keys debimg does not use: {}",
            input.ignored.join(", ")
        );
    }
    for (mount, img) in &input.image_data {
        if !img.extra.is_empty() {
            tracing::info!(
                "fuel input: ignoring image_data[{mount:?}] keys: {}",
                img.extra.keys().cloned().collect::<Vec<_>>().join(", ")
            );
        }
    }
    if input.output.is_empty() {
        bail!("output: must name the directory the images go to");
    }

    let root = input.image_data.get("/").ok_or_else(|| {
        anyhow!(
            "image_data: no image for `/` (fuel-agent names its metadata after the `/` image, and debimg needs a root filesystem)"
        )
    })?;
    let root_file = uri_file_name(&root.uri);
    let stem = root_file.split('.').next().unwrap_or("");
    if stem.is_empty() {
        bail!(
            "image_data[\"/\"].uri: `{}` has no file name to name the metadata after",
            crate::spec::shown(&root.uri)
        );
    }
    let metadata_name = format!("{stem}.yaml");

    let mut images = Vec::new();
    let mut mounts = Vec::new();
    for (mount, img) in &input.image_data {
        images.push(image_value(mount, img)?);
        mounts.push(mount.clone());
    }

    let first = input
        .repos
        .first()
        .ok_or_else(|| anyhow!("repos: at least one repo is needed; the first is the one the base system is bootstrapped from"))?;
    let suite = match &input.codename {
        Some(c) if *c != first.suite => bail!(
            "codename: `{c}` differs from repos[0].suite `{}`; fuel-agent bootstraps the first repo's suite, debimg needs them equal",
            first.suite
        ),
        Some(c) => c.clone(),
        None => first.suite.clone(),
    };
    let mut repos = Vec::new();
    for (i, r) in input.repos.iter().enumerate() {
        if let Some(kind) = &r.kind
            && kind != "deb"
        {
            bail!("repos[{i}].type: `{kind}` is not supported (only `deb` repos are built from)");
        }
        repos.push(json!({
            "name": r.name,
            "uri": r.uri,
            "suite": r.suite,
            // fuel-agent writes `deb URI SUITE` for a flat repository: no section.
            "section": (!(r.section.trim().is_empty() && crate::spec::is_flat_suite(&r.suite)))
                .then_some(&r.section),
            "priority": r.priority,
            // fuel-agent checked no signature; with a key, debimg checks against it.
            "trusted": r.key.is_none(),
            "key": r.key,
        }));
    }

    let packages: Vec<String> = input
        .packages
        .as_ref()
        .ok_or_else(|| {
            anyhow!(
                "packages: missing; fuel-agent would install its built-in Ubuntu Trusty list (Fuel's own agents), which does not fit a Debian image: list the packages explicitly"
            )
        })?
        .iter()
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect();

    let mut spec = json!({
        "version": crate::spec::SPEC_VERSION,
        "name": format!("{stem}{SPEC_NAME_SUFFIX}"),
        "arch": "amd64",
        "suite": suite,
        "variant": "standard",
        "repos": repos,
        "packages": packages,
        "images": images,
        "keep_apt_sources": false,
    });
    if let Some(px) = &input.proxies
        && let Some(v) = proxies_value(px)
    {
        spec["proxies"] = v;
    }
    if let Some(hash) = root_password_hash(input)? {
        spec["root_password_hash"] = Value::String(hash);
    }

    let text = serde_json::to_string_pretty(&spec).context("rendering the spec")?;
    let spec = Spec::from_yaml(&text, source_name).map_err(|e| fuel_spec_error(&e, &mounts))?;
    Ok(FuelBuild {
        spec,
        output_dir: PathBuf::from(&input.output),
        metadata_name,
    })
}

/// The spec's image entry for one `image_data` entry.
fn image_value(mount: &str, img: &FuelImage) -> Result<Value> {
    let at = format!("image_data[{mount:?}]");
    let fs: Fs = serde_json::from_value(Value::String(img.format.clone())).map_err(|_| {
        anyhow!(
            "{at}.format: `{}` is not a filesystem debimg makes (ext2, ext3, ext4, xfs, btrfs)",
            img.format
        )
    })?;
    let container = match img.container.as_str() {
        "gzip" => Container::Gzip,
        "raw" => Container::Raw,
        other => {
            bail!("{at}.container: `{other}` is not supported (gzip or raw, as in fuel-agent)")
        }
    };
    let file = uri_file_name(&img.uri);
    let ext = match container {
        Container::Gzip => ".img.gz",
        Container::Raw => ".img",
    };
    let base = file.strip_suffix(ext).filter(|b| !b.is_empty()).ok_or_else(|| {
        anyhow!(
            "{at}.uri: the file name `{file}` must be `<name>{ext}` for container `{}`: fuel-agent writes the image under that name and debimg names `{}` images `<name>{ext}`",
            container.name(),
            container.name()
        )
    })?;
    let size = match mount {
        "/" => ROOT_SIZE,
        "/boot" => BOOT_SIZE,
        _ => OTHER_SIZE,
    };
    Ok(json!({
        "mount": mount,
        "fs": fs.name(),
        "size": size,
        "container": container.name(),
        "output": base,
    }))
}

/// The spec's `proxies`, or `None` when the input sets none.
fn proxies_value(px: &FuelProxies) -> Option<Value> {
    let mut out = serde_json::Map::new();
    for (proto, url) in &px.protocols {
        match proto.as_str() {
            "http" | "https" => {
                out.insert(proto.clone(), Value::String(url.clone()));
            }
            other => tracing::warn!(
                "fuel input: ignoring the {other} proxy: debimg fetches only over http(s)"
            ),
        }
    }
    if !px.direct_repo_addr_list.is_empty() {
        out.insert("direct".into(), json!(px.direct_repo_addr_list));
    }
    (!out.is_empty()).then_some(Value::Object(out))
}

/// Root's password hash from the input.
///
/// A plain `root_password` is refused rather than hashed here. debimg's spec never takes plain
/// passwords, and hashing needs a salt: a random one changes the spec digest on every run, so
/// finished images would never be reused; a fixed or derived one weakens the hash. fuel-agent's
/// input has a key for the hash, so the caller can make one. With neither key, root stays locked
/// (fuel-agent would set its built-in default password, which an image should not ship).
pub fn root_password_hash(input: &FuelInput) -> Result<Option<String>> {
    match (&input.hashed_root_password, &input.root_password) {
        (Some(hash), _) => Ok(Some(hash.clone())),
        (None, Some(_)) => bail!(
            "root_password: plain passwords are not accepted; give `hashed_root_password` instead (a crypt(3) hash, e.g. from `mkpasswd -m sha-512` or `openssl passwd -6`)"
        ),
        (None, None) => {
            tracing::info!("fuel input: no hashed_root_password, root stays locked");
            Ok(None)
        }
    }
}

/// The last component of a URI's path, as fuel-agent takes it (`basename(urlsplit(uri).path)`):
/// scheme, host, query and fragment do not count.
pub fn uri_file_name(uri: &str) -> &str {
    let path = match uri.find("://") {
        Some(i) => {
            let after = &uri[i + 3..];
            after.find('/').map_or("", |j| &after[j..])
        }
        None => uri,
    };
    let path = path.split(['?', '#']).next().unwrap_or("");
    path.rsplit('/').next().unwrap_or("")
}

/// Restates a spec validation error in the input's terms.
fn fuel_spec_error(e: &SpecError, mounts: &[String]) -> anyhow::Error {
    let n = e.problems.len();
    // The caller's context names the input (`e.source_name`) already.
    let mut msg = format!(
        "the input does not make a valid debimg build ({n} problem{}):",
        if n == 1 { "" } else { "s" }
    );
    for p in &e.problems {
        let field = fuel_field(&p.field, mounts);
        if field.is_empty() {
            msg.push_str(&format!("\n  - {}", p.message));
        } else if field == p.field {
            msg.push_str(&format!("\n  - {field}: {}", p.message));
        } else {
            msg.push_str(&format!(
                "\n  - {field}: {} (debimg spec field `{}`)",
                p.message, p.field
            ));
        }
    }
    anyhow!(msg)
}

/// The input key a spec field came from.
fn fuel_field(field: &str, mounts: &[String]) -> String {
    match field {
        "name" => return "image_data[\"/\"].uri".into(),
        "suite" => return "codename".into(),
        "images" => return "image_data".into(),
        "root_password_hash" => return "hashed_root_password".into(),
        "proxies.http" => return "proxies.protocols.http".into(),
        "proxies.https" => return "proxies.protocols.https".into(),
        _ => {}
    }
    if let Some(rest) = field.strip_prefix("proxies.direct") {
        return format!("proxies.direct_repo_addr_list{rest}");
    }
    if let Some(rest) = field.strip_prefix("images[")
        && let Some((idx, sub)) = rest.split_once(']')
        && let Some(mount) = idx.parse::<usize>().ok().and_then(|i| mounts.get(i))
    {
        let sub = match sub {
            ".output" => ".uri",
            ".fs" => ".format",
            ".mount" | ".size" => "",
            other => other,
        };
        return format!("image_data[{mount:?}]{sub}");
    }
    field.to_string()
}

/// fuel-agent's metadata file, in the shape `Manager.do_build_image` writes it (keys in the
/// order its `yaml.safe_dump` sorts them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FuelMetadata {
    pub images: Vec<FuelImageMeta>,
    pub os: FuelOs,
    /// Packages as requested.
    pub packages: Vec<String>,
    pub repos: Vec<FuelRepoMeta>,
}

/// One image in fuel-agent's metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FuelImageMeta {
    pub container: String,
    pub container_md5: String,
    pub container_name: String,
    pub container_size: u64,
    pub format: String,
    pub raw_md5: String,
    /// Always null: fuel-agent ships only the container.
    pub raw_name: Option<String>,
    pub raw_size: u64,
}

/// fuel-agent's `os` entry: its OS class name and version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FuelOs {
    pub major: OsVersion,
    pub minor: OsVersion,
    pub name: String,
}

/// A version number, or fuel-agent's `unknown`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OsVersion {
    Number(u64),
    Unknown(String),
}

/// One repo in fuel-agent's metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FuelRepoMeta {
    /// fuel-agent writes null; debimg gives the Release fields it pinned on, null when none.
    pub meta: Option<ReleaseMeta>,
    pub name: String,
    pub priority: Option<i32>,
    pub section: String,
    pub suite: String,
    /// Always `deb`.
    #[serde(rename = "type")]
    pub kind: String,
    pub uri: String,
}

impl FuelMetadata {
    /// fuel-agent's view of debimg's metadata.
    pub fn from_metadata(meta: &Metadata) -> FuelMetadata {
        let images = meta
            .images
            .iter()
            .map(|i| FuelImageMeta {
                container: i.container.clone(),
                container_md5: i.container_md5.clone(),
                container_name: i.container_name.clone(),
                container_size: i.container_size,
                format: i.format.clone(),
                raw_md5: i.raw_md5.clone(),
                raw_name: None,
                raw_size: i.raw_size,
            })
            .collect();
        let repos = meta
            .repos
            .iter()
            .map(|r| FuelRepoMeta {
                meta: (r.meta != ReleaseMeta::default()).then(|| r.meta.clone()),
                name: r.name.clone(),
                priority: r.priority,
                section: r.section.clone(),
                suite: r.suite.clone(),
                kind: "deb".into(),
                uri: r.uri.clone(),
            })
            .collect();
        FuelMetadata {
            images,
            os: fuel_os(meta.repos.first().map(|r| &r.meta)),
            packages: meta.packages.clone(),
            repos,
        }
    }
}

/// The `os` entry from the bootstrap repo's Release file: `Origin` as the name (fuel-agent's
/// class names are `Ubuntu` and `Centos`, so an Ubuntu build reads as fuel-agent's would), and
/// `Version` split into major and minor (`14.04` → 14, 4). Without them, fuel-agent's generic
/// `OperatingSystem` with versions `unknown`.
fn fuel_os(release: Option<&ReleaseMeta>) -> FuelOs {
    let unknown = || OsVersion::Unknown("unknown".into());
    let name = release
        .and_then(|r| r.origin.clone())
        .filter(|o| !o.is_empty())
        .unwrap_or_else(|| "OperatingSystem".into());
    let mut parts = release
        .and_then(|r| r.version.as_deref())
        .unwrap_or("")
        .split('.')
        .map(|p| p.parse::<u64>().ok());
    let major = parts.next().flatten();
    let minor = major.and(parts.next().flatten());
    FuelOs {
        major: major.map_or_else(unknown, OsVersion::Number),
        minor: minor.map_or_else(unknown, OsVersion::Number),
        name,
    }
}

/// Renders fuel-agent's metadata file (`images`, `os`, `packages`, `repos`) from debimg's
/// metadata; write it to [`FuelBuild::metadata_name`] in the output directory.
pub fn fuel_metadata_yaml(meta: &Metadata) -> Result<String> {
    serde_saphyr::to_string(&FuelMetadata::from_metadata(meta))
        .context("rendering fuel-agent metadata")
}

/// The text of a fuel-agent input file (`--fuel INPUT.json`): a regular file of at most
/// [`crate::spec::MAX_INPUT_BYTES`] (1 MiB) in UTF-8, read without blocking on a FIFO or a
/// device and never more than the limit ([`crate::spec::read_input_text`]).
pub fn read_input(path: &Path) -> Result<String> {
    crate::spec::read_input_text(path, "a fuel-agent input")
        .map_err(|msg| anyhow!("reading {}: {msg}", path.display()))
}

/// Reads a fuel input file ([`read_input`]) and converts it (`debimg build --fuel PATH`).
pub fn spec_from_fuel_file(path: &Path) -> Result<FuelBuild> {
    let text = read_input(path)?;
    let mut build = spec_from_fuel(&text, &path.display().to_string())?;
    // Its repos' key files are next to it, as a spec's are.
    build.spec.base_dir = crate::spec::input_dir(path);
    Ok(build)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Size, Variant};

    const EXAMPLE: &str = include_str!("../data/fuel/example.json");

    fn example() -> Value {
        serde_json::from_str(EXAMPLE).unwrap()
    }

    fn convert(v: &Value) -> Result<FuelBuild> {
        spec_from_fuel(&v.to_string(), "in.json")
    }

    fn err(v: &Value) -> String {
        format!("{:#}", convert(v).unwrap_err())
    }

    #[test]
    fn fuel_pins_above_1000_allow_downgrades() {
        let mut v = example();
        v["repos"][1]["priority"] = Value::from(1050);
        let b = convert(&v).unwrap();
        let plan =
            crate::plan::Plan::new(&b.spec, &crate::plan::HostMirrors::new(), false).unwrap();
        assert_eq!(plan.repos[1].priority, Some(1050));
        assert!(crate::debian::apt::allows_downgrades(&plan.repos));
        let b = convert(&example()).unwrap();
        let plan =
            crate::plan::Plan::new(&b.spec, &crate::plan::HostMirrors::new(), false).unwrap();
        assert!(!crate::debian::apt::allows_downgrades(&plan.repos));
    }

    #[test]
    fn example_maps_field_by_field() {
        let b = spec_from_fuel(EXAMPLE, "example.json").unwrap();
        assert_eq!(b.output_dir, PathBuf::from("/var/tmp/fuel-out"));
        assert_eq!(b.metadata_name, "env_1_debian_bookworm_amd64.yaml");
        let s = &b.spec;
        assert_eq!(s.name, "env_1_debian_bookworm_amd64.debimg");
        assert_eq!(s.suite, "bookworm");
        assert_eq!(s.arch, "amd64");
        assert_eq!(s.variant, Variant::Standard);
        assert!(!s.keep_apt_sources);
        assert_eq!(s.packages, ["openssh-server", "less"]);
        assert_eq!(s.proxies, None);
        assert!(
            s.root_password_hash
                .as_deref()
                .unwrap()
                .starts_with("$6$fuelexample$")
        );

        assert_eq!(s.images.len(), 2);
        let (root, boot) = (&s.images[0], &s.images[1]);
        assert_eq!(root.mount, "/");
        assert_eq!(root.fs, Fs::Ext4);
        assert_eq!(root.container, Container::Gzip);
        assert_eq!(root.size, Size::parse(ROOT_SIZE).unwrap());
        assert_eq!(root.output.as_deref(), Some("env_1_debian_bookworm_amd64"));
        assert_eq!(root.label, None);
        assert_eq!(boot.mount, "/boot");
        assert_eq!(boot.fs, Fs::Ext2);
        assert_eq!(boot.size, Size::parse(BOOT_SIZE).unwrap());
        assert_eq!(
            boot.output.as_deref(),
            Some("env_1_debian_bookworm_amd64-boot")
        );

        assert_eq!(s.repos.len(), 2);
        assert_eq!(s.repos[0].name, "debian");
        assert_eq!(
            s.repos[0].uri.as_deref(),
            Some("http://mirror.example/debian")
        );
        assert_eq!(s.repos[0].suite, "bookworm");
        assert_eq!(s.repos[0].components(), "main");
        assert_eq!(s.repos[0].priority, None);
        assert_eq!(s.repos[1].name, "debian-updates");
        assert_eq!(s.repos[1].suite, "bookworm-updates");
        assert_eq!(s.repos[1].priority, Some(500));
    }

    #[test]
    fn output_files_are_named_as_fuel_agent_names_them() {
        let b = spec_from_fuel(EXAMPLE, "example.json").unwrap();
        let plan =
            crate::plan::Plan::new(&b.spec, &crate::plan::HostMirrors::new(), false).unwrap();
        let names: Vec<&str> = plan
            .images
            .iter()
            .map(|i| i.container_name.as_str())
            .collect();
        assert_eq!(
            names,
            [
                "env_1_debian_bookworm_amd64.img.gz",
                "env_1_debian_bookworm_amd64-boot.img.gz"
            ]
        );
        // debimg's own metadata does not overwrite fuel-agent's.
        assert_ne!(plan.metadata_name(), b.metadata_name);
    }

    #[test]
    fn unknown_keys_are_accepted() {
        let mut v = example();
        v["ks_meta"] = json!({"pm_data": {}});
        v["bootstrap"] = json!({"uuid": "x"});
        v["image_data"]["/"]["size"] = json!(1234);
        v["repos"][0]["meta"] = json!(null);
        let input = FuelInput::from_json(&v.to_string()).unwrap();
        assert_eq!(input.ignored, ["bootstrap", "ks_meta"]);
        assert!(input.image_data["/"].extra.contains_key("size"));
        convert(&v).unwrap();
    }

    #[test]
    fn missing_required_keys_are_named() {
        for key in ["image_data", "output", "repos"] {
            let mut v = example();
            v.as_object_mut().unwrap().remove(key);
            let e = err(&v);
            assert!(e.contains(&format!("missing required key `{key}`")), "{e}");
            assert!(e.contains("in.json"), "{e}");
        }
        let mut v = example();
        v["image_data"]["/boot"]
            .as_object_mut()
            .unwrap()
            .remove("uri");
        let e = err(&v);
        assert!(
            e.contains("image_data[\"/boot\"]: missing field `uri`"),
            "{e}"
        );
        let mut v = example();
        v["repos"][1].as_object_mut().unwrap().remove("suite");
        assert!(err(&v).contains("repos[1]: missing field `suite`"));
        let mut v = example();
        v.as_object_mut().unwrap().remove("packages");
        assert!(err(&v).contains("packages: missing"));
        assert!(format!("{:#}", spec_from_fuel("[1]", "x").unwrap_err()).contains("JSON object"));
    }

    #[test]
    fn bad_format_and_container_are_named() {
        let mut v = example();
        v["image_data"]["/boot"]["format"] = json!("vfat");
        let e = err(&v);
        assert!(e.contains("image_data[\"/boot\"].format: `vfat`"), "{e}");
        let mut v = example();
        v["image_data"]["/"]["container"] = json!("bzip2");
        assert!(err(&v).contains("image_data[\"/\"].container: `bzip2`"));
    }

    #[test]
    fn mount_without_slash_is_named() {
        let mut v = example();
        let boot = v["image_data"]["/boot"].take();
        v["image_data"].as_object_mut().unwrap().remove("/boot");
        v["image_data"]["boot"] = boot;
        let e = err(&v);
        assert!(
            e.contains("image_data[\"boot\"]: `boot` must be an absolute path"),
            "{e}"
        );
        assert!(e.contains("images[1].mount"), "{e}");
    }

    #[test]
    fn a_root_image_is_needed() {
        let mut v = example();
        v["image_data"].as_object_mut().unwrap().remove("/");
        assert!(err(&v).contains("no image for `/`"));
    }

    #[test]
    fn file_names_must_fit_the_container() {
        let mut v = example();
        v["image_data"]["/"]["uri"] = json!("http://fuel.example/x/root.img?v=1");
        v["image_data"]["/"]["container"] = json!("raw");
        let b = convert(&v).unwrap();
        assert_eq!(b.metadata_name, "root.yaml");
        assert_eq!(b.spec.images[0].container, Container::Raw);
        assert_eq!(b.spec.images[0].output.as_deref(), Some("root"));
        v["image_data"]["/"]["container"] = json!("gzip");
        let e = err(&v);
        assert!(e.contains("`root.img` must be `<name>.img.gz`"), "{e}");
        v["image_data"]["/"]["uri"] = json!("http://fuel.example/images/");
        assert!(err(&v).contains("image_data[\"/\"].uri"));
    }

    #[test]
    fn uri_file_names() {
        assert_eq!(uri_file_name("http://h:8080/a/b/x.img.gz"), "x.img.gz");
        assert_eq!(uri_file_name("file:///tmp/x.img"), "x.img");
        assert_eq!(uri_file_name("http://h/x.img.gz?a=b#c"), "x.img.gz");
        assert_eq!(uri_file_name("http://host.only"), "");
        assert_eq!(uri_file_name("/plain/path.img"), "path.img");
    }

    #[test]
    fn proxies_map_and_ftp_is_dropped() {
        let mut v = example();
        v["proxies"] = json!({
            "protocols": {
                "http": "http://proxy.example:3128",
                "https": "http://proxy.example:3128",
                "ftp": "http://proxy.example:3128"
            },
            "direct_repo_addr_list": ["10.20.0.2", "repo.example"]
        });
        let px = convert(&v).unwrap().spec.proxies.unwrap();
        assert_eq!(px.http.as_deref(), Some("http://proxy.example:3128"));
        assert_eq!(px.https.as_deref(), Some("http://proxy.example:3128"));
        assert_eq!(px.direct, ["10.20.0.2", "repo.example"]);
        v["proxies"] = json!({"protocols": {}, "direct_repo_addr_list": []});
        assert_eq!(convert(&v).unwrap().spec.proxies, None);
    }

    #[test]
    fn root_password_choices() {
        let mut v = example();
        v["root_password"] = json!("r00t");
        // The hash wins when both are given.
        assert!(convert(&v).unwrap().spec.root_password_hash.is_some());
        v.as_object_mut().unwrap().remove("hashed_root_password");
        let e = err(&v);
        assert!(e.contains("plain passwords are not accepted"), "{e}");
        v.as_object_mut().unwrap().remove("root_password");
        assert_eq!(convert(&v).unwrap().spec.root_password_hash, None);
    }

    #[test]
    fn codename_and_first_suite() {
        let mut v = example();
        v.as_object_mut().unwrap().remove("codename");
        assert_eq!(convert(&v).unwrap().spec.suite, "bookworm");
        v["codename"] = json!("trixie");
        assert!(err(&v).contains("codename: `trixie` differs from repos[0].suite"));
        v["codename"] = json!("bookworm");
        v["repos"] = json!([]);
        assert!(err(&v).contains("repos: at least one repo"));
    }

    #[test]
    fn repo_type_and_package_list() {
        let mut v = example();
        v["repos"][1]["type"] = json!("deb-src");
        assert!(err(&v).contains("repos[1].type: `deb-src`"));
        let mut v = example();
        v["packages"] = json!(["less", "", " vim "]);
        assert_eq!(convert(&v).unwrap().spec.packages, ["less", "vim"]);
    }

    #[test]
    fn spec_problems_are_restated_in_fuel_terms() {
        let mut v = example();
        v["packages"] = json!(["Bad_Name"]);
        v["repos"][1]["section"] = json!("");
        v["proxies"] = json!({"protocols": {"http": "not a url"}});
        v["hashed_root_password"] = json!("plain");
        let e = err(&v);
        for want in [
            "converting fuel-agent input in.json: the input does not make a valid debimg build (4 problems)",
            "- packages[0]: `Bad_Name`",
            "- repos[1].section:",
            "- proxies.protocols.http: `not a url`",
            "- hashed_root_password: must be a crypt(3) hash",
        ] {
            assert!(e.contains(want), "{want} missing in {e}");
        }
        assert_eq!(
            fuel_field("images[0].output", &["/".into()]),
            "image_data[\"/\"].uri"
        );
        assert_eq!(
            fuel_field("proxies.direct[2]", &[]),
            "proxies.direct_repo_addr_list[2]"
        );
        assert_eq!(fuel_field("suite", &[]), "codename");
    }

    /// Built through serde so that fields added to `Metadata` with defaults do not break it.
    fn metadata() -> Metadata {
        let image = |name: &str, mount: &str, format: &str| {
            json!({
                "container": "gzip",
                "container_name": format!("{name}.img.gz"),
                "container_size": 10,
                "container_md5": "00".repeat(16),
                "container_sha256": "11".repeat(32),
                "format": format,
                "raw_md5": "22".repeat(16),
                "raw_name": format!("{name}.img"),
                "raw_size": 1u64 << 30,
                "raw_sha256": "33".repeat(32),
                "mount": mount,
                "uuid": "0b9e8a84-7c3b-4bd0-8a9e-1234567890ab",
            })
        };
        let repo = |name: &str, suite: &str, meta: Value| {
            json!({
                "name": name,
                "uri": "http://mirror.example/debian",
                "suite": suite,
                "section": "main",
                "priority": null,
                "meta": meta,
            })
        };
        serde_json::from_value(json!({
            "name": "env_1.debimg",
            "debimg_version": "0.1.0",
            "spec_digest": "ab".repeat(32),
            "bootstrap": "debootstrap",
            "build_start": "2026-01-01T00:00:00Z",
            "build_end": "2026-01-01T00:05:00Z",
            "images": [image("env_1", "/", "ext4"), image("env_1-boot", "/boot", "ext2")],
            "repos": [
                repo("debian", "bookworm", json!({"origin": "Debian", "version": "12.5"})),
                repo("debian-updates", "bookworm-updates", json!({})),
            ],
            "packages": ["less"],
            "installed": {"less": "590-2"},
        }))
        .unwrap()
    }

    #[test]
    fn fuel_metadata_has_fuel_agents_shape() {
        let text = fuel_metadata_yaml(&metadata()).unwrap();
        let doc: BTreeMap<String, Value> = serde_saphyr::from_str(&text).unwrap();
        assert_eq!(
            doc.keys().map(String::as_str).collect::<Vec<_>>(),
            ["images", "os", "packages", "repos"],
            "{text}"
        );
        let images = doc["images"].as_array().unwrap();
        assert_eq!(images.len(), 2);
        let keys: Vec<&str> = images[0]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            [
                "container",
                "container_md5",
                "container_name",
                "container_size",
                "format",
                "raw_md5",
                "raw_name",
                "raw_size"
            ]
        );
        assert_eq!(images[0]["container_name"], "env_1.img.gz");
        assert_eq!(images[1]["format"], "ext2");
        assert_eq!(images[0]["raw_name"], Value::Null);
        assert_eq!(images[0]["raw_size"], 1u64 << 30);
        assert_eq!(
            doc["os"],
            json!({"major": 12, "minor": 5, "name": "Debian"})
        );
        assert_eq!(doc["packages"], json!(["less"]));
        let repos = doc["repos"].as_array().unwrap();
        assert_eq!(repos[0]["type"], "deb");
        assert_eq!(repos[0]["name"], "debian");
        assert_eq!(repos[0]["priority"], Value::Null);
        assert_eq!(repos[0]["meta"]["origin"], "Debian");
        assert_eq!(repos[1]["meta"], Value::Null);
        let back: FuelMetadata = serde_saphyr::from_str(&text).unwrap();
        assert_eq!(back, FuelMetadata::from_metadata(&metadata()));
    }

    #[test]
    fn os_entry_from_release() {
        let rel = |origin: Option<&str>, version: Option<&str>| ReleaseMeta {
            origin: origin.map(Into::into),
            version: version.map(Into::into),
            ..Default::default()
        };
        let n = OsVersion::Number;
        let u = || OsVersion::Unknown("unknown".into());
        let os = fuel_os(Some(&rel(Some("Ubuntu"), Some("14.04"))));
        assert_eq!(
            (os.name.as_str(), os.major, os.minor),
            ("Ubuntu", n(14), n(4))
        );
        let os = fuel_os(Some(&rel(Some("Debian"), None)));
        assert_eq!((os.name.as_str(), os.major, os.minor), ("Debian", u(), u()));
        let os = fuel_os(Some(&rel(None, Some("13"))));
        assert_eq!(
            (os.name.as_str(), os.major, os.minor),
            ("OperatingSystem", n(13), u())
        );
        assert_eq!(fuel_os(None).name, "OperatingSystem");
    }

    #[test]
    fn metadata_file_is_written_beside_the_images() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = spec_from_fuel(EXAMPLE, "example.json").unwrap();
        b.output_dir = dir.path().to_path_buf();
        let path = b.write_metadata(&metadata()).unwrap();
        assert_eq!(path, dir.path().join("env_1_debian_bookworm_amd64.yaml"));
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o644);
        let back: FuelMetadata =
            serde_saphyr::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(back.images.len(), 2);
    }
    #[test]
    fn fuel_repos_are_unauthenticated_unless_given_a_key() {
        let b = spec_from_fuel(EXAMPLE, "example.json").unwrap();
        assert!(b.spec.repos.iter().all(|r| r.trusted && r.key.is_none()));
        // A `trusted: false` in the input is not how to ask for a check: a key is.
        let mut v = example();
        v["repos"][1]["trusted"] = json!(false);
        assert!(convert(&v).unwrap().spec.repos.iter().all(|r| r.trusted));
        v["repos"][1]["key"] = json!("vendor.asc");
        let s = convert(&v).unwrap().spec;
        assert!(s.repos[0].trusted);
        assert!(!s.repos[1].trusted);
        assert_eq!(s.repos[1].key.as_deref(), Some("vendor.asc"));
        // A flat repository as fuel-agent writes it: an empty section.
        v["repos"][1]["suite"] = json!("./");
        v["repos"][1]["section"] = json!("");
        let s = convert(&v).unwrap().spec;
        assert_eq!(s.repos[1].section, None);
        assert_eq!(s.repos[1].components(), "");
    }

    #[test]
    fn injected_repo_uris_are_named_in_fuel_terms() {
        let mut v = example();
        v["repos"][1]["uri"] = json!(
            "http://u:pw@m.example/debian bookworm main\ndeb [trusted=yes] http://x/ sid main\n#"
        );
        let e = err(&v);
        assert!(
            e.contains("- repos[1].uri: `http://u:***@m.example/debian bookworm main\\ndeb"),
            "{e}"
        );
        assert!(!e.contains(":pw@"), "{e}");
        v["repos"][1]["uri"] = json!("http://m.example/debian");
        v["image_data"]["/"]["uri"] = json!("http://u:pw@fuel.example");
        let e = err(&v);
        assert!(
            e.contains("u:***@fuel.example") && !e.contains(":pw@"),
            "{e}"
        );
    }

    #[test]
    fn input_files_are_bounded_regular_files() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let good = dir.path().join("in.json");
        std::fs::write(&good, EXAMPLE).unwrap();
        assert_eq!(read_input(&good).unwrap(), EXAMPLE);
        spec_from_fuel_file(&good).unwrap();
        let big = dir.path().join("big.json");
        std::fs::write(&big, format!("{}{EXAMPLE}", " ".repeat(2 << 20))).unwrap();
        let e = format!("{:#}", spec_from_fuel_file(&big).unwrap_err());
        let size = std::fs::metadata(&big).unwrap().len();
        assert!(e.contains(&format!("the file is {size} bytes")), "{e}");
        assert!(
            e.contains("a fuel-agent input may be at most 1048576 bytes"),
            "{e}"
        );
        let fifo = dir.path().join("fifo.json");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let t = std::time::Instant::now();
        let e = format!("{:#}", read_input(&fifo).unwrap_err());
        assert!(e.contains("is a FIFO, not a regular file"), "{e}");
        assert!(e.contains("fifo.json"), "{e}");
        assert!(t.elapsed() < std::time::Duration::from_secs(2));
        let e = format!("{:#}", read_input(Path::new("/dev/zero")).unwrap_err());
        assert!(e.contains("a character device"), "{e}");
    }
}
