//! Who may get which certificate: a node (known by its credential, see
//! [`crate::nodeauth`]) gets certificates only for pods scheduled on it,
//! with an address or still without one (a pending pod the agent captures
//! with the address from the runtime's CNI ADD needs its certificate before
//! the API server has that address: [`PodIdentity`]). Pure:
//! the cluster view, the credentials and the time are passed in. Static
//! bootstrap tokens are compared in constant time, and an address that keeps
//! presenting bad credentials is throttled ([`FailureLimiter`]).

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use ferry_model::{PendingPod, Workload};
use sha2::{Digest, Sha256};

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("unknown or missing node credential")]
    Unauthenticated,
    /// The credential was checked and refused (TokenReview: why).
    #[error("node credential refused: {0}")]
    Rejected(String),
    /// The credential could not be checked (the Kubernetes API server did
    /// not answer, or refused ferry-control): refused, fail closed.
    #[error("cannot check the node credential now: {0}")]
    Unavailable(String),
    #[error("no pod with uid {0}")]
    NoSuchPod(String),
    #[error("node {node} asked for pod {pod} which runs on node {actual}")]
    WrongNode { node: String, pod: String, actual: String },
    #[error("too many failed credential checks from this address; retry in {retry_in_s}s")]
    Throttled { retry_in_s: u64 },
}

/// Equality of two secrets in time independent of their contents: their
/// SHA-256 digests (fixed length) compared without an early exit.
fn same_secret(a: &str, b: &str) -> bool {
    let (x, y) = (Sha256::digest(a.as_bytes()), Sha256::digest(b.as_bytes()));
    std::hint::black_box(x.iter().zip(y.iter()).fold(0u8, |acc, (p, q)| acc | (p ^ q))) == 0
}

/// The node a credential belongs to. Every known token is compared, in
/// constant time, whatever matches.
pub fn node_of<'a>(tokens: &'a BTreeMap<String, String>, token: Option<&str>) -> Result<&'a String, Denied> {
    let token = token.ok_or(Denied::Unauthenticated)?;
    let mut found = None;
    for (node, t) in tokens {
        if same_secret(t, token) && found.is_none() {
            found = Some(node);
        }
    }
    found.ok_or(Denied::Unauthenticated)
}

/// Failed credential checks per source address: after `max` failures within
/// `window` (counted from the first), the address is refused without a
/// check until the window has passed. Bounded: expired entries are dropped
/// when the table grows past `MAX_TRACKED`.
pub struct FailureLimiter {
    max: u32,
    window: Duration,
    seen: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

const MAX_TRACKED: usize = 4096;

impl Default for FailureLimiter {
    /// 10 failures a minute.
    fn default() -> Self {
        Self::new(10, Duration::from_secs(60))
    }
}

impl FailureLimiter {
    pub fn new(max: u32, window: Duration) -> Self {
        Self {
            max,
            window,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `ip` may try a credential at `now`.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Result<(), Denied> {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        match seen.get(&ip) {
            Some(&(since, n)) if n >= self.max && now.duration_since(since) < self.window => Err(Denied::Throttled {
                retry_in_s: (self.window - now.duration_since(since)).as_secs().max(1),
            }),
            _ => Ok(()),
        }
    }

    /// Records a failed check from `ip` at `now`.
    pub fn failed(&self, ip: IpAddr, now: Instant) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() >= MAX_TRACKED {
            let window = self.window;
            seen.retain(|_, (since, _)| now.duration_since(*since) < window);
        }
        let e = seen.entry(ip).or_insert((now, 0));
        if now.duration_since(e.0) >= self.window {
            *e = (now, 0);
        }
        e.1 += 1;
    }
}

/// A scheduled pod as the CA sees it: where it runs and the identity its
/// certificate carries. Workloads and pending pods alike.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodIdentity {
    pub node: String,
    /// `namespace/name`.
    pub pod: String,
    pub spiffe_id: String,
}

impl From<&Workload> for PodIdentity {
    fn from(w: &Workload) -> Self {
        Self {
            node: w.node.clone(),
            pod: w.label(),
            spiffe_id: w.spiffe_id().to_string(),
        }
    }
}

impl From<&PendingPod> for PodIdentity {
    fn from(p: &PendingPod) -> Self {
        Self {
            node: p.node.clone(),
            pod: p.label(),
            spiffe_id: ferry_model::SpiffeId::new(&p.namespace, &p.service_account).to_string(),
        }
    }
}

/// The SPIFFE id that `node` (already authenticated) may have certified for
/// pod `uid`: only a pod scheduled on that node.
pub fn authorize(node: &str, pods: &BTreeMap<String, PodIdentity>, uid: &str) -> Result<String, Denied> {
    let p = pods.get(uid).ok_or_else(|| Denied::NoSuchPod(uid.to_owned()))?;
    if p.node != node {
        return Err(Denied::WrongNode {
            node: node.to_owned(),
            pod: p.pod.clone(),
            actual: p.node.clone(),
        });
    }
    Ok(p.spiffe_id.clone())
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
        let pods = cfg.workloads.iter().map(|w| (w.uid.clone(), w.into())).collect();
        assert_eq!(
            authorize("a", &pods, "p1"),
            Ok("spiffe://cluster.local/ns/shop/sa/web-sa".into())
        );
        assert!(matches!(authorize("b", &pods, "p1"), Err(Denied::WrongNode { .. })));
        assert_eq!(authorize("a", &pods, "p9"), Err(Denied::NoSuchPod("p9".into())));
    }

