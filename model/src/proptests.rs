//! Property tests (proptest) of the pure decisions: the config stream's
//! wire round trip (feature `proto`), weighted backend choice, the laws of
//! `StringMatch`, and two monotonicity laws of authorization. The fuzz
//! targets in `fuzz/` check the parsers; these check the decisions against
//! what they must be for every input, not just the table tests' rows.

use std::net::{IpAddr, Ipv4Addr};

use proptest::{collection::vec, prelude::*, sample::select};

use crate::{
    authz::{self, Action, AuthzPolicy, DenyReason, HeaderPairs, HttpAttrs, Verdict},
    route::{pick_weighted, StringMatch},
};

// ---------------------------------------------------------------------------
// Weighted choice.

proptest! {
    /// Over one full cycle of rolls (`0..total`), each item is picked exactly
    /// its weight's number of times; rolls past the total wrap; no weight,
    /// no pick.
    #[test]
    fn pick_weighted_gives_each_item_exactly_its_share(
        weights in vec(0u32..20, 0..8),
        offset in 0u64..4,
    ) {
        let items: Vec<usize> = (0..weights.len()).collect();
        let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
        if total == 0 {
            prop_assert!(pick_weighted(&items, |i| weights[*i], 7).is_none());
            return Ok(());
        }
        let mut counts = vec![0u32; items.len()];
        for roll in 0..total {
            let i = *pick_weighted(&items, |i| weights[*i], roll + offset * total).unwrap();
            counts[i] += 1;
        }
        prop_assert_eq!(counts, weights);
    }

    /// The pick is never an item of weight 0, even at the extremes of `u64`.
    #[test]
    fn pick_weighted_never_picks_a_zero_weight(
        weights in vec(select(vec![0u32, 0, 1, u32::MAX]), 1..6),
        roll in any::<u64>(),
    ) {
        let items: Vec<usize> = (0..weights.len()).collect();
        match pick_weighted(&items, |i| weights[*i], roll) {
            Some(i) => prop_assert!(weights[*i] > 0),
            None => prop_assert!(weights.iter().all(|w| *w == 0)),
        }
    }
}

// ---------------------------------------------------------------------------
// StringMatch.

/// Strings over a small alphabet (so prefixes and equal strings are
/// common), with `/`, upper case and a non-ASCII letter.
fn text() -> impl Strategy<Value = String> {
    vec(select(vec!['a', 'b', 'A', '/', '?', 'é', '.']), 0..8).prop_map(|v| v.into_iter().collect())
}

proptest! {
    #[test]
    fn exact_matches_only_itself(e in text(), v in text()) {
        prop_assert!(StringMatch::Exact(e.clone()).matches(&e));
        prop_assert_eq!(StringMatch::Exact(e.clone()).matches(&v), e == v);
    }

    #[test]
    fn prefix_is_starts_with(p in text(), v in text()) {
        let m = StringMatch::Prefix(p.clone());
        let longer = format!("{p}{v}");
        prop_assert!(m.matches(&longer));
        prop_assert_eq!(m.matches(&v), v.starts_with(&p));
        prop_assert!(StringMatch::Prefix(String::new()).matches(&v));
        prop_assert!(StringMatch::Present.matches(&v));
    }

    /// Gateway API `PathPrefix`: a prefix of whole segments. It matches
    /// itself, itself followed by `/...`, and with `/`-free `p` and a
    /// non-separator next character, it does not match.
    #[test]
    fn path_prefix_matches_whole_segments(p in text(), rest in text(), c in select(vec!['a', 'b', 'é', '.'])) {
        let m = StringMatch::PathPrefix(p.clone());
        prop_assert!(m.matches(&p));
        let below = format!("{p}/{rest}");
        prop_assert!(m.matches(&below));
        let trimmed = p.trim_end_matches('/');
        let beside = format!("{trimmed}{c}{rest}");
        if !trimmed.is_empty() {
            prop_assert!(!m.matches(&beside));
        }
    }

    /// A regex built from an escaped literal matches exactly that literal
    /// (Envoy's whole-value match).
    #[test]
    fn escaped_regex_is_exact(e in text(), v in text()) {
        let re = crate::route::Regex::new(&regex::escape(&e)).unwrap();
        let m = StringMatch::Regex(re);
        prop_assert!(m.matches(&e));
        prop_assert_eq!(m.matches(&v), e == v);
    }
}

// ---------------------------------------------------------------------------
// Authorization: adding policies.

