//! The loader: loads Ferry's object once, owns its programs, maps and links,
//! and offers mesh operations (enroll a pod, set the mesh destinations, read
//! an original destination). Nothing outside this crate touches aya.
//!
//! Pins (per node, so two agents on one kernel never share state):
//! `<pin_root>/<node>/<map>` for every map and `<pin_root>/<node>/links/<owner>/<hook>`
//! for every attachment, so `ferryctl` can read them and a restarted agent
//! finds steering still in place and swaps in its own programs.
//!
//! `tc` goes on a pod's host-side veth one of two ways ([`TcAttach`]): a TCX
//! link (kernel 6.6 and newer), pinned like the rest; or, on older kernels
//! (or forced with `FERRY_TC_ATTACH=netlink`), a netlink filter on a clsact
//! qdisc. A netlink filter is no file descriptor and cannot be pinned: it
//! stays on the veth by itself, and what Ferry did there is recorded by an
//! empty directory beside the pod's pins (`tc-netlink-added-<veth>` when
//! Ferry added the qdisc, `tc-netlink-kept-<veth>` when it was there), so
//! unenrolling, even by a later agent run, detaches the filters and removes
//! a qdisc Ferry added once nothing else hangs from it.

use std::{
    collections::{BTreeMap, HashMap},
    fs, io,
    net::Ipv4Addr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::Mutex,
};

mod clsact;

// bpf_link based cgroup attachments are always "multi"; Single means flags 0.
use aya::{
    maps::{HashMap as BpfHash, MapData, SockHash},
    programs::{
        links::{FdLink, PinnedLink},
        tc::{NlOptions, TcAttachOptions},
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, SchedClassifier, SkLookup, SkMsg, SockOps,
        TcAttachType,
    },
    Ebpf, EbpfLoader,
};

use crate::maps::{Config, Dst, DstKey, InboundKey, InboundPolicy, OrigDst, Pod, SockKey};

/// The compiled programs (built from ebpf/ by build.rs).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ferry.bpf.o"));

/// The object, for layout checks and ferryctl's probes.
pub fn object() -> &'static [u8] {
    OBJECT
}

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error("{0} is not on a bpf filesystem; mount one with `mount -t bpf bpf /sys/fs/bpf`")]
    NoBpfFs(PathBuf),
    #[error("cannot create pin directory {path}: {source}")]
    PinDir { path: PathBuf, source: io::Error },
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("pinning {path}: {reason}")]
    Pin { path: PathBuf, reason: String },
    #[error("map {name} holds at most {capacity} entries; {wanted} wanted (nothing changed)")]
    Full {
        name: &'static str,
        wanted: usize,
        capacity: usize,
    },
    #[error("opening {what} {path}: {source}")]
    Open {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("the clsact qdisc of {veth} (tc through netlink): {source}")]
    Clsact { veth: String, source: io::Error },
}

/// How `tc` programs are attached to pods' host-side veths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcAttach {
    /// A TCX link (kernel 6.6 and newer), pinned like every other hook.
    Tcx,
    /// A netlink filter on the veth's clsact qdisc, which Ferry adds when
    /// missing and removes with its filters when it added it.
    Netlink,
}

impl TcAttach {
    /// The variable that forces a mode: `tcx`, `netlink`, or `auto` (the default).
    pub const ENV: &'static str = "FERRY_TC_ATTACH";

    /// By `FERRY_TC_ATTACH`, else by kernel: TCX from 6.6 on, netlink before.
    pub fn detect() -> Self {
        let forced = std::env::var(Self::ENV).unwrap_or_default();
        match Self::parse(&forced) {
            Ok(Some(m)) => m,
            Ok(None) => Self::for_kernel(),
            Err(e) => {
                let auto = Self::for_kernel();
                tracing::warn!(mode = auto.as_str(), "{}: {e}; attaching tc by kernel", Self::ENV);
                auto
            }
        }
    }

    /// `tcx`, `netlink`; `auto` or empty: none forced.
    pub fn parse(s: &str) -> Result<Option<Self>, UnknownTcAttach> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(None),
            "tcx" => Ok(Some(Self::Tcx)),
            "netlink" => Ok(Some(Self::Netlink)),
            _ => Err(UnknownTcAttach(s.to_owned())),
        }
    }

    /// What this kernel supports: TCX from 6.6 on (as aya decides).
    pub fn for_kernel() -> Self {
        match aya::util::KernelVersion::current() {
            Ok(v) if v >= aya::util::KernelVersion::new(6, 6, 0) => Self::Tcx,
            _ => Self::Netlink,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcx => "tcx",
            Self::Netlink => "netlink",
        }
    }
}

/// A `FERRY_TC_ATTACH` value that names no mode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not tcx, netlink or auto")]
pub struct UnknownTcAttach(pub String);

impl std::fmt::Display for TcAttach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The tc programs and where each goes.
const TC_PROGRAMS: [(&str, TcAttachType, &str); 2] = [
    ("ferry_tc_ingress", TcAttachType::Ingress, "tc_ingress"),
    ("ferry_tc_egress", TcAttachType::Egress, "tc_egress"),
];

