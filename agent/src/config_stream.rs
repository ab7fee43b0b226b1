//! The config stream's client: connect to ferry-control (TLS, node
//! credential), say what this node already holds, then turn each response
//! into the node's desired state, validated whole: handed to the reconciler
//! ([`Apply`]) and ACKed, or NACKed with every problem. It produces desired
//! state and reports its own status; nothing else. Disconnected, the node
//! keeps its last-known config and the client retries with capped, jittered
//! backoff; a reconnect resumes from what it holds.

use std::{
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Duration,
};

use ferry_api::{
    channel::{self, ControlEndpoint},
    discovery::{self as pb, discovery_client::DiscoveryClient},
};
use ferry_model::{admin::ControlStatus, proto::HeldResources as Resources, Settings};
use futures::{channel::mpsc, SinkExt};
use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use tokio::sync::watch;

use crate::reconcile::Apply;

/// Where the client's output goes.
#[derive(Clone)]
pub struct Sinks {
    /// Desired state, applied before the ACK.
    pub apply: Arc<dyn Apply>,
    /// The stream's state, for `/config_dump`.
    pub status: Arc<RwLock<Option<ControlStatus>>>,
    /// 1 while the stream is up.
    pub connected: Gauge,
    /// Updates rejected (NACKed).
    pub rejected: Counter,
}

#[derive(Clone, Debug)]
pub struct Options {
    /// ferry-control's gRPC endpoint, e.g. https://10.1.1.1:15012.
    pub control: String,
    /// Root that signed ferry-control's serving certificate.
    pub control_ca: PathBuf,
    /// This node's credential: a static bootstrap token, or the agent pod's
    /// projected service-account token. Re-read on every connection (the
    /// kubelet rotates the latter).
    pub token_file: PathBuf,
    /// Where the last applied resources are kept, so a restarted agent serves
    /// them before (and without) the control plane, and resumes from them.
    pub state_file: Option<PathBuf>,
}

/// The resources last applied, as written by [`save`].
fn load(path: &std::path::Path) -> Option<Resources> {
    use prost::Message;
    let bytes = std::fs::read(path).ok()?;
    match pb::DiscoveryResponse::decode(bytes.as_slice()) {
        Ok(r) => Some(Resources::default().with(&r)),
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "ignoring an unreadable saved config");
            None
        }
    }
}

/// Writes `held` atomically (a crash leaves the old file or the new one).
fn save(path: &std::path::Path, held: &Resources) {
    use prost::Message;
    let all = pb::DiscoveryResponse {
        resources: held.0.values().cloned().collect(),
        ..Default::default()
    };
    let tmp = path.with_extension("tmp");
    let r = std::fs::write(&tmp, all.encode_to_vec()).and_then(|_| std::fs::rename(&tmp, path));
    if let Err(e) = r {
        tracing::warn!(file = %path.display(), error = %e, "cannot save the applied config");
    }
}

fn set_status(sinks: &Sinks, f: impl FnOnce(&mut ControlStatus)) {
    let mut c = sinks.status.write().unwrap_or_else(|e| e.into_inner());
    f(c.get_or_insert_with(Default::default));
}

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(transparent)]
    Channel(#[from] channel::ChannelError),
    #[error("the control plane refused the subscription: {0}")]
    Refused(String),
    #[error("stream broken: {0}")]
    Broken(String),
}

