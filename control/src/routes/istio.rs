//! Istio `VirtualService` and `DestinationRule` to the routing model, one
//! object at a time. What Ferry cannot do is never dropped silently: a
//! route whose meaning would change without a field is not applied (an
//! error), a field that only tunes behaviour is kept and reported
//! "accepted, not enforced" (a warning).

use std::collections::BTreeMap;

use ferry_model::route::{
    AbortStatus, Backend, Fault, FaultAbort, FaultDelay, HeaderOps, HttpMatch, HttpRoute, Mirror, Redirect, Regex,
    RetryOn, RetryPolicy, Rewrite, StringMatch, Subset, TcpRoute,
};

use ferry_model::traffic::ServiceTrafficPolicy;

use super::{resolve_host, Issue, Services, SubsetRef};
use crate::model::istio as api;

/// One VirtualService, compiled (the same routes for each of its hosts).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CompiledVs {
    /// The Services its hosts name (`namespace/name`), in host order.
    pub services: Vec<String>,
    pub http: Vec<HttpRoute>,
    pub tcp: Vec<TcpRoute>,
    pub subset_refs: Vec<SubsetRef>,
}

/// Istio's retry policy when a route sets none: 2 retries on
/// connect-failure, refused-stream, unavailable, cancelled and
/// retriable-status-codes with 503 (what istiod gives Envoy).
pub fn istio_default_retries() -> RetryPolicy {
    RetryPolicy {
        attempts: 2,
        per_try_timeout_ms: None,
        retry_on: istio_default_retry_on(),
    }
}

pub fn istio_default_retry_on() -> Vec<RetryOn> {
    vec![
        RetryOn::ConnectFailure,
        RetryOn::RefusedStream,
        RetryOn::Unavailable,
        RetryOn::Cancelled,
        RetryOn::Status(503),
    ]
}

fn ms(d: &crate::model::Duration) -> Option<u64> {
    let ms = u64::try_from(d.value.as_millis()).unwrap_or(u64::MAX);
    (ms > 0).then_some(ms)
}

/// A string match; header-style `prefix: ""` is "present".
fn string_match(m: &api::StringMatch, at: &str, issues: &mut Vec<Issue>) -> Option<StringMatch> {
    match (&m.exact, &m.prefix, &m.regex) {
        (Some(e), None, None) => Some(StringMatch::Exact(e.clone())),
        (None, Some(p), None) if p.is_empty() => Some(StringMatch::Present),
        (None, Some(p), None) => Some(StringMatch::Prefix(p.clone())),
        (None, None, Some(re)) => match Regex::new(re) {
            Ok(r) => Some(StringMatch::Regex(r)),
            Err(e) => {
                let e = e.to_string().split_whitespace().collect::<Vec<_>>().join(" ");
                issues.push(Issue::error(at, format!("regex {re:?}: {e}: the route is not applied")));
                None
            }
        },
        _ => {
            issues.push(Issue::error(
                at,
                "exactly one of exact, prefix, regex is required: the route is not applied",
            ));
            None
        }
    }
}

fn header_ops(h: Option<&api::HeaderOperations>) -> HeaderOps {
    let Some(h) = h else { return HeaderOps::default() };
    let pairs = |m: &BTreeMap<String, String>| m.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.clone())).collect();
    HeaderOps {
        set: pairs(&h.set),
        add: pairs(&h.add),
        remove: h.remove.iter().map(|r| r.to_ascii_lowercase()).collect(),
    }
}

/// Istio's weights: one destination takes everything whatever its weight;
/// several take their weights (unset = 0), and when none sets one they
/// share equally (reported).
fn weights(ws: &[Option<i64>], at: &str, issues: &mut Vec<Issue>) -> Vec<u32> {
    if ws.len() == 1 {
        return vec![100];
    }
    if ws.iter().all(Option::is_none) {
        if !ws.is_empty() {
            issues.push(Issue::warning(
                at,
                "several destinations and no weights: they share the traffic equally",
            ));
        }
        return vec![1; ws.len()];
    }
    ws.iter()
        .map(|w| w.map_or(0, |w| u32::try_from(w.clamp(0, 100)).unwrap_or(0)))
        .collect()
}

/// gRPC status names (as Istio's `grpcStatus` takes them) or numbers.
pub fn grpc_status(s: &str) -> Option<u32> {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    match s.parse::<u32>() {
        Ok(n) if n <= 16 => Some(n),
        Ok(_) => None,
        Err(_) => NAMES.iter().position(|n| n.eq_ignore_ascii_case(s)).map(|i| i as u32),
    }
}

