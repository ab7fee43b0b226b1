//! Prometheus metrics: Istio's standard TCP metrics (names and labels as in
//! Istio's published list, so existing dashboards work) and Ferry's own
//! `ferry_*`. Label sets are per workload pair and service, never per
//! connection; a connection looks its counters up once, when it is routed.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{atomic::AtomicU64, Arc},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{counter::ConstCounter, counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use ferry_model::{SpiffeId, Workload};

/// Istio's standard TCP labels (the ones a TCP connection can fill).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: String,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_cluster: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_cluster: String,
    pub request_protocol: String,
    pub response_flags: String,
    pub connection_security_policy: String,
}

pub const CLUSTER: &str = "Kubernetes";
/// DNS domain of services (`<svc>.<ns>.svc.<domain>`).
pub const CLUSTER_DOMAIN: &str = "cluster.local";
const UNKNOWN: &str = "unknown";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reporter {
    Source,
    Destination,
}

/// What is known about one side of a connection.
#[derive(Clone, Copy, Debug, Default)]
pub struct Peer<'a> {
    pub workload: Option<&'a Workload>,
    /// The identity that side proved (mutual TLS); plaintext: unknown.
    pub principal: Option<&'a SpiffeId>,
}

fn label<'a>(w: &'a Workload, keys: &[&str]) -> Option<&'a str> {
    keys.iter().find_map(|k| w.labels.get(*k).map(String::as_str))
}

struct Side {
    workload: String,
    namespace: String,
    principal: String,
    app: String,
    version: String,
    canonical_service: String,
    canonical_revision: String,
}

fn side(p: Peer<'_>) -> Side {
    match p.workload {
        None => Side {
            workload: UNKNOWN.into(),
            namespace: UNKNOWN.into(),
            principal: p.principal.map_or_else(|| UNKNOWN.into(), SpiffeId::to_string),
            app: UNKNOWN.into(),
            version: UNKNOWN.into(),
            canonical_service: UNKNOWN.into(),
            canonical_revision: UNKNOWN.into(),
        },
        Some(w) => Side {
            workload: w.name.clone(),
            namespace: w.namespace.clone(),
            principal: p.principal.map_or_else(|| UNKNOWN.into(), SpiffeId::to_string),
            app: label(w, &["app", "app.kubernetes.io/name"]).unwrap_or(UNKNOWN).into(),
            version: label(w, &["version", "app.kubernetes.io/version"])
                .unwrap_or(UNKNOWN)
                .into(),
            canonical_service: label(w, &["service.istio.io/canonical-name", "app.kubernetes.io/name", "app"])
                .unwrap_or(&w.name)
                .into(),
            canonical_revision: label(
                w,
                &[
                    "service.istio.io/canonical-revision",
                    "app.kubernetes.io/version",
                    "version",
                ],
            )
            .unwrap_or("latest")
            .into(),
        },
    }
}

