//! The hop between nodes, from the source pod's netns to the destination pod's
//! tunnel port (15008). Transport only: the client opens a stream to a
//! target; the server authenticates the peer, reads the target and hands
//! (peer, identity, target, stream) to a [`Handler`], the proxy's one
//! inbound path, which decides and delivers. Two transports:
//! - [`hbone`] (default when a CA is configured): HTTP/2 CONNECT over mutual
//!   TLS 1.3, each side proving a SPIFFE identity;
//! - plain (no CA, and only with `--insecure-plaintext-tunnel`: tests and the
//!   "mTLS off" benchmark): plain TCP opened by a 12-byte preface naming the
//!   target (`FERRY\x01` + IPv4 + port), no authentication at all.
//!
//! Without a CA and without that flag the tunnel is [`Tunnel::Off`]: no hop
//! between nodes, and nothing accepted on 15008. No CA means no tunnel.

pub mod hbone;
pub mod pool;

use std::{
    future::Future,
    io,
    net::{Ipv4Addr, SocketAddrV4},
    sync::Arc,
    time::Duration,
};

use ferry_model::SpiffeId;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::sockets::{self, SocketFactory};

pub const TUNNEL_PORT: u16 = 15008;
const MAGIC: &[u8; 6] = b"FERRY\x01";
const PREFACE_LEN: usize = 12;
const PREFACE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PrefaceError {
    #[error("not a Ferry tunnel preface (bad magic)")]
    BadMagic,
    #[error("target port 0")]
    BadPort,
}

pub fn encode(target: SocketAddrV4) -> [u8; PREFACE_LEN] {
    let mut b = [0u8; PREFACE_LEN];
    b[..6].copy_from_slice(MAGIC);
    b[6..10].copy_from_slice(&target.ip().octets());
    b[10..12].copy_from_slice(&target.port().to_be_bytes());
    b
}

pub fn decode(b: &[u8; PREFACE_LEN]) -> Result<SocketAddrV4, PrefaceError> {
    if &b[..6] != MAGIC {
        return Err(PrefaceError::BadMagic);
    }
    let ip = Ipv4Addr::new(b[6], b[7], b[8], b[9]);
    let port = u16::from_be_bytes([b[10], b[11]]);
    if port == 0 {
        return Err(PrefaceError::BadPort);
    }
    Ok(SocketAddrV4::new(ip, port))
}

/// A byte stream the proxy can copy to and from.
pub trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}
pub type BoxStream = Box<dyn Stream>;

/// A stream the server accepted, as it hands it to the proxy.
#[derive(Clone, Debug)]
pub struct TunnelRequest {
    /// The tunnel's peer: the source pod's address.
    pub peer: SocketAddrV4,
    /// Where the source's app was going (must be this pod).
    pub target: SocketAddrV4,
    /// The SPIFFE id the peer proved; None on the plain transport.
    pub identity: Option<SpiffeId>,
}

/// How the server answers a stream the handler does not take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reject {
    /// Policy refuses it (403).
    Forbidden,
    /// Not for this pod (421).
    Misdirected,
    /// The app cannot be reached (503).
    Unavailable,
}

impl Reject {
    pub fn status(self) -> hyper::StatusCode {
        match self {
            Reject::Forbidden => hyper::StatusCode::FORBIDDEN,
            Reject::Misdirected => hyper::StatusCode::MISDIRECTED_REQUEST,
            Reject::Unavailable => hyper::StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// The proxy's side of the tunnel server: decides on each stream before it
/// is answered, then carries the accepted ones.
pub trait Handler: Send + Sync + 'static {
    type Accepted: Send + 'static;
    /// Decides on a stream; `Ok` answers it as accepted.
    fn accept(&self, req: TunnelRequest) -> impl Future<Output = Result<Self::Accepted, Reject>> + Send;
    /// Carries an accepted stream until it ends.
    fn relay(&self, accepted: Self::Accepted, stream: BoxStream) -> impl Future<Output = ()> + Send;
}

/// The source side of a tunnelled connection: which pod, and its sockets.
#[derive(Clone, Copy)]
pub struct TunnelSource<'a> {
    /// The source workload's uid (whose certificate is presented).
    pub uid: &'a str,
    /// `namespace/name`, for logs.
    pub label: &'a str,
    pub sockets: &'a dyn SocketFactory,
}

/// How the agent reaches a pod on another node.
#[derive(Clone, Default)]
pub enum Tunnel {
    /// No CA and no explicit opt-in to plaintext: no tunnel (fail closed).
    #[default]
    Off,
    /// Unauthenticated (`--insecure-plaintext-tunnel`: tests, benchmarks).
    Plain,
    Hbone(Arc<hbone::Hbone>),
}

/// Why [`Tunnel::Off`] refuses: said to the local client's agent log and to
/// the remote peer's.
const OFF_REASON: &str = "no CA configured: the tunnel between nodes is off (give the agent --control, \
                          or --insecure-plaintext-tunnel for tests)";

impl Tunnel {
    /// Opens a stream from `src` to `target` on another node, whose workload
    /// must prove `expected` when mTLS is on.
    pub async fn open(
        &self,
        src: TunnelSource<'_>,
        target: SocketAddrV4,
        expected: &SpiffeId,
    ) -> io::Result<BoxStream> {
        match self {
            Tunnel::Off => Err(io::Error::new(io::ErrorKind::PermissionDenied, OFF_REASON)),
            Tunnel::Plain => {
                let to = SocketAddrV4::new(*target.ip(), TUNNEL_PORT);
                let mut s = sockets::connect(src.sockets, sockets::Source::Any, to).await?;
                s.write_all(&encode(target)).await?;
                Ok(Box::new(s))
            }
            Tunnel::Hbone(h) => h.open(src, target, expected).await,
        }
    }

