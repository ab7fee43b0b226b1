//! `cargo xtask bench`: what Ferry costs, measured on the cluster-in-a-box,
//! every scenario back to back in one run so ratios are fair on a noisy
//! machine. Each scenario is its own box; figures come from the sample client
//! (`ferry-workload client echo|rr`) run as the client pod.
//!
//! Covered so far: direct vs Ferry same-node / cross-node plain / cross-node
//! mTLS, and metrics on vs off; single-stream echo throughput, 1-byte
//! request/response latency over one connection and over new connections.
//! Still to come (issue "Benchmarks"): 4 streams, fixed-rate latency, CPU and
//! RSS of the agent, the sidecar model, splicing on/off, plots.

use std::{path::Path, process::Command, time::Instant};

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::Value;

use ferry_box::{BoxState, ClusterBox, Spec};

#[derive(Clone, Copy)]
pub struct Sizes {
    pub echo_bytes: u64,
    pub rr_count: usize,
    pub rr_new_count: usize,
    /// Open-loop requests per second, and how many.
    pub fixed_rate: u64,
    pub fixed_count: usize,
}

pub const QUICK: Sizes = Sizes {
    echo_bytes: 32 << 20,
    rr_count: 1000,
    rr_new_count: 200,
    fixed_rate: 1000,
    fixed_count: 1000,
};
pub const FULL: Sizes = Sizes {
    echo_bytes: 512 << 20,
    rr_count: 20_000,
    rr_new_count: 3_000,
    fixed_rate: 2000,
    fixed_count: 20_000,
};

struct Scenario {
    name: &'static str,
    /// Baseline this scenario's ratios are against.
    baseline: &'static str,
    mesh: bool,
    cross_node: bool,
    mtls: bool,
    metrics: bool,
    /// The sidecar model: an HAProxy L4 proxy in each pod, no Ferry.
    sidecar: bool,
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "direct same-node",
        baseline: "direct same-node",
        mesh: false,
        cross_node: false,
        mtls: false,
        metrics: true,
        sidecar: false,
    },
    Scenario {
        name: "direct cross-node",
        baseline: "direct cross-node",
        mesh: false,
        cross_node: true,
        mtls: false,
        metrics: true,
        sidecar: false,
    },
    Scenario {
        name: "ferry same-node",
        baseline: "direct same-node",
        mesh: true,
        cross_node: false,
        mtls: true,
        metrics: true,
        sidecar: false,
    },
    Scenario {
        name: "ferry cross-node plain",
        baseline: "direct cross-node",
        mesh: true,
        cross_node: true,
        mtls: false,
        metrics: true,
        sidecar: false,
    },
    Scenario {
        name: "ferry cross-node mTLS",
        baseline: "direct cross-node",
        mesh: true,
        cross_node: true,
        mtls: true,
        metrics: true,
        sidecar: false,
    },
    Scenario {
        name: "ferry cross-node mTLS, metrics off",
        baseline: "direct cross-node",
        mesh: true,
        cross_node: true,
        mtls: true,
        metrics: false,
        sidecar: false,
    },
    Scenario {
        name: "sidecar model cross-node plain (HAProxy per pod)",
        baseline: "direct cross-node",
        mesh: false,
        cross_node: true,
        mtls: false,
        metrics: true,
        sidecar: true,
    },
];

#[derive(Debug, Serialize)]
pub struct Row {
    pub scenario: String,
    pub baseline: String,
    pub echo_gbit_s: f64,
    /// Four concurrent echo streams, aggregate each way.
    pub echo4_gbit_s: f64,
    /// CPU seconds of the proxies (both agents, or in the sidecar model both
    /// sidecars) per GiB moved each way, during the single-stream echo.
    pub agent_cpu_s_per_gib: f64,
    /// CPU seconds of the proxies per 10k request/response round trips.
    pub agent_cpu_s_per_10k_rr: f64,
    /// Largest proxy RSS, right after it came up and after all runs.
    pub agent_rss_idle_kib: u64,
    pub agent_rss_after_kib: u64,
    pub rr_p50_us: u64,
    pub rr_p99_us: u64,
    pub rr_p999_us: u64,
    /// Fixed-rate (open-loop, coordinated-omission-safe) 1-byte round trips.
    pub fixed_rate_per_s: u64,
    pub fixed_p50_us: u64,
    pub fixed_p99_us: u64,
    pub fixed_p999_us: u64,
    pub new_conn_p50_us: u64,
    pub new_conn_p99_us: u64,
    pub new_conns_per_s: f64,
    /// p90s of the runs above, and the same round trips with 1 KiB messages.
    pub rr_p90_us: u64,
    pub fixed_p90_us: u64,
    pub new_conn_p90_us: u64,
    pub rr1k_p50_us: u64,
    pub rr1k_p90_us: u64,
    pub rr1k_p99_us: u64,
    pub rr1k_p999_us: u64,
    pub new_conn1k_p50_us: u64,
    pub new_conn1k_p90_us: u64,
    pub new_conn1k_p99_us: u64,
    pub new_conn1k_p999_us: u64,
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as f64
}

