//! RateLimitPolicy at the destination, in process over loopback with no
//! privileges: two agents (clients productpage and sleep on n1, details on
//! n2), HBONE with real mutual TLS so the destination knows each client's
//! identity, requests through both agents' HTTP layers. Clients send as
//! fast as they can for a few seconds over keep-alive connections and the
//! answers are counted.
//!
//! The bound checked: a bucket at `R` requests per second, full (one
//! second's worth) at the start, accepts at most `R * T + R` requests over
//! `T` seconds, `T` measured by the client from its first request to its
//! last answer (which contains the destination's window), plus one for
//! rounding; and a client sending faster than `R` all along gets at least
//! [`LOWER`] of that (the shortfall is the time from the client's start to
//! the destination's first decision, and the tokens left at the end).

mod common;

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Empty};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;

const PRODUCTPAGE: u8 = 2;
const SLEEP: u8 = 4;

/// The least share of `R * T + R` a client sending faster than `R` gets.
const LOWER: f64 = 0.85;

fn pod(net: u8, node: u8, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, net, node, host)
}

/// Service `details` (10.96.net.2): 9080 and 9081, both HTTP, to the pod
/// on n2.
fn details(net: u8, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(10, 96, net, 2), port)
}

fn mesh_config(net: u8, node: &str, rate_limits: &str) -> ferry_model::ConfigFile {
    config(&format!(
        "node: {node}
workloads:
  - {{uid: productpage, name: productpage, serviceAccount: bookinfo-productpage, node: n1, ip: 127.{net}.1.2, enrolled: true, labels: {{app: productpage}}}}
  - {{uid: sleep, name: sleep, serviceAccount: sleep, node: n1, ip: 127.{net}.1.4, enrolled: true, labels: {{app: sleep}}}}
  - {{uid: details, name: details, serviceAccount: bookinfo-details, node: n2, ip: 127.{net}.2.2, enrolled: true, labels: {{app: details}}}}
services:
  - {{name: details, vip: 10.96.{net}.2, ports: [{{port: 9080, targetPort: 9080, protocol: http}}, {{port: 9081, targetPort: 9081, protocol: http}}], endpoints: [{{ip: 127.{net}.2.2}}]}}
rateLimits:
{rate_limits}"
    ))
}

/// n1 (productpage, sleep) and n2 (details, HTTP on 9080 and 9081); with
/// `mtls`, HBONE and a certificate for each pod's identity, else the plain
/// tunnel (no identities: every client is plaintext to the destination).
async fn mesh(net: u8, mtls: bool, rate_limits: &str) -> (TestAgent, TestAgent) {
    let (n1, n2) = (agent("n1", mtls, &[]), agent("n2", mtls, &[]));
    if mtls {
        let ca = TestCa::new();
        for (ag, uid, sa) in [
            (&n1, "productpage", "bookinfo-productpage"),
            (&n1, "sleep", "sleep"),
            (&n2, "details", "bookinfo-details"),
        ] {
            ca.issue_to(ag, uid, &format!("spiffe://cluster.local/ns/default/sa/{sa}"));
        }
    }
    apply(&n1, &n2, net, rate_limits).await;
    for port in [9080, 9081] {
        http_app(SocketAddrV4::new(pod(net, 2, 2), port), "details").await;
    }
    (n1, n2)
}

async fn apply(n1: &TestAgent, n2: &TestAgent, net: u8, rate_limits: &str) {
    n1.reconciler.reconcile(mesh_config(net, "n1", rate_limits)).await;
    n2.reconciler.reconcile(mesh_config(net, "n2", rate_limits)).await;
}

/// What one client got.
#[derive(Debug, Default)]
struct Counted {
    ok: u64,
    limited: u64,
    other: Vec<String>,
    /// From the first request sent to the last answer.
    elapsed: Duration,
}

impl Counted {
    fn sent(&self) -> u64 {
        self.ok + self.limited + self.other.len() as u64
    }

    /// Checks `ok` against a bucket at `rps` over the client's window.
    fn assert_within(&self, rps: u32, what: &str) {
        let (r, t) = (f64::from(rps), self.elapsed.as_secs_f64());
        let bound = r * t + r;
        assert!(self.other.is_empty(), "{what}: {:?}", self.other);
        assert!(
            self.sent() as f64 > 3.0 * r * t,
            "{what}: the client must send well above {rps}/s to test the limit: {self:?}"
        );
        assert!(
            (self.ok as f64) <= bound + 1.0 && (self.ok as f64) >= LOWER * bound,
            "{what}: {} accepted in {t:.2}s at {rps}/s: want {:.0}..={:.0} ({self:?})",
            self.ok,
            LOWER * bound,
            bound + 1.0
        );
    }
}

