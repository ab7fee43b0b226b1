//! Table tests of route compilation: the seeds and Bookinfo compile to what
//! a user expects, and every unsupported field is reported.

use ferry_model::route::{AbortStatus, RetryOn, RouteKind, ServiceRouting, StringMatch};

use super::*;
use crate::model::Severity;

const SVCS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: reviews}
spec: {clusterIP: 10.96.0.22, selector: {app: reviews}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: ratings}
spec: {clusterIP: 10.96.0.23, selector: {app: ratings}, ports: [{name: http, port: 9080}]}
---
"#;

fn cluster(text: &str) -> Cluster {
    crate::source::files::parse_cluster("t.yaml", text).0
}

fn compiled(text: &str) -> Compiled {
    compile(&cluster(&format!("{SVCS}{text}")))
}

fn routing<'a>(c: &'a Compiled, svc: &str) -> &'a ServiceRouting {
    c.routings
        .iter()
        .find(|r| r.service == svc)
        .unwrap_or_else(|| panic!("no routing for {svc}: {c:#?}"))
}

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!("{}/../tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

fn reasons(c: &Compiled) -> Vec<String> {
    c.problems.iter().map(|p| p.to_string()).collect()
}

#[test]
fn the_canary_seed_is_a_90_10_split_over_subsets() {
    let c = compiled(&fixture("reviews-canary-90-10.yaml"));
    let r = routing(&c, "default/reviews");
    assert_eq!(r.origins[0].kind, RouteKind::VirtualService);
    assert_eq!(r.http.len(), 1);
    let split: Vec<(Option<&str>, u32)> = r.http[0]
        .backends
        .iter()
        .map(|b| (b.subset.as_deref(), b.weight))
        .collect();
    assert_eq!(split, [(Some("v1"), 90), (Some("v3"), 10)]);
    assert!(r.http[0].matches.is_empty());
    // No DestinationRule in this file: both subsets are errors (503 at the agent).
    let all = reasons(&c);
    assert_eq!(
        c.problems.iter().filter(|p| p.severity == Severity::Error).count(),
        2,
        "{all:#?}"
    );
    assert!(
        all[0].contains(
            "spec.http[0].route[0].destination.subset: no DestinationRule for default/reviews defines subset \"v1\""
        ),
        "{all:#?}"
    );
    assert!(all[0].contains("answers 503"), "{all:#?}");
}

#[test]
fn the_fault_seed_delays_every_request_by_7s_with_the_legacy_percent() {
    let c = compiled(&fixture("reviews-fault-delay.yaml"));
    let r = routing(&c, "default/reviews");
    let d = r.http[0].fault.as_ref().unwrap().delay.as_ref().unwrap();
    assert_eq!((d.delay_ms, d.percent), (7000, 100.0));
    assert_eq!(r.http[0].backends[0].subset.as_deref(), Some("v3"));
    assert_eq!(
        r.http[0].backends[0].weight, 100,
        "a single destination takes everything"
    );
}

#[test]
fn the_header_route_seed_sends_tester_to_v2_and_splits_the_rest() {
    for text in [
        fixture("reviews-routing-circuit-breaking-mtls.yaml"),
        std::fs::read_to_string(format!(
            "{}/../examples/bookinfo/reviews-routing-circuit-breaking-mtls.yaml",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap(),
    ] {
        let c = compiled(&text);
        let r = routing(&c, "default/reviews");
        assert_eq!(r.http.len(), 2);
        let m = &r.http[0].matches[0];
        assert_eq!(m.headers.get("user"), Some(&StringMatch::Exact("tester".into())));
        assert_eq!(r.http[0].backends[0].subset.as_deref(), Some("v2"));
        let split: Vec<u32> = r.http[1].backends.iter().map(|b| b.weight).collect();
        assert_eq!(split, [90, 10]);
        // Subsets from the DestinationRule, keyed by Service.
        let names: Vec<&str> = r.subsets["default/reviews"].iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["v1", "v2"]);
        // Istio's default retries apply when a route sets none.
        let rt = r.http[0].retries.as_ref().unwrap();
        assert_eq!(rt.attempts, 2);
        assert!(rt.retry_on.contains(&RetryOn::Status(503)));
        // The DestinationRule's traffic policy is compiled for the Service
        // (applied by agents: docs/traffic-management.md), not reported.
        let all = reasons(&c);
        let t = c
            .traffic
            .iter()
            .find(|t| t.service == "default/reviews")
            .expect("traffic policy");
        let pool = &t.policy.connection_pool;
        assert_eq!(
            (
                pool.max_connections,
                pool.http1_max_pending_requests,
                pool.max_requests_per_connection
            ),
            (Some(100), Some(1), Some(2)),
            "{t:#?}"
        );
        assert_eq!(
            t.policy.outlier_detection.as_ref().unwrap().consecutive_gateway,
            Some(7)
        );
        assert!(
            !all.iter()
                .any(|p| p.contains("connectionPool") || p.contains("outlierDetection")),
            "{all:#?}"
        );
        assert!(c.problems.iter().all(|p| p.severity != Severity::Error), "{all:#?}");
    }
}

#[test]
fn hosts_resolve_by_short_name_namespace_and_fqdn_and_others_are_reported() {
    let vs = |host: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: x}}\nspec:\n  hosts: [{host:?}]\n  http: [{{route: [{{destination: {{host: ratings}}}}]}}]\n"
        )
    };
    for h in [
        "reviews",
        "reviews.default",
        "reviews.default.svc",
        "reviews.default.svc.cluster.local",
    ] {
        let c = compiled(&vs(h));
        assert_eq!(c.routings.len(), 1, "{h}");
        assert_eq!(c.routings[0].service, "default/reviews");
        assert_eq!(c.routings[0].http[0].backends[0].service, "default/ratings");
    }
    let c = compiled(&vs("www.example.com"));
    assert!(c.routings.is_empty());
    assert!(
        reasons(&c)[0].contains("spec.hosts[0]: host \"www.example.com\" is not a Service"),
        "{:?}",
        reasons(&c)
    );
    let c = compiled(&vs("nosuch"));
    assert!(
        reasons(&c)[0].contains("spec.hosts[0]: host \"nosuch\": no Service default/nosuch: not applied for this host")
    );
}

