//! Pods without an address yet, on the agent's side. The API server learns
//! a pod's IP only after its sandbox is up, but the container runtime's CNI
//! ADD (where ferry-cni waits for the capture) comes before, carrying the
//! address the network plugin just gave the pod (`prevResult.ips`). These
//! are the pure decisions that turn that address into a workload: which
//! address the runtime's list gives ([`runtime_address`]), and how the
//! addresses an agent learned apply to a config ([`overlay`]), the control
//! plane's word winning as soon as it has one. The agent's reconciler keeps
//! the learned addresses and calls these; nothing here does I/O.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr},
};

use crate::config::ConfigFile;

/// What the runtime's addresses for a pod give.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RuntimeAddress {
    /// Exactly one IPv4 address: the pod's.
    One(Ipv4Addr),
    /// No IPv4 address (none at all, or IPv6 only).
    NoIpv4,
    /// More than one IPv4 address: which one is the pod's is not known.
    Several(Vec<Ipv4Addr>),
    /// One IPv4 address no pod can have (unspecified, loopback, multicast,
    /// broadcast).
    NotAPodAddress(Ipv4Addr),
}

/// The pod's IPv4 address from what the runtime said (`prevResult.ips`,
/// IPv6 ignored: Ferry is IPv4 only).
pub fn runtime_address(ips: &[IpAddr]) -> RuntimeAddress {
    let mut v4: Vec<Ipv4Addr> = ips
        .iter()
        .filter_map(|ip| match ip {
            IpAddr::V4(a) => Some(*a),
            IpAddr::V6(_) => None,
        })
        .collect();
    v4.dedup();
    match v4.as_slice() {
        [] => RuntimeAddress::NoIpv4,
        [a] if a.is_unspecified() || a.is_loopback() || a.is_multicast() || a.is_broadcast() => {
            RuntimeAddress::NotAPodAddress(*a)
        }
        [a] => RuntimeAddress::One(*a),
        _ => RuntimeAddress::Several(v4),
    }
}

/// What becomes of a learned address when a config is applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fate {
    /// The config has the pod pending: it is a workload at the learned address.
    Used,
    /// The config names the pod at the same address: the control plane has
    /// caught up. The learned entry is dropped (nothing else changes).
    Confirmed,
    /// The config names the pod at another address: the config's is used,
    /// the learned one dropped.
    Superseded { config: Ipv4Addr },
    /// Another pod of the config has this address (`namespace/name`): the
    /// learned one is stale, dropped, and the pod stays pending.
    Taken { by: String },
    /// The pod is neither a workload nor pending in the config (deleted, or
    /// not this node's): dropped.
    Departed,
}

impl Fate {
    /// Whether the learned entry is kept for the next config.
    pub fn keep(&self) -> bool {
        matches!(self, Fate::Used)
    }
}

