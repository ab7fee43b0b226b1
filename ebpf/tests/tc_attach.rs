//! `tc` on a pod's host-side veth, for real (root): the netlink path that
//! kernels without TCX (5.10-6.5) take, forced on this kernel. Each test
//! runs in a thread of its own in a fresh network namespace (gone with the
//! thread), with the veth's other end in a named one and its own cgroup and
//! pins, all removed when the test ends, also on failure. Checked with
//! `tc(8)` and the programs' own counters:
//! - the clsact qdisc is added, the filters are there and count, and both go
//!   at unenroll, also when a later agent run unenrolls;
//! - a qdisc that was there, or that another filter still uses, is kept;
//! - positive control: this kernel's default (TCX) adds no qdisc and counts too.

use std::{
    net::{Ipv4Addr, TcpListener, UdpSocket},
    os::fd::AsFd,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use ferry_ebpf::{
    loader::TcAttach,
    maps::{self, Traffic},
    pinned::Pinned,
    PodHooks, Redirector,
};

const PIN_ROOT: &str = "/sys/fs/bpf";

/// Fails clearly when not root (namespaces, qdiscs and BPF need it).
fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the tc attach tests must run as root (`sudo cargo xtask test`)"
    );
}

/// Runs `cmd` (in the calling thread's netns); its stdout, or a failure.
fn run(cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).output().expect("sh runs");
    assert!(
        out.status.success(),
        "`{cmd}`: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One test's world: a veth pair whose host end (`host`, 10.254.`net`.1)
/// is in the test thread's netns and whose pod end (10.254.`net`.2) is in
/// netns `peer`; a cgroup; and the node's pins. Dropped: all removed.
struct World {
    host: String,
    peer: String,
    net: u8,
    node: String,
    cgroup: PathBuf,
}

impl World {
    /// Call from the test thread after [`fresh_netns`].
    fn new(tag: char, net: u8) -> Self {
        let id = std::process::id() % 100_000;
        let w = Self {
            host: format!("ftc{id}{tag}h"),
            peer: format!("ferry-tc-{id}-{tag}"),
            net,
            node: format!("tc-test-{id}-{tag}"),
            cgroup: ferry_ebpf::cgroup::cgroup2_mount()
                .expect("cgroup2 mounted")
                .join(format!("ferry-tc-test-{id}-{tag}")),
        };
        // Leftovers of an earlier, killed run go first.
        let _ = Command::new("ip").args(["netns", "del", &w.peer]).output();
        let _ = ferry_ebpf::remove_node_pins(&Path::new(PIN_ROOT).join(&w.node));
        run(&format!(
            "ip link set lo up && ip netns add {p} && ip link add {h} type veth peer name {h}p && \
             ip link set {h}p netns {p} && ip addr add 10.254.{n}.1/30 dev {h} && ip link set {h} up && \
             ip -n {p} addr add 10.254.{n}.2/30 dev {h}p && ip -n {p} link set {h}p up && ip -n {p} link set lo up",
            p = w.peer,
            h = w.host,
            n = net
        ));
        std::fs::create_dir_all(&w.cgroup).expect("a test cgroup");
        w
    }

    fn load(&self, mode: Option<TcAttach>) -> Redirector {
        let mut r = Redirector::load(Path::new(PIN_ROOT), &self.node, maps::Config::default()).expect("loads");
        if let Some(m) = mode {
            r.set_tc_attach(m);
        }
        r
    }

    fn enroll(&self, r: &mut Redirector) {
        let netns = std::fs::File::open("/proc/thread-self/ns/net").unwrap();
        let listener = TcpListener::bind("0.0.0.0:0").unwrap();
        r.enroll(&PodHooks {
            uid: "pod-a",
            pod_id: 1,
            cgroup: &self.cgroup,
            netns: netns.as_fd(),
            netns_cookie: 0xfe77_0000 + u64::from(self.net),
            ip: Ipv4Addr::new(10, 254, self.net, 2),
            host_veth: Some(&self.host),
            inbound_listener: &listener,
        })
        .expect("enrolls");
    }

    fn qdiscs(&self) -> String {
        run(&format!("tc qdisc show dev {}", self.host))
    }

    fn has_clsact(&self) -> bool {
        self.qdiscs().contains("clsact")
    }

    /// The filters of `dir` (ingress, egress), as `tc` lists them.
    fn filters(&self, dir: &str) -> String {
        run(&format!("tc filter show dev {} {dir}", self.host))
    }

    /// The pod's counters, read from the pins as ferryctl does.
    fn traffic(&self) -> Traffic {
        // Not /sys/class/net: sysfs shows the netns it was mounted from.
        let name = std::ffi::CString::new(self.host.as_str()).unwrap();
        // SAFETY: a NUL-terminated name that outlives the call.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert_ne!(ifindex, 0, "{} exists", self.host);
        Pinned::open(Path::new(PIN_ROOT), &self.node)
            .unwrap()
            .traffic()
            .unwrap()
            .into_iter()
            .find(|r| r.ifindex == ifindex)
            .map(|r| r.traffic)
            .unwrap_or_default()
    }

    /// Sends datagrams to the pod end until both directions have counted
    /// (ARP out and back; the pod's ICMP port-unreachable).
    fn counts(&self) -> bool {
        let before = self.traffic();
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            let _ = s.send_to(b"ferry", (Ipv4Addr::new(10, 254, self.net, 2), 9));
            std::thread::sleep(Duration::from_millis(50));
            let t = self.traffic();
            if t.tx_packets > before.tx_packets && t.rx_packets > before.rx_packets {
                return true;
            }
        }
        false
    }
}

