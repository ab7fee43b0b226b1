//! L7 and L4 routes: the one typed form every routing API compiles to.
//!
//! The control plane compiles Istio `VirtualService` + `DestinationRule`
//! subsets and Gateway API `HTTPRoute`/`GRPCRoute`/`TCPRoute` (GAMMA, a
//! Service parent) into one [`ServiceRouting`] per Service; agents receive it
//! on the config stream (or read it from a standalone config file) and decide
//! per request with the pure functions here: [`ServiceRouting::select_http`]
//! (first matching route, in order, as Istio and Envoy do),
//! [`pick_weighted`] (a weighted split over a caller's random roll) and
//! [`percent_hit`] (faults, mirrors). Randomness and clocks stay with the
//! caller, so every decision is a table test.

use std::{collections::BTreeMap, fmt};

use serde::{Deserialize, Serialize};

use crate::workload::Workload;

/// Which API a [`ServiceRouting`] came from (for views, logs and `analyze`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum RouteKind {
    VirtualService,
    HttpRoute,
    GrpcRoute,
    TcpRoute,
}

impl RouteKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RouteKind::VirtualService => "VirtualService",
            RouteKind::HttpRoute => "HTTPRoute",
            RouteKind::GrpcRoute => "GRPCRoute",
            RouteKind::TcpRoute => "TCPRoute",
        }
    }
}

impl fmt::Display for RouteKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The object a route was compiled from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteOrigin {
    pub kind: RouteKind,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for RouteOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// Everything an agent needs to route requests and connections addressed to
/// one Service (`namespace/name`): ordered HTTP routes, ordered TCP routes,
/// and the subsets they name.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceRouting {
    /// `namespace/name` of the Service the routes apply to.
    pub service: String,
    /// The objects these routes came from, winner first.
    #[serde(default)]
    pub origins: Vec<RouteOrigin>,
    #[serde(default)]
    pub http: Vec<HttpRoute>,
    #[serde(default)]
    pub tcp: Vec<TcpRoute>,
    /// Named subsets of any Service a backend names (`DestinationRule`), keyed
    /// by `namespace/name` of that Service.
    #[serde(default)]
    pub subsets: BTreeMap<String, Vec<Subset>>,
}

/// A named set of a Service's endpoints: the pods whose labels include all of these.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Subset {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl Subset {
    pub fn selects(&self, w: &Workload) -> bool {
        self.labels.iter().all(|(k, v)| w.labels.get(k) == Some(v))
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRoute {
    /// The route's name (or `<origin>[i]`), for logs and metrics.
    #[serde(default)]
    pub name: String,
    /// ORed; empty matches every request.
    #[serde(default)]
    pub matches: Vec<HttpMatch>,
    /// Weighted backends; empty only when `redirect` is set.
    #[serde(default)]
    pub backends: Vec<Backend>,
    /// Whole-request deadline, retries included.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    #[serde(default)]
    pub retries: Option<RetryPolicy>,
    #[serde(default)]
    pub fault: Option<Fault>,
    #[serde(default)]
    pub mirrors: Vec<Mirror>,
    #[serde(default)]
    pub request_headers: HeaderOps,
    #[serde(default)]
    pub response_headers: HeaderOps,
    #[serde(default)]
    pub rewrite: Option<Rewrite>,
    #[serde(default)]
    pub redirect: Option<Redirect>,
}

/// One `match` block: every field set must match (AND).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpMatch {
    #[serde(default)]
    pub uri: Option<StringMatch>,
    #[serde(default)]
    pub method: Option<StringMatch>,
    #[serde(default)]
    pub authority: Option<StringMatch>,
    /// Header name (lowercase) -> how its value must match.
    #[serde(default)]
    pub headers: BTreeMap<String, StringMatch>,
    /// Headers that must be absent (or not match).
    #[serde(default)]
    pub without_headers: BTreeMap<String, StringMatch>,
    #[serde(default)]
    pub query_params: BTreeMap<String, StringMatch>,
    /// The Service port the request was sent to.
    #[serde(default)]
    pub port: Option<u16>,
    /// The calling pod's labels must include these.
    #[serde(default)]
    pub source_labels: BTreeMap<String, String>,
    #[serde(default)]
    pub source_namespace: Option<String>,
    /// `uri` compared case-insensitively (exact and prefix).
    #[serde(default)]
    pub ignore_uri_case: bool,
}

