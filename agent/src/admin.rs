//! The admin endpoint (localhost:15000 by default): health, readiness and
//! JSON views of the agent's state for `ferryctl` and operators.

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;

use crate::agent::Agent;

type Body = Full<Bytes>;

fn json<T: Serialize>(v: &T) -> Response<Body> {
    let body = serde_json::to_vec_pretty(v).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}").into_bytes());
    Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("static response")
}

fn text(code: StatusCode, s: &str) -> Response<Body> {
    Response::builder()
        .status(code)
        .body(Full::new(Bytes::from(s.to_owned())))
        .expect("static response")
}

#[derive(Serialize)]
struct ConfigDump<'a> {
    node: &'a str,
    version: u64,
    settings: &'a crate::config::Settings,
    pods: Vec<crate::agent::PodStatus>,
    workloads: Vec<&'a crate::config::Workload>,
    services: &'a [crate::config::Service],
}

pub fn route(agent: &Agent, path: &str) -> Response<Body> {
    let state = agent.state();
    match path {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/ready" => {
            if agent.applied_version() > 0 {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "config not applied yet\n")
            }
        }
        "/config_dump" => json(&ConfigDump {
            node: &state.node,
            version: agent.applied_version(),
            settings: &state.settings,
            pods: agent.pod_status(),
            workloads: state.workloads.values().collect(),
            services: &state.services,
        }),
        "/conns" => json(
            &agent
                .proxy
                .telemetry
                .live()
                .iter()
                .map(|c| c.view())
                .collect::<Vec<_>>(),
        ),
        "/stats" => json(&agent.proxy.telemetry.counters),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /healthz /ready /config_dump /conns /stats\n",
        ),
    }
}

pub async fn serve(agent: Arc<Agent>, listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let resp = route(&agent, req.uri().path());
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
