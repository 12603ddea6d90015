//! The arguments of `debimg`, as clap reads them: every command with its flags, help texts and
//! defaults. Each command's body lives in the module of its subject and takes its arguments from
//! here (`debimg verify`: [`crate::verify::verify`] with a [`VerifyArgs`]); the binary only
//! parses them and dispatches.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::creator::{DEFAULT_BUILD_DIR, DEFAULT_CACHE_DIR};
use crate::error::ErrorKind;
use crate::output::release;
use crate::spec::{Bootstrap, Container};

/// Build Debian-family OS images from a YAML spec.
///
/// `build` needs root (loop devices, mounts, chroot). The spec format is in docs/spec.md,
/// examples in data/examples/.
#[derive(Parser)]
#[command(version, about, long_about = None, after_help = exit_codes_help())]
pub struct Cli {
    /// More output (-v: debug details such as every command run).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Less output: warnings and errors only (for build: no output of the bootstrap and apt).
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Check a spec: exit 0 when it is valid, exit 2 naming its problems (YAML and type errors
    /// one at a time with line and column; then every remaining problem with its field).
    Validate(ValidateArgs),
    /// Build the images a spec describes (reusing them when the output already matches).
    Build(BuildArgs),
    /// Build a spec again from the lock of an earlier build of it (in DIR, with the
    /// source_date_epoch its metadata records) and compare every output with that build's:
    /// exit 0 and "identical", or exit 1 naming each output that differs and, inside each
    /// image, the first files that differ (both mounted read-only and compared), or "no file
    /// differs" where only the filesystem's own bytes do (always so for xfs and btrfs).
    /// Needs root.
    Verify(VerifyArgs),
    /// Resolve a spec's whole package set, the bootstrap's included, and write it as a lock
    /// file: the bootstrap, install and configure stages run in a scratch tree (from the
    /// caches where they can), nothing is packaged. `build --lock FILE` then installs exactly
    /// these versions. Needs root, as build does.
    Lock(LockArgs),
    /// The proxy of a machine that builds an untrusted spec (qemu starts it for each of the
    /// machine's connections): one HTTP connection on stdin and stdout, to the endpoints given.
    #[command(hide = true)]
    VmProxy {
        /// An endpoint the machine may reach, HOST:PORT (again for each).
        #[arg(long)]
        allow: Vec<String>,
    },
    /// Build (or rebuild) the builder appliance that `build --vm` machines boot: a kernel and
    /// the build tools, made by debimg's own pipeline into CACHE_DIR/vm (a `--vm` build makes
    /// it when it is missing or stale).
    VmImage(VmImageArgs),
    /// Package one image file the way a build does: raw and container md5/sha256, and a
    /// parallel gzip (or a sparse raw copy) written to OUTPUT. Prints the digests as YAML.
    Pack(PackArgs),
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
    BootTest(BootTestArgs),
    /// Print the resolved build plan (mirrors, mount order, output names, digest) as JSON.
    Plan(PlanArgs),
    /// Run the build service: a REST API (`/api/v1`, described at `/api/v1/openapi.json`), a
    /// web page at `/`, a job store in the state directory and local workers that build on this
    /// host. `debimg serve token add NAME` makes the tokens callers need. Stop it with INT or
    /// TERM: running builds end and are queued again for the next start.
    #[command(
        args_conflicts_with_subcommands = true,
        subcommand_precedence_over_arg = true
    )]
    Serve {
        #[command(subcommand)]
        action: Option<ServeAction>,
        #[command(flatten)]
        args: ServeArgs,
    },
    /// Submit a spec to a build service; prints the job id (or follows it, or downloads its
    /// artifacts). Exit codes with --follow or --download: those of the build (0 succeeded, its
    /// error's code when it failed, 143 when it was cancelled).
    Submit(SubmitArgs),
    /// Build for a service from RabbitMQ: take build ids from the queue (prefetch 1), claim
    /// each from the server, build it here as root, stream the log and upload the artifacts.
    /// Needs a worker's token (DEBIMG_TOKEN or --token-file). Stop it with INT or TERM (a build in progress ends and is
    /// queued again for another worker).
    Worker(WorkerArgs),
    /// The jobs of a build service: list, show, log, cancel, delete, download.
    Jobs {
        #[command(flatten)]
        server: ServerArgs,
        #[command(subcommand)]
        action: JobsAction,
    },
}