/// Marker directories of a netlink attachment (see the module doc).
const TC_MARK_ADDED: &str = "tc-netlink-added-";
const TC_MARK_KEPT: &str = "tc-netlink-kept-";

type Result<T, E = RedirectError> = std::result::Result<T, E>;

fn prog_err(name: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> RedirectError {
    move |source| RedirectError::Program { name, source }
}
fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> RedirectError {
    move |source| RedirectError::Map { name, source }
}

/// Whether `path` (or its nearest existing parent) is on bpffs.
pub fn is_bpffs(path: &Path) -> bool {
    let mut p = path;
    loop {
        if p.exists() {
            break;
        }
        match p.parent() {
            Some(parent) => p = parent,
            None => return false,
        }
    }
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs(2) fills a zeroed, properly sized struct from a valid C path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above; `c` outlives the call.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == BPF_FS_MAGIC
}

/// Loads every program of the object and attaches it where its kind goes,
/// on throwaways: the cgroup programs to an empty cgroup made for this (no
/// process in it), `sk_lookup` to a network namespace of its own and the
/// `tc` programs to that namespace's `lo` (by TCX or netlink, as the agent
/// would on this kernel), `sk_msg` to its sockhash; maps pinned in a scratch
/// directory under `pin_root`. Everything is detached and removed
/// afterwards. A kernel that loads a program but refuses to attach it (a
/// missing attach type, an old tc) is reported here, not at enrolment.
/// Returns each program's name and whether the kernel accepted it.
pub fn probe_programs(pin_root: &Path) -> Vec<(String, Result<(), String>)> {
    // bpffs refuses names with dots.
    let dir = pin_root.join(format!("probe-{}", std::process::id()));
    if let Err(e) = fs::create_dir_all(&dir) {
        return vec![("object".into(), Err(format!("cannot create {}: {e}", dir.display())))];
    }
    let cgroup = cgroup2_root().map(|r| r.join(format!("ferry-probe-{}", std::process::id())));
    let probe_dir = dir.clone();
    let probe_cgroup = cgroup.clone();
    // A thread of its own: it moves to a new network namespace, which goes
    // away with it (and with it the sk_lookup and tc attachments).
    let out = std::thread::spawn(move || probe_in_own_netns(&probe_dir, probe_cgroup.as_deref()))
        .join()
        .unwrap_or_else(|_| vec![("object".into(), Err("the probe thread panicked".into()))]);
    if let Some(c) = cgroup {
        let _ = fs::remove_dir(c);
    }
    let _ = fs::remove_dir_all(&dir);
    out
}

fn probe_in_own_netns(dir: &Path, cgroup: Option<&Path>) -> Vec<(String, Result<(), String>)> {
    // SAFETY: unshare(2) with CLONE_NEWNET only moves this thread (no
    // memory is involved); the thread ends when the probe does.
    let netns = if unsafe { libc::unshare(libc::CLONE_NEWNET) } == 0 {
        fs::File::open("/proc/thread-self/ns/net").map_err(|e| format!("own netns: {e}"))
    } else {
        Err(format!("unshare(CLONE_NEWNET): {}", io::Error::last_os_error()))
    };
    let cg = match cgroup {
        Some(c) => fs::create_dir_all(c)
            .and_then(|()| fs::File::open(c))
            .map_err(|e| format!("scratch cgroup {}: {e}", c.display())),
        None => Err("no cgroup v2 mount".into()),
    };
    let mut bpf = match EbpfLoader::new().default_map_pin_directory(dir).load(OBJECT) {
        Err(e) => return vec![("object".into(), Err(e.to_string()))],
        Ok(b) => b,
    };
    let splice = bpf
        .map("ferry_splice")
        .ok_or_else(|| "no ferry_splice map".to_owned())
        .and_then(|m| SockHash::<_, SockKey>::try_from(m).map_err(|e| e.to_string()))
        .and_then(|m| m.fd().try_clone().map_err(|e| e.to_string()));
    // As the agent will: FERRY_TC_ATTACH if it names a mode, else by kernel.
    let tc = TcAttach::parse(&std::env::var(TcAttach::ENV).unwrap_or_default())
        .ok()
        .flatten()
        .unwrap_or_else(TcAttach::for_kernel);
    let names: Vec<String> = bpf.programs().map(|(n, _)| n.to_owned()).collect();
    let mut rows: Vec<_> = names
        .into_iter()
        .map(|n| {
            let res = probe_one(&mut bpf, &n, cg.as_ref(), netns.as_ref(), splice.as_ref(), tc);
            (n, res)
        })
        .collect();
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    // Dropping the object detaches everything it attached.
    drop(bpf);
    rows
}

/// Loads and attaches one program; the verifier log is long: its last
/// lines, which say why, are kept.
fn probe_one(
    bpf: &mut Ebpf,
    name: &str,
    cg: Result<&fs::File, &String>,
    netns: Result<&fs::File, &String>,
    splice: Result<&aya::maps::sock::SockMapFd, &String>,
    tc: TcAttach,
) -> Result<(), String> {
    use aya::programs::Program;
    let short = |e: &dyn std::fmt::Display| {
        let full = format!("{e:#}");
        let tail: Vec<&str> = full.lines().rev().take(4).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
    };
    fn attach_err(what: &'static str) -> impl Fn(aya::programs::ProgramError) -> String {
        move |e| format!("loads, but attaching to {what} fails: {e}")
    }
    fn need<'f>(r: Result<&'f fs::File, &String>, what: &str) -> Result<&'f fs::File, String> {
        r.map_err(|e| format!("loads; attach not probed ({what}: {e})"))
    }
    match bpf.program_mut(name) {
        Some(Program::CgroupSockAddr(p)) => {
            p.load().map_err(|e| short(&e))?;
            p.attach(need(cg, "cgroup")?, CgroupAttachMode::Single)
                .map(drop)
                .map_err(attach_err("a cgroup"))
        }
        Some(Program::SockOps(p)) => {
            p.load().map_err(|e| short(&e))?;
            p.attach(need(cg, "cgroup")?, CgroupAttachMode::Single)
                .map(drop)
                .map_err(attach_err("a cgroup"))
        }
        Some(Program::CgroupSkb(p)) => {
            p.load().map_err(|e| short(&e))?;
            p.attach(
                need(cg, "cgroup")?,
                CgroupSkbAttachType::Ingress,
                CgroupAttachMode::Single,
            )
            .map(drop)
            .map_err(attach_err("a cgroup"))
        }
        Some(Program::SkLookup(p)) => {
            p.load().map_err(|e| short(&e))?;
            p.attach(need(netns, "network namespace")?)
                .map(drop)
                .map_err(attach_err("a network namespace"))
        }
        Some(Program::SkMsg(p)) => {
            p.load().map_err(|e| short(&e))?;
            let fd = splice.map_err(|e| format!("loads; attach not probed (sockhash: {e})"))?;
            p.attach(fd).map(drop).map_err(attach_err("a sockhash"))
        }
        Some(Program::SchedClassifier(p)) => {
            p.load().map_err(|e| short(&e))?;
            let ty = TC_PROGRAMS
                .iter()
                .find(|(n, _, _)| *n == name)
                .map_or(TcAttachType::Ingress, |(_, ty, _)| *ty);
            match tc {
                TcAttach::Tcx => p
                    .attach_with_options("lo", ty, TcAttachOptions::TcxOrder(Default::default()))
                    .map(drop)
                    .map_err(attach_err("lo by TCX")),
                TcAttach::Netlink => {
                    // The namespace is this probe's own: its qdisc goes with it.
                    let _ = aya::programs::tc::qdisc_add_clsact("lo");
                    p.attach_with_options("lo", ty, TcAttachOptions::Netlink(NlOptions::default()))
                        .map(drop)
                        .map_err(attach_err("lo by netlink (clsact)"))
                }
            }
        }
        Some(_) | None => Ok(()),
    }
}

