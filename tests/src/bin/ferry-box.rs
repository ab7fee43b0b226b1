//! ferry-box: the cluster-in-a-box CLI (up, down, list, exec). `cargo xtask
//! box` builds everything and runs this; use it directly with FERRY_BIN_DIR
//! pointing at the built binaries. The demo and the benchmarks are
//! `ferry-bench` (benches/).

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use ferry_box::{default_bin_dir, BoxState, ClusterBox, Spec};

#[derive(Parser)]
#[command(about = "Ferry's cluster-in-a-box")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Manage a cluster-in-a-box.
    Box {
        #[command(subcommand)]
        op: BoxOp,
    },
}

#[derive(Subcommand)]
enum BoxOp {
    /// Create a box with the demo topology and leave it running.
    Up,
    /// Remove a box (or every box) and all it created.
    Down { id: Option<String> },
    /// List running boxes.
    List,
    /// Run CMD as POD (its netns and cgroup), or in a node's netns with `node1`, `node2`.
    Exec {
        #[arg(long)]
        id: Option<String>,
        target: String,
        #[arg(trailing_var_arg = true, required = true)]
        cmd: Vec<String>,
    },
}

fn main() -> Result<()> {
    let args = Args::parse();
    match args.cmd {
        Cmd::Box { op } => match op {
            BoxOp::Up => {
                let b = ClusterBox::up(Spec::demo(), default_bin_dir())?;
                let st = b.keep();
                println!(
                    "box {} is up; `cargo xtask box exec <pod> -- CMD`, `cargo xtask box down {}`",
                    st.id, st.id
                );
                Ok(())
            }
            BoxOp::Down { id } => {
                let ids = match id {
                    Some(id) => vec![id],
                    None => BoxState::list(),
                };
                for id in ids {
                    ferry_box::down(&id)?;
                    println!("box {id} removed");
                }
                Ok(())
            }
            BoxOp::List => {
                for id in BoxState::list() {
                    println!("{id}");
                }
                Ok(())
            }
            BoxOp::Exec { id, target, cmd } => {
                let id = match id {
                    Some(id) => id,
                    None => match BoxState::list().as_slice() {
                        [one] => one.clone(),
                        [] => bail!("no box is up (`cargo xtask box up`)"),
                        _ => bail!("several boxes are up: pass --id"),
                    },
                };
                let st = BoxState::load(&id)?;
                let args: Vec<&str> = cmd[1..].iter().map(String::as_str).collect();
                let mut c = match target.strip_prefix("node").and_then(|n| n.parse::<usize>().ok()) {
                    Some(n) if n >= 1 => st.node_command(n - 1, &cmd[0], &args)?,
                    _ => st.pod_command(&target, &cmd[0], &args)?,
                };
                let status = c
                    .env(
                        "PATH",
                        format!("{}:{}", st.bin_dir.display(), std::env::var("PATH").unwrap_or_default()),
                    )
                    .status()?;
                std::process::exit(status.code().unwrap_or(1));
            }
        },
    }
}