/// The arguments of `debimg validate`.
#[derive(clap::Args)]
pub struct ValidateArgs {
    /// The YAML spec.
    pub spec: PathBuf,
    /// Check it as `build --release ID` reads it (@BUILD_ID@ replaced by ID).
    #[arg(long, value_name = "ID", value_parser = parse_release_id)]
    pub release: Option<String>,
    /// Check it as a spec from someone the build host does not trust: it may not read the
    /// host's files (`files[].source`, `local_debs`, `file://` repos, key files) nor run
    /// code on the host (`post` with `chroot: false`). No file it names is looked at.
    #[arg(long)]
    pub untrusted: bool,
}

/// The arguments of `debimg build`.
#[derive(clap::Args)]
pub struct BuildArgs {
    /// The YAML spec (or give --fuel instead).
    #[arg(required_unless_present = "fuel")]
    pub spec: Option<PathBuf>,
    /// Directory that receives the images and the metadata file [default: out, or the
    /// `output` of a --fuel input].
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Directory under which the temporary workspace is created.
    #[arg(long, default_value = DEFAULT_BUILD_DIR)]
    pub build_dir: PathBuf,
    /// Rebuild even when the output directory already matches the spec.
    #[arg(long)]
    pub force: bool,
    /// Wait for another build writing to the same output directory instead of failing.
    #[arg(long)]
    pub wait: bool,
    /// Package and base-tree caches shared by builds.
    #[arg(long, default_value = DEFAULT_CACHE_DIR)]
    pub cache_dir: PathBuf,
    /// Build without the caches (download everything, run the bootstrap).
    #[arg(long)]
    pub no_cache: bool,
    /// Neither start from nor store installed trees (the tree after apt installed the
    /// packages): apt installs every package on the base tree, as without a cache.
    #[arg(long)]
    pub no_tree_cache: bool,
    /// Bootstrap backend, overriding the spec's `bootstrap` (auto: mmdebstrap when present).
    #[arg(long, value_enum)]
    pub bootstrap: Option<Bootstrap>,
    /// Read fuel-agent's `nailgun_build_image` input (JSON) instead of a spec, and write
    /// the images and metadata fuel-agent would have.
    #[arg(long, value_name = "INPUT.json", conflicts_with = "spec")]
    pub fuel: Option<PathBuf>,
    /// Write a release into OUTPUT/ID: the outputs, the spec with @BUILD_ID@ replaced by
    /// ID, build.log, SHA256SUMS and MD5SUMS. Always builds; an ID whose earlier build
    /// failed is emptied and built again, a complete one is refused.
    #[arg(long, value_name = "ID", value_parser = parse_release_id)]
    pub release: Option<String>,
    /// Bundle all outputs into one archive, `<name>.bundle.tar.gz` (`--pack` is the old
    /// spelling).
    #[arg(long, alias = "pack", value_enum, value_name = "FORMAT")]
    pub bundle: Option<BundleFormat>,
    /// How results are reported on stdout: `human` (the paths of the outputs) or `json`
    /// (one JSON object per line: build-started, stage-started/-finished, artifact,
    /// build-finished; see docs/events.md).
    #[arg(long, value_enum, default_value = "human")]
    pub message_format: MessageFormat,
    /// Open an interactive shell inside the chroot just before unmounting (debugging).
    #[arg(long)]
    pub shell: bool,
    /// After a failure keep the workspace (unmounted) for inspection, and say where.
    #[arg(long)]
    pub keep_on_failure: bool,
    /// Build in a tmpfs of this size (e.g. 6GiB) instead of on the build directory's
    /// disk; the images must fit in it (sparse files count what they hold).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, conflicts_with = "keep_on_failure")]
    pub tmpfs: Option<u64>,
    #[command(flatten)]
    pub vm: VmArgs,
    /// Inside a `--vm` machine: stop after the finish stage and leave the staged images,
    /// records and attachments in the output directory with `handoff.json`, for the host
    /// that started the machine to package and publish.
    #[arg(long, hide = true, conflicts_with_all = ["vm", "release", "bundle", "fuel"])]
    pub hand_off: bool,
    /// Inside a `--vm` machine for an untrusted spec: every download through this proxy
    /// (the host's `vm-proxy`, which reaches only the spec's mirrors and repositories).
    #[arg(long, hide = true, value_name = "URL", requires = "hand_off")]
    pub through_proxy: Option<String>,
    /// Install exactly the package versions of this lock file, the bootstrap's included,
    /// as `lock:` in the spec does (a build writes the lock of what it installed as
    /// NAME.lock.yaml); fails naming each version the repositories no longer have.
    #[arg(long, value_name = "FILE", conflicts_with = "fuel")]
    pub lock: Option<PathBuf>,
}

