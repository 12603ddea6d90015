//! What a repository's signed index says each package file must be: apt's `Packages` files
//! parsed into the name apt gives a downloaded `.deb` in its archives directory, with the size
//! and SHA-256 the repository published for it.
//!
//! apt accepts a file already present in its archives directory when only its size matches, so
//! anything debimg puts there (the shared package pool) must first be checked against this index;
//! and only files that match it may go back into the pool. The index is only as good as the
//! `Packages` files fed to it: feed every one apt uses in the build (apt checked them against the
//! signed Release file), read before anything from the packages themselves has run.

use std::collections::HashMap;

/// Size and SHA-256 (lowercase hex) a repository index gives a package file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    pub size: u64,
    pub sha256: String,
}

/// One archive name: what it must be, or that two indexes disagree about it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Slot {
    One(Expected),
    Ambiguous,
}

/// Package files by the name apt stores them under in `/var/cache/apt/archives`.
#[derive(Debug, Clone, Default)]
pub struct PackageIndex {
    by_name: HashMap<String, Slot>,
}

impl PackageIndex {
    /// Adds the stanzas of one `Packages` file; returns how many gave a usable entry (a stanza
    /// without Package, Version, Architecture, Filename, Size or SHA256 is skipped).
    pub fn add_packages(&mut self, data: &[u8]) -> usize {
        let mut n = 0;
        for stanza in stanzas(data) {
            if let Some((name, expected)) = entry(&stanza) {
                self.insert(name, expected);
                n += 1;
            }
        }
        n
    }

    /// [`PackageIndex::add_packages`] for text already read as UTF-8.
    pub fn add_packages_text(&mut self, text: &str) -> usize {
        self.add_packages(text.as_bytes())
    }

    /// What the file apt names `archive_name` must be; `None` when no index lists it, or when
    /// two indexes list it with different contents (apt could take either: trust neither).
    pub fn expected(&self, archive_name: &str) -> Option<&Expected> {
        match self.by_name.get(archive_name) {
            Some(Slot::One(e)) => Some(e),
            _ => None,
        }
    }

    /// How many archive names are known (ambiguous ones included).
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Whether no `Packages` stanza has been added.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// How many names two indexes disagree about.
    pub fn ambiguous(&self) -> usize {
        self.by_name
            .values()
            .filter(|s| matches!(s, Slot::Ambiguous))
            .count()
    }

    fn insert(&mut self, name: String, expected: Expected) {
        use std::collections::hash_map::Entry;
        match self.by_name.entry(name) {
            Entry::Vacant(v) => {
                v.insert(Slot::One(expected));
            }
            // The same file in two repositories (a mirror and its copy) is not a conflict.
            Entry::Occupied(mut o) => {
                if *o.get() != Slot::One(expected) {
                    o.insert(Slot::Ambiguous);
                }
            }
        }
    }
}

/// The name apt gives the file of a package version in its archives directory
/// (apt-pkg/acquire-item.cc, `pkgAcqArchive`): `name_version_arch.ext`, each part quoted by
/// `QuoteString`, the name lowercased as apt's list parser does, and the extension taken from
/// the repository's `Filename` as `flExtension` does.
pub fn archive_name(package: &[u8], version: &[u8], arch: &[u8], filename: &[u8]) -> String {
    let package = package.to_ascii_lowercase();
    let ext = match filename.iter().rposition(|&b| b == b'.') {
        Some(i) => &filename[i + 1..],
        None => filename,
    };
    let mut s = quote(&package, b"_:");
    s.push('_');
    s.push_str(&quote(version, b"_:"));
    s.push('_');
    s.push_str(&quote(arch, b"_:."));
    s.push('.');
    s.push_str(&String::from_utf8_lossy(ext));
    s
}

/// apt's `QuoteString`: the `bad` bytes, `%`, and anything not printable ASCII become `%xx`
/// (lowercase hex).
fn quote(s: &[u8], bad: &[u8]) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s {
        if bad.contains(&b) || b == b'%' || b <= 0x20 || b >= 0x7f {
            out.push_str(&format!("%{b:02x}"));
        } else {
            out.push(b as char);
        }
    }
    out
}

/// The single-line fields of each stanza as (name, value). Continuation lines (multi-line
/// fields such as Description) belong to their field and are not needed here.
pub(crate) fn stanzas(data: &[u8]) -> impl Iterator<Item = Vec<(&[u8], &[u8])>> {
    let mut lines = data.split(|&b| b == b'\n').peekable();
    std::iter::from_fn(move || {
        let mut fields = Vec::new();
        // Skip the blank lines between stanzas.
        while lines.next_if(|l| l.trim_ascii().is_empty()).is_some() {}
        lines.peek()?;
        while let Some(line) = lines.next_if(|l| !l.trim_ascii().is_empty()) {
            if line.starts_with(b" ") || line.starts_with(b"\t") || line.starts_with(b"#") {
                continue;
            }
            if let Some(colon) = line.iter().position(|&b| b == b':') {
                fields.push((line[..colon].trim_ascii(), line[colon + 1..].trim_ascii()));
            }
        }
        Some(fields)
    })
}

