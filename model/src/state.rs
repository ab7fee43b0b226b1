//! The state store: one typed, immutable view of the workloads and services
//! an agent serves (and of its node's pods still without an address), built
//! from the control plane's stream or the config file, and swapped whole on
//! each change. Routing decisions are pure functions over it, and so is
//! authorization: the policies that apply to each local workload are found
//! once per snapshot ([`State::authz_for`]).

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use serde::Serialize;

use crate::{
    admin::{AuthzCheck, AuthzQuery},
    authz::{self, AuthzPolicy, Decision, HeaderPairs, HttpAttrs, Request, Verdict},
    config::{ConfigFile, PendingPod, Service, ServicePort, Settings, Workload},
    route::{pick_weighted, ServiceRouting, Subset},
    traffic::ServiceTrafficPolicy,
    SpiffeId,
};

#[derive(Debug, Default)]
pub struct State {
    pub node: String,
    pub settings: Settings,
    /// Bumped by the agent on each applied change.
    pub version: u64,
    pub workloads: BTreeMap<String, Workload>,
    /// This node's pods without an address yet (by uid), as the config
    /// leaves them: those the agent has an address for from the runtime
    /// are workloads instead (`crate::pending::overlay`).
    pub pending: BTreeMap<String, PendingPod>,
    pub services: Vec<Service>,
    pub peer_authentications: Vec<crate::peer_auth::PeerAuthentication>,
    by_ip: HashMap<Ipv4Addr, String>,
    /// (vip, port) -> (service index, port index)
    by_vip: HashMap<(Ipv4Addr, u16), (usize, usize)>,
    /// Round-robin cursor per service.
    rr: Vec<AtomicUsize>,
    /// Routes per Service (`namespace/name`).
    routing: HashMap<String, std::sync::Arc<ServiceRouting>>,
    /// Traffic policies by `namespace/name` of their Service.
    traffic: HashMap<String, Arc<ServiceTrafficPolicy>>,
    /// `namespace/name` -> service index.
    by_name: HashMap<String, usize>,
    /// Istio `AuthorizationPolicy` objects, as validated in the config.
    pub authorization_policies: Vec<Arc<AuthzPolicy>>,
    /// Local workload (uid) -> the policies that apply to it.
    authz: HashMap<String, Vec<Arc<AuthzPolicy>>>,
    /// Local app address (pod IP, target port) -> the RateLimitPolicies
    /// that limit its requests (`crate::ratelimit::targets`).
    rate_limits: HashMap<SocketAddrV4, Vec<Arc<crate::ratelimit::RateLimitPolicy>>>,
}

/// Where a steered connection goes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Route {
    /// The endpoint address the connection is sent to.
    pub endpoint: SocketAddrV4,
    /// The service, when the original destination was a service VIP.
    pub service: Option<String>,
    /// The destination workload (uid), when the endpoint is a known pod.
    pub workload: Option<String>,
    pub hop: Hop,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Hop {
    /// An enrolled pod on this node: handed to its inbound side in the agent.
    Local,
    /// An enrolled pod on another node: through the tunnel.
    Tunnel,
    /// Not in the mesh: connect directly from the source pod.
    Direct,
}

impl Hop {
    pub fn as_str(self) -> &'static str {
        match self {
            Hop::Local => "local",
            Hop::Tunnel => "tunnel",
            Hop::Direct => "direct",
        }
    }
}

impl std::fmt::Display for Hop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a connection is to be balanced over ([`State::target`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target<'a> {
    /// A pod address: its own and only route.
    Pod(Route),
    /// A Service port (`namespace/name`), perhaps one subset of it.
    Service {
        service: String,
        port: u16,
        subset: Option<&'a Subset>,
    },
}

/// What a connection to a mesh destination is steered for: a service
/// VIP:port, or an enrolled pod (any port).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MeshDst {
    Service,
    Pod,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("service {0} has no ready endpoint")]
    NoEndpoint(String),
    #[error("service {0} is not known")]
    UnknownService(String),
    #[error("service {service} has no port {port}")]
    NoPort { service: String, port: u16 },
    #[error("subset {subset} of service {service} is not defined")]
    UnknownSubset { service: String, subset: String },
    #[error("every backend of the route for {0} has weight 0")]
    NoBackend(String),
}