/// Istio's `StringMatch`, Gateway API's Exact/PathPrefix/RegularExpression.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "StringMatchRepr", into = "StringMatchRepr")]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    /// Gateway API `PathPrefix`: a prefix on `/`-separated segments
    /// (`/foo` matches `/foo` and `/foo/bar`, not `/foobar`).
    PathPrefix(String),
    Regex(Regex),
    /// Istio's `{}` / `prefix: ""`: present with any value.
    Present,
}

impl StringMatch {
    pub fn matches(&self, v: &str) -> bool {
        match self {
            StringMatch::Exact(e) => v == e,
            StringMatch::Prefix(p) => v.starts_with(p.as_str()),
            StringMatch::PathPrefix(p) => path_prefix(p, v),
            StringMatch::Regex(r) => r.is_full_match(v),
            StringMatch::Present => true,
        }
    }

    fn matches_ignore_case(&self, v: &str) -> bool {
        match self {
            StringMatch::Exact(e) => v.eq_ignore_ascii_case(e),
            StringMatch::Prefix(p) => {
                v.len() >= p.len() && v.is_char_boundary(p.len()) && v[..p.len()].eq_ignore_ascii_case(p)
            }
            StringMatch::PathPrefix(p) => path_prefix(&p.to_ascii_lowercase(), &v.to_ascii_lowercase()),
            other => other.matches(v),
        }
    }
}

/// `StringMatch` as written in YAML and JSON: one key set (`{exact: x}`),
/// none for [`StringMatch::Present`].
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct StringMatchRepr {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    path_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    regex: Option<String>,
}

impl TryFrom<StringMatchRepr> for StringMatch {
    type Error = String;
    fn try_from(r: StringMatchRepr) -> Result<Self, String> {
        match (r.exact, r.prefix, r.path_prefix, r.regex) {
            (None, None, None, None) => Ok(StringMatch::Present),
            (Some(e), None, None, None) => Ok(StringMatch::Exact(e)),
            (None, Some(p), None, None) => Ok(StringMatch::Prefix(p)),
            (None, None, Some(p), None) => Ok(StringMatch::PathPrefix(p)),
            (None, None, None, Some(re)) => Regex::new(&re)
                .map(StringMatch::Regex)
                .map_err(|e| format!("regex {re:?}: {e}")),
            _ => Err("a string match sets one of exact, prefix, pathPrefix, regex".into()),
        }
    }
}

impl From<StringMatch> for StringMatchRepr {
    fn from(m: StringMatch) -> Self {
        let mut r = StringMatchRepr::default();
        match m {
            StringMatch::Exact(e) => r.exact = Some(e),
            StringMatch::Prefix(p) => r.prefix = Some(p),
            StringMatch::PathPrefix(p) => r.path_prefix = Some(p),
            StringMatch::Regex(re) => r.regex = Some(re.source),
            StringMatch::Present => {}
        }
        r
    }
}

fn path_prefix(prefix: &str, path: &str) -> bool {
    let p = prefix.trim_end_matches('/');
    if p.is_empty() {
        return true;
    }
    path.starts_with(p) && matches!(path.as_bytes().get(p.len()), None | Some(b'/') | Some(b'?'))
}

/// A regular expression (RE2 syntax, as Istio's), matched against the whole
/// value as Envoy does. Compared and serialized as its source text.
#[derive(Clone, Debug)]
pub struct Regex {
    source: String,
    /// `^(?:source)$`: Envoy's safe_regex matches the whole value.
    anchored: regex::Regex,
}

