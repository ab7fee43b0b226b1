//! The cluster as Ferry reads it: one typed model for every source
//! (Kubernetes watches, a directory of YAML), parsed and validated once.
//! Kubernetes core types come from k8s-openapi; Istio and Gateway API types
//! are defined in [`istio`] and [`gateway`], Ferry's own in [`ferry`].

pub mod ferry;
pub mod gateway;
pub mod istio;
pub mod parse;

use std::{collections::BTreeMap, fmt, sync::Arc};

use ferry_model::authz::{AuthorizationPolicySpec, AuthzPolicy};
use k8s_openapi::{
    api::{
        core::v1::{Namespace, Node, Pod, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::{Deserialize, Serialize};

pub use parse::{parse_file, Doc};

/// An Istio or Gateway API object: the common envelope around its spec.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Custom<S> {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: S,
    /// Written by controllers; read by nobody here.
    #[serde(default, skip_serializing)]
    pub status: Option<serde_json::Value>,
}

/// Objects are shared (Arc): a snapshot of the cluster is cheap to take.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Namespace(Arc<Namespace>),
    /// Read for its topology labels (the locality of its pods).
    Node(Arc<Node>),
    Pod(Arc<Pod>),
    Service(Arc<Service>),
    EndpointSlice(Arc<EndpointSlice>),
    PeerAuthentication(Arc<ferry_model::peer_auth::PeerAuthentication>),
    /// The spec is the model's (`ferry_model::authz`): the type the agent enforces.
    AuthorizationPolicy(Arc<Custom<AuthorizationPolicySpec>>),
    VirtualService(Arc<Custom<istio::VirtualServiceSpec>>),
    DestinationRule(Arc<Custom<istio::DestinationRuleSpec>>),
    HttpRoute(Arc<Custom<gateway::HttpRouteSpec>>),
    GrpcRoute(Arc<Custom<gateway::GrpcRouteSpec>>),
    TcpRoute(Arc<Custom<gateway::TcpRouteSpec>>),
    /// Ferry's `RateLimitPolicy` (ferry.dev/v1alpha1).
    RateLimitPolicy(Arc<Custom<ferry::RateLimitPolicySpec>>),
    /// A kind Ferry reads nothing from (Deployment, ConfigMap...): accepted as is.
    Other,
}

/// Where an object is: kind, namespace ("" for cluster-scoped) and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Key {
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
    Info,
}

/// One finding: where (file and line when known), which object, which
/// field, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub severity: Severity,
    pub file: String,
    pub line: Option<usize>,
    pub object: String,
    pub field: String,
    pub reason: String,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Info => "info",
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = self.severity.as_str();
        write!(f, "{sev}: {}", self.file)?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
        }
        if !self.object.is_empty() {
            write!(f, ": {}", self.object)?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.reason)
    }
}

/// Every object of the cluster, by key, with where it came from.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Cluster {
    pub objects: BTreeMap<Key, Located>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Located {
    pub object: Object,
    pub file: String,
    pub line: Option<usize>,
}

impl Cluster {
    pub fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.objects.values().filter_map(|l| match &l.object {
            Object::Pod(p) => Some(p.as_ref()),
            _ => None,
        })
    }

    pub fn services(&self) -> impl Iterator<Item = &Service> {
        self.objects.values().filter_map(|l| match &l.object {
            Object::Service(s) => Some(s.as_ref()),
            _ => None,
        })
    }

    pub fn node(&self, name: &str) -> Option<&Node> {
        let key = Key {
            kind: "Node".into(),
            namespace: String::new(),
            name: name.into(),
        };
        match self.objects.get(&key).map(|l| &l.object) {
            Some(Object::Node(n)) => Some(n),
            _ => None,
        }
    }

    pub fn namespace(&self, name: &str) -> Option<&Namespace> {
        let key = Key {
            kind: "Namespace".into(),
            namespace: String::new(),
            name: name.into(),
        };
        match self.objects.get(&key).map(|l| &l.object) {
            Some(Object::Namespace(n)) => Some(n),
            _ => None,
        }
    }

    /// Every AuthorizationPolicy, as the agent holds it (namespace from its key).
    pub fn authorization_policies(&self) -> impl Iterator<Item = (&Key, &Located, AuthzPolicy)> {
        self.objects.iter().filter_map(|(k, l)| match &l.object {
            Object::AuthorizationPolicy(p) => Some((k, l, authz_policy(k, p))),
            _ => None,
        })
    }

    pub fn service(&self, namespace: &str, name: &str) -> Option<&Service> {
        let key = Key {
            kind: "Service".into(),
            namespace: namespace.into(),
            name: name.into(),
        };
        match self.objects.get(&key).map(|l| &l.object) {
            Some(Object::Service(s)) => Some(s),
            _ => None,
        }
    }
}

/// The model's policy for the object at `key` (its namespace is the key's:
/// `default` when the object names none).
pub fn authz_policy(key: &Key, p: &Custom<AuthorizationPolicySpec>) -> AuthzPolicy {
    AuthzPolicy {
        name: key.name.clone(),
        namespace: key.namespace.clone(),
        spec: p.spec.clone(),
    }
}

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A Go/Istio duration ("7s", "5m", "1h30m", "0.5s", "100ms"), kept as text
/// and checked when parsed.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Duration {
    pub text: String,
    #[serde(skip)]
    pub value: std::time::Duration,
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let value = parse_duration(&text).map_err(serde::de::Error::custom)?;
        Ok(Self { text, value })
    }
}

pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let bad = || format!("{s:?} is not a duration (such as 500ms, 7s, 5m, 1h)");
    if s.is_empty() {
        return Err(bad());
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(bad)?;
        let (num, tail) = rest.split_at(num_len);
        let n: f64 = num.parse().map_err(|_| bad())?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += n * scale;
        rest = tail;
    }
    std::time::Duration::try_from_secs_f64(total).map_err(|_| format!("{s:?} is out of range for a duration"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("7s").unwrap().as_secs(), 7);
        assert_eq!(parse_duration("5m").unwrap().as_secs(), 300);
        assert_eq!(parse_duration("1h30m").unwrap().as_secs(), 5400);
        assert_eq!(parse_duration("0.5s").unwrap().as_millis(), 500);
        assert_eq!(parse_duration("100ms").unwrap().as_millis(), 100);
        for bad in ["", "7", "s", "7 s", "7x", "1..2s", "99999999999999999999h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
