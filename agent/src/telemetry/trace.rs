//! Distributed tracing of the L7 path (docs/telemetry.md, "Tracing").
//!
//! - [`propagation`]: W3C Trace Context and B3 headers, read (never failing)
//!   and written (one consistent context), and parent-based sampling;
//! - [`Tracer`]: per request, a span (`client` on the source side, `server`
//!   at the destination), child of the incoming context or the root of a
//!   new trace, sampled by `settings.tracing.sampleRate` unless the caller
//!   decided; a span ends (and is queued for export) when dropped;
//! - [`export`]: a bounded queue and one OTLP/gRPC exporter task per
//!   configured endpoint, batching, with a deadline per export;
//! - [`otlp`]: the OTLP messages, written with prost's derive (no
//!   generated code, no new crate: tonic and prost are already built).
//!
//! With no `settings.tracing`, nothing here runs and trace headers pass
//! through untouched. An unsampled request still gets fresh ids in its
//! headers (so a later hop that samples continues the same trace), but its
//! span is never built or queued.

pub mod export;
pub mod otlp;
pub mod propagation;

use std::{
    fmt,
    sync::{Arc, Mutex},
    time::{Instant, SystemTime},
};

use ferry_model::{config::TracingSettings, Workload};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use tokio::sync::mpsc;

use otlp::{any_value::Value, KeyValue};
use propagation::{Extracted, Outgoing, SpanId, TraceId};

/// Which side of a request a span stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The source side (the calling pod's agent).
    Client,
    /// The destination side (the serving pod's agent).
    Server,
}

