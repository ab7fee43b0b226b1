//! What the box writes from its spec: each node's agent config and the
//! cluster YAML (Kubernetes shapes) ferry-control reads.

use std::{fs, net::Ipv4Addr, path::PathBuf};

use anyhow::Result;
use ferry_model::{ConfigFile, Endpoint, PendingPod, Service, ServicePort, Settings, Workload};

use crate::BoxState;

impl BoxState {
    pub(crate) fn host_veth(&self, pod: usize) -> String {
        format!("veth{pod}")
    }

    /// Whether the cluster has `pod`'s address (`Spec::unaddressed`).
    fn addressed(&self, pod: &str) -> bool {
        !self.spec.unaddressed.iter().any(|n| n == pod)
    }

    /// The agent config for `node`, from the spec (and its current
    /// enrollment); the node's pods without an address yet are pending.
    pub fn agent_config(&self, node: usize) -> ConfigFile {
        let pending_pods = self
            .spec
            .pods
            .iter()
            .filter(|p| p.node == node && !self.spec.departed.contains(&p.name) && !self.addressed(&p.name))
            .map(|p| PendingPod {
                uid: self.pod_uid(&p.name),
                name: p.name.clone(),
                namespace: "default".into(),
                service_account: p.service_account(),
                node: self.node_name(p.node),
                enrolled: p.enrolled,
                labels: p.labels.iter().cloned().collect(),
                workload_name: None,
                locality: ferry_model::balance::locality_label(&p.labels.iter().cloned().collect()),
            })
            .collect();
        let workloads = self
            .spec
            .pods
            .iter()
            .enumerate()
            .filter(|(_, p)| !self.spec.departed.contains(&p.name) && self.addressed(&p.name))
            .map(|(i, p)| Workload {
                uid: self.pod_uid(&p.name),
                name: p.name.clone(),
                namespace: "default".into(),
                service_account: p.service_account(),
                node: self.node_name(p.node),
                ip: self.pod_ip(&p.name).expect("pod in spec"),
                enrolled: p.enrolled,
                labels: p.labels.iter().cloned().collect(),
                netns: (p.node == node).then(|| PathBuf::from(format!("/run/netns/{}", self.pod_netns(&p.name)))),
                host_veth: (p.node == node).then(|| self.host_veth(i)),
                workload_name: None,
                locality: ferry_model::balance::locality_label(&p.labels.iter().cloned().collect()),
            })
            .collect();
        let services = self
            .spec
            .services
            .iter()
            .map(|s| Service {
                name: s.name.clone(),
                namespace: "default".into(),
                vip: s.vip,
                ports: vec![ServicePort {
                    port: s.port,
                    target_port: s.target_port,
                    name: Some("tcp".into()),
                    protocol: ferry_model::Protocol::Tcp,
                }],
                endpoints: s
                    .endpoints
                    .iter()
                    .filter(|e| !self.spec.departed.contains(e) && self.addressed(e))
                    .map(|e| Endpoint {
                        ip: self.pod_ip(e).expect("endpoint pod in spec"),
                        ready: true,
                    })
                    .collect(),
            })
            .collect();
        ConfigFile {
            node: self.node_name(node),
            settings: Settings {
                splice: self.spec.splice,
                events: true,
                cgroup_root: Some(self.kubepods(node)),
                access_log: self.spec.access_log.clone(),
                node_addresses: vec![Ipv4Addr::new(10, 1, node as u8 + 1, 1)],
                metrics: self.spec.metrics,
                ..Default::default()
            },
            workloads,
            pending_pods,
            services,
            peer_authentications: self.spec.peer_authentications.clone(),
            // Routes and policies come from ferry-control (or are none).
            ..Default::default()
        }
    }

    /// Where ferry-control reads the cluster from.
    pub fn cluster_dir(&self) -> PathBuf {
        self.dir.join("cluster")
    }

