//! ferry-agent: loads the eBPF programs, applies the config file (re-read on
//! change), proxies enrolled pods' connections and serves the admin endpoint.
//! With `--takeover` it first takes the node's listeners over from the agent
//! already running (a hitless upgrade, `ferry_agent::handover`), and it
//! always offers its own to the next one.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context;
use clap::Parser;
use ferry_agent::{admin, agent, cni, config_stream, handover, load_config};
use ferry_model::{ConfigError, ConfigFile};
use tracing_subscriber::{layer::SubscriberExt, reload, util::SubscriberInitExt, EnvFilter, Layer};

#[derive(Parser, Debug)]
#[command(version, about)]
#[command(group(clap::ArgGroup::new("credential").args(["token_file", "service_account_token_file"])))]
struct Args {
    /// Config file (node, settings, and without --discovery the workloads,
    /// services and policies); re-read when it changes.
    #[arg(long, short)]
    config: PathBuf,
    /// Take workloads, services and policies from ferry-control's config
    /// stream (--control) instead of the file, which then holds only the
    /// node's settings.
    #[arg(long, alias = "discovery", requires = "control")]
    config_stream: bool,
    /// With --config-stream: where the last applied config is kept, so a
    /// restarted agent serves it before (and without) the control plane.
    #[arg(long)]
    state_file: Option<PathBuf>,
    /// bpffs directory for pins; this node's live under <pin-root>/<node>/.
    #[arg(long, default_value = "/sys/fs/bpf/ferry")]
    pin_root: PathBuf,
    /// Where pod cgroups live when the config does not say.
    #[arg(long, default_value = "/sys/fs/cgroup/kubepods.slice")]
    cgroup_root: PathBuf,
    /// The procfs to write pods' sysctls through: the node's /proc mounted
    /// somewhere writable when the container's own /proc/sys is read-only
    /// (unprivileged containers; the chart passes /host/proc).
    #[arg(long, env = "FERRY_PROC_ROOT", default_value = "/proc")]
    proc_root: PathBuf,
    /// Admin endpoint. Keep it on localhost: it shows workload state.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin: SocketAddr,
    /// Prometheus metrics endpoint (/metrics).
    #[arg(long, default_value = "0.0.0.0:15020")]
    metrics: SocketAddr,
    /// This node's name (else taken from the config file). With it, the agent
    /// starts, not ready, before its config file exists.
    #[arg(long, env = "NODE_NAME")]
    node: Option<String>,
    /// Log as JSON lines (access logs included).
    #[arg(long)]
    log_json: bool,
    /// The CA (ferry-control) gRPC endpoint; enables the mTLS tunnel. Needs
    /// a credential: --token-file or --service-account-token-file.
    #[arg(long, requires_all = ["control_ca", "credential"])]
    control: Option<String>,
    /// PEM root that signed ferry-control's serving certificate.
    #[arg(long)]
    control_ca: Option<PathBuf>,
    /// This node's static bootstrap token (a file holding it; ferry-control
    /// --node-auth tokens). Re-read on every connection.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// The agent pod's projected service-account token, bound to the
    /// audience ferry-control (ferry-control --node-auth tokenreview).
    /// Re-read on every connection and certificate request: the kubelet
    /// rotates it.
    #[arg(long, value_name = "PATH", num_args = 0..=1, default_missing_value = SERVICE_ACCOUNT_TOKEN)]
    service_account_token_file: Option<PathBuf>,
    /// Requested workload certificate lifetime, seconds (renewed at half).
    #[arg(long, default_value_t = 86400)]
    cert_ttl_seconds: u64,
    /// Without --control (no CA): run the plaintext tunnel between nodes,
    /// unauthenticated, for tests and benchmarks only. Without this flag and
    /// without a CA there is no tunnel: cross-node mesh connections are
    /// refused and port 15008 accepts nothing.
    #[arg(long, conflicts_with = "control")]
    insecure_plaintext_tunnel: bool,
    /// On exit, detach everything and remove this node's pins (uninstall).
    /// Without it, steering stays pinned so a restarted agent resumes it.
    /// Not applied when this agent exits after handing over to a new one.
    #[arg(long)]
    cleanup_on_exit: bool,
    /// Take over from the agent already serving this node (hitless
    /// upgrade): receive its listeners on --handover-socket, get ready
    /// (config applied, a certificate for every pod), then tell it to stop.
    /// With no agent listening there, start as usual.
    #[arg(long)]
    takeover: bool,
    /// The unix socket where this agent offers its listeners to a successor
    /// (and where --takeover finds its predecessor).
    /// Default: /run/ferry/<node>/handover.sock.
    #[arg(long)]
    handover_socket: Option<PathBuf>,
    /// After handing over: seconds this agent keeps serving the connections
    /// it had accepted before it exits.
    #[arg(long, default_value_t = 30)]
    drain_timeout: u64,
    /// What this agent does once it has handed over and drained: `exit`,
    /// or `wait` for SIGTERM doing nothing. Under a DaemonSet surge update
    /// (the Helm chart) the old pod must not exit by itself: its container
    /// would be restarted and, with --takeover, take the node back.
    #[arg(long, value_enum, default_value_t = AfterHandover::Exit)]
    after_handover: AfterHandover,
    /// Serve ferry-cni here (a unix socket, mode 0600): the plugin holds
    /// each new pod's sandbox until this agent has captured the pod
    /// (docs/cni.md). Off without it.
    #[arg(long, value_name = "PATH")]
    cni_socket: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum AfterHandover {
    Exit,
    Wait,
}

/// Where the chart projects the agent's service-account token.
const SERVICE_ACCOUNT_TOKEN: &str = "/var/run/secrets/ferry/token";

impl Args {
    /// The file holding this node's credential, whichever kind it is.
    fn credential(&self) -> Option<PathBuf> {
        self.token_file
            .clone()
            .or_else(|| self.service_account_token_file.clone())
    }
}

/// The config file, with the node's own addresses from the environment
/// (`NODE_IPS`/`NODE_IP`, the downward API's `status.hostIPs`/`hostIP`)
/// added to `settings.nodeAddresses`, so no per-node file lists them.
fn load(path: &std::path::Path) -> Result<ConfigFile, ConfigError> {
    use ferry_model::config::{NODE_IPS_ENV, NODE_IP_ENV};
    let mut cfg = load_config(path)?;
    let (ips, ip) = (std::env::var(NODE_IPS_ENV).ok(), std::env::var(NODE_IP_ENV).ok());
    for unused in cfg.settings.add_node_addresses(ips.as_deref(), ip.as_deref()) {
        tracing::warn!(reason = %unused, "node address from the environment not used");
    }
    Ok(cfg)
}

/// The config file, re-read when it changes, until SIGTERM or Ctrl-C.
struct ConfigWatch {
    path: PathBuf,
    stamp: Option<(std::time::SystemTime, u64)>,
    term: tokio::signal::unix::Signal,
    tick: tokio::time::Interval,
}

impl ConfigWatch {
    fn new(path: &std::path::Path, stamp: Option<(std::time::SystemTime, u64)>) -> std::io::Result<Self> {
        Ok(Self {
            path: path.to_owned(),
            stamp,
            term: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?,
            tick: tokio::time::interval(Duration::from_millis(200)),
        })
    }

