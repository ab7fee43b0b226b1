//! Per-request telemetry of the L7 path: Envoy-style response flags (typed,
//! rendered as the stable codes Istio's dashboards know), Istio's standard
//! request metrics (`istio_requests_total`, `istio_request_duration_milliseconds`,
//! `istio_request_bytes`, `istio_response_bytes`), the protocol-detection
//! counter, and [`RequestRecord`]: what one request did, written to the
//! metrics and the access log exactly once, when it is dropped (at the end
//! of the response body, or when the client goes away).

use std::{
    fmt,
    net::SocketAddrV4,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Instant,
};

use ferry_model::{admin::Direction, state::Hop};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

use super::{
    metrics::{LabelSets, LiveWorkloads, TcpLabels},
    Telemetry,
};

/// One Envoy response flag (the subset Ferry sets).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flag {
    /// The request was delayed by a fault (`DI`).
    DelayInjected,
    /// The request was aborted by a fault (`FI`).
    FaultInjected,
    /// The route or per-try timeout fired (`UT`).
    UpstreamTimeout,
    /// Retries were exhausted on a retriable failure (`URX`).
    RetryLimitExceeded,
    /// No route matched (`NR`).
    NoRoute,
    /// The upstream connection could not be opened (`UF`).
    UpstreamConnectFailure,
    /// No ready endpoint (`UH`).
    NoHealthyUpstream,
    /// The backend names a Service, port or subset that does not exist (`NC`).
    NoCluster,
    /// The upstream closed or reset the connection mid-request (`UC`).
    UpstreamConnectionTermination,
    /// Denied by authorization policy at the destination (`RBAC`: 403, or
    /// gRPC status 7).
    Rbac,
    /// A circuit-breaking limit (DestinationRule `connectionPool`) refused
    /// the request or a retry (`UO`).
    UpstreamOverflow,
    /// Over a RateLimitPolicy's rate at the destination (`RL`: 429, or
    /// gRPC status 8).
    RateLimited,
}

impl Flag {
    const ALL: [Flag; 12] = [
        Flag::DelayInjected,
        Flag::FaultInjected,
        Flag::UpstreamTimeout,
        Flag::RetryLimitExceeded,
        Flag::NoRoute,
        Flag::UpstreamConnectFailure,
        Flag::NoHealthyUpstream,
        Flag::NoCluster,
        Flag::UpstreamConnectionTermination,
        Flag::Rbac,
        Flag::UpstreamOverflow,
        Flag::RateLimited,
    ];

    /// Envoy's short code.
    pub fn as_str(self) -> &'static str {
        match self {
            Flag::DelayInjected => "DI",
            Flag::FaultInjected => "FI",
            Flag::UpstreamTimeout => "UT",
            Flag::RetryLimitExceeded => "URX",
            Flag::NoRoute => "NR",
            Flag::UpstreamConnectFailure => "UF",
            Flag::NoHealthyUpstream => "UH",
            Flag::NoCluster => "NC",
            Flag::UpstreamConnectionTermination => "UC",
            Flag::Rbac => "RBAC",
            Flag::UpstreamOverflow => "UO",
            Flag::RateLimited => "RL",
        }
    }

    fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

/// The set of flags of one request; `-` when empty, else the codes joined
/// by `,` in a fixed order (as Envoy prints them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flags(u16);

impl Flags {
    pub fn insert(&mut self, f: Flag) {
        self.0 |= f.bit();
    }

    pub fn contains(self, f: Flag) -> bool {
        self.0 & f.bit() != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Display for Flags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("-");
        }
        let mut first = true;
        for flag in Flag::ALL.into_iter().filter(|x| self.contains(*x)) {
            if !first {
                f.write_str(",")?;
            }
            f.write_str(flag.as_str())?;
            first = false;
        }
        Ok(())
    }
}

/// `request_protocol` of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestProtocol {
    Http,
    Grpc,
}

impl RequestProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestProtocol::Http => "http",
            RequestProtocol::Grpc => "grpc",
        }
    }
}

/// How a sniffed connection was classified (`ferry_protocol_detection_total{outcome}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Detection {
    /// An HTTP/1 request line.
    Http1,
    /// The HTTP/2 connection preface.
    Http2,
    /// Other bytes (or the client closed first): opaque TCP.
    Tcp,
    /// Nothing conclusive within the wait: opaque TCP (server-speaks-first).
    Timeout,
}

