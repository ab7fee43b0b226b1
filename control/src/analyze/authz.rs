//! AuthorizationPolicy checks across objects: policies that select nothing,
//! principals of service accounts no pod runs as, and HTTP-only rules where
//! they cannot be checked. Validation proper (what the agent refuses) is
//! `ferry_model::authz::validate`, applied when the policy is parsed.
//!
//! Offline (`ferryctl analyze -f`) pods often have no node or address yet,
//! so pods are taken from the objects, not from the computed view, and a pod
//! backs a Service when the Service's selector matches it (or, with
//! addresses, when it is one of the Service's endpoints).

use std::{collections::BTreeSet, net::Ipv4Addr};

use ferry_model::{
    authz::{self, Action, AuthzPolicy, ROOT_NAMESPACE},
    Protocol, Workload,
};
use k8s_openapi::api::core::v1::Pod;

use super::Ctx;
use crate::model::{Key, Located, Severity};

/// A pod as the checks see it.
struct PodView<'a> {
    workload: Workload,
    /// `(namespace, name)` of the Services it backs.
    services: Vec<(&'a str, &'a str)>,
    /// The protocols of those Services' ports (`port/protocol`), empty when
    /// it backs none.
    ports: Vec<(u16, Protocol)>,
}

impl PodView<'_> {
    /// No port it is reached on carries HTTP (`Protocol::is_http`), or it
    /// backs no Service: the destination checks it at L4 only, for good.
    fn non_http(&self) -> bool {
        self.ports.iter().all(|(_, p)| !p.is_http())
    }
}

fn pods<'a>(c: &Ctx<'a>) -> Vec<PodView<'a>> {
    let services: Vec<_> = c.cluster.services().collect();
    c.cluster
        .pods()
        .filter_map(|p| {
            let workload = workload_of(p)?;
            let mut backs = Vec::new();
            let mut ports = Vec::new();
            for s in &services {
                let ns = s.metadata.namespace.as_deref().unwrap_or("default");
                let (Some(name), Some(spec)) = (s.metadata.name.as_deref(), s.spec.as_ref()) else {
                    continue;
                };
                if backs_service(c, &workload, ns, name, spec) {
                    backs.push((ns, name));
                    ports.extend(protocols(spec));
                }
            }
            Some(PodView {
                workload,
                services: backs,
                ports,
            })
        })
        .collect()
}

fn workload_of(p: &Pod) -> Option<Workload> {
    let spec = p.spec.as_ref();
    let ip = p
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .and_then(|ip| ip.parse().ok())
        .unwrap_or(Ipv4Addr::UNSPECIFIED);
    Some(Workload {
        uid: p.metadata.uid.clone().unwrap_or_default(),
        name: p.metadata.name.clone()?,
        namespace: p.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
        service_account: spec
            .and_then(|s| s.service_account_name.clone().or_else(|| s.service_account.clone()))
            .unwrap_or_else(|| "default".into()),
        node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        ip,
        enrolled: false,
        labels: p.metadata.labels.clone().unwrap_or_default(),
        netns: None,
        host_veth: None,
        workload_name: Some(crate::compute::workload_name(p)).filter(|n| !n.is_empty()),
        // Not read by authorization.
        locality: None,
    })
}

fn backs_service(
    c: &Ctx<'_>,
    w: &Workload,
    ns: &str,
    name: &str,
    spec: &k8s_openapi::api::core::v1::ServiceSpec,
) -> bool {
    let by_selector = w.namespace == ns
        && spec
            .selector
            .as_ref()
            .is_some_and(|sel| !sel.is_empty() && sel.iter().all(|(k, v)| w.labels.get(k) == Some(v)));
    let by_endpoint = !w.ip.is_unspecified()
        && c.view
            .services
            .iter()
            .any(|s| s.namespace == ns && s.name == name && s.endpoints.iter().any(|e| e.ip == w.ip));
    by_selector || by_endpoint
}