/// utime + stime of a process, in seconds.
fn cpu_s(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the ")" that ends the command name: utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    (field(11) + field(12)) as f64 / clk_tck()
}

pub(crate) use ferry_box::sys::rss_kib;

/// CPU seconds of the proxies doing the work (the agents, or the sidecars).
pub(crate) fn proxies_cpu(pids: &[u32]) -> f64 {
    pids.iter().map(|p| cpu_s(*p)).sum()
}

/// The largest proxy's RSS.
pub(crate) fn proxies_rss(pids: &[u32]) -> u64 {
    pids.iter().map(|p| rss_kib(*p)).max().unwrap_or(0)
}

/// The largest proxy's RSS once idle: a second after the box is up, when
/// an agent has given back the heap its start-up used (it trims within
/// 250 ms of applying a config). Taken at once, the figure was 1–2 MiB
/// higher than what the same agent holds for as long as it stays idle.
pub(crate) fn idle_rss(pids: &[u32]) -> u64 {
    std::thread::sleep(std::time::Duration::from_secs(1));
    proxies_rss(pids)
}

fn json(out: &str) -> Result<Value> {
    serde_json::from_str(out.trim()).with_context(|| format!("client output: {}", out.trim()))
}

fn run(sc: &Scenario, sizes: Sizes, bins: &Path) -> Result<Row> {
    let mut spec = Spec::demo();
    let target = if sc.cross_node { "echo-2" } else { "echo-1" };
    spec.services[0].endpoints = vec![target.into()];
    spec.mtls = sc.mtls;
    spec.metrics = sc.metrics;
    spec.access_log.mode = ferry_model::access_log::Mode::Off;
    for p in &mut spec.pods {
        p.enrolled = sc.mesh;
    }
    let b = ClusterBox::up(spec, bins.to_owned())?;
    let s = &b.state;
    let mut proxies = s.agent_pids.clone();
    let to = if sc.sidecar {
        proxies = start_sidecars(s, target)?;
        "127.0.0.1:15001".to_owned()
    } else if sc.mesh {
        "10.96.0.10:80".to_owned()
    } else {
        format!("{}:8080", s.pod_ip(target)?)
    };
    let rss_idle = idle_rss(&proxies);
    let bytes = sizes.echo_bytes.to_string();
    // Warm-up: pooled tunnel, ARP, page cache.
    s.client("client", &["echo", "--to", &to, "--bytes", "1048576"])?;
    let cpu0 = proxies_cpu(&proxies);
    let e = json(&s.client("client", &["echo", "--to", &to, "--bytes", &bytes])?)?;
    let cpu_echo = proxies_cpu(&proxies) - cpu0;
    let ms = e["ms"].as_f64().unwrap_or(f64::NAN).max(1.0);
    // Four streams at once, a quarter of the bytes each.
    let quarter = (sizes.echo_bytes / 4).to_string();
    let t4 = Instant::now();
    let four: Vec<_> = (0..4)
        .map(|_| {
            let (s, to, q) = (s.clone(), to.clone(), quarter.clone());
            std::thread::spawn(move || s.client("client", &["echo", "--to", &to, "--bytes", &q]))
        })
        .collect();
    for h in four {
        h.join().map_err(|_| anyhow::anyhow!("echo thread panicked"))??;
    }
    let secs4 = t4.elapsed().as_secs_f64();
    let cpu1 = proxies_cpu(&proxies);
    let rr = json(&s.client("client", &["rr", "--to", &to, "--count", &sizes.rr_count.to_string()])?)?;
    let cpu_rr = proxies_cpu(&proxies) - cpu1;
    let (rate, n) = (sizes.fixed_rate.to_string(), sizes.fixed_count.to_string());
    let fixed = json(&s.client("client", &["rr", "--to", &to, "--count", &n, "--rate", &rate])?)?;
    let nc = json(&s.client(
        "client",
        &[
            "rr",
            "--to",
            &to,
            "--count",
            &sizes.rr_new_count.to_string(),
            "--new-conn",
        ],
    )?)?;
    let count = |n: usize| (n / 2).max(1).to_string();
    let rr1k = json(&s.client(
        "client",
        &["rr", "--to", &to, "--count", &count(sizes.rr_count), "--size", "1024"],
    )?)?;
    let nc1k = json(&s.client(
        "client",
        &[
            "rr",
            "--to",
            &to,
            "--count",
            &count(sizes.rr_new_count),
            "--size",
            "1024",
            "--new-conn",
        ],
    )?)?;
    let u = |v: &Value, k: &str| v[k].as_u64().unwrap_or(0);
    Ok(Row {
        rr_p90_us: u(&rr, "p90_us"),
        fixed_p90_us: u(&fixed, "p90_us"),
        new_conn_p90_us: u(&nc, "p90_us"),
        rr1k_p50_us: u(&rr1k, "p50_us"),
        rr1k_p90_us: u(&rr1k, "p90_us"),
        rr1k_p99_us: u(&rr1k, "p99_us"),
        rr1k_p999_us: u(&rr1k, "p999_us"),
        new_conn1k_p50_us: u(&nc1k, "p50_us"),
        new_conn1k_p90_us: u(&nc1k, "p90_us"),
        new_conn1k_p99_us: u(&nc1k, "p99_us"),
        new_conn1k_p999_us: u(&nc1k, "p999_us"),
        scenario: sc.name.into(),
        baseline: sc.baseline.into(),
        echo_gbit_s: sizes.echo_bytes as f64 * 8.0 / (ms / 1000.0) / 1e9,
        echo4_gbit_s: sizes.echo_bytes as f64 * 8.0 / secs4 / 1e9,
        agent_cpu_s_per_gib: cpu_echo / (sizes.echo_bytes as f64 / (1u64 << 30) as f64),
        agent_cpu_s_per_10k_rr: cpu_rr * 10_000.0 / sizes.rr_count as f64,
        agent_rss_idle_kib: rss_idle,
        agent_rss_after_kib: proxies_rss(&proxies),
        rr_p50_us: u(&rr, "p50_us"),
        rr_p99_us: u(&rr, "p99_us"),
        rr_p999_us: u(&rr, "p999_us"),
        fixed_rate_per_s: sizes.fixed_rate,
        fixed_p50_us: u(&fixed, "p50_us"),
        fixed_p99_us: u(&fixed, "p99_us"),
        fixed_p999_us: u(&fixed, "p999_us"),
        new_conn_p50_us: u(&nc, "p50_us"),
        new_conn_p99_us: u(&nc, "p99_us"),
        new_conns_per_s: nc["ops_per_s"].as_f64().unwrap_or(0.0),
    })
}

