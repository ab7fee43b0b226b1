//! Prometheus metrics: Istio's standard TCP metrics (names and labels as in
//! Istio's published list, so existing dashboards work) and Ferry's own
//! `ferry_*`. Label sets are per workload pair and service, never per
//! connection; a connection looks its counters up once, when it is routed.
//! `*_workload` is the workload as Istio names it (the pod's Deployment,
//! StatefulSet...: [`Workload::workload_name`]), and the series that name a
//! workload are removed when it leaves the config ([`Metrics::forget_departed`]),
//! so rollouts do not grow them without end.

use std::{
    collections::{BTreeMap, HashSet},
    hash::Hash,
    path::PathBuf,
    sync::{atomic::AtomicU64, Arc, Mutex, RwLock},
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

/// The labels one side of a connection gets from its workload (all
/// `unknown` without one): what names a workload in a series.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct WorkloadLabels {
    workload: String,
    namespace: String,
    app: String,
    version: String,
    canonical_service: String,
    canonical_revision: String,
}

impl WorkloadLabels {
    fn of(w: Option<&Workload>) -> Self {
        match w {
            None => Self {
                workload: UNKNOWN.into(),
                namespace: UNKNOWN.into(),
                app: UNKNOWN.into(),
                version: UNKNOWN.into(),
                canonical_service: UNKNOWN.into(),
                canonical_revision: UNKNOWN.into(),
            },
            Some(w) => Self {
                workload: w.workload_name().into(),
                namespace: w.namespace.clone(),
                app: w
                    .first_label(&["app", "app.kubernetes.io/name"])
                    .unwrap_or(UNKNOWN)
                    .into(),
                version: w
                    .first_label(&["version", "app.kubernetes.io/version"])
                    .unwrap_or(UNKNOWN)
                    .into(),
                canonical_service: w.canonical_service().into(),
                canonical_revision: w.canonical_revision().into(),
            },
        }
    }

    fn is_unknown(&self) -> bool {
        self.workload == UNKNOWN && self.namespace == UNKNOWN
    }
}

impl TcpLabels {
    fn source(&self) -> WorkloadLabels {
        WorkloadLabels {
            workload: self.source_workload.clone(),
            namespace: self.source_workload_namespace.clone(),
            app: self.source_app.clone(),
            version: self.source_version.clone(),
            canonical_service: self.source_canonical_service.clone(),
            canonical_revision: self.source_canonical_revision.clone(),
        }
    }

    fn destination(&self) -> WorkloadLabels {
        WorkloadLabels {
            workload: self.destination_workload.clone(),
            namespace: self.destination_workload_namespace.clone(),
            app: self.destination_app.clone(),
            version: self.destination_version.clone(),
            canonical_service: self.destination_canonical_service.clone(),
            canonical_revision: self.destination_canonical_revision.clone(),
        }
    }
}

/// The workloads a config names, as series name them: a label set is kept
/// while each of its sides is `unknown` or one of these.
#[derive(Debug, Default)]
pub struct LiveWorkloads(HashSet<WorkloadLabels>);

impl LiveWorkloads {
    pub fn new<'a>(workloads: impl IntoIterator<Item = &'a Workload>) -> Self {
        Self(workloads.into_iter().map(|w| WorkloadLabels::of(Some(w))).collect())
    }

    /// Whether every workload `l` names is still here.
    pub fn keeps(&self, l: &TcpLabels) -> bool {
        [l.source(), l.destination()]
            .iter()
            .all(|s| s.is_unknown() || self.0.contains(s))
    }
}

/// The label sets of some families, so their series can be removed by
/// what they name (prometheus-client's `Family` cannot be iterated).
#[derive(Debug)]
pub struct LabelSets<L> {
    /// Recording holds it shared, pruning alone: a series is never removed
    /// between a recorder's check and its creation (which would leave it
    /// created but untracked, never pruned).
    gate: RwLock<()>,
    seen: Mutex<HashSet<L>>,
}

impl<L> Default for LabelSets<L> {
    fn default() -> Self {
        Self {
            gate: RwLock::default(),
            seen: Mutex::default(),
        }
    }
}

impl<L: Clone + Hash + Eq> LabelSets<L> {
    /// Runs `create` (which creates `l`'s series where missing), tracking
    /// `l` when `exists` says its series did not exist yet.
    pub fn record<R>(&self, l: &L, exists: impl FnOnce() -> bool, create: impl FnOnce() -> R) -> R {
        let _g = self.gate.read().unwrap_or_else(|e| e.into_inner());
        if !exists() {
            self.seen.lock().unwrap_or_else(|e| e.into_inner()).insert(l.clone());
        }
        create()
    }

    /// Calls `remove` for every tracked label set `keep` refuses, and
    /// forgets it. Returns how many.
    pub fn prune(&self, keep: impl Fn(&L) -> bool, remove: impl Fn(&L)) -> usize {
        let _g = self.gate.write().unwrap_or_else(|e| e.into_inner());
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let before = seen.len();
        seen.retain(|l| {
            let k = keep(l);
            if !k {
                remove(l);
            }
            k
        });
        before - seen.len()
    }