impl State {
    pub fn from_config(cfg: ConfigFile, version: u64) -> Self {
        let by_ip = cfg.workloads.iter().map(|w| (w.ip, w.uid.clone())).collect();
        let mut by_vip = HashMap::new();
        for (i, s) in cfg.services.iter().enumerate() {
            for (k, p) in s.ports.iter().enumerate() {
                by_vip.insert((s.vip, p.port), (i, k));
            }
        }
        let by_name = cfg
            .services
            .iter()
            .enumerate()
            .map(|(i, s)| (format!("{}/{}", s.namespace, s.name), i))
            .collect();
        let policies: Vec<Arc<AuthzPolicy>> = cfg.authorization_policies.into_iter().map(Arc::new).collect();
        let authz = if policies.is_empty() {
            HashMap::new()
        } else {
            cfg.workloads
                .iter()
                .filter(|w| w.node == cfg.node)
                .map(|w| (w.uid.clone(), applicable(&policies, &cfg.services, w)))
                .filter(|(_, ps)| !ps.is_empty())
                .collect()
        };
        let rate_limits = {
            let local = cfg
                .workloads
                .iter()
                .filter(|w| w.node == cfg.node)
                .map(|w| w.ip)
                .collect();
            let policies: Vec<_> = cfg.rate_limits.into_iter().map(Arc::new).collect();
            crate::ratelimit::targets(&policies, &cfg.services, &local)
        };
        Self {
            rate_limits,
            authorization_policies: policies,
            authz,
            by_name,
            routing: cfg
                .routes
                .into_iter()
                .map(|r| (r.service.clone(), std::sync::Arc::new(r)))
                .collect(),
            traffic: cfg
                .traffic_policies
                .into_iter()
                .map(|p| (p.service.clone(), Arc::new(p)))
                .collect(),
            node: cfg.node,
            settings: cfg.settings,
            version,
            rr: cfg.services.iter().map(|_| AtomicUsize::new(0)).collect(),
            workloads: cfg.workloads.into_iter().map(|w| (w.uid.clone(), w)).collect(),
            pending: cfg.pending_pods.into_iter().map(|p| (p.uid.clone(), p)).collect(),
            services: cfg.services,
            peer_authentications: cfg.peer_authentications,
            by_ip,
            by_vip,
        }
    }

    pub fn workload_by_ip(&self, ip: Ipv4Addr) -> Option<&Workload> {
        self.by_ip.get(&ip).and_then(|uid| self.workloads.get(uid))
    }

    /// Enrolled workloads scheduled on this node: the pods this agent captures.
    pub fn local_enrolled(&self) -> impl Iterator<Item = &Workload> {
        self.workloads.values().filter(|w| w.enrolled && w.node == self.node)
    }

    /// What connect4/6 steer: every service VIP:port, and every enrolled pod (any port).
    pub fn mesh_destinations(&self) -> BTreeMap<(Ipv4Addr, u16), MeshDst> {
        let mut out = BTreeMap::new();
        for s in &self.services {
            for p in &s.ports {
                out.insert((s.vip, p.port), MeshDst::Service);
            }
        }
        for w in self.workloads.values().filter(|w| w.enrolled) {
            out.insert((w.ip, 0), MeshDst::Pod);
        }
        out
    }

    /// The Service and port a connection to `orig` was addressed to, when
    /// `orig` is a service VIP:port.
    pub fn service_at(&self, orig: SocketAddrV4) -> Option<(&Service, &ServicePort)> {
        let &(si, pi) = self.by_vip.get(&(*orig.ip(), orig.port()))?;
        let s = &self.services[si];
        Some((s, &s.ports[pi]))
    }

