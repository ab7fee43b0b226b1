//! The config stream over real gRPC (tonic server and client on loopback):
//! first snapshot, deltas, ACK/NACK, resume, and who may subscribe.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use ferry_api::discovery::{
    self as pb, discovery_client::DiscoveryClient, discovery_server::DiscoveryServer, DiscoveryRequest,
};
use ferry_control::{
    compute,
    config_stream::{DiscoveryService, Store},
    model::Cluster,
};
use futures::{channel::mpsc, SinkExt};
use tonic::{transport::Channel, Streaming};

fn cluster(text: &str) -> Cluster {
    let (c, problems) = ferry_control::source::files::parse_cluster("t.yaml", text);
    assert!(
        problems
            .iter()
            .all(|p| p.severity != ferry_control::model::Severity::Error),
        "{problems:?}"
    );
    c
}

fn pod(name: &str, node: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, uid: {name}, labels: {{app: echo}}, annotations: {{ferry.dev/mesh: enabled}}}}\nspec: {{nodeName: {node}, containers: [{{name: c}}]}}\nstatus: {{podIP: {ip}}}\n---\n"
    )
}

const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: echo}\nspec: {clusterIP: 10.96.0.10, selector: {app: echo}, ports: [{port: 80, targetPort: 8080}]}\n";

struct Server {
    store: Arc<Store>,
    status: Arc<Mutex<BTreeMap<String, ferry_control::config_stream::NodeStatus>>>,
    addr: String,
    _dir: TempDir,
}

