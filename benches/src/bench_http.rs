//! The HTTP rows of `cargo xtask bench` (issues 12 and 18): standard load
//! generators through Ferry's L4 and L7 paths, direct, and the HAProxy
//! sidecar model in HTTP mode, on the box placements, back to back in one run.
//!
//! - `wrk` (HTTP/1.1, keep-alive): closed loop for a fixed duration; latency
//!   percentiles from wrk's own histogram (a Lua `done` hook prints them as
//!   one JSON line).
//! - `h2load` (HTTP/2 cleartext with prior knowledge): a bounded request
//!   count; percentiles from its per-request log (`--log-file`).
//!
//! The server is the sample app's HTTP mode (`ferry-workload http serve`,
//! a ~250-byte JSON answer) on port 8080 of echo-1 (the client's node) or
//! echo-2 (the other node); the client is the `client` pod. Ferry L4 is a
//! Service port named `tcp-web` (opaque TCP, the L4 path); Ferry L7 a Service
//! port named `http` (served per request by the source agent). Both Services
//! select the same pod, so the path is the only difference. The box writes
//! every Service port as `tcp`, so the ports are renamed in the agents'
//! config files once the box is up.
//!
//! Proxy CPU: utime + stime of both agents (or both HAProxy sidecars) around
//! each load run, per 10k requests answered. `l7_requests_seen`: what the
//! client node's agent counted in `istio_requests_total` (reporter source)
//! during the run, the proof of which path the requests took (0 on L4 rows).
//! Every run is bounded: wrk by its duration, h2load by its request count,
//! both by a kill deadline.

use std::{
    io::Read,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;
use serde_json::Value;

use ferry_box::{sample_value, BoxState, ClusterBox, ServiceSpec, Spec};
use ferry_model::Protocol;

use crate::bench::{proxies_cpu, spawn_sidecars};

#[derive(Clone, Copy, Debug, Serialize)]
pub struct HttpSizes {
    /// wrk: seconds per run, threads, connections (keep-alive).
    pub wrk_secs: u32,
    pub wrk_threads: u32,
    pub wrk_conns: u32,
    /// h2load: connections, streams in flight per connection, requests per run.
    pub h2_conns: u32,
    pub h2_streams: u32,
    pub h2_requests: u64,
    /// Requests before each measured run (pools, tunnel, ARP), per protocol.
    pub warmup: u64,
}

pub const QUICK: HttpSizes = HttpSizes {
    wrk_secs: 2,
    wrk_threads: 2,
    wrk_conns: 32,
    h2_conns: 8,
    h2_streams: 16,
    h2_requests: 20_000,
    warmup: 200,
};
pub const FULL: HttpSizes = HttpSizes {
    wrk_secs: 5,
    wrk_threads: 2,
    wrk_conns: 32,
    h2_conns: 8,
    h2_streams: 16,
    h2_requests: 100_000,
    warmup: 1_000,
};

/// The server's port in echo-1 and echo-2.
const APP_PORT: u16 = 8080;

/// (Service, VIP, endpoint pod): port 80 -> APP_PORT; `-http` ones get a
/// port named `http`, the others `tcp-web`.
const SERVICES: &[(&str, [u8; 4], &str)] = &[
    ("web-same-http", [10, 96, 0, 30], "echo-1"),
    ("web-same-tcp", [10, 96, 0, 31], "echo-1"),
    ("web-cross-http", [10, 96, 0, 32], "echo-2"),
    ("web-cross-tcp", [10, 96, 0, 33], "echo-2"),
];

fn vip(service: &str) -> String {
    let (_, ip, _) = SERVICES.iter().find(|(n, _, _)| *n == service).expect("known service");
    format!("http://{}.{}.{}.{}:80/", ip[0], ip[1], ip[2], ip[3])
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Tool {
    Wrk,
    H2load,
}

impl Tool {
    pub fn as_str(self) -> &'static str {
        match self {
            Tool::Wrk => "wrk",
            Tool::H2load => "h2load",
        }
    }
    fn protocol(self) -> &'static str {
        match self {
            Tool::Wrk => "HTTP/1.1",
            Tool::H2load => "h2c",
        }
    }
}

