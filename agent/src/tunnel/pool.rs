//! The HBONE client's connection pool.
//!
//! Invariants:
//! - A key is (source workload uid, its certificate's serial, destination
//!   IP): a renewed certificate has a new serial, so new streams use a new
//!   connection while old streams finish on the old one.
//! - The map's lock is held only to find or create a key's slot, never
//!   across I/O. Each slot has its own async lock, held while a connection
//!   is chosen or dialed: one dial per key at a time (single flight); other
//!   keys never wait for it, so one unreachable node stalls nobody else.
//! - A connection carries at most [`MAX_STREAMS`] streams at once (the
//!   server is configured with the same limit). Streams are spread: a new
//!   stream takes the connection with the fewest streams, and while every
//!   connection of the key is busy and the key has fewer than [`spread`]
//!   connections, another is dialed, so parallel streams are not funnelled
//!   through one TLS connection and one task (one core). When every
//!   connection of a key is full, another is dialed, up to [`MAX_CONNS`] per key; past that
//!   a caller waits, until its deadline, for a stream of that key to end
//!   (woken by it, not polling).
//! - A connection is not used for new streams once closed, once retired
//!   (a stream on it was refused unsent: the server is going away), once its
//!   certificate has expired, or after [`IDLE_TIMEOUT`] without streams;
//!   such connections leave the pool (HTTP/2 closes when the last handle and
//!   stream are gone). HTTP/2 pings find dead peers.
//! - A burst's extra connections do not outlive it by long: beyond a key's
//!   [`spread`], a connection without streams for [`SURPLUS_IDLE`] is closed
//!   ([`Pool::sweep`], run periodically). 5,000 streams held from one pod
//!   open 50 connections; kept for [`IDLE_TIMEOUT`] they held tens of MiB
//!   of TLS and HTTP/2 buffers after the streams had gone (the soak's
//!   settled RSS, docs/reliability.md).

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::client::conn::http2::SendRequest;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::Notify,
};

/// Streams per HTTP/2 connection (client and server agree).
pub const MAX_STREAMS: usize = 100;
/// Connections per key.
pub const MAX_CONNS: usize = 64;
/// Connections a key is spread over before streams share one (at least 1):
/// `FERRY_TUNNEL_SPREAD`, by default the number of cores (at most 4).
pub fn spread() -> usize {
    static S: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *S.get_or_init(|| {
        std::env::var("FERRY_TUNNEL_SPREAD")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get().min(4)))
            .clamp(1, MAX_CONNS)
    })
}

/// A connection without streams for this long is dropped.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// A connection beyond its key's [`spread`] without streams for this long is
/// closed.
pub const SURPLUS_IDLE: Duration = Duration::from_secs(10);

pub type PoolKey = (String, String, Ipv4Addr);

/// One pooled HTTP/2 connection.
pub struct Conn {
    pub sender: SendRequest<Empty<Bytes>>,
    active: Arc<AtomicUsize>,
    /// Set when a stream was refused unsent (GOAWAY): new streams go elsewhere
    /// at once, before the connection's task has seen it close.
    retired: AtomicBool,
    /// When the certificate it was opened with expires (unix seconds).
    not_after_unix: i64,
    idle_since: Mutex<Instant>,
    /// Its key's wake-up for callers waiting on a full key.
    freed: Arc<Notify>,
}

impl Conn {
    fn new(sender: SendRequest<Empty<Bytes>>, not_after_unix: i64, freed: Arc<Notify>) -> Arc<Self> {
        Arc::new(Self {
            sender,
            active: Arc::new(AtomicUsize::new(0)),
            retired: AtomicBool::new(false),
            not_after_unix,
            idle_since: Mutex::new(Instant::now()),
            freed,
        })
    }

    /// Whether new streams may use it at `now` (unix seconds / instant).
    fn usable(&self, now_unix: i64, now: Instant) -> bool {
        let idle = self.active.load(Ordering::Acquire) == 0
            && now.duration_since(*self.idle_since.lock().unwrap_or_else(|e| e.into_inner())) > IDLE_TIMEOUT;
        !self.retired.load(Ordering::Acquire) && !self.sender.is_closed() && now_unix < self.not_after_unix && !idle
    }

    /// No new streams on it (its open streams carry on).
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
    }

    /// How long it has had no stream (None: it has some).
    fn idle_for(&self, now: Instant) -> Option<Duration> {
        (self.active.load(Ordering::Acquire) == 0)
            .then(|| now.duration_since(*self.idle_since.lock().unwrap_or_else(|e| e.into_inner())))
    }

    fn streams(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Takes one of its stream slots until the lease is dropped.
    fn lease(self: &Arc<Self>) -> Lease {
        self.active.fetch_add(1, Ordering::AcqRel);
        Lease(self.clone())
    }
}

/// A stream slot on a connection; given back when dropped.
pub struct Lease(Arc<Conn>);

impl Lease {
    pub fn conn(&self) -> &Arc<Conn> {
        &self.0
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.0.idle_since.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        }
        // One stream slot is free: one waiter may take it (a permit is kept
        // if nobody waits yet, so no wake-up is lost).
        self.0.freed.notify_one();
    }
}

