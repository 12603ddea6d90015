//! `debimg build --vm`: the whole build inside a throwaway qemu machine. Real builds from the
//! host's mirror, under software emulation on this project's hosts (their KVM hangs).
//!
//! Every test here builds in a machine; host builds happen only before a [`LoopWatch`] starts,
//! and the watch asserts that no loop device backed by a file of the test's own, or of the
//! shared cache, was attached on this host while the machine ran (other test files build on
//! this host side by side).

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use debimg::metadata::Metadata;
use debimg::sys::loopdev;
use debimg::sys::mount;
use nix::mount::MsFlags;
use nix::sys::signal::Signal;

/// Holds the lock the tests of this file (processes of their own) take to build the
/// appliance one at a time.
fn appliance_lock() -> nix::fcntl::Flock<std::fs::File> {
    use nix::fcntl::{Flock, FlockArg};
    std::fs::create_dir_all(TEST_CACHE).unwrap();
    let f = std::fs::File::create(Path::new(TEST_CACHE).join("vm-appliance.lock")).unwrap();
    Flock::lock(f, FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("locking the appliance")
}

/// Builds the appliance, a host build, before any watch starts (once per cache: `vm-image`
/// reuses it while it matches this debimg and its spec).
fn ensure_appliance() {
    let _lock = appliance_lock();
    debimg(&["vm-image", "-q", "--cache-dir", TEST_CACHE]).assert_ok("vm-image");
}

/// Polls the host's loop devices every 100 ms and keeps every one it sees backed by a file
/// under the test's own directory or the shared cache (what a build of that test, or of the
/// appliance, would attach): the tests of other files attach theirs side by side.
struct LoopWatch {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<String>>>,
    polls: Arc<Mutex<u64>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LoopWatch {
    /// Watches the loop devices backed by files under `own` (and the test cache).
    fn start(own: &[&Path]) -> LoopWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let polls = Arc::new(Mutex::new(0));
        let thread = {
            let (stop, seen, polls) = (stop.clone(), seen.clone(), polls.clone());
            let mut own: Vec<_> = own.iter().map(|p| p.to_path_buf()).collect();
            own.push(TEST_CACHE.into());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let now: Vec<String> = own.iter().flat_map(|d| loops_backed_under(d)).collect();
                    let mut s = seen.lock().unwrap();
                    for l in now {
                        if !s.contains(&l) {
                            s.push(l);
                        }
                    }
                    *polls.lock().unwrap() += 1;
                    drop(s);
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        };
        LoopWatch {
            stop,
            seen,
            polls,
            thread: Some(thread),
        }
    }

    /// Stops watching; returns how often it looked and what it saw.
    fn finish(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap();
        let polls = *self.polls.lock().unwrap();
        (polls, self.seen.lock().unwrap().clone())
    }
}

/// Every entry below `root` with what identifies its content: type, mode, owner and the
/// sha256 of a file, the target of a link, the numbers of a device.
fn tree(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let ft = m.file_type();
            let what = if ft.is_symlink() {
                format!("l {}", std::fs::read_link(&p).unwrap().display())
            } else if ft.is_dir() {
                stack.push(p.clone());
                "d".to_string()
            } else if ft.is_file() {
                format!("f {}", sums(&p).1)
            } else if ft.is_block_device() || ft.is_char_device() {
                format!("c {}", m.rdev())
            } else {
                "o".to_string()
            };
            out.insert(
                rel,
                format!(
                    "{what} {:o} {}:{}",
                    m.permissions().mode() & 0o7777,
                    m.uid(),
                    m.gid()
                ),
            );
        }
    }
    out
}

