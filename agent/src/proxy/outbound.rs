//! Outbound: a connection from an app, steered to 127.0.0.1:15001 in its pod.
//! Original destination -> protocol (the Service port's, else detected by
//! [`http::detect`]) -> HTTP ([`http::serve`]: routed per request) or opaque
//! TCP: route (a pure decision over the state snapshot; a Service's endpoint
//! per connection by the load balancer, [`super::balance`]) -> local pod, tunnel
//! or direct ([`open_upstream`], shared with the HTTP path); then relay.
//! A local pod is reached through the one inbound path
//! ([`inbound::open_local`]: gate, authorization, destination telemetry,
//! live re-check), never delivered around it.

use std::{
    net::SocketAddrV4,
    sync::{atomic::Ordering, Arc},
};

use ferry_model::{
    admin::Direction,
    state::{Hop, Route, RouteError, State, Target},
    traffic::TcpKeepalive,
    Protocol,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

use super::{
    balance::{Ask, Picked},
    copy,
    http::{self, circuit},
    inbound,
    orig_dst::ConnKey,
    PodCtx, Proxy,
};
use crate::{
    sockets,
    telemetry::{
        metrics::{tcp_labels, Peer, Reporter},
        outcome::Outcome,
        ConnGuard,
    },
    tunnel::{BoxStream, TunnelSource},
};

/// How a destination's connections are handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Handling {
    Http,
    Tcp,
    Detect,
}

/// The Service port's protocol decides; `auto` ports and pod addresses
/// without a Service are detected.
fn handling(state: &State, orig: std::net::SocketAddrV4) -> Handling {
    match state.service_at(orig).map(|(_, p)| p.protocol) {
        Some(p) if p.is_http() => Handling::Http,
        Some(Protocol::Auto) | None => Handling::Detect,
        Some(_) => Handling::Tcp,
    }
}

pub async fn handle(proxy: Arc<Proxy>, pod: Arc<PodCtx>, mut client: TcpStream) {
    let Ok((local, peer)) = sockets::v4_addrs(&client) else {
        return;
    };
    let key = ConnKey {
        netns_cookie: pod.netns_cookie,
        app: peer,
        proxy: local,
    };
    let Some(orig) = proxy.orig.take(&key) else {
        proxy.telemetry.counters.no_orig_dst.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(pod = %pod.label, client = %peer, "no original destination recorded; closing");
        return;
    };
    let g = proxy.telemetry.open(
        Direction::Outbound,
        &pod.workload.namespace,
        pod.label.clone(),
        peer,
        orig,
    );
    let state = proxy.state();
    match handling(&state, orig) {
        Handling::Tcp => relay_tcp(&proxy, &pod, g, client, &state).await,
        Handling::Http => http::serve(proxy.clone(), pod.clone(), orig, g, client).await,
        Handling::Detect => {
            let (d, first) = http::detect::sniff(&mut client, http::detect::SNIFF_WAIT).await;
            proxy.telemetry.metrics.http.detected(d);
            let client = http::detect::Rewind::new(first, client);
            if d.is_http() {
                http::serve(proxy.clone(), pod.clone(), orig, g, client).await
            } else {
                relay_tcp(&proxy, &pod, g, client, &state).await
            }
        }
    }
}