    /// The file as it is after its next change; None when asked to stop.
    async fn next(&mut self) -> Option<Result<ConfigFile, ConfigError>> {
        loop {
            tokio::select! {
                _ = self.tick.tick() => {
                    let now = config_stamp(&self.path);
                    if now != self.stamp {
                        self.stamp = now;
                        return Some(load(&self.path));
                    }
                }
                _ = self.term.recv() => return None,
                _ = tokio::signal::ctrl_c() => return None,
            }
        }
    }
}

fn config_stamp(path: &std::path::Path) -> Option<(std::time::SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = EnvFilter::try_from_env("FERRY_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, reload_handle) = reload::Layer::new(filter);
    let fmt = if args.log_json {
        tracing_subscriber::fmt::layer().json().boxed()
    } else {
        tracing_subscriber::fmt::layer().boxed()
    };
    tracing_subscriber::registry().with(filter).with(fmt).init();
    admin::set_log_reload(Box::new(move |f: &str| {
        let new = EnvFilter::try_new(f).map_err(|e| e.to_string())?;
        reload_handle.reload(new).map_err(|e| e.to_string())
    }));

    // A config that exists must be valid; a missing one is waited for (not
    // ready meanwhile) when the node name is known.
    let initial = match (&args.node, args.config.exists()) {
        (Some(_), false) => None,
        _ => Some(load(&args.config)?),
    };
    let node = match (&args.node, &initial) {
        (Some(n), _) => n.clone(),
        (None, Some(c)) => c.node.clone(),
        (None, None) => anyhow::bail!("no config and no --node"),
    };
    let identity = match (&args.control, &args.control_ca, args.credential()) {
        (Some(c), Some(ca), Some(t)) => Some(ferry_agent::identity::Options {
            control: c.clone(),
            control_ca: ca.clone(),
            token_file: t,
            ttl: Duration::from_secs(args.cert_ttl_seconds),
        }),
        _ => None,
    };
    if let (Some(_), Some(file)) = (&args.control, args.credential()) {
        let kind = match args.service_account_token_file {
            Some(_) => "projected service-account token",
            None => "bootstrap token",
        };
        tracing::info!(credential = kind, file = %file.display(), "node credential (re-read on every connection)");
    }
    let opts = agent::Options {
        pin_root: args.pin_root.clone(),
        cgroup_root: args.cgroup_root.clone(),
        proc_root: args.proc_root.clone(),
        identity,
        insecure_plaintext_tunnel: args.insecure_plaintext_tunnel,
    };
    let handover_path = args
        .handover_socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("/run/ferry/{node}/handover.sock")));
    // Before loading anything: the predecessor's listeners (it keeps serving
    // them, and applies no config, until this agent commits).
    let mut inherited = if args.takeover {
        match handover::take_over(&handover_path).await {
            Ok(Some(i)) => {
                tracing::info!(from_pid = i.from_pid, pods = i.pods.len(), socket = %handover_path.display(), "listeners received from the running agent");
                Some(i)
            }
            Ok(None) => {
                tracing::info!(socket = %handover_path.display(), "no running agent to take over from; starting afresh");
                None
            }
            Err(e) => return Err(e).context("taking over from the running agent"),
        }
    } else {
        None
    };
    let agent = agent::Agent::new(&node, opts).with_context(|| format!("starting the agent for node {node}"))?;
    // Addresses learned from CNI ADDs for pods the control plane has none
    // for yet outlive this process beside the saved config: a restarted or
    // successor agent keeps those pods captured.
    if let Some(p) = &args.state_file {
        agent.reconciler.keep_learned_in(p.with_extension("learned.json")).await;
    }
    if let Some(i) = inherited.as_mut() {
        agent.reconciler.inherit(std::mem::take(&mut i.pods));
    }
    #[cfg(target_env = "gnu")]
    {
        let r = agent.reconciler.clone();
        tokio::spawn(trim_heap(agent.proxy.clone(), move || r.applied_version()));
    }
    // Failed enrollments are retried with backoff, config change or not.
    tokio::spawn(agent.reconciler.clone().retry_loop());
    let admin_l = match inherited.as_mut().and_then(|i| i.admin.take()) {
        Some(l) => l,
        None => tokio::net::TcpListener::bind(args.admin)
            .await
            .with_context(|| format!("binding admin endpoint {}", args.admin))?,
    };
    let metrics_l = match inherited.as_mut().and_then(|i| i.metrics.take()) {
        Some(l) => l,
        None => tokio::net::TcpListener::bind(args.metrics)
            .await
            .with_context(|| format!("binding metrics endpoint {}", args.metrics))?,
    };
    let endpoints = Endpoints {
        admin: admin_l,
        metrics: metrics_l,
        handover: handover_path,
        cni: args.cni_socket.clone(),
    };
    if args.config_stream {
        return run_config_stream(agent, &args, node, initial, inherited, endpoints).await;
    }
    let mut stamp = None;
    match initial {
        Some(cfg) if cfg.node == node => {
            stamp = config_stamp(&args.config);
            agent.reconciler.reconcile(cfg).await;
        }
        Some(cfg) => anyhow::bail!("config {} is for node {}, not {node}", args.config.display(), cfg.node),
        None => tracing::info!(config = %args.config.display(), "waiting for the config file (not ready)"),
    }
    // The config file is frozen in the predecessor while it is offered:
    // nothing to pause here, its loop waits on the reconciler.
    let handed = endpoints.start(&agent, inherited, |_| {}).await?;
    tracing::info!(node = %node, admin = %args.admin, metrics = %args.metrics, "ferry-agent running");