/// The arguments of `debimg verify`.
#[derive(clap::Args)]
pub struct VerifyArgs {
    /// The YAML spec.
    pub spec: PathBuf,
    /// The output directory of the build to check (its NAME.yaml and NAME.lock.yaml).
    #[arg(long, value_name = "DIR")]
    pub against: PathBuf,
    /// Directory under which the rebuild's workspace and outputs are made.
    #[arg(long, default_value = DEFAULT_BUILD_DIR)]
    pub build_dir: PathBuf,
    /// Package and base-tree caches shared by builds.
    #[arg(long, default_value = DEFAULT_CACHE_DIR)]
    pub cache_dir: PathBuf,
    /// Rebuild without the caches.
    #[arg(long)]
    pub no_cache: bool,
}

/// The arguments of `debimg lock`.
#[derive(clap::Args)]
pub struct LockArgs {
    /// The YAML spec.
    pub spec: PathBuf,
    /// Where the lock goes [default: NAME.lock.yaml].
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Directory under which the temporary workspace is created.
    #[arg(long, default_value = DEFAULT_BUILD_DIR)]
    pub build_dir: PathBuf,
    /// Package and base-tree caches shared by builds.
    #[arg(long, default_value = DEFAULT_CACHE_DIR)]
    pub cache_dir: PathBuf,
    /// Resolve without the caches.
    #[arg(long)]
    pub no_cache: bool,
}

/// The arguments of `debimg vm-image`.
#[derive(clap::Args)]
pub struct VmImageArgs {
    /// The cache directory; the appliance goes into its `vm/`.
    #[arg(long, default_value = DEFAULT_CACHE_DIR)]
    pub cache_dir: PathBuf,
    /// Directory under which the temporary workspace is created.
    #[arg(long, default_value = DEFAULT_BUILD_DIR)]
    pub build_dir: PathBuf,
    /// Rebuild it even when it matches its spec (to take the mirror's newest packages).
    #[arg(long)]
    pub force: bool,
}

/// The arguments of `debimg pack`.
#[derive(clap::Args)]
pub struct PackArgs {
    /// The raw image file.
    pub image: PathBuf,
    /// Where the container goes (must not exist).
    #[arg(short, long)]
    pub output: PathBuf,
    /// gzip (default) or raw.
    #[arg(long, value_enum, default_value = "gzip")]
    pub container: Container,
}

/// The arguments of `debimg boot-test`.
#[derive(clap::Args)]
pub struct BootTestArgs {
    /// The disk image: raw (`.img`), qcow2 (`.qcow2`) or gzipped raw (`.img.gz`).
    pub image: PathBuf,
    /// Boot with UEFI firmware (OVMF) instead of BIOS.
    #[arg(long)]
    pub uefi: bool,
    /// Seconds to wait for the system to come up.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Console text that proves the boot (repeatable) [default: `login:`].
    #[arg(long, value_name = "TEXT")]
    pub expect: Vec<String>,
    /// Memory of the virtual machine in MiB.
    #[arg(long, default_value_t = 1024)]
    pub memory: u32,
    /// auto: KVM when /dev/kvm works (falling back to software emulation when the machine
    /// stays silent for 10 s); kvm; tcg (software emulation).
    #[arg(long, value_enum, default_value = "auto")]
    pub accel: crate::boottest::Accel,
}

