//! Text to typed objects: split a multi-document YAML file, read each
//! document's kind, parse it into its type, then check what the types alone
//! cannot. A bad document is reported (file, line, object, field, reason) and
//! skipped; the other documents of the file still load.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use serde::de::DeserializeOwned;

use ferry_model::authz::AuthorizationPolicySpec;

use super::{Custom, Key, Object, Problem, Severity};

/// One good document of a file.
#[derive(Clone, Debug, PartialEq)]
pub struct Doc {
    pub key: Key,
    pub object: Object,
    pub line: usize,
}

/// The annotation (on a pod) and label (on a namespace) that opt in or out.
pub const MESH_ANNOTATION: &str = "ferry.dev/mesh";

/// Kinds with no namespace (their key's namespace is "").
const CLUSTER_SCOPED: &[&str] = &["Namespace", "Node"];

/// (kind, accepted apiVersions). Kinds not listed are accepted and ignored.
const KINDS: &[(&str, &[&str])] = &[
    ("Namespace", &["v1"]),
    ("Node", &["v1"]),
    ("Pod", &["v1"]),
    ("Service", &["v1"]),
    ("EndpointSlice", &["discovery.k8s.io/v1"]),
    (
        "PeerAuthentication",
        &["security.istio.io/v1", "security.istio.io/v1beta1"],
    ),
    (
        "AuthorizationPolicy",
        &["security.istio.io/v1", "security.istio.io/v1beta1"],
    ),
    (
        "VirtualService",
        &[
            "networking.istio.io/v1",
            "networking.istio.io/v1beta1",
            "networking.istio.io/v1alpha3",
        ],
    ),
    (
        "DestinationRule",
        &[
            "networking.istio.io/v1",
            "networking.istio.io/v1beta1",
            "networking.istio.io/v1alpha3",
        ],
    ),
    (
        "HTTPRoute",
        &["gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1beta1"],
    ),
    (
        "GRPCRoute",
        &["gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1alpha2"],
    ),
    ("TCPRoute", &["gateway.networking.k8s.io/v1alpha2"]),
    ("RateLimitPolicy", &["ferry.dev/v1alpha1"]),
];

pub use ferry_model::yaml::split_documents;

pub fn parse_file(file: &str, text: &str) -> (Vec<Doc>, Vec<Problem>) {
    let mut docs = Vec::new();
    let mut problems = Vec::new();
    for (line, doc) in split_documents(text) {
        let mut problem = |severity, object: String, field: &str, reason: String| {
            problems.push(Problem {
                severity,
                file: file.to_owned(),
                line: Some(line),
                object,
                field: field.to_owned(),
                reason,
            })
        };
        let value: serde_norway::Value = match serde_norway::from_str(&doc) {
            Ok(v) => v,
            Err(e) => {
                problem(Severity::Error, String::new(), "", format!("not YAML: {e}"));
                continue;
            }
        };
        if value.is_null() {
            continue; // an empty document (comments only)
        }
        let text_of = |k: &str| value.get(k).and_then(|v| v.as_str()).map(str::to_owned);
        let (Some(api_version), Some(kind)) = (text_of("apiVersion"), text_of("kind")) else {
            problem(
                Severity::Error,
                String::new(),
                "",
                "apiVersion and kind are required".into(),
            );
            continue;
        };
        let meta = value.get("metadata");
        let name = meta
            .and_then(|m| m.get("name"))
            .and_then(|v| v.as_str())
            .unwrap_or_default();
        let namespace = meta
            .and_then(|m| m.get("namespace"))
            .and_then(|v| v.as_str())
            .unwrap_or(if CLUSTER_SCOPED.contains(&kind.as_str()) {
                ""
            } else {
                "default"
            });
        let key = Key {
            kind: kind.clone(),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };
        if name.is_empty() {
            problem(Severity::Error, key.to_string(), "metadata.name", "required".into());
            continue;
        }
        let Some((_, versions)) = KINDS.iter().find(|(k, _)| *k == kind) else {
            problem(
                Severity::Info,
                key.to_string(),
                "",
                format!("{api_version} {kind} is not read by Ferry (accepted, ignored)"),
            );
            docs.push(Doc {
                key,
                object: Object::Other,
                line,
            });
            continue;
        };
        if !versions.contains(&api_version.as_str()) {
            problem(
                Severity::Error,
                key.to_string(),
                "apiVersion",
                format!(
                    "{api_version} is not a version of {kind} Ferry reads ({})",
                    versions.join(", ")
                ),
            );
            continue;
        }
        let object = match typed(&kind, &doc) {
            Ok(o) => o,
            Err(e) => {
                let (field, reason) = split_serde_error(&file_lines(&e, line));
                problem(Severity::Error, key.to_string(), &field, reason);
                continue;
            }
        };
        let errors = validate(&key, &object);
        if errors.is_empty() {
            docs.push(Doc { key, object, line });
        } else {
            for (field, reason) in errors {
                problem(Severity::Error, key.to_string(), &field, reason);
            }
        }
    }
    (docs, problems)
}

