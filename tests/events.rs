//! `debimg build --message-format json`, read as a program driving debimg reads it: from the
//! JSON lines on stdout alone, follow every stage in order with its time, every artifact with a
//! sha256 that matches the file, and the outcome; of a build, a reused build, a failed build and
//! an interrupted one.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use debimg::Stage;
use serde_json::Value;

/// Every stdout line as JSON; a line that is not a JSON object with a `reason` fails the test.
fn events(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|l| {
            let v: Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
            assert!(v["reason"].is_string(), "no reason: {l}");
            v
        })
        .collect()
}

fn with_reason<'a>(events: &'a [Value], reason: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["reason"] == reason).collect()
}

/// The stages the events report, as (reason, stage) in order.
fn stage_events(events: &[Value]) -> Vec<(String, String)> {
    events
        .iter()
        .filter(|e| e["reason"] == "stage-started" || e["reason"] == "stage-finished")
        .map(|e| {
            (
                e["reason"].as_str().unwrap().to_string(),
                e["stage"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Checks every artifact against its file with an independent tool; returns their names.
fn check_artifacts(events: &[Value]) -> Vec<String> {
    let mut names = Vec::new();
    for a in with_reason(events, "artifact") {
        let path = Path::new(a["path"].as_str().unwrap());
        assert_eq!(
            std::fs::metadata(path).unwrap().len(),
            a["size"].as_u64().unwrap(),
            "{a}"
        );
        assert_eq!(sums(path).1, a["sha256"].as_str().unwrap(), "{a}");
        assert_eq!(
            path.file_name().unwrap().to_str().unwrap(),
            a["name"].as_str().unwrap()
        );
        names.push(a["name"].as_str().unwrap().to_string());
    }
    names
}

/// The last event, which must be `build-finished`.
fn finished(events: &[Value]) -> &Value {
    let last = events.last().expect("no events at all");
    assert_eq!(last["reason"], "build-finished", "{last}");
    assert_eq!(
        with_reason(events, "build-finished").len(),
        1,
        "one build-finished"
    );
    last
}

#[test]
fn a_program_follows_builds_from_the_json_lines_alone() {
    if !can_build() {
        return;
    }
    let work = scratch("events");
    let spec = work.path().join("ev.yaml");
    std::fs::write(
        &spec,
        "version: 1\nname: ev\nsuite: bookworm\nmirror: host\nkind: tarball\npackages: [less]\nrecords: [packages]\n",
    )
    .unwrap();
    let out = work.path().join("out");
    let bdir = work.path().join("build");
    std::fs::create_dir_all(&bdir).unwrap();
    let json = ["--message-format", "json", "-q"];

    // A build: every stage in order, each started then finished with its time.
    let run = build(&spec, &out, &bdir, &json);
    run.assert_ok("the build");
    // stderr is no terminal here: the log has no status line in it.
    assert!(
        !run.stderr().contains('\r') && !run.stderr().contains("\x1b["),
        "{}",
        run.stderr()
    );
    let ev = events(&run.stdout());
    assert_eq!(ev[0]["reason"], "build-started");
    assert_eq!(ev[0]["name"], "ev");
    assert_eq!(ev[0]["spec_digest"].as_str().unwrap().len(), 64);
    let want: Vec<(String, String)> = Stage::ALL
        .iter()
        .flat_map(|s| {
            [
                ("stage-started".to_string(), s.name().to_string()),
                ("stage-finished".to_string(), s.name().to_string()),
            ]
        })
        .collect();
    assert_eq!(stage_events(&ev), want);
    for e in with_reason(&ev, "stage-finished") {
        assert!(e["seconds"].as_f64().unwrap() >= 0.0, "{e}");
    }
    let mut names = check_artifacts(&ev);
    names.sort();
    assert_eq!(
        names,
        [
            "ev.cdx.json",
            "ev.lock.yaml",
            "ev.packages",
            "ev.spdx.json",
            "ev.tar.gz",
            "ev.yaml"
        ]
    );
    let done = finished(&ev);
    assert_eq!(done["outcome"], "built");
    assert!(done["error"].is_null(), "{done}");
    assert!(done["seconds"].as_f64().unwrap() > 0.0);

    // Reused: no stage runs, the same artifacts.
    let run = build(&spec, &out, &bdir, &json);
    run.assert_ok("the reuse");
    let ev = events(&run.stdout());
    assert!(stage_events(&ev).is_empty(), "{ev:?}");
    let mut again = check_artifacts(&ev);
    again.sort();
    assert_eq!(again, names);
    assert_eq!(finished(&ev)["outcome"], "reused");

    // Failed in a stage: which one and of what kind, and the exit code it has.
    let mut cmd = build_command(
        &spec,
        &out,
        &bdir,
        &["--force", "--message-format", "json", "-q"],
    );
    cmd.env("DEBIMG_TEST_FAULT", "mount:fail");
    let o = cmd.output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    let ev = events(&String::from_utf8_lossy(&o.stdout));
    assert_eq!(
        stage_events(&ev),
        [("stage-started".to_string(), "mount".to_string())]
    );
    let done = finished(&ev);
    assert_eq!(done["outcome"], "failed");
    let err = &done["error"];
    assert_eq!(
        (&err["kind"], &err["stage"], &err["exit_code"]),
        (
            &Value::from("failed"),
            &Value::from("mount"),
            &Value::from(1)
        )
    );
    assert!(
        err["message"].as_str().unwrap().contains("injected fault"),
        "{err}"
    );
    assert_no_leftovers(&bdir, &out);

    // Interrupted: its own kind, the signal and the stage.
    let mut cmd = build_command(
        &spec,
        &out,
        &bdir,
        &["--force", "--message-format", "json", "-q"],
    );
    cmd.env("DEBIMG_TEST_FAULT", "bootstrap:pause");
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // stderr is read to its end (a closed pipe would change how the build ends), and the pause
    // is announced on a channel.
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let (paused, pause) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        for line in stderr.lines().map_while(Result::ok) {
            if line == "debimg-test: paused in stage bootstrap" {
                let _ = paused.send(());
            }
            all.push(line);
        }
        all.join("\n")
    });
    pause
        .recv_timeout(Duration::from_secs(600))
        .expect("the build never paused in bootstrap");
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let o = child.wait_with_output().unwrap();
    let log = reader.join().unwrap();
    assert_eq!(o.status.code(), Some(130), "{log}");
    let ev = events(&String::from_utf8_lossy(&o.stdout));
    let err = &finished(&ev)["error"];
    assert_eq!(
        (
            &err["kind"],
            &err["signal"],
            &err["stage"],
            &err["exit_code"]
        ),
        (
            &Value::from("interrupted"),
            &Value::from(2),
            &Value::from("bootstrap"),
            &Value::from(130)
        ),
        "{err}"
    );
    assert_no_leftovers(&bdir, &out);

    // On a terminal (a pseudo-terminal by script(1)), a status line names the stage as it runs;
    // the events on stdout are the same lines.
    let cmd = build_command(&spec, &out, &bdir, &["--force", "-q"]);
    let line = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| format!("'{}'", a.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ");
    let shown = tool("script", &["-qefc", &line, "/dev/null"]);
    assert!(
        shown.contains("\r\x1b[2K[install ") && shown.contains("\r\x1b[2K[package "),
        "no status line on the terminal: {shown:?}"
    );
    assert!(shown.contains("ev.tar.gz"), "{shown}");

    // A spec that never builds: the consumer still gets its end, with the kind.
    let bad = work.path().join("bad.yaml");
    std::fs::write(&bad, "version: 1\nname: bad\nsuite: bookworm\nimages: []\n").unwrap();
    let run = build(&bad, &out, &bdir, &json);
    assert_eq!(run.code(), Some(2), "{}", run.stderr());
    let ev = events(&run.stdout());
    let err = &finished(&ev)["error"];
    assert_eq!(err["kind"], "invalid-spec", "{err}");
}
