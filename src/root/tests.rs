use super::*;
use std::os::unix::fs::{MetadataExt, symlink};

/// A root inside a jail directory that also holds a victim file next to the root: whatever
/// escapes the root finds the victim.
struct Jail {
    dir: tempfile::TempDir,
}

impl Jail {
    fn new() -> Jail {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("root/etc")).unwrap();
        std::fs::create_dir_all(dir.path().join("host/etc")).unwrap();
        std::fs::write(dir.path().join("host/etc/shadow"), "root:secret-hash:::\n").unwrap();
        Jail { dir }
    }
    fn root_path(&self) -> PathBuf {
        self.dir.path().join("root")
    }
    fn root(&self) -> Root {
        Root::open(&self.root_path()).unwrap()
    }
    fn host(&self, rel: &str) -> PathBuf {
        self.dir.path().join("host").join(rel)
    }
    fn shadow(&self) -> String {
        std::fs::read_to_string(self.host("etc/shadow")).unwrap()
    }
}

#[test]
fn writes_replace_links_instead_of_following_them() {
    let j = Jail::new();
    let victim = j.host("etc/shadow");
    symlink(&victim, j.root_path().join("etc/hostname")).unwrap();
    let r = j.root();
    r.write("/etc/hostname", b"node1\n", 0o644, Owner::ROOT)
        .unwrap();
    assert_eq!(j.shadow(), "root:secret-hash:::\n");
    let md = std::fs::symlink_metadata(j.root_path().join("etc/hostname")).unwrap();
    assert!(md.is_file());
    assert_eq!(md.mode() & 0o7777, 0o644);
    assert_eq!(r.read_to_string("etc/hostname").unwrap(), "node1\n");
    // No temporary file is left next to it.
    let names: Vec<_> = r
        .read_dir("/etc")
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, [OsString::from("hostname")]);
}

#[test]
fn directories_through_links_stay_inside() {
    let j = Jail::new();
    // An absolute link to "/", one climbing far above the root, and one naming the host's
    // directory: the image has no such directory, so the link dangles inside the image.
    symlink("/", j.root_path().join("etc/x")).unwrap();
    symlink("../../../../../../host", j.root_path().join("etc/up")).unwrap();
    symlink(j.host("etc"), j.root_path().join("etc/abs-host")).unwrap();
    let r = j.root();
    r.write("/etc/x/etc/motd", b"hi", 0o644, Owner::ROOT)
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(j.root_path().join("etc/motd")).unwrap(),
        "hi"
    );
    for p in ["/etc/up/etc/shadow", "/etc/abs-host/shadow"] {
        let e = r.write(p, b"owned", 0o644, Owner::ROOT).unwrap_err();
        assert!(format!("{e:#}").contains("in the image"), "{e:#}");
    }
    assert_eq!(j.shadow(), "root:secret-hash:::\n");
    // Once the image holds what the links name, they lead there: `../..` stops at the root.
    std::fs::create_dir_all(j.root_path().join("host/etc")).unwrap();
    r.write("/etc/up/etc/shadow", b"owned", 0o644, Owner::ROOT)
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(j.root_path().join("host/etc/shadow")).unwrap(),
        "owned"
    );
    assert_eq!(j.shadow(), "root:secret-hash:::\n");
}

#[test]
fn reads_and_copies_out_never_reach_host_files() {
    let j = Jail::new();
    symlink(j.host("etc/shadow"), j.root_path().join("etc/machine-id")).unwrap();
    std::fs::create_dir_all(j.root_path().join("boot")).unwrap();
    symlink(
        "/../../host/etc/shadow",
        j.root_path().join("boot/vmlinuz-9"),
    )
    .unwrap();
    let r = j.root();
    assert!(
        r.read("/etc/machine-id").is_err(),
        "the link's target is not in the image"
    );
    assert!(!r.is_file("/etc/machine-id"));
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("k");
    let e = r.copy_out("/boot/vmlinuz-9", &dest).unwrap_err();
    assert!(format!("{e:#}").contains("not in the image"), "{e:#}");
    assert!(!dest.exists());
    // Once the image holds such a file, the copy is the image's, never the host's.
    std::fs::create_dir_all(j.root_path().join("host/etc")).unwrap();
    std::fs::write(j.root_path().join("host/etc/shadow"), "image's own").unwrap();
    r.copy_out("/boot/vmlinuz-9", &dest).unwrap();
    assert_eq!(std::fs::read_to_string(&dest).unwrap(), "image's own");
}

