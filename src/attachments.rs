//! `attachments`: files of the finished image copied next to the outputs (mic's `%attachment`),
//! and `copy_kernel`'s kernel and initrd, which leave the image the same way.
//!
//! What to copy is decided in the image, through the in-root file API ([`Root`]): a glob is
//! expanded by listing the image's directories, a package's files come from dpkg's list in the
//! image, and every path resolves as the image would resolve it, so a link to `/etc/shadow` or
//! to `../../../..` names the image's file, never the host's. Only regular files come out
//! ([`Root::copy_out`]); anything else a path names is an error that names it. The copies wait in
//! the workspace; the package stage writes them into the output directory.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};

use crate::plan::Plan;
use crate::records::{DPKG_INFO, list_stems, lists_of};
use crate::root::Root;
use crate::spec::{Attachment, check_image_path, file_kind, glob, image_path};

/// A file copied out of the image, waiting in the workspace for the package stage.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Attached {
    /// Where it is in the image, as named (`/etc/os-release`, `/boot/vmlinuz-6.1.0-9-amd64`).
    pub path: String,
    /// Its name in the output directory: `NAME.attachments/etc/os-release`, or `NAME.vmlinuz`
    /// and `NAME.initrd` for `copy_kernel`.
    pub file: String,
    /// The copy in the workspace.
    pub copy: PathBuf,
}

impl Attached {
    /// The path below the attachments directory, for a file that goes there; `None` for one
    /// that goes beside the images (the kernel and initrd).
    pub fn in_dir<'a>(&'a self, dir_name: &str) -> Option<&'a str> {
        self.file
            .strip_prefix(dir_name)
            .and_then(|rest| rest.strip_prefix('/'))
    }
}

/// Copies what the plan asks out of the image into `work/attachments/`: with `copy_kernel` the
/// newest kernel and its initrd first, then every attachment in spec order (a file named twice
/// is copied once).
pub fn collect(plan: &Plan, root: &Root, work: &Path) -> Result<Vec<Attached>> {
    // (what asked for it, path in the image, output file name)
    let mut wanted: Vec<(String, String, String)> = Vec::new();
    if plan.copy_kernel {
        let (kernel, initrd) = crate::kind::find_kernel(root)?;
        let (kernel_name, initrd_name) = plan.kernel_names();
        wanted.push(("copy_kernel".into(), kernel, kernel_name));
        wanted.push(("copy_kernel".into(), initrd, initrd_name));
    }
    let dir = plan.attachments_dir_name();
    let mut seen = BTreeSet::new();
    for (i, a) in plan.attachments.iter().enumerate() {
        let field = format!("attachments[{i}]");
        for path in resolve(root, a).with_context(|| field.clone())? {
            if seen.insert(path.clone()) {
                let file = format!("{dir}{path}");
                wanted.push((field.clone(), path, file));
            }
        }
    }
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    let copies = work.join("attachments");
    std::fs::create_dir_all(&copies).with_context(|| format!("creating {}", copies.display()))?;
    let mut out = Vec::with_capacity(wanted.len());
    for (n, (field, path, file)) in wanted.into_iter().enumerate() {
        let copy = copies.join(n.to_string());
        root.copy_out(&path, &copy)
            .with_context(|| format!("{field}: copying {path} out of the image"))?;
        out.push(Attached { path, file, copy });
    }
    Ok(out)
}

/// The paths in the image of the regular files `attachment` names, in order (a glob's matches
/// sorted by name, component by component), each once.
///
/// - A plain path must lead, inside the image, to a regular file; anything else (missing, a
///   directory, a device, a FIFO, a link that leads nowhere inside the image) is an error that
///   names it.
/// - A glob selects the regular files it matches (links followed inside the image; directories,
///   special files and links leading nowhere left out) and must select at least one.
/// - A package's files are the regular files of dpkg's list (`<name>.list` or
///   `<name>:<arch>.list`); directories, links and special files in it are left out, and so,
///   with a warning, is a file the image no longer has. A package that is not installed is an
///   error.
pub fn resolve(root: &Root, attachment: &Attachment) -> Result<Vec<String>> {
    match attachment {
        Attachment::Path(path) => {
            let path = check_image_path(path).map_err(|msg| anyhow!(msg))?;
            if path.split('/').any(glob::is_pattern) {
                expand(root, &path)
            } else {
                regular_file(root, &path).map(|()| vec![path])
            }
        }
        Attachment::Package { package } => package_files(root, package),
    }
}

