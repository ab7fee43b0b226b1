//! The L7 path in one process, over loopback, with no privileges: real hyper
//! clients in a "pod" talk through the agent's outbound handler to real hyper
//! backends in other "pods" (delivered locally, or across the mTLS tunnel).
//! Routing by header, weighted splits, faults, timeouts, retries, mirrors,
//! HTTP/2 streaming with trailers, upgrades, protocol detection and the
//! request metrics; each negative beside a positive control, every wait
//! with a deadline.

mod common;

use std::{
    convert::Infallible,
    net::SocketAddrV4,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use common::*;
use ferry_agent::telemetry::http::Detection;
use futures::{channel::mpsc, SinkExt};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full, StreamBody};
use hyper::{body::Frame, HeaderMap, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

type Resp = Response<BoxBody<Bytes, Infallible>>;

fn a(s: &str) -> SocketAddrV4 {
    s.parse().unwrap()
}

fn text(s: impl Into<String>) -> BoxBody<Bytes, Infallible> {
    Full::new(Bytes::from(s.into())).boxed()
}

/// A backend: `f` answers each request (HTTP/1.1 or HTTP/2, upgrades allowed).
async fn backend<F, Fut>(addr: &str, f: F)
where
    F: Fn(Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Resp> + Send + 'static,
{
    let l = TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let f = f.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |r| {
                    let f = f.clone();
                    async move { Ok::<_, Infallible>(f(r).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
}

/// A backend answering with its name (and the `user` header it saw).
async fn named(addr: &str, name: &'static str) {
    backend(addr, move |r: Request<_>| async move {
        let user = r.headers().get("user").map(|v| v.to_str().unwrap_or("").to_owned());
        let mut resp = Response::new(text(name));
        resp.headers_mut().insert("x-served-by", name.parse().unwrap());
        if let Some(u) = user {
            resp.headers_mut().insert("x-user-seen", u.parse().unwrap());
        }
        resp
    })
    .await;
}

type H1 = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

/// An HTTP/1.1 connection from `pod` to `orig`, steered to the agent.
async fn h1(ag: &impl HasOrig, pod: &str, orig: &str) -> H1 {
    let s = app_stream(ag, pod.parse().unwrap(), a(orig)).await.unwrap();
    let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await.unwrap();
    tokio::spawn(conn.with_upgrades());
    tx
}

/// One request on `tx`: status, headers and body, within the deadline.
async fn get(tx: &mut H1, path: &str, headers: &[(&str, &str)]) -> (StatusCode, HeaderMap, String) {
    tokio::time::timeout(DEADLINE, async {
        tx.ready().await.unwrap();
        let mut b = Request::builder().uri(path).header("host", "reviews");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let resp = tx.send_request(b.body(Empty::new()).unwrap()).await.unwrap();
        let (p, body) = resp.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        (p.status, p.headers, String::from_utf8_lossy(&body).into_owned())
    })
    .await
    .expect("answer within the deadline")
}

/// Node n1 with a client pod and pods `names` (127.net.0.11, .12, ...) behind
/// Service `reviews` (10.96.net.1:9080, protocol `proto`), plus `extra` YAML.
fn cfg(net: u8, proto: &str, names: &[(&str, &str)], extra: &str) -> ferry_model::ConfigFile {
    let mut w = format!("node: n1\nworkloads:\n  - {{uid: c, name: client, node: n1, ip: 127.{net}.0.2, enrolled: true, labels: {{app: client}}}}\n");
    let mut eps = Vec::new();
    for (i, (name, version)) in names.iter().enumerate() {
        let ip = format!("127.{net}.0.{}", 11 + i);
        w += &format!("  - {{uid: {name}, name: {name}, node: n1, ip: {ip}, enrolled: true, labels: {{app: reviews, version: {version}}}}}\n");
        eps.push(format!("{{ip: {ip}}}"));
    }
    let proto = if proto.is_empty() {
        String::new()
    } else {
        format!(", protocol: {proto}")
    };
    w += &format!(
        "services:\n  - {{name: reviews, vip: 10.96.{net}.1, ports: [{{port: 9080, targetPort: 9080{proto}}}], endpoints: [{}]}}\n{extra}",
        eps.join(", ")
    );
    config(&w)
}

const SUBSETS: &str = "    subsets: {default/reviews: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}, {name: v3, labels: {version: v3}}]}\n";

fn scrape(ag: &TestAgent) -> Vec<prometheus_parse::Sample> {
    let text = ag.proxy.telemetry.metrics.encode();
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .unwrap()
        .samples
}

/// `istio_requests_total` summed over samples whose labels include `want`,
/// `reporter="source"` unless `want` names a reporter (a same-node request
/// is reported by both sides).
fn requests(ag: &TestAgent, want: &[(&str, &str)]) -> f64 {
    let reporter = want.iter().any(|(k, _)| *k == "reporter");
    scrape(ag)
        .into_iter()
        .filter(|s| s.metric == "istio_requests_total")
        .filter(|s| reporter || s.labels.get("reporter") == Some("source"))
        .filter(|s| want.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

#[tokio::test]
async fn header_route_and_weighted_split_with_request_metrics() {
    let ag = agent("n1", false, &[]);
    let routes = format!("routes:\n  - service: default/reviews\n    http:\n      - name: tester\n        matches: [{{headers: {{user: {{exact: tester}}}}}}]\n        backends: [{{service: default/reviews, subset: v2}}]\n      - name: split\n        backends: [{{service: default/reviews, subset: v1, weight: 90}}, {{service: default/reviews, subset: v3, weight: 10}}]\n{SUBSETS}");
    ag.reconciler
        .reconcile(cfg(40, "http", &[("r1", "v1"), ("r2", "v2"), ("r3", "v3")], &routes))
        .await;
    named("127.40.0.11:9080", "v1").await;
    named("127.40.0.12:9080", "v2").await;
    named("127.40.0.13:9080", "v3").await;
    let mut tx = h1(&ag, "127.40.0.2", "10.96.40.1:9080").await;

    // The header route, on the same keep-alive connection as the split.
    let (st, h, body) = get(&mut tx, "/reviews/1", &[("user", "tester")]).await;
    assert_eq!((st, body.as_str()), (StatusCode::OK, "v2"));
    assert_eq!(h["x-user-seen"], "tester", "headers forwarded");
    // Positive control: another user takes the split, never v2.
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for _ in 0..1000 {
        let (st, _, body) = get(&mut tx, "/reviews/1", &[("user", "someone")]).await;
        assert_eq!(st, StatusCode::OK);
        *counts.entry(body).or_default() += 1;
    }
    let v3 = counts.get("v3").copied().unwrap_or(0);
    // Binomial(1000, 0.1): mean 100, sigma 9.49; +-4.5 sigma is [58, 142].
    assert!((58..=142).contains(&v3), "v3 got {v3} of 1000: {counts:?}");
    assert_eq!(counts.get("v1").copied().unwrap_or(0) + v3, 1000, "{counts:?}");

    // Metrics: scraped and parsed.
    until("request metrics recorded", || {
        requests(&ag, &[("response_code", "200")]) == 1001.0
    })
    .await;
    let v2 = requests(
        &ag,
        &[
            ("destination_workload", "r2"),
            ("response_flags", "-"),
            ("request_protocol", "http"),
            ("reporter", "source"),
            ("source_workload", "client"),
            ("destination_service", "reviews.default.svc.cluster.local"),
        ],
    );
    assert_eq!(v2, 1.0);
    // The duration histogram, with Istio's buckets (first 0.5, last 3600000).
    let durations = scrape(&ag)
        .into_iter()
        .filter(|s| s.metric == "istio_request_duration_milliseconds")
        .find_map(|s| match s.value {
            prometheus_parse::Value::Histogram(h) => Some(h),
            _ => None,
        })
        .expect("a duration histogram");
    let bounds: Vec<f64> = durations
        .iter()
        .map(|b| b.less_than)
        .filter(|b| b.is_finite())
        .collect();
    assert_eq!((bounds.first(), bounds.last()), (Some(&0.5), Some(&3600000.0)));

    // A route with no match answers 404 NR (and the first route still works).
    let only = format!("routes:\n  - service: default/reviews\n    http:\n      - name: tester\n        matches: [{{headers: {{user: {{exact: tester}}}}}}]\n        backends: [{{service: default/reviews, subset: v2}}]\n{SUBSETS}");
    ag.reconciler
        .reconcile(cfg(40, "http", &[("r1", "v1"), ("r2", "v2"), ("r3", "v3")], &only))
        .await;
    let (st, _, _) = get(&mut tx, "/", &[]).await;
    assert_eq!(
        st,
        StatusCode::NOT_FOUND,
        "applied to the next request, same connection"
    );
    let (st, _, body) = get(&mut tx, "/", &[("user", "tester")]).await;
    assert_eq!((st, body.as_str()), (StatusCode::OK, "v2"));
    until("NR counted", || {
        requests(&ag, &[("response_code", "404"), ("response_flags", "NR")]) == 1.0
    })
    .await;
}

#[tokio::test]
async fn fault_delay_and_abort_for_one_user() {
    let ag = agent("n1", false, &[]);
    let routes = "routes:\n  - service: default/reviews\n    http:\n      - name: abort-jason\n        matches: [{headers: {end-user: {exact: jason}}}]\n        fault: {abort: {status: {http: 500}, percent: 100}}\n        backends: [{service: default/reviews}]\n      - name: delayed\n        matches: [{headers: {end-user: {exact: slow}}}]\n        fault: {delay: {delayMs: 300, percent: 100}}\n        backends: [{service: default/reviews}]\n      - name: rest\n        backends: [{service: default/reviews}]\n";
    ag.reconciler.reconcile(cfg(41, "http", &[("r1", "v1")], routes)).await;
    named("127.41.0.11:9080", "v1").await;
    let mut tx = h1(&ag, "127.41.0.2", "10.96.41.1:9080").await;

    let (st, _, body) = get(&mut tx, "/", &[("end-user", "jason")]).await;
    assert_eq!(
        (st, body.as_str()),
        (StatusCode::INTERNAL_SERVER_ERROR, "fault filter abort")
    );
    let t = Instant::now();
    let (st, _, body) = get(&mut tx, "/", &[("end-user", "slow")]).await;
    let took = t.elapsed();
    assert_eq!((st, body.as_str()), (StatusCode::OK, "v1"));
    assert!(took >= Duration::from_millis(300), "delayed {took:?}");
    // Positive control: anyone else, neither aborted nor delayed.
    let t = Instant::now();
    let (st, _, body) = get(&mut tx, "/", &[("end-user", "alice")]).await;
    assert_eq!((st, body.as_str()), (StatusCode::OK, "v1"));
    assert!(t.elapsed() < Duration::from_millis(300));
    until("flags counted", || {
        requests(&ag, &[("response_code", "500"), ("response_flags", "FI")]) == 1.0
            && requests(&ag, &[("response_code", "200"), ("response_flags", "DI")]) == 1.0
            && requests(&ag, &[("response_code", "200"), ("response_flags", "-")]) == 1.0
    })
    .await;
}

#[tokio::test]
async fn route_timeout_and_retries() {
    let ag = agent("n1", false, &[]);
    let routes = "routes:\n  - service: default/reviews\n    http:\n      - name: slow\n        matches: [{uri: {prefix: /slow}}]\n        timeoutMs: 500\n        backends: [{service: default/reviews}]\n      - name: retry3\n        matches: [{uri: {prefix: /flaky3}}]\n        retries: {attempts: 2, retryOn: [5xx]}\n        backends: [{service: default/reviews}]\n      - name: retry2\n        matches: [{uri: {prefix: /flaky2}}]\n        retries: {attempts: 1, retryOn: [5xx]}\n        backends: [{service: default/reviews}]\n      - name: rest\n        backends: [{service: default/reviews}]\n";
    ag.reconciler.reconcile(cfg(42, "http", &[("r1", "v1")], routes)).await;
    // Fails the first two tries of each path, then succeeds; /slow takes 2 s.
    let tries = Arc::new(std::sync::Mutex::new(std::collections::HashMap::<String, usize>::new()));
    let seen = tries.clone();
    backend("127.42.0.11:9080", move |r: Request<_>| {
        let seen = seen.clone();
        async move {
            let path = r.uri().path().to_owned();
            if path.starts_with("/slow") {
                tokio::time::sleep(Duration::from_secs(2)).await;
                return Response::new(text("late"));
            }
            let n = {
                let mut m = seen.lock().unwrap();
                let n = m.entry(path.clone()).or_default();
                *n += 1;
                *n
            };
            let mut resp = Response::new(text(format!("try {n}")));
            if path.starts_with("/flaky") && n <= 2 {
                *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            }
            resp
        }
    })
    .await;
    let mut tx = h1(&ag, "127.42.0.2", "10.96.42.1:9080").await;

    let t = Instant::now();
    let (st, _, _) = get(&mut tx, "/slow", &[]).await;
    assert_eq!(st, StatusCode::GATEWAY_TIMEOUT);
    assert!(t.elapsed() < Duration::from_millis(1500), "timed out at 0.5 s");
    // Positive control: a fast path on the same route table answers.
    let (st, _, body) = get(&mut tx, "/fast", &[]).await;
    assert_eq!((st, body.as_str()), (StatusCode::OK, "try 1"));

    // Two retries: the third try succeeds.
    let mut tx = h1(&ag, "127.42.0.2", "10.96.42.1:9080").await;
    let (st, _, body) = get(&mut tx, "/flaky3", &[]).await;
    assert_eq!((st, body.as_str()), (StatusCode::OK, "try 3"));
    // One retry: the second try fails too; the failure passes, with URX.
    let (st, _, body) = get(&mut tx, "/flaky2", &[]).await;
    assert_eq!((st, body.as_str()), (StatusCode::SERVICE_UNAVAILABLE, "try 2"));
    assert_eq!(tries.lock().unwrap()["/flaky2"], 2);
    until("flags counted", || {
        requests(&ag, &[("response_code", "504"), ("response_flags", "UT")]) == 1.0
            && requests(&ag, &[("response_code", "503"), ("response_flags", "URX")]) == 1.0
            && requests(&ag, &[("response_code", "200"), ("response_flags", "-")]) == 2.0
    })
    .await;
}

#[tokio::test]
async fn mirror_gets_a_copy_and_the_client_sees_the_primary() {
    let ag = agent("n1", false, &[]);
    let routes = format!("routes:\n  - service: default/reviews\n    http:\n      - name: mirrored\n        backends: [{{service: default/reviews, subset: v1}}]\n        mirrors: [{{backend: {{service: default/reviews, subset: v2}}, percent: 100}}]\n{SUBSETS}");
    ag.reconciler
        .reconcile(cfg(43, "http", &[("r1", "v1"), ("r2", "v2")], &routes))
        .await;
    named("127.43.0.11:9080", "v1").await;
    let copies = Arc::new(AtomicUsize::new(0));
    let hosts = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (c, h) = (copies.clone(), hosts.clone());
    backend("127.43.0.12:9080", move |r: Request<_>| {
        let (c, h) = (c.clone(), h.clone());
        async move {
            h.lock().unwrap().push(
                r.headers()
                    .get("host")
                    .map(|v| v.to_str().unwrap_or("").to_owned())
                    .unwrap_or_default(),
            );
            c.fetch_add(1, Ordering::SeqCst);
            Response::new(text("mirror"))
        }
    })
    .await;
    let mut tx = h1(&ag, "127.43.0.2", "10.96.43.1:9080").await;
    for _ in 0..3 {
        let (st, _, body) = get(&mut tx, "/", &[]).await;
        assert_eq!((st, body.as_str()), (StatusCode::OK, "v1"));
    }
    until("three copies at the mirror", || copies.load(Ordering::SeqCst) == 3).await;
    assert_eq!(hosts.lock().unwrap()[0], "reviews-shadow");
}

#[tokio::test]
async fn http2_streams_both_ways_with_trailers() {
    let ag = agent("n1", false, &[]);
    ag.reconciler.reconcile(cfg(44, "grpc", &[("r1", "v1")], "")).await;
    // Echoes each request frame as it arrives, then trailers.
    backend("127.44.0.11:9080", |r: Request<hyper::body::Incoming>| async move {
        let (mut tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
        tokio::spawn(async move {
            let mut body = r.into_body();
            let mut got_trailer = String::new();
            while let Some(Ok(f)) = body.frame().await {
                if let Some(d) = f.data_ref() {
                    let _ = tx.send(Ok(Frame::data(d.clone()))).await;
                } else if let Some(t) = f.trailers_ref() {
                    got_trailer = t
                        .get("x-req")
                        .map(|v| v.to_str().unwrap_or("").to_owned())
                        .unwrap_or_default();
                }
            }
            let mut t = HeaderMap::new();
            t.insert("grpc-status", "0".parse().unwrap());
            t.insert("x-echo-trailer", got_trailer.parse().unwrap());
            let _ = tx.send(Ok(Frame::trailers(t))).await;
        });
        let mut resp = Response::new(BodyExt::boxed(StreamBody::new(rx)));
        resp.headers_mut()
            .insert("content-type", "application/grpc".parse().unwrap());
        resp
    })
    .await;
    let s = app_stream(&ag, "127.44.0.2".parse().unwrap(), a("10.96.44.1:9080"))
        .await
        .unwrap();
    let (mut tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    let (mut body_tx, body_rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
    let req = Request::builder()
        .uri("http://reviews:9080/echo.Echo/Stream")
        .header("content-type", "application/grpc")
        .body(StreamBody::new(body_rx))
        .unwrap();
    tokio::time::timeout(DEADLINE, async move {
        let resp = tx.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let mut body = resp.into_body();
        // Streaming both ways: the first message comes back before the second is sent.
        body_tx.send(Ok(Frame::data(Bytes::from_static(b"one")))).await.unwrap();
        let f = body.frame().await.unwrap().unwrap();
        assert_eq!(f.data_ref().unwrap().as_ref(), b"one");
        body_tx.send(Ok(Frame::data(Bytes::from_static(b"two")))).await.unwrap();
        let mut t = HeaderMap::new();
        t.insert("x-req", "yes".parse().unwrap());
        body_tx.send(Ok(Frame::trailers(t))).await.unwrap();
        drop(body_tx);
        let mut rest = Vec::new();
        let mut trailers = None;
        while let Some(f) = body.frame().await {
            let f = f.unwrap();
            if let Some(d) = f.data_ref() {
                rest.extend_from_slice(d);
            } else {
                trailers = f.into_trailers().ok();
            }
        }
        assert_eq!(rest, b"two");
        let trailers = trailers.expect("trailers");
        assert_eq!(trailers["grpc-status"], "0");
        assert_eq!(trailers["x-echo-trailer"], "yes", "request trailers forwarded");
    })
    .await
    .expect("within the deadline");
    until("the gRPC request counted", || {
        requests(&ag, &[("request_protocol", "grpc"), ("grpc_response_status", "0")]) == 1.0
    })
    .await;
}

#[tokio::test]
async fn websocket_style_upgrade_is_passed_through() {
    let ag = agent("n1", false, &[]);
    ag.reconciler.reconcile(cfg(45, "http", &[("r1", "v1")], "")).await;
    backend("127.45.0.11:9080", |mut r: Request<hyper::body::Incoming>| async move {
        if !r.headers().contains_key("upgrade") {
            return Response::new(text("plain"));
        }
        let on = hyper::upgrade::on(&mut r);
        tokio::spawn(async move {
            if let Ok(u) = on.await {
                let mut io = TokioIo::new(u);
                let mut buf = [0u8; 64];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "echo")
            .body(text(""))
            .unwrap()
    })
    .await;
    // Positive control: a plain request on the same route.
    let mut tx = h1(&ag, "127.45.0.2", "10.96.45.1:9080").await;
    let (st, _, body) = get(&mut tx, "/", &[]).await;
    assert_eq!((st, body.as_str()), (StatusCode::OK, "plain"));
    let mut tx = h1(&ag, "127.45.0.2", "10.96.45.1:9080").await;
    tokio::time::timeout(DEADLINE, async move {
        let req = Request::builder()
            .uri("/ws")
            .header("host", "reviews")
            .header("connection", "upgrade")
            .header("upgrade", "echo")
            .body(Empty::new())
            .unwrap();
        let resp = tx.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
        let mut io = TokioIo::new(hyper::upgrade::on(resp).await.unwrap());
        io.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        io.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
    })
    .await
    .expect("within the deadline");
}

#[tokio::test]
async fn detection_on_auto_ports_never_stalls_server_first_protocols() {
    let ag = agent("n1", false, &[]);
    let routes = format!("routes:\n  - service: default/reviews\n    http:\n      - name: tester\n        matches: [{{headers: {{user: {{exact: tester}}}}}}]\n        backends: [{{service: default/reviews, subset: v2}}]\n      - name: rest\n        backends: [{{service: default/reviews, subset: v1}}]\n{SUBSETS}");
    let mut c = cfg(46, "", &[("r1", "v1"), ("r2", "v2")], &routes);
    // A server-speaks-first service (an SMTP-like banner) on an `auto` port.
    let extra: ferry_model::ConfigFile = config(
        "node: n1\nservices:\n  - {name: mail, vip: 10.96.46.2, ports: [{port: 25, targetPort: 2525}], endpoints: [{ip: 127.46.0.11}]}\n",
    );
    c.services.extend(extra.services);
    ag.reconciler.reconcile(c).await;
    named("127.46.0.11:9080", "v1").await;
    named("127.46.0.12:9080", "v2").await;
    let l = TcpListener::bind("127.46.0.11:2525").await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(b"220 mail ready\r\n").await;
                let mut buf = [0u8; 64];
                if let Ok(n) = s.read(&mut buf).await {
                    let _ = s.write_all(&buf[..n]).await;
                }
            });
        }
    });
    let mut s = app_stream(&ag, "127.46.0.2".parse().unwrap(), a("10.96.46.2:25"))
        .await
        .unwrap();
    let t = Instant::now();
    let mut banner = [0u8; 16];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut banner))
        .await
        .expect("banner within the deadline")
        .unwrap();
    assert_eq!(&banner, b"220 mail ready\r\n");
    assert!(t.elapsed() < Duration::from_secs(1), "waited {:?}", t.elapsed());
    s.write_all(b"HELO x").await.unwrap();
    let mut echo = [0u8; 6];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut echo))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echo, b"HELO x");
    assert_eq!(ag.proxy.telemetry.metrics.http.detections(Detection::Timeout), 1);

    // HTTP/1 on an `auto` port: detected and routed per request.
    let mut tx = h1(&ag, "127.46.0.2", "10.96.46.1:9080").await;
    let (_, _, body) = get(&mut tx, "/", &[("user", "tester")]).await;
    assert_eq!(body, "v2");
    let (_, _, body) = get(&mut tx, "/", &[]).await;
    assert_eq!(body, "v1");
    assert_eq!(ag.proxy.telemetry.metrics.http.detections(Detection::Http1), 1);
    let scraped = scrape(&ag);
    assert!(scraped
        .iter()
        .any(|s| s.metric == "ferry_protocol_detection_total" && s.labels.get("outcome") == Some("timeout")));
}

#[tokio::test]
async fn http_rides_the_mtls_tunnel_to_another_node() {
    let ca = TestCa::new();
    let yaml = |node: &str| {
        config(&format!(
            "node: {node}\nworkloads:\n  - {{uid: client, name: client, serviceAccount: client, node: n1, ip: 127.47.1.2, enrolled: true}}\n  - {{uid: server, name: server, serviceAccount: server, node: n2, ip: 127.47.2.2, enrolled: true, labels: {{version: v1}}}}\nservices:\n  - {{name: reviews, vip: 10.96.47.1, ports: [{{port: 9080, targetPort: 9080, protocol: http}}], endpoints: [{{ip: 127.47.2.2}}]}}\n"
        ))
    };
    let (n1, n2) = (agent("n1", true, &[]), agent("n2", true, &[]));
    let id = |sa: &str| format!("spiffe://cluster.local/ns/default/sa/{sa}");
    for (ag, uid) in [(&n1, "client"), (&n2, "server")] {
        ca.issue_to(ag, uid, &id(uid));
    }
    n1.reconciler.reconcile(yaml("n1")).await;
    n2.reconciler.reconcile(yaml("n2")).await;
    named("127.47.2.2:9080", "remote").await;
    let mut tx = h1(&n1, "127.47.1.2", "10.96.47.1:9080").await;
    for _ in 0..3 {
        let (st, _, body) = get(&mut tx, "/", &[]).await;
        assert_eq!((st, body.as_str()), (StatusCode::OK, "remote"));
    }
    until("requests counted under mTLS", || {
        requests(
            &n1,
            &[
                ("connection_security_policy", "mutual_tls"),
                ("destination_principal", "spiffe://cluster.local/ns/default/sa/server"),
                ("response_code", "200"),
            ],
        ) == 3.0
    })
    .await;
    // Pooled: three requests, one tunnel handshake.
    assert_eq!(
        n1.hbone.as_ref().unwrap().stats.handshakes_ok.load(Ordering::Relaxed),
        1
    );
    assert_eq!(n2.proxy.telemetry.counters.snapshot().tunnel_opened, 1);
}

/// An upstream that closes a keep-alive connection when a second request
/// arrives on it, without answering (the race of a peer closing an idle
/// pooled connection just as a request goes out): a bodiless GET is sent
/// again on a new connection, and the client sees 200 each time. The
/// backend counts connections, so the resend is seen, not assumed.
#[tokio::test]
async fn a_get_on_a_pooled_connection_closed_under_it_is_sent_again() {
    let ag = agent("n1", false, &[]);
    ag.reconciler.reconcile(cfg(49, "http", &[("r1", "v1")], "")).await;
    let l = TcpListener::bind("127.49.0.11:9080").await.unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let seen = conns.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else { return };
            seen.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                // Answer the first request; drop the connection at the second.
                loop {
                    let Ok(n) = s.read(&mut buf).await else { return };
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&buf[..n]);
                    if got.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-served-by: v1\r\n\r\nok")
                    .await;
                let _ = s.read(&mut buf).await;
            });
        }
    });
    let mut tx = h1(&ag, "127.49.0.2", "10.96.49.1:9080").await;
    for i in 0..3 {
        let (st, _, body) = get(&mut tx, "/", &[]).await;
        assert_eq!((st, body.as_str()), (StatusCode::OK, "ok"), "request {i}");
    }
    // Requests 2 and 3 each found the pooled connection dead (the server
    // took the request, then closed): each was sent once more, fresh.
    assert_eq!(conns.load(Ordering::SeqCst), 3, "one connection per request");
}
