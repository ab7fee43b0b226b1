//! The config stream's wire messages (api/proto/ferry/discovery.proto) and
//! the model, both ways: the control plane encodes with the `*_to`
//! functions; an agent keeps the resources it holds ([`HeldResources`]),
//! applies a response to them and turns them back into a validated config
//! (a rejected response leaves the previous state).

use std::{collections::BTreeMap, net::Ipv4Addr};

mod ratelimit;
mod traffic;

use ferry_api::discovery as pb;
use sha2::{Digest, Sha256};

use crate::{
    authz::{self, AuthzPolicy},
    config::{ConfigFile, Endpoint, PendingPod, Service, ServicePort, Settings, Workload},
    peer_auth::{self as policy, PeerAuthentication},
    protocol::Protocol,
    route::{self, ServiceRouting},
};

/// Resource name prefixes (one per kind).
pub const WORKLOAD: &str = "workload/";
/// `pendingpod/<uid>`: a pod of the node without an address yet.
pub const PENDING_POD: &str = "pendingpod/";
pub const SERVICE: &str = "service/";
pub const PEER_AUTHENTICATION: &str = "peerauthentication/";
/// `routing/<namespace>/<name>` of the routed Service: one per Service.
pub const SERVICE_ROUTING: &str = "routing/";
/// `authorizationpolicy/<namespace>/<name>`.
pub const AUTHORIZATION_POLICY: &str = "authorizationpolicy/";
/// `trafficpolicy/<namespace>/<name>` of the Service: one per Service.
pub const TRAFFIC_POLICY: &str = "trafficpolicy/";

/// The resources a node holds, by name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HeldResources(pub BTreeMap<String, pb::Resource>);

impl HeldResources {
    /// Name -> version: what a reconnecting agent tells the control plane.
    pub fn versions(&self) -> BTreeMap<String, String> {
        self.0.iter().map(|(n, r)| (n.clone(), r.version.clone())).collect()
    }

    /// The resources after `resp` (checked by [`HeldResources::to_config`]).
    pub fn with(&self, resp: &pb::DiscoveryResponse) -> Self {
        let mut next = self.clone();
        for name in &resp.removed {
            next.0.remove(name);
        }
        for r in &resp.resources {
            next.0.insert(r.name.clone(), r.clone());
        }
        next
    }

    /// The node's config: these resources plus its local settings. Every
    /// problem is listed (a NACK carries them all).
    pub fn to_config(&self, node: &str, settings: &Settings) -> Result<ConfigFile, Vec<String>> {
        let mut cfg = ConfigFile {
            node: node.to_owned(),
            settings: settings.clone(),
            ..Default::default()
        };
        let mut problems = Vec::new();
        for (name, r) in &self.0 {
            let res = match &r.kind {
                Some(pb::resource::Kind::Workload(w)) => workload_from(w).map(|w| cfg.workloads.push(w)),
                Some(pb::resource::Kind::PendingPod(p)) => {
                    cfg.pending_pods.push(pending_pod_from(p));
                    Ok(())
                }
                Some(pb::resource::Kind::Service(s)) => service_from(s).map(|s| cfg.services.push(s)),
                Some(pb::resource::Kind::PeerAuthentication(p)) => {
                    peer_authentication_from(p).map(|p| cfg.peer_authentications.push(p))
                }
                Some(pb::resource::Kind::ServiceRouting(r)) => routing_from(r).map(|r| cfg.routes.push(r)),
                Some(pb::resource::Kind::AuthorizationPolicy(p)) => {
                    authorization_policy_from(p).map(|p| cfg.authorization_policies.push(p))
                }
                Some(pb::resource::Kind::TrafficPolicy(p)) => {
                    traffic::service_policy_from(p).map(|p| cfg.traffic_policies.push(p))
                }
                Some(pb::resource::Kind::RateLimit(p)) => {
                    ratelimit::rate_limit_from(p).map(|p| cfg.rate_limits.push(p))
                }
                None => Err("no content (unknown kind?)".to_owned()),
            };
            if let Err(e) = res {
                problems.push(format!("{name}: {e}"));
            }
        }
        problems.extend(cfg.validate());
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(problems)
        }
    }
}

/// A resource with its name and content digest filled in.
pub fn resource(kind: pb::resource::Kind) -> pb::Resource {
    use prost::Message;
    let name = match &kind {
        pb::resource::Kind::Workload(w) => format!("{WORKLOAD}{}", w.uid),
        pb::resource::Kind::PendingPod(p) => format!("{PENDING_POD}{}", p.uid),
        pb::resource::Kind::Service(s) => format!("{SERVICE}{}/{}", s.namespace, s.name),
        pb::resource::Kind::PeerAuthentication(p) => format!("{PEER_AUTHENTICATION}{}/{}", p.namespace, p.name),
        pb::resource::Kind::ServiceRouting(r) => format!("{SERVICE_ROUTING}{}", r.service),
        pb::resource::Kind::AuthorizationPolicy(p) => authorization_policy_name(&p.namespace, &p.name),
        pb::resource::Kind::TrafficPolicy(p) => traffic_policy_name(&p.service),
        pb::resource::Kind::RateLimit(p) => rate_limit_name(&p.namespace, &p.name),
    };
    let mut r = pb::Resource {
        name,
        version: String::new(),
        kind: Some(kind),
    };
    // Maps encode in key order (btree_map in api/build.rs): equal content, equal digest.
    let digest = Sha256::digest(r.encode_to_vec());
    r.version = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    r
}

pub fn workload_to(w: &Workload) -> pb::resource::Kind {
    pb::resource::Kind::Workload(pb::Workload {
        uid: w.uid.clone(),
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        service_account: w.service_account.clone(),
        node: w.node.clone(),
        ip: w.ip.to_string(),
        enrolled: w.enrolled,
        labels: w.labels.clone(),
        workload_name: w.workload_name.clone().unwrap_or_default(),
        locality: w.locality.clone().unwrap_or_default(),
    })
}

