//! ferryctl: inspect a node's pinned eBPF maps and its agent's state, and
//! analyze mesh YAML offline.
//!
//! Exit codes: 0 ok, 1 other error, 2 usage, 3 agent not reachable, 4 no Ferry
//! maps, 5 `check` found the node cannot run Ferry, 6 `analyze` found errors,
//! 7 `authz check` decided deny.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

mod admin;
mod analyze;
mod authz;
mod dump;
mod output;
mod views;

use clap::{Parser, Subcommand, ValueEnum};
use ferry_ebpf::pinned::{Pinned, PinnedError};
use output::{counters, emit, emit_rows, print_doc};
use views::ServiceRow;

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
  ferryctl endpoints --service default/reviews
  ferryctl analyze -f ./manifests/
  ferryctl authz check --from default/bookinfo-productpage --to default/details-v1 --to-labels app=details --port 9080 --method GET --path /details/0 -f policies.yaml
  ferryctl authz check --from default/sleep --to default/details-v1 --port 9080 --agent http://127.0.0.1:15000";

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
    /// Endpoint health per Service: load balancer, outlier-detection
    /// ejections, consecutive errors, requests in flight (from the agent).
    Endpoints {
        /// Only this Service (`namespace/name`).
        #[arg(long)]
        service: Option<String>,
    },
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
    /// Authorization dry runs (AuthorizationPolicy).
    Authz {
        #[command(subcommand)]
        op: AuthzOp,
    },
    /// Preflight: can this node run Ferry? (exit 5 if not)
    Check {
        /// Also check the kubelet's pod cgroup root.
        #[arg(long)]
        cgroup_root: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum AuthzOp {
    /// May a source call a workload on a port (with an HTTP request)? Names
    /// the deciding policy, rule and reason; exit 7 on deny. Offline from
    /// YAML (-f, --config) or live from the destination's agent (--agent).
    Check(Box<authz::CheckArgs>),
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
    #[error("agent admin {addr}{path} answered what this ferryctl cannot read: {error} (are ferryctl and ferry-agent the same version?)")]
    BadAnswer {
        addr: SocketAddr,
        path: &'static str,
        error: serde_json::Error,
    },
    #[error("{0}")]
    Other(String),
    #[error("{0} check(s) failed: this node cannot run Ferry as it is (see the remedy column)")]
    CheckFailed(usize),
    #[error("denied: {0}")]
    Denied(String),
}

impl CtlError {
    fn code(&self) -> i32 {
        match self {
            CtlError::AgentDown(..) => 3,
            CtlError::Pinned(PinnedError::NotFound(_)) => 4,
            CtlError::CheckFailed(_) => 5,
            CtlError::Denied(_) => 7,
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
        Cmd::Authz { op: AuthzOp::Check(c) } => authz::check(args, c),
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
            std::thread::sleep(Duration::from_secs(1));
        },
        Cmd::ConfigDump => print_doc(args, &admin::config_dump(args.admin)?),
        Cmd::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(*shell, &mut Args::command(), "ferryctl", &mut std::io::stdout());
            Ok(())
        }
        Cmd::Workloads => emit_rows(args, &admin::config_dump(args.admin)?.pods),
        Cmd::Conns => emit_rows(args, &admin::conns(args.admin)?),
        Cmd::Endpoints { service } => {
            let mut rows = admin::endpoints(args.admin)?;
            rows.retain(|r| service.as_ref().is_none_or(|s| *s == r.service));
            emit_rows(args, &rows)
        }
        Cmd::Services => {
            let dump = admin::config_dump(args.admin)?;
            let rows: Vec<ServiceRow> = dump.services.iter().map(ServiceRow::from).collect();
            emit_rows(args, &rows)
        }
        Cmd::Control => match admin::config_dump(args.admin)?.control {
            Some(c) => emit_rows(args, std::slice::from_ref(&c)),
            None => {
                println!("standalone: this agent takes its config from a file (no --discovery)");
                Ok(())
            }
        },
        Cmd::Certs => emit_rows(args, &admin::certs(args.admin)?),
        Cmd::Check { cgroup_root } => {
            let rows = ferry_ebpf::preflight::run(&args.pin_root, cgroup_root.as_deref());
            emit(args, &rows, &["check", "ok", "detail", "remedy"])?;
            if rows.iter().any(|r| !r.ok) {
                return Err(CtlError::CheckFailed(rows.iter().filter(|r| !r.ok).count()));
            }
            Ok(())
        }
        Cmd::Stats => emit_rows(args, &counters(admin::stats(args.admin)?.counters())),
    }
}
