//! A third-party repository pinned above 1000 that holds an older version of a package the
//! bootstrap installed (fuel-agent pinned its own repositories at 1050 and 1100): the build
//! installs the older version, as the pin says. The mirror's URL carries credentials, which no
//! log, error, metadata or release file may show.

mod common;

use common::*;
use debimg::metadata::Metadata;

/// The pinned repository's version of `hostname`: older than any Debian has (3.23 in
/// bookworm), and Essential as the real one is.
const OLD: &str = "0.1~debimgtest";
const PASSWORD: &str = "s3cret-debimg-test";

#[test]
fn a_pin_above_1000_downgrades_what_the_bootstrap_installed() {
    if !can_build() {
        return;
    }
    let work = scratch("pinned-repo");
    let deb = build_deb(
        work.path(),
        "hostname",
        OLD,
        "Essential: yes\nPriority: required\n",
        &[DebEntry::File(
            "/usr/share/debimg-test/downgraded-hostname",
            b"from the pinned repository\n",
            0o644,
        )],
    );
    let repo_dir = work.path().join("repo");
    make_repo(&repo_dir, "debimg-test", "main", &[deb]);
    let server = StaticServer::start(&repo_dir);
    let mirror = host_mirror().replacen("://", &format!("://debimg:{PASSWORD}@"), 1);
    let spec = work.path().join("pinned-down.yaml");
    std::fs::write(
        &spec,
        format!(
            "version: 1\nname: pinned-down\nsuite: bookworm\nmirror: {mirror}\nkind: tarball\n\
             packages: [less]\nrepos:\n  - {{name: debian, suite: bookworm}}\n  - {{name: local, uri: \"{}\", suite: debimg-test, section: main, priority: 1001, trusted: true}}\n",
            server.url()
        ),
    )
    .unwrap();
    let base = work.path().join("out");
    let bdir = work.path().join("build");
    std::fs::create_dir_all(&bdir).unwrap();
    // -v: every command line is logged, the mirror's URL among them.
    let run = build(&spec, &base, &bdir, &["--release", "1", "-v"]);
    run.assert_ok("the pinned build");
    let out = base.join("1");
    assert_no_leftovers(&bdir, &out);

    let meta = Metadata::read(&out.join("pinned-down.yaml")).unwrap();
    assert_eq!(
        meta.installed.get("hostname").map(String::as_str),
        Some(OLD)
    );
    assert!(meta.installed.contains_key("less"));
    let local = meta.repos.iter().find(|r| r.name == "local").unwrap();
    assert!(
        local.trusted,
        "the unsigned repository is marked in the metadata"
    );
    let debian = meta.repos.iter().find(|r| r.name == "debian").unwrap();
    assert!(debian.uri.contains("://debimg:***@"), "{}", debian.uri);
    assert_eq!(local.priority, Some(1001));
    let listing = tool(
        "tar",
        &["-tzf", out.join("pinned-down.tar.gz").to_str().unwrap()],
    );
    assert!(
        listing.contains("./usr/share/debimg-test/downgraded-hostname"),
        "the pinned version's file is missing"
    );
    let err = run.stderr();
    assert!(err.contains("pinned at 1001"), "{err}");
    assert!(
        err.contains("repo `local`") && err.contains("without a signature check"),
        "{err}"
    );

    // The password is nowhere: not on stderr, not in the build log, the metadata or any file
    // of the release.
    assert!(!err.contains(PASSWORD), "stderr shows the password");
    assert!(err.contains("debimg:***@"), "{err}");
    for e in std::fs::read_dir(&out).unwrap().flatten() {
        let bytes = std::fs::read(e.path()).unwrap();
        assert!(
            !contains_bytes(&bytes, PASSWORD.as_bytes()),
            "{} holds the password",
            e.path().display()
        );
    }
    let log = std::fs::read_to_string(out.join("build.log")).unwrap();
    assert!(log.contains("stage publish: done"), "{log}");
}
