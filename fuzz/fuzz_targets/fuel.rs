//! Fuzzes the fuel-agent input reader: any JSON text must give a build or an error, never a
//! panic, and a build it accepts must plan without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(build) = debimg::fuel::spec_from_fuel(text, "fuzz.json") {
        // What the converter made must pass the spec validator on its own too.
        assert!(build.spec.validate().is_empty(), "{:?}", build.spec);
        assert!(build.spec.repos.iter().all(|r| !r.trusted));
        let _ = debimg::plan::Plan::new(&build.spec, &debimg::plan::HostMirrors::new(), false);
    }
});
