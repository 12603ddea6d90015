//! The YAML spec (version 1): the serde types, their defaults and the parser.
//!
//! Parsing rejects unknown keys and wrong types; [`Spec::validate`] ([`validate`]) then collects
//! every semantic problem at once, each naming its field (`images[1].size`) and what is allowed;
//! the host files a spec names are checked in [`input`]. Nothing here depends on the modules
//! that act on the system: a spec mistake is found before any side effect.

use std::collections::BTreeSet;
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

pub mod glob;
mod input;
pub mod mkfs_options;
mod validate;

pub use input::*;
pub use validate::*;

/// The one spec version this debimg reads.
pub const SPEC_VERSION: u32 = 1;

/// The spec a user writes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// Spec format version; must be 1.
    pub version: u32,
    /// Names the outputs (`<name>-root.img.gz`) and the metadata file (`<name>.yaml`).
    pub name: String,
    /// Debian architecture of the image.
    #[serde(default = "default_arch")]
    pub arch: String,
    /// The suite debootstrap installs from (the first repo's suite when repos are given).
    pub suite: String,
    /// debootstrap variant.
    #[serde(default)]
    pub variant: Variant,
    /// `host` (the build host's own Debian mirror, read from its apt sources) or a URL.
    #[serde(default = "default_mirror")]
    pub mirror: String,
    /// Which program bootstraps the base system: `auto` takes mmdebstrap when the host has it
    /// (about twice as fast), else debootstrap.
    #[serde(default)]
    pub bootstrap: Bootstrap,
    /// Extra packages the bootstrap itself installs (its `--include`).
    #[serde(default)]
    pub bootstrap_include: Vec<String>,
    /// apt sources used during the build; empty means one repo: `mirror`, `suite`, `main`.
    #[serde(default)]
    pub repos: Vec<Repo>,
    /// Packages apt installs after the bootstrap.
    #[serde(default)]
    pub packages: Vec<String>,
    /// One sparse file, loop device and filesystem each (`fs-images`; none for `tarball` and
    /// `disk`).
    #[serde(default)]
    pub images: Vec<Image>,
    /// Proxies for debootstrap and apt during the build.
    #[serde(default)]
    pub proxies: Option<Proxies>,
    /// A crypt(3) hash for root (`$6$...`, `$y$...`), or `!`/`*` for a locked account.
    #[serde(default)]
    pub root_password_hash: Option<String>,
    /// The image's hostname.
    #[serde(default = "default_hostname")]
    pub hostname: String,
    /// Whether the final image keeps the spec's repos in its apt sources.
    #[serde(default = "default_true")]
    pub keep_apt_sources: bool,
    /// What the build produces: `fs-images` (one image file per filesystem, the default),
    /// `tarball` (the root filesystem as one `.tar.gz`, no loop devices, no `images`) or `disk`
    /// (one bootable disk described by `disk`).
    #[serde(default)]
    pub kind: Kind,
    /// Time zone under `/usr/share/zoneinfo` (e.g. `Europe/Berlin`); adds `tzdata`.
    #[serde(default)]
    pub timezone: Option<String>,
    /// Default locale (e.g. `en_US.UTF-8`): generated, and set in `/etc/default/locale`; adds
    /// `locales` unless glibc has it built in (`C`, `C.UTF-8`, `C.utf8`, `POSIX`).
    #[serde(default)]
    pub locale: Option<String>,
    /// Users to create.
    #[serde(default)]
    pub users: Vec<User>,
    /// systemd units to enable or disable (needs systemd in the image).
    #[serde(default)]
    pub services: Services,
    /// Files copied into the image after the packages are installed.
    #[serde(default)]
    pub files: Vec<FileSpec>,
    /// Packages never installed: names or `*` patterns (`*-doc`, `libreoffice-*`). They are
    /// pinned away during the build and purged if the bootstrap brought them.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Skip requested packages the repos do not have, with a warning, instead of failing.
    #[serde(default)]
    pub skip_missing: bool,
    /// Local `.deb` files (paths relative to the spec) installed with their dependencies.
    #[serde(default)]
    pub local_debs: Vec<String>,
    /// Debian tasks (tasksel), installed as their `task-<name>` packages: `ssh-server`,
    /// `web-server`, ... (the counterpart of kickstart groups).
    #[serde(default)]
    pub tasks: Vec<String>,
    /// Scripts run after the system is configured, in order.
    #[serde(default)]
    pub post: Vec<PostScript>,
    /// Package records written next to the images: `packages`, `files`, `licenses`.
    #[serde(default)]
    pub records: Vec<Record>,
    /// Copy the kernel and initrd out next to the images (`<name>.vmlinuz`, `<name>.initrd`).
    #[serde(default)]
    pub copy_kernel: bool,
    /// Build reproducibly, as of this time (seconds since 1970, UTC): every file time in the
    /// image is clamped to it, build-time residue (logs, caches, random seeds) is removed,
    /// filesystem UUIDs and hash seeds come from the spec, and ext2/3/4 images are written
    /// afresh from the finished tree, so two builds of the same spec and package set give
    /// byte-identical outputs. `SOURCE_DATE_EPOCH` in the environment sets it when the spec
    /// does not.
    #[serde(default)]
    pub source_date_epoch: Option<u64>,
    /// A lock file (relative to the spec's directory): the build installs exactly the package
    /// versions it names, the bootstrap's included, and fails naming each one its repository
    /// no longer has. Every build writes its own (`<name>.lock.yaml`).
    #[serde(default)]
    pub lock: Option<String>,
    /// Files of the finished image copied next to the outputs, under `<name>.attachments/`:
    /// absolute paths or globs in the image, or every file a package installed.
    #[serde(default)]
    pub attachments: Vec<Attachment>,
    /// The whole bootable disk of `kind: disk`: partition table, partitions, bootloaders and
    /// output formats.
    #[serde(default)]
    pub disk: Option<Disk>,
    /// The directory relative paths (`files[].source`, `local_debs`) start from: the spec
    /// file's directory. Not part of the YAML.
    #[serde(skip)]
    pub base_dir: std::path::PathBuf,
}

