//! `ferryctl authz check`: an authorization dry run, "may this source call
//! that workload on port P (with GET /path)?", answered either offline from
//! YAML (AuthorizationPolicies, the destination given by namespace/name and
//! labels or by an agent config file) or live by the destination's agent
//! (`/authz` on its admin endpoint). Both take the same decision
//! (`ferry_model::state::State::authz_check`) and name the deciding policy,
//! rule and reason.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs},
    path::{Path, PathBuf},
};

use ferry_model::{
    admin::{AuthzCheck, AuthzQuery},
    authz,
    state::State,
    ConfigFile, Workload,
};

use crate::{
    output::{opt, print_doc, Row},
    Args, CtlError, Output,
};

/// `ferryctl authz check` options.
#[derive(clap::Args, Debug, Default)]
pub(crate) struct CheckArgs {
    /// The source: `ns/pod` (its identity and address when known),
    /// `ns/serviceaccount`, a SPIFFE id, or an IP address (plaintext, no identity).
    #[arg(long)]
    pub from: String,
    /// The source's address (for `ipBlocks`), overriding the one found.
    #[arg(long)]
    pub from_ip: Option<IpAddr>,
    /// The destination pod: `ns/name` (or its IP).
    #[arg(long)]
    pub to: String,
    /// The destination (app) port.
    #[arg(long)]
    pub port: u16,
    /// HTTP method: makes it an HTTP check (else L4 only).
    #[arg(long)]
    pub method: Option<String>,
    /// HTTP path (an HTTP check).
    #[arg(long)]
    pub path: Option<String>,
    /// HTTP Host (an HTTP check).
    #[arg(long)]
    pub host: Option<String>,
    /// HTTP header `name=value` (repeatable; an HTTP check).
    #[arg(long = "header", value_name = "NAME=VALUE")]
    pub headers: Vec<String>,
    /// Offline: YAML files or directories with AuthorizationPolicies (other kinds are skipped).
    #[arg(short = 'f', long = "filename", num_args = 1.., conflicts_with = "agent")]
    pub files: Vec<PathBuf>,
    /// Offline: an agent config file (its workloads, services and authorizationPolicies).
    #[arg(long, conflicts_with = "agent")]
    pub config: Option<PathBuf>,
    /// Offline: the destination's labels `key=value` (repeatable), when it
    /// is not in a config file.
    #[arg(long = "to-labels", value_name = "KEY=VALUE", conflicts_with = "agent")]
    pub to_labels: Vec<String>,
    /// Offline: the destination's address, when it is not in a config file.
    #[arg(long, conflicts_with = "agent")]
    pub to_ip: Option<Ipv4Addr>,
    /// Live: the destination's agent admin endpoint (`http://127.0.0.1:15000`).
    #[arg(long)]
    pub agent: Option<String>,
}

impl CheckArgs {
    fn query(&self) -> Result<AuthzQuery, CtlError> {
        let headers = self
            .headers
            .iter()
            .map(|h| pair("--header", h))
            .collect::<Result<_, _>>()?;
        Ok(AuthzQuery {
            from: self.from.clone(),
            from_ip: self.from_ip,
            to: self.to.clone(),
            port: self.port,
            method: self.method.clone(),
            path: self.path.clone(),
            host: self.host.clone(),
            headers,
        })
    }
}

fn pair(flag: &str, kv: &str) -> Result<(String, String), CtlError> {
    kv.split_once('=')
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| CtlError::Other(format!("{flag} {kv:?}: expected key=value")))
}

/// Runs the check and prints it (`-o json|yaml`: the `AuthzCheck` object).
pub(crate) fn check(args: &Args, c: &CheckArgs) -> Result<(), CtlError> {
    let q = c.query()?;
    let result = match &c.agent {
        Some(url) => crate::admin::authz(agent_addr(url)?, &q)?,
        None => offline(c, &q)?,
    };
    match args.output {
        Output::Table => print!("{}", crate::output::rows_table(std::slice::from_ref(&result))),
        _ => print_doc(args, &result)?,
    }
    if result.allowed {
        Ok(())
    } else {
        Err(CtlError::Denied(result.decision))
    }
}

