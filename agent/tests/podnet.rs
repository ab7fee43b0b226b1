//! A pod's sysctls under a read-only `/proc/sys`, as container runtimes
//! mount it in unprivileged containers: written through the container's own
//! `/proc` they fail with a reason that names the fix; written through
//! another procfs mount (the node's `/proc/sys/net`, which the chart mounts
//! at `/host/proc/sys/net`, passing `--proc-root=/host/proc`) they land in
//! the pod's netns, and only there.
//!
//! The test re-runs itself under `unshare --mount` with `/proc/sys` bound
//! read-only and a second procfs mounted: that mount namespace is private to
//! the child and goes away with it, whatever happens.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use ferry_agent::{netns::Netns, podnet};

const INNER: &str = "FERRY_TEST_PODNET_HOSTPROC";
const SYSCTLS: [&str; 2] = ["net/ipv4/tcp_fwmark_accept", "net/ipv4/fwmark_reflect"];

#[test]
fn pod_sysctls_are_written_through_another_procfs_when_proc_sys_is_read_only() {
    if let Some(hostproc) = std::env::var_os(INNER) {
        return inner(Path::new(&hostproc));
    }
    assert!(
        rustix::process::geteuid().is_root(),
        "needs root (mount and network namespaces), as `cargo xtask test` runs"
    );
    let dir = std::env::temp_dir().join(format!("ferry-podnet-{}", std::process::id()));
    let (fullproc, hostproc) = (dir.join("fullproc"), dir.join("hostproc"));
    std::fs::create_dir_all(&fullproc).unwrap();
    std::fs::create_dir_all(hostproc.join("sys/net")).unwrap();
    let exe = std::env::current_exe().unwrap();
    // As a runtime does for an unprivileged container: /proc/sys bound over
    // itself, read-only. And, as the chart mounts the node's /proc/sys/net
    // at /host/proc/sys/net, another procfs's sys/net bound there (only
    // that: the rest of the node's /proc stays out of reach).
    let script = format!(
        "mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys && \
         mount -t proc proc {full} && mount --bind {full}/sys/net {host}/sys/net && exec \"$0\" --exact \
         pod_sysctls_are_written_through_another_procfs_when_proc_sys_is_read_only --nocapture --test-threads=1",
        full = fullproc.display(),
        host = hostproc.display()
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .arg(&exe)
        .env(INNER, &hostproc)
        .output()
        .expect("running unshare");
    let _ = std::fs::remove_dir_all(&dir);
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the inner run failed:\n{text}");
    assert!(text.contains("inner: checked"), "the inner run did not check:\n{text}");
}

/// In the child: a fresh netns, the sysctls written both ways.
fn inner(hostproc: &Path) {
    let ns = fresh_netns();
    let read = |root: &Path, name: &str| -> String {
        let path: PathBuf = root.join("sys").join(name);
        ns.run(|| std::fs::read_to_string(&path))
            .unwrap()
            .unwrap()
            .trim()
            .to_owned()
    };
    let own_before: Vec<String> = SYSCTLS
        .iter()
        .map(|n| std::fs::read_to_string(Path::new("/proc/sys").join(n)).unwrap())
        .collect();
    for n in SYSCTLS {
        assert_eq!(read(hostproc, n), "0", "{n} starts at 0 in a new netns");
    }
    // Negative: the container's own /proc/sys is read-only.
    assert!(
        std::fs::write("/proc/sys/net/ipv4/tcp_fwmark_accept", "0").is_err(),
        "/proc/sys is read-only here"
    );
    let e = podnet::set_sysctls(&ns, Path::new("/proc")).unwrap_err().to_string();
    assert!(e.contains("read-only /proc/sys") && e.contains("--proc-root"), "{e}");
    for n in SYSCTLS {
        assert_eq!(read(hostproc, n), "0", "{n} unchanged by the failed write");
    }
    // Positive: through the other procfs, in the pod's netns.
    podnet::set_sysctls(&ns, hostproc).unwrap();
    for n in SYSCTLS {
        assert_eq!(read(hostproc, n), "1", "{n} set in the pod's netns");
    }
    // The test's own netns is left alone.
    let own_after: Vec<String> = SYSCTLS
        .iter()
        .map(|n| std::fs::read_to_string(Path::new("/proc/sys").join(n)).unwrap())
        .collect();
    assert_eq!(own_before, own_after);
    println!("inner: checked");
}

/// A new network namespace, held open by the returned handle (the thread
/// that made it is gone by then).
fn fresh_netns() -> Netns {
    let (tx, rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let t = std::thread::spawn(move || {
        // SAFETY: unshare on this thread only; it moves nothing else.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "unshare: {}", std::io::Error::last_os_error());
        // SAFETY: gettid has no arguments and cannot fail.
        tx.send(unsafe { libc::gettid() }).unwrap();
        // Stay in it until the handle is open.
        let _ = done_rx.recv();
    });
    let tid = rx.recv().unwrap();
    let ns = Netns::open(Path::new(&format!("/proc/self/task/{tid}/ns/net"))).unwrap();
    done_tx.send(()).unwrap();
    t.join().unwrap();
    ns
}
