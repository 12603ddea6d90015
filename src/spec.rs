//! The YAML spec (version 1): serde types, defaults, and validation with field paths.
//!
//! Parsing rejects unknown keys and wrong types; [`Spec::validate`] then collects every semantic
//! problem at once, each naming its field (`images[1].size`) and what is allowed. Nothing here
//! touches the system: a spec mistake is found before any side effect.

use std::collections::BTreeSet;
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

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

/// An apt repository.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Repo {
    /// A short name: names the preferences file and the metadata entry.
    pub name: String,
    /// `host`, or a URL; defaults to the spec's `mirror`.
    #[serde(default)]
    pub uri: Option<String>,
    /// The suite (`bookworm`, `bookworm-updates`, ...).
    pub suite: String,
    /// Components, space separated (`main contrib`).
    #[serde(default = "default_section")]
    pub section: String,
    /// apt pin priority for this repo; none means no pin (apt's default 500).
    #[serde(default)]
    pub priority: Option<i32>,
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
fn default_section() -> String {
    "main".into()
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

/// One problem in a spec: the field it is in and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
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
        let spec: Spec = serde_saphyr::from_str(text).map_err(|e| SpecError {
            source_name: source_name.to_string(),
            problems: vec![Problem {
                field: String::new(),
                message: parse_message(&e.to_string(), source_name),
            }],
        })?;
        let problems = spec.validate();
        if problems.is_empty() {
            Ok(spec)
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

    /// A spec file's text, or the error naming it.
    pub fn read_text(path: &Path) -> Result<String, SpecError> {
        std::fs::read_to_string(path).map_err(|e| SpecError {
            source_name: path.display().to_string(),
            problems: vec![Problem {
                field: String::new(),
                message: format!("cannot read the file: {e}"),
            }],
        })
    }

    /// Parses and validates the text of the spec file at `path`: relative paths in it start at
    /// the file's directory.
    pub fn from_yaml_at(text: &str, path: &Path) -> Result<Spec, SpecError> {
        let mut spec = Spec::from_yaml(text, &path.display().to_string())?;
        spec.base_dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        };
        Ok(spec)
    }

    /// Every semantic problem of a parsed spec; empty when it is valid.
    pub fn validate(&self) -> Vec<Problem> {
        let mut p = Problems::default();
        if self.version != SPEC_VERSION {
            p.add(
                "version",
                format!(
                    "{} is not supported (this debimg reads version 1)",
                    self.version
                ),
            );
        }
        if !is_file_name(&self.name) {
            p.add(
                "name",
                format!(
                    "`{}` must be 1-64 characters of letters, digits, `.`, `_`, `-`, not starting with `.` or `-`",
                    self.name
                ),
            );
        }
        if !is_debian_token(&self.arch) {
            p.add(
                "arch",
                format!("`{}` is not a Debian architecture name", self.arch),
            );
        }
        if !is_debian_token(&self.suite) {
            p.add("suite", format!("`{}` is not a suite name", self.suite));
        }
        check_mirror(&mut p, "mirror", &self.mirror);
        for (i, pkg) in self.bootstrap_include.iter().enumerate() {
            check_package(&mut p, &format!("bootstrap_include[{i}]"), pkg);
        }
        for (i, pkg) in self.packages.iter().enumerate() {
            check_package(&mut p, &format!("packages[{i}]"), pkg);
        }
        let mut repo_names = BTreeSet::new();
        for (i, r) in self.repos.iter().enumerate() {
            let f = format!("repos[{i}]");
            if !is_debian_token(&r.name) {
                p.add(
                    format!("{f}.name"),
                    format!(
                        "`{}` must be letters, digits, `.`, `_`, `-` (it names a file)",
                        r.name
                    ),
                );
            } else if !repo_names.insert(r.name.as_str()) {
                p.add(
                    format!("{f}.name"),
                    format!("`{}` is used by another repo", r.name),
                );
            }
            if let Some(uri) = &r.uri {
                check_mirror(&mut p, &format!("{f}.uri"), uri);
            }
            if !is_debian_token(&r.suite) {
                p.add(
                    format!("{f}.suite"),
                    format!("`{}` is not a suite name", r.suite),
                );
            }
            if r.section.split_whitespace().next().is_none()
                || !r.section.split_whitespace().all(is_debian_token)
            {
                p.add(
                    format!("{f}.section"),
                    format!(
                        "`{}` must be one or more component names separated by spaces",
                        r.section
                    ),
                );
            }
            if let Some(prio) = r.priority
                && !(-1000..=10000).contains(&prio)
            {
                p.add(
                    format!("{f}.priority"),
                    format!("{prio} is outside -1000..10000"),
                );
            }
        }
        if let Some(first) = self.repos.first()
            && first.suite != self.suite
        {
            p.add(
                "repos[0].suite",
                format!(
                    "`{}` differs from `suite` (`{}`): the first repo is the one debootstrap installs from",
                    first.suite, self.suite
                ),
            );
        }
        match self.kind {
            Kind::FsImages => self.validate_images(&mut p),
            Kind::Tarball | Kind::Disk => {
                if !self.images.is_empty() {
                    p.add(
                        "images",
                        format!(
                            "a `{}` has no `images`: remove them (or use `kind: fs-images`)",
                            self.kind.name()
                        ),
                    );
                }
            }
        }
        match (&self.disk, self.kind) {
            (Some(d), Kind::Disk) => self.validate_disk(d, &mut p),
            (None, Kind::Disk) => p.add("disk", "`kind: disk` needs a `disk` (size, partitions)"),
            (Some(_), k) => p.add(
                "disk",
                format!(
                    "only `kind: disk` has a `disk` (this spec is `{}`)",
                    k.name()
                ),
            ),
            (None, _) => {}
        }
        self.validate_system(&mut p);
        self.validate_selection(&mut p);
        if let Some(px) = &self.proxies {
            for (field, v) in [("http", &px.http), ("https", &px.https)] {
                if let Some(url) = v
                    && !is_url(url)
                {
                    p.add(
                        format!("proxies.{field}"),
                        format!("`{url}` is not an http(s) URL"),
                    );
                }
            }
            for (i, h) in px.direct.iter().enumerate() {
                if !is_hostname(h) {
                    p.add(
                        format!("proxies.direct[{i}]"),
                        format!("`{h}` is not a host name"),
                    );
                }
            }
        }
        if let Some(hash) = &self.root_password_hash
            && !is_crypt_hash(hash)
        {
            p.add(
                "root_password_hash",
                "must be a crypt(3) hash such as `$6$salt$...` or `$y$...` (make one with `mkpasswd`), or `!` to lock the account; plain passwords are not accepted",
            );
        }
        if !is_hostname(&self.hostname) {
            p.add(
                "hostname",
                format!("`{}` is not a valid host name", self.hostname),
            );
        }
        p.0
    }

    fn validate_system(&self, p: &mut Problems) {
        if let Some(tz) = &self.timezone
            && !is_relative_path(tz)
        {
            p.add(
                "timezone",
                format!("`{tz}` must be a zone name under /usr/share/zoneinfo, such as `Europe/Berlin` or `UTC`"),
            );
        }
        if let Some(l) = &self.locale
            && !is_locale(l)
        {
            p.add(
                "locale",
                format!(
                    "`{l}` is not a locale name such as `en_US.UTF-8`, `de_DE@euro` or `C.UTF-8`"
                ),
            );
        }
        let mut names = BTreeSet::new();
        for (i, u) in self.users.iter().enumerate() {
            let f = format!("users[{i}]");
            if !is_user_name(&u.name) {
                p.add(
                    format!("{f}.name"),
                    format!("`{}` must be a lowercase user name: a letter or `_`, then letters, digits, `_`, `-` (at most 32)", u.name),
                );
            } else if u.name == "root" {
                p.add(
                    format!("{f}.name"),
                    "root exists already; set `root_password_hash` instead",
                );
            } else if !names.insert(u.name.as_str()) {
                p.add(format!("{f}.name"), format!("`{}` is listed twice", u.name));
            }
            for (j, g) in u.groups.iter().enumerate() {
                if !is_user_name(g) {
                    p.add(
                        format!("{f}.groups[{j}]"),
                        format!("`{g}` is not a group name"),
                    );
                }
            }
            if !u.shell.starts_with('/') || u.shell.contains(char::is_whitespace) {
                p.add(
                    format!("{f}.shell"),
                    format!("`{}` must be an absolute path", u.shell),
                );
            }
            if let Some(h) = &u.password_hash
                && !is_crypt_hash(h)
            {
                p.add(
                    format!("{f}.password_hash"),
                    "must be a crypt(3) hash such as `$6$salt$...` (make one with `mkpasswd`), or `!` to lock the password",
                );
            }
            for (j, k) in u.ssh_authorized_keys.iter().enumerate() {
                if k.trim().is_empty() || k.contains('\n') {
                    p.add(
                        format!("{f}.ssh_authorized_keys[{j}]"),
                        "must be one non-empty line such as `ssh-ed25519 AAAA... user@host`",
                    );
                }
            }
        }
        for (field, list) in [
            ("enable", &self.services.enable),
            ("disable", &self.services.disable),
        ] {
            for (i, unit) in list.iter().enumerate() {
                if !is_unit_name(unit) {
                    p.add(
                        format!("services.{field}[{i}]"),
                        format!("`{unit}` is not a systemd unit name such as `ssh` or `systemd-networkd.service`"),
                    );
                }
            }
        }
        for (i, file) in self.files.iter().enumerate() {
            let f = format!("files[{i}]");
            match (&file.source, &file.content) {
                (None, None) | (Some(_), Some(_)) => {
                    p.add(f.clone(), "give exactly one of `source` and `content`")
                }
                (Some(src), None) if src.is_empty() || src.contains('\0') => {
                    p.add(format!("{f}.source"), "must be a path")
                }
                _ => {}
            }
            if let Err(msg) = check_mount_point(&file.dest) {
                p.add(format!("{f}.dest"), msg.replace("(it goes into fstab)", ""));
            } else if file.dest == "/" {
                p.add(format!("{f}.dest"), "must name a file, not `/`");
            }
            if parse_mode(&file.mode).is_none() {
                p.add(
                    format!("{f}.mode"),
                    format!(
                        "`{}` must be octal permission bits such as \"0644\" or \"0755\"",
                        file.mode
                    ),
                );
            }
            match file.owner.split_once(':') {
                Some((u, g)) if is_user_name(u) && is_user_name(g) => {}
                _ => p.add(
                    format!("{f}.owner"),
                    format!("`{}` must be `user:group` (names in the image)", file.owner),
                ),
            }
        }
        for (i, s) in self.post.iter().enumerate() {
            let f = format!("post[{i}]");
            if s.script.trim().is_empty() {
                p.add(format!("{f}.script"), "is empty");
            }
            if !s.interpreter.starts_with('/') || s.interpreter.contains(char::is_whitespace) {
                p.add(
                    format!("{f}.interpreter"),
                    format!(
                        "`{}` must be an absolute path such as /bin/sh or /usr/bin/python3",
                        s.interpreter
                    ),
                );
            }
            if let Some(n) = &s.name
                && (n.is_empty() || n.contains(char::is_control))
            {
                p.add(format!("{f}.name"), "must be a non-empty single line");
            }
        }
        let mut seen = BTreeSet::new();
        for (i, r) in self.records.iter().enumerate() {
            if !seen.insert(*r) {
                p.add(
                    format!("records[{i}]"),
                    format!("`{}` is listed twice", r.extension()),
                );
            }
        }
    }

    fn validate_selection(&self, p: &mut Problems) {
        for (i, pat) in self.exclude.iter().enumerate() {
            if !is_exclude_pattern(pat) {
                p.add(
                    format!("exclude[{i}]"),
                    format!("`{pat}` must be a package name, optionally with one `*` at its start or end (`*-doc`, `libreoffice-*`)"),
                );
            }
        }
        for (i, pkg) in self.packages.iter().enumerate() {
            if self.exclude.iter().any(|pat| exclude_matches(pat, pkg)) {
                p.add(
                    format!("packages[{i}]"),
                    format!("`{pkg}` is also excluded by `exclude`"),
                );
            }
        }
        for (i, deb) in self.local_debs.iter().enumerate() {
            if !deb.ends_with(".deb") || deb.contains('\0') || deb.contains('\n') {
                p.add(
                    format!("local_debs[{i}]"),
                    format!("`{deb}` must be a path to a `.deb` file"),
                );
            }
        }
        for (i, t) in self.tasks.iter().enumerate() {
            if !is_package_name(&format!("task-{t}")) || t.starts_with("task-") || t.contains(':') {
                p.add(
                    format!("tasks[{i}]"),
                    format!("`{t}` must be a task name as tasksel lists it, such as `ssh-server` (without `task-`)"),
                );
            }
        }
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
            .is_some_and(|l| !crate::debian::settings::BUILTIN_LOCALES.contains(&l))
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

    fn validate_disk(&self, d: &Disk, p: &mut Problems) {
        let parts = &d.partitions;
        if parts.is_empty() {
            p.add(
                "disk.partitions",
                "at least one partition is needed (one mounted at `/`)",
            );
            return;
        }
        if d.table == PartitionTable::Mbr && parts.len() > 4 {
            p.add(
                "disk.partitions",
                "an `mbr` table holds at most 4 partitions",
            );
        }
        if d.boot.is_empty() {
            p.add("disk.boot", "give `bios`, `uefi` or both");
        }
        if d.formats.is_empty() {
            p.add(
                "disk.formats",
                "give at least one of raw, qcow2, qcow2-compressed, gzip",
            );
        }
        let mut seen_formats = BTreeSet::new();
        for (i, f) in d.formats.iter().enumerate() {
            if !seen_formats.insert(*f) {
                p.add(format!("disk.formats[{i}]"), "is listed twice");
            }
        }
        if self.arch != "amd64" {
            p.add(
                "arch",
                format!(
                    "a bootable disk is built for amd64 (GRUB i386-pc and x86_64-efi), not `{}`",
                    self.arch
                ),
            );
        }
        if d.formats.contains(&DiskFormat::Qcow2)
            && d.formats.contains(&DiskFormat::Qcow2Compressed)
        {
            p.add(
                "disk.formats",
                "`qcow2` and `qcow2-compressed` both name `<name>.qcow2`: choose one",
            );
        }
        // It ends up in /etc/default/grub (a shell file) and in grub.cfg (GRUB script).
        if !d
            .cmdline
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || " ._,:=/+@-".contains(c))
            || d.cmdline.split_whitespace().any(|w| w.starts_with("root="))
        {
            p.add(
                "disk.cmdline",
                "may hold only letters, digits, spaces and `._,:=/+@-`, and no `root=` (debimg sets it by UUID)",
            );
        }
        if d.table == PartitionTable::Mbr && d.size.0 > 2 * TIB {
            p.add(
                "disk.size",
                "an `mbr` disk holds at most 2TiB: use `table: gpt`",
            );
        }
        if d.grow
            && parts
                .last()
                .is_some_and(|l| l.mount.as_deref() != Some("/"))
        {
            p.add(
                "disk.grow",
                "the root grows into the space after it: make the partition mounted at `/` the last one",
            );
        }
        let mut total: u64 = 0;
        let mut mounts = BTreeSet::new();
        for (i, part) in parts.iter().enumerate() {
            let f = format!("disk.partitions[{i}]");
            let bios = part.flags.contains(&PartitionFlag::BiosBoot);
            let esp = part.flags.contains(&PartitionFlag::Esp);
            if let Some(t) = &part.part_type
                && !is_partition_type(d.table, t)
            {
                p.add(
                    format!("{f}.type"),
                    match d.table {
                        PartitionTable::Gpt => format!("`{t}` is not a GPT type GUID or one of linux, root-x86-64, home, srv, var, swap"),
                        PartitionTable::Mbr => format!("`{t}` is not an MBR type (two hex digits such as 83)"),
                    },
                );
            }
            if let Some(l) = &part.label
                && (l.is_empty() || l.len() > 36 || l.contains(['"', '\\', ',', '\n']))
            {
                p.add(format!("{f}.label"), format!("`{l}` cannot name a partition (1-36 characters, no quotes, commas or backslashes)"));
            }
            match part.size {
                // sfdisk places partitions on whole MiB.
                Some(s) => total = total.saturating_add(s.0.div_ceil(MIB) * MIB),
                None if i + 1 == parts.len() => {
                    // The rest must hold the last filesystem.
                    let need = part.fs.map_or(MIB, |fs| fs.min_size());
                    if total.saturating_add(2 * MIB).saturating_add(need) > d.size.0 {
                        p.add(
                            format!("{f}.size"),
                            format!(
                                "the rest of the disk is too small for it (at least {} needed)",
                                Size(need)
                            ),
                        );
                    }
                }
                None => p.add(
                    format!("{f}.size"),
                    "only the last partition may leave out `size` (it takes the rest)",
                ),
            }
            if bios && esp {
                p.add(
                    format!("{f}.flags"),
                    "a partition is `bios-boot` or `esp`, not both",
                );
            }
            if (bios || esp) && part.part_type.is_some() {
                p.add(
                    format!("{f}.type"),
                    "a `bios-boot` or `esp` partition has the type of its role: leave out `type`",
                );
            }
            if esp
                && let Some(m) = &part.mount
                && m != "/boot/efi"
                && m != "/efi"
            {
                p.add(
                    format!("{f}.mount"),
                    format!("`{m}`: an `esp` is mounted at /boot/efi (the default) or /efi"),
                );
            }
            if bios {
                if d.table == PartitionTable::Mbr {
                    p.add(
                        format!("{f}.flags"),
                        "`bios-boot` is for GPT; on MBR, GRUB sits after the MBR",
                    );
                }
                if part.fs.is_some() || part.mount.is_some() {
                    p.add(
                        f.clone(),
                        "a `bios-boot` partition has no `fs` and no `mount`",
                    );
                }
                if part.size.is_some_and(|s| s.0 < MIB) {
                    p.add(
                        format!("{f}.size"),
                        "a `bios-boot` partition needs at least 1MiB",
                    );
                }
                continue;
            }
            if esp {
                if part.fs.is_some() {
                    p.add(format!("{f}.fs"), "an `esp` is always FAT: leave out `fs`");
                }
                if part.size.is_some_and(|s| s.0 < 64 * MIB) {
                    p.add(format!("{f}.size"), "an `esp` needs at least 64MiB (FAT32)");
                }
                if let Some(l) = &part.label
                    && (l.is_empty()
                        || l.len() > 11
                        || !l
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || "_-".contains(c)))
                {
                    p.add(
                        format!("{f}.label"),
                        format!("`{l}` must be 1-11 letters, digits, `_`, `-` for FAT"),
                    );
                }
            } else {
                match part.fs {
                    None => p.add(
                        format!("{f}.fs"),
                        "give the filesystem (ext4, xfs, ...), or a flag `bios-boot` or `esp`",
                    ),
                    Some(fs) => {
                        if part.size.is_some_and(|s| s.0 < fs.min_size()) {
                            p.add(
                                format!("{f}.size"),
                                format!("too small for {fs} (at least {})", Size(fs.min_size())),
                            );
                        }
                        if let Some(l) = &part.label
                            && (l.is_empty()
                                || l.len() > fs.max_label_len()
                                || !l
                                    .chars()
                                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)))
                        {
                            p.add(
                                format!("{f}.label"),
                                format!(
                                    "`{l}` must be 1-{} letters, digits, `.`, `_`, `-` for {fs}",
                                    fs.max_label_len()
                                ),
                            );
                        }
                    }
                }
                if part.mount.is_none() {
                    p.add(
                        format!("{f}.mount"),
                        "give the mount point of this filesystem",
                    );
                }
            }
            let mount = part.mount.clone().unwrap_or_else(|| {
                if esp {
                    "/boot/efi".into()
                } else {
                    String::new()
                }
            });
            if !mount.is_empty() {
                match check_mount_point(&mount) {
                    Err(msg) => p.add(format!("{f}.mount"), msg),
                    Ok(()) => {
                        if !mounts.insert(mount.clone()) {
                            p.add(
                                format!("{f}.mount"),
                                format!("`{mount}` is used by another partition"),
                            );
                        }
                    }
                }
            }
            for (j, opt) in part.mkfs_options.iter().enumerate() {
                if opt.is_empty() || opt.contains('\0') || opt.contains('\n') {
                    p.add(
                        format!("{f}.mkfs_options[{j}]"),
                        "must be a non-empty single-line argument",
                    );
                }
            }
        }
        if !mounts.contains("/") {
            p.add("disk.partitions", "no partition is mounted at `/`");
        }
        // GPT keeps 1 MiB at the start for alignment and 33 sectors at the end for its copy.
        if total.saturating_add(2 * MIB) > d.size.0 {
            p.add(
                "disk.size",
                format!(
                    "{} cannot hold the partitions ({} and 2MiB for the table)",
                    d.size,
                    Size(total)
                ),
            );
        }
        if d.size.0 > MAX_IMAGE_SIZE {
            p.add(
                "disk.size",
                format!("{} is larger than {}", d.size, Size(MAX_IMAGE_SIZE)),
            );
        }
        if d.boot.contains(&Firmware::Uefi)
            && !parts.iter().any(|x| x.flags.contains(&PartitionFlag::Esp))
        {
            p.add("disk.boot", "`uefi` needs a partition with the flag `esp`");
        }
        if d.boot.contains(&Firmware::Bios)
            && d.table == PartitionTable::Gpt
            && !parts
                .iter()
                .any(|x| x.flags.contains(&PartitionFlag::BiosBoot))
        {
            p.add(
                "disk.boot",
                "`bios` on a GPT disk needs a partition with the flag `bios-boot` (1MiB)",
            );
        }
        if !self.packages.iter().any(|x| x.starts_with("linux-image-")) {
            p.add(
                "packages",
                "a bootable disk needs a kernel: add linux-image-amd64 (or linux-image-cloud-amd64)",
            );
        }
    }

    fn validate_images(&self, p: &mut Problems) {
        if self.images.is_empty() {
            p.add(
                "images",
                "at least one image is needed (one mounted at `/`)",
            );
            return;
        }
        let mut mounts = BTreeSet::new();
        let mut outputs = BTreeSet::new();
        for (i, img) in self.images.iter().enumerate() {
            let f = format!("images[{i}]");
            match check_mount_point(&img.mount) {
                Err(msg) => p.add(format!("{f}.mount"), msg),
                Ok(()) => {
                    if !mounts.insert(img.mount.trim_end_matches('/').to_string()) {
                        p.add(
                            format!("{f}.mount"),
                            format!("`{}` is used by another image", img.mount),
                        );
                    }
                }
            }
            if img.size.0 < img.fs.min_size() {
                p.add(
                    format!("{f}.size"),
                    format!(
                        "{} is too small for {} (at least {})",
                        img.size,
                        img.fs,
                        Size(img.fs.min_size())
                    ),
                );
            } else if img.size.0 > MAX_IMAGE_SIZE {
                p.add(
                    format!("{f}.size"),
                    format!("{} is larger than {}", img.size, Size(MAX_IMAGE_SIZE)),
                );
            }
            if let Some(label) = &img.label
                && (label.is_empty()
                    || label.len() > img.fs.max_label_len()
                    || !label
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)))
            {
                p.add(
                        format!("{f}.label"),
                        format!(
                            "`{label}` must be 1-{} characters of letters, digits, `.`, `_`, `-` for {}",
                            img.fs.max_label_len(),
                            img.fs
                        ),
                    );
            }
            for (j, opt) in img.mkfs_options.iter().enumerate() {
                if opt.is_empty() || opt.contains('\0') || opt.contains('\n') {
                    p.add(
                        format!("{f}.mkfs_options[{j}]"),
                        "must be a non-empty single-line argument",
                    );
                }
            }
            if let Some(out) = &img.output
                && !is_file_name(out)
            {
                p.add(
                    format!("{f}.output"),
                    format!(
                        "`{out}` must be a plain file name: letters, digits, `.`, `_`, `-`, no `/` or `..`"
                    ),
                );
            }
            let out = image_base_name(&self.name, img);
            if !outputs.insert(out.clone()) {
                p.add(
                    format!("{f}.output"),
                    format!("`{out}` is the output name of another image"),
                );
            }
        }
        if !mounts.contains("") {
            p.add("images", "no image is mounted at `/`");
        }
        // Every image must sit on the image tree: its parent directories belong to some image,
        // which holds when `/` exists; nesting is then implied by the mount order.
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
fn edit_distance(a: &str, b: &str) -> usize {
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

/// Base name (without `.img`) of an image's output files.
pub fn image_base_name(spec_name: &str, img: &Image) -> String {
    if let Some(out) = &img.output {
        return out.clone();
    }
    let slug = img.mount.trim_matches('/').replace('/', "-");
    if slug.is_empty() {
        format!("{spec_name}-root")
    } else {
        format!("{spec_name}-{slug}")
    }
}

#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            field: field.into(),
            message: message.into(),
        });
    }
}

