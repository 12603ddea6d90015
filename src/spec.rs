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
    /// A repository without a signature, explicitly: apt gets `[trusted=yes]` for it, every
    /// build warns and the metadata says so. Never the default.
    #[serde(default)]
    pub trusted: bool,
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

/// Largest spec or fuel-agent input debimg reads, in bytes (1 MiB).
pub const MAX_INPUT_BYTES: u64 = 1024 * 1024;

/// Why a host file cannot be used as an input.
#[derive(Debug, thiserror::Error)]
pub enum HostFileError {
    /// It could not be looked at or opened.
    #[error("cannot be read: {0}")]
    Unreadable(std::io::Error),
    /// It is a directory, a device, a FIFO... ([`file_kind`]).
    #[error("is {0}, not a regular file")]
    NotRegular(&'static str),
    /// It lives on a kernel interface filesystem: its size means nothing (`/proc/kcore`
    /// claims 128 TiB) and reading it can block or never end.
    #[error("is a file of {0}, a kernel interface, not stored data")]
    KernelFile(&'static str),
}

/// The kernel interface filesystem `t` is, if it is one.
fn kernel_fs(t: nix::sys::statfs::FsType) -> Option<&'static str> {
    use nix::sys::statfs as f;
    [
        (f::PROC_SUPER_MAGIC, "procfs"),
        (f::SYSFS_MAGIC, "sysfs"),
        (f::DEBUGFS_MAGIC, "debugfs"),
        (f::TRACEFS_MAGIC, "tracefs"),
        (f::SECURITYFS_MAGIC, "securityfs"),
        (f::CGROUP_SUPER_MAGIC, "cgroupfs"),
        (f::CGROUP2_SUPER_MAGIC, "cgroupfs"),
        (f::BPF_FS_MAGIC, "bpffs"),
        (f::SELINUX_MAGIC, "selinuxfs"),
        (f::NSFS_MAGIC, "nsfs"),
    ]
    .into_iter()
    .find(|(m, _)| *m == t)
    .map(|(_, name)| name)
}

/// Whether `meta` (with `statfs` of the same file) is a regular file of stored data.
fn check_regular(
    meta: &std::fs::Metadata,
    statfs: nix::Result<nix::sys::statfs::Statfs>,
) -> Result<(), HostFileError> {
    if !meta.is_file() {
        return Err(HostFileError::NotRegular(file_kind(&meta.file_type())));
    }
    let statfs = statfs.map_err(|e| HostFileError::Unreadable(e.into()))?;
    match kernel_fs(statfs.filesystem_type()) {
        Some(fs) => Err(HostFileError::KernelFile(fs)),
        None => Ok(()),
    }
}

/// Checks from its metadata alone (nothing is opened) that the host file at `path` is a
/// regular file of stored data, symlinks followed.
pub fn check_host_file(path: &Path) -> Result<(), HostFileError> {
    let meta = std::fs::metadata(path).map_err(HostFileError::Unreadable)?;
    check_regular(&meta, nix::sys::statfs::statfs(path))
}

/// What a file is, for messages: `a directory`, `a character device`, `a FIFO`, ...
pub use crate::sys::file_kind;

/// Opens a host file to read it, only when it is a regular file of stored data (symlinks
/// followed; not on procfs, sysfs or another kernel interface), and returns it with its size. Its metadata is checked before it is opened (opening a device can
/// act: a watchdog starts counting) and again on the open file (it may have been swapped). It
/// is opened with `O_NONBLOCK`, so a FIFO put in its place in between cannot hang the open.
pub fn open_regular(path: &Path) -> Result<(std::fs::File, u64), HostFileError> {
    use std::os::unix::fs::OpenOptionsExt;
    check_host_file(path)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(HostFileError::Unreadable)?;
    let meta = file.metadata().map_err(HostFileError::Unreadable)?;
    check_regular(&meta, nix::sys::statfs::fstatfs(&file))?;
    Ok((file, meta.len()))
}

/// Reads a text input (`what`: "a spec", "a fuel-agent input"): a regular file
/// ([`open_regular`]) of at most [`MAX_INPUT_BYTES`], in UTF-8. At most the limit and one byte
/// are read, whatever the file claims. The error is a sentence about the file.
pub fn read_input_text(path: &Path, what: &str) -> Result<String, String> {
    use std::io::Read;
    let too_big = |size: u64| {
        format!("the file is {size} bytes: {what} may be at most {MAX_INPUT_BYTES} bytes (1 MiB)")
    };
    let (file, size) = open_regular(path).map_err(|e| format!("the file {e}"))?;
    if size > MAX_INPUT_BYTES {
        return Err(too_big(size));
    }
    let mut buf = Vec::with_capacity(size as usize);
    file.take(MAX_INPUT_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(|e| format!("the file cannot be read: {e}"))?;
    if buf.len() as u64 > MAX_INPUT_BYTES {
        return Err(too_big(buf.len() as u64));
    }
    String::from_utf8(buf).map_err(|e| {
        format!(
            "the file is not UTF-8 text (byte {} is not)",
            e.utf8_error().valid_up_to()
        )
    })
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
        spec.base_dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        };
        let mut problems = spec.validate();
        problems.extend(spec.check_host_inputs());
        spec.unless(problems, &source_name)
    }

