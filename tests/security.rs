//! Data never reaches the host: real builds with a package, made here with dpkg-deb, that ships
//! symlinks pointing at host files; a post script that leaves a process holding its output.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use common::*;

/// A host file the build must not touch: its content and modification time, checked later.
struct Victim {
    path: PathBuf,
    content: Vec<u8>,
    mtime: i64,
}

impl Victim {
    fn new(path: PathBuf, content: &str) -> Victim {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, content).unwrap();
        let mtime = std::fs::metadata(&path).unwrap().mtime();
        Victim {
            path,
            content: content.as_bytes().to_vec(),
            mtime,
        }
    }

    fn assert_untouched(&self) {
        let md = std::fs::symlink_metadata(&self.path)
            .unwrap_or_else(|e| panic!("{} is gone: {e}", self.path.display()));
        assert!(md.is_file(), "{} changed type", self.path.display());
        assert_eq!(
            std::fs::read(&self.path).unwrap(),
            self.content,
            "{} was written",
            self.path.display()
        );
        assert_eq!(
            md.mtime(),
            self.mtime,
            "{} was touched",
            self.path.display()
        );
    }
}

/// Every regular file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                out.push(e.path());
            }
        }
    }
    out
}

/// Post scripts that leave a process holding their stderr, in the chroot and on the host: once
/// they hung the build for ever.
const LEAVES_CHROOT: &str =
    "  - name: leaves-a-daemon\n    script: |\n      setsid sleep 86401 >&2 &\n      echo started";
const LEAVES_HOST: &str = "  - name: leaves-a-host-process\n    chroot: false\n    script: |\n      setsid sleep 86402 >&2 &\n      echo started";

/// Runs a build, killing it (and failing) if it takes longer than `limit`: a hang must fail
/// the test, not stall the suite.
fn build_within(spec: &Path, out: &Path, bdir: &Path, limit: std::time::Duration) -> Run {
    let t = std::time::Instant::now();
    let mut child = build_command(spec, out, bdir, &["-q"])
        .env("DEBIMG_TEST_CALLER_SECRET", "HOST-SECRET-debimg-7f3a")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = std::io::Read::read_to_end(&mut { stderr }, &mut s);
        s
    });
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            panic!("the build did not end within {limit:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let mut output = child.wait_with_output().unwrap();
    output.stderr = reader.join().unwrap();
    Run {
        output,
        elapsed: t.elapsed(),
    }
}

/// Processes whose command line has `arg` as an argument.
fn processes_with_arg(arg: &str) -> Vec<i32> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(cmdline) = std::fs::read(e.path().join("cmdline"))
            && cmdline.split(|b| *b == 0).any(|a| a == arg.as_bytes())
        {
            found.push(pid);
        }
    }
    found
}

