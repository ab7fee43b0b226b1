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

use clap::{Parser, Subcommand, ValueEnum};
use ferry_agent::redirect::pinned::{Pinned, PinnedError};
use serde::Serialize;
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
        #[arg(short = 'f', long = "filename", required = true)]
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

/// Parses and cross-checks the given YAML as one cluster.
fn analyze(args: &Args, paths: &[PathBuf], all: bool) -> Result<(), CtlError> {
    use ferry_control::{
        model::{parse_file, Severity},
        source::files::{merge, yaml_files},
    };
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            files.extend(yaml_files(p));
        } else if p.exists() {
            files.push(p.clone());
        } else {
            return Err(CtlError::Other(format!("{}: no such file or directory", p.display())));
        }
    }
    let mut problems = Vec::new();
    let mut parsed = Vec::new();
    for f in &files {
        let name = f.display().to_string();
        let text = std::fs::read_to_string(f).map_err(|e| CtlError::Other(format!("{name}: {e}")))?;
        let (docs, found) = parse_file(&name, &text);
        problems.extend(found);
        parsed.push((name, docs));
    }
    let (cluster, dups) = merge(parsed.iter().map(|(n, d)| (n.clone(), d.as_slice())));
    problems.extend(dups);
    problems.extend(ferry_control::analyze::analyze(&cluster));
    problems.retain(|p| all || p.severity != Severity::Info);
    problems.sort_by(|a, b| (a.severity, &a.file, a.line).cmp(&(b.severity, &b.file, b.line)));
    let errors = problems.iter().filter(|p| p.severity == Severity::Error).count();
    match args.output {
        Output::Table => {
            for p in &problems {
                println!("{p}");
            }
            let warnings = problems.iter().filter(|p| p.severity == Severity::Warning).count();
            println!(
                "{} file(s), {} object(s): {errors} error(s), {warnings} warning(s)",
                files.len(),
                cluster.objects.len()
            );
        }
        _ => emit(args, &problems, &[])?,
    }
    if errors > 0 {
        std::process::exit(6);
    }
    Ok(())
}

fn run(args: &Args) -> Result<(), CtlError> {
    match &args.cmd {
        Cmd::Analyze { paths, all } => analyze(args, paths, *all),
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
            let (rows, columns) = dump(args, *map, pod.as_deref(), ip.as_deref())?;
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
            let rows = ferry_agent::preflight::run(&args.pin_root, cgroup_root.as_deref());
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

/// Prints rows as JSON (stable, documented in docs/cli.md) or as an aligned table.
fn emit<T: Serialize>(args: &Args, rows: &[T], columns: &[&str]) -> Result<(), CtlError> {
    let values: Vec<Value> = rows
        .iter()
        .map(|r| serde_json::to_value(r).unwrap_or(Value::Null))
        .collect();
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&values).unwrap_or_default()),
        Output::Yaml => print!("{}", serde_norway::to_string(&values).unwrap_or_default()),
        Output::Table => print!("{}", table(&values, columns)),
    }
    Ok(())
}

/// Local workloads from the agent, when it answers (for names in dumps).
fn workloads(args: &Args) -> Option<Vec<Value>> {
    admin_get(args.admin, "/config_dump").ok()?["pods"].as_array().cloned()
}

/// Rows of one pinned map, joined with workload names, filtered.
fn dump(
    args: &Args,
    map: DumpMap,
    pod: Option<&str>,
    ip: Option<&str>,
) -> Result<(Vec<Value>, &'static [&'static str]), CtlError> {
    let p = pinned(args)?;
    fn values<T: Serialize>(rows: Vec<T>) -> Vec<Value> {
        rows.into_iter()
            .map(|r| serde_json::to_value(r).unwrap_or(Value::Null))
            .collect()
    }
    let (mut rows, columns): (Vec<Value>, &'static [&'static str]) = match map {
        DumpMap::Pods => (
            values(p.pods()?),
            &[
                "netns_cookie",
                "pod_id",
                "namespace",
                "name",
                "ip",
                "host_veth",
                "cgroup",
            ],
        ),
        DumpMap::MeshDst => (values(p.mesh_dst()?), &["ip", "port", "kind"]),
        DumpMap::OrigDst => (
            values(p.orig_dst()?),
            &["netns_cookie", "client", "agent", "orig_dst", "pod_id"],
        ),
        DumpMap::Traffic => (
            values(p.traffic()?),
            &[
                "ifindex",
                "interface",
                "namespace",
                "name",
                "rx_packets",
                "rx_bytes",
                "tx_packets",
                "tx_bytes",
            ],
        ),
        DumpMap::Stats => (
            p.stats()?
                .into_iter()
                .map(|(k, v)| serde_json::json!({"counter": k, "value": v}))
                .collect(),
            &["counter", "value"],
        ),
        DumpMap::Config => (
            values(vec![p.config()?]),
            &[
                "flags",
                "agent_mark",
                "outbound_port",
                "inbound_port",
                "tunnel_port",
                "deliver_port_lo",
                "deliver_port_hi",
            ],
        ),
    };
    let wls = workloads(args).unwrap_or_default();
    // Join: pods by netns cookie, traffic by host veth.
    for r in &mut rows {
        let w = wls.iter().find(|w| {
            (r.get("netns_cookie").is_some() && w["netns_cookie"] == r["netns_cookie"])
                || (r.get("interface").is_some_and(|i| !i.is_null()) && w["host_veth"] == r["interface"])
        });
        if let (Some(w), Some(obj)) = (w, r.as_object_mut()) {
            for k in ["namespace", "name", "ip", "host_veth", "cgroup", "netns", "uid"] {
                obj.entry(k).or_insert(w[k].clone());
            }
        }
    }
    if let Some(pod) = pod {
        if wls.is_empty() {
            return Err(CtlError::Other(
                "--pod needs the agent (for pod names); use --ip instead".into(),
            ));
        }
        let (ns, name) = pod.split_once('/').map_or((None, pod), |(n, p)| (Some(n), p));
        let w = wls
            .iter()
            .find(|w| w["name"] == name && ns.is_none_or(|n| w["namespace"] == n))
            .ok_or_else(|| CtlError::Other(format!("no local workload named {pod}")))?
            .clone();
        rows.retain(|r| {
            (r.get("netns_cookie").is_some() && r["netns_cookie"] == w["netns_cookie"])
                || (r.get("pod_id").is_some() && r["pod_id"] == w["pod_id"])
                || r.get("name").is_some_and(|n| *n == w["name"])
        });
    }
    if let Some(ip) = ip {
        let port_prefix = format!("{ip}:");
        rows.retain(|r| {
            r.as_object().is_some_and(|o| {
                o.values()
                    .any(|v| v.as_str().is_some_and(|s| s == ip || s.starts_with(&port_prefix)))
            })
        });
    }
    Ok((rows, columns))
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn table(rows: &[Value], columns: &[&str]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| columns.iter().map(|c| cell(&r[*c])).collect())
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| cells.iter().map(|r| r[i].len()).chain([c.len()]).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    let line = |out: &mut String, items: Vec<String>| {
        let l: Vec<String> = items.iter().zip(&widths).map(|(s, w)| format!("{s:<w$}")).collect();
        out.push_str(l.join("  ").trim_end());
        out.push('\n');
    };
    line(&mut out, columns.iter().map(|c| c.to_uppercase()).collect());
    for r in cells {
        line(&mut out, r);
    }
    if rows.is_empty() {
        out.push_str("(none)\n");
    }
    out
}
