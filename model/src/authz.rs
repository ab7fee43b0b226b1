//! Authorization (Istio's `security.istio.io/v1` `AuthorizationPolicy`, same
//! shape and field names): the policy types, their validation ([`validate`]),
//! which workloads a policy applies to ([`applies_to`]) and the decision for
//! one connection or HTTP request ([`evaluate`]), all pure functions with no
//! I/O. The agent's inbound gate asks [`evaluate`]; the control plane and
//! `ferryctl analyze` ask [`validate`] and [`needs_http`]. The model, and
//! where Ferry differs from Istio, is in docs/security.md.
//!
//! Evaluation follows Istio: CUSTOM, then DENY, then ALLOW; AUDIT only
//! records. Matching is three-valued: a part of a rule that cannot be checked
//! (an HTTP attribute on an L4-only check, or something Ferry does not
//! support) is *unknown*, and an unknown rule never allows but always denies
//! (fail closed), which is what istiod asks of ztunnel and of Envoy's TCP
//! filter.

use std::{fmt, net::IpAddr, str::FromStr};

use serde::{Deserialize, Serialize};

use crate::{
    peer_auth::{Metadata, Selector},
    workload::Workload,
};

pub use crate::peer_auth::ROOT_NAMESPACE;

// ---------------------------------------------------------------------------
// Types: the policy as written (Istio's spec, field for field).

/// An AuthorizationPolicy as the agent holds it: where it lives and its spec.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthzPolicy {
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub spec: AuthorizationPolicySpec,
}

/// Istio's `AuthorizationPolicy` spec.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    /// The workloads (by label, in the policy's namespace; in every namespace
    /// for a policy in the root namespace). Absent: the whole namespace.
    #[serde(default)]
    pub selector: Option<Selector>,
    /// Deprecated singular form of `targetRefs` (still accepted by Istio).
    #[serde(default)]
    pub target_ref: Option<TargetRef>,
    /// Resources the policy is attached to; Ferry honours `Service`.
    #[serde(default)]
    pub target_refs: Vec<TargetRef>,
    #[serde(default)]
    pub action: Action,
    /// The external authorizer of a CUSTOM policy.
    #[serde(default)]
    pub provider: Option<Provider>,
    /// No rules: an ALLOW policy matches nothing (allow-nothing), a DENY
    /// policy denies nothing.
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// Istio's `PolicyTargetReference`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetRef {
    #[serde(default)]
    pub group: String,
    pub kind: String,
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Provider {
    pub name: String,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    #[default]
    Allow,
    Deny,
    /// Records a match (access log); never decides.
    Audit,
    /// Delegates to an external authorizer, which Ferry does not have.
    Custom,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
            Action::Audit => "AUDIT",
            Action::Custom => "CUSTOM",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One rule: `from`, `to` and `when` are ANDed; entries of each list ORed.
/// An absent (or empty) list matches everything.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub from: Vec<RuleFrom>,
    #[serde(default)]
    pub to: Vec<RuleTo>,
    #[serde(default)]
    pub when: Vec<Condition>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleFrom {
    #[serde(default)]
    pub source: Source,
}

/// Who sends. Fields are ANDed; values within a field ORed; a `not*` field
/// matches when none of its values does.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    /// Peer identities without `spiffe://` (`cluster.local/ns/x/sa/y`).
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    /// JWT principals: refused (Ferry has no RequestAuthentication).
    #[serde(default)]
    pub request_principals: Vec<String>,
    #[serde(default)]
    pub not_request_principals: Vec<String>,
    /// The peer's namespace, from its identity.
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    /// `ns/sa`, or `sa` for the policy's namespace; exact.
    #[serde(default)]
    pub service_accounts: Vec<String>,
    #[serde(default)]
    pub not_service_accounts: Vec<String>,
    /// The peer's IP: addresses or CIDR blocks.
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
    /// The original client's IP; Ferry trusts no X-Forwarded-For nor PROXY
    /// header, so this is the peer's IP, as `ipBlocks`.
    #[serde(default)]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_remote_ip_blocks: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleTo {
    #[serde(default)]
    pub operation: Operation,
}

/// What is asked. Hosts, methods and paths are HTTP attributes; ports are not.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    /// The Host / `:authority`, compared without regard to case.
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub not_hosts: Vec<String>,
    /// Destination ports, as decimal strings.
    #[serde(default)]
    pub ports: Vec<String>,
    #[serde(default)]
    pub not_ports: Vec<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub not_methods: Vec<String>,
    /// The path without its query string.
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub not_paths: Vec<String>,
}

/// A `when` condition: the key's value must match one of `values` (if set)
/// and none of `notValues`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    pub key: String,
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub not_values: Vec<String>,
}

/// The AuthorizationPolicy documents of a multi-document YAML text, as
/// [`AuthzPolicy`] (namespace `default` when omitted); other kinds are skipped.
pub fn authz_policies_in(text: &str) -> Result<Vec<AuthzPolicy>, String> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Manifest {
        metadata: Metadata,
        #[serde(default)]
        spec: AuthorizationPolicySpec,
    }
    let mut out = Vec::new();
    for (line, doc) in crate::yaml::split_documents(text) {
        let v: serde_norway::Value =
            serde_norway::from_str(&doc).map_err(|e| format!("document at line {line}: {e}"))?;
        if v.get("kind").and_then(|k| k.as_str()) == Some("AuthorizationPolicy") {
            let m: Manifest = serde_norway::from_value(v)
                .map_err(|e| format!("document at line {line} (AuthorizationPolicy): {e}"))?;
            out.push(AuthzPolicy {
                namespace: m.metadata.namespace.unwrap_or_else(|| "default".into()),
                name: m.metadata.name,
                spec: m.spec,
            });
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// The request: what the gate knows about one connection or HTTP request.

/// One connection (L4) or HTTP request (L7) to a workload.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// The identity the peer proved with mutual TLS, as a SPIFFE URI
    /// (`spiffe://cluster.local/ns/default/sa/x`); None for plaintext.
    pub source_principal: Option<&'a str>,
    /// The peer's namespace, from its identity (see [`principal_parts`]);
    /// None for plaintext.
    pub source_namespace: Option<&'a str>,
    pub source_ip: IpAddr,
    pub destination_ip: IpAddr,
    pub destination_port: u16,
    /// The TLS server name the peer asked for, if any.
    pub sni: Option<&'a str>,
    /// None: an L4-only check (a TCP port, or the connection before its
    /// HTTP is parsed).
    pub http: Option<HttpAttrs<'a>>,
}

/// The HTTP attributes of a request.
#[derive(Clone, Copy)]
pub struct HttpAttrs<'a> {
    pub method: &'a str,
    /// The normalized path; a query string is ignored.
    pub path: &'a str,
    /// The Host header or `:authority`, port included if the client sent one.
    pub host: &'a str,
    pub headers: &'a dyn Headers,
}

impl fmt::Debug for HttpAttrs<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpAttrs")
            .field("method", &self.method)
            .field("path", &self.path)
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

/// Request headers by name (names compare without regard to case).
pub trait Headers {
    fn get(&self, name: &str) -> Option<&str>;
}

/// Headers as `(name, value)` pairs; the first pair with the name wins.
#[derive(Clone, Copy, Debug, Default)]
pub struct HeaderPairs<'a>(pub &'a [(&'a str, &'a str)]);

impl Headers for HeaderPairs<'_> {
    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }
}

/// `(namespace, service account)` of a workload SPIFFE id
/// (`spiffe://<trust domain>/ns/<ns>/sa/<sa>`), borrowed; None otherwise.
pub fn principal_parts(principal: &str) -> Option<(&str, &str)> {
    let rest = principal.strip_prefix("spiffe://")?;
    let (_td, rest) = rest.split_once("/ns/")?;
    let (ns, sa) = rest.split_once("/sa/")?;
    (!ns.is_empty() && !sa.is_empty() && !sa.contains('/')).then_some((ns, sa))
}

// ---------------------------------------------------------------------------
// The decision.

/// A policy, by namespace and name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyRef<'p> {
    pub namespace: &'p str,
    pub name: &'p str,
}

impl<'p> PolicyRef<'p> {
    pub fn of(p: &'p AuthzPolicy) -> Self {
        PolicyRef {
            namespace: &p.namespace,
            name: &p.name,
        }
    }
}

impl fmt::Display for PolicyRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Why a request was denied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenyReason {
    /// A CUSTOM policy's rule matched: it needs an external authorizer, which
    /// Ferry does not have, so it fails closed.
    Custom,
    /// A DENY rule matched.
    MatchedDeny,
    /// A DENY rule matched on its L4 parts; its HTTP parts could not be
    /// checked (L4-only), so they were taken as matching.
    L7DenyOnL4,
    /// A DENY rule matched except for parts Ferry does not support, taken as
    /// matching.
    UnsupportedDeny,
    /// Every ALLOW policy that applies has no rules (`spec: {}`).
    AllowNothing,
    /// ALLOW policies apply and none matched.
    NoAllowMatched,
    /// As `NoAllowMatched`, on an L4-only check where some ALLOW rules need
    /// HTTP attributes (those never match at L4).
    L7AllowOnL4,
}

impl DenyReason {
    /// Stable code (metrics, access logs).
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::Custom => "custom_unsupported",
            DenyReason::MatchedDeny => "matched_deny",
            DenyReason::L7DenyOnL4 => "l7_deny_on_l4",
            DenyReason::UnsupportedDeny => "unsupported_deny",
            DenyReason::AllowNothing => "allow_nothing",
            DenyReason::NoAllowMatched => "no_allow_matched",
            DenyReason::L7AllowOnL4 => "l7_allow_on_l4",
        }
    }
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Allowed or denied, and by what.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict<'p> {
    /// `by`: the ALLOW policy and rule that matched; None when no ALLOW
    /// policy applies (allowed by default).
    Allow {
        by: Option<PolicyRef<'p>>,
        rule: Option<usize>,
    },
    /// `policy`/`rule`: the policy and rule that denied, when one did (not
    /// for `NoAllowMatched`/`L7AllowOnL4`; for `AllowNothing` the first
    /// rule-less ALLOW policy).
    Deny {
        policy: Option<PolicyRef<'p>>,
        rule: Option<usize>,
        reason: DenyReason,
    },
}

