//! The L7 path's tracing hooks (the spans themselves: `telemetry::trace`).
//! Around each request, on both sides: [`start`] reads the incoming trace
//! context, starts the side's span (source: client span; destination:
//! server span) and rewrites the request's context headers so the next hop
//! sees this span as its parent; [`finish`] reads what the request did
//! from the response (the [`Facts`] the record left in its extensions:
//! flags, backend, endpoint) and ends the span with the response body.
//! Nothing happens without `settings.tracing`; an unsampled span only
//! rewrites the headers.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use ferry_model::{state::State, Workload};
use http_body_util::BodyExt;
use hyper::{
    body::{Body as HttpBody, Frame, SizeHint},
    header, Request, Response,
};

use super::body::{grpc_status, Body, BoxError};
use crate::{
    proxy::Proxy,
    telemetry::{
        http::{Flags, RequestRecord},
        metrics::CLUSTER_DOMAIN,
        trace::{propagation, Kind, Span},
    },
};

/// What a request's record knew when its response head left.
#[derive(Clone, Debug)]
pub struct Facts {
    pub flags: Flags,
    /// The backend Service, `namespace/name`.
    pub service: Option<String>,
    /// The endpoint of the last attempt.
    pub upstream: Option<SocketAddrV4>,
    pub route: String,
    pub attempts: u32,
}

/// Leaves `rec`'s facts on the response for [`finish`].
pub(super) fn note<B>(resp: &mut Response<B>, rec: &RequestRecord) {
    resp.extensions_mut().insert(Facts {
        flags: rec.flags,
        service: rec.service.clone(),
        upstream: rec.upstream.map(|(e, _)| e),
        route: rec.route.clone(),
        attempts: rec.attempts,
    });
}

/// `name.namespace.svc.cluster.local` of a `namespace/name` key.
fn fqdn(key: &str) -> String {
    match key.split_once('/') {
        Some((ns, name)) => format!("{name}.{ns}.svc.{CLUSTER_DOMAIN}"),
        None => key.to_owned(),
    }
}

/// The span's name: `<service FQDN>:<port>/*` (Istio's default operation
/// name) for a Service, `<address>:<port>/*` for a pod address.
pub(super) fn span_name(service: Option<&str>, ip: Ipv4Addr, port: u16) -> String {
    match service {
        Some(s) => format!("{}:{port}/*", fqdn(s)),
        None => format!("{ip}:{port}/*"),
    }
}

/// Starts the span of `req` for `kind`, acting for `pod`, and rewrites its
/// context headers; `None` when tracing is off. `name` is called only for
/// a sampled span; `peer` is the downstream address.
pub(super) fn start<B>(
    proxy: &Proxy,
    state: &State,
    kind: Kind,
    pod: &Workload,
    req: &mut Request<B>,
    peer: Ipv4Addr,
    name: impl FnOnce() -> String,
) -> Option<Span> {
    let settings = state.settings.tracing.as_ref()?;
    let incoming = propagation::extract(req.headers());
    let mut span = proxy.telemetry.tracer.start(settings, kind, incoming, pod, &state.node);
    propagation::inject(req.headers_mut(), &span.outgoing());
    if span.recording() {
        span.set_name(name());
        let h = req.headers();
        let text = |n: header::HeaderName| h.get(n).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let authority = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| text(header::HOST))
            .unwrap_or_default();
        span.set_str("http.method", req.method().as_str());
        span.set_str("http.url", format!("http://{authority}{}", req.uri().path()));
        span.set_str(
            "http.protocol",
            match req.version() {
                hyper::Version::HTTP_2 => "HTTP/2",
                hyper::Version::HTTP_10 => "HTTP/1.0",
                _ => "HTTP/1.1",
            },
        );
        if let Some(ua) = text(header::USER_AGENT) {
            span.set_str("user_agent", ua);
        }
        if let Some(id) = h.get("x-request-id").and_then(|v| v.to_str().ok()) {
            span.set_str("guid:x-request-id", id);
        }
        span.set_str("peer.address", peer.to_string());
    }
    Some(span)
}

/// Ends `span` with the response: status, flags, upstream cluster
/// (`outbound|<port>||<service FQDN>` at the source, `inbound|<port>||`
/// at the destination), then with the body (size, gRPC status from
/// trailers). `port` is the Service port (source) or app port
/// (destination).
pub(super) fn finish(span: Option<Span>, mut resp: Response<Body>, port: u16) -> Response<Body> {
    let facts = resp.extensions_mut().remove::<Facts>();
    let Some(mut span) = span.filter(Span::recording) else {
        return resp;
    };
    let status = resp.status().as_u16();
    span.set_int("http.status_code", status.into());
    if status >= 500 {
        span.set_error();
    }
    let grpc = grpc_status(resp.headers());
    if let Some(f) = facts {
        span.set_str("response_flags", f.flags.to_string());
        let cluster = match (span.kind(), &f.service) {
            (Kind::Client, Some(s)) => format!("outbound|{port}||{}", fqdn(s)),
            (Kind::Client, None) => "PassthroughCluster".to_owned(),
            (Kind::Server, _) => format!("inbound|{port}||"),
        };
        span.set_str("upstream_cluster", cluster.clone());
        span.set_str("upstream_cluster.name", cluster);
        if let Some(u) = f.upstream {
            span.set_str("upstream_address", u.to_string());
        }
        if span.kind() == Kind::Client {
            span.set_str("route_name", f.route);
            span.set_int("attempts", f.attempts.into());
        }
    }
    let (parts, body) = resp.into_parts();
    let traced = Traced {
        inner: body,
        span: Some(span),
        bytes: 0,
        grpc,
    };
    Response::from_parts(parts, traced.boxed_unsync())
}

/// A response body that ends its span when it ends (or is dropped).
struct Traced {
    inner: Body,
    span: Option<Span>,
    bytes: u64,
    grpc: Option<u32>,
}

impl Traced {
    fn end(&mut self, failed: bool) {
        if let Some(mut s) = self.span.take() {
            s.set_int("response_size", self.bytes as i64);
            if let Some(g) = self.grpc {
                s.set_int("grpc.status_code", g.into());
            }
            if failed {
                s.set_error();
            }
        }
    }
}

impl Drop for Traced {
    fn drop(&mut self) {
        self.end(false);
    }
}

impl HttpBody for Traced {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            Poll::Pending => {}
            Poll::Ready(None) => this.end(false),
            Poll::Ready(Some(Err(_))) => this.end(true),
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.bytes += d.len() as u64;
                } else if let Some(t) = frame.trailers_ref() {
                    if let Some(g) = grpc_status(t) {
                        this.grpc = Some(g);
                    }
                }
                if this.inner.is_end_stream() {
                    this.end(false);
                }
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_istio() {
        assert_eq!(
            span_name(Some("default/details"), Ipv4Addr::LOCALHOST, 9080),
            "details.default.svc.cluster.local:9080/*"
        );
        assert_eq!(span_name(None, Ipv4Addr::new(10, 1, 0, 2), 80), "10.1.0.2:80/*");
    }
}
