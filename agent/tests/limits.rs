//! Limits, in process: a desired state that does not fit the node's maps is
//! refused whole, the previous state staying (through the reconciler, and
//! NACKed through the config stream); connection limits per pod and per
//! agent; and a measurement of RSS after bursts of connections (ignored by
//! default). Loopback addresses 127.60.0.0/16 – 127.61.0.0/16.

mod common;

use std::net::SocketAddrV4;

use common::*;
use ferry_agent::{
    node::Capacity,
    reconcile::{Apply, Overflow, Refused},
};

fn a(s: &str) -> SocketAddrV4 {
    s.parse().unwrap()
}

/// Pods `client` and `server` on n1 (and `extra` pods more), `services`
/// services to the server.
fn cfg(extra: usize, services: usize) -> ferry_model::ConfigFile {
    let mut y = String::from(
        "node: n1\nworkloads:\n  - {uid: client, name: client, node: n1, ip: 127.60.0.2, enrolled: true}\n  - {uid: server, name: server, node: n1, ip: 127.60.0.3, enrolled: true}\n",
    );
    for i in 0..extra {
        y += &format!(
            "  - {{uid: x{i}, name: x{i}, node: n1, ip: 127.60.1.{}, enrolled: true}}\n",
            i + 1
        );
    }
    y += "services:\n";
    for i in 0..services {
        y += &format!(
            "  - {{name: s{i}, vip: 10.96.0.{}, ports: [{{port: 80, targetPort: 8080}}], endpoints: [{{ip: 127.60.0.3}}]}}\n",
            i + 1
        );
    }
    config(&y)
}

#[tokio::test]
async fn an_update_that_does_not_fit_is_refused_whole() {
    let cap = Capacity {
        pods: 2,
        mesh_destinations: 4,
    };
    let ag = agent_with_capacity("n1", false, &[], cap);
    let _app = echo_app(a("127.60.0.3:8080")).await;

    // Positive control: 2 pods and 2 pods + 2 VIPs = 4 destinations fit exactly.
    assert_eq!(ag.reconciler.try_apply(cfg(0, 2)).await, Ok(1));
    let before = ag.node.lock().unwrap().destinations.clone();
    assert_eq!(before.len(), 4);
    assert_eq!(ag.node.lock().unwrap().steered, ["client", "server"]);
    let got = app_connect(&ag, "127.60.0.2".parse().unwrap(), a("10.96.0.2:80"), "hi")
        .await
        .unwrap();
    assert_eq!(got, "127.60.0.2 hi");

    // One VIP too many: refused whole, with the reason.
    let err = ag.reconciler.try_apply(cfg(0, 3)).await.unwrap_err();
    assert_eq!(
        err,
        Refused::Capacity(vec![Overflow::MeshDestinations { wanted: 5, capacity: 4 }])
    );
    assert!(err.to_string().contains("ferry_mesh_dst holds 4"), "{err}");
    // A pod too many as well: both reasons; nothing enrolled.
    let err = ag.reconciler.try_apply(cfg(1, 3)).await.unwrap_err().to_string();
    assert!(
        err.contains("3 enrolled pods") && err.contains("6 mesh destinations"),
        "{err}"
    );

    // The previous state is intact: version, destinations, enrollments, routes.
    assert_eq!(ag.reconciler.applied_version(), 1);
    assert_eq!(ag.proxy.state().version, 1);
    assert_eq!(ag.node.lock().unwrap().destinations, before);
    assert_eq!(ag.node.lock().unwrap().steered, ["client", "server"]);
    assert!(ag.node.lock().unwrap().unsteered.is_empty());
    assert!(ag.reconciler.pod_status().iter().all(|s| s.uid != "x0"));
    assert!(ag.proxy.state().services.len() == 2);
    let got = app_connect(&ag, "127.60.0.2".parse().unwrap(), a("10.96.0.1:80"), "still")
        .await
        .unwrap();
    assert_eq!(got, "127.60.0.2 still");
    // `apply` (standalone: the config file) logs and keeps the previous version.
    assert_eq!(ag.reconciler.apply(cfg(0, 3)).await, 1);

    // A smaller update that fits is applied (version 2: refusals used none).
    assert_eq!(ag.reconciler.try_apply(cfg(0, 1)).await, Ok(2));
    assert_eq!(ag.node.lock().unwrap().destinations.len(), 3);
}

