//! `cargo xtask demo`: the cluster-in-a-box end to end, narrated.

use std::path::PathBuf;

use crate::{ClusterBox, Spec};
use anyhow::Result;

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

pub fn run(bins: PathBuf, keep: bool) -> Result<()> {
    section("Bringing up the cluster-in-a-box");
    let b = ClusterBox::up(Spec::demo(), bins)?;
    let s = &b.state;
    println!(
        "box {}: 2 nodes, each a network namespace running its own ferry-agent",
        s.id
    );
    for p in &s.spec.pods {
        println!(
            "  pod {:<9} {:<10} on node{}  {}",
            p.name,
            s.pod_ip(&p.name)?,
            p.node + 1,
            if p.enrolled {
                "enrolled (ferry.dev/mesh: enabled)"
            } else {
                "not in the mesh"
            }
        );
    }
    for svc in &s.spec.services {
        println!(
            "  service {} {}:{} -> {:?} port {}",
            svc.name, svc.vip, svc.port, svc.endpoints, svc.target_port
        );
    }

    section("Traffic: client -> echo service VIP, four connections");
    let vip = "10.96.0.10:80";
    for _ in 0..4 {
        let (server, seen) = s.who("client", vip)?;
        println!("  client -> {vip}  answered by {server:<7} which saw the client as {seen}");
    }
    section("Traffic: a 16 MiB echo through the mesh, checksummed");
    print!(
        "  {}",
        s.client("client", &["echo", "--to", vip, "--bytes", "16777216"])?
    );
    section("Traffic: the un-enrolled outsider");
    let echo1 = format!("{}:8080", s.pod_ip("echo-1")?);
    let (server, seen) = s.who("outsider", &echo1)?;
    println!("  outsider -> {echo1} (a meshed pod): captured inbound by node1's agent, {server} saw {seen}");
    println!(
        "  outsider -> {vip}: connected = {} (its connect() is not steered; there is no kube-proxy in the box)",
        s.probe("outsider", vip)?
    );

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
            let v = crate::sample_value(&m.value);
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
            println!(
                "  node{} ferry_ebpf_redirects_total {}",
                n + 1,
                crate::sample_value(&m.value)
            );
        }
    }

    section("ferryctl workloads (node1)");
    ferryctl(&b, 0, &["workloads"])?;
    section("ferryctl bpf dump mesh-dst (node1): what connect4 steers");
    ferryctl(&b, 0, &["bpf", "dump", "mesh-dst"])?;
    section("ferryctl bpf dump stats (node1): eBPF-side counters");
    ferryctl(&b, 0, &["bpf", "dump", "stats"])?;
    section("ferryctl bpf dump traffic (node1): per-pod tc counters on host veths");
    ferryctl(&b, 0, &["bpf", "dump", "traffic"])?;
    section("ferryctl certs (node1): workload identities from the CA");
    ferryctl(&b, 0, &["certs"])?;
    section("ferryctl stats (node2)");
    ferryctl(&b, 1, &["stats"])?;

    if keep {
        let st = b.keep();
        println!("\nThe box stays up: `cargo xtask box exec client -- ferry-workload client who --to {vip}`,");
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
