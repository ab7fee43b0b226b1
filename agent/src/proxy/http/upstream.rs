//! Upstream HTTP connections, pooled, within the limits of a
//! DestinationRule's `connectionPool` ([`super::circuit`]).
//!
//! Invariants:
//! - A key is (source pod uid, endpoint, hop, HTTP version, cluster):
//!   connections carry the source pod's address (and, through the tunnel,
//!   its identity), so they are never shared between pods. The cluster
//!   (Service, port, subset) is part of the key only when a circuit applies,
//!   so connections counted by a breaker are never reused uncounted, nor
//!   the reverse.
//! - The map's lock is held only to take or put a connection, never across I/O.
//! - HTTP/1.1: a connection is taken out for a request and put back once
//!   the response head has arrived (under a circuit: once it is ready for
//!   the next request, so a pending request woken for it can use it); a
//!   later request uses it only when `is_ready()` (its previous response has
//!   ended), else opens another. HTTP/2: a connection stays in the list
//!   and is shared by clones (multiplexed), while its streams in flight are
//!   below `maxConcurrentStreams`; past that, another connection is opened.
//! - A connection serves at most `maxRequestsPerConnection` requests, then
//!   is not reused (it closes once its last response has ended).
//! - At most [`MAX_IDLE_PER_KEY`] idle connections per key; one is closed
//!   once idle for `idleTimeout` (default [`IDLE_TIMEOUT`]), by a reaper
//!   task that runs while the pool exists (at least every [`REAP_EVERY`]);
//!   dropping the last sender closes its connection.
//! - Under a circuit, a request needing a connection past `maxConnections`
//!   waits as pending (within `http1MaxPendingRequests`, at most
//!   [`PENDING_DEADLINE`]); while it waits, one idle connection of the
//!   same cluster to another endpoint is closed to make room. Over
//!   `http2MaxRequests` or the pending limit: [`SendError::Overflow`], at once.
//! - A request that a pooled connection did not send (it died while idle)
//!   is sent once more on a new connection; that is not a retry. Nor is
//!   resending a bodiless idempotent request (GET...) whose reused
//!   connection died under it before any answer.
//! - Upgrades (WebSocket) get a connection of their own, never pooled nor
//!   counted.

use std::{
    collections::HashMap,
    io,
    net::SocketAddrV4,
    pin::Pin,
    sync::{
        atomic::AtomicBool,
        atomic::{AtomicU32, Ordering},
        Arc, Mutex, Weak,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use ferry_model::state::Route;
use hyper::{
    body::{Body as HttpBody, Frame, Incoming, SizeHint},
    client::conn::{http1, http2},
    Request, Response,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::{
    body::Body,
    circuit::{Breakers, Circuit, Cluster, Kind, Overflow, Slot, PENDING_DEADLINE},
};
use crate::proxy::{outbound, PodCtx, Proxy};

pub const MAX_IDLE_PER_KEY: usize = 16;
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// The reaper looks at idle connections at least this often.
pub const REAP_EVERY: Duration = Duration::from_secs(1);
/// Opening a connection (TCP, tunnel stream, HTTP handshake) gives up after
/// this, unless the Service's `connectTimeout` says otherwise.
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
    /// Set when a circuit applies.
    cluster: Option<Cluster>,
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

/// One upstream connection (for HTTP/2, a handle on it).
struct Conn {
    sender: Sender,
    /// Requests started on it (shared by an HTTP/2 connection's handles).
    served: Arc<AtomicU32>,
    /// HTTP/2: streams in flight on it.
    streams: Arc<AtomicU32>,
    /// When it was put back (HTTP/1.1) or last given a request (HTTP/2).
    since: Instant,
    /// Its idle limit, from the circuit it was last used under.
    idle_timeout: Duration,
}

impl Conn {
    fn new(sender: Sender, idle_timeout: Duration) -> Self {
        Self {
            sender,
            served: Arc::new(AtomicU32::new(0)),
            streams: Arc::new(AtomicU32::new(0)),
            since: Instant::now(),
            idle_timeout,
        }
    }

    fn expired(&self, now: Instant) -> bool {
        self.streams.load(Ordering::Acquire) == 0 && now.duration_since(self.since) >= self.idle_timeout
    }

    fn retired(&self, per_conn: Option<u32>) -> bool {
        per_conn.is_some_and(|m| self.served.load(Ordering::Acquire) >= m)
    }

    fn keep(&self, now: Instant, per_conn: Option<u32>) -> bool {
        !self.sender.closed() && !self.expired(now) && !self.retired(per_conn)
    }
}

/// An HTTP/2 stream in flight on a connection; counted down when dropped.
struct Stream {
    streams: Arc<AtomicU32>,
    circuit: Option<Arc<super::circuit::Breaker>>,
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.streams.fetch_sub(1, Ordering::AcqRel);
        if let Some(b) = &self.circuit {
            b.freed.notify_waiters();
        }
    }
}

/// A connection checked out for one request.
struct Checked {
    conn: Conn,
    stream: Option<Stream>,
    /// Opened for this request (not taken from the pool).
    fresh: bool,
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
    /// A circuit-breaking limit refused it before it was sent.
    Overflow(Overflow),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Connect(e) => write!(f, "connect: {e}"),
            SendError::Reset(e) => write!(f, "reset: {e}"),
            SendError::Refused(e) => write!(f, "refused stream: {e}"),
            SendError::Overflow(o) => write!(f, "upstream overflow: {o}"),
        }
    }
}

