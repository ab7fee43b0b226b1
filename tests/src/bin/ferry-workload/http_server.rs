//! `http serve`: the HTTP test app (HTTP/1.1 and HTTP/2 cleartext on one
//! port, told apart by hyper-util's auto server), with Bookinfo's roles.
//!
//! Every answer is JSON (see `answer`) with a header `x-served-by: POD`;
//! behaviours are chosen per request by headers so tests need no restarts:
//! `x-delay-ms`, `x-status`, `x-fail-times` (with `x-request-id`),
//! `x-body-bytes`, and per pod `x-status-on`/`x-delay-on: POD=N,...`; request bodies are read in full (so `Expect:
//! 100-continue` is answered) and their length and sha256 reported;
//! `GET /ws` with `Upgrade: websocket` is an RFC 6455 echo.
//!
//! With `--conn-stats`, the server counts the requests each connection
//! carries and the requests in flight at once, and `GET /_stats` answers
//! them as JSON (`?reset=1`: and starts afresh); circuit-breaking tests read
//! it from inside the pod (`127.0.0.1`, not through the mesh).
//!
//! Roles: `productpage` answers `GET /productpage` after calling details
//! `/details/0` and reviews `/reviews/0`; `reviews` with `--ratings` calls
//! ratings `/ratings/0` on `/reviews/...`; `plain` calls nothing. Calls
//! forward only `FORWARDED` headers (and `x-b3-*`) and have a deadline
//! (`--upstream-timeout-ms`); a failed call is recorded, the page still
//! answers 200, as Bookinfo's "reviews unavailable".

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use bytes::Bytes;
use ferry_box::proto::{hex, pattern};
use futures::{SinkExt, StreamExt};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full, StreamBody};
use hyper::{
    body::{Frame, Incoming},
    header::{HeaderMap, HeaderValue},
    service::service_fn,
    Request, Response, StatusCode,
};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::{
    tungstenite::{handshake::derive_accept_key, protocol::Role as WsRole},
    WebSocketStream,
};

use crate::http_client::error_kind;

/// Request headers productpage and reviews pass on to their upstream calls
/// (Bookinfo's list), besides every `x-b3-*`.
pub const FORWARDED: &[&str] = &["end-user", "user", "x-request-id", "traceparent", "tracestate", "b3"];

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    Plain,
    Productpage,
    Reviews,
}

#[derive(clap::Args)]
pub struct ServeArgs {
    #[arg(long)]
    name: String,
    #[arg(long)]
    port: u16,
    #[arg(long, default_value = "v1")]
    version: String,
    #[arg(long, value_enum, default_value = "plain")]
    role: Role,
    /// productpage: base URL of details, e.g. http://10.96.0.21:9080.
    #[arg(long)]
    details: Option<String>,
    /// productpage: base URL of reviews.
    #[arg(long)]
    reviews: Option<String>,
    /// reviews: base URL of ratings (v2, v3); none: calls nothing (v1).
    #[arg(long)]
    ratings: Option<String>,
    /// Upstream calls use HTTP/2 prior knowledge (the server always takes both).
    #[arg(long)]
    h2c: bool,
    /// Delay every answer (before upstream calls), added to `x-delay-ms`.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Deadline of each upstream call (default: 3000 for productpage, as
    /// Bookinfo's, 10000 otherwise).
    #[arg(long)]
    upstream_timeout_ms: Option<u64>,
    /// Also answer the TCP protocol (WHO, ECHO, SINK, SOURCE) on this port,
    /// told apart from HTTP by a connection's first three bytes.
    #[arg(long)]
    also_tcp: bool,
    /// Count requests per connection and in flight; answer them on `GET /_stats`.
    #[arg(long)]
    conn_stats: bool,
}

/// What `--conn-stats` counts (requests to `/_stats` excluded).
#[derive(Default)]
struct ConnStats {
    /// Connection id -> requests it carried.
    per_conn: HashMap<u64, u64>,
    requests: u64,
    in_flight: u64,
    max_in_flight: u64,
}

