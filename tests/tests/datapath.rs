//! L4 data path on the cluster-in-a-box: real eBPF programs in the kernel,
//! real agents, real sockets across network namespaces. Each test builds its
//! own box (unique names), so they run in parallel and clean up on failure.

use std::time::Duration;

use ferry_box::{eventually, require_root, ClusterBox, Spec};

fn up(spec: Spec) -> ClusterBox {
    require_root();
    ClusterBox::up(spec, ferry_box::default_bin_dir()).expect("box up")
}

const VIP: &str = "10.96.0.10:80";

#[test]
fn service_vip_lands_on_endpoints_same_node_and_cross_node_keeping_client_ip() {
    let b = up(Spec::demo());
    let s = &b.state;
    let client_ip = s.pod_ip("client").unwrap().to_string();
    let before = s.bpf_stats(0).unwrap();
    // Round robin over echo-1 (same node) and echo-2 (other node).
    let mut servers = Vec::new();
    for _ in 0..4 {
        let (server, seen) = s.who("client", VIP).unwrap();
        assert!(
            seen.starts_with(&format!("{client_ip}:")),
            "server saw {seen}, want the client's pod IP {client_ip}"
        );
        servers.push(server);
    }
    assert!(
        servers.contains(&"echo-1".to_string()) && servers.contains(&"echo-2".to_string()),
        "{servers:?}"
    );

    // The kernel side: four connects rewritten, four original destinations recorded.
    let after = s.bpf_stats(0).unwrap();
    assert_eq!(after["redirects"] - before["redirects"], 4, "{after:?}");
    assert_eq!(after["orig_dst_saved"] - before["orig_dst_saved"], 4, "{after:?}");
    // The agent side: each connection's access log names the VIP it was for
    // and the endpoint it went to, by hop.
    let outbound = || {
        s.access_log(0)
            .into_iter()
            .filter(|l| l["direction"] == "outbound")
            .count()
    };
    assert!(eventually(Duration::from_secs(5), || outbound() >= 4));
    let log = s.access_log(0);
    let out: Vec<_> = log.iter().filter(|l| l["direction"] == "outbound").collect();
    assert_eq!(out.len(), 4, "{log:?}");
    assert!(
        out.iter()
            .all(|l| l["orig_dst"] == VIP && l["service"] == "default/echo" && l["outcome"] == "ok"),
        "{out:?}"
    );
    let hops: Vec<&str> = out.iter().map(|l| l["hop"].as_str().unwrap_or("")).collect();
    assert!(hops.contains(&"local") && hops.contains(&"tunnel"), "{hops:?}");
    // Cross node: node 2's agent received it through its tunnel listener.
    assert!(eventually(Duration::from_secs(5), || s
        .access_log(1)
        .iter()
        .any(
            |l| l["direction"] == "tunnel" && l["client"].as_str().unwrap_or("").starts_with(&client_ip)
        )));
    // eBPF ring-buffer events became tracing events in the agent's log.
    let agent_log = std::fs::read_to_string(s.agent_log(0)).unwrap();
    assert!(agent_log.contains("connect redirected to agent") && agent_log.contains("\"orig_dst\":\"10.96.0.10:80\""));
    // An IPv6 socket to the IPv4-mapped VIP is steered too (connect6).
    let (server, seen) = s.who("client", "[::ffff:10.96.0.10]:80").unwrap();
    assert!(
        server.starts_with("echo-") && seen.starts_with(&client_ip),
        "{server} {seen}"
    );
    // The mapped original destinations were consumed (nothing left behind).
    let p = ferry_ebpf::pinned::Pinned::open(std::path::Path::new(ferry_box::PIN_ROOT), &s.node_name(0)).unwrap();
    assert!(p.orig_dst().unwrap().is_empty());
}

