//! Outbound: a connection from an app, steered to 127.0.0.1:15001 in its pod.
//! Original destination -> route (a pure decision over the state snapshot)
//! -> local pod, tunnel or direct; then relay.

use std::sync::atomic::Ordering;

use ferry_model::{admin::Direction, state::Hop};
use tokio::net::TcpStream;

use super::{copy, orig_dst::ConnKey, PodCtx, Proxy};
use crate::{
    sockets,
    telemetry::{
        metrics::{tcp_labels, Peer, Reporter},
        outcome::Outcome,
    },
    tunnel::{BoxStream, TunnelSource},
};

pub async fn handle(proxy: &Proxy, pod: &PodCtx, client: TcpStream) {
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
    let mut g = proxy.telemetry.open(
        Direction::Outbound,
        &pod.workload.namespace,
        pod.label.clone(),
        peer,
        orig,
    );
    let state = proxy.state();
    let route = match state.route(orig) {
        Ok(r) => r,
        Err(e) => {
            g.outcome = Outcome::NoRoute(e);
            return;
        }
    };
    g.routed(route.service.clone(), route.endpoint, route.hop);
    let dst = state.workload_by_ip(*route.endpoint.ip());
    // Only the tunnel leaves the node; it is mutual TLS when a CA is configured.
    let mtls = route.hop == Hop::Tunnel && proxy.tunnel.is_mtls();
    // Identities are formatted only where used: the tunnel's expected peer,
    // and principal labels under mTLS.
    let dst_id = dst.filter(|_| route.hop == Hop::Tunnel).map(|d| d.spiffe_id());
    let src_id = mtls.then(|| pod.workload.spiffe_id());
    let src_peer = Peer {
        workload: Some(&pod.workload),
        principal: src_id.as_ref(),
    };
    let dst_peer = Peer {
        workload: dst,
        principal: dst_id.as_ref().filter(|_| mtls),
    };
    let svc = route.service.as_deref();
    g.report(&tcp_labels(Reporter::Source, src_peer, dst_peer, svc, mtls));
    if route.hop == Hop::Local {
        // For a same-node hop this agent is also the destination's proxy.
        g.report(&tcp_labels(Reporter::Destination, src_peer, dst_peer, svc, mtls));
    }
    let upstream: std::io::Result<BoxStream> = match (route.hop, dst_id) {
        (Hop::Local, _) => match proxy.local_pod_by_ip(*route.endpoint.ip()) {
            Some(d) => proxy
                .deliver(&d, pod.ip(), route.endpoint)
                .await
                .map(|s| Box::new(s) as BoxStream),
            None => Err(std::io::Error::other(
                "destination pod is not enrolled on this node yet",
            )),
        },
        (Hop::Tunnel, Some(expected)) => {
            let src = TunnelSource {
                uid: &pod.workload.uid,
                label: &pod.label,
                sockets: &*pod.sockets,
            };
            let s = proxy.tunnel.open(src, route.endpoint, &expected).await;
            if s.is_ok() && proxy.tunnel.is_mtls() {
                // open() succeeds only if the peer proved exactly this id.
                let _ = g.conn.peer_identity.set(expected);
            }
            s
        }
        (Hop::Tunnel, None) => Err(std::io::Error::other("tunnel destination is not a known workload")),
        (Hop::Direct, _) => sockets::connect(&*pod.sockets, sockets::Source::Any, route.endpoint)
            .await
            .map(|s| Box::new(s) as BoxStream),
    };
    let upstream = match upstream {
        Ok(u) => u,
        Err(error) => {
            g.outcome = Outcome::Connect {
                to: route.endpoint,
                error,
            };
            return;
        }
    };
    if let Err(e) = copy::bidi(client, upstream, &g.conn.sent, &g.conn.received).await {
        g.outcome = Outcome::Relay(e);
    }
}
