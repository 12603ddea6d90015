//! A real `debimg serve` for the service tests: its own state and build directories, the shared
//! test cache, a port the kernel picks on loopback; stopped (TERM, as a user would) on drop.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{TEST_CACHE, scratch};

pub struct TestServer {
    child: Option<Child>,
    pub url: String,
    pub state: tempfile::TempDir,
    pub build_dir: tempfile::TempDir,
    log: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl TestServer {
    /// Starts `debimg serve` with `args` (e.g. `--local-workers 2`).
    pub fn start(tag: &str, args: &[&str]) -> TestServer {
        Self::start_env(tag, args, &[])
    }

    /// Starts `debimg serve` with `args` and these variables in its environment.
    pub fn start_env(tag: &str, args: &[&str], env: &[(&str, &str)]) -> TestServer {
        let state = scratch(&format!("{tag}-state"));
        let build_dir = scratch(&format!("{tag}-build"));
        let log = state.path().join("serve.stderr");
        let mut s = TestServer {
            child: None,
            url: String::new(),
            state,
            build_dir,
            log,
            args: args.iter().map(|a| a.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        s.launch("127.0.0.1:0");
        s
    }

    fn launch(&mut self, listen: &str) {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let already = std::fs::metadata(&self.log).map_or(0, |m| m.len());
        let child = Command::new(env!("CARGO_BIN_EXE_debimg"))
            .arg("serve")
            .arg("--listen")
            .arg(listen)
            .arg("--state-dir")
            .arg(self.state.path())
            .arg("--build-dir")
            .arg(self.build_dir.path())
            .arg("--cache-dir")
            .arg(TEST_CACHE)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("starting debimg serve");
        self.child = Some(child);
        // The server says where it listens once it does.
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let text = self.log_text_from(already);
            if let Some(rest) = text.split("debimg serve: http://").nth(1) {
                let addr = rest.split('/').next().unwrap();
                self.url = format!("http://{addr}");
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("debimg serve exited ({status}):\n{text}");
            }
            assert!(
                Instant::now() < until,
                "debimg serve did not start:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_text_from(&self, offset: u64) -> String {
        let mut f = std::fs::File::open(&self.log).unwrap();
        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(offset)).unwrap();
        let mut s = String::new();
        f.read_to_string(&mut s).unwrap();
        s
    }

    /// What the server wrote on stderr.
    pub fn log_text(&self) -> String {
        self.log_text_from(0)
    }

    /// A new token for `name`.
    pub fn token(&self, name: &str, admin: bool) -> String {
        self.token_role(name, if admin { "admin" } else { "user" })
    }

    /// A new token for `name` with `role` (`user`, `admin`, `worker`).
    pub fn token_role(&self, name: &str, role: &str) -> String {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_debimg"));
        cmd.args(["serve", "token", "add", name, "--role", role, "--state-dir"])
            .arg(self.state.path());
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// Stops the server with TERM and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let until = Instant::now() + Duration::from_secs(300);
            while child.try_wait().unwrap().is_none() {
                if Instant::now() > until {
                    let _ = child.kill();
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// Replaces the arguments `old` (in a row) with `new` for the next start.
    pub fn args_replace(&mut self, old: &[&str], new: &[&str]) {
        let at = self
            .args
            .windows(old.len())
            .position(|w| w.iter().zip(old).all(|(a, b)| a == b))
            .unwrap_or_else(|| panic!("{old:?} not in {:?}", self.args));
        self.args
            .splice(at..at + old.len(), new.iter().map(|a| a.to_string()));
    }

    /// Stops the server and starts it again on the same address and state.
    pub fn restart(&mut self) {
        self.stop();
        let listen = self.url.trim_start_matches("http://").to_string();
        self.launch(&listen);
    }

    /// The state directory's build directories.
    pub fn build_dirs(&self) -> Vec<PathBuf> {
        match std::fs::read_dir(self.state.path().join("builds")) {
            Ok(rd) => rd.map(|e| e.unwrap().path()).collect(),
            Err(_) => Vec::new(),
        }
    }

    pub fn state_path(&self) -> &Path {
        self.state.path()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("--- debimg serve's stderr ---\n{}", self.log_text());
        }
    }
}

/// An HTTP client of the API with a token (`None`: without one).
pub struct Api {
    agent: ureq::Agent,
    pub base: String,
    token: Option<String>,
}

/// A status and a body.
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

impl Api {
    pub fn new(base: &str, token: Option<&str>) -> Api {
        Api {
            agent: ureq::Agent::new_with_config(
                ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .build(),
            ),
            base: base.to_string(),
            token: token.map(str::to_string),
        }
    }

    /// The token it sends.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    fn answer(what: &str, r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Answer {
        let mut r = r.unwrap_or_else(|e| {
            panic!(
                "reaching the server ({what}) at {:?}: {e:?}",
                std::time::SystemTime::now()
            )
        });
        let status = r.status().as_u16();
        let headers = r
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        let mut body = Vec::new();
        r.body_mut()
            .with_config()
            .limit(u64::MAX)
            .reader()
            .read_to_end(&mut body)
            .unwrap();
        Answer {
            status,
            headers,
            body,
        }
    }

    /// GET `path` with extra headers.
    pub fn get(&self, path: &str, headers: &[(&str, &str)]) -> Answer {
        let mut req = self.agent.get(format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        Self::answer(&format!("GET {path}"), req.call())
    }

    /// POST JSON to `path`.
    pub fn post(&self, path: &str, body: &serde_json::Value) -> Answer {
        let mut req = self.agent.post(format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        Self::answer(&format!("POST {path}"), req.send_json(body))
    }

    /// DELETE `path`.
    pub fn delete(&self, path: &str) -> Answer {
        let mut req = self.agent.delete(format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        Self::answer(&format!("DELETE {path}"), req.call())
    }

    /// Submits `spec`; returns the answer.
    pub fn submit(&self, spec: &str, name: &str) -> Answer {
        self.post(
            "/api/v1/jobs",
            &serde_json::json!({ "spec": spec, "name": name, "email": "t@example.org" }),
        )
    }

    /// The job `id`.
    pub fn job(&self, id: &str) -> serde_json::Value {
        let a = self.get(&format!("/api/v1/jobs/{id}"), &[]);
        assert_eq!(a.status, 200, "{}", a.text());
        a.json()
    }

    /// Polls job `id` until `done` holds of it (at most `secs` seconds).
    pub fn wait_until(
        &self,
        id: &str,
        secs: u64,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let until = Instant::now() + Duration::from_secs(secs);
        loop {
            let j = self.job(id);
            if done(&j) {
                return j;
            }
            assert!(Instant::now() < until, "job {id} never got there: {j:#}");
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Waits until job `id` has ended.
    pub fn wait_end(&self, id: &str, secs: u64) -> serde_json::Value {
        self.wait_until(id, secs, |j| {
            matches!(
                j["state"].as_str(),
                Some("succeeded" | "failed" | "cancelled")
            )
        })
    }
}

/// A private RabbitMQ node on loopback (`scripts/rabbitmq-node`), stopped on drop.
pub struct RabbitNode {
    dir: PathBuf,
    pub url: String,
}

impl RabbitNode {
    pub fn start() -> RabbitNode {
        // Its directory must be reachable by the rabbitmq user: not in a 0700 temp dir.
        let port = free_port_with(&[10000, 20000]);
        let dir = PathBuf::from(format!("/tmp/debimg-test-rabbitmq-{port}"));
        let out = Command::new(super::repo().join("scripts/rabbitmq-node"))
            .arg("start")
            .arg(&dir)
            .arg(port.to_string())
            .stderr(Stdio::inherit())
            .output()
            .expect("running scripts/rabbitmq-node");
        assert!(out.status.success(), "scripts/rabbitmq-node start failed");
        let url = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .last()
            .unwrap()
            .trim()
            .to_string();
        assert!(url.starts_with("amqp://"), "{url}");
        RabbitNode { dir, url }
    }
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
        let _ = Command::new(super::repo().join("scripts/rabbitmq-node"))
            .arg("stop")
            .arg(&self.dir)
            .status();
    }
}

/// A loopback port from 20000 to 45535 that is free, with PORT+each offset free too.
fn free_port_with(offsets: &[u16]) -> u16 {
    use std::net::TcpListener;
    let seed = std::process::id() as u64 ^ Instant::now().elapsed().as_nanos() as u64;
    for i in 0..2000u64 {
        let port = 20000 + ((seed.wrapping_mul(7919).wrapping_add(i * 104_729)) % 25000) as u16;
        let all_free = std::iter::once(0)
            .chain(offsets.iter().copied())
            .all(|o| TcpListener::bind(("127.0.0.1", port + o)).is_ok());
        if all_free {
            return port;
        }
    }
    panic!("no free port");
}

/// A `debimg worker` process, killed (KILL) on drop when still running.
pub struct TestWorker {
    pub child: Child,
    pub name: String,
    pub build_dir: tempfile::TempDir,
    log: PathBuf,
}

impl TestWorker {
    pub fn start(server: &TestServer, token: &str, amqp: &str, name: &str) -> TestWorker {
        Self::start_in(
            server,
            token,
            amqp,
            name,
            scratch(&format!("worker-{name}")),
        )
    }

    /// A worker whose build directory is `build_dir`.
    pub fn start_in(
        server: &TestServer,
        token: &str,
        amqp: &str,
        name: &str,
        build_dir: tempfile::TempDir,
    ) -> TestWorker {
        let log = server.state.path().join(format!("worker-{name}.stderr"));
        let child = Command::new(env!("CARGO_BIN_EXE_debimg"))
            .args(["worker", "--server", &server.url])
            // Secrets from the environment, never the command line.
            .env("DEBIMG_TOKEN", token)
            .env("DEBIMG_AMQP", amqp)
            .args(["--name", name, "--cache-dir", TEST_CACHE, "--build-dir"])
            .arg(build_dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting debimg worker");
        TestWorker {
            child,
            name: name.to_string(),
            build_dir,
            log,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// TERM, and wait.
    pub fn stop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

impl Drop for TestWorker {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.stop();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- debimg worker {}'s stderr ---\n{}",
                self.name,
                self.log_text()
            );
        }
    }
}
