//! L7/L4 routing: a `ServiceRouting` from YAML (the shape an agent's config
//! holds, regexes compiled on the way in), then per request drawn from the
//! input's tail: `select_http`, the selected route's `rewritten_path` and
//! `redirect_location`, a weighted backend (`pick_weighted`), and
//! `select_tcp`. Must never panic; the backend picked is one of the route's.

use std::collections::BTreeMap;

use crate::{split, word, HEADERS, HOSTS, METHODS, NAMESPACES, PATHS, VALUES};
use arbitrary::{Result, Unstructured};
use ferry_model::{
    route::{pick_weighted, RequestAttrs, ServiceRouting},
    Workload,
};

fn one(r: &ServiceRouting, u: &mut Unstructured<'_>) -> Result<()> {
    let mut headers = BTreeMap::new();
    for _ in 0..u.int_in_range(0..=3u8)? {
        headers.insert(word(u, HEADERS)?, word(u, VALUES)?);
    }
    let (method, path, authority) = (word(u, METHODS)?, word(u, PATHS)?, word(u, HOSTS)?);
    let query: Option<String> = if u.arbitrary()? {
        Some(word(u, &["a=1", "user=jason&x", ""])?)
    } else {
        None
    };
    let mut labels = BTreeMap::new();
    labels.insert("app".to_owned(), word(u, &["productpage", "reviews", "sleep"])?);
    labels.insert("version".to_owned(), word(u, &["v1", "v2", "v3"])?);
    let source = Workload {
        uid: "u".into(),
        name: "src".into(),
        namespace: word(u, NAMESPACES)?,
        service_account: "default".into(),
        node: "n1".into(),
        ip: [10, 1, 1, 2].into(),
        enrolled: true,
        labels,
        netns: None,
        host_veth: None,
        workload_name: None,
        locality: None,
    };
    let port = if u.arbitrary()? {
        *u.choose(&[80u16, 9080, 8080])?
    } else {
        u.arbitrary()?
    };
    let with_source: bool = u.arbitrary()?;
    let attrs = RequestAttrs {
        method: &method,
        path: &path,
        query: query.as_deref(),
        authority: &authority,
        port,
        headers: &headers,
        source: with_source.then_some(&source),
    };
    if let Some((i, h)) = r.select_http(&attrs) {
        assert!(std::ptr::eq(h, &r.http[i]));
        let _ = h.rewritten_path(&attrs);
        let _ = h.redirect_location(&attrs, "http");
        let roll: u64 = u.arbitrary()?;
        if let Some(b) = pick_weighted(&h.backends, |b| b.weight, roll) {
            assert!(b.weight > 0 && h.backends.iter().any(|x| std::ptr::eq(x, b)));
        }
    }
    if let Some(t) = r.select_tcp(port, with_source.then_some(&source)) {
        let roll: u64 = u.arbitrary()?;
        let _ = pick_weighted(&t.backends, |b| b.weight, roll);
    }
    Ok(())
}

/// One input (the cargo-fuzz target `route` and the replay test call this).
pub fn run(data: &[u8]) {
    let (text, mut u) = split(data);
    let Ok(r) = serde_norway::from_str::<ServiceRouting>(&text) else {
        return;
    };
    loop {
        if one(&r, &mut u).is_err() || u.is_empty() {
            break;
        }
    }
}
