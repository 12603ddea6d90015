//! Running one build: a `debimg build --message-format json` child in its own process group,
//! its stderr the job's log, its stdout the build's events; and the local workers of `serve`,
//! which claim builds from the store and run them so.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::Value;

use super::store::Artifact;
use super::{Service, renew_secs};

/// The flag of a running local build: run on.
pub const RUN: u8 = 0;
/// ... cancelled.
pub const CANCEL: u8 = 1;
/// ... the server stops: end it unreported (the next start queues it again).
pub const SHUT_DOWN: u8 = 2;

/// What the one who runs a build tells it, asked about once a second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Continue,
    /// End the build (TERM to its process group): it was cancelled.
    Cancel,
    /// End the build: the lease is lost, another worker has (or will have) it.
    Lost,
}

/// How a build child ended.
#[derive(Debug)]
pub struct ChildResult {
    pub status: ExitStatus,
    /// `built`, `reused` or `failed`, from the build-finished event.
    pub outcome: Option<String>,
    pub error: Option<Value>,
    /// The artifacts it reported: (artifact, its path).
    pub artifacts: Vec<(Artifact, PathBuf)>,
    /// Why it was stopped, when it was.
    pub stopped: Option<Control>,
}

impl ChildResult {
    /// Whether the build published (or reused) its outputs.
    pub fn succeeded(&self) -> bool {
        self.status.success() && matches!(self.outcome.as_deref(), Some("built" | "reused"))
    }
}

/// The command that builds `spec` into `out`, with the allowlisted environment alone (a
/// worker's token, the AMQP URL and whatever else the server holds never reach a build).
pub fn build_command(
    debimg: &Path,
    spec: &Path,
    out: &Path,
    cache_dir: &Path,
    build_dir: &Path,
    isolation: &[&str],
) -> Command {
    let mut cmd = Command::new(debimg);
    crate::environ::clean(&mut cmd);
    cmd.arg("build")
        .args(isolation)
        .arg(spec)
        .arg("--output")
        .arg(out)
        .arg("--message-format")
        .arg("json")
        // An earlier attempt of this build, ended with its worker, may still be unwinding.
        .arg("--wait")
        .arg("--cache-dir")
        .arg(cache_dir)
        .arg("--build-dir")
        .arg(build_dir);
    cmd
}

enum Msg {
    Log(Vec<u8>),
    Event(Value),
}