pub fn pending_pod_to(p: &PendingPod) -> pb::resource::Kind {
    pb::resource::Kind::PendingPod(pb::PendingPod {
        uid: p.uid.clone(),
        name: p.name.clone(),
        namespace: p.namespace.clone(),
        service_account: p.service_account.clone(),
        node: p.node.clone(),
        enrolled: p.enrolled,
        labels: p.labels.clone(),
        workload_name: p.workload_name.clone().unwrap_or_default(),
        locality: p.locality.clone().unwrap_or_default(),
    })
}

/// Field for field (validated with the rest of the config: its node must be
/// the receiving one).
fn pending_pod_from(p: &pb::PendingPod) -> PendingPod {
    PendingPod {
        uid: p.uid.clone(),
        name: p.name.clone(),
        namespace: p.namespace.clone(),
        service_account: p.service_account.clone(),
        node: p.node.clone(),
        enrolled: p.enrolled,
        labels: p.labels.clone(),
        workload_name: (!p.workload_name.is_empty()).then(|| p.workload_name.clone()),
        locality: (!p.locality.is_empty()).then(|| p.locality.clone()),
    }
}

fn ip(what: &str, s: &str) -> Result<Ipv4Addr, String> {
    s.parse().map_err(|_| format!("{what}: {s:?} is not an IPv4 address"))
}

fn port(what: &str, p: u32) -> Result<u16, String> {
    u16::try_from(p)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{what}: {p} is not a port"))
}

fn workload_from(w: &pb::Workload) -> Result<Workload, String> {
    Ok(Workload {
        uid: w.uid.clone(),
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        service_account: w.service_account.clone(),
        node: w.node.clone(),
        ip: ip("ip", &w.ip)?,
        enrolled: w.enrolled,
        labels: w.labels.clone(),
        // Found on the node from the pod's cgroup (its processes' netns).
        netns: None,
        host_veth: None,
        workload_name: (!w.workload_name.is_empty()).then(|| w.workload_name.clone()),
        locality: (!w.locality.is_empty()).then(|| w.locality.clone()),
    })
}

pub fn service_to(s: &Service) -> pb::resource::Kind {
    pb::resource::Kind::Service(pb::Service {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        vip: s.vip.to_string(),
        ports: s
            .ports
            .iter()
            .map(|p| pb::ServicePort {
                port: p.port.into(),
                target_port: p.target_port.into(),
                name: p.name.clone().unwrap_or_default(),
                protocol: p.protocol.as_str().to_owned(),
            })
            .collect(),
        endpoints: s
            .endpoints
            .iter()
            .map(|e| pb::Endpoint {
                ip: e.ip.to_string(),
                ready: e.ready,
            })
            .collect(),
    })
}

fn service_from(s: &pb::Service) -> Result<Service, String> {
    let ports = s
        .ports
        .iter()
        .map(|p| {
            Ok(ServicePort {
                port: port("port", p.port)?,
                target_port: port("targetPort", p.target_port)?,
                name: (!p.name.is_empty()).then(|| p.name.clone()),
                // Empty: from a control plane that did not send one.
                protocol: match p.protocol.as_str() {
                    "" => Protocol::Auto,
                    other => other
                        .parse()
                        .map_err(|e: crate::protocol::UnknownProtocol| format!("port {}: {e}", p.port))?,
                },
            })
        })
        .collect::<Result<_, String>>()?;
    let endpoints = s
        .endpoints
        .iter()
        .map(|e| {
            Ok(Endpoint {
                ip: ip("endpoint", &e.ip)?,
                ready: e.ready,
            })
        })
        .collect::<Result<_, String>>()?;
    Ok(Service {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        vip: ip("vip", &s.vip)?,
        ports,
        endpoints,
    })
}

fn mode_name(m: policy::Mode) -> String {
    match m {
        policy::Mode::Unset => "UNSET",
        policy::Mode::Permissive => "PERMISSIVE",
        policy::Mode::Strict => "STRICT",
        policy::Mode::Disable => "DISABLE",
    }
    .into()
}

fn mode_from(s: &str) -> Result<policy::Mode, String> {
    Ok(match s {
        "" | "UNSET" => policy::Mode::Unset,
        "PERMISSIVE" => policy::Mode::Permissive,
        "STRICT" => policy::Mode::Strict,
        "DISABLE" => policy::Mode::Disable,
        other => return Err(format!("mode {other:?} is not UNSET, PERMISSIVE, STRICT or DISABLE")),
    })
}

pub fn peer_authentication_to(p: &PeerAuthentication) -> pb::resource::Kind {
    pb::resource::Kind::PeerAuthentication(pb::PeerAuthentication {
        name: p.metadata.name.clone(),
        namespace: p.namespace().to_owned(),
        match_labels: p
            .spec
            .selector
            .as_ref()
            .map(|s| s.match_labels.clone())
            .unwrap_or_default(),
        mode: mode_name(p.spec.mtls.as_ref().map_or(policy::Mode::Unset, |m| m.mode)),
        port_level_modes: p
            .spec
            .port_level_mtls
            .iter()
            .map(|(k, m)| (k.clone(), mode_name(m.mode)))
            .collect(),
    })
}

fn peer_authentication_from(p: &pb::PeerAuthentication) -> Result<PeerAuthentication, String> {
    let mut port_level_mtls = BTreeMap::new();
    for (k, m) in &p.port_level_modes {
        port_level_mtls.insert(k.clone(), policy::Mtls { mode: mode_from(m)? });
    }
    Ok(PeerAuthentication {
        api_version: "security.istio.io/v1beta1".into(),
        kind: "PeerAuthentication".into(),
        metadata: policy::Metadata {
            name: p.name.clone(),
            namespace: Some(p.namespace.clone()),
            ..Default::default()
        },
        spec: policy::PeerAuthenticationSpec {
            // An empty selector in Istio means the whole namespace, as does none.
            selector: (!p.match_labels.is_empty()).then(|| policy::Selector {
                match_labels: p.match_labels.clone(),
            }),
            mtls: Some(policy::Mtls {
                mode: mode_from(&p.mode)?,
            }),
            port_level_mtls,
        },
    })
}

/// The resource name of AuthorizationPolicy `namespace/name`.
pub fn authorization_policy_name(namespace: &str, name: &str) -> String {
    format!("{AUTHORIZATION_POLICY}{namespace}/{name}")
}

