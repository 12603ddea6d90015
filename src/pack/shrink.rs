//! Shrinking ext2/3/4 images to their content, and toggling the ext4 journal.
//!
//! Everything here works on an unmounted image file, not a block device: e2fsprogs accept
//! files, so no loop device is needed. The filesystem geometry comes from `dumpe2fs -h`, parsed
//! by a pure function that is tested against captured output.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::cmd::CommandRunExt;

/// What debimg needs to know about an ext2/3/4 filesystem, from its superblock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ext2Info {
    /// Number of blocks in the filesystem.
    pub block_count: u64,
    /// Block size in bytes.
    pub block_size: u64,
    /// Free blocks as counted in the superblock.
    pub free_blocks: u64,
    /// Number of inodes in the filesystem.
    pub inode_count: u64,
    /// Filesystem UUID, as printed (lowercase, hyphenated).
    pub uuid: String,
    /// Volume label; `None` when the filesystem has none.
    pub label: Option<String>,
    /// Whether the `has_journal` feature is on.
    pub has_journal: bool,
    /// Feature flags, in the order dumpe2fs prints them.
    pub features: Vec<String>,
    /// Superblock state, for instance `clean` or `not clean with errors`.
    pub state: String,
}

impl Ext2Info {
    /// Size in bytes the filesystem occupies: block count times block size.
    pub fn size_bytes(&self) -> u64 {
        self.block_count * self.block_size
    }

    /// Whether the filesystem has `feature` on (for instance `metadata_csum`).
    pub fn has_feature(&self, feature: &str) -> bool {
        self.features.iter().any(|f| f == feature)
    }
}

/// Parses the superblock summary printed by `dumpe2fs -h`.
///
/// Lines are `Key:  value`; the journal section after the blank line has the same form. The
/// first occurrence of a key wins.
pub fn parse_dumpe2fs(text: &str) -> Result<Ext2Info> {
    let mut fields: HashMap<&str, &str> = HashMap::new();
    for line in text.lines() {
        if let Some((key, value)) = line.split_once(':') {
            fields.entry(key.trim()).or_insert(value.trim());
        }
    }
    let get = |key: &str| -> Result<&str> {
        fields
            .get(key)
            .copied()
            .with_context(|| format!("dumpe2fs output has no \"{key}\" line"))
    };
    let number = |key: &str| -> Result<u64> {
        let value = get(key)?;
        value
            .parse::<u64>()
            .with_context(|| format!("dumpe2fs \"{key}\" is not a number: {value:?}"))
    };

    let block_count = number("Block count")?;
    let block_size = number("Block size")?;
    if block_size == 0 || !block_size.is_power_of_two() {
        bail!("dumpe2fs \"Block size\" is not a power of two: {block_size}");
    }
    let features: Vec<String> = get("Filesystem features")?
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let label = match get("Filesystem volume name")? {
        "<none>" | "" => None,
        name => Some(name.to_string()),
    };
    Ok(Ext2Info {
        block_count,
        block_size,
        free_blocks: number("Free blocks")?,
        inode_count: number("Inode count")?,
        uuid: get("Filesystem UUID")?.to_string(),
        label,
        has_journal: features.iter().any(|f| f == "has_journal"),
        features,
        state: get("Filesystem state")?.to_string(),
    })
}

/// Reads the superblock of the ext2/3/4 filesystem in `image`.
pub fn ext_info(image: &Path) -> Result<Ext2Info> {
    let text = Command::new("dumpe2fs")
        .arg("-h")
        .arg(image)
        .run_stdout()
        .with_context(|| format!("reading the superblock of {}", image.display()))?;
    parse_dumpe2fs(&text).with_context(|| format!("parsing the superblock of {}", image.display()))
}

/// e2fsprogs' clock override: superblock and inode times written by mke2fs, tune2fs and
/// resize2fs come from it.
const E2FS_CLOCK: &str = "E2FSPROGS_FAKE_TIME";

/// e2fsck's own (its last-check time).
const E2FSCK_CLOCK: &str = "E2FSCK_TIME";

/// The environment e2fsprogs run with to write `clock` (a reproducible build's epoch) as the
/// time instead of now; none without one.
pub fn e2fs_env(clock: Option<u64>) -> Vec<(&'static str, String)> {
    clock
        .map(|e| vec![(E2FS_CLOCK, e.to_string()), (E2FSCK_CLOCK, e.to_string())])
        .unwrap_or_default()
}