/// Where a pod's hooks go.
pub struct PodHooks<'a> {
    pub uid: &'a str,
    pub pod_id: u32,
    pub cgroup: &'a Path,
    /// The pod's network namespace (for `sk_lookup`).
    pub netns: std::os::fd::BorrowedFd<'a>,
    pub netns_cookie: u64,
    pub ip: Ipv4Addr,
    pub host_veth: Option<&'a str>,
    pub inbound_listener: &'a dyn AsRawFd,
}

struct Enrolled {
    netns_cookie: u64,
    ip: Ipv4Addr,
    ifindex: Option<u32>,
}

pub struct Redirector {
    bpf: Ebpf,
    dir: PathBuf,
    config: Config,
    pods: HashMap<String, Enrolled>,
    orig: std::sync::Arc<OrigDstTable>,
    tc_attach: TcAttach,
    /// Inode of the cgroup `attach_agent_cgroup` hooked.
    agent_cgroup: Option<u64>,
}

/// The `ferry_orig_dst` map: what the agent reads for every accepted connection.
pub struct OrigDstTable(Mutex<BpfHash<MapData, SockKey, OrigDst>>);

impl OrigDstTable {
    /// Takes (reads and deletes) the record of the connection seen as `key`.
    pub fn take(&self, key: &SockKey) -> Option<OrigDst> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let v = m.get(key, 0).ok()?;
        let _ = m.remove(key);
        Some(v)
    }
}

/// Attaches program `$name` (of type `$ty`) with `$attach` and pins its link
/// as `<dir>/<hook>`; evaluates to the pin path.
macro_rules! attach_pinned {
    ($self:ident, $dir:expr, $ty:ty, $name:expr, $hook:expr, |$p:ident| $attach:expr) => {{
        let $p: &mut $ty = prog(&mut $self.bpf, $name)?;
        let id = $attach.map_err(prog_err($name))?;
        let link: FdLink = $p
            .take_link(id)
            .map_err(prog_err($name))?
            .try_into()
            .map_err(|e| pin_err($dir, e))?;
        pin(link, $dir, $hook)?
    }};
}

