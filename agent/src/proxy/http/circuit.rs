//! Circuit breaking: a DestinationRule's `connectionPool`, applied per
//! client pod and per cluster (Service, port, subset), as each Istio
//! sidecar applies it to its own Envoy cluster.
//!
//! Invariants:
//! - A [`Breaker`] counts, for one (source pod, [`Cluster`]): upstream
//!   connections open (those being opened included), requests waiting for a
//!   connection (pending), requests in flight (each attempt, from the moment
//!   it has a connection until its response body ends) and retries in
//!   flight (from the decision to retry until that attempt's result).
//! - Counts move only through [`Slot`]s: taken with [`Circuit::try_take`]
//!   against the limits of the request's own snapshot (a config change
//!   applies to the next request), given back when dropped. A connection's
//!   slot lives in the task that drives the connection, so it is given back
//!   when the connection closes, whoever closes it.
//! - Over a limit nothing waits, except a request that needs a connection
//!   while `maxConnections` are open: it waits as pending (if
//!   `http1MaxPendingRequests` allows), woken by [`Breaker::freed`] when a
//!   connection closes, goes idle or ends an HTTP/2 stream, and never
//!   longer than [`PENDING_DEADLINE`].
//! - Breakers are found in a map of weak references: one lives while a slot
//!   holds it; a lookup after that starts again from zero, which is what its
//!   counts were.
//! - Every overflow is counted once, by the code that refuses, in
//!   `ferry_upstream_overflow_total{destination_service, reason}`.

use std::{
    collections::HashMap,
    fmt,
    future::Future,
    io,
    net::SocketAddrV4,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex, Weak,
    },
    time::Duration,
};

use ferry_model::{
    route::Backend,
    state::{Route, State},
    traffic::{ConnectionPool, TcpKeepalive},
};
use prometheus_client::metrics::counter::Counter;
use tokio::{net::TcpStream, sync::Notify};

use super::route::Dest;
use crate::telemetry::{metrics::CLUSTER_DOMAIN, Telemetry};

/// The longest a request waits as pending for a connection.
pub const PENDING_DEADLINE: Duration = Duration::from_secs(10);

/// What Envoy calls a cluster: the unit the limits apply to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Cluster {
    /// `namespace/name`.
    pub service: String,
    /// The Service port.
    pub port: u16,
    pub subset: Option<String>,
}

impl Cluster {
    /// `name.namespace.svc.cluster.local`, as Istio's `destination_service`.
    fn fqdn(&self) -> String {
        match self.service.split_once('/') {
            Some((ns, name)) => format!("{name}.{ns}.svc.{CLUSTER_DOMAIN}"),
            None => self.service.clone(),
        }
    }
}

/// Which limit stopped a request, retry or connection (the metric's `reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overflow {
    /// `http1MaxPendingRequests`: no room to wait for a connection.
    Pending,
    /// Waited [`PENDING_DEADLINE`] for a connection and got none.
    PendingTimeout,
    /// `http2MaxRequests`: requests in flight.
    Requests,
    /// `maxConnections` (opaque TCP: a new connection is refused).
    Connections,
    /// `maxRetries`: retries in flight.
    Retries,
}

impl Overflow {
    const ALL: [Overflow; 5] = [
        Overflow::Pending,
        Overflow::PendingTimeout,
        Overflow::Requests,
        Overflow::Connections,
        Overflow::Retries,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Overflow::Pending => "pending",
            Overflow::PendingTimeout => "pending_timeout",
            Overflow::Requests => "requests",
            Overflow::Connections => "connections",
            Overflow::Retries => "retries",
        }
    }
}

impl fmt::Display for Overflow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a [`Slot`] counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Connection,
    Pending,
    Request,
    Retry,
}

/// The counts of one (source pod, cluster).
#[derive(Debug)]
pub struct Breaker {
    cluster: Cluster,
    connections: AtomicU32,
    pending: AtomicU32,
    requests: AtomicU32,
    retries: AtomicU32,
    /// Woken when a connection closes or goes idle, or an HTTP/2 stream ends.
    pub freed: Notify,
    /// One counter per [`Overflow::ALL`].
    overflows: [Counter; 5],
}

impl Breaker {
    fn new(t: &Telemetry, cluster: Cluster) -> Self {
        let fqdn = cluster.fqdn();
        Self {
            overflows: Overflow::ALL.map(|o| t.metrics.http.overflow(fqdn.clone(), o.as_str())),
            cluster,
            connections: AtomicU32::new(0),
            pending: AtomicU32::new(0),
            requests: AtomicU32::new(0),
            retries: AtomicU32::new(0),
            freed: Notify::new(),
        }
    }

    fn count(&self, k: Kind) -> &AtomicU32 {
        match k {
            Kind::Connection => &self.connections,
            Kind::Pending => &self.pending,
            Kind::Request => &self.requests,
            Kind::Retry => &self.retries,
        }
    }

    /// The current count of `k` (for tests and views).
    pub fn load(&self, k: Kind) -> u32 {
        self.count(k).load(Ordering::Acquire)
    }
}