/// Field for field (the agent validates it again with `authz::validate`,
/// through `ConfigFile::validate`).
pub fn authorization_policy_to(p: &AuthzPolicy) -> pb::resource::Kind {
    use pb::authorization_policy::Action as A;
    let spec = &p.spec;
    let target = |r: &authz::TargetRef| pb::PolicyTargetReference {
        group: r.group.clone(),
        kind: r.kind.clone(),
        name: r.name.clone(),
        namespace: r.namespace.clone(),
    };
    pb::resource::Kind::AuthorizationPolicy(pb::AuthorizationPolicy {
        name: p.name.clone(),
        namespace: p.namespace.clone(),
        selector: spec.selector.as_ref().map(|s| pb::WorkloadSelector {
            match_labels: s.match_labels.clone(),
        }),
        target_ref: spec.target_ref.as_ref().map(target),
        target_refs: spec.target_refs.iter().map(target).collect(),
        action: match spec.action {
            authz::Action::Allow => A::Allow,
            authz::Action::Deny => A::Deny,
            authz::Action::Audit => A::Audit,
            authz::Action::Custom => A::Custom,
        }
        .into(),
        provider: spec
            .provider
            .as_ref()
            .map(|p| pb::ExtensionProvider { name: p.name.clone() }),
        rules: spec.rules.iter().map(authz_rule_to).collect(),
    })
}

fn authz_rule_to(r: &authz::Rule) -> pb::AuthorizationRule {
    use pb::authorization_rule as rule;
    pb::AuthorizationRule {
        from: r
            .from
            .iter()
            .map(|f| {
                let s = &f.source;
                rule::From {
                    source: Some(pb::AuthorizationSource {
                        principals: s.principals.clone(),
                        not_principals: s.not_principals.clone(),
                        request_principals: s.request_principals.clone(),
                        not_request_principals: s.not_request_principals.clone(),
                        namespaces: s.namespaces.clone(),
                        not_namespaces: s.not_namespaces.clone(),
                        service_accounts: s.service_accounts.clone(),
                        not_service_accounts: s.not_service_accounts.clone(),
                        ip_blocks: s.ip_blocks.clone(),
                        not_ip_blocks: s.not_ip_blocks.clone(),
                        remote_ip_blocks: s.remote_ip_blocks.clone(),
                        not_remote_ip_blocks: s.not_remote_ip_blocks.clone(),
                    }),
                }
            })
            .collect(),
        to: r
            .to
            .iter()
            .map(|t| {
                let o = &t.operation;
                rule::To {
                    operation: Some(pb::AuthorizationOperation {
                        hosts: o.hosts.clone(),
                        not_hosts: o.not_hosts.clone(),
                        ports: o.ports.clone(),
                        not_ports: o.not_ports.clone(),
                        methods: o.methods.clone(),
                        not_methods: o.not_methods.clone(),
                        paths: o.paths.clone(),
                        not_paths: o.not_paths.clone(),
                    }),
                }
            })
            .collect(),
        when: r
            .when
            .iter()
            .map(|c| pb::AuthorizationCondition {
                key: c.key.clone(),
                values: c.values.clone(),
                not_values: c.not_values.clone(),
            })
            .collect(),
    }
}

fn authorization_policy_from(p: &pb::AuthorizationPolicy) -> Result<AuthzPolicy, String> {
    use pb::authorization_policy::Action as A;
    let target = |r: &pb::PolicyTargetReference| authz::TargetRef {
        group: r.group.clone(),
        kind: r.kind.clone(),
        name: r.name.clone(),
        namespace: r.namespace.clone(),
    };
    let action = match A::try_from(p.action) {
        Ok(A::Allow) => authz::Action::Allow,
        Ok(A::Deny) => authz::Action::Deny,
        Ok(A::Audit) => authz::Action::Audit,
        Ok(A::Custom) => authz::Action::Custom,
        Err(_) => return Err(format!("action {} is not ALLOW, DENY, AUDIT or CUSTOM", p.action)),
    };
    let rules = p
        .rules
        .iter()
        .map(|r| authz::Rule {
            from: r
                .from
                .iter()
                .map(|f| {
                    let s = f.source.clone().unwrap_or_default();
                    authz::RuleFrom {
                        source: authz::Source {
                            principals: s.principals,
                            not_principals: s.not_principals,
                            request_principals: s.request_principals,
                            not_request_principals: s.not_request_principals,
                            namespaces: s.namespaces,
                            not_namespaces: s.not_namespaces,
                            service_accounts: s.service_accounts,
                            not_service_accounts: s.not_service_accounts,
                            ip_blocks: s.ip_blocks,
                            not_ip_blocks: s.not_ip_blocks,
                            remote_ip_blocks: s.remote_ip_blocks,
                            not_remote_ip_blocks: s.not_remote_ip_blocks,
                        },
                    }
                })
                .collect(),
            to: r
                .to
                .iter()
                .map(|t| {
                    let o = t.operation.clone().unwrap_or_default();
                    authz::RuleTo {
                        operation: authz::Operation {
                            hosts: o.hosts,
                            not_hosts: o.not_hosts,
                            ports: o.ports,
                            not_ports: o.not_ports,
                            methods: o.methods,
                            not_methods: o.not_methods,
                            paths: o.paths,
                            not_paths: o.not_paths,
                        },
                    }
                })
                .collect(),
            when: r
                .when
                .iter()
                .map(|c| authz::Condition {
                    key: c.key.clone(),
                    values: c.values.clone(),
                    not_values: c.not_values.clone(),
                })
                .collect(),
        })
        .collect();
    Ok(AuthzPolicy {
        name: p.name.clone(),
        namespace: p.namespace.clone(),
        spec: authz::AuthorizationPolicySpec {
            selector: p.selector.as_ref().map(|s| policy::Selector {
                match_labels: s.match_labels.clone(),
            }),
            target_ref: p.target_ref.as_ref().map(target),
            target_refs: p.target_refs.iter().map(target).collect(),
            action,
            provider: p.provider.as_ref().map(|x| authz::Provider { name: x.name.clone() }),
            rules,
        },
    })
}

