//! Outbound: a connection from an app, steered to 127.0.0.1:15001 in its pod.
//! Original destination (from eBPF) -> route -> local pod, tunnel or direct.

use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};

use super::{copy, PodCtx, Proxy};
use crate::{
    identity::spiffe_id,
    redirect::maps::SockKey,
    sockets,
    state::Hop,
    telemetry::{
        metrics::{tcp_labels, Peer, Reporter},
        Direction,
    },
    tunnel::BoxStream,
};

pub async fn serve(proxy: Arc<Proxy>, pod: Arc<PodCtx>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((s, _)) => {
                // Small writes (handshakes, HTTP/2 frames, request/response
                // protocols) must not wait for Nagle + delayed ACK (~40 ms).
                let _ = s.set_nodelay(true);
                let (proxy, pod) = (proxy.clone(), pod.clone());
                tokio::spawn(async move { handle(&proxy, &pod, s).await });
            }
            Err(e) => {
                tracing::warn!(pod = %pod.label(), error = %e, "outbound accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle(proxy: &Proxy, pod: &PodCtx, client: TcpStream) {
    let Ok((local, peer)) = sockets::v4_addrs(&client) else {
        return;
    };
    // The app's socket recorded the key from its side: local = app, remote = us.
    let key = SockKey::new(pod.netns_cookie, peer, local);
    let Some(orig) = proxy.orig.take(&key) else {
        proxy
            .telemetry
            .counters
            .no_orig_dst
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(pod = %pod.label(), client = %peer, "no original destination recorded; closing");
        return;
    };
    let orig = orig.addr();
    let mut g = proxy
        .telemetry
        .open(Direction::Outbound, &pod.workload.namespace, pod.label(), peer, orig);
    let route = match proxy.state().route(orig) {
        Ok(r) => r,
        Err(e) => {
            g.outcome = Some(e.to_string());
            return;
        }
    };
    g.routed(route.service.clone(), route.endpoint, route.hop);
    let state = proxy.state();
    let dst = state.workload_by_ip(*route.endpoint.ip());
    // Only the tunnel leaves the node; it is mutual TLS when a CA is configured.
    let mtls = route.hop == Hop::Tunnel && proxy.tunnel.is_mtls();
    let src_peer = Peer {
        workload: Some(&pod.workload),
        authenticated: mtls,
    };
    let dst_peer = Peer {
        workload: dst,
        authenticated: mtls,
    };
    let svc = route.service.as_deref();
    g.report(&tcp_labels(Reporter::Source, src_peer, dst_peer, svc, mtls));
    if route.hop == Hop::Local {
        // For a same-node hop this agent is also the destination's proxy.
        g.report(&tcp_labels(Reporter::Destination, src_peer, dst_peer, svc, mtls));
    }
    let upstream: std::io::Result<BoxStream> = match (route.hop, dst) {
        (Hop::Local, _) => match proxy.local_pod_by_ip(*route.endpoint.ip()) {
            Some(d) => proxy
                .deliver(&d, pod.ip(), route.endpoint)
                .await
                .map(|s| Box::new(s) as BoxStream),
            None => Err(std::io::Error::other(
                "destination pod is not enrolled on this node yet",
            )),
        },
        (Hop::Tunnel, Some(d)) => {
            let expected = spiffe_id(&d.namespace, &d.service_account);
            let s = proxy.tunnel.open(pod, route.endpoint, &expected).await;
            if s.is_ok() && proxy.tunnel.is_mtls() {
                // open() succeeds only if the peer proved exactly this id.
                let _ = g.conn.peer_identity.set(expected);
            }
            s
        }
        (Hop::Tunnel, None) => Err(std::io::Error::other("tunnel destination is not a known workload")),
        (Hop::Direct, _) => sockets::connect(Some(&pod.netns), sockets::Source::Any, route.endpoint)
            .await
            .map(|s| Box::new(s) as BoxStream),
    };
    let upstream = match upstream {
        Ok(u) => u,
        Err(e) => {
            g.outcome = Some(format!("connect {}: {e}", route.endpoint));
            return;
        }
    };
    if let Err(e) = copy::bidi(client, upstream, &g.conn.sent, &g.conn.received).await {
        g.outcome = Some(e.to_string());
    }
}
