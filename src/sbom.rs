//! Software bills of materials written with every build: `NAME.spdx.json` (SPDX 2.3) and
//! `NAME.cdx.json` (CycloneDX 1.5). Each lists every installed Debian package (version,
//! architecture, purl, source package, the licences its DEP-5 copyright file names, the sha256
//! of its file from the lock) and the images themselves with their checksums.
//!
//! The package facts are collected from the finished tree ([`collect`]); the documents are
//! made once the images are packed ([`spdx`], [`cyclonedx`]). With a `source_date_epoch` they
//! are dated with it, so that they are as reproducible as the images; their identifiers come
//! from the spec's digest either way.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::cmd::CommandRunExt;
use crate::lockfile::Lock;
use crate::pack::digest::Digests;
use crate::root::Root;

/// One installed package, as the documents describe it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SbomPackage {
    pub name: String,
    pub version: String,
    pub arch: String,
    /// The source package it was built from, and that source's version.
    pub source: String,
    pub source_version: String,
    /// The licence expressions of its DEP-5 copyright file, one per distinct `License:`
    /// synopsis (`GPL-1+ or Artistic`); empty when it gives none.
    pub licenses: Vec<String>,
    /// sha256 of the package file, from the repository's index (none for a local package).
    pub sha256: Option<String>,
}

/// An output file the documents describe, with its digests.
pub struct SbomImage<'a> {
    pub name: &'a str,
    pub digests: &'a Digests,
}

/// Parses `dpkg-query -W -f '${Package}\t${Version}\t${Architecture}\t${source:Package}\t
/// ${source:Version}\t${db:Status-Abbrev}\n'`: the installed packages, sorted.
pub fn parse_installed(text: &str) -> Vec<(String, String, String, String, String)> {
    let mut out: Vec<_> = text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (f.len() == 6 && f[5].trim_end() == "ii").then(|| {
                (
                    f[0].to_string(),
                    f[1].to_string(),
                    f[2].to_string(),
                    f[3].to_string(),
                    f[4].to_string(),
                )
            })
        })
        .collect();
    out.sort();
    out
}

/// The packages of the finished tree, with their licences and the lock's sha256.
pub fn collect(root: &Root, lock: &Lock) -> Result<Vec<SbomPackage>> {
    let text = root
        .command("dpkg-query")
        .args([
            "-W",
            "-f",
            "${Package}\t${Version}\t${Architecture}\t${source:Package}\t${source:Version}\t${db:Status-Abbrev}\n",
        ])
        .run_stdout()
        .context("listing installed packages and their sources")?;
    let mut out = Vec::new();
    for (name, version, arch, source, source_version) in parse_installed(&text) {
        let licenses = crate::records::package_license_synopses(root, &name)?.unwrap_or_default();
        let sha256 = lock
            .packages
            .iter()
            .find(|p| p.name == name && p.arch == arch && p.version == version)
            .and_then(|p| p.sha256.clone());
        out.push(SbomPackage {
            name,
            version,
            arch,
            source,
            source_version,
            licenses,
            sha256,
        });
    }
    Ok(out)
}

/// `s` percent-encoded as a purl component: all but `A-Z a-z 0-9 . - _ ~`.
fn purl_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"._-~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The package URL: `pkg:deb/debian/NAME@VERSION?arch=ARCH`.
pub fn purl(p: &SbomPackage) -> String {
    format!(
        "pkg:deb/debian/{}@{}?arch={}",
        purl_encode(&p.name),
        purl_encode(&p.version),
        purl_encode(&p.arch)
    )
}

