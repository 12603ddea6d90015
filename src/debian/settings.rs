//! The spec's system settings carried out on the installed tree: time zone, locale, users,
//! systemd units and the files copied in.
//!
//! debimg works on the image from the build host, so every path inside the image goes through
//! the in-root file API ([`Root`]): a symlink the image holds (`/etc/x -> /`) is read as the
//! image would read it, never followed out onto the build host. Owners are the image's: user and
//! group names are looked up in its own `/etc/passwd` and `/etc/group` and set by number.
//! Programs that must run inside the image (useradd, locale-gen, systemctl) run in its chroot.

use anyhow::{Context, Result, bail};
use std::io::Read;

use crate::cmd::CommandRunExt;
use crate::plan::PlannedFile;
use crate::root::{Owner, Root};
use crate::spec::{Services, User};

pub use crate::spec::BUILTIN_LOCALES;

/// How many close matches an unknown locale's error lists.
const LOCALE_SUGGESTIONS: usize = 5;

/// Points `/etc/localtime` at `/usr/share/zoneinfo/<zone>` and writes `/etc/timezone`: what
/// `dpkg-reconfigure tzdata` does, and what tzdata's maintainer scripts read back on upgrades.
pub fn set_timezone(root: &Root, zone: &str) -> Result<()> {
    if zone.is_empty()
        || zone.starts_with('/')
        || zone
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        bail!("time zone `{zone}` is not a zone name such as `Europe/Berlin` or `UTC`");
    }
    let zone_file = format!("/usr/share/zoneinfo/{zone}");
    if !is_tzif(root, &zone_file) {
        bail!(
            "time zone `{zone}` is not in the image: no zone file {zone_file} (tzdata names \
             zones like `Europe/Berlin`, `America/New_York` or `UTC`)"
        );
    }
    root.symlink(&zone_file, "/etc/localtime")?;
    root.write(
        "/etc/timezone",
        format!("{zone}\n").as_bytes(),
        0o644,
        Owner::ROOT,
    )?;
    Ok(())
}

/// True when `path` in the image is a regular file that starts like a compiled zone (`TZif`):
/// zone.tab, leap-seconds.list and directories such as `Europe` are not zones.
fn is_tzif(root: &Root, path: &str) -> bool {
    let mut magic = [0u8; 4];
    root.open_file(path)
        .is_ok_and(|mut f| f.read_exact(&mut magic).is_ok())
        && &magic == b"TZif"
}

/// Makes `locale` the image's default (`LANG` in `/etc/default/locale`). A built-in locale
/// (`C`, `C.UTF-8`, `POSIX`) needs nothing more; any other is looked up in the `locales`
/// package's list of supported locales, listed alone in `/etc/locale.gen` and built with
/// locale-gen. The debconf answers are set as well: the `locales` package rewrites
/// `/etc/locale.gen` from them on every upgrade.
pub fn set_locale(root: &Root, locale: &str) -> Result<()> {
    if !BUILTIN_LOCALES.contains(&locale) {
        generate_locale(root, locale)?;
    }
    root.write(
        "/etc/default/locale",
        format!("LANG={locale}\n").as_bytes(),
        0o644,
        Owner::ROOT,
    )
}

fn generate_locale(root: &Root, locale: &str) -> Result<()> {
    const SUPPORTED: &str = "/usr/share/i18n/SUPPORTED";
    let supported = read_image_file(root, SUPPORTED)
        .with_context(|| format!("locale `{locale}` needs the locales package in the image"))?;
    let Some((name, charset)) = find_supported(&supported, locale) else {
        let close = close_locales(&supported, locale, LOCALE_SUGGESTIONS);
        bail!(
            "locale `{locale}` is not in the image's {SUPPORTED}; close ones: {}",
            backticked(&close)
        );
    };
    let entry = format!("{name} {charset}");
    root.command("debconf-set-selections")
        .run_with_stdin(
            format!(
                "locales locales/locales_to_be_generated multiselect {entry}\n\
                 locales locales/default_environment_locale select {name}\n"
            )
            .as_bytes(),
        )
        .with_context(|| {
            format!("setting the debconf answers of the locales package to `{entry}`")
        })?;
    root.write(
        "/etc/locale.gen",
        format!(
            "# Locales locale-gen builds (debimg: the spec's `locale`). The supported ones\n\
             # are listed in {SUPPORTED}; rerun locale-gen after changing this file.\n\
             {entry}\n"
        )
        .as_bytes(),
        0o644,
        Owner::ROOT,
    )?;
    root.command("locale-gen")
        .run()
        .with_context(|| format!("generating locale `{entry}` with locale-gen"))?;
    // locale-gen ignores localedef's failures: check that the locale is there.
    let archive = root
        .command("localedef")
        .arg("--list-archive")
        .run_stdout()
        .context("listing the generated locales")?;
    if !archive
        .lines()
        .any(|l| locale_key(l.trim()) == locale_key(name))
    {
        bail!(
            "locale-gen did not generate `{entry}` (the archive holds: {})",
            backticked(&archive.lines().map(str::trim).collect::<Vec<_>>())
        );
    }
    Ok(())
}

