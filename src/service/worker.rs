//! `debimg worker`: takes build ids from RabbitMQ (prefetch 1), claims each build from the
//! server (a lease it renews while building), builds it as `serve`'s own workers do, streams the
//! log, uploads the artifacts and reports the end. The message is acknowledged as soon as the
//! server answered the claim: a build longer than RabbitMQ's consumer timeout is no problem, and
//! a worker that dies loses only its lease (the server queues the build again).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use serde_json::{Value, json};

use super::http::LEASE_HEADER;
use super::runner::{self, Control};
use super::store::{Artifact, Claim};
use crate::creator::{DEFAULT_BUILD_DIR, DEFAULT_CACHE_DIR};

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub server: String,
    pub token: String,
    pub amqp: String,
    pub name: String,
    pub cache_dir: PathBuf,
    pub build_dir: PathBuf,
    pub debimg: PathBuf,
    /// Which builds run inside a throwaway machine.
    pub isolation: super::Isolation,
    /// Send the token over plain HTTP to a server that is not on this host's loopback.
    pub allow_plain_http: bool,
}

/// Why the worker may not talk to `server`, if it may not: plain HTTP carries its token and
/// every artifact readable by anyone on the way, so only to this host's loopback.
pub fn plain_http_problem(server: &str) -> Option<String> {
    if !server.to_ascii_lowercase().starts_with("http://") {
        return None;
    }
    let host = crate::vm::egress::endpoint_of(server).map(|e| e.host)?;
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    (!loopback).then(|| {
        format!(
            "{server} is plain HTTP to another host: the worker's token and the artifacts would \
             cross the network readable; use https:// (a TLS proxy in front of `debimg serve`), \
             or --allow-plain-http on a network you trust"
        )
    })
}

/// A worker's token and RabbitMQ URL, from the environment or files: never from the command
/// line, where `ps` shows them to every local user.
pub fn secrets(
    token: &Option<String>,
    token_file: &Option<PathBuf>,
    amqp: &Option<String>,
    amqp_file: &Option<PathBuf>,
) -> Result<(String, String)> {
    let on_command_line = |flag: &str| {
        std::env::args_os().any(|a| {
            let a = a.to_string_lossy();
            a == flag || a.starts_with(&format!("{flag}="))
        })
    };
    let refuse = |what: &str| {
        anyhow::anyhow!(
            "{what} on the command line is shown to every local user by `ps`: give it in the \
             environment or a file readable by root alone"
        )
    };
    if on_command_line("--token") {
        return Err(refuse("--token (DEBIMG_TOKEN, --token-file)"));
    }
    if on_command_line("--amqp") && amqp.as_deref().is_some_and(|u| u.contains('@')) {
        return Err(refuse(
            "a RabbitMQ URL with a password (DEBIMG_AMQP, --amqp-file)",
        ));
    }
    let first_line = |path: &PathBuf| -> Result<String> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Ok(text.lines().next().unwrap_or("").trim().to_string())
    };
    let token = match (token, token_file) {
        (_, Some(f)) => first_line(f)?,
        (Some(t), None) => t.clone(),
        (None, None) => String::new(),
    };
    let amqp = match (amqp, amqp_file) {
        (_, Some(f)) => first_line(f)?,
        (Some(u), None) => u.clone(),
        (None, None) => String::new(),
    };
    if token.is_empty() {
        bail!(
            "a worker needs a worker's token: DEBIMG_TOKEN or --token-file \
             (`debimg serve token add NAME --role worker` makes one)"
        );
    }
    if amqp.is_empty() {
        bail!("a worker needs RabbitMQ's URL: --amqp, DEBIMG_AMQP or --amqp-file");
    }
    Ok((token, amqp))
}

/// The default name of a worker: the host name and the pid.
pub fn default_name() -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "worker".into());
    format!("{host}-{}", std::process::id())
}

/// The server's side of a worker.
#[derive(Clone)]
struct Server {
    agent: ureq::Agent,
    base: String,
    auth: String,
}

/// A claim and how often to renew it.
struct Claimed {
    claim: Claim,
    renew_secs: u64,
}

