//! The tunnel's TLS configs, client against server, in memory: the
//! handshake completes with mutual certificates and settles on the cipher
//! suite Ferry prefers (docs/performance.md has the measurement).

mod common;

use std::sync::Arc;

use common::TestCa;
use ferry_agent::identity::tls::{certs_from_pem, client_config, key_from_pem, server_config};
use rustls::{pki_types::ServerName, ClientConnection, RootCertStore, ServerConnection};

fn roots(pem: &str) -> Arc<RootCertStore> {
    let mut r = RootCertStore::empty();
    for c in certs_from_pem(pem).unwrap() {
        r.add(c).unwrap();
    }
    Arc::new(r)
}

/// Moves TLS bytes both ways until neither side has anything to send.
fn pump(c: &mut ClientConnection, s: &mut ServerConnection) {
    for _ in 0..20 {
        let mut moved = false;
        let mut buf = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut buf).unwrap();
        }
        if !buf.is_empty() {
            moved = true;
            s.read_tls(&mut buf.as_slice()).unwrap();
            s.process_new_packets().unwrap();
        }
        buf.clear();
        while s.wants_write() {
            s.write_tls(&mut buf).unwrap();
        }
        if !buf.is_empty() {
            moved = true;
            c.read_tls(&mut buf.as_slice()).unwrap();
            c.process_new_packets().unwrap();
        }
        if !moved {
            return;
        }
    }
}

#[test]
fn tunnel_handshake_uses_tls13_aes_128_gcm() {
    let ca = TestCa::new();
    let (cc, ck) = ca.workload("spiffe://cluster.local/ns/default/sa/client");
    let (sc, sk) = ca.workload("spiffe://cluster.local/ns/default/sa/server");
    let client = client_config(
        certs_from_pem(&cc.cert_chain_pem).unwrap(),
        key_from_pem(&ck).unwrap(),
        roots(&cc.trust_bundle_pem),
    )
    .unwrap();
    let server = server_config(
        certs_from_pem(&sc.cert_chain_pem).unwrap(),
        key_from_pem(&sk).unwrap(),
        roots(&sc.trust_bundle_pem),
    )
    .unwrap();
    let name = ServerName::IpAddress(std::net::Ipv4Addr::new(10, 0, 0, 1).into());
    let mut c = ClientConnection::new(client, name).unwrap();
    let mut s = ServerConnection::new(server).unwrap();
    pump(&mut c, &mut s);
    assert!(!c.is_handshaking() && !s.is_handshaking(), "handshake completed");
    assert!(
        s.peer_certificates().is_some_and(|p| !p.is_empty()),
        "client certificate sent"
    );
    for suite in [c.negotiated_cipher_suite(), s.negotiated_cipher_suite()] {
        assert_eq!(
            suite.map(|s| s.suite()),
            Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
        );
    }
    // Application data goes through, both ways.
    use std::io::{Read, Write};
    c.writer().write_all(b"ping").unwrap();
    pump(&mut c, &mut s);
    let mut got = [0u8; 4];
    s.reader().read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");
}
