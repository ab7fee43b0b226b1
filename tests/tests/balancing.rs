//! Load balancing and outlier detection on the cluster-in-a-box: Service
//! `lb` (`tests/fixtures/balancing/app.yaml`: four HTTP endpoints on two
//! nodes, each pod with a locality) called from `lb-client` (node 1, r1/z1)
//! while DestinationRules are applied live through ferry-control. Answers
//! are counted by pod (`ferry-workload http client`); endpoints fail or slow
//! per request by header (`x-status-on`, `x-delay-on: POD=N`); an endpoint
//! leaves by having its pod relabelled out of the Service's selector.
//!
//! - consistent hash on a header: 100 keys over 1,000 requests, each key
//!   always on one pod; one endpoint leaves and only its keys move;
//! - LEAST_REQUEST sends measurably less to a slow endpoint than
//!   ROUND_ROBIN does (the positive control: exactly a quarter);
//! - locality: everything to the same-zone endpoint (control: without
//!   `localityLbSetting` traffic spreads), then the same region, then the
//!   other region as endpoints leave;
//! - outlier detection: an endpoint answering 500 is ejected after 3
//!   errors (`ferryctl endpoints`, the metric), traffic moves, it comes back
//!   after `baseEjectionTime`; `maxEjectionPercent: 25` ejects one of two
//!   failing endpoints, 50 (the control) both.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use ferry_box::{eventually, manifests, require_root, sample_value, ClusterBox};
use serde_json::Value;

const URL: &str = "http://10.96.0.40:80/";
const CLIENT: &str = "lb-client";
const PODS: [&str; 4] = ["lb-a", "lb-b", "lb-c", "lb-d"];

struct Bed {
    b: ClusterBox,
    /// The fixture's YAML (namespace, pods' Service), without rules.
    base: Vec<(String, String)>,
}

fn up() -> Bed {
    require_root();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/balancing");
    let spec = manifests::spec_from_dir(std::path::Path::new(dir), 2).unwrap();
    let base = spec.cluster_yaml.clone();
    let b = ClusterBox::up(spec, ferry_box::default_bin_dir()).expect("box up");
    Bed { b, base }
}

impl Bed {
    /// Applies a DestinationRule for `lb` with this `trafficPolicy` (YAML,
    /// indented under it; empty: no rule) and waits for every agent; it must
    /// load without errors.
    fn rule(&mut self, traffic_policy: &str) {
        let mut y = self.base.clone();
        if !traffic_policy.is_empty() {
            y.push((
                "lb-rule.yaml".into(),
                format!(
                    "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: lb}}\nspec:\n  host: lb\n  trafficPolicy:\n{traffic_policy}"
                ),
            ));
        }
        let t = Instant::now();
        self.b
            .update(|sp| sp.cluster_yaml = y)
            .expect("rule applied by every agent");
        eprintln!("rule applied everywhere in {} ms", t.elapsed().as_millis());
        let problems = self.b.state.control_problems().unwrap();
        let errors: Vec<&Value> = problems
            .iter()
            .filter(|p| p["severity"].as_str().is_some_and(|s| s.eq_ignore_ascii_case("error")))
            .collect();
        assert!(errors.is_empty(), "{errors:#?}");
    }

    /// Takes `pod` out of Service `lb` (or puts it back): its `app` label.
    fn member(&mut self, pod: &str, member: bool) {
        let pod = pod.to_owned();
        self.b
            .update(|sp| {
                let p = sp.pods.iter_mut().find(|p| p.name == pod).unwrap();
                for (k, v) in &mut p.labels {
                    if k == "app" {
                        *v = if member { "lb" } else { "lb-out" }.into();
                    }
                }
            })
            .expect("endpoints updated");
    }

    /// `n` GETs from the client pod, `c` at a time, with headers.
    fn get(&self, n: u64, c: u64, extra: &[&str]) -> Value {
        let (n, c) = (n.to_string(), c.to_string());
        let mut args = vec!["--url", URL, "--count", &n, "--concurrency", &c];
        args.extend_from_slice(extra);
        self.b.state.http_client(CLIENT, &args).unwrap()
    }

    /// `ferryctl endpoints -o json` on node 1 (the client's agent), by pod.
    fn health(&self) -> BTreeMap<String, Value> {
        let out = self
            .b
            .state
            .ferryctl(0, &["endpoints", "--service", "default/lb", "-o", "json"])
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
        rows.into_iter()
            .map(|r| {
                let pod = r["workload"]
                    .as_str()
                    .unwrap_or("-")
                    .trim_start_matches("default/")
                    .to_owned();
                (pod, r)
            })
            .collect()
    }

