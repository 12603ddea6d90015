//! The build service end to end: a real `debimg serve` on loopback, driven over HTTP and with
//! `debimg submit` / `debimg jobs`, building real images from the host's mirror.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::service::{Api, TestServer};
use serde_json::json;
use sha2::{Digest, Sha256};

/// A small tarball whose post script prints every environment it can see (`/proc/1/environ`
/// first: the build's own): the server's secrets must not be among them.
const TINY: &str = "version: 1\nname: tiny\nsuite: bookworm\nmirror: host\nkind: tarball\n\
variant: minbase\npost:\n  - name: environ\n    script: |\n      echo environ-dump: begin\n      \
for f in /proc/[0-9]*/environ; do echo \"environ-dump: $f\"; tr '\\0' '\\n' < \"$f\"; done\n      \
env\n      echo environ-dump: end\n";

/// What the server holds in its environment in the end-to-end test: no build may see it.
const CANARY: &str = "canary-7d1e-debimg-server-secret";

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The fields a 400's problems name, in order.
fn problem_fields(a: &common::service::Answer) -> Vec<String> {
    a.json()["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["field"].as_str().unwrap().to_string())
        .collect()
}

fn id_of(a: &common::service::Answer) -> String {
    assert_eq!(a.status, 201, "{}", a.text());
    a.json()["id"].as_str().unwrap().to_string()
}

/// Everything the API refuses, and what survives a restart, without building (no local
/// workers: nothing runs, and no root is needed).
#[test]
fn the_api_refuses_what_it_must_and_keeps_jobs_across_a_restart() {
    let mut server = TestServer::start(
        "svc-api",
        &[
            "--local-workers",
            "0",
            "--max-queued",
            "2",
            "--max-spec-bytes",
            "4096",
            "--max-streams",
            "2",
            "--lease-secs",
            "4",
        ],
    );
    let alice_token = server.token("alice", false);
    let alice = Api::new(&server.url, Some(&alice_token));
    let bob = Api::new(&server.url, Some(&server.token("bob", false)));
    let nobody = Api::new(&server.url, None);
    let forger = Api::new(&server.url, Some("dbi_0000"));

    assert_eq!(nobody.get("/healthz", &[]).text(), "ok\n");
    for api in [&nobody, &forger] {
        let a = api.get("/api/v1/jobs", &[]);
        assert_eq!(a.status, 401, "{}", a.text());
        assert_eq!(a.header("www-authenticate"), Some("Bearer"));
        assert_eq!(api.submit(TINY, "x").status, 401);
    }

    // An invalid spec: 400 with every problem and its field.
    let a = alice.submit(
        "version: 1\nname: m\nsuite: bookworm\nimages: []\nhostname: 'a b'\n",
        "bad",
    );
    assert_eq!(a.status, 400, "{}", a.text());
    let fields: BTreeSet<String> = problem_fields(&a).into_iter().collect();
    assert!(
        fields.contains("images") && fields.contains("hostname"),
        "{}",
        a.text()
    );
    // A spec that would read the server's files, from a token that is not an admin's.
    let reads_host = format!("{TINY}files:\n  - {{dest: /etc/x, source: /etc/shadow}}\n");
    let a = alice.submit(&reads_host, "reads-host");
    assert_eq!(a.status, 400, "{}", a.text());
    assert!(a.text().contains("files[0].source"), "{}", a.text());
    let a = alice.submit(
        "version: 1\nname: tiny\nsuite: bookworm\nmirror: host\nkind: tarball\n\
         post:\n  - {chroot: false, script: 'cat /etc/shadow'}\n",
        "runs-on-host",
    );
    assert_eq!(a.status, 400, "{}", a.text());
    assert!(a.text().contains("post[0]"), "{}", a.text());
    // Larger than the limit: 413.
    let big = format!("{TINY}# {}\n", "x".repeat(5000));
    let a = alice.submit(&big, "big");
    assert_eq!(a.status, 413, "{}", a.text());
    // Not JSON.
    let a = alice.post("/api/v1/jobs", &json!({"name": "no spec"}));
    assert_eq!(a.status, 422, "{}", a.text());
    assert!(
        alice.get("/api/v1/jobs", &[]).json()["jobs"]
            .as_array()
            .unwrap()
            .is_empty()
    );

    // Two queued jobs; the third is over alice's limit (429), bob's own count is his.
    let one = id_of(&alice.submit(TINY, "one"));
    let two = id_of(&alice.submit(&TINY.replace("tiny", "tiny2"), "two"));
    let a = alice.submit(&TINY.replace("tiny", "tiny3"), "three");
    assert_eq!(a.status, 429, "{}", a.text());
    assert!(a.text().contains("limit"), "{}", a.text());
    let bobs = id_of(&bob.submit(TINY, "bobs"));
    // bob's identical spec joins alice's build: one build for both.
    assert_eq!(bob.job(&bobs)["shared_by"], 2);
    assert_eq!(alice.job(&one)["state"], "queued");
    assert_eq!(bob.get(&format!("/api/v1/jobs/{one}"), &[]).status, 404);
    assert_eq!(
        alice.get("/api/v1/jobs?state=queued", &[]).json()["jobs"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(alice.get("/api/v1/jobs?state=bogus", &[]).status, 400);

    // The OpenAPI document names every route the server has.
    let doc = nobody.get("/api/v1/openapi.json", &[]).json();
    for route in debimg::service::http::ROUTES {
        let (method, path) = route.split_once(' ').unwrap();
        assert!(
            doc["paths"][path][method.to_lowercase()].is_object(),
            "openapi.json lacks {route}"
        );
    }
    let metrics = nobody.get("/metrics", &[]).text();
    assert!(metrics.contains("debimg_queue_length 2"), "{metrics}");

    // A token follows at most --max-streams logs at once.
    let agent = ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build(),
    );
    let follow = || {
        agent
            .get(format!("{}/api/v1/jobs/{one}/log", server.url))
            .header("Accept", "text/event-stream")
            .header("Authorization", format!("Bearer {alice_token}"))
            .call()
            .unwrap()
    };
    let held = [follow(), follow()];
    assert!(held.iter().all(|r| r.status() == 200));
    assert_eq!(follow().status(), 429);
    drop(held);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(follow().status(), 200);

    // A restart keeps every job, its state and its place in the queue.
    server.restart();
    let alice = Api::new(&server.url, Some(&alice_token));
    let listed: Vec<String> = alice.get("/api/v1/jobs", &[]).json()["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(listed, vec![two.clone(), one.clone()]);
    assert_eq!(alice.job(&two)["state"], "queued");

    // Cancel a queued job: it never runs. Delete one: it is gone. Through `debimg jobs`.
    let jobs = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_debimg"))
            .arg("jobs")
            .args(args)
            .env("DEBIMG_SERVER", &server.url)
            .env("DEBIMG_TOKEN", &alice_token)
            .output()
            .unwrap()
    };
    let out = jobs(&["list"]);
    let listing = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success() && listing.contains(&one) && listing.contains(&two),
        "{listing}"
    );
    let out = jobs(&["show", &two]);
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["state"], "queued");
    let out = jobs(&["cancel", &two]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(alice.job(&two)["state"], "cancelled");
    assert_eq!(
        alice
            .post(&format!("/api/v1/jobs/{two}/cancel"), &json!({}))
            .status,
        409
    );
    let out = jobs(&["download", &two, "/nonexistent-debimg-dir"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("only a job that succeeded"));
    assert!(jobs(&["delete", &two]).status.success());
    assert_eq!(alice.get(&format!("/api/v1/jobs/{two}"), &[]).status, 404);
    let out = jobs(&["show", &two]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(err.contains("404"), "{err}");

    // A worker's lease: claimed by hand as a worker would; left to run out, the build goes back
    // to the queue and another claim gets it; the first lease's reports are refused, the
    // second's taken.
    let admin = server.token("farm-admin", true);
    let farm = server.token_role("farm", "worker");
    let build = {
        let db = rusqlite::Connection::open(server.state_path().join("debimg.sqlite")).unwrap();
        db.query_row("SELECT build_id FROM jobs WHERE id = ?1", [&one], |r| {
            r.get::<_, String>(0)
        })
        .unwrap()
    };
    let worker_call_as = |token: &str, path: &str, lease: Option<&str>, body: serde_json::Value| {
        let mut req = agent
            .post(format!("{}/api/v1/builds/{build}/{path}", server.url))
            .header("Authorization", format!("Bearer {token}"));
        if let Some(l) = lease {
            req = req.header("x-debimg-lease", l);
        }
        let mut resp = req.send_json(body).unwrap();
        let status = resp.status().as_u16();
        (status, resp.body_mut().read_to_string().unwrap_or_default())
    };
    let worker_call = |path: &str, lease: Option<&str>, body: serde_json::Value| {
        worker_call_as(&farm, path, lease, body)
    };
    // An admin's token is no worker's: admins see every job, they do not report builds.
    let (status, text) = worker_call_as(&admin, "claim", None, json!({"worker": "admin"}));
    assert_eq!(status, 403, "{text}");
    let (status, text) = worker_call("claim", None, json!({"worker": "by-hand"}));
    assert_eq!(status, 200, "{text}");
    let first: serde_json::Value = serde_json::from_str(&text).unwrap();
    let first_lease = first["lease"].as_str().unwrap().to_string();
    assert_eq!(
        (first["attempt"].as_i64(), first["renew_secs"].as_i64()),
        (Some(1), Some(1))
    );
    assert_eq!(
        worker_call("claim", None, json!({"worker": "other"})).0,
        409
    );
    assert_eq!(alice.job(&one)["worker"], "by-hand");
    alice.wait_until(&one, 60, |j| j["state"] == "queued");
    let (status, text) = worker_call("claim", None, json!({"worker": "second"}));
    assert_eq!(status, 200, "{text}");
    let second: serde_json::Value = serde_json::from_str(&text).unwrap();
    let second_lease = second["lease"].as_str().unwrap().to_string();
    assert_eq!(second["attempt"], 2);
    for path in ["renew", "finish"] {
        let (status, text) = worker_call(path, Some(&first_lease), json!({"state": "failed"}));
        assert_eq!(status, 409, "{path} with a lost lease: {text}");
    }
    let (status, text) = worker_call(
        "finish",
        Some(&second_lease),
        json!({"state": "failed", "error": {"kind": "failed", "message": "by hand"}}),
    );
    assert_eq!(status, 200, "{text}");
    let j = alice.job(&one);
    assert_eq!(
        (j["state"].as_str(), j["error"]["message"].as_str()),
        (Some("failed"), Some("by hand"))
    );
    assert_eq!(j["worker"], "second");

    // The token command: listed by name, never by secret; a removed token is refused.
    let out = Command::new(env!("CARGO_BIN_EXE_debimg"))
        .args(["serve", "token", "list", "--state-dir"])
        .arg(server.state_path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("alice") && text.contains("bob") && !text.contains("dbi_"),
        "{text}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_debimg"))
        .args(["serve", "token", "remove", "alice", "--state-dir"])
        .arg(server.state_path())
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(alice.get("/api/v1/jobs", &[]).status, 401);
    // The name is not given again: alice's jobs stay alice's.
    let out = Command::new(env!("CARGO_BIN_EXE_debimg"))
        .args(["serve", "token", "add", "alice", "--state-dir"])
        .arg(server.state_path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not given twice"));
}

/// Reads a job's log as server-sent events until the `end` event: (lines, last id, end data).
fn follow_events(api: &Api, id: &str, last_id: Option<&str>) -> (Vec<String>, String, String) {
    let agent = ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build(),
    );
    let mut req = agent
        .get(format!("{}/api/v1/jobs/{id}/log", api.base))
        .header("Accept", "text/event-stream")
        .header("Authorization", format!("Bearer {}", api.token().unwrap()));
    if let Some(l) = last_id {
        req = req.header("Last-Event-ID", l);
    }
    let resp = req.call().unwrap();
    assert_eq!(resp.status(), 200);
    let (mut lines, mut last, mut event) = (Vec::new(), String::new(), String::new());
    for line in BufReader::new(resp.into_body().into_reader()).lines() {
        let line = line.unwrap();
        if let Some(v) = line.strip_prefix("id: ") {
            last = v.to_string();
        } else if let Some(v) = line.strip_prefix("event: ") {
            event = v.to_string();
        } else if let Some(v) = line.strip_prefix("data: ").or(line.strip_prefix("data:")) {
            if event == "end" {
                return (lines, last, v.to_string());
            }
            lines.push(v.to_string());
        }
    }
    panic!("the event stream ended without an end event");
}

/// Two local workers: builds that succeed (two identical specs built once, one of them through
/// `debimg submit --follow --download`), one that fails in `install`, one cancelled mid-build,
/// one deleted; artifacts checked against the metadata; another token sees none of it; the
/// host clean afterwards.
#[test]
fn embedded_service_builds_fails_cancels_and_deletes() {
    if !common::can_build() {
        return;
    }
    let post_log = common::scratch("svc-post");
    let post = format!(
        "printf '%s %s %s\\n' \"$DEBIMG_JOB_ID\" \"$DEBIMG_JOB_STATE\" \"$DEBIMG_ARTIFACT_DIR\" >> {}/post.log; \
         test \"$DEBIMG_JOB_STATE\" != failed || {{ echo refusing failed jobs >&2; exit 3; }}",
        post_log.path().display()
    );
    let amqp_canary = format!("amqp://farm:{CANARY}@127.0.0.1:1/%2f");
    let server = TestServer::start_env(
        "svc-e2e",
        &["--local-workers", "2", "--post-creation", &post],
        &[
            ("DEBIMG_TOKEN", CANARY),
            ("DEBIMG_TEST_SERVER_SECRET", CANARY),
            ("DEBIMG_AMQP_BY_HAND", &amqp_canary),
        ],
    );
    let token = server.token("alice", false);
    let alice = Api::new(&server.url, Some(&token));
    let bob = Api::new(&server.url, Some(&server.token("bob", false)));
    let root = Api::new(&server.url, Some(&server.token("root", true)));

    // The same spec twice, spelled differently: one through the CLI, following and downloading.
    let scratch = common::scratch("svc-e2e-files");
    let spec_path = scratch.path().join("tiny.yaml");
    std::fs::write(&spec_path, TINY).unwrap();
    let download = scratch.path().join("dl");
    let cli = Command::new(env!("CARGO_BIN_EXE_debimg"))
        .arg("submit")
        .arg(&spec_path)
        .args(["--follow", "--download"])
        .arg(&download)
        .env("DEBIMG_SERVER", &server.url)
        .env("DEBIMG_TOKEN", &token)
        .spawn_output();
    let twin = id_of(&alice.submit(&format!("# the same spec\n{TINY}"), "twin"));
    let fails = id_of(&alice.submit(
        "version: 1\nname: fails\nsuite: bookworm\nmirror: host\nkind: tarball\nvariant: minbase\npackages: [debimg-no-such-package]\n",
        "fails",
    ));
    let cancelled = id_of(&alice.submit(
        "version: 1\nname: cancelme\nsuite: bookworm\nmirror: host\nkind: tarball\nvariant: minbase\npackages: [curl]\n",
        "cancelme",
    ));

    // The cancelled one: ended mid-build (its build is running a stage), then cancelled.
    alice.wait_until(&cancelled, 900, |j| {
        j["state"] == "running" && j["stage"].as_str().is_some_and(|s| s != "validate")
    });
    let a = alice.post(&format!("/api/v1/jobs/{cancelled}/cancel"), &json!({}));
    assert_eq!(a.status, 200, "{}", a.text());
    let c = alice.wait_end(&cancelled, 300);
    assert_eq!(c["state"], "cancelled", "{c:#}");
    assert!(c["artifacts"].as_array().unwrap().is_empty());

    // The failing one: its stage and error.
    let f = alice.wait_end(&fails, 900);
    assert_eq!(f["state"], "failed", "{f:#}");
    assert_eq!(f["stage"], "install", "{f:#}");
    assert_eq!(f["error"]["stage"], "install", "{f:#}");
    assert_eq!(f["error"]["kind"], "failed", "{f:#}");
    let message = f["error"]["message"].as_str().unwrap();
    assert!(message.contains("debimg-no-such-package"), "{message}");
    let tail = f["error"]["log_tail"].as_array().unwrap();
    assert!(
        tail.iter()
            .any(|l| l.as_str().unwrap().contains("Unable to locate package")),
        "{tail:?}"
    );
    // Post-creation ran for it, failed, and the failure is on the job; its output is the
    // admin's command's, for admins alone.
    let f = alice.wait_until(&fails, 60, |j| j["post_creation"]["ok"].is_boolean());
    assert_eq!(f["post_creation"]["ok"], false, "{f:#}");
    assert_eq!(f["post_creation"]["exit_code"], 3, "{f:#}");
    assert!(f["post_creation"].get("output").is_none(), "{f:#}");
    assert!(
        root.job(&fails)["post_creation"]["output"]
            .to_string()
            .contains("refusing failed jobs")
    );

    // The identical specs: one build, both jobs succeeded with the same artifacts.
    let out = cli.wait();
    assert!(
        out.status.success(),
        "debimg submit failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli_id = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap()
        .to_string();
    let t = alice.wait_end(&twin, 60);
    let c = alice.job(&cli_id);
    assert_eq!(
        (t["state"].as_str(), c["state"].as_str()),
        (Some("succeeded"), Some("succeeded"))
    );
    assert_eq!(t["shared_by"], 2);
    assert_eq!(t["spec_digest"], c["spec_digest"]);
    assert_eq!(
        t["artifacts"],
        c["artifacts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                let mut a = a.clone();
                a["url"] = a["url"].as_str().unwrap().replace(&cli_id, &twin).into();
                a
            })
            .collect::<serde_json::Value>()
    );
    // The log as it followed the build named its stages; it followed to the end.
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        log.contains("stage install: started") && log.contains("job "),
        "{log}"
    );

    // Artifacts: the tarball and the metadata, as the metadata lists them; the CLI's download
    // is byte for byte the server's.
    let arts = t["artifacts"].as_array().unwrap();
    let names: BTreeSet<&str> = arts.iter().map(|a| a["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        BTreeSet::from([
            "tiny.cdx.json",
            "tiny.lock.yaml",
            "tiny.spdx.json",
            "tiny.tar.gz",
            "tiny.yaml"
        ])
    );
    let meta_art = arts.iter().find(|a| a["name"] == "tiny.yaml").unwrap();
    let meta = alice.get(meta_art["url"].as_str().unwrap(), &[]);
    assert_eq!(meta.status, 200);
    assert_eq!(sha256_hex(&meta.body), meta_art["sha256"].as_str().unwrap());
    let meta_text = meta.text();
    let tar_art = arts.iter().find(|a| a["name"] == "tiny.tar.gz").unwrap();
    let tar_sha = tar_art["sha256"].as_str().unwrap();
    assert!(
        meta_text.contains(tar_sha),
        "the metadata does not list {tar_sha}:\n{meta_text}"
    );
    let tar = alice.get(tar_art["url"].as_str().unwrap(), &[]);
    assert_eq!(sha256_hex(&tar.body), tar_sha);
    assert_eq!(tar.header("etag"), Some(format!("\"{tar_sha}\"").as_str()));
    assert_eq!(
        std::fs::read(download.join("tiny.tar.gz")).unwrap(),
        tar.body
    );
    // Range and If-None-Match.
    let part = alice.get(
        tar_art["url"].as_str().unwrap(),
        &[("Range", "bytes=100-1123")],
    );
    assert_eq!(part.status, 206);
    assert_eq!(part.body, tar.body[100..1124]);
    let size = tar.body.len();
    assert_eq!(
        part.header("content-range"),
        Some(format!("bytes 100-1123/{size}").as_str())
    );
    let etag = format!("\"{tar_sha}\"");
    let same = alice.get(
        tar_art["url"].as_str().unwrap(),
        &[("If-None-Match", &etag)],
    );
    assert_eq!(same.status, 304);
    let beyond = format!("bytes={size}-");
    assert_eq!(
        alice
            .get(tar_art["url"].as_str().unwrap(), &[("Range", &beyond)])
            .status,
        416
    );
    assert_eq!(
        alice
            .get(
                &format!("/api/v1/jobs/{twin}/artifacts/..%2Ftiny.yaml"),
                &[]
            )
            .status,
        404
    );

    // The post script saw the build's processes and their environments, and none of the
    // server's secrets.
    let text = alice.get(&format!("/api/v1/jobs/{twin}/log"), &[]).text();
    assert!(
        text.contains("environ-dump: /proc/1/environ") && text.contains("environ-dump: end"),
        "the post script did not run or saw no process:\n{text}"
    );
    assert!(
        !text.contains(CANARY),
        "a build saw the server's environment:\n{text}"
    );

    // The live log, as events: it ends with the job's state; resumed from an id it sends only
    // what came after.
    let (lines, _, end) = follow_events(&alice, &twin, None);
    assert_eq!(end, "succeeded");
    assert!(
        lines.iter().any(|l| l.contains("stage publish: done")),
        "{lines:?}"
    );
    let (rest, _, _) = follow_events(&alice, &twin, Some("0"));
    assert_eq!(rest, lines);
    let text = alice.get(&format!("/api/v1/jobs/{twin}/log"), &[]).text();
    let middle = text.len() / 2;
    let cut = text[..middle].rfind('\n').unwrap() + 1;
    let (after, _, _) = follow_events(&alice, &twin, Some(&cut.to_string()));
    assert_eq!(after.join("\n") + "\n", text[cut..].replace('\r', ""));

    // Another token sees none of it; an admin sees everything.
    assert!(
        bob.get("/api/v1/jobs", &[]).json()["jobs"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    for id in [&twin, &fails, &cancelled, &cli_id] {
        assert_eq!(bob.get(&format!("/api/v1/jobs/{id}"), &[]).status, 404);
        assert_eq!(bob.get(&format!("/api/v1/jobs/{id}/log"), &[]).status, 404);
        assert_eq!(
            bob.post(&format!("/api/v1/jobs/{id}/cancel"), &json!({}))
                .status,
            404
        );
        assert_eq!(bob.delete(&format!("/api/v1/jobs/{id}")).status, 404);
    }
    assert_eq!(
        bob.get(
            tar_art["url"]
                .as_str()
                .unwrap()
                .replace(&cli_id, &twin)
                .as_str(),
            &[]
        )
        .status,
        404
    );
    assert_eq!(
        root.get("/api/v1/jobs", &[]).json()["jobs"]
            .as_array()
            .unwrap()
            .len(),
        4
    );

    // Post-creation ran once per finished job, with its state and artifact directory.
    let post_lines = std::fs::read_to_string(post_log.path().join("post.log")).unwrap();
    for (id, state) in [
        (&twin, "succeeded"),
        (&cli_id, "succeeded"),
        (&fails, "failed"),
        (&cancelled, "cancelled"),
    ] {
        let n = post_lines
            .lines()
            .filter(|l| l.starts_with(&format!("{id} {state} ")))
            .count();
        assert_eq!(n, 1, "post-creation for {id} ({state}):\n{post_lines}");
    }
    let artifact_dir = post_lines
        .lines()
        .find(|l| l.starts_with(twin.as_str()))
        .unwrap()
        .split(' ')
        .nth(2)
        .unwrap()
        .to_string();
    assert!(Path::new(&artifact_dir).join("tiny.tar.gz").is_file());

    // Deleting: the failed job goes with its files; of the shared build, the files stay while
    // the other job wants them.
    let dirs_before = server.build_dirs().len();
    assert_eq!(alice.delete(&format!("/api/v1/jobs/{fails}")).status, 204);
    assert_eq!(alice.get(&format!("/api/v1/jobs/{fails}"), &[]).status, 404);
    assert_eq!(server.build_dirs().len(), dirs_before - 1);
    assert_eq!(alice.delete(&format!("/api/v1/jobs/{twin}")).status, 204);
    assert_eq!(
        alice
            .get(
                tar_art["url"]
                    .as_str()
                    .unwrap()
                    .replace(&twin, &cli_id)
                    .as_str(),
                &[]
            )
            .status,
        200
    );
    assert!(Path::new(&artifact_dir).is_dir());
    assert_eq!(alice.delete(&format!("/api/v1/jobs/{cli_id}")).status, 204);
    assert!(
        !Path::new(&artifact_dir).exists(),
        "the last job's delete removes the build's files"
    );

    // The host: no workspace, loop device, mount or process of any build left.
    std::thread::sleep(Duration::from_millis(500));
    common::assert_no_leftovers(server.build_dir.path(), &download);
    assert!(
        common::processes_rooted_under(server.build_dir.path()).is_empty(),
        "processes left in the build directory"
    );
    let metrics = root.get("/metrics", &[]).text();
    assert!(metrics.contains("debimg_running_builds 0"), "{metrics}");
}

/// `Command::output` in the background.
trait SpawnOutput {
    fn spawn_output(&mut self) -> Background;
}

struct Background(std::thread::JoinHandle<std::process::Output>);

impl Background {
    fn wait(self) -> std::process::Output {
        self.0.join().unwrap()
    }
}

impl SpawnOutput for Command {
    fn spawn_output(&mut self) -> Background {
        let child = self
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        Background(std::thread::spawn(move || {
            child.wait_with_output().unwrap()
        }))
    }
}

/// A stranger with a user's token gets nothing of the server's: a spec accepted under one
/// isolation is checked again when claimed under another, worker tokens do a worker's work
/// alone and what they report must be of the build, the token is looked at before a body is
/// read, internal addresses and unsigned repositories are refused, name and email are plain
/// data for a hook that has a time limit and shows its output to admins, a revoked token's
/// log stream ends, and every answer has the security headers. No build runs.
#[test]
fn strangers_get_nothing_of_the_server() {
    use std::io::{Read, Write};
    // A local worker builds as root.
    if !common::can_build() {
        return;
    }
    let marker_dir = common::scratch("svc-strangers-marker");
    let marker = marker_dir.path().join("ran-on-the-host");
    let hook = "echo hook-output-$DEBIMG_JOB_STATE; env | sed 's/^/hook-env: /'; exec sleep 60";
    let mut server = TestServer::start_env(
        "svc-strangers",
        &[
            "--local-workers",
            "0",
            "--isolation",
            "untrusted",
            "--post-creation",
            hook,
            "--post-creation-timeout",
            "2",
        ],
        &[("DEBIMG_TEST_SERVER_SECRET", CANARY)],
    );
    let alice_token = server.token("alice", false);
    let alice = Api::new(&server.url, Some(&alice_token));
    let root = Api::new(&server.url, Some(&server.token("root", true)));
    let farm = server.token_role("farm", "worker");
    let other_farm = server.token_role("other-farm", "worker");
    let worker = Api::new(&server.url, Some(&farm));

    // Security headers, on the page and on the API.
    for (api, path) in [
        (&alice, "/"),
        (&alice, "/api/v1/jobs"),
        (&alice, "/healthz"),
    ] {
        let a = api.get(path, &[]);
        assert_eq!(a.status, 200, "{path}");
        let csp = a.header("content-security-policy").unwrap_or("");
        assert!(
            csp.contains("frame-ancestors 'none'") && csp.contains("script-src 'sha256-"),
            "{path}: {csp}"
        );
        assert_eq!(a.header("x-frame-options"), Some("DENY"), "{path}");
        assert_eq!(
            a.header("x-content-type-options"),
            Some("nosniff"),
            "{path}"
        );
        assert_eq!(a.header("referrer-policy"), Some("no-referrer"), "{path}");
    }

    // No token: 401 before the body. The client announces 1.5 MB and sends 10 bytes; the
    // answer comes at once.
    let addr = server.url.trim_start_matches("http://").to_string();
    let mut conn = std::net::TcpStream::connect(&addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        conn,
        "POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: 1500000\r\n\r\n{{\"spec\": \""
    )
    .unwrap();
    let mut head = [0u8; 12];
    conn.read_exact(&mut head)
        .expect("no answer before the body: the server waits for 1.5 MB from a stranger");
    assert_eq!(&head, b"HTTP/1.1 401");
    // A body larger than the route takes is refused from its length alone.
    let mut conn = std::net::TcpStream::connect(&addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        conn,
        "POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice_token}\r\n\
         Content-Type: application/json\r\nContent-Length: 900000000\r\n\r\n"
    )
    .unwrap();
    conn.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 413");

    // Egress: no internal address, no unsigned repository from a user.
    let a = alice.submit(
        "version: 1\nname: m\nsuite: bookworm\nkind: tarball\nmirror: http://169.254.169.254/debian\n",
        "meta",
    );
    assert_eq!(a.status, 400, "{}", a.text());
    assert_eq!(a.json()["problems"][0]["field"], "mirror", "{}", a.text());
    let a = alice.submit(
        "version: 1\nname: m\nsuite: bookworm\nkind: tarball\nmirror: host\nrepos:\n  - name: debian\n    uri: host\n    suite: bookworm\n  - name: x\n    uri: http://127.0.0.1:1/x\n    suite: bookworm\n    trusted: true\n",
        "loop",
    );
    assert_eq!(a.status, 400, "{}", a.text());
    let fields: Vec<String> = problem_fields(&a);
    assert_eq!(fields, ["repos[1].uri", "repos[1].trusted"], "{}", a.text());

    // Name and email are text and an address, nothing a hook or a mail program could run.
    for (name, email) in [
        ("$(id)", "t@example.org"),
        ("x\u{202e}gpj.exe", "t@example.org"),
        ("line\u{2028}break", "t@example.org"),
        ("fine", "-oQ/tmp/q -X/tmp/x"),
        ("fine", "$(id)@example.org"),
    ] {
        let a = alice.post(
            "/api/v1/jobs",
            &json!({"spec": TINY, "name": name, "email": email}),
        );
        assert_eq!(a.status, 400, "{name:?} {email:?}: {}", a.text());
    }

    // The hook: a job cancelled while queued ends, and the hook runs for it in a clean
    // environment, killed at its time limit; its output is for admins.
    let cancelled = id_of(&alice.submit(TINY, "hooked"));
    assert_eq!(
        alice
            .post(&format!("/api/v1/jobs/{cancelled}/cancel"), &json!({}))
            .status,
        200
    );
    let j = alice.wait_until(&cancelled, 30, |j| j["post_creation"]["ok"].is_boolean());
    assert_eq!(j["post_creation"]["timed_out"], true, "{j:#}");
    assert_eq!(j["post_creation"]["ok"], false, "{j:#}");
    assert!(j["post_creation"].get("output").is_none(), "{j:#}");
    let output = root.job(&cancelled)["post_creation"]["output"].to_string();
    assert!(
        output.contains("hook-output-cancelled") && output.contains("hook-env: PATH="),
        "{output}"
    );
    assert!(
        !output.contains(CANARY),
        "the hook saw the server's environment: {output}"
    );

    // A spec accepted for a machine (--isolation untrusted) that runs a script on the host:
    // after a restart with --isolation host and a local worker, it fails unbuilt when claimed.
    let host_script = format!(
        "version: 1\nname: hostscript\nsuite: bookworm\nmirror: host\nkind: tarball\npost:\n  - name: on-host\n    chroot: false\n    script: touch {}\n",
        marker.display()
    );
    let queued = id_of(&alice.submit(&host_script, "host-script"));
    // A worker's token sees no job; a user's token reports no build.
    assert_eq!(worker.get("/api/v1/jobs", &[]).status, 403);
    let build = {
        let db = rusqlite::Connection::open(server.state_path().join("debimg.sqlite")).unwrap();
        db.query_row("SELECT build_id FROM jobs WHERE id = ?1", [&queued], |r| {
            r.get::<_, String>(0)
        })
        .unwrap()
    };
    for path in ["claim", "renew", "stage", "log", "finish"] {
        let a = alice.post(
            &format!("/api/v1/builds/{build}/{path}"),
            &json!({"worker": "x", "stage": "install", "state": "failed"}),
        );
        assert_eq!(a.status, 403, "{path}: {}", a.text());
    }
    assert_eq!(alice.job(&queued)["state"], "queued");
    server.args_replace(&["--isolation", "untrusted"], &["--isolation", "host"]);
    server.args_replace(&["--local-workers", "0"], &["--local-workers", "1"]);
    server.restart();
    let j = alice.wait_end(&queued, 60);
    assert_eq!(j["state"], "failed", "{j:#}");
    assert_eq!(j["error"]["kind"], "invalid-spec", "{j:#}");
    assert!(
        j["error"]["message"]
            .as_str()
            .unwrap()
            .contains("refused when claimed"),
        "{j:#}"
    );
    assert!(!marker.exists(), "a stranger's script ran on the host");

    // A worker reports only what it holds, and a report must be of the build: a 12-byte
    // "tarball" with made-up metadata is refused, and the user gets nothing.
    server.args_replace(&["--local-workers", "1"], &["--local-workers", "0"]);
    server.restart();
    let faked = id_of(&alice.submit(TINY, "faked"));
    let build = {
        let db = rusqlite::Connection::open(server.state_path().join("debimg.sqlite")).unwrap();
        db.query_row("SELECT build_id FROM jobs WHERE id = ?1", [&faked], |r| {
            r.get::<_, String>(0)
        })
        .unwrap()
    };
    let a = worker.post(
        &format!("/api/v1/builds/{build}/claim"),
        &json!({"worker": "fake"}),
    );
    assert_eq!(a.status, 200, "{}", a.text());
    let lease = a.json()["lease"].as_str().unwrap().to_string();
    let put = |token: &str, name: &str, bytes: &[u8]| {
        ureq::put(format!(
            "{}/api/v1/builds/{build}/artifacts/{name}",
            server.url
        ))
        .header("Authorization", format!("Bearer {token}"))
        .header("x-debimg-lease", &lease)
        .config()
        .http_status_as_error(false)
        .build()
        .send(bytes)
        .unwrap()
        .status()
        .as_u16()
    };
    // Another worker's token, even with the lease, reports nothing of it.
    assert_eq!(put(&other_farm, "tiny.tar.gz", b"not a tarball"), 409);
    let tar = b"not a tarbal";
    let tar_sha = sha256_hex(tar);
    let meta = format!(
        "name: tiny\ndebimg_version: 0.1.0\nspec_digest: x\nbuild_start: ''\nbuild_end: ''\n\
         images: []\nrepos: []\npackages: []\ninstalled: {{}}\nkind: tarball\nfiles:\n  \
         - name: tiny.tar.gz\n    size: 12\n    sha256: {tar_sha}\n"
    );
    assert_eq!(put(&farm, "tiny.tar.gz", tar), 201);
    assert_eq!(put(&farm, "tiny.yaml", meta.as_bytes()), 201);
    let report = json!({"state": "succeeded", "artifacts": [
        {"name": "tiny.tar.gz", "size": 12, "sha256": tar_sha},
        {"name": "tiny.yaml", "size": meta.len(), "sha256": sha256_hex(meta.as_bytes())},
    ]});
    let mut finish = ureq::post(format!("{}/api/v1/builds/{build}/finish", server.url))
        .header("Authorization", format!("Bearer {farm}"))
        .header("x-debimg-lease", &lease)
        .config()
        .http_status_as_error(false)
        .build()
        .send_json(&report)
        .unwrap();
    assert_eq!(finish.status().as_u16(), 200);
    let answer = finish.body_mut().read_to_string().unwrap();
    assert!(answer.contains("not of this build"), "{answer}");
    let j = alice.job(&faked);
    assert_eq!(j["state"], "failed", "{j:#}");
    assert_eq!(j["error"]["kind"], "artifact-mismatch", "{j:#}");
    assert!(j["artifacts"].as_array().unwrap().is_empty());
    assert_eq!(
        alice
            .get(&format!("/api/v1/jobs/{faked}/artifacts/tiny.tar.gz"), &[])
            .status,
        404
    );

    // A revoked token's log stream ends.
    let queued = id_of(&alice.submit(TINY, "followed"));
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    write!(
        stream,
        "GET /api/v1/jobs/{queued}/log HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice_token}\r\n\
         Accept: text/event-stream\r\n\r\n"
    )
    .unwrap();
    let mut first = [0u8; 12];
    stream.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    let out = Command::new(env!("CARGO_BIN_EXE_debimg"))
        .args(["serve", "token", "remove", "alice", "--state-dir"])
        .arg(server.state_path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let until = std::time::Instant::now() + Duration::from_secs(15);
    let mut buf = [0u8; 4096];
    let mut seen = Vec::new();
    // The body ends: the connection closes, or the last chunk of the chunked body comes.
    let ended = loop {
        match stream.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => {
                seen.extend_from_slice(&buf[..n]);
                if seen.windows(7).any(|w| w == b"\r\n0\r\n\r\n") {
                    break true;
                }
                if std::time::Instant::now() > until {
                    break false;
                }
            }
            Err(_) => break false,
        }
    };
    assert!(ended, "the revoked token's stream goes on");
}

/// Limits hold when a build is claimed, owners take turns whatever order the queue's messages
/// come in, cancelled jobs count against the cap on kept jobs, and the job list comes in pages.
/// Claims by hand as a worker would; no build runs.
#[test]
fn claims_take_turns_and_limits_hold_when_claimed() {
    let server = TestServer::start(
        "svc-turns",
        &[
            "--local-workers",
            "0",
            "--max-running",
            "1",
            "--max-jobs",
            "4",
        ],
    );
    let alice = Api::new(&server.url, Some(&server.token("alice", false)));
    let bob = Api::new(&server.url, Some(&server.token("bob", false)));
    let worker = Api::new(&server.url, Some(&server.token_role("farm", "worker")));
    let spec =
        |n: &str| format!("version: 1\nname: {n}\nsuite: bookworm\nmirror: host\nkind: tarball\n");
    let a: Vec<String> = ["a0", "a1", "a2"]
        .iter()
        .map(|n| id_of(&alice.submit(&spec(n), n)))
        .collect();
    let b0 = id_of(&bob.submit(&spec("b0"), "b0"));
    let build_of = |job: &str| {
        let db = rusqlite::Connection::open(server.state_path().join("debimg.sqlite")).unwrap();
        db.query_row("SELECT build_id FROM jobs WHERE id = ?1", [job], |r| {
            r.get::<_, String>(0)
        })
        .unwrap()
    };
    let claim = |job: &str| {
        worker.post(
            &format!("/api/v1/builds/{}/claim", build_of(job)),
            &json!({"worker": "w"}),
        )
    };
    // The messages name Alice's builds in the order she sent them; Bob's comes in turn.
    let c = claim(&a[0]);
    assert_eq!(c.status, 200, "{}", c.text());
    assert_eq!(c.json()["build_id"], build_of(&a[0]).as_str());
    let c = claim(&a[1]);
    assert_eq!(c.status, 200, "{}", c.text());
    assert_eq!(
        c.json()["build_id"],
        build_of(&b0).as_str(),
        "Bob waited for Alice's burst"
    );
    // Both run one build, their limit: nothing more runs, whichever build a message names.
    let c = claim(&a[2]);
    assert_eq!(c.status, 409, "{}", c.text());
    assert!(c.text().contains("waits"), "{}", c.text());
    assert_eq!(alice.job(&a[1])["state"], "queued");
    assert_eq!(alice.job(&a[2])["state"], "queued");

    // Four jobs kept at most, cancelled ones too.
    let extra = id_of(&alice.submit(&spec("a3"), "a3"));
    assert_eq!(
        alice
            .post(&format!("/api/v1/jobs/{extra}/cancel"), &json!({}))
            .status,
        200
    );
    let over = alice.submit(&spec("a4"), "a4");
    assert_eq!(over.status, 429, "{}", over.text());
    assert!(over.text().contains("jobs kept"), "{}", over.text());

    // Pages, newest first.
    let page = alice.get("/api/v1/jobs?limit=3", &[]).json();
    let ids: Vec<&str> = page["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [extra.as_str(), a[2].as_str(), a[1].as_str()]);
    let next = page["next"].as_str().unwrap();
    let rest = alice
        .get(&format!("/api/v1/jobs?limit=3&before={next}"), &[])
        .json();
    assert_eq!(rest["jobs"].as_array().unwrap().len(), 1);
    assert_eq!(rest["jobs"][0]["id"], a[0].as_str());
    assert!(rest["next"].is_null());
    assert_eq!(alice.get("/api/v1/jobs?limit=0", &[]).status, 400);
    assert_eq!(alice.get("/api/v1/jobs?limit=5000", &[]).status, 400);
}
