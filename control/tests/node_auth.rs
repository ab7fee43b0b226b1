//! Node authentication with Kubernetes service-account tokens (`--node-auth
//! tokenreview`), over real gRPC (the CA and the config stream served in
//! process on loopback) against a fake API server on loopback that answers
//! TokenReview POSTs and Pod GETs as kube-apiserver does (no kube-apiserver
//! can run here). Agent pods: `ferry-agent-a` on n1, `ferry-agent-b` on n2,
//! `ferry-agent-c` on n3; mesh pods: `web-a` on n1, `web-b` on n2.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use ferry_api::{
    discovery::{discovery_client::DiscoveryClient, discovery_server::DiscoveryServer, DiscoveryRequest},
    identity::{identity_client::IdentityClient, identity_server::IdentityServer, SignRequest, SignResponse},
};
use ferry_control::{
    authz::FailureLimiter,
    ca::Ca,
    compute,
    config_stream::{DiscoveryService, Store},
    nodeauth::{NodeAuth, TokenReviewConfig},
    IdentityService,
};
use futures::{channel::mpsc, SinkExt};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::{server::conn::http1, service::service_fn, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tonic::{transport::Channel, Code, Status};

type Body = BoxBody<Bytes, Infallible>;

const NS: &str = "ferry-system";
const AGENT_SA: &str = "system:serviceaccount:ferry-system:ferry-agent";
const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";
/// The API server's own audience: what a token without a chosen audience has.
const API_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

/// What the fake API server knows of a token.
#[derive(Clone)]
struct Token {
    user: String,
    audiences: Vec<String>,
    /// (pod name, pod uid) the token is bound to.
    pod: Option<(&'static str, &'static str)>,
    /// The node claim (Kubernetes ≥ 1.32).
    node: Option<&'static str>,
    revoked: bool,
    /// Answers as an authenticator that ignores the requested audiences.
    audience_unaware: bool,
}

fn agent_token(pod: &'static str, uid: &'static str, node: &'static str) -> Token {
    Token {
        user: AGENT_SA.into(),
        audiences: vec!["ferry-control".into()],
        pod: Some((pod, uid)),
        node: Some(node),
        revoked: false,
        audience_unaware: false,
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Health {
    Up,
    /// 500 to everything.
    Failing,
    /// 503 to everything (the client retries those).
    Overloaded,
    /// Accepts, never answers.
    Hanging,
    /// 403: ferry-control's RBAC lacks tokenreviews.
    Forbidden,
}

struct FakeApi {
    tokens: Mutex<BTreeMap<&'static str, Token>>,
    /// (namespace, name) -> the Pod.
    pods: Mutex<BTreeMap<(String, String), Value>>,
    /// Every TokenReview body POSTed.
    reviews: Mutex<Vec<Value>>,
    /// Every pod GET path.
    pod_gets: Mutex<Vec<String>>,
    health: Mutex<Health>,
}

fn agent_pod(name: &str, uid: &str, node: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "uid": uid},
        "spec": {"nodeName": node, "serviceAccountName": "ferry-agent", "containers": [{"name": "agent"}]},
        "status": {"phase": "Running"},
    })
}

fn status(code: u16, reason: &str, message: &str) -> Response<Body> {
    let body = json!({"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
                      "message": message, "reason": reason, "code": code});
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *r.status_mut() = StatusCode::from_u16(code).unwrap();
    r
}

