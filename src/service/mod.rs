//! The build service: `debimg serve` (HTTP API, job store, web page, local workers; [`cli`]
//! reads its options), and the client (`debimg submit`, `debimg jobs`). A thin layer over the
//! library: handlers validate, store and enqueue; every build is a `debimg build
//! --message-format json` child process in its own process group, so the service learns the
//! stage, the artifacts and the error kind from the build's events, never from its log text.
//!
//! The state directory holds the job store (`debimg.sqlite`) and one directory per build,
//! `builds/<id>/` (`spec.yaml`, `build.log`, `out/` with the artifacts).

pub mod amqp;
pub mod cli;
pub mod client;
pub mod gate;
pub mod hook;
pub mod http;
pub mod runner;
pub mod store;
pub mod url;
pub mod web;
pub mod worker;

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::output::OutputDir;
use crate::spec::{Problem, Spec};
use store::Store;

/// The default address `serve` listens on.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// The default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/debimg";

/// Seconds a claim lasts without a renewal, by default.
pub const LEASE_SECS: i64 = 60;

/// Seconds between renewals of a lease of `lease_secs`.
pub fn renew_secs(lease_secs: i64) -> u64 {
    (lease_secs / 4).max(1) as u64
}

/// How `serve` runs.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: String,
    pub state_dir: PathBuf,
    pub local_workers: usize,
    pub post_creation: Option<String>,
    pub cache_dir: PathBuf,
    pub build_dir: PathBuf,
    /// The largest spec accepted, in bytes.
    pub max_spec_bytes: usize,
    pub limits: store::Limits,
    /// Attempts of a build whose worker vanished before it fails.
    pub max_attempts: i64,
    /// The `debimg` binary the builds run.
    pub debimg: PathBuf,
    /// Seconds a worker's claim lasts without a renewal.
    pub lease_secs: i64,
    /// RabbitMQ, to hand builds to `debimg worker`s.
    pub amqp: Option<String>,
    /// Log streams one token may hold open.
    pub max_streams: usize,
    /// Which builds run inside a throwaway machine (`debimg build --vm`).
    pub isolation: Isolation,
    /// How long the post-creation command may run before it is killed.
    pub post_creation_timeout: Duration,
    /// The largest artifact a worker may upload, in bytes.
    pub max_upload_bytes: u64,
    /// How long an ended job is kept before it is deleted with its files.
    pub keep_jobs: Option<Duration>,
}

/// Which builds of the service run inside a throwaway machine (`debimg build --vm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Isolation {
    /// Every build on this host (in a chroot); specs of non-admin tokens may not read the
    /// host's files nor run code outside the chroot.
    #[default]
    Host,
    /// Builds of non-admin tokens in a machine, with every spec field allowed (the paths they
    /// name resolve inside it); admins' on this host.
    Untrusted,
    /// Every build in a machine.
    Vm,
}

impl Isolation {
    /// Whether a build submitted by a caller `trusted` (an admin) or not runs in a machine.
    pub fn in_vm(self, trusted: bool) -> bool {
        match self {
            Isolation::Host => false,
            Isolation::Untrusted => !trusted,
            Isolation::Vm => true,
        }
    }

    /// Its name, as `--isolation` spells it and the store keeps it.
    pub fn as_str(self) -> &'static str {
        match self {
            Isolation::Host => "host",
            Isolation::Untrusted => "untrusted",
            Isolation::Vm => "vm",
        }
    }

    /// The `debimg build` arguments of such a build.
    pub fn build_args(self, trusted: bool) -> Vec<&'static str> {
        match (self.in_vm(trusted), trusted) {
            (false, _) => vec![],
            (true, true) => vec!["--vm"],
            (true, false) => vec!["--vm", "--untrusted"],
        }
    }
}

/// A spec as the service accepts it.
#[derive(Debug)]
pub struct Checked {
    pub spec: Spec,
    /// The sha256 of the parsed spec (as JSON): identical specs, however written, have one.
    pub digest: String,
}

/// Why a submitted spec is refused.
#[derive(Debug, Serialize)]
pub struct Refusal {
    pub error: String,
    pub problems: Vec<Problem>,
}

/// Checks a submitted spec: valid, and for a caller the host does not trust, reading none of
/// the server's files and running no code outside the chroot, unless `isolation` builds it in
/// a machine (where such paths and scripts reach the machine only). `mirror: host` from such a
/// caller only when the server's sources are plain. No file it names is looked at.
pub fn check_spec(text: &str, trusted: bool, isolation: Isolation) -> Result<Checked, Refusal> {
    let spec = Spec::from_yaml(text, "spec").map_err(|e| Refusal {
        error: "the spec is invalid".into(),
        problems: e.problems,
    })?;
    if !trusted {
        let mut problems = if isolation.in_vm(false) {
            Vec::new()
        } else {
            spec.untrusted_problems()
        };
        problems.extend(host_source_problems(&spec));
        problems.extend(egress_problems(&spec));
        if !problems.is_empty() {
            return Err(Refusal {
                error: "the spec reads the server's files or runs code on it, which only an \
                        admin token may ask"
                    .into(),
                problems,
            });
        }
    }
    let json = serde_json::to_vec(&spec).expect("a spec serializes");
    let digest = Sha256::digest(&json)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(Checked { spec, digest })
}

