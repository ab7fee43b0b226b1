//! Local rate limits: Ferry's `ferry.dev/v1alpha1 RateLimitPolicy` (modelled
//! on Linkerd's `HTTPLocalRateLimitPolicy`) as agents hold it, which
//! requests it applies to, and the token-bucket decision, pure: the caller
//! passes the time (a [`Duration`] since any fixed instant), so every
//! outcome is a table test.
//!
//! What a policy limits: HTTP requests to the pods that back its Service
//! (on its port, or every port), counted by **each destination agent on its
//! own** ([`Buckets`], kept by the agent outside the state snapshot). A
//! Service with backends on three nodes therefore accepts up to three times
//! `totalRps` in all: the limit is per destination agent, as Linkerd's is
//! per proxy.
//!
//! The decision ([`Buckets::check`]), for one request from a client
//! identity (the peer's verified SPIFFE id; `None` for plaintext):
//! - the **total** bucket of the policy, shared by every client;
//! - the client's own bucket: at the rate of the `overrides` entry that
//!   lists its identity (scope `override`), else at `perIdentityRps`
//!   (scope `identity`), else none. Plaintext clients have no identity and
//!   share one bucket (as Linkerd's `None` key), whatever their address;
//! - a request is accepted only if **every** bucket of every policy that
//!   applies has a token, and only then are tokens taken: a client refused
//!   by its own limit does not use up the total for the others (Linkerd
//!   takes the total token first).
//!
//! Burst: a bucket holds one second's worth of tokens (`rps`), and starts
//! full. That is what Linkerd's proxy configures (governor's
//! `Quota::per_second`, whose burst is the rate), so a policy moved from
//! Linkerd keeps its behaviour, and it gives the one bound users can reason
//! about: over any window of `T` seconds a bucket accepts at most
//! `rps * T + rps` requests, and a client sending faster than `rps` gets
//! close to that. A smaller burst would turn a client's ordinary jitter
//! (two requests 1 ms apart) into 429s at low rates; a larger one would let
//! an idle client send several seconds' worth at once.
//!
//! Arithmetic is in integers: a token is [`NANOS_PER_TOKEN`] units, and a
//! bucket at `rps` gains `rps` units per nanosecond, so there is no drift.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt,
    net::{Ipv4Addr, SocketAddrV4},
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{workload::Service, SpiffeId};

/// One RateLimitPolicy, as agents hold it (the control plane compiles it
/// from the CRD: `service` is the `targetRef` in the policy's namespace).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitPolicy {
    pub name: String,
    pub namespace: String,
    /// `namespace/name` of the Service whose requests are limited.
    pub service: String,
    /// Only this Service port (not the target port); every port when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Requests per second for every client together (`total.requestsPerSecond`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_rps: Option<u32>,
    /// Requests per second for each client identity on its own
    /// (`perIdentity.requestsPerSecond`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_identity_rps: Option<u32>,
    /// Rates for listed identities, in place of `per_identity_rps`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<RateLimitOverride>,
}

/// `overrides[]`: each listed identity gets its own bucket at `rps`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitOverride {
    pub client_identities: Vec<SpiffeId>,
    pub rps: u32,
}

/// Which limit refused a request (the `scope` label of
/// `ferry_rate_limited_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// The policy's total, shared by every client.
    Total,
    /// The client identity's own bucket at `perIdentityRps`.
    Identity,
    /// The client identity's own bucket at an override's rate.
    Override,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Total => "total",
            Scope::Identity => "identity",
            Scope::Override => "override",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl RateLimitPolicy {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The client's own limit: an override listing `id`, else the
    /// per-identity rate (plaintext clients, `None`, get the latter).
    pub fn client_limit(&self, id: Option<&SpiffeId>) -> Option<(Scope, u32)> {
        if let Some(id) = id {
            if let Some(o) = self.overrides.iter().find(|o| o.client_identities.contains(id)) {
                return Some((Scope::Override, o.rps));
            }
        }
        self.per_identity_rps.map(|r| (Scope::Identity, r))
    }

    /// Every problem, each with its field path.
    pub fn validate(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.name.is_empty() || self.namespace.is_empty() {
            p.push("name and namespace must not be empty".to_owned());
        }
        match self.service.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {}
            _ => p.push(format!("service: {:?} is not namespace/name", self.service)),
        }
        if self.port == Some(0) {
            p.push("port: 0 is not a port (1-65535)".into());
        }
        if self.total_rps.is_none() && self.per_identity_rps.is_none() && self.overrides.is_empty() {
            p.push("at least one of totalRps, perIdentityRps, overrides is required".into());
        }
        for (field, v) in [("totalRps", self.total_rps), ("perIdentityRps", self.per_identity_rps)] {
            if v == Some(0) {
                p.push(format!("{field}: must be at least 1"));
            }
        }
        let mut seen: BTreeMap<&SpiffeId, usize> = BTreeMap::new();
        for (i, o) in self.overrides.iter().enumerate() {
            if o.rps == 0 {
                p.push(format!("overrides[{i}].rps: must be at least 1"));
            }
            if o.client_identities.is_empty() {
                p.push(format!(
                    "overrides[{i}].clientIdentities: at least one identity is required"
                ));
            }
            for (k, id) in o.client_identities.iter().enumerate() {
                if let Some(j) = seen.insert(id, i) {
                    p.push(format!(
                        "overrides[{i}].clientIdentities[{k}]: {id} is already listed in overrides[{j}]"
                    ));
                }
            }
        }
        p
    }
}