/// Opaque TCP: one route per connection, then a byte relay (for a local
/// pod, the inbound path's: it honours a live re-check's revocation).
async fn relay_tcp<S>(proxy: &Arc<Proxy>, pod: &PodCtx, mut g: ConnGuard, client: S, state: &State)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let orig = g.conn.orig_dst;
    // Held until the connection ends: the endpoint's in-flight count.
    let pick = match pick_tcp(proxy, pod, state, orig) {
        Ok(p) => p,
        Err(e) => {
            g.outcome = Outcome::NoRoute(e);
            return;
        }
    };
    let route = pick.route.clone();
    g.routed(route.service.clone(), route.endpoint, route.hop);
    let dst = state.workload_by_ip(*route.endpoint.ip());
    // Only the tunnel leaves the node; it is mutual TLS when a CA is configured.
    let mtls = route.hop == Hop::Tunnel && proxy.tunnel.is_mtls();
    // Identities are formatted only where used: principal labels under mTLS.
    let dst_id = dst.filter(|_| mtls).map(|d| d.spiffe_id());
    let src_id = mtls.then(|| pod.workload.spiffe_id());
    let src_peer = Peer {
        workload: Some(&pod.workload),
        principal: src_id.as_ref(),
    };
    let dst_peer = Peer {
        workload: dst,
        principal: dst_id.as_ref(),
    };
    let svc = route.service.as_deref();
    let mut labels = tcp_labels(Reporter::Source, src_peer, dst_peer, svc, mtls);
    // Circuit breaking (connectionPool): past maxConnections the connection
    // is refused at once (UO); connectTimeout and tcpKeepalive apply.
    let circuit = proxy
        .http
        .pool
        .breakers
        .for_tcp(&proxy.telemetry, state, &pod.workload.uid, orig, &route);
    let _slot = match &circuit {
        Some(c) => match c.try_take(circuit::Kind::Connection) {
            Some(s) => Some(s),
            None => {
                labels.response_flags = "UO".into();
                g.report(&labels);
                let o = c.overflow(circuit::Overflow::Connections);
                g.outcome = Outcome::Connect {
                    to: route.endpoint,
                    error: std::io::Error::other(format!("upstream overflow (UO): {o}")),
                };
                return;
            }
        },
        None => None,
    };
    // The destination side of a same-node hop reports itself (inbound path).
    g.report(&labels);
    let keepalive = circuit.as_ref().and_then(|c| c.limits.tcp_keepalive);
    let open = open_route(proxy, pod, g.conn.client, &route, keepalive.as_ref());
    let opened = circuit::within(circuit.as_ref(), open).await;
    // For outlier detection; a refusal by policy (authorization, STRICT) is
    // not the endpoint failing.
    match &opened {
        Ok(_) => pick.report(ferry_model::balance::Outcome::Connected),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {}
        Err(_) => pick.report(ferry_model::balance::Outcome::LocalFailure),
    }
    let upstream = match opened {
        Ok(Upstream::Stream(u)) => u,
        Ok(Upstream::Local(opened)) => {
            let local = opened.conn();
            let (c, l) = (g.conn.clone(), local.clone());
            let mirror = move || {
                c.sent.store(l.sent.load(Ordering::Relaxed), Ordering::Relaxed);
                c.received.store(l.received.load(Ordering::Relaxed), Ordering::Relaxed);
            };
            // One relay serves both records (the destination's counts it):
            // the outbound record follows it while it runs, for `/conns`.
            let serve = inbound::serve(*opened, client);
            tokio::pin!(serve);
            let mut tick = tokio::time::interval(LOCAL_COUNTS_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = &mut serve => break,
                    _ = tick.tick() => mirror(),
                }
            }
            mirror();
            if let Some(d) = local.revoke.reason() {
                g.outcome = Outcome::Relay(std::io::Error::new(
                    std::io::ErrorKind::ConnectionAborted,
                    format!("closed at the destination: {d}"),
                ));
            }
            return;
        }
        Err(error) => {
            g.outcome = Outcome::Connect {
                to: route.endpoint,
                error,
            };
            return;
        }
    };
    if mtls {
        if let Some(d) = dst {
            // open() succeeded: the peer proved exactly this id.
            let _ = g.conn.peer_identity.set(d.spiffe_id());
        }
    }
    if let Err(e) = copy::bidi(client, upstream, &g.conn.sent, &g.conn.received).await {
        g.outcome = Outcome::Relay(e);
    }
}

/// The route of an opaque TCP connection: a pod address as dialled; for a
/// Service, an endpoint chosen by the load balancer under its traffic
/// policy (per connection; a consistent hash can only use the source
/// address here).
fn pick_tcp(proxy: &Proxy, pod: &PodCtx, state: &State, orig: SocketAddrV4) -> Result<Picked, RouteError> {
    match state.target(orig)? {
        Target::Pod(r) => Ok(Picked::fixed(r)),
        Target::Service { service, port, subset } => {
            let ask = Ask {
                client: &pod.workload,
                orig: Some(orig),
                http: None,
            };
            proxy.balance.pick(state, &service, port, subset, &ask)
        }
    }
}

