//! ferry-control's admin endpoint (localhost by default): the snapshot
//! version, each node's stream (connected, acknowledged version, last NACK)
//! and the current problems in the cluster config.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::{
    discovery::{NodeStatus, Store},
    model::Problem,
};

pub struct Admin {
    pub store: Arc<Store>,
    pub nodes: Arc<Mutex<BTreeMap<String, NodeStatus>>>,
    pub problems: Arc<Mutex<Vec<Problem>>>,
}

fn json(v: &impl serde::Serialize) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec_pretty(v).unwrap_or_default();
    Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}

impl Admin {
    fn route(&self, path: &str) -> Response<Full<Bytes>> {
        match path {
            "/healthz" => Response::new(Full::new(Bytes::from_static(b"ok\n"))),
            "/version" => {
                let s = self.store.current();
                json(&serde_json::json!({
                    "version": s.version,
                    "pods": s.view.workloads.len(),
                    "enrolled": s.view.workloads.iter().filter(|w| w.enrolled).count(),
                    "services": s.view.services.len(),
                }))
            }
            "/nodes" => json(&*self.nodes.lock().unwrap_or_else(|e| e.into_inner())),
            "/problems" => json(&*self.problems.lock().unwrap_or_else(|e| e.into_inner())),
            _ => {
                let mut r = Response::new(Full::new(Bytes::from_static(
                    b"try /version /nodes /problems /healthz\n",
                )));
                *r.status_mut() = StatusCode::NOT_FOUND;
                r
            }
        }
    }

    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let me = self.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let resp = me.route(req.uri().path());
                    async move { Ok::<_, Infallible>(resp) }
                });
                let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    }
}