fn check_mount_point(m: &str) -> Result<(), String> {
    if !m.starts_with('/') {
        return Err(format!("`{m}` must be an absolute path (start with `/`)"));
    }
    if m.len() > 1 && m.ends_with('/') {
        return Err(format!("`{m}` must not end with `/`"));
    }
    for comp in m.split('/').skip(1) {
        if m == "/" {
            break;
        }
        if comp.is_empty() || comp == "." || comp == ".." {
            return Err(format!(
                "`{m}` must be a normalized path: no empty, `.` or `..` components"
            ));
        }
        if !comp
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-+@".contains(c))
        {
            return Err(format!(
                "`{m}` may only hold letters, digits and `._-+@` in its components (it goes into fstab)"
            ));
        }
    }
    Ok(())
}

fn check_mirror(p: &mut Problems, field: &str, value: &str) {
    if value != "host" && !is_url(value) && !value.starts_with("file:///") {
        p.add(
            field,
            format!("`{value}` must be `host` (the build host's own mirror) or an http(s):// or file:/// URL"),
        );
    }
}

fn check_package(p: &mut Problems, field: &str, name: &str) {
    if !is_package_name(name) {
        p.add(
            field,
            format!(
                "`{name}` is not a Debian package name (lowercase letters, digits, `+`, `-`, `.`; at least 2 characters, starting with a letter or digit; optionally `:arch`)"
            ),
        );
    }
}

