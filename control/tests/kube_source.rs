//! The Kubernetes source against a loopback HTTP server that speaks the API
//! server's list/watch protocol (no kube-apiserver can run here): list,
//! watch from the list's resourceVersion, a watch event, a 410 Gone that
//! forces a relist, a kind whose CRD is missing (404), and an invalid object;
//! and a node as real clusters have them (host-network pods sharing the
//! node's address, pods named after their Deployment or CronJob).

use std::{
    convert::Infallible,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use ferry_control::{config_stream::Store, source};
use futures::{channel::mpsc, SinkExt};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::{body::Frame, server::conn::http1, service::service_fn, Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::json;

type Body = BoxBody<Bytes, Infallible>;
type Chunk = Result<Frame<Bytes>, Infallible>;

fn pod(name: &str, ip: &str, rv: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "uid": name, "resourceVersion": rv,
                     "annotations": {"ferry.dev/mesh": "enabled"}},
        "spec": {"nodeName": "n1", "containers": [{"name": "c"}]},
        "status": {"phase": "Running", "podIP": ip},
    })
}

struct Fake {
    /// Requests seen (path?query), in order.
    log: Mutex<Vec<String>>,
    /// Watch streams kept open (their senders must live).
    open: Mutex<Vec<mpsc::Sender<Chunk>>>,
    pod_lists: Mutex<u32>,
    /// Bodies POSTed to the events API.
    events: Mutex<Vec<serde_json::Value>>,
    /// The test says when the first watch may expire (after it saw its event).
    expire: Arc<tokio::sync::Notify>,
}

/// As the API server does, list items carry no apiVersion or kind.
fn list(kind: &str, rv: &str, mut items: Vec<serde_json::Value>) -> Response<Body> {
    for i in &mut items {
        if let Some(o) = i.as_object_mut() {
            o.remove("apiVersion");
            o.remove("kind");
        }
    }
    let body =
        json!({"apiVersion": "v1", "kind": format!("{kind}List"), "metadata": {"resourceVersion": rv}, "items": items});
    Response::new(Full::new(Bytes::from(body.to_string())).boxed())
}

fn event(kind: &str, object: serde_json::Value) -> Chunk {
    Ok(Frame::data(Bytes::from(format!(
        "{}\n",
        json!({"type": kind, "object": object})
    ))))
}

impl Fake {
    fn watch(&self, events: Vec<Chunk>, keep_open: bool) -> Response<Body> {
        let (mut tx, rx) = mpsc::channel(16);
        for e in events {
            tx.try_send(e).expect("room for the scripted events");
        }
        if keep_open {
            self.open.lock().unwrap().push(tx);
        }
        Response::new(BodyExt::boxed(StreamBody::new(rx)))
    }

    fn handle(&self, req: &Request<hyper::body::Incoming>) -> Response<Body> {
        let path = req.uri().path().to_owned();
        let query = req.uri().query().unwrap_or_default().to_owned();
        self.log.lock().unwrap().push(format!("{path}?{query}"));
        let watching = query.contains("watch=true");
        match (path.as_str(), watching) {
            ("/api/v1/pods", false) => {
                let mut n = self.pod_lists.lock().unwrap();
                *n += 1;
                if *n == 1 {
                    list("Pod", "10", vec![pod("a", "10.1.1.2", "10")])
                } else {
                    // The relist after 410: b is gone, c appeared, a moved.
                    list(
                        "Pod",
                        "20",
                        vec![pod("a", "10.1.1.7", "18"), pod("c", "10.1.1.4", "19")],
                    )
                }
            }
            ("/api/v1/pods", true) if query.contains("resourceVersion=10") => {
                let gone = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                  "message": "too old resource version", "reason": "Expired", "code": 410});
                let mut bad = pod("bad", "not-an-ip", "12");
                bad["metadata"]["annotations"]["ferry.dev/mesh"] = json!("maybe");
                let (mut tx, rx) = mpsc::channel(16);
                let expire = self.expire.clone();
                tokio::spawn(async move {
                    let _ = tx.send(event("ADDED", pod("b", "10.1.1.3", "11"))).await;
                    let _ = tx.send(event("ADDED", bad)).await;
                    expire.notified().await;
                    let _ = tx.send(event("ERROR", gone)).await;
                });
                Response::new(BodyExt::boxed(StreamBody::new(rx)))
            }
            ("/api/v1/pods", true) => self.watch(vec![], true),
            (p, false) if p.starts_with("/apis/gateway.networking.k8s.io/") => {
                let mut r = Response::new(
                    Full::new(Bytes::from(
                        r#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404}"#,
                    ))
                    .boxed(),
                );
                *r.status_mut() = hyper::StatusCode::NOT_FOUND;
                r
            }
            (_, false) => {
                let svc = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo", "namespace": "default", "resourceVersion": "5"},
                                 "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80, "targetPort": 8080}]}});
                list("X", "5", if path == "/api/v1/services" { vec![svc] } else { vec![] })
            }
            (_, true) => self.watch(vec![], true),
        }
    }
}