/// The resource name of the traffic policy of Service `namespace/name`.
pub fn traffic_policy_name(service: &str) -> String {
    format!("{TRAFFIC_POLICY}{service}")
}

pub use traffic::service_policy_to as traffic_policy_to;

pub use ratelimit::{rate_limit_name, rate_limit_to, RATE_LIMIT_POLICY};

/// The resource name of the routes of Service `namespace/name`.
pub fn routing_name(service: &str) -> String {
    format!("{SERVICE_ROUTING}{service}")
}

pub fn routing_to(r: &ServiceRouting) -> pb::resource::Kind {
    pb::resource::Kind::ServiceRouting(pb::ServiceRouting {
        service: r.service.clone(),
        origins: r
            .origins
            .iter()
            .map(|o| pb::RouteOrigin {
                kind: o.kind.as_str().to_owned(),
                namespace: o.namespace.clone(),
                name: o.name.clone(),
            })
            .collect(),
        http: r.http.iter().map(http_route_to).collect(),
        tcp: r
            .tcp
            .iter()
            .map(|t| pb::TcpRoute {
                port: t.port.map(u32::from),
                source_labels: t.source_labels.clone(),
                backends: t.backends.iter().map(backend_to).collect(),
            })
            .collect(),
        subsets: r
            .subsets
            .iter()
            .map(|(svc, ss)| {
                let subsets = ss
                    .iter()
                    .map(|s| pb::Subset {
                        name: s.name.clone(),
                        labels: s.labels.clone(),
                    })
                    .collect();
                (svc.clone(), pb::SubsetList { subsets })
            })
            .collect(),
    })
}

fn http_route_to(h: &route::HttpRoute) -> pb::HttpRoute {
    pb::HttpRoute {
        name: h.name.clone(),
        matches: h.matches.iter().map(http_match_to).collect(),
        backends: h.backends.iter().map(backend_to).collect(),
        timeout_ms: h.timeout_ms,
        retries: h.retries.as_ref().map(|r| pb::RetryPolicy {
            attempts: r.attempts,
            per_try_timeout_ms: r.per_try_timeout_ms,
            retry_on: r.retry_on.iter().map(|c| retry_on_name(*c)).collect(),
        }),
        fault: h.fault.as_ref().map(|f| pb::Fault {
            delay: f.delay.as_ref().map(|d| pb::FaultDelay {
                delay_ms: d.delay_ms,
                percent: d.percent,
            }),
            abort: f.abort.as_ref().map(|a| pb::FaultAbort {
                status: Some(match a.status {
                    route::AbortStatus::Http(s) => pb::fault_abort::Status::HttpStatus(s.into()),
                    route::AbortStatus::Grpc(s) => pb::fault_abort::Status::GrpcStatus(s),
                }),
                percent: a.percent,
            }),
        }),
        mirrors: h
            .mirrors
            .iter()
            .map(|m| pb::Mirror {
                backend: Some(backend_to(&m.backend)),
                percent: m.percent,
            })
            .collect(),
        request_headers: header_ops_to(&h.request_headers),
        response_headers: header_ops_to(&h.response_headers),
        rewrite: h.rewrite.as_ref().map(|r| pb::Rewrite {
            prefix: r.prefix.clone(),
            full_path: r.full_path.clone(),
            authority: r.authority.clone(),
        }),
        redirect: h.redirect.as_ref().map(|r| pb::Redirect {
            scheme: r.scheme.clone(),
            authority: r.authority.clone(),
            port: r.port.map(u32::from),
            path: r.path.clone(),
            prefix: r.prefix.clone(),
            status: r.status.into(),
        }),
    }
}

fn http_match_to(m: &route::HttpMatch) -> pb::HttpMatch {
    let map =
        |m: &BTreeMap<String, route::StringMatch>| m.iter().map(|(k, v)| (k.clone(), string_match_to(v))).collect();
    pb::HttpMatch {
        uri: m.uri.as_ref().map(string_match_to),
        method: m.method.as_ref().map(string_match_to),
        authority: m.authority.as_ref().map(string_match_to),
        headers: map(&m.headers),
        without_headers: map(&m.without_headers),
        query_params: map(&m.query_params),
        port: m.port.map(u32::from),
        source_labels: m.source_labels.clone(),
        source_namespace: m.source_namespace.clone(),
        ignore_uri_case: m.ignore_uri_case,
    }
}

fn string_match_to(m: &route::StringMatch) -> pb::StringMatch {
    use pb::string_match::Kind;
    pb::StringMatch {
        kind: Some(match m {
            route::StringMatch::Exact(s) => Kind::Exact(s.clone()),
            route::StringMatch::Prefix(s) => Kind::Prefix(s.clone()),
            route::StringMatch::PathPrefix(s) => Kind::PathPrefix(s.clone()),
            route::StringMatch::Regex(r) => Kind::Regex(r.as_str().to_owned()),
            route::StringMatch::Present => Kind::Present(true),
        }),
    }
}

fn backend_to(b: &route::Backend) -> pb::Backend {
    pb::Backend {
        service: b.service.clone(),
        port: b.port.map(u32::from),
        subset: b.subset.clone(),
        weight: b.weight,
        request_headers: header_ops_to(&b.request_headers),
        response_headers: header_ops_to(&b.response_headers),
    }
}

fn header_ops_to(h: &route::HeaderOps) -> Option<pb::HeaderOps> {
    let pairs = |v: &[(String, String)]| {
        v.iter()
            .map(|(name, value)| pb::Header {
                name: name.clone(),
                value: value.clone(),
            })
            .collect()
    };
    (!h.is_empty()).then(|| pb::HeaderOps {
        set: pairs(&h.set),
        add: pairs(&h.add),
        remove: h.remove.clone(),
    })
}

/// Envoy's name of a retry condition (what [`route::RetryOn::parse`] reads).
pub fn retry_on_name(c: route::RetryOn) -> String {
    use route::RetryOn::*;
    match c {
        FiveXx => "5xx",
        GatewayError => "gateway-error",
        Reset => "reset",
        ConnectFailure => "connect-failure",
        RefusedStream => "refused-stream",
        RetriableStatus4xx => "retriable-4xx",
        Status(code) => return code.to_string(),
        Cancelled => "cancelled",
        DeadlineExceeded => "deadline-exceeded",
        Internal => "internal",
        ResourceExhausted => "resource-exhausted",
        Unavailable => "unavailable",
    }
    .to_owned()
}