fn refused(ag: &TestAgent, reason: &'static str) -> u64 {
    ag.proxy
        .telemetry
        .connections_refused
        .get_or_create(&ferry_agent::telemetry::LimitLabels { reason })
        .get()
}

/// Holds a connection from `pod` to the echo app at 127.61.0.9:8080 (outside
/// the mesh: a direct hop) open until the proxy has counted it.
async fn hold(ag: &TestAgent, pod: &str, open: usize) -> tokio::net::TcpStream {
    let s = app_stream(ag, pod.parse().unwrap(), a("127.61.0.9:8080"))
        .await
        .unwrap();
    until("the connection to be accepted", || ag.proxy.connections() == open).await;
    s
}

/// Whether a new connection from `pod` is served (or closed unanswered).
async fn served(ag: &TestAgent, pod: &str, msg: &str) -> bool {
    app_connect(ag, pod.parse().unwrap(), a("127.61.0.9:8080"), msg)
        .await
        .is_ok_and(|r| r.ends_with(msg))
}

#[tokio::test]
async fn connections_over_the_limits_are_closed_and_counted() {
    let ag = agent("n1", false, &[]);
    let _app = echo_app(a("127.61.0.9:8080")).await;
    let cfg = config(
        "node: n1\nsettings: {maxConnectionsPerPod: 2, maxConnectionsPerAgent: 3}\nworkloads:\n  - {uid: a, name: a, node: n1, ip: 127.61.0.2, enrolled: true}\n  - {uid: b, name: b, node: n1, ip: 127.61.0.3, enrolled: true}\n",
    );
    assert_eq!(ag.reconciler.try_apply(cfg).await, Ok(1));

    // Pod a: two concurrent connections are accepted, the third closed.
    let a1 = hold(&ag, "127.61.0.2", 1).await;
    let a2 = hold(&ag, "127.61.0.2", 2).await;
    assert!(!served(&ag, "127.61.0.2", "third").await);
    assert_eq!(refused(&ag, "pod_limit"), 1);
    assert_eq!(ag.proxy.connections(), 2);

    // Pod b: its own limit is not reached, the agent's (3) is at its second.
    let b1 = hold(&ag, "127.61.0.3", 3).await;
    assert!(!served(&ag, "127.61.0.3", "b-second").await);
    assert_eq!(refused(&ag, "agent_limit"), 1);
    assert_eq!(refused(&ag, "pod_limit"), 1);

    // Positive control: once a's first connection ends, a new one is served
    // (and the held ones still work).
    assert_eq!(exchange(a1, "first").await.unwrap(), "127.61.0.2 first");
    until("a's first connection to end", || ag.proxy.connections() == 2).await;
    assert!(served(&ag, "127.61.0.2", "again").await);
    assert_eq!(exchange(a2, "second").await.unwrap(), "127.61.0.2 second");
    assert_eq!(exchange(b1, "b").await.unwrap(), "127.61.0.3 b");
    until("every connection to end", || ag.proxy.connections() == 0).await;
    assert_eq!((refused(&ag, "pod_limit"), refused(&ag, "agent_limit")), (1, 1));
}

/// The fake control plane's side of one subscription.
struct Sub {
    requests: tonic::Streaming<ferry_api::discovery::DiscoveryRequest>,
    responses: futures::channel::mpsc::UnboundedSender<Result<ferry_api::discovery::DiscoveryResponse, tonic::Status>>,
}

