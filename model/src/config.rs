//! An agent's configuration: the node's settings and the cluster state it
//! needs. Standalone agents read all of it from a file; with the control
//! plane, the file holds the settings and the config stream builds the rest
//! in this same shape (`crate::proto`), validated the same way.
//!
//! Parsing collects every problem before reporting, each with its path.

use std::{collections::BTreeMap, fmt, net::Ipv4Addr, path::PathBuf};

pub use crate::workload::{Endpoint, PendingPod, Service, ServicePort, Workload};

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConfigFile {
    /// This agent's node name; workloads on other nodes are reached by tunnel.
    pub node: String,
    #[serde(default)]
    pub settings: Settings,
    #[serde(default)]
    pub workloads: Vec<Workload>,
    /// This node's pods that have no address in the API server yet
    /// ([`PendingPod`]); a pod is a workload or pending, never both.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending_pods: Vec<PendingPod>,
    #[serde(default)]
    pub services: Vec<Service>,
    /// Istio `PeerAuthentication` objects, as is (STRICT/PERMISSIVE per namespace or workload).
    #[serde(default)]
    pub peer_authentications: Vec<crate::peer_auth::PeerAuthentication>,
    /// Per-Service L7/L4 routes (compiled by the control plane from
    /// VirtualServices/DestinationRules or Gateway API routes).
    #[serde(default)]
    pub routes: Vec<crate::route::ServiceRouting>,
    /// Istio `AuthorizationPolicy` objects (`docs/security.md`): enforced by
    /// the destination's agent on every inbound connection.
    #[serde(default)]
    pub authorization_policies: Vec<crate::authz::AuthzPolicy>,
    /// Per-Service traffic policy (compiled by the control plane from
    /// DestinationRule `trafficPolicy`): balancing, connection-pool limits,
    /// outlier detection (docs/traffic-management.md).
    #[serde(default)]
    pub traffic_policies: Vec<crate::traffic::ServiceTrafficPolicy>,
    /// Ferry `RateLimitPolicy` objects: enforced per request by the agent
    /// of each pod backing the Service (`ferry_model::ratelimit`).
    #[serde(default)]
    pub rate_limits: Vec<crate::ratelimit::RateLimitPolicy>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Settings {
    /// sk_msg splicing of app <-> agent loopback pairs (off: see docs/architecture.md).
    #[serde(default)]
    pub splice: bool,
    /// Per-connection eBPF events (redirect, inbound) as tracing events.
    #[serde(default = "yes")]
    pub events: bool,
    /// Where pod cgroups live (kubelet layout: a dir named after the pod UID below it).
    #[serde(default)]
    pub cgroup_root: Option<PathBuf>,
    /// Access logs: `mode: off|sampled|full`, `sampleRate`, per-namespace `namespaces`.
    #[serde(default)]
    pub access_log: crate::access_log::AccessLog,
    /// Istio-standard per-connection metrics (label lookups per connection);
    /// off only to measure their cost.
    #[serde(default = "yes")]
    pub metrics: bool,
    /// This node's own addresses. Accepted for compatibility; no longer a
    /// STRICT bypass: kubelet probes are recognised by their source
    /// `169.254.7.127` (`admission::PROBE_SOURCE`), and plaintext from the
    /// node's addresses (hostNetwork pods, SNATed traffic) is refused under
    /// STRICT like any other (docs/identity.md, "Fail closed").
    #[serde(default)]
    pub node_addresses: Vec<Ipv4Addr>,
    /// Distributed tracing of the L7 path (docs/telemetry.md, "Tracing"):
    /// spans exported with OTLP/gRPC to `endpoint`; absent: no spans, and
    /// trace headers pass through untouched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<TracingSettings>,
    /// Concurrent proxied connections one enrolled pod may have (accepted
    /// on its outbound, inbound and tunnel listeners together); over it a
    /// new connection is closed at once and counted
    /// (`ferry_connections_refused_total{reason="pod_limit"}`). Default 10000.
    #[serde(default = "default_max_connections_per_pod")]
    pub max_connections_per_pod: u32,
    /// Concurrent proxied connections of the whole agent (every pod);
    /// over it: closed, `reason="agent_limit"`. Default 100000.
    #[serde(default = "default_max_connections_per_agent")]
    pub max_connections_per_agent: u32,
}

fn default_max_connections_per_pod() -> u32 {
    10_000
}

fn default_max_connections_per_agent() -> u32 {
    100_000
}

/// `settings.tracing`: where spans go and how many traces are sampled.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TracingSettings {
    /// The OTLP/gRPC collector, `http://host:port` (or `https://`).
    pub endpoint: String,
    /// The share of new traces sampled, 0 to 1 (default 0.01, Istio's 1 %);
    /// a request that arrives with a sampling decision keeps it.
    #[serde(default = "default_sample_rate")]
    pub sample_rate: f64,
    /// The `service.name` of every span; default: the pod's canonical
    /// service and namespace (`productpage.default`), as Istio reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_name: Option<String>,
}