#[derive(Debug, Serialize)]
pub struct HttpRow {
    pub scenario: String,
    /// The direct scenario on the same placement (its ratios' base).
    pub baseline: String,
    pub tool: Tool,
    /// Requests answered 2xx, and everything else (socket errors, other
    /// statuses, h2load's failed requests).
    pub requests: u64,
    pub errors: u64,
    pub req_per_s: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    /// CPU seconds of the proxies (both agents, or both sidecars) per 10k
    /// requests answered.
    pub proxy_cpu_s_per_10k: f64,
    /// Requests the client node's agent counted as L7 during the run.
    pub l7_requests_seen: u64,
}

/// What one load run measured.
struct Load {
    requests: u64,
    errors: u64,
    req_per_s: f64,
    p50_us: u64,
    p90_us: u64,
    p99_us: u64,
    p999_us: u64,
}

/// Fails with what to install when a load generator is missing.
pub fn check_tools() -> Result<()> {
    let missing: Vec<&str> = [("wrk", "wrk"), ("h2load", "nghttp2-client"), ("haproxy", "haproxy")]
        .into_iter()
        .filter(|(cmd, _)| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {cmd} >/dev/null 2>&1")])
                .status()
                .is_ok_and(|s| s.success())
        })
        .map(|(cmd, pkg)| if cmd == pkg { cmd } else { pkg })
        .collect();
    if !missing.is_empty() {
        bail!(
            "the HTTP benchmark needs wrk, h2load and haproxy; missing Debian packages: {} \
             (`cargo xtask deps` installs them, or `apt-get install {}`)",
            missing.join(", "),
            missing.join(" ")
        );
    }
    Ok(())
}

/// Every HTTP row: a box without the mesh (direct, then the sidecar model),
/// a box with the mesh and mTLS (L4 and L7, both placements), a box with the
/// plain tunnel (cross-node L4 and L7, the sidecar model's peer).
pub fn rows(sizes: HttpSizes, bins: &Path) -> Result<Vec<HttpRow>> {
    check_tools()?;
    let mut rows = Vec::new();
    {
        let b = http_box(bins, false, false)?;
        let s = &b.state;
        for (placement, pod) in [("same-node", "echo-1"), ("cross-node", "echo-2")] {
            let url = format!("http://{}:{APP_PORT}/", s.pod_ip(pod)?);
            let name = format!("direct {placement}");
            measure(s, &name, &name, &url, &s.agent_pids, sizes, &mut rows)?;
        }
        let sidecars = spawn_sidecars(s, "echo-2", "http")?;
        let url = "http://127.0.0.1:15001/";
        let deadline = Instant::now() + Duration::from_secs(10);
        while warm_up(s, url, 1, false).is_err() {
            ensure!(Instant::now() < deadline, "HTTP sidecars did not come up");
            std::thread::sleep(Duration::from_millis(100));
        }
        measure(
            s,
            "sidecar model cross-node plain (HAProxy per pod, mode http)",
            "direct cross-node",
            url,
            &sidecars,
            sizes,
            &mut rows,
        )?;
    }
    {
        let b = http_box(bins, true, true)?;
        let s = &b.state;
        for (placement, suffix, same) in [("same-node", "", true), ("cross-node", " mTLS", false)] {
            let base = format!("direct {placement}");
            let svc = if same { "web-same" } else { "web-cross" };
            let l4 = format!("ferry L4 (tcp port) {placement}{suffix}");
            measure(
                s,
                &l4,
                &base,
                &vip(&format!("{svc}-tcp")),
                &s.agent_pids,
                sizes,
                &mut rows,
            )?;
            let l7 = format!("ferry L7 (http port) {placement}{suffix}");
            measure(
                s,
                &l7,
                &base,
                &vip(&format!("{svc}-http")),
                &s.agent_pids,
                sizes,
                &mut rows,
            )?;
        }
    }
    {
        let b = http_box(bins, true, false)?;
        let s = &b.state;
        let base = "direct cross-node";
        let l4 = "ferry L4 (tcp port) cross-node plain";
        measure(s, l4, base, &vip("web-cross-tcp"), &s.agent_pids, sizes, &mut rows)?;
        let l7 = "ferry L7 (http port) cross-node plain";
        measure(s, l7, base, &vip("web-cross-http"), &s.agent_pids, sizes, &mut rows)?;
    }
    Ok(rows)
}

