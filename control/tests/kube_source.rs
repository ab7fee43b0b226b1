//! The Kubernetes source against a loopback HTTP server that speaks the API
//! server's list/watch protocol (no kube-apiserver can run here): list,
//! watch from the list's resourceVersion, a watch event, a 410 Gone that
//! forces a relist, a kind whose CRD is missing (404), and an invalid object.

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
        store
            .current()
            .pods
            .values()
            .map(|w| (w.name.clone(), w.ip.to_string()))
            .collect()
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
