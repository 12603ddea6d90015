//! The client of `debimg serve`: [`Client`], and the commands `debimg submit` ([`submit`]) and
//! `debimg jobs` ([`jobs`]).

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::url::segment;
use crate::error::Error;
use crate::output::OutputDir;

/// `debimg submit`: the spec submitted and the job's id printed; with `--follow` its log
/// streamed on stderr, with `--download` its artifacts fetched and their paths printed, and
/// then the exit code its outcome stands for ([`exit_code`]; 0 when not waited for).
pub fn submit(args: &SubmitArgs) -> Result<u8, Error> {
    let server = &args.server;
    let client = Client::new(&server.server, &server.token)?;
    let text = crate::spec::Spec::read_text(&args.spec)?;
    let job = client.submit(&text, args.name.as_deref(), args.email.as_deref())?;
    let id = job["id"].as_str().unwrap_or_default().to_string();
    println!("{id}");
    if !args.follow && args.download.is_none() {
        return Ok(0);
    }
    let job = if args.follow {
        client.follow(&id, &mut std::io::stderr())?
    } else {
        wait_for(&client, &id)?
    };
    report_end(&job);
    if let Some(dir) = &args.download
        && job["state"] == "succeeded"
    {
        for p in client.download(&id, dir)? {
            println!("{}", p.display());
        }
    }
    Ok(exit_code(&job))
}

/// `debimg jobs`: the action's result on stdout (a job's end, a cancel or a delete said on
/// stderr); the exit code a followed job's outcome stands for, else 0.
pub fn jobs(server: &ServerArgs, action: &JobsAction) -> Result<u8, Error> {
    let client = Client::new(&server.server, &server.token)?;
    let pretty = |v: &Value| serde_json::to_string_pretty(v).unwrap_or_default();
    match action {
        JobsAction::List { state, json } => {
            let jobs = client.jobs(state.as_deref())?;
            if *json {
                println!("{}", pretty(&Value::Array(jobs)));
            } else {
                for j in jobs {
                    let s = |k: &str| j[k].as_str().unwrap_or("-").to_string();
                    println!(
                        "{}\t{}\t{}\t{}\t{}",
                        s("id"),
                        s("state"),
                        s("stage"),
                        s("created"),
                        s("name")
                    );
                }
            }
        }
        JobsAction::Show { id } => println!("{}", pretty(&client.job(id)?)),
        JobsAction::Log { id, follow } => {
            if *follow {
                let job = client.follow(id, &mut std::io::stdout())?;
                report_end(&job);
                return Ok(exit_code(&job));
            }
            let log = client.log(id)?;
            let mut out = std::io::stdout();
            // On a terminal, what the build printed cannot drive it; a pipe gets the bytes.
            let shown = if std::io::IsTerminal::is_terminal(&out) {
                for_terminal(&String::from_utf8_lossy(&log)).into_bytes()
            } else {
                log
            };
            out.write_all(&shown).map_err(anyhow::Error::from)?;
        }
        JobsAction::Cancel { id } => {
            let job = client.cancel(id)?;
            eprintln!("job {id} {}", job["state"].as_str().unwrap_or("?"));
        }
        JobsAction::Delete { id } => {
            client.delete(id)?;
            eprintln!("job {id} deleted");
        }
        JobsAction::Download { id, dir } => {
            for p in client.download(id, dir)? {
                println!("{}", p.display());
            }
        }
    }
    Ok(0)
}

