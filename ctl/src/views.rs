//! The agent's admin views (`ferry_model::admin`) as ferryctl's rows: which
//! columns each command's table shows, and its cells from the typed fields.

use std::net::Ipv4Addr;

use ferry_model::{
    admin::{CertView, ConnView, ControlStatus, EndpointHealth, PodStatus},
    Service,
};
use serde::Serialize;

use crate::output::{opt, Row};

impl Row for PodStatus {
    const COLUMNS: &'static [&'static str] = &[
        "namespace",
        "name",
        "ip",
        "enrolled",
        "pod_id",
        "netns_cookie",
        "host_veth",
        "error",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            self.namespace.clone(),
            self.name.clone(),
            self.ip.clone(),
            self.enrolled.to_string(),
            opt(&self.pod_id),
            opt(&self.netns_cookie),
            opt(&self.host_veth),
            opt(&self.error),
        ]
    }
}

impl Row for ConnView {
    const COLUMNS: &'static [&'static str] = &[
        "id",
        "direction",
        "source",
        "orig_dst",
        "service",
        "endpoint",
        "hop",
        "sent",
        "received",
        "age_ms",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            self.id.to_string(),
            self.direction.to_string(),
            self.source.clone(),
            self.orig_dst.clone(),
            opt(&self.service),
            opt(&self.endpoint),
            opt(&self.hop),
            self.sent.to_string(),
            self.received.to_string(),
            self.age_ms.to_string(),
        ]
    }
}

impl Row for EndpointHealth {
    const COLUMNS: &'static [&'static str] = &[
        "service",
        "port",
        "subset",
        "endpoint",
        "workload",
        "locality",
        "lb",
        "state",
        "ejected_for_ms",
        "ejections",
        "5xx",
        "gateway",
        "local",
        "in_flight",
    ];
    fn cells(&self) -> Vec<String> {
        let state = match (self.state, self.panic) {
            (s, true) => format!("{s} (panic)"),
            (s, false) => s.to_string(),
        };
        vec![
            self.service.clone(),
            self.port.to_string(),
            opt(&self.subset),
            self.endpoint.clone(),
            opt(&self.workload),
            opt(&self.locality),
            self.algorithm.clone(),
            state,
            opt(&self.ejected_for_ms),
            self.ejections.to_string(),
            self.consecutive_5xx.to_string(),
            self.consecutive_gateway.to_string(),
            self.consecutive_local_origin.to_string(),
            self.in_flight.to_string(),
        ]
    }
}

impl Row for CertView {
    const COLUMNS: &'static [&'static str] =
        &["uid", "spiffe_id", "serial", "seconds_to_expiry", "seconds_to_rotation"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.uid.clone(),
            self.spiffe_id.to_string(),
            self.serial.clone(),
            self.seconds_to_expiry.to_string(),
            self.seconds_to_rotation.to_string(),
        ]
    }
}

impl Row for ControlStatus {
    const COLUMNS: &'static [&'static str] = &[
        "endpoint",
        "connected",
        "system_version",
        "resources",
        "last_nack",
        "last_error",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            self.endpoint.clone(),
            self.connected.to_string(),
            self.system_version.to_string(),
            self.resources.to_string(),
            opt(&self.last_nack),
            opt(&self.last_error),
        ]
    }
}

/// `ferryctl services`: a service with its ports (`port->targetPort`) and
/// endpoints (`ip`, marked when not ready) each comma-separated.
#[derive(Serialize)]
pub(crate) struct ServiceRow {
    pub namespace: String,
    pub name: String,
    pub vip: Ipv4Addr,
    pub ports: String,
    pub endpoints: String,
}

impl From<&Service> for ServiceRow {
    fn from(s: &Service) -> Self {
        let ports: Vec<String> = s
            .ports
            .iter()
            .map(|p| format!("{}->{}", p.port, p.target_port))
            .collect();
        let endpoints: Vec<String> = s
            .endpoints
            .iter()
            .map(|e| format!("{}{}", e.ip, if e.ready { "" } else { " (not ready)" }))
            .collect();
        Self {
            namespace: s.namespace.clone(),
            name: s.name.clone(),
            vip: s.vip,
            ports: ports.join(","),
            endpoints: endpoints.join(","),
        }
    }
}

