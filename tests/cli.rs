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
