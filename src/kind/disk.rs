//! A bootable whole disk: one sparse file with a GPT or MBR table (sfdisk), its partitions on
//! a loop device with partition scanning, filesystems mounted depth-sorted; GRUB for BIOS
//! (`grub-install` in the chroot onto the loop device) and for UEFI (`grub-mkimage` in the
//! chroot, copied onto the FAT ESP with mtools: the build host's kernel need not mount vfat);
//! `grub.cfg` by `grub-mkconfig`, the root by UUID. Shipped raw, qcow2 or gzipped.

use std::fmt::Write as _;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use nix::mount::MsFlags;

use super::{FsInfo, ImageKind, MountStack, Staged};
use crate::cmd::CommandRunExt;
use crate::pack::{rewrite, shrink};
use crate::plan::{Plan, mount_order};
use crate::reproducible;
use crate::root::{Owner, Root};
use crate::spec::{Disk, Firmware, Fs, PartitionFlag, PartitionTable};
use crate::sys::loopdev::{self, LoopDevice};
use crate::sys::mkfs::{self, MkfsRequest};
use crate::sys::mount::Mount;

/// GPT type GUIDs (the Discoverable Partitions Specification's for the x86-64 root).
const GPT_BIOS_BOOT: &str = "21686148-6449-6E6F-744E-656564454649";
const GPT_ESP: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
const GPT_ROOT_X86_64: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";
const GPT_LINUX: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";

/// GRUB modules built into the UEFI image: enough to find and read `/boot` and run the
/// generated `grub.cfg`; the rest load from `/boot/grub/x86_64-efi`.
const EFI_MODULES: &[&str] = &[
    "part_gpt",
    "part_msdos",
    "fat",
    "ext2",
    "xfs",
    "btrfs",
    "search",
    "search_fs_uuid",
    "normal",
    "configfile",
    "linux",
    "echo",
    "test",
    "gzio",
    "serial",
    "terminal",
    "all_video",
    "efi_gop",
    "loadenv",
    "ls",
    "cat",
    "chain",
    "reboot",
    "halt",
];

/// Grows the root partition to the end of its disk, then its filesystem (`disk.grow`).
pub const GROWROOT_SCRIPT: &str = r#"#!/bin/sh
# debimg: grows the root partition and its filesystem to the end of the disk. Runs at every
# boot; growpart answers NOCHANGE (exit 1) once there is nothing to grow.
set -eu
dev=$(findmnt -no SOURCE /)
name=$(basename "$(readlink -f "$dev")")
part=$(cat "/sys/class/block/$name/partition")
disk=/dev/$(basename "$(readlink -f "/sys/class/block/$name/..")")
rc=0
growpart "$disk" "$part" || rc=$?
case $rc in
  0) ;;
  1) exit 0 ;;
  *) exit "$rc" ;;
esac
case $(findmnt -no FSTYPE /) in
  ext2|ext3|ext4) resize2fs "$dev" ;;
  xfs) xfs_growfs / ;;
  btrfs) btrfs filesystem resize max / ;;
esac
"#;

/// The unit that runs [`GROWROOT_SCRIPT`] on boot.
pub const GROWROOT_UNIT: &str = "[Unit]
Description=Grow the root partition and filesystem to the whole disk (debimg)
After=systemd-remount-fs.service
Before=systemd-user-sessions.service

[Service]
Type=oneshot
ExecStart=/usr/lib/debimg/growroot

[Install]
WantedBy=multi-user.target
";

/// One partition as built.
#[derive(Debug, Clone)]
struct Part {
    /// Partition number, from 1.
    number: u32,
    dev: PathBuf,
    /// `None` for the BIOS boot partition.
    fs: Option<String>,
    mount: Option<String>,
    label: Option<String>,
    uuid: String,
    size: u64,
    /// Where it starts on the disk, in bytes.
    start: u64,
    esp: bool,
}

