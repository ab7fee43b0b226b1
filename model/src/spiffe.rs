//! SPIFFE ids: the identity a workload's certificate proves
//! (`spiffe://<trust domain>/ns/<namespace>/sa/<service account>`).

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

pub const TRUST_DOMAIN: &str = "cluster.local";

/// A workload identity. Built from a namespace and service account, or
/// parsed from a certificate's URI SAN.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

impl SpiffeId {
    /// The id of a workload in `namespace` running as `service_account`, in
    /// Ferry's trust domain.
    pub fn new(namespace: &str, service_account: &str) -> Self {
        Self {
            trust_domain: TRUST_DOMAIN.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        }
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }
    pub fn namespace(&self) -> &str {
        &self.namespace
    }
    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a workload SPIFFE id (spiffe://<trust domain>/ns/<namespace>/sa/<service account>)")]
pub struct BadSpiffeId(pub String);

impl FromStr for SpiffeId {
    type Err = BadSpiffeId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadSpiffeId(s.to_owned());
        let rest = s.strip_prefix("spiffe://").ok_or_else(bad)?;
        let mut parts = rest.split('/');
        let (td, ns_kw, ns, sa_kw, sa) = (
            parts.next().ok_or_else(bad)?,
            parts.next().ok_or_else(bad)?,
            parts.next().ok_or_else(bad)?,
            parts.next().ok_or_else(bad)?,
            parts.next().ok_or_else(bad)?,
        );
        if parts.next().is_some() || ns_kw != "ns" || sa_kw != "sa" || [td, ns, sa].iter().any(|p| p.is_empty()) {
            return Err(bad());
        }
        Ok(Self {
            trust_domain: td.into(),
            namespace: ns.into(),
            service_account: sa.into(),
        })
    }
}

impl TryFrom<String> for SpiffeId {
    type Error = BadSpiffeId;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<SpiffeId> for String {
    fn from(id: SpiffeId) -> String {
        id.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_parses_and_refuses() {
        let id = SpiffeId::new("shop", "pay");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/pay");
        assert_eq!(id.to_string().parse::<SpiffeId>(), Ok(id.clone()));
        assert_eq!(id.namespace(), "shop");
        for bad in [
            "spiffe://cluster.local/ns/shop",
            "spiffe://cluster.local/ns/shop/sa/pay/x",
            "spiffe://cluster.local/sa/shop/ns/pay",
            "https://cluster.local/ns/a/sa/b",
            "spiffe:///ns/a/sa/b",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad}");
        }
    }
}