#[test]
fn non_enrolled_pod_and_agent_sockets_are_not_redirected() {
    let b = up(Spec::demo());
    let s = &b.state;
    let before = s.bpf_stats(1).unwrap();
    // The outsider (node 2, not enrolled): a VIP means nothing without the mesh.
    assert!(
        !s.probe("outsider", VIP).unwrap(),
        "an un-enrolled pod must not be redirected"
    );
    // A process in the agent's cgroup inside an enrolled pod's netns is not steered either.
    // The probe starts as echo-2 (its netns and cgroup), then moves itself
    // into the agent's cgroup before connecting.
    let agent_procs = s.agent_cgroup(1).join("cgroup.procs");
    let script = format!(
        "echo $$ > {} && exec {} client probe --to {VIP}",
        agent_procs.display(),
        s.bin("ferry-workload")
    );
    let mut cmd = s.pod_command("echo-2", "sh", &["-c", &script]).unwrap();
    let out = ferry_box::output_ok(cmd.output().unwrap(), "probe from agent cgroup").unwrap();
    assert!(
        out.contains("\"connected\":false"),
        "agent-cgroup socket was redirected: {out}"
    );
    // An enrolled pod on the same node is redirected.
    assert!(s.probe("echo-2", VIP).unwrap());
    let after = s.bpf_stats(1).unwrap();
    assert_eq!(
        after["redirects"] - before["redirects"],
        1,
        "only the enrolled pod's connect is steered: {after:?}"
    );
    // The outsider reaching a meshed pod directly is captured on the way in (inbound).
    let (server, seen) = s
        .who("outsider", &format!("{}:8080", s.pod_ip("echo-1").unwrap()))
        .unwrap();
    assert_eq!(server, "echo-1");
    assert!(seen.starts_with(&s.pod_ip("outsider").unwrap().to_string()), "{seen}");
    // The line is written when the agent's side of the connection ends,
    // which may be just after the client has its answer.
    let dst = format!("{}:8080", s.pod_ip("echo-1").unwrap());
    assert!(eventually(Duration::from_secs(5), || {
        s.access_log(0)
            .iter()
            .any(|l| l["direction"] == "inbound" && l["orig_dst"] == dst)
    }));
}

#[test]
fn enrolling_and_unenrolling_at_runtime_switch_redirection() {
    let mut spec = Spec::demo();
    spec.pods[0].enrolled = false; // client starts outside the mesh
    let mut b = up(spec);
    assert!(!b.state.probe("client", VIP).unwrap(), "not enrolled yet");
    b.update(|s| s.pods[0].enrolled = true).unwrap();
    // Captured from its very first connection once the agent reports it enrolled.
    let (server, _) = b.state.who("client", VIP).unwrap();
    assert!(server.starts_with("echo-"));
    b.update(|s| s.pods[0].enrolled = false).unwrap();
    assert!(
        !b.state.probe("client", VIP).unwrap(),
        "unenrolled pods are not redirected"
    );
    let pods = b.state.admin_json(0, "/config_dump").unwrap()["pods"].clone();
    let client = pods
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "client")
        .unwrap()
        .clone();
    assert_eq!(client["enrolled"], false);
}

#[test]
fn two_boxes_on_one_kernel_do_not_interfere() {
    let a = up(Spec::demo());
    let b = up(Spec::demo());
    assert_ne!(a.state.id, b.state.id);
    assert!(a.state.who("client", VIP).is_ok());
    assert!(b.state.who("client", VIP).is_ok());
    let a_before = a.state.bpf_stats(0).unwrap()["redirects"];
    b.state.who("client", VIP).unwrap();
    assert_eq!(
        a.state.bpf_stats(0).unwrap()["redirects"],
        a_before,
        "box b's traffic showed up in box a's maps"
    );
    let b_state = b.state.clone();
    drop(a); // tears box a down, pins and all
    assert!(
        b_state.who("client", VIP).is_ok(),
        "box b must survive box a's teardown"
    );
    assert!(b_state.pin_dir(0).exists());
}

#[test]
fn application_on_a_mesh_port_gets_a_clear_enrollment_error() {
    let mut spec = Spec::demo();
    spec.pods.push(ferry_box::PodSpec {
        name: "squatter".into(),
        node: 0,
        enrolled: false,
        serve: vec![15001],
        labels: vec![],
        annotations: vec![],
        service_account: None,
    });
    let mut b = up(spec);
    b.update(|s| s.pods.last_mut().unwrap().enrolled = true).unwrap();
    let pods = b.state.admin_json(0, "/config_dump").unwrap()["pods"].clone();
    let sq = pods
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "squatter")
        .unwrap()
        .clone();
    assert_eq!(sq["enrolled"], false);
    let err = sq["error"].as_str().unwrap_or_default();
    assert!(err.contains("port 15001 is already in use"), "{err}");
    // Everyone else is unaffected.
    assert!(b.state.who("client", VIP).is_ok());
}