    /// The host files the spec reads (`files[].source`, `local_debs`, relative to `base_dir`)
    /// that are missing or not regular files of stored data ([`check_host_file`]; symlinks are
    /// followed: the spec chooses host files on purpose). Only their metadata is read: nothing
    /// is opened, so a device or a FIFO can neither hang the build nor notice it.
    pub fn check_host_inputs(&self) -> Vec<Problem> {
        let sources = self
            .files
            .iter()
            .enumerate()
            .filter_map(|(i, f)| Some((format!("files[{i}].source"), f.source.as_deref()?)));
        let debs = self
            .local_debs
            .iter()
            .enumerate()
            .map(|(i, d)| (format!("local_debs[{i}]"), d.as_str()));
        sources
            .chain(debs)
            .filter_map(|(field, rel)| {
                let path = self.base_dir.join(rel);
                let problem = check_host_file(&path).err()?;
                Some(Problem {
                    field,
                    message: format!("`{}` {problem}", path.display()),
                })
            })
            .collect()
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
                    "`{}`{} must be 1-64 characters of letters, digits, `.`, `_`, `-`, not starting with `.` or `-`",
                    shown(&self.name),
                    too_long_note(&self.name),
                ),
            );
        } else if let Err(msg) = check_derived_names(&self.name, NAME_SUFFIXES) {
            p.add("name", msg);
        }
        if !is_debian_token(&self.arch) {
            p.add(
                "arch",
                format!("`{}` is not a Debian architecture name", self.arch),
            );
        }
        if !is_debian_token(&self.suite) {
            p.add(
                "suite",
                format!(
                    "`{}` is not a suite name (letters, digits, `.`, `_`, `-`)",
                    shown(&self.suite)
                ),
            );
        }
        check_uri_field(&mut p, "mirror", &self.mirror, UriUse::Source);
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
                check_uri_field(&mut p, &format!("{f}.uri"), uri, UriUse::Source);
            }
            if !is_debian_token(&r.suite) {
                p.add(
                    format!("{f}.suite"),
                    format!(
                        "`{}` is not a suite name (letters, digits, `.`, `_`, `-`)",
                        shown(&r.suite)
                    ),
                );
            }
            if r.section.split(' ').all(str::is_empty)
                || !r
                    .section
                    .split(' ')
                    .filter(|c| !c.is_empty())
                    .all(is_debian_token)
            {
                p.add(
                    format!("{f}.section"),
                    format!(
                        "`{}` must be one or more component names (letters, digits, `.`, `_`, `-`) separated by spaces",
                        shown(&r.section)
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
                if let Some(url) = v {
                    check_uri_field(&mut p, &format!("proxies.{field}"), url, UriUse::Proxy);
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
                if !part.mkfs_options.is_empty() {
                    p.add(
                        format!("{f}.mkfs_options"),
                        "a `bios-boot` partition has no filesystem: leave out `mkfs_options`",
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
            if esp {
                check_mkfs_options(p, &f, mkfs_options::Tool::Vfat, &part.mkfs_options);
            } else if let Some(fs) = part.fs {
                check_mkfs_options(p, &f, mkfs_options::Tool::for_fs(fs), &part.mkfs_options);
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
            check_mkfs_options(p, &f, mkfs_options::Tool::for_fs(img.fs), &img.mkfs_options);
            let out = image_base_name(&self.name, img);
            match &img.output {
                Some(o) if !is_file_name(o) => p.add(
                    format!("{f}.output"),
                    format!(
                        "`{}`{} must be a plain file name of 1-64 letters, digits, `.`, `_`, `-`, no `/` or `..`",
                        shown(o),
                        too_long_note(o),
                    ),
                ),
                // The default base grows with the mount point (and an invalid `name` is
                // reported already).
                None if !is_file_name(&self.name) => {}
                _ => {
                    if let Err(msg) = check_derived_names(&out, IMAGE_SUFFIXES) {
                        let field = if img.output.is_some() { "output" } else { "mount" };
                        let hint = if img.output.is_some() {
                            ""
                        } else {
                            " (the default output name comes from the mount point: give a shorter `output`)"
                        };
                        p.add(format!("{f}.{field}"), format!("{msg}{hint}"));
                    }
                }
            }
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

/// Longest file name Linux filesystems store (`NAME_MAX`), in bytes.
pub const NAME_MAX: usize = 255;

/// What a temporary name adds to the final name it is renamed to: `.<final>.tmp-<32 hex>`
/// (build's publish, release's archive). Validation counts it, so that a build never fails on a
/// name it made itself.
pub const TEMP_NAME_EXTRA: usize = ".".len() + ".tmp-".len() + 32;

/// The suffixes of every file a build names after the spec `name` (`<name><suffix>`): tarball,
/// disk formats ([`DiskFormat::file_name`]), metadata, records ([`Record::extension`]), kernel
/// and initrd, and the `--pack` bundle and release copies of the input (named in main.rs).
/// Plan's tests check that its names stay within this list.
pub const NAME_SUFFIXES: &[&str] = &[
    ".tar.gz",
    ".img",
    ".qcow2",
    ".img.gz",
    ".yaml",
    ".packages",
    ".files",
    ".licenses",
    ".vmlinuz",
    ".initrd",
    ".bundle.tar.gz",
    ".spec.yaml",
    ".fuel.json",
];

/// The suffixes of an image's files (`<base><suffix>`, [`image_base_name`]).
pub const IMAGE_SUFFIXES: &[&str] = &[".img", ".img.gz"];

/// Checks that `base` with any of `suffixes`, and its temporary name, fit in [`NAME_MAX`] bytes;
/// the error names the longest and its size.
pub fn check_derived_names(base: &str, suffixes: &[&str]) -> Result<(), String> {
    let suffix = suffixes
        .iter()
        .max_by_key(|s| s.len())
        .copied()
        .unwrap_or("");
    let len = base.len() + suffix.len();
    let temp = len + TEMP_NAME_EXTRA;
    if temp <= NAME_MAX {
        return Ok(());
    }
    Err(format!(
        "makes the file name `{}{suffix}` of {len} bytes, {temp} as its temporary name (`.<name>.tmp-<32 hex>`); a file name holds at most {NAME_MAX} bytes: {} too many",
        shown(base),
        temp - NAME_MAX
    ))
}

/// ` (N bytes long)` for a value over 64 bytes, for messages that show it cut.
fn too_long_note(s: &str) -> String {
    if s.len() > 64 {
        format!(" ({} bytes long)", s.len())
    } else {
        String::new()
    }
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

/// Checks `<field>.mkfs_options` against the allowlist of `tool`.
fn check_mkfs_options(p: &mut Problems, field: &str, tool: mkfs_options::Tool, options: &[String]) {
    if let Err(e) = mkfs_options::check(tool, options) {
        p.add(format!("{field}.mkfs_options[{}]", e.index), e.message);
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
        if comp.len() > NAME_MAX {
            return Err(format!(
                "`{}` has a component of {} bytes (a file name holds at most {NAME_MAX})",
                shown(m),
                comp.len()
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

/// What a URI field takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UriUse {
    /// `mirror`, `repos[].uri`: `host`, or an http://, https:// or file:/// URL.
    Source,
    /// `proxies.http`, `proxies.https`: an http:// or https:// URL.
    Proxy,
}

/// Characters a URI may hold besides ASCII letters and digits: RFC 3986's unreserved ones and
/// the delimiters a mirror or proxy URL needs. Left out is everything an apt source line, an
/// apt.conf value or a shell word reads specially: whitespace, `"`, `'`, `;`, `\`, `#` (starts a
/// comment in a sources.list line), `$` (apt substitutes `$(ARCH)`), `[`, `]` (apt options;
/// allowed only around an IPv6 host), `` ` ``, `<`, `>`, `|`, `{`, `}`, `(`, `)`, `*`, `!`, `^`.
pub const URI_PUNCTUATION: &str = "-._~:/?@%+=,&";

/// Longest URI debimg takes.
const MAX_URI_LEN: usize = 2048;

/// Checks a URI a spec gives; the error says what is wrong with it (the caller names the field
/// and what is allowed: [`uri_rule`]).
pub fn check_uri(uri: &str, kind: UriUse) -> Result<(), String> {
    if kind == UriUse::Source && uri == "host" {
        return Ok(());
    }
    if uri.len() > MAX_URI_LEN {
        return Err(format!(
            "is {} bytes long (at most {MAX_URI_LEN})",
            uri.len()
        ));
    }
    if let Some(c) = uri.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "holds {} (`{}`)",
            if c.is_control() {
                "a control character"
            } else {
                "whitespace"
            },
            c.escape_default()
        ));
    }
    let file = kind == UriUse::Source && uri.starts_with("file:///");
    let rest = match uri
        .strip_prefix("http://")
        .or_else(|| uri.strip_prefix("https://"))
    {
        Some(r) => r,
        None if file => "",
        None => {
            return Err(match kind {
                UriUse::Source => "is not an http://, https:// or file:/// URL".into(),
                UriUse::Proxy => "is not an http:// or https:// URL".into(),
            });
        }
    };
    let (authority, path) = if file {
        ("", &uri["file://".len()..])
    } else {
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        rest.split_at(end)
    };
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (u, h),
        None => ("", authority),
    };
    if !file {
        check_host_port(hostport)?;
    }
    for part in [userinfo, path] {
        if let Some(c) = part
            .chars()
            .find(|&c| !(c.is_ascii_alphanumeric() || URI_PUNCTUATION.contains(c)))
        {
            return Err(format!("holds `{c}`"));
        }
    }
    Ok(())
}

/// The host (a name, an IPv4 address or an IPv6 one in brackets) and optional port of an
/// http(s) URL.
fn check_host_port(hostport: &str) -> Result<(), String> {
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (inner, after) = v6
            .split_once(']')
            .ok_or_else(|| "has a `[` without `]` around its host".to_string())?;
        if inner.is_empty()
            || !inner
                .chars()
                .all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.')
        {
            return Err(format!("has `[{inner}]`, which is no IPv6 address"));
        }
        match after {
            "" => ("x", None),
            a => match a.strip_prefix(':') {
                Some(p) => ("x", Some(p)),
                None => return Err(format!("has `{a}` after its IPv6 host")),
            },
        }
    } else {
        match hostport.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    if host.is_empty() {
        return Err("has no host".into());
    }
    if let Some(c) = host
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || "-._".contains(c)))
    {
        return Err(format!("holds `{c}` in its host"));
    }
    if let Some(p) = port
        && (p.is_empty()
            || p.len() > 5
            || !p.chars().all(|c| c.is_ascii_digit())
            || p.parse::<u32>().map_or(true, |n| n > 65535))
    {
        return Err(format!("has `{p}` for a port"));
    }
    Ok(())
}

/// What a URI field allows, for messages.
pub fn uri_rule(kind: UriUse) -> String {
    let what = match kind {
        UriUse::Source => {
            "`host` (the build host's own mirror) or an http://, https:// or file:/// URL"
        }
        UriUse::Proxy => "an http:// or https:// URL",
    };
    format!(
        "give {what} of letters, digits and `{URI_PUNCTUATION}` (percent-encode anything else; an IPv6 host goes in `[]`)"
    )
}

/// A value as a message shows it: URL credentials masked ([`crate::redact::text`]), control
/// characters escaped (a newline shows as `\n`), and cut after 120 characters.
pub fn shown(value: &str) -> String {
    let redacted = crate::redact::text(value);
    let mut out = String::new();
    for (i, c) in redacted.chars().enumerate() {
        if i == 120 {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

fn check_uri_field(p: &mut Problems, field: &str, value: &str, kind: UriUse) {
    if let Err(why) = check_uri(value, kind) {
        p.add(
            field,
            format!("`{}` {why}: {}", shown(value), uri_rule(kind)),
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

/// The allowlist of `mkfs_options`, per mkfs program.
///
/// The options reach mkfs as arguments after debimg's own and before the device, so one could
/// name a host path (`mkfs.ext4 -d /root` copies the host's /root into the image, `mkfs.xfs -p`
/// reads a protofile), a second device (`mkfs.btrfs /dev/sda` formats that disk too), or undo what
/// debimg relies on (its label and UUID, a dry run that makes nothing). Only the options listed
/// here pass, each with a value of a fixed shape: no value holds `/` or starts with `-`, and no
/// positional argument passes. Accepted forms: `-b 4096` (two items), `-b4096`, `--nodesize 16k`
/// (two items) and `--nodesize=16k`; one option per item (no `-jD` bundles).
pub mod mkfs_options;

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
        for bad in ["bookworm main", "bookworm\n", "a/b", "-x", "$(x)"] {
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
            got[0].starts_with(
                "files[0].source: `/dev/zero` is a character device, not a regular file"
            ),
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
        let mut yaml =
            format!("{indent}- &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
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
}
