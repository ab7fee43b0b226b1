//! Gateway API `HTTPRoute`, `GRPCRoute` and `TCPRoute` with Service parents
//! (GAMMA) to the routing model, one object at a time. Each (rule, match)
//! pair becomes one model route with one match, ranked by the Gateway API's
//! precedence ([`Rank`]) so that routes of several objects for one Service
//! merge into one first-match list.

use std::collections::BTreeMap;

use ferry_model::route::{
    Backend, HeaderOps, HttpMatch, HttpRoute, Mirror, Redirect, Regex, RetryOn, RetryPolicy, Rewrite, StringMatch,
    TcpRoute,
};

use super::{istio::istio_default_retries, Issue, Services};
use crate::model::gateway as api;

/// Gateway API precedence of one match, greatest first: an Exact path, then
/// the longest PathPrefix, then a RegularExpression path (implementation
/// specific: after prefixes, as Istio ranks them), then no path at all (a
/// rule without matches: last, as in Istio); within each, a method match,
/// then the most header matches, then the most query matches. Ties keep age,
/// then namespace/name, then rule and match order (a stable sort over
/// objects in age order). VirtualService routes are [`Rank::UNRANKED`]:
/// they keep their written order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rank {
    path_kind: u8,
    path_len: usize,
    method: bool,
    headers: usize,
    query: usize,
}

impl Rank {
    pub const UNRANKED: Rank = Rank {
        path_kind: 0,
        path_len: 0,
        method: false,
        headers: 0,
        query: 0,
    };

    pub fn of(m: &HttpMatch) -> Rank {
        let (path_kind, path_len) = match &m.uri {
            Some(StringMatch::Exact(p)) => (3, p.len()),
            Some(StringMatch::PathPrefix(p) | StringMatch::Prefix(p)) => (2, p.len()),
            Some(StringMatch::Regex(r)) => (1, r.as_str().len()),
            Some(StringMatch::Present) | None => (0, 0),
        };
        Rank {
            path_kind,
            path_len,
            method: m.method.is_some(),
            headers: m.headers.len(),
            query: m.query_params.len(),
        }
    }
}

/// A route with its precedence.
#[derive(Clone, Debug, PartialEq)]
pub struct Ranked {
    pub rank: Rank,
    pub route: HttpRoute,
}

impl Ranked {
    pub fn unranked(route: HttpRoute) -> Self {
        Ranked {
            rank: Rank::UNRANKED,
            route,
        }
    }

    /// This route restricted to a parent's port (every match gets it).
    pub fn for_port(&self, port: Option<u16>) -> Ranked {
        let mut r = self.clone();
        if let Some(p) = port {
            if r.route.matches.is_empty() {
                r.route.matches.push(HttpMatch::default());
            }
            for m in &mut r.route.matches {
                m.port = Some(p);
            }
        }
        r
    }
}

/// A Service parent: `namespace/name` and the port the parentRef names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parent {
    pub service: String,
    pub port: Option<u16>,
}

/// One GAMMA route object, compiled.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Gamma {
    pub parents: Vec<Parent>,
    pub http: Vec<Ranked>,
    pub tcp: Vec<TcpRoute>,
}

fn parents(ns: &str, refs: &[api::ParentRef], services: &Services, issues: &mut Vec<Issue>) -> Vec<Parent> {
    let mut out = Vec::new();
    for (i, p) in refs.iter().enumerate() {
        let at = format!("spec.parentRefs[{i}]");
        if !p.is_service() {
            issues.push(Issue::warning(
                at,
                format!(
                    "parent {} {:?} is not a Service: Ferry applies routes to Service parents (GAMMA) only; not applied there",
                    p.kind.as_deref().unwrap_or("Gateway"),
                    p.name
                ),
            ));
            continue;
        }
        if p.section_name.is_some() {
            issues.push(Issue::not_enforced(
                format!("{at}.sectionName"),
                "sectionName (the route applies to every port)",
            ));
        }
        let service = format!("{}/{}", p.namespace.as_deref().unwrap_or(ns), p.name);
        // A missing Service is reported by analyze (spec.parentRefs[i]).
        if services.contains(&service) {
            out.push(Parent { service, port: p.port });
        }
    }
    out
}

fn hostnames(h: &[String], issues: &mut Vec<Issue>) {
    if !h.is_empty() {
        issues.push(Issue::warning(
            "spec.hostnames",
            "ignored for Service parents (GAMMA: the Service is the host)",
        ));
    }
}

