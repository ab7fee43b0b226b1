//! ferry-control: Ferry's control plane. It reads the cluster (Kubernetes
//! watches or a directory of YAML) into one typed model ([`model`]), turns it
//! into what each node needs ([`compute`]), streams that to the agents
//! ([`config_stream`]), and is the CA: it signs workload certificates only for
//! pods that run on the calling node.

pub mod admin;
pub mod analyze;
pub mod authz;
pub mod ca;
pub mod compute;
pub mod config_stream;
pub mod model;
pub mod routes;
pub mod source;

use std::{collections::BTreeMap, path::PathBuf, sync::Arc, time::Duration};

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
pub fn denied_status(
    limiter: &authz::FailureLimiter,
    from: std::net::IpAddr,
    now: std::time::Instant,
    d: authz::Denied,
) -> Status {
    match d {
        authz::Denied::Unauthenticated => {
            limiter.failed(from, now);
            Status::unauthenticated(d.to_string())
        }
        authz::Denied::Throttled { .. } => Status::resource_exhausted(d.to_string()),
        _ => Status::permission_denied(d.to_string()),
    }
}

pub struct IdentityService {
    pub ca: Arc<ca::Ca>,
    /// Throttles addresses that keep presenting bad credentials (shared with the stream).
    pub limiter: Arc<authz::FailureLimiter>,
    pub store: Arc<config_stream::Store>,
    pub tokens: PathBuf,
    pub max_ttl: Duration,
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn sign(&self, req: Request<SignRequest>) -> Result<Response<SignResponse>, Status> {
        let token = bearer(&req);
        let from = peer_ip(&req);
        let now = std::time::Instant::now();
        let req = req.into_inner();
        let tokens = load_tokens(&self.tokens).map_err(|e| Status::internal(e.to_string()))?;
        let snap = self.store.current();
        let decision = self
            .limiter
            .check(from, now)
            .and_then(|()| authz::authorize(&tokens, &snap.pods, token.as_deref(), &req.pod_uid));
        let id = match decision {
            Ok(id) => id,
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
        tracing::info!(pod = %req.pod_uid, spiffe_id = %id, ttl_s = ttl.as_secs(), "certificate issued");
        Ok(Response::new(SignResponse {
            cert_chain_pem: signed.chain_pem,
            spiffe_id: id,
            not_after_unix: signed.not_after_unix,
            trust_bundle_pem: self.ca.trust_bundle_pem().to_owned(),
        }))
    }
}