/// What kind of image a build produces.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// One image file per filesystem (sparse file, loop device, mkfs), as fuel-agent ships.
    #[default]
    FsImages,
    /// The root filesystem as a gzipped tar archive; no loop devices.
    Tarball,
    /// One bootable disk: a partition table, filesystems, GRUB for BIOS, UEFI or both.
    Disk,
}

impl Kind {
    /// The name in the spec.
    pub fn name(self) -> &'static str {
        match self {
            Kind::FsImages => "fs-images",
            Kind::Tarball => "tarball",
            Kind::Disk => "disk",
        }
    }
}

/// A bootable whole disk.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    /// Size of the disk (a sparse file): `4GiB`.
    pub size: Size,
    /// The partition table.
    #[serde(default)]
    pub table: PartitionTable,
    /// Firmware the disk boots with: GRUB is installed for each.
    #[serde(default = "default_firmware")]
    pub boot: Vec<Firmware>,
    /// Output files, each the whole disk: `raw` (`<name>.img`, sparse), `qcow2` or
    /// `qcow2-compressed` (`<name>.qcow2`), `gzip` (`<name>.img.gz`).
    #[serde(default = "default_formats")]
    pub formats: Vec<DiskFormat>,
    /// Grow the root partition and filesystem to the end of the disk at boot (cloud style,
    /// checked at every boot): a small image then fills whatever disk it is written to. Installs
    /// `/usr/lib/debimg/growroot` and `debimg-growroot.service` (needs systemd in the image);
    /// adds `cloud-guest-utils` and `fdisk`. The root should be the last partition.
    #[serde(default)]
    pub grow: bool,
    /// The kernel command line besides `root=UUID=...` (which debimg adds itself):
    /// `GRUB_CMDLINE_LINUX`, one line without `"` or `root=`.
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    /// Partitions in disk order.
    pub partitions: Vec<Partition>,
}

/// A partition of a disk.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Partition {
    /// Size of the partition; only the last one may leave it out, to take the rest of the disk.
    #[serde(default)]
    pub size: Option<Size>,
    /// Filesystem; none for `bios-boot` (raw GRUB core) and `esp` (always FAT).
    #[serde(default)]
    pub fs: Option<Fs>,
    /// Mount point; `esp` defaults to `/boot/efi`, `bios-boot` has none.
    #[serde(default)]
    pub mount: Option<String>,
    /// Filesystem label (an `esp` gets `ESP`), also the GPT partition name (without a label:
    /// `bios-boot`, `ESP` or the mount point).
    #[serde(default)]
    pub label: Option<String>,
    /// Partition type, instead of the one its role implies: on GPT a type GUID or one of
    /// `linux`, `root-x86-64`, `home`, `srv`, `var`, `swap`; on MBR two hex digits (`83`).
    #[serde(default, rename = "type")]
    pub part_type: Option<String>,
    /// What the partition is for.
    #[serde(default)]
    pub flags: Vec<PartitionFlag>,
    /// Extra arguments for `mkfs.<fs>` (`mkfs.vfat` for an `esp`; unused for `bios-boot`).
    #[serde(default)]
    pub mkfs_options: Vec<String>,
}

