//! Load balancing and outlier detection as pure decisions: the algorithms of
//! a DestinationRule's `loadBalancer` and the `outlierDetection` state
//! machine. Nothing here reads a clock or a random source: time is an
//! argument (milliseconds on any monotonic clock) and so is every random
//! roll, so each decision is a table test. The agent owns the mutable state
//! (in-flight counts, the outlier state, built tables) and calls these.
//!
//! - [`SmoothRoundRobin`], [`random`], [`least_request`] (power of two
//!   choices over caller-supplied in-flight counts): over weights, which are
//!   [`FULL_WEIGHT`] except for endpoints still warming up ([`warmup_weight`]);
//! - [`Ring`] (Ketama ring hash) and [`Maglev`] (the Maglev paper's lookup
//!   table), each built once per endpoint set, looked up with a 64-bit hash
//!   of the request's key ([`hash64`]);
//! - [`priority`]: locality preference (`localityLbSetting`): same
//!   region/zone/subzone first, then `failover` regions, or the
//!   `failoverPriority` labels;
//! - [`Outliers`]: consecutive 5xx / gateway / local-origin failures per
//!   endpoint, ejection for `baseEjectionTime` x times ejected within
//!   `maxEjectionPercent`, re-admission checked every `interval`, and
//!   [`panic`] (`minHealthPercent`).
//!
//! The hash is FNV-1a 64 followed by the splitmix64 finalizer (FNV alone
//! spreads short, similar keys such as `10.1.1.2:9080_17` poorly over the
//! high bits a ring compares). It is not Envoy's xxHash, so the same key
//! may land on a different endpoint than under Envoy; stickiness and
//! minimal movement, which are what clients rely on, are the same.

use std::{collections::HashMap, hash::Hash};

use crate::traffic::{LocalityLb, OutlierDetection};

/// The weight of a warm endpoint; one warming up weighs less.
pub const FULL_WEIGHT: u32 = 1000;
/// A new endpoint's share starts at this percent of a warm one's (Envoy's
/// slow-start `min_weight_percent` default).
pub const WARMUP_MIN_PERCENT: u32 = 10;
/// The most points a ring gets, whatever `minimumRingSize` asks (16 bytes
/// each: 16 MiB). Envoy's default maximum is 8M points.
pub const MAX_RING_POINTS: u64 = 1 << 20;
/// The largest Maglev table (Envoy's limit).
pub const MAX_MAGLEV_TABLE: u64 = 5_000_011;
/// Envoy's `max_ejection_time` default: an ejection never lasts longer than
/// this or `baseEjectionTime`, whichever is larger.
pub const MAX_EJECTION_MS: u64 = 300_000;

// ---------------------------------------------------------------------------
// Hashing.

/// FNV-1a 64 of `data`, then the splitmix64 finalizer.
pub fn hash64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h)
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

// ---------------------------------------------------------------------------
// Simple algorithms.

/// Weighted round robin, smooth (nginx's): each endpoint is picked its
/// weight's share of every cycle, interleaved, not in runs; with equal
/// weights, plain round robin. The state follows positions in the weight
/// list and starts over when its length changes.
#[derive(Clone, Debug, Default)]
pub struct SmoothRoundRobin {
    current: Vec<i64>,
}

impl SmoothRoundRobin {
    /// The next endpoint (an index into `weights`); `None` when every
    /// weight is 0.
    pub fn pick(&mut self, weights: &[u32]) -> Option<usize> {
        if self.current.len() != weights.len() {
            self.current = vec![0; weights.len()];
        }
        let total: i64 = weights.iter().map(|w| i64::from(*w)).sum();
        if total == 0 {
            return None;
        }
        let mut best: Option<usize> = None;
        for (i, w) in weights.iter().enumerate() {
            if *w == 0 {
                continue;
            }
            self.current[i] += i64::from(*w);
            if best.is_none_or(|b| self.current[i] > self.current[b]) {
                best = Some(i);
            }
        }
        let b = best?;
        self.current[b] -= total;
        Some(b)
    }
}

/// A weighted random pick with a uniform random `roll`.
pub fn random(weights: &[u32], roll: u64) -> Option<usize> {
    let idx: Vec<usize> = (0..weights.len()).collect();
    crate::route::pick_weighted(&idx, |i| weights[*i], roll).copied()
}

/// LEAST_REQUEST: power of two choices. Two distinct endpoints are drawn:
/// the first by `cursor` (a counter the caller advances per pick: it
/// rotates), the second uniformly with `roll`; the one with fewer requests
/// in flight per unit of weight wins, the first on a tie. So with nothing
/// in flight (sequential requests) picks rotate as round robin does, and
/// under load the busier of any two is avoided. `in_flight[i]` and
/// `weights[i]` describe endpoint i; endpoints of weight 0 are never chosen.
pub fn least_request(weights: &[u32], in_flight: &[u64], cursor: u64, roll: u64) -> Option<usize> {
    let live: Vec<usize> = (0..weights.len()).filter(|i| weights[*i] > 0).collect();
    let n = live.len() as u64;
    match n {
        0 => return None,
        1 => return Some(live[0]),
        _ => {}
    }
    let a = (cursor % n) as usize;
    let b = (roll % (n - 1)) as usize;
    let b = if b >= a { b + 1 } else { b };
    let (a, b) = (live[a], live[b]);
    let load = |i: usize, other: usize| {
        // (in_flight + 1) / weight, compared by cross-multiplying.
        u128::from(in_flight.get(i).copied().unwrap_or(0).saturating_add(1)) * u128::from(weights[other])
    };
    Some(if load(b, a) < load(a, b) { b } else { a })
}

