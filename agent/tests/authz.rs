//! Authorization enforced at the destination agent, in process over
//! loopback with no privileges: two agents with HBONE and real mutual TLS
//! (identities from the peer certificate), and a plain-tunnel agent for
//! plaintext sources (no identity, the address they claim). Each refusal
//! sits beside a positive control; denials are checked in the metrics text.

mod common;

use std::{net::Ipv4Addr, net::SocketAddrV4};

use common::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

fn a(s: &str) -> SocketAddrV4 {
    s.parse().unwrap()
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// The workloads of the mTLS tests: three clients on n1 (productpage and
/// reviews in `default`, and a pod of namespace `other` that runs as a
/// `bookinfo-productpage` service account too), details on n2.
fn mesh_config(net: u8, node: &str, policies: &str) -> ferry_model::ConfigFile {
    config(&format!(
        "node: {node}
workloads:
  - {{uid: productpage, name: productpage, serviceAccount: bookinfo-productpage, node: n1, ip: 127.{net}.1.2, enrolled: true}}
  - {{uid: reviews, name: reviews, serviceAccount: bookinfo-reviews, node: n1, ip: 127.{net}.1.3, enrolled: true}}
  - {{uid: outsider, name: outsider, namespace: other, serviceAccount: bookinfo-productpage, node: n1, ip: 127.{net}.1.4, enrolled: true}}
  - {{uid: details, name: details, serviceAccount: bookinfo-details, node: n2, ip: 127.{net}.2.2, enrolled: true, labels: {{app: details}}}}
authorizationPolicies:
{policies}"
    ))
}

/// n1 (the clients) and n2 (details) with HBONE; every pod holds a
/// certificate for its own identity from one CA.
async fn mesh(net: u8, policies: &str) -> (TestAgent, TestAgent) {
    let ca = TestCa::new();
    let (n1, n2) = (agent("n1", true, &[]), agent("n2", true, &[]));
    for (ag, uid, id) in [
        (&n1, "productpage", "default/sa/bookinfo-productpage"),
        (&n1, "reviews", "default/sa/bookinfo-reviews"),
        (&n1, "outsider", "other/sa/bookinfo-productpage"),
        (&n2, "details", "default/sa/bookinfo-details"),
    ] {
        ca.issue_to(ag, uid, &format!("spiffe://cluster.local/ns/{id}"));
    }
    n1.reconciler.reconcile(mesh_config(net, "n1", policies)).await;
    n2.reconciler.reconcile(mesh_config(net, "n2", policies)).await;
    (n1, n2)
}

/// What the app in `from` gets back calling details on `port` ("" when refused).
async fn call(n1: &TestAgent, net: u8, from: &str, port: u16) -> String {
    let from = ip(&format!("127.{net}.1.{from}"));
    let to = SocketAddrV4::new(ip(&format!("127.{net}.2.2")), port);
    app_connect(n1, from, to, "hi").await.unwrap_or_default()
}

const PRODUCTPAGE: &str = "2";
const REVIEWS: &str = "3";
const OUTSIDER: &str = "4";

/// `ferry_authz_denied_total` for one policy and reason, from the metrics text.
fn denied(ag: &TestAgent, policy: &str, reason: &str) -> u64 {
    metric(ag, "ferry_authz_denied_total", policy, reason)
}

fn metric(ag: &TestAgent, name: &str, policy: &str, reason: &str) -> u64 {
    let text = ag.proxy.telemetry.metrics.encode();
    let prefix = format!("{name}{{policy=\"{policy}\",reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |v| v.trim().parse().unwrap())
}

#[tokio::test]
async fn a_deny_policy_refuses_one_principal_and_admits_another() {
    let net = 40;
    let policy = "  - {name: deny-reviews, namespace: default, spec: {selector: {matchLabels: {app: details}}, action: DENY, rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/bookinfo-reviews]}}]}]}}\n";
    let (n1, n2) = mesh(net, policy).await;
    let _app = echo_app(a("127.40.2.2:8080")).await;
    assert_eq!(
        call(&n1, net, PRODUCTPAGE, 8080).await,
        "127.40.1.2 hi",
        "positive control"
    );
    assert_eq!(call(&n1, net, REVIEWS, 8080).await, "", "reviews is denied");
    until("the denial counted by policy", || {
        denied(&n2, "default/deny-reviews", "matched_deny") == 1
    })
    .await;
    let c = n2.proxy.telemetry.counters.snapshot();
    assert_eq!((c.refused, c.failed), (1, 1));
}

#[tokio::test]
async fn allow_only_productpage_refuses_a_valid_certificate_from_another_namespace() {
    let net = 41;
    let policy = "  - {name: details-viewer, namespace: default, spec: {selector: {matchLabels: {app: details}}, rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/bookinfo-productpage]}}]}]}}\n";
    let (n1, n2) = mesh(net, policy).await;
    let _app = echo_app(a("127.41.2.2:8080")).await;
    assert_eq!(
        call(&n1, net, PRODUCTPAGE, 8080).await,
        "127.41.1.2 hi",
        "positive control"
    );
    assert_eq!(
        call(&n1, net, OUTSIDER, 8080).await,
        "",
        "same service account name, namespace other"
    );
    assert_eq!(call(&n1, net, REVIEWS, 8080).await, "");
    until("both denials counted", || denied(&n2, "-", "no_allow_matched") == 2).await;
}

#[tokio::test]
async fn not_principals_denies_everyone_else() {
    let net = 42;
    let policy = "  - {name: only-productpage, namespace: default, spec: {action: DENY, rules: [{from: [{source: {notPrincipals: [cluster.local/ns/default/sa/bookinfo-productpage]}}]}]}}\n";
    let (n1, n2) = mesh(net, policy).await;
    let _app = echo_app(a("127.42.2.2:8080")).await;
    assert_eq!(
        call(&n1, net, PRODUCTPAGE, 8080).await,
        "127.42.1.2 hi",
        "positive control"
    );
    assert_eq!(call(&n1, net, REVIEWS, 8080).await, "");
    until("the denial counted", || {
        denied(&n2, "default/only-productpage", "matched_deny") == 1
    })
    .await;
}

#[tokio::test]
async fn an_l7_rule_on_a_tcp_port_denies_and_audit_only_counts() {
    let net = 43;
    // The only ALLOW rule needs HTTP: at L4 it cannot match (fail closed).
    let l7 = "  - {name: get-only, namespace: default, spec: {rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/bookinfo-productpage]}}], to: [{operation: {methods: [GET]}}]}]}}\n";
    let (n1, n2) = mesh(net, l7).await;
    let _app = echo_app(a("127.43.2.2:8080")).await;
    assert_eq!(call(&n1, net, PRODUCTPAGE, 8080).await, "");
    until("the L7 denial counted", || denied(&n2, "-", "l7_allow_on_l4") == 1).await;

    // AUDIT matches are counted, never denied.
    let audit = "  - {name: audit-reviews, namespace: default, spec: {action: AUDIT, rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/bookinfo-reviews]}}]}]}}\n";
    n2.reconciler.reconcile(mesh_config(net, "n2", audit)).await;
    assert_eq!(call(&n1, net, REVIEWS, 8080).await, "127.43.1.3 hi");
    assert_eq!(call(&n1, net, PRODUCTPAGE, 8080).await, "127.43.1.2 hi");
    assert_eq!(
        metric(&n2, "ferry_authz_audited_total", "default/audit-reviews", "audit"),
        1,
        "only reviews matched the AUDIT rule"
    );
    assert_eq!(n2.proxy.telemetry.counters.snapshot().refused, 1);
}

/// An app that echoes every chunk until the client closes.
async fn stream_echo(addr: SocketAddrV4) -> tokio::task::JoinHandle<()> {
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
    })
}

