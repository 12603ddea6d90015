//! The package records written next to the images: what is installed, which files each package
//! owns, and under which licences (mic/livecd-tools' `.packages`, `.files` and `.licenses`).
//!
//! Everything is read from the image's root tree (`var/lib/dpkg/info`, `usr/share/doc`) through
//! the in-root file API, never from the host: symlinks in the tree are resolved as the image
//! resolves them, and only regular files are read. The functions return the text; the caller
//! decides where it goes.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt::Write as _;

use anyhow::{Context, Result, bail};

use crate::root::Root;

/// Where dpkg keeps the per-package file lists, relative to the root.
pub(crate) const DPKG_INFO: &str = "var/lib/dpkg/info";

/// Where packages install their `copyright` files, relative to the root.
const DOC_DIR: &str = "usr/share/doc";

/// Licence of a package that has no `copyright` file.
pub const NO_COPYRIGHT: &str = "unknown (no copyright file)";

/// Licence of a package whose `copyright` file is free text rather than DEP-5.
pub const NOT_MACHINE_READABLE: &str = "unknown (not machine-readable)";

/// Licence of a package whose DEP-5 `copyright` file names no licence at all (no `License:`
/// field, or only ones whose first line is empty).
pub const NO_LICENSE_NAME: &str = "unknown (no licence named)";

/// The package records the spec asks for next to the images, written into the workspace.
/// Returns (output file name, workspace path) for each, names from the plan. (`copy_kernel`'s
/// kernel and initrd leave the image as attachments do: [`crate::attachments`].)
pub fn extra_outputs(
    plan: &crate::plan::Plan,
    root: &Root,
    work: &std::path::Path,
    installed: &BTreeMap<String, String>,
) -> Result<Vec<(String, std::path::PathBuf)>> {
    use crate::spec::Record;
    let mut out = Vec::new();
    for r in &plan.records {
        let text = match r {
            Record::Packages => packages_record(installed),
            Record::Files => files_record(root, installed)?,
            Record::Licenses => licenses_record(root, installed)?,
        };
        let name = plan.record_name(*r);
        let path = work.join(&name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        out.push((name, path));
    }
    Ok(out)
}

/// The `.packages` record: one `name version` line per installed package, sorted by name.
pub fn packages_record(installed: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    for (name, version) in installed {
        let _ = writeln!(out, "{name} {version}");
    }
    out
}

/// The `.files` record: every installed package and the paths it owns, per dpkg.
///
/// Format, packages sorted by name, paths in the order of dpkg's list (directories included,
/// dpkg's `/.` entry left out), every line ending in `\n`:
///
/// ```text
/// base-files:
///     /etc
///     /etc/debian_version
/// libc6:
///     /lib/x86_64-linux-gnu/libc.so.6
/// ```
///
/// The list is `var/lib/dpkg/info/<pkg>.list`, or for a `Multi-Arch: same` package
/// `<pkg>:<arch>.list`; when such a package is installed for several architectures its paths are
/// merged, each once, architectures in name order. A name in `installed` may itself be
/// arch-qualified (`libc6:amd64`). Paths that are not UTF-8 are written lossily. A package with
/// no list is an error.
pub fn files_record(root: &Root, installed: &BTreeMap<String, String>) -> Result<String> {
    let lists = list_stems(root)?;
    let mut out = String::new();
    for name in installed.keys() {
        let stems = lists_of(&lists, name);
        if stems.is_empty() {
            bail!(
                "package {name} has no dpkg file list (/{DPKG_INFO}/{name}.list or {name}:<arch>.list)"
            );
        }
        let _ = writeln!(out, "{name}:");
        let mut seen = HashSet::new();
        for stem in stems {
            let bytes = root.read(format!("{DPKG_INFO}/{stem}.list"))?;
            for line in String::from_utf8_lossy(&bytes).lines() {
                if line.is_empty() || line == "/." || !seen.insert(line.to_string()) {
                    continue;
                }
                let _ = writeln!(out, "    {line}");
            }
        }
    }
    Ok(out)
}

/// The names of the `*.list` files in dpkg's info directory, without `.list`.
pub(crate) fn list_stems(root: &Root) -> Result<BTreeSet<String>> {
    let mut stems = BTreeSet::new();
    if !root.is_dir(DPKG_INFO) {
        bail!("the image has no dpkg database (/{DPKG_INFO})");
    }
    let entries = root
        .read_dir(DPKG_INFO)
        .context("reading the image's dpkg database")?;
    for entry in entries {
        // Package names are ASCII: a name that is not UTF-8 is no package's list.
        if let Some(stem) = entry.name.to_str().and_then(|n| n.strip_suffix(".list")) {
            stems.insert(stem.to_string());
        }
    }
    Ok(stems)
}

/// The list stems that belong to `name`: the exact one, else `name:<arch>` for every arch;
/// an arch-qualified name falls back to its bare name (dpkg qualifies only `Multi-Arch: same`).
pub(crate) fn lists_of<'a>(stems: &'a BTreeSet<String>, name: &str) -> Vec<&'a str> {
    if let Some(stem) = stems.get(name) {
        return vec![stem];
    }
    if let Some((bare, _)) = name.split_once(':') {
        return stems
            .get(bare)
            .map(|s| vec![s.as_str()])
            .unwrap_or_default();
    }
    let prefix = format!("{name}:");
    stems
        .range(prefix.clone()..)
        .take_while(|s| s.starts_with(&prefix))
        .map(String::as_str)
        .collect()
}

