//! ferry-cni: a chained CNI plugin that closes the startup race. Listed last
//! in the node's conflist, it runs on each new pod sandbox after the
//! network is set up and before any of the pod's containers start; on ADD
//! it asks the node's agent to capture the pod (over the agent's unix
//! socket, `ferry_model::cni`) and returns only when the agent says the pod
//! is captured or not in the mesh, so no application of an enrolled pod
//! ever runs uncaptured. docs/cni.md has the guarantee, the protocol, the
//! timeouts and the failure behaviour.
//!
//! - [`spec`]: the CNI side (environment, config, versions, errors), pure;
//! - [`plugin`]: one invocation, decided over an [`plugin::AgentLink`];
//! - [`client`]: the agent's socket;
//! - [`install`]: `ferry-cni install|uninstall`, the conflist edit.

pub mod client;
pub mod install;
pub mod plugin;
pub mod spec;
