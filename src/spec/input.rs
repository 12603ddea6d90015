//! The host files a spec or fuel-agent input names: the input itself (bounded, a regular file),
//! `files[].source`, `local_debs` and `repos[].key` files (regular files, not kernel files).

use std::path::Path;

use super::{Problem, Spec};

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
pub(super) fn kernel_fs(t: nix::sys::statfs::FsType) -> Option<&'static str> {
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
pub(super) fn check_regular(
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

/// Reads an input file (`what`: "a spec", "a key file"): a regular file ([`open_regular`]) of
/// at most [`MAX_INPUT_BYTES`]. At most the limit and one byte are read, whatever the file
/// claims. The error is a sentence about the file.
pub fn read_input_bytes(path: &Path, what: &str) -> Result<Vec<u8>, String> {
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
    Ok(buf)
}

/// Reads a text input (`what`: "a spec", "a fuel-agent input"): [`read_input_bytes`], in
/// UTF-8.
pub fn read_input_text(path: &Path, what: &str) -> Result<String, String> {
    String::from_utf8(read_input_bytes(path, what)?).map_err(|e| {
        format!(
            "the file is not UTF-8 text (byte {} is not)",
            e.utf8_error().valid_up_to()
        )
    })
}
/// What a file is, for messages: `a directory`, `a character device`, `a FIFO`, ...
pub fn file_kind(t: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

impl Spec {
    /// The host files the spec reads (`files[].source`, `local_debs`, `repos[].key` files,
    /// relative to `base_dir`)
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
        let keys = self
            .repos
            .iter()
            .enumerate()
            .filter(|(_, r)| !r.key_is_inline())
            .filter_map(|(i, r)| Some((format!("repos[{i}].key"), r.key.as_deref()?)));
        sources
            .chain(debs)
            .chain(keys)
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
}
