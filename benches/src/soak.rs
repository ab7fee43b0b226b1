//! The soak (issue 17): one cluster-in-a-box under sustained, mixed load,
//! bounded in time and in count, with the config churning and one agent
//! handed over to a successor in the middle. Owns `ferry-bench soak`
//! (`cargo xtask soak`; the quick version is `benches/tests/soak.rs`).
//!
//! On `Spec::demo()` with ferry-control streaming the config, plus a second
//! client pod on node 2 (same service account as `client`) and a spare echo
//! endpoint (`echo-3`, node 1, outside the Service at first):
//! - held connections: two `client hold` runs at once, `client` -> echo-1
//!   (same node) and `client-2` -> echo-1 (across nodes), half each, every
//!   one answered; repeated while the load runs (bounded rounds);
//! - request/response load: `client rr` runs (chunks of a bounded count),
//!   1 B, 1 KiB and 16 KiB over one connection and 1 B on a new connection
//!   each, within a node, across nodes and through the Service VIP (whose
//!   TCP route splits by weight over subsets), from both clients, on a few
//!   worker threads;
//! - byte-exact `client echo` transfers (checksummed), same node, across
//!   nodes and through the VIP, repeated while the load runs;
//! - churn, each step applied while load is in flight (the work queue is
//!   released phase by phase): endpoints scaled up, route weights changed,
//!   node 1's agent handed over (`ClusterBox::upgrade_agent`), an ALLOW
//!   policy that matches the clients, endpoints scaled down;
//! - both agents' RSS sampled once a second; after the load, the agents'
//!   connections drained, then (30 s at most) the leak checks: the heap in
//!   use (`ferry_heap_in_use_bytes`) back within max(50 %, 4 MiB) of its
//!   baseline, file descriptors within 16, and RSS within max(50 %, 48 MiB)
//!   (the heap glibc keeps in pieces after a burst; `ferry_box::sys`).
//!
//! Every failure a client sees is counted; the report (`<out>.json`,
//! `<out>.md`) is written either way, and the run fails (non-zero exit)
//! with the reasons unless every request, hold and echo succeeded and every
//! change applied, and memory and descriptors came back. Speed and memory
//! figures are reported, never asserted.

use std::{
    fmt::Write as _,
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Condvar, Mutex, MutexGuard,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use ferry_box::{BoxState, ClusterBox, PodSpec, Spec};
use serde::Serialize;

use ferry_box::sys::{fd_count, heap_allowance_kib, rss_allowance_kib, rss_kib};

/// Descriptors an agent may hold above its baseline after the load.
const FD_ALLOWANCE: u64 = 16;

/// How much a soak does.
pub struct Sizes {
    pub quick: bool,
    /// Connections held open at once (two holds of half each).
    pub conns: usize,
    /// Request/response round trips in all.
    pub requests: u64,
    /// Round trips per client run at most.
    pub chunk: u64,
    /// Bytes per checksummed echo transfer.
    pub echo_bytes: u64,
    /// Client runs in parallel.
    pub workers: usize,
    pub max_hold_rounds: usize,
    /// Echo rounds, spread over the load: round r of R starts once
    /// (r - 1) / R of the round trips have been taken (so some run through
    /// each change, the handover included).
    pub echo_rounds: usize,
    /// The load phase ends here whatever is left (left work = failure).
    pub load_deadline: Duration,
}

pub const FULL: Sizes = Sizes {
    quick: false,
    conns: 10_000,
    requests: 1_000_000,
    chunk: 5_000,
    echo_bytes: 64 << 20,
    workers: 4,
    max_hold_rounds: 30,
    echo_rounds: 12,
    load_deadline: Duration::from_secs(1800),
};

pub const QUICK: Sizes = Sizes {
    quick: true,
    conns: 500,
    requests: 20_000,
    chunk: 500,
    echo_bytes: 4 << 20,
    workers: 3,
    max_hold_rounds: 10,
    echo_rounds: 1,
    load_deadline: Duration::from_secs(240),
};

const VIP: &str = "10.96.0.10:80";
const POLICY_FILE: &str = "soak-authz.yaml";
const ROUTES_FILE: &str = "soak-routes.yaml";

/// Request classes: (name, message size, a new connection per request,
/// share of the requests).
const CLASSES: [(&str, usize, bool, u64); 4] = [
    ("1 B", 1, false, 4),
    ("1 KiB", 1024, false, 3),
    ("16 KiB", 16 * 1024, false, 2),
    ("1 B, new connection each", 1, true, 1),
];

/// A placement: its name, and the (client pod, destination) pairs used in turn.
type Placement = (&'static str, Vec<(&'static str, String)>);

fn placements(s: &BoxState) -> Result<Vec<Placement>> {
    let at = |pod: &str| -> Result<String> { Ok(format!("{}:8080", s.pod_ip(pod)?)) };
    Ok(vec![
        (
            "same node",
            vec![("client", at("echo-1")?), ("client-2", at("echo-2")?)],
        ),
        (
            "across nodes",
            vec![("client", at("echo-2")?), ("client-2", at("echo-1")?)],
        ),
        (
            "service VIP",
            vec![("client", VIP.to_owned()), ("client-2", VIP.to_owned())],
        ),
    ])
}

/// The soak's box: the demo, on ferry-control's stream, echo pods labelled
/// by version (route subsets), a second client on node 2 and a spare echo.
fn spec() -> Spec {
    let mut spec = Spec::demo();
    spec.discovery = true;
    for p in &mut spec.pods {
        match p.name.as_str() {
            "echo-1" => p.labels.push(("version".into(), "v1".into())),
            "echo-2" => p.labels.push(("version".into(), "v2".into())),
            _ => {}
        }
    }
    let label = |k: &str, v: &str| (k.to_owned(), v.to_owned());
    spec.pods.push(PodSpec {
        name: "client-2".into(),
        node: 1,
        enrolled: true,
        serve: vec![],
        labels: vec![label("app", "client")],
        annotations: vec![],
        // One identity for both clients: the policy step allows it.
        service_account: Some("client".into()),
    });
    spec.pods.push(PodSpec {
        name: "echo-3".into(),
        node: 0,
        enrolled: true,
        serve: vec![8080],
        labels: vec![label("app", "echo"), label("version", "v1")],
        annotations: vec![],
        service_account: None,
    });
    spec.cluster_yaml = vec![routes(50, 50)];
    spec
}

