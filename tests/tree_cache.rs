//! The installed-tree cache with real builds from the host's mirror: a build asking for one
//! package more than a cached tree starts from it and ends with exactly what a cold build
//! installs (the dpkg status byte for byte, and every file of the image but apt's and dpkg's
//! logs and backups); the same request again runs no apt at all; a warm install that does not
//! match starts again from the base; `cache list` shows the trees.

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use common::*;
use debimg::metadata::Metadata;

fn spec(dir: &Path, name: &str, packages: &str) -> std::path::PathBuf {
    let p = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &p,
        format!(
            "version: 1\nname: tc\nsuite: bookworm\nmirror: host\nkind: tarball\n\
             packages: {packages}\nrecords: [packages]\n"
        ),
    )
    .unwrap();
    p
}

/// What the comparison looks at in one tar entry: kind, mode, owner, link target, sha256.
type EntryFacts = (u8, u32, (u64, u64), String, String);

/// A shadow file without each account's day of its last password change: the day the
/// package's postinst made the account, which a tree cached yesterday keeps (a warm build and a
/// cold one on either side of midnight differ in it, and in nothing else of the file).
fn without_change_days(shadow: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(shadow);
    let mut out = String::new();
    for line in text.lines() {
        let mut fields: Vec<&str> = line.split(':').collect();
        if fields.len() > 2 {
            fields[2] = "";
        }
        out.push_str(&fields.join(":"));
        out.push('\n');
    }
    out.into_bytes()
}

/// Every entry of a gzipped tarball by path.
fn entries(tarball: &Path) -> BTreeMap<String, EntryFacts> {
    let file = std::fs::File::open(tarball).unwrap();
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let mut out = BTreeMap::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let path = e.path().unwrap().to_string_lossy().into_owned();
        let h = e.header().clone();
        let link = e
            .link_name()
            .unwrap()
            .map(|l| l.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        if path == "./etc/shadow" || path == "./etc/shadow-" {
            data = without_change_days(&data);
        }
        let sha = debimg::pack::digest::digest_reader(&data[..])
            .unwrap()
            .sha256;
        out.insert(
            path,
            (
                h.entry_type().as_byte(),
                h.mode().unwrap(),
                (h.uid().unwrap(), h.gid().unwrap()),
                link,
                sha,
            ),
        );
    }
    out
}

/// The files in which a warm build may differ from a cold one: apt's and dpkg's logs (two
/// transactions instead of one), dpkg's backup of its previous status, ldconfig's cache of
/// what it scanned.
fn residue(path: &str) -> bool {
    path.starts_with("./var/log/")
        || path == "./var/lib/dpkg/status-old"
        || path == "./var/cache/ldconfig/aux-cache"
}

/// Asserts that the warm image in `warm` equals the cold one in `cold`: installed packages and
/// versions (metadata and records), the dpkg status byte for byte, every other file but
/// [`residue`].
fn assert_same_image(warm: &Path, cold: &Path, what: &str) {
    let (mw, mc) = (
        Metadata::read(&warm.join("tc.yaml")).unwrap(),
        Metadata::read(&cold.join("tc.yaml")).unwrap(),
    );
    assert_eq!(mw.installed, mc.installed, "{what}: installed packages");
    assert!(mw.installed.contains_key("nano") && mw.installed.contains_key("less"));
    assert_eq!(
        std::fs::read_to_string(warm.join("tc.packages")).unwrap(),
        std::fs::read_to_string(cold.join("tc.packages")).unwrap(),
        "{what}: the packages record"
    );
    let (w, c) = (
        entries(&warm.join("tc.tar.gz")),
        entries(&cold.join("tc.tar.gz")),
    );
    assert_eq!(
        w["./var/lib/dpkg/status"], c["./var/lib/dpkg/status"],
        "{what}: dpkg status"
    );
    let differing: Vec<&String> = w
        .keys()
        .chain(c.keys())
        .filter(|p| !residue(p) && w.get(*p) != c.get(*p))
        .collect();
    assert!(differing.is_empty(), "{what}: files differ: {differing:?}");
}

/// The tree a build's log says it stored or started from.
fn tree_named(log: &str) -> Option<std::path::PathBuf> {
    log.lines().find_map(|l| {
        let i = l.find("/trees/tree-")?;
        let start = l[..i].rfind([' ', '('])? + 1;
        let end = i + l[i..].find(".tar")? + 4;
        Some(std::path::PathBuf::from(&l[start..end]))
    })
}