/// Node 1's agent RSS (KiB) before and after its config grows by `n`
/// workloads (on another node) and `n` services.
/// Also returns its RSS after `conns` new connections through it (same
/// node and across nodes, via the service VIP): (idle, after conns, after config).
fn rss_with_workloads(bins: &Path, n: usize, conns: usize) -> Result<(u64, u64, u64)> {
    let b = ClusterBox::up(Spec::demo(), bins.to_owned())?;
    let s = &b.state;
    let before = idle_rss(&s.agent_pids[..1]);
    s.client(
        "client",
        &[
            "rr",
            "--to",
            "10.96.0.10:80",
            "--count",
            &conns.to_string(),
            "--new-conn",
        ],
    )?;
    let after_conns = rss_kib(s.agent_pids[0]);
    let mut cfg = s.agent_config(0);
    let template = cfg.workloads[0].clone();
    let svc = cfg.services[0].clone();
    for i in 0..n {
        let ip = std::net::Ipv4Addr::new(10, 2, (i / 250) as u8, (i % 250) as u8 + 1);
        let mut w = template.clone();
        (w.uid, w.name, w.node, w.ip, w.netns, w.host_veth) = (
            format!("bench-{i}"),
            format!("bench-{i}"),
            "elsewhere".into(),
            ip,
            None,
            None,
        );
        cfg.workloads.push(w);
        let mut v = svc.clone();
        v.name = format!("bench-{i}");
        v.vip = std::net::Ipv4Addr::new(10, 97, (i / 250) as u8, (i % 250) as u8 + 1);
        v.endpoints = vec![ferry_model::Endpoint { ip, ready: true }];
        cfg.services.push(v);
    }
    let version = s.config_version(0)?;
    std::fs::write(s.config_path(0), serde_norway::to_string(&cfg)?)?;
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    while s.config_version(0)? <= version {
        anyhow::ensure!(Instant::now() < deadline, "agent did not apply the large config");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    Ok((before, after_conns, rss_kib(s.agent_pids[0])))
}

/// A horizontal bar chart (log scale) of the fixed-rate latency percentiles
/// per scenario, as SVG: people would rather look than read.
pub fn latency_svg(rows: &[Row]) -> String {
    let (left, width, bar, gap) = (300.0, 560.0, 12.0, 14.0);
    let (lo, hi) = (10f64.log10(), 100_000f64.log10()); // 10 µs .. 100 ms
    let x = |us: u64| left + width * (((us.max(10) as f64).log10() - lo) / (hi - lo)).clamp(0.0, 1.0);
    let height = 40.0 + rows.len() as f64 * (3.0 * bar + gap) + 30.0;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"900\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <text x=\"10\" y=\"20\" font-size=\"14\">Fixed-rate 1-byte request/response latency (µs, log scale): p50, p99, p99.9</text>\n"
    );
    for (i, t) in [10u64, 100, 1_000, 10_000, 100_000].iter().enumerate() {
        let tx = x(*t);
        svg.push_str(&format!(
            "<line x1=\"{tx}\" y1=\"30\" x2=\"{tx}\" y2=\"{}\" stroke=\"#ddd\"/><text x=\"{tx}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
            height - 25.0,
            height - 10.0,
            ["10", "100", "1 ms", "10 ms", "100 ms"][i]
        ));
    }
    for (i, r) in rows.iter().enumerate() {
        let y0 = 40.0 + i as f64 * (3.0 * bar + gap);
        svg.push_str(&format!(
            "<text x=\"10\" y=\"{}\">{}</text>\n",
            y0 + 1.5 * bar + 4.0,
            r.scenario
        ));
        for (k, (v, color)) in [
            (r.fixed_p50_us, "#4c78a8"),
            (r.fixed_p99_us, "#f58518"),
            (r.fixed_p999_us, "#e45756"),
        ]
        .iter()
        .enumerate()
        {
            let y = y0 + k as f64 * bar;
            svg.push_str(&format!(
                "<rect x=\"{left}\" y=\"{y}\" width=\"{}\" height=\"{}\" fill=\"{color}\"/><text x=\"{}\" y=\"{}\" font-size=\"10\">{v}</text>\n",
                x(*v) - left,
                bar - 2.0,
                x(*v) + 4.0,
                y + bar - 3.0
            ));
        }
    }
    svg.push_str("</svg>\n");
    svg
}