fn regex(re: &str, at: &str, issues: &mut Vec<Issue>) -> Option<StringMatch> {
    match Regex::new(re) {
        Ok(r) => Some(StringMatch::Regex(r)),
        Err(e) => {
            let e = e.to_string().split_whitespace().collect::<Vec<_>>().join(" ");
            issues.push(Issue::error(at, format!("regex {re:?}: {e}: the rule is not applied")));
            None
        }
    }
}

fn value_matches(
    vs: &[api::ValueMatch],
    at: &str,
    lower: bool,
    issues: &mut Vec<Issue>,
) -> Option<BTreeMap<String, StringMatch>> {
    let mut out = BTreeMap::new();
    for (k, v) in vs.iter().enumerate() {
        let name = if lower {
            v.name.to_ascii_lowercase()
        } else {
            v.name.clone()
        };
        let m = match v.kind.unwrap_or(api::ValueMatchType::Exact) {
            api::ValueMatchType::Exact => StringMatch::Exact(v.value.clone()),
            api::ValueMatchType::RegularExpression => regex(&v.value, &format!("{at}[{k}].value"), issues)?,
        };
        // The first of several matches on one name applies (Gateway API).
        out.entry(name).or_insert(m);
    }
    Some(out)
}

/// A backendRef as a backend, or None (reported) when it names no Service.
fn backend(ns: &str, b: &api::BackendRef, at: &str, issues: &mut Vec<Issue>) -> Option<Backend> {
    let group = b.group.as_deref().unwrap_or("");
    let kind = b.kind.as_deref().unwrap_or("Service");
    if !group.is_empty() || kind != "Service" {
        issues.push(Issue::error(
            at,
            format!("{kind} backends are not supported (Services only): this backend is dropped"),
        ));
        return None;
    }
    if b.namespace.as_deref().is_some_and(|n| n != ns) {
        issues.push(Issue::not_enforced(
            format!("{at}.namespace"),
            "a backend in another namespace (no ReferenceGrant is checked)",
        ));
    }
    let weight = match b.weight {
        None => 1,
        Some(w) => match u32::try_from(w) {
            Ok(w) => w,
            Err(_) => {
                issues.push(Issue::error(
                    format!("{at}.weight"),
                    format!("{w} is not a weight: this backend is dropped"),
                ));
                return None;
            }
        },
    };
    let mut out = Backend {
        service: format!("{}/{}", b.namespace.as_deref().unwrap_or(ns), b.name),
        port: b.port,
        subset: None,
        weight,
        ..Default::default()
    };
    for (k, f) in b.filters.iter().enumerate() {
        let fat = format!("{at}.filters[{k}]");
        match (f.kind, &f.request_header_modifier, &f.response_header_modifier) {
            (api::FilterType::RequestHeaderModifier, Some(m), _) => out.request_headers = header_ops(m),
            (api::FilterType::ResponseHeaderModifier, _, Some(m)) => out.response_headers = header_ops(m),
            _ => issues.push(Issue::error(
                fat,
                "only RequestHeaderModifier and ResponseHeaderModifier are supported on a backend: this filter is ignored",
            )),
        }
    }
    Some(out)
}

fn header_ops(m: &api::HeaderModifier) -> HeaderOps {
    let pairs = |v: &[api::HttpHeader]| {
        v.iter()
            .map(|h| (h.name.to_ascii_lowercase(), h.value.clone()))
            .collect()
    };
    HeaderOps {
        set: pairs(&m.set),
        add: pairs(&m.add),
        remove: m.remove.iter().map(|r| r.to_ascii_lowercase()).collect(),
    }
}

/// What a rule's filters do to its routes.
#[derive(Default)]
struct Actions {
    request_headers: HeaderOps,
    response_headers: HeaderOps,
    mirrors: Vec<Mirror>,
    redirect: Option<Redirect>,
    rewrite: Option<Rewrite>,
}