/// The licences the DEP-5 copyright file of the installed package `name` names, or why there
/// are none to give ([`NO_COPYRIGHT`], [`NOT_MACHINE_READABLE`], [`NO_LICENSE_NAME`]).
fn dep5_licenses(
    root: &Root,
    name: &str,
) -> Result<std::result::Result<Vec<String>, &'static str>> {
    dep5_file(root, name, parse_copyright_licenses)
}

/// What `parse` makes of the copyright file of the installed package `name`, or why there
/// is nothing.
fn dep5_file(
    root: &Root,
    name: &str,
    parse: fn(&str) -> Option<Vec<String>>,
) -> Result<std::result::Result<Vec<String>, &'static str>> {
    let bare = name.split_once(':').map_or(name, |(b, _)| b);
    let rel = format!("{DOC_DIR}/{bare}/copyright");
    if !root.is_file(&rel) {
        return Ok(Err(NO_COPYRIGHT));
    }
    let bytes = root.read(&rel)?;
    Ok(match parse(&String::from_utf8_lossy(&bytes)) {
        None => Err(NOT_MACHINE_READABLE),
        Some(l) if l.is_empty() => Err(NO_LICENSE_NAME),
        Some(l) => Ok(l),
    })
}

/// The licence expressions (`GPL-1+ or Artistic`) the DEP-5 copyright file of the installed
/// package `name` gives (see [`copyright_license_synopses`]); `None` when it has no such
/// file, or gives none.
pub fn package_license_synopses(root: &Root, name: &str) -> Result<Option<Vec<String>>> {
    Ok(dep5_file(root, name, copyright_license_synopses)?.ok())
}

