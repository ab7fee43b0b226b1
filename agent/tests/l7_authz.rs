//! Authorization with HTTP attributes at the destination, in process over
//! loopback with no privileges: Istio's Bookinfo authorization tasks
//! replayed on two agents with HBONE and real mutual TLS (productpage,
//! reviews and sleep on n1, details on n2), through both agents' HTTP
//! layers: source side routing, destination side deciding per request.
//! Same-node connections take the same inbound path (gate, authorization,
//! live re-check). Each denial sits beside a positive control; outcomes are
//! checked in the parsed metrics.

mod common;

use std::net::{Ipv4Addr, SocketAddrV4};

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Empty};
use hyper::{HeaderMap, Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PRODUCTPAGE: u8 = 2;
const REVIEWS: u8 = 3;
const SLEEP: u8 = 4;

fn pod(net: u8, node: u8, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, net, node, host)
}

/// Service `productpage` (10.96.net.1) or `details` (10.96.net.2): port
/// 9080 is HTTP, 9090 TCP.
fn vip(net: u8, svc: u8, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(10, 96, net, svc), port)
}

fn bookinfo(net: u8, node: &str, policies: &str) -> ferry_model::ConfigFile {
    config(&format!(
        "node: {node}
workloads:
  - {{uid: productpage, name: productpage, serviceAccount: bookinfo-productpage, node: n1, ip: 127.{net}.1.2, enrolled: true, labels: {{app: productpage, version: v1}}}}
  - {{uid: reviews, name: reviews, serviceAccount: bookinfo-reviews, node: n1, ip: 127.{net}.1.3, enrolled: true, labels: {{app: reviews, version: v1}}}}
  - {{uid: sleep, name: sleep, serviceAccount: sleep, node: n1, ip: 127.{net}.1.4, enrolled: true, labels: {{app: sleep}}}}
  - {{uid: details, name: details, serviceAccount: bookinfo-details, node: n2, ip: 127.{net}.2.2, enrolled: true, labels: {{app: details, version: v1}}}}
services:
  - {{name: productpage, vip: 10.96.{net}.1, ports: [{{port: 9080, targetPort: 9080, protocol: http}}, {{port: 9090, targetPort: 9090, protocol: tcp}}], endpoints: [{{ip: 127.{net}.1.2}}]}}
  - {{name: details, vip: 10.96.{net}.2, ports: [{{port: 9080, targetPort: 9080, protocol: http}}, {{port: 9090, targetPort: 9090, protocol: tcp}}], endpoints: [{{ip: 127.{net}.2.2}}]}}
authorizationPolicies:
{policies}"
    ))
}

/// n1 (productpage, reviews, sleep) and n2 (details) with HBONE, every pod
/// holding a certificate for its own identity from one CA, `policies` on
/// both; the apps: HTTP on 9080, a TCP echo on 9090.
async fn mesh(net: u8, policies: &str) -> (TestAgent, TestAgent) {
    let ca = TestCa::new();
    let (n1, n2) = (agent("n1", true, &[]), agent("n2", true, &[]));
    for (ag, uid, sa) in [
        (&n1, "productpage", "bookinfo-productpage"),
        (&n1, "reviews", "bookinfo-reviews"),
        (&n1, "sleep", "sleep"),
        (&n2, "details", "bookinfo-details"),
    ] {
        ca.issue_to(ag, uid, &format!("spiffe://cluster.local/ns/default/sa/{sa}"));
    }
    apply(&n1, &n2, net, policies).await;
    http_app(SocketAddrV4::new(pod(net, 1, PRODUCTPAGE), 9080), "productpage").await;
    http_app(SocketAddrV4::new(pod(net, 2, 2), 9080), "details").await;
    stream_echo(SocketAddrV4::new(pod(net, 1, PRODUCTPAGE), 9090)).await;
    stream_echo(SocketAddrV4::new(pod(net, 2, 2), 9090)).await;
    (n1, n2)
}

async fn apply(n1: &TestAgent, n2: &TestAgent, net: u8, policies: &str) {
    n1.reconciler.reconcile(bookinfo(net, "n1", policies)).await;
    n2.reconciler.reconcile(bookinfo(net, "n2", policies)).await;
}