#[test]
fn bad_config_file_is_a_clear_error_and_a_bad_reload_keeps_the_last_good_state() {
    let b = up(Spec::demo());
    let s = &b.state;
    // At start-up: a clear message naming the file and each problem, no panic.
    let bad = s.dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "node: x\nworkloads:\n  - {uid: a, name: a, node: x, ip: 10.0.0.300}\nservicez: []\n",
    )
    .unwrap();
    let out = std::process::Command::new(s.bin("ferry-agent"))
        .args(["--config", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid config") && err.contains("bad.yaml"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // At runtime: the agent rejects a broken file, keeps serving the last good config.
    let v = s.config_version(0).unwrap();
    std::fs::write(s.config_path(0), "node: [this is not a node\n").unwrap();
    assert!(eventually(Duration::from_secs(5), || std::fs::read_to_string(
        s.agent_log(0)
    )
    .unwrap_or_default()
    .contains("config rejected")));
    assert_eq!(s.config_version(0).unwrap(), v);
    assert!(s.who("client", VIP).is_ok());
}

#[test]
fn ferryctl_reads_pins_and_agent_and_fails_clearly() {
    let mut b = up(Spec::demo());
    let s = b.state.clone();
    // Two connections: round robin sends the second across nodes, out of the
    // client pod's own eth0 (the tunnel hop starts in the source pod's netns).
    s.who("client", VIP).unwrap();
    s.who("client", VIP).unwrap();
    let json = |args: &[&str]| -> serde_json::Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let out = s.ferryctl(0, &all).unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let maps = json(&["bpf", "maps"]);
    let pods_map = maps
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "ferry_pods")
        .unwrap()
        .clone();
    assert_eq!(pods_map["entries"], 2, "client and echo-1 enrolled on node1: {maps}");
    let dst = json(&["bpf", "dump", "mesh-dst"]);
    assert!(dst
        .as_array()
        .unwrap()
        .iter()
        .any(|d| d["ip"] == "10.96.0.10" && d["port"] == 80 && d["kind"] == "service"));
    let stats = json(&["bpf", "dump", "stats"]);
    let redirects = stats
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["counter"] == "redirects")
        .unwrap()["value"]
        .as_u64();
    assert_eq!(redirects, Some(2));
    let traffic = json(&["bpf", "dump", "traffic"]);
    let veth0 = traffic
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["interface"] == "veth0")
        .unwrap()
        .clone();
    assert!(
        veth0["tx_packets"].as_u64().unwrap() > 0 && veth0["rx_bytes"].as_u64().unwrap() > 0,
        "{traffic}"
    );
    let progs = json(&["bpf", "progs"]);
    let client_uid = s.pod_uid("client");
    let hooks: Vec<&str> = progs
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["owner"] == client_uid.as_str())
        .filter_map(|p| p["hook"].as_str())
        .collect();
    assert_eq!(
        hooks,
        [
            "connect4",
            "connect6",
            "mark_delivery",
            "sk_lookup",
            "sockops",
            "tc_egress",
            "tc_ingress"
        ],
        "{progs}"
    );
    assert!(progs
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["owner"] == "agent" && p["program"] == "ferry_agent_ops"));
    // Dumps are joined with workload names and can be filtered.
    let pods = json(&["bpf", "dump", "pods"]);
    assert!(
        pods.as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "client" && p["ip"] == "10.1.1.10"),
        "{pods}"
    );
    let client_traffic = json(&["bpf", "dump", "traffic", "--pod", "client"]);
    assert_eq!(client_traffic.as_array().unwrap().len(), 1, "{client_traffic}");
    assert_eq!(client_traffic[0]["interface"], "veth0");
    let vip = json(&["bpf", "dump", "mesh-dst", "--ip", "10.96.0.10"]);
    assert_eq!(vip.as_array().unwrap().len(), 1, "{vip}");
    let yaml = s.ferryctl(0, &["bpf", "dump", "pods", "-o", "yaml"]).unwrap();
    let from_yaml: serde_json::Value = serde_norway::from_slice(&yaml.stdout).unwrap();
    assert_eq!(from_yaml, pods, "yaml and json agree");
    let dump = s.ferryctl(0, &["config-dump"]).unwrap();
    let dump: serde_json::Value = serde_json::from_slice(&dump.stdout).unwrap();
    assert_eq!(dump["node"], s.node_name(0));
    let comp = s.ferryctl(0, &["completions", "bash"]).unwrap();
    assert!(String::from_utf8_lossy(&comp.stdout).contains("_ferryctl()"));
    let services = json(&["services"]);
    assert_eq!(
        (services[0]["vip"].as_str(), services[0]["ports"].as_str()),
        (Some("10.96.0.10"), Some("80->8080")),
        "{services}"
    );
    let inbound = maps
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "ferry_inbound")
        .unwrap()
        .clone();
    assert_eq!(
        inbound["entries"], 2,
        "one inbound listener per enrolled pod: {inbound}"
    );
    let workloads = json(&["workloads"]);
    assert!(workloads
        .as_array()
        .unwrap()
        .iter()
        .any(|w| w["name"] == "client" && w["enrolled"] == true));
    // A live connection shows up in `conns` with where it goes.
    let mut long = s
        .pod_command(
            "client",
            &s.bin("ferry-workload"),
            &["client", "echo", "--to", VIP, "--bytes", "400000000"],
        )
        .unwrap();
    let mut child = long.stdout(std::process::Stdio::null()).spawn().unwrap();
    assert!(eventually(Duration::from_secs(5), || {
        let c = json(&["conns"]);
        c.as_array().is_some_and(|a| {
            a.iter()
                .any(|c| c["orig_dst"] == VIP && c["service"] == "default/echo" && c["sent"].as_u64() > Some(0))
        })
    }));
    let _ = child.kill();
    let _ = child.wait();
    // Agent down: exit code 3 with a hint; pins still readable.
    b.stop_agent(0).unwrap();
    let out = s.ferryctl(0, &["conns"]).unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not reachable"));
    assert!(
        s.ferryctl(0, &["bpf", "maps"]).unwrap().status.success(),
        "pins outlive the agent"
    );
    // With the agent down steering stays pinned: a connect is still rewritten
    // (and refused, nobody listens) and its original destination stays in
    // the map, decoded by ferryctl.
    assert!(!s.probe("client", VIP).unwrap());
    let orig = json(&["bpf", "dump", "orig-dst", "--ip", "10.96.0.10"]);
    let row = &orig.as_array().unwrap()[0];
    assert_eq!(
        (row["orig_dst"].as_str(), row["agent"].as_str()),
        (Some(VIP), Some("127.0.0.1:15001")),
        "{orig}"
    );
    let out = s.ferryctl(0, &["bpf", "dump", "traffic", "--pod", "client"]).unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--pod needs the agent"));
    // No maps: exit code 4.
    let out = s.ferryctl(0, &["--pin-root", "/nonexistent", "bpf", "maps"]).unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
}