/// Applies the learned addresses (pod uid -> the runtime's IPv4) to `cfg`:
/// each of this node's pending pods with one becomes a workload at it
/// ([`crate::PendingPod::at`]) and leaves `pending_pods`. Returns each
/// learned entry's fate; only [`Fate::Used`] ones are to be kept.
pub fn overlay(cfg: &mut ConfigFile, learned: &BTreeMap<String, Ipv4Addr>) -> BTreeMap<String, Fate> {
    let by_uid: HashMap<String, Ipv4Addr> = cfg.workloads.iter().map(|w| (w.uid.clone(), w.ip)).collect();
    let mut taken: HashMap<Ipv4Addr, String> = cfg.workloads.iter().map(|w| (w.ip, w.label())).collect();
    let mut fates = BTreeMap::new();
    for (uid, ip) in learned {
        let fate = if let Some(config) = by_uid.get(uid) {
            if config == ip {
                Fate::Confirmed
            } else {
                Fate::Superseded { config: *config }
            }
        } else if let Some(i) = cfg
            .pending_pods
            .iter()
            .position(|p| p.uid == *uid && p.node == cfg.node)
        {
            match taken.get(ip) {
                Some(by) => Fate::Taken { by: by.clone() },
                None => {
                    let w = cfg.pending_pods.remove(i).at(*ip);
                    taken.insert(*ip, w.label());
                    cfg.workloads.push(w);
                    Fate::Used
                }
            }
        } else {
            Fate::Departed
        };
        fates.insert(uid.clone(), fate);
    }
    fates
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_runtime_gives_one_ipv4_address_or_says_why_not() {
        let one: Ipv4Addr = "10.244.1.17".parse().unwrap();
        assert_eq!(runtime_address(&[ip("10.244.1.17")]), RuntimeAddress::One(one));
        assert_eq!(
            runtime_address(&[ip("fd00::17"), ip("10.244.1.17")]),
            RuntimeAddress::One(one),
            "IPv6 ignored"
        );
        assert_eq!(
            runtime_address(&[ip("10.244.1.17"), ip("10.244.1.17")]),
            RuntimeAddress::One(one),
            "the same address twice is one"
        );
        assert_eq!(runtime_address(&[]), RuntimeAddress::NoIpv4);
        assert_eq!(runtime_address(&[ip("fd00::17")]), RuntimeAddress::NoIpv4);
        assert_eq!(
            runtime_address(&[ip("10.244.1.17"), ip("10.244.1.18")]),
            RuntimeAddress::Several(vec![one, "10.244.1.18".parse().unwrap()])
        );
        for bad in ["0.0.0.0", "127.0.0.1", "224.0.0.1", "255.255.255.255"] {
            assert_eq!(
                runtime_address(&[ip(bad)]),
                RuntimeAddress::NotAPodAddress(bad.parse().unwrap()),
                "{bad}"
            );
        }
    }

    const CFG: &str = r#"
node: n1
workloads:
  - {uid: w1, name: web, node: n1, ip: 10.1.1.2, enrolled: true}
  - {uid: r1, name: remote, node: n2, ip: 10.1.2.2, enrolled: true}
pendingPods:
  - {uid: p1, name: fresh, namespace: shop, serviceAccount: fresh-sa, node: n1, enrolled: true,
     labels: {app: fresh}, workloadName: fresh, locality: r/z}
  - {uid: p2, name: other, node: n1, enrolled: true}
"#;

    fn learned(pairs: &[(&str, &str)]) -> BTreeMap<String, Ipv4Addr> {
        pairs.iter().map(|(u, a)| (u.to_string(), a.parse().unwrap())).collect()
    }

    #[test]
    fn a_learned_address_makes_a_pending_pod_a_workload_until_the_config_has_one() {
        let base = ConfigFile::parse("t", CFG).unwrap();
        // Pending, learned: a workload at that address, every other field
        // from the pending pod; the other pending pod stays pending.
        let mut cfg = base.clone();
        let fates = overlay(&mut cfg, &learned(&[("p1", "10.1.1.17")]));
        assert_eq!(fates, BTreeMap::from([("p1".to_string(), Fate::Used)]));
        assert!(fates["p1"].keep());
        let w = cfg.workloads.iter().find(|w| w.uid == "p1").unwrap();
        assert_eq!(w, &base.pending_pods[0].at("10.1.1.17".parse().unwrap()));
        assert_eq!(
            (
                w.label().as_str(),
                w.service_account.as_str(),
                w.workload_name(),
                w.enrolled
            ),
            ("shop/fresh", "fresh-sa", "fresh", true)
        );
        let pending: Vec<&str> = cfg.pending_pods.iter().map(|p| p.uid.as_str()).collect();
        assert_eq!(pending, ["p2"]);
        assert!(cfg.validate().is_empty(), "{:?}", cfg.validate());
        // Nothing learned: nothing changes.
        let mut same = base.clone();
        assert!(overlay(&mut same, &BTreeMap::new()).is_empty());
        assert_eq!(same, base);
    }

    #[test]
    fn the_control_planes_word_wins_and_stale_entries_go() {
        let base = ConfigFile::parse("t", CFG).unwrap();
        // The config now has p1 at the same address: confirmed; at another: superseded.
        let with_ip = |addr: &str| {
            let mut c = base.clone();
            let p = c.pending_pods.remove(0);
            c.workloads.push(p.at(addr.parse().unwrap()));
            c
        };
        let mut c = with_ip("10.1.1.17");
        let before = c.clone();
        let fates = overlay(&mut c, &learned(&[("p1", "10.1.1.17")]));
        assert_eq!(fates["p1"], Fate::Confirmed);
        assert!(!fates["p1"].keep());
        assert_eq!(c, before, "the config as it is");
        let mut c = with_ip("10.1.1.18");
        let fates = overlay(&mut c, &learned(&[("p1", "10.1.1.17")]));
        assert_eq!(
            fates["p1"],
            Fate::Superseded {
                config: "10.1.1.18".parse().unwrap()
            }
        );
        assert_eq!(
            c.workloads.iter().find(|w| w.uid == "p1").unwrap().ip.to_string(),
            "10.1.1.18"
        );
        // Gone from the config: departed. An address another pod has: taken,
        // and the pod stays pending (two workloads never share one).
        let mut c = base.clone();
        let fates = overlay(
            &mut c,
            &learned(&[("p1", "10.1.2.2"), ("p2", "10.1.1.30"), ("gone", "10.1.1.40")]),
        );
        assert_eq!(
            fates,
            BTreeMap::from([
                ("gone".to_string(), Fate::Departed),
                (
                    "p1".to_string(),
                    Fate::Taken {
                        by: "default/remote".into()
                    }
                ),
                ("p2".to_string(), Fate::Used),
            ])
        );
        assert!(c.pending_pods.iter().any(|p| p.uid == "p1"));
        assert!(c.validate().is_empty(), "{:?}", c.validate());
        // Two pending pods learned at one address: the first (by uid) gets it.
        let mut c = base.clone();
        let fates = overlay(&mut c, &learned(&[("p1", "10.1.1.50"), ("p2", "10.1.1.50")]));
        assert_eq!(fates["p1"], Fate::Used);
        assert_eq!(
            fates["p2"],
            Fate::Taken {
                by: "shop/fresh".into()
            }
        );
        assert!(c.validate().is_empty(), "{:?}", c.validate());
    }
}