/// A TCP app that echoes every chunk until the client closes.
async fn stream_echo(addr: SocketAddrV4) {
    let l = tokio::net::TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 256];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
}

/// One HTTP/1.1 request from the app in pod `from` (on n1) to `to`, on a
/// connection of its own: status, headers, body.
async fn call(n1: &TestAgent, from: Ipv4Addr, to: SocketAddrV4, method: &str, path: &str) -> (StatusCode, String) {
    let (st, _, body) = call_full(n1, from, to, method, path).await;
    (st, body)
}

async fn call_full(
    n1: &TestAgent,
    from: Ipv4Addr,
    to: SocketAddrV4,
    method: &str,
    path: &str,
) -> (StatusCode, HeaderMap, String) {
    tokio::time::timeout(DEADLINE, async {
        let s = app_stream(n1, from, to).await.unwrap();
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await.unwrap();
        tokio::spawn(conn);
        let req = Request::builder()
            .method(Method::from_bytes(method.as_bytes()).unwrap())
            .uri(path)
            .header("host", "bookinfo")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = tx.send_request(req).await.unwrap();
        let (p, body) = resp.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        (p.status, p.headers, String::from_utf8_lossy(&body).into_owned())
    })
    .await
    .expect("an answer within the deadline")
}

/// What a TCP client in `from` gets back for "hi" ("" when refused).
async fn tcp(n1: &TestAgent, from: Ipv4Addr, to: SocketAddrV4) -> String {
    app_connect(n1, from, to, "hi").await.unwrap_or_default()
}

fn scrape(ag: &TestAgent) -> Vec<prometheus_parse::Sample> {
    let text = ag.proxy.telemetry.metrics.encode();
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .unwrap()
        .samples
}

