//! Fuzzes the spec parser and validator: any input must give a spec or a list of problems,
//! never a panic, and a spec it accepts must plan without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(spec) = debimg::spec::Spec::from_yaml(text, "fuzz.yaml") {
        // Every suite it asks the host for is served by a made-up mirror.
        let mut host = debimg::plan::HostMirrors::new();
        for s in debimg::plan::host_suites(&spec) {
            host.insert(&s.suite, "http://m.example/debian");
        }
        let _ = debimg::plan::Plan::new(&spec, &host, true);
    }
});