    /// A Service by `namespace/name`.
    pub fn service(&self, key: &str) -> Option<&Service> {
        self.by_name.get(key).map(|&i| &self.services[i])
    }

    /// The routes for a Service (`namespace/name`), if any object routes it.
    pub fn routing(&self, service: &str) -> Option<&std::sync::Arc<ServiceRouting>> {
        self.routing.get(service)
    }

    /// The traffic policy of a Service (`namespace/name`), if a
    /// DestinationRule sets one.
    pub fn traffic_policy(&self, service: &str) -> Option<&Arc<ServiceTrafficPolicy>> {
        self.traffic.get(service)
    }

    /// Every Service's traffic policy.
    pub fn traffic_policies(&self) -> impl Iterator<Item = &ServiceTrafficPolicy> {
        self.traffic.values().map(|p| &**p)
    }

    /// The RateLimitPolicies limiting requests to a local pod's app at
    /// `target` (pod IP, app port); empty when none does.
    pub fn rate_limits_at(&self, target: SocketAddrV4) -> &[Arc<crate::ratelimit::RateLimitPolicy>] {
        self.rate_limits.get(&target).map_or(&[], Vec::as_slice)
    }

    /// Every Service's routes.
    pub fn routings(&self) -> impl Iterator<Item = &ServiceRouting> {
        self.routing.values().map(|r| &**r)
    }

    /// The route for a connection whose original destination was `orig`:
    /// a VIP goes to one of its ready endpoints (the first matching TCP
    /// route's weighted backends when one exists, else round robin), a pod
    /// address to itself.
    pub fn route(&self, orig: SocketAddrV4) -> Result<Route, RouteError> {
        match self.target(orig)? {
            Target::Pod(r) => Ok(r),
            Target::Service { service, port, subset } => self.pick_endpoint(&service, port, subset),
        }
    }