/// Partition table types.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum PartitionTable {
    /// GUID partition table (BIOS boot needs a `bios-boot` partition).
    #[default]
    Gpt,
    /// DOS/MBR table, at most four partitions.
    Mbr,
}

/// Firmware a disk boots with.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    /// Legacy BIOS: GRUB's boot code in the MBR, its core in the `bios-boot` partition (GPT) or
    /// after the MBR (MBR).
    Bios,
    /// UEFI: GRUB as `EFI/BOOT/BOOTX64.EFI` on the `esp` partition.
    Uefi,
}

/// Output formats of a disk.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum DiskFormat {
    /// The raw disk, copied sparsely (`<name>.img`).
    Raw,
    /// qcow2 made by qemu-img (`<name>.qcow2`).
    Qcow2,
    /// qcow2 with compressed clusters (`<name>.qcow2`): smaller, slower to write.
    Qcow2Compressed,
    /// The raw disk gzipped (`<name>.img.gz`).
    Gzip,
}

impl DiskFormat {
    /// The output file's name for a disk called `name`.
    pub fn file_name(self, name: &str) -> String {
        match self {
            DiskFormat::Raw => format!("{name}.img"),
            DiskFormat::Qcow2 | DiskFormat::Qcow2Compressed => format!("{name}.qcow2"),
            DiskFormat::Gzip => format!("{name}.img.gz"),
        }
    }

    /// The name in metadata (`container`).
    pub fn container_name(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 | DiskFormat::Qcow2Compressed => "qcow2",
            DiskFormat::Gzip => "gzip",
        }
    }
}

/// Roles of a partition.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum PartitionFlag {
    /// GPT BIOS boot partition holding GRUB's core image (1 MiB is plenty); no filesystem.
    BiosBoot,
    /// EFI system partition: FAT, made without mounting it (the build host's kernel needs no
    /// vfat), holding `EFI/BOOT/BOOTX64.EFI`.
    Esp,
    /// The legacy "active" flag some BIOSes want on an MBR disk (no effect on GPT).
    LegacyBoot,
}

/// A user account created in the image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct User {
    /// Login name.
    pub name: String,
    /// Supplementary groups; each must exist in the image (`sudo`, `adm` and Debian's other
    /// standard groups always do; others come with the package that makes them).
    #[serde(default)]
    pub groups: Vec<String>,
    /// Login shell.
    #[serde(default = "default_shell")]
    pub shell: String,
    /// crypt(3) hash, or `!` (the default) for a locked password (SSH keys still work).
    #[serde(default)]
    pub password_hash: Option<String>,
    /// Lines for `~/.ssh/authorized_keys`.
    #[serde(default)]
    pub ssh_authorized_keys: Vec<String>,
}

/// systemd units to enable and disable.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Services {
    /// Units enabled with `systemctl enable` (`ssh`, `systemd-networkd.service`, ...).
    #[serde(default)]
    pub enable: Vec<String>,
    /// Units disabled with `systemctl disable`.
    #[serde(default)]
    pub disable: Vec<String>,
}

/// A file put into the image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    /// Host file to copy, relative to the spec's directory; or give `content`.
    #[serde(default)]
    pub source: Option<String>,
    /// The file's text, instead of `source`.
    #[serde(default)]
    pub content: Option<String>,
    /// Absolute path in the image; parent directories are created.
    pub dest: String,
    /// Octal permission bits, e.g. `"0644"`.
    #[serde(default = "default_mode")]
    pub mode: String,
    /// `user:group` as named in the image.
    #[serde(default = "default_owner")]
    pub owner: String,
}