#[test]
fn every_istio_route_field_compiles() {
    let c = compiled(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: all}
spec:
  hosts: [reviews]
  http:
  - name: first
    match:
    - uri: {prefix: /api}
      method: {exact: GET}
      authority: {regex: "reviews.*"}
      headers: {End-User: {exact: jason}, x-any: {prefix: ""}}
      withoutHeaders: {x-skip: {exact: "1"}}
      queryParams: {v: {exact: "2"}}
      port: 9080
      sourceLabels: {app: productpage}
      sourceNamespace: default
      ignoreUriCase: true
    route:
    - destination: {host: reviews, port: {number: 9080}}
      weight: 80
      headers: {request: {set: {X-A: "1"}}}
    - destination: {host: ratings}
      weight: 20
    timeout: 500ms
    retries: {attempts: 3, perTryTimeout: 100ms, retryOn: "5xx,connect-failure,503,retriable-status-codes"}
    fault:
      delay: {fixedDelay: 1s, percentage: {value: 12.5}}
      abort: {grpcStatus: UNAVAILABLE, percentage: {value: 50}}
    mirror: {host: ratings}
    mirrorPercentage: {value: 25}
    mirrors: [{destination: {host: reviews}, percentage: {value: 5}}]
    headers: {request: {add: {x-b: "2"}}, response: {remove: [server]}}
    rewrite: {uri: /v2, authority: reviews.internal}
  - redirect: {uri: /moved, authority: elsewhere, port: 8080, scheme: https, redirectCode: 308}
  - route: [{destination: {host: reviews}}]
    retries: {attempts: 0}
    fault: {abort: {httpStatus: 500, percentage: {value: 100}}}
  tcp:
  - match: [{port: 9080, sourceLabels: {app: a}}]
    route: [{destination: {host: reviews}, weight: 80}, {destination: {host: ratings}, weight: 20}]
"#,
    );
    assert!(c.problems.is_empty(), "{:#?}", reasons(&c));
    let r = routing(&c, "default/reviews");
    let h = &r.http[0];
    assert_eq!(h.name, "first");
    let m = &h.matches[0];
    assert_eq!(m.uri, Some(StringMatch::Prefix("/api".into())));
    assert_eq!(m.headers.get("end-user"), Some(&StringMatch::Exact("jason".into())));
    assert_eq!(m.headers.get("x-any"), Some(&StringMatch::Present));
    assert!(m.ignore_uri_case && m.port == Some(9080) && m.source_namespace.as_deref() == Some("default"));
    assert_eq!(
        (h.backends[0].port, h.backends[0].weight, h.backends[1].weight),
        (Some(9080), 80, 20)
    );
    assert_eq!(
        h.backends[0].request_headers.set,
        [("x-a".to_string(), "1".to_string())]
    );
    assert_eq!(h.timeout_ms, Some(500));
    let rt = h.retries.as_ref().unwrap();
    assert_eq!((rt.attempts, rt.per_try_timeout_ms), (3, Some(100)));
    assert_eq!(
        rt.retry_on,
        [RetryOn::FiveXx, RetryOn::ConnectFailure, RetryOn::Status(503)]
    );
    let f = h.fault.as_ref().unwrap();
    assert_eq!(f.delay.as_ref().unwrap().percent, 12.5);
    assert_eq!(f.abort.as_ref().unwrap().status, AbortStatus::Grpc(14));
    let mirrors: Vec<(&str, f64)> = h
        .mirrors
        .iter()
        .map(|m| (m.backend.service.as_str(), m.percent))
        .collect();
    assert_eq!(mirrors, [("default/ratings", 25.0), ("default/reviews", 5.0)]);
    assert_eq!(h.rewrite.as_ref().unwrap().prefix.as_deref(), Some("/v2"));
    assert_eq!(h.response_headers.remove, ["server"]);
    let rd = r.http[1].redirect.as_ref().unwrap();
    assert_eq!(
        (rd.path.as_deref(), rd.port, rd.status),
        (Some("/moved"), Some(8080), 308)
    );
    assert!(r.http[1].backends.is_empty());
    assert_eq!(r.http[2].retries, None, "attempts: 0 turns retries off");
    assert_eq!(r.tcp[0].port, Some(9080));
    assert_eq!(r.tcp[0].backends.iter().map(|b| b.weight).collect::<Vec<_>>(), [80, 20]);
}