impl Detection {
    pub fn as_str(self) -> &'static str {
        match self {
            Detection::Http1 => "http1",
            Detection::Http2 => "http2",
            Detection::Tcp => "tcp",
            Detection::Timeout => "timeout",
        }
    }

    pub fn is_http(self) -> bool {
        matches!(self, Detection::Http1 | Detection::Http2)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DetectionLabels {
    outcome: &'static str,
}

/// Labels of `ferry_upstream_overflow_total` (circuit breaking).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OverflowLabels {
    /// The Service's FQDN, as Istio's `destination_service`.
    destination_service: String,
    /// The limit: `pending`, `pending_timeout`, `requests`, `connections`, `retries`.
    reason: &'static str,
}

/// Istio's request labels: the standard set plus the response's.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `request_protocol` and `response_flags` are set per request.
    #[prometheus(flatten)]
    pub base: TcpLabels,
    pub response_code: String,
    pub grpc_response_status: String,
}

/// Istio's duration buckets (milliseconds).
pub const DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0, 300000.0,
    600000.0, 1800000.0, 3600000.0,
];

/// Size buckets (bytes): powers of ten from 1 B to 100 MB.
pub const SIZE_BUCKETS: [f64; 9] = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8];

type HistFamily = Family<RequestLabels, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS_MS)
}

fn size_histogram() -> Histogram {
    Histogram::new(SIZE_BUCKETS)
}

/// The request metrics' families.
#[derive(Debug)]
pub struct HttpMetrics {
    requests: Family<RequestLabels, Counter>,
    duration: HistFamily,
    request_bytes: HistFamily,
    response_bytes: HistFamily,
    /// Every label set of the four request families.
    sets: LabelSets<RequestLabels>,
    detection: Family<DetectionLabels, Counter>,
    overflow: Family<OverflowLabels, Counter>,
}

impl HttpMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            requests: Family::default(),
            duration: Family::new_with_constructor(duration_histogram as fn() -> Histogram),
            request_bytes: Family::new_with_constructor(size_histogram as fn() -> Histogram),
            response_bytes: Family::new_with_constructor(size_histogram as fn() -> Histogram),
            sets: LabelSets::default(),
            detection: Family::default(),
            overflow: Family::default(),
        };
        registry.register("istio_requests", "Requests", m.requests.clone());
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration, first byte in to last byte out",
            m.duration.clone(),
        );
        registry.register("istio_request_bytes", "Request body sizes", m.request_bytes.clone());
        registry.register("istio_response_bytes", "Response body sizes", m.response_bytes.clone());
        registry.register(
            "ferry_protocol_detection",
            "Sniffed connections by detected protocol",
            m.detection.clone(),
        );
        registry.register(
            "ferry_upstream_overflow",
            "Requests, retries and connections stopped by a DestinationRule connectionPool limit, by destination service and limit",
            m.overflow.clone(),
        );
        m
    }

    /// The overflow counter of `destination_service` (an FQDN) and `reason`.
    pub fn overflow(&self, destination_service: String, reason: &'static str) -> Counter {
        self.overflow
            .get_or_create(&OverflowLabels {
                destination_service,
                reason,
            })
            .clone()
    }

    pub fn detected(&self, d: Detection) {
        self.detection
            .get_or_create(&DetectionLabels { outcome: d.as_str() })
            .inc();
    }

    /// The count of detections with `d` (for tests and views).
    pub fn detections(&self, d: Detection) -> u64 {
        self.detection
            .get_or_create(&DetectionLabels { outcome: d.as_str() })
            .get()
    }

    fn record(&self, l: &RequestLabels, duration_ms: f64, request_bytes: u64, response_bytes: u64) {
        self.sets.record(
            l,
            || self.requests.get(l).is_some(),
            || {
                self.requests.get_or_create(l).inc();
                self.duration.get_or_create(l).observe(duration_ms);
                self.request_bytes.get_or_create(l).observe(request_bytes as f64);
                self.response_bytes.get_or_create(l).observe(response_bytes as f64);
            },
        )
    }

    /// As `Metrics::forget_departed`, for the request series.
    pub(crate) fn forget_departed(&self, live: &LiveWorkloads) -> usize {
        self.sets.prune(
            |l| live.keeps(&l.base),
            |l| {
                self.requests.remove(l);
                for f in [&self.duration, &self.request_bytes, &self.response_bytes] {
                    f.remove(l);
                }
            },
        )
    }
}

