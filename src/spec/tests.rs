use super::input::*;
use super::validate::*;
use super::*;

const GOOD: &str = r#"
version: 1
name: test
suite: bookworm
packages: [openssh-server, curl]
images:
  - {mount: /, fs: ext4, size: 2GiB, label: root}
  - {mount: /boot, fs: ext2, size: 256MiB, label: boot}
"#;

fn problems(yaml: &str) -> Vec<Problem> {
    match Spec::from_yaml(yaml, "t.yaml") {
        Ok(_) => vec![],
        Err(e) => e.problems,
    }
}

#[test]
fn good_spec_parses_with_defaults() {
    let s = Spec::from_yaml(GOOD, "t.yaml").unwrap();
    assert_eq!(s.arch, "amd64");
    assert_eq!(s.mirror, "host");
    assert_eq!(s.variant, Variant::Minbase);
    assert_eq!(s.images[0].size, Size(2 * GIB));
    assert_eq!(s.images[1].container, Container::Gzip);
    assert!(s.keep_apt_sources);
}

#[test]
fn sizes_parse() {
    assert_eq!(Size::parse("2GiB").unwrap(), Size(2 * GIB));
    assert_eq!(Size::parse("256M").unwrap(), Size(256 * MIB));
    assert_eq!(Size::parse("1.5G").unwrap(), Size(GIB * 3 / 2));
    assert_eq!(Size::parse("500MB").unwrap(), Size(500_000_000));
    assert_eq!(Size::parse("4096").unwrap(), Size(4096));
    assert!(Size::parse("2 parsecs").is_err());
    assert!(Size::parse("GiB").is_err());
    assert_eq!(Size(256 * MIB).to_string(), "256MiB");
}

#[test]
fn every_problem_is_named_with_its_field() {
    let yaml = r#"
version: 2
name: "../x"
suite: bookworm
packages: [Bad_Name]
images:
  - {mount: /boot, fs: ext2, size: 1MiB}
  - {mount: boot, fs: xfs, size: 1GiB}
"#;
    let fields: Vec<String> = problems(yaml).into_iter().map(|p| p.field).collect();
    for f in [
        "version",
        "name",
        "packages[0]",
        "images[0].size",
        "images[1].mount",
        "images",
    ] {
        assert!(fields.iter().any(|x| x == f), "{f} missing in {fields:?}");
    }
}

#[test]
fn unknown_keys_are_rejected() {
    let yaml = GOOD.replace("suite: bookworm", "suite: bookworm\nsuit: x");
    let p = problems(&yaml);
    assert_eq!(p.len(), 1);
    assert!(p[0].message.contains("suit"), "{}", p[0].message);
}

#[test]
fn misspelt_key_gets_a_hint_and_the_file_name() {
    let yaml = GOOD.replace("packages:", "pakages:");
    let e = Spec::from_yaml(&yaml, "my.yaml").unwrap_err();
    let m = &e.problems[0].message;
    assert!(m.contains("did you mean `packages`?"), "{m}");
    assert!(m.contains("my.yaml:"), "{m}");
    assert!(!m.starts_with("error:"), "{m}");
    assert_eq!(edit_distance("kitten", "sitting"), 3);
}

#[test]
fn package_names() {
    for ok in ["openssh-server", "g++", "libc6:amd64", "0ad"] {
        assert!(is_package_name(ok), "{ok}");
    }
    for bad in ["a", "Foo", "-x", "x y", "x;rm", "pkg:", ""] {
        assert!(!is_package_name(bad), "{bad}");
    }
}

#[test]
fn mount_points() {
    assert!(check_mount_point("/").is_ok());
    assert!(check_mount_point("/var/lib/app").is_ok());
    for bad in ["var", "/var/", "/a/../b", "/a//b", "/a b", "/./x"] {
        assert!(check_mount_point(bad).is_err(), "{bad}");
    }
}

/// A spec with the repos and images given, otherwise GOOD.
fn with(top: &str) -> String {
    GOOD.replace("packages:", &format!("{top}\npackages:"))
}

fn fields(yaml: &str) -> Vec<String> {
    problems(yaml).into_iter().map(|p| p.to_string()).collect()
}