/// The demo topology with the HTTP app on echo-1 and echo-2 and the four
/// Services of [`SERVICES`], their ports named for their protocol.
fn http_box(bins: &Path, mesh: bool, mtls: bool) -> Result<ClusterBox> {
    let mut spec = Spec::demo();
    spec.mtls = mtls;
    spec.access_log.mode = ferry_model::access_log::Mode::Off;
    for p in &mut spec.pods {
        p.enrolled = mesh;
    }
    for pod in ["echo-1", "echo-2"] {
        let args = ["http", "serve", "--name", pod, "--port", &APP_PORT.to_string()];
        spec.pod_args.push((pod.into(), args.map(str::to_owned).to_vec()));
    }
    spec.services = SERVICES
        .iter()
        .map(|(name, ip, pod)| ServiceSpec {
            name: (*name).into(),
            vip: (*ip).into(),
            port: 80,
            target_port: APP_PORT,
            endpoints: vec![(*pod).into()],
            from_manifest: false,
        })
        .collect();
    let b = ClusterBox::up(spec, bins.to_owned())?;
    let s = &b.state;
    let mut versions = Vec::new();
    for n in 0..s.spec.nodes {
        versions.push(s.config_version(n)?);
        let mut cfg = s.agent_config(n);
        for svc in &mut cfg.services {
            let http = svc.name.ends_with("-http");
            for p in &mut svc.ports {
                (p.name, p.protocol) = if http {
                    (Some("http".into()), Protocol::Http)
                } else {
                    (Some("tcp-web".into()), Protocol::Tcp)
                };
            }
        }
        let tmp = s.config_path(n).with_extension("tmp");
        std::fs::write(&tmp, serde_norway::to_string(&cfg)?)?;
        std::fs::rename(&tmp, s.config_path(n))?;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    for (n, v) in versions.into_iter().enumerate() {
        while s.config_version(n)? <= v {
            ensure!(
                Instant::now() < deadline,
                "node {} did not apply the named ports",
                n + 1
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(b)
}

/// Warm-up (and a check that the path answers): `count` requests with the
/// sample client, every one must answer 200.
fn warm_up(s: &BoxState, url: &str, count: u64, h2c: bool) -> Result<()> {
    let count_s = count.to_string();
    let mut args = vec![
        "http",
        "client",
        "--url",
        url,
        "--count",
        &count_s,
        "--concurrency",
        "8",
        "--timeout-ms",
        "2000",
    ];
    if h2c {
        args.push("--h2c");
    }
    let cmd = s.pod_command("client", &s.bin("ferry-workload"), &args)?;
    let out = output_within(cmd, Duration::from_secs(60), "warm-up client")?;
    let v: Value = serde_json::from_str(out.trim()).with_context(|| format!("warm-up client printed {out:?}"))?;
    ensure!(v["by_status"]["200"].as_u64() == Some(count), "warm-up of {url}: {v}");
    Ok(())
}

/// Both tools against `url`, each after a warm-up, into `rows`.
fn measure(
    s: &BoxState,
    scenario: &str,
    baseline: &str,
    url: &str,
    proxies: &[u32],
    sizes: HttpSizes,
    rows: &mut Vec<HttpRow>,
) -> Result<()> {
    for tool in [Tool::Wrk, Tool::H2load] {
        eprintln!("bench: http {scenario}, {} ({}) ...", tool.as_str(), tool.protocol());
        warm_up(s, url, sizes.warmup, tool == Tool::H2load)?;
        let seen0 = l7_seen(s);
        let cpu0 = proxies_cpu(proxies);
        let load = match tool {
            Tool::Wrk => wrk(s, url, sizes)?,
            Tool::H2load => h2load(s, url, sizes)?,
        };
        let cpu = proxies_cpu(proxies) - cpu0;
        ensure!(
            load.requests > 0,
            "{scenario}: {} got no answer from {url}",
            tool.as_str()
        );
        rows.push(HttpRow {
            scenario: scenario.into(),
            baseline: baseline.into(),
            tool,
            requests: load.requests,
            errors: load.errors,
            req_per_s: load.req_per_s,
            p50_us: load.p50_us,
            p90_us: load.p90_us,
            p99_us: load.p99_us,
            p999_us: load.p999_us,
            proxy_cpu_s_per_10k: cpu * 10_000.0 / load.requests as f64,
            l7_requests_seen: l7_seen(s).saturating_sub(seen0),
        });
    }
    Ok(())
}

/// `istio_requests_total` (reporter source) on node 1's agent, where the
/// client runs; 0 when it cannot be read (no mesh, metrics off).
fn l7_seen(s: &BoxState) -> u64 {
    let Ok(scrape) = s.scrape(0) else { return 0 };
    scrape
        .samples
        .iter()
        .filter(|x| x.metric == "istio_requests_total" && x.labels.get("reporter") == Some("source"))
        .map(|x| sample_value(&x.value))
        .filter(|v| v.is_finite())
        .sum::<f64>() as u64
}

/// wrk's `done` hook: one JSON line with the totals and the percentiles of
/// its latency histogram (µs).
const WRK_REPORT: &str = r#"done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"socket_errors":%d,"non_2xx":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d}\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    math.floor(latency:percentile(50)), math.floor(latency:percentile(90)),
    math.floor(latency:percentile(99)), math.floor(latency:percentile(99.9))))
end
"#;

fn wrk(s: &BoxState, url: &str, sizes: HttpSizes) -> Result<Load> {
    let script = s.dir.join("wrk-report.lua");
    std::fs::write(&script, WRK_REPORT)?;
    let (t, c, d) = (
        sizes.wrk_threads.to_string(),
        sizes.wrk_conns.max(sizes.wrk_threads).to_string(),
        format!("{}s", sizes.wrk_secs),
    );
    let script = script.display().to_string();
    let args = ["-t", &t, "-c", &c, "-d", &d, "--timeout", "5s", "-s", &script, url];
    let cmd = s.pod_command("client", "wrk", &args)?;
    let limit = Duration::from_secs(u64::from(sizes.wrk_secs) + 30);
    let out = output_within(cmd, limit, "wrk")?;
    let line = out
        .lines()
        .find(|l| l.starts_with("{\"requests\""))
        .with_context(|| format!("wrk printed no report: {out}"))?;
    let v: Value = serde_json::from_str(line)?;
    let u = |k: &str| v[k].as_u64().unwrap_or(0);
    let errors = u("socket_errors") + u("non_2xx");
    let requests = u("requests").saturating_sub(u("non_2xx"));
    let secs = (u("duration_us") as f64 / 1e6).max(1e-3);
    Ok(Load {
        requests,
        errors,
        req_per_s: requests as f64 / secs,
        p50_us: u("p50_us"),
        p90_us: u("p90_us"),
        p99_us: u("p99_us"),
        p999_us: u("p999_us"),
    })
}

fn h2load(s: &BoxState, url: &str, sizes: HttpSizes) -> Result<Load> {
    let log: PathBuf = s.dir.join("h2load.tsv");
    let _ = std::fs::remove_file(&log);
    let (n, c, m) = (
        sizes.h2_requests.to_string(),
        sizes.h2_conns.to_string(),
        sizes.h2_streams.to_string(),
    );
    let log_arg = format!("--log-file={}", log.display());
    let args = ["-n", &n, "-c", &c, "-m", &m, &log_arg, url];
    let cmd = s.pod_command("client", "h2load", &args)?;
    // At least 1,000 requests/s, or it is broken.
    let limit = Duration::from_secs(sizes.h2_requests / 1_000 + 30);
    let out = output_within(cmd, limit, "h2load")?;
    let field = |line: &str, after: &str| -> Option<f64> {
        out.lines()
            .find(|l| l.starts_with(line))?
            .split(',')
            .find_map(|part| part.trim().strip_suffix(after)?.trim().parse().ok())
    };
    let req_per_s = field("finished in", "req/s").with_context(|| format!("h2load output: {out}"))?;
    let succeeded = field("requests:", "succeeded").unwrap_or(0.0) as u64;
    let failed = field("requests:", "failed").unwrap_or(0.0) as u64;
    // Per request: start (µs since the epoch), status, duration (µs).
    let mut us: Vec<u64> = std::fs::read_to_string(&log)
        .with_context(|| format!("h2load log {}", log.display()))?
        .lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            let status: i64 = f.nth(1)?.parse().ok()?;
            let d: u64 = f.next()?.trim().parse().ok()?;
            (200..300).contains(&status).then_some(d)
        })
        .collect();
    us.sort_unstable();
    let p = |q: f64| {
        us.get(((us.len() as f64 * q) as usize).min(us.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    let non_2xx = succeeded.saturating_sub(us.len() as u64);
    let requests = us.len() as u64;
    Ok(Load {
        requests,
        errors: failed + non_2xx,
        // h2load's rate counts every finished request; scale to the 2xx ones.
        req_per_s: req_per_s * requests as f64 / succeeded.max(1) as f64,
        p50_us: p(0.50),
        p90_us: p(0.90),
        p99_us: p(0.99),
        p999_us: p(0.999),
    })
}

/// Runs `cmd` to completion, killed past `limit`; its stdout, or an error
/// with its output when it failed.
fn output_within(mut cmd: Command, limit: Duration, what: &str) -> Result<String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let pipe = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut r) = r {
                let _ = r.read_to_string(&mut s);
            }
            s
        })
    };
    let out = pipe(child.stdout.take().map(|r| Box::new(r) as Box<dyn Read + Send>));
    let err = pipe(child.stderr.take().map(|r| Box::new(r) as Box<dyn Read + Send>));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} ran past its {} s limit", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (out, err) = (out.join().unwrap_or_default(), err.join().unwrap_or_default());
    ensure!(status.success(), "{what} failed ({status}): {out}{err}");
    Ok(out)
}

