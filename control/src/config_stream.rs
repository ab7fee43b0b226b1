//! The config stream (api/proto/ferry/discovery.proto): one task per
//! subscribed node sends it what changed in its view, waits for its ACK or
//! NACK, and only then sends the next change. What a node holds is tracked
//! per stream, starting from what the node says it holds, so a reconnect
//! resends only the difference.

use std::{
    collections::BTreeMap,
    pin::Pin,
    sync::{Arc, Mutex},
};

use ferry_api::discovery::{self as pb, discovery_server::Discovery};
use futures::{channel::mpsc, SinkExt, Stream, StreamExt};
use serde::Serialize;
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};

use crate::{
    authz::PodIdentity,
    compute::{delta, delta_from_diff, Diff, MeshView, Resources},
};

/// One version of the whole mesh, shared by every stream.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub version: u64,
    pub view: MeshView,
    pub resources: Resources,
    /// Every scheduled pod by uid, with an address or still pending (the
    /// CA's view: where a pod runs, and its identity).
    pub pods: BTreeMap<String, PodIdentity>,
    /// What changed since version - 1: a node that holds exactly that
    /// version is updated from this alone (no full comparison).
    pub diff: Option<Diff>,
}

/// The current snapshot; a new one is published only when the view changed.
pub struct Store {
    tx: watch::Sender<Arc<Snapshot>>,
}

impl Default for Store {
    fn default() -> Self {
        Self {
            tx: watch::channel(Arc::new(Snapshot::default())).0,
        }
    }
}

impl Store {
    pub fn current(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }

    /// Returns the new version, or None when nothing changed.
    pub fn publish(&self, view: MeshView) -> Option<u64> {
        let cur = self.current();
        if cur.version > 0 && cur.view == view {
            return None;
        }
        let resources = Resources::reusing(&view, (cur.version > 0).then(|| (&cur.view, &cur.resources)));
        let snap = Snapshot {
            version: cur.version + 1,
            diff: (cur.version > 0).then(|| resources.diff(&cur.resources)),
            resources,
            pods: view
                .workloads
                .iter()
                .map(|w| (w.uid.clone(), w.into()))
                .chain(view.pending.iter().map(|p| (p.uid.clone(), p.into())))
                .collect(),
            view,
        };
        let v = snap.version;
        self.tx.send_replace(Arc::new(snap));
        Some(v)
    }
}

/// What the control plane knows about a node's stream.
#[derive(Clone, Debug, Default, Serialize)]
pub struct NodeStatus {
    pub connected: bool,
    /// The snapshot version the node last acknowledged.
    pub acked_version: u64,
    pub resources: usize,
    pub last_nack: Option<String>,
    /// Updates the node rejected since ferry-control started.
    pub nacks: u64,
}

pub struct DiscoveryService {
    pub store: Arc<Store>,
    /// Which node is subscribing (static tokens or TokenReview; shared with the CA).
    pub auth: Arc<crate::nodeauth::NodeAuth>,
    pub status: Arc<Mutex<BTreeMap<String, NodeStatus>>>,
    /// Throttles addresses that keep presenting bad credentials (shared with the CA).
    pub limiter: Arc<crate::authz::FailureLimiter>,
}

type Responses = Pin<Box<dyn Stream<Item = Result<pb::DiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    type StreamStream = Responses;

    async fn stream(&self, req: Request<Streaming<pb::DiscoveryRequest>>) -> Result<Response<Responses>, Status> {
        let from = crate::peer_ip(&req);
        let node = crate::authenticate(&self.auth, &self.limiter, &req)
            .await
            .map_err(|d| {
                tracing::warn!(from = %from, reason = %d, "subscription refused");
                crate::denied_status(&self.limiter, from, std::time::Instant::now(), d)
            })?;
        let mut inbound = req.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("no subscription message"))?;
        if first.node != node {
            tracing::warn!(credential_node = %node, asked = %first.node, "subscription for another node refused");
            return Err(Status::permission_denied(format!(
                "this credential is node {node}'s; it cannot subscribe as {}",
                first.node
            )));
        }
        let (tx, rx) = mpsc::channel(2);
        let stream = NodeStream {
            node,
            held: first.initial_versions,
            inbound,
            tx,
            snapshots: self.store.subscribe(),
            status: self.status.clone(),
        };
        tokio::spawn(stream.run());
        Ok(Response::new(Box::pin(rx.map(Ok))))
    }
}