/// The SPDX licence id of a DEP-5 licence name, where the two name the same licence.
pub fn spdx_license_id(dep5: &str) -> Option<&'static str> {
    const IDS: &[(&str, &str)] = &[
        ("gpl-1", "GPL-1.0-only"),
        ("gpl-1+", "GPL-1.0-or-later"),
        ("gpl-2", "GPL-2.0-only"),
        ("gpl-2+", "GPL-2.0-or-later"),
        ("gpl-2.0", "GPL-2.0-only"),
        ("gpl-2.0+", "GPL-2.0-or-later"),
        ("gpl-3", "GPL-3.0-only"),
        ("gpl-3+", "GPL-3.0-or-later"),
        ("gpl-3.0", "GPL-3.0-only"),
        ("gpl-3.0+", "GPL-3.0-or-later"),
        ("lgpl-2", "LGPL-2.0-only"),
        ("lgpl-2+", "LGPL-2.0-or-later"),
        ("lgpl-2.1", "LGPL-2.1-only"),
        ("lgpl-2.1+", "LGPL-2.1-or-later"),
        ("lgpl-2.0", "LGPL-2.0-only"),
        ("lgpl-2.0+", "LGPL-2.0-or-later"),
        ("lgpl-3.0", "LGPL-3.0-only"),
        ("lgpl-3.0+", "LGPL-3.0-or-later"),
        ("agpl-3.0", "AGPL-3.0-only"),
        ("agpl-3.0+", "AGPL-3.0-or-later"),
        ("apache-2", "Apache-2.0"),
        ("mpl-2", "MPL-2.0"),
        ("lgpl-3", "LGPL-3.0-only"),
        ("lgpl-3+", "LGPL-3.0-or-later"),
        ("agpl-3", "AGPL-3.0-only"),
        ("agpl-3+", "AGPL-3.0-or-later"),
        ("gfdl-1.2", "GFDL-1.2-only"),
        ("gfdl-1.2+", "GFDL-1.2-or-later"),
        ("gfdl-1.3", "GFDL-1.3-only"),
        ("gfdl-1.3+", "GFDL-1.3-or-later"),
        ("apache-2.0", "Apache-2.0"),
        ("artistic", "Artistic-1.0-Perl"),
        ("artistic-2.0", "Artistic-2.0"),
        ("bsd-2-clause", "BSD-2-Clause"),
        ("bsd-3-clause", "BSD-3-Clause"),
        ("bsd-4-clause", "BSD-4-Clause"),
        ("expat", "MIT"),
        ("mit", "MIT"),
        ("isc", "ISC"),
        ("zlib", "Zlib"),
        ("mpl-1.1", "MPL-1.1"),
        ("mpl-2.0", "MPL-2.0"),
        ("cc0-1.0", "CC0-1.0"),
        ("bsl-1.0", "BSL-1.0"),
        ("psf-2", "PSF-2.0"),
        ("python-2.0", "Python-2.0"),
        ("openssl", "OpenSSL"),
        ("fsfap", "FSFAP"),
        ("fsful", "FSFUL"),
        ("fsfullr", "FSFULLR"),
        ("x11", "X11"),
        ("curl", "curl"),
        ("sleepycat", "Sleepycat"),
        ("unicode-dfs-2016", "Unicode-DFS-2016"),
        ("0bsd", "0BSD"),
    ];
    let key = dep5.to_ascii_lowercase();
    IDS.iter().find(|(k, _)| *k == key).map(|(_, id)| *id)
}

/// An SPDX `LicenseRef-` for a DEP-5 name that is no SPDX licence.
fn license_ref(dep5: &str) -> String {
    format!("LicenseRef-DEP5-{}", spdx_id_part(dep5))
}