/// Checks the filesystem in `image` (`e2fsck -fy`), shrinks it to its minimum size
/// (`resize2fs -M`) and truncates the file to exactly the filesystem's new size.
///
/// Returns the new file size in bytes. The image must not be mounted.
///
/// With `clock` (a reproducible build's epoch), e2fsprogs write that time instead of now.
pub fn shrink_ext(image: &Path, clock: Option<u64>) -> Result<u64> {
    shrink(image, clock).with_context(|| format!("shrinking {}", image.display()))
}

fn shrink(image: &Path, clock: Option<u64>) -> Result<u64> {
    let env = e2fs_env(clock);
    let old_size = std::fs::metadata(image)
        .with_context(|| format!("reading the size of {}", image.display()))?
        .len();
    // resize2fs refuses a filesystem that was not checked since its last mount. Exit 1 means
    // errors were corrected, which is fine for an image that was just unmounted.
    Command::new("e2fsck")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .args(["-f", "-y"])
        .arg(image)
        .run_accepting(&[0, 1])?;
    Command::new("resize2fs")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .arg("-M")
        .arg(image)
        .run()?;

    let info = ext_info(image)?;
    let new_size = info.size_bytes();
    let file = OpenOptions::new()
        .write(true)
        .open(image)
        .with_context(|| format!("opening {}", image.display()))?;
    let file_size = file.metadata()?.len();
    if new_size > file_size {
        // resize2fs -M only shrinks; a larger filesystem means the file was cut short already.
        bail!("filesystem needs {new_size} bytes but the file holds only {file_size}");
    }
    file.set_len(new_size)
        .with_context(|| format!("truncating {} to {new_size} bytes", image.display()))?;
    file.sync_all()
        .with_context(|| format!("syncing {}", image.display()))?;
    tracing::info!(
        "shrank {} from {:.1} to {:.1} MiB",
        image.file_name().unwrap_or_default().to_string_lossy(),
        old_size as f64 / 1048576.0,
        new_size as f64 / 1048576.0
    );
    Ok(new_size)
}

