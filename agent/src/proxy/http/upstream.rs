//! Upstream HTTP connections, pooled.
//!
//! Invariants:
//! - A key is (source pod uid, endpoint, hop, HTTP version): connections
//!   carry the source pod's address (and, through the tunnel, its identity),
//!   so they are never shared between pods.
//! - The map's lock is held only to take or put a sender, never across I/O.
//! - HTTP/1.1: a sender is taken out for a request and put back once the
//!   response head has arrived; a later request uses it only when
//!   `is_ready()` (its previous response has ended), else opens another.
//!   HTTP/2: one sender is shared by clones (multiplexed).
//! - At most [`MAX_IDLE_PER_KEY`] senders per key; a sender is not reused
//!   once closed or idle for [`IDLE_TIMEOUT`] (swept when the pool is used,
//!   at most every [`SWEEP_EVERY`]); dropping the last sender closes its
//!   connection.
//! - A request that a pooled connection did not send (it died while idle)
//!   is sent once more on a new connection; that is not a retry.
//! - Upgrades (WebSocket) get a connection of their own, never pooled.

use std::{
    collections::HashMap,
    io,
    net::SocketAddrV4,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use ferry_model::state::Route;
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
    Request, Response,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::body::Body;
use crate::proxy::{outbound, PodCtx, Proxy};

pub const MAX_IDLE_PER_KEY: usize = 16;
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
pub const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// Opening a connection (TCP, tunnel stream, HTTP handshake) gives up after this.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Version {
    H1,
    H2,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    source: String,
    endpoint: SocketAddrV4,
    /// Local, tunnel or direct (`Hop` is not `Hash`: its name stands in).
    hop: &'static str,
    version: Version,
}

enum Sender {
    H1(http1::SendRequest<Body>),
    H2(http2::SendRequest<Body>),
}

impl Sender {
    fn usable(&self) -> bool {
        match self {
            Sender::H1(s) => !s.is_closed() && s.is_ready(),
            Sender::H2(s) => !s.is_closed() && s.is_ready(),
        }
    }

    fn closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }
}

struct Idle {
    sender: Sender,
    since: Instant,
}

/// Why an attempt got no response.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be opened (or handshaken).
    Connect(io::Error),
    /// The connection failed while the request was in flight.
    Reset(hyper::Error),
    /// HTTP/2 REFUSED_STREAM: the upstream did not process it.
    Refused(hyper::Error),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Connect(e) => write!(f, "connect: {e}"),
            SendError::Reset(e) => write!(f, "reset: {e}"),
            SendError::Refused(e) => write!(f, "refused stream: {e}"),
        }
    }
}

#[derive(Default)]
pub struct Pool {
    idle: Mutex<HashMap<Key, Vec<Idle>>>,
    last_sweep: Mutex<Option<Instant>>,
}

impl Pool {
    fn take(&self, key: &Key) -> Option<Sender> {
        self.sweep();
        let mut m = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = m.get_mut(key)?;
        list.retain(|i| !i.sender.closed());
        let i = list.iter().position(|i| i.sender.usable())?;
        let sender = match key.version {
            Version::H1 => list.swap_remove(i).sender,
            Version::H2 => {
                list[i].since = Instant::now();
                match &list[i].sender {
                    Sender::H2(s) => Sender::H2(s.clone()),
                    Sender::H1(_) => return None,
                }
            }
        };
        Some(sender)
    }

