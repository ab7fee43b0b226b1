//! ferry-cni on the cluster-in-a-box (issue 16, "No startup race"): the box
//! runs the real plugin binary for each pod as a container runtime would
//! (`ferry_box::cni`), against real agents with real eBPF. A new pod's
//! application starts only after ADD returns, and its first connection is
//! the mesh's; without the agent ADD fails closed after its bounded wait;
//! DEL is idempotent; CHECK and VERSION answer per the spec; an agent
//! restart keeps enrolled pods captured and leaves nothing of a departed
//! pod in the pinned maps; a failed enrollment is retried with backoff
//! while ADD waits, with no config change. And a pod created as a real node
//! creates it, with no address in the cluster while its ADD runs, is
//! captured at the address from the ADD before the cluster has one.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    path::Path,
    time::{Duration, Instant},
};

use ferry_box::{eventually, require_root, BoxState, ClusterBox, PodSpec, Spec, PIN_ROOT};
use ferry_ebpf::pinned::Pinned;
use serde_json::{json, Value};

const ECHO_VIP: &str = "10.96.0.10:80";

fn pod(name: &str, node: usize, enrolled: bool) -> PodSpec {
    PodSpec {
        name: name.into(),
        node,
        enrolled,
        serve: Vec::new(),
        labels: vec![("app".into(), name.into())],
        annotations: Vec::new(),
        service_account: None,
    }
}

/// The pod's status in its node's agent (`/config_dump`).
fn status(s: &BoxState, node: usize, pod: &str) -> Value {
    let dump = s.admin_json(node, "/config_dump").unwrap_or(Value::Null);
    dump["pods"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == pod)
        .cloned()
        .unwrap_or(Value::Null)
}

/// The first line an added pod's application wrote (its `app_log`).
fn first_output(s: &BoxState, pod: &str) -> String {
    let mut out = String::new();
    eventually(Duration::from_secs(15), || {
        out = std::fs::read_to_string(s.app_log(pod)).unwrap_or_default();
        !out.trim().is_empty()
    });
    out
}

fn pinned(s: &BoxState, node: usize) -> Pinned {
    Pinned::open(Path::new(PIN_ROOT), &s.node_name(node)).expect("pinned maps")
}

fn cookies(s: &BoxState, node: usize) -> BTreeSet<u64> {
    pinned(s, node).pods().unwrap().iter().map(|p| p.netns_cookie).collect()
}

