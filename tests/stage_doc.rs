//! The stage names in the docs come from `debimg::Stage`, the one list: the README's and
//! docs/spec.md's "What a build does" and docs/architecture.md's table name every stage, in
//! order, and nothing else.

use debimg::Stage;

fn read(rel: &str) -> String {
    std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)).unwrap()
}

/// The lines of `text` from the heading `heading` to the next heading of any level.
fn section<'a>(text: &'a str, heading: &str) -> Vec<&'a str> {
    let mut lines = text.lines().skip_while(|l| l.trim() != heading);
    assert!(lines.next().is_some(), "no heading `{heading}`");
    lines.take_while(|l| !l.starts_with('#')).collect()
}

/// The first word of each numbered item (`1. mount: ...`, `2. **bootstrap**: ...`).
fn numbered_names(lines: &[&str]) -> Vec<String> {
    lines
        .iter()
        .filter_map(|l| {
            let (num, rest) = l.split_once(". ")?;
            num.parse::<u32>().ok()?;
            let word: String = rest
                .trim_start_matches("**")
                .chars()
                .take_while(|c| c.is_ascii_lowercase())
                .collect();
            Some(word)
        })
        .collect()
}

fn all_names() -> Vec<String> {
    Stage::ALL.iter().map(|s| s.name().to_string()).collect()
}

#[test]
fn readme_lists_the_stages_in_order() {
    let readme = read("README.md");
    assert_eq!(
        numbered_names(&section(&readme, "## What a build does")),
        all_names()
    );
}

#[test]
fn the_spec_reference_lists_the_stages_in_order() {
    let doc = read("docs/spec.md");
    assert_eq!(
        numbered_names(&section(&doc, "## What a build does, in order")),
        all_names()
    );
}

#[test]
fn the_architecture_table_is_the_stage_list() {
    let doc = read("docs/architecture.md");
    let rows: Vec<(String, String)> = section(&doc, "## A build")
        .iter()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let name = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
            Some((name.to_string(), cells.get(2)?.to_string()))
        })
        .collect();
    let want: Vec<(String, String)> = Stage::ALL
        .iter()
        .map(|s| (s.name().to_string(), s.summary().to_string()))
        .collect();
    assert_eq!(rows, want);
}

#[test]
fn the_events_doc_names_every_stage() {
    let doc = read("docs/events.md");
    let doc = doc.split_whitespace().collect::<Vec<_>>().join(" ");
    let listed = Stage::ALL
        .iter()
        .map(|s| format!("`{}`", s.name()))
        .collect::<Vec<_>>()
        .join(", ");
    assert!(doc.contains(&listed), "docs/events.md must list: {listed}");
}
