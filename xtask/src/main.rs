//! cargo xtask: prerequisites, building, and running the cluster-in-a-box
//! (`ferry-box`), the demo and the benchmarks (`ferry-bench`) and the tests.
//! It depends on nothing of Ferry's so it can install what Ferry's own build
//! needs (clang for the eBPF programs).

mod chart_tools;
mod deps;
mod fuzz;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Ferry's development tasks")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check (and as root, install) the system packages Ferry needs.
    Deps,
    /// Bring up the cluster-in-a-box, drive traffic, show what happened, tear down.
    Demo {
        /// Leave the box running afterwards.
        #[arg(long)]
        keep: bool,
    },
    /// Run every test (unit and cluster-in-a-box integration), as root.
    Test {
        /// Extra arguments for `cargo test`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Benchmarks with release builds: the data path on the box (docs/benchmarks.{md,json,svg})
    /// and the control plane at scale (docs/benchmarks-control-plane.{md,json}).
    Bench {
        /// About a minute; what `cargo xtask test` runs (checks it works, not its numbers).
        #[arg(long)]
        quick: bool,
        /// Report path without extension [default: docs/benchmarks; with
        /// --quick, target/bench-quick/benchmarks, never over docs/].
        #[arg(long)]
        out: Option<String>,
    },
    /// The soak with release builds: sustained mixed load on one box with
    /// config churn and an agent handover (docs/soak.{md,json}); fails
    /// unless every request succeeded. `cargo xtask test` runs its quick version.
    Soak {
        /// A short run (checks it works, not its numbers).
        #[arg(long)]
        quick: bool,
        /// Report path without extension [default: docs/soak; with
        /// --quick, target/soak-quick/soak, never over docs/].
        #[arg(long)]
        out: Option<String>,
    },
    /// The cluster-in-a-box: `box up`, `box down [ID]`, `box list`, `box exec POD -- CMD`.
    Box {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Runs every cargo-fuzz target in fuzz/ for a bounded time (nightly;
    /// installs cargo-fuzz if missing); fails on a crash. See docs/fuzzing.md.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// Only these targets (default: all).
        targets: Vec<String>,
    },
}

fn main() -> Result<()> {
    match Args::parse().cmd {
        Cmd::Deps => deps::ensure(),
        Cmd::Demo { keep } => {
            let mut args = vec!["demo".to_owned()];
            if keep {
                args.push("--keep".into());
            }
            run_bin("ferry-bench", &args)
        }
        Cmd::Fuzz { seconds, targets } => fuzz::run(seconds, &targets),
        Cmd::Box { args } => {
            let mut all = vec!["box".to_owned()];
            all.extend(args);
            run_bin("ferry-box", &all)
        }
        Cmd::Bench { quick, out } => {
            deps::ensure()?;
            let bins = build_bins(true)?;
            let out = report_path(out, quick, &bins, "bench-quick", "benchmarks")?;
            // The data path on the box, then the control plane at scale,
            // then authorization decisions with 10,000 policies, then the
            // load balancers.
            for (cmd, out) in [
                (&["bench"][..], out.clone()),
                (&["bench-control"][..], format!("{out}-control-plane")),
                (&["bench", "--only", "authz"][..], format!("{out}-authz")),
                (&["bench", "--only", "lb"][..], format!("{out}-lb")),
            ] {
                run_bench(&bins, cmd, out, quick)?;
            }
            Ok(())
        }
        Cmd::Soak { quick, out } => {
            deps::ensure()?;
            let bins = build_bins(true)?;
            let out = report_path(out, quick, &bins, "soak-quick", "soak")?;
            run_bench(&bins, &["soak"], out, quick)
        }
        Cmd::Test { args } => {
            deps::ensure()?;
            let bins = build_bins(false)?;
            let st = Command::new("cargo")
                .args(["test", "--workspace"])
                .args(&args)
                .env("FERRY_BIN_DIR", &bins)
                .status()?;
            // The fuzz crate is its own workspace (nightly for fuzzing);
            // its seed-replay test runs on stable, sharing this target dir.
            let fuzz = fuzz::fuzz_dir()?;
            let replay = Command::new("cargo")
                .args(["test", "--test", "replay"])
                .current_dir(&fuzz)
                .env("CARGO_TARGET_DIR", fuzz.join("../target"))
                .status()?;
            if !st.success() || !replay.success() {
                bail!("tests failed");
            }
            Ok(())
        }
    }
}

/// Runs one of Ferry's binaries (`ferry-box`, `ferry-bench`) after making
/// sure prerequisites and binaries are there; exits with its status.
fn run_bin(bin: &str, args: &[String]) -> Result<()> {
    deps::ensure()?;
    let bins = build_bins(false)?;
    let st = Command::new(bins.join(bin))
        .args(args)
        .env("FERRY_BIN_DIR", &bins)
        .status()?;
    std::process::exit(st.code().unwrap_or(1));
}

/// Where a report goes: `out` if given; else a quick run's under the
/// target directory (`<dir>/<name>`: its numbers mean nothing, so never in
/// docs/), a full run's in `docs/<name>`.
fn report_path(out: Option<String>, quick: bool, bins: &Path, dir: &str, name: &str) -> Result<String> {
    Ok(match out {
        Some(out) => out,
        None if quick => {
            let dir = bins.parent().context("no target directory")?.join(dir);
            std::fs::create_dir_all(&dir)?;
            dir.join(name).display().to_string()
        }
        None => format!("docs/{name}"),
    })
}

/// Runs `ferry-bench <cmd> --out <out> [--quick]` on the built binaries;
/// its failure is this process's exit code.
fn run_bench(bins: &Path, cmd: &[&str], out: String, quick: bool) -> Result<()> {
    let mut args: Vec<String> = cmd.iter().map(|a| a.to_string()).collect();
    args.extend(["--out".to_owned(), out]);
    if quick {
        args.push("--quick".into());
    }
    let st = Command::new(bins.join("ferry-bench"))
        .args(&args)
        .env("FERRY_BIN_DIR", bins)
        .status()?;
    if !st.success() {
        std::process::exit(st.code().unwrap_or(1));
    }
    Ok(())
}

/// Builds every binary and returns the directory holding them.
fn build_bins(release: bool) -> Result<PathBuf> {
    let mut cmd = Command::new("cargo");
    cmd.args(["build", "--quiet", "--workspace", "--bins"]);
    if release {
        cmd.arg("--release");
    }
    let st = cmd.status().context("running cargo build")?;
    if !st.success() {
        bail!("cargo build failed");
    }
    let out = Command::new("cargo")
        .args(["metadata", "--format-version=1", "--no-deps"])
        .output()?;
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let target = meta["target_directory"]
        .as_str()
        .context("cargo metadata: no target_directory")?;
    Ok(PathBuf::from(target).join(if release { "release" } else { "debug" }))
}