#[test]
fn uris_with_line_breaks_or_apt_syntax_are_refused() {
    // A second source line and a comment smuggled into a `file:///` URI.
    let injected = "file:///m bookworm main\ndeb [trusted=yes] http://x/ bookworm main\n#";
    let yaml = with(&format!(
        "repos:\n  - {{name: d, suite: bookworm, uri: {injected:?}}}"
    ));
    let p = problems(&yaml);
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].field, "repos[0].uri");
    assert!(p[0].message.contains("whitespace"), "{}", p[0].message);
    assert!(
        p[0].message.contains(r"\n"),
        "newlines are shown escaped: {}",
        p[0].message
    );
    assert!(!p[0].message.contains('\n'), "{}", p[0].message);
    assert!(
        p[0].message.contains("file:///"),
        "says what is allowed: {}",
        p[0].message
    );
    let p = problems(&with(&format!("mirror: {injected:?}")));
    assert_eq!(p[0].field, "mirror");

    for bad in [
        "http://m.example/debian bookworm",
        "http://m.example/debian\tx",
        "http://m.example/a#b",
        "http://m.example/a\"b",
        "http://m.example/a;b",
        "http://m.example/a\\b",
        "http://m.example/a[b]",
        "http://m.example/$(ARCH)",
        "http://m.example/`id`",
        "file:///srv/m'x",
        "file:///srv/pc%20t",
        "file:///srv/new/../etc",
        "file:///srv/./r",
        "file:///srv/r?x",
        "http://",
        "http://:80/",
        "http://m.example:99999/",
        "http://m.example:x/",
        "http://[zz]/",
        "http://m_example!/",
        "ftp://m.example/debian",
        "file://m.example/debian",
        "file:/srv",
        "m.example/debian",
    ] {
        assert!(check_uri(bad, UriUse::Source).is_err(), "{bad:?} accepted");
    }
    for good in [
        "host",
        "http://m.example/debian",
        "https://user:p%40ss@m.example:8443/debian?x=1&y=2",
        "http://10.0.0.2:3142/debian/",
        "http://[fd00::2]:3142/debian",
        "http://[::1]/",
        "file:///srv/mirror/debian",
        "file:///",
    ] {
        assert_eq!(check_uri(good, UriUse::Source), Ok(()), "{good}");
    }
    assert!(check_uri("host", UriUse::Proxy).is_err());
    assert!(check_uri("file:///x", UriUse::Proxy).is_err());
    assert_eq!(check_uri("http://p.example:3128", UriUse::Proxy), Ok(()));
}

#[test]
fn uri_messages_mask_credentials() {
    let p = problems(&with(
        "proxies: {http: 'http://u:s3cret@p.example:3128/ x'}",
    ));
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].field, "proxies.http");
    assert!(!p[0].message.contains("s3cret"), "{}", p[0].message);
    assert!(
        p[0].message.contains("http://u:***@p.example"),
        "{}",
        p[0].message
    );
    let p = problems(&with("mirror: 'https://tok3n@m.example/a;b'"));
    assert!(!p[0].message.contains("tok3n"), "{}", p[0].message);
}

#[test]
fn suites_and_sections_are_plain_tokens() {
    let repo = |suite: &str, section: &str| {
        fields(&with(&format!(
            "repos:\n  - {{name: d, suite: bookworm}}\n  - {{name: e, suite: {suite:?}, section: {section:?}}}"
        )))
    };
    assert!(repo("bookworm-updates", "main contrib non-free-firmware").is_empty());
    for bad in [
        "main\ncontrib",
        "main\tcontrib",
        "main #",
        "main [x]",
        "main/x",
        "  ",
    ] {
        let f = repo("bookworm-updates", bad);
        assert!(
            f.iter().any(|f| f.starts_with("repos[1].section:")),
            "{bad:?}: {f:?}"
        );
    }
    for bad in [
        "bookworm main",
        "bookworm\n",
        "a/b",
        "-x",
        "$(x)",
        "../",
        "a/../",
        "./ x/",
    ] {
        let f = repo(bad, "main");
        assert!(
            f.iter().any(|f| f.starts_with("repos[1].suite:")),
            "{bad:?}: {f:?}"
        );
    }
}

