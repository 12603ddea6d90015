//! The web page at `/`, driven in a real headless Chromium through chromedriver (W3C WebDriver
//! over HTTP): a token pasted, a spec refused with its problems shown, a job cancelled while
//! queued, one real build followed live to the end, its tarball downloaded through the page and
//! checked against the API's sha256, and the job deleted.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::service::{Api, TestServer};
use serde_json::{Value, json};

const SPEC: &str =
    "version: 1\nname: webtiny\nsuite: bookworm\nmirror: host\nkind: tarball\nvariant: minbase\n";
const BAD_SPEC: &str = "version: 1\nname: bad\nsuite: bookworm\nimages: 3\n";
/// A job name that is markup if the page ever puts server data in as HTML.
const NAME: &str = "<b id=\"injected\">webtiny</b>";
const CHROMIUM: &str = "/usr/bin/chromium";
/// The W3C key of an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// `program` found on PATH.
fn on_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
}

/// A headless Chromium session under its own chromedriver. On drop (a panic too) the session
/// is ended, chromedriver's process group killed, and any browser process still naming this
/// session's directory killed: nothing outlives the test.
struct Browser {
    driver: Child,
    base: String,
    session: Option<String>,
    agent: ureq::Agent,
    downloads: PathBuf,
    profile: PathBuf,
    dir: tempfile::TempDir,
}

