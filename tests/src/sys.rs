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

/// A `/proc/<pid>/status` field given in kB (`VmRSS`, `RssAnon`, `RssFile`,
/// ...) in KiB, or a count (`Threads`); 0 when the process or field is gone.
pub fn proc_status(pid: u32, field: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .strip_prefix(':')?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// VmRSS of a process, in KiB (0 when it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    proc_status(pid, "VmRSS")
}

/// Open file descriptors of a process (0 when it is gone).
pub fn fd_count(pid: u32) -> u64 {
    fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64)
}

/// How far an agent's RSS may stay above its baseline once a burst of
/// connections is over: max(50 %, 48 MiB). glibc keeps part of the heap a
/// burst used in pieces, even trimmed (`ferry_heap_in_use_bytes` comes back;
/// RSS does not all the way: ferry-agent.rs, the allocator).
pub fn rss_allowance_kib(baseline_kib: u64) -> u64 {
    (baseline_kib / 2).max(48 * 1024)
}

/// How far an agent's heap in use may stay above its baseline once a burst
/// is over, what some maps keep grown: max(50 %, 4 MiB). Beyond it, state is
/// kept per connection that went away: a leak.
pub fn heap_allowance_kib(baseline_kib: u64) -> u64 {
    (baseline_kib / 2).max(4 * 1024)
}