    /// Where a connection whose original destination was `orig` is to be
    /// balanced, before an endpoint is chosen: a pod address is its own
    /// route; a VIP names a Service port (the first matching TCP route's
    /// weighted backend when one exists), perhaps a subset of it.
    pub fn target(&self, orig: SocketAddrV4) -> Result<Target<'_>, RouteError> {
        let Some(&(si, pi)) = self.by_vip.get(&(*orig.ip(), orig.port())) else {
            return Ok(Target::Pod(self.route_to(orig, None)));
        };
        let svc = &self.services[si];
        let key = format!("{}/{}", svc.namespace, svc.name);
        let port = svc.ports[pi].port;
        if let Some(r) = self.routing.get(&key) {
            if let Some(t) = r.select_tcp(port, None) {
                let roll = self.rr[si].fetch_add(1, Ordering::Relaxed) as u64;
                let b =
                    pick_weighted(&t.backends, |b| b.weight, roll).ok_or_else(|| RouteError::NoBackend(key.clone()))?;
                let subset = match &b.subset {
                    Some(name) => Some(r.subset(&b.service, name).ok_or_else(|| RouteError::UnknownSubset {
                        service: b.service.clone(),
                        subset: name.clone(),
                    })?),
                    None => None,
                };
                return Ok(Target::Service {
                    service: b.service.clone(),
                    port: b.port.unwrap_or(port),
                    subset,
                });
            }
        }
        Ok(Target::Service {
            service: key,
            port,
            subset: None,
        })
    }

    /// The ready endpoints (pod address and target port) of Service
    /// `service` (`namespace/name`) on its port `port`, restricted to
    /// `subset`'s pods when given, in the Service's order.
    pub fn candidates(
        &self,
        service: &str,
        port: u16,
        subset: Option<&Subset>,
    ) -> Result<Vec<SocketAddrV4>, RouteError> {
        let &si = self
            .by_name
            .get(service)
            .ok_or_else(|| RouteError::UnknownService(service.to_owned()))?;
        let svc = &self.services[si];
        let sp = svc
            .ports
            .iter()
            .find(|p| p.port == port)
            .ok_or_else(|| RouteError::NoPort {
                service: service.to_owned(),
                port,
            })?;
        let ready: Vec<SocketAddrV4> = svc
            .endpoints
            .iter()
            .filter(|e| e.ready)
            .filter(|e| subset.is_none_or(|s| self.workload_by_ip(e.ip).is_some_and(|w| s.selects(w))))
            .map(|e| SocketAddrV4::new(e.ip, sp.target_port))
            .collect();
        if ready.is_empty() {
            return Err(RouteError::NoEndpoint(match subset {
                Some(s) => format!("{service} (subset {})", s.name),
                None => service.to_owned(),
            }));
        }
        Ok(ready)
    }

    /// One ready endpoint of Service `service` (`namespace/name`) on its port
    /// `port`, restricted to `subset`'s pods when given; round robin (the
    /// agent balances with the Service's traffic policy instead:
    /// `ferry_model::balance`).
    pub fn pick_endpoint(&self, service: &str, port: u16, subset: Option<&Subset>) -> Result<Route, RouteError> {
        let ready = self.candidates(service, port, subset)?;
        let si = self.by_name.get(service).copied().unwrap_or(0);
        let n = self.rr.get(si).map_or(0, |c| c.fetch_add(1, Ordering::Relaxed)) % ready.len();
        Ok(self.route_to(ready[n], Some(service.to_owned())))
    }

    /// The authorization policies that apply to `w` (by selector, namespace,
    /// the root namespace, or a Service it backs). Found once per snapshot
    /// for this node's workloads (borrowed); computed for any other.
    pub fn authz_for(&self, w: &Workload) -> Cow<'_, [Arc<AuthzPolicy>]> {
        if self.authorization_policies.is_empty() {
            return Cow::Borrowed(&[]);
        }
        let local = self.workloads.get(&w.uid).filter(|s| s.node == self.node);
        match local {
            Some(_) => Cow::Borrowed(self.authz.get(&w.uid).map_or(&[][..], Vec::as_slice)),
            None => Cow::Owned(applicable(&self.authorization_policies, &self.services, w)),
        }
    }

    /// `evaluate` over the policies that apply to `pod`, the decision handed
    /// to `f` (it borrows the policies). No allocation when none apply.
    pub fn authorize<R>(&self, pod: &Workload, req: &Request<'_>, f: impl FnOnce(&Decision<'_>) -> R) -> R {
        let policies = self.authz_for(pod);
        let refs: Vec<&AuthzPolicy> = policies.iter().map(|p| &**p).collect();
        f(&authz::evaluate(&refs, req))
    }

    /// The dry run behind `/authz` and `ferryctl authz check`: may `q.from`
    /// reach `q.to` on `q.port` (with `q.method`/`q.path`, an HTTP check)?
    /// The source is a known pod (`ns/name`: its identity and address), a
    /// service account (`ns/sa`), a SPIFFE id, or an address (plaintext).
    pub fn authz_check(&self, q: &AuthzQuery) -> Result<AuthzCheck, String> {
        let dst = self
            .find_workload(&q.to)
            .ok_or_else(|| format!("no workload {:?} (ns/name or IP)", q.to))?;
        let (identity, src_ip, from) = self.find_source(&q.from)?;
        let src_ip = q.from_ip.unwrap_or(src_ip);
        let principal = identity.as_ref().map(SpiffeId::to_string);
        let headers: Vec<(&str, &str)> = q.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let pairs = HeaderPairs(&headers);
        let http =
            (q.method.is_some() || q.path.is_some() || q.host.is_some() || !headers.is_empty()).then(|| HttpAttrs {
                method: q.method.as_deref().unwrap_or("GET"),
                path: q.path.as_deref().unwrap_or("/"),
                host: q.host.as_deref().unwrap_or(""),
                headers: &pairs,
            });
        let req = Request {
            source_principal: principal.as_deref(),
            source_namespace: identity.as_ref().map(SpiffeId::namespace),
            source_ip: src_ip,
            destination_ip: IpAddr::V4(dst.ip),
            destination_port: q.port,
            sni: None,
            http,
        };
        let policies = self
            .authz_for(dst)
            .iter()
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .collect();
        Ok(self.authorize(dst, &req, |d| {
            let (policy, rule, allowed) = match d.verdict {
                Verdict::Allow { by, rule } => (by, rule, true),
                Verdict::Deny { policy, rule, .. } => (policy, rule, false),
            };
            AuthzCheck {
                from,
                source_principal: principal.clone(),
                source_ip: src_ip.to_string(),
                to: dst.label(),
                destination: SocketAddrV4::new(dst.ip, q.port).to_string(),
                layer: if req.http.is_some() { "http" } else { "l4" }.into(),
                allowed,
                decision: d.to_string(),
                policy: policy.map(|p| p.to_string()),
                rule,
                reason: d.verdict.code().into(),
                audited: d.audited.iter().map(ToString::to_string).collect(),
                policies,
            }
        }))
    }

    /// A workload by `namespace/name` or address.
    fn find_workload(&self, key: &str) -> Option<&Workload> {
        if let Ok(ip) = key.parse::<Ipv4Addr>() {
            return self.workload_by_ip(ip);
        }
        let (ns, name) = key.split_once('/')?;
        self.workloads.values().find(|w| w.namespace == ns && w.name == name)
    }

    /// The identity, address and description of a dry run's source.
    fn find_source(&self, from: &str) -> Result<(Option<SpiffeId>, IpAddr, String), String> {
        let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        if let Ok(ip) = from.parse::<IpAddr>() {
            let who = match ip {
                IpAddr::V4(v4) => self.workload_by_ip(v4).map(|w| format!(" ({})", w.label())),
                IpAddr::V6(_) => None,
            };
            return Ok((None, ip, format!("{ip}{} plaintext", who.unwrap_or_default())));
        }
        if from.starts_with("spiffe://") {
            let id: SpiffeId = from.parse().map_err(|e| format!("--from: {e}"))?;
            return Ok((Some(id), any, from.to_owned()));
        }
        let Some((ns, name)) = from
            .split_once('/')
            .filter(|(ns, n)| !ns.is_empty() && !n.is_empty() && !n.contains('/'))
        else {
            return Err(format!(
                "source {from:?}: expected ns/pod, ns/serviceaccount, a SPIFFE id or an IP address"
            ));
        };
        Ok(
            match self.workloads.values().find(|w| w.namespace == ns && w.name == name) {
                Some(w) => (Some(w.spiffe_id()), IpAddr::V4(w.ip), format!("{} (pod)", w.label())),
                None => (
                    Some(SpiffeId::new(ns, name)),
                    any,
                    format!("{ns}/{name} (service account)"),
                ),
            },
        )
    }

    /// Where `endpoint` is, relative to this node.
    pub fn route_to(&self, endpoint: SocketAddrV4, service: Option<String>) -> Route {
        let dst = self.workload_by_ip(*endpoint.ip());
        let hop = match dst {
            Some(w) if w.enrolled && w.node == self.node => Hop::Local,
            Some(w) if w.enrolled => Hop::Tunnel,
            _ => Hop::Direct,
        };
        Route {
            endpoint,
            service,
            workload: dst.map(|w| w.uid.clone()),
            hop,
        }
    }
}