/// A new endpoint's weight while it warms up (`warmupDurationSecs`): a
/// linear share of [`FULL_WEIGHT`] from when it was first seen, never below
/// [`WARMUP_MIN_PERCENT`]; full weight without warm-up or once it is over.
pub fn warmup_weight(now_ms: u64, first_seen_ms: u64, warmup_ms: Option<u64>) -> u32 {
    let Some(w) = warmup_ms.filter(|w| *w > 0) else {
        return FULL_WEIGHT;
    };
    let age = now_ms.saturating_sub(first_seen_ms);
    if age >= w {
        return FULL_WEIGHT;
    }
    let linear = (u128::from(FULL_WEIGHT) * u128::from(age) / u128::from(w)) as u32;
    linear.max(FULL_WEIGHT * WARMUP_MIN_PERCENT / 100)
}

// ---------------------------------------------------------------------------
// Consistent hashing.

/// How many points each of `n` endpoints gets on a ring for
/// `minimumRingSize`: the previous count while the ring stays between
/// `minimum_ring_size` and four times it, else enough for twice the minimum
/// (at most [`MAX_RING_POINTS`] in all). Keeping the count while endpoints
/// come and go is what keeps the ring's promise: an endpoint that leaves
/// takes only its own points, so keys on the others stay where they were
/// (a count recomputed from `n` each time, as Envoy's is, would move some
/// keys between endpoints that remain). Starting at twice the minimum lets
/// half of the endpoints leave, or as many join, before the count changes.
pub fn ring_points(minimum_ring_size: u64, n: usize, previous: Option<u64>) -> u64 {
    let n = (n as u64).max(1);
    let min = minimum_ring_size.clamp(1, MAX_RING_POINTS);
    let cap = (MAX_RING_POINTS / n).max(1);
    if let Some(p) = previous.filter(|p| *p >= 1 && *p <= cap) {
        let total = p * n;
        if total >= min && total <= min.saturating_mul(4) {
            return p;
        }
    }
    (min.saturating_mul(2)).div_ceil(n).clamp(1, cap)
}

/// A Ketama ring: each endpoint owns `points_per_endpoint` points
/// ([`ring_points`]; at most [`MAX_RING_POINTS`] in all), point j of
/// endpoint `id` at `hash64("{id}_{j}")`; a key goes to the owner of the
/// first point at or after its hash (wrapping).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ring {
    points: Vec<(u64, u32)>,
}

impl Ring {
    /// The ring of `ids` (stable endpoint names, e.g. `ip:port`).
    pub fn build<S: AsRef<str>>(ids: &[S], points_per_endpoint: u64) -> Ring {
        let n = ids.len() as u64;
        if n == 0 {
            return Ring::default();
        }
        let per = points_per_endpoint.clamp(1, (MAX_RING_POINTS / n).max(1));
        let mut points = Vec::with_capacity((per * n) as usize);
        for (i, id) in ids.iter().enumerate() {
            for j in 0..per {
                points.push((hash64(format!("{}_{j}", id.as_ref()).as_bytes()), i as u32));
            }
        }
        points.sort_unstable();
        Ring { points }
    }

    /// The endpoint (index into the ids built from) for a key hash.
    pub fn lookup(&self, hash: u64) -> Option<usize> {
        if self.points.is_empty() {
            return None;
        }
        let at = self.points.partition_point(|p| p.0 < hash);
        Some(self.points[if at == self.points.len() { 0 } else { at }].1 as usize)
    }

    pub fn len(&self) -> usize {
        self.points.len()
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }
}

/// A Maglev lookup table (Eisenbud et al., NSDI 2016): a prime size `m`;
/// endpoint i's preference list is `(offset_i + j * skip_i) mod m` with
/// `offset_i = h1(id) mod m` and `skip_i = h2(id) mod (m - 1) + 1`; endpoints
/// take turns claiming their next free preferred slot until the table is
/// full. A key goes to `table[hash mod m]`. Even shares (within a slot or
/// so of `m / n`), and little movement when an endpoint leaves.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Maglev {
    table: Vec<u32>,
}

