//! The one inbound path: every connection into an enrolled pod's app,
//! whichever way it came (plaintext handed over by sk_lookup on 15006, a
//! stream out of the tunnel on 15008 through [`FromTunnel`], or a
//! connection from another pod of this node: the outbound path's local
//! hop, [`open_local`]), is opened by [`open`]: telemetry, the gate
//! deciding by `ferry_model::admission`, authorization by the
//! destination's `AuthorizationPolicy`s ([`authorize`]), delivery from the
//! client's own address. [`serve`] then carries it until it ends or a
//! policy change revokes it ([`recheck`]): as bytes, or, on an HTTP Service
//! port, per request with the HTTP attributes ([`http::destination`]). The
//! tunnel is only the transport.
//!
//! [`http::destination`]: super::http::destination

use std::{
    net::{IpAddr, SocketAddrV4},
    sync::{atomic::Ordering, Arc},
};

use ferry_model::{
    admin::Direction,
    admission::{self, InboundConn, Refusal},
    authz::{DenyReason, HttpAttrs, Request, Verdict},
    state::State,
    SpiffeId, Workload,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

use super::{app_ports::AppPort, copy, http::destination, PodCtx, Proxy};
use crate::{
    sockets,
    telemetry::{
        metrics::{tcp_labels, Peer, Reporter},
        outcome::{Denial, Outcome},
        Conn, ConnGuard,
    },
    tunnel::{BoxStream, Handler, Reject, TunnelRequest},
};

/// An admitted, delivered connection, waiting for its client stream.
pub struct Opened {
    guard: ConnGuard,
    app: TcpStream,
    /// Set when the app port is an HTTP Service port: served per request.
    http: Option<destination::Served>,
}

impl Opened {
    /// The connection's live record (byte counts, revocation).
    pub fn conn(&self) -> Arc<Conn> {
        self.guard.conn.clone()
    }

    /// The delivered connection to the app (socket options: `tcpKeepalive`).
    pub(crate) fn app(&self) -> &TcpStream {
        &self.app
    }
}

/// Admits and delivers `conn` to `pod`; every outcome, refusals included,
/// is recorded (access log, counters). `addressed` is the Service the
/// client addressed, when known (the local hop); else the metrics name the
/// Service behind the app port. On refusal or failure the client's stream
/// is to be closed (or answered by the tunnel).
///
/// On a port that does not carry HTTP the connection is authorized here,
/// at L4 (fail closed). On an HTTP Service port it is not refused by
/// policy: every request is decided with its HTTP attributes and a denied
/// one answered 403 (the connection-level check could only be more
/// restrictive than the policy asks).
pub async fn open(
    proxy: &Arc<Proxy>,
    pod: &Arc<PodCtx>,
    conn: InboundConn,
    addressed: Option<&str>,
) -> Result<Opened, Reject> {
    let (state, ports) = proxy.snapshot();
    let src = state.workload_by_ip(*conn.peer.ip());
    let source = match (src, &conn.identity) {
        (Some(w), _) => w.label(),
        (None, Some(id)) => id.to_string(),
        (None, None) => conn.peer.ip().to_string(),
    };
    let mut g = proxy
        .telemetry
        .open(conn.via, &pod.workload.namespace, source, conn.peer, conn.target);
    if let Some(id) = &conn.identity {
        let _ = g.conn.peer_identity.set(id.clone());
    }
    // Proven by mutual TLS only out of the tunnel; a same-node source's
    // identity is known first-hand, and its connection never leaves the node.
    let mtls = conn.via == Direction::Tunnel && conn.identity.is_some();
    // Formatted only when a proven identity makes it a label.
    let dst_id = mtls.then(|| pod.workload.spiffe_id());
    let port = ports.get(conn.target);
    let service = addressed.or(port.map(|p| p.service.as_str()));
    let labels = tcp_labels(
        Reporter::Destination,
        Peer {
            workload: src,
            principal: conn.identity.as_ref().filter(|_| mtls),
        },
        Peer {
            workload: Some(&pod.workload),
            principal: dst_id.as_ref(),
        },
        service,
        mtls,
    );
    let http = port.is_some_and(AppPort::is_http);
    if http {
        // Counted per request (the request metrics), not as TCP.
        g.conn.http.store(true, Ordering::Relaxed);
    } else {
        g.report(&labels);
    }
    // Read again now that the connection is in the live table: a policy
    // change from here on finds it there and re-checks it (`recheck`).
    let state = proxy.state();
    if let Err(r) = admission::admit(&state, &pod.workload, &conn) {
        tracing::warn!(pod = %pod.label, client = %conn.peer, via = %conn.via, reason = %r, "refused inbound connection");
        let reject = match r {
            Refusal::Misdirected { .. } => Reject::Misdirected,
            Refusal::PlaintextToStrict => Reject::Forbidden,
        };
        g.outcome = Outcome::Refused(r);
        return Err(reject);
    }
    if !http {
        let caller = Caller {
            peer: conn.peer,
            target: conn.target,
            identity: conn.identity.as_ref(),
        };
        let (denied, audited) = authorize(&state, &pod.workload, &caller, Scope::Connection, false);
        for policy in audited {
            tracing::info!(pod = %pod.label, source = %identity_label(conn.identity.as_ref()), client = %conn.peer, destination = %conn.target, policy = %policy, "authorization AUDIT policy matched");
            g.audited(policy);
        }
        if let Some(d) = denied {
            tracing::warn!(pod = %pod.label, source = %identity_label(conn.identity.as_ref()), client = %conn.peer, destination = %conn.target, via = %conn.via, policy = d.policy_label(), rule = %d.rule_label(), reason = d.reason.as_str(), "denied by authorization policy");
            g.outcome = Outcome::Denied(d);
            return Err(Reject::Forbidden);
        }
    }
    match proxy.deliver(pod, *conn.peer.ip(), conn.target).await {
        Ok(app) => Ok(Opened {
            guard: g,
            app,
            http: http.then(|| destination::Served {
                proxy: proxy.clone(),
                pod: pod.clone(),
                service: service.map(str::to_owned),
                labels,
            }),
        }),
        Err(error) => {
            tracing::warn!(pod = %pod.label, target = %conn.target, error = %error, "delivery failed");
            g.outcome = Outcome::Connect { to: conn.target, error };
            Err(Reject::Unavailable)
        }
    }
}

/// The local hop: a connection from `src` (a pod of this node, whose
/// outbound connection came from `client`) to `target` in `dst` (another
/// pod of this node), opened through [`open`] like any inbound connection.
/// The source's identity is its own SPIFFE id: the agent knows it
/// first-hand (the connection was steered from inside that pod), so
/// policies on principals and namespaces apply as across nodes.
pub async fn open_local(
    proxy: &Arc<Proxy>,
    src: &PodCtx,
    client: SocketAddrV4,
    dst: &Arc<PodCtx>,
    target: SocketAddrV4,
    addressed: Option<&str>,
) -> std::io::Result<Opened> {
    let conn = InboundConn {
        peer: SocketAddrV4::new(src.ip(), client.port()),
        target,
        identity: Some(src.workload.spiffe_id()),
        via: Direction::Inbound,
    };
    open(proxy, dst, conn, addressed).await.map_err(|r| {
        let (kind, what) = match r {
            Reject::Forbidden => (
                std::io::ErrorKind::PermissionDenied,
                "refused by the destination's policy",
            ),
            Reject::Misdirected => (
                std::io::ErrorKind::AddrNotAvailable,
                "target is not the destination pod",
            ),
            Reject::Unavailable => (std::io::ErrorKind::ConnectionRefused, "destination app unreachable"),
        };
        std::io::Error::new(kind, what)
    })
}

/// Carries an opened connection with `client` until it ends or is revoked:
/// a byte relay, or per request on an HTTP Service port.
pub async fn serve<S>(opened: Opened, client: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Opened { guard, app, http } = opened;
    match http {
        Some(cx) => destination::serve(cx, guard, app, client).await,
        None => relay(guard, app, client).await,
    }
}

/// Copies between the client's stream and the app until both end, or until
/// the connection is revoked (a policy change no longer allows it): then
/// both are closed.
async fn relay<S: AsyncRead + AsyncWrite + Unpin>(mut guard: ConnGuard, app: TcpStream, client: S) {
    let conn = guard.conn.clone();
    tokio::select! {
        r = copy::bidi(client, app, &conn.sent, &conn.received) => {
            if let Err(e) = r {
                guard.outcome = Outcome::Relay(e);
            }
        }
        d = conn.revoke.revoked() => guard.outcome = Outcome::Denied(d),
    }
}

/// Who is asking: the peer's address (the client pod's IP, kept end to
/// end), the app's address, and the identity the peer proved by mutual TLS
/// or the agent knows first-hand (same node); None: plaintext.
#[derive(Clone, Copy, Debug)]
pub struct Caller<'a> {
    pub peer: SocketAddrV4,
    pub target: SocketAddrV4,
    pub identity: Option<&'a SpiffeId>,
}

