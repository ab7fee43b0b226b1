//! The destination side of the L7 path. An inbound connection (plaintext,
//! out of the tunnel, or from a pod of this node) to an HTTP Service port
//! is served here per request (hyper: HTTP/1.1 and HTTP/2; upgrades passed
//! through), over one connection to the app per inbound connection (opened
//! again, once per request, if the app closed it):
//!
//! - the path is normalized ([`super::path`]) and the app gets the path
//!   that was authorized;
//! - authorization with the request's HTTP attributes
//!   ([`inbound::authorize`] with [`Scope::Request`], read from the current
//!   snapshot, so a policy change applies to the next request): a denial
//!   answers 403 `RBAC: access denied` with flag `RBAC` (gRPC: HTTP 200,
//!   trailers-only, `grpc-status: 7`), is logged with the policy, rule and
//!   reason, and counted in `ferry_authz_denied_total`;
//! - then the RateLimitPolicies of the request's app address
//!   ([`super::ratelimit`]: token buckets per policy, total and per client
//!   identity, kept by the agent): over a limit, 429 with flag `RL` (gRPC:
//!   `RESOURCE_EXHAUSTED`), counted in `ferry_rate_limited_total`. A
//!   denied request takes no token;
//! - Istio's request metrics with `reporter="destination"` and one
//!   access-log line per request ([`RequestRecord`], the same code as the
//!   source side's);
//! - a live re-check leaves a connection served per request alone (each
//!   request is decided when it arrives); one that carries an upgraded
//!   stream is closed when every request it could carry would be denied
//!   (the stream at once; requests in flight, if any, within
//!   `REVOKE_GRACE`).

use std::{
    collections::HashSet,
    convert::Infallible,
    io,
    sync::{Arc, Mutex},
};

use ferry_model::{
    authz::{Headers, HttpAttrs},
    state::Hop,
};
use http_body_util::BodyExt;
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
    header::{self, HeaderValue},
    HeaderMap, Request, Response, StatusCode, Uri,
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    task::{AbortHandle, JoinHandle},
};

use super::{
    body::{grpc_status, Body, Counted, Metered},
    path, ratelimit,
    server::{failed, grpc_reply, is_grpc, local_reply, strip_hop_by_hop},
    traced,
    upstream::CONNECT_TIMEOUT,
};
use crate::{
    proxy::{
        copy,
        inbound::{self, identity_label, Caller, Scope},
        PodCtx, Proxy,
    },
    telemetry::{
        http::{Flag, RequestProtocol, RequestRecord},
        metrics::TcpLabels,
        outcome::Outcome,
        trace::Kind,
        Conn, ConnGuard,
    },
};

/// The body of a denied request (Envoy's, which clients and tests know).
pub const DENIED: &str = "RBAC: access denied";
/// gRPC PERMISSION_DENIED.
pub const GRPC_PERMISSION_DENIED: u32 = 7;

/// What the destination needs about a connection [`inbound::open`] opened.
pub struct Served {
    pub proxy: Arc<Proxy>,
    pub pod: Arc<PodCtx>,
    /// `namespace/name` of the Service the client addressed (same node) or
    /// of the one behind the app port.
    pub service: Option<String>,
    /// The connection's standard labels, `reporter="destination"`.
    pub labels: TcpLabels,
}

/// The connection to the app.
enum App {
    /// Delivered, no HTTP handshake yet (its version is the client's).
    Fresh(TcpStream),
    H1(http1::SendRequest<Body>),
    H2(http2::SendRequest<Body>),
    /// Taken by an upgrade, or failed.
    Closed,
}