fn de<T: DeserializeOwned>(doc: &str) -> Result<T, String> {
    serde_norway::from_str(doc).map_err(|e| e.to_string())
}

fn typed(kind: &str, doc: &str) -> Result<Object, String> {
    Ok(match kind {
        "Namespace" => Object::Namespace(Arc::new(de(doc)?)),
        "Node" => Object::Node(Arc::new(de(doc)?)),
        "Pod" => Object::Pod(Arc::new(de(doc)?)),
        "Service" => Object::Service(Arc::new(de(doc)?)),
        "EndpointSlice" => Object::EndpointSlice(Arc::new(de(doc)?)),
        "PeerAuthentication" => Object::PeerAuthentication(Arc::new(de(doc)?)),
        "AuthorizationPolicy" => Object::AuthorizationPolicy(Arc::new(authorization_policy(doc)?)),
        "VirtualService" => Object::VirtualService(Arc::new(de::<Custom<_>>(doc)?)),
        "DestinationRule" => Object::DestinationRule(Arc::new(de::<Custom<_>>(doc)?)),
        "HTTPRoute" => Object::HttpRoute(Arc::new(de::<Custom<_>>(doc)?)),
        "GRPCRoute" => Object::GrpcRoute(Arc::new(de::<Custom<_>>(doc)?)),
        "TCPRoute" => Object::TcpRoute(Arc::new(de::<Custom<_>>(doc)?)),
        "RateLimitPolicy" => Object::RateLimitPolicy(Arc::new(de::<Custom<_>>(doc)?)),
        _ => Object::Other,
    })
}

/// An AuthorizationPolicy without `spec` is Istio's empty spec (an ALLOW
/// with no rules: allow-nothing), not an error.
fn authorization_policy(doc: &str) -> Result<Custom<AuthorizationPolicySpec>, String> {
    let mut v: serde_norway::Value = serde_norway::from_str(doc).map_err(|e| e.to_string())?;
    if v.get("spec").is_some() {
        return de(doc); // from the text, so errors keep their line numbers
    }
    if let Some(m) = v.as_mapping_mut() {
        m.insert("spec".into(), serde_norway::Value::Mapping(Default::default()));
    }
    serde_norway::from_value(v).map_err(|e| e.to_string())
}

/// Makes serde's "at line N" (within the document) a line of the file.
fn file_lines(e: &str, doc_start: usize) -> String {
    match e.rsplit_once(" at line ") {
        Some((head, tail)) => {
            let (n, rest) = tail.split_once(' ').unwrap_or((tail, ""));
            match n.parse::<usize>() {
                Ok(n) => format!("{head} at line {} {rest}", n + doc_start - 1)
                    .trim_end()
                    .to_owned(),
                Err(_) => e.to_owned(),
            }
        }
        None => e.to_owned(),
    }
}