struct FakeControl(futures::channel::mpsc::UnboundedSender<Sub>);

type Responses = std::pin::Pin<
    Box<dyn futures::Stream<Item = Result<ferry_api::discovery::DiscoveryResponse, tonic::Status>> + Send>,
>;

#[tonic::async_trait]
impl ferry_api::discovery::discovery_server::Discovery for FakeControl {
    type StreamStream = Responses;

    async fn stream(
        &self,
        req: tonic::Request<tonic::Streaming<ferry_api::discovery::DiscoveryRequest>>,
    ) -> Result<tonic::Response<Responses>, tonic::Status> {
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let _ = self.0.unbounded_send(Sub {
            requests: req.into_inner(),
            responses: tx,
        });
        Ok(tonic::Response::new(Box::pin(rx)))
    }
}

/// An enrolled workload on another node: a mesh destination, nothing to plumb here.
fn remote(uid: &str, ip: &str) -> ferry_api::discovery::Resource {
    let w: ferry_model::Workload = serde_norway::from_str(&format!(
        "{{uid: {uid}, name: {uid}, node: n2, ip: {ip}, enrolled: true}}"
    ))
    .unwrap();
    ferry_model::proto::resource(ferry_model::proto::workload_to(&w))
}

async fn next<T>(rx: &mut (impl futures::Stream<Item = T> + Unpin), what: &str) -> T {
    use futures::StreamExt;
    tokio::time::timeout(DEADLINE, rx.next())
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .unwrap_or_else(|| panic!("{what}: stream ended"))
}

/// The config stream over real gRPC and TLS into the real reconciler on a
/// node whose `ferry_mesh_dst` holds 2: an update that fits is ACKed, one
/// that does not is NACKed with the reason and changes nothing.
#[tokio::test]
async fn the_config_stream_nacks_a_state_that_does_not_fit() {
    use ferry_api::discovery::DiscoveryResponse;
    let dir = TempDir::new("limits-stream");
    let ca = TestCa::new();
    let (cert, key) = ca.server("ferry-control");
    std::fs::write(dir.0.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.0.join("token"), "t\n").unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = futures::stream::unfold(listener, |l| async move { Some((l.accept().await.map(|(s, _)| s), l)) });
    let (subs_tx, mut subs) = futures::channel::mpsc::unbounded();
    tokio::spawn(
        tonic::transport::Server::builder()
            .tls_config(
                tonic::transport::ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(cert, key)),
            )
            .unwrap()
            .add_service(ferry_api::discovery::discovery_server::DiscoveryServer::new(
                FakeControl(subs_tx),
            ))
            .serve_with_incoming(incoming),
    );

    let cap = Capacity {
        pods: 4,
        mesh_destinations: 2,
    };
    let TestAgent { reconciler, node, .. } = agent_with_capacity("n1", false, &[], cap);
    let reconciler = std::sync::Arc::new(reconciler);
    let status = std::sync::Arc::new(std::sync::RwLock::new(None));
    let sinks = ferry_agent::config_stream::Sinks {
        apply: reconciler.clone(),
        status: status.clone(),
        connected: Default::default(),
        rejected: Default::default(),
    };
    let opts = ferry_agent::config_stream::Options {
        control: format!("https://{addr}"),
        control_ca: dir.0.join("ca.pem"),
        token_file: dir.0.join("token"),
        state_file: None,
    };
    let (_settings_tx, settings) = tokio::sync::watch::channel(Default::default());
    let client = tokio::spawn(ferry_agent::config_stream::run(
        sinks.clone(),
        opts,
        "n1".into(),
        settings,
    ));
    let mut sub = next(&mut subs, "a subscription").await;
    next(&mut sub.requests, "the first request").await.unwrap();
    let send = |nonce: &str, resources| DiscoveryResponse {
        nonce: nonce.into(),
        system_version: 1,
        resources,
        removed: vec![],
    };

    // Positive control: two destinations fit; ACKed and applied.
    let two = vec![remote("a", "10.1.2.2"), remote("b", "10.1.2.3")];
    sub.responses.unbounded_send(Ok(send("1", two))).unwrap();
    let ack = next(&mut sub.requests, "the ACK").await.unwrap();
    assert_eq!((ack.response_nonce.as_str(), ack.error_detail.as_str()), ("1", ""));
    assert_eq!(reconciler.applied_version(), 1);
    let before = node.lock().unwrap().destinations.clone();
    assert_eq!(before.len(), 2);

    // A third: NACKed with the reason, nothing applied.
    sub.responses
        .unbounded_send(Ok(send("2", vec![remote("c", "10.1.2.4")])))
        .unwrap();
    let nack = next(&mut sub.requests, "the NACK").await.unwrap();
    assert_eq!(nack.response_nonce, "2");
    assert!(
        nack.error_detail.contains("3 mesh destinations") && nack.error_detail.contains("ferry_mesh_dst holds 2"),
        "{}",
        nack.error_detail
    );
    assert_eq!(sinks.rejected.get(), 1);
    assert_eq!(reconciler.applied_version(), 1);
    assert_eq!(node.lock().unwrap().destinations, before);
    let st = status.read().unwrap().clone().unwrap();
    assert!(st.last_nack.unwrap().contains("nothing applied"));

    // The previous config is still what the stream holds: replacing one
    // destination (a removed, c added) fits and is ACKed.
    sub.responses
        .unbounded_send(Ok(DiscoveryResponse {
            removed: vec!["workload/a".into()],
            ..send("3", vec![remote("c", "10.1.2.4")])
        }))
        .unwrap();
    let ack = next(&mut sub.requests, "the third answer").await.unwrap();
    assert_eq!((ack.response_nonce.as_str(), ack.error_detail.as_str()), ("3", ""));
    assert_eq!(reconciler.applied_version(), 2);
    assert_eq!(node.lock().unwrap().destinations.len(), 2);
    client.abort();
}