#[tokio::test]
async fn lists_watches_and_relists_after_410_gone() {
    let fake = Arc::new(Fake {
        log: Mutex::default(),
        open: Mutex::default(),
        pod_lists: Mutex::new(0),
        events: Mutex::default(),
        expire: Arc::default(),
    });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let f = fake.clone();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let f = f.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let f = f.clone();
                    async move {
                        if req.method() == hyper::Method::POST {
                            let path = req.uri().path().to_owned();
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                            f.events.lock().unwrap().push(json!({"path": path, "body": v.clone()}));
                            let mut r = Response::new(Full::new(Bytes::from(v.to_string())).boxed());
                            *r.status_mut() = hyper::StatusCode::CREATED;
                            return Ok::<_, Infallible>(r);
                        }
                        Ok::<_, Infallible>(f.handle(&req))
                    }
                });
                let _ = http1::Builder::new().serve_connection(TokioIo::new(s), svc).await;
            });
        }
    });
    let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
    let client = kube::Client::try_from(config).unwrap();
    let store = Arc::new(Store::default());
    let problems = Arc::new(Mutex::new(Vec::new()));
    tokio::spawn(source::kube::run(client, store.clone(), problems.clone()));

    let pods = |store: &Store| -> Vec<(String, String)> {
        // By uid, as the CA's view lists them; only pods with an address.
        let snap = store.current();
        let by_uid: std::collections::BTreeMap<&str, (String, String)> = snap
            .view
            .workloads
            .iter()
            .map(|w| (w.uid.as_str(), (w.name.clone(), w.ip.to_string())))
            .collect();
        by_uid.into_values().collect()
    };
    let wait = |want: &[(&str, &str)]| {
        let store = store.clone();
        let want: Vec<(String, String)> = want.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        async move {
            for _ in 0..1000 {
                if pods(&store) == want {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("pods {:?}, want {want:?}", pods(&store));
        }
    };
    // List, then the watch's ADDED event (the invalid pod is rejected, not added).
    wait(&[("a", "10.1.1.2"), ("b", "10.1.1.3")]).await;
    assert_eq!(store.current().view.services.len(), 1, "services listed too");
    // The rejected pod is listed at the admin endpoint's /problems.
    let rejected = || {
        problems
            .lock()
            .unwrap()
            .iter()
            .any(|p| p.to_string().contains("Pod default/bad"))
    };
    for _ in 0..200 {
        if rejected() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(rejected(), "{:?}", problems.lock().unwrap());
    fake.expire.notify_one();
    // 410 Gone: the watcher relists and the store is replaced by the new list.
    wait(&[("a", "10.1.1.7"), ("c", "10.1.1.4")]).await;
    let log = fake.log.lock().unwrap().clone();
    let pod_reqs: Vec<&String> = log.iter().filter(|l| l.starts_with("/api/v1/pods?")).collect();
    assert!(pod_reqs.len() >= 3, "{pod_reqs:#?}");
    assert!(!pod_reqs[0].contains("watch=true"), "{pod_reqs:#?}");
    assert!(
        pod_reqs[1].contains("watch=true") && pod_reqs[1].contains("resourceVersion=10"),
        "{pod_reqs:#?}"
    );
    assert!(!pod_reqs[2].contains("watch=true"), "relist after 410: {pod_reqs:#?}");
    // The rejected pod's owner is told why, as a Warning Event on the pod.
    let events = fake.events.lock().unwrap().clone();
    let ev = events
        .iter()
        .find(|e| e["body"]["regarding"]["name"] == "bad")
        .unwrap_or_else(|| panic!("{events:#?}"));
    assert_eq!(ev["path"], "/apis/events.k8s.io/v1/namespaces/default/events", "{ev}");
    assert_eq!(
        (ev["body"]["type"].as_str(), ev["body"]["reason"].as_str()),
        (Some("Warning"), Some("InvalidConfig")),
        "{ev}"
    );
    let note = ev["body"]["note"].as_str().unwrap_or_default();
    assert!(note.contains("ferry.dev/mesh") && note.contains("not-an-ip"), "{note}");
    // It is gone from the relist, so from /problems too.
    let listed: Vec<String> = problems.lock().unwrap().iter().map(|p| p.to_string()).collect();
    assert!(!listed.iter().any(|p| p.contains("Pod default/bad")), "{listed:?}");
    // A missing CRD (HTTPRoute: 404) did not hold back the rest.
    assert!(
        log.iter()
            .any(|l| l.starts_with("/apis/gateway.networking.k8s.io/v1/httproutes")),
        "{log:#?}"
    );
}

#[tokio::test]
async fn an_unreachable_api_server_publishes_nothing() {
    // Nothing listens there: every list fails. An empty first snapshot would
    // tell every agent that its pods and services are gone.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = kube::Config::new(format!("http://127.0.0.1:{port}").parse().unwrap());
    let store = Arc::new(Store::default());
    tokio::spawn(source::kube::run(
        kube::Client::try_from(config).unwrap(),
        store.clone(),
        Arc::default(),
    ));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(store.current().version, 0);
}

/// An API server that lists `lists` (path -> items; anything else: empty)
/// and keeps every watch open with no events.
async fn serve_lists(lists: Vec<(&'static str, &'static str, Vec<serde_json::Value>)>) -> std::net::SocketAddr {
    let lists = Arc::new(lists);
    let open: Arc<Mutex<Vec<mpsc::Sender<Chunk>>>> = Arc::default();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let (lists, open) = (lists.clone(), open.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let (lists, open) = (lists.clone(), open.clone());
                    async move {
                        let path = req.uri().path();
                        if req.uri().query().unwrap_or_default().contains("watch=true")
                            || req.method() == hyper::Method::POST
                        {
                            let (tx, rx) = mpsc::channel(1);
                            open.lock().unwrap().push(tx);
                            return Ok::<_, Infallible>(Response::new(BodyExt::boxed(StreamBody::new(rx))));
                        }
                        let (kind, items) = lists
                            .iter()
                            .find(|(p, _, _)| *p == path)
                            .map_or(("X", vec![]), |(_, k, i)| (*k, i.clone()));
                        Ok(list(kind, "7", items))
                    }
                });
                let _ = http1::Builder::new().serve_connection(TokioIo::new(s), svc).await;
            });
        }
    });
    addr
}