#[test]
fn unsupported_istio_fields_are_rejected_or_reported_not_enforced() {
    let c = compiled(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: odd}
spec:
  hosts: [reviews]
  exportTo: ["."]
  http:
  - match: [{scheme: {exact: https}}]
    route: [{destination: {host: reviews}}]
  - delegate: {name: other}
  - match: [{gateways: [ingress], uri: {prefix: /x}}]
    route: [{destination: {host: reviews}}]
  - corsPolicy: {allowOrigins: [{exact: "*"}]}
    rewrite: {uriRegexRewrite: {match: a, rewrite: b}}
    mirror: {host: www.example.com}
    retries: {attempts: 1, backoff: 1s}
    route: [{destination: {host: www.example.com}}, {destination: {host: reviews}, weight: 100}]
  - fault: {delay: {fixedDelay: 1s}}
    route: [{destination: {host: reviews}}]
"#,
    );
    let all = reasons(&c).join("\n");
    let r = routing(&c, "default/reviews");
    assert_eq!(
        r.http.len(),
        2,
        "scheme, delegate and gateway-only routes are not applied: {all}"
    );
    for want in [
        "spec.exportTo: exportTo (every namespace sees these routes): accepted, not enforced",
        "VirtualService default/odd: spec.http[0].match[0].scheme: scheme matches are not supported: the route is not applied",
        "spec.http[1].delegate: delegate is not supported",
        "spec.http[2].match[0].gateways: names gateways and not `mesh`",
        "spec.http[3].corsPolicy: corsPolicy: accepted, not enforced",
        "spec.http[3].rewrite.uriRegexRewrite: uriRegexRewrite is not supported (the path is left as is): accepted, not enforced",
        "spec.http[3].mirror.host: host \"www.example.com\" is not a Service of this cluster (Ferry routes Services only): mirroring there is accepted, not enforced",
        "spec.http[3].retries.backoff: backoff: accepted, not enforced",
        "spec.http[3].route[0].destination.host: host \"www.example.com\" is not a Service",
        "spec.http[4].fault.delay: no percentage: as in Istio, the fault applies to no request",
    ] {
        assert!(all.contains(want), "missing {want:?} in\n{all}");
    }
}