impl Browser {
    fn start() -> Browser {
        let driver_bin = on_path("chromedriver");
        assert!(
            driver_bin.is_some() && Path::new(CHROMIUM).exists(),
            "the web page test needs Debian's chromium and chromium-driver: run \
             `scripts/setup-host --tests`"
        );
        let dir = common::scratch("web-browser");
        let downloads = dir.path().join("downloads");
        let profile = dir.path().join("profile");
        std::fs::create_dir_all(&downloads).unwrap();
        let stderr = std::fs::File::create(dir.path().join("chromedriver.stderr")).unwrap();
        // Port 0: chromedriver picks a free one and says which on stdout.
        let mut driver = Command::new(driver_bin.unwrap())
            .arg("--port=0")
            .arg(format!(
                "--log-path={}",
                dir.path().join("chromedriver.log").display()
            ))
            // Chromium's scratch files, settings and crash database go with the rest of this
            // session's, not in /tmp or root's home.
            .env("TMPDIR", dir.path())
            .env("HOME", dir.path())
            .env("XDG_CONFIG_HOME", dir.path().join("config"))
            .env("XDG_CACHE_HOME", dir.path().join("cache"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .process_group(0)
            .spawn()
            .expect("starting chromedriver");
        let (tx, rx) = std::sync::mpsc::channel();
        let stdout = driver.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(port) = line
                    .split("started successfully on port ")
                    .nth(1)
                    .and_then(|p| p.trim().trim_end_matches('.').parse::<u16>().ok())
                {
                    let _ = tx.send(port);
                }
            }
        });
        let agent = ureq::Agent::new_with_config(
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(120)))
                .build(),
        );
        let mut b = Browser {
            driver,
            base: String::new(),
            session: None,
            agent,
            downloads,
            profile,
            dir,
        };
        let port = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("chromedriver did not start:\n{}", b.driver_log()));
        b.base = format!("http://127.0.0.1:{port}");
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "unhandledPromptBehavior": "ignore",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--no-first-run", "--window-size=1280,1024",
                    format!("--user-data-dir={}", b.profile.display()),
                ],
                "prefs": {
                    "download.default_directory": b.downloads.to_str().unwrap(),
                    "download.prompt_for_download": false,
                    "download.directory_upgrade": true,
                    "safebrowsing.enabled": false,
                },
            },
        }}});
        let v = b.call("POST", "/session", Some(&caps));
        b.session = Some(v["sessionId"].as_str().expect("a session id").to_string());
        b.command(
            "POST",
            "/timeouts",
            json!({ "script": 30000, "implicit": 0 }),
        );
        b
    }

    fn driver_log(&self) -> String {
        let read =
            |name: &str| std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        let log = read("chromedriver.log");
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        format!(
            "{}\n{}",
            read("chromedriver.stderr"),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    }

    /// One WebDriver request; the `value` of its answer, or a panic with the error.
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        match self.try_call(method, path, body) {
            Ok(v) => v,
            Err(e) => panic!("WebDriver {method} {path}: {e}\n{}", self.driver_log()),
        }
    }

    fn try_call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
        let url = format!("{}{path}", self.base);
        let r = match method {
            "GET" => self.agent.get(&url).call(),
            "DELETE" => self.agent.delete(&url).call(),
            _ => self.agent.post(&url).send_json(body.unwrap_or(&json!({}))),
        };
        let mut r = r.map_err(|e| e.to_string())?;
        let status = r.status().as_u16();
        let v: Value = r.body_mut().read_json().map_err(|e| e.to_string())?;
        if status != 200 {
            return Err(format!(
                "{status}: {} {}",
                v["value"]["error"], v["value"]["message"]
            ));
        }
        Ok(v["value"].clone())
    }

    /// A command of this session.
    fn command(&self, method: &str, path: &str, body: Value) -> Value {
        let s = self.session.as_ref().unwrap();
        self.call(method, &format!("/session/{s}{path}"), Some(&body))
    }

    fn goto(&self, url: &str) {
        self.command("POST", "/url", json!({ "url": url }));
    }

    fn current_url(&self) -> String {
        self.command("GET", "/url", json!({}))
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Runs `script` (a function body; `arguments` are `args`) in the page.
    fn js(&self, script: &str, args: Value) -> Value {
        self.command(
            "POST",
            "/execute/sync",
            json!({ "script": script, "args": args }),
        )
    }

    fn element(&self, css: &str) -> String {
        let v = self.command(
            "POST",
            "/element",
            json!({ "using": "css selector", "value": css }),
        );
        v[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("finding {css}: {v}"))
            .to_string()
    }

    /// Clicks the element; found again if the page replaced it in between (the queue is
    /// redrawn every few seconds).
    fn click(&self, css: &str) {
        let s = self.session.as_ref().unwrap();
        for _ in 0..5 {
            let e = self.element(css);
            let path = format!("/session/{s}/element/{e}/click");
            match self.try_call("POST", &path, Some(&json!({}))) {
                Ok(_) => return,
                Err(err) if err.contains("stale element") => continue,
                Err(err) => panic!("clicking {css}: {err}"),
            }
        }
        panic!("clicking {css}: the element kept going stale");
    }

    /// Types `text` into the element, as a user would (a path, for a file input).
    fn type_into(&self, css: &str, text: &str) {
        let e = self.element(css);
        self.command(
            "POST",
            &format!("/element/{e}/value"),
            json!({ "text": text }),
        );
    }

    fn clear(&self, css: &str) {
        let e = self.element(css);
        self.command("POST", &format!("/element/{e}/clear"), json!({}));
    }

    /// The text content of the element with id `id` ("" when there is none).
    fn text(&self, id: &str) -> String {
        self.js(
            "const e = document.getElementById(arguments[0]); return e ? e.textContent : '';",
            json!([id]),
        )
        .as_str()
        .unwrap()
        .to_string()
    }

    /// Accepts the open confirm(), waiting for it to open.
    fn accept_prompt(&self) {
        let s = self.session.as_ref().unwrap();
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            match self.try_call(
                "POST",
                &format!("/session/{s}/alert/accept"),
                Some(&json!({})),
            ) {
                Ok(_) => return,
                Err(e) if e.contains("no such alert") && Instant::now() < until => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Err(e) => panic!("accepting the confirm(): {e}"),
            }
        }
    }

    /// Polls `probe` until it returns something (at most `secs`); panics with `what` and the
    /// page's text otherwise.
    fn wait_for<T>(&self, what: &str, secs: u64, mut probe: impl FnMut() -> Option<T>) -> T {
        let until = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(v) = probe() {
                return v;
            }
            if Instant::now() > until {
                let page = self.js("return document.body.innerText;", json!([]));
                panic!(
                    "waited {secs}s for {what}; the page says:\n{}",
                    page.as_str().unwrap_or("")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the text of `id` contains `needle`; returns the text.
    fn wait_text(&self, id: &str, needle: &str, secs: u64) -> String {
        self.wait_for(&format!("#{id} to say {needle:?}"), secs, || {
            let t = self.text(id);
            t.contains(needle).then_some(t)
        })
    }

    /// Pids of processes that name this session's directory (its profile, its crash database):
    /// what left chromedriver's process group (crashpad handlers start their own sessions).
    fn stray_browsers(&self) -> Vec<i32> {
        let needle = self.dir.path().to_string_lossy().into_owned();
        let mut found = Vec::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if let Ok(cmd) = std::fs::read(e.path().join("cmdline"))
                && String::from_utf8_lossy(&cmd).contains(&needle)
            {
                found.push(pid);
            }
        }
        found
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        use nix::sys::signal::{Signal, kill, killpg};
        use nix::unistd::Pid;
        if let Some(s) = self.session.take() {
            // Quits the browser; the kills below are for what a failure leaves.
            if let Err(e) = self.try_call("DELETE", &format!("/session/{s}"), None) {
                eprintln!("ending the WebDriver session: {e}");
            }
        }
        let _ = killpg(Pid::from_raw(self.driver.id() as i32), Signal::SIGKILL);
        let _ = self.driver.wait();
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let left = self.stray_browsers();
            if left.is_empty() || Instant::now() > until {
                break;
            }
            for pid in left {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// What the job view shows at one moment.
#[derive(Debug)]
struct Seen {
    state: String,
    stage: String,
    log_len: u64,
}

fn seen(b: &Browser) -> Seen {
    let v = b.js(
        "return [document.getElementById('job-state').textContent,
                 document.getElementById('job-stage').textContent,
                 document.getElementById('log').textContent.length];",
        json!([]),
    );
    Seen {
        state: v[0].as_str().unwrap().to_string(),
        stage: v[1].as_str().unwrap().to_string(),
        log_len: v[2].as_u64().unwrap(),
    }
}

/// The id of the row for `name` in the queue, once there is one.
fn queue_row(b: &Browser, name: &str) -> String {
    b.wait_for(&format!("a row for {name:?} in the queue"), 30, || {
        b.js(
            "for (const tr of document.querySelectorAll('#jobs tr')) {
               if (tr.children[1].textContent === arguments[0]) return tr.dataset.id;
             }
             return null;",
            json!([name]),
        )
        .as_str()
        .map(str::to_string)
    })
}

#[test]
fn page_submits_follows_downloads_and_deletes() {
    if !common::can_build() {
        return;
    }
    let t0 = Instant::now();
    let b = Browser::start();
    let server = TestServer::start("web", &["--local-workers", "1"]);
    let token = server.token("web", false);
    let api = Api::new(&server.url, Some(&token));
    b.goto(&format!("{}/", server.url));

    // Without a token the page says what to do; a wrong one is refused, then forgotten.
    b.wait_text("jobs-error", "Save a token", 10);
    b.type_into("#token", "not-a-token");
    b.click("#save-token");
    b.wait_text("jobs-error", "unknown token", 10);
    b.click("#forget-token");
    b.wait_text("token-status", "no token saved", 10);
    b.type_into("#token", &token);
    b.click("#save-token");
    b.wait_text("jobs-error", "No jobs yet", 10);
    assert_eq!(
        b.js("return localStorage.getItem('debimg-token');", json!([])),
        json!(token)
    );

    // A refused spec, read from a file: the page shows the server's error and every problem.
    let bad = b.dir.path().join("bad.yaml");
    std::fs::write(&bad, BAD_SPEC).unwrap();
    b.type_into("#spec-file", bad.to_str().unwrap());
    b.wait_for("the file to be read into the textarea", 10, || {
        (b.js("return document.getElementById('spec').value;", json!([])) == json!(BAD_SPEC))
            .then_some(())
    });
    b.click("#submit");
    let refused = api.submit(BAD_SPEC, "bad");
    assert_eq!(refused.status, 400, "{}", refused.text());
    let refused = refused.json();
    let shown = b.wait_text("submit-error", refused["error"].as_str().unwrap(), 10);
    let problems = refused["problems"].as_array().unwrap();
    assert!(!problems.is_empty(), "{refused:#}");
    for p in problems {
        let (field, message) = (p["field"].as_str().unwrap(), p["message"].as_str().unwrap());
        let line = if field.is_empty() {
            message.to_string()
        } else {
            format!("{field}: {message}")
        };
        assert!(
            shown.contains(&line),
            "{line:?} is not on the page: {shown:?}"
        );
    }
    assert!(shown.contains("images"), "{shown}");
    assert_eq!(api.get("/api/v1/jobs", &[]).json()["jobs"], json!([]));

    // The real build, typed in, under a name that is markup if the page renders data as HTML.
    b.clear("#spec");
    b.type_into("#spec", SPEC);
    assert_eq!(
        b.js("return document.getElementById('spec').value;", json!([])),
        json!(SPEC)
    );
    b.type_into("#job-name", NAME);
    b.click("#submit");
    b.wait_text("submit-result", "Submitted: job", 30);
    assert_eq!(b.text("submit-error"), "");

    // A second job while the one worker is busy: it waits in the queue, and Cancel ends it.
    b.clear("#job-name");
    b.type_into("#job-name", "to-cancel");
    b.clear("#spec");
    b.type_into("#spec", &SPEC.replace("webtiny", "webcancel"));
    b.click("#submit");
    let cancel_id = queue_row(&b, "to-cancel");
    b.wait_for("the page to open the submitted job", 10, || {
        (b.text("job-id") == cancel_id).then_some(())
    });
    b.wait_text("job-state", "queued", 10);
    b.click("#cancel");
    b.wait_text("job-state", "cancelled", 10);
    assert_eq!(api.job(&cancel_id)["state"], "cancelled");
    assert_eq!(
        b.js(
            "return document.getElementById('cancel').disabled;",
            json!([])
        ),
        json!(true)
    );

    // Back to the list; the build's row, and its link opens it with a bookmarkable URL.
    b.js("location.hash = '';", json!([]));
    b.wait_for("the job view to close", 10, || {
        (b.js(
            "return document.getElementById('job-view').hidden;",
            json!([]),
        ) == json!(true))
        .then_some(())
    });
    let id = queue_row(&b, NAME);
    assert_eq!(
        b.js("return document.getElementById('injected');", json!([])),
        Value::Null,
        "the job's name was rendered as markup"
    );
    b.click(&format!("#jobs tr[data-id=\"{id}\"] a"));
    b.wait_for("the job view", 10, || {
        (b.text("job-id") == id).then_some(())
    });
    assert!(
        b.current_url().ends_with(&format!("#job={id}")),
        "{}",
        b.current_url()
    );
    assert_eq!(b.text("job-name-shown"), NAME);

    // The log grows while it runs and the stage moves on.
    let mut samples: Vec<Seen> = Vec::new();
    let until = Instant::now() + Duration::from_secs(15 * 60);
    loop {
        let s = seen(&b);
        let done = matches!(s.state.as_str(), "succeeded" | "failed" | "cancelled");
        if samples
            .last()
            .is_none_or(|l| l.state != s.state || l.stage != s.stage || l.log_len != s.log_len)
        {
            samples.push(s);
        }
        if done {
            break;
        }
        assert!(
            Instant::now() < until,
            "the build did not end in 15 minutes: {:?}",
            samples.last()
        );
        std::thread::sleep(Duration::from_millis(150));
    }
    let job = api.job(&id);
    assert_eq!(
        job["state"],
        "succeeded",
        "{job:#}\nthe page shows: {}\n{}",
        b.text("job-error"),
        server.log_text()
    );
    let running: Vec<&Seen> = samples.iter().filter(|s| s.state == "running").collect();
    assert!(
        running.windows(2).any(|w| w[1].log_len > w[0].log_len),
        "the log did not grow while the job ran: {samples:?}"
    );
    let stages: std::collections::BTreeSet<&str> = running
        .iter()
        .map(|s| s.stage.as_str())
        .filter(|s| !s.is_empty())
        .collect();
    eprintln!(
        "web page test: {} views of the running job, stages {stages:?}, log {} -> {} chars",
        running.len(),
        running.first().map_or(0, |s| s.log_len),
        running.last().map_or(0, |s| s.log_len)
    );
    assert!(
        stages.len() >= 2,
        "the stage never changed while the job ran: {samples:?}"
    );

    // The whole log, once, in order: what the API has.
    b.wait_text("log-status", "ended: succeeded", 30);
    let log = api.get(&format!("/api/v1/jobs/{id}/log"), &[]).text();
    let want: String = log
        .lines()
        .map(|l| format!("{}\n", l.replace('\r', "")))
        .collect();
    assert_eq!(b.text("log"), want, "the page's log differs from the API's");
    for f in ["job-started", "job-finished", "job-worker"] {
        assert!(!b.text(f).is_empty(), "#{f} is empty");
    }
    assert!(
        b.js(
            "return document.getElementById('job-error').hidden;",
            json!([])
        ) == json!(true)
    );

    // Artifacts: each listed with its size and sha256; the tarball saved through the page is
    // the one the API describes.
    let artifacts = job["artifacts"].as_array().unwrap();
    let tarball = artifacts
        .iter()
        .find(|a| a["name"].as_str().unwrap().ends_with(".tar.gz"))
        .unwrap_or_else(|| panic!("no tarball among the artifacts: {job:#}"));
    let listed = b.wait_for("the artifact links", 20, || {
        let n = b.js(
            "return document.querySelectorAll('#artifacts a.artifact').length;",
            json!([]),
        );
        (n == json!(artifacts.len())).then(|| b.text("artifacts"))
    });
    for a in artifacts {
        for field in ["name", "sha256"] {
            let v = a[field].as_str().unwrap();
            assert!(listed.contains(v), "{v} is not listed: {listed}");
        }
    }
    let name = tarball["name"].as_str().unwrap();
    b.click(&format!("#artifacts a[data-name=\"{name}\"]"));
    let saved = b.downloads.join(name.rsplit('/').next().unwrap());
    let size = tarball["size"].as_u64().unwrap();
    b.wait_for("the tarball in the download directory", 300, || {
        let partial = std::fs::read_dir(&b.downloads)
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with(".crdownload"));
        let len = std::fs::metadata(&saved).map(|m| m.len()).ok();
        (!partial && len == Some(size)).then_some(())
    });
    let (_, sha) = common::sums(&saved);
    assert_eq!(
        sha,
        tarball["sha256"].as_str().unwrap(),
        "the downloaded tarball differs"
    );
    b.wait_text("artifacts", "saved", 30);

    // Delete asks first, then the job is gone from the API and the page.
    b.click("#delete");
    b.accept_prompt();
    b.wait_for("the job view to close after Delete", 30, || {
        (b.js(
            "return document.getElementById('job-view').hidden;",
            json!([]),
        ) == json!(true))
        .then_some(())
    });
    assert_eq!(api.get(&format!("/api/v1/jobs/{id}"), &[]).status, 404);
    b.wait_for("the row to leave the queue", 10, || {
        let rows = b.js(
            "return document.querySelectorAll('#jobs tr[data-id=\"' + arguments[0] + '\"]').length;",
            json!([id]),
        );
        (rows == json!(0)).then_some(())
    });
    drop(b);
    eprintln!("web page test: {:.0?}", t0.elapsed());
}
