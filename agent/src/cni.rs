//! The agent's end of ferry-cni (`--cni-socket`): a unix socket where the
//! plugin, run by the container runtime for each new pod sandbox, asks that
//! the pod be captured and waits for the answer (`ferry_model::cni`, one
//! JSON line each way; docs/cni.md).
//!
//! Contract: an ADD is answered `captured` once the pod's steering is on,
//! `notInMesh` once the agent's config says the pod is not enrolled, and
//! `failed` with the reason when neither happened within the wait the
//! plugin allowed (capped at [`MAX_WAIT_MS`]); meanwhile the pod may not even
//! be in the config yet (the control plane learns of it shortly), and a
//! failed enrollment is retried. A pod the config has without an address
//! (the API server has none before the sandbox is up) is captured at the
//! address the ADD carries: the reconciler learns it ([`Captures`]). DEL and CHECK answer at once; STATUS says
//! `ready`. An agent that has handed over to a new one closes without
//! answering, so the plugin asks again and reaches the new one.
//!
//! The socket is mode 0600 and only a peer of uid 0 or the agent's own uid
//! (`SO_PEERCRED`) is answered. A request is one line of at most
//! [`MAX_MESSAGE`] bytes, read within [`READ_TIMEOUT`]; at most
//! [`MAX_CONNECTIONS`] are served at once.

use std::{
    io,
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use ferry_model::cni::{Op, PodInfo, Reply, Request, MAX_MESSAGE, MAX_WAIT_MS, PROTOCOL_VERSION};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::Semaphore,
    time::Instant,
};

use crate::reconcile::{Capture, Captures};

/// How long a client has to send its request line.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests served at once; more wait in the socket's backlog.
pub const MAX_CONNECTIONS: usize = 256;
/// How often a waiting ADD looks again even without a change notice.
const POLL: Duration = Duration::from_millis(250);

pub struct Server {
    listener: UnixListener,
    path: PathBuf,
}

impl Server {
    /// Listens on `path` (mode 0600). A stale socket left by an earlier
    /// agent is replaced; any other file there is an error.
    pub fn bind(path: &Path) -> io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        Ok(Self {
            listener,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves requests until the task is dropped.
    pub async fn serve(self, captures: Arc<dyn Captures>) {
        let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let Ok(permit) = limit.clone().acquire_owned().await else {
                return;
            };
            let stream = match self.listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, socket = %self.path.display(), "CNI socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let captures = captures.clone();
            tokio::spawn(async move {
                if let Err(e) = handle(stream, &*captures).await {
                    tracing::debug!(error = %e, "CNI request not served");
                }
                drop(permit);
            });
        }
    }
}

fn own_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

async fn handle(mut stream: UnixStream, captures: &dyn Captures) -> io::Result<()> {
    let peer = stream.peer_cred()?.uid();
    if peer != 0 && peer != own_uid() {
        tracing::warn!(
            peer_uid = peer,
            "CNI request from a user other than root or the agent's: refused"
        );
        return Ok(());
    }
    let line = {
        let mut r = BufReader::new((&mut stream).take(MAX_MESSAGE as u64));
        let mut line = Vec::new();
        tokio::time::timeout(READ_TIMEOUT, r.read_until(b'\n', &mut line))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no request line in time"))??;
        line
    };
    let reply = match serde_json::from_slice::<Request>(&line) {
        Ok(req) => answer(captures, req).await,
        Err(e) => Some(Reply::Failed {
            reason: format!("unreadable request: {e}"),
        }),
    };
    let Some(reply) = reply else {
        return Ok(());
    };
    let mut out = serde_json::to_vec(&reply).map_err(io::Error::other)?;
    out.push(b'\n');
    tokio::time::timeout(READ_TIMEOUT, stream.write_all(&out))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "reply not taken in time"))?
}

/// The answer to one request; None: close without answering (this agent
/// has handed over, the plugin asks the new one).
pub async fn answer(c: &dyn Captures, req: Request) -> Option<Reply> {
    if req.version != PROTOCOL_VERSION {
        return Some(Reply::Failed {
            reason: format!(
                "ferry-cni protocol version {} is not supported by this agent (it speaks {PROTOCOL_VERSION})",
                req.version
            ),
        });
    }
    if c.retired() {
        return None;
    }
    let pod = req.pod;
    if req.op != Op::Status && pod.uid.is_empty() && (pod.namespace.is_empty() || pod.name.is_empty()) {
        return Some(Reply::Failed {
            reason: "the request names no pod (uid, or namespace and name)".into(),
        });
    }
    match req.op {
        Op::Status => Some(Reply::Ready),
        Op::Del => {
            // Best effort, bounded: an agent busy for longer (a long
            // reconcile holds the node) leaves the pod to its config.
            if tokio::time::timeout(READ_TIMEOUT, c.sandbox_deleted(&pod))
                .await
                .is_err()
            {
                tracing::warn!(pod = %pod.label(), "CNI DEL not applied within 5 s: the pod's config will unenroll it");
            }
            Some(Reply::Deleted)
        }
        Op::Check => Some(match c.capture(&pod) {
            Capture::Captured { pod_id } => Reply::Captured { pod_id },
            Capture::NotInMesh(reason) => Reply::NotInMesh { reason },
            Capture::Pending(reason) | Capture::Failing(reason) => Reply::Failed { reason },
        }),
        Op::Add => add(c, pod, Duration::from_millis(req.timeout_ms.min(MAX_WAIT_MS))).await,
    }
}

