//! The agent: applies a desired state (from the control plane's stream or a
//! config file) by enrolling and unenrolling local pods and refreshing the
//! eBPF maps, and owns the proxy's per-pod listener tasks.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddrV4,
    path::{Path, PathBuf},
    sync::{atomic::Ordering, Arc, RwLock},
};

use serde::Serialize;
use tokio::task::AbortHandle;

use crate::{
    cgroup,
    config::{ConfigFile, Workload},
    netns::Netns,
    podnet,
    proxy::{inbound, outbound, PodCtx, Proxy, INBOUND_PORT, OUTBOUND_PORT},
    redirect::{self, maps, PodHooks, Redirector},
    sockets,
    state::State,
    telemetry::Telemetry,
    tunnel::{Tunnel, TUNNEL_PORT},
};

pub const ADMIN_PORT: u16 = 15000;

#[derive(Clone, Debug)]
pub struct Options {
    /// bpffs directory holding one sub-directory per node.
    pub pin_root: PathBuf,
    /// Fallback cgroup root when the config has none (kubelet's kubepods).
    pub cgroup_root: PathBuf,
    /// The CA to get workload certificates from; with it the tunnel is mTLS
    /// (HBONE), without it plain (development, benchmarks).
    pub identity: Option<crate::identity::Options>,
}

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("no cgroup for pod uid {uid} under {root}")]
    NoCgroup { uid: String, root: PathBuf },
    #[error("cannot find the pod's network namespace: {0}")]
    NoNetns(String),
    #[error(
        "port {port} is already in use in the pod's network namespace; Ferry reserves ports \
         15001, 15006 and 15008 in enrolled pods: move the application off them or opt the pod out"
    )]
    PortInUse { port: u16 },
    #[error("listener on {addr}: {source}")]
    Listen { addr: SocketAddrV4, source: std::io::Error },
    #[error(transparent)]
    PodNet(#[from] podnet::PodNetError),
    #[error(transparent)]
    Redirect(#[from] redirect::RedirectError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

struct Enrolled {
    ctx: Arc<PodCtx>,
    pod_id: u32,
    cgroup: PathBuf,
    tasks: Vec<AbortHandle>,
}

impl Drop for Enrolled {
    fn drop(&mut self) {
        // Stops the listeners; connections already accepted run to completion.
        self.tasks.iter().for_each(AbortHandle::abort);
    }
}

/// What `/config_dump` and `ferryctl workloads` show about a local pod.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct PodStatus {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub ip: String,
    pub enrolled: bool,
    pub pod_id: Option<u32>,
    pub netns_cookie: Option<u64>,
    pub cgroup: Option<String>,
    pub netns: Option<String>,
    pub host_veth: Option<String>,
    pub error: Option<String>,
}

pub struct Agent {
    pub proxy: Arc<Proxy>,
    redirect: tokio::sync::Mutex<Redirector>,
    enrolled: tokio::sync::Mutex<HashMap<String, Enrolled>>,
    status: RwLock<BTreeMap<String, PodStatus>>,
    opts: Options,
    next_pod_id: std::sync::atomic::AtomicU32,
    pub ids: Option<Arc<crate::identity::Identities>>,
    /// The config stream's state (None: standalone, config from a file).
    pub control: RwLock<Option<crate::discovery::client::ControlStatus>>,
    /// Version of the last config fully applied (0: none yet). Published
    /// last, so "applied" means every enrollment of that version is done.
    applied: std::sync::atomic::AtomicU64,
}

/// Whether an enrolled pod still matches its spec (a veth the agent found
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

impl Agent {
    /// Loads the programs for `node` and hooks the agent's own cgroup.
    pub fn new(node: &str, opts: Options) -> Result<Arc<Self>, redirect::RedirectError> {
        let (lo, hi) = sockets::DELIVER_PORTS;
        let cfg = maps::Config {
            flags: maps::FLAG_EVENTS,
            agent_mark: sockets::AGENT_MARK,
            outbound_port: OUTBOUND_PORT,
            inbound_port: INBOUND_PORT,
            tunnel_port: TUNNEL_PORT,
            admin_port: ADMIN_PORT,
            deliver_port_lo: lo,
            deliver_port_hi: hi,
            deliver_mark: sockets::DELIVER_MARK,
        };
        let mut r = Redirector::load(&opts.pin_root, node, cfg)?;
        match cgroup::own_cgroup() {
            Ok(cg) => r.attach_agent_cgroup(&cg)?,
            Err(e) => tracing::warn!(error = %e, "agent cgroup unknown: splicing cannot be used"),
        }
        if let Some(ring) = r.take_events() {
            tokio::spawn(redirect::events::run(ring, node.to_owned()));
        }
        let ids = opts.identity.clone().map(crate::identity::Identities::new);
        let hbone = ids
            .as_ref()
            .map(|ids| Arc::new(crate::tunnel::hbone::Hbone::new(ids.clone())));
        let proxy = Arc::new(Proxy {
            state: RwLock::new(Arc::new(State::default())),
            pods: RwLock::new(HashMap::new()),
            orig: r.orig_dst(),
            tunnel: hbone.clone().map_or(Tunnel::Plain, Tunnel::Hbone),
            telemetry: Telemetry::new(opts.pin_root.clone(), node.to_owned(), hbone),
        });
        Ok(Arc::new(Self {
            proxy,
            redirect: tokio::sync::Mutex::new(r),
            enrolled: tokio::sync::Mutex::new(HashMap::new()),
            status: RwLock::new(BTreeMap::new()),
            opts,
            next_pod_id: 1.into(),
            applied: 0.into(),
            ids,
            control: RwLock::new(None),
        }))
    }

    pub fn state(&self) -> Arc<State> {
        self.proxy.state()
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

    pub async fn pin_dir(&self) -> PathBuf {
        self.redirect.lock().await.pin_dir().to_owned()
    }

    /// Makes the node match `cfg`. Pods that fail to enroll are reported in
    /// their status and left uncaptured; the rest proceed.
    pub async fn apply(&self, cfg: ConfigFile) {
        let first = self.state().version == 0;
        let state = Arc::new(State::from_config(cfg, self.state().version + 1));
        let mut redirect = self.redirect.lock().await;
        let mut enrolled = self.enrolled.lock().await;
        let mut flags = 0;
        if state.settings.splice {
            flags |= maps::FLAG_SPLICE;
        }
        if state.settings.events {
            flags |= maps::FLAG_EVENTS;
        }
        if let Err(e) = redirect.set_flags(flags) {
            tracing::error!(error = %e, "cannot update eBPF settings");
        }

        let want: HashMap<&str, &Workload> = state.local_enrolled().map(|w| (w.uid.as_str(), w)).collect();
        let gone: Vec<String> = enrolled
            .iter()
            .filter(|(uid, e)| want.get(uid.as_str()).is_none_or(|w| !same_pod(w, &e.ctx.workload)))
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in gone {
            if let Some(e) = enrolled.remove(&uid) {
                self.proxy.pods.write().unwrap_or_else(|e| e.into_inner()).remove(&uid);
                if let Some(ids) = &self.ids {
                    ids.forget(&uid);
                }
                if let Err(err) = redirect.unenroll(&uid) {
                    tracing::error!(pod = %e.ctx.label(), error = %err, "unenroll failed");
                }
                tracing::info!(pod = %e.ctx.label(), "pod unenrolled");
            }
        }
        *self.proxy.state.write().unwrap_or_else(|e| e.into_inner()) = state.clone();

        let cgroup_root = state
            .settings
            .cgroup_root
            .clone()
            .unwrap_or_else(|| self.opts.cgroup_root.clone());
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
            if w.enrolled && !enrolled.contains_key(&w.uid) {
                match self.enroll(&mut redirect, w, &cgroup_root).await {
                    Ok(e) => {
                        tracing::info!(pod = %e.ctx.label(), pod_id = e.pod_id, ip = %w.ip, "pod enrolled");
                        enrolled.insert(w.uid.clone(), e);
                    }
                    Err(err) => {
                        tracing::error!(pod = %format!("{}/{}", w.namespace, w.name), error = %err, "pod not enrolled");
                        st.error = Some(err.to_string());
                    }
                }
            }
            if let Some(e) = enrolled.get(&w.uid) {
                st.enrolled = true;
                st.pod_id = Some(e.pod_id);
                st.netns_cookie = Some(e.ctx.netns_cookie);
                st.cgroup = Some(e.cgroup.display().to_string());
                st.netns = Some(e.ctx.netns.path().display().to_string());
                st.host_veth = e.ctx.workload.host_veth.clone();
            }
            status.insert(w.uid.clone(), st);
        }
        let t = &self.proxy.telemetry;
        *t.access_log.write().unwrap_or_else(|e| e.into_inner()) = state.settings.access_log.clone();
        t.metrics_on.store(state.settings.metrics, Ordering::Relaxed);
        t.metrics.enrolled_pods.set(enrolled.len() as i64);
        t.metrics
            .enroll_errors
            .set(status.values().filter(|s| s.error.is_some()).count() as i64);
        t.metrics.config_version.set(state.version as i64);
        *self.status.write().unwrap_or_else(|e| e.into_inner()) = status;

        if let Err(e) = redirect.set_mesh_destinations(&state.mesh_destinations()) {
            tracing::error!(error = %e, "cannot update mesh destinations");
        }
        if first {
            redirect.prune_stale_links();
        }
        self.applied.store(state.version, Ordering::Release);
        tracing::info!(
            version = state.version,
            pods = enrolled.len(),
            services = state.services.len(),
            "config applied"
        );
    }

    async fn enroll(
        &self,
        redirect: &mut Redirector,
        w: &Workload,
        cgroup_root: &Path,
    ) -> Result<Enrolled, EnrollError> {
        let cg = cgroup::find_pod_cgroup(cgroup_root, &w.uid).ok_or_else(|| EnrollError::NoCgroup {
            uid: w.uid.clone(),
            root: cgroup_root.to_owned(),
        })?;
        let netns = match &w.netns {
            Some(p) => Netns::open(p).map_err(|e| EnrollError::NoNetns(format!("{}: {e}", p.display())))?,
            None => {
                let pid = cgroup::any_pid(&cg)
                    .ok_or_else(|| EnrollError::NoNetns(format!("no process in {}", cg.display())))?;
                Netns::of_pid(pid).map_err(|e| EnrollError::NoNetns(format!("pid {pid}: {e}")))?
            }
        };
        let cookie = netns.cookie()?;
        podnet::setup(&netns).await?;
        let host_veth = match &w.host_veth {
            Some(v) => Some(v.clone()),
            None => podnet::host_veth(&netns).await,
        };
        let listen = |addr: SocketAddrV4| {
            sockets::listen(Some(&netns), addr).map_err(|source| {
                if source.kind() == std::io::ErrorKind::AddrInUse {
                    EnrollError::PortInUse { port: addr.port() }
                } else {
                    EnrollError::Listen { addr, source }
                }
            })
        };
        let out_l = listen(SocketAddrV4::new([127, 0, 0, 1].into(), OUTBOUND_PORT))?;
        let in_l = listen(SocketAddrV4::new(w.ip, INBOUND_PORT))?;
        let tun_l = listen(SocketAddrV4::new(w.ip, TUNNEL_PORT))?;
        let pod_id = self.next_pod_id.fetch_add(1, Ordering::Relaxed);
        if let Some(ids) = &self.ids {
            // Have a certificate before steering starts, so the pod's first
            // cross-node connection can use it; keep_fresh retries if not.
            match tokio::time::timeout(std::time::Duration::from_secs(3), ids.fetch(&w.uid)).await {
                Ok(Ok(c)) => tracing::info!(pod = %w.name, spiffe_id = %c.spiffe_id, "workload certificate installed"),
                Ok(Err(e)) => tracing::warn!(pod = %w.name, error = %e, "no certificate yet"),
                Err(_) => tracing::warn!(pod = %w.name, "no certificate yet: the CA did not answer in 3s"),
            }
        }
        redirect.enroll(&PodHooks {
            uid: &w.uid,
            pod_id,
            cgroup: &cg,
            netns: &netns,
            netns_cookie: cookie,
            ip: w.ip,
            host_veth: host_veth.as_deref(),
            inbound_listener: &in_l,
        })?;
        let ctx = Arc::new(PodCtx {
            workload: Workload { host_veth, ..w.clone() },
            netns,
            netns_cookie: cookie,
        });
        self.proxy
            .pods
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(w.uid.clone(), ctx.clone());
        let p = &self.proxy;
        let mut tasks = vec![
            tokio::spawn(outbound::serve(p.clone(), ctx.clone(), out_l)).abort_handle(),
            tokio::spawn(inbound::serve(p.clone(), ctx.clone(), in_l, inbound::Kind::Plain)).abort_handle(),
            tokio::spawn(inbound::serve(p.clone(), ctx.clone(), tun_l, inbound::Kind::Tunnel)).abort_handle(),
        ];
        if let Some(ids) = &self.ids {
            tasks.push(ids.keep_fresh(w.uid.clone()));
        }
        Ok(Enrolled {
            ctx,
            pod_id,
            cgroup: cg,
            tasks,
        })
    }

    /// Stops accepting on every pod (steering stays pinned: see docs).
    pub async fn stop_listeners(&self) {
        self.enrolled.lock().await.clear();
    }

    /// Removes every pin of this node (uninstall).
    pub async fn remove_pins(&self) -> std::io::Result<()> {
        self.stop_listeners().await;
        let dir = self.pin_dir().await;
        redirect::remove_node_pins(&dir)
    }
}