#[test]
fn the_oldest_virtual_service_wins_a_host_and_gateway_api_routes_win_over_virtual_services() {
    let vs = |name: &str, ts: &str, subset: &str| {
        format!("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}, creationTimestamp: \"{ts}\"}}\nspec:\n  hosts: [reviews]\n  http: [{{route: [{{destination: {{host: reviews, subset: {subset}}}}}]}}]\n---\n")
    };
    let dr = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: r}\nspec: {host: reviews, subsets: [{name: a, labels: {v: a}}, {name: b, labels: {v: b}}]}\n---\n";
    let text = format!(
        "{dr}{}{}",
        vs("aaa-new", "2026-02-01T00:00:00Z", "a"),
        vs("zzz-old", "2026-01-01T00:00:00Z", "b")
    );
    let c = compiled(&text);
    let r = routing(&c, "default/reviews");
    assert_eq!(r.origins[0].name, "zzz-old");
    assert_eq!(r.http[0].backends[0].subset.as_deref(), Some("b"));
    let all = reasons(&c).join("\n");
    assert!(all.contains("VirtualService default/aaa-new: spec.hosts: ignored for Service default/reviews: VirtualService default/zzz-old routes it too"), "{all}");

    let hr = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: gamma}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: reviews, port: 9080}]\n  rules: [{backendRefs: [{name: ratings, port: 9080}]}]\n";
    let c = compiled(&format!("{text}{hr}"));
    let r = routing(&c, "default/reviews");
    assert_eq!((r.origins.len(), r.origins[0].kind), (1, RouteKind::HttpRoute));
    assert_eq!(r.http[0].backends[0].service, "default/ratings");
    assert_eq!(r.http[0].matches[0].port, Some(9080), "the parentRef's port");
    let all = reasons(&c).join("\n");
    for v in ["aaa-new", "zzz-old"] {
        assert!(
            all.contains(&format!("VirtualService default/{v}: spec.hosts: ignored for Service default/reviews: HTTPRoute default/gamma also routes it, and Gateway API routes take precedence")),
            "{all}"
        );
    }
}

#[test]
fn http_routes_compile_and_order_by_gateway_api_precedence() {
    let c = compiled(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: b-route}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews}, {name: some-gateway}]
  hostnames: [reviews.example]
  rules:
  - backendRefs: [{name: reviews, port: 9080}]
  - matches: [{path: {type: PathPrefix, value: /api}}]
    backendRefs: [{name: reviews, port: 9080, weight: 9}, {name: ratings, port: 9080}]
    timeouts: {request: 2s, backendRequest: 500ms}
    retry: {attempts: 3, codes: [503, 504], backoff: 100ms}
  - matches: [{path: {type: PathPrefix, value: /api/v2}, method: GET}]
    filters:
    - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: X-Set, value: "1"}], remove: [x-gone]}}
    - {type: ResponseHeaderModifier, responseHeaderModifier: {add: [{name: x-add, value: "2"}]}}
    - {type: RequestMirror, requestMirror: {backendRef: {name: ratings, port: 9080}, fraction: {numerator: 1, denominator: 4}}}
    - {type: URLRewrite, urlRewrite: {hostname: internal, path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}}
    backendRefs: [{name: reviews, port: 9080}]
  - matches: [{path: {type: Exact, value: /login}}]
    filters: [{type: RequestRedirect, requestRedirect: {scheme: https, path: {type: ReplaceFullPath, replaceFullPath: /sso}}}]
  - matches:
    - {path: {type: PathPrefix, value: /api}, headers: [{name: User, value: tester}], queryParams: [{name: v, type: RegularExpression, value: "[0-9]+"}]}
    backendRefs: [{name: reviews, port: 9080}]
    sessionPersistence: {sessionName: s}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: a-route}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews}]
  rules:
  - matches: [{path: {type: RegularExpression, value: "/re.*"}}]
    backendRefs: [{name: reviews, port: 9080}]
