//! The sample app's HTTP, gRPC, WebSocket and banner modes on 127.0.0.1
//! (no mesh, no root): the `ferry-workload` binary as the box runs it, each
//! server on a free port, every client and raw read under a deadline.
//! Also: `examples/bookinfo` starts the HTTP app with its upstreams' VIPs.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_ferry-workload");

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A server process, killed when dropped.
struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `ferry-workload MODE serve --name NAME --port <free> EXTRA...` and
/// waits until its port accepts.
fn server(mode: &str, name: &str, extra: &[&str]) -> Server {
    let port = free_port();
    let child = Command::new(BIN)
        .args([mode, "serve", "--name", name, "--port", &port.to_string()])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let s = Server { child, port };
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{name} did not start on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
    s
}

fn url(s: &Server) -> String {
    format!("http://127.0.0.1:{}", s.port)
}

/// Runs a client to completion (killed after 30 s) and parses its JSON line.
fn run(args: &[&str]) -> Value {
    let mut c = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = c.kill();
            panic!("client {args:?} ran past its deadline");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut out = String::new();
    c.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert!(c.wait().unwrap().success(), "{args:?}: {out}");
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{args:?} printed {out:?}: {e}"))
}

/// One HTTP/1.1 request over a raw socket (`Connection: close`): status,
/// `x-served-by`, the JSON body.
fn get(port: u16, path: &str, headers: &[(&str, &str)]) -> (u16, String, Value) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    parse_response(&resp)
}

fn parse_response(resp: &str) -> (u16, String, Value) {
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or_else(|| panic!("{resp:?}"));
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let served_by = head
        .lines()
        .find_map(|l| l.strip_prefix("x-served-by: "))
        .unwrap_or_default()
        .to_owned();
    (status, served_by, serde_json::from_str(body).unwrap_or(Value::Null))
}

#[test]
fn bookinfo_chain_answers_with_the_nested_pods_and_forwards_trace_headers() {
    let ratings = server("http", "ratings-v1", &[]);
    let details = server("http", "details-v1", &[]);
    let reviews = server(
        "http",
        "reviews-v2",
        &["--version", "v2", "--role", "reviews", "--ratings", &url(&ratings)],
    );
    let page = server(
        "http",
        "productpage-v1",
        &[
            "--role",
            "productpage",
            "--details",
            &url(&details),
            "--reviews",
            &url(&reviews),
            "--also-tcp",
        ],
    );
    let (status, by, v) = get(
        page.port,
        "/productpage",
        &[
            ("user", "jason"),
            ("x-request-id", "rid-1"),
            ("x-b3-traceid", "abc"),
            ("x-other", "no"),
        ],
    );
    assert_eq!((status, by.as_str()), (200, "productpage-v1"), "{v}");
    assert_eq!(v["pod"], "productpage-v1");
    assert_eq!(v["path"], "/productpage");
    assert_eq!(v["authority"], "test");
    let (d, r) = (&v["calls"][0], &v["calls"][1]);
    assert_eq!(d["body"]["pod"], "details-v1", "{v}");
    assert_eq!(d["body"]["path"], "/details/0");
    assert_eq!(r["body"]["pod"], "reviews-v2", "{v}");
    assert_eq!(r["body"]["version"], "v2");
    assert_eq!(r["body"]["calls"][0]["body"]["pod"], "ratings-v1", "{v}");
    assert_eq!(r["body"]["calls"][0]["body"]["path"], "/ratings/0");
    for seen in [&d["body"]["headers"], &r["body"]["calls"][0]["body"]["headers"]] {
        assert_eq!(seen["user"], "jason", "{seen}");
        assert_eq!(seen["x-request-id"], "rid-1", "{seen}");
        assert_eq!(seen["x-b3-traceid"], "abc", "{seen}");
        assert!(
            seen.get("x-other").is_none(),
            "only the listed headers are forwarded: {seen}"
        );
    }
    // The load client counts who answered, nested pods included.
    let out = run(&[
        "http",
        "client",
        "--url",
        &format!("{}/productpage", url(&page)),
        "--count",
        "20",
        "--concurrency",
        "4",
    ]);
    assert_eq!(out["sent"], 20, "{out}");
    assert_eq!(out["by_status"]["200"], 20, "{out}");
    assert_eq!(out["by_pod"]["productpage-v1"], 20, "{out}");
    for pod in ["details-v1", "reviews-v2", "ratings-v1"] {
        assert_eq!(out["by_nested"][pod], 20, "{out}");
    }
    assert!(out["p50_ms"].as_f64().unwrap() > 0.0, "{out}");
    // The same port still answers the TCP protocol (what the box's tests speak).
    let who = run(&["client", "who", "--to", &format!("127.0.0.1:{}", page.port)]);
    assert_eq!(who["server"], "productpage-v1", "{who}");
    let echo = run(&[
        "client",
        "echo",
        "--to",
        &format!("127.0.0.1:{}", page.port),
        "--bytes",
        "1000000",
    ]);
    assert_eq!(echo["ok"], true, "{echo}");
}