/// An upstream response body: it holds its request's circuit slots (the
/// request in flight, its HTTP/2 stream) until it ends or is dropped.
pub struct Held<B> {
    inner: B,
    request: Option<Slot>,
    stream: Option<Stream>,
}

impl<B> Held<B> {
    fn new(inner: B, request: Option<Slot>, stream: Option<Stream>) -> Self {
        Self { inner, request, stream }
    }

    fn release(&mut self) {
        self.request = None;
        self.stream = None;
    }
}

/// What the pool answers with.
pub type UpBody = Held<Incoming>;

impl<B> HttpBody for Held<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => this.release(),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.release(),
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

type IdleMap = Mutex<HashMap<Key, Vec<Conn>>>;

#[derive(Default)]
pub struct Pool {
    idle: Arc<IdleMap>,
    reaper: AtomicBool,
    /// The circuit breakers of every (source pod, cluster).
    pub breakers: Breakers,
}

fn lock(m: &IdleMap) -> std::sync::MutexGuard<'_, HashMap<Key, Vec<Conn>>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn idle_timeout(c: Option<&Circuit>) -> Duration {
    c.and_then(|c| c.limits.idle_timeout_ms)
        .map_or(IDLE_TIMEOUT, Duration::from_millis)
}

impl Pool {
    /// A pooled connection for `key`, counted as one more request on it.
    fn take(&self, key: &Key, circuit: Option<&Circuit>) -> Option<Checked> {
        let now = Instant::now();
        let per_conn = circuit.and_then(|c| c.limits.max_requests_per_connection);
        let mut m = lock(&self.idle);
        let list = m.get_mut(key)?;
        list.retain(|c| c.keep(now, per_conn));
        let checked = match key.version {
            Version::H1 => {
                let i = list.iter().position(|c| c.sender.usable())?;
                let conn = list.swap_remove(i);
                conn.served.fetch_add(1, Ordering::AcqRel);
                Checked {
                    conn,
                    stream: None,
                    fresh: false,
                }
            }
            Version::H2 => {
                let max_streams = circuit.and_then(|c| c.limits.max_concurrent_streams);
                let c = list
                    .iter_mut()
                    .find(|c| c.sender.usable() && max_streams.is_none_or(|m| c.streams.load(Ordering::Acquire) < m))?;
                let Sender::H2(s) = &c.sender else { return None };
                c.since = now;
                c.served.fetch_add(1, Ordering::AcqRel);
                Checked {
                    stream: Some(stream(&c.streams, circuit)),
                    conn: Conn {
                        sender: Sender::H2(s.clone()),
                        served: c.served.clone(),
                        streams: c.streams.clone(),
                        since: now,
                        idle_timeout: c.idle_timeout,
                    },
                    fresh: false,
                }
            }
        };
        Some(checked)
    }