/// serde_norway says "spec.http[0].fault: unknown field ..., at line 9 column 7":
/// the part before ": " is the field path when it looks like one.
fn split_serde_error(e: &str) -> (String, String) {
    match e.split_once(": ") {
        Some((path, rest))
            if !path.contains(' ') && path.chars().all(|c| c.is_alphanumeric() || "._[]-/".contains(c)) =>
        {
            (path.to_owned(), rest.to_owned())
        }
        _ => (String::new(), e.to_owned()),
    }
}

/// What the types cannot say. Each (field, reason) rejects the object.
fn validate(key: &Key, o: &Object) -> Vec<(String, String)> {
    let mut p = Vec::new();
    match o {
        // The agent's own validation (`ferry_model::authz::validate`): what it
        // would refuse is refused here, with the same field paths.
        Object::AuthorizationPolicy(ap) => {
            for e in ferry_model::authz::validate(&super::authz_policy(key, ap)) {
                match e.split_once(": ") {
                    Some((field, reason)) => p.push((field.to_owned(), reason.to_owned())),
                    None => p.push((String::new(), e)),
                }
            }
        }
        Object::Pod(pod) => validate_pod(pod, &mut p),
        Object::RateLimitPolicy(rl) => {
            if let Err(e) = super::ferry::rate_limit_policy(key, &rl.spec) {
                p.extend(e);
            }
        }
        Object::VirtualService(vs) => {
            if vs.spec.hosts.is_empty() {
                p.push(("spec.hosts".into(), "at least one host is required".into()));
            }
            for (i, r) in vs.spec.http.iter().enumerate() {
                for (j, m) in r.matches.iter().enumerate() {
                    let named = m.headers.iter().chain(&m.query_params).chain(&m.without_headers);
                    let fields = [("uri", &m.uri), ("method", &m.method), ("authority", &m.authority)];
                    let bad = fields
                        .iter()
                        .filter_map(|(f, v)| v.as_ref().map(|v| (f.to_string(), v)))
                        .chain(named.map(|(k, v)| (format!("headers.{k}"), v)))
                        .filter(|(_, v)| !v.is_one_of_exact_prefix_regex());
                    for (f, _) in bad {
                        p.push((
                            format!("spec.http[{i}].match[{j}].{f}"),
                            "exactly one of exact, prefix, regex is required".into(),
                        ));
                    }
                }
                for (j, d) in r.route.iter().enumerate() {
                    if let Some(w) = d.weight.filter(|w| !(0..=100).contains(w)) {
                        p.push((format!("spec.http[{i}].route[{j}].weight"), format!("{w} is not 0-100")));
                    }
                    if d.destination.host.is_empty() {
                        p.push((format!("spec.http[{i}].route[{j}].destination.host"), "required".into()));
                    }
                }
                if let Some(f) = &r.fault {
                    let pct = |v: f64, at: String, p: &mut Vec<(String, String)>| {
                        if !(0.0..=100.0).contains(&v) {
                            p.push((at, format!("{v} is not a percentage (0-100)")));
                        }
                    };
                    if let Some(d) = &f.delay {
                        if let Some(x) = d.percent {
                            pct(x as f64, format!("spec.http[{i}].fault.delay.percent"), &mut p);
                        }
                        if let Some(x) = &d.percentage {
                            pct(x.value, format!("spec.http[{i}].fault.delay.percentage.value"), &mut p);
                        }
                    }
                    if let Some(a) = &f.abort {
                        if let Some(x) = &a.percentage {
                            pct(x.value, format!("spec.http[{i}].fault.abort.percentage.value"), &mut p);
                        }
                        match a.http_status {
                            Some(s) if !(200..=599).contains(&s) => p.push((
                                format!("spec.http[{i}].fault.abort.httpStatus"),
                                format!("{s} is not an HTTP status"),
                            )),
                            None if a.grpc_status.is_none() => p.push((
                                format!("spec.http[{i}].fault.abort"),
                                "httpStatus or grpcStatus is required".into(),
                            )),
                            _ => {}
                        }
                    }
                }
            }
        }
        Object::DestinationRule(dr) => {
            if dr.spec.host.is_empty() {
                p.push(("spec.host".into(), "required".into()));
            }
            let mut seen = std::collections::BTreeSet::new();
            for (i, s) in dr.spec.subsets.iter().enumerate() {
                if !seen.insert(&s.name) {
                    p.push((
                        format!("spec.subsets[{i}].name"),
                        format!("{:?} is defined twice", s.name),
                    ));
                }
            }
        }
        Object::HttpRoute(r) if r.spec.parent_refs.is_empty() => {
            p.push(("spec.parentRefs".into(), "at least one parent is required".into()));
        }
        Object::GrpcRoute(r) if r.spec.parent_refs.is_empty() => {
            p.push(("spec.parentRefs".into(), "at least one parent is required".into()));
        }
        Object::TcpRoute(r) if r.spec.parent_refs.is_empty() => {
            p.push(("spec.parentRefs".into(), "at least one parent is required".into()));
        }
        _ => {}
    }
    p
}

