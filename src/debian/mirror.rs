//! The build host's apt sources, and which of their URIs serves a suite: what `mirror: host` and
//! `uri: host` stand for. Resolved once, before the plan ([`resolve`], [`resolve_on_host`]):
//! the one step before it that asks the network (apt's downloader, [`super::fetch`]), for a
//! suite none of the host's sources lists. The plan takes the result, a plain
//! [`HostMirrors`], and decides from it alone.
//!
//! Reading and parsing the sources (`/etc/apt/sources.list`, `sources.list.d/*.list` and
//! `*.sources`) and choosing among listed suites are plain functions; only [`probe_host_uri`]
//! asks, through the `fetch` it is given.

use std::path::Path;

use anyhow::{Context, Result, bail};

use super::fetch::{self, FetchError};
use super::release::parse_release;
use crate::plan::{HostMirrors, host_suites};
use crate::spec::Spec;

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
/// [`FetchError`]) is an answer and the next URI is asked; any other
/// error (an interrupt) ends the search. The error lists every URI asked and what it answered.
pub fn probe_host_uri(
    sources: &[HostSource],
    suite: &str,
    fetch: &dyn Fn(&str) -> Result<Vec<u8>>,
) -> Result<String> {
    let mut answers = Vec::new();
    for uri in probe_order(sources, suite) {
        let answer = match fetch::release(&uri, suite, fetch) {
            Ok(bytes) => {
                let meta = parse_release(&String::from_utf8_lossy(&bytes));
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
            Err(e) => match e.downcast_ref::<FetchError>() {
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

/// What `host` stands for in `spec`: each of its [`host_suites`] resolved to the host URI that
/// serves it ([`find_host_uri`]: a suite the host's `sources` list without asking anyone, else
/// the first URI whose Release names it, asked by `fetch`). Each suite is resolved once;
/// an error names the field that asked for it.
pub fn resolve(
    spec: &Spec,
    sources: &[HostSource],
    fetch: &dyn Fn(&str) -> Result<Vec<u8>>,
) -> Result<HostMirrors> {
    let mut host = HostMirrors::new();
    for asked in host_suites(spec) {
        if host.get(&asked.suite).is_some() {
            continue;
        }
        let uri = find_host_uri(sources, &asked.suite, fetch)
            .with_context(|| format!("resolving {}", asked.field))?;
        host.insert(&asked.suite, &uri);
    }
    Ok(host)
}

/// [`resolve`] on this host: its apt sources read from `/etc/apt`, a suite none of them lists
/// asked for with apt's downloader ([`fetch::download`]) and the spec's proxies. A spec that
/// names no `host` reads and asks nothing.
pub fn resolve_on_host(spec: &Spec) -> Result<HostMirrors> {
    if host_suites(spec).is_empty() {
        return Ok(HostMirrors::new());
    }
    let sources = read_host_sources(Path::new("/")).context("reading the host's apt sources")?;
    let proxies = spec.proxies.clone().unwrap_or_default();
    let download = |url: &str| -> Result<Vec<u8>> {
        // apt downloads as root into a directory no one else can enter, removed after.
        let dir = tempfile::Builder::new()
            .prefix("debimg-probe-")
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .tempdir()
            .context("creating a private directory for apt's downloader")?;
        fetch::download(url, &proxies, dir.path())
    };
    resolve(spec, &sources, &download)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Plan;

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
                return Err(FetchError {
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
                None => Err(FetchError {
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
    fn host_repos_are_resolved_per_suite_before_the_plan() {
        let spec = Spec::from_yaml(
            "version: 1\nname: t\nsuite: trixie\nmirror: host\nrepos:\n  - {name: debian, suite: trixie}\n  - {name: updates, suite: trixie}\n  - {name: security, uri: host, suite: trixie-security}\n  - {name: extra, uri: http://x.example/debian, suite: trixie}\nimages:\n  - {mount: /, fs: ext4, size: 1GiB}\n",
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
        let host = resolve(&spec, &s, &|url| m.fetch(url)).unwrap();
        assert_eq!(host.get("trixie"), Some("http://mirror.example/debian"));
        assert_eq!(
            host.get("trixie-security"),
            Some("http://mirror.example/debian-security")
        );
        // trixie once, though two repos ask for it; InRelease answers for each suite.
        assert_eq!(m.asked.borrow().len(), 2, "{:?}", m.asked.borrow());
        let plan = Plan::new(&spec, &host, false).unwrap();
        let uris: Vec<&str> = plan.repos.iter().map(|r| r.uri.as_str()).collect();
        assert_eq!(
            uris,
            [
                "http://mirror.example/debian",
                "http://mirror.example/debian",
                "http://mirror.example/debian-security",
                "http://x.example/debian"
            ]
        );
        assert_eq!(plan.bootstrap_mirror, "http://mirror.example/debian");
        // No URI serves the suite: the error names the field that asked for it.
        let e = resolve(&spec, &s, &|url| Mirror::new(&[]).fetch(url)).unwrap_err();
        assert!(format!("{e:#}").contains("resolving repos[0].uri"), "{e:#}");
    }
}