/// Subsets v1/v2 of the echo Service and a TCP route splitting by weight.
fn routes(v1: u32, v2: u32) -> (String, String) {
    (
        ROUTES_FILE.into(),
        format!(
            "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: echo, namespace: default}}
spec:
  host: echo
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: echo, namespace: default}}
spec:
  hosts: [echo]
  tcp:
  - route:
    - destination: {{host: echo, subset: v1}}
      weight: {v1}
    - destination: {{host: echo, subset: v2}}
      weight: {v2}
"
        ),
    )
}

/// An ALLOW policy on the echo pods that matches the soak's clients (so it
/// changes what is evaluated, not what is allowed).
fn policy() -> (String, String) {
    (
        POLICY_FILE.into(),
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: echo-allow-clients, namespace: default}
spec:
  selector: {matchLabels: {app: echo}}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: [\"cluster.local/ns/default/sa/client\"]
"
        .into(),
    )
}

#[derive(Serialize, Clone)]
pub struct ClassRow {
    pub class: String,
    pub placement: String,
    pub requests: u64,
    pub client_runs: usize,
    /// Medians over the client runs' percentiles (µs).
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    /// The worst client run's p99.9 (µs).
    pub worst_p999_us: u64,
}

#[derive(Serialize, Clone)]
pub struct HoldRow {
    pub round: usize,
    /// Seconds after the load started when the round began.
    pub at_s: f64,
    pub from: String,
    pub to: String,
    pub placement: String,
    pub conns: usize,
    pub answered: u64,
    pub servers: Vec<String>,
    pub secs: f64,
    pub error: Option<String>,
}

#[derive(Serialize, Clone)]
pub struct EchoRow {
    pub round: usize,
    /// Seconds after the load started when the transfer began.
    pub at_s: f64,
    pub placement: String,
    pub bytes: u64,
    pub ok: bool,
    pub ms: u64,
    pub error: Option<String>,
    /// For a failed transfer: what the agents and the kernel showed of it
    /// while it ran (the last snapshots before it ended, [`snapshot`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diagnosis: Option<String>,
}

#[derive(Serialize, Clone)]
pub struct StepRow {
    pub step: String,
    pub change: String,
    /// Seconds after the load started.
    pub at_s: f64,
    /// Round trips completed when the step began.
    pub requests_done: u64,
    pub took_ms: u64,
    pub ok: bool,
    pub error: Option<String>,
}

#[derive(Serialize, Clone, Default)]
pub struct Restart {
    pub node: usize,
    pub old_pid: u32,
    pub new_pid: u32,
    pub at_s: f64,
    pub takeover_ms: u64,
    /// Seconds after the load ended when the old agent exited (None: it
    /// did not within 30 s and was killed).
    pub old_agent_exited_after_s: Option<f64>,
}

#[derive(Serialize, Clone)]
pub struct Sample {
    pub t_s: f64,
    pub node: usize,
    pub pid: u32,
    pub rss_kib: u64,
}

#[derive(Serialize, Clone)]
pub struct RssRow {
    pub node: usize,
    pub baseline_kib: u64,
    pub peak_kib: u64,
    pub final_kib: u64,
    /// Allowed distance from the baseline: [`rss_allowance_kib`].
    pub bound_kib: u64,
    pub back_within_bound: bool,
    /// The heap in use (`ferry_heap_in_use_bytes`), KiB: the leak check.
    pub heap_baseline_kib: u64,
    pub heap_final_kib: u64,
    /// [`heap_allowance_kib`].
    pub heap_bound_kib: u64,
    pub heap_back: bool,
    /// Open file descriptors.
    pub fds_baseline: u64,
    pub fds_final: u64,
    pub fds_back: bool,
    /// Seconds of settling before `final_kib` was read.
    pub settle_s: f64,
}

#[derive(Serialize)]
pub struct Report {
    pub quick: bool,
    pub command: String,
    pub binaries: String,
    pub passed: bool,
    pub reasons: Vec<String>,
    pub wall_s: f64,
    pub load_s: f64,
    pub requests_expected: u64,
    /// Round trips completed (client runs that succeeded).
    pub requests: u64,
    /// Client runs that failed (round-trip runs, holds, echoes).
    pub failures: u64,
    pub failure_samples: Vec<String>,
    pub bytes_checked: u64,
    pub echo_ok: bool,
    pub held_conns_target: usize,
    pub classes: Vec<ClassRow>,
    pub holds: Vec<HoldRow>,
    pub echoes: Vec<EchoRow>,
    pub churn: Vec<StepRow>,
    pub restart: Restart,
    pub agent_conns_after: Vec<u64>,
    pub rss: Vec<RssRow>,
    pub rss_samples: Vec<Sample>,
}

/// One client run of round trips.
struct Chunk {
    class: usize,
    placement: usize,
    pod: &'static str,
    to: String,
    count: u64,
}