impl Server {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Claims build `id`: `Ok(None)` when the server says it is not to be built (not queued,
    /// gone); an error when the server could not be asked.
    fn claim(&self, id: &str, worker: &str) -> Result<Option<Claimed>> {
        let mut resp = self
            .agent
            .post(self.url(&format!("/api/v1/builds/{}/claim", super::url::segment(id))))
            .header("Authorization", &self.auth)
            .send_json(json!({ "worker": worker }))
            .context("claiming a build")?;
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        match status {
            200 => {
                let v: Value = serde_json::from_str(&text).context("the server's claim")?;
                let renew_secs = v["renew_secs"].as_u64().unwrap_or(10).max(1);
                let claim: Claim = serde_json::from_value(v).context("the server's claim")?;
                Ok(Some(Claimed { claim, renew_secs }))
            }
            404 | 409 => {
                tracing::info!("build {id}: not to be built ({})", text.trim());
                Ok(None)
            }
            401 | 403 => bail!("the server refuses this worker's token: {}", text.trim()),
            _ => bail!("the server answered {status} to a claim: {}", text.trim()),
        }
    }

    /// Sends a worker call with the lease; the answer's status and text.
    fn call(
        &self,
        method: &str,
        path: &str,
        lease: &str,
        body: Option<&Value>,
        bytes: Option<&[u8]>,
    ) -> Result<(u16, String)> {
        let url = self.url(path);
        let result = match (method, body, bytes) {
            ("POST", Some(b), _) => self
                .agent
                .post(&url)
                .header("Authorization", &self.auth)
                .header(LEASE_HEADER, lease)
                .send_json(b),
            ("POST", None, Some(bytes)) => self
                .agent
                .post(&url)
                .header("Authorization", &self.auth)
                .header(LEASE_HEADER, lease)
                .header("Content-Type", "application/octet-stream")
                .send(bytes),
            _ => self
                .agent
                .post(&url)
                .header("Authorization", &self.auth)
                .header(LEASE_HEADER, lease)
                .send_empty(),
        };
        let mut resp = result.with_context(|| format!("calling {path}"))?;
        let status = resp.status().as_u16();
        Ok((status, resp.body_mut().read_to_string().unwrap_or_default()))
    }
}

impl Server {
    /// Reports the end of a build.
    fn finish(&self, base: &str, lease: &str, report: &Value) -> Result<(u16, String)> {
        self.call("POST", &format!("{base}/finish"), lease, Some(report), None)
    }
}

/// `debimg worker`: as root, its token and RabbitMQ URL from the environment or files, this
/// debimg for the builds; runs until INT or TERM ([`run`]).
pub fn work(args: &WorkerArgs) -> Result<(), crate::error::Error> {
    if !nix::unistd::geteuid().is_root() {
        return Err(anyhow::anyhow!("a worker builds as root: run `debimg worker` as root").into());
    }
    let (token, amqp) = secrets(&args.token, &args.token_file, &args.amqp, &args.amqp_file)?;
    run(WorkerConfig {
        server: args.server.clone(),
        token,
        amqp,
        name: args.name.clone().unwrap_or_else(default_name),
        cache_dir: args.cache_dir.clone(),
        build_dir: args.build_dir.clone(),
        debimg: std::env::current_exe().map_err(anyhow::Error::from)?,
        isolation: args.isolation,
        allow_plain_http: args.allow_plain_http,
    })?;
    Ok(())
}

/// Runs the worker until INT or TERM (a build in progress is then ended unreported: the
/// server queues it again when the lease runs out).
pub fn run(cfg: WorkerConfig) -> Result<()> {
    if let Some(why) = plain_http_problem(&cfg.server)
        && !cfg.allow_plain_http
    {
        bail!("{why}");
    }
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&stop)).context("handling signals")?;
    }
    let server = Server {
        agent: ureq::Agent::new_with_config(
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_connect(Some(Duration::from_secs(10)))
                .build(),
        ),
        base: cfg.server.trim_end_matches('/').to_string(),
        auth: format!("Bearer {}", cfg.token.trim()),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    std::fs::create_dir_all(&cfg.build_dir)
        .with_context(|| format!("creating {}", cfg.build_dir.display()))?;
    {
        let _no_one_else = lock_build_dir(&cfg.build_dir)?;
        remove_stale_dirs(&cfg.build_dir)?;
    }
    tracing::info!(
        "debimg worker {}: taking builds from RabbitMQ for {}",
        cfg.name,
        server.base
    );
    while !stop.load(Ordering::SeqCst) {
        let connected = rt.block_on(async {
            let (conn, channel) = super::amqp::channel(&cfg.amqp).await?;
            let consumer = super::amqp::consumer(&channel, &cfg.name).await?;
            anyhow::Ok((conn, channel, consumer))
        });
        let (_conn, _channel, mut consumer) = match connected {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("{e:#}; trying again in 2 s");
                std::thread::sleep(Duration::from_secs(2));
                continue;
            }
        };
        while !stop.load(Ordering::SeqCst) {
            let next = rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(1), consumer.next()).await
            });
            let delivery = match next {
                Err(_) => continue,
                Ok(Some(Ok(d))) => d,
                Ok(Some(Err(e))) => {
                    tracing::warn!("RabbitMQ: {e}; connecting again");
                    break;
                }
                Ok(None) => {
                    tracing::warn!("RabbitMQ closed the consumer; connecting again");
                    break;
                }
            };
            let id = String::from_utf8_lossy(&delivery.data).trim().to_string();
            match server.claim(&id, &cfg.name) {
                Ok(claimed) => {
                    // Acknowledged at once: the job store has the truth from here on.
                    if let Err(e) = rt.block_on(delivery.ack(BasicAckOptions::default())) {
                        tracing::warn!("acknowledging build {id}: {e}");
                    }
                    if let Some(claimed) = claimed
                        && let Err(e) = build(&server, &cfg, claimed, &stop)
                    {
                        tracing::error!("build {id}: {e:#}");
                    }
                }
                Err(e) => {
                    tracing::warn!("build {id}: {e:#}; handing it back to the queue");
                    let _ = rt.block_on(delivery.nack(BasicNackOptions {
                        requeue: true,
                        ..BasicNackOptions::default()
                    }));
                    std::thread::sleep(Duration::from_secs(2));
                }
            }
        }
    }
    tracing::info!("debimg worker {}: stopped", cfg.name);
    Ok(())
}

