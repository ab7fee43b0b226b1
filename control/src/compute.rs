//! Cluster model -> what agents need. Pure functions: who is enrolled, what
//! each service's endpoints are, which scheduled pods have no address yet
//! ([`MeshView::pending`]), and which resources each node receives (which
//! AuthorizationPolicies: [`PolicyPlacement`]).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
    sync::Arc,
};

use ferry_api::discovery as pb;
use ferry_model::{
    authz::{AuthzPolicy, ROOT_NAMESPACE},
    peer_auth::PeerAuthentication,
    proto as disc,
    route::ServiceRouting,
    traffic::ServiceTrafficPolicy,
    Endpoint, PendingPod, Protocol, Service, ServicePort, Workload,
};
use k8s_openapi::{
    api::{
        core::v1::{Pod, Service as KService},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};

use crate::model::{parse::MESH_ANNOTATION, Cluster, Object, SERVICE_NAME_LABEL};

#[cfg(test)]
mod proptests;
mod workload_name;
pub use workload_name::workload_name;

/// Namespace labels that enroll every pod in the namespace: Ferry's own, and
/// Istio's sidecar and ambient labels so a namespace migrates as is.
pub const NAMESPACE_OPT_IN: &[(&str, &str)] = &[
    ("ferry.dev/mesh", "enabled"),
    ("istio-injection", "enabled"),
    ("istio.io/dataplane-mode", "ambient"),
];

/// Whether a pod is in the mesh: its annotation decides when set
/// (`enabled`/`disabled`), else its namespace's labels.
pub fn enrolled(
    pod_annotations: Option<&BTreeMap<String, String>>,
    ns_labels: Option<&BTreeMap<String, String>>,
) -> bool {
    match pod_annotations.and_then(|a| a.get(MESH_ANNOTATION)).map(String::as_str) {
        Some("enabled") => true,
        Some(_) => false,
        None => ns_labels.is_some_and(|l| {
            NAMESPACE_OPT_IN
                .iter()
                .any(|(k, v)| l.get(*k).map(String::as_str) == Some(v))
        }),
    }
}

/// The mesh as agents see it, for every node.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MeshView {
    /// Scheduled pods with an address of their own, enrolled or not.
    pub workloads: Vec<Workload>,
    /// Scheduled, live pods without an IPv4 address yet (the kubelet
    /// reports it only once the sandbox is up, after the runtime's CNI ADD):
    /// everything but the address, for their own node only, so its agent can
    /// capture them with the address from the ADD. Never host-network pods.
    /// A pod with an address is a workload instead.
    pub pending: Vec<PendingPod>,
    /// Pods on their node's network (`spec.hostNetwork`): never mesh
    /// workloads. They share the node's network namespace and address (so
    /// nothing of theirs can be captured, and every such pod of a node has
    /// the same IP); kept to be listed, and as endpoints of the Services
    /// that select them (reached directly, at the node's address).
    pub host_network: Vec<Workload>,
    /// Services with a cluster IP, endpoints resolved, each port's protocol selected.
    pub services: Vec<Service>,
    pub peer_authentications: Vec<PeerAuthentication>,
    /// Routes per routed Service (`crate::routes`), by Service.
    pub routes: Vec<ServiceRouting>,
    /// Traffic policy per Service a DestinationRule shapes (`crate::routes::traffic`).
    pub traffic_policies: Vec<ServiceTrafficPolicy>,
    /// Every valid AuthorizationPolicy (invalid ones never reach the model).
    pub authorization_policies: Vec<AuthzPolicy>,
    /// Every valid RateLimitPolicy (`crate::model::ferry`).
    pub rate_limits: Vec<ferry_model::ratelimit::RateLimitPolicy>,
}

fn pod_ipv4(p: &Pod) -> Option<Ipv4Addr> {
    let st = p.status.as_ref()?;
    st.pod_ip
        .iter()
        .chain(st.pod_ips.iter().flatten().map(|i| &i.ip))
        .find_map(|ip| ip.parse().ok())
}

/// What a pod is to the mesh view ([`pod_view`]).
#[derive(Clone, Debug, PartialEq)]
pub enum PodView {
    /// A pod with an address of its own: a workload (enrolled or not).
    Workload(Workload),
    /// On its node's network (`spec.hostNetwork`), with the node's address:
    /// never a mesh workload ([`MeshView::host_network`]).
    HostNetwork(Workload),
    /// Scheduled and live, with no IPv4 address yet ([`MeshView::pending`]).
    Pending(PendingPod),
}

/// A scheduled, live pod as the mesh sees it; None for a pod not scheduled
/// yet, one that has finished (Succeeded/Failed), one without a name, and a
/// host-network pod without an address (never captured, so nothing to wait
/// for).
pub fn pod_view(cluster: &Cluster, p: &Pod) -> Option<PodView> {
    let spec = p.spec.as_ref()?;
    let node = spec.node_name.clone().filter(|n| !n.is_empty())?;
    let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return None;
    }
    let namespace = p.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let name = p.metadata.name.clone()?;
    let ns_labels = cluster.namespace(&namespace).and_then(|n| n.metadata.labels.as_ref());
    // Pods on the host network share the node's namespace: never captured.
    let host_network = spec.host_network == Some(true);
    let uid = p.metadata.uid.clone().unwrap_or_else(|| format!("{namespace}.{name}"));
    let enrolled = !host_network && enrolled(p.metadata.annotations.as_ref(), ns_labels);
    let service_account = spec.service_account_name.clone().unwrap_or_else(|| "default".into());
    let workload_name = Some(workload_name(p)).filter(|n| !n.is_empty());
    let labels = p.metadata.labels.clone().unwrap_or_default();
    let Some(ip) = pod_ipv4(p) else {
        if host_network {
            return None;
        }
        return Some(PodView::Pending(PendingPod {
            uid,
            name,
            namespace,
            service_account,
            node,
            enrolled,
            labels,
            workload_name,
            locality: locality(cluster, p),
        }));
    };
    let w = Workload {
        uid,
        enrolled,
        workload_name,
        locality: locality(cluster, p),
        name,
        namespace,
        service_account,
        node,
        ip,
        labels,
        netns: None,
        host_veth: None,
    };
    Some(if host_network {
        PodView::HostNetwork(w)
    } else {
        PodView::Workload(w)
    })
}

/// A pod's locality (`region/zone/subzone`) for locality-aware load
/// balancing. Istio reads it from the pod's node's topology labels, with
/// the pod's `istio-locality` label (`region.zone.subzone`) as an override
/// (the box's pods, which have no Node objects, use it).
pub fn locality(cluster: &Cluster, p: &Pod) -> Option<String> {
    if let Some(l) = p
        .metadata
        .labels
        .as_ref()
        .and_then(ferry_model::balance::locality_label)
    {
        return Some(l);
    }
    let node = cluster.node(p.spec.as_ref()?.node_name.as_deref()?)?;
    node_locality(node.metadata.labels.as_ref()?)
}

