//! ferry-agent: Ferry's per-node agent.
//!
//! eBPF programs (`ferry_ebpf`) steer an enrolled pod's connections to
//! listeners the agent opens *inside that pod's network namespace*; the
//! [`proxy`] forwards them to a local pod, through the [`tunnel`] to another
//! node, or directly, and takes every inbound connection through one gate.
//!
//! - [`agent`]: the composition root (builds and wires the parts);
//! - [`reconcile`]: makes the node match the desired state (enrollment),
//!   over the [`node`] seam (cgroups, netns, eBPF);
//! - [`config_stream`]: the control plane's stream, producing desired state;
//! - [`proxy`]: outbound, the one inbound path and its gate;
//! - [`tunnel`]: transport between nodes (plain or HBONE), no policy;
//! - [`sockets`]: the per-pod socket factory; [`netns`], [`podnet`];
//! - [`identity`]: workload certificates; [`telemetry`]; [`admin`];
//! - [`handover`]: a hitless upgrade (listeners passed to a new agent);
//! - [`cni`]: ferry-cni's socket (a new pod's sandbox waits until captured).
//!
//! Types and decisions shared with other processes are in `ferry_model`.

pub mod admin;
pub mod agent;
pub mod cni;
pub mod config_stream;
pub mod handover;
pub mod identity;
pub mod netns;
pub mod node;
pub mod podnet;
pub mod proxy;
pub mod reconcile;
pub mod sockets;
pub mod telemetry;
pub mod tunnel;

/// Reads and validates an agent config file.
pub fn load_config(path: &std::path::Path) -> Result<ferry_model::ConfigFile, ferry_model::ConfigError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ferry_model::ConfigError {
        source_name: name.clone(),
        problems: vec![format!("cannot read: {e}")],
    })?;
    ferry_model::ConfigFile::parse(&name, &text)
}