/// The sidecar model: HAProxy as a plain L4 proxy inside the client pod
/// (127.0.0.1:15001, the app connects to it) and inside the server pod (pod IP
/// :15006, forwarding to the app on loopback). Killed with the box. Returns
/// their pids (their CPU and memory are the sidecar model's proxy cost).
fn start_sidecars(s: &BoxState, server: &str) -> Result<Vec<u32>> {
    let pids = spawn_sidecars(s, server, "tcp")?;
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    while s.who("client", "127.0.0.1:15001").is_err() {
        anyhow::ensure!(Instant::now() < deadline, "sidecars did not come up");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    Ok(pids)
}

/// The two sidecars of the model, HAProxy in `mode` (`tcp`, or `http` for
/// the HTTP rows of `bench_http`), started without waiting for them.
pub(crate) fn spawn_sidecars(s: &BoxState, server: &str, mode: &str) -> Result<Vec<u32>> {
    let server_ip = s.pod_ip(server)?;
    let mut pids = Vec::new();
    let conf = |name: &str, bind: String, to: String| -> Result<String> {
        let path = s.dir.join(format!("haproxy-{name}.cfg"));
        std::fs::write(
            &path,
            format!(
                "global\n  maxconn 4000\ndefaults\n  mode {mode}\n  timeout connect 5s\n  timeout client 120s\n  \
                 timeout server 120s\nlisten sidecar\n  bind {bind}\n  server upstream {to}\n"
            ),
        )?;
        Ok(path.display().to_string())
    };
    for (pod, cfg) in [
        (
            "client",
            conf("client", "127.0.0.1:15001".into(), format!("{server_ip}:15006"))?,
        ),
        (
            server,
            conf(server, format!("{server_ip}:15006"), "127.0.0.1:8080".into())?,
        ),
    ] {
        let child = s
            .pod_command(pod, "haproxy", &["-f", &cfg, "-db", "-q"])?
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting haproxy (cargo xtask deps installs it)")?;
        pids.push(child.id());
    }
    Ok(pids)
}

/// A command's trimmed stdout, or nothing (for the report's machine line).
pub fn sh(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// Runs every scenario and writes `<out>.json` and `<out>.md`.
pub fn bench(sizes: Sizes, quick: bool, bins: &Path, out: &Path) -> Result<()> {
    let started = Instant::now();
    // Before minutes of runs: the HTTP rows need wrk and h2load.
    crate::bench_http::check_tools()?;
    let mut rows = Vec::new();
    for sc in SCENARIOS {
        eprintln!("bench: {} ...", sc.name);
        rows.push(run(sc, sizes, bins)?);
    }
    let splice = splice_rows(bins, if quick { 1 } else { 5 })?;
    // The standard tools (iperf3, sockperf) against issue 18's targets.
    let std_sizes = if quick {
        crate::bench_std::QUICK
    } else {
        crate::bench_std::FULL
    };
    let std_rows = crate::bench_std::rows(std_sizes, bins)?;
    let http_sizes = if quick {
        crate::bench_http::QUICK
    } else {
        crate::bench_http::FULL
    };
    let http = crate::bench_http::rows(http_sizes, bins)?;
    // Issue 18: RSS with 10,000 pods of config (the quick run: 1,000).
    let pods = if quick { 1_000 } else { 10_000 };
    eprintln!("bench: agent memory with {pods} workloads ...");
    let conns = if quick { 1_000 } else { 10_000 };
    let (rss_small, rss_conns, rss_pods) = rss_with_workloads(bins, pods, conns)?;
    let machine = serde_json::json!({
        "agent_rss_kib_demo_config": rss_small,
        "agent_rss_kib_with_workloads_and_services": rss_pods,
        "workloads_and_services_added": pods,
        "agent_rss_kib_after_new_connections": rss_conns,
        "new_connections": conns,
        "kernel": sh("uname", &["-r"]),
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "commit": sh("git", &["rev-parse", "--short", "HEAD"]),
        "quick": quick,
        "echo_bytes": sizes.echo_bytes,
        "rr_count": sizes.rr_count,
        "rr_new_count": sizes.rr_new_count,
        "seconds": started.elapsed().as_secs(),
    });
    std::fs::write(
        out.with_extension("json"),
        serde_json::to_vec_pretty(
            &serde_json::json!({"machine": machine, "rows": rows, "splice": splice, "http": http, "std": std_rows}),
        )?,
    )?;
    let base = |name: &str| rows.iter().find(|r| r.scenario == name);
    let mut md = crate::bench_std::markdown(&std_rows, std_sizes);
    md.push_str("\n## Ferry's own clients, the sidecar model, splicing, HTTP\n\n");
    md.push_str(
        "| scenario | echo Gbit/s (each way) | vs direct | rr p50 µs | rr p99 µs | rr p99.9 µs | p99 vs direct | new-conn p50 µs | new-conn p99 µs | new conns/s |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in &rows {
        let b = base(&r.baseline).expect("baseline runs first");
        md.push_str(&format!(
            "| {} | {:.2} | {:.2}× | {} | {} | {} | {:.2}× | {} | {} | {:.0} |\n",
            r.scenario,
            r.echo_gbit_s,
            r.echo_gbit_s / b.echo_gbit_s,
            r.rr_p50_us,
            r.rr_p99_us,
            r.rr_p999_us,
            r.rr_p99_us as f64 / b.rr_p99_us.max(1) as f64,
            r.new_conn_p50_us,
            r.new_conn_p99_us,
            r.new_conns_per_s
        ));
    }
    md.push_str(
        "\n| scenario | fixed-rate p50 µs | fixed-rate p99 µs | fixed-rate p99.9 µs | 4 streams Gbit/s | proxy CPU s / GiB | proxy CPU s / 10k rr | proxy RSS idle KiB | proxy RSS after KiB |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in &rows {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {:.2} | {:.2} | {:.2} | {} | {} |\n",
            r.scenario,
            r.fixed_p50_us,
            r.fixed_p99_us,
            r.fixed_p999_us,
            r.echo4_gbit_s,
            r.agent_cpu_s_per_gib,
            r.agent_cpu_s_per_10k_rr,
            r.agent_rss_idle_kib,
            r.agent_rss_after_kib
        ));
    }
    md.push_str(
        "\n| scenario | rr p90 µs | fixed-rate p90 µs | new-conn p90 µs | 1 KiB rr p50 / p90 / p99 / p99.9 µs | 1 KiB new-conn p50 / p90 / p99 / p99.9 µs |\n|---|---|---|---|---|---|\n",
    );
    for r in &rows {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} / {} / {} / {} | {} / {} / {} / {} |\n",
            r.scenario,
            r.rr_p90_us,
            r.fixed_p90_us,
            r.new_conn_p90_us,
            r.rr1k_p50_us,
            r.rr1k_p90_us,
            r.rr1k_p99_us,
            r.rr1k_p999_us,
            r.new_conn1k_p50_us,
            r.new_conn1k_p90_us,
            r.new_conn1k_p99_us,
            r.new_conn1k_p999_us
        ));
    }
    md.push_str(&format!(
        "\nAgent RSS with the demo config: {rss_small} KiB; after {conns} new connections through it (mTLS, \
         half across nodes): {rss_conns} KiB; then with {pods} more workloads and {pods} services: {rss_pods} KiB.\n"
    ));
    md.push_str(
        "\n### sk_msg splicing, same node (iperf3, throughput only)\n\nSplicing stays off by default: on this \
         kernel a reader blocked in `recv()` on a spliced socket loses the tail at half-close \
         (docs/architecture.md), so the echo and rr clients above cannot run spliced. iperf3's reads are \
         non-blocking, so it shows what splicing would buy. `spliced msgs`: what `ferry_sk_msg` moved \
         (node1's `splice_msgs` counter).\n\n| scenario | Gbit/s client → server | Gbit/s server → client (-R) | \
         spliced msgs |\n|---|---|---|---|\n",
    );
    for r in &splice {
        md.push_str(&match &r.error {
            None => format!(
                "| {} | {:.2} | {:.2} | {} |\n",
                r.scenario, r.forward_gbit_s, r.reverse_gbit_s, r.spliced_msgs
            ),
            Some(e) => format!("| {} | failed: {e} | | |\n", r.scenario),
        });
    }
    md.push_str(&crate::bench_http::markdown(&http, http_sizes));
    md.push_str(&format!("\nMachine: {machine}\n"));
    let cmd = if quick {
        "cargo xtask bench --quick"
    } else {
        "cargo xtask bench"
    };
    let md = format!(
        "# Benchmarks\n\nGenerated by `{cmd}` (release builds, as root, on the cluster-in-a-box; every \
         scenario back to back in one run). Ratios are against the direct pod-to-pod path on the same \
         placement (same node or across nodes). Raw figures: `benchmarks.json` next to this file.\n\n\
         - echo: one connection, the client sends {} MiB and reads them back concurrently; Gbit/s each way.\n\
         - rr: 1-byte request/response round trips over one connection ({} of them), closed loop; the \
         third table repeats rr and new-conn with 1 KiB messages (half as many).\n\
         - new-conn: connect + 1-byte round trip, new connection each time ({}); conns/s is closed-loop.\n\
         - 4 streams: four echo connections at once, aggregate each way. Proxy CPU: utime+stime of the \
         proxies during the runs (both agents; in the sidecar row, the two HAProxy sidecars); proxy RSS: the \
         largest one's VmRSS (per node for an agent, per pod for a sidecar: a node with N meshed pods runs N \
         sidecars).\n\
         - fixed-rate: {} 1-byte round trips at {}/s on a schedule; each latency counts from when the \
         request was due, so stalls are not hidden (no coordinated omission).\n\
         - sidecar model: HAProxy (Debian) as a plain L4 proxy in each pod, the client app talking to its \
         local sidecar; compare with Ferry's cross-node plain path (neither uses TLS).\n\
         - Splicing on/off is measured apart, with iperf3 (below): it breaks the blocking readers used here.\n\
         - The control plane at scale (10,000 pods, 50 simulated agents) is the second part of the run: benchmarks-control-plane.md.\n         - First, issue 18's targets measured with the standard tools (iperf3 1 and 4 streams both ways, \
         sockperf ping-pong and under load; alone: `ferry-bench bench --only std`). What moved those \
         figures, with before and after, and why the targets not reached are not: performance.md.\n\n{md}",
        sizes.echo_bytes >> 20,
        sizes.rr_count,
        sizes.rr_new_count,
        sizes.fixed_count,
        sizes.fixed_rate
    );
    std::fs::write(out.with_extension("svg"), latency_svg(&rows))?;
    let name = out
        .with_extension("svg")
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let md = format!("{md}\n![fixed-rate latency per scenario]({name})\n");
    std::fs::write(out.with_extension("md"), &md)?;
    print!("{md}");
    Ok(())
}