/// Polls job `id` until it ends.
fn wait_for(client: &Client, id: &str) -> Result<Value> {
    loop {
        let job = client.job(id)?;
        if matches!(
            job["state"].as_str(),
            Some("succeeded" | "failed" | "cancelled")
        ) {
            return Ok(job);
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// Says on stderr how a job ended, with its error.
fn report_end(job: &Value) {
    let state = job["state"].as_str().unwrap_or("?");
    let id = job["id"].as_str().unwrap_or("?");
    match state {
        "failed" => {
            let e = &job["error"];
            eprintln!(
                "job {id} failed{}: {}",
                e["stage"]
                    .as_str()
                    .map(|s| format!(" in stage `{s}`"))
                    .unwrap_or_default(),
                e["message"].as_str().unwrap_or("(no message)")
            );
        }
        _ => eprintln!("job {id} {state}"),
    }
}

/// A connection to a server, with a token.
pub struct Client {
    agent: ureq::Agent,
    base: String,
    token: String,
}

/// The exit code a finished job stands for: 0 when it succeeded, its error's code when it
/// failed (1 without one), 143 (as TERM) when it was cancelled.
pub fn exit_code(job: &Value) -> u8 {
    match job["state"].as_str() {
        Some("succeeded") => 0,
        Some("cancelled") => 143,
        _ => job["error"]["exit_code"]
            .as_u64()
            .and_then(|c| u8::try_from(c).ok())
            .filter(|&c| c != 0)
            .unwrap_or(1),
    }
}

impl Client {
    /// A client of the server at `server` (`http://host:port`).
    pub fn new(server: &str, token: &str) -> Result<Client> {
        let base = server.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            bail!("--server must be an http:// or https:// URL, not `{server}`");
        }
        if token.trim().is_empty() {
            bail!(
                "no token: give --token or set DEBIMG_TOKEN (`debimg serve token add NAME` makes one)"
            );
        }
        let agent = ureq::Agent::new_with_config(
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_connect(Some(Duration::from_secs(10)))
                .build(),
        );
        Ok(Client {
            agent,
            base,
            token: token.trim().to_string(),
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn auth(&self) -> String {
        format!("Bearer {}", self.token)
    }

    /// The JSON answer of a request, or an error saying what the server said.
    fn json(&self, resp: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Result<Value> {
        let mut resp = resp.with_context(|| format!("reaching the server {}", self.base))?;
        let status = resp.status();
        if status == ureq::http::StatusCode::NO_CONTENT {
            return Ok(Value::Null);
        }
        let text = resp
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_string()
            .context("reading the server's answer")?;
        if !status.is_success() {
            bail!("{}", describe_error(status.as_u16(), &text));
        }
        serde_json::from_str(&text).context("the server's answer is not JSON")
    }

    /// Submits a spec; returns the job.
    pub fn submit(&self, spec: &str, name: Option<&str>, email: Option<&str>) -> Result<Value> {
        let mut body = serde_json::json!({ "spec": spec });
        if let Some(n) = name {
            body["name"] = n.into();
        }
        if let Some(e) = email {
            body["email"] = e.into();
        }
        self.json(
            self.agent
                .post(self.url("/api/v1/jobs"))
                .header("Authorization", self.auth())
                .send_json(&body),
        )
    }

    /// The job `id`.
    pub fn job(&self, id: &str) -> Result<Value> {
        self.json(
            self.agent
                .get(self.url(&format!("/api/v1/jobs/{}", segment(id))))
                .header("Authorization", self.auth())
                .call(),
        )
    }

    /// The caller's jobs, optionally in one state, newest first: every page of them.
    pub fn jobs(&self, state: Option<&str>) -> Result<Vec<Value>> {
        let mut all = Vec::new();
        let mut before: Option<String> = None;
        loop {
            let mut req = self
                .agent
                .get(self.url("/api/v1/jobs"))
                .header("Authorization", self.auth())
                .query("limit", "1000");
            if let Some(s) = state {
                req = req.query("state", s);
            }
            if let Some(b) = &before {
                req = req.query("before", b);
            }
            let v = self.json(req.call())?;
            all.extend(v["jobs"].as_array().cloned().unwrap_or_default());
            match v["next"].as_str() {
                Some(next) if before.as_deref() != Some(next) => before = Some(next.to_string()),
                _ => return Ok(all),
            }
        }
    }

    /// Cancels job `id`; returns it.
    pub fn cancel(&self, id: &str) -> Result<Value> {
        self.json(
            self.agent
                .post(self.url(&format!("/api/v1/jobs/{}/cancel", segment(id))))
                .header("Authorization", self.auth())
                .send_empty(),
        )
    }

    /// Deletes job `id` and its files.
    pub fn delete(&self, id: &str) -> Result<()> {
        self.json(
            self.agent
                .delete(self.url(&format!("/api/v1/jobs/{}", segment(id))))
                .header("Authorization", self.auth())
                .call(),
        )?;
        Ok(())
    }

    /// The log of job `id` so far.
    pub fn log(&self, id: &str) -> Result<Vec<u8>> {
        let mut resp = self
            .agent
            .get(self.url(&format!("/api/v1/jobs/{}/log", segment(id))))
            .header("Authorization", self.auth())
            .call()
            .with_context(|| format!("reaching the server {}", self.base))?;
        let status = resp.status();
        let mut body = Vec::new();
        resp.body_mut()
            .with_config()
            .limit(1 << 30)
            .reader()
            .read_to_end(&mut body)?;
        if !status.is_success() {
            bail!(
                "{}",
                describe_error(status.as_u16(), &String::from_utf8_lossy(&body))
            );
        }
        Ok(body)
    }

    /// Writes the log of job `id` to `out` as it grows, until the job ends (reconnecting
    /// where it left off when the connection drops); returns the job as it ended.
    pub fn follow(&self, id: &str, out: &mut dyn Write) -> Result<Value> {
        let mut last_id: Option<String> = None;
        let mut failures = 0;
        loop {
            let mut req = self
                .agent
                .get(self.url(&format!("/api/v1/jobs/{}/log", segment(id))))
                .header("Authorization", self.auth())
                .header("Accept", "text/event-stream");
            if let Some(l) = &last_id {
                req = req.header("Last-Event-ID", l);
            }
            let ended = match req.call() {
                Ok(resp) if resp.status().is_success() => {
                    failures = 0;
                    let reader = BufReader::new(resp.into_body().into_reader());
                    read_events(reader, &mut last_id, out)?
                }
                Ok(mut resp) => {
                    let text = resp.body_mut().read_to_string().unwrap_or_default();
                    bail!("{}", describe_error(resp.status().as_u16(), &text));
                }
                Err(e) => {
                    failures += 1;
                    if failures > 10 {
                        return Err(e)
                            .with_context(|| format!("following the log at {}", self.base));
                    }
                    false
                }
            };
            if ended {
                return self.job(id);
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// Downloads every artifact of job `id` into `dir` (made when missing), checking each
    /// against its size and sha256; returns their paths.
    pub fn download(&self, id: &str, dir: &Path) -> Result<Vec<PathBuf>> {
        let job = self.job(id)?;
        if job["state"] != "succeeded" {
            bail!(
                "job {id} is {}: only a job that succeeded has artifacts",
                job["state"].as_str().unwrap_or("in an unknown state")
            );
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let top = OutputDir::open(dir)?;
        let mut paths = Vec::new();
        for a in job["artifacts"].as_array().cloned().unwrap_or_default() {
            let (Some(name), Some(sha), Some(url)) =
                (a["name"].as_str(), a["sha256"].as_str(), a["url"].as_str())
            else {
                bail!("the server listed an artifact without name, sha256 or url: {a}");
            };
            // The URL comes from the server: only this server's API gets the token.
            if !url.starts_with("/api/v1/jobs/") {
                bail!("the server gave `{url}` as the URL of {name}; refusing it");
            }
            // The name comes from the server: it may only name a file below `dir`.
            let parts: Vec<&str> = name.split('/').collect();
            if parts
                .iter()
                .any(|p| p.is_empty() || *p == "." || *p == "..")
            {
                bail!("the server named an artifact `{name}`, which is not a relative path");
            }
            let (file, parents) = parts.split_last().expect("split yields one");
            let target = if parents.is_empty() {
                top.try_clone()?
            } else {
                top.create_dirs(&parents.join("/"))?
            };
            let mut resp = self
                .agent
                .get(self.url(url))
                .header("Authorization", self.auth())
                .call()
                .with_context(|| format!("downloading {name}"))?;
            if !resp.status().is_success() {
                let text = resp.body_mut().read_to_string().unwrap_or_default();
                bail!(
                    "downloading {name}: {}",
                    describe_error(resp.status().as_u16(), &text)
                );
            }
            let mut reader = resp.body_mut().with_config().limit(u64::MAX).reader();
            let mut hasher = Sha256::new();
            target.write_with(file, 0o644, |f| {
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let n = reader.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    hasher.update(&buf[..n]);
                    f.write_all(&buf[..n])?;
                }
                let got: String = hasher
                    .clone()
                    .finalize()
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                if got != sha {
                    bail!("{name}: its sha256 is {got}, the server said {sha}");
                }
                Ok(())
            })?;
            paths.push(dir.join(name));
        }
        Ok(paths)
    }
}

/// A build's log text as a terminal may show it: control characters (escape sequences, a
/// carriage return that hides a line, C1 controls) and invisible direction changes become
/// U+FFFD; line feeds and tabs stay. A log is what a build printed: a stranger's spec decides
/// it, and it must not move the cursor, retitle the window or rewrite what was shown.
pub fn for_terminal(text: &str) -> String {
    text.chars()
        .map(|c| {
            let control = (c.is_control() && c != '\n' && c != '\t')
                || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
            if control { '\u{fffd}' } else { c }
        })
        .collect()
}

/// Reads server-sent events: each `data` line to `out`, remembering the last id; true when
/// the `end` event came.
fn read_events(
    reader: impl BufRead,
    last_id: &mut Option<String>,
    out: &mut dyn Write,
) -> Result<bool> {
    let mut event = String::new();
    let mut data: Vec<String> = Vec::new();
    let mut id: Option<String> = None;
    for line in reader.lines() {
        let Ok(line) = line else { return Ok(false) };
        if line.is_empty() {
            if event == "end" {
                return Ok(true);
            }
            if !data.is_empty() {
                writeln!(out, "{}", for_terminal(&data.join("\n")))?;
                out.flush()?;
            }
            if id.is_some() {
                *last_id = id.take();
            }
            event.clear();
            data.clear();
            continue;
        }
        if let Some(v) = line.strip_prefix("data:") {
            data.push(v.strip_prefix(' ').unwrap_or(v).to_string());
        } else if let Some(v) = line.strip_prefix("id:") {
            id = Some(v.trim().to_string());
        } else if let Some(v) = line.strip_prefix("event:") {
            event = v.trim().to_string();
        }
    }
    Ok(false)
}

/// The server's error answer as one message.
fn describe_error(status: u16, body: &str) -> String {
    let Ok(v) = serde_json::from_str::<Value>(body) else {
        return format!("the server answered {status}: {}", body.trim());
    };
    let mut s = format!(
        "the server answered {status}: {}",
        v["error"].as_str().unwrap_or("(no message)")
    );
    for p in v["problems"].as_array().into_iter().flatten() {
        let field = p["field"].as_str().unwrap_or("");
        let message = p["message"].as_str().unwrap_or("");
        if field.is_empty() {
            s.push_str(&format!("\n  {message}"));
        } else {
            s.push_str(&format!("\n  {field}: {message}"));
        }
    }
    s
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
#[derive(clap::Subcommand)]
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

#[cfg(test)]
mod tests {

    #[test]
    fn a_log_cannot_drive_the_terminal() {
        let shown = for_terminal("ok\tline\n\x1b]0;title\x07\x1b[2Jgone\rhidden\u{9b}31m\u{202e}x");
        assert!(
            !shown.contains(['\x1b', '\x07', '\r', '\u{9b}', '\u{202e}']),
            "{shown:?}"
        );
        assert!(shown.starts_with("ok\tline\n"), "{shown:?}");
    }
    use super::*;

    #[test]
    fn events_are_read_until_the_end() {
        let stream = "id: 5\ndata: one\n\nid: 9\ndata: two\n\n: keep-alive\n\nevent: end\ndata: succeeded\n\n";
        let mut out = Vec::new();
        let mut last = None;
        assert!(read_events(stream.as_bytes(), &mut last, &mut out).unwrap());
        assert_eq!(String::from_utf8(out).unwrap(), "one\ntwo\n");
        assert_eq!(last.as_deref(), Some("9"));
        let mut last = None;
        assert!(!read_events("id: 3\ndata: x\n\n".as_bytes(), &mut last, &mut Vec::new()).unwrap());
        assert_eq!(last.as_deref(), Some("3"));
    }

    #[test]
    fn errors_name_each_problem() {
        let s = describe_error(
            400,
            r#"{"error":"the spec is invalid","problems":[{"field":"images[0].size","message":"too small"}]}"#,
        );
        assert!(
            s.contains("400") && s.contains("images[0].size: too small"),
            "{s}"
        );
    }

    #[test]
    fn exit_codes_follow_the_job() {
        assert_eq!(exit_code(&serde_json::json!({"state": "succeeded"})), 0);
        assert_eq!(exit_code(&serde_json::json!({"state": "cancelled"})), 143);
        assert_eq!(
            exit_code(&serde_json::json!({"state": "failed", "error": {"exit_code": 4}})),
            4
        );
        assert_eq!(exit_code(&serde_json::json!({"state": "failed"})), 1);
    }
}
