//! ferry-control's admin endpoint (localhost by default): the snapshot
//! version, each node's stream (connected, acknowledged version, last NACK)
//! and the current problems in the cluster config.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use ferry_api::admin_http::{self, json, text, Body};
use hyper::{Response, StatusCode};
use tokio::net::TcpListener;

use crate::{
    config_stream::{NodeStatus, Store},
    model::Problem,
};

pub struct Admin {
    pub store: Arc<Store>,
    pub nodes: Arc<Mutex<BTreeMap<String, NodeStatus>>>,
    pub problems: Arc<Mutex<Vec<Problem>>>,
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
                    // Never mesh workloads; `ferryctl analyze --all` lists them.
                    "hostNetworkPods": s.view.host_network.len(),
                    "services": s.view.services.len(),
                }))
            }
            "/nodes" => json(&*self.nodes.lock().unwrap_or_else(|e| e.into_inner())),
            "/problems" => json(&*self.problems.lock().unwrap_or_else(|e| e.into_inner())),
            _ => text(StatusCode::NOT_FOUND, "try /version /nodes /problems /healthz\n"),
        }
    }

    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        admin_http::serve(listener, move |req| self.route(req.path)).await
    }
}