/// What every request of one inbound connection shares.
struct ConnCx {
    served: Served,
    conn: Arc<Conn>,
    app: tokio::sync::Mutex<App>,
    /// Tasks driving app connections; aborted with the inbound connection.
    drivers: Mutex<Vec<AbortHandle>>,
    /// The stream of an HTTP/1.1 upgrade, copied both ways.
    upgrade: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for ConnCx {
    fn drop(&mut self) {
        for d in self.drivers.get_mut().unwrap_or_else(|e| e.into_inner()).drain(..) {
            d.abort();
        }
        if let Some(u) = self.upgrade.get_mut().unwrap_or_else(|e| e.into_inner()).take() {
            u.abort();
        }
    }
}

/// How long requests in flight on a connection a policy change revokes
/// may take to finish.
const REVOKE_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves `client` per request until it closes (and an upgraded stream on
/// it ends), or until a live re-check revokes the connection; `guard` is
/// the inbound connection's record, `app` the delivered connection.
pub async fn serve<S>(served: Served, mut guard: ConnGuard, app: TcpStream, client: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = guard.conn.clone();
    let cx = Arc::new(ConnCx {
        served,
        conn: conn.clone(),
        app: tokio::sync::Mutex::new(App::Fresh(app)),
        drivers: Mutex::new(Vec::new()),
        upgrade: Mutex::new(None),
    });
    let per_request = cx.clone();
    let svc = hyper::service::service_fn(move |req| {
        let cx = per_request.clone();
        async move { Ok::<_, Infallible>(traced_handle(cx, req).await) }
    });
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1().timer(TokioTimer::new()).keep_alive(true);
    b.http2().timer(TokioTimer::new());
    let server = b.serve_connection_with_upgrades(TokioIo::new(client), svc);
    tokio::pin!(server);
    tokio::select! {
        r = server.as_mut() => {
            if let Err(e) = r {
                guard.outcome = Outcome::Relay(io::Error::other(e));
            }
        }
        d = conn.revoke.revoked() => {
            // Each request in flight was decided under the policies of its
            // arrival (or is answered 403 under the new ones): let it end,
            // take no more (HTTP/1.1 `connection: close`, HTTP/2 GOAWAY),
            // within REVOKE_GRACE. Cutting at once turned them into 503s.
            server.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(REVOKE_GRACE, server.as_mut()).await;
            guard.outcome = Outcome::Denied(d);
            return;
        }
    }
    // An upgraded stream outlives the HTTP exchange; the connection lasts
    // as long as it does.
    let upgraded = cx.upgrade.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(h) = upgraded {
        let abort = h.abort_handle();
        tokio::select! {
            _ = h => {}
            d = conn.revoke.revoked() => {
                abort.abort();
                guard.outcome = Outcome::Denied(d);
            }
        }
    }
}

/// [`handle`] inside the request's server span (`settings.tracing`): the
/// app gets the server span as its parent.
async fn traced_handle(cx: Arc<ConnCx>, mut req: Request<Incoming>) -> Response<Body> {
    let state = cx.served.proxy.state();
    let (orig, client) = (cx.conn.orig_dst, cx.conn.client);
    let span = traced::start(
        &cx.served.proxy,
        &state,
        Kind::Server,
        &cx.served.pod.workload,
        &mut req,
        *client.ip(),
        || traced::span_name(cx.served.service.as_deref(), *orig.ip(), orig.port()),
    );
    drop(state);
    let resp = handle(cx, req).await;
    traced::finish(span, resp, orig.port())
}

/// Request headers as authorization reads them: a header sent more than
/// once is seen with its values joined by `,` (as Envoy presents them), and
/// a value that is not UTF-8 lossily, so that a condition never reads one
/// value while the app reads another, or reads an absent header where one
/// is present.
struct AuthzHeaders<'a> {
    map: &'a HeaderMap,
    special: Vec<(&'a str, String)>,
}

impl<'a> AuthzHeaders<'a> {
    fn new(map: &'a HeaderMap) -> Self {
        let mut special = Vec::new();
        let mut seen = HashSet::new();
        for name in map.keys() {
            if !seen.insert(name.as_str()) {
                continue;
            }
            let mut values = map.get_all(name).iter();
            let first = values.next();
            let many = values.next().is_some();
            if many || first.is_some_and(|v| v.to_str().is_err()) {
                let joined = map
                    .get_all(name)
                    .iter()
                    .map(|v| String::from_utf8_lossy(v.as_bytes()))
                    .collect::<Vec<_>>()
                    .join(",");
                special.push((name.as_str(), joined));
            }
        }
        Self { map, special }
    }
}

impl Headers for AuthzHeaders<'_> {
    fn get(&self, name: &str) -> Option<&str> {
        if let Some((_, v)) = self.special.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)) {
            return Some(v);
        }
        self.map.get(name)?.to_str().ok()
    }
}

/// The request's authority: `:authority` (HTTP/2, absolute form), else Host.
fn authority_of<B>(req: &Request<B>) -> String {
    req.uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| req.headers().get(header::HOST)?.to_str().ok().map(str::to_owned))
        .unwrap_or_default()
}