#[test]
fn a_warm_build_from_a_cached_subset_equals_a_cold_build() {
    if !can_build() {
        return;
    }
    let work = scratch("tree-cache");
    let bdir = work.path().join("build");
    std::fs::create_dir_all(&bdir).unwrap();
    let small = spec(work.path(), "small", "[less]");
    let big = spec(work.path(), "big", "[less, nano]");
    let out = |n: &str| work.path().join(n);

    // The tree of [less] is in the cache (stored now, or by an earlier run).
    let r = build(&small, &out("small"), &bdir, &["--force"]);
    r.assert_ok("the small build");
    let small_tree = tree_named(&r.stderr()).expect("the small build names its tree");
    // Its record says the base was current (the dist-upgrade changed nothing): builds from it
    // simulate no dist-upgrade.
    let mut info = small_tree.into_os_string();
    info.push(".info");
    let info: serde_json::Value = serde_json::from_slice(&std::fs::read(&info).unwrap()).unwrap();
    assert_eq!(
        info["base_current"],
        serde_json::Value::Bool(true),
        "{info}"
    );

    // The cold reference: no cache at all (no installed tree used or stored, mmdebstrap runs).
    // Its apt lists are those mmdebstrap fetched for the same repository, with no second
    // update; the warm build's come from an update: the file-by-file comparison below holds
    // the lists too.
    let cold = build(&big, &out("cold"), &bdir, &["--force", "--no-cache"]);
    cold.assert_ok("the cold build");
    let log = cold.stderr();
    assert!(!log.contains("installed tree"), "{log}");
    assert!(log.contains("apt lists: the bootstrap's"), "{log}");
    assert!(!log.contains("InRelease"), "{log}");

    // The warm build: from [less]'s tree, apt installs nano. An earlier run may have left
    // [less, nano]'s own tree: it goes first.
    let mut warm = build(&big, &out("warm"), &bdir, &["--force"]);
    if warm.stderr().contains("the same packages") {
        std::fs::remove_file(tree_named(&warm.stderr()).unwrap()).unwrap();
        warm = build(&big, &out("warm"), &bdir, &["--force"]);
    }
    warm.assert_ok("the warm build");
    assert!(
        warm.stderr().contains("apt installs the rest"),
        "{}",
        warm.stderr()
    );
    assert_same_image(&out("warm"), &out("cold"), "from a subset");
    let own = tree_named(
        warm.stderr()
            .lines()
            .find(|l| l.contains("installed tree cached as"))
            .expect("the warm build stores its tree"),
    )
    .unwrap();

    // The same request again: its own tree, no apt.
    let exact = build(&big, &out("exact"), &bdir, &["--force"]);
    exact.assert_ok("the exact build");
    assert!(
        exact
            .stderr()
            .contains("the same packages, apt has nothing to do"),
        "{}",
        exact.stderr()
    );
    // No apt run: no lists fetched, and apt's history is the stored tree's, as the warm build
    // left it.
    assert!(!exact.stderr().contains("apt lists:"), "{}", exact.stderr());
    let history = "./var/log/apt/history.log";
    assert_eq!(
        entries(&out("exact").join("tc.tar.gz"))[history],
        entries(&out("warm").join("tc.tar.gz"))[history]
    );
    assert_same_image(&out("exact"), &out("cold"), "from its own tree");

    // A warm install that does not match a cold one (injected) starts again from the base and
    // still ends with the cold build's image.
    std::fs::remove_file(&own).unwrap();
    let mut cmd = build_command(&big, &out("fallback"), &bdir, &["--force"]);
    cmd.env("DEBIMG_TEST_FAULT", "install:tree-mismatch");
    let o = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("starting again from the base tree"), "{err}");
    assert!(err.contains("base tree from the cache"), "{err}");
    assert_same_image(&out("fallback"), &out("cold"), "after starting again");
    assert_no_leftovers(&bdir, &out("fallback"));

    // Added packages that create a system user (uuid-runtime: uuidd) get ids in the order of a
    // whole install, which a warm one does not reproduce: back to the base, never from [less].
    // Here in filesystem images (`/` and `/var` mounted in the tree, as a disk's partitions
    // are; their layout is part of the key, so [less] is built in it first): the tree is
    // emptied across them, and they stay mounted.
    let images = |name: &str, packages: &str| {
        let p = work.path().join(format!("{name}.yaml"));
        std::fs::write(
            &p,
            format!(
                "version: 1\nname: tc\nsuite: bookworm\nmirror: host\npackages: {packages}\n\
                 images:\n\
                 \x20 - {{mount: /, fs: ext4, size: 1GiB, container: raw}}\n\
                 \x20 - {{mount: /var, fs: ext4, size: 512MiB, container: raw}}\n"
            ),
        )
        .unwrap();
        p
    };
    build(&images("less-fs", "[less]"), &out("less-fs"), &bdir, &[])
        .assert_ok("[less] in filesystem images");
    let users = images("users", "[less, uuid-runtime]");
    let mut u = build(&users, &out("users"), &bdir, &["--force"]);
    if u.stderr().contains("the same packages") {
        std::fs::remove_file(tree_named(&u.stderr()).unwrap()).unwrap();
        u = build(&users, &out("users"), &bdir, &["--force"]);
    }
    u.assert_ok("the build adding a user");
    let err = u.stderr();
    assert!(err.contains("apt installs the rest"), "{err}");
    assert!(err.contains("created users, groups or shells"), "{err}");
    assert!(err.contains("starting again from the base tree"), "{err}");
    assert!(
        Metadata::read(&out("users").join("tc.yaml"))
            .unwrap()
            .installed
            .contains_key("uuid-runtime")
    );

    // `cache list` shows the installed trees.
    let list = debimg(&["cache", "list", "--cache-dir", TEST_CACHE]);
    list.assert_ok("cache list");
    assert!(list.stdout().contains("trees/tree-"), "{}", list.stdout());
}
