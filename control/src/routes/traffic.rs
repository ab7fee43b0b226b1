//! A DestinationRule's `trafficPolicy` to the traffic-policy model
//! (`ferry_model::traffic`), Istio's layering resolved here once: the
//! rule's policy, then its `portLevelSettings` for the port, then the
//! subset's policy, then the subset's port-level settings, each layer
//! replacing whole sections (`loadBalancer`, `connectionPool`,
//! `outlierDetection`, `tls`) of the one below (Istio's
//! `MergeTrafficPolicy`). Fields agents do not apply are reported
//! "accepted, not enforced" with their path.

use std::collections::{BTreeMap, BTreeSet};

use ferry_model::traffic::{
    ConnectionPool, ConsistentHash, HashKey, HashTable, LbAlgorithm, LoadBalancer, LocalityFailover, LocalityLb,
    OutlierDetection, ServiceTrafficPolicy, SubsetTrafficPolicy, TcpKeepalive, TrafficPolicy,
};

use super::Issue;
use crate::model::{istio as api, Duration};

/// The sections of one layer, as written (None: not set at this layer).
#[derive(Clone, Copy, Default)]
struct Sections<'a> {
    lb: Option<&'a api::LoadBalancer>,
    pool: Option<&'a api::ConnectionPool>,
    outlier: Option<&'a api::OutlierDetection>,
}

impl<'a> Sections<'a> {
    fn of(p: &'a api::TrafficPolicy) -> Self {
        Self {
            lb: p.load_balancer.as_ref(),
            pool: p.connection_pool.as_ref(),
            outlier: p.outlier_detection.as_ref(),
        }
    }

    fn of_port(p: &'a api::PortTrafficPolicy) -> Self {
        Self {
            lb: p.load_balancer.as_ref(),
            pool: p.connection_pool.as_ref(),
            outlier: p.outlier_detection.as_ref(),
        }
    }

    /// `self` with every section `upper` sets replaced.
    fn under(self, upper: Sections<'a>) -> Self {
        Self {
            lb: upper.lb.or(self.lb),
            pool: upper.pool.or(self.pool),
            outlier: upper.outlier.or(self.outlier),
        }
    }

    fn resolve(self) -> TrafficPolicy {
        TrafficPolicy {
            load_balancer: self.lb.map(load_balancer).unwrap_or_default(),
            connection_pool: self.pool.map(connection_pool).unwrap_or_default(),
            outlier_detection: self.outlier.map(outlier_detection),
        }
    }
}

fn ms(d: &Duration) -> u64 {
    u64::try_from(d.value.as_millis()).unwrap_or(u64::MAX)
}

/// A layer's port-level settings by port number (the first for a port wins,
/// later ones are reported).
fn port_layers<'a>(p: &'a api::TrafficPolicy, at: &str, issues: &mut Vec<Issue>) -> BTreeMap<u16, Sections<'a>> {
    let mut out = BTreeMap::new();
    for (i, pl) in p.port_level_settings.iter().enumerate() {
        match pl.port.as_ref().map(|p| p.number) {
            Some(n) if n != 0 => match out.entry(n) {
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert(Sections::of_port(pl));
                }
                std::collections::btree_map::Entry::Occupied(_) => issues.push(Issue::error(
                    format!("{at}.portLevelSettings[{i}].port"),
                    format!("port {n} already has settings: these are not applied"),
                )),
            },
            _ => issues.push(Issue::error(
                format!("{at}.portLevelSettings[{i}].port"),
                "a port number is required: these settings are not applied",
            )),
        }
    }
    out
}

