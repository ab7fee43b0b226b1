//! ferryctl: inspect a node's pinned eBPF maps and its agent's state, and
//! analyze mesh YAML offline.
//!
//! Exit codes: 0 ok, 1 other error, 2 usage, 3 agent not reachable, 4 no Ferry
//! maps, 5 `check` found the node cannot run Ferry, 6 `analyze` found errors.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    time::Duration,
};

mod analyze;
mod dump;
mod output;

use clap::{Parser, Subcommand, ValueEnum};
use ferry_ebpf::pinned::{Pinned, PinnedError};
use output::emit;
use serde_json::Value;

#[derive(Parser)]
#[command(version, about = "Inspect Ferry's eBPF maps and agent state on a node", after_help = EXAMPLES)]
struct Args {
    /// bpffs directory holding one directory per node.
    #[arg(long, global = true, default_value = "/sys/fs/bpf/ferry")]
    pin_root: PathBuf,
    /// Node whose pins to read (default: $FERRY_NODE, else the only one present).
    #[arg(long, global = true, env = "FERRY_NODE")]
    node: Option<String>,
    /// The agent's admin endpoint.
    #[arg(long, global = true, default_value = "127.0.0.1:15000")]
    admin: SocketAddr,
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    cmd: Cmd,
}

const EXAMPLES: &str = "Examples:
  ferryctl bpf maps
  ferryctl bpf dump mesh-dst -o json
  ferryctl --node node1 bpf dump traffic
  ferryctl conns
  ferryctl analyze -f ./manifests/";

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Output {
    Table,
    Json,
    Yaml,
}