/// Why a span was not exported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// The export queue was full.
    QueueFull,
    /// The export failed or missed its deadline (the whole batch).
    ExportFailed,
    /// The collector said it rejected them (partial success).
    Rejected,
}

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::ExportFailed => "export_failed",
            DropReason::Rejected => "rejected",
        }
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Labels of `ferry_trace_spans_dropped_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabels {
    pub reason: String,
}

/// The tracing counters (registered once, shared with exporter tasks).
#[derive(Clone, Default)]
pub struct Counters {
    /// `ferry_trace_spans_exported_total`.
    pub exported: Counter,
    /// `ferry_trace_spans_dropped_total{reason}`.
    pub dropped: Family<DropLabels, Counter>,
}

impl Counters {
    pub fn dropped(&self, why: DropReason) -> Counter {
        self.dropped
            .get_or_create(&DropLabels {
                reason: why.as_str().into(),
            })
            .clone()
    }
}

/// One configured endpoint: its settings and its exporter's queue.
struct Pipeline {
    settings: TracingSettings,
    tx: mpsc::Sender<export::Finished>,
}

/// Starts spans; owns the exporter of the current settings.
pub struct Tracer {
    current: Mutex<Option<Arc<Pipeline>>>,
    pub counters: Counters,
}

impl Tracer {
    /// Registers `ferry_trace_spans_exported_total` and
    /// `ferry_trace_spans_dropped_total` in `r`.
    pub fn new(r: &mut Registry) -> Self {
        let counters = Counters::default();
        r.register(
            "ferry_trace_spans_exported",
            "Spans the OTLP collector accepted",
            counters.exported.clone(),
        );
        r.register(
            "ferry_trace_spans_dropped",
            "Spans not exported: queue_full, export_failed (the collector was down or late), rejected (by the collector)",
            counters.dropped.clone(),
        );
        Self {
            current: Mutex::new(None),
            counters,
        }
    }

    /// The pipeline for `settings`: the current one, or a new one (with its
    /// exporter task) when the settings changed. Needs a tokio runtime.
    fn pipeline(&self, settings: &TracingSettings) -> Arc<Pipeline> {
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = cur.as_ref().filter(|p| p.settings == *settings) {
            return p.clone();
        }
        let p = Arc::new(Pipeline {
            settings: settings.clone(),
            tx: export::spawn(&settings.endpoint, self.counters.clone()),
        });
        *cur = Some(p.clone());
        p
    }

    /// A span for a request whose headers said `incoming`, under
    /// `settings` (see the module doc): `pod` is the pod this side acts
    /// for, `node` this agent's node. The caller injects
    /// [`Span::outgoing`] into the request it sends on.
    pub fn start(
        &self,
        settings: &TracingSettings,
        kind: Kind,
        incoming: Extracted,
        pod: &Workload,
        node: &str,
    ) -> Span {
        let sampled = propagation::decide(incoming.sampled, settings.sample_rate, rand::random::<f64>());
        let (trace_id, parent) = match incoming.parent {
            Some(p) => (p.trace_id, Some(p.span_id)),
            None => (TraceId::random(), None),
        };
        let mut span = Span {
            kind,
            trace_id,
            span_id: SpanId::random(),
            parent,
            sampled,
            trace_state: incoming.trace_state,
            b3_single: incoming.b3_single,
            data: None,
        };
        if sampled {
            let p = self.pipeline(settings);
            let service = settings
                .service_name
                .clone()
                .unwrap_or_else(|| format!("{}.{}", pod.canonical_service(), pod.namespace));
            let mut attributes = Vec::with_capacity(24);
            attributes.push(KeyValue::string("component", "proxy"));
            attributes.push(KeyValue::string("node_id", node));
            attributes.push(KeyValue::string("k8s.node.name", node));
            attributes.push(KeyValue::string("k8s.pod.name", pod.name.clone()));
            attributes.push(KeyValue::string("istio.namespace", pod.namespace.clone()));
            attributes.push(KeyValue::string("istio.canonical_service", pod.canonical_service()));
            attributes.push(KeyValue::string("istio.canonical_revision", pod.canonical_revision()));
            span.data = Some(Box::new(Data {
                name: String::new(),
                service,
                start: SystemTime::now(),
                started: Instant::now(),
                attributes,
                error: false,
                tx: p.tx.clone(),
                dropped: self.counters.dropped(DropReason::QueueFull),
            }));
        }
        span
    }
}

/// What a sampled span records (boxed: unsampled spans stay small).
struct Data {
    name: String,
    service: String,
    start: SystemTime,
    started: Instant,
    attributes: Vec<KeyValue>,
    error: bool,
    tx: mpsc::Sender<export::Finished>,
    dropped: Counter,
}

/// One request's span; ends when dropped (at the end of the response
/// body, or when the client goes away).
pub struct Span {
    kind: Kind,
    pub trace_id: TraceId,
    pub span_id: SpanId,
    /// The incoming context's span (none for the root of a new trace).
    pub parent: Option<SpanId>,
    pub sampled: bool,
    trace_state: Option<String>,
    b3_single: bool,
    data: Option<Box<Data>>,
}

impl Span {
    /// The context to send on: this span is the receiver's parent.
    pub fn outgoing(&self) -> Outgoing<'_> {
        Outgoing {
            trace_id: self.trace_id,
            span_id: self.span_id,
            parent: self.parent,
            sampled: self.sampled,
            trace_state: self.trace_state.as_deref(),
            b3_single: self.b3_single,
        }
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Whether attributes are recorded (the span is sampled).
    pub fn recording(&self) -> bool {
        self.data.is_some()
    }

    pub fn set_name(&mut self, name: String) {
        if let Some(d) = &mut self.data {
            d.name = name;
        }
    }

    pub fn set_str(&mut self, key: &'static str, v: impl Into<String>) {
        if let Some(d) = &mut self.data {
            d.attributes.push(KeyValue::string(key, v));
        }
    }

    pub fn set_int(&mut self, key: &'static str, v: i64) {
        if let Some(d) = &mut self.data {
            d.attributes.push(KeyValue::new(key, Value::IntValue(v)));
        }
    }

    /// Marks the span failed (`error: true`, status ERROR), as Envoy does
    /// for 5xx and for requests without a response.
    pub fn set_error(&mut self) {
        if let Some(d) = &mut self.data {
            d.error = true;
        }
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        let Some(d) = self.data.take() else { return };
        let Data {
            name,
            service,
            start,
            started,
            mut attributes,
            error,
            tx,
            dropped,
        } = *d;
        let start_ns = start
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        if error {
            attributes.push(KeyValue::new("error", Value::BoolValue(true)));
        }
        let span = otlp::Span {
            trace_id: self.trace_id.0.to_vec(),
            span_id: self.span_id.0.to_vec(),
            trace_state: self.trace_state.take().unwrap_or_default(),
            parent_span_id: self.parent.map(|p| p.0.to_vec()).unwrap_or_default(),
            name,
            kind: match self.kind {
                Kind::Client => otlp::SPAN_KIND_CLIENT,
                Kind::Server => otlp::SPAN_KIND_SERVER,
            },
            start_time_unix_nano: start_ns,
            end_time_unix_nano: start_ns.saturating_add(started.elapsed().as_nanos() as u64),
            attributes,
            status: Some(otlp::Status {
                message: String::new(),
                code: if error {
                    otlp::STATUS_CODE_ERROR
                } else {
                    otlp::STATUS_CODE_UNSET
                },
            }),
            flags: 1,
        };
        if tx.try_send(export::Finished { service, span }).is_err() {
            dropped.inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(rate: f64) -> TracingSettings {
        TracingSettings {
            endpoint: "http://127.0.0.1:1".into(),
            sample_rate: rate,
            service_name: None,
        }
    }

    #[tokio::test]
    async fn spans_continue_the_incoming_trace_or_start_one() {
        let t = Tracer::new(&mut Registry::default());
        let w: Workload = serde_norway::from_str(
            "{uid: a, name: reviews-v1-abc, namespace: shop, node: n1, ip: 10.1.0.2, labels: {app: reviews, version: v1}}",
        )
        .unwrap();
        let mut h = hyper::HeaderMap::new();
        h.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        let s = t.start(&settings(0.0), Kind::Client, propagation::extract(&h), &w, "n1");
        assert!(s.sampled && s.recording(), "the caller sampled it");
        assert_eq!(s.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(s.parent.unwrap().to_string(), "00f067aa0ba902b7");
        assert_eq!(s.data.as_ref().unwrap().service, "reviews.shop");
        let o = s.outgoing();
        assert_eq!((o.span_id, o.parent), (s.span_id, s.parent));

        let s = t.start(&settings(0.0), Kind::Server, Extracted::default(), &w, "n1");
        assert!(!s.sampled && !s.recording() && s.parent.is_none());
        let s = t.start(&settings(1.0), Kind::Server, Extracted::default(), &w, "n1");
        assert!(s.sampled && s.parent.is_none());
    }
}
