//! Live connections and counters, Prometheus metrics ([`metrics`]), the
//! per-request records of the L7 path ([`http`]), their spans ([`trace`]) and the
//! access-log line written when a connection closes (the policy in
//! `ferry_model::access_log` decides which). Nothing here is per byte: byte counts are atomics updated by the
//! copy loop and added to the metrics once, when the connection closes.

pub mod http;
pub mod metrics;
pub mod outcome;
pub mod outlier;
pub mod trace;

use std::{
    collections::HashMap,
    net::SocketAddrV4,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, OnceLock,
    },
    time::Instant,
};

pub use ferry_model::admin::Direction;
use ferry_model::{
    access_log::AccessLog,
    admin::{ConnView, Stats},
    admission::Refusal,
    state::Hop,
    SpiffeId,
};
use metrics::{Metrics, TcpCounters, TcpLabels};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
};

use outcome::{Denial, Outcome};

/// One proxied connection, shared between its copy task and the admin views.
#[derive(Debug)]
pub struct Conn {
    pub id: u64,
    pub direction: Direction,
    /// Source workload (namespace/name) or client address.
    pub source: String,
    pub client: SocketAddrV4,
    /// What the app connected to (outbound) or the pod address it reached (inbound).
    pub orig_dst: SocketAddrV4,
    /// Set once the route is chosen.
    pub route: OnceLock<Routed>,
    /// The peer's proven SPIFFE id: the destination's (outbound through the
    /// tunnel) or the source's (inbound from the tunnel).
    pub peer_identity: OnceLock<SpiffeId>,
    /// Bytes from the client towards the destination.
    pub sent: AtomicU64,
    /// Bytes from the destination back to the client.
    pub received: AtomicU64,
    pub started: Instant,
    /// Closes the connection from outside its task (a policy change).
    pub revoke: Revoke,
    /// Served per request by the destination's HTTP layer (its port is an
    /// HTTP Service port): each request is decided when it arrives, so a
    /// live re-check leaves it alone unless it carries an upgraded stream.
    pub http: AtomicBool,
    /// An HTTP/1.1 upgrade (WebSocket) turned it into a byte stream: a live
    /// re-check closes it when the new policies deny every request it could
    /// carry.
    pub upgraded: AtomicBool,
}

/// A live connection's kill switch: the first [`Revoke::revoke`] keeps its
/// reason and wakes every [`Revoke::revoked`] (now or whenever it is
/// awaited; a connection may wait in several tasks, e.g. an HTTP server and
/// an upgraded stream).
#[derive(Debug, Default)]
pub struct Revoke {
    reason: OnceLock<Denial>,
    wake: tokio::sync::Notify,
}

impl Revoke {
    /// Asks the connection to close for `why`; false if already asked.
    pub fn revoke(&self, why: Denial) -> bool {
        let first = self.reason.set(why).is_ok();
        if first {
            self.wake.notify_waiters();
        }
        first
    }

    /// The reason, once revoked.
    pub fn reason(&self) -> Option<&Denial> {
        self.reason.get()
    }

    /// Resolves once revoked, with the reason.
    pub async fn revoked(&self) -> Denial {
        loop {
            // Registered before the check, so a revoke in between still wakes it.
            let notified = self.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(d) = self.reason.get() {
                return d.clone();
            }
            notified.await;
        }
    }
}

/// Labels of `ferry_authz_denied_total` and `ferry_authz_audited_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthzLabels {
    /// `namespace/name`, or `-` when no single policy decided.
    pub policy: String,
    /// The deny reason's code (`matched_deny`, ...); `audit` for AUDIT.
    pub reason: String,
}

/// Labels of `ferry_connections_refused_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    /// `pod_limit` (`settings.maxConnectionsPerPod`) or `agent_limit`
    /// (`settings.maxConnectionsPerAgent`).
    pub reason: &'static str,
}

