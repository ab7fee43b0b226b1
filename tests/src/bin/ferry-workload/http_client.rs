//! `http client` (a bounded load client that counts who answered) and
//! `http ws` (a WebSocket echo check). Both print one JSON line and never
//! fail on what the server or the network did: that is what they report.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use bytes::Bytes;
use ferry_box::proto::pattern;
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::{
    header::{HeaderName, HeaderValue},
    Method, Request,
};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};

fn parse_header(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once(':').ok_or_else(|| format!("{s:?}: expected NAME:VALUE"))?;
    Ok((k.trim().to_ascii_lowercase(), v.trim().to_owned()))
}

#[derive(clap::Args)]
pub struct ClientArgs {
    /// e.g. http://10.96.0.20:9080/productpage
    #[arg(long)]
    url: String,
    #[arg(long, default_value_t = 1)]
    count: u64,
    /// Requests in flight at once (over pooled connections).
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// NAME:VALUE, repeatable; `{i}` in a value becomes the request's index
    /// (e.g. `x-request-id:r{i}`), `{k}` its key (with `--keys`).
    #[arg(long = "header", value_parser = parse_header)]
    headers: Vec<(String, String)>,
    /// Request i has key `i % N` (`{k}` in header values), and answers are
    /// also counted per key and pod (`by_key`): which pod each key reached.
    #[arg(long)]
    keys: Option<u64>,
    #[arg(long, default_value = "GET")]
    method: String,
    /// Send a body of N deterministic bytes (`ferry_box::proto::pattern`).
    #[arg(long)]
    body_bytes: Option<u64>,
    /// HTTP/2 with prior knowledge (else HTTP/1.1).
    #[arg(long)]
    h2c: bool,
    /// Deadline of each request, response body included.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
}

/// What a failed request is counted as: `connect`, `timeout`, `reset`,
/// `stream_reset` (HTTP/2 RST_STREAM), `closed`, `incomplete`, `canceled`,
/// `request`.
pub fn error_kind(e: &hyper_util::client::legacy::Error) -> &'static str {
    if e.is_connect() {
        return "connect";
    }
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        if let Some(h) = s.downcast_ref::<hyper::Error>() {
            if h.is_timeout() {
                return "timeout";
            }
            if h.is_incomplete_message() {
                return "incomplete";
            }
            if h.is_canceled() {
                return "canceled";
            }
            if h.is_closed() {
                return "closed";
            }
        }
        if s.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionReset)
        {
            return "reset";
        }
        if s.to_string().contains("stream error") {
            return "stream_reset";
        }
        src = s.source();
    }
    "request"
}

#[derive(Default)]
struct Stats {
    by_status: BTreeMap<String, u64>,
    by_pod: BTreeMap<String, u64>,
    by_key: BTreeMap<String, BTreeMap<String, u64>>,
    by_proto: BTreeMap<String, u64>,
    by_nested: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
    ms: Vec<f64>,
    bytes: u64,
}

/// Counts every pod in an answer's `calls`, recursively (productpage ->
/// reviews -> ratings); a failed call counts as `error:<kind>`, a call
/// answered by no pod (refused by the mesh) as `status:<code>`.
fn count_nested(answer: &Value, into: &mut BTreeMap<String, u64>) {
    for c in answer["calls"].as_array().into_iter().flatten() {
        if let Some(pod) = c["body"]["pod"].as_str() {
            *into.entry(pod.to_owned()).or_default() += 1;
            count_nested(&c["body"], into);
        } else if let Some(e) = c["error"].as_str() {
            *into.entry(format!("error:{e}")).or_default() += 1;
        } else if let Some(st) = c["status"].as_u64() {
            // Answered, but not by a pod (the mesh refused it: 403 RBAC, 503...).
            *into.entry(format!("status:{st}")).or_default() += 1;
        }
    }
}