impl FakeApi {
    fn new() -> Arc<Self> {
        let tokens = BTreeMap::from([
            ("tok-a", agent_token("ferry-agent-a", "uid-a", "n1")),
            ("tok-b", agent_token("ferry-agent-b", "uid-b", "n2")),
            ("tok-c", agent_token("ferry-agent-c", "uid-c", "n3")),
            (
                "tok-revoked",
                Token {
                    revoked: true,
                    ..agent_token("ferry-agent-a", "uid-a", "n1")
                },
            ),
            (
                "tok-for-the-api-server",
                Token {
                    audiences: vec![API_AUDIENCE.into()],
                    ..agent_token("ferry-agent-a", "uid-a", "n1")
                },
            ),
            (
                "tok-audience-unaware",
                Token {
                    audience_unaware: true,
                    ..agent_token("ferry-agent-a", "uid-a", "n1")
                },
            ),
            (
                "tok-default-sa",
                Token {
                    user: "system:serviceaccount:ferry-system:default".into(),
                    ..agent_token("ferry-agent-a", "uid-a", "n1")
                },
            ),
            (
                "tok-secret-based",
                Token {
                    pod: None,
                    node: None,
                    ..agent_token("", "", "")
                },
            ),
            // Issued to an earlier pod of the same name.
            ("tok-old-pod", agent_token("ferry-agent-a", "uid-a-old", "n1")),
            ("tok-lying-node", agent_token("ferry-agent-a", "uid-a", "n2")),
            ("tok-deleted-pod", agent_token("ferry-agent-z", "uid-z", "n1")),
            (
                "tok-flaky",
                Token {
                    revoked: true,
                    ..agent_token("ferry-agent-b", "uid-b", "n2")
                },
            ),
        ]);
        let pods = [
            ("ferry-agent-a", "uid-a", "n1"),
            ("ferry-agent-b", "uid-b", "n2"),
            ("ferry-agent-c", "uid-c", "n3"),
        ]
        .into_iter()
        .map(|(n, u, node)| ((NS.to_owned(), n.to_owned()), agent_pod(n, u, node)))
        .collect();
        Arc::new(Self {
            tokens: Mutex::new(tokens),
            pods: Mutex::new(pods),
            reviews: Mutex::default(),
            pod_gets: Mutex::default(),
            health: Mutex::new(Health::Up),
        })
    }

    fn set(&self, h: Health) {
        *self.health.lock().unwrap() = h;
    }

    /// kube-apiserver's answer to a TokenReview: authenticated only for a
    /// known, unrevoked token valid for one of the requested audiences.
    fn review(&self, body: &Value) -> Value {
        let token = body["spec"]["token"].as_str().unwrap_or_default();
        let wanted: Vec<String> = body["spec"]["audiences"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
            .unwrap_or_default();
        let known = self.tokens.lock().unwrap().get(token).cloned();
        let status = match known {
            None => json!({"authenticated": false, "error": "invalid bearer token"}),
            Some(t) if t.revoked => json!({"authenticated": false,
                "error": "invalid bearer token, token has been invalidated"}),
            Some(t) => {
                let common: Vec<&String> = t.audiences.iter().filter(|a| wanted.contains(a)).collect();
                if !t.audience_unaware && common.is_empty() {
                    json!({"authenticated": false,
                           "error": format!("invalid bearer token, token audiences {:?} is invalid for the target audiences {wanted:?}", t.audiences)})
                } else {
                    let mut extra = serde_json::Map::new();
                    if let Some((pod, uid)) = t.pod {
                        extra.insert(EXTRA_POD_NAME.into(), json!([pod]));
                        extra.insert(EXTRA_POD_UID.into(), json!([uid]));
                    }
                    if let Some(node) = t.node {
                        extra.insert(EXTRA_NODE_NAME.into(), json!([node]));
                    }
                    let mut s = json!({"authenticated": true,
                        "user": {"username": t.user, "uid": "sa-uid",
                                 "groups": ["system:serviceaccounts", "system:authenticated"], "extra": extra}});
                    if !t.audience_unaware {
                        s["audiences"] = json!(common);
                    }
                    s
                }
            }
        };
        json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
               "metadata": {"creationTimestamp": null}, "spec": body["spec"], "status": status})
    }

    async fn handle(self: Arc<Self>, req: Request<hyper::body::Incoming>) -> Response<Body> {
        let health = *self.health.lock().unwrap();
        match health {
            Health::Up => {}
            Health::Failing => return status(500, "InternalError", "etcdserver: request timed out"),
            Health::Overloaded => return status(503, "ServiceUnavailable", "the server is shutting down"),
            Health::Hanging => std::future::pending::<()>().await,
            Health::Forbidden => {
                return status(
                    403,
                    "Forbidden",
                    "tokenreviews.authentication.k8s.io is forbidden: User \"system:serviceaccount:ferry-system:ferry-control\" cannot create resource \"tokenreviews\"",
                )
            }
        }
        let path = req.uri().path().to_owned();
        if req.method() == hyper::Method::POST && path == "/apis/authentication.k8s.io/v1/tokenreviews" {
            let body = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let body: Value = serde_json::from_slice(&body).unwrap_or_default();
            self.reviews.lock().unwrap().push(body.clone());
            let mut r = Response::new(Full::new(Bytes::from(self.review(&body).to_string())).boxed());
            *r.status_mut() = StatusCode::CREATED;
            return r;
        }
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        if req.method() == hyper::Method::GET {
            if let ["api", "v1", "namespaces", ns, "pods", name] = parts.as_slice() {
                self.pod_gets.lock().unwrap().push(path.clone());
                let pod = self
                    .pods
                    .lock()
                    .unwrap()
                    .get(&(ns.to_string(), name.to_string()))
                    .cloned();
                return match pod {
                    Some(p) => Response::new(Full::new(Bytes::from(p.to_string())).boxed()),
                    None => status(404, "NotFound", &format!("pods \"{name}\" not found")),
                };
            }
        }
        status(404, "NotFound", "the fake serves TokenReviews and pods only")
    }
}

