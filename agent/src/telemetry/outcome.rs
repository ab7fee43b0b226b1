//! How a proxied connection ended: a closed set of outcomes, each with a
//! stable code (access logs, metrics) and a human detail (`Display`).

use std::{fmt, io, net::SocketAddrV4};

use ferry_model::{admission::Refusal, authz::DenyReason, state::RouteError};

#[derive(Debug)]
pub enum Outcome {
    /// Relayed until both sides closed.
    Ok,
    /// Refused by the inbound gate.
    Refused(Refusal),
    /// Denied by authorization policy: when opened, or cut by a re-check
    /// after a policy change.
    Denied(Denial),
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
    /// The stable code: `ok`, `refused`, `denied`, `no_orig_dst`,
    /// `no_route`, `connect_failed` or `relay_error`.
    pub fn code(&self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Refused(_) => "refused",
            Outcome::Denied(_) => "denied",
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
            Outcome::Denied(d) => write!(f, "denied: {d}"),
            Outcome::NoOrigDst => f.write_str("no original destination recorded"),
            Outcome::NoRoute(e) => write!(f, "no route: {e}"),
            Outcome::Connect { to, error } => write!(f, "connect {to}: {error}"),
            Outcome::Relay(e) => write!(f, "relay: {e}"),
        }
    }
}

/// An authorization denial: the deciding policy and rule (when one decided)
/// and the stable reason code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denial {
    /// `namespace/name`; None when no ALLOW policy matched.
    pub policy: Option<String>,
    pub rule: Option<usize>,
    pub reason: DenyReason,
    /// Cut while live, by a re-check after a policy change.
    pub live: bool,
}

impl Denial {
    /// The policy's `namespace/name`, or `-` (logs and metric labels).
    pub fn policy_label(&self) -> &str {
        self.policy.as_deref().unwrap_or("-")
    }

    /// The rule index, or `-`.
    pub fn rule_label(&self) -> String {
        self.rule.map_or_else(|| "-".into(), |r| r.to_string())
    }
}

/// `<reason>[ policy ns/name[rule]][ (live re-check)]`, e.g.
/// `matched_deny policy default/deny-foo[0]`.
impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.reason)?;
        if let Some(p) = &self.policy {
            write!(f, " policy {p}")?;
            if let Some(r) = self.rule {
                write!(f, "[{r}]")?;
            }
        }
        if self.live {
            f.write_str(" (live re-check)")?;
        }
        Ok(())
    }
}
