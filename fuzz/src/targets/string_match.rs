//! `StringMatch` (exact, prefix, Gateway `PathPrefix`, RE2 regex, present):
//! a pattern and a value from the input, matched case-sensitively and (as
//! `ignoreUriCase` does) without regard to ASCII case, through `HttpMatch`.
//! Must never panic; the laws: exact(v) matches v, prefix(p) matches p+s,
//! pathPrefix(p) matches p, a match is also a case-insensitive match.

use std::collections::BTreeMap;

use arbitrary::Unstructured;
use ferry_model::route::{HttpMatch, Regex, RequestAttrs, StringMatch};

fn on_path(m: &StringMatch, path: &str, ignore_case: bool) -> bool {
    let hm = HttpMatch {
        uri: Some(m.clone()),
        ignore_uri_case: ignore_case,
        ..Default::default()
    };
    let headers = BTreeMap::new();
    hm.matches(&RequestAttrs {
        method: "GET",
        path,
        query: None,
        authority: "a",
        port: 80,
        headers: &headers,
        source: None,
    })
}

/// One input (the cargo-fuzz target `string_match` and the replay test call this).
pub fn run(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let (Ok(kind), Ok(pat), Ok(val)) = (
        u.int_in_range(0..=4u8),
        u.arbitrary::<String>(),
        u.arbitrary::<String>(),
    ) else {
        return;
    };
    let m = match kind {
        0 => StringMatch::Exact(pat.clone()),
        1 => StringMatch::Prefix(pat.clone()),
        2 => StringMatch::PathPrefix(pat.clone()),
        3 => match Regex::new(&pat) {
            Ok(r) => StringMatch::Regex(r),
            Err(_) => return,
        },
        _ => StringMatch::Present,
    };
    let plain = m.matches(&val);
    assert_eq!(on_path(&m, &val, false), plain);
    let folded = on_path(&m, &val, true);
    if plain {
        assert!(folded, "{m:?} matches {val:?} but not ignoring case");
    }
    match &m {
        StringMatch::Exact(e) => assert!(m.matches(e)),
        StringMatch::Prefix(p) => assert!(m.matches(&format!("{p}{val}"))),
        StringMatch::PathPrefix(p) => assert!(m.matches(p), "{p:?} does not path-prefix itself"),
        _ => {}
    }
    // The YAML form round-trips.
    if let Ok(y) = serde_norway::to_string(&m) {
        let back: StringMatch = serde_norway::from_str(&y).expect("serialized StringMatch reads back");
        assert_eq!(back, m);
    }
}