/// `http://host:port[/]` or `host:port`.
fn agent_addr(url: &str) -> Result<SocketAddr, CtlError> {
    let hostport = url.strip_prefix("http://").unwrap_or(url).trim_end_matches('/');
    hostport
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| CtlError::Other(format!("--agent {url:?}: expected http://HOST:PORT")))
}

/// The decision from YAML: the policies of `-f` and `--config`, the
/// destination from `--config` or made from `--to`, `--to-labels` and
/// `--to-ip`.
pub(crate) fn offline(c: &CheckArgs, q: &AuthzQuery) -> Result<AuthzCheck, CtlError> {
    let mut cfg = match &c.config {
        Some(p) => {
            let text = read(p)?;
            ConfigFile::parse(&p.display().to_string(), &text).map_err(|e| CtlError::Other(e.to_string()))?
        }
        None => ConfigFile {
            node: "offline".into(),
            ..Default::default()
        },
    };
    let mut problems = Vec::new();
    for f in yaml_paths(&c.files)? {
        let name = f.display().to_string();
        let found = authz::authz_policies_in(&read(&f)?).map_err(|e| CtlError::Other(format!("{name}: {e}")))?;
        for p in found {
            problems.extend(
                authz::validate(&p)
                    .into_iter()
                    .map(|e| format!("{name}: {}/{}: {e}", p.namespace, p.name)),
            );
            cfg.authorization_policies.push(p);
        }
    }
    if !problems.is_empty() {
        return Err(CtlError::Other(format!(
            "policies an agent would refuse:\n  - {}",
            problems.join("\n  - ")
        )));
    }
    let known = cfg
        .workloads
        .iter()
        .any(|w| w.label() == c.to || w.ip.to_string() == c.to);
    if !known {
        cfg.workloads.push(destination(c)?);
    }
    State::from_config(cfg, 1).authz_check(q).map_err(CtlError::Other)
}

/// The destination made from `--to ns/name`, `--to-labels` and `--to-ip`.
fn destination(c: &CheckArgs) -> Result<Workload, CtlError> {
    let Some((ns, name)) = c.to.split_once('/').filter(|(ns, n)| !ns.is_empty() && !n.is_empty()) else {
        return Err(CtlError::Other(format!(
            "--to {:?}: not in --config; give it as ns/name (with --to-labels)",
            c.to
        )));
    };
    let labels = c
        .to_labels
        .iter()
        .map(|kv| pair("--to-labels", kv))
        .collect::<Result<_, _>>()?;
    Ok(Workload {
        uid: format!("{ns}/{name}"),
        name: name.to_owned(),
        namespace: ns.to_owned(),
        service_account: "default".into(),
        node: "offline".into(),
        ip: c.to_ip.unwrap_or(Ipv4Addr::UNSPECIFIED),
        enrolled: true,
        labels,
        netns: None,
        host_veth: None,
        workload_name: None,
        locality: None,
    })
}

fn read(p: &Path) -> Result<String, CtlError> {
    std::fs::read_to_string(p).map_err(|e| CtlError::Other(format!("{}: {e}", p.display())))
}

fn yaml_paths(paths: &[PathBuf]) -> Result<Vec<PathBuf>, CtlError> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            files.extend(ferry_control::source::files::yaml_files(p));
        } else if p.exists() {
            files.push(p.clone());
        } else {
            return Err(CtlError::Other(format!("{}: no such file or directory", p.display())));
        }
    }
    Ok(files)
}