async fn serve_api(api: Arc<FakeApi>) -> kube::Client {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let api = api.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let api = api.clone();
                    async move { Ok::<_, Infallible>(api.handle(req).await) }
                });
                let _ = http1::Builder::new().serve_connection(TokioIo::new(s), svc).await;
            });
        }
    });
    kube::Client::try_from(kube::Config::new(format!("http://{addr}").parse().unwrap())).unwrap()
}

struct TempDir(std::path::PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// ferry-control's CA and config stream, in process, with TokenReview node auth.
struct Control {
    addr: String,
    auth: Arc<NodeAuth>,
    _dir: TempDir,
}

const CLUSTER: &str = "\
apiVersion: v1
kind: Pod
metadata: {name: web-a, namespace: default, uid: web-a, annotations: {ferry.dev/mesh: enabled}}
spec: {nodeName: n1, serviceAccountName: web, containers: [{name: c}]}
status: {podIP: 10.1.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: web-b, namespace: default, uid: web-b, annotations: {ferry.dev/mesh: enabled}}
spec: {nodeName: n2, serviceAccountName: web, containers: [{name: c}]}
status: {podIP: 10.1.2.2}
";

async fn control(client: kube::Client, cache_ttl: Duration, deadline: Duration, limiter: FailureLimiter) -> Control {
    let dir = std::env::temp_dir().join(format!(
        "ferry-nodeauth-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = Arc::new(Ca::load_or_create(&dir.join("ca")).unwrap());
    let store = Arc::new(Store::default());
    let (cluster, problems) = ferry_control::source::files::parse_cluster("t.yaml", CLUSTER);
    assert!(
        problems
            .iter()
            .all(|p| p.severity != ferry_control::model::Severity::Error),
        "{problems:?}"
    );
    store.publish(compute::mesh_view(&cluster, true));
    let auth = Arc::new(NodeAuth::token_review(
        client,
        TokenReviewConfig {
            cache_ttl,
            deadline,
            ..TokenReviewConfig::new(AGENT_SA.into())
        },
    ));
    let limiter = Arc::new(limiter);
    let identity = IdentityService {
        ca,
        limiter: limiter.clone(),
        store: store.clone(),
        auth: auth.clone(),
        max_ttl: Duration::from_secs(3600),
    };
    let stream = DiscoveryService {
        store,
        auth: auth.clone(),
        status: Arc::default(),
        limiter,
    };
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(IdentityServer::new(identity))
            .add_service(DiscoveryServer::new(stream))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
    );
    Control {
        addr,
        auth,
        _dir: TempDir(dir),
    }
}

/// Ample for anything on loopback.
const DEADLINE: Duration = Duration::from_secs(10);

async fn channel(addr: &str) -> Channel {
    Channel::from_shared(addr.to_owned()).unwrap().connect().await.unwrap()
}

/// A certificate request for pod `uid`, as an agent makes it.
async fn sign(c: &Control, token: &str, uid: &str) -> Result<SignResponse, Status> {
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let req = ferry_api::channel::with_token(
        SignRequest {
            pod_uid: uid.into(),
            csr_pem: csr,
            ttl_seconds: 600,
        },
        token,
    )
    .unwrap();
    let mut client = IdentityClient::new(channel(&c.addr).await);
    tokio::time::timeout(DEADLINE, client.sign(req))
        .await
        .expect("the CA answers in time")
        .map(|r| r.into_inner())
}

/// A subscription as node `node`; Ok once its first update arrived.
async fn subscribe(c: &Control, token: &str, node: &str) -> Result<(), Status> {
    let (mut tx, rx) = mpsc::unbounded();
    tx.send(DiscoveryRequest {
        node: node.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let req = ferry_api::channel::with_token(rx, token).unwrap();
    let mut client = DiscoveryClient::new(channel(&c.addr).await);
    let first = tokio::time::timeout(DEADLINE, async move {
        let mut stream = client.stream(req).await?.into_inner();
        let _keep = tx;
        stream.message().await
    })
    .await
    .expect("the stream answers in time")?;
    assert!(first.is_some(), "the stream ended before its first update");
    Ok(())
}

fn refused<T: std::fmt::Debug>(r: Result<T, Status>, code: Code, says: &str) -> Status {
    let e = r.expect_err("refused");
    assert_eq!(e.code(), code, "{e:?}");
    assert!(e.message().contains(says), "{:?} should say {says:?}", e.message());
    e
}

#[tokio::test]
async fn an_agents_token_names_its_node_which_is_certified_only_for_its_own_pods() {
    let api = FakeApi::new();
    let c = control(
        serve_api(api.clone()).await,
        Duration::from_secs(60),
        Duration::from_secs(5),
        FailureLimiter::default(),
    )
    .await;
    // Node n1's agent: subscribes as n1 and gets n1's pod certified.
    subscribe(&c, "tok-a", "n1").await.unwrap();
    let signed = sign(&c, "tok-a", "web-a").await.unwrap();
    assert_eq!(signed.spiffe_id, "spiffe://cluster.local/ns/default/sa/web");
    // Not n2's pod, and not as n2.
    refused(
        sign(&c, "tok-a", "web-b").await,
        Code::PermissionDenied,
        "node n1 asked for pod default/web-b which runs on node n2",
    );
    refused(
        subscribe(&c, "tok-a", "n2").await,
        Code::PermissionDenied,
        "this credential is node n1's; it cannot subscribe as n2",
    );
    // Node n2's agent gets n2's pod.
    sign(&c, "tok-b", "web-b").await.unwrap();

    // What was asked: a TokenReview for the audience ferry-control, then the
    // token's pod; each token once, however often it was presented.
    let reviews = api.reviews.lock().unwrap().clone();
    assert_eq!(reviews.len(), 2, "{reviews:#?}");
    assert_eq!(reviews[0]["apiVersion"], "authentication.k8s.io/v1");
    assert_eq!(reviews[0]["kind"], "TokenReview");
    assert_eq!(
        reviews[0]["spec"],
        json!({"token": "tok-a", "audiences": ["ferry-control"]})
    );
    assert_eq!(
        api.pod_gets.lock().unwrap().clone(),
        [
            "/api/v1/namespaces/ferry-system/pods/ferry-agent-a",
            "/api/v1/namespaces/ferry-system/pods/ferry-agent-b"
        ]
    );

    // A reconnect storm: 50 checks of a new token at once cost one review.
    let checks: Vec<_> = (0..50)
        .map(|_| {
            let auth = c.auth.clone();
            tokio::spawn(async move { auth.node_of(Some("tok-c")).await })
        })
        .collect();
    for check in checks {
        assert_eq!(check.await.unwrap(), Ok("n3".to_string()));
    }
    assert_eq!(api.reviews.lock().unwrap().len(), 3);
    let stats = c.auth.stats();
    assert_eq!(
        (stats.reviews, stats.refused, stats.unavailable),
        (3, 0, 0),
        "{stats:?}"
    );

    // An accepted token is remembered for the cache's lifetime (60 s here):
    // a short API server outage does not disconnect the nodes it knows.
    api.set(Health::Failing);
    subscribe(&c, "tok-a", "n1").await.unwrap();
    assert_eq!(api.reviews.lock().unwrap().len(), 3);
}

#[tokio::test]
async fn tokens_that_prove_no_agent_pod_are_refused_and_refusals_are_not_remembered() {
    let api = FakeApi::new();
    let c = control(
        serve_api(api.clone()).await,
        Duration::from_secs(60),
        Duration::from_secs(5),
        // Many refusals from one address in this test: not throttled here
        // (control/tests/config_stream.rs tests the throttle).
        FailureLimiter::new(1000, Duration::from_secs(60)),
    )
    .await;
    // Positive control: node n1's agent token.
    sign(&c, "tok-a", "web-a").await.unwrap();
    for (token, says) in [
        ("tok-revoked", "token has been invalidated"),
        ("unknown-token", "invalid bearer token"),
        // Bound to the API server's audience, not ferry-control's: the API
        // server says so...
        ("tok-for-the-api-server", "is invalid for the target audiences"),
        // ...and an authenticator that ignores audiences is not trusted.
        ("tok-audience-unaware", "not for audience \"ferry-control\""),
        (
            "tok-default-sa",
            "\"system:serviceaccount:ferry-system:default\"'s, not the agents' service account",
        ),
        ("tok-secret-based", "not bound to a pod"),
        (
            "tok-old-pod",
            "pod ferry-system/ferry-agent-a is not the one the token was issued to",
        ),
        (
            "tok-lying-node",
            "names node n2 but its pod ferry-system/ferry-agent-a runs on n1",
        ),
        ("tok-deleted-pod", "ferry-system/ferry-agent-z no longer exists"),
    ] {
        let e = refused(sign(&c, token, "web-a").await, Code::Unauthenticated, says);
        assert!(e.message().starts_with("node credential refused: "), "{e:?}");
        // The config stream makes the same check.
        refused(subscribe(&c, token, "n1").await, Code::Unauthenticated, says);
    }
    refused(
        sign(&c, "", "web-a").await,
        Code::Unauthenticated,
        "missing node credential",
    );
    assert_eq!(c.auth.stats().refused, 19, "{:?}", c.auth.stats());

    // A refusal is not remembered: the same token, valid now, is accepted at once.
    refused(
        sign(&c, "tok-flaky", "web-b").await,
        Code::Unauthenticated,
        "invalidated",
    );
    api.tokens.lock().unwrap().get_mut("tok-flaky").unwrap().revoked = false;
    sign(&c, "tok-flaky", "web-b").await.unwrap();
}

#[tokio::test]
async fn without_the_api_server_nodes_are_refused_clearly_and_nothing_is_held_against_them() {
    let api = FakeApi::new();
    // Nothing remembered: every check asks the API server.
    let c = control(
        serve_api(api.clone()).await,
        Duration::ZERO,
        Duration::from_millis(500),
        FailureLimiter::default(),
    )
    .await;
    // Positive control.
    sign(&c, "tok-a", "web-a").await.unwrap();
    // Failing (500): refused as UNAVAILABLE, saying why; more often than the
    // failure limiter allows bad credentials (10), and never throttled: it is
    // not the caller's fault.
    api.set(Health::Failing);
    for _ in 0..12 {
        refused(
            sign(&c, "tok-a", "web-a").await,
            Code::Unavailable,
            "cannot check the node credential now: TokenReview: the Kubernetes API server",
        );
    }
    refused(
        subscribe(&c, "tok-a", "n1").await,
        Code::Unavailable,
        "etcdserver: request timed out",
    );
    // Overloaded (503): the client's retries end at the deadline.
    api.set(Health::Overloaded);
    refused(
        sign(&c, "tok-a", "web-a").await,
        Code::Unavailable,
        "TokenReview: the Kubernetes API server did not answer within 500ms",
    );
    // Hanging: refused at the deadline.
    api.set(Health::Hanging);
    let started = Instant::now();
    refused(
        sign(&c, "tok-a", "web-a").await,
        Code::Unavailable,
        "did not answer within 500ms",
    );
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    // ferry-control without RBAC for TokenReview: says what to grant.
    api.set(Health::Forbidden);
    refused(
        sign(&c, "tok-a", "web-a").await,
        Code::Unavailable,
        "its RBAC needs create on tokenreviews.authentication.k8s.io and get on pods",
    );
    assert_eq!(c.auth.stats().unavailable, 16, "{:?}", c.auth.stats());
    // Back: accepted again; and, nothing being cached, a revocation applies at once.
    api.set(Health::Up);
    sign(&c, "tok-a", "web-a").await.unwrap();
    api.tokens.lock().unwrap().get_mut("tok-a").unwrap().revoked = true;
    refused(sign(&c, "tok-a", "web-a").await, Code::Unauthenticated, "invalidated");

    // No API server at all (nothing listens): refused too.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let gone = kube::Client::try_from(kube::Config::new(format!("http://127.0.0.1:{port}").parse().unwrap())).unwrap();
    let auth = NodeAuth::token_review(gone, TokenReviewConfig::new(AGENT_SA.into()));
    let r = tokio::time::timeout(DEADLINE, auth.node_of(Some("tok-a")))
        .await
        .unwrap();
    match r {
        Err(ferry_control::authz::Denied::Unavailable(why)) => {
            assert!(why.contains("the Kubernetes API server"), "{why}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(auth.stats().unavailable, 1);
}
