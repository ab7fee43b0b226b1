//! Serves one client connection as HTTP (hyper: HTTP/1.1 with keep-alive,
//! chunked bodies, `Expect: 100-continue` and upgrades; HTTP/2 with
//! trailers, streaming both ways) and forwards each request:
//! route (none: 404 `NR`) -> redirect -> fault delay (`DI`) -> fault abort
//! (`FI`) -> weighted backend -> per attempt: endpoint (none: 503 `UH`),
//! pooled upstream connection (failure: 503 `UF`) -> retries per the route's
//! policy (body replayable up to 64 KiB; exhausted: `URX`) within the route
//! timeout (504 `UT`, measured to the response head). Mirrors get a copy and
//! never delay the primary. Every request ends in one [`RequestRecord`].

use std::{
    convert::Infallible,
    net::SocketAddrV4,
    sync::{atomic::AtomicU64, Arc},
    time::Duration,
};

use ferry_model::{
    route::{percent_hit, pick_weighted, AbortStatus, AttemptResult, Backend, RequestAttrs, RetryPolicy},
    state::{Hop, Route, State},
};
use http_body_util::BodyExt;
use hyper::{
    body::Incoming,
    header::{self, HeaderValue},
    HeaderMap, Method, Request, Response, StatusCode, Uri,
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::watch,
};

use super::{
    body::{self, grpc_status, Body, Counted, Replay, Tee},
    circuit::{self, Circuit},
    route::{self, Chosen, Dest, Headers},
    traced,
    upstream::{self, SendError, UpBody, Version},
};
use crate::{
    proxy::{copy, PodCtx, Proxy},
    telemetry::{
        http::{Flag, RequestProtocol, RequestRecord},
        metrics::{tcp_labels, Peer, Reporter, TcpLabels},
        outcome::Outcome,
        trace::Kind,
        ConnGuard,
    },
};

/// Pause between retries.
pub const RETRY_BACKOFF: Duration = Duration::from_millis(25);
/// A mirror waits at most this long for the request body and its answer.
pub const MIRROR_DEADLINE: Duration = Duration::from_secs(10);

/// What every request of one client connection shares.
struct ConnCx {
    proxy: Arc<Proxy>,
    pod: Arc<PodCtx>,
    orig: SocketAddrV4,
}

/// Serves `client` (a connection to `orig` from `pod`) as HTTP until it
/// closes; `g` is the connection's record (live view, access log).
pub async fn serve<S>(proxy: Arc<Proxy>, pod: Arc<PodCtx>, orig: SocketAddrV4, mut g: ConnGuard, client: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let cx = Arc::new(ConnCx { proxy, pod, orig });
    let svc = hyper::service::service_fn(move |req| {
        let cx = cx.clone();
        async move { Ok::<_, Infallible>(traced_handle(cx, req).await) }
    });
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1().timer(TokioTimer::new()).keep_alive(true);
    b.http2().timer(TokioTimer::new());
    if let Err(e) = b.serve_connection_with_upgrades(TokioIo::new(client), svc).await {
        g.outcome = Outcome::Relay(std::io::Error::other(e));
    }
}

/// [`handle`] inside the request's client span (`settings.tracing`): the
/// upstream request carries the span's context.
async fn traced_handle(cx: Arc<ConnCx>, mut req: Request<Incoming>) -> Response<Body> {
    let state = cx.proxy.state();
    let port = cx.orig.port();
    let span = traced::start(
        &cx.proxy,
        &state,
        Kind::Client,
        &cx.pod.workload,
        &mut req,
        cx.pod.workload.ip,
        || {
            let service = state
                .service_at(cx.orig)
                .map(|(s, _)| format!("{}/{}", s.namespace, s.name));
            traced::span_name(service.as_deref(), *cx.orig.ip(), port)
        },
    );
    drop(state);
    let resp = handle(cx, req).await;
    traced::finish(span, resp, port)
}

/// The upstream request, rebuilt for each attempt and mirror.
#[derive(Clone)]
struct Template {
    method: Method,
    uri: Uri,
    version: hyper::Version,
    headers: HeaderMap,
}

impl Template {
    fn build(&self, body: Body) -> Request<Body> {
        let mut r = Request::new(body);
        *r.method_mut() = self.method.clone();
        *r.uri_mut() = self.uri.clone();
        *r.version_mut() = self.version;
        *r.headers_mut() = self.headers.clone();
        r
    }

