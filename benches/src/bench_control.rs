//! The control plane at scale: a generated cluster (by default 10,000 pods,
//! 1,000 services, 50 nodes) in a YAML directory, the real ferry-control
//! binary reading it, and one simulated agent per node speaking the real
//! protocol over TLS (subscribe, ACK every response). Measures the time to
//! the first full sync of every node, the control plane's memory, and the
//! time from a change written to its arrival at each agent.

use std::{
    collections::BTreeMap,
    net::TcpListener,
    path::Path,
    process::{Child, Command},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use ferry_api::{
    channel::{with_token, ControlEndpoint},
    discovery::{self as pb, discovery_client::DiscoveryClient},
};
use futures::{channel::mpsc, SinkExt};
use serde::Serialize;

use crate::bench::{rss_kib, sh};

#[derive(Clone, Copy, Debug, Serialize)]
pub struct Scale {
    pub pods: usize,
    pub services: usize,
    pub nodes: usize,
    pub changes: usize,
}

pub const FULL: Scale = Scale {
    pods: 10_000,
    services: 1_000,
    nodes: 50,
    changes: 100,
};
pub const QUICK: Scale = Scale {
    pods: 500,
    services: 50,
    nodes: 5,
    changes: 10,
};

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub scale: Option<Scale>,
    /// ferry-control start to its first snapshot of the whole directory.
    pub load_ms: u64,
    /// Every node subscribed at once: until the last one held its full set.
    pub initial_sync_ms: u64,
    /// Resources a node holds after sync (its pods + mesh members + services).
    pub resources_per_node: usize,
    pub control_rss_kib_idle: u64,
    pub control_rss_kib_synced: u64,
    /// Change written to the YAML directory -> response at an agent.
    pub change_p50_ms: f64,
    pub change_p99_ms: f64,
    pub change_max_ms: f64,
    pub samples: usize,
}

/// Per simulated agent: when each response arrived and what it named.
type Log = Arc<Mutex<Vec<(Instant, Vec<String>, usize)>>>;

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn http_get(port: u16, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    write!(s, "GET {path} HTTP/1.0\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    Ok(resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default())
}

fn write_cluster(dir: &Path, s: Scale) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("namespace.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: default, labels: {ferry.dev/mesh: enabled}}\n",
    )?;
    let mut svcs = String::new();
    for k in 0..s.services {
        svcs.push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{k}}}\nspec: {{clusterIP: 10.96.{}.{}, selector: {{app: svc-{k}}}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n",
            k / 250, k % 250 + 1
        ));
    }
    std::fs::write(dir.join("services.yaml"), svcs)?;
    for n in 0..s.nodes {
        let mut pods = String::new();
        for i in (n..s.pods).step_by(s.nodes) {
            pods.push_str(&format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: pod-{i}, uid: uid-{i}, labels: {{app: svc-{}}}}}\nspec: {{nodeName: n{n}, serviceAccountName: sa-{}, containers: [{{name: c}}]}}\nstatus: {{phase: Running, podIP: 10.{}.{}.{}}}\n",
                i % s.services, i % 10, 100 + i / 62500, i / 250 % 250, i % 250 + 1
            ));
        }
        std::fs::write(dir.join(format!("pods-n{n}.yaml")), pods)?;
    }
    write_change(dir, 0)
}

