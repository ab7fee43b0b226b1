//! ferry-control: Ferry's control plane. Today it is the CA: it signs workload
//! certificates over gRPC (tonic, TLS) for agents, and only for pods that run
//! on the calling node. Its cluster view is a directory of the same YAML the
//! agents read (the cluster-in-a-box); the Kubernetes watcher is a later issue.

pub mod authz;
pub mod ca;

use std::{collections::BTreeMap, path::PathBuf, sync::Arc, time::Duration};

use ferry_agent::config::{ConfigFile, Workload};
use ferry_api::identity::{identity_server::Identity, SignRequest, SignResponse};
use tonic::{Request, Response, Status};

/// The pods of every YAML file in `dir` (a broken file is skipped and logged).
pub fn cluster_pods(dir: &std::path::Path) -> BTreeMap<String, Workload> {
    let mut pods = BTreeMap::new();
    let Ok(rd) = std::fs::read_dir(dir) else { return pods };
    for e in rd.flatten() {
        let p = e.path();
        if p.extension().and_then(|x| x.to_str()) != Some("yaml") {
            continue;
        }
        match ConfigFile::load(&p) {
            Ok(c) => pods.extend(c.workloads.into_iter().map(|w| (w.uid.clone(), w))),
            Err(err) => tracing::warn!(error = %err, "skipping cluster file"),
        }
    }
    pods
}

/// `node: token` pairs (the per-node bootstrap credentials).
pub fn load_tokens(path: &std::path::Path) -> anyhow::Result<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    serde_norway::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

pub struct IdentityService {
    pub ca: Arc<ca::Ca>,
    pub cluster_dir: PathBuf,
    pub tokens: PathBuf,
    pub max_ttl: Duration,
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn sign(&self, req: Request<SignRequest>) -> Result<Response<SignResponse>, Status> {
        let token = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_owned);
        let req = req.into_inner();
        let tokens = load_tokens(&self.tokens).map_err(|e| Status::internal(e.to_string()))?;
        let pods = cluster_pods(&self.cluster_dir);
        let id = match authz::authorize(&tokens, &pods, token.as_deref(), &req.pod_uid) {
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
