//! `cargo xtask demo`: the cluster-in-a-box end to end, narrated.

use std::path::PathBuf;

use anyhow::Result;
use ferry_box::{manifests, sample_value, ClusterBox};

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
    let details = "10.96.0.21:9080";
    section("Traffic: productpage -> reviews service VIP, four connections");
    for _ in 0..4 {
        let (server, seen) = s.who("productpage-v1", reviews)?;
        println!("  productpage -> {reviews}  answered by {server:<11} which saw the client as {seen}");
    }
    section("Traffic: a 16 MiB echo productpage (node1) -> details (node2), mTLS between the agents");
    print!(
        "  {}",
        s.client("productpage-v1", &["echo", "--to", details, "--bytes", "16777216"])?
    );
    section("Traffic: the pod that opted out (legacy, ferry.dev/mesh: disabled)");
    let ratings = format!("{}:9080", s.pod_ip("ratings-v1")?);
    match s.who("legacy", &ratings) {
        Ok((server, _)) => println!("  legacy -> {ratings}: answered by {server}"),
        Err(_) => println!(
            "  legacy -> {ratings} (ratings, in the mesh): refused, plaintext under the STRICT PeerAuthentication from the YAML"
        ),
    }
    println!(
        "  legacy -> {reviews}: connected = {} (its connect() is not steered; there is no kube-proxy in the box)",
        s.probe("legacy", reviews)?
    );

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
    let (server, _) = b.state.who("productpage-v1", reviews)?;
    println!(
        "  annotation removed (the namespace label applies again): in sync after {} ms; productpage -> {reviews} answered by {server}",
        t.elapsed().as_millis()
    );
    let s = b.state.clone();

    section("What the agents did (one access-log line per connection)");
    println!(
        "  {:<6} {:<9} {:<15} {:<16} {:<14} {:<17} {:>9} {:>9}",
        "node", "dir", "source", "orig dst", "service", "endpoint", "sent", "recv"
    );
    for n in 0..s.spec.nodes {
        for l in s.access_log(n) {
            let f = |k: &str| l[k].as_str().map(str::to_owned).unwrap_or_else(|| l[k].to_string());
            println!(
                "  {:<6} {:<9} {:<15} {:<16} {:<14} {:<17} {:>9} {:>9}",
                format!("node{}", n + 1),
                f("direction"),
                f("source"),
                f("orig_dst"),
                f("service"),
                f("endpoint"),
                f("sent"),
                f("received")
            );
        }
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
            "\nThe box stays up: `cargo xtask box exec productpage-v1 -- ferry-workload client who --to {reviews}`,"
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