    /// Hand-over: served HBONE connections close gracefully (GOAWAY); the
    /// plain transport has one connection per stream, nothing to do.
    pub fn drain(&self) {
        if let Tunnel::Hbone(h) = self {
            h.drain();
        }
    }

    pub fn is_mtls(&self) -> bool {
        matches!(self, Tunnel::Hbone(_))
    }

    /// Serves one connection accepted on pod `uid`'s tunnel listener,
    /// handing each stream in it to `handler`.
    pub async fn serve<H: Handler>(&self, tcp: TcpStream, uid: &str, label: &str, handler: Arc<H>) {
        match self {
            Tunnel::Off => {
                let peer = sockets::v4_addrs(&tcp).map(|(_, p)| p.to_string()).unwrap_or_default();
                tracing::warn!(pod = %label, client = %peer, error = OFF_REASON, "refused tunnel connection");
                // Dropped: the peer sees the connection closed, nothing read.
            }
            Tunnel::Plain => serve_plain(tcp, label, handler).await,
            Tunnel::Hbone(h) => h.serve(tcp, uid, label, handler).await,
        }
    }
}

/// The plain transport: a 12-byte preface, then the stream itself.
async fn serve_plain<H: Handler>(mut tcp: TcpStream, label: &str, handler: Arc<H>) {
    let Ok((_, peer)) = sockets::v4_addrs(&tcp) else { return };
    let mut b = [0u8; PREFACE_LEN];
    let target = match tokio::time::timeout(PREFACE_TIMEOUT, tcp.read_exact(&mut b)).await {
        Ok(Ok(_)) => match decode(&b) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(pod = %label, client = %peer, error = %e, "refused tunnel connection");
                return;
            }
        },
        Ok(Err(e)) => {
            tracing::warn!(pod = %label, client = %peer, error = %e, "refused tunnel connection");
            return;
        }
        Err(_) => {
            tracing::warn!(pod = %label, client = %peer, error = "no tunnel preface within 5s", "refused tunnel connection");
            return;
        }
    };
    let req = TunnelRequest {
        peer,
        target,
        identity: None,
    };
    if let Ok(acc) = handler.accept(req).await {
        handler.relay(acc, Box::new(tcp)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preface_round_trips_and_rejects_garbage() {
        let t: SocketAddrV4 = "10.1.2.3:8080".parse().unwrap();
        assert_eq!(decode(&encode(t)), Ok(t));
        assert_eq!(decode(b"GET / HTTP/1"), Err(PrefaceError::BadMagic));
        let mut z = encode(t);
        z[10] = 0;
        z[11] = 0;
        assert_eq!(decode(&z), Err(PrefaceError::BadPort));
    }

    /// A handler the `Off` tunnel must never reach.
    struct Unreachable;
    impl Handler for Unreachable {
        type Accepted = ();
        async fn accept(&self, req: TunnelRequest) -> Result<(), Reject> {
            panic!("the tunnel is off, yet a stream reached the handler: {req:?}")
        }
        async fn relay(&self, _: (), _: BoxStream) {}
    }

    #[tokio::test]
    async fn no_ca_and_no_flag_means_no_tunnel_either_way() {
        assert!(matches!(Tunnel::default(), Tunnel::Off), "the default is no tunnel");
        let off = Tunnel::Off;
        assert!(!off.is_mtls());
        // Client side: nothing is dialled, and the reason is clear.
        let src = TunnelSource {
            uid: "u",
            label: "default/a",
            sockets: &sockets::HostSockets,
        };
        let target: SocketAddrV4 = "127.0.0.1:9".parse().unwrap();
        let e = off
            .open(src, target, &SpiffeId::new("default", "b"))
            .await
            .err()
            .expect("refused");
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        assert!(e.to_string().contains("--insecure-plaintext-tunnel"), "{e}");
        // Server side: a valid plain preface is not read, the connection is closed.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = l.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut c = TcpStream::connect(at).await.unwrap();
            let _ = c.write_all(&encode(target)).await;
            let mut rest = Vec::new();
            let _ = c.read_to_end(&mut rest).await;
            rest
        });
        let (tcp, _) = l.accept().await.unwrap();
        off.serve(tcp, "u", "default/a", Arc::new(Unreachable)).await;
        assert!(client.await.unwrap().is_empty(), "nothing comes back");
        // Positive control: the plain tunnel (with the flag) takes the same preface.
        struct Seen(tokio::sync::mpsc::UnboundedSender<SocketAddrV4>);
        impl Handler for Seen {
            type Accepted = ();
            async fn accept(&self, req: TunnelRequest) -> Result<(), Reject> {
                let _ = self.0.send(req.target);
                Err(Reject::Forbidden)
            }
            async fn relay(&self, _: (), _: BoxStream) {}
        }
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let c = tokio::spawn(async move {
            let mut c = TcpStream::connect(at).await.unwrap();
            c.write_all(&encode(target)).await.unwrap();
            c
        });
        let (tcp, _) = l.accept().await.unwrap();
        Tunnel::Plain.serve(tcp, "u", "default/a", Arc::new(Seen(tx))).await;
        drop(c.await.unwrap());
        assert_eq!(rx.recv().await, Some(target));
    }
}
