//! Cluster-in-a-box: two (or more) simulated Kubernetes nodes on one kernel.
//!
//! - a node = a network namespace with a bridge (the pod network) and an
//!   underlay veth to the other nodes, its own `ferry-agent` running inside it
//!   in a cgroup of its own;
//! - a pod = a network namespace with `eth0` on its node's bridge, and a cgroup
//!   v2 dir laid out like a kubelet's (`<node>/kubepods/pod<uid>`);
//! - services exist only as VIPs in the mesh config (no kube-proxy).
//!
//! Every name carries the box id, so boxes run in parallel; addresses live only
//! inside the box's namespaces (no route leaves the machine). A state file in
//! /run/ferry-box/ lets `down` remove everything, also after a crash.
//!
//! This crate is the harness, the sample workload (`ferry-workload`) and the
//! box CLI (`ferry-box box ...`); the benchmarks and the demo that drive it
//! are `ferry-bench` (benches/).

pub use query::{eventually, require_root, sample_value};
pub mod cni;
pub mod manifests;
pub mod proto;
mod query;
mod render;
pub mod sys;

use std::{
    fs,
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

pub const STATE_DIR: &str = "/run/ferry-box";
pub const PIN_ROOT: &str = "/sys/fs/bpf/ferry";
/// ferry-control's gRPC address: node1's pod-network address (reachable from node2 over the underlay).
pub const CONTROL_ADDR: &str = "10.1.1.1:15012";
/// ferry-control's admin endpoint, inside node1's netns.
pub const CONTROL_ADMIN: &str = "127.0.0.1:15014";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PodSpec {
    pub name: String,
    pub node: usize,
    pub enrolled: bool,
    /// Ports the sample server listens on (none: no server).
    pub serve: Vec<u16>,
    #[serde(default)]
    pub labels: Vec<(String, String)>,
    /// More annotations (`enrolled` adds ferry.dev/mesh: enabled).
    #[serde(default)]
    pub annotations: Vec<(String, String)>,
    /// Default: the pod's name.
    #[serde(default)]
    pub service_account: Option<String>,
}

impl PodSpec {
    pub fn service_account(&self) -> String {
        self.service_account.clone().unwrap_or_else(|| self.name.clone())
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServiceSpec {
    pub name: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub target_port: u16,
    /// Pod names backing it.
    pub endpoints: Vec<String>,
    /// Defined in `cluster_yaml` with a selector (ferry-control derives the
    /// endpoints): the box writes no Service or EndpointSlice for it.
    #[serde(default)]
    pub from_manifest: bool,
}

fn yes() -> bool {
    true
}
fn day() -> u64 {
    86400
}

/// How the box lays pod cgroups out, as the kubelet's cgroup drivers do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CgroupLayout {
    /// `kubepods/pod<uid>`, processes in it (a Guaranteed pod, cgroupfs).
    #[default]
    Flat,
    /// cgroupfs driver: `kubepods/besteffort/pod<uid>/<container id>`.
    Cgroupfs,
    /// systemd driver: `kubepods.slice/kubepods-besteffort.slice/
    /// kubepods-besteffort-pod<uid with _>.slice/cri-containerd-<id>.scope`.
    Systemd,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Spec {
    pub nodes: usize,
    pub pods: Vec<PodSpec>,
    pub services: Vec<ServiceSpec>,
    pub splice: bool,
    /// Run ferry-control (the CA) and tunnel between nodes with mTLS (HBONE).
    #[serde(default = "yes")]
    pub mtls: bool,
    /// Workload certificate lifetime requested by the agents.
    #[serde(default = "day")]
    pub cert_ttl_seconds: u64,
    #[serde(default)]
    pub access_log: ferry_model::access_log::AccessLog,
    #[serde(default)]
    pub peer_authentications: Vec<ferry_model::peer_auth::PeerAuthentication>,
    /// Istio per-connection metrics (off only to measure their cost).
    #[serde(default = "yes")]
    pub metrics: bool,
    /// Agents take workloads, services and policies from ferry-control's
    /// stream (it reads the box's cluster YAML) instead of per-node files.
    #[serde(default)]
    pub discovery: bool,
    /// More cluster YAML (file name, text): routes, policies, anything.
    #[serde(default)]
    pub cluster_yaml: Vec<(String, String)>,
    /// Labels of the `default` namespace (e.g. istio.io/dataplane-mode: ambient).
    #[serde(default)]
    pub namespace_labels: Vec<(String, String)>,
    /// Pod name -> its `ferry-workload` arguments (a container's `args` in
    /// the YAML), `$(VAR)` expanded from the services' `<NAME>_SERVICE_HOST`
    /// and `_PORT` variables as the kubelet does (`BoxState::workload_args`).
    /// A pod not listed runs `serve --name POD --port P` for each port in
    /// its `serve`.
    #[serde(default)]
    pub pod_args: Vec<(String, Vec<String>)>,
    /// How pod cgroups are laid out under the node's kubepods root
    /// ([`CgroupLayout`]); the agent must find them either way.
    #[serde(default)]
    pub cgroup_layout: CgroupLayout,
    /// Run `ferry-cni` for every pod as a container runtime would (ADD after
    /// the pod's netns and veth exist, before its application starts), with
    /// each agent serving it (`--cni-socket`). Off: applications start once
    /// the agents have applied their first config (the old way).
    #[serde(default = "yes")]
    pub cni: bool,
    /// Pods deleted from the cluster ([`ClusterBox::remove_pod`]): kept in
    /// `pods` so every other pod keeps its address, left out of the configs
    /// and the cluster YAML.
    #[serde(default)]
    pub departed: Vec<String>,
    /// Pods scheduled whose address the cluster does not have yet, as on a
    /// real node until the kubelet reports `status.podIP` (after the
    /// sandbox's CNI ADD): in the cluster YAML without `podIP` and in no
    /// EndpointSlice; in a file config, pending pods of their node
    /// ([`ClusterBox::add_pod_unaddressed`], [`ClusterBox::report_pod_ip`]).
    #[serde(default)]
    pub unaddressed: Vec<String>,
    /// [`ClusterBox::add_pod`] adds a pod as a real node does: the cluster
    /// has no address for it while its CNI ADD runs, and gets it only once
    /// ADD has succeeded (needs `cni`).
    #[serde(default)]
    pub report_ip_after_add: bool,
}

impl Spec {
    /// The demo topology: a client on each node, an echo service with one
    /// endpoint per node, and a pod that is not in the mesh.
    pub fn demo() -> Self {
        let pod = |name: &str, node, enrolled, serve: &[u16]| PodSpec {
            name: name.into(),
            node,
            enrolled,
            serve: serve.to_vec(),
            labels: vec![(
                "app".into(),
                name.trim_end_matches(char::is_numeric).trim_end_matches('-').into(),
            )],
            annotations: Vec::new(),
            service_account: None,
        };
        Spec {
            nodes: 2,
            pods: vec![
                pod("client", 0, true, &[]),
                pod("echo-1", 0, true, &[8080]),
                pod("echo-2", 1, true, &[8080]),
                pod("outsider", 1, false, &[8080]),
            ],
            services: vec![ServiceSpec {
                name: "echo".into(),
                vip: Ipv4Addr::new(10, 96, 0, 10),
                port: 80,
                target_port: 8080,
                endpoints: vec!["echo-1".into(), "echo-2".into()],
                from_manifest: false,
            }],
            splice: false,
            mtls: true,
            cert_ttl_seconds: day(),
            access_log: Default::default(),
            peer_authentications: Vec::new(),
            metrics: true,
            discovery: false,
            cluster_yaml: Vec::new(),
            namespace_labels: Vec::new(),
            pod_args: Vec::new(),
            cgroup_layout: CgroupLayout::Flat,
            cni: true,
            departed: Vec::new(),
            unaddressed: Vec::new(),
            report_ip_after_add: false,
        }
    }
}

/// Everything a box created, persisted so `down` works from another process.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BoxState {
    pub id: String,
    pub spec: Spec,
    pub dir: PathBuf,
    pub cgroup: PathBuf,
    pub bin_dir: PathBuf,
    pub agent_pids: Vec<u32>,
    pub server_pids: Vec<u32>,
    #[serde(default)]
    pub control_pid: u32,
    /// Agents replaced by a hand-over (`ClusterBox::upgrade_agent`), still
    /// draining or gone: `down` kills them too.
    #[serde(default)]
    pub retired_agent_pids: Vec<u32>,
}

pub struct ClusterBox {
    pub state: BoxState,
    agents: Vec<Option<Child>>,
    servers: Vec<Child>,
    control: Option<Child>,
    /// Remove everything on drop (tests); `box up` keeps it.
    pub teardown_on_drop: bool,
}

impl BoxState {
    pub fn node_name(&self, i: usize) -> String {
        format!("{}-node{}", self.id, i + 1)
    }
    pub fn node_netns(&self, i: usize) -> String {
        self.node_name(i)
    }
    pub fn pod_netns(&self, pod: &str) -> String {
        format!("{}-{pod}", self.id)
    }
    pub fn pod_index(&self, pod: &str) -> Result<usize> {
        self.spec
            .pods
            .iter()
            .position(|p| p.name == pod)
            .with_context(|| format!("no pod named {pod} in box {}", self.id))
    }
    pub fn pod_ip(&self, pod: &str) -> Result<Ipv4Addr> {
        let i = self.pod_index(pod)?;
        let p = &self.spec.pods[i];
        Ok(Ipv4Addr::new(10, 1, p.node as u8 + 1, i as u8 + 10))
    }
    pub fn pod_uid(&self, pod: &str) -> String {
        format!("{}-{pod}-uid", self.id)
    }
    /// The pod's cgroup (what the agent looks for and attaches to).
    pub fn pod_cgroup(&self, pod: &str) -> Result<PathBuf> {
        let p = &self.spec.pods[self.pod_index(pod)?];
        let uid = self.pod_uid(pod);
        let root = self.kubepods(p.node);
        Ok(match self.spec.cgroup_layout {
            CgroupLayout::Flat => root.join(format!("pod{uid}")),
            CgroupLayout::Cgroupfs => root.join("besteffort").join(format!("pod{uid}")),
            CgroupLayout::Systemd => root
                .join("kubepods-besteffort.slice")
                .join(format!("kubepods-besteffort-pod{}.slice", uid.replace('-', "_"))),
        })
    }
    /// Where the pod's processes run: the pod cgroup itself (flat), or its
    /// container's cgroup below it, as a kubelet and its runtime lay it out.
    pub fn pod_procs_cgroup(&self, pod: &str) -> Result<PathBuf> {
        let cg = self.pod_cgroup(pod)?;
        Ok(match self.spec.cgroup_layout {
            CgroupLayout::Flat => cg,
            CgroupLayout::Cgroupfs => cg.join(format!("{:x}", self.pod_index(pod)? + 0xc0)),
            CgroupLayout::Systemd => cg.join(format!("cri-containerd-{:x}.scope", self.pod_index(pod)? + 0xc0)),
        })
    }
    /// The kubelet's pod cgroup root on `node` (the agent's `cgroupRoot`).
    pub fn kubepods(&self, node: usize) -> PathBuf {
        let name = match self.spec.cgroup_layout {
            CgroupLayout::Systemd => "kubepods.slice",
            CgroupLayout::Flat | CgroupLayout::Cgroupfs => "kubepods",
        };
        self.cgroup.join(format!("node{}", node + 1)).join(name)
    }
    pub fn agent_cgroup(&self, node: usize) -> PathBuf {
        self.cgroup.join(format!("node{}", node + 1)).join("ferry-agent")
    }
    pub fn config_path(&self, node: usize) -> PathBuf {
        self.dir.join(format!("node{}.yaml", node + 1))
    }
    pub fn agent_log(&self, node: usize) -> PathBuf {
        self.dir.join(format!("agent-node{}.log", node + 1))
    }
    pub fn ca_dir(&self) -> PathBuf {
        self.dir.join("ca")
    }
    pub fn token_path(&self, node: usize) -> PathBuf {
        self.dir.join(format!("token-node{}", node + 1))
    }
    /// Where a node's agent offers its listeners to a successor.
    pub fn handover_socket(&self, node: usize) -> PathBuf {
        self.dir.join(format!("handover-node{}.sock", node + 1))
    }
    /// Where a node's agent serves ferry-cni.
    pub fn cni_socket(&self, node: usize) -> PathBuf {
        self.dir.join(format!("cni-node{}.sock", node + 1))
    }
    /// The pod's sandbox id, as a runtime's `CNI_CONTAINERID`.
    pub fn sandbox_id(&self, pod: &str) -> String {
        format!("{}-{pod}-sandbox", self.id)
    }
    pub fn pin_dir(&self, node: usize) -> PathBuf {
        Path::new(PIN_ROOT).join(self.node_name(node))
    }
    /// Where the output of a pod added by [`ClusterBox::add_pod`] goes.
    pub fn app_log(&self, pod: &str) -> PathBuf {
        self.dir.join(format!("app-{pod}.log"))
    }
    /// `ip` lines giving `pod` its network: a veth from its node's bridge
    /// (the host side named [`BoxState::host_veth`]) to `eth0` in its
    /// netns, its address and default route.
    fn pod_network(&self, pod: &str) -> Result<Vec<String>> {
        let i = self.pod_index(pod)?;
        let p = &self.spec.pods[i];
        let (node, ns) = (self.node_netns(p.node), self.pod_netns(pod));
        let veth = self.host_veth(i);
        Ok(vec![
            format!("-n {node} link add {veth} type veth peer name eth0 netns {ns}"),
            format!("-n {node} link set {veth} master br0 up"),
            format!("-n {ns} link set lo up"),
            format!("-n {ns} addr add {}/24 dev eth0", self.pod_ip(pod)?),
            format!("-n {ns} link set eth0 up"),
            format!("-n {ns} route add default via 10.1.{}.1", p.node + 1),
        ])
    }
    fn save(&self) -> Result<()> {
        fs::write(
            Path::new(STATE_DIR).join(format!("{}.json", self.id)),
            serde_json::to_vec_pretty(self)?,
        )?;
        Ok(())
    }

    pub fn load(id: &str) -> Result<Self> {
        let p = Path::new(STATE_DIR).join(format!("{id}.json"));
        let s = fs::read(&p).with_context(|| format!("no box {id} ({} missing)", p.display()))?;
        Ok(serde_json::from_slice(&s)?)
    }

    /// Ids of every box whose state file exists.
    pub fn list() -> Vec<String> {
        let Ok(rd) = fs::read_dir(STATE_DIR) else { return vec![] };
        rd.flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".json").map(str::to_owned))
            .collect()
    }

    /// A command that will run as `pod` (its cgroup and netns).
    pub fn pod_command(&self, pod: &str, program: &str, args: &[&str]) -> Result<Command> {
        let cg = self.pod_procs_cgroup(pod)?.join("cgroup.procs");
        let ns = fs::File::open(format!("/run/netns/{}", self.pod_netns(pod)))?;
        Ok(command_in(program, args, Some(cg), ns))
    }

    /// A command in a node's netns (the agent's side: admin endpoint, ferryctl).
    pub fn node_command(&self, node: usize, program: &str, args: &[&str]) -> Result<Command> {
        let ns = fs::File::open(format!("/run/netns/{}", self.node_netns(node)))?;
        let mut c = command_in(program, args, None, ns);
        c.env("FERRY_NODE", self.node_name(node));
        Ok(c)
    }

    pub fn bin(&self, name: &str) -> String {
        self.bin_dir.join(name).display().to_string()
    }

    /// The variables the kubelet gives every container for each service
    /// (`DETAILS_SERVICE_HOST=10.96.0.21`, `DETAILS_SERVICE_PORT=9080`).
    pub fn service_env(&self) -> Vec<(String, String)> {
        self.spec
            .services
            .iter()
            .flat_map(|s| {
                let n = s.name.to_ascii_uppercase().replace('-', "_");
                [
                    (format!("{n}_SERVICE_HOST"), s.vip.to_string()),
                    (format!("{n}_SERVICE_PORT"), s.port.to_string()),
                ]
            })
            .collect()
    }

    /// Each `ferry-workload` command line `pod` runs: its `args` with
    /// `$(VAR)` expanded (unknown references kept, as the kubelet does), or
    /// the TCP protocol's `serve` on each served port.
    pub fn workload_args(&self, pod: &str) -> Result<Vec<Vec<String>>> {
        let p = &self.spec.pods[self.pod_index(pod)?];
        let Some((_, args)) = self.spec.pod_args.iter().find(|(n, _)| *n == p.name) else {
            return Ok(p
                .serve
                .iter()
                .map(|port| {
                    ["serve", "--name", &p.name, "--port", &port.to_string()]
                        .map(str::to_owned)
                        .to_vec()
                })
                .collect());
        };
        let env = self.service_env();
        let expand = |a: &String| env.iter().fold(a.clone(), |a, (k, v)| a.replace(&format!("$({k})"), v));
        Ok(vec![args.iter().map(expand).collect()])
    }
}