    /// Points the request at `authority` (Host header, and the URI when it
    /// is absolute, as HTTP/2 requests are).
    fn set_authority(&mut self, authority: &str) {
        if let Ok(v) = HeaderValue::from_str(authority) {
            if self.version != hyper::Version::HTTP_2 {
                self.headers.insert(header::HOST, v);
            }
        }
        if self.uri.authority().is_some() {
            let mut p = self.uri.clone().into_parts();
            if let Ok(a) = authority.parse() {
                p.authority = Some(a);
                if let Ok(u) = Uri::from_parts(p) {
                    self.uri = u;
                }
            }
        }
    }
}

/// Why no upstream response is passed on.
enum Failure {
    /// Decided before any upstream (no endpoint, unknown backend).
    Local(Flag),
    Send(SendError),
    PerTryTimeout,
}

/// Connection-level headers that are not forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "expect",
];

/// Removes the hop-by-hop headers (keeping `connection`/`upgrade` for an
/// upgrade, and `te: trailers`).
pub(super) fn strip_hop_by_hop(h: &mut HeaderMap, upgrade: bool) {
    for name in HOP_BY_HOP {
        if upgrade && (name == "connection" || name == "upgrade") {
            continue;
        }
        if name == "te" && h.get("te").is_some_and(|v| v == "trailers") {
            continue;
        }
        h.remove(name);
    }
}

