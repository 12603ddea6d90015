//! The YAML metadata written next to the images, last, once every image is in place.
//!
//! Image entries carry fuel-agent's keys (`container`, `container_name`, `container_size`,
//! `container_md5`, `format`, `raw_md5`, `raw_name`, `raw_size`) so its consumers keep working,
//! plus what debimg adds (sha256s, mount, label, uuid). The same file decides reuse: its
//! `spec_digest` must equal the plan's.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::debian::release::ReleaseMeta;

/// The largest metadata file debimg reads back (its own are tens of KiB).
pub const MAX_METADATA_BYTES: u64 = 16 << 20;

/// The whole metadata file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Metadata {
    pub name: String,
    pub debimg_version: String,
    /// sha256 of the plan the images were built from.
    pub spec_digest: String,
    /// The time a reproducible build was as of (`source_date_epoch`), for `debimg verify`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_date_epoch: Option<u64>,
    /// The program that bootstrapped the base system.
    #[serde(default)]
    pub bootstrap: String,
    /// RFC 3339 UTC.
    pub build_start: String,
    /// RFC 3339 UTC.
    pub build_end: String,
    pub images: Vec<ImageMeta>,
    pub repos: Vec<RepoMeta>,
    /// Packages as the spec requested them.
    pub packages: Vec<String>,
    /// Every installed package and its version, from dpkg.
    pub installed: BTreeMap<String, String>,
    /// The kind of image (`fs-images`, `tarball`).
    #[serde(default)]
    pub kind: String,
    /// Other files written next to the images: package records, kernel, initrd.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FileMeta>,
    /// Files copied out of the image: the spec's `attachments` and `copy_kernel`'s kernel and
    /// initrd.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attachments: Vec<AttachmentMeta>,
}

/// A file copied out of the image next to the outputs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AttachmentMeta {
    /// Where it is in the image (`/etc/os-release`), as the spec or dpkg named it.
    pub path: String,
    /// Its name in the output directory (`NAME.attachments/etc/os-release`, `NAME.vmlinuz`).
    pub file: String,
    pub size: u64,
    pub sha256: String,
}

/// A file written next to the images that is not an image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileMeta {
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

/// One image in the output directory.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageMeta {
    /// `gzip` or `raw`.
    pub container: String,
    pub container_name: String,
    pub container_size: u64,
    pub container_md5: String,
    pub container_sha256: String,
    /// The filesystem.
    pub format: String,
    pub raw_md5: String,
    pub raw_name: String,
    pub raw_size: u64,
    pub raw_sha256: String,
    pub mount: String,
    #[serde(default)]
    pub label: Option<String>,
    pub uuid: String,
}

/// One repo the image was built from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RepoMeta {
    pub name: String,
    pub uri: String,
    pub suite: String,
    pub section: String,
    #[serde(default)]
    pub priority: Option<i32>,
    /// The repo's Release fields, as pinned.
    #[serde(default)]
    pub meta: ReleaseMeta,
    /// Used without a signature check (`trusted: true` in the spec).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub trusted: bool,
    /// The fingerprints of the repo's own keys (`key:`), the only ones apt accepted for it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub key_fingerprints: Vec<String>,
}

impl Metadata {
    /// The metadata of a finished build: the plan's names and repos, each staged file with its
    /// digests (`packed`, in the same order), the other files, the attachments, the repos'
    /// Release fields (in plan order) and the installed packages.
    #[allow(clippy::too_many_arguments)]
    pub fn assemble(
        plan: &crate::plan::Plan,
        kind: &str,
        build_start: String,
        staged: &[crate::kind::Staged],
        packed: &[crate::pack::Packed],
        files: Vec<FileMeta>,
        attachments: Vec<AttachmentMeta>,
        release_metas: &[ReleaseMeta],
        installed: BTreeMap<String, String>,
    ) -> Metadata {
        Metadata {
            name: plan.name.clone(),
            debimg_version: env!("CARGO_PKG_VERSION").to_string(),
            spec_digest: plan.digest.clone(),
            source_date_epoch: plan.source_date_epoch,
            bootstrap: plan.backend.name().to_string(),
            build_start,
            build_end: now_rfc3339(),
            images: staged
                .iter()
                .zip(packed)
                .map(|(s, p)| ImageMeta {
                    container: s.ship.name().to_string(),
                    container_name: s.container_name.clone(),
                    container_size: p.container.size,
                    container_md5: p.container.md5.clone(),
                    container_sha256: p.container.sha256.clone(),
                    format: s.format.clone(),
                    raw_md5: p.raw.md5.clone(),
                    raw_name: s.raw_name.clone(),
                    raw_size: p.raw.size,
                    raw_sha256: p.raw.sha256.clone(),
                    mount: s.mount.clone(),
                    label: s.label.clone(),
                    uuid: s.uuid.clone(),
                })
                .collect(),
            repos: plan
                .repos
                .iter()
                .zip(release_metas)
                .map(|(r, m)| RepoMeta {
                    name: r.name.clone(),
                    uri: crate::redact::owned(&r.uri),
                    suite: r.suite.clone(),
                    section: r.section.clone(),
                    priority: r.priority,
                    meta: m.clone(),
                    trusted: r.trusted,
                    key_fingerprints: r.key_fingerprints.clone(),
                })
                .collect(),
            packages: plan.packages.clone(),
            installed,
            kind: kind.to_string(),
            files,
            attachments,
        }
    }

