//! The cluster facts an agent works from: workloads (pods), services with
//! each port's protocol, and their endpoints. Plain data; validation is in
//! [`crate::config`].

use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf};

use serde::{Deserialize, Serialize};

use crate::{config::yes, protocol::Protocol, spiffe::SpiffeId};

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Workload {
    pub uid: String,
    pub name: String,
    #[serde(default = "default_ns")]
    pub namespace: String,
    #[serde(default = "default_sa")]
    pub service_account: String,
    pub node: String,
    pub ip: Ipv4Addr,
    /// Opted in to the mesh (the `ferry.dev/mesh: enabled` annotation).
    #[serde(default)]
    pub enrolled: bool,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The pod's netns (a path such as /run/netns/x); else found from its processes.
    #[serde(default)]
    pub netns: Option<PathBuf>,
    /// The pod's host-side veth, for per-pod tc counters.
    #[serde(default)]
    pub host_veth: Option<String>,
}

impl Workload {
    /// `namespace/name`, as logs and views show a workload.
    pub fn label(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The identity this workload's certificate carries.
    pub fn spiffe_id(&self) -> SpiffeId {
        SpiffeId::new(&self.namespace, &self.service_account)
    }
}

pub(crate) fn default_ns() -> String {
    "default".into()
}
fn default_sa() -> String {
    "default".into()
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Service {
    pub name: String,
    #[serde(default = "default_ns")]
    pub namespace: String,
    pub vip: Ipv4Addr,
    pub ports: Vec<ServicePort>,
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    pub port: u16,
    pub target_port: u16,
    #[serde(default)]
    pub name: Option<String>,
    /// The port's application protocol (Istio's selection: `appProtocol`,
    /// else the port name's prefix); `auto` when neither says.
    #[serde(default)]
    pub protocol: Protocol,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    #[serde(default = "yes")]
    pub ready: bool,
}