/// The arguments of `debimg plan`.
#[derive(clap::Args)]
pub struct PlanArgs {
    /// The YAML spec.
    pub spec: PathBuf,
    /// Plan it as `build --release ID` reads it (@BUILD_ID@ replaced by ID).
    #[arg(long, value_name = "ID", value_parser = parse_release_id)]
    pub release: Option<String>,
}

/// The arguments of `debimg submit`.
#[derive(clap::Args)]
pub struct SubmitArgs {
    /// The YAML spec.
    pub spec: PathBuf,
    #[command(flatten)]
    pub server: ServerArgs,
    /// The job's name [default: the spec's name].
    #[arg(long)]
    pub name: Option<String>,
    /// Whom the job is for (shown with the job; given to --post-creation).
    #[arg(long)]
    pub email: Option<String>,
    /// Stream the build's log until it ends, then exit with its outcome.
    #[arg(short, long)]
    pub follow: bool,
    /// Wait for the build, then download its artifacts into DIR, each checked against its
    /// sha256.
    #[arg(long, value_name = "DIR")]
    pub download: Option<PathBuf>,
}

/// The arguments of `debimg worker`.
#[derive(clap::Args)]
pub struct WorkerArgs {
    /// The service's URL.
    #[arg(long, env = "DEBIMG_SERVER")]
    pub server: String,
    /// A worker's token of that service (`serve token add NAME --role worker`), from the
    /// environment: on the command line `ps` would show it to every local user.
    #[arg(long, env = "DEBIMG_TOKEN", hide_env_values = true, hide = true)]
    pub token: Option<String>,
    /// A file (readable by root alone) whose first line is the worker's token.
    #[arg(long, value_name = "FILE", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
    /// RabbitMQ, as `amqp://USER:PASSWORD@HOST:5672/%2f` (the same as `serve --amqp`),
    /// from the environment (DEBIMG_AMQP) or --amqp-file when it holds a password.
    #[arg(long, env = "DEBIMG_AMQP", hide_env_values = true)]
    pub amqp: Option<String>,
    /// A file (readable by root alone) whose first line is the RabbitMQ URL.
    #[arg(long, value_name = "FILE", conflicts_with = "amqp")]
    pub amqp_file: Option<PathBuf>,
    /// This worker's name, shown as the job's `worker` [default: host name and pid].
    #[arg(long)]
    pub name: Option<String>,
    /// The package and base-tree caches the builds share.
    #[arg(long, default_value = DEFAULT_CACHE_DIR)]
    pub cache_dir: PathBuf,
    /// Where builds make their workspaces.
    #[arg(long, default_value = DEFAULT_BUILD_DIR)]
    pub build_dir: PathBuf,
    /// Which builds run inside a throwaway machine, as `serve --isolation` says.
    #[arg(long, value_enum, default_value = "host")]
    pub isolation: crate::service::Isolation,
    /// Talk plain HTTP to a server that is not on this host (the token and the artifacts
    /// cross the network readable): only on a network you trust.
    #[arg(long)]
    pub allow_plain_http: bool,
}

/// Where the service is and who calls it.
#[derive(clap::Args)]
pub struct ServerArgs {
    /// The service's URL.
    #[arg(
        long,
        env = "DEBIMG_SERVER",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub server: String,
    /// The token (from `debimg serve token add`).
    #[arg(
        long,
        env = "DEBIMG_TOKEN",
        hide_env_values = true,
        global = true,
        default_value = ""
    )]
    pub token: String,
}

