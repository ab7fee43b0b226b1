//! One plugin invocation: the runtime's command, decided over an
//! [`AgentLink`] (the agent's socket, or a fake in tests). Contract:
//!
//! - **ADD** passes `prevResult` through once the agent says the pod is
//!   captured or not in the mesh. It fails (a CNI error on stdout, exit 1)
//!   when the agent says the pod cannot be captured, and when no answer
//!   comes within `timeoutSeconds` (the agent unreachable the whole time,
//!   or not done): fail closed, so the runtime retries the sandbox rather
//!   than start an application the mesh does not see. Pods of excluded
//!   namespaces, and sandboxes that are not Kubernetes pods, pass without
//!   asking.
//! - **DEL** tells the agent, best effort: it never fails because the agent
//!   is gone, and a second DEL is as good as the first.
//! - **CHECK** asks the agent how the pod is now, without waiting.
//! - **STATUS** succeeds when the agent answers; **GC** has nothing to do;
//!   **VERSION** lists the versions.

use std::{
    thread,
    time::{Duration, Instant},
};

use ferry_model::cni::{Op, PodInfo, Reply, Request, PROTOCOL_VERSION};

use crate::spec::{self, code, CniError, Command, Config, Env};

/// Why a call to the agent got no answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkError {
    /// No connection (no socket, nobody listening).
    Unreachable(String),
    /// Connected, but no (valid) answer before the deadline.
    NoAnswer(String),
}

impl std::fmt::Display for LinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkError::Unreachable(e) => write!(f, "agent unreachable: {e}"),
            LinkError::NoAnswer(e) => write!(f, "no answer from the agent: {e}"),
        }
    }
}

/// One request to the agent, one reply, before `deadline`.
pub trait AgentLink {
    fn call(&mut self, req: &Request, deadline: Instant) -> Result<Reply, LinkError>;
}

/// What the process prints and how it exits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Output {
    pub stdout: String,
    /// Notes for the runtime's log.
    pub stderr: String,
    pub exit: i32,
}

impl Output {
    fn ok(stdout: String, stderr: String) -> Self {
        Self {
            stdout,
            stderr,
            exit: 0,
        }
    }

    fn err(e: &CniError, version: &str, stderr: String) -> Self {
        Self {
            stdout: e.to_json(version).to_string(),
            stderr,
            exit: 1,
        }
    }
}

/// How long between attempts to reach an agent that did not answer.
const RETRY_EVERY: Duration = Duration::from_millis(200);
/// DEL, CHECK and STATUS wait at most this long for the agent.
const SHORT_WAIT: Duration = Duration::from_secs(5);

/// Runs one invocation: `vars` are the environment, `stdin` the network
/// config, `link` the agent, `agent_for` builds it from the config's socket.
pub fn run<L: AgentLink>(
    vars: impl Fn(&str) -> Option<String>,
    stdin: &[u8],
    agent_for: impl FnOnce(&Config) -> L,
) -> Output {
    let env = match Env::from_vars(vars) {
        Ok(e) => e,
        Err(e) => return Output::err(&e, &spec::error_version(stdin), String::new()),
    };
    if env.command == Command::Version {
        return Output::ok(spec::version_info(stdin).to_string(), String::new());
    }
    let cfg = match Config::parse(stdin) {
        Ok(c) => c,
        Err(e) => return Output::err(&e, &spec::error_version(stdin), String::new()),
    };
    let mut link = agent_for(&cfg);
    let version = cfg.cni_version.clone();
    let result = match env.command {
        Command::Add => add(&env, &cfg, &mut link),
        Command::Del => Ok(del(&env, &cfg, &mut link)),
        Command::Check => check(&env, &cfg, &mut link),
        Command::Status => status(&cfg, &mut link),
        Command::Gc | Command::Version => Ok(Output::ok(String::new(), String::new())),
    };
    result.unwrap_or_else(|(e, note)| Output::err(&e, &version, note))
}

type Outcome = Result<Output, (CniError, String)>;

