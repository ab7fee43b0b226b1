//! Identity and the mTLS tunnel between nodes, on the cluster-in-a-box with a
//! real CA (ferry-control), real TLS and real packet captures.

use std::{
    io::{Read, Write},
    net::TcpStream,
    sync::Arc,
    time::{Duration, Instant},
};

use ferry_api::{
    channel::{self, ControlEndpoint},
    identity::{identity_client::IdentityClient, SignRequest},
};
use ferry_box::{eventually, require_root, BoxState, ClusterBox, Spec};

const VIP: &str = "10.96.0.10:80";

fn up(f: impl FnOnce(&mut Spec)) -> ClusterBox {
    require_root();
    let mut spec = Spec::demo();
    spec.services[0].endpoints = vec!["echo-2".into()]; // every VIP connection crosses nodes
    f(&mut spec);
    ClusterBox::up(spec, ferry_box::default_bin_dir()).expect("box up")
}

fn log(s: &BoxState, node: usize) -> String {
    std::fs::read_to_string(s.agent_log(node)).unwrap_or_default()
}

/// Captures every frame on node1's underlay link (to node2) with a raw
/// AF_PACKET socket while `traffic` runs; returns the concatenated frames.
fn capture(s: &BoxState, traffic: impl FnOnce() + Send + 'static) -> Vec<u8> {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let sniffer = s
        .in_node(0, move || -> std::thread::JoinHandle<Vec<u8>> {
            // The raw socket must be made in node1's netns: this thread is there.
            // SAFETY: plain socket/bind/recv syscalls on fds owned by this function.
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, (libc::ETH_P_ALL as u16).to_be() as i32) };
            assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
            let name = std::ffi::CString::new("u1").unwrap();
            // SAFETY: if_nametoindex reads a NUL-terminated string.
            let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
            assert!(ifindex > 0, "u1 not found in node1");
            // SAFETY: a zeroed sockaddr_ll with family, protocol and ifindex set is a valid bind address.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
            sll.sll_ifindex = ifindex as i32;
            // SAFETY: sll is a valid sockaddr_ll of the size given.
            let rc = unsafe {
                libc::bind(
                    fd,
                    (&sll as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 100_000,
            };
            // SAFETY: SO_RCVTIMEO takes a timeval of this size.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&tv as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as u32,
                )
            };
            std::thread::spawn(move || {
                let mut all = Vec::new();
                let mut buf = vec![0u8; 65536];
                let deadline = Instant::now() + Duration::from_secs(60);
                while rx.try_recv().is_err() && Instant::now() < deadline {
                    // SAFETY: recv writes at most buf.len() bytes into buf.
                    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
                    if n > 0 {
                        all.extend_from_slice(&buf[..n as usize]);
                    }
                }
                // SAFETY: fd is ours and no longer used.
                unsafe { libc::close(fd) };
                all
            })
        })
        .unwrap();
    traffic();
    std::thread::sleep(Duration::from_millis(300));
    tx.send(()).unwrap();
    sniffer.join().unwrap()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn the_underlay_carries_tls_records_never_the_plaintext() {
    const MARKER: &str = "FERRY-PLAINTEXT-MARKER-7f3a";
    let send = |s: &BoxState| {
        // 500 x 27 bytes each way, so the frames are far more than a few headers.
        let out = s
            .client("client", &["marker", "--to", VIP, "--marker", MARKER, "--count", "500"])
            .unwrap();
        assert!(out.contains("\"ok\":true"), "{out}");
    };
    let b = up(|_| {});
    let st = b.state.clone();
    let pcap = capture(&b.state, move || send(&st));
    assert!(
        pcap.len() > 10_000,
        "the capture saw the transfer ({} bytes)",
        pcap.len()
    );
    assert!(
        !contains(&pcap, MARKER.as_bytes()),
        "plaintext marker visible on the underlay"
    );
    assert!(contains(&pcap, &[0x17, 0x03, 0x03]), "no TLS application-data records");
    // The access logs name the identity each side proved.
    let st = &b.state;
    assert!(eventually(Duration::from_secs(5), || st.access_log(0).iter().any(
        |l| l["direction"] == "outbound" && l["peer_identity"] == "spiffe://cluster.local/ns/default/sa/echo-2"
    )));
    assert!(eventually(Duration::from_secs(5), || st.access_log(1).iter().any(
        |l| l["direction"] == "tunnel" && l["peer_identity"] == "spiffe://cluster.local/ns/default/sa/client"
    )));
    drop(b);
    // Control: with mTLS off the same capture does see the marker, so the
    // check above can fail.
    let plain = up(|s| s.mtls = false);
    let st = plain.state.clone();
    let pcap = capture(&plain.state, move || send(&st));
    assert!(
        contains(&pcap, MARKER.as_bytes()),
        "control capture should see plaintext"
    );
}

/// A CSR for a throwaway key.
fn csr() -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap()
}

