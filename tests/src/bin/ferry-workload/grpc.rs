//! `grpc serve|client`: the `Echo` service of `tests/proto/echo.proto` over
//! h2c. Replies name the pod; a request's `fail_code` ends the call with that
//! status (message `fail_message`); every response carries the trailer
//! `x-pod: POD` (also on a non-OK status, as its metadata). The client
//! prints the messages, the final status and the trailers as one JSON line.

use std::{convert::Infallible, net::SocketAddr, pin::Pin, time::Duration};

use anyhow::{Context, Result};
use futures::{Stream, StreamExt};
use http_body_util::BodyExt;
use hyper::{body::Incoming, header::HeaderValue, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tonic::{codegen::Service, metadata::MetadataMap, Code, Request, Response, Status, Streaming};

pub mod pb {
    tonic::include_proto!("ferry.echo");
}
use pb::{
    echo_client::EchoClient,
    echo_server::{Echo, EchoServer},
    EchoReply, EchoRequest,
};

#[derive(clap::Args)]
pub struct ServeArgs {
    #[arg(long)]
    name: String,
    #[arg(long)]
    port: u16,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Op {
    Unary,
    ServerStream,
    Bidi,
}

#[derive(clap::Args)]
pub struct ClientArgs {
    #[arg(long)]
    to: SocketAddr,
    #[arg(long, value_enum)]
    op: Op,
    /// server-stream: replies asked for; bidi: requests sent (unary: 1).
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// Ask the server to end the call with this gRPC status code (bidi: on
    /// the last request).
    #[arg(long, default_value_t = 0)]
    fail_code: i32,
    #[arg(long, default_value = "requested failure")]
    fail_message: String,
    /// Server-side delay before each reply.
    #[arg(long, default_value_t = 0)]
    delay_ms: u32,
    /// Deadline for the whole call.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
}

struct Svc {
    pod: String,
}

type Replies = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

fn failure(pod: &str, r: &EchoRequest) -> Option<Status> {
    (r.fail_code != 0).then(|| {
        let msg = if r.fail_message.is_empty() {
            "requested failure"
        } else {
            &r.fail_message
        };
        let mut s = Status::new(Code::from_i32(r.fail_code), msg);
        if let Ok(v) = pod.parse() {
            s.metadata_mut().insert("x-pod", v);
        }
        s
    })
}

async fn delay(ms: u32) {
    if ms > 0 {
        tokio::time::sleep(Duration::from_millis(ms.into())).await;
    }
}

#[tonic::async_trait]
impl Echo for Svc {
    async fn unary(&self, r: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let r = r.into_inner();
        delay(r.delay_ms).await;
        if let Some(s) = failure(&self.pod, &r) {
            return Err(s);
        }
        Ok(Response::new(EchoReply {
            message: r.message,
            pod: self.pod.clone(),
            seq: 0,
        }))
    }

    type ServerStreamStream = Replies;

    async fn server_stream(&self, r: Request<EchoRequest>) -> Result<Response<Replies>, Status> {
        let r = r.into_inner();
        let pod = self.pod.clone();
        let end = failure(&pod, &r);
        let (message, delay_ms) = (r.message, r.delay_ms);
        let replies = futures::stream::iter(0..r.count)
            .then(move |seq| {
                let (message, pod) = (message.clone(), pod.clone());
                async move {
                    delay(delay_ms).await;
                    Ok(EchoReply { message, pod, seq })
                }
            })
            .chain(futures::stream::iter(end.map(Err)));
        Ok(Response::new(Box::pin(replies)))
    }

    type BidiStreamStream = Replies;

    async fn bidi_stream(&self, r: Request<Streaming<EchoRequest>>) -> Result<Response<Replies>, Status> {
        let mut inbound = r.into_inner();
        let pod = self.pod.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let mut seq = 0;
            while let Some(m) = inbound.next().await {
                let Ok(m) = m else { break };
                delay(m.delay_ms).await;
                let reply = EchoReply {
                    message: m.message.clone(),
                    pod: pod.clone(),
                    seq,
                };
                seq += 1;
                if tx.send(Ok(reply)).await.is_err() {
                    break;
                }
                if let Some(s) = failure(&pod, &m) {
                    let _ = tx.send(Err(s)).await;
                    break;
                }
            }
        });
        let out = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) });
        Ok(Response::new(Box::pin(out)))
    }
}