#[test]
fn a_package_shipping_links_to_host_files_never_reaches_them() {
    if !can_build() {
        return;
    }
    let work = scratch("hostile");
    // The host side: files and directories a link in the package names by absolute path.
    let host = work.path().join("host");
    const SECRET: &str = "HOST-SECRET-debimg-7f3a";
    let hostname = Victim::new(host.join("hostname"), "host's hostname\n");
    let machine_id = Victim::new(host.join("machine-id"), "host machine id 0123456789\n");
    let ssh_key = Victim::new(host.join("ssh/ssh_host_ed25519_key"), SECRET);
    let ssh_pub = Victim::new(host.join("ssh/ssh_host_ed25519_key.pub"), SECRET);
    let kernel = Victim::new(host.join("boot/secret-kernel"), SECRET);
    let initrd = Victim::new(host.join("boot/secret-initrd"), SECRET);
    let copyright = Victim::new(host.join("copyright"), SECRET);
    let host_tmp = host.join("tmp");
    std::fs::create_dir_all(&host_tmp).unwrap();
    let h = |p: &str| host.join(p).display().to_string();
    let (hn, mi, ssh, k, i, cr, tmp) = (
        h("hostname"),
        h("machine-id"),
        h("ssh"),
        h("boot/secret-kernel"),
        h("boot/secret-initrd"),
        h("copyright"),
        h("tmp"),
    );
    // Where the kernel and initrd links point, the image has files of its own: a copy out
    // must be the image's file, never the host's.
    let in_image_kernel = format!("{}", host.join("boot/secret-kernel").display());
    let in_image_initrd = format!("{}", host.join("boot/secret-initrd").display());
    let deb = build_deb(
        work.path(),
        "debimg-hostile",
        "1.0",
        "",
        &[
            DebEntry::Symlink("/etc/hostname", &hn),
            DebEntry::Symlink("/etc/machine-id", &mi),
            DebEntry::Symlink("/etc/ssh", &ssh),
            DebEntry::Symlink("/boot/vmlinuz-9.9.9-hostile", &k),
            DebEntry::Symlink("/boot/initrd.img-9.9.9-hostile", &i),
            DebEntry::File(&in_image_kernel, b"the image's own kernel\n", 0o644),
            DebEntry::File(&in_image_initrd, b"the image's own initrd\n", 0o644),
            DebEntry::Symlink("/usr/share/doc/debimg-hostile/copyright", &cr),
            DebEntry::Symlink("/tmp", &tmp),
        ],
    );
    let spec = work.path().join("hostile.yaml");
    std::fs::write(
        &spec,
        format!(
            "version: 1\nname: hostile\nsuite: bookworm\nmirror: host\nkind: tarball\n\
             hostname: hostile-test\nlocal_debs: [{}]\nrecords: [packages, files, licenses]\n\
             copy_kernel: true\npost:\n  - name: writes-tmp\n    script: |\n      echo in-chroot > /tmp/debimg-post-marker\n\
             \x20 - name: reads-environ\n    script: |\n      \
             for f in /proc/[0-9]*/environ; do echo \"== $f\"; tr '\\0' '\\n' < \"$f\"; done > /var/tmp/environ-dump\n      \
             env >> /var/tmp/environ-dump\n\
             {LEAVES_CHROOT}\n{LEAVES_HOST}",
            deb.display()
        ),
    )
    .unwrap();
    let out = work.path().join("out");
    let bdir = work.path().join("build");
    std::fs::create_dir_all(&bdir).unwrap();
    // The environment of whoever runs the build holds the secret too (a token, a cloud key):
    // a post script that prints every environment it can see, /proc/1/environ first, must not
    // find it.
    let run = build_within(&spec, &out, &bdir, std::time::Duration::from_secs(900));
    run.assert_ok("the hostile build");
    assert_no_leftovers(&bdir, &out);
    // The scripts that left a process holding their output did not hang the build, and
    // nothing of them outlives it.
    assert!(
        run.stderr()
            .contains("left running in the chroot by post script leaves-a-daemon"),
        "{}",
        run.stderr()
    );
    for marker in ["86401", "86402"] {
        let left = processes_with_arg(marker);
        assert!(left.is_empty(), "sleep {marker} still runs: {left:?}");
    }

    for v in [
        &hostname,
        &machine_id,
        &ssh_key,
        &ssh_pub,
        &kernel,
        &initrd,
        &copyright,
    ] {
        v.assert_untouched();
    }
    assert_eq!(
        std::fs::read_dir(&host_tmp).unwrap().count(),
        0,
        "the post script wrote onto the host"
    );

    // No host byte in any output: the records, kernel, initrd and every file of the tree.
    for f in files_under(&out) {
        let bytes = std::fs::read(&f).unwrap();
        assert!(
            !contains_bytes(&bytes, SECRET.as_bytes()),
            "{} holds a host secret",
            f.display()
        );
    }
    assert_eq!(
        std::fs::read_to_string(out.join("hostile.vmlinuz")).unwrap(),
        "the image's own kernel\n"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("hostile.initrd")).unwrap(),
        "the image's own initrd\n"
    );
    let licenses = std::fs::read_to_string(out.join("hostile.licenses")).unwrap();
    assert!(
        licenses.contains("debimg-hostile: unknown (no copyright file)"),
        "{licenses}"
    );
    let tree = work.path().join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    tool(
        "tar",
        &[
            "-xzf",
            out.join("hostile.tar.gz").to_str().unwrap(),
            "-C",
            tree.to_str().unwrap(),
        ],
    );
    for f in files_under(&tree) {
        let bytes = std::fs::read(&f).unwrap();
        assert!(
            !contains_bytes(&bytes, SECRET.as_bytes()),
            "{} holds a host secret",
            f.display()
        );
    }
    let dump = std::fs::read_to_string(tree.join("var/tmp/environ-dump")).unwrap();
    let seen = dump.lines().filter(|l| l.starts_with("== /proc/")).count();
    assert!(
        dump.contains("== /proc/1/environ") && seen >= 3 && dump.contains("PATH="),
        "the post script saw no processes' environments:\n{dump}"
    );
    assert!(
        !dump.contains(SECRET),
        "a build's environment holds the secret:\n{dump}"
    );
    // The links the package shipped were replaced where debimg writes, never written through.
    let md = std::fs::symlink_metadata(tree.join("etc/hostname")).unwrap();
    assert!(md.is_file());
    assert_eq!(
        std::fs::read_to_string(tree.join("etc/hostname")).unwrap(),
        "hostile-test\n"
    );
    let md = std::fs::symlink_metadata(tree.join("etc/machine-id")).unwrap();
    assert!(md.is_file() && md.len() == 0, "machine-id: {md:?}");
    // dpkg keeps an existing directory where a package ships a link: /tmp stays the image's.
    assert!(
        std::fs::symlink_metadata(tree.join("tmp"))
            .unwrap()
            .is_dir()
    );
}

#[test]
fn a_cache_other_users_can_write_is_refused_before_anything_is_made() {
    if !can_build() {
        return;
    }
    let work = scratch("foreign-cache");
    let cache = work.path().join("cache");
    for part in ["packages", "bases", "lists"] {
        std::fs::create_dir_all(cache.join(part)).unwrap();
    }
    let planted = Victim::new(cache.join("packages/less_1_amd64.deb"), "planted");
    std::fs::set_permissions(&cache, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let out = work.path().join("out");
    let bdir = work.path().join("build");
    std::fs::create_dir_all(&bdir).unwrap();
    let run = build(
        &example("minimal.yaml"),
        &out,
        &bdir,
        &["--cache-dir", cache.to_str().unwrap()],
    );
    assert_eq!(run.code(), Some(6), "{}", run.stderr());
    assert!(
        run.stderr().contains("writable by others") && run.stderr().contains("chmod go-w"),
        "{}",
        run.stderr()
    );
    assert_no_leftovers(&bdir, &out);
    planted.assert_untouched();
}