/// ADD: waits until the pod is captured or known not to be, or `wait` passes.
async fn add(c: &dyn Captures, pod: PodInfo, wait: Duration) -> Option<Reply> {
    let started = Instant::now();
    let deadline = started + wait;
    let mut changes = c.changes();
    // Remembered at once; enrolling it now may wait for a reconcile in
    // progress, within the deadline (the backoff loop picks it up otherwise).
    let _ = tokio::time::timeout_at(deadline, c.sandbox_added(&pod)).await;
    let last = loop {
        if c.retired() {
            return None;
        }
        let why = match c.capture(&pod) {
            Capture::Captured { pod_id } => {
                tracing::info!(
                    pod = %pod.label(),
                    pod_id,
                    waited_ms = started.elapsed().as_millis() as u64,
                    "pod captured: its sandbox may start (CNI ADD)"
                );
                return Some(Reply::Captured { pod_id });
            }
            Capture::NotInMesh(reason) => return Some(Reply::NotInMesh { reason }),
            Capture::Pending(why) | Capture::Failing(why) => why,
        };
        if Instant::now() >= deadline {
            break why;
        }
        tokio::select! {
            r = changes.changed() => {
                if r.is_err() {
                    // No more change notices: poll.
                    tokio::time::sleep(POLL.min(deadline.saturating_duration_since(Instant::now()))).await;
                }
            }
            _ = tokio::time::sleep(POLL) => {}
            _ = tokio::time::sleep_until(deadline) => {}
        }
    };
    let reason = format!("not captured within {} ms: {last}", wait.as_millis());
    tracing::warn!(pod = %pod.label(), %reason, "CNI ADD refused: the sandbox must not start uncaptured");
    Some(Reply::Failed { reason })
}

