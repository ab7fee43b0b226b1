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
    /// The control plane's stream, when the config comes from it.
    control: Option<crate::discovery::client::ControlStatus>,
}

/// Changes the log filter at runtime (set by the binary that owns the subscriber).
pub type LogReload = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;
static LOG_RELOAD: std::sync::OnceLock<LogReload> = std::sync::OnceLock::new();

pub fn set_log_reload(f: LogReload) {
    let _ = LOG_RELOAD.set(f);
}

fn logging(query: Option<&str>) -> Response<Body> {
    let Some(level) = query.and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("level="))) else {
        return text(
            StatusCode::BAD_REQUEST,
            "usage: POST /logging?level=<filter, e.g. debug or info,ferry::ebpf=debug>\n",
        );
    };
    match LOG_RELOAD.get() {
        None => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "log level is not reloadable in this process\n",
        ),
        Some(f) => match f(level) {
            Ok(()) => text(StatusCode::OK, &format!("log filter now {level}\n")),
            Err(e) => text(StatusCode::BAD_REQUEST, &format!("bad filter {level:?}: {e}\n")),
        },
    }
}

pub fn route(agent: &Agent, method: &hyper::Method, path: &str, query: Option<&str>) -> Response<Body> {
    let state = agent.state();
    if path == "/logging" {
        return if method == hyper::Method::POST {
            logging(query)
        } else {
            text(StatusCode::METHOD_NOT_ALLOWED, "POST /logging?level=...\n")
        };
    }
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
            control: agent.control.read().unwrap_or_else(|e| e.into_inner()).clone(),
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
        "/stats" => json(&*agent.proxy.telemetry.counters),
        "/certs" => json(&agent.ids.as_ref().map(|i| i.views()).unwrap_or_default()),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /healthz /ready /config_dump /conns /stats, POST /logging?level=\n",
        ),
    }
}

/// Serves HTTP/1 on `listener`, answering each request with `handle`.
async fn serve_with(
    agent: Arc<Agent>,
    listener: TcpListener,
    handle: fn(&Agent, &Request<Incoming>) -> Response<Body>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let resp = handle(&agent, &req);
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

/// The admin endpoint (keep it on localhost).
pub async fn serve(agent: Arc<Agent>, listener: TcpListener) {
    serve_with(agent, listener, |a, req| {
        route(a, req.method(), req.uri().path(), req.uri().query())
    })
    .await
}

/// `/metrics` (Prometheus text format) for scrapers.
pub async fn serve_metrics(agent: Arc<Agent>, listener: TcpListener) {
    serve_with(agent, listener, |a, req| {
        if req.uri().path() == "/metrics" {
            Response::builder()
                .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                .body(Full::new(Bytes::from(a.proxy.telemetry.metrics.encode())))
                .expect("static response")
        } else {
            text(StatusCode::NOT_FOUND, "try /metrics\n")
        }
    })
    .await
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
