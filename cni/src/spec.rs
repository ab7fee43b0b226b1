//! The CNI specification's side of the plugin (1.0/1.1, with 0.3.x and
//! 0.4.0 configs accepted): the environment a runtime sets, the network
//! config on stdin with Ferry's fields, versions and the error object.
//! Pure: no I/O; every input from the runtime is parsed without panicking.

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf, time::Duration};

use serde::Deserialize;
use serde_json::{json, Value};

/// Every `cniVersion` this plugin accepts, oldest first. Chained, it never
/// builds a result of its own (it passes `prevResult` through), so it reads
/// and writes each of these shapes unchanged.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// The newest of them.
pub const LATEST_VERSION: &str = "1.1.0";

/// Where the agent listens unless the config says (`socketPath`).
pub const DEFAULT_SOCKET: &str = "/var/run/ferry/cni.sock";
/// How long an ADD waits for the agent unless the config says (`timeoutSeconds`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest `timeoutSeconds` accepted (runtimes give a sandbox a few
/// minutes at most).
pub const MAX_TIMEOUT: Duration = Duration::from_secs(300);
/// Namespaces never captured unless the config says otherwise
/// (`excludeNamespaces`): the cluster's own, which must start even when the
/// agent cannot (Ferry's own namespace is added by the installer).
pub const DEFAULT_EXCLUDED: &[&str] = &["kube-system"];

/// The spec's well-known error codes (CNI spec, "Error").
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Invalid necessary environment variables.
    pub const INVALID_ENV: u32 = 4;
    /// Failed to decode content.
    pub const DECODE: u32 = 6;
    /// Invalid network config.
    pub const INVALID_CONFIG: u32 = 7;
    /// Try again later: a transient condition (here: the agent unreachable,
    /// or the pod not captured within the wait).
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: the plugin is not available (the agent is not there).
    pub const NOT_AVAILABLE: u32 = 50;
    /// Plugin-specific (100 and up): the agent answered that the pod cannot
    /// be captured.
    pub const NOT_CAPTURED: u32 = 100;
}

/// `CNI_COMMAND`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

impl Command {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            _ => return None,
        })
    }
}

/// A CNI error: what the plugin prints on stdout (with the config's
/// `cniVersion`) before exiting non-zero.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The error object of the spec.
    pub fn to_json(&self, cni_version: &str) -> Value {
        json!({"cniVersion": cni_version, "code": self.code, "msg": self.msg, "details": self.details})
    }
}

/// Kubernetes' `CNI_ARGS` (`K=V;K=V`): what the runtime says of the pod.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodArgs {
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub uid: Option<String>,
}

impl PodArgs {
    /// Parses `CNI_ARGS`; malformed pairs and unknown keys are skipped.
    pub fn parse(s: &str) -> Self {
        let pairs: BTreeMap<&str, &str> = s
            .split(';')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.trim(), v.trim()))
            .filter(|(_, v)| !v.is_empty())
            .collect();
        let get = |k: &str| pairs.get(k).map(|v| (*v).to_owned());
        Self {
            namespace: get("K8S_POD_NAMESPACE"),
            name: get("K8S_POD_NAME"),
            uid: get("K8S_POD_UID"),
        }
    }
}

/// The runtime's environment for one invocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Env {
    pub command: Command,
    pub container_id: String,
    /// Empty when not given (a DEL may come without it).
    pub netns: String,
    pub ifname: String,
    pub pod: PodArgs,
}

impl Env {
    /// Reads the `CNI_*` variables through `var`; says which required one
    /// is missing (code 4). VERSION, STATUS and GC need none.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, CniError> {
        let get = |k: &str| var(k).filter(|v| !v.is_empty());
        let cmd = get("CNI_COMMAND").ok_or_else(|| CniError::new(code::INVALID_ENV, "CNI_COMMAND is not set", ""))?;
        let command = Command::parse(&cmd).ok_or_else(|| {
            CniError::new(
                code::INVALID_ENV,
                format!("unknown CNI_COMMAND {cmd:?}"),
                "expected ADD, DEL, CHECK, VERSION, STATUS or GC",
            )
        })?;
        let required: &[&str] = match command {
            Command::Add | Command::Check => &["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"],
            Command::Del => &["CNI_CONTAINERID", "CNI_IFNAME"],
            Command::Version | Command::Status | Command::Gc => &[],
        };
        let missing: Vec<&str> = required.iter().copied().filter(|k| get(k).is_none()).collect();
        if !missing.is_empty() {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!("{} not set", missing.join(", ")),
                format!("CNI_COMMAND={cmd} needs {}", required.join(", ")),
            ));
        }
        Ok(Self {
            command,
            container_id: get("CNI_CONTAINERID").unwrap_or_default(),
            netns: get("CNI_NETNS").unwrap_or_default(),
            ifname: get("CNI_IFNAME").unwrap_or_default(),
            pod: PodArgs::parse(&get("CNI_ARGS").unwrap_or_default()),
        })
    }
}