/// Whether a request is gRPC (`content-type: application/grpc*`).
pub(super) fn is_grpc(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// The standard labels of a request from `pod` to `dst` (unknown until an
/// endpoint is chosen), for `service` (`namespace/name`).
fn labels(proxy: &Proxy, state: &State, pod: &PodCtx, dst: Option<&Route>, service: Option<&str>) -> TcpLabels {
    let dw = dst.and_then(|r| state.workload_by_ip(*r.endpoint.ip()));
    let mtls = dst.is_some_and(|r| r.hop == Hop::Tunnel) && proxy.tunnel.is_mtls();
    let src_id = mtls.then(|| pod.workload.spiffe_id());
    let dst_id = dw.filter(|_| mtls).map(|w| w.spiffe_id());
    tcp_labels(
        Reporter::Source,
        Peer {
            workload: Some(&pod.workload),
            principal: src_id.as_ref(),
        },
        Peer {
            workload: dw,
            principal: dst_id.as_ref(),
        },
        service,
        mtls,
    )
}

/// A response made here (not by an upstream).
pub(super) fn local_reply(
    mut rec: RequestRecord,
    status: StatusCode,
    headers: HeaderMap,
    text: &'static str,
) -> Response<Body> {
    rec.status = status.as_u16();
    let mut r = Response::new(());
    traced::note(&mut r, &rec);
    let mut r = r.map(|()| Counted::new(body::full(text), rec).boxed_unsync());
    *r.status_mut() = status;
    *r.headers_mut() = headers;
    r
}

/// The agent's own answer for a request that failed with `flag`.
pub(super) fn failed(mut rec: RequestRecord, flag: Flag) -> Response<Body> {
    rec.flags.insert(flag);
    if flag == Flag::UpstreamOverflow {
        // Envoy's answer to an overflow, header included.
        let mut h = HeaderMap::new();
        h.insert("x-envoy-overloaded", HeaderValue::from_static("true"));
        let text = "upstream connect error or disconnect/reset before headers. reset reason: overflow";
        return local_reply(rec, StatusCode::SERVICE_UNAVAILABLE, h, text);
    }
    let (status, text) = match flag {
        Flag::UpstreamTimeout => (StatusCode::GATEWAY_TIMEOUT, "upstream request timeout"),
        Flag::NoRoute => (StatusCode::NOT_FOUND, "no route"),
        Flag::UpstreamConnectFailure => (StatusCode::SERVICE_UNAVAILABLE, "upstream connect error"),
        Flag::UpstreamConnectionTermination => (StatusCode::SERVICE_UNAVAILABLE, "upstream connection terminated"),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream"),
    };
    local_reply(rec, status, HeaderMap::new(), text)
}

fn failure_flag(f: &Failure) -> Flag {
    match f {
        Failure::Local(flag) => *flag,
        Failure::Send(SendError::Connect(_)) => Flag::UpstreamConnectFailure,
        Failure::Send(SendError::Reset(_) | SendError::Refused(_)) => Flag::UpstreamConnectionTermination,
        Failure::Send(SendError::Overflow(_)) => Flag::UpstreamOverflow,
        Failure::PerTryTimeout => Flag::UpstreamTimeout,
    }
}

/// A fault abort: an HTTP status, or for gRPC a trailers-only response.
fn abort(mut rec: RequestRecord, status: AbortStatus) -> Response<Body> {
    rec.flags.insert(Flag::FaultInjected);
    match status {
        AbortStatus::Http(code) => local_reply(
            rec,
            StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            HeaderMap::new(),
            "fault filter abort",
        ),
        AbortStatus::Grpc(code) => grpc_reply(rec, code, "fault filter abort"),
    }
}

/// A gRPC answer made here: trailers-only (HTTP 200, `grpc-status` and
/// `grpc-message` in the headers, no body).
pub(super) fn grpc_reply(mut rec: RequestRecord, code: u32, message: &'static str) -> Response<Body> {
    rec.grpc_status = Some(code);
    let mut h = HeaderMap::new();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    h.insert("grpc-status", HeaderValue::from(code));
    h.insert("grpc-message", HeaderValue::from_static(message));
    rec.status = 200;
    let mut r = Response::new(());
    traced::note(&mut r, &rec);
    let mut r = r.map(|()| Counted::new(body::empty(), rec).boxed_unsync());
    *r.headers_mut() = h;
    r
}

async fn handle(cx: Arc<ConnCx>, mut req: Request<Incoming>) -> Response<Body> {
    let proxy = &*cx.proxy;
    let pod = &*cx.pod;
    // A fresh snapshot per request: config changes apply to the next request.
    let state = proxy.state();
    let mut rec = proxy.telemetry.request(&pod.workload.namespace, pod.label.clone());
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| req.headers().get(header::HOST)?.to_str().ok().map(str::to_owned))
        .unwrap_or_default();
    rec.method = req.method().as_str().to_owned();
    rec.authority = authority.clone();
    rec.path = req.uri().path().to_owned();
    if is_grpc(req.headers()) {
        rec.protocol = RequestProtocol::Grpc;
    }
    let dest = Dest::of(&state, cx.orig);
    if let Dest::Service { key, .. } = &dest {
        rec.service = Some(key.clone());
    }
    rec.labels = Some(labels(proxy, &state, pod, None, rec.service.as_deref()));

    // The decision reads the request; nothing here waits.
    let decided = {
        let headers = Headers(req.headers());
        let attrs = RequestAttrs {
            method: req.method().as_str(),
            path: req.uri().path(),
            query: req.uri().query(),
            authority: &authority,
            port: dest.port(),
            headers: &headers,
            source: Some(&pod.workload),
        };
        route::select(&state, &dest, &attrs).map(|c| {
            let location = c.route().redirect_location(&attrs, "http");
            let path = c.route().rewritten_path(&attrs);
            (c, location, path)
        })
    };
    let Some((chosen, location, new_path)) = decided else {
        return failed(rec, Flag::NoRoute);
    };
    rec.route = chosen.name();
    let r = chosen.route();
    if let (Some(loc), Some(rd)) = (location, &r.redirect) {
        let mut h = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(&loc) {
            h.insert(header::LOCATION, v);
        }
        let status = StatusCode::from_u16(rd.status).unwrap_or(StatusCode::MOVED_PERMANENTLY);
        return local_reply(rec, status, h, "");
    }
    if let Some(f) = &r.fault {
        if let Some(d) = &f.delay {
            if percent_hit(d.percent, rand::random::<f64>()) {
                rec.flags.insert(Flag::DelayInjected);
                tokio::time::sleep(Duration::from_millis(d.delay_ms)).await;
            }
        }
        if let Some(a) = &f.abort {
            if percent_hit(a.percent, rand::random::<f64>()) {
                return abort(rec, a.status);
            }
        }
    }
    let backend: Option<Backend> = match &dest {
        Dest::Pod(_) => None,
        Dest::Service { .. } => match pick_weighted(&r.backends, |b| b.weight, rand::random::<u64>()) {
            Some(b) => Some(b.clone()),
            None => return failed(rec, Flag::NoHealthyUpstream),
        },
    };
    if let Some(b) = &backend {
        rec.service = Some(b.service.clone());
    }

    // The upstream request.
    let version = if req.version() == hyper::Version::HTTP_2 {
        Version::H2
    } else {
        Version::H1
    };
    let upgrade = version == Version::H1 && req.headers().contains_key(header::UPGRADE);
    let on_client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (parts, incoming) = req.into_parts();
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers, upgrade);
    route::apply(&mut headers, &r.request_headers);
    if let Some(b) = &backend {
        route::apply(&mut headers, &b.request_headers);
    }
    let path_and_query = match (&new_path, parts.uri.query()) {
        (Some(p), Some(q)) => format!("{p}?{q}"),
        (Some(p), None) => p.clone(),
        (None, _) => parts
            .uri
            .path_and_query()
            .map_or_else(|| "/".into(), |p| p.as_str().to_owned()),
    };
    let uri = match version {
        Version::H1 => path_and_query.parse().unwrap_or_else(|_| Uri::from_static("/")),
        Version::H2 => {
            let mut p = parts.uri.clone().into_parts();
            p.path_and_query = path_and_query.parse().ok();
            if p.scheme.is_none() {
                p.scheme = Some(hyper::http::uri::Scheme::HTTP);
            }
            if p.authority.is_none() {
                p.authority = authority.parse().ok();
            }
            Uri::from_parts(p).unwrap_or_else(|_| parts.uri.clone())
        }
    };
    let mut template = Template {
        method: parts.method,
        uri,
        version: match version {
            Version::H1 => parts.version,
            Version::H2 => hyper::Version::HTTP_2,
        },
        headers,
    };
    if let Some(a) = r.rewrite.as_ref().and_then(|rw| rw.authority.as_deref()) {
        template.set_authority(a);
    }
    let (tee, replay) = Tee::new(incoming, rec.request_bytes.clone());
    let first = tee.boxed_unsync();
    let timeout = r.timeout_ms.map(Duration::from_millis);

    if let Some(on_client) = on_client_upgrade {
        return forward_upgrade(
            &cx,
            &state,
            &chosen,
            backend.as_ref(),
            &dest,
            template,
            first,
            on_client,
            rec,
        )
        .await;
    }
    for m in &r.mirrors {
        if percent_hit(m.percent, rand::random::<f64>()) {
            let mut t = template.clone();
            t.set_authority(&format!("{authority}-shadow"));
            mirror(
                &cx,
                state.clone(),
                &chosen,
                m.backend.clone(),
                &dest,
                t,
                version,
                replay.clone(),
            );
        }
    }

    let attempts = attempt_loop(
        &cx,
        &state,
        &chosen,
        backend.as_ref(),
        &dest,
        &template,
        version,
        first,
        &replay,
        &mut rec,
    );
    let result = match timeout {
        Some(t) => match tokio::time::timeout(t, attempts).await {
            Ok(r) => r,
            Err(_) => return failed(rec, Flag::UpstreamTimeout),
        },
        None => attempts.await,
    };
    match result {
        Ok(resp) => respond(resp, r, backend.as_ref(), rec),
        Err(f) => {
            let flag = failure_flag(&f);
            if let Failure::Send(e) = &f {
                tracing::debug!(pod = %pod.label, error = %e, "upstream request failed");
            }
            failed(rec, flag)
        }
    }
}

