//! Fuzzes the metadata reader (the YAML debimg reads back to decide reuse), with the bounded
//! YAML options: any text gives metadata or an error, never a panic; metadata it accepts
//! renders and reads back the same, and renders as fuel-agent's metadata.
#![no_main]

use debimg::metadata::Metadata;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(meta) = Metadata::from_yaml(text) else {
        return;
    };
    let yaml = meta.to_yaml().expect("metadata renders");
    let back = Metadata::from_yaml(&yaml)
        .unwrap_or_else(|e| panic!("rendered metadata does not read back: {e}\n{yaml}"));
    assert_eq!(back, meta, "{yaml}");
    let _ = debimg::fuel::fuel_metadata_yaml(&meta);
});
