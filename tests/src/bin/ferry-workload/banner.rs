//! `banner serve|client`: a server-speaks-first protocol (SMTP/MySQL shape).
//! The server writes `220 POD ready\r\n` as soon as it accepts, then echoes
//! lines; the client measures how long the banner took. A proxy that waits
//! for the client's first bytes (protocol sniffing) stalls this protocol.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
};

#[derive(clap::Args)]
pub struct ServeArgs {
    #[arg(long)]
    name: String,
    #[arg(long)]
    port: u16,
}

#[derive(clap::Args)]
pub struct ClientArgs {
    #[arg(long)]
    to: SocketAddr,
    /// Deadline for connecting and for the banner.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
}

pub async fn serve(a: ServeArgs) -> Result<()> {
    let l = TcpListener::bind(("0.0.0.0", a.port))
        .await
        .with_context(|| format!("bind {}", a.port))?;
    loop {
        let Ok((s, _)) = l.accept().await else { continue };
        let name = a.name.clone();
        tokio::spawn(async move {
            let (r, mut w) = s.into_split();
            w.write_all(format!("220 {name} ready\r\n").as_bytes()).await?;
            let mut lines = BufReader::new(r).lines();
            while let Some(l) = lines.next_line().await? {
                w.write_all(format!("{l}\r\n").as_bytes()).await?;
            }
            anyhow::Ok(())
        });
    }
}

/// Prints `{"banner": "220 POD ready", "ms_to_banner": N}`, or the banner
/// null and an `error` (`connect: ...`, `timeout`, `closed`); never fails.
pub async fn client(a: ClientArgs) -> Result<()> {
    let t = Instant::now();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(a.timeout_ms);
    let got = tokio::time::timeout_at(deadline, async {
        let s = TcpStream::connect(a.to).await.map_err(|e| format!("connect: {e}"))?;
        let mut line = String::new();
        let n = BufReader::new(s)
            .read_line(&mut line)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("closed".to_owned());
        }
        Ok(line.trim_end().to_owned())
    })
    .await
    .unwrap_or_else(|_| Err("timeout".to_owned()));
    let out = match got {
        Ok(b) => serde_json::json!({"banner": b, "ms_to_banner": t.elapsed().as_millis() as u64}),
        Err(e) => serde_json::json!({"banner": null, "ms_to_banner": null, "error": e}),
    };
    println!("{out}");
    Ok(())
}