/// A bootable whole-disk image.
#[derive(Default)]
pub struct DiskImage {
    file: Option<PathBuf>,
    disk: Option<LoopDevice>,
    parts: Vec<Part>,
    /// In mount order; unmounted from the end.
    mounts: MountStack,
}

/// The sfdisk script for a disk.
///
/// With `seed` (a reproducible build's spec digest), the table's identifier and each
/// partition's GUID are derived from it instead of drawn at random.
pub fn sfdisk_script(disk: &Disk, seed: Option<&str>) -> String {
    let mut s = String::new();
    match disk.table {
        PartitionTable::Gpt => s.push_str("label: gpt\n"),
        PartitionTable::Mbr => s.push_str("label: dos\n"),
    }
    if let Some(seed) = seed {
        let id = reproducible::seeded_uuid(seed, "partition table");
        let id = match disk.table {
            PartitionTable::Gpt => id,
            PartitionTable::Mbr => format!("0x{}", &id[..8]),
        };
        let _ = writeln!(s, "label-id: {id}");
    }
    for (i, p) in disk.partitions.iter().enumerate() {
        let mut fields = Vec::new();
        if let (Some(seed), PartitionTable::Gpt) = (seed, disk.table) {
            let guid = reproducible::seeded_uuid(seed, &format!("partition {}", i + 1));
            fields.push(format!("uuid={guid}"));
        }
        if let Some(size) = p.size {
            // sfdisk aligns partitions to 1 MiB: ask for whole MiB, rounded up.
            fields.push(format!("size={}MiB", size.0.div_ceil(1 << 20)));
        }
        let bios = p.flags.contains(&PartitionFlag::BiosBoot);
        let esp = p.flags.contains(&PartitionFlag::Esp);
        let root = p.mount.as_deref() == Some("/");
        let alias = p.part_type.as_deref().map(|t| {
            crate::spec::GPT_TYPE_ALIASES
                .iter()
                .find(|(a, _)| *a == t)
                .map_or(t, |(_, guid)| guid)
        });
        let ty = match (disk.table, bios, esp, root) {
            _ if alias.is_some() => alias.unwrap_or_default(),
            (PartitionTable::Gpt, true, _, _) => GPT_BIOS_BOOT,
            (PartitionTable::Gpt, _, true, _) => GPT_ESP,
            (PartitionTable::Gpt, _, _, true) => GPT_ROOT_X86_64,
            (PartitionTable::Gpt, _, _, _) => GPT_LINUX,
            (PartitionTable::Mbr, _, true, _) => "ef",
            (PartitionTable::Mbr, _, _, _) => "83",
        };
        fields.push(format!("type={ty}"));
        if disk.table == PartitionTable::Gpt {
            let name = p.label.clone().unwrap_or_else(|| {
                if bios {
                    "bios-boot".into()
                } else if esp {
                    "ESP".into()
                } else {
                    p.mount.clone().unwrap_or_default()
                }
            });
            fields.push(format!("name=\"{name}\""));
        }
        if p.flags.contains(&PartitionFlag::LegacyBoot) {
            fields.push("bootable".into());
        }
        let _ = writeln!(s, "{}", fields.join(", "));
    }
    s
}

/// `/etc/default/grub` for a disk: the serial console, a short menu, the spec's command line.
pub fn grub_defaults(cmdline: &str) -> String {
    format!(
        "# Written by debimg for this image.\n\
         GRUB_DEFAULT=0\n\
         GRUB_TIMEOUT=1\n\
         GRUB_DISTRIBUTOR=`lsb_release -i -s 2> /dev/null || echo Debian`\n\
         GRUB_CMDLINE_LINUX_DEFAULT=\"\"\n\
         GRUB_CMDLINE_LINUX=\"{cmdline}\"\n\
         GRUB_TERMINAL=\"console serial\"\n\
         GRUB_SERIAL_COMMAND=\"serial --unit=0 --speed=115200\"\n\
         GRUB_DISABLE_OS_PROBER=true\n"
    )
}