impl ConnStats {
    /// `{"requests", "connections", "max_requests_per_connection",
    /// "max_in_flight", "requests_per_connection": {"<n>": connections}}`;
    /// connections that carried no request are not counted.
    fn json(&self) -> Value {
        let mut hist: std::collections::BTreeMap<String, u64> = Default::default();
        for n in self.per_conn.values().filter(|n| **n > 0) {
            *hist.entry(n.to_string()).or_default() += 1;
        }
        json!({
            "requests": self.requests,
            "connections": self.per_conn.values().filter(|n| **n > 0).count(),
            "max_requests_per_connection": self.per_conn.values().max().copied().unwrap_or(0),
            "max_in_flight": self.max_in_flight,
            "requests_per_connection": hist,
        })
    }
}

type Body = BoxBody<Bytes, Infallible>;

struct App {
    a: ServeArgs,
    upstream_timeout: Duration,
    client: Client<HttpConnector, Empty<Bytes>>,
    /// x-request-id -> requests seen carrying `x-fail-times`.
    attempts: Mutex<HashMap<String, u64>>,
    /// `--conn-stats`.
    stats: Mutex<ConnStats>,
}

pub async fn serve(a: ServeArgs) -> Result<()> {
    let l = TcpListener::bind(("0.0.0.0", a.port))
        .await
        .with_context(|| format!("bind {}", a.port))?;
    let default_timeout = if a.role == Role::Productpage { 3000 } else { 10000 };
    let app = Arc::new(App {
        upstream_timeout: Duration::from_millis(a.upstream_timeout_ms.unwrap_or(default_timeout)),
        client: Client::builder(TokioExecutor::new()).http2_only(a.h2c).build_http(),
        attempts: Mutex::new(HashMap::new()),
        stats: Mutex::new(ConnStats::default()),
        a,
    });
    let mut next_conn = 0u64;
    loop {
        let (s, peer) = match l.accept().await {
            Ok(x) => x,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let app = app.clone();
        next_conn += 1;
        let conn = next_conn;
        tokio::spawn(async move {
            if app.a.also_tcp && speaks_tcp_protocol(&s).await {
                let _ = crate::tcp::serve_conn(&app.a.name, s).await;
                return;
            }
            let _ = s.set_nodelay(true);
            let svc = service_fn(move |req| counted(app.clone(), conn, peer, req));
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(s), svc)
                .await;
        });
    }
}

/// Peeks at the first three bytes (no HTTP method, nor the HTTP/2 preface,
/// shares them with a command of the TCP protocol).
async fn speaks_tcp_protocol(s: &TcpStream) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 3];
    loop {
        match tokio::time::timeout_at(deadline, s.peek(&mut buf)).await {
            Ok(Ok(n)) if n >= 3 => return crate::tcp::is_protocol_command(&buf),
            Ok(Ok(n)) if n > 0 => tokio::time::sleep(Duration::from_millis(2)).await,
            _ => return false,
        }
    }
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn num(h: &HeaderMap, name: &str) -> Option<u64> {
    header(h, name).and_then(|v| v.trim().parse().ok())
}

/// What a `POD=N,POD2=M` header (`x-status-on`, `x-delay-on`) asks of the
/// pod named `me`: a behaviour for one pod of a Service, whichever pod the
/// mesh sends each request to (load-balancing tests make one endpoint fail
/// or slow this way).
fn for_me(h: &HeaderMap, name: &str, me: &str) -> Option<u64> {
    header(h, name)?
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| k.trim() == me)
        .and_then(|(_, v)| v.trim().parse().ok())
}

fn lock(app: &App) -> std::sync::MutexGuard<'_, ConnStats> {
    app.stats.lock().unwrap_or_else(|e| e.into_inner())
}