/// The problems of a config's `rateLimits`, each with its path.
pub fn validate_all(policies: &[RateLimitPolicy]) -> Vec<String> {
    let mut p = Vec::new();
    let mut names = BTreeMap::new();
    for (i, r) in policies.iter().enumerate() {
        let at = format!("rateLimits[{i}] ({}/{})", r.namespace, r.name);
        if let Some(j) = names.insert((r.namespace.as_str(), r.name.as_str()), i) {
            p.push(format!("{at}: already defined by rateLimits[{j}]"));
        }
        p.extend(r.validate().into_iter().map(|e| format!("{at}.{e}")));
    }
    p
}

/// The policies that apply at each local app address: (pod IP, target
/// port) of every endpoint in `local` of each policy's Service, for the
/// Service port the policy names (or every port). A Service missing from
/// `services` limits nothing (until it appears). Policies keep their order.
pub fn targets(
    policies: &[Arc<RateLimitPolicy>],
    services: &[Service],
    local: &HashSet<Ipv4Addr>,
) -> HashMap<SocketAddrV4, Vec<Arc<RateLimitPolicy>>> {
    let by_name: HashMap<String, &Service> = services
        .iter()
        .map(|s| (format!("{}/{}", s.namespace, s.name), s))
        .collect();
    let mut out: HashMap<SocketAddrV4, Vec<Arc<RateLimitPolicy>>> = HashMap::new();
    for p in policies {
        let Some(s) = by_name.get(&p.service) else {
            continue;
        };
        for sp in s.ports.iter().filter(|sp| p.port.is_none_or(|port| port == sp.port)) {
            for e in s.endpoints.iter().filter(|e| local.contains(&e.ip)) {
                let at = out.entry(SocketAddrV4::new(e.ip, sp.target_port)).or_default();
                // Two Service ports to one target port: the policy once.
                if !at.iter().any(|q| Arc::ptr_eq(q, p)) {
                    at.push(p.clone());
                }
            }
        }
    }
    out
}

/// One token, in bucket units: a bucket at `rps` gains `rps` units a nanosecond.
pub const NANOS_PER_TOKEN: u64 = 1_000_000_000;

/// A token bucket. Its rate is passed on each use (so a policy whose rate
/// changes keeps its bucket, clamped to the new size); its size is one
/// second's worth of tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenBucket {
    /// Tokens, in units of 1/[`NANOS_PER_TOKEN`].
    level: u64,
    /// When `level` was last brought up to date.
    at: Duration,
}

impl TokenBucket {
    /// A full bucket (a client's first request never waits).
    pub fn full(rps: u32, now: Duration) -> Self {
        Self {
            level: capacity(rps),
            at: now,
        }
    }

    /// Adds what `rps` earned since the last update, up to the bucket's
    /// size. A time earlier than the last update adds nothing.
    pub fn refill(&mut self, rps: u32, now: Duration) {
        let cap = capacity(rps);
        let elapsed = now.saturating_sub(self.at);
        // Under a second, elapsed nanoseconds * rps < 1e9 * 2^32: no overflow.
        let earned = if elapsed >= Duration::from_secs(1) {
            cap
        } else {
            (elapsed.as_nanos() as u64).saturating_mul(u64::from(rps))
        };
        self.level = self.level.saturating_add(earned).min(cap);
        self.at = self.at.max(now);
    }