fn default_sample_rate() -> f64 {
    0.01
}

impl TracingSettings {
    /// Every problem, each with its path under `settings.tracing`.
    pub fn validate(&self) -> Vec<String> {
        let mut p = Vec::new();
        if !(0.0..=1.0).contains(&self.sample_rate) {
            p.push(format!(
                "settings.tracing.sampleRate: {} is not between 0 and 1",
                self.sample_rate
            ));
        }
        let rest = self
            .endpoint
            .strip_prefix("http://")
            .or_else(|| self.endpoint.strip_prefix("https://"));
        let host = rest.map(|r| r.split('/').next().unwrap_or_default());
        match host {
            None => p.push(format!(
                "settings.tracing.endpoint: {:?} is not an http:// or https:// URL",
                self.endpoint
            )),
            Some(h)
                if h.is_empty()
                    || h.starts_with(':')
                    || self.endpoint.chars().any(|c| c.is_whitespace() || c.is_control()) =>
            {
                p.push(format!(
                    "settings.tracing.endpoint: {:?} has no valid host",
                    self.endpoint
                ))
            }
            Some(_) => {}
        }
        if self.service_name.as_deref().is_some_and(str::is_empty) {
            p.push("settings.tracing.serviceName: must not be empty when set".into());
        }
        p
    }
}

pub(crate) fn yes() -> bool {
    true
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            splice: false,
            events: true,
            cgroup_root: None,
            access_log: Default::default(),
            node_addresses: Vec::new(),
            metrics: true,
            tracing: None,
            max_connections_per_pod: default_max_connections_per_pod(),
            max_connections_per_agent: default_max_connections_per_agent(),
        }
    }
}

/// Where the agent finds its node's own addresses (`Settings::add_node_addresses`):
/// the downward API's `status.hostIPs` (comma-separated, dual-stack) and
/// `status.hostIP`.
pub const NODE_IPS_ENV: &str = "NODE_IPS";
pub const NODE_IP_ENV: &str = "NODE_IP";

impl Settings {
    /// Adds the node's own addresses as the environment gives them
    /// (`node_ips`: [`NODE_IPS_ENV`], else `node_ip`: [`NODE_IP_ENV`]) to
    /// `nodeAddresses`, after any the file lists, so no per-node file has to
    /// list them. IPv6 addresses are skipped (`nodeAddresses` holds IPv4).
    /// Returns what was not used, one line each.
    pub fn add_node_addresses(&mut self, node_ips: Option<&str>, node_ip: Option<&str>) -> Vec<String> {
        let (var, value) = match (node_ips.filter(|v| !v.trim().is_empty()), node_ip) {
            (Some(v), _) => (NODE_IPS_ENV, v),
            (None, Some(v)) => (NODE_IP_ENV, v),
            (None, None) => return Vec::new(),
        };
        let mut unused = Vec::new();
        for a in value
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|a| !a.is_empty())
        {
            match a.parse::<std::net::IpAddr>() {
                Ok(std::net::IpAddr::V4(ip)) if !self.node_addresses.contains(&ip) => self.node_addresses.push(ip),
                Ok(std::net::IpAddr::V4(_)) => {}
                Ok(std::net::IpAddr::V6(ip)) => unused.push(format!("{var}: {ip} skipped (nodeAddresses holds IPv4)")),
                Err(_) => unused.push(format!("{var}: {a:?} is not an IP address")),
            }
        }
        unused
    }
}