impl Verdict<'_> {
    pub fn is_allow(&self) -> bool {
        matches!(self, Verdict::Allow { .. })
    }
    /// Stable code: `allow`, or the deny reason's code.
    pub fn code(&self) -> &'static str {
        match self {
            Verdict::Allow { .. } => "allow",
            Verdict::Deny { reason, .. } => reason.as_str(),
        }
    }
}

/// `allow`, `allow ns/name[0]`, `deny ns/name[1] matched_deny`,
/// `deny no_allow_matched`.
impl fmt::Display for Verdict<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (word, policy, rule) = match self {
            Verdict::Allow { by, rule } => ("allow", by, rule),
            Verdict::Deny { policy, rule, .. } => ("deny", policy, rule),
        };
        f.write_str(word)?;
        if let Some(p) = policy {
            write!(f, " {p}")?;
            if let Some(r) = rule {
                write!(f, "[{r}]")?;
            }
        }
        if let Verdict::Deny { reason, .. } = self {
            write!(f, " {reason}")?;
        }
        Ok(())
    }
}

/// The verdict, and the AUDIT policies whose rules matched (to be logged;
/// they never change the verdict).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision<'p> {
    pub verdict: Verdict<'p>,
    pub audited: Vec<PolicyRef<'p>>,
}

impl fmt::Display for Decision<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.verdict)?;
        for (i, p) in self.audited.iter().enumerate() {
            f.write_str(if i == 0 { " audit " } else { "," })?;
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

/// The decision for `req` under `policies` (those that apply to the
/// destination workload; see [`applies_to`]), as Istio takes it:
///
/// 1. a CUSTOM policy whose rule matches denies (no external authorizer);
/// 2. a DENY policy whose rule matches denies;
/// 3. no ALLOW policy: allow; an ALLOW policy whose rule matches: allow;
///    else deny.
///
/// AUDIT policies whose rules match are listed in [`Decision::audited`].
/// On an L4-only check (`req.http` None) an ALLOW (or AUDIT) rule that uses
/// HTTP attributes does not match, and the HTTP parts of a DENY or CUSTOM
/// rule are taken as matching. Allocates only when an AUDIT policy matches.
pub fn evaluate<'p>(policies: &[&'p AuthzPolicy], req: &Request<'_>) -> Decision<'p> {
    let audited = policies
        .iter()
        .filter(|p| p.spec.action == Action::Audit)
        .filter(|p| allowing_rule(p, req).is_ok())
        .map(|p| PolicyRef::of(p))
        .collect();
    Decision {
        verdict: verdict(policies, req),
        audited,
    }
}

fn verdict<'p>(policies: &[&'p AuthzPolicy], req: &Request<'_>) -> Verdict<'p> {
    for (action, definite) in [
        (Action::Custom, DenyReason::Custom),
        (Action::Deny, DenyReason::MatchedDeny),
    ] {
        // A definite match anywhere is the better explanation than an unknown one.
        let mut unsure: Option<(&AuthzPolicy, usize, Unknown)> = None;
        for p in policies.iter().filter(|p| p.spec.action == action) {
            match denying_rule(p, req) {
                Some((rule, M::Yes)) => {
                    return Verdict::Deny {
                        policy: Some(PolicyRef::of(p)),
                        rule: Some(rule),
                        reason: definite,
                    }
                }
                Some((rule, M::Unknown(why))) if unsure.is_none() => unsure = Some((p, rule, why)),
                _ => {}
            }
        }
        if let Some((p, rule, why)) = unsure {
            let reason = match (action, why) {
                (Action::Custom, _) => DenyReason::Custom,
                (_, Unknown::NeedsHttp) => DenyReason::L7DenyOnL4,
                (_, Unknown::Unsupported) => DenyReason::UnsupportedDeny,
            };
            return Verdict::Deny {
                policy: Some(PolicyRef::of(p)),
                rule: Some(rule),
                reason,
            };
        }
    }

    let mut first_allow = None;
    let mut all_empty = true;
    let mut skipped_l7 = false;
    for p in policies.iter().filter(|p| p.spec.action == Action::Allow) {
        first_allow.get_or_insert(PolicyRef::of(p));
        all_empty &= p.spec.rules.is_empty();
        match allowing_rule(p, req) {
            Ok(rule) => {
                return Verdict::Allow {
                    by: Some(PolicyRef::of(p)),
                    rule: Some(rule),
                }
            }
            Err(skipped) => skipped_l7 |= skipped,
        }
    }
    match first_allow {
        None => Verdict::Allow { by: None, rule: None },
        Some(p) if all_empty => Verdict::Deny {
            policy: Some(p),
            rule: None,
            reason: DenyReason::AllowNothing,
        },
        Some(_) => Verdict::Deny {
            policy: None,
            rule: None,
            reason: if skipped_l7 {
                DenyReason::L7AllowOnL4
            } else {
                DenyReason::NoAllowMatched
            },
        },
    }
}

/// The first rule of an ALLOW/AUDIT policy that definitely matches; else
/// whether a rule was skipped for needing HTTP on an L4-only check. As in
/// istiod's translation for ztunnel and Envoy's TCP filter, such a rule is
/// dropped whole, even if another of its operations is L4-only.
fn allowing_rule(p: &AuthzPolicy, req: &Request<'_>) -> Result<usize, bool> {
    let mut skipped = false;
    for (i, rule) in p.spec.rules.iter().enumerate() {
        if req.http.is_none() && rule_needs_http(rule) {
            skipped = true;
            continue;
        }
        if rule_matches(rule, req, &p.namespace) == M::Yes {
            return Ok(i);
        }
    }
    Err(skipped)
}

/// The first rule of a DENY/CUSTOM policy that matches definitely, else the
/// first that might (unknown parts taken as matching).
fn denying_rule(p: &AuthzPolicy, req: &Request<'_>) -> Option<(usize, M)> {
    let mut unsure = None;
    for (i, rule) in p.spec.rules.iter().enumerate() {
        match rule_matches(rule, req, &p.namespace) {
            M::Yes => return Some((i, M::Yes)),
            m @ M::Unknown(_) if unsure.is_none() => unsure = Some((i, m)),
            _ => {}
        }
    }
    unsure
}

// ---------------------------------------------------------------------------
// Matching, three-valued.

/// Why a part of a rule could not be checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Unknown {
    /// An HTTP attribute, on an L4-only check.
    NeedsHttp,
    /// Something Ferry does not support (JWT, an unknown key, a bad value).
    Unsupported,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum M {
    No,
    Yes,
    Unknown(Unknown),
}

impl M {
    fn of(b: bool) -> M {
        if b {
            M::Yes
        } else {
            M::No
        }
    }
    fn and(self, o: M) -> M {
        match (self, o) {
            (M::No, _) | (_, M::No) => M::No,
            (M::Unknown(u), _) | (_, M::Unknown(u)) => M::Unknown(u),
            _ => M::Yes,
        }
    }
    fn or(self, o: M) -> M {
        match (self, o) {
            (M::Yes, _) | (_, M::Yes) => M::Yes,
            (M::Unknown(u), _) | (_, M::Unknown(u)) => M::Unknown(u),
            _ => M::No,
        }
    }
    fn not(self) -> M {
        match self {
            M::Yes => M::No,
            M::No => M::Yes,
            u => u,
        }
    }
}

/// ORs `f` over `items`, stopping at the first definite match.
fn any<T>(items: &[T], mut f: impl FnMut(&T) -> M) -> M {
    let mut m = M::No;
    for it in items {
        m = m.or(f(it));
        if m == M::Yes {
            break;
        }
    }
    m
}

/// ANDs the expressions lazily, stopping at the first definite mismatch.
macro_rules! all_of {
    ($($e:expr),+ $(,)?) => {{
        let mut m = M::Yes;
        $( if m != M::No { m = m.and($e); } )+
        m
    }};
}

/// A field with its `not*` twin: one of `values` (if any) and none of `not`.
fn field(values: &[String], not: &[String], f: impl Fn(&str) -> M) -> M {
    let pos = if values.is_empty() {
        M::Yes
    } else {
        any(values, |v| f(v))
    };
    if pos == M::No || not.is_empty() {
        return pos;
    }
    pos.and(any(not, |v| f(v)).not())
}

fn rule_matches(rule: &Rule, req: &Request<'_>, policy_ns: &str) -> M {
    let or_empty = |m: M, empty: bool| if empty { M::Yes } else { m };
    all_of!(
        or_empty(
            any(&rule.from, |f| source_matches(&f.source, req, policy_ns)),
            rule.from.is_empty()
        ),
        or_empty(
            any(&rule.to, |t| operation_matches(&t.operation, req)),
            rule.to.is_empty()
        ),
        rule.when.iter().fold(M::Yes, |m, c| if m == M::No {
            m
        } else {
            m.and(condition_matches(c, req))
        }),
    )
}

fn source_matches(s: &Source, req: &Request<'_>, policy_ns: &str) -> M {
    all_of!(
        field(&s.principals, &s.not_principals, |v| principal_match(
            v,
            req.source_principal
        )),
        field(&s.namespaces, &s.not_namespaces, |v| opt_match(v, req.source_namespace)),
        field(&s.service_accounts, &s.not_service_accounts, |v| {
            service_account_match(v, policy_ns, req.source_principal)
        }),
        field(&s.ip_blocks, &s.not_ip_blocks, |v| ip_match(v, req.source_ip)),
        field(&s.remote_ip_blocks, &s.not_remote_ip_blocks, |v| ip_match(
            v,
            req.source_ip
        )),
        // No JWT: these can never be checked.
        field(&s.request_principals, &s.not_request_principals, |_| M::Unknown(
            Unknown::Unsupported
        )),
    )
}