/// `region/zone/subzone` from a Node's topology labels, as Istio reads them
/// (`topology.kubernetes.io/region`, `.../zone`, `topology.istio.io/subzone`);
/// None without a region or zone.
pub fn node_locality(labels: &BTreeMap<String, String>) -> Option<String> {
    let get = |k: &str| labels.get(k).map(|v| v.trim()).unwrap_or_default();
    let (region, zone, subzone) = (
        get("topology.kubernetes.io/region"),
        get("topology.kubernetes.io/zone"),
        get("topology.istio.io/subzone"),
    );
    if region.is_empty() && zone.is_empty() {
        return None;
    }
    Some(if subzone.is_empty() {
        format!("{region}/{zone}")
    } else {
        format!("{region}/{zone}/{subzone}")
    })
}

/// Endpoints of a service: from its EndpointSlices; with none and
/// `derive_endpoints` (the file source, which runs no endpoint controller),
/// from the pods its selector matches.
/// Workloads by (namespace, label key, label value): a selector's candidates
/// are those of its first label, not every pod.
type LabelIndex<'a> = HashMap<(&'a str, &'a str, &'a str), Vec<&'a Workload>>;

fn label_index<'a>(workloads: impl IntoIterator<Item = &'a Workload>) -> LabelIndex<'a> {
    let mut idx: LabelIndex = HashMap::new();
    for w in workloads {
        for (k, v) in &w.labels {
            idx.entry((w.namespace.as_str(), k.as_str(), v.as_str()))
                .or_default()
                .push(w);
        }
    }
    idx
}

/// EndpointSlices by (namespace, service name).
type SliceIndex<'a> = HashMap<(&'a str, &'a str), Vec<&'a EndpointSlice>>;

fn slice_index(cluster: &Cluster) -> SliceIndex<'_> {
    let mut idx: SliceIndex = HashMap::new();
    for (k, l) in &cluster.objects {
        if let Object::EndpointSlice(s) = &l.object {
            if let Some(svc) = s.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)) {
                idx.entry((k.namespace.as_str(), svc.as_str())).or_default().push(s);
            }
        }
    }
    idx
}

fn service(
    slices_of: &SliceIndex<'_>,
    s: &KService,
    by_label: &LabelIndex<'_>,
    by_uid: &HashMap<&str, &Pod>,
    derive_endpoints: bool,
) -> Option<Service> {
    let spec = s.spec.as_ref()?;
    let vip: Ipv4Addr = spec.cluster_ip.as_deref()?.parse().ok()?;
    let namespace = s.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let name = s.metadata.name.clone()?;
    let slices: &[&EndpointSlice] = slices_of
        .get(&(namespace.as_str(), name.as_str()))
        .map_or(&[], Vec::as_slice);
    let mut ports = Vec::new();
    let mut endpoints: Vec<(Endpoint, bool)> = Vec::new();
    let selected: Vec<&Workload> = match &spec.selector {
        Some(sel) if !sel.is_empty() && slices.is_empty() && derive_endpoints => {
            let (k0, v0) = sel.iter().next()?;
            by_label
                .get(&(namespace.as_str(), k0.as_str(), v0.as_str()))
                .into_iter()
                .flatten()
                .filter(|w| sel.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
                .copied()
                .collect()
        }
        _ => Vec::new(),
    };
    for p in spec.ports.iter().flatten() {
        let Ok(port) = u16::try_from(p.port) else { continue };
        let from_slice = slices
            .iter()
            .flat_map(|s| s.ports.iter().flatten())
            .find(|sp| sp.name == p.name);
        let target = match (&p.target_port, from_slice.and_then(|sp| sp.port)) {
            (_, Some(t)) => u16::try_from(t).ok(),
            (Some(IntOrString::Int(t)), None) => u16::try_from(*t).ok(),
            (None, None) => Some(port),
            // A named target port: resolved from a selected pod's container ports.
            (Some(IntOrString::String(n)), None) => selected.iter().find_map(|w| {
                let pod = by_uid.get(w.uid.as_str())?;
                pod.spec
                    .as_ref()?
                    .containers
                    .iter()
                    .flat_map(|c| c.ports.iter().flatten())
                    .find_map(|cp| {
                        (cp.name.as_deref() == Some(n.as_str())).then(|| u16::try_from(cp.container_port).ok())?
                    })
            }),
        };
        let Some(target_port) = target.filter(|t| *t != 0) else {
            continue;
        };
        ports.push(ServicePort {
            port,
            target_port,
            name: p.name.clone(),
            protocol: Protocol::select(p.name.as_deref(), p.app_protocol.as_deref()),
        });
    }
    if ports.is_empty() {
        return None;
    }
    for sl in slices {
        if sl.address_type != "IPv4" {
            continue;
        }
        for e in &sl.endpoints {
            let c = e.conditions.as_ref();
            // Nil means ready (the EndpointSlice API's rule); serving defaults to ready.
            let ready = c.and_then(|c| c.ready).unwrap_or(true);
            let serving = c.and_then(|c| c.serving).unwrap_or(ready);
            for a in &e.addresses {
                if let Ok(ip) = a.parse() {
                    endpoints.push((Endpoint { ip, ready }, serving));
                }
            }
        }
    }
    // With no ready endpoint, terminating ones that still serve take the
    // traffic (as kube-proxy does) rather than failing every connection.
    if !endpoints.iter().any(|(e, _)| e.ready) {
        for (e, serving) in &mut endpoints {
            e.ready = *serving;
        }
    }
    let mut endpoints: Vec<Endpoint> = endpoints.into_iter().map(|(e, _)| e).collect();
    endpoints.extend(selected.iter().map(|w| Endpoint { ip: w.ip, ready: true }));
    endpoints.sort_by_key(|e| e.ip);
    endpoints.dedup_by_key(|e| e.ip);
    Some(Service {
        name,
        namespace,
        vip,
        ports,
        endpoints,
    })
}

pub fn mesh_view(cluster: &Cluster, derive_endpoints: bool) -> MeshView {
    let (mut workloads, mut host_network, mut pending) = (Vec::new(), Vec::new(), Vec::new());
    for v in cluster.pods().filter_map(|p| pod_view(cluster, p)) {
        match v {
            PodView::Workload(w) => workloads.push(w),
            PodView::HostNetwork(w) => host_network.push(w),
            PodView::Pending(p) => pending.push(p),
        }
    }
    let by_uid: HashMap<&str, &Pod> = cluster
        .pods()
        .filter_map(|p| Some((p.metadata.uid.as_deref()?, p)))
        .collect();
    // A Service selecting host-network pods routes to them (at the node's address).
    let by_label = label_index(workloads.iter().chain(&host_network));
    let slices = slice_index(cluster);
    let services = cluster
        .services()
        .filter_map(|s| service(&slices, s, &by_label, &by_uid, derive_endpoints))
        .collect();
    let peer_authentications = cluster
        .objects
        .values()
        .filter_map(|l| match &l.object {
            Object::PeerAuthentication(p) => Some(p.as_ref().clone()),
            _ => None,
        })
        .collect();
    let compiled = crate::routes::compile(cluster);
    MeshView {
        workloads,
        pending,
        host_network,
        services,
        peer_authentications,
        routes: compiled.routings,
        traffic_policies: compiled.traffic,
        authorization_policies: cluster.authorization_policies().map(|(_, _, p)| p).collect(),
        rate_limits: cluster.rate_limit_policies().map(|(_, _, p)| p).collect(),
    }
}

/// Which nodes need an AuthorizationPolicy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicyNodes<'a> {
    /// Every node: a policy in the root namespace may apply to any workload.
    Every,
    /// These nodes (possibly none: the policy applies to no pod today).
    Only(BTreeSet<&'a str>),
}

/// Where AuthorizationPolicies go. A node gets every policy that *may*
/// apply to one of its pods (enrolled or not), found without evaluating
/// selectors, so a label change never has to move a policy:
/// - a policy in the root namespace (`istio-system`): every node;
/// - any other policy: the nodes with a pod in the policy's namespace,
///   pending ones included (a selector or namespace-wide policy can only
///   apply there);
/// - plus, for `targetRefs`/`targetRef`, the nodes with a pod backing the
///   Service named (an endpoint with the pod's address: the agent's own
///   test, `State::authz_for`), wherever that pod's namespace is.
///
/// A superset of what the agent will use; never less.
pub struct PolicyPlacement<'a> {
    by_namespace: HashMap<&'a str, BTreeSet<&'a str>>,
    by_service: HashMap<(&'a str, &'a str), BTreeSet<&'a str>>,
}