/// The report's HTTP section (markdown): every row with its ratio to direct,
/// then what the L7 path adds over the L4 path on the same placement.
pub fn markdown(rows: &[HttpRow], sizes: HttpSizes) -> String {
    let mut md = format!(
        "\n### HTTP: wrk and h2load, direct vs Ferry L4 vs Ferry L7 vs the HAProxy sidecar model\n\n\
         The sample app's HTTP server (`ferry-workload http serve`, a ~250-byte JSON answer) in echo-1 \
         (same node as the client) or echo-2 (the other node), loaded from the client pod. \
         **wrk**: HTTP/1.1 keep-alive, {} threads, {} connections, {} s, closed loop. **h2load**: HTTP/2 \
         cleartext (prior knowledge), {} connections × {} streams, {} requests. Each run follows a warm-up \
         of {} requests. Ferry L4: a Service port named `tcp-web` (opaque TCP); Ferry L7: a Service port \
         named `http` (per-request routing by the source agent, pooled upstreams); both Services select \
         the same pod. Sidecar model: HAProxy `mode http` in each pod (no TLS: compare with the cross-node \
         plain rows). Proxy CPU: utime+stime of both agents (or both sidecars) per 10k requests answered. \
         L7 seen: requests the client node's agent counted in `istio_requests_total` during the run (0 means \
         the L4 path). Access logs off, metrics on.\n\n\
         | scenario | tool | req/s | vs direct | p50 µs | p90 µs | p99 µs | p99.9 µs | p99 vs direct | proxy CPU s / 10k req | errors | L7 seen |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
        sizes.wrk_threads,
        sizes.wrk_conns,
        sizes.wrk_secs,
        sizes.h2_conns,
        sizes.h2_streams,
        sizes.h2_requests,
        sizes.warmup
    );
    let find = |scenario: &str, tool: Tool| rows.iter().find(|r| r.scenario == scenario && r.tool == tool);
    for r in rows {
        let b = find(&r.baseline, r.tool);
        let ratio = |x: f64, base: Option<f64>| match base {
            Some(base) if base > 0.0 => format!("{:.2}×", x / base),
            _ => "–".into(),
        };
        md.push_str(&format!(
            "| {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {:.2} | {} | {} |\n",
            r.scenario,
            r.tool.as_str(),
            r.req_per_s,
            ratio(r.req_per_s, b.map(|b| b.req_per_s)),
            r.p50_us,
            r.p90_us,
            r.p99_us,
            r.p999_us,
            ratio(r.p99_us as f64, b.map(|b| b.p99_us as f64)),
            r.proxy_cpu_s_per_10k,
            r.errors,
            r.l7_requests_seen
        ));
    }
    md.push_str(
        "\nWhat the L7 path adds over the L4 path (same box, same placement, same tool; L7 minus L4):\n\n\
         | placement | tool | req/s L7 / L4 | p50 µs added | p99 µs added | proxy CPU s / 10k req added |\n\
         |---|---|---|---|---|---|\n",
    );
    for r7 in rows.iter().filter(|r| r.scenario.starts_with("ferry L7")) {
        let l4_name = r7.scenario.replace("ferry L7 (http port)", "ferry L4 (tcp port)");
        let Some(r4) = find(&l4_name, r7.tool) else { continue };
        let placement = r7.scenario.trim_start_matches("ferry L7 (http port) ");
        md.push_str(&format!(
            "| {} | {} | {:.2}× | {:+} | {:+} | {:+.2} |\n",
            placement,
            r7.tool.as_str(),
            r7.req_per_s / r4.req_per_s.max(1e-9),
            r7.p50_us as i64 - r4.p50_us as i64,
            r7.p99_us as i64 - r4.p99_us as i64,
            r7.proxy_cpu_s_per_10k - r4.proxy_cpu_s_per_10k
        ));
    }
    md
}

