//! A repository's Release (or clearsigned InRelease) file: the fields apt pins on. Pure text
//! reading and plain data, used where the host's mirrors are asked for a suite, after apt
//! fetched them, and in the metadata and fuel-agent's records of what was built from.

use serde::{Deserialize, Serialize};

/// The fields of a repo's Release file that apt can pin on (fuel-agent pinned on these).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseMeta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suite: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub codename: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// Parses the header fields of a Release or (clearsigned) InRelease file.
pub fn parse_release(text: &str) -> ReleaseMeta {
    let mut meta = ReleaseMeta::default();
    let mut lines = text.lines().peekable();
    if lines
        .peek()
        .is_some_and(|l| l.starts_with("-----BEGIN PGP SIGNED MESSAGE"))
    {
        // Skip the armor header block up to its blank line.
        for l in lines.by_ref() {
            if l.trim().is_empty() {
                break;
            }
        }
    }
    for line in lines {
        if line.starts_with("-----BEGIN PGP SIGNATURE") {
            break;
        }
        if line.starts_with(' ') {
            continue;
        }
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim().to_string();
        match key {
            "Origin" => meta.origin = Some(value),
            "Label" => meta.label = Some(value),
            "Suite" => meta.suite = Some(value),
            "Codename" => meta.codename = Some(value),
            "Version" => meta.version = Some(value),
            _ => {}
        }
    }
    meta
}