    /// Puts an HTTP/1.1 connection back after its request (nothing to do
    /// for an HTTP/2 handle: the connection stays listed).
    fn put(&self, key: Key, mut conn: Conn, circuit: Option<&Circuit>) {
        if key.version == Version::H2 {
            return;
        }
        let per_conn = circuit.and_then(|c| c.limits.max_requests_per_connection);
        if conn.retired(per_conn) || conn.sender.closed() {
            return;
        }
        conn.idle_timeout = idle_timeout(circuit);
        let Some(c) = circuit else {
            push(&self.idle, key, conn);
            return;
        };
        // Listed once ready for the next request, and pending requests told.
        let (idle, breaker) = (Arc::downgrade(&self.idle), c.breaker.clone());
        tokio::spawn(async move {
            let Sender::H1(mut s) = conn.sender else { return };
            let ready = tokio::time::timeout(conn.idle_timeout, s.ready()).await;
            if let (Ok(Ok(())), Some(idle)) = (ready, idle.upgrade()) {
                conn.sender = Sender::H1(s);
                conn.since = Instant::now();
                push(&idle, key, conn);
                breaker.freed.notify_waiters();
            }
        });
    }

    /// Closes one idle connection of `key`'s cluster to another endpoint
    /// (to make room under `maxConnections`); false if there is none.
    fn evict_other(&self, key: &Key) -> bool {
        let mut m = lock(&self.idle);
        for (k, list) in m.iter_mut() {
            if k == key || k.cluster != key.cluster || k.source != key.source {
                continue;
            }
            if let Some(i) = list.iter().position(|c| c.streams.load(Ordering::Acquire) == 0) {
                drop(list.swap_remove(i));
                return true;
            }
        }
        false
    }

    /// Idle senders held whose connections are still open (for tests and
    /// views).
    pub fn idle_count(&self) -> usize {
        lock(&self.idle)
            .values()
            .flatten()
            .filter(|c| !c.sender.closed())
            .count()
    }

    fn start_reaper(&self) {
        if !self.reaper.load(Ordering::Relaxed) && !self.reaper.swap(true, Ordering::AcqRel) {
            tokio::spawn(reap(Arc::downgrade(&self.idle)));
        }
    }