/// What a stranger's spec may not reach: a repository apt would take unsigned
/// (`trusted: true`), and a mirror, repository or proxy on this host's loopback, a link-local
/// address (the cloud metadata endpoint) or a private range (the build host's own network),
/// named by address or as `localhost`. The build host's own sources (`host`) are the admin's
/// and stay allowed.
fn egress_problems(spec: &Spec) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut check = |field: String, uri: &str| {
        if let Some(why) = internal_address(uri) {
            problems.push(Problem {
                field,
                message: format!(
                    "`{uri}` is {why}, which a build for a non-admin token may not reach: name a \
                     public mirror"
                ),
            });
        }
    };
    if spec.mirror != "host" {
        check("mirror".into(), &spec.mirror);
    }
    for (i, r) in spec.repos.iter().enumerate() {
        if let Some(uri) = r.uri.as_deref().filter(|u| *u != "host") {
            check(format!("repos[{i}].uri"), uri);
        }
    }
    if let Some(proxies) = &spec.proxies {
        for (field, p) in [("http", &proxies.http), ("https", &proxies.https)] {
            if let Some(p) = p {
                check(format!("proxies.{field}"), p);
            }
        }
    }
    for (i, r) in spec.repos.iter().enumerate() {
        if r.trusted {
            problems.push(Problem {
                field: format!("repos[{i}].trusted"),
                message: "an unsigned repository is an admin token's to ask for: give the \
                          repository's `key`"
                    .into(),
            });
        }
    }
    problems
}

/// What kind of internal address the host of URL `uri` is, if it is one.
fn internal_address(uri: &str) -> Option<&'static str> {
    let rest = uri.split_once("://")?.1;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host_port = authority.rsplit('@').next().unwrap_or("");
    let host = if let Some(v6) = host_port.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        host_port.split(':').next().unwrap_or("")
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    if host == "localhost" || host.ends_with(".localhost") {
        return Some("this host's loopback");
    }
    let ip: std::net::IpAddr = match host.parse() {
        Ok(ip) => ip,
        // A number in another spelling (`2130706433`, `0x7f.1`) is an address too.
        Err(_)
            if !host.is_empty()
                && host.split('.').all(|part| {
                    let digits = part.strip_prefix("0x").unwrap_or(part);
                    !digits.is_empty()
                        && if part.starts_with("0x") {
                            digits.bytes().all(|b| b.is_ascii_hexdigit())
                        } else {
                            digits.bytes().all(|b| b.is_ascii_digit())
                        }
                }) =>
        {
            return Some("an address in an unusual spelling");
        }
        Err(_) => return None,
    };
    let ip = match ip {
        std::net::IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
        v4 => v4,
    };
    match ip {
        std::net::IpAddr::V4(a) => {
            let [o0, o1, ..] = a.octets();
            if a.is_loopback() {
                Some("this host's loopback")
            } else if a.is_link_local() {
                Some("a link-local address (such as the cloud metadata endpoint)")
            } else if a.is_private() || (o0 == 100 && (64..128).contains(&o1)) {
                Some("a private address")
            } else if a.is_unspecified() || o0 == 0 || a.is_broadcast() || a.is_multicast() {
                Some("no host's address")
            } else {
                None
            }
        }
        std::net::IpAddr::V6(a) => {
            let first = a.segments()[0];
            if a.is_loopback() {
                Some("this host's loopback")
            } else if first & 0xffc0 == 0xfe80 {
                Some("a link-local address (such as the cloud metadata endpoint)")
            } else if first & 0xfe00 == 0xfc00 {
                Some("a private address")
            } else if a.is_unspecified() || a.is_multicast() {
                Some("no host's address")
            } else {
                None
            }
        }
    }
}

/// `mirror: host` and `uri: host` name the server's own apt sources: from a caller the host
/// does not trust, only when every one of them is plain http(s) without credentials (a
/// `file:` source would be bound into the build, a password would be written into the image).
fn host_source_problems(spec: &Spec) -> Vec<Problem> {
    let mut fields = Vec::new();
    if spec.mirror == "host" {
        fields.push("mirror".to_string());
    }
    for (i, r) in spec.repos.iter().enumerate() {
        if r.uri.as_deref() == Some("host") {
            fields.push(format!("repos[{i}].uri"));
        }
    }
    if fields.is_empty() {
        return Vec::new();
    }
    let why = match crate::debian::mirror::read_host_sources(std::path::Path::new("/")) {
        Err(e) => Some(format!("the server's apt sources cannot be read ({e:#})")),
        Ok(sources) => sources_problem(&sources),
    };
    match why {
        None => Vec::new(),
        Some(why) => fields
            .into_iter()
            .map(|field| Problem {
                field,
                message: format!("`host` is refused here: {why}; name a mirror's URL"),
            })
            .collect(),
    }
}

/// Why the host's apt sources may not serve a stranger's build, if they may not.
fn sources_problem(sources: &[crate::debian::mirror::HostSource]) -> Option<String> {
    sources.iter().find_map(|s| {
        let plain = s.uri.starts_with("http://") || s.uri.starts_with("https://");
        let authority = s
            .uri
            .split("://")
            .nth(1)
            .unwrap_or("")
            .split('/')
            .next()
            .unwrap_or("");
        (!plain || authority.contains('@')).then(|| {
            "the server's apt sources include one that is not plain http(s) without credentials"
                .to_string()
        })
    })
}