/// Ok when `path` (normalized) leads, inside the image, to a regular file.
fn regular_file(root: &Root, path: &str) -> Result<()> {
    match root.metadata(path)? {
        Some(md) if md.is_file() => Ok(()),
        Some(md) => bail!(
            "{path} in the image is {}, not a regular file",
            file_kind(&md.file_type())
        ),
        None if root.exists(path) => bail!(
            "{path} in the image is a link that leads nowhere inside the image (links are \
             followed as the image resolves them, never onto the build host)"
        ),
        None => bail!("{path} is not in the image"),
    }
}

/// The most paths one glob may reach at any of its levels.
const MAX_GLOB_MATCHES: usize = 100_000;

/// The regular files the glob `pattern` (normalized) matches in the image, sorted by name.
fn expand(root: &Root, pattern: &str) -> Result<Vec<String>> {
    use std::os::unix::fs::MetadataExt as _;
    // Paths reached so far in the image ("" is `/`), each with the directories (device, inode)
    // a pattern listed on the way to it: a link back to one of them (`d/x -> ..`) is a cycle,
    // not entered again, or each level would multiply the paths.
    let mut reached: Vec<(String, Vec<(u64, u64)>)> = vec![(String::new(), Vec::new())];
    for component in pattern.split('/').filter(|c| !c.is_empty()) {
        if !glob::is_pattern(component) {
            for (p, _) in &mut reached {
                p.push('/');
                p.push_str(component);
            }
            continue;
        }
        let pat = glob::Pattern::parse(component).map_err(|msg| anyhow!("`{pattern}` {msg}"))?;
        let mut next = Vec::new();
        for (dir, above) in &reached {
            let at = if dir.is_empty() { "/" } else { dir.as_str() };
            let id = match root.metadata(at) {
                Ok(Some(md)) if md.is_dir() => (md.dev(), md.ino()),
                _ => continue,
            };
            if above.contains(&id) {
                continue;
            }
            let mut path_ids = above.clone();
            path_ids.push(id);
            for entry in root.read_dir(at)? {
                // A name that is not UTF-8 or holds a control character cannot be named in the
                // metadata or the sums as it is.
                let name = entry.name.to_string_lossy();
                if !pat.matches(&name) {
                    continue;
                }
                if entry.name.to_str().is_none() || name.contains(char::is_control) {
                    tracing::warn!(
                        "attachments: `{pattern}` matches {dir}/{}, whose name is not UTF-8 or holds a control character: left out",
                        name.escape_debug()
                    );
                    continue;
                }
                next.push((format!("{dir}/{name}"), path_ids.clone()));
                if next.len() > MAX_GLOB_MATCHES {
                    bail!(
                        "`{pattern}` reaches more than {MAX_GLOB_MATCHES} paths in the image: \
                         name fewer files"
                    );
                }
            }
        }
        reached = next;
    }
    let files: Vec<String> = reached
        .into_iter()
        .map(|(p, _)| p)
        .filter(|p| matches!(root.metadata(p), Ok(Some(md)) if md.is_file()))
        .collect();
    if files.is_empty() {
        bail!("`{pattern}` matches no regular file in the image");
    }
    Ok(files)
}

