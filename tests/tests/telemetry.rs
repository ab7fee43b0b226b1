//! Telemetry on the cluster-in-a-box: Istio-standard TCP metrics scraped and
//! parsed as Prometheus text, access logs, readiness and the admin endpoint.

use std::{collections::HashMap, time::Duration};

use ferry_box::{eventually, require_root, ClusterBox, Spec};
use prometheus_parse::Scrape;

const VIP: &str = "10.96.0.10:80";

fn up(spec: Spec) -> ClusterBox {
    require_root();
    ClusterBox::up(spec, ferry_box::default_bin_dir()).expect("box up")
}

/// The one sample of `metric` whose labels include all of `want`.
fn find(scrape: &Scrape, metric: &str, want: &[(&str, &str)]) -> Option<f64> {
    let hits: Vec<_> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric && want.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .collect();
    assert!(hits.len() <= 1, "{metric} {want:?} matches {} samples", hits.len());
    hits.first().map(|s| ferry_box::sample_value(&s.value))
}

#[test]
fn istio_tcp_metrics_have_exact_counts_and_labels() {
    let b = up(Spec::demo());
    let s = &b.state;
    let mut servers = HashMap::new();
    for _ in 0..2 {
        let (server, _) = s.who("client", VIP).unwrap();
        *servers.entry(server).or_insert(0) += 1;
    }
    assert_eq!(servers.len(), 2, "one local, one cross-node: {servers:?}");
    assert!(eventually(Duration::from_secs(5), || s
        .admin_json(0, "/conns")
        .map(|c| c.as_array().is_some_and(Vec::is_empty))
        .unwrap_or(false)));

    let n1 = s.scrape(0).unwrap();
    let common = [
        ("source_workload", "client"),
        ("source_workload_namespace", "default"),
        ("source_app", "client"),
        ("destination_service", "echo.default.svc.cluster.local"),
        ("destination_service_name", "echo"),
        ("destination_service_namespace", "default"),
        ("request_protocol", "tcp"),
    ];
    // Same node: never leaves the node, no TLS. Cross node: the HBONE tunnel,
    // mutual TLS, both principals proven.
    let local = [("connection_security_policy", "none"), ("source_principal", "unknown")];
    let mtls = [
        ("connection_security_policy", "mutual_tls"),
        ("source_principal", "spiffe://cluster.local/ns/default/sa/client"),
        ("destination_principal", "spiffe://cluster.local/ns/default/sa/echo-2"),
    ];
    for (dst, reporter, security) in [
        ("echo-1", "source", &local[..]),
        ("echo-2", "source", &mtls[..]),
        ("echo-1", "destination", &local[..]),
    ] {
        let mut want = common.to_vec();
        want.extend([("destination_workload", dst), ("reporter", reporter)]);
        want.extend_from_slice(security);
        assert_eq!(
            find(&n1, "istio_tcp_connections_opened_total", &want),
            Some(1.0),
            "{dst} {reporter}"
        );
        assert_eq!(
            find(&n1, "istio_tcp_connections_closed_total", &want),
            Some(1.0),
            "{dst} {reporter}"
        );
        // Request direction: "WHO\n"; response direction: "<server> <ip:port>\n".
        assert_eq!(
            find(&n1, "istio_tcp_received_bytes_total", &want),
            Some(4.0),
            "{dst} {reporter}"
        );
        let sent = find(&n1, "istio_tcp_sent_bytes_total", &want).unwrap();
        assert!((20.0..40.0).contains(&sent), "{dst} {reporter}: {sent}");
    }
    // Node 2 reports the cross-node connection as its destination.
    let n2 = s.scrape(1).unwrap();
    let want = [
        ("reporter", "destination"),
        ("source_workload", "client"),
        ("destination_workload", "echo-2"),
        ("connection_security_policy", "mutual_tls"),
        ("source_principal", "spiffe://cluster.local/ns/default/sa/client"),
        ("destination_principal", "spiffe://cluster.local/ns/default/sa/echo-2"),
    ];
    assert_eq!(find(&n2, "istio_tcp_connections_opened_total", &want), Some(1.0));
    assert_eq!(find(&n2, "istio_tcp_received_bytes_total", &want), Some(4.0));
    // Ferry's own: eBPF counters and agent state.
    assert_eq!(find(&n1, "ferry_ebpf_redirects_total", &[]), Some(2.0));
    assert_eq!(find(&n1, "ferry_enrolled_pods", &[]), Some(2.0));
    assert_eq!(find(&n1, "ferry_outbound_connections_total", &[]), Some(2.0));
    assert_eq!(find(&n2, "ferry_tunnel_connections_total", &[]), Some(1.0));
    assert_eq!(find(&n1, "ferry_ebpf_events_dropped_total", &[]), Some(0.0));
}

