//! `attachments`: files of the finished image copied next to the outputs, proven by one real
//! build (a tarball from the host's mirror, as a release) with a package made here with
//! dpkg-deb and a post script that leaves links in the image pointing at a host file by absolute
//! path, far above the root by `../` and into `/proc` and `/sys`: every attachment is the image's
//! own file, none is the host's or the build's, and the metadata, SHA256SUMS and the reuse check
//! all cover them.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::*;
use debimg::metadata::Metadata;

/// Every regular file under `dir` (links not followed), as paths from `dir`, with its mode.
fn files_under(dir: &Path) -> BTreeMap<String, u32> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else {
                assert!(t.is_file(), "{} is not a regular file", e.path().display());
                let rel = e.path().strip_prefix(dir).unwrap().display().to_string();
                let mode = e.metadata().unwrap().permissions().mode() & 0o7777;
                out.insert(rel, mode);
            }
        }
    }
    out
}

/// Every directory under `dir` (itself included) with its mode.
fn dirs_under(dir: &Path) -> Vec<(PathBuf, u32)> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        out.push((
            d.clone(),
            std::fs::metadata(&d).unwrap().permissions().mode() & 0o7777,
        ));
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
        }
    }
    out
}

#[test]
fn attachments_come_from_the_image_never_from_the_host() {
    if !can_build() {
        return;
    }
    let work = scratch("attachments");
    // A host file that links in the image name by absolute path. The image holds a file of its
    // own at the same path (from the package): a link to it must give that one.
    const HOST_MARKER: &str = "HOST-MARKER-debimg-attachments-5c1e";
    const IMAGE_MARKER: &str = "the image's own marker file\n";
    let marker = work.path().join("host/marker");
    std::fs::create_dir_all(marker.parent().unwrap()).unwrap();
    std::fs::write(&marker, HOST_MARKER).unwrap();
    let marker_path = marker.display().to_string();
    let marker_rel = marker_path.trim_start_matches('/').to_string();

    let deb = build_deb(
        work.path(),
        "debimg-att",
        "1.0",
        "",
        &[
            DebEntry::File("/usr/bin/debimg-att", b"#!/bin/sh\necho att\n", 0o755),
            DebEntry::File("/usr/share/debimg-att/data.txt", b"package data\n", 0o644),
            // A directory of its own, and a file the image keeps private.
            DebEntry::File("/usr/share/debimg-att/sub/nested.conf", b"nested\n", 0o600),
            DebEntry::Symlink("/usr/share/debimg-att/link", "data.txt"),
            DebEntry::Symlink("/usr/share/debimg-att/to-host", &marker_path),
            DebEntry::File(&marker_path, IMAGE_MARKER.as_bytes(), 0o644),
            // A kernel and initrd for copy_kernel, which leaves the image the same way.
            DebEntry::File("/boot/vmlinuz-9.9.9-att", b"the image's kernel\n", 0o644),
            DebEntry::File("/boot/initrd.img-9.9.9-att", b"the image's initrd\n", 0o644),
        ],
    );
    let spec = work.path().join("att.yaml");
    std::fs::write(
        &spec,
        format!(
            "version: 1\nname: att\nsuite: bookworm\nmirror: host\nkind: tarball\n\
             local_debs: [{deb}]\ncopy_kernel: true\n\
             files:\n  - {{dest: /etc/att/from-files.conf, content: \"from files\\n\", mode: \"0600\"}}\n\
             post:\n  - name: links\n    script: |\n      \
             echo plain > /etc/att/plain.txt\n      \
             ln -s {marker_path} /etc/att/abs-marker\n      \
             ln -s ../../../../../../../../../../etc/debian_version /etc/att/up\n      \
             ln -s {missing} /etc/att/dangling\n      \
             ln -s /proc/1/environ /etc/att/environ\n      \
             ln -s ../../proc/self/environ /etc/att/self-environ\n      \
             ln -s /sys/kernel/hostname /etc/att/sys-hostname\n      \
             mkdir /etc/att/dir.d\n\
             attachments:\n  - {{package: debimg-att}}\n  - /etc/att/*\n  - /etc/os-release\n  \
             - {{path: /etc/att/abs-marker}}\n",
            deb = deb.display(),
            missing = work.path().join("host/not-in-the-image").display(),
        ),
    )
    .unwrap();
    let out = work.path().join("out");
    let bdir = work.path().join("build");
    std::fs::create_dir_all(&bdir).unwrap();
    // The build's own environment holds the marker too: a link to /proc/1/environ must not
    // bring it out.
    let output = build_command(&spec, &out, &bdir, &["--release", "1"])
        .env("DEBIMG_TEST_HOST_MARKER", HOST_MARKER)
        .output()
        .unwrap();
    let run = Run {
        output,
        elapsed: Default::default(),
    };
    run.assert_ok("the attachments build");
    let rel = out.join("1");
    assert_no_leftovers(&bdir, &rel);
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), HOST_MARKER);

    // The image's /etc/debian_version, from the tarball, for the link that climbs.
    let debian_version = tool(
        "tar",
        &[
            "-xzOf",
            rel.join("att.tar.gz").to_str().unwrap(),
            "--wildcards",
            "*etc/debian_version",
        ],
    );
    assert!(debian_version.starts_with("12"), "{debian_version}");

    // Exactly the regular files asked for, each 0644 whatever its mode in the image: the
    // package's (not its directories or links), the glob's (not the directory, not the links
    // that lead nowhere in the image: proc and sysfs are unmounted before anything is copied),
    // the plain paths; a file named twice is there once.
    let dir = rel.join("att.attachments");
    let got = files_under(&dir);
    let mut want: Vec<&str> = vec![
        "boot/initrd.img-9.9.9-att",
        "boot/vmlinuz-9.9.9-att",
        "etc/att/abs-marker",
        "etc/att/from-files.conf",
        "etc/att/plain.txt",
        "etc/att/up",
        "etc/os-release",
        "usr/bin/debimg-att",
        "usr/share/debimg-att/data.txt",
        "usr/share/debimg-att/sub/nested.conf",
        &marker_rel,
    ];
    want.sort();
    assert_eq!(got.keys().map(String::as_str).collect::<Vec<_>>(), want);
    for (name, mode) in &got {
        assert_eq!(*mode, 0o644, "{name}");
    }
    for (d, mode) in dirs_under(&dir) {
        assert_eq!(mode, 0o755, "{}", d.display());
    }
    let read = |rel: &str| std::fs::read_to_string(dir.join(rel)).unwrap();
    assert_eq!(read("usr/share/debimg-att/data.txt"), "package data\n");
    assert_eq!(read("usr/share/debimg-att/sub/nested.conf"), "nested\n");
    assert_eq!(read("usr/bin/debimg-att"), "#!/bin/sh\necho att\n");
    assert_eq!(read("etc/att/plain.txt"), "plain\n");
    assert_eq!(read("etc/att/from-files.conf"), "from files\n");
    assert!(read("etc/os-release").contains("ID=debian"));
    // The links out of the image: the absolute one gives the image's file at that path, the
    // climbing one stops at the image's root.
    assert_eq!(read("etc/att/abs-marker"), IMAGE_MARKER);
    assert_eq!(read(&marker_rel), IMAGE_MARKER);
    assert_eq!(read("etc/att/up"), debian_version);
    // copy_kernel, beside the images as before.
    assert_eq!(
        std::fs::read_to_string(rel.join("att.vmlinuz")).unwrap(),
        "the image's kernel\n"
    );
    assert_eq!(
        std::fs::read_to_string(rel.join("att.initrd")).unwrap(),
        "the image's initrd\n"
    );

    // No host byte anywhere in the release: every file, and the unpacked root filesystem.
    let mut everything: Vec<PathBuf> = files_under(&rel).into_keys().map(|n| rel.join(n)).collect();
    everything.retain(|p| !p.ends_with("att.tar.gz"));
    for f in &everything {
        let bytes = std::fs::read(f).unwrap();
        assert!(
            !contains_bytes(&bytes, HOST_MARKER.as_bytes()),
            "{} holds the host marker",
            f.display()
        );
    }
    let tree = std::process::Command::new("gzip")
        .arg("-dc")
        .arg(rel.join("att.tar.gz"))
        .output()
        .unwrap();
    assert!(tree.status.success());
    assert!(!contains_bytes(&tree.stdout, HOST_MARKER.as_bytes()));

    // The metadata lists every attachment (the kernel and initrd too) with its path in the
    // image, its file name and a sha256 that is the file's.
    let meta = Metadata::read(&rel.join("att.yaml")).unwrap();
    let listed: BTreeMap<&str, &str> = meta
        .attachments
        .iter()
        .map(|a| (a.file.as_str(), a.path.as_str()))
        .collect();
    assert_eq!(listed.len(), meta.attachments.len(), "a file listed twice");
    assert_eq!(listed["att.vmlinuz"], "/boot/vmlinuz-9.9.9-att");
    assert_eq!(listed["att.initrd"], "/boot/initrd.img-9.9.9-att");
    assert_eq!(listed["att.attachments/etc/att/up"], "/etc/att/up");
    assert_eq!(
        listed["att.attachments/usr/share/debimg-att/sub/nested.conf"],
        "/usr/share/debimg-att/sub/nested.conf"
    );
    assert_eq!(meta.attachments.len(), want.len() + 2);
    for name in &want {
        assert!(
            listed.contains_key(format!("att.attachments/{name}").as_str()),
            "{name} is not in the metadata"
        );
    }
    for a in &meta.attachments {
        let p = rel.join(&a.file);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), a.size, "{}", a.file);
        assert_eq!(sums(&p).1, a.sha256, "{}", a.file);
    }
    assert!(meta.files.iter().any(|f| f.name == "att.vmlinuz"));

    // SHA256SUMS covers every attachment, and the coreutils accept it.
    let sha_list = std::fs::read_to_string(rel.join("SHA256SUMS")).unwrap();
    for a in &meta.attachments {
        assert!(
            sha_list.contains(&format!("{}  {}\n", a.sha256, a.file)),
            "{} missing in SHA256SUMS:\n{sha_list}",
            a.file
        );
    }
    for (tool, file) in [("sha256sum", "SHA256SUMS"), ("md5sum", "MD5SUMS")] {
        let st = std::process::Command::new(tool)
            .args(["--check", "--strict", file])
            .current_dir(&rel)
            .output()
            .unwrap();
        assert!(st.status.success(), "{tool} -c {file}: {st:?}");
    }

    // The same spec into the release directory again reuses it: the reuse check reads every
    // attachment and finds it as the metadata says.
    let again = build(&spec, &rel, &bdir, &[]);
    again.assert_ok("the reuse");
    assert!(again.stderr().contains("reused:"), "{}", again.stderr());
    assert_no_leftovers(&bdir, &rel);
}