/// Debian policy 5.6.1: `[a-z0-9][a-z0-9+.-]+`, optionally qualified with `:arch`.
pub fn is_package_name(name: &str) -> bool {
    let (pkg, arch) = match name.split_once(':') {
        Some((p, a)) => (p, Some(a)),
        None => (name, None),
    };
    let ok_pkg = pkg.len() >= 2
        && pkg
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && pkg
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+.-".contains(c));
    ok_pkg && arch.is_none_or(is_debian_token)
}

fn is_debian_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && !s.starts_with(['-', '.'])
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

fn is_file_name(s: &str) -> bool {
    is_debian_token(s) && s != "." && s != ".." && !s.contains("..")
}

/// An http(s) URL with a host and nothing a config file line could trip on.
pub fn is_url(s: &str) -> bool {
    let rest = match s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"))
    {
        Some(r) => r,
        None => return false,
    };
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = host.rsplit('@').next().unwrap_or("");
    !host.is_empty()
        && !s
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '"' || c == ';' || c == '\\')
}

fn is_hostname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// GPT type aliases and their GUIDs.
pub const GPT_TYPE_ALIASES: &[(&str, &str)] = &[
    ("linux", "0FC63DAF-8483-4772-8E79-3D69D8477DE4"),
    ("root-x86-64", "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"),
    ("home", "933AC7E1-2EB4-4F13-B844-0E14E2AEF915"),
    ("srv", "3B8F8425-20E0-4F3B-907F-1A25A76F98E8"),
    ("var", "4D21B016-B534-45C2-A9FB-5C16E091FD2D"),
    ("swap", "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F"),
];