/// Files whose content differs between any two builds of one spec (logs, caches keyed by
/// time): the only differences allowed between a host build and a machine's.
fn varies_per_build(path: &str) -> bool {
    path.starts_with("var/log/")
        || path.starts_with("var/cache/debconf/")
        || path.starts_with("var/lib/dpkg/")
            && (path.ends_with("-old") || path.starts_with("var/lib/dpkg/triggers"))
        || path == "var/cache/ldconfig/aux-cache"
        // update-initramfs's cpio carries the build's times.
        || path.starts_with("boot/initrd.img-")
        || path == "etc/shadow"
        || path == "etc/shadow-"
        || path == "etc/gshadow-"
        || path == "var/lib/systemd/deb-systemd-helper-enabled/ssh.service.dsh-also"
        || path.starts_with("var/lib/apt/")
        || path.starts_with("var/lib/ucf/")
}

/// The kernel modules in a gzipped initramfs (what initramfs-tools makes when zstd is not
/// installed): the names of the `.ko` files of its newc cpio archive.
fn initrd_modules(initrd: &Path) -> Vec<String> {
    let out = std::process::Command::new("gunzip")
        .arg("-c")
        .arg(initrd)
        .output()
        .unwrap();
    assert!(out.status.success(), "{} is not gzipped", initrd.display());
    let (data, mut at, mut names) = (out.stdout, 0usize, Vec::new());
    let field = |h: &[u8], i: usize| {
        usize::from_str_radix(std::str::from_utf8(&h[6 + 8 * i..14 + 8 * i]).unwrap(), 16).unwrap()
    };
    let pad = |n: usize| (n + 3) & !3;
    loop {
        let h = &data[at..at + 110];
        assert_eq!(&h[..6], b"070701", "not a newc cpio at byte {at}");
        let (size, namesize) = (field(h, 6), field(h, 11));
        let name = String::from_utf8_lossy(&data[at + 110..at + 110 + namesize - 1]).into_owned();
        if name == "TRAILER!!!" {
            return names;
        }
        if name.ends_with(".ko") {
            names.push(name.rsplit('/').next().unwrap().to_string());
        }
        at = pad(at + 110 + namesize) + pad(size);
    }
}

/// Files that name the filesystems by their UUIDs (each build's own): compared with every UUID
/// masked.
const NAMES_UUIDS: &[&str] = &["etc/fstab", "boot/grub/grub.cfg"];