/// The pod the runtime names, unless it is not one the agent is asked
/// about (then why, for the log).
fn pod_of(env: &Env, cfg: &Config) -> Result<PodInfo, String> {
    let (Some(namespace), Some(name)) = (&env.pod.namespace, &env.pod.name) else {
        return Err("not a Kubernetes pod (no K8S_POD_NAMESPACE/K8S_POD_NAME in CNI_ARGS): passed".into());
    };
    if cfg.exclude_namespaces.iter().any(|n| n == namespace) {
        return Err(format!(
            "pod {namespace}/{name}: namespace excluded (excludeNamespaces): passed"
        ));
    }
    Ok(PodInfo {
        uid: env.pod.uid.clone().unwrap_or_default(),
        namespace: namespace.clone(),
        name: name.clone(),
        container_id: env.container_id.clone(),
        netns: env.netns.clone(),
        ips: cfg.prev_ips(),
    })
}

fn request(op: Op, pod: PodInfo, timeout: Duration) -> Request {
    Request {
        version: PROTOCOL_VERSION,
        op,
        pod,
        timeout_ms: timeout.as_millis().min(u128::from(u64::MAX)) as u64,
    }
}

fn add(env: &Env, cfg: &Config, link: &mut impl AgentLink) -> Outcome {
    let Some(result) = cfg.pass_through() else {
        return Err((
            CniError::new(
                code::INVALID_CONFIG,
                "ferry-cni is a chained plugin: ADD needs a prevResult",
                "list it after the plugin that sets up the pod's network (its conflist's last entry)",
            ),
            String::new(),
        ));
    };
    let pod = match pod_of(env, cfg) {
        Ok(p) => p,
        Err(note) => return Ok(Output::ok(result.to_string(), note)),
    };
    let label = pod.label();
    let start = Instant::now();
    let deadline = start + cfg.timeout;
    // The agent answers a little before the plugin gives up, so its reason
    // (not a bare timeout) reaches the runtime.
    let margin = (cfg.timeout / 5).min(Duration::from_secs(1));
    let mut last: Option<LinkError> = None;
    let mut attempts = 0u32;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        attempts += 1;
        match link.call(&request(Op::Add, pod.clone(), left.saturating_sub(margin)), deadline) {
            Ok(Reply::Captured { pod_id }) => {
                let note = format!(
                    "pod {label} captured by ferry-agent (pod id {pod_id}) after {} ms",
                    start.elapsed().as_millis()
                );
                return Ok(Output::ok(result.to_string(), note));
            }
            Ok(Reply::NotInMesh { reason }) => {
                return Ok(Output::ok(
                    result.to_string(),
                    format!("pod {label} not in the mesh: {reason}"),
                ))
            }
            Ok(Reply::Failed { reason }) => {
                return Err((
                    CniError::new(
                        code::NOT_CAPTURED,
                        format!("ferry-agent could not capture pod {label}"),
                        reason,
                    ),
                    String::new(),
                ))
            }
            Ok(other) => last = Some(LinkError::NoAnswer(format!("unexpected reply {:?}", other.result()))),
            Err(e) => last = Some(e),
        }
        thread::sleep(RETRY_EVERY.min(deadline.saturating_duration_since(Instant::now())));
    }
    let waited = cfg.timeout.as_secs_f64();
    let (msg, details) = match &last {
        Some(LinkError::Unreachable(e)) => (
            format!("pod {label} not captured: ferry-agent unreachable for {waited}s"),
            format!(
                "socket {}: {e}; failing closed so the runtime retries the sandbox ({attempts} attempts)",
                cfg.socket.display()
            ),
        ),
        Some(LinkError::NoAnswer(e)) => (
            format!("pod {label} not captured within {waited}s"),
            format!("socket {}: {e} ({attempts} attempts)", cfg.socket.display()),
        ),
        None => (
            format!("pod {label} not captured within {waited}s"),
            format!("socket {}: no attempt made", cfg.socket.display()),
        ),
    };
    Err((CniError::new(code::TRY_AGAIN_LATER, msg, details), String::new()))
}

fn del(env: &Env, cfg: &Config, link: &mut impl AgentLink) -> Output {
    let pod = match pod_of(env, cfg) {
        Ok(p) => p,
        Err(note) => return Output::ok(String::new(), note),
    };
    let label = pod.label();
    let wait = cfg.timeout.min(SHORT_WAIT);
    let note = match link.call(&request(Op::Del, pod, wait), Instant::now() + wait) {
        Ok(r) => format!("pod {label}: DEL told to ferry-agent ({})", r.result()),
        Err(e) => format!("pod {label}: DEL not told to ferry-agent ({e}); nothing else to undo"),
    };
    Output::ok(String::new(), note)
}

