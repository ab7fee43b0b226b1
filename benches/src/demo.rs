//! `cargo xtask demo`: the cluster-in-a-box end to end, narrated.

use std::path::PathBuf;

use anyhow::Result;
use ferry_box::{manifests, sample_value, ClusterBox};
use serde_json::Value;

const PRODUCTPAGE: &str = "http://10.96.0.20:9080/productpage";
const REVIEWS_URL: &str = "http://10.96.0.22:9080/reviews/0";
const SEED: &str = "reviews-routing-circuit-breaking-mtls.yaml";

/// What the canary steps apply besides a VirtualService: reviews' three
/// subsets (Istio's destination-rule-all.yaml) and the seed's STRICT
/// PeerAuthentication, kept while the seed's routes are replaced.
const SUBSETS: &str = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: v3, labels: {version: v3}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default}
spec: {mtls: {mode: STRICT}}
";

/// The VirtualServices the demo applies live (the test bed's fixtures).
const CANARY_90_10: &str = include_str!("../../tests/fixtures/reviews-canary-90-10.yaml");
const CANARY_50_50: &str = include_str!("../../tests/fixtures/l7/reviews-50-v3.yaml");
const CANARY_0_100: &str = include_str!("../../tests/fixtures/l7/reviews-0-100-v3.yaml");
const JASON_V2: &str = include_str!("../../tests/fixtures/l7/reviews-jason-v2.yaml");
/// Istio's Bookinfo authorization task, the ratings step, at L4 (no HTTP
/// attributes): only the reviews service account may call ratings.
const RATINGS_POLICY: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ratings-viewer, namespace: default}
spec:
  selector: {matchLabels: {app: ratings}}
  action: ALLOW
  rules:
  - from:
    - source: {principals: [cluster.local/ns/default/sa/bookinfo-reviews]}
";

fn section(title: &str) {
    println!("\n\x1b[1m== {title}\x1b[0m");
}

fn ferryctl(b: &ClusterBox, node: usize, args: &[&str]) -> Result<()> {
    let out = b.state.ferryctl(node, args)?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        print!("{}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn pods_line(b: &ClusterBox) -> Result<()> {
    let s = &b.state;
    for n in 0..s.spec.nodes {
        for p in s.admin_json(n, "/config_dump")?["pods"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let name = p["name"].as_str().unwrap_or_default();
            println!(
                "  pod {:<15} {:<10} on node{}  {}",
                name,
                p["ip"].as_str().unwrap_or_default(),
                n + 1,
                if p["enrolled"] == true {
                    "in the mesh"
                } else {
                    "not in the mesh"
                }
            );
        }
    }
    Ok(())
}

/// `ferry-workload http client` in `pod`: `n` GETs of `url`, 8 at a time.
fn http(b: &ClusterBox, pod: &str, url: &str, n: u64, headers: &[&str]) -> Result<Value> {
    let n = n.to_string();
    let mut args = vec!["--url", url, "--count", &n, "--concurrency", "8"];
    for h in headers {
        args.extend(["--header", h]);
    }
    b.state.http_client(pod, &args)
}

/// `{"reviews-v1": 180, ...}` as `reviews-v1 180, reviews-v3 20`, only the
/// keys starting with `prefix`.
fn tally(v: &Value, prefix: &str) -> String {
    let parts: Vec<String> = v
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(", ")
    }
}

/// Applies a VirtualService live (the seed's routes replaced) and waits
/// until every agent has acknowledged it; returns the milliseconds taken.
fn apply_routes(b: &mut ClusterBox, base: &[(String, String)], vs: &str) -> Result<u128> {
    let t = std::time::Instant::now();
    let mut y = base.to_vec();
    y.push(("routes.yaml".into(), format!("{SUBSETS}---\n{vs}")));
    b.update(|sp| sp.cluster_yaml = y)?;
    Ok(t.elapsed().as_millis())
}

