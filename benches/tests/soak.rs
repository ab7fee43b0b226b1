//! The soak's quick version (`ferry-bench soak --quick`) runs on the
//! cluster-in-a-box and writes its report into a temporary directory (never
//! over docs/). Correctness is asserted (no failure, every round trip run,
//! echoes intact, every change applied, the agent handed over); speed and
//! memory figures are only reported.

#[test]
fn quick_soak_loses_nothing_through_churn_and_an_agent_handover() {
    ferry_box::require_root();
    let dir = std::env::temp_dir().join(format!("ferry-soak-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("report");
    let bins = ferry_box::default_bin_dir();
    let st = std::process::Command::new(bins.join("ferry-bench"))
        .args(["soak", "--quick", "--out", out.to_str().unwrap()])
        .env("FERRY_BIN_DIR", &bins)
        .status()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(out.with_extension("json")).unwrap())
        .expect("the report is written, passed or not");
    let shown = format!("reasons {}, failures {}", report["reasons"], report["failure_samples"]);
    assert!(st.success(), "{shown}");
    assert_eq!(report["passed"], true, "{shown}");
    assert_eq!(report["failures"], 0, "{shown}");
    assert_eq!(report["requests_expected"], 20_000);
    assert_eq!(report["requests"], report["requests_expected"], "{shown}");
    // Every class and placement ran, with percentiles.
    let classes = report["classes"].as_array().unwrap();
    assert_eq!(classes.len(), 12, "{}", report["classes"]);
    for c in classes {
        assert!(
            c["requests"].as_u64().unwrap() > 0 && c["p50_us"].as_u64().unwrap() > 0,
            "{c}"
        );
    }
    // Checksummed echoes: all intact, bytes counted.
    assert_eq!(report["echo_ok"], true, "{}", report["echoes"]);
    assert!(report["bytes_checked"].as_u64().unwrap() >= 3 * 2 * (4 << 20));
    // Every hold answered in full, same node and across nodes.
    let holds = report["holds"].as_array().unwrap();
    assert!(holds.len() >= 2, "{}", report["holds"]);
    for h in holds {
        assert_eq!(h["answered"], h["conns"], "{h}");
        assert!(h["error"].is_null(), "{h}");
    }
    assert_eq!(
        holds.iter().map(|h| h["conns"].as_u64().unwrap()).take(2).sum::<u64>(),
        500
    );
    // The churn: five steps, each applied.
    let steps: Vec<&str> = report["churn"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            assert_eq!(c["ok"], true, "{c}");
            c["step"].as_str().unwrap()
        })
        .collect();
    assert_eq!(
        steps,
        [
            "endpoints scaled up",
            "route weights changed",
            "agent restart",
            "policy applied",
            "endpoints scaled down"
        ]
    );
    // The handover happened: a new agent serves node 1.
    let restart = &report["restart"];
    let (old, new) = (
        restart["old_pid"].as_u64().unwrap(),
        restart["new_pid"].as_u64().unwrap(),
    );
    assert!(old > 0 && new > 0 && old != new, "{restart}");
    // RSS followed on both nodes (figures only reported).
    let samples = report["rss_samples"].as_array().unwrap();
    for node in [0, 1] {
        assert!(
            samples.iter().any(|s| s["node"] == node),
            "no RSS samples of node {node}"
        );
    }
    let rss = report["rss"].as_array().unwrap();
    assert!(
        rss.len() == 2 && rss.iter().all(|r| r["baseline_kib"].as_u64().unwrap() > 0),
        "{}",
        report["rss"]
    );
    let md = std::fs::read_to_string(out.with_extension("md")).unwrap();
    assert!(
        md.contains("cargo xtask soak --quick") && md.contains("Round trips by class"),
        "{md}"
    );
    eprintln!("{md}");
    let _ = std::fs::remove_dir_all(dir);
}