/// One unit of a [`Breaker`]'s count, given back when dropped.
#[derive(Debug)]
pub struct Slot {
    breaker: Arc<Breaker>,
    kind: Kind,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.breaker.count(self.kind).fetch_sub(1, Ordering::AcqRel);
        if self.kind == Kind::Connection {
            self.breaker.freed.notify_waiters();
        }
    }
}

/// A request's (or TCP connection's) breaker and the limits of its snapshot.
#[derive(Clone, Debug)]
pub struct Circuit {
    pub breaker: Arc<Breaker>,
    pub limits: ConnectionPool,
}

impl Circuit {
    pub fn cluster(&self) -> &Cluster {
        &self.breaker.cluster
    }

    /// A slot of `kind` if its limit allows one more (no limit: always).
    /// Pending slots are limited by `http1MaxPendingRequests`, connections
    /// by `maxConnections`, requests by `http2MaxRequests`, retries by
    /// `maxRetries`.
    pub fn try_take(&self, kind: Kind) -> Option<Slot> {
        let l = &self.limits;
        let limit = match kind {
            Kind::Connection => l.max_connections,
            Kind::Pending => l.http1_max_pending_requests,
            Kind::Request => l.http2_max_requests,
            Kind::Retry => l.max_retries,
        };
        let n = self.breaker.count(kind);
        let taken = match limit {
            None => {
                n.fetch_add(1, Ordering::AcqRel);
                true
            }
            Some(max) => n
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| (v < max).then_some(v + 1))
                .is_ok(),
        };
        taken.then(|| Slot {
            breaker: self.breaker.clone(),
            kind,
        })
    }

    /// Counts an overflow of this cluster; returns it.
    pub fn overflow(&self, o: Overflow) -> Overflow {
        if let Some(i) = Overflow::ALL.iter().position(|x| *x == o) {
            self.breaker.overflows[i].inc();
        }
        tracing::debug!(service = %self.breaker.cluster.service, port = self.breaker.cluster.port, reason = %o, "upstream overflow");
        o
    }

    /// `connectTimeout`, else `default`.
    pub fn connect_timeout(&self, default: Duration) -> Duration {
        self.limits.connect_timeout_ms.map_or(default, Duration::from_millis)
    }
}

/// The connect timeout of an optional circuit.
pub fn connect_timeout(c: Option<&Circuit>, default: Duration) -> Duration {
    c.map_or(default, |c| c.connect_timeout(default))
}

/// `open` within the circuit's `connectTimeout` (none set: as it is).
pub async fn within<T>(c: Option<&Circuit>, open: impl Future<Output = io::Result<T>>) -> io::Result<T> {
    match c.and_then(|c| c.limits.connect_timeout_ms) {
        Some(ms) => tokio::time::timeout(Duration::from_millis(ms), open)
            .await
            .unwrap_or_else(|_| {
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no connection within {ms} ms (connectTimeout)"),
                ))
            }),
        None => open.await,
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    /// The source pod's uid.
    source: String,
    cluster: Cluster,
}

/// Every breaker of an agent, by (source pod, cluster).
#[derive(Debug)]
pub struct Breakers {
    map: Mutex<(HashMap<Key, Weak<Breaker>>, usize)>,
}

impl Default for Breakers {
    fn default() -> Self {
        Self {
            map: Mutex::new((HashMap::new(), 64)),
        }
    }
}

impl Breakers {
    /// The circuit of a request from pod `source` (uid) to `backend` (its
    /// port, else the Service port the request was sent to; its subset)
    /// under `state`'s policy; None for a pod address, or when no
    /// `connectionPool` setting applies (nothing is counted then).
    pub fn for_request(
        &self,
        t: &Telemetry,
        state: &State,
        source: &str,
        backend: Option<&Backend>,
        dest: &Dest,
    ) -> Option<Circuit> {
        let (Some(b), Dest::Service { port, .. }) = (backend, dest) else {
            return None;
        };
        self.circuit(
            t,
            state,
            source,
            &b.service,
            b.port.unwrap_or(*port),
            b.subset.as_deref(),
        )
    }

    /// The circuit of traffic from `source` to (`service`, `port`,
    /// `subset`), if a `connectionPool` setting applies.
    fn circuit(
        &self,
        t: &Telemetry,
        state: &State,
        source: &str,
        service: &str,
        port: u16,
        subset: Option<&str>,
    ) -> Option<Circuit> {
        let limits = &state.traffic_policy(service)?.effective(subset, port).connection_pool;
        if *limits == ConnectionPool::default() {
            return None;
        }
        let cluster = Cluster {
            service: service.to_owned(),
            port,
            subset: subset.map(str::to_owned),
        };
        Some(Circuit {
            breaker: self.breaker(t, source, cluster),
            limits: limits.clone(),
        })
    }

