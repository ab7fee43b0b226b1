//! The one place sockets are made, behind one seam: a [`SocketFactory`] per
//! pod. The real one ([`InPodSockets`]) creates every socket inside the pod's
//! netns and marks it as the agent's (a second guard against capturing the
//! agent, after the cgroup scoping of the programs); [`HostSockets`] makes
//! plain sockets in the agent's own netns, which is what in-process tests run
//! the real proxy over (loopback, no privileges).

use std::{
    fmt, io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::AsRawFd,
};

use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::netns::Netns;

/// Mark bits on every agent socket. connect4/6 skip sockets carrying them.
pub const AGENT_MARK: u32 = 0x0400;
/// Mark of delivery sockets (agent -> app, transparent source). The hook on
/// the agent's cgroup records the 4-tuple of every connect by a socket with
/// exactly this mark in `ferry_delivery`, which is how `sk_lookup` tells a
/// delivery from a client (docs/architecture.md, "Delivery keeps the
/// client's address"). A policy routing rule in each enrolled pod routes
/// replies to this mark locally.
pub const DELIVER_MARK: u32 = 0x0600;
/// Routing table holding `local 0.0.0.0/0 dev lo` in each enrolled pod.
pub const DELIVER_TABLE: u32 = 0x4645;
/// The delivery source ports of agents before `ferry_delivery`. Nothing binds
/// them any more; the agent still writes them into `ferry_config` for an
/// older agent's programs during an upgrade (ferry.h).
pub const LEGACY_DELIVER_PORTS: (u16, u16) = (15100, 15999);

/// How an outgoing socket is made.
#[derive(Clone, Copy, Debug)]
pub enum Source {
    /// Whatever address the netns routes from (the pod's own IP in a pod).
    Any,
    /// The client's address, for delivering to an app while keeping the
    /// client's IP: bound to that address with no port, so `connect` picks
    /// a port unique for the 4-tuple (the netns' ephemeral range per
    /// destination, not per client address).
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
/// A transparent source's port is chosen by the kernel at connect, unique
/// for the whole 4-tuple (also against another agent's deliveries during a
/// hand-over), so there is nothing to retry: `EADDRNOTAVAIL` means the
/// netns' ephemeral range is exhausted for this client address and `dst`.
pub async fn connect(f: &dyn SocketFactory, src: Source, dst: SocketAddrV4) -> io::Result<TcpStream> {
    f.socket(src)?.connect(SocketAddr::V4(dst)).await
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
                bind_no_port(&sock, ip)?;
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
            bind_no_port(&sock, ip)?;
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

/// Binds to `ip` with `IP_BIND_ADDRESS_NO_PORT`: the port is chosen at
/// `connect`, by the kernel, unique for the 4-tuple (client, pod, pod port),
/// so one client address can hold as many deliveries to one app port as the
/// netns' ephemeral range has ports, and to every other destination as many
/// again. (Binding port 0 without the option would reserve a port for the
/// address alone, the old per-client cap again.) Which port it is does not
/// matter: the hook on the agent's cgroup records the tuple at connect.
fn bind_no_port(sock: &Socket, ip: Ipv4Addr) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt(2) on an open socket, with a valid int option value
    // that outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    sock.bind(&SocketAddr::V4(SocketAddrV4::new(ip, 0)).into())
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
