//! The hop between nodes, from the source pod's netns to the destination pod's
//! tunnel port (15008):
//! - [`hbone`] (default when a CA is configured): HTTP/2 CONNECT over mutual
//!   TLS 1.3, each side proving a SPIFFE identity;
//! - plain (no CA: development and the "mTLS off" benchmark): plain TCP opened
//!   by a 12-byte preface naming the target (`FERRY\x01` + IPv4 + port).

pub mod hbone;

use std::{
    io,
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::sockets;

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

/// How the agent reaches a pod on another node.
#[derive(Clone, Default)]
pub enum Tunnel {
    #[default]
    Plain,
    Hbone(std::sync::Arc<hbone::Hbone>),
}

impl Tunnel {
    /// Opens a stream from `src` (the source pod) to `target` on another node,
    /// whose workload must prove `expected` (a SPIFFE id) when mTLS is on.
    pub async fn open(
        &self,
        src: &crate::proxy::PodCtx,
        target: SocketAddrV4,
        expected: &str,
    ) -> io::Result<BoxStream> {
        match self {
            Tunnel::Plain => {
                let to = SocketAddrV4::new(*target.ip(), TUNNEL_PORT);
                let mut s = sockets::connect(Some(&src.netns), sockets::Source::Any, to).await?;
                s.write_all(&encode(target)).await?;
                Ok(Box::new(s))
            }
            Tunnel::Hbone(h) => h.open(src, target, expected).await,
        }
    }

    pub fn is_mtls(&self) -> bool {
        matches!(self, Tunnel::Hbone(_))
    }

    /// Reads the target of an accepted tunnel stream.
    pub async fn accept(&self, s: &mut TcpStream) -> io::Result<SocketAddrV4> {
        let mut b = [0u8; PREFACE_LEN];
        tokio::time::timeout(PREFACE_TIMEOUT, s.read_exact(&mut b))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no tunnel preface within 5s"))??;
        decode(&b).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
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
}