/// The work, released phase by phase so that every churn step meets load.
struct Queue {
    chunks: Vec<Chunk>,
    /// (next to take, released up to).
    pos: Mutex<(usize, usize)>,
    cv: Condvar,
    done: AtomicUsize,
    stop: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Queue {
    fn take(&self, deadline: Instant) -> Option<usize> {
        let mut g = lock(&self.pos);
        loop {
            if self.stop.load(Ordering::Relaxed) || Instant::now() >= deadline || g.0 >= self.chunks.len() {
                return None;
            }
            if g.0 < g.1 {
                g.0 += 1;
                return Some(g.0 - 1);
            }
            g = match self.cv.wait_timeout(g, Duration::from_millis(200)) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
    }
    fn release(&self, upto: usize) {
        let mut g = lock(&self.pos);
        g.1 = g.1.max(upto.min(self.chunks.len()));
        self.cv.notify_all();
    }
    fn taken(&self) -> usize {
        lock(&self.pos).0
    }
    /// Every chunk run, or no more will be.
    fn finished(&self, deadline: Instant) -> bool {
        self.done.load(Ordering::Relaxed) >= self.chunks.len()
            || self.stop.load(Ordering::Relaxed)
            || Instant::now() >= deadline
    }
}

/// The requests split over classes and placements by share, in chunks,
/// interleaved so that every class spans the run.
fn plan(s: &BoxState, sizes: &Sizes) -> Result<Vec<Chunk>> {
    let places = placements(s)?;
    let combos: Vec<(usize, usize, u64)> = (0..CLASSES.len())
        .flat_map(|c| (0..places.len()).map(move |p| (c, p, CLASSES[c].3)))
        .collect();
    let total_w: u64 = combos.iter().map(|c| c.2).sum();
    let mut counts: Vec<u64> = combos.iter().map(|c| sizes.requests * c.2 / total_w).collect();
    let short = sizes.requests - counts.iter().sum::<u64>();
    counts[0] += short;
    let mut per_combo: Vec<Vec<Chunk>> = Vec::new();
    for ((class, placement, _), count) in combos.iter().zip(counts) {
        let mut left = count;
        let mut list = Vec::new();
        let mut turn = 0;
        while left > 0 {
            let n = left.min(sizes.chunk.max(1));
            let (pod, to) = &places[*placement].1[turn % places[*placement].1.len()];
            list.push(Chunk {
                class: *class,
                placement: *placement,
                pod,
                to: to.clone(),
                count: n,
            });
            left -= n;
            turn += 1;
        }
        list.reverse();
        per_combo.push(list);
    }
    let mut out = Vec::new();
    while per_combo.iter().any(|l| !l.is_empty()) {
        for l in &mut per_combo {
            if let Some(c) = l.pop() {
                out.push(c);
            }
        }
    }
    Ok(out)
}

/// What the load threads record.
#[derive(Default)]
struct Tally {
    /// Per chunk that succeeded: (class, placement, count, p50, p99, p999).
    runs: Vec<(usize, usize, u64, u64, u64, u64)>,
    failures: u64,
    failure_samples: Vec<String>,
    holds: Vec<HoldRow>,
    echoes: Vec<EchoRow>,
}

impl Tally {
    fn fail(&mut self, what: String) {
        self.failures += 1;
        if self.failure_samples.len() < 20 {
            self.failure_samples.push(what);
        }
    }
}

fn short(e: &anyhow::Error) -> String {
    let s = format!("{e:#}");
    match s.char_indices().nth(400) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s,
    }
}

fn worker(s: &BoxState, q: &Queue, tally: &Mutex<Tally>, done_requests: &AtomicU64, deadline: Instant) {
    while let Some(i) = q.take(deadline) {
        let c = &q.chunks[i];
        let (_, size, new_conn, _) = CLASSES[c.class];
        let (count, size) = (c.count.to_string(), size.to_string());
        let mut args = vec![
            "client",
            "rr",
            "--to",
            c.to.as_str(),
            "--count",
            &count,
            "--size",
            &size,
        ];
        if new_conn {
            args.push("--new-conn");
        }
        let limit = deadline
            .saturating_duration_since(Instant::now())
            .clamp(Duration::from_secs(1), Duration::from_secs(600));
        let r = s.workload_json(c.pod, &args, limit);
        let got = r.and_then(|v| {
            let f = |k: &str| v[k].as_u64().with_context(|| format!("rr printed no {k}: {v}"));
            let n = f("count")?;
            if n != c.count {
                bail!("rr ran {n} of {}", c.count);
            }
            Ok((f("p50_us")?, f("p99_us")?, f("p999_us")?))
        });
        let mut t = lock(tally);
        match got {
            Ok((p50, p99, p999)) => {
                t.runs.push((c.class, c.placement, c.count, p50, p99, p999));
                done_requests.fetch_add(c.count, Ordering::Relaxed);
            }
            Err(e) => t.fail(format!(
                "rr {} from {} to {} ({} requests): {}",
                CLASSES[c.class].0,
                c.pod,
                c.to,
                c.count,
                short(&e)
            )),
        }
        drop(t);
        q.done.fetch_add(1, Ordering::Relaxed);
    }
}

/// Rounds of two holds at once (same node and across nodes) while the load
/// runs; at least one round.
fn holder(s: &BoxState, sizes: &Sizes, q: &Queue, tally: &Mutex<Tally>, t0: Instant, deadline: Instant) -> Result<()> {
    let echo1 = format!("{}:8080", s.pod_ip("echo-1")?);
    let half = sizes.conns / 2;
    let runs = [
        ("client", "same node", half),
        ("client-2", "across nodes", sizes.conns - half),
    ];
    let timeout = if sizes.quick { 60u64 } else { 300 };
    for round in 1..=sizes.max_hold_rounds {
        if round > 1 && q.finished(deadline) {
            break;
        }
        let at_s = t0.elapsed().as_secs_f64();
        let rows: Vec<HoldRow> = std::thread::scope(|sc| {
            let hs: Vec<_> = runs
                .iter()
                .map(|(from, placement, n)| {
                    let echo1 = &echo1;
                    sc.spawn(move || {
                        let t = Instant::now();
                        let (n_s, t_s) = (n.to_string(), timeout.to_string());
                        let args = [
                            "client",
                            "hold",
                            "--to",
                            echo1.as_str(),
                            "--conns",
                            &n_s,
                            "--timeout-secs",
                            &t_s,
                        ];
                        let r = s.workload_json(from, &args, Duration::from_secs(timeout + 15));
                        let mut row = HoldRow {
                            round,
                            at_s,
                            from: from.to_string(),
                            to: echo1.clone(),
                            placement: placement.to_string(),
                            conns: *n,
                            answered: 0,
                            servers: vec![],
                            secs: 0.0,
                            error: None,
                        };
                        match r {
                            Ok(v) => {
                                row.answered = v["answered"].as_u64().unwrap_or(0);
                                row.servers = v["servers"]
                                    .as_array()
                                    .map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect())
                                    .unwrap_or_default();
                                if row.answered != *n as u64 || row.servers != ["echo-1"] {
                                    row.error = Some(format!(
                                        "answered {} of {n}, by {}",
                                        row.answered,
                                        row.servers.join(",")
                                    ));
                                }
                            }
                            Err(e) => {
                                // A failed hold still prints how far it got.
                                let text = format!("{e:#}");
                                if let Some(v) = text
                                    .find("{\"answered\"")
                                    .and_then(|i| text[i..].lines().next())
                                    .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                                {
                                    row.answered = v["answered"].as_u64().unwrap_or(0);
                                }
                                row.error = Some(short(&e));
                            }
                        }
                        row.secs = t.elapsed().as_secs_f64();
                        row
                    })
                })
                .collect();
            hs.into_iter().filter_map(|h| h.join().ok()).collect()
        });
        let mut t = lock(tally);
        if rows.len() != runs.len() {
            t.fail(format!("hold round {round}: a hold thread panicked"));
        }
        for r in rows {
            if let Some(e) = &r.error {
                t.fail(format!("hold round {round} from {} to {}: {e}", r.from, r.to));
            }
            t.holds.push(r);
        }
    }
    Ok(())
}