impl Redirector {
    /// Loads the object, reusing this node's pinned maps if present.
    pub fn load(pin_root: &Path, node: &str, config: Config) -> Result<Self> {
        if !is_bpffs(pin_root) {
            return Err(RedirectError::NoBpfFs(pin_root.to_owned()));
        }
        let dir = pin_root.join(node);
        fs::create_dir_all(dir.join("links")).map_err(|source| RedirectError::PinDir {
            path: dir.clone(),
            source,
        })?;
        let mut bpf = EbpfLoader::new().default_map_pin_directory(&dir).load(OBJECT)?;

        for name in ["ferry_connect4", "ferry_connect6"] {
            let p: &mut CgroupSockAddr = prog(&mut bpf, name)?;
            p.load().map_err(prog_err(name))?;
        }
        for name in ["ferry_sockops", "ferry_agent_ops"] {
            let p: &mut SockOps = prog(&mut bpf, name)?;
            p.load().map_err(prog_err(name))?;
        }
        let p: &mut SkLookup = prog(&mut bpf, "ferry_sk_lookup")?;
        p.load().map_err(prog_err("ferry_sk_lookup"))?;
        let p: &mut CgroupSkb = prog(&mut bpf, "ferry_mark_delivery")?;
        p.load().map_err(prog_err("ferry_mark_delivery"))?;
        for name in ["ferry_tc_ingress", "ferry_tc_egress"] {
            let p: &mut SchedClassifier = prog(&mut bpf, name)?;
            p.load().map_err(prog_err(name))?;
        }
        // sk_msg is attached to the splice sockhash itself; it only acts on
        // sockets that sockops put there, which it does only with splicing on.
        let splice_fd = {
            let m: SockHash<&MapData, SockKey> =
                SockHash::try_from(bpf.map("ferry_splice").expect("ferry_splice in object"))
                    .map_err(map_err("ferry_splice"))?;
            m.fd().try_clone().map_err(|e| RedirectError::Map {
                name: "ferry_splice",
                source: e.into(),
            })?
        };
        let p: &mut SkMsg = prog(&mut bpf, "ferry_sk_msg")?;
        p.load().map_err(prog_err("ferry_sk_msg"))?;
        p.attach(&splice_fd).map_err(prog_err("ferry_sk_msg"))?;

        let orig = BpfHash::try_from(bpf.take_map("ferry_orig_dst").expect("ferry_orig_dst in object"))
            .map_err(map_err("ferry_orig_dst"))?;
        let mut r = Self {
            bpf,
            dir,
            config,
            pods: HashMap::new(),
            orig: std::sync::Arc::new(OrigDstTable(Mutex::new(orig))),
            tc_attach: TcAttach::detect(),
            agent_cgroup: None,
        };
        r.write_config()?;
        Ok(r)
    }