/// Runs `cmd` (a `debimg build --message-format json`) in its own process group: its stderr
/// and anything on stdout that is not an event go to `log`, stages to `stage`; `control` is
/// asked once a second and may end the build (TERM to the group, KILL after `grace`).
pub fn run_child(
    mut cmd: Command,
    grace: Duration,
    log: &mut dyn FnMut(&[u8]),
    stage: &mut dyn FnMut(&str),
    control: &mut dyn FnMut() -> Control,
) -> Result<ChildResult> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    // The build ends (and unwinds: TERM) when the thread that runs it dies with its process.
    crate::cmd::die_with_parent(&mut cmd, libc::SIGTERM);
    let mut guard = Reaped(
        cmd.spawn()
            .with_context(|| format!("starting {:?}", cmd.get_program()))?,
    );
    let child = &mut guard.0;
    let pgid = Pid::from_raw(child.id() as i32);
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let out_tx = tx.clone();
    let readers = [
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).split(b'\n') {
                let Ok(line) = line else { break };
                let msg = match serde_json::from_slice::<Value>(&line) {
                    Ok(v) if v.get("reason").is_some() => Msg::Event(v),
                    _ => Msg::Log([line, b"\n".to_vec()].concat()),
                };
                if out_tx.send(msg).is_err() {
                    break;
                }
            }
        }),
        std::thread::spawn(move || {
            let mut r = BufReader::new(stderr);
            let mut buf = vec![0u8; 16384];
            loop {
                match r.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if tx.send(Msg::Log(buf[..n].to_vec())).is_err() {
                            break;
                        }
                    }
                }
            }
        }),
    ];
    let mut result = ChildResult {
        status: ExitStatus::default(),
        outcome: None,
        error: None,
        artifacts: Vec::new(),
        stopped: None,
    };
    let mut last_control = Instant::now();
    let mut term_sent: Option<Instant> = None;
    let mut streams_open = true;
    let status = loop {
        if streams_open {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(Msg::Log(bytes)) => log(&bytes),
                Ok(Msg::Event(v)) => take_event(&v, &mut result, stage),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => streams_open = false,
            }
        } else {
            std::thread::sleep(Duration::from_millis(200));
        }
        if let Some(status) = child.try_wait()? {
            if !streams_open {
                break status;
            }
            // Drain what the readers still hold (a grandchild may keep a pipe open: give up
            // on it after a moment).
            let until = Instant::now() + Duration::from_secs(5);
            while let Ok(msg) = rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
                match msg {
                    Msg::Log(bytes) => log(&bytes),
                    Msg::Event(v) => take_event(&v, &mut result, stage),
                }
            }
            break status;
        }
        if last_control.elapsed() >= Duration::from_secs(1) {
            last_control = Instant::now();
            if result.stopped.is_none() {
                let c = control();
                if c != Control::Continue {
                    result.stopped = Some(c);
                    let _ = killpg(pgid, Signal::SIGTERM);
                    term_sent = Some(Instant::now());
                }
            }
        }
        if term_sent.is_some_and(|t| t.elapsed() > grace) {
            let _ = killpg(pgid, Signal::SIGKILL);
            term_sent = None;
        }
    };
    drop(rx);
    for r in readers {
        if r.is_finished() {
            let _ = r.join();
        }
    }
    result.status = status;
    Ok(result)
}

/// A build child that is killed with its process group and reaped when it is left running (an
/// error or a panic on the way out of [`run_child`]): no build outlives the one who ran it.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = killpg(Pid::from_raw(self.0.id() as i32), Signal::SIGKILL);
            let _ = self.0.wait();
        }
    }
}

fn take_event(v: &Value, result: &mut ChildResult, stage: &mut dyn FnMut(&str)) {
    let s = |k: &str| v.get(k).and_then(Value::as_str);
    match s("reason") {
        Some("stage-started") => {
            if let Some(name) = s("stage") {
                stage(name);
            }
        }
        Some("artifact") => {
            if let (Some(name), Some(path), Some(size), Some(sha256)) = (
                s("name"),
                s("path"),
                v.get("size").and_then(Value::as_u64),
                s("sha256"),
            ) {
                result.artifacts.push((
                    Artifact {
                        name: name.to_string(),
                        size,
                        sha256: sha256.to_string(),
                    },
                    PathBuf::from(path),
                ));
            }
        }
        Some("build-finished") => {
            result.outcome = s("outcome").map(str::to_string);
            result.error = v.get("error").cloned();
        }
        _ => {}
    }
}

/// The last `n` lines of a log.
pub fn tail_lines(log: &[u8], n: usize) -> Vec<String> {
    let text = String::from_utf8_lossy(log);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| l.to_string())
        .collect()
}

/// The error a failed build is shown with: the build's own report (kind, stage, message) or,
/// when it reported none, what its exit says; with the last lines of its log.
pub fn failure(result: &ChildResult, log_tail: Vec<String>) -> Value {
    let mut e = result.error.clone().unwrap_or_else(|| {
        serde_json::json!({
            "kind": "failed",
            "message": match result.status.code() {
                Some(c) => format!("debimg build exited with status {c} without reporting why"),
                None => format!("debimg build was ended by {}", result.status),
            },
        })
    });
    if let Some(obj) = e.as_object_mut() {
        obj.insert("log_tail".into(), serde_json::json!(log_tail));
    }
    e
}