/// Builds one claimed build and reports it.
fn build(server: &Server, cfg: &WorkerConfig, claimed: Claimed, stop: &AtomicBool) -> Result<()> {
    let Claimed { claim, renew_secs } = claimed;
    let id = claim.build_id.clone();
    let lease = claim.lease.clone();
    let base = format!("/api/v1/builds/{}", super::url::segment(&id));
    tracing::info!("build {id}: attempt {}", claim.attempt);
    // A server that is not the operator's own could send anything: a build no admin
    // submitted gets the check the server makes for untrusted specs.
    if !claim.trusted
        && let Err(refusal) = super::check_spec(&claim.spec, false, cfg.isolation)
    {
        let error = json!({
            "kind": "invalid-spec",
            "message": format!("this worker refuses the spec: {}", refusal.error),
            "problems": refusal.problems,
        });
        let report = json!({"state": "failed", "error": error});
        server.finish(&base, &lease, &report)?;
        return Ok(());
    }
    // Made and locked while no other worker of this build directory sweeps it.
    let (work, _held) = {
        let _no_one_else = lock_build_dir(&cfg.build_dir)?;
        let work = tempfile::Builder::new()
            .prefix(WORK_PREFIX)
            .tempdir_in(&cfg.build_dir)
            .context("making the worker's directory")?;
        // Held while the directory is in use: one whose lock is free is a dead worker's.
        let held = lock_dir(work.path(), true)?.context("locking the worker's directory")?;
        (work, held)
    };
    let spec = work.path().join("spec.yaml");
    std::fs::write(&spec, &claim.spec)?;
    let out = work.path().join("out");
    let cmd = runner::build_command(
        &cfg.debimg,
        &spec,
        &out,
        &cfg.cache_dir,
        &cfg.build_dir,
        &cfg.isolation.build_args(claim.trusted),
    );

    let mut pending: Vec<u8> = Vec::new();
    let mut tail: Vec<u8> = Vec::new();
    let mut last_flush = Instant::now();
    let mut last_renew = Instant::now();
    let flush = |pending: &mut Vec<u8>| {
        if pending.is_empty() {
            return;
        }
        match server.call("POST", &format!("{base}/log"), &lease, None, Some(pending)) {
            Ok((204, _)) => pending.clear(),
            Ok((409, _)) => pending.clear(),
            Ok((status, text)) => tracing::warn!("sending the log: {status} {}", text.trim()),
            Err(e) => tracing::warn!("sending the log: {e:#}"),
        }
    };
    let pending_cell = std::cell::RefCell::new(&mut pending);
    let result = runner::run_child(
        cmd,
        Duration::from_secs(300),
        &mut |bytes| {
            tail.extend_from_slice(bytes);
            if tail.len() > 16384 {
                tail.drain(..tail.len() - 8192);
            }
            let mut p = pending_cell.borrow_mut();
            p.extend_from_slice(bytes);
            if p.len() > 64 * 1024 {
                flush(&mut p);
            }
        },
        &mut |stage| {
            let _ = server.call(
                "POST",
                &format!("{base}/stage"),
                &lease,
                Some(&json!({ "stage": stage })),
                None,
            );
        },
        &mut || {
            if stop.load(Ordering::SeqCst) {
                return Control::Lost;
            }
            if last_flush.elapsed() >= Duration::from_secs(1) {
                last_flush = Instant::now();
                flush(&mut pending_cell.borrow_mut());
            }
            if last_renew.elapsed() >= Duration::from_secs(renew_secs) {
                last_renew = Instant::now();
                match server.call("POST", &format!("{base}/renew"), &lease, None, None) {
                    Ok((200, text)) => {
                        if serde_json::from_str::<Value>(&text).is_ok_and(|v| v["cancel"] == true) {
                            return Control::Cancel;
                        }
                    }
                    Ok((409, _)) => return Control::Lost,
                    Ok((status, text)) => {
                        tracing::warn!("renewing the lease: {status} {}", text.trim())
                    }
                    Err(e) => tracing::warn!("renewing the lease: {e:#}"),
                }
            }
            Control::Continue
        },
    );
    flush(&mut pending_cell.borrow_mut());
    let result = result?;
    if result.stopped == Some(Control::Lost) {
        tracing::warn!("build {id}: ended before it finished; not reported");
        return Ok(());
    }
    // Uploading takes as long as the images are large: the lease is renewed meanwhile.
    let reported = AtomicBool::new(false);
    let (status, text) = std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut last = Instant::now();
            while !reported.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(200));
                if last.elapsed() >= Duration::from_secs(renew_secs) {
                    last = Instant::now();
                    let _ = server.call("POST", &format!("{base}/renew"), &lease, None, None);
                }
            }
        });
        let report = (|| -> Result<(u16, String)> {
            let report = if result.succeeded() {
                let mut artifacts: Vec<Artifact> = Vec::new();
                for (a, path) in &result.artifacts {
                    upload(server, &base, &lease, a, path)?;
                    artifacts.push(a.clone());
                }
                json!({ "state": "succeeded", "artifacts": artifacts })
            } else if result.stopped == Some(Control::Cancel) {
                json!({ "state": "cancelled" })
            } else {
                let error = runner::failure(&result, runner::tail_lines(&tail, 20));
                json!({ "state": "failed", "error": error })
            };
            server.finish(&base, &lease, &report)
        })();
        reported.store(true, Ordering::SeqCst);
        report
    })?;
    match status {
        200 => {
            let v: Value = serde_json::from_str(&text).unwrap_or_default();
            tracing::info!(
                "build {id}: {}{}",
                v["state"].as_str().unwrap_or("?"),
                v["problem"]
                    .as_str()
                    .map(|p| format!(" ({p})"))
                    .unwrap_or_default()
            );
        }
        409 => tracing::warn!("build {id}: the server refused the report (lease lost)"),
        _ => bail!(
            "the server answered {status} to the report: {}",
            text.trim()
        ),
    }
    Ok(())
}

