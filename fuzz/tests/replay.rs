//! Replays every committed input through its fuzz target on stable Rust,
//! without libFuzzer: the seeds (`seeds/<target>/`), the regressions
//! (`regressions/<target>-*`) and, when present, the local corpus
//! (`corpus/<target>/`, not committed; at most [`CORPUS_CAP`] files per
//! target, so the run stays bounded). `cargo xtask test` runs this, so a
//! change that breaks a fuzz finding's fix, or a seed, fails the tests.
//! Every failing input is named, not only the first.

use std::{
    fs,
    panic::{catch_unwind, AssertUnwindSafe},
    path::{Path, PathBuf},
};

use ferry_fuzz::targets::ALL;

const CORPUS_CAP: usize = 2000;

fn files(dir: &Path, keep: impl Fn(&str) -> bool, cap: usize) -> Vec<PathBuf> {
    let Ok(rd) = fs::read_dir(dir) else { return Vec::new() };
    let mut out: Vec<PathBuf> = rd
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.file_name().and_then(|n| n.to_str()).is_some_and(&keep))
        .collect();
    out.sort();
    out.truncate(cap);
    out
}

#[test]
fn every_seed_regression_and_corpus_input_passes_its_target() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut failures = Vec::new();
    let mut seeds = 0;
    for (name, run) in ALL {
        let mut inputs = files(&root.join("seeds").join(name), |_| true, usize::MAX);
        assert!(!inputs.is_empty(), "target {name} has no committed seed");
        seeds += inputs.len();
        let prefix = format!("{name}-");
        inputs.extend(files(&root.join("regressions"), |f| f.starts_with(&prefix), usize::MAX));
        inputs.extend(files(&root.join("corpus").join(name), |_| true, CORPUS_CAP));
        for path in &inputs {
            let data = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            if let Err(p) = catch_unwind(AssertUnwindSafe(|| run(&data))) {
                let why = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_default();
                failures.push(format!("{name} {}: {why}", path.display()));
            }
        }
        println!("{name}: {} inputs", inputs.len());
    }
    assert!(seeds >= ALL.len());
    assert!(
        failures.is_empty(),
        "{} inputs fail:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