const NAMESPACES: [&str; 3] = ["default", "foo", "bar"];
const ACCOUNTS: [&str; 2] = ["sleep", "productpage"];

/// A policy in `default` over a small vocabulary, so that rules and
/// requests meet often: sources by namespace, principal or IP block,
/// operations by method, path or port, with their `not*` forms.
fn policy(action: Action) -> impl Strategy<Value = AuthzPolicy> {
    let source = (
        vec(select(NAMESPACES.to_vec()), 0..2),
        vec(select(NAMESPACES.to_vec()), 0..2),
        vec(select(ACCOUNTS.to_vec()), 0..2),
        vec(select(vec!["10.1.0.0/16", "10.2.0.5", "0.0.0.0/0"]), 0..2),
    )
        .prop_map(|(ns, not_ns, sa, ips)| authz::Source {
            namespaces: ns.into_iter().map(str::to_owned).collect(),
            not_namespaces: not_ns.into_iter().map(str::to_owned).collect(),
            principals: sa
                .into_iter()
                .map(|sa| format!("cluster.local/ns/default/sa/{sa}"))
                .collect(),
            ip_blocks: ips.into_iter().map(str::to_owned).collect(),
            ..Default::default()
        });
    let operation = (
        vec(select(vec!["GET", "POST"]), 0..2),
        vec(select(vec!["/api", "/api/*", "/admin"]), 0..2),
        vec(select(vec!["/admin"]), 0..2),
        vec(select(vec!["80", "9080"]), 0..2),
    )
        .prop_map(|(methods, paths, not_paths, ports)| authz::Operation {
            methods: methods.into_iter().map(str::to_owned).collect(),
            paths: paths.into_iter().map(str::to_owned).collect(),
            not_paths: not_paths.into_iter().map(str::to_owned).collect(),
            ports: ports.into_iter().map(str::to_owned).collect(),
            ..Default::default()
        });
    let rule = (vec(source, 0..2), vec(operation, 0..2)).prop_map(|(from, to)| authz::Rule {
        from: from.into_iter().map(|source| authz::RuleFrom { source }).collect(),
        to: to.into_iter().map(|operation| authz::RuleTo { operation }).collect(),
        when: Vec::new(),
    });
    (vec(rule, 0..3), 0u32..1000)
        .prop_map(move |(rules, n)| AuthzPolicy {
            name: format!("p{n}"),
            namespace: "default".into(),
            spec: authz::AuthorizationPolicySpec {
                action,
                rules,
                ..Default::default()
            },
        })
        // An empty `source` or `operation` is refused: keep to accepted policies.
        .prop_filter("accepted by validate", |p| authz::validate(p).is_empty())
}

#[derive(Clone, Debug)]
struct Req {
    peer: Option<(&'static str, &'static str)>,
    ip: Ipv4Addr,
    port: u16,
    http: Option<(&'static str, &'static str)>,
}

fn request() -> impl Strategy<Value = Req> {
    (
        proptest::option::of((select(NAMESPACES.to_vec()), select(ACCOUNTS.to_vec()))),
        select(vec![
            Ipv4Addr::new(10, 1, 2, 3),
            Ipv4Addr::new(10, 2, 0, 5),
            Ipv4Addr::new(192, 168, 0, 1),
        ]),
        select(vec![80u16, 9080, 443]),
        proptest::option::of((
            select(vec!["GET", "POST", "DELETE"]),
            select(vec!["/api", "/api/v1", "/admin", "/"]),
        )),
    )
        .prop_map(|(peer, ip, port, http)| Req { peer, ip, port, http })
}

/// Evaluates `policies` on `r`; true when allowed, and the deny reason.
fn decide(policies: &[AuthzPolicy], r: &Req) -> (bool, Option<DenyReason>) {
    let principal = r.peer.map(|(ns, sa)| format!("spiffe://cluster.local/ns/{ns}/sa/{sa}"));
    let headers = HeaderPairs(&[]);
    let req = authz::Request {
        source_principal: principal.as_deref(),
        source_namespace: r.peer.map(|(ns, _)| ns),
        source_ip: IpAddr::V4(r.ip),
        destination_ip: IpAddr::V4(Ipv4Addr::new(10, 1, 9, 9)),
        destination_port: r.port,
        sni: None,
        http: r.http.map(|(method, path)| HttpAttrs {
            method,
            path,
            host: "reviews",
            headers: &headers,
        }),
    };
    let refs: Vec<&AuthzPolicy> = policies.iter().collect();
    match authz::evaluate(&refs, &req).verdict {
        Verdict::Allow { .. } => (true, None),
        Verdict::Deny { reason, .. } => (false, Some(reason)),
    }
}