/// Sends `msg` and reads the echo; None if the connection is closed.
async fn ping(s: &mut TcpStream, msg: &str) -> Option<String> {
    tokio::time::timeout(DEADLINE, async {
        s.write_all(msg.as_bytes()).await.ok()?;
        let mut buf = vec![0u8; msg.len()];
        s.read_exact(&mut buf).await.ok()?;
        Some(String::from_utf8_lossy(&buf).into_owned())
    })
    .await
    .expect("no answer and no close within the deadline")
}

#[tokio::test]
async fn a_policy_change_cuts_a_live_connection_it_denies_and_keeps_the_others() {
    let net = 44;
    let (n1, n2) = mesh(net, "  []\n").await;
    let _app = stream_echo(a("127.44.2.2:8080")).await;
    let details = a("127.44.2.2:8080");
    let mut pp = app_stream(&n1, ip("127.44.1.2"), details).await.unwrap();
    let mut rv = app_stream(&n1, ip("127.44.1.3"), details).await.unwrap();
    assert_eq!(ping(&mut pp, "a").await.as_deref(), Some("a"));
    assert_eq!(ping(&mut rv, "b").await.as_deref(), Some("b"));

    // From now on only productpage may call details.
    let policy = "  - {name: details-viewer, namespace: default, spec: {selector: {matchLabels: {app: details}}, rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/bookinfo-productpage]}}]}]}}\n";
    n2.reconciler.reconcile(mesh_config(net, "n2", policy)).await;

    // reviews' connection is closed: its read ends.
    let mut buf = [0u8; 16];
    let cut = tokio::time::timeout(DEADLINE, rv.read(&mut buf))
        .await
        .expect("not cut");
    assert!(matches!(cut, Ok(0) | Err(_)), "{cut:?}");
    until("the live denial counted", || denied(&n2, "-", "no_allow_matched") == 1).await;
    // productpage's connection carries on, and a new reviews call is refused.
    assert_eq!(ping(&mut pp, "still").await.as_deref(), Some("still"));
    assert_eq!(call(&n1, net, REVIEWS, 8080).await, "");
    assert_eq!(call(&n1, net, PRODUCTPAGE, 8080).await.len(), 2, "echoes \"hi\"");
    let c = n2.proxy.telemetry.counters.snapshot();
    assert_eq!(c.refused, 1, "the live cut is not an open refusal");
}