impl<'a> PolicyPlacement<'a> {
    pub fn new(view: &'a MeshView) -> Self {
        let mut by_namespace: HashMap<&str, BTreeSet<&str>> = HashMap::new();
        let mut by_ip: HashMap<Ipv4Addr, BTreeSet<&str>> = HashMap::new();
        for w in &view.workloads {
            by_namespace.entry(&w.namespace).or_default().insert(&w.node);
            by_ip.entry(w.ip).or_default().insert(&w.node);
        }
        // A pending pod becomes a workload on its node as soon as the agent
        // has its address from the runtime: its policies must be there.
        for p in &view.pending {
            by_namespace.entry(&p.namespace).or_default().insert(&p.node);
        }
        let mut by_service: HashMap<(&str, &str), BTreeSet<&str>> = HashMap::new();
        for s in &view.services {
            let nodes: BTreeSet<&str> = s
                .endpoints
                .iter()
                .filter_map(|e| by_ip.get(&e.ip))
                .flatten()
                .copied()
                .collect();
            if !nodes.is_empty() {
                by_service.insert((&s.namespace, &s.name), nodes);
            }
        }
        Self {
            by_namespace,
            by_service,
        }
    }

    pub fn nodes(&self, p: &AuthzPolicy) -> PolicyNodes<'a> {
        if p.namespace == ROOT_NAMESPACE {
            return PolicyNodes::Every;
        }
        let mut nodes = self.by_namespace.get(p.namespace.as_str()).cloned().unwrap_or_default();
        for r in p.spec.target_ref.iter().chain(&p.spec.target_refs) {
            let ns = r.namespace.as_deref().unwrap_or(&p.namespace);
            if let Some(n) = self.by_service.get(&(ns, r.name.as_str())) {
                nodes.extend(n);
            }
        }
        PolicyNodes::Only(nodes)
    }
}

/// Every resource once (encoded and digested once), and which nodes get it.
#[derive(Debug, Default)]
pub struct Resources {
    /// Sent to every node (services, routes, PeerAuthentications, enrolled
    /// workloads, root-namespace AuthorizationPolicies).
    pub shared: Vec<Arc<pb::Resource>>,
    /// Sent to that node only: its own pods (enrolled or not, pending ones
    /// included) and the AuthorizationPolicies that may apply to them
    /// ([`PolicyPlacement`]; one encoding shared by every node that gets it).
    pub local: BTreeMap<String, Vec<Arc<pb::Resource>>>,
}

impl Resources {
    pub fn of(view: &MeshView) -> Self {
        Self::reusing(view, None)
    }

    /// As [`Resources::of`], reusing the encoded resource of every workload
    /// and service equal to one in `prev` (encoding and digesting 10k
    /// resources per change is most of a change's cost otherwise).
    pub fn reusing(view: &MeshView, prev: Option<(&MeshView, &Resources)>) -> Self {
        let mut old_w: HashMap<&str, (&Workload, Arc<pb::Resource>)> = HashMap::new();
        let mut old_s: HashMap<(&str, &str), (&Service, Arc<pb::Resource>)> = HashMap::new();
        let mut old_r: HashMap<&str, (&ServiceRouting, Arc<pb::Resource>)> = HashMap::new();
        let mut old_a: HashMap<(&str, &str), (&AuthzPolicy, Arc<pb::Resource>)> = HashMap::new();
        if let Some((pv, pr)) = prev {
            let by_name: HashMap<&str, &Arc<pb::Resource>> = pr
                .shared
                .iter()
                .chain(pr.local.values().flatten())
                .map(|r| (r.name.as_str(), r))
                .collect();
            for w in &pv.workloads {
                if let Some(r) = by_name.get(format!("{}{}", disc::WORKLOAD, w.uid).as_str()) {
                    old_w.insert(&w.uid, (w, (*r).clone()));
                }
            }
            for s in &pv.services {
                let name = format!("{}{}/{}", disc::SERVICE, s.namespace, s.name);
                if let Some(r) = by_name.get(name.as_str()) {
                    old_s.insert((&s.namespace, &s.name), (s, (*r).clone()));
                }
            }
            for rt in &pv.routes {
                if let Some(r) = by_name.get(disc::routing_name(&rt.service).as_str()) {
                    old_r.insert(&rt.service, (rt, (*r).clone()));
                }
            }
            for p in &pv.authorization_policies {
                let name = disc::authorization_policy_name(&p.namespace, &p.name);
                if let Some(r) = by_name.get(name.as_str()) {
                    old_a.insert((&p.namespace, &p.name), (p, (*r).clone()));
                }
            }
        }
        let mut r = Resources::default();
        for w in &view.workloads {
            let res = match old_w.get(w.uid.as_str()) {
                Some((o, res)) if *o == w => res.clone(),
                _ => Arc::new(disc::resource(disc::workload_to(w))),
            };
            r.local.entry(w.node.clone()).or_default().push(res.clone());
            if w.enrolled {
                r.shared.push(res);
            }
        }
        // A pod without an address: to its own node only (nothing else can
        // reach it through the mesh before it has one). Few, and short-lived:
        // encoded afresh.
        for p in &view.pending {
            let res = Arc::new(disc::resource(disc::pending_pod_to(p)));
            r.local.entry(p.node.clone()).or_default().push(res);
        }
        for sp in &view.services {
            let res = match old_s.get(&(sp.namespace.as_str(), sp.name.as_str())) {
                Some((o, res)) if *o == sp => res.clone(),
                _ => Arc::new(disc::resource(disc::service_to(sp))),
            };
            r.shared.push(res);
        }
        for p in &view.peer_authentications {
            r.shared.push(Arc::new(disc::resource(disc::peer_authentication_to(p))));
        }
        // Every node gets every Service's routes: a source on any node may call it.
        for rt in &view.routes {
            let res = match old_r.get(rt.service.as_str()) {
                Some((o, res)) if *o == rt => res.clone(),
                _ => Arc::new(disc::resource(disc::routing_to(rt))),
            };
            r.shared.push(res);
        }
        // Every node gets every traffic policy, as routes (small, and rare).
        for t in &view.traffic_policies {
            r.shared.push(Arc::new(disc::resource(disc::traffic_policy_to(t))));
        }
        // Every node gets every rate limit (small, and rare); each agent
        // applies those of the Services its own pods back.
        for p in &view.rate_limits {
            r.shared.push(Arc::new(disc::resource(disc::rate_limit_to(p))));
        }
        let placement = PolicyPlacement::new(view);
        for p in &view.authorization_policies {
            let res = match old_a.get(&(p.namespace.as_str(), p.name.as_str())) {
                Some((o, res)) if *o == p => res.clone(),
                _ => Arc::new(disc::resource(disc::authorization_policy_to(p))),
            };
            match placement.nodes(p) {
                PolicyNodes::Every => r.shared.push(res),
                PolicyNodes::Only(nodes) => {
                    for n in nodes {
                        r.local.entry(n.to_owned()).or_default().push(res.clone());
                    }
                }
            }
        }
        r
    }

