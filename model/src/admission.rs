//! Admission: the decision the agent's inbound gate takes for every
//! connection to an enrolled pod, plaintext or tunnelled, before it is
//! delivered. Today it decides the target and PeerAuthentication (STRICT
//! refuses a connection without a proven identity); AuthorizationPolicy
//! joins it here. A pure function of the state snapshot, the destination
//! workload and the connection.
//!
//! [`fallback`] is the same decision for when the agent is not there to take
//! it: what the node's eBPF (`sk_lookup`, from a pinned per-pod map) does with
//! a connection to the pod while its inbound listener is missing. Both admit
//! kubelet probes by one rule: plaintext from [`PROBE_SOURCE`], and nothing
//! else from the node.

use std::{
    fmt,
    net::{Ipv4Addr, SocketAddrV4},
};

use crate::{
    admin::Direction,
    peer_auth::{mode_for, Mode},
    state::State,
    SpiffeId, Workload,
};

/// An inbound connection as the gate sees it.
#[derive(Clone, Debug)]
pub struct InboundConn {
    /// The client's address (a pod's IP through the tunnel).
    pub peer: SocketAddrV4,
    /// Where the client was going: the app's address.
    pub target: SocketAddrV4,
    /// The identity the peer proved (mutual TLS); None for plaintext.
    pub identity: Option<SpiffeId>,
    /// Plaintext via sk_lookup (`Inbound`) or out of the tunnel (`Tunnel`).
    pub via: Direction,
}

/// Why the gate refused a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The target is not this pod.
    Misdirected { target: SocketAddrV4 },
    /// No proven identity, and the workload's PeerAuthentication is STRICT.
    PlaintextToStrict,
}

impl Refusal {
    /// Stable reason code (metrics, access logs).
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::Misdirected { .. } => "misdirected",
            Refusal::PlaintextToStrict => "strict_mtls",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Misdirected { target } => write!(f, "target {target} is not this pod"),
            Refusal::PlaintextToStrict => {
                f.write_str("PeerAuthentication STRICT: a connection without mutual TLS is not accepted")
            }
        }
    }
}

/// The source address of kubelet probes (Istio ambient's, link-local): the
/// node's probe path, and nothing else, connects from it. Plaintext from it is
/// admitted even under STRICT; plaintext from the node's other addresses
/// (hostNetwork pods, traffic SNATed to the node) is not. The eBPF side
/// (`FERRY_PROBE_IP4` in `ebpf/include/ferry.h`) uses the same address.
pub const PROBE_SOURCE: Ipv4Addr = Ipv4Addr::new(169, 254, 7, 127);

/// Whether `conn` is a kubelet probe: plaintext, handed over by `sk_lookup`
/// (never out of the tunnel), from [`PROBE_SOURCE`].
pub fn is_probe(conn: &InboundConn) -> bool {
    conn.via == Direction::Inbound && conn.identity.is_none() && *conn.peer.ip() == PROBE_SOURCE
}

/// Whether `pod` accepts `conn`.
pub fn admit(state: &State, pod: &Workload, conn: &InboundConn) -> Result<(), Refusal> {
    if *conn.target.ip() != pod.ip {
        return Err(Refusal::Misdirected { target: conn.target });
    }
    if conn.identity.is_none() && mode_for(pod, &state.peer_authentications) == Mode::Strict && !is_probe(conn) {
        return Err(Refusal::PlaintextToStrict);
    }
    Ok(())
}

/// What happens to a connection to an enrolled pod that the agent cannot
/// take (its in-pod listener is gone: agent restarting, crashed, stopped).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallback {
    /// Refused (STRICT): no proven identity is possible without the agent.
    /// Kubelet probes ([`PROBE_SOURCE`]) still reach the app.
    Refuse,
    /// Delivered to the app as plaintext (PERMISSIVE, DISABLE).
    Deliver,
}