/// One enrolled pod whose label changes: one resource for every node.
fn write_change(dir: &Path, rev: usize) -> Result<()> {
    let tmp = dir.join(".change.tmp");
    std::fs::write(
        &tmp,
        format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: mover, uid: mover, labels: {{rev: \"{rev}\"}}}}\nspec: {{nodeName: n0, containers: [{{name: c}}]}}\nstatus: {{podIP: 10.250.0.1}}\n"),
    )?;
    std::fs::rename(tmp, dir.join("change.yaml"))?;
    Ok(())
}

async fn agent(control: ControlEndpoint, node: String, token: String, log: Log) -> Result<()> {
    let ch = control.connect().await?;
    let (mut tx, rx) = mpsc::unbounded();
    tx.send(pb::DiscoveryRequest {
        node,
        ..Default::default()
    })
    .await?;
    let mut stream = DiscoveryClient::new(ch)
        .stream(with_token(rx, &token)?)
        .await?
        .into_inner();
    let mut held = 0usize;
    while let Some(r) = stream.message().await? {
        let at = Instant::now();
        held = held + r.resources.len() - r.removed.len().min(held);
        let names = r.resources.iter().map(|x| x.name.clone()).collect();
        log.lock().unwrap_or_else(|e| e.into_inner()).push((at, names, held));
        tx.send(pb::DiscoveryRequest {
            response_nonce: r.nonce,
            ..Default::default()
        })
        .await?;
    }
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn run(scale: Scale, bins: &Path, work: &Path) -> Result<Report> {
    let dir = work.join("cluster");
    write_cluster(&dir, scale)?;
    let tokens: BTreeMap<String, String> = (0..scale.nodes)
        .map(|n| (format!("n{n}"), format!("token-{n}")))
        .collect();
    std::fs::write(work.join("tokens.yaml"), serde_norway::to_string(&tokens)?)?;
    let (port, admin) = (free_port()?, free_port()?);
    let started = Instant::now();
    let control = Kill(
        Command::new(bins.join("ferry-control"))
            .args(["--ca-dir", &work.join("ca").display().to_string()])
            .args(["--cluster-dir", &dir.display().to_string()])
            .args(["--tokens", &work.join("tokens.yaml").display().to_string()])
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--admin",
                &format!("127.0.0.1:{admin}"),
            ])
            .env("FERRY_LOG", "info")
            .stdout(std::fs::File::create(work.join("control.log"))?)
            .spawn()
            .context("starting ferry-control")?,
    );
    let pid = control.0.id();
    // Loaded: the admin endpoint reports every pod.
    let want_pods = scale.pods + 1;
    loop {
        let body = http_get(admin, "/version").unwrap_or_default();
        let v = serde_json::from_str::<serde_json::Value>(&body).unwrap_or_default();
        if v["pods"].as_u64() == Some(want_pods as u64) {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("ferry-control did not load {want_pods} pods; its /version: {body}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut report = Report {
        scale: Some(scale),
        load_ms: started.elapsed().as_millis() as u64,
        control_rss_kib_idle: rss_kib(pid),
        ..Default::default()
    };
    let control_endpoint = ControlEndpoint::from_ca_file(
        &format!("https://127.0.0.1:{port}"),
        &work.join("ca").join("ca.cert.pem"),
    )?;
    let rt = tokio::runtime::Runtime::new()?;
    let logs: Vec<Log> = (0..scale.nodes).map(|_| Log::default()).collect();
    let t0 = Instant::now();
    for (n, log) in logs.iter().enumerate() {
        let a = agent(
            control_endpoint.clone(),
            format!("n{n}"),
            tokens[&format!("n{n}")].clone(),
            log.clone(),
        );
        rt.spawn(async move {
            if let Err(e) = a.await {
                eprintln!("simulated agent: {e:#}");
            }
        });
    }
    let synced = |logs: &[Log]| {
        logs.iter()
            .all(|l| !l.lock().unwrap_or_else(|e| e.into_inner()).is_empty())
    };
    while !synced(&logs) {
        if t0.elapsed() > Duration::from_secs(120) {
            bail!("agents did not sync in 120 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    report.initial_sync_ms = t0.elapsed().as_millis() as u64;
    report.resources_per_node = logs[0].lock().unwrap_or_else(|e| e.into_inner())[0].2;
    report.control_rss_kib_synced = rss_kib(pid);

    let mut lat = Vec::new();
    for rev in 1..=scale.changes {
        let seen_before: Vec<usize> = logs
            .iter()
            .map(|l| l.lock().unwrap_or_else(|e| e.into_inner()).len())
            .collect();
        let t = Instant::now();
        write_change(&dir, rev)?;
        for (l, before) in logs.iter().zip(&seen_before) {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let got = l.lock().unwrap_or_else(|e| e.into_inner())[*before..]
                    .iter()
                    .find(|(_, names, _)| names.iter().any(|n| n == "workload/mover"))
                    .map(|(at, _, _)| *at);
                if let Some(at) = got {
                    lat.push(at.duration_since(t).as_secs_f64() * 1000.0);
                    break;
                }
                if Instant::now() > deadline {
                    bail!("change {rev} did not reach every agent in 10 s");
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
    lat.sort_by(f64::total_cmp);
    report.change_p50_ms = percentile(&lat, 0.50);
    report.change_p99_ms = percentile(&lat, 0.99);
    report.change_max_ms = lat.last().copied().unwrap_or(0.0);
    report.samples = lat.len();
    drop(rt);
    drop(control);
    Ok(report)
}

/// Runs and writes `<out>.json` and `<out>.md`.
pub fn bench(scale: Scale, bins: &Path, out: &Path) -> Result<Report> {
    let work = std::env::temp_dir().join(format!("ferry-cp-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let r = run(scale, bins, &work);
    if std::env::var_os("FERRY_BENCH_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&work);
    }
    let r = r?;
    let machine = serde_json::json!({
        "kernel": sh("uname", &["-r"]),
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "commit": sh("git", &["rev-parse", "--short", "HEAD"]),
    });
    std::fs::write(
        out.with_extension("json"),
        serde_json::to_vec_pretty(&serde_json::json!({"machine": machine, "report": r}))?,
    )?;
    let md = format!(
        "# Control-plane benchmark\n\nGenerated by `cargo xtask bench` (its second part; alone: `FERRY_BIN_DIR=target/release target/release/ferry-bench bench-control`). A generated directory of Kubernetes YAML (pods spread over the nodes, every pod enrolled by its namespace label, services selecting 10 pods each), the real `ferry-control` binary (release) reading it, and one simulated agent per node in another process speaking the real protocol over TLS: subscribe, ACK every response. Code: `benches/src/bench_control.rs`.\n\n- load: ferry-control start until its admin endpoint reports every pod;\n- initial sync: all agents subscribe at once, until the last has its full first snapshot;\n- resources per node: the node's own pods, every enrolled pod elsewhere, every service;\n- change → agent: one enrolled pod's label rewritten in the directory ({} times); from the file write to each agent's receipt (inotify, reparse of that file, recompute of the whole view, diff, stream).\n\n| pods | services | nodes (simulated agents) | load | initial sync (all nodes) | resources per node | control RSS idle / synced | change → agent p50 / p99 / max ({} samples) |\n|---|---|---|---|---|---|---|---|\n| {} | {} | {} | {} ms | {} ms | {} | {} / {} MiB | {:.1} / {:.1} / {:.1} ms |\n\nMachine: {machine}\n",
        scale.changes,
        r.samples,
        scale.pods,
        scale.services,
        scale.nodes,
        r.load_ms,
        r.initial_sync_ms,
        r.resources_per_node,
        r.control_rss_kib_idle / 1024,
        r.control_rss_kib_synced / 1024,
        r.change_p50_ms,
        r.change_p99_ms,
        r.change_max_ms,
    );
    std::fs::write(out.with_extension("md"), md)?;
    Ok(r)
}