    /// What `node` holds when in sync: name -> resource.
    pub fn for_node(&self, node: &str) -> BTreeMap<&str, &Arc<pb::Resource>> {
        self.shared
            .iter()
            .chain(self.local.get(node).into_iter().flatten())
            .map(|r| (r.name.as_str(), r))
            .collect()
    }
}

/// Where a resource goes: every node, or these nodes only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    Every,
    Nodes(BTreeSet<String>),
}

/// A resource as seen from one snapshot, for diffs between two.
#[derive(Clone, Debug)]
pub struct Placed {
    pub scope: Scope,
    pub resource: Arc<pb::Resource>,
}

impl Placed {
    pub fn visible_to(&self, node: &str) -> bool {
        match &self.scope {
            Scope::Every => true,
            Scope::Nodes(n) => n.contains(node),
        }
    }
}

/// What changed between two snapshots: (name, before, after).
pub type Diff = Vec<(String, Option<Placed>, Option<Placed>)>;

impl Resources {
    fn placed(&self) -> HashMap<&str, Placed> {
        let mut m: HashMap<&str, Placed> = HashMap::new();
        for (node, rs) in &self.local {
            for r in rs {
                let p = m.entry(&r.name).or_insert_with(|| Placed {
                    scope: Scope::Nodes(BTreeSet::new()),
                    resource: r.clone(),
                });
                if let Scope::Nodes(n) = &mut p.scope {
                    n.insert(node.clone());
                }
            }
        }
        // A shared resource (an enrolled pod) is everyone's, its own node's too.
        for r in &self.shared {
            m.insert(
                &r.name,
                Placed {
                    scope: Scope::Every,
                    resource: r.clone(),
                },
            );
        }
        m
    }

    /// The resources that differ (content or scope) from `before`.
    pub fn diff(&self, before: &Resources) -> Diff {
        let (old, new) = (before.placed(), self.placed());
        let mut d: Diff = Vec::new();
        for (name, n) in &new {
            match old.get(name) {
                Some(o) if o.scope == n.scope && o.resource.version == n.resource.version => {}
                o => d.push((name.to_string(), o.cloned(), Some(n.clone()))),
            }
        }
        for (name, o) in &old {
            if !new.contains_key(name) {
                d.push((name.to_string(), Some(o.clone()), None));
            }
        }
        d
    }
}

/// A node's delta from a snapshot diff, when it holds exactly the previous
/// snapshot: only the diff's entries are looked at.
pub fn delta_from_diff(diff: &Diff, node: &str) -> (Vec<pb::Resource>, Vec<String>) {
    let mut changed = Vec::new();
    let mut removed = Vec::new();
    for (name, before, after) in diff {
        let was = before.as_ref().filter(|p| p.visible_to(node));
        let now = after.as_ref().filter(|p| p.visible_to(node));
        match (was, now) {
            (Some(w), Some(n)) if w.resource.version == n.resource.version => {}
            (_, Some(n)) => changed.push(n.resource.as_ref().clone()),
            (Some(_), None) => removed.push(name.clone()),
            (None, None) => {}
        }
    }
    changed.sort_by(|a, b| a.name.cmp(&b.name));
    removed.sort();
    (changed, removed)
}

/// What to send a node that holds `held` (name -> version) to bring it to `want`.
pub fn delta(
    held: &BTreeMap<String, String>,
    want: &BTreeMap<&str, &Arc<pb::Resource>>,
) -> (Vec<pb::Resource>, Vec<String>) {
    let changed = want
        .values()
        .filter(|r| held.get(&r.name) != Some(&r.version))
        .map(|r| r.as_ref().clone())
        .collect();
    let removed = held
        .keys()
        .filter(|n| !want.contains_key(n.as_str()))
        .cloned()
        .collect();
    (changed, removed)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn cluster(text: &str) -> Cluster {
        let (c, problems) = crate::source::files::parse_cluster("t.yaml", text);
        assert!(
            problems.iter().all(|p| p.severity != crate::model::Severity::Error),
            "{problems:?}"
        );
        c
    }

    const APP: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio-injection: enabled}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, uid: u1, labels: {app: web}}
spec: {nodeName: n1, serviceAccountName: web, containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.1.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: legacy, namespace: shop, uid: u2, labels: {app: web}, annotations: {ferry.dev/mesh: disabled}}
spec: {nodeName: n2, containers: [{name: c}]}
status: {podIP: 10.1.2.2}
---
apiVersion: v1
kind: Pod
metadata: {name: solo, uid: u3, annotations: {ferry.dev/mesh: enabled}}
spec: {nodeName: n2, containers: [{name: c}]}
status: {podIP: 10.1.2.3}
---
apiVersion: v1
kind: Pod
metadata: {name: pending, uid: u4}
spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{name: http-web, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: db}
spec:
  clusterIP: 10.96.0.11
  ports: [{port: 5432, appProtocol: postgresql}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: db-x, labels: {kubernetes.io/service-name: db}}
addressType: IPv4
ports: [{port: 15432}]
endpoints:
- addresses: [10.1.2.3]
- addresses: [10.1.2.9]
  conditions: {ready: false}
