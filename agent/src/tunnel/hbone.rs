//! HBONE-style tunnel: HTTP/2 `CONNECT <dst ip:port>` over mutual TLS 1.3 on
//! port 15008, opened from the source pod's netns to the destination pod's IP.
//! The client presents the source workload's certificate and checks the
//! server's SPIFFE id against the destination it expects; the server requires
//! a client chain to the trust bundle and learns the peer's identity, then
//! hands each CONNECT stream to the proxy's [`Handler`].
//!
//! The client's connections are pooled ([`super::pool`], whose header states
//! its invariants). Every wait has a deadline: the TCP connect
//! ([`CONNECT_TIMEOUT`]), the TLS handshake ([`HANDSHAKE_TIMEOUT`]), and a
//! stream's whole opening ([`OPEN_TIMEOUT`]).

use std::{
    io,
    net::{Ipv4Addr, SocketAddrV4},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{client::conn::http2::SendRequest, Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use ferry_model::SpiffeId;
use prometheus_client::{collector::Collector, encoding::DescriptorEncoder, registry::Registry};

use super::{
    pool::{self, Lease, Leased, Pick, Pool, MAX_STREAMS},
    BoxStream, Handler, TunnelRequest, TunnelSource, TUNNEL_PORT,
};
use crate::{
    identity::{tls::peer_spiffe_id, Identities},
    sockets,
    telemetry::metrics::{const_counter, const_gauge},
};

/// TCP connect to a destination's tunnel port.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The TLS handshake after it.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Opening one stream, from asking the pool to the CONNECT's answer
/// (covers a dial, or a wait for a free stream on a full key).
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(20);
/// CONNECTs refused unsent (each on a connection then retired) or left
/// unanswered before the last refusal is the answer.
const MAX_UNSENT: usize = 8;
/// How long the first CONNECT waits for its answer before it is abandoned
/// (reset) and sent again; each attempt waits twice as long as the one
/// before, within [`OPEN_TIMEOUT`]. A destination answers a CONNECT once it
/// has reached the local app: in milliseconds, or after a SYN retransmit
/// (1 s) to an app whose backlog is full. One CONNECT in a few hundred sent
/// while the destination's GOAWAY was on its way was never answered, nor
/// refused (`concurrent_new_streams_through_a_goaway_never_fail` under CPU
/// load; the destination's handler never saw it). Where hyper or h2 loses
/// it on the closing connection is not pinned down; without this deadline
/// the app's connection hung for OPEN_TIMEOUT.
const FIRST_ANSWER_WITHIN: Duration = Duration::from_secs(2);
/// HTTP/2 pings on idle and busy connections; no answer in time closes it.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 flow-control windows. h2's 64 KiB default caps a stream at 64 KiB
/// per round trip; docs/identity.md has the measurement behind 1 MiB.
/// `FERRY_H2_STREAM_WINDOW` (bytes) overrides it, for measuring.
fn stream_window() -> u32 {
    static W: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *W.get_or_init(|| {
        std::env::var("FERRY_H2_STREAM_WINDOW")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1024 * 1024)
    })
}

fn conn_window() -> u32 {
    stream_window().saturating_mul(4)
}

fn env_u32(name: &str, default: u32) -> u32 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The largest HTTP/2 frame a peer may send us: h2's 16 KiB. 1 MiB (as
/// ztunnel once used) measured no better here (docs/performance.md);
/// `FERRY_H2_FRAME_SIZE` overrides it, for measuring.
fn frame_size() -> u32 {
    static F: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *F.get_or_init(|| env_u32("FERRY_H2_FRAME_SIZE", 16 * 1024))
}

/// A bounded set of failure reasons (the detail goes to the log).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: &'static str,
}

fn count(f: &Family<Reason, Counter>, reason: &'static str) {
    f.get_or_create(&Reason { reason }).inc();
}

