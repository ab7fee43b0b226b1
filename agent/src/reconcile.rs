//! The reconciler: makes the node match a desired state. Whoever produces
//! desired state (the control plane's stream, the config file) hands it to
//! [`Apply::apply`] and nothing else; the reconciler enrolls and unenrolls
//! local pods (listeners through the pod's socket factory, then steering),
//! swaps the proxy's state snapshot, refreshes the mesh destinations and
//! publishes each pod's status and the applied version.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, RwLock,
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
    node::{listener_addrs, EnrollError, Node, Plumbed},
    proxy::{Listeners, PodCtx, Proxy},
};

/// Takes a desired state and makes it so; returns the version applied.
pub trait Apply: Send + Sync {
    fn apply(&self, cfg: ConfigFile) -> BoxFuture<'_, u64>;
}

struct Enrolled<P> {
    ctx: Arc<PodCtx>,
    pod_id: u32,
    /// What the node does with the pod's inbound while the agent is away.
    fallback: Fallback,
    plumbed: Plumbed<P>,
    tasks: Vec<AbortHandle>,
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

    /// Makes the node match `cfg`. Pods that fail to enroll are reported in
    /// their status and left uncaptured; the rest proceed.
    pub async fn reconcile(&self, cfg: ConfigFile) -> u64 {
        let prev = self.proxy.state();
        let first = prev.version == 0;
        let state = Arc::new(State::from_config(cfg, prev.version + 1));
        let mut inner = self.inner.lock().await;
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
                        tracing::info!(pod = %e.ctx.label, fallback = ?fallback, "inbound fallback updated");
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
        if first {
            inner.node.prune_stale();
        }
        self.applied.store(state.version, Ordering::Release);
        tracing::info!(
            version = state.version,
            pods = inner.enrolled.len(),
            services = state.services.len(),
            "config applied"
        );
        state.version
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
    }

    async fn enroll(
        &self,
        inner: &mut Inner<N>,
        w: &Workload,
        cgroup_root: &Path,
        fallback: Fallback,
    ) -> Result<Enrolled<N::Pod>, EnrollError> {
        let plumbed = inner.node.plumb(w, cgroup_root).await?;
        let listen = |addr| {
            plumbed.sockets.listen(addr).map_err(|source| {
                if source.kind() == std::io::ErrorKind::AddrInUse {
                    EnrollError::PortInUse { port: addr.port() }
                } else {
                    EnrollError::Listen { addr, source }
                }
            })
        };
        let [out_a, in_a, tun_a] = listener_addrs(w.ip);
        let listeners = Listeners {
            outbound: listen(out_a)?,
            inbound: listen(in_a)?,
            tunnel: listen(tun_a)?,
        };
        let pod_id = inner.next_pod_id;
        inner.next_pod_id += 1;
        if let Some(ids) = &self.ids {
            // Have a certificate before steering starts, so the pod's first
            // cross-node connection can use it; keep_fresh retries if not.
            match tokio::time::timeout(Duration::from_secs(3), ids.fetch(&w.uid, &w.spiffe_id())).await {
                Ok(Ok(c)) => {
                    tracing::info!(pod = %w.label(), spiffe_id = %c.spiffe_id, "workload certificate installed")
                }
                Ok(Err(e)) => tracing::warn!(pod = %w.label(), error = %e, "no certificate yet"),
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
        let mut tasks = self.proxy.serve_pod(ctx.clone(), listeners);
        if let Some(ids) = &self.ids {
            tasks.push(ids.keep_fresh(w.uid.clone(), w.spiffe_id()));
        }
        Ok(Enrolled {
            ctx,
            pod_id,
            fallback,
            plumbed,
            tasks,
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
}