/// A script run at the end of `configure`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PostScript {
    /// A name for logs and errors; defaults to `post[<index>]`.
    #[serde(default)]
    pub name: Option<String>,
    /// The script's text.
    pub script: String,
    /// The program that runs it (inside the image when `chroot`, else on the build host).
    #[serde(default = "default_interpreter")]
    pub interpreter: String,
    /// Run inside the image's chroot (`true`) or on the build host (`false`).
    #[serde(default = "default_true")]
    pub chroot: bool,
    /// A failure is a warning instead of failing the build.
    #[serde(default)]
    pub may_fail: bool,
}

/// Package records written next to the images.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Record {
    /// `<name>.packages`: every installed package and its version.
    Packages,
    /// `<name>.files`: every package and its files.
    Files,
    /// `<name>.licenses`: licences counted, and listed per package.
    Licenses,
}

impl Record {
    /// The output file's extension.
    pub fn extension(self) -> &'static str {
        match self {
            Record::Packages => "packages",
            Record::Files => "files",
            Record::Licenses => "licenses",
        }
    }
}

/// What `attachments[]` copies out of the finished image: written as a plain string (a path),
/// `{path: ...}` or `{package: ...}`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Attachment {
    /// An absolute path in the image, or a glob (`*`, `?`, `[...]` within a component).
    Path(String),
    /// Every regular file a package installed, as dpkg lists it.
    Package {
        /// The package's name, optionally `:arch`.
        package: String,
    },
}

/// What `attachments[]` accepts, as parse errors (and the spec reference's test) say it.
pub const ATTACHMENT_EXPECTED: &str =
    "an attachment: an absolute path or glob in the image, or a mapping with `path` or `package`";

impl<'de> Deserialize<'de> for Attachment {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Attachment, D::Error> {
        /// The mapping form; unknown keys are refused as everywhere in the spec.
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Entry {
            #[serde(default)]
            path: Option<String>,
            #[serde(default)]
            package: Option<String>,
        }
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Attachment;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(ATTACHMENT_EXPECTED)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Attachment, E> {
                Ok(Attachment::Path(v.to_string()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Attachment, A::Error> {
                let e = Entry::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                match (e.path, e.package) {
                    (Some(path), None) => Ok(Attachment::Path(path)),
                    (None, Some(package)) => Ok(Attachment::Package { package }),
                    _ => Err(serde::de::Error::custom(
                        "an attachment gives exactly one of `path` and `package`",
                    )),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// An apt repository.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Repo {
    /// A short name: names the preferences file and the metadata entry.
    pub name: String,
    /// `host`, or a URL; defaults to the spec's `mirror`.
    #[serde(default)]
    pub uri: Option<String>,
    /// The suite (`bookworm`, `bookworm-updates`, ...), or for a flat repository its
    /// directory ending in `/` (`./`).
    pub suite: String,
    /// Components, space separated (`main contrib`); `main` when not given, none for a flat
    /// repository.
    #[serde(default)]
    pub section: Option<String>,
    /// apt pin priority for this repo; none means no pin (apt's default 500).
    #[serde(default)]
    pub priority: Option<i32>,
    /// A repository without a signature, explicitly: apt gets `[trusted=yes]` for it, every
    /// build warns and the metadata says so. Never the default.
    #[serde(default)]
    pub trusted: bool,
    /// The repository's OpenPGP key(s): a file (relative to the spec) or inline ASCII-armored
    /// text; binary or armored, one or several. apt checks the repo against these only.
    #[serde(default)]
    pub key: Option<String>,
}

impl Repo {
    /// A flat repository (`suite: ./`): a directory with `Packages` and `Release`, no `dists/`.
    pub fn is_flat(&self) -> bool {
        is_flat_suite(&self.suite)
    }

    /// The components as apt gets them: the given ones, `main` by default, none when flat.
    pub fn components(&self) -> String {
        match &self.section {
            Some(s) => s.split_whitespace().collect::<Vec<_>>().join(" "),
            None if self.is_flat() => String::new(),
            None => "main".into(),
        }
    }

    /// Whether `key` is the key itself (ASCII-armored text) rather than a file name.
    pub fn key_is_inline(&self) -> bool {
        self.key.as_deref().is_some_and(crate::openpgp::is_armored)
    }
}

/// The directory of an input file (a spec, fuel-agent's JSON): the files it names are
/// relative to it.
pub fn input_dir(path: &Path) -> std::path::PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    }
}

/// Whether a suite names a flat repository's directory (it ends in `/`).
pub fn is_flat_suite(suite: &str) -> bool {
    suite.ends_with('/')
}

/// One filesystem image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Image {
    /// Absolute mount point inside the image tree.
    pub mount: String,
    /// Filesystem type.
    pub fs: Fs,
    /// Size of the sparse file, e.g. `2GiB`, `256MiB` or a byte count.
    pub size: Size,
    /// Filesystem label.
    #[serde(default)]
    pub label: Option<String>,
    /// Extra arguments for mkfs, passed as separate arguments (never through a shell).
    #[serde(default)]
    pub mkfs_options: Vec<String>,
    /// How the image is shipped.
    #[serde(default)]
    pub container: Container,
    /// Base name of the output file (without `.img`/`.gz`); defaults to `<name>-<mount>`.
    #[serde(default)]
    pub output: Option<String>,
}

/// Proxies used while building (never written into the final image).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Proxies {
    /// Proxy URL for http sources.
    #[serde(default)]
    pub http: Option<String>,
    /// Proxy URL for https sources.
    #[serde(default)]
    pub https: Option<String>,
    /// Host names reached without the proxy.
    #[serde(default)]
    pub direct: Vec<String>,
}

/// The bootstrap backend a spec asks for.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Bootstrap {
    /// mmdebstrap when the build host has it, else debootstrap.
    #[default]
    Auto,
    Debootstrap,
    Mmdebstrap,
}

/// debootstrap variants.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    /// Essential packages and apt only.
    #[default]
    Minbase,
    /// Essential and build-essential.
    Buildd,
    /// Required and important packages (mmdebstrap adds the standard-priority ones).
    Standard,
}

