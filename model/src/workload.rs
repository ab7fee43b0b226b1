//! The cluster facts an agent works from: workloads (pods), pods scheduled
//! on the node that have no address yet ([`PendingPod`]), services with each
//! port's protocol, and their endpoints. Plain data; validation is in
//! [`crate::config`], what an agent does with a pending pod in
//! [`crate::pending`].

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
    /// The workload the pod belongs to, named as Istio names it (its
    /// Deployment, StatefulSet, DaemonSet, Job, CronJob...: derived by the
    /// control plane from ownerReferences). Absent: the pod is its own
    /// workload ([`Workload::workload_name`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_name: Option<String>,
    /// Where the pod runs, `region/zone/subzone` (parts may be empty), for
    /// locality-aware load balancing; from the pod's `istio-locality` label
    /// (derived by the control plane). Absent: unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality: Option<String>,
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

    /// The workload's name as metrics report it (`*_workload`): the owning
    /// controller's when known, else the pod's own.
    pub fn workload_name(&self) -> &str {
        self.workload_name
            .as_deref()
            .filter(|n| !n.is_empty())
            .unwrap_or(&self.name)
    }

    /// Istio's canonical service: the `service.istio.io/canonical-name`
    /// label, else `app.kubernetes.io/name`, else `app`, else the workload name.
    pub fn canonical_service(&self) -> &str {
        self.first_label(&["service.istio.io/canonical-name", "app.kubernetes.io/name", "app"])
            .unwrap_or_else(|| self.workload_name())
    }

    /// Istio's canonical revision: the `service.istio.io/canonical-revision`
    /// label, else `app.kubernetes.io/version`, else `version`, else `latest`.
    pub fn canonical_revision(&self) -> &str {
        self.first_label(&[
            "service.istio.io/canonical-revision",
            "app.kubernetes.io/version",
            "version",
        ])
        .unwrap_or("latest")
    }

    /// The value of the first of `keys` the pod has as a label.
    pub fn first_label(&self, keys: &[&str]) -> Option<&str> {
        keys.iter().find_map(|k| self.labels.get(*k).map(String::as_str))
    }
}

/// A pod scheduled on a node that has no IPv4 address in the API server yet:
/// the kubelet reports `status.podIP` only once the pod's sandbox is up,
/// while the container runtime's CNI ADD (and ferry-cni's wait for the
/// capture) comes before. Everything but the address is known; the node's
/// agent takes the address from the runtime ([`crate::pending`]). Sent to
/// the pod's own node only.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PendingPod {
    pub uid: String,
    pub name: String,
    #[serde(default = "default_ns")]
    pub namespace: String,
    #[serde(default = "default_sa")]
    pub service_account: String,
    pub node: String,
    /// Opted in to the mesh, by the same rules as [`Workload::enrolled`].
    #[serde(default)]
    pub enrolled: bool,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// As [`Workload::workload_name`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_name: Option<String>,
    /// As [`Workload::locality`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality: Option<String>,
}

impl PendingPod {
    /// `namespace/name`, as logs and views show a pod.
    pub fn label(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The workload this pod is at `ip`: field for field what the control
    /// plane sends once it has the address (so an agent that learned the
    /// same address sees no change then).
    pub fn at(&self, ip: Ipv4Addr) -> Workload {
        Workload {
            uid: self.uid.clone(),
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            service_account: self.service_account.clone(),
            node: self.node.clone(),
            ip,
            enrolled: self.enrolled,
            labels: self.labels.clone(),
            netns: None,
            host_veth: None,
            workload_name: self.workload_name.clone(),
            locality: self.locality.clone(),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(workload_name: Option<&str>, labels: &[(&str, &str)]) -> Workload {
        Workload {
            uid: "u".into(),
            name: "reviews-v1-6f7b8c9d4-x2x9z".into(),
            namespace: "default".into(),
            service_account: "default".into(),
            node: "n1".into(),
            ip: Ipv4Addr::new(10, 1, 1, 2),
            enrolled: true,
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            netns: None,
            host_veth: None,
            workload_name: workload_name.map(Into::into),
            locality: None,
        }
    }

    #[test]
    fn names_follow_istio() {
        // (workload name, labels) -> (workload, canonical service, canonical revision)
        type Case<'a> = (Option<&'a str>, &'a [(&'a str, &'a str)], (&'a str, &'a str, &'a str));
        let cases: &[Case] = &[
            (Some("reviews-v1"), &[], ("reviews-v1", "reviews-v1", "latest")),
            (
                None,
                &[],
                ("reviews-v1-6f7b8c9d4-x2x9z", "reviews-v1-6f7b8c9d4-x2x9z", "latest"),
            ),
            (
                Some(""),
                &[],
                ("reviews-v1-6f7b8c9d4-x2x9z", "reviews-v1-6f7b8c9d4-x2x9z", "latest"),
            ),
            (
                Some("reviews-v1"),
                &[("app", "reviews"), ("version", "v1")],
                ("reviews-v1", "reviews", "v1"),
            ),
            (
                Some("reviews-v1"),
                &[
                    ("app", "reviews"),
                    ("app.kubernetes.io/name", "reviews-k8s"),
                    ("version", "v1"),
                    ("app.kubernetes.io/version", "1.2"),
                ],
                ("reviews-v1", "reviews-k8s", "1.2"),
            ),
            (
                Some("reviews-v1"),
                &[
                    ("app", "reviews"),
                    ("app.kubernetes.io/name", "reviews-k8s"),
                    ("service.istio.io/canonical-name", "rev"),
                    ("version", "v1"),
                    ("service.istio.io/canonical-revision", "canary"),
                ],
                ("reviews-v1", "rev", "canary"),
            ),
        ];
        for (wn, labels, want) in cases {
            let w = pod(*wn, labels);
            assert_eq!(
                (w.workload_name(), w.canonical_service(), w.canonical_revision()),
                *want,
                "{wn:?} {labels:?}"
            );
        }
    }
}
