//! ferry-control: watches the cluster (a YAML directory here; Kubernetes with
//! --kubernetes), streams per-node config to agents and signs workload
//! certificates, on one gRPC endpoint (TLS). Agents are known by a static
//! token or, with --node-auth tokenreview, their service-account token.

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
    admin::Admin,
    ca::Ca,
    config_stream::DiscoveryService,
    config_stream::Store,
    nodeauth::{self, NodeAuth, TokenReviewConfig},
    source, IdentityService,
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
    /// How agents prove which node they are: `tokens` (a static bootstrap
    /// token per node, --tokens) or `tokenreview` (their projected
    /// service-account token, checked with the Kubernetes TokenReview API and
    /// mapped to a node through the agent's pod). docs/identity.md.
    #[arg(long, value_enum, default_value_t = NodeAuthMode::Tokens)]
    node_auth: NodeAuthMode,
    /// With --node-auth tokens: YAML map of node name -> bootstrap token
    /// (re-read on every check).
    #[arg(long)]
    tokens: Option<PathBuf>,
    /// With --node-auth tokenreview: the audience agents' tokens must be for.
    #[arg(long, default_value = ferry_control::nodeauth::DEFAULT_AUDIENCE)]
    token_audience: String,
    /// With --node-auth tokenreview: the agents' service account
    /// (system:serviceaccount:NAMESPACE:NAME). Default: ferry-agent in
    /// ferry-control's own namespace.
    #[arg(long)]
    agent_service_account: Option<String>,
    /// With --node-auth tokenreview: seconds an accepted token is remembered
    /// (refusals never are). 0: every check asks the API server.
    #[arg(long, default_value_t = 60)]
    token_cache_seconds: u64,
    #[arg(long, default_value = "0.0.0.0:15012")]
    listen: SocketAddr,
    /// Admin endpoint (/version /nodes /problems /metrics). Keep it on localhost.
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
    let (cert, key) = ca.server_cert("ferry-control")?;
    let store = Arc::new(Store::default());
    let problems = Arc::new(Mutex::new(Vec::new()));
    let nodes = Arc::new(Mutex::new(Default::default()));
    let client = match (&args.cluster_dir, args.node_auth) {
        (Some(_), NodeAuthMode::Tokens) => None,
        _ => Some(kube_client().await?),
    };
    let auth = Arc::new(node_auth(&args, client.as_ref())?);
    tracing::info!(mode = auth.mode(), "node authentication");
    match &args.cluster_dir {
        Some(dir) => {
            anyhow::ensure!(dir.is_dir(), "--cluster-dir {}: not a directory", dir.display());
            tokio::spawn(source::files::watch(dir.clone(), store.clone(), problems.clone()));
        }
        None => {
            let client = client.context("--kubernetes needs a Kubernetes client")?;
            tokio::spawn(source::kube::run(client, store.clone(), problems.clone()));
        }
    }
    let limiter = Arc::new(ferry_control::authz::FailureLimiter::default());
    let identity = IdentityService {
        ca,
        limiter: limiter.clone(),
        store: store.clone(),
        auth: auth.clone(),
        max_ttl: Duration::from_secs(args.max_ttl_seconds),
    };
    let admin = Arc::new(Admin {
        store: store.clone(),
        nodes: nodes.clone(),
        problems,
        auth: auth.clone(),
    });
    let admin_l = tokio::net::TcpListener::bind(args.admin)
        .await
        .with_context(|| format!("binding admin endpoint {}", args.admin))?;
    tokio::spawn(admin.serve(admin_l));
    let stream = DiscoveryService {
        store,
        auth,
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

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum NodeAuthMode {
    /// Static per-node bootstrap tokens (--tokens).
    Tokens,
    /// Projected service-account tokens checked with TokenReview.
    Tokenreview,
}

/// The node identity check `--node-auth` asks for, its settings checked now.
fn node_auth(args: &Args, client: Option<&kube::Client>) -> anyhow::Result<NodeAuth> {
    match (args.node_auth, client) {
        (NodeAuthMode::Tokens, _) => {
            let path = args.tokens.clone().context("--node-auth tokens needs --tokens")?;
            ferry_control::load_tokens(&path)?;
            Ok(NodeAuth::tokens(path))
        }
        (NodeAuthMode::Tokenreview, Some(client)) => {
            let account = match &args.agent_service_account {
                Some(a) => a.clone(),
                None => {
                    nodeauth::service_account_user(client.default_namespace(), nodeauth::DEFAULT_AGENT_SERVICE_ACCOUNT)
                }
            };
            anyhow::ensure!(
                nodeauth::is_service_account_user(&account),
                "--agent-service-account {account:?}: expected system:serviceaccount:NAMESPACE:NAME"
            );
            anyhow::ensure!(!args.token_audience.is_empty(), "--token-audience must not be empty");
            tracing::info!(audience = %args.token_audience, agent_service_account = %account, cache_s = args.token_cache_seconds, "agents authenticate with TokenReview");
            Ok(NodeAuth::token_review(
                client.clone(),
                TokenReviewConfig {
                    audience: args.token_audience.clone(),
                    service_account: account,
                    cache_ttl: Duration::from_secs(args.token_cache_seconds),
                    deadline: nodeauth::DEFAULT_DEADLINE,
                },
            ))
        }
        (NodeAuthMode::Tokenreview, None) => anyhow::bail!("--node-auth tokenreview needs a Kubernetes client"),
    }
}

async fn kube_client() -> anyhow::Result<kube::Client> {
    kube::Client::try_default()
        .await
        .context("no Kubernetes client config (in-cluster or KUBECONFIG)")
}
