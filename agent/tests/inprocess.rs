//! The agent's data path and reconciler in one process, over loopback, with
//! no privileges: enrollment (and its failure), outbound through a VIP to a
//! local pod, the HBONE tunnel between two agents with real mutual TLS, and
//! the refusals (no original destination, wrong identity, STRICT, a target
//! that is not the pod), each beside a positive control.

mod common;

use std::{net::SocketAddrV4, sync::atomic::Ordering};

use common::*;
use ferry_model::admin::Direction;
use tokio::io::AsyncWriteExt;

fn a(s: &str) -> SocketAddrV4 {
    s.parse().unwrap()
}

#[tokio::test]
async fn reconciler_enrolls_serves_and_unenrolls() {
    let ag = agent("n1", false, &["broken"]);
    let cfg = |with_server: bool| {
        let server = if with_server {
            "  - {uid: server, name: server, node: n1, ip: 127.20.0.3, enrolled: true}\n"
        } else {
            ""
        };
        config(&format!(
            "node: n1\nworkloads:\n  - {{uid: client, name: client, node: n1, ip: 127.20.0.2, enrolled: true}}\n{server}  - {{uid: broken, name: broken, node: n1, ip: 127.20.0.9, enrolled: true}}\n  - {{uid: other, name: other, node: n2, ip: 127.20.1.2, enrolled: true}}\nservices:\n  - {{name: echo, vip: 10.96.0.10, ports: [{{port: 80, targetPort: 8080}}], endpoints: [{{ip: 127.20.0.3}}]}}\n"
        ))
    };
    let _app = echo_app(a("127.20.0.3:8080")).await;
    assert_eq!(ag.reconciler.reconcile(cfg(true)).await, 1);
    assert_eq!(ag.reconciler.applied_version(), 1);

    // Local pods steered (not the other node's), the broken one reported.
    let status = ag.reconciler.pod_status();
    let st = |uid: &str| status.iter().find(|s| s.uid == uid).cloned().unwrap();
    assert!(st("client").enrolled && st("server").enrolled);
    assert!(!st("broken").enrolled);
    assert!(st("broken").error.unwrap().contains("has no netns"));
    assert!(status.iter().all(|s| s.uid != "other"));
    assert_eq!(ag.node.lock().unwrap().steered, ["client", "server"]);
    let dsts = ag.node.lock().unwrap().destinations.clone();
    assert!(dsts.contains_key(&("10.96.0.10".parse().unwrap(), 80)));

    // VIP -> the local endpoint, delivered from the client's own address.
    let got = app_connect(&ag, "127.20.0.2".parse().unwrap(), a("10.96.0.10:80"), "hi")
        .await
        .unwrap();
    assert_eq!(got, "127.20.0.2 hi");
    let c = ag.proxy.telemetry.counters.snapshot();
    assert_eq!((c.outbound_opened, c.hop_local, c.failed), (1, 1, 0));

    // Server removed: unsteered, its listeners gone; the client still served.
    assert_eq!(ag.reconciler.reconcile(cfg(false)).await, 2);
    assert_eq!(ag.node.lock().unwrap().unsteered, ["server"]);
    until("the server's listeners to close", || {
        std::net::TcpStream::connect("127.20.0.3:15001").is_err()
    })
    .await;
    let got = app_connect(&ag, "127.20.0.2".parse().unwrap(), a("127.20.0.3:8080"), "direct")
        .await
        .unwrap();
    assert_eq!(got, "127.20.0.2 direct", "not enrolled any more: reached directly");
}

#[tokio::test]
async fn no_original_destination_is_closed_and_counted() {
    let ag = agent("n1", false, &[]);
    ag.reconciler
        .reconcile(config(
            "node: n1\nworkloads: [{uid: c, name: c, node: n1, ip: 127.21.0.2, enrolled: true}]\n",
        ))
        .await;
    let _app = echo_app(a("127.21.0.5:8080")).await;
    // Positive control: with a recorded destination, the app answers.
    let ok = app_connect(&ag, "127.21.0.2".parse().unwrap(), a("127.21.0.5:8080"), "x").await;
    assert_eq!(ok.unwrap(), "127.21.0.2 x");
    // Without one, the connection is closed with nothing relayed.
    let s = tokio::net::TcpStream::connect("127.21.0.2:15001").await.unwrap();
    let got = exchange(s, "y").await.unwrap_or_default();
    assert_eq!(got, "");
    until("no_orig_dst counted", || {
        ag.proxy.telemetry.counters.no_orig_dst.load(Ordering::Relaxed) == 1
    })
    .await;
}