/// The resolved traffic policy of a DestinationRule for `service` (None when
/// it sets no traffic policy anywhere), and its issues.
pub fn compile(
    service: &str,
    origin: &str,
    spec: &api::DestinationRuleSpec,
) -> (Option<ServiceTrafficPolicy>, Vec<Issue>) {
    let mut issues = Vec::new();
    let top = spec.traffic_policy.as_ref();
    if let Some(p) = top {
        check("spec.trafficPolicy", p, &mut issues);
    }
    for (i, s) in spec.subsets.iter().enumerate() {
        if let Some(p) = &s.traffic_policy {
            check(&format!("spec.subsets[{i}].trafficPolicy"), p, &mut issues);
        }
    }
    if top.is_none() && spec.subsets.iter().all(|s| s.traffic_policy.is_none()) {
        return (None, issues);
    }
    let base = top.map(Sections::of).unwrap_or_default();
    let top_ports = top.map_or_else(BTreeMap::new, |p| port_layers(p, "spec.trafficPolicy", &mut issues));
    let mut out = ServiceTrafficPolicy {
        service: service.to_owned(),
        origin: origin.to_owned(),
        policy: base.resolve(),
        ports: top_ports.iter().map(|(n, l)| (*n, base.under(*l).resolve())).collect(),
        subsets: BTreeMap::new(),
    };
    for (i, s) in spec.subsets.iter().enumerate() {
        let Some(sp) = &s.traffic_policy else { continue };
        let at = format!("spec.subsets[{i}].trafficPolicy");
        let sub_ports = port_layers(sp, &at, &mut issues);
        let own = Sections::of(sp);
        // Every port either layer names gets its own entry.
        let ports: BTreeSet<u16> = top_ports.keys().chain(sub_ports.keys()).copied().collect();
        let resolved = SubsetTrafficPolicy {
            policy: base.under(own).resolve(),
            ports: ports
                .into_iter()
                .map(|n| {
                    let mut l = base;
                    if let Some(t) = top_ports.get(&n) {
                        l = l.under(*t);
                    }
                    l = l.under(own);
                    if let Some(t) = sub_ports.get(&n) {
                        l = l.under(*t);
                    }
                    (n, l.resolve())
                })
                .collect(),
        };
        out.subsets.insert(s.name.clone(), resolved);
    }
    (Some(out), issues)
}

/// Reports, for one written policy (and its port-level settings), what is
/// refused or not enforced.
fn check(at: &str, p: &api::TrafficPolicy, issues: &mut Vec<Issue>) {
    let mut one =
        |at: &str, lb: Option<&api::LoadBalancer>, pool: Option<&api::ConnectionPool>, tls: Option<&api::ClientTls>| {
            if let Some(lb) = lb {
                check_lb(&format!("{at}.loadBalancer"), lb, issues);
            }
            if let Some(c) = pool.and_then(|c| c.tcp.as_ref()) {
                if c.max_connection_duration.is_some() {
                    issues.push(Issue::not_enforced(
                        format!("{at}.connectionPool.tcp.maxConnectionDuration"),
                        "maxConnectionDuration",
                    ));
                }
                if c.idle_timeout.is_some() {
                    issues.push(Issue::not_enforced(
                        format!("{at}.connectionPool.tcp.idleTimeout"),
                        "tcp idleTimeout (http.idleTimeout is)",
                    ));
                }
            }
            if let Some(h) = pool.and_then(|c| c.http.as_ref()) {
                if h.h2_upgrade_policy.as_deref().is_some_and(|v| v != "DEFAULT") {
                    issues.push(Issue::not_enforced(
                        format!("{at}.connectionPool.http.h2UpgradePolicy"),
                        "h2UpgradePolicy (requests keep the client's protocol)",
                    ));
                }
            }
            if let Some(t) = tls {
                if t.mode != api::ClientTlsMode::IstioMutual {
                    issues.push(Issue::not_enforced(
                        format!("{at}.tls.mode"),
                        "tls modes other than ISTIO_MUTUAL (mesh traffic is always mutual TLS between agents)",
                    ));
                }
            }
        };
    one(at, p.load_balancer.as_ref(), p.connection_pool.as_ref(), p.tls.as_ref());
    for (i, pl) in p.port_level_settings.iter().enumerate() {
        one(
            &format!("{at}.portLevelSettings[{i}]"),
            pl.load_balancer.as_ref(),
            pl.connection_pool.as_ref(),
            pl.tls.as_ref(),
        );
    }
    if let Some(o) = &p.outlier_detection {
        for (f, v) in [
            ("maxEjectionPercent", o.max_ejection_percent),
            ("minHealthPercent", o.min_health_percent),
        ] {
            if v.is_some_and(|v| v > 100) {
                issues.push(Issue::error(
                    format!("{at}.outlierDetection.{f}"),
                    "a percentage is at most 100 (100 is used)",
                ));
            }
        }
    }
}