"#,
    );
    let r = routing(&c, "default/reviews");
    let order: Vec<String> = r
        .http
        .iter()
        .map(|h| match &h.matches[0].uri {
            Some(StringMatch::Exact(p)) => format!("={p}"),
            Some(StringMatch::PathPrefix(p)) => format!(
                "{p}{}{}",
                if h.matches[0].method.is_some() { "+method" } else { "" },
                if h.matches[0].headers.is_empty() { "" } else { "+header" }
            ),
            Some(StringMatch::Regex(re)) => format!("~{}", re.as_str()),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        order,
        ["=/login", "/api/v2+method", "/api+header", "/api", "~/re.*", "None"]
    );
    let api = &r.http[3];
    assert_eq!(
        api.backends.iter().map(|b| b.weight).collect::<Vec<_>>(),
        [9, 1],
        "default weight 1"
    );
    assert_eq!(api.timeout_ms, Some(2000));
    let rt = api.retries.as_ref().unwrap();
    assert_eq!((rt.attempts, rt.per_try_timeout_ms), (3, Some(500)));
    assert_eq!(rt.retry_on, [RetryOn::Status(503), RetryOn::Status(504)]);
    let v2 = &r.http[1];
    assert_eq!(v2.request_headers.set, [("x-set".to_string(), "1".to_string())]);
    assert_eq!(v2.response_headers.add, [("x-add".to_string(), "2".to_string())]);
    assert_eq!(v2.mirrors[0].percent, 25.0);
    let rw = v2.rewrite.as_ref().unwrap();
    assert_eq!(
        (rw.prefix.as_deref(), rw.authority.as_deref()),
        (Some("/v2"), Some("internal"))
    );
    let rd = r.http[0].redirect.as_ref().unwrap();
    assert_eq!(
        (rd.path.as_deref(), rd.scheme.as_deref(), rd.status),
        (Some("/sso"), Some("https"), 302)
    );
    let all = reasons(&c).join("\n");
    for want in [
        "spec.parentRefs[1]: parent Gateway \"some-gateway\" is not a Service",
        "spec.hostnames: ignored for Service parents",
        "spec.rules[1].retry.backoff: retry backoff: accepted, not enforced",
        "spec.rules[4].sessionPersistence: sessionPersistence: accepted, not enforced",
    ] {
        assert!(all.contains(want), "missing {want:?} in\n{all}");
    }
}

#[test]
fn grpc_and_tcp_routes_compile() {
    let c = compiled(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: g}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews}]
  rules:
  - matches: [{method: {service: pkg.Reviews, method: Get}}]
    backendRefs: [{name: ratings, port: 9080}]
  - matches: [{method: {service: pkg.Reviews}, headers: [{name: x-v, value: "2"}]}]
    backendRefs: [{name: reviews, port: 9080}]
  - matches: [{method: {method: List}}]
    filters: [{type: ExtensionRef, extensionRef: {group: x, kind: y, name: z}}]
    backendRefs: [{name: reviews, port: 9080}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {name: t}
spec:
  parentRefs: [{group: "", kind: Service, name: ratings, port: 9080}]
  rules:
  - backendRefs: [{name: ratings, port: 9080, weight: 80}, {name: reviews, port: 9080, weight: 20}]
"#,
    );
    let r = routing(&c, "default/reviews");
    assert_eq!(r.origins[0].kind, RouteKind::GrpcRoute);
    assert_eq!(
        r.http[0].matches[0].uri,
        Some(StringMatch::Exact("/pkg.Reviews/Get".into()))
    );
    assert_eq!(
        r.http[1].matches[0].uri,
        Some(StringMatch::Prefix("/pkg.Reviews/".into()))
    );
    assert_eq!(r.http.len(), 2, "the ExtensionRef rule is not applied");
    assert!(reasons(&c)
        .join("\n")
        .contains("spec.rules[2].filters[0]: ExtensionRef filters are not supported here: the rule is not applied"));
    let t = routing(&c, "default/ratings");
    assert_eq!(t.tcp[0].port, Some(9080));
    assert_eq!(t.tcp[0].backends.iter().map(|b| b.weight).collect::<Vec<_>>(), [80, 20]);
}

#[test]
fn no_input_panics_the_compiler() {
    // Odd but parseable objects: empty hosts lists, zero weights, bad regexes.
    let c = compiled(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: odd}
spec:
  hosts: ["*.example", "", "a.b.c.d.e.f", reviews]
  http:
  - match: [{uri: {regex: "("}}]
    route: [{destination: {host: reviews}}]
  - route: [{destination: {host: reviews}, weight: 0}, {destination: {host: ratings}, weight: 0}]
  - route: []
  tcp: [{route: []}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: odd}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, namespace: other}]
  rules: [{matches: [{path: {type: RegularExpression, value: "["}}]}, {}]
"#,
    );
    let r = routing(&c, "default/reviews");
    assert_eq!(r.http.len(), 1, "{:#?}", reasons(&c));
    assert!(reasons(&c).iter().any(|p| p.contains("regex \"(\"")));
}
