//! A box from a directory of Kubernetes YAML: the box plays scheduler and
//! kubelet. Pods become box pods (node from `spec.nodeName: nodeN`, else
//! round robin; a process serving each `containerPort`, or `ferry-workload`
//! with the first container's `args`, `$(SERVICE_HOST)`-style variables
//! expanded: `BoxState::workload_args`); the `default`
//! Namespace's labels are kept; everything else (Services with selectors,
//! routes, policies) goes to ferry-control as written.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use ferry_control::model::{parse::split_documents, parse_file, Object, Severity};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::{PodSpec, ServiceSpec, Spec};

/// The demo app, `examples/bookinfo`: Kubernetes YAML the box schedules and
/// ferry-control reads.
pub fn bookinfo() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/bookinfo"))
}

pub fn spec_from_dir(dir: &Path, nodes: usize) -> Result<Spec> {
    let mut spec = Spec {
        nodes,
        pods: vec![],
        services: vec![],
        discovery: true,
        mtls: true,
        ..Spec::demo()
    };
    let mut services = Vec::new();
    for file in ferry_control::source::files::yaml_files(dir) {
        let text = std::fs::read_to_string(&file).with_context(|| file.display().to_string())?;
        let mut kept = Vec::new();
        for (_, doc) in split_documents(&text) {
            let (parsed, problems) = parse_file(&file.display().to_string(), &doc);
            if let Some(p) = problems.iter().find(|p| p.severity == Severity::Error) {
                bail!("{p}");
            }
            let Some(d) = parsed.into_iter().next() else { continue };
            match d.object {
                Object::Pod(pod) => {
                    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
                    if ns != "default" {
                        bail!("{}: the box puts pods in `default` only, not {ns}", d.key);
                    }
                    let ps = pod.spec.clone().unwrap_or_default();
                    let node = match ps.node_name.as_deref().and_then(|n| n.strip_prefix("node")) {
                        Some(n) => n
                            .parse::<usize>()
                            .ok()
                            .filter(|n| (1..=nodes).contains(n))
                            .map(|n| n - 1),
                        None => Some(spec.pods.len() % nodes),
                    }
                    .with_context(|| format!("{}: nodeName must be node1..node{nodes}", d.key))?;
                    let annotations: BTreeMap<String, String> = pod.metadata.annotations.clone().unwrap_or_default();
                    spec.pods.push(PodSpec {
                        name: d.key.name.clone(),
                        node,
                        enrolled: false,
                        serve: ps
                            .containers
                            .iter()
                            .flat_map(|c| c.ports.iter().flatten())
                            .filter_map(|p| u16::try_from(p.container_port).ok())
                            .collect(),
                        labels: pod.metadata.labels.clone().unwrap_or_default().into_iter().collect(),
                        annotations: annotations.into_iter().collect(),
                        service_account: ps.service_account_name.clone(),
                    });
                    if let Some(args) = ps.containers.iter().find_map(|c| c.args.clone()) {
                        spec.pod_args.push((d.key.name.clone(), args));
                    }
                }
                Object::Namespace(n) if d.key.name == "default" => {
                    spec.namespace_labels = n.metadata.labels.clone().unwrap_or_default().into_iter().collect();
                }
                Object::Service(s) => {
                    let sp = s.spec.clone().unwrap_or_default();
                    let port = sp.ports.as_ref().and_then(|p| p.first()).context("a service port")?;
                    let vip: Ipv4Addr = sp
                        .cluster_ip
                        .as_deref()
                        .and_then(|ip| ip.parse().ok())
                        .with_context(|| format!("{}: the box needs a spec.clusterIP", d.key))?;
                    let target_port = match &port.target_port {
                        Some(IntOrString::Int(p)) => *p as u16,
                        _ => port.port as u16,
                    };
                    services.push((
                        ServiceSpec {
                            name: d.key.name.clone(),
                            vip,
                            port: port.port as u16,
                            target_port,
                            endpoints: vec![],
                            from_manifest: true,
                        },
                        sp.selector.unwrap_or_default(),
                    ));
                    kept.push(doc);
                }
                _ => kept.push(doc),
            }
        }
        if !kept.is_empty() {
            let name = file.file_name().unwrap_or_default().to_string_lossy().into_owned();
            spec.cluster_yaml.push((name, kept.join("---\n")));
        }
    }
    // Endpoints as the selectors will give them (for the box's own helpers).
    for (mut s, sel) in services {
        s.endpoints = spec
            .pods
            .iter()
            .filter(|p| !sel.is_empty() && sel.iter().all(|(k, v)| p.labels.iter().any(|(a, b)| a == k && b == v)))
            .map(|p| p.name.clone())
            .collect();
        spec.services.push(s);
    }
    Ok(spec)
}
