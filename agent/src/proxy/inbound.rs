//! The one inbound path: every connection to an enrolled pod's app, whether
//! plaintext handed over by sk_lookup (15006) or a stream out of the tunnel
//! (15008), is opened by [`open`] (telemetry, the gate deciding by
//! `ferry_model::admission`, delivery from the client's own address) and carried by [`relay`]. The tunnel is only the
//! transport: it hands its streams here through [`FromTunnel`].

use std::sync::Arc;

use ferry_model::{
    admin::Direction,
    admission::{self, InboundConn, Refusal},
};
use tokio::net::TcpStream;

use super::{copy, PodCtx, Proxy};
use crate::{
    sockets,
    telemetry::{
        metrics::{tcp_labels, Peer, Reporter},
        outcome::Outcome,
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
    if let Err(r) = admission::admit(&state, &pod.workload, &conn) {
        tracing::warn!(pod = %pod.label, client = %conn.peer, via = %conn.via, reason = %r, "refused inbound connection");
        let reject = match r {
            Refusal::Misdirected { .. } => Reject::Misdirected,
            Refusal::PlaintextToStrict => Reject::Forbidden,
        };
        g.outcome = Outcome::Refused(r);
        return Err(reject);
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

/// Copies between the client's stream and the app until both end.
pub async fn relay<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(opened: Opened, client: S) {
    let Opened { mut guard, app } = opened;
    if let Err(e) = copy::bidi(client, app, &guard.conn.sent, &guard.conn.received).await {
        guard.outcome = Outcome::Relay(e);
    }
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
