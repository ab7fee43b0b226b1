//! The config stream's wire messages (api/proto/ferry/discovery.proto) and
//! the model, both ways: the control plane encodes with the `*_to`
//! functions; an agent keeps the resources it holds ([`HeldResources`]),
//! applies a response to them and turns them back into a validated config
//! (a rejected response leaves the previous state).

use std::{collections::BTreeMap, net::Ipv4Addr};

use ferry_api::discovery as pb;
use sha2::{Digest, Sha256};

use crate::{
    config::{ConfigFile, Endpoint, Service, ServicePort, Settings, Workload},
    peer_auth::{self as policy, PeerAuthentication},
    protocol::Protocol,
};

/// Resource name prefixes (one per kind).
pub const WORKLOAD: &str = "workload/";
pub const SERVICE: &str = "service/";
pub const PEER_AUTHENTICATION: &str = "peerauthentication/";

/// The resources a node holds, by name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HeldResources(pub BTreeMap<String, pb::Resource>);

impl HeldResources {
    /// Name -> version: what a reconnecting agent tells the control plane.
    pub fn versions(&self) -> BTreeMap<String, String> {
        self.0.iter().map(|(n, r)| (n.clone(), r.version.clone())).collect()
    }

    /// The resources after `resp` (checked by [`HeldResources::to_config`]).
    pub fn with(&self, resp: &pb::DiscoveryResponse) -> Self {
        let mut next = self.clone();
        for name in &resp.removed {
            next.0.remove(name);
        }
        for r in &resp.resources {
            next.0.insert(r.name.clone(), r.clone());
        }
        next
    }

    /// The node's config: these resources plus its local settings. Every
    /// problem is listed (a NACK carries them all).
    pub fn to_config(&self, node: &str, settings: &Settings) -> Result<ConfigFile, Vec<String>> {
        let mut cfg = ConfigFile {
            node: node.to_owned(),
            settings: settings.clone(),
            ..Default::default()
        };
        let mut problems = Vec::new();
        for (name, r) in &self.0 {
            let res = match &r.kind {
                Some(pb::resource::Kind::Workload(w)) => workload_from(w).map(|w| cfg.workloads.push(w)),
                Some(pb::resource::Kind::Service(s)) => service_from(s).map(|s| cfg.services.push(s)),
                Some(pb::resource::Kind::PeerAuthentication(p)) => {
                    peer_authentication_from(p).map(|p| cfg.peer_authentications.push(p))
                }
                None => Err("no content (unknown kind?)".to_owned()),
            };
            if let Err(e) = res {
                problems.push(format!("{name}: {e}"));
            }
        }
        problems.extend(cfg.validate());
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(problems)
        }
    }
}

/// A resource with its name and content digest filled in.
pub fn resource(kind: pb::resource::Kind) -> pb::Resource {
    use prost::Message;
    let name = match &kind {
        pb::resource::Kind::Workload(w) => format!("{WORKLOAD}{}", w.uid),
        pb::resource::Kind::Service(s) => format!("{SERVICE}{}/{}", s.namespace, s.name),
        pb::resource::Kind::PeerAuthentication(p) => format!("{PEER_AUTHENTICATION}{}/{}", p.namespace, p.name),
    };
    let mut r = pb::Resource {
        name,
        version: String::new(),
        kind: Some(kind),
    };
    // Maps encode in key order (btree_map in api/build.rs): equal content, equal digest.
    let digest = Sha256::digest(r.encode_to_vec());
    r.version = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    r
}

pub fn workload_to(w: &Workload) -> pb::resource::Kind {
    pb::resource::Kind::Workload(pb::Workload {
        uid: w.uid.clone(),
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        service_account: w.service_account.clone(),
        node: w.node.clone(),
        ip: w.ip.to_string(),
        enrolled: w.enrolled,
        labels: w.labels.clone(),
    })
}

fn ip(what: &str, s: &str) -> Result<Ipv4Addr, String> {
    s.parse().map_err(|_| format!("{what}: {s:?} is not an IPv4 address"))
}

fn port(what: &str, p: u32) -> Result<u16, String> {
    u16::try_from(p)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{what}: {p} is not a port"))
}

fn workload_from(w: &pb::Workload) -> Result<Workload, String> {
    Ok(Workload {
        uid: w.uid.clone(),
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        service_account: w.service_account.clone(),
        node: w.node.clone(),
        ip: ip("ip", &w.ip)?,
        enrolled: w.enrolled,
        labels: w.labels.clone(),
        // Found on the node from the pod's cgroup (its processes' netns).
        netns: None,
        host_veth: None,
    })
}

