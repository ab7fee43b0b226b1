//! Workload identities on this node: a key pair per local enrolled workload
//! (made here, never sent anywhere), a certificate for it from the CA
//! (ferry-control, gRPC over TLS, authenticated by the node's credential: a
//! bootstrap token or the agent pod's projected service-account token, read
//! afresh for every request), renewed at half its lifetime with jitter. Renewal swaps the
//! certificate for new connections; live connections keep theirs.

pub mod tls;

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use ferry_api::{
    channel::{self, ChannelError, ControlEndpoint},
    identity::{identity_client::IdentityClient, SignRequest, SignResponse},
};
use ferry_model::{admin::CertView, SpiffeId};
use prometheus_client::{collector::Collector, encoding::DescriptorEncoder, registry::Registry};
use rustls::{ClientConfig, ServerConfig};

#[derive(Clone, Debug)]
pub struct Options {
    /// The CA's gRPC endpoint, e.g. https://10.1.1.1:15012.
    pub control: String,
    /// Root that signed the CA's serving certificate (bootstrap trust).
    pub control_ca: PathBuf,
    /// This node's credential (a bootstrap token or the projected
    /// service-account token), re-read for every certificate request.
    pub token_file: PathBuf,
    pub ttl: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("the CA: {0}")]
    Channel(#[from] ChannelError),
    #[error("the CA refused: {0}")]
    Refused(String),
    #[error("key or CSR: {0}")]
    Key(String),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("the CA answered with a bad SPIFFE id: {0}")]
    BadId(#[from] ferry_model::spiffe::BadSpiffeId),
    #[error("refused the CA's certificate: it is for {got}, the workload is {expected}")]
    WrongIdentity { got: String, expected: SpiffeId },
    #[error("refused the CA's certificate: it does not carry this workload's key")]
    WrongKey,
    #[error("refused the CA's certificate: {0}")]
    BadChain(String),
}

/// A workload's current certificate and the TLS configs built from it.
pub struct WorkloadCert {
    pub spiffe_id: SpiffeId,
    pub serial: String,
    pub not_after_unix: i64,
    pub issued_at: SystemTime,
    pub server: Arc<ServerConfig>,
    pub client: Arc<ClientConfig>,
}

impl std::fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadCert")
            .field("spiffe_id", &self.spiffe_id.to_string())
            .field("serial", &self.serial)
            .field("not_after_unix", &self.not_after_unix)
            .finish_non_exhaustive()
    }
}

pub struct Identities {
    opts: Options,
    certs: RwLock<HashMap<String, Arc<WorkloadCert>>>,
    pub rotations: std::sync::atomic::AtomicU64,
    pub failures: std::sync::atomic::AtomicU64,
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// When to renew: half the lifetime, minus up to 10% jitter so a node's
/// workloads do not all renew at once.
pub fn renew_after(issued_at: SystemTime, not_after_unix: i64, jitter: f64) -> Duration {
    let issued = issued_at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    let life = (not_after_unix - issued).max(2) as f64;
    Duration::from_secs_f64((life / 2.0) * (1.0 - 0.1 * jitter.clamp(0.0, 1.0)))
}

impl Identities {
    pub fn new(opts: Options) -> Arc<Self> {
        Arc::new(Self {
            opts,
            certs: RwLock::new(HashMap::new()),
            rotations: 0.into(),
            failures: 0.into(),
        })
    }

    pub fn get(&self, uid: &str) -> Option<Arc<WorkloadCert>> {
        self.certs.read().unwrap_or_else(|e| e.into_inner()).get(uid).cloned()
    }

    pub fn forget(&self, uid: &str) {
        self.certs.write().unwrap_or_else(|e| e.into_inner()).remove(uid);
    }

    pub fn views(&self) -> Vec<CertView> {
        let now = now_unix();
        let mut v: Vec<_> = self
            .certs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(uid, c)| CertView {
                uid: uid.clone(),
                spiffe_id: c.spiffe_id.clone(),
                serial: c.serial.clone(),
                not_after_unix: c.not_after_unix,
                seconds_to_expiry: c.not_after_unix - now,
                seconds_to_rotation: renew_after(c.issued_at, c.not_after_unix, 0.0).as_secs() as i64
                    - c.issued_at.elapsed().map_or(0, |d| d.as_secs() as i64),
            })
            .collect();
        v.sort_by(|a, b| a.uid.cmp(&b.uid));
        v
    }

    /// Registers the certificate metrics.
    pub fn register_metrics(self: &Arc<Self>, r: &mut Registry) {
        r.register_collector(Box::new(CertCollector(self.clone())));
    }

    /// Makes a key, has the CA sign it, and installs the result for `uid`.
    pub async fn fetch(&self, uid: &str, expected: &SpiffeId) -> Result<Arc<WorkloadCert>, IdentityError> {
        let token = channel::read_token(&self.opts.token_file)?;
        let key = rcgen::KeyPair::generate().map_err(|e| IdentityError::Key(e.to_string()))?;
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .and_then(|c| c.pem())
            .map_err(|e| IdentityError::Key(e.to_string()))?;
        let req = channel::with_token(
            SignRequest {
                pod_uid: uid.to_owned(),
                csr_pem: csr,
                ttl_seconds: self.opts.ttl.as_secs() as u32,
            },
            &token,
        )?;
        let ch = ControlEndpoint::from_ca_file(&self.opts.control, &self.opts.control_ca)?
            .connect()
            .await?;
        let resp = IdentityClient::new(ch)
            .sign(req)
            .await
            .map_err(|s| IdentityError::Refused(s.message().to_owned()))?
            .into_inner();
        self.install(uid, expected, &resp, &key.serialize_pem())
    }

