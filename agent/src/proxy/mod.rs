//! The L4 proxy. Per enrolled pod, three listeners made by that pod's
//! [`SocketFactory`] (inside its netns):
//! - outbound (127.0.0.1:15001): connections steered by connect4/6
//!   ([`outbound`]; HTTP is routed per request by [`http`]);
//! - inbound (pod IP:15006): plaintext handed over by sk_lookup;
//! - tunnel (pod IP:15008): connections from other nodes' agents, opened by
//!   the [`Tunnel`] transport.
//!
//! Every connection into a local pod's app takes the one inbound path
//! ([`inbound`]), whichever way it came: plaintext by sk_lookup, out of the
//! tunnel, or from another pod of this node (the outbound path's local
//! hop): the gate (`ferry_model::admission`), authorization, then delivery
//! to the app from the client's own address, relayed as bytes or, on an
//! HTTP Service port ([`app_ports`]), served per request
//! ([`http::destination`]).

pub mod app_ports;
pub mod balance;
pub mod copy;
pub mod http;
pub mod inbound;
pub mod orig_dst;
pub mod outbound;

use std::{
    collections::HashMap,
    future::Future,
    net::{Ipv4Addr, SocketAddrV4},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, RwLock,
    },
    time::{Duration, Instant},
};

use ferry_model::{state::State, Workload};
use tokio::{
    net::{TcpListener, TcpStream},
    task::AbortHandle,
};

pub use crate::tunnel::TUNNEL_PORT;
use crate::{
    sockets::{self, SocketFactory},
    telemetry::Telemetry,
    tunnel::Tunnel,
};
use app_ports::AppPorts;
use orig_dst::OrigDstSource;

pub const OUTBOUND_PORT: u16 = 15001;
pub const INBOUND_PORT: u16 = 15006;

/// An enrolled pod, as the proxy sees it.
#[derive(Debug)]
pub struct PodCtx {
    pub workload: Workload,
    /// Makes this pod's sockets (inside its netns).
    pub sockets: Arc<dyn SocketFactory>,
    /// The pod's netns cookie: half of an original-destination key.
    pub netns_cookie: u64,
    /// `namespace/name`, for logs.
    pub label: String,
}

impl PodCtx {
    pub fn new(workload: Workload, sockets: Arc<dyn SocketFactory>, netns_cookie: u64) -> Self {
        Self {
            label: workload.label(),
            workload,
            sockets,
            netns_cookie,
        }
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.workload.ip
    }
}

/// A pod's three listeners.
pub struct Listeners {
    pub outbound: TcpListener,
    pub inbound: TcpListener,
    pub tunnel: TcpListener,
}

/// What every connection handler needs: the state snapshot (swapped whole),
/// the local pods, where original destinations come from, the tunnel and
/// telemetry.
pub struct Proxy {
    /// The snapshot, and what it says about local app ports (swapped together).
    state: RwLock<(Arc<State>, Arc<AppPorts>)>,
    pods: RwLock<HashMap<String, Arc<PodCtx>>>,
    orig: Arc<dyn OrigDstSource>,
    pub tunnel: Tunnel,
    pub telemetry: Arc<Telemetry>,
    /// The L7 path's upstream pool and mirror budget.
    pub http: http::Shared,
    /// The load balancer's per-Service state (in flight, outlier detection).
    pub balance: balance::Balancer,
    /// Connections accepted on every pod's listeners and not yet closed.
    conns: AtomicUsize,
}

impl Proxy {
    pub fn new(orig: Arc<dyn OrigDstSource>, tunnel: Tunnel, telemetry: Arc<Telemetry>) -> Arc<Self> {
        Arc::new(Self {
            state: RwLock::new((Arc::new(State::default()), Arc::new(AppPorts::default()))),
            pods: RwLock::new(HashMap::new()),
            orig,
            tunnel,
            balance: balance::Balancer::new(telemetry.clone()),
            telemetry,
            http: http::Shared::default(),
            conns: AtomicUsize::new(0),
        })
    }

    /// Connections accepted on every pod's listeners and still open.
    pub fn connections(&self) -> usize {
        self.conns.load(Ordering::Acquire)
    }

    pub fn state(&self) -> Arc<State> {
        self.state.read().unwrap_or_else(|e| e.into_inner()).0.clone()
    }