/// The name prefix of a worker's directories in the build directory.
const WORK_PREFIX: &str = "debimg-worker-";

/// An exclusive lock on directory `dir` (`None` when another process holds it and `wait` is
/// false).
fn lock_dir(dir: &std::path::Path, wait: bool) -> Result<Option<nix::fcntl::Flock<std::fs::File>>> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(dir)
        .with_context(|| format!("opening {}", dir.display()))?;
    let arg = if wait {
        nix::fcntl::FlockArg::LockExclusive
    } else {
        nix::fcntl::FlockArg::LockExclusiveNonblock
    };
    match nix::fcntl::Flock::lock(f, arg) {
        Ok(l) => Ok(Some(l)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(e).with_context(|| format!("locking {}", dir.display())),
    }
}

/// An exclusive lock on the build directory's `.debimg-workers.lock`: held while a worker
/// makes its directory or sweeps dead workers' ones.
fn lock_build_dir(build_dir: &std::path::Path) -> Result<nix::fcntl::Flock<std::fs::File>> {
    let f =
        crate::output::OutputDir::open(build_dir)?.open_or_create(".debimg-workers.lock", 0o600)?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .with_context(|| format!("locking {}/.debimg-workers.lock", build_dir.display()))
}

/// Removes the directories of workers that died in the build directory (`kill -9` leaves its
/// spec and output behind); a live worker's is locked and stays.
fn remove_stale_dirs(build_dir: &std::path::Path) -> Result<()> {
    let dir = crate::output::OutputDir::open(build_dir)?;
    for name in dir.entries()? {
        let Some(text) = name.to_str() else { continue };
        if !text.starts_with(WORK_PREFIX) || dir.kind(&name)? != Some(crate::output::EntryKind::Dir)
        {
            continue;
        }
        if let Some(lock) = lock_dir(&build_dir.join(&name), false)? {
            tracing::info!(
                "removing {}, left by a worker that died",
                build_dir.join(&name).display()
            );
            dir.remove_all(&name)?;
            drop(lock);
        }
    }
    Ok(())
}