#[derive(Subcommand)]
enum Cmd {
    /// eBPF maps and programs (read from pins; works with the agent down).
    Bpf {
        #[command(subcommand)]
        op: BpfOp,
    },
    /// Local workloads and their enrollment (from the agent).
    Workloads,
    /// Services this node knows: VIPs, ports, endpoints (from the agent).
    Services,
    /// Live proxied connections (from the agent).
    Conns,
    /// The agent's connection counters.
    Stats,
    /// Workload certificates: identity, serial, expiry, time to rotation (from the agent).
    Certs,
    /// The agent's config stream from ferry-control: connected, snapshot
    /// version applied, resources held, last NACK (from the agent).
    Control,
    /// The agent's whole state (admin /config_dump), as JSON or YAML.
    ConfigDump,
    /// Shell completions: `ferryctl completions bash > /etc/bash_completion.d/ferryctl`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Check mesh YAML offline (like `istioctl analyze`): every problem with
    /// file, line, object, field and reason; exit 6 if any is an error.
    Analyze {
        /// Files or directories (searched recursively for *.yaml, *.yml).
        #[arg(short = 'f', long = "filename", required = true, num_args = 1..)]
        paths: Vec<PathBuf>,
        /// Also list notes (kinds Ferry ignores).
        #[arg(long)]
        all: bool,
    },
    /// Preflight: can this node run Ferry? (exit 5 if not)
    Check {
        /// Also check the kubelet's pod cgroup root.
        #[arg(long)]
        cgroup_root: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum BpfOp {
    /// Every pinned Ferry map: type, sizes, entries in use.
    Maps,
    /// Attached programs: where (pod or agent, hook), link and program ids, run counts.
    Progs,
    /// Decoded entries of one map (pods and traffic are joined with the
    /// agent's workload names when it is reachable).
    Dump {
        #[arg(value_enum)]
        map: DumpMap,
        /// Only rows of this pod (name or namespace/name; needs the agent for names).
        #[arg(long)]
        pod: Option<String>,
        /// Only rows mentioning this IPv4 address.
        #[arg(long)]
        ip: Option<String>,
        /// Redraw every second until interrupted.
        #[arg(long)]
        watch: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum DumpMap {
    Pods,
    MeshDst,
    OrigDst,
    Traffic,
    Stats,
    Config,
}

#[derive(Debug, thiserror::Error)]
enum CtlError {
    #[error("agent admin endpoint {0} not reachable: {1} (is ferry-agent running on this node? see --admin)")]
    AgentDown(SocketAddr, std::io::Error),
    #[error(transparent)]
    Pinned(#[from] PinnedError),
    #[error("{0}")]
    Other(String),
    #[error("{0} check(s) failed: this node cannot run Ferry as it is (see the remedy column)")]
    CheckFailed(usize),
}

impl CtlError {
    fn code(&self) -> i32 {
        match self {
            CtlError::AgentDown(..) => 3,
            CtlError::Pinned(PinnedError::NotFound(_)) => 4,
            CtlError::CheckFailed(_) => 5,
            _ => 1,
        }
    }
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("ferryctl: {e}");
        std::process::exit(e.code());
    }
}

fn node(args: &Args) -> Result<String, CtlError> {
    if let Some(n) = &args.node {
        return Ok(n.clone());
    }
    let nodes: Vec<String> = std::fs::read_dir(&args.pin_root)
        .map_err(|_| PinnedError::NotFound(args.pin_root.clone()))?
        .flatten()
        .filter(|e| e.path().join("ferry_config").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    match nodes.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(PinnedError::NotFound(args.pin_root.clone()).into()),
        many => Err(CtlError::Other(format!(
            "several nodes pinned here, pick one with --node: {}",
            many.join(", ")
        ))),
    }
}

fn pinned(args: &Args) -> Result<Pinned, CtlError> {
    Ok(Pinned::open(&args.pin_root, &node(args)?)?)
}

fn run(args: &Args) -> Result<(), CtlError> {
    match &args.cmd {
        Cmd::Analyze { paths, all } => analyze::analyze(args, paths, *all),
        Cmd::Bpf { op: BpfOp::Maps } => {
            let rows = pinned(args)?.maps()?;
            emit(
                args,
                &rows,
                &["name", "kind", "key_size", "value_size", "max_entries", "entries"],
            )
        }
        Cmd::Bpf { op: BpfOp::Progs } => emit(
            args,
            &pinned(args)?.progs()?,
            &[
                "owner",
                "hook",
                "program",
                "link_id",
                "prog_id",
                "run_count",
                "run_time_ns",
            ],
        ),
        Cmd::Bpf {
            op: BpfOp::Dump { map, pod, ip, watch },
        } => loop {
            let (rows, columns) = dump::dump(args, *map, pod.as_deref(), ip.as_deref())?;
            if *watch {
                print!("\x1b[2J\x1b[H");
            }
            emit(args, &rows, columns)?;
            if !*watch {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_secs(1));
        },
        Cmd::ConfigDump => {
            let v = admin_get(args.admin, "/config_dump")?;
            match args.output {
                Output::Yaml => print!("{}", serde_norway::to_string(&v).unwrap_or_default()),
                _ => println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default()),
            }
            Ok(())
        }
        Cmd::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(*shell, &mut Args::command(), "ferryctl", &mut std::io::stdout());
            Ok(())
        }
        Cmd::Workloads => {
            let dump = admin_get(args.admin, "/config_dump")?;
            let pods = dump["pods"].as_array().cloned().unwrap_or_default();
            emit(
                args,
                &pods,
                &[
                    "namespace",
                    "name",
                    "ip",
                    "enrolled",
                    "pod_id",
                    "netns_cookie",
                    "host_veth",
                    "error",
                ],
            )
        }
        Cmd::Conns => {
            let conns = admin_get(args.admin, "/conns")?;
            let rows = conns.as_array().cloned().unwrap_or_default();
            emit(
                args,
                &rows,
                &[
                    "id",
                    "direction",
                    "source",
                    "orig_dst",
                    "service",
                    "endpoint",
                    "hop",
                    "sent",
                    "received",
                    "age_ms",
                ],
            )
        }
        Cmd::Services => {
            let dump = admin_get(args.admin, "/config_dump")?;
            let rows: Vec<Value> = dump["services"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(|s| {
                    let ports: Vec<String> = s["ports"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|p| format!("{}->{}", p["port"], p["targetPort"]))
                        .collect();
                    let eps: Vec<String> = s["endpoints"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|e| format!("{}{}", e["ip"].as_str().unwrap_or("?"), if e["ready"] == false { " (not ready)" } else { "" }))
                        .collect();
                    serde_json::json!({"namespace": s["namespace"], "name": s["name"], "vip": s["vip"], "ports": ports.join(","), "endpoints": eps.join(",")})
                })
                .collect();
            emit(args, &rows, &["namespace", "name", "vip", "ports", "endpoints"])
        }
        Cmd::Control => {
            let dump = admin_get(args.admin, "/config_dump")?;
            match dump.get("control").filter(|c| !c.is_null()) {
                Some(c) => emit(
                    args,
                    std::slice::from_ref(c),
                    &[
                        "endpoint",
                        "connected",
                        "system_version",
                        "resources",
                        "last_nack",
                        "last_error",
                    ],
                ),
                None => {
                    println!("standalone: this agent takes its config from a file (no --discovery)");
                    Ok(())
                }
            }
        }
        Cmd::Certs => {
            let certs = admin_get(args.admin, "/certs")?;
            let rows = certs.as_array().cloned().unwrap_or_default();
            emit(
                args,
                &rows,
                &["uid", "spiffe_id", "serial", "seconds_to_expiry", "seconds_to_rotation"],
            )
        }
        Cmd::Check { cgroup_root } => {
            let rows = ferry_ebpf::preflight::run(&args.pin_root, cgroup_root.as_deref());
            emit(args, &rows, &["check", "ok", "detail", "remedy"])?;
            if rows.iter().any(|r| !r.ok) {
                return Err(CtlError::CheckFailed(rows.iter().filter(|r| !r.ok).count()));
            }
            Ok(())
        }
        Cmd::Stats => {
            let s = admin_get(args.admin, "/stats")?;
            let rows: Vec<Value> = s
                .as_object()
                .map(|o| {
                    o.iter()
                        .map(|(k, v)| serde_json::json!({"counter": k, "value": v}))
                        .collect()
                })
                .unwrap_or_default();
            emit(args, &rows, &["counter", "value"])
        }
    }
}

fn admin_get(addr: SocketAddr, path: &str) -> Result<Value, CtlError> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| CtlError::AgentDown(addr, e))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| CtlError::AgentDown(addr, e))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: ferry-admin\r\n\r\n").map_err(|e| CtlError::AgentDown(addr, e))?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).map_err(|e| CtlError::AgentDown(addr, e))?;
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .ok_or_else(|| CtlError::Other("malformed admin response".into()))?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(CtlError::Other(format!(
            "admin {path}: {}",
            head.lines().next().unwrap_or("")
        )));
    }
    serde_json::from_str(body).map_err(|e| CtlError::Other(format!("admin {path}: bad JSON: {e}")))
}