/// The locale and charset of `SUPPORTED`'s line for `locale` (`en_US.UTF-8 UTF-8`,
/// `de_DE@euro ISO-8859-15`), matched exactly on the locale.
fn find_supported<'a>(supported: &'a str, locale: &str) -> Option<(&'a str, &'a str)> {
    supported_entries(supported).find(|(name, _)| *name == locale)
}

fn supported_entries(supported: &str) -> impl Iterator<Item = (&str, &str)> {
    supported.lines().filter_map(|line| {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some(name), Some(charset)) if !name.starts_with('#') => Some((name, charset)),
            _ => None,
        }
    })
}

/// The `n` supported locales spelled closest to `locale`, closest first (`en_US.utf8` finds
/// `en_US.UTF-8`).
fn close_locales<'a>(supported: &'a str, locale: &str, n: usize) -> Vec<&'a str> {
    let want = locale_key(locale);
    let mut scored: Vec<(usize, &str)> = supported_entries(supported)
        .map(|(name, _)| (edit_distance(&want, &locale_key(name)), name))
        .collect();
    scored.sort();
    scored.into_iter().take(n).map(|(_, name)| name).collect()
}

/// A locale name as glibc compares it: case and dashes in the charset do not count
/// (`en_US.UTF-8` is archived as `en_US.utf8`).
fn locale_key(name: &str) -> String {
    name.to_lowercase().replace('-', "")
}

use crate::spec::edit_distance;

/// Creates each user with useradd in the image (home from /etc/skel, a group of its own, the
/// password hash or a locked password), then its `~/.ssh/authorized_keys`. The groups are
/// checked against the image's `/etc/group` first: a group comes with the package that uses it.
pub fn create_users(root: &Root, users: &[User]) -> Result<()> {
    for user in users {
        create_user(root, user).with_context(|| format!("creating user `{}`", user.name))?;
    }
    Ok(())
}

fn create_user(root: &Root, user: &User) -> Result<()> {
    let passwd = parse_passwd(&read_image_file(root, "/etc/passwd")?);
    if passwd.iter().any(|e| e.name == user.name) {
        bail!(
            "the image has a user `{}` already (made by a package?)",
            user.name
        );
    }
    let groups = parse_group(&read_image_file(root, "/etc/group")?);
    let missing = missing_groups(&groups, &user.groups);
    if !missing.is_empty() {
        bail!(
            "group(s) {} not in the image's /etc/group: a group comes with the package that \
             uses it (add that package to `packages`), or leave it out of the user's `groups`",
            backticked(&missing)
        );
    }
    if !root.is_file(&user.shell) {
        bail!(
            "shell {} is not in the image: add the package that has it to `packages`",
            user.shell
        );
    }
    let mut cmd = root.command("useradd");
    cmd.args(["--create-home", "--shell", &user.shell]);
    if !user.groups.is_empty() {
        cmd.args(["--groups", &user.groups.join(",")]);
    }
    cmd.args([
        "--password",
        user.password_hash.as_deref().unwrap_or("!"),
        "--user-group",
        &user.name,
    ]);
    cmd.run().with_context(|| {
        if user.groups.is_empty() {
            "running useradd".to_string()
        } else {
            format!("running useradd with groups {}", backticked(&user.groups))
        }
    })?;
    if !user.ssh_authorized_keys.is_empty() {
        install_authorized_keys(root, user)?;
    }
    Ok(())
}