/// A pod a controller created on node n1.
fn owned_pod(
    name: &str,
    ip: &str,
    owner: (&str, &str),
    labels: serde_json::Value,
    host_network: bool,
) -> serde_json::Value {
    let generate = format!("{}-", name.rsplit_once('-').map_or(name, |(p, _)| p));
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "generateName": generate, "namespace": "default", "uid": name,
                     "resourceVersion": "7", "labels": labels,
                     "annotations": {"ferry.dev/mesh": "enabled"},
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": owner.0, "name": owner.1,
                                          "uid": format!("{}-uid", owner.1), "controller": true}]},
        "spec": {"nodeName": "n1", "hostNetwork": host_network, "containers": [{"name": "c"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    })
}

/// A real node: host-network pods (a DaemonSet's, kube-proxy's), which all
/// have the node's address, beside Deployment and CronJob pods. Every
/// update used to be NACKed by the node (two workloads with one address).
#[tokio::test]
async fn host_network_pods_stay_out_and_workloads_are_named_by_owner() {
    let node_ip = "192.168.0.11";
    let pods = vec![
        owned_pod(
            "node-exporter-x7k2p",
            node_ip,
            ("DaemonSet", "node-exporter"),
            json!({"app": "node-exporter"}),
            true,
        ),
        owned_pod(
            "kube-proxy-q8w9e",
            node_ip,
            ("DaemonSet", "kube-proxy"),
            json!({}),
            true,
        ),
        owned_pod(
            "reviews-v1-6f7b8c9d4-x2x9z",
            "10.1.1.2",
            ("ReplicaSet", "reviews-v1-6f7b8c9d4"),
            json!({"app": "reviews", "version": "v1", "pod-template-hash": "6f7b8c9d4"}),
            false,
        ),
        owned_pod(
            "backup-29012345-abcde",
            "10.1.1.3",
            ("Job", "backup-29012345"),
            json!({}),
            false,
        ),
    ];
    let svc = json!({"apiVersion": "v1", "kind": "Service",
                     "metadata": {"name": "node-metrics", "namespace": "default", "resourceVersion": "7"},
                     "spec": {"clusterIP": "10.96.0.30", "selector": {"app": "node-exporter"},
                              "ports": [{"name": "http", "port": 9100, "targetPort": 9100}]}});
    // The endpoint controller lists a host-network pod at its node's address.
    let slice = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                       "metadata": {"name": "node-metrics-abc", "namespace": "default", "resourceVersion": "7",
                                    "labels": {"kubernetes.io/service-name": "node-metrics"}},
                       "addressType": "IPv4", "ports": [{"name": "http", "port": 9100}],
                       "endpoints": [{"addresses": [node_ip], "conditions": {"ready": true},
                                      "targetRef": {"kind": "Pod", "name": "node-exporter-x7k2p", "namespace": "default"}}]});
    let addr = serve_lists(vec![
        ("/api/v1/pods", "Pod", pods),
        ("/api/v1/services", "Service", vec![svc]),
        ("/apis/discovery.k8s.io/v1/endpointslices", "EndpointSlice", vec![slice]),
    ])
    .await;
    let client = kube::Client::try_from(kube::Config::new(format!("http://{addr}").parse().unwrap())).unwrap();
    let store = Arc::new(Store::default());
    let problems = Arc::new(Mutex::new(Vec::new()));
    tokio::spawn(source::kube::run(client, store.clone(), problems.clone()));
    for _ in 0..1000 {
        if store.current().version > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let snap = store.current();
    assert!(snap.version > 0, "nothing published");
    let names = |ws: &[ferry_model::Workload]| -> Vec<(String, String)> {
        ws.iter()
            .map(|w| (w.name.clone(), w.workload_name().to_owned()))
            .collect()
    };
    let owned = |v: &[(&str, &str)]| -> Vec<(String, String)> {
        v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    };
    // Mesh workloads, named as Istio names them; the host-network pods apart.
    assert_eq!(
        names(&snap.view.workloads),
        owned(&[
            ("backup-29012345-abcde", "backup"),
            ("reviews-v1-6f7b8c9d4-x2x9z", "reviews-v1"),
        ])
    );
    assert_eq!(
        names(&snap.view.host_network),
        owned(&[
            ("kube-proxy-q8w9e", "kube-proxy"),
            ("node-exporter-x7k2p", "node-exporter"),
        ])
    );
    // What node n1 is sent validates (the agent's own check), and carries
    // the workload names on the wire.
    let held = ferry_model::proto::HeldResources(
        snap.resources
            .for_node("n1")
            .into_iter()
            .map(|(n, r)| (n.to_owned(), r.as_ref().clone()))
            .collect(),
    );
    let cfg = held
        .to_config("n1", &Default::default())
        .unwrap_or_else(|p| panic!("n1 would NACK: {p:#?}"));
    assert_eq!(
        names(&cfg.workloads),
        owned(&[
            ("backup-29012345-abcde", "backup"),
            ("reviews-v1-6f7b8c9d4-x2x9z", "reviews-v1"),
        ])
    );
    // The Service backed by the host-network pod still routes to it.
    let s = cfg.services.iter().find(|s| s.name == "node-metrics").unwrap();
    assert_eq!(
        s.endpoints.iter().map(|e| e.ip.to_string()).collect::<Vec<_>>(),
        [node_ip]
    );
    // The CA's view (who may get certificates) has no host-network pod.
    assert!(
        snap.pods
            .keys()
            .all(|uid| !uid.starts_with("node-exporter") && !uid.starts_with("kube-proxy")),
        "{:?}",
        snap.pods.keys()
    );
    // Listed for what they are: both asked in (annotation), so warned about.
    let listed: Vec<String> = problems
        .lock()
        .unwrap()
        .iter()
        .filter(|p| p.field == "spec.hostNetwork")
        .map(|p| p.object.clone())
        .collect();
    assert_eq!(
        listed,
        ["Pod default/kube-proxy-q8w9e", "Pod default/node-exporter-x7k2p"]
    );
}

