use super::Fs;

/// The mkfs programs debimg runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    /// mke2fs, as `mkfs.ext2`, `mkfs.ext3` or `mkfs.ext4`.
    Ext(Fs),
    Xfs,
    Btrfs,
    /// `mkfs.vfat`, for an `esp` partition.
    Vfat,
}

impl Tool {
    /// The program that makes `fs`.
    pub fn for_fs(fs: Fs) -> Tool {
        match fs {
            Fs::Ext2 | Fs::Ext3 | Fs::Ext4 => Tool::Ext(fs),
            Fs::Xfs => Tool::Xfs,
            Fs::Btrfs => Tool::Btrfs,
        }
    }

    /// The program's name.
    pub fn program(self) -> String {
        match self {
            Tool::Ext(fs) => format!("mkfs.{fs}"),
            Tool::Xfs => "mkfs.xfs".into(),
            Tool::Btrfs => "mkfs.btrfs".into(),
            Tool::Vfat => "mkfs.vfat".into(),
        }
    }

    fn table(self) -> &'static Table {
        match self {
            Tool::Ext(_) => &EXT,
            Tool::Xfs => &XFS,
            Tool::Btrfs => &BTRFS,
            Tool::Vfat => &VFAT,
        }
    }

    /// Every option the allowlist lets through, for docs and messages.
    pub fn allowed(self) -> Vec<&'static str> {
        self.table()
            .allowed
            .iter()
            .flat_map(|o| o.names.iter().copied())
            .collect()
    }
}

/// The shape of a value.
#[derive(Debug, Clone, Copy)]
enum Pat {
    /// Decimal digits.
    Int,
    /// Decimal digits, or `0x` and hex digits (mkfs.fat reads C numbers).
    CInt,
    /// A decimal number, a fraction allowed (`0.5`).
    Dec,
    /// Decimal digits and at most one unit letter (`4096`, `16k`, `64m`, `1g`).
    Size,
    /// One of these words.
    OneOf(&'static [&'static str]),
    /// `uid:gid` in numbers.
    UidGid,
    /// One name the program knows (an encoding, a creator OS): lowercase letters, digits,
    /// `.`, `_`, `-`.
    Word,
    /// [`Pat::Word`]s separated by `,` (usage types) or `:` (quota types).
    Words(char),
}

const BIT: Pat = Pat::OneOf(&["0", "1"]);

impl Pat {
    fn matches(self, v: &str) -> bool {
        let digits = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_digit());
        let word = |s: &str| {
            !s.is_empty()
                && s.len() <= 32
                && s.starts_with(|c: char| c.is_ascii_alphanumeric())
                && s.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
        };
        match self {
            Pat::Int => digits(v) && v.len() <= 20,
            Pat::CInt => match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
                Some(h) => {
                    !h.is_empty() && h.len() <= 16 && h.chars().all(|c| c.is_ascii_hexdigit())
                }
                None => digits(v) && v.len() <= 20,
            },
            Pat::Dec => {
                v.len() <= 20
                    && match v.split_once('.') {
                        Some((a, b)) => digits(a) && digits(b),
                        None => digits(v),
                    }
            }
            Pat::Size => {
                let num = v.trim_end_matches(|c: char| c.is_ascii_alphabetic());
                digits(num) && num.len() <= 20 && v.len() - num.len() <= 1
            }
            Pat::OneOf(words) => words.contains(&v),
            Pat::UidGid => v
                .split_once(':')
                .is_some_and(|(u, g)| digits(u) && digits(g) && u.len() <= 10 && g.len() <= 10),
            Pat::Word => word(v),
            Pat::Words(sep) => v.len() <= 128 && v.split(sep).all(word),
        }
    }

    fn describe(self) -> String {
        match self {
            Pat::Int => "a whole number".into(),
            Pat::CInt => "a whole number (decimal, or hex with 0x)".into(),
            Pat::Dec => "a number such as `1` or `0.5`".into(),
            Pat::Size => "a number with an optional unit letter (`4096`, `16k`, `64m`)".into(),
            Pat::OneOf(words) => format!("one of {}", words.join(", ")),
            Pat::UidGid => "`uid:gid` in numbers".into(),
            Pat::Word => "a name of lowercase letters, digits, `.`, `_`, `-`".into(),
            Pat::Words(sep) => {
                format!("names of lowercase letters, digits, `.`, `_`, `-`, separated by `{sep}`")
            }
        }
    }
}

