//! In-process test bed: the real reconciler, proxy and tunnel over loopback,
//! with no privileges. Each "pod" is a loopback address of its own (the
//! whole of 127.0.0.0/8 is local), its sockets come from a loopback socket
//! factory, and a test map stands in for eBPF's original destinations. Each
//! test takes its own /16 of loopback addresses, so tests run in parallel.

#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use ferry_agent::{
    identity::{self, Identities},
    node::{Capacity, EnrollError, Node, Plumbed},
    proxy::{
        orig_dst::{ConnKey, Table},
        Proxy, OUTBOUND_PORT,
    },
    reconcile::Reconciler,
    sockets::{HostSockets, SocketFactory, Source},
    telemetry::{metrics::Metrics, Counters, Telemetry},
    tunnel::{hbone::Hbone, Tunnel},
};
use ferry_api::identity::SignResponse;
use ferry_model::{state::MeshDst, ConfigFile, Settings, Workload};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream},
};

/// Every wait in these tests ends by this deadline.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// A pod's sockets on loopback: its "127.0.0.1" is its own address.
#[derive(Debug)]
pub struct LoopbackPod {
    pub ip: Ipv4Addr,
}

impl SocketFactory for LoopbackPod {
    fn listen(&self, addr: SocketAddrV4) -> io::Result<TcpListener> {
        let addr = if addr.ip().is_loopback() && *addr.ip() == Ipv4Addr::LOCALHOST {
            SocketAddrV4::new(self.ip, addr.port())
        } else {
            addr
        };
        HostSockets.listen(addr)
    }

    fn socket(&self, src: Source) -> io::Result<TcpSocket> {
        let s = HostSockets.socket(src)?;
        if let Source::Any = src {
            // The pod's own address, as a socket in the pod's netns would have.
            s.bind(SocketAddr::V4(SocketAddrV4::new(self.ip, 0)))?;
        }
        Ok(s)
    }
}

/// What the fake node was asked to do.
#[derive(Debug, Default)]
pub struct NodeLog {
    pub steered: Vec<String>,
    pub unsteered: Vec<String>,
    pub destinations: BTreeMap<(Ipv4Addr, u16), MeshDst>,
}

/// The node seam over loopback: no cgroups, netns or eBPF; pods whose uid
/// is in `broken` fail to plumb; its maps hold `capacity`.
pub struct LoopbackNode {
    pub log: Arc<Mutex<NodeLog>>,
    pub broken: Vec<String>,
    pub capacity: Capacity,
}

/// The netns cookie a loopback pod gets: its address as a number.
pub fn cookie(ip: Ipv4Addr) -> u64 {
    u32::from(ip).into()
}

impl Node for LoopbackNode {
    type Pod = ();

    async fn plumb(&mut self, w: &Workload, _cgroup_root: &Path) -> Result<Plumbed<()>, EnrollError> {
        if self.broken.contains(&w.uid) {
            return Err(EnrollError::NoNetns(format!("test: pod {} has no netns", w.uid)));
        }
        Ok(Plumbed {
            sockets: Arc::new(LoopbackPod { ip: w.ip }),
            netns_cookie: cookie(w.ip),
            cgroup: None,
            netns: None,
            host_veth: None,
            handle: (),
        })
    }

    fn steer(&mut self, w: &Workload, _id: u32, _p: &Plumbed<()>, _l: &TcpListener) -> Result<(), EnrollError> {
        self.log.lock().unwrap().steered.push(w.uid.clone());
        Ok(())
    }

    fn unsteer(&mut self, uid: &str) -> Result<(), EnrollError> {
        self.log.lock().unwrap().unsteered.push(uid.to_owned());
        Ok(())
    }

    fn capacity(&self) -> Capacity {
        self.capacity
    }

    fn configure(&mut self, _settings: &Settings) -> Result<(), EnrollError> {
        Ok(())
    }

    fn set_mesh_destinations(&mut self, d: &BTreeMap<(Ipv4Addr, u16), MeshDst>) -> Result<(), EnrollError> {
        self.log.lock().unwrap().destinations = d.clone();
        Ok(())
    }

