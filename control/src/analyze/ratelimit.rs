//! RateLimitPolicy checks across objects: the target Service exists and has
//! the port named, the limited ports carry HTTP (the destination counts
//! HTTP requests only), per-client rates above the total, and several
//! policies on one Service port. Validation proper (bad numbers, targets
//! that are not Services, identities that are not SPIFFE ids) rejects the
//! object when it is parsed (`crate::model::ferry`).

use std::collections::BTreeMap;

use ferry_model::Protocol;

use super::Ctx;
use crate::model::Severity;

pub(super) fn check(c: &mut Ctx) {
    let policies: Vec<_> = c
        .cluster
        .rate_limit_policies()
        .map(|(k, l, p)| (k.clone(), l.clone(), p))
        .collect();
    // (service, port or every port) -> the policies on it, to report overlaps.
    let mut on: BTreeMap<(&str, Option<u16>), Vec<String>> = BTreeMap::new();
    for (key, at, p) in &policies {
        let name = p.service.split_once('/').map_or(p.service.as_str(), |(_, n)| n);
        let Some(spec) = c.cluster.service(&key.namespace, name).and_then(|s| s.spec.as_ref()) else {
            c.add(
                Severity::Error,
                key,
                at,
                "spec.targetRef".into(),
                format!("no Service {}: the policy limits nothing until it exists", p.service),
            );
            continue;
        };
        let ports: Vec<(u16, Protocol)> = spec
            .ports
            .iter()
            .flatten()
            .filter_map(|sp| {
                let port = u16::try_from(sp.port).ok()?;
                Some((port, Protocol::select(sp.name.as_deref(), sp.app_protocol.as_deref())))
            })
            .collect();
        let limited: Vec<&(u16, Protocol)> = ports
            .iter()
            .filter(|(port, _)| p.port.is_none_or(|want| want == *port))
            .collect();
        if let (Some(want), true) = (p.port, limited.is_empty()) {
            c.add(
                Severity::Error,
                key,
                at,
                "spec.targetRef.port".into(),
                format!("Service {} has no port {want}: the policy limits nothing", p.service),
            );
        }
        if !limited.is_empty() {
            on.entry((p.service.as_str(), p.port))
                .or_default()
                .push(key.name.clone());
        }
        for (port, proto) in limited.iter().filter(|(_, proto)| !proto.is_http()) {
            c.add(
                Severity::Warning,
                key,
                at,
                "spec.targetRef".into(),
                format!(
                    "port {port} of Service {} is {proto}, not HTTP: its traffic is not limited (only HTTP \
                     requests are counted; declare the port http, http2 or grpc by appProtocol or name prefix)",
                    p.service
                ),
            );
        }
        if let Some(total) = p.total_rps {
            let clients = p
                .per_identity_rps
                .map(|r| ("spec.perIdentity.requestsPerSecond".to_owned(), r))
                .into_iter()
                .chain(
                    p.overrides
                        .iter()
                        .enumerate()
                        .map(|(i, o)| (format!("spec.overrides[{i}].requestsPerSecond"), o.rps)),
                );
            for (field, rps) in clients.filter(|(_, rps)| *rps > total) {
                c.add(
                    Severity::Warning,
                    key,
                    at,
                    field,
                    format!("{rps} is more than total.requestsPerSecond ({total}): the total limits first"),
                );
            }
        }
    }
    // Two policies on one Service port: both apply.
    for (key, at, p) in &policies {
        let limits = on
            .iter()
            .any(|((svc, _), names)| *svc == p.service && names.contains(&key.name));
        if !limits {
            continue;
        }
        let others: Vec<&String> = on
            .iter()
            .filter(|((svc, port), _)| *svc == p.service && (port.is_none() || p.port.is_none() || *port == p.port))
            .flat_map(|(_, names)| names)
            .filter(|n| **n != key.name)
            .collect();
        if !others.is_empty() {
            let others: Vec<&str> = others.iter().map(|s| s.as_str()).collect();
            c.add(
                Severity::Warning,
                key,
                at,
                "spec.targetRef".into(),
                format!(
                    "Service {} is also limited by RateLimitPolicy {}: every policy applies (a request must \
                     pass each)",
                    p.service,
                    others.join(", ")
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::{
        analyze::analyze,
        model::{parse_file, Cluster, Located, Severity},
    };

    fn cluster(text: &str) -> Cluster {
        let (docs, problems) = parse_file("c.yaml", text);
        assert!(problems.iter().all(|p| p.severity != Severity::Error), "{problems:?}");
        let mut c = Cluster::default();
        for d in docs {
            c.objects.insert(
                d.key,
                Located {
                    object: d.object,
                    file: "c.yaml".into(),
                    line: Some(d.line),
                },
            );
        }
        c
    }

    #[test]
    fn unknown_targets_missing_ports_tcp_ports_and_overlaps_are_reported() {
        let c = cluster(
            r#"
apiVersion: v1
kind: Service
metadata: {name: reviews}
spec: {clusterIP: 10.96.0.5, selector: {app: reviews}, ports: [{name: http, port: 9080}, {name: tcp-raw, port: 9090}]}
---
apiVersion: ferry.dev/v1alpha1
kind: RateLimitPolicy
metadata: {name: good}
spec: {targetRef: {kind: Service, name: reviews, port: 9080}, total: {requestsPerSecond: 100}, perIdentity: {requestsPerSecond: 20}}
---
apiVersion: ferry.dev/v1alpha1
kind: RateLimitPolicy
metadata: {name: nosvc}
spec: {targetRef: {kind: Service, name: ratings}, total: {requestsPerSecond: 10}}
---
apiVersion: ferry.dev/v1alpha1
kind: RateLimitPolicy
metadata: {name: noport}
spec: {targetRef: {kind: Service, name: reviews, port: 9999}, total: {requestsPerSecond: 10}}
---
apiVersion: ferry.dev/v1alpha1
kind: RateLimitPolicy
metadata: {name: all-ports}
spec:
  targetRef: {kind: Service, name: reviews}
  total: {requestsPerSecond: 10}
  overrides: [{clientIdentities: [cluster.local/ns/default/sa/a], requestsPerSecond: 50}]
"#,
        );
        let found: Vec<String> = analyze(&c)
            .iter()
            .filter(|p| p.object.starts_with("RateLimitPolicy"))
            .map(|p| p.to_string())
            .collect();
        let want = [
            "error: c.yaml:12: RateLimitPolicy default/nosvc: spec.targetRef: no Service default/ratings: the policy limits nothing until it exists",
            "error: c.yaml:17: RateLimitPolicy default/noport: spec.targetRef.port: Service default/reviews has no port 9999: the policy limits nothing",
            "warning: c.yaml:22: RateLimitPolicy default/all-ports: spec.targetRef: port 9090 of Service default/reviews is tcp, not HTTP",
            "warning: c.yaml:22: RateLimitPolicy default/all-ports: spec.overrides[0].requestsPerSecond: 50 is more than total.requestsPerSecond (10): the total limits first",
            "warning: c.yaml:22: RateLimitPolicy default/all-ports: spec.targetRef: Service default/reviews is also limited by RateLimitPolicy good",
            "warning: c.yaml:7: RateLimitPolicy default/good: spec.targetRef: Service default/reviews is also limited by RateLimitPolicy all-ports",
        ];
        for w in want {
            assert!(found.iter().any(|f| f.starts_with(w)), "missing {w:?} in {found:#?}");
        }
        assert_eq!(found.len(), want.len(), "{found:#?}");
    }
}
