//! The image-creator features, each proven by a real build from the host's mirror and an
//! inspection of what came out: post scripts, system settings, package selection, package
//! records, the kernel copied out, release directories, packing, `--shell`,
//! `--keep-on-failure`, `--tmpfs`, the tarball kind, the staged API and fuel-agent's input.

mod common;

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;
use debimg::metadata::Metadata;

/// uid and gid of `user` in an image's passwd file.
fn ids(passwd: &str, user: &str) -> (u32, u32) {
    let line = passwd
        .lines()
        .find(|l| l.starts_with(&format!("{user}:")))
        .unwrap_or_else(|| panic!("no user {user} in passwd:\n{passwd}"));
    let f: Vec<&str> = line.split(':').collect();
    (f[2].parse().unwrap(), f[3].parse().unwrap())
}

#[test]
fn features_example_as_a_release_with_a_shell() {
    if !can_build() {
        return;
    }
    let work = scratch("features");
    let out = work.path().join("out");
    let bdir = work.path().join("build");
    std::fs::create_dir_all(&bdir).unwrap();
    let mut child = build_command(
        &example("features.yaml"),
        &out,
        &bdir,
        &["--release", "7", "--shell"],
    )
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    // What a user types into the --shell: it runs inside the configured chroot.
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"echo typed-in-the-shell > /root/shell-was-here\nexit\n")
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let run = Run {
        output,
        elapsed: Default::default(),
    };
    run.assert_ok("features build");
    let rel = out.join("7");
    assert_no_leftovers(&bdir, &rel);
    let stderr = run.stderr();
    assert!(
        stderr.contains("package debimg-no-such-package is not in the repos: skipped"),
        "{stderr}"
    );
    assert!(
        stderr.contains("post script allowed-to-fail failed (may_fail: true"),
        "{stderr}"
    );

    // The release directory: checksums the coreutils accept, the spec as built, the log.
    for (tool, file) in [("sha256sum", "SHA256SUMS"), ("md5sum", "MD5SUMS")] {
        let st = Command::new(tool)
            .args(["--check", "--strict", file])
            .current_dir(&rel)
            .output()
            .unwrap();
        assert!(st.status.success(), "{tool} -c {file}: {st:?}");
    }
    let sha_list = std::fs::read_to_string(rel.join("SHA256SUMS")).unwrap();
    for name in [
        "features-root.img.gz",
        "features-boot.img.gz",
        "features.yaml",
        "features.packages",
        "features.files",
        "features.licenses",
        "features.spec.yaml",
        "build.log",
    ] {
        assert!(
            sha_list.contains(&format!("  {name}\n")),
            "{name} missing in SHA256SUMS:\n{sha_list}"
        );
    }
    let spec_copy = std::fs::read_to_string(rel.join("features.spec.yaml")).unwrap();
    assert!(spec_copy.contains("content: \"build 7\\n\""), "{spec_copy}");
    assert!(!spec_copy.contains("@BUILD_ID@"));
    let log = std::fs::read_to_string(rel.join("build.log")).unwrap();
    assert!(log.contains("stage configure: done in"), "{log}");
    assert!(log.contains("debimg-no-such-package"), "{log}");

    let meta = Metadata::read(&rel.join("features.yaml")).unwrap();
    assert_eq!(meta.kind, "fs-images");
    // Attachments: a path, a glob and a package's files, as the metadata lists them.
    let att = rel.join("features.attachments");
    assert_eq!(
        std::fs::read_to_string(att.join("usr/share/debimg-hello/hello.txt")).unwrap(),
        "hello from a local .deb\n"
    );
    assert!(att.join("etc/os-release").is_file());
    assert_eq!(
        std::fs::read_to_string(att.join("etc/debimg-build-id")).unwrap(),
        "build 7\n"
    );
    for a in &meta.attachments {
        assert_eq!(sums(&rel.join(&a.file)).1, a.sha256, "{}", a.path);
    }
    assert!(
        meta.attachments
            .iter()
            .any(|a| a.path == "/etc/debimg-perl")
    );
    let raws = check_outputs(&rel, &meta, work.path());
    let tree = MountedTree::mount(&meta, &raws);
    let installed = dpkg_installed(&tree.read("/var/lib/dpkg/status"));
    assert_eq!(installed, meta.installed);

    // Package selection.
    for p in [
        "systemd",
        "logrotate",
        "sudo",
        "task-ssh-server",
        "openssh-server",
        "debimg-hello",
        "jq",
        "tzdata",
        "locales",
        "anacron",
    ] {
        assert!(installed.contains_key(p), "{p} is not installed");
    }
    for p in installed.keys() {
        assert!(
            !p.starts_with("cron") && !p.ends_with("-doc"),
            "excluded package {p} is installed"
        );
    }
    assert!(!installed.contains_key("debimg-no-such-package"));
    assert_eq!(
        tree.read("/usr/share/debimg-hello/hello.txt"),
        "hello from a local .deb\n"
    );
    for build_only in [
        "/etc/apt/preferences.d/00debimg-exclude.pref",
        "/var/cache/debimg-local-debs",
        "/usr/sbin/policy-rc.d",
        "/etc/apt/apt.conf.d/00debimg-build",
    ] {
        assert!(
            tree.path(build_only).symlink_metadata().is_err(),
            "{build_only} is still in the image"
        );
    }

    // System settings.
    assert_eq!(
        std::fs::read_link(tree.path("/etc/localtime")).unwrap(),
        Path::new("/usr/share/zoneinfo/Europe/Berlin")
    );
    assert_eq!(tree.read("/etc/timezone"), "Europe/Berlin\n");
    assert!(
        tree.read("/etc/default/locale")
            .contains("LANG=de_DE.UTF-8"),
        "{}",
        tree.read("/etc/default/locale")
    );
    assert!(tree.read("/etc/locale.gen").contains("de_DE.UTF-8 UTF-8"));
    let archive = tool(
        "localedef",
        &[
            "--list-archive",
            tree.path("/usr/lib/locale/locale-archive")
                .to_str()
                .unwrap(),
        ],
    );
    assert!(archive.contains("de_DE.utf8"), "{archive}");
    let passwd = tree.read("/etc/passwd");
    let (uid, gid) = ids(&passwd, "deploy");
    assert!(
        passwd.contains(&format!("deploy:x:{uid}:{gid}::/home/deploy:/bin/bash")),
        "{passwd}"
    );
    let group = tree.read("/etc/group");
    assert!(
        group
            .lines()
            .any(|l| l.starts_with("sudo:") && l.ends_with(":deploy")),
        "{group}"
    );
    assert!(
        tree.read("/etc/shadow")
            .contains("deploy:$6$debimgexample$STFhDTY")
    );
    let keys = tree.path("/home/deploy/.ssh/authorized_keys");
    assert!(
        std::fs::read_to_string(&keys)
            .unwrap()
            .contains("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDebimgExampleKey")
    );
    let km = std::fs::metadata(&keys).unwrap();
    assert_eq!((km.uid(), km.gid(), km.mode() & 0o777), (uid, gid, 0o600));
    let sm = std::fs::metadata(tree.path("/home/deploy/.ssh")).unwrap();
    assert_eq!((sm.uid(), sm.mode() & 0o777), (uid, 0o700));
    let wants = "/etc/systemd/system/multi-user.target.wants";
    assert!(
        tree.path(&format!("{wants}/systemd-networkd.service"))
            .symlink_metadata()
            .is_ok(),
        "systemd-networkd is not enabled"
    );
    assert!(
        tree.path(&format!("{wants}/ssh.service"))
            .symlink_metadata()
            .is_err(),
        "ssh is still enabled"
    );
    assert!(tree.path("/usr/sbin/sshd").exists());
    let motd = tree.path("/etc/motd");
    assert!(
        tree.read("/etc/motd")
            .starts_with("This machine was built by debimg")
    );
    let mm = std::fs::metadata(&motd).unwrap();
    assert_eq!((mm.uid(), mm.gid(), mm.mode() & 0o7777), (0, gid, 0o640));
    assert_eq!(tree.read("/etc/debimg-build-id"), "build 7\n");
    assert_eq!(tree.read("/etc/hostname"), "features\n");

    // Post scripts: their environment, the host script, another interpreter; none left.
    let env = tree.read("/etc/debimg-post.env");
    let root = &meta.images[0];
    let boot = &meta.images[1];
    for line in [
        "INSTALL_ROOT=/".to_string(),
        "IMG_NAME=features".into(),
        "DEBIMG_IN_CHROOT=1".into(),
        "DEBIMG_IMAGE_COUNT=2".into(),
        "DEBIMG_IMAGE_0_MOUNT=/".into(),
        "DEBIMG_IMAGE_0_FS=ext4".into(),
        "DEBIMG_IMAGE_0_LABEL=root".into(),
        "DEBIMG_IMAGE_0_SIZE=2147483648".into(),
        format!("DEBIMG_IMAGE_0_UUID={}", root.uuid),
        "DEBIMG_IMAGE_1_MOUNT=/boot".into(),
        "DEBIMG_IMAGE_1_FS=ext2".into(),
        format!("DEBIMG_IMAGE_1_UUID={}", boot.uuid),
    ] {
        assert!(
            env.lines().any(|l| l == line),
            "`{line}` missing in the post script's environment:\n{env}"
        );
    }
    assert!(
        env.lines()
            .any(|l| l.starts_with("DEBIMG_IMAGE_1_DEVICE=/dev/loop")),
        "{env}"
    );
    assert_eq!(
        tree.read("/etc/debimg-host-post"),
        "host script saw 2 images\n"
    );
    assert_eq!(tree.read("/etc/debimg-perl"), "perl for features\n");
    let left: Vec<_> = std::fs::read_dir(tree.path("/tmp"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("debimg-post"))
        .collect();
    assert!(left.is_empty(), "post scripts left in the image: {left:?}");

    // --shell ran in the chroot before unmounting.
    assert_eq!(tree.read("/root/shell-was-here"), "typed-in-the-shell\n");

    // Package records next to the images.
    let packages = std::fs::read_to_string(rel.join("features.packages")).unwrap();
    let listed: Vec<(String, String)> = packages
        .lines()
        .map(|l| {
            let (n, v) = l.split_once(' ').unwrap();
            (n.to_string(), v.to_string())
        })
        .collect();
    let expected: Vec<(String, String)> = installed
        .iter()
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    assert_eq!(listed, expected, "features.packages differs from dpkg");
    let files = std::fs::read_to_string(rel.join("features.files")).unwrap();
    let sshd = files
        .split("\nopenssh-server:\n")
        .nth(1)
        .expect("openssh-server in features.files");
    assert!(sshd.contains("    /usr/sbin/sshd\n"), "sshd not listed");
    for pkg in installed.keys() {
        assert!(
            files.starts_with(&format!("{pkg}:\n")) || files.contains(&format!("\n{pkg}:\n")),
            "{pkg} missing in features.files"
        );
    }
    let licenses = std::fs::read_to_string(rel.join("features.licenses")).unwrap();
    assert!(licenses.starts_with("# Licences\n"), "{licenses}");
    let (summary, per_package) = licenses.split_once("\n# Packages\n").unwrap();
    assert!(summary.contains("GPL-2+: "), "{summary}");
    assert_eq!(per_package.lines().count(), installed.len());
    assert!(
        per_package
            .lines()
            .any(|l| l.starts_with("jq: ") && l.contains("MIT")),
        "{per_package}"
    );
    let names: Vec<&str> = meta.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "features.packages",
            "features.files",
            "features.licenses",
            "features.lock.yaml",
            "features.spdx.json",
            "features.cdx.json"
        ]
    );
    for f in &meta.files {
        assert_eq!(sums(&rel.join(&f.name)).1, f.sha256, "{}", f.name);
    }
}

