//! The exporter: one task per configured endpoint takes finished spans from
//! a bounded queue and sends them in batches with OTLP/gRPC
//! (`TraceService/Export`), each export bounded by a deadline.
//!
//! Invariants: a request never waits on tracing (a span is handed over
//! with `try_send`; a full queue drops it and counts it in
//! `ferry_trace_spans_dropped_total{reason="queue_full"}`); a failed or
//! late export drops its batch (`reason="export_failed"`), nothing is
//! retried; the task ends once every sender is gone (the settings changed
//! and the last span of the old pipeline ended), after sending what it
//! holds.

use std::{collections::BTreeMap, time::Duration};

use tokio::sync::mpsc;
use tonic::{
    codegen::http::uri::PathAndQuery,
    transport::{Channel, ClientTlsConfig, Endpoint},
};

use super::{
    otlp::{self, ExportTraceServiceRequest, ExportTraceServiceResponse, KeyValue},
    Counters,
};

/// Finished spans waiting for export, at most.
pub const QUEUE: usize = 4096;
/// Spans per export, at most.
pub const MAX_BATCH: usize = 512;
/// A batch is sent this long after its first span at the latest.
pub const BATCH_DELAY: Duration = Duration::from_millis(500);
/// Connecting to the collector gives up after this.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// One export (connect included) gives up after this.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// A finished span and the `service.name` it is reported under.
pub struct Finished {
    pub service: String,
    pub span: otlp::Span,
}

/// Starts the exporter task for `endpoint` (an `http(s)://` URL, checked
/// by the config's validation); spans go into the returned sender.
pub fn spawn(endpoint: &str, counters: Counters) -> mpsc::Sender<Finished> {
    let (tx, rx) = mpsc::channel(QUEUE);
    let channel = channel(endpoint);
    if channel.is_none() {
        tracing::warn!(
            endpoint,
            "tracing: the collector endpoint is not usable; spans are dropped"
        );
    }
    tokio::spawn(run(channel, rx, counters));
    tx
}

fn channel(endpoint: &str) -> Option<Channel> {
    let mut e = Endpoint::from_shared(endpoint.to_owned())
        .ok()?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(EXPORT_TIMEOUT);
    if endpoint.starts_with("https://") {
        e = e.tls_config(ClientTlsConfig::new().with_native_roots()).ok()?;
    }
    Some(e.connect_lazy())
}

async fn run(channel: Option<Channel>, mut rx: mpsc::Receiver<Finished>, counters: Counters) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let until = tokio::time::Instant::now() + BATCH_DELAY;
        while batch.len() < MAX_BATCH {
            match tokio::time::timeout_at(until, rx.recv()).await {
                Ok(Some(s)) => batch.push(s),
                Ok(None) | Err(_) => break,
            }
        }
        let n = batch.len() as u64;
        let sent = match &channel {
            Some(c) => tokio::time::timeout(EXPORT_TIMEOUT, export(c.clone(), request(batch))).await,
            None => Ok(Err("no usable endpoint".to_owned())),
        };
        match sent {
            Ok(Ok(rejected)) => {
                counters.exported.inc_by(n.saturating_sub(rejected));
                if rejected > 0 {
                    counters.dropped(super::DropReason::Rejected).inc_by(rejected);
                }
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, spans = n, "tracing: export failed");
                counters.dropped(super::DropReason::ExportFailed).inc_by(n);
            }
            Err(_) => {
                tracing::debug!(spans = n, "tracing: export timed out");
                counters.dropped(super::DropReason::ExportFailed).inc_by(n);
            }
        }
    }
}

/// Spans grouped by `service.name`, one resource each.
pub fn request(batch: Vec<Finished>) -> ExportTraceServiceRequest {
    let mut by_service: BTreeMap<String, Vec<otlp::Span>> = BTreeMap::new();
    for f in batch {
        by_service.entry(f.service).or_default().push(f.span);
    }
    ExportTraceServiceRequest {
        resource_spans: by_service
            .into_iter()
            .map(|(service, spans)| otlp::ResourceSpans {
                resource: Some(otlp::Resource {
                    attributes: vec![KeyValue::string("service.name", service)],
                }),
                scope_spans: vec![otlp::ScopeSpans {
                    scope: Some(otlp::InstrumentationScope {
                        name: "ferry-agent".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                    }),
                    spans,
                }],
            })
            .collect(),
    }
}

/// One export; the number of spans the collector rejected.
async fn export(channel: Channel, req: ExportTraceServiceRequest) -> Result<u64, String> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.map_err(|e| e.to_string())?;
    let codec = tonic_prost::ProstCodec::<ExportTraceServiceRequest, ExportTraceServiceResponse>::default();
    let resp = grpc
        .unary(
            tonic::Request::new(req),
            PathAndQuery::from_static(otlp::EXPORT_PATH),
            codec,
        )
        .await
        .map_err(|s| format!("{}: {}", s.code(), s.message()))?;
    Ok(resp
        .into_inner()
        .partial_success
        .map_or(0, |p| p.rejected_spans.max(0) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_grouped_by_service() {
        let span = |n: &str| otlp::Span {
            name: n.into(),
            ..Default::default()
        };
        let r = request(vec![
            Finished {
                service: "b.default".into(),
                span: span("1"),
            },
            Finished {
                service: "a.default".into(),
                span: span("2"),
            },
            Finished {
                service: "b.default".into(),
                span: span("3"),
            },
        ]);
        assert_eq!(r.resource_spans.len(), 2);
        let b = &r.resource_spans[1];
        assert_eq!(
            b.resource.as_ref().unwrap().attributes[0],
            KeyValue::string("service.name", "b.default")
        );
        let names: Vec<_> = b.scope_spans[0].spans.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["1", "3"]);
    }
}