/// The kubelet's two cgroup drivers lay pods out differently, with the
/// processes in a container cgroup below the pod's: cgroupfs
/// (`kubepods/besteffort/pod<uid>/<id>`) and systemd
/// (`kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid
/// with _>.slice/cri-containerd-<id>.scope`). Either way the agent finds
/// each pod's cgroup and captures its processes: the client's connections
/// to the VIP are steered (the redirect counter moves, the server sees the
/// client's pod IP), and the non-mesh pod's are not (the control).
#[test]
fn pods_are_captured_under_both_kubelet_cgroup_layouts() {
    for layout in [ferry_box::CgroupLayout::Cgroupfs, ferry_box::CgroupLayout::Systemd] {
        let b = up(Spec {
            cgroup_layout: layout,
            ..Spec::demo()
        });
        let s = &b.state;
        let procs = s.pod_procs_cgroup("client").unwrap();
        assert_ne!(
            procs,
            s.pod_cgroup("client").unwrap(),
            "{layout:?}: a container cgroup below the pod's"
        );
        let client_ip = s.pod_ip("client").unwrap().to_string();
        let before = s.bpf_stats(0).unwrap();
        let (server, seen) = s.who("client", VIP).unwrap();
        eprintln!(
            "{layout:?}: pod cgroup {}, processes in {}: {server} saw {seen}",
            s.pod_cgroup("client").unwrap().display(),
            procs.display()
        );
        assert!(server.starts_with("echo-"), "{layout:?}: {server}");
        assert!(seen.starts_with(&format!("{client_ip}:")), "{layout:?}: {seen}");
        let after = s.bpf_stats(0).unwrap();
        assert_eq!(after["redirects"] - before["redirects"], 1, "{layout:?}: steered");
        // The control: a pod outside the mesh reaches no VIP (nothing steers it).
        assert!(!s.probe("outsider", VIP).unwrap(), "{layout:?}: not steered");
    }
}
