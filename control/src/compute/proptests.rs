//! The config stream's snapshot/delta logic, as a property (issue 17): any
//! sequence of mesh changes (pods appearing, moving, enrolled or not,
//! leaving; services and their endpoints changing), each published as a
//! snapshot the way `config_stream::Store` does (`Resources::reusing` with
//! the previous one, and its `diff`), brings every node that applies the
//! deltas to exactly what a fresh snapshot would give it: the same resource
//! names with the same versions. A node applies the fast delta
//! (`delta_from_diff`) while it is in sync, and the full comparison
//! (`delta`) after it "reconnects" having missed versions.

use std::collections::BTreeMap;

use ferry_model::{
    protocol::Protocol,
    workload::{Endpoint, Service, ServicePort, Workload},
};
use proptest::prelude::*;

use super::{delta, delta_from_diff, MeshView, Resources};

const NODES: [&str; 3] = ["n1", "n2", "n3"];

/// A pod: (uid index, node index, enrolled, label value).
type PodGen = (u8, usize, bool, u8);
/// A service: (name index, endpoint uid indexes).
type SvcGen = (u8, Vec<u8>);

fn view(pods: &[PodGen], svcs: &[SvcGen]) -> MeshView {
    let mut workloads: BTreeMap<u8, Workload> = BTreeMap::new();
    for &(uid, node, enrolled, label) in pods {
        workloads.insert(
            uid,
            Workload {
                uid: format!("u{uid}"),
                name: format!("pod-{uid}"),
                namespace: "default".into(),
                service_account: "default".into(),
                node: NODES[node].into(),
                ip: std::net::Ipv4Addr::new(10, 1, node as u8, uid),
                enrolled,
                labels: [("app".to_owned(), format!("a{label}"))].into(),
                netns: None,
                host_veth: None,
                workload_name: None,
                locality: None,
            },
        );
    }
    let mut services: BTreeMap<u8, Service> = BTreeMap::new();
    for (name, eps) in svcs {
        services.insert(
            *name,
            Service {
                name: format!("s{name}"),
                namespace: "default".into(),
                vip: std::net::Ipv4Addr::new(10, 96, 0, *name),
                ports: vec![ServicePort {
                    port: 80,
                    target_port: 8080,
                    name: None,
                    protocol: Protocol::Auto,
                }],
                endpoints: eps
                    .iter()
                    .filter_map(|u| workloads.get(u))
                    .map(|w| Endpoint { ip: w.ip, ready: true })
                    .collect(),
            },
        );
    }
    MeshView {
        workloads: workloads.into_values().collect(),
        services: services.into_values().collect(),
        ..Default::default()
    }
}

fn step() -> impl Strategy<Value = (Vec<PodGen>, Vec<SvcGen>)> {
    (
        prop::collection::vec((0u8..12, 0usize..3, any::<bool>(), 0u8..3), 0..10),
        prop::collection::vec((0u8..4, prop::collection::vec(0u8..12, 0..4)), 0..4),
    )
}

/// What a node holds: name -> version.
type Held = BTreeMap<String, String>;

fn apply(held: &mut Held, changed: Vec<ferry_api::discovery::Resource>, removed: Vec<String>) {
    for n in removed {
        held.remove(&n);
    }
    for r in changed {
        held.insert(r.name, r.version);
    }
}

fn fresh(r: &Resources, node: &str) -> Held {
    r.for_node(node)
        .into_iter()
        .map(|(n, r)| (n.to_owned(), r.version.clone()))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn any_sequence_of_changes_converges_to_a_fresh_snapshot(
        steps in prop::collection::vec(step(), 1..8),
        // Per step and node: does that node miss this version (reconnects later)?
        missed in prop::collection::vec(prop::collection::vec(any::<bool>(), 3), 8),
    ) {
        let mut prev: Option<(MeshView, Resources)> = None;
        let mut held: Vec<Held> = vec![Held::new(); NODES.len()];
        // The version each node last applied (None: never, or missed one).
        let mut synced: Vec<Option<usize>> = vec![None; NODES.len()];
        for (i, (pods, svcs)) in steps.iter().enumerate() {
            let v = view(pods, svcs);
            let r = Resources::reusing(&v, prev.as_ref().map(|(pv, pr)| (pv, pr)));
            let diff = prev.as_ref().map(|(_, pr)| r.diff(pr));
            for (k, node) in NODES.iter().enumerate() {
                if missed[i][k] && i + 1 < steps.len() {
                    synced[k] = None;
                    continue;
                }
                let (changed, removed) = match (&diff, synced[k]) {
                    (Some(d), Some(s)) if s + 1 == i => delta_from_diff(d, node),
                    _ => delta(&held[k], &r.for_node(node)),
                };
                apply(&mut held[k], changed, removed);
                synced[k] = Some(i);
                prop_assert_eq!(&held[k], &fresh(&r, node), "node {} after step {}", node, i);
            }
            prev = Some((v, r));
        }
        // The last version was applied by every node.
        let (_, last) = prev.expect("one step at least");
        for (k, node) in NODES.iter().enumerate() {
            prop_assert_eq!(&held[k], &fresh(&last, node));
        }
    }
}