const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Runs forever: keeps the node subscribed and its config current.
/// `settings` are the node's own (from its local file); a change re-applies.
pub async fn run(sinks: Sinks, opts: Options, node: String, mut settings: watch::Receiver<Settings>) {
    set_status(&sinks, |s| s.endpoint = opts.control.clone());
    let mut held: Option<Resources> = opts.state_file.as_deref().and_then(load);
    if let Some(h) = &held {
        // Serve what was last applied right away: after an agent restart the
        // pods are still steered to it, control plane or not.
        let s = settings.borrow().clone();
        match h.to_config(&node, &s) {
            Ok(cfg) => {
                tracing::info!(
                    resources = h.0.len(),
                    "serving the saved config until the control plane answers"
                );
                sinks.apply.apply(cfg).await;
                set_status(&sinks, |st| st.resources = h.0.len());
            }
            Err(p) => {
                tracing::warn!(problems = %p.join("; "), "the saved config does not apply; waiting for the control plane");
                held = None;
            }
        }
    }
    let mut backoff = BACKOFF_MIN;
    loop {
        let got_response = match session(&sinks, &opts, &node, &mut held, &mut settings).await {
            Ok(got) => {
                tracing::warn!("the control plane closed the config stream; reconnecting");
                got
            }
            Err((got, e)) => {
                tracing::warn!(error = %e, "config stream down; serving the last-known config");
                set_status(&sinks, |s| s.last_error = Some(e.to_string()));
                got
            }
        };
        sinks.connected.set(0);
        set_status(&sinks, |s| s.connected = false);
        if got_response {
            backoff = BACKOFF_MIN;
        }
        let jitter = backoff.mul_f64(rand::random::<f64>() * 0.2);
        let sleep = tokio::time::sleep(backoff + jitter);
        tokio::pin!(sleep);
        // Local settings still apply while the control plane is away.
        loop {
            tokio::select! {
                _ = &mut sleep => break,
                r = settings.changed() => {
                    if r.is_err() { return; }
                    let s = settings.borrow_and_update().clone();
                    reapply(&sinks, &node, held.as_ref(), &s).await;
                }
            }
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn reapply(sinks: &Sinks, node: &str, held: Option<&Resources>, settings: &Settings) {
    let Some(held) = held else { return };
    match held.to_config(node, settings) {
        Ok(cfg) => {
            sinks.apply.apply(cfg).await;
        }
        Err(p) => tracing::error!(problems = %p.join("; "), "new local settings rejected"),
    }
}

/// One connection. Returns whether any response arrived (for backoff).
async fn session(
    sinks: &Sinks,
    opts: &Options,
    node: &str,
    held: &mut Option<Resources>,
    settings: &mut watch::Receiver<Settings>,
) -> Result<bool, (bool, StreamError)> {
    let fail = |e: channel::ChannelError| (false, StreamError::from(e));
    let token = channel::read_token(&opts.token_file).map_err(fail)?;
    let mut endpoint = ControlEndpoint::from_ca_file(&opts.control, &opts.control_ca).map_err(fail)?;
    endpoint.keepalive = true;
    let ch = endpoint.connect().await.map_err(fail)?;

    let (mut tx, rx) = mpsc::unbounded::<pb::DiscoveryRequest>();
    let first = pb::DiscoveryRequest {
        node: node.to_owned(),
        initial_versions: held.as_ref().map(Resources::versions).unwrap_or_default(),
        ..Default::default()
    };
    let resumed = first.initial_versions.len();
    let _ = tx.send(first).await;
    let req = channel::with_token(rx, &token).map_err(fail)?;
    let mut stream = DiscoveryClient::new(ch)
        .stream(req)
        .await
        .map_err(|s| (false, StreamError::Refused(s.message().to_owned())))?
        .into_inner();
    sinks.connected.set(1);
    set_status(sinks, |s| {
        s.connected = true;
        s.last_error = None;
    });
    tracing::info!(control = %opts.control, resumed_resources = resumed, "subscribed to the control plane");

    let mut got = false;
    loop {
        tokio::select! {
            msg = stream.message() => {
                let resp = match msg {
                    Ok(Some(r)) => r,
                    Ok(None) => return Ok(got),
                    Err(s) => return Err((got, StreamError::Broken(s.to_string()))),
                };
                got = true;
                let next = held.as_ref().map_or_else(|| Resources::default().with(&resp), |h| h.with(&resp));
                let settings_now = settings.borrow().clone();
                // Validated whole, then applied whole: the reconciler refuses
                // (changing nothing) what the node cannot hold.
                let applied = match next.to_config(node, &settings_now) {
                    Ok(cfg) => sinks.apply.try_apply(cfg).await.map_err(|e| e.to_string()),
                    Err(problems) => Err(problems.join("; ")),
                };
                let answer = match applied {
                    Ok(_) => {
                        tracing::info!(
                            nonce = %resp.nonce,
                            system_version = resp.system_version,
                            changed = resp.resources.len(),
                            removed = resp.removed.len(),
                            held = next.0.len(),
                            "config update applied (ACK)"
                        );
                        set_status(sinks, |s| {
                            s.system_version = resp.system_version;
                            s.resources = next.0.len();
                        });
                        if let Some(path) = &opts.state_file {
                            save(path, &next);
                        }
                        *held = Some(next);
                        String::new()
                    }
                    Err(why) => {
                        sinks.rejected.inc();
                        set_status(sinks, |s| s.last_nack = Some(why.clone()));
                        tracing::error!(nonce = %resp.nonce, reason = %why, "config update rejected (NACK); keeping the previous config");
                        why
                    }
                };
                let ack = pb::DiscoveryRequest {
                    response_nonce: resp.nonce,
                    error_detail: answer,
                    ..Default::default()
                };
                if tx.send(ack).await.is_err() {
                    return Err((got, StreamError::Broken("request stream closed".into())));
                }
            }
            r = settings.changed() => {
                if r.is_err() { return Ok(got); }
                let s = settings.borrow_and_update().clone();
                reapply(sinks, node, held.as_ref(), &s).await;
            }
        }
    }
}
