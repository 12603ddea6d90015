//! The command line without building: validate, plan, and spec errors found before any side
//! effect.

mod common;

use common::*;

#[test]
fn examples_validate() {
    for name in ["minimal.yaml", "multi-fs.yaml", "pinned.yaml"] {
        let spec = example(name);
        let run = debimg(&["validate", spec.to_str().unwrap()]);
        run.assert_ok(name);
        assert!(run.stdout().contains("valid"), "{}", run.stdout());
    }
}

#[test]
fn invalid_spec_exits_2_naming_every_field() {
    let dir = scratch("invalid");
    let spec = dir.path().join("bad.yaml");
    std::fs::write(
        &spec,
        "version: 1\nname: bad\nsuite: bookworm\nmirror: ftp://nowhere\npackages: [Curl, 'rm -rf']\nimages:\n  - {mount: /, fs: ext4, size: 1MiB}\n  - {mount: var/../x, fs: xfs, size: 1GiB, output: ../escape}\n",
    )
    .unwrap();
    let run = debimg(&["validate", spec.to_str().unwrap()]);
    assert_eq!(run.code(), Some(2), "{}", run.stderr());
    let err = run.stderr();
    for field in [
        "mirror:",
        "packages[0]:",
        "packages[1]:",
        "images[0].size:",
        "images[1].mount:",
        "images[1].output:",
    ] {
        assert!(err.contains(field), "`{field}` missing from:\n{err}");
    }
}

#[test]
fn untrusted_specs_may_not_reach_the_host() {
    let dir = scratch("untrusted");
    let spec = dir.path().join("reach.yaml");
    // Every way a spec reaches the host, naming files that do not exist: the answer must be
    // the same as if they did (whether a host file exists is not the spec's to learn).
    std::fs::write(
        &spec,
        "version: 1\nname: reach\nsuite: bookworm\nkind: tarball\nmirror: 'file:///srv/mirror'\n\
         repos:\n  - {name: debian, suite: bookworm}\n  - {name: v, uri: 'file:///srv/v', suite: ./, key: /etc/nonexistent.asc}\n\
         files:\n  - {source: /etc/shadow-nonexistent, dest: /etc/x}\n  - {content: ok, dest: /etc/y}\n\
         local_debs: [/srv/nonexistent.deb]\n\
         post:\n  - {script: 'true'}\n  - {script: 'cat /etc/shadow', chroot: false}\n",
    )
    .unwrap();
    let run = debimg(&["validate", "--untrusted", spec.to_str().unwrap()]);
    assert_eq!(run.code(), Some(2), "{}", run.stderr());
    let err = run.stderr();
    assert!(err.contains("from an untrusted source"), "{err}");
    for field in [
        "mirror:",
        "repos[1].uri:",
        "repos[1].key:",
        "files[0].source:",
        "local_debs[0]:",
        "post[1].chroot:",
    ] {
        assert!(err.contains(field), "`{field}` missing from:\n{err}");
    }
    for fine in ["files[1]", "post[0]", "repos[0]"] {
        assert!(!err.contains(fine), "`{fine}` refused:\n{err}");
    }
    assert!(
        !err.contains("cannot be read"),
        "a host file was looked at:\n{err}"
    );
    // The same spec without what reaches the host is fine.
    std::fs::write(
        &spec,
        "version: 1\nname: ok\nsuite: bookworm\nkind: tarball\nfiles:\n  - {content: ok, dest: /etc/y}\npost:\n  - {script: 'true'}\n",
    )
    .unwrap();
    debimg(&["validate", "--untrusted", spec.to_str().unwrap()]).assert_ok("an untrusted spec");
}

#[test]
fn unknown_key_exits_2() {
    let dir = scratch("unknown");
    let spec = dir.path().join("bad.yaml");
    std::fs::write(
        &spec,
        "version: 1\nname: bad\nsuite: bookworm\npackges: [curl]\nimages:\n  - {mount: /, fs: ext4, size: 1GiB}\n",
    )
    .unwrap();
    let run = debimg(&["validate", spec.to_str().unwrap()]);
    assert_eq!(run.code(), Some(2));
    assert!(run.stderr().contains("packges"), "{}", run.stderr());
}

