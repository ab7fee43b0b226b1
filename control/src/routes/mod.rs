//! Route compilation: Istio `VirtualService` + `DestinationRule` subsets and
//! Gateway API `HTTPRoute`/`GRPCRoute`/`TCPRoute` (GAMMA: a Service parent)
//! into one [`ServiceRouting`] per routed Service, the model type agents
//! route with. Pure functions: [`istio`] and [`gateway`] compile one object
//! each (typed output plus [`Issue`]s with field paths); [`compile`] resolves
//! hosts against the cluster's Services, picks the winner where objects
//! compete for a Service, attaches DestinationRule subsets, and turns issues
//! into [`Problem`]s naming the object (shown by `ferryctl analyze` and at
//! the admin endpoint's `/problems`).
//!
//! Who wins (docs/traffic-management.md):
//! - Gateway API routes and VirtualServices for one Service: the Gateway API
//!   routes (Istio's behaviour for GAMMA); every such VirtualService is
//!   reported as ignored.
//! - Several VirtualServices for one host: Istio merges them only on
//!   gateways; in the mesh one applies, the oldest (creation time, then
//!   namespace/name). The others are reported as ignored.
//! - Several Gateway API routes for one Service: merged, rules ordered by
//!   Gateway API precedence ([`gateway::Rank`]), ties by age, then
//!   namespace/name, then rule order.

pub mod gateway;
pub mod istio;
#[cfg(test)]
mod tests;
pub mod traffic;

use std::collections::{BTreeMap, BTreeSet};

use ferry_model::{
    route::{Backend, RouteKind, RouteOrigin, ServiceRouting, Subset},
    traffic::ServiceTrafficPolicy,
};

use crate::model::{Cluster, Custom, Key, Located, Object, Problem, Severity};

/// What every "supported by the parser, not by the agent yet" reason ends with.
pub const NOT_ENFORCED: &str = "accepted, not enforced";

/// One finding about one object: the field path inside it and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issue {
    pub severity: Severity,
    pub field: String,
    pub reason: String,
}

impl Issue {
    pub fn error(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            severity: Severity::Error,
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub fn warning(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            severity: Severity::Warning,
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// A field Ferry parses but the agent does not apply yet.
    pub fn not_enforced(field: impl Into<String>, what: &str) -> Self {
        Self::warning(field, format!("{what}: {NOT_ENFORCED}"))
    }
}

/// The cluster's Services, as `namespace/name`.
pub type Services = BTreeSet<String>;

/// (namespace, name) of the Service a host names, seen from namespace `ns`:
/// `name`, `name.ns`, `name.ns.svc`, `name.ns.svc.cluster.local`. None for
/// wildcards and other names.
pub fn service_of_host(host: &str, ns: &str) -> Option<(String, String)> {
    if host.contains('*') || host.is_empty() {
        return None;
    }
    let parts: Vec<&str> = host.trim_end_matches('.').split('.').collect();
    match parts.as_slice() {
        [name] if !name.is_empty() => Some((ns.into(), (*name).into())),
        [name, n] | [name, n, "svc"] | [name, n, "svc", "cluster", "local"] if !name.is_empty() && !n.is_empty() => {
            Some(((*n).into(), (*name).into()))
        }
        _ => None,
    }
}

/// `namespace/name` of the Service `host` names, or why it names none.
pub fn resolve_host(host: &str, ns: &str, services: &Services) -> Result<String, String> {
    match service_of_host(host, ns) {
        Some((n, name)) if services.contains(&format!("{n}/{name}")) => Ok(format!("{n}/{name}")),
        Some((n, name)) => Err(format!("host {host:?}: no Service {n}/{name}")),
        None => Err(format!(
            "host {host:?} is not a Service of this cluster (Ferry routes Services only)"
        )),
    }
}

/// A backend naming a subset, for the check against DestinationRules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubsetRef {
    pub field: String,
    pub service: String,
    pub subset: String,
}

/// Everything the cluster's routing objects compile to.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Compiled {
    /// One per routed Service, by `namespace/name`.
    pub routings: Vec<ServiceRouting>,
    /// One per Service a DestinationRule sets a traffic policy for.
    pub traffic: Vec<ServiceTrafficPolicy>,
    pub problems: Vec<Problem>,
}

/// Age order: creation time (RFC 3339 in UTC sorts as text; none first),
/// then namespace/name.
fn age<S>(k: &Key, c: &Custom<S>) -> (Option<String>, String, String) {
    let ts = c
        .metadata
        .creation_timestamp
        .as_ref()
        .and_then(|t| serde_json::to_string(t).ok());
    (ts, k.namespace.clone(), k.name.clone())
}

