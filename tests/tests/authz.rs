//! Authorization on the cluster-in-a-box: Istio's Bookinfo authorization
//! tasks replayed on the HTTP Bookinfo (`examples/bookinfo`: productpage ->
//! details, reviews; reviews v2/v3 -> ratings), with ferry-control streaming
//! the policies (as written in Istio's task, `security.istio.io/v1`) to the
//! destination agents, which enforce them on real mTLS connections with the
//! peer identity from the certificate. Each step is applied live and waited
//! for (every agent ACKs it); the page is fetched by a client pod and every
//! nested call's answer counted (`by_nested`: the pod that answered, or
//! `status:403` when the destination's agent refused it).
//!
//! The page works end to end only with all four policies, and each step
//! shows exactly which calls the policies so far admit.

use std::time::{Duration, Instant};

use ferry_box::{eventually, manifests, require_root, ClusterBox};
use serde_json::Value;

const PRODUCTPAGE: &str = "http://10.96.0.20:9080/productpage";
const DETAILS: &str = "http://10.96.0.21:9080/details/0";
/// The client: an enrolled pod that is none of the callers the policies
/// name (service account bookinfo-ratings), on node 2 (productpage is on 1).
const CLIENT: &str = "ratings-v1";
const N: u64 = 10;

fn policy(name: &str, spec: &str) -> (String, String) {
    (
        format!("authz-{name}.yaml"),
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n{spec}"
        ),
    )
}

fn allow_nothing() -> (String, String) {
    // Istio's task writes `spec: {}`.
    (
        "authz-allow-nothing.yaml".into(),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: allow-nothing\n  namespace: default\nspec: {}\n".into(),
    )
}

fn viewer(app: &str, from_sa: Option<&str>) -> (String, String) {
    let from = from_sa.map_or(String::new(), |sa| {
        format!("  - from:\n    - source:\n        principals: [\"cluster.local/ns/default/sa/{sa}\"]\n    to:\n")
    });
    let to = if from.is_empty() { "  - to:\n" } else { "" };
    policy(
        &format!("{app}-viewer"),
        &format!(
            "  selector:\n    matchLabels:\n      app: {app}\n  action: ALLOW\n  rules:\n{from}{to}    - operation:\n        methods: [\"GET\"]\n"
        ),
    )
}

fn apply(b: &mut ClusterBox, policies: &[(String, String)]) {
    let t = Instant::now();
    b.update(|sp| {
        sp.cluster_yaml.retain(|(n, _)| !n.starts_with("authz-"));
        sp.cluster_yaml.extend(policies.iter().cloned());
    })
    .expect("policies applied by every agent");
    let names: Vec<&str> = policies.iter().map(|(n, _)| n.as_str()).collect();
    eprintln!("{names:?} applied everywhere in {} ms", t.elapsed().as_millis());
    let problems = b.state.control_problems().unwrap();
    assert!(
        !problems
            .iter()
            .any(|p| p["object"].as_str().is_some_and(|o| o.contains("AuthorizationPolicy"))),
        "the task's policies load cleanly: {problems:#?}"
    );
}

/// `N` requests from the client; reviews pinned to v2 (`user: tester`, the
/// seed's header route), which calls ratings.
fn page(b: &ClusterBox, url: &str, method: &str) -> Value {
    let n = N.to_string();
    let v = b
        .state
        .http_client(
            CLIENT,
            &[
                "--url",
                url,
                "--count",
                &n,
                "--method",
                method,
                "--header",
                "user: tester",
            ],
        )
        .unwrap();
    eprintln!("{method} {url}: {v}");
    v
}

/// The agents' request-log lines answered neither 200 nor 403 (for failures).
fn not_refused(b: &ClusterBox) -> Vec<Value> {
    (0..2)
        .flat_map(|n| b.state.request_log(n))
        .filter(|l| l["status"] != 200 && l["status"] != 403)
        .collect()
}

fn status(v: &Value, code: u16) -> u64 {
    v["by_status"][code.to_string()].as_u64().unwrap_or(0)
}

fn nested(v: &Value, key: &str) -> u64 {
    v["by_nested"][key].as_u64().unwrap_or(0)
}

