//! Third-party repositories with their own signing keys, made in the test as a vendor or a team
//! makes them: packages built with dpkg-deb, indexed with apt-ftparchive, signed (InRelease)
//! with a throwaway key gpg makes here. One is a `dists/` repository served over HTTP on
//! loopback, one a flat repository (`suite: ./`) read over `file://`; both pinned. The build
//! installs from both with their keys (the bootstrap repository checked against a key file too);
//! without a key, or with the wrong one, it fails naming each repo and the key that signed it.
//! (`trusted: true` over HTTP, with its warning: tests/pinned_repo.rs.)

mod common;

use std::path::{Path, PathBuf};

use common::*;
use debimg::metadata::Metadata;

/// The team repository's `hostname`: older than any Debian has, installed by its pin at 1001.
const OLD: &str = "0.1~debimgteam";
const DEBIAN_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// A throwaway signing key in a gpg home of its own.
struct Key {
    home: PathBuf,
    fingerprint: String,
    armored: String,
}

impl Key {
    fn new(dir: &Path, name: &str) -> Key {
        let home = dir.join(format!("gnupg-{name}"));
        std::fs::create_dir_all(&home).unwrap();
        std::fs::set_permissions(&home, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .unwrap();
        let h = home.to_str().unwrap();
        tool(
            "gpg",
            &[
                "--batch",
                "--homedir",
                h,
                "--passphrase",
                "",
                "--quick-gen-key",
                &format!("debimg {name} <{name}@debimg.invalid>"),
                "ed25519",
                "sign",
                "never",
            ],
        );
        let colons = tool("gpg", &["--homedir", h, "--with-colons", "--list-keys"]);
        let fingerprint = primary_fingerprints(&colons).remove(0);
        let armored = tool("gpg", &["--homedir", h, "--armor", "--export"]);
        Key {
            home,
            fingerprint,
            armored,
        }
    }

    /// Clear-signs `Release` in `dir` into `InRelease`.
    fn sign(&self, dir: &Path) {
        tool(
            "gpg",
            &[
                "--batch",
                "--homedir",
                self.home.to_str().unwrap(),
                "--pinentry-mode",
                "loopback",
                "--passphrase",
                "",
                "--clearsign",
                "-o",
                dir.join("InRelease").to_str().unwrap(),
                dir.join("Release").to_str().unwrap(),
            ],
        );
    }

    /// The last 16 hex digits, as apt names a key.
    fn id(&self) -> &str {
        &self.fingerprint[24..]
    }
}

impl Drop for Key {
    fn drop(&mut self) {
        // gpg started an agent for this home: it goes with the key.
        let _ = std::process::Command::new("gpgconf")
            .args(["--homedir", self.home.to_str().unwrap(), "--kill", "all"])
            .status();
    }
}

/// The fingerprints of the primary keys in `gpg --with-colons` output.
fn primary_fingerprints(colons: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut want = false;
    for l in colons.lines() {
        if l.starts_with("pub:") {
            want = true;
        } else if want && l.starts_with("fpr:") {
            out.push(l.split(':').nth(9).unwrap().to_string());
            want = false;
        }
    }
    out
}

/// Runs apt-ftparchive in `dir` and returns its output.
fn ftparchive(dir: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new("apt-ftparchive")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("apt-ftparchive (apt-utils) is installed by scripts/setup-host --tests");
    assert!(
        out.status.success(),
        "apt-ftparchive {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn release_opts(origin: &str, suite: Option<&str>) -> Vec<String> {
    let mut o = vec![
        format!("-oAPT::FTPArchive::Release::Origin={origin}"),
        format!("-oAPT::FTPArchive::Release::Label={origin}"),
        "-oAPT::FTPArchive::Release::Architectures=amd64 all".to_string(),
    ];
    if let Some(s) = suite {
        o.push(format!("-oAPT::FTPArchive::Release::Suite={s}"));
        o.push(format!("-oAPT::FTPArchive::Release::Codename={s}"));
        o.push("-oAPT::FTPArchive::Release::Components=main".to_string());
    }
    o
}

/// The vendor's repository: `dists/debimg-vendor/main`, with `debimg-vendor` 1.0.
fn vendor_repo(work: &Path, key: &Key) -> PathBuf {
    let deb = build_deb(
        work,
        "debimg-vendor",
        "1.0",
        "",
        &[DebEntry::File(
            "/usr/share/debimg-vendor/hello",
            b"from the vendor\n",
            0o644,
        )],
    );
    let dir = work.join("vendor");
    let pool = dir.join("pool/main");
    std::fs::create_dir_all(&pool).unwrap();
    std::fs::copy(&deb, pool.join(deb.file_name().unwrap())).unwrap();
    let dist = dir.join("dists/debimg-vendor");
    let bin = dist.join("main/binary-all");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::write(
        bin.join("Packages"),
        ftparchive(&dir, &["packages", "pool"]),
    )
    .unwrap();
    let opts = release_opts("debimg-vendor", Some("debimg-vendor"));
    let mut args: Vec<&str> = opts.iter().map(String::as_str).collect();
    args.extend(["release", "dists/debimg-vendor"]);
    std::fs::write(dist.join("Release"), ftparchive(&dir, &args)).unwrap();
    key.sign(&dist);
    dir
}

/// The team's flat repository (`Packages` and `Release` beside the debs), with an old
/// `hostname`.
fn team_repo(work: &Path, key: &Key) -> PathBuf {
    let deb = build_deb(
        work,
        "hostname",
        OLD,
        "Essential: yes\nPriority: required\n",
        &[DebEntry::File(
            "/usr/share/debimg-team/hostname",
            b"from the team's flat repository\n",
            0o644,
        )],
    );
    let dir = work.join("team");
    // A second flat repository in its directory `stable/` (`suite: ./stable/`), made first.
    let stable_deb = build_deb(work, "debimg-stable", "1.0", "", &[]);
    let stable = dir.join("stable");
    std::fs::create_dir_all(&stable).unwrap();
    std::fs::copy(&stable_deb, stable.join(stable_deb.file_name().unwrap())).unwrap();
    flat_index(&stable, "debimg-team-stable", key);
    std::fs::copy(&deb, dir.join(deb.file_name().unwrap())).unwrap();
    flat_index(&dir, "debimg-team", key);
    dir
}

/// `Packages`, `Release` (with `origin` as its Origin and Label) and a signed `InRelease` in
/// the flat repository `dir`.
fn flat_index(dir: &Path, origin: &str, key: &Key) {
    std::fs::write(dir.join("Packages"), ftparchive(dir, &["packages", "."])).unwrap();
    let opts = release_opts(origin, None);
    let mut args: Vec<&str> = opts.iter().map(String::as_str).collect();
    args.extend(["release", "."]);
    let release = ftparchive(dir, &args);
    std::fs::write(dir.join("Release"), release).unwrap();
    key.sign(dir);
}

/// A YAML block scalar of `text`, indented for a repo entry's field.
fn block(text: &str) -> String {
    let mut s = String::from("|\n");
    for l in text.lines() {
        s.push_str("      ");
        s.push_str(l);
        s.push('\n');
    }
    s
}

#[test]
fn repos_with_their_own_keys_install_pinned() {
    if !can_build() {
        return;
    }
    let work = scratch("third-party");
    let (vendor_key, team_key) = (
        Key::new(work.path(), "vendor"),
        Key::new(work.path(), "team"),
    );
    let vendor = vendor_repo(work.path(), &vendor_key);
    let team = team_repo(work.path(), &team_key);
    let server = StaticServer::start(&vendor);
    // The vendor's key as a file next to the spec (armored); the team's inline; the bootstrap
    // repository's as Debian's own keyring file (binary, several keys).
    std::fs::write(work.path().join("vendor.asc"), &vendor_key.armored).unwrap();
    std::fs::write(work.path().join("team.asc"), &team_key.armored).unwrap();
    let spec = work.path().join("third-party.yaml");
    std::fs::write(
        &spec,
        format!(
            "version: 1\nname: third-party\nsuite: bookworm\nmirror: {}\nkind: tarball\n\
             packages: [debimg-vendor, debimg-stable]\nrepos:\n  - {{name: debian, suite: bookworm, key: {DEBIAN_KEYRING}}}\n\
             \x20 - {{name: vendor, uri: \"{}\", suite: debimg-vendor, priority: 990, key: vendor.asc}}\n\
             \x20 - {{name: team-stable, uri: \"file://{team}\", suite: ./stable/, priority: 100, key: team.asc}}\n\
             \x20 - name: team\n    uri: \"file://{team}\"\n    suite: ./\n    priority: 1001\n    key: {}",
            host_mirror(),
            server.url(),
            block(&team_key.armored),
            team = team.display(),
        ),
    )
    .unwrap();
    let out = work.path().join("out");
    let bdir = work.path().join("build");
    std::fs::create_dir_all(&bdir).unwrap();
    let run = build(&spec, &out, &bdir, &[]);
    run.assert_ok("the build with keyed repos");
    assert_no_leftovers(&bdir, &out);
    let err = run.stderr();
    assert!(!err.contains("without a signature check"), "{err}");

    let meta = Metadata::read(&out.join("third-party.yaml")).unwrap();
    assert_eq!(
        meta.installed.get("debimg-vendor").map(String::as_str),
        Some("1.0")
    );
    assert_eq!(
        meta.installed.get("hostname").map(String::as_str),
        Some(OLD),
        "the flat repository's pin at 1001 did not win"
    );
    let fprs = |name: &str| {
        meta.repos
            .iter()
            .find(|r| r.name == name)
            .unwrap()
            .key_fingerprints
            .clone()
    };
    assert_eq!(
        fprs("vendor"),
        std::slice::from_ref(&vendor_key.fingerprint)
    );
    assert_eq!(fprs("team"), std::slice::from_ref(&team_key.fingerprint));
    let debian = primary_fingerprints(&tool(
        "gpg",
        &["--with-colons", "--show-keys", DEBIAN_KEYRING],
    ));
    assert!(debian.len() > 1);
    assert_eq!(fprs("debian"), debian);
    // The flat repository in a directory of another: its own Release, found where apt put it.
    assert!(meta.installed.contains_key("debimg-stable"));
    let stable = meta.repos.iter().find(|r| r.name == "team-stable").unwrap();
    assert_eq!(stable.meta.origin.as_deref(), Some("debimg-team-stable"));

    // The image keeps the sources with their keyrings (keep_apt_sources), and nothing of the
    // bind mount that showed the flat repository to apt.
    let tarball = out.join("third-party.tar.gz");
    let listing = tool("tar", &["-tzf", tarball.to_str().unwrap()]);
    assert!(listing.contains("./usr/share/debimg-vendor/hello"));
    assert!(listing.contains("./usr/share/debimg-team/hostname"));
    let team_in_image = format!(".{}", team.display());
    let parent_in_image = format!(".{}/", work.path().display());
    assert!(
        !listing
            .lines()
            .any(|l| l.starts_with(&parent_in_image) || l == team_in_image),
        "the flat repository's mount point is left in the image"
    );
    let etc = work.path().join("etc-out");
    std::fs::create_dir_all(&etc).unwrap();
    tool(
        "tar",
        &[
            "-xzf",
            tarball.to_str().unwrap(),
            "-C",
            etc.to_str().unwrap(),
            "./etc/apt",
        ],
    );
    let sources = std::fs::read_to_string(etc.join("etc/apt/sources.list")).unwrap();
    assert!(
        sources.contains(&format!(
            "deb [signed-by=/etc/apt/keyrings/debimg-vendor.gpg] {} debimg-vendor main\n",
            server.url()
        )),
        "{sources}"
    );
    assert!(
        sources.contains(&format!(
            "deb [signed-by=/etc/apt/keyrings/debimg-team.gpg] file://{} ./\n",
            team.display()
        )),
        "{sources}"
    );
    for (name, fpr) in [
        ("vendor", &vendor_key.fingerprint),
        ("team", &team_key.fingerprint),
    ] {
        let ring = etc.join(format!("etc/apt/keyrings/debimg-{name}.gpg"));
        let shown = tool(
            "gpg",
            &["--with-colons", "--show-keys", ring.to_str().unwrap()],
        );
        assert_eq!(
            primary_fingerprints(&shown),
            std::slice::from_ref(fpr),
            "{name}"
        );
    }
    let pin = std::fs::read_to_string(etc.join("etc/apt/preferences.d/debimg-team.pref")).unwrap();
    assert!(
        pin.contains("Pin: release o=debimg-team,l=debimg-team\nPin-Priority: 1001"),
        "{pin}"
    );
}

#[test]
fn repos_without_their_key_or_with_another_fail_naming_them() {
    if !can_build() {
        return;
    }
    let work = scratch("third-party-bad");
    let vendor_key = Key::new(work.path(), "vendor");
    let team_key = Key::new(work.path(), "team");
    let other_key = Key::new(work.path(), "other");
    let vendor = vendor_repo(work.path(), &vendor_key);
    let team = team_repo(work.path(), &team_key);
    let server = StaticServer::start(&vendor);
    std::fs::write(work.path().join("other.asc"), &other_key.armored).unwrap();
    let spec = work.path().join("bad-keys.yaml");
    std::fs::write(
        &spec,
        format!(
            "version: 1\nname: bad-keys\nsuite: bookworm\nmirror: {}\nkind: tarball\n\
             repos:\n  - {{name: debian, suite: bookworm}}\n\
             \x20 - {{name: vendor, uri: \"{}\", suite: debimg-vendor}}\n\
             \x20 - {{name: team, uri: \"file://{}\", suite: ./, key: other.asc}}\n",
            host_mirror(),
            server.url(),
            team.display(),
        ),
    )
    .unwrap();
    let out = work.path().join("out");
    let bdir = work.path().join("build");
    std::fs::create_dir_all(&bdir).unwrap();
    let run = build(&spec, &out, &bdir, &[]);
    assert!(!run.output.status.success(), "built without the keys");
    assert_no_leftovers(&bdir, &out);
    let err = run.stderr();
    let line = |name: &str| {
        err.lines()
            .find(|l| l.contains(&format!("repo `{name}` (")))
            .unwrap_or_else(|| panic!("no line names repo `{name}`:\n{err}"))
            .to_string()
    };
    let v = line("vendor");
    assert!(
        v.contains(&format!("signed by key {}", vendor_key.id())),
        "{v}"
    );
    assert!(v.contains("give the repo its `key`"), "{v}");
    let t = line("team");
    assert!(
        t.contains(&format!("signed by key {}", team_key.id())),
        "{t}"
    );
    assert!(
        t.contains(&format!("its `key` ({})", other_key.id())),
        "{t}"
    );
    assert!(!out.join("bad-keys.yaml").exists());
}