/// The label set of a connection (a pure function: tested below).
/// `service` is "namespace/name" when the client connected to a service VIP.
pub fn tcp_labels(reporter: Reporter, src: Peer<'_>, dst: Peer<'_>, service: Option<&str>, mtls: bool) -> TcpLabels {
    let (s, d) = (side(src), side(dst));
    let (svc_ns, svc_name) = service.and_then(|s| s.split_once('/')).unwrap_or((UNKNOWN, UNKNOWN));
    let destination_service = match service {
        Some(_) => format!("{svc_name}.{svc_ns}.svc.{CLUSTER_DOMAIN}"),
        None => UNKNOWN.into(),
    };
    TcpLabels {
        reporter: match reporter {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
        .into(),
        source_workload: s.workload,
        source_workload_namespace: s.namespace,
        source_principal: s.principal,
        source_app: s.app,
        source_version: s.version,
        source_canonical_service: s.canonical_service,
        source_canonical_revision: s.canonical_revision,
        source_cluster: CLUSTER.into(),
        destination_workload: d.workload,
        destination_workload_namespace: d.namespace,
        destination_principal: d.principal,
        destination_app: d.app,
        destination_version: d.version,
        destination_service,
        destination_service_name: svc_name.into(),
        destination_service_namespace: svc_ns.into(),
        destination_canonical_service: d.canonical_service,
        destination_canonical_revision: d.canonical_revision,
        destination_cluster: CLUSTER.into(),
        request_protocol: "tcp".into(),
        response_flags: "-".into(),
        connection_security_policy: if mtls { "mutual_tls" } else { "none" }.into(),
    }
}

/// The four TCP counters of one label set, looked up once per connection.
#[derive(Clone, Debug)]
pub struct TcpCounters {
    pub opened: Counter,
    pub closed: Counter,
    /// Istio: bytes sent in the response direction (destination -> source).
    pub sent: Counter,
    /// Istio: bytes received in the request direction (source -> destination).
    pub received: Counter,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    opened: Family<TcpLabels, Counter>,
    closed: Family<TcpLabels, Counter>,
    sent: Family<TcpLabels, Counter>,
    received: Family<TcpLabels, Counter>,
    pub config_version: Gauge,
    pub config_rejected: Counter,
    pub enrolled_pods: Gauge,
    pub enroll_errors: Gauge,
    /// 1 while the config stream from the control plane is up.
    pub control_connected: Gauge,
    /// Request metrics of the L7 path and protocol detection.
    pub http: super::http::HttpMetrics,
}

/// eBPF-side counters, read from the node's pinned maps at scrape time.
#[derive(Debug)]
struct EbpfCollector {
    pin_root: PathBuf,
    node: String,
}

impl Collector for EbpfCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Ok(p) = ferry_ebpf::pinned::Pinned::open(&self.pin_root, &self.node) else {
            return Ok(());
        };
        let Ok(stats) = p.stats() else { return Ok(()) };
        for (name, v) in stats {
            const_counter(
                &mut enc,
                &format!("ferry_ebpf_{name}"),
                &format!("eBPF counter {name}"),
                v,
            )?;
        }
        Ok(())
    }
}

/// Encodes one unlabelled counter read at scrape time (shared by every collector).
pub fn const_counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(v);
    let m = enc.encode_descriptor(name, help, None, c.metric_type())?;
    c.encode(m)
}

/// Proxy-side counters that live in `Counters` (no per-label state).
#[derive(Debug)]
struct ProxyCollector(Arc<super::Counters>);

impl Collector for ProxyCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let load = |a: &AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        let c = &self.0;
        let rows: BTreeMap<&str, (u64, &str)> = [
            (
                "ferry_outbound_connections",
                (load(&c.outbound_opened), "outbound connections accepted"),
            ),
            (
                "ferry_inbound_connections",
                (load(&c.inbound_opened), "plaintext inbound connections accepted"),
            ),
            (
                "ferry_tunnel_connections",
                (load(&c.tunnel_opened), "tunnel connections accepted from other nodes"),
            ),
            (
                "ferry_connection_failures",
                (load(&c.failed), "connections that ended in an error"),
            ),
            (
                "ferry_no_orig_dst",
                (
                    load(&c.no_orig_dst),
                    "accepted connections with no recorded original destination",
                ),
            ),
            (
                "ferry_inbound_refused",
                (load(&c.refused), "inbound connections refused by the inbound gate"),
            ),
            (
                "ferry_inbound_refused_plaintext",
                (
                    load(&c.refused_plaintext),
                    "plaintext inbound refused under STRICT mTLS",
                ),
            ),
        ]
        .into_iter()
        .collect();
        for (name, (v, help)) in rows {
            const_counter(&mut enc, name, help, v)?;
        }
        Ok(())
    }
}

