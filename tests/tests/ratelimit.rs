//! Local rate limiting (`ferry.dev/v1alpha1 RateLimitPolicy`) on the
//! cluster-in-a-box, end to end: the policy is YAML applied to ferry-control
//! (as `kubectl apply` would), streamed to the agents, and enforced by the
//! agent of node 2, where Bookinfo's only `details` pod runs. Clients on
//! node 1 (`productpage-v1`, identity bookinfo-productpage, and
//! `reviews-v1`, bookinfo-reviews; mutual TLS from the seed's STRICT
//! PeerAuthentication) send as fast as `ferry-workload http client` goes,
//! and the answers are counted.
//!
//! Tolerance: a bucket at `R` per second, full (one second's worth) at the
//! start, accepts at most `R * T + R` over `T` seconds; `T` is the client's
//! run (from start to its last answer, which contains the destination's
//! window), plus one request for rounding. A client sending faster than
//! `R` all along gets at least [`LOWER`] of it (what is missing is the
//! client's start-up before its first request reaches node 2, and the
//! tokens left at the end).

use ferry_box::{manifests, require_root, sample_value, ClusterBox};
use serde_json::Value;

const DETAILS: &str = "http://10.96.0.21:9080/details/0";
const LOWER: f64 = 0.85;

const TOTAL: &str = "apiVersion: ferry.dev/v1alpha1
kind: RateLimitPolicy
metadata:
  name: details
  namespace: default