/// An upstream response on its way back: response header ops, counted body.
fn respond(
    resp: Response<UpBody>,
    r: &ferry_model::route::HttpRoute,
    backend: Option<&Backend>,
    mut rec: RequestRecord,
) -> Response<Body> {
    let (mut parts, incoming) = resp.into_parts();
    rec.status = parts.status.as_u16();
    if let Some(s) = grpc_status(&parts.headers) {
        rec.grpc_status = Some(s);
    }
    if parts.status != StatusCode::SWITCHING_PROTOCOLS {
        strip_hop_by_hop(&mut parts.headers, false);
    }
    route::apply(&mut parts.headers, &r.response_headers);
    if let Some(b) = backend {
        route::apply(&mut parts.headers, &b.response_headers);
    }
    let mut resp = Response::from_parts(parts, ());
    traced::note(&mut resp, &rec);
    resp.map(|()| Counted::new(incoming, rec).boxed_unsync())
}

/// Tries the request up to `1 + retries.attempts` times, choosing an
/// endpoint per attempt; a retry needs the whole body kept ([`Replay::Ready`]).
#[allow(clippy::too_many_arguments)]
async fn attempt_loop(
    cx: &ConnCx,
    state: &State,
    chosen: &Chosen,
    backend: Option<&Backend>,
    dest: &Dest,
    template: &Template,
    version: Version,
    first: Body,
    replay: &watch::Receiver<Replay>,
    rec: &mut RequestRecord,
) -> Result<Response<UpBody>, Failure> {
    let policy: Option<&RetryPolicy> = chosen.route().retries.as_ref();
    // connectionPool limits of the backend's cluster, for every attempt.
    let circuit: Option<Circuit> =
        cx.proxy
            .http
            .pool
            .breakers
            .for_request(&cx.proxy.telemetry, state, &cx.pod.workload.uid, backend, dest);
    // The retry in flight holds a slot of the retry budget (`maxRetries`).
    let mut retrying: Option<circuit::Slot> = None;
    let per_try = policy.and_then(|p| p.per_try_timeout_ms).map(Duration::from_millis);
    let max = 1 + policy.map_or(0, |p| p.attempts);
    let mut first = Some(first);
    let mut n = 0;
    let hint = route::Hint::new(&cx.pod.workload, &template.headers, template.uri.query(), cx.orig);
    loop {
        n += 1;
        rec.attempts = n;
        let mut pick = route::endpoint(&cx.proxy.balance, state, chosen.routing(), backend, dest, &hint)
            .map_err(Failure::Local)?;
        let target = pick.route.clone();
        // The endpoint's in-flight count, until the request ends (or the next attempt).
        rec.in_flight = pick.hold();
        rec.upstream = Some((target.endpoint, target.hop));
        rec.labels = Some(labels(&cx.proxy, state, &cx.pod, Some(&target), rec.service.as_deref()));
        let body = match first.take() {
            Some(b) => b,
            None => {
                let kept = match &*replay.borrow() {
                    Replay::Ready(k) => Some(k.clone()),
                    _ => None,
                };
                match kept {
                    Some(k) => body::replay(&k),
                    None => return Err(Failure::Local(Flag::UpstreamConnectionTermination)),
                }
            }
        };
        let send = cx.proxy.http.pool.send(
            &cx.proxy,
            &cx.pod,
            &target,
            version,
            template.build(body),
            circuit.as_ref(),
        );
        let result = match per_try {
            Some(d) => match tokio::time::timeout(d, send).await {
                Ok(r) => r.map_err(Failure::Send),
                Err(_) => Err(Failure::PerTryTimeout),
            },
            None => send.await.map_err(Failure::Send),
        };
        // The attempt's outcome, for outlier detection (and a hash cookie).
        let mut result = result;
        match &mut result {
            Ok(resp) => pick.answered(resp.status().as_u16(), resp.headers_mut()),
            Err(Failure::Local(_) | Failure::Send(SendError::Overflow(_))) => {}
            Err(_) => pick.report(ferry_model::balance::Outcome::LocalFailure),
        }
        let Some(p) = policy else { return result };
        let seen = match &result {
            Ok(resp) => AttemptResult::Response {
                status: resp.status().as_u16(),
                grpc_status: grpc_status(resp.headers()),
            },
            Err(Failure::Send(SendError::Connect(_))) => AttemptResult::ConnectFailure,
            Err(Failure::Send(SendError::Reset(_))) => AttemptResult::Reset,
            Err(Failure::Send(SendError::Refused(_))) => AttemptResult::RefusedStream,
            Err(Failure::PerTryTimeout) => AttemptResult::PerTryTimeout,
            // An overflow is not retried (as Envoy).
            Err(Failure::Local(_) | Failure::Send(SendError::Overflow(_))) => return result,
        };
        // The previous retry, if any, has its result: its budget slot is back.
        drop(retrying.take());
        if !p.retriable(seen) {
            return result;
        }
        if n >= max {
            if p.attempts > 0 {
                rec.flags.insert(Flag::RetryLimitExceeded);
            }
            return result;
        }
        if !matches!(*replay.borrow(), Replay::Ready(_)) {
            // The body was too large to keep (or is still streaming): no retry.
            return result;
        }
        if let Some(c) = &circuit {
            match c.try_take(circuit::Kind::Retry) {
                Some(s) => {
                    retrying.replace(s);
                }
                None => {
                    // The retry budget is spent: the last result stands (Envoy: UO).
                    c.overflow(circuit::Overflow::Retries);
                    rec.flags.insert(Flag::UpstreamOverflow);
                    return result;
                }
            }
        }
        drop(result);
        tokio::time::sleep(RETRY_BACKOFF).await;
    }
}

