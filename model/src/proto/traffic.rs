//! Wire conversions of traffic policy (`ferry_model::traffic`), both ways.
//! Decoding checks what the types cannot: a consistent hash names a key, a
//! percentage is at most 100, a port is a port.

use std::collections::BTreeMap;

use ferry_api::discovery as pb;

use crate::traffic::{
    ConnectionPool, ConsistentHash, HashKey, HashTable, LbAlgorithm, LoadBalancer, LocalityFailover, LocalityLb,
    OutlierDetection, ServiceTrafficPolicy, SubsetTrafficPolicy, TcpKeepalive, TrafficPolicy,
};

pub fn service_policy_to(p: &ServiceTrafficPolicy) -> pb::resource::Kind {
    pb::resource::Kind::TrafficPolicy(pb::ServiceTrafficPolicy {
        service: p.service.clone(),
        origin: p.origin.clone(),
        policy: Some(policy_to(&p.policy)),
        ports: ports_to(&p.ports),
        subsets: p
            .subsets
            .iter()
            .map(|(name, s)| {
                let sp = pb::SubsetTrafficPolicy {
                    policy: Some(policy_to(&s.policy)),
                    ports: ports_to(&s.ports),
                };
                (name.clone(), sp)
            })
            .collect(),
    })
}

fn ports_to(ports: &BTreeMap<u16, TrafficPolicy>) -> BTreeMap<u32, pb::TrafficPolicy> {
    ports.iter().map(|(port, p)| (u32::from(*port), policy_to(p))).collect()
}

fn policy_to(p: &TrafficPolicy) -> pb::TrafficPolicy {
    use pb::load_balancer::Simple;
    let lb = &p.load_balancer;
    let (simple, consistent_hash) = match &lb.algorithm {
        LbAlgorithm::LeastRequest => (Simple::LeastRequest, None),
        LbAlgorithm::RoundRobin => (Simple::RoundRobin, None),
        LbAlgorithm::Random => (Simple::Random, None),
        LbAlgorithm::Passthrough => (Simple::Passthrough, None),
        LbAlgorithm::ConsistentHash(h) => (Simple::LeastRequest, Some(hash_to(h))),
    };
    let c = &p.connection_pool;
    pb::TrafficPolicy {
        load_balancer: Some(pb::LoadBalancer {
            simple: simple as i32,
            consistent_hash,
            locality: lb.locality.as_ref().map(|l| pb::LocalityLb {
                failover: l
                    .failover
                    .iter()
                    .map(|f| pb::LocalityFailover {
                        from: f.from.clone(),
                        to: f.to.clone(),
                    })
                    .collect(),
                failover_priority: l.failover_priority.clone(),
            }),
            warmup_ms: lb.warmup_ms,
        }),
        connection_pool: Some(pb::ConnectionPool {
            max_connections: c.max_connections,
            connect_timeout_ms: c.connect_timeout_ms,
            tcp_keepalive: c.tcp_keepalive.map(|k| pb::TcpKeepalive {
                probes: k.probes,
                time_ms: k.time_ms,
                interval_ms: k.interval_ms,
            }),
            http1_max_pending_requests: c.http1_max_pending_requests,
            http2_max_requests: c.http2_max_requests,
            max_requests_per_connection: c.max_requests_per_connection,
            max_retries: c.max_retries,
            idle_timeout_ms: c.idle_timeout_ms,
            max_concurrent_streams: c.max_concurrent_streams,
        }),
        outlier_detection: p.outlier_detection.as_ref().map(|o| pb::OutlierDetection {
            consecutive_5xx: o.consecutive_5xx,
            consecutive_gateway: o.consecutive_gateway,
            consecutive_local_origin: o.consecutive_local_origin,
            interval_ms: o.interval_ms,
            base_ejection_ms: o.base_ejection_ms,
            max_ejection_percent: o.max_ejection_percent,
            min_health_percent: o.min_health_percent,
        }),
    }
}

fn hash_to(h: &ConsistentHash) -> pb::ConsistentHash {
    use pb::consistent_hash::{Key, Table};
    pb::ConsistentHash {
        key: Some(match &h.key {
            HashKey::Header(n) => Key::Header(n.clone()),
            HashKey::Cookie { name, path, ttl_ms } => Key::Cookie(pb::HashCookie {
                name: name.clone(),
                path: path.clone(),
                ttl_ms: *ttl_ms,
            }),
            HashKey::SourceIp => Key::SourceIp(true),
            HashKey::QueryParameter(n) => Key::QueryParameter(n.clone()),
        }),
        table: Some(match h.table {
            HashTable::RingHash { minimum_ring_size } => Table::RingHashMinimumRingSize(minimum_ring_size),
            HashTable::Maglev { table_size } => Table::MaglevTableSize(table_size),
        }),
    }
}