#[test]
fn mkfs_options_go_through_the_allowlist() {
    let img = |fs: &str, opts: &str| {
        fields(&GOOD.replace(
            "{mount: /boot, fs: ext2, size: 256MiB, label: boot}",
            &format!("{{mount: /boot, fs: {fs}, size: 1GiB, mkfs_options: {opts}}}"),
        ))
    };
    assert!(img("ext4", "[-m, '0', -O, '^has_journal']").is_empty());
    assert!(img("xfs", "[-m, 'crc=1,finobt=1', -i, size=512]").is_empty());
    let f = img("ext4", "[-d, /root]");
    assert_eq!(f.len(), 1, "{f:?}");
    assert!(
        f[0].starts_with("images[1].mkfs_options[0]: `-d` is refused"),
        "{f:?}"
    );
    let f = img("btrfs", "[/dev/sda]");
    assert!(f[0].starts_with("images[1].mkfs_options[0]:"), "{f:?}");
    assert!(f[0].contains("positional"), "{f:?}");
    let f = img("btrfs", "[-n, 16k, --rootdir, /etc]");
    assert!(f[0].starts_with("images[1].mkfs_options[2]:"), "{f:?}");
    let f = img("xfs", "[-L, x]");
    assert!(f[0].contains("debimg sets the label"), "{f:?}");
}

const DISK_SPEC: &str = "version: 1\nname: d\nsuite: bookworm\nkind: disk\npackages: [linux-image-amd64]\ndisk:\n  size: 2GiB\n  partitions:\n    - {size: 1MiB, flags: [bios-boot]}\n    - {size: 64MiB, flags: [esp]}\n    - {mount: /, fs: ext4}\n";

#[test]
fn partition_mkfs_options_follow_their_program() {
    assert!(fields(DISK_SPEC).is_empty(), "{:?}", fields(DISK_SPEC));
    let part = |n: usize, opts: &str| {
        let lines: Vec<String> = DISK_SPEC
            .lines()
            .enumerate()
            .map(|(i, l)| {
                if i == 8 + n {
                    l.replace('}', &format!(", mkfs_options: {opts}}}"))
                } else {
                    l.to_string()
                }
            })
            .collect();
        fields(&(lines.join("\n") + "\n"))
    };
    // The esp is made by mkfs.vfat: its options, not mke2fs's.
    assert!(part(1, "[-F, '16', -s, '4']").is_empty());
    let f = part(1, "[-n, EFI]");
    assert!(
        f[0].starts_with("disk.partitions[1].mkfs_options[0]:") && f[0].contains("debimg sets"),
        "{f:?}"
    );
    let f = part(1, "[-C, /tmp/x, '100']");
    assert!(f[0].contains("creates a file on the host"), "{f:?}");
    let f = part(2, "[-d, /root]");
    assert!(
        f[0].starts_with("disk.partitions[2].mkfs_options[0]:"),
        "{f:?}"
    );
    let f = part(0, "[-b, '4096']");
    assert!(
        f[0].starts_with("disk.partitions[0].mkfs_options:"),
        "{f:?}"
    );
}

#[test]
fn derived_file_names_fit_in_255_bytes() {
    let long = "a".repeat(300);
    let f = fields(&GOOD.replace("name: test", &format!("name: {long}")));
    assert_eq!(f.len(), 1, "{f:?}");
    assert!(f[0].starts_with("name: `aaa"), "{f:?}");
    assert!(f[0].contains("300 bytes"), "{f:?}");
    // The default base name grows with the mount point: 64 + `-` + 190 + `.img.gz`.
    let name = "n".repeat(64);
    let deep = format!("/{}/{}", "d".repeat(94), "e".repeat(95));
    let yaml = GOOD
        .replace("name: test", &format!("name: {name}"))
        .replace("mount: /boot", &format!("mount: {deep}"));
    let f = fields(&yaml);
    assert_eq!(f.len(), 1, "{f:?}");
    assert!(
        f[0].starts_with("images[1].mount: makes the file name"),
        "{f:?}"
    );
    assert!(
        f[0].contains(".img.gz` of 262 bytes, 300 as its temporary name"),
        "{f:?}"
    );
    assert!(f[0].contains("45 too many"), "{f:?}");
    // An `output` fixes it.
    assert!(fields(&yaml.replace("label: boot", "label: boot, output: deep")).is_empty());
    // The longest allowed name with the longest suffix fits, temporary name included.
    assert_eq!(check_derived_names(&name, NAME_SUFFIXES), Ok(()));
    assert_eq!(
        check_derived_names(&"x".repeat(217 - 7), IMAGE_SUFFIXES),
        Ok(())
    );
    assert!(check_derived_names(&"x".repeat(218 - 7), IMAGE_SUFFIXES).is_err());
    let f = fields(&GOOD.replace(
        "label: boot}",
        &format!("label: boot, output: {}}}", "o".repeat(250)),
    ));
    assert!(
        f[0].starts_with("images[1].output:") && f[0].contains("250 bytes"),
        "{f:?}"
    );
    assert!(
        check_mount_point(&format!("/{}", "c".repeat(256)))
            .unwrap_err()
            .contains("256 bytes")
    );
}