/// The archive name and expectation of one stanza, if it has all it takes. Field names match
/// whatever their case, as in apt.
fn entry(fields: &[(&[u8], &[u8])]) -> Option<(String, Expected)> {
    let get = |name: &str| {
        fields
            .iter()
            .find(|(n, v)| n.eq_ignore_ascii_case(name.as_bytes()) && !v.is_empty())
            .map(|(_, v)| *v)
    };
    let size = std::str::from_utf8(get("size")?).ok()?.parse().ok()?;
    let sha256 = std::str::from_utf8(get("sha256")?).ok()?;
    if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let name = archive_name(
        get("package")?,
        get("version")?,
        get("architecture")?,
        get("filename")?,
    );
    // A Filename without a dot in its last part gives apt a "extension" with a slash in it:
    // never a file in the archives directory.
    if name.contains('/') {
        return None;
    }
    Some((
        name,
        Expected {
            size,
            sha256: sha256.to_ascii_lowercase(),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stanzas copied from Debian 12's bookworm main and bookworm-security Packages files: an
    /// epoch (passwd), an `Architecture: all` package, multi-line fields (Tag), and the same
    /// name in two indexes with one content (tzdata below is listed twice identically).
    const BOOKWORM_MAIN: &str = "\
Package: adduser
Version: 3.134
Installed-Size: 686
Maintainer: Debian Adduser Developers <adduser@packages.debian.org>
Architecture: all
Depends: passwd
Suggests: liblocale-gettext-perl, perl, cron, quota
Description: add and remove users and groups
Multi-Arch: foreign
Description-md5: a5681e7bad8d90695043c6eab9784701
Tag: admin::user-management, implemented-in::perl, interface::commandline,
 role::program, scope::utility, suite::debian
Section: admin
Priority: important
Filename: pool/main/a/adduser/adduser_3.134_all.deb
Size: 183272
MD5sum: 3f5b94b9878c6df571f9aa5f86dab452
SHA256: c24fe4eb8e60d8632d72ed104cce7c92cff200847c897dc8ba764b6c47b519e0

Package: passwd
Source: shadow
Version: 1:4.13+dfsg1-1+deb12u2
Installed-Size: 2827
Maintainer: Shadow package maintainers <pkg-shadow-devel@lists.alioth.debian.org>
Architecture: amd64
Depends: libaudit1 (>= 1:2.2.1), libc6 (>= 2.36), libcrypt1 (>= 1:4.1.0), libpam0g (>= 0.99.7.1), libselinux1 (>= 3.1~), libsemanage2 (>= 2.0.32), libpam-modules
Recommends: sensible-utils
Description: change and administer password and group data
Multi-Arch: foreign
Homepage: https://github.com/shadow-maint/shadow
Description-md5: 5bbd70e421ed3367a8299e53bd7afed4
Tag: admin::user-management, implemented-in::c, interface::commandline,
 role::program, security::authentication
Section: admin
Priority: required
Filename: pool/main/s/shadow/passwd_4.13+dfsg1-1+deb12u2_amd64.deb
Size: 972180
MD5sum: ddd08100789cbd8f7d22ef04335f1bc0
SHA256: fb787363372903e03627e53fd483e51dfb6861047a1e02c7d5a5f27d66546d08

Package: tzdata
Version: 2026b-0+deb12u1
Installed-Size: 2573
Maintainer: GNU Libc Maintainers <debian-glibc@lists.debian.org>
Architecture: all
Provides: tzdata-bookworm
Depends: debconf (>= 0.5) | debconf-2.0
Description: time zone and daylight-saving time data
Multi-Arch: foreign
Homepage: https://www.iana.org/time-zones
Description-md5: a77a3cc9a67658dd7cfdc6547391b8f8
Tag: role::app-data, use::timekeeping
Section: localization
Priority: required
Filename: pool/main/t/tzdata/tzdata_2026b-0+deb12u1_all.deb
Size: 304148
MD5sum: 92902e55935bd95b6176c6e5029a461a
SHA256: 0edb49f4dffe0d5608069f7e4ba4d69544d3b9e86fc314dd8b75e9958d8e5e98
";

    const BOOKWORM_SECURITY: &str = "\
Package: libc6
Source: glibc
Version: 2.36-9+deb12u7
Installed-Size: 12986
Maintainer: GNU Libc Maintainers <debian-glibc@lists.debian.org>
Architecture: amd64
Replaces: libc6-amd64
Depends: libgcc-s1
Description: GNU C Library: Shared libraries
Homepage: https://www.gnu.org/software/libc/libc.html
Description-md5: fc3001b0b90a1c8e6690b283a619d57f
Multi-Arch: same
Recommends: libidn2-0 (>= 2.0.5~)
Section: libs
Priority: optional
Filename: pool/updates/main/g/glibc/libc6_2.36-9+deb12u7_amd64.deb
Size: 2757936
SHA256: eba944bd99c2f5142baf573e6294a70f00758083bc3c2dca4c9e445943a3f8e6
";

    #[test]
    fn names_are_the_ones_apt_writes() {
        let mut idx = PackageIndex::default();
        assert_eq!(idx.add_packages_text(BOOKWORM_MAIN), 3);
        assert_eq!(idx.add_packages_text(BOOKWORM_SECURITY), 1);
        assert_eq!(idx.len(), 4);
        // `apt-get download passwd` on Debian 12 writes exactly this name, and this file.
        let passwd = idx
            .expected("passwd_1%3a4.13+dfsg1-1+deb12u2_amd64.deb")
            .expect("the epoch is quoted");
        assert_eq!(passwd.size, 972180);
        assert_eq!(
            passwd.sha256,
            "fb787363372903e03627e53fd483e51dfb6861047a1e02c7d5a5f27d66546d08"
        );
        // Not the basename of Filename, which has no epoch.
        assert!(
            idx.expected("passwd_4.13+dfsg1-1+deb12u2_amd64.deb")
                .is_none()
        );
        assert!(
            idx.expected("passwd_1:4.13+dfsg1-1+deb12u2_amd64.deb")
                .is_none()
        );
        assert_eq!(
            idx.expected("adduser_3.134_all.deb").map(|e| e.size),
            Some(183272)
        );
        assert_eq!(
            idx.expected("libc6_2.36-9+deb12u7_amd64.deb")
                .map(|e| e.sha256.as_str()),
            Some("eba944bd99c2f5142baf573e6294a70f00758083bc3c2dca4c9e445943a3f8e6")
        );
        // The continuation line of Tag is not a field of its own.
        assert!(idx.expected("role::program").is_none());
    }

    #[test]
    fn quoting_follows_apts_quote_string() {
        assert_eq!(
            archive_name(b"Foo", b"2:1.0_x%y z", b"am.d", b"pool/f/foo.udeb"),
            "foo_2%3a1.0%5fx%25y%20z_am%2ed.udeb"
        );
        assert_eq!(
            archive_name(b"n", b"1\xc3\xa9", b"all", b"p/n.deb"),
            "n_1%c3%a9_all.deb"
        );
    }

    #[test]
    fn a_name_with_two_contents_is_trusted_nowhere() {
        let mut idx = PackageIndex::default();
        idx.add_packages_text(BOOKWORM_MAIN);
        // The same stanza again (a second mirror of the same archive) is no conflict.
        idx.add_packages_text(BOOKWORM_MAIN);
        assert!(idx.expected("adduser_3.134_all.deb").is_some());
        assert_eq!(idx.ambiguous(), 0);
        // Another repository with the same name, version and size but other bytes.
        let other = BOOKWORM_MAIN.replace(
            "c24fe4eb8e60d8632d72ed104cce7c92cff200847c897dc8ba764b6c47b519e0",
            "0000000000000000000000000000000000000000000000000000000000000000",
        );
        idx.add_packages_text(&other);
        assert!(idx.expected("adduser_3.134_all.deb").is_none());
        assert_eq!(idx.ambiguous(), 1);
        assert!(
            idx.expected("passwd_1%3a4.13+dfsg1-1+deb12u2_amd64.deb")
                .is_some()
        );
    }

    #[test]
    fn incomplete_or_odd_stanzas_are_skipped() {
        let text = "\
Package: nosha
Version: 1
Architecture: all
Filename: pool/n/nosha_1_all.deb
Size: 10
MD5sum: 3f5b94b9878c6df571f9aa5f86dab452

Package: badsize
Version: 1
Architecture: all
Filename: pool/b/badsize_1_all.deb
Size: ten
SHA256: c24fe4eb8e60d8632d72ed104cce7c92cff200847c897dc8ba764b6c47b519e0


package: MixedCase
version: 1
architecture: all
filename: pool/m/mixedcase_1_all.deb
size: 7
sha256: C24FE4EB8E60D8632D72ED104CCE7C92CFF200847C897DC8BA764B6C47B519E0\r
";
        let mut idx = PackageIndex::default();
        assert_eq!(idx.add_packages_text(text), 1);
        let e = idx.expected("mixedcase_1_all.deb").unwrap();
        assert_eq!(e.size, 7);
        assert_eq!(
            e.sha256,
            "c24fe4eb8e60d8632d72ed104cce7c92cff200847c897dc8ba764b6c47b519e0"
        );
        assert!(PackageIndex::default().is_empty());
        assert_eq!(idx.add_packages(b""), 0);
        assert_eq!(idx.add_packages(b"\n\n \n"), 0);
    }
}
