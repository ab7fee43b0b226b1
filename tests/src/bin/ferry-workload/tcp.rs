//! The TCP protocol of `ferry_box::proto` (WHO, ECHO, SINK, SOURCE): the
//! threaded server (`serve`), its clients (`client ...`), and the same server
//! on one async connection (`serve_conn`, for `http serve --also-tcp`).

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use ferry_box::proto::{hex, pattern, sha256_of_pattern};
use sha2::{Digest, Sha256};

#[derive(Subcommand)]
pub enum Op {
    /// Ask who answers (prints the server pod and the client address it saw).
    Who {
        #[arg(long)]
        to: SocketAddr,
    },
    /// Echo BYTES through the server and compare checksums (half-closes after sending).
    Echo {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        bytes: u64,
    },
    /// CONNS concurrent echoes of BYTES each.
    Stress {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        conns: usize,
        #[arg(long)]
        bytes: u64,
    },
    /// Send a little and reset the connection mid-stream.
    EarlyClose {
        #[arg(long)]
        to: SocketAddr,
    },
    /// Request/response latency: COUNT 1-byte round trips, over one
    /// connection or a new connection each (`--new-conn`); prints percentiles (µs).
    Rr {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        new_conn: bool,
        /// Message size in bytes.
        #[arg(long, default_value_t = 1)]
        size: usize,
        /// Open loop at this many requests/s: each latency is measured from
        /// when the request was due, not when it was sent, so a stall counts
        /// against every request it delayed (no coordinated omission).
        #[arg(long)]
        rate: Option<f64>,
    },
    /// Echo MARKER repeated COUNT times (for capture tests).
    Marker {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        marker: String,
        #[arg(long)]
        count: usize,
    },
    /// Open CONNS connections one after another and keep them all open:
    /// each says `HOLD` and reads who answered and the client address the
    /// server saw; then closes them all. Prints the count answered, the
    /// distinct client addresses and ports seen (fails unless all answered).
    Hold {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        conns: usize,
        /// Deadline for the whole run.
        #[arg(long, default_value_t = 120)]
        timeout_secs: u64,
    },
    /// Try to connect; prints whether it worked (never fails).
    Probe {
        #[arg(long)]
        to: SocketAddr,
    },
    /// Unauthenticated load: for SECS seconds, CONNS threads each connect
    /// to TO again and again, write BYTES of garbage (a TLS-looking record
    /// header, then a pattern), and close. Prints the connections opened,
    /// those refused or reset, and the bytes written (never fails).
    Flood {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 8)]
        conns: usize,
        #[arg(long, default_value_t = 512)]
        bytes: usize,
        #[arg(long)]
        secs: u64,
    },
}