    /// Whether a request may pass now (after [`TokenBucket::refill`]).
    pub fn has_token(&self) -> bool {
        self.level >= NANOS_PER_TOKEN
    }

    /// Takes one token if there is one.
    pub fn take(&mut self) -> bool {
        let ok = self.has_token();
        if ok {
            self.level -= NANOS_PER_TOKEN;
        }
        ok
    }

    /// Refill, then take: the whole decision for a single bucket.
    pub fn try_take(&mut self, rps: u32, now: Duration) -> bool {
        self.refill(rps, now);
        self.take()
    }

    /// Whole tokens left (as of the last update).
    pub fn tokens(&self) -> u64 {
        self.level / NANOS_PER_TOKEN
    }

    /// Untouched for a second or more: full whatever its rate, so equal to
    /// a fresh one and safe to forget.
    fn idle(&self, now: Duration) -> bool {
        now.saturating_sub(self.at) >= Duration::from_secs(1)
    }
}

fn capacity(rps: u32) -> u64 {
    u64::from(rps) * NANOS_PER_TOKEN
}

/// Why a request was refused: the policy, which of its limits, at what rate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limited<'a> {
    pub policy: &'a RateLimitPolicy,
    pub scope: Scope,
    pub rps: u32,
}

/// Distinct identities one policy keeps buckets for; a new identity past it
/// (after idle buckets are dropped) shares the plaintext clients' bucket.
/// Identities are verified certificates, so this is never reached in a
/// cluster with fewer service accounts sending to one Service at once.
pub const MAX_IDENTITIES_PER_POLICY: usize = 10_000;

/// How often [`Buckets::check`] drops idle buckets.
pub const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// The buckets of one policy.
#[derive(Debug, Default)]
struct PolicyBuckets {
    total: Option<TokenBucket>,
    /// Plaintext clients (no identity), together.
    anonymous: Option<TokenBucket>,
    identities: HashMap<SpiffeId, TokenBucket>,
}

impl PolicyBuckets {
    fn total(&mut self, rps: u32, now: Duration) -> &mut TokenBucket {
        self.total.get_or_insert_with(|| TokenBucket::full(rps, now))
    }

    fn client(&mut self, id: Option<&SpiffeId>, rps: u32, now: Duration) -> &mut TokenBucket {
        if let Some(id) = id {
            if !self.identities.contains_key(id) && self.identities.len() >= MAX_IDENTITIES_PER_POLICY {
                self.identities.retain(|_, b| !b.idle(now));
            }
            if self.identities.contains_key(id) || self.identities.len() < MAX_IDENTITIES_PER_POLICY {
                return self
                    .identities
                    .entry(id.clone())
                    .or_insert_with(|| TokenBucket::full(rps, now));
            }
        }
        self.anonymous.get_or_insert_with(|| TokenBucket::full(rps, now))
    }

    /// Drops idle buckets; whether nothing is left.
    fn sweep(&mut self, now: Duration) -> bool {
        self.identities.retain(|_, b| !b.idle(now));
        for b in [&mut self.total, &mut self.anonymous] {
            if b.is_some_and(|b| b.idle(now)) {
                *b = None;
            }
        }
        self.total.is_none() && self.anonymous.is_none() && self.identities.is_empty()
    }
}

/// Every bucket of an agent, by policy (`namespace` then `name`) and
/// client. Kept outside the state snapshot: a config change keeps the
/// buckets of the policies that remain; those of a removed policy go
/// idle and are dropped.
#[derive(Debug, Default)]
pub struct Buckets {
    policies: HashMap<String, HashMap<String, PolicyBuckets>>,
    swept: Duration,
}

impl Buckets {
    fn of(&mut self, p: &RateLimitPolicy) -> &mut PolicyBuckets {
        if !self.policies.contains_key(&p.namespace) {
            self.policies.insert(p.namespace.clone(), HashMap::new());
        }
        let ns = self.policies.get_mut(&p.namespace).expect("inserted above");
        if !ns.contains_key(&p.name) {
            ns.insert(p.name.clone(), PolicyBuckets::default());
        }
        ns.get_mut(&p.name).expect("inserted above")
    }

