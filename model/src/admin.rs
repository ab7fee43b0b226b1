//! The agent's admin views, typed: what `/config_dump`, `/conns`, `/certs`,
//! `/stats` and `/authz` serve and what `ferryctl` and the tests read back. Field
//! names and enum values here are the stable JSON shape.

use std::{borrow::Cow, fmt, net::IpAddr};

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
    /// `ip` was learned from the container runtime (the sandbox's CNI ADD):
    /// the control plane has no address for the pod yet.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ip_learned: bool,
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

/// Whether the load balancer may choose an endpoint (`/endpoints`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndpointState {
    Healthy,
    /// Ejected by outlier detection (used anyway in panic mode).
    Ejected,
}

impl EndpointState {
    pub fn as_str(self) -> &'static str {
        match self {
            EndpointState::Healthy => "healthy",
            EndpointState::Ejected => "ejected",
        }
    }
}

impl fmt::Display for EndpointState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `/endpoints`: one endpoint of a Service port (and subset) this agent has
/// balanced requests or connections to, with its load-balancing and
/// outlier-detection state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointHealth {
    /// `namespace/name`.
    pub service: String,
    /// The Service port.
    pub port: u16,
    pub subset: Option<String>,
    /// `ip:port`.
    pub endpoint: String,
    /// The endpoint's pod (`namespace/name`), when known.
    pub workload: Option<String>,
    /// `region/zone/subzone`, when known.
    pub locality: Option<String>,
    /// The effective `loadBalancer` algorithm (`LEAST_REQUEST`, ...).
    pub algorithm: String,
    /// Whether outlier detection applies to this Service port.
    pub outlier_detection: bool,
    pub state: EndpointState,
    /// How much longer the current ejection lasts (at least; returns are
    /// checked every `interval`).
    pub ejected_for_ms: Option<u64>,
    /// Ejections since this agent first saw the endpoint.
    pub ejections: u64,
    pub consecutive_5xx: u32,
    pub consecutive_gateway: u32,
    pub consecutive_local_origin: u32,
    /// Requests (or connections) to it in flight from this agent.
    pub in_flight: u64,
    /// Panic mode (`minHealthPercent`): ejections are ignored for now.
    pub panic: bool,
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

/// An authorization dry run (`/authz?from=..&to=..&port=..`, `ferryctl
/// authz check`): may `from` reach `to` on `port`, with an HTTP request when
/// `method`, `path`, `host` or a header is given (else an L4 check).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthzQuery {
    /// `ns/pod`, `ns/serviceaccount`, a SPIFFE id, or an IP (plaintext).
    pub from: String,
    /// Overrides the source address (for `ipBlocks`).
    pub from_ip: Option<IpAddr>,
    /// The destination workload: `ns/pod` or its IP.
    pub to: String,
    pub port: u16,
    pub method: Option<String>,
    pub path: Option<String>,
    pub host: Option<String>,
    pub headers: Vec<(String, String)>,
}

impl AuthzQuery {
    /// The query string (`from=..&to=..&port=..[&method=..][&header=k:v]`),
    /// percent-encoded.
    pub fn to_query(&self) -> String {
        let mut kv: Vec<(&str, String)> = vec![
            ("from", self.from.clone()),
            ("to", self.to.clone()),
            ("port", self.port.to_string()),
        ];
        if let Some(ip) = self.from_ip {
            kv.push(("from_ip", ip.to_string()));
        }
        for (k, v) in [("method", &self.method), ("path", &self.path), ("host", &self.host)] {
            if let Some(v) = v {
                kv.push((k, v.clone()));
            }
        }
        for (k, v) in &self.headers {
            kv.push(("header", format!("{k}:{v}")));
        }
        kv.iter()
            .map(|(k, v)| format!("{k}={}", encode(v)))
            .collect::<Vec<_>>()
            .join("&")
    }

    /// Parses [`AuthzQuery::to_query`]'s form; every problem named.
    pub fn from_query(q: &str) -> Result<Self, String> {
        let mut out = AuthzQuery::default();
        let mut port = None;
        for pair in q.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = decode(v).ok_or_else(|| format!("{k}: bad percent-encoding"))?;
            match k {
                "from" | "src" => out.from = v,
                "to" | "dst" => out.to = v,
                "port" => port = Some(v.parse::<u16>().map_err(|_| format!("port: {v:?} is not 0-65535"))?),
                "from_ip" => out.from_ip = Some(v.parse().map_err(|_| format!("from_ip: {v:?} is not an address"))?),
                "method" => out.method = Some(v),
                "path" => out.path = Some(v),
                "host" => out.host = Some(v),
                "header" => {
                    let (n, val) = v
                        .split_once(':')
                        .ok_or_else(|| format!("header: {v:?} is not name:value"))?;
                    out.headers.push((n.to_owned(), val.to_owned()));
                }
                other => return Err(format!("unknown parameter {other:?}")),
            }
        }
        if out.from.is_empty() || out.to.is_empty() {
            return Err("from and to are required".into());
        }
        out.port = port.ok_or("port is required")?;
        Ok(out)
    }
}

fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/:".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// The answer to an [`AuthzQuery`]: the decision and what took it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthzCheck {
    /// The source as resolved: `ns/name (pod)`, `ns/sa (service account)`,
    /// a SPIFFE id, or `ip plaintext`.
    pub from: String,
    pub source_principal: Option<String>,
    pub source_ip: String,
    /// The destination workload, `ns/name`.
    pub to: String,
    /// Its address and the port checked.
    pub destination: String,
    /// `l4` or `http`.
    pub layer: String,
    pub allowed: bool,
    /// The decision as the agent logs it (`deny default/x[0] matched_deny`).
    pub decision: String,
    /// The deciding policy (`namespace/name`), if one decided.
    pub policy: Option<String>,
    pub rule: Option<usize>,
    /// `allow`, or the deny reason's code.
    pub reason: String,
    /// AUDIT policies that matched.
    pub audited: Vec<String>,
    /// Every policy that applies to the destination.
    pub policies: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authz_queries_round_trip_through_the_query_string() {
        let q = AuthzQuery {
            from: "default/bookinfo-productpage".into(),
            from_ip: Some("10.1.1.2".parse().unwrap()),
            to: "default/details-v1".into(),
            port: 9080,
            method: Some("GET".into()),
            path: Some("/details/0?x=1&y=2 z".into()),
            host: None,
            headers: vec![("x-user".into(), "a:b&c".into())],
        };
        let s = q.to_query();
        assert!(!s.contains(' ') && s.matches('&').count() == 6, "{s}");
        assert_eq!(AuthzQuery::from_query(&s).unwrap(), q);
        assert_eq!(AuthzQuery::from_query("src=a/b&dst=c/d&port=80").unwrap().to, "c/d");
        assert!(AuthzQuery::from_query("from=a/b&to=c/d").unwrap_err().contains("port"));
        assert!(AuthzQuery::from_query("from=a/b&to=c/d&port=99999").is_err());
        assert!(AuthzQuery::from_query("from=a/b&to=c/d&port=1&path=%zz").is_err());
        assert!(AuthzQuery::from_query("from=a/b&to=c/d&port=1&bogus=1").is_err());
    }

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
