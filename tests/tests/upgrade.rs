//! Hitless upgrade, crash and restart without the control plane (issue 17),
//! on the cluster-in-a-box under continuous traffic: long-lived streams
//! carrying checksummed data (the ECHO protocol, every byte compared) and a
//! steady rate of new connections, within node 1 and across nodes, with
//! every failure counted; plus plaintext from outside the mesh into a
//! STRICT pod, which must never be answered.
//!
//! The traffic runs in pods as this test binary re-executed
//! ([`traffic_role`]), so it sits in the pod's cgroup and is steered.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use ferry_box::{eventually, proto::pattern, require_root, ClusterBox, Spec};
use serde::{Deserialize, Serialize};

const ROLE_ENV: &str = "FERRY_UPGRADE_TRAFFIC";
const VIP: &str = "10.96.0.10:80";
const STRICT_ECHO: &str = "\
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: echo-strict, namespace: default}
spec:
  selector: {matchLabels: {app: echo}}
  mtls: {mode: STRICT}
";

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

#[derive(Serialize, Deserialize, Clone, Debug)]
struct Plan {
    /// Long-lived ECHO streams, one per address.
    streams: Vec<SocketAddr>,
    /// New connections (WHO), round robin over these, at `rate` per second.
    conns: Vec<SocketAddr>,
    rate: f64,
    /// Plaintext that must never be answered (STRICT pods from outside).
    refused: Vec<SocketAddr>,
    /// Stop when this file exists (or after `max_secs`).
    stop: PathBuf,
    max_secs: u64,
}

#[derive(Serialize, Deserialize, Debug, Default)]
struct StreamResult {
    to: String,
    bytes: u64,
    error: Option<String>,
    ended_ms: u64,
}

#[derive(Serialize, Deserialize, Debug)]
struct Failure {
    at_ms: u64,
    to: String,
    error: String,
}

#[derive(Serialize, Deserialize, Debug, Default)]
struct Report {
    streams: Vec<StreamResult>,
    attempts: u64,
    ok: u64,
    failures: Vec<Failure>,
    /// Successful new connections (time, target), for recovery checks.
    ok_at_ms: Vec<u64>,
    refused_tries: u64,
    /// Answers from a STRICT pod to plaintext: must stay 0.
    leaked: Vec<Failure>,
}

/// What an application saw, in one word.
fn kind(e: &std::io::Error) -> String {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionReset => "reset".into(),
        ConnectionRefused => "refused".into(),
        UnexpectedEof => "eof".into(),
        WouldBlock | TimedOut => "timeout (hang)".into(),
        BrokenPipe => "broken pipe".into(),
        _ => format!("{e}"),
    }
}

fn stream(to: SocketAddr, stop: PathBuf, max: Instant) -> StreamResult {
    let mut r = StreamResult {
        to: to.to_string(),
        ..Default::default()
    };
    let run = |r: &mut StreamResult| -> std::io::Result<()> {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"ECHO\n")?;
        let (mut out, mut back, mut want) = (vec![0u8; 8192], vec![0u8; 8192], vec![0u8; 8192]);
        while !stop.exists() && Instant::now() < max {
            pattern(r.bytes, &mut out);
            s.write_all(&out)?;
            s.read_exact(&mut back)?;
            pattern(r.bytes, &mut want);
            if back != want {
                return Err(std::io::Error::other(format!("checksum mismatch at byte {}", r.bytes)));
            }
            r.bytes += back.len() as u64;
            std::thread::sleep(Duration::from_millis(10));
        }
        s.shutdown(Shutdown::Write)?;
        let mut rest = Vec::new();
        s.read_to_end(&mut rest)?;
        if !rest.is_empty() {
            return Err(std::io::Error::other(format!(
                "{} unexpected bytes after EOF",
                rest.len()
            )));
        }
        Ok(())
    };
    if let Err(e) = run(&mut r) {
        r.error = Some(kind(&e));
    }
    r.ended_ms = now_ms();
    r
}