/// The network config as it comes on stdin; unknown fields are ignored (the
/// spec's rule), as is everything the plugin does not use.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawConf {
    cni_version: Option<String>,
    name: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    socket_path: Option<String>,
    timeout_seconds: Option<f64>,
    exclude_namespaces: Option<Vec<String>>,
    prev_result: Option<Value>,
}

/// The plugin's config, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub cni_version: String,
    pub name: String,
    /// The agent's socket (`socketPath`).
    pub socket: PathBuf,
    /// How long an ADD waits for the agent to capture the pod (`timeoutSeconds`).
    pub timeout: Duration,
    /// Pods of these namespaces are never captured: no agent is asked (`excludeNamespaces`).
    pub exclude_namespaces: Vec<String>,
    /// What the plugins before this one produced (chained).
    pub prev_result: Option<Value>,
}

impl Config {
    /// Parses and checks the config on stdin: undecodable is code 6, a
    /// missing or bad field 7, an unsupported `cniVersion` 1. Every problem
    /// is listed at once.
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        let raw: RawConf = serde_json::from_slice(stdin)
            .map_err(|e| CniError::new(code::DECODE, "cannot decode the network config on stdin", e.to_string()))?;
        let mut problems = Vec::new();
        let cni_version = raw.cni_version.unwrap_or_default();
        if cni_version.is_empty() {
            problems.push("cniVersion is required".to_owned());
        }
        let name = raw.name.unwrap_or_default();
        if name.is_empty() {
            problems.push("name is required".to_owned());
        }
        if raw.kind.as_deref().is_none_or(str::is_empty) {
            problems.push("type is required".to_owned());
        }
        let timeout = match raw.timeout_seconds {
            None => DEFAULT_TIMEOUT,
            Some(s) if s.is_finite() && s > 0.0 && s <= MAX_TIMEOUT.as_secs_f64() => Duration::from_secs_f64(s),
            Some(s) => {
                problems.push(format!(
                    "timeoutSeconds: {s} is not between 0 (excluded) and {}",
                    MAX_TIMEOUT.as_secs()
                ));
                DEFAULT_TIMEOUT
            }
        };
        let socket = raw.socket_path.unwrap_or_else(|| DEFAULT_SOCKET.to_owned());
        if socket.is_empty() || !socket.starts_with('/') {
            problems.push(format!("socketPath: {socket:?} is not an absolute path"));
        }
        if let Some(p) = raw.prev_result.as_ref().filter(|p| !p.is_object()) {
            problems.push(format!("prevResult: expected an object, got {p}"));
        }
        if !problems.is_empty() {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "invalid network config for ferry-cni",
                problems.join("; "),
            ));
        }
        if !version_supported(&cni_version) {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!("cniVersion {cni_version} is not supported"),
                format!("supported: {}", SUPPORTED_VERSIONS.join(", ")),
            ));
        }
        Ok(Self {
            cni_version,
            name,
            socket: PathBuf::from(socket),
            timeout,
            exclude_namespaces: raw
                .exclude_namespaces
                .unwrap_or_else(|| DEFAULT_EXCLUDED.iter().map(|s| (*s).to_owned()).collect()),
            prev_result: raw.prev_result,
        })
    }

    /// The addresses the plugins before this one gave the pod
    /// (`prevResult.ips[].address`, prefix length dropped; 0.3.x and later
    /// share this shape).
    pub fn prev_ips(&self) -> Vec<IpAddr> {
        let Some(ips) = self
            .prev_result
            .as_ref()
            .and_then(|p| p.get("ips"))
            .and_then(Value::as_array)
        else {
            return Vec::new();
        };
        ips.iter()
            .filter_map(|ip| ip.get("address")?.as_str())
            .filter_map(|a| a.split('/').next()?.parse().ok())
            .collect()
    }

    /// ADD's output: `prevResult` unchanged (its `cniVersion` filled in
    /// from the config only when it has none).
    pub fn pass_through(&self) -> Option<Value> {
        let mut r = self.prev_result.clone()?;
        if let Some(o) = r.as_object_mut() {
            o.entry("cniVersion")
                .or_insert_with(|| Value::String(self.cni_version.clone()));
        }
        Some(r)
    }
}