/// What an option takes.
#[derive(Debug)]
enum Arg {
    /// Nothing.
    Flag,
    /// One value.
    Value(Pat),
    /// `key` or `key=value` items separated by commas (`-E stride=8,lazy_itable_init=0`,
    /// `-m crc=1,finobt=1`).
    Subopts(&'static [Sub]),
    /// Feature names separated by commas, `^` turning one off (`^has_journal,metadata_csum`);
    /// the listed names are refused, with the reason.
    Features(&'static [(&'static str, &'static str)]),
}

/// One suboption of an [`Arg::Subopts`].
#[derive(Debug)]
struct Sub {
    key: &'static str,
    value: SubValue,
}

#[derive(Debug)]
enum SubValue {
    /// `key` alone.
    None,
    /// `key` or `key=value`.
    Optional(Pat),
    /// `key=value`.
    Required(Pat),
    /// Refused, for this reason.
    Refused(&'static str),
}

const fn sub(key: &'static str, value: SubValue) -> Sub {
    Sub { key, value }
}

/// An allowed option under its names (`-n`, `--nodesize`).
#[derive(Debug)]
struct Opt {
    names: &'static [&'static str],
    arg: Arg,
}

/// Options refused with a reason.
#[derive(Debug)]
struct Refused {
    names: &'static [&'static str],
    why: &'static str,
}

#[derive(Debug)]
struct Table {
    allowed: &'static [Opt],
    refused: &'static [Refused],
}

const fn opt(names: &'static [&'static str], arg: Arg) -> Opt {
    Opt { names, arg }
}

const fn refused(names: &'static [&'static str], why: &'static str) -> Refused {
    Refused { names, why }
}

const DEBIMG_LABEL: &str = "debimg sets the label itself (from `label`)";
const DEBIMG_UUID: &str = "debimg sets the UUID itself";
const DEBIMG_FLAGS: &str = "debimg sets it itself";
const NO_FS: &str = "it makes no filesystem";

/// mke2fs (mkfs.ext2, mkfs.ext3, mkfs.ext4).
static EXT: Table = Table {
    allowed: &[
        opt(
            &["-b"],
            Arg::Value(Pat::OneOf(&[
                "1024", "2048", "4096", "8192", "16384", "32768", "65536",
            ])),
        ),
        opt(&["-C"], Arg::Value(Pat::Size)),
        opt(&["-D"], Arg::Flag),
        opt(
            &["-e"],
            Arg::Value(Pat::OneOf(&["continue", "remount-ro", "panic"])),
        ),
        opt(
            &["-E"],
            Arg::Subopts(&[
                sub("stride", SubValue::Required(Pat::Int)),
                sub("stripe_width", SubValue::Required(Pat::Int)),
                sub("stripe-width", SubValue::Required(Pat::Int)),
                sub("resize", SubValue::Required(Pat::Int)),
                sub("lazy_itable_init", SubValue::Optional(BIT)),
                sub("lazy_journal_init", SubValue::Optional(BIT)),
                sub("assume_storage_prezeroed", SubValue::Optional(BIT)),
                sub("packed_meta_blocks", SubValue::Optional(BIT)),
                sub(
                    "num_backup_sb",
                    SubValue::Required(Pat::OneOf(&["0", "1", "2"])),
                ),
                sub("root_owner", SubValue::Optional(Pat::UidGid)),
                sub("encoding", SubValue::Required(Pat::Word)),
                sub("encoding_flags", SubValue::Required(Pat::Word)),
                sub("mmp_update_interval", SubValue::Required(Pat::Int)),
                sub("orphan_file_size", SubValue::Required(Pat::Size)),
                sub("quotatype", SubValue::Required(Pat::Words(':'))),
                sub("nodiscard", SubValue::None),
                sub("discard", SubValue::None),
                sub("test_fs", SubValue::None),
                sub(
                    "offset",
                    SubValue::Refused(
                        "it moves the filesystem inside its device, which then does not mount",
                    ),
                ),
                sub(
                    "android_sparse",
                    SubValue::Refused("it writes an Android sparse file instead of a filesystem"),
                ),
                sub(
                    "no_copy_xattrs",
                    SubValue::Refused("it only matters with `-d`, which is refused"),
                ),
            ]),
        ),
        opt(&["-g"], Arg::Value(Pat::Int)),
        opt(&["-G"], Arg::Value(Pat::Int)),
        opt(&["-i"], Arg::Value(Pat::Int)),
        opt(&["-I"], Arg::Value(Pat::Int)),
        opt(&["-j"], Arg::Flag),
        opt(
            &["-J"],
            Arg::Subopts(&[
                sub("size", SubValue::Required(Pat::Int)),
                sub("fast_commit_size", SubValue::Required(Pat::Int)),
                sub("location", SubValue::Required(Pat::Size)),
                sub(
                    "device",
                    SubValue::Refused("it puts the journal on another device of the host"),
                ),
            ]),
        ),
        opt(&["-m"], Arg::Value(Pat::Dec)),
        opt(&["-N"], Arg::Value(Pat::Int)),
        opt(&["-o"], Arg::Value(Pat::Word)),
        opt(
            &["-O"],
            Arg::Features(&[(
                "journal_dev",
                "it makes an external journal device instead of a filesystem",
            )]),
        ),
        opt(&["-r"], Arg::Value(BIT)),
        opt(&["-T"], Arg::Value(Pat::Words(','))),
    ],
    refused: &[
        refused(&["-d"], "it copies a host directory into the filesystem"),
        refused(&["-l"], "it reads a bad-block list from a host file"),
        refused(&["-z"], "it writes an undo file on the host"),
        refused(
            &["-c"],
            "it scans the device for bad blocks (an image file has none)",
        ),
        refused(
            &["-n"],
            "it only shows what mke2fs would do: it makes no filesystem",
        ),
        refused(
            &["-S"],
            "it rewrites the superblocks of an existing filesystem",
        ),
        refused(&["-V"], NO_FS),
        refused(&["-t"], "the type comes from `fs`"),
        refused(&["-M"], "its value is a path"),
        refused(&["-R"], "it is the old name of `-E`: use `-E`"),
        refused(&["-L"], DEBIMG_LABEL),
        refused(&["-U"], DEBIMG_UUID),
        refused(&["-F", "-q"], DEBIMG_FLAGS),
    ],
};

