//! cargo-fuzz entry point; the target itself (and what it checks) is
//! `ferry_fuzz::targets::http_path`, which the seed-replay test also runs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_fuzz::targets::http_path::run(data));