impl Maglev {
    /// The table of `ids`; its size is `table_size` rounded up to a prime
    /// (at most [`MAX_MAGLEV_TABLE`]).
    pub fn build<S: AsRef<str>>(ids: &[S], table_size: u64) -> Maglev {
        let n = ids.len();
        if n == 0 {
            return Maglev::default();
        }
        let m = next_prime(table_size.clamp(2, MAX_MAGLEV_TABLE));
        let prefs: Vec<(u64, u64)> = ids
            .iter()
            .map(|id| {
                let id = id.as_ref().as_bytes();
                let offset = hash64(id) % m;
                let skip = mix(hash64(id) ^ 0x9e37_79b9_7f4a_7c15) % (m - 1) + 1;
                (offset, skip)
            })
            .collect();
        let mut next = vec![0u64; n];
        let mut table = vec![u32::MAX; m as usize];
        let mut filled = 0u64;
        'fill: loop {
            for (i, &(offset, skip)) in prefs.iter().enumerate() {
                let mut c = (offset + next[i] % m * skip) % m;
                while table[c as usize] != u32::MAX {
                    next[i] += 1;
                    c = (offset + next[i] % m * skip) % m;
                }
                table[c as usize] = i as u32;
                next[i] += 1;
                filled += 1;
                if filled == m {
                    break 'fill;
                }
            }
        }
        Maglev { table }
    }

    /// The endpoint (index into the ids built from) for a key hash.
    pub fn lookup(&self, hash: u64) -> Option<usize> {
        if self.table.is_empty() {
            return None;
        }
        Some(self.table[(hash % self.table.len() as u64) as usize] as usize)
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

/// The smallest prime at or above `n` (n >= 2).
pub fn next_prime(n: u64) -> u64 {
    let is_prime = |k: u64| k >= 2 && (2..).take_while(|d| d * d <= k).all(|d| !k.is_multiple_of(d));
    (n.max(2)..).find(|k| is_prime(*k)).unwrap_or(2)
}

// ---------------------------------------------------------------------------
// Locality.

/// The pod label Istio reads a workload's locality from when set
/// (`region.zone.subzone`: label values cannot hold `/`).
pub const LOCALITY_LABEL: &str = "istio-locality";

/// A workload's locality (`region/zone/subzone`) from its labels: the
/// [`LOCALITY_LABEL`] override, dots turned into slashes.
pub fn locality_label(labels: &std::collections::BTreeMap<String, String>) -> Option<String> {
    let v = labels.get(LOCALITY_LABEL)?.trim();
    (!v.is_empty()).then(|| v.splitn(3, '.').collect::<Vec<_>>().join("/"))
}

/// Where a workload runs: `region/zone/subzone` (parts may be empty) and
/// its labels, for `failoverPriority`.
#[derive(Clone, Copy, Debug)]
pub struct Place<'a> {
    pub locality: Option<&'a str>,
    pub labels: Option<&'a std::collections::BTreeMap<String, String>>,
}

/// The Kubernetes topology labels `failoverPriority` may name, read from
/// the locality rather than from pod labels (as Istio does).
const REGION: &str = "topology.kubernetes.io/region";
const ZONE: &str = "topology.kubernetes.io/zone";
const SUBZONE: &str = "topology.istio.io/subzone";

impl<'a> Place<'a> {
    fn part(&self, i: usize) -> Option<&'a str> {
        self.locality?.split('/').nth(i).filter(|s| !s.is_empty())
    }

    fn value(&self, key: &str) -> Option<&'a str> {
        match key {
            REGION => self.part(0),
            ZONE => self.part(1),
            SUBZONE => self.part(2),
            _ => self.labels?.get(key).map(String::as_str),
        }
    }
}