#[test]
fn bookinfo_authorization_tasks_replayed() {
    require_root();
    let spec = manifests::spec_from_dir(&manifests::bookinfo(), 2).unwrap();
    let mut b = ClusterBox::up(spec, ferry_box::default_bin_dir()).expect("box up");

    // No policy: the whole page (the positive control for every step).
    let v = page(&b, PRODUCTPAGE, "GET");
    assert_eq!(status(&v, 200), N, "{v}");
    for pod in ["details-v1", "reviews-v2", "ratings-v1"] {
        assert_eq!(nested(&v, pod), N, "{pod}: {v}");
    }

    // allow-nothing: every request refused at productpage's agent.
    apply(&mut b, &[allow_nothing()]);
    let v = page(&b, PRODUCTPAGE, "GET");
    assert_eq!(status(&v, 403), N, "{v}");
    // The destination's agent logs each refusal (flag RBAC; direction
    // `tunnel`: it came over mTLS), as it writes them.
    let refused = || {
        b.state
            .request_log(0)
            .into_iter()
            .filter(|l| l["direction"] != "outbound" && l["path"] == "/productpage" && l["flags"] == "RBAC")
            .count() as u64
    };
    assert!(
        eventually(Duration::from_secs(10), || refused() >= N),
        "productpage's agent logged {} refusals: {:?}",
        refused(),
        b.state.request_log(0).last()
    );

    // productpage-viewer: the page with GET, but its calls refused.
    let mut policies = vec![allow_nothing(), viewer("productpage", None)];
    apply(&mut b, &policies);
    let v = page(&b, PRODUCTPAGE, "GET");
    assert_eq!(status(&v, 200), N, "{v}");
    assert_eq!(
        nested(&v, "status:403"),
        2 * N,
        "details and reviews refused: {v}\nnot 403 in the agents' logs: {:#?}",
        not_refused(&b)
    );
    assert_eq!(nested(&v, "details-v1") + nested(&v, "reviews-v2"), 0, "{v}");
    let v = page(&b, PRODUCTPAGE, "POST");
    assert_eq!(status(&v, 403), N, "GET only: {v}");

    // details-viewer and reviews-viewer: only productpage's identity.
    policies.extend([
        viewer("details", Some("bookinfo-productpage")),
        viewer("reviews", Some("bookinfo-productpage")),
    ]);
    apply(&mut b, &policies);
    let v = page(&b, PRODUCTPAGE, "GET");
    assert_eq!(status(&v, 200), N, "{v}");
    assert_eq!((nested(&v, "details-v1"), nested(&v, "reviews-v2")), (N, N), "{v}");
    assert_eq!(
        nested(&v, "status:403"),
        N,
        "ratings still refused (reviews calls it): {v}"
    );
    // The same details, called by the client's identity (bookinfo-ratings): refused.
    let v = page(&b, DETAILS, "GET");
    assert_eq!(status(&v, 403), N, "details admits productpage only: {v}");

    // ratings-viewer: the page works end to end.
    policies.push(viewer("ratings", Some("bookinfo-reviews")));
    apply(&mut b, &policies);
    let v = page(&b, PRODUCTPAGE, "GET");
    assert_eq!(status(&v, 200), N, "{v}");
    for pod in ["details-v1", "reviews-v2", "ratings-v1"] {
        assert_eq!(nested(&v, pod), N, "{pod}: {v}");
    }
    assert_eq!(nested(&v, "status:403"), 0, "{v}");

    // Taking ratings-viewer away refuses ratings again (allow-nothing still
    // selects it); taking allow-nothing away too admits it once more: no
    // ALLOW policy selects ratings then, and with none, traffic is allowed.
    policies.retain(|(n, _)| n != "authz-ratings-viewer.yaml");
    apply(&mut b, &policies);
    let v = page(&b, PRODUCTPAGE, "GET");
    assert_eq!((status(&v, 200), nested(&v, "status:403")), (N, N), "{v}");
    policies.retain(|(n, _)| n != "authz-allow-nothing.yaml");
    apply(&mut b, &policies);
    let v = page(&b, PRODUCTPAGE, "GET");
    assert_eq!((nested(&v, "ratings-v1"), nested(&v, "status:403")), (N, 0), "{v}");
}
