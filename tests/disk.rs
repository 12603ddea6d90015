//! The bootable disk: `data/examples/cloud.yaml` built twice from the host's mirror with
//! `SOURCE_DATE_EPOCH` (byte-identical, the second without any cache), its partitions and
//! bootloaders inspected, then booted in qemu under BIOS and UEFI, on a larger disk (the root
//! must grow), and broken (no kernel: the boot test must fail and show the console). A suite
//! the host's apt sources do not list (trixie on a bookworm host) built from `mirror: host`
//! boots too.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::repro::*;
use common::*;
use debimg::metadata::Metadata;
use debimg::sys::loopdev;
use debimg::sys::mount;
use nix::mount::MsFlags;

const MARKER: &str = "DEBIMG-BOOT-OK";

/// `debimg boot-test IMAGE [extra...]`.
fn boot(image: &Path, extra: &[&str]) -> Run {
    // One virtual CPU: under emulation on a busy host a second one costs a third more CPU
    // (docs/benchmarks.md).
    let mut args = vec![
        "boot-test",
        image.to_str().unwrap(),
        "--timeout",
        "900",
        "--cpus",
        "1",
    ];
    args.extend_from_slice(extra);
    debimg(&args)
}

/// The root filesystem size the image reported on its console.
fn root_bytes(run: &Run) -> u64 {
    let out = run.stdout();
    let line = out
        .lines()
        .find(|l| l.contains(MARKER))
        .unwrap_or_else(|| panic!("no marker in {out}\n{}", run.stderr()));
    line.split("root-bytes=")
        .nth(1)
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no root-bytes in `{line}`"))
}

/// A sparse copy of `src`, `grow` bytes larger.
fn copy_of(src: &Path, dest: &Path, grow: u64) -> PathBuf {
    let st = Command::new("cp")
        .arg("--sparse=always")
        .arg(src)
        .arg(dest)
        .status()
        .unwrap();
    assert!(st.success());
    if grow > 0 {
        let f = std::fs::OpenOptions::new().write(true).open(dest).unwrap();
        let len = f.metadata().unwrap().len();
        f.set_len(len + grow).unwrap();
    }
    dest.to_path_buf()
}

/// The cloud example, built twice side by side with `SOURCE_DATE_EPOCH` (the second a minute
/// later, without any cache, in another time zone): the same bytes, every output; the first inspected and
/// booted while the second builds.
#[test]
fn cloud_disk_twice_gives_the_same_bytes_inspects_and_boots() {
    if !can_build() {
        return;
    }
    let env = [("SOURCE_DATE_EPOCH", EPOCH.to_string())];
    let (work, outs) = build_twice_and(
        &example("cloud.yaml"),
        "disk",
        &env,
        &[],
        |work, out, stderr| {
            assert!(!stderr.contains("dropped without close"), "{stderr}");
            inspect_and_boot(work, out);
        },
    );
    // The whole GPT disk: its table and partition GUIDs, the BIOS boot partition's GRUB, the
    // ESP (FAT) and the root (ext4), raw, qcow2 and gzip.
    assert_identical(&outs, "cloud.yaml");
    esp_is_clamped(work.path(), &outs[0].join("cloud.img"));
}

