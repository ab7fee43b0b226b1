//! The config stream's client against a fake control plane (real gRPC over
//! real TLS, in process, no privileges): it subscribes with the node's token,
//! hands a valid update to the reconciler and ACKs it, NACKs an invalid one
//! with its reasons without applying it, saves what it holds, and after the
//! stream drops resumes from it.

mod common;

use std::{
    pin::Pin,
    sync::{Arc, RwLock},
    time::Duration,
};

use common::{TempDir, TestCa, DEADLINE};
use ferry_agent::{config_stream, reconcile::Apply};
use ferry_api::{
    channel::bearer,
    discovery::{
        self as pb,
        discovery_server::{Discovery, DiscoveryServer},
    },
};
use ferry_model::{proto, ConfigFile, Workload};
use futures::{channel::mpsc, future::BoxFuture, Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

/// What the fake control plane saw: one entry per subscription.
struct Subscription {
    token: Option<String>,
    requests: Streaming<pb::DiscoveryRequest>,
    responses: mpsc::UnboundedSender<Result<pb::DiscoveryResponse, Status>>,
}

struct Fake(mpsc::UnboundedSender<Subscription>);

#[tonic::async_trait]
impl Discovery for Fake {
    type StreamStream = Pin<Box<dyn Stream<Item = Result<pb::DiscoveryResponse, Status>> + Send>>;

    async fn stream(
        &self,
        req: Request<Streaming<pb::DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let token = bearer(&req);
        let (tx, rx) = mpsc::unbounded();
        let _ = self.0.unbounded_send(Subscription {
            token,
            requests: req.into_inner(),
            responses: tx,
        });
        Ok(Response::new(Box::pin(rx)))
    }
}

/// Records each desired state it is given.
struct Recorder(mpsc::UnboundedSender<ConfigFile>);

impl Apply for Recorder {
    fn apply(&self, cfg: ConfigFile) -> BoxFuture<'_, u64> {
        let _ = self.0.unbounded_send(cfg);
        Box::pin(async { 1 })
    }
}

fn workload(uid: &str, ip: &str) -> pb::Resource {
    let w: Workload = serde_norway::from_str(&format!("{{uid: {uid}, name: {uid}, node: n1, ip: {ip}}}")).unwrap();
    proto::resource(proto::workload_to(&w))
}

async fn next<T>(rx: &mut (impl Stream<Item = T> + Unpin), what: &str) -> T {
    tokio::time::timeout(DEADLINE, rx.next())
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .unwrap_or_else(|| panic!("{what}: stream ended"))
}

#[tokio::test]
async fn acks_nacks_saves_and_resumes() {
    let dir = TempDir::new("stream");
    let ca = TestCa::new();
    let (cert, key) = ca.server("ferry-control");
    std::fs::write(dir.0.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.0.join("token"), "node-1-token\n").unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = futures::stream::unfold(listener, |l| async move {
        let r = l.accept().await.map(|(s, _)| s);
        Some((r, l))
    });
    let (subs_tx, mut subs) = mpsc::unbounded();
    tokio::spawn(
        tonic::transport::Server::builder()
            .tls_config(
                tonic::transport::ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(cert, key)),
            )
            .unwrap()
            .add_service(DiscoveryServer::new(Fake(subs_tx)))
            .serve_with_incoming(incoming),
    );

    let (applied_tx, mut applied) = mpsc::unbounded();
    let status = Arc::new(RwLock::new(None));
    let sinks = config_stream::Sinks {
        apply: Arc::new(Recorder(applied_tx)),
        status: status.clone(),
        connected: Default::default(),
        rejected: Default::default(),
    };
    let state_file = dir.0.join("state.pb");
    let opts = config_stream::Options {
        control: format!("https://{addr}"),
        control_ca: dir.0.join("ca.pem"),
        token_file: dir.0.join("token"),
        state_file: Some(state_file.clone()),
    };
    let (_settings_tx, settings) = tokio::sync::watch::channel(Default::default());
    let client = tokio::spawn(config_stream::run(sinks.clone(), opts, "n1".into(), settings));

    // Subscribed over TLS with the node's token, holding nothing yet.
    let mut sub = next(&mut subs, "a subscription").await;
    assert_eq!(sub.token.as_deref(), Some("node-1-token"));
    let first = next(&mut sub.requests, "the first request").await.unwrap();
    assert_eq!((first.node.as_str(), first.initial_versions.len()), ("n1", 0));

    // A valid update: applied, then ACKed.
    let good = vec![workload("a", "10.1.1.2"), workload("b", "10.1.1.3")];
    sub.responses
        .unbounded_send(Ok(pb::DiscoveryResponse {
            nonce: "1".into(),
            system_version: 7,
            resources: good.clone(),
            removed: vec![],
        }))
        .unwrap();
    let cfg = next(&mut applied, "the first config").await;
    assert_eq!(cfg.workloads.len(), 2);
    let ack = next(&mut sub.requests, "the ACK").await.unwrap();
    assert_eq!((ack.response_nonce.as_str(), ack.error_detail.as_str()), ("1", ""));
    assert!(state_file.exists(), "what was applied is saved");

    // An update that clashes (two workloads, one address): NACKed with the
    // reason, not applied.
    sub.responses
        .unbounded_send(Ok(pb::DiscoveryResponse {
            nonce: "2".into(),
            system_version: 8,
            resources: vec![workload("c", "10.1.1.2")],
            removed: vec![],
        }))
        .unwrap();
    let nack = next(&mut sub.requests, "the NACK").await.unwrap();
    assert_eq!(nack.response_nonce, "2");
    assert!(
        nack.error_detail.contains("10.1.1.2 already used"),
        "{}",
        nack.error_detail
    );
    assert_eq!(sinks.rejected.get(), 1);
    assert!(applied.try_recv().is_err(), "a rejected update is not applied");
    {
        let st = status.read().unwrap().clone().unwrap();
        assert_eq!(st.system_version, 7);
        assert!(st.connected);
        assert!(st.last_nack.unwrap().contains("already used"));
    }

    // The stream drops: the client reconnects and resumes from what it holds.
    drop(sub);
    let mut sub = next(&mut subs, "a second subscription").await;
    let resume = next(&mut sub.requests, "the resuming request").await.unwrap();
    let held: Vec<&String> = resume.initial_versions.keys().collect();
    assert_eq!(held, ["workload/a", "workload/b"]);
    assert_eq!(resume.initial_versions["workload/a"], good[0].version);
    client.abort();
    let _ = tokio::time::timeout(Duration::from_secs(1), client).await;
}