fn operation_matches(o: &Operation, req: &Request<'_>) -> M {
    let http = |f: &dyn Fn(&HttpAttrs<'_>) -> bool| match &req.http {
        Some(h) => M::of(f(h)),
        None => M::Unknown(Unknown::NeedsHttp),
    };
    all_of!(
        field(&o.ports, &o.not_ports, |v| port_match(v, req.destination_port)),
        field(&o.hosts, &o.not_hosts, |v| http(&|h| string_match(v, h.host, true))),
        field(&o.methods, &o.not_methods, |v| http(&|h| string_match(
            v, h.method, false
        ))),
        field(&o.paths, &o.not_paths, |v| {
            if is_path_template(v) {
                return M::Unknown(Unknown::Unsupported);
            }
            http(&|h| string_match(v, strip_query(h.path), false))
        }),
    )
}

fn condition_matches(c: &Condition, req: &Request<'_>) -> M {
    let key = ConditionKey::parse(&c.key);
    field(&c.values, &c.not_values, |v| match key {
        ConditionKey::Header(name) => match &req.http {
            Some(h) => M::of(h.headers.get(name).is_some_and(|x| string_match(v, x, false))),
            None => M::Unknown(Unknown::NeedsHttp),
        },
        ConditionKey::SourceIp | ConditionKey::RemoteIp => ip_match(v, req.source_ip),
        ConditionKey::DestinationIp => ip_match(v, req.destination_ip),
        ConditionKey::DestinationPort => port_match(v, req.destination_port),
        ConditionKey::SourceNamespace => opt_match(v, req.source_namespace),
        ConditionKey::SourcePrincipal => principal_match(v, req.source_principal),
        ConditionKey::Sni => opt_match(v, req.sni),
        ConditionKey::RequestAuth | ConditionKey::Envoy | ConditionKey::Unknown => M::Unknown(Unknown::Unsupported),
    })
}

/// Istio's string values: `*` (present, non-empty), `*suffix`, `prefix*`,
/// else exact. `fold`: ASCII case-insensitive (hosts).
fn string_match(pattern: &str, value: &str, fold: bool) -> bool {
    let eq = |a: &[u8], b: &[u8]| if fold { a.eq_ignore_ascii_case(b) } else { a == b };
    let (p, v) = (pattern.as_bytes(), value.as_bytes());
    if p == b"*" {
        return !v.is_empty();
    }
    if let Some(suffix) = p.strip_prefix(b"*") {
        return v.len() >= suffix.len() && eq(&v[v.len() - suffix.len()..], suffix);
    }
    if let Some(prefix) = p.strip_suffix(b"*") {
        return v.len() >= prefix.len() && eq(&v[..prefix.len()], prefix);
    }
    eq(p, v)
}

fn opt_match(pattern: &str, value: Option<&str>) -> M {
    M::of(value.is_some_and(|v| string_match(pattern, v, false)))
}

/// Policies write principals without `spiffe://`; an identity that is not a
/// SPIFFE URI (or none: plaintext) matches no principal.
fn principal_match(pattern: &str, principal: Option<&str>) -> M {
    opt_match(pattern, principal.and_then(|p| p.strip_prefix("spiffe://")))
}

fn service_account_match(pattern: &str, policy_ns: &str, principal: Option<&str>) -> M {
    let (ns, sa) = pattern.split_once('/').unwrap_or((policy_ns, pattern));
    M::of(principal.and_then(principal_parts) == Some((ns, sa)))
}

fn ip_match(pattern: &str, ip: IpAddr) -> M {
    match pattern.parse::<Cidr>() {
        Ok(c) => M::of(c.contains(ip)),
        Err(_) => M::Unknown(Unknown::Unsupported),
    }
}

fn port_match(pattern: &str, port: u16) -> M {
    match parse_port(pattern) {
        Some(p) => M::of(p == port),
        None => M::Unknown(Unknown::Unsupported),
    }
}

fn parse_port(s: &str) -> Option<u16> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn strip_query(path: &str) -> &str {
    path.find(['?', '#']).map_or(path, |i| &path[..i])
}

/// Envoy URI templates (`{*}`, `{**}`), which Ferry does not support.
fn is_path_template(p: &str) -> bool {
    p.contains("{*}") || p.contains("{**}")
}

// ---------------------------------------------------------------------------
// Condition keys (https://istio.io/latest/docs/reference/config/security/conditions/).

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ConditionKey<'a> {
    /// `request.headers[<name>]` (HTTP only).
    Header(&'a str),
    SourceIp,
    /// Istio's original client IP (X-Forwarded-For or PROXY protocol); Ferry
    /// trusts neither, so it is the peer's IP.
    RemoteIp,
    SourceNamespace,
    SourcePrincipal,
    DestinationIp,
    DestinationPort,
    Sni,
    /// `request.auth.*` (JWT, HTTP only): not supported.
    RequestAuth,
    /// `experimental.envoy.filters.*`: Envoy's filter metadata, not supported.
    Envoy,
    Unknown,
}

impl<'a> ConditionKey<'a> {
    fn parse(key: &'a str) -> Self {
        if let Some(name) = key.strip_prefix("request.headers[").and_then(|r| r.strip_suffix(']')) {
            return if name.is_empty() {
                ConditionKey::Unknown
            } else {
                ConditionKey::Header(name)
            };
        }
        match key {
            "source.ip" => ConditionKey::SourceIp,
            "remote.ip" => ConditionKey::RemoteIp,
            "source.namespace" => ConditionKey::SourceNamespace,
            "source.principal" => ConditionKey::SourcePrincipal,
            "destination.ip" => ConditionKey::DestinationIp,
            "destination.port" => ConditionKey::DestinationPort,
            "connection.sni" => ConditionKey::Sni,
            k if k.starts_with("request.auth.") => ConditionKey::RequestAuth,
            k if k.starts_with("experimental.envoy.filters.") => ConditionKey::Envoy,
            _ => ConditionKey::Unknown,
        }
    }
}

const SUPPORTED_KEYS: &str = "request.headers[<name>], source.ip, remote.ip, source.namespace, \
     source.principal, destination.ip, destination.port, connection.sni";

// ---------------------------------------------------------------------------
// HTTP needs.

/// Whether any rule of `p` uses an HTTP-only attribute: hosts, methods,
/// paths (or their `not*`), `request.headers[...]`, or the JWT attributes
/// (`requestPrincipals`, `request.auth.*`). Such a policy on a port that
/// does not carry HTTP cannot be enforced as written.
pub fn needs_http(p: &AuthzPolicy) -> bool {
    p.spec.rules.iter().any(rule_needs_http)
}

fn rule_needs_http(r: &Rule) -> bool {
    let op = |o: &Operation| {
        [
            &o.hosts,
            &o.not_hosts,
            &o.methods,
            &o.not_methods,
            &o.paths,
            &o.not_paths,
        ]
        .iter()
        .any(|v| !v.is_empty())
    };
    let src = |s: &Source| !s.request_principals.is_empty() || !s.not_request_principals.is_empty();
    let key = |c: &Condition| {
        matches!(
            ConditionKey::parse(&c.key),
            ConditionKey::Header(_) | ConditionKey::RequestAuth
        )
    };
    r.to.iter().any(|t| op(&t.operation)) || r.from.iter().any(|f| src(&f.source)) || r.when.iter().any(key)
}

// ---------------------------------------------------------------------------
// Targeting.

/// Whether `p` applies to `workload`, as Istio scopes it:
/// - `targetRefs` (or `targetRef`): a `Service` the workload backs
///   (`services_of_workload`: `(namespace, name)` pairs); other kinds never;
/// - else a `selector`: the workload's labels, in the policy's namespace, or
///   in any namespace for a policy in `root_namespace`;
/// - else the whole namespace, or the whole mesh from `root_namespace`.
pub fn applies_to(
    p: &AuthzPolicy,
    workload: &Workload,
    root_namespace: &str,
    services_of_workload: &[(&str, &str)],
) -> bool {
    let spec = &p.spec;
    if spec.target_ref.is_some() || !spec.target_refs.is_empty() {
        return spec.target_ref.iter().chain(&spec.target_refs).any(|r| {
            let ns = r.namespace.as_deref().unwrap_or(&p.namespace);
            is_service_ref(r) && services_of_workload.contains(&(ns, r.name.as_str()))
        });
    }
    let in_scope = p.namespace == workload.namespace || p.namespace == root_namespace;
    match &spec.selector {
        Some(s) => in_scope && s.match_labels.iter().all(|(k, v)| workload.labels.get(k) == Some(v)),
        None => in_scope,
    }
}

fn is_service_ref(r: &TargetRef) -> bool {
    r.kind == "Service" && (r.group.is_empty() || r.group == "core")
}

// ---------------------------------------------------------------------------
// Validation.