/// Labels of `ferry_accept_errors_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AcceptLabels {
    /// `outbound`, `inbound` or `tunnel`.
    pub listener: &'static str,
    /// `emfile` (this process is out of file descriptors), `enfile` (the
    /// system is), `other` (ENOBUFS, ENOMEM, ...; the log has the error).
    pub reason: &'static str,
}

impl AcceptLabels {
    /// The bounded reason of an `accept(2)` error.
    pub fn reason_of(e: &std::io::Error) -> &'static str {
        match e.raw_os_error() {
            Some(libc::EMFILE) => "emfile",
            Some(libc::ENFILE) => "enfile",
            _ => "other",
        }
    }
}

/// Labels of `ferry_rate_limited_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RateLimitLabels {
    /// The limited Service as Istio names it (`name.namespace.svc.cluster.local`).
    pub destination_service: String,
    /// The RateLimitPolicy, `namespace/name`.
    pub policy: String,
    /// The limit that refused: `total`, `identity` or `override`.
    pub scope: &'static str,
}

#[derive(Clone, Debug)]
pub struct Routed {
    pub service: Option<String>,
    pub endpoint: SocketAddrV4,
    pub hop: Hop,
}

impl Conn {
    pub fn view(&self) -> ConnView {
        let r = self.route.get();
        ConnView {
            id: self.id,
            direction: self.direction,
            source: self.source.clone(),
            client: self.client.to_string(),
            orig_dst: self.orig_dst.to_string(),
            service: r.and_then(|r| r.service.clone()),
            endpoint: r.map(|r| r.endpoint.to_string()),
            hop: r.map(|r| r.hop),
            peer_identity: self.peer_identity.get().cloned(),
            sent: self.sent.load(Ordering::Relaxed),
            received: self.received.load(Ordering::Relaxed),
            age_ms: self.started.elapsed().as_millis() as u64,
        }
    }
}

#[derive(Default, Debug)]
pub struct Counters {
    pub outbound_opened: AtomicU64,
    pub inbound_opened: AtomicU64,
    pub tunnel_opened: AtomicU64,
    pub closed: AtomicU64,
    pub failed: AtomicU64,
    pub no_orig_dst: AtomicU64,
    /// Inbound connections the gate refused.
    pub refused: AtomicU64,
    /// Of those, plaintext refused because the workload is STRICT.
    pub refused_plaintext: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub hop_local: AtomicU64,
    pub hop_tunnel: AtomicU64,
    pub hop_direct: AtomicU64,
}

impl Counters {
    /// The `/stats` view.
    pub fn snapshot(&self) -> Stats {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            outbound_opened: l(&self.outbound_opened),
            inbound_opened: l(&self.inbound_opened),
            tunnel_opened: l(&self.tunnel_opened),
            closed: l(&self.closed),
            failed: l(&self.failed),
            no_orig_dst: l(&self.no_orig_dst),
            refused: l(&self.refused),
            refused_plaintext: l(&self.refused_plaintext),
            bytes_sent: l(&self.bytes_sent),
            bytes_received: l(&self.bytes_received),
            hop_local: l(&self.hop_local),
            hop_tunnel: l(&self.hop_tunnel),
            hop_direct: l(&self.hop_direct),
        }
    }
}

pub struct Telemetry {
    next: AtomicU64,
    /// Request ids (the L7 path), apart from connection ids.
    next_request: AtomicU64,
    live: Mutex<HashMap<u64, Arc<Conn>>>,
    pub counters: Arc<Counters>,
    pub metrics: Metrics,
    pub access_log: std::sync::RwLock<AccessLog>,
    /// `settings.metrics`.
    pub metrics_on: std::sync::atomic::AtomicBool,
    /// Connections and HTTP requests denied by authorization policy, by
    /// policy and reason.
    pub authz_denied: Family<AuthzLabels, Counter>,
    /// Connections and HTTP requests an AUDIT policy matched (never
    /// denied), by policy.
    pub authz_audited: Family<AuthzLabels, Counter>,
    /// Spans of the L7 path and their exporter (`settings.tracing`).
    pub tracer: trace::Tracer,
    /// Connections closed as accepted because a connection limit was
    /// reached, by limit.
    pub connections_refused: Family<LimitLabels, Counter>,
    /// `accept(2)` failures on the per-pod listeners, by listener and
    /// reason (the accept loop backs off and retries).
    pub accept_errors: Family<AcceptLabels, Counter>,
    /// HTTP requests answered 429 by a RateLimitPolicy at the destination.
    pub rate_limited: Family<RateLimitLabels, Counter>,
    /// Outlier detection's ejections (`proxy::balance`).
    pub outlier: outlier::OutlierMetrics,
}