/// `metric` summed over the samples whose labels include `want`.
fn sum(ag: &TestAgent, metric: &str, want: &[(&str, &str)]) -> f64 {
    scrape(ag)
        .into_iter()
        .filter(|s| s.metric == metric)
        .filter(|s| want.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

fn requests(ag: &TestAgent, want: &[(&str, &str)]) -> f64 {
    sum(ag, "istio_requests_total", want)
}

/// `ferry_authz_denied_total{policy, reason}`.
fn denied(ag: &TestAgent, policy: &str, reason: &str) -> f64 {
    sum(
        ag,
        "ferry_authz_denied_total",
        &[("policy", policy), ("reason", reason)],
    )
}

#[tokio::test]
async fn allow_nothing_denies_every_request_and_connection() {
    let net = 60;
    let (n1, n2) = mesh(net, "  []\n").await;
    let (sleep, pp) = (pod(net, 1, SLEEP), pod(net, 1, PRODUCTPAGE));
    // Positive controls: same node, across nodes, a TCP port.
    assert_eq!(
        call(&n1, sleep, vip(net, 1, 9080), "GET", "/productpage").await,
        (StatusCode::OK, "productpage GET /productpage".into())
    );
    assert_eq!(
        call(&n1, pp, vip(net, 2, 9080), "GET", "/details/0").await,
        (StatusCode::OK, "details GET /details/0".into())
    );
    assert_eq!(tcp(&n1, sleep, vip(net, 1, 9090)).await, "hi");

    apply(
        &n1,
        &n2,
        net,
        "  - {name: allow-nothing, namespace: default, spec: {}}\n",
    )
    .await;
    // The pooled HTTP connections stay (each request is decided when it
    // arrives): the next requests ride them and are answered 403.
    assert_eq!(
        call(&n1, sleep, vip(net, 1, 9080), "GET", "/productpage").await,
        (StatusCode::FORBIDDEN, "RBAC: access denied".into())
    );
    assert_eq!(
        call(&n1, pp, vip(net, 2, 9080), "GET", "/details/0").await,
        (StatusCode::FORBIDDEN, "RBAC: access denied".into())
    );
    assert_eq!(tcp(&n1, sleep, vip(net, 1, 9090)).await, "", "TCP: refused");
    // n1: the request and the TCP connection; n2: the request. No HTTP
    // connection was cut.
    until("denials counted", || {
        denied(&n1, "default/allow-nothing", "allow_nothing") == 2.0
            && denied(&n2, "default/allow-nothing", "allow_nothing") == 1.0
    })
    .await;
    for ag in [&n1, &n2] {
        assert_eq!(
            requests(
                ag,
                &[
                    ("reporter", "destination"),
                    ("response_code", "403"),
                    ("response_flags", "RBAC")
                ]
            ),
            1.0
        );
    }
}

#[tokio::test]
async fn productpage_is_viewable_with_get_only() {
    let net = 61;
    let (n1, n2) = mesh(net, "  []\n").await;
    let sleep = pod(net, 1, SLEEP);
    let page = vip(net, 1, 9080);
    // Positive control: before the policy, POST is served.
    assert_eq!(call(&n1, sleep, page, "POST", "/productpage").await.0, StatusCode::OK);

    let viewer = "  - {name: productpage-viewer, namespace: default, spec: {selector: {matchLabels: {app: productpage}}, action: ALLOW, rules: [{to: [{operation: {methods: [GET]}}]}]}}\n";
    apply(&n1, &n2, net, viewer).await;
    assert_eq!(
        call(&n1, sleep, page, "GET", "/productpage").await,
        (StatusCode::OK, "productpage GET /productpage".into())
    );
    let (st, h, body) = call_full(&n1, sleep, page, "POST", "/productpage").await;
    assert_eq!((st, body.as_str()), (StatusCode::FORBIDDEN, "RBAC: access denied"));
    assert_eq!(h["content-type"], "text/plain");

    // gRPC (HTTP/2): PERMISSION_DENIED, trailers-only.
    let s = app_stream(&n1, sleep, page).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .method("POST")
        .uri("http://productpage:9080/bookinfo.Products/Get")
        .header("content-type", "application/grpc")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = tokio::time::timeout(DEADLINE, tx.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["grpc-status"], "7");
    assert_eq!(resp.headers()["grpc-message"], "RBAC: access denied");

    // Counted at the destination (this node: same-node requests).
    let dst = [
        ("reporter", "destination"),
        ("destination_workload", "productpage"),
        ("destination_service", "productpage.default.svc.cluster.local"),
        ("source_workload", "sleep"),
    ];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut w = dst.to_vec();
        w.extend_from_slice(extra);
        requests(&n1, &w)
    };
    until("requests counted", || {
        with(&[
            ("response_code", "403"),
            ("response_flags", "RBAC"),
            ("request_protocol", "http"),
        ]) == 1.0
            && with(&[
                ("response_code", "200"),
                ("response_flags", "RBAC"),
                ("request_protocol", "grpc"),
                ("grpc_response_status", "7"),
            ]) == 1.0
    })
    .await;
    assert_eq!(with(&[("response_code", "200"), ("response_flags", "-")]), 2.0);
    assert_eq!(denied(&n1, "-", "no_allow_matched"), 2.0);
}

#[tokio::test]
async fn details_admits_only_productpage_per_request() {
    let net = 62;
    let (n1, n2) = mesh(net, "  []\n").await;
    let (pp, reviews) = (pod(net, 1, PRODUCTPAGE), pod(net, 1, REVIEWS));
    let details = vip(net, 2, 9080);
    // Positive control: before the policy, reviews reads details.
    assert_eq!(call(&n1, reviews, details, "GET", "/details/0").await.0, StatusCode::OK);

    let viewer = "  - {name: details-viewer, namespace: default, spec: {selector: {matchLabels: {app: details}}, action: ALLOW, rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/bookinfo-productpage]}}], to: [{operation: {methods: [GET]}}]}]}}\n";
    apply(&n1, &n2, net, viewer).await;
    assert_eq!(
        call(&n1, pp, details, "GET", "/details/0").await,
        (StatusCode::OK, "details GET /details/0".into())
    );
    assert_eq!(
        call(&n1, reviews, details, "GET", "/details/0").await.0,
        StatusCode::FORBIDDEN,
        "the wrong principal"
    );
    assert_eq!(
        call(&n1, pp, details, "DELETE", "/details/0").await.0,
        StatusCode::FORBIDDEN,
        "the right principal, a method not allowed"
    );
    until("both denials counted", || denied(&n2, "-", "no_allow_matched") == 2.0).await;
    let by = |principal: &str, code: &str| {
        let p = format!("spiffe://cluster.local/ns/default/sa/{principal}");
        requests(
            &n2,
            &[
                ("reporter", "destination"),
                ("source_principal", &p),
                ("connection_security_policy", "mutual_tls"),
                ("response_code", code),
            ],
        )
    };
    assert_eq!(by("bookinfo-productpage", "200"), 1.0);
    assert_eq!(by("bookinfo-productpage", "403"), 1.0);
    assert_eq!(by("bookinfo-reviews", "403"), 1.0);
    assert_eq!(by("bookinfo-reviews", "200"), 1.0, "the positive control");
    // The source side reports the destination's answer.
    until("the source reports the 403s", || {
        requests(&n1, &[("reporter", "source"), ("response_code", "403")]) == 2.0
    })
    .await;
}

#[tokio::test]
async fn a_deny_on_a_path_overrides_an_allow() {
    let net = 63;
    // DENY before ALLOW: the ALLOW names /admin explicitly, the DENY wins.
    let policies = "  - {name: allow-productpage, namespace: default, spec: {selector: {matchLabels: {app: details}}, rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/bookinfo-productpage]}}]}, {to: [{operation: {paths: [/admin]}}]}]}}
  - {name: deny-admin, namespace: default, spec: {selector: {matchLabels: {app: details}}, action: DENY, rules: [{to: [{operation: {paths: [/admin, /admin/*]}}]}]}}
";
    let (n1, n2) = mesh(net, policies).await;
    let (pp, reviews) = (pod(net, 1, PRODUCTPAGE), pod(net, 1, REVIEWS));
    let details = vip(net, 2, 9080);
    assert_eq!(
        call(&n1, pp, details, "GET", "/details/0").await,
        (StatusCode::OK, "details GET /details/0".into()),
        "positive control"
    );
    assert_eq!(
        call(&n1, pp, details, "GET", "/administrator").await,
        (StatusCode::OK, "details GET /administrator".into()),
        "not the denied path"
    );
    for path in ["/admin", "/admin/users", "/public/../admin", "/%61dmin", "/./admin/x"] {
        assert_eq!(
            call(&n1, pp, details, "GET", path).await,
            (StatusCode::FORBIDDEN, "RBAC: access denied".into()),
            "{path}"
        );
    }
    // The app gets the path that was authorized.
    assert_eq!(
        call(&n1, pp, details, "GET", "/public/./x/../details/%31").await,
        (StatusCode::OK, "details GET /public/details/1".into())
    );
    // reviews may call /admin by the second ALLOW rule, but the DENY wins;
    // anything else from reviews is not allowed.
    assert_eq!(
        call(&n1, reviews, details, "GET", "/admin").await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        call(&n1, reviews, details, "GET", "/details/0").await.0,
        StatusCode::FORBIDDEN
    );
    until("denials counted by policy", || {
        denied(&n2, "default/deny-admin", "matched_deny") == 6.0 && denied(&n2, "-", "no_allow_matched") == 1.0
    })
    .await;
}

#[tokio::test]
async fn an_l7_rule_on_a_tcp_port_is_denied_at_the_connection() {
    let net = 64;
    let viewer = "  - {name: details-viewer, namespace: default, spec: {selector: {matchLabels: {app: details}}, rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/bookinfo-productpage]}}], to: [{operation: {methods: [GET]}}]}]}}\n";
    let (n1, n2) = mesh(net, viewer).await;
    let pp = pod(net, 1, PRODUCTPAGE);
    // Positive control: the same rule on the HTTP port.
    assert_eq!(call(&n1, pp, vip(net, 2, 9080), "GET", "/").await.0, StatusCode::OK);
    // The TCP port cannot see the method: the only ALLOW rule cannot match.
    assert_eq!(tcp(&n1, pp, vip(net, 2, 9090)).await, "");
    until("the L4 denial counted", || denied(&n2, "-", "l7_allow_on_l4") == 1.0).await;
    assert_eq!(n2.proxy.telemetry.counters.snapshot().refused, 1);
}

#[tokio::test]
async fn same_node_connections_are_authorized_and_rechecked() {
    let net = 65;
    let (n1, n2) = mesh(net, "  []\n").await;
    let (sleep, reviews) = (pod(net, 1, SLEEP), pod(net, 1, REVIEWS));
    let echo = vip(net, 1, 9090);
    // Positive controls, and a live connection from reviews.
    assert_eq!(tcp(&n1, sleep, echo).await, "hi");
    assert_eq!(tcp(&n1, reviews, echo).await, "hi");
    let mut live = app_stream(&n1, reviews, echo).await.unwrap();
    live.write_all(b"a").await.unwrap();
    let mut one = [0u8; 1];
    tokio::time::timeout(DEADLINE, live.read_exact(&mut one))
        .await
        .unwrap()
        .unwrap();

    // Only sleep may call productpage now.
    let policy = "  - {name: from-sleep, namespace: default, spec: {selector: {matchLabels: {app: productpage}}, rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/sleep]}}]}]}}\n";
    apply(&n1, &n2, net, policy).await;
    let mut buf = [0u8; 16];
    let cut = tokio::time::timeout(DEADLINE, live.read(&mut buf))
        .await
        .expect("the live same-node connection is cut");
    assert!(matches!(cut, Ok(0) | Err(_)), "{cut:?}");
    assert_eq!(tcp(&n1, reviews, echo).await, "", "reviews is denied");
    assert_eq!(tcp(&n1, sleep, echo).await, "hi", "sleep, by its own identity");
    until("the live cut and the refusal counted", || {
        denied(&n1, "-", "no_allow_matched") == 2.0
    })
    .await;
    assert_eq!(n1.proxy.telemetry.counters.snapshot().refused, 1);
}

#[tokio::test]
async fn destination_reports_request_metrics_with_the_service() {
    let net = 66;
    let (n1, n2) = mesh(net, "  []\n").await;
    let (pp, sleep) = (pod(net, 1, PRODUCTPAGE), pod(net, 1, SLEEP));
    for _ in 0..3 {
        assert_eq!(
            call(&n1, pp, vip(net, 2, 9080), "GET", "/details/0").await.0,
            StatusCode::OK
        );
    }
    for _ in 0..2 {
        assert_eq!(call(&n1, sleep, vip(net, 1, 9080), "GET", "/").await.0, StatusCode::OK);
    }
    let across = [
        ("source_workload", "productpage"),
        (
            "source_principal",
            "spiffe://cluster.local/ns/default/sa/bookinfo-productpage",
        ),
        ("destination_workload", "details"),
        (
            "destination_principal",
            "spiffe://cluster.local/ns/default/sa/bookinfo-details",
        ),
        ("destination_service", "details.default.svc.cluster.local"),
        ("destination_service_name", "details"),
        ("destination_service_namespace", "default"),
        ("connection_security_policy", "mutual_tls"),
        ("request_protocol", "http"),
        ("response_code", "200"),
        ("response_flags", "-"),
    ];
    let with = |ag: &TestAgent, reporter: &'static str, labels: &[(&'static str, &'static str)]| {
        let mut w = labels.to_vec();
        w.push(("reporter", reporter));
        requests(ag, &w)
    };
    until("both reporters across nodes", || {
        with(&n2, "destination", &across) == 3.0 && with(&n1, "source", &across) == 3.0
    })
    .await;
    let same = [
        ("source_workload", "sleep"),
        ("destination_workload", "productpage"),
        ("destination_service", "productpage.default.svc.cluster.local"),
        ("connection_security_policy", "none"),
        ("response_code", "200"),
    ];
    until("both reporters on one node", || {
        with(&n1, "destination", &same) == 2.0 && with(&n1, "source", &same) == 2.0
    })
    .await;
    assert!(
        scrape(&n2)
            .iter()
            .any(|s| s.metric == "istio_request_duration_milliseconds"
                && s.labels.get("reporter") == Some("destination")
                && matches!(s.value, prometheus_parse::Value::Histogram(_))),
        "a duration histogram at the destination"
    );
    // An HTTP port's connections are counted per request, not as TCP.
    assert_eq!(
        sum(
            &n2,
            "istio_tcp_connections_opened_total",
            &[("reporter", "destination")]
        ),
        0.0
    );
}