    let mut watch = ConfigWatch::new(&args.config, stamp)?;
    let file_loop = async {
        while let Some(loaded) = watch.next().await {
            match loaded {
                Ok(c) if c.node == node => {
                    agent.reconciler.reconcile(c).await;
                }
                Ok(c) => {
                    agent.proxy.telemetry.metrics.config_rejected.inc();
                    tracing::error!(old = %node, new = %c.node, "config names another node; keeping the last good config")
                }
                Err(e) => {
                    agent.proxy.telemetry.metrics.config_rejected.inc();
                    tracing::error!(error = %e, "config rejected; keeping the last good config")
                }
            }
        }
    };
    tokio::select! {
        _ = file_loop => shutdown(agent.clone(), &args).await,
        successor = handed => drain(agent.clone(), successor, &args).await,
    }
}

/// The node-level listeners and the hand-over socket, started once this
/// agent is in charge.
struct Endpoints {
    admin: tokio::net::TcpListener,
    metrics: tokio::net::TcpListener,
    handover: PathBuf,
    /// ferry-cni's socket (`--cni-socket`), served once this agent is in charge.
    cni: Option<PathBuf>,
}

/// How long a new agent may take to be ready before it gives up (and the
/// old one thaws): inside the old one's own deadline.
const READY_DEADLINE: Duration = Duration::from_secs(45);