    #[test]
    fn a_pending_pod_gets_its_certificate_on_its_own_node_only() {
        // What the CA looks pods up in (`Snapshot::pods`), from a cluster
        // where pod `fresh` is scheduled on node a and has no address yet.
        let cluster = crate::compute::tests::cluster(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: fresh, namespace: shop, uid: p1, annotations: {ferry.dev/mesh: enabled}}\nspec: {nodeName: a, serviceAccountName: web-sa, containers: [{name: c}]}\n",
        );
        let store = crate::config_stream::Store::default();
        store.publish(crate::compute::mesh_view(&cluster, true)).unwrap();
        let snap = store.current();
        assert!(snap.view.workloads.is_empty() && snap.view.pending.len() == 1);
        assert_eq!(
            authorize("a", &snap.pods, "p1"),
            Ok("spiffe://cluster.local/ns/shop/sa/web-sa".into())
        );
        assert_eq!(
            authorize("b", &snap.pods, "p1"),
            Err(Denied::WrongNode {
                node: "b".into(),
                pod: "shop/fresh".into(),
                actual: "a".into()
            })
        );
        // Once it has an address it is a workload: the same answers.
        let cluster = crate::compute::tests::cluster(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: fresh, namespace: shop, uid: p1, annotations: {ferry.dev/mesh: enabled}}\nspec: {nodeName: a, serviceAccountName: web-sa, containers: [{name: c}]}\nstatus: {podIP: 10.1.1.7}\n",
        );
        store.publish(crate::compute::mesh_view(&cluster, true)).unwrap();
        let snap = store.current();
        assert!(snap.view.pending.is_empty() && snap.view.workloads.len() == 1);
        assert!(authorize("a", &snap.pods, "p1").is_ok());
        assert!(matches!(
            authorize("b", &snap.pods, "p1"),
            Err(Denied::WrongNode { .. })
        ));
    }

    #[test]
    fn a_static_token_names_its_node_and_nothing_else_does() {
        let tokens = [
            ("a".to_string(), "tok-a".to_string()),
            ("b".to_string(), "tok-b".to_string()),
        ]
        .into();
        assert_eq!(node_of(&tokens, Some("tok-a")), Ok(&"a".to_string()));
        assert_eq!(node_of(&tokens, Some("tok-b")), Ok(&"b".to_string()));
        assert_eq!(node_of(&tokens, Some("nope")), Err(Denied::Unauthenticated));
        assert_eq!(node_of(&tokens, None), Err(Denied::Unauthenticated));
        // A prefix or an extension of a token is not the token.
        assert_eq!(node_of(&tokens, Some("tok-")), Err(Denied::Unauthenticated));
        assert_eq!(node_of(&tokens, Some("tok-aa")), Err(Denied::Unauthenticated));
    }

    #[test]
    fn repeated_failures_throttle_that_address_only_and_only_for_the_window() {
        let l = FailureLimiter::new(3, Duration::from_secs(60));
        let (bad, good): (IpAddr, IpAddr) = ("10.0.0.9".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let t0 = Instant::now();
        for i in 0..3 {
            assert_eq!(l.check(bad, t0), Ok(()), "attempt {i} is checked");
            l.failed(bad, t0);
        }
        assert!(matches!(
            l.check(bad, t0 + Duration::from_secs(1)),
            Err(Denied::Throttled { .. })
        ));
        assert_eq!(
            l.check(good, t0 + Duration::from_secs(1)),
            Ok(()),
            "another address is unaffected"
        );
        assert_eq!(l.check(bad, t0 + Duration::from_secs(61)), Ok(()), "the window passes");
        l.failed(bad, t0 + Duration::from_secs(61));
        assert_eq!(
            l.check(bad, t0 + Duration::from_secs(62)),
            Ok(()),
            "counting starts again"
        );
    }
}