/// Where a connection to a route's endpoint goes on.
enum Upstream {
    /// A stream to the endpoint (tunnel or direct).
    Stream(BoxStream),
    /// A local pod, opened by the inbound path (waiting for its client
    /// stream; boxed: it is large).
    Local(Box<inbound::Opened>),
}

/// Buffer of the in-process pipe between the L7 path and a local pod's
/// inbound side.
const LOCAL_PIPE: usize = 64 * 1024;

/// How often a same-node connection's outbound record copies the byte counts
/// of the one relay that serves it.
const LOCAL_COUNTS_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// Opens `route`'s endpoint for `pod` (whose app connected from `client`)
/// by its hop: a local pod through the inbound path, the tunnel to another
/// node (the destination must prove its workload's identity under mTLS),
/// or directly from the pod.
async fn open_route(
    proxy: &Arc<Proxy>,
    pod: &PodCtx,
    client: std::net::SocketAddrV4,
    route: &Route,
    keepalive: Option<&TcpKeepalive>,
) -> std::io::Result<Upstream> {
    match route.hop {
        Hop::Local => match proxy.local_pod_by_ip(*route.endpoint.ip()) {
            Some(d) => {
                let o = inbound::open_local(proxy, pod, client, &d, route.endpoint, route.service.as_deref()).await?;
                if let Some(k) = keepalive {
                    keep_alive(o.app(), k);
                }
                Ok(Upstream::Local(Box::new(o)))
            }
            None => Err(std::io::Error::other(
                "destination pod is not enrolled on this node yet",
            )),
        },
        _ => open_remote(proxy, pod, route, keepalive).await.map(Upstream::Stream),
    }
}

/// `tcpKeepalive` on a socket the agent opened; a failure is logged, not fatal.
fn keep_alive(s: &TcpStream, k: &TcpKeepalive) {
    if let Err(e) = circuit::set_keepalive(s, k) {
        tracing::debug!(error = %e, "tcpKeepalive not set");
    }
}

/// Opens a stream from `pod` to `route`'s endpoint (the L7 path's upstream
/// connections): as [`open_route`]; a local pod's inbound side is served
/// over an in-process pipe, so its gate, authorization and destination
/// telemetry (per request on an HTTP port) apply as to any inbound
/// connection. The app's address is `pod`'s, with port 0 (the pooled
/// connection serves many of the app's).
pub(crate) async fn open_upstream(
    proxy: &Arc<Proxy>,
    pod: &PodCtx,
    route: &Route,
    keepalive: Option<&TcpKeepalive>,
) -> std::io::Result<BoxStream> {
    let client = std::net::SocketAddrV4::new(pod.ip(), 0);
    match open_route(proxy, pod, client, route, keepalive).await? {
        Upstream::Stream(s) => Ok(s),
        Upstream::Local(opened) => {
            let (near, far) = tokio::io::duplex(LOCAL_PIPE);
            tokio::spawn(inbound::serve(*opened, far));
            Ok(Box::new(near))
        }
    }
}

/// A stream through the tunnel, or directly from the pod (with
/// `keepalive`: the tunnel's connections are shared, and kept alive by it).
async fn open_remote(
    proxy: &Proxy,
    pod: &PodCtx,
    route: &Route,
    keepalive: Option<&TcpKeepalive>,
) -> std::io::Result<BoxStream> {
    match route.hop {
        Hop::Local => Err(std::io::Error::other("a local pod is opened by the inbound path")),
        Hop::Tunnel => {
            let state = proxy.state();
            let Some(expected) = state.workload_by_ip(*route.endpoint.ip()).map(|w| w.spiffe_id()) else {
                return Err(std::io::Error::other("tunnel destination is not a known workload"));
            };
            let src = TunnelSource {
                uid: &pod.workload.uid,
                label: &pod.label,
                sockets: &*pod.sockets,
            };
            proxy.tunnel.open(src, route.endpoint, &expected).await
        }
        Hop::Direct => {
            let s = sockets::connect(&*pod.sockets, sockets::Source::Any, route.endpoint).await?;
            if let Some(k) = keepalive {
                keep_alive(&s, k);
            }
            Ok(Box::new(s) as BoxStream)
        }
    }
}