struct TempDir(std::path::PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn server() -> Server {
    let s = server_unloaded().await;
    s.store.publish(compute::mesh_view(
        &cluster(&format!("{}{SVC}", pod("a", "n1", "10.1.1.2"))),
        true,
    ));
    s
}

/// A control plane whose source has not been read yet.
async fn server_unloaded() -> Server {
    let dir = std::env::temp_dir().join(format!("ferry-disc-{}-{}", std::process::id(), rand_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    let tokens = dir.join("tokens.yaml");
    std::fs::write(&tokens, "n1: t1\nn2: t2\n").unwrap();
    let store = Arc::new(Store::default());
    let status = Arc::new(Mutex::new(BTreeMap::new()));
    let svc = DiscoveryService {
        store: store.clone(),
        auth: Arc::new(ferry_control::nodeauth::NodeAuth::tokens(tokens)),
        status: status.clone(),
        limiter: Default::default(),
    };
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(DiscoveryServer::new(svc))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
    );
    Server {
        store,
        status,
        addr,
        _dir: TempDir(dir),
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64
}

struct Agent {
    tx: mpsc::UnboundedSender<DiscoveryRequest>,
    rx: Streaming<pb::DiscoveryResponse>,
}

async fn subscribe(
    addr: &str,
    token: &str,
    node: &str,
    held: BTreeMap<String, String>,
) -> Result<Agent, tonic::Status> {
    let ch = Channel::from_shared(addr.to_owned()).unwrap().connect().await.unwrap();
    let (mut tx, rx) = mpsc::unbounded();
    tx.send(DiscoveryRequest {
        node: node.into(),
        initial_versions: held,
        ..Default::default()
    })
    .await
    .unwrap();
    let req = ferry_api::channel::with_token(rx, token).unwrap();
    let rx = DiscoveryClient::new(ch).stream(req).await?.into_inner();
    Ok(Agent { tx, rx })
}

impl Agent {
    async fn next(&mut self) -> pb::DiscoveryResponse {
        tokio::time::timeout(Duration::from_secs(5), self.rx.message())
            .await
            .expect("a response in time")
            .unwrap()
            .unwrap()
    }
    async fn answer(&mut self, r: &pb::DiscoveryResponse, error: &str) {
        let m = DiscoveryRequest {
            response_nonce: r.nonce.clone(),
            error_detail: error.into(),
            ..Default::default()
        };
        self.tx.send(m).await.unwrap();
    }
}

fn names(r: &pb::DiscoveryResponse) -> Vec<&str> {
    r.resources.iter().map(|x| x.name.as_str()).collect()
}

async fn wait_status(s: &Server, node: &str, f: impl Fn(&ferry_control::config_stream::NodeStatus) -> bool) {
    for _ in 0..100 {
        if s.status.lock().unwrap().get(node).is_some_and(&f) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("status of {node}: {:?}", s.status.lock().unwrap().get(node));
}

#[tokio::test]
async fn snapshot_then_deltas_with_ack_and_nack() {
    let s = server().await;
    let mut a = subscribe(&s.addr, "t1", "n1", BTreeMap::new()).await.unwrap();
    let first = a.next().await;
    assert_eq!(names(&first), ["service/default/echo", "workload/a"]);
    assert!(first.removed.is_empty());
    a.answer(&first, "").await;
    wait_status(&s, "n1", |st| {
        st.connected && st.acked_version == 1 && st.resources == 2
    })
    .await;

    // A pod on another node joins: one new workload, one changed service.
    let two = format!("{}{}{SVC}", pod("a", "n1", "10.1.1.2"), pod("b", "n2", "10.1.2.2"));
    s.store.publish(compute::mesh_view(&cluster(&two), true));
    let d = a.next().await;
    assert_eq!(names(&d), ["service/default/echo", "workload/b"]);
    assert_eq!(d.system_version, 2);
    // NACK: the control plane records why and does not resend the same thing.
    a.answer(&d, "workload/b: ip clash").await;
    wait_status(&s, "n1", |st| {
        st.last_nack.as_deref() == Some("workload/b: ip clash") && st.acked_version == 1
    })
    .await;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), a.rx.message())
            .await
            .is_err(),
        "resent after a NACK with no change"
    );

    // The next change is computed against what the node still holds (version 1).
    s.store.publish(compute::mesh_view(
        &cluster(&format!("{}{SVC}", pod("b", "n2", "10.1.2.2"))),
        true,
    ));
    let d = a.next().await;
    assert_eq!(names(&d), ["service/default/echo", "workload/b"]);
    assert_eq!(d.removed, ["workload/a"]);
    a.answer(&d, "").await;
    wait_status(&s, "n1", |st| st.acked_version == 3 && st.resources == 2).await;
}

#[tokio::test]
async fn a_reconnect_resumes_from_what_the_node_holds() {
    let s = server().await;
    let mut a = subscribe(&s.addr, "t1", "n1", BTreeMap::new()).await.unwrap();
    let first = a.next().await;
    let held: BTreeMap<String, String> = first
        .resources
        .iter()
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect();
    a.answer(&first, "").await;
    drop(a);
    // Same state: the first response is empty (nothing resent), but still sent (in sync).
    let mut b = subscribe(&s.addr, "t1", "n1", held.clone()).await.unwrap();
    let r = b.next().await;
    assert!(r.resources.is_empty() && r.removed.is_empty(), "{r:?}");
    b.answer(&r, "").await;
    drop(b);
    // One stale entry and one unknown: only those are corrected.
    let mut stale = held.clone();
    stale.insert("workload/a".into(), "old".into());
    stale.insert("workload/gone".into(), "x".into());
    let mut c = subscribe(&s.addr, "t1", "n1", stale).await.unwrap();
    let r = c.next().await;
    assert_eq!(names(&r), ["workload/a"]);
    assert_eq!(r.removed, ["workload/gone"]);
}

#[tokio::test]
async fn a_node_subscribes_only_as_itself() {
    let s = server().await;
    let err = |r: Result<Agent, tonic::Status>| r.err().expect("refused");
    let e = err(subscribe(&s.addr, "t2", "n1", BTreeMap::new()).await);
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("node n2's"), "{e:?}");
    let e = err(subscribe(&s.addr, "nope", "n1", BTreeMap::new()).await);
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    // n2 gets n1's enrolled pod (a mesh member) and the services.
    let mut b = subscribe(&s.addr, "t2", "n2", BTreeMap::new()).await.unwrap();
    assert_eq!(names(&b.next().await), ["service/default/echo", "workload/a"]);
}

