//! The reconciler: makes the node match a desired state. Whoever produces
//! desired state (the control plane's stream, the config file) hands it to
//! [`Apply::apply`] and nothing else; the reconciler enrolls and unenrolls
//! local pods (listeners through the pod's socket factory, then steering),
//! swaps the proxy's state snapshot, refreshes the mesh destinations and
//! publishes each pod's status and the applied version.
//!
//! A pod whose enrollment fails is retried with exponential backoff
//! ([`retry_delay`], [`Reconciler::retry_loop`]) without waiting for a config
//! change. The container runtime's view of a pod (its sandbox, announced by
//! ferry-cni to the agent's `cni` socket) is node-local fact the config does not carry:
//! the sandbox's netns is used for the pod, a new sandbox re-enrolls it, a
//! deleted one unenrolls it at once; [`Captures`] is what the CNI server
//! asks and waits on.
//!
//! A pod the config has as pending (scheduled, no address in the API server
//! yet: the kubelet reports it only after the sandbox is up) takes its
//! address from its sandbox's ADD (`prevResult.ips`): the reconciler keeps
//! these learned addresses (uid -> IPv4) and applies them where it turns a
//! config into its [`State`] ([`ferry_model::pending::overlay`]), so the pod
//! is a workload like any other and is enrolled; when the learned addresses
//! change it applies the last config again. The control plane's word wins:
//! once the config names the pod with an address, the learned one is
//! dropped; it is dropped too on the sandbox's DEL and when the pod leaves
//! the config. With a file to keep them in ([`Reconciler::keep_learned_in`],
//! beside the agent's `--state-file`), the learned addresses outlive the
//! agent: a restarted or successor agent applies them to its first config,
//! so a pod captured before the kubelet reported its address stays captured.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, RwLock,
    },
    time::Duration,
};

use ferry_model::{
    admin::PodStatus,
    admission::{self, Fallback},
    cni::PodInfo,
    pending::{self, Fate, RuntimeAddress},
    state::State,
    ConfigFile, PendingPod, Workload,
};
use futures::future::BoxFuture;
use tokio::{sync::watch, task::AbortHandle, time::Instant};

use crate::{
    identity::Identities,
    node::{listener_addrs, Capacity, EnrollError, Node, Plumbed},
    proxy::{Listeners, PodCtx, Proxy},
};

/// Takes a desired state and makes it so; returns the version applied.
pub trait Apply: Send + Sync {
    /// Applies `cfg`; a refused one is logged and the previous state stays
    /// (the version returned is then the previous one).
    fn apply(&self, cfg: ConfigFile) -> BoxFuture<'_, u64>;
    /// Applies `cfg`, or refuses it whole, changing nothing, and says why
    /// (the config stream NACKs with that reason).
    fn try_apply(&self, cfg: ConfigFile) -> BoxFuture<'_, Result<u64, Refused>> {
        Box::pin(async move { Ok(self.apply(cfg).await) })
    }
}

/// A desired state refused whole: nothing of it was applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// More than the node's eBPF maps hold; every overflow is listed.
    #[error("desired state does not fit the node's eBPF maps, nothing applied: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Capacity(Vec<Overflow>),
}

/// One map (or set of per-pod maps) a desired state overflows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Overflow {
    #[error("{wanted} mesh destinations (service VIP:ports and enrolled pods) but ferry_mesh_dst holds {capacity}")]
    MeshDestinations { wanted: usize, capacity: usize },
    #[error("{wanted} enrolled pods on this node but the per-pod maps (ferry_pods, ferry_inbound, ferry_inbound_policy) hold {capacity}")]
    Pods { wanted: usize, capacity: usize },
}

/// Whether `state` fits in maps of `cap` entries. The reconciler removes
/// before it adds (unenroll before enroll, stale destinations before new
/// ones), so what must fit is the desired state alone.
pub fn check_capacity(cap: Capacity, state: &State) -> Result<(), Refused> {
    let mut over = Vec::new();
    let pods = state.local_enrolled().count();
    if pods > cap.pods {
        over.push(Overflow::Pods {
            wanted: pods,
            capacity: cap.pods,
        });
    }
    let dsts = state.mesh_destinations().len();
    if dsts > cap.mesh_destinations {
        over.push(Overflow::MeshDestinations {
            wanted: dsts,
            capacity: cap.mesh_destinations,
        });
    }
    if over.is_empty() {
        Ok(())
    } else {
        Err(Refused::Capacity(over))
    }
}

struct Enrolled<P> {
    ctx: Arc<PodCtx>,
    pod_id: u32,
    /// What the node does with the pod's inbound while the agent is away.
    fallback: Fallback,
    plumbed: Plumbed<P>,
    tasks: Vec<AbortHandle>,
    /// The listeners' addresses and a duplicate of each descriptor
    /// (outbound, inbound, tunnel), for a hand-over to a new agent.
    addrs: [SocketAddrV4; 3],
    fds: [OwnedFd; 3],
    /// Taking over: the listeners, not accepted on until the whole node is
    /// enrolled ([`Reconciler::start_accepting`]).
    held: Option<Listeners>,
}

impl<P> Drop for Enrolled<P> {
    fn drop(&mut self) {
        // Stops the listeners; connections already accepted run to completion.
        self.tasks.iter().for_each(AbortHandle::abort);
    }
}

struct Inner<N: Node> {
    node: N,
    enrolled: HashMap<String, Enrolled<N::Pod>>,
    next_pod_id: u32,
    /// The last config applied, as it came (before the learned addresses),
    /// kept while it has pending pods: applied again when what was learned
    /// changes. None: nothing to apply again.
    last: Option<ConfigFile>,
    /// Addresses learned from the runtime for pending pods, by pod uid:
    /// only those the last applied config still has pending.
    learned: BTreeMap<String, Learned>,
}

/// An address learned from a pod sandbox's ADD, for a pod the config has no
/// address for yet.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Learned {
    ip: Ipv4Addr,
    /// The sandbox that gave it (its DEL drops the address).
    container_id: String,
    /// `namespace/name`, for logs.
    pod: String,
}

pub struct Reconciler<N: Node> {
    inner: tokio::sync::Mutex<Inner<N>>,
    /// Where the learned addresses are kept across agent restarts (None:
    /// in memory only).
    learned_file: std::sync::OnceLock<PathBuf>,
    proxy: Arc<Proxy>,
    ids: Option<Arc<Identities>>,
    /// Where pod cgroups live when the settings do not say.
    cgroup_root: PathBuf,
    status: RwLock<BTreeMap<String, PodStatus>>,
    /// Version of the last config fully applied (0: none yet). Published
    /// last, so "applied" means every enrollment of that version is done.
    applied: AtomicU64,
    /// Listeners received from the previous agent (hand-over), by pod uid:
    /// an enrollment takes its pod's instead of binding new ones.
    inherited: Mutex<HashMap<String, Listeners>>,
    /// Taking over: pruning what the previous run left waits for the
    /// hand-over to complete (the previous agent still serves until then),
    /// and accepting waits until every pod is enrolled, so no connection
    /// this agent accepts meets a local pod it does not know yet.
    taking_over: AtomicBool,
    /// Handed over to a new agent: never reconcile again.
    retired: AtomicBool,
    /// Pods whose enrollment failed, by uid: when to try again.
    retries: Mutex<HashMap<String, Retry>>,
    /// Sandboxes the runtime announced (ferry-cni), by pod uid (or
    /// `namespace/name` when the runtime gave no uid).
    sandboxes: Mutex<HashMap<String, Sandbox>>,
    /// Bumped whenever pod status changes (CNI waiters watch it).
    changed: watch::Sender<u64>,
}

/// A failed enrollment's retry schedule.
#[derive(Clone, Copy, Debug)]
struct Retry {
    failures: u32,
    next: Instant,
}

/// First retry after this; doubled per failure up to [`RETRY_MAX`].
pub const RETRY_BASE: Duration = Duration::from_millis(500);
/// The longest wait between two attempts to enroll a failing pod.
pub const RETRY_MAX: Duration = Duration::from_secs(30);

/// The wait before the next attempt after `failures` failed ones in a row
/// (500 ms, 1 s, 2 s, ... 30 s): bounded, so a pod that can be enrolled
/// again (its port freed, its process started) is within 30 s.
pub fn retry_delay(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    RETRY_BASE.saturating_mul(1 << doublings).min(RETRY_MAX)
}

/// How long the announcement of a sandbox the config never names is kept.
const SANDBOX_TTL: Duration = Duration::from_secs(600);

/// A pod sandbox as the runtime announced it on ADD.
#[derive(Clone, Debug)]
struct Sandbox {
    container_id: String,
    netns: Option<PathBuf>,
    /// The addresses the runtime's network plugins gave the pod (`prevResult.ips`).
    ips: Vec<IpAddr>,
    /// DEL came: not enrolled again until a new ADD.
    deleted: bool,
    seen: Instant,
}

/// Whether a pod is captured, as the CNI server reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Capture {
    /// Steering is on.
    Captured { pod_id: u32 },
    /// Not to be captured.
    NotInMesh(String),
    /// Not yet, and why (the pod unknown yet, being enrolled, its sandbox
    /// gone...).
    Pending(String),
    /// Its enrollment failed (retried with backoff): the last error.
    Failing(String),
}

