//! Circuit breaking in one process, over loopback, with no privileges: a
//! DestinationRule `connectionPool` (as the control plane streams it,
//! `trafficPolicies`) applied by the agent to real hyper clients in a "pod"
//! and real backends that count what they see (connections open at once,
//! requests per connection, requests in flight). Each limit beside a
//! Service without it (the positive control), outcomes counted, every wait
//! with a deadline. Loopback addresses 127.120.0.0/16 – 127.128.0.0/16.

mod common;

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddrV4,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use common::*;
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};
use hyper::{HeaderMap, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
};

fn a(s: &str) -> SocketAddrV4 {
    s.parse().unwrap()
}

/// Node n1 with a client pod (127.net.0.2) and, for each `(name, protocol)`,
/// a Service `name` (VIP 10.96.net.(i+1), port 9080) whose one endpoint is
/// pod `name-0` (127.net.0.(11+i)) or, when the protocol ends in `@direct`,
/// the address 127.net.0.(51+i), which is no workload (a direct hop);
/// then `extra` YAML (trafficPolicies, routes).
fn cfg(net: u8, services: &[(&str, &str)], extra: &str) -> ferry_model::ConfigFile {
    let mut w = format!("node: n1\nworkloads:\n  - {{uid: c, name: client, node: n1, ip: 127.{net}.0.2, enrolled: true, labels: {{app: client}}}}\n");
    let mut s = String::from("services:\n");
    for (i, (name, proto)) in services.iter().enumerate() {
        let (proto, direct) = match proto.strip_suffix("@direct") {
            Some(p) => (p, true),
            None => (*proto, false),
        };
        let ip = if direct {
            format!("127.{net}.0.{}", 51 + i)
        } else {
            let ip = format!("127.{net}.0.{}", 11 + i);
            w += &format!(
                "  - {{uid: {name}-0, name: {name}-0, node: n1, ip: {ip}, enrolled: true, labels: {{app: {name}}}}}\n"
            );
            ip
        };
        s += &format!(
            "  - {{name: {name}, vip: 10.96.{net}.{}, ports: [{{port: 9080, targetPort: 9080, protocol: {proto}}}], endpoints: [{{ip: {ip}}}]}}\n",
            i + 1
        );
    }
    config(&format!("{w}{s}{extra}"))
}

/// `trafficPolicies` YAML: each Service (`default/<name>`) with its
/// connectionPool (a YAML flow map).
fn pools(p: &[(&str, &str)]) -> String {
    let mut y = String::from("trafficPolicies:\n");
    for (svc, pool) in p {
        y += &format!("  - {{service: default/{svc}, policy: {{connectionPool: {pool}}}}}\n");
    }
    y
}

/// What a backend saw.
#[derive(Default)]
struct Seen {
    open: AtomicUsize,
    max_open: AtomicUsize,
    closed: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    requests: AtomicUsize,
    /// Requests per connection, in the order connections were accepted.
    per_conn: Mutex<Vec<usize>>,
}

impl Seen {
    fn max(m: &AtomicUsize, v: usize) {
        m.fetch_max(v, Ordering::SeqCst);
    }

    fn connections(&self) -> Vec<usize> {
        self.per_conn.lock().unwrap().clone()
    }
}

type Resp = Response<BoxBody<Bytes, Infallible>>;

