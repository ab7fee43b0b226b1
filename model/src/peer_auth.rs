//! Peer authentication (Istio's `PeerAuthentication`, same shape and field
//! names): which inbound connections a workload accepts. Decisions are pure
//! functions of the workload and the policies.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::workload::Workload;

/// Istio's root namespace: a policy there applies mesh-wide.
pub const ROOT_NAMESPACE: &str = "istio-system";

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthentication {
    #[serde(default = "api_version")]
    pub api_version: String,
    #[serde(default = "kind")]
    pub kind: String,
    pub metadata: Metadata,
    #[serde(default)]
    pub spec: PeerAuthenticationSpec,
}

fn api_version() -> String {
    "security.istio.io/v1beta1".into()
}
fn kind() -> String {
    "PeerAuthentication".into()
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    pub name: String,
    /// Omitted: `default` (as kubectl would apply it).
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthenticationSpec {
    #[serde(default)]
    pub selector: Option<Selector>,
    #[serde(default)]
    pub mtls: Option<Mtls>,
    /// Per-port overrides (accepted; enforced per port once L4 policy lands).
    #[serde(default)]
    pub port_level_mtls: BTreeMap<String, Mtls>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Selector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Mtls {
    #[serde(default)]
    pub mode: Mode,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Mode {
    /// Inherit from the enclosing scope.
    #[default]
    Unset,
    Permissive,
    Strict,
    /// Istio's DISABLE: plaintext only; Ferry treats it as PERMISSIVE inbound.
    Disable,
}

impl PeerAuthentication {
    pub fn namespace(&self) -> &str {
        self.metadata.namespace.as_deref().unwrap_or("default")
    }
    fn mode(&self) -> Mode {
        self.spec.mtls.as_ref().map_or(Mode::Unset, |m| m.mode)
    }
}

/// The effective mode for inbound plaintext to `w`: the most specific policy
/// that sets a mode wins (workload selector, then namespace, then mesh-wide in
/// the root namespace); with none, PERMISSIVE. Among equals, the oldest (first)
/// wins, as in Istio.
pub fn mode_for(w: &Workload, policies: &[PeerAuthentication]) -> Mode {
    let selects = |p: &PeerAuthentication| match &p.spec.selector {
        Some(s) => s.match_labels.iter().all(|(k, v)| w.labels.get(k) == Some(v)),
        None => true,
    };
    let pick = |pred: &dyn Fn(&PeerAuthentication) -> bool| {
        policies
            .iter()
            .filter(|p| pred(p) && p.mode() != Mode::Unset)
            .map(|p| p.mode())
            .next()
    };
    pick(&|p| p.namespace() == w.namespace && p.spec.selector.is_some() && selects(p))
        .or_else(|| pick(&|p| p.namespace() == w.namespace && p.spec.selector.is_none()))
        .or_else(|| pick(&|p| p.namespace() == ROOT_NAMESPACE && p.spec.selector.is_none()))
        .unwrap_or(Mode::Permissive)
}

/// The PeerAuthentication documents of a multi-document YAML text; other kinds
/// are skipped (they belong to other parts of the mesh).
pub fn peer_authentications_in(text: &str) -> Result<Vec<PeerAuthentication>, String> {
    let mut out = Vec::new();
    for (line, doc) in crate::yaml::split_documents(text) {
        let v: serde_norway::Value =
            serde_norway::from_str(&doc).map_err(|e| format!("document at line {line}: {e}"))?;
        if v.get("kind").and_then(|k| k.as_str()) == Some("PeerAuthentication") {
            out.push(
                serde_norway::from_value(v)
                    .map_err(|e| format!("document at line {line} (PeerAuthentication): {e}"))?,
            );
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(ns: &str, app: &str) -> Workload {
        let cfg = crate::config::ConfigFile::parse(
            "t",
            &format!("node: n\nworkloads: [{{uid: u, name: p, namespace: {ns}, node: n, ip: 10.0.0.1, labels: {{app: {app}}}}}]"),
        )
        .unwrap();
        cfg.workloads.into_iter().next().unwrap()
    }

    fn pa(yaml: &str) -> PeerAuthentication {
        serde_norway::from_str(yaml).unwrap()
    }

    #[test]
    fn most_specific_policy_wins() {
        let mesh = pa("metadata: {name: m, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}");
        let ns = pa("metadata: {name: d, namespace: shop}\nspec: {mtls: {mode: PERMISSIVE}}");
        let wl = pa(
            "metadata: {name: w, namespace: shop}\nspec: {selector: {matchLabels: {app: pay}}, mtls: {mode: STRICT}}",
        );
        assert_eq!(mode_for(&w("shop", "pay"), &[]), Mode::Permissive);
        assert_eq!(mode_for(&w("shop", "pay"), std::slice::from_ref(&mesh)), Mode::Strict);
        assert_eq!(
            mode_for(&w("shop", "pay"), &[mesh.clone(), ns.clone()]),
            Mode::Permissive
        );
        assert_eq!(
            mode_for(&w("shop", "pay"), &[mesh.clone(), ns.clone(), wl.clone()]),
            Mode::Strict
        );
        assert_eq!(mode_for(&w("shop", "web"), &[mesh, ns, wl]), Mode::Permissive);
    }

    #[test]
    fn the_seed_example_is_accepted_as_is() {
        let seed = include_str!("../../tests/fixtures/reviews-routing-circuit-breaking-mtls.yaml");
        let pas = peer_authentications_in(seed).unwrap();
        assert_eq!(pas.len(), 1);
        assert_eq!(
            (pas[0].metadata.name.as_str(), pas[0].namespace()),
            ("default", "default")
        );
        assert_eq!(mode_for(&w("default", "reviews"), &pas), Mode::Strict);
    }
}