impl Regex {
    pub fn new(re: &str) -> Result<Self, regex::Error> {
        Ok(Regex {
            source: re.to_owned(),
            anchored: regex::RegexBuilder::new(&format!("^(?:{re})$"))
                .size_limit(1 << 20)
                .build()?,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    pub fn is_full_match(&self, v: &str) -> bool {
        self.anchored.is_match(v)
    }
}

impl PartialEq for Regex {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Serialize for Regex {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Regex {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Regex::new(&s).map_err(serde::de::Error::custom)
    }
}

/// Where a share of the traffic goes: a Service (`namespace/name`), an
/// optional port (else the port the request was sent to), an optional subset.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Backend {
    pub service: String,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub subset: Option<String>,
    /// Relative weight (0 takes no traffic).
    #[serde(default = "one")]
    pub weight: u32,
    #[serde(default)]
    pub request_headers: HeaderOps,
    #[serde(default)]
    pub response_headers: HeaderOps,
}

fn one() -> u32 {
    1
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderOps {
    /// Replace (or add) these headers.
    #[serde(default)]
    pub set: Vec<(String, String)>,
    /// Append these values.
    #[serde(default)]
    pub add: Vec<(String, String)>,
    #[serde(default)]
    pub remove: Vec<String>,
}

impl HeaderOps {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryPolicy {
    /// Retries after the first try (Istio's `attempts`).
    pub attempts: u32,
    #[serde(default)]
    pub per_try_timeout_ms: Option<u64>,
    #[serde(default = "default_retry_on", with = "serde_norway::with::singleton_map_recursive")]
    pub retry_on: Vec<RetryOn>,
}

/// Istio's default `retryOn`: connect-failure, refused-stream, unavailable,
/// cancelled, retriable-status-codes with 503.
pub fn default_retry_on() -> Vec<RetryOn> {
    vec![
        RetryOn::ConnectFailure,
        RetryOn::RefusedStream,
        RetryOn::Unavailable,
        RetryOn::Cancelled,
        RetryOn::Status(503),
    ]
}

/// Envoy's retry conditions (`x-envoy-retry-on`, `x-envoy-retry-grpc-on`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RetryOn {
    #[serde(rename = "5xx")]
    FiveXx,
    GatewayError,
    Reset,
    ConnectFailure,
    RefusedStream,
    #[serde(rename = "retriable-4xx")]
    RetriableStatus4xx,
    /// A listed status code (`retriable-status-codes` with the codes inline: `503`).
    Status(u16),
    // gRPC status conditions (from the `grpc-status` trailer or header).
    Cancelled,
    DeadlineExceeded,
    Internal,
    ResourceExhausted,
    Unavailable,
}

impl RetryOn {
    /// Parses one entry of Istio's comma-separated `retryOn`.
    pub fn parse(s: &str) -> Result<RetryOn, String> {
        Ok(match s.trim() {
            "5xx" => RetryOn::FiveXx,
            "gateway-error" => RetryOn::GatewayError,
            "reset" => RetryOn::Reset,
            "connect-failure" => RetryOn::ConnectFailure,
            "refused-stream" => RetryOn::RefusedStream,
            "retriable-4xx" => RetryOn::RetriableStatus4xx,
            "cancelled" => RetryOn::Cancelled,
            "deadline-exceeded" => RetryOn::DeadlineExceeded,
            "internal" => RetryOn::Internal,
            "resource-exhausted" => RetryOn::ResourceExhausted,
            "unavailable" => RetryOn::Unavailable,
            other => match other.parse::<u16>() {
                Ok(c) if (100..600).contains(&c) => RetryOn::Status(c),
                _ => return Err(format!("retryOn {other:?} is not a condition Ferry knows (5xx, gateway-error, reset, connect-failure, refused-stream, retriable-4xx, cancelled, deadline-exceeded, internal, resource-exhausted, unavailable, or a status code)")),
            },
        })
    }
}

/// What one attempt ended with, as retry policies see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttemptResult {
    /// A response: its status and gRPC status (header or trailer), if any.
    Response {
        status: u16,
        grpc_status: Option<u32>,
    },
    ConnectFailure,
    /// The upstream reset the stream or closed the connection mid-request.
    Reset,
    RefusedStream,
    /// The per-try timeout fired.
    PerTryTimeout,
}

impl RetryPolicy {
    /// Whether `result` is worth another try under this policy (the caller
    /// checks attempts left, the overall deadline and whether the body can be
    /// replayed).
    pub fn retriable(&self, result: AttemptResult) -> bool {
        self.retry_on.iter().any(|c| match (c, result) {
            (RetryOn::FiveXx, AttemptResult::Response { status, .. }) => (500..600).contains(&status),
            (RetryOn::FiveXx, AttemptResult::ConnectFailure | AttemptResult::Reset | AttemptResult::PerTryTimeout) => {
                true
            }
            (RetryOn::GatewayError, AttemptResult::Response { status, .. }) => matches!(status, 502..=504),
            (RetryOn::GatewayError, AttemptResult::ConnectFailure | AttemptResult::PerTryTimeout) => true,
            (RetryOn::Reset, AttemptResult::Reset | AttemptResult::PerTryTimeout) => true,
            (RetryOn::ConnectFailure, AttemptResult::ConnectFailure) => true,
            (RetryOn::RefusedStream, AttemptResult::RefusedStream) => true,
            (RetryOn::RetriableStatus4xx, AttemptResult::Response { status, .. }) => status == 409,
            (RetryOn::Status(c), AttemptResult::Response { status, .. }) => *c == status,
            (
                g,
                AttemptResult::Response {
                    grpc_status: Some(s), ..
                },
            ) => matches!(
                (g, s),
                (RetryOn::Cancelled, 1)
                    | (RetryOn::DeadlineExceeded, 4)
                    | (RetryOn::ResourceExhausted, 8)
                    | (RetryOn::Internal, 13)
                    | (RetryOn::Unavailable, 14)
            ),
            _ => false,
        })
    }
}

/// Istio's `fault`: a delay and/or an abort, each for a percentage of requests.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Fault {
    #[serde(default)]
    pub delay: Option<FaultDelay>,
    #[serde(default)]
    pub abort: Option<FaultAbort>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultDelay {
    pub delay_ms: u64,
    /// 0–100.
    pub percent: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultAbort {
    #[serde(with = "serde_norway::with::singleton_map")]
    pub status: AbortStatus,
    /// 0–100.
    pub percent: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum AbortStatus {
    Http(u16),
    /// A gRPC status code, answered as a trailers-only response.
    Grpc(u32),
}

/// A copy of each selected request, sent and its answer dropped.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Mirror {
    pub backend: Backend,
    /// 0–100 (Istio's default when unset is 100).
    pub percent: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rewrite {
    /// Replaces the part of the path the route's `uri` prefix matched (or the
    /// whole path for exact/regex matches and routes without a `uri` match).
    #[serde(default)]
    pub prefix: Option<String>,
    /// Replaces the whole path.
    #[serde(default)]
    pub full_path: Option<String>,
    #[serde(default)]
    pub authority: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Redirect {
    #[serde(default)]
    pub scheme: Option<String>,
    #[serde(default)]
    pub authority: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    /// Replaces the whole path.
    #[serde(default)]
    pub path: Option<String>,
    /// Replaces the matched prefix.
    #[serde(default)]
    pub prefix: Option<String>,
    /// 301 unless set (301, 302, 303, 307, 308).
    #[serde(default = "moved")]
    pub status: u16,
}

fn moved() -> u16 {
    301
}

/// An ordered TCP route (Istio `tcp`, Gateway API `TCPRoute`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpRoute {
    /// The Service port it applies to (any when unset).
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub source_labels: BTreeMap<String, String>,
    pub backends: Vec<Backend>,
}

/// A request's attributes, as the matcher reads them. Header names are
/// looked up in lowercase.
pub trait HeaderLookup {
    fn header(&self, name: &str) -> Option<&str>;
}

impl HeaderLookup for BTreeMap<String, String> {
    fn header(&self, name: &str) -> Option<&str> {
        self.get(name).map(String::as_str)
    }
}

pub struct RequestAttrs<'a> {
    pub method: &'a str,
    /// The path without the query.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub authority: &'a str,
    /// The Service port the request was sent to.
    pub port: u16,
    pub headers: &'a dyn HeaderLookup,
    /// The calling pod, when it is known.
    pub source: Option<&'a Workload>,
}

impl HttpMatch {
    pub fn matches(&self, r: &RequestAttrs<'_>) -> bool {
        if let Some(u) = &self.uri {
            let ok = if self.ignore_uri_case {
                u.matches_ignore_case(r.path)
            } else {
                u.matches(r.path)
            };
            if !ok {
                return false;
            }
        }
        if self.method.as_ref().is_some_and(|m| !m.matches(r.method)) {
            return false;
        }
        if self.authority.as_ref().is_some_and(|m| !m.matches(r.authority)) {
            return false;
        }
        if self.port.is_some_and(|p| p != r.port) {
            return false;
        }
        for (name, m) in &self.headers {
            match r.headers.header(name) {
                Some(v) if m.matches(v) => {}
                _ => return false,
            }
        }
        for (name, m) in &self.without_headers {
            if r.headers.header(name).is_some_and(|v| m.matches(v)) {
                return false;
            }
        }
        for (name, m) in &self.query_params {
            match query_param(r.query, name) {
                Some(v) if m.matches(v) => {}
                _ => return false,
            }
        }
        if !self.source_labels.is_empty() || self.source_namespace.is_some() {
            let Some(src) = r.source else { return false };
            if !self.source_labels.iter().all(|(k, v)| src.labels.get(k) == Some(v)) {
                return false;
            }
            if self.source_namespace.as_ref().is_some_and(|ns| *ns != src.namespace) {
                return false;
            }
        }
        true
    }
}

/// The first value of query parameter `name` (not percent-decoded; Envoy
/// matches the raw value too).
pub fn query_param<'q>(query: Option<&'q str>, name: &str) -> Option<&'q str> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then_some(v)
    })
}

