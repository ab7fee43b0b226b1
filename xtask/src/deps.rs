//! System prerequisites: checked every time, installed with apt when missing
//! and running as root. Says exactly what it did.

use std::process::Command;

use anyhow::{bail, Result};

/// (command that proves it is there, Debian package)
const NEEDED: &[(&str, &str)] = &[
    ("clang", "clang"),
    ("llvm-objdump", "llvm"),
    ("/usr/include/bpf/bpf_helpers.h", "libbpf-dev"),
    ("bpftool", "bpftool"),
    ("ip", "iproute2"),
    ("iperf3", "iperf3"),
    ("tcpdump", "tcpdump"),
    ("haproxy", "haproxy"),
    // The bench's HTTP rows: wrk (HTTP/1.1) and h2load (HTTP/2, from nghttp2).
    ("wrk", "wrk"),
    ("h2load", "nghttp2-client"),
    // The bench's standard-tool latency rows.
    ("sockperf", "sockperf"),
];

fn present(what: &str) -> bool {
    if what.starts_with('/') {
        return std::path::Path::new(what).exists();
    }
    Command::new("sh")
        .args(["-c", &format!("command -v {what} >/dev/null 2>&1")])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// The system packages, then the chart's test tools (`chart_tools`).
pub fn ensure() -> Result<()> {
    ensure_packages()?;
    crate::chart_tools::ensure(is_root())
}

fn ensure_packages() -> Result<()> {
    let missing: Vec<&str> = NEEDED.iter().filter(|(c, _)| !present(c)).map(|(_, p)| *p).collect();
    if missing.is_empty() {
        eprintln!("deps: all present (clang, llvm, libbpf-dev, bpftool, iproute2, iperf3, tcpdump, haproxy, wrk, nghttp2-client, sockperf)");
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing packages: {} (run as root to install them, or `apt-get install {}`)",
            missing.join(", "),
            missing.join(" ")
        );
    }
    eprintln!("deps: installing with apt-get: {}", missing.join(" "));
    let ok = Command::new("apt-get").args(["update", "-qq"]).status()?.success()
        && Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()?
            .success();
    if !ok {
        bail!("apt-get install {} failed", missing.join(" "));
    }
    eprintln!("deps: installed {}", missing.join(", "));
    Ok(())
}