    fn ejected(&self) -> Vec<String> {
        self.health()
            .into_iter()
            .filter(|(_, r)| r["state"] == "ejected")
            .map(|(p, _)| p)
            .collect()
    }
}

fn count(v: &Value, key: &str, name: &str) -> u64 {
    v[key][name].as_u64().unwrap_or(0)
}

fn pods_reached(v: &Value) -> Vec<String> {
    PODS.iter()
        .filter(|p| count(v, "by_pod", p) > 0)
        .map(|p| p.to_string())
        .collect()
}

fn no_errors(v: &Value) {
    assert!(v["errors"].as_object().is_none_or(|e| e.is_empty()), "{v}");
}

/// key -> the one pod it reached (asserting it reached only one).
fn sticky(v: &Value) -> BTreeMap<String, String> {
    v["by_key"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, pods)| {
            let pods = pods.as_object().unwrap();
            assert_eq!(pods.len(), 1, "key {k} reached several pods: {pods:?}");
            (k.clone(), pods.keys().next().unwrap().clone())
        })
        .collect()
}

/// Consistent hashing on a header, then LEAST_REQUEST against a slow
/// endpoint (ROUND_ROBIN as the control).
#[test]
fn consistent_hash_and_least_request() {
    let mut bed = up();

    // Sticky: 100 keys, 1,000 requests.
    bed.rule("    loadBalancer:\n      consistentHash: {httpHeaderName: x-user}\n");
    let keyed = ["--keys", "100", "--header", "x-user:user-{k}"];
    let v = bed.get(1000, 8, &keyed);
    no_errors(&v);
    assert_eq!(count(&v, "by_status", "200"), 1000, "{v}");
    let before = sticky(&v);
    assert_eq!(before.len(), 100);
    let mut per_pod: BTreeMap<&str, usize> = BTreeMap::new();
    for p in before.values() {
        *per_pod.entry(p).or_default() += 1;
    }
    eprintln!("keys per pod: {per_pod:?}");
    assert_eq!(
        per_pod.len(),
        4,
        "keys spread over every endpoint (control): {per_pod:?}"
    );

    // lb-d leaves: its keys move, no other key does.
    bed.member("lb-d", false);
    let v = bed.get(1000, 8, &keyed);
    no_errors(&v);
    assert_eq!(count(&v, "by_pod", "lb-d"), 0, "{v}");
    let after = sticky(&v);
    let mut moved = 0;
    for (k, was) in &before {
        let now = &after[k];
        if was == "lb-d" {
            moved += 1;
            assert_ne!(now, "lb-d");
        } else {
            assert_eq!(now, was, "key {k} moved from {was} to {now} though {was} stayed");
        }
    }
    eprintln!("{moved} of 100 keys moved (those of lb-d)");
    assert_eq!(moved, per_pod["lb-d"]);
    bed.member("lb-d", true);

    // A slow endpoint: lb-c takes 150 ms, the others answer at once.
    let slow = ["--header", "x-delay-on:lb-c=150"];
    bed.rule("    loadBalancer: {simple: ROUND_ROBIN}\n");
    let rr = bed.get(200, 8, &slow);
    no_errors(&rr);
    let rr_slow = count(&rr, "by_pod", "lb-c");
    bed.rule("    loadBalancer: {simple: LEAST_REQUEST}\n");
    let lr = bed.get(200, 8, &slow);
    no_errors(&lr);
    let lr_slow = count(&lr, "by_pod", "lb-c");
    eprintln!(
        "slow endpoint: ROUND_ROBIN {rr_slow}/200 (all 200 in {} ms), LEAST_REQUEST {lr_slow}/200 (in {} ms)",
        rr["elapsed_ms"], lr["elapsed_ms"]
    );
    assert!((48..=52).contains(&rr_slow), "round robin: a quarter (control): {rr}");
    assert!(
        lr_slow * 3 <= rr_slow,
        "least request: at most a third of round robin's: {lr}"
    );
    assert!(lr_slow > 0, "the slow endpoint is still used: {lr}");
}

