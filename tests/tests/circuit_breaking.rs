//! Circuit breaking (DestinationRule `connectionPool`) on the
//! cluster-in-a-box, with ferry-control compiling the rules and the agents
//! applying them per client pod (`tests/fixtures/circuit/app.yaml`: the
//! client `fortio` on node 1, `httpbin` on node 2, `reviews` v1 on node 2
//! and v2 on node 1). The load comes from `ferry-workload http client` in
//! the client pod (statuses counted); the servers count what reached them
//! (`--conn-stats`: requests per connection, requests in flight), and the
//! client's agent says why it refused (request log flags,
//! `ferry_upstream_overflow_total`).
//!
//! - Istio's circuit-breaking task, replayed: `maxConnections: 1`,
//!   `http1MaxPendingRequests: 1`, `maxRequestsPerConnection: 1` (the
//!   task's outlierDetection left out: this is about the pool), 3
//!   concurrent clients of 30 requests each (fortio's `-c 3 -n 90`): a
//!   share of 503 `UO`; one client alone: none.
//! - The seed's DestinationRule, as written (`maxConnections: 100`,
//!   `http1MaxPendingRequests: 1`, `maxRequestsPerConnection: 2`): never
//!   more than 2 requests on an upstream connection; 110 requests at once
//!   to one subset: 100 connections, 1 pending, the rest 503 `UO`.
//! - The retry budget: `maxRetries: 1` with a route retrying 3 times on
//!   5xx against answers that are always 503: retries capped (attempts
//!   counted at the server); without the budget, every retry is made.

use std::{io::Read, path::Path, process::Stdio};

use ferry_box::{manifests, require_root, sample_value, ClusterBox};
use serde_json::Value;

const HTTPBIN: &str = "http://10.96.0.60:8000";
const REVIEWS: &str = "http://10.96.0.61:9080";
const CLIENT: &str = "fortio";
const SEED: &str = "reviews-routing-circuit-breaking-mtls.yaml";

/// Istio's task's DestinationRule (`samples/httpbin` in the task), its
/// connection pool as written.
const TASK_DR: &str = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: httpbin
spec:
  host: httpbin
  trafficPolicy:
    connectionPool:
      tcp:
        maxConnections: 1
      http:
        http1MaxPendingRequests: 1
        maxRequestsPerConnection: 1
";

/// Retries 3 times on 5xx (Istio's `retries`), for the retry budget.
const RETRY_VS: &str = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: httpbin
spec:
  hosts: [httpbin]
  http:
    - retries: {attempts: 3, retryOn: 5xx}
      route:
        - destination: {host: httpbin}
";

const BUDGET_DR: &str = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: httpbin
spec:
  host: httpbin
  trafficPolicy:
    connectionPool:
      http:
        maxRetries: 1
";

struct Bed {
    b: ClusterBox,
    /// The cluster YAML of the fixture (pods' Services, the namespace).
    base: Vec<(String, String)>,
}

fn up() -> Bed {
    require_root();
    let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/circuit"));
    let spec = manifests::spec_from_dir(dir, 2).unwrap();
    let base = spec.cluster_yaml.clone();
    let b = ClusterBox::up(spec, ferry_box::default_bin_dir()).expect("box up");
    Bed { b, base }
}

impl Bed {
    /// Replaces the rules by `files` (name, YAML) and waits until every
    /// agent applied them; they must load without errors.
    fn apply(&mut self, files: &[(&str, &str)]) {
        let mut y = self.base.clone();
        y.extend(files.iter().map(|(n, t)| (n.to_string(), t.to_string())));
        self.b
            .update(|sp| sp.cluster_yaml = y)
            .expect("rules applied by every agent");
        let problems = self.b.state.control_problems().unwrap();
        let errors: Vec<&Value> = problems
            .iter()
            .filter(|p| p["severity"].as_str().is_some_and(|s| s.eq_ignore_ascii_case("error")))
            .collect();
        assert!(errors.is_empty(), "{errors:#?}");
        let unenforced: Vec<&Value> = problems
            .iter()
            .filter(|p| p.to_string().contains("connectionPool"))
            .collect();
        assert!(
            unenforced.is_empty(),
            "every connectionPool field used here is enforced: {unenforced:#?}"
        );
    }

