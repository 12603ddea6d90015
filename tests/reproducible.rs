//! Reproducible builds (`source_date_epoch`, or `SOURCE_DATE_EPOCH` in the environment): one
//! spec built twice side by side, in different build directories and time zones, the first
//! from the shared test cache and the second a minute later without any cache (a bootstrap and
//! install of its own), gives byte-identical outputs; the metadata differs only in the build times. The whole
//! disk (the cloud example) is built twice by tests/disk.rs, which boots the first.
//!
//! Needs root, loop devices and the host's Debian mirror.

mod common;

use std::path::Path;
use std::process::Command;

use common::repro::*;
use common::*;

/// `debimg verify SPEC --against OUT`, rebuilding under `build_dir` from the test cache.
fn verify(spec: &Path, out: &Path, build_dir: &Path) -> Run {
    debimg(&[
        "verify",
        spec.to_str().unwrap(),
        "--against",
        out.to_str().unwrap(),
        "--build-dir",
        build_dir.to_str().unwrap(),
        "--cache-dir",
        TEST_CACHE,
        "-q",
    ])
}

/// No file in the tree at `dir` has a modification time after the epoch (nor an access time,
/// with `atime`: a tree tar just unpacked has its own).
fn assert_clamped(dir: &Path, atime: bool) {
    let epoch = format!("@{EPOCH}");
    let mut find = Command::new("find");
    find.arg(dir).args(["-xdev", "(", "-newermt", &epoch]);
    if atime {
        find.args(["-o", "-newerat", &epoch]);
    }
    let newer = find.args([")", "-print"]).output().unwrap();
    let listed = String::from_utf8_lossy(&newer.stdout);
    assert!(
        newer.status.success() && listed.trim().is_empty(),
        "times after the epoch: {}",
        listed.lines().take(10).collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn tarball_example_twice_gives_the_same_bytes() {
    if !can_build() {
        return;
    }
    // The epoch from the environment, as reproducible-builds.org has it.
    let env = [("SOURCE_DATE_EPOCH", EPOCH.to_string())];
    let (work, outs) = build_twice(&example("tarball.yaml"), "repro-tar", &env, &[]);
    assert_identical(&outs, "tarball.yaml");
    // What the tarball holds: every time clamped, none of the build's logs.
    let x = work.path().join("x");
    std::fs::create_dir(&x).unwrap();
    tool(
        "tar",
        &[
            "-xzf",
            outs[0].join("tarball.tar.gz").to_str().unwrap(),
            "-C",
            x.to_str().unwrap(),
        ],
    );
    assert_clamped(&x, false);
    for residue in debimg::reproducible::RESIDUE {
        assert!(!x.join(residue).exists(), "{residue} is in the tarball");
    }
}

#[test]
fn ext4_and_ext2_images_twice_give_the_same_bytes() {
    if !can_build() {
        return;
    }
    let work = scratch("repro-spec");
    let spec = work.path().join("repro.yaml");
    std::fs::write(
        &spec,
        format!(
            "version: 1\nname: repro\nsuite: bookworm\nmirror: host\n\
             packages: [less, openssh-server]\nsource_date_epoch: {EPOCH}\n\
             images:\n  - {{mount: /, fs: ext4, size: 1GiB, label: root}}\n  \
             - {{mount: /boot, fs: ext2, size: 128MiB, label: boot, container: raw}}\n"
        ),
    )
    .unwrap();
    // The package set first, resolved by `debimg lock` (from the shared cache where it can).
    let lock = work.path().join("repro.lock.yaml");
    let build_dir = work.path().join("lock-build");
    std::fs::create_dir_all(&build_dir).unwrap();
    let run = debimg(&[
        "lock",
        spec.to_str().unwrap(),
        "-o",
        lock.to_str().unwrap(),
        "--build-dir",
        build_dir.to_str().unwrap(),
        "--cache-dir",
        TEST_CACHE,
    ]);
    run.assert_ok("debimg lock");
    assert_eq!(run.stdout().trim(), lock.to_str().unwrap());
    assert_no_leftovers(&build_dir, Path::new("/nonexistent"));
    let locked = std::fs::read_to_string(&lock).unwrap();
    // Built twice from it. The spec's epoch wins over the environment's.
    let env = [("SOURCE_DATE_EPOCH", "1600000000".to_string())];
    let (work2, outs) = build_twice(&spec, "repro-fs", &env, &["--lock", lock.to_str().unwrap()]);
    assert_identical(&outs, "repro.yaml");
    // Each build wrote the lock of what it installed: the one it was given, listed in the
    // metadata.
    assert_eq!(
        std::fs::read_to_string(outs[0].join("repro.lock.yaml")).unwrap(),
        locked
    );
    let meta = debimg::metadata::Metadata::read(&outs[0].join("repro.yaml")).unwrap();
    assert!(
        meta.files.iter().any(|f| f.name == "repro.lock.yaml"),
        "{:?}",
        meta.files
    );
    let raws = check_outputs(&outs[0], &meta, work2.path());
    let tree = MountedTree::mount(&meta, &raws);
    // The lock against the image's dpkg status, package by package.
    let lock_file = debimg::debian::lock::Lock::parse(&locked, "lock").unwrap();
    let status = tree.read("/var/lib/dpkg/status");
    let installed = dpkg_installed(&status);
    assert_eq!(lock_file.versions(), installed);
    assert!(
        lock_file
            .packages
            .iter()
            .all(|p| p.repo.as_deref() == Some("debian")
                && p.sha256.as_ref().is_some_and(|s| s.len() == 64)),
        "{locked}"
    );
    assert_clamped(tree.path("/").as_path(), true);
    assert_clamped(tree.path("/boot").as_path(), true);
    for residue in debimg::reproducible::RESIDUE {
        assert!(!tree.path(residue).exists(), "{residue} is in the image");
    }
    let lists: Vec<_> = std::fs::read_dir(tree.path(debimg::reproducible::APT_LISTS))
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| !t.is_dir()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "lock")
        .collect();
    assert!(lists.is_empty(), "apt's lists are in the image: {lists:?}");
    // shadow's last-change day is the epoch's, not the build's.
    let shadow = tree.read("/etc/shadow");
    let day = (EPOCH / 86_400).to_string();
    for line in shadow.lines() {
        let lastchg = line.split(':').nth(2).unwrap_or_default();
        assert!(
            lastchg.is_empty() || lastchg == day,
            "{line}: last changed on day {lastchg}, not the epoch's ({day})"
        );
    }
    // The SSH host keys were made by the package and removed, as in every build.
    assert!(!tree.path("/etc/ssh/ssh_host_ed25519_key").exists());
    check_sboms(&outs[0], &meta, &status, &lock_file);
    // Change times too, which only the image's own inodes show.
    let root_raw = raws[0].to_str().unwrap();
    let stat = tool("debugfs", &["-R", "stat /usr/bin/less", root_raw]);
    assert!(
        stat.contains(&format!("ctime: 0x{EPOCH:08x}")),
        "the ctime of /usr/bin/less is not the epoch:\n{stat}"
    );
}

#[test]
fn a_lock_naming_a_version_the_mirror_lacks_fails_naming_it() {
    if !can_build() {
        return;
    }
    let work = scratch("repro-lock");
    let spec = work.path().join("locked.yaml");
    std::fs::write(
        &spec,
        "version: 1\nname: locked\nsuite: bookworm\nmirror: host\nkind: tarball\n\
         packages: [less]\nlock: locked.lock.yaml\n",
    )
    .unwrap();
    // A lock as a build writes it, for a less the mirror never had; one sha256 changed too.
    let sha = "0".repeat(64);
    std::fs::write(
        work.path().join("locked.lock.yaml"),
        format!(
            "version: 1\narch: amd64\npackages:\n\
             - {{name: less, version: '1:999-debimg', arch: amd64, repo: debian, sha256: {sha}}}\n\
             - {{name: base-files, version: '12.4+deb12u5', arch: amd64, repo: debian, sha256: {sha}}}\n"
        ),
    )
    .unwrap();
    let (build_dir, out) = (work.path().join("build"), work.path().join("out"));
    std::fs::create_dir_all(&build_dir).unwrap();
    let run = build(&spec, &out, &build_dir, &[]);
    assert_eq!(run.code(), Some(1), "{}", run.stderr());
    let err = run.stderr();
    assert!(err.contains("stage install failed"), "{err}");
    assert!(
        err.contains("names 2 package version(s) the repositories no longer have")
            && err.contains("less 1:999-debimg (amd64) from `debian`")
            && err.contains("base-files 12.4+deb12u5 (amd64)"),
        "{err}"
    );
    assert_no_leftovers(&build_dir, &out);
    assert!(!out.join("locked.tar.gz").exists());
}

/// The build's SBOMs: listed in the metadata, valid for the reference validators, and naming
/// every package of the image's dpkg `status` (version, architecture, source, purl, the lock's
/// sha256) and every image with its checksum.
fn check_sboms(
    out: &Path,
    meta: &debimg::metadata::Metadata,
    status: &str,
    lock: &debimg::lockfile::Lock,
) {
    let name = &meta.name;
    let (spdx, cdx) = (
        out.join(format!("{name}.spdx.json")),
        out.join(format!("{name}.cdx.json")),
    );
    for f in [&spdx, &cdx] {
        let file = f.file_name().unwrap().to_str().unwrap();
        let listed = meta.files.iter().find(|m| m.name == file);
        assert!(listed.is_some(), "{file} is not in the metadata");
        assert_eq!(sums(f).1, listed.unwrap().sha256, "{file}");
    }
    validate_sboms(&spdx, &cdx);
    let read = |p: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    let (s, c) = (read(&spdx), read(&cdx));
    // dpkg's status: name -> (version, architecture, source).
    let mut want = std::collections::BTreeMap::new();
    for stanza in status.split("\n\n") {
        let field = |f: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(f).map(|v| v.trim().to_string()))
        };
        if field("Status:").as_deref() != Some("install ok installed") {
            continue;
        }
        let (n, v, a) = (
            field("Package:").unwrap(),
            field("Version:").unwrap(),
            field("Architecture:").unwrap(),
        );
        let src = field("Source:")
            .map(|s| s.split_whitespace().next().unwrap().to_string())
            .unwrap_or_else(|| n.clone());
        want.insert(n, (v, a, src));
    }
    assert!(want.len() > 50, "{}", want.len());
    let spdx_pkgs: Vec<&serde_json::Value> = s["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| {
            p["SPDXID"]
                .as_str()
                .unwrap()
                .starts_with("SPDXRef-Package-deb-")
        })
        .collect();
    let cdx_pkgs: Vec<&serde_json::Value> = c["components"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"] == "library")
        .collect();
    assert_eq!(spdx_pkgs.len(), want.len());
    assert_eq!(cdx_pkgs.len(), want.len());
    for (sp, cp) in spdx_pkgs.iter().zip(&cdx_pkgs) {
        let n = sp["name"].as_str().unwrap();
        let (v, a, src) = want
            .get(n)
            .unwrap_or_else(|| panic!("{n} is not installed"));
        assert_eq!(sp["versionInfo"], v.as_str(), "{n}");
        assert_eq!(
            (cp["name"].as_str(), cp["version"].as_str()),
            (Some(n), Some(v.as_str()))
        );
        let purl = sp["externalRefs"][0]["referenceLocator"].as_str().unwrap();
        assert!(
            purl.starts_with("pkg:deb/debian/") && purl.ends_with(&format!("?arch={a}")),
            "{purl}"
        );
        assert_eq!(cp["purl"], purl);
        assert!(
            sp["sourceInfo"]
                .as_str()
                .unwrap()
                .contains(&format!(" {src} ")),
            "{n}: {}",
            sp["sourceInfo"]
        );
        let locked = lock.packages.iter().find(|p| p.name == n).unwrap();
        assert_eq!(
            sp["checksums"][0]["checksumValue"].as_str(),
            locked.sha256.as_deref(),
            "{n}"
        );
    }
    // A package with a DEP-5 copyright file has its licences.
    let bash = spdx_pkgs.iter().find(|p| p["name"] == "bash").unwrap();
    assert!(
        bash["licenseDeclared"]
            .as_str()
            .unwrap()
            .contains("GPL-3.0-or-later"),
        "{bash}"
    );
    // perl-base's copyright file offers a choice: it stays one. Its standalone licence
    // paragraphs (the texts of GPL-1+ and Artistic) add no licence of their own.
    let perl = spdx_pkgs.iter().find(|p| p["name"] == "perl-base").unwrap();
    let declared = perl["licenseDeclared"].as_str().unwrap();
    assert!(
        declared.starts_with("(GPL-1.0-or-later OR Artistic-1.0-Perl) AND "),
        "{declared}"
    );
    assert!(
        !declared.split(" AND ").any(|t| t == "GPL-1.0-or-later"),
        "{declared}"
    );
    for img in &meta.images {
        let found = s["packages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == img.container_name.as_str())
            .unwrap_or_else(|| panic!("{} is not in the SPDX document", img.container_name));
        assert_eq!(
            found["checksums"][0]["checksumValue"],
            img.container_sha256.as_str()
        );
        let comp = c["components"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == img.container_name.as_str())
            .unwrap();
        assert_eq!(comp["hashes"][0]["content"], img.container_sha256.as_str());
    }
}

#[test]
fn verify_says_identical_then_names_the_file_a_changed_spec_changes() {
    if !can_build() {
        return;
    }
    let work = scratch("repro-verify");
    let spec = work.path().join("verified.yaml");
    let write_spec = |motd: &str| {
        std::fs::write(
            &spec,
            format!(
                "version: 1\nname: verified\nsuite: bookworm\nmirror: host\n\
                 packages: [less]\nsource_date_epoch: {EPOCH}\n\
                 images:\n  - {{mount: /, fs: ext4, size: 1GiB, label: root}}\n\
                 files:\n  - {{dest: /etc/motd, content: \"{motd}\\n\"}}\n"
            ),
        )
        .unwrap()
    };
    write_spec("one");
    let (build_dir, out) = (work.path().join("build"), work.path().join("out"));
    std::fs::create_dir_all(&build_dir).unwrap();
    build(&spec, &out, &build_dir, &[]).assert_ok("the build to check");
    let verify = || verify(&spec, &out, &build_dir);
    let same = verify();
    same.assert_ok("verify of an unchanged spec");
    assert!(
        same.stdout()
            .starts_with("identical: verified rebuilt from"),
        "{}",
        same.stdout()
    );
    assert_no_leftovers(&build_dir, &out);
    // The spec's file changed: the rebuild differs, and the report says where.
    write_spec("two");
    let changed = verify();
    assert_eq!(changed.code(), Some(1), "{}", changed.stderr());
    let report = changed.stdout();
    assert!(
        report.contains("differs: verified-root.img.gz\n"),
        "{report}"
    );
    assert!(report.contains("\n  /etc/motd: content\n"), "{report}");
    assert!(
        changed.stderr().contains("the rebuild differs from"),
        "{}",
        changed.stderr()
    );
    assert_no_leftovers(&build_dir, &out);
}

#[test]
fn a_lock_installs_the_older_version_a_repository_still_has() {
    if !can_build() {
        return;
    }
    let work = scratch("repro-pin");
    let version = |v: &'static str| {
        build_deb(
            work.path(),
            "debimg-pinned",
            v,
            "",
            &[DebEntry::File(
                "/usr/share/debimg-pinned/version",
                v.as_bytes(),
                0o644,
            )],
        )
    };
    let (old, new) = (version("1.0"), version("2.0"));
    let repo_dir = work.path().join("repo");
    make_repo(&repo_dir, "debimg-test", "main", &[old.clone(), new]);
    let server = StaticServer::start(&repo_dir);
    let spec = work.path().join("pinned.yaml");
    std::fs::write(
        &spec,
        format!(
            "version: 1\nname: pinned\nsuite: bookworm\nmirror: host\nkind: tarball\n\
             packages: [debimg-pinned]\nrepos:\n  - {{name: debian, suite: bookworm}}\n  \
             - {{name: local, uri: \"{}\", suite: debimg-test, section: main, trusted: true}}\n",
            server.url()
        ),
    )
    .unwrap();
    let build_dir = work.path().join("build");
    std::fs::create_dir_all(&build_dir).unwrap();
    // Resolved, the lock has the candidate, 2.0; locked to 1.0 instead, with its file's sha256.
    let lock_path = work.path().join("pinned.lock.yaml");
    debimg(&[
        "lock",
        spec.to_str().unwrap(),
        "-o",
        lock_path.to_str().unwrap(),
        "--build-dir",
        build_dir.to_str().unwrap(),
        "--cache-dir",
        TEST_CACHE,
        "-q",
    ])
    .assert_ok("debimg lock");
    let text = std::fs::read_to_string(&lock_path).unwrap();
    let mut lock = debimg::lockfile::Lock::parse(&text, "lock").unwrap();
    let entry = lock
        .packages
        .iter_mut()
        .find(|p| p.name == "debimg-pinned")
        .unwrap();
    assert_eq!(
        (entry.version.as_str(), entry.repo.as_deref()),
        ("2.0", Some("local"))
    );
    entry.version = "1.0".into();
    entry.sha256 = Some(sums(&old).1);
    std::fs::write(&lock_path, lock.render("pinned").unwrap()).unwrap();
    let out = work.path().join("out");
    let run = build(
        &spec,
        &out,
        &build_dir,
        &["--lock", lock_path.to_str().unwrap()],
    );
    run.assert_ok("the build from the lock");
    assert_no_leftovers(&build_dir, &out);
    let meta = debimg::metadata::Metadata::read(&out.join("pinned.yaml")).unwrap();
    assert_eq!(
        meta.installed.get("debimg-pinned").map(String::as_str),
        Some("1.0")
    );
    // The build's own lock is the one it was given.
    let written = std::fs::read_to_string(out.join("pinned.lock.yaml")).unwrap();
    assert_eq!(
        debimg::lockfile::Lock::parse(&written, "written").unwrap(),
        lock
    );
}