/// `text` with every UUID (`8-4-4-4-12` hex digits, or a FAT serial `XXXX-XXXX`) as `UUID`,
/// also inside a longer word (grub's menu entry ids: `gnulinux-simple-<uuid>`), but not inside a
/// longer run of hex digits.
fn mask_uuids(text: &str) -> String {
    let b = text.as_bytes();
    let hex = |i: usize| b.get(i).is_some_and(u8::is_ascii_hexdigit);
    // The length of `groups` of hex digits joined by dashes at `at`, bounded by no hex digit
    // (nor, for a short pattern, a dash) on either side.
    let fits = |at: usize, groups: &[usize], no_dash_around: bool| -> Option<usize> {
        let mut i = at;
        for (n, &g) in groups.iter().enumerate() {
            if n > 0 {
                if b.get(i) != Some(&b'-') {
                    return None;
                }
                i += 1;
            }
            for _ in 0..g {
                if !hex(i) {
                    return None;
                }
                i += 1;
            }
        }
        let dash = |j: usize| no_dash_around && b.get(j) == Some(&b'-');
        let before_ok = at == 0 || !(hex(at - 1) || dash(at - 1));
        let after_ok = !(hex(i) || dash(i));
        (before_ok && after_ok).then_some(i - at)
    };
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match fits(i, &[8, 4, 4, 4, 12], false).or_else(|| fits(i, &[4, 4], true)) {
            Some(n) => {
                out.extend_from_slice(b"UUID");
                i += n;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    // Only ASCII was replaced.
    String::from_utf8(out).unwrap()
}

/// Differences between two trees, except those [`varies_per_build`] allows; the files of
/// [`NAMES_UUIDS`] compared with their UUIDs masked.
fn tree_differences(a: &Path, b: &Path) -> Vec<String> {
    let (ta, tb) = (tree(a), tree(b));
    let mut out = Vec::new();
    for k in ta
        .keys()
        .chain(tb.keys())
        .collect::<std::collections::BTreeSet<_>>()
    {
        if NAMES_UUIDS.contains(&k.as_str()) {
            let read = |root: &Path| {
                std::fs::read_to_string(root.join(k))
                    .map(|t| mask_uuids(&t))
                    .ok()
            };
            let (ra, rb) = (read(a), read(b));
            if ra != rb {
                let (ra, rb) = (ra.unwrap_or_default(), rb.unwrap_or_default());
                let first = ra.lines().zip(rb.lines()).find(|(x, y)| x != y);
                out.push(format!("{k}: differs beyond its UUIDs, first {first:?}"));
            }
            continue;
        }
        if ta.get(k) != tb.get(k) && !varies_per_build(k) {
            out.push(format!("{k}: host {:?}, vm {:?}", ta.get(k), tb.get(k)));
        }
    }
    out
}

#[test]
fn uuids_are_masked_and_nothing_else() {
    assert_eq!(
        mask_uuids("UUID=0b1c2d3e-aaaa-bbbb-cccc-0123456789ab / ext4 x\nUUID=AB12-CD34 /boot/efi"),
        "UUID=UUID / ext4 x\nUUID=UUID /boot/efi"
    );
    assert_eq!(
        mask_uuids("deadbeef cafe-babe-1 a-b"),
        "deadbeef cafe-babe-1 a-b"
    );
    // Inside grub's menu entry ids, after a word ending in hex letters too.
    assert_eq!(
        mask_uuids(
            "'gnulinux-simple-0474e57e-89a2-4070-8dd3-f1195d88f5bc' \
             'gnulinux-advanced-0474e57e-89a2-4070-8dd3-f1195d88f5bc' root=UUID=AB12-CD34 ü"
        ),
        "'gnulinux-simple-UUID' 'gnulinux-advanced-UUID' root=UUID=UUID ü"
    );
    // Not a part of a longer run of hex digits or dashes.
    assert_eq!(
        mask_uuids("a0474e57e-89a2-4070-8dd3-f1195d88f5bc 12345-6789 1234-5678-9abc"),
        "a0474e57e-89a2-4070-8dd3-f1195d88f5bc 12345-6789 1234-5678-9abc"
    );
}

/// A build in a machine under emulation with one virtual CPU: on a busy host a second one costs
/// a third more CPU and time (docs/benchmarks.md).
fn vm_build(spec: &Path, out: &Path, build_dir: &Path, extra: &[&str]) -> Run {
    let mut args = vec!["--vm", "--vm-accel", "tcg", "--vm-cpus", "1"];
    args.extend_from_slice(extra);
    build(spec, out, build_dir, &args)
}

/// qemu processes started for builds in `build_dir` (their TMPDIR).
fn machines_of(build_dir: &Path) -> Vec<i32> {
    let want = format!("TMPDIR={}", build_dir.display());
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(env) = std::fs::read(e.path().join("environ")) else {
            continue;
        };
        if env.split(|&b| b == 0).any(|v| v == want.as_bytes()) {
            out.push(pid);
        }
    }
    out
}

/// Nothing of a machine left: no qemu, no file in its build directory, nothing partial in the
/// output directory.
fn assert_machine_gone(build_dir: &Path, out: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !machines_of(build_dir).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        machines_of(build_dir),
        Vec::<i32>::new(),
        "qemu left running"
    );
    let left: Vec<_> = std::fs::read_dir(build_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "left in the build directory: {left:?}");
    if out.exists() {
        let files: Vec<_> = std::fs::read_dir(out)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != ".debimg.lock")
            .collect();
        assert!(files.is_empty(), "left in the output directory: {files:?}");
    }
}