    /// `clients` load clients at once (as fortio's connections), each making
    /// `count` GETs one after another: the statuses summed.
    fn clients(&self, clients: usize, url: &str, count: u64, headers: &[&str]) -> Value {
        let all: Vec<Value> = std::thread::scope(|s| {
            let runs: Vec<_> = (0..clients)
                .map(|_| s.spawn(|| self.load(url, count, 1, headers)))
                .collect();
            runs.into_iter().map(|r| r.join().unwrap()).collect()
        });
        let mut by_status = serde_json::Map::new();
        for v in &all {
            for (code, n) in v["by_status"].as_object().into_iter().flatten() {
                let sum = by_status.get(code).and_then(Value::as_u64).unwrap_or(0) + n.as_u64().unwrap_or(0);
                by_status.insert(code.clone(), sum.into());
            }
        }
        serde_json::json!({ "by_status": by_status, "clients": all.iter().map(|v| v["by_status"].clone()).collect::<Vec<_>>() })
    }

    /// `count` GETs of `url` from the client pod, `concurrency` at a time.
    fn load(&self, url: &str, count: u64, concurrency: u64, headers: &[&str]) -> Value {
        let (count, concurrency) = (count.to_string(), concurrency.to_string());
        let mut args = vec![
            "--url",
            url,
            "--count",
            &count,
            "--concurrency",
            &concurrency,
            "--timeout-ms",
            "20000",
        ];
        for h in headers {
            args.extend(["--header", h]);
        }
        let v = self.b.state.http_client(CLIENT, &args).unwrap();
        eprintln!("{url} x{count} at {concurrency}: {}", v["by_status"]);
        assert!(v["errors"].as_object().is_none_or(|e| e.is_empty()), "{v}");
        v
    }

    /// What `pod`'s server counted since the last call (`/_stats?reset=1`,
    /// asked from inside the pod, past the mesh).
    fn stats(&self, pod: &str, port: u16) -> Value {
        let script = format!(
            "exec 3<>/dev/tcp/127.0.0.1/{port} && printf 'GET /_stats?reset=1 HTTP/1.0\\r\\n\\r\\n' >&3 && cat <&3"
        );
        let mut c = self
            .b
            .state
            .pod_command(pod, "timeout", &["10", "bash", "-c", &script])
            .unwrap()
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = String::new();
        c.stdout.take().unwrap().read_to_string(&mut out).unwrap();
        c.wait().unwrap();
        let (_, body) = out.split_once("\r\n\r\n").unwrap_or_else(|| panic!("{out:?}"));
        let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {out:?}"));
        eprintln!("{pod}: {v}");
        v
    }

    /// `ferry_upstream_overflow_total` of the client's agent.
    fn overflows(&self, service: &str, reason: &str) -> f64 {
        let fqdn = format!("{service}.default.svc.cluster.local");
        self.b
            .state
            .scrape(0)
            .unwrap()
            .samples
            .iter()
            .filter(|s| {
                s.metric == "ferry_upstream_overflow_total"
                    && s.labels.get("destination_service") == Some(fqdn.as_str())
                    && s.labels.get("reason") == Some(reason)
            })
            .map(|s| sample_value(&s.value))
            .sum()
    }

    /// The client agent's request-log lines for `path`, by flags.
    fn flags(&self, path: &str) -> std::collections::BTreeMap<String, u64> {
        let mut m = std::collections::BTreeMap::new();
        for l in self.b.state.request_log(0) {
            if l["direction"] == "outbound" && l["path"] == path {
                *m.entry(l["flags"].as_str().unwrap_or("?").to_owned()).or_default() += 1;
            }
        }
        m
    }
}

fn status(v: &Value, code: &str) -> u64 {
    v["by_status"][code].as_u64().unwrap_or(0)
}

fn num(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} in {v}"))
}

