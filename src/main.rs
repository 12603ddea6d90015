//! The `debimg` command line: parses arguments and calls the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use debimg::build::{BuildOptions, DEFAULT_BUILD_DIR, DEFAULT_CACHE_DIR, OUTPUT_LOCK, build};
use debimg::cache::Cache;
use debimg::output::OutputDir;
use debimg::pack::compress;
use debimg::plan::{Plan, read_host_sources};
use debimg::release;
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
        /// ID, build.log, SHA256SUMS and MD5SUMS. Always builds.
        #[arg(long, value_name = "ID", value_parser = parse_release_id)]
        release: Option<String>,
        /// Pack all outputs into one archive, `<name>.bundle.tar.gz`.
        #[arg(long, value_enum, value_name = "FORMAT")]
        pack: Option<PackFormat>,
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

/// Archive formats for `--pack`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum PackFormat {
    /// A gzipped tar archive.
    #[value(name = "tar.gz")]
    TarGz,
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
                eprintln!("error: {}", debimg::redact::text(&spec_err.to_string()));
                return EXIT_INVALID;
            }
            eprintln!("error: {}", debimg::redact::text(&format!("{err:#}")));
            match signals::interrupted() {
                None => 1,
                Some(sig) => 128 + sig as u8,
            }
        }
    }
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

fn plan_spec(mut spec: Spec, source: &Path, bootstrap: Option<Bootstrap>) -> Result<Plan> {
    if let Some(b) = bootstrap {
        spec.bootstrap = b;
    }
    let sources = read_host_sources(Path::new("/")).context("reading the host's apt sources")?;
    Plan::new(&spec, &sources, debimg::plan::host_has("mmdebstrap"))
        .with_context(|| format!("planning {}", source.display()))
}

/// What `debimg build` reads: a spec file (its text with @BUILD_ID@ replaced for a release) or
/// a fuel-agent input.
struct Input {
    spec: Spec,
    /// The text to copy into a release.
    text: String,
    /// File name of that copy.
    copy_name: String,
    fuel: Option<debimg::fuel::FuelBuild>,
    path: PathBuf,
}

fn read_input(spec: Option<&Path>, fuel: Option<&Path>, release: Option<&str>) -> Result<Input> {
    if let Some(fuel) = fuel {
        let text = debimg::fuel::read_input(fuel)?;
        let build = debimg::fuel::spec_from_fuel(&text, &fuel.display().to_string())?;
        return Ok(Input {
            copy_name: format!("{}.fuel.json", build.spec.name),
            spec: build.spec.clone(),
            text,
            fuel: Some(build),
            path: fuel.to_path_buf(),
        });
    }
    let path = spec.context("no spec given")?;
    let raw = Spec::read_text(path)?;
    let text = match release {
        Some(id) => release::substitute_build_id(&raw, id),
        None => raw,
    };
    let spec = match Spec::from_yaml_at(&text, path) {
        Ok(s) => s,
        Err(mut e) => {
            if release.is_none() && text.contains(release::BUILD_ID_PLACEHOLDER) {
                e.problems.push(debimg::spec::Problem {
                    field: String::new(),
                    message: format!(
                        "the spec uses {}: give the ID with --release ID",
                        release::BUILD_ID_PLACEHOLDER
                    ),
                });
            }
            return Err(e.into());
        }
    };
    Ok(Input {
        copy_name: format!("{}.spec.yaml", spec.name),
        spec,
        text,
        fuel: None,
        path: path.to_path_buf(),
    })
}