fn check_lb(at: &str, lb: &api::LoadBalancer, issues: &mut Vec<Issue>) {
    if lb.simple.is_some() && lb.consistent_hash.is_some() {
        issues.push(Issue::error(
            at,
            "simple and consistentHash are exclusive: consistentHash is used",
        ));
    }
    if let Some(h) = &lb.consistent_hash {
        let keys = [
            h.http_header_name.is_some(),
            h.http_cookie.is_some(),
            h.use_source_ip == Some(true),
            h.http_query_parameter_name.is_some(),
        ];
        match keys.iter().filter(|k| **k).count() {
            0 => issues.push(Issue::error(
                format!("{at}.consistentHash"),
                "no hash key (httpHeaderName, httpCookie, useSourceIp or httpQueryParameterName): LEAST_REQUEST is used",
            )),
            1 => {}
            _ => issues.push(Issue::error(
                format!("{at}.consistentHash"),
                "more than one hash key: the first of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName is used",
            )),
        }
        if h.ring_hash.is_some() && h.maglev.is_some() {
            issues.push(Issue::error(
                format!("{at}.consistentHash"),
                "ringHash and maglev are exclusive: ringHash is used",
            ));
        }
        if h.http_cookie.as_ref().is_some_and(|c| !c.attributes.is_empty()) {
            issues.push(Issue::not_enforced(
                format!("{at}.consistentHash.httpCookie.attributes"),
                "cookie attributes",
            ));
        }
    }
    if let Some(l) = &lb.locality_lb_setting {
        if !l.distribute.is_empty() {
            issues.push(Issue::not_enforced(
                format!("{at}.localityLbSetting.distribute"),
                "weighted locality distribution (failover and failoverPriority are)",
            ));
        }
    }
}

fn load_balancer(lb: &api::LoadBalancer) -> LoadBalancer {
    let algorithm = match (&lb.consistent_hash, lb.simple) {
        (Some(h), _) => hash(h).map_or(LbAlgorithm::LeastRequest, LbAlgorithm::ConsistentHash),
        (None, Some(api::LbPolicy::RoundRobin)) => LbAlgorithm::RoundRobin,
        (None, Some(api::LbPolicy::Random)) => LbAlgorithm::Random,
        (None, Some(api::LbPolicy::Passthrough)) => LbAlgorithm::Passthrough,
        // LEAST_CONN is Istio's deprecated name for LEAST_REQUEST.
        (None, _) => LbAlgorithm::LeastRequest,
    };
    LoadBalancer {
        algorithm,
        locality: lb
            .locality_lb_setting
            .as_ref()
            .filter(|l| l.enabled != Some(false))
            .map(|l| LocalityLb {
                failover: l
                    .failover
                    .iter()
                    .map(|f| LocalityFailover {
                        from: f.from.clone(),
                        to: f.to.clone(),
                    })
                    .collect(),
                failover_priority: l.failover_priority.clone(),
            }),
        warmup_ms: lb.warmup_duration_secs.as_ref().map(ms).filter(|ms| *ms > 0),
    }
}

fn hash(h: &api::ConsistentHashLb) -> Option<ConsistentHash> {
    let key = if let Some(n) = &h.http_header_name {
        HashKey::Header(n.to_ascii_lowercase())
    } else if let Some(c) = &h.http_cookie {
        HashKey::Cookie {
            name: c.name.clone(),
            path: c.path.clone(),
            ttl_ms: c.ttl.as_ref().map(ms).filter(|ms| *ms > 0),
        }
    } else if h.use_source_ip == Some(true) {
        HashKey::SourceIp
    } else if let Some(q) = &h.http_query_parameter_name {
        HashKey::QueryParameter(q.clone())
    } else {
        return None;
    };
    let table = match (&h.ring_hash, &h.maglev) {
        (Some(r), _) => HashTable::RingHash {
            minimum_ring_size: r.minimum_ring_size.unwrap_or(1024).clamp(1, 1 << 23),
        },
        (None, Some(m)) => HashTable::Maglev {
            table_size: m.table_size.unwrap_or(65537).clamp(1, 5_000_011),
        },
        (None, None) => HashTable::RingHash {
            minimum_ring_size: h.minimum_ring_size.unwrap_or(1024).clamp(1, 1 << 23),
        },
    };
    Some(ConsistentHash { key, table })
}

fn connection_pool(c: &api::ConnectionPool) -> ConnectionPool {
    let tcp = c.tcp.as_ref();
    let http = c.http.as_ref();
    // Istio: 0 (or unset) means the default, unlimited.
    let limit = |v: Option<u32>| v.filter(|v| *v > 0);
    ConnectionPool {
        max_connections: limit(tcp.and_then(|t| t.max_connections)),
        connect_timeout_ms: tcp.and_then(|t| t.connect_timeout.as_ref()).map(ms).filter(|v| *v > 0),
        tcp_keepalive: tcp.and_then(|t| t.tcp_keepalive.as_ref()).map(|k| TcpKeepalive {
            probes: k.probes,
            time_ms: k.time.as_ref().map(ms),
            interval_ms: k.interval.as_ref().map(ms),
        }),
        http1_max_pending_requests: limit(http.and_then(|h| h.http1_max_pending_requests)),
        http2_max_requests: limit(http.and_then(|h| h.http2_max_requests)),
        max_requests_per_connection: limit(http.and_then(|h| h.max_requests_per_connection)),
        // Istio programs maxRetries only when above 0 (0: Envoy's default,
        // unlimited), like the other limits.
        max_retries: limit(http.and_then(|h| h.max_retries)),
        idle_timeout_ms: http.and_then(|h| h.idle_timeout.as_ref()).map(ms).filter(|v| *v > 0),
        max_concurrent_streams: limit(http.and_then(|h| h.max_concurrent_streams)),
    }
}