/// What a decision is about.
#[derive(Clone, Copy, Debug)]
pub enum Scope<'a> {
    /// A connection to a port that does not carry HTTP: L4 attributes only;
    /// an ALLOW rule that needs HTTP does not match, the HTTP parts of a
    /// DENY rule are taken as matching (fail closed).
    Connection,
    /// A live connection served per request (an HTTP Service port): denied
    /// only when the policies deny every request it could carry, i.e. an
    /// L4 denial that no HTTP attribute can change (a DENY rule matched
    /// without HTTP parts, allow-nothing, or ALLOW policies none of whose
    /// rules need HTTP and none matched). The rest is left to each request.
    HttpConnection,
    /// One HTTP request, with its attributes: the full decision.
    Request(HttpAttrs<'a>),
}

/// The authorization decision for `caller` to local workload `pod` under
/// `state` (the policies that apply to the workload as `state` knows it),
/// in `scope`. Returns the denial, if any, and the AUDIT policies that
/// matched (none for [`Scope::HttpConnection`]: audits are per request).
/// Only formats the identity when policies apply.
pub fn authorize(
    state: &State,
    pod: &Workload,
    caller: &Caller<'_>,
    scope: Scope<'_>,
    live: bool,
) -> (Option<Denial>, Vec<String>) {
    let w = state.workloads.get(&pod.uid).unwrap_or(pod);
    if state.authz_for(w).is_empty() {
        return (None, Vec::new());
    }
    let principal = caller.identity.map(SpiffeId::to_string);
    let req = Request {
        source_principal: principal.as_deref(),
        source_namespace: caller.identity.map(SpiffeId::namespace),
        source_ip: IpAddr::V4(*caller.peer.ip()),
        destination_ip: IpAddr::V4(*caller.target.ip()),
        destination_port: caller.target.port(),
        sni: None,
        http: match scope {
            Scope::Request(h) => Some(h),
            Scope::Connection | Scope::HttpConnection => None,
        },
    };
    state.authorize(w, &req, |d| {
        let denied = match d.verdict {
            Verdict::Allow { .. } => None,
            Verdict::Deny { reason, .. } if matches!(scope, Scope::HttpConnection) && !every_request(reason) => None,
            Verdict::Deny { policy, rule, reason } => Some(Denial {
                policy: policy.map(|p| p.to_string()),
                rule,
                reason,
                live,
            }),
        };
        let audited = match scope {
            Scope::HttpConnection => Vec::new(),
            _ => d.audited.iter().map(ToString::to_string).collect(),
        };
        (denied, audited)
    })
}