/// xfs and btrfs are written by the kernel, and Debian 12's mkfs tools cannot populate them
/// from a tree: two builds give the same files in them (and a bit-identical ext4 root beside
/// them), but not the same bytes. `verify` says exactly that, image by image.
#[test]
fn xfs_and_btrfs_rebuilds_hold_the_same_files_and_verify_says_so() {
    if !can_build() {
        return;
    }
    let work = scratch("repro-xb");
    let spec = work.path().join("xb.yaml");
    std::fs::write(
        &spec,
        format!(
            "version: 1\nname: xb\nsuite: bookworm\nmirror: host\n\
             packages: [less]\nsource_date_epoch: {EPOCH}\n\
             images:\n  - {{mount: /, fs: ext4, size: 1GiB, label: root, container: raw}}\n  \
             - {{mount: /var, fs: xfs, size: 512MiB, label: var, container: raw}}\n  \
             - {{mount: /srv, fs: btrfs, size: 256MiB, label: srv, container: raw}}\n\
             files:\n  - {{dest: /srv/hello, content: \"hello\\n\"}}\n"
        ),
    )
    .unwrap();
    let (build_dir, out) = (work.path().join("build"), work.path().join("out"));
    std::fs::create_dir_all(&build_dir).unwrap();
    build(&spec, &out, &build_dir, &[]).assert_ok("the build to check");
    let run = verify(&spec, &out, &build_dir);
    assert_eq!(run.code(), Some(1), "{}", run.stderr());
    let report = run.stdout();
    for (image, fs) in [("xb-var.img", "xfs"), ("xb-srv.img", "btrfs")] {
        assert!(
            report.contains(&format!(
                "differs: {image}\n  no file differs: only {fs}'s own metadata"
            )),
            "{report}"
        );
    }
    assert!(!report.contains("xb-root.img"), "{report}");
    assert!(
        report.contains("differs: xb.spdx.json\n  it records the images' checksums"),
        "{report}"
    );
    assert!(!report.contains("lock.yaml"), "{report}");
    assert!(
        !run.stderr().contains("dropped without close"),
        "{}",
        run.stderr()
    );
    assert_no_leftovers(&build_dir, &out);
}
