//! The composition root: builds the agent's parts for one node and wires
//! them (eBPF node, identities, tunnel, telemetry, proxy, reconciler). It
//! holds no logic of its own; the admin endpoint reads through it.

use std::{
    path::PathBuf,
    sync::{Arc, RwLock},
};

use ferry_model::admin::ControlStatus;

use crate::{
    identity::{self, Identities},
    node::EbpfNode,
    proxy::{orig_dst, Proxy},
    reconcile::Reconciler,
    telemetry::{metrics::Metrics, Counters, Telemetry},
    tunnel::{hbone::Hbone, Tunnel},
};

pub use crate::node::ADMIN_PORT;

#[derive(Clone, Debug)]
pub struct Options {
    /// bpffs directory holding one sub-directory per node.
    pub pin_root: PathBuf,
    /// Fallback cgroup root when the config has none (kubelet's kubepods).
    pub cgroup_root: PathBuf,
    /// The procfs pods' sysctls are written through (`podnet`).
    pub proc_root: PathBuf,
    /// The CA to get workload certificates from; with it the tunnel is mTLS
    /// (HBONE). Without it there is no tunnel, unless
    /// `insecure_plaintext_tunnel`.
    pub identity: Option<identity::Options>,
    /// Without a CA, run the unauthenticated plain tunnel between nodes
    /// (tests, benchmarks). Never in production: anyone who reaches a pod's
    /// port 15008 could then name any target.
    pub insecure_plaintext_tunnel: bool,
}

pub struct Agent {
    pub proxy: Arc<Proxy>,
    pub reconciler: Arc<Reconciler<EbpfNode>>,
    pub ids: Option<Arc<Identities>>,
    /// The config stream's state (None: standalone, config from a file);
    /// written by the stream client.
    pub control: Arc<RwLock<Option<ControlStatus>>>,
    pub pin_dir: PathBuf,
}

impl Agent {
    /// Loads the programs for `node` and builds everything around them.
    pub fn new(node: &str, opts: Options) -> Result<Arc<Self>, ferry_ebpf::RedirectError> {
        let mut ebpf = EbpfNode::load(&opts.pin_root, node, &opts.proc_root)?;
        if let Some(ring) = ebpf.redirect.take_events() {
            tokio::spawn(ferry_ebpf::events::run(ring, node.to_owned()));
        }
        let pin_dir = ebpf.redirect.pin_dir().to_owned();
        let orig = Arc::new(orig_dst::Ebpf(ebpf.redirect.orig_dst()));

        let ids = opts.identity.clone().map(Identities::new);
        let hbone = ids.as_ref().map(|ids| Arc::new(Hbone::new(ids.clone())));
        let counters = Arc::new(Counters::default());
        let mut metrics = Metrics::new(opts.pin_root.clone(), node.to_owned(), counters.clone());
        if let Some(h) = &hbone {
            h.spawn_sweeper();
        }
        if let (Some(h), Some(ids)) = (&hbone, &ids) {
            h.register_metrics(metrics.registry_mut());
            ids.register_metrics(metrics.registry_mut());
        }
        let telemetry = Arc::new(Telemetry::new(metrics, counters));
        let tunnel = match hbone {
            Some(h) => Tunnel::Hbone(h),
            None if opts.insecure_plaintext_tunnel => {
                tracing::warn!("no CA: running the UNAUTHENTICATED plaintext tunnel (--insecure-plaintext-tunnel)");
                Tunnel::Plain
            }
            None => {
                tracing::warn!("no CA: the tunnel between nodes is off (cross-node mesh connections are refused)");
                Tunnel::Off
            }
        };
        let proxy = Proxy::new(orig, tunnel, telemetry);
        let reconciler = Arc::new(Reconciler::new(
            ebpf,
            proxy.clone(),
            ids.clone(),
            opts.cgroup_root.clone(),
        ));
        Ok(Arc::new(Self {
            proxy,
            reconciler,
            ids,
            control: Arc::new(RwLock::new(None)),
            pin_dir,
        }))
    }

    /// Removes every pin of this node (uninstall).
    pub async fn remove_pins(&self) -> std::io::Result<()> {
        self.reconciler.stop_listeners().await;
        ferry_ebpf::remove_node_pins(&self.pin_dir)
    }
}