/// The `.licenses` record: the licences of every installed package, from
/// `usr/share/doc/<pkg>/copyright` (the name without any `:<arch>`).
///
/// Format, every line ending in `\n`:
///
/// ```text
/// # Licences
/// GPL-2+: 41
/// LGPL-2.1+: 12
/// unknown (not machine-readable): 3
///
/// # Packages
/// bash: GPL-3+
/// libc6: unknown (not machine-readable)
/// tar: GPL-2, GPL-3+
/// ```
///
/// The summary lists each licence with the number of packages under it, by count descending then
/// name; `# Packages` has a line per package, its distinct licences sorted and joined by `, `.
/// Licences come from DEP-5 files (see [`parse_copyright_licenses`]); licence names are
/// case-insensitive there, so spellings differing only in case are counted as one, written the
/// way most packages write it (ties: the first in byte order). A package without a copyright
/// file gets [`NO_COPYRIGHT`], a free-text one [`NOT_MACHINE_READABLE`], a DEP-5 one that names
/// no licence [`NO_LICENSE_NAME`]. Symlinks (`usr/share/doc/<pkg>` often links to another
/// package's directory) are followed inside `root`.
pub fn licenses_record(root: &Root, installed: &BTreeMap<String, String>) -> Result<String> {
    let mut per_package: Vec<(&str, Vec<String>)> = Vec::with_capacity(installed.len());
    for name in installed.keys() {
        let licenses = match dep5_licenses(root, name)? {
            Ok(l) => l,
            Err(why) => vec![why.to_string()],
        };
        per_package.push((name, licenses));
    }

    // Case-insensitive name → spelling → packages writing it so.
    let mut spellings: BTreeMap<String, BTreeMap<&str, usize>> = BTreeMap::new();
    for (_, licenses) in &per_package {
        let distinct: BTreeSet<&str> = licenses.iter().map(String::as_str).collect();
        for l in distinct {
            *spellings
                .entry(l.to_lowercase())
                .or_default()
                .entry(l)
                .or_default() += 1;
        }
    }
    let canonical: BTreeMap<&str, &str> = spellings
        .values()
        .flat_map(|by_spelling| {
            // max_by_key keeps the last maximum: iterate in reverse so ties go to the first.
            let best = by_spelling
                .iter()
                .rev()
                .max_by_key(|(_, n)| **n)
                .map(|(s, _)| *s)
                .unwrap_or_default();
            by_spelling.keys().map(move |s| (*s, best))
        })
        .collect();

    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    let mut lines = String::new();
    for (name, licenses) in &per_package {
        let names: BTreeSet<&str> = licenses.iter().map(|l| canonical[l.as_str()]).collect();
        for l in &names {
            *counts.entry(l).or_default() += 1;
        }
        let joined: Vec<&str> = names.into_iter().collect();
        let _ = writeln!(lines, "{name}: {}", joined.join(", "));
    }
    let mut summary: Vec<(&str, usize)> = counts.into_iter().collect();
    summary.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));

    let mut out = String::from("# Licences\n");
    for (license, n) in summary {
        let _ = writeln!(out, "{license}: {n}");
    }
    out.push_str("\n# Packages\n");
    out.push_str(&lines);
    Ok(out)
}

/// The licences a machine-readable (DEP-5, copyright-format 1.0) `copyright` file names, each
/// once, in order of first appearance; `None` when the file is not machine-readable.
///
/// A file is DEP-5 when its first paragraph has a `Format:` (or the drafts'
/// `Format-Specification:`) field pointing at copyright-format, or at one of the DEP-5 drafts
/// whose `License:` syntax is the same. Licences are the first line of every `License:` field:
/// in the header, in `Files:` paragraphs and in standalone licence paragraphs, split into single
/// names by [`split_license_expression`].
pub fn parse_copyright_licenses(text: &str) -> Option<Vec<String>> {
    let mut licenses: Vec<String> = Vec::new();
    for synopsis in license_synopses(text, false)? {
        for name in split_license_expression(&synopsis) {
            if !licenses.contains(&name) {
                licenses.push(name);
            }
        }
    }
    Some(licenses)
}

/// The licence expressions that apply to a machine-readable copyright file's package (see
/// [`parse_copyright_licenses`]): the first line of the `License:` field of the header and of
/// every `Files:` paragraph, whitespace collapsed, each once, in order of first appearance
/// (a standalone licence paragraph only gives a licence's text, not whether it applies);
/// `None` when the file is not machine-readable.
pub fn copyright_license_synopses(text: &str) -> Option<Vec<String>> {
    license_synopses(text, true)
}

/// The first lines of the `License:` fields of a DEP-5 file: of every paragraph, or with
/// `applying` only of the header and the `Files:` paragraphs.
fn license_synopses(text: &str, applying: bool) -> Option<Vec<String>> {
    let paragraphs = parse_paragraphs(text);
    let header = paragraphs.first()?;
    let is_dep5 = header.iter().any(|(field, value)| {
        let value = value.to_lowercase();
        (field == "format" || field == "format-specification")
            && ["copyright-format", "dep5", "dep-5"]
                .iter()
                .any(|m| value.contains(m))
    });
    if !is_dep5 {
        return None;
    }
    let mut synopses: Vec<String> = Vec::new();
    for (i, paragraph) in paragraphs.iter().enumerate() {
        if applying && i > 0 && !paragraph.iter().any(|(f, _)| f == "files") {
            continue;
        }
        for (field, value) in paragraph {
            if field != "license" {
                continue;
            }
            let line = value.lines().next().unwrap_or_default();
            let synopsis = line.split_whitespace().collect::<Vec<_>>().join(" ");
            if !synopsis.is_empty() && !synopses.contains(&synopsis) {
                synopses.push(synopsis);
            }
        }
    }
    Some(synopses)
}