impl HttpRoute {
    pub fn matches(&self, r: &RequestAttrs<'_>) -> bool {
        self.matches.is_empty() || self.matches.iter().any(|m| m.matches(r))
    }

    /// The path after `rewrite` (`None`: unchanged). `path` is the request's
    /// path without the query.
    pub fn rewritten_path(&self, r: &RequestAttrs<'_>) -> Option<String> {
        let rw = self.rewrite.as_ref()?;
        if let Some(full) = &rw.full_path {
            return Some(full.clone());
        }
        let new_prefix = rw.prefix.as_ref()?;
        Some(replace_prefix(self.matched_prefix(r), new_prefix, r.path))
    }

    /// The `Location` of a redirect route, from the request.
    pub fn redirect_location(&self, r: &RequestAttrs<'_>, scheme: &str) -> Option<String> {
        let rd = self.redirect.as_ref()?;
        let scheme = rd.scheme.as_deref().unwrap_or(scheme);
        let host = rd.authority.as_deref().unwrap_or(r.authority);
        let host = match rd.port {
            Some(p) => format!("{}:{p}", host.rsplit_once(':').map_or(host, |(h, _)| h)),
            None => host.to_owned(),
        };
        let path = match (&rd.path, &rd.prefix) {
            (Some(p), _) => p.clone(),
            (None, Some(pre)) => replace_prefix(self.matched_prefix(r), pre, r.path),
            (None, None) => r.path.to_owned(),
        };
        let query = r.query.map(|q| format!("?{q}")).unwrap_or_default();
        Some(format!("{scheme}://{host}{path}{query}"))
    }