impl Drop for World {
    fn drop(&mut self) {
        // The pod end goes with its netns, and the host end with it.
        let _ = Command::new("ip").args(["netns", "del", &self.peer]).output();
        let _ = ferry_ebpf::remove_node_pins(&Path::new(PIN_ROOT).join(&self.node));
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

/// Runs `f` on a thread of its own in a fresh network namespace (which
/// goes when the thread ends), failing the test if `f` fails.
fn in_fresh_netns(f: impl FnOnce() + Send + 'static) {
    require_root();
    let t = std::thread::spawn(move || {
        // SAFETY: unshare(2) affects only this thread, which owns nothing
        // that depends on its network namespace yet.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
        f()
    });
    if let Err(p) = t.join() {
        std::panic::resume_unwind(p);
    }
}

#[test]
fn netlink_adds_clsact_counts_and_removes_it() {
    in_fresh_netns(|| {
        let w = World::new('a', 201);
        assert!(!w.has_clsact(), "{}", w.qdiscs());
        let mut r = w.load(Some(TcAttach::Netlink));
        assert_eq!(r.tc_attach(), TcAttach::Netlink);
        w.enroll(&mut r);
        assert!(w.has_clsact(), "clsact added: {}", w.qdiscs());
        let (ingress, egress) = (w.filters("ingress"), w.filters("egress"));
        assert!(
            ingress.contains("ferry_tc_ingress") && ingress.contains("direct-action"),
            "{ingress}"
        );
        assert!(egress.contains("ferry_tc_egress"), "{egress}");
        assert!(w.counts(), "the filters count: {:?}", w.traffic());

        // A later agent run (programs reloaded, pins reused) enrolls the
        // pod again: its filters replace the earlier ones, never doubled.
        drop(r);
        assert!(
            w.filters("ingress").contains("ferry_tc_ingress"),
            "netlink filters outlive the agent, as pins do"
        );
        let mut r = w.load(Some(TcAttach::Netlink));
        w.enroll(&mut r);
        let ingress = w.filters("ingress");
        let filters = |s: &str, name: &str| s.lines().filter(|l| l.contains(name)).count();
        assert_eq!(filters(&ingress, "ferry_tc_ingress"), 1, "{ingress}");
        assert_eq!(filters(&w.filters("egress"), "ferry_tc_egress"), 1);
        assert!(w.counts(), "{:?}", w.traffic());

        // This run did not add the qdisc, but an earlier one did: it goes.
        r.unenroll("pod-a").unwrap();
        assert_eq!(w.filters("ingress").trim(), "");
        assert_eq!(w.filters("egress").trim(), "");
        assert!(!w.has_clsact(), "clsact removed: {}", w.qdiscs());
        assert!(
            !Path::new(PIN_ROOT).join(&w.node).join("links/pod-a").exists(),
            "the pod's link directory (and its marker) gone"
        );
    });
}

#[test]
fn netlink_keeps_a_qdisc_it_did_not_add_or_that_others_use() {
    in_fresh_netns(|| {
        let w = World::new('b', 202);
        // There before Ferry: "already exists" is fine, and it stays.
        run(&format!("tc qdisc add dev {} clsact", w.host));
        let mut r = w.load(Some(TcAttach::Netlink));
        w.enroll(&mut r);
        assert!(w.filters("ingress").contains("ferry_tc_ingress"));
        assert!(w.counts(), "{:?}", w.traffic());
        r.unenroll("pod-a").unwrap();
        assert_eq!(w.filters("ingress").trim(), "");
        assert!(w.has_clsact(), "not Ferry's: kept: {}", w.qdiscs());

        // Added by Ferry, but another filter hangs from it at unenroll: kept,
        // the other filter untouched; Ferry's own are gone.
        run(&format!("tc qdisc del dev {} clsact", w.host));
        w.enroll(&mut r);
        assert!(w.has_clsact());
        run(&format!(
            "tc filter add dev {} ingress prio 1 protocol ip u32 match ip dst 10.0.0.0/8",
            w.host
        ));
        r.unenroll("pod-a").unwrap();
        let ingress = w.filters("ingress");
        assert!(w.has_clsact(), "in use: kept: {}", w.qdiscs());
        assert!(ingress.contains("u32") && !ingress.contains("ferry_tc"), "{ingress}");
        assert!(!w.filters("egress").contains("ferry_tc"));
    });
}

#[test]
fn tcx_by_default_here_adds_no_qdisc_and_counts() {
    in_fresh_netns(|| {
        // The decision itself (`FERRY_TC_ATTACH` is not set by the test runner).
        assert_eq!(TcAttach::for_kernel(), TcAttach::Tcx, "this kernel has TCX (6.6+)");
        assert_eq!(TcAttach::parse("netlink"), Ok(Some(TcAttach::Netlink)));
        assert_eq!(TcAttach::parse(" TCX "), Ok(Some(TcAttach::Tcx)));
        assert_eq!(TcAttach::parse("auto"), Ok(None));
        assert_eq!(TcAttach::parse(""), Ok(None));
        assert_eq!(
            TcAttach::parse("clsact").unwrap_err().to_string(),
            "\"clsact\" is not tcx, netlink or auto"
        );
        let w = World::new('c', 203);
        let mut r = w.load(Some(TcAttach::for_kernel()));
        w.enroll(&mut r);
        assert!(!w.has_clsact(), "TCX needs no qdisc: {}", w.qdiscs());
        assert_eq!(w.filters("ingress").trim(), "", "no netlink filter");
        assert!(w.counts(), "{:?}", w.traffic());
        r.unenroll("pod-a").unwrap();
        assert!(!w.has_clsact());
    });
}