/// Starts `n` local workers; each claims the oldest queued build and runs it on this host.
pub fn start_local_workers(service: &Arc<Service>, n: usize) {
    for i in 0..n {
        let service = Arc::clone(service);
        let name = format!("{}{}", service.local_prefix, i + 1);
        std::thread::Builder::new()
            .name(format!("worker-{}", i + 1))
            .spawn(move || local_worker(&service, &name))
            .expect("starting a worker thread");
    }
}

fn local_worker(service: &Service, name: &str) {
    loop {
        if service.stopping.load(Ordering::SeqCst) {
            return;
        }
        match service
            .store
            .claim_next(name, service.config.lease_secs, &service.config.limits)
        {
            Ok(Some(claim)) => {
                let id = claim.build_id.clone();
                match service.admit(&claim) {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(e) => {
                        tracing::error!("build {id}: {e:#}");
                        continue;
                    }
                }
                if let Err(e) = run_local(service, name, claim) {
                    tracing::error!("build {id}: {e:#}");
                }
            }
            Ok(None) => service.wait_for_work(Duration::from_secs(2)),
            Err(e) => {
                tracing::error!("the job store: {e:#}");
                std::thread::sleep(Duration::from_secs(2));
            }
        }
    }
}

fn run_local(service: &Service, worker: &str, claim: super::store::Claim) -> Result<()> {
    let id = claim.build_id.clone();
    let dir = service.build_files(&id)?;
    dir.write_file("spec.yaml", claim.spec.as_bytes(), 0o600)?;
    let mut log = service.open_log(&id)?;
    let header = format!(
        "debimg serve: build {id}, attempt {}, on worker {worker}\n",
        claim.attempt
    );
    append(&mut log, header.as_bytes());
    let cfg = &service.config;
    let cmd = build_command(
        &cfg.debimg,
        &dir.join("spec.yaml"),
        &dir.join("out"),
        &cfg.cache_dir,
        &cfg.build_dir,
        &cfg.isolation.build_args(claim.trusted),
    );
    let cancel = service.register(&id);
    let mut last_renew = Instant::now();
    let result = run_child(
        cmd,
        Duration::from_secs(300),
        &mut |bytes| append_capped(&mut log, bytes),
        &mut |stage| {
            let _ = service.store.set_stage(&id, &claim.lease, stage);
        },
        &mut || {
            match cancel.load(Ordering::SeqCst) {
                CANCEL => return Control::Cancel,
                SHUT_DOWN => return Control::Lost,
                _ => {}
            }
            if last_renew.elapsed() >= Duration::from_secs(renew_secs(cfg.lease_secs)) {
                last_renew = Instant::now();
                match service.store.renew(&id, &claim.lease, cfg.lease_secs) {
                    Ok(None) => return Control::Lost,
                    Ok(Some(true)) => return Control::Cancel,
                    _ => {}
                }
            }
            Control::Continue
        },
    );
    service.unregister(&id);
    let result = result?;
    if result.stopped == Some(Control::Lost) {
        append(
            &mut log,
            b"debimg serve: this attempt was ended before it finished; it is not reported\n",
        );
        return Ok(());
    }
    let (state, error, artifacts) = if result.succeeded() {
        let out = dir.open_subdir("out")?;
        let artifacts: Vec<Artifact> = result.artifacts.iter().map(|(a, _)| a.clone()).collect();
        let mut problem = None;
        for a in &artifacts {
            match out.open_regular_at(&a.name)? {
                Some((_, st)) if st.st_size as u64 == a.size => {}
                _ => {
                    problem = Some(format!(
                        "{} is not in the output directory as reported",
                        a.name
                    ))
                }
            }
        }
        if problem.is_none() {
            problem = metadata_problem(&out, &artifacts, &claim.spec);
        }
        match problem {
            None => ("succeeded", None, artifacts),
            Some(p) => (
                "failed",
                Some(serde_json::json!({"kind": "artifact-mismatch", "message": p})),
                Vec::new(),
            ),
        }
    } else if result.stopped == Some(Control::Cancel) {
        append(&mut log, b"debimg serve: cancelled\n");
        ("cancelled", None, Vec::new())
    } else {
        let tail = tail_lines(&service.read_log_tail(&id, 8192), 20);
        ("failed", Some(failure(&result, tail)), Vec::new())
    };
    if !service
        .store
        .finish(&id, &claim.lease, state, error.as_ref(), &artifacts)?
    {
        append(
            &mut log,
            b"debimg serve: the lease was lost before the end; not reported\n",
        );
        return Ok(());
    }
    service.after_build(&id);
    Ok(())
}

