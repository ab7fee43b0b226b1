//! The one inbound path: every connection to an enrolled pod's app, whether
//! plaintext handed over by sk_lookup (15006) or a stream out of the tunnel
//! (15008), is opened by [`open`] (telemetry, the gate deciding by
//! `ferry_model::admission`, then L4 authorization by the destination's
//! `AuthorizationPolicy`s ([`authorize`]), delivery from the client's own
//! address) and carried by [`relay`] until it ends or a policy change
//! revokes it ([`recheck`]). The tunnel is only the transport: it hands its
//! streams here through [`FromTunnel`].

use std::{
    net::{IpAddr, SocketAddrV4},
    sync::Arc,
};

use ferry_model::{
    admin::Direction,
    admission::{self, InboundConn, Refusal},
    authz::{Request, Verdict},
    state::State,
    SpiffeId, Workload,
};
use tokio::net::TcpStream;

use super::{copy, PodCtx, Proxy};
use crate::{
    sockets,
    telemetry::{
        metrics::{tcp_labels, Peer, Reporter},
        outcome::{Denial, Outcome},
        ConnGuard,
    },
    tunnel::{BoxStream, Handler, Reject, TunnelRequest},
};

/// An admitted, delivered connection, waiting for its client stream.
pub struct Opened {
    guard: ConnGuard,
    app: TcpStream,
}

/// Admits and delivers `conn` to `pod`; every outcome, refusals included,
/// is recorded (access log, counters). On refusal or failure the client's
/// stream is to be closed (or answered by the tunnel).
pub async fn open(proxy: &Proxy, pod: &PodCtx, conn: InboundConn) -> Result<Opened, Reject> {
    let state = proxy.state();
    let src = state.workload_by_ip(*conn.peer.ip());
    let source = match (src, &conn.identity) {
        (Some(w), _) => w.label(),
        (None, Some(id)) => id.to_string(),
        (None, None) => conn.peer.ip().to_string(),
    };
    let mut g = proxy
        .telemetry
        .open(conn.via, &pod.workload.namespace, source, conn.peer, conn.target);
    if let Some(id) = &conn.identity {
        let _ = g.conn.peer_identity.set(id.clone());
    }
    let mtls = conn.identity.is_some();
    // Formatted only when a proven identity makes it a label.
    let dst_id = mtls.then(|| pod.workload.spiffe_id());
    g.report(&tcp_labels(
        Reporter::Destination,
        Peer {
            workload: src,
            principal: conn.identity.as_ref(),
        },
        Peer {
            workload: Some(&pod.workload),
            principal: dst_id.as_ref(),
        },
        None,
        mtls,
    ));
    // Read again now that the connection is in the live table: a policy
    // change from here on finds it there and re-checks it (`recheck`).
    let state = proxy.state();
    if let Err(r) = admission::admit(&state, &pod.workload, &conn) {
        tracing::warn!(pod = %pod.label, client = %conn.peer, via = %conn.via, reason = %r, "refused inbound connection");
        let reject = match r {
            Refusal::Misdirected { .. } => Reject::Misdirected,
            Refusal::PlaintextToStrict => Reject::Forbidden,
        };
        g.outcome = Outcome::Refused(r);
        return Err(reject);
    }
    let (denied, audited) = authorize(
        &state,
        &pod.workload,
        conn.peer,
        conn.target,
        conn.identity.as_ref(),
        false,
    );
    for policy in audited {
        tracing::info!(pod = %pod.label, source = %identity_label(conn.identity.as_ref()), client = %conn.peer, destination = %conn.target, policy = %policy, "authorization AUDIT policy matched");
        g.audited(policy);
    }
    if let Some(d) = denied {
        tracing::warn!(pod = %pod.label, source = %identity_label(conn.identity.as_ref()), client = %conn.peer, destination = %conn.target, via = %conn.via, policy = d.policy_label(), rule = %d.rule_label(), reason = d.reason.as_str(), "denied by authorization policy");
        g.outcome = Outcome::Denied(d);
        return Err(Reject::Forbidden);
    }
    match proxy.deliver(pod, *conn.peer.ip(), conn.target).await {
        Ok(app) => Ok(Opened { guard: g, app }),
        Err(error) => {
            tracing::warn!(pod = %pod.label, target = %conn.target, error = %error, "delivery failed");
            g.outcome = Outcome::Connect { to: conn.target, error };
            Err(Reject::Unavailable)
        }
    }
}