/// Percent of a fault: `percentage.value`, else the legacy integer
/// `percent`, else none (Istio injects into no request then: reported).
fn fault_percent(percentage: Option<&api::Percent>, legacy: Option<i64>, at: &str, issues: &mut Vec<Issue>) -> f64 {
    match (percentage, legacy) {
        (Some(p), _) => p.value.clamp(0.0, 100.0),
        (None, Some(p)) => (p.clamp(0, 100)) as f64,
        (None, None) => {
            issues.push(Issue::warning(
                at,
                "no percentage: as in Istio, the fault applies to no request",
            ));
            0.0
        }
    }
}

struct Ctx<'a> {
    ns: &'a str,
    services: &'a Services,
    issues: Vec<Issue>,
    subset_refs: Vec<SubsetRef>,
}

impl Ctx<'_> {
    /// A destination as a backend, or None (reported) when its host names no
    /// Service Ferry can route to.
    fn backend(&mut self, d: &api::Destination, weight: u32, at: String) -> Option<Backend> {
        let service = match resolve_host(&d.host, self.ns, self.services) {
            Ok(s) => s,
            Err(e) => match super::service_of_host(&d.host, self.ns) {
                // A Service that does not exist yet: kept (analyze reports it;
                // the agent answers 503 until it exists).
                Some((n, name)) => format!("{n}/{name}"),
                None => {
                    self.issues.push(Issue::error(
                        format!("{at}.host"),
                        format!("{e}: this destination is dropped"),
                    ));
                    return None;
                }
            },
        };
        if let Some(subset) = &d.subset {
            self.subset_refs.push(SubsetRef {
                field: format!("{at}.subset"),
                service: service.clone(),
                subset: subset.clone(),
            });
        }
        Some(Backend {
            service,
            port: d.port.as_ref().map(|p| p.number),
            subset: d.subset.clone(),
            weight,
            ..Default::default()
        })
    }

    fn http(&mut self, i: usize, r: &api::HttpRoute, origin: &str) -> Option<HttpRoute> {
        let at = format!("spec.http[{i}]");
        let before = self.issues.len();
        if r.delegate.is_some() {
            self.issues.push(Issue::error(
                format!("{at}.delegate"),
                "delegate is not supported: the route is not applied",
            ));
        }
        if r.direct_response.is_some() {
            self.issues.push(Issue::error(
                format!("{at}.directResponse"),
                "directResponse is not supported: the route is not applied",
            ));
        }
        if r.cors_policy.is_some() {
            self.issues
                .push(Issue::not_enforced(format!("{at}.corsPolicy"), "corsPolicy"));
        }
        let mut matches = Vec::new();
        for (j, m) in r.matches.iter().enumerate() {
            let mat = format!("{at}.match[{j}]");
            if !m.gateways.is_empty() && !m.gateways.iter().any(|g| g == "mesh") {
                self.issues.push(Issue::warning(
                    format!("{mat}.gateways"),
                    "names gateways and not `mesh`: this match never applies to mesh traffic",
                ));
                continue;
            }
            if m.scheme.is_some() {
                self.issues.push(Issue::error(
                    format!("{mat}.scheme"),
                    "scheme matches are not supported: the route is not applied",
                ));
            }
            if m.stat_prefix.is_some() {
                self.issues
                    .push(Issue::not_enforced(format!("{mat}.statPrefix"), "statPrefix"));
            }
            let one = |f: &str, v: &Option<api::StringMatch>, issues: &mut Vec<Issue>| {
                v.as_ref().and_then(|v| string_match(v, &format!("{mat}.{f}"), issues))
            };
            let uri = one("uri", &m.uri, &mut self.issues);
            let method = one("method", &m.method, &mut self.issues);
            let authority = one("authority", &m.authority, &mut self.issues);
            let mut map = |f: &str, src: &BTreeMap<String, api::StringMatch>, lower: bool| {
                src.iter()
                    .filter_map(|(k, v)| {
                        let m = string_match(v, &format!("{mat}.{f}.{k}"), &mut self.issues)?;
                        Some((if lower { k.to_ascii_lowercase() } else { k.clone() }, m))
                    })
                    .collect()
            };
            matches.push(HttpMatch {
                uri,
                method,
                authority,
                headers: map("headers", &m.headers, true),
                without_headers: map("withoutHeaders", &m.without_headers, true),
                query_params: map("queryParams", &m.query_params, false),
                port: m.port,
                source_labels: m.source_labels.clone(),
                source_namespace: m.source_namespace.clone(),
                ignore_uri_case: m.ignore_uri_case,
            });
        }
        if !r.matches.is_empty() && matches.is_empty() {
            return None; // every match was for gateways only (reported)
        }
        let ws: Vec<Option<i64>> = r.route.iter().map(|d| d.weight).collect();
        let weights = weights(&ws, &format!("{at}.route"), &mut self.issues);
        let mut backends = Vec::new();
        for (j, (d, w)) in r.route.iter().zip(weights).enumerate() {
            let dat = format!("{at}.route[{j}]");
            if let Some(mut b) = self.backend(&d.destination, w, format!("{dat}.destination")) {
                b.request_headers = header_ops(d.headers.as_ref().and_then(|h| h.request.as_ref()));
                b.response_headers = header_ops(d.headers.as_ref().and_then(|h| h.response.as_ref()));
                backends.push(b);
            }
        }
        let redirect = r.redirect.as_ref().map(|rd| {
            if rd.derive_port.is_some() {
                self.issues
                    .push(Issue::not_enforced(format!("{at}.redirect.derivePort"), "derivePort"));
            }
            let status = match rd.redirect_code {
                None => 301,
                Some(c @ (301 | 302 | 303 | 307 | 308)) => c,
                Some(c) => {
                    self.issues.push(Issue::error(
                        format!("{at}.redirect.redirectCode"),
                        format!("{c} is not a redirect status (301, 302, 303, 307, 308): 301 is used"),
                    ));
                    301
                }
            };
            Redirect {
                scheme: rd.scheme.clone(),
                authority: rd.authority.clone(),
                port: rd.port,
                path: rd.uri.clone(),
                prefix: None,
                status,
            }
        });
        if backends.is_empty() && redirect.is_none() {
            self.issues.push(Issue::error(
                at.clone(),
                "no destination Ferry can route to and no redirect: the route is not applied",
            ));
            return None;
        }
        let retries = match &r.retries {
            None => Some(istio_default_retries()),
            Some(rt) if rt.attempts == 0 => None,
            Some(rt) => {
                for (f, set) in [
                    ("retryRemoteLocalities", rt.retry_remote_localities.is_some()),
                    ("retryIgnorePreviousHosts", rt.retry_ignore_previous_hosts.is_some()),
                    ("backoff", rt.backoff.is_some()),
                ] {
                    if set {
                        self.issues.push(Issue::not_enforced(format!("{at}.retries.{f}"), f));
                    }
                }
                let retry_on = match &rt.retry_on {
                    None => istio_default_retry_on(),
                    Some(list) => list
                        .split(',')
                        .map(str::trim)
                        // Envoy's switch for the listed codes; the codes themselves are entries.
                        .filter(|c| !c.is_empty() && *c != "retriable-status-codes")
                        .filter_map(|c| match RetryOn::parse(c) {
                            Ok(c) => Some(c),
                            Err(e) => {
                                self.issues
                                    .push(Issue::error(format!("{at}.retries.retryOn"), format!("{e}: ignored")));
                                None
                            }
                        })
                        .collect(),
                };
                Some(RetryPolicy {
                    attempts: rt.attempts,
                    per_try_timeout_ms: rt.per_try_timeout.as_ref().and_then(ms),
                    retry_on,
                })
            }
        };
        let fault = r.fault.as_ref().and_then(|f| {
            let delay = f.delay.as_ref().map(|d| FaultDelay {
                delay_ms: ms(&d.fixed_delay).unwrap_or(0),
                percent: fault_percent(
                    d.percentage.as_ref(),
                    d.percent,
                    &format!("{at}.fault.delay"),
                    &mut self.issues,
                ),
            });
            let abort = f.abort.as_ref().and_then(|a| {
                let status = match (a.http_status, &a.grpc_status) {
                    (Some(s), _) => AbortStatus::Http(s),
                    (None, Some(g)) => match grpc_status(g) {
                        Some(c) => AbortStatus::Grpc(c),
                        None => {
                            self.issues.push(Issue::error(
                                format!("{at}.fault.abort.grpcStatus"),
                                format!("{g:?} is not a gRPC status: the abort is not applied"),
                            ));
                            return None;
                        }
                    },
                    (None, None) => return None, // rejected by the parser
                };
                Some(FaultAbort {
                    status,
                    percent: fault_percent(
                        a.percentage.as_ref(),
                        None,
                        &format!("{at}.fault.abort"),
                        &mut self.issues,
                    ),
                })
            });
            (delay.is_some() || abort.is_some()).then_some(Fault { delay, abort })
        });
        let mut mirrors = Vec::new();
        if let Some(m) = &r.mirror {
            let percent = match (&r.mirror_percentage, r.mirror_percent) {
                (Some(p), _) => p.value.clamp(0.0, 100.0),
                (None, Some(p)) => p.clamp(0, 100) as f64,
                (None, None) => 100.0,
            };
            match resolve_host(&m.host, self.ns, self.services) {
                Ok(service) => mirrors.push(Mirror {
                    backend: Backend {
                        service,
                        port: m.port.as_ref().map(|p| p.number),
                        subset: m.subset.clone(),
                        weight: 1,
                        ..Default::default()
                    },
                    percent,
                }),
                Err(e) => self.issues.push(Issue::warning(
                    format!("{at}.mirror.host"),
                    format!("{e}: mirroring there is {}", super::NOT_ENFORCED),
                )),
            }
        }
        for (k, m) in r.mirrors.iter().enumerate() {
            match resolve_host(&m.destination.host, self.ns, self.services) {
                Ok(service) => mirrors.push(Mirror {
                    backend: Backend {
                        service,
                        port: m.destination.port.as_ref().map(|p| p.number),
                        subset: m.destination.subset.clone(),
                        weight: 1,
                        ..Default::default()
                    },
                    percent: m.percentage.as_ref().map_or(100.0, |p| p.value.clamp(0.0, 100.0)),
                }),
                Err(e) => self.issues.push(Issue::warning(
                    format!("{at}.mirrors[{k}].destination.host"),
                    format!("{e}: mirroring there is {}", super::NOT_ENFORCED),
                )),
            }
        }
        for (k, m) in mirrors.iter().enumerate() {
            if let Some(subset) = &m.backend.subset {
                let field = if r.mirror.is_some() && k == 0 {
                    format!("{at}.mirror.subset")
                } else {
                    format!("{at}.mirrors[{k}].destination.subset")
                };
                self.subset_refs.push(SubsetRef {
                    field,
                    service: m.backend.service.clone(),
                    subset: subset.clone(),
                });
            }
        }
        let rewrite = r.rewrite.as_ref().map(|rw| {
            if rw.uri_regex_rewrite.is_some() {
                self.issues.push(Issue::not_enforced(
                    format!("{at}.rewrite.uriRegexRewrite"),
                    "uriRegexRewrite is not supported (the path is left as is)",
                ));
            }
            Rewrite {
                prefix: rw.uri.clone(),
                full_path: None,
                authority: rw.authority.clone(),
            }
        });
        let has_error = self.issues[before..]
            .iter()
            .any(|i| i.severity == crate::model::Severity::Error && i.reason.ends_with("the route is not applied"));
        if has_error {
            return None;
        }
        Some(HttpRoute {
            name: r.name.clone().unwrap_or_else(|| format!("{origin} http[{i}]")),
            matches,
            backends,
            timeout_ms: r.timeout.as_ref().and_then(ms),
            retries,
            fault,
            mirrors,
            request_headers: header_ops(r.headers.as_ref().and_then(|h| h.request.as_ref())),
            response_headers: header_ops(r.headers.as_ref().and_then(|h| h.response.as_ref())),
            rewrite,
            redirect,
        })
    }

    fn tcp(&mut self, i: usize, t: &api::TcpRoute) -> Vec<TcpRoute> {
        let at = format!("spec.tcp[{i}]");
        let ws: Vec<Option<i64>> = t.route.iter().map(|d| d.weight).collect();
        let weights = weights(&ws, &format!("{at}.route"), &mut self.issues);
        let backends: Vec<Backend> = t
            .route
            .iter()
            .zip(weights)
            .enumerate()
            .filter_map(|(j, (d, w))| self.backend(&d.destination, w, format!("{at}.route[{j}].destination")))
            .collect();
        if backends.is_empty() {
            self.issues.push(Issue::error(
                at,
                "no destination Ferry can route to: the route is not applied",
            ));
            return Vec::new();
        }
        if t.matches.is_empty() {
            return vec![TcpRoute {
                port: None,
                source_labels: BTreeMap::new(),
                backends,
            }];
        }
        let mut out = Vec::new();
        for (j, m) in t.matches.iter().enumerate() {
            let mat = format!("{at}.match[{j}]");
            if !m.gateways.is_empty() && !m.gateways.iter().any(|g| g == "mesh") {
                self.issues.push(Issue::warning(
                    format!("{mat}.gateways"),
                    "names gateways and not `mesh`: this match never applies to mesh traffic",
                ));
                continue;
            }
            if !m.destination_subnets.is_empty() || m.source_namespace.is_some() {
                self.issues.push(Issue::error(
                    mat,
                    "destinationSubnets and sourceNamespace are not supported in TCP matches: this match is not applied",
                ));
                continue;
            }
            out.push(TcpRoute {
                port: m.port,
                source_labels: m.source_labels.clone(),
                backends: backends.clone(),
            });
        }
        out
    }
}