/// Whether `v` is one of [`SUPPORTED_VERSIONS`].
pub fn version_supported(v: &str) -> bool {
    SUPPORTED_VERSIONS.contains(&v)
}

/// `a.b.c` as numbers (missing or bad parts as 0), for "at least" checks.
pub fn version_tuple(v: &str) -> (u32, u32, u32) {
    let mut it = v.split('.').map(|p| p.parse().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0), it.next().unwrap_or(0))
}

/// VERSION's answer. The runtime may say which version it speaks (a
/// `cniVersion` on stdin); the answer carries that one when supported.
pub fn version_info(stdin: &[u8]) -> Value {
    let asked = serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_owned))
        .filter(|v| version_supported(v))
        .unwrap_or_else(|| LATEST_VERSION.to_owned());
    json!({"cniVersion": asked, "supportedVersions": SUPPORTED_VERSIONS})
}

/// The `cniVersion` an error should carry: the config's if it can be read.
pub fn error_version(stdin: &[u8]) -> String {
    serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_owned))
        .filter(|v| version_supported(v))
        .unwrap_or_else(|| LATEST_VERSION.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: BTreeMap<String, String> = pairs.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn env_is_read_and_missing_variables_are_named() {
        let env = Env::from_vars(vars(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_NETNS", "/var/run/netns/cni-1"),
            ("CNI_IFNAME", "eth0"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u-9",
            ),
            ("CNI_PATH", "/opt/cni/bin"),
        ]))
        .unwrap();
        assert_eq!(env.command, Command::Add);
        assert_eq!(env.netns, "/var/run/netns/cni-1");
        assert_eq!(
            env.pod,
            PodArgs {
                namespace: Some("shop".into()),
                name: Some("web-1".into()),
                uid: Some("u-9".into())
            }
        );

        let e = Env::from_vars(vars(&[("CNI_COMMAND", "ADD"), ("CNI_IFNAME", "eth0")])).unwrap_err();
        assert_eq!(e.code, code::INVALID_ENV);
        assert_eq!(e.msg, "CNI_CONTAINERID, CNI_NETNS not set");
        // DEL may come without a netns; VERSION needs nothing.
        assert!(Env::from_vars(vars(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "a"),
            ("CNI_IFNAME", "eth0")
        ]))
        .is_ok());
        assert!(Env::from_vars(vars(&[("CNI_COMMAND", "VERSION")])).is_ok());
        assert_eq!(Env::from_vars(vars(&[])).unwrap_err().code, code::INVALID_ENV);
        assert_eq!(
            Env::from_vars(vars(&[("CNI_COMMAND", "EXPLODE")])).unwrap_err().code,
            code::INVALID_ENV
        );
    }

    #[test]
    fn cni_args_tolerate_garbage() {
        assert_eq!(PodArgs::parse(""), PodArgs::default());
        assert_eq!(
            PodArgs::parse(";;=;K8S_POD_NAME;K8S_POD_NAME=;x=y=z"),
            PodArgs::default()
        );
        assert_eq!(PodArgs::parse("K8S_POD_NAME=a=b").name.as_deref(), Some("a=b"));
    }

    #[test]
    fn config_defaults_and_fields() {
        let c = Config::parse(br#"{"cniVersion":"1.0.0","name":"k8s","type":"ferry-cni","unknown":{"x":1}}"#).unwrap();
        assert_eq!(c.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(c.timeout, DEFAULT_TIMEOUT);
        assert_eq!(c.exclude_namespaces, vec!["kube-system".to_owned()]);
        assert_eq!(c.prev_result, None);
        let c = Config::parse(
            br#"{"cniVersion":"1.1.0","name":"k8s","type":"ferry-cni","socketPath":"/run/x.sock",
                "timeoutSeconds":2.5,"excludeNamespaces":[],
                "prevResult":{"cniVersion":"1.1.0","interfaces":[{"name":"eth0"}],
                  "ips":[{"address":"10.1.1.5/24","interface":0},{"address":"fd00::5/64"},{"address":"junk"},{"nope":1}]}}"#,
        )
        .unwrap();
        assert_eq!(c.socket, PathBuf::from("/run/x.sock"));
        assert_eq!(c.timeout, Duration::from_millis(2500));
        assert!(c.exclude_namespaces.is_empty());
        assert_eq!(
            c.prev_ips(),
            vec!["10.1.1.5".parse::<IpAddr>().unwrap(), "fd00::5".parse().unwrap()]
        );
    }

    #[test]
    fn bad_configs_get_the_spec_codes() {
        assert_eq!(Config::parse(b"not json").unwrap_err().code, code::DECODE);
        assert_eq!(Config::parse(b"").unwrap_err().code, code::DECODE);
        assert_eq!(Config::parse(br#"{"cniVersion":7}"#).unwrap_err().code, code::DECODE);
        let e = Config::parse(br#"{"timeoutSeconds":-1,"socketPath":"rel","prevResult":[1]}"#).unwrap_err();
        assert_eq!(e.code, code::INVALID_CONFIG);
        for needle in [
            "cniVersion is required",
            "name is required",
            "type is required",
            "timeoutSeconds",
            "socketPath",
            "prevResult",
        ] {
            assert!(e.details.contains(needle), "{needle} in {}", e.details);
        }
        let e = Config::parse(br#"{"cniVersion":"9.9.9","name":"n","type":"ferry-cni"}"#).unwrap_err();
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
        assert!(e.details.contains("1.1.0"));
        assert_eq!(
            Config::parse(br#"{"cniVersion":"1.0.0","name":"n","type":"t","timeoutSeconds":1e9}"#)
                .unwrap_err()
                .code,
            code::INVALID_CONFIG
        );
    }

    #[test]
    fn prev_result_passes_through_unchanged() {
        let prev = json!({"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/var/run/netns/x"}],
            "ips":[{"address":"10.1.1.5/24","gateway":"10.1.1.1","interface":0}],"routes":[],"dns":{}});
        let conf = json!({"cniVersion":"1.0.0","name":"k8s","type":"ferry-cni","prevResult":prev});
        let c = Config::parse(conf.to_string().as_bytes()).unwrap();
        assert_eq!(c.pass_through(), Some(prev));
        // A prevResult without a version gets the config's.
        let conf = json!({"cniVersion":"0.4.0","name":"k8s","type":"ferry-cni","prevResult":{"ips":[]}});
        let c = Config::parse(conf.to_string().as_bytes()).unwrap();
        assert_eq!(c.pass_through(), Some(json!({"cniVersion":"0.4.0","ips":[]})));
    }

    #[test]
    fn version_negotiation() {
        let v = version_info(br#"{"cniVersion":"1.0.0"}"#);
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(
            v["supportedVersions"],
            json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
        );
        assert_eq!(version_info(b"")["cniVersion"], LATEST_VERSION);
        assert_eq!(version_info(br#"{"cniVersion":"2.0.0"}"#)["cniVersion"], LATEST_VERSION);
        assert!(version_tuple("0.4.0") >= (0, 4, 0) && version_tuple("0.3.1") < (0, 4, 0));
        assert_eq!(version_tuple("x"), (0, 0, 0));
        assert_eq!(error_version(b"garbage"), LATEST_VERSION);
        assert_eq!(error_version(br#"{"cniVersion":"0.3.1"}"#), "0.3.1");
    }

    #[test]
    fn errors_have_the_spec_shape() {
        let e = CniError::new(code::TRY_AGAIN_LATER, "m", "d");
        assert_eq!(
            e.to_json("1.0.0"),
            json!({"cniVersion":"1.0.0","code":11,"msg":"m","details":"d"})
        );
    }
}