#[test]
fn machine_builds_equal_host_builds_and_attach_nothing_here() {
    if !can_build() {
        return;
    }
    let work = scratch("vm-equal");
    let w = work.path();
    let disk = w.join("vmdisk.yaml");
    std::fs::write(
        &disk,
        DISK.replace(
            "HELLO_DEB",
            example("debs/debimg-hello_1.0_all.deb").to_str().unwrap(),
        )
        .replace("MOTD_FILE", example("files/motd").to_str().unwrap()),
    )
    .unwrap();
    ensure_appliance();
    let host_disk = w.join("host-disk-out");
    let host_disk_b = w.join("host-disk-build");
    std::fs::create_dir_all(&host_disk_b).unwrap();
    let vm_disk = w.join("vm-disk-out");
    let vm_disk_b = w.join("vm-disk-build");
    std::fs::create_dir_all(&vm_disk_b).unwrap();
    // The reference built on the host beside the machine's build (its I/O beside the machine's
    // CPU). The machine attaches no loop device: none backed by its files or the cache's
    // (the host build's are its own, under host-disk-build).
    let (host, rc, polls, seen) = std::thread::scope(|s| {
        let host = s.spawn(|| build(&disk, &host_disk, &host_disk_b, &["-q"]));
        let watch = LoopWatch::start(&[&vm_disk_b, &vm_disk]);
        let rc = vm_build(&disk, &vm_disk, &vm_disk_b, &[]);
        let (polls, seen) = watch.finish();
        (host.join().unwrap(), rc, polls, seen)
    });
    host.assert_ok("host build of the disk");
    rc.assert_ok("the disk in a machine");
    assert!(polls > 100, "the watch looked only {polls} times");
    assert_eq!(
        seen,
        Vec::<String>::new(),
        "loop devices attached on the host while the machine built"
    );
    let err = rc.stderr();
    assert!(
        err.contains("starting the build machine (software emulation"),
        "{err}"
    );
    // The guest's log arrives here, stage by stage, and the cache was shared.
    assert!(err.contains("stage install: done in"), "{err}");
    assert!(err.contains("base tree from the cache"), "{err}");
    // The machine installs for real (no tree cache there): the kernel's initramfs is made once,
    // with the image's files, not at the kernel's configure and again at the trigger.
    assert_eq!(
        err.matches("made once, with the image's files").count(),
        1,
        "{err}"
    );
    assert!(rc.stdout().contains("vmdisk.qcow2"), "{}", rc.stdout());
    assert_machine_gone(&vm_disk_b, Path::new("/nonexistent"));

    // The disk: the same packages; every format checks out; the root is fsck-clean and holds
    // the host build's files, file by file; the disk boots.
    let hc = Metadata::read(&host_disk.join("vmdisk.yaml")).unwrap();
    let vc = Metadata::read(&vm_disk.join("vmdisk.yaml")).unwrap();
    assert_eq!(vc.spec_digest, hc.spec_digest);
    assert_eq!(vc.installed, hc.installed);
    assert_eq!(vc.packages, hc.packages);
    assert_eq!(vc.images.len(), 2, "{:?}", vc.images);
    for img in &vc.images {
        let p = vm_disk.join(&img.container_name);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), img.container_size);
        assert_eq!(sums(&p).1, img.container_sha256, "{}", img.container_name);
    }
    tool(
        "qemu-img",
        &["check", vm_disk.join("vmdisk.qcow2").to_str().unwrap()],
    );
    {
        let hd = loopdev::attach_partitioned(&host_disk.join("vmdisk.img")).unwrap();
        let vd = loopdev::attach_partitioned(&vm_disk.join("vmdisk.img")).unwrap();
        let (hr, vr) = (hd.partition(3).unwrap(), vd.partition(3).unwrap());
        tool("e2fsck", &["-fn", vr.to_str().unwrap()]);
        let (hmnt, vmnt) = (scratch("vm-host-root"), scratch("vm-vm-root"));
        let ro = MsFlags::MS_RDONLY;
        private_mounts();
        let m1 = mount::mount(hr.to_str().unwrap(), hmnt.path(), Some("ext4"), ro, None).unwrap();
        let m2 = mount::mount(vr.to_str().unwrap(), vmnt.path(), Some("ext4"), ro, None).unwrap();
        let diff = tree_differences(hmnt.path(), vmnt.path());
        let status = |m: &Path| {
            dpkg_installed(&std::fs::read_to_string(m.join("var/lib/dpkg/status")).unwrap())
        };
        let (hs, vs) = (status(hmnt.path()), status(vmnt.path()));
        let kernel = std::fs::read_dir(vmnt.path().join("boot"))
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("vmlinuz-"));
        // The initramfs was made from the spec's files: the modules it lists (and what they
        // need), not the generator's default of every storage driver (190 modules).
        let modules = |m: &Path| {
            let mut all = Vec::new();
            for e in std::fs::read_dir(m.join("boot")).unwrap().flatten() {
                if e.file_name().to_string_lossy().starts_with("initrd.img-") {
                    all.extend(initrd_modules(&e.path()));
                }
            }
            all.sort();
            all
        };
        let (hmods, vmods) = (modules(hmnt.path()), modules(vmnt.path()));
        // What the spec names on this host went into the machine's disk: its file and its
        // local package.
        let motd = std::fs::read(vmnt.path().join("etc/motd"));
        let hello = vmnt
            .path()
            .join("usr/share/debimg-hello/hello.txt")
            .is_file();
        m2.close().unwrap();
        m1.close().unwrap();
        vd.close().unwrap();
        hd.close().unwrap();
        assert!(kernel, "no kernel in the machine-built disk's /boot");
        assert_eq!(
            motd.unwrap(),
            std::fs::read(example("files/motd")).unwrap(),
            "the host's file in the machine-built disk"
        );
        assert!(hello, "the local package is not in the machine-built disk");
        assert!(vs.contains_key("debimg-hello"), "{vs:?}");
        assert!(vmods.contains(&"virtio_blk.ko".to_string()), "{vmods:?}");
        assert!(
            vmods.len() < 20,
            "the initramfs ignored its files: {vmods:?}"
        );
        assert_eq!(vmods, hmods, "the initramfs modules differ");
        assert!(vs.contains_key("linux-image-cloud-amd64"), "{vs:?}");
        assert_eq!(vs, hs, "the dpkg status differs");
        assert!(
            diff.is_empty(),
            "the disks' roots differ:\n{}",
            diff.join("\n")
        );
    }
    let boot = debimg(&[
        "boot-test",
        vm_disk.join("vmdisk.qcow2").to_str().unwrap(),
        "--expect",
        "DEBIMG-BOOT-OK",
        "--accel",
        "tcg",
        "--cpus",
        "1",
    ]);
    boot.assert_ok("boot of the machine-built disk");
    assert!(
        boot.stdout().contains("DEBIMG-BOOT-OK init=1"),
        "{}",
        boot.stdout()
    );
    // Reused like any output: nothing starts.
    let again = vm_build(&disk, &vm_disk, &vm_disk_b, &[]);
    again.assert_ok("reuse");
    assert!(again.stderr().contains("reused"), "{}", again.stderr());
    assert!(!again.stderr().contains("starting the build machine"));
}