/// `ferry-bench bench --only http`: the HTTP rows alone, written as
/// `<out>.json` (`{"machine", "sizes", "http"}`) and `<out>.md`.
pub fn bench(sizes: HttpSizes, quick: bool, bins: &Path, out: &Path) -> Result<()> {
    let started = Instant::now();
    let rows = rows(sizes, bins)?;
    let machine = serde_json::json!({
        "kernel": crate::bench::sh("uname", &["-r"]),
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "commit": crate::bench::sh("git", &["rev-parse", "--short", "HEAD"]),
        "wrk": crate::bench::sh("sh", &["-c", "wrk -v 2>&1 | head -1"]),
        "h2load": crate::bench::sh("sh", &["-c", "h2load --version 2>&1 | head -1"]),
        "haproxy": crate::bench::sh("sh", &["-c", "haproxy -v 2>&1 | head -1"]),
        "quick": quick,
        "seconds": started.elapsed().as_secs(),
    });
    std::fs::write(
        out.with_extension("json"),
        serde_json::to_vec_pretty(&serde_json::json!({"machine": machine, "sizes": sizes, "http": rows}))?,
    )?;
    let cmd = if quick {
        "ferry-bench bench --only http --quick"
    } else {
        "ferry-bench bench --only http"
    };
    let md = format!(
        "# Benchmarks: HTTP only\n\nGenerated by `{cmd}` (as root, on the cluster-in-a-box; every scenario \
         back to back in one run).\n{}\nMachine: {machine}\n",
        markdown(&rows, sizes)
    );
    std::fs::write(out.with_extension("md"), &md)?;
    print!("{md}");
    Ok(())
}
