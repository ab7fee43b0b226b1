//! Wire conversions of RateLimitPolicy (`ferry_model::ratelimit`), both
//! ways. Decoding checks what the wire types cannot: a port is a port, a
//! client identity is a SPIFFE id; the rest is the model's validation
//! (`ConfigFile::validate`, run on the whole config).

use ferry_api::discovery as pb;

use crate::ratelimit::{RateLimitOverride, RateLimitPolicy};

/// `ratelimitpolicy/<namespace>/<name>`.
pub const RATE_LIMIT_POLICY: &str = "ratelimitpolicy/";

/// The resource name of RateLimitPolicy `namespace/name`.
pub fn rate_limit_name(namespace: &str, name: &str) -> String {
    format!("{RATE_LIMIT_POLICY}{namespace}/{name}")
}

pub fn rate_limit_to(p: &RateLimitPolicy) -> pb::resource::Kind {
    pb::resource::Kind::RateLimit(pb::RateLimitPolicy {
        name: p.name.clone(),
        namespace: p.namespace.clone(),
        service: p.service.clone(),
        port: p.port.map(u32::from),
        total_rps: p.total_rps,
        per_identity_rps: p.per_identity_rps,
        overrides: p
            .overrides
            .iter()
            .map(|o| pb::RateLimitOverride {
                client_identities: o.client_identities.iter().map(ToString::to_string).collect(),
                rps: o.rps,
            })
            .collect(),
    })
}

/// Every problem of a wire policy, joined.
pub fn rate_limit_from(p: &pb::RateLimitPolicy) -> Result<RateLimitPolicy, String> {
    let mut problems = Vec::new();
    let port = match p.port {
        None => None,
        Some(n) => match u16::try_from(n).ok().filter(|n| *n != 0) {
            Some(n) => Some(n),
            None => {
                problems.push(format!("port: {n} is not a port"));
                None
            }
        },
    };
    let mut overrides = Vec::new();
    for (i, o) in p.overrides.iter().enumerate() {
        let mut ids = Vec::new();
        for (k, id) in o.client_identities.iter().enumerate() {
            match id.parse() {
                Ok(id) => ids.push(id),
                Err(e) => problems.push(format!("overrides[{i}].clientIdentities[{k}]: {e}")),
            }
        }
        overrides.push(RateLimitOverride {
            client_identities: ids,
            rps: o.rps,
        });
    }
    if !problems.is_empty() {
        return Err(problems.join("; "));
    }
    Ok(RateLimitPolicy {
        name: p.name.clone(),
        namespace: p.namespace.clone(),
        service: p.service.clone(),
        port,
        total_rps: p.total_rps,
        per_identity_rps: p.per_identity_rps,
        overrides,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{proto, SpiffeId};

    fn example() -> RateLimitPolicy {
        RateLimitPolicy {
            name: "reviews".into(),
            namespace: "default".into(),
            service: "default/reviews".into(),
            port: Some(9080),
            total_rps: Some(100),
            per_identity_rps: None,
            overrides: vec![RateLimitOverride {
                client_identities: vec![SpiffeId::new("default", "bookinfo-productpage")],
                rps: 50,
            }],
        }
    }

    #[test]
    fn round_trips_and_is_named_after_the_policy() {
        let p = example();
        let r = proto::resource(rate_limit_to(&p));
        assert_eq!(r.name, "ratelimitpolicy/default/reviews");
        let Some(pb::resource::Kind::RateLimit(w)) = &r.kind else {
            panic!("{r:?}")
        };
        assert_eq!(rate_limit_from(w), Ok(p.clone()));
        let mut held = proto::HeldResources::default();
        held.0.insert(r.name.clone(), r);
        let cfg = held.to_config("n1", &Default::default()).unwrap();
        assert_eq!(cfg.rate_limits, [p]);
    }

    #[test]
    fn bad_wire_values_are_refused_with_their_paths() {
        let Some(pb::resource::Kind::RateLimit(mut w)) = proto::resource(rate_limit_to(&example())).kind else {
            unreachable!()
        };
        w.port = Some(70000);
        w.overrides[0].client_identities.push("cluster.local/ns/a/sa/b".into());
        let e = rate_limit_from(&w).unwrap_err();
        assert!(e.contains("port: 70000 is not a port"), "{e}");
        assert!(e.contains("overrides[0].clientIdentities[1]: "), "{e}");
        // What decodes but the model refuses is a NACK reason, with the policy's path.
        let Some(pb::resource::Kind::RateLimit(mut w)) = proto::resource(rate_limit_to(&example())).kind else {
            unreachable!()
        };
        w.total_rps = Some(0);
        let r = proto::resource(pb::resource::Kind::RateLimit(w));
        let mut held = proto::HeldResources::default();
        held.0.insert(r.name.clone(), r);
        let problems = held.to_config("n1", &Default::default()).unwrap_err();
        assert_eq!(
            problems,
            ["rateLimits[0] (default/reviews).totalRps: must be at least 1"]
        );
    }
}