#[test]
fn fail_times_answers_503_then_200_per_request_id() {
    let s = server("http", "details-v1", &[]);
    for attempt in 1..=3u64 {
        let (status, _, v) = get(s.port, "/x", &[("x-fail-times", "2"), ("x-request-id", "only-this")]);
        assert_eq!(status, if attempt <= 2 { 503 } else { 200 }, "{v}");
        assert_eq!(v["attempt"], attempt, "{v}");
    }
    // Another id has its own count; `{i}` gives each request its own id.
    let (status, _, _) = get(s.port, "/x", &[("x-fail-times", "1"), ("x-request-id", "other")]);
    assert_eq!(status, 503);
    let out = run(&[
        "http",
        "client",
        "--url",
        &url(&s),
        "--count",
        "4",
        "--header",
        "x-fail-times:2",
        "--header",
        "x-request-id:same",
    ]);
    assert_eq!(
        (out["by_status"]["503"].as_u64(), out["by_status"]["200"].as_u64()),
        (Some(2), Some(2)),
        "{out}"
    );
    let out = run(&[
        "http",
        "client",
        "--url",
        &url(&s),
        "--count",
        "3",
        "--header",
        "x-fail-times:1",
        "--header",
        "x-request-id:r{i}",
    ]);
    assert_eq!(out["by_status"]["503"], 3, "{out}");
    // x-status and x-delay-ms against the client's own deadline.
    let out = run(&["http", "client", "--url", &url(&s), "--header", "x-status:418"]);
    assert_eq!(out["by_status"]["418"], 1, "{out}");
    let out = run(&[
        "http",
        "client",
        "--url",
        &url(&s),
        "--header",
        "x-delay-ms:2000",
        "--timeout-ms",
        "200",
    ]);
    assert_eq!(out["errors"]["timeout"], 1, "{out}");
    assert!(out["elapsed_ms"].as_u64().unwrap() < 1500, "{out}");
}

#[test]
fn productpage_gives_up_on_slow_reviews_after_3_s_and_still_answers() {
    let details = server("http", "details-v1", &[]);
    let reviews = server("http", "reviews-v1", &["--role", "reviews", "--delay-ms", "3500"]);
    let page = server(
        "http",
        "productpage-v1",
        &[
            "--role",
            "productpage",
            "--details",
            &url(&details),
            "--reviews",
            &url(&reviews),
        ],
    );
    let t = Instant::now();
    let (status, _, v) = get(page.port, "/productpage", &[]);
    let took = t.elapsed();
    assert_eq!(status, 200, "reviews unavailable, the page still answers: {v}");
    assert_eq!(v["calls"][0]["body"]["pod"], "details-v1", "{v}");
    assert_eq!(v["calls"][1]["error"], "timeout", "{v}");
    assert!(v["calls"][1]["body"].is_null(), "{v}");
    assert!(
        took >= Duration::from_millis(2900) && took < Duration::from_millis(3450),
        "{took:?}"
    );
    // The load client sees the failed nested call.
    let out = run(&[
        "http",
        "client",
        "--url",
        &format!("{}/productpage", url(&page)),
        "--timeout-ms",
        "6000",
    ]);
    assert_eq!(out["by_nested"]["error:timeout"], 1, "{out}");
    assert_eq!(out["by_status"]["200"], 1, "{out}");
    // A dead upstream is a connect error, not a hang.
    let gone = free_port();
    let page2 = server(
        "http",
        "productpage-v1",
        &[
            "--role",
            "productpage",
            "--details",
            &format!("http://127.0.0.1:{gone}"),
            "--reviews",
            &url(&details),
        ],
    );
    let (status, _, v) = get(page2.port, "/productpage", &[]);
    assert_eq!(status, 200);
    assert_eq!(v["calls"][0]["error"], "connect", "{v}");
}