impl Metrics {
    pub fn new(pin_root: PathBuf, node: String, counters: Arc<super::Counters>) -> Self {
        let mut registry = Registry::default();
        let (opened, closed, sent, received) = (
            Family::default(),
            Family::default(),
            Family::default(),
            Family::default(),
        );
        // prometheus-client appends `_total` to counters.
        registry.register("istio_tcp_connections_opened", "TCP connections opened", opened.clone());
        registry.register("istio_tcp_connections_closed", "TCP connections closed", closed.clone());
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent in the response direction",
            sent.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received in the request direction",
            received.clone(),
        );
        let http = super::http::HttpMetrics::register(&mut registry);
        let m = Self {
            http,
            opened,
            closed,
            sent,
            received,
            config_version: Gauge::default(),
            config_rejected: Counter::default(),
            enrolled_pods: Gauge::default(),
            enroll_errors: Gauge::default(),
            control_connected: Gauge::default(),
            registry,
        };
        let mut registry = m.registry;
        registry.register(
            "ferry_config_version",
            "Version of the config last applied",
            m.config_version.clone(),
        );
        registry.register(
            "ferry_config_rejected",
            "Config updates rejected (last good kept)",
            m.config_rejected.clone(),
        );
        registry.register(
            "ferry_enrolled_pods",
            "Pods captured on this node",
            m.enrolled_pods.clone(),
        );
        registry.register(
            "ferry_enroll_errors",
            "Pods that asked to be enrolled but could not be",
            m.enroll_errors.clone(),
        );
        registry.register(
            "ferry_control_connected",
            "1 while the config stream from the control plane is up",
            m.control_connected.clone(),
        );
        registry.register_collector(Box::new(EbpfCollector { pin_root, node }));
        registry.register_collector(Box::new(ProxyCollector(counters)));
        Self { registry, ..m }
    }

    /// For other parts of the agent to register their own metrics (the
    /// tunnel, identities), before the metrics are shared.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    pub fn tcp(&self, labels: &TcpLabels) -> TcpCounters {
        TcpCounters {
            opened: self.opened.get_or_create(labels).clone(),
            closed: self.closed.get_or_create(labels).clone(),
            sent: self.sent.get_or_create(labels).clone(),
            received: self.received.get_or_create(labels).clone(),
        }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut s = String::new();
        if prometheus_client::encoding::text::encode(&mut s, &self.registry).is_err() {
            s.clear();
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(name: &str, ns: &str, sa: &str, app: &str) -> Workload {
        ferry_model::ConfigFile::parse(
            "t",
            &format!("node: n\nworkloads: [{{uid: u, name: {name}, namespace: {ns}, serviceAccount: {sa}, node: n, ip: 10.0.0.1, labels: {{app: {app}}}}}]"),
        )
        .unwrap()
        .workloads
        .remove(0)
    }

    #[test]
    fn labels_follow_istio_conventions() {
        let (a, b) = (
            w("client-7d", "shop", "client", "client"),
            w("echo-1", "default", "echo", "echo"),
        );
        let l = tcp_labels(
            Reporter::Source,
            Peer {
                workload: Some(&a),
                principal: Some(&a.spiffe_id()),
            },
            Peer {
                workload: Some(&b),
                principal: Some(&b.spiffe_id()),
            },
            Some("default/echo"),
            true,
        );
        assert_eq!(l.reporter, "source");
        assert_eq!(l.source_principal, "spiffe://cluster.local/ns/shop/sa/client");
        assert_eq!(l.destination_service, "echo.default.svc.cluster.local");
        assert_eq!(
            (
                l.destination_service_name.as_str(),
                l.destination_service_namespace.as_str()
            ),
            ("echo", "default")
        );
        assert_eq!(
            (
                l.source_canonical_service.as_str(),
                l.source_canonical_revision.as_str()
            ),
            ("client", "latest")
        );
        assert_eq!(l.connection_security_policy, "mutual_tls");
        let plain = tcp_labels(
            Reporter::Destination,
            Peer::default(),
            Peer {
                workload: Some(&b),
                principal: None,
            },
            None,
            false,
        );
        assert_eq!(
            (plain.source_workload.as_str(), plain.destination_principal.as_str()),
            ("unknown", "unknown")
        );
        assert_eq!(
            (
                plain.destination_service.as_str(),
                plain.connection_security_policy.as_str()
            ),
            ("unknown", "none")
        );
    }
}
