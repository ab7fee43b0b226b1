//! An agent's config file (`ConfigFile::parse`: YAML, then `validate`).
//! Must never panic; an accepted config validates again to nothing.
#![no_main]

use ferry_model::ConfigFile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(cfg) = ConfigFile::parse("fuzz.yaml", &text) {
        assert!(cfg.validate().is_empty());
    }
});