/// The configuration built into the UEFI GRUB image: find the filesystem holding `/boot` by
/// UUID and read the generated `grub.cfg` from it.
pub fn efi_early_config(boot_fs_uuid: &str, boot_is_separate: bool) -> String {
    let prefix = if boot_is_separate {
        "/grub"
    } else {
        "/boot/grub"
    };
    format!(
        "search --no-floppy --fs-uuid --set=root {boot_fs_uuid}\n\
         set prefix=($root){prefix}\n\
         configfile $prefix/grub.cfg\n"
    )
}

impl DiskImage {
    /// The ESP's mount point in the tree: made with the tree, the ESP itself mounted there
    /// only for the bootloader.
    fn make_esp_mount_points(&self, tree: &Root) -> Result<()> {
        for p in self.parts.iter().filter(|p| p.esp) {
            tree.create_dir_all(p.mount.as_deref().unwrap_or("/boot/efi"))?;
        }
        Ok(())
    }

    fn disk<'a>(&self, plan: &'a Plan) -> Result<&'a Disk> {
        plan.disk.as_ref().context("the plan has no disk")
    }

    fn loop_dev(&self) -> Result<&LoopDevice> {
        self.disk.as_ref().context("the disk is not attached")
    }

    /// The partition mounted at `mount`.
    fn part_at(&self, mount: &str) -> Option<&Part> {
        self.parts
            .iter()
            .find(|p| p.mount.as_deref() == Some(mount))
    }

    /// A tmpfs `/dev` for the chroot with the nodes GRUB's tools need: the disk, its
    /// partitions and their `/dev/disk/by-uuid` links (grub-mkconfig writes `root=UUID=` only
    /// when that link exists).
    fn populate_dev(&self, root: &Root) -> Result<Mount> {
        let m = root.mount(
            "debimg-dev",
            "/dev",
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("mode=0755,size=1m"),
        )?;
        let chars: Vec<(String, u64)> = [
            ("null", (1, 3)),
            ("zero", (1, 5)),
            ("full", (1, 7)),
            ("random", (1, 8)),
            ("urandom", (1, 9)),
        ]
        .iter()
        .map(|(n, (ma, mi))| (n.to_string(), nix::sys::stat::makedev(*ma, *mi)))
        .collect();
        let disk = self.loop_dev()?;
        let mut block: Vec<(String, u64)> = vec![(
            disk.path()
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned(),
            0,
        )];
        block.extend(self.parts.iter().map(|p| {
            (
                p.dev
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned(),
                0,
            )
        }));
        for (name, dev_t) in block.iter_mut() {
            let sys = PathBuf::from(format!("/sys/class/block/{name}/dev"));
            let text = std::fs::read_to_string(&sys)
                .with_context(|| format!("reading {}", sys.display()))?;
            let (ma, mi) = text
                .trim()
                .split_once(':')
                .with_context(|| format!("parsing {}", sys.display()))?;
            *dev_t = nix::sys::stat::makedev(ma.parse()?, mi.parse()?);
        }
        for (name, dev_t) in &chars {
            root.mknod(format!("/dev/{name}"), false, 0o666, *dev_t)?;
        }
        for (name, dev_t) in &block {
            root.mknod(format!("/dev/{name}"), true, 0o660, *dev_t)?;
        }
        for p in self.parts.iter().filter(|p| p.fs.is_some()) {
            let name = p.dev.file_name().unwrap_or_default().to_string_lossy();
            root.symlink(
                format!("../../{name}"),
                format!("/dev/disk/by-uuid/{}", p.uuid),
            )
            .with_context(|| format!("linking /dev/disk/by-uuid/{}", p.uuid))?;
        }
        Ok(m)
    }

    fn install_grub(&self, disk: &Disk, root: &Root, workspace: &Path) -> Result<()> {
        root.write(
            "/etc/default/grub",
            grub_defaults(&disk.cmdline).as_bytes(),
            0o644,
            Owner::ROOT,
        )?;
        let loop_path = self.loop_dev()?.path().display().to_string();
        if disk.boot.contains(&Firmware::Bios) {
            root.command("grub-install")
                .args([
                    "--target=i386-pc",
                    "--no-floppy",
                    "--boot-directory=/boot",
                    "--modules=part_gpt part_msdos",
                    &loop_path,
                ])
                .run()
                .context("installing GRUB for BIOS")?;
        }
        if disk.boot.contains(&Firmware::Uefi) {
            self.install_grub_efi(root, workspace)?;
        }
        root.command("grub-mkconfig")
            .args(["-o", "/boot/grub/grub.cfg"])
            .run()
            .context("writing /boot/grub/grub.cfg")?;
        let cfg = root.read_to_string("/boot/grub/grub.cfg")?;
        let root_uuid = &self.part_at("/").context("no partition at /")?.uuid;
        if cfg.contains("/dev/loop") || !cfg.contains(&format!("root=UUID={root_uuid}")) {
            bail!(
                "grub.cfg does not boot the root by UUID {root_uuid} (it names: {})",
                cfg.lines()
                    .filter(|l| l.trim_start().starts_with("linux"))
                    .collect::<Vec<_>>()
                    .join(" | ")
            );
        }
        Ok(())
    }

    /// GRUB for UEFI without mounting the ESP: its modules go to `/boot/grub/x86_64-efi` as
    /// grub-install would put them, the image with its early config is made in the chroot,
    /// and mtools writes it onto the FAT partition as the removable-media path.
    fn install_grub_efi(&self, root: &Root, workspace: &Path) -> Result<()> {
        let esp = self
            .parts
            .iter()
            .find(|p| p.esp)
            .context("uefi needs an esp partition")?;
        let boot = self.part_at("/boot");
        let boot_fs = boot
            .or_else(|| self.part_at("/"))
            .context("no partition at /")?;
        const LIB: &str = "/usr/lib/grub/x86_64-efi";
        for e in root.read_dir(LIB)? {
            let n = e.name.to_string_lossy();
            if e.file_type.is_file() && (n.ends_with(".mod") || n.ends_with(".lst")) {
                let bytes = root.read(format!("{LIB}/{n}"))?;
                root.write(
                    format!("/boot/grub/x86_64-efi/{n}"),
                    &bytes,
                    0o644,
                    Owner::ROOT,
                )
                .with_context(|| format!("copying GRUB module {n}"))?;
            }
        }
        const EARLY: &str = "/tmp/debimg-grub-early.cfg";
        const IMAGE: &str = "/tmp/debimg-BOOTX64.EFI";
        root.write(
            EARLY,
            efi_early_config(&boot_fs.uuid, boot.is_some()).as_bytes(),
            0o644,
            Owner::ROOT,
        )?;
        // mtools reads the image from the workspace: a copy out of the tree that must be a
        // regular file in it.
        let image = workspace.join("BOOTX64.EFI");
        let staged = workspace.join("esp");
        let res = root
            .command("grub-mkimage")
            .args([
                "-O",
                "x86_64-efi",
                "-o",
                IMAGE,
                "-c",
                EARLY,
                "-p",
                "/boot/grub",
            ])
            .args(EFI_MODULES)
            .run()
            .context("making the UEFI GRUB image")
            .and_then(|()| root.copy_out(IMAGE, &image).map(drop))
            .and_then(|()| {
                let dev = esp.dev.display().to_string();
                // The host's mtools.conf must not change what is written, nor its time zone:
                // FAT keeps local times, and UTC is everyone's.
                let mtools = |prog: &str| {
                    let mut c = std::process::Command::new(prog);
                    c.env("MTOOLSRC", "/dev/null")
                        .env("MTOOLS_SKIP_CHECK", "1")
                        .env("TZ", "UTC");
                    c
                };
                // The ESP's tree staged in the workspace and copied whole with its times (which
                // mtools also gives the entries' creation and access dates): a reproducible
                // build's are its epoch, not this run's clock.
                let boot = staged.join("EFI/BOOT");
                std::fs::create_dir_all(&boot)
                    .with_context(|| format!("creating {}", boot.display()))?;
                std::fs::rename(&image, boot.join("BOOTX64.EFI")).with_context(|| {
                    format!("moving {} into {}", image.display(), boot.display())
                })?;
                if let Some(epoch) = root.source_date_epoch() {
                    let t = nix::sys::time::TimeSpec::new(epoch as i64, 0);
                    for p in [boot.join("BOOTX64.EFI"), boot.clone(), staged.join("EFI")] {
                        nix::sys::stat::utimensat(
                            nix::fcntl::AT_FDCWD,
                            &p,
                            &t,
                            &t,
                            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
                        )
                        .with_context(|| format!("setting the times of {}", p.display()))?;
                    }
                }
                mtools("mcopy")
                    .args(["-s", "-m", "-i", &dev])
                    .arg(staged.join("EFI"))
                    .arg("::/")
                    .run()
                    .context("copying BOOTX64.EFI onto the ESP")
            });
        let _ = root.remove_file(EARLY);
        let _ = root.remove_file(IMAGE);
        let _ = std::fs::remove_file(&image);
        if staged.exists() {
            crate::sys::mount::remove_dir_all_safe(&staged)?;
        }
        res
    }
}

