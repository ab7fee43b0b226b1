//! Small helpers around the system tools the box drives (iproute2, mount).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

/// Runs a command, failing with its stderr.
pub fn run(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `ip` once per line (`ip -batch` cannot switch netns per line).
pub fn ip_batch(lines: &[String]) -> Result<()> {
    for l in lines {
        let args: Vec<&str> = l.split_whitespace().collect();
        run("ip", &args)?;
    }
    Ok(())
}

pub fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    if let Ok(mut f) = fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    u32::from_le_bytes(b)
}

pub fn cgroup2_root() -> Result<PathBuf> {
    ferry_ebpf::cgroup::cgroup2_mount().context("cgroup v2 is required (no cgroup2 mount found)")
}

/// Mounts bpffs at /sys/fs/bpf if nothing is there yet.
pub fn ensure_bpffs() -> Result<()> {
    let p = Path::new("/sys/fs/bpf");
    if ferry_ebpf::is_bpffs(p) && fs::read_to_string("/proc/self/mounts")?.contains(" /sys/fs/bpf bpf ") {
        return Ok(());
    }
    fs::create_dir_all(p)?;
    run("mount", &["-t", "bpf", "bpf", "/sys/fs/bpf"]).context("mounting bpffs at /sys/fs/bpf")?;
    Ok(())
}

/// Removes a cgroup tree (children first; each must be empty of processes).
pub fn remove_cgroup_tree(p: &Path) {
    if let Ok(rd) = fs::read_dir(p) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    if let Ok(procs) = fs::read_to_string(p.join("cgroup.procs")) {
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            // SAFETY: kill(2) on a pid read from this box's own cgroup.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    for _ in 0..50 {
        if fs::remove_dir(p).is_ok() || !p.exists() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
