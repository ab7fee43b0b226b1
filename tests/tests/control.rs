//! The control plane on the cluster-in-a-box: ferry-control reads the box's
//! cluster YAML (Kubernetes shapes) and streams each node its config; the
//! agents run with --discovery (no workloads in their files). Changes are
//! made by editing the YAML, as `kubectl apply` would change the API.

use std::time::Duration;

use ferry_box::{eventually, require_root, ClusterBox, Spec};

const VIP: &str = "10.96.0.10:80";

fn up() -> ClusterBox {
    require_root();
    let spec = Spec {
        discovery: true,
        ..Spec::demo()
    };
    ClusterBox::up(spec, ferry_box::default_bin_dir()).expect("box up")
}

fn servers(b: &ClusterBox, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| b.state.who("client", VIP).expect("who via the VIP").0)
        .collect()
}

#[test]
fn config_comes_from_the_control_plane_and_changes_apply_live() {
    let mut b = up();
    let s = b.state.clone();
    // The agents' files hold no workloads: everything below came over the stream.
    let file = std::fs::read_to_string(s.config_path(0)).unwrap();
    assert!(!file.contains("echo-1"), "{file}");
    let dump = s.admin_json(0, "/config_dump").unwrap();
    let pods: Vec<&str> = dump["pods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(pods, ["client", "echo-1"], "node 1's own pods: {dump}");
    let m = s.scrape(0).unwrap();
    let connected = m
        .samples
        .iter()
        .find(|x| x.metric == "ferry_control_connected")
        .unwrap();
    assert_eq!(ferry_box::sample_value(&connected.value), 1.0);
    let c = &dump["control"];
    assert_eq!(c["connected"], true, "{c}");
    assert_eq!(c["system_version"].as_u64(), Some(s.control_version().unwrap()), "{c}");
    let out = s.ferryctl(0, &["control"]).unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("https://10.1.1.1:15012") && table.contains("true"),
        "{table}"
    );
    // netns and host veth were found by the agent itself (pause process, netlink).
    assert!(
        dump["pods"][1]["host_veth"]
            .as_str()
            .is_some_and(|v| v.starts_with("veth")),
        "{dump}"
    );

    let both = servers(&b, 6);
    assert!(
        both.contains(&"echo-1".into()) && both.contains(&"echo-2".into()),
        "{both:?}"
    );

    // Unenroll the client (annotation removed): its connects are no longer steered.
    let redirects = |b: &ClusterBox| b.state.bpf_stats(0).unwrap()["redirects"];
    b.update(|sp| sp.pods[0].enrolled = false).unwrap();
    let before = redirects(&b);
    assert!(
        !b.state.probe("client", VIP).unwrap(),
        "no mesh, no kube-proxy: the VIP leads nowhere"
    );
    assert_eq!(redirects(&b), before, "an unenrolled pod's connect was steered");
    let dump = b.state.admin_json(0, "/config_dump").unwrap();
    assert_eq!(dump["pods"][0]["enrolled"], false, "{dump}");
    // Re-enroll: steered again, without restarting anything.
    b.update(|sp| sp.pods[0].enrolled = true).unwrap();
    assert_eq!(servers(&b, 1).len(), 1);
    assert_eq!(redirects(&b), before + 1);
    // Cross-node, so packets cross the client's veth (same-node hops stay inside the pods' netns).
    let echo2 = format!("{}:8080", b.state.pod_ip("echo-2").unwrap());
    assert_eq!(b.state.who("client", &echo2).unwrap().0, "echo-2");
    let traffic = b.state.ferryctl(0, &["bpf", "dump", "traffic", "-o", "json"]).unwrap();
    let traffic = String::from_utf8_lossy(&traffic.stdout).into_owned();
    assert!(
        traffic.contains("\"client\""),
        "re-enrolled pod counted again by tc: {traffic}"
    );

    // Scale the endpoint set: new connections follow it.
    b.update(|sp| sp.services[0].endpoints = vec!["echo-2".into()]).unwrap();
    assert!(servers(&b, 6).iter().all(|x| x == "echo-2"));
    b.update(|sp| sp.services[0].endpoints = vec!["echo-1".into()]).unwrap();
    assert!(servers(&b, 6).iter().all(|x| x == "echo-1"));

    // Delete the service: its VIP is no longer captured.
    b.update(|sp| sp.services.clear()).unwrap();
    let dump = b.state.ferryctl(0, &["bpf", "dump", "mesh-dst", "-o", "json"]).unwrap();
    let text = String::from_utf8_lossy(&dump.stdout);
    assert!(!text.contains("10.96.0.10"), "{text}");
    assert!(text.contains(&b.state.pod_ip("echo-1").unwrap().to_string()), "{text}");
    let before = redirects(&b);
    assert!(!b.state.probe("client", VIP).unwrap());
    assert_eq!(redirects(&b), before, "a deleted service's VIP was still steered");
}

