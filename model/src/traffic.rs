//! Traffic policy: what a `DestinationRule`'s `trafficPolicy` asks of every
//! client of one Service (load balancing, connection-pool limits, outlier
//! detection), in the form agents apply.
//!
//! Istio layers a policy: the rule's `trafficPolicy`, its
//! `portLevelSettings` per port, then each subset's own `trafficPolicy` (and
//! its port-level settings), each layer replacing whole sections
//! (`loadBalancer`, `connectionPool`, `outlierDetection`) of the one below.
//! The control plane resolves that layering once
//! (`ferry-control`'s `routes::istio::destination_rule`); agents look up the
//! effective policy for a (subset, port) with
//! [`ServiceTrafficPolicy::effective`], a map lookup. Defaults are Istio's:
//! a Service with no DestinationRule balances LEAST_REQUEST with no limits
//! and no outlier detection.

use std::{collections::BTreeMap, fmt};

use serde::{Deserialize, Serialize};

/// The traffic policy of one Service (`namespace/name`), layers resolved.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceTrafficPolicy {
    /// `namespace/name` of the Service the policy applies to.
    pub service: String,
    /// `namespace/name` of the DestinationRule it came from.
    #[serde(default)]
    pub origin: String,
    /// The Service-wide policy.
    #[serde(default)]
    pub policy: TrafficPolicy,
    /// Per Service port (`portLevelSettings`), already merged over `policy`.
    #[serde(default)]
    pub ports: BTreeMap<u16, TrafficPolicy>,
    /// Per subset name, already merged over `policy` (and `ports`).
    #[serde(default)]
    pub subsets: BTreeMap<String, SubsetTrafficPolicy>,
}

/// A subset's own policy and its port-level settings, merged over the
/// Service's.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SubsetTrafficPolicy {
    #[serde(default)]
    pub policy: TrafficPolicy,
    #[serde(default)]
    pub ports: BTreeMap<u16, TrafficPolicy>,
}

impl ServiceTrafficPolicy {
    /// The policy for traffic to `subset` (if any) on Service port `port`:
    /// the most specific layer there is.
    pub fn effective(&self, subset: Option<&str>, port: u16) -> &TrafficPolicy {
        if let Some(s) = subset.and_then(|s| self.subsets.get(s)) {
            return s.ports.get(&port).unwrap_or(&s.policy);
        }
        self.ports.get(&port).unwrap_or(&self.policy)
    }
}

/// One resolved layer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficPolicy {
    #[serde(default)]
    pub load_balancer: LoadBalancer,
    #[serde(default)]
    pub connection_pool: ConnectionPool,
    /// None: no endpoint is ever ejected.
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetection>,
}

/// `trafficPolicy.loadBalancer`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancer {
    #[serde(default)]
    pub algorithm: LbAlgorithm,
    /// `localityLbSetting`: None means locality-unaware.
    #[serde(default)]
    pub locality: Option<LocalityLb>,
    /// `warmupDurationSecs`: a new endpoint's share ramps up over this long.
    #[serde(default)]
    pub warmup_ms: Option<u64>,
}

/// How one endpoint is chosen among the candidates.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum LbAlgorithm {
    RoundRobin,
    /// Power of two choices on outstanding requests (Istio's default).
    #[default]
    LeastRequest,
    Random,
    /// The destination the client dialled, unbalanced.
    Passthrough,
    ConsistentHash(ConsistentHash),
}

impl LbAlgorithm {
    /// Istio's name (`simple`) or `CONSISTENT_HASH`, for views and logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            LbAlgorithm::RoundRobin => "ROUND_ROBIN",
            LbAlgorithm::LeastRequest => "LEAST_REQUEST",
            LbAlgorithm::Random => "RANDOM",
            LbAlgorithm::Passthrough => "PASSTHROUGH",
            LbAlgorithm::ConsistentHash(_) => "CONSISTENT_HASH",
        }
    }
}

impl fmt::Display for LbAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `loadBalancer.consistentHash`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConsistentHash {
    pub key: HashKey,
    #[serde(default)]
    pub table: HashTable,
}

/// What a request is hashed on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum HashKey {
    /// `httpHeaderName` (lowercase).
    Header(String),
    /// `httpCookie`: with a `ttl`, the agent sets the cookie when absent.
    Cookie {
        name: String,
        #[serde(default)]
        path: Option<String>,
        #[serde(default)]
        ttl_ms: Option<u64>,
    },
    /// `useSourceIp`.
    SourceIp,
    /// `httpQueryParameterName`.
    QueryParameter(String),
}

/// The table consistent hashing looks endpoints up in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum HashTable {
    /// Ketama ring with at least this many points (Envoy's default 1024).
    RingHash { minimum_ring_size: u64 },
    /// Maglev lookup table of this prime size (Envoy's default 65537).
    Maglev { table_size: u64 },
}

impl Default for HashTable {
    fn default() -> Self {
        HashTable::RingHash {
            minimum_ring_size: 1024,
        }
    }
}