/// Every problem of a wire ServiceRouting, joined (a NACK lists them all).
fn routing_from(r: &pb::ServiceRouting) -> Result<ServiceRouting, String> {
    let mut problems = Vec::new();
    let origins = r
        .origins
        .iter()
        .filter_map(|o| {
            let kind = match o.kind.as_str() {
                "VirtualService" => route::RouteKind::VirtualService,
                "HTTPRoute" => route::RouteKind::HttpRoute,
                "GRPCRoute" => route::RouteKind::GrpcRoute,
                "TCPRoute" => route::RouteKind::TcpRoute,
                other => {
                    problems.push(format!("origins: {other:?} is not a route kind"));
                    return None;
                }
            };
            Some(route::RouteOrigin {
                kind,
                namespace: o.namespace.clone(),
                name: o.name.clone(),
            })
        })
        .collect();
    let http = r
        .http
        .iter()
        .enumerate()
        .map(|(i, h)| http_route_from(h, &format!("http[{i}]"), &mut problems))
        .collect();
    let tcp = r
        .tcp
        .iter()
        .enumerate()
        .map(|(i, t)| route::TcpRoute {
            port: opt_port(&format!("tcp[{i}].port"), t.port, &mut problems),
            source_labels: t.source_labels.clone(),
            backends: t
                .backends
                .iter()
                .enumerate()
                .map(|(k, b)| backend_from(b, &format!("tcp[{i}].backends[{k}]"), &mut problems))
                .collect(),
        })
        .collect();
    let subsets = r
        .subsets
        .iter()
        .map(|(svc, l)| {
            let ss = l
                .subsets
                .iter()
                .map(|s| route::Subset {
                    name: s.name.clone(),
                    labels: s.labels.clone(),
                })
                .collect();
            (svc.clone(), ss)
        })
        .collect();
    if r.service
        .split_once('/')
        .is_none_or(|(ns, n)| ns.is_empty() || n.is_empty())
    {
        problems.push(format!("service: {:?} is not namespace/name", r.service));
    }
    if problems.is_empty() {
        Ok(ServiceRouting {
            service: r.service.clone(),
            origins,
            http,
            tcp,
            subsets,
        })
    } else {
        Err(problems.join("; "))
    }
}

fn opt_port(at: &str, p: Option<u32>, problems: &mut Vec<String>) -> Option<u16> {
    let p = p?;
    port(at, p).map_err(|e| problems.push(e)).ok()
}

fn percent(at: &str, v: f64, problems: &mut Vec<String>) -> f64 {
    if !(0.0..=100.0).contains(&v) {
        problems.push(format!("{at}: {v} is not a percentage (0-100)"));
    }
    v
}

fn http_route_from(h: &pb::HttpRoute, at: &str, problems: &mut Vec<String>) -> route::HttpRoute {
    let retries = h.retries.as_ref().map(|r| route::RetryPolicy {
        attempts: r.attempts,
        per_try_timeout_ms: r.per_try_timeout_ms,
        retry_on: r
            .retry_on
            .iter()
            .filter_map(|c| {
                route::RetryOn::parse(c)
                    .map_err(|e| problems.push(format!("{at}.retries: {e}")))
                    .ok()
            })
            .collect(),
    });
    let fault = h.fault.as_ref().map(|f| route::Fault {
        delay: f.delay.as_ref().map(|d| route::FaultDelay {
            delay_ms: d.delay_ms,
            percent: percent(&format!("{at}.fault.delay.percent"), d.percent, problems),
        }),
        abort: f.abort.as_ref().and_then(|a| {
            let status = match a.status {
                Some(pb::fault_abort::Status::HttpStatus(s)) => match u16::try_from(s) {
                    Ok(s) if (200..600).contains(&s) => route::AbortStatus::Http(s),
                    _ => {
                        problems.push(format!("{at}.fault.abort: {s} is not an HTTP status"));
                        return None;
                    }
                },
                Some(pb::fault_abort::Status::GrpcStatus(s)) => route::AbortStatus::Grpc(s),
                None => {
                    problems.push(format!("{at}.fault.abort: no status"));
                    return None;
                }
            };
            Some(route::FaultAbort {
                status,
                percent: percent(&format!("{at}.fault.abort.percent"), a.percent, problems),
            })
        }),
    });
    let mirrors = h
        .mirrors
        .iter()
        .enumerate()
        .filter_map(|(k, m)| {
            let at = format!("{at}.mirrors[{k}]");
            let Some(b) = &m.backend else {
                problems.push(format!("{at}: no backend"));
                return None;
            };
            Some(route::Mirror {
                backend: backend_from(b, &at, problems),
                percent: percent(&format!("{at}.percent"), m.percent, problems),
            })
        })
        .collect();
    let redirect = h.redirect.as_ref().map(|r| {
        let status = match u16::try_from(r.status) {
            Ok(s @ (301 | 302 | 303 | 307 | 308)) => s,
            _ => {
                problems.push(format!("{at}.redirect.status: {} is not a redirect status", r.status));
                301
            }
        };
        route::Redirect {
            scheme: r.scheme.clone(),
            authority: r.authority.clone(),
            port: opt_port(&format!("{at}.redirect.port"), r.port, problems),
            path: r.path.clone(),
            prefix: r.prefix.clone(),
            status,
        }
    });
    route::HttpRoute {
        name: h.name.clone(),
        matches: h
            .matches
            .iter()
            .enumerate()
            .map(|(k, m)| http_match_from(m, &format!("{at}.matches[{k}]"), problems))
            .collect(),
        backends: h
            .backends
            .iter()
            .enumerate()
            .map(|(k, b)| backend_from(b, &format!("{at}.backends[{k}]"), problems))
            .collect(),
        timeout_ms: h.timeout_ms,
        retries,
        fault,
        mirrors,
        request_headers: header_ops_from(h.request_headers.as_ref()),
        response_headers: header_ops_from(h.response_headers.as_ref()),
        rewrite: h.rewrite.as_ref().map(|r| route::Rewrite {
            prefix: r.prefix.clone(),
            full_path: r.full_path.clone(),
            authority: r.authority.clone(),
        }),
        redirect,
    }
}