/// Turns the ext3/4 journal of the filesystem in `image` on or off (`tune2fs -O`).
///
/// Does nothing when the journal is already in the asked state. The builder turns the journal
/// off while it writes the root filesystem (two to three times faster) and back on at the end.
/// With `clock`, as [`shrink_ext`].
pub fn set_ext_journal(image: &Path, on: bool, clock: Option<u64>) -> Result<()> {
    let what = if on { "adding" } else { "removing" };
    let info = ext_info(image)?;
    if info.has_journal == on {
        return Ok(());
    }
    let feature = if on { "has_journal" } else { "^has_journal" };
    Command::new("tune2fs")
        .envs(e2fs_env(clock))
        .args(["-O", feature])
        .arg(image)
        .run()
        .with_context(|| format!("{what} the journal of {}", image.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    // Captured from images made with mkfs.ext2/mkfs.ext4 (e2fsprogs 1.47.0); the second has 1 KiB
    // blocks (mke2fs "small" type), the third 4 KiB blocks, no label and the journal removed.
    const EXT2: &str = include_str!("../../tests/fixtures/dumpe2fs-ext2.txt");
    const EXT4_1K: &str = include_str!("../../tests/fixtures/dumpe2fs-ext4-1k.txt");
    const EXT4_NOJOURNAL: &str = include_str!("../../tests/fixtures/dumpe2fs-ext4-nojournal.txt");

    #[test]
    fn parses_ext2_fixture() {
        let info = parse_dumpe2fs(EXT2).unwrap();
        assert_eq!(info.block_count, 65536);
        assert_eq!(info.block_size, 1024);
        assert_eq!(info.size_bytes(), 64 << 20);
        assert_eq!(info.free_blocks, 60124);
        assert_eq!(info.uuid, "11111111-2222-3333-4444-555555555555");
        assert_eq!(info.label.as_deref(), Some("boot"));
        assert!(!info.has_journal);
        assert!(info.has_feature("resize_inode"));
        assert!(!info.has_feature("extent"));
        assert_eq!(info.state, "clean");
    }

    #[test]
    fn parses_ext4_fixture_with_journal_section() {
        let info = parse_dumpe2fs(EXT4_1K).unwrap();
        assert_eq!(info.block_count, 262144);
        assert_eq!(info.block_size, 1024);
        assert_eq!(info.uuid, "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee");
        assert_eq!(info.label.as_deref(), Some("root"));
        assert!(info.has_journal);
        assert!(info.has_feature("metadata_csum"));
        assert_eq!(
            info.features.first().map(String::as_str),
            Some("has_journal")
        );
    }

    #[test]
    fn parses_ext4_fixture_without_journal_or_label() {
        let info = parse_dumpe2fs(EXT4_NOJOURNAL).unwrap();
        assert_eq!(info.block_count, 262144);
        assert_eq!(info.block_size, 4096);
        assert_eq!(info.size_bytes(), 1 << 30);
        assert_eq!(info.uuid, "0f0e0d0c-0b0a-0908-0706-050403020100");
        assert_eq!(info.label, None);
        assert!(!info.has_journal);
        assert!(info.has_feature("extent"));
    }

    #[test]
    fn rejects_output_without_geometry() {
        let text = EXT2.replace("Block count:", "Blocks:");
        let err = parse_dumpe2fs(&text).unwrap_err();
        assert!(err.to_string().contains("\"Block count\""), "{err}");

        let text = EXT2.replace("Block size:               1024", "Block size: 1000");
        assert!(parse_dumpe2fs(&text).is_err());

        let err = parse_dumpe2fs("dumpe2fs: Bad magic number in super-block").unwrap_err();
        assert!(err.to_string().contains("no \"Block count\""), "{err}");
    }

    fn have(tool: &str) -> bool {
        Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success())
    }

    fn have_e2fsprogs() -> bool {
        let ok = [
            "mkfs.ext4",
            "e2fsck",
            "resize2fs",
            "dumpe2fs",
            "tune2fs",
            "debugfs",
        ]
        .iter()
        .all(|t| have(t));
        if !ok {
            eprintln!("skipping: e2fsprogs not installed");
        }
        ok
    }

    /// A sparse 256 MiB ext4 image populated from a directory with `mkfs.ext4 -d` (no mount).
    fn make_ext4(dir: &Path) -> (PathBuf, Vec<(&'static str, Vec<u8>)>) {
        let files: Vec<(&'static str, Vec<u8>)> = vec![
            ("/hello.txt", b"hello from debimg\n".to_vec()),
            ("/etc/hostname", b"image\n".to_vec()),
            (
                "/var/lib/blob.bin",
                (0..3_000_000u32)
                    .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                    .collect(),
            ),
        ];
        let root = dir.join("root");
        for (path, data) in &files {
            let p = root.join(path.trim_start_matches('/'));
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, data).unwrap();
        }
        let image = dir.join("root.img");
        let f = std::fs::File::create(&image).unwrap();
        f.set_len(256 << 20).unwrap();
        drop(f);
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "root", "-d"])
            .arg(&root)
            .arg(&image)
            .run()
            .unwrap();
        (image, files)
    }

    #[test]
    fn shrink_keeps_a_valid_filesystem_and_its_files() {
        if !have_e2fsprogs() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (image, files) = make_ext4(dir.path());
        let before = ext_info(&image).unwrap();
        assert_eq!(before.size_bytes(), 256 << 20);

        let new_size = shrink_ext(&image, None).unwrap();
        assert_eq!(std::fs::metadata(&image).unwrap().len(), new_size);
        assert!(new_size < 64 << 20, "only shrank to {new_size} bytes");
        let after = ext_info(&image).unwrap();
        assert_eq!(after.size_bytes(), new_size);
        assert_eq!(after.uuid, before.uuid);

        Command::new("e2fsck")
            .args(["-f", "-n"])
            .arg(&image)
            .run()
            .unwrap();
        for (path, data) in &files {
            let out = Command::new("debugfs")
                .args(["-R", &format!("cat {path}")])
                .arg(&image)
                .output()
                .unwrap();
            assert!(out.status.success());
            assert!(out.stdout == *data, "{path} changed after shrinking");
        }

        // A second shrink finds nothing more to take (or very little) and stays valid.
        let again = shrink_ext(&image, None).unwrap();
        assert!(again <= new_size);
        Command::new("e2fsck")
            .args(["-f", "-n"])
            .arg(&image)
            .run()
            .unwrap();
    }

    #[test]
    fn journal_toggles_and_is_idempotent() {
        if !have_e2fsprogs() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (image, _) = make_ext4(dir.path());
        assert!(ext_info(&image).unwrap().has_journal);

        set_ext_journal(&image, false, None).unwrap();
        assert!(!ext_info(&image).unwrap().has_journal);
        set_ext_journal(&image, false, None).unwrap();

        set_ext_journal(&image, true, None).unwrap();
        assert!(ext_info(&image).unwrap().has_journal);
        set_ext_journal(&image, true, None).unwrap();
        Command::new("e2fsck")
            .args(["-f", "-n"])
            .arg(&image)
            .run()
            .unwrap();
    }

    #[test]
    fn shrink_names_the_image_on_failure() {
        if !have_e2fsprogs() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("not-a-fs.img");
        std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
        let err = shrink_ext(&image, None).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("shrinking") && msg.contains("not-a-fs.img"),
            "{msg}"
        );
        assert!(msg.contains("e2fsck"), "{msg}");
    }
}
