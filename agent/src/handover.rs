//! Hitless upgrade: a starting agent (the *new* one) takes this node's
//! listening sockets over from the running one (the *old* one) through a
//! unix socket, with `SCM_RIGHTS`, so no listener is ever closed and no
//! connection is refused or reset (docs/architecture.md, "Hitless upgrade").
//!
//! The conversation, one `SOCK_SEQPACKET` message each (text, boundaries
//! kept by the socket; file descriptors ride on the `LISTENERS` messages):
//!
//! ```text
//! new -> old   HELLO 1 <pid>
//! old -> new   LISTENERS <n>\n<kind> <uid|-> <addr>\n...   + n fds   (repeated)
//! old -> new   END <pid>
//! new -> old   TAKEN            (the new agent serves every pod, with certificates)
//! old -> new   STOPPED          (the old agent no longer accepts anywhere)
//! ```
//!
//! From `HELLO` on, the old agent is frozen (applies no config, so no pod
//! is enrolled or unenrolled under the new one's feet) but keeps accepting;
//! during the overlap both processes accept on the same sockets, and a
//! connection is served entirely by whichever accepted it. On `TAKEN` the
//! old one stops accepting for good, tells its tunnel peers to open new
//! connections (HTTP/2 GOAWAY), drains, and exits. If the new agent goes away
//! (or is not ready within [`TAKEOVER_DEADLINE`]) the old one thaws and
//! carries on as if nothing happened.
//!
//! Only a process of the same user may connect (`SO_PEERCRED`), and the
//! socket file is created mode 0600.

use std::{
    collections::HashMap,
    io::{self, IoSlice, IoSliceMut},
    mem::MaybeUninit,
    net::SocketAddr,
    os::{
        fd::{AsFd, BorrowedFd, OwnedFd},
        unix::fs::PermissionsExt,
    },
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};
use tokio::{io::unix::AsyncFd, net::TcpListener, task::AbortHandle};

use crate::{agent::Agent, proxy::Listeners};

/// Version of the conversation above.
pub const PROTOCOL: u32 = 1;
/// How long the old agent stays frozen for a new one that is not ready yet.
pub const TAKEOVER_DEADLINE: Duration = Duration::from_secs(60);
/// How long the new agent waits for the old one's `STOPPED`.
const STOP_DEADLINE: Duration = Duration::from_secs(10);
/// File descriptors per message (the kernel's limit is 253).
const FDS_PER_MESSAGE: usize = 64;
const MAX_MESSAGE: usize = 64 * 1024;

/// What a handed-over listener is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Outbound,
    Inbound,
    Tunnel,
    Admin,
    Metrics,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Outbound => "outbound",
            Kind::Inbound => "inbound",
            Kind::Tunnel => "tunnel",
            Kind::Admin => "admin",
            Kind::Metrics => "metrics",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "outbound" => Kind::Outbound,
            "inbound" => Kind::Inbound,
            "tunnel" => Kind::Tunnel,
            "admin" => Kind::Admin,
            "metrics" => Kind::Metrics,
            _ => return None,
        })
    }

    /// A pod's listeners in [`crate::node::listener_addrs`] order.
    pub const POD: [Kind; 3] = [Kind::Outbound, Kind::Inbound, Kind::Tunnel];
}

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("hand-over socket {path}: {source}")]
    Socket { path: PathBuf, source: io::Error },
    #[error("hand-over: {0}")]
    Io(#[from] io::Error),
    #[error("hand-over protocol: {0}")]
    Protocol(String),
    #[error("the other agent closed the hand-over")]
    Closed,
    #[error("no answer from the other agent within {0:?}")]
    Timeout(Duration),
    #[error("refused a hand-over peer running as uid {peer} (this agent runs as uid {own})")]
    Credentials { peer: u32, own: u32 },
}

/// One end of a hand-over conversation.
struct Conn(AsyncFd<OwnedFd>);

impl Conn {
    fn new(fd: OwnedFd) -> io::Result<Self> {
        Ok(Self(register(fd)?))
    }