    /// The prefix of the first match whose `uri` is a prefix match and
    /// matched this request.
    fn matched_prefix(&self, r: &RequestAttrs<'_>) -> Option<&str> {
        self.matches.iter().filter(|m| m.matches(r)).find_map(|m| match &m.uri {
            Some(StringMatch::Prefix(p)) => Some(p.as_str()),
            // Matched without its trailing slashes (`path_prefix`), so cut there.
            Some(StringMatch::PathPrefix(p)) => Some(p.trim_end_matches('/')),
            _ => None,
        })
    }
}

fn replace_prefix(matched: Option<&str>, new_prefix: &str, path: &str) -> String {
    match matched.and_then(|m| path.get(m.len()..)) {
        Some(rest) => {
            // Gateway API: `/foo` -> `/` on `/foo/bar` gives `/bar`, not `//bar`.
            if new_prefix.ends_with('/') && rest.starts_with('/') {
                format!("{}{}", new_prefix.trim_end_matches('/'), rest)
            } else if rest.is_empty() && new_prefix.is_empty() {
                "/".into()
            } else {
                format!("{new_prefix}{rest}")
            }
        }
        _ => new_prefix.to_owned(),
    }
}

impl ServiceRouting {
    /// The first HTTP route matching `r`, with its index: routes are tried in
    /// order and the first match wins (no match: the caller answers 404 `NR`).
    pub fn select_http(&self, r: &RequestAttrs<'_>) -> Option<(usize, &HttpRoute)> {
        self.http.iter().enumerate().find(|(_, h)| h.matches(r))
    }

    /// The first TCP route for a connection to `port` from `source`.
    pub fn select_tcp(&self, port: u16, source: Option<&Workload>) -> Option<&TcpRoute> {
        self.tcp.iter().find(|t| {
            t.port.is_none_or(|p| p == port)
                && (t.source_labels.is_empty()
                    || source.is_some_and(|s| t.source_labels.iter().all(|(k, v)| s.labels.get(k) == Some(v))))
        })
    }

    /// The subset `name` of Service `service` (`namespace/name`).
    pub fn subset(&self, service: &str, name: &str) -> Option<&Subset> {
        self.subsets.get(service)?.iter().find(|s| s.name == name)
    }
}

/// Picks one item by weight with a caller-supplied uniform random `roll`:
/// item i is chosen for rolls in its share of `[0, total)`. `None` when every
/// weight is 0.
pub fn pick_weighted<T>(items: &[T], weight: impl Fn(&T) -> u32, roll: u64) -> Option<&T> {
    let total: u64 = items.iter().map(|i| u64::from(weight(i))).sum();
    if total == 0 {
        return None;
    }
    let mut at = roll % total;
    for i in items {
        let w = u64::from(weight(i));
        if at < w {
            return Some(i);
        }
        at -= w;
    }
    None
}

/// Whether a `percent` (0–100) fault or mirror applies, for a uniform random
/// `roll` in `[0, 1)`.
pub fn percent_hit(percent: f64, roll: f64) -> bool {
    roll * 100.0 < percent
}

#[cfg(test)]
mod tests;