    /// A connection for one request on `key`: a pooled one (unless
    /// `fresh_only`), a new one, or, at `maxConnections`, one that frees up
    /// while the request waits as pending.
    async fn checkout(
        &self,
        proxy: &Arc<Proxy>,
        pod: &PodCtx,
        route: &Route,
        key: &Key,
        circuit: Option<&Circuit>,
        fresh_only: bool,
    ) -> Result<Checked, SendError> {
        if !fresh_only {
            if let Some(c) = self.take(key, circuit) {
                return Ok(c);
            }
        }
        let Some(circ) = circuit else {
            return self.open(proxy, pod, route, key, None, None).await;
        };
        if let Some(slot) = circ.try_take(Kind::Connection) {
            return self.open(proxy, pod, route, key, circuit, Some(slot)).await;
        }
        let Some(_pending) = circ.try_take(Kind::Pending) else {
            return Err(SendError::Overflow(circ.overflow(Overflow::Pending)));
        };
        let deadline = tokio::time::Instant::now() + PENDING_DEADLINE;
        loop {
            // Registered before the checks, so a wake-up in between counts.
            let freed = circ.breaker.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(c) = self.take(key, circuit) {
                return Ok(c);
            }
            if let Some(slot) = circ.try_take(Kind::Connection) {
                return self.open(proxy, pod, route, key, circuit, Some(slot)).await;
            }
            self.evict_other(key);
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return Err(SendError::Overflow(circ.overflow(Overflow::PendingTimeout)));
            }
        }
    }

    /// Opens a connection for `key` (holding `slot` while it lives); an
    /// HTTP/2 one is listed at once, for other requests to share.
    async fn open(
        &self,
        proxy: &Arc<Proxy>,
        pod: &PodCtx,
        route: &Route,
        key: &Key,
        circuit: Option<&Circuit>,
        slot: Option<Slot>,
    ) -> Result<Checked, SendError> {
        let sender = connect(proxy, pod, route, key.version, circuit, slot).await?;
        let conn = Conn::new(sender, idle_timeout(circuit));
        conn.served.store(1, Ordering::Release);
        let stream = match key.version {
            Version::H1 => None,
            Version::H2 => {
                let s = stream(&conn.streams, circuit);
                if let Sender::H2(h) = &conn.sender {
                    let mut listed = Conn::new(Sender::H2(h.clone()), conn.idle_timeout);
                    listed.served = conn.served.clone();
                    listed.streams = conn.streams.clone();
                    push(&self.idle, key.clone(), listed);
                }
                Some(s)
            }
        };
        Ok(Checked {
            conn,
            stream,
            fresh: true,
        })
    }

    /// Sends `req` from `pod` to `route`'s endpoint over a pooled
    /// connection, within `circuit`'s limits when one applies.
    pub async fn send(
        &self,
        proxy: &Arc<Proxy>,
        pod: &PodCtx,
        route: &Route,
        version: Version,
        req: Request<Body>,
        circuit: Option<&Circuit>,
    ) -> Result<Response<UpBody>, SendError> {
        self.start_reaper();
        let key = Key {
            source: pod.workload.uid.clone(),
            endpoint: route.endpoint,
            hop: route.hop.as_str(),
            version,
            cluster: circuit.map(|c| c.cluster().clone()),
        };
        let mut req = req;
        let mut fresh_only = false;
        loop {
            let Checked {
                mut conn,
                stream,
                fresh,
            } = self.checkout(proxy, pod, route, &key, circuit, fresh_only).await?;
            let request = match circuit {
                Some(c) => match c.try_take(Kind::Request) {
                    Some(s) => Some(s),
                    None => {
                        conn.served.fetch_sub(1, Ordering::AcqRel);
                        drop(stream);
                        self.put(key, conn, circuit);
                        return Err(SendError::Overflow(c.overflow(Overflow::Requests)));
                    }
                },
                None => None,
            };
            // A bodiless idempotent request on a reused connection can be
            // sent again if that connection dies under it before any answer
            // (the peer closed it while idle: a race the pool cannot see,
            // e.g. the destination cutting pooled connections on a policy
            // change). RFC 9110 9.2.2; Envoy does the same.
            let again = if !fresh && !fresh_only { resendable(&req) } else { None };
            match (try_send(conn.sender, req).await, again) {
                (Ok((resp, s)), _) => {
                    conn.sender = s;
                    self.put(key, conn, circuit);
                    return Ok(resp.map(|b| Held::new(b, request, stream)));
                }
                // Never sent: the idle connection had died. Once more, fresh.
                (Err((Some(r), _)), _) if !fresh && !fresh_only => {
                    req = r;
                    fresh_only = true;
                }
                (Err((None, SendError::Reset(_))), Some(r)) => {
                    req = r;
                    fresh_only = true;
                }
                (Err((_, e)), _) => return Err(e),
            }
        }
    }
}