/// Every problem found in a config, with where it is.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub source_name: String,
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid config {}:", self.source_name)?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

impl ConfigFile {
    pub fn parse(source_name: &str, text: &str) -> Result<Self, ConfigError> {
        let err = |problems| ConfigError {
            source_name: source_name.to_owned(),
            problems,
        };
        let cfg: ConfigFile = serde_norway::from_str(text).map_err(|e| err(vec![e.to_string()]))?;
        let problems = cfg.validate();
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(err(problems))
        }
    }

    /// Semantic checks serde cannot express. Returns every problem.
    pub fn validate(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.node.is_empty() {
            p.push("node: must not be empty".into());
        }
        let mut uids = BTreeMap::new();
        let mut ips = BTreeMap::new();
        for (i, w) in self.workloads.iter().enumerate() {
            let at = format!("workloads[{i}] ({}/{})", w.namespace, w.name);
            if w.uid.is_empty() {
                p.push(format!("{at}.uid: must not be empty"));
            }
            if let Some(j) = uids.insert(w.uid.as_str(), i) {
                p.push(format!("{at}.uid: {:?} already used by workloads[{j}]", w.uid));
            }
            if let Some(j) = ips.insert(w.ip, i) {
                p.push(format!("{at}.ip: {} already used by workloads[{j}]", w.ip));
            }
            if w.ip.is_unspecified() || w.ip.is_loopback() || w.ip.is_multicast() {
                p.push(format!("{at}.ip: {} is not a pod address", w.ip));
            }
            if w.node.is_empty() {
                p.push(format!("{at}.node: must not be empty"));
            }
            if w.workload_name.as_deref().is_some_and(str::is_empty) {
                p.push(format!("{at}.workloadName: must not be empty when set"));
            }
        }
        for (i, pp) in self.pending_pods.iter().enumerate() {
            let at = format!("pendingPods[{i}] ({}/{})", pp.namespace, pp.name);
            if pp.uid.is_empty() {
                p.push(format!("{at}.uid: must not be empty"));
            }
            if let Some(j) = uids.get(pp.uid.as_str()) {
                p.push(format!("{at}.uid: {:?} already used by workloads[{j}]", pp.uid));
            }
            if let Some(j) = self.pending_pods[..i].iter().position(|o| o.uid == pp.uid) {
                p.push(format!("{at}.uid: {:?} already used by pendingPods[{j}]", pp.uid));
            }
            if pp.node != self.node {
                p.push(format!(
                    "{at}.node: {:?} is not this node ({:?}); a pod without an address goes to its own node only",
                    pp.node, self.node
                ));
            }
            if pp.workload_name.as_deref().is_some_and(str::is_empty) {
                p.push(format!("{at}.workloadName: must not be empty when set"));
            }
        }
        let rate = self.settings.access_log.sample_rate;
        if !(0.0..=1.0).contains(&rate) {
            p.push(format!("settings.accessLog.sampleRate: {rate} is not between 0 and 1"));
        }
        if let Some(t) = &self.settings.tracing {
            p.extend(t.validate());
        }
        let (per_pod, per_agent) = (
            self.settings.max_connections_per_pod,
            self.settings.max_connections_per_agent,
        );
        if per_pod == 0 {
            p.push("settings.maxConnectionsPerPod: must be at least 1".into());
        }
        if per_agent == 0 {
            p.push("settings.maxConnectionsPerAgent: must be at least 1".into());
        }
        if per_pod > per_agent {
            p.push(format!(
                "settings.maxConnectionsPerPod: {per_pod} is more than settings.maxConnectionsPerAgent ({per_agent})"
            ));
        }
        let mut vips = BTreeMap::new();
        for (i, s) in self.services.iter().enumerate() {
            let at = format!("services[{i}] ({}/{})", s.namespace, s.name);
            if let Some(j) = vips.insert(s.vip, i) {
                p.push(format!("{at}.vip: {} already used by services[{j}]", s.vip));
            }
            if ips.contains_key(&s.vip) {
                p.push(format!("{at}.vip: {} is also a workload address", s.vip));
            }
            if s.ports.is_empty() {
                p.push(format!("{at}.ports: at least one port is required"));
            }
            for (k, port) in s.ports.iter().enumerate() {
                if port.port == 0 || port.target_port == 0 {
                    p.push(format!("{at}.ports[{k}]: port and targetPort must be 1-65535"));
                }
                if s.ports[..k].iter().any(|o| o.port == port.port) {
                    p.push(format!("{at}.ports[{k}].port: {} listed twice", port.port));
                }
            }
        }
        let mut routed = BTreeMap::new();
        for (i, r) in self.routes.iter().enumerate() {
            if let Some(j) = routed.insert(r.service.as_str(), i) {
                p.push(format!(
                    "routes[{i}].service: {:?} already routed by routes[{j}]",
                    r.service
                ));
            }
            for (k, h) in r.http.iter().enumerate() {
                if h.backends.is_empty() && h.redirect.is_none() {
                    p.push(format!("routes[{i}].http[{k}]: no backend and no redirect"));
                }
            }
        }
        let mut shaped = BTreeMap::new();
        for (i, t) in self.traffic_policies.iter().enumerate() {
            if let Some(j) = shaped.insert(t.service.as_str(), i) {
                p.push(format!(
                    "trafficPolicies[{i}].service: {:?} already has trafficPolicies[{j}]",
                    t.service
                ));
            }
        }
        let mut policies = BTreeMap::new();
        for (i, a) in self.authorization_policies.iter().enumerate() {
            let at = format!("authorizationPolicies[{i}] ({}/{})", a.namespace, a.name);
            if a.name.is_empty() || a.namespace.is_empty() {
                p.push(format!("{at}: name and namespace must not be empty"));
            }
            if let Some(j) = policies.insert((a.namespace.as_str(), a.name.as_str()), i) {
                p.push(format!("{at}: already defined by authorizationPolicies[{j}]"));
            }
            p.extend(crate::authz::validate(a).into_iter().map(|e| format!("{at}.{e}")));
        }
        p.extend(crate::ratelimit::validate_all(&self.rate_limits));
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
node: n1
workloads:
  - {uid: a, name: client, node: n1, ip: 10.1.1.2, enrolled: true}
  - {uid: b, name: server, node: n2, ip: 10.1.2.2}
services:
  - name: echo
    vip: 10.96.0.10
    ports: [{port: 80, targetPort: 8080}]
    endpoints: [{ip: 10.1.2.2}]
"#;

    #[test]
    fn node_addresses_come_from_the_environment_when_no_file_lists_them() {
        let v4 = |s: &Settings| s.node_addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        // None listed: the downward API's addresses (dual-stack: the IPv4 one).
        let mut s = Settings::default();
        assert_eq!(
            s.add_node_addresses(Some("10.0.0.5,fd00::5"), Some("10.0.0.5")),
            ["NODE_IPS: fd00::5 skipped (nodeAddresses holds IPv4)"]
        );
        assert_eq!(v4(&s), ["10.0.0.5"]);
        // Only status.hostIP (clusters before hostIPs, or an empty NODE_IPS).
        let mut s = Settings::default();
        assert!(s.add_node_addresses(Some(""), Some("10.0.0.6")).is_empty());
        assert_eq!(v4(&s), ["10.0.0.6"]);
        // Listed in the file: kept first, the node's own added once.
        let mut s = ConfigFile::parse("t", "node: n1\nsettings: {nodeAddresses: [10.244.1.1, 10.0.0.5]}\n")
            .unwrap()
            .settings;
        assert!(s.add_node_addresses(Some("10.0.0.5"), None).is_empty());
        assert_eq!(v4(&s), ["10.244.1.1", "10.0.0.5"]);
        // Nothing in the environment: as the file says.
        let mut s = Settings::default();
        assert!(s.add_node_addresses(None, None).is_empty());
        assert!(s.node_addresses.is_empty());
        // Garbage is reported, not used.
        let mut s = Settings::default();
        assert_eq!(
            s.add_node_addresses(None, Some("node-1")),
            ["NODE_IP: \"node-1\" is not an IP address"]
        );
        assert!(s.node_addresses.is_empty());
    }

    #[test]
    fn parses_a_good_file() {
        let c = ConfigFile::parse("good", GOOD).unwrap();
        assert_eq!(c.workloads.len(), 2);
        assert!(c.workloads[0].enrolled && !c.workloads[1].enrolled);
        assert!(c.services[0].endpoints[0].ready);
        assert!(!c.settings.splice);
    }

    #[test]
    fn reports_every_problem_with_its_path() {
        let bad = r#"
node: n1
workloads:
  - {uid: a, name: x, node: n1, ip: 10.1.1.2}
  - {uid: a, name: y, node: n1, ip: 10.1.1.2}
services:
  - {name: s, vip: 10.1.1.2, ports: [{port: 0, targetPort: 1}]}
"#;
        let e = ConfigFile::parse("bad", bad).unwrap_err();
        let all = e.to_string();
        assert_eq!(e.problems.len(), 4, "{all}");
        assert!(all.contains("workloads[1] (default/y).uid"), "{all}");
        assert!(all.contains("workloads[1] (default/y).ip"), "{all}");
        assert!(all.contains("services[0] (default/s).vip"), "{all}");
        assert!(all.contains("services[0] (default/s).ports[0]"), "{all}");
    }

    #[test]
    fn pending_pods_are_this_nodes_and_never_also_workloads() {
        let ok = "node: n1\nworkloads: [{uid: a, name: client, node: n1, ip: 10.1.1.2}]\npendingPods: [{uid: p, name: fresh, node: n1, enrolled: true}]\n";
        let c = ConfigFile::parse("ok", ok).unwrap();
        assert_eq!(c.pending_pods[0].label(), "default/fresh");
        assert_eq!(c.pending_pods[0].service_account, "default");
        assert!(
            !serde_norway::to_string(&ConfigFile::parse("none", "node: n1\n").unwrap())
                .unwrap()
                .contains("pendingPods"),
            "written only when there are some"
        );
        let bad = r#"
node: n1
workloads: [{uid: a, name: client, node: n1, ip: 10.1.1.2}]
pendingPods:
  - {uid: a, name: client, node: n1}
  - {uid: p, name: x, node: n2}
  - {uid: p, name: y, node: n1, workloadName: ""}
  - {uid: "", name: z, node: n1}
"#;
        let e = ConfigFile::parse("bad", bad).unwrap_err();
        let all = e.to_string();
        assert_eq!(e.problems.len(), 5, "{all}");
        for want in [
            "pendingPods[0] (default/client).uid: \"a\" already used by workloads[0]",
            "pendingPods[1] (default/x).node: \"n2\" is not this node (\"n1\")",
            "pendingPods[2] (default/y).uid: \"p\" already used by pendingPods[1]",
            "pendingPods[2] (default/y).workloadName: must not be empty when set",
            "pendingPods[3] (default/z).uid: must not be empty",
        ] {
            assert!(all.contains(want), "{want}: {all}");
        }
        let e = ConfigFile::parse(
            "x",
            "node: n1\npendingPods: [{uid: p, name: x, node: n1, ip: 10.1.1.9}]\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown field `ip`"), "{e}");
    }

    #[test]
    fn workload_names_are_optional_and_not_empty() {
        let c = ConfigFile::parse("old", GOOD).unwrap();
        assert_eq!(c.workloads[0].workload_name, None, "files without it still parse");
        assert_eq!(c.workloads[0].workload_name(), "client");
        let named = GOOD.replace("name: client,", "name: client-6f7b8c9d4-x2x9z, workloadName: client,");
        let c = ConfigFile::parse("named", &named).unwrap();
        assert_eq!(c.workloads[0].workload_name(), "client");
        let e = ConfigFile::parse(
            "empty",
            &GOOD.replace("name: client,", "name: client, workloadName: \"\","),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("workloads[0] (default/client).workloadName: must not be empty when set"),
            "{e}"
        );
    }

    #[test]
    fn rejects_unknown_fields_and_wrong_types() {
        let e = ConfigFile::parse("x", "node: n1\nworkloadz: []\n").unwrap_err();
        assert!(e.to_string().contains("unknown field `workloadz`"), "{e}");
        let e = ConfigFile::parse("x", "node: n1\nworkloads: [{uid: a, name: b, node: n, ip: nope}]\n").unwrap_err();
        assert!(e.to_string().contains("invalid IPv4 address syntax"), "{e}");
        assert!(ConfigFile::parse("x", ":\n - [").is_err());
    }

    #[test]
    fn connection_limits_default_and_are_validated() {
        let s = ConfigFile::parse("none", "node: n1\n").unwrap().settings;
        assert_eq!(
            (s.max_connections_per_pod, s.max_connections_per_agent),
            (10_000, 100_000)
        );
        let c = ConfigFile::parse(
            "ok",
            "node: n1\nsettings: {maxConnectionsPerPod: 5, maxConnectionsPerAgent: 5}\n",
        )
        .unwrap();
        assert_eq!(c.settings.max_connections_per_pod, 5);
        let e = ConfigFile::parse("bad", "node: n1\nsettings: {maxConnectionsPerPod: 0}\n").unwrap_err();
        assert!(
            e.to_string()
                .contains("settings.maxConnectionsPerPod: must be at least 1"),
            "{e}"
        );
        let e = ConfigFile::parse(
            "bad",
            "node: n1\nsettings: {maxConnectionsPerPod: 20, maxConnectionsPerAgent: 10}\n",
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("20 is more than settings.maxConnectionsPerAgent (10)"),
            "{e}"
        );
    }

    #[test]
    fn tracing_settings_default_and_are_validated() {
        assert!(ConfigFile::parse("none", "node: n1\n")
            .unwrap()
            .settings
            .tracing
            .is_none());
        let c = ConfigFile::parse(
            "ok",
            "node: n1\nsettings: {tracing: {endpoint: \"http://otel-collector.observability:4317\"}}\n",
        )
        .unwrap();
        let t = c.settings.tracing.unwrap();
        assert_eq!(t.sample_rate, 0.01);
        assert_eq!(t.service_name, None);
        let bad = "node: n1\nsettings: {tracing: {endpoint: \"otel:4317\", sampleRate: 1.5, serviceName: \"\"}}\n";
        let e = ConfigFile::parse("bad", bad).unwrap_err();
        let all = e.to_string();
        assert_eq!(e.problems.len(), 3, "{all}");
        assert!(all.contains("settings.tracing.sampleRate: 1.5"), "{all}");
        assert!(all.contains("settings.tracing.endpoint: \"otel:4317\""), "{all}");
        for host in ["http://", "https://:4317", "http://a b:1"] {
            let t = TracingSettings {
                endpoint: host.into(),
                sample_rate: 1.0,
                service_name: None,
            };
            assert_eq!(t.validate().len(), 1, "{host}");
        }
        let e = ConfigFile::parse(
            "x",
            "node: n1\nsettings: {tracing: {endpoint: \"http://c:4317\", rate: 1}}\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown field `rate`"), "{e}");
    }

    #[test]
    fn authorization_policies_are_validated_with_their_paths() {
        let ok = "node: n1\nauthorizationPolicies:\n  - {name: deny-foo, namespace: default, spec: {action: DENY, rules: [{from: [{source: {namespaces: [foo]}}]}]}}\n";
        let c = ConfigFile::parse("ok", ok).unwrap();
        assert_eq!(c.authorization_policies[0].name, "deny-foo");
        assert!(ConfigFile::parse("none", "node: n1\n")
            .unwrap()
            .authorization_policies
            .is_empty());
        let bad = r#"
node: n1
authorizationPolicies:
  - {name: ext, namespace: default, spec: {action: CUSTOM, provider: {name: opa}, rules: [{}]}}
  - {name: ext, namespace: default, spec: {rules: [{from: [{source: {ipBlocks: [10.0.0.0/99]}}]}]}}
"#;
        let e = ConfigFile::parse("bad", bad).unwrap_err();
        let all = e.to_string();
        assert_eq!(e.problems.len(), 3, "{all}");
        assert!(
            all.contains("authorizationPolicies[0] (default/ext).spec.action: CUSTOM"),
            "{all}"
        );
        assert!(
            all.contains("authorizationPolicies[1] (default/ext): already defined by authorizationPolicies[0]"),
            "{all}"
        );
        assert!(
            all.contains("authorizationPolicies[1] (default/ext).spec.rules[0].from[0].source.ipBlocks[0]"),
            "{all}"
        );
    }
}