/// The cloud disk in `out`: every format, the partitions and what is on them, booted under
/// BIOS on a larger disk (the root grows) and under UEFI as built, and broken.
fn inspect_and_boot(work: &Path, out: &Path) {
    // Every format, described by the metadata.
    let meta = Metadata::read(&out.join("cloud.yaml")).unwrap();
    assert_eq!(meta.kind, "disk");
    let names: Vec<(&str, &str)> = meta
        .images
        .iter()
        .map(|i| (i.container.as_str(), i.container_name.as_str()))
        .collect();
    assert_eq!(
        names,
        [
            ("raw", "cloud.img"),
            ("qcow2", "cloud.qcow2"),
            ("gzip", "cloud.img.gz")
        ]
    );
    for img in &meta.images {
        let path = out.join(&img.container_name);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), img.container_size);
        let (md5, sha) = sums(&path);
        assert_eq!(
            (md5, sha),
            (img.container_md5.clone(), img.container_sha256.clone()),
            "{}",
            img.container_name
        );
        assert_eq!(img.raw_size, 3 << 30, "the disk keeps its size");
        assert_eq!(img.format, "gpt");
    }
    let raw = out.join("cloud.img");
    let (raw_md5, _) = sums(&raw);
    assert_eq!(raw_md5, meta.images[0].raw_md5);
    assert!(
        std::fs::metadata(&raw).unwrap().len() == 3 << 30,
        "raw is the whole disk"
    );
    // Sparse on disk: far less allocated than its size.
    let allocated = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&raw).unwrap().blocks() * 512
    };
    assert!(allocated < 2 << 30, "raw output is not sparse: {allocated}");
    let check = tool(
        "qemu-img",
        &[
            "check",
            "-f",
            "qcow2",
            out.join("cloud.qcow2").to_str().unwrap(),
        ],
    );
    assert!(check.contains("No errors were found"), "{check}");
    let info = tool(
        "qemu-img",
        &[
            "info",
            "--output=json",
            out.join("cloud.qcow2").to_str().unwrap(),
        ],
    );
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["virtual-size"].as_u64(), Some(3 << 30));

    // The partition table and what is on each partition.
    let table: serde_json::Value =
        serde_json::from_str(&tool("sfdisk", &["--json", raw.to_str().unwrap()])).unwrap();
    let parts = table["partitiontable"]["partitions"].as_array().unwrap();
    assert_eq!(table["partitiontable"]["label"], "gpt");
    let types: Vec<&str> = parts.iter().map(|p| p["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        [
            "21686148-6449-6E6F-744E-656564454649",
            "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
            "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"
        ]
    );
    let mut mbr = vec![0u8; 2 << 20];
    std::io::Read::read_exact(&mut std::fs::File::open(&raw).unwrap(), &mut mbr).unwrap();
    assert!(
        mbr[..512].windows(4).any(|w| w == b"GRUB"),
        "no GRUB boot code in the MBR"
    );
    let bios_boot_start = parts[0]["start"].as_u64().unwrap() as usize * 512;
    assert!(
        mbr[bios_boot_start..bios_boot_start + 512]
            .iter()
            .any(|&b| b != 0),
        "GRUB's core is not in the BIOS boot partition"
    );
    drop(mbr);
    {
        let copy = copy_of(&raw, &work.join("inspect.img"), 0);
        let dev = loopdev::attach_partitioned(&copy).unwrap();
        let esp = dev.partition(2).unwrap();
        let efi = tool("mdir", &["-i", esp.to_str().unwrap(), "-b", "::/EFI/BOOT"]);
        assert!(efi.contains("BOOTX64.EFI"), "{efi}");
        fsck_vfat(&esp);
        let root_dev = dev.partition(3).unwrap();
        tool("e2fsck", &["-fn", root_dev.to_str().unwrap()]);
        let mnt = scratch("disk-root");
        private_mounts();
        let m = mount::mount(
            root_dev.to_str().unwrap(),
            mnt.path(),
            Some("ext4"),
            MsFlags::MS_RDONLY,
            None,
        )
        .unwrap();
        let read = |rel: &str| std::fs::read_to_string(mnt.path().join(rel)).unwrap();
        let fstab = read("etc/fstab");
        let root_uuid = &meta.images[0].uuid;
        assert!(
            fstab.contains(&format!("UUID={root_uuid} / ext4 ")),
            "{fstab}"
        );
        assert!(fstab.contains(" /boot/efi vfat umask=0077 "), "{fstab}");
        assert!(!fstab.contains("/dev/loop"), "{fstab}");
        let cfg = read("boot/grub/grub.cfg");
        assert!(cfg.contains(&format!("root=UUID={root_uuid}")), "grub.cfg");
        assert!(cfg.contains("console=ttyS0,115200n8"), "grub.cfg");
        assert!(!cfg.contains("/dev/loop"), "grub.cfg names a loop device");
        assert!(mnt.path().join("boot/grub/i386-pc/normal.mod").exists());
        assert!(mnt.path().join("boot/grub/x86_64-efi/normal.mod").exists());
        assert!(mnt.path().join("usr/lib/debimg/growroot").exists());
        // The kernel's links as its postinst leaves them, the initramfs made once at configure
        // included: each names a file of the image.
        for link in ["vmlinuz", "initrd.img"] {
            let target = std::fs::read_link(mnt.path().join(link))
                .unwrap_or_else(|e| panic!("/{link} in the image: {e}"));
            let target = target.to_string_lossy();
            assert!(
                mnt.path().join(target.trim_start_matches('/')).is_file(),
                "/{link} -> {target}: no such file in the image"
            );
        }
        assert!(
            mnt.path()
                .join("etc/systemd/system/multi-user.target.wants/debimg-growroot.service")
                .symlink_metadata()
                .is_ok()
        );
        // Nothing of the build's /dev stays in the image.
        let devs: Vec<String> = std::fs::read_dir(mnt.path().join("dev"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("loop") || n == "disk")
            .collect();
        assert!(devs.is_empty(), "build devices left in /dev: {devs:?}");
        m.close().unwrap();
        dev.close().unwrap();
        std::fs::remove_file(&copy).unwrap();
    }

    // BIOS, on a disk 1 GiB larger than the image: it boots, and the root grows to fill it.
    let big = copy_of(&raw, &work.join("big.img"), 1 << 30);
    let bios = boot(&big, &["--expect", MARKER]);
    bios.assert_ok("BIOS boot of the grown disk");
    let grown = root_bytes(&bios);
    // UEFI, the raw image as built (auto: KVM when it works here, else software emulation).
    let uefi = boot(&raw, &["--uefi", "--expect", MARKER]);
    uefi.assert_ok("UEFI boot");
    let as_built = root_bytes(&uefi);
    assert!(
        grown > as_built + (900 << 20),
        "the root did not grow: {grown} on the larger disk, {as_built} as built"
    );
    std::fs::remove_file(&big).unwrap();
    // The qcow2 and the gzip outputs are the very disk that just booted both ways: qemu reads
    // the qcow2 as the raw's bytes, and the gzip unpacks to them (boot-test boots a `.gz` by
    // unpacking it). Two more boots of the same bytes would prove nothing more.
    let same = tool(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            raw.to_str().unwrap(),
            out.join("cloud.qcow2").to_str().unwrap(),
        ],
    );
    assert!(same.contains("Images are identical"), "{same}");
    tool("gzip", &["-t", out.join("cloud.img.gz").to_str().unwrap()]);
    let unpacked = Command::new("sh")
        .arg("-c")
        .arg("gunzip -c \"$1\" | cmp - \"$2\"")
        .arg("sh")
        .arg(out.join("cloud.img.gz"))
        .arg(&raw)
        .output()
        .unwrap();
    assert!(
        unpacked.status.success(),
        "the gzip output is not the raw disk: {}",
        String::from_utf8_lossy(&unpacked.stdout)
    );
    // Booting never wrote to the outputs.
    assert_eq!(sums(&raw).0, meta.images[0].raw_md5);

    // A broken image: no kernel. The boot test fails and shows the console.
    let broken = copy_of(&raw, &work.join("broken.img"), 0);
    {
        let dev = loopdev::attach_partitioned(&broken).unwrap();
        let mnt = scratch("disk-broken");
        private_mounts();
        let m = mount::mount(
            dev.partition(3).unwrap().to_str().unwrap(),
            mnt.path(),
            Some("ext4"),
            MsFlags::empty(),
            None,
        )
        .unwrap();
        for e in std::fs::read_dir(mnt.path().join("boot"))
            .unwrap()
            .flatten()
        {
            if e.file_name().to_string_lossy().starts_with("vmlinuz-") {
                std::fs::remove_file(e.path()).unwrap();
            }
        }
        m.close().unwrap();
        dev.close().unwrap();
    }
    let failed = debimg(&[
        "boot-test",
        broken.to_str().unwrap(),
        "--cpus",
        "1",
        "--accel",
        "tcg",
        "--timeout",
        "300",
    ]);
    assert_eq!(failed.code(), Some(1), "{}", failed.stderr());
    let err = failed.stderr();
    assert!(err.contains("--- console log ---"), "{err}");
    assert!(
        err.contains("GNU GRUB"),
        "the log shows GRUB's screen: {err}"
    );
    assert!(
        err.contains("vmlinuz"),
        "the log names the missing kernel: {err}"
    );
    assert!(!failed.stdout().contains(MARKER));
}

