//! How a proxied connection ended: a closed set of outcomes, each with a
//! stable code (access logs, metrics) and a human detail (`Display`).

use std::{fmt, io, net::SocketAddrV4};

use ferry_model::{admission::Refusal, state::RouteError};

#[derive(Debug)]
pub enum Outcome {
    /// Relayed until both sides closed.
    Ok,
    /// Refused by the inbound gate.
    Refused(Refusal),
    /// An outbound connection eBPF recorded no original destination for.
    NoOrigDst,
    /// No route to the original destination.
    NoRoute(RouteError),
    /// The next hop (app, tunnel or direct destination) could not be reached.
    Connect { to: SocketAddrV4, error: io::Error },
    /// The connection broke while relaying.
    Relay(io::Error),
}

impl Outcome {
    /// The stable code: `ok`, `refused`, `no_orig_dst`, `no_route`,
    /// `connect_failed` or `relay_error`.
    pub fn code(&self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Refused(_) => "refused",
            Outcome::NoOrigDst => "no_orig_dst",
            Outcome::NoRoute(_) => "no_route",
            Outcome::Connect { .. } => "connect_failed",
            Outcome::Relay(_) => "relay_error",
        }
    }

    pub fn is_ok(&self) -> bool {
        matches!(self, Outcome::Ok)
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Ok => f.write_str("ok"),
            Outcome::Refused(r) => write!(f, "refused: {r}"),
            Outcome::NoOrigDst => f.write_str("no original destination recorded"),
            Outcome::NoRoute(e) => write!(f, "no route: {e}"),
            Outcome::Connect { to, error } => write!(f, "connect {to}: {error}"),
            Outcome::Relay(e) => write!(f, "relay: {e}"),
        }
    }
}