fn check(env: &Env, cfg: &Config, link: &mut impl AgentLink) -> Outcome {
    if spec::version_tuple(&cfg.cni_version) < (0, 4, 0) {
        return Err((
            CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!("CHECK is not defined for cniVersion {}", cfg.cni_version),
                "CHECK needs cniVersion 0.4.0 or later",
            ),
            String::new(),
        ));
    }
    if cfg.prev_result.is_none() {
        return Err((
            CniError::new(code::INVALID_CONFIG, "CHECK needs a prevResult", ""),
            String::new(),
        ));
    }
    let pod = match pod_of(env, cfg) {
        Ok(p) => p,
        Err(note) => return Ok(Output::ok(String::new(), note)),
    };
    let label = pod.label();
    let wait = cfg.timeout.min(SHORT_WAIT);
    match link.call(&request(Op::Check, pod, wait), Instant::now() + wait) {
        Ok(Reply::Captured { .. } | Reply::NotInMesh { .. }) => Ok(Output::ok(String::new(), String::new())),
        Ok(Reply::Failed { reason }) => Err((
            CniError::new(code::NOT_CAPTURED, format!("pod {label} is not captured"), reason),
            String::new(),
        )),
        Ok(other) => Err((
            CniError::new(
                code::TRY_AGAIN_LATER,
                format!("pod {label}: unexpected reply from ferry-agent"),
                other.result(),
            ),
            String::new(),
        )),
        Err(e) => Err((
            CniError::new(
                code::TRY_AGAIN_LATER,
                format!("pod {label}: cannot check with ferry-agent"),
                format!("socket {}: {e}", cfg.socket.display()),
            ),
            String::new(),
        )),
    }
}

