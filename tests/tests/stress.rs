//! The byte-exact stress set, with sk_msg splicing off (the default) and on:
//! 64 MiB echo with checksums, 200 concurrent connections, half-close (every
//! echo half-closes), early close (reset mid-stream), and an agent restart.

use std::time::Duration;

use ferry_box::{eventually, require_root, ClusterBox, Spec};

const VIP: &str = "10.96.0.10:80";
const MIB_64: &str = "67108864";

fn cgroup_progs(b: &ClusterBox, pod: &str) -> Vec<String> {
    let cg = b.state.pod_cgroup(pod).unwrap();
    let out = std::process::Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(&cg)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v.as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter_map(|p| p["name"].as_str().map(str::to_owned))
        .collect()
}

fn stress_set() {
    require_root();
    let mut spec = Spec::demo();
    // Same-node only, so splicing (app <-> agent) and the local hop are both exercised.
    spec.services[0].endpoints = vec!["echo-1".into()];
    let mut b = ClusterBox::up(spec, ferry_box::default_bin_dir()).expect("box up");
    let s = b.state.clone();

    let echo = |bytes: &str| s.client("client", &["echo", "--to", VIP, "--bytes", bytes]);
    let out = echo(MIB_64).unwrap();
    assert!(out.contains("\"ok\":true"), "{out}");
    let stats = s.bpf_stats(0).unwrap();
    assert_eq!(stats["splice_msgs"], 0, "splicing is off by default: {stats:?}");

    let out = s
        .client("client", &["stress", "--to", VIP, "--conns", "200", "--bytes", "65536"])
        .unwrap();
    assert!(out.contains("\"ok\":200"), "{out}");

    // Many new connections in a row (more than the 900 ports delivery once
    // had): delivery ports in TIME_WAIT must never run out.
    let out = s
        .client("client", &["rr", "--to", VIP, "--count", "1500", "--new-conn"])
        .unwrap();
    assert!(out.contains("\"count\":1500"), "{out}");

    for _ in 0..20 {
        s.client("client", &["early-close", "--to", VIP]).unwrap();
    }
    assert!(
        eventually(Duration::from_secs(10), || s
            .admin_json(0, "/conns")
            .map(|c| c.as_array().map_or(0, Vec::len) == 0)
            .unwrap_or(false)),
        "connections reset mid-stream must not linger in the agent"
    );
    assert!(echo("1048576").unwrap().contains("\"ok\":true"));

    // Agent restart: steering stays pinned while it is down, the new agent
    // swaps its programs in (no duplicates) and traffic is byte-exact again.
    b.stop_agent(0).unwrap();
    assert!(s.pin_dir(0).join("links").exists());
    b.start_agent(0).unwrap();
    b.state.wait_applied(1).unwrap();
    let progs = cgroup_progs(&b, "client");
    for p in ["ferry_connect4", "ferry_connect6", "ferry_sockops", "ferry_mark_deli"] {
        assert_eq!(
            progs.iter().filter(|n| n.starts_with(p)).count(),
            1,
            "{p} attached once after restart: {progs:?}"
        );
    }
    let out = echo(MIB_64).unwrap();
    assert!(out.contains("\"ok\":true"), "{out}");
    let out = s
        .client("client", &["stress", "--to", VIP, "--conns", "200", "--bytes", "65536"])
        .unwrap();
    assert!(out.contains("\"ok\":200"), "{out}");
}

#[test]
fn stress_set_without_splicing() {
    stress_set();
}

/// Why splicing is off: with sk_msg on, a reader blocked in recv() on a spliced
/// socket gets EAGAIN (or loses the tail) when the peer half-closes, a kernel
/// tcp_bpf bug seen on 6.18. This test turns splicing on and expects to see
/// that breakage; if it ever stops failing, the kernel was fixed: rerun the
/// stress set with splicing on and reconsider the default (docs/architecture.md).
#[test]
fn splicing_breaks_blocking_readers_on_this_kernel_so_it_stays_off() {
    require_root();
    let mut spec = Spec::demo();
    spec.services[0].endpoints = vec!["echo-1".into()];
    let mut b = ClusterBox::up(spec, ferry_box::default_bin_dir()).expect("box up");
    b.update(|s| s.splice = true).unwrap();
    let s = &b.state;
    let mut failures = 0;
    for _ in 0..40 {
        if s.client("client", &["echo", "--to", VIP, "--bytes", "65536"]).is_err() {
            failures += 1;
        }
    }
    let stats = s.bpf_stats(0).unwrap();
    assert!(stats["splice_msgs"] > 0, "splicing engaged: {stats:?}");
    assert!(
        failures > 0,
        "40 spliced half-closing echoes all succeeded: the kernel's sk_msg EOF handling may be fixed; \
         rerun the stress set with splicing on before changing the default"
    );
}
