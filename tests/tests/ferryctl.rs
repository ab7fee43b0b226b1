//! `ferryctl check` on this machine (no box needed; root for the BPF probes).

use std::process::Command;

fn check(args: &[&str]) -> (Option<i32>, serde_json::Value) {
    check_with(args, None)
}

/// `ferryctl check`, with `FERRY_TC_ATTACH` set to `tc` if given.
fn check_with(args: &[&str], tc: Option<&str>) -> (Option<i32>, serde_json::Value) {
    ferry_box::require_root();
    // As the agent's environment would be: bpffs mounted (the box does the same).
    ferry_box::sys::ensure_bpffs().unwrap();
    let bin = ferry_box::default_bin_dir().join("ferryctl");
    let mut cmd = Command::new(bin);
    if let Some(tc) = tc {
        cmd.env("FERRY_TC_ATTACH", tc);
    }
    let out = cmd.arg("check").args(args).args(["-o", "json"]).output().unwrap();
    (out.status.code(), serde_json::from_slice(&out.stdout).unwrap())
}

#[test]
fn check_passes_here_and_probes_every_program_by_loading_and_attaching_it() {
    // Both tc attach modes: TCX (this kernel's), and netlink as on 5.10-6.5.
    for tc in [None, Some("netlink")] {
        let (code, rows) = check_with(&[], tc);
        let rows = rows.as_array().unwrap();
        assert_eq!(code, Some(0), "{tc:?}: {rows:?}");
        assert!(
            rows.iter().all(|r| r["ok"] == true && r["remedy"].is_null()),
            "{rows:?}"
        );
        let programs: Vec<_> = rows
            .iter()
            .filter(|r| r["check"].as_str().unwrap().starts_with("program ferry_"))
            .collect();
        assert_eq!(programs.len(), 9, "{rows:?}");
        assert!(
            programs
                .iter()
                .all(|r| r["detail"].as_str().is_some_and(|d| d.contains("attaches"))),
            "every program attached, not only loaded: {programs:?}"
        );
    }
    // The throwaways are gone: no scratch cgroup, nothing on the host's lo.
    let cg = std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .chain(std::fs::read_dir("/sys/fs/cgroup/unified").into_iter().flatten())
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("ferry-probe-"));
    assert!(!cg, "a scratch cgroup was left behind");
    let qdisc = Command::new("tc")
        .args(["qdisc", "show", "dev", "lo"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&qdisc.stdout).contains("clsact"),
        "the probe's clsact stayed on the host's lo"
    );
}

#[test]
fn check_reports_a_missing_bpffs_and_cgroup_root_with_remedies() {
    let (code, rows) = check(&["--pin-root", "/tmp", "--cgroup-root", "/nonexistent/kubepods"]);
    assert_eq!(code, Some(5));
    let failed: Vec<_> = rows.as_array().unwrap().iter().filter(|r| r["ok"] == false).collect();
    let by = |name: &str| {
        failed
            .iter()
            .find(|r| r["check"] == name)
            .unwrap_or_else(|| panic!("{name} not failed: {failed:?}"))
    };
    assert!(by("bpffs")["remedy"]
        .as_str()
        .unwrap()
        .contains("mount -t bpf bpf /sys/fs/bpf"));
    assert!(by("pod cgroup root")["remedy"]
        .as_str()
        .unwrap()
        .contains("--cgroup-root"));
}
