//! ferry-bench: the benchmarks and the demo, run on the cluster-in-a-box.
//! `cargo xtask bench` and `cargo xtask demo` build everything and run this;
//! use it directly with FERRY_BIN_DIR pointing at the built binaries.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use ferry_bench::{bench, bench_authz, bench_control, bench_http, bench_lb, bench_std, demo, soak};
use ferry_box::default_bin_dir;

#[derive(Parser)]
#[command(about = "Ferry's benchmarks and demo, on the cluster-in-a-box")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Bring up the cluster-in-a-box, drive traffic, show what happened.
    Demo {
        /// Leave the box running afterwards.
        #[arg(long)]
        keep: bool,
    },
    /// Benchmarks on the box (writes <out>.json, <out>.md and <out>.svg).
    Bench {
        /// A short run (CI checks it runs, not its numbers).
        #[arg(long)]
        quick: bool,
        /// Report path without extension [default: docs/benchmarks, with
        /// --quick or --only a temporary directory].
        #[arg(long)]
        out: Option<PathBuf>,
        /// Run one section only: `http` (wrk and h2load, direct vs Ferry L4
        /// vs Ferry L7 vs the HAProxy sidecar model; a partial report never
        /// goes to docs/ by default) or `authz` (AuthorizationPolicy decision
        /// cost with 10,000 policies, and per connection on the box;
        /// docs/benchmarks-authz by default) or `lb` (load balancers under
        /// load, one slow endpoint of three; docs/benchmarks-lb by default)
        /// or `std` (iperf3 and sockperf, direct vs Ferry, against issue
        /// 18's targets; docs/benchmarks-std by default).
        #[arg(long, value_enum)]
        only: Option<Section>,
    },
    /// The control plane at scale: generated cluster, real ferry-control,
    /// simulated agents (writes <out>.json and <out>.md).
    BenchControl {
        /// A short run (CI checks it runs, not its numbers).
        #[arg(long)]
        quick: bool,
        /// Report path without extension [default:
        /// docs/benchmarks-control-plane, with --quick a temporary directory].
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// The soak: sustained mixed load on one box with config churn and an
    /// agent handover; every failure counted, agent RSS followed (writes
    /// <out>.json and <out>.md; fails unless every request succeeded).
    Soak {
        /// A short run (what `cargo xtask test` runs).
        #[arg(long)]
        quick: bool,
        /// Report path without extension [default: docs/soak, with --quick
        /// a temporary directory].
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Section {
    Http,
    Authz,
    Lb,
    Std,
}

/// Where a report goes by default: docs/ for a full run; a quick run's
/// numbers mean nothing, so they never replace the published ones.
fn default_out(name: &str, quick: bool) -> Result<PathBuf> {
    if !quick {
        return Ok(PathBuf::from("docs").join(name));
    }
    let dir = std::env::temp_dir().join("ferry-bench-quick");
    std::fs::create_dir_all(&dir)?;
    Ok(dir.join(name))
}

fn main() -> Result<()> {
    let args = Args::parse();
    // A report's directory is made before the run, so a run of minutes never
    // ends in "No such file or directory".
    if let Cmd::Bench { out: Some(out), .. }
    | Cmd::BenchControl { out: Some(out), .. }
    | Cmd::Soak { out: Some(out), .. } = &args.cmd
    {
        if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
    }
    match args.cmd {
        Cmd::Demo { keep } => demo::run(default_bin_dir(), keep),
        Cmd::Bench {
            quick,
            out,
            only: Some(Section::Http),
        } => {
            let out = match out {
                Some(out) => out,
                None => default_out("benchmarks-http", true)?,
            };
            let sizes = if quick { bench_http::QUICK } else { bench_http::FULL };
            bench_http::bench(sizes, quick, &default_bin_dir(), &out)
        }
        Cmd::Bench {
            quick,
            out,
            only: Some(Section::Authz),
        } => {
            let out = match out {
                Some(out) => out,
                None => default_out("benchmarks-authz", quick)?,
            };
            let sizes = if quick { bench_authz::QUICK } else { bench_authz::FULL };
            let r = bench_authz::bench(sizes, &default_bin_dir(), &out)?;
            println!("{}", serde_json::to_string_pretty(&r)?);
            Ok(())
        }
        Cmd::Bench {
            quick,
            out,
            only: Some(Section::Lb),
        } => {
            let out = match out {
                Some(out) => out,
                None => default_out("benchmarks-lb", quick)?,
            };
            let sizes = if quick { bench_lb::QUICK } else { bench_lb::FULL };
            bench_lb::bench(sizes, &default_bin_dir(), &out)?;
            println!("{}", std::fs::read_to_string(out.with_extension("md"))?);
            Ok(())
        }
        Cmd::Bench {
            quick,
            out,
            only: Some(Section::Std),
        } => {
            let out = match out {
                Some(out) => out,
                None => default_out("benchmarks-std", quick)?,
            };
            let sizes = if quick { bench_std::QUICK } else { bench_std::FULL };
            bench_std::bench(sizes, quick, &default_bin_dir(), &out)
        }
        Cmd::Bench { quick, out, only: None } => {
            let out = match out {
                Some(out) => out,
                None => default_out("benchmarks", quick)?,
            };
            let sizes = if quick { bench::QUICK } else { bench::FULL };
            bench::bench(sizes, quick, &default_bin_dir(), &out)
        }
        Cmd::BenchControl { quick, out } => {
            let out = match out {
                Some(out) => out,
                None => default_out("benchmarks-control-plane", quick)?,
            };
            let scale = if quick {
                bench_control::QUICK
            } else {
                bench_control::FULL
            };
            let r = bench_control::bench(scale, &default_bin_dir(), &out)?;
            println!("{}", serde_json::to_string_pretty(&r)?);
            Ok(())
        }
        Cmd::Soak { quick, out } => {
            let out = match out {
                Some(out) => out,
                None => default_out("soak", quick)?,
            };
            let sizes = if quick { &soak::QUICK } else { &soak::FULL };
            let r = soak::soak(sizes, &default_bin_dir(), &out);
            // The report is written whether or not the soak passed.
            if let Ok(md) = std::fs::read_to_string(out.with_extension("md")) {
                println!("{md}");
            }
            r.map(|_| ())
        }
    }
}