spec:
  targetRef: {group: \"\", kind: Service, name: details, port: 9080}
  total: {requestsPerSecond: 20}
";

/// Each identity 5/s, productpage 25/s; a total that is never reached.
const PER_IDENTITY: &str = "apiVersion: ferry.dev/v1alpha1
kind: RateLimitPolicy
metadata:
  name: details
  namespace: default
spec:
  targetRef: {kind: Service, name: details}
  total: {requestsPerSecond: 1000}
  perIdentity: {requestsPerSecond: 5}
  overrides:
    - clientIdentities: [spiffe://cluster.local/ns/default/sa/bookinfo-productpage]
      requestsPerSecond: 25
";

struct Bed {
    b: ClusterBox,
    base: Vec<(String, String)>,
}

impl Bed {
    fn up() -> Self {
        require_root();
        let spec = manifests::spec_from_dir(&manifests::bookinfo(), 2).unwrap();
        let base = spec.cluster_yaml.clone();
        let b = ClusterBox::up(spec, ferry_box::default_bin_dir()).expect("box up");
        Self { b, base }
    }

    /// The cluster as written plus `policy` (none: `""`); waits until every
    /// agent applied it. It must load without errors.
    fn apply(&mut self, policy: &str) {
        let mut y = self.base.clone();
        if !policy.is_empty() {
            y.push(("ratelimit.yaml".into(), policy.into()));
        }
        self.b.update(|sp| sp.cluster_yaml = y).expect("applied by every agent");
        let problems = self.b.state.control_problems().unwrap();
        let bad: Vec<&Value> = problems
            .iter()
            .filter(|p| {
                p["severity"].as_str().is_some_and(|s| s.eq_ignore_ascii_case("error"))
                    || p["object"].as_str().is_some_and(|o| o.starts_with("RateLimitPolicy"))
            })
            .collect();
        assert!(bad.is_empty(), "{bad:#?}");
    }

    /// `count` GETs of details from `pod`, 4 at a time.
    fn load(&self, pod: &str, count: u64) -> Load {
        let count = count.to_string();
        let args = ["--url", DETAILS, "--count", &count, "--concurrency", "4"];
        let v = self.b.state.http_client(pod, &args).unwrap();
        eprintln!("{pod}: {v}");
        assert!(v["errors"].as_object().is_none_or(|e| e.is_empty()), "{v}");
        let status = |c: &str| v["by_status"][c].as_u64().unwrap_or(0);
        let secs = v["elapsed_ms"].as_u64().unwrap() as f64 / 1000.0;
        let l = Load {
            ok: status("200"),
            limited: status("429"),
            secs,
            outer_secs: secs,
        };
        assert_eq!(l.ok + l.limited, v["sent"].as_u64().unwrap(), "only 200 and 429: {v}");
        l
    }

    /// `ferry_rate_limited_total` of node 2's agent for the policy.
    fn rate_limited(&self, scope: &str) -> f64 {
        self.b
            .state
            .scrape(1)
            .unwrap()
            .samples
            .iter()
            .filter(|s| {
                s.metric == "ferry_rate_limited_total"
                    && s.labels.get("destination_service") == Some("details.default.svc.cluster.local")
                    && s.labels.get("policy") == Some("default/details")
                    && s.labels.get("scope") == Some(scope)
            })
            .map(|s| sample_value(&s.value))
            .sum()
    }

    /// Node 2's destination-side request-log lines for details, by (status, flags).
    fn logged(&self) -> std::collections::BTreeMap<(u64, String), u64> {
        let mut m = std::collections::BTreeMap::new();
        for l in self.b.state.request_log(1) {
            if l["direction"] == "tunnel" && l["path"] == "/details/0" {
                let key = (
                    l["status"].as_u64().unwrap_or(0),
                    l["flags"].as_str().unwrap_or("?").to_owned(),
                );
                *m.entry(key).or_default() += 1;
            }
        }
        m
    }
}

#[derive(Debug)]
struct Load {
    ok: u64,
    limited: u64,
    /// The client's run, as it measured it.
    secs: f64,
    /// A window that contains every client's run (for clients together).
    outer_secs: f64,
}

impl Load {
    fn assert_within(&self, rps: f64, what: &str) {
        let most = rps * self.outer_secs + rps + 1.0;
        let least = LOWER * (rps * self.secs + rps);
        eprintln!(
            "{what}: {} accepted, {} answered 429 in {:.2}s at {rps}/s (want {least:.1}..={most:.1})",
            self.ok, self.limited, self.secs
        );
        assert!(
            (self.ok + self.limited) as f64 > 3.0 * rps * self.secs,
            "{what}: the client must send well above {rps}/s: {self:?}"
        );
        assert!(
            self.ok as f64 <= most && self.ok as f64 >= least,
            "{what}: {self:?} outside {least:.1}..={most:.1}"
        );
    }
}

#[test]
fn rate_limits_answer_429_rl_above_the_rate_per_identity_and_overrides() {
    let mut bed = Bed::up();

    // Positive control: no policy (the box as it came up), no 429 however
    // fast the client goes.
    let free = bed.load("productpage-v1", 300);
    assert_eq!((free.ok, free.limited), (300, 0), "{free:?}");

    // The total: 20/s, both clients counted together.
    bed.apply(TOTAL);
    let started = std::time::Instant::now();
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| bed.load("productpage-v1", 1500));
        let b = s.spawn(|| bed.load("reviews-v1", 1500));
        (a.join().unwrap(), b.join().unwrap())
    });
    let both = Load {
        ok: a.ok + b.ok,
        limited: a.limited + b.limited,
        secs: a.secs.max(b.secs),
        outer_secs: started.elapsed().as_secs_f64(),
    };
    both.assert_within(20.0, "total 20/s, two clients");
    assert_eq!(bed.rate_limited("total"), both.limited as f64);
    let logged = bed.logged();
    assert_eq!(
        logged.get(&(429, "RL".into())).copied().unwrap_or(0),
        both.limited,
        "{logged:?}"
    );
    assert!(
        logged.get(&(200, "-".into())).copied().unwrap_or(0) >= both.ok,
        "{logged:?}"
    );

    // Per identity 5/s, productpage's override 25/s, sent at once.
    bed.apply(PER_IDENTITY);
    let (pp, rv) = std::thread::scope(|s| {
        let pp = s.spawn(|| bed.load("productpage-v1", 1500));
        let rv = s.spawn(|| bed.load("reviews-v1", 1500));
        (pp.join().unwrap(), rv.join().unwrap())
    });
    pp.assert_within(25.0, "productpage at its override");
    rv.assert_within(5.0, "reviews at perIdentity");
    assert_eq!(bed.rate_limited("override"), pp.limited as f64);
    assert_eq!(bed.rate_limited("identity"), rv.limited as f64);

    // Removed: no more 429.
    bed.apply("");
    let free = bed.load("productpage-v1", 300);
    assert_eq!((free.ok, free.limited), (300, 0), "{free:?}");
}
