//! The client side of ferry-control's gRPC endpoint, in one place: TLS to the
//! control plane's serving certificate (named `ferry-control`, signed by the
//! root the node was given) and the node's bearer token on each request.
//! Used by the agent (certificates, config stream), the benchmarks and the
//! tests; the server side reads the token with [`bearer`].

use std::{path::Path, time::Duration};

use tonic::{
    metadata::MetadataValue,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
    Request,
};

/// The name ferry-control's serving certificate carries.
pub const SERVER_NAME: &str = "ferry-control";
/// Time to wait for the TCP and TLS connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("reading {path}: {source}")]
    File { path: String, source: std::io::Error },
    #[error("connecting to {endpoint}: {reason}")]
    Connect { endpoint: String, reason: String },
    #[error("the token is not valid request metadata")]
    BadToken,
}

/// How to reach the control plane.
#[derive(Clone, Debug)]
pub struct ControlEndpoint {
    /// e.g. `https://10.1.1.1:15012`.
    pub url: String,
    /// PEM root that signed the control plane's serving certificate.
    pub ca_pem: String,
    /// Keep the HTTP/2 connection alive with pings (long-lived streams).
    pub keepalive: bool,
}

impl ControlEndpoint {
    /// `url`, trusting the PEM root in the file `ca_file`.
    pub fn from_ca_file(url: &str, ca_file: &Path) -> Result<Self, ChannelError> {
        let ca_pem = std::fs::read_to_string(ca_file).map_err(|source| ChannelError::File {
            path: ca_file.display().to_string(),
            source,
        })?;
        Ok(Self {
            url: url.to_owned(),
            ca_pem,
            keepalive: false,
        })
    }

    /// Connects (TLS), within [`CONNECT_TIMEOUT`].
    pub async fn connect(&self) -> Result<Channel, ChannelError> {
        let err = |reason: String| ChannelError::Connect {
            endpoint: self.url.clone(),
            reason,
        };
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .domain_name(SERVER_NAME);
        let mut ep = Endpoint::from_shared(self.url.clone())
            .map_err(|e| err(e.to_string()))?
            .tls_config(tls)
            .map_err(|e| err(e.to_string()))?
            .connect_timeout(CONNECT_TIMEOUT);
        if self.keepalive {
            ep = ep
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5));
        }
        // The transport error's Display hides its cause; the chain says why.
        ep.connect().await.map_err(|e| {
            let mut why = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                why = format!("{why}: {s}");
                src = s.source();
            }
            err(why)
        })
    }
}

/// Reads a node token from a file (surrounding whitespace dropped).
pub fn read_token(path: &Path) -> Result<String, ChannelError> {
    std::fs::read_to_string(path)
        .map(|t| t.trim().to_owned())
        .map_err(|source| ChannelError::File {
            path: path.display().to_string(),
            source,
        })
}

/// `msg` as a request carrying `authorization: Bearer <token>`.
pub fn with_token<T>(msg: T, token: &str) -> Result<Request<T>, ChannelError> {
    let mut req = Request::new(msg);
    let v: MetadataValue<_> = format!("Bearer {}", token.trim())
        .parse()
        .map_err(|_| ChannelError::BadToken)?;
    req.metadata_mut().insert("authorization", v);
    Ok(req)
}

/// The bearer token a request carries (server side).
pub fn bearer<T>(req: &Request<T>) -> Option<String> {
    req.metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_round_trips_and_garbage_is_refused() {
        let req = with_token((), " s3cret\n").unwrap();
        assert_eq!(bearer(&req).as_deref(), Some("s3cret"));
        assert!(matches!(with_token((), "bad\ntoken"), Err(ChannelError::BadToken)));
        assert_eq!(bearer(&Request::new(())), None);
    }
}