    /// The spec as the Kubernetes objects an API server would hold: pods
    /// (scheduled, with their addresses unless `Spec::unaddressed`; enrolled
    /// ones annotated), services with their EndpointSlices (of pods with an
    /// address), and the PeerAuthentications.
    pub fn cluster_objects(&self) -> Result<Vec<serde_json::Value>> {
        use serde_json::json;
        let ns_labels: std::collections::BTreeMap<_, _> = self.spec.namespace_labels.iter().cloned().collect();
        let mut out = vec![
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default", "labels": ns_labels}}),
        ];
        for p in self.spec.pods.iter().filter(|p| !self.spec.departed.contains(&p.name)) {
            let mut meta = json!({
                "name": p.name, "namespace": "default", "uid": self.pod_uid(&p.name),
                "labels": p.labels.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
            });
            let mut annotations: std::collections::BTreeMap<_, _> = p.annotations.iter().cloned().collect();
            if p.enrolled {
                annotations.insert("ferry.dev/mesh".into(), "enabled".into());
            }
            meta["annotations"] = json!(annotations);
            let ports: Vec<_> = p.serve.iter().map(|port| json!({"containerPort": port})).collect();
            out.push(json!({
                "apiVersion": "v1", "kind": "Pod", "metadata": meta,
                "spec": {
                    "nodeName": self.node_name(p.node), "serviceAccountName": p.service_account(),
                    "containers": [{"name": "app", "image": "ferry-workload", "ports": ports}],
                },
                "status": if self.addressed(&p.name) {
                    json!({"phase": "Running", "podIP": self.pod_ip(&p.name)?.to_string()})
                } else {
                    json!({"phase": "Pending"})
                },
            }));
        }
        for sv in self.spec.services.iter().filter(|s| !s.from_manifest) {
            out.push(json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": sv.name, "namespace": "default"},
                "spec": {"clusterIP": sv.vip.to_string(), "ports": [{"name": "tcp", "port": sv.port, "targetPort": sv.target_port}]},
            }));
            let endpoints = sv
                .endpoints
                .iter()
                .filter(|e| !self.spec.departed.contains(e) && self.addressed(e))
                .map(|e| Ok(json!({"addresses": [self.pod_ip(e)?.to_string()], "conditions": {"ready": true}})))
                .collect::<Result<Vec<_>>>()?;
            out.push(json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": format!("{}-1", sv.name), "namespace": "default", "labels": {"kubernetes.io/service-name": sv.name}},
                "addressType": "IPv4",
                "ports": [{"name": "tcp", "port": sv.target_port}],
                "endpoints": endpoints,
            }));
        }
        for pa in &self.spec.peer_authentications {
            out.push(serde_json::to_value(pa)?);
        }
        Ok(out)
    }

    /// Writes the cluster YAML atomically (ferry-control re-reads on change).
    pub fn write_cluster(&self) -> Result<()> {
        let dir = self.cluster_dir();
        fs::create_dir_all(&dir)?;
        let mut files: Vec<(String, String)> = vec![(
            "box.yaml".into(),
            self.cluster_objects()?
                .iter()
                .map(serde_norway::to_string)
                .collect::<Result<Vec<_>, _>>()?
                .join("---\n"),
        )];
        files.extend(self.spec.cluster_yaml.iter().cloned());
        for (name, text) in &files {
            let tmp = dir.join(format!(".{name}.tmp"));
            fs::write(&tmp, text)?;
            fs::rename(&tmp, dir.join(name))?;
        }
        // Files dropped from the spec are deleted.
        for e in fs::read_dir(&dir)?.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if !n.starts_with('.') && !files.iter().any(|(f, _)| *f == n) {
                let _ = fs::remove_file(e.path());
            }
        }
        Ok(())
    }

    /// Writes every node's config atomically (agents pick it up on change).
    /// With discovery, the file holds only the node's settings.
    pub fn write_configs(&self) -> Result<()> {
        self.write_cluster()?;
        for n in 0..self.spec.nodes {
            let mut cfg = self.agent_config(n);
            if self.spec.discovery {
                cfg.workloads.clear();
                cfg.pending_pods.clear();
                cfg.services.clear();
                cfg.peer_authentications.clear();
            }
            let text = serde_norway::to_string(&cfg)?;
            let tmp = self.config_path(n).with_extension("tmp");
            fs::write(&tmp, text)?;
            fs::rename(&tmp, self.config_path(n))?;
        }
        Ok(())
    }
}
