//! ferry-agent: loads the eBPF programs, applies the config file (re-read on
//! change), proxies enrolled pods' connections and serves the admin endpoint.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context;
use clap::Parser;
use ferry_agent::{admin, agent, config_stream, load_config};
use ferry_model::{ConfigError, ConfigFile};
use tracing_subscriber::{layer::SubscriberExt, reload, util::SubscriberInitExt, EnvFilter, Layer};

#[derive(Parser, Debug)]
#[command(version, about)]
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
    /// The CA (ferry-control) gRPC endpoint; enables the mTLS tunnel.
    #[arg(long, requires_all = ["control_ca", "token_file"])]
    control: Option<String>,
    /// PEM root that signed ferry-control's serving certificate.
    #[arg(long)]
    control_ca: Option<PathBuf>,
    /// This node's bootstrap credential (a file holding the token).
    #[arg(long)]
    token_file: Option<PathBuf>,
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
    #[arg(long)]
    cleanup_on_exit: bool,
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
                        return Some(load_config(&self.path));
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
        _ => Some(load_config(&args.config)?),
    };
    let node = match (&args.node, &initial) {
        (Some(n), _) => n.clone(),
        (None, Some(c)) => c.node.clone(),
        (None, None) => anyhow::bail!("no config and no --node"),
    };
    let identity = match (&args.control, &args.control_ca, &args.token_file) {
        (Some(c), Some(ca), Some(t)) => Some(ferry_agent::identity::Options {
            control: c.clone(),
            control_ca: ca.clone(),
            token_file: t.clone(),
            ttl: Duration::from_secs(args.cert_ttl_seconds),
        }),
        _ => None,
    };
    let opts = agent::Options {
        pin_root: args.pin_root.clone(),
        cgroup_root: args.cgroup_root.clone(),
        identity,
        insecure_plaintext_tunnel: args.insecure_plaintext_tunnel,
    };
    let agent = agent::Agent::new(&node, opts).with_context(|| format!("starting the agent for node {node}"))?;
    let admin_l = tokio::net::TcpListener::bind(args.admin)
        .await
        .with_context(|| format!("binding admin endpoint {}", args.admin))?;
    tokio::spawn(admin::serve(agent.clone(), admin_l));
    let metrics_l = tokio::net::TcpListener::bind(args.metrics)
        .await
        .with_context(|| format!("binding metrics endpoint {}", args.metrics))?;
    tokio::spawn(admin::serve_metrics(agent.clone(), metrics_l));
    let mut stamp = None;
    if args.config_stream {
        return run_config_stream(agent, &args, node, initial).await;
    }
    match initial {
        Some(cfg) if cfg.node == node => {
            stamp = config_stamp(&args.config);
            agent.reconciler.reconcile(cfg).await;
        }
        Some(cfg) => anyhow::bail!("config {} is for node {}, not {node}", args.config.display(), cfg.node),
        None => tracing::info!(config = %args.config.display(), "waiting for the config file (not ready)"),
    }
    tracing::info!(node = %node, admin = %args.admin, metrics = %args.metrics, "ferry-agent running");

    let mut watch = ConfigWatch::new(&args.config, stamp)?;
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

    shutdown(agent, &args).await
}

/// The file only for settings; the rest from the control plane's stream.
async fn run_config_stream(
    agent: std::sync::Arc<agent::Agent>,
    args: &Args,
    node: String,
    initial: Option<ConfigFile>,
) -> anyhow::Result<()> {
    let settings_of = |c: ConfigFile| -> anyhow::Result<_> {
        anyhow::ensure!(c.node == node, "config is for node {}, not {node}", c.node);
        anyhow::ensure!(
            c.workloads.is_empty() && c.services.is_empty() && c.peer_authentications.is_empty(),
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
        token_file: args.token_file.clone().context("--config-stream needs --token-file")?,
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
    tokio::spawn(config_stream::run(sinks, opts, node.clone(), rx));
    let mut watch = ConfigWatch::new(&args.config, config_stamp(&args.config))?;
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
    shutdown(agent, args).await
}

async fn shutdown(agent: std::sync::Arc<agent::Agent>, args: &Args) -> anyhow::Result<()> {
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
