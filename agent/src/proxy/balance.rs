//! The load balancer's mutable state, kept outside the immutable snapshot,
//! and the endpoint choice of every HTTP attempt and opaque TCP connection
//! to a Service. The decisions are `ferry_model::balance`'s pure functions;
//! this module owns, per (Service, port, subset) — a *scope*, Envoy's
//! cluster —
//!
//! - each endpoint's requests (or connections) in flight from this agent,
//!   counted by an [`InFlight`] guard held for the request's lifetime;
//! - the outlier-detection state (counters, ejections), fed by
//!   [`Picked::report`] after each attempt, swept at each pick (returns are
//!   due every `interval`; the admin view sweeps too);
//! - when each endpoint was first seen (warm-up), the round-robin state and
//!   the consistent-hash table, built once per endpoint set.
//!
//! The effective policy for (Service, subset, port) is read from the
//! snapshot at each pick, so a DestinationRule change applies to the next
//! request. Order of a pick: ready endpoints (subset) -> drop ejected ones
//! unless in panic mode (`minHealthPercent`) -> best locality priority ->
//! the algorithm. PASSTHROUGH sends to the address the client dialled when
//! it is a pod; a Service VIP is not, so it falls back to LEAST_REQUEST.
//! A hash key the request lacks (no such header, cookie without `ttl`,
//! parameter) picks a random endpoint, as Envoy does.

use std::{
    collections::HashMap,
    net::SocketAddrV4,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard, OnceLock,
    },
    time::Instant,
};

use ferry_model::{
    admin::{EndpointHealth, EndpointState},
    balance::{self, Maglev, Outcome, Outliers, Place, Ring, SmoothRoundRobin, Verdict},
    route::Subset,
    state::{Route, RouteError, State},
    traffic::{HashKey, HashTable, LbAlgorithm, OutlierDetection, TrafficPolicy},
    Workload,
};
use hyper::{
    header::{self, HeaderValue},
    HeaderMap,
};

use crate::telemetry::{
    outlier::{EjectionLabels, ServiceLabels},
    Telemetry,
};

/// A scope: `namespace/name` of the Service, its port, the subset's name.
type ScopeKey = (String, u16, Option<String>);

/// Per-scope state of every Service this agent balances to.
pub struct Balancer(Arc<Shared>);

struct Shared {
    scopes: Mutex<HashMap<ScopeKey, Arc<Scope>>>,
    epoch: Instant,
    telemetry: Arc<Telemetry>,
}

struct Scope {
    service: String,
    port: u16,
    subset: Option<String>,
    state: Mutex<ScopeState>,
}

#[derive(Default)]
struct ScopeState {
    /// The ready endpoints at the last pick, in the Service's order.
    endpoints: Vec<SocketAddrV4>,
    /// Whether `endpoints` was ever set (endpoints present then are warm).
    seen: bool,
    first_seen: HashMap<SocketAddrV4, u64>,
    in_flight: HashMap<SocketAddrV4, Arc<AtomicU64>>,
    outliers: Outliers<SocketAddrV4>,
    rr: SmoothRoundRobin,
    /// LEAST_REQUEST's rotating first choice.
    lr_cursor: u64,
    table: Option<Table>,
    ring_points: Option<u64>,
    /// The last pick's policy, for the admin view.
    algorithm: Option<LbAlgorithm>,
    outlier: Option<OutlierDetection>,
    panic: bool,
}

/// A consistent-hash table and what it was built for.
struct Table {
    ids: Vec<SocketAddrV4>,
    config: HashTable,
    built: Built,
}

enum Built {
    Ring(Ring),
    Maglev(Maglev),
}

/// What a request offers to choose with.
pub struct Ask<'a> {
    /// The calling pod (its locality, its address for `useSourceIp`).
    pub client: &'a Workload,
    /// The address the client dialled (PASSTHROUGH).
    pub orig: Option<SocketAddrV4>,
    /// HTTP only: what a consistent hash may read.
    pub http: Option<HttpKeys<'a>>,
}