/// `client flood`: see [`Op::Flood`].
fn flood(to: SocketAddr, conns: usize, bytes: usize, secs: u64) {
    use std::sync::atomic::{AtomicU64, Ordering};
    let until = Instant::now() + Duration::from_secs(secs);
    let (opened, failed, written) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let mut garbage = vec![0u8; bytes.max(5)];
    pattern(7, &mut garbage);
    // A TLS handshake record header with a bogus body: the listener must
    // read it, fail the handshake and move on.
    garbage[..5].copy_from_slice(&[0x16, 0x03, 0x01, 0x02, 0x00]);
    let garbage = Arc::new(garbage);
    let threads: Vec<_> = (0..conns.max(1))
        .map(|_| {
            let (opened, failed, written, garbage) = (opened.clone(), failed.clone(), written.clone(), garbage.clone());
            std::thread::spawn(move || {
                while Instant::now() < until {
                    match TcpStream::connect_timeout(&to, Duration::from_secs(2)) {
                        Ok(mut s) => {
                            opened.fetch_add(1, Ordering::Relaxed);
                            let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
                            match s.write_all(&garbage) {
                                Ok(()) => {
                                    written.fetch_add(garbage.len() as u64, Ordering::Relaxed);
                                }
                                Err(_) => {
                                    failed.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                        Err(_) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            std::thread::sleep(Duration::from_millis(5));
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    println!(
        "{}",
        serde_json::json!({
            "opened": opened.load(Ordering::Relaxed),
            "failed": failed.load(Ordering::Relaxed),
            "bytes": written.load(Ordering::Relaxed),
        })
    );
}

/// `client hold`: CONNS connections open at once, each answered by the
/// server with the client address it saw.
fn hold(to: SocketAddr, conns: usize, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut open = Vec::with_capacity(conns);
    let mut clients = std::collections::BTreeMap::<String, usize>::new();
    let mut ports = std::collections::HashSet::new();
    let mut servers = std::collections::BTreeSet::new();
    let mut failed: Option<String> = None;
    for i in 0..conns {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            failed = Some(format!("deadline passed after {i} connections"));
            break;
        }
        let answer = (|| -> Result<(TcpStream, String)> {
            let mut s = TcpStream::connect_timeout(&to, left)?;
            s.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
            s.write_all(b"HOLD\n")?;
            let mut line = String::new();
            BufReader::new(s.try_clone()?).read_line(&mut line)?;
            Ok((s, line))
        })();
        match answer {
            Ok((s, line)) => {
                let mut it = line.split_whitespace();
                let (Some(server), Some(client)) = (it.next(), it.next()) else {
                    failed = Some(format!("connection {i}: answer {line:?}"));
                    break;
                };
                let client: SocketAddr = client.parse().with_context(|| format!("answer {line:?}"))?;
                servers.insert(server.to_owned());
                *clients.entry(client.ip().to_string()).or_default() += 1;
                ports.insert(client);
                open.push(s);
            }
            Err(e) => {
                failed = Some(format!("connection {i}: {e:#}"));
                break;
            }
        }
    }
    let answered = open.len();
    println!(
        "{}",
        serde_json::json!({
            "conns": conns,
            "answered": answered,
            "client_ips": clients,
            "distinct_client_addrs": ports.len(),
            "servers": servers,
            "error": failed,
        })
    );
    drop(open); // all of them were open until here
    if answered != conns {
        bail!("{} of {conns} connections not answered", conns - answered);
    }
    Ok(())
}

pub fn serve(name: String, port: u16) -> Result<()> {
    let l = TcpListener::bind(("0.0.0.0", port)).with_context(|| format!("bind {port}"))?;
    let name = Arc::new(name);
    for s in l.incoming() {
        let Ok(s) = s else { continue };
        let name = name.clone();
        std::thread::spawn(move || {
            let _ = handle(&name, s);
        });
    }
    Ok(())
}

fn handle(name: &str, s: TcpStream) -> Result<()> {
    let peer = s.peer_addr()?;
    let mut r = BufReader::new(s.try_clone()?);
    let mut w = s;
    let mut line = String::new();
    r.read_line(&mut line)?;
    let mut it = line.split_whitespace();
    match (it.next(), it.next().and_then(|n| n.parse::<u64>().ok())) {
        (Some("WHO"), _) => writeln!(w, "{name} {peer}")?,
        (Some("HOLD"), _) => {
            writeln!(w, "{name} {peer}")?;
            let mut buf = [0u8; 512];
            while r.read(&mut buf)? > 0 {}
        }
        (Some("ECHO"), _) => {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = r.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                w.write_all(&buf[..n])?;
            }
        }
        (Some("SINK"), Some(n)) => {
            let mut h = Sha256::new();
            let mut left = n;
            let mut buf = vec![0u8; 64 * 1024];
            while left > 0 {
                let k = r.read(&mut buf[..(left as usize).min(65536)])?;
                if k == 0 {
                    break;
                }
                h.update(&buf[..k]);
                left -= k as u64;
            }
            writeln!(w, "{} {peer}", hex(&h.finalize()))?;
        }
        (Some("SOURCE"), Some(n)) => send_pattern(&mut w, n)?,
        _ => writeln!(w, "ERR unknown command")?,
    }
    w.shutdown(Shutdown::Write)?;
    Ok(())
}

fn send_pattern(w: &mut impl Write, n: u64) -> Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut off = 0;
    while off < n {
        let k = ((n - off) as usize).min(buf.len());
        pattern(off, &mut buf[..k]);
        w.write_all(&buf[..k])?;
        off += k as u64;
    }
    Ok(())
}

fn connect(to: SocketAddr) -> Result<TcpStream> {
    let s = TcpStream::connect_timeout(&to, Duration::from_secs(5)).with_context(|| format!("connect {to}"))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    Ok(s)
}

/// Sends `bytes` after ECHO, half-closes, reads everything back; returns the received sha.
fn echo(to: SocketAddr, bytes: u64) -> Result<(String, u64)> {
    let mut s = connect(to)?;
    s.write_all(b"ECHO\n")?;
    let mut w = s.try_clone()?;
    let sender = std::thread::spawn(move || -> Result<()> {
        send_pattern(&mut w, bytes)?;
        w.shutdown(Shutdown::Write)?;
        Ok(())
    });
    let mut h = Sha256::new();
    let mut got = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        got += n as u64;
    }
    sender.join().map_err(|_| anyhow::anyhow!("sender panicked"))??;
    Ok((hex(&h.finalize()), got))
}

pub fn client(op: Op) -> Result<()> {
    match op {
        Op::Who { to } => {
            let mut s = connect(to)?;
            s.write_all(b"WHO\n")?;
            let mut line = String::new();
            BufReader::new(s).read_line(&mut line)?;
            let mut it = line.split_whitespace();
            let (Some(server), Some(seen)) = (it.next(), it.next()) else {
                bail!("bad WHO answer {line:?}")
            };
            println!("{}", serde_json::json!({"server": server, "client_seen_as": seen}));
        }
        Op::Echo { to, bytes } => {
            let t = Instant::now();
            let (sha, got) = echo(to, bytes)?;
            let ok = got == bytes && sha == sha256_of_pattern(bytes);
            println!(
                "{}",
                serde_json::json!({"bytes": got, "ok": ok, "ms": t.elapsed().as_millis() as u64})
            );
            if !ok {
                bail!("echo mismatch: sent {bytes}, got {got}");
            }
        }
        Op::Hold {
            to,
            conns,
            timeout_secs,
        } => hold(to, conns, Duration::from_secs(timeout_secs))?,
        Op::Stress { to, conns, bytes } => {
            let want = Arc::new(sha256_of_pattern(bytes));
            let hs: Vec<_> = (0..conns)
                .map(|_| {
                    let want = want.clone();
                    std::thread::spawn(move || matches!(echo(to, bytes), Ok((sha, n)) if n == bytes && sha == *want))
                })
                .collect();
            let ok = hs
                .into_iter()
                .map(|h| h.join().unwrap_or(false))
                .filter(|ok| *ok)
                .count();
            println!("{}", serde_json::json!({"conns": conns, "ok": ok}));
            if ok != conns {
                bail!("{} of {conns} connections failed", conns - ok);
            }
        }
        Op::Rr {
            to,
            count,
            new_conn,
            size,
            rate,
        } => {
            let msg = vec![b'x'; size];
            let mut back = vec![0u8; size];
            let mut lat = Vec::with_capacity(count);
            let mut conn: Option<TcpStream> = None;
            let started = Instant::now();
            for i in 0..count {
                let t = match rate {
                    Some(r) => {
                        let due = started + std::time::Duration::from_secs_f64(i as f64 / r);
                        if let Some(wait) = due.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                        due
                    }
                    None => Instant::now(),
                };
                if new_conn || conn.is_none() {
                    let mut c = connect(to)?;
                    c.set_nodelay(true)?;
                    c.write_all(b"ECHO\n")?;
                    conn = Some(c);
                }
                let c = conn.as_mut().expect("connected");
                c.write_all(&msg)?;
                c.read_exact(&mut back)?;
                lat.push(t.elapsed().as_micros() as u64);
                if new_conn {
                    conn = None;
                }
            }
            let secs = started.elapsed().as_secs_f64();
            lat.sort_unstable();
            let p = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];
            println!(
                "{}",
                serde_json::json!({"count": count, "p50_us": p(0.5), "p90_us": p(0.9), "p99_us": p(0.99), "p999_us": p(0.999), "ops_per_s": count as f64 / secs})
            );
        }
        Op::Marker { to, marker, count } => {
            let mut s = connect(to)?;
            s.write_all(b"ECHO\n")?;
            let data = marker.repeat(count);
            s.write_all(data.as_bytes())?;
            s.shutdown(Shutdown::Write)?;
            let mut back = Vec::new();
            s.read_to_end(&mut back)?;
            println!(
                "{}",
                serde_json::json!({"bytes": back.len(), "ok": back == data.as_bytes()})
            );
        }
        Op::EarlyClose { to } => {
            let mut s = connect(to)?;
            s.write_all(b"ECHO\nsome bytes then a reset")?;
            socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO))?;
            drop(s);
            println!("{}", serde_json::json!({"reset": true}));
        }
        Op::Flood { to, conns, bytes, secs } => flood(to, conns, bytes, secs),
        Op::Probe { to } => {
            let r = TcpStream::connect_timeout(&to, Duration::from_secs(2));
            println!(
                "{}",
                serde_json::json!({"connected": r.is_ok(), "error": r.err().map(|e| e.to_string())})
            );
        }
    }
    Ok(())
}

/// True when `first` (a connection's first three bytes) opens a command of
/// the TCP protocol: no HTTP method, nor the HTTP/2 preface, starts the same.
pub fn is_protocol_command(first: &[u8]) -> bool {
    matches!(first.get(..3), Some(b"WHO" | b"ECH" | b"SIN" | b"SOU" | b"HOL"))
}

/// The protocol's server on one async connection: the same answers as
/// `handle`, for a port that also serves HTTP.
pub async fn serve_conn(name: &str, s: tokio::net::TcpStream) -> Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let peer = s.peer_addr()?;
    let (r, mut w) = s.into_split();
    let mut r = tokio::io::BufReader::new(r);
    let mut line = String::new();
    r.read_line(&mut line).await?;
    let mut it = line.split_whitespace();
    match (it.next(), it.next().and_then(|n| n.parse::<u64>().ok())) {
        (Some("WHO"), _) => w.write_all(format!("{name} {peer}\n").as_bytes()).await?,
        (Some("HOLD"), _) => {
            w.write_all(format!("{name} {peer}\n").as_bytes()).await?;
            tokio::io::copy(&mut r, &mut tokio::io::sink()).await?;
        }
        (Some("ECHO"), _) => {
            tokio::io::copy(&mut r, &mut w).await?;
        }
        (Some("SINK"), Some(n)) => {
            let mut h = Sha256::new();
            let mut left = n;
            let mut buf = vec![0u8; 64 * 1024];
            while left > 0 {
                let k = r.read(&mut buf[..(left as usize).min(65536)]).await?;
                if k == 0 {
                    break;
                }
                h.update(&buf[..k]);
                left -= k as u64;
            }
            w.write_all(format!("{} {peer}\n", hex(&h.finalize())).as_bytes())
                .await?;
        }
        (Some("SOURCE"), Some(n)) => {
            let mut buf = vec![0u8; 64 * 1024];
            let mut off = 0;
            while off < n {
                let k = ((n - off) as usize).min(buf.len());
                pattern(off, &mut buf[..k]);
                w.write_all(&buf[..k]).await?;
                off += k as u64;
            }
        }
        _ => w.write_all(b"ERR unknown command\n").await?,
    }
    w.shutdown().await?;
    Ok(())
}