/// Splits a `License:` synopsis such as `GPL-2+ or Artistic-2.0, and BSD-3-clause` into the
/// single licence names (`GPL-2+`, `Artistic-2.0`, `BSD-3-clause`).
///
/// The separators are the words `or`, `and` and `and/or` (any case) and a trailing comma; a name keeps its
/// inner words (`GPL-2+ with OpenSSL exception`) with whitespace collapsed. Empty names are
/// dropped.
pub fn split_license_expression(synopsis: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut current: Vec<&str> = Vec::new();
    let mut flush = |current: &mut Vec<&str>| {
        if !current.is_empty() {
            names.push(current.join(" "));
            current.clear();
        }
    };
    for word in synopsis.split_whitespace() {
        let bare = word.trim_end_matches(',');
        if ["or", "and", "and/or"]
            .iter()
            .any(|s| bare.eq_ignore_ascii_case(s))
        {
            flush(&mut current);
            continue;
        }
        if !bare.is_empty() {
            current.push(bare);
        }
        if bare.len() != word.len() {
            flush(&mut current);
        }
    }
    flush(&mut current);
    names
}

/// A deb822 field: lowercased name and value, continuation lines joined with `\n` (their
/// leading whitespace and the ` .` blank-line marker kept as is).
type Field = (String, String);

