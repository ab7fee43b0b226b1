//! The agent's own `sockops` hook (`ferry_agent_ops`, which records the
//! agent's deliveries in `ferry_delivery`), for real (root): pinned per agent
//! cgroup, so an agent taking over from another cgroup does not detach the
//! draining agent's hook; swapped (not doubled) in the same cgroup; removed
//! only once its cgroup is gone. Own cgroups and pins, removed when the test
//! ends, also on failure.

use std::{
    collections::BTreeSet,
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::Command,
};

use ferry_ebpf::{maps::Config, Redirector};

const PIN_ROOT: &str = "/sys/fs/bpf";

struct World {
    node: String,
    cgroups: PathBuf,
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = ferry_ebpf::remove_node_pins(&Path::new(PIN_ROOT).join(&self.node));
        for c in ["a", "b"] {
            let _ = fs::remove_dir(self.cgroups.join(c));
        }
        let _ = fs::remove_dir(&self.cgroups);
    }
}

fn hooks(node: &str) -> BTreeSet<String> {
    fs::read_dir(Path::new(PIN_ROOT).join(node).join("links/agent"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// How many times `ferry_agent_ops` is attached to cgroup `cg` (bpftool).
fn attached(cg: &Path) -> usize {
    let out = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(cg)
        .output()
        .expect("bpftool runs");
    assert!(out.status.success(), "bpftool cgroup show {}", cg.display());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.split_whitespace().any(|w| w == "ferry_agent_ops"))
        .count()
}

fn ino(p: &Path) -> u64 {
    fs::metadata(p).unwrap().ino()
}

#[test]
fn the_agent_hook_is_pinned_per_cgroup_and_pruned_once_its_cgroup_is_gone() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "needs root (`sudo cargo xtask test`)");
    let id = std::process::id() % 100_000;
    let w = World {
        node: format!("agent-hook-test-{id}"),
        cgroups: ferry_ebpf::cgroup::cgroup2_mount()
            .expect("cgroup2 mounted")
            .join(format!("ferry-agent-hook-test-{id}")),
    };
    let (a, b) = (w.cgroups.join("a"), w.cgroups.join("b"));
    fs::create_dir_all(&a).unwrap();
    fs::create_dir_all(&b).unwrap();
    let cfg = Config {
        agent_mark: 0x400,
        deliver_mark: 0x600,
        ..Config::default()
    };
    let (hook_a, hook_b) = (format!("sockops-{}", ino(&a)), format!("sockops-{}", ino(&b)));

    // The old agent in cgroup a, the new one in cgroup b (a surge pod).
    let mut old = Redirector::load(Path::new(PIN_ROOT), &w.node, cfg).unwrap();
    old.attach_agent_cgroup(&a).unwrap();
    let mut new = Redirector::load(Path::new(PIN_ROOT), &w.node, cfg).unwrap();
    new.attach_agent_cgroup(&b).unwrap();
    assert_eq!(hooks(&w.node), BTreeSet::from([hook_a.clone(), hook_b.clone()]));
    assert_eq!((attached(&a), attached(&b)), (1, 1), "the old agent keeps its hook");

    // A restart in the same cgroup swaps its hook: still one.
    new.attach_agent_cgroup(&b).unwrap();
    assert_eq!(attached(&b), 1, "swapped, not doubled");

    // Pruning while the old agent's cgroup lives (it may be draining): kept.
    new.prune_stale_links();
    assert_eq!(hooks(&w.node), BTreeSet::from([hook_a.clone(), hook_b.clone()]));
    assert_eq!(attached(&a), 1);

    // Its cgroup gone: its pin goes, ours stays (positive control).
    drop(old);
    fs::remove_dir(&a).unwrap();
    new.prune_stale_links();
    assert_eq!(hooks(&w.node), BTreeSet::from([hook_b]));
    assert_eq!(attached(&b), 1);
}
