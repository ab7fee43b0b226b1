//! Inbound: connections to a pod's app, handed to the agent by sk_lookup
//! (plaintext, 15006) or arriving through the tunnel (15008). Both are
//! delivered to the app from the client's own address.

use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};

use super::{copy, PodCtx, Proxy};
use crate::{
    sockets,
    telemetry::{
        metrics::{tcp_labels, Peer, Reporter},
        Direction,
    },
    tunnel::{hbone, Tunnel},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Plain,
    Tunnel,
}

pub async fn serve(proxy: Arc<Proxy>, pod: Arc<PodCtx>, listener: TcpListener, kind: Kind) {
    loop {
        match listener.accept().await {
            Ok((s, _)) => {
                // Small writes (handshakes, HTTP/2 frames, request/response
                // protocols) must not wait for Nagle + delayed ACK (~40 ms).
                let _ = s.set_nodelay(true);
                let (proxy, pod) = (proxy.clone(), pod.clone());
                match (&proxy.tunnel, kind) {
                    (Tunnel::Hbone(hb), Kind::Tunnel) => {
                        tokio::spawn(hbone::serve(proxy.clone(), pod, s, hb.clone()));
                    }
                    _ => {
                        tokio::spawn(async move { handle(&proxy, &pod, s, kind).await });
                    }
                }
            }
            Err(e) => {
                tracing::warn!(pod = %pod.label(), error = %e, "inbound accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle(proxy: &Proxy, pod: &PodCtx, mut client: TcpStream, kind: Kind) {
    let Ok((local, peer)) = sockets::v4_addrs(&client) else {
        return;
    };
    let (direction, target) = match kind {
        // sk_lookup kept the destination: our local address is the app's.
        Kind::Plain => (Direction::Inbound, local),
        Kind::Tunnel => match proxy.tunnel.accept(&mut client).await {
            Ok(t) => (Direction::Tunnel, t),
            Err(e) => {
                tracing::warn!(pod = %pod.label(), client = %peer, error = %e, "refused tunnel connection");
                return;
            }
        },
    };
    let state = proxy.state();
    let src = state.workload_by_ip(*peer.ip());
    let source = src
        .map(|w| format!("{}/{}", w.namespace, w.name))
        .unwrap_or_else(|| peer.ip().to_string());
    let mut g = proxy
        .telemetry
        .open(direction, &pod.workload.namespace, source, peer, target);
    let src = Peer {
        workload: src,
        authenticated: false,
    };
    let dst = Peer {
        workload: Some(&pod.workload),
        authenticated: false,
    };
    g.report(&tcp_labels(Reporter::Destination, src, dst, None, false));
    if direction == Direction::Inbound {
        // Plaintext from outside the mesh: allowed unless the workload is
        // STRICT (kubelet probes from the node's own addresses always pass).
        let mode = crate::policy::mode_for(&pod.workload, &state.peer_authentications);
        if mode == crate::policy::Mode::Strict && !state.settings.node_addresses.contains(peer.ip()) {
            proxy
                .telemetry
                .counters
                .refused_plaintext
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            g.outcome = Some("refused: plaintext to a STRICT mTLS workload".into());
            tracing::warn!(pod = %pod.label(), client = %peer, reason = "PeerAuthentication STRICT: plaintext not accepted", "refused plaintext connection");
            return;
        }
    }
    if *target.ip() != pod.ip() {
        g.outcome = Some(format!("target {target} is not this pod ({})", pod.ip()));
        return;
    }
    let app = match proxy.deliver(pod, *peer.ip(), target).await {
        Ok(a) => a,
        Err(e) => {
            g.outcome = Some(format!("deliver to {target}: {e}"));
            return;
        }
    };
    if let Err(e) = copy::bidi(client, app, &g.conn.sent, &g.conn.received).await {
        g.outcome = Some(e.to_string());
    }
}
