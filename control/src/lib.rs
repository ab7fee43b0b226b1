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

pub struct IdentityService {
    pub ca: Arc<ca::Ca>,
    pub store: Arc<config_stream::Store>,
    pub tokens: PathBuf,
    pub max_ttl: Duration,
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn sign(&self, req: Request<SignRequest>) -> Result<Response<SignResponse>, Status> {
        let token = bearer(&req);
        let req = req.into_inner();
        let tokens = load_tokens(&self.tokens).map_err(|e| Status::internal(e.to_string()))?;
        let snap = self.store.current();
        let id = match authz::authorize(&tokens, &snap.pods, token.as_deref(), &req.pod_uid) {
            Ok(id) => id,
            Err(d) => {
                tracing::warn!(pod = %req.pod_uid, reason = %d, "certificate request denied");
                return Err(match d {
                    authz::Denied::Unauthenticated => Status::unauthenticated(d.to_string()),
                    _ => Status::permission_denied(d.to_string()),
                });
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