/// `conns` keep-alive connections from the app in `from` to `to`, each
/// sending GET requests back to back for `secs`; 429s must be the rate
/// limit's (body and header).
async fn blast(n1: &TestAgent, from: Ipv4Addr, to: SocketAddrV4, secs: f64, conns: usize) -> Counted {
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let s = app_stream(n1, from, to).await.unwrap();
        tasks.push(tokio::spawn(async move {
            let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await.unwrap();
            tokio::spawn(conn);
            let mut c = Counted::default();
            while Instant::now() < end {
                let req = Request::get("/details/0")
                    .header("host", "details")
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                let resp = match tokio::time::timeout(DEADLINE, tx.send_request(req)).await {
                    Ok(Ok(r)) => r,
                    other => {
                        c.other.push(format!("{other:?}"));
                        break;
                    }
                };
                let (p, body) = resp.into_parts();
                let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                match p.status {
                    StatusCode::OK => c.ok += 1,
                    StatusCode::TOO_MANY_REQUESTS
                        if &body[..] == b"local_rate_limited"
                            && p.headers.get("retry-after").is_some_and(|v| v == "1") =>
                    {
                        c.limited += 1
                    }
                    s => c.other.push(format!("{s} {}", String::from_utf8_lossy(&body))),
                }
            }
            c
        }));
    }
    let mut all = Counted::default();
    for t in tasks {
        let c = t.await.unwrap();
        all.ok += c.ok;
        all.limited += c.limited;
        all.other.extend(c.other);
    }
    all.elapsed = start.elapsed();
    all
}