#[tokio::test]
async fn an_address_guessing_tokens_is_throttled() {
    let s = server().await;
    // Positive control: the right token works from this address.
    let mut a = subscribe(&s.addr, "t1", "n1", BTreeMap::new()).await.unwrap();
    assert!(!names(&a.next().await).is_empty());
    // Ten wrong guesses are each answered Unauthenticated...
    for i in 0..10 {
        let e = subscribe(&s.addr, &format!("guess-{i}"), "n1", BTreeMap::new())
            .await
            .err()
            .unwrap();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "guess {i}: {e:?}");
    }
    // ...then the address is refused without a check, the right token too.
    for token in ["guess-10", "t1"] {
        let e = subscribe(&s.addr, token, "n1", BTreeMap::new()).await.err().unwrap();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{token}: {e:?}");
        assert!(e.message().contains("too many failed credential checks"), "{e:?}");
    }
}

#[tokio::test]
async fn nothing_is_sent_before_the_source_is_read() {
    let s = server_unloaded().await;
    // A node that held things reconnects while the control plane is starting:
    // it must not be told that everything is gone.
    let held = BTreeMap::from([("workload/a".to_string(), "v".to_string())]);
    let mut a = subscribe(&s.addr, "t1", "n1", held).await.unwrap();
    let early = tokio::time::timeout(Duration::from_millis(300), a.rx.message()).await;
    assert!(early.is_err(), "{early:?}");
    s.store.publish(compute::mesh_view(
        &cluster(&format!("{}{SVC}", pod("a", "n1", "10.1.1.2"))),
        true,
    ));
    let r = a.next().await;
    assert!(r.removed.is_empty(), "{r:?}");
    assert_eq!(names(&r), ["service/default/echo", "workload/a"]);
}

fn vs(weight_a: u32) -> String {
    format!(
        "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: echo}}\nspec:\n  hosts: [echo]\n  http:\n  - match: [{{headers: {{user: {{exact: tester}}}}}}]\n    route: [{{destination: {{host: echo, subset: b}}}}]\n  - route:\n    - {{destination: {{host: echo, subset: a}}, weight: {weight_a}}}\n    - {{destination: {{host: echo, subset: b}}, weight: {}}}\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: echo}}\nspec: {{host: echo, subsets: [{{name: a, labels: {{app: echo}}}}, {{name: b, labels: {{app: echo}}}}]}}\n",
        100 - weight_a
    )
}

#[tokio::test]
async fn a_virtual_service_change_streams_as_one_service_routing_delta() {
    let s = server_unloaded().await;
    let base = format!("{}{SVC}", pod("a", "n1", "10.1.1.2"));
    s.store
        .publish(compute::mesh_view(&cluster(&format!("{base}{}", vs(90))), true));
    let mut a = subscribe(&s.addr, "t1", "n1", BTreeMap::new()).await.unwrap();
    let first = a.next().await;
    assert_eq!(
        names(&first),
        ["routing/default/echo", "service/default/echo", "workload/a"]
    );
    // What the agent does with it: the model's ServiceRouting, validated.
    let held = ferry_model::proto::HeldResources::default().with(&first);
    let cfg = held.to_config("n1", &Default::default()).unwrap();
    let weights: Vec<u32> = cfg.routes[0].http[1].backends.iter().map(|b| b.weight).collect();
    assert_eq!(weights, [90, 10]);
    assert_eq!(cfg.routes[0].subsets["default/echo"].len(), 2);
    a.answer(&first, "").await;
    wait_status(&s, "n1", |st| st.acked_version == 1).await;

    // The canary moves to 50/50: only the routing resource changes.
    s.store
        .publish(compute::mesh_view(&cluster(&format!("{base}{}", vs(50))), true));
    let d = a.next().await;
    assert_eq!(names(&d), ["routing/default/echo"]);
    assert!(d.removed.is_empty());
    let cfg = held.with(&d).to_config("n1", &Default::default()).unwrap();
    let weights: Vec<u32> = cfg.routes[0].http[1].backends.iter().map(|b| b.weight).collect();
    assert_eq!(weights, [50, 50]);
    a.answer(&d, "").await;
    wait_status(&s, "n1", |st| st.acked_version == 2).await;

    // The VirtualService is deleted: the routing is removed.
    s.store.publish(compute::mesh_view(&cluster(&base), true));
    let d = a.next().await;
    assert!(d.resources.is_empty(), "{d:?}");
    assert_eq!(d.removed, ["routing/default/echo"]);
}