/// An endpoint's priority for a client under `lb` (0 is best; traffic goes
/// to the best priority that has a usable endpoint).
///
/// - `failoverPriority` set: for labels `[l1, .., ln]`, `n - k` where `k` is
///   how many leading labels the endpoint shares with the client (a label
///   written `key=value` matches endpoints whose `key` is `value`, whatever
///   the client's); the topology labels are read from the locality.
/// - else by topology: same region, zone and subzone 0; same region and
///   zone 1; same region 2; a region `failover` names for the client's
///   region 3; any other 4.
///
/// A client without a locality sees every endpoint at priority 0 under the
/// topology rule.
pub fn priority(lb: &LocalityLb, client: &Place<'_>, endpoint: &Place<'_>) -> u32 {
    if !lb.failover_priority.is_empty() {
        let n = lb.failover_priority.len() as u32;
        let shared = lb
            .failover_priority
            .iter()
            .take_while(|l| match l.split_once('=') {
                Some((k, v)) => endpoint.value(k.trim()) == Some(v.trim()),
                None => client.value(l).is_some_and(|c| endpoint.value(l) == Some(c)),
            })
            .count() as u32;
        return n - shared;
    }
    if client.locality.is_none() {
        return 0;
    }
    let same = |i: usize| client.part(i) == endpoint.part(i);
    match (same(0), same(1), same(2)) {
        _ if client.part(0).is_none() => 0,
        (true, true, true) => 0,
        (true, true, false) => 1,
        (true, false, _) => 2,
        (false, ..) => {
            let to = lb
                .failover
                .iter()
                .any(|f| Some(f.from.as_str()) == client.part(0) && Some(f.to.as_str()) == endpoint.part(0));
            if to {
                3
            } else {
                4
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Outlier detection.

/// What one attempt to an endpoint came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// An HTTP answer with this status.
    Response(u16),
    /// A TCP connection was opened (the L4 path's success).
    Connected,
    /// A local-origin failure: connect refused or timed out, reset, no
    /// answer in time.
    LocalFailure,
}

/// Why an endpoint was ejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    Consecutive5xx,
    ConsecutiveGateway,
    ConsecutiveLocalOrigin,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Consecutive5xx => "consecutive_5xx",
            Reason::ConsecutiveGateway => "consecutive_gateway",
            Reason::ConsecutiveLocalOrigin => "consecutive_local_origin",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One endpoint's outlier state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Host {
    pub consecutive_5xx: u32,
    pub consecutive_gateway: u32,
    pub consecutive_local_origin: u32,
    /// When it was ejected (None: in service).
    pub ejected_at: Option<u64>,
    /// How long the current ejection lasts.
    pub ejection_ms: u64,
    /// The multiplier of `baseEjectionTime` for the next ejection's length
    /// (Envoy's backoff: up by one per ejection, down by one per interval
    /// spent healthy).
    pub multiplier: u32,
    /// Ejections since the endpoint was first seen.
    pub ejections: u64,
    pub last_reason: Option<Reason>,
    last_unejected: Option<u64>,
}

impl Host {
    /// When the current ejection ends (None: not ejected).
    pub fn ejected_until(&self) -> Option<u64> {
        self.ejected_at.map(|t| t.saturating_add(self.ejection_ms))
    }
}

/// What [`Outliers::report`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing changed.
    Counted,
    /// The endpoint was ejected for `for_ms`.
    Ejected { reason: Reason, for_ms: u64 },
    /// A threshold was reached but `maxEjectionPercent` allows no more
    /// ejections now (the counter starts over).
    Spared(Reason),
}

/// Whether one more endpoint may be ejected when `ejected` of `total` are:
/// Envoy's rule as its outlier-detection overview documents it — the first
/// ejection always happens (unless `maxEjectionPercent` is 0), later ones
/// only while the ejected share is below the percentage. So with the
/// default 10% and fewer than ten endpoints, one may be ejected at a time.
pub fn may_eject(max_ejection_percent: u32, ejected: usize, total: usize) -> bool {
    if max_ejection_percent == 0 || ejected >= total {
        return false;
    }
    ejected == 0 || (ejected as u64) * 100 < u64::from(max_ejection_percent.min(100)) * total as u64
}

/// Panic mode (`minHealthPercent`): when fewer than this share of the
/// endpoints is healthy, ejections are ignored and every endpoint is used.
/// 0 (Istio's default) never panics.
pub fn panic(min_health_percent: u32, healthy: usize, total: usize) -> bool {
    total > 0 && (healthy as u64) * 100 < u64::from(min_health_percent.min(100)) * total as u64
}

/// The outlier state of one set of endpoints (a Service, subset and port):
/// per endpoint `K`, its counters and ejection. See the module doc.
#[derive(Clone, Debug)]
pub struct Outliers<K> {
    hosts: HashMap<K, Host>,
    next_sweep: Option<u64>,
}

impl<K> Default for Outliers<K> {
    fn default() -> Self {
        Self {
            hosts: HashMap::new(),
            next_sweep: None,
        }
    }
}

impl<K: Hash + Eq + Clone> Outliers<K> {
    /// Forgets endpoints that are no longer in `current` (as Envoy does: one
    /// that comes back starts afresh).
    pub fn retain(&mut self, current: &[K]) {
        if self.hosts.keys().any(|k| !current.contains(k)) {
            self.hosts.retain(|k, _| current.contains(k));
        }
    }

    pub fn host(&self, k: &K) -> Option<&Host> {
        self.hosts.get(k)
    }

    pub fn is_ejected(&self, k: &K) -> bool {
        self.hosts.get(k).is_some_and(|h| h.ejected_at.is_some())
    }

    pub fn ejected(&self) -> usize {
        self.hosts.values().filter(|h| h.ejected_at.is_some()).count()
    }

    /// Every endpoint with state, and its state.
    pub fn hosts(&self) -> impl Iterator<Item = (&K, &Host)> {
        self.hosts.iter()
    }

    /// Counts one attempt's outcome for endpoint `k` (one of `total`
    /// endpoints) at `now`; may eject it (Envoy's consecutive-errors rules:
    /// a 5xx counts towards `consecutive5xxErrors`, a 502/503/504 towards
    /// `consecutiveGatewayErrors` too, any other answer resets both; a
    /// local-origin failure counts as a 503, or on its own counter with
    /// `splitExternalLocalOriginErrors`).
    pub fn report(&mut self, cfg: &OutlierDetection, k: &K, outcome: Outcome, now: u64, total: usize) -> Verdict {
        let split = cfg.consecutive_local_origin.is_some();
        let outcome = match outcome {
            Outcome::LocalFailure if !split => Outcome::Response(503),
            o => o,
        };
        let ejected_now = self.ejected();
        let h = self.hosts.entry(k.clone()).or_default();
        let mut hit: Option<Reason> = None;
        match outcome {
            Outcome::Response(s) if (500..600).contains(&s) => {
                if matches!(s, 502..=504) {
                    h.consecutive_gateway += 1;
                    if cfg.consecutive_gateway.is_some_and(|n| h.consecutive_gateway >= n) {
                        hit = Some(Reason::ConsecutiveGateway);
                    }
                } else {
                    h.consecutive_gateway = 0;
                }
                h.consecutive_5xx += 1;
                if hit.is_none() && cfg.consecutive_5xx.is_some_and(|n| h.consecutive_5xx >= n) {
                    hit = Some(Reason::Consecutive5xx);
                }
                if split {
                    h.consecutive_local_origin = 0;
                }
            }
            Outcome::Response(_) | Outcome::Connected => {
                h.consecutive_5xx = 0;
                h.consecutive_gateway = 0;
                h.consecutive_local_origin = 0;
            }
            Outcome::LocalFailure => {
                h.consecutive_local_origin += 1;
                if cfg
                    .consecutive_local_origin
                    .is_some_and(|n| h.consecutive_local_origin >= n)
                {
                    hit = Some(Reason::ConsecutiveLocalOrigin);
                }
            }
        }
        let Some(reason) = hit else {
            return Verdict::Counted;
        };
        // The counter that fired starts over, ejected or not.
        match reason {
            Reason::Consecutive5xx => h.consecutive_5xx = 0,
            Reason::ConsecutiveGateway => {
                h.consecutive_gateway = 0;
                h.consecutive_5xx = 0;
            }
            Reason::ConsecutiveLocalOrigin => h.consecutive_local_origin = 0,
        }
        if h.ejected_at.is_some() {
            return Verdict::Counted;
        }
        if !may_eject(cfg.max_ejection_percent, ejected_now, total) {
            return Verdict::Spared(reason);
        }
        let base = cfg.base_ejection_ms.max(1);
        let max = MAX_EJECTION_MS.max(base);
        if u64::from(h.multiplier).saturating_mul(base) < max.saturating_add(base) {
            h.multiplier += 1;
        }
        h.ejection_ms = u64::from(h.multiplier).saturating_mul(base).min(max);
        h.ejected_at = Some(now);
        h.ejections += 1;
        h.last_reason = Some(reason);
        if self.next_sweep.is_none() {
            self.next_sweep = Some(now.saturating_add(cfg.interval_ms.max(1)));
        }
        Verdict::Ejected {
            reason,
            for_ms: h.ejection_ms,
        }
    }

    /// The interval's sweep, when one is due at `now` (every `interval`
    /// from the first ejection on): ejected endpoints whose time is up come
    /// back (returned), and an endpoint healthy for an interval since its
    /// last return has its ejection multiplier lowered by one.
    pub fn sweep(&mut self, cfg: &OutlierDetection, now: u64) -> Vec<K> {
        let interval = cfg.interval_ms.max(1);
        let due = match self.next_sweep {
            Some(t) if now >= t => t,
            _ => return Vec::new(),
        };
        let mut back = Vec::new();
        for (k, h) in &mut self.hosts {
            match h.ejected_at {
                Some(t) if now.saturating_sub(t) >= h.ejection_ms => {
                    h.ejected_at = None;
                    h.last_unejected = Some(now);
                    back.push(k.clone());
                }
                Some(_) => {}
                None => {
                    if h.multiplier > 0 && h.last_unejected.is_some_and(|u| now.saturating_sub(u) >= interval) {
                        h.multiplier -= 1;
                    }
                }
            }
        }
        let busy = self.hosts.values().any(|h| h.ejected_at.is_some() || h.multiplier > 0);
        // On the interval's grid, however late this sweep ran.
        let next = due.saturating_add(interval.saturating_mul((now - due) / interval + 1));
        self.next_sweep = busy.then_some(next);
        back
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashSet};

    use super::*;
    use crate::traffic::LocalityFailover;

    fn ids(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("10.1.{}.{}:9080", i / 200, i % 200 + 2))
            .collect()
    }

    #[test]
    fn round_robin_interleaves_by_weight() {
        let mut rr = SmoothRoundRobin::default();
        let got: Vec<usize> = (0..6).map(|_| rr.pick(&[1000, 1000, 1000]).unwrap()).collect();
        assert_eq!(got, [0, 1, 2, 0, 1, 2]);
        let mut rr = SmoothRoundRobin::default();
        let got: Vec<usize> = (0..6).map(|_| rr.pick(&[2, 1, 0, 3]).unwrap()).collect();
        let count = |i| got.iter().filter(|g| **g == i).count();
        assert_eq!((count(0), count(1), count(2), count(3)), (2, 1, 0, 3));
        assert_ne!(got[0], got[1], "interleaved, not in runs");
        assert_eq!(rr.pick(&[0, 0]), None);
        assert_eq!(rr.pick(&[]), None);
    }

    #[test]
    fn random_follows_weights_and_skips_zero() {
        assert_eq!(random(&[0, 5], 3), Some(1));
        assert_eq!(random(&[1, 1], 0), Some(0));
        assert_eq!(random(&[1, 1], 1), Some(1));
        assert_eq!(random(&[0, 0], 1), None);
    }

    #[test]
    fn least_request_prefers_the_less_loaded_of_two() {
        let w = [FULL_WEIGHT; 2];
        for c in 0..10 {
            assert_eq!(least_request(&w, &[5, 1], c, c * 7), Some(1));
            assert_eq!(least_request(&w, &[0, 9], c, c * 7), Some(0));
        }
        // Nothing in flight: the cursor rotates, whatever the rolls.
        let w3 = [FULL_WEIGHT; 3];
        let got: Vec<usize> = (0..6)
            .map(|c| least_request(&w3, &[0; 3], c, 12345 * c).unwrap())
            .collect();
        assert_eq!(got, [0, 1, 2, 0, 1, 2]);
        // The second draw differs from the first and reaches every other.
        for c in 0..3u64 {
            let seconds: HashSet<usize> = (0..2u64)
                .map(|roll| {
                    let mut load = [1u64; 3];
                    load[(c % 3) as usize] = 9;
                    least_request(&w3, &load, c, roll).unwrap()
                })
                .collect();
            assert_eq!(seconds.len(), 2);
            assert!(!seconds.contains(&((c % 3) as usize)));
        }
        // The busiest of three is never chosen: it loses to either other.
        for c in 0..100 {
            assert_ne!(least_request(&w3, &[1, 50, 2], c, c / 3), Some(1));
        }
        // Weight: half weight with 1 in flight is as loaded as full with 3.
        assert_eq!(least_request(&[FULL_WEIGHT / 2, FULL_WEIGHT], &[1, 4], 0, 0), Some(0));
        assert_eq!(
            least_request(&[0, FULL_WEIGHT], &[0, 100], 0, 0),
            Some(1),
            "weight 0: never"
        );
        assert_eq!(least_request(&[], &[], 0, 0), None);
    }

    #[test]
    fn warmup_ramps_linearly_from_a_floor() {
        let w = Some(10_000);
        assert_eq!(warmup_weight(5_000, 5_000, w), 100, "floor: 10%");
        assert_eq!(warmup_weight(5_000, 0, w), 500);
        assert_eq!(warmup_weight(9_000, 0, w), 900);
        assert_eq!(warmup_weight(10_000, 0, w), FULL_WEIGHT);
        assert_eq!(warmup_weight(0, 0, None), FULL_WEIGHT);
        assert_eq!(warmup_weight(0, 100, w), 100, "a clock behind first-seen: the floor");
    }

    #[test]
    fn ring_is_sticky_balanced_and_moves_only_the_leavers_keys() {
        let all = ids(4);
        let per = ring_points(1024, 4, None);
        assert_eq!(per, 512, "twice the minimum");
        let ring = Ring::build(&all, per);
        assert_eq!(ring.len(), 2048);
        let keys: Vec<u64> = (0..4000).map(|k| hash64(format!("user-{k}").as_bytes())).collect();
        let before: Vec<usize> = keys.iter().map(|h| ring.lookup(*h).unwrap()).collect();
        let mut counts = [0usize; 4];
        for b in &before {
            counts[*b] += 1;
        }
        assert!(counts.iter().all(|c| (700..1300).contains(c)), "balanced: {counts:?}");
        // Endpoint 2 leaves.
        let rest: Vec<String> = all
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 2)
            .map(|(_, s)| s.clone())
            .collect();
        let per2 = ring_points(1024, 3, Some(per));
        assert_eq!(per2, per, "kept while the ring is 1x-4x the minimum");
        let ring2 = Ring::build(&rest, per2);
        for (h, b) in keys.iter().zip(&before) {
            let now = &rest[ring2.lookup(*h).unwrap()];
            if *b != 2 {
                assert_eq!(now, &all[*b], "a key of a remaining endpoint stays");
            }
        }
        assert_eq!(Ring::build::<String>(&[], 10).lookup(1), None);
        assert_eq!(Ring::build(&all, u64::MAX).len() as u64, MAX_RING_POINTS, "capped");
        assert_eq!(Ring::build(&ids(3), 0).len(), 3, "at least one point each");
        assert_eq!(ring_points(1024, 1, Some(512)), 2048, "below the minimum: recomputed");
        assert_eq!(ring_points(1024, 9, Some(512)), 228, "above 4x: recomputed");
        assert_eq!(ring_points(u64::MAX, 4, None), MAX_RING_POINTS / 4);
        assert_eq!(ring_points(0, 0, None), 2);
    }

    #[test]
    fn maglev_fills_a_prime_table_evenly_and_moves_little() {
        assert_eq!(next_prime(65537), 65537);
        assert_eq!(next_prime(100), 101);
        assert_eq!(next_prime(0), 2);
        let all = ids(5);
        let m = Maglev::build(&all, 251);
        assert_eq!(m.len(), 251);
        let mut per = [0usize; 5];
        for slot in 0..251u64 {
            per[m.lookup(slot).unwrap()] += 1;
        }
        assert!(per.iter().all(|c| (50..=51).contains(c)), "even: {per:?}");
        let big = Maglev::build(&all, 65537);
        let rest: Vec<String> = all[..4].to_vec();
        let big2 = Maglev::build(&rest, 65537);
        let (mut moved, mut kept) = (0, 0);
        for k in 0..10_000 {
            let h = hash64(format!("k{k}").as_bytes());
            let b = big.lookup(h).unwrap();
            if b == 4 {
                continue;
            }
            if rest[big2.lookup(h).unwrap()] == all[b] {
                kept += 1;
            } else {
                moved += 1;
            }
        }
        assert!(
            moved * 100 < (kept + moved) * 5,
            "little movement: {moved} moved, {kept} kept"
        );
        assert_eq!(Maglev::build(&ids(3), 4).len(), 5, "rounded up to a prime");
        assert!(Maglev::build::<String>(&[], 7).lookup(3).is_none());
    }

    fn place<'a>(locality: Option<&'a str>, labels: &'a BTreeMap<String, String>) -> Place<'a> {
        Place {
            locality,
            labels: Some(labels),
        }
    }

    #[test]
    fn locality_from_the_istio_label() {
        let l = |v: &str| locality_label(&[(LOCALITY_LABEL.to_string(), v.to_string())].into());
        assert_eq!(
            l("us-east.us-east-1a.rack1").as_deref(),
            Some("us-east/us-east-1a/rack1")
        );
        assert_eq!(l("r1.z1").as_deref(), Some("r1/z1"));
        assert_eq!(l("r.z.s.extra").as_deref(), Some("r/z/s.extra"));
        assert_eq!(l(" "), None);
        assert_eq!(locality_label(&BTreeMap::new()), None);
    }

    #[test]
    fn locality_priorities() {
        let none = BTreeMap::new();
        let lb = LocalityLb::default();
        let client = place(Some("r1/z1/s1"), &none);
        let p = |loc: Option<&str>, lb: &LocalityLb| priority(lb, &client, &place(loc, &none));
        assert_eq!(p(Some("r1/z1/s1"), &lb), 0);
        assert_eq!(p(Some("r1/z1/s2"), &lb), 1);
        assert_eq!(p(Some("r1/z1"), &lb), 1);
        assert_eq!(p(Some("r1/z2/s1"), &lb), 2);
        assert_eq!(p(Some("r2/z1/s1"), &lb), 4);
        assert_eq!(p(None, &lb), 4);
        let fo = LocalityLb {
            failover: vec![LocalityFailover {
                from: "r1".into(),
                to: "r3".into(),
            }],
            ..Default::default()
        };
        assert_eq!(p(Some("r3/z9"), &fo), 3);
        assert_eq!(p(Some("r2/z9"), &fo), 4);
        // A client without a locality: no preference.
        assert_eq!(priority(&lb, &place(None, &none), &place(Some("r9/z9"), &none)), 0);

        let labels = |net: &str| [("topology.istio.io/network".to_string(), net.to_string())].into();
        let (n1, n2): (BTreeMap<_, _>, BTreeMap<_, _>) = (labels("n1"), labels("n2"));
        let fp = LocalityLb {
            failover_priority: vec![
                "topology.istio.io/network".into(),
                "topology.kubernetes.io/region".into(),
            ],
            ..Default::default()
        };
        let c = place(Some("r1/z1"), &n1);
        assert_eq!(priority(&fp, &c, &place(Some("r1/z2"), &n1)), 0);
        assert_eq!(priority(&fp, &c, &place(Some("r2/z2"), &n1)), 1);
        assert_eq!(priority(&fp, &c, &place(Some("r1/z1"), &n2)), 2, "leading labels only");
        let over = LocalityLb {
            failover_priority: vec!["topology.kubernetes.io/region=r2".into()],
            ..Default::default()
        };
        assert_eq!(priority(&over, &c, &place(Some("r2/z"), &n1)), 0);
        assert_eq!(priority(&over, &c, &place(Some("r1/z1"), &n1)), 1);
    }

    fn od(c5xx: Option<u32>, gw: Option<u32>, local: Option<u32>, max: u32) -> OutlierDetection {
        OutlierDetection {
            consecutive_5xx: c5xx,
            consecutive_gateway: gw,
            consecutive_local_origin: local,
            interval_ms: 1_000,
            base_ejection_ms: 10_000,
            max_ejection_percent: max,
            min_health_percent: 0,
        }
    }

    #[test]
    fn consecutive_5xx_ejects_and_a_success_resets() {
        let cfg = od(Some(3), None, None, 100);
        let mut o: Outliers<&str> = Outliers::default();
        assert_eq!(o.report(&cfg, &"a", Outcome::Response(500), 0, 4), Verdict::Counted);
        assert_eq!(o.report(&cfg, &"a", Outcome::Response(500), 1, 4), Verdict::Counted);
        assert_eq!(o.report(&cfg, &"a", Outcome::Response(200), 2, 4), Verdict::Counted);
        assert_eq!(o.host(&"a").unwrap().consecutive_5xx, 0, "reset by a success");
        for t in 3..5 {
            assert_eq!(o.report(&cfg, &"a", Outcome::Response(503), t, 4), Verdict::Counted);
        }
        assert_eq!(
            o.report(&cfg, &"a", Outcome::LocalFailure, 5, 4),
            Verdict::Ejected {
                reason: Reason::Consecutive5xx,
                for_ms: 10_000
            },
            "a local-origin failure counts as a 503"
        );
        assert!(o.is_ejected(&"a"));
        assert_eq!(o.host(&"a").unwrap().ejected_until(), Some(10_005));
    }

    #[test]
    fn gateway_errors_count_apart_and_local_origin_can_be_split() {
        let cfg = od(None, Some(2), None, 100);
        let mut o: Outliers<&str> = Outliers::default();
        o.report(&cfg, &"a", Outcome::Response(502), 0, 2);
        o.report(&cfg, &"a", Outcome::Response(500), 0, 2);
        assert_eq!(
            o.host(&"a").unwrap().consecutive_gateway,
            0,
            "a 500 resets the gateway count"
        );
        o.report(&cfg, &"a", Outcome::Response(504), 0, 2);
        assert!(matches!(
            o.report(&cfg, &"a", Outcome::Response(503), 0, 2),
            Verdict::Ejected {
                reason: Reason::ConsecutiveGateway,
                ..
            }
        ));
        let split = od(Some(2), None, Some(2), 100);
        let mut o: Outliers<&str> = Outliers::default();
        o.report(&split, &"a", Outcome::LocalFailure, 0, 2);
        o.report(&split, &"a", Outcome::Response(500), 0, 2);
        assert_eq!(
            o.host(&"a").unwrap().consecutive_5xx,
            1,
            "split: local failures are not 5xx"
        );
        assert_eq!(
            o.host(&"a").unwrap().consecutive_local_origin,
            0,
            "an answer resets them"
        );
        o.report(&split, &"a", Outcome::LocalFailure, 0, 2);
        assert!(matches!(
            o.report(&split, &"a", Outcome::LocalFailure, 0, 2),
            Verdict::Ejected {
                reason: Reason::ConsecutiveLocalOrigin,
                ..
            }
        ));
        let mut o: Outliers<&str> = Outliers::default();
        o.report(&split, &"b", Outcome::LocalFailure, 0, 2);
        o.report(&split, &"b", Outcome::Connected, 0, 2);
        assert_eq!(o.host(&"b").unwrap().consecutive_local_origin, 0, "a connect resets");
    }

    #[test]
    fn max_ejection_percent_as_envoy_documents_it() {
        assert!(may_eject(10, 0, 3), "the first ejection always happens");
        assert!(!may_eject(10, 1, 3));
        assert!(may_eject(25, 0, 4) && !may_eject(25, 1, 4));
        assert!(may_eject(50, 1, 4) && !may_eject(50, 2, 4));
        assert!(may_eject(100, 3, 4) && !may_eject(100, 4, 4));
        assert!(!may_eject(0, 0, 4), "0%: never");
        let cfg = od(Some(1), None, None, 25);
        let mut o: Outliers<&str> = Outliers::default();
        assert!(matches!(
            o.report(&cfg, &"a", Outcome::Response(500), 0, 4),
            Verdict::Ejected { .. }
        ));
        assert_eq!(
            o.report(&cfg, &"b", Outcome::Response(500), 0, 4),
            Verdict::Spared(Reason::Consecutive5xx)
        );
        assert_eq!(o.ejected(), 1);
    }

    #[test]
    fn readmitted_on_schedule_with_growing_then_shrinking_ejections() {
        let cfg = od(Some(1), None, None, 100);
        let mut o: Outliers<&str> = Outliers::default();
        o.report(&cfg, &"a", Outcome::Response(500), 0, 2);
        assert!(o.sweep(&cfg, 999).is_empty(), "no sweep before the interval");
        assert!(o.sweep(&cfg, 1_000).is_empty(), "swept, not yet due");
        assert!(o.sweep(&cfg, 9_999).is_empty());
        assert_eq!(o.sweep(&cfg, 10_000), ["a"], "back after base x 1");
        assert!(!o.is_ejected(&"a"));
        // Ejected again at once: twice as long.
        assert_eq!(
            o.report(&cfg, &"a", Outcome::Response(500), 10_000, 2),
            Verdict::Ejected {
                reason: Reason::Consecutive5xx,
                for_ms: 20_000
            }
        );
        assert!(o.sweep(&cfg, 29_000).is_empty());
        assert_eq!(o.sweep(&cfg, 30_000), ["a"]);
        // Healthy intervals bring the multiplier down again.
        o.sweep(&cfg, 31_000);
        assert_eq!(o.host(&"a").unwrap().multiplier, 1);
        o.sweep(&cfg, 32_000);
        assert_eq!(o.host(&"a").unwrap().multiplier, 0);
        assert!(matches!(
            o.report(&cfg, &"a", Outcome::Response(500), 40_000, 2),
            Verdict::Ejected { for_ms: 10_000, .. }
        ));
        assert_eq!(o.host(&"a").unwrap().ejections, 3);
        // Capped by max(300 s, base).
        let long = OutlierDetection {
            base_ejection_ms: 200_000,
            ..cfg.clone()
        };
        let mut o: Outliers<&str> = Outliers::default();
        for t in 0..5u64 {
            let now = t * 1_000_000;
            o.sweep(&long, now);
            o.report(&long, &"a", Outcome::Response(500), now, 2);
            assert!(o.host(&"a").unwrap().ejection_ms <= 300_000);
        }
        // Endpoints that left are forgotten.
        o.retain(&["b"]);
        assert!(o.host(&"a").is_none());
    }

    #[test]
    fn panic_below_min_health() {
        assert!(!panic(0, 0, 4), "0: never");
        assert!(panic(50, 1, 4));
        assert!(!panic(50, 2, 4));
        assert!(!panic(100, 0, 0));
    }
}

