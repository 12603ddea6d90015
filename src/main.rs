//! The `debimg` command line: parses its arguments and calls the library.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};

use debimg::cache::Cache;
use debimg::creator::{BuildOptions, DEFAULT_BUILD_DIR, DEFAULT_CACHE_DIR};
use debimg::error::{Error, ErrorKind};
use debimg::event::{self, BuildOutcome, Event};
use debimg::job::{Input, Job};
use debimg::output::release;
use debimg::pack::compress;
use debimg::signals;
use debimg::spec::{Bootstrap, Container};

/// Build Debian-family OS images from a YAML spec.
///
/// `build` needs root (loop devices, mounts, chroot). The spec format is in docs/spec.md,
/// examples in data/examples/.
#[derive(Parser)]
#[command(version, about, long_about = None, after_help = exit_codes_help())]
struct Cli {
    /// More output (-v: debug details such as every command run).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Less output: warnings and errors only (for build: no output of the bootstrap and apt).
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check a spec: exit 0 when it is valid, exit 2 naming its problems (YAML and type errors
    /// one at a time with line and column; then every remaining problem with its field).
    Validate {
        /// The YAML spec.
        spec: PathBuf,
        /// Check it as `build --release ID` reads it (@BUILD_ID@ replaced by ID).
        #[arg(long, value_name = "ID", value_parser = parse_release_id)]
        release: Option<String>,
    },
    /// Build the images a spec describes (reusing them when the output already matches).
    Build {
        /// The YAML spec (or give --fuel instead).
        #[arg(required_unless_present = "fuel")]
        spec: Option<PathBuf>,
        /// Directory that receives the images and the metadata file [default: out, or the
        /// `output` of a --fuel input].
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Directory under which the temporary workspace is created.
        #[arg(long, default_value = DEFAULT_BUILD_DIR)]
        build_dir: PathBuf,
        /// Rebuild even when the output directory already matches the spec.
        #[arg(long)]
        force: bool,
        /// Wait for another build writing to the same output directory instead of failing.
        #[arg(long)]
        wait: bool,
        /// Package and base-tree caches shared by builds.
        #[arg(long, default_value = DEFAULT_CACHE_DIR)]
        cache_dir: PathBuf,
        /// Build without the caches (download everything, run the bootstrap).
        #[arg(long)]
        no_cache: bool,
        /// Bootstrap backend, overriding the spec's `bootstrap` (auto: mmdebstrap when present).
        #[arg(long, value_enum)]
        bootstrap: Option<Bootstrap>,
        /// Read fuel-agent's `nailgun_build_image` input (JSON) instead of a spec, and write
        /// the images and metadata fuel-agent would have.
        #[arg(long, value_name = "INPUT.json", conflicts_with = "spec")]
        fuel: Option<PathBuf>,
        /// Write a release into OUTPUT/ID: the outputs, the spec with @BUILD_ID@ replaced by
        /// ID, build.log, SHA256SUMS and MD5SUMS. Always builds; an ID whose earlier build
        /// failed is emptied and built again, a complete one is refused.
        #[arg(long, value_name = "ID", value_parser = parse_release_id)]
        release: Option<String>,
        /// Bundle all outputs into one archive, `<name>.bundle.tar.gz` (`--pack` is the old
        /// spelling).
        #[arg(long, alias = "pack", value_enum, value_name = "FORMAT")]
        bundle: Option<BundleFormat>,
        /// How results are reported on stdout: `human` (the paths of the outputs) or `json`
        /// (one JSON object per line: build-started, stage-started/-finished, artifact,
        /// build-finished; see docs/events.md).
        #[arg(long, value_enum, default_value = "human")]
        message_format: MessageFormat,
        /// Open an interactive shell inside the chroot just before unmounting (debugging).
        #[arg(long)]
        shell: bool,
        /// After a failure keep the workspace (unmounted) for inspection, and say where.
        #[arg(long)]
        keep_on_failure: bool,
        /// Build in a tmpfs of this size (e.g. 6GiB) instead of on the build directory's
        /// disk; the images must fit in it (sparse files count what they hold).
        #[arg(long, value_name = "SIZE", value_parser = parse_size, conflicts_with = "keep_on_failure")]
        tmpfs: Option<u64>,
    },
    /// Package one image file the way a build does: raw and container md5/sha256, and a
    /// parallel gzip (or a sparse raw copy) written to OUTPUT. Prints the digests as YAML.
    Pack {
        /// The raw image file.
        image: PathBuf,
        /// Where the container goes (must not exist).
        #[arg(short, long)]
        output: PathBuf,
        /// gzip (default) or raw.
        #[arg(long, value_enum, default_value = "gzip")]
        container: Container,
    },
    /// Inspect or trim the caches: pooled packages, base trees, apt lists.
    Cache {
        /// The cache directory.
        #[arg(long, default_value = DEFAULT_CACHE_DIR, global = true)]
        cache_dir: PathBuf,
        #[command(subcommand)]
        action: CacheAction,
    },
    /// Boot a disk image in qemu on a serial console and wait until the system is up: exit 0
    /// with the console line that proves it, or exit 1 with the whole console log.
    BootTest {
        /// The disk image: raw (`.img`), qcow2 (`.qcow2`) or gzipped raw (`.img.gz`).
        image: PathBuf,
        /// Boot with UEFI firmware (OVMF) instead of BIOS.
        #[arg(long)]
        uefi: bool,
        /// Seconds to wait for the system to come up.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        /// Console text that proves the boot (repeatable) [default: `login:`].
        #[arg(long, value_name = "TEXT")]
        expect: Vec<String>,
        /// Memory of the virtual machine in MiB.
        #[arg(long, default_value_t = 1024)]
        memory: u32,
        /// auto: KVM when /dev/kvm works (falling back to software emulation when the machine
        /// stays silent for 10 s); kvm; tcg (software emulation).
        #[arg(long, value_enum, default_value = "auto")]
        accel: debimg::boottest::Accel,
    },
    /// Print the resolved build plan (mirrors, mount order, output names, digest) as JSON.
    Plan {
        /// The YAML spec.
        spec: PathBuf,
        /// Plan it as `build --release ID` reads it (@BUILD_ID@ replaced by ID).
        #[arg(long, value_name = "ID", value_parser = parse_release_id)]
        release: Option<String>,
    },
}

/// Archive formats for `--bundle`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum BundleFormat {
    /// A gzipped tar archive.
    #[value(name = "tar.gz")]
    TarGz,
}

