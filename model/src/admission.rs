//! Admission: the decision the agent's inbound gate takes for every
//! connection to an enrolled pod, plaintext or tunnelled, before it is
//! delivered. Today it decides the target and PeerAuthentication (STRICT
//! refuses a connection without a proven identity); AuthorizationPolicy
//! joins it here. A pure function of the state snapshot, the destination
//! workload and the connection.

use std::{fmt, net::SocketAddrV4};

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

/// Whether `pod` accepts `conn`.
pub fn admit(state: &State, pod: &Workload, conn: &InboundConn) -> Result<(), Refusal> {
    if *conn.target.ip() != pod.ip {
        return Err(Refusal::Misdirected { target: conn.target });
    }
    if conn.identity.is_none() && mode_for(pod, &state.peer_authentications) == Mode::Strict {
        // Kubelet probes come as plaintext from the node's own addresses.
        let probe = conn.via == Direction::Inbound && state.settings.node_addresses.contains(conn.peer.ip());
        if !probe {
            return Err(Refusal::PlaintextToStrict);
        }
    }
    Ok(())
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
        // Kubelet probes from the node's address, plaintext inbound only.
        assert_eq!(
            admit(&s, &pod, &conn("10.0.0.1:4000", "10.1.1.2:80", false, Inbound)),
            Ok(())
        );
        assert_eq!(
            admit(&s, &pod, &conn("10.0.0.1:4000", "10.1.1.2:80", false, Tunnel)),
            Err(Refusal::PlaintextToStrict)
        );
        // Another pod's address is refused whatever the identity.
        assert_eq!(
            admit(&p, &pod, &conn("10.1.2.2:4000", "10.1.1.9:80", true, Tunnel)),
            Err(Refusal::Misdirected {
                target: "10.1.1.9:80".parse().unwrap()
            })
        );
    }
}
