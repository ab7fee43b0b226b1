//! Ferry's own kinds (group `ferry.dev`): `RateLimitPolicy` (v1alpha1), as
//! the CRD in deploy/daemonset/crds/ratelimitpolicies.ferry.dev.yaml
//! defines it, and its compilation into the model's
//! [`ferry_model::ratelimit::RateLimitPolicy`]. Numbers are read as
//! integers of any size so that a bad one is reported with its field and
//! the CRD's bounds rather than as a type error.

use ferry_model::{
    ratelimit::{RateLimitOverride, RateLimitPolicy},
    SpiffeId,
};
use serde::{Deserialize, Serialize};

use super::{Cluster, Key, Located, Object};

/// The CRD's largest rate (`format: int32`).
pub const MAX_RPS: i64 = i32::MAX as i64;

/// `RateLimitPolicy.spec`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitPolicySpec {
    pub target_ref: TargetRef,
    #[serde(default)]
    pub total: Option<Limit>,
    #[serde(default)]
    pub per_identity: Option<Limit>,
    #[serde(default)]
    pub overrides: Vec<Override>,
}

/// The Service (in the policy's namespace) whose requests are limited.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetRef {
    /// The core group: `""` or absent.
    #[serde(default)]
    pub group: Option<String>,
    pub kind: String,
    pub name: String,
    /// A Service port; every port when absent.
    #[serde(default)]
    pub port: Option<i64>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Limit {
    pub requests_per_second: i64,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Override {
    /// SPIFFE ids, or Istio principals (the same without `spiffe://`).
    pub client_identities: Vec<String>,
    pub requests_per_second: i64,
}

/// The model's policy for the object at `key`, or every (field, reason)
/// that rejects it.
pub fn rate_limit_policy(key: &Key, p: &RateLimitPolicySpec) -> Result<RateLimitPolicy, Vec<(String, String)>> {
    let mut problems = Vec::new();
    let t = &p.target_ref;
    if t.group.as_deref().is_some_and(|g| !g.is_empty()) {
        problems.push((
            "spec.targetRef.group".to_owned(),
            format!(
                "{:?}: only the core group (\"\") is supported",
                t.group.as_deref().unwrap_or_default()
            ),
        ));
    }
    if t.kind != "Service" {
        problems.push((
            "spec.targetRef.kind".to_owned(),
            format!("{:?}: only Service is supported", t.kind),
        ));
    }
    if t.name.is_empty() {
        problems.push(("spec.targetRef.name".to_owned(), "required".to_owned()));
    }
    let port = match t.port {
        None => None,
        Some(n) => match u16::try_from(n).ok().filter(|n| *n != 0) {
            Some(n) => Some(n),
            None => {
                problems.push(("spec.targetRef.port".to_owned(), format!("{n} is not a port (1-65535)")));
                None
            }
        },
    };
    let mut rate = |field: String, v: i64| -> u32 {
        if (1..=MAX_RPS).contains(&v) {
            v as u32
        } else {
            problems.push((field, format!("{v} is not a rate (1-{MAX_RPS} requests per second)")));
            1
        }
    };
    let total_rps = p
        .total
        .as_ref()
        .map(|l| rate("spec.total.requestsPerSecond".into(), l.requests_per_second));
    let per_identity_rps = p
        .per_identity
        .as_ref()
        .map(|l| rate("spec.perIdentity.requestsPerSecond".into(), l.requests_per_second));
    let mut overrides = Vec::new();
    for (i, o) in p.overrides.iter().enumerate() {
        let rps = rate(format!("spec.overrides[{i}].requestsPerSecond"), o.requests_per_second);
        overrides.push((i, o, rps));
    }
    let overrides = overrides
        .into_iter()
        .map(|(i, o, rps)| {
            let mut ids = Vec::new();
            for (k, id) in o.client_identities.iter().enumerate() {
                match client_identity(id) {
                    Some(id) => ids.push(id),
                    None => problems.push((
                        format!("spec.overrides[{i}].clientIdentities[{k}]"),
                        format!(
                            "{id:?} is not a SPIFFE id (spiffe://cluster.local/ns/NS/sa/SA) or an Istio principal \
                             (cluster.local/ns/NS/sa/SA)"
                        ),
                    )),
                }
            }
            RateLimitOverride {
                client_identities: ids,
                rps,
            }
        })
        .collect();
    let policy = RateLimitPolicy {
        name: key.name.clone(),
        namespace: key.namespace.clone(),
        service: format!("{}/{}", key.namespace, t.name),
        port,
        total_rps,
        per_identity_rps,
        overrides,
    };
    if problems.is_empty() {
        // What is left for the model to refuse (no limit at all, an
        // identity listed twice), with the CRD's field names.
        for e in policy.validate() {
            let (field, reason) = e.split_once(": ").unwrap_or(("", e.as_str()));
            let field = match field {
                f if f.starts_with("overrides") => format!("spec.{f}"),
                _ => "spec".to_owned(),
            };
            let reason = reason.replace(
                "at least one of totalRps, perIdentityRps, overrides is required",
                "at least one of total, perIdentity, overrides is required",
            );
            problems.push((field, reason));
        }
    }
    if problems.is_empty() {
        Ok(policy)
    } else {
        Err(problems)
    }
}

/// A client identity as the CRD accepts it: a SPIFFE id, or an Istio
/// principal (the same without `spiffe://`).
pub fn client_identity(s: &str) -> Option<SpiffeId> {
    match s.strip_prefix("spiffe://") {
        Some(_) => s.parse().ok(),
        None => format!("spiffe://{s}").parse().ok(),
    }
}

impl Cluster {
    /// Every valid RateLimitPolicy, as agents hold it (an invalid one never
    /// reaches the cluster: the parser rejects it).
    pub fn rate_limit_policies(&self) -> impl Iterator<Item = (&Key, &Located, RateLimitPolicy)> {
        self.objects.iter().filter_map(|(k, l)| match &l.object {
            Object::RateLimitPolicy(p) => rate_limit_policy(k, &p.spec).ok().map(|p| (k, l, p)),
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{parse_file, Severity};

    const EXAMPLE: &str = include_str!("../../../deploy/daemonset/examples/ratelimitpolicy.yaml");

    #[test]
    fn the_charts_example_parses_into_the_model() {
        let (docs, problems) = parse_file("ratelimitpolicy.yaml", EXAMPLE);
        assert!(problems.is_empty(), "{problems:?}");
        let Object::RateLimitPolicy(p) = &docs[0].object else {
            panic!("{docs:?}")
        };
        let m = rate_limit_policy(&docs[0].key, &p.spec).unwrap();
        assert_eq!(
            m,
            RateLimitPolicy {
                name: "reviews".into(),
                namespace: "default".into(),
                service: "default/reviews".into(),
                port: Some(9080),
                total_rps: Some(100),
                per_identity_rps: Some(20),
                overrides: vec![RateLimitOverride {
                    client_identities: vec![SpiffeId::new("default", "bookinfo-productpage")],
                    rps: 50,
                }],
            }
        );
    }

    #[test]
    fn bad_policies_are_rejected_with_their_fields() {
        let doc = |spec: &str| {
            format!("apiVersion: ferry.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {{name: r, namespace: shop}}\nspec: {spec}\n")
        };
        let cases = [
            (
                "{targetRef: {kind: Service, name: reviews}, total: {requestsPerSecond: 0}}",
                "spec.total.requestsPerSecond: 0 is not a rate (1-2147483647 requests per second)",
            ),
            (
                "{targetRef: {kind: Service, name: reviews}, perIdentity: {requestsPerSecond: 3000000000}}",
                "spec.perIdentity.requestsPerSecond: 3000000000 is not a rate",
            ),
            (
                "{targetRef: {group: apps, kind: Deployment, name: reviews}, total: {requestsPerSecond: 1}}",
                "spec.targetRef.kind: \"Deployment\": only Service is supported",
            ),
            (
                "{targetRef: {group: apps, kind: Service, name: reviews}, total: {requestsPerSecond: 1}}",
                "spec.targetRef.group: \"apps\": only the core group",
            ),
            (
                "{targetRef: {kind: Service, name: reviews, port: 0}, total: {requestsPerSecond: 1}}",
                "spec.targetRef.port: 0 is not a port (1-65535)",
            ),
            (
                "{targetRef: {kind: Service, name: reviews}}",
                "spec: at least one of total, perIdentity, overrides is required",
            ),
            (
                "{targetRef: {kind: Service, name: reviews}, overrides: [{clientIdentities: [productpage], requestsPerSecond: 5}]}",
                "spec.overrides[0].clientIdentities[0]: \"productpage\" is not a SPIFFE id",
            ),
            (
                "{targetRef: {kind: Service, name: reviews}, overrides: [{clientIdentities: [cluster.local/ns/a/sa/b], requestsPerSecond: 5}, {clientIdentities: [spiffe://cluster.local/ns/a/sa/b], requestsPerSecond: 6}]}",
                "spec.overrides[1].clientIdentities[0]: spiffe://cluster.local/ns/a/sa/b is already listed in overrides[0]",
            ),
            (
                "{targetRef: {kind: Service, name: reviews}, total: {requestsPerSecond: \"20\"}}",
                "invalid type: string \"20\"",
            ),
            (
                "{targetRef: {kind: Service, name: reviews}, total: {requestsPerSecond: 1, burst: 5}}",
                "unknown field `burst`",
            ),
        ];
        for (spec, want) in cases {
            let (docs, problems) = parse_file("f.yaml", &doc(spec));
            assert!(docs.is_empty(), "{spec}: accepted");
            let all: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
            assert!(
                problems
                    .iter()
                    .all(|p| p.severity == Severity::Error && p.object == "RateLimitPolicy shop/r"),
                "{all:?}"
            );
            assert!(
                all.iter().any(|p| p.contains(want)),
                "{spec}: want {want:?} in {all:#?}"
            );
        }
        // Istio principals are accepted as SPIFFE ids.
        let (docs, problems) = parse_file(
            "f.yaml",
            &doc("{targetRef: {kind: Service, name: reviews}, overrides: [{clientIdentities: [cluster.local/ns/a/sa/b], requestsPerSecond: 5}]}"),
        );
        assert!(problems.is_empty() && docs.len() == 1, "{problems:?}");
    }
}
