//! ferry-agent: loads the eBPF programs, applies the config file (re-read on
//! change), proxies enrolled pods' connections and serves the admin endpoint.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context;
use clap::Parser;
use ferry_agent::{admin, agent, config::ConfigFile};
use tracing_subscriber::EnvFilter;

#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Config file (node, workloads, services); re-read when it changes.
    #[arg(long, short)]
    config: PathBuf,
    /// bpffs directory for pins; this node's live under <pin-root>/<node>/.
    #[arg(long, default_value = "/sys/fs/bpf/ferry")]
    pin_root: PathBuf,
    /// Where pod cgroups live when the config does not say.
    #[arg(long, default_value = "/sys/fs/cgroup/kubepods.slice")]
    cgroup_root: PathBuf,
    /// Admin endpoint. Keep it on localhost: it shows workload state.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin: SocketAddr,
    /// Log as JSON lines (access logs included).
    #[arg(long)]
    log_json: bool,
    /// On exit, detach everything and remove this node's pins (uninstall).
    /// Without it, steering stays pinned so a restarted agent resumes it.
    #[arg(long)]
    cleanup_on_exit: bool,
}

fn config_stamp(path: &std::path::Path) -> Option<(std::time::SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = EnvFilter::try_from_env("FERRY_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    if args.log_json {
        tracing_subscriber::fmt().json().with_env_filter(filter).init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }

    let cfg = ConfigFile::load(&args.config)?;
    let node = cfg.node.clone();
    let agent = agent::Agent::new(
        &node,
        agent::Options {
            pin_root: args.pin_root.clone(),
            cgroup_root: args.cgroup_root.clone(),
        },
    )
    .with_context(|| format!("starting the agent for node {node}"))?;
    let admin_l = admin::bind(args.admin)
        .await
        .with_context(|| format!("binding admin endpoint {}", args.admin))?;
    tokio::spawn(admin::serve(agent.clone(), admin_l));
    agent.apply(cfg).await;
    tracing::info!(node = %node, admin = %args.admin, "ferry-agent running");

    let mut stamp = config_stamp(&args.config);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let now = config_stamp(&args.config);
                if now != stamp {
                    stamp = now;
                    match ConfigFile::load(&args.config) {
                        Ok(c) if c.node == node => agent.apply(c).await,
                        Ok(c) => tracing::error!(old = %node, new = %c.node, "config names another node; keeping the last good config"),
                        Err(e) => tracing::error!(error = %e, "config rejected; keeping the last good config"),
                    }
                }
            }
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }

    tracing::info!("shutting down: closing listeners, draining connections");
    agent.stop_listeners().await;
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
