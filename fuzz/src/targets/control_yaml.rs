//! The control plane's cluster ingestion: a YAML file of cluster objects
//! (`model::parse_file`), put into a `Cluster` (first definition wins, as
//! `source::files` does), routes compiled (`routes::compile`), analyzed
//! (`analyze::analyze`), the mesh view and its wire resources computed, and
//! each node's resources turned back into an agent config
//! (`HeldResources::to_config`, refusals allowed). Must never panic.

use std::collections::BTreeMap;

use ferry_control::{
    analyze, compute,
    model::{parse_file, Cluster, Located},
    routes,
};
use ferry_model::{proto::HeldResources, Settings};

/// One input (the cargo-fuzz target `control_yaml` and the replay test call this).
pub fn run(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (docs, _problems) = parse_file("fuzz.yaml", &text);
    let mut objects = BTreeMap::new();
    for d in docs {
        objects.entry(d.key).or_insert(Located {
            object: d.object,
            file: "fuzz.yaml".into(),
            line: Some(d.line),
        });
    }
    let cluster = Cluster { objects };
    let _ = routes::compile(&cluster);
    let _ = analyze::analyze(&cluster);
    let view = compute::mesh_view(&cluster, true);
    let resources = compute::Resources::of(&view);
    let mut nodes: Vec<&str> = view.workloads.iter().map(|w| w.node.as_str()).collect();
    nodes.push("n1");
    nodes.sort_unstable();
    nodes.dedup();
    for node in nodes {
        let held = HeldResources(
            resources
                .for_node(node)
                .into_iter()
                .map(|(n, r)| (n.to_owned(), r.as_ref().clone()))
                .collect(),
        );
        let _ = held.to_config(node, &Settings::default());
    }
}