/// mkfs.xfs.
static XFS: Table = Table {
    allowed: &[
        opt(
            &["-b"],
            Arg::Subopts(&[sub("size", SubValue::Required(Pat::Size))]),
        ),
        opt(
            &["-m"],
            Arg::Subopts(&[
                sub("bigtime", SubValue::Optional(BIT)),
                sub("crc", SubValue::Optional(BIT)),
                sub("finobt", SubValue::Optional(BIT)),
                sub("inobtcount", SubValue::Optional(BIT)),
                sub("rmapbt", SubValue::Optional(BIT)),
                sub("reflink", SubValue::Optional(BIT)),
                sub("uuid", SubValue::Refused(DEBIMG_UUID)),
            ]),
        ),
        opt(
            &["-d"],
            Arg::Subopts(&[
                sub("agcount", SubValue::Required(Pat::Int)),
                sub("agsize", SubValue::Required(Pat::Size)),
                sub("cowextsize", SubValue::Required(Pat::Size)),
                sub("size", SubValue::Required(Pat::Size)),
                sub("sunit", SubValue::Required(Pat::Int)),
                sub("su", SubValue::Required(Pat::Size)),
                sub("swidth", SubValue::Required(Pat::Int)),
                sub("sw", SubValue::Required(Pat::Int)),
                sub("noalign", SubValue::None),
                sub("rtinherit", SubValue::Optional(BIT)),
                sub("projinherit", SubValue::Required(Pat::Int)),
                sub("extszinherit", SubValue::Required(Pat::Size)),
                sub("daxinherit", SubValue::Optional(BIT)),
                sub(
                    "name",
                    SubValue::Refused("it names another device or file of the host"),
                ),
                sub(
                    "file",
                    SubValue::Refused("it makes the filesystem in a host file named by `name`"),
                ),
            ]),
        ),
        opt(
            &["-i"],
            Arg::Subopts(&[
                sub("size", SubValue::Required(Pat::Int)),
                sub("perblock", SubValue::Required(Pat::Int)),
                sub("maxpct", SubValue::Required(Pat::Int)),
                sub("align", SubValue::Optional(BIT)),
                sub("attr", SubValue::Required(Pat::OneOf(&["1", "2"]))),
                sub("projid32bit", SubValue::Optional(BIT)),
                sub("sparse", SubValue::Optional(BIT)),
                sub("nrext64", SubValue::Optional(BIT)),
            ]),
        ),
        opt(
            &["-l"],
            Arg::Subopts(&[
                sub("agnum", SubValue::Required(Pat::Int)),
                sub("internal", SubValue::Optional(BIT)),
                sub("size", SubValue::Required(Pat::Size)),
                sub("version", SubValue::Required(Pat::OneOf(&["1", "2"]))),
                sub("sunit", SubValue::Required(Pat::Int)),
                sub("su", SubValue::Required(Pat::Size)),
                sub("lazy-count", SubValue::Required(BIT)),
                sub(
                    "logdev",
                    SubValue::Refused("it puts the log on another device of the host"),
                ),
            ]),
        ),
        opt(
            &["-n"],
            Arg::Subopts(&[
                sub("size", SubValue::Required(Pat::Size)),
                sub("version", SubValue::Required(Pat::OneOf(&["2", "ci"]))),
                sub("ftype", SubValue::Required(BIT)),
            ]),
        ),
        opt(
            &["-s"],
            Arg::Subopts(&[sub("size", SubValue::Required(Pat::Size))]),
        ),
    ],
    refused: &[
        refused(
            &["-p"],
            "it reads a protofile from the host, and the files it names",
        ),
        refused(&["-c"], "it reads a configuration file from the host"),
        refused(
            &["-r"],
            "a realtime section needs another device of the host",
        ),
        refused(
            &["-N"],
            "it only shows what mkfs.xfs would do: it makes no filesystem",
        ),
        refused(&["-V"], NO_FS),
        refused(&["-L"], DEBIMG_LABEL),
        refused(&["-f", "-q", "-K"], DEBIMG_FLAGS),
    ],
};

