//! The reconciler: makes the node match a desired state. Whoever produces
//! desired state (the control plane's stream, the config file) hands it to
//! [`Apply::apply`] and nothing else; the reconciler enrolls and unenrolls
//! local pods (listeners through the pod's socket factory, then steering),
//! swaps the proxy's state snapshot, refreshes the mesh destinations and
//! publishes each pod's status and the applied version.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddrV4,
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
    state::State,
    ConfigFile, Workload,
};
use futures::future::BoxFuture;
use tokio::task::AbortHandle;

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
}

pub struct Reconciler<N: Node> {
    inner: tokio::sync::Mutex<Inner<N>>,
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
            }),
            proxy,
            ids,
            cgroup_root,
            status: RwLock::new(BTreeMap::new()),
            applied: 0.into(),
            inherited: Mutex::new(HashMap::new()),
            taking_over: AtomicBool::new(false),
            retired: AtomicBool::new(false),
        }
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
        let prev = self.proxy.state();
        let first = prev.version == 0;
        let state = Arc::new(State::from_config(cfg, prev.version + 1));
        let mut inner = self.inner.lock().await;
        if self.retired.load(Ordering::Acquire) {
            tracing::info!("config not applied: this agent has handed over to a new one");
            return Ok(prev.version);
        }
        check_capacity(inner.node.capacity(), &state)?;
        if let Err(e) = inner.node.configure(&state.settings) {
            tracing::error!(error = %e, "cannot update node settings");
        }
        self.unenroll_gone(&mut inner, &state);
        self.proxy.set_state(state.clone());

        let cgroup_root = state
            .settings
            .cgroup_root
            .clone()
            .unwrap_or_else(|| self.cgroup_root.clone());
        let mut status = BTreeMap::new();
        for w in state.workloads.values().filter(|w| w.node == state.node) {
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
            };
            let fallback = admission::fallback(&state, w);
            if w.enrolled && !inner.enrolled.contains_key(&w.uid) {
                match self.enroll(&mut inner, w, &cgroup_root, fallback).await {
                    Ok(e) => {
                        tracing::info!(pod = %e.ctx.label, pod_id = e.pod_id, ip = %w.ip, "pod enrolled");
                        inner.enrolled.insert(w.uid.clone(), e);
                    }
                    Err(err) => {
                        tracing::error!(pod = %w.label(), error = %err, "pod not enrolled");
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
            status.insert(w.uid.clone(), st);
        }
        self.publish_telemetry(&state, inner.enrolled.len(), &status);
        *self.status.write().unwrap_or_else(|e| e.into_inner()) = status;

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
            if let Some(e) = inner.enrolled.remove(&uid) {
                self.proxy.remove_pod(&uid);
                if let Some(ids) = &self.ids {
                    ids.forget(&uid);
                }
                if let Err(err) = inner.node.unsteer(&uid) {
                    tracing::error!(pod = %e.ctx.label, error = %err, "unenroll failed");
                }
                tracing::info!(pod = %e.ctx.label, "pod unenrolled");
            }
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
        cgroup_root: &Path,
        fallback: Fallback,
    ) -> Result<Enrolled<N::Pod>, EnrollError> {
        let plumbed = inner.node.plumb(w, cgroup_root).await?;
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