/// The smallest disk that shows a machine build equal to a host build file by file and boots:
/// GRUB for both firmwares, a kernel and an initramfs of the modules that find the root on a
/// virtio disk (its configuration given as `files`, which the initramfs is made from), no init
/// system (its own `init=` prints the marker and stops the machine), raw and qcow2. A file and a
/// local package of this host's go in, placed in the machine at the paths the spec names here.
const DISK: &str = r#"version: 1
name: vmdisk
suite: bookworm
variant: minbase
mirror: host
kind: disk
packages: [linux-image-cloud-amd64]
hostname: vmdisk
root_password_hash: "!"
local_debs: [HELLO_DEB]
disk:
  size: 1GiB
  table: gpt
  boot: [bios, uefi]
  formats: [raw, qcow2]
  cmdline: "console=ttyS0,115200n8 init=/usr/local/sbin/boot-report"
  partitions:
    - {size: 1MiB, flags: [bios-boot]}
    - {size: 64MiB, flags: [esp], label: ESP}
    - {mount: /, fs: ext4, label: root}
files:
  - {source: MOTD_FILE, dest: /etc/motd}
  - {dest: /etc/initramfs-tools/conf.d/modules.conf, content: "MODULES=list\n"}
  - {dest: /etc/initramfs-tools/modules, content: "virtio_pci\nvirtio_blk\n"}
  - dest: /usr/local/sbin/boot-report
    mode: "0755"
    content: |
      #!/bin/sh
      echo "DEBIMG-BOOT-OK init=$$"
      echo o > /proc/sysrq-trigger 2>/dev/null
      exec sleep 600