/// The test process's allocator: the system's, or mimalloc with
/// `FERRY_TEST_ALLOC=mimalloc`, chosen once, at the first allocation (read
/// with getenv, which does not allocate), so every block is freed by the
/// allocator that made it. For `rss_returns_after_bursts_of_connections`.
struct Switch;

static CHOICE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

fn mimalloc_chosen() -> bool {
    use std::sync::atomic::Ordering;
    match CHOICE.load(Ordering::Relaxed) {
        0 => {
            // SAFETY: a NUL-terminated name; the value is only read here.
            let v = unsafe { libc::getenv(c"FERRY_TEST_ALLOC".as_ptr()) };
            // SAFETY: getenv returned a NUL-terminated string or null.
            let mi = !v.is_null() && unsafe { std::ffi::CStr::from_ptr(v) }.to_bytes() == b"mimalloc";
            CHOICE.store(if mi { 2 } else { 1 }, Ordering::Relaxed);
            mi
        }
        c => c == 2,
    }
}

// SAFETY: every call goes to the one allocator chosen for the whole process.
unsafe impl std::alloc::GlobalAlloc for Switch {
    unsafe fn alloc(&self, l: std::alloc::Layout) -> *mut u8 {
        if mimalloc_chosen() {
            mimalloc::MiMalloc.alloc(l)
        } else {
            std::alloc::System.alloc(l)
        }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: std::alloc::Layout) {
        if mimalloc_chosen() {
            mimalloc::MiMalloc.dealloc(p, l)
        } else {
            std::alloc::System.dealloc(p, l)
        }
    }
    unsafe fn alloc_zeroed(&self, l: std::alloc::Layout) -> *mut u8 {
        if mimalloc_chosen() {
            mimalloc::MiMalloc.alloc_zeroed(l)
        } else {
            std::alloc::System.alloc_zeroed(l)
        }
    }
    unsafe fn realloc(&self, p: *mut u8, l: std::alloc::Layout, n: usize) -> *mut u8 {
        if mimalloc_chosen() {
            mimalloc::MiMalloc.realloc(p, l, n)
        } else {
            std::alloc::System.realloc(p, l, n)
        }
    }
}