impl Variant {
    /// The name debootstrap takes; `None` for its default (standard) variant.
    pub fn debootstrap_arg(self) -> Option<&'static str> {
        match self {
            Variant::Minbase => Some("minbase"),
            Variant::Buildd => Some("buildd"),
            Variant::Standard => None,
        }
    }
}

/// Filesystems debimg can make.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Fs {
    Ext2,
    Ext3,
    Ext4,
    Xfs,
    Btrfs,
}

impl Fs {
    /// The name mount(8), mkfs and fstab use.
    pub fn name(self) -> &'static str {
        match self {
            Fs::Ext2 => "ext2",
            Fs::Ext3 => "ext3",
            Fs::Ext4 => "ext4",
            Fs::Xfs => "xfs",
            Fs::Btrfs => "btrfs",
        }
    }

    /// True for the ext family (shrinkable with resize2fs, journal switchable with tune2fs).
    pub fn is_ext(self) -> bool {
        matches!(self, Fs::Ext2 | Fs::Ext3 | Fs::Ext4)
    }

    /// The smallest size mkfs accepts for this filesystem (xfsprogs 6 refuses under 300 MiB).
    pub fn min_size(self) -> u64 {
        match self {
            Fs::Ext2 | Fs::Ext3 | Fs::Ext4 => 16 * MIB,
            Fs::Xfs => 300 * MIB,
            Fs::Btrfs => 128 * MIB,
        }
    }

    /// Longest label the filesystem stores.
    pub fn max_label_len(self) -> usize {
        match self {
            Fs::Ext2 | Fs::Ext3 | Fs::Ext4 => 16,
            Fs::Xfs => 12,
            Fs::Btrfs => 255,
        }
    }
}

impl fmt::Display for Fs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How an image is shipped.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Container {
    /// A single-member gzip file (`.img.gz`).
    #[default]
    Gzip,
    /// The raw image (`.img`), copied sparsely.
    Raw,
}

impl Container {
    /// The name used in metadata.
    pub fn name(self) -> &'static str {
        match self {
            Container::Gzip => "gzip",
            Container::Raw => "raw",
        }
    }
}

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
const TIB: u64 = 1024 * GIB;

/// Largest image debimg agrees to make: anything bigger is taken for a typo.
pub const MAX_IMAGE_SIZE: u64 = 64 * TIB;