async fn handle(cx: Arc<ConnCx>, mut req: Request<Incoming>) -> Response<Body> {
    let (proxy, pod, conn) = (&cx.served.proxy, &cx.served.pod, &cx.conn);
    let mut rec = proxy.telemetry.request(&pod.workload.namespace, conn.source.clone());
    rec.direction = conn.direction;
    let authority = authority_of(&req);
    let normalized = path::normalize(req.uri().path()).into_owned();
    let grpc = is_grpc(req.headers());
    rec.method = req.method().as_str().to_owned();
    rec.authority = authority.clone();
    rec.path = normalized.clone();
    if grpc {
        rec.protocol = RequestProtocol::Grpc;
    }
    rec.service = cx.served.service.clone();
    rec.labels = Some(cx.served.labels.clone());
    rec.upstream = Some((conn.orig_dst, Hop::Local));
    rec.attempts = 1;

    // A fresh snapshot per request: a policy change applies to the next one.
    let state = proxy.state();
    let identity = conn.peer_identity.get();
    let (denied, audited) = {
        let headers = AuthzHeaders::new(req.headers());
        let attrs = HttpAttrs {
            method: req.method().as_str(),
            path: &normalized,
            host: &authority,
            headers: &headers,
        };
        let caller = Caller {
            peer: conn.client,
            target: conn.orig_dst,
            identity,
        };
        inbound::authorize(&state, &pod.workload, &caller, Scope::Request(attrs), false)
    };
    for policy in audited {
        tracing::info!(pod = %pod.label, source = %identity_label(identity), client = %conn.client, destination = %conn.orig_dst, method = %rec.method, path = %rec.path, policy = %policy, "authorization AUDIT policy matched");
        proxy.telemetry.count_audit(policy);
    }
    if let Some(d) = denied {
        tracing::warn!(pod = %pod.label, source = %identity_label(identity), client = %conn.client, destination = %conn.orig_dst, via = %conn.direction, method = %rec.method, path = %rec.path, policy = d.policy_label(), rule = %d.rule_label(), reason = d.reason.as_str(), "request denied by authorization policy");
        proxy.telemetry.count_denial(&d);
        rec.flags.insert(Flag::Rbac);
        if grpc {
            return grpc_reply(rec, GRPC_PERMISSION_DENIED, DENIED);
        }
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        return local_reply(rec, StatusCode::FORBIDDEN, h, DENIED);
    }
    // Rate limits, after authorization (a denied client spends nothing),
    // with the peer's verified identity (None: plaintext, one shared bucket).
    let limits = &proxy.http.rate_limits;
    if let Err(limited) = limits.check(state.rate_limits_at(conn.orig_dst), identity) {
        return ratelimit::refuse(limits, &proxy.telemetry, rec, limited, grpc);
    }
    drop(state);

    // On to the app, as the client sent it (hop-by-hop headers aside), with
    // the normalized path.
    let h2 = req.version() == hyper::Version::HTTP_2;
    let upgrade = !h2 && req.headers().contains_key(header::UPGRADE);
    let on_client = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, incoming) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers, upgrade);
    let path_and_query = match parts.uri.query() {
        Some(q) => format!("{normalized}?{q}"),
        None => normalized,
    };
    let uri = if h2 {
        let mut p = parts.uri.clone().into_parts();
        p.path_and_query = path_and_query.parse().ok();
        if p.scheme.is_none() {
            p.scheme = Some(hyper::http::uri::Scheme::HTTP);
        }
        if p.authority.is_none() {
            p.authority = authority.parse().ok();
        }
        Uri::from_parts(p).ok()
    } else {
        path_and_query.parse().ok()
    };
    parts.uri = uri.unwrap_or_else(|| parts.uri.clone());
    if h2 {
        parts.version = hyper::Version::HTTP_2;
    }
    let body = Metered::new(incoming, rec.request_bytes.clone()).boxed_unsync();
    let out = Request::from_parts(parts, body);
    let mut resp = match cx.send(out, h2).await {
        Ok(r) => r,
        Err(flag) => return failed(rec, flag),
    };
    if let Some(on_client) = on_client {
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let on_app = hyper::upgrade::on(&mut resp);
            let conn = cx.conn.clone();
            // From now on a live re-check looks at it (see `inbound::recheck`).
            conn.upgraded.store(true, std::sync::atomic::Ordering::Relaxed);
            let task = tokio::spawn(async move {
                if let (Ok(c), Ok(u)) = tokio::join!(on_client, on_app) {
                    let _ = copy::bidi(TokioIo::new(c), TokioIo::new(u), &conn.sent, &conn.received).await;
                }
            });
            if let Some(old) = cx.upgrade.lock().unwrap_or_else(|e| e.into_inner()).replace(task) {
                old.abort();
            }
        }
    }
    respond(resp, rec)
}