/// An HTTP/1.1 upgrade (WebSocket): one attempt on a connection of its own;
/// on 101 both sides are upgraded and bytes copied both ways.
#[allow(clippy::too_many_arguments)]
async fn forward_upgrade(
    cx: &ConnCx,
    state: &State,
    chosen: &Chosen,
    backend: Option<&Backend>,
    dest: &Dest,
    template: Template,
    first: Body,
    on_client: hyper::upgrade::OnUpgrade,
    mut rec: RequestRecord,
) -> Response<Body> {
    rec.attempts = 1;
    let hint = route::Hint::new(&cx.pod.workload, &template.headers, template.uri.query(), cx.orig);
    let target = match route::endpoint(&cx.proxy.balance, state, chosen.routing(), backend, dest, &hint) {
        Ok(mut p) => {
            rec.in_flight = p.hold();
            p.route
        }
        Err(flag) => return failed(rec, flag),
    };
    rec.upstream = Some((target.endpoint, target.hop));
    rec.labels = Some(labels(&cx.proxy, state, &cx.pod, Some(&target), rec.service.as_deref()));
    let send = upstream::send_upgrade(&cx.proxy, &cx.pod, &target, template.build(first));
    let limit = chosen
        .route()
        .timeout_ms
        .map_or(upstream::CONNECT_TIMEOUT * 2, Duration::from_millis);
    let mut resp = match tokio::time::timeout(limit, send).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return failed(rec, failure_flag(&Failure::Send(e))),
        Err(_) => return failed(rec, Flag::UpstreamTimeout),
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let on_upstream = hyper::upgrade::on(&mut resp);
        let label = cx.pod.label.clone();
        tokio::spawn(async move {
            match tokio::join!(on_client, on_upstream) {
                (Ok(c), Ok(u)) => {
                    let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
                    let _ = copy::bidi(TokioIo::new(c), TokioIo::new(u), &up, &down).await;
                }
                (Err(e), _) | (_, Err(e)) => {
                    tracing::debug!(pod = %label, error = %e, "upgrade failed");
                }
            }
        });
    }
    respond(resp, chosen.route(), backend, rec)
}