fn protocols(spec: &k8s_openapi::api::core::v1::ServiceSpec) -> impl Iterator<Item = (u16, Protocol)> + '_ {
    spec.ports.iter().flatten().filter_map(|p| {
        let port = u16::try_from(p.port).ok()?;
        Some((port, Protocol::select(p.name.as_deref(), p.app_protocol.as_deref())))
    })
}

/// Every AuthorizationPolicy check. Skipped when the input has no pods at
/// all (a file of policies alone would warn on everything).
pub(super) fn check(c: &mut Ctx<'_>) {
    let pods = pods(c);
    if pods.is_empty() {
        return;
    }
    let cluster = c.cluster;
    for (key, at, p) in cluster.authorization_policies() {
        let p = &p;
        let applies: Vec<&PodView> = pods
            .iter()
            .filter(|v| authz::applies_to(p, &v.workload, ROOT_NAMESPACE, &v.services))
            .collect();
        selects_nothing(c, key, at, p, &applies);
        unknown_service_accounts(c, key, at, p, &pods);
        l7_rules(c, key, at, p, &applies);
    }
}

fn selects_nothing(c: &mut Ctx<'_>, key: &Key, at: &Located, p: &AuthzPolicy, applies: &[&PodView]) {
    if !applies.is_empty() {
        return;
    }
    let spec = &p.spec;
    let refs: Vec<String> = spec
        .target_ref
        .iter()
        .chain(&spec.target_refs)
        .map(|r| format!("{} {}", r.kind, r.name))
        .collect();
    let (field, what) = if !refs.is_empty() {
        let field = if spec.target_refs.is_empty() {
            "spec.targetRef"
        } else {
            "spec.targetRefs"
        };
        (field, format!("no pod backs {}", refs.join(", ")))
    } else if let Some(s) = &spec.selector {
        let labels: Vec<String> = s.match_labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let scope = if p.namespace == ROOT_NAMESPACE {
            "in any namespace".to_owned()
        } else {
            format!("in namespace {}", p.namespace)
        };
        (
            "spec.selector",
            format!("no pod has the labels {} {scope}", labels.join(",")),
        )
    } else {
        return; // namespace-wide: an empty namespace is not a mistake
    };
    c.add(
        Severity::Warning,
        key,
        at,
        field.into(),
        format!("selects nothing: {what}; the policy applies to no workload"),
    );
}

/// Principals (`cluster.local/ns/X/sa/Y`), `serviceAccounts` (`X/Y`, `Y`)
/// and `source.principal` conditions naming a service account no pod in
/// namespace X runs as. Values with `*` are exempt.
fn unknown_service_accounts(c: &mut Ctx<'_>, key: &Key, at: &Located, p: &AuthzPolicy, pods: &[PodView]) {
    let used: BTreeSet<(&str, &str)> = pods
        .iter()
        .map(|v| (v.workload.namespace.as_str(), v.workload.service_account.as_str()))
        .collect();
    let mut named: Vec<(String, &str)> = Vec::new();
    for (i, r) in p.spec.rules.iter().enumerate() {
        for (j, f) in r.from.iter().enumerate() {
            let s = &f.source;
            let at = format!("spec.rules[{i}].from[{j}].source");
            for (field, v) in [("principals", &s.principals), ("notPrincipals", &s.not_principals)] {
                named.extend(
                    v.iter()
                        .enumerate()
                        .map(|(k, x)| (format!("{at}.{field}[{k}]"), x.as_str())),
                );
            }
            for (field, v) in [
                ("serviceAccounts", &s.service_accounts),
                ("notServiceAccounts", &s.not_service_accounts),
            ] {
                named.extend(
                    v.iter()
                        .enumerate()
                        .map(|(k, x)| (format!("{at}.{field}[{k}]"), x.as_str())),
                );
            }
        }
        for (j, w) in r.when.iter().enumerate().filter(|(_, w)| w.key == "source.principal") {
            for (field, v) in [("values", &w.values), ("notValues", &w.not_values)] {
                named.extend(
                    v.iter()
                        .enumerate()
                        .map(|(k, x)| (format!("spec.rules[{i}].when[{j}].{field}[{k}]"), x.as_str())),
                );
            }
        }
    }
    for (field, value) in named {
        if value.contains('*') {
            continue;
        }
        let is_principal = !field.contains("erviceAccounts[");
        let parts = if is_principal {
            let spiffe = format!("spiffe://{value}");
            authz::principal_parts(&spiffe).map(|(ns, sa)| (ns.to_owned(), sa.to_owned()))
        } else {
            match value.split_once('/') {
                Some((ns, sa)) => Some((ns.to_owned(), sa.to_owned())),
                None => Some((p.namespace.clone(), value.to_owned())),
            }
        };
        let Some((ns, sa)) = parts else { continue };
        if !used.contains(&(ns.as_str(), sa.as_str())) {
            c.add(
                Severity::Warning,
                key,
                at,
                field,
                format!("{value:?}: no pod in namespace {ns} runs as service account {sa}; the rule never matches it"),
            );
        }
    }
}