    /// How many label sets are tracked.
    pub fn len(&self) -> usize {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The label set of a connection (a pure function: tested below).
/// `service` is "namespace/name" when the client connected to a service VIP.
pub fn tcp_labels(reporter: Reporter, src: Peer<'_>, dst: Peer<'_>, service: Option<&str>, mtls: bool) -> TcpLabels {
    let (s, d) = (WorkloadLabels::of(src.workload), WorkloadLabels::of(dst.workload));
    let principal = |p: Peer<'_>| p.principal.map_or_else(|| UNKNOWN.into(), SpiffeId::to_string);
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
        source_principal: principal(src),
        source_app: s.app,
        source_version: s.version,
        source_canonical_service: s.canonical_service,
        source_canonical_revision: s.canonical_revision,
        source_cluster: CLUSTER.into(),
        destination_workload: d.workload,
        destination_workload_namespace: d.namespace,
        destination_principal: principal(dst),
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
    /// Every label set of the four TCP families.
    tcp_sets: LabelSets<TcpLabels>,
    pub config_version: Gauge,
    pub config_rejected: Counter,
    pub enrolled_pods: Gauge,
    pub enroll_errors: Gauge,
    /// Enrollments retried after a failure (backoff, or a new sandbox).
    pub enroll_retries: Counter,
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

/// Encodes one unlabelled gauge read at scrape time (shared by every collector).
pub fn const_gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> Result<(), std::fmt::Error> {
    let g = prometheus_client::metrics::gauge::ConstGauge::new(v);
    let m = enc.encode_descriptor(name, help, None, g.metric_type())?;
    g.encode(m)
}

/// Proxy-side counters that live in `Counters` (no per-label state), and
/// the allocator's heap gauges.
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
        heap(&mut enc)
    }
}

/// The allocator's view of the heap (glibc): bytes in use by the agent and
/// bytes the allocator holds from the system, so RSS that stays up after a
/// burst reads as fragmentation (held, not in use) or as memory still in
/// use.
#[cfg(target_env = "gnu")]
fn heap(enc: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    let m = unsafe { libc::mallinfo2() };
    let in_use = (m.uordblks + m.hblkhd) as i64;
    const_gauge(
        enc,
        "ferry_heap_in_use_bytes",
        "heap bytes allocated and in use (glibc mallinfo2)",
        in_use,
    )?;
    const_gauge(
        enc,
        "ferry_heap_held_bytes",
        "heap bytes the allocator holds from the system, in use or free (glibc mallinfo2)",
        (m.arena + m.hblkhd) as i64,
    )
}

#[cfg(not(target_env = "gnu"))]
fn heap(_: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
    Ok(())
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
            tcp_sets: LabelSets::default(),
            config_version: Gauge::default(),
            config_rejected: Counter::default(),
            enrolled_pods: Gauge::default(),
            enroll_errors: Gauge::default(),
            enroll_retries: Counter::default(),
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
            "ferry_enroll_retries",
            "Enrollments retried after a failure, without a config change",
            m.enroll_retries.clone(),
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
        self.tcp_sets.record(
            labels,
            || self.opened.get(labels).is_some(),
            || TcpCounters {
                opened: self.opened.get_or_create(labels).clone(),
                closed: self.closed.get_or_create(labels).clone(),
                sent: self.sent.get_or_create(labels).clone(),
                received: self.received.get_or_create(labels).clone(),
            },
        )
    }

    /// Removes every TCP and request series that names a workload no
    /// longer in `live` (a departed pod's workload, or one whose labels
    /// changed); returns how many label sets went. A connection still open
    /// on a removed series counts on, unseen; a new one starts it afresh
    /// (a counter reset, which Prometheus handles).
    pub fn forget_departed(&self, live: &LiveWorkloads) -> usize {
        let tcp = self.tcp_sets.prune(
            |l| live.keeps(l),
            |l| {
                for f in [&self.opened, &self.closed, &self.sent, &self.received] {
                    f.remove(l);
                }
            },
        );
        tcp + self.http.forget_departed(live)
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
    fn series_are_kept_while_the_workloads_they_name_are_live() {
        let named = |name: &str, workload: &str, app: &str| {
            let mut x = w(name, "shop", "sa", app);
            x.workload_name = Some(workload.into());
            x
        };
        let (client, v1, v2) = (
            named("client-7d-x", "client", "client"),
            named("reviews-v1-6f-a", "reviews-v1", "reviews"),
            named("reviews-v2-5c-b", "reviews-v2", "reviews"),
        );
        let peer = |w| Peer {
            workload: Some(w),
            principal: None,
        };
        let to = |d| tcp_labels(Reporter::Source, peer(&client), peer(d), None, false);
        assert_eq!(to(&v1).destination_workload, "reviews-v1", "the workload, not the pod");
        assert_eq!(to(&v1).source_canonical_service, "client");
        let from_outside = tcp_labels(Reporter::Destination, Peer::default(), peer(&v1), None, false);
        // A rollout (a new pod of reviews-v1) keeps its series; reviews-v2 left.
        let rolled = named("reviews-v1-6f-z", "reviews-v1", "reviews");
        let live = LiveWorkloads::new([&client, &rolled]);
        assert!(live.keeps(&to(&v1)) && live.keeps(&from_outside));
        assert!(!live.keeps(&to(&v2)));
        // A workload whose labels changed names other series: the old go.
        let relabelled = named("reviews-v1-6f-z", "reviews-v1", "ratings");
        assert!(!LiveWorkloads::new([&client, &relabelled]).keeps(&to(&v1)));
        // Pruning removes exactly those, from every family.
        let m = Metrics::new("/nonexistent".into(), "n".into(), Arc::default());
        for l in [to(&v1), to(&v2), from_outside.clone()] {
            m.tcp(&l).opened.inc();
        }
        assert_eq!(m.forget_departed(&live), 1);
        let text = m.encode();
        assert!(!text.contains("reviews-v2") && text.contains("reviews-v1"), "{text}");
        assert_eq!(m.tcp_sets.len(), 2);
        assert_eq!(m.forget_departed(&live), 0, "nothing more to prune");
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
