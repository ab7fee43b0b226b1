//! The agent's end of [`AgentLink`]: its unix socket, one connection per
//! request (`ferry_model::cni`: a JSON line each way). Every read and write
//! is bounded by the caller's deadline and the reply by
//! [`MAX_MESSAGE`](ferry_model::cni::MAX_MESSAGE).

use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::PathBuf,
    time::{Duration, Instant},
};

use ferry_model::cni::{Reply, Request, MAX_MESSAGE};

use crate::plugin::{AgentLink, LinkError};

pub struct SocketLink {
    pub path: PathBuf,
}

fn left(deadline: Instant) -> Result<Duration, LinkError> {
    let d = deadline.saturating_duration_since(Instant::now());
    if d.is_zero() {
        Err(LinkError::NoAnswer("deadline passed".into()))
    } else {
        Ok(d)
    }
}

impl AgentLink for SocketLink {
    fn call(&mut self, req: &Request, deadline: Instant) -> Result<Reply, LinkError> {
        let mut s = UnixStream::connect(&self.path).map_err(|e| LinkError::Unreachable(e.to_string()))?;
        let mut line = serde_json::to_vec(req).map_err(|e| LinkError::NoAnswer(e.to_string()))?;
        line.push(b'\n');
        let io = |e: std::io::Error| LinkError::NoAnswer(e.to_string());
        s.set_write_timeout(Some(left(deadline)?)).map_err(io)?;
        s.write_all(&line).map_err(io)?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            s.set_read_timeout(Some(left(deadline)?)).map_err(io)?;
            let n = match s.read(&mut chunk) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    return Err(LinkError::NoAnswer("no answer before the deadline".into()))
                }
                Err(e) => return Err(io(e)),
            };
            if n == 0 {
                return Err(LinkError::NoAnswer(
                    "the agent closed the connection without answering".into(),
                ));
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = buf.iter().position(|b| *b == b'\n') {
                return serde_json::from_slice(&buf[..end])
                    .map_err(|e| LinkError::NoAnswer(format!("unreadable answer: {e}")));
            }
            if buf.len() > MAX_MESSAGE {
                return Err(LinkError::NoAnswer(format!("answer longer than {MAX_MESSAGE} bytes")));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{io::BufRead, os::unix::net::UnixListener};

    use ferry_model::cni::{Op, PodInfo, PROTOCOL_VERSION};

    use super::*;

    fn sock(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!("ferry-cni-{tag}-{}.sock", std::process::id()))
    }

    fn req() -> Request {
        Request {
            version: PROTOCOL_VERSION,
            op: Op::Add,
            pod: PodInfo::default(),
            timeout_ms: 100,
        }
    }

    /// A one-connection server that answers `answer` (raw bytes).
    fn serve(path: &PathBuf, answer: &'static [u8]) -> std::thread::JoinHandle<String> {
        let _ = std::fs::remove_file(path);
        let l = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut r = std::io::BufReader::new(s);
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            r.get_mut().write_all(answer).unwrap();
            line
        })
    }

    #[test]
    fn one_line_each_way() {
        let p = sock("ok");
        let t = serve(&p, b"{\"result\":\"captured\",\"podId\":4}\n");
        let mut link = SocketLink { path: p.clone() };
        let r = link.call(&req(), Instant::now() + Duration::from_secs(5)).unwrap();
        assert_eq!(r, Reply::Captured { pod_id: 4 });
        let sent: Request = serde_json::from_str(t.join().unwrap().trim()).unwrap();
        assert_eq!(sent, req());
        let _ = std::fs::remove_file(p);
    }

    #[test]
    fn failures_are_classified() {
        let p = sock("none");
        let _ = std::fs::remove_file(&p);
        let mut link = SocketLink { path: p.clone() };
        let soon = || Instant::now() + Duration::from_secs(2);
        assert!(matches!(link.call(&req(), soon()), Err(LinkError::Unreachable(_))));
        let t = serve(&p, b"");
        assert!(matches!(link.call(&req(), soon()), Err(LinkError::NoAnswer(e)) if e.contains("closed")));
        t.join().unwrap();
        let t = serve(&p, b"{\"result\":\"perhaps\"}\n");
        assert!(matches!(link.call(&req(), soon()), Err(LinkError::NoAnswer(e)) if e.contains("unreadable")));
        t.join().unwrap();
        // A server that never answers: the deadline holds.
        let _ = std::fs::remove_file(&p);
        let l = UnixListener::bind(&p).unwrap();
        let started = Instant::now();
        let r = link.call(&req(), Instant::now() + Duration::from_millis(300));
        assert!(matches!(r, Err(LinkError::NoAnswer(_))), "{r:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
        drop(l);
        let _ = std::fs::remove_file(p);
    }
}
