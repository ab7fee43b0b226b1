//! ferry-control: Ferry's control plane. It reads the cluster (Kubernetes
//! watches or a directory of YAML) into one typed model ([`model`]), turns it
//! into what each node needs ([`compute`]), streams that to the agents
//! ([`config_stream`]), and is the CA: it signs workload certificates only for
//! pods that run on the calling node. Which node is calling is decided in one
//! place ([`nodeauth`]: static tokens or Kubernetes TokenReview).

pub mod admin;
pub mod analyze;
pub mod authz;
pub mod ca;
pub mod compute;
pub mod config_stream;
pub mod model;
pub mod nodeauth;
pub mod routes;
pub mod source;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use ferry_api::identity::{identity_server::Identity, SignRequest, SignResponse};
use tonic::{Request, Response, Status};

pub use ferry_api::channel::bearer;

/// `node: token` pairs (the per-node bootstrap credentials).
pub fn load_tokens(path: &std::path::Path) -> anyhow::Result<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    serde_norway::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// The address a request came from (unspecified when unknown).
pub fn peer_ip<T>(req: &Request<T>) -> std::net::IpAddr {
    req.remote_addr()
        .map_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), |a| a.ip())
}

/// The gRPC status for a denial; a bad credential counts against `from`.
/// A credential that could not be checked (the API server is down) is
/// `UNAVAILABLE`, and not held against the caller.
pub fn denied_status(
    limiter: &authz::FailureLimiter,
    from: std::net::IpAddr,
    now: std::time::Instant,
    d: authz::Denied,
) -> Status {
    match d {
        authz::Denied::Unauthenticated | authz::Denied::Rejected(_) => {
            limiter.failed(from, now);
            Status::unauthenticated(d.to_string())
        }
        authz::Denied::Unavailable(_) => Status::unavailable(d.to_string()),
        authz::Denied::Throttled { .. } => Status::resource_exhausted(d.to_string()),
        _ => Status::permission_denied(d.to_string()),
    }
}

/// The node a request's credential belongs to (its bearer token), unless its
/// address is throttled; the one check every node-facing call makes. The
/// future holds nothing of the request.
pub fn authenticate<'a, T>(
    auth: &'a nodeauth::NodeAuth,
    limiter: &'a authz::FailureLimiter,
    req: &Request<T>,
) -> impl std::future::Future<Output = Result<String, authz::Denied>> + Send + 'a {
    let allowed = limiter.check(peer_ip(req), std::time::Instant::now());
    let token = bearer(req);
    async move {
        allowed?;
        auth.node_of(token.as_deref()).await
    }
}

pub struct IdentityService {
    pub ca: Arc<ca::Ca>,
    /// Throttles addresses that keep presenting bad credentials (shared with the stream).
    pub limiter: Arc<authz::FailureLimiter>,
    pub store: Arc<config_stream::Store>,
    /// Which node is asking (shared with the stream).
    pub auth: Arc<nodeauth::NodeAuth>,
    pub max_ttl: Duration,
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn sign(&self, req: Request<SignRequest>) -> Result<Response<SignResponse>, Status> {
        let from = peer_ip(&req);
        let node = authenticate(&self.auth, &self.limiter, &req).await;
        let now = std::time::Instant::now();
        let req = req.into_inner();
        let snap = self.store.current();
        let decision = node.and_then(|node| authz::authorize(&node, &snap.pods, &req.pod_uid).map(|id| (node, id)));
        let (node, id) = match decision {
            Ok(d) => d,
            Err(d) => {
                tracing::warn!(pod = %req.pod_uid, from = %from, reason = %d, "certificate request denied");
                return Err(denied_status(&self.limiter, from, now, d));
            }
        };
        let ttl = Duration::from_secs(req.ttl_seconds.max(1).into()).min(self.max_ttl);
        let signed = self
            .ca
            .sign_workload(&req.csr_pem, &id, ttl)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        tracing::info!(pod = %req.pod_uid, node = %node, spiffe_id = %id, ttl_s = ttl.as_secs(), "certificate issued");
        Ok(Response::new(SignResponse {
            cert_chain_pem: signed.chain_pem,
            spiffe_id: id,
            not_after_unix: signed.not_after_unix,
            trust_bundle_pem: self.ca.trust_bundle_pem().to_owned(),
        }))
    }
}