/// Compiles one VirtualService of namespace `ns`.
pub fn virtual_service(
    ns: &str,
    name: &str,
    spec: &api::VirtualServiceSpec,
    services: &Services,
) -> (CompiledVs, Vec<Issue>) {
    let mut cx = Ctx {
        ns,
        services,
        issues: Vec::new(),
        subset_refs: Vec::new(),
    };
    let origin = format!("VirtualService {ns}/{name}");
    for (i, g) in spec.gateways.iter().enumerate().filter(|(_, g)| *g != "mesh") {
        cx.issues.push(Issue::warning(
            format!("spec.gateways[{i}]"),
            format!("gateway {g:?}: Ferry routes mesh traffic only; these routes are not applied there"),
        ));
    }
    if !spec.gateways.is_empty() && !spec.gateways.iter().any(|g| g == "mesh") {
        cx.issues.push(Issue::warning(
            "spec.gateways",
            "no `mesh` among the gateways: not applied to mesh traffic",
        ));
        return (CompiledVs::default(), cx.issues);
    }
    if !spec.export_to.is_empty() && spec.export_to.iter().any(|e| e != "*") {
        cx.issues.push(Issue::not_enforced(
            "spec.exportTo",
            "exportTo (every namespace sees these routes)",
        ));
    }
    let mut out = CompiledVs::default();
    for (i, h) in spec.hosts.iter().enumerate() {
        match resolve_host(h, ns, services) {
            Ok(s) if !out.services.contains(&s) => out.services.push(s),
            Ok(_) => {}
            Err(e) => cx.issues.push(Issue::warning(
                format!("spec.hosts[{i}]"),
                format!("{e}: not applied for this host"),
            )),
        }
    }
    out.http = spec
        .http
        .iter()
        .enumerate()
        .filter_map(|(i, r)| cx.http(i, r, &origin))
        .collect();
    out.tcp = spec.tcp.iter().enumerate().flat_map(|(i, t)| cx.tcp(i, t)).collect();
    out.subset_refs = cx.subset_refs;
    (out, cx.issues)
}

