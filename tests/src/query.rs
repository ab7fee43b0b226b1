//! Asking the box what happened: clients in pods, agents' and ferry-control's
//! admin endpoints, metrics, pins, logs.

use std::{
    fs,
    io::{Read, Write},
    net::TcpStream,
    os::fd::AsRawFd,
    path::Path,
    process::Output,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};

use crate::{output_ok, BoxState, CONTROL_ADMIN, PIN_ROOT};

impl BoxState {
    /// Runs the sample client in `pod`; returns its stdout, failing on non-zero exit.
    pub fn client(&self, pod: &str, args: &[&str]) -> Result<String> {
        let out = self
            .pod_command(pod, &self.bin("ferry-workload"), &[&["client"], args].concat())?
            .output()?;
        output_ok(out, &format!("client in {pod}"))
    }

    /// GET on a node agent's admin endpoint (inside that node's netns).
    pub fn admin_get(&self, node: usize, path: &str) -> Result<(u16, String)> {
        self.http(node, "GET", "127.0.0.1:15000", path)
    }

    /// An HTTP/1.0 request from inside a node's netns (admin, metrics).
    pub fn http(&self, node: usize, method: &str, addr: &str, path: &str) -> Result<(u16, String)> {
        let ns = fs::File::open(format!("/run/netns/{}", self.node_netns(node)))?;
        let (method, addr, path) = (
            method.to_owned(),
            addr.parse::<std::net::SocketAddr>()?,
            path.to_owned(),
        );
        std::thread::spawn(move || -> Result<(u16, String)> {
            // SAFETY: setns on this short-lived thread only; the fd is open.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns: {}", std::io::Error::last_os_error());
            }
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            write!(s, "{method} {path} HTTP/1.0\r\nHost: ferry\r\n\r\n")?;
            let mut resp = String::new();
            s.read_to_string(&mut resp)?;
            let code = resp.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
            let body = resp
                .split_once("\r\n\r\n")
                .map(|(_, b)| b.to_owned())
                .unwrap_or_default();
            Ok((code, body))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("admin thread panicked"))?
    }

    pub fn admin_json(&self, node: usize, path: &str) -> Result<serde_json::Value> {
        let (code, body) = self.admin_get(node, path)?;
        if code != 200 {
            bail!("admin {path} on node {}: HTTP {code}: {body}", node + 1);
        }
        Ok(serde_json::from_str(&body)?)
    }

