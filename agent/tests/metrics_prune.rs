//! Istio metrics name workloads as Istio does, and forget them when they
//! go: real connections and requests through the in-process agent, then a
//! config without one workload; its TCP and request series are gone from
//! the exposition, while a workload that stays (even across a rollout that
//! replaces its pod) keeps its series and counts.

mod common;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Empty};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;

/// Node n1: a client, and pods of Deployments reviews-v1 and reviews-v2
/// (`v1_pod` names v1's pod: a rollout replaces it), each behind an HTTP
/// Service (10.96.48.1 and .2, port 9080) and a TCP one (.11 and .12, port 7000).
fn cfg(v1_pod: &str, with_v2: bool) -> ferry_model::ConfigFile {
    let mut y = String::from(
        "node: n1\nworkloads:\n  - {uid: c, name: client-7d9f-abcde, workloadName: client, node: n1, ip: 127.48.0.2, enrolled: true, labels: {app: client}}\n",
    );
    y += &format!("  - {{uid: {v1_pod}, name: {v1_pod}, workloadName: reviews-v1, node: n1, ip: 127.48.0.11, enrolled: true, labels: {{app: reviews, version: v1}}}}\n");
    if with_v2 {
        y += "  - {uid: v2, name: reviews-v2-5c4b3a291-zzzzz, workloadName: reviews-v2, node: n1, ip: 127.48.0.12, enrolled: true, labels: {app: reviews, version: v2}}\n";
    }
    y += "services:\n";
    for (i, ip) in [(1, "127.48.0.11"), (2, "127.48.0.12")] {
        y += &format!("  - {{name: reviews-v{i}, vip: 10.96.48.{i}, ports: [{{port: 9080, targetPort: 9080, protocol: http}}], endpoints: [{{ip: {ip}}}]}}\n");
        y += &format!("  - {{name: echo-v{i}, vip: 10.96.48.1{i}, ports: [{{port: 7000, targetPort: 7000, protocol: tcp}}], endpoints: [{{ip: {ip}}}]}}\n");
    }
    config(&y)
}

fn scrape(ag: &TestAgent) -> Vec<prometheus_parse::Sample> {
    let text = ag.proxy.telemetry.metrics.encode();
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .unwrap()
        .samples
}

/// The sum of `metric` over samples whose `label` is `value`.
fn sum(ag: &TestAgent, metric: &str, label: &str, value: &str) -> f64 {
    scrape(ag)
        .into_iter()
        .filter(|s| s.metric == metric && s.labels.get(label) == Some(value))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

/// One HTTP/1.1 GET from the client pod to `vip`.
async fn get(ag: &TestAgent, vip: &str) -> String {
    let s = app_stream(ag, "127.48.0.2".parse().unwrap(), vip.parse().unwrap())
        .await
        .unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await.unwrap();
    tokio::spawn(conn);
    tokio::time::timeout(DEADLINE, async {
        let req = Request::builder()
            .uri("/")
            .header("host", "reviews")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = tx.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        String::from_utf8_lossy(&resp.into_body().collect().await.unwrap().to_bytes()).into_owned()
    })
    .await
    .expect("an answer within the deadline")
}

#[tokio::test]
async fn series_of_a_departed_workload_are_pruned_and_the_rest_kept() {
    let ag = agent("n1", false, &[]);
    ag.reconciler.reconcile(cfg("reviews-v1-6f7b8c9d4-aaaaa", true)).await;
    let _v1 = http_app("127.48.0.11:9080".parse().unwrap(), "v1").await;
    let _v2 = http_app("127.48.0.12:9080".parse().unwrap(), "v2").await;
    let _e1 = echo_app("127.48.0.11:7000".parse().unwrap()).await;
    let _e2 = echo_app("127.48.0.12:7000".parse().unwrap()).await;
    let client: std::net::Ipv4Addr = "127.48.0.2".parse().unwrap();
    for i in 1..=2 {
        assert_eq!(get(&ag, &format!("10.96.48.{i}:9080")).await, format!("v{i} GET /"));
        let got = app_connect(&ag, client, format!("10.96.48.1{i}:7000").parse().unwrap(), "hi")
            .await
            .unwrap();
        assert_eq!(got, "127.48.0.2 hi");
    }
    let (req, tcp) = ("istio_requests_total", "istio_tcp_connections_opened_total");
    until("both workloads' request and TCP series", || {
        ["reviews-v1", "reviews-v2"]
            .iter()
            .all(|w| sum(&ag, req, "destination_workload", w) > 0.0 && sum(&ag, tcp, "destination_workload", w) > 0.0)
    })
    .await;
    // Named after the Deployment, not the pod; canonical service from `app`.
    let all = ag.proxy.telemetry.metrics.encode();
    assert!(
        !all.contains("reviews-v1-6f7b8c9d4-aaaaa") && !all.contains("client-7d9f-abcde"),
        "{all}"
    );
    assert!(sum(&ag, tcp, "source_workload", "client") > 0.0, "{all}");
    assert!(all.contains(r#"destination_canonical_service="reviews""#), "{all}");
    let v1_requests = sum(&ag, req, "destination_workload", "reviews-v1");
    let v1_tcp = sum(&ag, tcp, "destination_workload", "reviews-v1");

    // reviews-v2 goes; reviews-v1's pod is replaced by a rollout.
    ag.reconciler.reconcile(cfg("reviews-v1-6f7b8c9d4-bbbbb", false)).await;
    let all = ag.proxy.telemetry.metrics.encode();
    assert!(
        !all.contains("reviews-v2"),
        "series of the departed workload remain:\n{all}"
    );
    for (metric, was) in [(req, v1_requests), (tcp, v1_tcp)] {
        assert_eq!(
            sum(&ag, metric, "destination_workload", "reviews-v1"),
            was,
            "{metric}: the remaining workload keeps its series and counts\n{all}"
        );
    }
    for h in [
        "istio_request_duration_milliseconds_count",
        "istio_request_bytes_count",
        "istio_tcp_connections_closed_total",
    ] {
        assert!(sum(&ag, h, "destination_workload", "reviews-v1") > 0.0, "{h}\n{all}");
    }
    // Traffic after the update is counted as before.
    assert_eq!(get(&ag, "10.96.48.1:9080").await, "v1 GET /");
    until("the new request counted", || {
        sum(&ag, req, "destination_workload", "reviews-v1") > v1_requests
    })
    .await;
}