/// Two agents (nodes n1 and n2) with HBONE between them.
async fn two_nodes(
    net: u8,
    server_sa_in_config: &str,
    server_sa_in_cert: &str,
    strict: bool,
) -> (TestAgent, TestAgent) {
    let ca = TestCa::new();
    let pa = if strict {
        "peerAuthentications: [{metadata: {name: s, namespace: default}, spec: {mtls: {mode: STRICT}}}]\n"
    } else {
        ""
    };
    let yaml = |node: &str| {
        config(&format!(
            "node: {node}\nworkloads:\n  - {{uid: client, name: client, serviceAccount: client, node: n1, ip: 127.{net}.1.2, enrolled: true}}\n  - {{uid: server, name: server, serviceAccount: {server_sa_in_config}, node: n2, ip: 127.{net}.2.2, enrolled: true}}\n{pa}"
        ))
    };
    let (n1, n2) = (agent("n1", true, &[]), agent("n2", true, &[]));
    let id = |sa: &str| format!("spiffe://cluster.local/ns/default/sa/{sa}");
    let (c, k) = ca.workload(&id("client"));
    n1.ids
        .as_ref()
        .unwrap()
        .install("client", &c.spiffe_id.parse().unwrap(), &c, &k)
        .unwrap();
    // n2 holds the certificate the test gives it (an imposter, in one test).
    let (c, k) = ca.workload(&id(server_sa_in_cert));
    n2.ids
        .as_ref()
        .unwrap()
        .install("server", &c.spiffe_id.parse().unwrap(), &c, &k)
        .unwrap();
    n1.reconciler.reconcile(yaml("n1")).await;
    n2.reconciler.reconcile(yaml("n2")).await;
    (n1, n2)
}

#[tokio::test]
async fn hbone_carries_a_connection_with_proven_identities() {
    let (n1, n2) = two_nodes(22, "server", "server", true).await;
    let _app = echo_app(a("127.22.2.2:8080")).await;
    // A long exchange keeps the connection open while the destination's
    // live view is read.
    let mut conn = app_stream(&n1, "127.22.1.2".parse().unwrap(), a("127.22.2.2:8080"))
        .await
        .unwrap();
    conn.write_all(b"over the tunnel").await.unwrap();
    until("the tunnelled connection at the destination", || {
        n2.proxy.telemetry.live().iter().any(|c| {
            c.direction == Direction::Tunnel
                && c.peer_identity.get().map(|i| i.to_string()).as_deref()
                    == Some("spiffe://cluster.local/ns/default/sa/client")
        })
    })
    .await;
    let got = exchange(conn, "").await.unwrap();
    assert_eq!(
        got, "127.22.1.2 over the tunnel",
        "STRICT passes a proven identity; client IP kept"
    );
    let hb = n1.hbone.as_ref().unwrap();
    assert_eq!(hb.stats.handshakes_ok.load(Ordering::Relaxed), 1);
    let c1 = n1.proxy.telemetry.counters.snapshot();
    assert_eq!((c1.hop_tunnel, c1.failed), (1, 0));
    until("the destination to close", || {
        n2.proxy.telemetry.counters.snapshot().closed == 1
    })
    .await;
    assert_eq!(n2.proxy.telemetry.counters.snapshot().failed, 0);
}