fn run(cli: &Cli) -> Result<()> {
    match &cli.command {
        Command::Validate { spec, release } => {
            let s = read_input(Some(spec), None, release.as_deref())?.spec;
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
        Command::BootTest {
            image,
            uefi,
            timeout,
            expect,
            memory,
            accel,
        } => {
            signals::install()?;
            let expect = if expect.is_empty() {
                vec!["login:".to_string()]
            } else {
                expect.clone()
            };
            let booted = debimg::boottest::run(&debimg::boottest::BootTest {
                image: image.clone(),
                uefi: *uefi,
                timeout: std::time::Duration::from_secs(*timeout),
                expect,
                memory_mib: *memory,
                accel: *accel,
            })?;
            tracing::info!(
                "{} booted ({}, {}) in {:.1}s",
                image.display(),
                if *uefi { "UEFI" } else { "BIOS" },
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
        Command::Plan { spec, release } => {
            let input = read_input(Some(spec), None, release.as_deref())?;
            let plan = plan_spec(input.spec, spec, None)?;
            let mut json = serde_json::to_value(&plan)?;
            json["digest"] = serde_json::Value::String(plan.digest.clone());
            println!(
                "{}",
                debimg::redact::text(&serde_json::to_string_pretty(&json)?)
            );
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
            fuel,
            release: release_id,
            pack,
            shell,
            keep_on_failure,
            tmpfs,
        } => {
            let started = Instant::now();
            let input = read_input(spec.as_deref(), fuel.as_deref(), release_id.as_deref())?;
            let plan = plan_spec(input.spec.clone(), &input.path, *bootstrap)?;
            if !nix::unistd::geteuid().is_root() {
                anyhow::bail!(
                    "debimg build needs root (loop devices, mounts, chroot); run it with sudo"
                );
            }
            let base_output = match (output, &input.fuel) {
                (Some(o), _) => o.clone(),
                (None, Some(f)) => f.output_dir.clone(),
                (None, None) => PathBuf::from("out"),
            };
            let release_dir = release_id
                .as_deref()
                .map(|id| release::prepare_dir(&base_output, id))
                .transpose()?;
            let output_dir = match &release_dir {
                Some(dir) => dir.path().to_path_buf(),
                None => base_output,
            };
            let opts = BuildOptions {
                output_dir,
                build_dir: build_dir.clone(),
                force: *force || release_id.is_some(),
                wait: *wait,
                show_progress: !cli.quiet,
                cache_dir: (!no_cache).then(|| cache_dir.clone()),
                shell: *shell,
                keep_on_failure: *keep_on_failure,
                tmpfs: *tmpfs,
            };
            let job = Job {
                input: &input,
                release: release_dir.as_ref(),
                pack: pack.is_some(),
            };
            // Before any thread exists: the build runs in PID and mount namespaces of its own,
            // so no mount reaches the host and nothing of it outlives this process, even when
            // it is killed with SIGKILL.
            let code = debimg::sys::namespace::run_isolated(|| {
                let tee = match job
                    .release
                    .map(|dir| release::LogTee::start(dir, "build.log"))
                {
                    Some(Ok(t)) => Some(t),
                    Some(Err(e)) => return exit_code(Err(e)),
                    None => None,
                };
                let res = signals::install().and_then(|()| run_build(&plan, &opts, &job, started));
                // Printed while the log is still being written, so that it ends with the error.
                let code = exit_code(res);
                if let Some(t) = tee
                    && let Err(e) = t.finish()
                {
                    eprintln!("error: {e:#}");
                    return 1;
                }
                if code == 0
                    && let Some(dir) = job.release
                {
                    return exit_code(release::write_sums(dir).map(|names| {
                        tracing::info!(
                            "release {}: {} files with SHA256SUMS and MD5SUMS",
                            opts.output_dir.display(),
                            names.len()
                        );
                    }));
                }
                code
            })?;
            match code {
                0 => Ok(()),
                c => Err(anyhow::Error::new(ExitWith(c))),
            }
        }
    }
}

/// What the build does besides building.
struct Job<'a> {
    input: &'a Input,
    /// The release directory (`--release`), open.
    release: Option<&'a OutputDir>,
    pack: bool,
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

fn run_build(plan: &Plan, opts: &BuildOptions, job: &Job, started: Instant) -> Result<()> {
    let outcome = build(plan, opts)?;
    let dir = outcome
        .metadata_path
        .parent()
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let mut outputs = outcome.output_paths();
    if let Some(f) = &job.input.fuel {
        // Next to the images, wherever -o put them.
        let mut f = f.clone();
        f.output_dir = dir.clone();
        let path = f.write_metadata(&outcome.metadata)?;
        tracing::info!("fuel-agent metadata: {}", path.display());
        if !outputs.contains(&path) {
            outputs.push(path);
        }
    }
    if job.pack {
        let names: Vec<String> = outputs
            .iter()
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        let out = match job.release {
            Some(d) => d.try_clone()?,
            None => OutputDir::open(&dir)?,
        };
        let archive = release::pack_outputs(&out, &names, &format!("{}.bundle.tar.gz", plan.name))?;
        tracing::info!("packed {} outputs into {}", names.len(), archive.display());
        outputs = vec![archive];
    }
    if let Some(release_dir) = job.release {
        // The copy ships with the release: credentials in its URLs are masked.
        let copy = debimg::redact::text(&job.input.text);
        release_dir.write_file(&job.input.copy_name, copy.as_bytes(), 0o644)?;
        outputs.push(release_dir.join(&job.input.copy_name));
        // A release is one-off: no later build takes this directory's lock.
        if let Err(e) = release_dir.remove(OUTPUT_LOCK) {
            tracing::warn!("{e:#}");
        }
    }
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
    for p in outputs {
        println!("{}", p.display());
    }
    Ok(())
}