#[test]
fn h2c_bodies_and_expect_continue() {
    let page_details = server("http", "details-v1", &[]);
    let page = server(
        "http",
        "productpage-v1",
        &[
            "--role",
            "productpage",
            "--details",
            &url(&page_details),
            "--reviews",
            &url(&page_details),
            "--h2c",
        ],
    );
    let out = run(&[
        "http",
        "client",
        "--url",
        &format!("{}/productpage", url(&page)),
        "--count",
        "10",
        "--concurrency",
        "5",
        "--h2c",
    ]);
    assert_eq!(out["by_status"]["200"], 10, "{out}");
    assert_eq!(out["by_proto"]["HTTP/2.0"], 10, "{out}");
    assert_eq!(
        out["by_nested"]["details-v1"], 20,
        "both upstream calls over h2c: {out}"
    );
    let out = run(&["http", "client", "--url", &url(&page), "--count", "2"]);
    assert_eq!(out["by_proto"]["HTTP/1.1"], 2, "the same port takes HTTP/1.1: {out}");
    // Streamed response bodies, and request bodies over both versions.
    let out = run(&[
        "http",
        "client",
        "--url",
        &url(&page),
        "--header",
        "x-body-bytes:300000",
        "--count",
        "2",
        "--h2c",
    ]);
    assert_eq!(out["bytes"], 600000, "{out}");
    let u = url(&page);
    for h2 in [false, true] {
        let mut args = vec![
            "http",
            "client",
            "--url",
            &u,
            "--method",
            "PUT",
            "--body-bytes",
            "200000",
        ];
        if h2 {
            args.push("--h2c");
        }
        let out = run(&args);
        assert_eq!(out["by_status"]["200"], 1, "{out}");
    }
    // Expect: 100-continue: the interim answer comes before the body is sent.
    let mut s = TcpStream::connect(("127.0.0.1", page.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(
        b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut interim = [0u8; 25];
    s.read_exact(&mut interim).unwrap();
    assert!(
        interim.starts_with(b"HTTP/1.1 100 Continue\r\n"),
        "{:?}",
        String::from_utf8_lossy(&interim)
    );
    s.write_all(b"hello").unwrap();
    let mut rest = String::new();
    s.read_to_string(&mut rest).unwrap();
    let (status, _, v) = parse_response(rest.trim_start_matches("\r\n"));
    assert_eq!(status, 200, "{rest}");
    assert_eq!(v["body"]["bytes"], 5, "{v}");
    assert_eq!(
        v["body"]["sha256"], "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
        "{v}"
    );
}

#[test]
fn websocket_echo() {
    let s = server("http", "ws-1", &[]);
    let out = run(&[
        "http",
        "ws",
        "--url",
        &format!("ws://127.0.0.1:{}/ws", s.port),
        "--count",
        "5",
    ]);
    assert_eq!(out["ok"], true, "{out}");
    assert_eq!(out["status"], 101, "{out}");
    assert_eq!(out["echoed"], 5, "{out}");
    assert_eq!(out["served_by"], "ws-1", "{out}");
}

#[test]
fn grpc_statuses_streams_and_trailers() {
    let s = server("grpc", "grpc-1", &[]);
    let to = format!("127.0.0.1:{}", s.port);
    let out = run(&["grpc", "client", "--to", &to, "--op", "unary"]);
    assert_eq!(out["code"], 0, "{out}");
    assert_eq!(out["messages"][0]["pod"], "grpc-1", "{out}");
    assert_eq!(out["trailers"]["x-pod"], "grpc-1", "{out}");
    let out = run(&[
        "grpc",
        "client",
        "--to",
        &to,
        "--op",
        "unary",
        "--fail-code",
        "14",
        "--fail-message",
        "go away",
    ]);
    assert_eq!(
        (out["code"].as_i64(), out["code_name"].as_str()),
        (Some(14), Some("Unavailable")),
        "{out}"
    );
    assert_eq!(out["message"], "go away", "{out}");
    assert_eq!(out["trailers"]["x-pod"], "grpc-1", "{out}");
    let out = run(&["grpc", "client", "--to", &to, "--op", "server-stream", "--count", "5"]);
    assert_eq!(
        (out["received"].as_u64(), out["code"].as_i64()),
        (Some(5), Some(0)),
        "{out}"
    );
    assert_eq!(out["messages"][4]["seq"], 4, "{out}");
    assert_eq!(out["trailers"]["x-pod"], "grpc-1", "{out}");
    assert_eq!(out["trailers"]["grpc-status"], "0", "{out}");
    let out = run(&[
        "grpc",
        "client",
        "--to",
        &to,
        "--op",
        "server-stream",
        "--count",
        "2",
        "--fail-code",
        "8",
    ]);
    assert_eq!(
        (out["received"].as_u64(), out["code"].as_i64()),
        (Some(2), Some(8)),
        "{out}"
    );
    let out = run(&[
        "grpc",
        "client",
        "--to",
        &to,
        "--op",
        "bidi",
        "--count",
        "4",
        "--fail-code",
        "9",
    ]);
    assert_eq!(
        (out["received"].as_u64(), out["code"].as_i64()),
        (Some(4), Some(9)),
        "{out}"
    );
    assert_eq!(out["messages"][3]["message"], "msg-3", "{out}");
    assert_eq!(out["trailers"]["x-pod"], "grpc-1", "{out}");
    // A server that is not there: a transport error, no status, within the deadline.
    let out = run(&[
        "grpc",
        "client",
        "--to",
        &format!("127.0.0.1:{}", free_port()),
        "--op",
        "unary",
        "--timeout-ms",
        "2000",
    ]);
    assert!(out["code"].is_null() && out["error"].as_str().is_some(), "{out}");
}

#[test]
fn banner_client_times_the_servers_first_words() {
    let s = server("banner", "smtp-1", &[]);
    let out = run(&[
        "banner",
        "client",
        "--to",
        &format!("127.0.0.1:{}", s.port),
        "--timeout-ms",
        "2000",
    ]);
    assert_eq!(out["banner"], "220 smtp-1 ready", "{out}");
    assert!(out["ms_to_banner"].as_u64().unwrap() < 1000, "{out}");
    // The server echoes lines after the banner.
    let mut c = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(b"HELO x\r\n").unwrap();
    let mut buf = vec![0u8; 64];
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("HELO x\r\n") {
        let n = c.read(&mut buf).unwrap();
        assert!(n > 0, "{:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    // An HTTP server never speaks first: the client reports a timeout.
    let quiet = server("http", "quiet", &[]);
    let out = run(&[
        "banner",
        "client",
        "--to",
        &format!("127.0.0.1:{}", quiet.port),
        "--timeout-ms",
        "300",
    ]);
    assert_eq!(out["error"], "timeout", "{out}");
    assert!(out["banner"].is_null(), "{out}");
}

#[test]
fn bookinfo_yaml_starts_the_http_app_with_its_upstreams_vips() {
    let spec = ferry_box::manifests::spec_from_dir(&ferry_box::manifests::bookinfo(), 2).unwrap();
    let pods: Vec<(&str, usize)> = spec.pods.iter().map(|p| (p.name.as_str(), p.node)).collect();
    for want in [
        "productpage-v1",
        "details-v1",
        "reviews-v1",
        "reviews-v2",
        "reviews-v3",
        "ratings-v1",
    ] {
        let p = spec
            .pods
            .iter()
            .find(|p| p.name == want)
            .unwrap_or_else(|| panic!("{want} in {pods:?}"));
        assert_eq!(p.serve, [9080], "{want}");
        let app = want.split('-').next().unwrap();
        assert_eq!(p.service_account(), format!("bookinfo-{app}"));
    }
    assert!(
        pods.iter().any(|(_, n)| *n == 0) && pods.iter().any(|(_, n)| *n == 1),
        "{pods:?}"
    );
    let state = ferry_box::BoxState {
        id: "fbtest".into(),
        spec,
        dir: "/nonexistent".into(),
        cgroup: "/nonexistent".into(),
        bin_dir: "/nonexistent".into(),
        agent_pids: vec![],
        server_pids: vec![],
        retired_agent_pids: vec![],
        control_pid: 0,
    };
    let vip = |name: &str| -> Ipv4Addr { state.spec.services.iter().find(|s| s.name == name).unwrap().vip };
    let args = state.workload_args("productpage-v1").unwrap();
    let line = args[0].join(" ");
    assert!(line.starts_with("http serve --name productpage-v1"), "{line}");
    assert!(line.contains("--also-tcp"), "the box's TCP tests keep working: {line}");
    assert!(
        line.contains(&format!("--details http://{}:9080", vip("details"))),
        "{line}"
    );
    assert!(
        line.contains(&format!("--reviews http://{}:9080", vip("reviews"))),
        "{line}"
    );
    for (pod, ratings) in [("reviews-v1", false), ("reviews-v2", true), ("reviews-v3", true)] {
        let line = state.workload_args(pod).unwrap()[0].join(" ");
        assert!(line.contains("--role reviews"), "{line}");
        assert_eq!(
            line.contains(&format!("--ratings http://{}:9080", vip("ratings"))),
            ratings,
            "{line}"
        );
    }
    // A pod without args keeps the TCP protocol server.
    assert_eq!(
        state.workload_args("legacy").unwrap(),
        [["serve", "--name", "legacy", "--port", "8080"]]
    );
}