/// The running service: its store, its settings and the builds its own workers run.
pub struct Service {
    pub store: Store,
    pub config: Config,
    /// The name prefix of this server's own workers (`local-<host>-`).
    pub local_prefix: String,
    state: OutputDir,
    /// Builds this server runs, with the flag that ends them ([`runner::RUN`], ...).
    running: Mutex<HashMap<String, Arc<AtomicU8>>>,
    work: (Mutex<u64>, Condvar),
    pub stopping: AtomicBool,
    /// Publishes queued builds to RabbitMQ, with `--amqp`.
    pub publisher: std::sync::OnceLock<amqp::Publisher>,
    /// What workers uploaded: (build, lease, name) -> (size, sha256).
    uploads: Mutex<HashMap<UploadKey, (u64, String)>>,
    /// Held while a worker's report is taken (one at a time: a retried report must not undo
    /// the first).
    finishing: Mutex<()>,
    /// Log streams open per token.
    streams: Mutex<HashMap<String, usize>>,
}

/// The most bytes a build's log keeps (the rest is dropped, and the log says so).
pub const MAX_LOG_BYTES: u64 = 64 << 20;

/// A log stream counted open; closed on drop.
pub struct StreamGuard {
    service: Arc<Service>,
    who: String,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let mut streams = self
            .service
            .streams
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = streams.get_mut(&self.who) {
            *n = n.saturating_sub(1);
        }
    }
}

/// An upload: (build, lease, artifact name).
type UploadKey = (String, String, String);

/// Makes the state directory (mode 0700) when it is missing; refuses one that is a link, is
/// not this user's, or that group or others may write: whoever can change it holds every job,
/// token hash and artifact.
pub fn prepare_state_dir(dir: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    if std::fs::symlink_metadata(dir).is_err() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating the state directory {}", dir.display()))?;
    }
    let md = std::fs::symlink_metadata(dir)
        .with_context(|| format!("inspecting the state directory {}", dir.display()))?;
    let euid = nix::unistd::geteuid().as_raw();
    let why = if md.file_type().is_symlink() {
        Some("is a symbolic link".to_string())
    } else if !md.is_dir() {
        Some("is not a directory".to_string())
    } else if md.uid() != euid {
        Some(format!("is owned by uid {}, not {euid}", md.uid()))
    } else if md.mode() & 0o022 != 0 {
        Some(format!(
            "is writable by group or others (mode {:04o})",
            md.mode() & 0o7777
        ))
    } else {
        None
    };
    if let Some(why) = why {
        return Err(crate::error::Error::tagged(
            crate::error::ErrorKind::Refused,
            format!(
                "the state directory {} {why}: it holds the jobs, the token hashes and the \
                 artifacts; give one only this user can change (a missing one is made 0700)",
                dir.display()
            ),
        ));
    }
    Ok(())
}

