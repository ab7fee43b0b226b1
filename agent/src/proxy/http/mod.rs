//! The L7 path: HTTP/1.1, HTTP/2 and gRPC from an enrolled pod, routed per
//! request on the source side (as a sidecar would, with no extra hop), and
//! served per request at the destination on HTTP Service ports
//! (authorization with the HTTP attributes, destination metrics).
//!
//! - [`detect`]: protocol detection for undeclared ports (bounded wait);
//! - [`server`]: serves the client connection (hyper, HTTP/1.1 and HTTP/2),
//!   and per request: route, redirect, faults, backend and endpoint, header
//!   ops and rewrites, mirrors, timeout, retries, upgrades;
//! - [`route`]: the per-request decision over the state snapshot (read
//!   afresh for each request, so config changes apply to the next request);
//! - [`upstream`]: pooled client connections per (pod, endpoint, version),
//!   over the same transports as the L4 path (local delivery, tunnel, direct);
//! - [`circuit`]: circuit breaking (DestinationRule `connectionPool`): the
//!   counts per (source pod, Service, port, subset) and their limits;
//! - [`body`]: request bodies kept for retries and mirrors, response bodies
//!   counted for telemetry;
//! - [`destination`]: the destination side (inbound connections to an HTTP
//!   Service port): per-request authorization, 403 `RBAC`, request metrics
//!   with `reporter="destination"`, access log;
//! - [`path`]: paths normalized before authorization (RFC 3986);
//! - [`ratelimit`]: the destination's RateLimitPolicy token buckets and
//!   its 429 `RL` answer;
//! - [`traced`]: the tracing hooks (spans started and ended around each
//!   request on both sides, trace context headers rewritten).

pub mod body;
pub mod circuit;
pub mod destination;
pub mod detect;
pub mod path;
pub mod ratelimit;
pub mod route;
pub mod server;
pub mod traced;
pub mod upstream;

use std::sync::Arc;

use tokio::sync::Semaphore;

pub use server::serve;

/// Mirrored requests in flight at once per agent; past it, copies are skipped.
pub const MAX_MIRRORS_IN_FLIGHT: usize = 256;

/// What the L7 path shares across connections.
pub struct Shared {
    pub pool: upstream::Pool,
    pub mirrors: Arc<Semaphore>,
    /// The destination side's rate-limit buckets (outside the snapshot).
    pub rate_limits: ratelimit::RateLimits,
}

impl Default for Shared {
    fn default() -> Self {
        Self {
            pool: upstream::Pool::default(),
            mirrors: Arc::new(Semaphore::new(MAX_MIRRORS_IN_FLIGHT)),
            rate_limits: ratelimit::RateLimits::default(),
        }
    }
}