/// A plaintext client (no identity) through the plain tunnel, from `src`
/// (any address it likes), to `target`.
async fn plain(src: &str, to_pod: &str, target: &str) -> String {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.bind(format!("{src}:0").parse().unwrap()).unwrap();
    let mut s = s.connect(format!("{to_pod}:15008").parse().unwrap()).await.unwrap();
    s.write_all(&ferry_agent::tunnel::encode(a(target))).await.unwrap();
    exchange(s, "plain").await.unwrap_or_default()
}

#[tokio::test]
async fn plaintext_spoofing_a_pod_ip_ip_blocks_and_ports() {
    let ag = agent("n2", false, &[]);
    let cfg = |policies: &str| {
        config(&format!(
            "node: n2
workloads:
  - {{uid: productpage, name: productpage, serviceAccount: bookinfo-productpage, node: n1, ip: 127.45.1.2, enrolled: true}}
  - {{uid: details, name: details, serviceAccount: bookinfo-details, node: n2, ip: 127.45.2.2, enrolled: true, labels: {{app: details}}}}
authorizationPolicies:
{policies}"
        ))
    };
    let principals = "  - {name: from-productpage, namespace: default, spec: {rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/bookinfo-productpage]}}]}]}}\n";
    let blocks = "  - {name: from-block, namespace: default, spec: {rules: [{from: [{source: {ipBlocks: [127.45.9.0/24]}}]}]}}\n";
    ag.reconciler.reconcile(cfg(&format!("{principals}{blocks}"))).await;
    let _a1 = echo_app(a("127.45.2.2:8080")).await;
    let _a2 = echo_app(a("127.45.2.2:8081")).await;
    // Claiming productpage's address proves nothing: the principals rule
    // does not match a plaintext peer, and the address is not in the block.
    assert_eq!(plain("127.45.1.2", "127.45.2.2", "127.45.2.2:8080").await, "");
    // ipBlocks: an address in the block is allowed (positive control), one
    // outside is not.
    assert_eq!(
        plain("127.45.9.9", "127.45.2.2", "127.45.2.2:8080").await,
        "127.45.9.9 plain"
    );
    assert_eq!(plain("127.45.8.9", "127.45.2.2", "127.45.2.2:8080").await, "");
    until("denials counted", || denied(&ag, "-", "no_allow_matched") == 2).await;

    // Ports: 8080 only.
    let ports = "  - {name: port-8080, namespace: default, spec: {rules: [{to: [{operation: {ports: ['8080']}}]}]}}\n";
    ag.reconciler.reconcile(cfg(ports)).await;
    assert_eq!(
        plain("127.45.8.9", "127.45.2.2", "127.45.2.2:8080").await,
        "127.45.8.9 plain"
    );
    assert_eq!(plain("127.45.8.9", "127.45.2.2", "127.45.2.2:8081").await, "");
    until("the port denial counted", || denied(&ag, "-", "no_allow_matched") == 3).await;
}
