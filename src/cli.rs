//! The command line of `debimg`, as clap reads it: the commands and the global flags. Each
//! command's arguments live beside its body, in the module of its subject (`debimg verify`:
//! [`crate::verify::VerifyArgs`] and [`crate::verify::verify`]), so that no module imports this
//! one; the binary only parses and dispatches.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::boottest::BootTestArgs;
use crate::cache::CacheAction;
use crate::creator::DEFAULT_CACHE_DIR;
use crate::error::ErrorKind;
use crate::input::{PlanArgs, ValidateArgs};
use crate::job::{BuildArgs, LockArgs, VmImageArgs};
use crate::pack::PackArgs;
use crate::service::cli::{ServeAction, ServeArgs};
use crate::service::client::{JobsAction, ServerArgs, SubmitArgs};
use crate::service::worker::WorkerArgs;
use crate::verify::VerifyArgs;

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

/// The exit codes, for `--help`.
fn exit_codes_help() -> String {
    let mut s = String::from("Exit codes:\n  0      success\n");
    for (kind, code, what) in ErrorKind::TABLE {
        s.push_str(&format!("  {code:<6} {what} ({kind})\n"));
    }
    s
}