/// What the CNI server (the `cni` module) needs of the reconciler.
pub trait Captures: Send + Sync + 'static {
    /// The pod's capture, now.
    fn capture(&self, pod: &PodInfo) -> Capture;
    /// A new sandbox (ADD): remember it, enroll the pod in it now if it is
    /// wanted and not yet captured there.
    fn sandbox_added<'a>(&'a self, pod: &'a PodInfo) -> BoxFuture<'a, ()>;
    /// A sandbox gone (DEL): stop capturing the pod in it. Idempotent.
    fn sandbox_deleted<'a>(&'a self, pod: &'a PodInfo) -> BoxFuture<'a, ()>;
    /// Changes whenever a capture may have changed.
    fn changes(&self) -> watch::Receiver<u64>;
    /// Handed over to a new agent: answer nothing more.
    fn retired(&self) -> bool;
}

/// Whether two paths name the same network namespace.
fn same_netns(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

/// How long an enrollment on inherited listeners waits for the pod's
/// certificate: the new agent must not serve a pod's tunnel without one.
const INHERITED_CERT_WAIT: Duration = Duration::from_secs(10);

/// A pod's listeners as offered to a new agent.
pub struct PodListeners<'a> {
    pub uid: String,
    pub addrs: [SocketAddrV4; 3],
    pub fds: [BorrowedFd<'a>; 3],
}

/// The reconciler held still for a hand-over: nothing is enrolled or
/// unenrolled while this lives (config updates wait).
pub struct Frozen<'a, N: Node> {
    inner: tokio::sync::MutexGuard<'a, Inner<N>>,
    retired: &'a AtomicBool,
}

impl<N: Node> Frozen<'_, N> {
    /// Every enrolled pod's listeners.
    pub fn listeners(&self) -> Vec<PodListeners<'_>> {
        self.inner
            .enrolled
            .iter()
            .map(|(uid, e)| PodListeners {
                uid: uid.clone(),
                addrs: e.addrs,
                fds: [e.fds[0].as_fd(), e.fds[1].as_fd(), e.fds[2].as_fd()],
            })
            .collect()
    }

    /// Handed over: stops accepting on every pod (connections already
    /// accepted run to completion) and never reconciles again, so nothing
    /// this agent does can undo the new agent's steering.
    pub fn retire(self) {
        self.retired.store(true, Ordering::Release);
        for e in self.inner.enrolled.values() {
            e.tasks.iter().for_each(AbortHandle::abort);
        }
    }
}

/// Whether an enrolled pod still matches its spec (a veth the node found
/// itself is not a change).
fn same_pod(spec: &Workload, enrolled: &Workload) -> bool {
    spec.host_veth.is_none()
        && spec
            == &Workload {
                host_veth: None,
                ..enrolled.clone()
            }
        || spec == enrolled
}

impl<N: Node> Reconciler<N> {
    pub fn new(node: N, proxy: Arc<Proxy>, ids: Option<Arc<Identities>>, cgroup_root: PathBuf) -> Self {
        Self {
            inner: tokio::sync::Mutex::new(Inner {
                node,
                enrolled: HashMap::new(),
                next_pod_id: 1,
                last: None,
                learned: BTreeMap::new(),
            }),
            learned_file: std::sync::OnceLock::new(),
            proxy,
            ids,
            cgroup_root,
            status: RwLock::new(BTreeMap::new()),
            applied: 0.into(),
            inherited: Mutex::new(HashMap::new()),
            taking_over: AtomicBool::new(false),
            retired: AtomicBool::new(false),
            retries: Mutex::new(HashMap::new()),
            sandboxes: Mutex::new(HashMap::new()),
            changed: watch::channel(0).0,
        }
    }

    fn notify(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Listeners handed over by the previous agent; enrollments take them.
    /// Until [`Reconciler::start_accepting`], enrolled pods are not accepted
    /// on, and pruning stale pins waits for [`Reconciler::prune_now`].
    pub fn inherit(&self, pods: HashMap<String, Listeners>) {
        self.taking_over.store(true, Ordering::Release);
        *self.inherited.lock().unwrap_or_else(|e| e.into_inner()) = pods;
    }

    /// Taking over, once ready: starts accepting on every enrolled pod.
    pub async fn start_accepting(&self) {
        let mut inner = self.inner.lock().await;
        self.taking_over.store(false, Ordering::Release);
        for e in inner.enrolled.values_mut() {
            if let Some(l) = e.held.take() {
                e.tasks.extend(self.proxy.serve_pod(e.ctx.clone(), l));
            }
        }
    }

    /// After a hand-over: drops inherited listeners no pod took and what the
    /// previous run left for pods no longer enrolled.
    pub async fn prune_now(&self) {
        self.inherited.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.inner.lock().await.node.prune_stale();
    }

    /// Holds the reconciler still (see [`Frozen`]).
    pub async fn freeze(&self) -> Frozen<'_, N> {
        Frozen {
            inner: self.inner.lock().await,
            retired: &self.retired,
        }
    }

    pub fn applied_version(&self) -> u64 {
        self.applied.load(Ordering::Acquire)
    }

    pub fn pod_status(&self) -> Vec<PodStatus> {
        self.status
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Makes the node match `cfg`, or, if it cannot fit, logs why and keeps
    /// the previous state (see [`Reconciler::try_reconcile`]). Returns the
    /// version now applied.
    pub async fn reconcile(&self, cfg: ConfigFile) -> u64 {
        match self.try_reconcile(cfg).await {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(reason = %e, "config refused; keeping the previous config");
                self.proxy.state().version
            }
        }
    }

    /// Makes the node match `cfg`. A desired state the node's maps cannot
    /// hold is refused whole before anything changes. Pods that fail to
    /// enroll are reported in their status and left uncaptured; the rest
    /// proceed.
    pub async fn try_reconcile(&self, cfg: ConfigFile) -> Result<u64, Refused> {
        let mut inner = self.inner.lock().await;
        self.apply_locked(&mut inner, cfg).await
    }