/// The deb822 paragraphs of `text`: separated by blank lines, `#` comment lines skipped, a line
/// starting with a space or tab continuing the previous field. Lines that are neither a field
/// nor a continuation (free text) are ignored.
fn parse_paragraphs(text: &str) -> Vec<Vec<Field>> {
    let mut paragraphs: Vec<Vec<Field>> = Vec::new();
    let mut current: Vec<Field> = Vec::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            if !current.is_empty() {
                paragraphs.push(std::mem::take(&mut current));
            }
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = current.last_mut() {
                value.push('\n');
                value.push_str(line);
            }
            continue;
        }
        if let Some((field, value)) = line.split_once(':') {
            current.push((field.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
    }
    if !current.is_empty() {
        paragraphs.push(current);
    }
    paragraphs
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;
    use std::path::Path;

    /// Shaped like coreutils' copyright: header with a folded Comment, Files paragraphs with
    /// multi-line Files/Copyright, a licence expression, standalone licence paragraphs.
    const COREUTILS: &str = "\
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Comment: This is the Debian GNU/Linux packaged version of the GNU core
 utilities.
Source: ftp://ftp.gnu.org/gnu/coreutils

Files: *
Copyright: (C) 1984-2008 Free Software Foundation, Inc.
License: GPL-3+

Files: lib/fts.c
       lib/fts_.h
Copyright: (C) 2004-2020, 2008 Free Software Foundation, Inc.
           (c) 1989, 1990, 1993, 1994  The Regents of the University of California.
License: GPL-3+ and BSD-4-clause-UC

License: GPL-3+
   This program is free software: you can redistribute it and/or modify
   it under the terms of the GNU General Public License as published by
 .
 On Debian systems, the complete text of the GNU General
 Public License can be found in `/usr/share/common-licenses/GPL-3'.

License: BSD-4-clause-UC
 * Redistribution and use in source and binary forms, with or without
 * modification, are permitted provided that the following conditions
 * are met:
";

    /// Shaped like perl-style dual licensing with a header licence, lowercase field names and a
    /// licence named only in a standalone paragraph.
    const DUAL: &str = "\
format: http://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: Some-Module
license: Artistic or GPL-1+

Files: *
Copyright: 2010, Some Author <author@example.org>
LICENSE: Artistic or GPL-1+

Files: debian/*
Copyright: 2012, Debian Perl Group <pkg-perl-maintainers@lists.alioth.debian.org>
License: GPL-2+ OR Artistic-2.0, AND BSD-3-clause

Files: inc/ppport.h
Copyright: 2004-2013, Marcus Holland-Moritz <mhx-cpan@gmx.net>
License: GPL-2+ with OpenSSL exception

License: Artistic
 This program is free software; you can redistribute it and/or modify
 it under the terms of the Artistic License, which comes with Perl.

License: public-domain
 Some files were placed in the public domain.
";

    /// Shaped like libc6's free-text copyright.
    const LIBC6: &str = "\
This is the Debian prepackaged version of the GNU C Library version 2.23.

It was put together by the GNU Libc Maintainers <debian-glibc@lists.debian.org>
from <https://sourceware.org/git/glibc.git>

* Most of the GNU C library is under the following copyright:

    Copyright (C) 1991-2015 Free Software Foundation, Inc.

    The GNU C Library is free software; you can redistribute it and/or
    modify it under the terms of the GNU Lesser General Public
    License as published by the Free Software Foundation; either
    version 2.1 of the License, or (at your option) any later version.
";

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn installed(names: &[&str]) -> BTreeMap<String, String> {
        names
            .iter()
            .map(|n| (n.to_string(), "1.0-1".to_string()))
            .collect()
    }

    fn write(path: &Path, text: &str) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    #[test]
    fn packages_sorted_name_version() {
        let m = BTreeMap::from([
            ("zlib1g".to_string(), "1:1.2.13.dfsg-1".to_string()),
            ("apt".to_string(), "2.6.1".to_string()),
        ]);
        assert_eq!(packages_record(&m), "apt 2.6.1\nzlib1g 1:1.2.13.dfsg-1\n");
        assert_eq!(packages_record(&BTreeMap::new()), "");
    }

    #[test]
    fn expressions_split() {
        assert_eq!(
            split_license_expression("GPL-2+ or Artistic"),
            strings(&["GPL-2+", "Artistic"])
        );
        assert_eq!(
            split_license_expression("GPL-2+ AND  BSD-3-clause"),
            strings(&["GPL-2+", "BSD-3-clause"])
        );
        assert_eq!(
            split_license_expression("GPL-2+ or Artistic-2.0, and BSD-3-clause"),
            strings(&["GPL-2+", "Artistic-2.0", "BSD-3-clause"])
        );
        assert_eq!(
            split_license_expression("GPL-2+ with  OpenSSL exception"),
            strings(&["GPL-2+ with OpenSSL exception"])
        );
        assert_eq!(
            split_license_expression("GPL-2+, LGPL-2.1+"),
            strings(&["GPL-2+", "LGPL-2.1+"])
        );
        // Words that merely contain "or"/"and" are no separators.
        assert_eq!(
            split_license_expression("Expat-Oracle"),
            strings(&["Expat-Oracle"])
        );
        assert_eq!(
            split_license_expression("BSD-3-clause and/or GPL-3+"),
            strings(&["BSD-3-clause", "GPL-3+"])
        );
        assert!(split_license_expression("  ").is_empty());
        assert!(split_license_expression("or , and").is_empty());
    }

    #[test]
    fn dep5_coreutils() {
        assert_eq!(
            parse_copyright_licenses(COREUTILS),
            Some(strings(&["GPL-3+", "BSD-4-clause-UC"]))
        );
    }

    #[test]
    fn dep5_header_license_case_and_standalone() {
        assert_eq!(
            parse_copyright_licenses(DUAL),
            Some(strings(&[
                "Artistic",
                "GPL-1+",
                "GPL-2+",
                "Artistic-2.0",
                "BSD-3-clause",
                "GPL-2+ with OpenSSL exception",
                "public-domain",
            ]))
        );
    }

    #[test]
    fn dep5_synopses_keep_their_operators() {
        assert_eq!(
            copyright_license_synopses(DUAL),
            Some(strings(&[
                "Artistic or GPL-1+",
                "GPL-2+ OR Artistic-2.0, AND BSD-3-clause",
                "GPL-2+ with OpenSSL exception",
            ]))
        );
        assert_eq!(copyright_license_synopses(LIBC6), None);
    }

    #[test]
    fn dep5_drafts_and_crlf() {
        let draft = "Format-Specification: http://svn.debian.org/wsvn/dep/web/deps/dep5.mdwn?op=file&rev=135\r\n\
                     Name: foo\r\n\r\nFiles: *\r\nCopyright: 2009 Someone\r\nLicense: MIT\r\n";
        assert_eq!(parse_copyright_licenses(draft), Some(strings(&["MIT"])));
        let dep = "Format: http://dep.debian.net/deps/dep5\n\nFiles: *\nLicense: Zlib\n";
        assert_eq!(parse_copyright_licenses(dep), Some(strings(&["Zlib"])));
    }

    #[test]
    fn not_dep5() {
        assert_eq!(parse_copyright_licenses(LIBC6), None);
        assert_eq!(parse_copyright_licenses(""), None);
        // A Format field elsewhere than the header does not count, nor one about something else.
        let late = "Upstream: foo\n\nFormat: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\nLicense: MIT\n";
        assert_eq!(parse_copyright_licenses(late), None);
        assert_eq!(
            parse_copyright_licenses("Format: text\n\nLicense: MIT\n"),
            None
        );
    }

    #[test]
    fn dep5_without_license() {
        let text = "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
                    \nFiles: *\nCopyright: 2020 Someone\nLicense:\n Do what you like.\n";
        assert_eq!(parse_copyright_licenses(text), Some(vec![]));
    }

    #[test]
    fn dep5_comment_lines_inside_a_field() {
        // Shaped like qemu's header: `#` lines inside Files-Excluded neither end the paragraph
        // nor become fields.
        let text = "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
                    Files-Excluded:\n\troms/edk2\n#\troms/u-boot\n#\n\tpc-bios/bios.bin\n\
                    Upstream-Name: qemu\n\nFiles: *\nCopyright: 2003 Fabrice Bellard\n\
                    License: GPL-2\n";
        let paragraphs = parse_paragraphs(text);
        assert_eq!(paragraphs.len(), 2);
        assert_eq!(
            paragraphs[0][1],
            (
                "files-excluded".to_string(),
                "\n\troms/edk2\n\tpc-bios/bios.bin".to_string()
            )
        );
        assert_eq!(paragraphs[0][2].0, "upstream-name");
        assert_eq!(parse_copyright_licenses(text), Some(strings(&["GPL-2"])));
    }

    #[test]
    fn files_per_package_in_dpkg_order() {
        let root = tempfile::tempdir().unwrap();
        let info = root.path().join(DPKG_INFO);
        write(
            &info.join("base-files.list"),
            "/.\n/etc\n/etc/debian_version\n/usr/share/doc/base-files\n",
        );
        write(
            &info.join("libc6:amd64.list"),
            "/.\n/lib/x86_64-linux-gnu/libc.so.6\n/usr/share/doc/libc6\n",
        );
        write(
            &info.join("libc6:i386.list"),
            "/.\n/lib/i386-linux-gnu/libc.so.6\n/usr/share/doc/libc6\n",
        );
        write(&info.join("libc6-dev.list"), "/.\n/usr/include/stdio.h\n");
        write(&info.join("zlib1g:amd64.list"), "/.\n/lib/libz.so.1\n");
        write(&info.join("empty.list"), "");
        write(&info.join("base-files.md5sums"), "not a list\n");

        let text = files_record(
            &Root::open(root.path()).unwrap(),
            &installed(&["libc6", "base-files", "zlib1g:amd64", "empty"]),
        )
        .unwrap();
        assert_eq!(
            text,
            "base-files:\n    /etc\n    /etc/debian_version\n    /usr/share/doc/base-files\n\
             empty:\n\
             libc6:\n    /lib/x86_64-linux-gnu/libc.so.6\n    /usr/share/doc/libc6\n    \
             /lib/i386-linux-gnu/libc.so.6\n\
             zlib1g:amd64:\n    /lib/libz.so.1\n"
        );

        // An arch-qualified name whose package dpkg does not qualify.
        let text = files_record(
            &Root::open(root.path()).unwrap(),
            &installed(&["libc6-dev:amd64"]),
        )
        .unwrap();
        assert_eq!(text, "libc6-dev:amd64:\n    /usr/include/stdio.h\n");
    }

    #[test]
    fn files_missing_list_names_package() {
        let root = tempfile::tempdir().unwrap();
        write(
            &root.path().join(DPKG_INFO).join("bash.list"),
            "/.\n/bin/bash\n",
        );
        // `libc` must not pick up `libc6`'s list, nor `bas` bash's.
        write(
            &root.path().join(DPKG_INFO).join("libc6:amd64.list"),
            "/.\n",
        );
        for name in ["ghost", "libc", "bas"] {
            let err = files_record(
                &Root::open(root.path()).unwrap(),
                &installed(&["bash", name]),
            )
            .unwrap_err();
            assert!(
                format!("{err:#}").contains(&format!("package {name} ")),
                "{err:#}"
            );
        }
        let empty = tempfile::tempdir().unwrap();
        let err =
            files_record(&Root::open(empty.path()).unwrap(), &installed(&["bash"])).unwrap_err();
        assert!(format!("{err:#}").contains("no dpkg database"), "{err:#}");
    }

    #[test]
    fn licenses_from_fake_root() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let doc = root.join(DOC_DIR);
        write(&doc.join("coreutils/copyright"), COREUTILS);
        write(&doc.join("libc6/copyright"), LIBC6);
        write(&doc.join("perl-module/copyright"), DUAL);
        write(
            &doc.join("oddcase/copyright"),
            "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\n\
             Files: *\nLicense: gpl-3+\n",
        );
        // Absolute and relative links to another package's doc dir, both kept inside the root.
        symlink("/usr/share/doc/coreutils", doc.join("abs-link")).unwrap();
        symlink("coreutils", doc.join("rel-link")).unwrap();
        // A link whose `..`s climb past the root stays in it.
        symlink("../../../../../../usr/share/doc/libc6", doc.join("climb")).unwrap();
        // An absolute link to a real directory outside the root must not reach it.
        write(&tmp.path().join("host/copyright"), COREUTILS);
        symlink(tmp.path().join("host"), doc.join("host-link")).unwrap();
        write(
            &doc.join("noname/copyright"),
            "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\n\
             Files: *\nLicense:\n QEMU as a whole is released under the GPL version 2.\n",
        );
        // A doc dir without copyright, and no doc dir at all.
        fs::create_dir_all(doc.join("nocopy")).unwrap();

        let r = Root::open(&root).unwrap();
        let text = licenses_record(
            &r,
            &installed(&[
                "coreutils",
                "libc6:amd64",
                "perl-module",
                "oddcase",
                "abs-link",
                "rel-link",
                "climb",
                "host-link",
                "nocopy",
                "noname",
                "absent",
            ]),
        )
        .unwrap();
        assert_eq!(
            text,
            "# Licences\n\
             GPL-3+: 4\n\
             BSD-4-clause-UC: 3\n\
             unknown (no copyright file): 3\n\
             unknown (not machine-readable): 2\n\
             Artistic: 1\n\
             Artistic-2.0: 1\n\
             BSD-3-clause: 1\n\
             GPL-1+: 1\n\
             GPL-2+: 1\n\
             GPL-2+ with OpenSSL exception: 1\n\
             public-domain: 1\n\
             unknown (no licence named): 1\n\
             \n\
             # Packages\n\
             abs-link: BSD-4-clause-UC, GPL-3+\n\
             absent: unknown (no copyright file)\n\
             climb: unknown (not machine-readable)\n\
             coreutils: BSD-4-clause-UC, GPL-3+\n\
             host-link: unknown (no copyright file)\n\
             libc6:amd64: unknown (not machine-readable)\n\
             nocopy: unknown (no copyright file)\n\
             noname: unknown (no licence named)\n\
             oddcase: GPL-3+\n\
             perl-module: Artistic, Artistic-2.0, BSD-3-clause, GPL-1+, GPL-2+, \
             GPL-2+ with OpenSSL exception, public-domain\n\
             rel-link: BSD-4-clause-UC, GPL-3+\n"
        );
        assert_eq!(
            licenses_record(&r, &BTreeMap::new()).unwrap(),
            "# Licences\n\n# Packages\n"
        );
    }

    #[test]
    fn links_stay_in_root_and_loops_stop() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        write(&root.join("usr/share/doc/a/copyright"), COREUTILS);
        symlink("/usr/share/doc/a", root.join("usr/share/doc/b")).unwrap();
        symlink("../usr/./share", root.join("usr/link")).unwrap();
        symlink("loop2", root.join("usr/share/doc/loop1")).unwrap();
        symlink("/usr/share/doc/loop1", root.join("usr/share/doc/loop2")).unwrap();
        // A copyright file that is a FIFO is not read (a read would block).
        fs::create_dir_all(root.join("usr/share/doc/fifo")).unwrap();
        nix::unistd::mkfifo(
            &root.join("usr/share/doc/fifo/copyright"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        let text = licenses_record(
            &Root::open(root).unwrap(),
            &installed(&["b", "loop1", "fifo"]),
        )
        .unwrap();
        assert!(text.contains("b: BSD-4-clause-UC, GPL-3+\n"), "{text}");
        assert!(
            text.contains("loop1: unknown (no copyright file)\n"),
            "{text}"
        );
        assert!(
            text.contains("fifo: unknown (no copyright file)\n"),
            "{text}"
        );
    }
}
