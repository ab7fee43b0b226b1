//! The per-request routing decision, as pure functions over the state
//! snapshot (the matching itself is `ferry_model::route`): which route
//! (a Service without routes, or with TCP routes only, has one implicit
//! route to itself; a pod address has one to that address), which endpoint
//! for a backend (chosen by the load balancer, `proxy::balance`, under the
//! Service's traffic policy), and the header operations a route or backend
//! asks for.

use std::{
    net::SocketAddrV4,
    sync::{Arc, OnceLock},
};

use ferry_model::{
    route::{Backend, HeaderLookup, HeaderOps, HttpRoute, RequestAttrs, ServiceRouting},
    state::{RouteError, State},
    Workload,
};
use hyper::{
    header::{HeaderName, HeaderValue},
    HeaderMap,
};

use crate::{
    proxy::balance::{Ask, Balancer, HttpKeys, Picked},
    telemetry::http::Flag,
};

/// Where the client sent the request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dest {
    /// A Service VIP: `namespace/name` and the Service port.
    Service { key: String, port: u16 },
    /// A pod address (no Service): it is its own only endpoint.
    Pod(SocketAddrV4),
}

impl Dest {
    pub fn of(state: &State, orig: SocketAddrV4) -> Dest {
        match state.service_at(orig) {
            Some((s, p)) => Dest::Service {
                key: format!("{}/{}", s.namespace, s.name),
                port: p.port,
            },
            None => Dest::Pod(orig),
        }
    }

    pub fn port(&self) -> u16 {
        match self {
            Dest::Service { port, .. } => *port,
            Dest::Pod(a) => a.port(),
        }
    }
}

/// The route a request takes.
#[derive(Clone, Debug)]
pub enum Chosen {
    /// Route `index` of a Service's routing.
    Configured(Arc<ServiceRouting>, usize),
    /// No routing object: straight to the destination (boxed: it is large).
    Implicit(Box<HttpRoute>),
}

impl Chosen {
    pub fn route(&self) -> &HttpRoute {
        match self {
            Chosen::Configured(r, i) => &r.http[*i],
            Chosen::Implicit(h) => h,
        }
    }

    pub fn routing(&self) -> Option<&ServiceRouting> {
        match self {
            Chosen::Configured(r, _) => Some(r),
            Chosen::Implicit(_) => None,
        }
    }

    /// The name for logs: the route's, else its position.
    pub fn name(&self) -> String {
        match self {
            Chosen::Configured(r, i) if r.http[*i].name.is_empty() => format!("{}[{i}]", r.service),
            Chosen::Configured(r, i) => r.http[*i].name.clone(),
            Chosen::Implicit(_) => "default".into(),
        }
    }
}

/// The route for a request (`None`: routes exist and none matches, 404 NR).
pub fn select(state: &State, dest: &Dest, attrs: &RequestAttrs<'_>) -> Option<Chosen> {
    match dest {
        Dest::Service { key, .. } => match state.routing(key) {
            Some(r) if !r.http.is_empty() => r.select_http(attrs).map(|(i, _)| Chosen::Configured(r.clone(), i)),
            _ => Some(Chosen::Implicit(Box::new(HttpRoute {
                backends: vec![Backend {
                    service: key.clone(),
                    weight: 1,
                    ..Default::default()
                }],
                ..Default::default()
            }))),
        },
        Dest::Pod(_) => Some(Chosen::Implicit(Box::default())),
    }
}

/// What one request offers the load balancer (its client, hash keys, the
/// address dialled), made once per request: a cookie made for it is the
/// same for every attempt.
pub struct Hint<'a> {
    client: &'a Workload,
    headers: &'a HeaderMap,
    query: Option<&'a str>,
    orig: SocketAddrV4,
    made_cookie: OnceLock<String>,
}

impl<'a> Hint<'a> {
    pub fn new(client: &'a Workload, headers: &'a HeaderMap, query: Option<&'a str>, orig: SocketAddrV4) -> Self {
        Self {
            client,
            headers,
            query,
            orig,
            made_cookie: OnceLock::new(),
        }
    }

    fn ask(&self) -> Ask<'_> {
        Ask {
            client: self.client,
            orig: Some(self.orig),
            http: Some(HttpKeys {
                headers: self.headers,
                query: self.query,
                made_cookie: &self.made_cookie,
            }),
        }
    }
}