/// Removes the connection from the live table and writes its access log line
/// when dropped, whatever way the connection ends.
pub struct ConnGuard {
    t: Arc<Telemetry>,
    pub conn: Arc<Conn>,
    /// How the connection ended; `Ok` unless set otherwise.
    pub outcome: Outcome,
    tcp: Vec<TcpCounters>,
    log: bool,
}

impl Telemetry {
    /// `metrics` was made with [`Metrics::new`] over `counters`.
    pub fn new(mut metrics: Metrics, counters: Arc<Counters>) -> Self {
        let (authz_denied, authz_audited) = (Family::default(), Family::default());
        let r = metrics.registry_mut();
        r.register(
            "ferry_authz_denied",
            "Connections (when opened or cut live) and HTTP requests denied by authorization policy, by policy and reason",
            Family::<AuthzLabels, Counter>::clone(&authz_denied),
        );
        r.register(
            "ferry_authz_audited",
            "Connections and HTTP requests an AUDIT authorization policy matched, by policy",
            Family::<AuthzLabels, Counter>::clone(&authz_audited),
        );
        let connections_refused = Family::default();
        r.register(
            "ferry_connections_refused",
            "Connections closed as accepted because a connection limit (per pod or per agent) was reached, by reason",
            Family::<LimitLabels, Counter>::clone(&connections_refused),
        );
        let accept_errors = Family::default();
        r.register(
            "ferry_accept_errors",
            "accept(2) failures on the per-pod listeners (EMFILE, ENFILE, other), by listener and reason; the accept loop backs off (10 ms to 1 s) and retries",
            Family::<AcceptLabels, Counter>::clone(&accept_errors),
        );
        let rate_limited = Family::default();
        r.register(
            "ferry_rate_limited",
            "HTTP requests refused (429, flag RL) by a RateLimitPolicy at the destination, by Service, policy and limit",
            Family::<RateLimitLabels, Counter>::clone(&rate_limited),
        );
        let outlier = outlier::OutlierMetrics::register(r);
        let tracer = trace::Tracer::new(r);
        Self {
            outlier,
            rate_limited,
            accept_errors,
            connections_refused,
            tracer,
            authz_denied,
            authz_audited,
            next: AtomicU64::new(0),
            next_request: AtomicU64::new(0),
            live: Mutex::new(HashMap::new()),
            metrics,
            counters,
            access_log: Default::default(),
            metrics_on: true.into(),
        }
    }

    /// A new live connection. `namespace` picks the access-log policy.
    pub fn open(
        self: &Arc<Self>,
        direction: Direction,
        namespace: &str,
        source: String,
        client: SocketAddrV4,
        orig_dst: SocketAddrV4,
    ) -> ConnGuard {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let c = match direction {
            Direction::Outbound => &self.counters.outbound_opened,
            Direction::Inbound => &self.counters.inbound_opened,
            Direction::Tunnel => &self.counters.tunnel_opened,
        };
        c.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            id,
            direction,
            source,
            client,
            orig_dst,
            route: OnceLock::new(),
            peer_identity: OnceLock::new(),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            started: Instant::now(),
            revoke: Revoke::default(),
            http: AtomicBool::new(false),
            upgraded: AtomicBool::new(false),
        });
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, conn.clone());
        let log = self
            .access_log
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .should_log(namespace, id);
        ConnGuard {
            t: self.clone(),
            conn,
            outcome: Outcome::Ok,
            tcp: Vec::new(),
            log,
        }
    }

    /// Counts a denial (a connection's or an HTTP request's) in
    /// `ferry_authz_denied_total`.
    pub fn count_denial(&self, d: &Denial) {
        self.authz_denied
            .get_or_create(&AuthzLabels {
                policy: d.policy_label().to_owned(),
                reason: d.reason.as_str().to_owned(),
            })
            .inc();
    }

    /// Counts an AUDIT policy's match (the connection or request goes on).
    pub fn count_audit(&self, policy: String) {
        self.authz_audited
            .get_or_create(&AuthzLabels {
                policy,
                reason: "audit".into(),
            })
            .inc();
    }

    pub fn live(&self) -> Vec<Arc<Conn>> {
        let mut v: Vec<_> = self
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by_key(|c| c.id);
        v
    }
}