/// What one DestinationRule gives the Service its host names.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CompiledDr {
    /// `namespace/name` of the Service (None: the host names none).
    pub service: Option<String>,
    pub subsets: Vec<Subset>,
    /// Its traffic policy, layers resolved (None: it sets none).
    pub traffic: Option<ServiceTrafficPolicy>,
}

/// A DestinationRule's subsets and traffic policy for the Service its host
/// names, with what is refused or not enforced.
pub fn destination_rule(
    ns: &str,
    name: &str,
    spec: &api::DestinationRuleSpec,
    services: &Services,
) -> (CompiledDr, Vec<Issue>) {
    let service = resolve_host(&spec.host, ns, services).ok();
    let (traffic, mut issues) =
        super::traffic::compile(service.as_deref().unwrap_or_default(), &format!("{ns}/{name}"), spec);
    if !spec.export_to.is_empty() && spec.export_to.iter().any(|e| e != "*") {
        issues.push(Issue::not_enforced(
            "spec.exportTo",
            "exportTo (every namespace sees these subsets and policies)",
        ));
    }
    // A host that is no Service is reported by analyze (spec.host).
    let subsets = spec
        .subsets
        .iter()
        .map(|s| Subset {
            name: s.name.clone(),
            labels: s.labels.clone(),
        })
        .collect();
    let traffic = traffic.filter(|_| service.is_some());
    (
        CompiledDr {
            service,
            subsets,
            traffic,
        },
        issues,
    )
}