#[test]
fn invalid_spec_builds_nothing() {
    let dir = scratch("nobuild");
    let spec = dir.path().join("bad.yaml");
    std::fs::write(
        &spec,
        "version: 1\nname: bad\nsuite: bookworm\nimages:\n  - {mount: /, fs: ext9, size: 1GiB}\n",
    )
    .unwrap();
    let out = dir.path().join("out");
    let bdir = dir.path().join("build");
    let run = build(&spec, &out, &bdir, &[]);
    assert_eq!(run.code(), Some(2), "{}", run.stderr());
    assert!(run.stderr().contains("ext9"), "{}", run.stderr());
    assert!(!out.exists(), "the output dir was created");
    assert!(!bdir.exists(), "the build dir was created");
}

#[test]
fn plan_resolves_host_mirror_and_orders_mounts() {
    let spec = example("multi-fs.yaml");
    let run = debimg(&["plan", spec.to_str().unwrap()]);
    run.assert_ok("plan");
    let plan: serde_json::Value = serde_json::from_str(&run.stdout()).unwrap();
    let uri = plan["repos"][0]["uri"].as_str().unwrap();
    assert!(uri.starts_with("http") || uri.starts_with("file:"), "{uri}");
    assert_ne!(uri, "host");
    let order: Vec<u64> = plan["mount_order"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(order, [0, 1, 2, 3]);
    assert_eq!(plan["digest"].as_str().unwrap().len(), 64);
}

#[test]
fn pack_prints_digests_that_match_the_files() {
    let dir = scratch("pack");
    let img = dir.path().join("x.img");
    let mut data = vec![0u8; 3 << 20];
    for (i, b) in data.iter_mut().enumerate().step_by(7) {
        *b = (i % 251) as u8;
    }
    std::fs::write(&img, &data).unwrap();
    let gz = dir.path().join("x.img.gz");
    let run = debimg(&["pack", img.to_str().unwrap(), "-o", gz.to_str().unwrap()]);
    run.assert_ok("pack");
    let out = run.stdout();
    let (raw_md5, _) = sums(&img);
    let (gz_md5, gz_sha) = sums(&gz);
    assert!(out.contains(&format!("raw_md5: {raw_md5}")), "{out}");
    assert!(out.contains(&format!("container_md5: {gz_md5}")), "{out}");
    assert!(
        out.contains(&format!("container_sha256: {gz_sha}")),
        "{out}"
    );
    tool("gzip", &["-t", gz.to_str().unwrap()]);
    // The output exists now: a second pack refuses to overwrite it.
    let again = debimg(&["pack", img.to_str().unwrap(), "-o", gz.to_str().unwrap()]);
    assert_eq!(again.code(), Some(1), "{}", again.stderr());
}

#[test]
fn cache_list_and_prune() {
    let dir = scratch("cachecli");
    let cache = dir.path().join("cache");
    let c = cache.to_str().unwrap();
    std::fs::create_dir_all(cache.join("packages")).unwrap();
    std::fs::write(cache.join("packages/less_590-2_amd64.deb"), vec![1u8; 4096]).unwrap();
    let list = debimg(&["cache", "list", "--cache-dir", c]);
    list.assert_ok("cache list");
    assert!(
        list.stdout().contains("less_590-2_amd64.deb"),
        "{}",
        list.stdout()
    );
    assert!(list.stdout().contains("1 entries"), "{}", list.stdout());
    let keep = debimg(&["cache", "prune", "--older-than", "1d", "--cache-dir", c]);
    keep.assert_ok("prune keeping");
    assert!(cache.join("packages/less_590-2_amd64.deb").exists());
    let all = debimg(&["cache", "prune", "--cache-dir", c]);
    all.assert_ok("prune all");
    assert!(
        all.stdout().contains("removed 1 entries"),
        "{}",
        all.stdout()
    );
    assert!(!cache.join("packages/less_590-2_amd64.deb").exists());
    for bad_age in ["soon", "30"] {
        let bad = debimg(&["cache", "prune", "--older-than", bad_age, "--cache-dir", c]);
        assert_eq!(bad.code(), Some(2), "{bad_age}: {}", bad.stderr());
    }
}