    fn prune_stale(&mut self) {}
}

/// A test CA that signs workload certificates for SPIFFE ids.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl TestCa {
    pub fn new() -> Self {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = p.self_signed(&key).unwrap();
        let pem = cert.pem();
        Self {
            issuer: Issuer::from_ca_cert_pem(&pem, key).unwrap(),
            pem,
        }
    }

    /// A signed certificate for `spiffe_id`, and its key.
    pub fn workload(&self, spiffe_id: &str) -> (SignResponse, String) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = vec![SanType::URI(spiffe_id.to_owned().try_into().unwrap())];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - Duration::from_secs(60);
        p.not_after = now + Duration::from_secs(3600);
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        let resp = SignResponse {
            cert_chain_pem: format!("{}{}", cert.pem(), self.pem),
            trust_bundle_pem: self.pem.clone(),
            spiffe_id: spiffe_id.to_owned(),
            not_after_unix: p.not_after.unix_timestamp(),
        };
        (resp, key.serialize_pem())
    }

    /// Issues pod `uid` on `agent` a certificate for `spiffe_id` and installs it.
    pub fn issue_to(&self, agent: &TestAgent, uid: &str, spiffe_id: &str) {
        let (c, k) = self.workload(spiffe_id);
        agent
            .ids
            .as_ref()
            .expect("an agent with identities")
            .install(uid, &c.spiffe_id.parse().unwrap(), &c, &k)
            .unwrap();
    }
}

/// One agent in the test process.
pub struct TestAgent {
    pub proxy: Arc<Proxy>,
    pub reconciler: Reconciler<LoopbackNode>,
    pub orig: Arc<Table>,
    pub node: Arc<Mutex<NodeLog>>,
    pub ids: Option<Arc<Identities>>,
    pub hbone: Option<Arc<Hbone>>,
}

impl TestAgent {
    /// Enough of an agent for [`app_connect`] (its proxy and orig-dst map),
    /// to move into a task.
    pub fn view(orig: Arc<Table>, proxy: Arc<Proxy>) -> AppSide {
        AppSide { orig, proxy }
    }
}

/// The part of an agent an app's connection needs.
pub struct AppSide {
    pub orig: Arc<Table>,
    pub proxy: Arc<Proxy>,
}

/// Anything with an orig-dst table apps record into.
pub trait HasOrig {
    fn orig(&self) -> &Table;
}

impl HasOrig for TestAgent {
    fn orig(&self) -> &Table {
        &self.orig
    }
}

impl HasOrig for AppSide {
    fn orig(&self) -> &Table {
        &self.orig
    }
}

/// An agent; with `mtls`, its tunnel is HBONE and its identities are
/// installed by the test (the CA address refuses at once).
pub fn agent(node: &str, mtls: bool, broken: &[&str]) -> TestAgent {
    agent_with_capacity(node, mtls, broken, Capacity::EBPF)
}

/// [`agent`] on a node whose maps hold only `capacity`.
pub fn agent_with_capacity(node: &str, mtls: bool, broken: &[&str], capacity: Capacity) -> TestAgent {
    let ids = mtls.then(|| {
        Identities::new(identity::Options {
            control: "https://127.0.0.1:1".into(),
            control_ca: "/nonexistent".into(),
            token_file: "/nonexistent".into(),
            ttl: Duration::from_secs(3600),
        })
    });
    let hbone = ids.as_ref().map(|i| Arc::new(Hbone::new(i.clone())));
    let counters = Arc::new(Counters::default());
    let metrics = Metrics::new("/nonexistent".into(), node.into(), counters.clone());
    let telemetry = Arc::new(Telemetry::new(metrics, counters));
    let orig = Arc::new(Table::default());
    let tunnel = hbone.clone().map_or(Tunnel::Plain, Tunnel::Hbone);
    let proxy = Proxy::new(orig.clone(), tunnel, telemetry);
    let log = Arc::new(Mutex::new(NodeLog::default()));
    let n = LoopbackNode {
        log: log.clone(),
        broken: broken.iter().map(|s| s.to_string()).collect(),
        capacity,
    };
    TestAgent {
        reconciler: Reconciler::new(n, proxy.clone(), ids.clone(), "/nonexistent".into()),
        proxy,
        orig,
        node: log,
        ids,
        hbone,
    }
}

