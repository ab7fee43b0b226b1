//! ferry-control's admin endpoint (localhost by default): the snapshot
//! version, each node's stream (connected, acknowledged version, last NACK),
//! the current problems in the cluster config, and all of it as Prometheus
//! metrics (`/metrics`, with the node-credential checks: TokenReview
//! outcomes are otherwise only in the log).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use ferry_api::admin_http::{self, json, text, Body};
use hyper::{Response, StatusCode};
use tokio::net::TcpListener;

use crate::{
    config_stream::{NodeStatus, Store},
    model::{Problem, Severity},
    nodeauth::{NodeAuth, NodeAuthStats},
};

pub struct Admin {
    pub store: Arc<Store>,
    pub nodes: Arc<Mutex<BTreeMap<String, NodeStatus>>>,
    pub problems: Arc<Mutex<Vec<Problem>>>,
    pub auth: Arc<NodeAuth>,
}

/// A label value as Prometheus' text format wants it.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The Prometheus text exposition of ferry-control's state.
pub fn metrics_text(
    version: u64,
    nodes: &BTreeMap<String, NodeStatus>,
    problems: &[Problem],
    auth: &NodeAuthStats,
    auth_mode: &str,
) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: &[(String, u64)]| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (labels, v) in samples {
            out.push_str(&format!("{name}{labels} {v}\n"));
        }
    };
    family(
        "ferry_control_config_version",
        "gauge",
        "version of the snapshot streamed to nodes",
        &[(String::new(), version)],
    );
    let per_node = |f: &dyn Fn(&NodeStatus) -> u64| -> Vec<(String, u64)> {
        nodes
            .iter()
            .map(|(n, s)| (format!("{{node=\"{}\"}}", label(n)), f(s)))
            .collect()
    };
    family(
        "ferry_control_node_connected",
        "gauge",
        "1 while the node's config stream is open",
        &per_node(&|s| u64::from(s.connected)),
    );
    family(
        "ferry_control_node_acked_version",
        "gauge",
        "snapshot version the node last acknowledged (applied)",
        &per_node(&|s| s.acked_version),
    );
    family(
        "ferry_control_node_nacks_total",
        "counter",
        "updates the node rejected (NACK; the last reason: /nodes)",
        &per_node(&|s| s.nacks),
    );
    let count = |sev: Severity| problems.iter().filter(|p| p.severity == sev).count() as u64;
    family(
        "ferry_control_config_problems",
        "gauge",
        "findings about the cluster config, by severity (details: /problems)",
        &[Severity::Error, Severity::Warning, Severity::Info]
            .map(|s| (format!("{{severity=\"{}\"}}", s.as_str()), count(s))),
    );
    let mode = label(auth_mode);
    family(
        "ferry_control_node_auth_total",
        "counter",
        "node credential checks (config stream and CA), by outcome; unavailable: the API server could not be asked (refused, fail closed)",
        &[
            ("accepted", auth.accepted),
            ("refused", auth.refused),
            ("unavailable", auth.unavailable),
        ]
        .map(|(o, v)| (format!("{{mode=\"{mode}\",outcome=\"{o}\"}}"), v)),
    );
    family(
        "ferry_control_token_reviews_total",
        "counter",
        "TokenReviews sent to the API server",
        &[(String::new(), auth.reviews)],
    );
    family(
        "ferry_control_node_auth_cache_hits_total",
        "counter",
        "node credential checks answered from the cache or a review in flight",
        &[(String::new(), auth.cache_hits)],
    );
    out
}

impl Admin {
    fn route(&self, path: &str) -> Response<Body> {
        match path {
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/version" => {
                let s = self.store.current();
                json(&serde_json::json!({
                    "version": s.version,
                    "pods": s.view.workloads.len(),
                    "enrolled": s.view.workloads.iter().filter(|w| w.enrolled).count(),
                    // Scheduled, no address yet (sent to their node as pending).
                    "pendingPods": s.view.pending.len(),
                    // Never mesh workloads; `ferryctl analyze --all` lists them.
                    "hostNetworkPods": s.view.host_network.len(),
                    "services": s.view.services.len(),
                }))
            }
            "/nodes" => json(&*self.nodes.lock().unwrap_or_else(|e| e.into_inner())),
            "/problems" => json(&*self.problems.lock().unwrap_or_else(|e| e.into_inner())),
            "/metrics" => {
                let nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let problems = self.problems.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let body = metrics_text(
                    self.store.current().version,
                    &nodes,
                    &problems,
                    &self.auth.stats(),
                    self.auth.mode(),
                );
                admin_http::with_type("text/plain; version=0.0.4", StatusCode::OK, body.into_bytes())
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "try /version /nodes /problems /metrics /healthz\n",
            ),
        }
    }

    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        admin_http::serve(listener, move |req| self.route(req.path)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_prometheus_text_with_escaped_labels() {
        let mut nodes = BTreeMap::new();
        nodes.insert(
            "node-\"1\"".to_owned(),
            NodeStatus {
                connected: true,
                acked_version: 7,
                resources: 3,
                last_nack: Some("clash".into()),
                nacks: 2,
            },
        );
        let auth = NodeAuthStats {
            reviews: 4,
            cache_hits: 5,
            accepted: 6,
            refused: 1,
            unavailable: 0,
        };
        let text = metrics_text(9, &nodes, &[], &auth, "tokenreview");
        for line in [
            "ferry_control_config_version 9",
            "ferry_control_node_connected{node=\"node-\\\"1\\\"\"} 1",
            "ferry_control_node_acked_version{node=\"node-\\\"1\\\"\"} 7",
            "ferry_control_node_nacks_total{node=\"node-\\\"1\\\"\"} 2",
            "ferry_control_config_problems{severity=\"error\"} 0",
            "ferry_control_node_auth_total{mode=\"tokenreview\",outcome=\"accepted\"} 6",
            "ferry_control_node_auth_total{mode=\"tokenreview\",outcome=\"refused\"} 1",
            "ferry_control_token_reviews_total 4",
            "# TYPE ferry_control_node_auth_total counter",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in:\n{text}");
        }
    }
}