"#;

/// The host's first disk in `/proc/partitions`: its major and minor numbers, and its first
/// sector when even root may open it here (not under a container's device policy).
fn host_disk() -> (String, String, Option<Vec<u8>>) {
    let partitions = std::fs::read_to_string("/proc/partitions").unwrap();
    let (major, minor, disk) = partitions
        .lines()
        .skip(2)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 4 && !f[3].starts_with("loop"))
                .then(|| (f[0].to_string(), f[1].to_string(), f[3].to_string()))
        })
        .next()
        .expect("a disk in /proc/partitions");
    let sector = {
        use std::io::Read;
        let mut b = vec![0u8; 512];
        std::fs::File::open(format!("/dev/{disk}"))
            .and_then(|mut f| f.read_exact(&mut b))
            .ok()
            .map(|()| b)
    };
    (major, minor, sector)
}

/// A hostile spec, given to the service by a stranger: it names a host file, and its post
/// scripts try to reach the host on and off the chroot (files, `/proc/1/root`, a device of the
/// host's disk's numbers, the network); each records that it ran and what it got. An ext4
/// image: the fs-images kind, built in a machine.
const HOSTILE: &str = r#"version: 1
name: untrusted
suite: bookworm
variant: minbase
mirror: host
images:
  - {mount: /, fs: ext4, size: 768MiB, label: root}
files:
  - {source: /etc/shadow, dest: /stolen-shadow}
post:
  - name: outside
    chroot: false
    script: |
      echo pwned > /tmp/debimg-untrusted-MARK
      cp /etc/shadow "$INSTALL_ROOT/stolen-shadow-outside"
      ls / > "$INSTALL_ROOT/outside-listing"
      for t in "api 10.0.2.2 PORT" "metadata 169.254.169.254 80" "proxy 10.0.2.100 3128"; do
        set -- $t
        if timeout 5 bash -c "exec 3<>/dev/tcp/$2/$3" 2>/dev/null; then echo "$1 open"; else echo "$1 closed"; fi
      done > "$INSTALL_ROOT/egress"
  - name: inside
    script: |
      ls /proc/1/root/ > /proc1-listing 2>&1 || true
      if echo pwned > /proc/1/root/tmp/debimg-untrusted-MARK2 2>/dev/null; then echo written; else echo refused; fi > /proc1-write
      if mknod /host-disk b MAJOR MINOR 2>/dev/null; then echo made; else echo refused; fi > /mknod-result
      dd if=/host-disk of=/stolen-sector bs=512 count=1 2>/dev/null || true
"#;