    /// The snapshot and its local app ports, read together.
    pub fn snapshot(&self) -> (Arc<State>, Arc<AppPorts>) {
        self.state.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Swaps in a new snapshot; connections already routed keep theirs,
    /// except that live inbound ones are re-authorized under its policies.
    pub fn set_state(&self, state: Arc<State>) {
        let ports = Arc::new(AppPorts::of(&state));
        *self.state.write().unwrap_or_else(|e| e.into_inner()) = (state.clone(), ports);
        inbound::recheck(self, &state);
    }

    pub fn local_pod_by_ip(&self, ip: Ipv4Addr) -> Option<Arc<PodCtx>> {
        self.pods
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .find(|p| p.ip() == ip)
            .cloned()
    }

    /// Starts serving `pod` on its listeners; aborting the returned tasks
    /// stops accepting (accepted connections run to completion).
    pub fn serve_pod(self: &Arc<Self>, pod: Arc<PodCtx>, l: Listeners) -> Vec<AbortHandle> {
        self.pods
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(pod.workload.uid.clone(), pod.clone());
        let limit = Arc::new(ConnLimit {
            proxy: self.clone(),
            pod: AtomicUsize::new(0),
            logged: AtomicU64::new(u64::MAX),
            refused: AtomicU64::new(0),
            since: Instant::now(),
        });
        let lim = || limit.clone();
        let (p, q) = (self.clone(), pod.clone());
        let out = accept_loop(l.outbound, pod.clone(), lim(), "outbound", move |s| {
            let (p, q) = (p.clone(), q.clone());
            async move { outbound::handle(p, q, s).await }
        });
        let (p, q) = (self.clone(), pod.clone());
        let inb = accept_loop(l.inbound, pod.clone(), lim(), "inbound", move |s| {
            let (p, q) = (p.clone(), q.clone());
            async move { inbound::handle_plain(p, q, s).await }
        });
        let handler = Arc::new(inbound::FromTunnel {
            proxy: self.clone(),
            pod: pod.clone(),
        });
        let p = self.clone();
        let q = pod.clone();
        let tun = accept_loop(l.tunnel, pod, lim(), "tunnel", move |s| {
            let (p, q, h) = (p.clone(), q.clone(), handler.clone());
            async move { p.tunnel.serve(s, &q.workload.uid, &q.label, h).await }
        });
        vec![
            tokio::spawn(out).abort_handle(),
            tokio::spawn(inb).abort_handle(),
            tokio::spawn(tun).abort_handle(),
        ]
    }

    /// Forgets a pod (its listeners are stopped by its owner).
    pub fn remove_pod(&self, uid: &str) {
        self.pods.write().unwrap_or_else(|e| e.into_inner()).remove(uid);
    }

    /// Connects to an app inside a local pod, from the client's own address.
    pub async fn deliver(&self, pod: &PodCtx, client: Ipv4Addr, target: SocketAddrV4) -> std::io::Result<TcpStream> {
        sockets::connect(&*pod.sockets, sockets::Source::Transparent(client), target).await
    }
}

/// Concurrent connections of one pod (its three listeners together) and of
/// the agent, against `settings.maxConnectionsPerPod` / `PerAgent` (read at
/// each accept, so a new config applies at once). A connection holds a
/// [`Slot`] until its task ends. A tunnel connection counts once, however
/// many streams it carries (those are bounded by the tunnel's stream limit).
struct ConnLimit {
    proxy: Arc<Proxy>,
    pod: AtomicUsize,
    /// When a refusal was last logged (ms since `since`; `u64::MAX`: never).
    logged: AtomicU64,
    /// Refusals since the last log line.
    refused: AtomicU64,
    since: Instant,
}

/// One admitted connection: gives its place back when dropped.
struct Slot(Arc<ConnLimit>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.pod.fetch_sub(1, Ordering::AcqRel);
        self.0.proxy.conns.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ConnLimit {
    /// A slot, or the limit that refuses one (counted and, at most once a
    /// second per pod, logged).
    fn admit(self: &Arc<Self>, pod: &PodCtx, what: &'static str) -> Option<Slot> {
        let settings = &self.proxy.state().settings;
        let (per_pod, per_agent) = (
            settings.max_connections_per_pod as usize,
            settings.max_connections_per_agent as usize,
        );
        let reason = if self.pod.fetch_add(1, Ordering::AcqRel) >= per_pod {
            self.pod.fetch_sub(1, Ordering::AcqRel);
            "pod_limit"
        } else if self.proxy.conns.fetch_add(1, Ordering::AcqRel) >= per_agent {
            self.proxy.conns.fetch_sub(1, Ordering::AcqRel);
            self.pod.fetch_sub(1, Ordering::AcqRel);
            "agent_limit"
        } else {
            return Some(Slot(self.clone()));
        };
        let t = &self.proxy.telemetry;
        t.connections_refused
            .get_or_create(&crate::telemetry::LimitLabels { reason })
            .inc();
        let refused = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        let now = self.since.elapsed().as_millis() as u64;
        let last = self.logged.load(Ordering::Relaxed);
        let due = last == u64::MAX || now.saturating_sub(last) >= 1000;
        if due
            && self
                .logged
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.refused.fetch_sub(refused, Ordering::Relaxed);
            let limit = if reason == "pod_limit" { per_pod } else { per_agent };
            tracing::warn!(pod = %pod.label, listener = what, reason, limit, refused, "connection refused: connection limit reached");
        }
        None
    }
}

/// The one accept loop: each accepted connection gets Nagle off and its own
/// task, or, over a connection limit ([`ConnLimit`]), is closed at once.
/// When accept fails (EMFILE, ENFILE, ENOBUFS), it counts the failure
/// (`ferry_accept_errors_total{listener, reason}`), logs it and waits before
/// trying again rather than spinning on a failure that persists; the
/// connection stays in the listen backlog until an accept succeeds.
async fn accept_loop<F, Fut>(
    listener: TcpListener,
    pod: Arc<PodCtx>,
    limit: Arc<ConnLimit>,
    what: &'static str,
    handle: F,
) where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut backoff = Duration::from_millis(10);
    loop {
        match listener.accept().await {
            Ok((s, _)) => {
                backoff = Duration::from_millis(10);
                let Some(slot) = limit.admit(&pod, what) else {
                    drop(s);
                    continue;
                };
                // Small writes (handshakes, HTTP/2 frames, request/response
                // protocols) must not wait for Nagle + delayed ACK (~40 ms).
                let _ = s.set_nodelay(true);
                let conn = handle(s);
                tokio::spawn(async move {
                    conn.await;
                    drop(slot);
                });
            }
            Err(e) => {
                let reason = crate::telemetry::AcceptLabels::reason_of(&e);
                limit
                    .proxy
                    .telemetry
                    .accept_errors
                    .get_or_create(&crate::telemetry::AcceptLabels { listener: what, reason })
                    .inc();
                tracing::warn!(pod = %pod.label, listener = what, reason, error = %e, retry_in_ms = backoff.as_millis() as u64, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}