/// A counting backend (HTTP/1.1 and HTTP/2): each request waits its
/// `x-delay-ms`, answers its `x-status` (else 200) with body "ok".
async fn backend(addr: &str) -> Arc<Seen> {
    let seen = Arc::new(Seen::default());
    let l = TcpListener::bind(addr).await.unwrap();
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = l.accept().await else { return };
            let s = s.clone();
            let id = {
                let mut p = s.per_conn.lock().unwrap();
                p.push(0);
                p.len() - 1
            };
            Seen::max(&s.max_open, s.open.fetch_add(1, Ordering::SeqCst) + 1);
            tokio::spawn(async move {
                let s2 = s.clone();
                let svc = hyper::service::service_fn(move |r: Request<hyper::body::Incoming>| {
                    let s = s2.clone();
                    async move {
                        s.requests.fetch_add(1, Ordering::SeqCst);
                        s.per_conn.lock().unwrap()[id] += 1;
                        Seen::max(&s.max_in_flight, s.in_flight.fetch_add(1, Ordering::SeqCst) + 1);
                        let num = |k: &str| {
                            r.headers()
                                .get(k)
                                .and_then(|v| v.to_str().ok())
                                .and_then(|v| v.parse::<u64>().ok())
                        };
                        if let Some(ms) = num("x-delay-ms") {
                            tokio::time::sleep(Duration::from_millis(ms)).await;
                        }
                        let mut resp: Resp = Response::new(Full::new(Bytes::from_static(b"ok")).boxed());
                        if let Some(st) = num("x-status").and_then(|v| StatusCode::from_u16(v as u16).ok()) {
                            *resp.status_mut() = st;
                        }
                        s.in_flight.fetch_sub(1, Ordering::SeqCst);
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(sock), svc)
                    .await;
                s.open.fetch_sub(1, Ordering::SeqCst);
                s.closed.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    seen
}

/// What the client got for one request.
#[derive(Debug)]
struct Got {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
    took: Duration,
}

/// One request from `pod` to `orig` on a connection of its own (HTTP/1.1).
async fn get(ag: &impl HasOrig, pod: &str, orig: &str, headers: &[(&str, &str)]) -> Got {
    let t = Instant::now();
    let s = app_stream(ag, pod.parse().unwrap(), a(orig)).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await.unwrap();
    tokio::spawn(conn);
    let mut b = Request::builder().uri("/").header("host", "svc");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send(&mut tx, b.body(Empty::<Bytes>::new()).unwrap(), t).await
}

async fn send(
    tx: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    req: Request<Empty<Bytes>>,
    t: Instant,
) -> Got {
    tokio::time::timeout(DEADLINE, async {
        tx.ready().await.unwrap();
        let resp = tx.send_request(req).await.unwrap();
        let (p, body) = resp.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        Got {
            status: p.status,
            headers: p.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
            took: t.elapsed(),
        }
    })
    .await
    .expect("an answer within the deadline")
}

/// `n` requests at once (each on its own client connection, started
/// `stagger` apart, in order), with `headers`.
async fn concurrently(
    ag: &TestAgent,
    pod: &'static str,
    orig: &'static str,
    n: usize,
    stagger: Duration,
    headers: &'static [(&'static str, &'static str)],
) -> Vec<Got> {
    let mut tasks = Vec::new();
    for i in 0..n {
        let side = TestAgent::view(ag.orig.clone(), ag.proxy.clone());
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(stagger * i as u32).await;
            get(&side, pod, orig, headers).await
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

fn by_status(got: &[Got]) -> BTreeMap<u16, usize> {
    let mut m = BTreeMap::new();
    for g in got {
        *m.entry(g.status.as_u16()).or_default() += 1;
    }
    m
}

fn scrape(ag: &TestAgent) -> Vec<prometheus_parse::Sample> {
    let text = ag.proxy.telemetry.metrics.encode();
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .unwrap()
        .samples
}

/// The summed value of `metric`'s samples whose labels include `want`.
fn metric(ag: &TestAgent, metric: &str, want: &[(&str, &str)]) -> f64 {
    scrape(ag)
        .into_iter()
        .filter(|s| s.metric == metric && want.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

fn overflows(ag: &TestAgent, service: &str, reason: &str) -> f64 {
    metric(
        ag,
        "ferry_upstream_overflow_total",
        &[
            ("destination_service", &format!("{service}.default.svc.cluster.local")),
            ("reason", reason),
        ],
    )
}

const DELAY: &[(&str, &str)] = &[("x-delay-ms", "400")];

/// Istio's circuit-breaking task in miniature: maxConnections 1 and
/// http1MaxPendingRequests 1 let one request in flight and one waiting;
/// a third at that moment gets 503 `UO` at once (with Envoy's
/// `x-envoy-overloaded`), and the backend never sees two connections.
/// Without the pending limit, requests queue on the one connection; with
/// no policy, they get a connection each.
#[tokio::test]
async fn max_connections_and_pending_requests() {
    let ag = agent("n1", false, &[]);
    let p = pools(&[
        ("limited", "{maxConnections: 1, http1MaxPendingRequests: 1}"),
        ("queued", "{maxConnections: 1}"),
    ]);
    ag.reconciler
        .reconcile(cfg(
            120,
            &[("limited", "http"), ("queued", "http"), ("free", "http")],
            &p,
        ))
        .await;
    let limited = backend("127.120.0.11:9080").await;
    let queued = backend("127.120.0.12:9080").await;
    let free = backend("127.120.0.13:9080").await;

    let got = concurrently(
        &ag,
        "127.120.0.2",
        "10.96.120.1:9080",
        3,
        Duration::from_millis(50),
        DELAY,
    )
    .await;
    assert_eq!(by_status(&got), BTreeMap::from([(200, 2), (503, 1)]), "{got:?}");
    let uo = &got[2];
    assert_eq!(uo.status, StatusCode::SERVICE_UNAVAILABLE, "the third, over the limits");
    assert_eq!(uo.headers["x-envoy-overloaded"], "true");
    assert!(uo.body.contains("overflow"), "{}", uo.body);
    assert!(uo.took < Duration::from_millis(300), "refused at once: {:?}", uo.took);
    assert!(
        got[1].took >= Duration::from_millis(700),
        "the second waited for the first: {:?}",
        got[1].took
    );
    assert_eq!(limited.max_open.load(Ordering::SeqCst), 1, "one connection at a time");
    assert_eq!(limited.max_in_flight.load(Ordering::SeqCst), 1);
    assert_eq!(overflows(&ag, "limited", "pending"), 1.0);
    until("UO in the request metrics", || {
        metric(
            &ag,
            "istio_requests_total",
            &[
                ("response_code", "503"),
                ("response_flags", "UO"),
                ("destination_service_name", "limited"),
            ],
        ) == 1.0
    })
    .await;

    // No pending limit: all wait their turn on the one connection.
    let got = concurrently(
        &ag,
        "127.120.0.2",
        "10.96.120.2:9080",
        4,
        Duration::from_millis(10),
        &[("x-delay-ms", "100")],
    )
    .await;
    assert_eq!(by_status(&got), BTreeMap::from([(200, 4)]), "{got:?}");
    assert_eq!(queued.max_open.load(Ordering::SeqCst), 1);
    assert_eq!(queued.max_in_flight.load(Ordering::SeqCst), 1);

    // Positive control: no policy, a connection each, all in flight together.
    let got = concurrently(
        &ag,
        "127.120.0.2",
        "10.96.120.3:9080",
        3,
        Duration::from_millis(50),
        DELAY,
    )
    .await;
    assert_eq!(by_status(&got), BTreeMap::from([(200, 3)]), "{got:?}");
    assert_eq!(free.max_open.load(Ordering::SeqCst), 3);
    assert_eq!(free.max_in_flight.load(Ordering::SeqCst), 3);
    assert_eq!(overflows(&ag, "free", "pending"), 0.0);
}

/// http2MaxRequests: requests in flight to the Service, whatever the
/// protocol: past it, 503 UO at once.
#[tokio::test]
async fn max_requests_in_flight() {
    let ag = agent("n1", false, &[]);
    let p = pools(&[("limited", "{http2MaxRequests: 2}")]);
    ag.reconciler
        .reconcile(cfg(121, &[("limited", "http"), ("free", "http")], &p))
        .await;
    let limited = backend("127.121.0.11:9080").await;
    let free = backend("127.121.0.12:9080").await;

    let got = concurrently(
        &ag,
        "127.121.0.2",
        "10.96.121.1:9080",
        4,
        Duration::from_millis(50),
        DELAY,
    )
    .await;
    assert_eq!(by_status(&got), BTreeMap::from([(200, 2), (503, 2)]), "{got:?}");
    for g in &got[2..] {
        assert_eq!(g.headers["x-envoy-overloaded"], "true");
    }
    assert_eq!(limited.max_in_flight.load(Ordering::SeqCst), 2);
    assert_eq!(overflows(&ag, "limited", "requests"), 2.0);
    // Their slots came back with the responses: the next one passes.
    assert_eq!(
        get(&ag, "127.121.0.2", "10.96.121.1:9080", &[]).await.status,
        StatusCode::OK
    );

    let got = concurrently(
        &ag,
        "127.121.0.2",
        "10.96.121.2:9080",
        4,
        Duration::from_millis(50),
        DELAY,
    )
    .await;
    assert_eq!(by_status(&got), BTreeMap::from([(200, 4)]), "{got:?}");
    assert_eq!(free.max_in_flight.load(Ordering::SeqCst), 4);
}

/// maxRequestsPerConnection: a connection is retired after that many
/// requests (the backend sees each connection carry at most that many).
#[tokio::test]
async fn max_requests_per_connection() {
    let ag = agent("n1", false, &[]);
    let p = pools(&[
        ("one", "{maxRequestsPerConnection: 1}"),
        ("two", "{maxRequestsPerConnection: 2}"),
    ]);
    ag.reconciler
        .reconcile(cfg(122, &[("one", "http"), ("two", "http"), ("free", "http")], &p))
        .await;
    let seen = [
        backend("127.122.0.11:9080").await,
        backend("127.122.0.12:9080").await,
        backend("127.122.0.13:9080").await,
    ];
    for (i, vip) in ["10.96.122.1:9080", "10.96.122.2:9080", "10.96.122.3:9080"]
        .iter()
        .enumerate()
    {
        // One client keep-alive connection, 6 requests one after another.
        let s = app_stream(&ag, "127.122.0.2".parse().unwrap(), a(vip)).await.unwrap();
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await.unwrap();
        tokio::spawn(conn);
        for _ in 0..6 {
            let req = Request::builder()
                .uri("/")
                .header("host", "svc")
                .body(Empty::new())
                .unwrap();
            assert_eq!(send(&mut tx, req, Instant::now()).await.status, StatusCode::OK);
        }
        assert_eq!(seen[i].requests.load(Ordering::SeqCst), 6);
    }
    let one = seen[0].connections();
    assert_eq!(one, [1; 6], "one request per connection");
    let two = seen[1].connections();
    assert!(two.iter().all(|n| *n <= 2) && two.contains(&2), "{two:?}");
    let free = seen[2].connections();
    assert!(
        free.iter().any(|n| *n > 2),
        "positive control: connections reused: {free:?}"
    );
    // Retired connections are closed once their response ended.
    until("retired connections closed", || {
        seen[0].closed.load(Ordering::SeqCst) == 6
    })
    .await;
}

/// maxRetries: retries in flight to the Service at once. Eight requests
/// answered 503 at about the same moment, each allowed 3 retries: with a
/// budget of 1, one retries and the others return their 503 at once (flag
/// UO, counted); without, every retry happens (8 x 4 attempts, URX).
#[tokio::test]
async fn retry_budget() {
    let ag = agent("n1", false, &[]);
    let mut extra = pools(&[("limited", "{maxRetries: 1}")]);
    extra += "routes:\n";
    for svc in ["limited", "free"] {
        extra += &format!("  - service: default/{svc}\n    http:\n      - name: {svc}-retries\n        retries: {{attempts: 3, retryOn: [5xx]}}\n        backends: [{{service: default/{svc}}}]\n");
    }
    ag.reconciler
        .reconcile(cfg(123, &[("limited", "http"), ("free", "http")], &extra))
        .await;
    let limited = backend("127.123.0.11:9080").await;
    let free = backend("127.123.0.12:9080").await;
    const FAIL: &[(&str, &str)] = &[("x-status", "503"), ("x-delay-ms", "150")];

    let got = concurrently(&ag, "127.123.0.2", "10.96.123.1:9080", 8, Duration::ZERO, FAIL).await;
    assert_eq!(by_status(&got), BTreeMap::from([(503, 8)]), "{got:?}");
    let attempts = limited.requests.load(Ordering::SeqCst);
    let stopped = overflows(&ag, "limited", "retries");
    eprintln!("budget 1: {attempts} attempts for 8 requests, {stopped} retries stopped");
    assert!((8..=16).contains(&attempts), "retries capped: {attempts} attempts");
    assert!(stopped >= 4.0, "{stopped} retries stopped by the budget");
    assert!(
        got.iter().all(|g| !g.headers.contains_key("x-envoy-overloaded")),
        "the upstream's 503s pass"
    );
    until("UO flags on the stopped requests", || {
        metric(
            &ag,
            "istio_requests_total",
            &[("response_flags", "UO"), ("destination_service_name", "limited")],
        ) == stopped
    })
    .await;

    let got = concurrently(&ag, "127.123.0.2", "10.96.123.2:9080", 8, Duration::ZERO, FAIL).await;
    assert_eq!(by_status(&got), BTreeMap::from([(503, 8)]), "{got:?}");
    assert_eq!(
        free.requests.load(Ordering::SeqCst),
        32,
        "positive control: every retry made"
    );
    until("URX on all", || {
        metric(
            &ag,
            "istio_requests_total",
            &[("response_flags", "URX"), ("destination_service_name", "free")],
        ) == 8.0
    })
    .await;
    assert_eq!(overflows(&ag, "free", "retries"), 0.0);
}

/// idleTimeout: an idle upstream connection is closed after it (within the
/// reaper's second), and the next request opens another; the default (90 s)
/// keeps one open and reuses it.
#[tokio::test]
async fn idle_timeout() {
    let ag = agent("n1", false, &[]);
    let p = pools(&[("short", "{idleTimeoutMs: 300}")]);
    ag.reconciler
        .reconcile(cfg(124, &[("short", "http"), ("free", "http")], &p))
        .await;
    let short = backend("127.124.0.11:9080").await;
    let free = backend("127.124.0.12:9080").await;
    assert_eq!(
        get(&ag, "127.124.0.2", "10.96.124.1:9080", &[]).await.status,
        StatusCode::OK
    );
    assert_eq!(
        get(&ag, "127.124.0.2", "10.96.124.2:9080", &[]).await.status,
        StatusCode::OK
    );
    let t = Instant::now();
    until("the idle connection closed", || {
        short.closed.load(Ordering::SeqCst) == 1
    })
    .await;
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(free.closed.load(Ordering::SeqCst), 0, "positive control: still open");
    assert_eq!(
        get(&ag, "127.124.0.2", "10.96.124.1:9080", &[]).await.status,
        StatusCode::OK
    );
    assert_eq!(
        get(&ag, "127.124.0.2", "10.96.124.2:9080", &[]).await.status,
        StatusCode::OK
    );
    assert_eq!(
        short.connections().len(),
        2,
        "a new connection after the idle one closed"
    );
    assert_eq!(free.connections(), [2], "reused");
}

/// A listener whose accept queue is full (never accepted): further SYNs
/// are dropped, so a connect to it hangs.
async fn blackhole(addr: &str) -> (socket2::Socket, Vec<TcpStream>) {
    let l = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    l.bind(&a(addr).into()).unwrap();
    l.listen(0).unwrap();
    let mut fill = Vec::new();
    for _ in 0..2 {
        if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await {
            fill.push(s);
        }
    }
    (l, fill)
}

/// connectTimeout replaces the default (5 s) for the Service, on the HTTP
/// path (503 UF) and on opaque TCP (the client's connection closed).
#[tokio::test]
async fn connect_timeout() {
    let ag = agent("n1", false, &[]);
    let p = pools(&[
        ("quick", "{connectTimeoutMs: 300}"),
        ("quick-tcp", "{connectTimeoutMs: 300}"),
    ]);
    ag.reconciler
        .reconcile(cfg(
            125,
            &[
                ("quick", "http@direct"),
                ("slow", "http@direct"),
                ("quick-tcp", "tcp@direct"),
            ],
            &p,
        ))
        .await;
    let _q = blackhole("127.125.0.51:9080").await;
    let _s = blackhole("127.125.0.52:9080").await;
    let _t = blackhole("127.125.0.53:9080").await;

    let g = get(&ag, "127.125.0.2", "10.96.125.1:9080", &[]).await;
    assert_eq!(g.status, StatusCode::SERVICE_UNAVAILABLE, "{g:?}");
    assert!(
        g.took < Duration::from_millis(1500),
        "gave up after 0.3 s: {:?}",
        g.took
    );
    until("UF counted", || {
        metric(
            &ag,
            "istio_requests_total",
            &[("response_flags", "UF"), ("destination_service_name", "quick")],
        ) == 1.0
    })
    .await;

    // Positive control: without it, the request is still waiting at 1.5 s.
    let side = TestAgent::view(ag.orig.clone(), ag.proxy.clone());
    let slow = tokio::spawn(async move { get(&side, "127.125.0.2", "10.96.125.2:9080", &[]).await });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!slow.is_finished(), "the default connect timeout is longer");
    slow.abort();

    // Opaque TCP: the connection is closed once the timeout fires.
    let t = Instant::now();
    let mut c = app_stream(&ag, "127.125.0.2".parse().unwrap(), a("10.96.125.3:9080"))
        .await
        .unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(DEADLINE, c.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "closed with nothing relayed");
    assert!(t.elapsed() < Duration::from_millis(1500), "{:?}", t.elapsed());
}

/// The agent's sockets whose peer is `peer` (this process's file descriptors).
fn sockets_to(peer: SocketAddrV4) -> Vec<socket2::Socket> {
    use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd};
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let Ok(fd) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // SAFETY: the fd is open (listed) and only borrowed for the checks.
        let b = unsafe { BorrowedFd::borrow_raw(fd) };
        let r = socket2::SockRef::from(&b);
        if r.peer_addr().ok().and_then(|p| p.as_socket_ipv4()) == Some(peer) {
            // A duplicate of our own, to query after the loop.
            let dup = unsafe { libc::dup(b.as_raw_fd()) };
            if dup >= 0 {
                out.push(unsafe { socket2::Socket::from_raw_fd(dup) });
            }
        }
    }
    out
}

/// tcpKeepalive on the sockets the agent opens to the Service: a direct
/// endpoint, and a same-node pod (the delivered connection); none without it.
#[tokio::test]
async fn tcp_keepalive() {
    let ag = agent("n1", false, &[]);
    let ka = "{tcpKeepalive: {probes: 4, timeMs: 7000, intervalMs: 3000}}";
    let p = pools(&[("direct", ka), ("local", ka)]);
    ag.reconciler
        .reconcile(cfg(
            126,
            &[("direct", "http@direct"), ("local", "http"), ("free", "http@direct")],
            &p,
        ))
        .await;
    let _d = backend("127.126.0.51:9080").await;
    let _l = backend("127.126.0.12:9080").await;
    let _f = backend("127.126.0.53:9080").await;
    for vip in ["10.96.126.1:9080", "10.96.126.2:9080", "10.96.126.3:9080"] {
        assert_eq!(get(&ag, "127.126.0.2", vip, &[]).await.status, StatusCode::OK);
    }
    for peer in ["127.126.0.51:9080", "127.126.0.12:9080"] {
        let socks = sockets_to(a(peer));
        assert_eq!(socks.len(), 1, "the agent's one connection to {peer}");
        let s = &socks[0];
        assert!(s.keepalive().unwrap(), "{peer}: SO_KEEPALIVE");
        assert_eq!(s.tcp_keepalive_time().unwrap(), Duration::from_secs(7), "{peer}");
        assert_eq!(s.tcp_keepalive_interval().unwrap(), Duration::from_secs(3), "{peer}");
        assert_eq!(s.tcp_keepalive_retries().unwrap(), 4, "{peer}");
    }
    let socks = sockets_to(a("127.126.0.53:9080"));
    assert_eq!(socks.len(), 1);
    assert!(
        !socks[0].keepalive().unwrap(),
        "positive control: not set without a policy"
    );
}

/// maxConcurrentStreams: streams per upstream HTTP/2 connection; beyond
/// it another connection is opened (without it, one connection carries all).
#[tokio::test]
async fn max_concurrent_streams() {
    let ag = agent("n1", false, &[]);
    let p = pools(&[("limited", "{maxConcurrentStreams: 1}")]);
    ag.reconciler
        .reconcile(cfg(127, &[("limited", "http2"), ("free", "http2")], &p))
        .await;
    let limited = backend("127.127.0.11:9080").await;
    let free = backend("127.127.0.12:9080").await;
    for vip in ["10.96.127.1:9080", "10.96.127.2:9080"] {
        let s = app_stream(&ag, "127.127.0.2".parse().unwrap(), a(vip)).await.unwrap();
        let (tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
            .await
            .unwrap();
        tokio::spawn(conn);
        // One request first, so the upstream connection exists (concurrent
        // first requests each open their own, with or without a limit).
        let warm = Request::builder()
            .uri(format!("http://{vip}/"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let r = tokio::time::timeout(DEADLINE, tx.clone().send_request(warm))
            .await
            .unwrap()
            .unwrap();
        r.into_body().collect().await.unwrap();
        let mut streams = Vec::new();
        for _ in 0..3 {
            let mut tx = tx.clone();
            let req = Request::builder()
                .uri(format!("http://{vip}/"))
                .header("x-delay-ms", "300")
                .body(Empty::<Bytes>::new())
                .unwrap();
            streams.push(tokio::spawn(async move {
                let r = tokio::time::timeout(DEADLINE, tx.send_request(req))
                    .await
                    .unwrap()
                    .unwrap();
                let st = r.status();
                r.into_body().collect().await.unwrap();
                st
            }));
        }
        for s in streams {
            assert_eq!(s.await.unwrap(), StatusCode::OK);
        }
    }
    assert_eq!(limited.max_in_flight.load(Ordering::SeqCst), 3);
    assert_eq!(limited.connections(), [2, 1, 1], "a connection per stream in flight");
    assert_eq!(free.max_in_flight.load(Ordering::SeqCst), 3);
    assert_eq!(free.connections(), [4], "positive control: one connection, multiplexed");
}

/// A line echo server that keeps each connection until the client closes.
async fn line_echo(addr: &str) {
    let l = TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let (r, mut w) = s.into_split();
                let mut lines = BufReader::new(r).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if w.write_all(format!("{line}\n").as_bytes()).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
}

/// One line through `s`: its echo, or None if the connection closed.
async fn echo(s: &mut TcpStream, line: &str) -> Option<String> {
    tokio::time::timeout(DEADLINE, async {
        s.write_all(format!("{line}\n").as_bytes()).await.ok()?;
        let mut buf = vec![0u8; 64];
        let n = s.read(&mut buf).await.ok()?;
        (n > 0).then(|| String::from_utf8_lossy(&buf[..n]).trim().to_owned())
    })
    .await
    .expect("an answer or a close within the deadline")
}

/// Opaque TCP: past maxConnections a new connection is closed at once,
/// counted (`reason="connections"`, TCP metrics with flag UO); once the
/// first closes, a new one is served. Without a policy, both are served.
#[tokio::test]
async fn tcp_max_connections() {
    let ag = agent("n1", false, &[]);
    let p = pools(&[("limited", "{maxConnections: 1}")]);
    ag.reconciler
        .reconcile(cfg(128, &[("limited", "tcp"), ("free", "tcp")], &p))
        .await;
    line_echo("127.128.0.11:9080").await;
    line_echo("127.128.0.12:9080").await;
    let pod = "127.128.0.2".parse().unwrap();

    let mut first = app_stream(&ag, pod, a("10.96.128.1:9080")).await.unwrap();
    assert_eq!(echo(&mut first, "one").await.as_deref(), Some("one"));
    let mut second = app_stream(&ag, pod, a("10.96.128.1:9080")).await.unwrap();
    assert_eq!(echo(&mut second, "two").await, None, "over maxConnections: closed");
    assert_eq!(overflows(&ag, "limited", "connections"), 1.0);
    until("UO in the TCP metrics", || {
        metric(
            &ag,
            "istio_tcp_connections_opened_total",
            &[("response_flags", "UO"), ("destination_service_name", "limited")],
        ) == 1.0
    })
    .await;
    assert_eq!(
        echo(&mut first, "still").await.as_deref(),
        Some("still"),
        "the first is untouched"
    );
    drop(first);
    until("the first connection's slot given back", || {
        ag.proxy.http.pool.breakers.live() == 0
    })
    .await;
    let mut third = app_stream(&ag, pod, a("10.96.128.1:9080")).await.unwrap();
    assert_eq!(echo(&mut third, "three").await.as_deref(), Some("three"));

    let mut f1 = app_stream(&ag, pod, a("10.96.128.2:9080")).await.unwrap();
    let mut f2 = app_stream(&ag, pod, a("10.96.128.2:9080")).await.unwrap();
    assert_eq!(echo(&mut f1, "a").await.as_deref(), Some("a"));
    assert_eq!(echo(&mut f2, "b").await.as_deref(), Some("b"), "positive control");
    assert_eq!(overflows(&ag, "free", "connections"), 0.0);
}