fn validate_pod(pod: &Pod, p: &mut Vec<(String, String)>) {
    let value = pod.metadata.annotations.as_ref().and_then(|a| a.get(MESH_ANNOTATION));
    if let Some(v) = value.filter(|v| !["enabled", "disabled"].contains(&v.as_str())) {
        p.push((
            format!("metadata.annotations[{MESH_ANNOTATION}]"),
            format!("{v:?} is neither \"enabled\" nor \"disabled\""),
        ));
    }
    if let Some(ip) = pod.status.as_ref().and_then(|s| s.pod_ip.as_ref()) {
        if ip.parse::<std::net::IpAddr>().is_err() {
            p.push(("status.podIP".into(), format!("{ip:?} is not an IP address")));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_seed_example_loads_as_is() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures");
        let mut kinds = Vec::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "yaml") {
                let (docs, problems) = parse_file(&p.display().to_string(), &std::fs::read_to_string(&p).unwrap());
                let errors: Vec<_> = problems.iter().filter(|p| p.severity == Severity::Error).collect();
                assert!(errors.is_empty(), "{}: {errors:?}", p.display());
                kinds.extend(docs.into_iter().map(|d| d.key.kind));
            }
        }
        kinds.sort();
        kinds.dedup();
        for k in [
            "Namespace",
            "VirtualService",
            "DestinationRule",
            "PeerAuthentication",
            "Deployment",
        ] {
            assert!(kinds.iter().any(|x| x == k), "{k} missing from {kinds:?}");
        }
    }

    #[test]
    fn bad_documents_are_reported_precisely_and_the_rest_load() {
        let text = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ok}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: typo, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - fault:
      delay: {fixedDelay: 7s, percnt: 100}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: dur}
spec:
  host: reviews
  trafficPolicy: {outlierDetection: {interval: 5 minutes}}
---
apiVersion: v1
kind: Pod
metadata: {name: p, annotations: {ferry.dev/mesh: "yes"}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: w}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews}
      weight: 140
---
kind: Service
---
: [
"#;
        let (docs, problems) = parse_file("f.yaml", text);
        assert_eq!(docs.len(), 1, "{docs:?}");
        assert_eq!(docs[0].key.name, "ok");
        let all: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(problems.len(), 6, "{all:#?}");
        let typo = &problems[0];
        assert_eq!(
            (typo.line, typo.object.as_str()),
            (Some(10), "VirtualService shop/typo")
        );
        assert_eq!(typo.field, "spec.http[0].fault.delay", "{all:#?}");
        assert!(typo.reason.contains("unknown field `percnt`"), "{all:#?}");
        assert!(
            all[1].contains("DestinationRule default/dur")
                && all[1].contains("\"5 minutes\" is not a duration")
                && all[1].contains("at line 24 "),
            "{all:#?}"
        );
        assert!(
            all[2].contains("ferry.dev/mesh") && all[2].contains("\"yes\" is neither"),
            "{all:#?}"
        );
        assert!(
            all[3].contains("spec.http[0].route[0].weight: 140 is not 0-100"),
            "{all:#?}"
        );
        assert!(all[4].contains("apiVersion and kind are required"), "{all:#?}");
        assert!(all[5].contains("not YAML"), "{all:#?}");
    }
}