/// Istio's defaults filled in. The legacy `consecutiveErrors` counts
/// gateway errors (502, 503, 504) only, as istiod has translated it since
/// Istio 1.6 (istio/api#617); setting it turns off the 5xx default.
fn outlier_detection(o: &api::OutlierDetection) -> OutlierDetection {
    let d = OutlierDetection::default();
    let (consecutive_5xx, consecutive_gateway) = match (o.consecutive_errors, o.consecutive_5xx_errors) {
        (_, Some(n)) => (Some(n), o.consecutive_gateway_errors),
        (Some(n), None) => (None, o.consecutive_gateway_errors.or(Some(n))),
        (None, None) => (d.consecutive_5xx, o.consecutive_gateway_errors),
    };
    OutlierDetection {
        consecutive_5xx: consecutive_5xx.filter(|n| *n > 0),
        consecutive_gateway: consecutive_gateway.filter(|n| *n > 0),
        consecutive_local_origin: (o.split_external_local_origin_errors == Some(true))
            .then(|| o.consecutive_local_origin_failures.unwrap_or(5))
            .filter(|n| *n > 0),
        interval_ms: o.interval.as_ref().map(ms).filter(|v| *v > 0).unwrap_or(d.interval_ms),
        base_ejection_ms: o
            .base_ejection_time
            .as_ref()
            .map(ms)
            .filter(|v| *v > 0)
            .unwrap_or(d.base_ejection_ms),
        max_ejection_percent: o.max_ejection_percent.map_or(d.max_ejection_percent, |v| v.min(100)),
        min_health_percent: o.min_health_percent.map_or(d.min_health_percent, |v| v.min(100)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dr(yaml: &str) -> api::DestinationRuleSpec {
        serde_norway::from_str(yaml).unwrap()
    }

    #[test]
    fn the_seed_destination_rule_as_written() {
        let (p, issues) = compile(
            "default/reviews",
            "default/reviews",
            &dr("host: reviews
trafficPolicy:
  connectionPool:
    tcp: {maxConnections: 100}
    http: {http1MaxPendingRequests: 1, maxRequestsPerConnection: 2}
  outlierDetection: {consecutiveErrors: 7, interval: 5m, baseEjectionTime: 15m}
"),
        );
        assert!(issues.is_empty(), "{issues:?}");
        let p = p.unwrap();
        let c = &p.policy.connection_pool;
        assert_eq!(
            (
                c.max_connections,
                c.http1_max_pending_requests,
                c.max_requests_per_connection
            ),
            (Some(100), Some(1), Some(2))
        );
        let o = p.policy.outlier_detection.clone().unwrap();
        assert_eq!(
            (o.consecutive_5xx, o.consecutive_gateway),
            (None, Some(7)),
            "legacy: gateway errors"
        );
        assert_eq!((o.interval_ms, o.base_ejection_ms), (300_000, 900_000));
        assert_eq!(
            (o.max_ejection_percent, o.min_health_percent),
            (10, 0),
            "Istio's defaults"
        );
        assert_eq!(p.policy.load_balancer.algorithm, LbAlgorithm::LeastRequest);
    }

    #[test]
    fn layers_replace_whole_sections_in_istios_order() {
        let (p, issues) = compile(
            "default/r",
            "default/r",
            &dr("host: r
trafficPolicy:
  loadBalancer: {simple: ROUND_ROBIN}
  connectionPool: {tcp: {maxConnections: 10}}
  portLevelSettings:
    - port: {number: 9080}
      loadBalancer: {simple: RANDOM}
subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy:
      connectionPool: {http: {http2MaxRequests: 5}}
      portLevelSettings:
        - port: {number: 9443}
          loadBalancer:
            consistentHash: {httpHeaderName: X-User, maglev: {tableSize: 251}}
  - name: v2
    labels: {version: v2}
"),
        );
        assert!(issues.is_empty(), "{issues:?}");
        let p = p.unwrap();
        let alg = |s, port| p.effective(s, port).load_balancer.algorithm.clone();
        assert_eq!(alg(None, 80), LbAlgorithm::RoundRobin);
        assert_eq!(alg(None, 9080), LbAlgorithm::Random);
        assert_eq!(
            alg(Some("v2"), 9080),
            LbAlgorithm::Random,
            "no subset policy: the Service's"
        );
        assert_eq!(
            alg(Some("v1"), 9080),
            LbAlgorithm::Random,
            "the top port layer under the subset's"
        );
        assert_eq!(
            alg(Some("v1"), 9443),
            LbAlgorithm::ConsistentHash(ConsistentHash {
                key: HashKey::Header("x-user".into()),
                table: HashTable::Maglev { table_size: 251 },
            })
        );
        let v1 = &p.effective(Some("v1"), 80).connection_pool;
        assert_eq!(
            (v1.max_connections, v1.http2_max_requests),
            (None, Some(5)),
            "the subset's connectionPool replaces the whole section"
        );
    }

    #[test]
    fn connection_pool_fields_the_agents_enforce_are_not_reported() {
        let (p, issues) = compile(
            "default/r",
            "default/r",
            &dr("host: r
trafficPolicy:
  connectionPool:
    tcp:
      maxConnections: 1
      connectTimeout: 250ms
      tcpKeepalive: {probes: 3, time: 10s, interval: 5s}
    http:
      http1MaxPendingRequests: 1
      http2MaxRequests: 7
      maxRequestsPerConnection: 1
      maxRetries: 0
      idleTimeout: 2s
      maxConcurrentStreams: 4
      h2UpgradePolicy: DEFAULT
"),
        );
        assert!(issues.is_empty(), "{issues:?}");
        let c = p.unwrap().policy.connection_pool;
        assert_eq!(
            c,
            ConnectionPool {
                max_connections: Some(1),
                connect_timeout_ms: Some(250),
                tcp_keepalive: Some(TcpKeepalive {
                    probes: Some(3),
                    time_ms: Some(10_000),
                    interval_ms: Some(5_000),
                }),
                http1_max_pending_requests: Some(1),
                http2_max_requests: Some(7),
                max_requests_per_connection: Some(1),
                max_retries: None,
                idle_timeout_ms: Some(2_000),
                max_concurrent_streams: Some(4),
            },
            "maxRetries 0 is Istio's unset (unlimited)"
        );
        let (_, issues) = compile(
            "default/r",
            "default/r",
            &dr("host: r
trafficPolicy:
  connectionPool:
    tcp: {idleTimeout: 1h, maxConnectionDuration: 1h}
    http: {h2UpgradePolicy: UPGRADE}
"),
        );
        let fields: Vec<&str> = issues.iter().map(|i| i.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.trafficPolicy.connectionPool.tcp.maxConnectionDuration",
                "spec.trafficPolicy.connectionPool.tcp.idleTimeout",
                "spec.trafficPolicy.connectionPool.http.h2UpgradePolicy",
            ],
            "{issues:?}"
        );
    }

    #[test]
    fn refused_and_unenforced_fields_are_reported() {
        let (p, issues) = compile(
            "default/r",
            "default/r",
            &dr("host: r
trafficPolicy:
  loadBalancer:
    simple: RANDOM
    consistentHash: {}
    localityLbSetting: {distribute: [{from: a/*, to: {b/*: 100}}]}
  connectionPool: {tcp: {maxConnectionDuration: 1h}}
  outlierDetection: {maxEjectionPercent: 150}
  tls: {mode: DISABLE}
  portLevelSettings:
    - loadBalancer: {simple: RANDOM}
"),
        );
        let fields: Vec<&str> = issues.iter().map(|i| i.field.as_str()).collect();
        for f in [
            "spec.trafficPolicy.loadBalancer",
            "spec.trafficPolicy.loadBalancer.consistentHash",
            "spec.trafficPolicy.loadBalancer.localityLbSetting.distribute",
            "spec.trafficPolicy.connectionPool.tcp.maxConnectionDuration",
            "spec.trafficPolicy.outlierDetection.maxEjectionPercent",
            "spec.trafficPolicy.tls.mode",
            "spec.trafficPolicy.portLevelSettings[0].port",
        ] {
            assert!(fields.contains(&f), "{f}: {issues:?}");
        }
        let p = p.unwrap();
        assert_eq!(
            p.policy.load_balancer.algorithm,
            LbAlgorithm::LeastRequest,
            "no hash key"
        );
        assert_eq!(p.policy.outlier_detection.unwrap().max_ejection_percent, 100);
        let (none, issues) = compile("default/r", "default/r", &dr("host: r\nsubsets: [{name: v1}]\n"));
        assert!(none.is_none() && issues.is_empty(), "subsets only: no policy");
    }
}