/// Serves Echo over h2c with hyper directly (not tonic's server), so every
/// response's trailers can be given `x-pod`.
pub async fn serve(a: ServeArgs) -> Result<()> {
    let l = TcpListener::bind(("0.0.0.0", a.port))
        .await
        .with_context(|| format!("bind {}", a.port))?;
    let pod = HeaderValue::from_str(&a.name).context("--name as a header value")?;
    let echo = EchoServer::new(Svc { pod: a.name });
    loop {
        let Ok((s, _)) = l.accept().await else { continue };
        let (echo, pod) = (echo.clone(), pod.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req: hyper::Request<Incoming>| {
                let (mut echo, pod) = (echo.clone(), pod.clone());
                async move {
                    let resp = echo.call(req).await?;
                    Ok::<_, Infallible>(resp.map(|b| {
                        b.map_frame(move |mut f| {
                            if let Some(t) = f.trailers_mut() {
                                t.insert("x-pod", pod.clone());
                            }
                            f
                        })
                    }))
                }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(s), svc)
                .await;
        });
    }
}

fn metadata_json(m: &MetadataMap) -> Value {
    let h = m.clone().into_headers();
    h.keys()
        .map(|k| {
            let v: Vec<_> = h
                .get_all(k)
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()))
                .collect();
            (k.as_str().to_owned(), Value::from(v.join(", ")))
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

#[derive(Default)]
struct Outcome {
    messages: Vec<Value>,
    headers: Option<Value>,
    status: Option<Status>,
    trailers: Option<Value>,
}

impl Outcome {
    fn reply(&mut self, r: EchoReply) {
        self.messages
            .push(json!({"message": r.message, "pod": r.pod, "seq": r.seq}));
    }
    fn failed(&mut self, s: Status) {
        self.trailers = Some(metadata_json(s.metadata()));
        self.status = Some(s);
    }
    async fn drain(&mut self, r: Result<Response<Streaming<EchoReply>>, Status>) {
        let mut st = match r {
            Ok(r) => {
                self.headers = Some(metadata_json(r.metadata()));
                r.into_inner()
            }
            Err(s) => return self.failed(s),
        };
        loop {
            match st.message().await {
                Ok(Some(m)) => self.reply(m),
                Ok(None) => break,
                Err(s) => return self.failed(s),
            }
        }
        self.status = Some(Status::ok(""));
        if let Ok(Some(t)) = st.trailers().await {
            self.trailers = Some(metadata_json(&t));
        }
    }
}

/// Prints `{"op", "received", "messages": [{"message", "pod", "seq"}],
/// "code", "code_name", "message", "headers", "trailers", "error", "ms"}`.
/// For unary, `trailers` is tonic's merged view (headers and trailers);
/// `error` is a transport failure (`connect: ...`, `timeout`), with `code`
/// null. Never fails on what the server did.
pub async fn client(a: ClientArgs) -> Result<()> {
    let t = std::time::Instant::now();
    let mut out = Outcome::default();
    let req = |i: u32, last: bool| EchoRequest {
        message: format!("msg-{i}"),
        fail_code: if last { a.fail_code } else { 0 },
        fail_message: a.fail_message.clone(),
        count: a.count,
        delay_ms: a.delay_ms,
    };
    let deadline = Duration::from_millis(a.timeout_ms);
    let err = tokio::time::timeout(deadline, async {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", a.to))
            .map_err(|e| format!("endpoint: {e}"))?
            .connect_timeout(deadline)
            .connect()
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut c = EchoClient::new(ch);
        match a.op {
            Op::Unary => match c.unary(req(0, true)).await {
                Ok(r) => {
                    out.trailers = Some(metadata_json(r.metadata()));
                    out.reply(r.into_inner());
                    out.status = Some(Status::ok(""));
                }
                Err(s) => out.failed(s),
            },
            Op::ServerStream => out.drain(c.server_stream(req(0, true)).await).await,
            Op::Bidi => {
                let n = a.count;
                let reqs: Vec<_> = (0..n).map(|i| req(i, i + 1 == n)).collect();
                out.drain(c.bidi_stream(futures::stream::iter(reqs)).await).await
            }
        }
        Ok::<_, String>(())
    })
    .await
    .unwrap_or_else(|_| Err("timeout".into()))
    .err();
    let code = out.status.as_ref().map(|s| s.code());
    println!(
        "{}",
        json!({
            "op": format!("{:?}", a.op), "received": out.messages.len(), "messages": out.messages,
            "code": code.map(|c| c as i32), "code_name": code.map(|c| format!("{c:?}")),
            "message": out.status.as_ref().map(|s| s.message().to_owned()),
            "headers": out.headers, "trailers": out.trailers, "error": err,
            "ms": t.elapsed().as_millis() as u64,
        })
    );
    Ok(())
}