/// The filters of a rule; None (reported) when one makes the rule
/// inapplicable.
fn filters(ns: &str, fs: &[api::HttpRouteFilter], at: &str, grpc: bool, issues: &mut Vec<Issue>) -> Option<Actions> {
    let mut a = Actions::default();
    let mut ok = true;
    for (k, f) in fs.iter().enumerate() {
        let fat = format!("{at}.filters[{k}]");
        let missing = |issues: &mut Vec<Issue>, what: &str| {
            issues.push(Issue::error(
                fat.clone(),
                format!("type {:?} without {what}: the rule is not applied", f.kind),
            ));
            false
        };
        use api::FilterType as T;
        match f.kind {
            T::RequestHeaderModifier => match &f.request_header_modifier {
                Some(m) => a.request_headers = header_ops(m),
                None => ok &= missing(issues, "requestHeaderModifier"),
            },
            T::ResponseHeaderModifier => match &f.response_header_modifier {
                Some(m) => a.response_headers = header_ops(m),
                None => ok &= missing(issues, "responseHeaderModifier"),
            },
            T::RequestMirror => match &f.request_mirror {
                Some(m) => {
                    let percent = match (m.percent, &m.fraction) {
                        (Some(p), _) => f64::from(p.min(100)),
                        (None, Some(fr)) => {
                            let den = fr.denominator.unwrap_or(100).max(1);
                            (f64::from(fr.numerator) * 100.0 / f64::from(den)).clamp(0.0, 100.0)
                        }
                        (None, None) => 100.0,
                    };
                    if let Some(backend) =
                        backend(ns, &m.backend_ref, &format!("{fat}.requestMirror.backendRef"), issues)
                    {
                        a.mirrors.push(Mirror { backend, percent });
                    }
                }
                None => ok &= missing(issues, "requestMirror"),
            },
            T::RequestRedirect if !grpc => match &f.request_redirect {
                Some(r) => {
                    let (path, prefix) = path_modifier(r.path.as_ref(), &format!("{fat}.requestRedirect.path"), issues);
                    a.redirect = Some(Redirect {
                        scheme: r.scheme.clone(),
                        authority: r.hostname.clone(),
                        port: r.port,
                        path,
                        prefix,
                        // Gateway API's default redirect status.
                        status: r.status_code.unwrap_or(302),
                    });
                }
                None => ok &= missing(issues, "requestRedirect"),
            },
            T::UrlRewrite if !grpc => match &f.url_rewrite {
                Some(r) => {
                    let (full_path, prefix) = path_modifier(r.path.as_ref(), &format!("{fat}.urlRewrite.path"), issues);
                    a.rewrite = Some(Rewrite {
                        prefix,
                        full_path,
                        authority: r.hostname.clone(),
                    });
                }
                None => ok &= missing(issues, "urlRewrite"),
            },
            T::Cors => issues.push(Issue::not_enforced(fat, "the CORS filter")),
            other => {
                issues.push(Issue::error(
                    fat,
                    format!("{other:?} filters are not supported here: the rule is not applied"),
                ));
                ok = false;
            }
        }
    }
    ok.then_some(a)
}

/// (full path, prefix) of a path modifier.
fn path_modifier(p: Option<&api::PathModifier>, at: &str, issues: &mut Vec<Issue>) -> (Option<String>, Option<String>) {
    let Some(p) = p else { return (None, None) };
    match p.kind {
        api::PathModifierType::ReplaceFullPath => (p.replace_full_path.clone().or(Some("/".into())), None),
        api::PathModifierType::ReplacePrefixMatch => {
            if p.replace_prefix_match.is_none() {
                issues.push(Issue::warning(
                    at,
                    "ReplacePrefixMatch without replacePrefixMatch: \"/\" is used",
                ));
            }
            (None, p.replace_prefix_match.clone().or(Some("/".into())))
        }
    }
}

fn ms(d: &crate::model::Duration) -> Option<u64> {
    let ms = u64::try_from(d.value.as_millis()).unwrap_or(u64::MAX);
    (ms > 0).then_some(ms)
}

/// The routes of one rule: one per match, sharing the rule's actions.
struct Rule<'a> {
    label: String,
    at: &'a str,
    matches: Vec<HttpMatch>,
    backend_refs: &'a [api::BackendRef],
    actions: Actions,
    timeout_ms: Option<u64>,
    retries: Option<RetryPolicy>,
}

fn routes(ns: &str, r: Rule<'_>, issues: &mut Vec<Issue>) -> Vec<Ranked> {
    let backends: Vec<Backend> = r
        .backend_refs
        .iter()
        .enumerate()
        .filter_map(|(j, b)| backend(ns, b, &format!("{}.backendRefs[{j}]", r.at), issues))
        .collect();
    if backends.is_empty() && r.actions.redirect.is_none() {
        issues.push(Issue::error(
            r.at,
            "no backend Ferry can route to and no redirect (the Gateway API answers 500 there): the rule is not applied",
        ));
        return Vec::new();
    }
    r.matches
        .into_iter()
        .enumerate()
        .map(|(j, m)| Ranked {
            rank: Rank::of(&m),
            route: HttpRoute {
                name: format!("{}.matches[{j}]", r.label),
                matches: vec![m],
                backends: backends.clone(),
                timeout_ms: r.timeout_ms,
                retries: r.retries.clone(),
                fault: None,
                mirrors: r.actions.mirrors.clone(),
                request_headers: r.actions.request_headers.clone(),
                response_headers: r.actions.response_headers.clone(),
                rewrite: r.actions.rewrite.clone(),
                redirect: r.actions.redirect.clone(),
            },
        })
        .collect()
}

