//! Which Service port each app port of this node's enrolled pods serves,
//! found once per state snapshot ([`AppPorts::of`]): the destination side
//! decides by it whether an inbound connection is served per request as
//! HTTP (the port's protocol) and which Service its metrics name.

use std::{
    collections::{HashMap, HashSet},
    net::{Ipv4Addr, SocketAddrV4},
};

use ferry_model::{state::State, Protocol};

/// The Service behind one pod address and app port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppPort {
    /// `namespace/name`.
    pub service: String,
    /// The Service port's protocol (`appProtocol` or name prefix).
    pub protocol: Protocol,
}

impl AppPort {
    pub fn is_http(&self) -> bool {
        self.protocol.is_http()
    }
}

/// (local pod IP, target port) -> the Service port that targets it.
#[derive(Debug, Default)]
pub struct AppPorts(HashMap<SocketAddrV4, AppPort>);

impl AppPorts {
    /// The app ports of `state`'s local enrolled pods: for each, the first
    /// Service (in the snapshot's order) whose endpoints include the pod
    /// and one of whose ports targets that port. Services that disagree on
    /// a port's protocol are resolved by that order.
    pub fn of(state: &State) -> Self {
        let local: HashSet<Ipv4Addr> = state.local_enrolled().map(|w| w.ip).collect();
        let mut m = HashMap::new();
        if local.is_empty() {
            return Self(m);
        }
        for s in &state.services {
            let key = format!("{}/{}", s.namespace, s.name);
            for e in s.endpoints.iter().filter(|e| local.contains(&e.ip)) {
                for p in &s.ports {
                    m.entry(SocketAddrV4::new(e.ip, p.target_port))
                        .or_insert_with(|| AppPort {
                            service: key.clone(),
                            protocol: p.protocol,
                        });
                }
            }
        }
        Self(m)
    }

    /// The Service port behind `target` (a local pod's address and app port).
    pub fn get(&self, target: SocketAddrV4) -> Option<&AppPort> {
        self.0.get(&target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_service_targeting_a_local_pod_port_wins() {
        let cfg: ferry_model::ConfigFile = ferry_model::ConfigFile::parse(
            "t",
            "node: n1
workloads:
  - {uid: a, name: a, node: n1, ip: 10.0.0.2, enrolled: true}
  - {uid: b, name: b, node: n2, ip: 10.0.1.2, enrolled: true}
services:
  - {name: web, vip: 10.96.0.1, ports: [{port: 80, targetPort: 8080, protocol: http}], endpoints: [{ip: 10.0.0.2}, {ip: 10.0.1.2}]}
  - {name: raw, vip: 10.96.0.2, ports: [{port: 81, targetPort: 8080, protocol: tcp}, {port: 9000, targetPort: 9000, protocol: tcp}], endpoints: [{ip: 10.0.0.2}]}
",
        )
        .unwrap();
        let p = AppPorts::of(&State::from_config(cfg, 1));
        let at = |s: &str| p.get(s.parse().unwrap()).cloned();
        assert_eq!(
            at("10.0.0.2:8080"),
            Some(AppPort {
                service: "default/web".into(),
                protocol: Protocol::Http
            })
        );
        assert!(at("10.0.0.2:8080").unwrap().is_http());
        assert_eq!(at("10.0.0.2:9000").unwrap().service, "default/raw");
        assert_eq!(at("10.0.0.2:9001"), None, "no Service targets it");
        assert_eq!(at("10.0.1.2:8080"), None, "not a pod of this node");
    }
}