/// Puts the grow-on-boot script and its unit into the image and enables the unit.
fn install_growroot(root: &Root) -> Result<()> {
    root.write(
        "/usr/lib/debimg/growroot",
        GROWROOT_SCRIPT.as_bytes(),
        0o755,
        Owner::ROOT,
    )?;
    root.write(
        "/etc/systemd/system/debimg-growroot.service",
        GROWROOT_UNIT.as_bytes(),
        0o644,
        Owner::ROOT,
    )?;
    root.command("systemctl")
        .env("SYSTEMD_OFFLINE", "1")
        .args(["enable", "debimg-growroot.service"])
        .run()
        .context("enabling debimg-growroot.service (grow needs systemd in the image)")
}

impl ImageKind for DiskImage {
    fn name(&self) -> &'static str {
        "disk"
    }

    fn mount_root(&mut self, plan: &Plan, workspace: &Path, root: &Path) -> Result<()> {
        let disk = self.disk(plan)?;
        let file = workspace.join(plan.raw_name());
        let f = File::create_new(&file)
            .with_context(|| format!("creating disk file {}", file.display()))?;
        f.set_len(disk.size.0)
            .with_context(|| format!("sizing {} to {} bytes", file.display(), disk.size.0))?;
        drop(f);
        self.file = Some(file.clone());
        // A reproducible build's table and partition GUIDs come from the spec.
        let seed = plan.source_date_epoch.map(|_| plan.seed.as_str());
        std::process::Command::new("sfdisk")
            .args(["--quiet", "--no-reread", "--no-tell-kernel"])
            .arg(&file)
            .run_with_stdin(sfdisk_script(disk, seed).as_bytes())
            .context("writing the partition table")?;
        let dev = loopdev::attach_partitioned(&file)?;
        for (i, p) in disk.partitions.iter().enumerate() {
            let number = i as u32 + 1;
            let pdev = dev.partition(number)?;
            let sysfs = |what: &str| -> Result<u64> {
                std::fs::read_to_string(format!(
                    "/sys/class/block/{}/{what}",
                    pdev.file_name().unwrap_or_default().to_string_lossy()
                ))
                .with_context(|| format!("reading a partition's {what}"))?
                .trim()
                .parse()
                .with_context(|| format!("parsing a partition's {what}"))
            };
            let (size, start) = (sysfs("size")? * 512, sysfs("start")? * 512);
            let esp = p.flags.contains(&PartitionFlag::Esp);
            let (fs, uuid) = if p.flags.contains(&PartitionFlag::BiosBoot) {
                (None, String::new())
            } else if esp {
                let serial =
                    &reproducible::fs_uuid(plan.source_date_epoch, &plan.seed, "/boot/efi")
                        .map_or_else(mkfs::new_uuid, Ok)?
                        .replace('-', "")[..8];
                let mut cmd = std::process::Command::new("mkfs.vfat");
                cmd.env("TZ", "UTC");
                // FAT32, as the UEFI specification asks of an ESP. A reproducible build's:
                // no clock (the label's entry) and the serial written after.
                cmd.args(["-F", "32", "-n", p.label.as_deref().unwrap_or("ESP")]);
                match plan.source_date_epoch {
                    Some(_) => cmd.arg("--invariant"),
                    None => cmd.args(["-i", serial]),
                };
                cmd.args(&p.mkfs_options).arg(&pdev);
                cmd.run().context("making the FAT filesystem of the ESP")?;
                if plan.source_date_epoch.is_some() {
                    rewrite::set_fat_serial(&pdev, serial)?;
                }
                let upper = serial.to_ascii_uppercase();
                (
                    Some("vfat".to_string()),
                    format!("{}-{}", &upper[..4], &upper[4..]),
                )
            } else {
                let fs = p.fs.context("a partition without a filesystem")?;
                let place = p
                    .mount
                    .clone()
                    .unwrap_or_else(|| format!("partition {number}"));
                let uuid = reproducible::fs_uuid(plan.source_date_epoch, &plan.seed, &place)
                    .map_or_else(mkfs::new_uuid, Ok)?;
                mkfs::make(
                    &MkfsRequest {
                        fs,
                        label: p.label.as_deref(),
                        uuid: &uuid,
                        no_journal: true,
                        options: &p.mkfs_options,
                    },
                    &pdev,
                )?;
                (Some(fs.name().to_string()), uuid)
            };
            self.parts.push(Part {
                number,
                dev: pdev,
                fs,
                mount: p
                    .mount
                    .clone()
                    .or_else(|| esp.then(|| "/boot/efi".to_string())),
                label: p.label.clone().or_else(|| esp.then(|| "ESP".to_string())),
                uuid,
                size,
                start,
                esp,
            });
        }
        self.disk = Some(dev);
        let mounted: Vec<&Part> = self
            .parts
            .iter()
            .filter(|p| p.fs.is_some() && !p.esp)
            .collect();
        let points: Vec<&str> = mounted
            .iter()
            .map(|p| p.mount.as_deref().unwrap_or(""))
            .collect();
        // Each mount is held at once, so that a failure unmounts the ones before it, deepest
        // first.
        for i in mount_order(&points) {
            let p = mounted[i];
            self.mounts.push(super::mount_in_tree(
                root,
                points[i],
                &p.dev.to_string_lossy(),
                p.fs.as_deref().unwrap_or_default(),
            )?);
        }
        self.make_esp_mount_points(&Root::open(root)?)
    }

    fn empty_tree(&self, tree: &Root) -> Result<()> {
        tree.empty(&self.mount_points())?;
        self.make_esp_mount_points(tree)
    }

    fn filesystems(&self) -> Vec<FsInfo> {
        self.parts
            .iter()
            .filter_map(|p| {
                Some(FsInfo {
                    mount: p.mount.clone()?,
                    fs: p.fs.clone()?,
                    label: p.label.clone(),
                    size: p.size,
                    uuid: p.uuid.clone(),
                    device: p.dev.display().to_string(),
                })
            })
            .collect()
    }

    fn mount_points(&self) -> Vec<PathBuf> {
        self.mounts.points()
    }

    fn make_bootable(&mut self, plan: &Plan, root: &Root, workspace: &Path) -> Result<()> {
        let disk = self.disk(plan)?.clone();
        super::find_kernel(root)
            .context("a bootable disk needs a kernel and an initrd in /boot")?;
        if disk.grow {
            install_growroot(root)?;
        }
        let dev = self.populate_dev(root)?;
        let res = self.install_grub(&disk, root, workspace);
        let closed = dev.close();
        res?;
        closed
    }

    fn unmount_root(&mut self) -> Result<()> {
        self.mounts.sync_and_unmount()
    }

    fn finish(&mut self, plan: &Plan, workspace: &Path, _root: &Path) -> Result<Vec<Staged>> {
        let disk = self.disk(plan)?;
        // A reproducible build's filesystems, written afresh beside the disk: (file, start,
        // partition size), put into the disk once its device is detached.
        let mut fresh: Vec<(PathBuf, u64, u64)> = Vec::new();
        for p in &self.parts {
            match p.fs.as_deref() {
                None => {}
                Some("vfat") => std::process::Command::new("fsck.vfat")
                    .arg("-n")
                    .arg(&p.dev)
                    .run()
                    .with_context(|| format!("checking the ESP {}", p.dev.display()))?,
                Some(name) => {
                    let fs = disk.partitions[(p.number - 1) as usize]
                        .fs
                        .with_context(|| format!("partition {} has no filesystem", p.number))?;
                    debug_assert_eq!(fs.name(), name);
                    mkfs::check(fs, &p.dev)?;
                    let mut target = p.dev.clone();
                    if let (Some(epoch), true) = (plan.source_date_epoch, fs.is_ext()) {
                        let spec = &disk.partitions[(p.number - 1) as usize];
                        let file = workspace.join(format!("partition-{}.img", p.number));
                        let img = rewrite::ExtImage {
                            fs,
                            uuid: &p.uuid,
                            label: p.label.as_deref(),
                            options: &spec.mkfs_options,
                        };
                        rewrite::write_ext_from(&img, &p.dev, &file, p.size, workspace, epoch)?;
                        fresh.push((file.clone(), p.start, p.size));
                        target = file;
                    }
                    if matches!(fs, Fs::Ext3 | Fs::Ext4) {
                        shrink::set_ext_journal(&target, true, plan.source_date_epoch)?;
                    }
                    if target != p.dev {
                        mkfs::check(fs, &target)?;
                    }
                }
            }
        }
        if let Some(d) = self.disk.take() {
            d.close()?;
        }
        let raw = self.file.clone().context("no disk file")?;
        for (file, start, size) in fresh {
            rewrite::splice(&file, &raw, start, size)?;
            std::fs::remove_file(&file).with_context(|| format!("removing {}", file.display()))?;
        }
        let root_uuid = self
            .part_at("/")
            .map(|p| p.uuid.clone())
            .unwrap_or_default();
        Ok(super::planned_staged(plan)
            .into_iter()
            .map(|s| Staged {
                raw: raw.clone(),
                uuid: root_uuid.clone(),
                ..s
            })
            .collect())
    }

    fn cleanup(&mut self) {
        self.mounts.unmount_logging();
        if let Some(d) = self.disk.take()
            && let Err(e) = d.close()
        {
            tracing::warn!("{e:#}");
        }
    }
}