#[cfg(test)]
mod tests {
    use std::sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    };

    use futures::future::BoxFuture;
    use tokio::sync::watch;

    use super::*;

    /// A pod's capture as a script: what `capture` says after each change.
    struct Fake {
        now: Mutex<Capture>,
        changed: watch::Sender<u64>,
        added: Mutex<Vec<PodInfo>>,
        deleted: Mutex<Vec<PodInfo>>,
        retired: AtomicBool,
    }

    impl Fake {
        fn new(c: Capture) -> Arc<Self> {
            Arc::new(Self {
                now: Mutex::new(c),
                changed: watch::channel(0).0,
                added: Mutex::default(),
                deleted: Mutex::default(),
                retired: AtomicBool::new(false),
            })
        }

        fn set(&self, c: Capture) {
            *self.now.lock().unwrap() = c;
            self.changed.send_modify(|v| *v += 1);
        }
    }

    impl Captures for Fake {
        fn capture(&self, _: &PodInfo) -> Capture {
            self.now.lock().unwrap().clone()
        }
        fn sandbox_added<'a>(&'a self, pod: &'a PodInfo) -> BoxFuture<'a, ()> {
            self.added.lock().unwrap().push(pod.clone());
            Box::pin(async {})
        }
        fn sandbox_deleted<'a>(&'a self, pod: &'a PodInfo) -> BoxFuture<'a, ()> {
            self.deleted.lock().unwrap().push(pod.clone());
            Box::pin(async {})
        }
        fn changes(&self) -> watch::Receiver<u64> {
            self.changed.subscribe()
        }
        fn retired(&self) -> bool {
            self.retired.load(Ordering::Relaxed)
        }
    }

    fn req(op: Op, timeout_ms: u64) -> Request {
        Request {
            version: PROTOCOL_VERSION,
            op,
            pod: PodInfo {
                uid: "u1".into(),
                namespace: "default".into(),
                name: "web".into(),
                ..Default::default()
            },
            timeout_ms,
        }
    }

    #[tokio::test]
    async fn add_waits_until_the_pod_is_captured() {
        let f = Fake::new(Capture::Pending("unknown pod".into()));
        let later = f.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            later.set(Capture::Failing("no process in cgroup".into()));
            tokio::time::sleep(Duration::from_millis(100)).await;
            later.set(Capture::Captured { pod_id: 9 });
        });
        let started = Instant::now();
        let r = answer(&*f, req(Op::Add, 5_000)).await;
        assert_eq!(r, Some(Reply::Captured { pod_id: 9 }));
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(200) && took < Duration::from_secs(2),
            "{took:?}"
        );
        assert_eq!(f.added.lock().unwrap()[0].uid, "u1");
    }

    #[tokio::test]
    async fn add_fails_with_the_last_reason_at_the_deadline() {
        let f = Fake::new(Capture::Failing("port 15001 is already in use".into()));
        let started = Instant::now();
        let r = answer(&*f, req(Op::Add, 300)).await;
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(2),
            "{took:?}"
        );
        assert_eq!(
            r,
            Some(Reply::Failed {
                reason: "not captured within 300 ms: port 15001 is already in use".into()
            })
        );
        // The wait is capped, whatever the plugin asks.
        let f = Fake::new(Capture::NotInMesh("not enrolled".into()));
        let r = answer(&*f, req(Op::Add, u64::MAX)).await;
        assert_eq!(
            r,
            Some(Reply::NotInMesh {
                reason: "not enrolled".into()
            })
        );
    }

    #[tokio::test]
    async fn other_ops_answer_at_once() {
        let f = Fake::new(Capture::Pending("being enrolled".into()));
        assert_eq!(answer(&*f, req(Op::Status, 0)).await, Some(Reply::Ready));
        assert_eq!(
            answer(&*f, req(Op::Check, 0)).await,
            Some(Reply::Failed {
                reason: "being enrolled".into()
            })
        );
        f.set(Capture::Captured { pod_id: 1 });
        assert_eq!(
            answer(&*f, req(Op::Check, 0)).await,
            Some(Reply::Captured { pod_id: 1 })
        );
        assert_eq!(answer(&*f, req(Op::Del, 0)).await, Some(Reply::Deleted));
        assert_eq!(answer(&*f, req(Op::Del, 0)).await, Some(Reply::Deleted));
        assert_eq!(f.deleted.lock().unwrap().len(), 2);
        let mut bad = req(Op::Add, 0);
        bad.version = 2;
        assert!(matches!(answer(&*f, bad).await, Some(Reply::Failed { reason }) if reason.contains("version 2")));
        let mut anonymous = req(Op::Add, 0);
        anonymous.pod = PodInfo::default();
        assert!(matches!(answer(&*f, anonymous).await, Some(Reply::Failed { .. })));
        // Handed over: no answer, the plugin asks the new agent.
        f.retired.store(true, Ordering::Relaxed);
        assert_eq!(answer(&*f, req(Op::Add, 1_000)).await, None);
    }

    #[tokio::test]
    async fn the_socket_serves_one_line_each_way_and_survives_garbage() {
        let dir = std::env::temp_dir().join(format!("ferry-agent-cni-{}", std::process::id()));
        let path = dir.join("cni.sock");
        let f = Fake::new(Capture::Captured { pod_id: 3 });
        let server = Server::bind(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let task = tokio::spawn(server.serve(f.clone()));
        let ask = |line: Vec<u8>| {
            let path = path.clone();
            async move {
                let mut s = UnixStream::connect(&path).await.unwrap();
                s.write_all(&line).await.unwrap();
                // Read what comes until EOF or an error (a reset, when the
                // server closed with part of our line unread).
                let mut out = Vec::new();
                let mut chunk = [0u8; 1024];
                while let Ok(n @ 1..) = s.read(&mut chunk).await {
                    out.extend_from_slice(&chunk[..n]);
                }
                String::from_utf8_lossy(&out).into_owned()
            }
        };
        let mut line = serde_json::to_vec(&req(Op::Add, 1_000)).unwrap();
        line.push(b'\n');
        assert_eq!(ask(line).await, "{\"result\":\"captured\",\"podId\":3}\n");
        let out = ask(b"{not json\n".to_vec()).await;
        assert!(out.starts_with("{\"result\":\"failed\""), "{out}");
        // Longer than a message may be: refused, not buffered.
        let out = ask(vec![b'x'; MAX_MESSAGE + 10]).await;
        assert!(out.starts_with("{\"result\":\"failed\""), "{out}");
        // A second bind replaces the (stale) socket; a non-socket is kept.
        task.abort();
        drop(Server::bind(&path).unwrap());
        let file = dir.join("not-a-socket");
        std::fs::write(&file, "x").unwrap();
        assert!(Server::bind(&file).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
