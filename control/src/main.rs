//! ferry-control: watches the cluster (a YAML directory here; Kubernetes with
//! --kubernetes), streams per-node config to agents and signs workload
//! certificates, on one gRPC endpoint (TLS).

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context;
use clap::Parser;
use ferry_api::{discovery::discovery_server::DiscoveryServer, identity::identity_server::IdentityServer};
use ferry_control::{
    admin::Admin, ca::Ca, config_stream::DiscoveryService, config_stream::Store, source, IdentityService,
};
use tonic::transport::{Identity, Server, ServerTlsConfig};

#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// CA directory: ca.cert.pem + ca.key.pem (created if absent), optional trust-bundle.pem.
    #[arg(long)]
    ca_dir: PathBuf,
    /// Directory of cluster YAML (Kubernetes shapes: Namespaces, Pods,
    /// Services, EndpointSlices, Istio and Gateway API objects), re-read on change.
    #[arg(long, required_unless_present = "kubernetes")]
    cluster_dir: Option<PathBuf>,
    /// Watch the Kubernetes API (in-cluster config or KUBECONFIG) instead of a directory.
    #[arg(long, conflicts_with = "cluster_dir")]
    kubernetes: bool,
    /// YAML map of node name -> bootstrap token.
    #[arg(long)]
    tokens: PathBuf,
    #[arg(long, default_value = "0.0.0.0:15012")]
    listen: SocketAddr,
    /// Admin endpoint (/version /nodes /problems). Keep it on localhost.
    #[arg(long, default_value = "127.0.0.1:15014")]
    admin: SocketAddr,
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
    let store = Arc::new(Store::default());
    let problems = Arc::new(Mutex::new(Vec::new()));
    let nodes = Arc::new(Mutex::new(Default::default()));
    match &args.cluster_dir {
        Some(dir) => {
            anyhow::ensure!(dir.is_dir(), "--cluster-dir {}: not a directory", dir.display());
            tokio::spawn(source::files::watch(dir.clone(), store.clone(), problems.clone()));
        }
        None => {
            let client = kube_client().await?;
            tokio::spawn(source::kube::run(client, store.clone(), problems.clone()));
        }
    }
    let limiter = Arc::new(ferry_control::authz::FailureLimiter::default());
    let identity = IdentityService {
        ca,
        limiter: limiter.clone(),
        store: store.clone(),
        tokens: args.tokens.clone(),
        max_ttl: Duration::from_secs(args.max_ttl_seconds),
    };
    let admin = Arc::new(Admin {
        store: store.clone(),
        nodes: nodes.clone(),
        problems,
    });
    let admin_l = tokio::net::TcpListener::bind(args.admin)
        .await
        .with_context(|| format!("binding admin endpoint {}", args.admin))?;
    tokio::spawn(admin.serve(admin_l));
    let stream = DiscoveryService {
        store,
        tokens: args.tokens,
        status: nodes,
        limiter,
    };
    tracing::info!(listen = %args.listen, "ferry-control serving (CA and config stream)");
    Server::builder()
        .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
        .context("TLS config")?
        .add_service(IdentityServer::new(identity))
        .add_service(DiscoveryServer::new(stream))
        .serve(args.listen)
        .await
        .context("gRPC server")
}

async fn kube_client() -> anyhow::Result<kube::Client> {
    kube::Client::try_default()
        .await
        .context("no Kubernetes client config (in-cluster or KUBECONFIG)")
}