/// sk_msg splicing on vs off, same node, as throughput only: iperf3 (its
/// reads are non-blocking, so the kernel bug that keeps splicing off — a
/// blocked `recv()` on a spliced socket losing the tail at half-close — does
/// not bite it). Returns (forward, reverse) Gbit/s client -> echo-1 and the
/// messages sk_msg moved (proof that splicing happened).
pub fn iperf_same_node(bins: &Path, mesh: bool, splice: bool, secs: u32) -> Result<(f64, f64, u64)> {
    let mut spec = Spec::demo();
    spec.splice = splice;
    for p in &mut spec.pods {
        p.enrolled = mesh;
    }
    spec.mtls = false;
    spec.access_log.mode = ferry_model::access_log::Mode::Off;
    let b = ClusterBox::up(spec, bins.to_owned())?;
    let s = &b.state;
    let mut server = s
        .pod_command("echo-1", "iperf3", &["-s", "-p", "5201"])?
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting iperf3 (cargo xtask deps installs it)")?;
    let to = s.pod_ip("echo-1")?.to_string();
    let run = |reverse: bool| -> Result<f64> {
        let t = secs.to_string();
        let mut args = vec!["-c", &to, "-p", "5201", "-t", &t, "-J"];
        if reverse {
            args.push("-R");
        }
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let out = s.pod_command("client", "iperf3", &args)?.output()?;
            let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            if let Some(bps) = v["end"]["sum_received"]["bits_per_second"].as_f64() {
                return Ok(bps / 1e9);
            }
            // The server may not listen yet.
            anyhow::ensure!(
                Instant::now() < deadline,
                "iperf3 failed: {}",
                v["error"]
                    .as_str()
                    .map_or_else(|| String::from_utf8_lossy(&out.stdout).into_owned(), str::to_owned)
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    };
    let fwd = run(false);
    let rev = run(true);
    let _ = server.kill();
    let _ = server.wait();
    let spliced = s.bpf_stats(0).map(|m| m["splice_msgs"]).unwrap_or(0);
    Ok((fwd?, rev?, spliced))
}

#[derive(Debug, Serialize)]
pub struct SpliceRow {
    pub scenario: &'static str,
    pub forward_gbit_s: f64,
    pub reverse_gbit_s: f64,
    pub spliced_msgs: u64,
    /// Why the spliced run failed (it is off by default for lack of
    /// backpressure among other things): reported, not fatal to the bench.
    pub error: Option<String>,
}

fn splice_rows(bins: &Path, secs: u32) -> Result<Vec<SpliceRow>> {
    let mut rows = Vec::new();
    for (scenario, mesh, splice) in [
        ("direct same-node", false, false),
        ("ferry same-node, splice off (default)", true, false),
        ("ferry same-node, splice on", true, true),
    ] {
        eprintln!("bench: iperf3 {scenario} ...");
        let row = match iperf_same_node(bins, mesh, splice, secs) {
            Ok((forward_gbit_s, reverse_gbit_s, spliced_msgs)) => SpliceRow {
                scenario,
                forward_gbit_s,
                reverse_gbit_s,
                spliced_msgs,
                error: None,
            },
            Err(e) if splice => SpliceRow {
                scenario,
                forward_gbit_s: 0.0,
                reverse_gbit_s: 0.0,
                spliced_msgs: 0,
                error: Some(e.to_string()),
            },
            Err(e) => return Err(e),
        };
        rows.push(row);
    }
    Ok(rows)
}
