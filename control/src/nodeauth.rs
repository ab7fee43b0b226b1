//! Which node is calling: the one check behind everything an agent asks for
//! (its config stream subscription, its certificate requests). The answer is
//! a node name; what that node may then have is decided elsewhere
//! ([`crate::authz::authorize`], the stream's own-node rule).
//!
//! Two modes, chosen by `--node-auth`:
//! - **tokens**: a static bootstrap token per node (`--tokens`, a YAML map
//!   node → token, re-read on every check), compared in constant time.
//! - **tokenreview**: the agent's projected service-account token, bound to
//!   its pod and to the audience `ferry-control`. The Kubernetes API server
//!   reviews it (`authentication.k8s.io/v1` TokenReview, with the expected
//!   audience); it must be authenticated, for that audience, for the agent's
//!   service account and bound to a pod; that pod (fetched, its uid checked
//!   so a recreated pod of the same name does not inherit) names the node
//!   (`spec.nodeName`, which must agree with the token's own node claim when
//!   the API server adds one). The rules are pure functions ([`bound_pod`],
//!   [`node_of_pod`]), unit-tested; [`NodeAuth`] does the I/O.
//!
//! Accepted tokens are cached (by SHA-256, `cache_ttl`, 60 s by default,
//! bounded) so a reconnect storm does not become a TokenReview storm, and
//! concurrent checks of one token share one review. Refusals are never
//! cached: they are only shared with checks of the same token that were
//! already waiting for that review. Every call to the API server has a
//! deadline; when it does not answer (or refuses ferry-control) the check
//! fails closed ([`Denied::Unavailable`]), logged and counted
//! ([`NodeAuthStats::unavailable`]).

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus},
    core::v1::Pod,
};
use kube::api::{Api, PostParams};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::authz::Denied;

/// The audience agents' tokens are bound to (the projected volume's
/// `audience`), so a token for ferry-control is no use to the API server,
/// and no other service's token is any use here.
pub const DEFAULT_AUDIENCE: &str = "ferry-control";
/// The agents' service account name in ferry-control's namespace, when
/// `--agent-service-account` is not given.
pub const DEFAULT_AGENT_SERVICE_ACCOUNT: &str = "ferry-agent";
/// How long an accepted token is remembered.
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(60);
/// The longest one check may wait for the API server (TokenReview and Pod GET together).
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(5);

/// `status.user.extra` keys the API server sets for a token bound to a pod.
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
/// Set too on Kubernetes ≥ 1.32 (1.30–1.31 behind ServiceAccountTokenPodNodeInfo).
pub const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";

const SA_PREFIX: &str = "system:serviceaccount:";
/// Longer bearer values are refused without asking the API server.
const MAX_TOKEN_LEN: usize = 16 * 1024;
/// Tokens remembered at most (accepted ones, plus checks in flight).
const MAX_CACHED: usize = 16 * 1024;

/// The username of service account `name` in `namespace`:
/// `system:serviceaccount:<namespace>:<name>`.
pub fn service_account_user(namespace: &str, name: &str) -> String {
    format!("{SA_PREFIX}{namespace}:{name}")
}

/// Whether `user` is a service account's username, `system:serviceaccount:NS:NAME`.
pub fn is_service_account_user(user: &str) -> bool {
    user.strip_prefix(SA_PREFIX)
        .and_then(|r| r.split_once(':'))
        .is_some_and(|(ns, name)| !ns.is_empty() && !name.is_empty() && !name.contains(':'))
}

/// The pod a reviewed token is bound to, as the TokenReview says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BoundPod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The node the API server says the pod was on when the token was issued
    /// (only on Kubernetes versions that add it).
    pub node: Option<String>,
}

impl std::fmt::Display for BoundPod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The one value of `extra[key]`, if it has exactly one, non-empty.
fn one_extra<'a>(status: &'a TokenReviewStatus, key: &str) -> Option<&'a str> {
    let values = status.user.as_ref()?.extra.as_ref()?.get(key)?;
    match values.as_slice() {
        [v] if !v.is_empty() => Some(v),
        _ => None,
    }
}