#[test]
fn special_files_are_refused_before_they_are_opened() {
    let j = Jail::new();
    nix::unistd::mkfifo(
        &j.root_path().join("etc/fifo"),
        Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    std::fs::create_dir_all(j.root_path().join("boot")).unwrap();
    symlink("/etc/fifo", j.root_path().join("boot/vmlinuz-1")).unwrap();
    let r = j.root();
    let out = tempfile::tempdir().unwrap();
    // A FIFO would block a plain open for ever; it is refused at once.
    let e = r
        .copy_out("/boot/vmlinuz-1", &out.path().join("k"))
        .unwrap_err();
    assert!(format!("{e:#}").contains("a FIFO"), "{e:#}");
    let e = r.read("/etc").unwrap_err();
    assert!(format!("{e:#}").contains("a directory"), "{e:#}");
}

#[test]
fn removing_a_link_leaves_its_target() {
    let j = Jail::new();
    symlink(
        j.host("etc/shadow"),
        j.root_path().join("etc/ssh_host_rsa_key"),
    )
    .unwrap();
    let r = j.root();
    assert!(r.remove_file("/etc/ssh_host_rsa_key").unwrap());
    assert!(!r.remove_file("/etc/ssh_host_rsa_key").unwrap());
    assert_eq!(j.shadow(), "root:secret-hash:::\n");
    // A directory linked from the image is listed as the image sees it.
    symlink(j.host("etc"), j.root_path().join("etc/ssh")).unwrap();
    assert!(r.read_dir("/etc/ssh").unwrap().is_empty());
    assert!(
        r.set_mode("/etc/ssh", 0o700).is_err(),
        "a link is not changed"
    );
}

#[test]
fn links_and_renames_stay_inside() {
    let j = Jail::new();
    let r = j.root();
    r.symlink("/usr/share/zoneinfo/UTC", "/etc/localtime")
        .unwrap();
    r.symlink("/usr/share/zoneinfo/Europe/Berlin", "/etc/localtime")
        .unwrap();
    assert_eq!(
        r.read_link("/etc/localtime").unwrap(),
        Path::new("/usr/share/zoneinfo/Europe/Berlin")
    );
    symlink(j.host("etc"), j.root_path().join("etc/out")).unwrap();
    r.write("/etc/resolv.conf", b"x", 0o644, Owner::ROOT)
        .unwrap();
    assert!(
        r.rename("/etc/resolv.conf", "/etc/out/resolv.conf")
            .is_err()
    );
    symlink("/etc/a", j.root_path().join("etc/in")).unwrap();
    r.create_dir_all("/etc/a").unwrap();
    r.rename("/etc/resolv.conf", "/etc/in/resolv.conf").unwrap();
    assert!(!j.host("etc/resolv.conf").exists());
    assert!(j.root_path().join("etc/a/resolv.conf").exists());
}

#[test]
fn owners_and_modes_are_set_on_the_file_itself() {
    if !nix::unistd::geteuid().is_root() {
        return;
    }
    let j = Jail::new();
    let r = j.root();
    r.write(
        "/usr/bin/tool",
        b"#!/bin/sh\n",
        0o4755,
        Owner { uid: 1234, gid: 50 },
    )
    .unwrap();
    let md = std::fs::metadata(j.root_path().join("usr/bin/tool")).unwrap();
    assert_eq!((md.mode() & 0o7777, md.uid(), md.gid()), (0o4755, 1234, 50));
    let d = std::fs::metadata(j.root_path().join("usr/bin")).unwrap();
    assert_eq!((d.mode() & 0o7777, d.uid()), (0o755, 0));
    r.create_dir_all("/home/a/.ssh").unwrap();
    r.set_owner("/home/a/.ssh", Owner { uid: 7, gid: 8 })
        .unwrap();
    r.set_mode("/home/a/.ssh", 0o700).unwrap();
    let d = std::fs::metadata(j.root_path().join("home/a/.ssh")).unwrap();
    assert_eq!((d.mode() & 0o7777, d.uid(), d.gid()), (0o700, 7, 8));
}

#[test]
fn mounts_go_where_the_descriptor_points() {
    if !nix::unistd::geteuid().is_root() {
        return;
    }
    let j = Jail::new();
    symlink(j.host("etc"), j.root_path().join("proc")).unwrap();
    std::fs::create_dir_all(j.root_path().join("sys")).unwrap();
    let (root_path, host_etc) = (j.root_path(), j.host("etc"));
    // In a forked child with a mount namespace of its own (the test runner has threads, so this
    // process cannot unshare): nothing it mounts reaches the host.
    match unsafe { nix::unistd::fork() }.unwrap() {
        nix::unistd::ForkResult::Child => {
            let code = (|| -> Result<i32> {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)?;
                nix::mount::mount(
                    None::<&str>,
                    "/",
                    None::<&str>,
                    MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                    None::<&str>,
                )?;
                let r = Root::open(&root_path)?;
                // /proc links out of the image to a directory it lacks: refused.
                if r.mount(
                    "debimg-test",
                    "/proc",
                    Some("tmpfs"),
                    MsFlags::empty(),
                    None,
                )
                .is_ok()
                {
                    return Ok(3);
                }
                let m = r.mount("debimg-test", "/sys", Some("tmpfs"), MsFlags::empty(), None)?;
                let points = mount::mount_points_under(&root_path)?;
                let host_points = mount::mount_points_under(&host_etc)?;
                m.close()?;
                Ok(
                    if points == [root_path.join("sys")] && host_points.is_empty() {
                        0
                    } else {
                        4
                    },
                )
            })()
            .unwrap_or_else(|e| {
                eprintln!("{e:#}");
                5
            });
            unsafe { libc::_exit(code) }
        }
        nix::unistd::ForkResult::Parent { child } => {
            let st = nix::sys::wait::waitpid(child, None).unwrap();
            assert_eq!(st, nix::sys::wait::WaitStatus::Exited(child, 0));
        }
    }
}

