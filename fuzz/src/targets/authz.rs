//! Authorization policies: AuthorizationPolicy YAML
//! (`authz::authz_policies_in`), `validate`, then `evaluate` on requests
//! drawn from the input's tail (L4 and L7). Must never panic; and adding a
//! DENY policy (any of them, with its action set to DENY) never turns a
//! denied request into an allowed one.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::{split, word, HEADERS, HOSTS, METHODS, NAMESPACES, PATHS, VALUES};
use arbitrary::{Result, Unstructured};
use ferry_model::authz::{self, Action, AuthzPolicy, HeaderPairs, HttpAttrs, Request};

struct Owned {
    principal: Option<String>,
    ns: Option<String>,
    src: IpAddr,
    dst: IpAddr,
    port: u16,
    sni: Option<String>,
    http: Option<(String, String, String, Vec<(String, String)>)>,
}

fn ip(u: &mut Unstructured<'_>) -> Result<IpAddr> {
    Ok(match u.int_in_range(0..=3u8)? {
        0 => IpAddr::V4(Ipv4Addr::new(10, 1, u.arbitrary()?, u.arbitrary()?)),
        1 => IpAddr::V4(Ipv4Addr::from(u.arbitrary::<u32>()?)),
        2 => IpAddr::V6(Ipv4Addr::new(10, 1, 1, u.arbitrary()?).to_ipv6_mapped()),
        _ => IpAddr::V6(Ipv6Addr::from(u.arbitrary::<u128>()?)),
    })
}

fn request(u: &mut Unstructured<'_>) -> Result<Owned> {
    let ns = if u.arbitrary()? {
        Some(word(u, NAMESPACES)?)
    } else {
        None
    };
    let principal = match &ns {
        Some(ns) if u.ratio(7, 8)? => Some(format!(
            "spiffe://cluster.local/ns/{ns}/sa/{}",
            word(u, &["default", "bookinfo-productpage", "sleep"])?
        )),
        Some(_) => Some(u.arbitrary()?),
        None => None,
    };
    let http = if u.arbitrary()? {
        let mut headers = Vec::new();
        for _ in 0..u.int_in_range(0..=3u8)? {
            headers.push((word(u, HEADERS)?, word(u, VALUES)?));
        }
        Some((word(u, METHODS)?, word(u, PATHS)?, word(u, HOSTS)?, headers))
    } else {
        None
    };
    Ok(Owned {
        principal,
        ns,
        src: ip(u)?,
        dst: ip(u)?,
        port: if u.arbitrary()? {
            *u.choose(&[80u16, 8080, 9080, 443])?
        } else {
            u.arbitrary()?
        },
        sni: if u.arbitrary()? { Some(word(u, HOSTS)?) } else { None },
        http,
    })
}

fn check(policies: &[AuthzPolicy], o: &Owned) {
    let headers: Vec<(&str, &str)> = o
        .http
        .iter()
        .flat_map(|h| h.3.iter().map(|(n, v)| (n.as_str(), v.as_str())))
        .collect();
    let pairs = HeaderPairs(&headers);
    let req = Request {
        source_principal: o.principal.as_deref(),
        source_namespace: o.ns.as_deref(),
        source_ip: o.src,
        destination_ip: o.dst,
        destination_port: o.port,
        sni: o.sni.as_deref(),
        http: o.http.as_ref().map(|(m, p, h, _)| HttpAttrs {
            method: m,
            path: p,
            host: h,
            headers: &pairs,
        }),
    };
    let refs: Vec<&AuthzPolicy> = policies.iter().collect();
    let d = authz::evaluate(&refs, &req);
    let _ = d.to_string();
    if d.verdict.is_allow() {
        return;
    }
    for p in policies {
        let mut deny = p.clone();
        deny.spec.action = Action::Deny;
        let mut more = refs.clone();
        more.push(&deny);
        let again = authz::evaluate(&more, &req);
        assert!(
            !again.verdict.is_allow(),
            "adding DENY {deny:?} turned {} into {}",
            d.verdict,
            again.verdict
        );
    }
}

/// One input (the cargo-fuzz target `authz` and the replay test call this).
pub fn run(data: &[u8]) {
    let (text, mut u) = split(data);
    let Ok(policies) = authz::authz_policies_in(&text) else {
        return;
    };
    for p in &policies {
        let _ = authz::validate(p);
        let _ = authz::needs_http(p);
    }
    // Requests from the tail, until it runs out (at least one, all defaults).
    loop {
        let Ok(o) = request(&mut u) else { break };
        check(&policies, &o);
        if u.is_empty() {
            break;
        }
    }
}