/// What a TokenReview's answer proves: the pod the token is bound to, if the
/// token is authenticated, valid for `audience` (the server must say so: an
/// audience-unaware authenticator answers with none), the `service_account`
/// user's (`system:serviceaccount:NS:NAME`) and bound to a pod.
pub fn bound_pod(status: &TokenReviewStatus, audience: &str, service_account: &str) -> Result<BoundPod, Denied> {
    if status.authenticated != Some(true) {
        let why = status
            .error
            .as_deref()
            .filter(|e| !e.is_empty())
            .unwrap_or("no reason given");
        return Err(Denied::Rejected(format!(
            "the API server did not authenticate the token ({why})"
        )));
    }
    let audiences = status.audiences.as_deref().unwrap_or_default();
    if !audiences.iter().any(|a| a == audience) {
        return Err(Denied::Rejected(format!(
            "the token is not for audience {audience:?} (the API server reviewed it for {audiences:?})"
        )));
    }
    let user = status
        .user
        .as_ref()
        .and_then(|u| u.username.as_deref())
        .unwrap_or_default();
    if user != service_account {
        return Err(Denied::Rejected(format!(
            "the token is {user:?}'s, not the agents' service account {service_account:?}"
        )));
    }
    let namespace = user
        .strip_prefix(SA_PREFIX)
        .and_then(|r| r.split_once(':'))
        .map(|(ns, _)| ns)
        .filter(|ns| !ns.is_empty())
        .ok_or_else(|| Denied::Rejected(format!("{user:?} is not a service account")))?;
    let (Some(name), Some(uid)) = (one_extra(status, EXTRA_POD_NAME), one_extra(status, EXTRA_POD_UID)) else {
        return Err(Denied::Rejected(
            "the token is not bound to a pod (the agent must present its projected service-account token, \
             not a Secret-based one)"
                .into(),
        ));
    };
    Ok(BoundPod {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        uid: uid.to_owned(),
        node: one_extra(status, EXTRA_NODE_NAME).map(str::to_owned),
    })
}

/// The node a token bound to `bound` belongs to, from the pod as the API
/// server has it now (`None`: it is gone): the same pod (uid), scheduled,
/// and on the node the token names if it names one.
pub fn node_of_pod(bound: &BoundPod, pod: Option<&Pod>) -> Result<String, Denied> {
    let pod = pod.ok_or_else(|| Denied::Rejected(format!("the token's pod {bound} no longer exists")))?;
    let uid = pod.metadata.uid.as_deref().unwrap_or_default();
    if uid != bound.uid {
        return Err(Denied::Rejected(format!(
            "pod {bound} is not the one the token was issued to (uid {uid:?}, the token's {:?})",
            bound.uid
        )));
    }
    let node = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .filter(|n| !n.is_empty())
        .ok_or_else(|| Denied::Rejected(format!("the token's pod {bound} is not scheduled on a node")))?;
    if let Some(claimed) = bound.node.as_deref().filter(|c| *c != node) {
        return Err(Denied::Rejected(format!(
            "the token names node {claimed} but its pod {bound} runs on {node}"
        )));
    }
    Ok(node.to_owned())
}

/// TokenReview mode's settings.
#[derive(Clone, Debug)]
pub struct TokenReviewConfig {
    /// The audience the token must be valid for.
    pub audience: String,
    /// The agents' username, `system:serviceaccount:NS:NAME`.
    pub service_account: String,
    /// How long an accepted token is remembered (0: never).
    pub cache_ttl: Duration,
    /// The longest a check waits for the API server.
    pub deadline: Duration,
}

impl TokenReviewConfig {
    /// The defaults, for the agents' service account `service_account`.
    pub fn new(service_account: String) -> Self {
        Self {
            audience: DEFAULT_AUDIENCE.to_owned(),
            service_account,
            cache_ttl: DEFAULT_CACHE_TTL,
            deadline: DEFAULT_DEADLINE,
        }
    }
}

/// Counters, for tests and the logs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NodeAuthStats {
    /// TokenReviews sent to the API server.
    pub reviews: u64,
    /// Checks answered from the cache (or by a review another check was making).
    pub cache_hits: u64,
    pub accepted: u64,
    /// Credentials refused (unknown, unauthenticated, wrong audience, account, pod or node).
    pub refused: u64,
    /// Checks refused because the API server could not be asked (fail closed).
    pub unavailable: u64,
}

#[derive(Default)]
struct Counters {
    reviews: AtomicU64,
    cache_hits: AtomicU64,
    accepted: AtomicU64,
    refused: AtomicU64,
    unavailable: AtomicU64,
}