/// Writes `~/.ssh/authorized_keys` (0600) in a `~/.ssh` (0700), both owned by the user as the
/// image numbers it.
fn install_authorized_keys(root: &Root, user: &User) -> Result<()> {
    let passwd = parse_passwd(&read_image_file(root, "/etc/passwd")?);
    let Some(entry) = passwd.iter().find(|e| e.name == user.name) else {
        bail!("the image's /etc/passwd has no entry for `{}`", user.name);
    };
    if !root.is_dir(&entry.home) {
        bail!(
            "home directory {} of `{}` is not a directory in the image",
            entry.home,
            user.name
        );
    }
    let owner = Owner {
        uid: entry.uid,
        gid: entry.gid,
    };
    let ssh_dir = format!("{}/.ssh", entry.home.trim_end_matches('/'));
    match root.symlink_metadata(&ssh_dir)? {
        Some(m) if m.is_dir() => {}
        Some(_) => bail!("{ssh_dir} in the image is not a directory"),
        None => root.create_dir_all(&ssh_dir)?,
    }
    root.set_owner(&ssh_dir, owner)?;
    root.set_mode(&ssh_dir, 0o700)?;
    let mut keys = user.ssh_authorized_keys.join("\n");
    keys.push('\n');
    root.write(
        format!("{ssh_dir}/authorized_keys"),
        keys.as_bytes(),
        0o600,
        owner,
    )
}

/// The groups of `wanted` that `groups` (the image's) lacks.
fn missing_groups<'a>(groups: &[GroupEntry], wanted: &'a [String]) -> Vec<&'a str> {
    wanted
        .iter()
        .filter(|w| !groups.iter().any(|g| &g.name == *w))
        .map(String::as_str)
        .collect()
}

/// Enables, then disables, the spec's systemd units with systemctl in the image (offline: it
/// only makes or removes the `[Install]` symlinks). Nothing to do when both lists are empty.
pub fn set_services(root: &Root, services: &Services) -> Result<()> {
    if services.enable.is_empty() && services.disable.is_empty() {
        return Ok(());
    }
    let has_systemctl = ["/usr/bin/systemctl", "/bin/systemctl"]
        .iter()
        .any(|p| root.is_file(p));
    if !has_systemctl {
        bail!("services need systemd in the image: add systemd (or systemd-sysv) to packages");
    }
    for (verb, doing, units) in [
        ("enable", "enabling", &services.enable),
        ("disable", "disabling", &services.disable),
    ] {
        for unit in units {
            root.command("systemctl")
                // systemctl detects the chroot itself; this makes sure it never asks a running
                // systemd (the build host's) to do anything.
                .env("SYSTEMD_OFFLINE", "1")
                .args([verb, unit.as_str()])
                .run()
                .with_context(|| format!("{doing} systemd unit `{unit}` in the image"))?;
        }
    }
    Ok(())
}

/// Puts the spec's files into the image: each written whole under a temporary name and renamed
/// over its destination (a symlink there is replaced, not written through), with its mode
/// (setuid bits included) and its owner as the image names it. Missing parent directories are
/// made (0755, root). Destinations resolve inside the image whatever symlinks it holds.
pub fn copy_files(root: &Root, files: &[PlannedFile]) -> Result<()> {
    if files.is_empty() {
        return Ok(());
    }
    let passwd = parse_passwd(&read_image_file(root, "/etc/passwd")?);
    let groups = parse_group(&read_image_file(root, "/etc/group")?);
    for file in files {
        let (uid, gid) = owner_ids(&passwd, &groups, &file.owner)
            .with_context(|| format!("owner of {} in the image", file.dest))?;
        let owner = Owner { uid, gid };
        match (&file.source, &file.content) {
            (Some(src), _) => root
                .copy_in(src, &file.dest, file.mode, owner)
                .with_context(|| {
                    format!("copying {} to {} in the image", src.display(), file.dest)
                })?,
            (None, Some(text)) => root
                .write(&file.dest, text.as_bytes(), file.mode, owner)
                .with_context(|| format!("writing {} in the image", file.dest))?,
            (None, None) => bail!("{}: neither a source nor content", file.dest),
        };
    }
    Ok(())
}

/// Reads a text file of the image (`/etc/passwd`), resolved inside it.
fn read_image_file(root: &Root, path: &str) -> Result<String> {
    root.read_to_string(path)
        .with_context(|| format!("reading the image's {path}"))
}

/// One account of an `/etc/passwd`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

/// One group of an `/etc/group`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct GroupEntry {
    name: String,
    gid: u32,
}