pub fn service_to(s: &Service) -> pb::resource::Kind {
    pb::resource::Kind::Service(pb::Service {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        vip: s.vip.to_string(),
        ports: s
            .ports
            .iter()
            .map(|p| pb::ServicePort {
                port: p.port.into(),
                target_port: p.target_port.into(),
                name: p.name.clone().unwrap_or_default(),
                protocol: p.protocol.as_str().to_owned(),
            })
            .collect(),
        endpoints: s
            .endpoints
            .iter()
            .map(|e| pb::Endpoint {
                ip: e.ip.to_string(),
                ready: e.ready,
            })
            .collect(),
    })
}

fn service_from(s: &pb::Service) -> Result<Service, String> {
    let ports = s
        .ports
        .iter()
        .map(|p| {
            Ok(ServicePort {
                port: port("port", p.port)?,
                target_port: port("targetPort", p.target_port)?,
                name: (!p.name.is_empty()).then(|| p.name.clone()),
                // Empty: from a control plane that did not send one.
                protocol: match p.protocol.as_str() {
                    "" => Protocol::Auto,
                    other => other
                        .parse()
                        .map_err(|e: crate::protocol::UnknownProtocol| format!("port {}: {e}", p.port))?,
                },
            })
        })
        .collect::<Result<_, String>>()?;
    let endpoints = s
        .endpoints
        .iter()
        .map(|e| {
            Ok(Endpoint {
                ip: ip("endpoint", &e.ip)?,
                ready: e.ready,
            })
        })
        .collect::<Result<_, String>>()?;
    Ok(Service {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        vip: ip("vip", &s.vip)?,
        ports,
        endpoints,
    })
}

fn mode_name(m: policy::Mode) -> String {
    match m {
        policy::Mode::Unset => "UNSET",
        policy::Mode::Permissive => "PERMISSIVE",
        policy::Mode::Strict => "STRICT",
        policy::Mode::Disable => "DISABLE",
    }
    .into()
}

fn mode_from(s: &str) -> Result<policy::Mode, String> {
    Ok(match s {
        "" | "UNSET" => policy::Mode::Unset,
        "PERMISSIVE" => policy::Mode::Permissive,
        "STRICT" => policy::Mode::Strict,
        "DISABLE" => policy::Mode::Disable,
        other => return Err(format!("mode {other:?} is not UNSET, PERMISSIVE, STRICT or DISABLE")),
    })
}

pub fn peer_authentication_to(p: &PeerAuthentication) -> pb::resource::Kind {
    pb::resource::Kind::PeerAuthentication(pb::PeerAuthentication {
        name: p.metadata.name.clone(),
        namespace: p.namespace().to_owned(),
        match_labels: p
            .spec
            .selector
            .as_ref()
            .map(|s| s.match_labels.clone())
            .unwrap_or_default(),
        mode: mode_name(p.spec.mtls.as_ref().map_or(policy::Mode::Unset, |m| m.mode)),
        port_level_modes: p
            .spec
            .port_level_mtls
            .iter()
            .map(|(k, m)| (k.clone(), mode_name(m.mode)))
            .collect(),
    })
}

