//! Table tests of the route decisions.

use std::collections::BTreeMap;

use super::*;

fn headers(h: &[(&str, &str)]) -> BTreeMap<String, String> {
    h.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn req<'a>(path: &'a str, query: Option<&'a str>, h: &'a BTreeMap<String, String>) -> RequestAttrs<'a> {
    RequestAttrs {
        method: "GET",
        path,
        query,
        authority: "reviews:9080",
        port: 9080,
        headers: h,
        source: None,
    }
}

fn re(s: &str) -> StringMatch {
    StringMatch::Regex(Regex::new(s).unwrap())
}

#[test]
fn string_matches() {
    let rows: &[(StringMatch, &str, bool)] = &[
        (StringMatch::Exact("/a".into()), "/a", true),
        (StringMatch::Exact("/a".into()), "/a/", false),
        (StringMatch::Prefix("/a".into()), "/ab", true),
        (StringMatch::PathPrefix("/a".into()), "/ab", false),
        (StringMatch::PathPrefix("/a".into()), "/a/b", true),
        (StringMatch::PathPrefix("/a/".into()), "/a", true),
        (StringMatch::PathPrefix("/".into()), "/anything", true),
        (re("/v[0-9]+"), "/v12", true),
        // Whole-value match, as Envoy's safe_regex.
        (re("/v[0-9]+"), "/v12/x", false),
        (re("a|ab"), "ab", true),
        (StringMatch::Present, "", true),
    ];
    for (m, v, want) in rows {
        assert_eq!(m.matches(v), *want, "{m:?} on {v:?}");
    }
}

#[test]
fn first_matching_route_wins() {
    let r: ServiceRouting = serde_norway::from_str(
        r#"
service: default/reviews
http:
  - name: tester
    matches: [{headers: {user: {exact: tester}}}]
    backends: [{service: default/reviews, subset: v2}]
  - name: jason
    matches: [{headers: {end-user: {exact: jason}}}, {queryParams: {u: {exact: jason}}}]
    backends: [{service: default/reviews, subset: v2}]
  - name: api
    matches: [{uri: {prefix: /api}, method: {exact: POST}}]
    backends: [{service: default/reviews, subset: v3}]
  - name: default
    backends: [{service: default/reviews, subset: v1, weight: 90}, {service: default/reviews, subset: v3, weight: 10}]
subsets:
  default/reviews: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
"#,
    )
    .unwrap();
    let none = headers(&[]);
    let tester = headers(&[("user", "tester")]);
    let jason = headers(&[("end-user", "jason")]);
    let name = |h: &BTreeMap<String, String>, q: Option<&str>| {
        r.select_http(&req("/reviews/0", q, h)).map(|(_, x)| x.name.clone())
    };
    assert_eq!(name(&none, None).as_deref(), Some("default"));
    assert_eq!(name(&tester, None).as_deref(), Some("tester"));
    assert_eq!(name(&jason, None).as_deref(), Some("jason"));
    assert_eq!(name(&none, Some("a=1&u=jason")).as_deref(), Some("jason"));
    assert_eq!(name(&none, Some("u=jasonx")).as_deref(), Some("default"));
    let mut post = req("/api/x", None, &none);
    assert_eq!(r.select_http(&post).unwrap().1.name, "default");
    post.method = "POST";
    assert_eq!(r.select_http(&post).unwrap().1.name, "api");
    assert_eq!(r.subset("default/reviews", "v2").unwrap().labels["version"], "v2");
    assert!(r.subset("default/reviews", "v9").is_none());
}

#[test]
fn without_headers_source_labels_and_port() {
    let m = HttpMatch {
        without_headers: [("x-canary".to_string(), StringMatch::Present)].into(),
        source_labels: [("app".to_string(), "productpage".to_string())].into(),
        port: Some(9080),
        ..Default::default()
    };
    let w: Workload =
        serde_norway::from_str("{uid: u, name: p, node: n, ip: 10.0.0.1, labels: {app: productpage}}").unwrap();
    let none = headers(&[]);
    let canary = headers(&[("x-canary", "1")]);
    let mut r = req("/", None, &none);
    assert!(!m.matches(&r), "no source: labels cannot match");
    r.source = Some(&w);
    assert!(m.matches(&r));
    r.port = 9081;
    assert!(!m.matches(&r));
    let mut r = req("/", None, &canary);
    r.source = Some(&w);
    assert!(!m.matches(&r));
}