/// What in `p` Ferry refuses, each with the path of the field
/// (`spec.rules[0].from[1].source.ipBlocks[2]: ...`). Empty: accepted.
pub fn validate(p: &AuthzPolicy) -> Vec<String> {
    let mut out = Vec::new();
    let spec = &p.spec;
    match spec.action {
        Action::Custom => out.push("spec.action: CUSTOM needs an external authorizer; Ferry has none".to_string()),
        _ if spec.provider.is_some() => out.push("spec.provider: only meaningful with action CUSTOM".to_string()),
        _ => {}
    }
    if spec.target_ref.is_some() && !spec.target_refs.is_empty() {
        out.push("spec.targetRef: set together with spec.targetRefs; use targetRefs".to_string());
    }
    let refs = spec.target_ref.iter().map(|r| ("spec.targetRef".to_string(), r));
    let refs = refs.chain(
        spec.target_refs
            .iter()
            .enumerate()
            .map(|(i, r)| (format!("spec.targetRefs[{i}]"), r)),
    );
    for (path, r) in refs {
        if spec.selector.is_some() {
            out.push(format!("{path}: cannot be set together with spec.selector"));
        }
        if !is_service_ref(r) {
            out.push(format!(
                "{path}.kind: {:?} (group {:?}) is not supported: Ferry has no waypoints or gateways; only Service",
                r.kind, r.group
            ));
        }
        if r.namespace.as_deref().is_some_and(|ns| ns != p.namespace) {
            out.push(format!(
                "{path}.namespace: must be the policy's namespace ({:?})",
                p.namespace
            ));
        }
    }
    for (i, rule) in spec.rules.iter().enumerate() {
        let at = format!("spec.rules[{i}]");
        for (j, f) in rule.from.iter().enumerate() {
            validate_source(&f.source, &format!("{at}.from[{j}].source"), &mut out);
        }
        for (j, t) in rule.to.iter().enumerate() {
            validate_operation(&t.operation, &format!("{at}.to[{j}].operation"), &mut out);
        }
        for (j, c) in rule.when.iter().enumerate() {
            validate_condition(c, &format!("{at}.when[{j}]"), &mut out);
        }
    }
    out
}

fn validate_source(s: &Source, at: &str, out: &mut Vec<String>) {
    let all = [
        &s.principals,
        &s.not_principals,
        &s.request_principals,
        &s.not_request_principals,
        &s.namespaces,
        &s.not_namespaces,
        &s.service_accounts,
        &s.not_service_accounts,
        &s.ip_blocks,
        &s.not_ip_blocks,
        &s.remote_ip_blocks,
        &s.not_remote_ip_blocks,
    ];
    if all.iter().all(|v| v.is_empty()) {
        out.push(format!("{at}: must not be empty"));
    }
    for (name, v) in [
        ("requestPrincipals", &s.request_principals),
        ("notRequestPrincipals", &s.not_request_principals),
    ] {
        if !v.is_empty() {
            out.push(format!(
                "{at}.{name}: not supported: JWT principals need RequestAuthentication, which Ferry does not implement"
            ));
        }
    }
    for (name, v) in [
        ("ipBlocks", &s.ip_blocks),
        ("notIpBlocks", &s.not_ip_blocks),
        ("remoteIpBlocks", &s.remote_ip_blocks),
        ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
    ] {
        for (k, b) in v.iter().enumerate() {
            if let Err(e) = b.parse::<Cidr>() {
                out.push(format!("{at}.{name}[{k}]: {e}"));
            }
        }
    }
    for (name, v) in [
        ("serviceAccounts", &s.service_accounts),
        ("notServiceAccounts", &s.not_service_accounts),
    ] {
        for (k, sa) in v.iter().enumerate() {
            if sa.is_empty() || sa.contains('*') || sa.matches('/').count() > 1 {
                out.push(format!(
                    "{at}.{name}[{k}]: {sa:?} is not <service account> or <namespace>/<service account>"
                ));
            }
        }
    }
}

fn validate_operation(o: &Operation, at: &str, out: &mut Vec<String>) {
    let all = [
        &o.hosts,
        &o.not_hosts,
        &o.ports,
        &o.not_ports,
        &o.methods,
        &o.not_methods,
        &o.paths,
        &o.not_paths,
    ];
    if all.iter().all(|v| v.is_empty()) {
        out.push(format!("{at}: must not be empty"));
    }
    for (name, v) in [("ports", &o.ports), ("notPorts", &o.not_ports)] {
        for (k, port) in v.iter().enumerate() {
            if parse_port(port).is_none() {
                out.push(format!("{at}.{name}[{k}]: {port:?} is not a port number (0-65535)"));
            }
        }
    }
    for (name, v) in [("paths", &o.paths), ("notPaths", &o.not_paths)] {
        for (k, path) in v.iter().enumerate() {
            if is_path_template(path) {
                out.push(format!(
                    "{at}.{name}[{k}]: path templates ({{*}}, {{**}}) are not supported"
                ));
            }
        }
    }
}

fn validate_condition(c: &Condition, at: &str, out: &mut Vec<String>) {
    let key = ConditionKey::parse(&c.key);
    match key {
        ConditionKey::RequestAuth => out.push(format!(
            "{at}.key: {:?} is not supported: JWT attributes need RequestAuthentication, which Ferry does not implement",
            c.key
        )),
        ConditionKey::Envoy => out.push(format!(
            "{at}.key: {:?} is not supported: it reads Envoy filter metadata",
            c.key
        )),
        ConditionKey::Unknown => out.push(format!(
            "{at}.key: unknown condition key {:?} (supported: {SUPPORTED_KEYS})",
            c.key
        )),
        _ => {}
    }
    if c.values.is_empty() && c.not_values.is_empty() {
        out.push(format!("{at}: values or notValues must be set"));
    }
    for (name, v) in [("values", &c.values), ("notValues", &c.not_values)] {
        for (k, value) in v.iter().enumerate() {
            match key {
                ConditionKey::SourceIp | ConditionKey::RemoteIp | ConditionKey::DestinationIp => {
                    if let Err(e) = value.parse::<Cidr>() {
                        out.push(format!("{at}.{name}[{k}]: {e}"));
                    }
                }
                ConditionKey::DestinationPort if parse_port(value).is_none() => {
                    out.push(format!("{at}.{name}[{k}]: {value:?} is not a port number (0-65535)"))
                }
                _ => {}
            }
        }
    }
}

// ---------------------------------------------------------------------------
// CIDR blocks.

/// An IPv4 or IPv6 address block: `10.0.0.0/8`, `fd00::/8`, or one address
/// (`10.1.2.3`, a /32 or /128). Host bits are ignored, as Envoy does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    len: u8,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an IP address or CIDR block")]
pub struct BadCidr(pub String);

impl FromStr for Cidr {
    type Err = BadCidr;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadCidr(s.to_owned());
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => max,
            Some(l) if !l.is_empty() && l.len() <= 3 && l.bytes().all(|b| b.is_ascii_digit()) => {
                l.parse::<u8>().map_err(|_| bad())?
            }
            Some(_) => return Err(bad()),
        };
        if len > max {
            return Err(bad());
        }
        Ok(Cidr { addr, len })
    }
}

impl Cidr {
    /// Whether `ip` is in the block (an IPv4-mapped IPv6 address counts as
    /// its IPv4 address).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.len)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // ---- helpers ----------------------------------------------------------

    /// Policies from a multi-document YAML text (the Istio manifests as
    /// written; `kind` and `metadata` required).
    fn policies(yaml: &str) -> Vec<AuthzPolicy> {
        let out = authz_policies_in(yaml).unwrap();
        for p in &out {
            assert_eq!(validate(p), Vec::<String>::new(), "{}/{}", p.namespace, p.name);
        }
        out
    }

    /// A policy from `ns/name` and its spec in YAML (validated by the caller).
    fn pol(ns: &str, name: &str, spec: &str) -> AuthzPolicy {
        AuthzPolicy {
            name: name.into(),
            namespace: ns.into(),
            spec: serde_norway::from_str(spec).unwrap(),
        }
    }

    /// A test request: the peer (principal without `spiffe://`, or None for
    /// plaintext), its IP, the port, and HTTP (method, path) or None (L4).
    #[derive(Clone, Copy)]
    struct R {
        id: Option<&'static str>,
        ip: &'static str,
        port: u16,
        http: Option<(&'static str, &'static str)>,
        host: &'static str,
        headers: &'static [(&'static str, &'static str)],
        sni: Option<&'static str>,
    }

    const PRODUCTPAGE: &str = "cluster.local/ns/default/sa/bookinfo-productpage";
    const REVIEWS: &str = "cluster.local/ns/default/sa/bookinfo-reviews";
    const SLEEP: &str = "cluster.local/ns/default/sa/sleep";
    const FOO: &str = "cluster.local/ns/foo/sa/client";

    fn l4(id: Option<&'static str>) -> R {
        R {
            id,
            ip: "10.1.0.5",
            port: 9080,
            http: None,
            host: "details:9080",
            headers: &[],
            sni: None,
        }
    }
    fn http(id: Option<&'static str>, method: &'static str, path: &'static str) -> R {
        R {
            http: Some((method, path)),
            ..l4(id)
        }
    }
    fn ip(ip: &'static str) -> R {
        R { ip, ..l4(Some(SLEEP)) }
    }
    fn port(port: u16) -> R {
        R {
            port,
            ..l4(Some(SLEEP))
        }
    }

    /// `evaluate` over all of `ps`, rendered: the verdict, then ` audit ...`.
    fn decide(ps: &[AuthzPolicy], r: R) -> String {
        let principal = r.id.map(|id| format!("spiffe://{id}"));
        let headers = HeaderPairs(r.headers);
        let req = Request {
            source_principal: principal.as_deref(),
            source_namespace: principal.as_deref().and_then(principal_parts).map(|(ns, _)| ns),
            source_ip: r.ip.parse().unwrap(),
            destination_ip: "10.1.0.9".parse().unwrap(),
            destination_port: r.port,
            sni: r.sni,
            http: r.http.map(|(method, path)| HttpAttrs {
                method,
                path,
                host: r.host,
                headers: &headers,
            }),
        };
        let refs: Vec<&AuthzPolicy> = ps.iter().collect();
        evaluate(&refs, &req).to_string()
    }

    /// Runs rows of (what, request, expected rendering) over `ps`.
    fn table(ps: &[AuthzPolicy], rows: &[(&str, R, &str)]) {
        for (what, r, want) in rows {
            assert_eq!(decide(ps, *r), *want, "{what}");
        }
    }

    // ---- Bookinfo (Istio's authorization tasks) ----------------------------

    const ALLOW_NOTHING: &str = "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: default}
spec: {}
";