impl Endpoints {
    /// Takes over (when `inherited`): waits until this agent is ready, then
    /// has the predecessor stop. Then serves admin and metrics and offers
    /// everything to the next agent; the future returned completes when a
    /// successor has taken over (its pid).
    async fn start(
        self,
        agent: &Arc<agent::Agent>,
        inherited: Option<handover::Inherited>,
        pause: impl Fn(bool) + Send + Sync + 'static,
    ) -> anyhow::Result<impl std::future::Future<Output = u32>> {
        if let Some(i) = inherited {
            let deadline = tokio::time::Instant::now() + READY_DEADLINE;
            loop {
                match handover::ready(agent) {
                    Ok(()) => break,
                    Err(why) if tokio::time::Instant::now() > deadline => {
                        anyhow::bail!(
                            "not ready to take over within {READY_DEADLINE:?} ({why}); the running agent carries on"
                        )
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
            // Both agents accept from here until the old one has stopped.
            agent.reconciler.start_accepting().await;
            let from = i.commit().await.context("completing the take-over")?;
            tracing::info!(from_pid = from, "took over from the previous agent");
            agent.reconciler.prune_now().await;
        }
        let admin_task = tokio::spawn(admin::serve(agent.clone(), clone_listener(&self.admin)?)).abort_handle();
        let metrics_task =
            tokio::spawn(admin::serve_metrics(agent.clone(), clone_listener(&self.metrics)?)).abort_handle();
        let node = vec![
            handover::NodeListener::new(handover::Kind::Admin, &self.admin, admin_task)?,
            handover::NodeListener::new(handover::Kind::Metrics, &self.metrics, metrics_task)?,
        ];
        if let Some(path) = &self.cni {
            let server =
                cni::Server::bind(path).with_context(|| format!("binding the CNI socket {}", path.display()))?;
            tracing::info!(socket = %server.path().display(), "serving ferry-cni");
            tokio::spawn(server.serve(agent.reconciler.clone()));
        }
        let server = handover::Server::bind(&self.handover)?;
        tracing::info!(socket = %server.path().display(), "offering listeners to a successor (--takeover)");
        Ok(handover::serve(server, agent.clone(), node, pause))
    }
}

/// A second handle on a listener (the same socket).
fn clone_listener(l: &tokio::net::TcpListener) -> std::io::Result<tokio::net::TcpListener> {
    use std::os::fd::AsFd;
    let std_l = std::net::TcpListener::from(l.as_fd().try_clone_to_owned()?);
    std_l.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(std_l)
}

/// After handing over: serves what this agent had accepted until it ends or
/// `--drain-timeout` passes, then exits, leaving steering to the successor.
async fn drain(agent: Arc<agent::Agent>, successor: u32, args: &Args) -> anyhow::Result<()> {
    let timeout = Duration::from_secs(args.drain_timeout);
    let started = tokio::time::Instant::now();
    let mut live = agent.proxy.telemetry.live().len();
    tracing::info!(
        successor_pid = successor,
        live,
        timeout_s = args.drain_timeout,
        "handed over: draining"
    );
    while live > 0 && started.elapsed() < timeout {
        tokio::time::sleep(Duration::from_millis(100)).await;
        live = agent.proxy.telemetry.live().len();
    }
    tracing::info!(
        successor_pid = successor,
        left = live,
        drained_ms = started.elapsed().as_millis() as u64,
        "drained; steering stays with the new agent"
    );
    if args.after_handover == AfterHandover::Wait {
        // Serving nothing, holding nothing: only the process stays, until
        // the kubelet stops its pod (the new one is ready by then).
        drop(agent);
        tracing::info!("handed over: waiting for SIGTERM (--after-handover wait)");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("stopped after handing over");
    }
    Ok(())
}

/// The file only for settings; the rest from the control plane's stream.
async fn run_config_stream(
    agent: Arc<agent::Agent>,
    args: &Args,
    node: String,
    initial: Option<ConfigFile>,
    inherited: Option<handover::Inherited>,
    endpoints: Endpoints,
) -> anyhow::Result<()> {
    let settings_of = |c: ConfigFile| -> anyhow::Result<_> {
        anyhow::ensure!(c.node == node, "config is for node {}, not {node}", c.node);
        anyhow::ensure!(
            c.workloads.is_empty()
                && c.pending_pods.is_empty()
                && c.services.is_empty()
                && c.peer_authentications.is_empty(),
            "with --config-stream, workloads, services and policies come from the control plane: \
             the config file may only hold `node` and `settings`"
        );
        Ok(c.settings)
    };
    let first = initial.map(settings_of).transpose()?.unwrap_or_default();
    let (tx, rx) = tokio::sync::watch::channel(first);
    let opts = config_stream::Options {
        control: args.control.clone().context("--config-stream needs --control")?,
        control_ca: args.control_ca.clone().context("--config-stream needs --control-ca")?,
        token_file: args
            .credential()
            .context("--config-stream needs --token-file or --service-account-token-file")?,
        state_file: args.state_file.clone(),
    };
    let metrics = &agent.proxy.telemetry.metrics;
    let sinks = config_stream::Sinks {
        apply: agent.reconciler.clone(),
        status: agent.control.clone(),
        connected: metrics.control_connected.clone(),
        rejected: metrics.config_rejected.clone(),
    };
    tracing::info!(node = %node, admin = %args.admin, control = %opts.control, "ferry-agent running (config from the control plane)");
    // While a successor is offered the listeners, this agent's stream is
    // stopped (the successor subscribes itself), and restarted if it gives up.
    let spawn = {
        let node = node.clone();
        move || {
            tokio::spawn(config_stream::run(
                sinks.clone(),
                opts.clone(),
                node.clone(),
                rx.clone(),
            ))
            .abort_handle()
        }
    };
    let stream = Arc::new(Mutex::new(Some(spawn())));
    let pause = {
        let stream = stream.clone();
        move |paused: bool| {
            let mut s = stream.lock().unwrap_or_else(|e| e.into_inner());
            if paused {
                if let Some(h) = s.take() {
                    h.abort();
                }
            } else if s.is_none() {
                *s = Some(spawn());
            }
        }
    };
    let handed = endpoints.start(&agent, inherited, pause).await?;
    let mut watch = ConfigWatch::new(&args.config, config_stamp(&args.config))?;
    let settings_loop = async {
        while let Some(loaded) = watch.next().await {
            match loaded.map_err(anyhow::Error::from).and_then(settings_of) {
                Ok(s) => {
                    let _ = tx.send(s);
                }
                Err(e) => {
                    agent.proxy.telemetry.metrics.config_rejected.inc();
                    tracing::error!(error = %e, "settings rejected; keeping the last good ones")
                }
            }
        }
    };
    tokio::select! {
        _ = settings_loop => shutdown(agent.clone(), args).await,
        successor = handed => drain(agent.clone(), successor, args).await,
    }
}

async fn shutdown(agent: Arc<agent::Agent>, args: &Args) -> anyhow::Result<()> {
    tracing::info!("shutting down: closing listeners, draining connections");
    agent.reconciler.stop_listeners().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !agent.proxy.telemetry.live().is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if args.cleanup_on_exit {
        agent.remove_pins().await.context("removing pins")?;
        tracing::info!("pins removed; pods are no longer captured");
    } else {
        tracing::info!("steering left pinned for the next agent run");
    }
    Ok(())
}

/// The allocator: glibc's, which keeps the heap a burst of connections used
/// (their copy buffers) after they close. Measured in process
/// (`agent/tests/limits.rs`, `rss_returns_after_bursts_of_connections`: three
/// bursts of 800 concurrent same-node connections, 64 KiB each way, debug
/// build): RSS 15 MiB → 155–170 MiB after each burst with glibc as is;
/// 19–20 MiB when the freed heap is trimmed after each burst; 130–270 MiB,
/// erratic, with mimalloc (also with `MIMALLOC_PURGE_DECOMMITS=1`); 33–47 MiB
/// with a fixed 64 KiB mmap threshold. With 10,000 connections held and
/// let go (tests/tests/delivery.rs, debug build), jemalloc (background
/// purging, 1 s dirty decay) ended where glibc with trimming does (~51 MiB
/// RSS) from an idle baseline 13 MiB higher (its arenas and threads), so it
/// was not taken either; what glibc keeps after trimming is fragmentation:
/// `ferry_heap_in_use_bytes` is back at its baseline. So the agent keeps
/// glibc and trims, returning the free heap to the system:
/// - once at least 256 connections have closed since the last trim and the
///   number open is not growing;
/// - after a new config is applied: parsing it, enrolling pods and loading
///   eBPF programs leave heap free that nothing reuses while the agent
///   idles (an idle agent with the demo config: 17.0 → 15.2 MiB RSS, heap
///   in use 0.4 MiB of 2.8 MiB held);
///
/// at most every 2 s (a trim walks the free heap under its lock), on a
/// blocking thread.
#[cfg(target_env = "gnu")]
async fn trim_heap(proxy: Arc<ferry_agent::proxy::Proxy>, applied_version: impl Fn() -> u64 + Send + 'static) {
    use std::sync::atomic::Ordering;
    const CLOSED_BEFORE_TRIM: u64 = 256;
    const MIN_GAP: Duration = Duration::from_secs(2);
    let closed = || proxy.telemetry.counters.closed.load(Ordering::Relaxed);
    let (mut closed_at_trim, mut open_before) = (closed(), proxy.connections());
    let mut applied_at_trim = 0;
    let mut trimmed: Option<tokio::time::Instant> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        if trimmed.is_some_and(|t| t.elapsed() < MIN_GAP) {
            continue;
        }
        let (open, closed_now, applied) = (proxy.connections(), closed(), applied_version());
        let burst_over = closed_now.saturating_sub(closed_at_trim) >= CLOSED_BEFORE_TRIM && open <= open_before;
        if burst_over || applied != applied_at_trim {
            // Off the runtime's workers: a trim walks the whole free heap
            // (milliseconds with a large config), and connections wait for
            // nothing but the allocator's lock meanwhile.
            let took = tokio::task::spawn_blocking(|| {
                let start = std::time::Instant::now();
                // SAFETY: malloc_trim only gives free memory back to the system.
                unsafe { libc::malloc_trim(0) };
                start.elapsed()
            })
            .await;
            if let Ok(took) = took {
                tracing::debug!(
                    micros = took.as_micros() as u64,
                    after_config = !burst_over,
                    "free heap given back"
                );
            }
            (closed_at_trim, applied_at_trim, trimmed) = (closed_now, applied, Some(tokio::time::Instant::now()));
        }
        open_before = open;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(
            [
                "ferry-agent",
                "-c",
                "a.yaml",
                "--control",
                "https://c:15012",
                "--control-ca",
                "ca.pem",
            ]
            .iter()
            .chain(args),
        )
    }

    #[test]
    fn the_credential_is_a_bootstrap_token_or_the_service_account_token() {
        let a = parse(&["--token-file", "/etc/ferry/node-token"]).unwrap();
        assert_eq!(a.credential(), Some(PathBuf::from("/etc/ferry/node-token")));
        let a = parse(&["--service-account-token-file"]).unwrap();
        assert_eq!(a.credential(), Some(PathBuf::from(SERVICE_ACCOUNT_TOKEN)));
        let a = parse(&["--service-account-token-file=/run/t"]).unwrap();
        assert_eq!(a.credential(), Some(PathBuf::from("/run/t")));
        // One, not both; and --control needs one.
        assert!(parse(&["--token-file", "t", "--service-account-token-file"]).is_err());
        assert!(parse(&[]).is_err());
    }
}
