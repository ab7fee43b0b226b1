//! The one place sockets are made, behind one seam: a [`SocketFactory`] per
//! pod. The real one ([`InPodSockets`]) creates every socket inside the pod's
//! netns and marks it as the agent's (a second guard against capturing the
//! agent, after the cgroup scoping of the programs); [`HostSockets`] makes
//! plain sockets in the agent's own netns, which is what in-process tests run
//! the real proxy over (loopback, no privileges).

use std::{
    fmt, io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::atomic::{AtomicU16, Ordering},
};

use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::netns::Netns;

/// Mark bits on every agent socket. connect4/6 skip sockets carrying them.
pub const AGENT_MARK: u32 = 0x0400;
/// Mark of delivery sockets (agent -> app, transparent source). A policy
/// routing rule in each enrolled pod routes replies to this mark locally.
pub const DELIVER_MARK: u32 = 0x0600;
/// Routing table holding `local 0.0.0.0/0 dev lo` in each enrolled pod.
pub const DELIVER_TABLE: u32 = 0x4645;
/// Source ports of delivery sockets; sk_lookup never captures them.
pub const DELIVER_PORTS: (u16, u16) = (15100, 15999);

/// How an outgoing socket is made.
#[derive(Clone, Copy, Debug)]
pub enum Source {
    /// Whatever address the netns routes from (the pod's own IP in a pod).
    Any,
    /// The client's address, for delivering to an app while keeping the
    /// client's IP: a port of [`DELIVER_PORTS`] on that address.
    Transparent(Ipv4Addr),
}

/// Makes the sockets of one pod: its listeners, and the connections the
/// agent opens on its behalf.
pub trait SocketFactory: Send + Sync + fmt::Debug {
    /// A non-blocking listener on `addr`.
    fn listen(&self, addr: SocketAddrV4) -> io::Result<TcpListener>;
    /// An unconnected socket for a connection from `src`.
    fn socket(&self, src: Source) -> io::Result<TcpSocket>;
}

/// Connects a socket from `f` to `dst`.
///
/// A transparent source picks its port itself, and binding a port that a
/// live connection of another socket holds succeeds (SO_REUSEADDR) while
/// the connect then fails with `EADDRNOTAVAIL` when the 4-tuple is taken:
/// that happens when two agents deliver at once (a hand-over, where the old
/// agent's connections keep their ports). Such a connect is retried on the
/// next ports; nothing was sent, so a retry is safe.
pub async fn connect(f: &dyn SocketFactory, src: Source, dst: SocketAddrV4) -> io::Result<TcpStream> {
    let tries = match src {
        Source::Any => 1,
        Source::Transparent(_) => 16,
    };
    let mut last = None;
    for _ in 0..tries {
        match f.socket(src)?.connect(SocketAddr::V4(dst)).await {
            Err(e) if e.kind() == io::ErrorKind::AddrNotAvailable => last = Some(e),
            r => return r,
        }
    }
    Err(last.unwrap_or_else(|| io::Error::from(io::ErrorKind::AddrNotAvailable)))
}

/// Sockets inside a pod's network namespace, marked as the agent's.
#[derive(Debug)]
pub struct InPodSockets {
    pub netns: Netns,
}

impl SocketFactory for InPodSockets {
    fn listen(&self, addr: SocketAddrV4) -> io::Result<TcpListener> {
        let sock = self.netns.run(|| Socket::new(Domain::IPV4, Type::STREAM, None))??;
        sock.set_mark(AGENT_MARK)?;
        listen_on(sock, addr)
    }

    fn socket(&self, src: Source) -> io::Result<TcpSocket> {
        let sock = self.netns.run(|| Socket::new(Domain::IPV4, Type::STREAM, None))??;
        sock.set_nonblocking(true)?;
        sock.set_tcp_nodelay(true)?;
        match src {
            Source::Any => sock.set_mark(AGENT_MARK)?,
            Source::Transparent(ip) => {
                sock.set_mark(DELIVER_MARK)?;
                sock.set_ip_transparent_v4(true)?;
                // Delivery sockets close first, so their ports sit in TIME_WAIT;
                // SO_REUSEADDR lets a port be bound again meanwhile (the kernel
                // still refuses a 4-tuple that is not safely reusable).
                sock.set_reuse_address(true)?;
                bind_delivery_port(&sock, ip)?;
            }
        }
        Ok(TcpSocket::from_std_stream(sock.into()))
    }
}

/// Plain sockets in the agent's own netns, no marks. A transparent source
/// must be a local address (any of 127.0.0.0/8 on loopback is): tests give
/// each pod its own loopback address.
#[derive(Debug, Default)]
pub struct HostSockets;

impl SocketFactory for HostSockets {
    fn listen(&self, addr: SocketAddrV4) -> io::Result<TcpListener> {
        listen_on(Socket::new(Domain::IPV4, Type::STREAM, None)?, addr)
    }

    fn socket(&self, src: Source) -> io::Result<TcpSocket> {
        let sock = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        sock.set_nonblocking(true)?;
        sock.set_tcp_nodelay(true)?;
        if let Source::Transparent(ip) = src {
            sock.set_reuse_address(true)?;
            bind_delivery_port(&sock, ip)?;
        }
        Ok(TcpSocket::from_std_stream(sock.into()))
    }
}

fn listen_on(sock: Socket, addr: SocketAddrV4) -> io::Result<TcpListener> {
    sock.set_reuse_address(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&SocketAddr::V4(addr).into())?;
    sock.listen(1024)?;
    TcpListener::from_std(sock.into())
}

/// Binds to `ip` on a port of the delivery range, chosen here: the kernel's
/// own choice (even with IP_LOCAL_PORT_RANGE) is confined to the netns'
/// ephemeral range, which the delivery range lies outside of on purpose.
fn bind_delivery_port(sock: &Socket, ip: Ipv4Addr) -> io::Result<()> {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    static START: std::sync::Once = std::sync::Once::new();
    let (lo, hi) = DELIVER_PORTS;
    let span = hi - lo + 1;
    // Each process starts at its own place in the range, so an agent taking
    // over rarely meets the ports its predecessor's connections still hold.
    START.call_once(|| NEXT.store(rand::random::<u16>() % span, Ordering::Relaxed));
    for _ in 0..span {
        let port = lo + NEXT.fetch_add(1, Ordering::Relaxed) % span;
        match sock.bind(&SocketAddr::V4(SocketAddrV4::new(ip, port)).into()) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        format!("all {span} delivery ports in use for client {ip}"),
    ))
}

/// A listener's IPv4 address (None: unknown or IPv6).
pub fn local_v4(l: &TcpListener) -> Option<SocketAddrV4> {
    match l.local_addr().ok()? {
        SocketAddr::V4(a) => Some(a),
        SocketAddr::V6(_) => None,
    }
}

/// Both addresses (local, peer) of an accepted IPv4 TCP stream.
pub fn v4_addrs(s: &TcpStream) -> io::Result<(SocketAddrV4, SocketAddrV4)> {
    match (s.local_addr()?, s.peer_addr()?) {
        (SocketAddr::V4(l), SocketAddr::V4(p)) => Ok((l, p)),
        (l, p) => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("not IPv4: {l} <- {p}"),
        )),
    }
}