/// Compiles one HTTPRoute of namespace `ns`.
pub fn http_route(ns: &str, name: &str, spec: &api::HttpRouteSpec, services: &Services) -> (Gamma, Vec<Issue>) {
    let mut issues = Vec::new();
    let parents = parents(ns, &spec.parent_refs, services, &mut issues);
    hostnames(&spec.hostnames, &mut issues);
    let mut http = Vec::new();
    'rules: for (i, rule) in spec.rules.iter().enumerate() {
        let at = format!("spec.rules[{i}]");
        if rule.session_persistence.is_some() {
            issues.push(Issue::not_enforced(
                format!("{at}.sessionPersistence"),
                "sessionPersistence",
            ));
        }
        let mut matches = Vec::new();
        for (j, m) in rule.matches.iter().enumerate() {
            let mat = format!("{at}.matches[{j}]");
            // No path: matched as PathPrefix "/" would be, ranked as Istio
            // ranks a match without a uri (after every path match).
            let uri = match &m.path {
                None => None,
                Some(p) => {
                    let value = p.value.clone().unwrap_or_else(|| "/".into());
                    Some(match p.kind.unwrap_or(api::PathMatchType::PathPrefix) {
                        api::PathMatchType::Exact => StringMatch::Exact(value),
                        api::PathMatchType::PathPrefix => StringMatch::PathPrefix(value),
                        api::PathMatchType::RegularExpression => {
                            match regex(&value, &format!("{mat}.path.value"), &mut issues) {
                                Some(r) => r,
                                None => continue 'rules,
                            }
                        }
                    })
                }
            };
            let Some(headers) = value_matches(&m.headers, &format!("{mat}.headers"), true, &mut issues) else {
                continue 'rules;
            };
            let Some(query_params) = value_matches(&m.query_params, &format!("{mat}.queryParams"), false, &mut issues)
            else {
                continue 'rules;
            };
            matches.push(HttpMatch {
                uri,
                method: m.method.clone().map(StringMatch::Exact),
                headers,
                query_params,
                ..Default::default()
            });
        }
        if matches.is_empty() {
            // No matches: every request, after every rule that matches something.
            matches.push(HttpMatch::default());
        }
        let Some(actions) = filters(ns, &rule.filters, &at, false, &mut issues) else {
            continue;
        };
        let timeouts = rule.timeouts.as_ref();
        let backend_request = timeouts.and_then(|t| t.backend_request.as_ref()).and_then(ms);
        let retries = match &rule.retry {
            None => Some(istio_default_retries()),
            Some(r) if r.attempts == Some(0) => None,
            Some(r) => {
                if r.backoff.is_some() {
                    issues.push(Issue::not_enforced(format!("{at}.retry.backoff"), "retry backoff"));
                }
                let retry_on = if r.codes.is_empty() {
                    istio_default_retries().retry_on
                } else {
                    r.codes.iter().map(|c| RetryOn::Status(*c)).collect()
                };
                Some(RetryPolicy {
                    attempts: r.attempts.unwrap_or(2),
                    per_try_timeout_ms: None,
                    retry_on,
                })
            }
        }
        .map(|mut p| {
            p.per_try_timeout_ms = backend_request;
            p
        });
        if backend_request.is_some() && retries.is_none() {
            issues.push(Issue::warning(
                format!("{at}.timeouts.backendRequest"),
                "retries are off (retry.attempts 0): the request timeout alone applies",
            ));
        }
        let label = rule
            .name
            .clone()
            .unwrap_or_else(|| format!("HTTPRoute {ns}/{name} rules[{i}]"));
        http.extend(routes(
            ns,
            Rule {
                label,
                at: &at,
                matches,
                backend_refs: &rule.backend_refs,
                actions,
                timeout_ms: timeouts.and_then(|t| t.request.as_ref()).and_then(ms),
                retries,
            },
            &mut issues,
        ));
    }
    (
        Gamma {
            parents,
            http,
            tcp: Vec::new(),
        },
        issues,
    )
}