/// A word of a DEP-5 licence synopsis.
#[derive(Debug, PartialEq)]
enum Word {
    Name(String),
    /// `AND` or `OR`.
    Op(&'static str),
    /// A comma: what precedes it is one group (`A or B, and C` is `(A OR B) AND C`).
    Comma,
}

fn words(synopsis: &str) -> Vec<Word> {
    let mut out = Vec::new();
    let mut name: Vec<&str> = Vec::new();
    let flush = |name: &mut Vec<&str>, out: &mut Vec<Word>| {
        if !name.is_empty() {
            out.push(Word::Name(name.join(" ")));
            name.clear();
        }
    };
    for word in synopsis.split_whitespace() {
        let bare = word.trim_end_matches(',');
        let op = match bare.to_ascii_lowercase().as_str() {
            "and" => Some("AND"),
            "or" | "and/or" => Some("OR"),
            _ => None,
        };
        if let Some(op) = op {
            flush(&mut name, &mut out);
            out.push(Word::Op(op));
        } else if !bare.is_empty() {
            name.push(bare);
        }
        if bare.len() != word.len() {
            flush(&mut name, &mut out);
            out.push(Word::Comma);
        }
    }
    flush(&mut name, &mut out);
    out
}

/// The SPDX expression of one DEP-5 licence synopsis: names as SPDX ids or `LicenseRef-`s
/// (each recorded in `refs` with its DEP-5 name), `or`/`and` as `OR`/`AND` (SPDX's `AND`
/// binds tighter, as DEP-5 reads them), comma-separated groups parenthesised. `None` when it
/// names no licence.
fn spdx_expression(
    synopsis: &str,
    refs: &mut std::collections::BTreeMap<String, String>,
) -> Option<String> {
    // Groups between commas, each with the operator that joins it to the one before.
    let mut groups: Vec<(Option<&'static str>, Vec<String>)> = vec![(None, Vec::new())];
    for w in words(synopsis) {
        let (joiner, terms) = groups.last_mut().expect("one group at least");
        match w {
            Word::Name(n) => {
                let id = spdx_license_id(&n).map(str::to_string).unwrap_or_else(|| {
                    let r = license_ref(&n);
                    refs.entry(r.clone()).or_insert(n);
                    r
                });
                if terms.last().is_some_and(|t| t != "AND" && t != "OR") {
                    terms.push("AND".into());
                }
                terms.push(id);
            }
            Word::Op(op) if terms.is_empty() => *joiner = Some(op),
            Word::Op(op) => {
                if let Some(t) = terms.last_mut().filter(|t| *t == "AND" || *t == "OR") {
                    *t = op.into();
                } else {
                    terms.push(op.into());
                }
            }
            Word::Comma => {
                // `A or, B`: the operator before the comma joins the next group.
                let carried = match terms.last().map(String::as_str) {
                    Some("AND") => Some("AND"),
                    Some("OR") => Some("OR"),
                    _ => None,
                };
                if carried.is_some() {
                    terms.pop();
                }
                groups.push((carried, Vec::new()));
            }
        }
    }
    // Left to right, as DEP-5 reads commas: `A, and B, or C` is `(A AND B) OR C`.
    let mut out = String::new();
    let mut top: Option<&str> = None;
    let several = groups.iter().filter(|(_, t)| !t.is_empty()).count() > 1;
    for (joiner, mut terms) in groups {
        while terms.last().is_some_and(|t| t == "AND" || t == "OR") {
            terms.pop();
        }
        if terms.is_empty() {
            continue;
        }
        // SPDX's AND binds tighter than OR: a group needs parentheses only if it holds an OR;
        // what came before, when the operator changes (for the reader's sake too).
        let group = terms.join(" ");
        let group = if several && terms.iter().any(|t| t == "OR") {
            format!("({group})")
        } else {
            group
        };
        if out.is_empty() {
            out = group;
            continue;
        }
        let op = joiner.unwrap_or("AND");
        if top.is_some_and(|t| t != op) {
            out = format!("({out})");
        }
        out = format!("{out} {op} {group}");
        top = Some(op);
    }
    (!out.is_empty()).then_some(out)
}

/// The SPDX expression of a package's licences: the terms every synopsis's expression joins by
/// `AND` at its top level, each once, joined by `AND` (a term with an `OR` of its own
/// parenthesised); `None` when they name none.
fn declared_license(
    synopses: &[String],
    refs: &mut std::collections::BTreeMap<String, String>,
) -> Option<String> {
    let mut terms: Vec<String> = Vec::new();
    for e in synopses.iter().filter_map(|s| spdx_expression(s, refs)) {
        let split = top_level_and_terms(&e);
        let several = split.len() > 1;
        for t in split {
            // A whole expression of ORs is one term; after splitting, a term with a top-level
            // OR is parenthesised already.
            let t = if !several && t.contains(" OR ") && !is_parenthesised(&t) {
                format!("({t})")
            } else {
                t
            };
            if !terms.contains(&t) {
                terms.push(t);
            }
        }
    }
    if terms.len() == 1 && !is_parenthesised(&terms[0]) {
        return terms.pop();
    }
    if terms.len() == 1 {
        let t = terms.pop().expect("one term");
        return Some(t[1..t.len() - 1].to_string());
    }
    (!terms.is_empty()).then(|| terms.join(" AND "))
}

/// The operands of the `AND`s at the top level of `e` (outside any parentheses).
fn top_level_and_terms(e: &str) -> Vec<String> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    let bytes = e.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'(' => depth += 1,
            b')' => depth = depth.saturating_sub(1),
            b' ' if depth == 0 && e[i..].starts_with(" AND ") => {
                out.push(e[start..i].to_string());
                i += " AND ".len();
                start = i;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    out.push(e[start..].to_string());
    out
}

/// Whether `e` is one parenthesised expression: `(A OR B)`, not `(A) OR (B)`.
fn is_parenthesised(e: &str) -> bool {
    if !(e.starts_with('(') && e.ends_with(')')) {
        return false;
    }
    let mut depth = 0usize;
    for (i, c) in e.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 && i != e.len() - 1 {
                    return false;
                }
            }
            _ => {}
        }
    }
    true
}