/// A check's outcome, kept for the next checks of the same token.
struct Checked {
    at: Instant,
    result: Result<String, Denied>,
}

/// One slot per token (by digest): the async lock makes concurrent checks of
/// one token share one review.
type Slot = Arc<tokio::sync::Mutex<Option<Checked>>>;

struct Reviewer {
    client: kube::Client,
    cfg: TokenReviewConfig,
    slots: Mutex<HashMap<[u8; 32], Slot>>,
}

enum Mode {
    Tokens(PathBuf),
    TokenReview(Box<Reviewer>),
}

/// The node identity check (see the module's documentation).
pub struct NodeAuth {
    mode: Mode,
    counters: Counters,
}

impl NodeAuth {
    /// Static bootstrap tokens: `path` is a YAML map node → token, re-read on
    /// every check (so a rotated token applies at once).
    pub fn tokens(path: PathBuf) -> Self {
        Self {
            mode: Mode::Tokens(path),
            counters: Counters::default(),
        }
    }

    /// Projected service-account tokens, reviewed by the API server `client` talks to.
    pub fn token_review(client: kube::Client, cfg: TokenReviewConfig) -> Self {
        Self {
            mode: Mode::TokenReview(Box::new(Reviewer {
                client,
                cfg,
                slots: Mutex::default(),
            })),
            counters: Counters::default(),
        }
    }

    /// `tokens` or `tokenreview` (the `--node-auth` value).
    pub fn mode(&self) -> &'static str {
        match self.mode {
            Mode::Tokens(_) => "tokens",
            Mode::TokenReview(_) => "tokenreview",
        }
    }

    pub fn stats(&self) -> NodeAuthStats {
        let c = &self.counters;
        NodeAuthStats {
            reviews: c.reviews.load(Ordering::Relaxed),
            cache_hits: c.cache_hits.load(Ordering::Relaxed),
            accepted: c.accepted.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            unavailable: c.unavailable.load(Ordering::Relaxed),
        }
    }

    /// The node whose credential `token` is (the bearer token of a request).
    pub async fn node_of(&self, token: Option<&str>) -> Result<String, Denied> {
        let result = match (token.map(str::trim).filter(|t| !t.is_empty()), &self.mode) {
            (None, _) => Err(Denied::Unauthenticated),
            (Some(t), Mode::Tokens(path)) => match crate::load_tokens(path) {
                Ok(tokens) => crate::authz::node_of(&tokens, Some(t)).cloned(),
                Err(e) => Err(Denied::Unavailable(e.to_string())),
            },
            (Some(t), _) if t.len() > MAX_TOKEN_LEN => Err(Denied::Rejected(format!(
                "a {} byte token is longer than any service-account token",
                t.len()
            ))),
            (Some(t), Mode::TokenReview(r)) => r.node_of(t, &self.counters).await,
        };
        let counter = match &result {
            Ok(_) => &self.counters.accepted,
            Err(Denied::Unavailable(why)) => {
                tracing::error!(mode = self.mode(), reason = %why, "node credential check failed: refusing (fail closed)");
                &self.counters.unavailable
            }
            Err(_) => &self.counters.refused,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        result
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Reviewer {
    async fn node_of(&self, token: &str, counters: &Counters) -> Result<String, Denied> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let asked = Instant::now();
        let Some(slot) = self.slot(key, asked) else {
            // Full of tokens in use: checked, not remembered.
            counters.reviews.fetch_add(1, Ordering::Relaxed);
            return self.review(token).await;
        };
        // A check of the same token in flight finishes within its deadline.
        let wait = self.cfg.deadline + Duration::from_secs(1);
        let mut held = tokio::time::timeout(wait, slot.lock())
            .await
            .map_err(|_| Denied::Unavailable(format!("another check of this token did not finish within {wait:?}")))?;
        if let Some(c) = held.as_ref() {
            let fresh = c.result.is_ok() && c.at.elapsed() < self.cfg.cache_ttl;
            // A refusal is only shared with checks that were waiting for it.
            if fresh || c.at >= asked {
                counters.cache_hits.fetch_add(1, Ordering::Relaxed);
                return c.result.clone();
            }
        }
        counters.reviews.fetch_add(1, Ordering::Relaxed);
        let result = self.review(token).await;
        *held = Some(Checked {
            at: Instant::now(),
            result: result.clone(),
        });
        drop(held);
        if result.is_err() {
            let mut slots = lock(&self.slots);
            // Kept only while checks that want to share it wait on it.
            if slots.get(&key).is_some_and(|s| Arc::ptr_eq(s, &slot)) && Arc::strong_count(&slot) <= 2 {
                slots.remove(&key);
            }
        }
        result
    }

    /// The token's slot, made if new; None when the table is full of
    /// tokens accepted recently or being checked.
    fn slot(&self, key: [u8; 32], now: Instant) -> Option<Slot> {
        let mut slots = lock(&self.slots);
        if let Some(s) = slots.get(&key) {
            return Some(s.clone());
        }
        if slots.len() >= MAX_CACHED {
            let ttl = self.cfg.cache_ttl;
            slots.retain(|_, s| {
                Arc::strong_count(s) > 1
                    || s.try_lock().map_or(true, |c| {
                        c.as_ref()
                            .is_some_and(|c| c.result.is_ok() && now.duration_since(c.at) < ttl)
                    })
            });
            if slots.len() >= MAX_CACHED {
                return None;
            }
        }
        Some(slots.entry(key).or_default().clone())
    }

    /// Asks the API server: the TokenReview, then the token's pod, both
    /// within the one deadline (the client's own retries of 429/503/504 too).
    async fn review(&self, token: &str) -> Result<String, Denied> {
        let deadline = self.cfg.deadline;
        let until = tokio::time::Instant::now() + deadline;
        let late = |what: &str| {
            Denied::Unavailable(format!(
                "{what}: the Kubernetes API server did not answer within {deadline:?}"
            ))
        };
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.cfg.audience.clone()]),
            },
            ..Default::default()
        };
        let reviews = Api::<TokenReview>::all(self.client.clone());
        let answer = tokio::time::timeout_at(until, reviews.create(&PostParams::default(), &review))
            .await
            .map_err(|_| late("TokenReview"))?
            .map_err(|e| api_error("TokenReview", e))?;
        let bound = bound_pod(
            &answer.status.unwrap_or_default(),
            &self.cfg.audience,
            &self.cfg.service_account,
        )?;
        let what = format!("getting pod {bound}");
        let pods = Api::<Pod>::namespaced(self.client.clone(), &bound.namespace);
        let pod = tokio::time::timeout_at(until, pods.get_opt(&bound.name))
            .await
            .map_err(|_| late(&what))?
            .map_err(|e| api_error(&what, e))?;
        node_of_pod(&bound, pod.as_ref())
    }
}