struct Sink<'a> {
    out: &'a mut Vec<Problem>,
}

impl Sink<'_> {
    fn add(&mut self, key: &Key, at: &Located, issues: impl IntoIterator<Item = Issue>) {
        for i in issues {
            self.out.push(Problem {
                severity: i.severity,
                file: at.file.clone(),
                line: at.line,
                object: key.to_string(),
                field: i.field,
                reason: i.reason,
            });
        }
    }
}

/// One object's routes for one Service.
struct Candidate<'a> {
    key: &'a Key,
    at: &'a Located,
    kind: RouteKind,
    http: Vec<gateway::Ranked>,
    tcp: Vec<ferry_model::route::TcpRoute>,
    subset_refs: Vec<SubsetRef>,
}

fn origin(c: &Candidate<'_>) -> RouteOrigin {
    RouteOrigin {
        kind: c.kind,
        namespace: c.key.namespace.clone(),
        name: c.key.name.clone(),
    }
}

/// Compiles every routing object of `cluster`.
pub fn compile(cluster: &Cluster) -> Compiled {
    let services: Services = cluster
        .objects
        .keys()
        .filter(|k| k.kind == "Service")
        .map(|k| format!("{}/{}", k.namespace, k.name))
        .collect();
    let mut problems = Vec::new();
    let mut sink = Sink { out: &mut problems };

    // DestinationRule subsets, oldest first: a subset name defined twice for
    // one Service keeps the older definition.
    let mut drs: Vec<_> = cluster
        .objects
        .iter()
        .filter_map(|(k, l)| match &l.object {
            Object::DestinationRule(d) => Some((age(k, d), k, l, d)),
            _ => None,
        })
        .collect();
    drs.sort_by(|a, b| a.0.cmp(&b.0));
    let mut subsets: BTreeMap<String, Vec<Subset>> = BTreeMap::new();
    let mut traffic: BTreeMap<String, (&Key, ServiceTrafficPolicy)> = BTreeMap::new();
    for (_, k, l, d) in drs {
        let (dr, issues) = istio::destination_rule(&k.namespace, &k.name, &d.spec, &services);
        sink.add(k, l, issues);
        if let (Some(svc), Some(t)) = (&dr.service, dr.traffic) {
            match traffic.get(svc) {
                // Istio merges DestinationRules for one host only when
                // subsets do not clash; its traffic policy comes from the
                // oldest. So does Ferry's.
                Some((older, _)) => sink.add(
                    k,
                    l,
                    [Issue::warning(
                        "spec.trafficPolicy",
                        format!(
                            "ignored for Service {svc}: DestinationRule {older} is older and sets its traffic policy"
                        ),
                    )],
                ),
                None => {
                    traffic.insert(svc.clone(), (k, t));
                }
            }
        }
        if let (Some(svc), ss) = (dr.service, dr.subsets) {
            let have = subsets.entry(svc.clone()).or_default();
            for (i, s) in ss.into_iter().enumerate() {
                if have.iter().any(|h| h.name == s.name) {
                    sink.add(
                        k,
                        l,
                        [Issue::warning(
                            format!("spec.subsets[{i}]"),
                            format!(
                                "subset {:?} of {svc} is already defined by an older DestinationRule (that one is used)",
                                s.name
                            ),
                        )],
                    );
                } else {
                    have.push(s);
                }
            }
        }
    }

    // Candidates per Service, each list in age order.
    let mut vs: BTreeMap<String, Vec<Candidate<'_>>> = BTreeMap::new();
    let mut gamma: BTreeMap<String, Vec<Candidate<'_>>> = BTreeMap::new();
    let mut objects: Vec<_> = cluster
        .objects
        .iter()
        .filter_map(|(k, l)| {
            let a = match &l.object {
                Object::VirtualService(o) => age(k, o),
                Object::HttpRoute(o) => age(k, o),
                Object::GrpcRoute(o) => age(k, o),
                Object::TcpRoute(o) => age(k, o),
                _ => return None,
            };
            Some((a, k, l))
        })
        .collect();
    objects.sort_by(|a, b| a.0.cmp(&b.0));
    for (_, k, l) in objects {
        let (ns, name) = (k.namespace.as_str(), k.name.as_str());
        match &l.object {
            Object::VirtualService(o) => {
                let (c, issues) = istio::virtual_service(ns, name, &o.spec, &services);
                sink.add(k, l, issues);
                for svc in &c.services {
                    vs.entry(svc.clone()).or_default().push(Candidate {
                        key: k,
                        at: l,
                        kind: RouteKind::VirtualService,
                        http: c.http.iter().cloned().map(gateway::Ranked::unranked).collect(),
                        tcp: c.tcp.clone(),
                        subset_refs: c.subset_refs.clone(),
                    });
                }
            }
            Object::HttpRoute(o) => {
                let (c, issues) = gateway::http_route(ns, name, &o.spec, &services);
                sink.add(k, l, issues);
                add_gamma(&mut gamma, k, l, RouteKind::HttpRoute, c);
            }
            Object::GrpcRoute(o) => {
                let (c, issues) = gateway::grpc_route(ns, name, &o.spec, &services);
                sink.add(k, l, issues);
                add_gamma(&mut gamma, k, l, RouteKind::GrpcRoute, c);
            }
            Object::TcpRoute(o) => {
                let (c, issues) = gateway::tcp_route(ns, &o.spec, &services);
                sink.add(k, l, issues);
                add_gamma(&mut gamma, k, l, RouteKind::TcpRoute, c);
            }
            _ => {}
        }
    }

    let routed: BTreeSet<&String> = vs.keys().chain(gamma.keys()).collect();
    let mut routings = Vec::new();
    for svc in routed {
        let vss = vs.get(svc).map_or(&[][..], Vec::as_slice);
        let gs = gamma.get(svc).map_or(&[][..], Vec::as_slice);
        let winners: &[Candidate<'_>] = if let Some(g) = gs.first() {
            for v in vss {
                sink.add(
                    v.key,
                    v.at,
                    [Issue::warning(
                        "spec.hosts",
                        format!(
                            "ignored for Service {svc}: {} {} also routes it, and Gateway API routes take precedence over VirtualServices",
                            g.kind,
                            g.key.namespace.clone() + "/" + &g.key.name
                        ),
                    )],
                );
            }
            gs
        } else {
            let (first, rest) = vss.split_first().expect("a routed Service has a candidate");
            for v in rest {
                sink.add(
                    v.key,
                    v.at,
                    [Issue::warning(
                        "spec.hosts",
                        format!(
                            "ignored for Service {svc}: VirtualService {}/{} routes it too and is older (or first by name); in the mesh one VirtualService applies per host",
                            first.key.namespace, first.key.name
                        ),
                    )],
                );
            }
            std::slice::from_ref(first)
        };
        let mut http: Vec<gateway::Ranked> = winners.iter().flat_map(|c| c.http.iter().cloned()).collect();
        // Stable: equal ranks keep age, then rule order.
        http.sort_by_key(|r| std::cmp::Reverse(r.rank));
        let mut r = ServiceRouting {
            service: svc.clone(),
            origins: winners.iter().map(origin).collect(),
            http: http.into_iter().map(|r| r.route).collect(),
            tcp: winners.iter().flat_map(|c| c.tcp.iter().cloned()).collect(),
            subsets: BTreeMap::new(),
        };
        for c in winners {
            for s in &c.subset_refs {
                let defined = subsets
                    .get(&s.service)
                    .is_some_and(|ss| ss.iter().any(|x| x.name == s.subset));
                if !defined {
                    sink.add(
                        c.key,
                        c.at,
                        [Issue::error(
                            s.field.clone(),
                            format!(
                                "no DestinationRule for {} defines subset {:?}: its share of the traffic finds no endpoint (the agent answers 503)",
                                s.service, s.subset
                            ),
                        )],
                    );
                }
            }
        }
        let named: BTreeSet<&str> = backends(&r).map(|b| b.service.as_str()).collect();
        r.subsets = named
            .into_iter()
            .filter_map(|s| Some((s.to_owned(), subsets.get(s)?.clone())))
            .collect();
        routings.push(r);
    }
    Compiled {
        routings,
        traffic: traffic.into_values().map(|(_, t)| t).collect(),
        problems,
    }
}

fn add_gamma<'a>(
    gamma: &mut BTreeMap<String, Vec<Candidate<'a>>>,
    key: &'a Key,
    at: &'a Located,
    kind: RouteKind,
    c: gateway::Gamma,
) {
    for p in &c.parents {
        gamma.entry(p.service.clone()).or_default().push(Candidate {
            key,
            at,
            kind,
            http: c.http.iter().map(|r| r.for_port(p.port)).collect(),
            tcp: c
                .tcp
                .iter()
                .map(|t| ferry_model::route::TcpRoute {
                    port: p.port.or(t.port),
                    ..t.clone()
                })
                .collect(),
            subset_refs: Vec::new(),
        });
    }
}

/// Every backend a routing sends to (routes, TCP routes and mirrors).
fn backends(r: &ServiceRouting) -> impl Iterator<Item = &Backend> {
    r.http
        .iter()
        .flat_map(|h| h.backends.iter().chain(h.mirrors.iter().map(|m| &m.backend)))
        .chain(r.tcp.iter().flat_map(|t| t.backends.iter()))
}