/// Every problem of a wire traffic policy, joined.
pub fn service_policy_from(p: &pb::ServiceTrafficPolicy) -> Result<ServiceTrafficPolicy, String> {
    let mut problems = Vec::new();
    let mut layer = |at: &str, p: Option<&pb::TrafficPolicy>| -> TrafficPolicy {
        match p {
            Some(p) => policy_from(p).unwrap_or_else(|e| {
                problems.push(format!("{at}: {e}"));
                TrafficPolicy::default()
            }),
            None => TrafficPolicy::default(),
        }
    };
    let ports_from = |at: &str, ports: &BTreeMap<u32, pb::TrafficPolicy>, problems: &mut Vec<String>| {
        let mut out = BTreeMap::new();
        for (port, p) in ports {
            match u16::try_from(*port).ok().filter(|p| *p != 0) {
                Some(n) => match policy_from(p) {
                    Ok(t) => {
                        out.insert(n, t);
                    }
                    Err(e) => problems.push(format!("{at}.ports[{port}]: {e}")),
                },
                None => problems.push(format!("{at}.ports: {port} is not a port")),
            }
        }
        out
    };
    let policy = layer("policy", p.policy.as_ref());
    let mut subsets = BTreeMap::new();
    let mut more = Vec::new();
    let ports = ports_from("policy", &p.ports, &mut more);
    for (name, s) in &p.subsets {
        let sp = match s.policy.as_ref().map(policy_from) {
            Some(Ok(t)) => t,
            Some(Err(e)) => {
                more.push(format!("subsets[{name}]: {e}"));
                TrafficPolicy::default()
            }
            None => TrafficPolicy::default(),
        };
        let ports = ports_from(&format!("subsets[{name}]"), &s.ports, &mut more);
        subsets.insert(name.clone(), SubsetTrafficPolicy { policy: sp, ports });
    }
    problems.extend(more);
    if p.service.split('/').count() != 2 {
        problems.push(format!("service {:?} is not namespace/name", p.service));
    }
    if problems.is_empty() {
        Ok(ServiceTrafficPolicy {
            service: p.service.clone(),
            origin: p.origin.clone(),
            policy,
            ports,
            subsets,
        })
    } else {
        Err(problems.join("; "))
    }
}

fn policy_from(p: &pb::TrafficPolicy) -> Result<TrafficPolicy, String> {
    use pb::load_balancer::Simple;
    let load_balancer = match &p.load_balancer {
        None => LoadBalancer::default(),
        Some(lb) => {
            let algorithm = match &lb.consistent_hash {
                Some(h) => LbAlgorithm::ConsistentHash(hash_from(h)?),
                None => match Simple::try_from(lb.simple) {
                    Ok(Simple::LeastRequest) => LbAlgorithm::LeastRequest,
                    Ok(Simple::RoundRobin) => LbAlgorithm::RoundRobin,
                    Ok(Simple::Random) => LbAlgorithm::Random,
                    Ok(Simple::Passthrough) => LbAlgorithm::Passthrough,
                    Err(_) => return Err(format!("loadBalancer.simple: unknown value {}", lb.simple)),
                },
            };
            LoadBalancer {
                algorithm,
                locality: lb.locality.as_ref().map(|l| LocalityLb {
                    failover: l
                        .failover
                        .iter()
                        .map(|f| LocalityFailover {
                            from: f.from.clone(),
                            to: f.to.clone(),
                        })
                        .collect(),
                    failover_priority: l.failover_priority.clone(),
                }),
                warmup_ms: lb.warmup_ms,
            }
        }
    };
    let connection_pool = match &p.connection_pool {
        None => ConnectionPool::default(),
        Some(c) => ConnectionPool {
            max_connections: c.max_connections,
            connect_timeout_ms: c.connect_timeout_ms,
            tcp_keepalive: c.tcp_keepalive.as_ref().map(|k| TcpKeepalive {
                probes: k.probes,
                time_ms: k.time_ms,
                interval_ms: k.interval_ms,
            }),
            http1_max_pending_requests: c.http1_max_pending_requests,
            http2_max_requests: c.http2_max_requests,
            max_requests_per_connection: c.max_requests_per_connection,
            max_retries: c.max_retries,
            idle_timeout_ms: c.idle_timeout_ms,
            max_concurrent_streams: c.max_concurrent_streams,
        },
    };
    let outlier_detection = match &p.outlier_detection {
        None => None,
        Some(o) => {
            for (f, v) in [
                ("maxEjectionPercent", o.max_ejection_percent),
                ("minHealthPercent", o.min_health_percent),
            ] {
                if v > 100 {
                    return Err(format!("outlierDetection.{f}: {v} is over 100"));
                }
            }
            if o.interval_ms == 0 {
                return Err("outlierDetection.interval: must be above 0".into());
            }
            Some(OutlierDetection {
                consecutive_5xx: o.consecutive_5xx,
                consecutive_gateway: o.consecutive_gateway,
                consecutive_local_origin: o.consecutive_local_origin,
                interval_ms: o.interval_ms,
                base_ejection_ms: o.base_ejection_ms,
                max_ejection_percent: o.max_ejection_percent,
                min_health_percent: o.min_health_percent,
            })
        }
    };
    Ok(TrafficPolicy {
        load_balancer,
        connection_pool,
        outlier_detection,
    })
}