/// The app's response on its way back, its body counted.
fn respond(resp: Response<Incoming>, mut rec: RequestRecord) -> Response<Body> {
    let (mut parts, incoming) = resp.into_parts();
    rec.status = parts.status.as_u16();
    if let Some(s) = grpc_status(&parts.headers) {
        rec.grpc_status = Some(s);
    }
    if parts.status != StatusCode::SWITCHING_PROTOCOLS {
        strip_hop_by_hop(&mut parts.headers, false);
    }
    let mut resp = Response::from_parts(parts, ());
    traced::note(&mut resp, &rec);
    resp.map(|()| Counted::new(incoming, rec).boxed_unsync())
}

impl ConnCx {
    /// Sends `req` to the app on this connection's app connection (opened
    /// again if the app closed it). A request a reused HTTP/1.1 connection
    /// did not send (it had closed meanwhile), or a bodiless idempotent one
    /// it died under before any answer, is sent once more on a new one.
    /// Failures: `UF` (no connection), `UC` (it broke mid-request).
    async fn send(&self, req: Request<Body>, h2: bool) -> Result<Response<Incoming>, Flag> {
        let mut app = self.app.lock().await;
        let reused = match &*app {
            App::H1(s) => !h2 && !s.is_closed(),
            App::H2(s) => h2 && !s.is_closed(),
            App::Fresh(_) | App::Closed => false,
        };
        if !reused {
            *app = self.connect(std::mem::replace(&mut *app, App::Closed), h2).await?;
        }
        match &mut *app {
            App::H1(s) => {
                if s.ready().await.is_err() {
                    *app = self.connect(App::Closed, false).await?;
                }
                let App::H1(s) = &mut *app else {
                    return Err(Flag::UpstreamConnectFailure);
                };
                // Also sent again if the reused connection dies under it
                // before any answer (the app closed it as it went out).
                let again = if reused {
                    super::upstream::resendable(&req)
                } else {
                    None
                };
                let sent = s.try_send_request(req);
                drop(app);
                match sent.await {
                    Ok(r) => Ok(r),
                    Err(mut e) => match e.take_message().or(again) {
                        Some(req) if reused => {
                            let mut app = self.app.lock().await;
                            *app = self.connect(App::Closed, false).await?;
                            let App::H1(s) = &mut *app else {
                                return Err(Flag::UpstreamConnectFailure);
                            };
                            let again = s.send_request(req);
                            drop(app);
                            again.await.map_err(|_| Flag::UpstreamConnectionTermination)
                        }
                        _ => Err(Flag::UpstreamConnectionTermination),
                    },
                }
            }
            App::H2(s) => {
                let mut s = s.clone();
                drop(app);
                if s.ready().await.is_err() {
                    return Err(Flag::UpstreamConnectionTermination);
                }
                s.send_request(req)
                    .await
                    .map_err(|_| Flag::UpstreamConnectionTermination)
            }
            App::Fresh(_) | App::Closed => Err(Flag::UpstreamConnectFailure),
        }
    }

    /// The HTTP handshake on `previous` if it is a fresh delivery, else on
    /// a new delivery to the app (from the client's address), within
    /// [`CONNECT_TIMEOUT`].
    async fn connect(&self, previous: App, h2: bool) -> Result<App, Flag> {
        let open = async {
            let stream = match previous {
                App::Fresh(s) => s,
                _ => {
                    let (proxy, pod) = (&self.served.proxy, &self.served.pod);
                    proxy.deliver(pod, *self.conn.client.ip(), self.conn.orig_dst).await?
                }
            };
            let io = TokioIo::new(stream);
            let (app, driver) = if h2 {
                let (s, conn) = http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .handshake(io)
                    .await
                    .map_err(io::Error::other)?;
                let d = tokio::spawn(async move {
                    let _ = conn.await;
                });
                (App::H2(s), d.abort_handle())
            } else {
                let (s, conn) = http1::Builder::new().handshake(io).await.map_err(io::Error::other)?;
                let d = tokio::spawn(async move {
                    let _ = conn.with_upgrades().await;
                });
                (App::H1(s), d.abort_handle())
            };
            let mut drivers = self.drivers.lock().unwrap_or_else(|e| e.into_inner());
            drivers.retain(|d| !d.is_finished());
            drivers.push(driver);
            Ok::<_, io::Error>(app)
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, open).await {
            Ok(Ok(app)) => Ok(app),
            Ok(Err(e)) => {
                tracing::debug!(pod = %self.served.pod.label, target = %self.conn.orig_dst, error = %e, "app connection failed");
                Err(Flag::UpstreamConnectFailure)
            }
            Err(_) => Err(Flag::UpstreamConnectFailure),
        }
    }
}