    /// Keeps the learned addresses in `path` from now on, and takes those a
    /// previous agent left there (call before the first config is applied:
    /// they apply to it, each dropped as usual if the config says so). A
    /// file that cannot be read is reported and set aside, never fatal.
    pub async fn keep_learned_in(&self, path: PathBuf) {
        let mut inner = self.inner.lock().await;
        match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<BTreeMap<String, Learned>>(&bytes) {
                Ok(l) => {
                    for (uid, x) in &l {
                        tracing::info!(pod = %x.pod, uid = %uid, ip = %x.ip, "address learned from the runtime by a previous agent, kept until ferry-control has one");
                    }
                    inner.learned = l;
                }
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "ignoring an unreadable file of learned addresses")
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(file = %path.display(), error = %e, "cannot read the file of learned addresses"),
        }
        let _ = self.learned_file.set(path);
    }

    /// Writes the learned addresses atomically (a crash leaves the old file
    /// or the new one), when a file was given.
    /// Never once handed over: the file is the successor's then.
    fn save_learned(&self, learned: &BTreeMap<String, Learned>) {
        let Some(path) = self.learned_file.get() else { return };
        if self.retired.load(Ordering::Acquire) {
            tracing::info!(file = %path.display(), "learned addresses not saved: this agent has handed over to a new one");
            return;
        }
        let tmp = path.with_extension("tmp");
        let r = serde_json::to_vec(learned)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = r {
            tracing::warn!(file = %path.display(), error = %e, "cannot save the addresses learned from the runtime");
        }
    }

    /// Applies the last config again, with the learned addresses as they are
    /// now (one was learned or dropped). Nothing to do without a last config
    /// with pending pods.
    async fn reapply_locked(&self, inner: &mut Inner<N>) {
        let Some(cfg) = inner.last.clone() else { return };
        if let Err(e) = self.apply_locked(inner, cfg).await {
            tracing::error!(reason = %e, "config not applied again with the addresses learned from the runtime");
        }
    }

    /// The addresses learned for `cfg`'s pending pods: those learned before,
    /// updated from what the runtime said of each enrolled pending pod's
    /// current sandbox (an ADD with exactly one IPv4 address, not one the
    /// config has for a workload: the ADD waits, saying so); a pod not
    /// enrolled, or whose sandbox was deleted, has none.
    fn learned_for(&self, current: &BTreeMap<String, Learned>, cfg: &ConfigFile) -> BTreeMap<String, Learned> {
        let mut out = current.clone();
        if cfg.pending_pods.is_empty() {
            return out;
        }
        let in_use: HashSet<Ipv4Addr> = cfg.workloads.iter().map(|w| w.ip).collect();
        let sandboxes = self.sandboxes.lock().unwrap_or_else(|e| e.into_inner());
        for p in cfg.pending_pods.iter().filter(|p| p.node == cfg.node) {
            if !p.enrolled {
                out.remove(&p.uid);
                continue;
            }
            let Some(sb) = sandboxes.get(&p.uid).or_else(|| sandboxes.get(&p.label())) else {
                continue;
            };
            if sb.deleted {
                out.remove(&p.uid);
                continue;
            }
            match pending::runtime_address(&sb.ips) {
                RuntimeAddress::One(ip) if !in_use.contains(&ip) => {
                    out.insert(
                        p.uid.clone(),
                        Learned {
                            ip,
                            container_id: sb.container_id.clone(),
                            pod: p.label(),
                        },
                    );
                }
                // A newer sandbox that gave no usable address: what an
                // older one gave is stale.
                RuntimeAddress::One(_)
                | RuntimeAddress::NoIpv4
                | RuntimeAddress::Several(_)
                | RuntimeAddress::NotAPodAddress(_) => {
                    if out.get(&p.uid).is_some_and(|l| l.container_id != sb.container_id) {
                        out.remove(&p.uid);
                    }
                }
            }
        }
        out
    }

    /// Keeps the learned addresses still in use and says what became of
    /// the others.
    fn settle_learned(
        old: &BTreeMap<String, Learned>,
        mut learned: BTreeMap<String, Learned>,
        fates: &BTreeMap<String, Fate>,
    ) -> BTreeMap<String, Learned> {
        for (uid, fate) in fates {
            let Some(l) = learned.get(uid) else { continue };
            match fate {
                Fate::Used if old.get(uid) != Some(l) => tracing::info!(
                    pod = %l.pod,
                    ip = %l.ip,
                    container_id = %l.container_id,
                    "pod address learned from the runtime (CNI ADD): ferry-control has none for it yet"
                ),
                Fate::Used => {}
                Fate::Confirmed => tracing::info!(
                    pod = %l.pod,
                    ip = %l.ip,
                    "ferry-control now has the pod's address: the one learned from the runtime is dropped"
                ),
                Fate::Superseded { config } => tracing::warn!(
                    pod = %l.pod,
                    learned = %l.ip,
                    config = %config,
                    "ferry-control has the pod at another address than its runtime gave: the control plane's is used"
                ),
                Fate::Taken { by } => tracing::warn!(
                    pod = %l.pod,
                    ip = %l.ip,
                    other = %by,
                    "the address the runtime gave the pod is another pod's in the config: not used"
                ),
                Fate::Departed => tracing::info!(
                    pod = %l.pod,
                    ip = %l.ip,
                    "the pod left the config: the address learned from the runtime is dropped"
                ),
            }
        }
        learned.retain(|uid, _| fates.get(uid).is_some_and(Fate::keep));
        learned
    }

    /// [`Reconciler::try_reconcile`] under the lock: `cfg` as it came, the
    /// learned addresses applied to it on the way to the state.
    async fn apply_locked(&self, inner: &mut Inner<N>, mut cfg: ConfigFile) -> Result<u64, Refused> {
        let prev = self.proxy.state();
        let first = prev.version == 0;
        if self.retired.load(Ordering::Acquire) {
            tracing::info!("config not applied: this agent has handed over to a new one");
            return Ok(prev.version);
        }
        let raw = (!cfg.pending_pods.is_empty()).then(|| cfg.clone());
        let learned = self.learned_for(&inner.learned, &cfg);
        let fates = pending::overlay(&mut cfg, &learned.iter().map(|(u, l)| (u.clone(), l.ip)).collect());
        let state = Arc::new(State::from_config(cfg, prev.version + 1));
        check_capacity(inner.node.capacity(), &state)?;
        inner.last = raw;
        let settled = Self::settle_learned(&inner.learned, learned, &fates);
        if settled != inner.learned {
            inner.learned = settled;
            self.save_learned(&inner.learned);
        }
        if let Err(e) = inner.node.configure(&state.settings) {
            tracing::error!(error = %e, "cannot update node settings");
        }
        self.unenroll_gone(inner, &state);
        self.proxy.set_state(state.clone());

        let cgroup_root = state
            .settings
            .cgroup_root
            .clone()
            .unwrap_or_else(|| self.cgroup_root.clone());
        let mut status = BTreeMap::new();
        for w in state.workloads.values().filter(|w| w.node == state.node) {
            let st = self.sync_pod(inner, &state, w, &cgroup_root).await;
            status.insert(w.uid.clone(), st);
        }
        self.forget_departed(&state);
        self.publish_telemetry(&state, inner.enrolled.len(), &status);
        *self.status.write().unwrap_or_else(|e| e.into_inner()) = status;
        self.notify();

        if let Err(e) = inner.node.set_mesh_destinations(&state.mesh_destinations()) {
            tracing::error!(error = %e, "cannot update mesh destinations");
        }
        if first && !self.taking_over.load(Ordering::Acquire) {
            inner.node.prune_stale();
        }
        self.applied.store(state.version, Ordering::Release);
        tracing::info!(
            version = state.version,
            pods = inner.enrolled.len(),
            services = state.services.len(),
            "config applied"
        );
        Ok(state.version)
    }

    /// Unenrolls pods no longer wanted, or whose spec changed (re-enrolled).
    fn unenroll_gone(&self, inner: &mut Inner<N>, state: &State) {
        let want: HashMap<&str, &Workload> = state.local_enrolled().map(|w| (w.uid.as_str(), w)).collect();
        let gone: Vec<String> = inner
            .enrolled
            .iter()
            .filter(|(uid, e)| want.get(uid.as_str()).is_none_or(|w| !same_pod(w, &e.ctx.workload)))
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in gone {
            self.unenroll_one(inner, &uid, "pod unenrolled");
        }
    }

    /// Stops capturing one pod (steering first, then its listeners).
    fn unenroll_one(&self, inner: &mut Inner<N>, uid: &str, why: &str) {
        if let Some(e) = inner.enrolled.remove(uid) {
            self.proxy.remove_pod(uid);
            if let Some(ids) = &self.ids {
                ids.forget(uid);
            }
            if let Err(err) = inner.node.unsteer(uid) {
                tracing::error!(pod = %e.ctx.label, error = %err, "unenroll failed");
            }
            tracing::info!(pod = %e.ctx.label, "{why}");
        }
    }

    /// Enrolls `w` if it is wanted and not captured yet (a failure is
    /// scheduled for a retry), keeps its inbound fallback current, and
    /// returns its status.
    async fn sync_pod(&self, inner: &mut Inner<N>, state: &State, w: &Workload, cgroup_root: &Path) -> PodStatus {
        let mut st = PodStatus {
            uid: w.uid.clone(),
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            ip: w.ip.to_string(),
            enrolled: false,
            pod_id: None,
            netns_cookie: None,
            cgroup: None,
            netns: None,
            host_veth: w.host_veth.clone(),
            error: None,
            ip_learned: inner.learned.contains_key(&w.uid),
        };
        let fallback = admission::fallback(state, w);
        let sandbox = self.sandbox_of(w);
        let sandbox_gone = sandbox.as_ref().is_some_and(|s| s.deleted);
        if w.enrolled && !sandbox_gone && !inner.enrolled.contains_key(&w.uid) {
            // The runtime's netns for the pod, when it said (ferry-cni),
            // over the config's (node-local: not part of the pod's spec).
            let netns = sandbox.and_then(|s| s.netns);
            match self.enroll(inner, w, netns, cgroup_root, fallback).await {
                Ok(e) => {
                    tracing::info!(pod = %e.ctx.label, pod_id = e.pod_id, ip = %w.ip, "pod enrolled");
                    inner.enrolled.insert(w.uid.clone(), e);
                    self.retries.lock().unwrap_or_else(|e| e.into_inner()).remove(&w.uid);
                }
                Err(err) => {
                    let mut retries = self.retries.lock().unwrap_or_else(|e| e.into_inner());
                    let r = retries.entry(w.uid.clone()).or_insert(Retry {
                        failures: 0,
                        next: Instant::now(),
                    });
                    r.failures = r.failures.saturating_add(1);
                    let delay = retry_delay(r.failures);
                    r.next = Instant::now() + delay;
                    tracing::error!(
                        pod = %w.label(),
                        error = %err,
                        failures = r.failures,
                        retry_in_ms = delay.as_millis() as u64,
                        "pod not enrolled"
                    );
                    st.error = Some(err.to_string());
                }
            }
        }
        let Inner { node, enrolled, .. } = &mut *inner;
        if let Some(e) = enrolled.get_mut(&w.uid).filter(|e| e.fallback != fallback) {
            // A policy change (PeerAuthentication): the pinned fallback follows.
            match node.set_fallback(w.ip, fallback) {
                Ok(()) => {
                    tracing::info!(pod = %e.ctx.label, fallback = fallback.as_str(), "inbound fallback updated");
                    e.fallback = fallback;
                }
                Err(err) => tracing::error!(pod = %e.ctx.label, error = %err, "cannot update the inbound fallback"),
            }
        }
        if let Some(e) = inner.enrolled.get(&w.uid) {
            st.enrolled = true;
            st.pod_id = Some(e.pod_id);
            st.netns_cookie = Some(e.plumbed.netns_cookie);
            st.cgroup = e.plumbed.cgroup.as_ref().map(|p| p.display().to_string());
            st.netns = e.plumbed.netns.as_ref().map(|p| p.display().to_string());
            st.host_veth = e.plumbed.host_veth.clone();
        }
        st
    }

    /// Drops retry schedules of pods no longer wanted, and what the runtime
    /// said of sandboxes whose pods are gone (deleted ones at once, others
    /// once they are old: an ADD may come before the config names the pod).
    fn forget_departed(&self, state: &State) {
        let wanted: HashSet<&str> = state.local_enrolled().map(|w| w.uid.as_str()).collect();
        self.retries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|uid, _| wanted.contains(uid.as_str()));
        let known: HashSet<String> = state
            .workloads
            .values()
            .flat_map(|w| [w.uid.clone(), w.label()])
            .chain(state.pending.values().flat_map(|p| [p.uid.clone(), p.label()]))
            .collect();
        self.sandboxes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|key, s| known.contains(key) || (!s.deleted && s.seen.elapsed() < SANDBOX_TTL));
    }

    /// What the runtime said of `w`'s sandbox.
    fn sandbox_of(&self, w: &Workload) -> Option<Sandbox> {
        let sb = self.sandboxes.lock().unwrap_or_else(|e| e.into_inner());
        sb.get(&w.uid).or_else(|| sb.get(&w.label())).cloned()
    }

    /// The workload `pod` names: by uid, else by namespace and name.
    fn workload_of<'s>(state: &'s State, pod: &PodInfo) -> Option<&'s Workload> {
        if !pod.uid.is_empty() {
            return state.workloads.get(&pod.uid);
        }
        state
            .workloads
            .values()
            .find(|w| w.namespace == pod.namespace && w.name == pod.name)
    }

    /// The pending pod (this node's, no address yet) `pod` names: by uid,
    /// else by namespace and name.
    fn pending_of<'s>(state: &'s State, pod: &PodInfo) -> Option<&'s PendingPod> {
        if !pod.uid.is_empty() {
            return state.pending.get(&pod.uid);
        }
        state
            .pending
            .values()
            .find(|p| p.namespace == pod.namespace && p.name == pod.name)
    }

    /// Retries the enrollments that are due (their backoff has passed, or a
    /// new sandbox made them due). Returns how many were tried.
    pub async fn retry_failed(&self) -> usize {
        let now = Instant::now();
        let due: Vec<String> = self
            .retries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, r)| r.next <= now)
            .map(|(uid, _)| uid.clone())
            .collect();
        if due.is_empty() {
            return 0;
        }
        let mut inner = self.inner.lock().await;
        if self.retired.load(Ordering::Acquire) {
            return 0;
        }
        let state = self.proxy.state();
        let cgroup_root = state
            .settings
            .cgroup_root
            .clone()
            .unwrap_or_else(|| self.cgroup_root.clone());
        let mut tried = 0;
        for uid in due {
            let Some(w) = state.workloads.get(&uid).filter(|w| w.enrolled && w.node == state.node) else {
                self.retries.lock().unwrap_or_else(|e| e.into_inner()).remove(&uid);
                continue;
            };
            // Enrolled in a sandbox that is not the runtime's current one
            // (a new sandbox whose old one's DEL never came): move it.
            let moved = match (self.sandbox_of(w), inner.enrolled.get(&uid)) {
                (Some(sb), Some(e)) => match (&sb.netns, &e.plumbed.netns) {
                    (Some(new), Some(old)) => !same_netns(new, old),
                    _ => false,
                },
                _ => false,
            };
            if moved {
                self.unenroll_one(&mut inner, &uid, "pod unenrolled from its previous sandbox");
            }
            if inner.enrolled.contains_key(&uid) {
                self.retries.lock().unwrap_or_else(|e| e.into_inner()).remove(&uid);
                continue;
            }
            tried += 1;
            self.proxy.telemetry.metrics.enroll_retries.inc();
            let st = self.sync_pod(&mut inner, &state, w, &cgroup_root).await;
            if st.enrolled {
                tracing::info!(pod = %w.label(), "pod enrolled on retry");
            } else if st.error.is_none() {
                // Not tried (its sandbox is gone): nothing to retry.
                self.retries.lock().unwrap_or_else(|e| e.into_inner()).remove(&uid);
            }
            self.status.write().unwrap_or_else(|e| e.into_inner()).insert(uid, st);
        }
        self.publish_pod_gauges(inner.enrolled.len());
        self.notify();
        tried
    }

    fn publish_pod_gauges(&self, enrolled: usize) {
        let m = &self.proxy.telemetry.metrics;
        m.enrolled_pods.set(enrolled as i64);
        let errors = self
            .status
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|s| s.error.is_some())
            .count();
        m.enroll_errors.set(errors as i64);
    }

    /// Retries failed enrollments as their backoff passes, until the agent
    /// hands over (spawned by the composition root).
    pub async fn retry_loop(self: Arc<Self>) {
        loop {
            let next = self
                .retries
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .map(|r| r.next)
                .min();
            let cap = Instant::now() + Duration::from_secs(1);
            tokio::time::sleep_until(next.map_or(cap, |n| n.min(cap))).await;
            if self.retired.load(Ordering::Acquire) {
                return;
            }
            self.retry_failed().await;
        }
    }

    fn publish_telemetry(&self, state: &State, enrolled: usize, status: &BTreeMap<String, PodStatus>) {
        let t = &self.proxy.telemetry;
        *t.access_log.write().unwrap_or_else(|e| e.into_inner()) = state.settings.access_log.clone();
        t.metrics_on.store(state.settings.metrics, Ordering::Relaxed);
        t.metrics.enrolled_pods.set(enrolled as i64);
        t.metrics
            .enroll_errors
            .set(status.values().filter(|s| s.error.is_some()).count() as i64);
        t.metrics.config_version.set(state.version as i64);
        // Series naming a workload this config no longer has go (a rollout's
        // old revision, a deleted Deployment): they would grow without end.
        let live = crate::telemetry::metrics::LiveWorkloads::new(state.workloads.values());
        let gone = t.metrics.forget_departed(&live);
        if gone > 0 {
            tracing::debug!(label_sets = gone, "metric series of departed workloads removed");
        }
    }

    async fn enroll(
        &self,
        inner: &mut Inner<N>,
        w: &Workload,
        netns: Option<PathBuf>,
        cgroup_root: &Path,
        fallback: Fallback,
    ) -> Result<Enrolled<N::Pod>, EnrollError> {
        let plumbed = match netns {
            Some(netns) => {
                let at = Workload {
                    netns: Some(netns),
                    ..w.clone()
                };
                inner.node.plumb(&at, cgroup_root).await?
            }
            None => inner.node.plumb(w, cgroup_root).await?,
        };
        let addrs = listener_addrs(w.ip);
        let handed = self
            .inherited
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&w.uid)
            .filter(|l| {
                // Only listeners on this pod's addresses (its IP may have changed).
                let got = [&l.outbound, &l.inbound, &l.tunnel].map(crate::sockets::local_v4);
                got == addrs.map(Some)
            });
        let inherited = handed.is_some();
        let listen = |addr| {
            plumbed.sockets.listen(addr).map_err(|source| {
                if source.kind() == std::io::ErrorKind::AddrInUse {
                    EnrollError::PortInUse { port: addr.port() }
                } else {
                    EnrollError::Listen { addr, source }
                }
            })
        };
        let [out_a, in_a, tun_a] = addrs;
        let listeners = match handed {
            Some(l) => l,
            None => Listeners {
                outbound: listen(out_a)?,
                inbound: listen(in_a)?,
                tunnel: listen(tun_a)?,
            },
        };
        let fds = [&listeners.outbound, &listeners.inbound, &listeners.tunnel].map(|l| l.as_fd().try_clone_to_owned());
        let [a, b, c] = fds;
        let fds = [a?, b?, c?];
        let pod_id = inner.next_pod_id;
        inner.next_pod_id += 1;
        if let Some(ids) = &self.ids {
            // Have a certificate before steering starts, so the pod's first
            // cross-node connection can use it; keep_fresh retries if not.
            // Inherited listeners are already live (the previous agent
            // serves them): this agent joins only with a certificate.
            let wait = if inherited {
                INHERITED_CERT_WAIT
            } else {
                Duration::from_secs(3)
            };
            let got = async {
                loop {
                    match ids.fetch(&w.uid, &w.spiffe_id()).await {
                        Ok(c) => return Ok(c),
                        Err(e) if !inherited => return Err(e),
                        Err(e) => {
                            tracing::warn!(pod = %w.label(), error = %e, "no certificate yet; retrying");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                }
            };
            match tokio::time::timeout(wait, got).await {
                Ok(Ok(c)) => {
                    tracing::info!(pod = %w.label(), spiffe_id = %c.spiffe_id, "workload certificate installed")
                }
                Ok(Err(e)) => tracing::warn!(pod = %w.label(), error = %e, "no certificate yet"),
                Err(_) if inherited => return Err(EnrollError::NoCertificate { waited: wait }),
                Err(_) => tracing::warn!(pod = %w.label(), "no certificate yet: the CA did not answer in 3s"),
            }
        }
        // The fallback first: from the moment steering is on, the pod's
        // inbound is decided by the agent or, while it is away, by this.
        inner.node.set_fallback(w.ip, fallback)?;
        if let Err(e) = inner.node.steer(w, pod_id, &plumbed, &listeners.inbound) {
            if let Err(err) = inner.node.clear_fallback(w.ip) {
                tracing::warn!(pod = %w.label(), error = %err, "cannot clear the inbound fallback");
            }
            return Err(e);
        }
        let workload = Workload {
            host_veth: plumbed.host_veth.clone(),
            ..w.clone()
        };
        let ctx = Arc::new(PodCtx::new(workload, plumbed.sockets.clone(), plumbed.netns_cookie));
        let (mut tasks, held) = if self.taking_over.load(Ordering::Acquire) {
            (Vec::new(), Some(listeners))
        } else {
            (self.proxy.serve_pod(ctx.clone(), listeners), None)
        };
        if let Some(ids) = &self.ids {
            tasks.push(ids.keep_fresh(w.uid.clone(), w.spiffe_id()));
        }
        Ok(Enrolled {
            ctx,
            pod_id,
            fallback,
            plumbed,
            tasks,
            addrs,
            fds,
            held,
        })
    }

    /// Stops accepting on every pod (steering stays: see docs).
    pub async fn stop_listeners(&self) {
        let mut inner = self.inner.lock().await;
        for uid in inner.enrolled.keys() {
            self.proxy.remove_pod(uid);
        }
        inner.enrolled.clear();
    }
}

