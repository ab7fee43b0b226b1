//! The data path measured with the standard tools everyone else publishes
//! figures with: iperf3 (1 and 4 streams, both directions) and sockperf
//! (64-byte TCP ping-pong, and under load at a fixed message rate), direct
//! vs Ferry on the same box placements, back to back in one run, with the
//! ratio to direct as the headline and issue 18's targets beside it. Also
//! the agents' CPU per GiB moved and their RSS idle and after the load.
//!
//! `ferry-bench bench --only std` runs this section alone (the loop used to
//! measure a change); `cargo xtask bench` runs it with the rest.

use std::{
    path::Path,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::Value;

use ferry_box::{BoxState, ClusterBox, Spec};

use crate::bench::{idle_rss, proxies_cpu, proxies_rss, sh};

#[derive(Clone, Copy)]
pub struct Sizes {
    /// Seconds per iperf3 run and per sockperf run.
    pub secs: u32,
    /// sockperf under-load message rate.
    pub ul_mps: u32,
}

pub const QUICK: Sizes = Sizes { secs: 1, ul_mps: 2000 };
pub const FULL: Sizes = Sizes {
    secs: 6,
    ul_mps: 10_000,
};

struct Placement {
    name: &'static str,
    baseline: &'static str,
    mesh: bool,
    cross_node: bool,
    mtls: bool,
}

const PLACEMENTS: &[Placement] = &[
    Placement {
        name: "direct same-node",
        baseline: "direct same-node",
        mesh: false,
        cross_node: false,
        mtls: false,
    },
    Placement {
        name: "direct cross-node",
        baseline: "direct cross-node",
        mesh: false,
        cross_node: true,
        mtls: false,
    },
    Placement {
        name: "ferry same-node",
        baseline: "direct same-node",
        mesh: true,
        cross_node: false,
        mtls: true,
    },
    Placement {
        name: "ferry cross-node plain",
        baseline: "direct cross-node",
        mesh: true,
        cross_node: true,
        mtls: false,
    },
    Placement {
        name: "ferry cross-node mTLS",
        baseline: "direct cross-node",
        mesh: true,
        cross_node: true,
        mtls: true,
    },
];

#[derive(Debug, Default, Serialize)]
pub struct Row {
    pub scenario: String,
    pub baseline: String,
    /// iperf3 receiver-side Gbit/s: client → server, and server → client (-R).
    pub iperf1_gbit_s: f64,
    pub iperf1_rev_gbit_s: f64,
    pub iperf4_gbit_s: f64,
    pub iperf4_rev_gbit_s: f64,
    /// sockperf ping-pong, 64 B, full round trip.
    pub pp_p50_us: f64,
    pub pp_p99_us: f64,
    pub pp_p999_us: f64,
    /// sockperf under load (`ul`) at `ul_mps` messages/s, full round trip.
    pub ul_p50_us: f64,
    pub ul_p99_us: f64,
    /// Both agents' CPU seconds per GiB received during the iperf3 runs.
    pub agent_cpu_s_per_gib: f64,
    /// The larger agent's RSS when the box came up and after every run.
    pub agent_rss_idle_kib: u64,
    pub agent_rss_after_kib: u64,
    /// Bytes the client node's agent counted (`istio_tcp_sent_bytes_total`
    /// plus received): proof that the mesh rows went through Ferry, 0 direct.
    pub meshed_bytes: f64,
}

/// A server process in a pod, killed when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn server(s: &BoxState, pod: &str, program: &str, args: &[&str]) -> Result<Server> {
    let child = s
        .pod_command(pod, program, args)?
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {program} (cargo xtask deps installs it)"))?;
    Ok(Server(child))
}