    /// Renders the YAML text.
    pub fn to_yaml(&self) -> Result<String> {
        serde_saphyr::to_string(self).context("rendering metadata")
    }

    /// Reads a metadata file.
    ///
    /// The file is in an output directory others may write to: a link there is not followed,
    /// anything but a regular file of at most [`MAX_METADATA_BYTES`] is refused, and the YAML
    /// parser's limits apply.
    pub fn read(path: &Path) -> Result<Metadata> {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::File::options()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)
            .with_context(|| format!("opening {} (a link is not followed)", path.display()))?;
        let md = file
            .metadata()
            .with_context(|| format!("inspecting {}", path.display()))?;
        if !md.is_file() {
            anyhow::bail!("{} is not a regular file", path.display());
        }
        let mut text = String::new();
        file.take(MAX_METADATA_BYTES + 1)
            .read_to_string(&mut text)
            .with_context(|| format!("reading {}", path.display()))?;
        if text.len() as u64 > MAX_METADATA_BYTES {
            anyhow::bail!(
                "{} is larger than {MAX_METADATA_BYTES} bytes: not a metadata file of debimg's",
                path.display()
            );
        }
        Metadata::from_yaml(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// Parses metadata YAML (with the parser's limits on aliases).
    pub fn from_yaml(text: &str) -> Result<Metadata> {
        Ok(crate::spec::yaml_from_str(text)?)
    }
}

/// Now as RFC 3339 UTC with seconds (`2026-11-23T04:32:02Z`).
pub fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    rfc3339(secs)
}

/// Formats seconds since the epoch as RFC 3339 UTC.
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_408_322), "2026-11-23T04:32:02Z");
    }

    #[test]
    fn yaml_round_trip() {
        let m = Metadata {
            name: "t".into(),
            debimg_version: "0.1.0".into(),
            spec_digest: "ab".repeat(32),
            source_date_epoch: None,
            bootstrap: "mmdebstrap".into(),
            build_start: rfc3339(0),
            build_end: rfc3339(60),
            images: vec![ImageMeta {
                container: "gzip".into(),
                container_name: "t-root.img.gz".into(),
                container_size: 10,
                container_md5: "00".repeat(16),
                container_sha256: "11".repeat(32),
                format: "ext4".into(),
                raw_md5: "22".repeat(16),
                raw_name: "t-root.img".into(),
                raw_size: 1 << 30,
                raw_sha256: "33".repeat(32),
                mount: "/".into(),
                label: Some("root".into()),
                uuid: "0b9e8a84-7c3b-4bd0-8a9e-1234567890ab".into(),
            }],
            repos: vec![RepoMeta {
                name: "debian".into(),
                uri: "http://m.example/debian".into(),
                suite: "bookworm".into(),
                section: "main".into(),
                priority: Some(990),
                meta: ReleaseMeta {
                    origin: Some("Debian".into()),
                    ..Default::default()
                },
                trusted: true,
                key_fingerprints: vec!["AB".repeat(20)],
            }],
            packages: vec!["curl".into()],
            installed: BTreeMap::from([("1:odd".to_string(), "1:2.0-1".to_string())]),
            kind: "fs-images".into(),
            files: vec![FileMeta {
                name: "t.packages".into(),
                size: 12,
                sha256: "44".repeat(32),
            }],
            attachments: vec![AttachmentMeta {
                path: "/etc/systemd/system/mnt-a\\x2db.mount".into(),
                file: "t.attachments/etc/systemd/system/mnt-a\\x2db.mount".into(),
                size: 3,
                sha256: "55".repeat(32),
            }],
        };
        let text = m.to_yaml().unwrap();
        assert!(text.contains("container_md5:"), "{text}");
        assert!(text.contains("trusted: true"), "{text}");
        let back = Metadata::from_yaml(&text).unwrap();
        assert_eq!(back, m);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("real.yaml"), &text).unwrap();
        assert_eq!(Metadata::read(&dir.path().join("real.yaml")).unwrap(), m);
        std::os::unix::fs::symlink(dir.path().join("real.yaml"), dir.path().join("link.yaml"))
            .unwrap();
        assert!(
            Metadata::read(&dir.path().join("link.yaml")).is_err(),
            "a link is not followed"
        );
    }
}