fn http_match_from(m: &pb::HttpMatch, at: &str, problems: &mut Vec<String>) -> route::HttpMatch {
    let mut one = |what: &str, v: &Option<pb::StringMatch>| {
        v.as_ref()
            .and_then(|v| string_match_from(v, &format!("{at}.{what}"), problems))
    };
    let uri = one("uri", &m.uri);
    let method = one("method", &m.method);
    let authority = one("authority", &m.authority);
    let mut map = |what: &str, m: &BTreeMap<String, pb::StringMatch>| {
        m.iter()
            .filter_map(|(k, v)| Some((k.clone(), string_match_from(v, &format!("{at}.{what}[{k}]"), problems)?)))
            .collect()
    };
    route::HttpMatch {
        uri,
        method,
        authority,
        headers: map("headers", &m.headers),
        without_headers: map("withoutHeaders", &m.without_headers),
        query_params: map("queryParams", &m.query_params),
        port: opt_port(&format!("{at}.port"), m.port, problems),
        source_labels: m.source_labels.clone(),
        source_namespace: m.source_namespace.clone(),
        ignore_uri_case: m.ignore_uri_case,
    }
}

fn string_match_from(m: &pb::StringMatch, at: &str, problems: &mut Vec<String>) -> Option<route::StringMatch> {
    use pb::string_match::Kind;
    Some(match &m.kind {
        Some(Kind::Exact(s)) => route::StringMatch::Exact(s.clone()),
        Some(Kind::Prefix(s)) => route::StringMatch::Prefix(s.clone()),
        Some(Kind::PathPrefix(s)) => route::StringMatch::PathPrefix(s.clone()),
        Some(Kind::Regex(re)) => match route::Regex::new(re) {
            Ok(r) => route::StringMatch::Regex(r),
            Err(e) => {
                let e = e.to_string().split_whitespace().collect::<Vec<_>>().join(" ");
                problems.push(format!("{at}: regex {re:?}: {e}"));
                return None;
            }
        },
        Some(Kind::Present(_)) => route::StringMatch::Present,
        None => {
            problems.push(format!("{at}: no match kind"));
            return None;
        }
    })
}

fn backend_from(b: &pb::Backend, at: &str, problems: &mut Vec<String>) -> route::Backend {
    if b.service
        .split_once('/')
        .is_none_or(|(ns, n)| ns.is_empty() || n.is_empty())
    {
        problems.push(format!("{at}.service: {:?} is not namespace/name", b.service));
    }
    route::Backend {
        service: b.service.clone(),
        port: opt_port(&format!("{at}.port"), b.port, problems),
        subset: b.subset.clone(),
        weight: b.weight,
        request_headers: header_ops_from(b.request_headers.as_ref()),
        response_headers: header_ops_from(b.response_headers.as_ref()),
    }
}

