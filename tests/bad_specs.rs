//! A table of bad specs: each is rejected with a message naming the field, and `debimg build`
//! on it creates nothing (no output or build directory, no loop device, no mount), quickly: a
//! spec that names a device or a FIFO must fail, not hang. Spec files that cannot be read as
//! specs (too big, a FIFO) have their own tests below.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use debimg::spec::Spec;

/// How long one rejected build may take.
const FAST: Duration = Duration::from_secs(10);

const IMAGES: &str = "images:\n  - {mount: /, fs: ext4, size: 1GiB, label: root}\n  - {mount: /boot, fs: ext2, size: 128MiB}\n";

/// A valid disk, for cases that break one thing in it.
const DISK: &str = "disk:\n  size: 2GiB\n  formats: [raw]\n  partitions:\n    - {size: 1MiB, flags: [bios-boot]}\n    - {size: 64MiB, flags: [esp]}\n    - {mount: /, fs: ext4}\n";

/// A spec from top-level lines and an images block.
fn doc(top: &str, images: &str) -> String {
    format!("version: 1\nname: t\nsuite: bookworm\n{top}{images}")
}

fn img(lines: &str) -> String {
    format!("images:\n{lines}")
}

/// (what is wrong, the spec, text the error must contain: the field path, or the key for
/// problems the YAML parser finds).
fn cases() -> Vec<(&'static str, String, &'static str)> {
    vec![
        (
            "missing version",
            "name: t\nsuite: bookworm\n".to_string() + IMAGES,
            "version",
        ),
        (
            "unsupported version",
            doc("", IMAGES).replace("version: 1", "version: 2"),
            "version:",
        ),
        (
            "unknown top-level key",
            doc("pakages: [less]\n", IMAGES),
            "pakages",
        ),
        (
            "name with a slash",
            doc("", IMAGES).replace("name: t", "name: a/b"),
            "name:",
        ),
        (
            "name that is ..",
            doc("", IMAGES).replace("name: t", "name: '..'"),
            "name:",
        ),
        (
            "empty name",
            doc("", IMAGES).replace("name: t", "name: ''"),
            "name:",
        ),
        (
            "architecture with a space",
            doc("arch: amd 64\n", IMAGES),
            "arch:",
        ),
        (
            "empty suite",
            doc("", IMAGES).replace("suite: bookworm", "suite: ''"),
            "suite:",
        ),
        ("unknown variant", doc("variant: tiny\n", IMAGES), "tiny"),
        (
            "ftp mirror",
            doc("mirror: ftp://m.example/debian\n", IMAGES),
            "mirror:",
        ),
        (
            "mirror that is no URL",
            doc("mirror: not a url\n", IMAGES),
            "mirror:",
        ),
        (
            "mirror without a host",
            doc("mirror: 'http://'\n", IMAGES),
            "mirror:",
        ),
        (
            "uppercase package",
            doc("packages: [Curl]\n", IMAGES),
            "packages[0]:",
        ),
        (
            "package with a shell command",
            doc("packages: ['rm -rf /']\n", IMAGES),
            "packages[0]:",
        ),
        (
            "one-letter package",
            doc("packages: [less, a]\n", IMAGES),
            "packages[1]:",
        ),
        (
            "package with a semicolon",
            doc("packages: ['x;reboot']\n", IMAGES),
            "packages[0]:",
        ),
        (
            "bootstrap include with a substitution",
            doc("bootstrap_include: ['$(id)']\n", IMAGES),
            "bootstrap_include[0]:",
        ),
        (
            "two repos with one name",
            doc(
                "repos:\n  - {name: d, suite: bookworm}\n  - {name: d, suite: bookworm-updates}\n",
                IMAGES,
            ),
            "repos[1].name:",
        ),
        (
            "first repo on another suite",
            doc("repos:\n  - {name: d, suite: trixie}\n", IMAGES),
            "repos[0].suite:",
        ),
        (
            "priority out of range",
            doc(
                "repos:\n  - {name: d, suite: bookworm}\n  - {name: u, suite: bookworm-updates, priority: 20000}\n",
                IMAGES,
            ),
            "repos[1].priority:",
        ),
        (
            "repo URI with another scheme",
            doc(
                "repos:\n  - {name: d, uri: 'javascript:x', suite: bookworm}\n",
                IMAGES,
            ),
            "repos[0].uri:",
        ),
        (
            "empty repo section",
            doc(
                "repos:\n  - {name: d, suite: bookworm, section: ''}\n",
                IMAGES,
            ),
            "repos[0].section:",
        ),
        (
            "repo name with a slash",
            doc("repos:\n  - {name: a/b, suite: bookworm}\n", IMAGES),
            "repos[0].name:",
        ),
        ("no images", doc("", "images: []\n"), "images:"),
        (
            "no image at /",
            doc("", &img("  - {mount: /var, fs: ext4, size: 1GiB}\n")),
            "no image is mounted at `/`",
        ),
        (
            "relative mount point",
            doc(
                "",
                &img(
                    "  - {mount: /, fs: ext4, size: 1GiB}\n  - {mount: var, fs: ext4, size: 1GiB}\n",
                ),
            ),
            "images[1].mount:",
        ),
        (
            "mount point with ..",
            doc(
                "",
                &img(
                    "  - {mount: /, fs: ext4, size: 1GiB}\n  - {mount: /var/../etc, fs: ext4, size: 1GiB}\n",
                ),
            ),
            "images[1].mount:",
        ),
        (
            "mount point with a space",
            doc(
                "",
                &img(
                    "  - {mount: /, fs: ext4, size: 1GiB}\n  - {mount: /my data, fs: ext4, size: 1GiB}\n",
                ),
            ),
            "images[1].mount:",
        ),
        (
            "mount point twice",
            doc(
                "",
                &img(
                    "  - {mount: /, fs: ext4, size: 1GiB}\n  - {mount: /boot, fs: ext2, size: 64MiB}\n  - {mount: /boot, fs: ext4, size: 64MiB}\n",
                ),
            ),
            "images[2].mount:",
        ),
        (
            "ext4 too small",
            doc("", &img("  - {mount: /, fs: ext4, size: 1MiB}\n")),
            "images[0].size:",
        ),
        (
            "xfs too small",
            doc(
                "",
                &img(
                    "  - {mount: /, fs: ext4, size: 1GiB}\n  - {mount: /var, fs: xfs, size: 100MiB}\n",
                ),
            ),
            "images[1].size:",
        ),
        (
            "absurd size",
            doc("", &img("  - {mount: /, fs: ext4, size: 1000TiB}\n")),
            "images[0].size:",
        ),
        (
            "size that is no size",
            doc("", &img("  - {mount: /, fs: ext4, size: big}\n")),
            "size",
        ),
        (
            "negative size",
            doc("", &img("  - {mount: /, fs: ext4, size: -5}\n")),
            "negative",
        ),
        (
            "unknown filesystem",
            doc("", &img("  - {mount: /, fs: ext5, size: 1GiB}\n")),
            "ext5",
        ),
        (
            "ext4 label too long",
            doc(
                "",
                &img("  - {mount: /, fs: ext4, size: 1GiB, label: abcdefghijklmnopq}\n"),
            ),
            "images[0].label:",
        ),
        (
            "label with a space",
            doc(
                "",
                &img("  - {mount: /, fs: ext4, size: 1GiB, label: my root}\n"),
            ),
            "images[0].label:",
        ),
        (
            "output name climbing out",
            doc(
                "",
                &img("  - {mount: /, fs: ext4, size: 1GiB, output: ../x}\n"),
            ),
            "images[0].output:",
        ),
        (
            "output name with a slash",
            doc(
                "",
                &img("  - {mount: /, fs: ext4, size: 1GiB, output: a/b}\n"),
            ),
            "images[0].output:",
        ),
        (
            "two images, one output name",
            doc(
                "",
                &img(
                    "  - {mount: /, fs: ext4, size: 1GiB, output: x}\n  - {mount: /boot, fs: ext2, size: 64MiB, output: x}\n",
                ),
            ),
            "images[1].output:",
        ),
        (
            "unknown container",
            doc(
                "",
                &img("  - {mount: /, fs: ext4, size: 1GiB, container: zip}\n"),
            ),
            "zip",
        ),
        (
            "unknown key in an image",
            doc(
                "",
                &img("  - {mount: /, fs: ext4, size: 1GiB, lable: root}\n"),
            ),
            "lable",
        ),
        (
            "empty mkfs option",
            doc(
                "",
                &img("  - {mount: /, fs: ext4, size: 1GiB, mkfs_options: ['']}\n"),
            ),
            "images[0].mkfs_options[0]:",
        ),
        (
            "socks proxy",
            doc("proxies: {http: 'socks://p:1080'}\n", IMAGES),
            "proxies.http:",
        ),
        (
            "direct host with a bang",
            doc("proxies: {direct: ['bad host!']}\n", IMAGES),
            "proxies.direct[0]:",
        ),
        (
            "plain root password",
            doc("root_password_hash: hunter2\n", IMAGES),
            "root_password_hash:",
        ),
        (
            "hostname starting with -",
            doc("hostname: -bad\n", IMAGES),
            "hostname:",
        ),
        (
            "keep_apt_sources that is no bool",
            doc("keep_apt_sources: maybe\n", IMAGES),
            "keep_apt_sources",
        ),
        (
            "images that are no list",
            doc("", "images: {mount: /}\n"),
            "images",
        ),
        (
            "not YAML at all",
            "version: 1\nname: [t\n".to_string(),
            "line",
        ),
        (
            "disk without kind: disk",
            doc(
                "disk: {size: 1GiB, partitions: [{mount: /, fs: ext4}]}\n",
                IMAGES,
            ),
            "disk:",
        ),
        (
            "kind: disk without a disk",
            doc("kind: disk\npackages: [linux-image-amd64]\n", ""),
            "disk:",
        ),
        (
            "disk without a kernel",
            doc(&format!("kind: disk\n{DISK}"), ""),
            "packages:",
        ),
        (
            "uefi without an esp",
            doc(
                "kind: disk\npackages: [linux-image-amd64]\ndisk:\n  size: 2GiB\n  boot: [uefi]\n  partitions:\n    - {mount: /, fs: ext4}\n",
                "",
            ),
            "disk.boot:",
        ),
        (
            "bios on gpt without a bios-boot partition",
            doc(
                "kind: disk\npackages: [linux-image-amd64]\ndisk:\n  size: 2GiB\n  boot: [bios]\n  partitions:\n    - {mount: /, fs: ext4}\n",
                "",
            ),
            "bios-boot",
        ),
        (
            "a format twice",
            doc(
                &format!("kind: disk\npackages: [linux-image-amd64]\n{DISK}")
                    .replace("formats: [raw]", "formats: [raw, raw]"),
                "",
            ),
            "disk.formats[1]:",
        ),
        (
            "qcow2 and qcow2-compressed",
            doc(
                &format!("kind: disk\npackages: [linux-image-amd64]\n{DISK}")
                    .replace("formats: [raw]", "formats: [qcow2, qcow2-compressed]"),
                "",
            ),
            "disk.formats:",
        ),
        (
            "an esp with a filesystem",
            doc(
                &format!("kind: disk\npackages: [linux-image-amd64]\n{DISK}")
                    .replace("flags: [esp]}", "flags: [esp], fs: ext4}"),
                "",
            ),
            "disk.partitions[1].fs:",
        ),
        (
            "an unknown partition type",
            doc(
                &format!("kind: disk\npackages: [linux-image-amd64]\n{DISK}")
                    .replace("fs: ext4}", "fs: ext4, type: windows}"),
                "",
            ),
            "disk.partitions[2].type:",
        ),
        (
            "partitions larger than the disk",
            doc(
                &format!("kind: disk\npackages: [linux-image-amd64]\n{DISK}")
                    .replace("size: 64MiB", "size: 4GiB"),
                "",
            ),
            "disk.size:",
        ),
        (
            "a disk for arm64",
            doc(
                &format!("kind: disk\narch: arm64\npackages: [linux-image-arm64]\n{DISK}"),
                "",
            ),
            "arch:",
        ),
    ]
}

