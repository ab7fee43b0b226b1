//! The admin endpoint (localhost:15000 by default): health, readiness and
//! JSON views of the agent's state for `ferryctl` and operators.

use std::{borrow::Cow, sync::Arc};

use ferry_api::admin_http::{self, json, text, AdminRequest, Body};
use ferry_model::admin::{AuthzQuery, ConfigDump};
use hyper::{Response, StatusCode};
use tokio::net::TcpListener;

use crate::agent::Agent;

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

pub fn route(agent: &Agent, req: &AdminRequest<'_>) -> Response<Body> {
    if req.path == "/logging" {
        return if req.method == hyper::Method::POST {
            logging(req.query)
        } else {
            text(StatusCode::METHOD_NOT_ALLOWED, "POST /logging?level=...\n")
        };
    }
    let rec = &agent.reconciler;
    match req.path {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/ready" => {
            if rec.applied_version() > 0 {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "config not applied yet\n")
            }
        }
        "/config_dump" => {
            let state = agent.proxy.state();
            json(&ConfigDump {
                node: state.node.clone(),
                version: rec.applied_version(),
                settings: Cow::Borrowed(&state.settings),
                pods: rec.pod_status(),
                workloads: state.workloads.values().map(Cow::Borrowed).collect(),
                services: Cow::Borrowed(&state.services),
                control: agent.control.read().unwrap_or_else(|e| e.into_inner()).clone(),
            })
        }
        "/conns" => json(
            &agent
                .proxy
                .telemetry
                .live()
                .iter()
                .map(|c| c.view())
                .collect::<Vec<_>>(),
        ),
        "/stats" => json(&agent.proxy.telemetry.counters.snapshot()),
        "/certs" => json(&agent.ids.as_ref().map(|i| i.views()).unwrap_or_default()),
        "/authz" => authz(agent, req.query),
        "/endpoints" => json(&agent.proxy.balance.view(&agent.proxy.state())),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /healthz /ready /config_dump /conns /stats /certs /endpoints /authz?from=&to=&port=, POST /logging?level=\n",
        ),
    }
}

/// `/authz?from=ns/sa-or-pod&to=ns/pod&port=P[&method=&path=&host=&header=k:v]`:
/// the authorization dry run, answered from the live state (the deciding
/// policy, rule and reason; see `ferry_model::admin::AuthzQuery`).
fn authz(agent: &Agent, query: Option<&str>) -> Response<Body> {
    let q = match AuthzQuery::from_query(query.unwrap_or("")) {
        Ok(q) => q,
        Err(e) => {
            return text(
                StatusCode::BAD_REQUEST,
                &format!("{e}\nusage: /authz?from=ns/sa-or-pod&to=ns/pod&port=P[&method=GET&path=/x&header=k:v]\n"),
            )
        }
    };
    match agent.proxy.state().authz_check(&q) {
        Ok(check) => json(&check),
        Err(e) => text(StatusCode::NOT_FOUND, &format!("{e}\n")),
    }
}

/// The admin endpoint (keep it on localhost).
pub async fn serve(agent: Arc<Agent>, listener: TcpListener) {
    admin_http::serve(listener, move |req| route(&agent, &req)).await
}

/// `/metrics` (Prometheus text format) for scrapers.
pub async fn serve_metrics(agent: Arc<Agent>, listener: TcpListener) {
    admin_http::serve(listener, move |req| {
        if req.path == "/metrics" {
            admin_http::with_type(
                "text/plain; version=0.0.4; charset=utf-8",
                StatusCode::OK,
                agent.proxy.telemetry.metrics.encode().into_bytes(),
            )
        } else {
            text(StatusCode::NOT_FOUND, "try /metrics\n")
        }
    })
    .await
}