fn hash_from(h: &pb::ConsistentHash) -> Result<ConsistentHash, String> {
    use pb::consistent_hash::{Key, Table};
    let key = match &h.key {
        Some(Key::Header(n)) if !n.is_empty() => HashKey::Header(n.to_ascii_lowercase()),
        Some(Key::Cookie(c)) if !c.name.is_empty() => HashKey::Cookie {
            name: c.name.clone(),
            path: c.path.clone(),
            ttl_ms: c.ttl_ms,
        },
        Some(Key::SourceIp(true)) => HashKey::SourceIp,
        Some(Key::QueryParameter(n)) if !n.is_empty() => HashKey::QueryParameter(n.clone()),
        _ => return Err("consistentHash: no hash key".into()),
    };
    let table = match h.table {
        None => HashTable::default(),
        Some(Table::RingHashMinimumRingSize(n)) => HashTable::RingHash {
            minimum_ring_size: n.clamp(1, 1 << 23),
        },
        Some(Table::MaglevTableSize(n)) if (1..=5_000_011).contains(&n) => HashTable::Maglev { table_size: n },
        Some(Table::MaglevTableSize(n)) => return Err(format!("consistentHash.maglev.tableSize: {n} is out of range")),
    };
    Ok(ConsistentHash { key, table })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_round_trips() {
        let full = TrafficPolicy {
            load_balancer: LoadBalancer {
                algorithm: LbAlgorithm::ConsistentHash(ConsistentHash {
                    key: HashKey::Cookie {
                        name: "user".into(),
                        path: Some("/".into()),
                        ttl_ms: Some(60_000),
                    },
                    table: HashTable::Maglev { table_size: 65537 },
                }),
                locality: Some(LocalityLb {
                    failover: vec![LocalityFailover {
                        from: "us-east".into(),
                        to: "us-west".into(),
                    }],
                    failover_priority: vec!["topology.kubernetes.io/zone".into()],
                }),
                warmup_ms: Some(30_000),
            },
            connection_pool: ConnectionPool {
                max_connections: Some(100),
                connect_timeout_ms: Some(1000),
                tcp_keepalive: Some(TcpKeepalive {
                    probes: Some(3),
                    time_ms: Some(7_200_000),
                    interval_ms: Some(75_000),
                }),
                http1_max_pending_requests: Some(1),
                http2_max_requests: Some(1000),
                max_requests_per_connection: Some(2),
                max_retries: Some(3),
                idle_timeout_ms: Some(60_000),
                max_concurrent_streams: Some(100),
            },
            outlier_detection: Some(OutlierDetection {
                consecutive_gateway: Some(7),
                consecutive_local_origin: Some(3),
                ..Default::default()
            }),
        };
        let hashed = |key| TrafficPolicy {
            load_balancer: LoadBalancer {
                algorithm: LbAlgorithm::ConsistentHash(ConsistentHash {
                    key,
                    table: HashTable::RingHash {
                        minimum_ring_size: 2048,
                    },
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let simple = |a| TrafficPolicy {
            load_balancer: LoadBalancer {
                algorithm: a,
                ..Default::default()
            },
            ..Default::default()
        };
        let p = ServiceTrafficPolicy {
            service: "default/reviews".into(),
            origin: "default/reviews-dr".into(),
            policy: full,
            ports: [
                (9080, hashed(HashKey::Header("x-user".into()))),
                (9081, hashed(HashKey::SourceIp)),
                (9082, hashed(HashKey::QueryParameter("u".into()))),
                (9083, simple(LbAlgorithm::RoundRobin)),
            ]
            .into(),
            subsets: [(
                "v1".to_owned(),
                SubsetTrafficPolicy {
                    policy: simple(LbAlgorithm::Random),
                    ports: [(9080, simple(LbAlgorithm::Passthrough))].into(),
                },
            )]
            .into(),
        };
        let pb::resource::Kind::TrafficPolicy(w) = service_policy_to(&p) else {
            panic!("kind")
        };
        assert_eq!(service_policy_from(&w).unwrap(), p);
    }

    #[test]
    fn bad_wire_policies_name_every_problem() {
        let mut w = pb::ServiceTrafficPolicy {
            service: "nope".into(),
            policy: Some(pb::TrafficPolicy {
                outlier_detection: Some(pb::OutlierDetection {
                    interval_ms: 1,
                    max_ejection_percent: 101,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        w.ports.insert(70000, pb::TrafficPolicy { ..Default::default() });
        w.subsets.insert(
            "v1".into(),
            pb::SubsetTrafficPolicy {
                policy: Some(pb::TrafficPolicy {
                    load_balancer: Some(pb::LoadBalancer {
                        consistent_hash: Some(pb::ConsistentHash::default()),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ports: BTreeMap::new(),
            },
        );
        let e = service_policy_from(&w).unwrap_err();
        for part in [
            "maxEjectionPercent: 101",
            "70000 is not a port",
            "subsets[v1]: consistentHash: no hash key",
            "not namespace/name",
        ] {
            assert!(e.contains(part), "{part}: {e}");
        }
    }
}
