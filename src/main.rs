//! The `debimg` command line: parses arguments and calls the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use debimg::build::{BuildOptions, build};
use debimg::cache::Cache;
use debimg::pack::compress;
use debimg::plan::{Plan, read_host_sources};
use debimg::signals;
use debimg::spec::{Bootstrap, Container, Spec, SpecError};

/// Build Debian-family OS images from a YAML spec.
#[derive(Parser)]
#[command(version, about, long_about = None)]
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
    },
    /// Build the images a spec describes (reusing them when the output already matches).
    Build {
        /// The YAML spec.
        spec: PathBuf,
        /// Directory that receives the images and the metadata file.
        #[arg(short, long, default_value = "out")]
        output: PathBuf,
        /// Directory under which the temporary workspace is created.
        #[arg(long, default_value = "/var/tmp")]
        build_dir: PathBuf,
        /// Rebuild even when the output directory already matches the spec.
        #[arg(long)]
        force: bool,
        /// Wait for another build writing to the same output directory instead of failing.
        #[arg(long)]
        wait: bool,
        /// Package and base-tree caches shared by builds.
        #[arg(long, default_value = "/var/cache/debimg")]
        cache_dir: PathBuf,
        /// Build without the caches (download everything, run the bootstrap).
        #[arg(long)]
        no_cache: bool,
        /// Bootstrap backend, overriding the spec's `bootstrap` (auto: mmdebstrap when present).
        #[arg(long, value_enum)]
        bootstrap: Option<Bootstrap>,
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
        #[arg(long, default_value = "/var/cache/debimg", global = true)]
        cache_dir: PathBuf,
        #[command(subcommand)]
        action: CacheAction,
    },
    /// Print the resolved build plan (mirrors, mount order, output names, digest) as JSON.
    Plan {
        /// The YAML spec.
        spec: PathBuf,
    },
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

/// Exit code for an invalid spec or bad usage.
const EXIT_INVALID: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose, cli.quiet);
    ExitCode::from(exit_code(run(&cli)))
}

/// 0 on success, 2 for an invalid spec, 128+N after signal N, 1 for any other failure.
fn exit_code(result: Result<()>) -> u8 {
    match result {
        Ok(()) => 0,
        Err(err) => {
            if let Some(ExitWith(code)) = err.downcast_ref::<ExitWith>() {
                return *code;
            }
            if let Some(spec_err) = err.downcast_ref::<SpecError>() {
                eprintln!("error: {spec_err}");
                return EXIT_INVALID;
            }
            eprintln!("error: {err:#}");
            match signals::interrupted() {
                None => 1,
                Some(sig) => 128 + sig as u8,
            }
        }
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
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .init();
}

fn load_plan(spec_path: &Path, bootstrap: Option<Bootstrap>) -> Result<Plan> {
    let mut spec = Spec::from_file(spec_path)?;
    if let Some(b) = bootstrap {
        spec.bootstrap = b;
    }
    let sources = read_host_sources(Path::new("/")).context("reading the host's apt sources")?;
    Plan::new(&spec, &sources, debimg::plan::host_has("mmdebstrap"))
        .with_context(|| format!("planning {}", spec_path.display()))
}

fn run(cli: &Cli) -> Result<()> {
    match &cli.command {
        Command::Validate { spec } => {
            let s = Spec::from_file(spec)?;
            println!(
                "{}: valid ({} image{}, {} package{})",
                spec.display(),
                s.images.len(),
                if s.images.len() == 1 { "" } else { "s" },
                s.packages.len(),
                if s.packages.len() == 1 { "" } else { "s" },
            );
            Ok(())
        }
        Command::Pack {
            image,
            output,
            container,
        } => {
            let t = Instant::now();
            let p = compress::pack(image, *container, output)
                .with_context(|| format!("packaging {}", image.display()))?;
            tracing::info!(
                "{} MiB in {:.2}s ({:.0} MB/s)",
                p.raw.size >> 20,
                t.elapsed().as_secs_f64(),
                p.raw.size as f64 / 1e6 / t.elapsed().as_secs_f64().max(1e-9)
            );
            println!(
                "raw_size: {}\nraw_md5: {}\nraw_sha256: {}\ncontainer_size: {}\ncontainer_md5: {}\ncontainer_sha256: {}",
                p.raw.size,
                p.raw.md5,
                p.raw.sha256,
                p.container.size,
                p.container.md5,
                p.container.sha256
            );
            Ok(())
        }
        Command::Cache { cache_dir, action } => {
            let cache = Cache::open(cache_dir)?;
            match action {
                CacheAction::List => {
                    let entries = cache.entries()?;
                    let total: u64 = entries.iter().map(|e| e.size).sum();
                    for e in &entries {
                        println!(
                            "{:>10} KiB  {:>6}h  {}",
                            e.size >> 10,
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
        Command::Plan { spec } => {
            let plan = load_plan(spec, None)?;
            let mut json = serde_json::to_value(&plan)?;
            json["digest"] = serde_json::Value::String(plan.digest.clone());
            println!("{}", serde_json::to_string_pretty(&json)?);
            Ok(())
        }
        Command::Build {
            spec,
            output,
            build_dir,
            force,
            wait,
            cache_dir,
            no_cache,
            bootstrap,
        } => {
            let started = Instant::now();
            let plan = load_plan(spec, *bootstrap)?;
            if !nix::unistd::geteuid().is_root() {
                anyhow::bail!(
                    "debimg build needs root (loop devices, mounts, chroot); run it with sudo"
                );
            }
            let opts = BuildOptions {
                output_dir: output.clone(),
                build_dir: build_dir.clone(),
                force: *force,
                wait: *wait,
                show_progress: !cli.quiet,
                cache_dir: (!no_cache).then(|| cache_dir.clone()),
            };
            // Before any thread exists: the build runs in PID and mount namespaces of its own,
            // so no mount reaches the host and nothing of it outlives this process, even when
            // it is killed with SIGKILL.
            let code = debimg::sys::namespace::run_isolated(|| {
                let res = signals::install().and_then(|()| run_build(&plan, &opts, started));
                exit_code(res)
            })?;
            match code {
                0 => Ok(()),
                c => Err(anyhow::Error::new(ExitWith(c))),
            }
        }
    }
}

/// This process's peak resident set (VmHWM), in KiB: the build process's own memory, not the
/// programs it runs.
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The build process already reported its error; the supervisor only passes its code on.
#[derive(Debug)]
struct ExitWith(u8);

impl std::fmt::Display for ExitWith {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit code {}", self.0)
    }
}

impl std::error::Error for ExitWith {}

fn run_build(plan: &Plan, opts: &BuildOptions, started: Instant) -> Result<()> {
    let outcome = build(plan, opts)?;
    if outcome.reused {
        tracing::info!(
            "reused: {} matches the spec (digest {}); nothing to build (--force rebuilds)",
            outcome.metadata_path.display(),
            &plan.digest[..12]
        );
    } else {
        tracing::info!(
            "built {} image(s) in {:.1}s; peak memory of debimg itself {} MiB",
            outcome.metadata.images.len(),
            started.elapsed().as_secs_f64(),
            peak_rss_kib().unwrap_or(0) >> 10
        );
    }
    for p in outcome.image_paths() {
        println!("{}", p.display());
    }
    println!("{}", outcome.metadata_path.display());
    Ok(())
}
