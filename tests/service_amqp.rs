//! The distributed service: `debimg serve --amqp` on a private RabbitMQ node, two
//! `debimg worker` processes; one killed with `kill -9` mid-build, its build finished by the
//! other; `serve` restarted with jobs queued, none lost.

mod common;

use std::time::Duration;

use common::service::{Api, RabbitNode, TestServer, TestWorker};
use serde_json::json;
use sha2::{Digest, Sha256};

fn spec(name: &str, packages: &str) -> String {
    format!(
        "version: 1\nname: {name}\nsuite: bookworm\nmirror: host\nkind: tarball\nvariant: minbase\npackages: [{packages}]\n"
    )
}

fn id_of(a: &common::service::Answer) -> String {
    assert_eq!(a.status, 201, "{}", a.text());
    a.json()["id"].as_str().unwrap().to_string()
}

#[test]
fn workers_over_rabbitmq_survive_a_killed_worker_and_a_server_restart() {
    if !common::can_build() {
        return;
    }
    let rabbit = RabbitNode::start();
    let mut server = TestServer::start(
        "svc-amqp",
        &[
            "--local-workers",
            "0",
            "--amqp",
            &rabbit.url,
            "--lease-secs",
            "12",
        ],
    );
    let admin = server.token_role("farm", "worker");
    let user_token = server.token("alice", false);
    let alice = Api::new(&server.url, Some(&user_token));
    let mut w1 = TestWorker::start(&server, &admin, &rabbit.url, "w1");
    let mut w2 = TestWorker::start(&server, &admin, &rabbit.url, "w2");

    // A user's token is no worker's.
    let a = alice.post(
        "/api/v1/builds/b0123456789abcdef/claim",
        &json!({"worker": "x"}),
    );
    assert_eq!(a.status, 403, "{}", a.text());

    // kill -9 the worker of the first build in the middle of it.
    let first = id_of(&alice.submit(&spec("first", "curl"), "first"));
    let f = alice.wait_until(&first, 900, |j| {
        j["state"] == "running" && j["stage"].as_str().is_some_and(|s| s != "validate")
    });
    let victim_name = f["worker"].as_str().unwrap().to_string();
    let (victim, survivor) = if victim_name == "w1" {
        (&mut w1, &w2)
    } else {
        (&mut w2, &w1)
    };
    let survivor_name = survivor.name.clone();
    victim.kill9();
    // Two more jobs while one worker is left: the second goes to it, the third waits behind
    // it (prefetch 1); then the server restarts with the third queued.
    let second = id_of(&alice.submit(&spec("second", "less"), "second"));
    let third = id_of(&alice.submit(&spec("third", "iproute2"), "third"));
    assert_eq!(alice.job(&third)["state"], "queued");
    server.restart();
    let alice = Api::new(&server.url, Some(&user_token));

    // Everything ends well: the killed worker's build on the other worker, a second attempt.
    for id in [&second, &first, &third] {
        let j = alice.wait_end(id, 1800);
        assert_eq!(
            j["state"],
            "succeeded",
            "{j:#}\nsurvivor's log:\n{}",
            survivor.log_text()
        );
        assert_eq!(j["worker"], survivor_name.as_str(), "{j:#}");
        // Artifacts as uploaded: the server checked them against the metadata; so do we.
        for a in j["artifacts"].as_array().unwrap() {
            let got = alice.get(a["url"].as_str().unwrap(), &[]);
            assert_eq!(got.status, 200);
            let sha: String = Sha256::digest(&got.body)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            assert_eq!(sha, a["sha256"].as_str().unwrap());
        }
    }
    let f = alice.job(&first);
    assert_eq!(f["attempts"], 2, "{f:#}");
    let log = alice.get(&format!("/api/v1/jobs/{first}/log"), &[]).text();
    assert!(
        log.contains(&format!("attempt 1, on worker {victim_name}")),
        "{log}"
    );
    assert!(
        log.contains(&format!("attempt 2, on worker {survivor_name}")),
        "{log}"
    );

    // The killed worker's build left nothing on its host but the worker's own directory (its
    // build unwound: the kernel told it its parent died): no workspace, loop device or mount.
    let victim_dir = victim.build_dir.path().to_path_buf();
    let names = |dir: &std::path::Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != ".debimg-workers.lock")
            .collect()
    };
    let left = names(&victim_dir);
    assert!(
        left.len() == 1 && left[0].starts_with("debimg-worker-"),
        "the killed worker's build left {left:?}"
    );
    assert!(common::loops_backed_under(&victim_dir).is_empty());
    assert!(common::processes_rooted_under(&victim_dir).is_empty());
    assert!(
        debimg::sys::mount::mount_points_under(&victim_dir)
            .unwrap()
            .is_empty()
    );
    // A worker started there again removes the dead one's directory; a live worker's stays.
    let dir = std::mem::replace(&mut victim.build_dir, common::scratch("worker-moved"));
    let mut again = TestWorker::start_in(&server, &admin, &rabbit.url, "w3", dir);
    let until = std::time::Instant::now() + Duration::from_secs(60);
    while !again.log_text().contains("taking builds") {
        assert!(std::time::Instant::now() < until, "{}", again.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(names(&victim_dir).is_empty(), "{:?}", names(&victim_dir));
    assert!(again.log_text().contains("left by a worker that died"));
    again.stop();
}