/// Sends a copy of the request to `backend` once its body is kept; the
/// answer is read and dropped. Skipped when the body cannot be kept or too
/// many copies are in flight.
#[allow(clippy::too_many_arguments)]
fn mirror(
    cx: &Arc<ConnCx>,
    state: Arc<State>,
    chosen: &Chosen,
    backend: Backend,
    dest: &Dest,
    template: Template,
    version: Version,
    mut replay: watch::Receiver<Replay>,
) {
    let Ok(permit) = cx.proxy.http.mirrors.clone().try_acquire_owned() else {
        return;
    };
    let routing = match chosen {
        Chosen::Configured(r, _) => Some(r.clone()),
        Chosen::Implicit(_) => None,
    };
    let (cx, dest) = (cx.clone(), dest.clone());
    tokio::spawn(async move {
        let _permit = permit;
        let _ = tokio::time::timeout(MIRROR_DEADLINE, async move {
            let kept = match replay.wait_for(|r| !matches!(r, Replay::Pending)).await {
                Ok(r) => match &*r {
                    Replay::Ready(k) => k.clone(),
                    _ => return,
                },
                Err(_) => return,
            };
            let hint = route::Hint::new(&cx.pod.workload, &template.headers, template.uri.query(), cx.orig);
            let balance = &cx.proxy.balance;
            let Ok(pick) = route::endpoint(balance, &state, routing.as_deref(), Some(&backend), &dest, &hint) else {
                return;
            };
            let target = pick.route.clone();
            let req = template.build(body::replay(&kept));
            let circuit = cx.proxy.http.pool.breakers.for_request(
                &cx.proxy.telemetry,
                &state,
                &cx.pod.workload.uid,
                Some(&backend),
                &dest,
            );
            let sent = cx
                .proxy
                .http
                .pool
                .send(&cx.proxy, &cx.pod, &target, version, req, circuit.as_ref());
            if let Ok(resp) = sent.await {
                let mut b = resp.into_body();
                while let Some(Ok(_)) = b.frame().await {}
            }
        })
        .await;
    });
}