/// A gRPC method match as a path match: `/service/method` exact, a service
/// alone as the prefix `/service/`, a method alone or regular expressions
/// as a regex over the path.
fn grpc_path(m: &api::GrpcMethodMatch, at: &str, issues: &mut Vec<Issue>) -> Option<StringMatch> {
    let (svc, method) = (m.service.as_deref(), m.method.as_deref());
    match (m.kind.unwrap_or(api::ValueMatchType::Exact), svc, method) {
        (_, None, None) => {
            issues.push(Issue::error(
                at,
                "service or method is required: the rule is not applied",
            ));
            None
        }
        (api::ValueMatchType::Exact, Some(s), Some(me)) => Some(StringMatch::Exact(format!("/{s}/{me}"))),
        (api::ValueMatchType::Exact, Some(s), None) => Some(StringMatch::Prefix(format!("/{s}/"))),
        (api::ValueMatchType::Exact, None, Some(me)) => regex(&format!("/[^/]+/{}", regex_escape(me)), at, issues),
        (api::ValueMatchType::RegularExpression, s, me) => regex(
            &format!("/(?:{})/(?:{})", s.unwrap_or("[^/]+"), me.unwrap_or("[^/]+")),
            at,
            issues,
        ),
    }
}

fn regex_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let esc = "\\.+*?()|[]{}^$#&-~".contains(c);
            esc.then_some('\\').into_iter().chain(std::iter::once(c))
        })
        .collect()
}

/// Compiles one GRPCRoute of namespace `ns`.
pub fn grpc_route(ns: &str, name: &str, spec: &api::GrpcRouteSpec, services: &Services) -> (Gamma, Vec<Issue>) {
    let mut issues = Vec::new();
    let parents = parents(ns, &spec.parent_refs, services, &mut issues);
    hostnames(&spec.hostnames, &mut issues);
    let mut http = Vec::new();
    'rules: for (i, rule) in spec.rules.iter().enumerate() {
        let at = format!("spec.rules[{i}]");
        if rule.session_persistence.is_some() {
            issues.push(Issue::not_enforced(
                format!("{at}.sessionPersistence"),
                "sessionPersistence",
            ));
        }
        let mut matches = Vec::new();
        for (j, m) in rule.matches.iter().enumerate() {
            let mat = format!("{at}.matches[{j}]");
            let uri = match &m.method {
                Some(mm) => match grpc_path(mm, &format!("{mat}.method"), &mut issues) {
                    Some(u) => Some(u),
                    None => continue 'rules,
                },
                None => None,
            };
            let Some(headers) = value_matches(&m.headers, &format!("{mat}.headers"), true, &mut issues) else {
                continue 'rules;
            };
            matches.push(HttpMatch {
                uri,
                headers,
                ..Default::default()
            });
        }
        if matches.is_empty() {
            matches.push(HttpMatch::default());
        }
        let Some(actions) = filters(ns, &rule.filters, &at, true, &mut issues) else {
            continue;
        };
        let label = rule
            .name
            .clone()
            .unwrap_or_else(|| format!("GRPCRoute {ns}/{name} rules[{i}]"));
        http.extend(routes(
            ns,
            Rule {
                label,
                at: &at,
                matches,
                backend_refs: &rule.backend_refs,
                actions,
                timeout_ms: None,
                retries: Some(istio_default_retries()),
            },
            &mut issues,
        ));
    }
    (
        Gamma {
            parents,
            http,
            tcp: Vec::new(),
        },
        issues,
    )
}

/// Compiles one TCPRoute of namespace `ns`: its first rule's weighted
/// backends (TCP has nothing to match on; later rules are reported).
pub fn tcp_route(ns: &str, spec: &api::TcpRouteSpec, services: &Services) -> (Gamma, Vec<Issue>) {
    let mut issues = Vec::new();
    let parents = parents(ns, &spec.parent_refs, services, &mut issues);
    let mut tcp = Vec::new();
    for (i, rule) in spec.rules.iter().enumerate() {
        let at = format!("spec.rules[{i}]");
        if i > 0 {
            issues.push(Issue::warning(
                at,
                "only the first rule of a TCPRoute applies (TCP has nothing to match on)",
            ));
            continue;
        }
        let backends: Vec<Backend> = rule
            .backend_refs
            .iter()
            .enumerate()
            .filter_map(|(j, b)| backend(ns, b, &format!("{at}.backendRefs[{j}]"), &mut issues))
            .collect();
        if backends.is_empty() {
            issues.push(Issue::error(
                at,
                "no backend Ferry can route to: the rule is not applied",
            ));
            continue;
        }
        tcp.push(TcpRoute {
            port: None,
            source_labels: BTreeMap::new(),
            backends,
        });
    }
    (
        Gamma {
            parents,
            http: Vec::new(),
            tcp,
        },
        issues,
    )
}
