//! The one place sockets are made: in a pod's netns or the agent's own, always
//! carrying the agent's mark (a second guard against capturing the agent, after
//! the cgroup scoping of the programs).

use std::{
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::AsRawFd,
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
            set_int(&sock, libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, 1)?;
            let (lo, hi) = DELIVER_PORTS;
            set_int(&sock, libc::IPPROTO_IP, IP_LOCAL_PORT_RANGE, (u32::from(hi) << 16 | u32::from(lo)) as i32)?;
            sock.bind(&SocketAddr::V4(SocketAddrV4::new(ip, 0)).into())?;
        }
    }
    let std: std::net::TcpStream = sock.into();
    TcpSocket::from_std_stream(std).connect(SocketAddr::V4(dst)).await
}

const IP_LOCAL_PORT_RANGE: libc::c_int = 51;

fn set_int(sock: &Socket, level: libc::c_int, opt: libc::c_int, val: libc::c_int) -> io::Result<()> {
    // SAFETY: setsockopt reads exactly size_of::<c_int>() bytes from `val`.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            opt,
            (&val as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Both addresses of an accepted IPv4 TCP stream.
pub fn v4_addrs(s: &TcpStream) -> io::Result<(SocketAddrV4, SocketAddrV4)> {
    match (s.local_addr()?, s.peer_addr()?) {
        (SocketAddr::V4(l), SocketAddr::V4(p)) => Ok((l, p)),
        (l, p) => Err(io::Error::new(io::ErrorKind::Unsupported, format!("not IPv4: {l} <- {p}"))),
    }
}