/// Uploads one artifact from the build's output directory.
fn upload(
    server: &Server,
    base: &str,
    lease: &str,
    a: &Artifact,
    path: &std::path::Path,
) -> Result<()> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let url = server.url(&format!(
        "{base}/artifacts/{}",
        super::url::encode_path(&a.name)
    ));
    let mut resp = server
        .agent
        .put(&url)
        .header("Authorization", &server.auth)
        .header(LEASE_HEADER, lease)
        .header("Content-Type", "application/octet-stream")
        .send(&file)
        .with_context(|| format!("uploading {}", a.name))?;
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    if status != 201 {
        bail!(
            "uploading {}: the server answered {status}: {}",
            a.name,
            text.trim()
        );
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_come_from_files_or_the_environment() {
        let t = tempfile::tempdir().unwrap();
        let token = t.path().join("token");
        let amqp = t.path().join("amqp");
        std::fs::write(&token, "dbi_abc\nignored\n").unwrap();
        std::fs::write(&amqp, "amqp://u:p@127.0.0.1:5672/%2f\n").unwrap();
        assert_eq!(
            secrets(&None, &Some(token.clone()), &None, &Some(amqp)).unwrap(),
            (
                "dbi_abc".to_string(),
                "amqp://u:p@127.0.0.1:5672/%2f".to_string()
            )
        );
        let e = secrets(&None, &None, &Some("amqp://x".into()), &None).unwrap_err();
        assert!(e.to_string().contains("--role worker"), "{e}");
        let e = secrets(&Some("dbi_x".into()), &None, &None, &None).unwrap_err();
        assert!(e.to_string().contains("RabbitMQ"), "{e}");
        assert!(secrets(&None, &Some(t.path().join("missing")), &None, &None).is_err());
    }

    #[test]
    fn plain_http_only_to_loopback() {
        for ok in [
            "http://127.0.0.1:8080",
            "http://localhost:8080/",
            "http://[::1]:8080",
            "https://farm.example.org",
        ] {
            assert_eq!(plain_http_problem(ok), None, "{ok}");
        }
        for bad in [
            "http://farm.example.org:8080",
            "HTTP://10.0.0.5/",
            "http://[2001:db8::1]/",
        ] {
            assert!(plain_http_problem(bad).is_some(), "{bad}");
        }
    }
}