/// Specs that would reach host files, devices or oversized names, with every text the error
/// must contain (the field path first).
fn hardening_cases() -> Vec<(&'static str, String, Vec<&'static str>)> {
    let long = |c: &str, n: usize| c.repeat(n);
    vec![
        (
            "repo URI that injects a second source line",
            doc(
                "repos:\n  - {name: d, suite: bookworm, uri: \"file:///m bookworm main\\ndeb [trusted=yes] http://x/ bookworm main\\n#\"}\n",
                IMAGES,
            ),
            vec!["repos[0].uri:", "whitespace", "\\n"],
        ),
        (
            "mirror with a comment sign",
            doc("mirror: 'http://m.example/debian#x'\n", IMAGES),
            vec!["mirror:", "`#`"],
        ),
        (
            "proxy with a quote",
            doc("proxies: {https: 'http://p.example:3128/\"x'}\n", IMAGES),
            vec!["proxies.https:", "`\"`"],
        ),
        (
            "repo section with a line break",
            doc(
                "repos:\n  - {name: d, suite: bookworm, section: \"main\\ncontrib\"}\n",
                IMAGES,
            ),
            vec!["repos[0].section:"],
        ),
        (
            "suite with a line break",
            doc("", IMAGES).replace("suite: bookworm", "suite: \"bookworm\\nx\""),
            vec!["suite:"],
        ),
        (
            "mkfs option copying the host's /root into the image",
            doc(
                "",
                &img("  - {mount: /, fs: ext4, size: 1GiB, mkfs_options: [-d, /root]}\n"),
            ),
            vec!["images[0].mkfs_options[0]:", "host directory"],
        ),
        (
            "mkfs option formatting a host disk too",
            doc(
                "",
                &img(
                    "  - {mount: /, fs: ext4, size: 1GiB}\n  - {mount: /srv, fs: btrfs, size: 1GiB, mkfs_options: [/dev/sda]}\n",
                ),
            ),
            vec!["images[1].mkfs_options[0]:", "positional"],
        ),
        (
            "btrfs --rootdir",
            doc(
                "",
                &img(
                    "  - {mount: /, fs: ext4, size: 1GiB}\n  - {mount: /srv, fs: btrfs, size: 1GiB, mkfs_options: [--rootdir, /etc]}\n",
                ),
            ),
            vec!["images[1].mkfs_options[0]:", "`--rootdir` is refused"],
        ),
        (
            "xfs protofile",
            doc(
                "",
                &img(
                    "  - {mount: /, fs: ext4, size: 1GiB}\n  - {mount: /srv, fs: xfs, size: 1GiB, mkfs_options: [-p, proto]}\n",
                ),
            ),
            vec!["images[1].mkfs_options[0]:", "protofile"],
        ),
        (
            "mkfs option debimg sets",
            doc(
                "",
                &img("  - {mount: /, fs: ext4, size: 1GiB, mkfs_options: [-U, clear]}\n"),
            ),
            vec!["images[0].mkfs_options[0]:", "debimg sets the UUID"],
        ),
        (
            "esp mkfs option creating a host file",
            doc(
                &format!("kind: disk\npackages: [linux-image-amd64]\n{DISK}").replace(
                    "flags: [esp]}",
                    "flags: [esp], mkfs_options: [-C, x.img, '65536']}",
                ),
                "",
            ),
            vec![
                "disk.partitions[1].mkfs_options[0]:",
                "creates a file on the host",
            ],
        ),
        (
            "300-character name",
            doc("", IMAGES).replace("name: t", &format!("name: {}", long("n", 300))),
            vec!["name: `nnn", "300 bytes"],
        ),
        (
            "output name of 250 bytes",
            doc(
                "",
                &img(&format!(
                    "  - {{mount: /, fs: ext4, size: 1GiB, output: {}}}\n",
                    long("o", 250)
                )),
            ),
            vec!["images[0].output:", "250 bytes"],
        ),
        (
            "mount point whose default output name passes 255 bytes",
            doc(
                "",
                &img(&format!(
                    "  - {{mount: /, fs: ext4, size: 1GiB}}\n  - {{mount: /{}/{}, fs: ext4, size: 1GiB}}\n",
                    long("a", 120),
                    long("b", 120)
                )),
            ),
            vec![
                "images[1].mount:",
                "bytes",
                "too many",
                "give a shorter `output`",
            ],
        ),
        (
            "file source that is /dev/zero",
            doc("files:\n  - {source: /dev/zero, dest: /etc/zero}\n", IMAGES),
            vec!["files[0].source:", "a character device, not a regular file"],
        ),
        (
            "file source that is a directory",
            doc("files:\n  - {source: /etc, dest: /etc/x}\n", IMAGES),
            vec!["files[0].source:", "a directory"],
        ),
        (
            "local deb that does not exist",
            doc("local_debs: [/dev/zero.deb]\n", IMAGES),
            vec!["local_debs[0]:", "cannot be read"],
        ),
        (
            "alias bomb",
            doc(
                &format!(
                    "exclude:\n  - &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n{}",
                    (1..10)
                        .map(|i| format!(
                            "  - &a{i} [{}]\n",
                            vec![format!("*a{}", i - 1); 10].join(", ")
                        ))
                        .collect::<String>()
                ),
                IMAGES,
            ),
            vec!["line"],
        ),
    ]
}

