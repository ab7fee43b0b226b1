//! The node under the reconciler: finding a pod's cgroup and netns, its
//! network set-up, and the eBPF steering. [`Node`] is the seam (the
//! reconciler's tests drive a loopback node); [`EbpfNode`] is the real one,
//! the only user of `ferry_ebpf`'s loader in the agent.

use std::{
    collections::BTreeMap,
    future::Future,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::AsFd,
    path::{Path, PathBuf},
    sync::Arc,
};

use ferry_ebpf::{cgroup, maps, PodHooks, RedirectError, Redirector};
use ferry_model::{admission::Fallback, state::MeshDst, Settings, Workload};
use tokio::net::TcpListener;

use crate::{
    netns::Netns,
    podnet,
    proxy::{INBOUND_PORT, OUTBOUND_PORT, TUNNEL_PORT},
    sockets::{self, InPodSockets, SocketFactory},
};

pub const ADMIN_PORT: u16 = 15000;

// The gate (ferry-model) and sk_lookup (ferry.h) admit probes from one address.
const _: () = assert!(maps::PROBE_SOURCE.to_bits() == ferry_model::admission::PROBE_SOURCE.to_bits());

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
    #[error(
        "no workload certificate within {waited:?}: a pod taken over from the previous agent is \
         served only with one (the previous agent keeps serving it)"
    )]
    NoCertificate { waited: std::time::Duration },
    #[error("listener on {addr}: {source}")]
    Listen { addr: SocketAddrV4, source: std::io::Error },
    #[error(transparent)]
    PodNet(#[from] podnet::PodNetError),
    #[error(transparent)]
    Redirect(#[from] RedirectError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A pod made ready for its listeners: what the proxy needs of it, what the
/// status shows, and the node's own handle.
pub struct Plumbed<P> {
    pub sockets: Arc<dyn SocketFactory>,
    pub netns_cookie: u64,
    pub cgroup: Option<PathBuf>,
    pub netns: Option<PathBuf>,
    pub host_veth: Option<String>,
    pub handle: P,
}

/// Where a pod's listeners go, in its own netns.
pub fn listener_addrs(ip: Ipv4Addr) -> [SocketAddrV4; 3] {
    [
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, OUTBOUND_PORT),
        SocketAddrV4::new(ip, INBOUND_PORT),
        SocketAddrV4::new(ip, TUNNEL_PORT),
    ]
}

/// How much the node's maps hold: a desired state that needs more is refused
/// whole (the reconciler's `check_capacity`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    /// Enrolled pods on this node (`ferry_pods`, `ferry_inbound`,
    /// `ferry_inbound_policy`, `ferry_traffic`: one entry each per pod).
    pub pods: usize,
    /// Mesh destinations, service VIP:port and pod IPs (`ferry_mesh_dst`).
    pub mesh_destinations: usize,
}

impl Capacity {
    /// The sizes declared in ferry.h.
    pub const EBPF: Capacity = Capacity {
        pods: maps::MAX_PODS as usize,
        mesh_destinations: maps::MAX_MESH_DST as usize,
    };
}

/// What the reconciler does to the node.
pub trait Node: Send + 'static {
    type Pod: Send + Sync + 'static;
    /// Finds the pod and prepares its network (netns, reply path).
    fn plumb(
        &mut self,
        w: &Workload,
        cgroup_root: &Path,
    ) -> impl Future<Output = Result<Plumbed<Self::Pod>, EnrollError>> + Send;
    /// Starts steering the pod's traffic to its listeners (the last step of
    /// an enrollment: the listeners exist before the first steered connect).
    fn steer(
        &mut self,
        w: &Workload,
        pod_id: u32,
        pod: &Plumbed<Self::Pod>,
        inbound: &TcpListener,
    ) -> Result<(), EnrollError>;
    /// Stops steering a pod (and forgets its inbound fallback).
    fn unsteer(&mut self, uid: &str) -> Result<(), EnrollError>;
    /// What the node does with connections to pod `ip` while the agent
    /// cannot take them (`ferry_model::admission::fallback`); it must hold
    /// when the agent is gone. Set before the pod's steering is turned on and
    /// whenever its policy changes. A node without such a fallback (tests)
    /// has nothing to do.
    fn set_fallback(&mut self, _ip: Ipv4Addr, _fallback: Fallback) -> Result<(), EnrollError> {
        Ok(())
    }
    /// Forgets pod `ip`'s fallback (an enrollment that did not complete).
    fn clear_fallback(&mut self, _ip: Ipv4Addr) -> Result<(), EnrollError> {
        Ok(())
    }
    /// How much the node's maps hold (ferry.h's sizes unless the node says).
    fn capacity(&self) -> Capacity {
        Capacity::EBPF
    }
    /// Node-wide switches from the settings.
    fn configure(&mut self, settings: &Settings) -> Result<(), EnrollError>;
    /// What connect4/6 steer.
    fn set_mesh_destinations(&mut self, dsts: &BTreeMap<(Ipv4Addr, u16), MeshDst>) -> Result<(), EnrollError>;
    /// After the first apply: drops what an earlier run left for pods no
    /// longer enrolled.
    fn prune_stale(&mut self);
}