/// Whether an L4-only denial holds for every HTTP request on the
/// connection: the L4 parts decided it, so no request's attributes can
/// turn it into an allow (three-valued matching is monotone: what is
/// definite without HTTP stays so with it). `l7_deny_on_l4` and
/// `l7_allow_on_l4` depend on the request; `custom_unsupported` and
/// `unsupported_deny` are left to it too (it denies them anyway).
fn every_request(reason: DenyReason) -> bool {
    matches!(
        reason,
        DenyReason::MatchedDeny | DenyReason::AllowNothing | DenyReason::NoAllowMatched
    )
}

/// After a state swap: every live inbound connection to an enrolled pod of
/// this node (same-node ones included) is checked again under `state`'s
/// policies, and those no longer allowed are closed (their relay or HTTP
/// server ends; through HBONE the stream is reset), as ztunnel does. A
/// connection served per request is left alone (each request is decided
/// under the policies in force when it arrives), unless an upgrade turned
/// it into a byte stream: that is closed when every request it could carry
/// would be denied ([`Scope::HttpConnection`]). Nothing to do when no
/// policy exists.
pub fn recheck(proxy: &Proxy, state: &State) {
    if state.authorization_policies.is_empty() {
        return;
    }
    for c in proxy.telemetry.live() {
        if !matches!(c.direction, Direction::Inbound | Direction::Tunnel) {
            continue;
        }
        let Some(w) = state
            .workload_by_ip(*c.orig_dst.ip())
            .filter(|w| w.enrolled && w.node == state.node)
        else {
            continue;
        };
        let identity = c.peer_identity.get();
        let caller = Caller {
            peer: c.client,
            target: c.orig_dst,
            identity,
        };
        let scope = match (c.http.load(Ordering::Relaxed), c.upgraded.load(Ordering::Relaxed)) {
            // Served per request: every request is decided under the
            // policies in force when it arrives. Cutting the connection
            // would only turn a request on its way (new, or still being
            // read) into a 503 instead of its answer or its 403.
            (true, false) => continue,
            (true, true) => Scope::HttpConnection,
            (false, _) => Scope::Connection,
        };
        if let (Some(d), _) = authorize(state, w, &caller, scope, true) {
            tracing::warn!(pod = %w.label(), source = %identity_label(identity), client = %c.client, destination = %c.orig_dst, via = %c.direction, policy = d.policy_label(), rule = %d.rule_label(), reason = d.reason.as_str(), "live connection closed: a policy change denies it");
            c.revoke.revoke(d);
        }
    }
}

/// A peer's identity for logs: its SPIFFE id, or `-` (plaintext).
pub fn identity_label(id: Option<&SpiffeId>) -> String {
    id.map_or_else(|| "-".to_owned(), SpiffeId::to_string)
}