#[tokio::test]
async fn a_destination_proving_another_identity_is_refused() {
    // n1 expects the server to run as `server`; its certificate says `imposter`.
    let (n1, n2) = two_nodes(23, "server", "imposter", false).await;
    let _app = echo_app(a("127.23.2.2:8080")).await;
    let got = app_connect(&n1, "127.23.1.2".parse().unwrap(), a("127.23.2.2:8080"), "secret").await;
    assert_eq!(got.unwrap_or_default(), "", "nothing relayed to the wrong identity");
    until("the refusal to be counted", || {
        n1.proxy.telemetry.counters.snapshot().failed == 1
    })
    .await;
    let hb = n1.hbone.as_ref().unwrap();
    assert_eq!(hb.stats.handshakes_ok.load(Ordering::Relaxed), 0);
    assert_eq!(n2.proxy.telemetry.counters.snapshot().tunnel_opened, 0);

    // Positive control: the same pair with the right identity works.
    let (n1, _n2) = two_nodes(24, "server", "server", false).await;
    let _app = echo_app(a("127.24.2.2:8080")).await;
    let got = app_connect(&n1, "127.24.1.2".parse().unwrap(), a("127.24.2.2:8080"), "ok").await;
    assert_eq!(got.unwrap(), "127.24.1.2 ok");
}

/// The plain tunnel (no CA) proves no identity: the gate refuses it for a
/// STRICT workload, as it refuses plaintext inbound; a PERMISSIVE one takes it.
#[tokio::test]
async fn the_gate_refuses_strict_and_misdirected_on_the_plain_tunnel() {
    let ag = agent("n2", false, &[]);
    ag.reconciler
        .reconcile(config(
            "node: n2\nworkloads:\n  - {uid: open, name: open, node: n2, ip: 127.25.0.2, enrolled: true}\n  - {uid: locked, name: locked, namespace: vault, node: n2, ip: 127.25.0.3, enrolled: true}\npeerAuthentications: [{metadata: {name: s, namespace: vault}, spec: {mtls: {mode: STRICT}}}]\n",
        ))
        .await;
    let _a1 = echo_app(a("127.25.0.2:8080")).await;
    let _a2 = echo_app(a("127.25.0.3:8080")).await;
    let tunnel = |to: &'static str, target: &'static str| async move {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind("127.25.9.9:0".parse().unwrap()).unwrap();
        let mut s = s.connect(to.parse().unwrap()).await.unwrap();
        s.write_all(&ferry_agent::tunnel::encode(a(target))).await.unwrap();
        exchange(s, "via tunnel").await.unwrap_or_default()
    };
    // Positive control: PERMISSIVE takes a plain tunnel stream.
    assert_eq!(
        tunnel("127.25.0.2:15008", "127.25.0.2:8080").await,
        "127.25.9.9 via tunnel"
    );
    // STRICT refuses it.
    assert_eq!(tunnel("127.25.0.3:15008", "127.25.0.3:8080").await, "");
    // A target that is not the pod is refused.
    assert_eq!(tunnel("127.25.0.2:15008", "127.25.0.3:8080").await, "");
    let c = ag.proxy.telemetry.counters.snapshot();
    assert_eq!((c.tunnel_opened, c.refused, c.refused_plaintext), (3, 2, 1));
}

#[test]
fn the_agent_refuses_a_misbehaving_cas_certificates() {
    use ferry_agent::identity::IdentityError;
    let ag = agent("n1", true, &[]);
    let ids = ag.ids.as_ref().unwrap();
    let (ca, other_ca) = (TestCa::new(), TestCa::new());
    let me: ferry_model::SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
    // Positive control: the right certificate, with this workload's key, installs.
    let (good, key) = ca.workload(&me.to_string());
    let installed = ids.install("w", &me, &good, &key).unwrap();
    assert_eq!(installed.spiffe_id, me);
    // Another workload's identity.
    let (wrong_id, k) = ca.workload("spiffe://cluster.local/ns/shop/sa/admin");
    let e = ids.install("w", &me, &wrong_id, &k).unwrap_err();
    assert!(matches!(e, IdentityError::WrongIdentity { .. }), "{e}");
    // The right identity claimed in the answer, another in the certificate.
    let mut lying = wrong_id.clone();
    lying.spiffe_id = me.to_string();
    let e = ids.install("w", &me, &lying, &k).unwrap_err();
    assert!(matches!(e, IdentityError::WrongIdentity { .. }), "{e}");
    // A certificate for a key that is not the one made here.
    let (for_other_key, _) = ca.workload(&me.to_string());
    let e = ids.install("w", &me, &for_other_key, &key).unwrap_err();
    assert!(matches!(e, IdentityError::WrongKey), "{e}");
    // A chain that does not lead to the trust bundle it came with.
    let (mut foreign, k) = other_ca.workload(&me.to_string());
    foreign.trust_bundle_pem = ca.pem().to_owned();
    let e = ids.install("w", &me, &foreign, &k).unwrap_err();
    assert!(matches!(e, IdentityError::BadChain(_)), "{e}");
    // Every refusal left the good certificate in place.
    assert_eq!(ids.get("w").unwrap().serial, installed.serial);
}

