//! Files fetched from a mirror on the build host with apt's own downloader (`apt-helper
//! download-file`), so the host's apt configuration and the spec's proxies apply as they do for
//! apt itself. Used before anything is bootstrapped: to find which host URI serves a suite, and
//! for the base-tree cache key. Nothing here checks a signature; apt and the bootstrap verify
//! what they download themselves.
//!
//! Errors show URLs and apt's words with credentials masked ([`crate::redact`]).

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

use crate::cmd::CommandRunExt;
use crate::spec::Proxies;

const APT_HELPER: &str = "/usr/lib/apt/apt-helper";

/// A download that apt's downloader could not make: the URL and what the server (or the
/// network) answered, both with credentials masked.
#[derive(Debug, thiserror::Error)]
#[error("fetching {url}: {answer}")]
pub struct FetchError {
    pub url: String,
    /// apt's reason (`404  Not Found [IP: ...]`, `Could not connect to ...`), or the whole
    /// command error when apt gave none.
    pub answer: String,
}

/// Downloads `url` into `dir` (a private directory of the caller's: apt downloads as root
/// there, unsandboxed, since its `_apt` user cannot enter it) and returns its bytes; the file is
/// removed again. A download apt could not make is a [`FetchError`]; an interrupt is not.
pub fn download(url: &str, proxies: &Proxies, dir: &Path) -> Result<Vec<u8>> {
    let dest = dir.join("download");
    let mut cmd = Command::new(APT_HELPER);
    cmd.args(["-o", "APT::Sandbox::User=root"]);
    if let Some(p) = &proxies.http {
        cmd.args(["-o", &format!("Acquire::http::Proxy={p}")]);
    }
    if let Some(p) = &proxies.https {
        cmd.args(["-o", &format!("Acquire::https::Proxy={p}")]);
    }
    cmd.arg("download-file").arg(url).arg(&dest);
    if let Err(e) = cmd.run() {
        if crate::signals::interrupted().is_some() {
            return Err(e);
        }
        // The command line and apt's messages carry the URL (and a proxy's) too.
        let cause = format!("{e:#}");
        return Err(FetchError {
            url: crate::redact::owned(url),
            answer: crate::redact::owned(&apt_reason(&cause).unwrap_or(cause)),
        }
        .into());
    }
    let bytes = std::fs::read(&dest).with_context(|| format!("reading {}", dest.display()));
    let _ = std::fs::remove_file(&dest);
    bytes
}

/// The reason in apt's `E: Failed to fetch URL  REASON` line, whitespace collapsed.
fn apt_reason(output: &str) -> Option<String> {
    let line = output
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("E: Failed to fetch "))?;
    let (_, reason) = line.split_once("  ")?;
    let reason = reason.split_whitespace().collect::<Vec<_>>().join(" ");
    (!reason.is_empty()).then_some(reason)
}

/// The `InRelease` of `suite` at `mirror`, else its `Release`, by `fetch` (one URL to its
/// bytes: [`download`], or a stand-in in tests). The error is the last one `fetch` gave.
pub fn release(
    mirror: &str,
    suite: &str,
    fetch: &dyn Fn(&str) -> Result<Vec<u8>>,
) -> Result<Vec<u8>> {
    let mut last = None;
    for name in ["InRelease", "Release"] {
        match fetch(&format!("{mirror}/dists/{suite}/{name}")) {
            Ok(bytes) => return Ok(bytes),
            Err(e) => last = Some(e),
        }
    }
    Err(last.expect("tried at least once"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apt_reason_is_the_servers_answer() {
        let out = "running /usr/lib/apt/apt-helper download-file http://m.example/debian/dists/x/InRelease /t/download: exit code 100\n\
                   W: Download is performed unsandboxed\n\
                   E: Failed to fetch http://m.example/debian/dists/x/InRelease  404  Not Found [IP: 192.0.2.1 80]\n\
                   E: Download Failed";
        assert_eq!(
            apt_reason(out).as_deref(),
            Some("404 Not Found [IP: 192.0.2.1 80]")
        );
        assert_eq!(apt_reason("E: Download Failed"), None);
    }

    #[test]
    fn release_falls_back_to_the_unsigned_file() {
        let fetch = |url: &str| -> Result<Vec<u8>> {
            if url.ends_with("/InRelease") {
                anyhow::bail!("no InRelease")
            }
            Ok(url.as_bytes().to_vec())
        };
        assert_eq!(
            release("http://m.example/debian", "trixie", &fetch).unwrap(),
            b"http://m.example/debian/dists/trixie/Release"
        );
        let none = |_: &str| -> Result<Vec<u8>> { anyhow::bail!("gone") };
        let e = release("http://m.example/debian", "trixie", &none).unwrap_err();
        assert_eq!(e.to_string(), "gone");
    }
}
