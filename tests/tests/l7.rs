//! L7 on the cluster-in-a-box: Istio's Bookinfo traffic-management tasks and
//! the seed YAML replayed on the HTTP Bookinfo (`examples/bookinfo`) plus
//! the services of `tests/fixtures/l7/app` (gRPC, TCP, server-speaks-first),
//! with ferry-control compiling the routes and streaming them to the agents.
//! Each scenario's routes are applied live (the YAML rewritten, as `kubectl
//! apply` would) and waited for (every agent ACKs the new snapshot) before
//! traffic is sent; outcomes are counted (`ferry-workload http client`
//! prints who answered with which status) and checked against the agents'
//! request logs and `:15020/metrics`.
//!
//! Weighted splits are checked against the binomial distribution: a share
//! `p` of `n` requests must land within ±4.5σ (σ = √(n·p·(1−p))) of `n·p`,
//! which a fair per-request roll misses about once in 150,000 runs.

use std::{
    collections::BTreeMap,
    io::Read,
    process::Stdio,
    time::{Duration, Instant},
};

use ferry_box::{eventually, manifests, require_root, sample_value, ClusterBox};
use serde_json::Value;

const PRODUCTPAGE: &str = "http://10.96.0.20:9080/productpage";
const REVIEWS: &str = "http://10.96.0.22:9080";
const REVIEWS_FQDN: &str = "reviews.default.svc.cluster.local";
const GRPC: &str = "10.96.0.30:50051";
const TCP: &str = "10.96.0.31:9000";
const BANNER: &str = "10.96.0.32:2525";
/// The client pod of every scenario (node 1).
const CLIENT: &str = "productpage-v1";
const SEED: &str = "reviews-routing-circuit-breaking-mtls.yaml";

fn fixture(name: &str) -> String {
    let p = format!("{}/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{p}: {e}"))
}

/// The box: examples/bookinfo as written (the seed's routes loaded) plus
/// tests/fixtures/l7/app.
struct Bed {
    b: ClusterBox,
    /// The cluster YAML without routes: services (and the seed file, until
    /// the first scenario replaces it).
    base: Vec<(String, String)>,
}

fn up() -> Bed {
    require_root();
    let mut spec = manifests::spec_from_dir(&manifests::bookinfo(), 2).unwrap();
    let extra = manifests::spec_from_dir(
        std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/l7/app")),
        2,
    )
    .unwrap();
    spec.pods.extend(extra.pods);
    spec.pod_args.extend(extra.pod_args);
    spec.services.extend(extra.services);
    spec.cluster_yaml.extend(extra.cluster_yaml);
    let base = spec.cluster_yaml.iter().filter(|(n, _)| n != SEED).cloned().collect();
    assert!(
        spec.cluster_yaml.iter().any(|(n, _)| n == SEED),
        "the seed routes are part of examples/bookinfo"
    );
    let b = ClusterBox::up(spec, ferry_box::default_bin_dir()).expect("box up");
    Bed { b, base }
}

impl Bed {
    /// Replaces the routes by the DestinationRules (all subsets, the seed's
    /// STRICT PeerAuthentication) and the given fixtures, and waits until
    /// every agent has applied the new snapshot. The fixtures must load
    /// without errors (ferry-control's /problems).
    fn routes(&mut self, files: &[&str]) {
        let mut y = self.base.clone();
        for f in ["l7/destination-rules.yaml"].iter().chain(files) {
            y.push((f.replace('/', "-"), fixture(f)));
        }
        let t = Instant::now();
        self.b
            .update(|sp| sp.cluster_yaml = y)
            .expect("routes applied by every agent");
        eprintln!("routes {files:?} applied everywhere in {} ms", t.elapsed().as_millis());
        let problems = self.b.state.control_problems().unwrap();
        let errors: Vec<&Value> = problems
            .iter()
            .filter(|p| p["severity"].as_str().is_some_and(|s| s.eq_ignore_ascii_case("error")))
            .collect();
        assert!(errors.is_empty(), "{errors:#?}");
    }