/// Any failure to ask is the API server's (or ferry-control's RBAC), never
/// the caller's: [`Denied::Unavailable`].
fn api_error(what: &str, e: kube::Error) -> Denied {
    match &e {
        kube::Error::Api(s) if s.code == 401 || s.code == 403 => Denied::Unavailable(format!(
            "{what}: the Kubernetes API server refused ferry-control ({} {}); its RBAC needs create on \
             tokenreviews.authentication.k8s.io and get on pods",
            s.code, s.message
        )),
        _ => Denied::Unavailable(format!("{what}: the Kubernetes API server: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::{
        api::{authentication::v1::UserInfo, core::v1::PodSpec},
        apimachinery::pkg::apis::meta::v1::ObjectMeta,
    };

    use super::*;

    const AGENT: &str = "system:serviceaccount:ferry-system:ferry-agent";

    fn status(user: &str, extra: &[(&str, &str)]) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(vec!["ferry-control".into()]),
            user: Some(UserInfo {
                username: Some(user.into()),
                extra: Some(
                    extra
                        .iter()
                        .map(|(k, v)| (k.to_string(), vec![v.to_string()]))
                        .collect::<BTreeMap<_, _>>(),
                ),
                ..Default::default()
            }),
            error: None,
        }
    }

    fn bound_agent() -> TokenReviewStatus {
        status(
            AGENT,
            &[
                (EXTRA_POD_NAME, "ferry-agent-x1"),
                (EXTRA_POD_UID, "uid-1"),
                (EXTRA_NODE_NAME, "n1"),
            ],
        )
    }

    fn pod(uid: &str, node: Option<&str>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("ferry-agent-x1".into()),
                namespace: Some("ferry-system".into()),
                uid: Some(uid.into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: node.map(str::to_owned),
                ..Default::default()
            }),
            status: None,
        }
    }

    fn refused(r: Result<impl std::fmt::Debug, Denied>, says: &str) {
        match r {
            Err(Denied::Rejected(why)) => assert!(why.contains(says), "{why:?} should say {says:?}"),
            other => panic!("refused ({says}) expected, got {other:?}"),
        }
    }

    #[test]
    fn a_reviewed_agent_token_names_its_pod_and_the_pod_its_node() {
        let b = bound_pod(&bound_agent(), "ferry-control", AGENT).unwrap();
        assert_eq!(
            b,
            BoundPod {
                namespace: "ferry-system".into(),
                name: "ferry-agent-x1".into(),
                uid: "uid-1".into(),
                node: Some("n1".into()),
            }
        );
        assert_eq!(node_of_pod(&b, Some(&pod("uid-1", Some("n1")))), Ok("n1".into()));
        // Before Kubernetes added the node claim, the pod alone decides.
        let older = status(AGENT, &[(EXTRA_POD_NAME, "ferry-agent-x1"), (EXTRA_POD_UID, "uid-1")]);
        let b = bound_pod(&older, "ferry-control", AGENT).unwrap();
        assert_eq!(b.node, None);
        assert_eq!(node_of_pod(&b, Some(&pod("uid-1", Some("n2")))), Ok("n2".into()));
    }

    #[test]
    fn what_a_token_review_must_say() {
        let mut revoked = bound_agent();
        revoked.authenticated = Some(false);
        revoked.error = Some("token has been invalidated".into());
        refused(
            bound_pod(&revoked, "ferry-control", AGENT),
            "token has been invalidated",
        );
        let mut silent = bound_agent();
        silent.authenticated = None;
        refused(bound_pod(&silent, "ferry-control", AGENT), "did not authenticate");
        // An authenticator that ignores the requested audience answers with none.
        let mut unaware = bound_agent();
        unaware.audiences = None;
        refused(bound_pod(&unaware, "ferry-control", AGENT), "not for audience");
        let mut other_aud = bound_agent();
        other_aud.audiences = Some(vec!["https://kubernetes.default.svc".into()]);
        refused(bound_pod(&other_aud, "ferry-control", AGENT), "not for audience");
        let other_sa = status(
            "system:serviceaccount:default:default",
            &[(EXTRA_POD_NAME, "web"), (EXTRA_POD_UID, "u")],
        );
        refused(
            bound_pod(&other_sa, "ferry-control", AGENT),
            "not the agents' service account",
        );
        let unbound = status(AGENT, &[]);
        refused(bound_pod(&unbound, "ferry-control", AGENT), "not bound to a pod");
        let mut two = bound_agent();
        if let Some(e) = two.user.as_mut().and_then(|u| u.extra.as_mut()) {
            e.insert(EXTRA_POD_NAME.into(), vec!["a".into(), "b".into()]);
        }
        refused(bound_pod(&two, "ferry-control", AGENT), "not bound to a pod");
        let no_user = TokenReviewStatus {
            user: None,
            ..bound_agent()
        };
        refused(
            bound_pod(&no_user, "ferry-control", AGENT),
            "not the agents' service account",
        );
    }

    #[test]
    fn the_pod_must_be_the_same_one_scheduled_on_the_claimed_node() {
        let b = bound_pod(&bound_agent(), "ferry-control", AGENT).unwrap();
        refused(node_of_pod(&b, None), "no longer exists");
        refused(
            node_of_pod(&b, Some(&pod("uid-2", Some("n1")))),
            "not the one the token was issued to",
        );
        refused(node_of_pod(&b, Some(&pod("uid-1", None))), "not scheduled");
        refused(node_of_pod(&b, Some(&pod("uid-1", Some("")))), "not scheduled");
        refused(
            node_of_pod(&b, Some(&pod("uid-1", Some("n2")))),
            "names node n1 but its pod ferry-system/ferry-agent-x1 runs on n2",
        );
    }

    #[test]
    fn service_account_usernames() {
        assert_eq!(service_account_user("ferry-system", "ferry-agent"), AGENT);
        assert!(is_service_account_user(AGENT));
        for bad in [
            "ferry-agent",
            "system:serviceaccount:ferry-system",
            "system:serviceaccount::ferry-agent",
            "system:serviceaccount:ns:",
            "system:serviceaccount:ns:a:b",
        ] {
            assert!(!is_service_account_user(bad), "{bad}");
        }
    }
}