/// mkfs.btrfs.
static BTRFS: Table = Table {
    allowed: &[
        opt(&["-b", "--byte-count"], Arg::Value(Pat::Size)),
        opt(
            &["--csum", "--checksum"],
            Arg::Value(Pat::OneOf(&["crc32c", "xxhash", "sha256", "blake2"])),
        ),
        opt(
            &["-d", "--data"],
            Arg::Value(Pat::OneOf(&["single", "dup"])),
        ),
        opt(
            &["-m", "--metadata"],
            Arg::Value(Pat::OneOf(&["single", "dup"])),
        ),
        opt(&["-M", "--mixed"], Arg::Flag),
        opt(&["-n", "--nodesize"], Arg::Value(Pat::Size)),
        opt(&["-s", "--sectorsize"], Arg::Value(Pat::Size)),
        opt(
            &["-O", "--features"],
            Arg::Features(&[("list-all", "it lists the features and makes no filesystem")]),
        ),
        opt(
            &["-R", "--runtime-features"],
            Arg::Features(&[("list-all", "it lists the features and makes no filesystem")]),
        ),
    ],
    refused: &[
        refused(
            &["-r", "--rootdir"],
            "it copies a host directory into the filesystem",
        ),
        refused(
            &["--shrink"],
            "it only works with `--rootdir`, which is refused",
        ),
        refused(&["-L", "--label"], DEBIMG_LABEL),
        refused(&["-U", "--uuid"], DEBIMG_UUID),
        refused(
            &["-f", "--force", "-q", "--quiet", "-K", "--nodiscard"],
            DEBIMG_FLAGS,
        ),
        refused(&["-V", "--version", "--help"], NO_FS),
    ],
};