#[test]
fn a_new_pod_starts_only_once_captured_and_the_plugin_follows_the_spec() {
    require_root();
    // Config from ferry-control: the agent hears of a new pod from the
    // control plane, while the plugin already waits.
    let mut spec = Spec::demo();
    spec.discovery = true;
    spec.pod_args.push((
        "late".into(),
        ["client", "who", "--to", ECHO_VIP].map(str::to_owned).to_vec(),
    ));
    spec.pod_args.push((
        "late-plain".into(),
        ["client", "who", "--to", ECHO_VIP].map(str::to_owned).to_vec(),
    ));
    let mut b = ClusterBox::up(spec, ferry_box::default_bin_dir()).expect("box up");
    let s = b.state.clone();
    // The box ran ADD for every pod before starting it.
    assert!(s.spec.cni);
    assert!(
        b.agent_log(0).contains("its sandbox may start (CNI ADD)"),
        "node 1's agent answered ADDs"
    );

    // (a) An enrolled pod added to the running box: ADD is started before
    // the cluster knows the pod and returns once the agent has captured
    // it; then the application's first connection, made at process start,
    // goes to the VIP, which only the mesh answers (no kube-proxy here).
    let started = Instant::now();
    let add = b.add_pod(pod("late", 0, true)).expect("add late").expect("ADD ran");
    let s = b.state.clone();
    eprintln!("ADD late: {:?}, {}", add.took, add.stderr.trim());
    assert!(add.stderr.contains("captured by ferry-agent"), "{}", add.stderr);
    assert_eq!(
        add.json().unwrap(),
        s.cni_config("late", &Value::Null).unwrap()["prevResult"],
        "prevResult passed through unchanged"
    );
    let out = first_output(&s, "late");
    let who: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("late's app printed {out:?}: {e}"));
    let late_ip = s.pod_ip("late").unwrap();
    assert!(
        who["server"] == "echo-1" || who["server"] == "echo-2",
        "the VIP answered through the mesh: {who}"
    );
    assert!(
        who["client_seen_as"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{late_ip}:")),
        "{who}"
    );
    let st = status(&s, 0, "late");
    assert_eq!(st["enrolled"], true, "{st}");
    assert!(started.elapsed() < Duration::from_secs(30));

    // Positive control for the VIP check: a pod that is not in the mesh
    // passes ADD at once (the agent says so) and its identical first
    // connection to the VIP goes nowhere, while the network itself works.
    let add = b.add_pod(pod("late-plain", 0, false)).unwrap().unwrap();
    let s = b.state.clone();
    assert!(add.stderr.contains("not in the mesh"), "{}", add.stderr);
    let out = first_output(&s, "late-plain");
    assert!(
        serde_json::from_str::<Value>(out.trim()).is_err(),
        "an uncaptured pod reached the VIP: {out}"
    );
    let echo1 = format!("{}:8080", s.pod_ip("echo-1").unwrap());
    let (server, _) = s.who("late-plain", &echo1).expect("pod network works");
    assert_eq!(server, "echo-1");

    // (d) VERSION and CHECK per the spec.
    let v = s
        .cni("late", "VERSION", Value::Null)
        .unwrap()
        .check()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(v["cniVersion"], "1.0.0");
    assert_eq!(
        v["supportedVersions"],
        json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );
    for p in ["late", "late-plain"] {
        let c = s.cni(p, "CHECK", Value::Null).unwrap().check().unwrap();
        assert_eq!(c.stdout, "", "CHECK prints nothing on success");
    }
    let old = s.cni("late", "CHECK", json!({"cniVersion": "0.3.1"})).unwrap();
    assert_eq!(old.code, Some(1));
    assert_eq!(old.json().unwrap()["code"], 1, "CHECK is not defined before 0.4.0");
    let bad = s.cni("late", "ADD", json!({"cniVersion": "9.9.9"})).unwrap();
    assert_eq!(bad.json().unwrap()["code"], 1);
    assert!(s.cni("late", "STATUS", json!({"cniVersion": "1.1.0"})).unwrap().ok());

    // (c) DEL: the sandbox is gone, so the agent stops capturing the pod at
    // once (its pinned entry goes with it); a second DEL is as good; CHECK
    // now fails with the reason; a new ADD captures the pod again.
    let cookie = st["netns_cookie"].as_u64().unwrap();
    assert!(cookies(&s, 0).contains(&cookie));
    for _ in 0..2 {
        let del = s.cni("late", "DEL", Value::Null).unwrap().check().unwrap();
        assert_eq!(del.stdout, "");
    }
    assert_eq!(status(&s, 0, "late")["enrolled"], false);
    assert!(
        !cookies(&s, 0).contains(&cookie),
        "ferry_pods entry of the deleted sandbox removed"
    );
    let check = s.cni("late", "CHECK", Value::Null).unwrap();
    assert_eq!(check.json().unwrap()["code"], 100, "{}", check.stdout);
    assert!(check.stdout.contains("deleted"), "{}", check.stdout);
    let again = s.cni("late", "ADD", Value::Null).unwrap().check().unwrap();
    assert!(again.stderr.contains("captured"), "{}", again.stderr);
    assert_eq!(status(&s, 0, "late")["enrolled"], true);
    assert!(s.who("late", ECHO_VIP).is_ok(), "captured again");
}