/// The policies of `policies` that apply to `w`, in their order.
fn applicable(policies: &[Arc<AuthzPolicy>], services: &[Service], w: &Workload) -> Vec<Arc<AuthzPolicy>> {
    let backs: Vec<(&str, &str)> = services
        .iter()
        .filter(|s| s.endpoints.iter().any(|e| e.ip == w.ip))
        .map(|s| (s.namespace.as_str(), s.name.as_str()))
        .collect();
    policies
        .iter()
        .filter(|p| authz::applies_to(p, w, authz::ROOT_NAMESPACE, &backs))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> State {
        let cfg = ConfigFile::parse(
            "t",
            r#"
node: n1
workloads:
  - {uid: a, name: client, node: n1, ip: 10.1.1.2, enrolled: true}
  - {uid: b, name: local-srv, node: n1, ip: 10.1.1.3, enrolled: true}
  - {uid: c, name: remote-srv, node: n2, ip: 10.1.2.3, enrolled: true}
  - {uid: d, name: plain, node: n2, ip: 10.1.2.4}
services:
  - name: echo
    vip: 10.96.0.10
    ports: [{port: 80, targetPort: 8080}]
    endpoints: [{ip: 10.1.1.3}, {ip: 10.1.2.3}, {ip: 10.1.2.4, ready: false}]
  - {name: empty, vip: 10.96.0.11, ports: [{port: 80, targetPort: 80}]}
"#,
        )
        .unwrap();
        State::from_config(cfg, 1)
    }

    fn a(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    #[test]
    fn service_round_robins_over_ready_endpoints() {
        let s = state();
        let r1 = s.route(a("10.96.0.10:80")).unwrap();
        let r2 = s.route(a("10.96.0.10:80")).unwrap();
        let r3 = s.route(a("10.96.0.10:80")).unwrap();
        assert_eq!((r1.endpoint, r1.hop), (a("10.1.1.3:8080"), Hop::Local));
        assert_eq!((r2.endpoint, r2.hop), (a("10.1.2.3:8080"), Hop::Tunnel));
        assert_eq!(r3.endpoint, r1.endpoint);
        assert_eq!(r1.service.as_deref(), Some("default/echo"));
    }

    #[test]
    fn direct_pod_addresses_and_errors() {
        let s = state();
        let r = s.route(a("10.1.2.3:9000")).unwrap();
        assert_eq!(
            (r.endpoint, r.hop, r.workload.as_deref()),
            (a("10.1.2.3:9000"), Hop::Tunnel, Some("c"))
        );
        assert_eq!(s.route(a("10.1.2.4:1")).unwrap().hop, Hop::Direct);
        assert_eq!(
            s.route(a("10.96.0.11:80")),
            Err(RouteError::NoEndpoint("default/empty".into()))
        );
    }

    #[test]
    fn mesh_destinations_cover_vips_and_enrolled_pods() {
        let s = state();
        let d = s.mesh_destinations();
        assert_eq!(d.get(&("10.96.0.10".parse().unwrap(), 80)), Some(&MeshDst::Service));
        assert_eq!(d.get(&("10.1.2.3".parse().unwrap(), 0)), Some(&MeshDst::Pod));
        assert!(!d.contains_key(&("10.1.2.4".parse().unwrap(), 0)));
        assert_eq!(s.local_enrolled().count(), 2);
    }

    #[test]
    fn subsets_and_weighted_tcp_routes() {
        let cfg = ConfigFile::parse(
            "t",
            r#"
node: n1
workloads:
  - {uid: a, name: db-a, node: n1, ip: 10.1.1.2, enrolled: true, labels: {version: a}}
  - {uid: b, name: db-b, node: n2, ip: 10.1.2.2, enrolled: true, labels: {version: b}}
services:
  - name: db
    vip: 10.96.0.10
    ports: [{port: 5432, targetPort: 15432}]
    endpoints: [{ip: 10.1.1.2}, {ip: 10.1.2.2}]
routes:
  - service: default/db
    tcp: [{backends: [{service: default/db, subset: a, weight: 80}, {service: default/db, subset: b, weight: 20}]}]
    subsets: {default/db: [{name: a, labels: {version: a}}, {name: b, labels: {version: b}}]}
"#,
        )
        .unwrap();
        let s = State::from_config(cfg, 1);
        let mut to_a = 0;
        for _ in 0..1000 {
            let r = s.route(a("10.96.0.10:5432")).unwrap();
            if r.endpoint == a("10.1.1.2:15432") {
                to_a += 1;
                assert_eq!(r.hop, Hop::Local);
            } else {
                assert_eq!((r.endpoint, r.hop), (a("10.1.2.2:15432"), Hop::Tunnel));
            }
        }
        assert_eq!(to_a, 800);
        let routing = s.routing("default/db").unwrap().clone();
        let b = routing.subset("default/db", "b").unwrap();
        assert_eq!(
            s.pick_endpoint("default/db", 5432, Some(b)).unwrap().endpoint,
            a("10.1.2.2:15432")
        );
        let none = Subset {
            name: "c".into(),
            labels: [("version".to_string(), "c".to_string())].into(),
        };
        assert_eq!(
            s.pick_endpoint("default/db", 5432, Some(&none)),
            Err(RouteError::NoEndpoint("default/db (subset c)".into()))
        );
        assert!(matches!(
            s.pick_endpoint("default/db", 1, None),
            Err(RouteError::NoPort { .. })
        ));
        assert!(matches!(
            s.pick_endpoint("x/y", 1, None),
            Err(RouteError::UnknownService(_))
        ));
    }

    #[test]
    fn authz_policies_are_found_per_workload_once_and_dry_runs_name_the_decider() {
        let cfg = ConfigFile::parse(
            "t",
            r#"
node: n1
workloads:
  - {uid: d, name: details-v1, serviceAccount: bookinfo-details, node: n1, ip: 10.1.1.3, enrolled: true, labels: {app: details}}
  - {uid: p, name: productpage-v1, serviceAccount: bookinfo-productpage, node: n2, ip: 10.1.2.2, enrolled: true, labels: {app: productpage}}
  - {uid: o, name: other, namespace: shop, node: n1, ip: 10.1.1.4, enrolled: true}
services:
  - {name: details, vip: 10.96.0.20, ports: [{port: 9080, targetPort: 9080}], endpoints: [{ip: 10.1.1.3}]}
authorizationPolicies:
  - {name: mesh-audit, namespace: istio-system, spec: {action: AUDIT, rules: [{}]}}
  - {name: by-service, namespace: default, spec: {targetRefs: [{kind: Service, name: details}], action: DENY, rules: [{to: [{operation: {ports: ['22']}}]}]}}
  - {name: details-viewer, namespace: default, spec: {selector: {matchLabels: {app: details}}, rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/bookinfo-productpage]}}]}]}}