    fn http(&self, args: &[&str]) -> Value {
        self.b.state.http_client(CLIENT, args).unwrap()
    }

    /// `n` GETs of `url` from the client pod, 8 at a time, with headers.
    fn get(&self, url: &str, n: u64, headers: &[&str]) -> Value {
        let n = n.to_string();
        let mut args = vec!["--url", url, "--count", &n, "--concurrency", "8"];
        for h in headers {
            args.extend(["--header", h]);
        }
        self.http(&args)
    }

    /// The client pod's agent's request-log lines (the source side,
    /// `direction: outbound`) whose path starts with `prefix`.
    fn requests(&self, prefix: &str) -> Vec<Value> {
        self.logged(0, "outbound", prefix)
    }

    /// Request-log lines of node `node`'s agent in `direction` (`outbound`
    /// for the client side, `inbound` for the destination side).
    fn logged(&self, node: usize, direction: &str, prefix: &str) -> Vec<Value> {
        self.b
            .state
            .request_log(node)
            .into_iter()
            .filter(|l| l["direction"] == direction && l["path"].as_str().is_some_and(|p| p.starts_with(prefix)))
            .collect()
    }
}

fn count(v: &Value, key: &str, name: &str) -> u64 {
    v[key][name].as_u64().unwrap_or(0)
}

/// Every request answered 200, no transport errors.
fn all_ok(v: &Value, n: u64) {
    assert_eq!(count(v, "by_status", "200"), n, "{v}");
    assert!(v["errors"].as_object().is_none_or(|e| e.is_empty()), "{v}");
}

/// `got` out of `n` is within ±4.5σ of a binomial share `p` (see the top).
fn within_binomial(got: u64, n: u64, p: f64, what: &str) {
    let (mean, sd) = (n as f64 * p, (n as f64 * p * (1.0 - p)).sqrt());
    let (lo, hi) = (mean - 4.5 * sd, mean + 4.5 * sd);
    eprintln!("{what}: {got}/{n}, expected {mean:.0} within [{lo:.0}, {hi:.0}]");
    assert!(
        (lo..=hi).contains(&(got as f64)),
        "{what}: {got} of {n}, outside {mean:.0} ± 4.5σ = [{lo:.1}, {hi:.1}]"
    );
}