#[derive(Default, Debug)]
pub struct TunnelStats {
    pub pooled_connections_opened: AtomicU64,
    pub streams_opened: AtomicU64,
    /// CONNECTs refused unsent (the destination going away) and sent again
    /// on another connection.
    pub streams_retried: AtomicU64,
    pub handshakes_ok: AtomicU64,
    /// Outgoing handshakes that failed, by reason (`tls`, `timeout`, `identity`).
    pub handshake_failures: Family<Reason, Counter>,
    /// Incoming tunnel connections refused, by reason (`no_certificate`,
    /// `tls`, `timeout`, `no_spiffe_id`).
    pub refused: Family<Reason, Counter>,
}

pub struct Hbone {
    pub ids: Arc<Identities>,
    pool: Pool,
    pub stats: TunnelStats,
    /// Set once this agent hands over (handover.rs): served connections
    /// send GOAWAY, so peers open new streams elsewhere while these finish.
    draining: tokio::sync::watch::Sender<bool>,
}

fn err(kind: io::ErrorKind, msg: impl Into<String>) -> io::Error {
    io::Error::new(kind, msg.into())
}

/// Why a CONNECT on a pooled connection did not give a stream.
#[derive(Debug)]
enum Refused {
    /// The server never processed it (the request was not sent, or the
    /// server's GOAWAY or REFUSED_STREAM says so: RFC 9113, 8.7): safe to
    /// send again on another connection. (A GOAWAY error can also reach a
    /// stream the server took if the connection then closes before its
    /// answer; sending that CONNECT again costs the destination an extra
    /// empty connection, never the client's bytes, which only follow a 200.)
    Unsent(io::Error),
    /// It was answered with a refusal, or may have been processed.
    Failed(io::Error),
}

impl Refused {
    fn from_hyper(e: hyper::Error) -> Self {
        // Only a graceful GOAWAY (NO_ERROR: the server is closing) says the
        // stream was not processed; a GOAWAY for an error is a failure.
        let unsent = e.is_canceled()
            || e.is_closed()
            || std::error::Error::source(&e)
                .and_then(|s| s.downcast_ref::<h2::Error>())
                .is_some_and(|h| {
                    (h.is_go_away() && h.is_remote() && h.reason() == Some(h2::Reason::NO_ERROR))
                        || h.reason() == Some(h2::Reason::REFUSED_STREAM)
                });
        let e = err(io::ErrorKind::BrokenPipe, format!("tunnel CONNECT: {e}"));
        if unsent {
            Refused::Unsent(e)
        } else {
            Refused::Failed(e)
        }
    }
}

