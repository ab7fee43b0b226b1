//! Helpers the fuzz targets share: an input is a text (YAML, a CSR...)
//! optionally followed by a NUL byte and entropy for the rest (requests to
//! evaluate, rolls), so the seeds can be the repo's plain YAML files.

use arbitrary::{Result, Unstructured};

pub mod targets;

/// Splits at the last NUL: (text, entropy). Without a NUL the whole input
/// is the text and the entropy is empty (every draw then takes its default).
pub fn split(data: &[u8]) -> (String, Unstructured<'_>) {
    match data.iter().rposition(|&b| b == 0) {
        Some(i) => (
            String::from_utf8_lossy(&data[..i]).into_owned(),
            Unstructured::new(&data[i + 1..]),
        ),
        None => (String::from_utf8_lossy(data).into_owned(), Unstructured::new(&[])),
    }
}

/// One of `common` (names the seeds use, so rules can match) or any string.
pub fn word(u: &mut Unstructured<'_>, common: &[&str]) -> Result<String> {
    if u.ratio(3, 4)? && !common.is_empty() {
        Ok((*u.choose(common)?).to_owned())
    } else {
        u.arbitrary()
    }
}

pub const METHODS: &[&str] = &["GET", "POST", "PUT", "DELETE", "HEAD", "PATCH", "OPTIONS"];
pub const PATHS: &[&str] = &[
    "/",
    "/api",
    "/api/v1",
    "/reviews/1",
    "/ratings",
    "/admin",
    "/health",
    "/a/é",
];
pub const HOSTS: &[&str] = &[
    "reviews",
    "reviews:9080",
    "ratings.default.svc.cluster.local",
    "example.com",
];
pub const NAMESPACES: &[&str] = &["default", "bookinfo", "shop", "istio-system", "foo"];
pub const HEADERS: &[&str] = &["end-user", "x-user", "x-canary", "user-agent", "content-type"];
pub const VALUES: &[&str] = &["jason", "true", "v1", "v2", "application/json", "curl"];