/// Rounds of checksummed echoes (same node, across nodes, VIP) spread over
/// the load ([`Sizes::echo_rounds`]); the first at once, and none once the
/// load is over.
fn echoer(s: &BoxState, sizes: &Sizes, q: &Queue, tally: &Mutex<Tally>, t0: Instant, deadline: Instant) -> Result<()> {
    let dests = [
        ("same node", format!("{}:8080", s.pod_ip("echo-1")?)),
        ("across nodes", format!("{}:8080", s.pod_ip("echo-2")?)),
        ("service VIP", VIP.to_owned()),
    ];
    let bytes = sizes.echo_bytes.to_string();
    for round in 1..=sizes.echo_rounds {
        let start = q.chunks.len() * (round - 1) / sizes.echo_rounds;
        while q.taken() < start && !q.finished(deadline) {
            std::thread::sleep(Duration::from_millis(50));
        }
        if round > 1 && q.finished(deadline) {
            break;
        }
        for (placement, to) in &dests {
            let at_s = t0.elapsed().as_secs_f64();
            let args = ["client", "echo", "--to", to.as_str(), "--bytes", &bytes];
            // While it runs, a snapshot every 10 s: a stall is diagnosed
            // from the last ones (the connection is gone once it fails).
            let (r, snaps) = std::thread::scope(|sc| {
                let run = sc.spawn(|| s.workload_json("client", &args, Duration::from_secs(300)));
                let mut snaps: Vec<String> = Vec::new();
                let mut next = Instant::now() + Duration::from_secs(10);
                while !run.is_finished() {
                    if Instant::now() >= next {
                        snaps.push(snapshot(s, to, t0));
                        if snaps.len() > 2 {
                            snaps.remove(0);
                        }
                        next += Duration::from_secs(10);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                let r = run
                    .join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("echo thread panicked")));
                (r, snaps)
            });
            let mut row = EchoRow {
                round,
                at_s,
                placement: placement.to_string(),
                bytes: 0,
                ok: false,
                ms: 0,
                error: None,
                diagnosis: None,
            };
            match r {
                Ok(v) => {
                    row.bytes = v["bytes"].as_u64().unwrap_or(0);
                    row.ok = v["ok"] == true && row.bytes == sizes.echo_bytes;
                    row.ms = v["ms"].as_u64().unwrap_or(0);
                    if !row.ok {
                        row.error = Some(format!("echo answered {v}"));
                    }
                }
                Err(e) => row.error = Some(short(&e)),
            }
            if row.error.is_some() && !snaps.is_empty() {
                row.diagnosis = Some(snaps.join("\n"));
            }
            let mut t = lock(tally);
            if let Some(e) = &row.error {
                t.fail(format!("echo {placement} to {to}: {e}"));
            }
            t.echoes.push(row);
        }
    }
    Ok(())
}

/// What a transfer to `to` looks like now: each agent's live connections to
/// it that carried more than 1 MiB (bytes each way, age), and, in the client
/// pod's, echo-1's and node 1's network namespaces, the TCP sockets with data queued
/// (`ss -tinm`) and TCP's pressure, prune, drop and retransmit counters.
fn snapshot(s: &BoxState, to: &str, t0: Instant) -> String {
    let mut out = format!("at {:.1} s:\n", t0.elapsed().as_secs_f64());
    for n in 0..s.spec.nodes {
        let conns = s.admin_json(n, "/conns").map(|v| {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter(|c| {
                            c["orig_dst"] == to
                                && (c["sent"].as_u64().unwrap_or(0) > 1 << 20
                                    || c["received"].as_u64().unwrap_or(0) > 1 << 20)
                        })
                        .map(|c| c.to_string())
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        });
        match conns {
            Ok(c) => out.push_str(&format!("node {} /conns to {to}: {}\n", n + 1, c.join("\n  "))),
            Err(e) => out.push_str(&format!("node {} /conns: {}\n", n + 1, short(&e))),
        }
    }
    let netns = [
        ("client pod", s.pod_netns("client")),
        ("echo-1 pod", s.pod_netns("echo-1")),
        ("node 1", s.node_netns(0)),
    ];
    for (what, ns) in netns {
        let script = format!(
            "ip netns exec {ns} ss -tinmH state established 2>&1 | awk 'NR%2==1 {{q=($1>0||$2>0)}} q' | head -40"
        );
        let ss = crate::bench::sh("sh", &["-c", &script]);
        out.push_str(&format!("{what} sockets with data queued:\n{ss}\n"));
        // TCP's memory pressure, pruning and drops (a stall's usual suspects).
        let script =
            format!("ip netns exec {ns} nstat -az 2>&1 | grep -Ei 'pressure|prune|drop|retrans|timeout' | awk '$2>0'");
        let nstat = crate::bench::sh("sh", &["-c", &script]);
        out.push_str(&format!("{what} TCP counters (non-zero):\n{nstat}\n"));
    }
    out
}