/// mkfs.vfat (the `esp`).
static VFAT: Table = Table {
    allowed: &[
        opt(&["-a"], Arg::Flag),
        opt(&["-b"], Arg::Value(Pat::CInt)),
        opt(&["-D"], Arg::Value(Pat::CInt)),
        opt(&["-f"], Arg::Value(Pat::OneOf(&["1", "2"]))),
        opt(&["-F"], Arg::Value(Pat::OneOf(&["12", "16", "32"]))),
        opt(&["-h"], Arg::Value(Pat::CInt)),
        opt(&["-M"], Arg::Value(Pat::CInt)),
        opt(&["-r"], Arg::Value(Pat::CInt)),
        opt(&["-R"], Arg::Value(Pat::CInt)),
        opt(
            &["-s"],
            Arg::Value(Pat::OneOf(&["1", "2", "4", "8", "16", "32", "64", "128"])),
        ),
        opt(
            &["-S"],
            Arg::Value(Pat::OneOf(&[
                "512", "1024", "2048", "4096", "8192", "16384", "32768",
            ])),
        ),
        opt(&["--codepage"], Arg::Value(Pat::Int)),
    ],
    refused: &[
        refused(&["-C"], "it creates a file on the host"),
        refused(&["-l"], "it reads a bad-block list from a host file"),
        refused(
            &["-m"],
            "it reads a boot message from a host file or standard input",
        ),
        refused(
            &["-c"],
            "it scans the device for bad blocks (an image file has none)",
        ),
        refused(&["-I"], "it turns off mkfs.fat's safety checks"),
        refused(
            &["-A", "--variant"],
            "an Atari filesystem is no EFI system partition",
        ),
        refused(
            &["--offset"],
            "it moves the filesystem inside the partition, which then does not mount",
        ),
        refused(&["-n"], DEBIMG_LABEL),
        refused(&["-i", "--invariant"], "debimg sets the volume ID itself"),
        refused(&["--help"], NO_FS),
    ],
};

/// A problem with one item of a `mkfs_options` list: its index and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionProblem {
    pub index: usize,
    pub message: String,
}

/// Checks a `mkfs_options` list against `tool`'s allowlist; the first problem, if any.
pub fn check(tool: Tool, options: &[String]) -> Result<(), OptionProblem> {
    let table = tool.table();
    let program = tool.program();
    let fail = |index: usize, message: String| Err(OptionProblem { index, message });
    let mut i = 0;
    while i < options.len() {
        let item = options[i].as_str();
        let shown = super::shown(item);
        if item.is_empty() {
            return fail(i, "is empty".into());
        }
        if item.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return fail(
                i,
                format!(
                    "`{shown}` holds whitespace: give the option and its value as two items (`[-b, \"4096\"]`)"
                ),
            );
        }
        if item == "--" {
            return fail(
                i,
                "`--` ends the options: what follows would be positional arguments, which are refused".into(),
            );
        }
        if !item.starts_with('-') || item == "-" {
            return fail(
                i,
                format!(
                    "`{shown}` is no option: {program} gets no positional arguments (debimg passes the device itself)"
                ),
            );
        }
        let (name, joined) = match item.strip_prefix("--") {
            Some(long) => match long.split_once('=') {
                Some((n, v)) => (&item[..n.len() + 2], Some(v)),
                None => (item, None),
            },
            None => {
                let cut = item.char_indices().nth(2).map_or(item.len(), |(k, _)| k);
                let (n, rest) = item.split_at(cut);
                (n, (!rest.is_empty()).then_some(rest))
            }
        };
        if let Some(r) = table.refused.iter().find(|r| r.names.contains(&name)) {
            return fail(
                i,
                format!(
                    "`{name}` is refused: {} (the options allowed for {} are listed under \
                     `mkfs_options` in docs/spec.md)",
                    r.why,
                    tool.program()
                ),
            );
        }
        let Some(o) = table.allowed.iter().find(|o| o.names.contains(&name)) else {
            return fail(
                i,
                format!(
                    "`{}` is not an option debimg passes to {program}; allowed: {} (see docs/spec.md)",
                    super::shown(name),
                    tool.allowed().join(", ")
                ),
            );
        };
        let (value, at) = match (&o.arg, joined) {
            (Arg::Flag, None) => {
                i += 1;
                continue;
            }
            (Arg::Flag, Some(_)) => {
                return fail(
                    i,
                    format!("`{name}` takes no value: give one option per item (`{shown}`)"),
                );
            }
            (_, Some(v)) => (v, i),
            (_, None) => match options.get(i + 1) {
                Some(v) => (v.as_str(), i + 1),
                None => {
                    return fail(i, format!("`{name}` needs a value (the next item)"));
                }
            },
        };
        check_value(name, &o.arg, value).map_err(|message| OptionProblem { index: at, message })?;
        i = at + 1;
    }
    Ok(())
}

