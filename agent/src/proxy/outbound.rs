//! Outbound: a connection from an app, steered to 127.0.0.1:15001 in its pod.
//! Original destination (from eBPF) -> route -> local pod, tunnel or direct.

use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};

use super::{copy, PodCtx, Proxy};
use crate::{
    redirect::maps::SockKey,
    sockets,
    state::Hop,
    telemetry::{
        metrics::{tcp_labels, Peer, Reporter},
        Direction,
    },
};

pub async fn serve(proxy: Arc<Proxy>, pod: Arc<PodCtx>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((s, _)) => {
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
    {
        let state = proxy.state();
        let src = Peer {
            workload: Some(&pod.workload),
            authenticated: false,
        };
        let dst = Peer {
            workload: state.workload_by_ip(*route.endpoint.ip()),
            authenticated: false,
        };
        g.report(&tcp_labels(Reporter::Source, src, dst, route.service.as_deref(), false));
        if route.hop == Hop::Local {
            // For a same-node hop this agent is also the destination's proxy.
            g.report(&tcp_labels(
                Reporter::Destination,
                src,
                dst,
                route.service.as_deref(),
                false,
            ));
        }
    }
    let upstream = match route.hop {
        Hop::Local => match proxy.local_pod_by_ip(*route.endpoint.ip()) {
            Some(dst) => proxy.deliver(&dst, pod.ip(), route.endpoint).await,
            None => Err(std::io::Error::other(
                "destination pod is not enrolled on this node yet",
            )),
        },
        Hop::Tunnel => proxy.tunnel.open(&pod.netns, route.endpoint).await,
        Hop::Direct => sockets::connect(Some(&pod.netns), sockets::Source::Any, route.endpoint).await,
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