/// [`handle`], counted for `--conn-stats` (and `/_stats` answered).
async fn counted(
    app: Arc<App>,
    conn: u64,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    if !app.a.conn_stats {
        return handle(app, peer, req).await;
    }
    if req.uri().path() == "/_stats" {
        let mut s = lock(&app);
        let body = s.json().to_string();
        if req.uri().query().is_some_and(|q| q.contains("reset=1")) {
            *s = ConnStats::default();
        }
        return Ok(Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)).boxed())
            .expect("valid response"));
    }
    {
        let mut s = lock(&app);
        *s.per_conn.entry(conn).or_default() += 1;
        s.requests += 1;
        s.in_flight += 1;
        s.max_in_flight = s.max_in_flight.max(s.in_flight);
    }
    let r = handle(app.clone(), peer, req).await;
    let mut s = lock(&app);
    s.in_flight = s.in_flight.saturating_sub(1);
    r
}

async fn handle(app: Arc<App>, peer: SocketAddr, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    if req.uri().path() == "/ws"
        && header(req.headers(), "upgrade").is_some_and(|u| u.eq_ignore_ascii_case("websocket"))
    {
        return Ok(websocket(&app.a.name, req));
    }
    let (parts, mut body) = req.into_parts();
    let h = &parts.headers;
    // Read the body whatever the method (this is what sends `100 Continue`).
    let (mut sha, mut bytes, mut body_error) = (Sha256::new(), 0u64, None);
    while let Some(f) = body.frame().await {
        match f {
            Ok(f) => {
                if let Some(d) = f.data_ref() {
                    sha.update(d);
                    bytes += d.len() as u64;
                }
            }
            Err(e) => {
                body_error = Some(e.to_string());
                break;
            }
        }
    }
    let delay = app.a.delay_ms + num(h, "x-delay-ms").unwrap_or(0) + for_me(h, "x-delay-on", &app.a.name).unwrap_or(0);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let mut status = StatusCode::OK;
    let mut attempt = None;
    if let (Some(times), Some(id)) = (num(h, "x-fail-times"), header(h, "x-request-id")) {
        let mut m = app.attempts.lock().expect("attempts lock");
        if m.len() > 100_000 {
            m.clear();
        }
        let n = m.entry(id.to_owned()).or_insert(0);
        *n += 1;
        attempt = Some(*n);
        if *n <= times {
            status = StatusCode::SERVICE_UNAVAILABLE;
        }
    }
    let path = parts.uri.path();
    let mut calls = Vec::new();
    if status == StatusCode::OK {
        let fwd: HeaderMap = h
            .iter()
            .filter(|(k, _)| FORWARDED.contains(&k.as_str()) || k.as_str().starts_with("x-b3-"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        match app.a.role {
            Role::Productpage if path.starts_with("/productpage") => {
                let (d, r) = tokio::join!(
                    call(&app, app.a.details.as_deref(), "/details/0", &fwd),
                    call(&app, app.a.reviews.as_deref(), "/reviews/0", &fwd)
                );
                calls.extend([d, r]);
            }
            Role::Reviews if path.starts_with("/reviews") && app.a.ratings.is_some() => {
                calls.push(call(&app, app.a.ratings.as_deref(), "/ratings/0", &fwd).await);
            }
            _ => {}
        }
    }
    if status == StatusCode::OK {
        let wanted = num(h, "x-status").or_else(|| for_me(h, "x-status-on", &app.a.name));
        if let Some(s) = wanted
            .and_then(|s| u16::try_from(s).ok())
            .and_then(|s| StatusCode::from_u16(s).ok())
        {
            status = s;
        }
    }
    let resp = Response::builder().status(status).header(
        "x-served-by",
        HeaderValue::from_str(&app.a.name).unwrap_or(HeaderValue::from_static("?")),
    );
    if let Some(n) = num(h, "x-body-bytes") {
        return Ok(resp
            .header("content-type", "application/octet-stream")
            .body(pattern_body(n))
            .expect("valid response"));
    }
    let headers: serde_json::Map<String, Value> = h
        .keys()
        .map(|k| {
            let v: Vec<_> = h
                .get_all(k)
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()))
                .collect();
            (k.as_str().to_owned(), Value::from(v.join(", ")))
        })
        .collect();
    let with_body = bytes > 0 || matches!(parts.method.as_str(), "POST" | "PUT") || body_error.is_some();
    let answer = json!({
        "pod": app.a.name,
        "version": app.a.version,
        "method": parts.method.as_str(),
        "path": parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"),
        "authority": parts.uri.authority().map(|a| a.as_str()).or(header(h, "host")),
        "proto": format!("{:?}", parts.version),
        "peer": peer.to_string(),
        "status": status.as_u16(),
        "attempt": attempt,
        "body": with_body.then(|| json!({"bytes": bytes, "sha256": hex(&sha.finalize()), "error": body_error})),
        "headers": headers,
        "calls": calls,
    });
    Ok(resp
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(answer.to_string())).boxed())
        .expect("valid response"))
}

