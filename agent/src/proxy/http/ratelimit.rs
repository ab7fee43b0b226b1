//! Local rate limits at the destination (`ferry.dev/v1alpha1
//! RateLimitPolicy`): the agent's token buckets, kept here, outside the
//! state snapshot, so that a config change keeps the counts of the
//! policies that remain. The decision is the model's
//! ([`ferry_model::ratelimit::Buckets::check`], pure, over a time this file
//! reads from a monotonic clock); [`super::destination`] asks it for each
//! request that passed authorization, with the policies of the request's
//! app address ([`ferry_model::state::State::rate_limits_at`]) and the
//! peer's verified identity.
//!
//! A refused request is answered `429 Too Many Requests` (body
//! `local_rate_limited`, as Envoy's local rate limit; `retry-after: 1`),
//! or for gRPC a trailers-only `RESOURCE_EXHAUSTED` (8), with flag `RL`,
//! counted in `ferry_rate_limited_total{destination_service, policy,
//! scope}`, and logged as a warning at most once a second per agent (the
//! access log has every one).

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Instant,
};

use ferry_model::{
    ratelimit::{Buckets, Limited, RateLimitPolicy},
    SpiffeId,
};
use hyper::{
    header::{self, HeaderValue},
    HeaderMap, Response, StatusCode,
};

use super::{
    body::Body,
    server::{grpc_reply, local_reply},
};
use crate::telemetry::{
    http::{Flag, RequestRecord},
    metrics::CLUSTER_DOMAIN,
    RateLimitLabels, Telemetry,
};

/// The body of a refused request (Envoy's local rate limit's).
pub const LIMITED: &str = "local_rate_limited";
/// gRPC RESOURCE_EXHAUSTED.
pub const GRPC_RESOURCE_EXHAUSTED: u32 = 8;

/// The agent's buckets, over every policy and client (one lock: a decision
/// is a few map lookups).
#[derive(Debug)]
pub struct RateLimits {
    buckets: Mutex<Buckets>,
    /// Time zero of the buckets' clock.
    epoch: Instant,
    /// The second (since `epoch`) of the last warning, plus one; 0: never.
    warned: AtomicU64,
}

impl Default for RateLimits {
    fn default() -> Self {
        Self {
            buckets: Mutex::new(Buckets::default()),
            epoch: Instant::now(),
            warned: AtomicU64::new(0),
        }
    }
}

impl RateLimits {
    /// Decides one request from `id` (None: plaintext) to an address
    /// limited by `policies`; Ok at once when there are none.
    pub fn check<'p>(&self, policies: &'p [Arc<RateLimitPolicy>], id: Option<&SpiffeId>) -> Result<(), Limited<'p>> {
        if policies.is_empty() {
            return Ok(());
        }
        let now = self.epoch.elapsed();
        self.buckets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .check(policies, id, now)
    }

    /// Buckets held now (for tests and views).
    pub fn buckets(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether a warning may be logged now (at most one a second).
    fn may_warn(&self) -> bool {
        let second = self.epoch.elapsed().as_secs() + 1;
        self.warned.swap(second, Ordering::Relaxed) != second
    }
}

/// The answer to a request `limited` refused: 429 (gRPC: status 8), flag
/// `RL`, counted and (at most once a second) logged.
pub(super) fn refuse(
    limits: &RateLimits,
    telemetry: &Telemetry,
    mut rec: RequestRecord,
    limited: Limited<'_>,
    grpc: bool,
) -> Response<Body> {
    let p = limited.policy;
    let (ns, name) = p.service.split_once('/').unwrap_or(("", p.service.as_str()));
    let policy = p.key();
    telemetry
        .rate_limited
        .get_or_create(&RateLimitLabels {
            destination_service: format!("{name}.{ns}.svc.{CLUSTER_DOMAIN}"),
            policy: policy.clone(),
            scope: limited.scope.as_str(),
        })
        .inc();
    if limits.may_warn() {
        tracing::warn!(policy = %policy, service = %p.service, scope = limited.scope.as_str(), rps = limited.rps, source = %rec.source, method = %rec.method, path = %rec.path, "request over a rate limit (429; further ones this second are in the access log and ferry_rate_limited_total)");
    }
    rec.flags.insert(Flag::RateLimited);
    if grpc {
        return grpc_reply(rec, GRPC_RESOURCE_EXHAUSTED, LIMITED);
    }
    let mut h = HeaderMap::new();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    local_reply(rec, StatusCode::TOO_MANY_REQUESTS, h, LIMITED)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warns_at_most_once_a_second() {
        let l = RateLimits::default();
        assert!(l.may_warn());
        assert!(!l.may_warn());
        assert!(l.check(&[], None).is_ok(), "no policy: no bucket");
        assert_eq!(l.buckets(), 0);
    }
}
