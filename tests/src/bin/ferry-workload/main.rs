//! Sample workload for the cluster-in-a-box: every server and client the
//! box's tests run inside pods. One binary, one subcommand per protocol:
//!
//! - `serve` / `client ...`: the TCP protocol of `ferry_box::proto`
//!   (WHO, ECHO, SINK, SOURCE), threaded, blocking I/O (`tcp`);
//! - `http serve|client|ws`: HTTP/1.1 and h2c with per-request behaviours and
//!   Bookinfo's roles, a load client, a WebSocket client (`http_server`,
//!   `http_client`);
//! - `grpc serve|client`: the `Echo` service of `tests/proto/echo.proto`
//!   (`grpc`);
//! - `banner serve|client`: a server-speaks-first protocol (`banner`).
//!
//! Every client prints one JSON line on stdout.

mod banner;
mod grpc;
mod http_client;
mod http_server;
mod tcp;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the TCP protocol on 0.0.0.0:PORT.
    Serve {
        #[arg(long)]
        name: String,
        #[arg(long)]
        port: u16,
    },
    /// TCP protocol client side; prints one JSON line.
    Client {
        #[command(subcommand)]
        op: tcp::Op,
    },
    /// HTTP/1.1 and HTTP/2 cleartext: the app server, a load client, a WebSocket client.
    Http {
        #[command(subcommand)]
        op: HttpOp,
    },
    /// gRPC: the Echo service (tests/proto/echo.proto) and its client.
    Grpc {
        #[command(subcommand)]
        op: GrpcOp,
    },
    /// A server-speaks-first protocol: `220 POD ready` on accept, then line echo.
    Banner {
        #[command(subcommand)]
        op: BannerOp,
    },
}

#[derive(Subcommand)]
enum HttpOp {
    Serve(http_server::ServeArgs),
    Client(http_client::ClientArgs),
    Ws(http_client::WsArgs),
}

#[derive(Subcommand)]
enum GrpcOp {
    Serve(grpc::ServeArgs),
    Client(grpc::ClientArgs),
}

#[derive(Subcommand)]
enum BannerOp {
    Serve(banner::ServeArgs),
    Client(banner::ClientArgs),
}

fn main() -> Result<()> {
    let rt = || tokio::runtime::Builder::new_multi_thread().enable_all().build();
    match Args::parse().cmd {
        Cmd::Serve { name, port } => tcp::serve(name, port),
        Cmd::Client { op } => tcp::client(op),
        Cmd::Http { op } => rt()?.block_on(async {
            match op {
                HttpOp::Serve(a) => http_server::serve(a).await,
                HttpOp::Client(a) => http_client::run(a).await,
                HttpOp::Ws(a) => http_client::ws(a).await,
            }
        }),
        Cmd::Grpc { op } => rt()?.block_on(async {
            match op {
                GrpcOp::Serve(a) => grpc::serve(a).await,
                GrpcOp::Client(a) => grpc::client(a).await,
            }
        }),
        Cmd::Banner { op } => rt()?.block_on(async {
            match op {
                BannerOp::Serve(a) => banner::serve(a).await,
                BannerOp::Client(a) => banner::client(a).await,
            }
        }),
    }
}
