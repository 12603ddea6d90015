//! `debimg serve` from the command line: its options made into the service's [`Config`], or one
//! of its token actions on the store.

use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow, bail, ensure};

use super::Config;
use super::store::{Limits, Role, Store};
use crate::creator::{DEFAULT_BUILD_DIR, DEFAULT_CACHE_DIR};

/// `debimg serve`: the service until INT or TERM; with an action, that action (`token add`
/// prints the new token alone on stdout, `token list` a line per token).
pub fn serve(action: Option<&ServeAction>, args: &ServeArgs) -> Result<(), crate::error::Error> {
    match action {
        Some(ServeAction::Token { action }) => token(action)?,
        None => {
            if args.local_workers > 0 && !nix::unistd::geteuid().is_root() {
                return Err(anyhow!(
                    "local workers build as root: run `debimg serve` as root, or with \
                     --local-workers 0 and workers elsewhere"
                )
                .into());
            }
            super::http::serve(config(args)?)?;
        }
    }
    Ok(())
}

/// The service's configuration from `serve`'s options.
fn config(args: &ServeArgs) -> Result<Config> {
    Ok(Config {
        listen: args.listen.clone(),
        state_dir: args.state_dir.clone(),
        local_workers: args.local_workers,
        post_creation: args.post_creation.clone(),
        cache_dir: args.cache_dir.clone(),
        build_dir: args.build_dir.clone(),
        max_spec_bytes: args.max_spec_bytes,
        limits: Limits {
            queued: Some(args.max_queued),
            running: Some(args.max_running),
            stored_bytes: Some(args.max_stored),
            jobs: Some(args.max_jobs),
        },
        max_attempts: args.max_attempts.max(1),
        debimg: std::env::current_exe()?,
        lease_secs: args.lease_secs,
        amqp: args.amqp.clone(),
        max_streams: args.max_streams,
        isolation: args.isolation,
        post_creation_timeout: std::time::Duration::from_secs(args.post_creation_timeout),
        max_upload_bytes: args.max_upload,
        keep_jobs: (args.keep_jobs > 0)
            .then(|| std::time::Duration::from_secs(args.keep_jobs * 86400)),
    })
}

/// `debimg serve token add|list|remove`.
fn token(action: &TokenAction) -> Result<()> {
    match action {
        TokenAction::Add {
            name,
            role,
            admin,
            state_dir,
        } => {
            let role = if *admin { Role::Admin } else { *role };
            ensure!(
                !name.is_empty() && name.len() <= 64 && !name.chars().any(char::is_control),
                "a token's name is 1 to 64 characters, without control characters"
            );
            let token = open(state_dir)?.add_token(name, role)?;
            println!("{token}");
        }
        TokenAction::List { state_dir } => {
            for t in open(state_dir)?.tokens()? {
                println!("{}\t{}\t{}", t.name, t.role.as_str(), t.created);
            }
        }
        TokenAction::Remove { name, state_dir } => {
            if !open(state_dir)?.remove_token(name)? {
                bail!("there is no token named `{name}`");
            }
        }
    }
    Ok(())
}

/// The store in the state directory `dir`, which is made (or checked) first.
fn open(dir: &Path) -> Result<Store> {
    super::prepare_state_dir(dir)?;
    Store::open(dir)
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
#[derive(clap::Subcommand)]
pub enum ServeAction {
    /// The tokens callers present (`Authorization: Bearer <token>`).
    Token {
        #[command(subcommand)]
        action: TokenAction,
    },
}

/// Token management.
#[derive(clap::Subcommand)]
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