#[test]
fn istio_task_seed_rule_and_retry_budget() {
    let mut bed = up();

    // --- Istio's circuit-breaking task. ---
    bed.apply(&[("httpbin-dr.yaml", TASK_DR)]);
    let before = bed.overflows("httpbin", "pending");
    let url = format!("{HTTPBIN}/task3");
    let v = bed.clients(3, &url, 30, &["x-delay-ms:20"]);
    let (ok, uo) = (status(&v, "200"), status(&v, "503"));
    assert_eq!(ok + uo, 90, "only 200s and 503s: {v}");
    assert!(uo > 0, "a share of 503s at concurrency 3: {v}");
    assert!(ok >= 10, "and most of the time one gets through: {v}");
    eprintln!(
        "task, 3 clients x 30: {ok} passed, {uo} ({:.0}%) 503 UO: {v}",
        uo as f64 * 100.0 / 90.0
    );
    let s = bed.stats("httpbin", 8000);
    assert_eq!(num(&s, "requests"), ok, "the 503s never reached the server");
    assert_eq!(num(&s, "max_in_flight"), 1, "one connection, one request at a time");
    assert_eq!(num(&s, "max_requests_per_connection"), 1, "maxRequestsPerConnection: 1");
    assert_eq!(
        bed.overflows("httpbin", "pending") - before,
        uo as f64,
        "each 503 counted"
    );
    let f = bed.flags("/task3");
    assert_eq!(f.get("UO").copied().unwrap_or(0), uo, "every 503 flagged UO: {f:?}");
    assert_eq!(f.get("-").copied().unwrap_or(0), ok, "{f:?}");

    // Positive control: one client at a time never overflows.
    let v = bed.load(&format!("{HTTPBIN}/task1"), 30, 1, &["x-delay-ms:20"]);
    assert_eq!(status(&v, "200"), 30, "{v}");
    let s = bed.stats("httpbin", 8000);
    assert_eq!(
        (num(&s, "requests"), num(&s, "connections")),
        (30, 30),
        "a connection per request"
    );

    // --- The seed's DestinationRule, as written (with its routes and STRICT mTLS). ---
    let seed = std::fs::read_to_string(manifests::bookinfo().join(SEED)).unwrap();
    bed.apply(&[(SEED, &seed)]);
    // Its 90/10 split: v1 across nodes, v2 on the client's node.
    let v = bed.load(&format!("{REVIEWS}/reviews/pairs"), 60, 3, &["x-delay-ms:20"]);
    assert_eq!(status(&v, "200"), 60, "far below maxConnections: {v}");
    let (s1, s2) = (bed.stats("reviews-v1", 9080), bed.stats("reviews-v2", 9080));
    assert_eq!(num(&s1, "requests") + num(&s2, "requests"), 60);
    for s in [&s1, &s2] {
        assert!(
            num(s, "max_requests_per_connection") <= 2,
            "maxRequestsPerConnection: 2: {s}"
        );
    }
    assert_eq!(
        num(&s1, "max_requests_per_connection").max(num(&s2, "max_requests_per_connection")),
        2,
        "connections are reused up to the limit: {s1} {s2}"
    );

    // 110 at once to one subset (the seed's `user: tester` route, v2),
    // each held 2 s: 100 connections, 1 request pending, 9 refused at once.
    let before = bed.overflows("reviews", "pending");
    let v = bed.load(
        &format!("{REVIEWS}/reviews/burst"),
        110,
        110,
        &["user:tester", "x-delay-ms:2000"],
    );
    let (ok, uo) = (status(&v, "200"), status(&v, "503"));
    assert_eq!(ok + uo, 110, "{v}");
    assert!(
        (1..=9).contains(&uo),
        "http1MaxPendingRequests: 1 past 100 connections: {v}"
    );
    assert!(ok >= 101, "100 in flight and 1 pending served: {v}");
    let s = bed.stats("reviews-v2", 9080);
    assert_eq!(num(&s, "requests"), ok);
    assert!(num(&s, "max_in_flight") <= 100, "maxConnections: 100: {s}");
    assert_eq!(bed.overflows("reviews", "pending") - before, uo as f64);
    assert_eq!(bed.overflows("reviews", "pending_timeout"), 0.0);
    let f = bed.flags("/reviews/burst");
    assert_eq!(f.get("UO").copied().unwrap_or(0), uo, "{f:?}");

    // --- The retry budget. ---
    bed.apply(&[("httpbin-vs.yaml", RETRY_VS), ("httpbin-dr.yaml", BUDGET_DR)]);
    let fail = ["x-status:503", "x-delay-ms:100"];
    let before = bed.overflows("httpbin", "retries");
    let v = bed.load(&format!("{HTTPBIN}/budget"), 16, 8, &fail);
    assert_eq!(status(&v, "503"), 16, "{v}");
    let attempts = num(&bed.stats("httpbin", 8000), "requests");
    let stopped = bed.overflows("httpbin", "retries") - before;
    eprintln!("maxRetries 1: {attempts} attempts for 16 requests (64 without), {stopped} retries stopped");
    assert!((16..=40).contains(&attempts), "retries capped: {attempts}");
    assert!(stopped >= 4.0, "{stopped}");
    let f = bed.flags("/budget");
    assert_eq!(f.get("UO").copied().unwrap_or(0) as f64, stopped, "{f:?}");

    // Positive control: the same route without the budget makes every retry.
    bed.apply(&[("httpbin-vs.yaml", RETRY_VS)]);
    let v = bed.load(&format!("{HTTPBIN}/no-budget"), 16, 8, &fail);
    assert_eq!(status(&v, "503"), 16, "{v}");
    assert_eq!(num(&bed.stats("httpbin", 8000), "requests"), 64, "1 + 3 attempts each");
    let f = bed.flags("/no-budget");
    assert_eq!(f.get("URX").copied().unwrap_or(0), 16, "{f:?}");
}