/// What `debimg jobs` does.
#[derive(Subcommand)]
pub enum JobsAction {
    /// List the jobs (an admin's token: everyone's), newest first.
    List {
        /// Only jobs in this state.
        #[arg(long, value_parser = ["queued", "running", "succeeded", "failed", "cancelled"])]
        state: Option<String>,
        /// Print the jobs as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one job as JSON.
    Show { id: String },
    /// Print a job's log; with -f follow it until the job ends (exit code as the build's).
    Log {
        id: String,
        #[arg(short, long)]
        follow: bool,
    },
    /// Cancel a job (a running build is ended and cleans up).
    Cancel { id: String },
    /// Delete a job with its files (cancelling it first).
    Delete { id: String },
    /// Download a job's artifacts into DIR, each checked against its sha256.
    Download { id: String, dir: PathBuf },
}

/// The options of `debimg serve`.
#[derive(clap::Args)]
pub struct ServeArgs {
    /// The address to listen on (loopback by default; put TLS in front for anything else).
    #[arg(long, default_value = crate::service::DEFAULT_LISTEN)]
    pub listen: String,
    /// The job store, the build logs and the artifacts.
    #[arg(long, default_value = crate::service::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Builds run at once on this host.
    #[arg(long, default_value_t = 1)]
    pub local_workers: usize,
    /// A shell command run after each job ends, with DEBIMG_JOB_ID, DEBIMG_JOB_STATE,
    /// DEBIMG_JOB_NAME, DEBIMG_JOB_EMAIL, DEBIMG_BUILD_ID and DEBIMG_ARTIFACT_DIR in an
    /// otherwise clean environment (name and email are data: checked at submit, never
    /// expanded); its exit is recorded on the job, its output shown to admins only.
    #[arg(long, value_name = "CMD")]
    pub post_creation: Option<String>,
    /// The largest artifact a worker may upload, e.g. 64GiB (413 beyond).
    #[arg(long, default_value = "64GiB", value_parser = parse_bytes)]
    pub max_upload: u64,
    /// Seconds the post-creation command may run; then it is killed with its process group.
    #[arg(long, default_value_t = 300, value_name = "SECS")]
    pub post_creation_timeout: u64,
    /// The package and base-tree caches the builds share.
    #[arg(long, default_value = DEFAULT_CACHE_DIR)]
    pub cache_dir: PathBuf,
    /// Where builds make their workspaces.
    #[arg(long, default_value = DEFAULT_BUILD_DIR)]
    pub build_dir: PathBuf,
    /// The largest spec accepted (bytes); a larger one is refused with 413.
    #[arg(long, default_value_t = 256 * 1024)]
    pub max_spec_bytes: usize,
    /// Per token (admins excepted): queued jobs at most (429 beyond).
    #[arg(long, default_value_t = 20)]
    pub max_queued: u64,
    /// Per token (admins excepted): running builds at most; more wait in the queue while
    /// other owners' builds take their turns.
    #[arg(long, default_value_t = 4)]
    pub max_running: u64,
    /// Per token (admins excepted): bytes of artifacts kept, e.g. 50GiB (429 beyond).
    #[arg(long, default_value = "50GiB", value_parser = parse_bytes)]
    pub max_stored: u64,
    /// Per token (admins excepted): jobs kept in any state, cancelled and failed ones too
    /// (429 beyond; deleting jobs makes room).
    #[arg(long, default_value_t = 500)]
    pub max_jobs: u64,
    /// Days an ended job is kept before it is deleted with its files (0: kept until deleted).
    #[arg(long, default_value_t = 30, value_name = "DAYS")]
    pub keep_jobs: u64,
    /// Per token: logs followed at once (429 beyond).
    #[arg(long, default_value_t = 64)]
    pub max_streams: usize,
    /// Which builds run inside a throwaway machine (`debimg build --vm`): `host` (none; specs
    /// of non-admin tokens may not read this host's files nor run code outside the chroot),
    /// `untrusted` (those of non-admin tokens, with every spec field allowed), `vm` (all).
    #[arg(long, value_enum, default_value = "host")]
    pub isolation: crate::service::Isolation,
    /// Attempts of a build whose worker vanished before it is failed.
    #[arg(long, default_value_t = 3)]
    pub max_attempts: i64,
    /// Seconds a worker's claim lasts without a renewal (workers renew every quarter of it);
    /// a worker silent that long has its build queued again.
    #[arg(long, default_value_t = crate::service::LEASE_SECS, value_parser = clap::value_parser!(i64).range(4..))]
    pub lease_secs: i64,
    /// Hand builds to `debimg worker`s through RabbitMQ at this URL
    /// (`amqp://USER:PASSWORD@HOST:5672/%2f`); usually with --local-workers 0.
    #[arg(long, env = "DEBIMG_AMQP", hide_env_values = true)]
    pub amqp: Option<String>,
}

/// What `debimg serve` does besides serving.
#[derive(Subcommand)]
pub enum ServeAction {
    /// The tokens callers present (`Authorization: Bearer <token>`).
    Token {
        #[command(subcommand)]
        action: TokenAction,
    },
}

/// Token management.
#[derive(Subcommand)]
pub enum TokenAction {
    /// Make a token for NAME and print it alone on stdout, once (only its hash is stored).
    Add {
        name: String,
        /// What the token may do: `user` submits jobs and sees its own; `admin` sees every
        /// job and is not limited; `worker` claims builds and reports the ones it holds, and
        /// nothing else (what `debimg worker` needs).
        #[arg(long, value_enum, default_value = "user")]
        role: crate::service::store::Role,
        /// The same as `--role admin`.
        #[arg(long, conflicts_with = "role")]
        admin: bool,
        #[arg(long, default_value = crate::service::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// List the tokens' names.
    List {
        #[arg(long, default_value = crate::service::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Remove NAME's token (its jobs stay).
    Remove {
        name: String,
        #[arg(long, default_value = crate::service::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
}

/// Parses a byte count such as `50GiB`.
fn parse_bytes(text: &str) -> Result<u64, String> {
    crate::spec::Size::parse(text).map(|s| s.0)
}

/// Archive formats for `--bundle`.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum BundleFormat {
    /// A gzipped tar archive.
    #[value(name = "tar.gz")]
    TarGz,
}

/// What `build` writes on stdout.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MessageFormat {
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
    let size = crate::spec::Size::parse(text)?;
    if size.0 < 64 << 20 {
        return Err(format!(
            "`{text}` is too small for a build (at least 64MiB)"
        ));
    }
    Ok(size.0)
}

#[derive(Subcommand)]
pub enum CacheAction {
    /// List the cache's entries (pooled packages, base trees, apt lists) with their size and the
    /// hours since they were last used.
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

/// `debimg build --vm` and the limits of its machine.
#[derive(clap::Args)]
pub struct VmArgs {
    /// Build inside a throwaway qemu machine that boots the builder appliance (see `vm-image`):
    /// this host attaches no loop device, mounts nothing of the build and runs none of its
    /// code. The machine hands back the raw images as files, which this host checks against
    /// its plan, then packages and publishes.
    #[arg(long, conflicts_with_all = ["fuel", "shell", "keep_on_failure", "tmpfs"])]
    pub vm: bool,
    /// Memory of the machine (e.g. 2GiB); a build that runs out fails with `limit-exceeded`.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "2GiB", requires = "vm")]
    pub vm_memory: u64,
    /// Virtual CPUs of the machine [default: this host's, at most 8].
    #[arg(long, value_name = "N", requires = "vm", value_parser = clap::value_parser!(u32).range(1..=64))]
    pub vm_cpus: Option<u32>,
    /// The machine's disk budget: its scratch disk (sparse), which holds the workspace and the
    /// outputs; a build that fills it fails with `no-space`.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "32GiB", requires = "vm")]
    pub vm_disk: u64,
    /// Wall-clock limit of the machine in seconds; a build still running then is stopped and
    /// fails with `limit-exceeded`.
    #[arg(long, value_name = "SECONDS", requires = "vm")]
    pub vm_timeout: Option<u64>,
    /// auto: KVM when /dev/kvm works (falling back to software emulation when the machine does
    /// not come up in 30 s); kvm; tcg (software emulation).
    #[arg(long, value_enum, default_value = "auto", requires = "vm")]
    pub vm_accel: crate::boottest::Accel,
    /// The spec comes from someone this host does not trust (a build service's caller): no
    /// file it names on this host is read or sent into the machine (such paths resolve inside
    /// it), and this host's apt sources go in only when it asks for `host`.
    #[arg(long, requires = "vm")]
    pub untrusted: bool,
}