#[test]
fn bad_cluster_yaml_is_reported_and_disturbs_nothing() {
    let mut b = up();
    let v0 = b.state.control_version().unwrap();
    b.state.spec.cluster_yaml = vec![
        ("garbage.yaml".into(), "kind: [\n".into()),
        (
            "routes.yaml".into(),
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: typo}\nspec:\n  hosts: [echo]\n  http:\n  - timeout: 3 seconds\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: nowhere}\nspec:\n  hosts: [nosuch]\n  http:\n  - route:\n    - destination: {host: nosuch}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: wrong}\nspec: {ports: 80}\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: echo}\nspec: {host: echo, trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}, retires: 3}}\n".into(),
        ),
    ];
    b.state.write_configs().unwrap();
    let problems = || {
        let (_, body) = b.state.http(0, "GET", ferry_box::CONTROL_ADMIN, "/problems").unwrap();
        serde_json::from_str::<Vec<serde_json::Value>>(&body).unwrap()
    };
    assert!(
        eventually(Duration::from_secs(5), || problems().len() >= 5),
        "{:?}",
        problems()
    );
    let p = problems();
    let find = |needle: &str| p.iter().any(|x| x.to_string().contains(needle));
    assert!(find("garbage.yaml") && find("not YAML"), "{p:#?}");
    assert!(
        find("VirtualService default/typo")
            && find("spec.http[0]")
            && find("\\\"3 seconds\\\" is not a duration")
            && find("at line 7 column 5"),
        "{p:#?}"
    );
    assert!(
        find("VirtualService default/nowhere") && find("no Service default/nosuch"),
        "{p:#?}"
    );
    assert!(find("Service default/wrong") && find("spec.ports"), "{p:#?}");
    assert!(
        find("DestinationRule default/echo") && find("unknown field `retires`"),
        "{p:#?}"
    );
    // Nothing else moved: same snapshot, traffic as before.
    assert_eq!(b.state.control_version().unwrap(), v0);
    let both = servers(&b, 6);
    assert!(
        both.contains(&"echo-1".into()) && both.contains(&"echo-2".into()),
        "{both:?}"
    );
    // Break the main file: its objects stay as they were, and a later fix applies.
    let main = b.state.cluster_dir().join("box.yaml");
    let good = std::fs::read_to_string(&main).unwrap();
    std::fs::write(&main, format!("{good}---\nkind: [\n")).unwrap();
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(b.state.control_version().unwrap(), v0);
    assert_eq!(servers(&b, 2).len(), 2);
    b.update(|sp| sp.services[0].endpoints = vec!["echo-2".into()]).unwrap();
    assert!(servers(&b, 4).iter().all(|x| x == "echo-2"));
}

#[test]
fn agents_keep_serving_without_the_control_plane_and_converge_after() {
    let mut b = up();
    // Round robin: which endpoints a config has is what this test reads from
    // where connections land (the default, LEAST_REQUEST, rightly avoids the
    // endpoint busy with the long transfer).
    b.update(|sp| {
        sp.cluster_yaml.push((
            "echo-rr.yaml".into(),
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: echo-rr}\nspec:\n  host: echo\n  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}\n".into(),
        ))
    })
    .unwrap();
    let s = b.state.clone();
    // A long transfer across nodes, running while the control plane dies.
    let transfer = {
        let s = s.clone();
        std::thread::spawn(move || s.client("client", &["echo", "--to", VIP, "--bytes", "400000000"]))
    };
    std::thread::sleep(Duration::from_millis(300));
    b.stop_control();
    let connected = |n| {
        let m = s.scrape(n).unwrap();
        let c = m
            .samples
            .iter()
            .find(|x| x.metric == "ferry_control_connected")
            .unwrap();
        ferry_box::sample_value(&c.value)
    };
    assert!(eventually(Duration::from_secs(10), || connected(0) == 0.0 && connected(1) == 0.0));
    let c = s.admin_json(0, "/config_dump").unwrap()["control"].clone();
    assert!(c["connected"] == false && c["last_error"].is_string(), "{c}");
    // New connections, both nodes, from the last-known config.
    let both = servers(&b, 6);
    assert!(
        both.contains(&"echo-1".into()) && both.contains(&"echo-2".into()),
        "{both:?}"
    );
    // A change made while the control plane is down is not seen...
    b.state.spec.services[0].endpoints = vec!["echo-2".into()];
    b.state.write_configs().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(servers(&b, 6).contains(&"echo-1".into()));
    // ...until it is back: agents reconnect (backoff) and converge.
    b.start_control().unwrap();
    b.state.wait_synced(1).unwrap();
    assert!(eventually(Duration::from_secs(10), || servers(&b, 4)
        .iter()
        .all(|x| x == "echo-2")));
    let out = transfer
        .join()
        .unwrap()
        .expect("the transfer survived the control plane's restart");
    assert!(out.contains("\"ok\":true"), "{out}");
    // The reconnect resumed: the agent said what it held and got only the change.
    let log = b.agent_log(0);
    let resumed = log
        .lines()
        .filter(|l| l.contains("subscribed to the control plane"))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["fields"]["resumed_resources"].as_u64())
        .max()
        .unwrap_or(0);
    assert!(resumed >= 4, "{log}");
    let last_update = log
        .lines()
        .rev()
        .filter(|l| l.contains("config update applied (ACK)"))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .next()
        .unwrap();
    assert_eq!(
        last_update["fields"]["changed"], 1,
        "only the changed service was resent: {last_update}"
    );
}

