//! The config stream, agent side: bytes from the control plane decoded as a
//! `DiscoveryResponse` (and, separately, a lone `Resource`) with prost,
//! applied to the held resources and turned into a validated `ConfigFile`
//! (`ferry_model::proto`). Must never panic. An accepted config must
//! validate, and must survive the trip back to the wire and back.

use ferry_api::discovery as pb;
use ferry_model::{
    proto::{self, HeldResources},
    ConfigFile, Settings,
};
use prost::Message;

fn check(held: &HeldResources) {
    let Ok(cfg) = held.to_config("n1", &Settings::default()) else {
        return;
    };
    assert!(cfg.validate().is_empty(), "accepted but invalid: {cfg:?}");
    let mut again = HeldResources::default();
    let kinds = cfg
        .workloads
        .iter()
        .map(proto::workload_to)
        .chain(cfg.services.iter().map(proto::service_to))
        .chain(cfg.peer_authentications.iter().map(proto::peer_authentication_to))
        .chain(cfg.routes.iter().map(proto::routing_to))
        .chain(cfg.traffic_policies.iter().map(proto::traffic_policy_to))
        .chain(cfg.rate_limits.iter().map(proto::rate_limit_to));
    for k in kinds {
        let r = proto::resource(k);
        again.0.insert(r.name.clone(), r);
    }
    let back: ConfigFile = again
        .to_config("n1", &Settings::default())
        .unwrap_or_else(|e| panic!("an accepted config, re-encoded, is refused: {e:?}\n{cfg:?}"));
    for w in &cfg.workloads {
        assert!(back.workloads.contains(w), "workload lost on the wire: {w:?}");
    }
    for s in &cfg.services {
        assert!(back.services.contains(s), "service lost on the wire: {s:?}");
    }
    for r in &cfg.routes {
        assert!(back.routes.contains(r), "routing lost on the wire: {r:?}");
    }
    for t in &cfg.traffic_policies {
        assert!(
            back.traffic_policies.contains(t),
            "traffic policy lost on the wire: {t:?}"
        );
    }
}

/// One input (the cargo-fuzz target `config_stream` and the replay test call this).
pub fn run(data: &[u8]) {
    if let Ok(resp) = pb::DiscoveryResponse::decode(data) {
        let held = HeldResources::default().with(&resp);
        check(&held);
        // A second response on top of the first (updates and removals).
        check(&held.with(&resp));
    }
    if let Ok(r) = pb::Resource::decode(data) {
        let mut held = HeldResources::default();
        held.0.insert(r.name.clone(), r);
        check(&held);
    }
}