#[global_allocator]
static ALLOC: Switch = Switch;

fn rss_mib() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: f64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb / 1024.0
}

/// Memory after bursts of concurrent connections (a measurement: run with
/// `--ignored --nocapture`, with and without `FERRY_TEST_ALLOC=mimalloc`).
/// Each burst: `FERRY_TEST_CONNS` (800) concurrent same-node connections
/// from four client pods → VIP → server pod (outbound, local hop, inbound delivery),
/// each exchanging 64 KiB each way, all closed before the next burst.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a measurement; prints RSS figures"]
async fn rss_returns_after_bursts_of_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let n: usize = std::env::var("FERRY_TEST_CONNS").map_or(800, |v| v.parse().unwrap());
    let ag = agent("n1", false, &[]);
    let cfg = config(
        "node: n1\nworkloads:\n  - {uid: c0, name: c0, node: n1, ip: 127.61.1.10, enrolled: true}\n  - {uid: c1, name: c1, node: n1, ip: 127.61.1.11, enrolled: true}\n  - {uid: c2, name: c2, node: n1, ip: 127.61.1.12, enrolled: true}\n  - {uid: c3, name: c3, node: n1, ip: 127.61.1.13, enrolled: true}\n  - {uid: s, name: s, node: n1, ip: 127.61.1.3, enrolled: true}\nservices:\n  - {name: big, vip: 10.96.1.1, ports: [{port: 80, targetPort: 8080}], endpoints: [{ip: 127.61.1.3}]}\n",
    );
    assert_eq!(ag.reconciler.try_apply(cfg).await, Ok(1));
    // The app: reads 64 KiB, writes 64 KiB back, closes.
    let l = tokio::net::TcpListener::bind("127.61.1.3:8080").await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                if s.read_exact(&mut buf).await.is_ok() {
                    let _ = s.write_all(&buf).await;
                }
            });
        }
    });
    let base = rss_mib();
    let mut after = Vec::new();
    for _ in 0..3 {
        let mut streams = Vec::new();
        for i in 0..n {
            // Four client pods, spreading the connections over client
            // addresses (not what this measures).
            let pod = std::net::Ipv4Addr::new(127, 61, 1, 10 + (i % 4) as u8);
            streams.push(app_stream(&ag, pod, a("10.96.1.1:80")).await.unwrap());
        }
        until("every connection to be accepted", || ag.proxy.connections() >= n).await;
        let peak_open = ag.proxy.connections();
        let tasks: Vec<_> = streams
            .into_iter()
            .map(|mut s| {
                tokio::spawn(async move {
                    let buf = vec![7u8; 65536];
                    let mut back = Vec::new();
                    let ok = s.write_all(&buf).await.is_ok() && s.read_to_end(&mut back).await.is_ok();
                    ok && back.len() == 65536
                })
            })
            .collect();
        let mut served = 0;
        for t in tasks {
            served += usize::from(t.await.unwrap());
        }
        if served != n {
            println!("{} of {n} not served", n - served);
        }
        until("every connection to end", || ag.proxy.connections() == 0).await;
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        if !mimalloc_chosen() && std::env::var_os("FERRY_TEST_TRIM").is_some() {
            // SAFETY: glibc's malloc_trim only returns free memory to the system.
            unsafe { libc::malloc_trim(0) };
        }
        after.push(rss_mib());
        assert!(peak_open >= n);
    }
    let alloc = if mimalloc_chosen() { "mimalloc" } else { "system" };
    println!("RSS ({alloc}, {n} connections a burst): baseline {base:.1} MiB, after each burst {after:.1?} MiB");
}
