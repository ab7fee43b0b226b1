//! Checks across objects (what `ferryctl analyze` and the control plane's
//! log report): references to services that do not exist, weights that do
//! not add up, routes to services without endpoints, opt-in labels and
//! annotations that do nothing, AuthorizationPolicies that select nothing,
//! name unknown service accounts or have HTTP rules where HTTP is not
//! checked ([`authz`]); RateLimitPolicies whose target or port does not
//! exist or carries no HTTP ([`ratelimit`]); plus
//! everything the route compiler reports (`crate::routes`: which object
//! wins a Service, subsets no DestinationRule defines, fields not
//! supported or not enforced). Parse-level errors (types, unknown fields)
//! come from `model::parse`.

use crate::{
    compute::{mesh_view, MeshView},
    model::{parse::MESH_ANNOTATION, Cluster, Key, Located, Object, Problem, Severity},
};

pub use crate::routes::service_of_host;

mod authz;
mod ratelimit;

struct Ctx<'a> {
    cluster: &'a Cluster,
    view: &'a MeshView,
    out: Vec<Problem>,
}

impl Ctx<'_> {
    fn add(&mut self, severity: Severity, key: &Key, at: &Located, field: String, reason: String) {
        self.out.push(Problem {
            severity,
            file: at.file.clone(),
            line: at.line,
            object: key.to_string(),
            field,
            reason,
        });
    }

    /// Checks one destination: the service exists, has endpoints, and the
    /// subset (if any) is defined.
    fn destination(&mut self, key: &Key, at: &Located, field: String, host: &str, subset: Option<&str>) {
        let Some((ns, name)) = service_of_host(host, &key.namespace) else {
            return;
        };
        if self.cluster.service(&ns, &name).is_none() {
            self.add(
                Severity::Error,
                key,
                at,
                field,
                format!("host {host:?}: no Service {ns}/{name}"),
            );
            return;
        }
        let endpoints = self
            .view
            .services
            .iter()
            .find(|s| s.namespace == ns && s.name == name)
            .map_or(0, |s| s.endpoints.iter().filter(|e| e.ready).count());
        // Offline (analyze -f), pods have no addresses yet: a selector that
        // matches a pod is as good as an endpoint.
        let selected = || {
            let sel = self
                .cluster
                .service(&ns, &name)
                .and_then(|s| s.spec.as_ref()?.selector.clone());
            sel.is_some_and(|sel| {
                !sel.is_empty()
                    && self.cluster.pods().any(|p| {
                        p.metadata.namespace.as_deref().unwrap_or("default") == ns
                            && sel
                                .iter()
                                .all(|(k, v)| p.metadata.labels.as_ref().and_then(|l| l.get(k)) == Some(v))
                    })
            })
        };
        if endpoints == 0 && !selected() {
            self.add(
                Severity::Warning,
                key,
                at,
                field.clone(),
                format!("Service {ns}/{name} has no ready endpoints"),
            );
        }
        // Subsets are checked by the route compiler (an error: crate::routes).
        let _ = subset;
    }
}

fn weights(ws: &[Option<i64>]) -> Option<i64> {
    let given: Vec<i64> = ws.iter().flatten().copied().collect();
    let sum: i64 = given.iter().sum();
    (ws.len() > 1 && sum != 100).then_some(sum)
}

pub fn analyze(cluster: &Cluster) -> Vec<Problem> {
    analyze_with(cluster, &mesh_view(cluster, true))
}