fn is_partition_type(table: PartitionTable, t: &str) -> bool {
    match table {
        PartitionTable::Mbr => t.len() == 2 && t.chars().all(|c| c.is_ascii_hexdigit()),
        PartitionTable::Gpt => {
            GPT_TYPE_ALIASES.iter().any(|(a, _)| *a == t)
                || (t.len() == 36
                    && t.char_indices().all(|(i, c)| {
                        if [8, 13, 18, 23].contains(&i) {
                            c == '-'
                        } else {
                            c.is_ascii_hexdigit()
                        }
                    }))
        }
    }
}

/// Whether `pkg` matches an `exclude` pattern: a name, `prefix*` or `*suffix`.
pub fn exclude_matches(pattern: &str, pkg: &str) -> bool {
    let pkg = pkg.split(':').next().unwrap_or(pkg);
    if let Some(prefix) = pattern.strip_suffix('*') {
        pkg.starts_with(prefix)
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        pkg.ends_with(suffix)
    } else {
        pkg == pattern
    }
}

fn is_exclude_pattern(pat: &str) -> bool {
    let core = pat
        .strip_prefix('*')
        .or_else(|| pat.strip_suffix('*'))
        .unwrap_or(pat);
    !core.is_empty()
        && !core.contains('*')
        && core
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+.-".contains(c))
        && (pat.contains('*') || is_package_name(pat))
}