    /// The circuit of an opaque TCP connection from pod `source` to
    /// `route` (sent to `orig`): the Service's policy for the port `orig`
    /// names (subsets' own policies do not apply to TCP).
    pub fn for_tcp(
        &self,
        t: &Telemetry,
        state: &State,
        source: &str,
        orig: SocketAddrV4,
        route: &Route,
    ) -> Option<Circuit> {
        let service = route.service.as_deref()?;
        let port = state.service_at(orig).map_or(orig.port(), |(_, p)| p.port);
        self.circuit(t, state, source, service, port, None)
    }

    fn breaker(&self, t: &Telemetry, source: &str, cluster: Cluster) -> Arc<Breaker> {
        let key = Key {
            source: source.to_owned(),
            cluster,
        };
        let mut g = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let (m, prune_at) = &mut *g;
        if let Some(b) = m.get(&key).and_then(Weak::upgrade) {
            return b;
        }
        if m.len() >= *prune_at {
            m.retain(|_, w| w.strong_count() > 0);
            *prune_at = (m.len() * 2).max(64);
        }
        let b = Arc::new(Breaker::new(t, key.cluster.clone()));
        m.insert(key, Arc::downgrade(&b));
        b
    }

    /// Breakers alive now (for tests and views).
    pub fn live(&self) -> usize {
        let g = self.map.lock().unwrap_or_else(|e| e.into_inner());
        g.0.values().filter(|w| w.strong_count() > 0).count()
    }
}

/// `tcpKeepalive` on an upstream socket: SO_KEEPALIVE, and the probe
/// count, idle time and interval that are set (the kernel's otherwise).
pub fn set_keepalive(s: &TcpStream, k: &TcpKeepalive) -> io::Result<()> {
    let mut ka = socket2::TcpKeepalive::new();
    if let Some(t) = k.time_ms {
        ka = ka.with_time(Duration::from_millis(t.max(1000)));
    }
    if let Some(i) = k.interval_ms {
        ka = ka.with_interval(Duration::from_millis(i.max(1000)));
    }
    if let Some(p) = k.probes {
        ka = ka.with_retries(p.max(1));
    }
    socket2::SockRef::from(s).set_tcp_keepalive(&ka)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::{metrics::Metrics, Counters};

    fn telemetry() -> Telemetry {
        let counters = Arc::new(Counters::default());
        Telemetry::new(
            Metrics::new("/nonexistent".into(), "n1".into(), counters.clone()),
            counters,
        )
    }

    fn circuit(t: &Telemetry, b: &Breakers, limits: ConnectionPool) -> Circuit {
        let cluster = Cluster {
            service: "default/r".into(),
            port: 80,
            subset: None,
        };
        Circuit {
            breaker: b.breaker(t, "pod-a", cluster),
            limits,
        }
    }

    #[test]
    fn slots_count_against_the_limit_and_come_back_when_dropped() {
        let (t, b) = (telemetry(), Breakers::default());
        let c = circuit(
            &t,
            &b,
            ConnectionPool {
                max_connections: Some(2),
                max_retries: Some(0),
                ..Default::default()
            },
        );
        let one = c.try_take(Kind::Connection).unwrap();
        let two = c.try_take(Kind::Connection).unwrap();
        assert!(c.try_take(Kind::Connection).is_none(), "at the limit");
        assert!(c.try_take(Kind::Retry).is_none(), "maxRetries 0: none");
        drop(one);
        assert_eq!(c.breaker.load(Kind::Connection), 1);
        let _three = c.try_take(Kind::Connection).expect("one came back");
        // Unlimited kinds always give a slot, and still count.
        let r = c.try_take(Kind::Request).unwrap();
        assert_eq!(c.breaker.load(Kind::Request), 1);
        drop((two, r));
        assert_eq!(c.breaker.load(Kind::Request), 0);
    }

    #[test]
    fn one_breaker_per_pod_and_cluster_while_held() {
        let (t, b) = (telemetry(), Breakers::default());
        let c1 = circuit(&t, &b, ConnectionPool::default());
        let c2 = circuit(&t, &b, ConnectionPool::default());
        assert!(Arc::ptr_eq(&c1.breaker, &c2.breaker));
        let other = b.breaker(
            &t,
            "pod-b",
            Cluster {
                service: "default/r".into(),
                port: 80,
                subset: None,
            },
        );
        assert!(!Arc::ptr_eq(&c1.breaker, &other), "each pod counts apart");
        drop((c1, c2, other));
        assert_eq!(b.live(), 0, "nothing holds them: gone");
    }

    #[test]
    fn overflows_are_counted_by_service_and_reason() {
        let (t, b) = (telemetry(), Breakers::default());
        let c = circuit(&t, &b, ConnectionPool::default());
        c.overflow(Overflow::Pending);
        c.overflow(Overflow::Pending);
        c.overflow(Overflow::Retries);
        let text = t.metrics.encode();
        assert!(
            text.contains(
                "ferry_upstream_overflow_total{destination_service=\"r.default.svc.cluster.local\",reason=\"pending\"} 2"
            ),
            "{text}"
        );
        assert!(text.contains("reason=\"retries\"} 1"), "{text}");
    }
}
