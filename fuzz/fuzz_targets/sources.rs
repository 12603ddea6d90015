//! Fuzzes the parsers of the build host's apt sources (one-line `sources.list` and deb822
//! `.sources`): any text gives a list of sources, never a panic.
#![no_main]

use debimg::debian::mirror::{parse_deb822_sources, parse_sources_list, resolve_host_uri};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for sources in [parse_sources_list(text), parse_deb822_sources(text)] {
        for s in &sources {
            assert!(!s.uri.ends_with('/'), "{s:?}");
            assert!(!s.suites.is_empty(), "{s:?}");
        }
        let _ = resolve_host_uri(&sources, "bookworm-updates");
    }
});