/// As [`analyze`], with the cluster's view already computed.
pub fn analyze_with(cluster: &Cluster, view: &MeshView) -> Vec<Problem> {
    let mut c = Ctx {
        cluster,
        view,
        out: Vec::new(),
    };
    for (key, at) in &cluster.objects {
        match &at.object {
            Object::VirtualService(vs) => {
                for (i, r) in vs.spec.http.iter().enumerate() {
                    for (j, d) in r.route.iter().enumerate() {
                        let field = format!("spec.http[{i}].route[{j}].destination");
                        c.destination(key, at, field, &d.destination.host, d.destination.subset.as_deref());
                    }
                    let ws: Vec<Option<i64>> = r.route.iter().map(|d| d.weight).collect();
                    if let Some(sum) = weights(&ws) {
                        c.add(
                            Severity::Warning,
                            key,
                            at,
                            format!("spec.http[{i}].route"),
                            format!("weights add up to {sum}, not 100"),
                        );
                    }
                }
                for (i, r) in vs.spec.tcp.iter().enumerate() {
                    for (j, d) in r.route.iter().enumerate() {
                        let field = format!("spec.tcp[{i}].route[{j}].destination");
                        c.destination(key, at, field, &d.destination.host, d.destination.subset.as_deref());
                    }
                }
            }
            Object::DestinationRule(dr) => {
                if let Some((ns, name)) = service_of_host(&dr.spec.host, &key.namespace) {
                    if cluster.service(&ns, &name).is_none() {
                        c.add(
                            Severity::Warning,
                            key,
                            at,
                            "spec.host".into(),
                            format!("no Service {ns}/{name}"),
                        );
                    }
                    for (i, s) in dr.spec.subsets.iter().enumerate() {
                        let any = c
                            .view
                            .workloads
                            .iter()
                            .any(|w| w.namespace == ns && s.labels.iter().all(|(k, v)| w.labels.get(k) == Some(v)));
                        if !any && !c.view.workloads.is_empty() {
                            c.add(
                                Severity::Warning,
                                key,
                                at,
                                format!("spec.subsets[{i}]"),
                                format!("no pod has the labels of subset {:?}", s.name),
                            );
                        }
                    }
                }
            }
            Object::GrpcRoute(r) => {
                c.parents(key, at, &r.spec.parent_refs);
                for (i, rule) in r.spec.rules.iter().enumerate() {
                    for (j, b) in rule.backend_refs.iter().enumerate() {
                        c.backend_ref(key, at, format!("spec.rules[{i}].backendRefs[{j}]"), b);
                    }
                }
            }
            Object::TcpRoute(r) => {
                c.parents(key, at, &r.spec.parent_refs);
                for (i, rule) in r.spec.rules.iter().enumerate() {
                    for (j, b) in rule.backend_refs.iter().enumerate() {
                        c.backend_ref(key, at, format!("spec.rules[{i}].backendRefs[{j}]"), b);
                    }
                }
            }
            Object::HttpRoute(r) => {
                for (i, p) in r.spec.parent_refs.iter().enumerate() {
                    let ns = p.namespace.clone().unwrap_or_else(|| key.namespace.clone());
                    if p.is_service() && cluster.service(&ns, &p.name).is_none() {
                        c.add(
                            Severity::Error,
                            key,
                            at,
                            format!("spec.parentRefs[{i}]"),
                            format!("no Service {ns}/{}", p.name),
                        );
                    }
                }
                for (i, rule) in r.spec.rules.iter().enumerate() {
                    for (j, b) in rule.backend_refs.iter().enumerate() {
                        let ns = b.namespace.clone().unwrap_or_else(|| key.namespace.clone());
                        c.destination(
                            key,
                            at,
                            format!("spec.rules[{i}].backendRefs[{j}]"),
                            &format!("{}.{ns}", b.name),
                            None,
                        );
                    }
                }
            }
            Object::Pod(p) => {
                let annotations = p.metadata.annotations.clone().unwrap_or_default();
                for k in annotations
                    .keys()
                    .filter(|k| k.starts_with("ferry.dev/") && *k != MESH_ANNOTATION)
                {
                    c.add(
                        Severity::Warning,
                        key,
                        at,
                        format!("metadata.annotations[{k}]"),
                        "not a Ferry annotation (did you mean ferry.dev/mesh?)".into(),
                    );
                }
                if p.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
                    // Listed for what it is; a warning when it asked to be in the mesh.
                    let ns_labels = cluster
                        .namespace(&key.namespace)
                        .and_then(|n| n.metadata.labels.as_ref());
                    let (severity, asked) = if crate::compute::enrolled(Some(&annotations), ns_labels) {
                        (Severity::Warning, " although its annotation or namespace opts it in")
                    } else {
                        (Severity::Info, "")
                    };
                    c.add(
                        severity,
                        key,
                        at,
                        "spec.hostNetwork".into(),
                        format!(
                            "a host-network pod: not a mesh workload and not captured{asked} (it shares its \
                             node's network namespace and address); its connections carry no mesh identity \
                             (STRICT destinations refuse them), and Services selecting it reach it directly, \
                             at the node's address, without mTLS"
                        ),
                    );
                }
            }
            Object::Namespace(n) => {
                if let Some(v) = n.metadata.labels.as_ref().and_then(|l| l.get(MESH_ANNOTATION)) {
                    if v != "enabled" && v != "disabled" {
                        c.add(
                            Severity::Warning,
                            key,
                            at,
                            format!("metadata.labels[{MESH_ANNOTATION}]"),
                            format!("{v:?} is neither \"enabled\" nor \"disabled\": the namespace is not enrolled"),
                        );
                    }
                }
            }
            _ => {}
        }
    }
    authz::check(&mut c);
    ratelimit::check(&mut c);
    c.out.extend(crate::routes::compile(cluster).problems);
    c.out
}

impl Ctx<'_> {
    fn parents(&mut self, key: &Key, at: &Located, refs: &[crate::model::gateway::ParentRef]) {
        for (i, p) in refs.iter().enumerate() {
            let ns = p.namespace.clone().unwrap_or_else(|| key.namespace.clone());
            if p.is_service() && self.cluster.service(&ns, &p.name).is_none() {
                self.add(
                    Severity::Error,
                    key,
                    at,
                    format!("spec.parentRefs[{i}]"),
                    format!("no Service {ns}/{}", p.name),
                );
            }
        }
    }

    fn backend_ref(&mut self, key: &Key, at: &Located, field: String, b: &crate::model::gateway::BackendRef) {
        let ns = b.namespace.clone().unwrap_or_else(|| key.namespace.clone());
        self.destination(key, at, field, &format!("{}.{ns}", b.name), None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_resolve_like_kubernetes_dns() {
        assert_eq!(
            service_of_host("reviews", "default"),
            Some(("default".into(), "reviews".into()))
        );
        assert_eq!(
            service_of_host("reviews.shop", "default"),
            Some(("shop".into(), "reviews".into()))
        );
        assert_eq!(
            service_of_host("reviews.shop.svc.cluster.local", "default"),
            Some(("shop".into(), "reviews".into()))
        );
        assert_eq!(service_of_host("*.shop", "default"), None);
        assert_eq!(service_of_host("example.com.evil.org.x", "default"), None);
    }
}