/// Every case: the table's, and the hardening ones.
fn all_cases() -> Vec<(&'static str, String, Vec<&'static str>)> {
    cases()
        .into_iter()
        .map(|(what, yaml, needle)| (what, yaml, vec![needle]))
        .chain(hardening_cases())
        .collect()
}

#[test]
fn every_bad_spec_is_rejected_naming_the_field() {
    let cases = all_cases();
    assert!(
        cases.len() >= 30,
        "the table has only {} cases",
        cases.len()
    );
    // Read from a file, as `debimg` reads it: the host files a spec names are checked then.
    let dir = scratch("badspecs-table");
    let mut wrong = Vec::new();
    for (i, (what, yaml, needles)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad-{i}.yaml"));
        std::fs::write(&path, yaml).unwrap();
        let t = Instant::now();
        let res = Spec::from_file(&path);
        if t.elapsed() > Duration::from_secs(2) {
            wrong.push(format!("{what}: took {:?}", t.elapsed()));
        }
        match res {
            Ok(_) => wrong.push(format!("{what}: accepted")),
            Err(e) => {
                let text = e.to_string();
                for needle in needles {
                    if !text.contains(needle) {
                        wrong.push(format!("{what}: `{needle}` not in:\n{text}"));
                    }
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n\n"));
}

/// Runs `cmd`, killing it and failing the test when it takes longer than [`FAST`]; its exit
/// code and stderr.
fn run_fast(what: &str, mut cmd: Command) -> (Option<i32>, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running debimg");
    let t = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            return (status.code(), err);
        }
        if t.elapsed() > FAST {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: debimg build still ran after {FAST:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `debimg build` on `spec` is refused (exit 2) quickly, creating nothing.
fn assert_build_refused(what: &str, spec: &Path, dir: &Path, needle: &str) {
    let out = dir.join("out");
    let bdir = dir.join("build");
    let (code, err) = run_fast(what, build_command(spec, &out, &bdir, &[]));
    assert_eq!(code, Some(2), "{what}: {err}");
    assert!(err.contains(needle), "{what}: `{needle}` not in {err}");
    assert!(
        !out.exists() && !bdir.exists(),
        "{what}: a directory was created"
    );
}

#[test]
fn a_spec_file_over_1_mib_is_refused_naming_its_size() {
    let dir = scratch("badspecs-big");
    let spec = dir.path().join("big.yaml");
    let yaml = doc("", IMAGES);
    std::fs::write(&spec, format!("{yaml}# {}\n", "x".repeat(2 << 20))).unwrap();
    let size = std::fs::metadata(&spec).unwrap().len();
    let e = Spec::from_file(&spec).unwrap_err().to_string();
    assert!(e.contains(&format!("the file is {size} bytes")), "{e}");
    assert_build_refused("2 MiB spec", &spec, dir.path(), &format!("{size} bytes"));
}

#[test]
fn a_fifo_or_a_device_as_the_spec_is_refused_without_blocking() {
    let dir = scratch("badspecs-fifo");
    let fifo = dir.path().join("spec.yaml");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    assert_build_refused(
        "FIFO as the spec",
        &fifo,
        dir.path(),
        "a FIFO, not a regular file",
    );
    assert_build_refused(
        "/dev/zero as the spec",
        Path::new("/dev/zero"),
        dir.path(),
        "a character device",
    );
}

#[test]
fn building_a_bad_spec_creates_nothing() {
    let dir = scratch("badspecs");
    for (i, (what, yaml, _)) in all_cases().into_iter().enumerate() {
        let spec = dir.path().join(format!("bad-{i}.yaml"));
        std::fs::write(&spec, yaml).unwrap();
        let out = dir.path().join(format!("out-{i}"));
        let bdir = dir.path().join(format!("build-{i}"));
        let (code, err) = run_fast(what, build_command(&spec, &out, &bdir, &[]));
        assert_eq!(code, Some(2), "{what}: {err}");
        assert!(
            !out.exists() && !bdir.exists(),
            "{what}: a directory was created"
        );
    }
    // Other test binaries attach and mount beside this one: only what would be this test's
    // own counts (a device backed by, or a mount on, something under its directory).
    assert_eq!(loops_backed_under(dir.path()), Vec::<String>::new());
    assert_eq!(
        debimg::sys::mount::mount_points_under(dir.path()).unwrap(),
        Vec::<std::path::PathBuf>::new()
    );
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".yaml"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