/// The real node: cgroups, netns, netlink and the eBPF programs.
pub struct EbpfNode {
    pub redirect: Redirector,
    /// The procfs pods' sysctls are written through (`--proc-root`).
    proc_root: PathBuf,
}

/// What the real node keeps of an enrolled pod.
pub struct EbpfPod {
    sockets: Arc<InPodSockets>,
    cgroup: PathBuf,
}

impl EbpfNode {
    /// Loads the programs for `node` (reusing its pins) and hooks the agent's own cgroup.
    pub fn load(pin_root: &Path, node: &str, proc_root: &Path) -> Result<Self, RedirectError> {
        // Legacy range: only programs of an older agent still attached during
        // an upgrade read it (ferry.h); deliveries are recognised by
        // `ferry_delivery`, filled by the hook on the agent's own cgroup.
        let (lo, hi) = sockets::LEGACY_DELIVER_PORTS;
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
        let mut r = Redirector::load(pin_root, node, cfg)?;
        // Required: without the hook on its own cgroup the agent's deliveries
        // would not be recognised, and sk_lookup would capture them (a loop).
        let cg = cgroup::own_cgroup().map_err(|source| RedirectError::Open {
            what: "the agent's own cgroup (/proc/self/cgroup)",
            path: PathBuf::from("/proc/self/cgroup"),
            source,
        })?;
        r.attach_agent_cgroup(&cg)?;
        Ok(Self {
            redirect: r,
            proc_root: proc_root.to_owned(),
        })
    }
}

impl Node for EbpfNode {
    type Pod = EbpfPod;

    async fn plumb(&mut self, w: &Workload, cgroup_root: &Path) -> Result<Plumbed<EbpfPod>, EnrollError> {
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
        podnet::setup(&netns, &self.proc_root).await?;
        let host_veth = match &w.host_veth {
            Some(v) => Some(v.clone()),
            None => podnet::host_veth(&netns).await,
        };
        let path = netns.path().to_owned();
        let sockets = Arc::new(InPodSockets { netns });
        Ok(Plumbed {
            sockets: sockets.clone(),
            netns_cookie: cookie,
            cgroup: Some(cg.clone()),
            netns: Some(path),
            host_veth,
            handle: EbpfPod { sockets, cgroup: cg },
        })
    }

    fn steer(
        &mut self,
        w: &Workload,
        pod_id: u32,
        pod: &Plumbed<EbpfPod>,
        inbound: &TcpListener,
    ) -> Result<(), EnrollError> {
        self.redirect.enroll(&PodHooks {
            uid: &w.uid,
            pod_id,
            cgroup: &pod.handle.cgroup,
            netns: pod.handle.sockets.netns.as_fd(),
            netns_cookie: pod.netns_cookie,
            ip: w.ip,
            host_veth: pod.host_veth.as_deref(),
            inbound_listener: inbound,
        })?;
        Ok(())
    }

    fn unsteer(&mut self, uid: &str) -> Result<(), EnrollError> {
        Ok(self.redirect.unenroll(uid)?)
    }

    fn set_fallback(&mut self, ip: Ipv4Addr, fallback: Fallback) -> Result<(), EnrollError> {
        let mode = match fallback {
            Fallback::Refuse => maps::INBOUND_STRICT,
            Fallback::Deliver => maps::INBOUND_PERMISSIVE,
        };
        Ok(self.redirect.set_inbound_policy(ip, mode)?)
    }

    fn clear_fallback(&mut self, ip: Ipv4Addr) -> Result<(), EnrollError> {
        Ok(self.redirect.remove_inbound_policy(ip)?)
    }

    fn capacity(&self) -> Capacity {
        let r = &self.redirect;
        Capacity {
            pods: ["ferry_pods", "ferry_inbound", "ferry_inbound_policy", "ferry_traffic"]
                .map(|m| r.max_entries(m))
                .into_iter()
                .min()
                .unwrap_or(0),
            mesh_destinations: r.max_entries("ferry_mesh_dst"),
        }
    }

    fn configure(&mut self, settings: &Settings) -> Result<(), EnrollError> {
        let mut flags = 0;
        if settings.splice {
            flags |= maps::FLAG_SPLICE;
        }
        if settings.events {
            flags |= maps::FLAG_EVENTS;
        }
        Ok(self.redirect.set_flags(flags)?)
    }

    fn set_mesh_destinations(&mut self, dsts: &BTreeMap<(Ipv4Addr, u16), MeshDst>) -> Result<(), EnrollError> {
        let kinds = dsts
            .iter()
            .map(|(k, d)| {
                let kind = match d {
                    MeshDst::Service => maps::DST_SERVICE,
                    MeshDst::Pod => maps::DST_POD,
                };
                (*k, kind)
            })
            .collect();
        Ok(self.redirect.set_mesh_destinations(&kinds)?)
    }

    fn prune_stale(&mut self) {
        self.redirect.prune_stale_links();
        // Map entries of pods that departed while no agent ran (a restart).
        self.redirect.prune_stale_entries();
    }
}