/// n1 (client 127.N.1.2) and n2 (server 127.N.2.2) with HBONE, and a third
/// workload at 127.N.3.2 on a node without an agent.
async fn mesh_of_three(net: u8) -> (TestAgent, TestAgent) {
    let ca = TestCa::new();
    let yaml = |node: &str| {
        config(&format!(
            "node: {node}\nworkloads:\n  - {{uid: client, name: client, serviceAccount: client, node: n1, ip: 127.{net}.1.2, enrolled: true}}\n  - {{uid: server, name: server, serviceAccount: server, node: n2, ip: 127.{net}.2.2, enrolled: true}}\n  - {{uid: hole, name: hole, serviceAccount: hole, node: n3, ip: 127.{net}.3.2, enrolled: true}}\n"
        ))
    };
    let (n1, n2) = (agent("n1", true, &[]), agent("n2", true, &[]));
    for (a, uid) in [(&n1, "client"), (&n2, "server")] {
        ca.issue_to(a, uid, &format!("spiffe://cluster.local/ns/default/sa/{uid}"));
    }
    n1.reconciler.reconcile(yaml("n1")).await;
    n2.reconciler.reconcile(yaml("n2")).await;
    (n1, n2)
}

#[tokio::test]
async fn a_blackholed_destination_stalls_no_other() {
    let (n1, _n2) = mesh_of_three(26).await;
    let _app = echo_app(a("127.26.2.2:8080")).await;
    // The hole takes TCP connections on its tunnel port and never answers.
    let hole = tokio::net::TcpListener::bind("127.26.3.2:15008").await.unwrap();
    let (held_tx, mut held) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((s, _)) = hole.accept().await {
            let _ = held_tx.send(s);
        }
    });
    let client: std::net::Ipv4Addr = "127.26.1.2".parse().unwrap();
    let started = tokio::time::Instant::now();
    let to_hole = {
        let (orig, proxy) = (n1.orig.clone(), n1.proxy.clone());
        let probe = TestAgent::view(orig, proxy);
        tokio::spawn(async move { app_connect(&probe, client, a("127.26.3.2:8080"), "lost").await })
    };
    let _stuck = tokio::time::timeout(DEADLINE, held.recv()).await.unwrap().unwrap();
    // Another destination is reached at once, while the hole's dial hangs.
    let t = tokio::time::Instant::now();
    let got = app_connect(&n1, client, a("127.26.2.2:8080"), "fine").await.unwrap();
    assert_eq!(got, "127.26.1.2 fine");
    assert!(
        t.elapsed() < std::time::Duration::from_secs(3),
        "took {:?}",
        t.elapsed()
    );
    assert!(!to_hole.is_finished(), "the hole's connection is still waiting");
    // The hole's connection fails on the handshake deadline, with a reason.
    let lost = tokio::time::timeout(std::time::Duration::from_secs(20), to_hole)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(lost.unwrap_or_default(), "", "nothing relayed");
    assert!(started.elapsed() >= ferry_agent::tunnel::hbone::HANDSHAKE_TIMEOUT);
    until("the failure to be counted", || {
        n1.proxy.telemetry.counters.snapshot().failed == 1
    })
    .await;
}