    /// Waits until every agent has applied a config version >= `min_version`.
    pub fn wait_applied(&self, min_version: u64) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        for n in 0..self.spec.nodes {
            loop {
                if let Ok(v) = self.admin_json(n, "/config_dump") {
                    if v["version"].as_u64().unwrap_or(0) >= min_version {
                        break;
                    }
                }
                if Instant::now() > deadline {
                    let log = fs::read_to_string(self.agent_log(n)).unwrap_or_default();
                    let tail: Vec<&str> = log
                        .lines()
                        .rev()
                        .take(15)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                        .collect();
                    bail!(
                        "agent on node {} did not apply config version {min_version}; log tail:\n{}",
                        n + 1,
                        tail.join("\n")
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// ferry-control's snapshot version.
    pub fn control_version(&self) -> Result<u64> {
        let (_, body) = self.http(0, "GET", CONTROL_ADMIN, "/version")?;
        Ok(serde_json::from_str::<serde_json::Value>(&body)?["version"]
            .as_u64()
            .unwrap_or(0))
    }

    /// ferry-control's `/problems`: every finding about the cluster YAML.
    pub fn control_problems(&self) -> Result<Vec<serde_json::Value>> {
        let (_, body) = self.http(0, "GET", CONTROL_ADMIN, "/problems")?;
        Ok(serde_json::from_str(&body)?)
    }

    /// ferry-control's `/metrics`, parsed.
    pub fn control_metrics(&self) -> Result<prometheus_parse::Scrape> {
        let (code, body) = self.http(0, "GET", CONTROL_ADMIN, "/metrics")?;
        if code != 200 {
            bail!("ferry-control /metrics: HTTP {code}");
        }
        Ok(prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))?)
    }

    /// ferry-control's view of each node's stream.
    pub fn control_nodes(&self) -> Result<serde_json::Value> {
        let (_, body) = self.http(0, "GET", CONTROL_ADMIN, "/nodes")?;
        Ok(serde_json::from_str(&body)?)
    }

    /// Waits until ferry-control is at snapshot `min` or later and every
    /// node has acknowledged it (an ACK is sent once the update is applied).
    pub fn wait_synced(&self, min: u64) -> Result<()> {
        let mut last = (0, serde_json::Value::Null);
        let ok = eventually(Duration::from_secs(20), || {
            let (Ok(v), Ok(nodes)) = (self.control_version(), self.control_nodes()) else {
                return false;
            };
            let synced = v >= min
                && (0..self.spec.nodes).all(|n| {
                    let st = &nodes[self.node_name(n)];
                    st["connected"] == true && st["acked_version"].as_u64() == Some(v)
                });
            last = (v, nodes);
            synced
        });
        if !ok {
            bail!(
                "agents not in sync with control version >= {min}: control at {}, nodes {}",
                last.0,
                last.1
            );
        }
        Ok(())
    }

    pub fn config_version(&self, node: usize) -> Result<u64> {
        Ok(self.admin_json(node, "/config_dump")?["version"].as_u64().unwrap_or(0))
    }
}

/// Conveniences for tests and the demo.
impl BoxState {
    /// `WHO` through the mesh: (server pod, client address the server saw).
    pub fn who(&self, pod: &str, to: &str) -> Result<(String, String)> {
        let out = self.client(pod, &["who", "--to", to])?;
        let v: serde_json::Value = serde_json::from_str(out.trim())?;
        Ok((
            v["server"].as_str().unwrap_or_default().to_owned(),
            v["client_seen_as"].as_str().unwrap_or_default().to_owned(),
        ))
    }

    /// Runs `ferry-workload ARGS...` in `pod` (any mode: `http client`,
    /// `http ws`, `grpc client`, `banner client`) and parses the one JSON line
    /// it prints. The process is killed if it runs past `deadline` (each
    /// client also has its own `--timeout-ms` per request or call).
    pub fn workload_json(&self, pod: &str, args: &[&str], deadline: Duration) -> Result<serde_json::Value> {
        let mut child = self
            .pod_command(pod, &self.bin("ferry-workload"), args)?
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        let end = Instant::now() + deadline;
        while child.try_wait()?.is_none() {
            if Instant::now() > end {
                let _ = child.kill();
                let _ = child.wait();
                bail!("ferry-workload {args:?} in {pod} ran past {deadline:?}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let out = output_ok(child.wait_with_output()?, &format!("ferry-workload {args:?} in {pod}"))?;
        serde_json::from_str(out.trim())
            .map_err(|e| anyhow::anyhow!("ferry-workload {args:?} in {pod} printed {out:?}: {e}"))
    }

    /// `ferry-workload http client ARGS...` in `pod` (e.g. `["--url",
    /// "http://10.96.0.20:9080/productpage", "--count", "100"]`): its
    /// counts (`by_status`, `by_pod`, `by_nested`, `errors`, ...). Deadline
    /// 60 s for the whole run.
    pub fn http_client(&self, pod: &str, args: &[&str]) -> Result<serde_json::Value> {
        self.workload_json(pod, &[&["http", "client"], args].concat(), Duration::from_secs(60))
    }

    /// Parsed request lines (`message` = `request`: one per HTTP request the
    /// agent proxied) of a node's agent access log.
    pub fn request_log(&self, node: usize) -> Vec<serde_json::Value> {
        fs::read_to_string(self.agent_log(node))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "ferry::access" && v["fields"]["message"] == "request")
            .map(|v| v["fields"].clone())
            .collect()
    }

    /// Whether a TCP connect from `pod` to `to` succeeds.
    pub fn probe(&self, pod: &str, to: &str) -> Result<bool> {
        let out = self.client(pod, &["probe", "--to", to])?;
        let v: serde_json::Value = serde_json::from_str(out.trim())?;
        Ok(v["connected"].as_bool().unwrap_or(false))
    }

    /// The eBPF counters of a node (read from its pins).
    pub fn bpf_stats(&self, node: usize) -> Result<std::collections::BTreeMap<String, u64>> {
        let p = ferry_ebpf::pinned::Pinned::open(Path::new(PIN_ROOT), &self.node_name(node))?;
        Ok(p.stats()?.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
    }

    /// Parsed access-log lines (one per closed connection) of a node's agent.
    pub fn access_log(&self, node: usize) -> Vec<serde_json::Value> {
        fs::read_to_string(self.agent_log(node))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "ferry::access")
            .map(|v| v["fields"].clone())
            .collect()
    }

    /// Runs `f` on a fresh thread inside a node's netns (sockets it makes live there).
    pub fn in_node<T: Send + 'static>(&self, node: usize, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let ns = fs::File::open(format!("/run/netns/{}", self.node_netns(node)))?;
        std::thread::spawn(move || {
            // SAFETY: setns on this dedicated thread only; the fd is open.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(anyhow::anyhow!("setns: {}", std::io::Error::last_os_error()));
            }
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread panicked"))?
    }

    /// Gives node `node` the kubelet probe source address
    /// (`ferry_model::admission::PROBE_SOURCE`, 169.254.7.127) on its `lo`, as
    /// the node's probe path would: connections bound to it are probes.
    pub fn add_probe_address(&self, node: usize) -> Result<()> {
        let a = format!("{}/32", ferry_model::admission::PROBE_SOURCE);
        crate::sys::run(
            "ip",
            &["-n", &self.node_netns(node), "addr", "replace", &a, "dev", "lo"],
        )?;
        Ok(())
    }

    /// `WHO` from node `node`'s own netns (a kubelet-style or hostNetwork
    /// client), from source address `from` (None: the kernel's choice, the
    /// node's own address). Ok(the server's answer, possibly empty if the
    /// connection was accepted and closed); Err if it could not connect or
    /// was reset.
    pub fn node_who(
        &self,
        node: usize,
        from: Option<std::net::Ipv4Addr>,
        to: std::net::SocketAddrV4,
    ) -> Result<std::io::Result<String>> {
        self.in_node(node, move || -> std::io::Result<String> {
            use socket2::{Domain, Socket, Type};
            let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
            if let Some(ip) = from {
                s.bind(&std::net::SocketAddrV4::new(ip, 0).into())?;
            }
            s.connect_timeout(&to.into(), Duration::from_secs(3))?;
            let mut c: TcpStream = s.into();
            c.set_read_timeout(Some(Duration::from_secs(3)))?;
            c.write_all(b"WHO\n")?;
            let mut out = String::new();
            c.read_to_string(&mut out)?;
            Ok(out)
        })
    }

    /// Scrapes a node agent's Prometheus endpoint and parses it.
    pub fn scrape(&self, node: usize) -> Result<prometheus_parse::Scrape> {
        let (code, body) = self.http(node, "GET", "127.0.0.1:15020", "/metrics")?;
        if code != 200 {
            bail!("metrics on node {}: HTTP {code}", node + 1);
        }
        Ok(prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))?)
    }

    /// The sum of a node's samples named `name` (every label set), or None
    /// when the agent does not answer or has none.
    pub fn metric(&self, node: usize, name: &str) -> Option<f64> {
        let m = self.scrape(node).ok()?;
        let v: Vec<f64> = m
            .samples
            .iter()
            .filter(|x| x.metric == name)
            .map(|x| sample_value(&x.value))
            .collect();
        (!v.is_empty()).then(|| v.iter().sum())
    }

    /// Runs ferryctl in a node's netns (so its admin endpoint is 127.0.0.1:15000).
    pub fn ferryctl(&self, node: usize, args: &[&str]) -> Result<Output> {
        let node_name = self.node_name(node);
        let mut all = vec!["--node", node_name.as_str()];
        all.extend_from_slice(args);
        Ok(self.node_command(node, &self.bin("ferryctl"), &all)?.output()?)
    }
}

/// A counter or gauge sample's value (OpenMetrics `_total` samples parse as untyped).
pub fn sample_value(v: &prometheus_parse::Value) -> f64 {
    match v {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => *v,
        _ => f64::NAN,
    }
}

/// Fails clearly when not root (the box needs namespaces, cgroups and BPF).
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the cluster-in-a-box tests must run as root (`sudo cargo xtask test`)"
    );
}

/// Polls `f` until it returns true or `timeout` passes.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