/// One raw HTTP/1.0 exchange from `pod` (bash's /dev/tcp, under `timeout`):
/// the whole response, head and body. For what the load client does not
/// print (bodies, response headers).
fn raw_http(b: &ClusterBox, pod: &str, addr: &str, head: &str) -> String {
    let (host, port) = addr.split_once(':').unwrap();
    let script = format!("exec 3<>/dev/tcp/{host}/{port} && printf '%s' \"$REQ\" >&3 && cat <&3",);
    let mut c = b
        .state
        .pod_command(pod, "timeout", &["10", "bash", "-c", &script])
        .unwrap()
        .env("REQ", format!("{head}\r\n\r\n"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = String::new();
    c.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    c.wait().unwrap();
    out
}

fn body_json(resp: &str) -> Value {
    let (_, body) = resp.split_once("\r\n\r\n").unwrap_or_else(|| panic!("{resp:?}"));
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {resp:?}"))
}

/// The summed value of every sample of `metric` whose labels include `want`.
fn metric(b: &ClusterBox, node: usize, metric: &str, want: &[(&str, &str)]) -> f64 {
    b.state
        .scrape(node)
        .unwrap()
        .samples
        .iter()
        .filter(|s| s.metric == metric && want.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| sample_value(&s.value))
        .sum()
}

/// Runs `f` on a thread (for a slow request that must overlap something).
fn background<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
    std::thread::spawn(f)
}

// ---------------------------------------------------------------------------

/// Request routing (the seed as loaded, all-v1, end-user jason), traffic
/// shifting (90/10 and 50/50 over 1,000 requests each, a live change to
/// 0/100 with a request in flight), fault injection (the seed's delay,
/// per-user delay and abort).
#[test]
fn bookinfo_routing_shifting_and_faults() {
    let t0 = Instant::now();
    let mut bed = up();
    eprintln!("box up in {} ms", t0.elapsed().as_millis());

    // --- The seed, loaded with examples/bookinfo: `user: tester` -> v2, else 90/10 v1/v2.
    let tester = bed.get(PRODUCTPAGE, 20, &["user:tester"]);
    all_ok(&tester, 20);
    assert_eq!(count(&tester, "by_nested", "reviews-v2"), 20, "{tester}");
    assert_eq!(count(&tester, "by_nested", "ratings-v1"), 20, "{tester}");
    let others = bed.get(PRODUCTPAGE, 100, &[]);
    all_ok(&others, 100);
    let (v1, v2) = (
        count(&others, "by_nested", "reviews-v1"),
        count(&others, "by_nested", "reviews-v2"),
    );
    assert_eq!(v1 + v2, 100, "the seed routes to v1 and v2 only: {others}");
    within_binomial(v2, 100, 0.1, "seed default route, v2");

    // --- Request routing: everything to v1.
    bed.routes(&["l7/reviews-all-v1.yaml"]);
    let all = bed.get(PRODUCTPAGE, 30, &["end-user:jason"]);
    all_ok(&all, 30);
    assert_eq!(count(&all, "by_nested", "reviews-v1"), 30, "{all}");
    // ...then jason to v2, everyone else still v1 (positive control).
    bed.routes(&["l7/reviews-jason-v2.yaml"]);
    let jason = bed.get(PRODUCTPAGE, 30, &["end-user:jason"]);
    all_ok(&jason, 30);
    assert_eq!(count(&jason, "by_nested", "reviews-v2"), 30, "{jason}");
    assert_eq!(count(&jason, "by_nested", "ratings-v1"), 30, "{jason}");
    let other = bed.get(PRODUCTPAGE, 30, &["end-user:mallory"]);
    all_ok(&other, 30);
    assert_eq!(count(&other, "by_nested", "reviews-v1"), 30, "{other}");

    // --- Traffic shifting: the seed's 90/10 v1/v3, then Istio's 50/50, on
    // reviews directly (per request over pooled connections).
    for (file, p3) in [("reviews-canary-90-10.yaml", 0.1), ("l7/reviews-50-v3.yaml", 0.5)] {
        bed.routes(&[file]);
        let t = Instant::now();
        let r = bed.get(&format!("{REVIEWS}/reviews/0"), 1000, &[]);
        eprintln!(
            "{file}: 1000 requests in {} ms: {}",
            t.elapsed().as_millis(),
            r["by_pod"]
        );
        all_ok(&r, 1000);
        let (v1, v3) = (count(&r, "by_pod", "reviews-v1"), count(&r, "by_pod", "reviews-v3"));
        assert_eq!(v1 + v3, 1000, "{r}");
        within_binomial(v3, 1000, p3, &format!("{file}: v3"));
    }

    // --- A live change, 90/10 -> 0/100: a request in flight when it lands
    // finishes where it was sent (v1, slow); new requests all go to v3.
    bed.routes(&["l7/reviews-all-v1.yaml"]);
    let slow = {
        let s = bed.b.state.clone();
        background(move || {
            s.http_client(
                CLIENT,
                &["--url", &format!("{REVIEWS}/reviews/0"), "--header", "x-delay-ms:2500"],
            )
            .unwrap()
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    bed.routes(&["l7/reviews-0-100-v3.yaml"]);
    let after = bed.get(&format!("{REVIEWS}/reviews/0"), 100, &[]);
    eprintln!(
        "0/100 applied and 100 requests sent {} ms after the change",
        t.elapsed().as_millis()
    );
    all_ok(&after, 100);
    assert_eq!(count(&after, "by_pod", "reviews-v3"), 100, "{after}");
    let slow = slow.join().unwrap();
    all_ok(&slow, 1);
    assert_eq!(
        count(&slow, "by_pod", "reviews-v1"),
        1,
        "the request in flight kept its route: {slow}"
    );

    // --- Fault injection, the seed's delay (7 s, legacy `percent: 100`, to
    // v3): productpage's own 3 s timeout fires, the page still answers 200
    // with reviews "error": "timeout"; details answers (positive control).
    bed.routes(&["reviews-fault-delay.yaml"]);
    let t = Instant::now();
    let page = bed.http(&["--url", PRODUCTPAGE, "--timeout-ms", "10000"]);
    let ms = t.elapsed().as_millis();
    all_ok(&page, 1);
    assert_eq!(count(&page, "by_nested", "error:timeout"), 1, "{page}");
    assert_eq!(count(&page, "by_nested", "details-v1"), 1, "{page}");
    let p50 = page["p50_ms"].as_f64().unwrap();
    assert!((2900.0..5000.0).contains(&p50), "productpage answered after {p50} ms");
    eprintln!("seed delay: productpage answered in {p50} ms (client run {ms} ms)");

    // --- Per user: jason delayed (timeout fires), abort-me gets 500, others
    // untouched. Jason's page runs while the others are checked.
    bed.routes(&["l7/reviews-faults-by-user.yaml"]);
    let jason = {
        let s = bed.b.state.clone();
        background(move || {
            s.http_client(
                CLIENT,
                &[
                    "--url",
                    PRODUCTPAGE,
                    "--header",
                    "end-user:jason",
                    "--timeout-ms",
                    "10000",
                ],
            )
            .unwrap()
        })
    };
    let fine = bed.get(PRODUCTPAGE, 20, &["end-user:mallory"]);
    all_ok(&fine, 20);
    assert_eq!(count(&fine, "by_nested", "reviews-v1"), 20, "{fine}");
    assert!(fine["max_ms"].as_f64().unwrap() < 2000.0, "{fine}");
    let aborted = bed.get(&format!("{REVIEWS}/reviews/0"), 20, &["end-user:abort-me"]);
    assert_eq!(count(&aborted, "by_status", "500"), 20, "{aborted}");
    let control = bed.get(&format!("{REVIEWS}/reviews/0"), 20, &["end-user:mallory"]);
    all_ok(&control, 20);
    let jason = jason.join().unwrap();
    all_ok(&jason, 1);
    assert_eq!(count(&jason, "by_nested", "error:timeout"), 1, "{jason}");
    let p50 = jason["p50_ms"].as_f64().unwrap();
    assert!((2900.0..5000.0).contains(&p50), "jason's page after {p50} ms");

    // The flags, in the metrics of the client's agent (a parser, not grep).
    let want = |code: &'static str, flags: &'static str| {
        vec![
            ("reporter", "source"),
            ("source_workload", "productpage-v1"),
            ("destination_service", REVIEWS_FQDN),
            ("response_code", code),
            ("response_flags", flags),
        ]
    };
    assert!(
        eventually(Duration::from_secs(5), || metric(
            &bed.b,
            0,
            "istio_requests_total",
            &want("500", "FI")
        ) == 20.0),
        "{}",
        metric(&bed.b, 0, "istio_requests_total", &want("500", "FI"))
    );
    let delayed: f64 = ["0", "200", "499", "504"]
        .into_iter()
        .map(|c| metric(&bed.b, 0, "istio_requests_total", &want(c, "DI")))
        .sum();
    assert!(delayed >= 2.0, "two delayed requests (seed + jason): {delayed}");
    eprintln!("bookinfo_routing_shifting_and_faults: {} ms", t0.elapsed().as_millis());
}

/// Request timeout, retries, mirroring, gRPC, TCP shifting, WebSocket, a
/// server-speaks-first service on a sniffed port, metrics and trace headers.
#[test]
fn resilience_grpc_tcp_and_protocols() {
    let t0 = Instant::now();
    let mut bed = up();
    eprintln!("box up in {} ms", t0.elapsed().as_millis());
    let uid = format!("{:08x}", ferry_box::sys::rand_u32());

    // --- Request timeout 0.5 s against a backend answering after 2 s: 504 UT.
    bed.routes(&["l7/reviews-timeout-retries.yaml"]);
    let slow_url = format!("{REVIEWS}/reviews/slow-{uid}");
    let slow = bed.get(&slow_url, 4, &["x-delay-ms:2000"]);
    assert_eq!(count(&slow, "by_status", "504"), 4, "{slow}");
    let p99 = slow["p99_ms"].as_f64().unwrap();
    assert!(p99 < 1500.0, "the 504 came after {p99} ms, not ~500");
    let quick = bed.get(&slow_url, 4, &["x-delay-ms:100"]);
    all_ok(&quick, 4);
    let lines = bed.requests(&format!("/reviews/slow-{uid}"));
    let timed_out: Vec<_> = lines.iter().filter(|l| l["status"] == 504).collect();
    assert_eq!(timed_out.len(), 4, "{lines:#?}");
    assert!(
        timed_out.iter().all(|l| l["flags"] == "UT" && l["route"] == "slow"),
        "{timed_out:#?}"
    );

    // --- Retries: failing twice, then fine, with 3 retries allowed: 200 on
    // the third attempt; with 1 retry: 503, URX. Each request its own id.
    let r3 = bed.get(
        &format!("{REVIEWS}/reviews/retry3-{uid}"),
        5,
        &["x-fail-times:2", &format!("x-request-id:{uid}-a{{i}}")],
    );
    all_ok(&r3, 5);
    let r1 = bed.get(
        &format!("{REVIEWS}/reviews/retry1-{uid}"),
        5,
        &["x-fail-times:2", &format!("x-request-id:{uid}-b{{i}}")],
    );
    assert_eq!(count(&r1, "by_status", "503"), 5, "{r1}");
    // Positive control for the one retry: failing once is recovered.
    let r1ok = bed.get(
        &format!("{REVIEWS}/reviews/retry1-{uid}"),
        5,
        &["x-fail-times:1", &format!("x-request-id:{uid}-c{{i}}")],
    );
    all_ok(&r1ok, 5);
    let log3 = bed.requests(&format!("/reviews/retry3-{uid}"));
    assert_eq!(log3.len(), 5, "{log3:#?}");
    assert!(
        log3.iter()
            .all(|l| l["attempts"] == 3 && l["status"] == 200 && l["flags"] == "-"),
        "{log3:#?}"
    );
    let log1 = bed.requests(&format!("/reviews/retry1-{uid}"));
    let (spent, recovered): (Vec<_>, Vec<_>) = log1.iter().partition(|l| l["status"] == 503);
    assert_eq!(spent.len(), 5, "{log1:#?}");
    assert!(
        spent.iter().all(|l| l["attempts"] == 2 && l["flags"] == "URX"),
        "{spent:#?}"
    );
    assert!(
        recovered.iter().all(|l| l["attempts"] == 2 && l["status"] == 200),
        "{recovered:#?}"
    );

    // --- Mirroring v1 -> v2: the client sees v1 only; v2 gets a copy of
    // every request, its authority suffixed `-shadow` as Envoy does (seen
    // by its node's agent). Before the mirror,
    // none (negative control).
    let v2 = format!("{}:9080", bed.b.state.pod_ip("reviews-v2").unwrap());
    let at_v2 = |bed: &Bed, path: &str| {
        // Arrived from node 1: the tunnel side of node 2's agent.
        bed.logged(1, "tunnel", path)
            .iter()
            .filter(|l| {
                l["upstream"] == v2.as_str()
                    && l["status"] == 200
                    && l["authority"].as_str().is_some_and(|a| a.ends_with("-shadow"))
            })
            .count()
    };
    let plain_path = format!("/reviews/plain-{uid}");
    let plain = bed.get(&format!("{REVIEWS}{plain_path}"), 20, &[]);
    all_ok(&plain, 20);
    assert_eq!(count(&plain, "by_pod", "reviews-v1"), 20, "{plain}");
    bed.routes(&["l7/reviews-mirror-v2.yaml"]);
    let mirror_path = format!("/reviews/mirror-{uid}");
    let mirrored = bed.get(&format!("{REVIEWS}{mirror_path}"), 20, &[]);
    all_ok(&mirrored, 20);
    assert_eq!(count(&mirrored, "by_pod", "reviews-v1"), 20, "{mirrored}");
    assert!(
        eventually(Duration::from_secs(5), || at_v2(&bed, &mirror_path) == 20),
        "v2 got {} mirrored requests, not 20",
        at_v2(&bed, &mirror_path)
    );
    assert_eq!(at_v2(&bed, &plain_path), 0, "v2 served requests without a mirror");

    // --- gRPC routed per method: server-streaming calls to v2, unary to v1;
    // messages, status and the `x-pod` trailer intact; a failing call's
    // status passes through. TCP shifted 80/20.
    bed.routes(&["l7/echo-grpc-and-tcp.yaml"]);
    let grpc = |args: &[&str]| {
        bed.b
            .state
            .workload_json(
                CLIENT,
                &[&["grpc", "client", "--to", GRPC], args].concat(),
                Duration::from_secs(20),
            )
            .unwrap()
    };
    let stream = grpc(&["--op", "server-stream", "--count", "5"]);
    assert_eq!(stream["received"], 5, "{stream}");
    assert_eq!(stream["code"], 0, "{stream}");
    let msgs = stream["messages"].as_array().unwrap();
    assert!(msgs.iter().all(|m| m["pod"] == "grpc-v2"), "{stream}");
    assert_eq!(
        msgs.iter().map(|m| m["seq"].as_u64().unwrap()).collect::<Vec<_>>(),
        [0, 1, 2, 3, 4]
    );
    assert_eq!(stream["trailers"]["x-pod"], "grpc-v2", "{stream}");
    let failing_stream = grpc(&["--op", "server-stream", "--count", "3", "--fail-code", "5"]);
    assert_eq!(failing_stream["received"], 3, "{failing_stream}");
    assert_eq!(failing_stream["code"], 5, "{failing_stream}");
    assert_eq!(failing_stream["trailers"]["x-pod"], "grpc-v2", "{failing_stream}");
    let unary = grpc(&["--op", "unary"]);
    assert_eq!(unary["code"], 0, "{unary}");
    assert_eq!(unary["messages"][0]["pod"], "grpc-v1", "{unary}");
    let denied = grpc(&["--op", "unary", "--fail-code", "7", "--fail-message", "no-entry"]);
    assert_eq!(denied["code"], 7, "{denied}");
    assert_eq!(denied["message"], "no-entry", "{denied}");
    assert_eq!(denied["trailers"]["x-pod"], "grpc-v1", "{denied}");
    let grpc_want = [
        ("reporter", "source"),
        ("destination_service", "echo-grpc.default.svc.cluster.local"),
        ("request_protocol", "grpc"),
        ("grpc_response_status", "7"),
    ];
    assert!(eventually(Duration::from_secs(5), || metric(
        &bed.b,
        0,
        "istio_requests_total",
        &grpc_want
    ) == 1.0));

    // TCP 80/20 over 500 connections (WHO), 10 clients at a time.
    let t = Instant::now();
    let mut tally: BTreeMap<String, u64> = BTreeMap::new();
    for _ in 0..50 {
        let handles: Vec<_> = (0..10)
            .map(|_| {
                let s = bed.b.state.clone();
                background(move || s.who(CLIENT, TCP).unwrap().0)
            })
            .collect();
        for h in handles {
            *tally.entry(h.join().unwrap()).or_default() += 1;
        }
    }
    eprintln!(
        "TCP 80/20: 500 connections in {} ms: {tally:?}",
        t.elapsed().as_millis()
    );
    let (v1, v2) = (
        tally.get("tcp-v1").copied().unwrap_or(0),
        tally.get("tcp-v2").copied().unwrap_or(0),
    );
    assert_eq!(v1 + v2, 500, "{tally:?}");
    within_binomial(v2, 500, 0.2, "TCP shift, v2");

    // --- WebSocket through the mesh (details' HTTP port).
    let ws = bed
        .b
        .state
        .workload_json(
            CLIENT,
            &["http", "ws", "--url", "ws://10.96.0.21:9080/ws", "--count", "5"],
            Duration::from_secs(20),
        )
        .unwrap();
    assert_eq!(ws["status"], 101, "{ws}");
    assert_eq!(ws["ok"], true, "{ws}");
    assert_eq!(ws["echoed"], 5, "{ws}");
    assert_eq!(ws["served_by"], "details-v1", "{ws}");

    // --- A server-speaks-first service on an `auto` port: the banner comes
    // without the client sending anything, well before a second.
    for to in [
        BANNER.to_owned(),
        format!("{}:2525", bed.b.state.pod_ip("banner-v1").unwrap()),
    ] {
        let banner = bed
            .b
            .state
            .workload_json(CLIENT, &["banner", "client", "--to", &to], Duration::from_secs(20))
            .unwrap();
        eprintln!("banner via {to}: {banner}");
        assert_eq!(banner["banner"], "220 banner-v1 ready", "{banner}");
        assert!(banner["ms_to_banner"].as_u64().unwrap() < 1000, "{banner}");
    }
    // --- HTTP request metrics, parsed: the counts above, by code and flags.
    let want = |code: &'static str, flags: &'static str| {
        vec![
            ("reporter", "source"),
            ("source_workload", "productpage-v1"),
            ("destination_service", REVIEWS_FQDN),
            ("destination_service_name", "reviews"),
            ("request_protocol", "http"),
            ("response_code", code),
            ("response_flags", flags),
        ]
    };
    assert_eq!(metric(&bed.b, 0, "istio_requests_total", &want("504", "UT")), 4.0);
    assert_eq!(metric(&bed.b, 0, "istio_requests_total", &want("503", "URX")), 5.0);
    let mut ok = want("200", "-");
    ok.push(("destination_workload", "reviews-v1"));
    // quick 4 + retry3 5 + retry1 recovered 5 + plain 20 + mirrored 20 (mirror copies are not counted).
    assert_eq!(metric(&bed.b, 0, "istio_requests_total", &ok), 54.0);
    // --- Trace headers pass every hop (productpage forwards them, the mesh
    // must not drop them), read from the nested bodies.
    let trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let resp = raw_http(
        &bed.b,
        "ratings-v1",
        "10.96.0.20:9080",
        &format!("GET /productpage HTTP/1.0\r\nHost: productpage\r\nend-user: jason\r\ntraceparent: {trace}\r\nx-b3-traceid: {uid}"),
    );
    let page = body_json(&resp);
    let calls = page["calls"].as_array().unwrap();
    assert_eq!(calls.len(), 2, "{page}");
    for c in calls {
        assert_eq!(c["status"], 200, "{page}");
        assert_eq!(c["body"]["headers"]["traceparent"], trace, "{c}");
        assert_eq!(c["body"]["headers"]["x-b3-traceid"], uid.as_str(), "{c}");
    }

    eprintln!("resilience_grpc_tcp_and_protocols: {} ms", t0.elapsed().as_millis());
}