#[tokio::test]
async fn streams_beyond_one_connections_limit_open_more_connections() {
    // 250 connections at once, each ~4 descriptors: lift the soft limit.
    // SAFETY: getrlimit/setrlimit on a live, properly sized struct.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur = r.rlim_max.min(8192).max(r.rlim_cur);
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
    }
    const N: usize = 250;
    let (n1, _n2) = mesh_of_three(27).await;
    // The app answers nobody until all N are connected: the N streams are
    // open at the same time.
    let app = tokio::net::TcpListener::bind("127.27.2.2:8080").await.unwrap();
    tokio::spawn(async move {
        let mut waiting = Vec::new();
        while waiting.len() < N {
            let Ok((s, peer)) = app.accept().await else { return };
            waiting.push((s, peer));
        }
        for (mut s, peer) in waiting {
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut buf = [0u8; 64];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let _ = s
                    .write_all(format!("{} {}", peer.ip(), String::from_utf8_lossy(&buf[..n])).as_bytes())
                    .await;
                let _ = s.shutdown().await;
            });
        }
    });
    let client: std::net::Ipv4Addr = "127.27.1.2".parse().unwrap();
    let all = futures::future::join_all((0..N).map(|i| {
        let probe = TestAgent::view(n1.orig.clone(), n1.proxy.clone());
        async move { app_connect(&probe, client, a("127.27.2.2:8080"), &format!("n{i}")).await }
    }))
    .await;
    for (i, r) in all.into_iter().enumerate() {
        assert_eq!(r.unwrap(), format!("127.27.1.2 n{i}"));
    }
    let hb = n1.hbone.as_ref().unwrap();
    // Streams are spread over `spread()` connections, then packed up to MAX_STREAMS each.
    let pool = ferry_agent::tunnel::pool::MAX_STREAMS;
    let expected = N.div_ceil(pool).max(ferry_agent::tunnel::pool::spread().min(N)) as u64;
    assert_eq!(hb.stats.pooled_connections_opened.load(Ordering::Relaxed), expected);
    assert_eq!(hb.pooled("client", "127.27.2.2".parse().unwrap()), expected as usize);
    // Once the streams are gone, the burst's surplus is closed: the key
    // keeps its spread (the sweeper does this after SURPLUS_IDLE).
    let spread = ferry_agent::tunnel::pool::spread();
    assert!(expected as usize > spread, "the burst opened a surplus");
    until("every stream to end", || n1.proxy.connections() == 0).await;
    assert_eq!(
        hb.sweep_pool(std::time::Duration::from_secs(3600)),
        expected as usize,
        "not idle long enough yet"
    );
    assert_eq!(hb.sweep_pool(std::time::Duration::ZERO), spread);
    assert_eq!(hb.pooled("client", "127.27.2.2".parse().unwrap()), spread);
    // And the kept ones still carry streams.
    let _app = echo_app(a("127.27.2.2:8081")).await;
    assert_eq!(
        app_connect(&n1, client, a("127.27.2.2:8081"), "again").await.unwrap(),
        "127.27.1.2 again"
    );
    assert_eq!(hb.stats.pooled_connections_opened.load(Ordering::Relaxed), expected);
}

/// A destination agent that hands over sends GOAWAY on the tunnel
/// connections it served and keeps serving their open streams. New
/// streams from the source must then go to a new connection, never fail.
/// (Sequential streams, after the GOAWAY has been read; the race with it is
/// in the next test.)
#[tokio::test]
async fn new_streams_after_a_goaway_open_a_new_connection() {
    let (n1, n2) = mesh_of_three(28).await;
    let _app = echo_app(a("127.28.2.2:8080")).await;
    let client: std::net::Ipv4Addr = "127.28.1.2".parse().unwrap();
    // One held stream on each pooled connection (streams are spread over
    // `spread()` connections first), so every pooled one is busy and the
    // next stream must share one of them.
    let spread = ferry_agent::tunnel::pool::spread();
    let mut held = Vec::new();
    for i in 0..spread {
        let mut s = app_stream(&n1, client, a("127.28.2.2:8080")).await.unwrap();
        s.write_all(format!("held{i}").as_bytes()).await.unwrap();
        held.push(s);
    }
    until("every held stream at the destination", || {
        n2.proxy
            .telemetry
            .live()
            .iter()
            .filter(|c| c.direction == Direction::Tunnel)
            .count()
            == spread
    })
    .await;
    let hb = n1.hbone.as_ref().unwrap();
    assert_eq!(hb.pooled("client", "127.28.2.2".parse().unwrap()), spread);
    // The destination hands over: GOAWAY on what it serves.
    n2.hbone.as_ref().unwrap().drain();
    // Time for the pool to read the GOAWAY: nothing on the client side shows
    // it (hyper's `is_closed` stays false while the held streams keep the
    // connection open), so this waits instead of polling a condition.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    for i in 0..5 {
        let got = app_connect(&n1, client, a("127.28.2.2:8080"), &format!("after{i}")).await;
        assert_eq!(
            got.unwrap_or_default(),
            format!("127.28.1.2 after{i}"),
            "new stream {i} after the GOAWAY"
        );
    }
    assert!(
        hb.stats.pooled_connections_opened.load(Ordering::Relaxed) > spread as u64,
        "a new connection was opened"
    );
    // The streams that were open finish on their old connections.
    for (i, s) in held.into_iter().enumerate() {
        assert_eq!(exchange(s, "").await.unwrap(), format!("127.28.1.2 held{i}"));
    }
    assert_eq!(n1.proxy.telemetry.counters.snapshot().failed, 0);
}