/// The SPDX 2.3 document (JSON) of a build named `name` whose spec has `digest`, made at
/// `created` (RFC 3339).
pub fn spdx(
    name: &str,
    digest: &str,
    created: &str,
    packages: &[SbomPackage],
    images: &[SbomImage],
) -> Value {
    let mut extracted: std::collections::BTreeMap<String, String> = Default::default();
    let mut pkgs = Vec::new();
    let mut relationships = Vec::new();
    for (i, img) in images.iter().enumerate() {
        let id = format!("SPDXRef-Image-{i}");
        pkgs.push(json!({
            "name": img.name,
            "SPDXID": id,
            "downloadLocation": "NOASSERTION",
            "filesAnalyzed": false,
            "primaryPackagePurpose": "OPERATING-SYSTEM",
            "checksums": [
                {"algorithm": "SHA256", "checksumValue": img.digests.sha256},
                {"algorithm": "MD5", "checksumValue": img.digests.md5},
            ],
            "licenseConcluded": "NOASSERTION",
            "licenseDeclared": "NOASSERTION",
            "copyrightText": "NOASSERTION",
        }));
        relationships.push(json!({
            "spdxElementId": "SPDXRef-DOCUMENT",
            "relationshipType": "DESCRIBES",
            "relatedSpdxElement": id,
        }));
    }
    for (n, p) in packages.iter().enumerate() {
        // The index keeps ids apart that the allowed characters would merge (`a+b`, `a-b`).
        let id = format!(
            "SPDXRef-Package-deb-{n}-{}-{}",
            spdx_id_part(&p.name),
            spdx_id_part(&p.arch)
        );
        let declared = declared_license(&p.licenses, &mut extracted)
            .unwrap_or_else(|| "NOASSERTION".to_string());
        let mut pkg = json!({
            "name": p.name,
            "SPDXID": id,
            "versionInfo": p.version,
            "downloadLocation": "NOASSERTION",
            "filesAnalyzed": false,
            "sourceInfo": format!("built from the Debian source package {} {}", p.source, p.source_version),
            "licenseConcluded": "NOASSERTION",
            "licenseDeclared": declared,
            "copyrightText": "NOASSERTION",
            "externalRefs": [{
                "referenceCategory": "PACKAGE-MANAGER",
                "referenceType": "purl",
                "referenceLocator": purl(p),
            }],
        });
        if let Some(sha) = &p.sha256 {
            pkg["checksums"] = json!([{"algorithm": "SHA256", "checksumValue": sha}]);
        }
        pkgs.push(pkg);
        for i in 0..images.len() {
            relationships.push(json!({
                "spdxElementId": format!("SPDXRef-Image-{i}"),
                "relationshipType": "CONTAINS",
                "relatedSpdxElement": id,
            }));
        }
    }
    let extracted: Vec<Value> = extracted
        .into_iter()
        .map(|(id, dep5)| {
            json!({
                "licenseId": id,
                "name": dep5,
                "extractedText": format!(
                    "The licence a Debian package's machine-readable copyright file \
                     (/usr/share/doc/PACKAGE/copyright) names \"{dep5}\"; its text is in that file."
                ),
            })
        })
        .collect();
    let mut doc = json!({
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": name,
        "documentNamespace": format!(
            "urn:uuid:{}",
            crate::reproducible::seeded_uuid(digest, &format!("spdx:{}", document_key(created, images)))
        ),
        "creationInfo": {
            "created": created,
            "creators": [format!("Tool: debimg-{}", env!("CARGO_PKG_VERSION"))],
        },
        "packages": pkgs,
        "relationships": relationships,
    });
    if !extracted.is_empty() {
        doc["hasExtractedLicensingInfos"] = Value::Array(extracted);
    }
    doc
}