/// A request's hash sources. `made_cookie` holds the cookie value made for
/// this request when it had none (made once, so retries hash alike).
pub struct HttpKeys<'a> {
    pub headers: &'a HeaderMap,
    pub query: Option<&'a str>,
    pub made_cookie: &'a OnceLock<String>,
}

/// One endpoint's requests in flight: counted while this lives.
pub struct InFlight(Arc<AtomicU64>);

impl InFlight {
    fn new(c: Arc<AtomicU64>) -> Self {
        c.fetch_add(1, Ordering::AcqRel);
        Self(c)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The endpoint chosen for one attempt or connection.
pub struct Picked {
    pub route: Route,
    in_flight: Option<InFlight>,
    /// A `Set-Cookie` to add to the response (a hash cookie made here).
    set_cookie: Option<HeaderValue>,
    scope: Option<(Arc<Scope>, OutlierDetection)>,
    balancer: Option<Arc<Shared>>,
}

impl Picked {
    /// A route not chosen by the balancer (a pod address): nothing counted.
    pub fn fixed(route: Route) -> Self {
        Self {
            route,
            in_flight: None,
            set_cookie: None,
            scope: None,
            balancer: None,
        }
    }

    /// The in-flight guard, to be held until the request ends.
    pub fn hold(&mut self) -> Option<Box<dyn std::any::Any + Send + Sync>> {
        self.in_flight
            .take()
            .map(|g| Box::new(g) as Box<dyn std::any::Any + Send + Sync>)
    }

    /// Reports the attempt's outcome to outlier detection (when the
    /// endpoint's scope has it).
    pub fn report(&self, outcome: Outcome) {
        let (Some((scope, cfg)), Some(b)) = (&self.scope, &self.balancer) else {
            return;
        };
        let now = b.now_ms();
        let ep = self.route.endpoint;
        let mut st = lock(&scope.state);
        if !st.endpoints.contains(&ep) {
            return;
        }
        let total = st.endpoints.len();
        match st.outliers.report(cfg, &ep, outcome, now, total) {
            Verdict::Ejected { reason, for_ms } => {
                b.telemetry
                    .outlier
                    .ejections
                    .get_or_create(&EjectionLabels {
                        destination_service: scope.service.clone(),
                        endpoint: ep.to_string(),
                        reason: reason.as_str(),
                    })
                    .inc();
                tracing::info!(service = %scope.service, port = scope.port, subset = scope.subset.as_deref().unwrap_or("-"), endpoint = %ep, reason = reason.as_str(), for_ms, "endpoint ejected");
                drop(st);
                b.gauge(&scope.service);
            }
            Verdict::Spared(reason) => {
                tracing::debug!(service = %scope.service, endpoint = %ep, reason = reason.as_str(), "not ejected: maxEjectionPercent reached");
            }
            Verdict::Counted => {}
        }
    }

    /// An HTTP answer: reported, and the hash cookie set on it if one was made.
    pub fn answered(&self, status: u16, headers: &mut HeaderMap) {
        self.report(Outcome::Response(status));
        if let Some(c) = &self.set_cookie {
            headers.append(header::SET_COOKIE, c.clone());
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Sets `service`'s ejected-endpoints gauge: the sum over its scopes.
    /// Called with no scope locked.
    fn gauge(&self, service: &str) {
        let scopes: Vec<Arc<Scope>> = lock(&self.scopes)
            .values()
            .filter(|s| s.service == service)
            .cloned()
            .collect();
        let n: usize = scopes.iter().map(|s| lock(&s.state).outliers.ejected()).sum();
        self.telemetry
            .outlier
            .ejected
            .get_or_create(&ServiceLabels {
                destination_service: service.to_owned(),
            })
            .set(n as i64);
    }
}

impl Balancer {
    pub fn new(telemetry: Arc<Telemetry>) -> Self {
        Self(Arc::new(Shared {
            scopes: Mutex::new(HashMap::new()),
            epoch: Instant::now(),
            telemetry,
        }))
    }

    fn now_ms(&self) -> u64 {
        self.0.now_ms()
    }

    fn scope(&self, service: &str, port: u16, subset: Option<&Subset>) -> Arc<Scope> {
        let key = (service.to_owned(), port, subset.map(|s| s.name.clone()));
        lock(&self.0.scopes)
            .entry(key)
            .or_insert_with(|| {
                Arc::new(Scope {
                    service: service.to_owned(),
                    port,
                    subset: subset.map(|s| s.name.clone()),
                    state: Mutex::new(ScopeState::default()),
                })
            })
            .clone()
    }

    /// An endpoint of Service `service` (`namespace/name`) port `port`
    /// (restricted to `subset`) for one request or connection, by the
    /// Service's effective traffic policy. See the module doc.
    pub fn pick(
        &self,
        state: &State,
        service: &str,
        port: u16,
        subset: Option<&Subset>,
        ask: &Ask<'_>,
    ) -> Result<Picked, RouteError> {
        let candidates = state.candidates(service, port, subset)?;
        let tp = state.traffic_policy(service);
        let default = TrafficPolicy::default();
        let policy = tp.map_or(&default, |p| p.effective(subset.map(|s| s.name.as_str()), port));
        let lb = &policy.load_balancer;
        let od = policy.outlier_detection.as_ref();
        let now = self.now_ms();
        let scope = self.scope(service, port, subset);
        let mut st = lock(&scope.state);
        st.sync(&candidates, now);
        st.algorithm = Some(lb.algorithm.clone());
        st.outlier = od.cloned();
        if od.is_none() && st.outliers.ejected() > 0 {
            // Outlier detection was turned off: its ejections end with it.
            st.outliers = Outliers::default();
        }
        let mut returned = false;
        if let Some(cfg) = od {
            for ep in st.outliers.sweep(cfg, now) {
                returned = true;
                tracing::info!(service, port, endpoint = %ep, "endpoint returned to service");
            }
        }

        // Health: ejected endpoints are skipped unless in panic mode.
        let mut usable: Vec<SocketAddrV4> = candidates.clone();
        st.panic = false;
        if let Some(cfg) = od {
            let healthy: Vec<SocketAddrV4> = candidates
                .iter()
                .copied()
                .filter(|e| !st.outliers.is_ejected(e))
                .collect();
            if balance::panic(cfg.min_health_percent, healthy.len(), candidates.len()) {
                st.panic = true;
            } else {
                usable = healthy;
            }
        }
        if usable.is_empty() {
            drop(st);
            if returned {
                self.0.gauge(service);
            }
            return Err(RouteError::NoEndpoint(format!("{service} (every endpoint ejected)")));
        }

        // Locality: the best priority that has a usable endpoint.
        if let Some(loc) = &lb.locality {
            let client = Place {
                locality: ask.client.locality.as_deref(),
                labels: Some(&ask.client.labels),
            };
            let prio: Vec<u32> = usable
                .iter()
                .map(|e| {
                    let w = state.workload_by_ip(*e.ip());
                    let place = Place {
                        locality: w.and_then(|w| w.locality.as_deref()),
                        labels: w.map(|w| &w.labels),
                    };
                    balance::priority(loc, &client, &place)
                })
                .collect();
            if let Some(best) = prio.iter().min().copied() {
                usable = usable
                    .iter()
                    .zip(&prio)
                    .filter(|(_, p)| **p == best)
                    .map(|(e, _)| *e)
                    .collect();
            }
        }

        let mut set_cookie = None;
        let warm = |st: &ScopeState| -> Vec<u32> {
            usable
                .iter()
                .map(|e| balance::warmup_weight(now, st.first_seen.get(e).copied().unwrap_or(0), lb.warmup_ms))
                .collect()
        };
        let least = |st: &mut ScopeState| {
            let loads: Vec<u64> = usable
                .iter()
                .map(|e| st.in_flight.get(e).map_or(0, |c| c.load(Ordering::Acquire)))
                .collect();
            st.lr_cursor = st.lr_cursor.wrapping_add(1);
            balance::least_request(&warm(st), &loads, st.lr_cursor.wrapping_sub(1), rand::random())
        };
        let chosen = match &lb.algorithm {
            LbAlgorithm::RoundRobin => {
                let w = warm(&st);
                st.rr.pick(&w)
            }
            LbAlgorithm::Random => balance::random(&warm(&st), rand::random()),
            LbAlgorithm::LeastRequest => least(&mut st),
            LbAlgorithm::Passthrough => match ask.orig.filter(|o| state.workload_by_ip(*o.ip()).is_some()) {
                Some(o) => {
                    drop(st);
                    return Ok(Picked::fixed(state.route_to(o, Some(service.to_owned()))));
                }
                None => least(&mut st),
            },
            LbAlgorithm::ConsistentHash(ch) => {
                let (hash, cookie) = hash_of(&ch.key, ask);
                set_cookie = cookie;
                match hash {
                    Some(h) => st.table(&usable, ch.table).and_then(|t| match &t.built {
                        Built::Ring(r) => r.lookup(h),
                        Built::Maglev(m) => m.lookup(h),
                    }),
                    None => balance::random(&vec![balance::FULL_WEIGHT; usable.len()], rand::random()),
                }
            }
        };
        let Some(ep) = chosen.and_then(|i| usable.get(i)).copied() else {
            return Err(RouteError::NoEndpoint(service.to_owned()));
        };
        let counter = st.in_flight.entry(ep).or_default().clone();
        drop(st);
        if returned {
            self.0.gauge(service);
        }
        Ok(Picked {
            route: state.route_to(ep, Some(service.to_owned())),
            in_flight: Some(InFlight::new(counter)),
            set_cookie,
            scope: od.map(|c| (scope.clone(), c.clone())),
            balancer: Some(self.0.clone()),
        })
    }

    /// `/endpoints`: every endpoint of every scope this agent balanced to,
    /// after a sweep (so returns that are due show).
    pub fn view(&self, state: &State) -> Vec<EndpointHealth> {
        let now = self.now_ms();
        let scopes: Vec<Arc<Scope>> = lock(&self.0.scopes).values().cloned().collect();
        let mut rows = Vec::new();
        for scope in scopes {
            let mut st = lock(&scope.state);
            if let Some(cfg) = st.outlier.clone() {
                st.outliers.sweep(&cfg, now);
            }
            for ep in &st.endpoints {
                let w = state.workload_by_ip(*ep.ip());
                let h = st.outliers.host(ep);
                let ejected_until = h.and_then(|h| h.ejected_until());
                rows.push(EndpointHealth {
                    service: scope.service.clone(),
                    port: scope.port,
                    subset: scope.subset.clone(),
                    endpoint: ep.to_string(),
                    workload: w.map(Workload::label),
                    locality: w.and_then(|w| w.locality.clone()),
                    algorithm: st.algorithm.as_ref().map_or("-", LbAlgorithm::as_str).to_owned(),
                    outlier_detection: st.outlier.is_some(),
                    state: if ejected_until.is_some() {
                        EndpointState::Ejected
                    } else {
                        EndpointState::Healthy
                    },
                    ejected_for_ms: ejected_until.map(|u| u.saturating_sub(now)),
                    ejections: h.map_or(0, |h| h.ejections),
                    consecutive_5xx: h.map_or(0, |h| h.consecutive_5xx),
                    consecutive_gateway: h.map_or(0, |h| h.consecutive_gateway),
                    consecutive_local_origin: h.map_or(0, |h| h.consecutive_local_origin),
                    in_flight: st.in_flight.get(ep).map_or(0, |c| c.load(Ordering::Acquire)),
                    panic: st.panic,
                });
            }
            drop(st);
        }
        let services: std::collections::BTreeSet<&str> = rows.iter().map(|r| r.service.as_str()).collect();
        for s in services {
            self.0.gauge(s);
        }
        rows.sort_by(|a, b| {
            (&a.service, a.port, &a.subset, &a.endpoint).cmp(&(&b.service, b.port, &b.subset, &b.endpoint))
        });
        rows
    }
}

impl ScopeState {
    /// Follows the current endpoint set: new endpoints are first seen now
    /// (warm at the first sync), departed ones forgotten.
    fn sync(&mut self, current: &[SocketAddrV4], now: u64) {
        if self.seen && self.endpoints == current {
            return;
        }
        let first = if self.seen { now } else { 0 };
        for e in current {
            self.first_seen.entry(*e).or_insert(first);
        }
        self.first_seen.retain(|e, _| current.contains(e));
        self.in_flight
            .retain(|e, c| current.contains(e) || c.load(Ordering::Acquire) > 0);
        self.outliers.retain(current);
        self.endpoints = current.to_vec();
        self.seen = true;
    }

    /// The hash table for `ids`, rebuilt when they or the table's config
    /// changed.
    fn table(&mut self, ids: &[SocketAddrV4], config: HashTable) -> Option<&Table> {
        let fresh = self.table.as_ref().is_some_and(|t| t.ids == ids && t.config == config);
        if !fresh {
            let names: Vec<String> = ids.iter().map(ToString::to_string).collect();
            let built = match config {
                HashTable::RingHash { minimum_ring_size } => {
                    let per = balance::ring_points(minimum_ring_size, ids.len(), self.ring_points);
                    self.ring_points = Some(per);
                    Built::Ring(Ring::build(&names, per))
                }
                HashTable::Maglev { table_size } => Built::Maglev(Maglev::build(&names, table_size)),
            };
            self.table = Some(Table {
                ids: ids.to_vec(),
                config,
                built,
            });
        }
        self.table.as_ref()
    }
}

/// The request's hash for `key` (None: it has no such key), and the
/// `Set-Cookie` to send when a cookie was made for it.
fn hash_of(key: &HashKey, ask: &Ask<'_>) -> (Option<u64>, Option<HeaderValue>) {
    let h = |v: &[u8]| Some(balance::hash64(v));
    match (key, &ask.http) {
        (HashKey::SourceIp, _) => (h(&ask.client.ip.octets()), None),
        (HashKey::Header(name), Some(k)) => (k.headers.get(name.as_str()).and_then(|v| h(v.as_bytes())), None),
        (HashKey::QueryParameter(name), Some(k)) => (query_param(k.query, name).and_then(|v| h(v.as_bytes())), None),
        (HashKey::Cookie { name, path, ttl_ms }, Some(k)) => {
            if let Some(v) = cookie(k.headers, name) {
                return (h(v.as_bytes()), None);
            }
            let Some(ttl) = ttl_ms else {
                return (None, None);
            };
            let v = k.made_cookie.get_or_init(|| format!("{:016x}", rand::random::<u64>()));
            let mut c = format!("{name}={v}");
            if let Some(p) = path.as_deref().filter(|p| !p.is_empty()) {
                c.push_str("; Path=");
                c.push_str(p);
            }
            c.push_str(&format!("; Max-Age={}; HttpOnly", ttl.div_ceil(1000)));
            (h(v.as_bytes()), HeaderValue::from_str(&c).ok())
        }
        // A TCP connection hashes on the source address only.
        (_, None) => (None, None),
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"'))
}

/// The raw value of query parameter `name`.
fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::telemetry::{metrics::Metrics, Counters};

    pub(crate) fn balancer() -> Balancer {
        let counters = Arc::new(Counters::default());
        Balancer::new(Arc::new(Telemetry::new(
            Metrics::new("/nonexistent".into(), "n1".into(), counters.clone()),
            counters,
        )))
    }

    /// A client on r1/z1, endpoints e1 (r1/z1), e2 (r1/z2), e3 (r2/z3) of
    /// Service default/r, under `policy` (YAML of a `TrafficPolicy`).
    fn state(policy: &str) -> State {
        let cfg: ferry_model::ConfigFile = serde_norway::from_str(&format!(
            "node: n1
workloads:
  - {{uid: c, name: client, node: n1, ip: 10.1.0.2, enrolled: true, locality: r1/z1}}
  - {{uid: e1, name: e1, node: n1, ip: 10.1.0.3, enrolled: true, locality: r1/z1}}
  - {{uid: e2, name: e2, node: n2, ip: 10.1.1.3, enrolled: true, locality: r1/z2}}
  - {{uid: e3, name: e3, node: n2, ip: 10.1.1.4, enrolled: true, locality: r2/z3}}
services:
  - {{name: r, vip: 10.96.0.1, ports: [{{port: 80, targetPort: 9080, protocol: http}}], endpoints: [{{ip: 10.1.0.3}}, {{ip: 10.1.1.3}}, {{ip: 10.1.1.4}}]}}
trafficPolicies:
  - service: default/r
    policy: {policy}
"
        ))
        .unwrap();
        State::from_config(cfg, 1)
    }

    fn ep(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    fn pick(b: &Balancer, s: &State, h: &HeaderMap, cookie: &OnceLock<String>) -> Picked {
        let ask = Ask {
            client: &s.workloads["c"],
            orig: Some(ep("10.96.0.1:80")),
            http: Some(HttpKeys {
                headers: h,
                query: Some("u=7"),
                made_cookie: cookie,
            }),
        };
        b.pick(s, "default/r", 80, None, &ask).unwrap()
    }

    #[test]
    fn round_robin_and_least_request_spread_over_endpoints() {
        let b = balancer();
        let s = state("{loadBalancer: {algorithm: roundRobin}}");
        let h = HeaderMap::new();
        let got: Vec<SocketAddrV4> = (0..6)
            .map(|_| pick(&b, &s, &h, &OnceLock::new()).route.endpoint)
            .collect();
        assert_eq!(got[..3], got[3..], "a cycle");
        assert_eq!(got[..3].iter().collect::<std::collections::HashSet<_>>().len(), 3);

        // LEAST_REQUEST (the default) with every pick held: loads stay level.
        let s = state("{}");
        let held: Vec<Picked> = (0..30).map(|_| pick(&b, &s, &h, &OnceLock::new())).collect();
        let rows = b.view(&s);
        let loads: Vec<u64> = rows
            .iter()
            .filter(|r| r.algorithm == "LEAST_REQUEST")
            .map(|r| r.in_flight)
            .collect();
        assert_eq!(loads.iter().sum::<u64>(), 30, "{rows:?}");
        let (min, max) = (loads.iter().min().unwrap(), loads.iter().max().unwrap());
        assert!(max - min <= 3, "level: {loads:?}");
        drop(held);
        assert!(
            b.view(&s).iter().all(|r| r.in_flight == 0),
            "guards give their count back"
        );
    }

    #[test]
    fn a_header_hash_is_sticky_and_a_cookie_is_made_once() {
        let b = balancer();
        let s = state("{loadBalancer: {algorithm: !consistentHash {key: !header x-user}}}");
        let mut spread = std::collections::HashSet::new();
        for u in 0..50 {
            let mut h = HeaderMap::new();
            h.insert("x-user", HeaderValue::from_str(&format!("user-{u}")).unwrap());
            let first = pick(&b, &s, &h, &OnceLock::new()).route.endpoint;
            for _ in 0..5 {
                assert_eq!(pick(&b, &s, &h, &OnceLock::new()).route.endpoint, first);
            }
            spread.insert(first);
        }
        assert_eq!(spread.len(), 3, "keys spread over every endpoint");

        let s = state(
            "{loadBalancer: {algorithm: !consistentHash {key: !cookie {name: sid, path: /, ttl_ms: 60000}, table: !maglev {table_size: 101}}}}",
        );
        let made = OnceLock::new();
        let h = HeaderMap::new();
        let p = pick(&b, &s, &h, &made);
        let again = pick(&b, &s, &h, &made);
        assert_eq!(p.route.endpoint, again.route.endpoint, "a retry hashes alike");
        let mut resp = HeaderMap::new();
        p.answered(200, &mut resp);
        let set = resp[header::SET_COOKIE].to_str().unwrap().to_owned();
        let value = made.get().unwrap();
        assert_eq!(set, format!("sid={value}; Path=/; Max-Age=60; HttpOnly"));
        // The client sends it back: the same endpoint, no new cookie.
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_str(&format!("sid={value}")).unwrap());
        let back = pick(&b, &s, &h, &OnceLock::new());
        assert_eq!(back.route.endpoint, p.route.endpoint);
        let mut resp = HeaderMap::new();
        back.answered(200, &mut resp);
        assert!(resp.get(header::SET_COOKIE).is_none());
    }

    #[test]
    fn locality_prefers_the_nearest_endpoints_that_are_usable() {
        let b = balancer();
        let s = state(
            "{loadBalancer: {locality: {}}, outlierDetection: {consecutive5xx: 1, intervalMs: 1, baseEjectionMs: 60000, maxEjectionPercent: 100, minHealthPercent: 0}}",
        );
        let h = HeaderMap::new();
        for _ in 0..10 {
            assert_eq!(
                pick(&b, &s, &h, &OnceLock::new()).route.endpoint,
                ep("10.1.0.3:9080"),
                "same zone"
            );
        }
        pick(&b, &s, &h, &OnceLock::new()).report(Outcome::Response(500));
        for _ in 0..10 {
            assert_eq!(
                pick(&b, &s, &h, &OnceLock::new()).route.endpoint,
                ep("10.1.1.3:9080"),
                "same region"
            );
        }
        pick(&b, &s, &h, &OnceLock::new()).report(Outcome::LocalFailure);
        assert_eq!(
            pick(&b, &s, &h, &OnceLock::new()).route.endpoint,
            ep("10.1.1.4:9080"),
            "any region"
        );
        pick(&b, &s, &h, &OnceLock::new()).report(Outcome::Response(503));
        let ask = Ask {
            client: &s.workloads["c"],
            orig: None,
            http: None,
        };
        assert!(
            matches!(b.pick(&s, "default/r", 80, None, &ask), Err(RouteError::NoEndpoint(_))),
            "every endpoint ejected, no panic threshold: none"
        );
        let rows = b.view(&s);
        assert!(
            rows.iter()
                .all(|r| r.state == EndpointState::Ejected && r.ejections == 1),
            "{rows:?}"
        );
    }

    #[test]
    fn outlier_detection_ejects_within_the_percentage_and_panics_below_min_health() {
        let b = balancer();
        let s = state(
            "{loadBalancer: {algorithm: roundRobin}, outlierDetection: {consecutive5xx: 2, intervalMs: 1, baseEjectionMs: 60000, maxEjectionPercent: 10, minHealthPercent: 0}}",
        );
        let h = HeaderMap::new();
        // Every endpoint answers 500 twice: only the first is ejected (10%).
        for _ in 0..6 {
            pick(&b, &s, &h, &OnceLock::new()).report(Outcome::Response(500));
        }
        let rows = b.view(&s);
        let ejected: Vec<&EndpointHealth> = rows.iter().filter(|r| r.state == EndpointState::Ejected).collect();
        assert_eq!(ejected.len(), 1, "{rows:?}");
        assert!(ejected[0].ejected_for_ms.is_some_and(|ms| ms > 50_000));
        let out = ejected[0].endpoint.clone();
        for _ in 0..20 {
            assert_ne!(pick(&b, &s, &h, &OnceLock::new()).route.endpoint.to_string(), out);
        }
        // minHealthPercent 100: one of three ejected is below it, all are used.
        let s = state(
            "{loadBalancer: {algorithm: roundRobin}, outlierDetection: {consecutive5xx: 2, intervalMs: 1, baseEjectionMs: 60000, maxEjectionPercent: 10, minHealthPercent: 100}}",
        );
        let seen: std::collections::HashSet<String> = (0..6)
            .map(|_| pick(&b, &s, &h, &OnceLock::new()).route.endpoint.to_string())
            .collect();
        assert!(seen.contains(&out), "panic mode uses the ejected endpoint");
        assert!(b.view(&s).iter().all(|r| r.panic));
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn cookies_and_query_parameters_are_read_as_written() {
        let h = headers(&[("cookie", "a=1; session=\"xyz\""), ("cookie", "b=2")]);
        assert_eq!(cookie(&h, "session"), Some("xyz"));
        assert_eq!(cookie(&h, "b"), Some("2"));
        assert_eq!(cookie(&h, "c"), None);
        assert_eq!(query_param(Some("u=1&user=jason&x"), "user"), Some("jason"));
        assert_eq!(query_param(Some("x"), "x"), Some(""));
        assert_eq!(query_param(None, "x"), None);
    }
}