/// Node `node`'s current agent and its retired ones (draining), for sampling.
struct Pids {
    current: Vec<u32>,
    retired: Vec<(usize, u32)>,
}

fn sampler(pids: &Mutex<Pids>, samples: &Mutex<Vec<Sample>>, stop: &AtomicBool, t0: Instant, deadline: Instant) {
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let (current, retired) = {
            let p = lock(pids);
            (p.current.clone(), p.retired.clone())
        };
        let t_s = t0.elapsed().as_secs_f64();
        let all = current.iter().copied().enumerate().chain(retired);
        let got: Vec<Sample> = all
            .map(|(node, pid)| Sample {
                t_s,
                node,
                pid,
                rss_kib: rss_kib(pid),
            })
            .filter(|s| s.rss_kib > 0)
            .collect();
        lock(samples).extend(got);
        for _ in 0..10 {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Waits (30 s at most) until no agent holds a connection; the counts last seen.
fn drained_conns(s: &BoxState, nodes: usize) -> Vec<u64> {
    let conns = |n: usize| -> u64 {
        s.admin_json(n, "/conns")
            .ok()
            .and_then(|c| c.as_array().map(|a| a.len() as u64))
            .unwrap_or(u64::MAX)
    };
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let now: Vec<u64> = (0..nodes).map(conns).collect();
        if now.iter().all(|c| *c == 0) || Instant::now() > until {
            return now;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Changes the box's spec and waits until every agent acknowledged it;
/// the cluster YAML must load without errors.
fn apply(b: &mut ClusterBox, f: impl FnOnce(&mut Spec)) -> Result<()> {
    b.update(f)?;
    let errors: Vec<String> = b
        .state
        .control_problems()?
        .into_iter()
        .filter(|p| p["severity"].as_str().is_some_and(|s| s.eq_ignore_ascii_case("error")))
        .map(|p| p.to_string())
        .collect();
    if !errors.is_empty() {
        bail!("ferry-control reports errors: {}", errors.join("; "));
    }
    Ok(())
}

fn set_endpoints(sp: &mut Spec, endpoints: &[&str]) {
    if let Some(svc) = sp.services.iter_mut().find(|s| s.name == "echo") {
        svc.endpoints = endpoints.iter().map(|e| e.to_string()).collect();
    }
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// Runs the soak and writes `<out>.json` and `<out>.md`. Err (after the
/// report is written) when it did not pass, with the reasons.
pub fn soak(sizes: &Sizes, bins: &Path, out: &Path) -> Result<Report> {
    // No stale report survives a run that fails before writing its own.
    for ext in ["json", "md"] {
        let _ = std::fs::remove_file(out.with_extension(ext));
    }
    let t0 = Instant::now();
    let mut b = ClusterBox::up(spec(), bins.to_owned())?;
    let r = run(&mut b, sizes, bins, t0);
    // The box goes first (ClusterBox drops), then the report.
    drop(b);
    let mut report = r?;
    report.wall_s = t0.elapsed().as_secs_f64();
    write(&report, out)?;
    if !report.passed {
        bail!("soak failed: {}", report.reasons.join("; "));
    }
    Ok(report)
}

fn run(b: &mut ClusterBox, sizes: &Sizes, bins: &Path, t0: Instant) -> Result<Report> {
    let s = b.state.clone();
    // Warm-up: every path answers (pools, certificates, routes).
    for (_, dests) in placements(&s)? {
        for (pod, to) in dests {
            s.workload_json(
                pod,
                &["client", "rr", "--to", &to, "--count", "200"],
                Duration::from_secs(60),
            )
            .with_context(|| format!("warm-up from {pod} to {to}"))?;
        }
    }
    eprintln!("soak: box {} up and warm in {:.1} s", s.id, t0.elapsed().as_secs_f64());
    // Baseline: the median of three samples a second apart.
    let nodes = s.spec.nodes;
    let mut base = vec![Vec::new(); nodes];
    for i in 0..3 {
        if i > 0 {
            std::thread::sleep(Duration::from_secs(1));
        }
        for (n, v) in base.iter_mut().enumerate() {
            v.push(rss_kib(s.agent_pids[n]));
        }
    }
    let baseline: Vec<u64> = base.into_iter().map(median).collect();
    let heap = |s: &BoxState, n: usize| {
        s.metric(n, "ferry_heap_in_use_bytes")
            .map_or(u64::MAX, |v| v as u64 / 1024)
    };
    let heap_baseline: Vec<u64> = (0..nodes).map(|n| heap(&s, n)).collect();
    // Without it the leak check could not fail.
    if let Some(n) = heap_baseline.iter().position(|h| *h == u64::MAX) {
        bail!(
            "node {}: no ferry_heap_in_use_bytes from the agent for the baseline",
            n + 1
        );
    }
    let fds_baseline: Vec<u64> = (0..nodes).map(|n| fd_count(s.agent_pids[n])).collect();

    let chunks = plan(&s, sizes)?;
    let q = Queue {
        chunks,
        pos: Mutex::new((0, 0)),
        cv: Condvar::new(),
        done: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
    };
    let tally = Mutex::new(Tally::default());
    let done_requests = AtomicU64::new(0);
    let pids = Mutex::new(Pids {
        current: s.agent_pids.clone(),
        retired: vec![],
    });
    let samples = Mutex::new(Vec::new());
    let stop_sampling = AtomicBool::new(false);
    let load_start = Instant::now();
    let deadline = load_start + sizes.load_deadline;
    // The sampler runs until the RSS has settled (30 s) after the load.
    let sample_deadline = deadline + Duration::from_secs(120);
    let mut churn: Vec<StepRow> = Vec::new();
    let mut restart = Restart::default();
    let mut old_agent: Option<std::process::Child> = None;

    let steps = [
        "endpoints scaled up",
        "route weights changed",
        "agent restart",
        "policy applied",
        "endpoints scaled down",
    ];
    let phases = steps.len() + 1;
    let bound = |k: usize| q.chunks.len() * k / phases;
    let mut load_s = 0.0;
    let within = |n: usize, rss: u64| rss <= baseline[n] + rss_allowance_kib(baseline[n]);
    let heap_within = |n: usize, h: u64| h <= heap_baseline[n].saturating_add(heap_allowance_kib(heap_baseline[n]));
    let fds_within = |n: usize, f: u64| f <= fds_baseline[n] + FD_ALLOWANCE;
    let (mut agent_conns_after, mut finals, mut settle_s) = (Vec::new(), Vec::new(), 0.0);
    let (mut heap_finals, mut fds_finals) = (Vec::new(), Vec::new());
    std::thread::scope(|sc| {
        let (q, tally, done_requests, pids, samples, stop_sampling) =
            (&q, &tally, &done_requests, &pids, &samples, &stop_sampling);
        sc.spawn(move || sampler(pids, samples, stop_sampling, load_start, sample_deadline));
        let mut load = Vec::new();
        for _ in 0..sizes.workers.max(1) {
            let s = s.clone();
            load.push(sc.spawn(move || worker(&s, q, tally, done_requests, deadline)));
        }
        let (hs, es) = (s.clone(), s.clone());
        load.push(sc.spawn(move || {
            if let Err(e) = holder(&hs, sizes, q, tally, load_start, deadline) {
                lock(tally).fail(format!("holds: {}", short(&e)));
            }
        }));
        load.push(sc.spawn(move || {
            if let Err(e) = echoer(&es, sizes, q, tally, load_start, deadline) {
                lock(tally).fail(format!("echoes: {}", short(&e)));
            }
        }));
        q.release(bound(1));
        for (k, step) in steps.iter().enumerate() {
            // Apply when the phase's last chunks are being taken, with the
            // next phase released: load is in flight throughout the change.
            let end = bound(k + 1);
            while q.taken() + sizes.workers < end && !q.finished(deadline) {
                std::thread::sleep(Duration::from_millis(50));
            }
            q.release(bound(k + 2));
            let at = load_start.elapsed();
            let before = done_requests.load(Ordering::Relaxed);
            let t = Instant::now();
            let (change, r): (String, Result<()>) = match k {
                0 => (
                    "echo Service endpoints echo-1, echo-2 -> echo-1, echo-2, echo-3".into(),
                    apply(b, |sp| set_endpoints(sp, &["echo-1", "echo-2", "echo-3"])),
                ),
                1 => (
                    "VirtualService echo (TCP) weights v1/v2 50/50 -> 80/20".into(),
                    apply(b, |sp| {
                        sp.cluster_yaml.retain(|(n, _)| n != ROUTES_FILE);
                        sp.cluster_yaml.push(routes(80, 20));
                    }),
                ),
                2 => {
                    let drain = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(60);
                    let old_pid = b.state.agent_pids[0];
                    let r = b.upgrade_agent(0, drain).map(|old| {
                        restart = Restart {
                            node: 1,
                            old_pid,
                            new_pid: b.state.agent_pids[0],
                            at_s: at.as_secs_f64(),
                            takeover_ms: t.elapsed().as_millis() as u64,
                            old_agent_exited_after_s: None,
                        };
                        let mut p = lock(pids);
                        p.current = b.state.agent_pids.clone();
                        p.retired.push((0, old.id()));
                        old_agent = Some(old);
                    });
                    (
                        "node 1's agent handed over to a new agent (--takeover; the old one drains)".into(),
                        r,
                    )
                }
                3 => (
                    "AuthorizationPolicy echo-allow-clients (ALLOW app=echo from sa/client) added".into(),
                    apply(b, |sp| sp.cluster_yaml.push(policy())),
                ),
                _ => (
                    "echo Service endpoints echo-1, echo-2, echo-3 -> echo-1, echo-2".into(),
                    apply(b, |sp| set_endpoints(sp, &["echo-1", "echo-2"])),
                ),
            };
            eprintln!(
                "soak: {:.1} s, {before} requests done: {step}: {}",
                at.as_secs_f64(),
                match &r {
                    Ok(()) => "applied".to_owned(),
                    Err(e) => format!("FAILED: {}", short(e)),
                }
            );
            churn.push(StepRow {
                step: step.to_string(),
                change,
                at_s: at.as_secs_f64(),
                requests_done: before,
                took_ms: t.elapsed().as_millis() as u64,
                ok: r.is_ok(),
                error: r.err().map(|e| short(&e)),
            });
        }
        q.release(q.chunks.len());
        for h in load {
            if h.join().is_err() {
                lock(tally).fail("a load thread panicked".into());
            }
        }
        load_s = load_start.elapsed().as_secs_f64();
        eprintln!("soak: load done in {load_s:.1} s");

        // After the load: the old agent drains out, connections close, RSS settles.
        let load_end = Instant::now();
        if let Some(mut old) = old_agent.take() {
            let until = Instant::now() + Duration::from_secs(30);
            loop {
                match old.try_wait() {
                    Ok(Some(_)) => {
                        restart.old_agent_exited_after_s = Some(load_end.elapsed().as_secs_f64());
                        break;
                    }
                    Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_millis(100)),
                    _ => {
                        let _ = old.kill();
                        let _ = old.wait();
                        break;
                    }
                }
            }
        }
        agent_conns_after = drained_conns(&s, nodes);
        // RSS settles: polled up to 30 s to come back within bound.
        let current = b.state.agent_pids.clone();
        let settle = Instant::now();
        let read = |finals: &mut Vec<u64>, heap_finals: &mut Vec<u64>, fds_finals: &mut Vec<u64>| {
            *finals = current.iter().map(|p| rss_kib(*p)).collect();
            *heap_finals = (0..nodes).map(|n| heap(&b.state, n)).collect();
            *fds_finals = current.iter().map(|p| fd_count(*p)).collect();
        };
        read(&mut finals, &mut heap_finals, &mut fds_finals);
        let back = |finals: &[u64], heap_finals: &[u64], fds_finals: &[u64]| {
            (0..nodes).all(|n| within(n, finals[n]) && heap_within(n, heap_finals[n]) && fds_within(n, fds_finals[n]))
        };
        while !back(&finals, &heap_finals, &fds_finals) && settle.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_secs(1));
            read(&mut finals, &mut heap_finals, &mut fds_finals);
        }
        settle_s = settle.elapsed().as_secs_f64();
        stop_sampling.store(true, Ordering::Relaxed);
    });

    let tally = tally.into_inner().unwrap_or_else(|e| e.into_inner());
    let samples = samples.into_inner().unwrap_or_else(|e| e.into_inner());
    let rss: Vec<RssRow> = (0..nodes)
        .map(|n| RssRow {
            node: n + 1,
            baseline_kib: baseline[n],
            peak_kib: samples
                .iter()
                .filter(|x| x.node == n)
                .map(|x| x.rss_kib)
                .max()
                .unwrap_or(0),
            final_kib: finals.get(n).copied().unwrap_or(0),
            bound_kib: rss_allowance_kib(baseline[n]),
            back_within_bound: finals.get(n).is_some_and(|f| within(n, *f)),
            heap_baseline_kib: heap_baseline[n],
            heap_final_kib: heap_finals.get(n).copied().unwrap_or(u64::MAX),
            heap_bound_kib: heap_allowance_kib(heap_baseline[n]),
            heap_back: heap_finals.get(n).is_some_and(|h| heap_within(n, *h)),
            fds_baseline: fds_baseline[n],
            fds_final: fds_finals.get(n).copied().unwrap_or(u64::MAX),
            fds_back: fds_finals.get(n).is_some_and(|f| fds_within(n, *f)),
            settle_s,
        })
        .collect();
    let places = placements(&s)?;
    let mut classes = Vec::new();
    for (c, (name, ..)) in CLASSES.iter().enumerate() {
        for (p, (pname, _)) in places.iter().enumerate() {
            let runs: Vec<_> = tally.runs.iter().filter(|r| r.0 == c && r.1 == p).collect();
            classes.push(ClassRow {
                class: name.to_string(),
                placement: pname.to_string(),
                requests: runs.iter().map(|r| r.2).sum(),
                client_runs: runs.len(),
                p50_us: median(runs.iter().map(|r| r.3).collect()),
                p99_us: median(runs.iter().map(|r| r.4).collect()),
                p999_us: median(runs.iter().map(|r| r.5).collect()),
                worst_p999_us: runs.iter().map(|r| r.5).max().unwrap_or(0),
            });
        }
    }
    let requests = done_requests.load(Ordering::Relaxed);
    let echo_ok = !tally.echoes.is_empty() && tally.echoes.iter().all(|e| e.ok);
    let bytes_checked = tally.echoes.iter().filter(|e| e.ok).map(|e| 2 * e.bytes).sum();

    let mut reasons = Vec::new();
    if tally.failures > 0 {
        reasons.push(format!("{} client runs failed", tally.failures));
    }
    if requests != sizes.requests {
        reasons.push(format!("{requests} of {} round trips completed", sizes.requests));
    }
    if !echo_ok {
        reasons.push("not every echo transfer came back intact".into());
    }
    if tally.holds.is_empty() {
        reasons.push("no held connections".into());
    }
    for st in churn.iter().filter(|c| !c.ok) {
        reasons.push(format!("{} failed: {}", st.step, st.error.as_deref().unwrap_or("?")));
    }
    if churn.len() != steps.len() {
        reasons.push("not every churn step ran".into());
    }
    {
        for r in rss.iter().filter(|r| !r.back_within_bound) {
            reasons.push(format!(
                "node {} agent RSS {} KiB did not come back within {} KiB of its baseline {} KiB",
                r.node, r.final_kib, r.bound_kib, r.baseline_kib
            ));
        }
        for r in rss.iter().filter(|r| !r.heap_back) {
            reasons.push(format!(
                "node {} agent heap in use {} KiB did not come back within {} KiB of its baseline {} KiB (a leak)",
                r.node, r.heap_final_kib, r.heap_bound_kib, r.heap_baseline_kib
            ));
        }
        for r in rss.iter().filter(|r| !r.fds_back) {
            reasons.push(format!(
                "node {} agent holds {} file descriptors, {} at the baseline (a leak)",
                r.node, r.fds_final, r.fds_baseline
            ));
        }
    }
    let command = if sizes.quick {
        "cargo xtask soak --quick"
    } else {
        "cargo xtask soak"
    };
    Ok(Report {
        quick: sizes.quick,
        command: command.into(),
        binaries: bins.display().to_string(),
        passed: reasons.is_empty(),
        reasons,
        wall_s: 0.0,
        load_s,
        requests_expected: sizes.requests,
        requests,
        failures: tally.failures,
        failure_samples: tally.failure_samples,
        bytes_checked,
        echo_ok,
        held_conns_target: sizes.conns,
        classes,
        holds: tally.holds,
        echoes: tally.echoes,
        churn,
        restart,
        agent_conns_after,
        rss,
        rss_samples: samples,
    })
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn write(r: &Report, out: &Path) -> Result<()> {
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(out.with_extension("json"), serde_json::to_string_pretty(r)?)
        .with_context(|| format!("writing {}", out.display()))?;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Soak{}\n\n\
         `{}` (`ferry-bench soak{}`, `benches/src/soak.rs`), binaries from `{}`, on the cluster-in-a-box:\n\
         two nodes, real eBPF and agents, ferry-control streaming the config. One run on this 2-core VM,\n\
         shared by the clients, the servers and both agents. Result: **{}**{}.\n",
        if r.quick { " (quick)" } else { "" },
        r.command,
        if r.quick { " --quick" } else { "" },
        r.binaries,
        if r.passed { "passed" } else { "FAILED" },
        if r.reasons.is_empty() {
            String::new()
        } else {
            format!(" ({})", r.reasons.join("; "))
        }
    );
    let holds_ok = r.holds.iter().filter(|h| h.error.is_none()).count();
    let max_round = r.holds.iter().map(|h| h.round).max().unwrap_or(0);
    let _ = writeln!(
        md,
        "| figure | value |\n|---|---|\n\
         | round trips | {} of {} |\n\
         | failed client runs | {} |\n\
         | bytes echoed and checked (sent + received) | {} |\n\
         | held connections | {} at once ({} and {} in two holds), {} rounds, {} of {} holds fully answered |\n\
         | churn steps applied | {} of {} |\n\
         | load time | {:.1} s |\n\
         | wall time (box up to report) | {:.1} s |\n",
        r.requests,
        r.requests_expected,
        r.failures,
        r.bytes_checked,
        r.held_conns_target,
        r.held_conns_target / 2,
        r.held_conns_target - r.held_conns_target / 2,
        max_round,
        holds_ok,
        r.holds.len(),
        r.churn.iter().filter(|c| c.ok).count(),
        r.churn.len(),
        r.load_s,
        r.wall_s
    );
    md.push_str(
        "## Round trips by class\n\n\
         Each client run (`ferry-workload client rr`) prints its own percentiles; p50, p99 and p99.9 here are\n\
         the medians over the class's runs, and the worst run's p99.9 is shown beside them.\n\n\
         | class | placement | round trips | client runs | p50 µs | p99 µs | p99.9 µs | worst run p99.9 µs |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for c in &r.classes {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            c.class, c.placement, c.requests, c.client_runs, c.p50_us, c.p99_us, c.p999_us, c.worst_p999_us
        );
    }
    md.push_str("\n## Changes during the load\n\n| at s | round trips done | step | change | took ms | result |\n|---|---|---|---|---|---|\n");
    for c in &r.churn {
        let _ = writeln!(
            md,
            "| {:.1} | {} | {} | {} | {} | {} |",
            c.at_s,
            c.requests_done,
            c.step,
            c.change,
            c.took_ms,
            c.error.as_deref().unwrap_or("applied")
        );
    }
    let _ = writeln!(
        md,
        "\nThe agent restart: node {}'s agent (pid {}) handed its listeners to a new one (pid {}) in {} ms, {:.1} s\n\
         into the load; the old agent served its connections until they ended and {}.\n",
        r.restart.node,
        r.restart.old_pid,
        r.restart.new_pid,
        r.restart.takeover_ms,
        r.restart.at_s,
        match r.restart.old_agent_exited_after_s {
            Some(s) => format!("exited {s:.1} s after the load ended"),
            None => "did not exit within 30 s of the load's end (killed)".to_owned(),
        }
    );
    md.push_str(
        "## Agent memory and descriptors\n\n\
         RSS sampled once a second through the run (the draining old agent included in its node's peak). Final:\n\
         once every connection closed, polled up to 30 s until each figure is back within its allowance of the\n\
         baseline (node 1's final figures are the new agent's). The leak checks are the heap in use (glibc's\n\
         `mallinfo2`, `ferry_heap_in_use_bytes`; allowance max(50 %, 4 MiB)) and the open descriptors (16);\n\
         RSS has a wider allowance, max(50 %, 48 MiB), as glibc keeps part of a burst's heap in pieces even\n\
         trimmed (measured: ferry-agent.rs, the allocator).\n\n\
         | agent | RSS baseline MiB | peak MiB | final MiB | allowed MiB | heap in use baseline MiB | final MiB | allowed MiB | fds baseline | final | back |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for x in &r.rss {
        let _ = writeln!(
            md,
            "| node {} | {:.1} | {:.1} | {:.1} | +{:.1} | {:.2} | {:.2} | +{:.1} | {} | {} | {} |",
            x.node,
            mib(x.baseline_kib),
            mib(x.peak_kib),
            mib(x.final_kib),
            mib(x.bound_kib),
            mib(x.heap_baseline_kib),
            mib(x.heap_final_kib),
            mib(x.heap_bound_kib),
            x.fds_baseline,
            x.fds_final,
            if x.back_within_bound && x.heap_back && x.fds_back {
                "yes"
            } else {
                "no"
            }
        );
    }
    let _ = writeln!(md, "\n{} samples.\n", r.rss_samples.len());
    md.push_str(
        "## Held connections\n\nRounds while the load runs; each hold opens its connections one after another and closes them\n\
         once all are open and answered.\n\n\
         | round | at s | from | to | placement | answered | by | took s |\n|---|---|---|---|---|---|---|---|\n",
    );
    for h in &r.holds {
        let _ = writeln!(
            md,
            "| {} | {:.1} | {} | {} | {} | {} of {} | {} | {:.1} |",
            h.round,
            h.at_s,
            h.from,
            h.to,
            h.placement,
            h.answered,
            h.conns,
            h.servers.join(", "),
            h.secs
        );
    }
    md.push_str(
        "\n## Checksummed echoes\n\n| round | at s | placement | bytes | ok | ms |\n|---|---|---|---|---|---|\n",
    );
    for e in &r.echoes {
        let _ = writeln!(
            md,
            "| {} | {:.1} | {} | {} | {} | {} |",
            e.round,
            e.at_s,
            e.placement,
            e.bytes,
            if e.ok { "yes" } else { "no" },
            e.ms
        );
    }
    for e in r.echoes.iter().filter(|e| e.diagnosis.is_some()) {
        let _ = writeln!(
            md,
            "\nEcho round {} ({}, at {:.1} s) failed; the last snapshots while it ran:\n\n```text\n{}\n```",
            e.round,
            e.placement,
            e.at_s,
            e.diagnosis.as_deref().unwrap_or_default()
        );
    }
    if !r.failure_samples.is_empty() {
        md.push_str("\n## Failures (first 20)\n\n");
        for f in &r.failure_samples {
            let _ = writeln!(md, "- {f}");
        }
    }
    let _ = writeln!(md, "\nReproduce: `{}` (as root).", r.command);
    std::fs::write(out.with_extension("md"), md).with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}