fn scratch() -> tempfile::TempDir {
    tempfile::tempdir_in("/var/tmp").unwrap()
}

#[test]
fn spec_files_are_bounded_regular_files() {
    let dir = scratch();
    let big = dir.path().join("big.yaml");
    std::fs::write(&big, format!("# {}\n{GOOD}", "x".repeat(2 << 20))).unwrap();
    let e = Spec::read_text(&big).unwrap_err().to_string();
    assert!(
        e.contains(&format!("{} bytes", std::fs::metadata(&big).unwrap().len())),
        "{e}"
    );
    assert!(e.contains("at most 1048576 bytes"), "{e}");
    let at_limit = dir.path().join("limit.yaml");
    let pad = MAX_INPUT_BYTES as usize - GOOD.len() - 3;
    std::fs::write(&at_limit, format!("#{}\n{GOOD}\n", " ".repeat(pad))).unwrap();
    assert_eq!(std::fs::metadata(&at_limit).unwrap().len(), MAX_INPUT_BYTES);
    Spec::from_file(&at_limit).unwrap();

    let fifo = dir.path().join("fifo.yaml");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let t = std::time::Instant::now();
    let e = Spec::from_file(&fifo).unwrap_err().to_string();
    assert!(e.contains("is a FIFO, not a regular file"), "{e}");
    assert!(t.elapsed() < std::time::Duration::from_secs(2));
    let e = Spec::read_text(Path::new("/dev/zero"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("a character device"), "{e}");
    let e = Spec::read_text(dir.path()).unwrap_err().to_string();
    assert!(e.contains("a directory"), "{e}");
    let bin = dir.path().join("bin.yaml");
    std::fs::write(&bin, b"version: 1\nname: \xff\n").unwrap();
    let e = Spec::read_text(&bin).unwrap_err().to_string();
    assert!(e.contains("not UTF-8"), "{e}");
}

#[test]
fn host_inputs_must_be_regular_files() {
    let dir = scratch();
    std::fs::write(dir.path().join("motd"), "hi\n").unwrap();
    std::fs::write(dir.path().join("x.deb"), "!<arch>\n").unwrap();
    std::os::unix::fs::symlink("motd", dir.path().join("link")).unwrap();
    nix::unistd::mkfifo(
        &dir.path().join("p.deb"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    std::fs::create_dir(dir.path().join("d.deb")).unwrap();
    let spec_at = |files: &str, debs: &str| {
        let path = dir.path().join("s.yaml");
        let yaml = GOOD.replace(
            "packages:",
            &format!("files:\n{files}local_debs: {debs}\npackages:"),
        );
        Spec::from_yaml_at(&yaml, &path)
    };
    let ok = "  - {source: motd, dest: /etc/motd}\n  - {source: link, dest: /etc/l}\n";
    spec_at(ok, "[x.deb]").unwrap();
    let bad = "  - {source: /dev/zero, dest: /a}\n  - {source: missing, dest: /b}\n  - {source: motd, dest: /c}\n";
    let e = spec_at(bad, "[p.deb, d.deb, x.deb]").unwrap_err();
    let got: Vec<String> = e.problems.iter().map(|p| p.to_string()).collect();
    assert_eq!(got.len(), 4, "{got:?}");
    assert!(
        got[0]
            .starts_with("files[0].source: `/dev/zero` is a character device, not a regular file"),
        "{got:?}"
    );
    assert!(
        got[1].starts_with("files[1].source:") && got[1].contains("cannot be read"),
        "{got:?}"
    );
    assert!(
        got[2].starts_with("local_debs[0]:") && got[2].contains("a FIFO"),
        "{got:?}"
    );
    assert!(
        got[3].starts_with("local_debs[1]:") && got[3].contains("a directory"),
        "{got:?}"
    );
    // Kernel files pass as regular ones (/proc/kcore claims 128 TiB): refused too.
    let e = spec_at("  - {source: /proc/self/status, dest: /k}\n", "[]").unwrap_err();
    assert!(e.problems[0].message.contains("a file of procfs"), "{e}");
    let e = spec_at("  - {source: /sys/kernel/address_bits, dest: /k}\n", "[]");
    assert!(e.unwrap_err().problems[0].message.contains("sysfs"));
    // Reported with the other problems, all at once.
    let e = spec_at("  - {source: /dev/zero, dest: relative}\n", "[]").unwrap_err();
    let fields: Vec<&str> = e.problems.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(fields, ["files[0].dest", "files[0].source"], "{e}");
    let e = Spec::read_text(Path::new("/proc/self/status")).unwrap_err();
    assert!(e.to_string().contains("procfs"), "{e}");
}

/// Nine levels of ten aliases each: a billion `lol`s once expanded, in 700 bytes.
fn alias_bomb(indent: &str) -> String {
    let mut yaml = format!("{indent}- &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for i in 1..10 {
        let prev = format!("*a{}", i - 1);
        yaml.push_str(&format!(
            "{indent}- &a{i} [{}]\n",
            [prev.as_str(); 10].join(", ")
        ));
    }
    yaml
}

#[test]
fn alias_bombs_stop_quickly() {
    use std::time::{Duration, Instant};
    // Untyped, the document would expand whole: the alias budget stops it.
    let t = Instant::now();
    let e = yaml_from_str::<serde_json::Value>(&alias_bomb("")).unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(e.to_string().contains("alias replay limit"), "{e}");
    // In a spec.
    let yaml = GOOD.replace(
        "packages:",
        &format!("exclude:\n{}packages:", alias_bomb("  ")),
    );
    let t = Instant::now();
    let e = Spec::from_yaml(&yaml, "bomb.yaml").unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(e.problems.len(), 1, "{e}");
    // Aliases as a normal spec uses them still work.
    let normal = "version: 1\nname: t\nsuite: bookworm\npackages: &p [less, curl]\nbootstrap_include: *p\nimages:\n  - &img {mount: /, fs: ext4, size: 1GiB}\n";
    let s = Spec::from_yaml(normal, "t").unwrap();
    assert_eq!(s.bootstrap_include, ["less", "curl"]);
}

#[test]
fn repos_are_signed_unless_marked_trusted() {
    let yaml = with(
        "repos:\n  - {name: d, suite: bookworm}\n  - {name: local, suite: bookworm, uri: 'file:///srv/r', trusted: true}",
    );
    let s = Spec::from_yaml(&yaml, "t").unwrap();
    assert!(!s.repos[0].trusted);
    assert!(s.repos[1].trusted);
    assert!(
        !problems(&with(
            "repos:\n  - {name: d, suite: bookworm, trusted: maybe}"
        ))
        .is_empty()
    );
}

#[test]
fn base_names() {
    let s = Spec::from_yaml(GOOD, "t").unwrap();
    assert_eq!(image_base_name("test", &s.images[0]), "test-root");
    assert_eq!(image_base_name("test", &s.images[1]), "test-boot");
}

#[test]
fn flat_repos_and_keys() {
    let repo = |extra: &str| {
        fields(&with(&format!(
            "repos:\n  - {{name: d, suite: bookworm}}\n  - {{name: e, uri: 'file:///srv/r', {extra}}}"
        )))
    };
    for good in ["suite: ./", "suite: ./stable/", "suite: pool/main/"] {
        assert!(repo(good).is_empty(), "{good}: {:?}", repo(good));
    }
    // A flat repository has no components.
    let f = repo("suite: ./, section: main");
    assert!(
        f.iter().any(|f| f.starts_with("repos[1].section:")),
        "{f:?}"
    );
    // The bootstrap needs `dists/`.
    let f = fields(&with("repos:\n  - {name: d, suite: ./}"));
    assert!(f.iter().any(|f| f.starts_with("repos[0].suite:")), "{f:?}");
    // A key and `trusted` contradict each other.
    let f = repo("suite: ./, trusted: true, key: k.asc");
    assert!(
        f.iter()
            .any(|f| f.starts_with("repos[1].key:") && f.contains("trusted")),
        "{f:?}"
    );
    // An inline block that is not a public key is refused while validating.
    let f = repo(
        "suite: ./, key: \"-----BEGIN PGP PUBLIC KEY BLOCK-----\\n\\nnot base64\\n-----END PGP PUBLIC KEY BLOCK-----\\n\"",
    );
    assert!(f.iter().any(|f| f.starts_with("repos[1].key:")), "{f:?}");
}

#[test]
fn a_missing_key_file_is_named() {
    let dir = scratch();
    let path = dir.path().join("s.yaml");
    let text = with(
        "repos:\n  - {name: d, suite: bookworm}\n  - {name: v, suite: bookworm, key: vendor.asc}",
    );
    std::fs::write(&path, &text).unwrap();
    let e = Spec::from_file(&path).unwrap_err();
    assert!(
        e.problems
            .iter()
            .any(|p| p.field == "repos[1].key" && p.message.contains("vendor.asc")),
        "{:?}",
        e.problems
    );
    std::fs::write(dir.path().join("vendor.asc"), "x").unwrap();
    assert!(Spec::from_file(&path).is_ok());
}

#[test]
fn attachments_take_three_forms() {
    let s = Spec::from_yaml(
        &with(
            "attachments:\n  - /etc/os-release\n  - {path: '/boot/config-*'}\n  - {package: openssh-server}\n  - {package: 'libc6:amd64'}",
        ),
        "t.yaml",
    )
    .unwrap();
    assert_eq!(
        s.attachments,
        [
            Attachment::Path("/etc/os-release".into()),
            Attachment::Path("/boot/config-*".into()),
            Attachment::Package {
                package: "openssh-server".into()
            },
            Attachment::Package {
                package: "libc6:amd64".into()
            },
        ]
    );
    // What the plan digests: the string form for a path, a mapping for a package.
    assert_eq!(
        serde_json::to_string(&s.attachments).unwrap(),
        r#"["/etc/os-release","/boot/config-*",{"package":"openssh-server"},{"package":"libc6:amd64"}]"#
    );
}

#[test]
fn attachments_refuse_unknown_keys_and_two_kinds_at_once() {
    for (entry, want) in [
        ("{pth: /etc/hostname}", "unknown field `pth`"),
        (
            "{path: /etc/hostname, mode: '0644'}",
            "unknown field `mode`",
        ),
        (
            "{path: /etc/hostname, package: base-files}",
            "exactly one of `path` and `package`",
        ),
        ("{}", "exactly one of `path` and `package`"),
        ("42", "an attachment"),
        ("[/etc/hostname]", "an attachment"),
    ] {
        let p = problems(&with(&format!("attachments:\n  - {entry}")));
        assert_eq!(p.len(), 1, "{entry}: {p:?}");
        assert!(p[0].message.contains(want), "{entry}: {}", p[0].message);
    }
}

#[test]
fn attachment_paths_and_packages_are_validated() {
    let yaml = with(
        "attachments:\n  - etc/hostname\n  - /etc/../etc/shadow\n  - /\n  - '/boot/[abc'\n  - \"/etc/a\\nb\"\n  - {package: Bad_Name}\n  - /etc//hostname\n  - /etc/./hostname\n  - {package: bash}\n  - {package: bash}\n  - '/etc/[!a-z]*'",
    );
    let got = fields(&yaml);
    let want = [
        "attachments[0]: `etc/hostname` must be an absolute path",
        "attachments[1]: `/etc/../etc/shadow` has a `..` component",
        "attachments[2]: `/` is the image's root directory",
        "attachments[3]: `/boot/[abc` has a `[` without its closing `]`",
        "attachments[4]: `/etc/a\\nb` holds a control character",
        "attachments[5].package: `Bad_Name` is not a Debian package name",
        "attachments[7]: is listed twice",
        "attachments[9]: is listed twice",
    ];
    assert_eq!(got.len(), want.len(), "{got:#?}");
    for (g, w) in got.iter().zip(want) {
        assert!(g.starts_with(w), "{g}\n  should start with\n{w}");
    }
    assert_eq!(
        check_image_path("//etc/./ssh//sshd_config").unwrap(),
        "/etc/ssh/sshd_config"
    );
    let long = format!("/{}", "a".repeat(256));
    assert!(check_image_path(&long).unwrap_err().contains("255 bytes"));
}

#[test]
fn an_inline_key_is_fine_from_an_untrusted_source() {
    let mut s = Spec::from_yaml(
        "version: 1\nname: t\nsuite: bookworm\nkind: tarball\n",
        "t.yaml",
    )
    .unwrap();
    let repo = |key: &str| Repo {
        name: "v".into(),
        uri: Some("https://v.example/debian".into()),
        suite: "bookworm".into(),
        section: None,
        priority: None,
        trusted: false,
        key: Some(key.into()),
    };
    s.repos = vec![repo(
        "-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nmDMEZ\n-----END PGP PUBLIC KEY BLOCK-----\n",
    )];
    assert!(s.untrusted_problems().is_empty());
    s.repos = vec![repo("vendor.asc")];
    let p = s.untrusted_problems();
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].field, "repos[0].key");
}