/// A plaintext connection handed over by sk_lookup, which kept the
/// destination: the accepted socket's local address is the app's.
pub async fn handle_plain(proxy: Arc<Proxy>, pod: Arc<PodCtx>, client: TcpStream) {
    let Ok((target, peer)) = sockets::v4_addrs(&client) else {
        return;
    };
    let conn = InboundConn {
        peer,
        target,
        identity: None,
        via: Direction::Inbound,
    };
    if let Ok(opened) = open(&proxy, &pod, conn, None).await {
        serve(opened, client).await;
    }
}

/// The tunnel's handler for one pod: its streams take the same path.
pub struct FromTunnel {
    pub proxy: Arc<Proxy>,
    pub pod: Arc<PodCtx>,
}

impl Handler for FromTunnel {
    type Accepted = Opened;

    async fn accept(&self, req: TunnelRequest) -> Result<Opened, Reject> {
        let conn = InboundConn {
            peer: req.peer,
            target: req.target,
            identity: req.identity,
            via: Direction::Tunnel,
        };
        open(&self.proxy, &self.pod, conn, None).await
    }

    async fn relay(&self, opened: Opened, stream: BoxStream) {
        serve(opened, stream).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_model::authz::HeaderPairs;

    fn state(policies: &str) -> State {
        let cfg = ferry_model::ConfigFile::parse(
            "t",
            &format!(
                "node: n1
workloads:
  - {{uid: web, name: web, node: n1, ip: 10.0.0.2, enrolled: true, labels: {{app: web}}}}
  - {{uid: client, name: client, serviceAccount: client, node: n1, ip: 10.0.0.3, enrolled: true}}
authorizationPolicies:
{policies}"
            ),
        )
        .unwrap();
        State::from_config(cfg, 1)
    }

    /// The decision's reason code, or "allow".
    fn decide(s: &State, scope: Scope<'_>) -> &'static str {
        let id = SpiffeId::new("default", "client");
        let caller = Caller {
            peer: "10.0.0.3:40000".parse().unwrap(),
            target: "10.0.0.2:8080".parse().unwrap(),
            identity: Some(&id),
        };
        let pod = s.workloads["web"].clone();
        match authorize(s, &pod, &caller, scope, false).0 {
            None => "allow",
            Some(d) => d.reason.as_str(),
        }
    }

    fn request<'a>(method: &'a str, path: &'a str, h: &'a HeaderPairs<'a>) -> Scope<'a> {
        Scope::Request(HttpAttrs {
            method,
            path,
            host: "web",
            headers: h,
        })
    }

    #[test]
    fn http_ports_defer_to_requests_and_tcp_ports_fail_closed() {
        let h = HeaderPairs(&[]);
        // An ALLOW that needs HTTP: denied on a TCP port, left to each
        // request on an HTTP port.
        let get_only =
            state("  - {name: get-only, namespace: default, spec: {rules: [{to: [{operation: {methods: [GET]}}]}]}}\n");
        assert_eq!(decide(&get_only, Scope::Connection), "l7_allow_on_l4");
        assert_eq!(decide(&get_only, Scope::HttpConnection), "allow");
        assert_eq!(decide(&get_only, request("GET", "/", &h)), "allow");
        assert_eq!(decide(&get_only, request("POST", "/", &h)), "no_allow_matched");

        // DENY before ALLOW, per request; the connection is not cut for it.
        let deny_path = state("  - {name: all, namespace: default, spec: {rules: [{}]}}\n  - {name: no-admin, namespace: default, spec: {action: DENY, rules: [{to: [{operation: {paths: [/admin]}}]}]}}\n");
        assert_eq!(decide(&deny_path, Scope::Connection), "l7_deny_on_l4");
        assert_eq!(decide(&deny_path, Scope::HttpConnection), "allow");
        assert_eq!(decide(&deny_path, request("GET", "/admin", &h)), "matched_deny");
        assert_eq!(decide(&deny_path, request("GET", "/", &h)), "allow");

        // Denials no request could escape hold for the whole connection.
        let nothing = state("  - {name: allow-nothing, namespace: default, spec: {}}\n");
        assert_eq!(decide(&nothing, Scope::HttpConnection), "allow_nothing");
        let deny_client = state("  - {name: no-client, namespace: default, spec: {action: DENY, rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/client]}}]}]}}\n");
        assert_eq!(decide(&deny_client, Scope::HttpConnection), "matched_deny");
        let other_only = state(
            "  - {name: other, namespace: default, spec: {rules: [{from: [{source: {namespaces: [other]}}]}]}}\n",
        );
        assert_eq!(decide(&other_only, Scope::HttpConnection), "no_allow_matched");
        assert_eq!(decide(&other_only, request("GET", "/", &h)), "no_allow_matched");
    }
}
