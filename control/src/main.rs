//! ferry-control: the CA's gRPC endpoint (TLS).

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use clap::Parser;
use ferry_api::identity::identity_server::IdentityServer;
use ferry_control::{ca::Ca, IdentityService};
use tonic::transport::{Identity, Server, ServerTlsConfig};

#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// CA directory: ca.cert.pem + ca.key.pem (created if absent), optional trust-bundle.pem.
    #[arg(long)]
    ca_dir: PathBuf,
    /// Directory of cluster YAML (where pods run).
    #[arg(long)]
    cluster_dir: PathBuf,
    /// YAML map of node name -> bootstrap token.
    #[arg(long)]
    tokens: PathBuf,
    #[arg(long, default_value = "0.0.0.0:15012")]
    listen: SocketAddr,
    /// Longest certificate lifetime granted.
    #[arg(long, default_value_t = 86400)]
    max_ttl_seconds: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG").unwrap_or_else(|_| "info".into()))
        .init();
    let args = Args::parse();
    let ca = Arc::new(Ca::load_or_create(&args.ca_dir)?);
    ferry_control::load_tokens(&args.tokens)?;
    let (cert, key) = ca.server_cert("ferry-control")?;
    let svc = IdentityService {
        ca,
        cluster_dir: args.cluster_dir,
        tokens: args.tokens,
        max_ttl: Duration::from_secs(args.max_ttl_seconds),
    };
    tracing::info!(listen = %args.listen, "ferry-control CA serving");
    Server::builder()
        .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
        .context("TLS config")?
        .add_service(IdentityServer::new(svc))
        .serve(args.listen)
        .await
        .context("gRPC server")
}