fn peer_authentication_from(p: &pb::PeerAuthentication) -> Result<PeerAuthentication, String> {
    let mut port_level_mtls = BTreeMap::new();
    for (k, m) in &p.port_level_modes {
        port_level_mtls.insert(k.clone(), policy::Mtls { mode: mode_from(m)? });
    }
    Ok(PeerAuthentication {
        api_version: "security.istio.io/v1beta1".into(),
        kind: "PeerAuthentication".into(),
        metadata: policy::Metadata {
            name: p.name.clone(),
            namespace: Some(p.namespace.clone()),
            ..Default::default()
        },
        spec: policy::PeerAuthenticationSpec {
            // An empty selector in Istio means the whole namespace, as does none.
            selector: (!p.match_labels.is_empty()).then(|| policy::Selector {
                match_labels: p.match_labels.clone(),
            }),
            mtls: Some(policy::Mtls {
                mode: mode_from(&p.mode)?,
            }),
            port_level_mtls,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ConfigFile {
        ConfigFile::parse(
            "t",
            r#"
node: n1
workloads:
  - {uid: a, name: client, node: n1, ip: 10.1.1.2, enrolled: true, labels: {app: c, version: v1}}
services:
  - name: echo
    vip: 10.96.0.10
    ports: [{port: 80, targetPort: 8080, name: http, protocol: http}, {port: 81, targetPort: 81}]
    endpoints: [{ip: 10.1.2.2}, {ip: 10.1.2.3, ready: false}]
peerAuthentications:
  - metadata: {name: d, namespace: shop}
    spec: {selector: {matchLabels: {app: pay}}, mtls: {mode: STRICT}, portLevelMtls: {"8080": {mode: PERMISSIVE}}}
"#,
        )
        .unwrap()
    }

    fn resources(c: &ConfigFile) -> HeldResources {
        let mut r = HeldResources::default();
        let all = c
            .workloads
            .iter()
            .map(workload_to)
            .chain(c.services.iter().map(service_to))
            .chain(c.peer_authentications.iter().map(peer_authentication_to));
        for k in all {
            let res = resource(k);
            r.0.insert(res.name.clone(), res);
        }
        r
    }

    #[test]
    fn round_trips_through_the_wire_types() {
        let c = cfg();
        let back = resources(&c).to_config("n1", &c.settings).unwrap();
        assert_eq!(back.workloads, c.workloads);
        assert_eq!(back.services, c.services);
        assert_eq!(
            back.peer_authentications[0].spec.selector,
            c.peer_authentications[0].spec.selector
        );
        assert_eq!(
            policy::mode_for(&c.workloads[0], &back.peer_authentications),
            policy::mode_for(&c.workloads[0], &c.peer_authentications)
        );
        assert_eq!(
            back.peer_authentications[0].spec.port_level_mtls,
            c.peer_authentications[0].spec.port_level_mtls
        );
    }

    #[test]
    fn an_unknown_protocol_on_the_wire_is_a_problem() {
        let c = cfg();
        let mut held = resources(&c);
        let r = held.0.get_mut("service/default/echo").unwrap();
        if let Some(pb::resource::Kind::Service(s)) = &mut r.kind {
            s.ports[0].protocol = "smtp".into();
        }
        let problems = held.to_config("n1", &c.settings).unwrap_err();
        assert!(
            problems
                .iter()
                .any(|p| p.contains("service/default/echo: port 80: \"smtp\" is not a protocol")),
            "{problems:?}"
        );
    }

    #[test]
    fn versions_are_content_digests() {
        let c = cfg();
        let a = resources(&c);
        let b = resources(&c);
        assert_eq!(a.versions(), b.versions(), "same content, same versions");
        let mut c2 = c.clone();
        c2.services[0].endpoints.pop();
        let d = resources(&c2);
        let changed: Vec<_> = a
            .versions()
            .into_iter()
            .filter(|(n, v)| d.versions()[n] != *v)
            .collect();
        assert_eq!(changed.len(), 1, "{changed:?}");
        assert_eq!(changed[0].0, "service/default/echo");
    }

    #[test]
    fn a_response_is_validated_as_a_whole() {
        let c = cfg();
        let held = resources(&c);
        // A second workload with the same IP, and a garbage address: both reported.
        let mut w = c.workloads[0].clone();
        w.uid = "b".into();
        let bad = resource(workload_to(&w));
        let mut garbage = resource(workload_to(&w));
        garbage.name = "workload/c".into();
        if let Some(pb::resource::Kind::Workload(w)) = &mut garbage.kind {
            w.uid = "c".into();
            w.ip = "10.1.1.999".into();
        }
        let resp = pb::DiscoveryResponse {
            nonce: "1".into(),
            system_version: 2,
            resources: vec![bad, garbage],
            removed: vec![],
        };
        let problems = held.with(&resp).to_config("n1", &c.settings).unwrap_err();
        assert!(
            problems.iter().any(|p| p.contains("workload/c: ip: \"10.1.1.999\"")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.contains("10.1.1.2 already used")),
            "{problems:?}"
        );
        // Removal works and the held set is untouched by a rejected response.
        let resp = pb::DiscoveryResponse {
            removed: vec!["service/default/echo".into()],
            ..Default::default()
        };
        assert!(held
            .with(&resp)
            .to_config("n1", &c.settings)
            .unwrap()
            .services
            .is_empty());
        assert_eq!(held, resources(&c));
    }
}
