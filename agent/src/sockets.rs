//! The one place sockets are made: in a pod's netns or the agent's own, always
//! carrying the agent's mark (a second guard against capturing the agent, after
//! the cgroup scoping of the programs).

use std::{
    io,
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

fn in_ns<T>(ns: Option<&Netns>, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    match ns {
        Some(ns) => ns.run(f)?,
        None => f(),
    }
}

/// A listener in `ns` (or the agent's netns), non-blocking, marked.
pub fn listen(ns: Option<&Netns>, addr: SocketAddrV4) -> io::Result<TcpListener> {
    let sock = in_ns(ns, || Socket::new(Domain::IPV4, Type::STREAM, None))?;
    sock.set_reuse_address(true)?;
    sock.set_mark(AGENT_MARK)?;
    sock.set_nonblocking(true)?;
    sock.bind(&SocketAddr::V4(addr).into())?;
    sock.listen(1024)?;
    TcpListener::from_std(sock.into())
}

/// How an outgoing socket is made.
#[derive(Clone, Copy, Debug)]
pub enum Source {
    /// Whatever address the netns routes from (the pod's own IP in a pod).
    Any,
    /// Transparent: the client's address, for delivering to an app while
    /// keeping the client's IP. Uses the delivery mark and port range.
    Transparent(Ipv4Addr),
}

/// Connects from inside `ns` to `dst`.
pub async fn connect(ns: Option<&Netns>, src: Source, dst: SocketAddrV4) -> io::Result<TcpStream> {
    let sock = in_ns(ns, || Socket::new(Domain::IPV4, Type::STREAM, None))?;
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
    let std: std::net::TcpStream = sock.into();
    TcpSocket::from_std_stream(std).connect(SocketAddr::V4(dst)).await
}

/// Binds to `ip` on a port of the delivery range, chosen here: the kernel's
/// own choice (even with IP_LOCAL_PORT_RANGE) is confined to the netns'
/// ephemeral range, which the delivery range lies outside of on purpose.
fn bind_delivery_port(sock: &Socket, ip: Ipv4Addr) -> io::Result<()> {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let (lo, hi) = DELIVER_PORTS;
    let span = hi - lo + 1;
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

/// Both addresses of an accepted IPv4 TCP stream.
pub fn v4_addrs(s: &TcpStream) -> io::Result<(SocketAddrV4, SocketAddrV4)> {
    match (s.local_addr()?, s.peer_addr()?) {
        (SocketAddr::V4(l), SocketAddr::V4(p)) => Ok((l, p)),
        (l, p) => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("not IPv4: {l} <- {p}"),
        )),
    }
}