pub fn output_ok(out: Output, what: &str) -> Result<String> {
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn command_in(program: &str, args: &[&str], cgroup_procs: Option<PathBuf>, ns: fs::File) -> Command {
    let mut c = Command::new(program);
    c.args(args);
    // SAFETY: between fork and exec we only write our pid to a cgroup file and
    // call setns, both async-signal-safe syscalls on fds/paths prepared before.
    unsafe {
        c.pre_exec(move || {
            if let Some(p) = &cgroup_procs {
                fs::write(p, std::process::id().to_string())?;
            }
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c
}

/// Directory of the built binaries (ferry-agent, ferryctl, ferry-workload).
pub fn default_bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("FERRY_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().unwrap_or(Path::new("."));
    if dir.ends_with("deps") {
        dir.parent().unwrap_or(dir).to_owned()
    } else {
        dir.to_owned()
    }
}

impl ClusterBox {
    /// Creates the box and starts agents and sample servers. On any failure,
    /// what was created is removed.
    pub fn up(spec: Spec, bin_dir: PathBuf) -> Result<Self> {
        let cni = spec.cni.then_some("ferry-cni");
        for b in ["ferry-agent", "ferry-workload"].into_iter().chain(cni) {
            if !bin_dir.join(b).exists() {
                bail!(
                    "{} not found in {} (run `cargo build --bins` first)",
                    b,
                    bin_dir.display()
                );
            }
        }
        sys::ensure_bpffs()?;
        fs::create_dir_all(STATE_DIR)?;
        let id = format!("fb{:06x}", sys::rand_u32() & 0xff_ffff);
        let state = BoxState {
            dir: Path::new(STATE_DIR).join(&id),
            cgroup: sys::cgroup2_root()?.join(format!("ferry-box-{id}")),
            id,
            spec,
            bin_dir,
            agent_pids: vec![],
            retired_agent_pids: vec![],
            control_pid: 0,
            server_pids: vec![],
        };
        fs::create_dir_all(&state.dir)?;
        state.save()?;
        let mut b = ClusterBox {
            state,
            agents: vec![],
            servers: vec![],
            control: None,
            teardown_on_drop: true,
        };
        if let Err(e) = b.build() {
            let _ = down(&b.state.id);
            b.teardown_on_drop = false;
            return Err(e);
        }
        Ok(b)
    }

    fn build(&mut self) -> Result<()> {
        let s = &self.state;
        let mut ip = Vec::new();
        for n in 0..s.spec.nodes {
            ip.push(format!("netns add {}", s.node_netns(n)));
        }
        for p in &s.spec.pods {
            ip.push(format!("netns add {}", s.pod_netns(&p.name)));
        }
        sys::ip_batch(&ip)?;
        let mut ip = Vec::new();
        for n in 0..s.spec.nodes {
            let ns = s.node_netns(n);
            ip.push(format!("-n {ns} link set lo up"));
            // A fixed address (locally administered, one per node): a bridge
            // without one takes the lowest of its ports' addresses, so it
            // changed whenever a pod's veth joined later, while the pods'
            // neighbour caches still held the old one for the gateway:
            // their packets then went to another port and were lost for up
            // to ~30 s (seen as a tunnel connection stalling right after a
            // pod was added to its node).
            ip.push(format!(
                "-n {ns} link add br0 address 02:fe:00:00:00:{:02x} type bridge",
                n + 1
            ));
            ip.push(format!("-n {ns} addr add 10.1.{}.1/24 dev br0", n + 1));
            ip.push(format!("-n {ns} link set br0 up"));
        }
        // Underlay: node i <-> node j by a veth pair (a full mesh; 2 nodes = 1 link).
        for i in 0..s.spec.nodes {
            for j in i + 1..s.spec.nodes {
                let (a, b) = (s.node_netns(i), s.node_netns(j));
                let net = format!("10.200.{}", i * 16 + j);
                ip.push(format!("-n {a} link add u{j} type veth peer name u{i} netns {b}"));
                ip.push(format!("-n {a} addr add {net}.1/24 dev u{j}"));
                ip.push(format!("-n {b} addr add {net}.2/24 dev u{i}"));
                ip.push(format!("-n {a} link set u{j} up"));
                ip.push(format!("-n {b} link set u{i} up"));
                ip.push(format!("-n {a} route add 10.1.{}.0/24 via {net}.2", j + 1));
                ip.push(format!("-n {b} route add 10.1.{}.0/24 via {net}.1", i + 1));
            }
        }
        for p in &s.spec.pods {
            ip.extend(s.pod_network(&p.name)?);
        }
        sys::ip_batch(&ip)?;
        for n in 0..s.spec.nodes {
            s.node_command(n, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?
                .status()?;
        }
        for p in &s.spec.pods {
            fs::create_dir_all(s.pod_procs_cgroup(&p.name)?)?;
        }
        for n in 0..s.spec.nodes {
            fs::create_dir_all(s.agent_cgroup(n))?;
        }
        anyhow::ensure!(
            s.spec.mtls || !s.spec.discovery,
            "discovery needs ferry-control, which the box runs with mtls"
        );
        s.write_configs()?;
        // Every pod has a process from the start, as Kubernetes' pause
        // container: agents find a pod's netns from its cgroup's processes.
        let s = self.state.clone();
        for p in &s.spec.pods {
            let child = s
                .pod_command(&p.name, "sleep", &["infinity"])?
                .stdin(Stdio::null())
                .spawn()?;
            self.state.server_pids.push(child.id());
            self.servers.push(child);
        }
        if s.spec.mtls {
            self.start_control()?;
        }
        let s = &self.state;
        for n in 0..s.spec.nodes {
            self.start_agent(n)?;
        }
        self.state.wait_applied(1)?;
        let s = self.state.clone();
        for p in &s.spec.pods {
            // As a runtime: the sandbox's network is up, the chained plugin
            // returns only once the agent has captured (or passed) the pod,
            // and only then does the application start.
            if s.spec.cni {
                s.cni(&p.name, "ADD", serde_json::Value::Null)?.check()?;
            }
            self.start_apps(&p.name, None)?;
        }
        // Servers are ready once their port accepts (checked from the node).
        for p in &s.spec.pods {
            for port in &p.serve {
                self.wait_port(p.node, SocketAddrV4::new(s.pod_ip(&p.name)?, *port))?;
            }
        }
        self.state.save()
    }

    /// Starts `pod`'s applications (`BoxState::workload_args`); their output
    /// goes to `log` (appended), or nowhere.
    pub fn start_apps(&mut self, pod: &str, log: Option<&Path>) -> Result<()> {
        let s = self.state.clone();
        for args in s.workload_args(pod)? {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = |l: Option<&Path>| -> Result<Stdio> {
                Ok(match l {
                    Some(p) => fs::OpenOptions::new().create(true).append(true).open(p)?.into(),
                    None => Stdio::null(),
                })
            };
            let child = s
                .pod_command(pod, &s.bin("ferry-workload"), &args)?
                .envs(s.service_env())
                .stdin(Stdio::null())
                .stdout(out(log)?)
                .stderr(out(log)?)
                .spawn()?;
            self.state.server_pids.push(child.id());
            self.servers.push(child);
        }
        self.state.save()
    }

    /// Fails unless `name` is a new pod in the box.
    fn ensure_new_pod(&self, name: &str) -> Result<()> {
        anyhow::ensure!(
            self.state.pod_index(name).is_err(),
            "pod {name} already in box {}",
            self.state.id
        );
        Ok(())
    }

    /// Adds a pod to the running box the way a kubelet and its runtime
    /// would: the pod's netns, veth and cgroup (with a pause process), then
    /// the runtime's CNI ADD, started *before* the cluster knows the pod
    /// (the configs, or ferry-control's YAML, are written while it waits:
    /// the agent hears of the pod shortly, as from a real control plane),
    /// and only once ADD has returned, the pod's applications
    /// (`Spec::pod_args`, or servers on `serve`), their output appended to
    /// [`BoxState::app_log`]. Returns the ADD's run (None without `cni`:
    /// then the agents' applying the new config is waited for instead).
    /// Fails if ADD fails. With `Spec::report_ip_after_add`, the pod's
    /// address reaches the cluster only after ADD
    /// ([`ClusterBox::add_pod_unaddressed`], then [`ClusterBox::report_pod_ip`]).
    pub fn add_pod(&mut self, pod: PodSpec) -> Result<Option<cni::CniRun>> {
        self.ensure_new_pod(&pod.name)?;
        let name = pod.name.clone();
        if self.state.spec.cni && self.state.spec.report_ip_after_add {
            let run = self.add_pod_unaddressed(pod)?.check()?;
            self.report_pod_ip(&name)?;
            return Ok(Some(run));
        }
        let versions: Vec<u64> = if self.state.spec.cni || self.state.spec.discovery {
            Vec::new()
        } else {
            (0..self.state.spec.nodes)
                .map(|n| self.state.config_version(n))
                .collect::<Result<_>>()?
        };
        let control_before = match (self.state.spec.cni, self.state.spec.discovery) {
            (false, true) => Some(self.state.control_version()?),
            _ => None,
        };
        self.create_sandbox(pod)?;
        let s = self.state.clone();
        let add = match s.spec.cni {
            true => Some(s.cni_spawn(&name, "ADD", None, serde_json::Value::Null)?),
            false => None,
        };
        s.write_configs()?;
        let run = add.map(|a| a.wait()).transpose()?.map(cni::CniRun::check).transpose()?;
        if let Some(before) = control_before {
            s.wait_synced(before + 1)?;
        } else if let Some(min) = versions.iter().min() {
            s.wait_applied(min + 1)?;
        }
        self.start_apps(&name, Some(&s.app_log(&name)))?;
        let p = &s.spec.pods[s.pod_index(&name)?];
        for port in &p.serve {
            self.wait_port(p.node, SocketAddrV4::new(s.pod_ip(&name)?, *port))?;
        }
        Ok(run)
    }

    /// Adds a pod the way a real node does (issue 16): the cluster has the
    /// pod scheduled with **no address** (no `status.podIP`, in no
    /// EndpointSlice: the kubelet reports the address only once the sandbox
    /// is up) while the runtime's CNI ADD runs, the address the pod's
    /// network already has being only in ADD's `prevResult`. The ADD is
    /// started before the cluster knows the pod at all, as in
    /// [`ClusterBox::add_pod`]. Once ADD has succeeded the pod's
    /// applications start (their output in [`BoxState::app_log`]), still
    /// without an address in the cluster: [`ClusterBox::report_pod_ip`]
    /// gives it. Returns the ADD's run, whatever its outcome (a failed ADD
    /// starts nothing). Needs `cni`.
    pub fn add_pod_unaddressed(&mut self, pod: PodSpec) -> Result<cni::CniRun> {
        anyhow::ensure!(self.state.spec.cni, "a pod is added as a node does only with `cni`");
        self.ensure_new_pod(&pod.name)?;
        let name = pod.name.clone();
        self.state.spec.unaddressed.push(name.clone());
        self.create_sandbox(pod)?;
        let s = self.state.clone();
        let add = s.cni_spawn(&name, "ADD", None, serde_json::Value::Null)?;
        s.write_configs()?;
        let run = add.wait()?;
        if run.ok() {
            self.start_apps(&name, Some(&s.app_log(&name)))?;
        }
        Ok(run)
    }

    /// The kubelet reports a pod's address (added by
    /// [`ClusterBox::add_pod_unaddressed`]): it is written into the cluster
    /// (its `podIP`, its Services' EndpointSlices) and the agents' having
    /// applied it is waited for.
    pub fn report_pod_ip(&mut self, name: &str) -> Result<()> {
        anyhow::ensure!(
            self.state.spec.unaddressed.iter().any(|n| n == name),
            "pod {name} has its address already"
        );
        let versions: Vec<u64> = if self.state.spec.discovery {
            Vec::new()
        } else {
            (0..self.state.spec.nodes)
                .map(|n| self.state.config_version(n))
                .collect::<Result<_>>()?
        };
        let control_before = match self.state.spec.discovery {
            true => Some(self.state.control_version()?),
            false => None,
        };
        self.state.spec.unaddressed.retain(|n| n != name);
        self.state.save()?;
        self.state.write_configs()?;
        if let Some(before) = control_before {
            self.state.wait_synced(before + 1)
        } else {
            self.state.wait_applied(versions.iter().min().copied().unwrap_or(0) + 1)
        }
    }

    /// The first half of [`ClusterBox::add_pod`]: `pod` in the spec (the
    /// configs not rewritten yet), its netns, veth, cgroup and pause
    /// process. Nothing of it runs an application yet.
    pub fn create_sandbox(&mut self, pod: PodSpec) -> Result<()> {
        let name = pod.name.clone();
        self.state.spec.pods.push(pod);
        self.state.save()?;
        let s = self.state.clone();
        sys::ip_batch(&[format!("netns add {}", s.pod_netns(&name))])?;
        sys::ip_batch(&s.pod_network(&name)?)?;
        fs::create_dir_all(s.pod_procs_cgroup(&name)?)?;
        let pause = s
            .pod_command(&name, "sleep", &["infinity"])?
            .stdin(Stdio::null())
            .spawn()?;
        self.state.server_pids.push(pause.id());
        self.servers.push(pause);
        self.state.save()
    }

    /// Deletes a pod the way a kubelet and its runtime would: its processes
    /// stopped, the runtime's CNI DEL (with `cni`; best effort, so it
    /// passes with the agent down), its netns (and veth) removed, then the
    /// pod gone from the cluster (configs rewritten, not waited for).
    /// Returns the DEL's run.
    pub fn remove_pod(&mut self, name: &str) -> Result<Option<cni::CniRun>> {
        let s = self.state.clone();
        sys::remove_cgroup_tree(&s.pod_cgroup(name)?);
        for c in &mut self.servers {
            let _ = c.try_wait();
        }
        let del = match s.spec.cni {
            true => Some(s.cni(name, "DEL", serde_json::Value::Null)?),
            false => None,
        };
        sys::run("ip", &["netns", "del", &s.pod_netns(name)])?;
        self.state.spec.departed.push(name.to_owned());
        self.state.save()?;
        self.state.write_configs()?;
        Ok(del)
    }

    fn wait_port(&self, node: usize, addr: SocketAddrV4) -> Result<()> {
        let ns = fs::File::open(format!("/run/netns/{}", self.state.node_netns(node)))?;
        std::thread::spawn(move || -> Result<()> {
            // SAFETY: setns on this short-lived thread only.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns failed");
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while TcpStream::connect_timeout(&addr.into(), Duration::from_millis(200)).is_err() {
                if Instant::now() > deadline {
                    bail!("server {addr} did not start");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("wait thread panicked"))?
    }

    /// Starts the CA (ferry-control) in node1's netns on CONTROL_ADDR, with a
    /// bootstrap token per node.
    pub fn start_control(&mut self) -> Result<()> {
        let s = &self.state;
        let mut tokens = String::new();
        for n in 0..s.spec.nodes {
            let t = format!("{:08x}{:08x}", sys::rand_u32(), sys::rand_u32());
            tokens.push_str(&format!("{}: {t}\n", s.node_name(n)));
            fs::write(s.token_path(n), &t)?;
        }
        fs::create_dir_all(s.ca_dir())?;
        fs::write(s.ca_dir().join("tokens.yaml"), tokens)?;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(s.dir.join("control.log"))?;
        let child = s
            .node_command(
                0,
                &s.bin("ferry-control"),
                &[
                    "--ca-dir",
                    &s.ca_dir().display().to_string(),
                    "--cluster-dir",
                    &s.cluster_dir().display().to_string(),
                    "--admin",
                    CONTROL_ADMIN,
                    "--tokens",
                    &s.ca_dir().join("tokens.yaml").display().to_string(),
                    "--listen",
                    CONTROL_ADDR,
                ],
            )?
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.state.control_pid = child.id();
        self.control = Some(child);
        self.state.save()?;
        self.wait_port(0, CONTROL_ADDR.parse()?)
    }

    /// Stops the CA (agents keep their certificates).
    pub fn stop_control(&mut self) {
        if let Some(mut c) = self.control.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts (or restarts) the agent of `node`.
    pub fn start_agent(&mut self, node: usize) -> Result<()> {
        let child = self.spawn_agent(node, &[])?;
        let pid = child.id();
        while self.agents.len() <= node {
            self.agents.push(None);
            self.state.agent_pids.push(0);
        }
        self.agents[node] = Some(child);
        self.state.agent_pids[node] = pid;
        self.state.save()
    }

    /// A hitless upgrade of `node`'s agent: starts a second agent with
    /// `--takeover` (and `--drain-timeout drain`) and waits (20 s at most)
    /// until it has taken the listeners over. Returns the old agent, which
    /// is now draining and exits by itself; the new one is the node's agent.
    pub fn upgrade_agent(&mut self, node: usize, drain: Duration) -> Result<Child> {
        self.upgrade_agent_with(node, drain, &[])
    }

    /// [`Self::upgrade_agent`], the new agent started with `extra` arguments too.
    pub fn upgrade_agent_with(&mut self, node: usize, drain: Duration, extra: &[&str]) -> Result<Child> {
        let done = |b: &Self| b.agent_log(node).matches("took over from the previous agent").count();
        let before = done(self);
        let drain = drain.as_secs().to_string();
        let mut args = vec!["--takeover", "--drain-timeout", &drain];
        args.extend_from_slice(extra);
        let mut child = self.spawn_agent(node, &args)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while done(self) == before {
            if let Some(st) = child.try_wait()? {
                bail!("the new agent of node {} exited ({st}) before taking over", node + 1);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the new agent of node {} did not take over within 20 s", node + 1);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let old = self
            .agents
            .get_mut(node)
            .and_then(Option::take)
            .context("no agent to upgrade")?;
        self.state.retired_agent_pids.push(old.id());
        self.state.agent_pids[node] = child.id();
        self.agents[node] = Some(child);
        self.state.save()?;
        Ok(old)
    }

    /// The agent process of `node`, with `extra` arguments.
    fn spawn_agent(&self, node: usize, extra: &[&str]) -> Result<Child> {
        let s = &self.state;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(s.agent_log(node))?;
        let procs = s.agent_cgroup(node).join("cgroup.procs");
        let ns = fs::File::open(format!("/run/netns/{}", s.node_netns(node)))?;
        let mut cmd = command_in(
            &s.bin("ferry-agent"),
            &[
                "--config",
                s.config_path(node).to_str().unwrap(),
                "--node",
                &s.node_name(node),
                "--pin-root",
                PIN_ROOT,
                "--log-json",
                "--handover-socket",
                &s.handover_socket(node).display().to_string(),
            ],
            Some(procs),
            ns,
        );
        cmd.args(extra);
        if s.spec.cni {
            cmd.args(["--cni-socket", &s.cni_socket(node).display().to_string()]);
        }
        if s.spec.mtls {
            cmd.args([
                "--control",
                &format!("https://{CONTROL_ADDR}"),
                "--control-ca",
                &s.ca_dir().join("ca.cert.pem").display().to_string(),
                "--token-file",
                &s.token_path(node).display().to_string(),
                "--cert-ttl-seconds",
                &s.spec.cert_ttl_seconds.to_string(),
            ]);
            if s.spec.discovery {
                let state = s.dir.join(format!("discovery-node{}.pb", node + 1));
                cmd.args(["--config-stream", "--state-file", &state.display().to_string()]);
            }
        } else {
            // No CA in this box: the agent runs a tunnel only when told to.
            cmd.arg("--insecure-plaintext-tunnel");
        }
        cmd.env(
            "FERRY_LOG",
            std::env::var("FERRY_LOG").unwrap_or_else(|_| "info,ferry::ebpf=debug".into()),
        );
        Ok(cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log).spawn()?)
    }

    /// Stops a node's agent with SIGTERM (graceful: pins stay).
    pub fn stop_agent(&mut self, node: usize) -> Result<()> {
        if let Some(mut c) = self.agents.get_mut(node).and_then(Option::take) {
            // SAFETY: signalling our own child process.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// Kills a node's agent with SIGKILL (a crash: nothing cleaned up, pins
    /// stay) and waits until it is gone.
    pub fn kill_agent(&mut self, node: usize) -> Result<()> {
        if let Some(mut c) = self.agents.get_mut(node).and_then(Option::take) {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// Changes the spec (e.g. enrollment) and waits for every agent to apply it.
    pub fn update(&mut self, f: impl FnOnce(&mut Spec)) -> Result<()> {
        if self.state.spec.discovery {
            let before = self.state.control_version()?;
            f(&mut self.state.spec);
            self.state.save()?;
            self.state.write_configs()?;
            return self.state.wait_synced(before + 1);
        }
        let versions: Vec<u64> = (0..self.state.spec.nodes)
            .map(|n| self.state.config_version(n))
            .collect::<Result<_>>()?;
        f(&mut self.state.spec);
        self.state.save()?;
        self.state.write_configs()?;
        let min = versions.iter().min().copied().unwrap_or(0) + 1;
        self.state.wait_applied(min)
    }

    pub fn agent_log(&self, node: usize) -> String {
        fs::read_to_string(self.state.agent_log(node)).unwrap_or_default()
    }

    /// Leaves the box running after this handle is dropped.
    pub fn keep(mut self) -> BoxState {
        self.teardown_on_drop = false;
        for c in self.agents.iter_mut().flatten() {
            let _ = c.try_wait();
        }
        self.agents.clear();
        self.servers.clear();
        self.state.clone()
    }
}

impl Drop for ClusterBox {
    fn drop(&mut self) {
        if self.teardown_on_drop && std::thread::panicking() && std::env::var_os("FERRY_KEEP_FAILED").is_some() {
            eprintln!(
                "FERRY_KEEP_FAILED: leaving box {} up (`cargo xtask box down {}`)",
                self.state.id, self.state.id
            );
            return;
        }
        if self.teardown_on_drop {
            for n in 0..self.agents.len() {
                let _ = self.stop_agent(n);
            }
            for c in &mut self.servers {
                let _ = c.kill();
                let _ = c.wait();
            }
            if let Err(e) = down(&self.state.id) {
                eprintln!("box {} teardown: {e:#}", self.state.id);
            }
        }
    }
}

/// Removes every trace of box `id`: processes, namespaces, cgroups, pins, files.
pub fn down(id: &str) -> Result<()> {
    let st = BoxState::load(id).ok();
    if let Some(st) = &st {
        for pid in st
            .agent_pids
            .iter()
            .chain(&st.server_pids)
            .chain(&st.retired_agent_pids)
            .chain([&st.control_pid])
            .filter(|p| **p > 0)
        {
            // SAFETY: kill(2) on pids this box started (they are also in its cgroups).
            unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
        }
        sys::remove_cgroup_tree(&st.cgroup);
        for n in 0..st.spec.nodes {
            let _ = ferry_ebpf::remove_node_pins(&st.pin_dir(n));
        }
        let _ = fs::remove_dir_all(&st.dir);
    }
    // Namespaces by prefix, so a crash before the state file was complete is covered.
    if let Ok(list) = sys::run("ip", &["netns", "list"]) {
        for ns in list
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n.starts_with(&format!("{id}-")))
        {
            let _ = sys::run("ip", &["netns", "del", ns]);
        }
    }
    if let Ok(root) = sys::cgroup2_root() {
        sys::remove_cgroup_tree(&root.join(format!("ferry-box-{id}")));
    }
    if let Ok(rd) = fs::read_dir(PIN_ROOT) {
        for e in rd
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&format!("{id}-")))
        {
            let _ = fs::remove_dir_all(e.path());
        }
    }
    let _ = fs::remove_file(Path::new(STATE_DIR).join(format!("{id}.json")));
    Ok(())
}
