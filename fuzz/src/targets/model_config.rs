//! An agent's config file (`ConfigFile::parse`: YAML, then `validate`).
//! Must never panic; an accepted config validates again to nothing.

use ferry_model::ConfigFile;

/// One input (the cargo-fuzz target `model_config` and the replay test call this).
pub fn run(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(cfg) = ConfigFile::parse("fuzz.yaml", &text) {
        assert!(cfg.validate().is_empty());
    }
}