fn mixed_policies() -> impl Strategy<Value = Vec<AuthzPolicy>> {
    vec(prop_oneof![policy(Action::Allow), policy(Action::Deny)], 0..4)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Every generated policy is one Ferry accepts (so the laws below are
    /// about accepted policies).
    #[test]
    fn generated_policies_validate(p in prop_oneof![policy(Action::Allow), policy(Action::Deny)]) {
        prop_assert_eq!(authz::validate(&p), Vec::<String>::new());
    }

    /// Adding a DENY policy never turns a denied request into an allowed one.
    #[test]
    fn adding_a_deny_never_allows(policies in mixed_policies(), deny in policy(Action::Deny), r in request()) {
        let (allowed, _) = decide(&policies, &r);
        let mut more = policies.clone();
        more.push(deny);
        let (allowed_after, _) = decide(&more, &r);
        prop_assert!(allowed || !allowed_after, "a DENY policy turned deny into allow");
    }

    /// Adding an ALLOW policy never allows a request that a DENY policy
    /// already denied (DENY is checked before ALLOW).
    #[test]
    fn adding_an_allow_never_overrides_a_deny(policies in mixed_policies(), allow in policy(Action::Allow), r in request()) {
        let (allowed, reason) = decide(&policies, &r);
        let denied_by_deny = !allowed
            && matches!(reason, Some(DenyReason::MatchedDeny | DenyReason::L7DenyOnL4 | DenyReason::UnsupportedDeny));
        let mut more = policies.clone();
        more.push(allow);
        let (allowed_after, reason_after) = decide(&more, &r);
        if denied_by_deny {
            prop_assert!(!allowed_after);
            prop_assert_eq!(reason_after, reason);
        }
    }

    /// With no policy at all, everything is allowed.
    #[test]
    fn no_policy_allows(r in request()) {
        prop_assert!(decide(&[], &r).0);
    }
}

// ---------------------------------------------------------------------------
// The config stream: model -> wire -> model.

#[cfg(feature = "proto")]
mod wire {
    use std::collections::BTreeMap;

    use super::*;
    use crate::{
        config::{ConfigFile, Endpoint, Service, ServicePort, Workload},
        proto::{self, HeldResources},
        protocol::Protocol,
        route::{
            Backend, HttpMatch, HttpRoute, Regex, RetryOn, RetryPolicy, RouteKind, RouteOrigin, ServiceRouting, Subset,
            TcpRoute,
        },
        Settings,
    };

    fn name() -> impl Strategy<Value = String> {
        "[a-z][a-z0-9-]{0,6}"
    }

    fn labels() -> impl Strategy<Value = BTreeMap<String, String>> {
        proptest::collection::btree_map(name(), name(), 0..3)
    }

    fn workloads() -> impl Strategy<Value = Vec<Workload>> {
        vec(
            (
                name(),
                name(),
                name(),
                select(vec!["n1", "n2"]),
                any::<bool>(),
                labels(),
            ),
            0..4,
        )
        .prop_map(|ws| {
            ws.into_iter()
                .enumerate()
                .map(|(i, (name, namespace, sa, node, enrolled, labels))| Workload {
                    uid: format!("uid-{i}"),
                    name,
                    namespace,
                    service_account: sa,
                    node: node.into(),
                    ip: Ipv4Addr::new(10, 1, 0, i as u8 + 2),
                    enrolled,
                    labels,
                    netns: None,
                    host_veth: None,
                    workload_name: None,
                    locality: (i % 2 == 0).then(|| format!("r{i}/z{i}/s")),
                })
                .collect()
        })
    }

    fn services() -> impl Strategy<Value = Vec<Service>> {
        let ports = proptest::collection::btree_map(
            1u16..,
            (1u16.., proptest::option::of(name()), select(Protocol::ALL.to_vec())),
            1..4,
        );
        let endpoints = vec((any::<u32>(), any::<bool>()), 0..3);
        vec((name(), name(), ports, endpoints), 0..4).prop_map(|ss| {
            ss.into_iter()
                .enumerate()
                .map(|(i, (name, namespace, ports, endpoints))| Service {
                    name,
                    namespace,
                    vip: Ipv4Addr::new(10, 96, 0, i as u8 + 1),
                    ports: ports
                        .into_iter()
                        .map(|(port, (target_port, name, protocol))| ServicePort {
                            port,
                            target_port,
                            name,
                            protocol,
                        })
                        .collect(),
                    endpoints: endpoints
                        .into_iter()
                        .map(|(ip, ready)| Endpoint { ip: ip.into(), ready })
                        .collect(),
                })
                .collect()
        })
    }

    fn string_match() -> impl Strategy<Value = StringMatch> {
        prop_oneof![
            name().prop_map(StringMatch::Exact),
            name().prop_map(StringMatch::Prefix),
            name().prop_map(|n| StringMatch::PathPrefix(format!("/{n}"))),
            select(vec!["/v[0-9]+", "a|b", ".*"]).prop_map(|r| StringMatch::Regex(Regex::new(r).unwrap())),
            Just(StringMatch::Present),
        ]
    }

    fn http_match() -> impl Strategy<Value = HttpMatch> {
        (
            proptest::option::of(string_match()),
            proptest::option::of(string_match()),
            proptest::collection::btree_map(name(), string_match(), 0..2),
            proptest::collection::btree_map(name(), string_match(), 0..2),
            proptest::option::of(1u16..),
            labels(),
            proptest::option::of(name()),
            any::<bool>(),
        )
            .prop_map(
                |(uri, method, headers, query_params, port, source_labels, source_namespace, ignore_uri_case)| {
                    HttpMatch {
                        uri,
                        method,
                        authority: None,
                        headers,
                        without_headers: BTreeMap::new(),
                        query_params,
                        port,
                        source_labels,
                        source_namespace,
                        ignore_uri_case,
                    }
                },
            )
    }

    fn backend() -> impl Strategy<Value = Backend> {
        (
            name(),
            name(),
            proptest::option::of(1u16..),
            proptest::option::of(name()),
            any::<u32>(),
        )
            .prop_map(|(ns, n, port, subset, weight)| Backend {
                service: format!("{ns}/{n}"),
                port,
                subset,
                weight,
                request_headers: Default::default(),
                response_headers: Default::default(),
            })
    }

    fn retry_on() -> impl Strategy<Value = RetryOn> {
        prop_oneof![
            select(vec![
                RetryOn::FiveXx,
                RetryOn::GatewayError,
                RetryOn::Reset,
                RetryOn::ConnectFailure,
                RetryOn::RefusedStream,
                RetryOn::RetriableStatus4xx,
                RetryOn::Cancelled,
                RetryOn::DeadlineExceeded,
                RetryOn::Internal,
                RetryOn::ResourceExhausted,
                RetryOn::Unavailable,
            ]),
            (100u16..600).prop_map(RetryOn::Status),
        ]
    }

    fn http_route() -> impl Strategy<Value = HttpRoute> {
        (
            name(),
            vec(http_match(), 0..3),
            vec(backend(), 1..3),
            proptest::option::of(any::<u64>()),
            proptest::option::of((any::<u32>(), proptest::option::of(any::<u64>()), vec(retry_on(), 0..3))),
        )
            .prop_map(|(name, matches, backends, timeout_ms, retries)| HttpRoute {
                name,
                matches,
                backends,
                timeout_ms,
                retries: retries.map(|(attempts, per_try_timeout_ms, retry_on)| RetryPolicy {
                    attempts,
                    per_try_timeout_ms,
                    retry_on,
                }),
                ..Default::default()
            })
    }

    fn routes() -> impl Strategy<Value = Vec<ServiceRouting>> {
        let origin = (
            select(vec![
                RouteKind::VirtualService,
                RouteKind::HttpRoute,
                RouteKind::GrpcRoute,
                RouteKind::TcpRoute,
            ]),
            name(),
            name(),
        )
            .prop_map(|(kind, namespace, name)| RouteOrigin { kind, namespace, name });
        let tcp = (proptest::option::of(1u16..), labels(), vec(backend(), 0..3)).prop_map(
            |(port, source_labels, backends)| TcpRoute {
                port,
                source_labels,
                backends,
            },
        );
        let subsets = proptest::collection::btree_map(
            name(),
            vec(
                (name(), labels()).prop_map(|(name, labels)| Subset { name, labels }),
                0..3,
            ),
            0..2,
        );
        vec(
            (vec(origin, 0..2), vec(http_route(), 0..3), vec(tcp, 0..2), subsets),
            0..3,
        )
        .prop_map(|rs| {
            rs.into_iter()
                .enumerate()
                .map(|(i, (origins, http, tcp, subsets))| ServiceRouting {
                    service: format!("ns/svc-{i}"),
                    origins,
                    http,
                    tcp,
                    subsets,
                })
                .collect()
        })
    }

    fn config() -> impl Strategy<Value = ConfigFile> {
        (workloads(), services(), routes()).prop_map(|(workloads, services, routes)| ConfigFile {
            node: "n1".into(),
            settings: Settings::default(),
            workloads,
            services,
            routes,
            ..Default::default()
        })
    }

    /// The control plane's encoding of a config, as the agent holds it.
    fn on_the_wire(c: &ConfigFile) -> HeldResources {
        let mut held = HeldResources::default();
        let kinds = c
            .workloads
            .iter()
            .map(proto::workload_to)
            .chain(c.services.iter().map(proto::service_to))
            .chain(c.routes.iter().map(proto::routing_to));
        for k in kinds {
            let r = proto::resource(k);
            held.0.insert(r.name.clone(), r);
        }
        held
    }

    /// Sorted by their Debug text: the wire holds resources by name, so the
    /// order coming back is the names' order.
    fn sorted<T: std::fmt::Debug + Clone>(v: &[T]) -> Vec<T> {
        let mut v = v.to_vec();
        v.sort_by_key(|x| format!("{x:?}"));
        v
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// model -> wire (prost bytes, as sent) -> model gives the same config.
        #[test]
        fn config_round_trips_through_the_wire(c in config()) {
            use prost::Message;
            prop_assert_eq!(c.validate(), Vec::<String>::new());
            let held = on_the_wire(&c);
            // Through the bytes, as the stream carries them.
            let resp = ferry_api::discovery::DiscoveryResponse {
                resources: held.0.values().cloned().collect(),
                ..Default::default()
            };
            let bytes = resp.encode_to_vec();
            let decoded = ferry_api::discovery::DiscoveryResponse::decode(bytes.as_slice()).unwrap();
            let back = HeldResources::default()
                .with(&decoded)
                .to_config("n1", &c.settings)
                .map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
            prop_assert_eq!(sorted(&back.workloads), sorted(&c.workloads));
            prop_assert_eq!(sorted(&back.services), sorted(&c.services));
            prop_assert_eq!(sorted(&back.routes), sorted(&c.routes));
            // And the digest (the resource version) is a function of content.
            prop_assert_eq!(on_the_wire(&back).versions(), held.versions());
        }
    }
}

/// Writes the config_stream fuzz target's seeds: the `model_config` seeds
/// (fuzz/seeds/model_config/*.yaml) encoded as the control plane sends them,
/// one `DiscoveryResponse` each, plus one lone `Resource` per kind. Run by
/// hand when the wire format changes:
/// `FERRY_FUZZ_SEEDS=fuzz/seeds cargo test -p ferry-model --features proto -- --ignored write_fuzz_seeds`
#[cfg(feature = "proto")]
#[test]
#[ignore = "writes files; run by hand (see its doc)"]
fn write_fuzz_seeds() {
    use prost::Message;

    use crate::proto;

    let Ok(root) = std::env::var("FERRY_FUZZ_SEEDS") else {
        return;
    };
    let root = std::path::Path::new(&root);
    let out = root.join("config_stream");
    std::fs::create_dir_all(&out).unwrap();
    let mut dir: Vec<_> = std::fs::read_dir(root.join("model_config"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    dir.sort();
    for path in dir {
        let text = std::fs::read_to_string(&path).unwrap();
        let c = crate::ConfigFile::parse(&path.display().to_string(), &text).unwrap();
        let resources: Vec<_> = c
            .workloads
            .iter()
            .map(proto::workload_to)
            .chain(c.services.iter().map(proto::service_to))
            .chain(c.peer_authentications.iter().map(proto::peer_authentication_to))
            .chain(c.routes.iter().map(proto::routing_to))
            .map(proto::resource)
            .collect();
        let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
        for r in &resources {
            let kind = r.name.split('/').next().unwrap_or("resource");
            std::fs::write(out.join(format!("{stem}-{kind}.resource")), r.encode_to_vec()).unwrap();
        }
        let resp = ferry_api::discovery::DiscoveryResponse {
            nonce: "1".into(),
            system_version: 1,
            resources,
            removed: vec!["workload/gone".into()],
        };
        std::fs::write(out.join(format!("{stem}.response")), resp.encode_to_vec()).unwrap();
    }
}