/// One WHO; Ok(answer).
fn who(to: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"WHO\n")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    if line.split_whitespace().count() != 2 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("no answer ({line:?})"),
        ));
    }
    Ok(line)
}

fn run_plan(p: Plan) -> Report {
    let max = Instant::now() + Duration::from_secs(p.max_secs);
    let streams: Vec<_> = p
        .streams
        .iter()
        .map(|to| {
            let (to, stop) = (*to, p.stop.clone());
            std::thread::spawn(move || stream(to, stop, max))
        })
        .collect();
    let refused = {
        let (targets, stop) = (p.refused.clone(), p.stop.clone());
        std::thread::spawn(move || {
            let (mut tries, mut leaked) = (0, Vec::new());
            while !targets.is_empty() && !stop.exists() && Instant::now() < max {
                for to in &targets {
                    tries += 1;
                    if let Ok(answer) = who(*to) {
                        leaked.push(Failure {
                            at_ms: now_ms(),
                            to: to.to_string(),
                            error: answer,
                        });
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            (tries, leaked)
        })
    };
    let mut rep = Report::default();
    let start = Instant::now();
    let mut i = 0u64;
    while !p.conns.is_empty() && !p.stop.exists() && Instant::now() < max {
        let due = start + Duration::from_secs_f64(i as f64 / p.rate);
        if let Some(w) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(w);
        }
        let to = p.conns[i as usize % p.conns.len()];
        i += 1;
        rep.attempts += 1;
        match who(to) {
            Ok(_) => {
                rep.ok += 1;
                rep.ok_at_ms.push(now_ms());
            }
            Err(e) => rep.failures.push(Failure {
                at_ms: now_ms(),
                to: to.to_string(),
                error: kind(&e),
            }),
        }
    }
    rep.streams = streams.into_iter().map(|h| h.join().unwrap()).collect();
    (rep.refused_tries, rep.leaked) = refused.join().unwrap();
    rep
}

/// Not a test: the traffic of one pod, when re-executed with a plan.
#[test]
#[ignore = "run by the tests below, inside a pod"]
fn traffic_role() {
    let Ok(plan) = std::env::var(ROLE_ENV) else { return };
    let rep = run_plan(serde_json::from_str(&plan).unwrap());
    println!("TRAFFIC {}", serde_json::to_string(&rep).unwrap());
}

/// Traffic running in a pod.
struct Traffic {
    pod: String,
    child: Child,
    /// Its stdout, read as it comes (the report may exceed a pipe's buffer).
    out: Option<std::thread::JoinHandle<String>>,
}

impl Drop for Traffic {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_traffic(b: &ClusterBox, pod: &str, plan: &Plan) -> Traffic {
    let exe = std::env::current_exe().unwrap();
    let mut child = b
        .state
        .pod_command(
            pod,
            exe.to_str().unwrap(),
            &[
                "traffic_role",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads",
                "1",
            ],
        )
        .unwrap()
        .env(ROLE_ENV, serde_json::to_string(plan).unwrap())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    Traffic {
        pod: pod.to_owned(),
        child,
        out: Some(out),
    }
}

fn finish(mut t: Traffic) -> Report {
    let deadline = Instant::now() + Duration::from_secs(20);
    while t.child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "traffic in {} did not stop within 20 s",
            t.pod
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = t.out.take().unwrap().join().unwrap();
    let line = out
        .lines()
        .find_map(|l| l.split_once("TRAFFIC ").map(|(_, r)| r))
        .unwrap_or_else(|| panic!("no report from the traffic in {}: {out}", t.pod));
    serde_json::from_str(line).unwrap()
}

fn addr(b: &ClusterBox, pod: &str) -> SocketAddr {
    SocketAddr::new(b.state.pod_ip(pod).unwrap().into(), 8080)
}

/// The demo box with echo STRICT: client (node 1) and echo-1 (node 1),
/// echo-2 (node 2), outsider (node 2, not in the mesh).
fn up(discovery: bool) -> ClusterBox {
    require_root();
    let mut spec = Spec::demo();
    spec.peer_authentications = ferry_model::peer_auth::peer_authentications_in(STRICT_ECHO).unwrap();
    spec.discovery = discovery;
    ClusterBox::up(spec, ferry_box::default_bin_dir()).expect("box up")
}

/// Traffic through node 1's agent: from `client` (node 1) within the node
/// and across, from `echo-2` (node 2) into node 1, and plaintext from
/// `outsider` into STRICT echo-1 (with a positive control: the same client
/// code reaches outsider's own server).
fn plans(b: &ClusterBox, stop: &std::path::Path, max_secs: u64) -> Vec<(&'static str, Plan)> {
    let (echo1, echo2, outsider) = (addr(b, "echo-1"), addr(b, "echo-2"), addr(b, "outsider"));
    let vip: SocketAddr = VIP.parse().unwrap();
    let plan = |streams, conns, rate, refused| Plan {
        streams,
        conns,
        rate,
        refused,
        stop: stop.to_owned(),
        max_secs,
    };
    vec![
        (
            "client",
            plan(vec![echo1, echo2, vip, vip], vec![echo1, echo2, vip], 40.0, vec![]),
        ),
        ("echo-2", plan(vec![echo1, echo1], vec![echo1], 15.0, vec![])),
        ("outsider", plan(vec![], vec![outsider], 5.0, vec![echo1])),
    ]
}

fn summary(pod: &str, r: &Report) -> String {
    let errs: Vec<String> = r
        .streams
        .iter()
        .map(|s| format!("{}:{}B:{}", s.to, s.bytes, s.error.as_deref().unwrap_or("ok")))
        .collect();
    format!(
        "{pod}: new {}/{} ok, {} failed {:?}; streams {errs:?}; plaintext into STRICT {} tries, {} answered",
        r.ok,
        r.attempts,
        r.failures.len(),
        r.failures
            .iter()
            .map(|f| &f.error)
            .collect::<std::collections::BTreeSet<_>>(),
        r.refused_tries,
        r.leaked.len()
    )
}

#[test]
fn hitless_upgrade_under_traffic_fails_nothing() {
    let mut b = up(false);
    let stop = b.state.dir.join("stop-upgrade");
    let traffic: Vec<Traffic> = plans(&b, &stop, 60)
        .iter()
        .map(|(pod, p)| start_traffic(&b, pod, p))
        .collect();
    std::thread::sleep(Duration::from_secs(2));

    let t = Instant::now();
    let t0 = now_ms();
    let mut old = b.upgrade_agent(0, Duration::from_secs(30)).expect("upgrade");
    let takeover = t.elapsed();
    // The new agent alone accepts now; the old one serves what it had.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        old.try_wait().unwrap().is_none(),
        "the old agent drains while its streams live"
    );
    std::fs::write(&stop, "").unwrap();
    let reports: Vec<(String, Report)> = traffic.into_iter().map(|t| (t.pod.clone(), finish(t))).collect();
    let stopped = Instant::now();
    let deadline = stopped + Duration::from_secs(10);
    while old.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the old agent did not exit after its connections ended"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let drained = stopped.elapsed();
    let log = b.agent_log(0);
    eprintln!(
        "take-over {takeover:?}; old agent exited {drained:?} after the traffic stopped\n{}",
        reports
            .iter()
            .map(|(p, r)| summary(p, r))
            .collect::<Vec<_>>()
            .join("\n")
    );
    for (pod, r) in &reports {
        for f in &r.failures {
            eprintln!(
                "{pod}: {} ms after the upgrade began: {} {}",
                f.at_ms as i64 - t0 as i64,
                f.to,
                f.error
            );
        }
    }
    for (pod, r) in &reports {
        assert!(r.failures.is_empty(), "{}", summary(pod, r));
        assert!(r.leaked.is_empty(), "{}", summary(pod, r));
        assert!(
            r.streams.iter().all(|s| s.error.is_none() && s.bytes > 0),
            "{}",
            summary(pod, r)
        );
        assert!(r.ok > 0, "positive control: {}", summary(pod, r));
    }
    let outsider = &reports.iter().find(|(p, _)| p == "outsider").unwrap().1;
    assert!(outsider.refused_tries > 20, "{}", summary("outsider", outsider));
    assert!(log.contains("\"left\":0"), "the old agent drained every connection");

    // After the old agent is gone: the new one serves, within the node and
    // both ways across nodes, and can be upgraded again.
    let s = b.state.clone();
    assert_eq!(s.who("client", &addr(&b, "echo-2").to_string()).unwrap().0, "echo-2");
    assert_eq!(s.who("echo-2", &addr(&b, "echo-1").to_string()).unwrap().0, "echo-1");
    assert_eq!(s.who("client", &addr(&b, "echo-1").to_string()).unwrap().0, "echo-1");
    let mut again = b.upgrade_agent(0, Duration::from_secs(5)).expect("second upgrade");
    assert!(
        eventually(Duration::from_secs(10), || again.try_wait().unwrap().is_some()),
        "an idle agent exits at once after handing over"
    );
    assert_eq!(s.who("echo-2", &addr(&b, "echo-1").to_string()).unwrap().0, "echo-1");

    // The Helm chart's surge update: an agent started with `--after-handover
    // wait` does not exit once it has handed over and drained (its pod's
    // container would be restarted and take the node back); it waits for
    // SIGTERM, while its successor serves.
    let mut exits = b
        .upgrade_agent_with(0, Duration::from_secs(1), &["--after-handover", "wait"])
        .expect("upgrade to an agent that waits after handing over");
    assert!(
        eventually(Duration::from_secs(10), || exits.try_wait().unwrap().is_some()),
        "positive control: an agent started without it exits after handing over"
    );
    let mut waits = b.upgrade_agent(0, Duration::from_secs(1)).expect("upgrade from it");
    let log = |b: &ClusterBox| b.agent_log(0);
    assert!(
        eventually(Duration::from_secs(10), || log(&b)
            .contains("waiting for SIGTERM (--after-handover wait)")),
        "the old agent drained and waits"
    );
    assert!(waits.try_wait().unwrap().is_none(), "it is still running");
    assert_eq!(s.who("echo-2", &addr(&b, "echo-1").to_string()).unwrap().0, "echo-1");
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(waits.id() as i32, libc::SIGTERM) };
    assert!(
        eventually(Duration::from_secs(5), || waits
            .try_wait()
            .unwrap()
            .is_some_and(|st| st.success())),
        "SIGTERM ends it, cleanly"
    );
    // Steering stayed with the successor.
    assert_eq!(s.who("echo-2", &addr(&b, "echo-1").to_string()).unwrap().0, "echo-1");
}

/// New connections through node 1 recover within this long of the agent's
/// restart (measured: see the test's output).
const RECOVERY_BOUND: Duration = Duration::from_secs(5);
/// Established connections through a killed agent end within this long.
const FAIL_FAST: Duration = Duration::from_secs(2);

#[test]
fn a_crash_fails_fast_and_recovers_within_the_bound() {
    let mut b = up(false);
    let stop = b.state.dir.join("stop-crash");
    let traffic: Vec<Traffic> = plans(&b, &stop, 60)
        .iter()
        .map(|(pod, p)| start_traffic(&b, pod, p))
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let killed = now_ms();
    b.kill_agent(0).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let restarted = now_ms();
    b.start_agent(0).unwrap();
    b.state.wait_applied(1).unwrap();
    let ready = now_ms();
    std::thread::sleep(Duration::from_secs(3));
    std::fs::write(&stop, "").unwrap();
    let reports: Vec<(String, Report)> = traffic.into_iter().map(|t| (t.pod.clone(), finish(t))).collect();
    eprintln!(
        "killed at 0 ms, restarted at {} ms, ready at {} ms\n{}",
        restarted - killed,
        ready - killed,
        reports
            .iter()
            .map(|(p, r)| summary(p, r))
            .collect::<Vec<_>>()
            .join("\n")
    );
    for (pod, r) in &reports {
        // Established connections: every one through node 1 ends, fast, with
        // an error the application sees (no silent hang).
        for s in &r.streams {
            let e = s
                .error
                .as_deref()
                .unwrap_or_else(|| panic!("{pod}: {} survived a SIGKILL?", s.to));
            assert!(!e.contains("hang"), "{pod}: {} hung: {}", s.to, summary(pod, r));
            let after = s.ended_ms.saturating_sub(killed);
            assert!(
                after <= FAIL_FAST.as_millis() as u64,
                "{pod}: {} ended {after} ms after the kill",
                s.to
            );
        }
        // New connections: failures only between the kill and the bound.
        for f in &r.failures {
            assert!(f.at_ms + 200 >= killed, "{pod}: failed before the kill: {f:?}");
            let since_restart = f.at_ms.saturating_sub(restarted);
            assert!(
                since_restart <= RECOVERY_BOUND.as_millis() as u64,
                "{pod}: {f:?} is {since_restart} ms after the restart"
            );
        }
        assert!(
            r.ok_at_ms.iter().any(|t| *t > ready),
            "{pod} recovered: {}",
            summary(pod, r)
        );
        // STRICT stays fail-closed throughout.
        assert!(r.leaked.is_empty(), "{}", summary(pod, r));
    }
    let client = &reports.iter().find(|(p, _)| p == "client").unwrap().1;
    assert!(!client.failures.is_empty(), "positive control: the crash was felt");
    let last = reports
        .iter()
        .flat_map(|(_, r)| &r.failures)
        .map(|f| f.at_ms)
        .max()
        .unwrap_or(restarted);
    eprintln!(
        "last failed new connection {} ms after the restart",
        last.saturating_sub(restarted)
    );
}

#[test]
fn a_restart_with_the_control_plane_down_serves_the_saved_config() {
    let mut b = up(true);
    let s = b.state.clone();
    let (echo1, echo2) = (addr(&b, "echo-1").to_string(), addr(&b, "echo-2").to_string());
    assert_eq!(
        s.who("client", &echo2).unwrap().0,
        "echo-2",
        "positive control, across nodes"
    );
    b.stop_control();
    b.kill_agent(0).unwrap();
    let t = Instant::now();
    b.start_agent(0).unwrap();
    s.wait_applied(1).unwrap();
    let applied = t.elapsed();
    eprintln!("restarted agent applied its saved config in {applied:?} with the control plane down");
    assert!(applied < Duration::from_secs(5), "{applied:?}");
    assert!(b
        .agent_log(0)
        .contains("serving the saved config until the control plane answers"));
    let dump = s.admin_json(0, "/config_dump").unwrap();
    assert_eq!(dump["control"]["connected"], false, "{}", dump["control"]);
    // Within the node the mesh works at once; across nodes it needs this
    // pod's certificate, which only the CA can give (keys are never stored).
    assert_eq!(s.who("client", &echo1).unwrap().0, "echo-1");
    assert!(s.who("client", &echo2).is_err(), "no certificate without the CA");
    assert!(
        s.who("outsider", &echo1).is_err(),
        "STRICT while the control plane is down"
    );

    b.start_control().unwrap();
    assert!(
        eventually(Duration::from_secs(20), || s
            .admin_json(0, "/config_dump")
            .is_ok_and(|d| d["control"]["connected"] == true)),
        "the stream resumes"
    );
    assert!(
        eventually(Duration::from_secs(20), || s
            .who("client", &echo2)
            .is_ok_and(|w| w.0 == "echo-2")),
        "across nodes once the CA is back"
    );
    let log = b.agent_log(0);
    let resumed = log
        .lines()
        .rfind(|l| l.contains("subscribed to the control plane"))
        .unwrap_or_default();
    assert!(
        !resumed.contains("\"resumed_resources\":0"),
        "resumed from the saved state: {resumed}"
    );
}
