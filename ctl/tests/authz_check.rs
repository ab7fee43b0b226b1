//! `ferryctl authz check` run as a binary, offline on the Bookinfo
//! policies: table and JSON output, exit 0 on allow and 7 on deny.

use std::process::Command;

fn ferryctl(extra: &[&str]) -> (i32, String, String) {
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/bookinfo-authz.yaml");
    let out = Command::new(env!("CARGO_BIN_EXE_ferryctl"))
        .args([
            "authz",
            "check",
            "--to",
            "default/details-v1",
            "--to-labels",
            "app=details",
        ])
        .args(["--port", "9080", "-f", file])
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn allowed_and_denied_with_the_deciding_policy() {
    let (code, out, err) = ferryctl(&[
        "--from",
        "default/bookinfo-productpage",
        "--method",
        "GET",
        "--path",
        "/details/0",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("allow     default/details-viewer  0     allow   http"),
        "{out}"
    );

    let (code, out, err) = ferryctl(&["--from", "default/bookinfo-reviews", "--method", "GET", "-o", "json"]);
    assert_eq!(code, 7, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["allowed"], false);
    assert_eq!(v["reason"], "no_allow_matched");
    assert_eq!(
        v["source_principal"],
        "spiffe://cluster.local/ns/default/sa/bookinfo-reviews"
    );
    assert!(err.contains("denied: deny no_allow_matched"), "{err}");

    let (code, _, err) = ferryctl(&["--from", "default/x", "--agent", "http://127.0.0.1:1"]);
    assert_eq!(code, 2, "-f and --agent conflict: {err}");
}
