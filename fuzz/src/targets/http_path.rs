//! Request paths normalized before authorization
//! (`proxy::http::path::normalize`, RFC 3986 as Istio's default). Must never
//! panic, and must be idempotent: the app gets the normalized path, and if
//! normalizing it again changed it, the app (or a proxy behind it) could see
//! a path authorization never did (`%2%65` decodes to `%2e`, which is `.`).

use ferry_agent::proxy::http::path::normalize;

/// One input (the cargo-fuzz target `http_path` and the replay test call this).
pub fn run(data: &[u8]) {
    let Ok(p) = std::str::from_utf8(data) else {
        return;
    };
    let once = normalize(p);
    if once.starts_with('/') {
        assert!(
            !once.split('/').any(|s| s == "." || s == ".."),
            "dot segment left in {once:?} (from {p:?})"
        );
    }
    let twice = normalize(&once);
    assert_eq!(twice, once, "normalize is not idempotent on {p:?}");
}