struct NodeStream {
    node: String,
    /// name -> version the node holds.
    held: BTreeMap<String, String>,
    inbound: Streaming<pb::DiscoveryRequest>,
    tx: mpsc::Sender<pb::DiscoveryResponse>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    status: Arc<Mutex<BTreeMap<String, NodeStatus>>>,
}

impl NodeStream {
    fn set_status(&self, f: impl FnOnce(&mut NodeStatus)) {
        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        f(s.entry(self.node.clone()).or_default());
    }

    async fn run(mut self) {
        let resumed = self.held.len();
        tracing::info!(node = %self.node, resumed_resources = resumed, "node subscribed");
        self.set_status(|s| s.connected = true);
        let reason = self.serve().await;
        tracing::info!(node = %self.node, reason, "node stream ended");
        self.set_status(|s| s.connected = false);
    }

    async fn serve(&mut self) -> &'static str {
        let mut nonce = 0u64;
        let mut first = true;
        // The snapshot version the node holds exactly (acknowledged), if any.
        let mut synced: Option<u64> = None;
        // Nothing is sent before the source has been read whole: a node that
        // reconnects to a restarting control plane must not be told that its
        // pods and services are gone.
        if self.snapshots.wait_for(|s| s.version > 0).await.is_err() {
            return "shutting down";
        }
        loop {
            let snap = self.snapshots.borrow_and_update().clone();
            let fast = snap
                .diff
                .as_ref()
                .filter(|_| synced.is_some_and(|v| v + 1 == snap.version));
            let (changed, removed) = match fast {
                Some(diff) => delta_from_diff(diff, &self.node),
                None => delta(&self.held, &snap.resources.for_node(&self.node)),
            };
            if changed.is_empty() && removed.is_empty() && !first {
                // Nothing for this node in this version: it holds it already.
                synced = Some(snap.version);
                let held = self.held.len();
                self.set_status(|s| {
                    s.acked_version = snap.version;
                    s.resources = held;
                });
            }
            if first || !changed.is_empty() || !removed.is_empty() {
                first = false;
                nonce += 1;
                let (n_changed, n_removed) = (changed.len(), removed.len());
                let changed_versions: Vec<(String, String)> =
                    changed.iter().map(|r| (r.name.clone(), r.version.clone())).collect();
                let removed_names = removed.clone();
                let resp = pb::DiscoveryResponse {
                    nonce: nonce.to_string(),
                    system_version: snap.version,
                    resources: changed,
                    removed,
                };
                if self.tx.send(resp).await.is_err() {
                    return "the node went away";
                }
                // One update in flight per node: wait for its answer.
                let answer = loop {
                    match self.inbound.message().await {
                        Ok(Some(m)) if m.response_nonce == nonce.to_string() => break m,
                        Ok(Some(_)) => continue,
                        Ok(None) => return "the node closed the stream",
                        Err(_) => return "the stream broke",
                    }
                };
                if answer.error_detail.is_empty() {
                    for n in &removed_names {
                        self.held.remove(n);
                    }
                    self.held.extend(changed_versions);
                    synced = Some(snap.version);
                    let held = self.held.len();
                    tracing::debug!(node = %self.node, version = snap.version, changed = n_changed, removed = n_removed, "ACK");
                    self.set_status(|s| {
                        s.acked_version = snap.version;
                        s.resources = held;
                    });
                } else {
                    // The node kept its previous state; retry on the next change.
                    tracing::warn!(node = %self.node, version = snap.version, reason = %answer.error_detail, "NACK: the node rejected the update");
                    synced = None;
                    self.set_status(|s| {
                        s.last_nack = Some(answer.error_detail.clone());
                        s.nacks += 1;
                    });
                }
            }
            loop {
                tokio::select! {
                    r = self.snapshots.changed() => {
                        if r.is_err() { return "shutting down" }
                        break;
                    }
                    m = self.inbound.message() => match m {
                        Ok(Some(_)) => continue,
                        Ok(None) => return "the node closed the stream",
                        Err(_) => return "the stream broke",
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_changes_make_versions() {
        let s = Store::default();
        assert_eq!(
            s.publish(MeshView::default()),
            Some(1),
            "the first snapshot always counts"
        );
        assert_eq!(s.publish(MeshView::default()), None);
        let mut v = MeshView::default();
        v.peer_authentications
            .push(serde_norway::from_str("metadata: {name: x}").unwrap());
        assert_eq!(s.publish(v), Some(2));
        assert_eq!(s.current().resources.shared.len(), 1);
    }
}