/// The regular files dpkg lists for `package` in the image, in the list's order.
fn package_files(root: &Root, package: &str) -> Result<Vec<String>> {
    let stems = list_stems(root)?;
    let lists = lists_of(&stems, package);
    if lists.is_empty() {
        bail!(
            "package {package} is not installed in the image (no /{DPKG_INFO}/{package}.list or {package}:<arch>.list)"
        );
    }
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for stem in lists {
        let list = format!("{DPKG_INFO}/{stem}.list");
        let bytes = root.read(&list)?;
        for line in bytes.split(|b| *b == b'\n') {
            if line.is_empty() || line == b"/." {
                continue;
            }
            let Ok(line) = std::str::from_utf8(line) else {
                tracing::warn!(
                    "attachments: package {package}: {} is not UTF-8: left out",
                    String::from_utf8_lossy(line)
                );
                continue;
            };
            let path = image_path(line)
                .map_err(|msg| anyhow!("/{list} lists {msg}"))
                .with_context(|| format!("reading the files of package {package}"))?;
            // A name with `*`, `?` or `[` is the file's own name here, never expanded.
            if !seen.insert(path.clone()) {
                continue;
            }
            match root.symlink_metadata(&path)? {
                Some(md) if md.is_file() => out.push(path),
                // Directories, links (never followed) and special files.
                Some(_) => {}
                None => tracing::warn!(
                    "attachments: {path} of package {package} is not in the image: left out"
                ),
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    /// An image tree in a jail directory that also holds a host tree next to it: whatever
    /// escapes the image finds the host's files.
    struct Jail {
        dir: tempfile::TempDir,
    }

    impl Jail {
        fn new() -> Jail {
            let dir = tempfile::tempdir().unwrap();
            fs::create_dir_all(dir.path().join("root/etc")).unwrap();
            fs::create_dir_all(dir.path().join("host/etc")).unwrap();
            fs::write(dir.path().join("host/etc/shadow"), "HOST SECRET\n").unwrap();
            Jail { dir }
        }
        fn image(&self, rel: &str) -> PathBuf {
            self.dir
                .path()
                .join("root")
                .join(rel.trim_start_matches('/'))
        }
        fn host(&self, rel: &str) -> PathBuf {
            self.dir.path().join("host").join(rel)
        }
        fn write(&self, rel: &str, text: &str) {
            let p = self.image(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, text).unwrap();
        }
        fn link(&self, target: impl AsRef<Path>, rel: &str) {
            let p = self.image(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            symlink(target, p).unwrap();
        }
        fn root(&self) -> Root {
            Root::open(&self.image("/")).unwrap()
        }
    }

    fn path(p: &str) -> Attachment {
        Attachment::Path(p.to_string())
    }

    fn err(root: &Root, a: &Attachment) -> String {
        format!("{:#}", resolve(root, a).unwrap_err())
    }

    #[test]
    fn a_plain_path_must_be_a_regular_file_in_the_image() {
        let j = Jail::new();
        j.write("/etc/os-release", "ID=debian\n");
        fs::create_dir_all(j.image("/var/lib/empty")).unwrap();
        nix::unistd::mkfifo(
            &j.image("/etc/fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        let r = j.root();
        assert_eq!(
            resolve(&r, &path("//etc/./os-release")).unwrap(),
            ["/etc/os-release"]
        );
        let e = err(&r, &path("/var/lib/empty"));
        assert!(
            e.contains("/var/lib/empty in the image is a directory"),
            "{e}"
        );
        let e = err(&r, &path("/etc/fifo"));
        assert!(e.contains("/etc/fifo in the image is a FIFO"), "{e}");
        let e = err(&r, &path("/etc/missing"));
        assert!(e.contains("/etc/missing is not in the image"), "{e}");
        let e = err(&r, &path("/etc/../etc/os-release"));
        assert!(e.contains("`..`"), "{e}");
    }

    #[test]
    fn links_to_outside_resolve_inside_the_image_or_fail() {
        let j = Jail::new();
        // An absolute link to the host's file, one climbing far above the root, and a relative
        // one whose `..`s stop at the root: none reaches the host.
        j.link(j.host("etc/shadow"), "/etc/abs-host");
        j.link("../../../../../../../host/etc/shadow", "/etc/climb");
        j.link("/etc", "/etc/loop-dir");
        let r = j.root();
        for p in ["/etc/abs-host", "/etc/climb"] {
            let e = err(&r, &path(p));
            assert!(
                e.contains(&format!("{p} in the image is a link that leads nowhere")),
                "{e}"
            );
        }
        let e = err(&r, &path("/etc/loop-dir"));
        assert!(e.contains("is a directory"), "{e}");
        // Once the image holds files where the links lead, they are the image's.
        let abs = j.host("etc/shadow");
        j.write(abs.to_str().unwrap(), "the image's own file\n");
        j.write("/host/etc/shadow", "the image's shadow\n");
        let out = tempfile::tempdir().unwrap();
        for (p, want) in [
            ("/etc/abs-host", "the image's own file\n"),
            ("/etc/climb", "the image's shadow\n"),
        ] {
            assert_eq!(resolve(&r, &path(p)).unwrap(), [p]);
            let dest = out.path().join(p.trim_start_matches("/etc/"));
            r.copy_out(p, &dest).unwrap();
            assert_eq!(fs::read_to_string(&dest).unwrap(), want);
        }
        assert_eq!(
            fs::read_to_string(j.host("etc/shadow")).unwrap(),
            "HOST SECRET\n"
        );
    }

    #[test]
    fn globs_select_regular_files_and_must_select_one() {
        let j = Jail::new();
        j.write("/boot/config-6.1.0-9-amd64", "9");
        j.write("/boot/config-6.1.0-10-amd64", "10");
        j.write("/boot/System.map-6.1.0-9-amd64", "map");
        fs::create_dir_all(j.image("/boot/config-dir")).unwrap();
        j.link("/etc/nowhere", "/boot/config-dangling");
        j.link(j.host("etc/shadow"), "/boot/config-host");
        j.write("/boot/.config-hidden", "hidden");
        j.write("/etc/apt/sources.list.d/a.list", "a");
        j.write("/etc/apt/sources.list.d/b.sources", "b");
        j.write("/etc/default/grub", "g");
        // A directory reached through a link inside the image is listed too.
        j.link("/etc/apt", "/etc/apt-link");
        let r = j.root();
        assert_eq!(
            resolve(&r, &path("/boot/config-*")).unwrap(),
            ["/boot/config-6.1.0-10-amd64", "/boot/config-6.1.0-9-amd64"]
        );
        assert_eq!(
            resolve(&r, &path("/etc/*/sources.list.d/?.*")).unwrap(),
            [
                "/etc/apt/sources.list.d/a.list",
                "/etc/apt/sources.list.d/b.sources",
                "/etc/apt-link/sources.list.d/a.list",
                "/etc/apt-link/sources.list.d/b.sources",
            ]
        );
        assert_eq!(
            resolve(&r, &path("/etc/apt/sources.list.d/[a]*")).unwrap(),
            ["/etc/apt/sources.list.d/a.list"]
        );
        assert_eq!(
            resolve(&r, &path("/boot/.config-*")).unwrap(),
            ["/boot/.config-hidden"]
        );
        let e = err(&r, &path("/boot/vmlinuz-*"));
        assert!(e.contains("matches no regular file"), "{e}");
        let e = err(&r, &path("/nonexistent/*/x"));
        assert!(e.contains("matches no regular file"), "{e}");
        // A glob whose directory part leads out of the image stays in it.
        j.link(j.dir.path().join("host"), "/hostdir");
        let e = err(&r, &path("/hostdir/etc/*"));
        assert!(e.contains("matches no regular file"), "{e}");
    }

    #[test]
    fn links_back_up_do_not_multiply_a_glob() {
        let j = Jail::new();
        j.write("/d/f", "f");
        // Six ways back to /d at every level: 6^8 paths if each were entered again.
        for i in 0..6 {
            j.link("/d", &format!("/d/up{i}"));
        }
        let r = j.root();
        let found = resolve(&r, &path("/d/*/*/*/*/*/*/*/f"))
            .unwrap_err()
            .to_string();
        assert!(found.contains("matches no regular file"), "{found}");
        assert_eq!(
            resolve(&r, &path("/d/*/f")).unwrap(),
            [
                "/d/up0/f", "/d/up1/f", "/d/up2/f", "/d/up3/f", "/d/up4/f", "/d/up5/f"
            ]
        );
    }

    #[test]
    fn a_package_gives_its_regular_files() {
        let j = Jail::new();
        j.write(
            "/var/lib/dpkg/info/tool.list",
            "/.\n/usr\n/usr/bin\n/usr/bin/tool\n/usr/share/tool\n/usr/share/tool/data\n\
             /usr/bin/tool-link\n/usr/share/tool/gone\n/usr/share/tool/to-host\n",
        );
        j.write(
            "/var/lib/dpkg/info/libx:amd64.list",
            "/.\n/usr/lib/libx.so.1\n",
        );
        j.write("/usr/bin/tool", "#!/bin/sh\n");
        j.write("/usr/share/tool/data", "data\n");
        j.link("tool", "/usr/bin/tool-link");
        j.link(j.host("etc/shadow"), "/usr/share/tool/to-host");
        j.write("/usr/lib/libx.so.1", "ELF");
        // A name with pattern characters is the file's own name, never expanded nor refused.
        j.write(
            "/var/lib/dpkg/info/odd.list",
            "/.\n/usr/share/odd/[x\n/usr/share/odd/*\n",
        );
        j.write("/usr/share/odd/[x", "bracket");
        j.write("/usr/share/odd/*", "star");
        j.write("/usr/share/odd/other", "not listed");
        let r = j.root();
        let package = |p: &str| Attachment::Package {
            package: p.to_string(),
        };
        assert_eq!(
            resolve(&r, &package("tool")).unwrap(),
            ["/usr/bin/tool", "/usr/share/tool/data"]
        );
        assert_eq!(
            resolve(&r, &package("libx")).unwrap(),
            ["/usr/lib/libx.so.1"]
        );
        assert_eq!(
            resolve(&r, &package("odd")).unwrap(),
            ["/usr/share/odd/[x", "/usr/share/odd/*"]
        );
        let e = err(&r, &package("ghost"));
        assert!(e.contains("package ghost is not installed"), "{e}");
        // A list that climbs out is refused, not followed.
        j.write("/var/lib/dpkg/info/evil.list", "/.\n/../host/etc/shadow\n");
        let e = err(&r, &package("evil"));
        assert!(e.contains("`..`"), "{e}");
    }

    #[test]
    fn collect_copies_the_kernel_and_attachments_once_each() {
        let j = Jail::new();
        j.write("/boot/vmlinuz-6.1.0-9-amd64", "kernel");
        j.write("/boot/initrd.img-6.1.0-9-amd64", "initrd");
        j.write("/etc/os-release", "ID=debian\n");
        let plan = Plan::for_test(
            "version: 1\nname: t\nsuite: bookworm\nkind: tarball\ncopy_kernel: true\n\
             attachments: [/boot/vmlinuz-*, {path: /etc/os-release}]\n",
        );
        let work = tempfile::tempdir().unwrap();
        let got = collect(&plan, &j.root(), work.path()).unwrap();
        let names: Vec<(&str, &str)> = got
            .iter()
            .map(|a| (a.path.as_str(), a.file.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                ("/boot/vmlinuz-6.1.0-9-amd64", "t.vmlinuz"),
                ("/boot/initrd.img-6.1.0-9-amd64", "t.initrd"),
                (
                    "/boot/vmlinuz-6.1.0-9-amd64",
                    "t.attachments/boot/vmlinuz-6.1.0-9-amd64"
                ),
                ("/etc/os-release", "t.attachments/etc/os-release"),
            ]
        );
        assert_eq!(got[0].in_dir("t.attachments"), None);
        assert_eq!(got[3].in_dir("t.attachments"), Some("etc/os-release"));
        assert_eq!(fs::read_to_string(&got[3].copy).unwrap(), "ID=debian\n");
        assert_eq!(fs::read_to_string(&got[0].copy).unwrap(), "kernel");
        // A failure names the attachment.
        let plan = Plan::for_test(
            "version: 1\nname: t\nsuite: bookworm\nkind: tarball\nattachments: [/etc/os-release, /etc]\n",
        );
        let work = tempfile::tempdir().unwrap();
        let e = format!("{:#}", collect(&plan, &j.root(), work.path()).unwrap_err());
        assert!(
            e.starts_with("attachments[1]: /etc in the image is a directory"),
            "{e}"
        );
    }
}