/// A size in bytes, written as a number or with a unit (`256MiB`, `2GiB`, `1G`, `500MB`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl Size {
    /// Parses `2GiB`, `2G` (binary), `2GB` (decimal), `512` (bytes).
    pub fn parse(text: &str) -> Result<Size, String> {
        let t = text.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let unit = unit.trim();
        let mult: u64 = match unit {
            "" | "B" => 1,
            "K" | "KiB" => KIB,
            "M" | "MiB" => MIB,
            "G" | "GiB" => GIB,
            "T" | "TiB" => TIB,
            "KB" => 1000,
            "MB" => 1000 * 1000,
            "GB" => 1000 * 1000 * 1000,
            "TB" => 1000 * 1000 * 1000 * 1000,
            _ => {
                return Err(format!(
                    "`{text}` has an unknown unit `{unit}` (use B, KiB, MiB, GiB, TiB, or KB, MB, GB, TB)"
                ));
            }
        };
        if num.is_empty() {
            return Err(format!("`{text}` is not a size (e.g. 2GiB, 256MiB)"));
        }
        let value: f64 = num
            .parse()
            .map_err(|_| format!("`{text}` is not a size (e.g. 2GiB, 256MiB)"))?;
        let bytes = value * mult as f64;
        if !bytes.is_finite() || bytes > u64::MAX as f64 {
            return Err(format!("`{text}` is too large"));
        }
        Ok(Size(bytes as u64))
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        for (unit, m) in [("TiB", TIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)] {
            if b >= m && b.is_multiple_of(m) {
                return write!(f, "{}{unit}", b / m);
            }
        }
        write!(f, "{b}")
    }
}

impl Serialize for Size {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Size, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size such as 2GiB, 256MiB or a byte count")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v)
                    .map(Size)
                    .map_err(|_| E::custom(format!("size {v} is negative")))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Size, E> {
                Size::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

fn default_arch() -> String {
    "amd64".into()
}
fn default_mirror() -> String {
    "host".into()
}
fn default_hostname() -> String {
    "debian".into()
}
fn default_true() -> bool {
    true
}
fn default_shell() -> String {
    "/bin/bash".into()
}
fn default_mode() -> String {
    "0644".into()
}
fn default_owner() -> String {
    "root:root".into()
}
fn default_firmware() -> Vec<Firmware> {
    vec![Firmware::Bios, Firmware::Uefi]
}
fn default_formats() -> Vec<DiskFormat> {
    vec![DiskFormat::Raw]
}
fn default_cmdline() -> String {
    "console=tty0 console=ttyS0,115200n8".into()
}
fn default_interpreter() -> String {
    "/bin/sh".into()
}

/// The YAML parser's options for what debimg reads. A spec is small, so aliases may replay at
/// most 20,000 events in all and nest 16 deep, and a document may define at most 10,000
/// anchors and aliases: a document that would expand into millions of nodes ("billion laughs")
/// is an error after that much work, in milliseconds and bounded memory, instead of taking the
/// host's memory.
pub fn yaml_options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_reader_input_bytes: Some(MAX_INPUT_BYTES as usize),
            max_aliases: 10_000,
            max_anchors: 10_000,
            max_documents: 1,
        },
        alias_limits: serde_saphyr::alias_limits! {
            max_total_replayed_events: 20_000,
            max_replay_stack_depth: 16,
        },
    }
}

/// Parses YAML with [`yaml_options`].
pub fn yaml_from_str<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, serde_saphyr::Error> {
    serde_saphyr::from_str_with_options(text, yaml_options())
}

/// One problem in a spec: the field it is in and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// Path of the field, e.g. `images[1].size`; empty for the document as a whole.
    pub field: String,
    /// What is wrong and what is allowed.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

/// A spec that could not be read or is invalid; carries every problem found.
#[derive(Debug, thiserror::Error)]
pub struct SpecError {
    /// Where the spec came from, for messages.
    pub source_name: String,
    /// Every problem found.
    pub problems: Vec<Problem>,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "{} is not a valid spec ({n} problem{}):",
            self.source_name,
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

impl Spec {
    /// Parses and validates a spec from YAML text.
    pub fn from_yaml(text: &str, source_name: &str) -> Result<Spec, SpecError> {
        let spec = Spec::parse(text, source_name)?;
        let problems = spec.validate();
        spec.unless(problems, source_name)
    }

    /// Parses YAML text into a spec, without validating it.
    fn parse(text: &str, source_name: &str) -> Result<Spec, SpecError> {
        yaml_from_str(text).map_err(|e| SpecError {
            source_name: source_name.to_string(),
            problems: vec![Problem {
                field: String::new(),
                message: parse_message(&e.to_string(), source_name),
            }],
        })
    }