/// RateLimitPolicy (ferry.dev/v1alpha1) is watched: the chart's example
/// reaches the model and every node's config; an invalid one is rejected
/// and listed with its field.
#[tokio::test]
async fn rate_limit_policies_are_watched_streamed_and_bad_ones_rejected() {
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/daemonset/examples/ratelimitpolicy.yaml"
    ))
    .unwrap();
    let mut good: serde_json::Value = serde_norway::from_str(&example).unwrap();
    good["metadata"]["resourceVersion"] = json!("7");
    let mut bad = good.clone();
    bad["metadata"]["name"] = json!("zero");
    bad["spec"]["total"]["requestsPerSecond"] = json!(0);
    let svc = json!({"apiVersion": "v1", "kind": "Service",
                     "metadata": {"name": "reviews", "namespace": "default", "resourceVersion": "7"},
                     "spec": {"clusterIP": "10.96.0.40", "selector": {"app": "reviews"},
                              "ports": [{"name": "http", "port": 9080, "targetPort": 9080}]}});
    let pod = owned_pod(
        "reviews-v1-6f7b8c9d4-x2x9z",
        "10.1.1.2",
        ("ReplicaSet", "reviews-v1-6f7b8c9d4"),
        json!({"app": "reviews"}),
        false,
    );
    let addr = serve_lists(vec![
        ("/api/v1/pods", "Pod", vec![pod]),
        ("/api/v1/services", "Service", vec![svc]),
        (
            "/apis/ferry.dev/v1alpha1/ratelimitpolicies",
            "RateLimitPolicy",
            vec![good, bad],
        ),
    ])
    .await;
    let client = kube::Client::try_from(kube::Config::new(format!("http://{addr}").parse().unwrap())).unwrap();
    let store = Arc::new(Store::default());
    let problems = Arc::new(Mutex::new(Vec::new()));
    tokio::spawn(source::kube::run(client, store.clone(), problems.clone()));
    for _ in 0..1000 {
        if store.current().version > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let snap = store.current();
    let names: Vec<&str> = snap.view.rate_limits.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["reviews"], "the valid policy only");
    // Streamed to every node, the one backing the Service and any other.
    for node in ["n1", "n2"] {
        let held = ferry_model::proto::HeldResources(
            snap.resources
                .for_node(node)
                .into_iter()
                .map(|(n, r)| (n.to_owned(), r.as_ref().clone()))
                .collect(),
        );
        assert!(held.0.contains_key("ratelimitpolicy/default/reviews"), "{node}");
        let cfg = held
            .to_config(node, &Default::default())
            .unwrap_or_else(|p| panic!("{node} would NACK: {p:#?}"));
        let p = &cfg.rate_limits[0];
        assert_eq!(
            (
                p.service.as_str(),
                p.port,
                p.total_rps,
                p.per_identity_rps,
                p.overrides[0].rps
            ),
            ("default/reviews", Some(9080), Some(100), Some(20), 50)
        );
    }
    let listed: Vec<String> = problems.lock().unwrap().iter().map(|p| p.to_string()).collect();
    assert!(
        listed.iter().any(|p| p.contains("RateLimitPolicy default/zero")
            && p.contains("spec.total.requestsPerSecond: 0 is not a rate")),
        "{listed:#?}"
    );
}