fn status(cfg: &Config, link: &mut impl AgentLink) -> Outcome {
    let wait = cfg.timeout.min(SHORT_WAIT);
    match link.call(&request(Op::Status, PodInfo::default(), wait), Instant::now() + wait) {
        Ok(Reply::Ready) => Ok(Output::ok(String::new(), String::new())),
        Ok(other) => Err((
            CniError::new(code::NOT_AVAILABLE, "ferry-agent is not ready", other.result()),
            String::new(),
        )),
        Err(e) => Err((
            CniError::new(
                code::NOT_AVAILABLE,
                "ferry-agent is not available: new pods cannot be captured",
                format!("socket {}: {e}", cfg.socket.display()),
            ),
            String::new(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, VecDeque};

    use serde_json::{json, Value};

    use super::*;

    /// Answers from a script; records what it was asked.
    #[derive(Default)]
    struct Fake {
        answers: VecDeque<Result<Reply, LinkError>>,
        asked: Vec<Request>,
    }

    impl AgentLink for &mut Fake {
        fn call(&mut self, req: &Request, _deadline: Instant) -> Result<Reply, LinkError> {
            self.asked.push(req.clone());
            self.answers
                .pop_front()
                .unwrap_or_else(|| Err(LinkError::Unreachable("connection refused".into())))
        }
    }

    fn env(cmd: &str, args: &str) -> impl Fn(&str) -> Option<String> {
        let m: BTreeMap<&str, String> = [
            ("CNI_COMMAND", cmd.to_owned()),
            ("CNI_CONTAINERID", "sandbox-1".to_owned()),
            ("CNI_NETNS", "/var/run/netns/cni-1".to_owned()),
            ("CNI_IFNAME", "eth0".to_owned()),
            ("CNI_ARGS", args.to_owned()),
        ]
        .into_iter()
        .collect();
        move |k| m.get(k).cloned()
    }

    const POD: &str = "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web;K8S_POD_UID=u-1";

    fn prev() -> Value {
        json!({"cniVersion":"1.0.0","interfaces":[{"name":"eth0"}],"ips":[{"address":"10.1.1.5/24","interface":0}]})
    }

    fn conf(extra: Value) -> Vec<u8> {
        let mut c =
            json!({"cniVersion":"1.0.0","name":"k8s","type":"ferry-cni","timeoutSeconds":0.5,"prevResult":prev()});
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c.to_string().into_bytes()
    }

    fn run_with(fake: &mut Fake, cmd: &str, args: &str, stdin: &[u8]) -> Output {
        run(env(cmd, args), stdin, |_| fake)
    }

    #[test]
    fn add_passes_prev_result_through_once_captured() {
        let mut fake = Fake::default();
        fake.answers.push_back(Ok(Reply::Captured { pod_id: 3 }));
        let out = run_with(&mut fake, "ADD", POD, &conf(json!({})));
        assert_eq!(out.exit, 0, "{out:?}");
        assert_eq!(serde_json::from_str::<Value>(&out.stdout).unwrap(), prev());
        let req = &fake.asked[0];
        assert_eq!((req.op, req.version), (Op::Add, PROTOCOL_VERSION));
        assert_eq!(req.pod.uid, "u-1");
        assert_eq!(req.pod.label(), "shop/web");
        assert_eq!(req.pod.container_id, "sandbox-1");
        assert_eq!(req.pod.netns, "/var/run/netns/cni-1");
        assert_eq!(req.pod.ips, vec!["10.1.1.5".parse::<std::net::IpAddr>().unwrap()]);
        // The agent is given less than the plugin's own wait.
        assert!(req.timeout_ms > 0 && req.timeout_ms < 500, "{}", req.timeout_ms);
    }

    #[test]
    fn add_retries_an_agent_that_is_away_then_answers() {
        let mut fake = Fake::default();
        fake.answers
            .push_back(Err(LinkError::Unreachable("no such file".into())));
        fake.answers.push_back(Err(LinkError::NoAnswer("closed".into())));
        fake.answers.push_back(Ok(Reply::NotInMesh {
            reason: "not opted in".into(),
        }));
        let out = run_with(&mut fake, "ADD", POD, &conf(json!({"timeoutSeconds": 5})));
        assert_eq!(out.exit, 0, "{out:?}");
        assert_eq!(fake.asked.len(), 3);
        assert!(out.stderr.contains("not in the mesh: not opted in"), "{}", out.stderr);
    }

    #[test]
    fn add_fails_closed_when_the_agent_is_unreachable() {
        let mut fake = Fake::default();
        let started = Instant::now();
        let out = run_with(&mut fake, "ADD", POD, &conf(json!({"socketPath": "/run/none.sock"})));
        let took = started.elapsed();
        assert_eq!(out.exit, 1);
        assert!(
            took >= Duration::from_millis(500) && took < Duration::from_secs(3),
            "{took:?}"
        );
        let e: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(e["cniVersion"], "1.0.0");
        assert_eq!(e["code"], code::TRY_AGAIN_LATER);
        assert_eq!(e["msg"], "pod shop/web not captured: ferry-agent unreachable for 0.5s");
        let details = e["details"].as_str().unwrap();
        assert!(
            details.contains("/run/none.sock") && details.contains("connection refused"),
            "{details}"
        );
        assert!(fake.asked.len() >= 2, "retried: {}", fake.asked.len());
    }

    #[test]
    fn add_fails_with_the_agents_reason() {
        let mut fake = Fake::default();
        fake.answers.push_back(Ok(Reply::Failed {
            reason: "port 15001 is already in use".into(),
        }));
        let out = run_with(&mut fake, "ADD", POD, &conf(json!({})));
        assert_eq!(out.exit, 1);
        let e: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(e["code"], code::NOT_CAPTURED);
        assert_eq!(e["msg"], "ferry-agent could not capture pod shop/web");
        assert_eq!(e["details"], "port 15001 is already in use");
    }

    #[test]
    fn excluded_namespaces_and_non_pods_pass_without_asking() {
        let mut fake = Fake::default();
        let out = run_with(
            &mut fake,
            "ADD",
            "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=dns",
            &conf(json!({})),
        );
        assert_eq!((out.exit, fake.asked.len()), (0, 0));
        assert_eq!(serde_json::from_str::<Value>(&out.stdout).unwrap(), prev());
        let out = run_with(&mut fake, "ADD", "", &conf(json!({})));
        assert_eq!((out.exit, fake.asked.len()), (0, 0));
        let out = run_with(&mut fake, "ADD", POD, &conf(json!({"excludeNamespaces": ["shop"]})));
        assert_eq!((out.exit, fake.asked.len()), (0, 0));
    }

    #[test]
    fn add_without_prev_result_is_a_config_error() {
        let mut fake = Fake::default();
        let out = run_with(
            &mut fake,
            "ADD",
            POD,
            br#"{"cniVersion":"1.0.0","name":"k8s","type":"ferry-cni"}"#,
        );
        assert_eq!(out.exit, 1);
        assert_eq!(
            serde_json::from_str::<Value>(&out.stdout).unwrap()["code"],
            code::INVALID_CONFIG
        );
        assert!(fake.asked.is_empty());
    }

    #[test]
    fn del_is_best_effort_and_silent() {
        let mut fake = Fake::default();
        fake.answers.push_back(Ok(Reply::Deleted));
        let out = run_with(&mut fake, "DEL", POD, &conf(json!({})));
        assert_eq!((out.exit, out.stdout.as_str()), (0, ""));
        assert_eq!(fake.asked[0].op, Op::Del);
        // Agent gone: still success, twice.
        for _ in 0..2 {
            let out = run_with(&mut fake, "DEL", POD, &conf(json!({})));
            assert_eq!((out.exit, out.stdout.as_str()), (0, ""), "{out:?}");
            assert!(out.stderr.contains("not told"), "{}", out.stderr);
        }
    }

    #[test]
    fn check_reports_the_capture_as_it_is() {
        let mut fake = Fake::default();
        fake.answers.push_back(Ok(Reply::Captured { pod_id: 1 }));
        fake.answers.push_back(Ok(Reply::Failed {
            reason: "no longer enrolled".into(),
        }));
        let out = run_with(&mut fake, "CHECK", POD, &conf(json!({})));
        assert_eq!((out.exit, out.stdout.as_str()), (0, ""));
        let out = run_with(&mut fake, "CHECK", POD, &conf(json!({})));
        assert_eq!(out.exit, 1);
        assert_eq!(
            serde_json::from_str::<Value>(&out.stdout).unwrap()["code"],
            code::NOT_CAPTURED
        );
        let out = run_with(&mut fake, "CHECK", POD, &conf(json!({})));
        assert_eq!(
            serde_json::from_str::<Value>(&out.stdout).unwrap()["code"],
            code::TRY_AGAIN_LATER
        );
        // CHECK does not exist before 0.4.0.
        let out = run_with(&mut fake, "CHECK", POD, &conf(json!({"cniVersion": "0.3.1"})));
        assert_eq!(
            serde_json::from_str::<Value>(&out.stdout).unwrap()["code"],
            code::INCOMPATIBLE_VERSION
        );
    }

    #[test]
    fn version_status_and_gc() {
        let mut fake = Fake::default();
        let out = run(env("VERSION", ""), br#"{"cniVersion":"1.0.0"}"#, |_| &mut fake);
        assert_eq!(out.exit, 0);
        let v: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["supportedVersions"].as_array().unwrap().len(), 5);
        fake.answers.push_back(Ok(Reply::Ready));
        let status = br#"{"cniVersion":"1.1.0","name":"k8s","type":"ferry-cni"}"#;
        assert_eq!(run(env("STATUS", ""), status, |_| &mut fake).exit, 0);
        let out = run(env("STATUS", ""), status, |_| &mut fake);
        assert_eq!(
            serde_json::from_str::<Value>(&out.stdout).unwrap()["code"],
            code::NOT_AVAILABLE
        );
        let out = run(env("GC", ""), status, |_| &mut fake);
        assert_eq!((out.exit, out.stdout.as_str()), (0, ""));
    }

    #[test]
    fn bad_environment_and_config_are_cni_errors() {
        let mut fake = Fake::default();
        let out = run(|_: &str| None, b"{}", |_| &mut fake);
        assert_eq!(out.exit, 1);
        assert_eq!(
            serde_json::from_str::<Value>(&out.stdout).unwrap()["code"],
            code::INVALID_ENV
        );
        let out = run_with(&mut fake, "ADD", POD, b"\xff\xfe");
        assert_eq!(
            serde_json::from_str::<Value>(&out.stdout).unwrap()["code"],
            code::DECODE
        );
        assert!(fake.asked.is_empty());
    }
}