fn sign(s: &BoxState, token_of_node: usize, pod: &str) -> Result<String, tonic::Status> {
    let token = channel::read_token(&s.token_path(token_of_node)).unwrap();
    let control = ControlEndpoint::from_ca_file(
        &format!("https://{}", ferry_box::CONTROL_ADDR),
        &s.ca_dir().join("ca.cert.pem"),
    )
    .unwrap();
    let uid = s.pod_uid(pod);
    s.in_node(0, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let ch = control.connect().await.unwrap();
            let req = channel::with_token(
                SignRequest {
                    pod_uid: uid,
                    csr_pem: csr(),
                    ttl_seconds: 60,
                },
                &token,
            )
            .unwrap();
            IdentityClient::new(ch)
                .sign(req)
                .await
                .map(|r| r.into_inner().spiffe_id)
        })
    })
    .unwrap()
}

#[test]
fn a_node_gets_certificates_only_for_its_own_pods() {
    let b = up(|_| {});
    let s = &b.state;
    assert_eq!(
        sign(s, 0, "client").unwrap(),
        "spiffe://cluster.local/ns/default/sa/client"
    );
    let denied = sign(s, 1, "client").unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains("runs on node"), "{}", denied.message());
    let control_log = std::fs::read_to_string(s.dir.join("control.log")).unwrap();
    assert!(control_log.contains("certificate request denied"));
}

/// Accepts any server certificate: these tests probe the *server's* checks.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);
impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Connects from node1 to echo-2's tunnel port presenting `cert`, and tries to use the connection.
fn present(s: &BoxState, cert_pem: String, key_pem: String) {
    let target = format!("{}:15008", s.pod_ip("echo-2").unwrap());
    s.in_node(0, move || {
        use rustls::pki_types::pem::PemObject;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain: Vec<_> = rustls::pki_types::CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .map(Result::unwrap)
            .collect();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
            .with_client_auth_cert(chain, key)
            .unwrap();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        let name = rustls::pki_types::ServerName::try_from("echo-2").unwrap();
        let conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
        let sock = TcpStream::connect_timeout(&target.parse().unwrap(), Duration::from_secs(3)).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, sock);
        // The HTTP/2 preface, then read: a refused peer gets an alert or EOF.
        let _ = tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        let mut buf = [0u8; 64];
        let _ = tls.read(&mut buf);
    })
    .unwrap();
}

fn leaf(
    issuer: &rcgen::Issuer<'_, rcgen::KeyPair>,
    san: rcgen::SanType,
    not_after: time::OffsetDateTime,
) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.subject_alt_names = vec![san];
    p.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
    ];
    p.not_before = not_after - Duration::from_secs(7200);
    p.not_after = not_after;
    (p.signed_by(&key, issuer).unwrap().pem(), key.serialize_pem())
}

#[test]
fn the_tunnel_refuses_bad_peers_and_says_why() {
    let b = up(|_| {});
    let s = &b.state;
    let spiffe = || rcgen::SanType::URI("spiffe://cluster.local/ns/default/sa/client".try_into().unwrap());
    let now = time::OffsetDateTime::now_utc();
    let real = rcgen::Issuer::from_ca_cert_pem(
        &std::fs::read_to_string(s.ca_dir().join("ca.cert.pem")).unwrap(),
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(s.ca_dir().join("ca.key.pem")).unwrap()).unwrap(),
    )
    .unwrap();
    let foreign_key = rcgen::KeyPair::generate().unwrap();
    let mut fp = rcgen::CertificateParams::default();
    fp.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let foreign = rcgen::Issuer::new(fp, foreign_key);

    let cases = [
        (
            "foreign CA",
            leaf(&foreign, spiffe(), now + Duration::from_secs(3600)),
            "UnknownIssuer",
        ),
        (
            "expired",
            leaf(&real, spiffe(), now - Duration::from_secs(3600)),
            "certificate expired",
        ),
        (
            "no SPIFFE id",
            leaf(
                &real,
                rcgen::SanType::DnsName("client".try_into().unwrap()),
                now + Duration::from_secs(3600),
            ),
            "no SPIFFE id",
        ),
    ];
    for (what, (cert, key), reason) in cases {
        let before = log(s, 1).matches("refused tunnel connection").count();
        present(s, cert, key);
        assert!(
            eventually(Duration::from_secs(5), || {
                let l = log(s, 1);
                l.matches("refused tunnel connection").count() > before && l.contains(reason)
            }),
            "{what}: node2 did not log a refusal with {reason:?}"
        );
    }

    // Wrong identity: node1 now believes echo-2 runs as another service
    // account, so the identity echo-2 proves is not the one expected.
    let mut cfg = s.agent_config(0);
    cfg.workloads
        .iter_mut()
        .find(|w| w.name == "echo-2")
        .unwrap()
        .service_account = "someone-else".into();
    let v = s.config_version(0).unwrap();
    std::fs::write(s.config_path(0), serde_norway::to_string(&cfg).unwrap()).unwrap();
    assert!(eventually(Duration::from_secs(5), || s.config_version(0).unwrap_or(0) > v));
    assert!(
        s.who("client", VIP).is_err(),
        "a peer with the wrong identity must be refused"
    );
    assert!(log(s, 0).contains("wrong identity") && log(s, 0).contains("sa/someone-else"));
    // The same refusals, counted by reason (bounded label values).
    let by_reason = |node: usize, metric: &str, reason: &str| -> f64 {
        s.scrape(node)
            .unwrap()
            .samples
            .iter()
            .filter(|x| x.metric == metric && x.labels.get("reason") == Some(reason))
            .map(|x| ferry_box::sample_value(&x.value))
            .sum()
    };
    assert_eq!(
        by_reason(1, "ferry_tunnel_refused_total", "tls"),
        2.0,
        "foreign CA + expired"
    );
    assert_eq!(by_reason(1, "ferry_tunnel_refused_total", "no_spiffe_id"), 1.0);
    assert!(by_reason(0, "ferry_tunnel_handshake_failures_total", "identity") >= 1.0);
}