#[test]
fn without_the_agent_add_fails_closed_and_a_restart_reconciles() {
    require_root();
    let mut b = ClusterBox::up(Spec::demo(), ferry_box::default_bin_dir()).expect("box up");
    let s = b.state.clone();

    // A pod whose enrollment fails at first (something in its sandbox holds
    // port 15001): ADD waits while the agent retries with backoff, with no
    // config change, and returns once the port is free and the pod captured.
    b.create_sandbox(pod("squatted", 0, true)).unwrap();
    let s2 = b.state.clone();
    let mut squatter = s2
        .pod_command(
            "squatted",
            &s2.bin("ferry-workload"),
            &["serve", "--name", "x", "--port", "15001"],
        )
        .unwrap()
        .spawn()
        .unwrap();
    let squat_at = std::net::SocketAddrV4::new(s2.pod_ip("squatted").unwrap(), 15001);
    assert!(eventually(Duration::from_secs(5), || s2
        .node_who(0, None, squat_at)
        .is_ok_and(|r| r.is_ok())));
    let retries_before = retries(&s2);
    let add = s2.cni_spawn("squatted", "ADD", None, Value::Null).unwrap();
    s2.write_configs().unwrap();
    let failing = eventually(Duration::from_secs(10), || {
        status(&s2, 0, "squatted")["error"]
            .as_str()
            .is_some_and(|e| e.contains("15001"))
    });
    std::thread::sleep(Duration::from_millis(1500));
    let _ = squatter.kill();
    let _ = squatter.wait();
    let add = add.wait().unwrap();
    assert!(failing, "the port clash was reported: {}", status(&s2, 0, "squatted"));
    assert!(add.ok(), "ADD returned once captured: {add:?}");
    assert!(add.took >= Duration::from_millis(1500), "{:?}", add.took);
    assert_eq!(status(&s2, 0, "squatted")["enrolled"], true);
    assert!(
        retries(&s2) > retries_before,
        "retries counted in ferry_enroll_retries_total"
    );
    assert!(s2.who("squatted", ECHO_VIP).is_ok());

    // (b) The agent stopped (SIGTERM: steering stays pinned): ADD fails
    // after its bounded wait, with the reason on stdout, so the runtime
    // retries the sandbox; a pod known not to be enrolled (an excluded
    // namespace) still passes at once; DEL still succeeds.
    let gone_cookie = cookie_of(&s2, "squatted");
    assert!(cookies(&s2, 0).contains(&gone_cookie));
    b.stop_agent(0).unwrap();
    let failed = s.cni("client", "ADD", json!({"timeoutSeconds": 2})).unwrap();
    assert_eq!(failed.code, Some(1));
    assert!(
        failed.took >= Duration::from_secs(2) && failed.took < Duration::from_secs(6),
        "{:?}",
        failed.took
    );
    let e = failed.json().unwrap();
    assert_eq!(e["code"], 11, "{e}");
    assert_eq!(e["cniVersion"], "1.0.0");
    assert_eq!(
        e["msg"],
        "pod default/client not captured: ferry-agent unreachable for 2s"
    );
    assert!(
        e["details"]
            .as_str()
            .unwrap()
            .contains(&s.cni_socket(0).display().to_string()),
        "{e}"
    );
    let passed = s
        .cni_spawn("client", "ADD", Some("kube-system"), json!({"timeoutSeconds": 2}))
        .unwrap()
        .wait()
        .unwrap()
        .check()
        .unwrap();
    assert!(passed.took < Duration::from_secs(1), "{:?}", passed.took);
    assert!(
        s.cni("echo-1", "DEL", Value::Null).unwrap().ok(),
        "DEL without the agent"
    );

    // A pod departs while the agent is down (the runtime's DEL cannot
    // reach it); echo-1 stays.
    let gone_uid = s2.pod_uid("squatted");
    let gone_ip: Ipv4Addr = s2.pod_ip("squatted").unwrap();
    let del = b.remove_pod("squatted").unwrap().unwrap();
    assert!(del.ok(), "{del:?}");

    // Restarted, the agent reconciles: the pods still enrolled are
    // captured (from their first new connection), and nothing of the
    // departed one is left in the pins.
    b.start_agent(0).unwrap();
    let s = b.state.clone();
    s.wait_applied(1).unwrap();
    assert!(eventually(Duration::from_secs(10), || s
        .who("client", ECHO_VIP)
        .is_ok()));
    let (server, _) = s
        .who("echo-2", &format!("{}:8080", s.pod_ip("echo-1").unwrap()))
        .unwrap();
    assert_eq!(server, "echo-1");
    let enrolled: BTreeSet<u64> = ["client", "echo-1"].iter().map(|p| cookie_of(&s, p)).collect();
    assert!(!enrolled.contains(&gone_cookie));
    assert!(
        eventually(Duration::from_secs(10), || cookies(&s, 0) == enrolled),
        "ferry_pods holds exactly the enrolled pods: {:?} vs {enrolled:?}",
        cookies(&s, 0)
    );
    let p = pinned(&s, 0);
    assert!(
        !p.inbound_policy().unwrap().iter().any(|r| r.ip == gone_ip),
        "inbound policy of the departed pod removed"
    );
    assert!(
        !s.pin_dir(0).join("links").join(&gone_uid).exists(),
        "its links removed"
    );
    let live: BTreeSet<u32> = ["client", "echo-1"].iter().map(|p| ifindex(&s, p)).collect();
    let counted: BTreeSet<u32> = p.traffic().unwrap().iter().map(|r| r.ifindex).collect();
    assert!(
        counted.is_subset(&live),
        "ferry_traffic holds only live pods' veths: {counted:?} vs {live:?}"
    );
    // And ADD works again, also once a new agent has taken over (hitless
    // upgrade): the successor serves the socket.
    assert!(s.cni("client", "ADD", Value::Null).unwrap().ok());
    let mut old = b.upgrade_agent(0, Duration::from_secs(1)).unwrap();
    let again = s.cni("client", "ADD", Value::Null).unwrap().check().unwrap();
    assert!(again.stderr.contains("captured"), "{}", again.stderr);
    let _ = old.kill();
    let _ = old.wait();
}

