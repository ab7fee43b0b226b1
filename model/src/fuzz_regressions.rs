//! Reproducers of what fuzzing found (`fuzz/`, docs/fuzzing.md), one test
//! each, minimised. A test marked `#[ignore]` is a known bug not yet fixed:
//! its reason names the bug; remove the `#[ignore]` with the fix.

use std::collections::BTreeMap;

use crate::route::{HttpMatch, HttpRoute, Redirect, RequestAttrs, Rewrite, StringMatch};

fn attrs<'a>(path: &'a str, headers: &'a BTreeMap<String, String>) -> RequestAttrs<'a> {
    RequestAttrs {
        method: "GET",
        path,
        query: None,
        authority: "reviews:9080",
        port: 9080,
        headers,
        source: None,
    }
}

fn path_prefix_route(prefix: &str) -> HttpRoute {
    HttpRoute {
        matches: vec![HttpMatch {
            uri: Some(StringMatch::PathPrefix(prefix.into())),
            ..Default::default()
        }],
        rewrite: Some(Rewrite {
            prefix: Some("/x".into()),
            ..Default::default()
        }),
        redirect: Some(Redirect {
            prefix: Some("/x".into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// `PathPrefix` matches on the prefix without its trailing slashes
/// (`path_prefix` trims them), but `replace_prefix` cuts the request path
/// at the length of the prefix *with* them: `/a//` matches `/a/é` and the
/// cut falls inside `é` (a panic: byte index 4 is not a char boundary).
/// Found by the `route` fuzz target.
#[test]
fn path_prefix_with_trailing_slashes_rewrites_without_panicking() {
    let h = BTreeMap::new();
    let route = path_prefix_route("/a//");
    let r = attrs("/a/é", &h);
    assert!(route.matches(&r));
    assert_eq!(route.rewritten_path(&r).as_deref(), Some("/x/é"));
    assert_eq!(
        route.redirect_location(&r, "http").as_deref(),
        Some("http://reviews:9080/x/é")
    );
}

/// The same cause without a panic: `/a/` (Gateway API: the same as `/a`)
/// rewritten to `/x` turns `/a/bc` into `/xbc`, not `/x/bc`.
#[test]
fn path_prefix_with_a_trailing_slash_keeps_the_separator() {
    let h = BTreeMap::new();
    let route = path_prefix_route("/a/");
    let r = attrs("/a/bc", &h);
    assert!(route.matches(&r));
    assert_eq!(route.rewritten_path(&r).as_deref(), Some("/x/bc"));
}