/// `metric` summed over the samples whose labels include `want`.
fn sum(ag: &TestAgent, metric: &str, want: &[(&str, &str)]) -> f64 {
    let text = ag.proxy.telemetry.metrics.encode();
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .unwrap()
        .samples
        .into_iter()
        .filter(|s| s.metric == metric)
        .filter(|s| want.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

fn rate_limited(ag: &TestAgent, scope: &str) -> f64 {
    sum(
        ag,
        "ferry_rate_limited_total",
        &[
            ("destination_service", "details.default.svc.cluster.local"),
            ("policy", "default/details"),
            ("scope", scope),
        ],
    )
}

/// One request; its status and `grpc-status` (for a gRPC request).
async fn one(n1: &TestAgent, from: Ipv4Addr, to: SocketAddrV4, grpc: bool) -> (StatusCode, Option<String>) {
    let s = app_stream(n1, from, to).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await.unwrap();
    tokio::spawn(conn);
    let mut req = Request::post("/details.Details/Get").header("host", "details");
    if grpc {
        req = req.header("content-type", "application/grpc");
    }
    let resp = tx.send_request(req.body(Empty::<Bytes>::new()).unwrap()).await.unwrap();
    let grpc_status = resp
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().unwrap_or_default().to_owned());
    (resp.status(), grpc_status)
}

const TOTAL_20: &str = "  - {name: details, namespace: default, service: default/details, port: 9080, totalRps: 20}\n";

#[tokio::test]
async fn the_total_limit_answers_429_rl_above_its_rate() {
    let net = 85;
    let (n1, n2) = mesh(net, true, TOTAL_20).await;
    let (sleep, pp) = (pod(net, 1, SLEEP), pod(net, 1, PRODUCTPAGE));
    // Two clients together, 2 s at 20/s: 60 accepted (20 of burst, 40 earned).
    let (a, b) = tokio::join!(
        blast(&n1, sleep, details(net, 9080), 2.0, 2),
        blast(&n1, pp, details(net, 9080), 2.0, 2)
    );
    let both = Counted {
        ok: a.ok + b.ok,
        limited: a.limited + b.limited,
        other: [a.other, b.other].concat(),
        elapsed: a.elapsed.max(b.elapsed),
    };
    eprintln!(
        "total 20/s over {:.2}s: {} accepted, {} answered 429 (bound {:.0})",
        both.elapsed.as_secs_f64(),
        both.ok,
        both.limited,
        20.0 * both.elapsed.as_secs_f64() + 20.0
    );
    both.assert_within(20, "total");
    // Counted at the destination: the metric, and the request metrics with
    // response code 429 and flag RL (what the access log line carries too).
    assert_eq!(rate_limited(&n2, "total"), both.limited as f64);
    assert_eq!(rate_limited(&n2, "identity") + rate_limited(&n2, "override"), 0.0);
    assert_eq!(
        sum(
            &n2,
            "istio_requests_total",
            &[
                ("reporter", "destination"),
                ("response_code", "429"),
                ("response_flags", "RL")
            ]
        ),
        both.limited as f64
    );
    assert_eq!(
        sum(
            &n2,
            "istio_requests_total",
            &[
                ("reporter", "destination"),
                ("response_code", "200"),
                ("response_flags", "-")
            ]
        ),
        both.ok as f64
    );
    // gRPC gets RESOURCE_EXHAUSTED once the bucket is empty.
    let mut grpc = None;
    for _ in 0..50 {
        let (status, g) = one(&n1, sleep, details(net, 9080), true).await;
        assert_eq!(status, StatusCode::OK);
        if g.as_deref() == Some("8") {
            grpc = g;
            break;
        }
    }
    assert_eq!(grpc.as_deref(), Some("8"), "grpc-status RESOURCE_EXHAUSTED");
    // Port 9081 of the same Service is not limited (the policy names 9080).
    let other_port = blast(&n1, sleep, details(net, 9081), 0.5, 2).await;
    assert!(other_port.ok > 30 && other_port.limited == 0, "{other_port:?}");
}

#[tokio::test]
async fn each_identity_gets_its_own_rate_and_overrides_replace_it() {
    let net = 86;
    let policy = "  - {name: details, namespace: default, service: default/details, totalRps: 1000, perIdentityRps: 5,
      overrides: [{clientIdentities: [spiffe://cluster.local/ns/default/sa/bookinfo-productpage], rps: 25}]}\n";
    let (n1, n2) = mesh(net, true, policy).await;
    let (sleep, pp) = (pod(net, 1, SLEEP), pod(net, 1, PRODUCTPAGE));
    let (s, p) = tokio::join!(
        blast(&n1, sleep, details(net, 9080), 2.0, 2),
        blast(&n1, pp, details(net, 9080), 2.0, 2)
    );
    eprintln!(
        "per identity 5/s, productpage's override 25/s, over {:.2}s: sleep {} accepted ({} 429), productpage {} accepted ({} 429)",
        s.elapsed.as_secs_f64().max(p.elapsed.as_secs_f64()),
        s.ok,
        s.limited,
        p.ok,
        p.limited
    );
    s.assert_within(5, "sleep at perIdentity");
    p.assert_within(25, "productpage at its override");
    assert_eq!(rate_limited(&n2, "identity"), s.limited as f64);
    assert_eq!(rate_limited(&n2, "override"), p.limited as f64);
    assert_eq!(rate_limited(&n2, "total"), 0.0, "1000/s is never reached");
    // Every port of the Service (the policy names none): sleep's bucket,
    // spent on 9080, limits it on 9081 too.
    let other_port = blast(&n1, sleep, details(net, 9081), 0.3, 1).await;
    assert!(other_port.limited > 0 && other_port.ok <= 4, "{other_port:?}");
}

#[tokio::test]
async fn plaintext_clients_share_one_bucket() {
    let net = 87;
    let policy = "  - {name: details, namespace: default, service: default/details, perIdentityRps: 10}\n";
    // No mutual TLS: the destination sees no identity, for either client.
    let (n1, _n2) = mesh(net, false, policy).await;
    let (sleep, pp) = (pod(net, 1, SLEEP), pod(net, 1, PRODUCTPAGE));
    let (a, b) = tokio::join!(
        blast(&n1, sleep, details(net, 9080), 1.5, 2),
        blast(&n1, pp, details(net, 9080), 1.5, 2)
    );
    let both = Counted {
        ok: a.ok + b.ok,
        limited: a.limited + b.limited,
        other: [a.other, b.other].concat(),
        elapsed: a.elapsed.max(b.elapsed),
    };
    eprintln!(
        "plaintext, perIdentity 10/s over {:.2}s: {} + {} accepted together",
        both.elapsed.as_secs_f64(),
        a.ok,
        b.ok
    );
    both.assert_within(10, "two plaintext clients, one bucket");
}

#[tokio::test]
async fn without_a_policy_nothing_is_limited_and_changes_apply_to_the_next_request() {
    let net = 88;
    let (n1, n2) = mesh(net, true, "  []\n").await;
    let sleep = pod(net, 1, SLEEP);
    // Positive control: as fast as the client goes, no 429.
    let free = blast(&n1, sleep, details(net, 9080), 1.0, 2).await;
    assert!(free.ok > 60 && free.limited == 0 && free.other.is_empty(), "{free:?}");
    // A policy arrives: the next requests are limited, on open connections too.
    apply(&n1, &n2, net, TOTAL_20).await;
    let limited = blast(&n1, sleep, details(net, 9080), 1.0, 2).await;
    limited.assert_within(20, "after the policy arrived");
    assert!(n2.proxy.http.rate_limits.buckets() > 0);
    // Removed: no more 429.
    apply(&n1, &n2, net, "  []\n").await;
    let free = blast(&n1, sleep, details(net, 9080), 0.5, 2).await;
    assert!(free.ok > 30 && free.limited == 0, "{free:?}");
    assert_eq!(
        n1.proxy.http.rate_limits.buckets(),
        0,
        "the source side keeps no buckets"
    );
}