impl Fallback {
    /// Stable name (logs, views).
    pub fn as_str(self) -> &'static str {
        match self {
            Fallback::Refuse => "refuse",
            Fallback::Deliver => "deliver",
        }
    }
}

/// [`admit`]'s decision for a plaintext connection from outside the mesh, for
/// when the agent is not there to take it: kept by the node (eBPF) per pod.
/// A pod under STRICT, or one any ALLOW/DENY/CUSTOM AuthorizationPolicy
/// applies to, is refused: eBPF cannot evaluate a policy, and traffic a
/// policy may forbid must not get through while the agent is away (AUDIT
/// policies never deny, so they do not count).
pub fn fallback(state: &State, pod: &Workload) -> Fallback {
    let policed = state
        .authz_for(pod)
        .iter()
        .any(|p| p.spec.action != crate::authz::Action::Audit);
    match mode_for(pod, &state.peer_authentications) {
        Mode::Strict => Fallback::Refuse,
        _ if policed => Fallback::Refuse,
        Mode::Permissive | Mode::Disable | Mode::Unset => Fallback::Deliver,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ConfigFile;

    fn state(strict: bool) -> State {
        let pa = if strict {
            "peerAuthentications: [{metadata: {name: d, namespace: default}, spec: {mtls: {mode: STRICT}}}]"
        } else {
            ""
        };
        let cfg = ConfigFile::parse(
            "t",
            &format!(
                "node: n1\nsettings: {{nodeAddresses: [10.0.0.1]}}\nworkloads: [{{uid: a, name: srv, node: n1, ip: 10.1.1.2, enrolled: true}}]\n{pa}"
            ),
        )
        .unwrap();
        State::from_config(cfg, 1)
    }

    fn conn(peer: &str, target: &str, id: bool, via: Direction) -> InboundConn {
        InboundConn {
            peer: peer.parse().unwrap(),
            target: target.parse().unwrap(),
            identity: id.then(|| SpiffeId::new("default", "client")),
            via,
        }
    }

    #[test]
    fn strict_refuses_what_proves_no_identity_on_every_path() {
        let (s, p) = (state(true), state(false));
        let pod = s.workloads["a"].clone();
        use Direction::{Inbound, Tunnel};
        // Permissive: plaintext passes, on either path.
        assert_eq!(
            admit(&p, &pod, &conn("10.1.2.2:4000", "10.1.1.2:80", false, Inbound)),
            Ok(())
        );
        assert_eq!(
            admit(&p, &pod, &conn("10.1.2.2:4000", "10.1.1.2:80", false, Tunnel)),
            Ok(())
        );
        // Strict: identity passes; plaintext is refused, through the tunnel too.
        assert_eq!(
            admit(&s, &pod, &conn("10.1.2.2:4000", "10.1.1.2:80", true, Tunnel)),
            Ok(())
        );
        assert_eq!(
            admit(&s, &pod, &conn("10.1.2.2:4000", "10.1.1.2:80", false, Inbound)),
            Err(Refusal::PlaintextToStrict)
        );
        assert_eq!(
            admit(&s, &pod, &conn("10.1.2.2:4000", "10.1.1.2:80", false, Tunnel)),
            Err(Refusal::PlaintextToStrict)
        );
        // Kubelet probes come from the probe source, plaintext inbound only.
        assert_eq!(
            admit(&s, &pod, &conn("169.254.7.127:4000", "10.1.1.2:80", false, Inbound)),
            Ok(())
        );
        assert_eq!(
            admit(&s, &pod, &conn("169.254.7.127:4000", "10.1.1.2:80", false, Tunnel)),
            Err(Refusal::PlaintextToStrict)
        );
        // The node's own address is not a probe (hostNetwork pods, traffic
        // SNATed to the node), even listed in nodeAddresses.
        assert_eq!(
            admit(&s, &pod, &conn("10.0.0.1:4000", "10.1.1.2:80", false, Inbound)),
            Err(Refusal::PlaintextToStrict)
        );
        assert_eq!(
            admit(&p, &pod, &conn("10.0.0.1:4000", "10.1.1.2:80", false, Inbound)),
            Ok(())
        );
        // Another pod's address is refused whatever the identity.
        assert_eq!(
            admit(&p, &pod, &conn("10.1.2.2:4000", "10.1.1.9:80", true, Tunnel)),
            Err(Refusal::Misdirected {
                target: "10.1.1.9:80".parse().unwrap()
            })
        );
    }

    #[test]
    fn probes_are_recognised_by_their_source_only() {
        let c = |peer: &str, id: bool, via| conn(peer, "10.1.1.2:80", id, via);
        assert!(is_probe(&c("169.254.7.127:1234", false, Direction::Inbound)));
        // Not through the tunnel, not with an identity, not from elsewhere on the node.
        assert!(!is_probe(&c("169.254.7.127:1234", false, Direction::Tunnel)));
        assert!(!is_probe(&c("169.254.7.127:1234", true, Direction::Inbound)));
        assert!(!is_probe(&c("10.0.0.1:1234", false, Direction::Inbound)));
        assert!(!is_probe(&c("169.254.7.128:1234", false, Direction::Inbound)));
    }

    #[test]
    fn the_fallback_refuses_exactly_what_the_gate_refuses_from_outside_the_mesh() {
        let (s, p) = (state(true), state(false));
        let pod = s.workloads["a"].clone();
        assert_eq!(fallback(&s, &pod), Fallback::Refuse);
        assert_eq!(fallback(&p, &pod), Fallback::Deliver);
        // The gate agrees for a plaintext client from outside the mesh (and
        // from the node's address), and admits the probe in both modes.
        for (st, want) in [(&s, Fallback::Refuse), (&p, Fallback::Deliver)] {
            for peer in ["10.9.9.9:4000", "10.0.0.1:4000"] {
                let got = admit(st, &pod, &conn(peer, "10.1.1.2:80", false, Direction::Inbound));
                assert_eq!(got.is_ok(), want == Fallback::Deliver, "{peer}");
            }
            let probe = conn("169.254.7.127:4000", "10.1.1.2:80", false, Direction::Inbound);
            assert_eq!(admit(st, &pod, &probe), Ok(()));
        }
        // DISABLE is PERMISSIVE inbound, for the fallback too.
        let cfg = ConfigFile::parse(
            "t",
            "node: n1\nworkloads: [{uid: a, name: srv, node: n1, ip: 10.1.1.2, enrolled: true}]\npeerAuthentications: [{metadata: {name: d, namespace: default}, spec: {mtls: {mode: DISABLE}}}]\n",
        )
        .unwrap();
        let d = State::from_config(cfg, 1);
        assert_eq!(fallback(&d, &d.workloads["a"]), Fallback::Deliver);
    }

    #[test]
    fn a_policed_pod_falls_back_to_refuse_even_when_permissive() {
        let with = |policy: &str| {
            let cfg = ConfigFile::parse(
                "t",
                &format!(
                    "node: n1\nworkloads: [{{uid: a, name: srv, node: n1, ip: 10.1.1.2, enrolled: true}}]\n{policy}"
                ),
            )
            .unwrap();
            let s = State::from_config(cfg, 1);
            let pod = s.workloads["a"].clone();
            fallback(&s, &pod)
        };
        // Positive control: no policy, PERMISSIVE by default -> delivered.
        assert_eq!(with(""), Fallback::Deliver);
        assert_eq!(
            with("authorizationPolicies: [{name: d, namespace: default, spec: {action: DENY, rules: [{from: [{source: {namespaces: [x]}}]}]}}]"),
            Fallback::Refuse
        );
        assert_eq!(
            with("authorizationPolicies: [{name: a, namespace: default, spec: {action: AUDIT, rules: [{}]}}]"),
            Fallback::Deliver
        );
    }
}