/// A small deterministic generator (xorshift), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[(self.next() % items.len() as u64) as usize]
    }
}

/// Every file under `dir` with its content, for before/after comparisons.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                out.push((e.path(), std::fs::read(e.path()).unwrap()));
            } else if t.is_symlink() {
                out.push((
                    e.path(),
                    std::fs::read_link(e.path())
                        .unwrap()
                        .into_os_string()
                        .into_encoded_bytes(),
                ));
            }
        }
    }
    out.sort();
    out
}

/// Property: whatever links a tree holds (absolute, relative, climbing, looping, pointing at
/// the host), whatever path is asked for, no operation of [`Root`] reads, writes, removes or
/// copies anything outside the root.
#[test]
fn no_operation_ever_leaves_the_root() {
    let names = ["a", "b", "etc", "tmp", "x", "..", "."];
    let targets = [
        "/",
        "..",
        "../..",
        "../../../host",
        "/etc",
        "a",
        "b/a",
        "/tmp/x",
        "../b",
        "x/../..",
        "loop",
        "/loop",
        "HOST",
    ];
    for seed in 1..=60u64 {
        let j = Jail::new();
        let root = j.root_path();
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        for d in ["a", "b", "tmp", "etc/a"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        // Random links, some straight at the host directory.
        for _ in 0..12 {
            let dir = rng.pick(&["", "a", "b", "tmp", "etc", "etc/a"]);
            let name = format!("l{}", rng.next() % 6);
            let target = match rng.pick(&targets) {
                "HOST" => j.host("etc").display().to_string(),
                t => t.to_string(),
            };
            let _ = symlink(&target, root.join(dir).join(name));
        }
        let host_before = snapshot(&j.dir.path().join("host"));
        let r = j.root();
        let out = tempfile::tempdir().unwrap();
        for i in 0..40 {
            let depth = 1 + rng.next() % 4;
            let mut p = String::new();
            for _ in 0..depth {
                p.push('/');
                if rng.next().is_multiple_of(3) {
                    p.push_str(&format!("l{}", rng.next() % 6));
                } else {
                    p.push_str(rng.pick(&names));
                }
            }
            p.push_str(&format!("/f{}", rng.next() % 3));
            let _ = match rng.next() % 6 {
                0 => r.write(&p, b"data", 0o644, Owner::ROOT).map(drop),
                1 => r.remove_file(&p).map(drop),
                2 => r.copy_out(&p, &out.path().join(format!("c{i}"))).map(drop),
                3 => r.symlink("/", &p).map(drop),
                4 => r.rename(&p, "/moved").map(drop),
                _ => r.read(&p).map(drop),
            };
        }
        assert_eq!(
            snapshot(&j.dir.path().join("host")),
            host_before,
            "seed {seed}: a host file changed"
        );
        for (path, content) in snapshot(out.path()) {
            assert_ne!(
                content,
                b"root:secret-hash:::\n",
                "seed {seed}: {} holds a host file",
                path.display()
            );
        }
    }
}

#[test]
fn clamp_times_sets_the_tree_s_own_times_and_follows_no_link() {
    use std::os::unix::fs::MetadataExt;
    let j = Jail::new();
    let epoch = 1_700_000_000;
    let victim = j.host("etc/shadow");
    std::fs::create_dir_all(j.root_path().join("usr/share")).unwrap();
    std::fs::write(j.root_path().join("usr/share/new"), "made by the build").unwrap();
    std::fs::write(j.root_path().join("usr/share/old"), "from a package").unwrap();
    let old = nix::sys::time::TimeSpec::new(1_600_000_000, 0);
    let later = nix::sys::time::TimeSpec::new(1_650_000_000, 0);
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        &j.root_path().join("usr/share/old"),
        &later,
        &old,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .unwrap();
    symlink(&victim, j.root_path().join("etc/shadow")).unwrap();
    let victim_before = std::fs::metadata(&victim).unwrap().mtime();
    let changed = j.root().clamp_times(epoch).unwrap();
    assert!(changed >= 5, "{changed}");
    let md = |rel: &str| std::fs::symlink_metadata(j.root_path().join(rel)).unwrap();
    for rel in ["", "etc", "usr", "usr/share", "usr/share/new", "etc/shadow"] {
        let m = md(rel);
        assert_eq!((m.mtime(), m.atime()), (epoch, epoch), "/{rel}");
    }
    // Older than the epoch: kept; its access time follows it.
    let m = md("usr/share/old");
    assert_eq!((m.mtime(), m.atime()), (1_600_000_000, 1_600_000_000));
    // The link's target on the host is untouched.
    assert_eq!(std::fs::metadata(&victim).unwrap().mtime(), victim_before);
    assert_ne!(victim_before, epoch);
    // A second time gives the same times (a listing may have set an access time in between).
    j.root().clamp_times(epoch).unwrap();
    for rel in ["", "etc", "usr", "usr/share", "usr/share/new", "etc/shadow"] {
        let m = md(rel);
        assert_eq!((m.mtime(), m.atime()), (epoch, epoch), "/{rel} again");
    }
}