    /// Sends one message, with `fds` attached.
    async fn send(&self, text: &str, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        loop {
            let mut ready = self.0.writable().await?;
            let sent = ready.try_io(|fd| {
                let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
                let mut control = SendAncillaryBuffer::new(&mut space);
                if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
                    return Err(io::Error::other("file descriptors do not fit the control buffer"));
                }
                let iov = [IoSlice::new(text.as_bytes())];
                Ok(rustix::net::sendmsg(
                    fd.get_ref(),
                    &iov,
                    &mut control,
                    SendFlags::NOSIGNAL,
                )?)
            });
            if let Ok(r) = sent {
                return r.map(|_| ());
            }
        }
    }

    /// Receives one message and the descriptors that came with it (made
    /// close-on-exec); None when the peer closed.
    async fn recv(&self) -> Result<Option<(String, Vec<OwnedFd>)>, HandoverError> {
        let mut data = vec![0u8; MAX_MESSAGE];
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(FDS_PER_MESSAGE))];
        let (got, fds) = loop {
            let mut ready = self.0.readable().await?;
            let r = ready.try_io(|fd| {
                let mut control = RecvAncillaryBuffer::new(&mut space);
                let mut iov = [IoSliceMut::new(&mut data)];
                let got = rustix::net::recvmsg(fd.get_ref(), &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC)?;
                let mut fds = Vec::new();
                for m in control.drain() {
                    if let RecvAncillaryMessage::ScmRights(r) = m {
                        fds.extend(r);
                    }
                }
                Ok((got, fds))
            });
            if let Ok(r) = r {
                break r?;
            }
        };
        if got.flags.intersects(ReturnFlags::TRUNC | ReturnFlags::CTRUNC) {
            return Err(HandoverError::Protocol("message or descriptors truncated".into()));
        }
        if got.bytes == 0 && fds.is_empty() {
            return Ok(None);
        }
        let text = String::from_utf8(data[..got.bytes].to_vec())
            .map_err(|_| HandoverError::Protocol("message is not UTF-8".into()))?;
        Ok(Some((text, fds)))
    }

    async fn expect(&self, within: Duration) -> Result<(String, Vec<OwnedFd>), HandoverError> {
        match tokio::time::timeout(within, self.recv()).await {
            Ok(Ok(Some(m))) => Ok(m),
            Ok(Ok(None)) => Err(HandoverError::Closed),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(HandoverError::Timeout(within)),
        }
    }

    fn peer_uid(&self) -> io::Result<u32> {
        Ok(rustix::net::sockopt::socket_peercred(self.0.get_ref())?.uid.as_raw())
    }
}

/// Registers a socket with the runtime.
fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an `OwnedFd` is a valid open descriptor that only its owner
    // closes; the `AsyncFd` owns it from here on, so it stays open and
    // `as_raw_fd` returns the same number until the `AsyncFd` is dropped.
    unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)
}

fn seqpacket() -> io::Result<OwnedFd> {
    Ok(rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )?)
}

fn own_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// A listener this agent serves, as offered to a successor: its kind, pod
/// (None: the node's admin or metrics endpoint), address and descriptor.
pub struct Offered<'a> {
    pub kind: Kind,
    pub uid: Option<&'a str>,
    pub addr: SocketAddr,
    pub fd: BorrowedFd<'a>,
}

/// A node-level listener (admin, metrics) the old agent hands over: a
/// duplicate of its descriptor, and the task accepting on it.
pub struct NodeListener {
    pub kind: Kind,
    pub addr: SocketAddr,
    pub fd: OwnedFd,
    pub task: AbortHandle,
}

impl NodeListener {
    pub fn new(kind: Kind, l: &TcpListener, task: AbortHandle) -> io::Result<Self> {
        Ok(Self {
            kind,
            addr: l.local_addr()?,
            fd: l.as_fd().try_clone_to_owned()?,
            task,
        })
    }
}

// ---------------------------------------------------------------- old side

/// The old agent's side: waits for a successor on the hand-over socket.
pub struct Server {
    listener: AsyncFd<OwnedFd>,
    path: PathBuf,
}