#[cfg(test)]
mod proptests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Power of two choices never picks the busiest endpoint when the
        /// others are strictly less busy, and always picks a live one.
        #[test]
        fn least_request_avoids_the_strictly_busiest(
            loads in proptest::collection::vec(0u64..100, 2..8),
            cursor in any::<u64>(),
            roll in any::<u64>(),
        ) {
            let w = vec![FULL_WEIGHT; loads.len()];
            let i = least_request(&w, &loads, cursor, roll).unwrap();
            prop_assert!(i < loads.len());
            let max = *loads.iter().max().unwrap();
            if loads.iter().filter(|l| **l == max).count() == 1 {
                prop_assert!(loads[i] < max);
            }
        }

        /// Ring and Maglev lookups always land on an endpoint, and removing
        /// one endpoint never moves a ring key between two that remain.
        #[test]
        fn consistent_tables_are_total_and_the_ring_is_minimal(
            n in 2usize..12,
            gone in 0usize..12,
            keys in proptest::collection::vec(any::<u64>(), 1..64),
        ) {
            let ids: Vec<String> = (0..n).map(|i| format!("10.0.0.{i}:80")).collect();
            let gone = gone % n;
            let rest: Vec<String> = ids.iter().enumerate().filter(|(i, _)| *i != gone).map(|(_, s)| s.clone()).collect();
            let per = ring_points(64, n, None);
            let (r1, r2) = (Ring::build(&ids, per), Ring::build(&rest, per));
            let m = Maglev::build(&ids, 97);
            for k in keys {
                prop_assert!(m.lookup(k).unwrap() < n);
                let a = r1.lookup(k).unwrap();
                let b = &rest[r2.lookup(k).unwrap()];
                if a != gone {
                    prop_assert_eq!(b, &ids[a]);
                }
            }
        }
    }
}