/// Access-log lines of `node`'s agent for connections of `direction` from
/// `client_ip`.
fn logged(s: &BoxState, node: usize, direction: &str, client_ip: Ipv4Addr) -> Vec<Value> {
    s.access_log(node)
        .into_iter()
        .filter(|l| {
            l["direction"] == direction
                && l["client"]
                    .as_str()
                    .is_some_and(|c| c.starts_with(&format!("{client_ip}:")))
        })
        .collect()
}

#[test]
fn a_pod_is_captured_at_the_address_from_its_add_before_the_cluster_has_one() {
    require_root();
    // As on a real node: the API server has no address for a new pod until
    // the kubelet reports it, after the sandbox's ADD has returned; ADD
    // waits for the capture meanwhile.
    let mut spec = Spec::demo();
    spec.discovery = true;
    for p in ["fresh", "fresh-plain"] {
        spec.pod_args.push((
            p.into(),
            ["client", "who", "--to", ECHO_VIP].map(str::to_owned).to_vec(),
        ));
    }
    let mut b = ClusterBox::up(spec, ferry_box::default_bin_dir()).expect("box up");

    // An enrolled pod: ADD returns captured, within its bound, while the
    // cluster still has no address for the pod.
    let add = b.add_pod_unaddressed(pod("fresh", 0, true)).expect("add fresh");
    let s = b.state.clone();
    eprintln!("ADD fresh: {:?}, {}", add.took, add.stderr.trim());
    assert!(add.ok(), "{add:?}");
    assert!(add.stderr.contains("captured by ferry-agent"), "{}", add.stderr);
    assert!(
        add.took < Duration::from_secs(ferry_box::cni::CNI_TIMEOUT_SECONDS),
        "{:?}",
        add.took
    );
    let fresh_ip = s.pod_ip("fresh").unwrap();
    let in_cluster = s.cluster_objects().unwrap();
    let fresh_obj = in_cluster.iter().find(|o| o["metadata"]["name"] == "fresh").unwrap();
    assert!(fresh_obj["status"].get("podIP").is_none(), "{fresh_obj}");
    let (_, version) = s.http(0, "GET", ferry_box::CONTROL_ADMIN, "/version").unwrap();
    let version: Value = serde_json::from_str(&version).unwrap();
    assert!(version["pendingPods"].as_u64() >= Some(1), "{version}");
    // The agent took the address from ADD and enrolled the pod there.
    let st = status(&s, 0, "fresh");
    assert_eq!(
        (&st["enrolled"], &st["ip_learned"], &st["ip"]),
        (&json!(true), &json!(true), &json!(fresh_ip.to_string())),
        "{st}"
    );
    let cookie = st["netns_cookie"].as_u64().unwrap();
    assert!(cookies(&s, 0).contains(&cookie));
    // Steered from its first connection: the application's, at start, to
    // a VIP only the mesh answers.
    let out = first_output(&s, "fresh");
    let who: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("fresh's app printed {out:?}: {e}"));
    assert!(
        (who["server"] == "echo-1" || who["server"] == "echo-2")
            && who["client_seen_as"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{fresh_ip}:")),
        "{who}"
    );
    // Across nodes already: through the tunnel, with the certificate the CA
    // issued for the pending pod (its identity proven on node 2).
    let echo2 = format!("{}:8080", s.pod_ip("echo-2").unwrap());
    let (server, seen) = s.who("fresh", &echo2).unwrap();
    assert!(
        server == "echo-2" && seen.starts_with(&format!("{fresh_ip}:")),
        "{server} {seen}"
    );
    assert!(
        eventually(Duration::from_secs(5), || logged(&s, 1, "tunnel", fresh_ip)
            .iter()
            .any(|l| l["peer_identity"] == "spiffe://cluster.local/ns/default/sa/fresh")),
        "{:?}",
        logged(&s, 1, "tunnel", fresh_ip)
    );
    // The other way, node 2 does not know the address yet: its pods'
    // connections to the pod are not tunnelled; they arrive as plaintext,
    // captured in the pod and admitted as any plaintext is (PERMISSIVE).
    let mut server = s
        .pod_command(
            "fresh",
            &s.bin("ferry-workload"),
            &["serve", "--name", "fresh", "--port", "8080"],
        )
        .unwrap()
        .spawn()
        .unwrap();
    let fresh_port = std::net::SocketAddrV4::new(fresh_ip, 8080);
    assert!(eventually(Duration::from_secs(5), || s
        .node_who(0, None, fresh_port)
        .is_ok_and(|r| r.is_ok())));
    let echo2_ip = s.pod_ip("echo-2").unwrap();
    let (server_name, seen) = s.who("echo-2", &fresh_port.to_string()).unwrap();
    assert!(
        server_name == "fresh" && seen.starts_with(&format!("{echo2_ip}:")),
        "{server_name} {seen}"
    );
    assert!(
        eventually(Duration::from_secs(5), || logged(&s, 0, "inbound", echo2_ip)
            .iter()
            .any(|l| l["peer_identity"] == "-")),
        "{:?}",
        s.access_log(0)
    );
    assert!(logged(&s, 0, "tunnel", echo2_ip).is_empty());

    // Positive/negative pair: a pod that is not in the mesh, created the
    // same way, passes at once (notInMesh) and is not captured: its
    // identical first connection to the VIP goes nowhere.
    let add = b.add_pod_unaddressed(pod("fresh-plain", 0, false)).unwrap();
    let s = b.state.clone();
    assert!(add.ok(), "{add:?}");
    assert!(add.stderr.contains("not in the mesh"), "{}", add.stderr);
    assert!(add.took < Duration::from_secs(5), "{:?}", add.took);
    assert_ne!(status(&s, 0, "fresh-plain")["enrolled"], true);
    let out = first_output(&s, "fresh-plain");
    // It ran and failed to connect (no answer from the VIP off the mesh),
    // rather than printing nothing.
    assert!(
        out.contains("Error") && serde_json::from_str::<Value>(out.trim()).is_err(),
        "an uncaptured pod reached the VIP, or its app did not run: {out:?}"
    );
    let plain_ip = s.pod_ip("fresh-plain").unwrap();
    let (server_name, _) = s.who("fresh-plain", &echo2).expect("its network works");
    assert_eq!(server_name, "echo-2");
    assert!(logged(&s, 0, "outbound", plain_ip).is_empty(), "never steered");

    // The kubelet reports the addresses: the control plane's word replaces
    // what was learned, the pod stays captured as it was (same netns
    // cookie: not enrolled again), and node 2 now reaches it through the
    // tunnel.
    // Node 1's agent is replaced (a hand-over) before the kubelet reports
    // the address: the successor takes the learned address from the file
    // the old one kept beside its saved config, and `fresh` stays captured.
    let mut old = b.upgrade_agent(0, Duration::from_secs(5)).expect("hand-over");
    let s = b.state.clone();
    let st = status(&s, 0, "fresh");
    assert_eq!(
        (&st["enrolled"], &st["ip_learned"], &st["ip"]),
        (&json!(true), &json!(true), &json!(fresh_ip.to_string())),
        "{st}"
    );
    assert!(
        b.agent_log(0)
            .contains("address learned from the runtime by a previous agent"),
        "the successor read the learned address"
    );
    let (server_name, seen) = s.who("fresh", ECHO_VIP).expect("captured after the hand-over");
    assert!(server_name.starts_with("echo-") && seen.starts_with(&format!("{fresh_ip}:")));
    let _ = old.kill();
    let _ = old.wait();
    b.report_pod_ip("fresh").unwrap();
    b.report_pod_ip("fresh-plain").unwrap();
    let s = b.state.clone();
    let st = status(&s, 0, "fresh");
    assert_eq!(
        (&st["enrolled"], st.get("ip_learned"), st["netns_cookie"].as_u64()),
        (&json!(true), None, Some(cookie)),
        "{st}"
    );
    assert!(
        b.agent_log(0)
            .contains("ferry-control now has the pod's address: the one learned from the runtime is dropped"),
        "the learned address was dropped"
    );
    let (server_name, seen) = s.who("fresh", ECHO_VIP).unwrap();
    assert!(server_name.starts_with("echo-") && seen.starts_with(&format!("{fresh_ip}:")));
    let (server_name, seen) = s.who("echo-2", &fresh_port.to_string()).unwrap();
    assert!(server_name == "fresh" && seen.starts_with(&format!("{echo2_ip}:")));
    assert!(
        eventually(Duration::from_secs(5), || logged(&s, 0, "tunnel", echo2_ip)
            .iter()
            .any(|l| l["peer_identity"] == "spiffe://cluster.local/ns/default/sa/echo-2")),
        "{:?}",
        s.access_log(0)
    );
    assert_ne!(status(&s, 0, "fresh-plain")["enrolled"], true);
    let _ = server.kill();
    let _ = server.wait();
}

fn cookie_of(s: &BoxState, pod: &str) -> u64 {
    let st = status(s, 0, pod);
    st["netns_cookie"]
        .as_u64()
        .unwrap_or_else(|| panic!("{pod} not enrolled: {st}"))
}

/// The ifindex of a pod's host-side veth (in its node's netns).
fn ifindex(s: &BoxState, pod: &str) -> u32 {
    let veth = status(s, 0, pod)["host_veth"].as_str().unwrap().to_owned();
    let out = ferry_box::sys::run("ip", &["-n", &s.node_netns(0), "-j", "link", "show", &veth]).unwrap();
    let v: Value = serde_json::from_str(&out).unwrap();
    v[0]["ifindex"].as_u64().unwrap() as u32
}

fn retries(s: &BoxState) -> f64 {
    s.scrape(0)
        .unwrap()
        .samples
        .iter()
        .filter(|m| m.metric == "ferry_enroll_retries_total")
        .map(|m| ferry_box::sample_value(&m.value))
        .sum()
}