/// The accounts of passwd(5) text; comments, NIS `+`/`-` lines and broken lines are skipped.
fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 7 || f[0].is_empty() || f[0].starts_with(['#', '+', '-']) {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].to_string(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: f[5].to_string(),
            })
        })
        .collect()
}

/// The groups of group(5) text; comments, NIS `+`/`-` lines and broken lines are skipped.
fn parse_group(text: &str) -> Vec<GroupEntry> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 3 || f[0].is_empty() || f[0].starts_with(['#', '+', '-']) {
                return None;
            }
            Some(GroupEntry {
                name: f[0].to_string(),
                gid: f[2].parse().ok()?,
            })
        })
        .collect()
}

/// The (uid, gid) of a `user:group` owner, by the image's accounts.
fn owner_ids(passwd: &[PasswdEntry], groups: &[GroupEntry], owner: &str) -> Result<(u32, u32)> {
    let Some((user, group)) = owner.split_once(':') else {
        bail!("`{owner}` is not `user:group`");
    };
    let Some(u) = passwd.iter().find(|e| e.name == user) else {
        bail!("user `{user}` is not in the image's /etc/passwd");
    };
    let Some(g) = groups.iter().find(|e| e.name == group) else {
        bail!("group `{group}` is not in the image's /etc/group");
    };
    Ok((u.uid, g.gid))
}

