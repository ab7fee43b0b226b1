//! The benchmarks run (quick mode, the `ferry-bench` binary) and write
//! complete reports, into a temporary directory (never over docs/). Their
//! numbers are not checked here: speed targets live in the report, not in tests.

#[test]
fn quick_benchmark_runs_and_writes_the_report() {
    ferry_box::require_root();
    let dir = std::env::temp_dir().join(format!("ferry-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("report");
    let bins = ferry_box::default_bin_dir();
    let st = std::process::Command::new(bins.join("ferry-bench"))
        .args(["bench", "--quick", "--out", out.to_str().unwrap()])
        .env("FERRY_BIN_DIR", &bins)
        .status()
        .unwrap();
    assert!(st.success());
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.with_extension("json")).unwrap()).unwrap();
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 7);
    for r in rows {
        assert!(
            r["echo_gbit_s"].as_f64().unwrap() > 0.0
                && r["rr_p50_us"].as_u64().unwrap() > 0
                && r["rr1k_p90_us"].as_u64().unwrap() > 0
                && r["new_conn1k_p999_us"].as_u64().unwrap() > 0,
            "{r}"
        );
    }
    assert!(
        report["machine"]["agent_rss_kib_after_new_connections"]
            .as_u64()
            .unwrap()
            > 0
    );
    // The standard tools (iperf3, sockperf): every placement measured, and
    // the mesh rows really went through the agents.
    let std_rows = report["std"].as_array().unwrap();
    assert_eq!(std_rows.len(), 5, "{}", report["std"]);
    for r in std_rows {
        let f = |k: &str| r[k].as_f64().unwrap();
        assert!(
            f("iperf1_gbit_s") > 0.0
                && f("iperf4_rev_gbit_s") > 0.0
                && f("pp_p50_us") > 0.0
                && f("ul_p99_us") >= f("ul_p50_us"),
            "{r}"
        );
        let meshed = r["scenario"].as_str().unwrap().starts_with("ferry");
        // iperf3 moved at least 10 MB in each of four runs; the agent saw it
        // all on the mesh rows (positive control), none on the direct ones.
        assert_eq!(f("meshed_bytes") > 10e6, meshed, "{r}");
    }
    let md = std::fs::read_to_string(out.with_extension("md")).unwrap();
    assert!(
        md.contains("| cross-node mTLS, 1 stream (iperf3) |"),
        "the targets table: {md}"
    );
    let splice = report["splice"].as_array().unwrap();
    let shown = &report["splice"];
    assert_eq!(splice.len(), 3);
    assert!(
        splice.iter().all(|r| r["forward_gbit_s"].as_f64().unwrap() > 0.0),
        "{shown}"
    );
    assert!(
        splice[2]["spliced_msgs"].as_u64().unwrap() > 0,
        "splicing really happened: {shown}"
    );
    assert_eq!(splice[1]["spliced_msgs"], 0, "{shown}");
    // HTTP: 9 scenarios x (wrk, h2load), every one answered; the L7 rows
    // went through the agent's HTTP layer, the L4 ones did not.
    let http = report["http"].as_array().unwrap();
    let shown = &report["http"];
    assert_eq!(http.len(), 18, "{shown}");
    for r in http {
        assert!(
            r["req_per_s"].as_f64().unwrap() > 0.0 && r["p50_us"].as_u64().unwrap() > 0,
            "{r}"
        );
        let scenario = r["scenario"].as_str().unwrap();
        let seen = r["l7_requests_seen"].as_u64().unwrap();
        if scenario.starts_with("ferry L7") {
            assert!(seen * 10 >= r["requests"].as_u64().unwrap() * 9, "{r}");
        } else {
            assert_eq!(seen, 0, "{r}");
        }
    }
    let md = std::fs::read_to_string(out.with_extension("md")).unwrap();
    assert!(md.contains("ferry cross-node mTLS") && md.contains("vs direct"));
    assert!(md.contains("splice on"));
    assert!(md.contains("h2load") && md.contains("What the L7 path adds over the L4 path"));
    let svg = std::fs::read_to_string(out.with_extension("svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.matches("<rect").count() == 21,
        "3 bars x 7 scenarios"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn quick_control_plane_benchmark_runs_and_writes_the_report() {
    let dir = std::env::temp_dir().join(format!("ferry-cp-bench-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("report");
    let bins = ferry_box::default_bin_dir();
    let st = std::process::Command::new(bins.join("ferry-bench"))
        .args(["bench-control", "--quick", "--out", out.to_str().unwrap()])
        .env("FERRY_BIN_DIR", &bins)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.with_extension("json")).unwrap()).unwrap();
    let r = &report["report"];
    // Every simulated agent got every change; each holds its pods, the mesh members and the services.
    assert_eq!(r["samples"], 5 * 10, "{r}");
    assert_eq!(r["resources_per_node"], 500 + 1 + 50, "{r}");
    let md = std::fs::read_to_string(out.with_extension("md")).unwrap();
    assert!(md.contains("change → agent p50"), "{md}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn quick_authorization_benchmark_runs_and_writes_the_report() {
    let dir = std::env::temp_dir().join(format!("ferry-authz-bench-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("report");
    let bins = ferry_box::default_bin_dir();
    let st = std::process::Command::new(bins.join("ferry-bench"))
        .args(["bench", "--only", "authz", "--quick", "--out", out.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.with_extension("json")).unwrap()).unwrap();
    let rows = report["rows"].as_array().unwrap();
    // The decisions are the expected ones, over the expected policy sets.
    let verdicts: Vec<(&str, u64)> = rows
        .iter()
        .map(|r| {
            (
                r["verdict"].as_str().unwrap(),
                r["applicable_policies"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        verdicts,
        [
            ("allow", 100),
            ("deny (no_allow_matched)", 100),
            ("allow", 100),
            ("deny (no_allow_matched)", 1000)
        ],
        "{report}"
    );
    assert!(rows.iter().all(|r| r["ns_per_decision"].as_f64().unwrap() > 0.0));
    let md = std::fs::read_to_string(out.with_extension("md")).unwrap();
    assert!(md.contains("ns per decision"), "{md}");
    let _ = std::fs::remove_dir_all(dir);
}