#[test]
fn certificates_rotate_under_live_traffic() {
    let b = up(|s| s.cert_ttl_seconds = 6);
    let s = b.state.clone();
    let serial = |s: &BoxState| -> Option<String> {
        let certs = s.admin_json(0, "/certs").ok()?;
        certs
            .as_array()?
            .iter()
            .find(|c| c["uid"] == s.pod_uid("client").as_str())?["serial"]
            .as_str()
            .map(str::to_owned)
    };
    let first = serial(&s).expect("client has a certificate");
    // A transfer that outlives the first certificate's half-life.
    let long = {
        let s = s.clone();
        std::thread::spawn(move || s.client("client", &["echo", "--to", VIP, "--bytes", "400000000"]))
    };
    assert!(
        eventually(Duration::from_secs(15), || serial(&s).is_some_and(|x| x != first)),
        "no rotation seen"
    );
    let out = long.join().unwrap().unwrap();
    assert!(
        out.contains("\"ok\":true"),
        "the long transfer must survive rotation: {out}"
    );
    // New connections use the new certificate: a new pooled connection was made for it.
    s.who("client", VIP).unwrap();
    let m = s.scrape(0).unwrap();
    let pool = m
        .samples
        .iter()
        .find(|x| x.metric == "ferry_tunnel_pool_connections_total")
        .map(|x| ferry_box::sample_value(&x.value));
    assert!(pool.unwrap_or(0.0) >= 2.0, "pooled connections: {pool:?}");
    // The rotation is counted, not merely declared: the metric always exists with mTLS.
    let rotations: f64 = m
        .samples
        .iter()
        .filter(|x| x.metric == "ferry_cert_rotations_total")
        .map(|x| ferry_box::sample_value(&x.value))
        .sum();
    assert!(rotations >= 1.0, "rotations: {rotations}");
}

#[test]
fn strict_refuses_plaintext_permissive_lets_it_in_and_probes_always_pass() {
    let mut b = up(|_| {});
    let echo1 = format!("{}:8080", b.state.pod_ip("echo-1").unwrap());
    // PERMISSIVE (no policy): the un-enrolled outsider gets in, as plaintext.
    assert_eq!(b.state.who("outsider", &echo1).unwrap().0, "echo-1");
    // The seed's PeerAuthentication, as is: STRICT for namespace default.
    let seed = include_str!("../fixtures/reviews-routing-circuit-breaking-mtls.yaml");
    let strict = ferry_model::peer_auth::peer_authentications_in(seed).unwrap();
    b.update(|s| s.peer_authentications = strict.clone()).unwrap();
    assert!(b.state.who("outsider", &echo1).is_err(), "STRICT must refuse plaintext");
    assert!(eventually(Duration::from_secs(5), || log(&b.state, 0)
        .contains("refused inbound connection")));
    // Mesh traffic still flows (cross node: mTLS; same node: handed over inside the agent).
    assert!(b.state.who("client", VIP).is_ok());
    assert!(b.state.who("client", &echo1).is_ok());
    // A kubelet probe (from the probe source, on the node) still works; the
    // node's own address (a hostNetwork pod, SNATed traffic) is no probe.
    b.state.add_probe_address(0).unwrap();
    let to: std::net::SocketAddrV4 = echo1.parse().unwrap();
    let probe = ferry_model::admission::PROBE_SOURCE;
    let reply = b.state.node_who(0, Some(probe), to).unwrap().unwrap();
    assert!(
        reply.starts_with("echo-1 169.254.7.127:"),
        "a probe from the node must reach the app: {reply:?}"
    );
    let reply = b.state.node_who(0, None, to).unwrap();
    assert!(
        reply.as_ref().map_or(true, String::is_empty),
        "the node's own address must be refused under STRICT: {reply:?}"
    );
    // Switching back to PERMISSIVE at runtime lets new plaintext connections in.
    b.update(|s| {
        for p in &mut s.peer_authentications {
            p.spec.mtls = Some(ferry_model::peer_auth::Mtls {
                mode: ferry_model::peer_auth::Mode::Permissive,
            });
        }
    })
    .unwrap();
    assert_eq!(b.state.who("outsider", &echo1).unwrap().0, "echo-1");
}