/// What one request did; filled in by the proxy as it goes, and reported
/// (metrics, one access-log line) when dropped.
pub struct RequestRecord {
    t: Arc<Telemetry>,
    pub id: u64,
    started: Instant,
    log: bool,
    /// `outbound` (the source side, the default), or where the destination
    /// side got the connection: `inbound` (plaintext or same node), `tunnel`.
    pub direction: Direction,
    /// The calling pod (`namespace/name`); at the destination, the peer's
    /// workload, else its SPIFFE id, else its address.
    pub source: String,
    pub method: String,
    pub authority: String,
    pub path: String,
    pub protocol: RequestProtocol,
    /// `namespace/name` of the destination Service, if any.
    pub service: Option<String>,
    /// The route's name (`-` before one is chosen).
    pub route: String,
    pub status: u16,
    pub flags: Flags,
    pub grpc_status: Option<u32>,
    /// The endpoint of the last attempt.
    pub upstream: Option<(SocketAddrV4, Hop)>,
    pub attempts: u32,
    /// Request body bytes from the client (counted by the body as it flows).
    pub request_bytes: Arc<AtomicU64>,
    pub response_bytes: u64,
    /// The standard labels (source, destination, service, security), set
    /// by the proxy; without them the request is logged but not counted.
    pub labels: Option<TcpLabels>,
    /// Held until the request ends (here, as the record lives exactly as
    /// long): the chosen endpoint's in-flight count (`proxy::balance`),
    /// type-erased as telemetry does not know the proxy's types.
    pub in_flight: Option<Box<dyn std::any::Any + Send + Sync>>,
}

impl Telemetry {
    /// A new request from a pod in `namespace` (which picks the access-log policy).
    pub fn request(self: &Arc<Self>, namespace: &str, source: String) -> RequestRecord {
        let id = self.next_request.fetch_add(1, Ordering::Relaxed) + 1;
        let log = self
            .access_log
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .should_log(namespace, id);
        RequestRecord {
            t: self.clone(),
            id,
            started: Instant::now(),
            log,
            direction: Direction::Outbound,
            source,
            method: String::new(),
            authority: String::new(),
            path: String::new(),
            protocol: RequestProtocol::Http,
            service: None,
            route: "-".into(),
            status: 0,
            flags: Flags::default(),
            grpc_status: None,
            upstream: None,
            attempts: 0,
            request_bytes: Arc::new(AtomicU64::new(0)),
            response_bytes: 0,
            labels: None,
            in_flight: None,
        }
    }
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        let duration = self.started.elapsed();
        let request_bytes = self.request_bytes.load(Ordering::Relaxed);
        let flags = self.flags.to_string();
        let grpc = self.grpc_status.map(|s| s.to_string());
        if let Some(base) = self.labels.take() {
            if self.t.metrics_on.load(Ordering::Relaxed) {
                let mut base = base;
                base.request_protocol = self.protocol.as_str().into();
                base.response_flags = flags.clone();
                let l = RequestLabels {
                    base,
                    response_code: self.status.to_string(),
                    grpc_response_status: grpc.clone().unwrap_or_default(),
                };
                self.t
                    .metrics
                    .http
                    .record(&l, duration.as_secs_f64() * 1000.0, request_bytes, self.response_bytes);
            }
        }
        if !self.log {
            return;
        }
        tracing::info!(
            target: "ferry::access",
            id = self.id,
            direction = %self.direction,
            source = %self.source,
            protocol = self.protocol.as_str(),
            method = %self.method,
            authority = %self.authority,
            path = %self.path,
            service = self.service.as_deref().unwrap_or("-"),
            route = %self.route,
            status = self.status,
            flags = %flags,
            grpc_status = grpc.as_deref().unwrap_or("-"),
            upstream = %self.upstream.map_or_else(|| "-".to_owned(), |(e, _)| e.to_string()),
            hop = self.upstream.map_or("-", |(_, h)| h.as_str()),
            attempts = self.attempts,
            request_bytes,
            response_bytes = self.response_bytes,
            duration_ms = duration.as_millis() as u64,
            "request"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_render_as_envoy_codes() {
        let mut f = Flags::default();
        assert_eq!(f.to_string(), "-");
        f.insert(Flag::FaultInjected);
        f.insert(Flag::DelayInjected);
        assert_eq!(f.to_string(), "DI,FI");
        let mut g = Flags::default();
        g.insert(Flag::RetryLimitExceeded);
        assert_eq!(g.to_string(), "URX");
        let mut r = Flags::default();
        r.insert(Flag::Rbac);
        assert_eq!(r.to_string(), "RBAC");
        assert!(g.contains(Flag::RetryLimitExceeded) && !g.contains(Flag::NoRoute));
    }

    #[test]
    fn detection_outcomes_have_stable_names() {
        let names: Vec<_> = [Detection::Http1, Detection::Http2, Detection::Tcp, Detection::Timeout]
            .into_iter()
            .map(Detection::as_str)
            .collect();
        assert_eq!(names, ["http1", "http2", "tcp", "timeout"]);
    }
}