pub fn config(yaml: &str) -> ConfigFile {
    // Loopback pod addresses are refused by validation (not pod addresses
    // on a real node), so the config is parsed without it.
    serde_norway::from_str(yaml).unwrap()
}

/// An app: answers each connection with "<client ip> <first line>" and closes.
pub async fn echo_app(addr: SocketAddrV4) -> tokio::task::JoinHandle<()> {
    let l = TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, peer)) = l.accept().await else { return };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 1024];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let line = String::from_utf8_lossy(&buf[..n]).to_string();
                let _ = s.write_all(format!("{} {line}", peer.ip()).as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    })
}

/// An app in `pod` connecting to `orig`, steered to its agent's outbound
/// listener as connect4 would (the original destination recorded first).
pub async fn app_stream(a: &impl HasOrig, pod: Ipv4Addr, orig: SocketAddrV4) -> io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::V4(SocketAddrV4::new(pod, 0)))?;
    let SocketAddr::V4(app) = s.local_addr()? else {
        unreachable!("bound to an IPv4 address")
    };
    let proxy = SocketAddrV4::new(pod, OUTBOUND_PORT);
    a.orig().insert(
        ConnKey {
            netns_cookie: cookie(pod),
            app,
            proxy,
        },
        orig,
    );
    s.connect(SocketAddr::V4(proxy)).await
}

/// What an app in `pod` sees when it connects to `orig` and sends `msg`:
/// the reply, or the error.
pub async fn app_connect(a: &impl HasOrig, pod: Ipv4Addr, orig: SocketAddrV4, msg: &str) -> io::Result<String> {
    exchange(app_stream(a, pod, orig).await?, msg).await
}

/// Writes `msg`, half-closes, reads to the end (within the deadline).
pub async fn exchange(mut s: TcpStream, msg: &str) -> io::Result<String> {
    tokio::time::timeout(DEADLINE, async {
        s.write_all(msg.as_bytes()).await?;
        s.shutdown().await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok(out)
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer within the deadline"))?
}

/// Waits until `f` holds (polling), or fails the test at the deadline.
pub async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let end = tokio::time::Instant::now() + DEADLINE;
    while !f() {
        assert!(tokio::time::Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

impl TestCa {
    /// The root, PEM.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// A serving certificate for DNS name `name`, and its key (PEM).
    pub fn server(&self, name: &str) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec![name.to_owned()]).unwrap();
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// A fresh directory for one test's files, removed when dropped.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("ferry-{tag}-{}-{}", std::process::id(), rand::random::<u32>()));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An HTTP app (HTTP/1.1 and HTTP/2): answers every request 200 with
/// "<name> <method> <path>" (the path as the app received it) and header
/// `x-served-by: <name>`; a gRPC request (`content-type:
/// application/grpc*`) gets `grpc-status: 0` trailers-only.
pub async fn http_app(addr: SocketAddrV4, name: &'static str) -> tokio::task::JoinHandle<()> {
    use http_body_util::Full;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let l = TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |r: hyper::Request<hyper::body::Incoming>| async move {
                    let grpc = r
                        .headers()
                        .get("content-type")
                        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
                    let text = format!("{name} {} {}", r.method(), r.uri().path());
                    let mut resp = hyper::Response::new(Full::new(bytes::Bytes::from(text)));
                    resp.headers_mut().insert("x-served-by", name.parse().unwrap());
                    if grpc {
                        *resp.body_mut() = Full::new(bytes::Bytes::new());
                        resp.headers_mut()
                            .insert("content-type", "application/grpc".parse().unwrap());
                        resp.headers_mut().insert("grpc-status", "0".parse().unwrap());
                    }
                    Ok::<_, std::convert::Infallible>(resp)
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(s), svc)
                    .await;
            });
        }
    })
}
