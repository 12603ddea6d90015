//! A table of bad specs: each is rejected with a message naming the field, and `debimg build`
//! on it creates nothing (no output or build directory, no loop device, no mount).

mod common;

use common::*;
use debimg::spec::Spec;

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

#[test]
fn every_bad_spec_is_rejected_naming_the_field() {
    let cases = cases();
    assert!(
        cases.len() >= 30,
        "the table has only {} cases",
        cases.len()
    );
    let mut wrong = Vec::new();
    for (what, yaml, needle) in &cases {
        match Spec::from_yaml(yaml, "bad.yaml") {
            Ok(_) => wrong.push(format!("{what}: accepted")),
            Err(e) => {
                let text = e.to_string();
                if !text.contains(needle) {
                    wrong.push(format!("{what}: `{needle}` not in:\n{text}"));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n\n"));
}

#[test]
fn building_a_bad_spec_creates_nothing() {
    let dir = scratch("badspecs");
    let loops_before = std::fs::read_dir("/sys/block")
        .map(|d| d.count())
        .unwrap_or(0);
    let mounts_before = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .count();
    for (i, (what, yaml, _)) in cases().into_iter().enumerate() {
        let spec = dir.path().join(format!("bad-{i}.yaml"));
        std::fs::write(&spec, yaml).unwrap();
        let out = dir.path().join(format!("out-{i}"));
        let bdir = dir.path().join(format!("build-{i}"));
        let run = build(&spec, &out, &bdir, &[]);
        assert_eq!(run.code(), Some(2), "{what}: {}", run.stderr());
        assert!(
            !out.exists() && !bdir.exists(),
            "{what}: a directory was created"
        );
    }
    assert_eq!(
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .count(),
        mounts_before
    );
    let loops_after = std::fs::read_dir("/sys/block")
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(loops_after, loops_before, "a block device appeared");
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".yaml"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