    const BOOKINFO: &str = "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: productpage-viewer
  namespace: default
spec:
  selector:
    matchLabels:
      app: productpage
  action: ALLOW
  rules:
  - to:
    - operation:
        methods: [\"GET\"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: details-viewer
  namespace: default
spec:
  selector:
    matchLabels:
      app: details
  action: ALLOW
  rules:
  - from:
    - source:
        principals: [\"cluster.local/ns/default/sa/bookinfo-productpage\"]
    to:
    - operation:
        methods: [\"GET\"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: reviews-viewer
  namespace: default
spec:
  selector:
    matchLabels:
      app: reviews
  action: ALLOW
  rules:
  - from:
    - source:
        principals: [\"cluster.local/ns/default/sa/bookinfo-productpage\"]
    to:
    - operation:
        methods: [\"GET\"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: ratings-viewer
  namespace: default
spec:
  selector:
    matchLabels:
      app: ratings
  action: ALLOW
  rules:
  - from:
    - source:
        principals: [\"cluster.local/ns/default/sa/bookinfo-reviews\"]
    to:
    - operation:
        methods: [\"GET\"]
";

    fn workload(ns: &str, app: &str) -> Workload {
        serde_norway::from_str(&format!(
            "{{uid: u, name: {app}-v1, namespace: {ns}, node: n, ip: 10.1.0.9, labels: {{app: {app}, version: v1}}}}"
        ))
        .unwrap()
    }

    /// The Bookinfo policies that apply to `app` in `default`, with allow-nothing.
    fn bookinfo_for(app: &str) -> Vec<AuthzPolicy> {
        let w = workload("default", app);
        let svc = [("default", app)];
        policies(&format!("{ALLOW_NOTHING}---{BOOKINFO}"))
            .into_iter()
            .filter(|p| applies_to(p, &w, ROOT_NAMESPACE, &svc))
            .collect()
    }

    #[test]
    fn bookinfo_allow_nothing_denies_everything() {
        let ps = policies(ALLOW_NOTHING);
        table(
            &ps,
            &[
                (
                    "GET",
                    http(Some(SLEEP), "GET", "/"),
                    "deny default/allow-nothing allow_nothing",
                ),
                ("L4", l4(Some(PRODUCTPAGE)), "deny default/allow-nothing allow_nothing"),
                ("plaintext", l4(None), "deny default/allow-nothing allow_nothing"),
            ],
        );
    }

    #[test]
    fn bookinfo_productpage_admits_get_only() {
        let ps = bookinfo_for("productpage");
        assert_eq!(ps.len(), 2);
        table(
            &ps,
            &[
                (
                    "GET from anyone",
                    http(Some(SLEEP), "GET", "/productpage"),
                    "allow default/productpage-viewer[0]",
                ),
                (
                    "GET plaintext",
                    http(None, "GET", "/"),
                    "allow default/productpage-viewer[0]",
                ),
                (
                    "POST",
                    http(Some(SLEEP), "POST", "/productpage"),
                    "deny no_allow_matched",
                ),
                (
                    "method is case-sensitive",
                    http(Some(SLEEP), "get", "/"),
                    "deny no_allow_matched",
                ),
                ("L4: the GET rule needs HTTP", l4(Some(SLEEP)), "deny l7_allow_on_l4"),
            ],
        );
    }

    #[test]
    fn bookinfo_details_and_reviews_admit_only_productpage() {
        for app in ["details", "reviews"] {
            let ps = bookinfo_for(app);
            let by = format!("allow default/{app}-viewer[0]");
            table(
                &ps,
                &[
                    ("productpage GET", http(Some(PRODUCTPAGE), "GET", "/details/0"), &by),
                    (
                        "productpage POST",
                        http(Some(PRODUCTPAGE), "POST", "/"),
                        "deny no_allow_matched",
                    ),
                    ("sleep GET", http(Some(SLEEP), "GET", "/"), "deny no_allow_matched"),
                    ("reviews GET", http(Some(REVIEWS), "GET", "/"), "deny no_allow_matched"),
                    ("plaintext GET", http(None, "GET", "/"), "deny no_allow_matched"),
                    ("productpage L4", l4(Some(PRODUCTPAGE)), "deny l7_allow_on_l4"),
                ],
            );
        }
    }

    #[test]
    fn bookinfo_ratings_admits_only_reviews() {
        let ps = bookinfo_for("ratings");
        table(
            &ps,
            &[
                (
                    "reviews GET",
                    http(Some(REVIEWS), "GET", "/ratings/0"),
                    "allow default/ratings-viewer[0]",
                ),
                (
                    "productpage GET",
                    http(Some(PRODUCTPAGE), "GET", "/ratings/0"),
                    "deny no_allow_matched",
                ),
            ],
        );
    }

    // ---- evaluation order and defaults -------------------------------------

    #[test]
    fn defaults_and_empty_shapes() {
        let none: [AuthzPolicy; 0] = [];
        let any_rule = [pol("default", "all", "rules: [{}]")];
        let deny_no_rules = [pol("default", "d", "action: DENY")];
        let deny_empty_rule = [pol("default", "d", "{action: DENY, rules: [{}]}")];
        let audit_only = [pol("default", "a", "{action: AUDIT, rules: [{}]}")];
        for (what, ps, r, want) in [
            ("no policy: allow", &none[..], l4(None), "allow"),
            (
                "an empty rule matches everything",
                &any_rule[..],
                l4(None),
                "allow default/all[0]",
            ),
            (
                "an empty rule matches HTTP",
                &any_rule[..],
                http(None, "PUT", "/x"),
                "allow default/all[0]",
            ),
            (
                "DENY without rules denies nothing",
                &deny_no_rules[..],
                l4(None),
                "allow",
            ),
            (
                "DENY with an empty rule denies all",
                &deny_empty_rule[..],
                l4(Some(SLEEP)),
                "deny default/d[0] matched_deny",
            ),
            (
                "AUDIT never decides",
                &audit_only[..],
                l4(None),
                "allow audit default/a",
            ),
        ] {
            assert_eq!(decide(ps, r), want, "{what}");
        }
    }

    #[test]
    fn deny_overrides_allow_and_audit_only_records() {
        let ps = policies(
            "
kind: AuthorizationPolicy
metadata: {name: allow-all, namespace: default}
spec: {rules: [{}]}
---
kind: AuthorizationPolicy
metadata: {name: deny-foo, namespace: default}
spec:
  action: DENY
  rules:
  - from: [{source: {namespaces: [foo]}}]
---
kind: AuthorizationPolicy
metadata: {name: audit-delete, namespace: default}
spec:
  action: AUDIT
  rules:
  - to: [{operation: {methods: [DELETE]}}]
",
        );
        table(
            &ps,
            &[
                ("from default", l4(Some(SLEEP)), "allow default/allow-all[0]"),
                ("from foo", l4(Some(FOO)), "deny default/deny-foo[0] matched_deny"),
                ("plaintext: no namespace", l4(None), "allow default/allow-all[0]"),
                (
                    "audited, still allowed",
                    http(Some(SLEEP), "DELETE", "/"),
                    "allow default/allow-all[0] audit default/audit-delete",
                ),
                (
                    "audited and denied",
                    http(Some(FOO), "DELETE", "/"),
                    "deny default/deny-foo[0] matched_deny audit default/audit-delete",
                ),
                (
                    "audit rule needs HTTP: no record at L4",
                    l4(Some(SLEEP)),
                    "allow default/allow-all[0]",
                ),
            ],
        );
    }

    #[test]
    fn multiple_allow_policies_any_one_allows() {
        let ps = [
            pol(
                "default",
                "a",
                "rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/a]}}]}]",
            ),
            pol(
                "default",
                "b",
                "rules: [{from: [{source: {namespaces: [foo]}}]}, {to: [{operation: {ports: ['15020']}}]}]",
            ),
        ];
        table(
            &ps,
            &[
                ("neither", l4(Some(SLEEP)), "deny no_allow_matched"),
                ("second policy, first rule", l4(Some(FOO)), "allow default/b[0]"),
                ("second policy, second rule", port(15020), "allow default/b[1]"),
                (
                    "first policy",
                    l4(Some("cluster.local/ns/default/sa/a")),
                    "allow default/a[0]",
                ),
            ],
        );
        // One rule-less ALLOW next to one with rules: not "allow nothing".
        let ps = [
            pol("default", "nothing", "{}"),
            pol("default", "foo", "rules: [{from: [{source: {namespaces: [foo]}}]}]"),
        ];
        table(
            &ps,
            &[
                ("foo", l4(Some(FOO)), "allow default/foo[0]"),
                ("other", l4(Some(SLEEP)), "deny no_allow_matched"),
            ],
        );
    }

    #[test]
    fn custom_fails_closed_when_its_rules_match() {
        let ps = [pol(
            "default",
            "ext",
            "{action: CUSTOM, provider: {name: opa}, rules: [{to: [{operation: {paths: ['/admin*']}}]}]}",
        )];
        assert_eq!(
            validate(&ps[0]),
            ["spec.action: CUSTOM needs an external authorizer; Ferry has none"]
        );
        table(
            &ps,
            &[
                (
                    "matches",
                    http(Some(SLEEP), "GET", "/admin/x"),
                    "deny default/ext[0] custom_unsupported",
                ),
                ("does not match", http(Some(SLEEP), "GET", "/public"), "allow"),
                (
                    "L4: could match",
                    l4(Some(SLEEP)),
                    "deny default/ext[0] custom_unsupported",
                ),
            ],
        );
    }

    // ---- sources -----------------------------------------------------------

    #[test]
    fn principals_and_plaintext() {
        let allow_any_id = [pol(
            "default",
            "mtls",
            "rules: [{from: [{source: {principals: ['*']}}]}]",
        )];
        let deny_plain = [pol(
            "default",
            "plain",
            "{action: DENY, rules: [{from: [{source: {notPrincipals: ['*']}}]}]}",
        )];
        let deny_not_pp = [pol(
            "default",
            "only-pp",
            "{action: DENY, rules: [{from: [{source: {notPrincipals: [cluster.local/ns/default/sa/bookinfo-productpage]}}]}]}",
        )];
        for (what, ps, r, want) in [
            (
                "principals * admits any identity",
                &allow_any_id[..],
                l4(Some(SLEEP)),
                "allow default/mtls[0]",
            ),
            (
                "principals * refuses plaintext",
                &allow_any_id[..],
                l4(None),
                "deny no_allow_matched",
            ),
            (
                "notPrincipals * denies plaintext",
                &deny_plain[..],
                l4(None),
                "deny default/plain[0] matched_deny",
            ),
            ("notPrincipals * passes mTLS", &deny_plain[..], l4(Some(SLEEP)), "allow"),
            (
                "notPrincipals [pp]: plaintext denied",
                &deny_not_pp[..],
                l4(None),
                "deny default/only-pp[0] matched_deny",
            ),
            (
                "notPrincipals [pp]: sleep denied",
                &deny_not_pp[..],
                l4(Some(SLEEP)),
                "deny default/only-pp[0] matched_deny",
            ),
            (
                "notPrincipals [pp]: pp passes",
                &deny_not_pp[..],
                l4(Some(PRODUCTPAGE)),
                "allow",
            ),
        ] {
            assert_eq!(decide(ps, r), want, "{what}");
        }
    }

    #[test]
    fn wildcards_prefix_suffix_presence() {
        let rows: &[(&str, &str, Option<&'static str>, bool)] = &[
            ("prefix", "cluster.local/ns/default/*", Some(SLEEP), true),
            ("prefix, other ns", "cluster.local/ns/default/*", Some(FOO), false),
            ("suffix", "*/sa/bookinfo-reviews", Some(REVIEWS), true),
            ("suffix, other sa", "*/sa/bookinfo-reviews", Some(PRODUCTPAGE), false),
            ("exact", SLEEP, Some(SLEEP), true),
            (
                "exact is not a prefix",
                "cluster.local/ns/default/sa/slee",
                Some(SLEEP),
                false,
            ),
            ("presence", "*", Some(FOO), true),
            ("presence, plaintext", "*", None, false),
            ("suffix, plaintext", "*sleep", None, false),
        ];
        for (what, pattern, id, allowed) in rows {
            let ps = [pol(
                "default",
                "p",
                &format!("rules: [{{from: [{{source: {{principals: ['{pattern}']}}}}]}}]"),
            )];
            assert_eq!(decide(&ps, l4(*id)).starts_with("allow"), *allowed, "{what}");
        }
    }

    #[test]
    fn namespaces_and_service_accounts() {
        let ps = [pol(
            "default",
            "ns",
            "rules: [{from: [{source: {namespaces: [foo, 'team-*'], notNamespaces: [team-x]}}]}, {from: [{source: {serviceAccounts: [sleep, 'foo/other']}}]}]",
        )];
        table(
            &ps,
            &[
                ("foo", l4(Some(FOO)), "allow default/ns[0]"),
                (
                    "team-a by prefix",
                    l4(Some("cluster.local/ns/team-a/sa/x")),
                    "allow default/ns[0]",
                ),
                (
                    "team-x excluded",
                    l4(Some("cluster.local/ns/team-x/sa/x")),
                    "deny no_allow_matched",
                ),
                (
                    "sa sleep in the policy's namespace",
                    l4(Some(SLEEP)),
                    "allow default/ns[1]",
                ),
                (
                    "sa sleep in another namespace",
                    l4(Some("cluster.local/ns/bar/sa/sleep")),
                    "deny no_allow_matched",
                ),
                (
                    "sa foo/other",
                    l4(Some("cluster.local/ns/foo/sa/other")),
                    "allow default/ns[0]",
                ),
                ("plaintext", l4(None), "deny no_allow_matched"),
            ],
        );
    }

    #[test]
    fn ip_blocks() {
        let allow = [pol(
            "default",
            "ips",
            "rules: [{from: [{source: {ipBlocks: [10.1.0.0/16, 192.168.7.7, 'fd00::/8'], notIpBlocks: [10.1.9.0/24]}}]}]",
        )];
        let deny_outside = [pol(
            "default",
            "outside",
            "{action: DENY, rules: [{from: [{source: {notIpBlocks: [10.0.0.0/8]}}]}]}",
        )];
        let remote = [pol(
            "default",
            "remote",
            "rules: [{from: [{source: {remoteIpBlocks: [10.1.0.0/16]}}]}]",
        )];
        for (what, ps, r, want) in [
            ("in the /16", &allow[..], ip("10.1.2.3"), "allow default/ips[0]"),
            (
                "in the excluded /24",
                &allow[..],
                ip("10.1.9.3"),
                "deny no_allow_matched",
            ),
            ("single address", &allow[..], ip("192.168.7.7"), "allow default/ips[0]"),
            (
                "next to the single address",
                &allow[..],
                ip("192.168.7.8"),
                "deny no_allow_matched",
            ),
            ("IPv6 block", &allow[..], ip("fd12::1"), "allow default/ips[0]"),
            (
                "IPv4-mapped IPv6",
                &allow[..],
                ip("::ffff:10.1.2.3"),
                "allow default/ips[0]",
            ),
            ("outside", &allow[..], ip("10.2.0.1"), "deny no_allow_matched"),
            (
                "DENY notIpBlocks: outside denied",
                &deny_outside[..],
                ip("192.168.1.1"),
                "deny default/outside[0] matched_deny",
            ),
            (
                "DENY notIpBlocks: inside passes",
                &deny_outside[..],
                ip("10.9.9.9"),
                "allow",
            ),
            (
                "remoteIpBlocks is the peer's IP",
                &remote[..],
                ip("10.1.3.4"),
                "allow default/remote[0]",
            ),
        ] {
            assert_eq!(decide(ps, r), want, "{what}");
        }
    }

    // ---- operations ----------------------------------------------------------

    #[test]
    fn ports_and_not_ports() {
        let allow = [pol(
            "default",
            "p",
            "rules: [{to: [{operation: {ports: ['9080', '9443']}}]}]",
        )];
        let deny = [pol(
            "default",
            "d",
            "{action: DENY, rules: [{to: [{operation: {notPorts: ['9080']}}]}]}",
        )];
        for (what, ps, r, want) in [
            ("allowed port", &allow[..], port(9080), "allow default/p[0]"),
            ("other allowed port", &allow[..], port(9443), "allow default/p[0]"),
            ("not allowed", &allow[..], port(8080), "deny no_allow_matched"),
            (
                "DENY notPorts: other port denied",
                &deny[..],
                port(8080),
                "deny default/d[0] matched_deny",
            ),
            ("DENY notPorts: that port passes", &deny[..], port(9080), "allow"),
        ] {
            assert_eq!(decide(ps, r), want, "{what}");
        }
    }

    #[test]
    fn paths_methods_hosts() {
        let ps = [pol(
            "default",
            "ops",
            "rules:
- to: [{operation: {paths: [/api/v1, '/static/*', '*.png'], notPaths: [/static/secret]}}]
- to: [{operation: {hosts: [Details.Example, '*.internal'], methods: [POST]}}]
- to: [{operation: {notMethods: [GET, POST, DELETE], paths: ['/x*']}}]",
        )];
        table(
            &ps,
            &[
                (
                    "exact path",
                    http(Some(SLEEP), "GET", "/api/v1"),
                    "allow default/ops[0]",
                ),
                (
                    "exact path, query ignored",
                    http(Some(SLEEP), "GET", "/api/v1?page=2"),
                    "allow default/ops[0]",
                ),
                (
                    "exact is not prefix",
                    http(Some(SLEEP), "GET", "/api/v1/x"),
                    "deny no_allow_matched",
                ),
                (
                    "prefix",
                    http(Some(SLEEP), "GET", "/static/app.js"),
                    "allow default/ops[0]",
                ),
                (
                    "notPaths",
                    http(Some(SLEEP), "GET", "/static/secret"),
                    "deny no_allow_matched",
                ),
                (
                    "suffix",
                    http(Some(SLEEP), "GET", "/img/logo.png"),
                    "allow default/ops[0]",
                ),
                (
                    "paths are case-sensitive",
                    http(Some(SLEEP), "GET", "/API/v1"),
                    "deny no_allow_matched",
                ),
                (
                    "host, any case",
                    R {
                        host: "details.example",
                        ..http(Some(SLEEP), "POST", "/q")
                    },
                    "allow default/ops[1]",
                ),
                (
                    "host suffix",
                    R {
                        host: "db.INTERNAL",
                        ..http(Some(SLEEP), "POST", "/q")
                    },
                    "allow default/ops[1]",
                ),
                (
                    "host with a port is not the host",
                    R {
                        host: "details.example:80",
                        ..http(Some(SLEEP), "POST", "/q")
                    },
                    "deny no_allow_matched",
                ),
                (
                    "host but not method",
                    R {
                        host: "details.example",
                        ..http(Some(SLEEP), "GET", "/q")
                    },
                    "deny no_allow_matched",
                ),
                ("notMethods", http(Some(SLEEP), "PUT", "/xyz"), "allow default/ops[2]"),
                (
                    "notMethods excludes",
                    http(Some(SLEEP), "DELETE", "/xyz"),
                    "deny no_allow_matched",
                ),
            ],
        );
    }

    // ---- conditions ---------------------------------------------------------

    #[test]
    fn when_conditions() {
        let ps = [pol(
            "default",
            "when",
            "rules:
- when:
  - {key: 'request.headers[x-version]', values: [v1, 'canary-*']}
  - {key: source.namespace, notValues: [foo]}
- when:
  - {key: source.ip, values: [10.9.0.0/16]}
  - {key: destination.port, values: ['15021']}
- when:
  - {key: connection.sni, values: ['*.mesh.local']}
- when:
  - {key: source.principal, values: ['*/sa/bookinfo-reviews']}
  - {key: destination.ip, values: [10.1.0.0/24]}",
        )];
        let h = |headers: &'static [(&'static str, &'static str)], id| R {
            headers,
            ..http(id, "GET", "/")
        };
        table(
            &ps,
            &[
                (
                    "header value",
                    h(&[("X-Version", "v1")], Some(SLEEP)),
                    "allow default/when[0]",
                ),
                (
                    "header prefix",
                    h(&[("x-version", "canary-2")], Some(SLEEP)),
                    "allow default/when[0]",
                ),
                (
                    "header, but from foo",
                    h(&[("x-version", "v1")], Some(FOO)),
                    "deny no_allow_matched",
                ),
                (
                    "header, plaintext (no namespace: notValues pass)",
                    h(&[("x-version", "v1")], None),
                    "allow default/when[0]",
                ),
                ("header absent", h(&[], Some(SLEEP)), "deny no_allow_matched"),
                ("header rule at L4", l4(Some(SLEEP)), "deny l7_allow_on_l4"),
                (
                    "source.ip and destination.port",
                    R {
                        ip: "10.9.1.1",
                        port: 15021,
                        ..l4(None)
                    },
                    "allow default/when[1]",
                ),
                (
                    "source.ip, other port",
                    R {
                        ip: "10.9.1.1",
                        port: 80,
                        ..l4(None)
                    },
                    "deny l7_allow_on_l4",
                ),
                (
                    "sni",
                    R {
                        sni: Some("details.mesh.local"),
                        ..l4(None)
                    },
                    "allow default/when[2]",
                ),
                (
                    "source.principal and destination.ip",
                    l4(Some(REVIEWS)),
                    "allow default/when[3]",
                ),
            ],
        );
    }

    #[test]
    fn unsupported_parts_never_allow_and_always_deny() {
        let allow = [pol(
            "default",
            "jwt",
            "rules: [{when: [{key: 'request.auth.claims[iss]', values: [x]}]}]",
        )];
        let deny = [pol(
            "default",
            "jwt",
            "{action: DENY, rules: [{from: [{source: {notRequestPrincipals: ['*']}}]}]}",
        )];
        let bad_cidr = [pol(
            "default",
            "bad",
            "rules: [{from: [{source: {ipBlocks: [10.0.0.0/33]}}]}]",
        )];
        let bad_cidr_deny = [pol(
            "default",
            "bad",
            "{action: DENY, rules: [{from: [{source: {ipBlocks: [nope]}}]}]}",
        )];
        let unknown_key = [pol(
            "default",
            "k",
            "{action: DENY, rules: [{when: [{key: request.method, values: [GET]}]}]}",
        )];
        for (what, ps, r, want) in [
            (
                "ALLOW on a JWT claim never matches",
                &allow[..],
                http(Some(SLEEP), "GET", "/"),
                "deny no_allow_matched",
            ),
            (
                "DENY without JWT principals denies (HTTP)",
                &deny[..],
                http(Some(SLEEP), "GET", "/"),
                "deny default/jwt[0] unsupported_deny",
            ),
            (
                "DENY without JWT principals denies (L4)",
                &deny[..],
                l4(Some(SLEEP)),
                "deny default/jwt[0] unsupported_deny",
            ),
            (
                "ALLOW with a bad block never matches",
                &bad_cidr[..],
                ip("10.0.0.1"),
                "deny no_allow_matched",
            ),
            (
                "DENY with a bad block denies",
                &bad_cidr_deny[..],
                ip("10.0.0.1"),
                "deny default/bad[0] unsupported_deny",
            ),
            (
                "DENY with an unknown key denies",
                &unknown_key[..],
                l4(None),
                "deny default/k[0] unsupported_deny",
            ),
        ] {
            assert_eq!(decide(ps, r), want, "{what}");
        }
    }

    // ---- the L4/L7 split ----------------------------------------------------

    #[test]
    fn l7_rules_on_l4_checks() {
        let deny_delete = [pol(
            "default",
            "no-delete",
            "{action: DENY, rules: [{to: [{operation: {methods: [DELETE]}}]}]}",
        )];
        let deny_foo_post = [pol(
            "default",
            "foo-post",
            "{action: DENY, rules: [{from: [{source: {namespaces: [foo]}}], to: [{operation: {methods: [POST], ports: ['9080']}}]}]}",
        )];
        // Istio drops an ALLOW rule with any HTTP attribute at L4, even when
        // another of its operations is L4-only.
        let allow_mixed = [pol(
            "default",
            "mixed",
            "rules: [{to: [{operation: {methods: [GET]}}, {operation: {ports: ['9080']}}]}]",
        )];
        let allow_split = [pol(
            "default",
            "split",
            "rules: [{to: [{operation: {methods: [GET]}}]}, {to: [{operation: {ports: ['9080']}}]}]",
        )];
        for (what, ps, r, want) in [
            (
                "DENY DELETE at L4: fail closed",
                &deny_delete[..],
                l4(Some(SLEEP)),
                "deny default/no-delete[0] l7_deny_on_l4",
            ),
            (
                "DENY DELETE, GET at L7",
                &deny_delete[..],
                http(Some(SLEEP), "GET", "/"),
                "allow",
            ),
            (
                "DENY DELETE, DELETE at L7",
                &deny_delete[..],
                http(Some(SLEEP), "DELETE", "/"),
                "deny default/no-delete[0] matched_deny",
            ),
            (
                "DENY foo POST, L4 from foo",
                &deny_foo_post[..],
                l4(Some(FOO)),
                "deny default/foo-post[0] l7_deny_on_l4",
            ),
            (
                "DENY foo POST, L4 from default: L4 part excludes",
                &deny_foo_post[..],
                l4(Some(SLEEP)),
                "allow",
            ),
            (
                "DENY foo POST, L4 from foo, other port",
                &deny_foo_post[..],
                R {
                    port: 8080,
                    ..l4(Some(FOO))
                },
                "allow",
            ),
            (
                "ALLOW mixed rule at L4",
                &allow_mixed[..],
                l4(Some(SLEEP)),
                "deny l7_allow_on_l4",
            ),
            (
                "ALLOW mixed rule at L7",
                &allow_mixed[..],
                http(Some(SLEEP), "PUT", "/"),
                "allow default/mixed[0]",
            ),
            (
                "ALLOW split rules at L4",
                &allow_split[..],
                l4(Some(SLEEP)),
                "allow default/split[1]",
            ),
        ] {
            assert_eq!(decide(ps, r), want, "{what}");
        }
    }

    #[test]
    fn a_definite_deny_is_reported_before_an_unknown_one() {
        let ps = [
            pol(
                "default",
                "l7",
                "{action: DENY, rules: [{to: [{operation: {methods: [DELETE]}}]}]}",
            ),
            pol(
                "default",
                "foo",
                "{action: DENY, rules: [{from: [{source: {namespaces: [foo]}}]}]}",
            ),
        ];
        assert_eq!(decide(&ps, l4(Some(FOO))), "deny default/foo[0] matched_deny");
        assert_eq!(decide(&ps, l4(Some(SLEEP))), "deny default/l7[0] l7_deny_on_l4");
    }

    #[test]
    fn needs_http_finds_http_attributes() {
        for (spec, want) in [
            ("{}", false),
            ("rules: [{}]", false),
            ("rules: [{to: [{operation: {ports: ['80']}}]}]", false),
            (
                "rules: [{from: [{source: {principals: ['*'], ipBlocks: [10.0.0.0/8]}}]}]",
                false,
            ),
            ("rules: [{when: [{key: source.ip, values: [10.0.0.1]}]}]", false),
            ("rules: [{}, {to: [{operation: {methods: [GET]}}]}]", true),
            ("rules: [{to: [{operation: {notPaths: [/x]}}]}]", true),
            ("rules: [{to: [{operation: {hosts: [a]}}]}]", true),
            ("rules: [{when: [{key: 'request.headers[x]', values: [a]}]}]", true),
            ("rules: [{from: [{source: {requestPrincipals: ['*']}}]}]", true),
        ] {
            assert_eq!(needs_http(&pol("default", "p", spec)), want, "{spec}");
        }
    }

    // ---- targeting ----------------------------------------------------------

    #[test]
    fn targeting() {
        let w = workload("default", "reviews");
        let svc: &[(&str, &str)] = &[("default", "reviews")];
        for (what, ns, spec, want) in [
            ("mesh-wide from the root namespace", "istio-system", "{}", true),
            ("namespace-wide", "default", "{}", true),
            ("another namespace", "foo", "{}", false),
            (
                "selector matches",
                "default",
                "selector: {matchLabels: {app: reviews}}",
                true,
            ),
            (
                "selector, two labels",
                "default",
                "selector: {matchLabels: {app: reviews, version: v1}}",
                true,
            ),
            (
                "selector does not match",
                "default",
                "selector: {matchLabels: {app: details}}",
                false,
            ),
            (
                "selector in another namespace",
                "foo",
                "selector: {matchLabels: {app: reviews}}",
                false,
            ),
            (
                "selector from the root namespace",
                "istio-system",
                "selector: {matchLabels: {app: reviews}}",
                true,
            ),
            (
                "targetRefs: the workload's Service",
                "default",
                "targetRefs: [{kind: Service, group: '', name: reviews}]",
                true,
            ),
            (
                "targetRef (singular)",
                "default",
                "targetRef: {kind: Service, name: reviews}",
                true,
            ),
            (
                "targetRefs: another Service",
                "default",
                "targetRefs: [{kind: Service, name: details}]",
                false,
            ),
            (
                "targetRefs: a Gateway",
                "default",
                "targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: reviews}]",
                false,
            ),
            (
                "targetRefs: a Service elsewhere",
                "foo",
                "targetRefs: [{kind: Service, name: reviews}]",
                false,
            ),
        ] {
            assert_eq!(applies_to(&pol(ns, "p", spec), &w, ROOT_NAMESPACE, svc), want, "{what}");
        }
    }

    // ---- parsing and validation ---------------------------------------------

    #[test]
    fn istio_spec_is_accepted_field_for_field() {
        let ps = authz_policies_in(
            "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: httpbin
  namespace: foo
  labels: {team: a}
spec:
  selector:
    matchLabels: {app: httpbin, version: v1}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: [cluster.local/ns/default/sa/sleep]
        notPrincipals: [cluster.local/ns/default/sa/evil]
        namespaces: [test]
        notNamespaces: [prod]
        ipBlocks: [10.0.0.0/8]
        notIpBlocks: [10.9.0.0/16]
        remoteIpBlocks: [1.2.3.4]
        notRemoteIpBlocks: ['2001:db8::/32']
    to:
    - operation:
        hosts: [httpbin.foo]
        notHosts: [admin.foo]
        ports: ['8000']
        notPorts: ['8001']
        methods: [GET]
        notMethods: [TRACE]
        paths: ['/info*']
        notPaths: [/info/secret]
    when:
    - key: request.headers[User-Agent]
      values: ['Mozilla/*']
      notValues: ['*bot*']
---
apiVersion: v1
kind: Service
metadata: {name: skipped}
",
        )
        .unwrap();
        assert_eq!(ps.len(), 1);
        assert_eq!((ps[0].namespace.as_str(), ps[0].name.as_str()), ("foo", "httpbin"));
        assert_eq!(validate(&ps[0]), Vec::<String>::new());
        let r = &ps[0].spec.rules[0];
        assert_eq!(r.from[0].source.not_remote_ip_blocks, ["2001:db8::/32"]);
        assert_eq!(r.to[0].operation.not_paths, ["/info/secret"]);
        assert_eq!(r.when[0].not_values, ["*bot*"]);

        // Unknown fields are refused, as the CRD's schema does.
        let err = authz_policies_in("kind: AuthorizationPolicy\nmetadata: {name: x}\nspec: {rule: []}").unwrap_err();
        assert!(err.contains("unknown field `rule`"), "{err}");
        let err = authz_policies_in(
            "kind: AuthorizationPolicy\nmetadata: {name: x}\nspec: {rules: [{from: [{source: {principal: [a]}}]}]}",
        )
        .unwrap_err();
        assert!(err.contains("unknown field `principal`"), "{err}");
        // Namespace defaults to `default`; action to ALLOW.
        let ps = authz_policies_in("kind: AuthorizationPolicy\nmetadata: {name: x}\nspec: {}").unwrap();
        assert_eq!(
            (ps[0].namespace.as_str(), ps[0].spec.action),
            ("default", Action::Allow)
        );
    }

    #[test]
    fn validation_names_each_problem_and_its_field() {
        for (spec, want) in [
            ("{action: CUSTOM, provider: {name: ext}}", vec!["spec.action: CUSTOM needs an external authorizer; Ferry has none"]),
            ("{action: DENY, provider: {name: ext}}", vec!["spec.provider: only meaningful with action CUSTOM"]),
            (
                "{selector: {matchLabels: {a: b}}, targetRefs: [{kind: Gateway, name: g}]}",
                vec![
                    "spec.targetRefs[0]: cannot be set together with spec.selector",
                    "spec.targetRefs[0].kind: \"Gateway\" (group \"\") is not supported: Ferry has no waypoints or gateways; only Service",
                ],
            ),
            ("targetRef: {kind: Service, name: s, namespace: other}", vec!["spec.targetRef.namespace: must be the policy's namespace (\"default\")"]),
            ("rules: [{from: [{source: {}}], to: [{operation: {}}]}]", vec![
                "spec.rules[0].from[0].source: must not be empty",
                "spec.rules[0].to[0].operation: must not be empty",
            ]),
            ("rules: [{from: [{}]}]", vec!["spec.rules[0].from[0].source: must not be empty"]),
            ("rules: [{}, {from: [{source: {requestPrincipals: ['*']}}]}]", vec![
                "spec.rules[1].from[0].source.requestPrincipals: not supported: JWT principals need RequestAuthentication, which Ferry does not implement",
            ]),
            ("rules: [{from: [{source: {ipBlocks: [10.0.0.0/8, 10.0.0.0/33], notRemoteIpBlocks: ['fd00::/129', '1.2.3.4/']}}]}]", vec![
                "spec.rules[0].from[0].source.ipBlocks[1]: \"10.0.0.0/33\" is not an IP address or CIDR block",
                "spec.rules[0].from[0].source.notRemoteIpBlocks[0]: \"fd00::/129\" is not an IP address or CIDR block",
                "spec.rules[0].from[0].source.notRemoteIpBlocks[1]: \"1.2.3.4/\" is not an IP address or CIDR block",
            ]),
            ("rules: [{to: [{operation: {ports: ['80', http], notPorts: ['65536']}}]}]", vec![
                "spec.rules[0].to[0].operation.ports[1]: \"http\" is not a port number (0-65535)",
                "spec.rules[0].to[0].operation.notPorts[0]: \"65536\" is not a port number (0-65535)",
            ]),
            ("rules: [{to: [{operation: {paths: ['/a/{*}/b']}}]}]", vec![
                "spec.rules[0].to[0].operation.paths[0]: path templates ({*}, {**}) are not supported",
            ]),
            ("rules: [{from: [{source: {serviceAccounts: ['a/b/c', '*']}}]}]", vec![
                "spec.rules[0].from[0].source.serviceAccounts[0]: \"a/b/c\" is not <service account> or <namespace>/<service account>",
                "spec.rules[0].from[0].source.serviceAccounts[1]: \"*\" is not <service account> or <namespace>/<service account>",
            ]),
            ("rules: [{when: [{key: request.method, values: [GET]}]}]", vec![
                "spec.rules[0].when[0].key: unknown condition key \"request.method\" (supported: request.headers[<name>], source.ip, remote.ip, source.namespace, source.principal, destination.ip, destination.port, connection.sni)",
            ]),
            ("rules: [{when: [{key: 'request.auth.claims[iss]', values: [x]}, {key: experimental.envoy.filters.a, values: [x]}]}]", vec![
                "spec.rules[0].when[0].key: \"request.auth.claims[iss]\" is not supported: JWT attributes need RequestAuthentication, which Ferry does not implement",
                "spec.rules[0].when[1].key: \"experimental.envoy.filters.a\" is not supported: it reads Envoy filter metadata",
            ]),
            ("rules: [{when: [{key: source.ip}, {key: 'request.headers[]', values: [a]}]}]", vec![
                "spec.rules[0].when[0]: values or notValues must be set",
                "spec.rules[0].when[1].key: unknown condition key \"request.headers[]\" (supported: request.headers[<name>], source.ip, remote.ip, source.namespace, source.principal, destination.ip, destination.port, connection.sni)",
            ]),
            ("rules: [{when: [{key: destination.ip, values: [x]}, {key: destination.port, notValues: ['-1']}]}]", vec![
                "spec.rules[0].when[0].values[0]: \"x\" is not an IP address or CIDR block",
                "spec.rules[0].when[1].notValues[0]: \"-1\" is not a port number (0-65535)",
            ]),
        ] {
            assert_eq!(validate(&pol("default", "p", spec)), want, "{spec}");
        }
    }

    #[test]
    fn cidr_parsing_and_containment() {
        for (block, ip, want) in [
            ("10.0.0.0/8", "10.255.1.1", true),
            ("10.0.0.0/8", "11.0.0.1", false),
            ("10.1.2.3/16", "10.1.200.1", true),
            ("0.0.0.0/0", "203.0.113.9", true),
            ("0.0.0.0/0", "::1", false),
            ("10.1.2.3", "10.1.2.3", true),
            ("10.1.2.3/32", "10.1.2.4", false),
            ("::/0", "fe80::1", true),
            ("2001:db8::/32", "2001:db8:ffff::1", true),
            ("2001:db8::/32", "2001:db9::1", false),
            ("::1", "::1", true),
            ("10.0.0.0/8", "::ffff:10.0.0.1", true),
        ] {
            let c: Cidr = block.parse().unwrap();
            assert_eq!(c.contains(ip.parse().unwrap()), want, "{block} {ip}");
        }
        for bad in [
            "",
            "/8",
            "10.0.0.0/",
            "10.0.0.0/33",
            "10.0.0/8",
            "::/129",
            "10.0.0.0/+8",
            "10.0.0.0/0008",
            "x",
            "10.0.0.0/8/8",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad:?}");
        }
        assert_eq!("10.1.0.0/16".parse::<Cidr>().unwrap().to_string(), "10.1.0.0/16");
    }

    #[test]
    fn principal_parts_reads_spiffe_ids() {
        assert_eq!(
            principal_parts("spiffe://cluster.local/ns/default/sa/x"),
            Some(("default", "x"))
        );
        for bad in [
            "cluster.local/ns/default/sa/x",
            "spiffe://cluster.local/ns//sa/x",
            "spiffe://td/ns/a/sa/",
            "spiffe://td/x",
        ] {
            assert_eq!(principal_parts(bad), None, "{bad}");
        }
    }

    #[test]
    fn codes_are_stable() {
        let all = [
            DenyReason::Custom,
            DenyReason::MatchedDeny,
            DenyReason::L7DenyOnL4,
            DenyReason::UnsupportedDeny,
            DenyReason::AllowNothing,
            DenyReason::NoAllowMatched,
            DenyReason::L7AllowOnL4,
        ];
        let codes: Vec<&str> = all.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            codes,
            [
                "custom_unsupported",
                "matched_deny",
                "l7_deny_on_l4",
                "unsupported_deny",
                "allow_nothing",
                "no_allow_matched",
                "l7_allow_on_l4"
            ]
        );
        let v = Verdict::Deny {
            policy: None,
            rule: None,
            reason: DenyReason::NoAllowMatched,
        };
        assert_eq!((v.code(), v.is_allow()), ("no_allow_matched", false));
        assert_eq!(Verdict::Allow { by: None, rule: None }.code(), "allow");
    }
}