    /// Installs a signed certificate (with its key) as `uid`'s, once it is
    /// verified: it chains to the trust bundle (for client and server use,
    /// valid now), it carries the key made here, and its SPIFFE id is the
    /// workload's (`expected`). A misbehaving CA's answer is refused and the
    /// previous certificate, if any, stays.
    pub fn install(
        &self,
        uid: &str,
        expected: &SpiffeId,
        resp: &SignResponse,
        key_pem: &str,
    ) -> Result<Arc<WorkloadCert>, IdentityError> {
        let chain = tls::certs_from_pem(&resp.cert_chain_pem)?;
        let roots = tls::roots(&resp.trust_bundle_pem)?;
        let key_der = tls::key_from_pem(key_pem)?;
        let leaf = chain
            .first()
            .ok_or_else(|| IdentityError::BadChain("no certificate in the chain".into()))?;
        tls::verify_chain(leaf, &chain[1..], &roots).map_err(|e| IdentityError::BadChain(e.to_string()))?;
        let got = tls::peer_spiffe_id(leaf);
        let claimed: SpiffeId = resp.spiffe_id.parse()?;
        if got.as_ref() != Some(expected) || &claimed != expected {
            return Err(IdentityError::WrongIdentity {
                got: got.map_or_else(|| "no SPIFFE id".to_owned(), |g| g.to_string()),
                expected: expected.clone(),
            });
        }
        let ours = rcgen::KeyPair::from_pem(key_pem).map_err(|e| IdentityError::Key(e.to_string()))?;
        if tls::public_key_der(leaf).as_deref() != Some(rcgen::PublicKeyData::subject_public_key_info(&ours).as_slice())
        {
            return Err(IdentityError::WrongKey);
        }
        let serial = chain
            .first()
            .and_then(tls::serial_and_expiry)
            .map(|(s, _)| s)
            .unwrap_or_default();
        let cert = Arc::new(WorkloadCert {
            spiffe_id: claimed,
            serial,
            not_after_unix: resp.not_after_unix,
            issued_at: SystemTime::now(),
            server: tls::server_config(chain.clone(), key_der.clone_key(), roots.clone())?,
            client: tls::client_config(chain, key_der, roots)?,
        });
        self.certs
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(uid.to_owned(), cert.clone());
        Ok(cert)
    }

    /// Keeps `uid`'s certificate fresh until `uid` is forgotten. Retries with
    /// backoff while the CA is unreachable; the current certificate keeps
    /// serving meanwhile.
    pub fn keep_fresh(self: &Arc<Self>, uid: String, id: SpiffeId) -> tokio::task::AbortHandle {
        let me = self.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(200);
            loop {
                let wait = match me.get(&uid) {
                    Some(c) => renew_after(c.issued_at, c.not_after_unix, rand::random::<f64>())
                        .saturating_sub(c.issued_at.elapsed().unwrap_or_default()),
                    None => Duration::ZERO,
                };
                tokio::time::sleep(wait).await;
                let had = me.get(&uid).is_some();
                match me.fetch(&uid, &id).await {
                    Ok(c) => {
                        backoff = Duration::from_millis(200);
                        if had {
                            me.rotations.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        tracing::info!(pod = %uid, spiffe_id = %c.spiffe_id, serial = %c.serial, not_after = c.not_after_unix, "workload certificate installed");
                    }
                    Err(e) => {
                        me.failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::warn!(pod = %uid, error = %e, retry_in_ms = backoff.as_millis() as u64, "certificate request failed");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                    }
                }
            }
        })
        .abort_handle()
    }
}

/// Rotation counters and the soonest expiry, read at scrape time.
#[derive(Debug)]
struct CertCollector(Arc<Identities>);

impl std::fmt::Debug for Identities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identities").finish_non_exhaustive()
    }
}

impl Collector for CertCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use crate::telemetry::metrics::const_counter;
        use std::sync::atomic::Ordering::Relaxed;
        let ids = &self.0;
        const_counter(
            &mut enc,
            "ferry_cert_rotations",
            "workload certificates renewed",
            ids.rotations.load(Relaxed),
        )?;
        const_counter(
            &mut enc,
            "ferry_cert_request_failures",
            "certificate requests that failed",
            ids.failures.load(Relaxed),
        )?;
        if let Some(s) = ids.views().iter().map(|c| c.seconds_to_expiry).min() {
            crate::telemetry::metrics::const_gauge(
                &mut enc,
                "ferry_cert_expiry_seconds",
                "seconds until the soonest workload certificate expires",
                s,
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_at_half_life_minus_jitter() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1000);
        assert_eq!(renew_after(t0, 1000 + 86400, 0.0), Duration::from_secs(43200));
        assert_eq!(
            renew_after(t0, 1000 + 86400, 1.0),
            Duration::from_secs_f64(43200.0 * 0.9)
        );
    }
}