/// `a`, `b`, `c` for messages.
fn backticked<S: AsRef<str>>(items: &[S]) -> String {
    items
        .iter()
        .map(|s| format!("`{}`", s.as_ref()))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, symlink};
    use std::path::Path;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
        daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
        # a comment\n\
        +::::::\n\
        broken:x:nope:1:b:/b:/bin/sh\n\
        alice:x:1234:1235:Alice,,,:/home/alice:/bin/bash\n";

    const GROUP: &str = "root:x:0:\nadm:x:4:alice\nsudo:x:27:\nstaff:x:50:\nalice:x:1235:\n";

    const SUPPORTED: &str = "aa_DJ.UTF-8 UTF-8\naa_DJ ISO-8859-1\nde_DE.UTF-8 UTF-8\n\
        de_DE ISO-8859-1\nde_DE@euro ISO-8859-15\nen_AU.UTF-8 UTF-8\nen_GB.UTF-8 UTF-8\n\
        en_US.UTF-8 UTF-8\nen_US ISO-8859-1\nen_US.ISO-8859-15 ISO-8859-15\n\
        sr_RS@latin UTF-8\nzh_CN.GB18030 GB18030\n";

    fn is_root() -> bool {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipping: needs root to give files to other users");
            return false;
        }
        true
    }

    fn fake_root() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/passwd"), PASSWD).unwrap();
        std::fs::write(root.join("etc/group"), GROUP).unwrap();
        dir
    }

    fn planned(dest: &str, content: &str, mode: u32, owner: &str) -> PlannedFile {
        PlannedFile {
            source: None,
            content: Some(content.into()),
            sha256: String::new(),
            dest: dest.into(),
            mode,
            owner: owner.into(),
        }
    }

    #[test]
    fn passwd_and_group_are_parsed() {
        let p = parse_passwd(PASSWD);
        let names: Vec<&str> = p.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["root", "daemon", "alice"]);
        assert_eq!(
            p[2],
            PasswdEntry {
                name: "alice".into(),
                uid: 1234,
                gid: 1235,
                home: "/home/alice".into(),
            }
        );
        let g = parse_group(GROUP);
        assert_eq!(g.len(), 5);
        assert_eq!(
            g[2],
            GroupEntry {
                name: "sudo".into(),
                gid: 27
            }
        );
    }

    #[test]
    fn owners_are_looked_up_by_name() {
        let p = parse_passwd(PASSWD);
        let g = parse_group(GROUP);
        assert_eq!(owner_ids(&p, &g, "alice:staff").unwrap(), (1234, 50));
        assert_eq!(owner_ids(&p, &g, "root:root").unwrap(), (0, 0));
        let e = owner_ids(&p, &g, "ghost:staff").unwrap_err().to_string();
        assert!(e.contains("user `ghost`"), "{e}");
        let e = owner_ids(&p, &g, "alice:ghosts").unwrap_err().to_string();
        assert!(e.contains("group `ghosts`"), "{e}");
        assert!(owner_ids(&p, &g, "alice").is_err());
    }

    #[test]
    fn missing_groups_are_named() {
        let g = parse_group(GROUP);
        let wanted = vec![
            "sudo".to_string(),
            "docker".into(),
            "adm".into(),
            "libvirt".into(),
        ];
        assert_eq!(missing_groups(&g, &wanted), ["docker", "libvirt"]);
    }

    #[test]
    fn supported_locales_match_exactly() {
        assert_eq!(
            find_supported(SUPPORTED, "en_US.UTF-8"),
            Some(("en_US.UTF-8", "UTF-8"))
        );
        assert_eq!(
            find_supported(SUPPORTED, "de_DE@euro"),
            Some(("de_DE@euro", "ISO-8859-15"))
        );
        assert_eq!(
            find_supported(SUPPORTED, "en_US"),
            Some(("en_US", "ISO-8859-1"))
        );
        assert_eq!(find_supported(SUPPORTED, "en_US.utf8"), None);
        assert_eq!(find_supported(SUPPORTED, "en"), None);
    }

    #[test]
    fn unknown_locales_get_close_suggestions() {
        let close = close_locales(SUPPORTED, "en_US.utf8", 5);
        assert_eq!(close.len(), 5);
        assert_eq!(close[0], "en_US.UTF-8");
        let close = close_locales(SUPPORTED, "de_DE.utf8", 3);
        assert_eq!(close[0], "de_DE.UTF-8");
        let close = close_locales(SUPPORTED, "en_UK.UTF-8", 3);
        assert!(close.contains(&"en_GB.UTF-8"), "{close:?}");
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
    }

    #[test]
    fn builtin_locale_only_sets_lang() {
        if !is_root() {
            return;
        }
        let dir = fake_root();
        set_locale(&Root::open(dir.path()).unwrap(), "C.UTF-8").unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("etc/default/locale")).unwrap(),
            "LANG=C.UTF-8\n"
        );
        assert!(!dir.path().join("etc/locale.gen").exists());
    }

    #[test]
    fn unknown_locale_fails_before_running_anything() {
        let dir = fake_root();
        let e = format!(
            "{:#}",
            set_locale(&Root::open(dir.path()).unwrap(), "en_US.utf8").unwrap_err()
        );
        assert!(e.contains("locales package"), "{e}");
        std::fs::create_dir_all(dir.path().join("usr/share/i18n")).unwrap();
        std::fs::write(dir.path().join("usr/share/i18n/SUPPORTED"), SUPPORTED).unwrap();
        let e = format!(
            "{:#}",
            set_locale(&Root::open(dir.path()).unwrap(), "en_US.utf8").unwrap_err()
        );
        assert!(
            e.contains("`en_US.utf8`") && e.contains("`en_US.UTF-8`"),
            "{e}"
        );
        assert!(!dir.path().join("etc/locale.gen").exists());
    }

    #[test]
    fn copied_files_never_leave_the_root() {
        if !is_root() {
            return;
        }
        let dir = fake_root();
        let root = dir.path();
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, "original").unwrap();
        symlink("/", root.join("etc/x")).unwrap();
        symlink(&victim, root.join("etc/victim")).unwrap();
        std::fs::write(root.join("etc/motd"), "old").unwrap();
        let source = outside.path().join("tool");
        std::fs::write(&source, "#!/bin/sh\n").unwrap();
        let marker = format!("debimg-settings-test-{}", std::process::id());
        let mut tool = planned("/usr/local/bin/tool", "", 0o755, "root:root");
        tool.source = Some(source.clone());
        tool.content = None;
        copy_files(
            &Root::open(root).unwrap(),
            &[
                planned(
                    &format!("/etc/x/{marker}/inner/f"),
                    "a",
                    0o4755,
                    "alice:staff",
                ),
                planned("/etc/victim", "b", 0o644, "root:root"),
                planned("/etc/motd", "new", 0o600, "alice:alice"),
                tool,
            ],
        )
        .unwrap();

        let f = root.join(&marker).join("inner/f");
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "a");
        let m = f.metadata().unwrap();
        assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o4755, 1234, 50));
        let d = root.join(&marker).metadata().unwrap();
        assert_eq!((d.mode() & 0o7777, d.uid()), (0o755, 0));
        assert!(!Path::new("/").join(&marker).exists());

        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "original");
        let v = root.join("etc/victim").symlink_metadata().unwrap();
        assert!(v.is_file());
        assert_eq!(
            std::fs::read_to_string(root.join("etc/victim")).unwrap(),
            "b"
        );

        let motd = root.join("etc/motd");
        assert_eq!(std::fs::read_to_string(&motd).unwrap(), "new");
        let m = motd.metadata().unwrap();
        assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o600, 1234, 1235));

        let t = root.join("usr/local/bin/tool");
        assert_eq!(std::fs::read_to_string(&t).unwrap(), "#!/bin/sh\n");
        assert_eq!(t.metadata().unwrap().mode() & 0o7777, 0o755);

        let leftovers: Vec<_> = std::fs::read_dir(root.join("etc"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".debimg-"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn unknown_owner_is_named() {
        let dir = fake_root();
        let e = format!(
            "{:#}",
            copy_files(
                &Root::open(dir.path()).unwrap(),
                &[planned("/etc/f", "x", 0o644, "ghost:root")]
            )
            .unwrap_err()
        );
        assert!(e.contains("/etc/f") && e.contains("user `ghost`"), "{e}");
        assert!(!dir.path().join("etc/f").exists());
    }

    #[test]
    fn timezone_links_localtime() {
        if !is_root() {
            return;
        }
        let dir = fake_root();
        let root = dir.path();
        let zi = root.join("usr/share/zoneinfo");
        std::fs::create_dir_all(zi.join("Etc")).unwrap();
        std::fs::create_dir_all(zi.join("Europe")).unwrap();
        std::fs::write(zi.join("Etc/UTC"), "TZif2...").unwrap();
        std::fs::write(zi.join("Europe/Berlin"), "TZif2...").unwrap();
        std::fs::write(zi.join("zone.tab"), "# not a zone\n").unwrap();
        symlink("Etc/UTC", zi.join("UTC")).unwrap();
        std::fs::write(root.join("etc/localtime"), "old").unwrap();

        set_timezone(&Root::open(root).unwrap(), "Europe/Berlin").unwrap();
        assert_eq!(
            std::fs::read_link(root.join("etc/localtime")).unwrap(),
            Path::new("/usr/share/zoneinfo/Europe/Berlin")
        );
        assert_eq!(
            std::fs::read_to_string(root.join("etc/timezone")).unwrap(),
            "Europe/Berlin\n"
        );
        set_timezone(&Root::open(root).unwrap(), "UTC").unwrap();
        assert_eq!(
            std::fs::read_link(root.join("etc/localtime")).unwrap(),
            Path::new("/usr/share/zoneinfo/UTC")
        );
        for bad in ["Europe/Berln", "zone.tab", "Europe", "../../etc/passwd"] {
            let e = set_timezone(&Root::open(root).unwrap(), bad)
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("`{bad}`")), "{e}");
        }
    }

    #[test]
    fn authorized_keys_belong_to_the_user() {
        if !is_root() {
            return;
        }
        let dir = fake_root();
        let root = dir.path();
        std::fs::create_dir_all(root.join("home/alice")).unwrap();
        let user = User {
            name: "alice".into(),
            groups: vec![],
            shell: "/bin/bash".into(),
            password_hash: None,
            ssh_authorized_keys: vec!["ssh-ed25519 AAAA a@h".into(), "ssh-rsa BBBB b@h".into()],
        };
        install_authorized_keys(&Root::open(root).unwrap(), &user).unwrap();
        let ssh = root.join("home/alice/.ssh");
        let m = ssh.symlink_metadata().unwrap();
        assert!(m.is_dir());
        assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o700, 1234, 1235));
        let keys = ssh.join("authorized_keys");
        assert_eq!(
            std::fs::read_to_string(&keys).unwrap(),
            "ssh-ed25519 AAAA a@h\nssh-rsa BBBB b@h\n"
        );
        let m = keys.metadata().unwrap();
        assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o600, 1234, 1235));
    }

    #[test]
    fn services_need_systemctl() {
        let dir = fake_root();
        set_services(&Root::open(dir.path()).unwrap(), &Services::default()).unwrap();
        let s = Services {
            enable: vec!["ssh".into()],
            disable: vec![],
        };
        let e = set_services(&Root::open(dir.path()).unwrap(), &s)
            .unwrap_err()
            .to_string();
        assert!(e.contains("add systemd"), "{e}");
    }
}