/// What is wrong with `artifacts` against the metadata file in `out` of a build of `spec`
/// (YAML), if anything.
pub fn metadata_problem(
    out: &crate::output::OutputDir,
    artifacts: &[Artifact],
    spec: &str,
) -> Option<String> {
    let spec = match crate::spec::Spec::from_yaml(spec, "spec") {
        Ok(s) => s,
        Err(e) => return Some(format!("the build's spec no longer parses: {e}")),
    };
    let meta_name = format!("{}.yaml", spec.name);
    let Some(meta) = artifacts.iter().find(|a| a.name == meta_name) else {
        return Some(format!(
            "the build delivered no metadata file ({meta_name})"
        ));
    };
    let text = match out.open_regular_at(&meta.name) {
        Ok(Some((mut f, _))) => {
            let mut s = String::new();
            if let Err(e) = f.read_to_string(&mut s) {
                return Some(format!("reading {}: {e}", meta.name));
            }
            s
        }
        _ => return Some(format!("{} is missing", meta.name)),
    };
    super::check_against_metadata(artifacts, &meta.name, &text, &spec).err()
}

/// Appends to a log; a full disk loses log lines, not the build.
pub fn append(log: &mut std::fs::File, bytes: &[u8]) {
    use std::io::Write;
    if let Err(e) = log.write_all(bytes) {
        tracing::warn!("writing a build log: {e}");
    }
}

/// Appends to a log of at most [`super::MAX_LOG_BYTES`]: what would go beyond is dropped, and
/// the log says so once.
pub fn append_capped(log: &mut std::fs::File, bytes: &[u8]) {
    use std::io::Seek;
    let note = b"\ndebimg serve: the log is full; the rest of it is dropped\n";
    // The content stops where the note still fits under the cap.
    let limit = super::MAX_LOG_BYTES - note.len() as u64;
    let len = log.seek(std::io::SeekFrom::End(0)).unwrap_or(0);
    if len >= limit {
        return;
    }
    let room = (limit - len) as usize;
    if bytes.len() <= room {
        append(log, bytes);
    } else {
        append(log, &bytes[..room]);
        append(log, note);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_left_running_by_a_panic_is_killed_and_reaped() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(format!("echo $$ > {}; exec sleep 60", pid_file.display()));
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_child(
                cmd,
                Duration::from_secs(1),
                &mut |_| {},
                &mut |_| {},
                &mut || panic!("the one who runs the build fails"),
            )
        }));
        assert!(run.is_err());
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        let proc = PathBuf::from(format!("/proc/{}", pid.trim()));
        assert!(
            !proc.exists(),
            "the build child {} outlived run_child",
            pid.trim()
        );
    }

    #[test]
    fn a_capped_log_says_it_is_full() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&path)
            .unwrap();
        f.set_len(super::super::MAX_LOG_BYTES - 1000).unwrap();
        append_capped(&mut f, &[b'x'; 500]);
        assert_eq!(
            f.metadata().unwrap().len(),
            super::super::MAX_LOG_BYTES - 500
        );
        append_capped(&mut f, &[b'x'; 2000]);
        append_capped(&mut f, b"more\n");
        let len = std::fs::metadata(&path).unwrap().len();
        assert_eq!(len, super::super::MAX_LOG_BYTES);
        let text = std::fs::read(&path).unwrap();
        assert!(String::from_utf8_lossy(&text[text.len() - 80..]).contains("the log is full"));
    }
}