impl<N: Node> Reconciler<N> {
    /// The pod's capture, from the applied state, the pod status and what
    /// the runtime said of its sandbox.
    pub fn capture_of(&self, pod: &PodInfo) -> Capture {
        if self.applied_version() == 0 {
            return Capture::Pending("the agent has applied no config yet".into());
        }
        let state = self.proxy.state();
        let Some(w) = Self::workload_of(&state, pod) else {
            if let Some(p) = Self::pending_of(&state, pod) {
                return self.capture_of_pending(&state, p, pod);
            }
            return Capture::Pending(format!(
                "the agent has no word of pod {} (uid {:?}) yet: its config (from ferry-control) does not name it",
                pod.label(),
                pod.uid
            ));
        };
        if w.node != state.node {
            return Capture::Pending(format!(
                "the agent's config places pod {} on node {:?}, not on this node ({:?})",
                w.label(),
                w.node,
                state.node
            ));
        }
        if !w.enrolled {
            return Capture::NotInMesh(format!(
                "pod {} is not enrolled (no ferry.dev/mesh opt-in for it or its namespace)",
                w.label()
            ));
        }
        if let Some(sb) = self.sandbox_of(w) {
            if sb.deleted {
                return Capture::Pending(format!(
                    "the sandbox of pod {} was deleted (CNI DEL); waiting for a new one",
                    w.label()
                ));
            }
        }
        let v4: Vec<Ipv4Addr> = pod
            .ips
            .iter()
            .filter_map(|ip| match ip {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            })
            .collect();
        if !v4.is_empty() && !v4.contains(&w.ip) {
            return Capture::Pending(format!(
                "the agent's config has pod {} at {}, the runtime gave it {}",
                w.label(),
                w.ip,
                v4.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
            ));
        }
        let status = self.status.read().unwrap_or_else(|e| e.into_inner());
        match status.get(&w.uid) {
            Some(st) if st.enrolled => Capture::Captured {
                pod_id: st.pod_id.unwrap_or(0),
            },
            Some(PodStatus { error: Some(e), .. }) => Capture::Failing(e.clone()),
            _ => Capture::Pending(format!("pod {} is being enrolled", w.label())),
        }
    }