fn allow_echo(namespaces: &str) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: echo-allow, namespace: default}}\nspec:\n  selector: {{matchLabels: {{app: echo}}}}\n  rules: [{{from: [{{source: {{namespaces: [{namespaces}]}}}}], to: [{{operation: {{ports: ['8080']}}}}]}}]\n"
    )
}

/// A pod in namespace `other` on n2: n2 needs nothing from default's policies.
const OTHER: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: c, namespace: other, uid: c, annotations: {ferry.dev/mesh: enabled}}\nspec: {nodeName: n2, containers: [{name: c}]}\nstatus: {podIP: 10.1.2.3}\n---\n";

#[tokio::test]
async fn an_authorization_policy_streams_to_the_nodes_it_may_apply_to() {
    let s = server_unloaded().await;
    let base = format!("{}{OTHER}{SVC}", pod("a", "n1", "10.1.1.2"));
    s.store.publish(compute::mesh_view(
        &cluster(&format!("{base}{}", allow_echo("default"))),
        true,
    ));
    let policy = "authorizationpolicy/default/echo-allow";

    // n1 runs the selected pod: it gets the policy, and its agent's config has it.
    let mut a = subscribe(&s.addr, "t1", "n1", BTreeMap::new()).await.unwrap();
    let first = a.next().await;
    assert_eq!(
        names(&first),
        [policy, "service/default/echo", "workload/a", "workload/c"]
    );
    let held = ferry_model::proto::HeldResources::default().with(&first);
    let cfg = held.to_config("n1", &Default::default()).unwrap();
    assert_eq!(cfg.authorization_policies.len(), 1);
    let p = &cfg.authorization_policies[0];
    assert_eq!((p.namespace.as_str(), p.name.as_str()), ("default", "echo-allow"));
    assert_eq!(p.spec.rules[0].from[0].source.namespaces, ["default"]);
    assert_eq!(p.spec.rules[0].to[0].operation.ports, ["8080"]);
    a.answer(&first, "").await;
    wait_status(&s, "n1", |st| st.acked_version == 1 && st.resources == 4).await;

    // n2 has no pod in default: it never gets the policy.
    let mut b = subscribe(&s.addr, "t2", "n2", BTreeMap::new()).await.unwrap();
    let first_b = b.next().await;
    assert_eq!(names(&first_b), ["service/default/echo", "workload/a", "workload/c"]);
    b.answer(&first_b, "").await;
    wait_status(&s, "n2", |st| st.acked_version == 1).await;

    // The policy changes: n1 gets that one resource; n2 nothing.
    s.store.publish(compute::mesh_view(
        &cluster(&format!("{base}{}", allow_echo("default, other"))),
        true,
    ));
    let d = a.next().await;
    assert_eq!(names(&d), [policy]);
    assert!(d.removed.is_empty());
    let cfg = held.with(&d).to_config("n1", &Default::default()).unwrap();
    assert_eq!(
        cfg.authorization_policies[0].spec.rules[0].from[0].source.namespaces,
        ["default", "other"]
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), b.rx.message())
            .await
            .is_err(),
        "n2 was sent something"
    );
    wait_status(&s, "n2", |st| st.acked_version == 2).await;

    // An agent that refuses it (here: a policy altered on the way) NACKs
    // with the reason; the control plane records it.
    let mut bad = d.clone();
    if let Some(pb::resource::Kind::AuthorizationPolicy(p)) = &mut bad.resources[0].kind {
        p.rules[0].to[0].operation.as_mut().unwrap().ports = vec!["http".into()];
    }
    let problems = held.with(&bad).to_config("n1", &Default::default()).unwrap_err();
    assert!(
        problems[0].contains("(default/echo-allow).spec.rules[0].to[0].operation.ports[0]"),
        "{problems:?}"
    );
    a.answer(&d, &problems.join("; ")).await;
    wait_status(&s, "n1", |st| {
        st.acked_version == 1 && st.last_nack.as_deref().is_some_and(|n| n.contains("ports[0]"))
    })
    .await;

    // Deleted: removed from n1 (computed against what n1 still holds).
    s.store.publish(compute::mesh_view(&cluster(&base), true));
    let d = a.next().await;
    assert!(d.resources.is_empty(), "{d:?}");
    assert_eq!(d.removed, [policy]);
}
