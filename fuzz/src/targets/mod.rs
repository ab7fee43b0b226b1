//! The fuzz targets as plain functions over one input: `fuzz_targets/*.rs`
//! hand them to libFuzzer; `tests/replay.rs` replays the committed seeds,
//! the regressions and any local corpus through them on stable Rust (what
//! `cargo xtask test` runs).

pub mod authz;
pub mod ca_csr;
pub mod config_stream;
pub mod control_yaml;
pub mod http_path;
pub mod model_config;
pub mod route;
pub mod sniff;
pub mod string_match;
pub mod tunnel_preface;

/// Every target by name.
pub const ALL: &[(&str, fn(&[u8]))] = &[
    ("authz", authz::run),
    ("ca_csr", ca_csr::run),
    ("config_stream", config_stream::run),
    ("control_yaml", control_yaml::run),
    ("http_path", http_path::run),
    ("model_config", model_config::run),
    ("route", route::run),
    ("sniff", sniff::run),
    ("string_match", string_match::run),
    ("tunnel_preface", tunnel_preface::run),
];