/// Runs `f` until it gives a value, for up to 10 s (the server may not be
/// listening yet); the last error otherwise.
fn retry<T>(mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// One iperf3 run: (receiver Gbit/s, bytes received).
fn iperf(s: &BoxState, to: &str, secs: u32, streams: u32, reverse: bool) -> Result<(f64, f64)> {
    let (t, p) = (secs.to_string(), streams.to_string());
    let mut args = vec!["-c", to, "-p", "5201", "-t", &t, "-P", &p, "-J"];
    if reverse {
        args.push("-R");
    }
    retry(|| {
        let out = s.pod_command("client", "iperf3", &args)?.output()?;
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let sum = &v["end"]["sum_received"];
        match (sum["bits_per_second"].as_f64(), sum["bytes"].as_f64()) {
            (Some(bps), Some(bytes)) => Ok((bps / 1e9, bytes)),
            _ => anyhow::bail!("iperf3 failed: {}", String::from_utf8_lossy(&out.stdout)),
        }
    })
}

/// sockperf's percentiles (µs) from its report: p50, p99, p99.9.
pub fn sockperf_percentiles(out: &str) -> Option<(f64, f64, f64)> {
    let p = |which: &str| {
        out.lines().find_map(|l| {
            let rest = l.split_once(&format!("percentile {which} ="))?.1;
            rest.trim().parse::<f64>().ok()
        })
    };
    Some((p("50.000")?, p("99.000")?, p("99.900")?))
}

fn sockperf(s: &BoxState, ip: &str, mode: &str, secs: u32, extra: &[&str]) -> Result<(f64, f64, f64)> {
    let t = secs.max(2).to_string();
    let mut args = vec![
        mode,
        "--tcp",
        "-i",
        ip,
        "-p",
        "11111",
        "-t",
        &t,
        "-m",
        "64",
        "--full-rtt",
    ];
    args.extend_from_slice(extra);
    retry(|| {
        let out = s.pod_command("client", "sockperf", &args)?.output()?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        sockperf_percentiles(&text).with_context(|| format!("sockperf {mode} failed: {text}"))
    })
}

fn run(pl: &Placement, sizes: Sizes, bins: &Path) -> Result<Row> {
    let mut spec = Spec::demo();
    let target = if pl.cross_node { "echo-2" } else { "echo-1" };
    spec.services[0].endpoints = vec![target.into()];
    spec.mtls = pl.mtls;
    spec.access_log.mode = ferry_model::access_log::Mode::Off;
    for p in &mut spec.pods {
        p.enrolled = pl.mesh;
    }
    let b = ClusterBox::up(spec, bins.to_owned())?;
    let s = &b.state;
    let agents = s.agent_pids.clone();
    let rss = || proxies_rss(&agents);
    let rss_idle = idle_rss(&agents);
    let ip = s.pod_ip(target)?.to_string();
    let _iperf = server(s, target, "iperf3", &["-s", "-p", "5201"])?;
    let _sockperf = server(s, target, "sockperf", &["sr", "--tcp", "-i", &ip, "-p", "11111"])?;
    // Warm-up: servers listening, pooled tunnel, ARP.
    iperf(s, &ip, 1, 1, false)?;
    let cpu0 = proxies_cpu(&agents);
    let mut bytes = 0.0;
    let mut gbit = [0.0; 4];
    for (i, (streams, reverse)) in [(1, false), (1, true), (4, false), (4, true)].into_iter().enumerate() {
        let (g, b) = iperf(s, &ip, sizes.secs, streams, reverse)?;
        gbit[i] = g;
        bytes += b;
    }
    let cpu = proxies_cpu(&agents) - cpu0;
    let (pp_p50_us, pp_p99_us, pp_p999_us) = sockperf(s, &ip, "ping-pong", sizes.secs, &[])?;
    let mps = sizes.ul_mps.to_string();
    let (ul_p50_us, ul_p99_us, _) = sockperf(s, &ip, "under-load", sizes.secs, &["--mps", &mps])?;
    let meshed_bytes = s.scrape(0).map_or(0.0, |m| {
        m.samples
            .iter()
            .filter(|x| x.metric == "istio_tcp_sent_bytes_total" || x.metric == "istio_tcp_received_bytes_total")
            .map(|x| ferry_box::sample_value(&x.value))
            .sum()
    });
    Ok(Row {
        meshed_bytes,
        scenario: pl.name.into(),
        baseline: pl.baseline.into(),
        iperf1_gbit_s: gbit[0],
        iperf1_rev_gbit_s: gbit[1],
        iperf4_gbit_s: gbit[2],
        iperf4_rev_gbit_s: gbit[3],
        pp_p50_us,
        pp_p99_us,
        pp_p999_us,
        ul_p50_us,
        ul_p99_us,
        agent_cpu_s_per_gib: if pl.mesh {
            cpu / (bytes / (1u64 << 30) as f64)
        } else {
            0.0
        },
        agent_rss_idle_kib: rss_idle,
        agent_rss_after_kib: rss(),
    })
}

/// Every placement, in order (baselines first).
pub fn rows(mut sizes: Sizes, bins: &Path) -> Result<Vec<Row>> {
    // For profiling one placement: FERRY_BENCH_STD_SECS overrides the run length.
    if let Some(secs) = std::env::var("FERRY_BENCH_STD_SECS").ok().and_then(|s| s.parse().ok()) {
        sizes.secs = secs;
    }
    let filter = std::env::var("FERRY_BENCH_STD_ONLY").ok();
    let mut rows = Vec::new();
    for pl in PLACEMENTS {
        // For measuring one change: FERRY_BENCH_STD_ONLY=mTLS runs the
        // placements whose name contains it, and their baselines.
        if let Some(f) = &filter {
            let wanted = PLACEMENTS
                .iter()
                .any(|p| p.name.contains(f.as_str()) && (p.name == pl.name || p.baseline == pl.name));
            if !wanted {
                continue;
            }
        }
        eprintln!("bench std: {} ...", pl.name);
        rows.push(run(pl, sizes, bins)?);
    }
    Ok(rows)
}

/// Issue 18's targets, as (figure, target text, met?) per measured row.
fn targets(rows: &[Row]) -> Vec<(String, String, String, bool)> {
    let find = |n: &str| rows.iter().find(|r| r.scenario == n);
    let mut t = Vec::new();
    if let (Some(m), Some(d)) = (find("ferry cross-node mTLS"), find("direct cross-node")) {
        let r1 = m.iperf1_gbit_s / d.iperf1_gbit_s;
        t.push((
            "cross-node mTLS, 1 stream (iperf3)".into(),
            format!("{r1:.2}×"),
            "≥ 0.55×".into(),
            r1 >= 0.55,
        ));
        let r4 = m.iperf4_gbit_s / d.iperf4_gbit_s;
        t.push((
            "cross-node mTLS, 4 streams (iperf3)".into(),
            format!("{r4:.2}×"),
            "≥ 0.45×".into(),
            r4 >= 0.45,
        ));
        let p50 = m.pp_p50_us - d.pp_p50_us;
        t.push((
            "RTT p50 over direct (sockperf, cross-node mTLS)".into(),
            format!("{p50:+.0} µs"),
            "≤ +30 µs".into(),
            p50 <= 30.0,
        ));
        let p99 = m.pp_p99_us - d.pp_p99_us;
        t.push((
            "RTT p99 over direct (sockperf, cross-node mTLS)".into(),
            format!("{p99:+.0} µs"),
            "≤ +50 µs".into(),
            p99 <= 50.0,
        ));
    }
    if let (Some(m), Some(d)) = (find("ferry same-node"), find("direct same-node")) {
        let r = m.iperf1_gbit_s / d.iperf1_gbit_s;
        t.push((
            "same-node, default settings, 1 stream (iperf3)".into(),
            format!("{r:.2}×"),
            "≥ 0.95×".into(),
            r >= 0.95,
        ));
    }
    if let Some(idle) = rows
        .iter()
        .filter(|r| r.scenario.starts_with("ferry"))
        .map(|r| r.agent_rss_idle_kib)
        .max()
    {
        // The issue's "16 MB" read as MiB, as its own figures are (KiB / 1024).
        let mib = idle as f64 / 1024.0;
        t.push((
            "agent RSS idle (largest, demo config)".into(),
            format!("{mib:.1} MiB"),
            "≤ 16 MiB".into(),
            mib <= 16.0,
        ));
    }
    t
}

pub fn markdown(rows: &[Row], sizes: Sizes) -> String {
    let base = |name: &str| rows.iter().find(|r| r.scenario == name);
    let ratio = |v: f64, b: f64| {
        if b > 0.0 {
            format!("{:.2}×", v / b)
        } else {
            "–".into()
        }
    };
    let mut md = format!(
        "## Standard tools: iperf3 and sockperf\n\n\
         iperf3 runs {s} s per figure (`-P 1` and `-P 4`, client → server and `-R`), receiver-side rate; \
         sockperf runs {s} s of 64-byte TCP ping-pong, then under load at {mps} msg/s, and reports the full \
         round trip (`--full-rtt`). Agent CPU: both agents' utime+stime over the four iperf3 runs, per GiB \
         received. Ratios are to direct on the same placement.\n\n",
        s = sizes.secs.max(1),
        mps = sizes.ul_mps
    );
    md.push_str("| figure | measured | target | met |\n|---|---|---|---|\n");
    for (fig, got, want, met) in targets(rows) {
        md.push_str(&format!(
            "| {fig} | {got} | {want} | {} |\n",
            if met { "yes" } else { "no" }
        ));
    }
    md.push_str(
        "\n| scenario | 1 stream Gbit/s | vs direct | 1 stream -R | vs direct | 4 streams Gbit/s | vs direct | 4 streams -R | vs direct |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let Some(b) = base(&r.baseline) else { continue };
        md.push_str(&format!(
            "| {} | {:.2} | {} | {:.2} | {} | {:.2} | {} | {:.2} | {} |\n",
            r.scenario,
            r.iperf1_gbit_s,
            ratio(r.iperf1_gbit_s, b.iperf1_gbit_s),
            r.iperf1_rev_gbit_s,
            ratio(r.iperf1_rev_gbit_s, b.iperf1_rev_gbit_s),
            r.iperf4_gbit_s,
            ratio(r.iperf4_gbit_s, b.iperf4_gbit_s),
            r.iperf4_rev_gbit_s,
            ratio(r.iperf4_rev_gbit_s, b.iperf4_rev_gbit_s),
        ));
    }
    md.push_str(
        "\n| scenario | ping-pong p50 µs | p99 µs | p99.9 µs | p50 over direct | p99 over direct | under-load p50 µs | under-load p99 µs | agent CPU s / GiB | agent RSS idle KiB | after KiB |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let Some(b) = base(&r.baseline) else { continue };
        md.push_str(&format!(
            "| {} | {:.1} | {:.1} | {:.1} | {:+.1} | {:+.1} | {:.1} | {:.1} | {:.2} | {} | {} |\n",
            r.scenario,
            r.pp_p50_us,
            r.pp_p99_us,
            r.pp_p999_us,
            r.pp_p50_us - b.pp_p50_us,
            r.pp_p99_us - b.pp_p99_us,
            r.ul_p50_us,
            r.ul_p99_us,
            r.agent_cpu_s_per_gib,
            r.agent_rss_idle_kib,
            r.agent_rss_after_kib,
        ));
    }
    md
}

/// The section alone: writes `<out>.json` and `<out>.md`.
pub fn bench(sizes: Sizes, quick: bool, bins: &Path, out: &Path) -> Result<()> {
    let started = Instant::now();
    let rows = rows(sizes, bins)?;
    let machine = serde_json::json!({
        "kernel": sh("uname", &["-r"]),
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "commit": sh("git", &["rev-parse", "--short", "HEAD"]),
        "quick": quick,
        "seconds": started.elapsed().as_secs(),
    });
    std::fs::write(
        out.with_extension("json"),
        serde_json::to_vec_pretty(&serde_json::json!({"machine": machine, "rows": rows}))?,
    )?;
    let cmd = if quick {
        "cargo xtask bench --quick"
    } else {
        "cargo xtask bench"
    };
    let md = format!(
        "# Benchmarks: standard tools\n\nGenerated by `{cmd}` (this section alone: `ferry-bench bench --only std`), \
         release builds, as root, on the cluster-in-a-box.\n\n{}\nMachine: {machine}\n",
        markdown(&rows, sizes)
    );
    std::fs::write(out.with_extension("md"), &md)?;
    print!("{md}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_sockperf_percentiles() {
        let out = "sockperf: ---> <MAX> observation = 4466.752\n\
                   sockperf: ---> percentile 99.900 =   97.374\n\
                   sockperf: ---> percentile 99.000 =   66.258\n\
                   sockperf: ---> percentile 50.000 =   49.142\n";
        assert_eq!(sockperf_percentiles(out), Some((49.142, 66.258, 97.374)));
        assert_eq!(sockperf_percentiles("sockperf: error"), None);
    }
}
