//! Who may get which certificate: a node (known by its bootstrap credential)
//! gets certificates only for pods scheduled on it. Pure: the cluster view and
//! the credentials are passed in.

use std::collections::BTreeMap;

use ferry_model::Workload;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("unknown or missing node credential")]
    Unauthenticated,
    #[error("no pod with uid {0}")]
    NoSuchPod(String),
    #[error("node {node} asked for pod {pod} which runs on node {actual}")]
    WrongNode { node: String, pod: String, actual: String },
}

/// The node a credential belongs to.
pub fn node_of<'a>(tokens: &'a BTreeMap<String, String>, token: Option<&str>) -> Result<&'a String, Denied> {
    token
        .and_then(|t| tokens.iter().find(|(_, v)| v.as_str() == t).map(|(n, _)| n))
        .ok_or(Denied::Unauthenticated)
}

/// The SPIFFE id `token`'s node may have certified for pod `uid`.
pub fn authorize(
    tokens: &BTreeMap<String, String>,
    pods: &BTreeMap<String, Workload>,
    token: Option<&str>,
    uid: &str,
) -> Result<String, Denied> {
    let node = node_of(tokens, token)?;
    let w = pods.get(uid).ok_or_else(|| Denied::NoSuchPod(uid.to_owned()))?;
    if &w.node != node {
        return Err(Denied::WrongNode {
            node: node.clone(),
            pod: format!("{}/{}", w.namespace, w.name),
            actual: w.node.clone(),
        });
    }
    Ok(w.spiffe_id().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_pods_own_node_gets_its_certificate() {
        let cfg = ferry_model::ConfigFile::parse(
            "t",
            "node: a\nworkloads: [{uid: p1, name: web, namespace: shop, serviceAccount: web-sa, node: a, ip: 10.0.0.2}]\n",
        )
        .unwrap();
        let pods = cfg.workloads.into_iter().map(|w| (w.uid.clone(), w)).collect();
        let tokens = [
            ("a".to_string(), "tok-a".to_string()),
            ("b".to_string(), "tok-b".to_string()),
        ]
        .into();
        assert_eq!(
            authorize(&tokens, &pods, Some("tok-a"), "p1"),
            Ok("spiffe://cluster.local/ns/shop/sa/web-sa".into())
        );
        assert!(matches!(
            authorize(&tokens, &pods, Some("tok-b"), "p1"),
            Err(Denied::WrongNode { .. })
        ));
        assert_eq!(
            authorize(&tokens, &pods, Some("nope"), "p1"),
            Err(Denied::Unauthenticated)
        );
        assert_eq!(authorize(&tokens, &pods, None, "p1"), Err(Denied::Unauthenticated));
        assert_eq!(
            authorize(&tokens, &pods, Some("tok-a"), "p9"),
            Err(Denied::NoSuchPod("p9".into()))
        );
    }
}
