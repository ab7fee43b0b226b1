//! Fail closed (issue 15): a STRICT pod never receives plaintext from outside
//! the mesh, whatever its node's agent is doing. While the agent is down its
//! in-pod listener is gone and `sk_lookup` decides from the pinned
//! `ferry_inbound_policy` map: STRICT refuses, PERMISSIVE delivers, and
//! kubelet probes (source 169.254.7.127) reach the app throughout. On the
//! cluster-in-a-box with a real CA, a real SIGKILL and real connections.

use std::{net::SocketAddrV4, time::Duration};

use ferry_box::{eventually, require_root, BoxState, ClusterBox, Spec};
use ferry_model::admission::PROBE_SOURCE;

const STRICT_ECHO: &str = "\
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: echo-strict, namespace: default}
spec:
  selector: {matchLabels: {app: echo}}
  mtls: {mode: STRICT}
";

/// The demo box, with `client` (node 1, enrolled, PERMISSIVE) also serving
/// 8080 and the `echo` pods (echo-1 on node 1) STRICT.
fn up() -> ClusterBox {
    require_root();
    let mut spec = Spec::demo();
    spec.pods.iter_mut().find(|p| p.name == "client").unwrap().serve = vec![8080];
    spec.peer_authentications = ferry_model::peer_auth::peer_authentications_in(STRICT_ECHO).unwrap();
    ClusterBox::up(spec, ferry_box::default_bin_dir()).expect("box up")
}

fn addr(s: &BoxState, pod: &str) -> SocketAddrV4 {
    SocketAddrV4::new(s.pod_ip(pod).unwrap(), 8080)
}

/// Whether `WHO` from `pod` to `to` gets the app's answer naming `server`.
fn reaches(s: &BoxState, pod: &str, to: SocketAddrV4, server: &str) -> bool {
    s.who(pod, &to.to_string()).is_ok_and(|(name, _)| name == server)
}

/// `WHO` from node 1's netns (source `from`, or the node's own address):
/// the app's answer if it got one.
fn from_node(s: &BoxState, from: Option<std::net::Ipv4Addr>, to: SocketAddrV4) -> Option<String> {
    match s.node_who(0, from, to).unwrap() {
        Ok(reply) if !reply.is_empty() => Some(reply),
        _ => None,
    }
}

fn dropped(s: &BoxState) -> u64 {
    s.bpf_stats(0).unwrap().get("inbound_dropped").copied().unwrap_or(0)
}