/// The soak's handover failure, in process: many streams held over several
/// pooled connections and new streams opened concurrently, non-stop, while
/// the destination sends GOAWAY on everything it serves. No new stream may
/// fail. (Before the fix 172 of 4,446 got an EOF: CONNECTs the GOAWAY
/// refused, or sent on a connection whose closing hyper had not yet seen,
/// were failed after three tries instead of sent again elsewhere. Later,
/// under CPU load, about one run in 15 had a CONNECT neither answered nor
/// refused, which held its app connection past the test's 10 s until each
/// CONNECT got an answer deadline, `FIRST_ANSWER_WITHIN`: 0 hangs in 400
/// runs with two busy loops beside them; one of those runs had a stream
/// end empty, a rarer failure whose cause is not found.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_new_streams_through_a_goaway_never_fail() {
    let (n1, n2) = mesh_of_three(29).await;
    let _app = echo_app(a("127.29.2.2:8080")).await;
    let client: std::net::Ipv4Addr = "127.29.1.2".parse().unwrap();
    let mut held = Vec::new();
    for i in 0..250 {
        let mut s = app_stream(&n1, client, a("127.29.2.2:8080")).await.unwrap();
        s.write_all(format!("held{i}").as_bytes()).await.unwrap();
        held.push(s);
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let workers: Vec<_> = (0..16)
        .map(|w| {
            let probe = TestAgent::view(n1.orig.clone(), n1.proxy.clone());
            let (stop, answered) = (stop.clone(), answered.clone());
            tokio::spawn(async move {
                let (mut ok, mut failed) = (0u32, Vec::new());
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let msg = format!("w{w}n{i}");
                    match app_connect(&probe, client, a("127.29.2.2:8080"), &msg).await {
                        Ok(got) if got == format!("127.29.1.2 {msg}") => {
                            ok += 1;
                            answered.fetch_add(1, Ordering::Relaxed);
                        }
                        other => failed.push(format!("{msg}: {other:?}")),
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    // Streams flowing, then the GOAWAY, then well past it.
    until("new streams answered before the GOAWAY", || {
        answered.load(Ordering::Relaxed) >= 50
    })
    .await;
    n2.hbone.as_ref().unwrap().drain();
    let at_drain = answered.load(Ordering::Relaxed);
    until("new streams answered after the GOAWAY", || {
        answered.load(Ordering::Relaxed) >= at_drain + 300
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let (mut ok, mut failed) = (0, Vec::new());
    for w in workers {
        let (o, f) = w.await.unwrap();
        ok += o;
        failed.extend(f);
    }
    assert!(ok > 100, "positive control: {ok} new streams answered");
    assert!(
        failed.is_empty(),
        "{} of {} failed: {:?}",
        failed.len(),
        ok as usize + failed.len(),
        &failed[..failed.len().min(5)]
    );
    let retried = n1.hbone.as_ref().unwrap().stats.streams_retried.load(Ordering::Relaxed);
    assert!(retried > 0, "the race was exercised: {retried} CONNECTs sent again");
    for (i, s) in held.into_iter().enumerate() {
        assert_eq!(exchange(s, "").await.unwrap(), format!("127.29.1.2 held{i}"));
    }
}