/// A key's connections, and the wake-up for callers waiting on them.
#[derive(Default)]
struct SlotInner {
    conns: Arc<tokio::sync::Mutex<Vec<Arc<Conn>>>>,
    freed: Arc<Notify>,
}

type Slot = Arc<SlotInner>;

/// The key's lock, held while a connection is dialed (single flight).
pub struct DialGuard {
    conns: tokio::sync::OwnedMutexGuard<Vec<Arc<Conn>>>,
    freed: Arc<Notify>,
}

#[derive(Default)]
pub struct Pool {
    slots: Mutex<HashMap<PoolKey, Slot>>,
}

/// What choosing a connection found.
pub enum Pick {
    /// A stream slot on a pooled connection.
    Leased(Lease),
    /// None has room and the key may have another: dial it while holding
    /// this guard (single flight), then [`Pool::add`] it.
    Dial(DialGuard),
    /// Every connection is full and the key has its maximum: wait on this
    /// for a stream to end, then pick again.
    Full(Arc<Notify>),
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl Pool {
    fn slot(&self, key: &PoolKey) -> Slot {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = slots.get(key) {
            return s.clone();
        }
        // A new key: drop slots nobody uses and that hold nothing usable.
        let (now_unix, now) = (now_unix(), Instant::now());
        slots.retain(|_, s| {
            Arc::strong_count(s) > 1
                || s.conns
                    .try_lock()
                    .map_or(true, |conns| conns.iter().any(|c| c.usable(now_unix, now)))
        });
        slots.entry(key.clone()).or_default().clone()
    }

    /// Picks a connection with room for one more stream, or says to dial
    /// one (the caller then holds the key's lock), or that all are full.
    pub async fn pick(&self, key: &PoolKey) -> Pick {
        let slot = self.slot(key);
        let mut conns = slot.conns.clone().lock_owned().await;
        trim(&mut conns, now_unix(), Instant::now(), SURPLUS_IDLE);
        let least = conns
            .iter()
            .filter(|c| c.streams() < MAX_STREAMS)
            .min_by_key(|c| c.streams());
        match least {
            Some(c) if c.streams() == 0 || conns.len() >= spread() => return Pick::Leased(c.lease()),
            _ => {}
        }
        if conns.len() < MAX_CONNS {
            Pick::Dial(DialGuard {
                conns,
                freed: slot.freed.clone(),
            })
        } else {
            Pick::Full(slot.freed.clone())
        }
    }

    /// Adds a dialed connection under the key's lock and leases a stream on it.
    pub fn add(mut guard: DialGuard, sender: SendRequest<Empty<Bytes>>, not_after_unix: i64) -> Lease {
        let conn = Conn::new(sender, not_after_unix, guard.freed.clone());
        let lease = conn.lease();
        guard.conns.push(conn);
        lease
    }

    /// Drops, from every key, the connections [`trim`] drops (surplus idle
    /// for `surplus_idle`), and the keys left with none that nobody is
    /// using; returns the connections left.
    pub fn sweep(&self, surplus_idle: Duration) -> usize {
        let slots: Vec<Slot> = self
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        let (now_unix, now) = (now_unix(), Instant::now());
        let mut left = 0;
        for s in &slots {
            // A key being dialed or picked is trimmed by that pick.
            if let Ok(mut conns) = s.conns.try_lock() {
                trim(&mut conns, now_unix, now, surplus_idle);
                left += conns.len();
            }
        }
        drop(slots);
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, s| Arc::strong_count(s) > 1 || s.conns.try_lock().map_or(true, |c| !c.is_empty()));
        left
    }

    /// Connections pooled, over every key.
    pub fn open(&self) -> usize {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots
            .values()
            .filter_map(|s| s.conns.try_lock().ok().map(|c| c.len()))
            .sum()
    }

    /// Connections pooled for `key` (for tests and views).
    pub fn connections(&self, key: &PoolKey) -> usize {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots
            .get(key)
            .and_then(|s| s.conns.try_lock().ok().map(|c| c.len()))
            .unwrap_or(0)
    }
}

/// Keeps a key's connections that may take new streams, less its surplus:
/// beyond [`spread`], those without streams for `surplus_idle`.
fn trim(conns: &mut Vec<Arc<Conn>>, now_unix: i64, now: Instant, surplus_idle: Duration) {
    conns.retain(|c| c.usable(now_unix, now));
    let mut surplus = conns.len().saturating_sub(spread());
    if surplus > 0 {
        conns.retain(|c| {
            let drop = surplus > 0 && c.idle_for(now).is_some_and(|d| d >= surplus_idle);
            surplus -= usize::from(drop);
            !drop
        });
    }
}

/// A tunnelled stream that holds its connection's stream slot while open.
pub struct Leased<S> {
    pub stream: S,
    pub _lease: Lease,
}

impl<S: AsyncRead + Unpin> AsyncRead for Leased<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Leased<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