impl Row for AuthzCheck {
    const COLUMNS: &'static [&'static str] = &[
        "decision",
        "policy",
        "rule",
        "reason",
        "layer",
        "from",
        "to",
        "destination",
        "audited",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            if self.allowed { "allow" } else { "deny" }.into(),
            opt(&self.policy),
            opt(&self.rule),
            self.reason.clone(),
            self.layer.clone(),
            self.from.clone(),
            self.to.clone(),
            self.destination.clone(),
            if self.audited.is_empty() {
                "-".into()
            } else {
                self.audited.join(",")
            },
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bookinfo() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bookinfo-authz.yaml")
    }

    fn run(from: &str, to: &str, app: &str, method: Option<&str>) -> AuthzCheck {
        let c = CheckArgs {
            from: from.into(),
            to: to.into(),
            port: 9080,
            method: method.map(Into::into),
            path: method.map(|_| "/details/0".into()),
            files: vec![bookinfo()],
            to_labels: vec![format!("app={app}")],
            ..Default::default()
        };
        offline(&c, &c.query().unwrap()).unwrap()
    }

    #[test]
    fn bookinfo_offline() {
        // productpage may GET details (HTTP check).
        let r = run(
            "default/bookinfo-productpage",
            "default/details-v1",
            "details",
            Some("GET"),
        );
        assert!(r.allowed, "{r:?}");
        assert_eq!(
            (r.policy.as_deref(), r.rule, r.reason.as_str(), r.layer.as_str()),
            (Some("default/details-viewer"), Some(0), "allow", "http")
        );
        assert_eq!(r.decision, "allow default/details-viewer[0]");
        assert_eq!(r.policies, ["default/allow-nothing", "default/details-viewer"]);
        // The same at L4: the only ALLOW rule needs HTTP.
        let r = run("default/bookinfo-productpage", "default/details-v1", "details", None);
        assert_eq!(
            (r.allowed, r.reason.as_str(), r.layer.as_str()),
            (false, "l7_allow_on_l4", "l4")
        );
        // reviews may not read details; a POST from productpage neither.
        let r = run("default/bookinfo-reviews", "default/details-v1", "details", Some("GET"));
        assert_eq!((r.allowed, r.reason.as_str()), (false, "no_allow_matched"));
        let r = run(
            "default/bookinfo-productpage",
            "default/details-v1",
            "details",
            Some("POST"),
        );
        assert!(!r.allowed);
        // ratings admits reviews only; allow-nothing elsewhere.
        let r = run("default/bookinfo-reviews", "default/ratings-v1", "ratings", Some("GET"));
        assert_eq!(r.policy.as_deref(), Some("default/ratings-viewer"));
        let r = run(
            "default/bookinfo-productpage",
            "default/ratings-v1",
            "ratings",
            Some("GET"),
        );
        assert!(!r.allowed);
        let r = run("default/sleep", "default/mysql-0", "mysql", None);
        assert_eq!(
            (r.allowed, r.policy.as_deref(), r.reason.as_str()),
            (false, Some("default/allow-nothing"), "allow_nothing")
        );
        // A plaintext source has no principal.
        let r = run("10.1.1.2", "default/details-v1", "details", Some("GET"));
        assert!(!r.allowed && r.source_principal.is_none());
        // The table names the deciding policy, rule and reason.
        let r = run(
            "default/bookinfo-productpage",
            "default/details-v1",
            "details",
            Some("GET"),
        );
        let t = crate::output::rows_table(std::slice::from_ref(&r));
        assert!(t.starts_with("DECISION  POLICY"), "{t}");
        assert!(
            t.contains("allow     default/details-viewer  0     allow   http"),
            "{t}"
        );
    }

    #[test]
    fn bad_input_is_reported_not_panicked_on() {
        let c = CheckArgs {
            from: "nobody".into(),
            to: "default/x".into(),
            port: 1,
            files: vec![bookinfo()],
            ..Default::default()
        };
        let e = offline(&c, &c.query().unwrap()).unwrap_err();
        assert!(e.to_string().contains("expected ns/pod"), "{e}");
        let c = CheckArgs {
            from: "a/b".into(),
            to: "10.0.0.1".into(),
            ..Default::default()
        };
        assert!(offline(&c, &c.query().unwrap())
            .unwrap_err()
            .to_string()
            .contains("--to"));
        let c = CheckArgs {
            headers: vec!["novalue".into()],
            ..Default::default()
        };
        assert!(c.query().is_err());
        assert!(agent_addr("http://127.0.0.1:15000/").is_ok());
        assert!(agent_addr("nope").is_err());
    }
}