fn check_value(name: &str, arg: &Arg, value: &str) -> Result<(), String> {
    let shown = super::shown(value);
    if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "`{shown}` (the value of `{name}`) holds whitespace: one value per item"
        ));
    }
    if value.contains('/') {
        return Err(format!(
            "`{shown}` (the value of `{name}`) holds `/`: no value may name a path"
        ));
    }
    if value.starts_with('-') {
        return Err(format!(
            "`{shown}` (the value of `{name}`) starts with `-`: give `{name}` its value"
        ));
    }
    let bad = |what: String| format!("`{shown}` is not a value of `{name}`: {what}");
    match arg {
        Arg::Flag => Ok(()),
        Arg::Value(pat) => {
            if pat.matches(value) {
                Ok(())
            } else {
                Err(bad(format!("it takes {}", pat.describe())))
            }
        }
        Arg::Subopts(subs) => {
            for item in value.split(',') {
                let (key, v) = match item.split_once('=') {
                    Some((k, v)) => (k, Some(v)),
                    None => (item, None),
                };
                let keys = || {
                    subs.iter()
                        .filter(|s| !matches!(s.value, SubValue::Refused(_)))
                        .map(|s| s.key)
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let Some(s) = subs.iter().find(|s| s.key == key) else {
                    return Err(bad(format!(
                        "`{}` is not among the allowed suboptions ({})",
                        super::shown(key),
                        keys()
                    )));
                };
                match (&s.value, v) {
                    (SubValue::Refused(why), _) => {
                        return Err(format!("`{name} {key}` is refused: {why}"));
                    }
                    (SubValue::None, None) | (SubValue::Optional(_), None) => {}
                    (SubValue::None, Some(_)) => {
                        return Err(bad(format!("`{key}` takes no value")));
                    }
                    (SubValue::Required(_), None) => {
                        return Err(bad(format!("`{key}` needs a value: `{key}=VALUE`")));
                    }
                    (SubValue::Optional(p) | SubValue::Required(p), Some(v)) => {
                        if !p.matches(v) {
                            return Err(bad(format!("`{key}` takes {}", p.describe())));
                        }
                    }
                }
            }
            Ok(())
        }
        Arg::Features(refused) => {
            for item in value.split(',') {
                let feature = item.strip_prefix('^').unwrap_or(item);
                if let Some((_, why)) = refused.iter().find(|(f, _)| *f == feature) {
                    return Err(format!("`{name} {feature}` is refused: {why}"));
                }
                if !Pat::Word.matches(feature) {
                    return Err(bad(format!(
                        "it takes feature names separated by commas, each {} and `^` before one to turn it off",
                        Pat::Word.describe()
                    )));
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    fn problem(tool: Tool, items: &[&str]) -> OptionProblem {
        check(tool, &opts(items)).expect_err(&format!("{items:?} was accepted"))
    }

    const EXT4: Tool = Tool::Ext(Fs::Ext4);

    const TOOLS: [Tool; 4] = [EXT4, Tool::Xfs, Tool::Btrfs, Tool::Vfat];

    #[test]
    fn no_option_is_both_allowed_and_refused() {
        for tool in TOOLS {
            let t = tool.table();
            let refused: Vec<&str> = t
                .refused
                .iter()
                .flat_map(|r| r.names.iter().copied())
                .collect();
            let mut seen = std::collections::BTreeSet::new();
            for name in tool.allowed().into_iter().chain(refused.iter().copied()) {
                assert!(seen.insert(name), "{tool:?}: `{name}` listed twice");
                assert!(name.starts_with('-') && !name.contains('='), "{name}");
            }
        }
    }

    #[test]
    fn docs_list_every_option_and_suboption() {
        let doc = include_str!("../../docs/spec.md");
        for (tool, row) in [
            (EXT4, "| mke2fs"),
            (Tool::Xfs, "| mkfs.xfs"),
            (Tool::Btrfs, "| mkfs.btrfs"),
            (Tool::Vfat, "| mkfs.vfat"),
        ] {
            let line = doc
                .lines()
                .find(|l| l.starts_with(row))
                .unwrap_or_else(|| panic!("docs/spec.md has no row `{row}`"));
            let t = tool.table();
            let names = t
                .allowed
                .iter()
                .flat_map(|o| o.names.iter())
                .chain(t.refused.iter().flat_map(|r| r.names.iter()));
            for name in names {
                assert!(
                    line.contains(&format!("`{name}`")) || line.contains(&format!("`{name} ")),
                    "docs/spec.md's {row} row lacks `{name}`"
                );
            }
            for o in t.allowed {
                let subs: &[Sub] = match &o.arg {
                    Arg::Subopts(subs) => subs,
                    _ => &[],
                };
                for s in subs {
                    let k = s.key;
                    assert!(
                        [format!("`{k}"), format!(" {k}="), format!(" {k}`")]
                            .iter()
                            .any(|p| line.contains(p.as_str())),
                        "docs/spec.md's {row} row lacks the suboption `{k}`"
                    );
                }
            }
        }
    }

    #[test]
    fn useful_tuning_passes() {
        let good: &[(Tool, &[&str])] = &[
            (
                EXT4,
                &["-b", "4096", "-i", "16384", "-I", "256", "-m", "0.5"],
            ),
            (
                EXT4,
                &[
                    "-O",
                    "^has_journal,metadata_csum",
                    "-E",
                    "stride=8,lazy_itable_init=0,root_owner=0:0",
                ],
            ),
            (
                EXT4,
                &[
                    "-b4096",
                    "-m0",
                    "-T",
                    "largefile,news",
                    "-J",
                    "size=64",
                    "-j",
                    "-e",
                    "remount-ro",
                ],
            ),
            (
                Tool::Ext(Fs::Ext2),
                &[
                    "-N",
                    "100000",
                    "-r",
                    "1",
                    "-o",
                    "linux",
                    "-E",
                    "nodiscard,quotatype=usrquota:grpquota",
                ],
            ),
            (
                Tool::Xfs,
                &[
                    "-m",
                    "crc=1,finobt=1",
                    "-m",
                    "reflink=0",
                    "-d",
                    "agcount=4",
                    "-i",
                    "size=512",
                ],
            ),
            (
                Tool::Xfs,
                &[
                    "-b",
                    "size=4096",
                    "-l",
                    "size=64m,lazy-count=1",
                    "-n",
                    "ftype=1",
                    "-s",
                    "size=4096",
                ],
            ),
            (
                Tool::Btrfs,
                &[
                    "-n",
                    "16k",
                    "--nodesize=32k",
                    "--csum",
                    "xxhash",
                    "-O",
                    "no-holes,^extref",
                ],
            ),
            (
                Tool::Btrfs,
                &[
                    "-m",
                    "dup",
                    "--data=single",
                    "-M",
                    "-R",
                    "quota,free-space-tree",
                    "-s",
                    "4096",
                ],
            ),
            (
                Tool::Vfat,
                &[
                    "-F", "16", "-s", "8", "-S", "4096", "-R", "32", "-f", "2", "-D", "0x80", "-a",
                ],
            ),
        ];
        for (tool, items) in good {
            assert_eq!(check(*tool, &opts(items)), Ok(()), "{tool:?} {items:?}");
        }
    }

    #[test]
    fn host_paths_and_devices_are_refused() {
        let p = problem(EXT4, &["-d", "/root"]);
        assert_eq!(p.index, 0);
        assert!(
            p.message.contains("copies a host directory"),
            "{}",
            p.message
        );
        let p = problem(Tool::Btrfs, &["/dev/sda"]);
        assert!(
            p.message.contains("no positional arguments"),
            "{}",
            p.message
        );
        assert!(
            problem(Tool::Btrfs, &["--rootdir", "/"])
                .message
                .contains("host directory")
        );
        assert!(
            problem(Tool::Btrfs, &["--rootdir=/etc"])
                .message
                .contains("host directory")
        );
        assert!(
            problem(Tool::Btrfs, &["-r", "x"])
                .message
                .contains("host directory")
        );
        assert!(
            problem(Tool::Xfs, &["-p", "proto"])
                .message
                .contains("protofile")
        );
        assert!(
            problem(Tool::Xfs, &["-c", "options=x"])
                .message
                .contains("configuration file")
        );
        assert!(
            problem(Tool::Xfs, &["-l", "logdev=sdb"])
                .message
                .contains("another device")
        );
        assert!(
            problem(Tool::Xfs, &["-d", "name=sdb"])
                .message
                .contains("another device")
        );
        assert!(
            problem(Tool::Xfs, &["-r", "rtdev=sdb"])
                .message
                .contains("another device")
        );
        assert!(
            problem(EXT4, &["-J", "device=sdb"])
                .message
                .contains("another device")
        );
        assert!(
            problem(EXT4, &["-l", "badblocks"])
                .message
                .contains("host file")
        );
        assert!(problem(EXT4, &["-z", "undo"]).message.contains("undo file"));
        assert!(
            problem(Tool::Vfat, &["-m", "-"])
                .message
                .contains("host file")
        );
        assert!(
            problem(Tool::Vfat, &["-C"])
                .message
                .contains("creates a file")
        );
        // A value never holds `/`, even where the option is allowed.
        let p = problem(EXT4, &["-b", "4096", "-T", "a/b"]);
        assert_eq!(p.index, 3);
        assert!(p.message.contains("holds `/`"), "{}", p.message);
        // A second device after a flag is positional.
        let p = problem(Tool::Btrfs, &["-M", "/dev/sdb"]);
        assert_eq!(p.index, 1);
    }

    #[test]
    fn what_debimg_sets_is_refused_saying_so() {
        for (tool, item) in [
            (EXT4, "-L"),
            (EXT4, "-U"),
            (EXT4, "-F"),
            (Tool::Xfs, "-L"),
            (Tool::Xfs, "-f"),
            (Tool::Btrfs, "--uuid"),
            (Tool::Btrfs, "-K"),
            (Tool::Vfat, "-n"),
            (Tool::Vfat, "-i"),
        ] {
            let p = problem(tool, &[item, "x"]);
            assert!(
                p.message.contains("debimg sets"),
                "{tool:?} {item}: {}",
                p.message
            );
        }
        let p = problem(Tool::Xfs, &["-m", "crc=1,uuid=0"]);
        assert!(p.message.contains("debimg sets the UUID"), "{}", p.message);
    }

    #[test]
    fn options_that_make_no_filesystem_are_refused() {
        for (tool, items) in [
            (EXT4, &["-n"][..]),
            (EXT4, &["-V"]),
            (EXT4, &["-O", "journal_dev"]),
            (Tool::Xfs, &["-N"]),
            (Tool::Btrfs, &["-O", "list-all"]),
            (Tool::Btrfs, &["--version"]),
        ] {
            problem(tool, items);
        }
    }

    #[test]
    fn values_are_checked_and_never_swallow_the_device() {
        // Without a value, mkfs would take debimg's device as the value.
        let p = problem(EXT4, &["-b"]);
        assert!(p.message.contains("needs a value"), "{}", p.message);
        // A value that starts with `-` is another option.
        let p = problem(EXT4, &["-m", "-d"]);
        assert_eq!(p.index, 1);
        assert!(p.message.contains("starts with `-`"), "{}", p.message);
        assert!(
            problem(EXT4, &["-b", "4097"])
                .message
                .contains("one of 1024")
        );
        assert!(
            problem(EXT4, &["-E", "offset=4096"])
                .message
                .contains("does not mount")
        );
        assert!(
            problem(EXT4, &["-E", "stride"])
                .message
                .contains("stride=VALUE")
        );
        assert!(
            problem(EXT4, &["-E", "nodiscard=1"])
                .message
                .contains("takes no value")
        );
        assert!(
            problem(EXT4, &["-E", "bogus=1"])
                .message
                .contains("allowed suboptions")
        );
        assert!(
            problem(Tool::Btrfs, &["-d", "raid1"])
                .message
                .contains("single, dup")
        );
        assert!(
            problem(Tool::Btrfs, &["-n", "16kk"])
                .message
                .contains("unit letter")
        );
        assert!(
            problem(EXT4, &["-O", "Has Journal"])
                .message
                .contains("whitespace")
        );
        assert!(problem(EXT4, &["-j4"]).message.contains("takes no value"));
        assert!(
            problem(EXT4, &["-jD"])
                .message
                .contains("one option per item")
        );
        assert!(problem(EXT4, &["--"]).message.contains("positional"));
        assert!(problem(EXT4, &[""]).message.contains("empty"));
        assert!(problem(EXT4, &["-b 4096"]).message.contains("two items"));
        let p = problem(Tool::Xfs, &["-x"]);
        assert!(p.message.contains("allowed: -b, -m, -d"), "{}", p.message);
        // A prefix getopt would complete (`--root` → `--rootdir`) is no listed name.
        assert!(
            problem(Tool::Btrfs, &["--root", "x"])
                .message
                .contains("not an option")
        );
    }
}
