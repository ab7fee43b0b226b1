//! Finding cgroups the way a kubelet lays them out (cgroup v2).

use std::{
    fs, io,
    path::{Path, PathBuf},
};

/// The cgroup v2 mount point (`/sys/fs/cgroup` or, on hybrid hosts,
/// `/sys/fs/cgroup/unified`).
pub fn cgroup2_mount() -> io::Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts")?;
    parse_cgroup2_mount(&mounts).ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no cgroup2 filesystem mounted"))
}

pub fn parse_cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(dir))
    })
}

/// This process's cgroup v2 directory.
pub fn own_cgroup() -> io::Result<PathBuf> {
    let rel = fs::read_to_string("/proc/self/cgroup")?
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no cgroup v2 entry in /proc/self/cgroup"))?;
    Ok(cgroup2_mount()?.join(rel.trim_start_matches('/')))
}

/// Does a kubelet cgroup dir name belong to pod `uid`? Matches the cgroupfs
/// driver (`pod<uid>`) and the systemd driver (`kubepods-burstable-pod<uid_with_underscores>.slice`).
pub fn is_pod_dir(name: &str, uid: &str) -> bool {
    let systemd = uid.replace('-', "_");
    name == format!("pod{uid}") || name.ends_with(&format!("-pod{systemd}.slice")) || name == format!("pod{systemd}")
}

/// Searches `root` (a few levels deep, as kubepods/<qos>/pod<uid>) for pod `uid`'s cgroup.
pub fn find_pod_cgroup(root: &Path, uid: &str) -> Option<PathBuf> {
    fn walk(dir: &Path, uid: &str, depth: u32) -> Option<PathBuf> {
        for e in fs::read_dir(dir).ok()?.flatten() {
            if !e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                continue;
            }
            let p = e.path();
            if is_pod_dir(&e.file_name().to_string_lossy(), uid) {
                return Some(p);
            }
            if depth > 0 {
                if let Some(found) = walk(&p, uid, depth - 1) {
                    return Some(found);
                }
            }
        }
        None
    }
    walk(root, uid, 3)
}

/// A process in the pod's cgroup tree (to find its netns).
pub fn any_pid(cgroup: &Path) -> Option<u32> {
    if let Ok(s) = fs::read_to_string(cgroup.join("cgroup.procs")) {
        if let Some(pid) = s.lines().find_map(|l| l.trim().parse().ok()) {
            return Some(pid);
        }
    }
    fs::read_dir(cgroup)
        .ok()?
        .flatten()
        .filter(|e| e.path().is_dir())
        .find_map(|e| any_pid(&e.path()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubelet_names() {
        let uid = "1b2c-33";
        assert!(is_pod_dir("pod1b2c-33", uid));
        assert!(is_pod_dir("kubepods-besteffort-pod1b2c_33.slice", uid));
        assert!(!is_pod_dir("pod1b2c-333", uid));
        assert!(!is_pod_dir("cri-containerd-1b2c.scope", uid));
    }

    #[test]
    fn finds_cgroup2_on_hybrid_hosts() {
        let m = "cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(parse_cgroup2_mount(m), Some(PathBuf::from("/sys/fs/cgroup/unified")));
    }
}
