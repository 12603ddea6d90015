//! Validation of a parsed spec: every problem at once, each with its field path and what is
//! allowed. Pure: nothing here reads the host.

use std::collections::BTreeSet;

use super::*;

impl Spec {
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
            if r.is_flat() {
                if !is_flat_dir(&r.suite) {
                    p.add(
                        format!("{f}.suite"),
                        format!(
                            "`{}` is not a flat repository's directory (`./`, or names of letters, digits, `.`, `_`, `-` separated by `/`, ending in `/`; no `..`)",
                            shown(&r.suite)
                        ),
                    );
                } else if i == 0 {
                    p.add(
                        format!("{f}.suite"),
                        "the first repo is the one the base system is bootstrapped from: it needs a suite with `dists/`, not a flat repository".to_string(),
                    );
                }
                if let Some(s) = &r.section {
                    p.add(
                        format!("{f}.section"),
                        format!(
                            "`{}`: a flat repository (suite `{}`) has no components; remove `section`",
                            shown(s),
                            r.suite
                        ),
                    );
                }
            } else if !is_debian_token(&r.suite) {
                p.add(
                    format!("{f}.suite"),
                    format!(
                        "`{}` is not a suite name (letters, digits, `.`, `_`, `-`), nor a flat repository's directory ending in `/`",
                        shown(&r.suite)
                    ),
                );
            }
            if let Some(section) = &r.section
                && !r.is_flat()
                && (section.split(' ').all(str::is_empty)
                    || !section
                        .split(' ')
                        .filter(|c| !c.is_empty())
                        .all(is_debian_token))
            {
                p.add(
                    format!("{f}.section"),
                    format!(
                        "`{}` must be one or more component names (letters, digits, `.`, `_`, `-`) separated by spaces",
                        shown(section)
                    ),
                );
            }
            if let Some(key) = &r.key {
                if r.trusted {
                    p.add(
                        format!("{f}.key"),
                        "a repo with a key is checked against it: remove `trusted: true` (or the key)",
                    );
                }
                if crate::openpgp::is_armored(key) {
                    if let Err(e) = crate::openpgp::keyring(key.as_bytes()) {
                        p.add(format!("{f}.key"), format!("the inline key: {e}"));
                    }
                } else if key.is_empty() || key.contains('\n') || key.contains('\0') {
                    p.add(
                        format!("{f}.key"),
                        "is neither a file name nor an ASCII-armored public key block (`-----BEGIN PGP PUBLIC KEY BLOCK-----`)",
                    );
                }
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
        let mut seen = BTreeSet::new();
        for (i, a) in self.attachments.iter().enumerate() {
            let f = format!("attachments[{i}]");
            let key = match a {
                Attachment::Path(path) => match check_image_path(path) {
                    Ok(normal) => normal,
                    Err(msg) => {
                        p.add(f, msg);
                        continue;
                    }
                },
                Attachment::Package { package } => {
                    if !is_package_name(package) {
                        check_package(p, &format!("{f}.package"), package);
                        continue;
                    }
                    format!("package {package}")
                }
            };
            if !seen.insert(key) {
                p.add(f, "is listed twice");
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

/// A path in the image as `attachments` take it, normalized, or what is wrong with it: an
/// [`image_path`] that is a valid pattern where it is one ([`glob::Pattern`]).
pub fn check_image_path(path: &str) -> Result<String, String> {
    let normal = image_path(path)?;
    for c in normal.split('/').filter(|c| glob::is_pattern(c)) {
        glob::Pattern::parse(c).map_err(|msg| format!("`{}` {msg}", shown(path)))?;
    }
    Ok(normal)
}

/// A path in the image normalized (`//` and `.` components dropped: `/etc//./hostname` is
/// `/etc/hostname`), or what is wrong with it: it must be absolute, name something below `/`,
/// have no `..` component (a path is read as the image resolves it, never climbing out of it;
/// `..` would only blur what is meant) and no control character, and keep each component
/// within [`NAME_MAX`] bytes and the whole within 4095. No pattern is looked at: this is also
/// how a name from dpkg's lists is checked, which means itself.
pub fn image_path(path: &str) -> Result<String, String> {
    if !path.starts_with('/') {
        return Err(format!(
            "`{}` must be an absolute path in the image, such as `/etc/os-release`",
            shown(path)
        ));
    }
    if path.chars().any(char::is_control) {
        return Err(format!("`{}` holds a control character", shown(path)));
    }
    let mut normal = String::new();
    for c in path.split('/') {
        match c {
            "" | "." => continue,
            ".." => {
                return Err(format!(
                    "`{}` has a `..` component: name the file by its path without it",
                    shown(path)
                ));
            }
            _ if c.len() > NAME_MAX => {
                return Err(format!(
                    "`{}` has a component longer than {NAME_MAX} bytes",
                    shown(path)
                ));
            }
            _ => {}
        }
        normal.push('/');
        normal.push_str(c);
    }
    if normal.is_empty() {
        return Err("`/` is the image's root directory: name files in it, such as `/etc/os-release` or `/boot/config-*`".to_string());
    }
    if normal.len() > 4095 {
        return Err(format!("`{}` is longer than 4095 bytes", shown(path)));
    }
    Ok(normal)
}

/// Longest file name Linux filesystems store (`NAME_MAX`), in bytes.
pub const NAME_MAX: usize = 255;

/// What a temporary name adds to the final name it is renamed to: `.<final>.tmp-<32 hex>`
/// (build's publish, release's archive). Validation counts it, so that a build never fails on a
/// name it made itself.
pub const TEMP_NAME_EXTRA: usize = ".".len() + ".tmp-".len() + 32;

/// The suffixes of every file a build names after the spec `name` (`<name><suffix>`): tarball,
/// disk formats ([`DiskFormat::file_name`]), metadata, records ([`Record::extension`]), the
/// lock and SBOMs, kernel and initrd, the attachments directory, and the `--pack` bundle and release copies of the
/// input (named in main.rs). Plan's tests check that its names stay within this list.
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
    ".attachments",
    ".bundle.tar.gz",
    ".spec.yaml",
    ".fuel.json",
    ".lock.yaml",
    ".spdx.json",
    ".cdx.json",
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
pub(super) fn too_long_note(s: &str) -> String {
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
pub(super) struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            field: field.into(),
            message: message.into(),
        });
    }
}

/// Checks `<field>.mkfs_options` against the allowlist of `tool`.
pub(super) fn check_mkfs_options(
    p: &mut Problems,
    field: &str,
    tool: mkfs_options::Tool,
    options: &[String],
) {
    if let Err(e) = mkfs_options::check(tool, options) {
        p.add(format!("{field}.mkfs_options[{}]", e.index), e.message);
    }
}

pub(super) fn check_mount_point(m: &str) -> Result<(), String> {
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
pub(super) const MAX_URI_LEN: usize = 2048;

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
    } else {
        // The path is bound into the image as written, while apt decodes `%xx` and would
        // resolve `..`: the two must read the same directory.
        if let Some(c) = path.chars().find(|c| matches!(c, '%' | '?')) {
            return Err(format!(
                "holds `{c}`: give a file:/// path as it is on the host, without escapes or a query"
            ));
        }
        if path.split('/').any(|c| c == "." || c == "..") {
            return Err("holds a `.` or `..` component: give the directory's own path".into());
        }
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
pub(super) fn check_host_port(hostport: &str) -> Result<(), String> {
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

pub(super) fn check_uri_field(p: &mut Problems, field: &str, value: &str, kind: UriUse) {
    if let Err(why) = check_uri(value, kind) {
        p.add(
            field,
            format!("`{}` {why}: {}", shown(value), uri_rule(kind)),
        );
    }
}

pub(super) fn check_package(p: &mut Problems, field: &str, name: &str) {
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

pub(super) fn is_debian_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && !s.starts_with(['-', '.'])
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

impl Spec {
    /// What a spec from someone the build host does not trust may not ask for: anything that
    /// reads the host's files or runs code on the host outside the chroot (`post` with
    /// `chroot: false`, `files[].source`, `local_debs`, `file://` repositories, key files; a
    /// repository's key comes inline). A build service refuses such a spec before it is
    /// queued. Empty when the spec asks for none of it.
    pub fn untrusted_problems(&self) -> Vec<Problem> {
        let mut p = Problems::default();
        let host_fs = "reads the build host's files, which a spec from an untrusted source may not";
        for (i, s) in self.post.iter().enumerate() {
            if !s.chroot {
                p.add(
                    format!("post[{i}].chroot"),
                    "`false` runs the script on the build host, which a spec from an untrusted source may not: run it in the chroot",
                );
            }
        }
        for (i, f) in self.files.iter().enumerate() {
            if f.source.is_some() {
                p.add(
                    format!("files[{i}].source"),
                    format!("{host_fs}: give the file's `content` inline"),
                );
            }
        }
        for i in 0..self.local_debs.len() {
            p.add(
                format!("local_debs[{i}]"),
                format!("{host_fs}: serve the package from a repository"),
            );
        }
        if self.mirror.starts_with("file:") {
            p.add("mirror", format!("a `file://` mirror {host_fs}"));
        }
        if self.lock.is_some() {
            p.add("lock", format!("a lock file {host_fs}"));
        }
        for (i, r) in self.repos.iter().enumerate() {
            if r.uri.as_deref().is_some_and(|u| u.starts_with("file:")) {
                p.add(
                    format!("repos[{i}].uri"),
                    format!("a `file://` repository {host_fs}"),
                );
            }
            if r.key.is_some() && !r.key_is_inline() {
                p.add(
                    format!("repos[{i}].key"),
                    format!("a key file {host_fs}: give the armored key inline"),
                );
            }
        }
        p.0
    }
}

/// A flat repository's directory as a sources line takes it: `./`, or `/`-separated names
/// ending in `/` (`pool/`, `./stable/`), never `..`.
pub(super) fn is_flat_dir(s: &str) -> bool {
    let Some(body) = s.strip_suffix('/') else {
        return false;
    };
    s.len() <= 256
        && (body == "."
            || body.split('/').enumerate().all(|(i, c)| {
                (i == 0 && c == ".")
                    || (!c.is_empty()
                        && c != ".."
                        && c.chars()
                            .all(|ch| ch.is_ascii_alphanumeric() || "._-".contains(ch)))
            }))
}

pub(super) fn is_file_name(s: &str) -> bool {
    is_debian_token(s) && s != "." && s != ".." && !s.contains("..")
}

pub(super) fn is_hostname(s: &str) -> bool {
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

pub(super) fn is_partition_type(table: PartitionTable, t: &str) -> bool {
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

pub(super) fn is_exclude_pattern(pat: &str) -> bool {
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

pub(super) fn is_user_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

pub(super) fn is_unit_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && !s.starts_with(['-', '.'])
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || ":-_.@\\".contains(c))
}

pub(super) fn is_locale(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-@".contains(c))
        && s.starts_with(|c: char| c.is_ascii_alphabetic())
}

/// A relative path of plain components (a zone name such as `America/Argentina/Buenos_Aires`).
pub(super) fn is_relative_path(s: &str) -> bool {
    !s.is_empty()
        && s.split('/').all(|c| {
            !c.is_empty()
                && c != "."
                && c != ".."
                && c.chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || "._-+".contains(ch))
        })
}

pub(super) fn is_crypt_hash(s: &str) -> bool {
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
