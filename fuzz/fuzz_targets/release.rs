//! Fuzzes the Release/InRelease header parser: any text gives its fields, never a panic, and
//! no field value spans lines (they go into apt pin lines).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let meta = debimg::debian::release::parse_release(text);
    for v in [
        &meta.origin,
        &meta.label,
        &meta.suite,
        &meta.codename,
        &meta.version,
    ]
    .into_iter()
    .flatten()
    {
        assert!(!v.contains('\n'), "{v:?}");
    }
});