impl Drop for DiskImage {
    fn drop(&mut self) {
        self.cleanup();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Spec;

    fn disk(yaml: &str) -> Disk {
        let spec = Spec::from_yaml(
            &format!(
                "version: 1\nname: d\nsuite: bookworm\nkind: disk\npackages: [linux-image-amd64]\n{yaml}"
            ),
            "t",
        )
        .unwrap();
        spec.disk.unwrap()
    }

    #[test]
    fn gpt_script_has_types_names_and_the_rest() {
        let d = disk(
            "disk:\n  size: 3GiB\n  partitions:\n    - {size: 1MiB, flags: [bios-boot]}\n    - {size: 64MiB, flags: [esp]}\n    - {mount: /, fs: ext4, label: root}\n",
        );
        assert_eq!(
            sfdisk_script(&d, None),
            format!(
                "label: gpt\nsize=1MiB, type={GPT_BIOS_BOOT}, name=\"bios-boot\"\nsize=64MiB, type={GPT_ESP}, name=\"ESP\"\ntype={GPT_ROOT_X86_64}, name=\"root\"\n"
            )
        );
    }

    #[test]
    fn partition_types_by_alias_or_guid() {
        let d = disk(
            "disk:\n  size: 3GiB\n  boot: [bios]\n  partitions:\n    - {size: 1MiB, flags: [bios-boot]}\n    - {size: 1GiB, mount: /, fs: ext4, type: linux}\n    - {mount: /srv, fs: xfs, type: 3B8F8425-20E0-4F3B-907F-1A25A76F98E8}\n",
        );
        let script = sfdisk_script(&d, None);
        assert!(
            script.contains(&format!("size=1024MiB, type={GPT_LINUX}, name=\"/\"\n")),
            "{script}"
        );
        assert!(
            script.contains("type=3B8F8425-20E0-4F3B-907F-1A25A76F98E8, name=\"/srv\""),
            "{script}"
        );
    }

    #[test]
    fn mbr_script_with_the_active_flag() {
        let d = disk(
            "disk:\n  size: 2GiB\n  table: mbr\n  boot: [bios]\n  partitions:\n    - {size: 256MiB, mount: /boot, fs: ext2, flags: [legacy-boot]}\n    - {mount: /, fs: ext4}\n",
        );
        assert_eq!(
            sfdisk_script(&d, None),
            "label: dos\nsize=256MiB, type=83, bootable\ntype=83\n"
        );
    }

    #[test]
    fn a_seed_fixes_the_table_and_partition_ids() {
        let d = disk(
            "disk:\n  size: 3GiB\n  boot: [uefi]\n  partitions:\n    - {size: 64MiB, flags: [esp]}\n    - {mount: /, fs: ext4, label: root}\n",
        );
        let a = sfdisk_script(&d, Some("digest-1"));
        assert_eq!(a, sfdisk_script(&d, Some("digest-1")));
        assert_ne!(a, sfdisk_script(&d, Some("digest-2")));
        let lines: Vec<&str> = a.lines().collect();
        let id = reproducible::seeded_uuid("digest-1", "partition table");
        assert_eq!(lines[1], format!("label-id: {id}"));
        for (i, line) in lines[2..].iter().enumerate() {
            let guid = reproducible::seeded_uuid("digest-1", &format!("partition {}", i + 1));
            assert!(line.starts_with(&format!("uuid={guid}, ")), "{line}");
        }
        let mbr = disk(
            "disk:\n  size: 2GiB\n  table: mbr\n  boot: [bios]\n  partitions:\n    - {mount: /, fs: ext4}\n",
        );
        let m = sfdisk_script(&mbr, Some("digest-1"));
        assert_eq!(
            m,
            format!("label: dos\nlabel-id: 0x{}\ntype=83\n", &id[..8])
        );
    }

    #[test]
    fn grub_settings() {
        let g = grub_defaults("console=ttyS0,115200n8 quiet");
        assert!(g.contains("GRUB_CMDLINE_LINUX=\"console=ttyS0,115200n8 quiet\"\n"));
        assert!(g.contains("GRUB_TERMINAL=\"console serial\""));
        let e = efi_early_config("u-1", true);
        assert_eq!(
            e,
            "search --no-floppy --fs-uuid --set=root u-1\nset prefix=($root)/grub\nconfigfile $prefix/grub.cfg\n"
        );
        assert!(efi_early_config("u-1", false).contains("($root)/boot/grub"));
    }
}