    /// Decides one request from `id` (None: plaintext) under `policies`
    /// (those of the request's destination: [`targets`]) at `now`: every
    /// bucket must have a token, and only then is one taken from each.
    /// A refusal names the client's own limit before the total when both
    /// are exhausted.
    pub fn check<'p>(
        &mut self,
        policies: &'p [Arc<RateLimitPolicy>],
        id: Option<&SpiffeId>,
        now: Duration,
    ) -> Result<(), Limited<'p>> {
        if now.saturating_sub(self.swept) >= SWEEP_EVERY {
            self.sweep(now);
        }
        for p in policies {
            let b = self.of(p);
            if let Some((scope, rps)) = p.client_limit(id) {
                let c = b.client(id, rps, now);
                c.refill(rps, now);
                if !c.has_token() {
                    return Err(Limited { policy: p, scope, rps });
                }
            }
            if let Some(rps) = p.total_rps {
                let t = b.total(rps, now);
                t.refill(rps, now);
                if !t.has_token() {
                    return Err(Limited {
                        policy: p,
                        scope: Scope::Total,
                        rps,
                    });
                }
            }
        }
        for p in policies {
            let b = self.of(p);
            if let Some((_, rps)) = p.client_limit(id) {
                b.client(id, rps, now).take();
            }
            if let Some(rps) = p.total_rps {
                b.total(rps, now).take();
            }
        }
        Ok(())
    }

    /// Drops every bucket untouched for a second (full, so equal to a new
    /// one); [`Buckets::check`] calls it every [`SWEEP_EVERY`].
    pub fn sweep(&mut self, now: Duration) {
        for ns in self.policies.values_mut() {
            ns.retain(|_, b| !b.sweep(now));
        }
        self.policies.retain(|_, ns| !ns.is_empty());
        self.swept = now;
    }

    /// Buckets held (total, plaintext and per identity), for views and tests.
    pub fn len(&self) -> usize {
        self.policies
            .values()
            .flat_map(|ns| ns.values())
            .map(|b| usize::from(b.total.is_some()) + usize::from(b.anonymous.is_some()) + b.identities.len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new("default", sa)
    }

    fn policy(total: Option<u32>, per_identity: Option<u32>, overrides: &[(&str, u32)]) -> Arc<RateLimitPolicy> {
        Arc::new(RateLimitPolicy {
            name: "limit".into(),
            namespace: "default".into(),
            service: "default/reviews".into(),
            port: None,
            total_rps: total,
            per_identity_rps: per_identity,
            overrides: overrides
                .iter()
                .map(|(sa, rps)| RateLimitOverride {
                    client_identities: vec![id(sa)],
                    rps: *rps,
                })
                .collect(),
        })
    }

    /// Accepted requests of `n` sent `every` apart from t=0 through one bucket.
    fn accepted(rps: u32, n: u64, every: Duration) -> u64 {
        let mut b = TokenBucket::full(rps, Duration::ZERO);
        (0..n).filter(|i| b.try_take(rps, every * (*i as u32))).count() as u64
    }

    #[test]
    fn a_bucket_passes_its_burst_then_its_rate() {
        // (rps, requests, spacing, accepted): a full bucket of rps tokens,
        // then one token every 1/rps.
        let cases = [
            // All at once: the burst only.
            (10, 100, Duration::ZERO, 10),
            (1, 5, Duration::ZERO, 1),
            // 1 ms apart for 1 s (1000 requests): burst 10 + 10 earned in 0.999 s (9.99 -> 9).
            (10, 1000, ms(1), 19),
            // Slower than the rate: every request passes.
            (10, 50, ms(100), 50),
            (10, 50, ms(150), 50),
            // Twice the rate (100 requests 50 ms apart): 10 + 49.5 earned over 4.95 s.
            (10, 100, ms(50), 59),
            // 2^31 - 1 rps (the CRD's maximum) does not overflow.
            (i32::MAX as u32, 1000, Duration::from_nanos(1), 1000),
        ];
        for (rps, n, every, want) in cases {
            assert_eq!(accepted(rps, n, every), want, "{rps} rps, {n} requests {every:?} apart");
        }
    }

    #[test]
    fn over_a_window_a_bucket_accepts_at_most_rate_times_window_plus_burst() {
        // A client sending as fast as it can (every 100 us) for T seconds
        // gets rps * T + rps, within one token.
        for (rps, secs) in [(5, 3), (20, 2), (100, 5), (1000, 1)] {
            let n = secs * 10_000;
            let got = accepted(rps, n, Duration::from_micros(100));
            let bound = u64::from(rps) * secs + u64::from(rps);
            assert!(
                got <= bound && got + 1 >= bound,
                "{rps} rps for {secs}s: {got}, bound {bound}"
            );
        }
    }

    #[test]
    fn time_going_backwards_earns_nothing_and_rate_changes_clamp() {
        let mut b = TokenBucket::full(2, ms(5000));
        assert!(b.try_take(2, ms(5000)) && b.try_take(2, ms(5000)));
        assert!(!b.try_take(2, ms(1000)), "an earlier time adds no token");
        assert!(!b.try_take(2, ms(5499)), "499 ms at 2 rps: 0.998 token");
        assert!(b.try_take(2, ms(5500)));
        // Idle for an hour: full at one second's worth, not 3600 s worth.
        b.refill(2, ms(3_600_000));
        assert_eq!(b.tokens(), 2);
        // The rate drops to 1: the bucket shrinks to one token.
        b.refill(1, ms(3_600_000));
        assert_eq!(b.tokens(), 1);
        // The rate rises to 100: earned at the new rate, up to 100.
        b.refill(100, ms(3_600_500));
        assert_eq!(b.tokens(), 51);
    }

    #[test]
    fn client_limits_come_from_overrides_then_per_identity() {
        let p = policy(Some(100), Some(5), &[("vip", 50)]);
        assert_eq!(p.client_limit(Some(&id("vip"))), Some((Scope::Override, 50)));
        assert_eq!(p.client_limit(Some(&id("other"))), Some((Scope::Identity, 5)));
        assert_eq!(
            p.client_limit(None),
            Some((Scope::Identity, 5)),
            "plaintext: one shared bucket"
        );
        let p = policy(Some(100), None, &[("vip", 50)]);
        assert_eq!(p.client_limit(Some(&id("other"))), None, "only the total limits others");
        assert_eq!(p.client_limit(Some(&id("vip"))), Some((Scope::Override, 50)));
    }

    /// (client, accepted) of `requests` requests at t=0.
    fn burst(b: &mut Buckets, p: &[Arc<RateLimitPolicy>], client: Option<&SpiffeId>, requests: u32) -> u32 {
        (0..requests)
            .filter(|_| b.check(p, client, Duration::ZERO).is_ok())
            .count() as u32
    }

    #[test]
    fn per_identity_total_and_overrides_decide_together() {
        let p = [policy(Some(30), Some(5), &[("vip", 20)])];
        let mut b = Buckets::default();
        let (a, c, vip) = (id("a"), id("c"), id("vip"));
        // Each identity has its own 5; the override its 20; plaintext share 5.
        assert_eq!(burst(&mut b, &p, Some(&a), 10), 5);
        assert_eq!(burst(&mut b, &p, Some(&vip), 30), 20);
        assert_eq!(burst(&mut b, &p, None, 10), 5);
        // 30 taken: the total is spent, whoever asks.
        let refused = b.check(&p, Some(&c), Duration::ZERO).unwrap_err();
        assert_eq!((refused.scope, refused.rps), (Scope::Total, 30));
        // a's own limit is named first when both are spent.
        let refused = b.check(&p, Some(&a), Duration::ZERO).unwrap_err();
        assert_eq!((refused.scope, refused.rps), (Scope::Identity, 5));
        let refused = b.check(&p, Some(&vip), Duration::ZERO).unwrap_err();
        assert_eq!(refused.scope, Scope::Override);
        // 100 ms later: 3 total tokens, a has 0.5, c 5 (full, untouched).
        assert!(b.check(&p, Some(&a), ms(100)).is_err());
        assert_eq!(burst_at(&mut b, &p, Some(&c), 10, ms(100)), 3);
    }

    fn burst_at(b: &mut Buckets, p: &[Arc<RateLimitPolicy>], client: Option<&SpiffeId>, n: u32, at: Duration) -> u32 {
        (0..n).filter(|_| b.check(p, client, at).is_ok()).count() as u32
    }

    #[test]
    fn a_client_over_its_own_limit_does_not_spend_the_total() {
        let p = [policy(Some(10), Some(2), &[])];
        let mut b = Buckets::default();
        let (noisy, quiet) = (id("noisy"), id("quiet"));
        assert_eq!(burst(&mut b, &p, Some(&noisy), 1000), 2, "its own 2, then refused");
        // The other 8 of the total are still there for the others.
        for sa in ["q1", "q2", "q3", "q4"] {
            assert_eq!(burst(&mut b, &p, Some(&id(sa)), 5), 2);
        }
        assert_eq!(burst(&mut b, &p, Some(&quiet), 5), 0, "10 taken in all");
    }

    #[test]
    fn every_policy_of_a_destination_must_pass_before_any_token_is_taken() {
        let loose = policy(Some(100), None, &[]);
        let mut tight = (*policy(Some(1), None, &[])).clone();
        tight.name = "tight".into();
        let both = [loose, Arc::new(tight)];
        let mut b = Buckets::default();
        assert_eq!(burst(&mut b, &both, None, 10), 1);
        let refused = b.check(&both, None, Duration::ZERO).unwrap_err();
        assert_eq!(refused.policy.name, "tight");
        // The loose policy lost only the one token that passed both.
        assert_eq!(burst(&mut b, &both[..1], None, 200), 99);
    }

    #[test]
    fn policies_without_a_client_limit_keep_no_client_buckets_and_idle_buckets_are_dropped() {
        let p = [policy(Some(10), None, &[])];
        let mut b = Buckets::default();
        for sa in ["a", "b", "c"] {
            assert!(b.check(&p, Some(&id(sa)), Duration::ZERO).is_ok());
        }
        assert_eq!(b.len(), 1, "the total only");
        let p = [policy(None, Some(1), &[])];
        for sa in ["a", "b", "c"] {
            assert!(b.check(&p, Some(&id(sa)), ms(500)).is_ok());
        }
        assert_eq!(b.len(), 4);
        b.sweep(ms(1499));
        assert_eq!(b.len(), 3, "the total is idle since 0, the others since 500 ms");
        b.sweep(ms(1500));
        assert!(b.is_empty());
        // Forgotten buckets come back full.
        assert!(b.check(&p, Some(&id("a")), ms(1500)).is_ok());
        // check sweeps by itself every SWEEP_EVERY.
        let later = ms(1500) + SWEEP_EVERY;
        assert!(b.check(&p, Some(&id("b")), later).is_ok());
        assert_eq!(b.len(), 1, "a's bucket went with the sweep");
    }

    #[test]
    fn identities_past_the_cap_share_the_plaintext_bucket() {
        let p = [policy(None, Some(1), &[])];
        let mut b = Buckets::default();
        for i in 0..MAX_IDENTITIES_PER_POLICY {
            assert!(b.check(&p, Some(&id(&format!("sa{i}"))), Duration::ZERO).is_ok());
        }
        assert!(
            b.check(&p, Some(&id("late")), Duration::ZERO).is_ok(),
            "the shared bucket's token"
        );
        assert!(b.check(&p, None, Duration::ZERO).is_err(), "plaintext shares it");
        assert!(b.check(&p, Some(&id("later")), Duration::ZERO).is_err());
        // Once the others idle out, a new identity gets its own bucket again.
        assert!(b.check(&p, Some(&id("late")), Duration::from_secs(2)).is_ok());
        assert_eq!(b.len(), 2, "late's own bucket and the shared one");
    }

    fn svc(name: &str, ports: &[(u16, u16)], endpoints: &[&str]) -> Service {
        Service {
            name: name.into(),
            namespace: "default".into(),
            vip: Ipv4Addr::new(10, 96, 0, 1),
            ports: ports
                .iter()
                .map(|(port, target)| crate::ServicePort {
                    port: *port,
                    target_port: *target,
                    name: None,
                    protocol: crate::Protocol::Http,
                })
                .collect(),
            endpoints: endpoints
                .iter()
                .map(|ip| crate::Endpoint {
                    ip: ip.parse().unwrap(),
                    ready: true,
                })
                .collect(),
        }
    }

    #[test]
    fn targets_are_the_local_backends_on_the_named_port() {
        let services = [
            svc(
                "reviews",
                &[(9080, 8080), (9081, 8080), (9090, 9090)],
                &["10.1.1.2", "10.1.2.2"],
            ),
            svc("ratings", &[(9080, 8080)], &["10.1.1.2"]),
        ];
        let local: HashSet<Ipv4Addr> = ["10.1.1.2".parse().unwrap()].into();
        let every_port = policy(Some(1), None, &[]);
        let mut on_9090 = (*policy(Some(1), None, &[])).clone();
        on_9090.name = "on-9090".into();
        on_9090.port = Some(9090);
        let mut missing = (*policy(Some(1), None, &[])).clone();
        missing.name = "missing".into();
        missing.service = "default/nothing".into();
        let mut on_target_port = (*policy(Some(1), None, &[])).clone();
        on_target_port.name = "target-port".into();
        on_target_port.port = Some(8080);
        let all = [
            every_port,
            Arc::new(on_9090),
            Arc::new(missing),
            Arc::new(on_target_port),
        ];
        let t = targets(&all, &services, &local);
        let names = |addr: &str| -> Vec<String> {
            let a: SocketAddrV4 = addr.parse().unwrap();
            t.get(&a)
                .map_or(vec![], |ps| ps.iter().map(|p| p.name.clone()).collect())
        };
        assert_eq!(
            names("10.1.1.2:8080"),
            ["limit"],
            "once, though two Service ports target it"
        );
        assert_eq!(names("10.1.1.2:9090"), ["limit", "on-9090"]);
        assert!(names("10.1.2.2:8080").is_empty(), "not a local pod");
        assert!(names("10.1.1.2:9080").is_empty(), "a Service port is not an app port");
        assert_eq!(
            t.len(),
            2,
            "an unknown Service and a port the Service lacks limit nothing"
        );
    }

    #[test]
    fn validation_names_each_problem() {
        let ok = (*policy(Some(100), Some(20), &[("vip", 50)])).clone();
        assert!(ok.validate().is_empty(), "{:?}", ok.validate());
        type Change = Box<dyn Fn(&mut RateLimitPolicy)>;
        let cases: Vec<(Change, &str)> = vec![
            (Box::new(|p| p.service = "reviews".into()), "service: \"reviews\" is not namespace/name"),
            (Box::new(|p| p.service = "a/b/c".into()), "is not namespace/name"),
            (Box::new(|p| p.port = Some(0)), "port: 0 is not a port"),
            (Box::new(|p| p.total_rps = Some(0)), "totalRps: must be at least 1"),
            (Box::new(|p| p.per_identity_rps = Some(0)), "perIdentityRps: must be at least 1"),
            (Box::new(|p| p.overrides[0].rps = 0), "overrides[0].rps: must be at least 1"),
            (
                Box::new(|p| p.overrides[0].client_identities.clear()),
                "overrides[0].clientIdentities: at least one identity is required",
            ),
            (
                Box::new(|p| p.overrides.push(p.overrides[0].clone())),
                "overrides[1].clientIdentities[0]: spiffe://cluster.local/ns/default/sa/vip is already listed in overrides[0]",
            ),
            (
                Box::new(|p| {
                    p.total_rps = None;
                    p.per_identity_rps = None;
                    p.overrides.clear();
                }),
                "at least one of totalRps, perIdentityRps, overrides is required",
            ),
            (Box::new(|p| p.name.clear()), "name and namespace must not be empty"),
        ];
        for (change, want) in cases {
            let mut p = ok.clone();
            change(&mut p);
            let problems = p.validate();
            assert!(problems.iter().any(|e| e.contains(want)), "{want}: {problems:?}");
        }
        let twice = [ok.clone(), ok];
        assert_eq!(
            validate_all(&twice),
            ["rateLimits[1] (default/limit): already defined by rateLimits[0]"]
        );
    }

    #[test]
    fn parses_from_a_config_file_with_unknown_fields_refused() {
        let p: RateLimitPolicy = serde_norway::from_str(
            "{name: r, namespace: default, service: default/reviews, port: 9080, totalRps: 100, perIdentityRps: 20,
              overrides: [{clientIdentities: [spiffe://cluster.local/ns/default/sa/vip], rps: 50}]}",
        )
        .unwrap();
        assert_eq!(p.client_limit(Some(&id("vip"))), Some((Scope::Override, 50)));
        assert_eq!(p.port, Some(9080));
        let e =
            serde_norway::from_str::<RateLimitPolicy>("{name: r, namespace: d, service: d/r, totl: 1}").unwrap_err();
        assert!(e.to_string().contains("unknown field `totl`"), "{e}");
        let e = serde_norway::from_str::<RateLimitPolicy>(
            "{name: r, namespace: d, service: d/r, overrides: [{clientIdentities: [default/sa/x], rps: 1}]}",
        )
        .unwrap_err();
        assert!(e.to_string().contains("is not a workload SPIFFE id"), "{e}");
    }
}