#[test]
fn weighted_pick_is_proportional_and_skips_zero() {
    let w = [90u32, 0, 10];
    let mut counts = [0; 3];
    for roll in 0..1000u64 {
        let i = pick_weighted(&[0usize, 1, 2], |i| w[*i], roll).unwrap();
        counts[*i] += 1;
    }
    assert_eq!(counts, [900, 0, 100]);
    assert!(pick_weighted(&[0u32], |_| 0, 5).is_none());
    assert!(pick_weighted::<u32>(&[], |_| 1, 5).is_none());
}

#[test]
fn percent_hits() {
    assert!(percent_hit(100.0, 0.9999));
    assert!(!percent_hit(0.0, 0.0));
    assert!(percent_hit(10.0, 0.05));
    assert!(!percent_hit(10.0, 0.10));
}

#[test]
fn retry_conditions() {
    let p = |on: &[RetryOn]| RetryPolicy {
        attempts: 2,
        per_try_timeout_ms: None,
        retry_on: on.to_vec(),
    };
    let resp = |status, grpc_status| AttemptResult::Response { status, grpc_status };
    let rows: &[(&[RetryOn], AttemptResult, bool)] = &[
        (&[RetryOn::FiveXx], resp(503, None), true),
        (&[RetryOn::FiveXx], resp(404, None), false),
        (&[RetryOn::FiveXx], AttemptResult::ConnectFailure, true),
        (&[RetryOn::GatewayError], resp(500, None), false),
        (&[RetryOn::GatewayError], resp(502, None), true),
        (&[RetryOn::ConnectFailure], resp(503, None), false),
        (&[RetryOn::Status(503)], resp(503, None), true),
        (&[RetryOn::Unavailable], resp(200, Some(14)), true),
        (&[RetryOn::Unavailable], resp(200, Some(13)), false),
        (&[RetryOn::RetriableStatus4xx], resp(409, None), true),
        (&[RetryOn::Reset], AttemptResult::Reset, true),
    ];
    for (on, result, want) in rows {
        assert_eq!(p(on).retriable(*result), *want, "{on:?} {result:?}");
    }
    assert_eq!(RetryOn::parse(" 5xx").unwrap(), RetryOn::FiveXx);
    assert_eq!(RetryOn::parse("503").unwrap(), RetryOn::Status(503));
    assert!(RetryOn::parse("sometimes").unwrap_err().contains("sometimes"));
}

#[test]
fn rewrites_and_redirects() {
    let route = HttpRoute {
        matches: vec![HttpMatch {
            uri: Some(StringMatch::Prefix("/old".into())),
            ..Default::default()
        }],
        rewrite: Some(Rewrite {
            prefix: Some("/new".into()),
            ..Default::default()
        }),
        redirect: Some(Redirect {
            authority: Some("example".into()),
            prefix: Some("/v2".into()),
            status: 302,
            ..Default::default()
        }),
        ..Default::default()
    };
    let h = headers(&[]);
    let r = req("/old/x", Some("q=1"), &h);
    assert_eq!(route.rewritten_path(&r).as_deref(), Some("/new/x"));
    assert_eq!(
        route.redirect_location(&r, "http").as_deref(),
        Some("http://example/v2/x?q=1")
    );
    let gw = HttpRoute {
        matches: vec![HttpMatch {
            uri: Some(StringMatch::PathPrefix("/foo".into())),
            ..Default::default()
        }],
        rewrite: Some(Rewrite {
            prefix: Some("/".into()),
            ..Default::default()
        }),
        ..Default::default()
    };
    assert_eq!(gw.rewritten_path(&req("/foo/bar", None, &h)).as_deref(), Some("/bar"));
    assert_eq!(gw.rewritten_path(&req("/foo", None, &h)).as_deref(), Some("/"));
}

#[test]
fn tcp_route_selection() {
    let r: ServiceRouting = serde_norway::from_str(
        r#"
service: default/db
tcp:
  - {port: 5432, backends: [{service: default/db, subset: a, weight: 80}, {service: default/db, subset: b, weight: 20}]}
  - {backends: [{service: default/db}]}
"#,
    )
    .unwrap();
    assert_eq!(r.select_tcp(5432, None).unwrap().backends.len(), 2);
    assert_eq!(r.select_tcp(1, None).unwrap().backends.len(), 1);
}

#[test]
fn bad_regex_is_a_parse_error() {
    let e = serde_norway::from_str::<StringMatch>("regex: '('").unwrap_err();
    assert!(e.to_string().contains("regex"), "{e}");
}