impl std::fmt::Debug for Hbone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hbone")
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Hbone {
    pub fn new(ids: Arc<Identities>) -> Self {
        Self {
            ids,
            pool: Default::default(),
            stats: Default::default(),
            draining: tokio::sync::watch::channel(false).0,
        }
    }

    /// Asks every served connection to close gracefully (HTTP/2 GOAWAY):
    /// open streams finish, new ones go to a new connection.
    pub fn drain(&self) {
        self.draining.send_replace(true);
    }

    /// Closes the pool's surplus idle connections every few seconds, for as
    /// long as this tunnel exists.
    pub fn spawn_sweeper(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(pool::SURPLUS_IDLE / 2);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(h) = me.upgrade() else { return };
                h.sweep_pool(pool::SURPLUS_IDLE);
            }
        });
    }

    /// Closes pooled connections beyond each key's spread that have had no
    /// stream for `surplus_idle`; returns the connections left.
    pub fn sweep_pool(&self, surplus_idle: std::time::Duration) -> usize {
        self.pool.sweep(surplus_idle)
    }

    /// Registers the tunnel's metrics.
    pub fn register_metrics(self: &Arc<Self>, r: &mut Registry) {
        r.register(
            "ferry_tunnel_handshake_failures",
            "outgoing tunnel handshakes that failed, by reason",
            self.stats.handshake_failures.clone(),
        );
        r.register(
            "ferry_tunnel_refused",
            "incoming tunnel connections refused, by reason (detail in the log)",
            self.stats.refused.clone(),
        );
        r.register_collector(Box::new(StatsCollector(self.clone())));
    }

    /// A CONNECT stream from `src` to `target`, over a pooled connection.
    pub async fn open(
        &self,
        src: TunnelSource<'_>,
        target: SocketAddrV4,
        expected: &SpiffeId,
    ) -> io::Result<BoxStream> {
        let uid = src.uid;
        let cert = self
            .ids
            .get(uid)
            .ok_or_else(|| err(io::ErrorKind::NotConnected, "no workload certificate yet"))?;
        let key = (uid.to_owned(), cert.serial.clone(), *target.ip());
        // The last CONNECT refused unsent or unanswered, for the error at
        // the deadline.
        let mut last: Option<io::Error> = None;
        let opened = tokio::time::timeout(OPEN_TIMEOUT, async {
            // A pooled connection the server is closing (GOAWAY: its agent
            // handed over) refuses a CONNECT it never processed: the
            // connection is retired and the CONNECT sent again on another
            // (a new one if need be), so a hand-over fails no new stream.
            // Each attempt retires a connection; at most MAX_UNSENT of them,
            // then the last refusal is the answer (a peer that refuses every
            // connection is not dialed without end).
            let mut answer_within = FIRST_ANSWER_WITHIN;
            for _ in 0..MAX_UNSENT {
                let lease = loop {
                    match self.pool.pick(&key).await {
                        Pick::Leased(l) => break l,
                        Pick::Dial(guard) => {
                            let sender = self.dial(src, &cert.client, *target.ip(), expected).await?;
                            break Pool::add(guard, sender, cert.not_after_unix);
                        }
                        // Every connection of this key is at its stream limit:
                        // wait for one of its streams to end.
                        Pick::Full(freed) => freed.notified().await,
                    }
                };
                let conn = lease.conn().clone();
                let answered = tokio::time::timeout(answer_within, self.connect(lease, target)).await;
                let Ok(answered) = answered else {
                    // Dropped unanswered (h2 resets the stream). The connection
                    // stays: if it is closing, the next CONNECT on it is
                    // refused unsent at once and retires it.
                    self.stats.streams_retried.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(dst = %target, waited_ms = answer_within.as_millis() as u64, "tunnel CONNECT unanswered; sending it again");
                    last = Some(err(
                        io::ErrorKind::TimedOut,
                        format!("CONNECT unanswered within {} ms", answer_within.as_millis()),
                    ));
                    answer_within *= 2;
                    continue;
                };
                match answered {
                    Err(Refused::Unsent(e)) => {
                        conn.retire();
                        self.stats.streams_retried.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(dst = %target, reason = %e, "tunnel stream refused unsent; retrying on another connection");
                        last = Some(e);
                    }
                    Err(Refused::Failed(e)) => return Err(e),
                    Ok(s) => return Ok(s),
                }
            }
            Err(last.take().unwrap_or_else(|| err(io::ErrorKind::BrokenPipe, "tunnel CONNECT refused")))
        })
        .await;
        opened.unwrap_or_else(|_| {
            let why = last.map_or_else(String::new, |e| format!(" (last refusal: {e})"));
            Err(err(
                io::ErrorKind::TimedOut,
                format!("tunnel to {target}: no stream within {}s{why}", OPEN_TIMEOUT.as_secs()),
            ))
        })
    }

    /// Sends the CONNECT on the leased connection and upgrades the answer.
    async fn connect(&self, lease: Lease, target: SocketAddrV4) -> Result<BoxStream, Refused> {
        let mut sender = lease.conn().sender.clone();
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(target.to_string())
            .body(Empty::<Bytes>::new())
            .map_err(|e| Refused::Failed(err(io::ErrorKind::InvalidInput, e.to_string())))?;
        sender.ready().await.map_err(Refused::from_hyper)?;
        let resp = sender.send_request(req).await.map_err(Refused::from_hyper)?;
        if resp.status() != StatusCode::OK {
            return Err(Refused::Failed(err(
                io::ErrorKind::ConnectionRefused,
                format!("tunnel CONNECT {target}: {}", resp.status()),
            )));
        }
        let up = hyper::upgrade::on(resp)
            .await
            .map_err(|e| Refused::Failed(err(io::ErrorKind::BrokenPipe, e.to_string())))?;
        self.stats.streams_opened.fetch_add(1, Ordering::Relaxed);
        Ok(Box::new(Leased {
            stream: TokioIo::new(up),
            _lease: lease,
        }))
    }

    /// Connections pooled from `uid` (with its current certificate) to `ip`.
    pub fn pooled(&self, uid: &str, ip: Ipv4Addr) -> usize {
        self.ids
            .get(uid)
            .map_or(0, |c| self.pool.connections(&(uid.to_owned(), c.serial.clone(), ip)))
    }

    async fn dial(
        &self,
        src: TunnelSource<'_>,
        client: &Arc<rustls::ClientConfig>,
        ip: Ipv4Addr,
        expected: &SpiffeId,
    ) -> io::Result<SendRequest<Empty<Bytes>>> {
        let to = SocketAddrV4::new(ip, TUNNEL_PORT);
        let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, sockets::connect(src.sockets, sockets::Source::Any, to))
            .await
        {
            Ok(r) => r?,
            Err(_) => {
                count(&self.stats.handshake_failures, "connect_timeout");
                tracing::warn!(src = %src.label, dst = %ip, "tunnel connect timed out");
                return Err(err(
                    io::ErrorKind::TimedOut,
                    format!(
                        "tunnel connect to {to}: no answer within {}s",
                        CONNECT_TIMEOUT.as_secs()
                    ),
                ));
            }
        };
        let connector = tokio_rustls::TlsConnector::from(client.clone());
        let tls = match tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            connector.connect(ServerName::IpAddress(ip.into()), tcp),
        )
        .await
        {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                count(&self.stats.handshake_failures, "tls");
                tracing::warn!(src = %src.label, dst = %ip, reason = %e, "tunnel handshake failed");
                return Err(e);
            }
            Err(_) => {
                count(&self.stats.handshake_failures, "timeout");
                return Err(err(io::ErrorKind::TimedOut, "tunnel handshake timed out"));
            }
        };
        let peer = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(peer_spiffe_id);
        if peer.as_ref() != Some(expected) {
            count(&self.stats.handshake_failures, "identity");
            let proved = peer.map_or_else(|| "no SPIFFE id".to_owned(), |p| p.to_string());
            let reason = format!("destination {ip} proved {proved}, expected {expected}");
            tracing::warn!(src = %src.label, reason = %reason, "tunnel refused: wrong identity");
            return Err(err(io::ErrorKind::PermissionDenied, reason));
        }
        self.stats.handshakes_ok.fetch_add(1, Ordering::Relaxed);
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .initial_stream_window_size(stream_window())
            .initial_connection_window_size(conn_window())
            .max_frame_size(frame_size())
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| err(io::ErrorKind::BrokenPipe, e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        self.stats.pooled_connections_opened.fetch_add(1, Ordering::Relaxed);
        Ok(sender)
    }
}

