//! The agent's admin views, typed: what `/config_dump`, `/conns`, `/certs`
//! and `/stats` serve and what `ferryctl` and the tests read back. Field
//! names and enum values here are the stable JSON shape.

use std::{borrow::Cow, fmt};

use serde::{Deserialize, Serialize};

use crate::{
    config::{Service, Settings, Workload},
    spiffe::SpiffeId,
    state::Hop,
};

/// Which of the proxy's paths a connection came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// From an enrolled pod's app (outbound listener).
    Outbound,
    /// Plaintext to an enrolled pod (sk_lookup).
    Inbound,
    /// Through the tunnel from another node.
    Tunnel,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
            Direction::Tunnel => "tunnel",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A local pod, as the agent's reconciler sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PodStatus {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub ip: String,
    pub enrolled: bool,
    pub pod_id: Option<u32>,
    pub netns_cookie: Option<u64>,
    pub cgroup: Option<String>,
    pub netns: Option<String>,
    pub host_veth: Option<String>,
    /// Why the pod asked to be enrolled but is not.
    pub error: Option<String>,
}

/// The config stream's state, when the config comes from the control plane.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ControlStatus {
    pub endpoint: String,
    pub connected: bool,
    /// The control plane's snapshot version last applied here.
    pub system_version: u64,
    /// Resources held (this node's pods, mesh members, services, policies).
    pub resources: usize,
    pub last_nack: Option<String>,
    pub last_error: Option<String>,
}

/// `/config_dump`: the agent's whole state.
#[derive(Clone, Debug, Serialize, Deserialize)]
///
/// The bulk (settings, workloads, services) is borrowed when the agent
/// serves it, so a dump of a large mesh copies nothing but JSON; readers
/// get owned values.
pub struct ConfigDump<'a> {
    pub node: String,
    /// The config version fully applied (0: none yet).
    pub version: u64,
    pub settings: Cow<'a, Settings>,
    pub pods: Vec<PodStatus>,
    pub workloads: Vec<Cow<'a, Workload>>,
    pub services: Cow<'a, [Service]>,
    pub control: Option<ControlStatus>,
}

/// `/conns`: one live connection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConnView {
    pub id: u64,
    pub direction: Direction,
    /// Source workload (namespace/name) or client address.
    pub source: String,
    pub client: String,
    pub orig_dst: String,
    pub service: Option<String>,
    pub endpoint: Option<String>,
    pub hop: Option<Hop>,
    pub peer_identity: Option<SpiffeId>,
    pub sent: u64,
    pub received: u64,
    pub age_ms: u64,
}

/// `/certs`: one workload certificate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CertView {
    pub uid: String,
    pub spiffe_id: SpiffeId,
    pub serial: String,
    pub not_after_unix: i64,
    pub seconds_to_expiry: i64,
    pub seconds_to_rotation: i64,
}

/// `/stats`: the proxy's counters since start.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub outbound_opened: u64,
    pub inbound_opened: u64,
    pub tunnel_opened: u64,
    pub closed: u64,
    pub failed: u64,
    pub no_orig_dst: u64,
    /// Inbound connections refused by the inbound gate (STRICT, identity, target).
    pub refused: u64,
    /// Of those, plaintext refused because the workload is STRICT.
    pub refused_plaintext: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub hop_local: u64,
    pub hop_tunnel: u64,
    pub hop_direct: u64,
}

impl Stats {
    /// Every counter with its JSON field name, in declaration order (for
    /// tables that list counters one per row).
    pub fn counters(&self) -> [(&'static str, u64); 13] {
        // Exhaustive on purpose: a new counter does not compile until listed here.
        let Stats {
            outbound_opened,
            inbound_opened,
            tunnel_opened,
            closed,
            failed,
            no_orig_dst,
            refused,
            refused_plaintext,
            bytes_sent,
            bytes_received,
            hop_local,
            hop_tunnel,
            hop_direct,
        } = *self;
        [
            ("outbound_opened", outbound_opened),
            ("inbound_opened", inbound_opened),
            ("tunnel_opened", tunnel_opened),
            ("closed", closed),
            ("failed", failed),
            ("no_orig_dst", no_orig_dst),
            ("refused", refused),
            ("refused_plaintext", refused_plaintext),
            ("bytes_sent", bytes_sent),
            ("bytes_received", bytes_received),
            ("hop_local", hop_local),
            ("hop_tunnel", hop_tunnel),
            ("hop_direct", hop_direct),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_named_as_serialized() {
        let s = Stats {
            outbound_opened: 1,
            inbound_opened: 2,
            tunnel_opened: 3,
            closed: 4,
            failed: 5,
            no_orig_dst: 6,
            refused: 7,
            refused_plaintext: 8,
            bytes_sent: 9,
            bytes_received: 10,
            hop_local: 11,
            hop_tunnel: 12,
            hop_direct: 13,
        };
        let json = serde_json::to_value(&s).unwrap();
        let obj = json.as_object().unwrap();
        assert_eq!(obj.len(), s.counters().len());
        for (name, value) in s.counters() {
            assert_eq!(obj[name], value, "{name}");
        }
    }
}