/// `serve --isolation untrusted`: a non-admin token's hostile spec (reads host files, runs
/// scripts outside the chroot, looks for the host through `/proc/1/root`, a device node and the
/// network) is accepted and built in a machine, where those paths are the machine's: nothing of
/// the host reaches the image, the host or the network beyond the mirror's proxy.
#[test]
fn the_service_builds_hostile_specs_in_machines_that_reach_nothing_of_the_host() {
    use common::service::{Api, TestServer};
    if !can_build() {
        return;
    }
    let (major, minor, host_sector) = host_disk();
    let mut server = TestServer::start(
        "vm-serve",
        &["--local-workers", "1", "--isolation", "untrusted"],
    );
    let carol = Api::new(&server.url, Some(&server.token("carol", false)));
    // The machine reaches the spec's mirror through this host's proxy, and nothing else: not
    // the server's API on this host's loopback (10.0.2.2 in qemu's user network), not the
    // metadata address.
    let port = server.url.rsplit(':').next().unwrap().to_string();
    let spec = HOSTILE
        .replace("PORT", &port)
        .replace("MAJOR", &major)
        .replace("MINOR", &minor);
    let marks = ["/tmp/debimg-untrusted-MARK", "/tmp/debimg-untrusted-MARK2"];
    for m in marks {
        let _ = std::fs::remove_file(m);
    }
    ensure_appliance();
    let watch = LoopWatch::start(&[server.build_dir.path()]);
    let a = carol.submit(&spec, "untrusted");
    assert_eq!(a.status, 201, "{}", a.text());
    let id = a.json()["id"].as_str().unwrap().to_string();
    let j = carol.wait_end(&id, 1800);
    let (polls, seen) = watch.finish();
    let log = carol.get(&format!("/api/v1/jobs/{id}/log"), &[]).text();
    assert_eq!(j["state"], "succeeded", "{j:#}\n{log}");
    assert!(polls > 100, "the watch looked only {polls} times");
    assert_eq!(
        seen,
        Vec::<String>::new(),
        "loop devices attached on the host"
    );
    assert!(log.contains("starting the build machine"), "{log}");
    for m in marks {
        assert!(!Path::new(m).exists(), "{m} reached the host");
    }
    // Every artifact, as the metadata lists it: the image checks out and is mounted here.
    let work = scratch("vm-serve-x");
    let out = work.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    for art in j["artifacts"].as_array().unwrap() {
        let name = art["name"].as_str().unwrap();
        assert!(!name.contains('/'), "{name}");
        let body = carol.get(art["url"].as_str().unwrap(), &[]).body;
        std::fs::write(out.join(name), body).unwrap();
    }
    let meta = Metadata::read(&out.join("untrusted.yaml")).unwrap();
    assert_eq!(meta.kind, "fs-images");
    let raws_dir = work.path().join("raws");
    std::fs::create_dir_all(&raws_dir).unwrap();
    let raws = check_outputs(&out, &meta, &raws_dir);
    let tree = MountedTree::mount(&meta, &raws);
    let x = tree.root.path();
    let read = |p: &str| {
        std::fs::read(x.join(p))
            .unwrap_or_else(|e| panic!("{p} in the image: {e} (did the script run?)"))
    };
    let text = |p: &str| String::from_utf8_lossy(&read(p)).trim().to_string();
    // The host's /etc/shadow, named as a file and copied by a script outside the chroot: the
    // machine's reached the image, never this host's.
    let shadow = std::fs::read("/etc/shadow").unwrap();
    for stolen in ["stolen-shadow", "stolen-shadow-outside"] {
        let got = read(stolen);
        assert!(!got.is_empty(), "{stolen}: nothing copied");
        assert_ne!(got, shadow, "{stolen}: the server's /etc/shadow leaked");
    }
    // Outside the chroot, / is the machine's: its scratch disk, and not this host's names.
    let outside = text("outside-listing");
    assert!(outside.lines().any(|l| l == "scratch"), "{outside}");
    let host_only: Vec<String> = std::fs::read_dir("/")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !outside.lines().any(|l| l == n))
        .collect();
    assert!(
        !host_only.is_empty(),
        "the host's / looks like the machine's"
    );
    // Inside the chroot, /proc/1/root is the machine's root: its listing is the outside one.
    let proc1 = text("proc1-listing");
    assert!(
        proc1.lines().any(|l| l == "scratch"),
        "/proc/1/root was not the machine's root: {proc1}"
    );
    for n in &host_only {
        assert!(
            !proc1.lines().any(|l| l == n),
            "/proc/1/root showed the host's {n}: {proc1}"
        );
    }
    let written = text("proc1-write");
    assert!(
        ["written", "refused"].contains(&written.as_str()),
        "{written}"
    );
    // A device of the host's disk's numbers, made in the machine, is one of the machine's.
    let mknod = text("mknod-result");
    assert!(["made", "refused"].contains(&mknod.as_str()), "{mknod}");
    if let Some(host_sector) = host_sector
        && mknod == "made"
    {
        assert_ne!(
            read("stolen-sector"),
            host_sector,
            "the host's disk was read"
        );
    }
    let egress = text("egress");
    assert_eq!(
        egress.lines().collect::<Vec<_>>(),
        ["api closed", "metadata closed", "proxy open"],
        "what the machine reached"
    );
    drop(tree);
    server.stop();
    assert_eq!(machines_of(server.build_dir.path()), Vec::<i32>::new());
}