#[test]
fn access_logs_follow_the_per_namespace_policy() {
    let mut spec = Spec::demo();
    spec.access_log.mode = ferry_model::access_log::Mode::Off;
    let mut b = up(spec);
    b.state.who("client", VIP).unwrap();
    b.update(|s| {
        s.access_log
            .namespaces
            .insert("default".into(), ferry_model::access_log::Mode::Full)
            .map(|_| ())
            .unwrap_or(())
    })
    .unwrap();
    let (server, _) = b.state.who("client", VIP).unwrap();
    assert!(eventually(Duration::from_secs(5), || !b.state.access_log(0).is_empty()));
    let out: Vec<_> = b
        .state
        .access_log(0)
        .into_iter()
        .filter(|l| l["direction"] == "outbound")
        .collect();
    assert_eq!(
        out.len(),
        1,
        "only the connection made after the namespace was set to full: {out:?}"
    );
    let l = &out[0];
    assert_eq!(
        (l["source"].as_str(), l["orig_dst"].as_str(), l["outcome"].as_str()),
        (Some("default/client"), Some(VIP), Some("ok"))
    );
    assert_eq!(l["sent"], 4);
    let ep = if server == "echo-1" {
        b.state.pod_ip("echo-1")
    } else {
        b.state.pod_ip("echo-2")
    }
    .unwrap();
    assert_eq!(l["endpoint"].as_str(), Some(format!("{ep}:8080").as_str()));
}

#[test]
fn ready_only_after_config_is_applied_and_admin_is_local_only() {
    let mut b = up(Spec::demo());
    let s = b.state.clone();
    assert_eq!(s.admin_get(0, "/ready").unwrap().0, 200);
    // Restart node1's agent with its config file missing: up, not ready.
    b.stop_agent(0).unwrap();
    let cfg = s.config_path(0);
    let hidden = cfg.with_extension("hidden");
    std::fs::rename(&cfg, &hidden).unwrap();
    b.start_agent(0).unwrap();
    assert!(eventually(Duration::from_secs(10), || s
        .admin_get(0, "/healthz")
        .map(|r| r.0 == 200)
        .unwrap_or(false)));
    assert_eq!(s.admin_get(0, "/ready").unwrap().0, 503);
    std::fs::rename(&hidden, &cfg).unwrap();
    assert!(eventually(Duration::from_secs(10), || s
        .admin_get(0, "/ready")
        .map(|r| r.0 == 200)
        .unwrap_or(false)));
    assert!(s.who("client", VIP).is_ok());
    // The admin endpoint is not reachable from a pod, neither as loopback nor via the node's address.
    assert!(!s.probe("client", "127.0.0.1:15000").unwrap());
    assert!(!s.probe("client", "10.1.1.1:15000").unwrap());
    // Log level changes at runtime.
    assert_eq!(
        s.http(0, "POST", "127.0.0.1:15000", "/logging?level=debug").unwrap().0,
        200
    );
    assert_eq!(
        s.http(0, "POST", "127.0.0.1:15000", "/logging?level=[bad").unwrap().0,
        400
    );
    assert_eq!(
        s.http(0, "GET", "127.0.0.1:15000", "/logging?level=debug").unwrap().0,
        405
    );
}