    /// `max_entries` of map `name` as loaded (a map reused from the pins of
    /// an earlier build keeps its own size); ferry.h's value if unreadable.
    pub fn max_entries(&self, name: &'static str) -> usize {
        let declared = crate::maps::MAP_CAPACITY
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, c)| *c);
        let loaded = self.bpf.map(name).and_then(|m| {
            let data = match m {
                aya::maps::Map::HashMap(d) | aya::maps::Map::SockHash(d) | aya::maps::Map::PerCpuHashMap(d) => d,
                _ => return None,
            };
            data.info().ok().map(|i| i.max_entries())
        });
        if let (Some(l), Some(d)) = (loaded, declared) {
            if l != d {
                tracing::warn!(
                    map = name,
                    loaded = l,
                    declared = d,
                    "a pinned map has another size than ferry.h's"
                );
            }
        }
        loaded.or(declared).unwrap_or(0) as usize
    }

    pub fn pin_dir(&self) -> &Path {
        &self.dir
    }

    /// How `tc` is attached to pods enrolled from now on.
    pub fn tc_attach(&self) -> TcAttach {
        self.tc_attach
    }

    /// Attaches `tc` to pods enrolled from now on with `mode` (the default
    /// is [`TcAttach::detect`]).
    pub fn set_tc_attach(&mut self, mode: TcAttach) {
        self.tc_attach = mode;
    }

    pub fn orig_dst(&self) -> std::sync::Arc<OrigDstTable> {
        self.orig.clone()
    }

    pub fn take_events(&mut self) -> Option<aya::maps::RingBuf<aya::maps::MapData>> {
        self.bpf
            .take_map("ferry_events")
            .and_then(|m| aya::maps::RingBuf::try_from(m).ok())
    }

    fn write_config(&mut self) -> Result<()> {
        let mut m: aya::maps::Array<&mut MapData, Config> =
            aya::maps::Array::try_from(self.bpf.map_mut("ferry_config").expect("ferry_config"))
                .map_err(map_err("ferry_config"))?;
        m.set(0, self.config, 0).map_err(map_err("ferry_config"))
    }

    /// Turns sk_msg splicing on or off for new connections.
    pub fn set_flags(&mut self, flags: u32) -> Result<()> {
        if self.config.flags != flags {
            self.config.flags = flags;
            self.write_config()?;
        }
        Ok(())
    }

    /// `ferry_agent_ops` on the agent's own cgroup: it records the
    /// agent's delivery connections in `ferry_delivery` (so `sk_lookup` passes
    /// them to the app instead of capturing them) and, with splicing on, puts
    /// the agent's end of a spliced pair in the sockhash (see ebpf/ferry.bpf.c).
    ///
    /// Pinned as `links/agent/sockops-<cgroup inode>`: an agent taking over
    /// from one in another cgroup (a DaemonSet surge pod) must not detach the
    /// old agent's hook, whose deliveries still need recording while it
    /// drains; same cgroup, the old link is swapped (attach, then detach).
    /// Hooks of cgroups that are gone are removed by [`Self::prune_stale_links`].
    pub fn attach_agent_cgroup(&mut self, cgroup: &Path) -> Result<()> {
        let f = open("agent cgroup", cgroup)?;
        let ino = cgroup_inode(cgroup).map_err(|source| RedirectError::Open {
            what: "agent cgroup",
            path: cgroup.to_owned(),
            source,
        })?;
        if cgroup2_root().is_some_and(|root| root == cgroup) {
            tracing::warn!(
                cgroup = %cgroup.display(),
                "the agent runs in the root cgroup: its delivery hook also runs for pods' sockets;                  run it in a cgroup of its own"
            );
        }
        let links = self.dir.join("links/agent");
        let hook = format!("{AGENT_SOCKOPS}-{ino}");
        // Ours from an earlier run in this cgroup, and the single pin of
        // agents before per-cgroup pins (splicing only, never deliveries).
        let old = take_pins_named(&links, &[hook.as_str(), AGENT_SOCKOPS]);
        let p: &mut SockOps = prog(&mut self.bpf, "ferry_agent_ops")?;
        let id = p
            .attach(&f, CgroupAttachMode::Single)
            .map_err(prog_err("ferry_agent_ops"))?;
        let link: FdLink = p
            .take_link(id)
            .map_err(prog_err("ferry_agent_ops"))?
            .try_into()
            .map_err(|e| pin_err(&links, e))?;
        pin(link, &links, &hook)?;
        drop(old);
        self.agent_cgroup = Some(ino);
        Ok(())
    }

    /// Starts capturing a pod: hooks on its cgroup, netns and veth, its inbound
    /// listener in `ferry_inbound`, and last its netns in `ferry_pods` (which is
    /// what turns steering on, so the listeners exist before the first redirect).
    pub fn enroll(&mut self, pod: &PodHooks<'_>) -> Result<()> {
        let links_dir = self.dir.join("links").join(pod.uid);
        let old = take_pins(&links_dir);
        let cg = open("pod cgroup", pod.cgroup)?;
        let dir = &links_dir;
        let mut links = vec![
            attach_pinned!(self, dir, CgroupSockAddr, "ferry_connect4", "connect4", |p| p
                .attach(&cg, CgroupAttachMode::Single)),
            attach_pinned!(self, dir, CgroupSockAddr, "ferry_connect6", "connect6", |p| p
                .attach(&cg, CgroupAttachMode::Single)),
            attach_pinned!(self, dir, SockOps, "ferry_sockops", "sockops", |p| p
                .attach(&cg, CgroupAttachMode::Single)),
            attach_pinned!(self, dir, CgroupSkb, "ferry_mark_delivery", "mark_delivery", |p| p
                .attach(&cg, CgroupSkbAttachType::Ingress, CgroupAttachMode::Single)),
            attach_pinned!(self, dir, SkLookup, "ferry_sk_lookup", "sk_lookup", |p| p
                .attach(pod.netns)),
        ];
        let mut ifindex = None;
        if let Some(veth) = pod.host_veth {
            match self.tc_attach {
                TcAttach::Tcx => {
                    for (name, ty, hook) in TC_PROGRAMS {
                        links.push(attach_pinned!(self, dir, SchedClassifier, name, hook, |p| p
                            .attach_with_options(veth, ty, TcAttachOptions::TcxOrder(Default::default()))));
                    }
                    // Netlink filters of an earlier run in the other mode go.
                    release_tc_netlink(dir);
                }
                TcAttach::Netlink => self.attach_tc_netlink(dir, veth)?,
            }
            ifindex = ifindex_of(veth);
        }

        let mut inbound: SockHash<&mut MapData, InboundKey> =
            SockHash::try_from(self.bpf.map_mut("ferry_inbound").expect("ferry_inbound"))
                .map_err(map_err("ferry_inbound"))?;
        let key = InboundKey {
            ip4: u32::from(pod.ip).to_be(),
        };
        inbound
            .insert(key, pod.inbound_listener.as_raw_fd(), 0)
            .map_err(map_err("ferry_inbound"))?;

        let mut pods: BpfHash<&mut MapData, u64, Pod> =
            BpfHash::try_from(self.bpf.map_mut("ferry_pods").expect("ferry_pods")).map_err(map_err("ferry_pods"))?;
        pods.insert(
            pod.netns_cookie,
            Pod {
                pod_id: pod.pod_id,
                flags: 0,
            },
            0,
        )
        .map_err(map_err("ferry_pods"))?;
        drop(old);
        tracing::debug!(pod = pod.uid, links = links.len(), dir = %links_dir.display(), "hooks attached and pinned");
        self.pods.insert(
            pod.uid.to_owned(),
            Enrolled {
                netns_cookie: pod.netns_cookie,
                ip: pod.ip,
                ifindex,
            },
        );
        Ok(())
    }

    /// `tc` on `veth` through netlink: the clsact qdisc added if missing,
    /// Ferry's filters of an earlier run replaced, the marker written. On
    /// failure, what this did is undone.
    fn attach_tc_netlink(&mut self, links_dir: &Path, veth: &str) -> Result<()> {
        let clsact_err = |source| RedirectError::Clsact {
            veth: veth.to_owned(),
            source,
        };
        let added_now = clsact::add(veth).map_err(clsact_err)?;
        // Ferry added it in an earlier run: still Ferry's to remove.
        let added = added_now || tc_markers(links_dir).iter().any(|m| m.veth == veth && m.added);
        let attached = (|| {
            for (name, ty, _) in TC_PROGRAMS {
                // Netlink filters outlive the agent: an earlier run's go first.
                detach_tc_by_name(veth, ty, name);
                let p: &mut SchedClassifier = prog(&mut self.bpf, name)?;
                let id = p
                    .attach_with_options(veth, ty, TcAttachOptions::Netlink(NlOptions::default()))
                    .map_err(prog_err(name))?;
                let link = p.take_link(id).map_err(prog_err(name))?;
                // No file descriptor: forgetting the handle leaves the
                // filter attached (as a pin does); it is detached by name.
                std::mem::forget(link);
            }
            Ok(())
        })();
        if let Err(e) = attached {
            for (name, ty, _) in TC_PROGRAMS {
                detach_tc_by_name(veth, ty, name);
            }
            if added_now {
                remove_clsact_if_unused(veth);
            }
            return Err(e);
        }
        release_tc_markers(links_dir);
        let mark = format!("{}{veth}", if added { TC_MARK_ADDED } else { TC_MARK_KEPT });
        if let Err(e) = fs::create_dir_all(links_dir.join(&mark)) {
            // Only a later clean-up needs it (bpffs refuses names with dots).
            tracing::warn!(veth, error = %e, "cannot record the tc attachment; its clean-up may be missed");
        }
        tracing::debug!(veth, clsact_added = added, "tc attached through netlink");
        Ok(())
    }

    /// Stops capturing a pod: steering off first, then its hooks go.
    pub fn unenroll(&mut self, uid: &str) -> Result<()> {
        let dir = self.dir.join("links").join(uid);
        if let Some(e) = self.pods.remove(uid) {
            let mut pods: BpfHash<&mut MapData, u64, Pod> =
                BpfHash::try_from(self.bpf.map_mut("ferry_pods").expect("ferry_pods"))
                    .map_err(map_err("ferry_pods"))?;
            let _ = pods.remove(&e.netns_cookie);
            let mut inbound: SockHash<&mut MapData, InboundKey> =
                SockHash::try_from(self.bpf.map_mut("ferry_inbound").expect("ferry_inbound"))
                    .map_err(map_err("ferry_inbound"))?;
            let _ = inbound.remove(&InboundKey {
                ip4: u32::from(e.ip).to_be(),
            });
            // After its steering and listener: the pod is not captured any more.
            self.remove_inbound_policy(e.ip)?;
            if let Some(ifindex) = e.ifindex {
                if let Ok(mut t) = aya::maps::PerCpuHashMap::<&mut MapData, u32, crate::maps::Traffic>::try_from(
                    self.bpf.map_mut("ferry_traffic").expect("ferry_traffic"),
                ) {
                    let _ = t.remove(&ifindex);
                }
            }
        }
        drop(take_pins(&dir));
        release_tc_netlink(&dir);
        let _ = fs::remove_dir(&dir);
        Ok(())
    }

    /// Sets what `sk_lookup` does with connections to pod `ip` while its
    /// inbound listener is missing (`maps::INBOUND_*`). Pinned: it holds while
    /// the agent is down. Written before the pod's steering is turned on.
    pub fn set_inbound_policy(&mut self, ip: Ipv4Addr, mode: u32) -> Result<()> {
        let mut m = self.inbound_policy_map()?;
        m.insert(InboundKey::new(ip), InboundPolicy { mode, flags: 0 }, 0)
            .map_err(map_err("ferry_inbound_policy"))
    }

    /// Removes what an earlier run left in the per-pod maps for pods this
    /// run has not enrolled (pods that departed while no agent ran):
    /// `ferry_pods` entries of other netns cookies and `ferry_traffic`
    /// entries of other interfaces. Returns how many went. Call it once this
    /// run has enrolled every pod (with [`Self::prune_stale_links`]).
    pub fn prune_stale_entries(&mut self) -> usize {
        let cookies: std::collections::HashSet<u64> = self.pods.values().map(|e| e.netns_cookie).collect();
        let ifindexes: std::collections::HashSet<u32> = self.pods.values().filter_map(|e| e.ifindex).collect();
        let mut removed = 0;
        if let Some(Ok(mut m)) = self
            .bpf
            .map_mut("ferry_pods")
            .map(BpfHash::<&mut MapData, u64, Pod>::try_from)
        {
            let stale: Vec<u64> = m
                .keys()
                .filter_map(|k| k.ok())
                .filter(|k| !cookies.contains(k))
                .collect();
            for k in stale {
                tracing::info!(
                    netns_cookie = k,
                    "removing the ferry_pods entry of a pod no longer enrolled"
                );
                removed += usize::from(m.remove(&k).is_ok());
            }
        }
        if let Some(Ok(mut m)) = self
            .bpf
            .map_mut("ferry_traffic")
            .map(aya::maps::PerCpuHashMap::<&mut MapData, u32, crate::maps::Traffic>::try_from)
        {
            let stale: Vec<u32> = m
                .keys()
                .filter_map(|k| k.ok())
                .filter(|k| !ifindexes.contains(k))
                .collect();
            for k in stale {
                tracing::info!(
                    ifindex = k,
                    "removing the ferry_traffic entry of a pod no longer enrolled"
                );
                removed += usize::from(m.remove(&k).is_ok());
            }
        }
        removed
    }

    /// Forgets pod `ip`'s inbound policy (the pod is no longer captured).
    pub fn remove_inbound_policy(&mut self, ip: Ipv4Addr) -> Result<()> {
        let mut m = self.inbound_policy_map()?;
        match m.remove(&InboundKey::new(ip)) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            // aya reports a missing key on delete as the syscall's ENOENT.
            Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            Err(e) => Err(map_err("ferry_inbound_policy")(e)),
        }
    }

    fn inbound_policy_map(&mut self) -> Result<BpfHash<&mut MapData, InboundKey, InboundPolicy>> {
        BpfHash::try_from(
            self.bpf
                .map_mut("ferry_inbound_policy")
                .expect("ferry_inbound_policy in object"),
        )
        .map_err(map_err("ferry_inbound_policy"))
    }

    /// Removes pinned links of pods that are not enrolled any more (left by a
    /// previous agent run), and their inbound policies. Call after the first
    /// reconcile.
    pub fn prune_stale_links(&mut self) {
        let live: std::collections::HashSet<Ipv4Addr> = self.pods.values().map(|e| e.ip).collect();
        if let Ok(mut m) = self.inbound_policy_map() {
            let stale: Vec<InboundKey> = m
                .keys()
                .filter_map(|k| k.ok())
                .filter(|k| !live.contains(&k.ip()))
                .collect();
            for k in stale {
                tracing::info!(ip = %k.ip(), "removing the inbound policy of a pod no longer enrolled");
                let _ = m.remove(&k);
            }
        }
        self.prune_agent_hooks();
        let Ok(rd) = fs::read_dir(self.dir.join("links")) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name != "agent" && !self.pods.contains_key(&name) {
                tracing::info!(pod = %name, "removing steering left by a previous run");
                drop(take_pins(&e.path()));
                release_tc_netlink(&e.path());
                let _ = fs::remove_dir(e.path());
            }
        }
    }

    /// Removes the agent hooks (`links/agent/sockops-<inode>`) of cgroups
    /// that no longer exist (agents that ran in other cgroups and are gone;
    /// the kernel already detached them). A live cgroup's hook stays: its
    /// agent may still be draining.
    fn prune_agent_hooks(&mut self) {
        let links = self.dir.join("links/agent");
        let Ok(rd) = fs::read_dir(&links) else { return };
        let others: Vec<(u64, PathBuf)> = rd
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let ino: u64 = name.strip_prefix(AGENT_SOCKOPS)?.strip_prefix('-')?.parse().ok()?;
                (Some(ino) != self.agent_cgroup).then(|| (ino, e.path()))
            })
            .collect();
        if others.is_empty() {
            return;
        }
        let live = cgroup2_root().map(|r| cgroup_inodes(&r)).unwrap_or_default();
        if live.is_empty() {
            return; // cannot tell: keep them
        }
        for (ino, path) in others {
            if !live.contains(&ino) {
                tracing::info!(
                    cgroup_inode = ino,
                    "removing the delivery hook of an agent cgroup that is gone"
                );
                if let Ok(l) = PinnedLink::from_pin(&path) {
                    let _ = l.unpin();
                }
            }
        }
    }

    /// Makes `ferry_mesh_dst` equal to `want`; if `want` cannot fit, changes
    /// nothing and says so (never a partial set: a destination left out would
    /// leave the pod unsteered, in plaintext).
    pub fn set_mesh_destinations(&mut self, want: &BTreeMap<(Ipv4Addr, u16), u32>) -> Result<()> {
        let capacity = self.max_entries("ferry_mesh_dst");
        if want.len() > capacity {
            return Err(RedirectError::Full {
                name: "ferry_mesh_dst",
                wanted: want.len(),
                capacity,
            });
        }
        let mut m: BpfHash<&mut MapData, DstKey, Dst> =
            BpfHash::try_from(self.bpf.map_mut("ferry_mesh_dst").expect("ferry_mesh_dst"))
                .map_err(map_err("ferry_mesh_dst"))?;
        let have: Vec<DstKey> = m.keys().filter_map(|k| k.ok()).collect();
        for k in have {
            if !want.contains_key(&(k.ip(), k.port)) {
                let _ = m.remove(&k);
            }
        }
        for (&(ip, port), &kind) in want {
            m.insert(DstKey::new(ip, port), Dst { kind, pad: 0 }, 0)
                .map_err(map_err("ferry_mesh_dst"))?;
        }
        Ok(())
    }
}