/// Copies between the client's stream and the app until both end, or until
/// the connection is revoked (a policy change no longer allows it): then
/// both are closed.
pub async fn relay<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(opened: Opened, client: S) {
    let Opened { mut guard, app } = opened;
    let conn = guard.conn.clone();
    tokio::select! {
        r = copy::bidi(client, app, &conn.sent, &conn.received) => {
            if let Err(e) = r {
                guard.outcome = Outcome::Relay(e);
            }
        }
        d = conn.revoke.revoked() => guard.outcome = Outcome::Denied(d),
    }
}

/// The L4 authorization decision for a connection from `peer` (proving
/// `identity` by mutual TLS, or none: plaintext) to `target` in local
/// workload `pod` under `state`: the policies that apply to the workload as
/// `state` knows it, no HTTP attributes (an ALLOW rule that needs HTTP does
/// not match: fail closed). Returns the denial, if any, and the AUDIT
/// policies that matched. Only formats the identity when policies apply.
pub fn authorize(
    state: &State,
    pod: &Workload,
    peer: SocketAddrV4,
    target: SocketAddrV4,
    identity: Option<&SpiffeId>,
    live: bool,
) -> (Option<Denial>, Vec<String>) {
    let w = state.workloads.get(&pod.uid).unwrap_or(pod);
    if state.authz_for(w).is_empty() {
        return (None, Vec::new());
    }
    let principal = identity.map(SpiffeId::to_string);
    let req = Request {
        source_principal: principal.as_deref(),
        source_namespace: identity.map(SpiffeId::namespace),
        source_ip: IpAddr::V4(*peer.ip()),
        destination_ip: IpAddr::V4(*target.ip()),
        destination_port: target.port(),
        sni: None,
        http: None,
    };
    state.authorize(w, &req, |d| {
        let audited = d.audited.iter().map(ToString::to_string).collect();
        let denied = match d.verdict {
            Verdict::Allow { .. } => None,
            Verdict::Deny { policy, rule, reason } => Some(Denial {
                policy: policy.map(|p| p.to_string()),
                rule,
                reason,
                live,
            }),
        };
        (denied, audited)
    })
}

/// After a state swap: every live inbound connection to an enrolled pod of
/// this node is checked again under `state`'s policies, and those no longer
/// allowed are closed (their relay ends; through HBONE the stream is
/// reset), as ztunnel does. Nothing to do when no policy exists.
pub fn recheck(proxy: &super::Proxy, state: &State) {
    if state.authorization_policies.is_empty() {
        return;
    }
    for c in proxy.telemetry.live() {
        if !matches!(c.direction, Direction::Inbound | Direction::Tunnel) {
            continue;
        }
        let Some(w) = state
            .workload_by_ip(*c.orig_dst.ip())
            .filter(|w| w.enrolled && w.node == state.node)
        else {
            continue;
        };
        let identity = c.peer_identity.get();
        if let (Some(d), _) = authorize(state, w, c.client, c.orig_dst, identity, true) {
            tracing::warn!(pod = %w.label(), source = %identity_label(identity), client = %c.client, destination = %c.orig_dst, via = %c.direction, policy = d.policy_label(), rule = %d.rule_label(), reason = d.reason.as_str(), "live connection closed: a policy change denies it");
            c.revoke.revoke(d);
        }
    }
}

/// A peer's identity for logs: its SPIFFE id, or `-` (plaintext).
fn identity_label(id: Option<&SpiffeId>) -> String {
    id.map_or_else(|| "-".to_owned(), SpiffeId::to_string)
}

/// A plaintext connection handed over by sk_lookup, which kept the
/// destination: the accepted socket's local address is the app's.
pub async fn handle_plain(proxy: Arc<Proxy>, pod: Arc<PodCtx>, client: TcpStream) {
    let Ok((target, peer)) = sockets::v4_addrs(&client) else {
        return;
    };
    let conn = InboundConn {
        peer,
        target,
        identity: None,
        via: Direction::Inbound,
    };
    if let Ok(opened) = open(&proxy, &pod, conn).await {
        relay(opened, client).await;
    }
}

/// The tunnel's handler for one pod: its streams take the same path.
pub struct FromTunnel {
    pub proxy: Arc<Proxy>,
    pub pod: Arc<PodCtx>,
}

impl Handler for FromTunnel {
    type Accepted = Opened;

    async fn accept(&self, req: TunnelRequest) -> Result<Opened, Reject> {
        let conn = InboundConn {
            peer: req.peer,
            target: req.target,
            identity: req.identity,
            via: Direction::Tunnel,
        };
        open(&self.proxy, &self.pod, conn).await
    }

    async fn relay(&self, opened: Opened, stream: BoxStream) {
        relay(opened, stream).await
    }
}