/// Whether `id` is a build id as the store makes them (`b` and 16 hex digits): the only names
/// a build's directory has.
pub fn is_build_id(id: &str) -> bool {
    id.len() == 17
        && id.starts_with('b')
        && id[1..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Service {
    /// Opens the state directory (made 0700 when missing) and the store in it; builds that this
    /// host's workers ran when the server stopped go back to the queue.
    pub fn open(config: Config) -> Result<Service> {
        let dir = &config.state_dir;
        prepare_state_dir(dir)?;
        let state = OutputDir::open_nofollow(dir)?;
        if state.kind("builds")?.is_none() {
            state.create_subdir("builds", 0o700)?;
        }
        let store = Store::open(dir)?;
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "localhost".into());
        let service = Service {
            store,
            local_prefix: format!("local-{host}-"),
            config,
            state,
            running: Mutex::new(HashMap::new()),
            work: (Mutex::new(0), Condvar::new()),
            stopping: AtomicBool::new(false),
            publisher: std::sync::OnceLock::new(),
            uploads: Mutex::new(HashMap::new()),
            finishing: Mutex::new(()),
            streams: Mutex::new(HashMap::new()),
        };
        let (requeued, failed) = service
            .store
            .requeue_lost(service.config.max_attempts, Some(&service.local_prefix))?;
        for id in &requeued {
            tracing::warn!("build {id}: its worker stopped with the server; queued again");
        }
        for id in &failed {
            service.after_build(id);
        }
        // Post-creation that a stop between a build's end and its post-creation left undone.
        for id in service.store.builds_awaiting_post_creation()? {
            service.after_build(&id);
        }
        service.collect_garbage(true);
        Ok(service)
    }

    /// The directory of build `id`, made when missing.
    pub fn build_files(&self, id: &str) -> Result<OutputDir> {
        anyhow::ensure!(is_build_id(id), "`{id}` is not a build id");
        let builds = self.state.open_subdir("builds")?;
        if builds.kind(id)?.is_none() {
            builds.create_subdir(id, 0o700)?;
        }
        builds.open_subdir(id)
    }

    /// The directory of build `id` when it exists (read paths never make one).
    pub fn existing_build_files(&self, id: &str) -> Result<Option<OutputDir>> {
        if !is_build_id(id) {
            return Ok(None);
        }
        let builds = self.state.open_subdir("builds")?;
        if builds.kind(id)? != Some(crate::output::EntryKind::Dir) {
            return Ok(None);
        }
        Ok(Some(builds.open_subdir(id)?))
    }

    /// The log of build `id`, open for appending (the build's directory made when missing).
    pub fn open_log(&self, id: &str) -> Result<std::fs::File> {
        let mut f = self.build_files(id)?.open_or_create("build.log", 0o600)?;
        f.seek(SeekFrom::End(0))?;
        Ok(f)
    }

    /// Appends `bytes` to build `id`'s log, up to [`MAX_LOG_BYTES`]; nothing when the build's
    /// directory is gone.
    pub fn log_line(&self, id: &str, bytes: &[u8]) {
        if let Ok(Some(dir)) = self.existing_build_files(id)
            && let Ok(mut f) = dir.open_or_create("build.log", 0o600)
        {
            runner::append_capped(&mut f, bytes);
        }
    }

    /// Counts a log stream of `who` open; `None` when `who` has `max` open already.
    pub fn open_stream(self: &Arc<Self>, who: &str, max: usize) -> Option<StreamGuard> {
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        let n = streams.entry(who.to_string()).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(StreamGuard {
            service: Arc::clone(self),
            who: who.to_string(),
        })
    }

    /// The log of build `id` from byte `from` (from its end with `tail`), at most `max` bytes;
    /// empty when there is none.
    fn log_bytes(&self, id: &str, from: u64, max: u64, tail: bool) -> Vec<u8> {
        let read = || -> Result<Vec<u8>> {
            let Some(dir) = self.existing_build_files(id)? else {
                return Ok(Vec::new());
            };
            let Some((mut f, st)) = dir.open_if_regular("build.log")? else {
                return Ok(Vec::new());
            };
            let start = if tail {
                (st.st_size as u64).saturating_sub(max)
            } else {
                from
            };
            f.seek(SeekFrom::Start(start))?;
            let mut buf = Vec::new();
            f.take(max).read_to_end(&mut buf)?;
            Ok(buf)
        };
        read().unwrap_or_default()
    }

    /// The log of build `id` from byte `from`, at most `max` bytes (empty when there is none).
    pub fn read_log(&self, id: &str, from: u64, max: usize) -> Vec<u8> {
        self.log_bytes(id, from, max as u64, false)
    }

    /// The last `max` bytes of build `id`'s log.
    pub fn read_log_tail(&self, id: &str, max: u64) -> Vec<u8> {
        self.log_bytes(id, 0, max, true)
    }

    /// The output directory of build `id`, when it has one.
    pub fn artifacts_dir(&self, id: &str) -> Result<Option<OutputDir>> {
        match self.existing_build_files(id)? {
            Some(b) if b.kind("out")? == Some(crate::output::EntryKind::Dir) => {
                Ok(Some(b.open_subdir("out")?))
            }
            _ => Ok(None),
        }
    }

    /// Removes the upload directories of build `id` (its leases are gone: it went back to the
    /// queue).
    pub fn remove_uploads(&self, id: &str) {
        let run = || -> Result<()> {
            if let Some(b) = self.existing_build_files(id)? {
                for name in b.entries()? {
                    if name.to_str().is_some_and(|n| n.starts_with("up-")) {
                        b.remove_all(&name)?;
                    }
                }
            }
            Ok(())
        };
        if let Err(e) = run() {
            tracing::error!("build {id}: removing uploads of lost leases: {e:#}");
        }
        self.forget_uploads(id);
    }

    /// Says that build `id` is queued: to the local workers and to RabbitMQ.
    pub fn queued(&self, id: &str) {
        self.notify_work();
        if let Some(p) = self.publisher.get() {
            p.publish(id);
        }
    }

    /// Notes what a worker uploaded.
    pub fn note_upload(&self, build: &str, lease: &str, name: &str, size: u64, sha256: &str) {
        self.uploads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                (build.to_string(), lease.to_string(), name.to_string()),
                (size, sha256.to_string()),
            );
    }

    /// What a worker uploaded as `name` for this lease, if it did (since this server started).
    pub fn upload(&self, build: &str, lease: &str, name: &str) -> Option<(u64, String)> {
        self.uploads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(build.to_string(), lease.to_string(), name.to_string()))
            .cloned()
    }

    /// Forgets the uploads of build `id`.
    pub fn forget_uploads(&self, id: &str) {
        self.uploads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(b, _, _), _| b != id);
    }

    /// Says that work was queued.
    pub fn notify_work(&self) {
        let (lock, cv) = &self.work;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        cv.notify_all();
    }

    /// Waits until work is queued, at most `timeout`.
    pub fn wait_for_work(&self, timeout: Duration) {
        let (lock, cv) = &self.work;
        let seen = lock.lock().unwrap_or_else(|e| e.into_inner());
        let start = *seen;
        let _ = cv
            .wait_timeout_while(seen, timeout, |n| *n == start)
            .unwrap_or_else(|e| e.into_inner());
    }

    /// Notes that this server runs build `id`; the flag ends it.
    pub fn register(&self, id: &str) -> Arc<AtomicU8> {
        let flag = Arc::new(AtomicU8::new(runner::RUN));
        self.lock_running()
            .insert(id.to_string(), Arc::clone(&flag));
        flag
    }

    pub fn unregister(&self, id: &str) {
        self.lock_running().remove(id);
    }

    /// Ends build `id` when this server runs it (a remote worker learns it when it renews).
    pub fn stop(&self, id: &str) {
        if let Some(flag) = self.lock_running().get(id) {
            flag.store(runner::CANCEL, Ordering::SeqCst);
        }
    }

    /// Stops taking builds and ends the running ones without reporting them (the next start
    /// queues them again); waits for them at most `timeout`.
    pub fn shut_down(&self, timeout: Duration) {
        self.stopping.store(true, Ordering::SeqCst);
        self.notify_work();
        for flag in self.lock_running().values() {
            flag.store(runner::SHUT_DOWN, Ordering::SeqCst);
        }
        let until = std::time::Instant::now() + timeout;
        while !self.lock_running().is_empty() && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A worker's report that build `id` ended: for a success each artifact must be what it
    /// uploaded and what the build's metadata lists, or the build fails (`artifact-mismatch`).
    /// `None` when `lease` is not (any more) the build's; else the state recorded and the
    /// problem found.
    pub fn finish_remote(
        &self,
        id: &str,
        lease: &str,
        state: String,
        error: Option<serde_json::Value>,
        artifacts: Vec<store::Artifact>,
    ) -> Result<Option<(String, Option<String>)>> {
        let _one_at_a_time = self.finishing.lock().unwrap_or_else(|e| e.into_inner());
        if !self.store.holds(id, lease)? {
            return Ok(None);
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(a) = artifacts.iter().find(|a| !seen.insert(a.name.as_str())) {
            anyhow::bail!("the worker reported {} twice", a.name);
        }
        let build = self.build_files(id)?;
        let up = format!("up-{lease}");
        let mut problem = None;
        if state == "succeeded" {
            if build.kind(&up)?.is_none() {
                build.create_subdir(&up, 0o700)?;
            }
            let dir = build.open_subdir(&up)?;
            for a in &artifacts {
                let got = match self.upload(id, lease, &a.name) {
                    Some(got) => Some(got),
                    // Uploaded before this server restarted: hash the file again.
                    None => hash_file(&dir, &a.name)?,
                };
                match got {
                    Some((size, sha)) if size == a.size && sha == a.sha256 => {}
                    Some((size, sha)) => {
                        problem = Some(format!(
                            "{}: {size} bytes with sha256 {sha} arrived; the worker reported {} \
                             bytes, {}",
                            a.name, a.size, a.sha256
                        ));
                        break;
                    }
                    None => {
                        problem = Some(format!("{} was reported but never uploaded", a.name));
                        break;
                    }
                }
            }
            if problem.is_none() {
                let spec = self.store.build_spec(id)?.unwrap_or_default();
                problem = runner::metadata_problem(&dir, &artifacts, &spec);
            }
        }
        let (state, error, artifacts) = match (state.as_str(), &problem) {
            ("succeeded", None) => (state, None, artifacts),
            ("succeeded", Some(p)) => (
                "failed".to_string(),
                Some(serde_json::json!({"kind": "artifact-mismatch", "message": p})),
                Vec::new(),
            ),
            _ => (state, error, Vec::new()),
        };
        if !self.store.holds(id, lease)? {
            return Ok(None);
        }
        if state == "succeeded" {
            build.remove_all("out")?;
            build.commit(&up, "out")?;
        }
        if !self
            .store
            .finish(id, lease, &state, error.as_ref(), &artifacts)?
        {
            return Ok(None);
        }
        build.remove_all(&up)?;
        self.forget_uploads(id);
        let line = match &problem {
            Some(p) => format!("debimg serve: the build's artifacts are refused: {p}\n"),
            None => format!("debimg serve: {state}\n"),
        };
        self.log_line(id, line.as_bytes());
        self.after_build(id);
        Ok(Some((state, problem)))
    }

    /// Checks a claimed build's spec again, against the isolation in force now (a build
    /// queued under `--isolation untrusted` may be claimed after a restart with `host`): a
    /// spec the server would not accept now fails, unbuilt, with the reason. True when the
    /// build may go on.
    pub fn admit(&self, claim: &store::Claim) -> Result<bool> {
        let Err(refusal) = check_spec(&claim.spec, claim.trusted, self.config.isolation) else {
            return Ok(true);
        };
        let error = serde_json::json!({
            "kind": "invalid-spec",
            "message": format!(
                "refused when claimed: {} (it was accepted under --isolation {}; this server \
                 now runs with --isolation {})",
                refusal.error,
                claim.isolation,
                self.config.isolation.as_str()
            ),
            "problems": refusal.problems,
        });
        if let Ok(mut log) = self.open_log(&claim.build_id) {
            runner::append(
                &mut log,
                format!(
                    "debimg serve: {}\n",
                    error["message"].as_str().unwrap_or("")
                )
                .as_bytes(),
            );
        }
        if self
            .store
            .finish(&claim.build_id, &claim.lease, "failed", Some(&error), &[])?
        {
            self.after_build(&claim.build_id);
        }
        Ok(false)
    }

    /// Removes the files of build `id` (its record is gone).
    pub fn remove_build_files(&self, id: &str) {
        if !is_build_id(id) {
            return;
        }
        if let Err(e) = self
            .state
            .open_subdir("builds")
            .and_then(|b| b.remove_all(id))
        {
            tracing::error!("removing the files of build {id}: {e:#}");
        }
    }

    fn lock_running(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<AtomicU8>>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// After build `id` ended (or a job of it was cancelled): post-creation for the jobs that
    /// are finished and have not had it, then the files of builds no job wants any more.
    pub fn after_build(&self, id: &str) {
        // A build that ended frees its owner's turn: a build that waited for it may run now
        // (its message may have been taken while it waited).
        match self.store.queued_builds() {
            Ok(q) if !q.is_empty() => self.queued(&q[0]),
            _ => {}
        }
        if let Some(cmd) = &self.config.post_creation {
            match self.store.take_post_creation(id) {
                Ok(jobs) => {
                    for job in jobs {
                        self.post_creation(cmd, id, &job);
                    }
                }
                Err(e) => tracing::error!("build {id}: post-creation: {e:#}"),
            }
        }
        self.collect_garbage(false);
    }

    fn post_creation(&self, cmd: &str, build_id: &str, job: &store::PendingJob) {
        let out = self
            .config
            .state_dir
            .join("builds")
            .join(build_id)
            .join("out");
        let started = std::time::Instant::now();
        let out = out.display().to_string();
        let result = hook::run(
            cmd,
            &[
                ("DEBIMG_JOB_ID", &job.id),
                ("DEBIMG_JOB_STATE", &job.state),
                ("DEBIMG_JOB_NAME", &job.name),
                ("DEBIMG_JOB_EMAIL", &job.email),
                ("DEBIMG_BUILD_ID", build_id),
                ("DEBIMG_ARTIFACT_DIR", &out),
            ],
            self.config.post_creation_timeout,
        );
        // The output is the admin's command's: the job shows it to admins alone.
        let report = match result {
            Ok(r) => {
                let mut output = runner::tail_lines(&r.output, 20);
                if r.timed_out {
                    output.push(format!(
                        "debimg serve: the command did not end within {} s and was killed",
                        self.config.post_creation_timeout.as_secs()
                    ));
                }
                serde_json::json!({
                    "ok": r.success,
                    "exit_code": r.exit_code,
                    "timed_out": r.timed_out,
                    "seconds": started.elapsed().as_secs_f64(),
                    "output": output,
                })
            }
            Err(e) => serde_json::json!({
                "ok": false,
                "exit_code": null,
                "output": [format!("could not run /bin/sh: {e}")],
            }),
        };
        let line = format!(
            "debimg serve: post-creation for a {} job: {}\n",
            job.state,
            if report["ok"] == true {
                "ok".to_string()
            } else {
                format!("FAILED (exit {})", report["exit_code"])
            }
        );
        if report["ok"] != true {
            tracing::warn!("{}", line.trim_end());
        }
        self.log_line(build_id, line.as_bytes());
        if let Err(e) = self.store.set_post_creation(&job.id, &report) {
            tracing::error!("job {}: recording post-creation: {e:#}", job.id);
        }
    }

    /// Removes the records and files of builds no job refers to; with `unknown`, also the
    /// directories of builds the store does not know (at start, before any worker runs: a
    /// record deleted just before a crash left them).
    pub fn collect_garbage(&self, unknown: bool) {
        let run = || -> Result<()> {
            let orphans = self.store.orphan_builds()?;
            let builds = self.state.open_subdir("builds")?;
            if unknown {
                let known: std::collections::HashSet<String> =
                    self.store.build_ids()?.into_iter().collect();
                for name in builds.entries()? {
                    let Some(name) = name.to_str() else { continue };
                    if is_build_id(name) && !known.contains(name) {
                        builds.remove_all(name)?;
                    }
                }
            }
            for id in orphans {
                builds.remove_all(&id)?;
            }
            Ok(())
        };
        if let Err(e) = run() {
            tracing::error!("removing the files of deleted jobs: {e:#}");
        }
    }

    /// Deletes the jobs that ended longer than `keep` ago, and the files of builds no job
    /// wants any more.
    pub fn expire_jobs(&self, keep: Duration) {
        let before = store::now() - keep.as_secs() as i64;
        match self.store.expire_jobs(before) {
            Ok(builds) => {
                for id in &builds {
                    self.remove_build_files(id);
                }
                if !builds.is_empty() {
                    tracing::info!(
                        "deleted the jobs of {} builds that ended long ago",
                        builds.len()
                    );
                }
            }
            Err(e) => tracing::error!("the job store: {e:#}"),
        }
    }

    /// Gives builds of vanished workers back to the queue (or fails them), every few seconds.
    pub fn start_reaper(self: &Arc<Self>) {
        let service = Arc::clone(self);
        std::thread::spawn(move || {
            let mut last_expiry: Option<std::time::Instant> = None;
            loop {
                std::thread::sleep(Duration::from_secs(5));
                if let Some(keep) = service.config.keep_jobs
                    && last_expiry.is_none_or(|t| t.elapsed() >= Duration::from_secs(60))
                {
                    last_expiry = Some(std::time::Instant::now());
                    service.expire_jobs(keep);
                }
                match service
                    .store
                    .requeue_lost(service.config.max_attempts, None)
                {
                    Ok((requeued, failed)) => {
                        for id in &requeued {
                            tracing::warn!(
                                "build {id}: its worker stopped answering; queued again"
                            );
                            service.queued(id);
                        }
                        for id in &failed {
                            service.after_build(id);
                        }
                    }
                    Err(e) => tracing::error!("the job store: {e:#}"),
                }
            }
        });
    }
}

/// The size and sha256 of the regular file at `rel` in `dir`, when there is one.
fn hash_file(dir: &OutputDir, rel: &str) -> Result<Option<(u64, String)>> {
    let Some((mut f, _)) = dir.open_regular_at(rel)? else {
        return Ok(None);
    };
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok(Some((
        size,
        h.finalize().iter().map(|b| format!("{b:02x}")).collect(),
    )))
}

/// Checks a build's artifacts against its metadata (the artifact that is the metadata file):
/// every image, file and attachment it lists is an artifact of that size and sha256, and every
/// other artifact is one it lists.
pub fn check_against_metadata(
    artifacts: &[store::Artifact],
    metadata_name: &str,
    metadata_text: &str,
    spec: &Spec,
) -> Result<(), String> {
    let meta = crate::metadata::Metadata::from_yaml(metadata_text)
        .map_err(|e| format!("{metadata_name} is not a debimg metadata file: {e:#}"))?;
    // The report is of this build: its name, kind and packages are the spec's, and its digest
    // is a plan's (the plan itself folds in the worker's mirrors and debimg's version, which
    // the server cannot know).
    let digest_ok =
        meta.spec_digest.len() == 64 && meta.spec_digest.bytes().all(|b| b.is_ascii_hexdigit());
    let mismatch = if meta.name != spec.name {
        Some(format!(
            "the name `{}`, not the spec's `{}`",
            meta.name, spec.name
        ))
    } else if meta.kind != spec.kind.name() {
        Some(format!(
            "the kind `{}`, not the spec's `{}`",
            meta.kind,
            spec.kind.name()
        ))
    } else if meta.packages != spec.all_packages() {
        Some(format!(
            "the packages {:?}, not the spec's {:?}",
            meta.packages,
            spec.all_packages()
        ))
    } else if !digest_ok {
        Some(format!(
            "the spec digest `{}`, which is no sha256",
            meta.spec_digest
        ))
    } else {
        None
    };
    if let Some(m) = mismatch {
        return Err(format!("{metadata_name} is not of this build: it has {m}"));
    }
    let mut listed: HashMap<&str, (u64, &str)> = HashMap::new();
    for i in &meta.images {
        listed.insert(&i.container_name, (i.container_size, &i.container_sha256));
    }
    for f in &meta.files {
        listed.insert(&f.name, (f.size, &f.sha256));
    }
    for a in &meta.attachments {
        listed.insert(&a.file, (a.size, &a.sha256));
    }
    for a in artifacts {
        if a.name == metadata_name {
            continue;
        }
        match listed.remove(a.name.as_str()) {
            Some((size, sha)) if size == a.size && sha == a.sha256 => {}
            Some((size, sha)) => {
                return Err(format!(
                    "{} has {} bytes and sha256 {}; {metadata_name} says {size} bytes, {sha}",
                    a.name, a.size, a.sha256
                ));
            }
            None => return Err(format!("{} is not in {metadata_name}", a.name)),
        }
    }
    if let Some(name) = listed.keys().next() {
        return Err(format!(
            "{name}, listed in {metadata_name}, was not delivered"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_follows_the_spec_not_its_spelling() {
        let a = check_spec(
            "version: 1\nname: m\nsuite: bookworm\nkind: tarball\n",
            false,
            Isolation::Host,
        )
        .unwrap();
        let b = check_spec(
            "# same\nname: m\nkind: tarball\nversion: 1\nsuite: 'bookworm'\n",
            false,
            Isolation::Host,
        )
        .unwrap();
        let c = check_spec(
            "version: 1\nname: n\nsuite: bookworm\nkind: tarball\n",
            false,
            Isolation::Host,
        )
        .unwrap();
        assert_eq!(a.digest, b.digest);
        assert_ne!(a.digest, c.digest);
    }

    #[test]
    fn host_sources_with_files_or_passwords_are_not_for_strangers() {
        let src = |uri: &str| crate::debian::mirror::HostSource {
            uri: uri.into(),
            suites: vec!["bookworm".into()],
        };
        assert_eq!(
            sources_problem(&[src("http://mirror.example/debian")]),
            None
        );
        assert!(
            sources_problem(&[src("http://mirror.example/debian"), src("file:/srv/repo")])
                .is_some()
        );
        assert!(sources_problem(&[src("https://u:p@mirror.example/debian")]).is_some());
        // An @ in the path is no credential.
        assert_eq!(sources_problem(&[src("https://mirror.example/a@b")]), None);
    }

    #[test]
    fn a_state_directory_others_can_change_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("state");
        prepare_state_dir(&dir).unwrap();
        assert_eq!(
            std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = prepare_state_dir(&dir).unwrap_err().to_string();
        assert!(e.contains("writable by group or others"), "{e}");
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        assert!(
            prepare_state_dir(&link)
                .unwrap_err()
                .to_string()
                .contains("symbolic link")
        );
    }

    #[test]
    fn artifacts_must_be_what_the_metadata_lists() {
        let meta = crate::metadata::Metadata {
            name: "m".into(),
            debimg_version: "0".into(),
            spec_digest: "d".repeat(64),
            source_date_epoch: None,
            bootstrap: String::new(),
            build_start: String::new(),
            build_end: String::new(),
            images: Vec::new(),
            repos: Vec::new(),
            packages: Vec::new(),
            installed: Default::default(),
            kind: "tarball".into(),
            files: vec![crate::metadata::FileMeta {
                name: "m.tar.gz".into(),
                size: 3,
                sha256: "aa".into(),
            }],
            attachments: Vec::new(),
        };
        let text = meta.to_yaml().unwrap();
        let spec = Spec::from_yaml(
            "version: 1\nname: m\nsuite: bookworm\nkind: tarball\n",
            "spec",
        )
        .unwrap();
        let art = |name: &str, size, sha: &str| store::Artifact {
            name: name.into(),
            size,
            sha256: sha.into(),
        };
        let meta_art = art("m.yaml", text.len() as u64, "ff");
        let good = [art("m.tar.gz", 3, "aa"), meta_art.clone()];
        assert_eq!(
            check_against_metadata(&good, "m.yaml", &text, &spec),
            Ok(())
        );
        let changed = [art("m.tar.gz", 3, "ab"), meta_art.clone()];
        assert!(
            check_against_metadata(&changed, "m.yaml", &text, &spec)
                .unwrap_err()
                .contains("ab")
        );
        let extra = [
            art("m.tar.gz", 3, "aa"),
            art("x", 1, "00"),
            meta_art.clone(),
        ];
        assert!(
            check_against_metadata(&extra, "m.yaml", &text, &spec)
                .unwrap_err()
                .contains("x is not in")
        );
        let missing = [meta_art];
        assert!(
            check_against_metadata(&missing, "m.yaml", &text, &spec)
                .unwrap_err()
                .contains("not delivered")
        );
        // A report whose metadata is not of this build: another name, a made-up digest.
        for (field, value) in [("name", "x"), ("spec_digest", "x"), ("kind", "disk")] {
            let mut forged = meta.clone();
            match field {
                "name" => forged.name = value.into(),
                "kind" => forged.kind = value.into(),
                _ => forged.spec_digest = value.into(),
            }
            let text = forged.to_yaml().unwrap();
            let e = check_against_metadata(&good, "m.yaml", &text, &spec).unwrap_err();
            assert!(e.contains("not of this build"), "{field}: {e}");
        }
    }

    #[test]
    fn internal_addresses_are_named() {
        for uri in [
            "http://127.0.0.1:8080/debian",
            "http://localhost/debian",
            "http://api.localhost./x",
            "http://169.254.169.254/latest/meta-data",
            "http://10.0.2.2:8080/api/v1/jobs",
            "http://192.168.1.5/debian",
            "http://172.20.0.1/debian",
            "http://100.64.0.1/debian",
            "http://[::1]:8080/",
            "http://[fe80::1]/",
            "http://[fd00::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://user:pw@127.0.0.1/",
            "http://2130706433/",
            "http://0x7f.1/",
            "http://0.0.0.0/",
        ] {
            assert!(internal_address(uri).is_some(), "{uri}");
        }
        for uri in [
            "http://deb.example.org/debian",
            "https://8.8.8.8/debian",
            "http://[2001:db8::1]/",
            "http://mirror.example/deb@1",
            "http://cafe.de/debian",
            "http://bad.face/debian",
        ] {
            assert_eq!(internal_address(uri), None, "{uri}");
        }
        let spec = "version: 1\nname: m\nsuite: bookworm\nkind: tarball\nmirror: http://169.254.169.254/debian\nrepos:\n  - name: x\n    uri: http://127.0.0.1:8080/x\n    suite: bookworm\n    trusted: true\n";
        let r = check_spec(spec, false, Isolation::Untrusted).unwrap_err();
        let fields: Vec<&str> = r.problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            ["mirror", "repos[0].uri", "repos[0].trusted"],
            "{r:?}"
        );
        assert!(check_spec(spec, true, Isolation::Host).is_ok());
    }

    #[test]
    fn untrusted_specs_may_not_read_host_files() {
        let text = "version: 1\nname: m\nsuite: bookworm\nkind: tarball\nfiles:\n  - dest: /etc/x\n    source: /etc/shadow\n";
        let r = check_spec(text, false, Isolation::Host).unwrap_err();
        assert!(
            r.problems.iter().any(|p| p.field == "files[0].source"),
            "{r:?}"
        );
        assert!(check_spec(text, true, Isolation::Host).is_ok());
        assert!(check_spec(text, false, Isolation::Untrusted).is_ok());
        let bad = check_spec(
            "version: 1\nname: m\nsuite: bookworm\nimages: 3\n",
            true,
            Isolation::Host,
        )
        .unwrap_err();
        assert!(!bad.problems.is_empty());
    }
}
