//! `cargo xtask fuzz`: runs every cargo-fuzz target of `fuzz/` for a bounded
//! time each (docs/fuzzing.md). Needs the nightly toolchain; installs
//! cargo-fuzz if it is missing (saying so). Each target starts from its
//! committed seeds (`fuzz/seeds/<target>`) and grows `fuzz/corpus/<target>`
//! (not committed); libFuzzer's output goes to `fuzz/logs/<target>.log`, a
//! crashing input to `fuzz/artifacts/<target>/`. All targets are built
//! once, then run from the built binaries (one snapshot of the sources). Exits non-zero if any
//! target crashed (a panic, a timeout or running out of memory).
//! Not part of `cargo xtask test` (it takes minutes and a nightly
//! compiler); that runs the fuzz crate's seed-replay test instead
//! (`fuzz/tests/replay.rs`: every seed and regression through its target,
//! on stable).

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{bail, Context, Result};

/// Sanitizer off (Rust is memory-safe; what we hunt is panics, overflows
/// and hangs), optimised, debug assertions on (overflow checks).
const BUILD_FLAGS: [&str; 4] = ["--sanitizer", "none", "--release", "--debug-assertions"];

/// One target's outcome.
struct Outcome {
    target: String,
    ok: bool,
    runs: Option<u64>,
    secs: f64,
    artifacts: Vec<PathBuf>,
}

pub fn run(seconds: u64, only: &[String]) -> Result<()> {
    let dir = fuzz_dir()?;
    ensure_tools()?;
    let targets = list_targets(&dir)?;
    let targets: Vec<String> = if only.is_empty() {
        targets
    } else {
        for t in only {
            if !targets.contains(t) {
                bail!("no fuzz target {t:?}; there are: {}", targets.join(", "));
            }
        }
        only.to_vec()
    };
    println!(
        "fuzz: building {} targets (nightly, no sanitizer, debug assertions)",
        targets.len()
    );
    let st = nightly_fuzz(&dir).arg("build").args(BUILD_FLAGS).status()?;
    if !st.success() {
        bail!("cargo fuzz build failed");
    }
    let bin_dir = dir.join("target").join(host_triple()?).join("release");
    let logs = dir.join("logs");
    fs::create_dir_all(&logs)?;
    let mut outcomes = Vec::new();
    for t in &targets {
        println!("fuzz: {t} for {seconds} s (log: fuzz/logs/{t}.log)");
        outcomes.push(run_one(&dir, &bin_dir, &logs, t, seconds)?);
    }
    println!(
        "\n{:<16} {:>6} {:>12} {:>8}  result",
        "target", "secs", "runs", "runs/s"
    );
    for o in &outcomes {
        let runs = o.runs.map_or("?".into(), |r| r.to_string());
        let rate = o
            .runs
            .map_or("?".into(), |r| format!("{:.0}", r as f64 / o.secs.max(1e-3)));
        let result = if o.ok {
            "ok".to_owned()
        } else if o.artifacts.is_empty() {
            "FAILED (see its log)".to_owned()
        } else {
            let names: Vec<String> = o.artifacts.iter().map(|a| a.display().to_string()).collect();
            format!("CRASH: {}", names.join(" "))
        };
        println!("{:<16} {:>6.0} {:>12} {:>8}  {result}", o.target, o.secs, runs, rate);
    }
    let failed: Vec<&str> = outcomes.iter().filter(|o| !o.ok).map(|o| o.target.as_str()).collect();
    if !failed.is_empty() {
        bail!(
            "fuzzing found crashes in: {} (reproduce: cd fuzz && cargo +nightly fuzz run {} <target> <artifact>)",
            failed.join(", "),
            BUILD_FLAGS.join(" ")
        );
    }
    Ok(())
}