/// The disk `raw`'s partition table is GPT, and its ESP, as a file of its own under `work`, is
/// fsck-clean with every entry's time the epoch's.
fn esp_is_clamped(work: &Path, raw: &Path) {
    let table = tool("sfdisk", &["--dump", raw.to_str().unwrap()]);
    assert!(table.contains("label: gpt"), "{table}");
    // The ESP as a file of its own: checked, its files' times clamped.
    let esp = work.join("esp.img");
    let start_size: Vec<u64> = table
        .lines()
        .find(|l| l.contains("name=\"ESP\""))
        .map(|l| {
            l.split(',')
                .filter_map(|f| {
                    let (k, v) = f.split_once('=')?;
                    let k = k.rsplit(' ').next()?.trim();
                    matches!(k, "start" | "size").then(|| v.trim().parse().unwrap())
                })
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(start_size.len(), 2, "{table}");
    tool(
        "dd",
        &[
            &format!("if={}", raw.display()),
            &format!("of={}", esp.display()),
            "bs=512",
            &format!("skip={}", start_size[0]),
            &format!("count={}", start_size[1]),
            "status=none",
        ],
    );
    tool("fsck.vfat", &["-n", esp.to_str().unwrap()]);
    let listing = Command::new("mdir")
        .env("MTOOLS_SKIP_CHECK", "1")
        .env("TZ", "UTC")
        .args(["-/", "-i", esp.to_str().unwrap(), "::/"])
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(listing.contains("EFI"), "{listing}");
    // The epoch, 2023-11-14 22:13:20 UTC, on every entry (FAT keeps minutes in a listing).
    let dated: Vec<&str> = listing
        .lines()
        .filter(|l| l.contains("<DIR>") || l.contains(" EFI "))
        .collect();
    assert!(!dated.is_empty(), "{listing}");
    for l in dated {
        assert!(
            l.trim_end().ends_with("2023-11-14  22:13"),
            "not the epoch's time: {l}\n{listing}"
        );
    }
}

/// An MBR disk with a separate /boot and an xfs root, both firmwares, shipped as qcow2 only.
const MBR_SPEC: &str = "version: 1
name: mbrdisk
suite: bookworm
kind: disk
packages: [linux-image-cloud-amd64, systemd-sysv]
root_password_hash: \"!\"
disk:
  size: 2GiB
  table: mbr
  boot: [bios, uefi]
  formats: [qcow2]
  partitions:
    - {size: 256MiB, mount: /boot, fs: ext2, label: boot, flags: [legacy-boot]}
    - {size: 64MiB, flags: [esp]}
    - {mount: /, fs: xfs, label: root}
";

#[test]
fn mbr_disk_with_separate_boot_and_xfs_boots_both_ways() {
    if !can_build() {
        return;
    }
    let work = scratch("mbrdisk");
    let out = work.path().join("out");
    let bdir = work.path().join("build");
    std::fs::create_dir_all(&bdir).unwrap();
    let spec = work.path().join("mbrdisk.yaml");
    std::fs::write(&spec, MBR_SPEC).unwrap();

    // A fault with everything held (partitions mounted, GRUB installed) leaves nothing.
    let mut faulty = build_command(&spec, &out, &bdir, &[]);
    faulty.env("DEBIMG_TEST_FAULT", "configure:fail");
    let failed = faulty.output().unwrap();
    let err = String::from_utf8_lossy(&failed.stderr);
    assert_eq!(failed.status.code(), Some(1), "{err}");
    assert!(err.contains("stage configure failed"), "{err}");
    for bad in ["dropped without close", "still mounted", "could not"] {
        assert!(!err.contains(bad), "`{bad}` in:\n{err}");
    }
    assert_no_leftovers(&bdir, &out);
    // (Its loop device, and with it the partitions, is gone: assert_no_leftovers checks that no
    // loop device is backed by the build directory.)

    let run = build(&spec, &out, &bdir, &[]);
    run.assert_ok("mbr disk build");
    assert_no_leftovers(&bdir, &out);
    let qcow = out.join("mbrdisk.qcow2");
    let check = tool("qemu-img", &["check", qcow.to_str().unwrap()]);
    assert!(check.contains("No errors were found"), "{check}");
    let raw = work.path().join("mbrdisk.img");
    tool(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            qcow.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    let table: serde_json::Value =
        serde_json::from_str(&tool("sfdisk", &["--json", raw.to_str().unwrap()])).unwrap();
    assert_eq!(table["partitiontable"]["label"], "dos");
    let parts = table["partitiontable"]["partitions"].as_array().unwrap();
    assert_eq!(parts[0]["bootable"], true);
    assert_eq!(parts[1]["type"], "ef");
    let blkid = tool("blkid", &["-p", "-o", "export", raw.to_str().unwrap()]);
    assert!(blkid.contains("PTTYPE=dos"), "{blkid}");
    // Both firmwares reach the login prompt: BIOS through the core image after the MBR, UEFI
    // through an early config that reads /grub on the separate /boot.
    debimg(&[
        "boot-test",
        qcow.to_str().unwrap(),
        "--cpus",
        "1",
        "--accel",
        "tcg",
        "--timeout",
        "900",
    ])
    .assert_ok("BIOS boot of the MBR disk");
    debimg(&[
        "boot-test",
        qcow.to_str().unwrap(),
        "--cpus",
        "1",
        "--uefi",
        "--accel",
        "tcg",
        "--timeout",
        "900",
    ])
    .assert_ok("UEFI boot of the MBR disk");
}

fn fsck_vfat(dev: &Path) {
    tool("fsck.vfat", &["-n", dev.to_str().unwrap()]);
}

#[test]
fn boot_test_refuses_what_is_not_an_image() {
    let run = debimg(&["boot-test", "/nonexistent.img", "--timeout", "5"]);
    assert_eq!(run.code(), Some(1));
    assert!(run.stderr().contains("is not a file"), "{}", run.stderr());
}

/// trixie from `mirror: host`, on a host whose apt sources list bookworm: the host's archive
/// serves it too. The cheapest bootable disk (MBR, BIOS, raw); the booted system prints its
/// release from /etc/os-release.
const TRIXIE_SPEC: &str = "version: 1
name: trixie
suite: trixie
mirror: host
kind: disk
packages: [linux-image-cloud-amd64, systemd-sysv]
root_password_hash: \"!\"
disk:
  size: 2GiB
  table: mbr
  boot: [bios]
  formats: [raw]
  cmdline: console=ttyS0,115200n8
  partitions:
    - {mount: /, fs: ext4, label: root}
files:
  - dest: /etc/systemd/system/debimg-boot-report.service
    content: |
      [Unit]
      Description=Report the booted release on the serial console (debimg boot-test)
      After=systemd-user-sessions.service
      [Service]
      Type=oneshot
      ExecStart=/bin/sh -c 'echo \"DEBIMG-BOOT-OK $(grep ^VERSION_CODENAME= /etc/os-release)\" > /dev/ttyS0'
      [Install]
      WantedBy=multi-user.target
services:
  enable: [debimg-boot-report.service]
";

#[test]
fn a_suite_the_host_does_not_list_builds_from_its_mirror_and_boots() {
    if !can_build() {
        return;
    }
    let sources = debimg::debian::mirror::read_host_sources(Path::new("/")).unwrap();
    let listed = sources.iter().any(|s| {
        s.suites
            .iter()
            .any(|x| x.split('-').next() == Some("trixie"))
    });
    let work = scratch("trixie");
    let out = work.path().join("out");
    let bdir = work.path().join("build");
    std::fs::create_dir_all(&bdir).unwrap();
    let spec = work.path().join("trixie.yaml");
    std::fs::write(&spec, TRIXIE_SPEC).unwrap();

    let run = build(&spec, &out, &bdir, &[]);
    run.assert_ok("trixie build from the host's mirror");
    assert_no_leftovers(&bdir, &out);
    eprintln!("trixie build: {:.1?}", run.elapsed);
    if !listed {
        // Found by asking the host's URIs, not from a listed suite.
        assert!(
            run.stderr().contains("serves suite `trixie`"),
            "{}",
            run.stderr()
        );
    }
    let meta = Metadata::read(&out.join("trixie.yaml")).unwrap();
    assert_eq!(meta.repos[0].uri, host_mirror(), "the host's own archive");
    assert_eq!(meta.repos[0].meta.codename.as_deref(), Some("trixie"));
    let base_files = &meta.installed["base-files"];
    assert!(base_files.starts_with("13"), "base-files {base_files}");

    let booted = boot(
        &out.join("trixie.img"),
        &["--accel", "tcg", "--expect", MARKER],
    );
    booted.assert_ok("BIOS boot of the trixie disk");
    eprintln!("trixie boot: {:.1?}", booted.elapsed);
    assert!(
        booted.stdout().contains("VERSION_CODENAME=trixie"),
        "{}",
        booted.stdout()
    );
}