fn header_ops_from(h: Option<&pb::HeaderOps>) -> route::HeaderOps {
    let Some(h) = h else { return route::HeaderOps::default() };
    let pairs = |v: &[pb::Header]| v.iter().map(|x| (x.name.clone(), x.value.clone())).collect();
    route::HeaderOps {
        set: pairs(&h.set),
        add: pairs(&h.add),
        remove: h.remove.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ConfigFile {
        ConfigFile::parse(
            "t",
            r#"
node: n1
workloads:
  - {uid: a, name: client, node: n1, ip: 10.1.1.2, enrolled: true, labels: {app: c, version: v1}}
pendingPods:
  - {uid: p, name: fresh, namespace: shop, serviceAccount: f, node: n1, enrolled: true, labels: {app: f}, workloadName: fresh, locality: r/z}
  - {uid: q, name: plain, node: n1}
services:
  - name: echo
    vip: 10.96.0.10
    ports: [{port: 80, targetPort: 8080, name: http, protocol: http}, {port: 81, targetPort: 81}]
    endpoints: [{ip: 10.1.2.2}, {ip: 10.1.2.3, ready: false}]
peerAuthentications:
  - metadata: {name: d, namespace: shop}
    spec: {selector: {matchLabels: {app: pay}}, mtls: {mode: STRICT}, portLevelMtls: {"8080": {mode: PERMISSIVE}}}
"#,
        )
        .unwrap()
    }

    fn resources(c: &ConfigFile) -> HeldResources {
        let mut r = HeldResources::default();
        let all = c
            .workloads
            .iter()
            .map(workload_to)
            .chain(c.pending_pods.iter().map(pending_pod_to))
            .chain(c.services.iter().map(service_to))
            .chain(c.peer_authentications.iter().map(peer_authentication_to))
            .chain(c.routes.iter().map(routing_to))
            .chain(c.authorization_policies.iter().map(authorization_policy_to))
            .chain(c.traffic_policies.iter().map(traffic_policy_to));
        for k in all {
            let res = resource(k);
            r.0.insert(res.name.clone(), res);
        }
        r
    }

    #[test]
    fn round_trips_through_the_wire_types() {
        let c = cfg();
        let back = resources(&c).to_config("n1", &c.settings).unwrap();
        assert_eq!(back.workloads, c.workloads);
        assert_eq!(back.pending_pods, c.pending_pods);
        assert!(resources(&c).0.contains_key("pendingpod/p"));
        assert_eq!(back.services, c.services);
        assert_eq!(
            back.peer_authentications[0].spec.selector,
            c.peer_authentications[0].spec.selector
        );
        assert_eq!(
            policy::mode_for(&c.workloads[0], &back.peer_authentications),
            policy::mode_for(&c.workloads[0], &c.peer_authentications)
        );
        assert_eq!(
            back.peer_authentications[0].spec.port_level_mtls,
            c.peer_authentications[0].spec.port_level_mtls
        );
    }

    #[test]
    fn an_unknown_protocol_on_the_wire_is_a_problem() {
        let c = cfg();
        let mut held = resources(&c);
        let r = held.0.get_mut("service/default/echo").unwrap();
        if let Some(pb::resource::Kind::Service(s)) = &mut r.kind {
            s.ports[0].protocol = "smtp".into();
        }
        let problems = held.to_config("n1", &c.settings).unwrap_err();
        assert!(
            problems
                .iter()
                .any(|p| p.contains("service/default/echo: port 80: \"smtp\" is not a protocol")),
            "{problems:?}"
        );
    }

    #[test]
    fn versions_are_content_digests() {
        let c = cfg();
        let a = resources(&c);
        let b = resources(&c);
        assert_eq!(a.versions(), b.versions(), "same content, same versions");
        let mut c2 = c.clone();
        c2.services[0].endpoints.pop();
        let d = resources(&c2);
        let changed: Vec<_> = a
            .versions()
            .into_iter()
            .filter(|(n, v)| d.versions()[n] != *v)
            .collect();
        assert_eq!(changed.len(), 1, "{changed:?}");
        assert_eq!(changed[0].0, "service/default/echo");
    }

    #[test]
    fn a_response_is_validated_as_a_whole() {
        let c = cfg();
        let held = resources(&c);
        // A second workload with the same IP, and a garbage address: both reported.
        let mut w = c.workloads[0].clone();
        w.uid = "b".into();
        let bad = resource(workload_to(&w));
        let mut garbage = resource(workload_to(&w));
        garbage.name = "workload/c".into();
        if let Some(pb::resource::Kind::Workload(w)) = &mut garbage.kind {
            w.uid = "c".into();
            w.ip = "10.1.1.999".into();
        }
        let resp = pb::DiscoveryResponse {
            nonce: "1".into(),
            system_version: 2,
            resources: vec![bad, garbage],
            removed: vec![],
        };
        let problems = held.with(&resp).to_config("n1", &c.settings).unwrap_err();
        assert!(
            problems.iter().any(|p| p.contains("workload/c: ip: \"10.1.1.999\"")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.contains("10.1.1.2 already used")),
            "{problems:?}"
        );
        // A pending pod of another node, or one that is also a workload: refused.
        let mut other = c.pending_pods[0].clone();
        other.node = "n2".into();
        let mut twice = c.pending_pods[1].clone();
        twice.uid = "a".into();
        let resp = pb::DiscoveryResponse {
            resources: vec![resource(pending_pod_to(&other)), resource(pending_pod_to(&twice))],
            ..Default::default()
        };
        let problems = held.with(&resp).to_config("n1", &c.settings).unwrap_err();
        assert!(
            problems
                .iter()
                .any(|p| p.contains("(shop/fresh).node: \"n2\" is not this node")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.contains("\"a\" already used by workloads")),
            "{problems:?}"
        );
        // Removal works and the held set is untouched by a rejected response.
        let resp = pb::DiscoveryResponse {
            removed: vec!["service/default/echo".into()],
            ..Default::default()
        };
        assert!(held
            .with(&resp)
            .to_config("n1", &c.settings)
            .unwrap()
            .services
            .is_empty());
        assert_eq!(held, resources(&c));
    }
}

#[cfg(test)]
mod authz_tests {
    use super::*;

    /// Every field of the policy model set at least once (across policies
    /// that each pass `authz::validate`), plus an empty selector and an
    /// empty spec, which must stay apart from absent ones.
    const POLICIES: &str = r#"
node: n1
authorizationPolicies:
  - name: full
    namespace: shop
    spec:
      selector: {matchLabels: {app: pay, version: v1}}
      action: DENY
      rules:
        - from:
            - source:
                principals: [cluster.local/ns/shop/sa/web, "*-admin"]
                notPrincipals: [cluster.local/ns/shop/sa/evil]
                namespaces: [shop]
                notNamespaces: [test]
                serviceAccounts: [shop/web, web]
                notServiceAccounts: [shop/bad]
                ipBlocks: [10.1.0.0/16]
                notIpBlocks: [10.1.9.9]
                remoteIpBlocks: [10.0.0.0/8]
                notRemoteIpBlocks: [10.2.0.0/16]
            - source: {namespaces: [ops]}
          to:
            - operation:
                hosts: [pay.shop, "*.example.com"]
                notHosts: [admin.example.com]
                ports: ["8080"]
                notPorts: ["9090"]
                methods: [GET, POST]
                notMethods: [DELETE]
                paths: [/api/*, /health]
                notPaths: [/api/admin]
          when:
            - {key: 'request.headers[x-user]', values: [alice], notValues: [mallory]}
            - {key: source.ip, values: [10.1.0.0/16]}
        - {}
  - name: by-service
    namespace: shop
    spec:
      targetRefs: [{kind: Service, name: pay}, {group: "", kind: Service, name: cart, namespace: shop}]
      action: AUDIT
      rules: [{to: [{operation: {ports: ["80"]}}]}]
  - name: legacy-ref
    namespace: shop
    spec:
      targetRef: {group: core, kind: Service, name: pay}
  - name: empty-selector
    namespace: shop
    spec: {selector: {}, action: ALLOW, rules: [{from: [{source: {namespaces: [shop]}}]}]}
  - name: allow-nothing
    namespace: istio-system
    spec: {}
"#;

    fn held(c: &ConfigFile) -> HeldResources {
        let mut r = HeldResources::default();
        for k in c.authorization_policies.iter().map(authorization_policy_to) {
            let res = resource(k);
            r.0.insert(res.name.clone(), res);
        }
        r
    }

    fn sorted(mut v: Vec<AuthzPolicy>) -> Vec<AuthzPolicy> {
        v.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        v
    }

    #[test]
    fn authorization_policies_round_trip_through_the_wire_types() {
        let c = ConfigFile::parse("t", POLICIES).unwrap();
        let held = held(&c);
        let names: Vec<&str> = held.0.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "authorizationpolicy/istio-system/allow-nothing",
                "authorizationpolicy/shop/by-service",
                "authorizationpolicy/shop/empty-selector",
                "authorizationpolicy/shop/full",
                "authorizationpolicy/shop/legacy-ref",
            ]
        );
        let back = held.to_config("n1", &c.settings).unwrap();
        assert_eq!(
            sorted(back.authorization_policies),
            sorted(c.authorization_policies.clone())
        );
        // Content digests: one changed field, one changed version.
        let mut c2 = c.clone();
        c2.authorization_policies[0].spec.rules[0].to[0].operation.methods.pop();
        let changed: Vec<_> = held
            .versions()
            .into_iter()
            .filter(|(n, v)| self::held(&c2).versions()[n] != *v)
            .map(|(n, _)| n)
            .collect();
        assert_eq!(changed, ["authorizationpolicy/shop/full"]);
    }

    #[test]
    fn an_invalid_authorization_policy_on_the_wire_is_a_nack() {
        let c = ConfigFile::parse("t", POLICIES).unwrap();
        let mut held = held(&c);
        let r = held.0.get_mut("authorizationpolicy/shop/full").unwrap();
        let Some(pb::resource::Kind::AuthorizationPolicy(p)) = &mut r.kind else {
            panic!()
        };
        p.rules[0].from[0]
            .source
            .as_mut()
            .unwrap()
            .ip_blocks
            .push("10.1.0.0/99".into());
        p.rules[0].when.push(pb::AuthorizationCondition {
            key: "request.method".into(),
            values: vec!["GET".into()],
            not_values: vec![],
        });
        let r = held.0.get_mut("authorizationpolicy/shop/by-service").unwrap();
        let Some(pb::resource::Kind::AuthorizationPolicy(p)) = &mut r.kind else {
            panic!()
        };
        p.action = 7;
        let problems = held.to_config("n1", &c.settings).unwrap_err();
        let all = problems.join("\n");
        assert!(
            all.contains("authorizationpolicy/shop/by-service: action 7 is not ALLOW, DENY, AUDIT or CUSTOM"),
            "{all}"
        );
        assert!(
            all.contains("(shop/full).spec.rules[0].from[0].source.ipBlocks[1]"),
            "{all}"
        );
        assert!(all.contains("(shop/full).spec.rules[0].when[2]"), "{all}");
    }
}

#[cfg(test)]
mod routing_tests {
    use super::*;

    /// Every field of the routing model set at least once.
    const ROUTES: &str = r#"
node: n1
services:
  - name: reviews
    vip: 10.96.0.20
    ports: [{port: 9080, targetPort: 9080}]
routes:
  - service: default/reviews
    origins: [{kind: VirtualService, namespace: default, name: reviews}, {kind: HttpRoute, namespace: default, name: r2}]
    http:
      - name: tester
        matches:
          - uri: {prefix: /api}
            method: {exact: GET}
            authority: {regex: "reviews(:9080)?"}
            headers: {user: {exact: tester}, x-any: {}}
            withoutHeaders: {x-skip: {prefix: "1"}}
            queryParams: {v: {pathPrefix: /a}}
            port: 9080
            sourceLabels: {app: productpage}
            sourceNamespace: default
            ignoreUriCase: true
        backends:
          - {service: default/reviews, port: 9080, subset: v2, weight: 90, requestHeaders: {set: [[x-a, "1"]], add: [[x-b, "2"]], remove: [x-c]}}
          - {service: default/reviews, subset: v3, weight: 10}
        timeoutMs: 3000
        retries: {attempts: 3, perTryTimeoutMs: 500, retryOn: [5xx, gateway-error, reset, connect-failure, refused-stream, retriable-4xx, {status: 503}, cancelled, deadline-exceeded, internal, resource-exhausted, unavailable]}
        fault: {delay: {delayMs: 7000, percent: 100.0}, abort: {status: {grpc: 14}, percent: 12.5}}
        mirrors: [{backend: {service: default/ratings, weight: 1}, percent: 50.0}]
        requestHeaders: {set: [[x-s, v]]}
        responseHeaders: {remove: [server]}
        rewrite: {prefix: /v2, authority: reviews.internal}
      - name: moved
        redirect: {scheme: https, authority: example.com, port: 8443, path: /new, status: 308}
      - name: full
        backends: [{service: default/reviews}]
        rewrite: {fullPath: /x}
        fault: {abort: {status: {http: 503}, percent: 100.0}}
    tcp:
      - {port: 9080, sourceLabels: {app: a}, backends: [{service: default/reviews, subset: v1, weight: 80}]}
      - backends: [{service: default/reviews}]
    subsets:
      default/reviews: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
"#;

    fn held(c: &ConfigFile) -> HeldResources {
        let mut r = HeldResources::default();
        for k in c.services.iter().map(service_to).chain(c.routes.iter().map(routing_to)) {
            let res = resource(k);
            r.0.insert(res.name.clone(), res);
        }
        r
    }

    #[test]
    fn routing_round_trips_through_the_wire_types() {
        let c = ConfigFile::parse("t", ROUTES).unwrap();
        let held = held(&c);
        assert!(held.0.contains_key("routing/default/reviews"), "{:?}", held.0.keys());
        let back = held.to_config("n1", &c.settings).unwrap();
        assert_eq!(back.routes, c.routes);
    }

    #[test]
    fn a_bad_regex_or_percentage_on_the_wire_is_a_problem() {
        let c = ConfigFile::parse("t", ROUTES).unwrap();
        let mut held = held(&c);
        let r = held.0.get_mut("routing/default/reviews").unwrap();
        let Some(pb::resource::Kind::ServiceRouting(sr)) = &mut r.kind else {
            panic!()
        };
        sr.http[0].matches[0].uri = Some(pb::StringMatch {
            kind: Some(pb::string_match::Kind::Regex("(".into())),
        });
        sr.http[0].fault.as_mut().unwrap().delay.as_mut().unwrap().percent = 150.0;
        sr.http[0].retries.as_mut().unwrap().retry_on.push("sometimes".into());
        let problems = held.to_config("n1", &c.settings).unwrap_err();
        let all = problems.join("\n");
        assert!(all.starts_with("routing/default/reviews: "), "{all}");
        assert!(
            all.contains("http[0].matches[0].uri: regex \"(\": regex parse error"),
            "{all}"
        );
        assert!(
            all.contains("http[0].fault.delay.percent: 150 is not a percentage"),
            "{all}"
        );
        assert!(all.contains("\"sometimes\" is not a condition"), "{all}");
    }
}