/// One upstream call: `{"url", "status", "body": <JSON or null>, "error"}`,
/// `error` a kind (`timeout`, `connect`, ...) or null.
async fn call(app: &App, base: Option<&str>, path: &str, fwd: &HeaderMap) -> Value {
    let Some(base) = base else {
        return json!({"url": null, "status": null, "body": null, "error": "not configured"});
    };
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let mut req = match Request::get(&url).body(Empty::new()) {
        Ok(r) => r,
        Err(e) => return json!({"url": url, "status": null, "body": null, "error": format!("bad url: {e}")}),
    };
    req.headers_mut().extend(fwd.clone());
    let got = tokio::time::timeout(app.upstream_timeout, async {
        let r = app.client.request(req).await.map_err(|e| error_kind(&e))?;
        let status = r.status().as_u16();
        let body = r.into_body().collect().await.map_err(|_| "body")?.to_bytes();
        Ok::<_, &'static str>((status, body))
    })
    .await;
    match got {
        Err(_) => json!({"url": url, "status": null, "body": null, "error": "timeout"}),
        Ok(Err(kind)) => json!({"url": url, "status": null, "body": null, "error": kind}),
        Ok(Ok((status, body))) => json!({
            "url": url, "status": status,
            "body": serde_json::from_slice::<Value>(&body).ok(), "error": null,
        }),
    }
}

/// `n` bytes of `ferry_box::proto::pattern`, streamed in 16 KiB chunks (no
/// content-length: chunked on HTTP/1.1).
fn pattern_body(n: u64) -> Body {
    let chunks = futures::stream::unfold(0u64, move |off| async move {
        (off < n).then(|| {
            let mut buf = vec![0u8; (n - off).min(16 * 1024) as usize];
            pattern(off, &mut buf);
            let k = buf.len() as u64;
            (Ok(Frame::data(Bytes::from(buf))), off + k)
        })
    });
    BodyExt::boxed(StreamBody::new(chunks))
}

/// The RFC 6455 handshake answer; the upgraded connection echoes text and
/// binary messages until the client closes.
fn websocket(name: &str, mut req: Request<Incoming>) -> Response<Body> {
    let Some(key) = req
        .headers()
        .get("sec-websocket-key")
        .map(|k| derive_accept_key(k.as_bytes()))
    else {
        return Response::builder()
            .status(StatusCode::BAD_REQUEST)
            .body(Full::new(Bytes::from_static(b"missing sec-websocket-key")).boxed())
            .expect("valid response");
    };
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(up) = upgrade.await else { return };
        let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(up), WsRole::Server, None).await;
        while let Some(Ok(m)) = ws.next().await {
            if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                break;
            }
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("upgrade", "websocket")
        .header("connection", "Upgrade")
        .header("sec-websocket-accept", key)
        .header(
            "x-served-by",
            HeaderValue::from_str(name).unwrap_or(HeaderValue::from_static("?")),
        )
        .body(Empty::new().boxed())
        .expect("valid response")
}
