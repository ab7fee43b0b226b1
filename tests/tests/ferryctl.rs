//! `ferryctl check` on this machine (no box needed; root for the BPF probes).

use std::process::Command;

fn check(args: &[&str]) -> (Option<i32>, serde_json::Value) {
    ferry_box::require_root();
    // As the agent's environment would be: bpffs mounted (the box does the same).
    ferry_box::sys::ensure_bpffs().unwrap();
    let bin = ferry_box::default_bin_dir().join("ferryctl");
    let out = Command::new(bin)
        .arg("check")
        .args(args)
        .args(["-o", "json"])
        .output()
        .unwrap();
    (out.status.code(), serde_json::from_slice(&out.stdout).unwrap())
}

#[test]
fn check_passes_here_and_probes_every_program_by_loading_it() {
    let (code, rows) = check(&[]);
    let rows = rows.as_array().unwrap();
    assert_eq!(code, Some(0), "{rows:?}");
    assert!(
        rows.iter().all(|r| r["ok"] == true && r["remedy"].is_null()),
        "{rows:?}"
    );
    let programs: Vec<_> = rows
        .iter()
        .filter(|r| r["check"].as_str().unwrap().starts_with("program ferry_"))
        .collect();
    assert_eq!(programs.len(), 9, "{rows:?}");
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