/// Removes a node's pin directory: links first (which detaches them), then maps.
pub fn remove_node_pins(dir: &Path) -> io::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    fs::remove_dir_all(dir)
}

fn prog<'a, T>(bpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let p = bpf.program_mut(name).expect("program in object");
    p.try_into().map_err(prog_err(name))
}

fn open(what: &'static str, path: &Path) -> Result<fs::File> {
    fs::File::open(path).map_err(|source| RedirectError::Open {
        what,
        path: path.to_owned(),
        source,
    })
}

fn pin_err(path: &Path, e: impl std::fmt::Display) -> RedirectError {
    RedirectError::Pin {
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

fn pin(link: FdLink, dir: &Path, hook: &str) -> Result<PathBuf> {
    fs::create_dir_all(dir).map_err(|source| RedirectError::PinDir {
        path: dir.to_owned(),
        source,
    })?;
    let path = dir.join(hook);
    let pinned = link.pin(&path).map_err(|e| pin_err(&path, e))?;
    // The pin keeps the attachment alive; dropping our handle does not detach.
    drop(pinned);
    Ok(path)
}

/// Unpins every link under `dir`, returning them so the caller decides when
/// they detach (after replacements are in place, for a hitless swap).
fn take_pins(dir: &Path) -> Vec<FdLink> {
    let Ok(rd) = fs::read_dir(dir) else { return Vec::new() };
    rd.flatten()
        .filter_map(|e| PinnedLink::from_pin(e.path()).ok())
        .filter_map(|p| p.unpin().ok())
        .collect()
}

/// Unpins the links named `names` under `dir` (see [`take_pins`]).
fn take_pins_named(dir: &Path, names: &[&str]) -> Vec<FdLink> {
    names
        .iter()
        .filter_map(|n| PinnedLink::from_pin(dir.join(n)).ok())
        .filter_map(|p| p.unpin().ok())
        .collect()
}

/// Hook name prefix of the agent cgroup's sockops pins.
const AGENT_SOCKOPS: &str = "sockops";

fn cgroup_inode(p: &Path) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(fs::metadata(p)?.ino())
}

fn cgroup2_root() -> Option<PathBuf> {
    crate::cgroup::cgroup2_mount().ok()
}

/// Inodes of every cgroup under `root` (cgroup ids are their inodes).
fn cgroup_inodes(root: &Path) -> std::collections::HashSet<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut out = std::collections::HashSet::new();
    let mut stack = vec![root.to_owned()];
    while let Some(d) = stack.pop() {
        if let Ok(m) = fs::metadata(&d) {
            out.insert(m.ino());
        }
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(e.path());
            }
        }
    }
    out
}