/// Locality preference and failover, then outlier detection.
#[test]
fn locality_and_outlier_detection() {
    let mut bed = up();

    // Control: without localityLbSetting, traffic spreads.
    bed.rule("    loadBalancer: {simple: ROUND_ROBIN}\n");
    let v = bed.get(40, 4, &[]);
    no_errors(&v);
    assert_eq!(pods_reached(&v).len(), 4, "{v}");

    let local = "    loadBalancer:\n      simple: ROUND_ROBIN\n      localityLbSetting: {enabled: true}\n    outlierDetection: {consecutive5xxErrors: 5, interval: 1s, baseEjectionTime: 30s}\n";
    bed.rule(local);
    let v = bed.get(40, 4, &[]);
    no_errors(&v);
    assert_eq!(count(&v, "by_pod", "lb-a"), 40, "the client's zone: {v}");
    let h = bed.health();
    assert_eq!(h["lb-a"]["locality"], "r1/z1", "{h:?}");
    bed.member("lb-a", false);
    let v = bed.get(40, 4, &[]);
    no_errors(&v);
    assert_eq!(count(&v, "by_pod", "lb-b"), 40, "the client's region: {v}");
    bed.member("lb-b", false);
    let v = bed.get(40, 4, &[]);
    no_errors(&v);
    assert_eq!(
        count(&v, "by_pod", "lb-c") + count(&v, "by_pod", "lb-d"),
        40,
        "another region: {v}"
    );
    bed.member("lb-a", true);
    bed.member("lb-b", true);

    // Outlier detection: lb-a answers 500; ejected after its third.
    bed.rule("    loadBalancer: {simple: ROUND_ROBIN}\n    outlierDetection: {consecutive5xxErrors: 3, interval: 100ms, baseEjectionTime: 3s, maxEjectionPercent: 25}\n");
    assert!(bed.ejected().is_empty());
    let fail_a = ["--header", "x-status-on:lb-a=500"];
    // The ejection happens during this run: after `started`.
    let started = Instant::now();
    let v = bed.get(40, 1, &fail_a);
    no_errors(&v);
    assert_eq!(
        count(&v, "by_status", "500"),
        3,
        "three 500s, then no more traffic to lb-a: {v}"
    );
    assert_eq!(count(&v, "by_pod", "lb-a"), 3, "{v}");
    assert_eq!(count(&v, "by_status", "200"), 37, "{v}");
    let h = bed.health();
    eprintln!("after ejection: {:#?}", h["lb-a"]);
    assert_eq!(h["lb-a"]["state"], "ejected", "{h:?}");
    assert!(
        h["lb-a"]["ejected_for_ms"].as_u64().is_some_and(|ms| ms > 1000),
        "{h:?}"
    );
    assert_eq!(bed.ejected(), ["lb-a"]);
    let ip = h["lb-a"]["endpoint"].as_str().unwrap().to_owned();
    let scrape = bed.b.state.scrape(0).unwrap();
    let ejections: f64 = scrape
        .samples
        .iter()
        .filter(|s| s.metric.starts_with("ferry_outlier_ejections") && s.labels.get("endpoint") == Some(&ip))
        .map(|s| sample_value(&s.value))
        .sum();
    assert_eq!(ejections, 1.0, "ferry_outlier_ejections_total for {ip}");

    // Back after baseEjectionTime (3 s x 1), and used again.
    assert!(
        eventually(Duration::from_secs(10), || bed.ejected().is_empty()),
        "lb-a re-admitted"
    );
    let back = started.elapsed();
    eprintln!("lb-a back within {} ms of the run that ejected it", back.as_millis());
    assert!(back >= Duration::from_secs(3), "not before its ejection time");
    let v = bed.get(40, 1, &[]);
    no_errors(&v);
    assert_eq!(count(&v, "by_pod", "lb-a"), 10, "{v}");

    // Two endpoints fail: at most 25% of four, one, is ejected; the other
    // keeps its share of traffic (answering 500).
    let fail_ab = ["--header", "x-status-on:lb-a=500,lb-b=500"];
    let v = bed.get(60, 1, &fail_ab);
    no_errors(&v);
    let out = bed.ejected();
    eprintln!("maxEjectionPercent 25: ejected {out:?}, {v}");
    assert_eq!(out.len(), 1, "{out:?}");
    let spared = if out[0] == "lb-a" { "lb-b" } else { "lb-a" };
    assert!(
        count(&v, "by_pod", spared) >= 15,
        "the spared endpoint keeps its share: {v}"
    );
    // Control: 50% allows both.
    bed.rule("    loadBalancer: {simple: ROUND_ROBIN}\n    outlierDetection: {consecutive5xxErrors: 3, interval: 100ms, baseEjectionTime: 3s, maxEjectionPercent: 50}\n");
    let v = bed.get(20, 1, &fail_ab);
    no_errors(&v);
    let mut out = bed.ejected();
    out.sort();
    assert_eq!(out, ["lb-a", "lb-b"], "{v}");
    let v = bed.get(20, 1, &fail_ab);
    assert_eq!(
        count(&v, "by_status", "200"),
        20,
        "traffic only to healthy endpoints: {v}"
    );
}
