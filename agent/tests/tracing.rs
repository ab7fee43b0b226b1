//! Tracing, in process over loopback with no privileges: two agents with
//! HBONE and real mutual TLS (`sleep` on n1 calls the `details` Service on
//! n2), `settings.tracing` pointing at a small OTLP/gRPC collector
//! ([`Collector`]: a tonic server built from the `opentelemetry-proto`
//! crate's generated types, so the agent's hand-written messages are
//! decoded by upstream's definitions). The `details` app answers with the
//! trace headers it received.

mod common;

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        trace_service_server::{TraceService, TraceServiceServer},
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    },
    common::v1::any_value::Value,
    trace::v1::{span::SpanKind, Span},
};

const SLEEP: u8 = 4;
const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER: &str = "00f067aa0ba902b7";

fn pod(net: u8, node: u8, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, net, node, host)
}

fn details_vip(net: u8) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(10, 96, net, 2), 9080)
}

fn collector_addr(net: u8) -> SocketAddrV4 {
    SocketAddrV4::new(pod(net, 9, 9), 4317)
}

fn mesh_config(net: u8, node: &str, rate: f64) -> ferry_model::ConfigFile {
    config(&format!(
        "node: {node}
settings: {{tracing: {{endpoint: \"http://{collector}\", sampleRate: {rate}}}}}
workloads:
  - {{uid: sleep, name: sleep-6d5f, serviceAccount: sleep, node: n1, ip: 127.{net}.1.{SLEEP}, enrolled: true, labels: {{app: sleep}}}}
  - {{uid: details, name: details-v1-7c9, serviceAccount: bookinfo-details, node: n2, ip: 127.{net}.2.2, enrolled: true, labels: {{app: details, version: v1}}}}
services:
  - {{name: details, vip: 10.96.{net}.2, ports: [{{port: 9080, targetPort: 9080, protocol: http}}], endpoints: [{{ip: 127.{net}.2.2}}]}}
",
        collector = collector_addr(net)
    ))
}

/// n1 (sleep) and n2 (details) with HBONE and certificates from one CA,
/// tracing at `rate`; the details app reports the trace headers it got.
async fn mesh(net: u8, rate: f64) -> (TestAgent, TestAgent) {
    let ca = TestCa::new();
    let (n1, n2) = (agent("n1", true, &[]), agent("n2", true, &[]));
    for (ag, uid, sa) in [(&n1, "sleep", "sleep"), (&n2, "details", "bookinfo-details")] {
        ca.issue_to(ag, uid, &format!("spiffe://cluster.local/ns/default/sa/{sa}"));
    }
    set_rate(&n1, &n2, net, rate).await;
    header_app(SocketAddrV4::new(pod(net, 2, 2), 9080)).await;
    (n1, n2)
}

async fn set_rate(n1: &TestAgent, n2: &TestAgent, net: u8, rate: f64) {
    n1.reconciler.reconcile(mesh_config(net, "n1", rate)).await;
    n2.reconciler.reconcile(mesh_config(net, "n2", rate)).await;
}

/// The trace headers the app saw, one `name: value` per line.
const SEEN: [&str; 8] = [
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
];

async fn header_app(addr: SocketAddrV4) {
    let l = tokio::net::TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|r: Request<hyper::body::Incoming>| async move {
                    let mut text = String::new();
                    for name in SEEN {
                        for v in r.headers().get_all(name) {
                            text.push_str(&format!("{name}: {}\n", v.to_str().unwrap_or("?")));
                        }
                    }
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from(text))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
}

/// One HTTP/1.1 request from the sleep pod to details with `headers`: the
/// status and the trace headers the app saw.
async fn call(n1: &TestAgent, net: u8, headers: &[(&str, &str)]) -> (StatusCode, BTreeMap<String, String>) {
    tokio::time::timeout(DEADLINE, async {
        let s = app_stream(n1, pod(net, 1, SLEEP), details_vip(net)).await.unwrap();
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await.unwrap();
        tokio::spawn(conn);
        let mut req = Request::builder()
            .uri("/details/0")
            .header("host", "details:9080")
            .header("x-request-id", "req-1");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = tx.send_request(req.body(Empty::<Bytes>::new()).unwrap()).await.unwrap();
        let (p, body) = resp.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        let seen = String::from_utf8_lossy(&body)
            .lines()
            .filter_map(|l| l.split_once(": "))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        (p.status, seen)
    })
    .await
    .expect("an answer within the deadline")
}

/// An OTLP/gRPC trace receiver keeping every span with its `service.name`.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<(String, Span)>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut all = self.spans.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                all.extend(ss.spans.into_iter().map(|s| (service.clone(), s)));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Collector {
    async fn start(addr: SocketAddrV4) -> Self {
        let c = Collector::default();
        let svc = TraceServiceServer::new(c.clone());
        let l = tokio::net::TcpListener::bind(addr).await.unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(l)),
        );
        c
    }

    fn spans(&self) -> Vec<(String, Span)> {
        self.spans.lock().unwrap().clone()
    }

    /// Waits for at least `n` spans.
    async fn wait(&self, n: usize) -> Vec<(String, Span)> {
        until(&format!("{n} spans exported"), || self.spans.lock().unwrap().len() >= n).await;
        self.spans()
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn attr(s: &Span, key: &str) -> Option<String> {
    s.attributes.iter().find(|a| a.key == key).and_then(|a| {
        Some(match a.value.as_ref()?.value.as_ref()? {
            Value::StringValue(v) => v.clone(),
            Value::IntValue(v) => v.to_string(),
            Value::BoolValue(v) => v.to_string(),
            _ => return None,
        })
    })
}

fn kind(spans: &[(String, Span)], k: SpanKind) -> Vec<(String, Span)> {
    spans.iter().filter(|(_, s)| s.kind == k as i32).cloned().collect()
}

#[tokio::test]
async fn a_sampled_request_gets_a_client_and_a_server_span_in_its_trace() {
    let net = 90;
    let collector = Collector::start(collector_addr(net)).await;
    // Rate 0: the spans exist only because the caller sampled the trace.
    let (n1, _n2) = mesh(net, 0.0).await;
    let (status, seen) = call(&n1, net, &[("traceparent", TP), ("tracestate", "congo=t61rcWkgMzE")]).await;
    assert_eq!(status, StatusCode::OK);
    let spans = collector.wait(2).await;
    assert_eq!(spans.len(), 2, "{spans:?}");
    let (client_svc, client) = kind(&spans, SpanKind::Client).pop().expect("a client span");
    let (server_svc, server) = kind(&spans, SpanKind::Server).pop().expect("a server span");
    // One trace: caller -> client span (source agent) -> server span (destination agent).
    for s in [&client, &server] {
        assert_eq!(hex(&s.trace_id), TRACE);
        assert_eq!(s.trace_state, "congo=t61rcWkgMzE");
        assert!(s.end_time_unix_nano >= s.start_time_unix_nano && s.start_time_unix_nano > 0);
    }
    assert_eq!(hex(&client.parent_span_id), CALLER);
    assert_eq!(
        server.parent_span_id, client.span_id,
        "the server span's parent is the client span"
    );
    // The app's parent is the destination's server span (Envoy injects the
    // span of the hop that forwards to the app), B3 consistent with it.
    let (c, s) = (hex(&client.span_id), hex(&server.span_id));
    assert_eq!(seen["traceparent"], format!("00-{TRACE}-{s}-01"));
    assert_eq!(seen["tracestate"], "congo=t61rcWkgMzE");
    assert_eq!(seen["x-b3-traceid"], TRACE);
    assert_eq!(seen["x-b3-spanid"], s);
    assert_eq!(seen["x-b3-parentspanid"], c);
    assert_eq!(seen["x-b3-sampled"], "1");
    assert!(!seen.contains_key("b3"), "b3 single only when the caller sent it");
    // Names and attributes as Istio's.
    assert_eq!(client.name, "details.default.svc.cluster.local:9080/*");
    assert_eq!(server.name, "details.default.svc.cluster.local:9080/*");
    assert_eq!(
        (client_svc.as_str(), server_svc.as_str()),
        ("sleep.default", "details.default")
    );
    for s in [&client, &server] {
        assert_eq!(attr(s, "http.method").as_deref(), Some("GET"));
        assert_eq!(attr(s, "http.url").as_deref(), Some("http://details:9080/details/0"));
        assert_eq!(attr(s, "http.status_code").as_deref(), Some("200"));
        assert_eq!(attr(s, "response_flags").as_deref(), Some("-"));
        assert_eq!(attr(s, "guid:x-request-id").as_deref(), Some("req-1"));
        assert!(attr(s, "response_size").is_some_and(|n| n.parse::<u64>().unwrap() > 0));
        assert_eq!(s.status.as_ref().map_or(0, |st| st.code), 0, "unset: not an error");
    }
    assert_eq!(
        attr(&client, "upstream_cluster").as_deref(),
        Some("outbound|9080||details.default.svc.cluster.local")
    );
    assert_eq!(attr(&client, "k8s.pod.name").as_deref(), Some("sleep-6d5f"));
    assert_eq!(attr(&client, "node_id").as_deref(), Some("n1"));
    assert_eq!(attr(&server, "upstream_cluster").as_deref(), Some("inbound|9080||"));
    assert_eq!(attr(&server, "k8s.pod.name").as_deref(), Some("details-v1-7c9"));
    assert_eq!(attr(&server, "istio.canonical_service").as_deref(), Some("details"));
    assert_eq!(attr(&server, "istio.canonical_revision").as_deref(), Some("v1"));
    assert_eq!(attr(&server, "node_id").as_deref(), Some("n2"));

    // A B3 single header in: the same shape out, consistent.
    let b3 = format!("{TRACE}-{CALLER}-1");
    let (_, seen) = call(&n1, net, &[("b3", &b3)]).await;
    let spans = collector.wait(4).await;
    let server = kind(&spans[2..], SpanKind::Server).pop().unwrap().1;
    let client = kind(&spans[2..], SpanKind::Client).pop().unwrap().1;
    assert_eq!(hex(&client.parent_span_id), CALLER);
    let (c, s) = (hex(&client.span_id), hex(&server.span_id));
    assert_eq!(seen["b3"], format!("{TRACE}-{s}-1-{c}"));
    assert_eq!(seen["traceparent"], format!("00-{TRACE}-{s}-01"));
}

#[tokio::test]
async fn sampling_zero_exports_nothing_and_rate_one_exports() {
    let net = 91;
    let collector = Collector::start(collector_addr(net)).await;
    let (n1, n2) = mesh(net, 0.0).await;
    let mut traces = Vec::new();
    for _ in 0..20 {
        let (status, seen) = call(&n1, net, &[]).await;
        assert_eq!(status, StatusCode::OK);
        // Not sampled, still propagated (a later hop may continue the trace).
        let tp = &seen["traceparent"];
        assert!(tp.starts_with("00-") && tp.ends_with("-00"), "{tp}");
        assert_eq!(seen["x-b3-sampled"], "0");
        traces.push(seen["x-b3-traceid"].clone());
    }
    traces.sort();
    traces.dedup();
    assert_eq!(traces.len(), 20, "each request its own trace");
    // Longer than a batch's delay: nothing was queued.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(collector.spans().is_empty(), "{:?}", collector.spans());

    // Positive control: rate 1, applied live. A caller's "not sampled"
    // still wins (parent-based); the next request without context is
    // sampled.
    set_rate(&n1, &n2, net, 1.0).await;
    let (_, seen) = call(&n1, net, &[("traceparent", &TP.replace("-01", "-00"))]).await;
    assert!(seen["traceparent"].ends_with("-00"));
    let (_, seen) = call(&n1, net, &[]).await;
    let spans = collector.wait(2).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let spans = if collector.spans().len() > spans.len() {
        collector.spans()
    } else {
        spans
    };
    assert_eq!(spans.len(), 2, "only the sampled request: {spans:?}");
    let client = kind(&spans, SpanKind::Client).pop().unwrap().1;
    let server = kind(&spans, SpanKind::Server).pop().unwrap().1;
    assert!(client.parent_span_id.is_empty(), "a new trace's root");
    assert_eq!(server.parent_span_id, client.span_id);
    assert_eq!(hex(&client.trace_id), seen["x-b3-traceid"]);
    assert_eq!(
        seen["traceparent"],
        format!("00-{}-{}-01", hex(&client.trace_id), hex(&server.span_id))
    );
    // No tracing at all: headers pass through untouched.
    n1.reconciler.reconcile(no_tracing(net, "n1")).await;
    n2.reconciler.reconcile(no_tracing(net, "n2")).await;
    let (_, seen) = call(&n1, net, &[("traceparent", TP), ("x-b3-flags", "1")]).await;
    assert_eq!(seen["traceparent"], TP);
    assert_eq!(seen["x-b3-flags"], "1");
    assert!(!seen.contains_key("x-b3-traceid"));
}

fn no_tracing(net: u8, node: &str) -> ferry_model::ConfigFile {
    let mut c = mesh_config(net, node, 0.0);
    c.settings.tracing = None;
    c
}

/// `ferry_trace_spans_dropped_total{reason}` on `ag`.
fn dropped(ag: &TestAgent, reason: &str) -> f64 {
    let text = ag.proxy.telemetry.metrics.encode();
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .unwrap()
        .samples
        .into_iter()
        .filter(|s| s.metric == "ferry_trace_spans_dropped_total" && s.labels.get("reason") == Some(reason))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

#[tokio::test]
async fn a_collector_that_is_down_does_not_slow_requests() {
    let net = 92;
    // A collector that accepts connections and never answers.
    let hole = tokio::net::TcpListener::bind(collector_addr(net)).await.unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = held.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = hole.accept().await {
            keep.lock().unwrap().push(s);
        }
    });
    let (n1, n2) = mesh(net, 1.0).await;
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    for _ in 0..50 {
        let t = Instant::now();
        let (status, seen) = call(&n1, net, &[]).await;
        assert_eq!(status, StatusCode::OK);
        assert!(seen["traceparent"].ends_with("-01"));
        slowest = slowest.max(t.elapsed());
    }
    let total = started.elapsed();
    assert!(
        slowest < Duration::from_millis(500) && total < Duration::from_secs(5),
        "slowest {slowest:?}, total {total:?}"
    );
    // The spans are dropped once the export's deadline passes, and counted.
    let end = Instant::now() + Duration::from_secs(15);
    while dropped(&n1, "export_failed") + dropped(&n2, "export_failed") < 1.0 {
        assert!(Instant::now() < end, "no failed export counted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!held.lock().unwrap().is_empty(), "the exporter did try the collector");
}