/// Octal permission bits (`0644`, `755`, `4755`).
pub fn parse_mode(mode: &str) -> Option<u32> {
    if mode.is_empty() || mode.len() > 4 {
        return None;
    }
    u32::from_str_radix(mode, 8).ok()
}

fn is_user_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

fn is_unit_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && !s.starts_with(['-', '.'])
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || ":-_.@\\".contains(c))
}

fn is_locale(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-@".contains(c))
        && s.starts_with(|c: char| c.is_ascii_alphabetic())
}

/// A relative path of plain components (a zone name such as `America/Argentina/Buenos_Aires`).
fn is_relative_path(s: &str) -> bool {
    !s.is_empty()
        && s.split('/').all(|c| {
            !c.is_empty()
                && c != "."
                && c != ".."
                && c.chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || "._-+".contains(ch))
        })
}

fn is_crypt_hash(s: &str) -> bool {
    if s == "!" || s == "*" {
        return true;
    }
    let parts: Vec<&str> = s.split('$').collect();
    parts.len() >= 4
        && parts[0].is_empty()
        && !parts[1].is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "$./=,-".contains(c))
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn base_names() {
        let s = Spec::from_yaml(GOOD, "t").unwrap();
        assert_eq!(image_base_name("test", &s.images[0]), "test-root");
        assert_eq!(image_base_name("test", &s.images[1]), "test-boot");
    }
}
