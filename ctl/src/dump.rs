//! `ferryctl bpf dump`: a pinned map decoded, joined with the agent's
//! workload names, filtered by pod or address.

use ferry_model::admin::PodStatus;
use serde_json::{Map, Value};

use crate::{
    admin,
    output::{counters, to_values},
    pinned, Args, CtlError, DumpMap,
};

/// Rows of one pinned map, joined with workload names, filtered.
pub(crate) fn dump(
    args: &Args,
    map: DumpMap,
    pod: Option<&str>,
    ip: Option<&str>,
) -> Result<(Vec<Value>, &'static [&'static str]), CtlError> {
    let p = pinned(args)?;
    let (mut rows, columns): (Vec<Value>, &'static [&'static str]) = match map {
        DumpMap::Pods => (
            to_values(&p.pods()?)?,
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
        DumpMap::MeshDst => (to_values(&p.mesh_dst()?)?, &["ip", "port", "kind"]),
        DumpMap::OrigDst => (
            to_values(&p.orig_dst()?)?,
            &["netns_cookie", "client", "agent", "orig_dst", "pod_id"],
        ),
        DumpMap::Traffic => (
            to_values(&p.traffic()?)?,
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
        DumpMap::Stats => (to_values(&counters(p.stats()?))?, &["counter", "value"]),
        DumpMap::Config => (
            to_values(&[p.config()?])?,
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
    // Local workloads from the agent, when it answers (for names in dumps).
    let pods = match admin::config_dump(args.admin) {
        Ok(d) => Some(d.pods),
        Err(e @ CtlError::AgentDown(..)) if pod.is_some() => {
            return Err(CtlError::Other(format!(
                "--pod needs the agent (for pod names); use --ip instead: {e}"
            )))
        }
        Err(e) if pod.is_some() => return Err(e),
        Err(CtlError::AgentDown(..)) => None,
        Err(e) => {
            eprintln!("ferryctl: rows not joined with workload names: {e}");
            None
        }
    };
    let pods = pods.unwrap_or_default();
    for r in &mut rows {
        if let (Some(w), Some(obj)) = (pods.iter().find(|w| joins(w, r)), r.as_object_mut()) {
            join(obj, w);
        }
    }
    if let Some(pod) = pod {
        let (ns, name) = pod.split_once('/').map_or((None, pod), |(n, p)| (Some(n), p));
        let w = pods
            .iter()
            .find(|w| w.name == name && ns.is_none_or(|n| w.namespace == n))
            .ok_or_else(|| CtlError::Other(format!("no local workload named {pod}")))?;
        rows.retain(|r| {
            joins(w, r)
                || w.pod_id.is_some_and(|id| r["pod_id"].as_u64() == Some(id.into()))
                || r["name"].as_str() == Some(w.name.as_str())
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

/// Whether a pinned row is about this pod: pods by netns cookie, traffic by
/// host veth.
fn joins(w: &PodStatus, r: &Value) -> bool {
    w.netns_cookie.is_some_and(|c| r["netns_cookie"].as_u64() == Some(c))
        || w.host_veth
            .as_deref()
            .is_some_and(|v| r["interface"].as_str() == Some(v))
}

/// Adds the pod's names to a pinned row (fields the row has are kept).
fn join(row: &mut Map<String, Value>, w: &PodStatus) {
    let opt = |v: &Option<String>| v.clone().map_or(Value::Null, Value::String);
    for (k, v) in [
        ("namespace", Value::String(w.namespace.clone())),
        ("name", Value::String(w.name.clone())),
        ("ip", Value::String(w.ip.clone())),
        ("host_veth", opt(&w.host_veth)),
        ("cgroup", opt(&w.cgroup)),
        ("netns", opt(&w.netns)),
        ("uid", Value::String(w.uid.clone())),
    ] {
        row.entry(k).or_insert(v);
    }
}