#[test]
fn limits_and_signals_stop_the_machine_and_leave_nothing() {
    if !can_build() {
        return;
    }
    ensure_appliance();
    let work = scratch("vm-limits");
    let spec = example("minimal.yaml");
    let case = |tag: &str| {
        let out = work.path().join(format!("{tag}-out"));
        let b = work.path().join(format!("{tag}-build"));
        std::fs::create_dir_all(&b).unwrap();
        (out, b)
    };

    let hungry = work.path().join("hungry.yaml");
    std::fs::write(
        &hungry,
        "version: 1\nname: hungry\nsuite: bookworm\nvariant: minbase\nmirror: host\n\
         kind: tarball\npost:\n  - name: eat\n    script: head -c 2000M /dev/zero | tail > /dev/null\n",
    )
    .unwrap();
    // Each case is a machine of its own: the two that build until they hit their limit run
    // beside the three short ones.
    std::thread::scope(|s| {
        let disk = s.spawn(|| {
            // The disk budget: the root image does not fit.
            let (out, b) = case("disk");
            let run = vm_build(&spec, &out, &b, &["--vm-disk", "300MiB"]);
            assert_eq!(run.code(), Some(5), "{}", run.stderr());
            assert!(
                run.stderr().contains("disk budget") || run.stderr().contains("no space"),
                "{}",
                run.stderr()
            );
            assert_machine_gone(&b, &out);
        });
        let memory = s.spawn(|| {
            // The memory limit: a script that needs more than the machine has.
            let (out, b) = case("memory");
            let run = vm_build(&hungry, &out, &b, &["--vm-memory", "768MiB"]);
            assert_eq!(run.code(), Some(7), "{}", run.stderr());
            assert!(run.stderr().contains("out of memory"), "{}", run.stderr());
            assert_machine_gone(&b, &out);
        });
        // The wall-clock limit.
        let (out, b) = case("time");
        let run = vm_build(&spec, &out, &b, &["--vm-timeout", "15"]);
        assert_eq!(run.code(), Some(7), "{}", run.stderr());
        assert!(
            run.stderr().contains("wall-clock limit of 15s"),
            "{}",
            run.stderr()
        );
        assert_machine_gone(&b, &out);

        // TERM: the machine stops, the build says so.
        let (out, b) = case("term");
        let status = signal_machine_build(&spec, &out, &b, Signal::SIGTERM);
        assert_eq!(status.code(), Some(143), "{status:?}");
        assert_machine_gone(&b, &out);

        // kill -9 of debimg: qemu goes with it, nothing partial stays.
        let (out, b) = case("kill");
        let status = signal_machine_build(&spec, &out, &b, Signal::SIGKILL);
        assert_eq!(status.signal(), Some(9), "{status:?}");
        assert_machine_gone(&b, &out);
        disk.join().unwrap();
        memory.join().unwrap();
    });
}

/// Starts a machine build of `spec`, sends debimg `signal` once its machine runs and returns
/// how debimg ended.
fn signal_machine_build(
    spec: &Path,
    out: &Path,
    build_dir: &Path,
    signal: Signal,
) -> std::process::ExitStatus {
    let mut child = build_command(
        spec,
        out,
        build_dir,
        &["--vm", "--vm-accel", "tcg", "--vm-cpus", "1"],
    )
    .stderr(std::process::Stdio::null())
    .spawn()
    .unwrap();
    wait_for_machine(build_dir);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal).unwrap();
    child.wait().unwrap()
}

/// Waits until a machine of `build_dir` runs.
fn wait_for_machine(build_dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(600);
    while machines_of(build_dir).is_empty() {
        assert!(Instant::now() < deadline, "no machine started");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Into its boot.
    std::thread::sleep(Duration::from_secs(3));
}