/// A copy of `req` to send again if the reused connection it goes out on
/// dies under it before any answer: only for GET, HEAD, OPTIONS, TRACE, PUT
/// and DELETE with no body (idempotent, RFC 9110 9.2.2; nothing to replay).
/// Used by both the source's pool and the destination's app connection.
pub(super) fn resendable(req: &Request<Body>) -> Option<Request<Body>> {
    use hyper::{body::Body as _, Method};
    let idempotent = matches!(
        *req.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    );
    (idempotent && req.body().is_end_stream()).then(|| {
        let mut r = Request::new(super::body::empty());
        *r.method_mut() = req.method().clone();
        *r.uri_mut() = req.uri().clone();
        *r.version_mut() = req.version();
        *r.headers_mut() = req.headers().clone();
        r
    })
}

fn stream(streams: &Arc<AtomicU32>, circuit: Option<&Circuit>) -> Stream {
    streams.fetch_add(1, Ordering::AcqRel);
    Stream {
        streams: streams.clone(),
        circuit: circuit.map(|c| c.breaker.clone()),
    }
}

fn push(idle: &IdleMap, key: Key, conn: Conn) {
    let mut m = lock(idle);
    let list = m.entry(key).or_default();
    if list.len() < MAX_IDLE_PER_KEY && !conn.sender.closed() {
        list.push(conn);
    }
}

/// Closes idle connections past their idle limit, until the pool is gone.
async fn reap(idle: Weak<IdleMap>) {
    loop {
        let next = {
            let Some(idle) = idle.upgrade() else { return };
            let now = Instant::now();
            let mut m = lock(&idle);
            let mut next = REAP_EVERY;
            for list in m.values_mut() {
                list.retain(|c| !c.sender.closed() && !c.expired(now));
                for c in list.iter() {
                    let left = (c.since + c.idle_timeout).saturating_duration_since(now);
                    next = next.min(left);
                }
            }
            m.retain(|_, l| !l.is_empty());
            next.max(Duration::from_millis(10))
        };
        tokio::time::sleep(next).await;
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
/// (local delivery, tunnel, direct), then the HTTP handshake, within the
/// circuit's `connectTimeout` (else [`CONNECT_TIMEOUT`]); `slot` (the
/// connection's count) lives as long as the connection.
async fn connect(
    proxy: &Arc<Proxy>,
    pod: &PodCtx,
    route: &Route,
    version: Version,
    circuit: Option<&Circuit>,
    slot: Option<Slot>,
) -> Result<Sender, SendError> {
    let keepalive = circuit.and_then(|c| c.limits.tcp_keepalive);
    let open = async {
        let stream = outbound::open_upstream(proxy, pod, route, keepalive.as_ref()).await?;
        let io = TokioIo::new(stream);
        match version {
            Version::H1 => {
                let (s, conn) = http1::Builder::new().handshake(io).await.map_err(io::Error::other)?;
                tokio::spawn(async move {
                    let _slot = slot;
                    let _ = conn.with_upgrades().await;
                });
                Ok(Sender::H1(s))
            }
            Version::H2 => {
                let mut b = http2::Builder::new(TokioExecutor::new());
                b.timer(TokioTimer::new()).keep_alive_interval(Duration::from_secs(30));
                let (s, conn) = b.handshake(io).await.map_err(io::Error::other)?;
                tokio::spawn(async move {
                    let _slot = slot;
                    let _ = conn.await;
                });
                Ok(Sender::H2(s))
            }
        }
    };
    let limit = super::circuit::connect_timeout(circuit, CONNECT_TIMEOUT);
    match tokio::time::timeout(limit, open).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(SendError::Connect(e)),
        Err(_) => Err(SendError::Connect(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no connection within {} ms", limit.as_millis()),
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
) -> Result<Response<UpBody>, SendError> {
    match connect(proxy, pod, route, Version::H1, None, None).await? {
        Sender::H1(mut s) => s
            .send_request(req)
            .await
            .map(|r| r.map(|b| Held::new(b, None, None)))
            .map_err(classify),
        Sender::H2(_) => Err(SendError::Connect(io::Error::other("upgrade over HTTP/2"))),
    }
}