/// What `build` writes on stdout.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum MessageFormat {
    Human,
    Json,
}

/// The exit codes, for `--help`.
fn exit_codes_help() -> String {
    let mut s = String::from("Exit codes:\n  0      success\n");
    for (kind, code, what) in ErrorKind::TABLE {
        s.push_str(&format!("  {code:<6} {what} ({kind})\n"));
    }
    s
}

/// Checks a release ID (a bad one is a usage error, exit 2).
fn parse_release_id(text: &str) -> Result<String, String> {
    release::check_release_id(text)
        .map(|()| text.to_string())
        .map_err(|e| e.to_string())
}

/// Parses a size such as `6GiB` for `--tmpfs`.
fn parse_size(text: &str) -> Result<u64, String> {
    let size = debimg::spec::Size::parse(text)?;
    if size.0 < 64 << 20 {
        return Err(format!(
            "`{text}` is too small for a build (at least 64MiB)"
        ));
    }
    Ok(size.0)
}

#[derive(Subcommand)]
enum CacheAction {
    /// List cached packages and base trees with their size and age.
    List,
    /// Remove cache entries not used for longer than --older-than (default: remove all).
    Prune {
        /// Age such as 30d, 12h, 45m or 90s.
        #[arg(long, value_parser = parse_age)]
        older_than: Option<u64>,
    },
}