/// Prints `{"sent", "by_status", "by_pod", "by_proto", "by_nested",
/// "errors", "p50_ms", "p99_ms", "max_ms", "bytes", "elapsed_ms"}`: `by_pod`
/// from `x-served-by`, `by_proto` the HTTP version answered (`HTTP/2.0`),
/// latencies over the requests answered, `errors` by `error_kind`.
pub async fn run(a: ClientArgs) -> Result<()> {
    let method = Method::from_bytes(a.method.as_bytes()).context("--method")?;
    let _: hyper::Uri = a.url.parse().context("--url")?;
    let body = a.body_bytes.map(|n| {
        let mut b = vec![0u8; n as usize];
        pattern(0, &mut b);
        Bytes::from(b)
    });
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).http2_only(a.h2c).build_http();
    let next = Arc::new(AtomicU64::new(0));
    let stats = Arc::new(Mutex::new(Stats::default()));
    let a = Arc::new(a);
    let started = Instant::now();
    let workers: Vec<_> = (0..a.concurrency.max(1))
        .map(|_| {
            let (a, client, next, stats, method, body) = (
                a.clone(),
                client.clone(),
                next.clone(),
                stats.clone(),
                method.clone(),
                body.clone(),
            );
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= a.count {
                        break;
                    }
                    let mut req = Request::builder().method(method.clone()).uri(&a.url);
                    for (k, v) in &a.headers {
                        let key = a.keys.filter(|n| *n > 0).map_or(0, |n| i % n);
                        req = req.header(
                            k.as_str(),
                            v.replace("{i}", &i.to_string()).replace("{k}", &key.to_string()),
                        );
                    }
                    let req = req
                        .body(Full::new(body.clone().unwrap_or_default()))
                        .expect("valid request");
                    let t = Instant::now();
                    let got = tokio::time::timeout(Duration::from_millis(a.timeout_ms), async {
                        let r = client.request(req).await.map_err(|e| error_kind(&e))?;
                        let status = r.status().as_u16();
                        let proto = format!("{:?}", r.version());
                        let pod = r
                            .headers()
                            .get("x-served-by")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned);
                        let b = r.into_body().collect().await.map_err(|_| "body")?.to_bytes();
                        Ok::<_, &'static str>((status, proto, pod, b))
                    })
                    .await
                    .unwrap_or(Err("timeout"));
                    let ms = t.elapsed().as_secs_f64() * 1000.0;
                    let mut s = stats.lock().expect("stats lock");
                    match got {
                        Ok((status, proto, pod, b)) => {
                            *s.by_proto.entry(proto).or_default() += 1;
                            *s.by_status.entry(status.to_string()).or_default() += 1;
                            let pod = pod.unwrap_or_else(|| "-".into());
                            if let Some(n) = a.keys.filter(|n| *n > 0) {
                                *s.by_key
                                    .entry((i % n).to_string())
                                    .or_default()
                                    .entry(pod.clone())
                                    .or_default() += 1;
                            }
                            *s.by_pod.entry(pod).or_default() += 1;
                            if let Ok(v) = serde_json::from_slice::<Value>(&b) {
                                count_nested(&v, &mut s.by_nested);
                            }
                            s.bytes += b.len() as u64;
                            s.ms.push(ms);
                        }
                        Err(kind) => *s.errors.entry(kind.to_owned()).or_default() += 1,
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.await?;
    }
    let mut s = std::mem::take(&mut *stats.lock().expect("stats lock"));
    s.ms.sort_by(f64::total_cmp);
    let p = |q: f64| {
        (!s.ms.is_empty()).then(|| {
            let v = s.ms[((s.ms.len() as f64 * q) as usize).min(s.ms.len() - 1)];
            (v * 100.0).round() / 100.0
        })
    };
    println!(
        "{}",
        json!({
            "sent": a.count, "by_status": s.by_status, "by_pod": s.by_pod, "by_proto": s.by_proto, "by_nested": s.by_nested,
            "errors": s.errors, "by_key": s.by_key, "p50_ms": p(0.5), "p99_ms": p(0.99), "max_ms": p(1.0),
            "bytes": s.bytes, "elapsed_ms": started.elapsed().as_millis() as u64,
        })
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct WsArgs {
    /// e.g. ws://10.96.0.20:9080/ws
    #[arg(long)]
    url: String,
    /// Text messages to send (each must come back).
    #[arg(long, default_value_t = 3)]
    count: u64,
    #[arg(long = "header", value_parser = parse_header)]
    headers: Vec<(String, String)>,
    /// Deadline for the whole exchange.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
}

/// Prints `{"status": 101, "served_by", "sent", "echoed", "ok", "error", "ms"}`.
pub async fn ws(a: WsArgs) -> Result<()> {
    let t = Instant::now();
    let mut req = a.url.as_str().into_client_request().context("--url")?;
    for (k, v) in &a.headers {
        req.headers_mut()
            .insert(HeaderName::from_bytes(k.as_bytes())?, HeaderValue::from_str(v)?);
    }
    let authority = req.uri().authority().context("--url needs host:port")?.to_string();
    let (mut status, mut served_by, mut echoed) = (None, None, 0u64);
    let res = tokio::time::timeout(Duration::from_millis(a.timeout_ms), async {
        let s = tokio::net::TcpStream::connect(&authority)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let (mut ws, resp) = tokio_tungstenite::client_async(req, s)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        status = Some(resp.status().as_u16());
        served_by = resp
            .headers()
            .get("x-served-by")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        for i in 0..a.count {
            let m = format!("msg-{i}");
            ws.send(Message::text(m.clone()))
                .await
                .map_err(|e| format!("send: {e}"))?;
            match ws.next().await {
                Some(Ok(Message::Text(t))) if t.as_str() == m => echoed += 1,
                Some(Ok(other)) => return Err(format!("unexpected message {other:?}")),
                Some(Err(e)) => return Err(format!("read: {e}")),
                None => return Err("closed".to_owned()),
            }
        }
        let _ = ws.close(None).await;
        Ok(())
    })
    .await
    .unwrap_or_else(|_| Err("timeout".to_owned()));
    println!(
        "{}",
        json!({
            "status": status, "served_by": served_by, "sent": a.count, "echoed": echoed,
            "ok": res.is_ok() && echoed == a.count, "error": res.err(),
            "ms": t.elapsed().as_millis() as u64,
        })
    );
    Ok(())
}