"#;

    #[test]
    fn enrollment_follows_annotations_then_namespace_labels() {
        let v = mesh_view(&cluster(APP), true);
        let e: BTreeMap<&str, bool> = v.workloads.iter().map(|w| (w.name.as_str(), w.enrolled)).collect();
        assert_eq!(
            e,
            BTreeMap::from([("web", true), ("legacy", false), ("solo", true)]),
            "pending has no IP"
        );
        let web = v.workloads.iter().find(|w| w.name == "web").unwrap();
        assert_eq!((web.service_account.as_str(), web.node.as_str()), ("web", "n1"));
        for (k, val) in NAMESPACE_OPT_IN {
            assert!(enrolled(
                None,
                Some(&BTreeMap::from([(k.to_string(), val.to_string())]))
            ));
        }
        assert!(!enrolled(
            None,
            Some(&BTreeMap::from([("istio-injection".into(), "disabled".into())]))
        ));
    }

    /// Pods without an address yet: shop/fresh (enrolled by its namespace)
    /// and default/plain (not enrolled) on n1, default/opted (annotation) on
    /// n2, a host-network pod on n1, one not scheduled, one finished; and
    /// shop/web on n1 with an address.
    const UNADDRESSED: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: fresh-6f7b8c9d4-x2x9z, generateName: fresh-6f7b8c9d4-, namespace: shop, uid: f1, labels: {app: fresh, pod-template-hash: 6f7b8c9d4},
           ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: fresh-6f7b8c9d4, uid: r1, controller: true}]}
spec: {nodeName: n1, serviceAccountName: fresh-sa, containers: [{name: c}]}
status: {phase: Pending}
---
apiVersion: v1
kind: Pod
metadata: {name: plain, uid: p1}
spec: {nodeName: n1, containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: opted, uid: o1, annotations: {ferry.dev/mesh: enabled}}
spec: {nodeName: n2, containers: [{name: c}]}
status: {phase: Pending, podIPs: []}
---
apiVersion: v1
kind: Pod
metadata: {name: hostnet, uid: h1, annotations: {ferry.dev/mesh: enabled}}
spec: {nodeName: n1, hostNetwork: true, containers: [{name: c}]}
status: {phase: Pending}
---
apiVersion: v1
kind: Pod
metadata: {name: unscheduled, uid: s1, annotations: {ferry.dev/mesh: enabled}}
spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: done, uid: d1, annotations: {ferry.dev/mesh: enabled}}
spec: {nodeName: n1, containers: [{name: c}]}
status: {phase: Succeeded}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, uid: w1, labels: {app: web}}
spec: {nodeName: n1, containers: [{name: c}]}
status: {podIP: 10.1.1.2}
"#;

    #[test]
    fn scheduled_pods_without_an_address_are_pending_on_their_own_node() {
        let v = mesh_view(&cluster(UNADDRESSED), true);
        let pending: Vec<(String, &str, bool)> = v
            .pending
            .iter()
            .map(|p| (p.label(), p.node.as_str(), p.enrolled))
            .collect();
        assert_eq!(
            pending,
            [
                ("default/opted".to_string(), "n2", true),
                ("default/plain".to_string(), "n1", false),
                ("shop/fresh-6f7b8c9d4-x2x9z".to_string(), "n1", true),
            ],
            "never host-network, unscheduled or finished pods"
        );
        let fresh = v.pending.iter().find(|p| p.uid == "f1").unwrap();
        assert_eq!(
            (
                fresh.uid.as_str(),
                fresh.service_account.as_str(),
                fresh.workload_name.as_deref(),
                fresh.labels.get("app").map(String::as_str)
            ),
            ("f1", "fresh-sa", Some("fresh"), Some("fresh"))
        );
        let names = |ws: &[Workload]| ws.iter().map(|w| w.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&v.workloads), ["web"]);
        assert!(
            v.host_network.is_empty(),
            "a host-network pod without an address is nothing yet"
        );
        // Each goes to its own node only, and reaches it as a pending pod.
        let r = Resources::of(&v);
        let held = |n: &str| r.for_node(n).keys().map(|k| k.to_string()).collect::<Vec<_>>();
        assert!(held("n1").contains(&"pendingpod/f1".to_string()) && held("n1").contains(&"pendingpod/p1".to_string()));
        assert!(!held("n1").contains(&"pendingpod/o1".to_string()));
        assert!(held("n2").contains(&"pendingpod/o1".to_string()));
        assert!(!held("n2").iter().any(|k| k == "pendingpod/f1" || k == "pendingpod/p1"));
        assert!(held("n3").iter().all(|k| !k.starts_with("pendingpod/")));
        let cfg = node_config(&r, "n1").unwrap_or_else(|p| panic!("{p:#?}"));
        let uids: Vec<&str> = cfg.pending_pods.iter().map(|p| p.uid.as_str()).collect();
        assert_eq!(uids, ["f1", "p1"]);
        assert_eq!(&cfg.pending_pods[0], fresh, "field for field over the wire");
        // A namespace's policies reach the node of its pending pods (the
        // agent makes them workloads as soon as the runtime gives an address).
        let with_policy = format!("{UNADDRESSED}{}", policy("default", "p", "{}"));
        let rp = Resources::of(&mesh_view(&cluster(&with_policy), true));
        for n in ["n1", "n2"] {
            assert!(rp.for_node(n).contains_key("authorizationpolicy/default/p"), "{n}");
        }
        assert!(!rp.for_node("n3").contains_key("authorizationpolicy/default/p"));
        // The address comes: a workload like any other, no longer pending;
        // its node swaps one resource for the other in one delta, and every
        // node gets the enrolled workload.
        let addressed = UNADDRESSED.replace(
            "spec: {nodeName: n1, serviceAccountName: fresh-sa, containers: [{name: c}]}\nstatus: {phase: Pending}",
            "spec: {nodeName: n1, serviceAccountName: fresh-sa, containers: [{name: c}]}\nstatus: {phase: Running, podIP: 10.1.1.7}",
        );
        let v2 = mesh_view(&cluster(&addressed), true);
        assert!(v2.pending.iter().all(|p| p.uid != "f1"));
        let fresh = v2.workloads.iter().find(|w| w.uid == "f1").unwrap();
        let was = v.pending.iter().find(|p| p.uid == "f1").unwrap();
        assert_eq!(
            fresh,
            &was.at("10.1.1.7".parse().unwrap()),
            "what the agent learned, exactly"
        );
        let r2 = Resources::of(&v2);
        let diff = r2.diff(&r);
        let (changed, removed) = delta_from_diff(&diff, "n1");
        assert_eq!(
            (changed.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), removed),
            (vec!["workload/f1"], vec!["pendingpod/f1".to_string()])
        );
        let (changed, removed) = delta_from_diff(&diff, "n2");
        assert_eq!(
            (changed.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), removed),
            (vec!["workload/f1"], vec![])
        );
    }

    /// Node n1 (192.168.0.11) runs two host-network pods (one backs Service
    /// metrics, one asks to be enrolled) and a normal enrolled pod.
    const HOST_NETWORK: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: node-exporter-abcde, generateName: node-exporter-, uid: h1, labels: {app: node-exporter},
           ownerReferences: [{apiVersion: apps/v1, kind: DaemonSet, name: node-exporter, uid: d1, controller: true}]}