    /// The spec, unless there are problems.
    fn unless(self, problems: Vec<Problem>, source_name: &str) -> Result<Spec, SpecError> {
        if problems.is_empty() {
            Ok(self)
        } else {
            Err(SpecError {
                source_name: source_name.to_string(),
                problems,
            })
        }
    }

    /// Reads, parses and validates a spec file.
    pub fn from_file(path: &Path) -> Result<Spec, SpecError> {
        Spec::from_yaml_at(&Spec::read_text(path)?, path)
    }

    /// A spec file's text, or the error naming it: a regular file of at most
    /// [`MAX_INPUT_BYTES`] in UTF-8 ([`read_input_text`]).
    pub fn read_text(path: &Path) -> Result<String, SpecError> {
        read_input_text(path, "a spec").map_err(|message| SpecError {
            source_name: path.display().to_string(),
            problems: vec![Problem {
                field: String::new(),
                message,
            }],
        })
    }

    /// Parses and validates the text of the spec file at `path`: relative paths in it start at
    /// the file's directory, and the host files they name must be regular files
    /// ([`Spec::check_host_inputs`]).
    pub fn from_yaml_at(text: &str, path: &Path) -> Result<Spec, SpecError> {
        let source_name = path.display().to_string();
        let mut spec = Spec::parse(text, &source_name)?;
        spec.base_dir = input_dir(path);
        let mut problems = spec.validate();
        problems.extend(spec.check_host_inputs());
        spec.unless(problems, &source_name)
    }

    /// Every package apt installs: `packages`, then the `task-*` packages of `tasks`, then what
    /// the settings need (`tzdata` for a timezone, `locales` for a locale).
    pub fn all_packages(&self) -> Vec<String> {
        let mut out = self.packages.clone();
        out.extend(self.tasks.iter().map(|t| format!("task-{t}")));
        if self.timezone.is_some() {
            out.push("tzdata".into());
        }
        if self
            .locale
            .as_deref()
            .is_some_and(|l| !BUILTIN_LOCALES.contains(&l))
        {
            out.push("locales".into());
        }
        if let (Kind::Disk, Some(d)) = (self.kind, &self.disk) {
            // GRUB's images and tools without the packages that install it on the build host.
            out.push("grub2-common".into());
            if d.boot.contains(&Firmware::Bios) {
                out.push("grub-pc-bin".into());
            }
            if d.boot.contains(&Firmware::Uefi) {
                out.push("grub-efi-amd64-bin".into());
            }
            if d.grow {
                out.extend(["cloud-guest-utils".to_string(), "fdisk".to_string()]);
                let root_fs = d
                    .partitions
                    .iter()
                    .find(|p| p.mount.as_deref() == Some("/"))
                    .and_then(|p| p.fs);
                match root_fs {
                    Some(Fs::Xfs) => out.push("xfsprogs".into()),
                    Some(Fs::Btrfs) => out.push("btrfs-progs".into()),
                    _ => {}
                }
            }
        }
        let mut seen = BTreeSet::new();
        out.retain(|p| seen.insert(p.clone()));
        out
    }
}

/// Tidies a YAML parser message: names the file instead of `<input>`, drops its own `error:`
/// prefix, and suggests the nearest field for a misspelt key.
fn parse_message(raw: &str, source_name: &str) -> String {
    let mut msg = raw
        .strip_prefix("error: ")
        .unwrap_or(raw)
        .replace("<input>", source_name);
    if let Some(rest) = msg.split("unknown field `").nth(1)
        && let Some((unknown, after)) = rest.split_once('`')
        && let Some(list) = after.strip_prefix(", expected one of ")
    {
        let list = list.lines().next().unwrap_or("");
        let best = list
            .split(", ")
            .map(|f| f.trim_matches('`'))
            .map(|f| (edit_distance(unknown, f), f))
            .min();
        if let Some((d, f)) = best
            && d <= 2
        {
            let first = msg.lines().next().unwrap_or("").to_string();
            msg = msg.replacen(&first, &format!("{first} (did you mean `{f}`?)"), 1);
        }
    }
    msg
}

/// Levenshtein distance, for "did you mean" hints.
pub(crate) fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}
/// Locales glibc has built in: they need neither the `locales` package nor locale-gen.
pub const BUILTIN_LOCALES: &[&str] = &["C", "C.UTF-8", "C.utf8", "POSIX"];

#[cfg(test)]
mod tests;