impl Hbone {
    /// Serves one connection accepted on pod `uid`'s tunnel listener: mutual
    /// TLS with that pod's certificate, then HTTP/2, each CONNECT stream
    /// handed to `handler` with the identity the client proved.
    pub async fn serve<H: Handler>(&self, tcp: TcpStream, uid: &str, label: &str, handler: Arc<H>) {
        let Ok((_, peer)) = sockets::v4_addrs(&tcp) else { return };
        let refuse = |kind: &'static str, reason: String| {
            count(&self.stats.refused, kind);
            tracing::warn!(pod = %label, client = %peer, reason = %reason, "refused tunnel connection");
        };
        let Some(cert) = self.ids.get(uid) else {
            return refuse("no_certificate", "this pod has no certificate yet".into());
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(cert.server.clone());
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => return refuse("tls", format!("TLS handshake: {e}")),
            Err(_) => return refuse("timeout", "TLS handshake timed out".into()),
        };
        let Some(identity) = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(peer_spiffe_id)
        else {
            return refuse("no_spiffe_id", "client certificate has no SPIFFE id".into());
        };
        let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let (handler, identity) = (handler.clone(), identity.clone());
            async move { Ok::<_, std::convert::Infallible>(connect(handler, peer, identity, req).await) }
        });
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .max_concurrent_streams(MAX_STREAMS as u32)
            .initial_stream_window_size(stream_window())
            .initial_connection_window_size(conn_window())
            .max_frame_size(frame_size())
            .serve_connection(TokioIo::new(tls), svc);
        tokio::pin!(conn);
        let mut draining = self.draining.subscribe();
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = draining.wait_for(|d| *d) => conn.as_mut().graceful_shutdown(),
        }
        let _ = conn.await;
    }
}