fn run_one(dir: &Path, bin_dir: &Path, logs: &Path, target: &str, seconds: u64) -> Result<Outcome> {
    let corpus = dir.join("corpus").join(target);
    fs::create_dir_all(&corpus)?;
    let artifacts = dir.join("artifacts").join(target);
    let before = list(&artifacts);
    let seeds = dir.join("seeds").join(target);
    let log_path = logs.join(format!("{target}.log"));
    let log = fs::File::create(&log_path)?;
    fs::create_dir_all(&artifacts)?;
    // The binary `cargo fuzz build` made, run directly: `cargo fuzz run`
    // would rebuild first whenever a source changed meanwhile.
    let mut cmd = Command::new(bin_dir.join(target));
    cmd.current_dir(dir).arg(&corpus);
    if seeds.is_dir() {
        cmd.arg(&seeds);
    }
    cmd.arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg(format!("-max_total_time={seconds}"))
        // A single input slower than this is a hang; more memory, a leak.
        .arg("-timeout=10")
        .arg("-rss_limit_mb=2048")
        .arg("-print_final_stats=1")
        .stdout(log.try_clone()?)
        .stderr(log);
    let started = Instant::now();
    let st = cmd.status().with_context(|| format!("running {target}"))?;
    let secs = started.elapsed().as_secs_f64();
    let text = fs::read_to_string(&log_path).unwrap_or_default();
    let runs = text
        .lines()
        .filter_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
        .filter_map(|n| n.trim().parse().ok())
        .next_back();
    let new: Vec<PathBuf> = list(&artifacts).into_iter().filter(|a| !before.contains(a)).collect();
    Ok(Outcome {
        target: target.to_owned(),
        ok: st.success() && new.is_empty(),
        runs,
        secs,
        artifacts: new,
    })
}

fn list(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| Some(e.ok()?.path())).collect())
        .unwrap_or_default()
}

pub fn fuzz_dir() -> Result<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask has no parent directory")?
        .join("fuzz");
    if !dir.join("Cargo.toml").exists() {
        bail!("{} has no Cargo.toml", dir.display());
    }
    Ok(dir)
}

/// `cargo +nightly fuzz` in `dir`. What `cargo run` set for xtask is
/// removed: cargo-fuzz runs `$CARGO`, which would be the stable cargo (with
/// the nightly rustc: every crate rebuilt, and no `-Z` flags).
fn nightly_fuzz(dir: &Path) -> Command {
    let mut c = Command::new("cargo");
    c.current_dir(dir).args(["+nightly", "fuzz"]);
    for var in [
        "CARGO",
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTDOC",
        "RUSTC_WRAPPER",
        "CARGO_MANIFEST_DIR",
    ] {
        c.env_remove(var);
    }
    c
}

/// The nightly toolchain must be there (installing one is the user's
/// call); cargo-fuzz is installed if missing.
fn ensure_tools() -> Result<()> {
    let nightly = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !nightly {
        bail!("fuzzing needs the nightly toolchain: rustup toolchain install nightly");
    }
    let have_fuzz = Command::new("cargo")
        .args(["+nightly", "fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !have_fuzz {
        println!("fuzz: cargo-fuzz is missing: installing it (cargo install cargo-fuzz)");
        let st = Command::new("cargo").args(["install", "cargo-fuzz"]).status()?;
        if !st.success() {
            bail!("cargo install cargo-fuzz failed");
        }
    }
    Ok(())
}

fn list_targets(dir: &Path) -> Result<Vec<String>> {
    let out = nightly_fuzz(dir).arg("list").output()?;
    if !out.status.success() {
        bail!("cargo fuzz list: {}", String::from_utf8_lossy(&out.stderr));
    }
    let targets: Vec<String> = String::from_utf8(out.stdout)?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    if targets.is_empty() {
        bail!("no fuzz targets in {}", dir.display());
    }
    Ok(targets)
}

/// The nightly compiler's host triple: cargo-fuzz builds for it explicitly.
fn host_triple() -> Result<String> {
    let out = Command::new("rustc")
        .args(["+nightly", "-vV"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .output()?;
    String::from_utf8(out.stdout)?
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_owned)
        .context("rustc -vV: no host line")
}