impl ConnGuard {
    /// Records where the connection goes, once decided.
    pub fn routed(&mut self, service: Option<String>, endpoint: SocketAddrV4, hop: Hop) {
        let c = &self.t.counters;
        match hop {
            Hop::Local => &c.hop_local,
            Hop::Tunnel => &c.hop_tunnel,
            Hop::Direct => &c.hop_direct,
        }
        .fetch_add(1, Ordering::Relaxed);
        let _ = self.conn.route.set(Routed { service, endpoint, hop });
    }

    /// Counts an AUDIT policy's match (the connection goes on).
    pub fn audited(&self, policy: String) {
        self.t.count_audit(policy);
    }

    /// Counts this connection in the Istio TCP metrics under `labels` (once
    /// per reporter: a same-node connection is reported by both sides).
    pub fn report(&mut self, labels: &TcpLabels) {
        if !self.t.metrics_on.load(Ordering::Relaxed) {
            return;
        }
        let c = self.t.metrics.tcp(labels);
        c.opened.inc();
        self.tcp.push(c);
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let c = &self.conn;
        self.t.live.lock().unwrap_or_else(|e| e.into_inner()).remove(&c.id);
        let (sent, received) = (c.sent.load(Ordering::Relaxed), c.received.load(Ordering::Relaxed));
        let k = &self.t.counters;
        k.closed.fetch_add(1, Ordering::Relaxed);
        k.bytes_sent.fetch_add(sent, Ordering::Relaxed);
        k.bytes_received.fetch_add(received, Ordering::Relaxed);
        match &self.outcome {
            Outcome::Ok => {}
            Outcome::Refused(r) => {
                k.refused.fetch_add(1, Ordering::Relaxed);
                if *r == Refusal::PlaintextToStrict {
                    k.refused_plaintext.fetch_add(1, Ordering::Relaxed);
                }
                k.failed.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Denied(d) => {
                if !d.live {
                    k.refused.fetch_add(1, Ordering::Relaxed);
                }
                k.failed.fetch_add(1, Ordering::Relaxed);
                self.t.count_denial(d);
            }
            _ => {
                k.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        for t in &self.tcp {
            t.closed.inc();
            t.received.inc_by(sent);
            t.sent.inc_by(received);
        }
        if !self.log {
            return;
        }
        tracing::info!(
            target: "ferry::access",
            id = c.id,
            direction = %c.direction,
            source = %c.source,
            client = %c.client,
            orig_dst = %c.orig_dst,
            service = c.route.get().and_then(|r| r.service.as_deref()).unwrap_or("-"),
            endpoint = %c.route.get().map(|r| r.endpoint.to_string()).unwrap_or_else(|| "-".into()),
            hop = c.route.get().map_or("-", |r| r.hop.as_str()),
            peer_identity = %c.peer_identity.get().map_or_else(|| "-".to_owned(), SpiffeId::to_string),
            sent,
            received,
            duration_ms = c.started.elapsed().as_millis() as u64,
            outcome = self.outcome.code(),
            reason = %self.outcome,
            "connection closed"
        );
    }
}
