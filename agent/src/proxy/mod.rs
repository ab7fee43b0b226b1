//! The L4 proxy: per enrolled pod, three listeners inside the pod's netns.
//! - outbound (127.0.0.1:15001): connections steered by connect4/6;
//! - inbound (pod IP:15006): connections handed over by sk_lookup;
//! - tunnel (pod IP:15008): connections from other nodes' agents.

pub mod copy;
pub mod inbound;
pub mod outbound;

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
    sync::{Arc, RwLock},
};

use crate::{
    config::Workload, netns::Netns, redirect::OrigDstSource, state::State, telemetry::Telemetry, tunnel::Tunnel,
};

pub const OUTBOUND_PORT: u16 = 15001;
pub const INBOUND_PORT: u16 = 15006;

/// An enrolled pod, as the proxy sees it.
pub struct PodCtx {
    pub workload: Workload,
    pub netns: Netns,
    pub netns_cookie: u64,
}

impl PodCtx {
    pub fn ip(&self) -> Ipv4Addr {
        self.workload.ip
    }
    pub fn label(&self) -> String {
        format!("{}/{}", self.workload.namespace, self.workload.name)
    }
}

/// What every connection handler needs.
pub struct Proxy {
    pub state: RwLock<Arc<State>>,
    pub pods: RwLock<HashMap<String, Arc<PodCtx>>>,
    pub orig: Arc<dyn OrigDstSource>,
    pub tunnel: Tunnel,
    pub telemetry: Telemetry,
}

impl Proxy {
    pub fn state(&self) -> Arc<State> {
        self.state.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn local_pod_by_ip(&self, ip: Ipv4Addr) -> Option<Arc<PodCtx>> {
        self.pods
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .find(|p| p.ip() == ip)
            .cloned()
    }

    /// Connects to an app inside a local pod, from the client's own address.
    pub async fn deliver(
        &self,
        pod: &PodCtx,
        client: Ipv4Addr,
        target: SocketAddrV4,
    ) -> std::io::Result<tokio::net::TcpStream> {
        crate::sockets::connect(Some(&pod.netns), crate::sockets::Source::Transparent(client), target).await
    }
}