    fn put(&self, key: Key, sender: Sender) {
        let mut m = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = m.entry(key.clone()).or_default();
        // HTTP/2 senders are shared, not taken out: the one put back is a clone.
        if key.version == Version::H2 && !list.is_empty() {
            return;
        }
        if list.len() < MAX_IDLE_PER_KEY && !sender.closed() {
            list.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    fn sweep(&self) {
        let now = Instant::now();
        {
            let mut last = self.last_sweep.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_some_and(|t| now.duration_since(t) < SWEEP_EVERY) {
                return;
            }
            *last = Some(now);
        }
        let mut m = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        for list in m.values_mut() {
            list.retain(|i| !i.sender.closed() && now.duration_since(i.since) < IDLE_TIMEOUT);
        }
        m.retain(|_, l| !l.is_empty());
    }

    /// Idle senders held whose connections are still open (for tests and
    /// views).
    pub fn idle_count(&self) -> usize {
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .flatten()
            .filter(|i| !i.sender.closed())
            .count()
    }

    /// Sends `req` from `pod` to `route`'s endpoint over a pooled connection.
    pub async fn send(
        &self,
        proxy: &Arc<Proxy>,
        pod: &PodCtx,
        route: &Route,
        version: Version,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, SendError> {
        let key = Key {
            source: pod.workload.uid.clone(),
            endpoint: route.endpoint,
            hop: route.hop.as_str(),
            version,
        };
        let mut req = req;
        if let Some(s) = self.take(&key) {
            match try_send(s, req).await {
                Ok((resp, s)) => {
                    self.put(key, s);
                    return Ok(resp);
                }
                // Never sent: the idle connection had died. Once more, fresh.
                Err((Some(r), _)) => req = r,
                Err((None, e)) => return Err(e),
            }
        }
        let s = connect(proxy, pod, route, version).await?;
        match try_send(s, req).await {
            Ok((resp, s)) => {
                self.put(key, s);
                Ok(resp)
            }
            Err((_, e)) => Err(e),
        }
    }
}

/// A failed send: REFUSED_STREAM (HTTP/2: not processed, found in the
/// error's chain by its text, as hyper does not expose h2's reason) or a reset.
fn classify(e: hyper::Error) -> SendError {
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        if s.to_string().contains("refused stream") {
            return SendError::Refused(e);
        }
        src = s.source();
    }
    SendError::Reset(e)
}

type TryResult = Result<(Response<Incoming>, Sender), (Option<Request<Body>>, SendError)>;

async fn try_send(s: Sender, req: Request<Body>) -> TryResult {
    match s {
        Sender::H1(mut s) => match s.try_send_request(req).await {
            Ok(r) => Ok((r, Sender::H1(s))),
            Err(mut e) => {
                let unsent = e.take_message();
                Err((unsent, classify(e.into_error())))
            }
        },
        Sender::H2(mut s) => match s.try_send_request(req).await {
            Ok(r) => Ok((r, Sender::H2(s))),
            Err(mut e) => {
                let unsent = e.take_message();
                Err((unsent, classify(e.into_error())))
            }
        },
    }
}

/// Opens the transport to `route`'s endpoint the way the L4 path does
/// (local delivery, tunnel, direct), then the HTTP handshake.
async fn connect(proxy: &Arc<Proxy>, pod: &PodCtx, route: &Route, version: Version) -> Result<Sender, SendError> {
    let open = async {
        let stream = outbound::open_upstream(proxy, pod, route).await?;
        let io = TokioIo::new(stream);
        match version {
            Version::H1 => {
                let (s, conn) = http1::Builder::new().handshake(io).await.map_err(io::Error::other)?;
                tokio::spawn(async move {
                    let _ = conn.with_upgrades().await;
                });
                Ok(Sender::H1(s))
            }
            Version::H2 => {
                let (s, conn) = http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .keep_alive_interval(Duration::from_secs(30))
                    .handshake(io)
                    .await
                    .map_err(io::Error::other)?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                Ok(Sender::H2(s))
            }
        }
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, open).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(SendError::Connect(e)),
        Err(_) => Err(SendError::Connect(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no connection within {} s", CONNECT_TIMEOUT.as_secs()),
        ))),
    }
}

/// A connection of its own for an upgrade (HTTP/1.1): the request is sent
/// and the connection is left to the upgrade.
pub async fn send_upgrade(
    proxy: &Arc<Proxy>,
    pod: &PodCtx,
    route: &Route,
    req: Request<Body>,
) -> Result<Response<Incoming>, SendError> {
    match connect(proxy, pod, route, Version::H1).await? {
        Sender::H1(mut s) => s.send_request(req).await.map_err(classify),
        Sender::H2(_) => Err(SendError::Connect(io::Error::other("upgrade over HTTP/2"))),
    }
}