/// Rule indices that use an HTTP-only attribute (`authz::needs_http`, rule
/// by rule).
fn l7_rule_indices(p: &AuthzPolicy) -> Vec<usize> {
    (0..p.spec.rules.len())
        .filter(|&i| {
            let mut one = p.clone();
            one.spec.rules = vec![p.spec.rules[i].clone()];
            authz::needs_http(&one)
        })
        .collect()
}

/// What an HTTP-only rule does where it is checked at L4, by action.
fn l4_effect(action: Action) -> &'static str {
    match action {
        Action::Allow => "they never match, so connections they would allow are denied",
        Action::Audit => "they never match, so nothing is audited by them",
        Action::Deny | Action::Custom => {
            "the DENY applies on the rules' other (L4) parts, so every connection matching those is denied"
        }
    }
}

fn names(pods: &[&PodView]) -> String {
    const SHOWN: usize = 3;
    let mut n: Vec<String> = pods.iter().take(SHOWN).map(|v| v.workload.label()).collect();
    if pods.len() > SHOWN {
        n.push(format!("and {} more", pods.len() - SHOWN));
    }
    n.join(", ")
}

/// HTTP-only rules (methods, paths, hosts, `request.headers`, JWT) on
/// workloads whose Service ports are all non-HTTP (or that back no
/// Service): fail closed, for good. On HTTP ports the destination checks
/// each request, so there is nothing to warn about.
fn l7_rules(c: &mut Ctx<'_>, key: &Key, at: &Located, p: &AuthzPolicy, applies: &[&PodView]) {
    if applies.is_empty() || !authz::needs_http(p) {
        return;
    }
    let rules = l7_rule_indices(p);
    let listed: Vec<String> = rules.iter().map(|i| i.to_string()).collect();
    let field = match rules.as_slice() {
        [i] => format!("spec.rules[{i}]"),
        _ => "spec.rules".to_owned(),
    };
    let tcp: Vec<&PodView> = applies.iter().copied().filter(|v| v.non_http()).collect();
    if !tcp.is_empty() {
        let mut ports: BTreeSet<String> = tcp
            .iter()
            .flat_map(|v| v.ports.iter().map(|(n, p)| format!("{n}/{p}")))
            .collect();
        if tcp.iter().any(|v| v.ports.is_empty()) {
            ports.insert("no Service".into());
        }
        c.add(
            Severity::Warning,
            key,
            at,
            field.clone(),
            format!(
                "L7 rules on non-HTTP ports: rule(s) {} use HTTP attributes (methods, paths, hosts, request.headers) \
                 but no port of {} carries HTTP ({}); they cannot be checked there and are denied at \
                 runtime (fail closed): {}",
                listed.join(", "),
                names(&tcp),
                ports.into_iter().collect::<Vec<_>>().join(", "),
                l4_effect(p.spec.action)
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use crate::model::{Problem, Severity};

    /// shop/web (sa web, Service web: HTTP and TCP ports), shop/db (sa db,
    /// Service db: non-HTTP ports only), shop/cron (no Service).
    const PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {serviceAccountName: web, containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop, labels: {app: db}}
spec: {serviceAccountName: db, containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: cron, namespace: shop, labels: {app: cron}}
spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {selector: {app: web}, ports: [{name: http, port: 80}, {name: metrics, port: 9090, appProtocol: tcp}]}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec: {selector: {app: db}, ports: [{name: tcp-pg, port: 5432}, {name: redis, port: 6379}]}
"#;

    fn policy(name: &str, spec: &str) -> String {
        format!(
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: shop}}\nspec: {spec}\n"
        )
    }

    /// The warnings on AuthorizationPolicy shop/`name`.
    fn warnings(pods: &str, name: &str, spec: &str) -> Vec<Problem> {
        let (c, problems) = crate::source::files::parse_cluster("t.yaml", &format!("{pods}{}", policy(name, spec)));
        assert!(problems.iter().all(|p| p.severity != Severity::Error), "{problems:#?}");
        let object = format!("AuthorizationPolicy shop/{name}");
        let found: Vec<Problem> = super::super::analyze(&c)
            .into_iter()
            .filter(|p| p.object == object)
            .collect();
        assert!(found.iter().all(|p| p.severity == Severity::Warning), "{found:#?}");
        found
    }

    fn one(pods: &str, name: &str, spec: &str) -> Problem {
        let mut w = warnings(pods, name, spec);
        assert_eq!(w.len(), 1, "{spec}: {w:#?}");
        w.remove(0)
    }

    #[test]
    fn a_clean_policy_has_no_warning_and_none_says_not_enforced() {
        for spec in [
            "{}",
            "{selector: {matchLabels: {app: web}}, rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/db, cluster.local/ns/other/*]}}]}]}",
            "{targetRefs: [{kind: Service, name: db}], action: DENY, rules: [{to: [{operation: {ports: ['5432']}}]}]}",
            "{rules: [{from: [{source: {serviceAccounts: [web, shop/db], notPrincipals: ['*']}}], when: [{key: source.principal, values: [cluster.local/ns/shop/sa/default]}]}]}",
        ] {
            assert_eq!(warnings(PODS, "p", spec), [], "{spec}");
        }
    }

    #[test]
    fn a_policy_that_selects_nothing_is_a_warning() {
        let w = one(PODS, "p", "{selector: {matchLabels: {app: nope}}, rules: [{}]}");
        assert_eq!(w.field, "spec.selector");
        assert_eq!(
            w.reason,
            "selects nothing: no pod has the labels app=nope in namespace shop; the policy applies to no workload"
        );
        assert_eq!(w.line, Some(27), "the policy's first line (its apiVersion)");
        let w = one(PODS, "p", "{targetRefs: [{kind: Service, name: gone}], rules: [{}]}");
        assert_eq!(
            (w.field.as_str(), w.reason.as_str()),
            (
                "spec.targetRefs",
                "selects nothing: no pod backs Service gone; the policy applies to no workload"
            )
        );
        // Namespace-wide in an empty namespace: not a mistake. No pods at all: no checks.
        let (c, _) = crate::source::files::parse_cluster(
            "t.yaml",
            &format!(
                "{PODS}{}",
                policy("p", "{}").replace("namespace: shop", "namespace: empty")
            ),
        );
        assert!(super::super::analyze(&c).iter().all(|p| !p.object.contains("/p")));
        assert_eq!(warnings("", "p", "{selector: {matchLabels: {app: nope}}}"), []);
    }

    #[test]
    fn principals_of_service_accounts_no_pod_uses_are_warnings() {
        let w = warnings(
            PODS,
            "p",
            "{rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/web, cluster.local/ns/shop/sa/ghost, cluster.local/ns/shop/sa/*]}}, {source: {notPrincipals: [cluster.local/ns/other/sa/x], serviceAccounts: [ghost2, other/ghost3]}}], when: [{key: source.principal, notValues: [cluster.local/ns/shop/sa/ghost4]}]}]}",
        );
        let got: Vec<(&str, &str)> = w.iter().map(|p| (p.field.as_str(), p.reason.as_str())).collect();
        assert_eq!(
            got,
            [
                (
                    "spec.rules[0].from[0].source.principals[1]",
                    "\"cluster.local/ns/shop/sa/ghost\": no pod in namespace shop runs as service account ghost; the rule never matches it"
                ),
                (
                    "spec.rules[0].from[1].source.notPrincipals[0]",
                    "\"cluster.local/ns/other/sa/x\": no pod in namespace other runs as service account x; the rule never matches it"
                ),
                (
                    "spec.rules[0].from[1].source.serviceAccounts[0]",
                    "\"ghost2\": no pod in namespace shop runs as service account ghost2; the rule never matches it"
                ),
                (
                    "spec.rules[0].from[1].source.serviceAccounts[1]",
                    "\"other/ghost3\": no pod in namespace other runs as service account ghost3; the rule never matches it"
                ),
                (
                    "spec.rules[0].when[0].notValues[0]",
                    "\"cluster.local/ns/shop/sa/ghost4\": no pod in namespace shop runs as service account ghost4; the rule never matches it"
                ),
            ]
        );
    }

    #[test]
    fn l7_rules_on_non_http_workloads_fail_closed() {
        let w = one(
            PODS,
            "p",
            "{selector: {matchLabels: {app: db}}, rules: [{to: [{operation: {ports: ['5432']}}]}, {to: [{operation: {methods: [GET]}}]}]}",
        );
        assert_eq!(w.field, "spec.rules[1]");
        assert_eq!(
            w.reason,
            "L7 rules on non-HTTP ports: rule(s) 1 use HTTP attributes (methods, paths, hosts, request.headers) but \
             no port of shop/db carries HTTP (5432/tcp, 6379/redis); they cannot be checked there and are \
             denied at runtime (fail closed): they never match, so connections they would allow are denied"
        );
        // A DENY with an HTTP header condition, by Service.
        let w = one(
            PODS,
            "p",
            "{targetRefs: [{kind: Service, name: db}], action: DENY, rules: [{from: [{source: {namespaces: [shop]}}], when: [{key: 'request.headers[x-user]', values: [bob]}]}]}",
        );
        assert!(w.reason.starts_with("L7 rules on non-HTTP ports: rule(s) 0 "), "{w:?}");
        assert!(
            w.reason.ends_with(
                "the DENY applies on the rules' other (L4) parts, so every connection matching those is denied"
            ),
            "{w:?}"
        );
    }

    #[test]
    fn l7_rules_on_http_workloads_are_checked_per_request() {
        // The destination checks HTTP requests on HTTP ports: no warning
        // for the web pod; the namespace-wide policy warns only for the
        // non-HTTP pods (no Service counts).
        let w = warnings(
            PODS,
            "p",
            "{selector: {matchLabels: {app: web}}, rules: [{to: [{operation: {methods: [GET], paths: [/api/*]}}]}]}",
        );
        assert!(w.is_empty(), "{w:?}");
        let w = warnings(PODS, "p", "{rules: [{to: [{operation: {hosts: [web.shop]}}]}]}");
        let got: Vec<&str> = w.iter().map(|p| p.reason.as_str()).collect();
        assert_eq!(w.len(), 1, "{got:#?}");
        assert!(
            got[0].starts_with("L7 rules on non-HTTP ports")
                && got[0].contains("no port of shop/cron, shop/db carries HTTP (5432/tcp, 6379/redis, no Service)"),
            "{got:#?}"
        );
    }
}