    /// The capture of a pod the config has no address for (and the agent
    /// has not learned one for yet): not in the mesh, or why it waits.
    fn capture_of_pending(&self, state: &State, p: &PendingPod, pod: &PodInfo) -> Capture {
        if !p.enrolled {
            return Capture::NotInMesh(format!(
                "pod {} is not enrolled (no ferry.dev/mesh opt-in for it or its namespace)",
                p.label()
            ));
        }
        let sb = self.sandboxes.lock().unwrap_or_else(|e| e.into_inner());
        if sb.get(&p.uid).or_else(|| sb.get(&p.label())).is_some_and(|s| s.deleted) {
            return Capture::Pending(format!(
                "the sandbox of pod {} was deleted (CNI DEL); waiting for a new one",
                p.label()
            ));
        }
        drop(sb);
        let listed = || {
            if pod.ips.is_empty() {
                "none".to_owned()
            } else {
                pod.ips.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
            }
        };
        let no_address = format!(
            "pod {} has no address in the agent's config yet (the kubelet reports it only once the sandbox is up)",
            p.label()
        );
        Capture::Pending(match pending::runtime_address(&pod.ips) {
            RuntimeAddress::NoIpv4 => format!(
                "{no_address} and the runtime gave it no IPv4 address (prevResult.ips: {}): it cannot be captured without one",
                listed()
            ),
            RuntimeAddress::Several(v4) => format!(
                "{no_address} and the runtime gave it several IPv4 addresses ({}): which one is the pod's is not known",
                v4.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
            ),
            RuntimeAddress::NotAPodAddress(a) => {
                format!("{no_address} and the runtime gave it {a}, which is not a pod address")
            }
            RuntimeAddress::One(a) => match state.workload_by_ip(a) {
                Some(other) => format!(
                    "{no_address} and the runtime gave it {a}, which the config has for pod {}",
                    other.label()
                ),
                None => format!(
                    "pod {} is being enrolled at {a}, the address its runtime gave it (ferry-control has none yet)",
                    p.label()
                ),
            },
        })
    }

    async fn add_sandbox(&self, pod: &PodInfo) {
        let key = if pod.uid.is_empty() {
            pod.label()
        } else {
            pod.uid.clone()
        };
        let sb = Sandbox {
            container_id: pod.container_id.clone(),
            netns: Some(PathBuf::from(&pod.netns)).filter(|p| !p.as_os_str().is_empty()),
            ips: pod.ips.clone(),
            deleted: false,
            seen: Instant::now(),
        };
        tracing::info!(
            pod = %pod.label(),
            uid = %pod.uid,
            container_id = %pod.container_id,
            netns = %pod.netns,
            ips = %pod.ips.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
            "sandbox announced by the runtime (CNI ADD)"
        );
        self.sandboxes.lock().unwrap_or_else(|e| e.into_inner()).insert(key, sb);
        // A pod without an address in the config: take it from this ADD
        // (applying the last config again with it), or, for one whose
        // address came from an older sandbox, from this newer one.
        {
            let mut inner = self.inner.lock().await;
            let state = self.proxy.state();
            let usable = matches!(pending::runtime_address(&pod.ips), RuntimeAddress::One(_));
            let learns = Self::pending_of(&state, pod).is_some_and(|p| p.enrolled) && usable
                || Self::workload_of(&state, pod)
                    .and_then(|w| inner.learned.get(&w.uid))
                    .is_some_and(|l| {
                        // A newer sandbox, or this one announced again with
                        // another address (the runtime ran the chain again).
                        l.container_id != pod.container_id
                            || pending::runtime_address(&pod.ips) != RuntimeAddress::One(l.ip)
                    });
            if learns {
                self.reapply_locked(&mut inner).await;
            }
        }
        // A pod already wanted: enroll it (in this sandbox) now rather than
        // at its next backoff step or config change.
        let state = self.proxy.state();
        let Some(w) = Self::workload_of(&state, pod).filter(|w| w.enrolled && w.node == state.node) else {
            return;
        };
        let captured_elsewhere = {
            let status = self.status.read().unwrap_or_else(|e| e.into_inner());
            match (
                status.get(&w.uid).filter(|s| s.enrolled).and_then(|s| s.netns.clone()),
                pod.netns.is_empty(),
            ) {
                (Some(old), false) => !same_netns(Path::new(&old), Path::new(&pod.netns)),
                (Some(_), true) => false,
                (None, _) => true,
            }
        };
        if captured_elsewhere {
            self.retries
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(w.uid.clone())
                .or_insert(Retry {
                    failures: 0,
                    next: Instant::now(),
                })
                .next = Instant::now();
            self.retry_failed().await;
        }
    }

    async fn delete_sandbox(&self, pod: &PodInfo) {
        let key = if pod.uid.is_empty() {
            pod.label()
        } else {
            pod.uid.clone()
        };
        let mut inner = self.inner.lock().await;
        let state = self.proxy.state();
        let uid = Self::workload_of(&state, pod)
            .map(|w| w.uid.clone())
            .or_else(|| Self::pending_of(&state, pod).map(|p| p.uid.clone()))
            .unwrap_or_else(|| pod.uid.clone());
        let ours = {
            let mut sandboxes = self.sandboxes.lock().unwrap_or_else(|e| e.into_inner());
            // This sandbox, not another of the same pod: the one announced with
            // this container id or, announced before this agent started, the
            // netns the pod is captured in, or the sandbox a previous agent
            // learned the pod's address from (the learned-address file).
            let ours = match sandboxes.get(&key) {
                Some(sb) => pod.container_id.is_empty() || sb.container_id == pod.container_id,
                None => {
                    (!pod.netns.is_empty()
                        && inner
                            .enrolled
                            .get(&uid)
                            .and_then(|e| e.plumbed.netns.as_ref())
                            .is_some_and(|old| same_netns(old, Path::new(&pod.netns))))
                        || (!pod.container_id.is_empty()
                            && inner
                                .learned
                                .get(&uid)
                                .is_some_and(|l| l.container_id == pod.container_id))
                }
            };
            if ours {
                let sb = sandboxes.entry(key).or_insert(Sandbox {
                    container_id: pod.container_id.clone(),
                    netns: None,
                    ips: Vec::new(),
                    deleted: true,
                    seen: Instant::now(),
                });
                sb.deleted = true;
                sb.seen = Instant::now();
            }
            ours
        };
        if !ours {
            tracing::debug!(pod = %pod.label(), container_id = %pod.container_id, "CNI DEL of a sandbox not captured here: nothing to do");
            return;
        }
        self.retries.lock().unwrap_or_else(|e| e.into_inner()).remove(&uid);
        if inner.enrolled.contains_key(&uid) {
            self.unenroll_one(&mut inner, &uid, "pod unenrolled: its sandbox was deleted (CNI DEL)");
            if let Some(st) = self.status.write().unwrap_or_else(|e| e.into_inner()).get_mut(&uid) {
                st.enrolled = false;
                st.pod_id = None;
                st.netns_cookie = None;
                st.netns = None;
            }
            self.publish_pod_gauges(inner.enrolled.len());
            self.notify();
        }
        // An address this sandbox gave goes with it: the pod is pending again
        // (applied at once, so nothing routes to the address any more).
        let gave = inner
            .learned
            .get(&uid)
            .is_some_and(|l| pod.container_id.is_empty() || l.container_id == pod.container_id);
        if gave {
            if let Some(l) = inner.learned.remove(&uid) {
                tracing::info!(pod = %l.pod, ip = %l.ip, "the address learned from the runtime is dropped: its sandbox was deleted (CNI DEL)");
                self.save_learned(&inner.learned);
            }
            self.reapply_locked(&mut inner).await;
        }
    }
}

impl<N: Node> Captures for Reconciler<N> {
    fn capture(&self, pod: &PodInfo) -> Capture {
        self.capture_of(pod)
    }

    fn sandbox_added<'a>(&'a self, pod: &'a PodInfo) -> BoxFuture<'a, ()> {
        Box::pin(self.add_sandbox(pod))
    }

    fn sandbox_deleted<'a>(&'a self, pod: &'a PodInfo) -> BoxFuture<'a, ()> {
        Box::pin(self.delete_sandbox(pod))
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }
}