/// `localityLbSetting`: prefer endpoints near the client, by the
/// `region/zone/subzone` of the client's and endpoints' nodes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalityLb {
    /// `failover`: from region -> region to try next when the local one has
    /// no healthy endpoint.
    #[serde(default)]
    pub failover: Vec<LocalityFailover>,
    /// `failoverPriority`: ordered label names; endpoints matching the
    /// client on more leading labels are preferred.
    #[serde(default)]
    pub failover_priority: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalityFailover {
    pub from: String,
    pub to: String,
}

/// `trafficPolicy.connectionPool` (circuit breaking). None: unlimited,
/// Istio's default for every limit.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectionPool {
    /// `tcp.maxConnections`: upstream connections to the Service from this
    /// agent (all endpoints together).
    #[serde(default)]
    pub max_connections: Option<u32>,
    /// `tcp.connectTimeout`.
    #[serde(default)]
    pub connect_timeout_ms: Option<u64>,
    /// `tcp.tcpKeepalive`.
    #[serde(default)]
    pub tcp_keepalive: Option<TcpKeepalive>,
    /// `http.http1MaxPendingRequests`: requests waiting for a connection.
    #[serde(default)]
    pub http1_max_pending_requests: Option<u32>,
    /// `http.http2MaxRequests`: requests in flight to the Service.
    #[serde(default)]
    pub http2_max_requests: Option<u32>,
    /// `http.maxRequestsPerConnection`: a connection is retired after this many.
    #[serde(default)]
    pub max_requests_per_connection: Option<u32>,
    /// `http.maxRetries`: retries in flight to the Service at once.
    #[serde(default)]
    pub max_retries: Option<u32>,
    /// `http.idleTimeout`: an idle upstream connection is closed after this.
    #[serde(default)]
    pub idle_timeout_ms: Option<u64>,
    /// `http.maxConcurrentStreams`: per upstream HTTP/2 connection.
    #[serde(default)]
    pub max_concurrent_streams: Option<u32>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpKeepalive {
    #[serde(default)]
    pub probes: Option<u32>,
    #[serde(default)]
    pub time_ms: Option<u64>,
    #[serde(default)]
    pub interval_ms: Option<u64>,
}

/// `trafficPolicy.outlierDetection`, Istio's defaults filled in by the
/// control plane.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetection {
    /// Consecutive 5xx answers (local-origin failures count as 503) that
    /// eject an endpoint; None: not on 5xx.
    #[serde(default)]
    pub consecutive_5xx: Option<u32>,
    /// Consecutive 502/503/504 (and local-origin failures); None: not on these.
    #[serde(default)]
    pub consecutive_gateway: Option<u32>,
    /// With `splitExternalLocalOriginErrors`: consecutive local-origin
    /// failures (connect refused/timeout, reset) that eject, counted apart
    /// from the answers; None: they count as 503s.
    #[serde(default)]
    pub consecutive_local_origin: Option<u32>,
    /// How often ejections are reviewed (and ejected endpoints returned).
    pub interval_ms: u64,
    /// An endpoint's n-th ejection lasts n times this.
    pub base_ejection_ms: u64,
    /// At most this share of the endpoints is ejected at once.
    pub max_ejection_percent: u32,
    /// Below this share of healthy endpoints, ejections are ignored (all
    /// endpoints are used).
    pub min_health_percent: u32,
}

impl Default for OutlierDetection {
    /// Istio's documented defaults.
    fn default() -> Self {
        Self {
            consecutive_5xx: Some(5),
            consecutive_gateway: None,
            consecutive_local_origin: None,
            interval_ms: 10_000,
            base_ejection_ms: 30_000,
            max_ejection_percent: 10,
            min_health_percent: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_most_specific_layer_applies() {
        let rr = |a: LbAlgorithm| TrafficPolicy {
            load_balancer: LoadBalancer {
                algorithm: a,
                ..Default::default()
            },
            ..Default::default()
        };
        let p = ServiceTrafficPolicy {
            service: "default/reviews".into(),
            origin: "default/reviews".into(),
            policy: rr(LbAlgorithm::RoundRobin),
            ports: [(9080, rr(LbAlgorithm::Random))].into(),
            subsets: [(
                "v2".to_owned(),
                SubsetTrafficPolicy {
                    policy: rr(LbAlgorithm::Passthrough),
                    ports: [(9443, rr(LbAlgorithm::LeastRequest))].into(),
                },
            )]
            .into(),
        };
        let alg = |s, port| p.effective(s, port).load_balancer.algorithm.clone();
        assert_eq!(alg(None, 80), LbAlgorithm::RoundRobin);
        assert_eq!(alg(None, 9080), LbAlgorithm::Random);
        assert_eq!(
            alg(Some("v1"), 9080),
            LbAlgorithm::Random,
            "an unknown subset: the Service's"
        );
        assert_eq!(alg(Some("v2"), 9080), LbAlgorithm::Passthrough);
        assert_eq!(alg(Some("v2"), 9443), LbAlgorithm::LeastRequest);
        assert_eq!(
            TrafficPolicy::default().load_balancer.algorithm,
            LbAlgorithm::LeastRequest,
            "Istio's default"
        );
    }
}