fn status(code: StatusCode) -> Response<Empty<Bytes>> {
    let mut r = Response::new(Empty::new());
    *r.status_mut() = code;
    r
}

/// One CONNECT stream: the handler decides; accepted, it carries the
/// upgraded stream.
async fn connect<H: Handler>(
    handler: Arc<H>,
    peer: SocketAddrV4,
    identity: SpiffeId,
    req: Request<hyper::body::Incoming>,
) -> Response<Empty<Bytes>> {
    if req.method() != Method::CONNECT {
        return status(StatusCode::METHOD_NOT_ALLOWED);
    }
    let Some(target) = connect_target(req.uri()) else {
        return status(StatusCode::BAD_REQUEST);
    };
    let accepted = match handler
        .accept(TunnelRequest {
            peer,
            target,
            identity: Some(identity),
        })
        .await
    {
        Ok(a) => a,
        Err(r) => return status(r.status()),
    };
    tokio::spawn(async move {
        match hyper::upgrade::on(req).await {
            Ok(up) => handler.relay(accepted, Box::new(TokioIo::new(up))).await,
            Err(e) => tracing::warn!(client = %peer, error = %e, "tunnel stream upgrade failed"),
        }
    });
    status(StatusCode::OK)
}

/// Pool and handshake counters, read at scrape time.
#[derive(Debug)]
struct StatsCollector(Arc<Hbone>);

impl Collector for StatsCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let t = &self.0.stats;
        for (name, v, help) in [
            (
                "ferry_tunnel_pool_connections",
                &t.pooled_connections_opened,
                "pooled HTTP/2 connections opened",
            ),
            ("ferry_tunnel_streams", &t.streams_opened, "CONNECT streams opened"),
            (
                "ferry_tunnel_streams_retried",
                &t.streams_retried,
                "CONNECTs sent again: refused unsent by a destination going away (GOAWAY), or unanswered within the attempt's deadline",
            ),
            (
                "ferry_tunnel_handshakes",
                &t.handshakes_ok,
                "outgoing tunnel handshakes that proved the expected identity",
            ),
        ] {
            const_counter(&mut enc, name, help, v.load(Ordering::Relaxed))?;
        }
        const_gauge(
            &mut enc,
            "ferry_tunnel_pool_open",
            "pooled HTTP/2 connections open for new streams now",
            self.0.pool.open() as i64,
        )?;
        Ok(())
    }
}

/// The target of an HBONE CONNECT: its authority as `IPv4:port` (anything
/// else is refused with 400). Public for the fuzz target (`fuzz/`).
pub fn connect_target(uri: &hyper::Uri) -> Option<SocketAddrV4> {
    uri.authority().and_then(|a| a.as_str().parse::<SocketAddrV4>().ok())
}