"#,
        )
        .unwrap();
        let s = State::from_config(cfg, 1);
        let names = |w: &str| {
            s.authz_for(&s.workloads[w])
                .iter()
                .map(|p| p.name.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(names("d"), ["mesh-audit", "by-service", "details-viewer"]);
        assert!(
            matches!(s.authz_for(&s.workloads["d"]), Cow::Borrowed(_)),
            "local: found once"
        );
        assert_eq!(names("o"), ["mesh-audit"]);
        assert_eq!(names("p"), ["mesh-audit"], "another node's workload: computed");
        let q = |from: &str, port: u16| AuthzQuery {
            from: from.into(),
            to: "default/details-v1".into(),
            port,
            ..Default::default()
        };
        let ok = s.authz_check(&q("default/productpage-v1", 9080)).unwrap();
        assert!(ok.allowed);
        assert_eq!(
            ok.decision,
            "allow default/details-viewer[0] audit istio-system/mesh-audit"
        );
        assert_eq!((ok.source_ip.as_str(), ok.layer.as_str()), ("10.1.2.2", "l4"));
        let deny = s.authz_check(&q("default/productpage-v1", 22)).unwrap();
        assert_eq!(
            (deny.allowed, deny.policy.as_deref(), deny.rule, deny.reason.as_str()),
            (false, Some("default/by-service"), Some(0), "matched_deny")
        );
        let sa = s.authz_check(&q("default/bookinfo-productpage", 9080)).unwrap();
        assert!(sa.allowed && sa.from.ends_with("(service account)"));
        let plain = s.authz_check(&q("10.1.2.2", 9080)).unwrap();
        assert_eq!((plain.allowed, plain.reason.as_str()), (false, "no_allow_matched"));
        assert!(s.authz_check(&q("nope", 1)).is_err());
        let mut missing = q("a/b", 1);
        missing.to = "default/none".into();
        assert!(s.authz_check(&missing).is_err());
    }
}