/// A netlink `tc` attachment recorded in a pod's link directory.
struct TcMarker {
    veth: String,
    /// Ferry added the veth's clsact qdisc.
    added: bool,
    path: PathBuf,
}

fn tc_markers(dir: &Path) -> Vec<TcMarker> {
    let Ok(rd) = fs::read_dir(dir) else { return Vec::new() };
    rd.flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let (added, veth) = match (name.strip_prefix(TC_MARK_ADDED), name.strip_prefix(TC_MARK_KEPT)) {
                (Some(v), _) => (true, v),
                (_, Some(v)) => (false, v),
                _ => return None,
            };
            Some(TcMarker {
                veth: veth.to_owned(),
                added,
                path: e.path(),
            })
        })
        .collect()
}

fn release_tc_markers(dir: &Path) {
    for m in tc_markers(dir) {
        let _ = fs::remove_dir(&m.path);
    }
}

/// Undoes the netlink `tc` attachments recorded in `dir`: Ferry's filters
/// detached, and a clsact qdisc Ferry added removed once nothing else
/// hangs from it. A veth that is gone took both with it.
fn release_tc_netlink(dir: &Path) {
    for m in tc_markers(dir) {
        if ifindex_of(&m.veth).is_some() {
            for (name, ty, _) in TC_PROGRAMS {
                detach_tc_by_name(&m.veth, ty, name);
            }
            if m.added {
                remove_clsact_if_unused(&m.veth);
            }
        }
        let _ = fs::remove_dir(&m.path);
    }
}

/// Detaches every netlink filter of program `name` on `veth` (none: fine).
fn detach_tc_by_name(veth: &str, ty: TcAttachType, name: &str) {
    match aya::programs::tc::qdisc_detach_program(veth, ty, name) {
        Ok(()) => {}
        Err(aya::programs::tc::TcError::IoError(e)) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(veth, program = name, error = %e, "cannot detach a tc filter"),
    }
}

/// Removes `veth`'s clsact qdisc if no filter hangs from it any more.
fn remove_clsact_if_unused(veth: &str) {
    let Some(ifindex) = ifindex_of(veth) else { return };
    match clsact::filters(ifindex) {
        Ok(0) => match clsact::delete(ifindex) {
            Ok(()) => tracing::debug!(veth, "clsact qdisc removed"),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) || e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => tracing::warn!(veth, error = %e, "cannot remove the clsact qdisc Ferry added"),
        },
        Ok(n) => tracing::info!(veth, filters = n, "clsact qdisc kept: other filters use it"),
        Err(e) => tracing::warn!(veth, error = %e, "cannot list the clsact qdisc's filters; kept"),
    }
}

fn ifindex_of(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: if_nametoindex reads a NUL-terminated string that outlives the call.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}