#[test]
fn strict_pods_refuse_plaintext_while_the_agent_is_killed_and_probes_still_pass() {
    let mut b = up();
    let s = b.state.clone();
    s.add_probe_address(0).unwrap();
    let (echo1, client) = (addr(&s, "echo-1"), addr(&s, "client"));
    let t = Duration::from_secs(10);

    // Agent running. Positive controls: mesh traffic into the STRICT pod,
    // across nodes (mTLS) and from the same node; plaintext into the
    // PERMISSIVE one; a probe from the probe source.
    assert!(
        reaches(&s, "echo-2", echo1, "echo-1"),
        "cross-node mTLS into STRICT echo-1"
    );
    assert!(
        reaches(&s, "client", echo1, "echo-1"),
        "same-node mesh into STRICT echo-1"
    );
    assert!(
        reaches(&s, "outsider", client, "client"),
        "plaintext into PERMISSIVE client"
    );
    let probe = from_node(&s, Some(PROBE_SOURCE), echo1).expect("probe with the agent up");
    assert!(probe.starts_with("echo-1 169.254.7.127:"), "{probe:?}");
    // Negative: plaintext from outside the mesh, and from the node's own
    // address (a hostNetwork pod), are refused by the agent's gate.
    assert!(
        !reaches(&s, "outsider", echo1, "echo-1"),
        "STRICT must refuse plaintext (agent up)"
    );
    assert_eq!(
        from_node(&s, None, echo1),
        None,
        "the node's address is no probe (agent up)"
    );

    // The fallback is pinned where it survives the agent.
    let pinned = ferry_ebpf::pinned::Pinned::open(std::path::Path::new(ferry_box::PIN_ROOT), &s.node_name(0)).unwrap();
    let modes: Vec<(String, &str)> = pinned
        .inbound_policy()
        .unwrap()
        .into_iter()
        .map(|r| (r.ip.to_string(), r.mode))
        .collect();
    assert!(modes.contains(&(echo1.ip().to_string(), "strict")), "{modes:?}");
    assert!(modes.contains(&(client.ip().to_string(), "permissive")), "{modes:?}");

    // Crash node 1's agent: its in-pod listeners go with it.
    b.kill_agent(0).unwrap();
    let before = dropped(&s);
    // Plaintext to the STRICT pod is refused by sk_lookup (a reset), and
    // eBPF says it was the one refusing.
    assert!(
        eventually(t, || !reaches(&s, "outsider", echo1, "echo-1") && dropped(&s) > before),
        "plaintext must be refused with the agent killed (dropped: {} -> {})",
        before,
        dropped(&s)
    );
    // Positive control for the eBPF path: the PERMISSIVE pod still gets
    // plaintext, straight to its app.
    assert!(
        reaches(&s, "outsider", client, "client"),
        "PERMISSIVE with the agent down"
    );
    // A kubelet probe still reaches the STRICT app; the node's own address does not.
    let probe = from_node(&s, Some(PROBE_SOURCE), echo1).expect("probe with the agent down");
    assert!(probe.starts_with("echo-1 169.254.7.127:"), "{probe:?}");
    let n = dropped(&s);
    assert_eq!(
        from_node(&s, None, echo1),
        None,
        "the node's address is no probe (agent down)"
    );
    assert!(dropped(&s) > n, "refused by sk_lookup");
    assert!(s.node_who(0, None, echo1).unwrap().is_err(), "refused at connect (RST)");

    // Restart: refused throughout, mesh traffic back once it has applied.
    b.start_agent(0).unwrap();
    assert!(
        !reaches(&s, "outsider", echo1, "echo-1"),
        "STRICT while the agent restarts"
    );
    s.wait_applied(1).unwrap();
    assert!(
        eventually(t, || reaches(&s, "echo-2", echo1, "echo-1")),
        "cross-node mesh traffic after the restart"
    );
    assert!(
        reaches(&s, "client", echo1, "echo-1"),
        "same-node mesh traffic after the restart"
    );
    assert!(!reaches(&s, "outsider", echo1, "echo-1"), "STRICT after the restart");
    assert!(
        from_node(&s, Some(PROBE_SOURCE), echo1).is_some(),
        "probe after the restart"
    );
    assert!(
        reaches(&s, "outsider", client, "client"),
        "PERMISSIVE after the restart"
    );
}

#[test]
fn a_policy_change_moves_the_pinned_fallback_and_unenrolling_removes_it() {
    let mut b = up();
    let s = b.state.clone();
    let echo1 = addr(&s, "echo-1");
    let policy = |s: &BoxState| -> Vec<(String, &'static str)> {
        ferry_ebpf::pinned::Pinned::open(std::path::Path::new(ferry_box::PIN_ROOT), &s.node_name(0))
            .unwrap()
            .inbound_policy()
            .unwrap()
            .into_iter()
            .map(|r| (r.ip.to_string(), r.mode))
            .collect()
    };
    let ip = echo1.ip().to_string();
    assert!(policy(&s).contains(&(ip.clone(), "strict")));
    // STRICT -> PERMISSIVE at runtime: with the agent then killed, plaintext is delivered.
    b.update(|sp| sp.peer_authentications.clear()).unwrap();
    assert!(policy(&b.state).contains(&(ip.clone(), "permissive")));
    b.kill_agent(0).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || reaches(&s, "outsider", echo1, "echo-1")),
        "PERMISSIVE after the change, agent down"
    );
    // Back up, opt echo-1 out: no entry left for it (not captured).
    b.start_agent(0).unwrap();
    s.wait_applied(1).unwrap();
    b.update(|sp| sp.pods.iter_mut().find(|p| p.name == "echo-1").unwrap().enrolled = false)
        .unwrap();
    assert!(
        !policy(&b.state).iter().any(|(i, _)| *i == ip),
        "{:?}",
        policy(&b.state)
    );
    assert!(
        policy(&b.state).iter().any(|(_, m)| *m == "permissive"),
        "client still captured"
    );
}