impl Row for ServiceRow {
    const COLUMNS: &'static [&'static str] = &["namespace", "name", "vip", "ports", "endpoints"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.namespace.clone(),
            self.name.clone(),
            self.vip.to_string(),
            self.ports.clone(),
            self.endpoints.clone(),
        ]
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use ferry_model::{
        admin::{ConfigDump, Direction, Stats},
        state::Hop,
        Endpoint, ServicePort, Settings, SpiffeId, Workload,
    };
    use serde::{de::DeserializeOwned, Serialize};
    use serde_json::Value;

    use super::*;
    use crate::{
        admin::parse,
        output::{counters, rows_table},
        CtlError,
    };

    const ADMIN: &str = "127.0.0.1:15000";

    /// `body` as the agent's admin endpoint answers it, parsed by ferryctl;
    /// checks that serializing the typed view gives back the agent's JSON.
    fn answer<T: DeserializeOwned + Serialize>(path: &'static str, body: &str) -> T {
        let resp = format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n{body}");
        let view: T = parse(ADMIN.parse().unwrap(), path, &resp).unwrap();
        let back = serde_json::to_value(&view).unwrap();
        assert_eq!(back, serde_json::from_str::<Value>(body).unwrap(), "{path} round trip");
        view
    }

    fn pod(uid: &str, name: &str, ip: &str, id: Option<u32>) -> PodStatus {
        PodStatus {
            uid: uid.into(),
            name: name.into(),
            namespace: "default".into(),
            ip: ip.into(),
            enrolled: id.is_some(),
            pod_id: id,
            netns_cookie: id.map(|i| 5112 + u64::from(i)),
            cgroup: id.map(|_| format!("/sys/fs/cgroup/kubepods/pod{uid}")),
            netns: id.map(|_| format!("/run/netns/{name}")),
            host_veth: id.map(|i| format!("veth{}", i - 1)),
            error: None,
            ip_learned: false,
        }
    }

    fn config_dump() -> ConfigDump<'static> {
        let workload = |uid: &str, name: &str, ip: &str| Workload {
            uid: uid.into(),
            name: name.into(),
            namespace: "default".into(),
            service_account: name.into(),
            node: "node1".into(),
            ip: ip.parse().unwrap(),
            enrolled: true,
            labels: [("app".to_string(), name.to_string())].into(),
            netns: None,
            host_veth: None,
            workload_name: None,
            locality: None,
        };
        let mut plain = pod("plain-uid", "plain", "10.1.1.12", None);
        plain.error = Some("netns not found".into());
        ConfigDump {
            node: "node1".into(),
            version: 3,
            settings: std::borrow::Cow::Owned(Settings::default()),
            pods: vec![
                pod("client-uid", "client", "10.1.1.10", Some(1)),
                pod("echo-1-uid", "echo-1", "10.1.1.11", Some(2)),
                plain,
            ],
            workloads: vec![
                std::borrow::Cow::Owned(workload("client-uid", "client", "10.1.1.10")),
                std::borrow::Cow::Owned(workload("echo-1-uid", "echo-1", "10.1.1.11")),
            ],
            services: std::borrow::Cow::Owned(vec![Service {
                name: "echo".into(),
                namespace: "default".into(),
                vip: "10.96.0.10".parse().unwrap(),
                ports: vec![
                    ServicePort {
                        port: 80,
                        target_port: 8080,
                        name: Some("http".into()),
                        protocol: ferry_model::Protocol::Http,
                    },
                    ServicePort {
                        port: 443,
                        target_port: 8443,
                        name: None,
                        protocol: Default::default(),
                    },
                ],
                endpoints: vec![
                    Endpoint {
                        ip: "10.1.1.11".parse().unwrap(),
                        ready: true,
                    },
                    Endpoint {
                        ip: "10.1.2.12".parse().unwrap(),
                        ready: false,
                    },
                ],
            }]),
            control: Some(ControlStatus {
                endpoint: "https://ferry-control.ferry-system:15010".into(),
                connected: true,
                system_version: 42,
                resources: 7,
                last_nack: None,
                last_error: Some("stream reset".into()),
            }),
        }
    }

    #[test]
    fn config_dump_views() {
        let body = serde_json::to_string(&config_dump()).unwrap();
        let dump: ConfigDump<'static> = answer("/config_dump", &body);
        assert_eq!(
            rows_table(&dump.pods),
            "\
NAMESPACE  NAME    IP         ENROLLED  POD_ID  NETNS_COOKIE  HOST_VETH  ERROR
default    client  10.1.1.10  true      1       5113          veth0      -
default    echo-1  10.1.1.11  true      2       5114          veth1      -
default    plain   10.1.1.12  false     -       -             -          netns not found
"
        );
        let services: Vec<ServiceRow> = dump.services.iter().map(ServiceRow::from).collect();
        assert_eq!(
            rows_table(&services),
            "\
NAMESPACE  NAME  VIP         PORTS               ENDPOINTS
default    echo  10.96.0.10  80->8080,443->8443  10.1.1.11,10.1.2.12 (not ready)
"
        );
        assert_eq!(
            serde_json::to_value(&services).unwrap(),
            serde_json::json!([{
                "namespace": "default",
                "name": "echo",
                "vip": "10.96.0.10",
                "ports": "80->8080,443->8443",
                "endpoints": "10.1.1.11,10.1.2.12 (not ready)",
            }])
        );
        let control = dump.control.as_ref().unwrap();
        assert_eq!(
            rows_table(std::slice::from_ref(control)),
            "\
ENDPOINT                                  CONNECTED  SYSTEM_VERSION  RESOURCES  LAST_NACK  LAST_ERROR
https://ferry-control.ferry-system:15010  true       42              7          -          stream reset
"
        );
    }

    #[test]
    fn conns_view() {
        // As the agent writes it: lowercase direction and hop, the peer's SPIFFE id as a string.
        let body = r#"[
            {"id":8,"direction":"outbound","source":"default/client","client":"127.0.0.1:50406",
             "orig_dst":"10.96.0.10:80","service":"default/echo","endpoint":"10.1.2.12:8080",
             "hop":"tunnel","peer_identity":"spiffe://cluster.local/ns/default/sa/echo-2",
             "sent":130088965,"received":101514888,"age_ms":2362},
            {"id":9,"direction":"tunnel","source":"10.1.2.12:41234","client":"10.1.2.12:41234",
             "orig_dst":"10.1.1.11:8080","service":null,"endpoint":"10.1.1.11:8080","hop":"local",
             "peer_identity":"spiffe://cluster.local/ns/default/sa/client","sent":512,"received":1024,"age_ms":15},
            {"id":10,"direction":"inbound","source":"10.1.1.1:39112","client":"10.1.1.1:39112",
             "orig_dst":"10.1.1.11:8080","service":null,"endpoint":null,"hop":null,
             "peer_identity":null,"sent":0,"received":0,"age_ms":3}
        ]"#;
        let conns: Vec<ConnView> = answer("/conns", body);
        assert_eq!(
            (conns[0].direction, conns[0].hop),
            (Direction::Outbound, Some(Hop::Tunnel))
        );
        assert_eq!(conns[1].peer_identity, Some(SpiffeId::new("default", "client")));
        assert_eq!(
            rows_table(&conns),
            "\
ID  DIRECTION  SOURCE           ORIG_DST        SERVICE       ENDPOINT        HOP     SENT       RECEIVED   AGE_MS
8   outbound   default/client   10.96.0.10:80   default/echo  10.1.2.12:8080  tunnel  130088965  101514888  2362
9   tunnel     10.1.2.12:41234  10.1.1.11:8080  -             10.1.1.11:8080  local   512        1024       15
10  inbound    10.1.1.1:39112   10.1.1.11:8080  -             -               -       0          0          3
"
        );
    }

    #[test]
    fn endpoints_view() {
        // As the agent writes it (`/endpoints`).
        let body = r#"[
            {"service":"default/reviews","port":9080,"subset":null,"endpoint":"10.1.1.5:9080",
             "workload":"default/reviews-v1","locality":"r1/z1","algorithm":"LEAST_REQUEST",
             "outlier_detection":true,"state":"ejected","ejected_for_ms":1200,"ejections":2,
             "consecutive_5xx":0,"consecutive_gateway":0,"consecutive_local_origin":0,"in_flight":0,"panic":false},
            {"service":"default/reviews","port":9080,"subset":"v2","endpoint":"10.1.2.6:9080",
             "workload":null,"locality":null,"algorithm":"ROUND_ROBIN",
             "outlier_detection":false,"state":"healthy","ejected_for_ms":null,"ejections":0,
             "consecutive_5xx":1,"consecutive_gateway":1,"consecutive_local_origin":0,"in_flight":3,"panic":true}
        ]"#;
        let rows: Vec<EndpointHealth> = answer("/endpoints", body);
        assert_eq!(rows[0].state, ferry_model::admin::EndpointState::Ejected);
        assert_eq!(
            rows_table(&rows),
            "\
SERVICE          PORT  SUBSET  ENDPOINT       WORKLOAD            LOCALITY  LB             STATE            EJECTED_FOR_MS  EJECTIONS  5XX  GATEWAY  LOCAL  IN_FLIGHT
default/reviews  9080  -       10.1.1.5:9080  default/reviews-v1  r1/z1     LEAST_REQUEST  ejected          1200            2          0    0        0      0
default/reviews  9080  v2      10.1.2.6:9080  -                   -         ROUND_ROBIN    healthy (panic)  -               0          1    1        0      3
"
        );
    }

    #[test]
    fn certs_view() {
        let certs = vec![CertView {
            uid: "client-uid".into(),
            spiffe_id: SpiffeId::new("default", "client"),
            serial: "5a:bb:e6:ce:e1:1a:13:57".into(),
            not_after_unix: 1_767_225_600,
            seconds_to_expiry: 86399,
            seconds_to_rotation: 43199,
        }];
        let body = serde_json::to_string(&certs).unwrap();
        assert!(
            body.contains(r#""spiffe_id":"spiffe://cluster.local/ns/default/sa/client""#),
            "{body}"
        );
        let certs: Vec<CertView> = answer("/certs", &body);
        assert_eq!(
            rows_table(&certs),
            "\
UID         SPIFFE_ID                                    SERIAL                   SECONDS_TO_EXPIRY  SECONDS_TO_ROTATION
client-uid  spiffe://cluster.local/ns/default/sa/client  5a:bb:e6:ce:e1:1a:13:57  86399              43199
"
        );
        assert_eq!(
            rows_table::<CertView>(&[]),
            "UID  SPIFFE_ID  SERIAL  SECONDS_TO_EXPIRY  SECONDS_TO_ROTATION\n(none)\n"
        );
    }

    #[test]
    fn stats_view() {
        let stats = Stats {
            outbound_opened: 6,
            inbound_opened: 2,
            closed: 7,
            refused: 3,
            refused_plaintext: 1,
            bytes_sent: 16777241,
            bytes_received: 16777351,
            hop_local: 3,
            hop_tunnel: 3,
            ..Default::default()
        };
        let stats: Stats = answer("/stats", &serde_json::to_string(&stats).unwrap());
        assert_eq!(
            rows_table(&counters(stats.counters())),
            "\
COUNTER            VALUE
outbound_opened    6
inbound_opened     2
tunnel_opened      0
closed             7
failed             0
no_orig_dst        0
refused            3
refused_plaintext  1
bytes_sent         16777241
bytes_received     16777351
hop_local          3
hop_tunnel         3
hop_direct         0
"
        );
    }

    #[test]
    fn unreadable_answers_name_the_endpoint() {
        let addr: SocketAddr = ADMIN.parse().unwrap();
        let old = "HTTP/1.1 200 OK\r\n\r\n[{\"id\":1,\"direction\":\"Outbound\"}]";
        let e = parse::<Vec<ConnView>>(addr, "/conns", old).unwrap_err();
        assert!(matches!(e, CtlError::BadAnswer { path: "/conns", .. }));
        let msg = e.to_string();
        assert!(
            msg.starts_with("agent admin 127.0.0.1:15000/conns answered what"),
            "{msg}"
        );
        assert!(msg.contains("unknown variant `Outbound`"), "{msg}");
        let e = parse::<Stats>(addr, "/stats", "HTTP/1.1 404 Not Found\r\n\r\nnot found\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "agent admin 127.0.0.1:15000/stats: HTTP/1.1 404 Not Found"
        );
    }
}
