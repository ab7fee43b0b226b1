//! A service port's application protocol, chosen as Istio does: the port's
//! `appProtocol`, else the prefix of its name (`http-web`, `grpc`), else
//! unknown (`auto`: the proxy may detect it from the first bytes).

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// Not declared (or not a name Istio knows): decided by detection.
    #[default]
    Auto,
    Http,
    Http2,
    Https,
    Grpc,
    GrpcWeb,
    Tcp,
    Tls,
    Mongo,
    Mysql,
    Redis,
    Udp,
}

impl Protocol {
    pub const ALL: [Protocol; 12] = [
        Protocol::Auto,
        Protocol::Http,
        Protocol::Http2,
        Protocol::Https,
        Protocol::Grpc,
        Protocol::GrpcWeb,
        Protocol::Tcp,
        Protocol::Tls,
        Protocol::Mongo,
        Protocol::Mysql,
        Protocol::Redis,
        Protocol::Udp,
    ];

    /// The stable name (config files, the wire, views).
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Auto => "auto",
            Protocol::Http => "http",
            Protocol::Http2 => "http2",
            Protocol::Https => "https",
            Protocol::Grpc => "grpc",
            Protocol::GrpcWeb => "grpc-web",
            Protocol::Tcp => "tcp",
            Protocol::Tls => "tls",
            Protocol::Mongo => "mongo",
            Protocol::Mysql => "mysql",
            Protocol::Redis => "redis",
            Protocol::Udp => "udp",
        }
    }

    /// Istio's protocol selection for a Service port: `appProtocol` first
    /// (including Kubernetes' `kubernetes.io/h2c` and `kubernetes.io/ws`),
    /// else the port name's prefix before `-`; anything else is `Auto`.
    pub fn select(port_name: Option<&str>, app_protocol: Option<&str>) -> Protocol {
        if let Some(a) = app_protocol {
            let a = a.to_ascii_lowercase();
            return match a.as_str() {
                "kubernetes.io/h2c" => Protocol::Http2,
                "kubernetes.io/ws" => Protocol::Http,
                "kubernetes.io/wss" => Protocol::Tls,
                other => other.parse().unwrap_or(Protocol::Auto),
            };
        }
        let name = port_name.unwrap_or_default().to_ascii_lowercase();
        // `grpc-web` is a name of its own, not `grpc` with a suffix.
        if name == "grpc-web" || name.starts_with("grpc-web-") {
            return Protocol::GrpcWeb;
        }
        name.split('-')
            .next()
            .unwrap_or_default()
            .parse()
            .unwrap_or(Protocol::Auto)
    }

    /// Whether the proxy handles it as HTTP (routes, per-request balancing).
    pub fn is_http(self) -> bool {
        matches!(
            self,
            Protocol::Http | Protocol::Http2 | Protocol::Grpc | Protocol::GrpcWeb
        )
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a protocol Ferry knows (auto, http, http2, https, grpc, grpc-web, tcp, tls, mongo, mysql, redis, udp)")]
pub struct UnknownProtocol(pub String);

impl FromStr for Protocol {
    type Err = UnknownProtocol;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Protocol::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| UnknownProtocol(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_follows_istio() {
        let sel = Protocol::select;
        assert_eq!(sel(Some("http-web"), None), Protocol::Http);
        assert_eq!(sel(Some("HTTP2"), None), Protocol::Http2);
        assert_eq!(sel(Some("grpc"), None), Protocol::Grpc);
        assert_eq!(sel(Some("grpc-web"), None), Protocol::GrpcWeb);
        assert_eq!(sel(Some("tcp-db"), None), Protocol::Tcp);
        assert_eq!(sel(Some("web"), None), Protocol::Auto);
        assert_eq!(sel(None, None), Protocol::Auto);
        // appProtocol wins over the name.
        assert_eq!(sel(Some("tcp"), Some("HTTP")), Protocol::Http);
        assert_eq!(sel(Some("http"), Some("kubernetes.io/h2c")), Protocol::Http2);
        assert_eq!(sel(Some("http"), Some("postgresql")), Protocol::Auto);
    }

    #[test]
    fn names_round_trip() {
        for p in Protocol::ALL {
            assert_eq!(p.as_str().parse::<Protocol>(), Ok(p));
        }
        assert!("smtp".parse::<Protocol>().is_err());
    }
}