pub fn run(bins: PathBuf, keep: bool) -> Result<()> {
    section("The app: examples/bookinfo (Kubernetes YAML), checked offline first");
    let dir = manifests::bookinfo();
    let out = std::process::Command::new(bins.join("ferryctl"))
        .args(["analyze", "-f"])
        .arg(&dir)
        .output()?;
    println!("  $ ferryctl analyze -f examples/bookinfo");
    print!("  {}", String::from_utf8_lossy(&out.stdout));

    section("Bringing up the cluster-in-a-box, config from ferry-control");
    let spec = manifests::spec_from_dir(&dir, 2)?;
    let mut b = ClusterBox::up(spec, bins)?;
    let s = b.state.clone();
    println!(
        "box {}: 2 nodes (network namespaces), an agent on each with --discovery, ferry-control reading {}",
        s.id,
        s.cluster_dir().display()
    );
    println!(
        "  control plane at snapshot {}; nodes: {}",
        s.control_version()?,
        s.control_nodes()?
    );
    pods_line(&b)?;
    for svc in &s.spec.services {
        println!(
            "  service {:<12} {}:{} -> {}",
            svc.name,
            svc.vip,
            svc.port,
            svc.endpoints.join(", ")
        );
    }

    let reviews = "10.96.0.22:9080";
    let base: Vec<(String, String)> = s.spec.cluster_yaml.iter().filter(|(n, _)| n != SEED).cloned().collect();
    section(
        "Traffic: 20 product pages (productpage -> details, reviews -> ratings), HTTP routed per request by the agents",
    );
    println!("  the seed's VirtualService ({SEED}): `user: tester` -> reviews v2, everyone else v1 90% / v2 10%");
    let page = http(&b, "ratings-v1", PRODUCTPAGE, 20, &[])?;
    println!(
        "  no user:      status {}; reviews answered by {}; ratings by {}",
        tally(&page["by_status"], ""),
        tally(&page["by_nested"], "reviews"),
        tally(&page["by_nested"], "ratings")
    );
    let page = http(&b, "ratings-v1", PRODUCTPAGE, 20, &["user:tester"])?;
    println!(
        "  user: tester: status {}; reviews answered by {}; ratings by {}",
        tally(&page["by_status"], ""),
        tally(&page["by_nested"], "reviews"),
        tally(&page["by_nested"], "ratings")
    );
    section("Traffic: a 16 MiB POST productpage (node1) -> details (node2), mTLS between the agents");
    let up = b.state.http_client(
        "productpage-v1",
        &[
            "--url",
            "http://10.96.0.21:9080/details/0",
            "--method",
            "POST",
            "--body-bytes",
            "16777216",
            "--timeout-ms",
            "30000",
        ],
    )?;
    println!(
        "  status {}, served by {}, in {} ms",
        tally(&up["by_status"], ""),
        tally(&up["by_pod"], ""),
        up["elapsed_ms"]
    );
    section("Traffic: the pod that opted out (legacy, ferry.dev/mesh: disabled)");
    let ratings = format!("http://{}:9080/ratings/0", s.pod_ip("ratings-v1")?);
    let r = http(&b, "legacy", &ratings, 1, &[])?;
    if r["by_status"].as_object().is_some_and(|m| !m.is_empty()) {
        println!("  legacy -> {ratings}: status {}", tally(&r["by_status"], ""));
    } else {
        println!(
            "  legacy -> {ratings} (ratings, in the mesh): refused ({}), plaintext under the STRICT PeerAuthentication from the YAML",
            tally(&r["errors"], "")
        );
    }
    println!(
        "  legacy -> {reviews}: connected = {} (its connect() is not steered; there is no kube-proxy in the box)",
        s.probe("legacy", reviews)?
    );

    section("Live: a canary for reviews v3 (VirtualService weights), 200 requests per step");
    for (step, vs) in [
        ("90/10 v1/v3", CANARY_90_10),
        ("50/50 v1/v3", CANARY_50_50),
        ("0/100 v1/v3", CANARY_0_100),
    ] {
        let ms = apply_routes(&mut b, &base, vs)?;
        let r = http(&b, "productpage-v1", REVIEWS_URL, 200, &[])?;
        println!(
            "  {step}: acknowledged by every agent {ms:>4} ms after the YAML was written; then {}",
            tally(&r["by_pod"], "")
        );
    }
    section("Live: a header route, `end-user: jason` -> reviews v2, everyone else v1 (Istio's request-routing task)");
    let ms = apply_routes(&mut b, &base, JASON_V2)?;
    println!("  acknowledged by every agent {ms} ms after the YAML was written");
    for (who, h) in [
        ("end-user: jason", "end-user:jason"),
        ("end-user: mallory", "end-user:mallory"),
    ] {
        let r = http(&b, "ratings-v1", PRODUCTPAGE, 20, &[h])?;
        println!(
            "  20 pages as {who:<17}: reviews answered by {}",
            tally(&r["by_nested"], "reviews")
        );
    }

    section("Live: an AuthorizationPolicy, ratings admits only the reviews identity (Istio's authorization task, L4)");
    let ms = apply_routes(&mut b, &base, &format!("{JASON_V2}---\n{RATINGS_POLICY}"))?;
    println!("  acknowledged by every agent {ms} ms after the YAML was written");
    let ratings_node = b.state.spec.pods[b.state.pod_index("ratings-v1")?].node;
    let mut enforced = false;
    for from in ["default/reviews-v2", "default/productpage-v1"] {
        let out = b.state.ferryctl(
            ratings_node,
            &[
                "authz",
                "check",
                "--agent",
                "http://127.0.0.1:15000",
                "--from",
                from,
                "--to",
                "default/ratings-v1",
                "--port",
                "9080",
                "-o",
                "json",
            ],
        )?;
        let text = String::from_utf8_lossy(&out.stdout);
        match serde_json::from_str::<Value>(text.trim()) {
            Ok(v) => {
                enforced |= v["policies"].as_array().is_some_and(|p| !p.is_empty());
                println!(
                    "  ferryctl authz check --agent (node{}) {from} -> default/ratings-v1:9080: {} ({}; policy {}, rule {}) [{}]",
                    ratings_node + 1,
                    if v["allowed"] == true { "ALLOWED" } else { "DENIED" },
                    v["reason"].as_str().unwrap_or("-"),
                    v["policy"].as_str().unwrap_or("-"),
                    v["rule"].as_u64().map_or_else(|| "-".to_owned(), |r| r.to_string()),
                    v["decision"].as_str().unwrap_or("-")
                );
            }
            Err(_) => println!(
                "  ferryctl authz check {from}: {}{}",
                text.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        }
    }
    if !enforced {
        println!("  (the agents hold no AuthorizationPolicy from the control plane yet: not streamed in this build)");
    }
    let r = http(&b, "productpage-v1", "http://10.96.0.23:9080/ratings/0", 1, &[])?;
    println!(
        "  productpage -> ratings directly: status {}, errors {}",
        tally(&r["by_status"], ""),
        tally(&r["errors"], "")
    );
    let r = http(&b, "productpage-v1", PRODUCTPAGE, 5, &["end-user:jason"])?;
    println!(
        "  5 pages as jason (productpage -> reviews v2 -> ratings): reviews {}; ratings {}",
        tally(&r["by_nested"], "reviews"),
        tally(&r["by_nested"], "ratings")
    );
    apply_routes(&mut b, &base, JASON_V2)?;

    section("Live: opt productpage out of the mesh by annotation, then back in");
    let t = std::time::Instant::now();
    b.update(|sp| {
        if let Some(p) = sp.pods.iter_mut().find(|p| p.name == "productpage-v1") {
            p.annotations.push(("ferry.dev/mesh".into(), "disabled".into()));
        }
    })?;
    println!(
        "  annotated ferry.dev/mesh=disabled: every agent had acknowledged the change {} ms after the YAML was written",
        t.elapsed().as_millis()
    );
    println!(
        "  productpage -> {reviews}: connected = {} (no longer steered)",
        b.state.probe("productpage-v1", reviews)?
    );
    let t = std::time::Instant::now();
    b.update(|sp| {
        if let Some(p) = sp.pods.iter_mut().find(|p| p.name == "productpage-v1") {
            p.annotations.retain(|(k, _)| k != "ferry.dev/mesh");
        }
    })?;
    let r = http(&b, "productpage-v1", REVIEWS_URL, 1, &[])?;
    println!(
        "  annotation removed (the namespace label applies again): in sync after {} ms; productpage -> {reviews} answered by {}",
        t.elapsed().as_millis(),
        tally(&r["by_pod"], "")
    );
    let s = b.state.clone();

    section("What the agents did: access log, one line per connection and per HTTP request");
    println!("  connections, counted by node, direction, source, original destination and outcome:");
    // (node, direction, source, original destination, outcome) -> (count, sent, received)
    type ConnKey = (usize, String, String, String, String);
    let mut conns: std::collections::BTreeMap<ConnKey, (u64, u64, u64)> = Default::default();
    for n in 0..s.spec.nodes {
        for l in s.access_log(n).into_iter().filter(|l| l["message"] != "request") {
            let f = |k: &str| l[k].as_str().map(str::to_owned).unwrap_or_else(|| l[k].to_string());
            let e = conns
                .entry((n + 1, f("direction"), f("source"), f("orig_dst"), f("outcome")))
                .or_default();
            e.0 += 1;
            e.1 += l["sent"].as_u64().unwrap_or(0);
            e.2 += l["received"].as_u64().unwrap_or(0);
        }
    }
    println!(
        "  {:>6}  {:<6} {:<9} {:<24} {:<16} {:<11} {:>10} {:>10}",
        "count", "node", "dir", "source", "orig dst", "outcome", "sent", "recv"
    );
    for ((node, dir, source, dst, outcome), (c, sent, recv)) in &conns {
        println!("  {c:>6}  node{node:<2} {dir:<9} {source:<24} {dst:<16} {outcome:<11} {sent:>10} {recv:>10}");
    }
    println!("  HTTP requests on the client side (direction outbound), counted by route, status and upstream:");
    let mut by: std::collections::BTreeMap<(String, String, String, String), u64> = Default::default();
    for n in 0..s.spec.nodes {
        for l in s
            .access_log(n)
            .into_iter()
            .filter(|l| l["message"] == "request" && l["direction"] == "outbound")
        {
            let f = |k: &str| l[k].as_str().map(str::to_owned).unwrap_or_else(|| l[k].to_string());
            *by.entry((f("source"), f("route"), f("status"), f("upstream")))
                .or_default() += 1;
        }
    }
    println!(
        "  {:>6}  {:<24} {:<40} {:<6} upstream",
        "count", "source", "route", "status"
    );
    for ((source, route, status, upstream), c) in &by {
        println!("  {c:>6}  {source:<24} {route:<40} {status:<6} {upstream}");
    }

    section("Metrics scraped from each agent's :15020/metrics (Istio standard names)");
    for n in 0..s.spec.nodes {
        let scrape = s.scrape(n)?;
        for m in scrape
            .samples
            .iter()
            .filter(|m| m.metric == "istio_tcp_connections_opened_total")
        {
            let l = |k: &str| m.labels.get(k).unwrap_or("-").to_owned();
            let v = sample_value(&m.value);
            if l("source_workload") == "unknown" {
                continue; // the box's own readiness probes from the node
            }
            println!(
                "  node{} reporter={:<11} {} -> {} ({}) security={}: {v} opened",
                n + 1,
                l("reporter"),
                l("source_workload"),
                l("destination_workload"),
                l("destination_service"),
                l("connection_security_policy")
            );
        }
        for m in scrape
            .samples
            .iter()
            .filter(|m| m.metric == "istio_requests_total" && m.labels.get("reporter") == Some("source"))
        {
            let l = |k: &str| m.labels.get(k).unwrap_or("-").to_owned();
            println!(
                "  node{} istio_requests_total {} -> {} ({}) code={} flags={} security={}: {}",
                n + 1,
                l("source_workload"),
                l("destination_workload"),
                l("destination_service_name"),
                l("response_code"),
                l("response_flags"),
                l("connection_security_policy"),
                sample_value(&m.value)
            );
        }
        for m in scrape
            .samples
            .iter()
            .filter(|m| m.metric == "ferry_ebpf_redirects_total")
        {
            println!("  node{} ferry_ebpf_redirects_total {}", n + 1, sample_value(&m.value));
        }
    }

    section("ferryctl workloads (node1): pods and enrollment, as streamed by ferry-control");
    ferryctl(&b, 0, &["workloads"])?;
    section("ferryctl bpf dump mesh-dst (node1): what connect4 steers");
    ferryctl(&b, 0, &["bpf", "dump", "mesh-dst"])?;
    section("ferryctl bpf dump stats (node1): eBPF-side counters");
    ferryctl(&b, 0, &["bpf", "dump", "stats"])?;
    section("ferryctl bpf dump traffic (node1): per-pod tc counters on host veths");
    ferryctl(&b, 0, &["bpf", "dump", "traffic"])?;
    section("ferryctl certs (node1): workload identities from the CA");
    ferryctl(&b, 0, &["certs"])?;
    section("ferryctl control (node2): the config stream from ferry-control");
    ferryctl(&b, 1, &["control"])?;
    section("ferryctl stats (node2)");
    ferryctl(&b, 1, &["stats"])?;

    if keep {
        let st = b.keep();
        println!(
            "\nThe box stays up: `cargo xtask box exec productpage-v1 -- ferry-workload http client --url {REVIEWS_URL}`,"
        );
        println!(
            "`cargo xtask box exec node1 -- ferryctl conns`, then `cargo xtask box down {}`.",
            st.id
        );
    } else {
        drop(b);
        println!("\nBox removed (use --keep to leave it running).");
    }
    Ok(())
}