#[test]
fn tarball_with_kernel_built_on_tmpfs_and_packed() {
    if !can_build() {
        return;
    }
    let work = scratch("tarball");
    let out = work.path().join("out");
    let bdir = work.path().join("build");
    std::fs::create_dir_all(&bdir).unwrap();
    let run = build(
        &example("tarball.yaml"),
        &out,
        &bdir,
        &["--tmpfs", "4GiB", "--bundle", "tar.gz", "-v"],
    );
    run.assert_ok("tarball build");
    assert_no_leftovers(&bdir, &out);
    assert!(
        run.stderr().contains("workspace on a tmpfs of 4096 MiB"),
        "{}",
        run.stderr()
    );
    // No loop device was ever attached for this kind. With -v every command and every loop
    // attach is logged ("attached FILE to /dev/loopN"): the log shows the archiving, no attach,
    // no mkfs.
    let log = run.stderr();
    assert!(log.contains("running tar --create"), "no debug log:\n{log}");
    for never in ["attached ", "/dev/loop", "running mkfs"] {
        assert!(!log.contains(never), "`{never}` in a tarball build:\n{log}");
    }
    // Other tests of this binary attach loop devices side by side (a whole-host `losetup -a`
    // before and after raced with them in CI): only files of this test count.
    assert_eq!(loops_backed_under(work.path()), Vec::<String>::new());

    // --pack: one archive holds every output.
    let bundle = out.join("tarball.bundle.tar.gz");
    let listing = tool("tar", &["-tzf", bundle.to_str().unwrap()]);
    let mut names: Vec<&str> = listing.lines().collect();
    names.sort();
    assert_eq!(
        names,
        [
            "tarball.cdx.json",
            "tarball.initrd",
            "tarball.lock.yaml",
            "tarball.packages",
            "tarball.spdx.json",
            "tarball.tar.gz",
            "tarball.vmlinuz",
            "tarball.yaml"
        ]
    );
    let left: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert_eq!(left, ["tarball.bundle.tar.gz"]);
    let x = work.path().join("x");
    std::fs::create_dir_all(&x).unwrap();
    tool(
        "tar",
        &["-xzf", bundle.to_str().unwrap(), "-C", x.to_str().unwrap()],
    );
    let meta = Metadata::read(&x.join("tarball.yaml")).unwrap();
    assert_eq!(meta.kind, "tarball");
    assert_eq!(meta.images.len(), 1);
    let img = &meta.images[0];
    assert_eq!(
        (img.container_name.as_str(), img.format.as_str()),
        ("tarball.tar.gz", "tar")
    );
    let (md5, sha) = sums(&x.join("tarball.tar.gz"));
    assert_eq!(
        (md5, sha),
        (img.container_md5.clone(), img.container_sha256.clone())
    );

    // The root filesystem, unpacked with numeric owners as shipped.
    let rootfs = x.join("rootfs");
    std::fs::create_dir_all(&rootfs).unwrap();
    tool(
        "tar",
        &[
            "-xzf",
            x.join("tarball.tar.gz").to_str().unwrap(),
            "-C",
            rootfs.to_str().unwrap(),
            "--numeric-owner",
        ],
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("etc/hostname")).unwrap(),
        "rootfs\n"
    );
    let installed =
        dpkg_installed(&std::fs::read_to_string(rootfs.join("var/lib/dpkg/status")).unwrap());
    assert_eq!(installed, meta.installed);
    assert!(installed.contains_key("linux-image-cloud-amd64"));
    assert!(installed.contains_key("systemd-sysv"));
    for d in ["proc", "sys", "dev/pts"] {
        let n = std::fs::read_dir(rootfs.join(d)).unwrap().count();
        assert_eq!(n, 0, "/{d} is not empty in the tarball");
    }
    assert!(
        rootfs.join("usr/bin/passwd").metadata().unwrap().mode() & 0o4000 != 0,
        "setuid bit lost"
    );
    let shadow = rootfs.join("etc/shadow").metadata().unwrap();
    assert_eq!(shadow.gid(), 42, "shadow group kept by number");

    // copy_kernel: the image's own kernel and initrd, byte for byte.
    let boot: Vec<String> = std::fs::read_dir(rootfs.join("boot"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let kernel = boot
        .iter()
        .find(|n| n.starts_with("vmlinuz-"))
        .expect("a kernel in /boot");
    let version = kernel.trim_start_matches("vmlinuz-");
    let vmlinuz = std::fs::read(x.join("tarball.vmlinuz")).unwrap();
    assert_eq!(
        vmlinuz,
        std::fs::read(rootfs.join("boot").join(kernel)).unwrap()
    );
    assert_eq!(&vmlinuz[0x202..0x206], b"HdrS", "not a bzImage");
    let initrd = std::fs::read(x.join("tarball.initrd")).unwrap();
    assert_eq!(
        initrd,
        std::fs::read(rootfs.join(format!("boot/initrd.img-{version}"))).unwrap()
    );
    assert!(initrd.len() > 1 << 20, "initrd of {} bytes", initrd.len());
    assert_eq!(
        std::fs::read_to_string(x.join("tarball.packages"))
            .unwrap()
            .lines()
            .count(),
        installed.len()
    );
}

/// A spec of the smallest kind with extra lines, written to `dir`.
fn small_spec(dir: &Path, name: &str, extra: &str) -> PathBuf {
    let text = format!(
        "version: 1\nname: {name}\nsuite: bookworm\nmirror: host\npackages: [less]\nimages:\n  - {{mount: /, fs: ext4, size: 1GiB}}\n{extra}"
    );
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn failing_post_script_fails_the_build_and_can_keep_the_workspace() {
    if !can_build() {
        return;
    }
    let work = scratch("postfail");
    let out = work.path().join("out");
    let bdir = work.path().join("build");
    std::fs::create_dir_all(&bdir).unwrap();
    let spec = small_spec(
        work.path(),
        "postfail",
        "post:\n  - name: breaks\n    script: |\n      echo about to fail >&2\n      exit 3\n",
    );
    let run = build(&spec, &out, &bdir, &["--keep-on-failure"]);
    assert_eq!(run.code(), Some(1), "{}", run.stderr());
    let stderr = run.stderr();
    assert!(stderr.contains("post script breaks"), "{stderr}");
    assert!(stderr.contains("about to fail"), "{stderr}");
    assert!(stderr.contains("exit code 3"), "{stderr}");
    let kept: Vec<PathBuf> = std::fs::read_dir(&bdir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(kept.len(), 1, "one kept workspace: {kept:?}");
    let ws = &kept[0];
    assert!(
        stderr.contains(&format!("workspace is kept at {}", ws.display())),
        "{stderr}"
    );
    assert!(ws.join("postfail-root.img").is_file());
    assert!(ws.join(".debimg-kept").is_file());
    // Kept, yet nothing mounted, attached or running there.
    assert!(loops_backed_under(&bdir).is_empty());
    assert!(
        debimg::sys::mount::mount_points_under(&bdir)
            .unwrap()
            .is_empty()
    );
    assert!(processes_rooted_under(&bdir).is_empty());
    // The kept image holds the failed tree for inspection (read-only fsck: it is clean).
    fsck(&ws.join("postfail-root.img"), "ext4");
    // A later build in the same build directory leaves the kept workspace alone.
    let again = build(&spec, &out, &bdir, &[]);
    assert_eq!(again.code(), Some(1));
    assert!(
        ws.join("postfail-root.img").is_file(),
        "kept workspace removed"
    );
    assert!(
        !again.stderr().contains("workspace is kept"),
        "{}",
        again.stderr()
    );
    assert_eq!(std::fs::read_dir(&bdir).unwrap().count(), 1);
    debimg::sys::mount::remove_dir_all_safe(ws).unwrap();
    let names: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| !n.to_string_lossy().starts_with('.'))
        .collect();
    assert!(names.is_empty(), "a failed build published {names:?}");
}

#[test]
fn tmpfs_too_small_says_so() {
    if !can_build() {
        return;
    }
    let work = scratch("tmpfs");
    let out = work.path().join("out");
    let bdir = work.path().join("build");
    std::fs::create_dir_all(&bdir).unwrap();
    let spec = small_spec(work.path(), "tiny", "");
    let run = build(&spec, &out, &bdir, &["--tmpfs", "64MiB"]);
    assert_eq!(run.code(), Some(5), "{}", run.stderr());
    assert!(
        run.stderr()
            .contains("no space left in the --tmpfs workspace"),
        "{}",
        run.stderr()
    );
    assert_no_leftovers(&bdir, &out);
    let bad = debimg(&["build", spec.to_str().unwrap(), "--tmpfs", "1MiB"]);
    assert_eq!(bad.code(), Some(2), "{}", bad.stderr());
    assert!(bad.stderr().contains("too small"), "{}", bad.stderr());
}

#[test]
fn staged_api_example_runs_its_own_step() {
    if !can_build() {
        return;
    }
    let work = scratch("staged");
    let out = work.path().join("out");
    let spec = small_spec(work.path(), "staged", "");
    // Built by `cargo build --examples` (scripts/test does it first); `cargo test --all-targets`
    // builds examples only in test mode, under a hashed name.
    let exe = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples/staged");
    assert!(
        exe.is_file(),
        "{} missing: run `cargo build --examples` first (scripts/test does)",
        exe.display()
    );
    let output = Command::new(&exe)
        .arg(&spec)
        .arg(&out)
        .arg(TEST_CACHE)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let meta_path = out.join("staged.yaml");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        meta_path.to_str().unwrap()
    );
    let meta = Metadata::read(&meta_path).unwrap();
    let raws = check_outputs(&out, &meta, work.path());
    let tree = MountedTree::mount(&meta, &raws);
    assert_eq!(tree.read("/etc/motd"), "Built by the staged example.\n");
    assert_eq!(tree.read("/etc/staged-by"), "/\n");
    assert!(tree.path("/usr/bin/less").exists());
    assert!(std::fs::read_dir("/var/tmp").unwrap().flatten().all(|e| {
        !e.file_name()
            .to_string_lossy()
            .starts_with("debimg-staged-")
    }));
}

#[test]
fn fuel_agent_input_builds_what_fuel_agent_would() {
    if !can_build() {
        return;
    }
    let work = scratch("fuel");
    let out = work.path().join("out");
    let bdir = work.path().join("build");
    std::fs::create_dir_all(&bdir).unwrap();
    // The example input names an example mirror: point it at the host's.
    let sources = debimg::debian::mirror::read_host_sources(Path::new("/")).unwrap();
    let mirror = debimg::debian::mirror::resolve_host_uri(&sources, "bookworm").unwrap();
    let text = std::fs::read_to_string(repo().join("data/fuel/example.json"))
        .unwrap()
        .replace("http://mirror.example/debian", &mirror);
    let input = work.path().join("input.json");
    std::fs::write(&input, text).unwrap();
    let run = debimg(&[
        "build",
        "--fuel",
        input.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--build-dir",
        bdir.to_str().unwrap(),
        "--cache-dir",
        TEST_CACHE,
    ]);
    run.assert_ok("fuel build");
    assert_no_leftovers(&bdir, &out);
    // fuel-agent's file names and its metadata file, by its rules.
    let root = out.join("env_1_debian_bookworm_amd64.img.gz");
    let boot = out.join("env_1_debian_bookworm_amd64-boot.img.gz");
    let fuel_meta = out.join("env_1_debian_bookworm_amd64.yaml");
    for p in [&root, &boot, &fuel_meta] {
        assert!(
            p.is_file(),
            "{} missing; stdout:\n{}",
            p.display(),
            run.stdout()
        );
    }
    let yaml: serde_json::Value =
        serde_saphyr::from_str(&std::fs::read_to_string(&fuel_meta).unwrap()).unwrap();
    let images = yaml["images"].as_array().expect("images list");
    assert_eq!(images.len(), 2);
    for img in images {
        let name = img["container_name"].as_str().unwrap();
        let (md5, _) = sums(&out.join(name));
        assert_eq!(img["container_md5"].as_str().unwrap(), md5, "{name}");
        assert_eq!(
            img["container_size"].as_u64().unwrap(),
            std::fs::metadata(out.join(name)).unwrap().len()
        );
        assert_eq!(img["container"], "gzip");
    }
    assert!(yaml["packages"].is_array() || yaml["packages"].is_object());
    assert!(yaml["repos"].as_array().is_some_and(|r| !r.is_empty()));
    // The images are real: debimg's own metadata describes and checks them.
    let own = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(".debimg.yaml"))
        .expect("debimg's own metadata");
    let meta = Metadata::read(&own).unwrap();
    // As fuel-agent built: its repos unauthenticated (the input has no keys), each one said.
    let err = run.stderr();
    for r in &meta.repos {
        assert!(r.trusted, "repo `{}` is not marked unauthenticated", r.name);
        assert!(
            err.contains(&format!("repo `{}`", r.name))
                && err.contains("without a signature check"),
            "no warning for repo `{}`:\n{err}",
            r.name
        );
    }
    assert_eq!(meta.repos.len(), 2);
    let raws = check_outputs(&out, &meta, work.path());
    let tree = MountedTree::mount(&meta, &raws);
    let installed = dpkg_installed(&tree.read("/var/lib/dpkg/status"));
    assert!(installed.contains_key("openssh-server"));
    assert!(tree.read("/etc/fstab").contains(" /boot ext2 "));
}