impl<N: Node> Apply for Reconciler<N> {
    fn apply(&self, cfg: ConfigFile) -> BoxFuture<'_, u64> {
        Box::pin(self.reconcile(cfg))
    }

    fn try_apply(&self, cfg: ConfigFile) -> BoxFuture<'_, Result<u64, Refused>> {
        Box::pin(self.try_reconcile(cfg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch directory for one test, with files standing in for pods'
    /// network namespaces; removed when dropped, also when the test fails.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(test: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("ferry-reconcile-{test}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        /// A file standing in for a pod's netns.
        fn netns(&self, name: &str) -> PathBuf {
            let p = self.0.join(name);
            std::fs::write(&p, "").unwrap();
            p
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// `local` enrolled pods on n1, one on n2 and `services` one-port services.
    fn state(local: usize, services: usize) -> State {
        let mut y = String::from("node: n1\nworkloads:\n");
        for i in 0..local {
            y += &format!(
                "  - {{uid: p{i}, name: p{i}, node: n1, ip: 10.1.1.{}, enrolled: true}}\n",
                i + 1
            );
        }
        y += "  - {uid: r, name: r, node: n2, ip: 10.1.2.1, enrolled: true}\nservices:\n";
        for i in 0..services {
            y += &format!(
                "  - {{name: s{i}, vip: 10.96.0.{}, ports: [{{port: 80, targetPort: 80}}]}}\n",
                i + 1
            );
        }
        State::from_config(ConfigFile::parse("t", &y).unwrap(), 1)
    }

    #[test]
    fn retries_back_off_exponentially_within_a_bound() {
        let ms = |n| retry_delay(n).as_millis();
        assert_eq!([ms(0), ms(1), ms(2), ms(3), ms(4)], [500, 500, 1000, 2000, 4000]);
        assert_eq!(retry_delay(7), RETRY_MAX);
        assert_eq!(retry_delay(u32::MAX), RETRY_MAX);
    }

    mod flaky {
        //! A node over loopback whose pods fail to plumb while their uid
        //! is in `broken`; it records the netns each plumb was given.
        use std::{
            io,
            net::{Ipv4Addr, SocketAddrV4},
        };

        use tokio::net::{TcpListener, TcpSocket};

        use super::super::*;
        use crate::{
            node::Capacity,
            sockets::{HostSockets, SocketFactory, Source},
        };

        #[derive(Debug)]
        pub struct Pod(pub Ipv4Addr);

        /// Where a pod address is on the host: as is when it is a loopback
        /// one (127.77.x.y), else a.b.c.d as 127.b.c.d (a pod-like address,
        /// 10.77.x.y, listened on at 127.77.x.y).
        pub fn on_host(ip: Ipv4Addr) -> Ipv4Addr {
            let [_, b, c, d] = ip.octets();
            if ip.is_loopback() {
                ip
            } else {
                Ipv4Addr::new(127, b, c, d)
            }
        }

        impl SocketFactory for Pod {
            fn listen(&self, addr: SocketAddrV4) -> io::Result<TcpListener> {
                // The pod's own 127.0.0.1 is its loopback address.
                let ip = if *addr.ip() == Ipv4Addr::LOCALHOST {
                    self.0
                } else {
                    *addr.ip()
                };
                HostSockets.listen(SocketAddrV4::new(on_host(ip), addr.port()))
            }
            fn socket(&self, src: Source) -> io::Result<TcpSocket> {
                HostSockets.socket(src)
            }
        }

        #[derive(Default)]
        pub struct Log {
            pub broken: Vec<String>,
            pub plumbed: Vec<(String, Option<PathBuf>)>,
            pub unsteered: Vec<String>,
        }

        pub struct Flaky(pub Arc<Mutex<Log>>);

        impl Node for Flaky {
            type Pod = ();
            async fn plumb(&mut self, w: &Workload, _: &Path) -> Result<Plumbed<()>, EnrollError> {
                let mut log = self.0.lock().unwrap();
                log.plumbed.push((w.uid.clone(), w.netns.clone()));
                if log.broken.contains(&w.uid) {
                    return Err(EnrollError::NoNetns(format!("no process in the cgroup of {}", w.uid)));
                }
                Ok(Plumbed {
                    sockets: Arc::new(Pod(w.ip)),
                    netns_cookie: u32::from(w.ip).into(),
                    cgroup: None,
                    netns: w.netns.clone(),
                    host_veth: None,
                    handle: (),
                })
            }
            fn steer(&mut self, _: &Workload, _: u32, _: &Plumbed<()>, _: &TcpListener) -> Result<(), EnrollError> {
                Ok(())
            }
            fn unsteer(&mut self, uid: &str) -> Result<(), EnrollError> {
                self.0.lock().unwrap().unsteered.push(uid.to_owned());
                Ok(())
            }
            fn capacity(&self) -> Capacity {
                Capacity::EBPF
            }
            fn configure(&mut self, _: &ferry_model::Settings) -> Result<(), EnrollError> {
                Ok(())
            }
            fn set_mesh_destinations(
                &mut self,
                _: &BTreeMap<(Ipv4Addr, u16), ferry_model::state::MeshDst>,
            ) -> Result<(), EnrollError> {
                Ok(())
            }
            fn prune_stale(&mut self) {}
        }

        pub fn reconciler(log: Arc<Mutex<Log>>) -> Arc<Reconciler<Flaky>> {
            use crate::telemetry::{metrics::Metrics, Counters, Telemetry};
            let counters = Arc::new(Counters::default());
            let metrics = Metrics::new("/nonexistent".into(), "n1".into(), counters.clone());
            let telemetry = Arc::new(Telemetry::new(metrics, counters));
            let orig = Arc::new(crate::proxy::orig_dst::Table::default());
            let proxy = Proxy::new(orig, crate::tunnel::Tunnel::Plain, telemetry);
            Arc::new(Reconciler::new(Flaky(log), proxy, None, "/nonexistent".into()))
        }
    }

    /// Two local pods (`web` enrolled, `plain` not) on loopback addresses
    /// of their own, 127.77.<net>.x.
    fn two_pods(net: u8) -> ConfigFile {
        serde_norway::from_str(&format!(
            "node: n1\nworkloads:\n  - {{uid: web, name: web, node: n1, ip: 127.77.{net}.2, enrolled: true}}\n  - {{uid: plain, name: plain, node: n1, ip: 127.77.{net}.3, enrolled: false}}\n"
        ))
        .unwrap()
    }

    /// Node n1 with `web` (a workload at 10.77.<net>.2) and three pods
    /// without an address: `fresh` and `other` (enrolled), `plain` (not);
    /// `addressed` gives some of them theirs (uid, ip), as ferry-control
    /// does once the kubelet has reported them.
    fn pending_pods(net: u8, addressed: &[(&str, &str)]) -> ConfigFile {
        let mut y =
            format!("node: n1\nworkloads:\n  - {{uid: web, name: web, node: n1, ip: 10.77.{net}.2, enrolled: true}}\n");
        let pods = [("fresh", true), ("other", true), ("plain", false)];
        for (uid, enrolled) in pods {
            if let Some((_, ip)) = addressed.iter().find(|(u, _)| *u == uid) {
                y += &format!(
                    "  - {{uid: {uid}, name: {uid}, node: n1, ip: {ip}, enrolled: {enrolled}, labels: {{app: {uid}}}}}\n"
                );
            }
        }
        y += "pendingPods:\n";
        for (uid, enrolled) in pods {
            if !addressed.iter().any(|(u, _)| *u == uid) {
                y += &format!(
                    "  - {{uid: {uid}, name: {uid}, node: n1, enrolled: {enrolled}, labels: {{app: {uid}}}}}\n"
                );
            }
        }
        let cfg = ConfigFile::parse("pending", &y).unwrap();
        assert!(!cfg.pending_pods.is_empty() || addressed.len() == 3);
        cfg
    }

    fn added(uid: &str, container: &str, netns: &Path, ips: &[&str]) -> PodInfo {
        PodInfo {
            ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
            ..pod(uid, uid, container, &netns.display().to_string())
        }
    }

    #[tokio::test]
    async fn a_pending_pod_is_captured_at_the_address_its_add_gives() {
        let dir = Scratch::new("pending");
        let (ns1, ns2, ns3) = (dir.netns("ns1"), dir.netns("ns2"), dir.netns("ns3"));
        let log = Arc::new(Mutex::new(flaky::Log::default()));
        let r = flaky::reconciler(log.clone());
        r.reconcile(pending_pods(5, &[])).await;
        assert!(matches!(
            r.capture_of(&pod("web", "web", "", "")),
            Capture::Captured { .. }
        ));
        let fresh_at = |ips: &[&str]| added("fresh", "c1", &ns1, ips);

        // Not enrolled: notInMesh at once, whatever the ADD carries; nothing learned.
        let plain = added("plain", "p1", &ns3, &["10.77.5.9"]);
        r.add_sandbox(&plain).await;
        assert_eq!(
            r.capture_of(&plain),
            Capture::NotInMesh(
                "pod default/plain is not enrolled (no ferry.dev/mesh opt-in for it or its namespace)".into()
            )
        );
        assert!(!r.proxy.state().workloads.contains_key("plain"));
        // No usable IPv4 address in the ADD: pending, and why.
        for (ips, why) in [
            (&[][..], "the runtime gave it no IPv4 address (prevResult.ips: none)"),
            (&["fd00::7"][..], "no IPv4 address (prevResult.ips: fd00::7)"),
            (
                &["10.77.5.3", "10.77.5.4"][..],
                "several IPv4 addresses (10.77.5.3, 10.77.5.4)",
            ),
            (&["0.0.0.0"][..], "0.0.0.0, which is not a pod address"),
            (
                &["10.77.5.2"][..],
                "10.77.5.2, which the config has for pod default/web",
            ),
        ] {
            r.add_sandbox(&fresh_at(ips)).await;
            match r.capture_of(&fresh_at(ips)) {
                Capture::Pending(w) => assert!(w.contains(why) && w.contains("default/fresh"), "{ips:?}: {w}"),
                other => panic!("{ips:?}: {other:?}"),
            }
            assert!(r.inner.lock().await.learned.is_empty(), "{ips:?}");
        }
        let plumbed = |uid: &str| -> Vec<Option<PathBuf>> {
            let log = log.lock().unwrap();
            log.plumbed
                .iter()
                .filter(|(u, _)| u == uid)
                .map(|(_, n)| n.clone())
                .collect()
        };
        assert!(plumbed("fresh").is_empty());

        // Exactly one IPv4 address: learned, the pod is a workload there and
        // enrolled in the ADD's netns.
        let add = fresh_at(&["10.77.5.3", "fd00::3"]);
        r.add_sandbox(&add).await;
        assert!(
            matches!(r.capture_of(&add), Capture::Captured { .. }),
            "{:?}",
            r.capture_of(&add)
        );
        let state = r.proxy.state();
        assert_eq!(state.workloads["fresh"].ip.to_string(), "10.77.5.3");
        assert!(!state.pending.contains_key("fresh") && state.pending.contains_key("other"));
        assert!(state
            .mesh_destinations()
            .contains_key(&("10.77.5.3".parse().unwrap(), 0)));
        assert_eq!(plumbed("fresh"), vec![Some(ns1.clone())]);
        let st = |uid: &str| r.pod_status().into_iter().find(|s| s.uid == uid).unwrap();
        assert!(st("fresh").enrolled && st("fresh").ip_learned && st("fresh").ip == "10.77.5.3");
        // The same ADD again (the runtime retrying): nothing changes.
        r.add_sandbox(&add).await;
        assert_eq!(plumbed("fresh").len(), 1);
        // The same sandbox announced again with another address (the
        // runtime ran the chain again): the newer one is used at once.
        let moved = fresh_at(&["10.77.5.8"]);
        r.add_sandbox(&moved).await;
        let until = Instant::now() + Duration::from_secs(5);
        while !matches!(r.capture_of(&moved), Capture::Captured { .. }) {
            assert!(Instant::now() < until, "{:?}", r.capture_of(&moved));
            tokio::time::sleep(Duration::from_millis(100)).await;
            r.retry_failed().await;
        }
        assert_eq!(r.proxy.state().workloads["fresh"].ip.to_string(), "10.77.5.8");

        // DEL of that sandbox: unenrolled, the address dropped, pending again.
        r.delete_sandbox(&added("fresh", "c1", &ns1, &[])).await;
        assert!(r.inner.lock().await.learned.is_empty());
        assert!(r.proxy.state().pending.contains_key("fresh"));
        assert!(!r
            .proxy
            .state()
            .mesh_destinations()
            .contains_key(&("10.77.5.8".parse().unwrap(), 0)));
        assert!(matches!(r.capture_of(&add), Capture::Pending(w) if w.contains("deleted")));
        // (Once for the move to the newer address, once for the DEL.)
        assert_eq!(log.lock().unwrap().unsteered, vec!["fresh".to_owned(); 2]);
        // A new sandbox (new address): learned again, captured again.
        let again = added("fresh", "c2", &ns2, &["10.77.5.5"]);
        r.add_sandbox(&again).await;
        let until = Instant::now() + Duration::from_secs(5);
        while !matches!(r.capture_of(&again), Capture::Captured { .. }) {
            // (Both "netns" are the host's here: the old listeners may take a
            // moment to close; the backoff retries.)
            assert!(Instant::now() < until, "{:?}", r.capture_of(&again));
            tokio::time::sleep(Duration::from_millis(100)).await;
            r.retry_failed().await;
        }
        assert_eq!(r.proxy.state().workloads["fresh"].ip.to_string(), "10.77.5.5");

        // ferry-control catches up with the same address: the learned entry
        // is dropped and the pod stays captured as it was (not re-enrolled).
        let plumbs = plumbed("fresh").len();
        let Capture::Captured { pod_id } = r.capture_of(&again) else {
            unreachable!()
        };
        r.reconcile(pending_pods(5, &[("fresh", "10.77.5.5")])).await;
        assert!(r.inner.lock().await.learned.is_empty());
        assert_eq!(r.capture_of(&again), Capture::Captured { pod_id });
        assert_eq!(plumbed("fresh").len(), plumbs, "not enrolled again");
        assert!(!st("fresh").ip_learned);

        // Another pod learned at one address, then the control plane has it
        // at another: the control plane's is used (the pod re-enrolled there).
        let other = added("other", "o1", &ns3, &["10.77.5.6"]);
        r.add_sandbox(&other).await;
        assert!(matches!(r.capture_of(&other), Capture::Captured { .. }));
        r.reconcile(pending_pods(5, &[("fresh", "10.77.5.5"), ("other", "10.77.5.7")]))
            .await;
        assert!(r.inner.lock().await.learned.is_empty());
        assert_eq!(r.proxy.state().workloads["other"].ip.to_string(), "10.77.5.7");
        assert!(
            matches!(r.capture_of(&other), Capture::Pending(w) if w.contains("at 10.77.5.7, the runtime gave it 10.77.5.6")),
            "{:?}",
            r.capture_of(&other)
        );
        let at_config = added("other", "o1", &ns3, &["10.77.5.7"]);
        let until = Instant::now() + Duration::from_secs(5);
        while !matches!(r.capture_of(&at_config), Capture::Captured { .. }) {
            assert!(Instant::now() < until, "{:?}", r.capture_of(&at_config));
            tokio::time::sleep(Duration::from_millis(100)).await;
            r.retry_failed().await;
        }
        r.stop_listeners().await;
    }

    /// A restarted (or successor) agent keeps a pod captured at the address
    /// its ADD gave, from the file the previous one kept them in, until
    /// ferry-control has one; without the file it could not (positive
    /// control: the same restart without it leaves the pod pending).
    #[tokio::test]
    async fn learned_addresses_outlive_a_restart_through_their_file() {
        let dir = Scratch::new("learned");
        let ns = dir.netns("ns1");
        let file = dir.0.join("state.learned.json");
        let log = Arc::new(Mutex::new(flaky::Log::default()));

        let first = flaky::reconciler(log.clone());
        first.keep_learned_in(file.clone()).await;
        first.reconcile(pending_pods(6, &[])).await;
        let add = added("fresh", "c1", &ns, &["10.77.6.3"]);
        first.add_sandbox(&add).await;
        assert!(matches!(first.capture_of(&add), Capture::Captured { .. }));
        let saved: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        assert_eq!(saved["fresh"]["ip"], "10.77.6.3", "{saved}");
        // (The fake node's listeners are the host's: close them first.)
        first.stop_listeners().await;
        drop(first);

        // Restarted without the file: the config alone has no address for it.
        let bare = flaky::reconciler(log.clone());
        bare.reconcile(pending_pods(6, &[])).await;
        assert!(bare.proxy.state().pending.contains_key("fresh"));
        assert!(!matches!(bare.capture_of(&add), Capture::Captured { .. }));
        bare.stop_listeners().await;
        drop(bare);

        // Restarted with it: a workload at the learned address, enrolled.
        let second = flaky::reconciler(log.clone());
        second.keep_learned_in(file.clone()).await;
        second.reconcile(pending_pods(6, &[])).await;
        assert_eq!(second.proxy.state().workloads["fresh"].ip.to_string(), "10.77.6.3");
        let until = Instant::now() + Duration::from_secs(5);
        while !matches!(second.capture_of(&add), Capture::Captured { .. }) {
            assert!(Instant::now() < until, "{:?}", second.capture_of(&add));
            tokio::time::sleep(Duration::from_millis(100)).await;
            second.retry_failed().await;
        }
        // The DEL of that sandbox reaches the restarted agent (which never
        // saw its ADD): the address goes, from the file too; a new ADD
        // brings it back.
        second.delete_sandbox(&added("fresh", "c1", &PathBuf::new(), &[])).await;
        assert!(second.inner.lock().await.learned.is_empty());
        assert!(second.proxy.state().pending.contains_key("fresh"));
        let saved: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        assert_eq!(saved, serde_json::json!({}));
        let again = added("fresh", "c2", &ns, &["10.77.6.3"]);
        second.add_sandbox(&again).await;
        let until = Instant::now() + Duration::from_secs(5);
        while !matches!(second.capture_of(&again), Capture::Captured { .. }) {
            assert!(Instant::now() < until, "{:?}", second.capture_of(&again));
            tokio::time::sleep(Duration::from_millis(100)).await;
            second.retry_failed().await;
        }
        // ferry-control catches up: dropped from memory and from the file.
        second.reconcile(pending_pods(6, &[("fresh", "10.77.6.3")])).await;
        assert!(second.inner.lock().await.learned.is_empty());
        let saved: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        assert_eq!(saved, serde_json::json!({}));
        // An unreadable file is set aside, not fatal.
        std::fs::write(&file, "not json").unwrap();
        let third = flaky::reconciler(log);
        third.keep_learned_in(file.clone()).await;
        third.reconcile(pending_pods(6, &[])).await;
        assert!(third.proxy.state().pending.contains_key("fresh"));
        second.stop_listeners().await;
        third.stop_listeners().await;
    }

    #[tokio::test]
    async fn a_learned_address_goes_when_the_pod_leaves_the_config_and_add_is_answered() {
        let dir = Scratch::new("pending-cni");
        let ns = dir.netns("ns");
        let log = Arc::new(Mutex::new(flaky::Log::default()));
        let r = flaky::reconciler(log.clone());
        let ask = |pod: PodInfo, timeout_ms: u64| ferry_model::cni::Request {
            version: ferry_model::cni::PROTOCOL_VERSION,
            op: ferry_model::cni::Op::Add,
            pod,
            timeout_ms,
        };
        // ADD before the config names the pod at all: it waits; the config
        // then has it pending, and the address from that ADD captures it.
        let fresh = added("fresh", "c1", &ns, &["10.77.8.3"]);
        let answer = tokio::spawn({
            let r = r.clone();
            let fresh = fresh.clone();
            async move { crate::cni::answer(&*r, ask(fresh, 5_000)).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!answer.is_finished(), "no word of the pod yet: ADD waits");
        r.reconcile(pending_pods(8, &[])).await;
        let reply = tokio::time::timeout(Duration::from_secs(5), answer)
            .await
            .unwrap()
            .unwrap();
        assert!(
            matches!(reply, Some(ferry_model::cni::Reply::Captured { .. })),
            "{reply:?}"
        );
        assert_eq!(r.proxy.state().workloads["fresh"].ip.to_string(), "10.77.8.3");
        // Not enrolled: answered at once.
        let started = Instant::now();
        let reply = crate::cni::answer(&*r, ask(added("plain", "p1", &ns, &["10.77.8.9"]), 5_000)).await;
        assert!(
            matches!(reply, Some(ferry_model::cni::Reply::NotInMesh { .. })),
            "{reply:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(1));
        // No IPv4 address: fails at its deadline, saying why.
        let reply = crate::cni::answer(&*r, ask(added("other", "o1", &ns, &[]), 300)).await;
        match reply {
            Some(ferry_model::cni::Reply::Failed { reason }) => assert!(
                reason.starts_with("not captured within 300 ms: pod default/other has no address")
                    && reason.contains("no IPv4 address"),
                "{reason}"
            ),
            other => panic!("{other:?}"),
        }
        // The pod leaves the config: its address is dropped, it is unenrolled.
        let mut gone = pending_pods(8, &[]);
        gone.pending_pods.retain(|p| p.uid != "fresh");
        r.reconcile(gone).await;
        assert!(r.inner.lock().await.learned.is_empty());
        assert!(!r.proxy.state().workloads.contains_key("fresh"));
        assert_eq!(log.lock().unwrap().unsteered, vec!["fresh".to_owned()]);
        r.stop_listeners().await;
    }

    fn pod(uid: &str, name: &str, container: &str, netns: &str) -> PodInfo {
        PodInfo {
            uid: uid.into(),
            namespace: "default".into(),
            name: name.into(),
            container_id: container.into(),
            netns: netns.into(),
            ips: Vec::new(),
        }
    }

    #[tokio::test]
    async fn a_failed_enrollment_is_retried_without_a_config_change() {
        let log = Arc::new(Mutex::new(flaky::Log {
            broken: vec!["web".into()],
            ..Default::default()
        }));
        let r = flaky::reconciler(log.clone());
        let web = pod("web", "web", "c1", "");
        assert!(matches!(r.capture_of(&web), Capture::Pending(w) if w.contains("no config")));
        r.reconcile(two_pods(1)).await;
        assert!(matches!(r.capture_of(&web), Capture::Failing(e) if e.contains("no process")));
        assert_eq!(
            r.capture_of(&pod("plain", "plain", "c2", "")),
            Capture::NotInMesh(
                "pod default/plain is not enrolled (no ferry.dev/mesh opt-in for it or its namespace)".into()
            )
        );
        assert!(matches!(r.capture_of(&pod("nobody", "x", "c3", "")), Capture::Pending(w) if w.contains("no word")));
        // Not due yet: nothing tried.
        assert_eq!(r.retry_failed().await, 0);
        let mut changes = r.changes();
        let looping = tokio::spawn(r.clone().retry_loop());
        // Still broken: retried after 500 ms, then after 1 s more.
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(log.lock().unwrap().plumbed.len(), 2);
        log.lock().unwrap().broken.clear();
        let until = Instant::now() + Duration::from_secs(5);
        while !matches!(r.capture_of(&web), Capture::Captured { .. }) {
            assert!(
                Instant::now() < until,
                "not enrolled on retry: {:?}",
                r.capture_of(&web)
            );
            let _ = tokio::time::timeout(Duration::from_millis(100), changes.changed()).await;
        }
        assert_eq!(log.lock().unwrap().plumbed.len(), 3, "500 ms, then 1 s: two retries");
        assert_eq!(r.proxy.telemetry.metrics.enroll_retries.get(), 2);
        assert_eq!(r.proxy.telemetry.metrics.enroll_errors.get(), 0);
        assert!(r.retries.lock().unwrap().is_empty());
        looping.abort();
        r.stop_listeners().await;
    }

    #[tokio::test]
    async fn sandboxes_from_the_runtime_enroll_move_and_unenroll_pods() {
        let dir = Scratch::new("sandbox");
        let (ns1, ns2) = (dir.netns("ns1"), dir.netns("ns2"));
        let s = |p: &PathBuf| p.display().to_string();
        let log = Arc::new(Mutex::new(flaky::Log {
            broken: vec!["web".into()],
            ..Default::default()
        }));
        let r = flaky::reconciler(log.clone());
        // ADD before the config names the pod: remembered, nothing to do yet.
        r.add_sandbox(&pod("web", "web", "c1", &s(&ns1))).await;
        assert!(log.lock().unwrap().plumbed.is_empty());
        r.reconcile(two_pods(2)).await;
        assert_eq!(log.lock().unwrap().plumbed, vec![("web".to_owned(), Some(ns1.clone()))]);
        // The sandbox's process starts; a second ADD (the runtime retrying)
        // enrolls it at once, in the runtime's netns.
        log.lock().unwrap().broken.clear();
        r.add_sandbox(&pod("web", "web", "c1", &s(&ns1))).await;
        assert_eq!(
            r.capture_of(&pod("web", "web", "c1", "")),
            Capture::Captured { pod_id: 1 }
        );
        // The same sandbox again: nothing changes.
        r.add_sandbox(&pod("web", "web", "c1", &s(&ns1))).await;
        assert_eq!(log.lock().unwrap().plumbed.len(), 2);
        // A new sandbox whose old one's DEL never came: moved into it.
        r.add_sandbox(&pod("web", "web", "c2", &s(&ns2))).await;
        assert_eq!(log.lock().unwrap().unsteered, vec!["web".to_owned()]);
        assert_eq!(log.lock().unwrap().plumbed.last().unwrap().1, Some(ns2.clone()));
        // (Here both "netns" are the host's: the old listeners close as
        // their aborted tasks are dropped, so the first try may find the
        // port still taken; the backoff retries it.)
        let until = Instant::now() + Duration::from_secs(5);
        while !matches!(r.capture_of(&pod("web", "web", "c2", "")), Capture::Captured { .. }) {
            assert!(
                Instant::now() < until,
                "{:?}",
                r.capture_of(&pod("web", "web", "c2", ""))
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
            r.retry_failed().await;
        }
        // The old sandbox's late DEL leaves the new one alone.
        r.delete_sandbox(&pod("web", "web", "c1", &s(&ns1))).await;
        assert!(matches!(
            r.capture_of(&pod("web", "web", "c2", "")),
            Capture::Captured { .. }
        ));
        // Its own DEL unenrolls it at once, and a reconcile does not bring it
        // back (the sandbox is gone); twice is fine.
        let plumbs = log.lock().unwrap().plumbed.len();
        r.delete_sandbox(&pod("web", "web", "c2", "")).await;
        r.delete_sandbox(&pod("web", "web", "c2", "")).await;
        assert_eq!(log.lock().unwrap().unsteered.len(), 2);
        assert!(matches!(r.capture_of(&pod("web", "web", "c2", "")), Capture::Pending(w) if w.contains("deleted")));
        r.reconcile(two_pods(2)).await;
        assert_eq!(log.lock().unwrap().plumbed.len(), plumbs);
        assert!(r.pod_status().iter().all(|p| !p.enrolled && p.error.is_none()));
        // The pod leaves the config: what was known of its sandbox goes too.
        r.reconcile(serde_norway::from_str("node: n1\n").unwrap()).await;
        assert!(r.sandboxes.lock().unwrap().is_empty());
        // An IP the config does not have for the pod: not captured yet.
        r.reconcile(two_pods(2)).await;
        let mut moved = pod("web", "web", "c3", &s(&ns1));
        moved.ips = vec!["127.77.2.99".parse().unwrap()];
        assert!(matches!(r.capture_of(&moved), Capture::Pending(w) if w.contains("runtime gave it 127.77.2.99")));
        r.stop_listeners().await;
    }

    #[test]
    fn capacity_counts_local_pods_and_every_mesh_destination() {
        let cap = Capacity {
            pods: 2,
            mesh_destinations: 5,
        };
        // Exactly full: 2 local pods; 3 pods (any node) + 2 VIP:ports.
        assert_eq!(check_capacity(cap, &state(2, 2)), Ok(()));
        assert_eq!(
            check_capacity(cap, &state(2, 3)),
            Err(Refused::Capacity(vec![Overflow::MeshDestinations {
                wanted: 6,
                capacity: 5
            }]))
        );
        // Every overflow is reported, and the reason names the maps.
        let err = check_capacity(cap, &state(3, 3)).unwrap_err();
        assert_eq!(
            err,
            Refused::Capacity(vec![
                Overflow::Pods { wanted: 3, capacity: 2 },
                Overflow::MeshDestinations { wanted: 7, capacity: 5 },
            ])
        );
        let why = err.to_string();
        assert!(why.contains("nothing applied") && why.contains("ferry_pods") && why.contains("ferry_mesh_dst"));
        assert_eq!(check_capacity(Capacity::EBPF, &state(3, 3)), Ok(()));
    }
}