/// What makes a document's identifier its own: its date and the checksums of what it
/// describes (a rebuild of other packages at the same epoch has other images).
fn document_key(created: &str, images: &[SbomImage]) -> String {
    let mut key = created.to_string();
    for img in images {
        key.push(' ');
        key.push_str(&img.digests.sha256);
    }
    key
}

/// What an SPDX identifier may hold of `s`: letters, digits, `.` and `-`.
fn spdx_id_part(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// The CycloneDX 1.5 document (JSON) of the same build.
pub fn cyclonedx(
    name: &str,
    digest: &str,
    created: &str,
    packages: &[SbomPackage],
    images: &[SbomImage],
) -> Value {
    let mut components = Vec::new();
    for img in images {
        components.push(json!({
            "type": "file",
            "bom-ref": format!("file:{}", img.name),
            "name": img.name,
            "hashes": [
                {"alg": "SHA-256", "content": img.digests.sha256},
                {"alg": "MD5", "content": img.digests.md5},
            ],
        }));
    }
    for p in packages {
        let mut c = json!({
            "type": "library",
            "bom-ref": purl(p),
            "name": p.name,
            "version": p.version,
            "purl": purl(p),
            "properties": [
                {"name": "debimg:arch", "value": p.arch},
                {"name": "debimg:source", "value": p.source},
                {"name": "debimg:source-version", "value": p.source_version},
            ],
        });
        // Licences that all apply as a list of licences (their DEP-5 names kept where SPDX
        // has none); a choice among licences as one SPDX expression.
        let all: Vec<Word> = p.licenses.iter().flat_map(|l| words(l)).collect();
        if all.contains(&Word::Op("OR")) {
            if let Some(e) = declared_license(&p.licenses, &mut Default::default()) {
                c["licenses"] = json!([{ "expression": e }]);
            }
        } else {
            let mut names: Vec<&str> = Vec::new();
            for w in &all {
                if let Word::Name(n) = w
                    && !names.contains(&n.as_str())
                {
                    names.push(n);
                }
            }
            if !names.is_empty() {
                c["licenses"] = Value::Array(
                    names
                        .iter()
                        .map(|l| match spdx_license_id(l) {
                            Some(id) => json!({"license": {"id": id}}),
                            None => json!({"license": {"name": l}}),
                        })
                        .collect(),
                );
            }
        }
        if let Some(sha) = &p.sha256 {
            c["hashes"] = json!([{"alg": "SHA-256", "content": sha}]);
        }
        components.push(c);
    }
    json!({
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "serialNumber": format!(
            "urn:uuid:{}",
            crate::reproducible::seeded_uuid(digest, &format!("cyclonedx:{}", document_key(created, images)))
        ),
        "version": 1,
        "metadata": {
            "timestamp": created,
            "tools": {"components": [{
                "type": "application",
                "name": "debimg",
                "version": env!("CARGO_PKG_VERSION"),
            }]},
            "component": {"type": "operating-system", "bom-ref": "image", "name": name},
        },
        "components": components,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkg(name: &str, version: &str, licenses: &[&str]) -> SbomPackage {
        SbomPackage {
            name: name.into(),
            version: version.into(),
            arch: "amd64".into(),
            source: format!("{name}-src"),
            source_version: version.into(),
            licenses: licenses.iter().map(|s| s.to_string()).collect(),
            sha256: Some("ab".repeat(32)),
        }
    }

    #[test]
    fn purls_encode_epochs_and_plus_signs() {
        let p = pkg("libstdc++6", "1:12.2.0-14+deb12u1", &[]);
        assert_eq!(
            purl(&p),
            "pkg:deb/debian/libstdc%2B%2B6@1%3A12.2.0-14%2Bdeb12u1?arch=amd64"
        );
        assert_eq!(
            purl(&pkg("less", "590-2.1~deb12u2", &[])),
            "pkg:deb/debian/less@590-2.1~deb12u2?arch=amd64"
        );
    }

    #[test]
    fn installed_lines_with_sources() {
        let got = parse_installed(
            "less\t590-2\tamd64\tless\t590-2\tii \nlibc6\t2.36-9\tamd64\tglibc\t2.36-9\tii \nold\t1\tall\told\t1\trc \n",
        );
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].3, "glibc");
    }

    #[test]
    fn dep5_expressions_keep_their_choices() {
        let mut refs = Default::default();
        let e = |s: &str, refs: &mut _| spdx_expression(s, refs);
        assert_eq!(
            e("Artistic or GPL-1+", &mut refs).unwrap(),
            "Artistic-1.0-Perl OR GPL-1.0-or-later"
        );
        assert_eq!(
            e("GPL-2+ OR Artistic-2.0, AND BSD-3-clause", &mut refs).unwrap(),
            "(GPL-2.0-or-later OR Artistic-2.0) AND BSD-3-Clause"
        );
        assert_eq!(
            e("GPL-2+ and/or  BSD-3-clause", &mut refs).unwrap(),
            "GPL-2.0-or-later OR BSD-3-Clause"
        );
        assert_eq!(
            e("GPL-2+ with OpenSSL exception", &mut refs).unwrap(),
            "LicenseRef-DEP5-GPL-2--with-OpenSSL-exception"
        );
        assert_eq!(
            refs.get("LicenseRef-DEP5-GPL-2--with-OpenSSL-exception")
                .map(String::as_str),
            Some("GPL-2+ with OpenSSL exception")
        );
        // Commas group left to right; an operator before a comma joins what follows it.
        assert_eq!(
            e("MIT, and ISC, or Zlib, and curl", &mut refs).unwrap(),
            "((MIT AND ISC) OR Zlib) AND curl"
        );
        assert_eq!(
            e("GPL-2+ or, MIT", &mut refs).unwrap(),
            "GPL-2.0-or-later OR MIT"
        );
        // Dangling operators and commas name nothing.
        assert_eq!(e("or MIT and", &mut refs).unwrap(), "MIT");
        assert_eq!(e(", and", &mut refs), None);
        // A package: each expression once, choices parenthesised, all of them apply.
        let synopses: Vec<String> = ["Artistic or GPL-1+", "Expat", "Artistic or GPL-1+"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            declared_license(&synopses, &mut refs).unwrap(),
            "(Artistic-1.0-Perl OR GPL-1.0-or-later) AND MIT"
        );
        assert_eq!(declared_license(&[], &mut refs), None);
        // Terms that repeat across lines are named once (coreutils, perl-base).
        let d = |l: &[&str], refs: &mut _| {
            let v: Vec<String> = l.iter().map(|s| s.to_string()).collect();
            declared_license(&v, refs).unwrap()
        };
        assert_eq!(
            d(
                &["GPL-3+", "GPL-3+ and ISC", "GPL-3+ and FSFULLR"],
                &mut refs
            ),
            "GPL-3.0-or-later AND ISC AND FSFULLR"
        );
        assert_eq!(
            d(
                &["GPL-1+ or Artistic", "Zlib, and GPL-1+ or Artistic"],
                &mut refs
            ),
            "(GPL-1.0-or-later OR Artistic-1.0-Perl) AND Zlib"
        );
        assert_eq!(
            d(&["MIT or GPL-1+ or Artistic"], &mut refs),
            "MIT OR GPL-1.0-or-later OR Artistic-1.0-Perl"
        );
        assert!(is_parenthesised("(A OR (B))"));
        assert!(!is_parenthesised("(A) OR (B)"));
    }

    #[test]
    fn licences_become_spdx_ids_or_declared_refs() {
        let digests = Digests {
            size: 1,
            md5: "0".repeat(32),
            sha256: "1".repeat(64),
        };
        let images = [SbomImage {
            name: "x-root.img.gz",
            digests: &digests,
        }];
        let packages = [
            pkg("bash", "5.2", &["GPL-3+"]),
            pkg("less", "590", &["GPL-3+", "BSD-2-clause", "less"]),
            pkg("nolic", "1", &[]),
            pkg("perl", "5.36", &["GPL-1+ or Artistic", "BSD-3-clause"]),
            pkg("both", "1", &["GPL-2+ and Expat, and less"]),
        ];
        let s = spdx("x", "d", "2023-11-14T22:13:20Z", &packages, &images);
        let p = &s["packages"];
        assert_eq!(p[0]["checksums"][0]["checksumValue"], "1".repeat(64));
        assert_eq!(p[1]["licenseDeclared"], "GPL-3.0-or-later");
        assert_eq!(
            p[2]["licenseDeclared"],
            "GPL-3.0-or-later AND BSD-2-Clause AND LicenseRef-DEP5-less"
        );
        assert_eq!(p[3]["licenseDeclared"], "NOASSERTION");
        assert_eq!(
            s["hasExtractedLicensingInfos"][0]["licenseId"],
            "LicenseRef-DEP5-less"
        );
        assert_eq!(
            s["relationships"].as_array().unwrap().len(),
            1 + packages.len()
        );
        let c = cyclonedx("x", "d", "2023-11-14T22:13:20Z", &packages, &images);
        let comps = c["components"].as_array().unwrap();
        assert_eq!(comps.len(), 1 + packages.len());
        assert_eq!(comps[2]["licenses"][2]["license"]["name"], "less");
        assert_eq!(comps[2]["licenses"][1]["license"]["id"], "BSD-2-Clause");
        // A choice: one expression, in both documents.
        assert_eq!(
            p[4]["licenseDeclared"],
            "(GPL-1.0-or-later OR Artistic-1.0-Perl) AND BSD-3-Clause"
        );
        assert_eq!(
            comps[4]["licenses"],
            json!([{"expression": "(GPL-1.0-or-later OR Artistic-1.0-Perl) AND BSD-3-Clause"}])
        );
        // Licences that all apply: a list in CycloneDX, the DEP-5 names kept.
        assert_eq!(
            p[5]["licenseDeclared"],
            "GPL-2.0-or-later AND MIT AND LicenseRef-DEP5-less"
        );
        assert_eq!(
            comps[5]["licenses"],
            json!([
                {"license": {"id": "GPL-2.0-or-later"}},
                {"license": {"id": "MIT"}},
                {"license": {"name": "less"}}
            ])
        );
        // The same inputs, the same documents.
        assert_eq!(
            s,
            spdx("x", "d", "2023-11-14T22:13:20Z", &packages, &images)
        );
        assert_ne!(
            s["documentNamespace"],
            spdx("x", "d", "2024-01-01T00:00:00Z", &packages, &images)["documentNamespace"]
        );
        // Other images, another document.
        let other = Digests {
            sha256: "2".repeat(64),
            ..digests.clone()
        };
        let others = [SbomImage {
            name: "x-root.img.gz",
            digests: &other,
        }];
        assert_ne!(
            s["documentNamespace"],
            spdx("x", "d", "2023-11-14T22:13:20Z", &packages, &others)["documentNamespace"]
        );
        assert_ne!(
            c["serialNumber"],
            cyclonedx("x", "d", "2023-11-14T22:13:20Z", &packages, &others)["serialNumber"]
        );
        let ids: std::collections::BTreeSet<&str> = p
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["SPDXID"].as_str().unwrap())
            .collect();
        assert_eq!(ids.len(), 1 + packages.len());
    }
}
