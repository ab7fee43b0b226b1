//! The agent's admin endpoint as ferryctl reads it: one HTTP/1.0 GET per
//! view, its answer parsed into the typed views of `ferry_model::admin`.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use ferry_model::admin::{AuthzCheck, AuthzQuery, CertView, ConfigDump, ConnView, EndpointHealth, Stats};
use serde::de::DeserializeOwned;

use crate::CtlError;

/// `/config_dump`: the agent's whole state.
pub(crate) fn config_dump(addr: SocketAddr) -> Result<ConfigDump<'static>, CtlError> {
    get(addr, "/config_dump")
}

/// `/conns`: live proxied connections.
pub(crate) fn conns(addr: SocketAddr) -> Result<Vec<ConnView>, CtlError> {
    get(addr, "/conns")
}

/// `/certs`: workload certificates.
pub(crate) fn certs(addr: SocketAddr) -> Result<Vec<CertView>, CtlError> {
    get(addr, "/certs")
}

/// `/endpoints`: per-endpoint load-balancing and outlier-detection state.
pub(crate) fn endpoints(addr: SocketAddr) -> Result<Vec<EndpointHealth>, CtlError> {
    get(addr, "/endpoints")
}

/// `/stats`: the proxy's counters.
pub(crate) fn stats(addr: SocketAddr) -> Result<Stats, CtlError> {
    get(addr, "/stats")
}

/// `/authz?...`: the agent's authorization dry run from its live state.
pub(crate) fn authz(addr: SocketAddr, q: &AuthzQuery) -> Result<AuthzCheck, CtlError> {
    let resp = fetch(addr, &format!("/authz?{}", q.to_query()))?;
    if let Some((head, body)) = resp.split_once("\r\n\r\n") {
        if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
            return Err(CtlError::Other(format!(
                "agent admin {addr}/authz: {}: {}",
                head.lines().next().unwrap_or(""),
                body.lines().next().unwrap_or("")
            )));
        }
    }
    parse(addr, "/authz", &resp)
}

fn get<T: DeserializeOwned>(addr: SocketAddr, path: &'static str) -> Result<T, CtlError> {
    parse(addr, path, &fetch(addr, path)?)
}

/// One HTTP/1.0 GET: the whole response.
fn fetch(addr: SocketAddr, path: &str) -> Result<String, CtlError> {
    let down = |e| CtlError::AgentDown(addr, e);
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(down)?;
    s.set_read_timeout(Some(Duration::from_secs(5))).map_err(down)?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: ferry-admin\r\n\r\n").map_err(down)?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).map_err(down)?;
    Ok(resp)
}

/// An HTTP response from the admin endpoint: status checked, JSON body
/// parsed into `T`.
pub(crate) fn parse<T: DeserializeOwned>(addr: SocketAddr, path: &'static str, resp: &str) -> Result<T, CtlError> {
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .ok_or_else(|| CtlError::Other(format!("agent admin {addr}{path}: malformed HTTP response")))?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(CtlError::Other(format!(
            "agent admin {addr}{path}: {}",
            head.lines().next().unwrap_or("")
        )));
    }
    serde_json::from_str(body).map_err(|error| CtlError::BadAnswer { addr, path, error })
}
