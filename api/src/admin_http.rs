//! The one small HTTP/1 server behind every admin endpoint (the agent's
//! admin and metrics ports, ferry-control's admin port): each request is
//! answered synchronously by a handler from its method, path and query.
//! JSON and text helpers give every endpoint the same response shapes.

use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

pub type Body = Full<Bytes>;

/// A request, as handlers see it.
pub struct AdminRequest<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub query: Option<&'a str>,
}

/// Serves HTTP/1 on `listener` until the task is dropped. A failing accept
/// (EMFILE, say) waits, growing to 1 s, instead of spinning.
pub async fn serve<F>(listener: TcpListener, handle: F)
where
    F: Fn(AdminRequest<'_>) -> Response<Body> + Send + Sync + 'static,
{
    let handle = Arc::new(handle);
    let mut backoff = Duration::from_millis(10);
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => {
                backoff = Duration::from_millis(10);
                s
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "admin accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let resp = handle(AdminRequest {
                    method: req.method(),
                    path: req.uri().path(),
                    query: req.uri().query(),
                });
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

/// A pretty JSON response.
pub fn json<T: serde::Serialize + ?Sized>(v: &T) -> Response<Body> {
    match serde_json::to_vec_pretty(v) {
        Ok(body) => with_type("application/json", StatusCode::OK, body),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("cannot encode: {e}\n")),
    }
}

/// A plain-text response.
pub fn text(code: StatusCode, s: &str) -> Response<Body> {
    with_type("text/plain; charset=utf-8", code, s.as_bytes().to_vec())
}

/// A response with a content type.
pub fn with_type(content_type: &'static str, code: StatusCode, body: Vec<u8>) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}