impl Server {
    /// Listens on `path` (mode 0600; a stale file left by a crashed agent is
    /// replaced).
    pub fn bind(path: &Path) -> Result<Self, HandoverError> {
        let err = |source| HandoverError::Socket {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(err(e)),
            _ => {}
        }
        let fd = seqpacket().map_err(err)?;
        let addr = SocketAddrUnix::new(path).map_err(|e| err(e.into()))?;
        rustix::net::bind(&fd, &addr).map_err(|e| err(e.into()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
        rustix::net::listen(&fd, 4).map_err(|e| err(e.into()))?;
        Ok(Self {
            listener: register(fd).map_err(err)?,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The next agent that says HELLO (of this user).
    async fn next(&self) -> Result<Successor, HandoverError> {
        let fd = loop {
            let mut ready = self.listener.readable().await?;
            if let Ok(r) = ready.try_io(|l| {
                Ok(rustix::net::accept_with(
                    l.get_ref(),
                    SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
                )?)
            }) {
                break r?;
            }
        };
        let conn = Conn::new(fd)?;
        let (peer, own) = (conn.peer_uid()?, own_uid());
        if peer != own {
            return Err(HandoverError::Credentials { peer, own });
        }
        let (hello, _) = conn.expect(Duration::from_secs(5)).await?;
        let mut it = hello.split_whitespace();
        match (
            it.next(),
            it.next().and_then(|v| v.parse::<u32>().ok()),
            it.next().and_then(|p| p.parse().ok()),
        ) {
            (Some("HELLO"), Some(PROTOCOL), Some(pid)) => Ok(Successor { conn, pid }),
            _ => {
                let _ = conn.send("ERR unsupported hand-over protocol", &[]).await;
                Err(HandoverError::Protocol(format!("unexpected greeting {hello:?}")))
            }
        }
    }
}

struct Successor {
    conn: Conn,
    pid: u32,
}

impl Successor {
    async fn offer(&self, all: &[Offered<'_>]) -> Result<(), HandoverError> {
        for chunk in all.chunks(FDS_PER_MESSAGE) {
            let mut text = format!("LISTENERS {}\n", chunk.len());
            for o in chunk {
                text.push_str(&format!("{} {} {}\n", o.kind.as_str(), o.uid.unwrap_or("-"), o.addr));
            }
            let fds: Vec<BorrowedFd<'_>> = chunk.iter().map(|o| o.fd).collect();
            self.conn.send(&text, &fds).await?;
        }
        self.conn.send(&format!("END {}", std::process::id()), &[]).await?;
        Ok(())
    }
}

/// Serves successors until one takes over; returns its pid once this agent
/// no longer accepts anywhere (the caller then drains and exits).
///
/// For each successor: the reconciler is frozen and `pause(true)` is called
/// (the caller stops its config source); every listener is offered; on
/// `TAKEN` the pods' and `node`'s accept loops stop, the tunnel starts
/// draining, and the reconciler is retired for good. On any failure the
/// reconciler thaws, `pause(false)` is called, and the next successor is
/// waited for.
pub async fn serve(
    server: Server,
    agent: Arc<Agent>,
    node: Vec<NodeListener>,
    pause: impl Fn(bool) + Send + Sync,
) -> u32 {
    loop {
        let next = match server.next().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "hand-over attempt refused");
                continue;
            }
        };
        let pid = next.pid;
        tracing::info!(
            successor_pid = pid,
            "a new agent asks to take over: config frozen, offering listeners"
        );
        let frozen = agent.reconciler.freeze().await;
        pause(true);
        let attempt = async {
            let pods = frozen.listeners();
            let mut all: Vec<Offered<'_>> = pods
                .iter()
                .flat_map(|p| {
                    (0..3).map(move |i| Offered {
                        kind: Kind::POD[i],
                        uid: Some(p.uid.as_str()),
                        addr: SocketAddr::V4(p.addrs[i]),
                        fd: p.fds[i],
                    })
                })
                .collect();
            all.extend(node.iter().map(|n| Offered {
                kind: n.kind,
                uid: None,
                addr: n.addr,
                fd: n.fd.as_fd(),
            }));
            next.offer(&all).await?;
            tracing::info!(
                successor_pid = pid,
                listeners = all.len(),
                "listeners handed over; still accepting until the new agent is ready"
            );
            let (msg, _) = next.conn.expect(TAKEOVER_DEADLINE).await?;
            if msg.trim() != "TAKEN" {
                return Err(HandoverError::Protocol(format!("expected TAKEN, got {msg:?}")));
            }
            Ok::<_, HandoverError>(())
        }
        .await;
        match attempt {
            Ok(()) => {
                frozen.retire();
                node.iter().for_each(|n| n.task.abort());
                agent.proxy.tunnel.drain();
                if let Err(e) = next.conn.send("STOPPED", &[]).await {
                    tracing::warn!(error = %e, "cannot tell the new agent that this one stopped (it will notice)");
                }
                tracing::info!(successor_pid = pid, "taken over: no longer accepting; draining");
                return pid;
            }
            Err(e) => {
                drop(frozen);
                pause(false);
                tracing::warn!(successor_pid = pid, error = %e, "hand-over abandoned; this agent carries on");
            }
        }
    }
}

// ---------------------------------------------------------------- new side

/// What the new agent received, until it commits.
pub struct Inherited {
    /// Per pod uid, its three listeners.
    pub pods: HashMap<String, Listeners>,
    pub admin: Option<TcpListener>,
    pub metrics: Option<TcpListener>,
    /// The old agent's pid.
    pub from_pid: u32,
    conn: Conn,
}

/// Connects to the old agent at `path` and receives its listeners. Ok(None)
/// when no agent listens there (a first start: bind as usual).
pub async fn take_over(path: &Path) -> Result<Option<Inherited>, HandoverError> {
    let err = |source| HandoverError::Socket {
        path: path.to_owned(),
        source,
    };
    let fd = seqpacket().map_err(err)?;
    let addr = SocketAddrUnix::new(path).map_err(|e| err(e.into()))?;
    match rustix::net::connect(&fd, &addr) {
        Ok(()) => {}
        Err(e) if e == rustix::io::Errno::NOENT || e == rustix::io::Errno::CONNREFUSED => return Ok(None),
        // A non-blocking unix connect completes at once or fails; EAGAIN
        // means the old agent's backlog is full.
        Err(e) => return Err(err(e.into())),
    }
    let conn = Conn::new(fd)?;
    let (peer, own) = (conn.peer_uid()?, own_uid());
    if peer != own {
        return Err(HandoverError::Credentials { peer, own });
    }
    conn.send(&format!("HELLO {PROTOCOL} {}", std::process::id()), &[])
        .await?;
    let mut by_pod: HashMap<String, [Option<TcpListener>; 3]> = HashMap::new();
    let (mut admin, mut metrics) = (None, None);
    let from_pid = loop {
        let (msg, fds) = conn.expect(Duration::from_secs(10)).await?;
        let mut lines = msg.lines();
        let head = lines.next().unwrap_or_default();
        if let Some(pid) = head.strip_prefix("END ") {
            break pid
                .trim()
                .parse()
                .map_err(|_| HandoverError::Protocol(format!("bad END {head:?}")))?;
        }
        let n: usize = head
            .strip_prefix("LISTENERS ")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| HandoverError::Protocol(format!("unexpected message {head:?}")))?;
        if fds.len() != n {
            return Err(HandoverError::Protocol(format!(
                "{n} listeners announced, {} received",
                fds.len()
            )));
        }
        for (line, fd) in lines.zip(fds) {
            let mut it = line.split_whitespace();
            let (Some(kind), Some(uid), Some(_addr)) = (it.next().and_then(Kind::parse), it.next(), it.next()) else {
                return Err(HandoverError::Protocol(format!("bad listener line {line:?}")));
            };
            let l = std::net::TcpListener::from(fd);
            l.set_nonblocking(true)?;
            let l = TcpListener::from_std(l)?;
            match kind {
                Kind::Admin => admin = Some(l),
                Kind::Metrics => metrics = Some(l),
                k => {
                    let i = Kind::POD.iter().position(|p| *p == k).expect("a pod kind");
                    by_pod.entry(uid.to_owned()).or_default()[i] = Some(l);
                }
            }
        }
    };
    let pods = by_pod
        .into_iter()
        .filter_map(|(uid, [o, i, t])| {
            Some((
                uid,
                Listeners {
                    outbound: o?,
                    inbound: i?,
                    tunnel: t?,
                },
            ))
        })
        .collect();
    Ok(Some(Inherited {
        pods,
        admin,
        metrics,
        from_pid,
        conn,
    }))
}

impl Inherited {
    /// Tells the old agent to stop accepting and waits until it has.
    pub async fn commit(self) -> Result<u32, HandoverError> {
        self.conn.send("TAKEN", &[]).await?;
        let (msg, _) = self.conn.expect(STOP_DEADLINE).await?;
        if msg.trim() != "STOPPED" {
            return Err(HandoverError::Protocol(format!("expected STOPPED, got {msg:?}")));
        }
        Ok(self.from_pid)
    }
}

/// Whether the agent can serve on its own: a config applied, every local pod
/// it wants enrolled without error, and (with a CA) a certificate for each.
/// The new agent waits for this before it commits.
pub fn ready(agent: &Agent) -> Result<(), String> {
    if agent.reconciler.applied_version() == 0 {
        return Err("no config applied yet".into());
    }
    for p in agent.reconciler.pod_status() {
        if let Some(e) = &p.error {
            return Err(format!("pod {}/{} not enrolled: {e}", p.namespace, p.name));
        }
        if let (true, Some(ids)) = (p.enrolled, &agent.ids) {
            if ids.get(&p.uid).is_none() {
                return Err(format!("pod {}/{} has no certificate yet", p.namespace, p.name));
            }
        }
    }
    Ok(())
}