#[test]
fn the_bookinfo_manifests_run_as_written() {
    require_root();
    let spec = ferry_box::manifests::spec_from_dir(&ferry_box::manifests::bookinfo(), 2).unwrap();
    let b = ClusterBox::up(spec, ferry_box::default_bin_dir()).expect("box up");
    let s = &b.state;
    // Enrollment: the namespace's Istio ambient label, except where the pod opts out.
    let enrolled: Vec<(String, bool)> = (0..2)
        .flat_map(|n| {
            s.admin_json(n, "/config_dump").unwrap()["pods"]
                .as_array()
                .unwrap()
                .clone()
        })
        .map(|p| (p["name"].as_str().unwrap().to_owned(), p["enrolled"] == true))
        .collect();
    for (name, e) in &enrolled {
        assert_eq!(*e, name != "legacy", "{enrolled:?}");
    }
    assert_eq!(enrolled.len(), 7);
    // Endpoints from the Service's selector: all three reviews pods.
    let ip = |p: &str| s.pod_ip(p).unwrap().to_string();
    let reviews_eps = |n: usize| -> Vec<String> {
        let dump = s.admin_json(n, "/config_dump").unwrap();
        let svc = dump["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "reviews")
            .cloned()
            .unwrap_or_else(|| panic!("no reviews service: {dump}"));
        let mut eps: Vec<String> = svc["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["ip"].as_str().unwrap().to_owned())
            .collect();
        eps.sort();
        eps
    };
    let mut want = vec![ip("reviews-v1"), ip("reviews-v2"), ip("reviews-v3")];
    want.sort();
    assert_eq!(reviews_eps(0), want);
    assert_eq!(reviews_eps(1), want);
    // The ports are named `http`: requests are routed by the seed's
    // VirtualService (`user: tester` to v2, else v1/v2 90/10; no v3).
    let get = |pod: &str, url: &str, n: &str, headers: &[&str]| {
        let mut args = vec!["--url", url, "--count", n, "--concurrency", "4"];
        for h in headers {
            args.extend(["--header", *h]);
        }
        s.http_client(pod, &args).unwrap()
    };
    let tester = get(
        "productpage-v1",
        "http://10.96.0.22:9080/reviews/0",
        "10",
        &["user:tester"],
    );
    assert_eq!(tester["by_status"]["200"], 10, "{tester}");
    assert_eq!(tester["by_pod"]["reviews-v2"], 10, "{tester}");
    let others = get("productpage-v1", "http://10.96.0.22:9080/reviews/0", "40", &[]);
    assert_eq!(others["by_status"]["200"], 40, "{others}");
    let v1 = others["by_pod"]["reviews-v1"].as_u64().unwrap_or(0);
    let v2 = others["by_pod"]["reviews-v2"].as_u64().unwrap_or(0);
    assert!(v1 + v2 == 40 && v1 >= 25, "90/10 v1/v2: {others}");
    // The whole page: productpage -> details, reviews (-> ratings for v2).
    let page = get(
        "ratings-v1",
        "http://10.96.0.20:9080/productpage",
        "4",
        &["user:tester"],
    );
    assert_eq!(page["by_pod"]["productpage-v1"], 4, "{page}");
    for pod in ["details-v1", "reviews-v2", "ratings-v1"] {
        assert_eq!(page["by_nested"][pod], 4, "{page}");
    }
    // The seed's PeerAuthentication (STRICT) refuses the opted-out pod's plaintext.
    let ratings = format!("http://{}:9080/ratings/0", s.pod_ip("ratings-v1").unwrap());
    let refused = get("legacy", &ratings, "1", &[]);
    assert!(refused["by_status"].as_object().unwrap().is_empty(), "{refused}");
    assert_eq!(
        refused["errors"]
            .as_object()
            .unwrap()
            .values()
            .filter_map(|v| v.as_u64())
            .sum::<u64>(),
        1,
        "{refused}"
    );
    let admitted = get("details-v1", &ratings, "1", &[]);
    assert_eq!(admitted["by_pod"]["ratings-v1"], 1, "{admitted}");
    // Identities from serviceAccountName.
    let certs = s.admin_json(0, "/certs").unwrap();
    assert!(
        certs
            .to_string()
            .contains("spiffe://cluster.local/ns/default/sa/bookinfo-productpage"),
        "{certs}"
    );
}

#[test]
fn an_update_the_agent_rejects_is_nacked_and_the_previous_config_kept() {
    let mut b = up();
    let s = b.state.clone();
    let v0 = s.control_version().unwrap();
    // A second pod claiming echo-1's address: valid to the control plane (each
    // object is), rejected by node 1's agent, which checks the whole.
    let clash = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: clash, uid: clash-uid, annotations: {{ferry.dev/mesh: enabled}}}}\nspec: {{nodeName: {}, containers: [{{name: c}}]}}\nstatus: {{podIP: {}}}\n",
        s.node_name(0),
        s.pod_ip("echo-1").unwrap()
    );
    b.state.spec.cluster_yaml = vec![("clash.yaml".into(), clash)];
    b.state.write_configs().unwrap();
    let nack = || {
        s.control_nodes().unwrap()[s.node_name(0)]["last_nack"]
            .as_str()
            .map(str::to_owned)
    };
    assert!(
        eventually(Duration::from_secs(10), || nack().is_some()),
        "{}",
        s.control_nodes().unwrap()
    );
    assert!(nack().unwrap().contains("already used"), "{:?}", nack());
    let c = s.admin_json(0, "/config_dump").unwrap()["control"].clone();
    assert!(
        c["last_nack"].as_str().is_some_and(|n| n.contains("already used")),
        "{c}"
    );
    assert_eq!(
        c["system_version"].as_u64(),
        Some(v0),
        "the agent kept the previous config: {c}"
    );
    let m = s.scrape(0).unwrap();
    let rejected = m
        .samples
        .iter()
        .find(|x| x.metric == "ferry_config_rejected_total")
        .unwrap();
    assert!(ferry_box::sample_value(&rejected.value) >= 1.0);
    // Node 2 holds every mesh member too, so it rejected the clash as well. Traffic as before.
    assert!(eventually(Duration::from_secs(5), || s.control_nodes().unwrap()
        [s.node_name(1)]["last_nack"]
        .is_string()));
    // ferry-control's own metrics say the same: both nodes connected,
    // authenticated (static tokens here) and counting their NACKs.
    let cm = s.control_metrics().unwrap();
    let value = |metric: &str, labels: &[(&str, &str)]| -> f64 {
        cm.samples
            .iter()
            .filter(|x| x.metric == metric && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
            .map(|x| ferry_box::sample_value(&x.value))
            .sum()
    };
    for n in 0..2 {
        let node = s.node_name(n);
        assert_eq!(value("ferry_control_node_connected", &[("node", &node)]), 1.0);
        assert!(value("ferry_control_node_nacks_total", &[("node", &node)]) >= 1.0);
    }
    assert!(value("ferry_control_node_auth_total", &[("outcome", "accepted")]) >= 2.0);
    assert_eq!(
        value("ferry_control_node_auth_total", &[("outcome", "unavailable")]),
        0.0
    );
    assert!(
        value("ferry_control_config_version", &[]) > v0 as f64,
        "the rejected version is current"
    );
    let both = servers(&b, 6);
    assert!(
        both.contains(&"echo-1".into()) && both.contains(&"echo-2".into()),
        "{both:?}"
    );
    // Fixed: both nodes in sync again.
    b.state.spec.cluster_yaml.clear();
    b.state.write_configs().unwrap();
    b.state.wait_synced(v0 + 2).unwrap();
}