/// Parses `30d`, `12h`, `45m`, `90s` into seconds. A bare number is refused: `--older-than 30`
/// meaning 30 seconds would empty the cache of someone who meant days.
fn parse_age(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let unitless = || format!("`{text}` needs a unit: 30d, 12h, 45m or 90s");
    let (num, mult) = match t.chars().last() {
        Some('d') => (&t[..t.len() - 1], 86_400),
        Some('h') => (&t[..t.len() - 1], 3_600),
        Some('m') => (&t[..t.len() - 1], 60),
        Some('s') => (&t[..t.len() - 1], 1),
        _ => return Err(unitless()),
    };
    num.parse::<u64>()
        .map(|n| n * mult)
        .map_err(|_| format!("`{text}` is not an age such as 30d, 12h, 45m or 90s"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose, cli.quiet);
    ExitCode::from(match run(&cli) {
        Ok(()) => 0,
        Err(e) => {
            if !e.is_reported() {
                eprintln!("error: {}", debimg::redact::text(&e.to_string()));
            }
            e.exit_code()
        }
    })
}

/// stderr for log lines, URL credentials masked (each event comes as one write).
struct RedactedStderr;

impl std::io::Write for RedactedStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        std::io::stderr().write_all(debimg::redact::text(&text).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

fn init_logging(verbose: u8, quiet: bool) {
    let level = match (quiet, verbose) {
        (true, _) => "warn",
        (false, 0) => "info",
        (false, _) => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("DEBIMG_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("debimg={level}")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| RedactedStderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .init();
}

/// An error of a command that is not a build (those run on the library's own errors).
fn failed(e: anyhow::Error) -> Error {
    Error::classify(e, None)
}

fn run(cli: &Cli) -> Result<(), Error> {
    match &cli.command {
        Command::Validate { spec, release } => validate(spec, release.as_deref()),
        Command::Pack {
            image,
            output,
            container,
        } => pack(image, output, *container).map_err(failed),
        Command::Cache { cache_dir, action } => cache(cache_dir, action).map_err(failed),
        Command::BootTest {
            image,
            uefi,
            timeout,
            expect,
            memory,
            accel,
        } => boot_test(image, *uefi, *timeout, expect, *memory, *accel).map_err(failed),
        Command::Plan { spec, release } => {
            let input = Input::read(Some(spec), None, release.as_deref())?;
            let plan = input.plan(None)?;
            let mut json = serde_json::to_value(&plan).map_err(|e| failed(e.into()))?;
            json["digest"] = serde_json::Value::String(plan.digest.clone());
            let text = serde_json::to_string_pretty(&json).map_err(|e| failed(e.into()))?;
            println!("{}", debimg::redact::text(&text));
            Ok(())
        }
        Command::Build { .. } => build(cli),
    }
}

fn validate(spec: &std::path::Path, release: Option<&str>) -> Result<(), Error> {
    let s = Input::read(Some(spec), None, release)?.spec;
    let what = match s.kind {
        debimg::spec::Kind::FsImages => format!(
            "{} image{}",
            s.images.len(),
            if s.images.len() == 1 { "" } else { "s" }
        ),
        debimg::spec::Kind::Tarball => "a tarball".to_string(),
        debimg::spec::Kind::Disk => format!(
            "a disk with {} partitions",
            s.disk.as_ref().map_or(0, |d| d.partitions.len())
        ),
    };
    println!(
        "{}: valid ({what}, {} package{})",
        spec.display(),
        s.packages.len(),
        if s.packages.len() == 1 { "" } else { "s" },
    );
    Ok(())
}

fn pack(
    image: &std::path::Path,
    output: &std::path::Path,
    container: Container,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let t = Instant::now();
    let p = compress::pack(image, container, output)
        .with_context(|| format!("packaging {}", image.display()))?;
    tracing::info!(
        "{} MiB in {:.2}s ({:.0} MB/s)",
        p.raw.size >> 20,
        t.elapsed().as_secs_f64(),
        p.raw.size as f64 / 1e6 / t.elapsed().as_secs_f64().max(1e-9)
    );
    println!(
        "raw_size: {}\nraw_md5: {}\nraw_sha256: {}\ncontainer_size: {}\ncontainer_md5: {}\ncontainer_sha256: {}",
        p.raw.size, p.raw.md5, p.raw.sha256, p.container.size, p.container.md5, p.container.sha256
    );
    Ok(())
}

fn cache(cache_dir: &std::path::Path, action: &CacheAction) -> anyhow::Result<()> {
    let cache = Cache::open(cache_dir)?;
    match action {
        CacheAction::List => {
            let entries = cache.entries()?;
            let total: u64 = entries.iter().map(|e| e.size).sum();
            println!("{:>10}  {:>7}  ENTRY", "SIZE", "UNUSED");
            for e in &entries {
                println!(
                    "{:>6} MiB  {:>6}h  {}",
                    e.size >> 20,
                    e.age_secs / 3600,
                    e.path.display()
                );
            }
            println!("{} entries, {} MiB", entries.len(), total >> 20);
        }
        CacheAction::Prune { older_than } => {
            let (n, bytes) = cache.prune(older_than.unwrap_or(0))?;
            println!("removed {n} entries, {} MiB", bytes >> 20);
        }
    }
    Ok(())
}

fn boot_test(
    image: &std::path::Path,
    uefi: bool,
    timeout: u64,
    expect: &[String],
    memory: u32,
    accel: debimg::boottest::Accel,
) -> anyhow::Result<()> {
    signals::install()?;
    let expect = if expect.is_empty() {
        vec!["login:".to_string()]
    } else {
        expect.to_vec()
    };
    let booted = debimg::boottest::run(&debimg::boottest::BootTest {
        image: image.to_path_buf(),
        uefi,
        timeout: std::time::Duration::from_secs(timeout),
        expect,
        memory_mib: memory,
        accel,
    })?;
    tracing::info!(
        "{} booted ({}, {}) in {:.1}s",
        image.display(),
        if uefi { "UEFI" } else { "BIOS" },
        if booted.kvm {
            "KVM"
        } else {
            "software emulation"
        },
        booted.elapsed.as_secs_f64()
    );
    println!("{}", booted.line);
    Ok(())
}

fn build(cli: &Cli) -> Result<(), Error> {
    let Command::Build {
        spec,
        output,
        build_dir,
        force,
        wait,
        cache_dir,
        no_cache,
        bootstrap,
        fuel,
        release,
        bundle,
        message_format,
        shell,
        keep_on_failure,
        tmpfs,
    } = &cli.command
    else {
        unreachable!("build() runs the build command")
    };
    let json = *message_format == MessageFormat::Json;
    if json {
        event::json_lines_to_stdout();
    }
    let job = (|| {
        let input = Input::read(spec.as_deref(), fuel.as_deref(), release.as_deref())?;
        let plan = input.plan(*bootstrap)?;
        if !nix::unistd::geteuid().is_root() {
            return Err(failed(anyhow::anyhow!(
                "debimg build needs root (loop devices, mounts, chroot); run it with sudo"
            )));
        }
        let output_dir = match (output, &input.fuel) {
            (Some(o), _) => o.clone(),
            (None, Some(f)) => f.output_dir.clone(),
            (None, None) => PathBuf::from("out"),
        };
        let opts = BuildOptions {
            output_dir,
            build_dir: build_dir.clone(),
            force: *force,
            wait: *wait,
            show_progress: !cli.quiet,
            cache_dir: (!no_cache).then(|| cache_dir.clone()),
            shell: *shell,
            keep_on_failure: *keep_on_failure,
            tmpfs: *tmpfs,
        };
        Ok(Job {
            input,
            plan,
            opts,
            release: release.clone(),
            bundle: bundle.is_some(),
        })
    })();
    let job = match job {
        Ok(j) => j,
        Err(e) => {
            // A consumer of the events learns of a build that never started too.
            event::emit(&Event::BuildFinished {
                outcome: BuildOutcome::Failed,
                seconds: 0.0,
                error: Some(e.report()),
            });
            return Err(e);
        }
    };
    // Before any thread exists: the build runs in PID and mount namespaces of its own, so no
    // mount reaches the host and nothing of it outlives this process, even killed with SIGKILL.
    let code = debimg::isolated(|| {
        let outcome = job.run()?;
        if !json {
            let mut out = std::io::stdout().lock();
            for p in &outcome.outputs {
                let _ = writeln!(out, "{}", p.display());
            }
        }
        Ok(())
    })?;
    match code {
        0 => Ok(()),
        c => Err(Error::exited(c)),
    }
}