spec: {nodeName: n1, hostNetwork: true, containers: [{name: c, ports: [{name: metrics, containerPort: 9100}]}]}
status: {podIP: 192.168.0.11, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: kube-proxy-fghij, uid: h2, labels: {k8s-app: kube-proxy}, annotations: {ferry.dev/mesh: enabled}}
spec: {nodeName: n1, hostNetwork: true, containers: [{name: c}]}
status: {podIP: 192.168.0.11, podIPs: [{ip: 192.168.0.11}], phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: web-6f7b8c9d4-x2x9z, generateName: web-6f7b8c9d4-, uid: w1, labels: {app: web, pod-template-hash: 6f7b8c9d4},
           annotations: {ferry.dev/mesh: enabled},
           ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: web-6f7b8c9d4, uid: r1, controller: true}]}
spec: {nodeName: n1, containers: [{name: c}]}
status: {podIP: 10.1.1.2, phase: Running}
---
apiVersion: v1
kind: Service
metadata: {name: metrics}
spec: {clusterIP: 10.96.0.20, selector: {app: node-exporter}, ports: [{name: http, port: 9100, targetPort: metrics}]}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {clusterIP: 10.96.0.21, selector: {app: web}, ports: [{name: http, port: 80, targetPort: 8080}]}
"#;

    /// The config `node` would build from what it is sent.
    fn node_config(r: &Resources, node: &str) -> Result<ferry_model::ConfigFile, Vec<String>> {
        let held = disc::HeldResources(
            r.for_node(node)
                .into_iter()
                .map(|(n, x)| (n.to_owned(), x.as_ref().clone()))
                .collect(),
        );
        held.to_config(node, &Default::default())
    }

    #[test]
    fn locality_from_the_nodes_topology_labels_with_the_pod_label_overriding() {
        let v = mesh_view(
            &cluster(
                r#"
apiVersion: v1
kind: Node
metadata:
  name: n1
  labels: {topology.kubernetes.io/region: eu-west1, topology.kubernetes.io/zone: eu-west1-b, topology.istio.io/subzone: rack7}
---
apiVersion: v1
kind: Node
metadata:
  name: n2
  labels: {topology.kubernetes.io/region: us-east1, topology.kubernetes.io/zone: us-east1-c}
---
apiVersion: v1
kind: Node
metadata: {name: n3}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: default}
spec: {nodeName: n1, containers: [{name: c, image: i}]}
status: {podIP: 10.1.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: default}
spec: {nodeName: n2, containers: [{name: c, image: i}]}
status: {podIP: 10.1.2.2}
---
apiVersion: v1
kind: Pod
metadata: {name: c, namespace: default, labels: {istio-locality: r9.z9}}
spec: {nodeName: n1, containers: [{name: c, image: i}]}
status: {podIP: 10.1.1.3}
---
apiVersion: v1
kind: Pod
metadata: {name: d, namespace: default}
spec: {nodeName: n3, containers: [{name: c, image: i}]}
status: {podIP: 10.1.3.2}
"#,
            ),
            true,
        );
        let loc = |n: &str| v.workloads.iter().find(|w| w.name == n).unwrap().locality.clone();
        assert_eq!(loc("a").as_deref(), Some("eu-west1/eu-west1-b/rack7"));
        assert_eq!(loc("b").as_deref(), Some("us-east1/us-east1-c"));
        assert_eq!(
            loc("c").as_deref(),
            Some("r9/z9"),
            "the pod's label overrides its node's"
        );
        assert_eq!(loc("d"), None, "a node without topology labels");
    }

    #[test]
    fn host_network_pods_are_never_workloads_but_still_endpoints() {
        let v = mesh_view(&cluster(HOST_NETWORK), true);
        let names = |ws: &[Workload]| ws.iter().map(|w| w.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&v.workloads), ["web-6f7b8c9d4-x2x9z"]);
        assert_eq!(
            names(&v.host_network),
            ["kube-proxy-fghij", "node-exporter-abcde"],
            "listed apart"
        );
        assert!(
            v.host_network.iter().all(|w| !w.enrolled),
            "never enrolled, even when asked"
        );
        // The node's config validates: no two workloads with the node's address.
        let r = Resources::of(&v);
        let cfg = node_config(&r, "n1").unwrap_or_else(|p| panic!("{p:#?}"));
        assert_eq!(names(&cfg.workloads), ["web-6f7b8c9d4-x2x9z"]);
        assert!(r
            .for_node("n1")
            .keys()
            .all(|k| !k.ends_with("/h1") && !k.ends_with("/h2")));
        // The Service backed by a host-network pod routes to the node's
        // address (its named port resolved from that pod).
        let metrics = cfg.services.iter().find(|s| s.name == "metrics").unwrap();
        let eps: Vec<String> = metrics.endpoints.iter().map(|e| e.ip.to_string()).collect();
        assert_eq!(
            (eps, metrics.ports[0].target_port),
            (vec!["192.168.0.11".to_string()], 9100)
        );
        // The normal pod is named after its Deployment.
        assert_eq!(cfg.workloads[0].workload_name(), "web");
        // Positive control: two pods of their own with one address still clash.
        let dup = HOST_NETWORK
            .replacen("hostNetwork: true, ", "", 2)
            .replace("192.168.0.11", "10.1.1.2");
        let v = mesh_view(&cluster(&dup), true);
        assert_eq!(v.workloads.len(), 3);
        let problems = node_config(&Resources::of(&v), "n1").unwrap_err();
        assert_eq!(
            problems
                .iter()
                .filter(|p| p.contains("already used by workloads"))
                .count(),
            2,
            "{problems:#?}"
        );
        // Listed for what they are: a note each, a warning for the one that asked in.
        let found = crate::analyze::analyze(&cluster(HOST_NETWORK));
        let host: Vec<(crate::model::Severity, &str)> = found
            .iter()
            .filter(|p| p.field == "spec.hostNetwork")
            .map(|p| (p.severity, p.object.as_str()))
            .collect();
        assert_eq!(
            host,
            [
                (crate::model::Severity::Warning, "Pod default/kube-proxy-fghij"),
                (crate::model::Severity::Info, "Pod default/node-exporter-abcde"),
            ]
        );
        let warning = found
            .iter()
            .find(|p| p.severity == crate::model::Severity::Warning && p.field == "spec.hostNetwork")
            .unwrap()
            .to_string();
        assert!(
            warning.contains("not a mesh workload and not captured although its annotation or namespace opts it in")
                && warning.contains("at the node's address"),
            "{warning}"
        );
    }

    #[test]
    fn endpoints_from_slices_or_selectors() {
        let v = mesh_view(&cluster(APP), true);
        let web = &v.services.iter().find(|s| s.name == "web").unwrap();
        assert_eq!(web.ports[0].target_port, 8080, "named port resolved from the pod");
        assert_eq!(web.ports[0].protocol, Protocol::Http, "from the port name http-web");
        let ips: Vec<String> = web.endpoints.iter().map(|e| e.ip.to_string()).collect();
        assert_eq!(ips, ["10.1.1.2", "10.1.2.2"]);
        let db = &v.services.iter().find(|s| s.name == "db").unwrap();
        // postgresql is not a protocol Istio selects by: detected, not declared.
        assert_eq!((db.ports[0].target_port, db.ports[0].protocol), (15432, Protocol::Auto));
        assert_eq!(db.endpoints.iter().map(|e| e.ready).collect::<Vec<_>>(), [true, false]);
        // All endpoints terminating: those still serving are used.
        let t = APP.replace(
            "conditions: {ready: false}",
            "conditions: {ready: false, serving: true, terminating: true}",
        );
        let t = t.replace(
            "- addresses: [10.1.2.3]\n",
            "- addresses: [10.1.2.3]\n  conditions: {ready: false, serving: false, terminating: true}\n",
        );
        let v = mesh_view(&cluster(&t), true);
        let db = &v.services.iter().find(|s| s.name == "db").unwrap();
        assert_eq!(db.endpoints.iter().map(|e| e.ready).collect::<Vec<_>>(), [false, true]);
        // Kubernetes mode: no endpoint controller is emulated.
        let k = mesh_view(&cluster(APP), false);
        assert!(
            k.services.iter().find(|s| s.name == "web").is_none(),
            "named port unresolvable, no endpoints"
        );
    }

    #[test]
    fn nodes_get_their_pods_and_the_mesh_members() {
        let r = Resources::of(&mesh_view(&cluster(APP), true));
        let n1: Vec<&str> = r.for_node("n1").keys().copied().collect();
        assert_eq!(
            n1,
            ["service/default/db", "service/shop/web", "workload/u1", "workload/u3"]
        );
        let n2: Vec<&str> = r.for_node("n2").keys().copied().collect();
        assert_eq!(
            n2,
            [
                "service/default/db",
                "service/shop/web",
                "workload/u1",
                "workload/u2",
                "workload/u3"
            ]
        );
        // In sync: nothing to send. One change: one resource. A pod gone: removed.
        let held: BTreeMap<String, String> = r
            .for_node("n2")
            .iter()
            .map(|(n, x)| (n.to_string(), x.version.clone()))
            .collect();
        assert_eq!(delta(&held, &r.for_node("n2")), (vec![], vec![]));
        let r2 = Resources::of(&mesh_view(
            &cluster(
                &APP.replace("10.1.2.9", "10.1.2.8")
                    .replace("name: legacy", "name: legacy2"),
            ),
            true,
        ));
        let (changed, removed) = delta(&held, &r2.for_node("n2"));
        let names: Vec<&str> = changed.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["service/default/db", "workload/u2"]);
        assert!(removed.is_empty());
        let r3 = Resources::of(&mesh_view(&cluster(&APP.replace("uid: u2", "uid: u9")), true));
        let (_, removed) = delta(&held, &r3.for_node("n2"));
        assert_eq!(removed, ["workload/u2"]);
    }

    #[test]
    fn reusing_encodings_gives_what_encoding_afresh_gives() {
        let v1 = mesh_view(&cluster(APP), true);
        let v2 = mesh_view(&cluster(&APP.replace("10.1.1.2", "10.1.1.5")), true);
        let r1 = Resources::of(&v1);
        let fresh = Resources::of(&v2);
        let reused = Resources::reusing(&v2, Some((&v1, &r1)));
        for n in ["n1", "n2"] {
            let a: Vec<_> = fresh
                .for_node(n)
                .iter()
                .map(|(k, r)| (k.to_string(), r.version.clone()))
                .collect();
            let b: Vec<_> = reused
                .for_node(n)
                .iter()
                .map(|(k, r)| (k.to_string(), r.version.clone()))
                .collect();
            assert_eq!(a, b);
        }
        // Unchanged ones are the very same allocation.
        let db = |r: &Resources| {
            r.shared
                .iter()
                .find(|x| x.name == "service/default/db")
                .unwrap()
                .clone()
        };
        assert!(Arc::ptr_eq(&db(&r1), &db(&reused)));
    }

    #[test]
    fn snapshot_diffs_give_the_same_deltas_as_full_comparisons() {
        let versions = |r: &Resources, n: &str| -> BTreeMap<String, String> {
            r.for_node(n)
                .iter()
                .map(|(k, x)| (k.to_string(), x.version.clone()))
                .collect()
        };
        let a = Resources::of(&mesh_view(&cluster(APP), true));
        // web's IP moves, legacy opts in (becomes shared), solo opts out (local to n2 only).
        let changed = APP
            .replace("10.1.1.2", "10.1.1.5")
            .replace("ferry.dev/mesh: disabled", "ferry.dev/mesh: enabled")
            .replace(
                "{name: solo, uid: u3, annotations: {ferry.dev/mesh: enabled}}",
                "{name: solo, uid: u3}",
            );
        let b = Resources::of(&mesh_view(&cluster(&changed), true));
        let diff = b.diff(&a);
        for node in ["n1", "n2", "n3"] {
            let full = delta(&versions(&a, node), &b.for_node(node));
            assert_eq!(delta_from_diff(&diff, node), full, "{node}");
        }
        let (c, r) = delta_from_diff(&diff, "n1");
        assert!(
            c.iter().any(|x| x.name == "workload/u2") && r == ["workload/u3"],
            "{c:?} {r:?}"
        );
        let (_, r) = delta_from_diff(&diff, "n2");
        assert!(r.is_empty(), "solo stays on its own node");
    }

    /// Pods: shop/web on n1 (sa web), shop/db on n2, ops/tool on n3,
    /// shop/legacy (not enrolled) on n4; Service shop/web selects web, and
    /// Service ops/ext is a manual EndpointSlice onto shop/db's address.
    const AUTHZ: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio-injection: enabled}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, uid: web, labels: {app: web}}