/// An endpoint for one attempt: a ready endpoint of `backend` (its subset
/// from `routing`) chosen by `balancer`, or the pod address itself. The
/// pick holds the endpoint's in-flight count and takes the attempt's
/// outcome ([`Picked::answered`], [`Picked::report`]).
pub fn endpoint(
    balancer: &Balancer,
    state: &State,
    routing: Option<&ServiceRouting>,
    backend: Option<&Backend>,
    dest: &Dest,
    hint: &Hint<'_>,
) -> Result<Picked, Flag> {
    let (b, port) = match (backend, dest) {
        (_, Dest::Pod(a)) => return Ok(Picked::fixed(state.route_to(*a, None))),
        (Some(b), Dest::Service { port, .. }) => (b, *port),
        (None, Dest::Service { .. }) => return Err(Flag::NoHealthyUpstream),
    };
    let subset = match &b.subset {
        Some(name) => Some(
            routing
                .and_then(|r| r.subset(&b.service, name))
                .ok_or(Flag::NoCluster)?,
        ),
        None => None,
    };
    balancer
        .pick(state, &b.service, b.port.unwrap_or(port), subset, &hint.ask())
        .map_err(|e| match e {
            RouteError::NoEndpoint(_) | RouteError::NoBackend(_) => Flag::NoHealthyUpstream,
            RouteError::UnknownService(_) | RouteError::NoPort { .. } | RouteError::UnknownSubset { .. } => {
                Flag::NoCluster
            }
        })
}

/// Request headers as the matcher reads them.
pub struct Headers<'a>(pub &'a HeaderMap);

impl HeaderLookup for Headers<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        self.0.get(name)?.to_str().ok()
    }
}

/// Applies `ops` (remove, then set, then add); names or values that are not
/// valid HTTP are skipped (validation rejects them upstream of here).
pub fn apply(h: &mut HeaderMap, ops: &HeaderOps) {
    for name in &ops.remove {
        h.remove(name.as_str());
    }
    let parse = |k: &str, v: &str| {
        Some((
            HeaderName::from_bytes(k.as_bytes()).ok()?,
            HeaderValue::from_str(v).ok()?,
        ))
    };
    for (k, v) in &ops.set {
        if let Some((k, v)) = parse(k, v) {
            h.insert(k, v);
        }
    }
    for (k, v) in &ops.add {
        if let Some((k, v)) = parse(k, v) {
            h.append(k, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(routes: &str) -> State {
        let cfg: ferry_model::ConfigFile = serde_norway::from_str(&format!(
            "node: n1\nworkloads:\n  - {{uid: a, name: a, node: n1, ip: 10.1.0.2, enrolled: true}}\n  - {{uid: v1, name: r1, node: n1, ip: 10.1.0.3, enrolled: true, labels: {{version: v1}}}}\nservices:\n  - {{name: r, vip: 10.96.0.1, ports: [{{port: 80, targetPort: 9080, protocol: http}}], endpoints: [{{ip: 10.1.0.3}}]}}\n{routes}"
        ))
        .unwrap();
        State::from_config(cfg, 1)
    }

    fn attrs<'a>(h: &'a Headers<'a>) -> RequestAttrs<'a> {
        RequestAttrs {
            method: "GET",
            path: "/",
            query: None,
            authority: "r",
            port: 80,
            headers: h,
            source: None,
        }
    }

    #[test]
    fn implicit_route_without_routing_and_nr_without_a_match() {
        let s = state("");
        let d = Dest::of(&s, "10.96.0.1:80".parse().unwrap());
        let hm = HeaderMap::new();
        let h = Headers(&hm);
        let c = select(&s, &d, &attrs(&h)).unwrap();
        assert_eq!(c.name(), "default");
        let b = crate::proxy::balance::tests::balancer();
        let client = s.workloads["a"].clone();
        let hint = Hint::new(&client, &hm, None, "10.96.0.1:80".parse().unwrap());
        let r = endpoint(&b, &s, c.routing(), c.route().backends.first(), &d, &hint).unwrap();
        assert_eq!(r.route.endpoint, "10.1.0.3:9080".parse().unwrap());

        let s = state("routes:\n  - service: default/r\n    http:\n      - name: only-tester\n        matches: [{headers: {user: {exact: tester}}}]\n        backends: [{service: default/r, subset: v9}]\n    subsets: {default/r: [{name: v9, labels: {version: v9}}]}\n");
        assert!(select(&s, &d, &attrs(&h)).is_none(), "no match: NR");
        let mut hm = HeaderMap::new();
        hm.insert("user", HeaderValue::from_static("tester"));
        let h = Headers(&hm);
        let c = select(&s, &d, &attrs(&h)).unwrap();
        assert_eq!(c.name(), "only-tester");
        let e = endpoint(&b, &s, c.routing(), c.route().backends.first(), &d, &hint);
        assert_eq!(e.err(), Some(Flag::NoHealthyUpstream), "a subset with no pods");
    }

    #[test]
    fn header_ops_remove_set_add() {
        let mut h = HeaderMap::new();
        h.insert("x-old", HeaderValue::from_static("1"));
        h.insert("x-set", HeaderValue::from_static("a"));
        let ops = HeaderOps {
            set: vec![("x-set".into(), "b".into())],
            add: vec![("x-add".into(), "c".into()), ("bad name".into(), "d".into())],
            remove: vec!["x-old".into()],
        };
        apply(&mut h, &ops);
        assert!(h.get("x-old").is_none());
        assert_eq!(h["x-set"], "b");
        assert_eq!(h["x-add"], "c");
        assert_eq!(h.len(), 2);
    }
}
