//! `ferryctl bpf dump`: a pinned map decoded, joined with the agent's
//! workload names, filtered by pod or address.

use serde::Serialize;
use serde_json::Value;

use crate::{admin_get, pinned, Args, CtlError, DumpMap};

/// Local workloads from the agent, when it answers (for names in dumps).
fn workloads(args: &Args) -> Option<Vec<Value>> {
    admin_get(args.admin, "/config_dump").ok()?["pods"].as_array().cloned()
}

/// Rows of one pinned map, joined with workload names, filtered.
pub(crate) fn dump(
    args: &Args,
    map: DumpMap,
    pod: Option<&str>,
    ip: Option<&str>,
) -> Result<(Vec<Value>, &'static [&'static str]), CtlError> {
    let p = pinned(args)?;
    fn values<T: Serialize>(rows: Vec<T>) -> Vec<Value> {
        rows.into_iter()
            .map(|r| serde_json::to_value(r).unwrap_or(Value::Null))
            .collect()
    }
    let (mut rows, columns): (Vec<Value>, &'static [&'static str]) = match map {
        DumpMap::Pods => (
            values(p.pods()?),
            &[
                "netns_cookie",
                "pod_id",
                "namespace",
                "name",
                "ip",
                "host_veth",
                "cgroup",
            ],
        ),
        DumpMap::MeshDst => (values(p.mesh_dst()?), &["ip", "port", "kind"]),
        DumpMap::OrigDst => (
            values(p.orig_dst()?),
            &["netns_cookie", "client", "agent", "orig_dst", "pod_id"],
        ),
        DumpMap::Traffic => (
            values(p.traffic()?),
            &[
                "ifindex",
                "interface",
                "namespace",
                "name",
                "rx_packets",
                "rx_bytes",
                "tx_packets",
                "tx_bytes",
            ],
        ),
        DumpMap::Stats => (
            p.stats()?
                .into_iter()
                .map(|(k, v)| serde_json::json!({"counter": k, "value": v}))
                .collect(),
            &["counter", "value"],
        ),
        DumpMap::Config => (
            values(vec![p.config()?]),
            &[
                "flags",
                "agent_mark",
                "outbound_port",
                "inbound_port",
                "tunnel_port",
                "deliver_port_lo",
                "deliver_port_hi",
            ],
        ),
    };
    let wls = workloads(args).unwrap_or_default();
    // Join: pods by netns cookie, traffic by host veth.
    for r in &mut rows {
        let w = wls.iter().find(|w| {
            (r.get("netns_cookie").is_some() && w["netns_cookie"] == r["netns_cookie"])
                || (r.get("interface").is_some_and(|i| !i.is_null()) && w["host_veth"] == r["interface"])
        });
        if let (Some(w), Some(obj)) = (w, r.as_object_mut()) {
            for k in ["namespace", "name", "ip", "host_veth", "cgroup", "netns", "uid"] {
                obj.entry(k).or_insert(w[k].clone());
            }
        }
    }
    if let Some(pod) = pod {
        if wls.is_empty() {
            return Err(CtlError::Other(
                "--pod needs the agent (for pod names); use --ip instead".into(),
            ));
        }
        let (ns, name) = pod.split_once('/').map_or((None, pod), |(n, p)| (Some(n), p));
        let w = wls
            .iter()
            .find(|w| w["name"] == name && ns.is_none_or(|n| w["namespace"] == n))
            .ok_or_else(|| CtlError::Other(format!("no local workload named {pod}")))?
            .clone();
        rows.retain(|r| {
            (r.get("netns_cookie").is_some() && r["netns_cookie"] == w["netns_cookie"])
                || (r.get("pod_id").is_some() && r["pod_id"] == w["pod_id"])
                || r.get("name").is_some_and(|n| *n == w["name"])
        });
    }
    if let Some(ip) = ip {
        let port_prefix = format!("{ip}:");
        rows.retain(|r| {
            r.as_object().is_some_and(|o| {
                o.values()
                    .any(|v| v.as_str().is_some_and(|s| s == ip || s.starts_with(&port_prefix)))
            })
        });
    }
    Ok((rows, columns))
}