spec: {nodeName: n1, serviceAccountName: web, containers: [{name: c}]}
status: {podIP: 10.1.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop, uid: db, labels: {app: db}}
spec: {nodeName: n2, containers: [{name: c}]}
status: {podIP: 10.1.2.2}
---
apiVersion: v1
kind: Pod
metadata: {name: tool, namespace: ops, uid: tool, labels: {app: tool}}
spec: {nodeName: n3, containers: [{name: c}]}
status: {podIP: 10.1.3.2}
---
apiVersion: v1
kind: Pod
metadata: {name: legacy, namespace: shop, uid: legacy, annotations: {ferry.dev/mesh: disabled}}
spec: {nodeName: n4, containers: [{name: c}]}
status: {podIP: 10.1.4.2}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: ops}
spec: {clusterIP: 10.96.0.11, ports: [{name: tcp, port: 5432}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ext-1, namespace: ops, labels: {kubernetes.io/service-name: ext}}
addressType: IPv4
ports: [{name: tcp, port: 5432}]
endpoints: [{addresses: [10.1.2.2]}]
"#;

    fn policy(ns: &str, name: &str, spec: &str) -> String {
        format!(
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n"
        )
    }

    #[test]
    fn authorization_policies_go_to_the_nodes_whose_pods_they_may_apply_to() {
        let every = ["n1", "n2", "n3", "n4", "n5"];
        // (policy namespace, spec, nodes that get it)
        let cases: &[(&str, &str, &[&str])] = &[
            ("shop", "{selector: {matchLabels: {app: web}}}", &["n1", "n2", "n4"]),
            ("shop", "{}", &["n1", "n2", "n4"]),
            ("ops", "{action: DENY, rules: [{}]}", &["n3"]),
            // Selecting nothing today: no node, until a pod appears in ops.
            ("nowhere", "{}", &[]),
            // The root namespace: every node, even one without pods (n5).
            ("istio-system", "{selector: {matchLabels: {app: web}}}", &every),
            ("istio-system", "{}", &every),
            // targetRefs: the namespace's nodes and the nodes of the pods
            // backing the Service, wherever they run (shop/db, on n2).
            ("ops", "{targetRefs: [{kind: Service, name: ext}]}", &["n2", "n3"]),
            ("ops", "{targetRef: {kind: Service, name: ext}}", &["n2", "n3"]),
            (
                "shop",
                "{targetRefs: [{kind: Service, name: web}]}",
                &["n1", "n2", "n4"],
            ),
            ("ops", "{targetRefs: [{kind: Service, name: none}]}", &["n3"]),
        ];
        for (ns, spec, want) in cases {
            let c = cluster(&format!("{AUTHZ}{}", policy(ns, "p", spec)));
            let view = mesh_view(&c, true);
            assert_eq!(view.authorization_policies.len(), 1, "{ns} {spec}");
            let r = Resources::of(&view);
            let name = format!("authorizationpolicy/{ns}/p");
            let got: Vec<&str> = every
                .iter()
                .copied()
                .filter(|n| r.for_node(n).contains_key(name.as_str()))
                .collect();
            assert_eq!(got, *want, "{ns} {spec}");
            // Never less than the agent uses: every pod it applies to is on a node that has it.
            let p = &view.authorization_policies[0];
            for w in &view.workloads {
                let backs: Vec<(&str, &str)> = view
                    .services
                    .iter()
                    .filter(|s| s.endpoints.iter().any(|e| e.ip == w.ip))
                    .map(|s| (s.namespace.as_str(), s.name.as_str()))
                    .collect();
                if ferry_model::authz::applies_to(p, w, ROOT_NAMESPACE, &backs) {
                    assert!(got.contains(&w.node.as_str()), "{ns} {spec}: {} on {}", w.name, w.node);
                }
            }
        }
    }

    #[test]
    fn authorization_policy_changes_are_per_policy_deltas() {
        let versions = |r: &Resources, n: &str| -> BTreeMap<String, String> {
            r.for_node(n)
                .iter()
                .map(|(k, x)| (k.to_string(), x.version.clone()))
                .collect()
        };
        let a_text = format!(
            "{AUTHZ}{}{}",
            policy(
                "shop",
                "web",
                "{selector: {matchLabels: {app: web}}, rules: [{from: [{source: {namespaces: [shop]}}]}]}"
            ),
            policy("ops", "tools", "{rules: [{}]}")
        );
        let a_view = mesh_view(&cluster(&a_text), true);
        let a = Resources::of(&a_view);
        // One policy's rules change: that policy alone, to the nodes that have it.
        let b_text = a_text.replace("namespaces: [shop]", "namespaces: [shop, ops]");
        let b_view = mesh_view(&cluster(&b_text), true);
        let b = Resources::reusing(&b_view, Some((&a_view, &a)));
        let diff = b.diff(&a);
        for node in ["n1", "n2", "n3", "n4", "n9"] {
            let full = delta(&versions(&a, node), &b.for_node(node));
            assert_eq!(delta_from_diff(&diff, node), full, "{node}");
            let names: Vec<String> = full.0.iter().map(|r| r.name.clone()).collect();
            let want: &[&str] = if ["n1", "n2", "n4"].contains(&node) {
                &["authorizationpolicy/shop/web"]
            } else {
                &[]
            };
            assert_eq!(names, want, "{node}");
        }
        // The unchanged policy keeps its encoding.
        let tools = |r: &Resources| {
            r.local["n3"]
                .iter()
                .find(|x| x.name.ends_with("/tools"))
                .unwrap()
                .clone()
        };
        assert!(Arc::ptr_eq(&tools(&a), &tools(&b)));
        // A pod moves into ops on n1: n1 gains the ops policy; the last ops
        // pod leaves n3: n3 loses it.
        let c_text = b_text.replace(
            "metadata: {name: tool, namespace: ops, uid: tool, labels: {app: tool}}\nspec: {nodeName: n3",
            "metadata: {name: tool, namespace: ops, uid: tool, labels: {app: tool}}\nspec: {nodeName: n1",
        );
        let c = Resources::of(&mesh_view(&cluster(&c_text), true));
        let diff = c.diff(&b);
        for node in ["n1", "n2", "n3"] {
            assert_eq!(
                delta_from_diff(&diff, node),
                delta(&versions(&b, node), &c.for_node(node)),
                "{node}"
            );
        }
        let (changed, _) = delta_from_diff(&diff, "n1");
        assert!(
            changed.iter().any(|r| r.name == "authorizationpolicy/ops/tools"),
            "{changed:?}"
        );
        let (_, removed) = delta_from_diff(&diff, "n3");
        assert!(
            removed.contains(&"authorizationpolicy/ops/tools".to_string()),
            "{removed:?}"
        );
    }

    #[test]
    fn an_invalid_authorization_policy_is_a_problem_and_stays_out() {
        let text = format!(
            "{AUTHZ}{}{}",
            policy("shop", "ok", "{rules: [{}]}"),
            policy(
                "shop",
                "bad",
                "{action: CUSTOM, rules: [{from: [{source: {ipBlocks: [10.0.0.0/99]}}]}]}"
            )
        );
        let (c, problems) = crate::source::files::parse_cluster("t.yaml", &text);
        let errors: Vec<String> = problems
            .iter()
            .filter(|p| p.severity == crate::model::Severity::Error)
            .map(|p| p.to_string())
            .collect();
        assert_eq!(errors.len(), 2, "{errors:#?}");
        assert!(
            errors[0].starts_with("error: t.yaml:")
                && errors[0].contains("AuthorizationPolicy shop/bad: spec.action: CUSTOM needs an external authorizer"),
            "{errors:#?}"
        );
        assert!(
            errors[1].contains("AuthorizationPolicy shop/bad: spec.rules[0].from[0].source.ipBlocks[0]: "),
            "{errors:#?}"
        );
        let line = problems
            .iter()
            .find(|p| p.severity == crate::model::Severity::Error)
            .unwrap()
            .line
            .unwrap();
        assert!(
            text.lines()
                .nth(line - 1)
                .unwrap()
                .starts_with("apiVersion: security.istio.io"),
            "line {line}"
        );
        let view = mesh_view(&c, true);
        let names: Vec<&str> = view.authorization_policies.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["ok"]);
    }

    #[test]
    fn an_authorization_policy_without_spec_is_allow_nothing() {
        let text = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-all, namespace: shop}\n";
        let c = cluster(text);
        let view = mesh_view(&c, true);
        assert_eq!(view.authorization_policies[0].spec, Default::default());
    }
}
